//! The gateway's transport: mTLS refusals at the handshake, RSA and ECDSA on both legs,
//! HTTP/1.1 and HTTP/2, streamed bodies, upstream failures and timeouts, CORS, XML errors,
//! the admin listener and graceful shutdown.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use ssp_gateway::tls::pki::KeyKind;

fn slot_target(h: &Harness) -> String {
    format!(
        "{}/Slot?status=free&start=ge2030-01-07&end=le2030-01-10&_include=Slot%3Aschedule",
        h.endpoint()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_are_refused_at_the_handshake() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let w = &h.world;

    // The good one completes the handshake.
    assert!(w.client(&w.consumer, h.gateway).handshake().await.is_ok());

    for (what, pair) in [
        ("expired", &w.expired),
        ("revoked", &w.revoked),
        ("untrusted CA", &w.untrusted),
    ] {
        let client = w.client(pair, h.gateway);
        assert!(
            client.handshake().await.is_err(),
            "{what} certificate was accepted"
        );
        let req = Gpc::new(Method::GET, slot_target(&h), IX_SEARCH_SLOT).build();
        assert!(
            client.send(req).await.is_err(),
            "{what}: a request got through"
        );
    }

    // No client certificate at all.
    let roots = {
        let mut store = rustls::RootCertStore::empty();
        for cert in ssp_gateway::tls::load_certs(&w.ca).expect("CA") {
            store.add(cert).expect("add CA");
        }
        store
    };
    let no_cert = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let client = Client {
        tls: Arc::new(no_cert),
        addr: h.gateway,
    };
    assert!(
        client.handshake().await.is_err(),
        "a client without a certificate was accepted"
    );

    assert_eq!(h.recorder.seen(), 0);
    h.stop().await;
}

async fn round_trip(server_key: KeyKind, client_key: KeyKind) {
    let h = start_with_mock(
        World::new(server_key, client_key),
        GatewayOptions::default(),
    )
    .await;
    for http2 in [false, true] {
        let c = h.world.client_with(&h.world.consumer, h.gateway, http2);
        let a = c
            .gpc(Gpc::new(
                Method::GET,
                format!("{}/metadata", h.endpoint()),
                IX_METADATA,
            ))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(a.json()["resourceType"], "CapabilityStatement");
        let expected = if http2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(a.version, expected);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_certificates_on_both_legs_over_http1_and_http2() {
    round_trip(KeyKind::Rsa2048, KeyKind::Rsa2048).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecdsa_certificates_on_both_legs_over_http1_and_http2() {
    round_trip(KeyKind::EcdsaP256, KeyKind::EcdsaP256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_stream_each_way() {
    const TEN_MB: usize = 10 * 1024 * 1024;

    // Consumer -> provider: a 10 MB booking body, streamed in chunks.
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    for http2 in [false, true] {
        let c = h.world.client_with(&h.world.consumer, h.gateway, http2);
        let (parts, _) = Gpc::new(
            Method::POST,
            format!("{}/Appointment", h.endpoint()),
            IX_BOOK,
        )
        .build()
        .into_parts();
        let body_req = Request::from_parts(parts, StreamBody::Sized { remaining: TEN_MB });
        let a = c.send(body_req).await.expect("answer");
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(a.json()["body_length"], TEN_MB);
    }
    h.stop().await;

    // Provider -> consumer: a 10 MB response body.
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Big(TEN_MB),
        GatewayOptions::default(),
    )
    .await;
    for http2 in [false, true] {
        let c = h.world.client_with(&h.world.consumer, h.gateway, http2);
        let a = c
            .gpc(Gpc::new(Method::GET, slot_target(&h), IX_SEARCH_SLOT))
            .await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body.len(), TEN_MB);
        assert!(a.body.iter().all(|b| *b == b'x'));
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_down_is_502_and_too_slow_is_504() {
    // Down: the provider's port has nobody listening.
    let world = World::ecdsa();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let config = gateway_config(&world, closed, &GatewayOptions::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = ssp_gateway::start(&config, shutdown.clone())
        .await
        .expect("start");
    let target = format!("{}/metadata", endpoint(closed));
    let a = world
        .client(&world.consumer, running.gateway_addr)
        .gpc(Gpc::new(Method::GET, target.clone(), IX_METADATA))
        .await;
    a.assert_outcome(
        502,
        None,
        &format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
    );
    shutdown.cancel();
    running.wait().await;

    // Too slow: no response head within the response timeout.
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Slow(Duration::from_secs(5)),
        GatewayOptions {
            response_timeout: "500ms",
            ..Default::default()
        },
    )
    .await;
    let target = format!("{}/metadata", h.endpoint());
    let a = h
        .consumer()
        .gpc(Gpc::new(Method::GET, target.clone(), IX_METADATA))
        .await;
    a.assert_outcome(
        504,
        None,
        &format!("TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
    );
    assert_eq!(h.recorder.seen(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_pass_back_unchanged() {
    const BODY: &str = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"forbidden","details":{"coding":[{"system":"https://fhir.nhs.uk/STU3/CodeSystem/Spine-ErrorOrWarningCode-1","code":"ACCESS DENIED","display":"Access denied"}]},"diagnostics":"GP Connect not enabled"}]}"#;
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Status(403, BODY),
        GatewayOptions::default(),
    )
    .await;
    let a = h.consumer_metadata().await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.text(), BODY);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_in_xml_when_asked_for() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let req = Gpc::new(Method::GET, slot_target(&h), IX_SEARCH_SLOT)
        .from("100000000001")
        .build();
    let (mut parts, body) = req.into_parts();
    parts.headers.insert(
        http::header::ACCEPT,
        "application/fhir+xml".parse().expect("value"),
    );
    let a = h
        .consumer()
        .send(Request::from_parts(parts, body))
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.headers["strict-transport-security"], "max-age=31536000");
    assert_eq!(
        a.headers[http::header::CONTENT_TYPE],
        "application/fhir+xml;charset=utf-8"
    );
    let text = a.text();
    assert!(
        text.contains("<OperationOutcome xmlns=\"http://hl7.org/fhir\">"),
        "{text}"
    );
    assert!(
        text.contains("ASID_CHECK_FAILED_MESSAGESENDER_100000000001"),
        "{text}"
    );
    h.stop().await;
}

/// `[policy]` allowing the one web origin the CORS tests' browser pages come from.
const CORS_CONSUMER: &str = "cors_allowed_origins = [\"https://consumer.example\"]";

fn cors_options() -> GatewayOptions {
    GatewayOptions {
        extra_policy: CORS_CONSUMER,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_lists_the_allowed_methods() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, cors_options()).await;
    let c = h.consumer();
    let preflight = |path: &str, interaction: Option<&str>| {
        let mut b = Request::builder()
            .method(Method::OPTIONS)
            .uri(format!("/{}/{path}", h.endpoint()))
            .header("Origin", "https://consumer.example")
            .header("Access-Control-Request-Method", "PUT");
        if let Some(ix) = interaction {
            b = b.header("Ssp-InteractionID", ix);
        }
        let req = b.body(Full::new(Bytes::new())).expect("request");
        let c = c.clone();
        async move { c.send(req).await.expect("answer") }
    };
    let methods = |a: &Answer| {
        a.headers[http::header::ACCESS_CONTROL_REQUEST_METHOD]
            .to_str()
            .expect("ascii")
            .to_owned()
    };
    let a = preflight("Appointment/7", None).await;
    assert_eq!(a.status, StatusCode::OK);
    let listed = methods(&a);
    assert!(listed.contains("GET") && listed.contains("PUT"), "{listed}");
    assert_eq!(
        a.headers[http::header::ACCESS_CONTROL_REQUEST_METHOD],
        a.headers[http::header::ACCESS_CONTROL_ALLOW_METHODS]
    );
    assert_eq!(
        a.headers[http::header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://consumer.example"
    );
    assert_eq!(
        methods(&preflight("Appointment", Some(IX_BOOK)).await),
        "POST"
    );
    // A declared interaction is checked against the path, and the answer lists every method
    // of the path, as the SSP test pack expects for read, amend and cancel alike.
    for ix in [IX_READ_APPOINTMENT, IX_AMEND, IX_CANCEL] {
        let a = preflight("Appointment/7", Some(ix)).await;
        assert_eq!(a.status, StatusCode::OK, "{ix}");
        let listed = methods(&a);
        assert!(
            listed.contains("GET") && listed.contains("PUT"),
            "{ix}: {listed}"
        );
    }
    let a = preflight("Appointment/7", Some(IX_BOOK)).await;
    assert_eq!(
        a.status,
        StatusCode::BAD_REQUEST,
        "book does not fit the path"
    );
    // A mismatch names the request as it was: OPTIONS on the path (only the path is checked).
    let a = preflight("Appointment/1", Some(IX_SEARCH_SLOT)).await;
    let token = format!(
        "INTERACTION_{IX_SEARCH_SLOT}_DOES_NOT_MATCH_REQUEST_OPTIONS_{BASE_PATH}/Appointment/1"
    );
    a.assert_outcome(400, Some("BAD_REQUEST"), &token);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !audit_records(&h.audit_dir)
        .iter()
        .any(|r| r["token"] == token.as_str() && r["method"] == "OPTIONS")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no audit record with {token}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        h.recorder.seen(),
        0,
        "a preflight is answered by the gateway"
    );
    h.stop().await;
}

/// A browser consumer's requests (with `Origin`) get CORS headers on the answer, the
/// provider's or the gateway's own refusal, so the page may read it (ETag and Location
/// included); requests without `Origin` get none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_a_browser_consumer_carry_cors_headers() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, cors_options()).await;
    let c = h.consumer();
    let with_origin = |gpc: Gpc<'_>| {
        let (mut parts, body) = gpc.build().into_parts();
        parts.headers.insert(
            http::header::ORIGIN,
            "https://consumer.example".parse().expect("value"),
        );
        Request::from_parts(parts, body)
    };
    let search = || Gpc::new(Method::GET, slot_target(&h), IX_SEARCH_SLOT);
    let forwarded = c.send(with_origin(search())).await.expect("answer");
    let refused = c
        .send(with_origin(search().from("100000000001")))
        .await
        .expect("answer");
    assert_eq!(forwarded.status, StatusCode::OK);
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    for a in [&forwarded, &refused] {
        assert_eq!(
            a.headers[http::header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://consumer.example"
        );
        let exposed = a.headers[http::header::ACCESS_CONTROL_EXPOSE_HEADERS]
            .to_str()
            .expect("ascii");
        assert!(
            exposed.contains("ETag") && exposed.contains("Location"),
            "{exposed}"
        );
        assert!(a
            .headers
            .get_all(http::header::VARY)
            .iter()
            .any(|v| v == "Origin"));
    }
    let plain = c.gpc(search()).await;
    assert_eq!(plain.status, StatusCode::OK);
    assert!(plain
        .headers
        .get(http::header::ACCESS_CONTROL_ALLOW_ORIGIN)
        .is_none());
    assert!(plain.headers.get(http::header::VARY).is_none());
    h.stop().await;
}

/// Only the configured web origins are granted: a preflight from another is refused (403,
/// audited and counted, no `Access-Control-Allow-*`), and answers to its requests carry no
/// grant; a preflight without `Origin` (the SSP test pack's) still gets 200 and the methods.
/// `["*"]`, applied by a reload of `[policy]`, grants any origin (its own echoed back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_grants_only_the_allowed_origins() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, cors_options()).await;
    let c = h.consumer();
    let preflight = |origin: Option<&str>| {
        let mut b = Request::builder()
            .method(Method::OPTIONS)
            .uri(format!("/{}/Appointment/7", h.endpoint()))
            .header("Access-Control-Request-Method", "PUT")
            .header(
                "Access-Control-Request-Headers",
                "ssp-traceid,ssp-from,ssp-to,ssp-interactionid",
            );
        if let Some(origin) = origin {
            b = b.header("Origin", origin);
        }
        let req = b.body(Full::new(Bytes::new())).expect("request");
        let c = c.clone();
        async move { c.send(req).await.expect("answer") }
    };
    let search = |origin: &str| {
        let (mut parts, body) = Gpc::new(Method::GET, slot_target(&h), IX_SEARCH_SLOT)
            .build()
            .into_parts();
        parts
            .headers
            .insert(http::header::ORIGIN, origin.parse().expect("value"));
        let req = Request::from_parts(parts, body);
        let c = c.clone();
        async move { c.send(req).await.expect("answer") }
    };
    let grants = |a: &Answer| -> Vec<String> {
        a.headers
            .keys()
            .map(|k| k.as_str().to_owned())
            .filter(|k| {
                k.starts_with("access-control-allow") || k.starts_with("access-control-expose")
            })
            .collect()
    };
    let varies_on_origin = |a: &Answer| {
        a.headers
            .get_all(http::header::VARY)
            .iter()
            .any(|v| v == "Origin")
    };

    // The allowed origin (in any case: scheme and host are compared ignoring it).
    for origin in ["https://consumer.example", "HTTPS://Consumer.Example"] {
        let a = preflight(Some(origin)).await;
        assert_eq!(a.status, StatusCode::OK, "{origin}");
        assert_eq!(a.headers[http::header::ACCESS_CONTROL_ALLOW_ORIGIN], origin);
        // Listed by name: the browser may send the client certificate and read the answer.
        assert_eq!(
            a.headers[http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS],
            "true"
        );
        assert_eq!(
            a.headers[http::header::ACCESS_CONTROL_REQUEST_METHOD],
            "GET, PUT"
        );
        let a = search(origin).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.headers[http::header::ACCESS_CONTROL_ALLOW_ORIGIN], origin);
        assert_eq!(
            a.headers[http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS],
            "true"
        );
        assert!(a
            .headers
            .contains_key(http::header::ACCESS_CONTROL_EXPOSE_HEADERS));
    }
    assert_eq!(
        h.recorder.seen(),
        2,
        "the allowed origin's searches were forwarded"
    );

    // Another origin: its preflight is refused and grants nothing.
    let elsewhere = "https://elsewhere.example";
    let token = format!("CORS_ORIGIN_NOT_ALLOWED_{elsewhere}");
    for origin in [
        elsewhere,
        "https://consumer.example.elsewhere.example",
        "http://consumer.example",
        "https://consumer.example:8443",
        "null",
    ] {
        let a = preflight(Some(origin)).await;
        a.assert_outcome(
            403,
            Some("ACCESS_DENIED"),
            &format!("CORS_ORIGIN_NOT_ALLOWED_{origin}"),
        );
        assert_eq!(grants(&a), Vec::<String>::new(), "{origin}");
        assert!(a
            .headers
            .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
            .is_none());
        assert!(varies_on_origin(&a), "{origin}");
    }
    // Its requests (which a browser would not send after the refused preflight) are still
    // checked and answered as any other, with no grant.
    let a = search(elsewhere).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(grants(&a), Vec::<String>::new());
    assert!(varies_on_origin(&a));
    assert_eq!(
        h.recorder.seen(),
        3,
        "a refused preflight reaches no provider"
    );

    // No Origin (the SSP test pack): 200 with the methods, and no grant.
    let a = preflight(None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.headers[http::header::ACCESS_CONTROL_REQUEST_METHOD],
        "GET, PUT"
    );
    assert!(a
        .headers
        .get(http::header::ACCESS_CONTROL_ALLOW_ORIGIN)
        .is_none());

    // Each refusal is audited and counted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let refused = audit_records(&h.audit_dir)
            .into_iter()
            .filter(|r| r["token"] == token.as_str())
            .collect::<Vec<_>>();
        if let Some(r) = refused.first() {
            assert_eq!(r["method"], "OPTIONS");
            assert_eq!(r["status"], 403);
            assert_eq!(r["kind"], "preflight");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no audit record with {token}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, metrics) = http_get(h.admin, "/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            "ssp_rejections_total{reason=\"cors_origin_not_allowed\"}"
        ),
        Some(5.0),
        "{metrics}"
    );

    // `["*"]`, applied without a restart: any origin is echoed, and a preflight without one
    // gets `*` (the behaviour before the allowlist).
    let text = std::fs::read_to_string(&h.config_path).expect("read config");
    std::fs::write(
        &h.config_path,
        text.replace(CORS_CONSUMER, "cors_allowed_origins = [\"*\"]"),
    )
    .expect("write config");
    loop {
        let a = preflight(Some(elsewhere)).await;
        if a.status == StatusCode::OK {
            assert_eq!(
                a.headers[http::header::ACCESS_CONTROL_ALLOW_ORIGIN],
                elsewhere
            );
            // Never credentials for any origin.
            assert!(a
                .headers
                .get(http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS)
                .is_none());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new allowlist never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = search(elsewhere).await;
    assert_eq!(
        a.headers[http::header::ACCESS_CONTROL_ALLOW_ORIGIN],
        elsewhere
    );
    assert!(a
        .headers
        .contains_key(http::header::ACCESS_CONTROL_EXPOSE_HEADERS));
    let a = preflight(None).await;
    assert_eq!(a.headers[http::header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    h.stop().await;
}

/// By default no web origin is granted; the SSP test pack's preflight (no `Origin`) still
/// succeeds and lists the interaction's methods in `Access-Control-Request-Method`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_no_origin_is_granted_and_the_test_pack_preflight_succeeds() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let c = h.consumer();
    for (path, ix, methods) in [
        ("Slot", IX_SEARCH_SLOT, "GET"),
        ("Appointment", IX_BOOK, "POST"),
        ("Appointment/7", IX_CANCEL, "GET, PUT"),
    ] {
        let req = Request::builder()
            .method(Method::OPTIONS)
            .uri(format!("/{}/{path}", h.endpoint()))
            .header("Ssp-InteractionID", ix)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let a = c.send(req).await.expect("answer");
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert_eq!(
            a.headers[http::header::ACCESS_CONTROL_REQUEST_METHOD],
            methods
        );
        assert!(a
            .headers
            .get(http::header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none());
    }
    let req = Request::builder()
        .method(Method::OPTIONS)
        .uri(format!("/{}/Slot", h.endpoint()))
        .header("Origin", "https://consumer.example")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let a = c.send(req).await.expect("answer");
    a.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        "CORS_ORIGIN_NOT_ALLOWED_https://consumer.example",
    );
    assert!(a
        .headers
        .get(http::header::ACCESS_CONTROL_ALLOW_ORIGIN)
        .is_none());
    // A path no interaction has: no method is allowed there, and `Allow` says so (empty,
    // RFC 9110 §10.2.1) rather than listing OPTIONS, which was just refused.
    let req = Request::builder()
        .method(Method::OPTIONS)
        .uri(format!("/{}/Foo", h.endpoint()))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let a = c.send(req).await.expect("answer");
    a.assert_outcome(405, Some("BAD_REQUEST"), "METHOD_NOT_ALLOWED_OPTIONS");
    assert_eq!(a.headers[http::header::ALLOW], "");
    assert_eq!(h.recorder.seen(), 0);
    h.stop().await;
}

/// HEAD is not a GP Connect method: 405 with `Allow`, over HTTP/2 as over HTTP/1.1 (an
/// HTTP/2 HEAD answer with a body used to have its stream reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_refused_with_405_over_both_protocols() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    for http2 in [false, true] {
        let c = h.world.client_with(&h.world.consumer, h.gateway, http2);
        let (mut parts, body) = Gpc::new(Method::GET, slot_target(&h), IX_SEARCH_SLOT)
            .build()
            .into_parts();
        parts.method = Method::HEAD;
        let a = c
            .send(Request::from_parts(parts, body))
            .await
            .unwrap_or_else(|e| panic!("HTTP/2 {http2}: {e}"));
        assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "HTTP/2 {http2}");
        assert_eq!(
            a.version,
            if http2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            }
        );
        assert!(a.headers.contains_key(http::header::ALLOW));
        assert!(a.body.is_empty());
    }
    assert_eq!(h.recorder.seen(), 0);
    h.stop().await;
}

