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
    let started = std::time::Instant::now();
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
    // The burst, and the whole tokens the bucket earned back (one a second) while the loop ran:
    // four in the usual second or so; a loaded machine that took longer earned more, which is
    // not a failure of the limit.
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    let most = 3 + elapsed.floor() as usize;
    assert!(
        (3..=most).contains(&allowed),
        "{statuses:?} in {elapsed:.2}s"
    );
    if most < statuses.len() {
        assert!(statuses.contains(&429), "{statuses:?} in {elapsed:.2}s");
    }
    // Only allowed requests reached the provider.
    assert_eq!(h.recorder.seen(), allowed + 8);
    h.stop().await;
}

/// The gateway's own refusals are answered at once up to the certificate's refusal budget
/// (`refusals_per_second`, `refusal_burst`); past it each is held `reject_delay`, as a 429 is,
/// and counted in `ssp_refusals_held_total`. Another certificate's refusals, and the noisy
/// certificate's good requests, are not held. Before, only 429s were held: a consumer
/// pipelining requests with a bad header got 2,470 refusals a second and another consumer's
/// latency went from 0.08 to 0.45 s (1.8 s at worst).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_past_the_certificate_budget_are_held() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Echo,
        GatewayOptions {
            rate_limit: "refusals_per_second = 1\nrefusal_burst = 2\nreject_delay = \"2s\"",
            ..Default::default()
        },
    )
    .await;
    let held = || async {
        let (_, text) = http_get(h.admin, "/metrics").await;
        sample(&text, "ssp_refusals_held_total").expect("exposed")
    };
    let refused = |client: &Client, from: &'static str| {
        let (client, target) = (client.clone(), metadata(&h));
        async move {
            let a = client
                .gpc(Gpc::new(Method::GET, target, "urn:not:an:interaction").from(from))
                .await;
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
        }
    };
    let noisy = h.consumer();
    let quiet = h.world.client(&h.world.readonly, h.gateway);
    // The burst: answered at once.
    refused(&noisy, CONSUMER_ASID).await;
    refused(&noisy, CONSUMER_ASID).await;
    assert_eq!(held().await, 0.0);
    // Past it: held for the delay.
    let started = std::time::Instant::now();
    refused(&noisy, CONSUMER_ASID).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the refusal was not held"
    );
    assert_eq!(held().await, 1.0);
    // Another certificate's refusal is its own budget's; a good request is never held.
    refused(&quiet, READONLY_ASID).await;
    let ok = noisy
        .gpc(Gpc::new(Method::GET, metadata(&h), IX_METADATA))
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(held().await, 1.0);
    h.stop().await;
}

