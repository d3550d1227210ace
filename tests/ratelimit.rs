//! Rate limits, load shedding and circuit breaking, through the real gateway.

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};

fn metadata(h: &Harness) -> String {
    format!("{}/metadata", h.endpoint())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_over_its_limit_gets_429_and_others_carry_on() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Echo,
        GatewayOptions {
            // One request a second, bursts of 3; the read-only consumer has its own override.
            rate_limit: "requests_per_second = 1\nburst = 3\noverrides = [{ asid = \"200000000360\", requests_per_second = 1000, burst = 1000 }]",
            ..Default::default()
        },
    )
    .await;
    let noisy = h.consumer();
    let quiet = h.world.client(&h.world.readonly, h.gateway);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let a = noisy
            .gpc(Gpc::new(Method::GET, metadata(&h), IX_METADATA))
            .await;
        statuses.push(a.status.as_u16());
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            a.assert_outcome(429, None, "RATE_LIMIT_EXCEEDED_MESSAGESENDER_200000000359");
            let retry: u64 = a.headers[http::header::RETRY_AFTER]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("seconds");
            assert!((1..=2).contains(&retry), "Retry-After {retry}");
            assert_eq!(a.headers["x-rate-limit-limit"], "3");
            assert_eq!(a.headers["x-rate-limit-remaining"], "0");
            assert!(a.headers.contains_key("x-rate-limit-reset"));
        }
        // The quiet consumer is never limited by the noisy one.
        let q = quiet
            .gpc(Gpc::new(Method::GET, metadata(&h), IX_METADATA).from(READONLY_ASID))
            .await;
        assert_eq!(q.status, StatusCode::OK, "{}", q.text());
    }
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    assert!((3..=4).contains(&allowed), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    // Only allowed requests reached the provider.
    assert_eq!(h.recorder.seen(), allowed + 8);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_requests_are_shed_with_503() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Slow(Duration::from_secs(2)),
        GatewayOptions {
            rate_limit: "enabled = false\nmax_in_flight = 1",
            ..Default::default()
        },
    )
    .await;
    let c = h.consumer();
    let target = metadata(&h);
    let first = tokio::spawn({
        let (c, target) = (c.clone(), target.clone());
        async move { c.gpc(Gpc::new(Method::GET, target, IX_METADATA)).await }
    });
    h.recorder.arrived.notified().await;
    let a = c.gpc(Gpc::new(Method::GET, target, IX_METADATA)).await;
    a.assert_outcome(503, None, "GATEWAY_OVERLOADED");
    assert_eq!(a.headers[http::header::RETRY_AFTER], "1");
    assert_eq!(first.await.expect("task").status, StatusCode::OK);
    assert_eq!(h.recorder.seen(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_provider_trips_its_circuit_and_a_probe_closes_it() {
    // The provider's port is reserved but nobody listens yet.
    let world = World::ecdsa();
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = reserved.local_addr().expect("addr").port();
    drop(reserved);
    let config = gateway_config(
        &world,
        port,
        &GatewayOptions {
            circuit_breaker: "failure_threshold = 2\ncool_down = \"300ms\"",
            ..Default::default()
        },
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = ssp_gateway::start(&config, shutdown.clone())
        .await
        .expect("start");
    let c = world.client(&world.consumer, running.gateway_addr);
    let target = format!("{}/metadata", endpoint(port));
    let host = format!("localhost:{port}");
    let state = || async {
        let (_, text) = http_get(running.admin_addr, "/metrics").await;
        sample(
            &text,
            &format!("ssp_upstream_circuit_state{{host=\"{host}\"}}"),
        )
    };
    for _ in 0..2 {
        let a = c
            .gpc(Gpc::new(Method::GET, target.clone(), IX_METADATA))
            .await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(
        state().await,
        Some(1.0),
        "two connect failures open the circuit"
    );
    // Open: fails fast, still a 502 with the table's token.
    let a = c
        .gpc(Gpc::new(Method::GET, target.clone(), IX_METADATA))
        .await;
    a.assert_outcome(
        502,
        None,
        &format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
    );

    // The provider comes back; after the cool-down one probe goes through and closes it.
    let h2 = start_provider_on(&world, port).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = c
            .gpc(Gpc::new(Method::GET, target.clone(), IX_METADATA))
            .await;
        if a.status == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the circuit never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state().await, Some(0.0));
    h2.cancel();
    shutdown.cancel();
    running.wait().await;
}

/// A recording provider on a given port (for the recovery half of the breaker test).
async fn start_provider_on(world: &World, port: u16) -> tokio_util::sync::CancellationToken {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind provider");
    let recorder = Recorder::new(Behaviour::Echo);
    let stop = tokio_util::sync::CancellationToken::new();
    serve_recorder(world, listener, recorder, stop.clone());
    stop
}
