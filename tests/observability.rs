//! Metrics and traces of the real gateway: `/metrics` after known traffic has the counts,
//! histograms, connection, handshake, audit and certificate metrics it should, and passes
//! `promtool check metrics`; upstream connect errors are counted by reason; spans go to an
//! in-process OTLP/HTTP receiver with the Ssp-TraceID, interaction and ASIDs, and the provider
//! receives a W3C `traceparent` naming the gateway's span (continuing the caller's trace).

mod common;

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

async fn scrape(admin: SocketAddr) -> String {
    let (status, text) = http_get(admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    text
}

/// Scrapes until `series` has `value`.
async fn scrape_until(admin: SocketAddr, series: &str, value: f64) -> String {
    let start = Instant::now();
    loop {
        let text = scrape(admin).await;
        if sample(&text, series) == Some(value) {
            return text;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{series} never reached {value}; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn promtool_check_metrics(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool (Debian package prometheus) must be installed: scripts/test.sh installs it",
        );
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {report}"
    );
}

#[tokio::test]
async fn metrics_count_known_traffic_and_pass_promtool() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let ep = h.endpoint();
    for _ in 0..3 {
        let a = h
            .consumer()
            .gpc(Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA))
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    // No Ssp-From: refused before the interaction is known.
    let req = Request::get(format!("/{ep}/metadata"))
        .header("Ssp-TraceID", uuid::Uuid::new_v4().to_string())
        .header("Ssp-To", PROVIDER_ASID)
        .header("Ssp-InteractionID", IX_METADATA)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let a = h.consumer().send(req).await.expect("answer");
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    // A certificate registered for nobody.
    let a = h
        .world
        .client(&h.world.rogue, h.gateway)
        .gpc(Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA))
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // A certificate from a CA the gateway does not trust: the handshake fails.
    assert!(h
        .world
        .client(&h.world.untrusted, h.gateway)
        .handshake()
        .await
        .is_err());
    // One connection held open.
    let held = h.consumer().handshake().await.expect("handshake");

    scrape_until(h.admin, "ssp_active_connections", 1.0).await;
    let text = scrape_until(h.admin, "ssp_audit_records_total", 8.0).await;
    let expect = |series: &str, value: f64| {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    };
    expect(
        "ssp_requests_total{interaction=\"read_metadata\",status=\"200\"}",
        3.0,
    );
    expect(
        "ssp_requests_total{interaction=\"unknown\",status=\"400\"}",
        1.0,
    );
    expect(
        "ssp_requests_total{interaction=\"read_metadata\",status=\"403\"}",
        1.0,
    );
    expect(
        "ssp_rejections_total{reason=\"missing_or_invalid_header\"}",
        1.0,
    );
    expect("ssp_rejections_total{reason=\"fqdn_not_registered\"}", 1.0);
    expect(
        "ssp_tls_handshake_failures_total{reason=\"unknown_issuer\"}",
        1.0,
    );
    expect(
        "ssp_request_duration_seconds_count{interaction=\"read_metadata\"}",
        4.0,
    );
    expect(
        "ssp_upstream_duration_seconds_count{interaction=\"read_metadata\"}",
        3.0,
    );
    expect(
        "ssp_request_overhead_seconds_count{interaction=\"read_metadata\"}",
        3.0,
    );
    // Sub-millisecond buckets exist.
    assert!(text.contains(
        "ssp_request_overhead_seconds_bucket{interaction=\"read_metadata\",le=\"0.00025\"}"
    ));
    expect("ssp_audit_writable", 1.0);
    expect("ssp_audit_records_dropped_total", 0.0);
    assert!(sample(&text, "ssp_audit_fsync_duration_seconds_count").unwrap_or(0.0) >= 1.0);
    // One wait for durability per forwarded request, none for the refused one.
    expect("ssp_audit_commit_wait_seconds_count", 3.0);
    assert!(sample(&text, "ssp_audit_batch_records_count").unwrap_or(0.0) >= 1.0);
    expect(
        &format!(
            "ssp_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        ),
        1.0,
    );
    for role in ["server", "client_ca", "upstream_client", "upstream_ca"] {
        let secs = sample(
            &text,
            &format!("ssp_certificate_expiry_seconds{{certificate=\"{role}\"}}"),
        )
        .unwrap_or_else(|| panic!("expiry of {role} in\n{text}"));
        assert!(secs > 86_400.0, "{role}: {secs}");
    }
    assert!(sample(&text, "process_open_fds").unwrap_or(0.0) > 0.0);
    assert!(sample(&text, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0);
    // Bounded labels only: no ASID, URL, trace id or client name anywhere.
    for leak in [
        CONSUMER_ASID,
        PROVIDER_ASID,
        "https://",
        "consumer.dev.local",
        "rogue",
    ] {
        assert!(!text.contains(leak), "{leak} leaked into /metrics");
    }
    promtool_check_metrics(&text);

    drop(held);
    scrape_until(h.admin, "ssp_active_connections", 0.0).await;
    scrape_until(h.admin, "ssp_audit_queue_depth", 0.0).await;
    h.stop().await;
}

#[tokio::test]
async fn upstream_connect_errors_are_counted_by_reason() {
    let world = World::ecdsa();
    // A provider port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let config = gateway_config(&world, closed, &GatewayOptions::default());
    let shutdown = CancellationToken::new();
    let running = ssp_gateway::start(&config, shutdown.clone())
        .await
        .expect("start");
    let a = world
        .client(&world.consumer, running.gateway_addr)
        .gpc(Gpc::new(
            Method::GET,
            format!("{}/metadata", endpoint(closed)),
            IX_METADATA,
        ))
        .await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    let text = scrape(running.admin_addr).await;
    assert!(
        sample(&text, "ssp_upstream_connect_errors_total{reason=\"tcp\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "ssp_rejections_total{reason=\"upstream_error\"}"),
        Some(1.0)
    );
    shutdown.cancel();
    running.wait().await;
}

/// An OTLP/HTTP receiver: keeps every JSON body POSTed to /v1/traces.
struct Receiver {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    stop: CancellationToken,
}

async fn otlp_receiver() -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let (kept, stopped) = (bodies.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                _ = stopped.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(_) => continue,
                },
            };
            let kept = kept.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let kept = kept.clone();
                        async move {
                            let ok = req.method() == Method::POST
                                && req.uri().path() == "/v1/traces"
                                && req.headers()[http::header::CONTENT_TYPE] == "application/json";
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let status = match (ok, body) {
                                (true, Ok(b)) => match serde_json::from_slice(&b) {
                                    Ok(v) => {
                                        kept.lock().expect("lock").push(v);
                                        StatusCode::OK
                                    }
                                    Err(_) => StatusCode::BAD_REQUEST,
                                },
                                _ => StatusCode::BAD_REQUEST,
                            };
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
                            *resp.status_mut() = status;
                            Ok::<_, Infallible>(resp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Receiver { addr, bodies, stop }
}

fn spans(bodies: &[serde_json::Value]) -> Vec<serde_json::Value> {
    bodies
        .iter()
        .flat_map(|b| b["resourceSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|rs| rs["scopeSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|ss| ss["spans"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn attribute<'a>(span: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

#[tokio::test]
async fn spans_go_to_the_otlp_collector_and_traceparent_to_the_provider() {
    let receiver = otlp_receiver().await;
    let opts = GatewayOptions {
        extra_sections: format!(
            "[tracing]\notlp_endpoint = \"http://{}\"\nbatch_interval = \"50ms\"\nservice_name = \"ssp-test\"\n",
            receiver.addr
        ),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let ep = h.endpoint();

    // 1. The caller sends a traceparent: the trace is continued.
    let incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming_parent = "00f067aa0ba902b7";
    let a = h
        .consumer()
        .gpc(
            Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA).header(
                "traceparent",
                format!("00-{incoming_trace}-{incoming_parent}-01"),
            ),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let (_, _, headers) = h.recorder.last_head();
    let ssp_trace_id = headers["ssp-traceid"]
        .to_str()
        .expect("trace id")
        .to_owned();
    let sent = headers["traceparent"]
        .to_str()
        .expect("traceparent")
        .to_owned();
    assert_eq!(headers.get_all("traceparent").iter().count(), 1);
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    assert_eq!((parts[0], parts[1], parts[3]), ("00", incoming_trace, "01"));
    assert_ne!(
        parts[2], incoming_parent,
        "the provider's parent is the gateway's span"
    );
    let gateway_span_id = parts[2].to_owned();

    // 2. No traceparent: a trace is started, and still propagated.
    let b = h
        .consumer()
        .gpc(Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA))
        .await;
    assert_eq!(b.status, StatusCode::OK);
    let (_, _, headers2) = h.recorder.last_head();
    let started = headers2["traceparent"]
        .to_str()
        .expect("traceparent")
        .to_owned();
    let started: Vec<&str> = started.split('-').collect();
    assert_eq!((started.len(), started[3]), (4, "01"));
    assert_ne!(started[1], incoming_trace);

    // 3. A refused request has a span too, marked with its reason.
    let rogue = h
        .world
        .client(&h.world.rogue, h.gateway)
        .gpc(Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA))
        .await;
    assert_eq!(rogue.status, StatusCode::FORBIDDEN);

    let start = Instant::now();
    let all = loop {
        let all = spans(&receiver.bodies.lock().expect("lock"));
        if all.len() >= 3 {
            break all;
        }
        assert!(start.elapsed() < DEADLINE, "spans never arrived: {all:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(all.len(), 3, "{all:#?}");
    let bodies = receiver.bodies.lock().expect("lock").clone();
    assert_eq!(
        bodies[0]["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
        "ssp-test"
    );

    let first = all
        .iter()
        .find(|s| s["traceId"] == incoming_trace)
        .expect("the continued trace's span");
    assert_eq!(first["spanId"], gateway_span_id.as_str());
    assert_eq!(first["parentSpanId"], incoming_parent);
    assert_eq!(first["kind"], 2);
    assert_eq!(first["name"], "GET read_metadata");
    assert_eq!(
        attribute(first, "ssp.trace_id").map(|v| &v["stringValue"]),
        Some(&serde_json::Value::from(ssp_trace_id))
    );
    assert_eq!(
        attribute(first, "ssp.interaction").map(|v| &v["stringValue"]),
        Some(&serde_json::Value::from(IX_METADATA))
    );
    assert_eq!(
        attribute(first, "ssp.from_asid").map(|v| &v["stringValue"]),
        Some(&serde_json::Value::from(CONSUMER_ASID))
    );
    assert_eq!(
        attribute(first, "ssp.to_asid").map(|v| &v["stringValue"]),
        Some(&serde_json::Value::from(PROVIDER_ASID))
    );
    assert_eq!(
        attribute(first, "http.response.status_code").map(|v| &v["intValue"]),
        Some(&serde_json::Value::from("200"))
    );
    let start_ns: u128 = first["startTimeUnixNano"]
        .as_str()
        .expect("start")
        .parse()
        .expect("ns");
    let end_ns: u128 = first["endTimeUnixNano"]
        .as_str()
        .expect("end")
        .parse()
        .expect("ns");
    assert!(end_ns >= start_ns && start_ns > 0);

    let second = all
        .iter()
        .find(|s| s["traceId"] == started[1])
        .expect("the started trace's span");
    assert_eq!(second["spanId"], started[2]);
    assert!(second.get("parentSpanId").is_none());

    let refused = all
        .iter()
        .find(|s| attribute(s, "ssp.rejection.reason").is_some())
        .expect("the refused request's span");
    assert_eq!(
        attribute(refused, "ssp.rejection.reason").map(|v| &v["stringValue"]),
        Some(&serde_json::Value::from("fqdn_not_registered"))
    );
    // Target URLs and tokens stay out of traces.
    let everything = serde_json::to_string(&bodies).expect("json");
    assert!(!everything.contains("https://"), "{everything}");
    assert!(
        !everything.contains("CLIENT_CERTIFICATE_FQDN"),
        "{everything}"
    );

    let text = scrape(h.admin).await;
    assert_eq!(sample(&text, "ssp_tracing_spans_exported_total"), Some(3.0));
    assert_eq!(sample(&text, "ssp_tracing_spans_dropped_total"), Some(0.0));
    h.stop().await;
    receiver.stop.cancel();
}

#[tokio::test]
async fn a_dead_collector_drops_spans_without_touching_requests() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("addr");
    let opts = GatewayOptions {
        extra_sections: format!(
            "[tracing]\notlp_endpoint = \"http://{closed}\"\nbatch_interval = \"20ms\"\nexport_timeout = \"2s\"\n"
        ),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let ep = h.endpoint();
    for _ in 0..2 {
        let a = h
            .consumer()
            .gpc(Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA))
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    let text = scrape_until(h.admin, "ssp_tracing_spans_dropped_total", 2.0).await;
    assert!(sample(&text, "ssp_tracing_export_failures_total").unwrap_or(0.0) >= 1.0);
    assert_eq!(sample(&text, "ssp_tracing_spans_exported_total"), Some(0.0));
    h.stop().await;
}

/// `/readyz` until its status is `want`; returns the body.
async fn readyz_until(admin: SocketAddr, want: StatusCode) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (status, body) = http_get(admin, "/readyz").await;
        if status == want {
            return serde_json::from_str(&body).expect("readyz JSON");
        }
        assert!(
            start.elapsed() < DEADLINE,
            "/readyz never answered {want}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A listener CRL past its nextUpdate refuses every handshake (fail closed). Before, nothing
/// said so: `/readyz` stayed ready and no metric showed the CRL's age. Now
/// `ssp_crl_next_update_seconds{component="listener"}` counts down to it (from the CRLs in
/// force: it follows a reload), `/readyz` is not ready while the CRL is stale, and the refused
/// handshakes are counted as `crl_expired`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_listener_crl_is_measured_and_makes_the_gateway_not_ready() {
    let world = World::ecdsa();
    let stale_at = now() + 8;
    let crl = world
        .authority
        .crl_between(&[], now() - 60, stale_at)
        .expect("CRL");
    std::fs::write(&world.crl, crl).expect("write CRL");
    let h = start_with_recorder(world, Behaviour::Echo, GatewayOptions::default()).await;
    let series = "ssp_crl_next_update_seconds{component=\"listener\"}";

    let body = readyz_until(h.admin, StatusCode::OK).await;
    assert_eq!(body["checks"]["listener_crls_current"], true, "{body}");
    let text = scrape(h.admin).await;
    let left = sample(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert!(left > 0.0 && left <= 8.0, "{series} = {left}");
    assert!(
        !text.contains("ssp_crl_next_update_seconds{component=\"upstream\""),
        "no upstream CRLs are configured"
    );

    // The CRL goes stale.
    while now() < stale_at {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let body = readyz_until(h.admin, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["status"], "not ready", "{body}");
    assert_eq!(body["checks"]["listener_crls_current"], false, "{body}");
    assert!(
        h.consumer().handshake().await.is_err(),
        "a stale CRL let a consumer in"
    );
    let text = scrape_until(
        h.admin,
        "ssp_tls_handshake_failures_total{reason=\"crl_expired\"}",
        1.0,
    )
    .await;
    let left = sample(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert!(left <= 0.0, "{series} = {left} after nextUpdate");

    // A fresh CRL is published and reloaded: ready again, and the gauge follows it.
    let fresh = h
        .world
        .authority
        .crl_between(&[], now() - 60, now() + 86_400)
        .expect("CRL");
    std::fs::write(&h.world.crl, fresh).expect("publish CRL");
    let body = readyz_until(h.admin, StatusCode::OK).await;
    assert_eq!(body["checks"]["listener_crls_current"], true, "{body}");
    let left = sample(&scrape(h.admin).await, series).expect("gauge after the reload");
    assert!(left > 86_000.0, "{series} = {left} after the reload");
    h.consumer()
        .handshake()
        .await
        .expect("handshake under the fresh CRL");
    h.stop().await;
}

/// The real binary, run on a configuration written by `gateway_config` with its two listeners
/// moved from port 0 to free ports and JSON logs; killed on drop. Its log lines (stdout) are
/// collected as they come.
struct RunningBinary {
    child: std::process::Child,
    admin: SocketAddr,
    gateway: SocketAddr,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl RunningBinary {
    async fn start(config: &std::path::Path) -> RunningBinary {
        let (gateway, admin) = fix_listener_ports(config);
        let text = std::fs::read_to_string(config)
            .expect("read config")
            .replace("[log]\n", "[log]\nformat = \"json\"\n");
        std::fs::write(config, text).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ssp-gateway"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ssp-gateway run");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let parsed = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "unparsed": line }));
                collected.lock().expect("lines").push(parsed);
            }
        });
        let started = Instant::now();
        while tokio::net::TcpStream::connect(admin).await.is_err() {
            assert!(started.elapsed() < DEADLINE, "the gateway never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        RunningBinary {
            child,
            admin,
            gateway,
            lines,
        }
    }

    /// The log lines so far at `level` (`WARN`, `ERROR`) whose message starts with `message`.
    fn logged(&self, level: &str, message: &str) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| {
                l["level"] == level
                    && l["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with(message))
            })
            .cloned()
            .collect()
    }

    /// Waits until `logged(level, message)` has a line, and returns them.
    async fn until_logged(&self, level: &str, message: &str) -> Vec<serde_json::Value> {
        let started = Instant::now();
        loop {
            let found = self.logged(level, message);
            if !found.is_empty() {
                return found;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "no {level} {message:?} in:\n{:#?}",
                self.lines.lock().expect("lines")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RunningBinary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CRLS_STALE: &str = "CRLs in force have passed their nextUpdate";
const CRLS_RUN_OUT_SOON: &str = "CRLs taken into force run out soon";

/// A stale listener CRL (every handshake refused: a total outage) is one ERROR line, and a CRL
/// taken into force with little time left (at start, or by a reload) a WARN saying how long
/// it has. Before, only the rate-limited per-handshake INFO lines (`crl_expired`) said so.
/// The real binary, its log read from its standard output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_listener_crl_is_one_error_line_and_a_short_lived_one_a_warning() {
    let world = World::ecdsa();
    let stale_at = now() + 6;
    let crl = world
        .authority
        .crl_between(&[], now() - 60, stale_at)
        .expect("CRL");
    std::fs::write(&world.crl, crl).expect("write CRL");
    let config = gateway_config(&world, 9, &GatewayOptions::default());
    let gw = RunningBinary::start(&config.source).await;

    // At start: a few seconds left.
    let soon = gw.until_logged("WARN", CRLS_RUN_OUT_SOON).await;
    assert_eq!(soon.len(), 1, "{soon:#?}");
    assert_eq!(soon[0]["component"], "listener", "{soon:#?}");
    let left = soon[0]["left"].as_str().expect("left");
    assert!(left.ends_with('s') && !left.contains('m'), "{left}");
    assert!(gw.logged("ERROR", CRLS_STALE).is_empty());

    // It goes stale: one ERROR line, not one per handshake refused nor one per second.
    let stale = gw.until_logged("ERROR", CRLS_STALE).await;
    assert!(now() >= stale_at);
    assert_eq!(stale[0]["component"], "listener", "{stale:#?}");
    assert!(
        stale[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("every consumer TLS handshake is refused")),
        "{stale:#?}"
    );
    let consumer = world.client(&world.consumer, gw.gateway);
    for _ in 0..3 {
        assert!(
            consumer.handshake().await.is_err(),
            "a stale CRL let a consumer in"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(gw.logged("ERROR", CRLS_STALE).len(), 1);

    // A current CRL with two hours left is published and reloaded: a WARN with how long it has.
    let fresh = world
        .authority
        .crl_between(&[], now() - 60, now() + 2 * 3600)
        .expect("CRL");
    std::fs::write(&world.crl, fresh).expect("publish CRL");
    let started = Instant::now();
    while gw.logged("WARN", CRLS_RUN_OUT_SOON).len() < 2 {
        assert!(
            started.elapsed() < DEADLINE,
            "the reloaded CRL was not warned of"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reloaded = &gw.logged("WARN", CRLS_RUN_OUT_SOON)[1];
    let left = reloaded["left"].as_str().expect("left");
    assert!(left.starts_with("1h 59m") || left == "2h", "{left}");
    consumer
        .handshake()
        .await
        .expect("handshake under the reloaded CRL");
    assert_eq!(http_get(gw.admin, "/readyz").await.0, StatusCode::OK);
    assert_eq!(gw.logged("ERROR", CRLS_STALE).len(), 1);
}

const CERTIFICATE_RUN_OUT: &str = "the certificate in force has run out";
const CERTIFICATE_RUNS_OUT_SOON: &str = "the certificate taken into force runs out soon";

/// The gateway's own server certificate running out in force is one ERROR line (every
/// consumer's handshake then fails), and taking one with less than 14 days left into force a
/// WARN; a renewal by hot reload ends it. Before, nothing was logged: only
/// `ssp_certificate_expiry_seconds` went negative (found by a reload review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_own_certificate_running_out_in_force_is_one_error_line() {
    use ssp_gateway::tls::pki::{LeafSpec, Validity};
    let world = World::ecdsa();
    let server = |validity| LeafSpec {
        validity,
        ..LeafSpec::server(&["localhost", "127.0.0.1"])
    };
    let runs_out = now() + 6;
    world
        .authority
        .issue(&server(Validity::Until(runs_out)))
        .expect("issue")
        .write(&world.gateway.cert, &world.gateway.key)
        .expect("write the server certificate");
    let config = gateway_config(&world, 9, &GatewayOptions::default());
    let gw = RunningBinary::start(&config.source).await;
    let soon = gw.until_logged("WARN", CERTIFICATE_RUNS_OUT_SOON).await;
    assert_eq!(soon.len(), 1, "{soon:#?}");
    assert_eq!(soon[0]["certificate"], "server", "{soon:#?}");
    assert!(gw.logged("ERROR", CERTIFICATE_RUN_OUT).is_empty());

    let out = gw.until_logged("ERROR", CERTIFICATE_RUN_OUT).await;
    assert!(now() >= runs_out);
    assert_eq!(out[0]["certificate"], "server", "{out:#?}");
    assert!(
        out[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("consumers refuse the gateway's TLS handshake")),
        "{out:#?}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        gw.logged("ERROR", CERTIFICATE_RUN_OUT).len(),
        1,
        "said once"
    );

    // Renewed by hot reload (its INFO line is below the test's log level): consumers get in,
    // with no more warnings (it has a year) and no more errors.
    world
        .authority
        .issue(&server(Validity::Current))
        .expect("issue")
        .write(&world.gateway.cert, &world.gateway.key)
        .expect("renew the server certificate");
    let consumer = world.client(&world.consumer, gw.gateway);
    let started = Instant::now();
    while consumer.handshake().await.is_err() {
        assert!(started.elapsed() < DEADLINE, "the renewal was never taken");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gw.logged("WARN", CERTIFICATE_RUNS_OUT_SOON).len(), 1);
    assert_eq!(gw.logged("ERROR", CERTIFICATE_RUN_OUT).len(), 1);
}

/// `ssp_certificate_expiry_seconds` shows the certificates in force: after a renewal by hot
/// reload, the renewed one. Before, it kept the notAfter read at start however often the
/// certificate was renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_expiry_follows_a_renewal_by_hot_reload() {
    use ssp_gateway::tls::pki::{KeyKind, LeafSpec, Usage, Validity};
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let series = |role: &str| format!("ssp_certificate_expiry_seconds{{certificate=\"{role}\"}}");
    let text = scrape(h.admin).await;
    for role in ["server", "upstream_client"] {
        let left = sample(&text, &series(role)).unwrap_or_else(|| panic!("{role} in\n{text}"));
        assert!(left > 20.0 * 86_400.0, "{role}: {left}");
    }
    // Both renewed with certificates that run out in 10 days.
    let until = now() + 10 * 86_400;
    let renew = |names: &[&str], usage, pair: &Pair| {
        h.world
            .authority
            .issue(&LeafSpec {
                names: names.iter().map(|n| n.to_string()).collect(),
                common_name: names[0].to_string(),
                key: KeyKind::EcdsaP256,
                usage,
                validity: Validity::Until(until),
            })
            .expect("issue")
            .write(&pair.cert, &pair.key)
            .expect("write the renewed certificate");
    };
    renew(&["localhost", "127.0.0.1"], Usage::Server, &h.world.gateway);
    renew(&["ssp.dev.local"], Usage::Client, &h.world.gateway_client);
    let start = Instant::now();
    loop {
        let text = scrape(h.admin).await;
        let renewed = ["server", "upstream_client"]
            .iter()
            .all(|role| sample(&text, &series(role)).is_some_and(|left| left <= 10.0 * 86_400.0));
        if renewed {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the expiry gauge never showed the renewed certificates:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}

/// Before any traffic, the labelled counters with known label sets are exposed at 0 (so the
/// alerts' `increase()` sees the first incident): before, each series appeared only with its
/// first event, and an alert on it could not fire for that event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_counters_are_exposed_at_zero_from_the_start() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let text = scrape(h.admin).await;
    let mut series = vec![
        "ssp_http_refused_heads_total{reason=\"framing\"}".to_owned(),
        "ssp_tls_handshake_failures_total{reason=\"crl_expired\"}".to_owned(),
        "ssp_tls_handshake_failures_total{reason=\"certificate_revoked\"}".to_owned(),
        "ssp_upstream_connect_errors_total{reason=\"tcp\"}".to_owned(),
        "ssp_rejections_total{reason=\"certificate_no_longer_accepted\"}".to_owned(),
        "ssp_upstream_retries_total{outcome=\"answered\"}".to_owned(),
    ];
    for component in ["listener TLS", "upstream TLS", "policy", "directory"] {
        for result in ["ok", "refused"] {
            series.push(format!(
                "ssp_reloads_total{{component=\"{component}\",result=\"{result}\"}}"
            ));
        }
    }
    for s in &series {
        assert_eq!(sample(&text, s), Some(0.0), "{s} in\n{text}");
    }
    promtool_check_metrics(&text);
    h.stop().await;
}

/// A refused reload is visible: counted, and `ssp_reload_last_ok{component}` is 0 until a
/// good file is loaded (before, only the counter moved, and only from its first refusal on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_shows_until_a_good_file_is_loaded() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let last_ok = "ssp_reload_last_ok{component=\"listener TLS\"}";
    assert_eq!(sample(&scrape(h.admin).await, last_ok), Some(1.0));
    let good = std::fs::read(&h.world.gateway.cert).expect("read the certificate");
    std::fs::write(
        &h.world.gateway.cert,
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .expect("write");
    let text = scrape_until(h.admin, last_ok, 0.0).await;
    assert_eq!(
        sample(
            &text,
            "ssp_reloads_total{component=\"listener TLS\",result=\"refused\"}"
        ),
        Some(1.0),
        "{text}"
    );
    std::fs::write(&h.world.gateway.cert, good).expect("restore the certificate");
    scrape_until(h.admin, last_ok, 1.0).await;
    h.stop().await;
}

/// `/readyz` and `/metrics` read back to back: `/readyz`'s status and checks, and the
/// scrape's `ssp_ready` series, from a scrape between two `/readyz` answers that agree (the
/// state may move between requests).
async fn readyz_and_ssp_ready(admin: SocketAddr) -> (StatusCode, serde_json::Value, String) {
    let start = Instant::now();
    loop {
        let before = http_get(admin, "/readyz").await;
        let text = scrape(admin).await;
        let after = http_get(admin, "/readyz").await;
        if before == after {
            let body = serde_json::from_str(&after.1).expect("readyz JSON");
            return (after.0, body, text);
        }
        assert!(start.elapsed() < DEADLINE, "/readyz never held still");
    }
}

/// Each `ssp_ready` series is what `/readyz` said: one per check (`draining` inverted as
/// `not_draining`) and `all`, 1 when /readyz answered 200; no other.
fn assert_ssp_ready_is_readyz(status: StatusCode, body: &serde_json::Value, text: &str) {
    let checks = body["checks"].as_object().expect("checks");
    assert_eq!(checks.len(), 6, "{body}");
    let mut expected: Vec<(String, bool)> = checks
        .iter()
        .map(|(check, value)| {
            let value = value.as_bool().expect("a check is true or false");
            match check.as_str() {
                "draining" => ("not_draining".to_owned(), !value),
                _ => (check.clone(), value),
            }
        })
        .collect();
    expected.push(("all".to_owned(), status == StatusCode::OK));
    for (check, passes) in &expected {
        let series = format!("ssp_ready{{check=\"{check}\"}}");
        assert_eq!(
            sample(text, &series),
            Some(if *passes { 1.0 } else { 0.0 }),
            "{series} against /readyz {status} {body}; scrape:\n{text}"
        );
    }
    let exposed = text.lines().filter(|l| l.starts_with("ssp_ready{")).count();
    assert_eq!(exposed, expected.len(), "{text}");
}

/// The checks of `ssp_ready` that are 0 in `text` (in the exposition's order: by label value).
fn failing_ssp_ready(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("ssp_ready{check=\"")?.strip_suffix("\"} 0"))
        .collect()
}

/// `ssp_ready{check}` is `/readyz`'s checks, read at scrape time from the same function.
/// Before, Prometheus could see only the checks another metric happened to measure
/// (`ssp_audit_writable`, `ssp_crl_next_update_seconds`): not `directory_usable`, not
/// `draining`. The real binary: every series 1 while healthy; `audit_writable` (and `all`) 0
/// exactly while `/readyz` reports the trail unwritable; `not_draining` 0 while it drains
/// after SIGTERM with a request in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssp_ready_is_what_readyz_says_check_by_check() {
    let world = World::ecdsa();
    let provider_stop = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind provider");
    let provider_port = listener.local_addr().expect("addr").port();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let recorder = Recorder::new(Behaviour::Hold(release.clone()));
    serve_recorder(&world, listener, recorder.clone(), provider_stop.clone());
    let opts = GatewayOptions {
        extra_sections: "[audit]\nretry_interval = \"100ms\"\n".into(),
        grace_period: "20s",
        ..Default::default()
    };
    let config = gateway_config(&world, provider_port, &opts);
    let mut gw = RunningBinary::start(&config.source).await;
    let metadata = move || {
        Gpc::new(
            Method::GET,
            format!("{}/metadata", endpoint(provider_port)),
            IX_METADATA,
        )
    };

    // Healthy: every check passes, every series is 1.
    readyz_until(gw.admin, StatusCode::OK).await;
    let (status, body, text) = readyz_and_ssp_ready(gw.admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ssp_ready_is_readyz(status, &body, &text);
    assert!(failing_ssp_ready(&text).is_empty(), "{text}");
    promtool_check_metrics(&text);

    // The audit path stops being writable (a plain file in place of the directory: root
    // ignores permission bits); the next request finds out.
    let dir = config.audit.dir.clone();
    let moved = dir.with_extension("moved");
    std::fs::rename(&dir, &moved).expect("move the audit dir away");
    std::fs::write(&dir, b"not a directory").expect("file in its place");
    let consumer = world.client(&world.consumer, gw.gateway);
    consumer.gpc(metadata()).await.assert_outcome(
        503,
        Some("INTERNAL_SERVER_ERROR"),
        "AUDIT_UNAVAILABLE",
    );
    readyz_until(gw.admin, StatusCode::SERVICE_UNAVAILABLE).await;
    let (status, body, text) = readyz_and_ssp_ready(gw.admin).await;
    assert_eq!(body["checks"]["audit_writable"], false, "{body}");
    assert_ssp_ready_is_readyz(status, &body, &text);
    assert_eq!(
        failing_ssp_ready(&text),
        ["all", "audit_writable"],
        "{text}"
    );

    // Writable again: ready again, every series back to 1.
    std::fs::remove_file(&dir).expect("remove the file");
    std::fs::rename(&moved, &dir).expect("put the audit dir back");
    readyz_until(gw.admin, StatusCode::OK).await;
    let (status, body, text) = readyz_and_ssp_ready(gw.admin).await;
    assert_ssp_ready_is_readyz(status, &body, &text);
    assert!(failing_ssp_ready(&text).is_empty(), "{text}");

    // SIGTERM with a request held at the provider: the gateway drains, the admin listener
    // still answers.
    let in_flight = tokio::spawn(async move { consumer.gpc(metadata()).await });
    let start = Instant::now();
    while recorder.seen() == 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "the request never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let term = Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    readyz_until(gw.admin, StatusCode::SERVICE_UNAVAILABLE).await;
    let (status, body, text) = readyz_and_ssp_ready(gw.admin).await;
    assert_eq!(body["checks"]["draining"], true, "{body}");
    assert_ssp_ready_is_readyz(status, &body, &text);
    assert_eq!(failing_ssp_ready(&text), ["all", "not_draining"], "{text}");

    // The held request finishes and the gateway exits.
    release.add_permits(1);
    assert_eq!(in_flight.await.expect("request").status, StatusCode::OK);
    let start = Instant::now();
    while gw.child.try_wait().expect("wait").is_none() {
        assert!(start.elapsed() < DEADLINE, "the gateway did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    provider_stop.cancel();
}
