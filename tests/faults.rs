//! Fault tests: providers that misbehave at the byte level. Each ends with the gateway healthy,
//! the right answer to the consumer, and nothing left hanging.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the raw provider does after reading a request head.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Answers bytes that are not HTTP, then closes.
    Garbage,
    /// Sends a 200 head promising 1 MB, 64 KiB of it, then resets the connection.
    ResetMidBody,
    /// Streams a 100 MB chunked body in 256 KiB chunks.
    Trickle100Mb,
    /// Reads the request and never answers.
    NeverAnswers,
    /// Sends a 200 head promising 100 bytes, 11 of them, then stalls until the gateway hangs up.
    StallMidBody,
    /// Sends a 200 head promising 8 bytes, then one byte every 300 ms, then closes.
    Drip,
    /// Answers each request on the connection with the entry of [`SCRIPTED`] its `x-answer`
    /// header names, until the gateway closes the connection (counted in `hung_up`), or the
    /// entry is one of [`HANGS_UP`] (`reset`: no answer, and a TCP RST).
    Scripted,
}

/// Answers a [`Fault::Scripted`] provider gives, by the name a request asks for.
const SCRIPTED: &[(&str, &[u8])] = &[
    // Both framings (RFC 9112 §6.3: "ought to be handled as an error"); hyper decodes the chunks.
    (
        "length-and-chunked",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    ),
    // The same, with a second answer after the chunked body's end (response splitting).
    (
        "length-and-chunked-split",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 9\r\n\r\n\"smuggle\"",
    ),
    // hyper removes only the chunked framing: the gzip bytes would pass as the body.
    (
        "gzip-chunked",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n",
    ),
    // Not chunked at all: a body to the connection's close, gzip-coded.
    (
        "gzip",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00",
    ),
    // Chunked twice over, in two fields.
    (
        "chunked-twice",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    ),
    // An upgrade the gateway never asked for, as the final answer.
    (
        "switching-protocols",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ),
    // Well formed: `chunked` alone (in any case, with spaces around it).
    (
        "chunked",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding:  Chunked \r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    ),
    // Well formed, with a trailer field after the last chunk.
    (
        "trailers",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n2\r\n{}\r\n0\r\nX-Checksum: abc\r\n\r\n",
    ),
    // Trailer fields a trailer section may not carry (RFC 9110 §6.5.1), beside one it may.
    (
        "trailers-forbidden",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nConnection: close\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\nX-Checksum: abc\r\n\r\n",
    ),
    // Fields that speak for the gateway's whole origin, which every provider shares.
    (
        "origin-fields",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nSet-Cookie: sess=providerA; Path=/\r\nAlt-Svc: h2=\"evil.example:443\"\r\nClear-Site-Data: \"*\"\r\nStrict-Transport-Security: max-age=0\r\nProxy-Authentication-Info: nextnonce=\"x\"\r\nETag: W/\"7\"\r\nContent-Length: 2\r\n\r\n{}",
    ),
    // Well formed, having passed through the provider's own proxies.
    (
        "via",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nVia: 1.1 provider-edge\r\nVia: 1.0 provider-lb\r\nContent-Length: 2\r\n\r\n{}",
    ),
    // Well formed, with reason phrases of the provider's own.
    (
        "own-reason",
        b"HTTP/1.1 200 Slots Found\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}",
    ),
    (
        "own-reason-404",
        b"HTTP/1.1 404 No Such Slot\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}",
    ),
    (
        "obs-text-reason",
        b"HTTP/1.1 404 No Such Slot \xc2\xa0here\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}",
    ),
    // Content announced where there is none (RFC 9110 §15.3.5): 47 bytes of it come late (see
    // `LATE`), once the next request is on the connection.
    (
        "204-with-length",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 47\r\n\r\n",
    ),
    // Allowed on a 304 (the length of what it stands for), with no content after it; but a
    // provider that sends it anyway would answer the next request with it.
    (
        "304-with-length",
        b"HTTP/1.1 304 Not Modified\r\nETag: W/\"1\"\r\nContent-Length: 47\r\n\r\n",
    ),
    // A refusal, and a status beyond HTTP's.
    (
        "refusal",
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}",
    ),
    (
        "refusal-of-body",
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}",
    ),
    (
        "redirect",
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: https://elsewhere.example/\r\nContent-Length: 0\r\n\r\n",
    ),
    // The same length twice (hyper takes it: the values agree), as fields and as a list.
    (
        "length-twice",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    ),
    (
        "length-list",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 2, 2\r\n\r\n{}",
    ),
    (
        "status-999",
        b"HTTP/1.1 999 Weird\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}",
    ),
    // Interim answers before the final one, as many as a real provider might send.
    (
        "interims",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}",
    ),
    // Sent again and again, in batches of 64, until the gateway hangs up (see `FLOOD`).
    ("interim-flood", b"HTTP/1.1 102 Processing\r\n\r\n"),
    // No answer: the connection closed (TLS close_notify, then FIN) after the request.
    ("hang-up", b""),
    // No answer: the connection reset (TCP RST) after the request.
    ("reset", b""),
    // Not HTTP, then the connection closed.
    ("garbage", b"SSH-2.0-OpenSSH_9.2 this is not HTTP\r\n\r\n"),
];

/// Bytes a [`SCRIPTED`] answer's provider sends late: once the next request has come on the
/// connection (or after 300 ms without one), before it answers that request, as a provider
/// whose content announced on a 204 is written after the head would. 47 bytes: a whole answer.
const LATE: &[(&str, &[u8])] = &[(
    "204-with-length",
    b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n\"smuggle\"",
)];

/// The [`SCRIPTED`] answer the provider sends without end, until the gateway hangs up (counted
/// in `hung_up`).
const FLOOD: &str = "interim-flood";

/// The [`SCRIPTED`] answers after which the provider closes the connection.
const HANGS_UP: &[&str] = &["hang-up", "reset", "garbage"];

/// The [`SCRIPTED`] entry (name, answer) a request head asks for with `x-answer`.
fn scripted(head: &[u8]) -> Option<(&'static str, &'static [u8])> {
    let head = std::str::from_utf8(head).ok()?;
    let name = head.split("\r\n").find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field
            .eq_ignore_ascii_case("x-answer")
            .then_some(value.trim())
    })?;
    SCRIPTED.iter().find(|(n, _)| *n == name).copied()
}

const HUNDRED_MB: usize = 100 * 1024 * 1024;

