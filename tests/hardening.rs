//! Hardening: hot reload of TLS material without dropping a request, CRL publication, and the
//! listener's limits against misbehaving peers (slowloris, oversized heads, connection floods).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use ssp_gateway::tls::pki::{KeyKind, LeafSpec, Usage, Validity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The serial number of the certificate the gateway presents on a new connection.
async fn served_serial(client: &Client) -> String {
    let stream = client.handshake().await.expect("handshake");
    let leaf = stream.get_ref().1.peer_certificates().expect("server cert")[0].clone();
    ssp_gateway::tls::peer_identity(&leaf)
        .expect("identity")
        .serial
}

async fn wait_until<F: Fn() -> bool>(what: &str, f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_renewal_under_load_drops_nothing() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let client = h.consumer();
    let before = served_serial(&client).await;

    // A steady stream of requests, each on a new connection, while the certificate changes.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let target = format!("{}/metadata", h.endpoint());
    let load = {
        let (stop, ok, failures, client) =
            (stop.clone(), ok.clone(), failures.clone(), client.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let req = Gpc::new(Method::GET, target.clone(), IX_METADATA).build();
                match client.send(req).await {
                    Ok(a) if a.status == StatusCode::OK => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(a) => failures
                        .lock()
                        .expect("lock")
                        .push(format!("status {}", a.status)),
                    Err(e) => failures.lock().expect("lock").push(e),
                }
            }
        })
    };
    wait_until("requests flowing", || ok.load(Ordering::SeqCst) >= 5).await;

    // Renew: a new key and certificate for the same names, written in place.
    let renewed = h
        .world
        .authority
        .issue(&LeafSpec {
            names: vec!["localhost".into(), "127.0.0.1".into()],
            common_name: "localhost".into(),
            key: KeyKind::EcdsaP256,
            usage: Usage::Server,
            validity: Validity::Current,
        })
        .expect("issue");
    renewed
        .write(&h.world.gateway.cert, &h.world.gateway.key)
        .expect("write renewed certificate");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if served_serial(&client).await == renewed.serial {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at_switch = ok.load(Ordering::SeqCst);
    wait_until("requests after the switch", || {
        ok.load(Ordering::SeqCst) >= at_switch + 5
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    load.await.expect("load task");

    assert_ne!(before, renewed.serial);
    let failures = failures.lock().expect("lock").clone();
    assert!(
        failures.is_empty(),
        "requests failed during the renewal: {failures:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_new_certificate_keeps_the_old_one() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let client = h.consumer();
    let before = served_serial(&client).await;
    std::fs::write(
        &h.world.gateway.cert,
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .expect("write");
    // The watcher notices the change and refuses it (counted in the metrics).
    let refused = "ssp_reloads_total{component=\"listener TLS\",result=\"refused\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = http_get(h.admin, "/metrics").await;
        if sample(&text, refused).unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bad file was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served_serial(&client).await, before);
    let a = client
        .gpc(Gpc::new(
            Method::GET,
            format!("{}/metadata", h.endpoint()),
            IX_METADATA,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_a_crl_refuses_the_revoked_consumer_next_time() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let client = h.consumer();
    assert!(client.handshake().await.is_ok());
    let crl = h
        .world
        .authority
        .crl(&[&h.world.consumer_issued])
        .expect("CRL");
    std::fs::write(&h.world.crl, crl).expect("publish CRL");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while client.handshake().await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revoked consumer is still let in"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Others still get in.
    assert!(h
        .world
        .client(&h.world.readonly, h.gateway)
        .handshake()
        .await
        .is_ok());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_at_the_header_read_timeout() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Echo,
        GatewayOptions {
            extra_listener: "header_read_timeout = \"1s\"",
            ..Default::default()
        },
    )
    .await;
    let mut stream = h.consumer().handshake().await.expect("handshake");
    stream
        .write_all(b"GET /https://localhost/x HTTP/1.1\r\nHost: localhost\r\nSsp-From: 1")
        .await
        .expect("write");
    // Never finish the head: the gateway must close the connection by itself.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the gateway kept a slowloris connection open");

    // An idle keep-alive connection is closed the same way.
    let mut stream = h.consumer().handshake().await.expect("handshake");
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "an idle connection was never closed");
    assert_eq!(h.recorder.seen(), 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_are_refused() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Echo,
        GatewayOptions {
            extra_listener: "max_header_bytes = 16384\nmax_headers = 40",
            ..Default::default()
        },
    )
    .await;
    let target = format!("{}/metadata", h.endpoint());
    for http2 in [false, true] {
        let c = h.world.client_with(&h.world.consumer, h.gateway, http2);
        let big = Gpc::new(Method::GET, target.clone(), IX_METADATA)
            .header("X-Big", "a".repeat(32 * 1024));
        match c.send(big.build()).await {
            Ok(a) => assert_eq!(
                a.status,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "h2={http2}"
            ),
            Err(e) => assert!(!e.is_empty()),
        }
        let mut many = Gpc::new(Method::GET, target.clone(), IX_METADATA);
        let names: Vec<String> = (0..60).map(|i| format!("x-h{i}")).collect();
        for n in &names {
            many = many.header(n.as_str(), "1");
        }
        if !http2 {
            match c.send(many.build()).await {
                Ok(a) => assert_eq!(a.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
                Err(e) => assert!(!e.is_empty()),
            }
        }
    }
    assert_eq!(h.recorder.seen(), 0);
    // A normal request still works.
    let a = h
        .consumer()
        .gpc(Gpc::new(Method::GET, target, IX_METADATA))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_and_others_carry_on() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Echo,
        GatewayOptions {
            extra_listener: "max_connections = 3",
            ..Default::default()
        },
    )
    .await;
    let c = h.consumer();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(c.handshake().await.expect("within the limit"));
    }
    assert!(
        c.handshake().await.is_err(),
        "a fourth connection was served"
    );
    drop(held);
    // Once connections close, new ones are served again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = c
            .send(
                Gpc::new(
                    Method::GET,
                    format!("{}/metadata", h.endpoint()),
                    IX_METADATA,
                )
                .build(),
            )
            .await;
        if matches!(&a, Ok(a) if a.status == StatusCode::OK) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recovered: {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_apply_without_a_restart_and_a_broken_file_is_refused() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let c = h.consumer();
    let without_jwt = || {
        Gpc::new(
            Method::GET,
            format!("{}/metadata", h.endpoint()),
            IX_METADATA,
        )
        .jwt(None)
    };
    c.gpc(without_jwt())
        .await
        .assert_outcome(400, Some("BAD_REQUEST"), "INVALID_JWT_MISSING");

    // The operator switches the JWT policy to "log": applied on the next poll, no restart.
    let text = std::fs::read_to_string(&h.config_path).expect("read config");
    assert!(text.contains("jwt = \"enforce\""));
    std::fs::write(
        &h.config_path,
        text.replace("jwt = \"enforce\"", "jwt = \"log\""),
    )
    .expect("write");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if c.gpc(without_jwt()).await.status == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new policy never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A file that no longer validates is refused and the policy in force stays.
    std::fs::write(
        &h.config_path,
        text.replace("jwt = \"enforce\"", "jwt = \"sometimes\""),
    )
    .expect("write");
    let refused = "ssp_reloads_total{component=\"policy\",result=\"refused\"}";
    loop {
        let (_, metrics) = http_get(h.admin, "/metrics").await;
        if sample(&metrics, refused).unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broken file was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        c.gpc(without_jwt()).await.status,
        StatusCode::OK,
        "the last good policy stays"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_optional_body_cap_refuses_large_bodies_declared_or_streamed() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Echo,
        GatewayOptions {
            extra_upstream: "max_request_body_bytes = 1024",
            ..Default::default()
        },
    )
    .await;
    let book = format!("{}/Appointment", h.endpoint());
    let c = h.consumer();
    // Declared: refused before anything is sent.
    let a = c
        .gpc(Gpc::new(Method::POST, book.clone(), IX_BOOK).body("x".repeat(2048)))
        .await;
    a.assert_outcome(413, Some("BAD_REQUEST"), "REQUEST_BODY_TOO_LARGE");
    assert_eq!(h.recorder.seen(), 0);
    // Streamed without a length: cut off at the cap.
    let (parts, _) = Gpc::new(Method::POST, book.clone(), IX_BOOK)
        .build()
        .into_parts();
    let streamed = http::Request::from_parts(
        parts,
        StreamBody::Sized {
            remaining: 256 * 1024,
        },
    );
    match c.send(streamed).await {
        Ok(a) => {
            a.assert_outcome(413, Some("BAD_REQUEST"), "REQUEST_BODY_TOO_LARGE");
        }
        Err(e) => assert!(!e.is_empty()),
    }
    assert!(h.recorder.body_bytes.load(Ordering::SeqCst) <= 1024 + 64 * 1024);
    // Under the cap: forwarded.
    let a = c
        .gpc(Gpc::new(Method::POST, book, IX_BOOK).body("{}"))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_at_the_handshake_timeout() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Echo,
        GatewayOptions {
            extra_listener: "",
            ..Default::default()
        },
    )
    .await;
    // TCP only, no ClientHello: the gateway closes it when handshake_timeout (5 s) is over.
    let mut tcp = tokio::net::TcpStream::connect(h.gateway)
        .await
        .expect("connect");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the silent connection was kept: {read:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_reset_flood_loses_its_connection_and_nobody_else_notices() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Echo,
        GatewayOptions {
            extra_listener: "http2_max_pending_reset_streams = 5",
            ..Default::default()
        },
    )
    .await;
    let client = h.world.client_with(&h.world.consumer, h.gateway, true);
    let tls = client.handshake().await.expect("handshake");
    let (mut sender, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let target = format!("/{}/metadata", h.endpoint());
    // Open streams and reset them at once, many times over (CVE-2023-44487 style).
    let mut refused = false;
    for _ in 0..2000 {
        let req = http::Request::builder()
            .method("GET")
            .uri(format!("https://localhost{target}"))
            .body(())
            .expect("request");
        let ready = match sender.clone().ready().await {
            Ok(s) => s,
            Err(_) => {
                refused = true;
                break;
            }
        };
        sender = ready;
        match sender.send_request(req, true) {
            Ok((_resp, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => {
                refused = true;
                break;
            }
        }
    }
    let closed = tokio::time::timeout(Duration::from_secs(20), conn).await;
    assert!(
        refused || matches!(closed, Ok(Ok(Err(_)))),
        "the flood was tolerated: {closed:?}"
    );
    // Everyone else is served.
    let other = h.world.client(&h.world.readonly, h.gateway);
    let req = Gpc::new(
        Method::GET,
        format!("{}/metadata", h.endpoint()),
        IX_METADATA,
    )
    .from(READONLY_ASID)
    .build();
    let a = tokio::time::timeout(Duration::from_secs(30), other.send(req))
        .await
        .expect("answered")
        .expect("request");
    assert_eq!(a.status, StatusCode::OK);
    h.stop().await;
}
