//! `ssp-gateway loadtest` keeps its books against targets that misbehave: every request due is
//! a response, a failure (with its first error), unfinished or not sent; requests in flight at
//! the end are drained and those from the warm-up count; connections the server closes are
//! replaced (a request not sent at all, or a GET that got no byte of answer, is sent again
//! once; a booking the server may have processed never); failures that close a connection pause the next attempt; HTTP/2 streams share
//! the replacement; Ctrl-C ends the run with its partial report (in the warm-up, nothing due);
//! exit codes and JSON for automation. The targets are small TLS
//! servers written here, each told how to misbehave.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Response;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ssp_gateway::loadtest::{self, Args, Report, Settings};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// How a [`Target`] answers.
#[derive(Debug, Clone, Copy)]
enum Behave {
    /// 200 to every request, keep-alive.
    Ok,
    /// 200 after this long.
    Delay(Duration),
    /// 200 with `Connection: close`, then closes.
    CloseHeader,
    /// `HTTP/1.0 200` without keep-alive, then closes.
    Http10,
    /// Answers a connection's first request; reads its second and hangs up without a byte.
    DropSecond,
    /// Reads each request and hangs up without a byte.
    DropAll,
    /// Answers the first this many requests (of all connections), then none.
    StallAfter(usize),
    /// Every second request (of all connections) gets this status instead of 200.
    EverySecond(u16),
}

/// A TLS target over HTTP/1.1 written by hand, counting what it saw.
struct Target {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// Of `requests`, the POSTs, each read to the end of its body.
    posts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn target(world: &World, behave: Behave) -> Target {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tls = ssp_gateway::tls::server_config(&world.server_tls(&world.provider), &[b"http/1.1"])
        .expect("target TLS");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let accepted = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let posts = Arc::new(AtomicUsize::new(0));
    let task = {
        let accepted = accepted.clone();
        let requests = requests.clone();
        let posts = posts.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let requests = requests.clone();
                let posts = posts.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut on_this = 0usize;
                    while let Some(head) = read_request_head(&mut s).await {
                        if read_request_body(&mut s, &head).await.is_none() {
                            return;
                        }
                        if head.starts_with(b"POST ") {
                            posts.fetch_add(1, Ordering::SeqCst);
                        }
                        let n = requests.fetch_add(1, Ordering::SeqCst);
                        on_this += 1;
                        let ok: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
                        let answer: Vec<u8> = match behave {
                            Behave::Ok => ok.to_vec(),
                            Behave::Delay(d) => {
                                tokio::time::sleep(d).await;
                                ok.to_vec()
                            }
                            Behave::CloseHeader => {
                                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
                                    .to_vec()
                            }
                            Behave::Http10 => b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
                            Behave::DropSecond if on_this >= 2 => return,
                            Behave::DropSecond => ok.to_vec(),
                            Behave::DropAll => return,
                            Behave::StallAfter(k) if n >= k => {
                                std::future::pending::<()>().await;
                                return;
                            }
                            Behave::StallAfter(_) => ok.to_vec(),
                            Behave::EverySecond(status) if n % 2 == 1 => format!(
                                "HTTP/1.1 {status} Failed\r\nContent-Length: 2\r\n\r\n{{}}"
                            )
                            .into_bytes(),
                            Behave::EverySecond(_) => ok.to_vec(),
                        };
                        if s.write_all(&answer).await.is_err() {
                            return;
                        }
                        if matches!(behave, Behave::CloseHeader | Behave::Http10) {
                            let _ = s.shutdown().await;
                            return;
                        }
                    }
                });
            }
        })
    };
    Target {
        addr,
        accepted,
        requests,
        posts,
        task,
    }
}

/// Reads the body `head` announces with Content-Length (none without it); None when the
/// connection ends first.
async fn read_request_body<S: tokio::io::AsyncRead + Unpin>(s: &mut S, head: &[u8]) -> Option<()> {
    use tokio::io::AsyncReadExt;
    let head = String::from_utf8_lossy(head);
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| {
            v.trim().parse::<usize>().expect("Content-Length")
        });
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).await.ok().map(drop)
}

