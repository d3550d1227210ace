//! The directory inside a running gateway (LDIF backend): `POST /directory/invalidate` on the
//! admin listener, and the LDIF file reloaded when it changes — a broken file refused with the
//! previous data kept, a good one taking effect without a restart.

mod common;
mod directory_support;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};

/// A plain HTTP/1.1 request to the admin listener.
async fn admin(addr: std::net::SocketAddr, method: Method, path: &str) -> (u16, serde_json::Value) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("Host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&body).expect("admin answers JSON"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_invalidates_one_asid_or_all() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let directory = h.directory();
    let metadata = || {
        Gpc::new(
            Method::GET,
            format!("{}/metadata", h.endpoint()),
            IX_METADATA,
        )
    };
    assert_eq!(h.consumer().gpc(metadata()).await.status, 200);
    assert_eq!(h.consumer().gpc(metadata()).await.status, 200);
    let stats = directory.stats();
    assert_eq!((stats.misses, stats.hits), (2, 2));

    // One ASID: only it is looked up again.
    let (status, body) = admin(
        h.admin,
        Method::POST,
        &format!("/directory/invalidate?asid={CONSUMER_ASID}"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["invalidated"], "asid");
    assert_eq!(body["asid"], CONSUMER_ASID);
    assert_eq!(h.consumer().gpc(metadata()).await.status, 200);
    let stats = directory.stats();
    assert_eq!((stats.misses, stats.hits), (3, 3));

    // All: both are looked up again.
    let (status, body) = admin(h.admin, Method::POST, "/directory/invalidate").await;
    assert_eq!((status, body["invalidated"].as_str()), (200, Some("all")));
    assert_eq!(h.consumer().gpc(metadata()).await.status, 200);
    assert_eq!(directory.stats().misses, 5);

    // Mistakes are refused and change nothing.
    for (method, path, expected) in [
        (Method::GET, "/directory/invalidate", 405),
        (Method::POST, "/directory/invalidate?asid=abc", 400),
        (Method::POST, "/directory/invalidate?asid=1&asid=2", 400),
        (Method::POST, "/directory/invalidate?who=1", 400),
    ] {
        let (status, body) = admin(h.admin, method.clone(), path).await;
        assert_eq!(status, expected, "{method} {path}: {body}");
        assert!(body["error"].is_string());
    }
    assert_eq!(h.consumer().gpc(metadata()).await.status, 200);
    assert_eq!(
        directory.stats().misses,
        5,
        "refused requests invalidated nothing"
    );
    h.stop().await;
}

/// HEAD on `/healthz`, `/readyz` and `/metrics` is answered as GET is, without the body: the
/// status, the headers and the GET body's length, and nothing after the head (checked on the
/// wire, with a GET after it on the same connection to show the framing holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_answers_head_as_get_without_a_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    for (path, content_type) in [
        ("/healthz", "application/json"),
        ("/readyz", "application/json"),
        ("/metrics", "text/plain; version=0.0.4; charset=utf-8"),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(h.admin)
            .await
            .expect("connect");
        let request = format!(
            "HEAD {path} HTTP/1.1\r\nHost: localhost\r\n\r\n\
             GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.expect("write");
        let mut wire = Vec::new();
        tcp.read_to_end(&mut wire).await.expect("read");
        let wire = String::from_utf8_lossy(&wire).to_lowercase();
        let (head, rest) = wire.split_once("\r\n\r\n").expect("a response head");
        assert!(head.starts_with("http/1.1 200 ok"), "HEAD {path}: {head}");
        assert!(
            head.contains(&format!("content-type: {content_type}")),
            "HEAD {path}: {head}"
        );
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("content-length");
        assert!(length > 0, "HEAD {path}: the GET body's length");
        assert!(
            rest.starts_with("http/1.1 200 ok"),
            "HEAD {path}: no body, the next response follows: {rest:?}"
        );
        assert!(rest.ends_with(r#"{"status":"ok"}"#), "{rest:?}");
    }
    h.stop().await;
}

/// Polls until `f` holds, failing after 20 s.
async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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

fn capture_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("ssp_gateway::directory=info")
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().expect("logs")).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ldif_file_reloads_on_change_and_a_broken_file_is_refused() {
    capture_logs();
    let ldif_path = scratch_dir("reload").join("directory.ldif");
    let written = ldif_path.clone();
    let opts = GatewayOptions {
        directory: Some(Box::new(move |ldif: &str| {
            std::fs::write(&written, ldif).expect("write LDIF");
            format!(
                "ldif_file = \"{}\"\nldif_poll_interval = \"100ms\"\n",
                written.display()
            )
        })),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let directory = h.directory();
    let original = std::fs::read_to_string(&ldif_path).expect("read LDIF");
    let readonly = h.world.client(&h.world.readonly, h.gateway);
    let metadata = || {
        Gpc::new(
            Method::GET,
            format!("{}/metadata", h.endpoint()),
            IX_METADATA,
        )
        .from(READONLY_ASID)
    };
    assert_eq!(readonly.gpc(metadata()).await.status, 200);

    // The read-only consumer loses metadata: the change takes effect without a restart.
    let without = edit_entry(
        &original,
        &["uniqueIdentifier: 200000000360", "objectClass: nhsAs"],
        "nhsAsSvcIA: urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1",
    );
    std::fs::write(&ldif_path, &without).expect("write LDIF");
    until(
        "the reloaded directory refuses the read-only consumer",
        || async { readonly.gpc(metadata()).await.status == 403 },
    )
    .await;
    readonly.gpc(metadata()).await.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        &format!("ASID_CHECK_FAILED_MESSAGESENDER_{READONLY_ASID}"),
    );

    // A broken file is refused with a log line naming the file, the line and the reason, and
    // the previous data stays in service.
    let broken = format!("{without}\nthis line is not LDIF\n");
    let bad_line = broken.lines().count();
    std::fs::write(&ldif_path, &broken).expect("write");
    let expected = format!(
        "{}: line {bad_line}: expected 'attribute: value'",
        ldif_path.display()
    );
    until("the refusal is logged", || async {
        logs().contains(&expected)
    })
    .await;
    assert!(
        logs().contains("directory reload refused; the previous directory data stays in service")
    );
    readonly.gpc(metadata()).await.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        &format!("ASID_CHECK_FAILED_MESSAGESENDER_{READONLY_ASID}"),
    );
    assert!(directory
        .party(READONLY_ASID)
        .await
        .expect("lookup")
        .is_some());

    // Fixed again: served again.
    std::fs::write(&ldif_path, &original).expect("write LDIF");
    until(
        "the restored directory serves the read-only consumer",
        || async { readonly.gpc(metadata()).await.status == 200 },
    )
    .await;

    // Both reloads and the refusal are counted, as other components' reloads are.
    let (status, metrics) = http_get(h.admin, "/metrics").await;
    assert_eq!(status, 200);
    let count = |result: &str| {
        sample(
            &metrics,
            &format!("ssp_reloads_total{{component=\"directory\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(count("ok"), Some(2.0), "{metrics}");
    assert_eq!(count("refused"), Some(1.0), "{metrics}");
    h.stop().await;
}

/// The 1-based line of `needle` (a whole line) in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l == needle)
        .unwrap_or_else(|| panic!("no line {needle:?}"))
        + 1
}

/// Real SDS data's quirks in the LDIF file (directory_support::quirky_world): the gateway
/// starts, and each MHS record it cannot use is a warning with its line, at load, in
/// check-config and on reload. An interaction whose handler cannot be used is refused 403
/// PARTYKEY_INTERACTION_CHECK_FAILED (nothing reaches the provider) and logged once per
/// lookup, not per request; the party's other interactions are forwarded; a consumer whose
/// own MHS records are OpenTest-like still sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_handlers_in_the_ldif_refuse_their_interaction_not_the_file() {
    capture_logs();
    let ldif_path = scratch_dir("quirks").join("directory.ldif");
    let written = ldif_path.clone();
    let plain = std::sync::Arc::new(Mutex::new(String::new()));
    let kept = plain.clone();
    let opts = GatewayOptions {
        directory: Some(Box::new(move |ldif: &str| {
            *kept.lock().expect("lock") = ldif.to_string();
            std::fs::write(&written, directory_support::quirky_world(ldif)).expect("write LDIF");
            format!(
                "ldif_file = \"{}\"\nldif_poll_interval = \"100ms\"\n",
                written.display()
            )
        })),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let directory = h.directory();
    let quirky = std::fs::read_to_string(&ldif_path).expect("read LDIF");
    let metadata_line = line_of(
        &quirky,
        &format!(
            "dn: uniqueIdentifier={},ou=services,o=nhs",
            directory_support::METADATA_MHS
        ),
    );
    let endpoint = h.endpoint();
    let expected = format!(
        "directory data: line {metadata_line}: entry uniqueIdentifier={mhs},ou=services,o=nhs: \
         {IX_METADATA}: message handler {mhs}: nhsMHSEndPoint \"{endpoint}/\": not an https:// \
         endpoint the gateway can forward to",
        mhs = directory_support::METADATA_MHS
    );
    assert!(logs().contains(&expected), "{expected}\n{}", logs());

    let refused = format!("PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{PROVIDER_ASID}");
    for _ in 0..3 {
        h.consumer_metadata()
            .await
            .assert_outcome(403, Some("ACCESS_DENIED"), &refused);
    }
    assert_eq!(h.recorder.seen(), 0);
    let location = || {
        Gpc::new(
            Method::GET,
            format!("{endpoint}/Location/1"),
            IX_READ_LOCATION,
        )
    };
    let answer = h.consumer().gpc(location()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(h.recorder.seen(), 1);
    let stats = directory.stats();
    assert_eq!((stats.misses, stats.backend_errors), (2, 0));
    // The provider's three unusable interactions (read:metadata, search:slot, read:patient),
    // counted for ssp_directory_unusable_handlers_total once, at its one lookup.
    assert_eq!(stats.unusable_handlers, 3);
    // One warning for the provider's lookup, naming the party, the interactions, the MHS
    // records and why; none for the consumer (its quirks are outside the catalogue).
    let warned: Vec<String> = logs()
        .lines()
        .filter(|l| l.contains("message handlers of this party cannot be used"))
        .map(str::to_string)
        .collect();
    assert_eq!(warned.len(), 1, "{warned:#?}");
    for part in [
        &format!("asid={PROVIDER_ASID}"),
        "party_key=B82617-0000806",
        &format!(
            "{IX_METADATA}: message handler {}",
            directory_support::METADATA_MHS
        ),
        &format!("{IX_SEARCH_SLOT}: message handlers "),
        directory_support::DUPLICATE_SLOT_MHS,
        "2 nhsMHSEndPoint values",
    ] {
        assert!(warned[0].contains(part), "{part}: {}", warned[0]);
    }

    // check-config passes the file, listing the same warnings with their lines.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ssp-gateway"))
        .arg("check-config")
        .arg("--config")
        .arg(&h.config_path)
        .output()
        .expect("run check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "warning: directory: {}: line {metadata_line}: entry uniqueIdentifier={}",
            ldif_path.display(),
            directory_support::METADATA_MHS
        )),
        "{stdout}"
    );
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.contains("the interaction is refused for this party"))
            .count(),
        3,
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with(": ok"), "{stdout}");

    // Reloaded: the plain world serves metadata; then the location handler's endpoint gains a
    // trailing `/`: the reload is taken, warned of with its line, and location is refused.
    let plain = plain.lock().expect("lock").clone();
    std::fs::write(&ldif_path, &plain).expect("write LDIF");
    until("metadata is served after the reload", || async {
        h.consumer_metadata().await.status == 200
    })
    .await;
    let location_mhs = directory_support::mhs_id(&plain, IX_READ_LOCATION, "B82617");
    let broken = plain.replace(
        &format!("nhsMhsSvcIA: {IX_READ_LOCATION}\nnhsMHsSN: urn:nhs:names:services:gpconnect\nnhsMHsIN: fhir:rest:read:location-1\nnhsMHSEndPoint: {endpoint}\n"),
        &format!("nhsMhsSvcIA: {IX_READ_LOCATION}\nnhsMHsSN: urn:nhs:names:services:gpconnect\nnhsMHsIN: fhir:rest:read:location-1\nnhsMHSEndPoint: {endpoint}/\n"),
    );
    assert_ne!(broken, plain);
    std::fs::write(&ldif_path, &broken).expect("write LDIF");
    let location_line = line_of(
        &broken,
        &format!("dn: uniqueIdentifier={location_mhs},ou=services,o=nhs"),
    );
    until(
        "the location handler is refused after the reload",
        || async { h.consumer().gpc(location()).await.status == 403 },
    )
    .await;
    h.consumer()
        .gpc(location())
        .await
        .assert_outcome(403, Some("ACCESS_DENIED"), &refused);
    assert!(
        logs().contains(&format!(
            "directory data: line {location_line}: entry uniqueIdentifier={location_mhs}"
        )),
        "{}",
        logs()
    );
    assert_eq!(h.consumer_metadata().await.status, 200);
    let (_, metrics) = http_get(h.admin, "/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            "ssp_reloads_total{component=\"directory\",result=\"refused\"}"
        ),
        Some(0.0),
        "{metrics}"
    );
    h.stop().await;
}