/// A 429 is held for `reject_delay` (so a flood gets one answer per connection per delay) and
/// holds no in-flight permit meanwhile: with room for one request in flight, another consumer
/// is served while the refused one waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_held_for_the_reject_delay_without_taking_an_in_flight_slot() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Echo,
        GatewayOptions {
            rate_limit: "requests_per_second = 1\nburst = 1\nmax_in_flight = 1\nreject_delay = \"3s\"\noverrides = [{ asid = \"200000000360\", requests_per_second = 1000, burst = 1000 }]",
            ..Default::default()
        },
    )
    .await;
    let noisy = h.consumer();
    let quiet = h.world.client(&h.world.readonly, h.gateway);
    let ok = noisy
        .gpc(Gpc::new(Method::GET, metadata(&h), IX_METADATA))
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    let started = std::time::Instant::now();
    let refused = tokio::spawn({
        let (noisy, target) = (noisy.clone(), metadata(&h));
        async move { noisy.gpc(Gpc::new(Method::GET, target, IX_METADATA)).await }
    });
    // Once the 429 is decided (and held), the other consumer's requests are served one at a
    // time (not shed with 503: the held 429 has given its in-flight slot back).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http_get(h.admin, "/metrics").await;
        if sample(&metrics, "ssp_rejections_total{reason=\"rate_limited\"}") == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the 429 was never decided"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut served = 0;
    while !refused.is_finished() && served < 5 {
        let q = quiet
            .gpc(Gpc::new(Method::GET, metadata(&h), IX_METADATA).from(READONLY_ASID))
            .await;
        assert_eq!(q.status, StatusCode::OK, "{}", q.text());
        served += 1;
    }
    let refused = refused.await.expect("task");
    refused.assert_outcome(429, None, "RATE_LIMIT_EXCEEDED_MESSAGESENDER_200000000359");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "the 429 was sent before its delay"
    );
    assert_eq!(
        served, 5,
        "the quiet consumer was served while the 429 was held"
    );
    assert_eq!(h.recorder.seen(), 1 + 5);
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
    let port = free_port();
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
    // By state only: the host is named in the log, never in a label.
    let circuits = || async {
        let (_, text) = http_get(running.admin_addr, "/metrics").await;
        assert!(!text.contains(&format!("localhost:{port}")), "{text}");
        let open = sample(&text, "ssp_upstream_circuits{state=\"open\"}");
        let opened = sample(&text, "ssp_upstream_circuit_transitions_total{to=\"open\"}");
        let closed = sample(
            &text,
            "ssp_upstream_circuit_transitions_total{to=\"closed\"}",
        );
        (open, opened, closed)
    };
    for _ in 0..2 {
        let a = c
            .gpc(Gpc::new(Method::GET, target.clone(), IX_METADATA))
            .await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(
        circuits().await,
        (Some(1.0), Some(1.0), Some(0.0)),
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
    assert_eq!(circuits().await, (Some(0.0), Some(1.0), Some(1.0)));
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

/// The noisy neighbour, structurally (latency is the e2e bench's `noisy-neighbour` workload):
/// while one consumer floods far past its limit, every request the provider receives is held,
/// so each one the gateway forwards occupies an upstream connection of its own. The quiet
/// consumer's requests all succeed; the provider sees exactly the quiet requests and the noisy
/// ones that were let through; the gateway opens exactly one upstream connection per request
/// the provider saw (a 429 never opened or took one); and every 429 is in the audit trail as
/// a rejection, with no `request` record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_consumer_s_429s_never_reach_the_provider_nor_take_an_upstream_connection() {
    use std::sync::atomic::Ordering;
    const FLOOD: usize = 40;
    const QUIET: usize = 5;
    let world = World::ecdsa();
    let stop = tokio_util::sync::CancellationToken::new();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let provider = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind provider");
    let provider_addr = provider.local_addr().expect("addr");
    let recorder = Recorder::new(Behaviour::Hold(gate.clone()));
    serve_recorder(&world, provider, recorder.clone(), stop.clone());
    let (port, upstream_connections) = tcp_front(0, provider_addr).await;
    let config = gateway_config(
        &world,
        port,
        &GatewayOptions {
            rate_limit: "requests_per_second = 1\nburst = 3\noverrides = [{ asid = \"200000000360\", requests_per_second = 1000, burst = 1000 }]",
            ..Default::default()
        },
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = ssp_gateway::start(&config, shutdown.clone())
        .await
        .expect("start");
    let target = format!("{}/metadata", endpoint(port));

    // The flood and the quiet consumer's requests, all at once, each on its own connection.
    let noisy = world.client(&world.consumer, running.gateway_addr);
    let quiet = world.client(&world.readonly, running.gateway_addr);
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        let (noisy, target, refused) = (noisy.clone(), target.clone(), refused.clone());
        flood.push(tokio::spawn(async move {
            let a = noisy.gpc(Gpc::new(Method::GET, target, IX_METADATA)).await;
            if a.status == StatusCode::TOO_MANY_REQUESTS {
                a.assert_outcome(429, None, "RATE_LIMIT_EXCEEDED_MESSAGESENDER_200000000359");
                refused.fetch_add(1, Ordering::SeqCst);
            }
            a.status
        }));
    }
    let quiet_refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let quiet_requests: Vec<_> = (0..QUIET)
        .map(|_| {
            let (quiet, target, quiet_refused) =
                (quiet.clone(), target.clone(), quiet_refused.clone());
            tokio::spawn(async move {
                let a = quiet
                    .gpc(Gpc::new(Method::GET, target, IX_METADATA).from(READONLY_ASID))
                    .await;
                if a.status != StatusCode::OK {
                    quiet_refused.fetch_add(1, Ordering::SeqCst);
                }
                a
            })
        })
        .collect();

    // Every request is either refused (429) or held at the provider.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let noisy_at_provider = || {
        recorder
            .heads
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, _, h)| h["ssp-from"] == CONSUMER_ASID)
            .count()
    };
    while refused.load(Ordering::SeqCst) + recorder.seen() < FLOOD + QUIET {
        assert_eq!(
            quiet_refused.load(Ordering::SeqCst),
            0,
            "the quiet consumer was refused"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} refused, {} at the provider",
            refused.load(Ordering::SeqCst),
            recorder.seen()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = refused.load(Ordering::SeqCst);
    let let_through = noisy_at_provider();
    assert_eq!(refused + let_through, FLOOD);
    assert!(let_through >= 3, "the burst is let through: {let_through}");
    assert!(refused >= FLOOD / 2, "the flood is refused: {refused}");
    // Everything held, nothing idle: one upstream connection per request the provider has.
    assert_eq!(recorder.seen(), QUIET + let_through);
    assert_eq!(
        upstream_connections.load(Ordering::SeqCst),
        recorder.seen(),
        "upstream connections opened"
    );

    // The provider answers: the quiet consumer's requests all succeed, and so do the noisy
    // requests that were let through.
    gate.add_permits(FLOOD + QUIET);
    for q in quiet_requests {
        let a = q.await.expect("quiet task");
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    }
    let mut ok = 0;
    for f in flood {
        match f.await.expect("noisy task") {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("noisy request answered {other}"),
        }
    }
    assert_eq!(ok, let_through);
    assert_eq!(
        recorder.seen(),
        QUIET + let_through,
        "no 429 reached the provider"
    );

    // The audit trail: a rejection record for every 429, and a request record only for what
    // was forwarded.
    let dir = config.audit.dir.clone();
    loop {
        let records = audit_records(&dir);
        let rejections: Vec<&serde_json::Value> = records
            .iter()
            .filter(|r| r["kind"] == "rejection" && r["status"] == 429)
            .collect();
        let forwarded_from = |asid: &str| {
            records
                .iter()
                .filter(|r| r["kind"] == "request" && r["from"] == asid)
                .count()
        };
        let outcomes = records.iter().filter(|r| r["kind"] == "outcome").count();
        if rejections.len() == refused && outcomes == QUIET + let_through {
            for r in &rejections {
                assert_eq!(r["token"], "RATE_LIMIT_EXCEEDED_MESSAGESENDER_200000000359");
                assert_eq!(r["from"], CONSUMER_ASID);
            }
            assert_eq!(forwarded_from(CONSUMER_ASID), let_through);
            assert_eq!(forwarded_from(READONLY_ASID), QUIET);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} rejection records for {refused} 429s, {outcomes} outcomes",
            rejections.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, metrics) = http_get(running.admin_addr, "/metrics").await;
    assert_eq!(
        sample(&metrics, "ssp_rejections_total{reason=\"rate_limited\"}"),
        Some(refused as f64)
    );
    stop.cancel();
    shutdown.cancel();
    running.wait().await;
}