/// With neither `_format` nor `Accept`, the gateway's error is in the request body's format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_follow_the_request_content_type_without_accept() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let req = Gpc::new(
        Method::POST,
        format!("{}/Appointment", h.endpoint()),
        IX_BOOK,
    )
    .from("100000000001")
    .body("<Appointment xmlns=\"http://hl7.org/fhir\"/>")
    .build();
    let (mut parts, body) = req.into_parts();
    parts.headers.remove(http::header::ACCEPT);
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        "application/fhir+xml;charset=utf-8".parse().expect("value"),
    );
    let a = h
        .consumer()
        .send(Request::from_parts(parts, body))
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(
        a.headers[http::header::CONTENT_TYPE],
        "application/fhir+xml;charset=utf-8"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_health_and_readiness() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    for (path, status) in [("/healthz", 200), ("/readyz", 200), ("/nope", 404)] {
        let (code, body) = http_get(h.admin, path).await;
        assert_eq!(code.as_u16(), status, "{path}: {body}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_and_stops_accepting() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Slow(Duration::from_millis(800)),
        GatewayOptions::default(),
    )
    .await;
    let c = h.consumer();
    let target = format!("{}/metadata", h.endpoint());
    let in_flight = tokio::spawn({
        let c = c.clone();
        async move { c.gpc(Gpc::new(Method::GET, target, IX_METADATA)).await }
    });
    // Wait until the request has reached the provider, then shut down.
    h.recorder.arrived.notified().await;
    h.shutdown.cancel();
    // While the request finishes, the admin listener says "not ready" so balancers drain.
    let (code, body) = http_get(h.admin, "/readyz").await;
    assert_eq!(code.as_u16(), 503, "{body}");
    assert!(body.contains("\"draining\":true"), "{body}");
    let answer = in_flight.await.expect("task");
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "the in-flight request was cut off"
    );
    let gateway = h.gateway;
    h.stop().await;
    assert!(
        tokio::net::TcpStream::connect(gateway).await.is_err(),
        "still accepting after shutdown"
    );
}

