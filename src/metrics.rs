//! Prometheus metrics of one gateway instance, exposed on the admin listener's `/metrics`.
//! Every name starts with `ssp_` (process metrics keep the standard `process_` names). Labels are
//! bounded sets only: the interaction's catalogue name, the HTTP status code, a rejection or
//! failure reason from a fixed list, a certificate role. Never an ASID, URL, trace id or client
//! name: those belong in the audit trail and traces, not in time series.

use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets (seconds): fine below a millisecond to see the gateway's own overhead, wide
/// enough above to see a slow provider.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// fsync buckets (seconds).
pub const FSYNC_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Records per group commit.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// The `interaction` label of a request rejected before its interaction was known.
pub const UNKNOWN_INTERACTION: &str = "unknown";

/// The `reason`s of `ssp_tls_handshake_failures_total` the listener adds to
/// `HandshakeFailure`'s (`server::serve_tls_observed`).
pub const LISTENER_FAILURE_REASONS: [&str; 4] = [
    "timeout",
    "connection_limit",
    "certificate_connection_limit",
    "unreadable_certificate",
];

/// The `reason`s of `ssp_upstream_connect_errors_total` (`forward::TlsConnector`).
pub const UPSTREAM_CONNECT_ERROR_REASONS: [&str; 4] = ["tcp", "tls", "timeout", "other"];

/// The provider circuit breakers, by state only (a host is a URL-like, unbounded label: the
/// log names it): `ssp_upstream_circuits{state}` counts the hosts whose circuit is `open` or
/// `half_open` now, `ssp_upstream_circuit_transitions_total{to}` their state changes.
#[derive(Clone)]
pub struct CircuitMetrics {
    pub circuits: IntGaugeVec,
    pub transitions: IntCounterVec,
}

impl CircuitMetrics {
    /// Both metrics, every series at 0, not registered anywhere.
    pub fn new() -> CircuitMetrics {
        use crate::breaker::State;
        let circuits = IntGaugeVec::new(
            Opts::new(
                "ssp_upstream_circuits",
                "Provider hosts whose circuit breaker is open or half-open now, by state.",
            ),
            &["state"],
        )
        .expect("static metric definition is valid");
        let transitions = IntCounterVec::new(
            Opts::new(
                "ssp_upstream_circuit_transitions_total",
                "State changes of provider hosts' circuit breakers, by the state entered.",
            ),
            &["to"],
        )
        .expect("static metric definition is valid");
        for state in [State::Open, State::HalfOpen] {
            circuits.with_label_values(&[state.as_str()]).set(0);
        }
        for state in [State::Open, State::HalfOpen, State::Closed] {
            transitions.with_label_values(&[state.as_str()]);
        }
        CircuitMetrics {
            circuits,
            transitions,
        }
    }

    /// Counts one host's change from `from` to `to`.
    pub fn changed(&self, from: crate::breaker::State, to: crate::breaker::State) {
        use crate::breaker::State;
        self.transitions.with_label_values(&[to.as_str()]).inc();
        if from != State::Closed {
            self.circuits.with_label_values(&[from.as_str()]).dec();
        }
        if to != State::Closed {
            self.circuits.with_label_values(&[to.as_str()]).inc();
        }
    }
}

impl Default for CircuitMetrics {
    fn default() -> Self {
        CircuitMetrics::new()
    }
}

/// Hot reload outcomes: `ssp_reloads_total{component,result}` counts them and
/// `ssp_reload_last_ok{component}` says how the last one went (1: loaded, or nothing reloaded
/// since start; 0: refused, the previous version is still in force), so a refusal stays visible
/// until a good file is loaded.
#[derive(Clone)]
pub struct ReloadMetrics {
    pub total: IntCounterVec,
    pub last_ok: IntGaugeVec,
    /// `ssp_config_restart_pending`: 1 while the configuration file holds changes outside
    /// `[policy]`, which a reload does not apply.
    pub restart_pending: IntGauge,
}

impl ReloadMetrics {
    /// Both metrics, not registered anywhere (`Metrics::new` registers its own).
    pub fn new() -> ReloadMetrics {
        ReloadMetrics {
            total: IntCounterVec::new(
                Opts::new(
                    "ssp_reloads_total",
                    "Hot reloads of files, by component and result (ok, refused).",
                ),
                &["component", "result"],
            )
            .expect("static metric definition is valid"),
            last_ok: IntGaugeVec::new(
                Opts::new(
                    "ssp_reload_last_ok",
                    "1 if the component's last hot reload loaded (or none has run since start), 0 if it was refused and the previous version is still in force.",
                ),
                &["component"],
            )
            .expect("static metric definition is valid"),
            restart_pending: IntGauge::new(
                "ssp_config_restart_pending",
                "1 while the configuration file holds changes outside [policy] (named in the last reload's WARN line), which wait for a restart; 0 when what runs is what the file says.",
            )
            .expect("static metric definition is valid"),
        }
    }

