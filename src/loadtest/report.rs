//! What a load run measured: statistics of the requests in the measured window (an
//! HdrHistogram of latencies in microseconds, statuses, failures with their first error,
//! bytes, how they went out) merged at the end into a [`Report`] that accounts for every
//! request due, rendered as text for people or JSON for harnesses. Pure bookkeeping: no clocks
//! (times come in as arguments), no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::conn::Failure;
use super::request::Kind;

/// Highest latency the histograms track (longer ones are recorded as this).
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A latency histogram in µs with 3 significant figures: exact to the microsecond below 2,048
/// µs, then 2 µs up to 4,095 µs, the step doubling with each doubling of the value (never
/// coarser than 1/1024 of it).
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .expect("1 ≤ low, high ≥ 2 × low, 3 significant figures are valid bounds")
}

/// The requests of a worker's share of the run that are in the measured window: every request
/// whose outcome came at or after the window's start (requests still in flight from the warm-up
/// included: they held up measured ones). Shared by the workers in shards, merged at the end.
pub struct Stats {
    latency: Histogram<u64>,
    per_kind: [Histogram<u64>; 3],
    status: BTreeMap<u16, u64>,
    failures: BTreeMap<Failure, FailureStat>,
    bytes: u64,
    unfinished: u64,
    /// Requests taken to be sent but not sent: the end came while their connection paused (or,
    /// idle mode, before their connection was attempted).
    not_sent: u64,
    /// Requests due (or, closed loop, sent) in the window.
    in_window: u64,
    /// Requests due (or sent) during the warm-up whose outcome came in the window.
    from_warmup: u64,
    /// Requests sent after their due time because every connection was busy then.
    late: u64,
    reconnects: u64,
    retries: u64,
    /// Responses that came after the window's end (in the drain).
    after_end: u64,
}

/// One kind of failure: how many, and the first one in words.
#[derive(Debug, Clone, Default)]
struct FailureStat {
    count: u64,
    first: Option<(Instant, String)>,
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
            not_sent: 0,
            in_window: 0,
            from_warmup: 0,
            late: 0,
            reconnects: 0,
            retries: 0,
            after_end: 0,
        }
    }
}

/// How a request of the window went out, whatever its outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sending {
    /// It was due (or sent) during the warm-up.
    pub from_warmup: bool,
    /// Every connection was busy at its due time.
    pub late: bool,
    /// New connections opened for it to replace one that had closed.
    pub reconnects: u32,
    /// Sent again on a new connection after the reused one closed under it: not sent at all,
    /// or (HTTP/1.1) an idempotent request (GET, PUT) that got no byte of answer before the
    /// connection closed (RFC 9110 §9.2.2); never a POST that may have been processed.
    pub retried: bool,
}

impl Stats {
    /// Counts a request of the window; then record its outcome with [`Stats::response`],
    /// [`Stats::failure`] or [`Stats::unfinished`].
    pub fn request(&mut self, sending: Sending) {
        if sending.from_warmup {
            self.from_warmup += 1;
        } else {
            self.in_window += 1;
        }
        self.late += u64::from(sending.late);
        self.reconnects += u64::from(sending.reconnects);
        self.retries += u64::from(sending.retried);
    }

    /// A response of `kind` with `status` after `latency` (from the intended send time at a
    /// fixed rate, from the actual one otherwise); `after_end`: it came in the drain.
    pub fn response(
        &mut self,
        kind: Kind,
        status: u16,
        latency: Duration,
        bytes: u64,
        after_end: bool,
    ) {
        let us = (latency.as_micros() as u64).max(1);
        self.latency.saturating_record(us);
        self.per_kind[kind.index()].saturating_record(us);
        *self.status.entry(status).or_default() += 1;
        self.bytes += bytes;
        self.after_end += u64::from(after_end);
    }

    /// A request that got no response, at `at`; `message` (put into words only when it is the
    /// first of its kind here) says why.
    pub fn failure(&mut self, failure: Failure, at: Instant, message: impl FnOnce() -> String) {
        let stat = self.failures.entry(failure).or_default();
        stat.count += 1;
        if stat.first.is_none() {
            stat.first = Some((at, message()));
        }
    }