/// A provider speaking raw bytes over mTLS, so it can break HTTP in ways hyper would not.
async fn raw_provider(world: &World, fault: Fault) -> u16 {
    raw_provider_watched(world, fault).await.port
}

/// A [`raw_provider`] and what reached it.
struct Watched {
    port: u16,
    /// Connections the gateway closed on a stalled body.
    hung_up: Arc<AtomicUsize>,
    /// Request heads read.
    requests: Arc<AtomicUsize>,
    /// Requests that came on a connection after one of the [`UNSAFE`] answers.
    reused_after_unsafe: Arc<AtomicUsize>,
}

/// The [`SCRIPTED`] answers after which the gateway must not send another request on the
/// connection (`refusal-of-body` and `redirect` are asked for by requests with a body).
const UNSAFE: &[&str] = &[
    "204-with-length",
    "304-with-length",
    "refusal-of-body",
    "redirect",
];

/// [`raw_provider`], counting the requests it read and the connections the gateway closed on
/// a stalled body.
async fn raw_provider_watched(world: &World, fault: Fault) -> Watched {
    let hung_up = Arc::new(AtomicUsize::new(0));
    let count = hung_up.clone();
    let requests = Arc::new(AtomicUsize::new(0));
    let requests_read = requests.clone();
    let reused_after_unsafe = Arc::new(AtomicUsize::new(0));
    let reused = reused_after_unsafe.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let tls = ssp_gateway::tls::server_config(&world.server_tls(&world.provider), &[b"http/1.1"])
        .expect("provider TLS");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let hung_up = count.clone();
            let requests = requests_read.clone();
            let reused = reused.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let Some(mut head) = read_request_head(&mut s).await else {
                    return;
                };
                requests.fetch_add(1, Ordering::SeqCst);
                match fault {
                    Fault::Scripted => loop {
                        let Some((name, answer)) = scripted(&head) else {
                            return;
                        };
                        if name == "reset" {
                            let (tcp, _) = s.into_inner();
                            // SO_LINGER 0: close with a TCP RST, as a crashed provider would.
                            #[allow(deprecated)]
                            let _ = tcp.set_linger(Some(Duration::ZERO));
                            return;
                        }
                        if name == FLOOD {
                            let batch = answer.repeat(64);
                            while s.write_all(&batch).await.is_ok() && s.flush().await.is_ok() {}
                            hung_up.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        if s.write_all(answer).await.is_err() || s.flush().await.is_err() {
                            return;
                        }
                        if HANGS_UP.contains(&name) {
                            let _ = s.shutdown().await;
                            return;
                        }
                        // The next request on this connection, or its close.
                        let next = match LATE.iter().find(|(n, _)| *n == name) {
                            Some((_, late)) => {
                                let next = tokio::time::timeout(
                                    Duration::from_millis(300),
                                    read_request_head(&mut s),
                                )
                                .await;
                                if s.write_all(late).await.is_err() || s.flush().await.is_err() {
                                    hung_up.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                                match next {
                                    Ok(next) => next,
                                    Err(_) => read_request_head(&mut s).await,
                                }
                            }
                            None => read_request_head(&mut s).await,
                        };
                        let Some(next) = next else {
                            hung_up.fetch_add(1, Ordering::SeqCst);
                            return;
                        };
                        if UNSAFE.contains(&name) {
                            reused.fetch_add(1, Ordering::SeqCst);
                        }
                        head = next;
                        requests.fetch_add(1, Ordering::SeqCst);
                    },
                    Fault::Garbage => {
                        let _ = s
                            .write_all(b"SSH-2.0-OpenSSH_9.2 this is not HTTP\r\n\r\n")
                            .await;
                        let _ = s.shutdown().await;
                    }
                    Fault::ResetMidBody => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 1048576\r\n\r\n")
                            .await;
                        let _ = s.write_all(&vec![b'{'; 64 * 1024]).await;
                        let _ = s.flush().await;
                        let (tcp, _) = s.into_inner();
                        // SO_LINGER 0: close with a TCP RST, as a crashed provider would.
                        #[allow(deprecated)]
                        let _ = tcp.set_linger(Some(Duration::ZERO));
                        drop(tcp);
                    }
                    Fault::Trickle100Mb => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                            .await;
                        let chunk = vec![b'z'; 256 * 1024];
                        let mut sent = 0;
                        while sent < HUNDRED_MB {
                            let head = format!("{:x}\r\n", chunk.len());
                            if s.write_all(head.as_bytes()).await.is_err()
                                || s.write_all(&chunk).await.is_err()
                                || s.write_all(b"\r\n").await.is_err()
                            {
                                return;
                            }
                            sent += chunk.len();
                        }
                        let _ = s.write_all(b"0\r\n\r\n").await;
                        let _ = s.flush().await;
                    }
                    Fault::StallMidBody => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n{\"resource\"")
                            .await;
                        let _ = s.flush().await;
                        // Stalled: the rest never comes. Waits for the gateway to let go.
                        let mut sink = [0u8; 1024];
                        while let Ok(n) = s.read(&mut sink).await {
                            if n == 0 {
                                break;
                            }
                        }
                        hung_up.fetch_add(1, Ordering::SeqCst);
                    }
                    Fault::Drip => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
                            .await;
                        for byte in b"{\"x\":12}" {
                            let _ = s.flush().await;
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            if s.write_all(&[*byte]).await.is_err() {
                                return;
                            }
                        }
                        let _ = s.shutdown().await;
                    }
                    Fault::NeverAnswers => {
                        // Hold the connection open, silent, until the gateway gives up.
                        let mut sink = [0u8; 1024];
                        while let Ok(n) = s.read(&mut sink).await {
                            if n == 0 {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    Watched {
        port,
        hung_up,
        requests,
        reused_after_unsafe,
    }
}

async fn gateway_before(
    fault: Fault,
    opts: GatewayOptions,
) -> (
    World,
    ssp_gateway::Running,
    tokio_util::sync::CancellationToken,
    u16,
    std::path::PathBuf,
) {
    let world = World::ecdsa();
    let port = raw_provider(&world, fault).await;
    let config = gateway_config(&world, port, &opts);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = ssp_gateway::start(&config, shutdown.clone())
        .await
        .expect("start");
    (world, running, shutdown, port, config.audit.dir.clone())
}

/// The gateway still answers its own checks after the fault.
async fn still_healthy(world: &World, running: &ssp_gateway::Running) {
    let a = world
        .client(&world.consumer, running.gateway_addr)
        .gpc(Gpc::new(
            Method::GET,
            "https://localhost:1/B82617/STU3/1/gpconnect/metadata".into(),
            IX_METADATA,
        ))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_provider_is_a_502() {
    let (world, running, shutdown, port, audit_dir) =
        gateway_before(Fault::Garbage, GatewayOptions::default()).await;
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
    let record = audited(&audit_dir, 502).await;
    assert_eq!(
        record["token"],
        format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}")
    );
    still_healthy(&world, &running).await;
    shutdown.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_answers_is_a_504() {
    let (world, running, shutdown, port, audit_dir) = gateway_before(
        Fault::NeverAnswers,
        GatewayOptions {
            response_timeout: "500ms",
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
        504,
        None,
        &format!("TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
    );
    let record = audited(&audit_dir, 504).await;
    assert_eq!(
        record["token"],
        format!("TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_{target}")
    );
    assert_eq!(record["upstream_failure"], "response_timeout", "{record}");
    still_healthy(&world, &running).await;
    shutdown.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_body_reaches_the_consumer_as_a_broken_body() {
    let (world, running, shutdown, port, audit_dir) =
        gateway_before(Fault::ResetMidBody, GatewayOptions::default()).await;
    let target = format!("{}/metadata", endpoint(port));
    for http2 in [false, true] {
        let client = world.client_with(&world.consumer, running.gateway_addr, http2);
        // The head was already on its way: the consumer gets 200 and then a body that breaks
        // off — never a complete-looking truncated body.
        let result = client
            .send(Gpc::new(Method::GET, target.clone(), IX_METADATA).build())
            .await;
        match result {
            Ok(a) => panic!(
                "a truncated body looked complete: {} bytes, status {}",
                a.body.len(),
                a.status
            ),
            Err(e) => assert!(!e.is_empty()),
        }
    }
    // The audit trail says the response broke off, and both are counted as cut off.
    let record = audited(&audit_dir, 200).await;
    assert_eq!(record["completed"], false, "{record}");
    let (_, text) = http_get(running.admin_addr, "/metrics").await;
    assert_eq!(
        sample(&text, "ssp_upstream_bodies_cut_total{reason=\"broken\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "ssp_upstream_bodies_cut_total{reason=\"stalled\"}"),
        Some(0.0)
    );
    still_healthy(&world, &running).await;
    shutdown.cancel();
    running.wait().await;
}

/// A GET metadata through `client`, failing the test if no answer (or error) came within 20 s.
async fn metadata_within_20s(client: &Client, target: &str, http2: bool) -> Result<Answer, String> {
    tokio::time::timeout(
        Duration::from_secs(20),
        client.send(Gpc::new(Method::GET, target.to_owned(), IX_METADATA).build()),
    )
    .await
    .unwrap_or_else(|_| panic!("http2 {http2}: the request was still held after 20 s"))
}

/// A provider that sends its head and part of its body, then stalls: past the body idle
/// timeout the consumer's response ends broken off (over both protocols), the provider's
/// connection is closed rather than kept, and the outcome record says `completed: false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_stalls_mid_body_is_cut_off_at_the_body_idle_timeout() {
    let world = World::ecdsa();
    let Watched { port, hung_up, .. } = raw_provider_watched(&world, Fault::StallMidBody).await;
    let config = gateway_config(
        &world,
        port,
        &GatewayOptions {
            extra_upstream: "body_idle_timeout = \"1s\"",
            ..Default::default()
        },
    );
    assert_eq!(config.upstream.body_idle_timeout, Duration::from_secs(1));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = ssp_gateway::start(&config, shutdown.clone())
        .await
        .expect("start");
    let target = format!("{}/metadata", endpoint(port));
    for (i, http2) in [false, true].into_iter().enumerate() {
        let client = world.client_with(&world.consumer, running.gateway_addr, http2);
        // Bounded far above the 1 s idle timeout: without it the request waits for the
        // provider (here: for ever).
        let result = metadata_within_20s(&client, &target, http2).await;
        match result {
            Ok(a) => panic!(
                "http2 {http2}: a truncated body looked complete: {} bytes, status {}",
                a.body.len(),
                a.status
            ),
            Err(e) => assert!(!e.is_empty()),
        }
        // The provider's connection was closed, not kept for another request.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while hung_up.load(Ordering::SeqCst) < i + 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "http2 {http2}: the gateway kept the stalled provider connection"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Both outcome records say the response broke off, after the 11 bytes that came.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let outcomes = loop {
        let outcomes: Vec<_> = audit_records(&config.audit.dir)
            .into_iter()
            .filter(|r| r["kind"] == "outcome")
            .collect();
        if outcomes.len() >= 2 {
            break outcomes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no outcome records: {outcomes:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(outcomes.len(), 2, "{outcomes:#?}");
    for record in &outcomes {
        assert_eq!(record["status"], 200, "{record}");
        assert_eq!(record["completed"], false, "{record}");
        assert_eq!(record["response_bytes"], 11, "{record}");
    }
    // Counted as cut off (the consumer's status, 200, is the provider's; only this tells).
    let (_, text) = http_get(running.admin_addr, "/metrics").await;
    assert_eq!(
        sample(&text, "ssp_upstream_bodies_cut_total{reason=\"stalled\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "ssp_upstream_bodies_cut_total{reason=\"broken\"}"),
        Some(0.0)
    );
    still_healthy(&world, &running).await;
    shutdown.cancel();
    running.wait().await;
}

/// A provider that always sends a head and then stalls trips its circuit breaker: each body
/// cut off at the body idle timeout is a failure (over both protocols), and once
/// `failure_threshold` of them have come, the next request is refused at once with the
/// circuit-open 502, without reaching the provider, rather than waiting out the timeout again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_stalls_its_bodies_trips_its_circuit() {
    let world = World::ecdsa();
    let provider = raw_provider_watched(&world, Fault::StallMidBody).await;
    let idle = Duration::from_secs(1);
    let config = gateway_config(
        &world,
        provider.port,
        &GatewayOptions {
            extra_upstream: "body_idle_timeout = \"1s\"",
            circuit_breaker: "failure_threshold = 2\ncool_down = \"300s\"",
            ..Default::default()
        },
    );
    assert_eq!(config.upstream.body_idle_timeout, idle);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = ssp_gateway::start(&config, shutdown.clone())
        .await
        .expect("start");
    let target = format!("{}/metadata", endpoint(provider.port));
    let circuits = || async {
        let (_, text) = http_get(running.admin_addr, "/metrics").await;
        (
            sample(&text, "ssp_upstream_circuits{state=\"open\"}"),
            sample(&text, "ssp_upstream_circuit_transitions_total{to=\"open\"}"),
        )
    };
    for http2 in [false, true] {
        assert_eq!(
            circuits().await,
            (Some(0.0), Some(0.0)),
            "http2 {http2}: closed before this stall"
        );
        let client = world.client_with(&world.consumer, running.gateway_addr, http2);
        let result = metadata_within_20s(&client, &target, http2).await;
        if let Ok(a) = result {
            panic!(
                "http2 {http2}: a truncated body looked complete: {} bytes, status {}",
                a.body.len(),
                a.status
            );
        }
    }
    assert_eq!(provider.requests.load(Ordering::SeqCst), 2);
    assert_eq!(
        circuits().await,
        (Some(1.0), Some(1.0)),
        "two stalled bodies open the circuit"
    );

    let started = std::time::Instant::now();
    let a = world
        .client(&world.consumer, running.gateway_addr)
        .gpc(Gpc::new(Method::GET, target.clone(), IX_METADATA))
        .await;
    let took = started.elapsed();
    a.assert_outcome(
        502,
        None,
        &format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
    );
    assert!(
        took < idle,
        "refused at once, not after the body idle timeout: {took:?}"
    );
    assert_eq!(
        provider.requests.load(Ordering::SeqCst),
        2,
        "the refused request never reached the provider"
    );
    let record = audited(&config.audit.dir, 502).await;
    assert_eq!(
        record["token"],
        format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}")
    );
    // The fast-failed 502 keeps the SSP's token, and is counted under a reason of its own.
    let (_, text) = http_get(running.admin_addr, "/metrics").await;
    assert_eq!(
        sample(&text, "ssp_rejections_total{reason=\"circuit_open\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "ssp_rejections_total{reason=\"upstream_error\"}"),
        Some(0.0)
    );
    still_healthy(&world, &running).await;
    shutdown.cancel();
    running.wait().await;
}

/// The body idle timeout is the longest gap between bytes, not the time for the whole body:
/// a body that keeps coming (a byte every 300 ms for 2.4 s) passes whole with 1.5 s allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_that_keeps_coming_is_not_cut_off() {
    let (world, running, shutdown, port, audit_dir) = gateway_before(
        Fault::Drip,
        GatewayOptions {
            extra_upstream: "body_idle_timeout = \"1500ms\"",
            ..Default::default()
        },
    )
    .await;
    let target = format!("{}/metadata", endpoint(port));
    for http2 in [false, true] {
        let a = world
            .client_with(&world.consumer, running.gateway_addr, http2)
            .gpc(Gpc::new(Method::GET, target.clone(), IX_METADATA))
            .await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.text(), "{\"x\":12}", "http2 {http2}");
    }
    let record = audited(&audit_dir, 200).await;
    assert_eq!(record["completed"], true, "{record}");
    assert_eq!(record["response_bytes"], 8, "{record}");
    still_healthy(&world, &running).await;
    shutdown.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabyte_chunked_body_streams_through() {
    let (world, running, shutdown, port, audit_dir) =
        gateway_before(Fault::Trickle100Mb, GatewayOptions::default()).await;
    let target = format!("{}/metadata", endpoint(port));
    let client = world.client(&world.consumer, running.gateway_addr);
    // Count the body as it arrives instead of collecting 100 MB.
    let tcp = tokio::net::TcpStream::connect(running.gateway_addr)
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(client.tls.clone())
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("TLS");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let resp = sender
        .send_request(Gpc::new(Method::GET, target, IX_METADATA).build())
        .await
        .expect("response head");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(d) = frame.data_ref() {
            assert!(d.iter().all(|b| *b == b'z'));
            total += d.len();
        }
    }
    assert_eq!(total, HUNDRED_MB);
    let record = audited(&audit_dir, 200).await;
    assert_eq!(record["response_bytes"], HUNDRED_MB);
    assert_eq!(record["completed"], true);
    still_healthy(&world, &running).await;
    shutdown.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_is_cut_off_at_the_send_timeout() {
    let (world, running, shutdown, port, audit_dir) = gateway_before(
        Fault::Trickle100Mb,
        GatewayOptions {
            extra_listener: "send_timeout = \"1s\"",
            ..Default::default()
        },
    )
    .await;
    let mut s = world
        .client(&world.consumer, running.gateway_addr)
        .handshake()
        .await
        .expect("handshake");
    let head = format!(
        "GET /{}/metadata HTTP/1.1\r\nHost: localhost\r\nSsp-TraceID: {}\r\n\
         Ssp-From: {CONSUMER_ASID}\r\nSsp-To: {PROVIDER_ASID}\r\nSsp-InteractionID: {IX_METADATA}\r\n\
         Authorization: Bearer {}\r\n\r\n",
        endpoint(port),
        uuid::Uuid::new_v4(),
        jwt(scope_for(IX_METADATA))
    );
    s.write_all(head.as_bytes()).await.expect("write");
    // Never read: the socket buffers fill, the gateway's writes stop making progress, and
    // after the send timeout it lets go of the consumer and of the provider behind it. The
    // outcome record says the body broke off.
    let record = audited(&audit_dir, 200).await;
    assert_eq!(record["completed"], false, "{record}");
    let sent = record["response_bytes"].as_u64().expect("response_bytes");
    assert!(sent < HUNDRED_MB as u64, "{record}");
    // The connection is gone: what was buffered drains, then it ends.
    let mut sink = Vec::new();
    let drained = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut sink)).await;
    assert!(drained.is_ok(), "the connection was kept open");
    still_healthy(&world, &running).await;
    shutdown.cancel();
    running.wait().await;
}

/// The last record (outcome or rejection) of the request with this Ssp-TraceID, once it is in
/// the trail in `dir`.
async fn final_record_of(dir: &std::path::Path, trace: &str) -> serde_json::Value {
    audit_record_where(dir, &format!("the end of {trace}"), |r| {
        is_final_record(r) && r["ssp_trace_id"].as_str() == Some(trace)
    })
    .await
}

/// A GET metadata through `client` asking the [`Fault::Scripted`] provider for `answer`: the
/// consumer's answer (within 20 s) and the request's Ssp-TraceID.
async fn scripted_metadata(
    client: &Client,
    target: &str,
    answer: &str,
) -> (Result<Answer, String>, String) {
    let req = Gpc::new(Method::GET, target.to_owned(), IX_METADATA)
        .header("x-answer", answer)
        .build();
    let trace = req.headers()["ssp-traceid"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let answer = tokio::time::timeout(Duration::from_secs(20), client.send(req))
        .await
        .unwrap_or_else(|_| panic!("{answer}: no answer within 20 s"));
    (answer, trace)
}

/// A provider answer whose head hyper accepts but whose framing or status the gateway cannot
/// pass on is a malformed answer, as one hyper cannot parse is: 502
/// `ERROR_COMMUNICATING_TO_ENDPOINT_URL_<url>` over both protocols, audited and counted, and a
/// failure for the circuit breaker (two in a row would open it here; each is followed by a good
/// answer, which starts the count again: see
/// `a_provider_that_gives_no_usable_answer_trips_its_circuit`). Before, `Content-Length: 1`
/// with a chunked body reached the consumer as `content-length: 1` and `{` (audited
/// complete), `gzip, chunked` as raw gzip bytes with nothing saying so, and a `101 Switching
/// Protocols` as a 101 (an HTTP/1.1 consumer then hung; HTTP/2 got a PROTOCOL_ERROR reset).
/// `chunked` alone, in any case, passes, and the next request after each malformed answer
/// gets its own answer (a second answer sent after a chunked body's end is never taken for
/// it: hyper closes a connection with bytes past the end of an answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_answer_with_bad_framing_or_a_1xx_status_is_a_502() {
    let world = World::ecdsa();
    let provider = raw_provider_watched(&world, Fault::Scripted).await;
    let (config, shutdown, running, target) = gateway_in_front(
        &world,
        provider.port,
        "failure_threshold = 2\ncool_down = \"300s\"",
    )
    .await;
    let token = format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}");
    let bad = [
        "length-and-chunked",
        "length-and-chunked-split",
        "gzip-chunked",
        "gzip",
        "chunked-twice",
        "switching-protocols",
    ];
    for http2 in [false, true] {
        let client = world.client_with(&world.consumer, running.gateway_addr, http2);
        for answer in bad {
            let (a, trace) = scripted_metadata(&client, &target, answer).await;
            let a = a.unwrap_or_else(|e| panic!("http2 {http2}, {answer}: {e}"));
            assert_eq!(a.status, StatusCode::BAD_GATEWAY, "http2 {http2}, {answer}");
            a.assert_outcome(502, None, &token);
            let record = final_record_of(&config.audit.dir, &trace).await;
            assert_eq!(record["kind"], "outcome", "{answer}: {record}");
            assert_eq!(record["status"], 502, "{answer}: {record}");
            assert_eq!(record["token"], token.as_str(), "{answer}: {record}");
            // Well formed: passed on whole, the circuit still closed (one failure so far).
            let (a, trace) = scripted_metadata(&client, &target, "chunked").await;
            let a = a.unwrap_or_else(|e| panic!("http2 {http2}, after {answer}: {e}"));
            assert_eq!(a.status, StatusCode::OK, "after {answer}: {}", a.text());
            assert_eq!(a.text(), "{}", "http2 {http2}, after {answer}");
            let record = final_record_of(&config.audit.dir, &trace).await;
            assert_eq!(record["completed"], true, "{record}");
        }
    }
    let (_, text) = http_get(running.admin_addr, "/metrics").await;
    assert_eq!(
        sample(&text, "ssp_rejections_total{reason=\"upstream_error\"}"),
        Some(2.0 * bad.len() as f64)
    );
    assert_eq!(
        sample(&text, "ssp_upstream_circuit_transitions_total{to=\"open\"}"),
        Some(0.0)
    );
    still_healthy(&world, &running).await;
    shutdown.cancel();
    running.wait().await;
}

/// A chunked answer with trailers passes whole and its outcome record says `completed: true`,
/// over HTTP/2 as over HTTP/1.1. Before, over HTTP/2 it said `false`: hyper's HTTP/2 server
/// ends the stream with the trailers and asks the body for nothing more, and the body's end
/// was only seen when it was asked for a frame after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_ended_by_trailers_is_audited_as_completed() {
    let world = World::ecdsa();
    let provider = raw_provider_watched(&world, Fault::Scripted).await;
    let (config, shutdown, running, target) = gateway_in_front(&world, provider.port, "").await;
    // With fields a trailer section may not carry too (`Connection`, `Content-Length`,
    // `Transfer-Encoding`): they are not passed on. Before, HTTP/2 consumers had the stream
    // reset with no body while the audit said completed.
    for (http2, answer) in [
        (true, "trailers"),
        (false, "trailers"),
        (true, "trailers-forbidden"),
        (false, "trailers-forbidden"),
    ] {
        let client = world.client_with(&world.consumer, running.gateway_addr, http2);
        let (a, trace) = scripted_metadata(&client, &target, answer).await;
        let a = a.unwrap_or_else(|e| panic!("http2 {http2}, {answer}: {e}"));
        assert_eq!(a.status, StatusCode::OK, "http2 {http2}: {}", a.text());
        assert_eq!(a.text(), "{}", "http2 {http2}, {answer}");
        let record = final_record_of(&config.audit.dir, &trace).await;
        assert_eq!(record["kind"], "outcome", "http2 {http2}: {record}");
        assert_eq!(record["completed"], true, "http2 {http2}: {record}");
        assert_eq!(record["response_bytes"], 2, "http2 {http2}: {record}");
    }
    shutdown.cancel();
    running.wait().await;
}

/// A gateway started in-process in front of the provider on `port`, with `circuit_breaker`
/// as its `[circuit_breaker]` keys (empty: the defaults); and the provider's metadata URL.
async fn gateway_in_front(
    world: &World,
    port: u16,
    circuit_breaker: &'static str,
) -> (
    ssp_gateway::config::Config,
    tokio_util::sync::CancellationToken,
    ssp_gateway::Running,
    String,
) {
    let config = gateway_config(
        world,
        port,
        &GatewayOptions {
            circuit_breaker,
            ..Default::default()
        },
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = ssp_gateway::start(&config, shutdown.clone())
        .await
        .expect("start");
    (
        config,
        shutdown,
        running,
        format!("{}/metadata", endpoint(port)),
    )
}

/// A GET metadata asking the [`Fault::Scripted`] provider for `answer`: the status (a 502 must
/// be the gateway's `ERROR_COMMUNICATING_TO_ENDPOINT_URL_<url>`) and the Ssp-TraceID.
async fn scripted_status(client: &Client, target: &str, answer: &str) -> (StatusCode, String) {
    let (a, trace) = scripted_metadata(client, target, answer).await;
    let a = a.unwrap_or_else(|e| panic!("{answer}: {e}"));
    if a.status != StatusCode::OK {
        a.assert_outcome(
            502,
            None,
            &format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
        );
    }
    (a.status, trace)
}

/// The circuit series and the two 502 reasons, in the order the tests below compare them.
async fn circuit_metrics(admin: std::net::SocketAddr) -> [f64; 7] {
    let (_, text) = http_get(admin, "/metrics").await;
    let value = |series: &str| sample(&text, series).unwrap_or(f64::NAN);
    [
        value("ssp_upstream_circuits{state=\"open\"}"),
        value("ssp_upstream_circuits{state=\"half_open\"}"),
        value("ssp_upstream_circuit_transitions_total{to=\"open\"}"),
        value("ssp_upstream_circuit_transitions_total{to=\"half_open\"}"),
        value("ssp_upstream_circuit_transitions_total{to=\"closed\"}"),
        value("ssp_rejections_total{reason=\"upstream_error\"}"),
        value("ssp_rejections_total{reason=\"circuit_open\"}"),
    ]
}

/// A provider that takes each request and gives no usable answer — it hangs up or resets the
/// connection before any response head, answers bytes that are not HTTP, or a head the gateway
/// does not pass on — trips its circuit as one that cannot be reached does: each such attempt
/// is a failure (sent once, never retried). Before, it gave the breaker no verdict: 20 requests
/// in a row got 502 with the circuit closed. Once it is open, requests fail fast without
/// reaching the provider, counted under `circuit_open` and audited with the SSP's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_gives_no_usable_answer_trips_its_circuit() {
    let world = World::ecdsa();
    let provider = raw_provider_watched(&world, Fault::Scripted).await;
    let reached = || provider.requests.load(Ordering::SeqCst);
    for (kind, cause) in [
        ("hang-up", "closed_before_answer"),
        ("reset", "reset"),
        ("garbage", "malformed_head"),
        ("switching-protocols", "malformed_answer"),
    ] {
        // A gateway of its own: a circuit of its own.
        let (config, shutdown, running, target) = gateway_in_front(
            &world,
            provider.port,
            "failure_threshold = 2\ncool_down = \"300s\"",
        )
        .await;
        let client = world.client(&world.consumer, running.gateway_addr);
        let mut failed = String::new();
        for _ in 0..2 {
            let before = reached();
            let (status, trace) = scripted_status(&client, &target, kind).await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{kind}");
            assert_eq!(reached(), before + 1, "{kind}: sent once");
            failed = trace;
        }
        // The audit trail tells the two 502s apart, as the metrics do, and says what the
        // provider did.
        let record = final_record_of(&config.audit.dir, &failed).await;
        assert_eq!(record["reason"], "upstream_error", "{kind}: {record}");
        assert_eq!(record["upstream_failure"], cause, "{kind}: {record}");
        let (_, text) = http_get(running.admin_addr, "/metrics").await;
        assert_eq!(
            sample(
                &text,
                &format!("ssp_upstream_failures_total{{cause=\"{cause}\"}}")
            ),
            Some(2.0),
            "{kind}"
        );
        let before = reached();
        let (status, trace) = scripted_status(&client, &target, "chunked").await;
        assert_eq!(
            status,
            StatusCode::BAD_GATEWAY,
            "{kind}: the circuit is open"
        );
        assert_eq!(
            reached(),
            before,
            "{kind}: the open circuit let a request through"
        );
        let record = final_record_of(&config.audit.dir, &trace).await;
        assert_eq!(record["status"], 502, "{record}");
        assert_eq!(
            record["token"],
            format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
            "{record}"
        );
        assert_eq!(record["reason"], "circuit_open", "{kind}: {record}");
        // Nothing was sent: the refusal is its one record (no request record, no fsync).
        assert_eq!(record["kind"], "rejection", "{kind}: {record}");
        assert!(record.get("upstream_failure").is_none(), "{kind}: {record}");
        // Nothing was sent: no provider time (nor a sample of ssp_upstream_duration_seconds).
        assert!(
            record.get("upstream_latency_us").is_none(),
            "{kind}: {record}"
        );
        assert_eq!(
            circuit_metrics(running.admin_addr).await,
            [1.0, 0.0, 1.0, 0.0, 0.0, 2.0, 1.0],
            "{kind}: open after two failures"
        );
        shutdown.cancel();
        running.wait().await;
    }
}

/// A probe that gets no usable answer fails: the circuit opens again for a fresh cool-down, so
/// the requests after it fail fast without reaching the provider. Before, such a probe gave no
/// verdict and reopened the circuit with its cool-down spent: every request reached the
/// provider while `ssp_upstream_circuits{state="open"}` said 1, each counted as a half-open
/// transition. A probe answered well closes the circuit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_gets_no_answer_opens_the_circuit_for_a_fresh_cool_down() {
    // Long beside a request through the gateway (up to 0.35 s each on a loaded test machine).
    const COOL: Duration = Duration::from_secs(3);
    let world = World::ecdsa();
    let provider = raw_provider_watched(&world, Fault::Scripted).await;
    let reached = || provider.requests.load(Ordering::SeqCst);
    let (_config, shutdown, running, target) = gateway_in_front(
        &world,
        provider.port,
        "failure_threshold = 1\ncool_down = \"3s\"",
    )
    .await;
    let client = world.client(&world.consumer, running.gateway_addr);
    let (status, _) = scripted_status(&client, &target, "hang-up").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        circuit_metrics(running.admin_addr).await,
        [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0],
        "open after one failure"
    );

    // After the cool-down, the probe: the provider hangs up on it too.
    tokio::time::sleep(COOL + Duration::from_millis(100)).await;
    let before = reached();
    let (status, _) = scripted_status(&client, &target, "hang-up").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(reached(), before + 1, "the probe went out");
    let reopened = std::time::Instant::now();
    for _ in 0..3 {
        let (status, _) = scripted_status(&client, &target, "chunked").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "open again");
    }
    assert!(
        reopened.elapsed() < COOL,
        "the test was too slow to see the circuit open"
    );
    assert_eq!(
        reached(),
        before + 1,
        "requests after the failed probe reached the provider"
    );
    assert_eq!(
        circuit_metrics(running.admin_addr).await,
        [1.0, 0.0, 2.0, 1.0, 0.0, 2.0, 3.0],
        "open again after the failed probe, for one half-open transition"
    );

    // A probe answered well closes it.
    tokio::time::sleep(COOL + Duration::from_millis(100)).await;
    let (status, _) = scripted_status(&client, &target, "chunked").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        circuit_metrics(running.admin_addr).await,
        [0.0, 0.0, 2.0, 2.0, 1.0, 2.0, 3.0],
        "closed by the probe"
    );
    still_healthy(&world, &running).await;
    shutdown.cancel();
    running.wait().await;
}