fn url(addr: SocketAddr) -> String {
    format!("https://localhost:{}{BASE_PATH}", addr.port())
}

fn args(world: &World, addr: SocketAddr) -> Args {
    let mut a = Args::new(
        &url(addr),
        world.consumer.cert.clone(),
        world.consumer.key.clone(),
        world.ca.clone(),
    );
    a.connect_to = Some(addr);
    a.connections = 1;
    a.warmup = Duration::ZERO;
    a.duration = Duration::from_millis(500);
    a
}

async fn run(a: &Args) -> Report {
    let settings = Settings::from_args(a).unwrap_or_else(|e| panic!("settings: {e}"));
    let r = loadtest::run(settings)
        .await
        .unwrap_or_else(|e| panic!("run: {e}"));
    assert_eq!(
        r.accounted(),
        r.due,
        "every request due is a response, a failure, unfinished or not sent: {r:?}"
    );
    // The requests due that got no 2xx, from the status entries as reported.
    let answered_2xx: u64 = r
        .status
        .iter()
        .filter(|(status, _)| status.starts_with('2'))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(r.errors, r.due - answered_2xx, "{r:?}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_stalled_for_the_whole_run_leaves_every_request_due_accounted_for() {
    // 200/s for a 200 ms warm-up and a 500 ms window: 40 slots in the warm-up, 100 in the
    // window. The two connections are stuck on their first requests (from the warm-up) from
    // the start; nothing else is ever sent.
    let world = World::ecdsa();
    let t = target(&world, Behave::StallAfter(0)).await;
    let mut a = args(&world, t.addr);
    a.connections = 2;
    a.rate = Some(200.0);
    a.warmup = Duration::from_millis(200);
    a.drain = Some(Duration::from_millis(200));
    a.timeout = Duration::from_secs(60);
    let r = run(&a).await;
    assert_eq!(
        r.due, 140,
        "the window's 100 and the warm-up's 40 still pending: {r:?}"
    );
    assert_eq!(r.from_warmup, 40, "{r:?}");
    assert_eq!(r.sent, 2, "{r:?}");
    assert_eq!(r.unfinished, 2, "{r:?}");
    assert_eq!(r.not_sent, 138, "{r:?}");
    assert_eq!((r.responses, r.errors), (0, 140), "{r:?}");
    let text = r.to_text();
    assert!(
        text.contains("due 140 (40 from the warm-up), sent 2") && text.contains("not sent 138"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("JSON");
    assert_eq!(json["due"], 140);
    assert_eq!(json["not_sent"], 138);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_idle_connection_asked_for_is_accounted_for_when_the_duration_ends_first() {
    // One opener at a time, and the target never answers: the first attempt is still going
    // when the duration ends, long before its --timeout, and the other 49 never start.
    let world = World::ecdsa();
    let t = target(&world, Behave::StallAfter(0)).await;
    let mut a = args(&world, t.addr);
    a.idle = Some(50);
    a.duration = Duration::from_millis(300);
    a.timeout = Duration::from_secs(60);
    let r = run(&a).await;
    assert_eq!(r.due, 50, "every connection asked for: {r:?}");
    assert_eq!((r.sent, r.unfinished, r.not_sent), (1, 1, 49), "{r:?}");
    assert!(r.failures.is_empty(), "--timeout was not reached: {r:?}");
    assert_eq!((r.responses, r.errors), (0, 50), "{r:?}");
    let idle = r.idle.clone().expect("idle report");
    assert_eq!(
        (idle.requested, idle.open, idle.failed),
        (50, 0, 0),
        "{r:?}"
    );
    let text = r.to_text();
    assert!(text.contains("due 50, sent 1, not sent 49"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_stalls_midway_shows_the_rest_as_unfinished_and_not_sent() {
    let world = World::ecdsa();
    let t = target(&world, Behave::StallAfter(10)).await;
    let mut a = args(&world, t.addr);
    a.rate = Some(100.0);
    a.drain = Some(Duration::from_millis(100));
    let r = run(&a).await;
    assert_eq!(r.due, 50, "{r:?}");
    assert_eq!(r.responses, 10, "{r:?}");
    assert_eq!(r.unfinished, 1, "the one request the target sat on: {r:?}");
    assert_eq!(r.not_sent, 39, "{r:?}");
    assert!(r.failures.is_empty(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_slot_is_on_time_while_every_connection_is_free() {
    // One request a second for half a second: the one slot is due as the run starts, when
    // both connections are free; the workers only ask for it a moment later. It was counted
    // late ("every connection busy") in every fixed-rate run.
    let world = World::ecdsa();
    let t = target(&world, Behave::Ok).await;
    let mut a = args(&world, t.addr);
    a.connections = 2;
    a.rate = Some(1.0);
    let r = run(&a).await;
    assert_eq!((r.due, r.sent, r.ok), (1, 1, 1), "{r:?}");
    assert_eq!(r.late, 0, "{r:?}");
    assert!(r
        .to_text()
        .contains("sent 1 (0 late: every connection busy)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_the_connections_can_send_is_counted_late_or_not_sent() {
    // A million a second for 300 ms over two connections: most slots find every connection
    // busy; those sent went late, the rest were never sent.
    let world = World::ecdsa();
    let t = target(&world, Behave::Ok).await;
    let mut a = args(&world, t.addr);
    a.connections = 2;
    a.rate = Some(1_000_000.0);
    a.duration = Duration::from_millis(300);
    let r = run(&a).await;
    assert_eq!(r.due, 300_000, "{r:?}");
    assert!(r.responses > 0 && r.late > 0, "{r:?}");
    assert!(r.not_sent > 200_000, "{r:?}");
    assert_eq!(r.sent, r.due - r.not_sent);
    assert_eq!(t.requests.load(Ordering::SeqCst) as u64, r.sent, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_at_either_end_of_the_window_are_measured() {
    // Each answer takes 400 ms. Per connection: the first request goes in the 200 ms warm-up
    // and is answered in the window; the second is sent in the window (ending at 700 ms) and
    // answered in the drain, at about 800 ms.
    let world = World::ecdsa();
    let t = target(&world, Behave::Delay(Duration::from_millis(400))).await;
    let mut a = args(&world, t.addr);
    a.connections = 2;
    a.warmup = Duration::from_millis(200);
    let r = run(&a).await;
    assert_eq!(r.responses, 4, "{r:?}");
    assert_eq!(r.from_warmup, 2, "{r:?}");
    assert_eq!((r.due, r.errors, r.unfinished), (4, 0, 0), "{r:?}");
    assert!(
        (r.rps - 4.0).abs() < 1e-9,
        "only the two answered in the window count for the rate: {r:?}"
    );
    assert!(r.latency_ms.p50 >= 350.0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_past_the_drain_is_unfinished_and_an_error() {
    let world = World::ecdsa();
    let t = target(&world, Behave::StallAfter(0)).await;
    let mut a = args(&world, t.addr);
    a.connections = 2;
    a.duration = Duration::from_millis(300);
    a.timeout = Duration::from_secs(300);
    a.drain = Some(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let r = run(&a).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "ends with the drain"
    );
    assert_eq!((r.due, r.unfinished, r.errors), (2, 2, 2), "{r:?}");
    assert!(r.failures.is_empty(), "{r:?}");

    // Within the drain, the timeout applies: a timeout failure, with its reason.
    a.timeout = Duration::from_millis(400);
    a.drain = None;
    let r = run(&a).await;
    assert_eq!(r.failures["timeout"].count, 2, "{r:?}");
    assert!(
        r.failures["timeout"]
            .first_error
            .contains("--timeout 400ms"),
        "{r:?}"
    );
    assert_eq!(r.unfinished, 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_server_closes_are_replaced_without_a_failure() {
    let world = World::ecdsa();
    for behave in [Behave::CloseHeader, Behave::Http10] {
        let t = target(&world, behave).await;
        let a = args(&world, t.addr);
        let r = run(&a).await;
        assert!(r.responses >= 3, "{behave:?}: {r:?}");
        assert!(r.failures.is_empty(), "{behave:?}: {r:?}");
        assert_eq!(r.ok, r.due, "{behave:?}: {r:?}");
        assert_eq!(
            r.reconnects,
            r.responses - 1,
            "{behave:?}: a new connection for every request after the first: {r:?}"
        );
        assert_eq!(r.retries, 0, "{behave:?}: the close was announced: {r:?}");
        assert_eq!(t.accepted.load(Ordering::SeqCst) as u64, r.responses);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_server_hung_up_on_unanswered_is_sent_again_once_on_a_new_connection() {
    // The target reads a reused connection's next request and hangs up without a byte: the
    // request goes again, on a new connection, where it is answered.
    let world = World::ecdsa();
    let t = target(&world, Behave::DropSecond).await;
    let a = args(&world, t.addr);
    let r = run(&a).await;
    assert!(r.responses >= 3, "{r:?}");
    assert!(r.failures.is_empty(), "{r:?}");
    assert_eq!(r.ok, r.due, "{r:?}");
    assert_eq!(r.retries, r.responses - 1, "{r:?}");
    assert_eq!(r.reconnects, r.responses - 1, "{r:?}");
    let text = r.to_text();
    assert!(
        text.contains(&format!(
            "{} reconnects, {} requests sent again",
            r.reconnects, r.retries
        )),
        "{text}"
    );

    // On a new connection there is no second chance: the failure is counted, with its
    // reason, and the next connection waits for the pause.
    let t = target(&world, Behave::DropAll).await;
    let mut a = args(&world, t.addr);
    a.duration = Duration::from_millis(600);
    let r = run(&a).await;
    assert_eq!(r.retries, 0, "{r:?}");
    assert_eq!(r.responses, 0, "{r:?}");
    let http = &r.failures["http"];
    assert!(http.count >= 2, "{r:?}");
    assert!(
        http.first_error.contains("closed") || http.first_error.contains("close_notify"),
        "{r:?}"
    );
    // 20, 40, 80, 160, 320 ms of pauses: about six connections in 600 ms, not hundreds.
    let accepted = t.accepted.load(Ordering::SeqCst);
    assert!(accepted <= 12, "{accepted} connections in 600 ms: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_the_server_hung_up_on_unanswered_is_a_failure_never_sent_again() {
    // The target reads each reused connection's booking to the end of its body and hangs up
    // without a byte: it may have booked the slot, so the POST is not sent again (RFC 9110
    // §9.2.2); it is an http failure, and the target saw each booking once.
    let world = World::ecdsa();
    let t = target(&world, Behave::DropSecond).await;
    let body = world.dir.join("loadtest-booking.json");
    std::fs::write(
        &body,
        br#"{"resourceType":"Appointment","status":"booked"}"#,
    )
    .expect("write the booking");
    let mut a = args(&world, t.addr);
    a.mix = "book".into();
    a.book_body = Some(body);
    let r = run(&a).await;
    assert_eq!(r.retries, 0, "{r:?}");
    assert!(r.responses >= 2, "{r:?}");
    let http = &r.failures["http"];
    assert!(http.count >= 2, "{r:?}");
    assert!(
        http.first_error.contains("closed") || http.first_error.contains("close_notify"),
        "{r:?}"
    );
    let posts = t.posts.load(Ordering::SeqCst) as u64;
    assert_eq!(posts, t.requests.load(Ordering::SeqCst) as u64, "{r:?}");
    assert_eq!(
        posts, r.sent,
        "each booking sent reached the target once: {r:?}"
    );
    assert_eq!(posts, r.responses + http.count + r.unfinished, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_certificate_is_a_tls_failure_and_the_attempts_back_off() {
    // A certificate of a CA the target does not trust: refused in the handshake, under TLS 1.3
    // as an alert the client reads after its side of the handshake is done.
    let world = World::ecdsa();
    let t = target(&world, Behave::Ok).await;
    let mut a = args(&world, t.addr);
    a.cert = world.untrusted.cert.clone();
    a.key = world.untrusted.key.clone();
    a.duration = Duration::from_millis(800);
    let r = run(&a).await;
    assert_eq!(r.responses, 0, "{r:?}");
    assert!(!r.failures.contains_key("http"), "{r:?}");
    let tls = &r.failures["tls"];
    assert!(tls.count >= 2, "{r:?}");
    assert!(tls.first_error.contains("alert"), "{r:?}");
    let accepted = t.accepted.load(Ordering::SeqCst);
    assert!(
        accepted <= 12,
        "{accepted} handshakes in 800 ms: the pauses double from 20 ms: {r:?}"
    );
}

/// An HTTP/2 target that closes each connection gracefully (GOAWAY) after `per_connection`
/// requests on it, and resets the stream (RST_STREAM, the service failing) of every
/// `reset_every`th request of all connections (0: none).
async fn h2_target(world: &World, per_connection: usize, reset_every: usize) -> Target {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tls = ssp_gateway::tls::server_config(&world.server_tls(&world.provider), &[b"h2"])
        .expect("target TLS");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let accepted = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let task = {
        let accepted = accepted.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let requests = requests.clone();
                tokio::spawn(async move {
                    let Ok(s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let closing = Arc::new(Notify::new());
                    let on_this = Arc::new(AtomicUsize::new(0));
                    let service = {
                        let closing = closing.clone();
                        hyper::service::service_fn(move |_req| {
                            let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
                            if on_this.fetch_add(1, Ordering::SeqCst) + 1 == per_connection {
                                closing.notify_one();
                            }
                            let reset = reset_every > 0 && n % reset_every == 0;
                            async move {
                                if reset {
                                    return Err(std::io::Error::other("reset this stream"));
                                }
                                Ok(Response::new(Full::new(Bytes::from_static(b"{}"))))
                            }
                        })
                    };
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        () = closing.notified() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        })
    };
    Target {
        addr,
        accepted,
        requests,
        posts: Arc::new(AtomicUsize::new(0)),
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_share_the_connection_that_replaces_a_closed_one() {
    let world = World::ecdsa();
    let t = h2_target(&world, 20, 0).await;
    let mut a = args(&world, t.addr);
    a.http2 = true;
    a.streams = 8;
    a.duration = Duration::from_millis(600);
    let r = run(&a).await;
    let served = t.requests.load(Ordering::SeqCst);
    let connections = t.accepted.load(Ordering::SeqCst);
    assert!(served >= 60, "{served} requests: {r:?}");
    assert!(
        connections <= served / 20 + 2,
        "{connections} connections for {served} requests at 20 each: the 8 streams share one: {r:?}"
    );
    assert_eq!(r.reconnects as usize, connections - 1, "{r:?}");
    assert!(r.ok > 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_http2_stream_is_a_failure_of_its_request_alone() {
    let world = World::ecdsa();
    let t = h2_target(&world, usize::MAX, 5).await;
    let mut a = args(&world, t.addr);
    a.http2 = true;
    a.streams = 4;
    let r = run(&a).await;
    let served = t.requests.load(Ordering::SeqCst) as u64;
    let http = r.failures.get("http").map_or(0, |f| f.count);
    assert!(served >= 50, "{served} requests: {r:?}");
    assert!(http >= 5, "every fifth stream reset: {r:?}");
    assert_eq!(
        t.accepted.load(Ordering::SeqCst),
        1,
        "the other streams keep the connection, no new one: {r:?}"
    );
    assert_eq!((r.reconnects, r.retries), (0, 0), "{r:?}");
    assert!(r.ok >= 3 * http, "four answers to each reset: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwt_speaks_for_the_consumer_asked_for() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let url = format!("https://localhost:{}/{}", h.gateway.port(), h.endpoint());
    let mut a = args(&h.world, h.gateway);
    a.url = url;
    a.ods = "Y12345".into();
    a.jwt_issuer = "https://consumer.example.org/".into();
    a.sds_user_id = "U0001".into();
    a.sds_role_profile_id = "R0002".into();
    a.duration = Duration::from_millis(200);
    let r = run(&a).await;
    assert!(r.ok > 0, "{r:?}");
    let (_, _, headers) = h.recorder.last_head();
    let claims = ssp_gateway::ssp::jwt::parse(headers.get(http::header::AUTHORIZATION))
        .expect("a JWT reached the provider")
        .into_claims();
    assert_eq!(claims.organization_ods_code.as_deref(), Some("Y12345"));
    assert_eq!(claims.iss.as_deref(), Some("https://consumer.example.org/"));
    assert_eq!(claims.sds_user_id.as_deref(), Some("U0001"));
    assert_eq!(claims.sds_role_profile_id.as_deref(), Some("R0002"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_the_address_is_no_failed_handshake_at_the_gateway() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let url = format!("https://localhost:{}/{}", h.gateway.port(), h.endpoint());
    let mut a = args(&h.world, h.gateway);
    a.url = url;
    a.connect_to = None;
    a.duration = Duration::from_millis(200);
    let r = run(&a).await;
    assert!(r.ok > 0, "{r:?}");
    let (status, metrics) = http_get(h.admin, "/metrics").await;
    assert!(status.is_success());
    let failed: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("ssp_tls_handshake_failures_total{"))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    h.stop().await;
}

/// The command line of `ssp-gateway loadtest` against `addr` with the world's consumer
/// certificate, then `more`.
fn argv(world: &World, addr: SocketAddr, more: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = vec![
        "loadtest".into(),
        "--url".into(),
        url(addr),
        "--connect-to".into(),
        addr.to_string(),
        "--cert".into(),
        world.consumer.cert.display().to_string(),
        "--key".into(),
        world.consumer.key.display().to_string(),
        "--cacert".into(),
        world.ca.display().to_string(),
    ];
    all.extend(more.iter().map(|s| s.to_string()));
    all
}

/// Runs `ssp-gateway loadtest` with `args` against `addr`; its exit code, stdout and stderr.
async fn command(world: &World, addr: SocketAddr, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = argv(
        world,
        addr,
        &["--connections", "1", "--threads", "1", "--warmup", "0s"],
    );
    all.extend(args.iter().map(|s| s.to_string()));
    exec(all).await
}

/// Runs `ssp-gateway` with `all`; its exit code, stdout and stderr.
async fn exec(all: Vec<String>) -> (Option<i32>, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(GATEWAY_BIN)
            .args(&all)
            .output()
            .expect("run ssp-gateway loadtest")
    })
    .await
    .expect("join");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exit_code_follows_the_error_ratio_and_failures_to_start_are_json_too() {
    let world = World::ecdsa();
    let t = target(&world, Behave::EverySecond(500)).await;
    let (code, out, err) = command(
        &world,
        t.addr,
        &["--duration", "300ms", "--json", "--max-error-ratio", "0.9"],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let (errors, due) = (report["errors"].as_u64(), report["due"].as_u64());
    assert!(errors.unwrap_or(0) > 0 && due > errors, "{report}");

    let (code, _, err) = command(
        &world,
        t.addr,
        &["--duration", "300ms", "--max-error-ratio", "0.2"],
    )
    .await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("above --max-error-ratio 0.2"), "{err}");

    // A value the loadtest refuses: exit 2 as for clap's usage errors (1 is a run that could
    // not start), the reason on stderr, and as JSON on stdout with --json.
    for (arg, value, reason) in [
        (
            "--max-error-ratio",
            "2",
            "--max-error-ratio: must be from 0 to 1",
        ),
        ("--connections", "0", "--connections: must be 1 to 100000"),
        ("--rate", "0", "--rate: must be from"),
        ("--rate", "nan", "--rate: must be from"),
        ("--duration", "0s", "--duration: must be above 0"),
        ("--mix", "serch=1", "--mix serch=1: unknown interaction"),
        (
            "--book-body",
            "/nonexistent/b.json",
            "--book-body /nonexistent/b.json: ",
        ),
    ] {
        let (code, out, err) = exec(argv(&world, t.addr, &[arg, value, "--json"])).await;
        assert_eq!(code, Some(2), "{arg} {value}: {err}");
        assert!(err.contains(reason), "{arg} {value}: {err}");
        let failed: serde_json::Value = serde_json::from_str(&out).expect("JSON error");
        assert!(
            failed["error"].as_str().is_some_and(|e| e.contains(reason)),
            "{arg} {value}: {failed}"
        );
    }
    let (code, out, err) = exec(argv(&world, t.addr, &["--connections", "0"])).await;
    assert_eq!(
        (code, out.as_str()),
        (Some(2), ""),
        "no JSON without --json"
    );
    assert!(err.contains("--connections: must be 1 to 100000"), "{err}");
    // An argument clap refuses: its usage error (exit 2), as JSON on stdout with --json.
    let (code, out, err) = command(&world, t.addr, &["--json", "--rate", "fast"]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--rate"), "{err}");
    let failed: serde_json::Value = serde_json::from_str(&out).expect("JSON error");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("'fast'") && e.contains("--rate")),
        "{failed}"
    );
    let (code, out, _) = command(&world, t.addr, &["--rate", "fast"]).await;
    assert_eq!(
        (code, out.as_str()),
        (Some(2), ""),
        "no JSON without --json"
    );
    let free = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead = free.local_addr().expect("addr");
    drop(free);
    let (code, out, _) = command(&world, dead, &["--json", "--mix", "book"]).await;
    assert_eq!(code, Some(1), "the setup search cannot connect");
    let failed: serde_json::Value = serde_json::from_str(&out).expect("JSON error");
    assert!(failed["error"].is_string(), "{failed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_argument_no_request_can_carry_is_refused_before_the_server_is_sought() {
    // Nothing listens at the URL's address and there is no --connect-to: the bad argument is
    // what is reported (exit 2), not that the server cannot be reached (exit 1).
    let world = World::ecdsa();
    let free = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead = free.local_addr().expect("addr");
    drop(free);
    for (arg, value, reason) in [
        (
            "--search-query",
            "status=free&start=ge 2026",
            "--url / --search-query: ",
        ),
        ("--from", "2000\u{7f}", "--from: "),
        ("--to", "9189\u{1}", "--to: "),
    ] {
        let mut all = argv(&world, dead, &[arg, value, "--threads", "1", "--json"]);
        let at = all
            .iter()
            .position(|a| a == "--connect-to")
            .expect("--connect-to");
        all.drain(at..at + 2);
        let (code, out, err) = exec(all).await;
        assert_eq!(code, Some(2), "{arg}: {err}");
        assert!(
            err.contains(reason) && !err.contains("cannot reach"),
            "{arg}: {err}"
        );
        let failed: serde_json::Value = serde_json::from_str(&out).expect("JSON error");
        assert!(
            failed["error"]
                .as_str()
                .is_some_and(|e| e.starts_with(reason)),
            "{failed}"
        );
    }
}

/// Runs `ssp-gateway loadtest --json` at 200 requests/s for a minute with `--warmup
/// warmup` against `t`, sends it SIGINT 400 ms after `ready` says so, and returns its exit
/// code, its JSON report and the rest of its stderr.
async fn interrupted(
    world: &World,
    t: &Target,
    warmup: &str,
    ready: fn(&str, usize) -> bool,
) -> (Option<i32>, serde_json::Value, Vec<String>) {
    let all = argv(
        world,
        t.addr,
        &[
            "--connections",
            "1",
            "--threads",
            "1",
            "--warmup",
            warmup,
            "--duration",
            "60s",
            "--rate",
            "200",
            "--markers",
            "--json",
        ],
    );
    let requests = t.requests.clone();
    let (out, rest) = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut child = std::process::Command::new(GATEWAY_BIN)
            .args(&all)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start ssp-gateway loadtest");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut before = Vec::new();
        let mut line = String::new();
        while !ready(&line, requests.load(Ordering::SeqCst)) {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("never ready: {before:?}");
            }
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(20)) {
                before.push(l.clone());
                line = l;
            }
        }
        let mut rest = Vec::new();
        std::thread::sleep(Duration::from_millis(400));
        let pid = i32::try_from(child.id()).expect("pid");
        // SAFETY: sends SIGINT to the child this test started.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
        let out = child.wait_with_output().expect("wait");
        reader.join().expect("stderr reader");
        rest.extend(rx.try_iter());
        (out, rest)
    })
    .await
    .expect("join");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("JSON report ({e}): {rest:?}"));
    (out.status.code(), report, rest)
}

/// Asserts `due` = `responses` + failures + `unfinished` + `not_sent` and `sent` = `due` -
/// `not_sent` in a JSON report; returns `due`.
fn accounted_for(report: &serde_json::Value) -> u64 {
    let due = report["due"].as_u64().expect("due");
    let failed: u64 = report["failures"]
        .as_object()
        .map(|f| f.values().filter_map(|k| k["count"].as_u64()).sum())
        .unwrap_or(0);
    let accounted = ["responses", "unfinished", "not_sent"]
        .iter()
        .map(|k| report[k].as_u64().unwrap_or(0))
        .sum::<u64>()
        + failed;
    assert_eq!(due, accounted, "{report}");
    let not_sent = report["not_sent"].as_u64().expect("not_sent");
    assert_eq!(report["sent"].as_u64(), Some(due - not_sent), "{report}");
    due
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_ends_the_run_with_its_partial_report() {
    let world = World::ecdsa();
    let t = target(&world, Behave::Ok).await;
    let (code, report, stderr) =
        interrupted(&world, &t, "0s", |line, _| line == "loadtest: measuring").await;
    assert_eq!(code, Some(130), "{stderr:?}");
    assert_eq!(report["interrupted"], true, "{report}");
    let measured = report["measured_s"].as_f64().expect("measured_s");
    assert!(measured > 0.2 && measured < 30.0, "{report}");
    assert!(report["ok"].as_u64().unwrap_or(0) > 10, "{report}");
    let due = accounted_for(&report);
    // About 200 a second for the time measured, not for the minute asked for.
    assert!((due as f64) < measured * 200.0 + 5.0, "{report}");
    assert!(
        stderr.iter().any(|l| l.contains("interrupted")),
        "{stderr:?}"
    );

    // Interrupted in a minute's warm-up, after some requests were answered: the window never
    // opened, so nothing of it was due, and none of the warm-up's slots count either.
    let t = target(&world, Behave::Ok).await;
    let (code, report, stderr) = interrupted(&world, &t, "60s", |_, seen| seen > 0).await;
    assert_eq!(code, Some(130), "{stderr:?}");
    assert!(t.requests.load(Ordering::SeqCst) > 10, "{report}");
    assert_eq!(report["interrupted"], true, "{report}");
    assert_eq!(report["measured_s"].as_f64(), Some(0.0), "{report}");
    assert_eq!(accounted_for(&report), 0, "{report}");
    for k in ["sent", "from_warmup", "not_sent", "responses", "errors"] {
        assert_eq!(report[k].as_u64(), Some(0), "{k}: {report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_the_setup_search_ends_the_command_at_once() {
    // The setup search for free slots to book goes to a target that never answers, with a
    // minute's --timeout: Ctrl-C must not wait for it.
    let world = World::ecdsa();
    let t = target(&world, Behave::StallAfter(0)).await;
    let all = argv(
        &world,
        t.addr,
        &["--mix", "book", "--timeout", "60s", "--json"],
    );
    let child = std::process::Command::new(GATEWAY_BIN)
        .args(&all)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ssp-gateway loadtest");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while t.requests.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "no setup search came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: sends SIGINT to the child this test started.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let sent = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait"))
        .await
        .expect("join");
    assert!(
        sent.elapsed() < Duration::from_secs(20),
        "not the 60 s timeout"
    );
    assert_eq!(out.status.code(), Some(130));
    let failed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON error");
    assert_eq!(failed["error"], "interrupted before the load started");
}
