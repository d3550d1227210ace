//! `ssp-gateway loadtest` against real servers: the gateway in front of the real mock provider
//! (searches and bookings the provider accepts), a counting server that sees every connection
//! (keep-alive versus a handshake per request, idle connections), and a slow provider (fixed
//! rate accounting for coordinated omission; a run bounded by its duration).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use ssp_gateway::loadtest::{self, Args, LoadtestError, Report, Settings};
use ssp_gateway::server::ConnInfo;
use ssp_gateway::server::RequestBody;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn args(world: &World, url: &str, addr: SocketAddr) -> Args {
    let mut a = Args::new(
        url,
        world.consumer.cert.clone(),
        world.consumer.key.clone(),
        world.ca.clone(),
    );
    a.connect_to = Some(addr);
    a.connections = 2;
    a.warmup = Duration::from_millis(100);
    a.duration = Duration::from_millis(600);
    a
}

async fn run(a: &Args) -> Report {
    let settings = Settings::from_args(a).unwrap_or_else(|e| panic!("settings: {e}"));
    loadtest::run(settings)
        .await
        .unwrap_or_else(|e| panic!("run: {e}"))
}

fn gateway_url(h: &Harness) -> String {
    format!("https://localhost:{}/{}", h.gateway.port(), h.endpoint())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_and_bookings_through_the_gateway_reach_the_mock_provider() {
    let h = start_with_mock(World::ecdsa(), GatewayOptions::default()).await;
    let mut a = args(&h.world, &gateway_url(&h), h.gateway);
    a.mix = "search=3,book=1".into();
    let r = run(&a).await;

    assert!(r.failures.is_empty(), "{r:?}");
    assert!(r.status.get("200").copied().unwrap_or(0) > 0, "{r:?}");
    assert!(
        r.status.get("201").copied().unwrap_or(0) > 0,
        "the mock provider accepted bookings: {r:?}"
    );
    let slots = r.book_slots.expect("bookings made from a search");
    assert!(slots > 0);
    // Every status is a search's 200 or a booking's 201; 409 only once every slot was used.
    for status in r.status.keys() {
        assert!(["200", "201", "409"].contains(&status.as_str()), "{r:?}");
    }
    if r.status.contains_key("409") {
        assert!(r.interactions["book"].responses as usize > slots, "{r:?}");
    }
    assert_eq!(
        r.responses,
        r.ok + r.status.get("409").copied().unwrap_or(0)
    );
    assert!(r.interactions["search"].responses > 0 && r.interactions["book"].responses > 0);
    assert!(r.latency_ms.p50 > 0.0 && r.latency_ms.p50 <= r.latency_ms.p99);
    assert!(r.latency_ms.p999 <= r.latency_ms.max);
    assert!(r.rps > 0.0);
    assert_eq!(r.accounted(), r.due, "{r:?}");
    // The setup search and the warm-up reached the provider too.
    assert!(h.recorder.seen() as u64 > r.responses);
    let (method, uri, headers) = h.recorder.last_head();
    assert!(uri.contains("/B82617/STU3/1/gpconnect/"), "{method} {uri}");
    assert_eq!(headers["ssp-from"], CONSUMER_ASID);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_reported_by_status() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let mut a = args(&h.world, &gateway_url(&h), h.gateway);
    a.to = "999999999999".into();
    let r = run(&a).await;
    assert_eq!(r.ok, 0, "{r:?}");
    assert!(r.status["403"] > 0, "{r:?}");
    assert_eq!(r.errors, r.status["403"]);
    assert_eq!(h.recorder.seen(), 0, "nothing reached the provider");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_share_connections_through_the_gateway() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let mut a = args(&h.world, &gateway_url(&h), h.gateway);
    a.http2 = true;
    a.streams = 4;
    a.mix = "metadata=1,search=1".into();
    let r = run(&a).await;
    assert_eq!(r.shape.protocol, "h2");
    assert!(r.ok > 0 && r.errors == 0, "{r:?}");
    assert!(r.interactions.contains_key("metadata") && r.interactions.contains_key("search"));
    h.stop().await;
}

/// A server that answers every request with 200 and records the client port of each
/// connection a request came on, and how many requests it answered.
struct Counting {
    addr: SocketAddr,
    /// Each request's connection, kept alive so that no two connections share an address.
    /// (Client ports are no identity: on loopback Linux reuses a port still in TIME_WAIT.)
    conns: Arc<Mutex<Vec<Arc<ConnInfo>>>>,
    requests: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Counting {
    /// The connections that carried requests.
    fn connections(&self) -> usize {
        let conns = self.conns.lock().expect("lock");
        conns.iter().map(Arc::as_ptr).collect::<HashSet<_>>().len()
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn counting_server(world: &World) -> Counting {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tls = ssp_gateway::tls::listener_tls(&world.server_tls(&world.provider), &[b"http/1.1"])
        .expect("server TLS");
    let conns = Arc::new(Mutex::new(Vec::new()));
    let requests = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let opts = ssp_gateway::server::ServeOptions {
        name: "counting",
        handshake_timeout: Duration::from_secs(5),
        header_read_timeout: Duration::from_secs(30),
        http2: false,
        grace_period: Duration::from_millis(100),
        limits: Default::default(),
    };
    let tls = ssp_gateway::reload::Reloadable::new("counting provider TLS", Arc::new(tls), vec![]);
    {
        let conns = conns.clone();
        let requests = requests.clone();
        tokio::spawn(ssp_gateway::server::serve_tls(
            listener,
            tls,
            opts,
            stop.clone(),
            move |conn: Arc<ConnInfo>, _req: Request<RequestBody>| {
                let conns = conns.clone();
                let requests = requests.clone();
                async move {
                    conns.lock().expect("lock").push(conn);
                    requests.fetch_add(1, Ordering::SeqCst);
                    Response::new(Full::new(Bytes::from_static(b"{}")))
                }
            },
        ));
    }
    Counting {
        addr,
        conns,
        requests,
        stop,
    }
}

fn direct_url(addr: SocketAddr) -> String {
    format!("https://localhost:{}{BASE_PATH}", addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_reuses_its_connections_and_new_connection_mode_never_does() {
    let world = World::ecdsa();
    let server = counting_server(&world).await;
    let a = args(&world, &direct_url(server.addr), server.addr);
    let r = run(&a).await;
    assert!(r.ok > 2, "{r:?}");
    assert_eq!(
        server.connections(),
        2,
        "two keep-alive connections carried every request"
    );

    let server = counting_server(&world).await;
    let mut a = args(&world, &direct_url(server.addr), server.addr);
    a.new_connection = true;
    let r = run(&a).await;
    assert_eq!(r.shape.mode, "new-connection");
    assert!(r.ok > 2, "{r:?}");
    let served = server.requests.load(Ordering::SeqCst);
    assert_eq!(server.connections(), served, "one connection per request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_mode_opens_and_holds_connections() {
    let world = World::ecdsa();
    let server = counting_server(&world).await;
    let mut a = args(&world, &direct_url(server.addr), server.addr);
    a.idle = Some(25);
    a.connections = 5;
    a.duration = Duration::from_millis(300);
    let r = run(&a).await;
    let idle = r.idle.clone().expect("idle report");
    assert_eq!(
        (idle.requested, idle.open, idle.failed),
        (25, 25, 0),
        "{r:?}"
    );
    assert_eq!(r.responses, 25);
    assert_eq!(r.due, 25);
    assert_eq!(r.shape.warmup_s, 0.0, "the idle mode has no warm-up");
    assert_eq!(server.connections(), 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_rate_latency_counts_from_the_intended_send_time() {
    // One connection to a provider that takes 200 ms, asked for 20 requests/s: each request
    // waits for the ones before it, and its latency includes that wait.
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Slow(Duration::from_millis(200)),
        GatewayOptions::default(),
    )
    .await;
    let mut a = args(&h.world, &gateway_url(&h), h.gateway);
    a.connections = 1;
    a.warmup = Duration::ZERO;
    a.duration = Duration::from_millis(1500);
    a.rate = Some(20.0);
    let fixed = run(&a).await;
    assert!(fixed.responses >= 2, "{fixed:?}");
    // A closed-loop measurement would say about 200 ms for every request; from the intended
    // send time, the later ones waited in the queue for several service times.
    assert!(
        fixed.latency_ms.max >= 600.0,
        "latency from the schedule, not from the send: {fixed:?}"
    );
    assert!(fixed.unfinished <= 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_ends_with_its_duration_and_drain_even_if_the_server_never_answers() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Slow(Duration::from_secs(120)),
        GatewayOptions {
            response_timeout: "300s",
            ..GatewayOptions::default()
        },
    )
    .await;
    let mut a = args(&h.world, &gateway_url(&h), h.gateway);
    a.warmup = Duration::ZERO;
    a.duration = Duration::from_millis(400);
    a.timeout = Duration::from_secs(300);
    a.drain = Some(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let r = run(&a).await;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "bounded by the drain"
    );
    assert_eq!(r.responses, 0, "{r:?}");
    assert_eq!(
        r.unfinished, 2,
        "both connections' requests abandoned after the drain"
    );
    assert_eq!(r.errors, 2, "requests without an answer are errors: {r:?}");
    assert_eq!(r.due, 2, "{r:?}");
    assert!(r.failures.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn bad_arguments_are_refused_before_any_load() {
    let world = World::ecdsa();
    let base = args(
        &world,
        "https://localhost:1/B82617/STU3/1/gpconnect",
        "127.0.0.1:1".parse().expect("addr"),
    );

    for threads in [0, loadtest::MAX_THREADS + 1, 100_000] {
        let mut a = base.clone();
        a.threads = Some(threads);
        let e = Settings::from_args(&a).err().expect("threads out of range");
        assert!(e.to_string().contains("--threads: must be 1 to 256"), "{e}");
    }

    let mut a = base.clone();
    a.streams = 4;
    let e = Settings::from_args(&a).err().expect("streams without h2");
    assert!(e.to_string().contains("--streams"), "{e}");

    // Without keep-alive connections there is one request per connection: --streams was
    // ignored there, and the report still said it was used.
    for (flag, new_connection, idle) in
        [("--new-connection", true, None), ("--idle", false, Some(4))]
    {
        let mut a = base.clone();
        (a.http2, a.streams, a.new_connection, a.idle) = (true, 4, new_connection, idle);
        let e = Settings::from_args(&a)
            .err()
            .expect("streams without keep-alive");
        assert_eq!(
            e.to_string(),
            format!(
                "--streams: several requests per connection need keep-alive connections; \
                 {flag} sends one request per connection"
            )
        );
        a.streams = 1;
        assert!(Settings::from_args(&a).is_ok(), "{flag} alone");
    }

    // Each bounded alone, the two multiply into the requests in flight at once (100,000 ×
    // 1,000 aborted the run on a failed allocation); at most 100,000 of them.
    for (connections, streams, ok) in [
        (100_000, 1000, false),
        (1000, 101, false),
        (100_000, 1, true),
        (100, 1000, true),
    ] {
        let mut a = base.clone();
        a.http2 = true;
        (a.connections, a.streams) = (connections, streams);
        match Settings::from_args(&a) {
            Ok(_) => assert!(ok, "{connections} × {streams} accepted"),
            Err(e) => {
                assert!(!ok, "{connections} × {streams} refused: {e}");
                let want = format!(
                    "--connections × --streams: {connections} × {streams} = {} requests in \
                     flight at once; at most 100000",
                    connections * streams
                );
                assert_eq!(e.to_string(), want);
            }
        }
    }

    // A rate the pacer cannot step (its slot interval would be zero), and the highest it can;
    // one whose interval a Duration cannot hold (1e-300 panicked), and the lowest it can.
    for (rate, ok) in [
        (1e99, false),
        (1_000_001.0, false),
        (1e6, true),
        (0.0, false),
        (1e-300, false),
        (0.000_999, false),
        (0.001, true),
        (f64::NAN, false),
        (f64::INFINITY, false),
    ] {
        let mut a = base.clone();
        a.rate = Some(rate);
        match Settings::from_args(&a) {
            Ok(_) => assert!(ok, "rate {rate} accepted"),
            Err(e) => {
                assert!(!ok, "rate {rate} refused: {e}");
                assert!(e.to_string().contains("--rate"), "{e}");
            }
        }
    }

    // Times whose deadlines would overflow the clock (they panicked), and the longest allowed.
    let forever = Duration::from_secs(u64::MAX);
    let month = Duration::from_secs(30 * 24 * 3600);
    let hour = Duration::from_secs(3600);
    type Field = fn(&mut Args) -> &mut Duration;
    let fields: [(&str, Field, Duration); 3] = [
        ("--duration", |a| &mut a.duration, month),
        ("--warmup", |a| &mut a.warmup, month),
        ("--timeout", |a| &mut a.timeout, hour),
    ];
    for (flag, field, most) in fields {
        for (value, ok) in [
            (forever, false),
            (most + Duration::from_secs(1), false),
            (most, true),
        ] {
            let mut a = base.clone();
            *field(&mut a) = value;
            match Settings::from_args(&a) {
                Ok(_) => assert!(ok, "{flag} {value:?} accepted"),
                Err(e) => {
                    assert!(!ok, "{flag} {value:?} refused: {e}");
                    assert!(e.to_string().contains(flag), "{e}");
                }
            }
        }
    }

    // A drain whose end would overflow the clock, and error ratios outside 0 to 1.
    let mut a = base.clone();
    a.drain = Some(forever);
    let e = Settings::from_args(&a).err().expect("drain too long");
    assert!(e.to_string().contains("--drain: must be at most"), "{e}");
    for ratio in [-0.1, 1.5, f64::NAN] {
        let mut a = base.clone();
        a.max_error_ratio = Some(ratio);
        let e = Settings::from_args(&a).err().expect("ratio out of range");
        assert!(e.to_string().contains("--max-error-ratio"), "{e}");
    }
    let mut a = base.clone();
    a.max_error_ratio = Some(0.0);
    assert!(Settings::from_args(&a).is_ok());

    let mut a = base.clone();
    a.book_body = Some("/nonexistent/booking.json".into());
    let e = Settings::from_args(&a).err().expect("missing body file");
    assert!(matches!(e, LoadtestError::BookBody { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/booking.json"));

    let mut a = base.clone();
    a.key = world.rogue.key.clone();
    let e = Settings::from_args(&a)
        .err()
        .expect("key of another certificate");
    assert!(matches!(e, LoadtestError::Tls(_)), "{e}");

    let mut a = base.clone();
    a.url = "https://localhost:1/x?status=free".into();
    assert!(matches!(
        Settings::from_args(&a).err(),
        Some(LoadtestError::BadUrl { .. })
    ));

    // Values no request can carry are refused with the arguments, before any connection (they
    // were found only once the server had answered, so an unreachable one hid them).
    type Text = fn(&mut Args) -> &mut String;
    let texts: [(&str, Text, &str); 4] = [
        (
            "--url / --search-query",
            |a| &mut a.url,
            "https://localhost:1/B\u{7f}/gpc",
        ),
        (
            "--url / --search-query",
            |a| a.search_query.insert(String::new()),
            "a b",
        ),
        ("--from", |a| &mut a.from, "2000\u{7f}"),
        ("--to", |a| &mut a.to, "9189\n"),
    ];
    for (flag, field, value) in texts {
        let mut a = base.clone();
        *field(&mut a) = value.into();
        let e = Settings::from_args(&a)
            .err()
            .unwrap_or_else(|| panic!("{value:?} accepted"));
        assert!(matches!(e, LoadtestError::BadArg { .. }), "{value:?}: {e}");
        assert!(e.to_string().starts_with(&format!("{flag}: ")), "{e}");
    }
    let mut a = base.clone();
    a.url = "https://exa_mple..org/B82617/STU3/1/gpconnect".into();
    let e = Settings::from_args(&a).err().expect("no TLS server name");
    assert!(e.to_string().contains("not a valid TLS server name"), "{e}");

    // Nothing listens on the address: the run says so instead of reporting zeroes.
    let free = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = free.local_addr().expect("addr");
    drop(free);
    let mut a = base.clone();
    a.url = direct_url(addr);
    a.connect_to = None;
    let settings = Settings::from_args(&a).expect("settings");
    let e = loadtest::run(settings).await.expect_err("unreachable");
    assert!(matches!(e, LoadtestError::Unreachable { .. }), "{e}");
}

#[tokio::test]
async fn a_server_that_stalls_the_handshake_is_unreachable_for_that_reason() {
    // It accepts the TCP connection and never answers the ClientHello: not a connect timeout.
    let world = World::ecdsa();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let url = format!("https://127.0.0.1:{}{BASE_PATH}", addr.port());
    let mut a = args(&world, &url, addr);
    a.connect_to = None;
    a.timeout = Duration::from_millis(300);
    let settings = Settings::from_args(&a).expect("settings");
    let e = loadtest::run(settings).await.expect_err("unreachable");
    assert!(matches!(e, LoadtestError::Unreachable { .. }), "{e}");
    let want = format!("{addr}: the TLS handshake timed out (the TCP connection was accepted)");
    assert!(e.to_string().ends_with(&want), "{e}");
    silent.abort();
}

/// `ssp-gateway loadtest` itself: text and JSON reports, and a failing exit code when no request
/// succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_reports_and_fails_when_nothing_succeeds() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let base: Vec<String> = vec![
        "loadtest".into(),
        "--url".into(),
        gateway_url(&h),
        "--connect-to".into(),
        h.gateway.to_string(),
        "--cert".into(),
        h.world.consumer.cert.display().to_string(),
        "--key".into(),
        h.world.consumer.key.display().to_string(),
        "--cacert".into(),
        h.world.ca.display().to_string(),
        "--connections".into(),
        "1".into(),
        "--threads".into(),
        "1".into(),
        "--warmup".into(),
        "0s".into(),
        "--duration".into(),
        "300ms".into(),
    ];
    let run_binary = |extra: &[&str]| {
        let mut args = base.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(GATEWAY_BIN)
                .args(&args)
                .output()
                .expect("run ssp-gateway loadtest")
        })
    };

    let ok = run_binary(&["--json"]).await.expect("join");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("JSON report");
    assert!(report["responses"].as_u64().unwrap_or(0) > 0, "{report}");
    assert_eq!(report["errors"], 0);
    assert_eq!(report["due"], report["responses"], "{report}");
    assert!(report["failures"].as_object().is_some_and(|f| f.is_empty()));
    assert!(report["latency_ms"]["p99"].as_f64().unwrap_or(0.0) > 0.0);

    let refused = run_binary(&["--to", "999999999999"]).await.expect("join");
    assert!(
        !refused.status.success(),
        "nothing succeeded: exit code non-zero"
    );
    let text = String::from_utf8_lossy(&refused.stdout);
    assert!(text.contains("status      403: "), "{text}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no request succeeded"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // The idle mode holds connections whose one request was refused: none succeeded.
    let idle = run_binary(&["--to", "999999999999", "--idle", "2", "--json"])
        .await
        .expect("join");
    let stderr = String::from_utf8_lossy(&idle.stderr);
    assert_eq!(idle.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no request succeeded"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&idle.stdout).expect("JSON report");
    assert_eq!(report["status"]["403"], 2, "{report}");
    assert_eq!(report["ok"], 0, "{report}");
    h.stop().await;
}
