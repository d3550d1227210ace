//! Logging and tracing. Logs: one structured line per request (see `gateway`) and the process's
//! own events, through `tracing`, as human-readable text or JSON; `RUST_LOG`, when set,
//! overrides the configured level. Traces: the W3C trace context of each request and its
//! OTLP/HTTP export (below). Never logs or exports key material, request bodies, target URLs or
//! tokens.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::audit::record::{decode_hex, hex_to};
use crate::config::{LogConfig, LogFormat};

/// Installs the process-wide subscriber, writing through `logwriter` (call `logwriter::flush`
/// before exit). Call once, from `main`.
pub fn init(config: &LogConfig) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::builder()
            .parse(&directives)
            .map_err(|e| format!("RUST_LOG: {e}"))?,
        _ => EnvFilter::builder()
            .parse(&config.level)
            .map_err(|e| format!("log.level: {e}"))?,
    };
    let writer = crate::logwriter::BufferedStdout::start()
        .map_err(|e| format!("cannot start the log writer thread: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stdout().is_terminal());
    crate::logwriter::set_json(config.format == LogFormat::Json);
    let result = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    result.map_err(|e| format!("cannot install the log subscriber: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Traces: W3C trace context and OTLP/HTTP export.
//
// One span per request (kind SERVER), carrying the Ssp-TraceID, the interaction and the ASIDs
// as attributes (never the target URL or the token, which can carry patient identifiers). The
// span's context goes to the provider as `traceparent`: an incoming valid `traceparent` is
// continued, otherwise a trace is started. Export is off unless `[tracing] otlp_endpoint` is
// set; spans then go, batched, as OTLP/HTTP JSON to `{endpoint}/v1/traces` from one background
// task through a bounded queue. A full queue or a failing collector drops spans (counted); it
// never slows or fails a request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::TracingConfig;
use crate::metrics::TracingMetrics;

/// The W3C trace context of one request's span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// This gateway's span for the request.
    pub span_id: [u8; 8],
    /// The caller's span, when the request came with a valid `traceparent`.
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
}

/// A valid `traceparent` value: (trace id, parent span id, flags). Version `00` exactly; later
/// versions by their 00-compatible prefix; `ff`, all-zero ids and malformed values are invalid.
pub fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let b = value.trim().as_bytes();
    if b.len() < 55 {
        return None;
    }
    let version = decode_hex::<1>(&b[0..2])?[0];
    if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = decode_hex::<16>(&b[3..35])?;
    let parent = decode_hex::<8>(&b[36..52])?;
    let flags = decode_hex::<1>(&b[53..55])?[0];
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace_id, parent, flags))
}

/// Random bytes for ids (trace, span and request ids): unique and unpredictable enough for
/// ids, not for keys. A per-thread xoshiro256++ generator seeded once from the operating
/// system's random source, so an id costs no system call.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(8) {
        let r = next_random().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    out
}

thread_local! {
    static RNG: std::cell::Cell<[u64; 4]> = std::cell::Cell::new(seed());
}

fn seed() -> [u64; 4] {
    let a = uuid::Uuid::new_v4().as_u128();
    let b = uuid::Uuid::new_v4().as_u128();
    let s = [a as u64, (a >> 64) as u64, b as u64, (b >> 64) as u64];
    if s == [0; 4] {
        // xoshiro's one bad state; the OS never gives it, but never loop on it either.
        [1, 2, 3, 4]
    } else {
        s
    }
}

fn next_random() -> u64 {
    RNG.with(|cell| {
        let mut s = cell.get();
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        cell.set(s);
        result
    })
}

/// A version 4 (random) UUID for a request id, without a system call.
pub fn new_request_id() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(random_bytes::<16>()).into_uuid()
}

impl TraceContext {
    /// Continues the trace of a valid incoming `traceparent` (exactly one), or starts one.
    pub fn continue_or_start(headers: &HeaderMap) -> TraceContext {
        let mut values = headers.get_all("traceparent").iter();
        let incoming = match (values.next(), values.next()) {
            (Some(v), None) => v.to_str().ok().and_then(parse_traceparent),
            _ => None,
        };
        let mut span_id = random_bytes::<8>();
        while span_id == [0; 8] {
            span_id = random_bytes::<8>();
        }
        match incoming {
            Some((trace_id, parent, flags)) => TraceContext {
                trace_id,
                span_id,
                parent_span_id: Some(parent),
                sampled: flags & 1 == 1,
            },
            None => {
                let mut trace_id = random_bytes::<16>();
                while trace_id == [0; 16] {
                    trace_id = random_bytes::<16>();
                }
                TraceContext {
                    trace_id,
                    span_id,
                    parent_span_id: None,
                    sampled: true,
                }
            }
        }
    }

