//! What a load run measured: per-worker statistics (an HdrHistogram of latencies in
//! microseconds, statuses, failures, bytes) merged at the end into a [`Report`], rendered as
//! text for people or JSON for harnesses. Pure bookkeeping: no clocks, no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::conn::Failure;
use super::request::Kind;

/// Highest latency the histograms track (longer ones are recorded as this).
const MAX_LATENCY_US: u64 = 3_600_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .expect("1 ≤ low, high ≥ 2 × low, 3 significant figures are valid bounds")
}

/// One worker's counts. Each worker owns one; they are merged when the run ends.
pub struct Stats {
    latency: Histogram<u64>,
    per_kind: [Histogram<u64>; 3],
    status: BTreeMap<u16, u64>,
    failures: BTreeMap<Failure, u64>,
    bytes: u64,
    unfinished: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            latency: histogram(),
            per_kind: [histogram(), histogram(), histogram()],
            status: BTreeMap::new(),
            failures: BTreeMap::new(),
            bytes: 0,
            unfinished: 0,
        }
    }
}

impl Stats {
    /// A response of `kind` with `status` after `latency` (from the intended send time at a
    /// fixed rate, from the actual one otherwise).
    pub fn response(&mut self, kind: Kind, status: u16, latency: Duration, bytes: u64) {
        let us = (latency.as_micros() as u64).max(1);
        self.latency.saturating_record(us);
        self.per_kind[kind.index()].saturating_record(us);
        *self.status.entry(status).or_default() += 1;
        self.bytes += bytes;
    }

    /// A request that got no response.
    pub fn failure(&mut self, failure: Failure) {
        *self.failures.entry(failure).or_default() += 1;
    }

    /// A request still in flight when the run's time was up.
    pub fn unfinished(&mut self) {
        self.unfinished += 1;
    }

    /// Adds another worker's counts.
    pub fn merge(&mut self, other: &Stats) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        for (mine, theirs) in self.per_kind.iter_mut().zip(&other.per_kind) {
            let _ = mine.add(theirs);
        }
        for (status, n) in &other.status {
            *self.status.entry(*status).or_default() += n;
        }
        for (failure, n) in &other.failures {
            *self.failures.entry(*failure).or_default() += n;
        }
        self.bytes += other.bytes;
        self.unfinished += other.unfinished;
    }

    /// Responses recorded.
    pub fn responses(&self) -> u64 {
        self.latency.len()
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Latency {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
                mean: 0.0,
            };
        }
        Latency {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// One interaction's share of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InteractionReport {
    pub responses: u64,
    pub latency_ms: Latency,
}

/// What the idle mode opened.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdleReport {
    pub requested: usize,
    pub open: usize,
    pub failed: usize,
    /// Seconds from the first connect until the last connection was open.
    pub open_after_s: f64,
}

/// How the run was driven, as reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunShape {
    pub url: String,
    /// `keep-alive`, `new-connection` or `idle`.
    pub mode: &'static str,
    /// `http/1.1` or `h2`.
    pub protocol: &'static str,
    pub connections: usize,
    pub streams_per_connection: usize,
    /// Requests per second asked for (fixed-rate mode), or `None` (closed loop).
    pub rate: Option<f64>,
    pub mix: String,
    pub warmup_s: f64,
    pub duration_s: f64,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub shape: RunShape,
    /// Responses received in the measured window (any status).
    pub responses: u64,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Non-2xx responses plus requests that got no response.
    pub errors: u64,
    /// Responses per second over the measured window.
    pub rps: f64,
    pub latency_ms: Latency,
    /// Responses by status code.
    pub status: BTreeMap<String, u64>,
    /// Requests without a response, by cause.
    pub failures: BTreeMap<String, u64>,
    /// Requests still in flight when the time was up (not in the latency figures).
    pub unfinished: u64,
    pub bytes_received: u64,
    pub interactions: BTreeMap<String, InteractionReport>,
    /// Distinct free slots booked (booking from a search), when the mix books.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub book_slots: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleReport>,
}