    /// A request sent but still without a response when the run's time was up.
    pub fn unfinished(&mut self) {
        self.unfinished += 1;
    }

    /// A request taken to be sent but not sent: the run's end came while its connection was
    /// pausing after a failure (or, idle mode, before its connection was attempted).
    pub fn not_sent(&mut self) {
        self.not_sent += 1;
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
        for (failure, theirs) in &other.failures {
            let mine = self.failures.entry(*failure).or_default();
            mine.count += theirs.count;
            if let Some((at, text)) = &theirs.first {
                let earlier = match &mine.first {
                    Some((first, _)) => at < first,
                    None => true,
                };
                if earlier {
                    mine.first = Some((*at, text.clone()));
                }
            }
        }
        self.bytes += other.bytes;
        self.unfinished += other.unfinished;
        self.not_sent += other.not_sent;
        self.in_window += other.in_window;
        self.from_warmup += other.from_warmup;
        self.late += other.late;
        self.reconnects += other.reconnects;
        self.retries += other.retries;
        self.after_end += other.after_end;
    }

    /// Responses recorded.
    pub fn responses(&self) -> u64 {
        self.latency.len()
    }
}

/// Latency percentiles, in milliseconds (to the microsecond).
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
            mean: ms(h.mean().round() as u64),
        }
    }
}

/// One interaction's share of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InteractionReport {
    pub responses: u64,
    pub latency_ms: Latency,
}

/// One kind of failure in a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureReport {
    pub count: u64,
    /// The earliest failure of this kind in the window, in words.
    pub first_error: String,
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
    /// 0 for the idle mode, which has none.
    pub warmup_s: f64,
    pub duration_s: f64,
    /// How long requests in flight at the end were given to finish.
    pub drain_s: f64,
}

/// What the run itself knows beyond its workers' statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// How long the window lasted (the duration, or less when interrupted).
    pub measured: Duration,
    /// Ended early by Ctrl-C.
    pub interrupted: bool,
    /// At a fixed rate: the schedule's count of requests due in the window, of those never
    /// sent, and of those never sent that were due during the warm-up.
    pub schedule: Option<Scheduled>,
}

/// A fixed-rate run's schedule, counted at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub due_in_window: u64,
    pub not_sent: u64,
    pub not_sent_from_warmup: u64,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub shape: RunShape,
    /// The run was ended early by Ctrl-C: the figures are of `measured_s`.
    pub interrupted: bool,
    /// Seconds measured: `duration_s`, or less when interrupted.
    pub measured_s: f64,
    /// Requests to account for: those due in the window at a fixed rate (those sent in it,
    /// closed loop), plus `from_warmup`. Always `responses` + failures + `unfinished` +
    /// `not_sent`.
    pub due: u64,
    /// Of `due`, those that were sent (a connection took them up).
    pub sent: u64,
    /// Of `due`, requests due (or sent) during the warm-up and still without an answer when
    /// the window opened: they held up measured ones.
    pub from_warmup: u64,
    /// Of `sent`, those sent after their due time because every connection was busy then
    /// (fixed rate; their latency counts from the due time).
    pub late: u64,
    /// Responses received in the measured window (any status), and after it in the drain.
    pub responses: u64,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Every request of `due` without a 2xx response: non-2xx responses, failures,
    /// `unfinished` and `not_sent`.
    pub errors: u64,
    /// Responses per second that came within the measured window.
    pub rps: f64,
    pub latency_ms: Latency,
    /// Responses by status code.
    pub status: BTreeMap<String, u64>,
    /// Requests without a response, by cause, each with the first such error.
    pub failures: BTreeMap<String, FailureReport>,
    /// Requests sent and still in flight when the drain was over (or at Ctrl-C). Not in the
    /// latency figures.
    pub unfinished: u64,
    /// Requests due that were never sent: every connection was still busy (or pausing after
    /// failures) at the end; in the idle mode, connections the run ended before attempting.
    /// Not in the latency figures.
    pub not_sent: u64,
    /// New connections opened to replace one the server or a failure had closed.
    pub reconnects: u64,
    /// Requests sent again on a new connection after the reused one closed under them: not
    /// sent at all, or (HTTP/1.1) idempotent requests (GET, PUT) that got no byte of answer
    /// before the connection closed (RFC 9110 §9.2.2); never a POST that may have been
    /// processed.
    pub retries: u64,
    pub bytes_received: u64,
    pub interactions: BTreeMap<String, InteractionReport>,
    /// Distinct free slots booked (booking from a search), when the mix books.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub book_slots: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleReport>,
}