    /// The `traceparent` to send downstream, this span as the parent: ASCII, written on the
    /// stack (one per forwarded request).
    pub fn traceparent(&self) -> [u8; 55] {
        let mut out = *b"00-################################-################-0#";
        hex_to(&mut out[3..35], &self.trace_id);
        hex_to(&mut out[36..52], &self.span_id);
        out[54] = if self.sampled { b'1' } else { b'0' };
        out
    }

    pub fn trace_id_hex(&self) -> String {
        crate::audit::record::hex(&self.trace_id)
    }

    /// The trace id in lowercase hex, without allocating.
    pub fn trace_id_hex_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex_to(&mut out, &self.trace_id);
        out
    }
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
}

/// A finished request span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub context: TraceContext,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// `Some(message)`: the span ended in error (a 5xx).
    pub error: Option<String>,
}

/// The request path's handle on span export. Cheap to clone; a no-op when export is off.
#[derive(Clone)]
pub struct Tracer {
    tx: Option<mpsc::Sender<SpanRecord>>,
    metrics: TracingMetrics,
}

/// The exporter before its task is started.
pub struct PendingExporter {
    rx: mpsc::Receiver<SpanRecord>,
    config: TracingConfig,
    endpoint: String,
    metrics: TracingMetrics,
}

impl Tracer {
    /// The handle and, when an endpoint is configured, its not-yet-started exporter.
    pub fn prepare(
        config: &TracingConfig,
        metrics: TracingMetrics,
    ) -> (Tracer, Option<PendingExporter>) {
        match &config.otlp_endpoint {
            None => (Tracer { tx: None, metrics }, None),
            Some(endpoint) => {
                let (tx, rx) = mpsc::channel(config.queue_capacity);
                let endpoint = if endpoint.ends_with("/v1/traces") {
                    endpoint.clone()
                } else {
                    format!("{endpoint}/v1/traces")
                };
                (
                    Tracer {
                        tx: Some(tx),
                        metrics: metrics.clone(),
                    },
                    Some(PendingExporter {
                        rx,
                        config: config.clone(),
                        endpoint,
                        metrics,
                    }),
                )
            }
        }
    }

    /// Whether spans of sampled requests are exported (so the caller can skip building them).
    pub fn exporting(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a finished span for export; drops it (counted) if the queue is full.
    pub fn record(&self, span: SpanRecord) {
        if let Some(tx) = &self.tx {
            if tx.try_send(span).is_err() {
                self.metrics.spans_dropped.inc();
            }
        }
    }
}

impl PendingExporter {
    /// Runs the exporter until `stop` is cancelled (then exports what is queued and ends).
    pub async fn run(mut self, stop: CancellationToken) {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let max_batch = self.config.max_batch;
        let mut batch: Vec<SpanRecord> = Vec::with_capacity(max_batch);
        let mut deadline = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    while let Ok(span) = self.rx.try_recv() {
                        batch.push(span);
                        if batch.len() >= max_batch {
                            self.export(&client, &mut batch).await;
                        }
                    }
                    self.export(&client, &mut batch).await;
                    return;
                }
                span = self.rx.recv() => match span {
                    Some(span) => {
                        if batch.is_empty() {
                            deadline = tokio::time::Instant::now() + self.config.batch_interval;
                        }
                        batch.push(span);
                        if batch.len() >= max_batch {
                            self.export(&client, &mut batch).await;
                        }
                    }
                    None => {
                        self.export(&client, &mut batch).await;
                        return;
                    }
                },
                _ = tokio::time::sleep_until(deadline), if !batch.is_empty() => {
                    self.export(&client, &mut batch).await;
                }
            }
        }
    }

    async fn export(
        &self,
        client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
        batch: &mut Vec<SpanRecord>,
    ) {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::take(batch);
        let n = spans.len() as u64;
        let body = otlp_json(&self.config.service_name, &spans);
        let request = http::Request::post(&self.endpoint)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)));
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the OTLP export request");
                self.metrics.spans_dropped.inc_by(n);
                self.metrics.export_failures.inc();
                return;
            }
        };
        match tokio::time::timeout(self.config.export_timeout, client.request(request)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {
                self.metrics.spans_exported.inc_by(n);
            }
            outcome => {
                let why = match outcome {
                    Ok(Ok(resp)) => format!("collector answered {}", resp.status()),
                    Ok(Err(e)) => crate::forward::error_chain(&e),
                    Err(_) => format!("no answer within {:?}", self.config.export_timeout),
                };
                tracing::warn!(endpoint = %self.endpoint, spans = n, error = %why, "span export failed; spans dropped");
                self.metrics.spans_dropped.inc_by(n);
                self.metrics.export_failures.inc();
            }
        }
    }
}

fn unix_nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos()
        .to_string()
}

