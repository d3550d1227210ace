//! The circuit breaker's log: a provider host's circuit opening is one WARN line naming the
//! host, its closing one INFO line; the requests refused while it is open are not logged one
//! by one above DEBUG (a review counted 12,638 "circuit open: failing fast" warnings in 3 s).
//! And a request stopped at the end of the shutdown grace period still has its access line.
//! In its own test binary: it installs the process's log subscriber.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};

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
    // Two failures open the circuit; the next twenty fail fast (within the cool-down: the
    // provider is down, so a probe after it reopens the circuit, at DEBUG).
    for _ in 0..22 {
        let a = c
            .gpc(Gpc::new(Method::GET, target.clone(), IX_METADATA))
            .await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    }
    let host = format!("localhost:{port}");
    let lines = |what: &str| -> Vec<String> {
        logs()
            .lines()
            .filter(|l| l.contains(what))
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