impl Report {
    /// Builds the report of a run.
    pub fn new(
        shape: RunShape,
        stats: &Stats,
        window: Window,
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
        let failed: u64 = stats.failures.values().map(|f| f.count).sum();
        let (not_sent, from_warmup, due) = match window.schedule {
            Some(s) => {
                let from_warmup = stats.from_warmup + s.not_sent_from_warmup;
                let not_sent = s.not_sent + stats.not_sent;
                (not_sent, from_warmup, s.due_in_window + from_warmup)
            }
            None => (
                stats.not_sent,
                stats.from_warmup,
                stats.in_window + stats.from_warmup,
            ),
        };
        let secs = window.measured.as_secs_f64();
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
            interrupted: window.interrupted,
            measured_s: secs,
            due,
            sent: due.saturating_sub(not_sent),
            from_warmup,
            late: stats.late,
            responses,
            ok,
            errors: responses - ok + failed + stats.unfinished + not_sent,
            rps: if secs > 0.0 {
                (responses - stats.after_end) as f64 / secs
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
                .map(|(f, stat)| {
                    let first_error = stat
                        .first
                        .as_ref()
                        .map(|(_, text)| text.clone())
                        .unwrap_or_default();
                    (
                        f.label().to_owned(),
                        FailureReport {
                            count: stat.count,
                            first_error,
                        },
                    )
                })
                .collect(),
            unfinished: stats.unfinished,
            not_sent,
            reconnects: stats.reconnects,
            retries: stats.retries,
            bytes_received: stats.bytes,
            interactions,
            book_slots,
            idle,
        }
    }

    /// Requests accounted for by an outcome: always `due`.
    pub fn accounted(&self) -> u64 {
        let failed: u64 = self.failures.values().map(|f| f.count).sum();
        self.responses + failed + self.unfinished + self.not_sent
    }