/// RFC 9110 §7.6.3: a proxy sends `Via` in each message it forwards. Each provider answer passed
/// on carries the gateway's entry, `1.1 ssp-gateway` (the provider leg is HTTP/1.1), after the
/// entries the provider's side sent, in their order, over HTTP/1.1 and HTTP/2 alike; the
/// gateway's own answers (a 502 for an answer it does not pass on) carry none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_answers_carry_the_gateways_via_after_the_providers() {
    let world = World::ecdsa();
    let provider = raw_provider_watched(&world, Fault::Scripted).await;
    let (_config, shutdown, running, target) = gateway_in_front(&world, provider.port, "").await;
    let via = |a: &Answer| -> Vec<String> {
        a.headers
            .get_all(http::header::VIA)
            .iter()
            .map(|v| v.to_str().expect("ascii").to_owned())
            .collect()
    };
    for http2 in [false, true] {
        let client = world.client_with(&world.consumer, running.gateway_addr, http2);
        let (a, _) = scripted_metadata(&client, &target, "via").await;
        let a = a.unwrap_or_else(|e| panic!("http2 {http2}: {e}"));
        assert_eq!(a.version == http::Version::HTTP_2, http2);
        assert_eq!(a.status, StatusCode::OK, "http2 {http2}: {}", a.text());
        assert_eq!(a.text(), "{}");
        assert_eq!(
            via(&a),
            ["1.1 provider-edge", "1.0 provider-lb", "1.1 ssp-gateway"],
            "http2 {http2}"
        );
        // Without a Via from the provider: the gateway's alone.
        let (a, _) = scripted_metadata(&client, &target, "chunked").await;
        let a = a.unwrap_or_else(|e| panic!("http2 {http2}: {e}"));
        assert_eq!(a.status, StatusCode::OK, "http2 {http2}");
        assert_eq!(via(&a), ["1.1 ssp-gateway"], "http2 {http2}");
        // The gateway's own answer is not a forwarded message.
        let (a, _) = scripted_metadata(&client, &target, "gzip").await;
        let a = a.unwrap_or_else(|e| panic!("http2 {http2}: {e}"));
        assert_eq!(a.status, StatusCode::BAD_GATEWAY, "http2 {http2}");
        assert!(via(&a).is_empty(), "http2 {http2}: {:?}", via(&a));
    }
    shutdown.cancel();
    running.wait().await;
}

