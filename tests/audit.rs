//! The audit trail against the real gateway: what a record carries, one record per refused
//! request and two per forwarded one, rotation without split or loss, tamper evidence through
//! `ssp-gateway audit verify`, 503 AUDIT_UNAVAILABLE and recovery when the trail cannot be
//! written (path unwritable; disk full), and — the real binary killed with SIGKILL under
//! concurrent load — every request the provider received has a durable record.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use ssp_gateway::server::RequestBody;
use ssp_gateway::server::{ConnInfo, ServeOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Every whole record in the directory's files, in chain order.
fn records(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = audit_records(dir);
    out.sort_by_key(|v| v["seq"].as_u64());
    out
}

/// `ssp-gateway audit verify FILES...`: exit code and output.
fn verify(files: &[PathBuf]) -> (i32, String) {
    let out = Command::new(GATEWAY_BIN)
        .arg("audit")
        .arg("verify")
        .args(files)
        .output()
        .expect("run audit verify");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn for_request<'a>(
    records: &'a [serde_json::Value],
    request_id: &str,
) -> Vec<&'a serde_json::Value> {
    records
        .iter()
        .filter(|r| r["request_id"] == request_id)
        .collect()
}

/// The records of the request with this Ssp-TraceID.
fn for_trace<'a>(records: &'a [serde_json::Value], trace: &str) -> Vec<&'a serde_json::Value> {
    records
        .iter()
        .filter(|r| r["ssp_trace_id"] == trace)
        .collect()
}

/// The Ssp-TraceID the echoing provider saw.
fn echoed_trace(answer: &Answer) -> String {
    answer.json()["headers"]["ssp-traceid"]
        .as_str()
        .expect("echoed trace id")
        .to_owned()
}