    /// Errors per request due (0 when none was due).
    pub fn error_ratio(&self) -> f64 {
        if self.due == 0 {
            0.0
        } else {
            self.errors as f64 / self.due as f64
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
        let when = if self.idle.is_some() {
            format!("held {}s", s.duration_s)
        } else {
            format!("{}s after {}s warm-up", s.duration_s, s.warmup_s)
        };
        let _ = writeln!(out, "ssp-gateway loadtest: {}", s.url);
        let _ = writeln!(
            out,
            "  {} {}, {} connections{streams}, {load}, mix {}, {when}",
            s.mode, s.protocol, s.connections, s.mix
        );
        if self.interrupted {
            let _ = writeln!(
                out,
                "  INTERRUPTED after {:.1}s of the {}s window: partial figures",
                self.measured_s, s.duration_s
            );
        }
        if let Some(idle) = &self.idle {
            let _ = writeln!(
                out,
                "  idle connections: {} of {} open ({} failed) after {:.1}s",
                idle.open, idle.requested, idle.failed, idle.open_after_s
            );
        }
        let mut requests = format!("  requests    due {}", self.due);
        if self.from_warmup > 0 {
            let _ = write!(requests, " ({} from the warm-up)", self.from_warmup);
        }
        let _ = write!(requests, ", sent {}", self.sent);
        if s.rate.is_some() {
            let _ = write!(
                requests,
                " ({} late: every connection busy), not sent {}",
                self.late, self.not_sent
            );
        } else if self.not_sent > 0 {
            // Closed loop too: requests whose connection paused past the end, idle
            // connections never attempted.
            let _ = write!(requests, ", not sent {}", self.not_sent);
        }
        let _ = writeln!(out, "{requests}");
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
        if !self.status.is_empty() {
            let status = self
                .status
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(out, "  status      {status}");
        }
        for (kind, f) in &self.failures {
            let _ = writeln!(
                out,
                "  failures    {kind}: {} (first: {})",
                f.count, f.first_error
            );
        }
        if self.reconnects > 0 || self.retries > 0 {
            let _ = writeln!(
                out,
                "  connections {} reconnects, {} requests sent again on a new connection",
                self.reconnects, self.retries
            );
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
            drain_s: 10.0,
        }
    }

    fn window(secs: u64) -> Window {
        Window {
            measured: Duration::from_secs(secs),
            interrupted: false,
            schedule: None,
        }
    }

    #[test]
    fn merged_stats_give_percentiles_statuses_and_errors() {
        let t0 = Instant::now();
        let mut a = Stats::default();
        let mut b = Stats::default();
        for ms in 1..=100u64 {
            a.request(Sending::default());
            a.response(Kind::Search, 200, Duration::from_millis(ms), 10, false);
        }
        b.request(Sending::default());
        b.response(Kind::Book, 409, Duration::from_secs(2), 5, true);
        b.request(Sending::default());
        b.failure(Failure::Connect, t0 + Duration::from_millis(5), || {
            "second".into()
        });
        b.request(Sending {
            reconnects: 2,
            retried: true,
            ..Sending::default()
        });
        b.failure(Failure::Connect, t0 + Duration::from_millis(9), || {
            unreachable!("only the first of a kind is put into words")
        });
        a.request(Sending::default());
        a.failure(Failure::Connect, t0 + Duration::from_millis(1), || {
            "refused".into()
        });
        b.request(Sending {
            from_warmup: true,
            ..Sending::default()
        });
        b.unfinished();
        a.merge(&b);
        let r = Report::new(shape(), &a, window(2), Some(3), None);
        assert_eq!(r.responses, 101);
        assert_eq!(r.ok, 100);
        assert_eq!(r.due, 105);
        assert_eq!(r.from_warmup, 1);
        assert_eq!(r.accounted(), r.due);
        assert_eq!(
            r.errors,
            1 + 3 + 1,
            "one 409, three connect failures, one unfinished"
        );
        assert_eq!(r.unfinished, 1);
        assert_eq!((r.reconnects, r.retries), (2, 1));
        assert!((r.rps - 50.0).abs() < 1e-9, "the 409 came after the end");
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
        assert_eq!(r.failures["connect"].count, 3);
        assert_eq!(r.failures["connect"].first_error, "refused", "the earliest");
        assert_eq!(r.interactions["book"].responses, 1);
        assert_eq!(r.bytes_received, 1005);

        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["mode"], "keep-alive");
        assert_eq!(json["responses"], 101);
        assert_eq!(json["due"], 105);
        assert_eq!(json["failures"]["connect"]["count"], 3);
        assert_eq!(json["failures"]["connect"]["first_error"], "refused");
        assert_eq!(json["latency_ms"]["p999"], r.latency_ms.p999);
        assert_eq!(json["book_slots"], 3);
        assert!(json.get("idle").is_none());

        let text = r.to_text();
        assert!(
            text.contains("responses   101 (50.0/s), 2xx 100, errors 5"),
            "{text}"
        );
        assert!(
            text.contains("failures    connect: 3 (first: refused)"),
            "{text}"
        );
        assert!(text.contains("due 105 (1 from the warm-up)"), "{text}");
        assert!(
            text.contains("2 reconnects, 1 requests sent again"),
            "{text}"
        );
    }