/// A provider's own reason phrase reaches an HTTP/1.1 consumer as the provider sent it, as a proxy passes a status line on (RFC 9112 §4); a canonical one
/// stays canonical, and the gateway's own answers carry the canonical phrase. Before, every
/// status line was rewritten with the canonical phrase. HTTP/2 has no reason phrase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_own_reason_phrase_reaches_an_http1_consumer() {
    let world = World::ecdsa();
    let provider = raw_provider_watched(&world, Fault::Scripted).await;
    let (_config, shutdown, running, target) = gateway_in_front(&world, provider.port, "").await;
    let client = world.client_with(&world.consumer, running.gateway_addr, false);
    for (answer, status, reason) in [
        ("own-reason", StatusCode::OK, Some("Slots Found")),
        (
            "own-reason-404",
            StatusCode::NOT_FOUND,
            Some("No Such Slot"),
        ),
        // httparse gives a phrase with obs-text bytes as empty: the canonical one goes instead.
        ("obs-text-reason", StatusCode::NOT_FOUND, None),
        ("via", StatusCode::OK, None),
        ("gzip", StatusCode::BAD_GATEWAY, None),
    ] {
        let (a, _) = scripted_metadata(&client, &target, answer).await;
        let a = a.unwrap_or_else(|e| panic!("{answer}: {e}"));
        assert_eq!(a.status, status, "{answer}: {}", a.text());
        assert_eq!(a.reason.as_deref(), reason, "{answer}");
    }
    let client = world.client_with(&world.consumer, running.gateway_addr, true);
    let (a, _) = scripted_metadata(&client, &target, "own-reason-404").await;
    let a = a.unwrap_or_else(|e| panic!("http2: {e}"));
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.reason, None);
    shutdown.cancel();
    running.wait().await;
}