/// A request the provider has not answered when the grace period runs out is stopped, and its
/// outcome record (not completed, no status) is in the trail before it closes: every forwarded
/// request has one, over either protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_stopped_at_the_end_of_the_grace_period_leave_an_outcome_record() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Hold(gate.clone()),
        GatewayOptions {
            grace_period: "300ms",
            ..Default::default()
        },
    )
    .await;
    let target = format!("{}/metadata", h.endpoint());
    let mut held = Vec::new();
    for http2 in [false, true] {
        let c = h.world.client_with(&h.world.consumer, h.gateway, http2);
        let target = target.clone();
        held.push(tokio::spawn(async move {
            c.send(Gpc::new(Method::GET, target, IX_METADATA).build())
                .await
        }));
        h.recorder.arrived.notified().await;
    }
    let audit_dir = h.audit_dir.clone();
    let stopped = tokio::time::timeout(Duration::from_secs(20), h.stop()).await;
    assert!(
        stopped.is_ok(),
        "the gateway did not stop after its grace period"
    );
    for answer in held {
        // No answer, as the audit record says: the connection is closed under it (HTTP/1.1),
        // or the stream is reset (HTTP/2).
        let answer = answer.await.expect("task");
        assert!(
            answer.is_err(),
            "an answer the trail does not show: {answer:?}"
        );
    }
    let records = audit_records(&audit_dir);
    let requests: Vec<_> = records.iter().filter(|r| r["kind"] == "request").collect();
    assert_eq!(requests.len(), 2, "{records:#?}");
    for request in requests {
        let id = &request["request_id"];
        let outcomes: Vec<_> = records
            .iter()
            .filter(|r| r["kind"] == "outcome" && &r["request_id"] == id)
            .collect();
        assert_eq!(outcomes.len(), 1, "one outcome for {id}: {records:#?}");
        assert_eq!(outcomes[0]["completed"], false, "{:#}", outcomes[0]);
        assert!(outcomes[0].get("status").is_none(), "{:#}", outcomes[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_honoured() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let mut s = h.consumer().handshake().await.expect("handshake");
    let body = br#"{"resourceType":"Parameters"}"#;
    let head = format!(
        "POST /{}/Patient/$gpc.registerpatient HTTP/1.1\r\nHost: localhost\r\n\
         Ssp-TraceID: {}\r\nSsp-From: {CONSUMER_ASID}\r\nSsp-To: {PROVIDER_ASID}\r\n\
         Ssp-InteractionID: {IX_REGISTER_PATIENT}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        h.endpoint(),
        uuid::Uuid::new_v4(),
        jwt("patient/*.write"),
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    // The body is only sent once the gateway says 100 Continue, as .NET clients do.
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("no 100 Continue")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(body).await.expect("write body");
    let mut rest = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&rest).contains("body_length") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("no answer")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&rest));
        rest.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("200 OK"), "{text}");
    assert!(
        text.contains(&format!("\"body_length\":{}", body.len())),
        "{text}"
    );
    h.stop().await;
}