    /// Exposes `component`'s series from now: its counts at 0, its last outcome ok (what it
    /// loaded at start).
    pub fn register_component(&self, component: &str) {
        for result in ["ok", "refused"] {
            self.total.with_label_values(&[component, result]);
        }
        self.last_ok.with_label_values(&[component]).set(1);
    }

    /// Records one reload of `component`.
    pub fn record(&self, component: &str, ok: bool) {
        let result = if ok { "ok" } else { "refused" };
        self.total.with_label_values(&[component, result]).inc();
        self.last_ok
            .with_label_values(&[component])
            .set(i64::from(ok));
    }
}

impl Default for ReloadMetrics {
    fn default() -> Self {
        ReloadMetrics::new()
    }
}

/// The audit writer's metrics.
#[derive(Clone)]
pub struct AuditMetrics {
    /// Records accepted but not yet written (queue plus retry backlog).
    pub queue_depth: IntGauge,
    /// Their serialised bytes (bounded by `queue_max_bytes`).
    pub queue_bytes: IntGauge,
    pub fsync_duration: Histogram,
    /// `fsync`: from a forwarded request's record being serialised and handed to the writer
    /// until it is durable (queue, write, fsync, and waiting for an fsync already running), or
    /// refused: the audit trail's share of the request's latency.
    pub commit_wait: Histogram,
    pub write_errors: IntCounter,
    pub records_written: IntCounter,
    pub records_dropped: IntCounter,
    pub batch_records: Histogram,
    /// 1 while the trail can be written, 0 while it cannot.
    pub writable: IntGauge,
    /// The `seq` of the last record known durable (fsync'd, or found in the trail at start):
    /// Prometheus' history of it is an anchor for the end of the trail kept outside it.
    pub last_seq: IntGauge,
}

/// The span exporter's metrics.
#[derive(Clone)]
pub struct TracingMetrics {
    pub spans_exported: IntCounter,
    pub spans_dropped: IntCounter,
    pub export_failures: IntCounter,
}

/// All metrics of one gateway instance, on its own registry (tests run several in one process).
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by interaction name and HTTP status.
    pub requests: IntCounterVec,
    /// Requests the gateway refused itself, by `Rejection::reason`.
    pub rejections: IntCounterVec,
    /// From request received to response head sent, by interaction.
    pub request_duration: HistogramVec,
    /// From request sent to the provider to its response head, by interaction.
    pub upstream_duration: HistogramVec,
    /// The gateway's own share of a forwarded request: total minus upstream, by interaction.
    pub overhead_duration: HistogramVec,
    /// Consumer connections open now (after the TLS handshake).
    pub active_connections: IntGauge,
    /// Consumer TLS handshakes that failed, by `HandshakeFailure` label (or `timeout`).
    pub tls_handshake_failures: IntCounterVec,
    /// HTTP/1.1 request heads refused before the request path saw them, by reason.
    pub http_refused_heads: IntCounterVec,
    /// Connections to providers that could not be made, by reason (`timeout`, `tcp`, `tls`).
    pub upstream_connect_errors: IntCounterVec,
    /// Provider host circuits open and half-open now, and their state changes.
    pub circuits: CircuitMetrics,
    /// Connect retries by outcome (`forward::RetryOutcome`).
    pub upstream_retries: IntCounterVec,
    /// Provider response bodies cut off mid-way, by `forward::BodyCut` (`stalled`, `broken`).
    pub upstream_bodies_cut: IntCounterVec,
    /// Forwarded requests the provider gave no usable answer to, by
    /// `forward::UpstreamFailure`.
    pub upstream_failures: IntCounterVec,
    /// HTTP/2 connections ended with a GOAWAY for the client's violation, by
    /// `server::HTTP2_VIOLATIONS`.
    pub http2_violations: IntCounterVec,
    /// The gateway's own 4xx refusals held `reject_delay` because their certificate's were
    /// over its refusal budget.
    pub refusals_held: prometheus::IntCounter,
    /// Hot reloads by component and result (`ok`, `refused`), and the last one's outcome.
    pub reloads: ReloadMetrics,
    pub audit: AuditMetrics,
    pub tracing: TracingMetrics,
}

fn histogram_vec(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("static histogram definition is valid")
}