/// A provider's `Content-Length` repeated with one value reaches the consumer once (RFC 9110
/// §8.6), over both protocols, with its body. Before, an HTTP/1.1 consumer got the field twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_repeated_content_length_reaches_the_consumer_once() {
    let world = World::ecdsa();
    let provider = raw_provider_watched(&world, Fault::Scripted).await;
    let (_config, shutdown, running, target) = gateway_in_front(&world, provider.port, "").await;
    for (http2, answer) in [
        (false, "length-twice"),
        (true, "length-twice"),
        (false, "length-list"),
        (true, "length-list"),
    ] {
        let client = world.client_with(&world.consumer, running.gateway_addr, http2);
        let (a, _) = scripted_metadata(&client, &target, answer).await;
        let a = a.unwrap_or_else(|e| panic!("{answer} http2 {http2}: {e}"));
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{answer} http2 {http2}: {}",
            a.text()
        );
        assert_eq!(a.text(), "{}");
        let lengths: Vec<_> = a.headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, ["2"], "{answer} http2 {http2}");
    }
    shutdown.cancel();
    running.wait().await;
}

/// A provider connection is not used again after an answer that leaves it unsafe: what the
/// provider sends past what hyper took to be the answer's end would be read as the next
/// request's answer, which may be another consumer's (found by a hostile-provider review).
/// - A 204 announcing content is a 502 (RFC 9110 §15.3.5), and the 47 bytes the provider sends
///   late, a whole answer, never reach the next request: it gets its own answer. Before, the
///   204 passed with its `Content-Length` and the late bytes were the next request's answer.
/// - After a 304 announcing content, and a refusal (4xx) or a redirect of a request with a
///   body (the provider may have left the body unread, to be parsed as the next request), no
///   request comes on that connection again, though the answer passes.
/// - A status above 599 is a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_connection_is_not_reused_after_an_answer_that_leaves_it_unsafe() {
    let world = World::ecdsa();
    let provider = raw_provider_watched(&world, Fault::Scripted).await;
    let (_config, shutdown, running, target) = gateway_in_front(&world, provider.port, "").await;
    let client = world.client_with(&world.consumer, running.gateway_addr, false);
    let token = format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}");
    let book = |answer: &str| {
        Gpc::new(
            Method::POST,
            format!("{}/Appointment", target.trim_end_matches("/metadata")),
            IX_BOOK,
        )
        .header("x-answer", answer)
        .body("{\"resourceType\":\"Appointment\"}")
        .build()
    };
    // Good answers after each: the pool has connections to reuse. (A moment first: the
    // connection is given up once the gateway has the answer's head, and the pool may have
    // taken a bodiless answer's connection back just before; see `reuse_unsafe`.)
    let good = || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..3 {
            let (a, _) = scripted_metadata(&client, &target, "chunked").await;
            let a = a.expect("answer");
            assert_eq!(a.status, StatusCode::OK);
            assert_eq!(a.text(), "{}", "another answer was taken for this one's");
        }
    };
    good().await;
    let (a, _) = scripted_metadata(&client, &target, "204-with-length").await;
    let a = a.expect("answer");
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    a.assert_outcome(502, None, &token);
    good().await;
    let (a, _) = scripted_metadata(&client, &target, "304-with-length").await;
    assert_eq!(a.expect("answer").status, StatusCode::NOT_MODIFIED);
    good().await;
    let a = client.send(book("refusal-of-body")).await.expect("answer");
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
    assert_eq!(a.text(), "{}", "not the provider's refusal");
    good().await;
    let a = client.send(book("redirect")).await.expect("answer");
    assert_eq!(a.status, StatusCode::TEMPORARY_REDIRECT, "{}", a.text());
    good().await;
    let (a, _) = scripted_metadata(&client, &target, "status-999").await;
    let a = a.expect("answer");
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    a.assert_outcome(502, None, &token);
    assert_eq!(
        provider.reused_after_unsafe.load(Ordering::SeqCst),
        0,
        "a request came on a connection after an answer that left it unsafe"
    );
    shutdown.cancel();
    running.wait().await;
}