    #[test]
    fn a_fixed_rate_run_counts_what_was_never_sent() {
        let mut stats = Stats::default();
        for _ in 0..6 {
            stats.request(Sending::default());
            stats.response(Kind::Search, 200, Duration::from_millis(3), 1, false);
        }
        stats.request(Sending {
            late: true,
            ..Sending::default()
        });
        stats.response(Kind::Search, 200, Duration::from_millis(900), 1, false);
        stats.request(Sending {
            from_warmup: true,
            ..Sending::default()
        });
        stats.failure(Failure::Timeout, Instant::now(), || "no answer".into());
        let w = Window {
            measured: Duration::from_secs(1),
            interrupted: false,
            schedule: Some(Scheduled {
                due_in_window: 10,
                not_sent: 4,
                not_sent_from_warmup: 1,
            }),
        };
        let shape = RunShape {
            rate: Some(10.0),
            ..shape()
        };
        let r = Report::new(shape, &stats, w, None, None);
        // 7 sent of the window's 10 (3 not sent), and from the warm-up one answered late and
        // one never sent.
        assert_eq!(r.due, 12);
        assert_eq!(r.from_warmup, 2);
        assert_eq!(r.not_sent, 4);
        assert_eq!(r.sent, 8);
        assert_eq!(r.late, 1);
        assert_eq!(r.accounted(), r.due);
        assert_eq!(r.errors, 5);
        assert!((r.error_ratio() - 5.0 / 12.0).abs() < 1e-12);
        let text = r.to_text();
        assert!(
            text.contains(
                "due 12 (2 from the warm-up), sent 8 (1 late: every connection busy), not sent 4"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_request_taken_but_not_sent_is_not_sent() {
        let mut stats = Stats::default();
        stats.request(Sending::default());
        stats.response(Kind::Search, 200, Duration::from_millis(3), 1, false);
        stats.request(Sending::default());
        stats.not_sent();
        let r = Report::new(shape(), &stats, window(1), None, None);
        assert_eq!((r.due, r.sent, r.not_sent, r.errors), (2, 1, 1, 1));
        assert_eq!(r.accounted(), r.due);
        let text = r.to_text();
        assert!(
            text.contains("due 2, sent 1, not sent 1\n"),
            "closed loop: {text}"
        );
        let all_sent = Report::new(shape(), &Stats::default(), window(1), None, None);
        assert!(!all_sent.to_text().contains("not sent"));
        let w = Window {
            measured: Duration::from_secs(1),
            interrupted: false,
            schedule: Some(Scheduled {
                due_in_window: 3,
                not_sent: 1,
                not_sent_from_warmup: 0,
            }),
        };
        let r = Report::new(shape(), &stats, w, None, None);
        assert_eq!((r.due, r.sent, r.not_sent, r.errors), (3, 1, 2, 2));
    }

    #[test]
    fn an_empty_run_reports_zeroes() {
        let r = Report::new(shape(), &Stats::default(), window(0), None, None);
        assert_eq!(r.responses, 0);
        assert_eq!(r.due, 0);
        assert_eq!(r.error_ratio(), 0.0);
        assert_eq!(r.rps, 0.0);
        assert_eq!(r.latency_ms.max, 0.0);
        assert!(r.interactions.is_empty());
    }

    #[test]
    fn the_mean_is_to_the_microsecond_and_the_histogram_exact_below_2048_us() {
        let mut stats = Stats::default();
        for us in [1000u64, 1001, 1001] {
            stats.request(Sending::default());
            stats.response(Kind::Search, 200, Duration::from_micros(us), 0, false);
        }
        let r = Report::new(shape(), &stats, window(1), None, None);
        assert_eq!(r.latency_ms.mean, 1.001, "1000.67 µs rounds to 1.001 ms");
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["latency_ms"]["mean"], 1.001);
        // What the README says of the resolution: 1 µs up to 2,047 µs, then 2 µs to 4,095 µs,
        // doubling with each doubling of the value (never coarser than 1/1024 of it).
        let h = histogram();
        assert_eq!(h.equivalent_range(2047), 1);
        assert_eq!(h.equivalent_range(2048), 2);
        assert_eq!(h.equivalent_range(4095), 2);
        assert_eq!(h.equivalent_range(4096), 4);
        assert_eq!(h.equivalent_range(1_048_576), 1024);
    }

    #[test]
    fn an_interrupted_idle_run_says_so_and_claims_no_warm_up() {
        let mut shape = shape();
        shape.mode = "idle";
        shape.warmup_s = 0.0;
        let w = Window {
            measured: Duration::from_millis(1500),
            interrupted: true,
            schedule: None,
        };
        let idle = IdleReport {
            requested: 3,
            open: 3,
            failed: 0,
            open_after_s: 0.1,
        };
        let r = Report::new(shape, &Stats::default(), w, None, Some(idle));
        let text = r.to_text();
        assert!(!text.contains("warm-up"), "{text}");
        assert!(text.contains("held 2s"), "{text}");
        assert!(text.contains("INTERRUPTED after 1.5s"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["interrupted"], true);
        assert_eq!(json["measured_s"], 1.5);
    }
}
