//! The circuit breaker's log: a provider host's circuit opening is one WARN line naming the
//! host, as is its opening again after a failed probe, its closing one INFO line; the requests
//! refused while it is open are not logged one by one above DEBUG (a review counted 12,638
//! "circuit open: failing fast" warnings in 3 s), and their access lines say `circuit_open`.
//! A response body the provider stalled is logged with the request id and target URL. And a
//! request stopped at the end of the shutdown grace period still has its access line.
//! In its own test binary: it installs the process's log subscriber.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Everything the gateway logs in this test binary, as text.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut logs) = LOGS.lock() {
            logs.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().expect("logs")).into_owned()
}

/// Installs the subscriber writing to `LOGS`, once for the tests of this binary.
fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("ssp_gateway=info")
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    });
}

/// A request the provider has not answered by the end of the grace period is stopped: its
/// outcome record says so, and it has its access line like every request (status 0: nothing
/// was answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stopped_at_shutdown_has_its_access_line() {
    capture_logs();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Hold(gate.clone()),
        GatewayOptions {
            grace_period: "300ms",
            ..Default::default()
        },
    )
    .await;
    let c = h.consumer();
    let target = format!("{}/metadata", h.endpoint());
    let held = tokio::spawn(async move {
        c.send(Gpc::new(Method::GET, target, IX_METADATA).build())
            .await
    });
    h.recorder.arrived.notified().await;
    let audit_dir = h.audit_dir.clone();
    h.stop().await;
    assert!(held.await.expect("task").is_err(), "it was answered");
    let records = audit_records(&audit_dir);
    let request = records
        .iter()
        .find(|r| r["kind"] == "request")
        .expect("the request record");
    let id = request["request_id"].as_str().expect("id");
    let access: Vec<String> = logs()
        .lines()
        .filter(|l| l.contains("ssp_gateway::access") && l.contains(id))
        .map(str::to_owned)
        .collect();
    assert_eq!(access.len(), 1, "{access:?}\n{}", logs());
    assert!(access[0].contains("status=0"), "{access:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_logs_its_opening_and_closing_once_not_each_refused_request() {
    capture_logs();

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
    // Two failures open the circuit; the next twenty fail fast (within the cool-down: the
    // provider is down, so a probe after it opens the circuit again: "circuit reopened").
    for _ in 0..22 {
        let a = c
            .gpc(Gpc::new(Method::GET, target.clone(), IX_METADATA))
            .await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    }
    let host = format!("localhost:{port}");
    // This test's lines (the binary's other tests log beside it).
    let lines = |what: &str| -> Vec<String> {
        logs()
            .lines()
            .filter(|l| l.contains(what) && l.contains(&host))
            .map(str::to_owned)
            .collect()
    };
    let opened = lines("circuit opened");
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert!(
        opened[0].contains("WARN") && opened[0].contains(&host),
        "{opened:?}"
    );
    assert_eq!(
        lines("failing fast: ").len() + lines("circuit open: failing fast").len(),
        0,
        "refused requests logged one by one:\n{}",
        logs()
    );

    // The provider comes back; after the cool-down a probe closes the circuit.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind provider");
    let stop = tokio_util::sync::CancellationToken::new();
    serve_recorder(
        &world,
        listener,
        Recorder::new(Behaviour::Echo),
        stop.clone(),
    );
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
    let closed = lines("circuit closed");
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert!(
        closed[0].contains("INFO") && closed[0].contains(&host),
        "{closed:?}"
    );
    assert_eq!(lines("circuit opened").len(), 1, "{}", logs());
    stop.cancel();
    shutdown.cancel();
    running.wait().await;
}

/// The access line of the request with this Ssp-TraceID.
fn access_line(trace: &str) -> String {
    let access: Vec<String> = logs()
        .lines()
        .filter(|l| l.contains("ssp_gateway::access") && l.contains(trace))
        .map(str::to_owned)
        .collect();
    assert_eq!(access.len(), 1, "{trace}: {access:?}");
    access.into_iter().next().unwrap_or_default()
}