/// A provider cannot set what speaks for the gateway's whole origin, which every provider
/// shares behind it: `Set-Cookie` (its cookie would go with requests to every provider),
/// `Alt-Svc`, `Clear-Site-Data`, `Proxy-Authentication-Info` are not passed on, and
/// `Strict-Transport-Security` is the gateway's own; the rest (`ETag`) passes. Before, all
/// passed, and a provider's `max-age=0` replaced the gateway's HSTS (found by a
/// hostile-provider review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_cannot_set_fields_that_speak_for_the_gateways_origin() {
    let world = World::ecdsa();
    let provider = raw_provider_watched(&world, Fault::Scripted).await;
    let (_config, shutdown, running, target) = gateway_in_front(&world, provider.port, "").await;
    for http2 in [false, true] {
        let client = world.client_with(&world.consumer, running.gateway_addr, http2);
        let (a, _) = scripted_metadata(&client, &target, "origin-fields").await;
        let a = a.unwrap_or_else(|e| panic!("http2 {http2}: {e}"));
        assert_eq!(a.status, StatusCode::OK, "http2 {http2}: {}", a.text());
        for gone in [
            "set-cookie",
            "alt-svc",
            "clear-site-data",
            "proxy-authentication-info",
        ] {
            assert!(
                !a.headers.contains_key(gone),
                "http2 {http2}: {gone} passed"
            );
        }
        let hsts: Vec<_> = a
            .headers
            .get_all(http::header::STRICT_TRANSPORT_SECURITY)
            .iter()
            .collect();
        assert_eq!(hsts.len(), 1, "http2 {http2}: {hsts:?}");
        assert!(
            hsts[0]
                .to_str()
                .expect("ascii")
                .starts_with("max-age=31536000"),
            "http2 {http2}: {hsts:?}"
        );
        assert_eq!(a.headers["etag"], "W/\"7\"", "http2 {http2}");
    }
    shutdown.cancel();
    running.wait().await;
}

