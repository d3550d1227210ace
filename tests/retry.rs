//! Connect retries through the real gateway: a request whose connection to the provider could
//! not be made is sent again (the provider sees it exactly once, body whole); a request that
//! reached the provider is never sent again; retries count in the circuit breaker and stop
//! when it opens.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A gateway whose directory names `provider_port`, with `opts`.
async fn gateway(
    world: &World,
    provider_port: u16,
    opts: GatewayOptions,
) -> (ssp_gateway::Running, CancellationToken, std::path::PathBuf) {
    let config = gateway_config(world, provider_port, &opts);
    let shutdown = CancellationToken::new();
    let running = ssp_gateway::start(&config, shutdown.clone())
        .await
        .unwrap_or_else(|e| panic!("gateway start: {e}"));
    (running, shutdown, config.audit.dir.clone())
}

/// A recording provider on a port of its own.
async fn recorder(world: &World, stop: &CancellationToken) -> (SocketAddr, Arc<Recorder>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let recorder = Recorder::new(Behaviour::Echo);
    serve_recorder(world, listener, recorder.clone(), stop.clone());
    (addr, recorder)
}

async fn metrics(admin: SocketAddr) -> String {
    http_get(admin, "/metrics").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_before_tls_is_retried_and_the_provider_sees_the_booking_once() {
    let world = World::ecdsa();
    let stop = CancellationToken::new();
    let (provider, recorded) = recorder(&world, &stop).await;
    let (port, accepted) = tcp_front(1, provider).await;
    let (running, shutdown, audit_dir) = gateway(
        &world,
        port,
        GatewayOptions {
            extra_upstream: "connect_retries = 1\nconnect_retry_backoff = \"10ms\"",
            ..Default::default()
        },
    )
    .await;
    let booking = format!(
        "{{\"resourceType\":\"Appointment\",\"x\":\"{}\"}}",
        "y".repeat(3000)
    );
    let a = world
        .client(&world.consumer, running.gateway_addr)
        .gpc(
            Gpc::new(
                Method::POST,
                format!("{}/Appointment", endpoint(port)),
                IX_BOOK,
            )
            .body(booking.clone()),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "one reset, one retry");
    assert_eq!(
        recorded.seen(),
        1,
        "the provider saw the booking exactly once"
    );
    assert_eq!(
        recorded.body_bytes.load(Ordering::SeqCst),
        booking.len(),
        "the body went out whole on the retry"
    );
    assert_eq!(a.json()["body_length"], booking.len());

    let text = metrics(running.admin_addr).await;
    assert_eq!(
        sample(&text, "ssp_upstream_retries_total{outcome=\"answered\"}"),
        Some(1.0),
        "{text}"
    );
    // The reset lands during the TLS handshake, or already on setting TCP_NODELAY.
    let connect_errors: f64 = ["tcp", "tls"]
        .iter()
        .filter_map(|r| {
            sample(
                &text,
                &format!("ssp_upstream_connect_errors_total{{reason=\"{r}\"}}"),
            )
        })
        .sum();
    assert_eq!(connect_errors, 1.0, "{text}");
    // The audit trail shows the two connections tried; a request without a retry shows none.
    let record = audited(&audit_dir, 200).await;
    assert_eq!(record["upstream_attempts"], 2, "{record}");
    let a = world
        .client(&world.consumer, running.gateway_addr)
        .gpc(Gpc::new(
            Method::GET,
            format!("{}/metadata", endpoint(port)),
            IX_METADATA,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let outcomes: Vec<serde_json::Value> = audit_records(&audit_dir)
            .into_iter()
            .filter(|r| r["kind"] == "outcome")
            .collect();
        if outcomes.len() == 2 {
            assert!(
                outcomes[1].get("upstream_attempts").is_none(),
                "{}",
                outcomes[1]
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{outcomes:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    shutdown.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_is_not_read_before_the_connection_is_up_so_it_is_resent_whole() {
    let world = World::ecdsa();
    let stop = CancellationToken::new();
    let (provider, recorded) = recorder(&world, &stop).await;
    let (port, accepted) = tcp_front(2, provider).await;
    let (running, shutdown, _) = gateway(
        &world,
        port,
        GatewayOptions {
            extra_upstream: "connect_retries = 2\nconnect_retry_backoff = \"0s\"",
            ..Default::default()
        },
    )
    .await;
    // 1 MiB without a Content-Length: the consumer streams it chunked (HTTP/1.1).
    const SIZE: usize = 1024 * 1024;
    let (parts, _) = Gpc::new(
        Method::POST,
        format!("{}/Appointment", endpoint(port)),
        IX_BOOK,
    )
    .build()
    .into_parts();
    let streamed = http::Request::from_parts(parts, StreamBody::Sized { remaining: SIZE });
    let a = world
        .client(&world.consumer, running.gateway_addr)
        .send(streamed)
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "two resets, then through"
    );
    assert_eq!(recorded.seen(), 1);
    assert_eq!(recorded.body_bytes.load(Ordering::SeqCst), SIZE);
    let text = metrics(running.admin_addr).await;
    assert_eq!(
        sample(
            &text,
            "ssp_upstream_retries_total{outcome=\"connect_error\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ssp_upstream_retries_total{outcome=\"answered\"}"),
        Some(1.0)
    );
    stop.cancel();
    shutdown.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_retries_configured_a_reset_connection_is_a_502() {
    let world = World::ecdsa();
    let stop = CancellationToken::new();
    let (provider, recorded) = recorder(&world, &stop).await;
    let (port, accepted) = tcp_front(1, provider).await;
    let (running, shutdown, _) = gateway(
        &world,
        port,
        GatewayOptions {
            extra_upstream: "connect_retries = 0",
            ..Default::default()
        },
    )
    .await;
    let target = format!("{}/metadata", endpoint(port));
    let a = world
        .client(&world.consumer, running.gateway_addr)
        .gpc(Gpc::new(Method::GET, target.clone(), IX_METADATA))
        .await;
    a.assert_outcome(
        502,
        None,
        &format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(recorded.seen(), 0);
    stop.cancel();
    shutdown.cancel();
    running.wait().await;
}

/// A provider that completes TLS, reads the whole request and hangs up without answering.
/// Returns its port and how many requests it read.
async fn reads_then_hangs_up(world: &World) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let tls = ssp_gateway::tls::server_config(&world.server_tls(&world.provider), &[b"http/1.1"])
        .expect("provider TLS");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let Some(head) = read_request_head(&mut s).await else {
                    return;
                };
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let length: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; length];
                if s.read_exact(&mut body).await.is_err() {
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
                // The request is in; the provider goes away without a word.
                let _ = s.shutdown().await;
            });
        }
    });
    (port, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_provider_received_is_never_sent_again() {
    let world = World::ecdsa();
    let (port, received) = reads_then_hangs_up(&world).await;
    let (running, shutdown, _) = gateway(
        &world,
        port,
        GatewayOptions {
            extra_upstream: "connect_retries = 3\nconnect_retry_backoff = \"0s\"",
            ..Default::default()
        },
    )
    .await;
    let client = world.client(&world.consumer, running.gateway_addr);
    let book = format!("{}/Appointment", endpoint(port));
    let a = client
        .gpc(
            Gpc::new(Method::POST, book.clone(), IX_BOOK)
                .body("{\"resourceType\":\"Appointment\"}"),
        )
        .await;
    a.assert_outcome(
        502,
        None,
        &format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{book}"),
    );
    assert_eq!(
        received.load(Ordering::SeqCst),
        1,
        "the booking went out once"
    );
    // A GET has no body to read, so only the connect error tells: not one either.
    let target = format!("{}/metadata", endpoint(port));
    let a = client.gpc(Gpc::new(Method::GET, target, IX_METADATA)).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(received.load(Ordering::SeqCst), 2, "the read went out once");
    let text = metrics(running.admin_addr).await;
    // Every outcome is exposed from start, at 0; none has counted anything.
    let retried: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("ssp_upstream_retries_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(retried.is_empty(), "nothing was retried: {retried:?}");
    shutdown.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_count_in_the_breaker_and_end_when_it_opens() {
    // Nobody listens on the provider's port: every connect is refused.
    let world = World::ecdsa();
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = reserved.local_addr().expect("addr").port();
    drop(reserved);
    let (running, shutdown, _) = gateway(
        &world,
        port,
        GatewayOptions {
            extra_upstream: "connect_retries = 1\nconnect_retry_backoff = \"0s\"",
            circuit_breaker: "failure_threshold = 3\ncool_down = \"300s\"",
            ..Default::default()
        },
    )
    .await;
    let client = world.client(&world.consumer, running.gateway_addr);
    let target = format!("{}/metadata", endpoint(port));
    let refused = "ssp_upstream_connect_errors_total{reason=\"tcp\"}";
    let mut seen = Vec::new();
    for _ in 0..3 {
        let a = client
            .gpc(Gpc::new(Method::GET, target.clone(), IX_METADATA))
            .await;
        a.assert_outcome(
            502,
            None,
            &format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
        );
        seen.push(sample(&metrics(running.admin_addr).await, refused).unwrap_or(0.0));
    }
    // 1st request: two refused connects (the retry too); 2nd: the third opens the circuit and
    // its retry is refused by it; 3rd: fails fast, no connect at all.
    assert_eq!(seen, [2.0, 3.0, 3.0]);
    let text = metrics(running.admin_addr).await;
    assert_eq!(
        sample(
            &text,
            "ssp_upstream_retries_total{outcome=\"connect_error\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "ssp_upstream_retries_total{outcome=\"circuit_open\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "ssp_upstream_circuits{state=\"open\"}"),
        Some(1.0)
    );
    // The 2nd request's retry met the circuit its own failure had opened: an upstream error,
    // not a fast failure; only the 3rd failed fast.
    assert_eq!(
        sample(&text, "ssp_rejections_total{reason=\"upstream_error\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ssp_rejections_total{reason=\"circuit_open\"}"),
        Some(1.0),
        "{text}"
    );
    // Why: the two upstream errors' connects were refused (the 2nd's own retry never went
    // out, so its cause is its first attempt's); the fast failure has none.
    assert_eq!(
        sample(&text, "ssp_upstream_failures_total{cause=\"tcp_refused\"}"),
        Some(2.0),
        "{text}"
    );
    shutdown.cancel();
    running.wait().await;
}