impl Report {
    /// Builds the report of a run measured for `window`.
    pub fn new(
        shape: RunShape,
        stats: &Stats,
        window: Duration,
        book_slots: Option<usize>,
        idle: Option<IdleReport>,
    ) -> Report {
        let responses = stats.responses();
        let ok: u64 = stats
            .status
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        let failed: u64 = stats.failures.values().sum();
        let secs = window.as_secs_f64();
        let interactions = Kind::ALL
            .into_iter()
            .filter(|k| !stats.per_kind[k.index()].is_empty())
            .map(|k| {
                let h = &stats.per_kind[k.index()];
                (
                    k.name().to_owned(),
                    InteractionReport {
                        responses: h.len(),
                        latency_ms: Latency::of(h),
                    },
                )
            })
            .collect();
        Report {
            shape,
            responses,
            ok,
            errors: responses - ok + failed,
            rps: if secs > 0.0 {
                responses as f64 / secs
            } else {
                0.0
            },
            latency_ms: Latency::of(&stats.latency),
            status: stats
                .status
                .iter()
                .map(|(s, n)| (s.to_string(), *n))
                .collect(),
            failures: stats
                .failures
                .iter()
                .map(|(f, n)| (f.label().to_owned(), *n))
                .collect(),
            unfinished: stats.unfinished,
            bytes_received: stats.bytes,
            interactions,
            book_slots,
            idle,
        }
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report is plain data and always serialises")
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let s = &self.shape;
        let mut out = String::new();
        let load = match s.rate {
            Some(r) => format!("fixed rate {r} req/s (latency from the intended send time)"),
            None => "closed loop".to_owned(),
        };
        let streams = if s.streams_per_connection > 1 {
            format!(" x {} streams", s.streams_per_connection)
        } else {
            String::new()
        };
        let _ = writeln!(out, "ssp-gateway loadtest: {}", s.url);
        let _ = writeln!(
            out,
            "  {} {}, {} connections{streams}, {load}, mix {}, {}s after {}s warm-up",
            s.mode, s.protocol, s.connections, s.mix, s.duration_s, s.warmup_s
        );
        if let Some(idle) = &self.idle {
            let _ = writeln!(
                out,
                "  idle connections: {} of {} open ({} failed) after {:.1}s",
                idle.open, idle.requested, idle.failed, idle.open_after_s
            );
        }
        let _ = writeln!(
            out,
            "  responses   {} ({:.1}/s), 2xx {}, errors {}, unfinished at the end {}",
            self.responses, self.rps, self.ok, self.errors, self.unfinished
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            out,
            "  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        let join = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.status.is_empty() {
            let _ = writeln!(out, "  status      {}", join(&self.status));
        }
        if !self.failures.is_empty() {
            let _ = writeln!(out, "  failures    {}", join(&self.failures));
        }
        for (name, i) in &self.interactions {
            let _ = writeln!(
                out,
                "  {name:<11} {} responses, p50 {:.3} ms, p99 {:.3} ms",
                i.responses, i.latency_ms.p50, i.latency_ms.p99
            );
        }
        if let Some(n) = self.book_slots {
            let _ = writeln!(
                out,
                "  bookings    {n} free slots found; booked in turn, then again (409 once used)"
            );
        }
        let _ = writeln!(
            out,
            "  received    {:.1} MB",
            self.bytes_received as f64 / 1e6
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> RunShape {
        RunShape {
            url: "https://localhost:8443/https://localhost:9443/B".into(),
            mode: "keep-alive",
            protocol: "http/1.1",
            connections: 2,
            streams_per_connection: 1,
            rate: None,
            mix: "search=1".into(),
            warmup_s: 1.0,
            duration_s: 2.0,
        }
    }

    #[test]
    fn merged_stats_give_percentiles_statuses_and_errors() {
        let mut a = Stats::default();
        let mut b = Stats::default();
        for ms in 1..=100u64 {
            a.response(Kind::Search, 200, Duration::from_millis(ms), 10);
        }
        b.response(Kind::Book, 409, Duration::from_secs(2), 5);
        b.failure(Failure::Connect);
        b.failure(Failure::Connect);
        b.unfinished();
        a.merge(&b);
        let r = Report::new(shape(), &a, Duration::from_secs(2), Some(3), None);
        assert_eq!(r.responses, 101);
        assert_eq!(r.ok, 100);
        assert_eq!(r.errors, 1 + 2, "one 409 and two connect failures");
        assert_eq!(r.unfinished, 1);
        assert!((r.rps - 50.5).abs() < 1e-9);
        assert!(
            (r.latency_ms.p50 - 51.0).abs() < 0.1,
            "{}",
            r.latency_ms.p50
        );
        assert!(
            (r.latency_ms.p99 - 100.0).abs() < 0.1,
            "{}",
            r.latency_ms.p99
        );
        assert!(
            (r.latency_ms.max - 2000.0).abs() < 2.0,
            "{}",
            r.latency_ms.max
        );
        assert_eq!(r.status["200"], 100);
        assert_eq!(r.status["409"], 1);
        assert_eq!(r.failures["connect"], 2);
        assert_eq!(r.interactions["book"].responses, 1);
        assert_eq!(r.bytes_received, 1005);

        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["mode"], "keep-alive");
        assert_eq!(json["responses"], 101);
        assert_eq!(json["latency_ms"]["p999"], r.latency_ms.p999);
        assert_eq!(json["book_slots"], 3);
        assert!(json.get("idle").is_none());

        let text = r.to_text();
        assert!(
            text.contains("responses   101 (50.5/s), 2xx 100, errors 3"),
            "{text}"
        );
        assert!(text.contains("failures    connect: 2"), "{text}");
    }

    #[test]
    fn an_empty_run_reports_zeroes() {
        let r = Report::new(shape(), &Stats::default(), Duration::ZERO, None, None);
        assert_eq!(r.responses, 0);
        assert_eq!(r.rps, 0.0);
        assert_eq!(r.latency_ms.max, 0.0);
        assert!(r.interactions.is_empty());
    }
}