/// A provider may send interim (1xx) answers before its final one, and they are not passed
/// on; one that sends them without end gets a 502 `ERROR_COMMUNICATING_TO_ENDPOINT_URL_<url>`
/// once it passes the limit (32), audited and counted as a malformed answer, and its
/// connection is dropped. Before, hyper's client parsed them until the response timeout (a
/// 504), on one core (found by a hostile-provider review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_flooding_interim_answers_is_a_502_and_hung_up_on() {
    let world = World::ecdsa();
    let provider = raw_provider_watched(&world, Fault::Scripted).await;
    let (config, shutdown, running, target) = gateway_in_front(&world, provider.port, "").await;
    let client = world.client_with(&world.consumer, running.gateway_addr, false);
    let (a, _) = scripted_metadata(&client, &target, "interims").await;
    let a = a.expect("answer");
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.text(), "{}");
    let (a, trace) = scripted_metadata(&client, &target, "interim-flood").await;
    let a = a.expect("answer");
    a.assert_outcome(
        502,
        None,
        &format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
    );
    let record = final_record_of(&config.audit.dir, &trace).await;
    assert_eq!(record["status"], 502, "{record}");
    assert_eq!(record["upstream_failure"], "malformed_answer", "{record}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while provider.hung_up.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flooding connection was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, text) = http_get(running.admin_addr, "/metrics").await;
    assert_eq!(
        sample(
            &text,
            "ssp_upstream_failures_total{cause=\"malformed_answer\"}"
        ),
        Some(1.0)
    );
    // The gateway still answers the provider's good answers.
    let (a, _) = scripted_metadata(&client, &target, "chunked").await;
    assert_eq!(a.expect("answer").status, StatusCode::OK);
    shutdown.cancel();
    running.wait().await;
}