/// Polls `f` until it returns `Some`, or panics at the deadline.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < BINARY_DEADLINE,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn forwarded_requests_have_two_records_refused_ones_one_and_the_chain_verifies() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let ep = h.endpoint();
    let body = r#"{"resourceType":"Parameters"}"#;
    let ok = h
        .consumer()
        .gpc(
            Gpc::new(
                Method::POST,
                format!("{ep}/Patient/$gpc.registerpatient"),
                IX_REGISTER_PATIENT,
            )
            .body(body),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let forwarded_trace = ok.json()["headers"]["ssp-traceid"]
        .as_str()
        .expect("echoed trace id")
        .to_owned();
    // Refused: a read-only consumer booking (403), and a bad JWT (400) whose claims still count.
    let refused = h
        .world
        .client(&h.world.readonly, h.gateway)
        .gpc(
            Gpc::new(Method::POST, format!("{ep}/Appointment"), IX_BOOK)
                .from(READONLY_ASID)
                .body("{}"),
        )
        .await;
    refused.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        &format!("ASID_CHECK_FAILED_MESSAGESENDER_{READONLY_ASID}"),
    );
    let bad_jwt = h
        .consumer()
        .gpc(
            Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA)
                .jwt(Some(jwt("patient/*.read"))),
        )
        .await;
    let v = bad_jwt.assert_outcome(400, Some("BAD_REQUEST"), "INVALID_JWT_SCOPE_NOT_ALLOWED");
    // The scopes the interaction allows, named.
    assert_eq!(
        v["issue"][0]["details"]["text"],
        format!("requested_scope must be organization/*.read for {IX_METADATA}")
    );
    let refused_id = refused.headers["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let bad_jwt_id = bad_jwt.headers["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    assert_eq!(h.recorder.seen(), 1);

    let dir = h.audit_dir.clone();
    let all = eventually("4 audit records", || {
        let r = records(&dir);
        (r.len() >= 4).then_some(r)
    })
    .await;
    assert_eq!(all.len(), 4, "{all:#?}");

    // The forwarded request: `request` then `outcome`, same request id.
    let request = all
        .iter()
        .find(|r| r["kind"] == "request")
        .expect("request record");
    assert_eq!(request["ssp_trace_id"], forwarded_trace.as_str());
    let id = request["request_id"].as_str().expect("request id");
    let pair = for_request(&all, id);
    assert_eq!(pair.len(), 2);
    let outcome = pair[1];
    assert_eq!(outcome["kind"], "outcome");
    assert!(pair[0]["seq"].as_u64() < outcome["seq"].as_u64());
    assert_eq!(request["from"], CONSUMER_ASID);
    assert_eq!(request["to"], PROVIDER_ASID);
    assert_eq!(request["interaction"], IX_REGISTER_PATIENT);
    assert_eq!(request["method"], "POST");
    assert_eq!(
        request["target_url"],
        format!("{ep}/Patient/$gpc.registerpatient").as_str()
    );
    let client = &request["client"];
    assert_eq!(client["names"][0], "consumer.dev.local");
    assert!(client["subject"]
        .as_str()
        .expect("subject")
        .contains("consumer.dev.local"));
    assert_eq!(
        client["fingerprint_sha256"].as_str().map(str::len),
        Some(64)
    );
    assert!(client["serial"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(client["address"]
        .as_str()
        .expect("addr")
        .starts_with("127.0.0.1:"));
    assert_eq!(request["jwt"]["requested_scope"], "patient/*.write");
    assert_eq!(request["jwt"]["organization_ods_code"], "A20047");
    assert!(request["jwt"]["sds_user_id"].is_string());
    assert!(request.get("status").is_none());
    assert_eq!(outcome["status"], 200);
    assert_eq!(outcome["request_bytes"], body.len());
    assert_eq!(outcome["response_bytes"], ok.body.len());
    assert_eq!(outcome["completed"], true);
    assert!(outcome["upstream_latency_us"].as_u64().is_some());
    assert!(outcome["total_latency_us"].as_u64() >= outcome["upstream_latency_us"].as_u64());

    // Refused requests: one `rejection` record each, with the token.
    let r = for_request(&all, &refused_id);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["kind"], "rejection");
    assert_eq!(r[0]["status"], 403);
    assert_eq!(
        r[0]["token"],
        format!("ASID_CHECK_FAILED_MESSAGESENDER_{READONLY_ASID}").as_str()
    );
    assert_eq!(r[0]["client"]["names"][0], "readonly.dev.local");
    let j = for_request(&all, &bad_jwt_id);
    assert_eq!(j.len(), 1);
    assert_eq!(j[0]["jwt_problem"], "SCOPE_NOT_ALLOWED");
    assert_eq!(
        j[0]["jwt"]["requested_scope"], "patient/*.read",
        "claims of a refused token"
    );

    // Files are 0600, the directory 0700, and the chain verifies.
    for f in audit_files(&dir) {
        let mode = std::fs::metadata(&f).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    let dir_mode = std::fs::metadata(&dir).expect("meta").permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    let (code, out) = verify(&audit_files(&dir));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 4 records, seq 1..=4"), "{out}");
    h.stop().await;
}

#[tokio::test]
async fn rotation_never_splits_or_loses_a_record_and_tampering_is_named() {
    let opts = GatewayOptions {
        extra_sections: "[audit]\nmax_file_bytes = 4096\n".into(),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let ep = h.endpoint();
    let n = 12;
    for _ in 0..n {
        let a = h
            .consumer()
            .gpc(Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA))
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    let dir = h.audit_dir.clone();
    h.stop().await;

    let files = audit_files(&dir);
    assert!(files.len() >= 3, "expected rotation: {files:?}");
    let mut seqs = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read");
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends mid-record",
            f.display()
        );
        assert!(
            text.len() <= 4096,
            "{} is {} bytes",
            f.display(),
            text.len()
        );
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("whole JSON record");
            seqs.push(v["seq"].as_u64().expect("seq"));
        }
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=2 * n as u64).collect::<Vec<_>>(),
        "every record, once"
    );

    // Verify takes the files in any order.
    let mut shuffled = files.clone();
    shuffled.reverse();
    let (code, out) = verify(&shuffled);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("ok: {} records", 2 * n)), "{out}");
    assert!(out.contains(&format!("{} file(s)", files.len())), "{out}");

    // Alter one record in a rotated file: verify names the next record and fails.
    let victim = &files[0];
    let text = std::fs::read_to_string(victim).expect("read");
    let first = text.lines().next().expect("a line");
    let altered = first.replacen("\"method\":\"GET\"", "\"method\":\"PUT\"", 1);
    assert_ne!(first, altered);
    std::fs::write(victim, text.replacen(first, &altered, 1)).expect("write");
    let (code, out) = verify(&files);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("BROKEN:") && out.contains("line 2 (seq 2)"),
        "{out}"
    );

    // Remove a whole rotated file from the middle: the gap is named.
    std::fs::write(victim, text).expect("restore");
    let without_middle: Vec<PathBuf> = files
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, f)| f.clone())
        .collect();
    let (code, out) = verify(&without_middle);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is missing"), "{out}");
}