/// A certificate that names ASIDs nobody has asked about makes the gateway query the directory
/// before anything shows the certificate is registered: such requests are bounded per
/// certificate (here a burst of 5), so a certificate from the CA cannot make it hammer SDS. Cache
/// hits are free, and other certificates are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncached_directory_lookups_are_bounded_per_certificate() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Echo,
        GatewayOptions {
            rate_limit:
                "enabled = false\ndirectory_queries_per_second = 1\ndirectory_query_burst = 5",
            ..Default::default()
        },
    )
    .await;
    let rogue = h.world.client(&h.world.rogue, h.gateway);
    let mut tokens = Vec::new();
    for n in 0..12u32 {
        let from = format!("7000000{n:05}");
        let a = rogue
            .gpc(Gpc::new(Method::GET, metadata(&h), IX_METADATA).from(&from))
            .await;
        tokens.push(
            a.json()["issue"][0]["diagnostics"]
                .as_str()
                .expect("token")
                .to_owned(),
        );
    }
    let refused_by_directory = tokens
        .iter()
        .filter(|t| t.starts_with("ASID_CHECK_FAILED"))
        .count();
    let throttled = tokens
        .iter()
        .filter(|t| *t == "DIRECTORY_QUERY_RATE_EXCEEDED")
        .count();
    // The burst, and a token or two more if the loop took a second or two.
    assert!((5..=8).contains(&refused_by_directory), "{tokens:?}");
    assert_eq!(refused_by_directory + throttled, 12, "{tokens:?}");
    let (_, metrics) = http_get(h.admin, "/metrics").await;
    let misses = sample(&metrics, "ssp_directory_cache_misses_total").expect("misses");
    assert!(
        misses <= 2.0 * refused_by_directory as f64 + 2.0,
        "{misses} directory misses for {refused_by_directory} admitted requests"
    );
    assert_eq!(
        sample(
            &metrics,
            "ssp_rejections_total{reason=\"directory_queries_exceeded\"}"
        ),
        Some(throttled as f64)
    );

    // The registered consumer has a budget of its own, and its parties, once cached, cost none.
    for _ in 0..10 {
        let a = h
            .consumer()
            .gpc(Gpc::new(Method::GET, metadata(&h), IX_METADATA))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    }
    h.stop().await;
}