impl Metrics {
    /// A fresh registry with every gateway metric, build info and process metrics registered.
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "ssp_requests_total",
                "Requests answered, by interaction and HTTP status.",
            ),
            &["interaction", "status"],
        )
        .expect("static metric definition is valid");
        let rejections = IntCounterVec::new(
            Opts::new(
                "ssp_rejections_total",
                "Requests the gateway refused itself, by reason.",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let request_duration = histogram_vec(
            "ssp_request_duration_seconds",
            "From request received to response head sent, by interaction.",
            LATENCY_BUCKETS,
            &["interaction"],
        );
        let upstream_duration = histogram_vec(
            "ssp_upstream_duration_seconds",
            "From request sent to the provider to its response head, by interaction.",
            LATENCY_BUCKETS,
            &["interaction"],
        );
        let overhead_duration = histogram_vec(
            "ssp_request_overhead_seconds",
            "The gateway's own time in a forwarded request (total minus upstream), by interaction.",
            LATENCY_BUCKETS,
            &["interaction"],
        );
        let active_connections =
            IntGauge::new("ssp_active_connections", "Consumer connections open now.")
                .expect("static metric definition is valid");
        let tls_handshake_failures = IntCounterVec::new(
            Opts::new(
                "ssp_tls_handshake_failures_total",
                "Consumer TLS handshakes that failed, by reason.",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let http_refused_heads = IntCounterVec::new(
            Opts::new(
                "ssp_http_refused_heads_total",
                "HTTP/1.1 request heads refused before the request path saw them, by reason.",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let upstream_connect_errors = IntCounterVec::new(
            Opts::new(
                "ssp_upstream_connect_errors_total",
                "Connections to providers that could not be made, by reason.",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let circuits = CircuitMetrics::new();
        let upstream_retries = IntCounterVec::new(
            Opts::new(
                "ssp_upstream_retries_total",
                "Requests sent again after a failed connect to the provider, by outcome of the retry.",
            ),
            &["outcome"],
        )
        .expect("static metric definition is valid");
        let upstream_bodies_cut = IntCounterVec::new(
            Opts::new(
                "ssp_upstream_bodies_cut_total",
                "Provider responses cut off mid-body after their head was passed on, by reason (stalled, broken).",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let upstream_failures = IntCounterVec::new(
            Opts::new(
                "ssp_upstream_failures_total",
                "Forwarded requests the provider gave no usable answer to (a connect, TLS or protocol failure, or no head in time), by cause.",
            ),
            &["cause"],
        )
        .expect("static metric definition is valid");
        let http2_violations = IntCounterVec::new(
            Opts::new(
                "ssp_http2_connection_errors_total",
                "HTTP/2 connections the gateway ended with a GOAWAY for the client's violation of the protocol, by error code (enhance_your_calm: a flood of resets, CONTINUATION frames or pending resets).",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let refusals_held = prometheus::IntCounter::new(
            "ssp_refusals_held_total",
            "The gateway's own 4xx refusals (not 429s) held reject_delay because their client certificate's refusals were over rate_limit.refusals_per_second.",
        )
        .expect("static metric definition is valid");
        let reloads = ReloadMetrics::new();
        let audit = AuditMetrics {
            queue_depth: IntGauge::new(
                "ssp_audit_queue_depth",
                "Audit records accepted but not yet written.",
            )
            .expect("static metric definition is valid"),
            queue_bytes: IntGauge::new(
                "ssp_audit_queue_bytes",
                "Serialised bytes of the audit records accepted but not yet written.",
            )
            .expect("static metric definition is valid"),
            fsync_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "ssp_audit_fsync_duration_seconds",
                    "Time taken by one fsync of the audit trail.",
                )
                .buckets(FSYNC_BUCKETS.to_vec()),
            )
            .expect("static metric definition is valid"),
            commit_wait: Histogram::with_opts(
                HistogramOpts::new(
                    "ssp_audit_commit_wait_seconds",
                    "Time a forwarded request waited for its audit record to be durable (fsync).",
                )
                .buckets(FSYNC_BUCKETS.to_vec()),
            )
            .expect("static metric definition is valid"),
            write_errors: IntCounter::new(
                "ssp_audit_write_errors_total",
                "Failed attempts to write or sync the audit trail.",
            )
            .expect("static metric definition is valid"),
            records_written: IntCounter::new(
                "ssp_audit_records_total",
                "Audit records written to the trail.",
            )
            .expect("static metric definition is valid"),
            records_dropped: IntCounter::new(
                "ssp_audit_records_dropped_total",
                "Audit records of refused requests dropped because the queue was full.",
            )
            .expect("static metric definition is valid"),
            batch_records: Histogram::with_opts(
                HistogramOpts::new(
                    "ssp_audit_batch_records",
                    "Records per group commit of the audit trail.",
                )
                .buckets(BATCH_BUCKETS.to_vec()),
            )
            .expect("static metric definition is valid"),
            writable: IntGauge::new(
                "ssp_audit_writable",
                "1 while the audit trail can be written, 0 while it cannot.",
            )
            .expect("static metric definition is valid"),
            last_seq: IntGauge::new(
                "ssp_audit_last_seq",
                "The seq of the last audit record written durably (fsync'd, or found in the trail at start); 0 before the first. Its history anchors the end of the trail: audit verify --min-seq.",
            )
            .expect("static metric definition is valid"),
        };
        let tracing = TracingMetrics {
            spans_exported: IntCounter::new(
                "ssp_tracing_spans_exported_total",
                "Spans delivered to the OTLP collector.",
            )
            .expect("static metric definition is valid"),
            spans_dropped: IntCounter::new(
                "ssp_tracing_spans_dropped_total",
                "Spans dropped: export queue full or the collector failed.",
            )
            .expect("static metric definition is valid"),
            export_failures: IntCounter::new(
                "ssp_tracing_export_failures_total",
                "Failed OTLP export requests.",
            )
            .expect("static metric definition is valid"),
        };
        audit.writable.set(1);
        {
            use crate::forward::{BodyCut, RetryOutcome, UpstreamFailure};
            zero_labels(
                &rejections,
                crate::ssp::outcome::Rejection::REASONS.iter().copied(),
            );
            zero_labels(
                &tls_handshake_failures,
                crate::tls::HandshakeFailure::ALL.map(|f| f.as_label()),
            );
            zero_labels(&tls_handshake_failures, LISTENER_FAILURE_REASONS);
            zero_labels(
                &http_refused_heads,
                crate::h1::HeadError::LABELS.iter().copied(),
            );
            zero_labels(&upstream_connect_errors, UPSTREAM_CONNECT_ERROR_REASONS);
            zero_labels(
                &upstream_retries,
                [
                    RetryOutcome::Answered,
                    RetryOutcome::ConnectError,
                    RetryOutcome::Timeout,
                    RetryOutcome::Error,
                    RetryOutcome::CircuitOpen,
                ]
                .map(RetryOutcome::as_str),
            );
            zero_labels(&upstream_bodies_cut, BodyCut::LABELS.iter().copied());
            zero_labels(
                &upstream_failures,
                UpstreamFailure::ALL.map(UpstreamFailure::as_label),
            );
            zero_labels(&http2_violations, crate::server::HTTP2_VIOLATIONS);
        }
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(requests.clone()),
            Box::new(rejections.clone()),
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(overhead_duration.clone()),
            Box::new(active_connections.clone()),
            Box::new(tls_handshake_failures.clone()),
            Box::new(http_refused_heads.clone()),
            Box::new(upstream_connect_errors.clone()),
            Box::new(circuits.circuits.clone()),
            Box::new(circuits.transitions.clone()),
            Box::new(upstream_retries.clone()),
            Box::new(upstream_bodies_cut.clone()),
            Box::new(upstream_failures.clone()),
            Box::new(http2_violations.clone()),
            Box::new(refusals_held.clone()),
            Box::new(reloads.total.clone()),
            Box::new(reloads.last_ok.clone()),
            Box::new(reloads.restart_pending.clone()),
            Box::new(audit.queue_depth.clone()),
            Box::new(audit.queue_bytes.clone()),
            Box::new(audit.fsync_duration.clone()),
            Box::new(audit.commit_wait.clone()),
            Box::new(audit.write_errors.clone()),
            Box::new(audit.records_written.clone()),
            Box::new(audit.records_dropped.clone()),
            Box::new(audit.batch_records.clone()),
            Box::new(audit.writable.clone()),
            Box::new(audit.last_seq.clone()),
            Box::new(tracing.spans_exported.clone()),
            Box::new(tracing.spans_dropped.clone()),
            Box::new(tracing.export_failures.clone()),
            Box::new(build_info()),
            Box::new(ProcessCollector::new()),
        ];
        for c in collectors {
            registry
                .register(c)
                .expect("metric names are distinct within one registry");
        }
        Arc::new(Metrics {
            registry,
            requests,
            rejections,
            request_duration,
            upstream_duration,
            overhead_duration,
            active_connections,
            tls_handshake_failures,
            http_refused_heads,
            upstream_connect_errors,
            circuits,
            upstream_retries,
            upstream_bodies_cut,
            upstream_failures,
            http2_violations,
            refusals_held,
            reloads,
            audit,
            tracing,
        })
    }

    /// Registers `ssp_certificate_expiry_seconds{certificate}`: seconds until each
    /// certificate's `notAfter` (negative once expired), computed at scrape time from
    /// `not_after`, which returns `(role, notAfter in unix seconds)` for the certificates in
    /// force now (after hot reloads).
    pub fn register_certificates(&self, not_after: CertificateExpiriesFn) {
        self.register(Box::new(CertificateExpiry::new(not_after)));
    }

    /// Registers `ssp_crl_next_update_seconds{component}`: seconds until the earliest nextUpdate
    /// of each component's CRLs (negative once passed: every check against them fails), read at
    /// scrape time from `horizons`, which returns the CRLs in force now (after hot reloads) as
    /// `(component, earliest nextUpdate in unix seconds)`; a component without CRLs (or none
    /// with a nextUpdate) has no series.
    pub fn register_crl_next_update(&self, horizons: CrlHorizonsFn) {
        self.register(Box::new(ScrapedGauge::new(
            "ssp_crl_next_update_seconds",
            "Seconds until the earliest nextUpdate of the component's CRLs in force (negative once passed: handshakes checked against them fail).",
            "component",
            Box::new(move || {
                let now = unix_now();
                horizons()
                    .into_iter()
                    .filter_map(|(component, horizon)| {
                        let horizon = i64::try_from(horizon?).unwrap_or(i64::MAX);
                        Some((component, horizon.saturating_sub(now) as f64))
                    })
                    .collect()
            }),
        )));
    }

    /// Registers `ssp_ready{check}`: 1 while the check passes, 0 while it fails, read at scrape
    /// time from `checks`, which returns `(check, passes)` for each readiness check and `all`
    /// (`admin::Readiness::register_metrics` gives `/readyz`'s own).
    pub fn register_readiness(&self, checks: ReadinessFn) {
        self.register(Box::new(ScrapedGauge::new(
            "ssp_ready",
            "1 while the readiness check passes, 0 while it fails (/readyz's checks; not_draining is /readyz's draining inverted; all: /readyz answers 200).",
            "check",
            Box::new(move || {
                checks()
                    .into_iter()
                    .map(|(check, passes)| (check, f64::from(u8::from(passes))))
                    .collect()
            }),
        )));
    }

    /// Registers the directory cache metrics (`ssp_directory_*`), read at scrape time from
    /// `stats`.
    pub fn register_directory_stats(&self, stats: DirectoryStatsFn) {
        self.register(Box::new(DirectoryCollector::new(stats)));
    }

    fn register(&self, collector: Box<dyn Collector>) {
        if let Err(e) = self.registry.register(collector) {
            tracing::warn!(error = %e, "metric collector not registered");
        }
    }

    /// Counts one answered request.
    pub fn observe_request(&self, interaction: Option<&str>, status: u16, seconds: f64) {
        let interaction = interaction.unwrap_or(UNKNOWN_INTERACTION);
        self.requests
            .with_label_values(&[interaction, status_label(status).as_str()])
            .inc();
        self.request_duration
            .with_label_values(&[interaction])
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Creates every series of a labelled counter whose labels are a known, bounded set, at 0: a
/// series that appears only with its first event has no earlier sample, so `increase()` and
/// `rate()` miss that first incident. (`ssp_reloads_total` is set up by each component as it
/// registers: `ReloadMetrics::register_component`.)
fn zero_labels<'l>(counter: &IntCounterVec, labels: impl IntoIterator<Item = &'l str>) {
    for label in labels {
        counter.with_label_values(&[label]);
    }
}

/// Reads the directory's counters.
pub type DirectoryStatsFn = Arc<dyn Fn() -> crate::directory::DirectoryStats + Send + Sync>;

/// Reads the certificates in force: `(role, earliest notAfter)` for each role.
pub type CertificateExpiriesFn = Arc<dyn Fn() -> Vec<(&'static str, i64)> + Send + Sync>;

/// Reads the CRLs in force: `(component, earliest nextUpdate)` for each component.
pub type CrlHorizonsFn = Arc<dyn Fn() -> Vec<(&'static str, Option<u64>)> + Send + Sync>;

/// Reads the readiness checks now: `(check, passes)` for each.
pub type ReadinessFn = Arc<dyn Fn() -> Vec<(&'static str, bool)> + Send + Sync>;

/// The status code as a label: bounded to 100..=599, anything else is `other`.
fn status_label(status: u16) -> String {
    match status {
        100..=599 => status.to_string(),
        _ => "other".to_owned(),
    }
}

fn build_info() -> IntGaugeVec {
    let g = IntGaugeVec::new(
        Opts::new("ssp_build_info", "Build of the running gateway (always 1)."),
        &["version"],
    )
    .expect("static metric definition is valid");
    g.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    g
}

/// `ssp_certificate_expiry_seconds{certificate}`, computed at scrape time.
struct CertificateExpiry {
    gauge: GaugeVec,
    not_after: CertificateExpiriesFn,
}

impl CertificateExpiry {
    fn new(not_after: CertificateExpiriesFn) -> CertificateExpiry {
        let gauge = GaugeVec::new(
            Opts::new(
                "ssp_certificate_expiry_seconds",
                "Seconds until the certificate in force expires (negative once expired); for a chain or a CA bundle, its earliest.",
            ),
            &["certificate"],
        )
        .expect("static metric definition is valid");
        CertificateExpiry { gauge, not_after }
    }
}

impl Collector for CertificateExpiry {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = unix_now();
        for (role, not_after) in (self.not_after)() {
            self.gauge
                .with_label_values(&[role])
                .set(not_after.saturating_sub(now) as f64);
        }
        self.gauge.collect()
    }
}

/// A gauge of one label whose series are read at scrape time (`ssp_crl_next_update_seconds`,
/// `ssp_ready`): reset, then set from `read`, so that a series `read` no longer returns goes.
struct ScrapedGauge {
    gauge: GaugeVec,
    read: Box<dyn Fn() -> Vec<(&'static str, f64)> + Send + Sync>,
    scrape: Mutex<()>,
}

impl ScrapedGauge {
    fn new(
        name: &str,
        help: &str,
        label: &str,
        read: Box<dyn Fn() -> Vec<(&'static str, f64)> + Send + Sync>,
    ) -> ScrapedGauge {
        let gauge = GaugeVec::new(Opts::new(name, help), &[label])
            .expect("static metric definition is valid");
        ScrapedGauge {
            gauge,
            read,
            scrape: Mutex::new(()),
        }
    }
}

impl Collector for ScrapedGauge {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // One scrape at a time: the gauge is set by reset + set, and the series of one scrape
        // are one reading.
        let _guard = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.gauge.reset();
        for (label, value) in (self.read)() {
            self.gauge.with_label_values(&[label]).set(value);
        }
        self.gauge.collect()
    }
}

/// `ssp_directory_*`, read from the directory's own counters at scrape time.
struct DirectoryCollector {
    stats: DirectoryStatsFn,
    hits: IntCounter,
    misses: IntCounter,
    stale: IntCounter,
    backend_errors: IntCounter,
    unusable_handlers: IntCounter,
    entries: IntGauge,
    scrape: Mutex<()>,
}

impl DirectoryCollector {
    fn new(stats: DirectoryStatsFn) -> DirectoryCollector {
        let counter = |name: &str, help: &str| {
            IntCounter::new(name, help).expect("static metric definition is valid")
        };
        DirectoryCollector {
            stats,
            hits: counter(
                "ssp_directory_cache_hits_total",
                "Directory lookups answered from the cache.",
            ),
            misses: counter(
                "ssp_directory_cache_misses_total",
                "Directory lookups that went to the backend.",
            ),
            stale: counter(
                "ssp_directory_stale_served_total",
                "Directory answers served stale because the backend failed.",
            ),
            backend_errors: counter(
                "ssp_directory_backend_errors_total",
                "Directory backend lookups that failed.",
            ),
            unusable_handlers: counter(
                "ssp_directory_unusable_handlers_total",
                "Message handlers a directory lookup returned that cannot be used (their interaction is refused for that party), counted per lookup.",
            ),
            entries: IntGauge::new(
                "ssp_directory_cache_entries",
                "Entries in the directory cache.",
            )
            .expect("static metric definition is valid"),
            scrape: Mutex::new(()),
        }
    }
}

impl Collector for DirectoryCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.hits.desc();
        d.extend(self.misses.desc());
        d.extend(self.stale.desc());
        d.extend(self.backend_errors.desc());
        d.extend(self.unusable_handlers.desc());
        d.extend(self.entries.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // One scrape at a time: the counters are set by reset + add.
        let _guard = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let s = (self.stats)();
        for (counter, value) in [
            (&self.hits, s.hits),
            (&self.misses, s.misses),
            (&self.stale, s.stale_served),
            (&self.backend_errors, s.backend_errors),
            (&self.unusable_handlers, s.unusable_handlers),
        ] {
            counter.reset();
            counter.inc_by(value);
        }
        self.entries
            .set(i64::try_from(s.entries).unwrap_or(i64::MAX));
        let mut out = self.hits.collect();
        out.extend(self.misses.collect());
        out.extend(self.stale.collect());
        out.extend(self.backend_errors.collect());
        out.extend(self.unusable_handlers.collect());
        out.extend(self.entries.collect());
        out
    }
}

/// The standard `process_*` metrics, read from `/proc/self` at scrape time (Linux).
struct ProcessCollector {
    cpu: prometheus::Counter,
    open_fds: IntGauge,
    max_fds: IntGauge,
    virtual_memory: IntGauge,
    resident_memory: IntGauge,
    start_time: prometheus::Gauge,
    threads: IntGauge,
    scrape: Mutex<()>,
}

impl ProcessCollector {
    fn new() -> ProcessCollector {
        let gauge = |name: &str, help: &str| {
            IntGauge::new(name, help).expect("static metric definition is valid")
        };
        ProcessCollector {
            cpu: prometheus::Counter::new(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            )
            .expect("static metric definition is valid"),
            open_fds: gauge("process_open_fds", "Number of open file descriptors."),
            max_fds: gauge(
                "process_max_fds",
                "Maximum number of open file descriptors.",
            ),
            virtual_memory: gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            ),
            resident_memory: gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            ),
            start_time: prometheus::Gauge::new(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            )
            .expect("static metric definition is valid"),
            threads: gauge("process_threads", "Number of OS threads in the process."),
            scrape: Mutex::new(()),
        }
    }
}

/// What `/proc/self/stat` says about the process.
#[derive(Debug, Default, PartialEq)]
struct ProcStat {
    cpu_ticks: u64,
    threads: i64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: i64,
}

/// Parses `/proc/self/stat` (fields after the parenthesised command name, which may contain
/// spaces).
fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field n is f[n - 3].
    let field = |n: usize| f.get(n - 3).copied();
    Some(ProcStat {
        cpu_ticks: field(14)?.parse::<u64>().ok()? + field(15)?.parse::<u64>().ok()?,
        threads: field(20)?.parse().ok()?,
        start_ticks: field(22)?.parse().ok()?,
        vsize: field(23)?.parse().ok()?,
        rss_pages: field(24)?.parse().ok()?,
    })
}

fn boot_time() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.cpu.desc();
        for g in [
            &self.open_fds,
            &self.max_fds,
            &self.virtual_memory,
            &self.resident_memory,
            &self.threads,
        ] {
            d.extend(g.desc());
        }
        d.extend(self.start_time.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _guard = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: sysconf and getrlimit only read process-wide constants/limits into values
        // we own; they have no memory-safety preconditions.
        let (ticks, page, nofile) = unsafe {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let nofile = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                Some(lim.rlim_cur)
            } else {
                None
            };
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
                nofile,
            )
        };
        let mut out = Vec::new();
        if let Some(stat) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|t| parse_proc_stat(&t))
        {
            if ticks > 0 {
                let ticks = ticks as f64;
                self.cpu.reset();
                self.cpu.inc_by(stat.cpu_ticks as f64 / ticks);
                out.extend(self.cpu.collect());
                if let Some(boot) = boot_time() {
                    self.start_time
                        .set(boot as f64 + stat.start_ticks as f64 / ticks);
                    out.extend(self.start_time.collect());
                }
            }
            self.threads.set(stat.threads);
            self.virtual_memory
                .set(i64::try_from(stat.vsize).unwrap_or(i64::MAX));
            // `c_long` is i32 on 32-bit targets.
            #[allow(clippy::unnecessary_cast)]
            let page = page.max(0) as i64;
            self.resident_memory
                .set(stat.rss_pages.saturating_mul(page));
            out.extend(self.threads.collect());
            out.extend(self.virtual_memory.collect());
            out.extend(self.resident_memory.collect());
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
            out.extend(self.open_fds.collect());
        }
        if let Some(max) = nofile {
            self.max_fds.set(i64::try_from(max).unwrap_or(i64::MAX));
            out.extend(self.max_fds.collect());
        }
        out
    }
}

fn unix_now() -> i64 {
    i64::try_from(crate::unix_now()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parses_a_command_with_spaces() {
        let line = "1234 (ssp gateway) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 7 0 4242 1000000 300 18446744073709551615";
        let s = parse_proc_stat(line).expect("parses");
        assert_eq!(s.cpu_ticks, 300);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_ticks, 4242);
        assert_eq!(s.vsize, 1_000_000);
        assert_eq!(s.rss_pages, 300);
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    /// The labelled counters with a known label set expose every series from 0 before any
    /// event, so that `increase()` sees the first one.
    #[test]
    fn known_label_sets_are_exposed_at_zero() {
        let text = String::from_utf8(Metrics::new().render()).expect("utf-8");
        for series in [
            "ssp_rejections_total{reason=\"certificate_no_longer_accepted\"} 0",
            "ssp_rejections_total{reason=\"upstream_timeout\"} 0",
            "ssp_tls_handshake_failures_total{reason=\"crl_expired\"} 0",
            "ssp_tls_handshake_failures_total{reason=\"timeout\"} 0",
            "ssp_http_refused_heads_total{reason=\"framing\"} 0",
            "ssp_http_refused_heads_total{reason=\"unsupported_coding\"} 0",
            "ssp_http_refused_heads_total{reason=\"host\"} 0",
            "ssp_http_refused_heads_total{reason=\"uri_too_long\"} 0",
            "ssp_rejections_total{reason=\"request_body_not_allowed\"} 0",
            "ssp_rejections_total{reason=\"cors_origin_not_allowed\"} 0",
            "ssp_upstream_connect_errors_total{reason=\"tls\"} 0",
            "ssp_upstream_retries_total{outcome=\"circuit_open\"} 0",
            "ssp_upstream_circuits{state=\"open\"} 0",
            "ssp_upstream_circuits{state=\"half_open\"} 0",
            "ssp_upstream_circuit_transitions_total{to=\"closed\"} 0",
            "ssp_rejections_total{reason=\"circuit_open\"} 0",
            "ssp_upstream_bodies_cut_total{reason=\"stalled\"} 0",
            "ssp_upstream_bodies_cut_total{reason=\"broken\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
        let count = |name: &str| text.lines().filter(|l| l.starts_with(name)).count();
        assert_eq!(count("ssp_rejections_total{"), 25);
        assert_eq!(count("ssp_tls_handshake_failures_total{"), 16);
        assert_eq!(count("ssp_http_refused_heads_total{"), 7);
        assert_eq!(count("ssp_upstream_connect_errors_total{"), 4);
        assert_eq!(count("ssp_upstream_retries_total{"), 5);
        assert_eq!(count("ssp_upstream_bodies_cut_total{"), 2);
        // Every cause once, each a distinct label.
        assert_eq!(count("ssp_upstream_failures_total{"), 18);
        assert_eq!(count("ssp_http2_connection_errors_total{"), 6);
        assert!(text.contains("ssp_upstream_failures_total{cause=\"tls_name_mismatch\"} 0"));
    }

    #[test]
    fn status_labels_are_the_codes() {
        assert_eq!(status_label(200), "200");
        assert_eq!(status_label(100), "100");
        assert_eq!(status_label(599), "599");
        assert_eq!(status_label(503), "503");
        assert_eq!(status_label(42), "other");
    }

    #[test]
    fn render_has_the_gateway_and_process_metrics() {
        let m = Metrics::new();
        m.observe_request(Some("search_slot"), 200, 0.0004);
        let server = unix_now() + 86_400;
        m.register_certificates(Arc::new(move || vec![("server", server)]));
        m.register_directory_stats(Arc::new(|| crate::directory::DirectoryStats {
            hits: 1,
            misses: 2,
            stale_served: 3,
            backend_errors: 4,
            unusable_handlers: 6,
            entries: 5,
        }));
        let listener_crl = (unix_now() + 3_600) as u64;
        m.register_crl_next_update(Arc::new(move || {
            vec![("listener", Some(listener_crl)), ("upstream", None)]
        }));
        let text = String::from_utf8(m.render()).expect("utf-8");
        for needle in [
            "ssp_requests_total{interaction=\"search_slot\",status=\"200\"} 1",
            "ssp_request_duration_seconds_bucket{interaction=\"search_slot\",le=\"0.0005\"} 1",
            "ssp_build_info{version=",
            "ssp_directory_stale_served_total 3",
            "ssp_directory_cache_entries 5",
            "ssp_directory_unusable_handlers_total 6",
            "ssp_audit_writable 1",
            "ssp_audit_last_seq 0",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        let expiry = text
            .lines()
            .find(|l| l.starts_with("ssp_certificate_expiry_seconds{certificate=\"server\"}"))
            .expect("expiry line");
        let secs: f64 = expiry
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("value");
        assert!((86_000.0..=86_400.0).contains(&secs), "{secs}");
        let crl = text
            .lines()
            .find(|l| l.starts_with("ssp_crl_next_update_seconds{component=\"listener\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .expect("listener CRL line");
        assert!((3_500.0..=3_600.0).contains(&crl), "{crl}");
        assert!(
            !text.contains("ssp_crl_next_update_seconds{component=\"upstream\"}"),
            "a component without CRLs has no series"
        );
    }
}