fn attr(key: &str, value: &AttrValue) -> serde_json::Value {
    match value {
        AttrValue::Str(s) => serde_json::json!({"key": key, "value": {"stringValue": s}}),
        // OTLP/JSON carries 64-bit integers as strings.
        AttrValue::Int(i) => serde_json::json!({"key": key, "value": {"intValue": i.to_string()}}),
    }
}

/// An OTLP `ExportTraceServiceRequest` in the protobuf JSON mapping (ids as hex).
pub fn otlp_json(service_name: &str, spans: &[SpanRecord]) -> String {
    use crate::audit::record::hex;
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut span = serde_json::json!({
                "traceId": hex(&s.context.trace_id),
                "spanId": hex(&s.context.span_id),
                "name": s.name,
                "kind": 2,
                "startTimeUnixNano": unix_nanos(s.start),
                "endTimeUnixNano": unix_nanos(s.end),
                "attributes": s.attributes.iter().map(|(k, v)| attr(k, v)).collect::<Vec<_>>(),
                "status": match &s.error {
                    Some(message) => serde_json::json!({"code": 2, "message": message}),
                    None => serde_json::json!({"code": 0}),
                },
            });
            if let Some(parent) = s.context.parent_span_id {
                span["parentSpanId"] = serde_json::Value::String(hex(&parent));
            }
            span
        })
        .collect();
    serde_json::json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                attr("service.name", &AttrValue::Str(service_name.to_owned())),
                attr("service.version", &AttrValue::Str(env!("CARGO_PKG_VERSION").to_owned())),
            ]},
            "scopeSpans": [{
                "scope": {"name": "ssp-gateway", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }]
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::hex;

    #[test]
    fn ids_are_random_version_4_and_distinct() {
        let ids: std::collections::HashSet<uuid::Uuid> =
            (0..10_000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            assert_eq!(id.get_version_num(), 4);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        }
        // Another thread starts from another seed.
        let other = std::thread::spawn(new_request_id).join().expect("thread");
        assert!(!ids.contains(&other));
        let spans: std::collections::HashSet<[u8; 8]> =
            (0..1000).map(|_| random_bytes::<8>()).collect();
        assert_eq!(spans.len(), 1000);
    }

    #[test]
    fn traceparent_parsing_follows_w3c() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, p, f) = parse_traceparent(ok).expect("valid");
        assert_eq!(
            crate::audit::record::hex(&t),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(crate::audit::record::hex(&p), "00f067aa0ba902b7");
        assert_eq!(f, 1);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        // A later version: its 00-compatible prefix counts.
        assert!(parse_traceparent(&format!("01-{}-x", &ok[3..])).is_some());
    }

    #[test]
    fn a_trace_is_continued_or_started() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            ),
        );
        let c = TraceContext::continue_or_start(&h);
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            c.parent_span_id,
            Some([0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert!(!c.sampled);
        let sent = String::from_utf8_lossy(&c.traceparent()).into_owned();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(sent.ends_with("-00"));
        assert_ne!(
            &sent[36..52],
            "00f067aa0ba902b7",
            "our own span id goes downstream"
        );

        assert_eq!(
            sent,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-00", hex(&c.span_id))
        );
        assert_eq!(
            std::str::from_utf8(&c.trace_id_hex_bytes()),
            Ok("4bf92f3577b34da6a3ce929d0e0e4736")
        );

        let started = TraceContext::continue_or_start(&HeaderMap::new());
        assert!(started.parent_span_id.is_none() && started.sampled);
        let sent = String::from_utf8_lossy(&started.traceparent()).into_owned();
        assert!(parse_traceparent(&sent).is_some());
        assert_eq!(
            sent,
            format!("00-{}-{}-01", hex(&started.trace_id), hex(&started.span_id))
        );
        assert_ne!(
            started.trace_id,
            TraceContext::continue_or_start(&HeaderMap::new()).trace_id
        );
    }

    #[test]
    fn otlp_json_has_the_ids_as_hex_and_int_attributes_as_strings() {
        let c = TraceContext::continue_or_start(&HeaderMap::new());
        let span = SpanRecord {
            context: c,
            name: "GET search_slot".into(),
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_secs(2),
            attributes: vec![
                ("ssp.trace_id", AttrValue::Str("abc".into())),
                ("http.response.status_code", AttrValue::Int(200)),
            ],
            error: None,
        };
        let v: serde_json::Value = serde_json::from_str(&otlp_json("gw", &[span])).expect("JSON");
        let s = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], c.trace_id_hex());
        assert_eq!(s["startTimeUnixNano"], "1000000000");
        assert_eq!(s["attributes"][1]["value"]["intValue"], "200");
        assert!(s.get("parentSpanId").is_none());
        assert_eq!(
            v["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "gw"
        );
    }
}