/// Sends a GET metadata to `target`; returns the status and the request's Ssp-TraceID.
async fn metadata(c: &Client, target: &str) -> (StatusCode, String) {
    let req = Gpc::new(Method::GET, target.to_owned(), IX_METADATA).build();
    let trace = req.headers()["ssp-traceid"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let a = c.send(req).await.expect("an answer");
    (a.status, trace)
}

/// A 502 failed fast while the circuit is open is told apart from a provider's failure: its
/// access line (and `ssp_rejections_total`) says `circuit_open`, the failure's `upstream_error`
/// (the consumer gets the SSP's token either way). And a probe that fails opens the circuit
/// again with a WARN line naming the host, as the first opening has (before, only at DEBUG).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_is_logged_and_fast_failed_requests_say_circuit_open() {
    capture_logs();
    // Nobody listens on the provider's port.
    let world = World::ecdsa();
    let port = free_port();
    let config = gateway_config(
        &world,
        port,
        &GatewayOptions {
            // Long beside a request (up to 0.35 s each on a loaded test machine).
            circuit_breaker: "failure_threshold = 1\ncool_down = \"2s\"",
            extra_upstream: "connect_retries = 0",
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

    let (status, failed) = metadata(&c, &target).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let (status, fast) = metadata(&c, &target).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let line = access_line(&failed);
    assert!(line.contains("reason=\"upstream_error\""), "{line}");
    let line = access_line(&fast);
    assert!(line.contains("reason=\"circuit_open\""), "{line}");

    // After the cool-down the probe fails: one WARN line names the host.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, probe) = metadata(&c, &target).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(access_line(&probe).contains("reason=\"upstream_error\""));
    let reopened: Vec<String> = logs()
        .lines()
        .filter(|l| l.contains("circuit reopened") && l.contains(&host))
        .map(str::to_owned)
        .collect();
    assert_eq!(reopened.len(), 1, "{}", logs());
    assert!(reopened[0].contains("WARN"), "{reopened:?}");

    let (_, text) = http_get(running.admin_addr, "/metrics").await;
    assert_eq!(
        sample(&text, "ssp_rejections_total{reason=\"upstream_error\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "ssp_rejections_total{reason=\"circuit_open\"}"),
        Some(1.0)
    );
    shutdown.cancel();
    running.wait().await;
}

/// A provider that sends a head and part of its body, then stalls until the gateway hangs up.
async fn stalls_mid_body(world: &World) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let tls = ssp_gateway::tls::server_config(&world.server_tls(&world.provider), &[b"http/1.1"])
        .expect("provider TLS");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                if read_request_head(&mut s).await.is_none() {
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n{\"resource\"")
                    .await;
                let _ = s.flush().await;
                let mut sink = [0u8; 1024];
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A response cut off because the provider stalled mid-body is logged with what finds it: the
/// request id (as in its access line and outcome record) and the target URL. Before, the line
/// said only `idle_ms`, and the access line's status 200 hid it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_logged_with_the_request_id_and_target_url() {
    capture_logs();
    let world = World::ecdsa();
    let port = stalls_mid_body(&world).await;
    let config = gateway_config(
        &world,
        port,
        &GatewayOptions {
            extra_upstream: "body_idle_timeout = \"500ms\"",
            ..Default::default()
        },
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = ssp_gateway::start(&config, shutdown.clone())
        .await
        .expect("start");
    let target = format!("{}/metadata", endpoint(port));
    let req = Gpc::new(Method::GET, target.clone(), IX_METADATA).build();
    let trace = req.headers()["ssp-traceid"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let sent = tokio::time::timeout(
        Duration::from_secs(20),
        world
            .client(&world.consumer, running.gateway_addr)
            .send(req),
    )
    .await
    .expect("answered within 20 s");
    assert!(sent.is_err(), "a truncated body looked complete: {sent:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let outcome = loop {
        let found = audit_records(&config.audit.dir)
            .into_iter()
            .find(|r| r["kind"] == "outcome" && r["ssp_trace_id"].as_str() == Some(&trace));
        if let Some(r) = found {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "no outcome record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(outcome["completed"], false, "{outcome}");
    let id = outcome["request_id"].as_str().expect("request id");
    let stalled: Vec<String> = logs()
        .lines()
        .filter(|l| l.contains("response body stalled"))
        .filter(|l| l.contains(id))
        .map(str::to_owned)
        .collect();
    assert_eq!(stalled.len(), 1, "{}", logs());
    assert!(stalled[0].contains("WARN"), "{stalled:?}");
    assert!(stalled[0].contains(&target), "{stalled:?}");
    assert!(access_line(&trace).contains(id));
    shutdown.cancel();
    running.wait().await;
}