#[tokio::test]
async fn an_unwritable_trail_refuses_traffic_with_503_and_recovers_by_itself() {
    let opts = GatewayOptions {
        extra_sections: "[audit]\nretry_interval = \"100ms\"\n".into(),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let ep = h.endpoint();
    let metadata = || Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA);
    assert_eq!(h.consumer().gpc(metadata()).await.status, StatusCode::OK);
    assert_eq!(http_get(h.admin, "/readyz").await.0, StatusCode::OK);

    // The audit path stops being writable: its directory is replaced by a plain file (root
    // ignores permission bits, so this is how the test takes the path away).
    let dir = h.audit_dir.clone();
    let moved = dir.with_extension("moved");
    std::fs::rename(&dir, &moved).expect("move the audit dir away");
    std::fs::write(&dir, b"not a directory").expect("file in its place");

    let refused = h.consumer().gpc(metadata()).await;
    refused.assert_outcome(503, Some("INTERNAL_SERVER_ERROR"), "AUDIT_UNAVAILABLE");
    assert_eq!(h.recorder.seen(), 1, "nothing forwarded unaudited");
    let (status, body) = http_get(h.admin, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("\"audit_writable\":false"), "{body}");
    let (_, metrics) = http_get(h.admin, "/metrics").await;
    assert_eq!(
        sample(&metrics, "ssp_audit_writable"),
        Some(0.0),
        "{metrics}"
    );
    assert!(sample(&metrics, "ssp_audit_write_errors_total").unwrap_or(0.0) >= 1.0);
    assert_eq!(
        sample(
            &metrics,
            "ssp_rejections_total{reason=\"audit_unavailable\"}"
        ),
        Some(1.0)
    );

    // Writable again: the gateway notices by itself (no request needed) and serves.
    std::fs::remove_file(&dir).expect("remove the file");
    std::fs::rename(&moved, &dir).expect("put the audit dir back");
    let start = Instant::now();
    loop {
        if http_get(h.admin, "/readyz").await.0 == StatusCode::OK {
            break;
        }
        assert!(
            start.elapsed() < BINARY_DEADLINE,
            "never became ready again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.consumer().gpc(metadata()).await.status, StatusCode::OK);
    assert_eq!(h.recorder.seen(), 2);
    h.stop().await;

    // The refusal's own record was kept and written on recovery; the chain is whole.
    let all = records(&dir);
    let refused_id = refused.headers["x-request-id"].to_str().expect("id");
    let r = for_request(&all, refused_id);
    assert_eq!(r.len(), 1, "{all:#?}");
    assert_eq!(
        r[0]["kind"], "rejection",
        "never written, the request record cannot be followed by an outcome"
    );
    assert_eq!(r[0]["token"], "AUDIT_UNAVAILABLE");
    assert_eq!(all.len(), 5, "2 forwarded x 2 + the refusal: {all:#?}");
    let (code, out) = verify(&audit_files(&dir));
    assert_eq!(code, 0, "{out}");
}

/// `buffered`: requests are forwarded once their record is queued (no wait for the writer);
/// every record still reaches the trail, and once the writer finds the trail unwritable,
/// requests are refused and nothing is forwarded unaudited; the queued records are written on
/// recovery.
#[tokio::test]
async fn buffered_forwards_without_waiting_but_never_loses_or_skips_a_record() {
    let opts = GatewayOptions {
        extra_sections: "[audit]\ndurability = \"buffered\"\nfsync_interval = \"50ms\"\nretry_interval = \"100ms\"\n".into(),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let ep = h.endpoint();
    let metadata = || Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA);
    let mut forwarded = Vec::new();
    for _ in 0..5 {
        let a = h.consumer().gpc(metadata()).await;
        assert_eq!(a.status, StatusCode::OK);
        forwarded.push(echoed_trace(&a));
    }
    let dir = h.audit_dir.clone();
    eventually("the five requests' records written", || {
        let all = records(&dir);
        forwarded
            .iter()
            .all(|t| for_trace(&all, t).len() == 2)
            .then_some(())
    })
    .await;

    // The trail is taken away: the writer notices on its next write, and from then on requests
    // are refused without reaching the provider.
    let moved = dir.with_extension("moved");
    std::fs::rename(&dir, &moved).expect("move the audit dir away");
    std::fs::write(&dir, b"not a directory").expect("file in its place");
    let mut kept = Vec::new();
    let start = Instant::now();
    let refused = loop {
        let a = h.consumer().gpc(metadata()).await;
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            break a;
        }
        assert_eq!(a.status, StatusCode::OK);
        kept.push(echoed_trace(&a));
        assert!(
            start.elapsed() < BINARY_DEADLINE,
            "the writer never noticed"
        );
    };
    refused.assert_outcome(503, Some("INTERNAL_SERVER_ERROR"), "AUDIT_UNAVAILABLE");
    let seen = h.recorder.seen();
    assert_eq!(
        seen,
        5 + kept.len(),
        "the refused request was not forwarded"
    );
    assert_eq!(
        h.consumer().gpc(metadata()).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(h.recorder.seen(), seen);

    std::fs::remove_file(&dir).expect("remove the file");
    std::fs::rename(&moved, &dir).expect("put the audit dir back");
    let start = Instant::now();
    while http_get(h.admin, "/readyz").await.0 != StatusCode::OK {
        assert!(
            start.elapsed() < BINARY_DEADLINE,
            "never became ready again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop().await;

    // Everything forwarded has its request and outcome records, the refusals theirs; the
    // chain is whole.
    let all = records(&dir);
    for trace in forwarded.iter().chain(&kept) {
        let r = for_trace(&all, trace);
        assert_eq!(r.len(), 2, "{trace}: {r:#?}");
        assert_eq!(r[0]["kind"], "request");
    }
    let refused_id = refused.headers["x-request-id"].to_str().expect("id");
    assert_eq!(for_request(&all, refused_id).len(), 1);
    let (code, out) = verify(&audit_files(&dir));
    assert_eq!(code, 0, "{out}");
}

// ---------------------------------------------------------------------------------------------
// The real binary, killed.

/// A provider that records the Ssp-TraceID of every request that reaches it.
struct Provider {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
}

async fn recording_provider(world: &World) -> Provider {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let tls = ssp_gateway::tls::listener_tls(&world.server_tls(&world.provider), &[b"http/1.1"])
        .expect("provider TLS");
    let tls = ssp_gateway::reload::Reloadable::new("test provider TLS", Arc::new(tls), vec![]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let opts = ServeOptions {
        name: "recording-provider",
        handshake_timeout: Duration::from_secs(5),
        header_read_timeout: Duration::from_secs(5),
        http2: false,
        grace_period: Duration::from_secs(1),
        limits: Default::default(),
    };
    let log = seen.clone();
    tokio::spawn(ssp_gateway::server::serve_tls(
        listener,
        tls,
        opts,
        stop.clone(),
        move |_conn: Arc<ConnInfo>, req: Request<RequestBody>| {
            let log = log.clone();
            async move {
                if let Some(t) = req
                    .headers()
                    .get("ssp-traceid")
                    .and_then(|v| v.to_str().ok())
                {
                    log.lock().expect("lock").push(t.to_owned());
                }
                let _ = req.into_body().collect().await;
                Response::new(Full::new(Bytes::from_static(
                    b"{\"resourceType\":\"Bundle\"}",
                )))
            }
        },
    ));
    Provider { port, seen, stop }
}

/// Sends requests from `workers` concurrent clients until `stop`; returns how many got 200.
fn load(
    world: &World,
    gateway: SocketAddr,
    provider_port: u16,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    let ep = endpoint(provider_port);
    (0..workers)
        .map(|_| {
            let client = world.client(&world.consumer, gateway);
            let ep = ep.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut ok = 0;
                while !stop.load(Ordering::Relaxed) {
                    let req = Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA).build();
                    match client.send(req).await {
                        Ok(a) if a.status == StatusCode::OK => ok += 1,
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                ok
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_record_of_a_forwarded_request() {
    let world = World::ecdsa();
    let provider = recording_provider(&world).await;
    let (config, gw, admin, audit_dir) = spawned_config(&world, provider.port, "");
    let mut g = spawn_gateway(&config, gw, admin, &audit_dir, &[]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&world, g.gateway, provider.port, 32, stop.clone());
    let start = Instant::now();
    while provider.seen.lock().expect("lock").len() < 150 {
        assert!(
            start.elapsed() < BINARY_DEADLINE,
            "load never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Group commit: under concurrent load, records share fsyncs.
    let (_, metrics) = http_get(g.admin, "/metrics").await;
    let fsyncs = sample(&metrics, "ssp_audit_fsync_duration_seconds_count").expect("fsyncs");
    let written = sample(&metrics, "ssp_audit_records_total").expect("records");
    assert!(
        fsyncs < written,
        "{fsyncs} fsyncs for {written} records: no group commit"
    );
    // Mid-load: SIGKILL.
    g.child.kill().expect("SIGKILL");
    g.child.wait().expect("reaped");
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for w in workers {
        answered += w.await.expect("worker");
    }
    let received = provider.seen.lock().expect("lock").clone();
    assert!(received.len() >= 150);

    // Every request the provider saw has a `request` record on disk.
    let all = records(&g.audit_dir);
    let recorded: std::collections::HashSet<&str> = all
        .iter()
        .filter(|r| r["kind"] == "request")
        .filter_map(|r| r["ssp_trace_id"].as_str())
        .collect();
    let missing: Vec<&String> = received
        .iter()
        .filter(|t| !recorded.contains(t.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} received requests have no record: {missing:?}",
        missing.len(),
        received.len()
    );
    assert!(answered <= received.len());
    let (code, out) = verify(&audit_files(&g.audit_dir));
    assert_eq!(code, 0, "{out}");

    // Restarted on the same trail, the chain carries on where the killed process stopped.
    let last_seq = all
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .max()
        .expect("records");
    let g2 = spawn_gateway(&config, gw, admin, &audit_dir, &[]).await;
    let a = world
        .client(&world.consumer, g2.gateway)
        .gpc(Gpc::new(
            Method::GET,
            format!("{}/metadata", endpoint(provider.port)),
            IX_METADATA,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let after = eventually("the new records", || {
        let r = records(&audit_dir);
        (r.iter().filter_map(|v| v["seq"].as_u64()).max() >= Some(last_seq + 2)).then_some(r)
    })
    .await;
    assert!(after.iter().any(|r| r["seq"] == last_seq + 1));
    drop(g2);
    let (code, out) = verify(&audit_files(&audit_dir));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("from the start of the trail"), "{out}");
    provider.stop.cancel();
}

/// The gateway binary on a disk that is full at `limit` bytes: the file size limit
/// (RLIMIT_FSIZE) makes writes past it fail with EFBIG after a short write, what a full disk does
/// with ENOSPC. SIGXFSZ is ignored so the write fails instead of killing the process; `prlimit
/// --pid` moves the limit while it runs. The audit trail retries every 100 ms.
async fn spawn_with_file_limit(world: &World, provider_port: u16, limit: u64) -> Spawned {
    let (config, gw, admin, audit_dir) = spawned_config(
        world,
        provider_port,
        "[audit]\nretry_interval = \"100ms\"\nmax_file_bytes = 1048576\n",
    );
    spawn_gateway(
        &config,
        gw,
        admin,
        &audit_dir,
        &[
            "sh",
            "-c",
            &format!("trap '' XFSZ; exec prlimit --fsize={limit}:unlimited \"$0\" \"$@\""),
        ],
    )
    .await
}

/// Stopped while its trail cannot be written, the gateway does not give up the records it
/// owes at once: the trail gets a few seconds to come back (here, room is made a second after
/// SIGTERM), and then every refusal made while the disk was full is on record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_while_the_disk_is_full_it_waits_for_room_before_giving_up_records() {
    let world = World::ecdsa();
    let provider = recording_provider(&world).await;
    let mut g = spawn_with_file_limit(&world, provider.port, 24 * 1024).await;
    let ep = endpoint(provider.port);
    let client = world.client(&world.consumer, g.gateway);
    let metadata = || Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA);
    let mut refusals = Vec::new();
    for _ in 0..300 {
        let a = client.gpc(metadata()).await;
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            refusals.push(a.headers["x-request-id"].to_str().expect("id").to_owned());
            if refusals.len() == 5 {
                break;
            }
        }
    }
    assert_eq!(refusals.len(), 5, "the trail never filled up");
    let pid = g.child.id().to_string();
    let term = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(term.success());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lifted = Command::new("prlimit")
        .args(["--pid", &pid, "--fsize=unlimited:unlimited"])
        .status()
        .expect("run prlimit");
    assert!(lifted.success(), "the gateway had already exited");
    let start = Instant::now();
    while g.child.try_wait().expect("wait").is_none() {
        assert!(
            start.elapsed() < BINARY_DEADLINE,
            "the gateway did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    each_on_record_and_the_chain_intact(&g.audit_dir, &refusals);
    provider.stop.cancel();
}

/// Each of the requests `ids` has exactly one record in the trail in `dir`, and the chain
/// verifies.
fn each_on_record_and_the_chain_intact(dir: &Path, ids: &[String]) {
    let all = records(dir);
    for id in ids {
        assert_eq!(
            for_request(&all, id).len(),
            1,
            "request {id} is not on record"
        );
    }
    let (code, out) = verify(&audit_files(dir));
    assert_eq!(code, 0, "{out}");
}

/// A nearly full disk takes what fits: once some room is freed, the records owed since the
/// disk filled (the refusals audited meanwhile, held in memory) go in as far as the room
/// allows, in units small enough to fit. Before, the whole backlog was one unit, refused whole
/// and rolled back at every retry however much room there was. Records stay whole, the chain
/// verifies, and once there is room for everything every refusal is on record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_full_disk_some_room_takes_what_fits_of_the_backlog() {
    let world = World::ecdsa();
    let provider = recording_provider(&world).await;
    let g = spawn_with_file_limit(&world, provider.port, 24 * 1024).await;
    let audit_dir = g.audit_dir.clone();
    let ep = endpoint(provider.port);
    let client = world.client(&world.consumer, g.gateway);
    let metadata = || Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA);
    let mut full = false;
    for _ in 0..200 {
        if client.gpc(metadata()).await.status == StatusCode::SERVICE_UNAVAILABLE {
            full = true;
            break;
        }
    }
    assert!(full, "the trail never filled up");
    // A backlog larger than the room about to be freed: each refusal is a record owed.
    let room: u64 = 160 * 1024;
    let mut refusals = Vec::new();
    loop {
        let a = client.gpc(metadata()).await;
        a.assert_outcome(503, Some("INTERNAL_SERVER_ERROR"), "AUDIT_UNAVAILABLE");
        refusals.push(a.headers["x-request-id"].to_str().expect("id").to_owned());
        let (_, text) = http_get(g.admin, "/metrics").await;
        if sample(&text, "ssp_audit_queue_bytes").unwrap_or(0.0) > 1.5 * room as f64 {
            break;
        }
        assert!(refusals.len() < 2000, "the backlog never grew");
    }
    let active = audit_dir.join("audit.jsonl");
    let when_full = std::fs::metadata(&active).expect("stat").len();

    // Some room, less than the backlog.
    let pid = g.child.id().to_string();
    let some_room = format!("--fsize={}:unlimited", when_full + room);
    let raised = Command::new("prlimit")
        .args(["--pid", &pid, &some_room])
        .status()
        .expect("run prlimit");
    assert!(raised.success());
    let taken = eventually("the backlog written as far as the room goes", || {
        let len = std::fs::metadata(&active).expect("stat").len();
        (len >= when_full + room / 2).then_some(len)
    })
    .await;
    assert!(taken <= when_full + room);
    let text = std::fs::read(&active).expect("read");
    assert!(text.ends_with(b"\n"), "a torn record was left behind");

    // Room for everything: every refusal is on record, and the chain verifies.
    let lifted = Command::new("prlimit")
        .args(["--pid", &pid, "--fsize=unlimited:unlimited"])
        .status()
        .expect("run prlimit");
    assert!(lifted.success());
    let start = Instant::now();
    while http_get(g.admin, "/readyz").await.0 != StatusCode::OK {
        assert!(start.elapsed() < BINARY_DEADLINE, "never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(client.gpc(metadata()).await.status, StatusCode::OK);
    drop(g);
    each_on_record_and_the_chain_intact(&audit_dir, &refusals);
    provider.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_traffic_and_recovers_without_a_torn_record() {
    let world = World::ecdsa();
    let provider = recording_provider(&world).await;
    let g = spawn_with_file_limit(&world, provider.port, 24 * 1024).await;
    let audit_dir = g.audit_dir.clone();
    let ep = endpoint(provider.port);
    let client = world.client(&world.consumer, g.gateway);
    let mut refused = None;
    for _ in 0..200 {
        let a = client
            .gpc(Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA))
            .await;
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(a);
            break;
        }
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    }
    let refused = refused.expect("the trail filled up");
    refused.assert_outcome(503, Some("INTERNAL_SERVER_ERROR"), "AUDIT_UNAVAILABLE");
    let seen_when_full = provider.seen.lock().expect("lock").len();
    assert_eq!(
        http_get(g.admin, "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // What is on disk is whole records only: the short write was rolled back.
    let active = audit_dir.join("audit.jsonl");
    let text = std::fs::read(&active).expect("read");
    assert!(text.ends_with(b"\n"), "a torn record was left behind");
    assert_eq!(
        client
            .gpc(Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA))
            .await
            .status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(provider.seen.lock().expect("lock").len(), seen_when_full);

    // Space again.
    let pid = g.child.id().to_string();
    let lifted = Command::new("prlimit")
        .args(["--pid", &pid, "--fsize=unlimited:unlimited"])
        .status()
        .expect("run prlimit");
    assert!(lifted.success());
    let start = Instant::now();
    while http_get(g.admin, "/readyz").await.0 != StatusCode::OK {
        assert!(start.elapsed() < BINARY_DEADLINE, "never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = client
        .gpc(Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    drop(g);
    let all = records(&audit_dir);
    let id = refused.headers["x-request-id"].to_str().expect("id");
    assert_eq!(for_request(&all, id).len(), 1, "the refusal is on record");
    let (code, out) = verify(&audit_files(&audit_dir));
    assert_eq!(code, 0, "{out}");
    provider.stop.cancel();
}

/// Bytes after the last whole record are copied out of the trail at start before they are cut
/// from it; when the copy cannot be finished (the disk full), the gateway does not start, the
/// bytes stay in the trail and no half copy is left beside them, and the next start, with room,
/// moves them out whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_that_cannot_be_moved_out_stays_in_the_trail_with_no_half_copy() {
    let world = World::ecdsa();
    let provider = recording_provider(&world).await;
    let (config, gw, admin, audit_dir) = spawned_config(&world, provider.port, FSYNC);
    std::fs::create_dir_all(&audit_dir).expect("audit dir");
    std::fs::set_permissions(&audit_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    // A record cut short, 40 KiB long: more than the 24 KiB the first start may write.
    let mut torn = b"{\"seq\":1,\"prev\":\"".to_vec();
    torn.resize(40 * 1024, b'a');
    let active = audit_dir.join("audit.jsonl");
    std::fs::write(&active, &torn).expect("write");
    let partials = || -> Vec<PathBuf> {
        std::fs::read_dir(&audit_dir)
            .expect("list")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "partial"))
            .collect()
    };

    let out = Command::new("timeout")
        .args(["60", "sh", "-c"])
        .arg("trap '' XFSZ; exec prlimit --fsize=24576:unlimited \"$0\" \"$@\"")
        .arg(GATEWAY_BIN)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run the gateway");
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "started with the disk full: {log}");
    assert_ne!(
        out.status.code(),
        Some(124),
        "hung instead of failing: {log}"
    );
    assert!(log.contains("audit"), "{log}");
    assert_eq!(
        partials(),
        Vec::<PathBuf>::new(),
        "a half copy was left: {log}"
    );
    assert_eq!(
        std::fs::read(&active).expect("read"),
        torn,
        "the bytes stay in the trail"
    );

    let mut g = spawn_gateway(&config, gw, admin, &audit_dir, &[]).await;
    let kept = partials();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::read(&kept[0]).expect("read"),
        torn,
        "moved out whole"
    );
    stop_gateway(&mut g).await;
    let (code, out) = verify(&audit_files(&audit_dir));
    assert_eq!(code, 0, "{out}");
    provider.stop.cancel();
}

// The audit directory taken away from a running gateway, and stops with records lost.

/// `[audit]` for each durability, retrying every 100 ms.
const FSYNC: &str = "[audit]\nretry_interval = \"100ms\"\n";
const BUFFERED: &str =
    "[audit]\ndurability = \"buffered\"\nfsync_interval = \"50ms\"\nretry_interval = \"100ms\"\n";

/// The Ssp-TraceID of the last request the recording provider received.
/// A gateway binary with `audit` in front of `provider`, once one metadata request went
/// through it and both its records (request, outcome) are written; and its audit directory.
async fn spawned_after_one_request(
    world: &World,
    provider: &Provider,
    audit: &str,
) -> (Spawned, PathBuf) {
    let (config, gw, admin, dir) = spawned_config(world, provider.port, audit);
    let g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    let metadata = Gpc::new(
        Method::GET,
        format!("{}/metadata", endpoint(provider.port)),
        IX_METADATA,
    );
    let a = world.client(&world.consumer, g.gateway).gpc(metadata).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    eventually("both records written", || {
        (records(&dir).len() == 2).then_some(())
    })
    .await;
    (g, dir)
}

fn last_seen(provider: &Provider) -> String {
    provider
        .seen
        .lock()
        .expect("lock")
        .last()
        .expect("a request reached the provider")
        .clone()
}

/// The config of a second gateway (ports of its own) on the audit directory `dir`.
fn second_config(world: &World, provider_port: u16, audit: &str, dir: &Path) -> Spawned2 {
    let audit = format!("{audit}dir = \"{}\"\n", dir.display());
    let (config, gateway, admin, audit_dir) = spawned_config(world, provider_port, &audit);
    assert_eq!(audit_dir, dir);
    Spawned2 {
        config,
        gateway,
        admin,
    }
}

struct Spawned2 {
    config: PathBuf,
    gateway: SocketAddr,
    admin: SocketAddr,
}

/// `ssp-gateway run` of a second gateway on the audit directory `dir`, which another holds:
/// it must refuse to start. Returns what it printed.
async fn second_gateway_refused(
    world: &World,
    provider_port: u16,
    audit: &str,
    dir: &Path,
) -> String {
    let second = second_config(world, provider_port, audit, dir);
    let out = second.config.with_extension("out");
    let file = std::fs::File::create(&out).expect("output file");
    let mut child = Command::new(GATEWAY_BIN)
        .arg("run")
        .arg("--config")
        .arg(&second.config)
        .stdout(file.try_clone().expect("file"))
        .stderr(file)
        .spawn()
        .expect("spawn the second gateway");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        // It binds its listeners only once the trail is open.
        let listening = tokio::net::TcpStream::connect(second.admin).await.is_ok();
        if start.elapsed() > BINARY_DEADLINE || listening {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "a second gateway started on {} while the first one writes there: {}",
                dir.display(),
                std::fs::read_to_string(&out).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let text = std::fs::read_to_string(&out).expect("output");
    assert_eq!(status.code(), Some(1), "{text}");
    text
}

/// Whenever the writer opens a new active file in its directory — here after the directory
/// was removed, and either recreated by someone else or not — it first takes the directory's
/// lock again (and creates the directory again when it is missing, as at start): a second
/// gateway on that directory then refuses to start, and the chain the first one carries on
/// there verifies. Both durabilities. (Before, the lock was left on the removed directory's
/// `.lock`: a second gateway started beside the first and the trail broke.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_audit_directory_is_written_again_only_under_its_lock() {
    let world = World::ecdsa();
    let provider = recording_provider(&world).await;
    let ep = endpoint(provider.port);
    let metadata = || Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA);
    for (audit, recreated) in [
        (FSYNC, true),
        (BUFFERED, true),
        (FSYNC, false),
        (BUFFERED, false),
    ] {
        let case = format!("{audit:?}, recreated by someone else: {recreated}");
        let (config, gw, admin, dir) = spawned_config(&world, provider.port, audit);
        let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
        let client = world.client(&world.consumer, g.gateway);
        assert_eq!(
            client.gpc(metadata()).await.status,
            StatusCode::OK,
            "{case}"
        );

        std::fs::remove_dir_all(&dir).expect("rm -rf the audit directory");
        if recreated {
            std::fs::create_dir(&dir).expect("mkdir");
        }
        let mut traces = Vec::new();
        let a = client.gpc(metadata()).await;
        assert_eq!(a.status, StatusCode::OK, "{case}: {}", a.text());
        traces.push(last_seen(&provider));
        eventually("the trail reopened in the directory", || {
            dir.join("audit.jsonl").exists().then_some(())
        })
        .await;
        let mode = std::fs::metadata(&dir)
            .expect("the audit directory")
            .permissions();
        if !recreated {
            assert_eq!(mode.mode() & 0o777, 0o700, "{case}: created as at start");
        }
        assert_eq!(
            http_get(g.admin, "/readyz").await.0,
            StatusCode::OK,
            "{case}"
        );

        let refused = second_gateway_refused(&world, provider.port, audit, &dir).await;
        assert!(
            refused.contains(&format!(
                "audit directory {} is in use by another gateway process",
                dir.display()
            )),
            "{case}: {refused}"
        );

        let a = client.gpc(metadata()).await;
        assert_eq!(a.status, StatusCode::OK, "{case}");
        traces.push(last_seen(&provider));
        let status = stop_gateway(&mut g).await;
        assert!(status.success(), "{case}: {status}: {}", log_of(&g));

        let all = records(&dir);
        for t in &traces {
            assert_eq!(for_trace(&all, t).len(), 2, "{case}: {t} in {all:#?}");
        }
        let (code, out) = verify(&audit_files(&dir));
        assert_eq!(code, 0, "{case}: {out}");
        let log = log_of(&g);
        assert!(log.contains("took its lock again"), "{case}: {log}");
        assert_eq!(
            log.contains("the audit directory was removed; created it again"),
            !recreated,
            "{case}: {log}"
        );
    }
    provider.stop.cancel();
}

/// The audit directory removed and recreated, and another gateway started there before the
/// first wrote again (the drill's order, under `buffered`): the first does not write beside it.
/// Its trail is unwritable (503 AUDIT_UNAVAILABLE, not ready, an error line naming the other
/// process), and it retries: once the other has stopped and its file is moved out, the first
/// takes the lock and carries on, every record it owes written and its chain intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_another_gateway_took_is_not_written_until_it_is_free() {
    let world = World::ecdsa();
    let provider = recording_provider(&world).await;
    let ep = endpoint(provider.port);
    let metadata = || Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA);
    let (mut g, dir) = spawned_after_one_request(&world, &provider, BUFFERED).await;
    let client = world.client(&world.consumer, g.gateway);

    std::fs::remove_dir_all(&dir).expect("rm -rf the audit directory");
    std::fs::create_dir(&dir).expect("mkdir");
    let second = second_config(&world, provider.port, BUFFERED, &dir);
    let mut h = spawn_gateway(&second.config, second.gateway, second.admin, &dir, &[]).await;

    // `buffered` forwards while the trail is not yet known to be unwritable (those records
    // are kept), then refuses.
    let mut forwarded = Vec::new();
    let refused = loop {
        let a = client.gpc(metadata()).await;
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            break a;
        }
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        forwarded.push(last_seen(&provider));
        assert!(forwarded.len() < 100, "never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    refused.assert_outcome(503, Some("INTERNAL_SERVER_ERROR"), "AUDIT_UNAVAILABLE");
    let (status, body) = http_get(g.admin, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("\"audit_writable\":false"), "{body}");
    let log = log_of(&g);
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("the audit trail cannot be written")
            && l.contains("is in use by another gateway process")),
        "{log}"
    );
    let a = world
        .client(&world.consumer, h.gateway)
        .gpc(metadata())
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        client.gpc(metadata()).await.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "still refused while the other holds the directory"
    );

    // The other stops; its trail is whole, and is moved out of the directory.
    assert!(stop_gateway(&mut h).await.success());
    let theirs = dir.with_extension("second");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::fs::rename(dir.join("audit.jsonl"), theirs.join("audit.jsonl")).expect("move");
    let (code, out) = verify(&audit_files(&theirs));
    assert_eq!(code, 0, "{out}");

    eventually("ready again", || {
        std::fs::read_to_string(&g.log)
            .ok()
            .filter(|l| l.contains("the audit trail can be written again"))
    })
    .await;
    let start = Instant::now();
    while http_get(g.admin, "/readyz").await.0 != StatusCode::OK {
        assert!(start.elapsed() < BINARY_DEADLINE, "never ready again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = client.gpc(metadata()).await;
    assert_eq!(a.status, StatusCode::OK);
    forwarded.push(last_seen(&provider));
    assert!(stop_gateway(&mut g).await.success());
    let all = records(&dir);
    for t in &forwarded {
        assert_eq!(for_trace(&all, t).len(), 2, "{t} in {all:#?}");
    }
    let id = refused.headers["x-request-id"].to_str().expect("id");
    assert_eq!(for_request(&all, id).len(), 1, "the refusal is on record");
    let (code, out) = verify(&audit_files(&dir));
    assert_eq!(code, 0, "{out}");
    provider.stop.cancel();
}

/// Stopped while records cannot be written (the trail's path is taken away), the gateway
/// exits 3, not 0, after its shutdown retries: a supervisor must not see a clean stop. The
/// refusals owed are the records lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_loses_audit_records_exits_non_zero() {
    let world = World::ecdsa();
    let provider = recording_provider(&world).await;
    let ep = endpoint(provider.port);
    let metadata = || Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA);
    let (mut g, dir) = spawned_after_one_request(&world, &provider, FSYNC).await;
    let client = world.client(&world.consumer, g.gateway);
    let moved = dir.with_extension("moved");
    std::fs::rename(&dir, &moved).expect("move the audit dir away");
    std::fs::write(&dir, b"not a directory").expect("file in its place");
    for _ in 0..5 {
        client.gpc(metadata()).await.assert_outcome(
            503,
            Some("INTERNAL_SERVER_ERROR"),
            "AUDIT_UNAVAILABLE",
        );
    }
    let status = stop_gateway(&mut g).await;
    let log = log_of(&g);
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(
        log.contains("records lost") && log.contains("lost=5"),
        "{log}"
    );
    std::fs::remove_file(&dir).expect("rm");
    let (code, out) = verify(&audit_files(&moved));
    assert_eq!(code, 0, "{out}");
    provider.stop.cancel();
}

/// Under `buffered`, records written but not yet synced when the trail is taken away are lost
/// if the final sync at shutdown cannot make them durable: said, and exit 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_final_sync_cannot_make_durable_are_lost_and_exit_non_zero() {
    let world = World::ecdsa();
    let provider = recording_provider(&world).await;
    let ep = endpoint(provider.port);
    let metadata = || Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA);
    let audit = "[audit]\ndurability = \"buffered\"\nfsync_interval = \"1h\"\n";
    let (config, gw, admin, dir) = spawned_config(&world, provider.port, audit);
    let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    let client = world.client(&world.consumer, g.gateway);
    for _ in 0..3 {
        assert_eq!(client.gpc(metadata()).await.status, StatusCode::OK);
    }
    eventually("the six records written", || {
        (records(&dir).len() == 6).then_some(())
    })
    .await;
    std::fs::remove_dir_all(&dir).expect("rm -rf the audit directory");
    std::fs::write(&dir, b"not a directory").expect("file in its place");
    let status = stop_gateway(&mut g).await;
    let log = log_of(&g);
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(
        log.contains("not made durable before shutdown") && log.contains("records=6"),
        "{log}"
    );
    std::fs::remove_file(&dir).expect("rm");
    provider.stop.cancel();
}
