//! Per-provider circuit breaking: after `failure_threshold` consecutive failed calls to one
//! endpoint host (`host:port`) — the connection could not be made, the request was sent and no
//! usable answer came (no head in time, the connection closed or reset before the head, a head
//! that does not parse or is malformed), or the response body stalled or broke off — calls to
//! that host fail fast for `cool_down`; then exactly one probe goes through (half-open): its
//! success closes the circuit, its failure opens it for another cool-down. Pure state over
//! atomics with the clock passed in: this module never does I/O, never sleeps, and never decides
//! where a request goes (the target is `authorise`'s answer; this only says "not now").
//!
//! # Wiring (for the forwarder)
//!
//! ```text
//! let key = breaker::endpoint_key(target.authority());   // "localhost:9443"
//! let ticket = match breakers.before(&key, Instant::now()) {
//!     Ok(ticket) => ticket,
//!     Err(open) => return Err(502 ERROR_COMMUNICATING_TO_ENDPOINT_URL_<url>),  // reason circuit_open
//! };
//! match send(request).await {
//!     Ok(response_head)               => response_body.carries(ticket),  // verdict below
//!     Ok(malformed head: 1xx, TE with CL, TE not chunked alone)
//!                                     => ticket.failure(Instant::now()),
//!     Err(connect error or TLS error) => ticket.failure(Instant::now()),
//!     Err(response timeout)           => ticket.failure(Instant::now()),
//!     Err(closed, reset or unparsable before the head)
//!                                     => ticket.failure(Instant::now()),
//!     Err(the consumer's request body stalled, broke or went past the cap)
//!                                     => drop(ticket),       // no verdict
//! }
//! // When the response body ends (`forward::UpstreamBody`):
//! match body_end {
//!     reached its end (or was empty)  => ticket.success(),   // any status, 5xx included
//!     idle timeout, or hyper's body error (reset, closed early, bad chunks)
//!                                     => ticket.failure(Instant::now()),
//!     dropped before its end          => drop(ticket),       // no verdict
//! }
//! ```
//!
//! So a call is judged by the provider's whole answer: one that takes a request and hangs up,
//! answers garbage, or sends a head and then stalls or breaks off counts against its circuit as
//! one that never answered does, while a 5xx with a complete body is an answer. Only what the
//! consumer did gives no verdict: it went away before the answer's end, or its own request body
//! stalled, broke or went past the cap (the provider's connection goes with it), before the
//! head or during the body.
//!
//! A ticket dropped without a verdict changes nothing, except a half-open probe's: the circuit
//! stays half-open and its probe's place is free, so the next call becomes the probe (no state
//! change is reported: `ssp_upstream_circuits{state="half_open"}` still counts the host). So
//! a lost probe can never wedge a host open, nor let calls past an open circuit: while it is
//! half-open at most one call at a time reaches the provider, and an open one lets none through
//! before its cool-down is over. A probe's verdict comes at its body's end, so the host stays
//! half-open (refusing other calls) while the probe's body streams. Hosts come from the
//! directory's registered endpoints, so the set is small; it is bounded by `max_hosts` all the
//! same (a host that is closed with no failures is forgotten to make room; past that, new hosts
//! go untracked). Each change of a host's state is reported once, as it happens, to the
//! [`Observer`] given to [`Breakers::with_observer`] (the forwarder counts it in the metrics, by
//! state only, and logs it naming the host).
//!
//! # Retries: only connect failures, never a request a provider may have processed
//!
//! GP Connect writes (book, amend, cancel, register) are not idempotent: a request that
//! reached the provider must never be sent twice. So a retry is allowed only when
//! [`is_retryable_connect_error`] says the client's connector failed — TCP connect refused or
//! timed out, or the TLS handshake failed — because then no connection existed to write the
//! request to. Never retry a response timeout, a connection reset or closed after the request
//! was written (hyper's `IncompleteMessage`), a body error, or any HTTP response (a provider's
//! 5xx is its answer, passed back unchanged). Each attempt takes its own ticket and reports its
//! own failure, and an open circuit ends the retries. Retries go to the same registered
//! endpoint, at most `[upstream] connect_retries` of them, all within the response timeout.
//!
//! The request body is a stream that `Client::request` takes by value. The forwarder wraps it
//! in `forward::Reclaimable`, which hands the stream back, unread, when the client drops the
//! request without sending it; a body that was asked for even one frame is never handed back,
//! and then the request is not retried. Nothing is buffered to make a retry possible (the SSP
//! streams payloads of any size).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

/// Consecutive failures that open a host's circuit.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
/// How long an open circuit fails fast before letting a probe through.
pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(30);
/// Most hosts tracked (and reported in the metric).
pub const DEFAULT_MAX_HOSTS: usize = 1_024;

/// What the breakers enforce. Plain values; [`Breakers::new`] validates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    pub failure_threshold: u32,
    pub cool_down: Duration,
    pub max_hosts: usize,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            cool_down: DEFAULT_COOL_DOWN,
            max_hosts: DEFAULT_MAX_HOSTS,
        }
    }
}

/// One thing wrong with a breaker policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyProblem {
    #[error("failure_threshold must be at least 1")]
    ZeroThreshold,
    #[error("cool_down must be longer than zero")]
    ZeroCoolDown,
    #[error("cool_down {0:?} is too long (at most a year)")]
    CoolDownTooLong(Duration),
    #[error("max_hosts must be at least 1")]
    ZeroMaxHosts,
}

/// A policy that cannot be enforced; every problem is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid circuit breaker policy:{}", .0.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
pub struct PolicyError(pub Vec<PolicyProblem>);

/// A host's circuit state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// Told of every change of a host's circuit state, once, by the call that made it:
/// `(host, from, to)`. It runs on the request path: it must be quick and never block.
pub type Observer = Arc<dyn Fn(&str, State, State) + Send + Sync>;

/// The circuit to `host` is open: fail fast (502) without calling the provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit to {host} is open{}", match .retry_after { Some(d) => format!(" for {d:?} more"), None => " (a probe is in flight)".to_string() })]
pub struct Open {
    pub host: String,
    /// Cool-down left; `None` while the half-open probe is in flight.
    pub retry_after: Option<Duration>,
}

/// A call's permission to go to the provider; report how it went with [`Ticket::success`] or
/// [`Ticket::failure`], or drop it for no verdict.
#[derive(Debug)]
#[must_use = "report the call's outcome with success() or failure()"]
pub struct Ticket {
    /// `None`: the host is not tracked (the host set is full); verdicts are ignored.
    host: Option<Arc<Host>>,
    /// `Some(word)`: this is the half-open probe, installed as `word`.
    probe: Option<u64>,
    clock: Clock,
    settled: bool,
}

impl Ticket {
    /// Whether this call is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }

    /// The provider answered, its response body whole (any HTTP status): resets the failure
    /// count; a probe closes the circuit.
    pub fn success(mut self) {
        self.settled = true;
        let Some(host) = &self.host else { return };
        host.failures.store(0, Ordering::Release);
        if let Some(word) = self.probe {
            // Only this probe's own half-open state is closed (never a newer one).
            if host
                .word
                .compare_exchange(
                    word,
                    pack(State::Closed, 0),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
            {
                host.changed(State::HalfOpen, State::Closed);
            }
        }
    }

    /// The call failed to connect, failed the TLS handshake, got no usable response head (none
    /// in time, the connection closed or reset before it, or one that does not parse or is
    /// malformed), or its response body stalled or broke off, at `now`: counts towards opening;
    /// a probe's failure opens the circuit for another cool-down.
    pub fn failure(mut self, now: Instant) {
        self.settled = true;
        let Some(host) = &self.host else { return };
        let t = self.clock.nanos(now);
        match self.probe {
            Some(word) => {
                if host
                    .word
                    .compare_exchange(
                        word,
                        pack(State::Open, t),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
                {
                    host.changed(State::HalfOpen, State::Open);
                }
            }
            None => {
                let failures = host
                    .failures
                    .fetch_add(1, Ordering::AcqRel)
                    .saturating_add(1);
                if failures >= self.clock.threshold {
                    let mut current = host.word.load(Ordering::Acquire);
                    // Open only from closed: a host already open or probing keeps its state.
                    while unpack(current).0 == State::Closed {
                        match host.word.compare_exchange_weak(
                            current,
                            pack(State::Open, t),
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        ) {
                            Ok(_) => {
                                host.changed(State::Closed, State::Open);
                                break;
                            }
                            Err(w) => current = w,
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let (Some(host), Some(word)) = (&self.host, self.probe) {
            // A probe with no verdict (the consumer went away, or its own request body failed):
            // still half-open, with the probe's place free for the next call. Not a change of
            // state, so nothing is reported.
            let (_, since) = unpack(word);
            let _ = host.word.compare_exchange(
                word,
                pack_vacant(since),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }
}

/// What a ticket needs of the policy, copied in.
#[derive(Debug, Clone, Copy)]
struct Clock {
    epoch: Instant,
    threshold: u32,
    cool_down: i64,
}

impl Clock {
    /// Nanoseconds since the epoch, signed (a reading from before construction works), kept
    /// within the 62 bits a state word holds.
    fn nanos(&self, now: Instant) -> i64 {
        let t = match now.checked_duration_since(self.epoch) {
            Some(d) => i64::try_from(d.as_nanos()).unwrap_or(TIME_LIMIT),
            None => {
                let back = self.epoch.duration_since(now).as_nanos();
                -i64::try_from(back).unwrap_or(TIME_LIMIT)
            }
        };
        t.clamp(-TIME_LIMIT, TIME_LIMIT)
    }
}

/// Times in a state word are biased by this to be non-negative (about 36 years either way).
const TIME_LIMIT: i64 = 1 << 60;

/// A state and the time it was entered, in one word: `(time + TIME_LIMIT) << 2 | state`. A
/// half-open word made here has its probe in flight; [`pack_vacant`] makes one whose probe's
/// place is free.
fn pack(state: State, t: i64) -> u64 {
    let biased = (t.clamp(-TIME_LIMIT, TIME_LIMIT) + TIME_LIMIT) as u64;
    (biased << 2) | u64::from(state as u8)
}

/// The low bits of a half-open word whose probe ended without a verdict: the next call probes.
const VACANT: u64 = 3;

/// Half-open since `t`, with no probe in flight.
fn pack_vacant(t: i64) -> u64 {
    (pack(State::HalfOpen, t) & !3) | VACANT
}

fn unpack(word: u64) -> (State, i64) {
    let state = match word & 3 {
        1 => State::Open,
        2 | VACANT => State::HalfOpen,
        _ => State::Closed,
    };
    (state, (word >> 2) as i64 - TIME_LIMIT)
}

struct Host {
    word: AtomicU64,
    failures: AtomicU32,
    /// The key (`host:port`), for the observer.
    name: Box<str>,
    observer: Option<Observer>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.name)
            .field("state", &unpack(self.word.load(Ordering::Acquire)).0)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl Host {
    fn new(name: &str, observer: Option<Observer>) -> Host {
        Host {
            word: AtomicU64::new(pack(State::Closed, 0)),
            failures: AtomicU32::new(0),
            name: name.into(),
            observer,
        }
    }

    /// Reports a state change this call made (its compare-exchange succeeded).
    fn changed(&self, from: State, to: State) {
        if let Some(observer) = &self.observer {
            observer(&self.name, from, to);
        }
    }

    fn is_idle(&self) -> bool {
        unpack(self.word.load(Ordering::Acquire)).0 == State::Closed
            && self.failures.load(Ordering::Acquire) == 0
    }
}

/// The circuit breakers of every upstream host. See the module doc.
pub struct Breakers {
    clock: Clock,
    max_hosts: usize,
    /// Read lock-free on every call; replaced whole (copy on write) when a new host appears.
    hosts: ArcSwap<HashMap<Box<str>, Arc<Host>>>,
    untracked: AtomicU64,
    observer: Option<Observer>,
}

impl std::fmt::Debug for Breakers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breakers")
            .field("clock", &self.clock)
            .field("max_hosts", &self.max_hosts)
            .field("hosts", &self.hosts)
            .field("untracked", &self.untracked)
            .field("observed", &self.observer.is_some())
            .finish()
    }
}

impl Breakers {
    /// Validates `policy` (every problem reported at once) and builds the breakers.
    pub fn new(policy: BreakerPolicy) -> Result<Breakers, PolicyError> {
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        let mut problems = Vec::new();
        if policy.failure_threshold == 0 {
            problems.push(PolicyProblem::ZeroThreshold);
        }
        if policy.cool_down.is_zero() {
            problems.push(PolicyProblem::ZeroCoolDown);
        } else if policy.cool_down > YEAR {
            problems.push(PolicyProblem::CoolDownTooLong(policy.cool_down));
        }
        if policy.max_hosts == 0 {
            problems.push(PolicyProblem::ZeroMaxHosts);
        }
        if !problems.is_empty() {
            return Err(PolicyError(problems));
        }
        Ok(Breakers {
            clock: Clock {
                epoch: Instant::now(),
                threshold: policy.failure_threshold,
                // Checked above: at most a year, which fits in i64 nanoseconds.
                cool_down: policy.cool_down.as_nanos() as i64,
            },
            max_hosts: policy.max_hosts,
            hosts: ArcSwap::from_pointee(HashMap::new()),
            untracked: AtomicU64::new(0),
            observer: None,
        })
    }

    /// Reports every state change of every host's circuit to `observer` (set before the first
    /// call: hosts already tracked keep reporting to the observer they were created with).
    pub fn with_observer(mut self, observer: Observer) -> Breakers {
        self.observer = Some(observer);
        self
    }

    /// May a call go to `host` (`host:port`, see [`endpoint_key`]) at `now`? A closed circuit
    /// lets every call through; an open one refuses until its cool-down is over, then gives
    /// exactly one caller the probe ticket and refuses the rest until the probe reports (or,
    /// dropped without a verdict, leaves its place to the next caller).
    pub fn before(&self, host: &str, now: Instant) -> Result<Ticket, Open> {
        let Some(entry) = self.host(host) else {
            self.untracked.fetch_add(1, Ordering::Relaxed);
            return Ok(self.ticket(None, None));
        };
        let t = self.clock.nanos(now);
        let mut word = entry.word.load(Ordering::Acquire);
        loop {
            let (state, since) = unpack(word);
            match state {
                State::Closed => return Ok(self.ticket(Some(entry), None)),
                State::HalfOpen if word & 3 == VACANT => {
                    // The last probe ended without a verdict: this call takes its place. Still
                    // half-open: no change to report.
                    let probing = pack(State::HalfOpen, t);
                    match entry.word.compare_exchange(
                        word,
                        probing,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return Ok(self.ticket(Some(entry), Some(probing))),
                        Err(current) => word = current,
                    }
                }
                State::HalfOpen => {
                    return Err(Open {
                        host: host.to_string(),
                        retry_after: None,
                    })
                }
                State::Open => {
                    let elapsed = t.saturating_sub(since);
                    if elapsed < self.clock.cool_down {
                        return Err(Open {
                            host: host.to_string(),
                            retry_after: Some(Duration::from_nanos(
                                (self.clock.cool_down - elapsed) as u64,
                            )),
                        });
                    }
                    let probing = pack(State::HalfOpen, t);
                    match entry.word.compare_exchange(
                        word,
                        probing,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => {
                            entry.changed(State::Open, State::HalfOpen);
                            return Ok(self.ticket(Some(entry), Some(probing)));
                        }
                        Err(current) => word = current,
                    }
                }
            }
        }
    }

    /// Whether [`before`](Self::before) would refuse a call to `host` at `now` (open within its
    /// cool-down, or half-open with its probe out), without taking a ticket or tracking the
    /// host: for refusing before anything is done for the call. A call it lets through may
    /// still be refused by `before`, which decides.
    pub fn refuses(&self, host: &str, now: Instant) -> bool {
        let hosts = self.hosts.load();
        let Some(entry) = hosts.get(host) else {
            return false;
        };
        let word = entry.word.load(Ordering::Acquire);
        match unpack(word) {
            (State::Closed, _) => false,
            (State::HalfOpen, _) => word & 3 != VACANT,
            (State::Open, since) => {
                self.clock.nanos(now).saturating_sub(since) < self.clock.cool_down
            }
        }
    }

    /// Each tracked host's state, sorted by host (at most `max_hosts` rows).
    #[cfg(test)]
    fn snapshot(&self) -> Vec<(String, State)> {
        let hosts = self.hosts.load();
        let mut rows: Vec<(String, State)> = hosts
            .iter()
            .map(|(h, e)| (h.to_string(), unpack(e.word.load(Ordering::Acquire)).0))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    }

    /// One host's state, if tracked.
    #[cfg(test)]
    fn state(&self, host: &str) -> Option<State> {
        self.hosts
            .load()
            .get(host)
            .map(|e| unpack(e.word.load(Ordering::Acquire)).0)
    }

    /// Calls let through untracked because the host set was full (for a counter).
    pub fn untracked_total(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }

    fn ticket(&self, host: Option<Arc<Host>>, probe: Option<u64>) -> Ticket {
        Ticket {
            host,
            probe,
            clock: self.clock,
            settled: false,
        }
    }

    /// The host's entry, added on first sight; `None` when the set is full of hosts with
    /// something to remember.
    fn host(&self, host: &str) -> Option<Arc<Host>> {
        if let Some(entry) = self.hosts.load().get(host) {
            return Some(entry.clone());
        }
        let mut found = None;
        self.hosts.rcu(|hosts| {
            found = hosts.get(host).cloned();
            if found.is_some() {
                return Arc::clone(hosts);
            }
            let mut next = HashMap::clone(hosts);
            if next.len() >= self.max_hosts {
                next.retain(|_, e| !e.is_idle());
            }
            if next.len() >= self.max_hosts {
                return Arc::clone(hosts);
            }
            let entry = Arc::new(Host::new(host, self.observer.clone()));
            found = Some(entry.clone());
            next.insert(host.into(), entry);
            Arc::new(next)
        });
        found
    }
}

/// The breaker key of a target's authority: `host:port`, with the default port 443 added when
/// the URL has none (`localhost` and `localhost:443` are one host).
pub fn endpoint_key(authority: &str) -> std::borrow::Cow<'_, str> {
    let has_port = match authority.rfind(']') {
        Some(close) => authority[close..].contains(':'),
        None => authority.contains(':'),
    };
    if has_port {
        // The common case (registered endpoints carry their port): no copy per request.
        std::borrow::Cow::Borrowed(authority)
    } else {
        std::borrow::Cow::Owned(format!("{authority}:443"))
    }
}

/// Whether a failed upstream call may be retried: only when the client's connector failed (TCP
/// connect or TLS handshake), so no byte of the request reached the provider. See the module
/// doc for the rest of the retry rules.
pub fn is_retryable_connect_error(err: &hyper_util::client::legacy::Error) -> bool {
    err.is_connect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Barrier;

    const H: &str = "provider.example:443";
    const COOL: Duration = Duration::from_secs(10);

    fn breakers(threshold: u32, max_hosts: usize) -> Breakers {
        Breakers::new(BreakerPolicy {
            failure_threshold: threshold,
            cool_down: COOL,
            max_hosts,
        })
        .expect("valid policy")
    }

    /// Every state change is reported once, by the call that made it, with the host: the
    /// forwarder counts and logs them (before, a gauge per host was set after each verdict, and
    /// every refused call logged a warning).
    #[test]
    fn each_state_change_is_reported_once() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let b = breakers(3, 8).with_observer(Arc::new(move |host, from, to| {
            log.lock().expect("lock").push((host.to_owned(), from, to));
        }));
        let t0 = Instant::now();
        fail(&b, H, t0, 3);
        // Refused calls and late failures while open change nothing.
        for _ in 0..5 {
            assert!(b.before(H, t0).is_err());
        }
        let late = COOL + Duration::from_secs(1);
        let probe = b.before(H, t0 + late).expect("probe");
        probe.failure(t0 + late);
        let probe = b.before(H, t0 + late * 2).expect("probe");
        // Dropped without a verdict: still half-open, the next call probes (no change).
        drop(probe);
        let probe = b.before(H, t0 + late * 2).expect("probe again");
        probe.success();
        b.before(H, t0 + late * 2).expect("closed").success();
        use State::*;
        let host = |from, to| (H.to_owned(), from, to);
        assert_eq!(
            *seen.lock().expect("lock"),
            [
                host(Closed, Open),
                host(Open, HalfOpen),
                host(HalfOpen, Open),
                host(Open, HalfOpen),
                host(HalfOpen, Closed),
            ]
        );
    }

    /// Many threads failing at once open the circuit once, and it is reported once.
    #[test]
    fn concurrent_failures_report_one_opening() {
        let opened = Arc::new(AtomicUsize::new(0));
        let count = opened.clone();
        let b = Arc::new(breakers(2, 8).with_observer(Arc::new(move |_, _, to| {
            if to == State::Open {
                count.fetch_add(1, Ordering::SeqCst);
            }
        })));
        let now = Instant::now();
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (b, barrier) = (b.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let ticket = b.before(H, now);
                    barrier.wait();
                    if let Ok(ticket) = ticket {
                        ticket.failure(now);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1);
    }

    fn fail(b: &Breakers, host: &str, now: Instant, n: usize) {
        for _ in 0..n {
            b.before(host, now).expect("closed").failure(now);
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_fails_fast_for_the_cool_down() {
        let t0 = Instant::now();
        let b = breakers(3, 16);
        fail(&b, H, t0, 2);
        b.before(H, t0).expect("closed").success();
        fail(&b, H, t0, 2);
        assert_eq!(b.state(H), Some(State::Closed), "a success reset the count");
        fail(&b, H, t0, 1);
        assert_eq!(b.state(H), Some(State::Open));

        let open = b.before(H, t0 + Duration::from_secs(4)).expect_err("open");
        assert_eq!(open.retry_after, Some(Duration::from_secs(6)));
        assert_eq!(
            open.to_string(),
            "circuit to provider.example:443 is open for 6s more"
        );
        assert!(b.before(H, t0 + COOL - Duration::from_nanos(1)).is_err());
        // Other hosts are not affected.
        b.before("other.example:443", t0).expect("closed").success();
    }

    /// `refuses` says what `before` would, without taking a ticket: never for a host it does
    /// not track or a closed circuit, always while open within the cool-down and while a probe
    /// is out, and not once the cool-down is over (the next call is the probe).
    #[test]
    fn refuses_agrees_with_before_and_takes_nothing() {
        let t0 = Instant::now();
        let b = breakers(1, 16);
        assert!(!b.refuses(H, t0), "untracked");
        assert_eq!(b.state(H), None, "a look does not track the host");
        b.before(H, t0).expect("closed").success();
        assert!(!b.refuses(H, t0), "closed");
        fail(&b, H, t0, 1);
        assert!(b.refuses(H, t0 + COOL / 2), "open");
        assert!(b.before(H, t0 + COOL / 2).is_err());
        let t1 = t0 + COOL;
        assert!(!b.refuses(H, t1), "the cool-down is over");
        assert!(!b.refuses(H, t1), "looking twice takes no probe");
        let probe = b.before(H, t1).expect("the probe");
        assert!(b.refuses(H, t1), "the probe is out");
        drop(probe);
        assert!(!b.refuses(H, t1), "the dropped probe's place is free");
    }

    #[test]
    fn half_open_probe_success_closes_and_failure_reopens() {
        let t0 = Instant::now();
        let b = breakers(1, 16);
        fail(&b, H, t0, 1);

        let t1 = t0 + COOL;
        let probe = b.before(H, t1).expect("the probe");
        assert!(probe.is_probe());
        assert_eq!(b.state(H), Some(State::HalfOpen));
        let busy = b.before(H, t1).expect_err("one probe at a time");
        assert_eq!(busy.retry_after, None);
        probe.failure(t1);
        assert_eq!(b.state(H), Some(State::Open));
        let again = b.before(H, t1 + Duration::from_secs(1)).expect_err("open");
        assert_eq!(
            again.retry_after,
            Some(COOL - Duration::from_secs(1)),
            "a fresh cool-down from the probe's failure"
        );

        let t2 = t1 + COOL;
        let probe = b.before(H, t2).expect("the next probe");
        probe.success();
        assert_eq!(b.state(H), Some(State::Closed));
        let normal = b.before(H, t2).expect("closed");
        assert!(!normal.is_probe());
        normal.success();
    }

    /// A probe dropped without a verdict (the consumer went away) leaves the circuit half-open
    /// with its place free: the next call becomes the probe, and the one after it is refused
    /// while it is in flight. Before, the circuit went back to open with its cool-down spent,
    /// reported as a change each time, so with every probe lost every call reached the provider
    /// while the metric said open.
    #[test]
    fn a_dropped_probe_lets_the_next_call_probe_and_no_more() {
        let changes = Arc::new(AtomicUsize::new(0));
        let count = changes.clone();
        let b = breakers(1, 16).with_observer(Arc::new(move |_, _, _| {
            count.fetch_add(1, Ordering::SeqCst);
        }));
        let t0 = Instant::now();
        fail(&b, H, t0, 1);
        let t1 = t0 + COOL;
        for _ in 0..5 {
            let probe = b.before(H, t1).expect("the probe");
            assert!(probe.is_probe());
            let refused = b.before(H, t1).expect_err("one probe at a time");
            assert_eq!(refused.retry_after, None);
            drop(probe);
            assert_eq!(b.state(H), Some(State::HalfOpen));
        }
        // Opened, then half-open once: the lost probes changed nothing.
        assert_eq!(changes.load(Ordering::SeqCst), 2);
        // The probe that takes a free place gives its verdict as any probe: a failure opens
        // the circuit for a fresh cool-down, a success closes it.
        let probe = b.before(H, t1).expect("probe again");
        probe.failure(t1);
        assert_eq!(b.state(H), Some(State::Open));
        let open = b.before(H, t1).expect_err("open");
        assert_eq!(open.retry_after, Some(COOL));
        let t2 = t1 + COOL;
        drop(b.before(H, t2).expect("probe"));
        let probe = b.before(H, t2).expect("probe again");
        assert!(probe.is_probe());
        probe.success();
        assert_eq!(b.state(H), Some(State::Closed));
        assert!(!b.before(H, t2).expect("closed").is_probe());
    }

    #[test]
    fn late_verdicts_of_ordinary_calls_do_not_close_an_open_circuit() {
        let t0 = Instant::now();
        let b = breakers(2, 16);
        let slow = b.before(H, t0).expect("closed");
        fail(&b, H, t0, 2);
        assert_eq!(b.state(H), Some(State::Open));
        slow.success();
        assert_eq!(b.state(H), Some(State::Open), "only the probe closes");
        // And a stale probe's verdict does not touch a newer state.
        let t1 = t0 + COOL;
        let probe = b.before(H, t1).expect("probe");
        probe.success();
        let late = b.before(H, t1).expect("closed");
        fail(&b, H, t1, 2);
        late.failure(t1 + Duration::from_secs(1));
        let open = b.before(H, t1 + Duration::from_secs(1)).expect_err("open");
        assert_eq!(open.retry_after, Some(COOL - Duration::from_secs(1)));
    }

    #[test]
    fn exactly_one_probe_under_many_threads() {
        const THREADS: usize = 8;
        let t0 = Instant::now();
        let b = Arc::new(breakers(1, 16));
        fail(&b, H, t0, 1);
        for round in 1..=50u32 {
            let now = t0 + COOL * round;
            let barrier = Arc::new(Barrier::new(THREADS));
            let probes = Arc::new(AtomicUsize::new(0));
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    let b = b.clone();
                    let barrier = barrier.clone();
                    let probes = probes.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        let mut mine = Vec::new();
                        for _ in 0..100 {
                            if let Ok(ticket) = b.before(H, now) {
                                probes.fetch_add(1, Ordering::SeqCst);
                                mine.push(ticket);
                            }
                        }
                        mine
                    })
                })
                .collect();
            let mut tickets: Vec<Ticket> = handles
                .into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect();
            assert_eq!(probes.load(Ordering::SeqCst), 1, "round {round}");
            let probe = tickets.pop().expect("one ticket");
            assert!(probe.is_probe());
            probe.failure(now);
        }
    }

    #[test]
    fn failures_from_many_threads_open_once() {
        const THREADS: usize = 8;
        let t0 = Instant::now();
        let b = Arc::new(breakers(100, 16));
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let b = b.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut refused = 0;
                    for _ in 0..100 {
                        match b.before(H, t0) {
                            Ok(ticket) => ticket.failure(t0),
                            Err(_) => refused += 1,
                        }
                    }
                    refused
                })
            })
            .collect();
        let refused: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
        assert_eq!(b.state(H), Some(State::Open));
        // At least the threshold got through before it opened; the rest failed fast.
        assert!(refused <= THREADS * 100 - 100, "{refused}");
        assert!(refused > 0);
    }

    #[test]
    fn the_host_set_is_bounded_and_forgets_only_idle_hosts() {
        let t0 = Instant::now();
        let b = breakers(1, 3);
        fail(&b, "a:443", t0, 1);
        fail(&b, "b:443", t0, 1);
        b.before("c:443", t0).expect("closed").success();
        // "c" is idle (closed, no failures): forgotten to make room for "d".
        b.before("d:443", t0).expect("closed").failure(t0);
        assert_eq!(
            b.snapshot(),
            vec![
                ("a:443".to_string(), State::Open),
                ("b:443".to_string(), State::Open),
                ("d:443".to_string(), State::Open),
            ]
        );
        // Full of hosts with something to remember: a new host goes untracked (fail open),
        // and its verdicts are ignored.
        let t = b.before("e:443", t0).expect("untracked");
        t.failure(t0);
        b.before("e:443", t0).expect("still untracked").success();
        assert_eq!(b.untracked_total(), 2);
        assert_eq!(b.snapshot().len(), 3);
        assert_eq!(
            b.snapshot().iter().map(|(_, s)| *s).collect::<Vec<_>>(),
            vec![State::Open; 3]
        );
    }

    #[test]
    fn bad_policies_are_refused_with_every_problem() {
        let err = Breakers::new(BreakerPolicy {
            failure_threshold: 0,
            cool_down: Duration::ZERO,
            max_hosts: 0,
        })
        .expect_err("invalid");
        assert_eq!(
            err.0,
            vec![
                PolicyProblem::ZeroThreshold,
                PolicyProblem::ZeroCoolDown,
                PolicyProblem::ZeroMaxHosts
            ]
        );
        let long = Breakers::new(BreakerPolicy {
            cool_down: Duration::from_secs(400 * 24 * 3600),
            ..BreakerPolicy::default()
        });
        assert!(matches!(
            long.expect_err("too long").0[..],
            [PolicyProblem::CoolDownTooLong(_)]
        ));
        assert!(Breakers::new(BreakerPolicy::default()).is_ok());
    }

    #[test]
    fn clock_readings_before_construction_work() {
        let t0 = Instant::now();
        let past = t0.checked_sub(Duration::from_secs(5)).unwrap_or(t0);
        let b = breakers(1, 4);
        fail(&b, H, past, 1);
        assert!(b.before(H, past + COOL - Duration::from_secs(1)).is_err());
        assert!(b.before(H, past + COOL).expect("probe").is_probe());
    }

    #[test]
    fn endpoint_keys_carry_the_port() {
        assert_eq!(endpoint_key("localhost:9443"), "localhost:9443");
        assert_eq!(endpoint_key("provider.example"), "provider.example:443");
        assert_eq!(endpoint_key("[::1]"), "[::1]:443");
        assert_eq!(endpoint_key("[::1]:8443"), "[::1]:8443");
    }

    #[test]
    fn pack_round_trips_within_the_time_range() {
        for t in [-TIME_LIMIT, -1, 0, 1, 123_456_789, TIME_LIMIT] {
            for s in [State::Closed, State::Open, State::HalfOpen] {
                assert_eq!(unpack(pack(s, t)), (s, t));
            }
            assert_eq!(unpack(pack_vacant(t)), (State::HalfOpen, t));
            assert_ne!(pack_vacant(t), pack(State::HalfOpen, t));
        }
    }

    /// Only a failed connector is retryable: a refused connection is; a connection that was
    /// accepted and then closed after the request was written is not.
    #[tokio::test]
    async fn only_connect_failures_are_retryable() {
        use http_body_util::Empty;
        use hyper_util::client::legacy::{connect::HttpConnector, Client};
        use hyper_util::rt::TokioExecutor;

        let client: Client<HttpConnector, Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());

        // A port with nothing listening: bind, note the port, close.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let uri: http::Uri = format!("http://127.0.0.1:{port}/x").parse().expect("uri");
        let err = client.get(uri).await.expect_err("refused");
        assert!(is_retryable_connect_error(&err), "{err:?}");

        // A peer that reads the request and hangs up without answering.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            if let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
            }
        });
        let uri: http::Uri = format!("http://{addr}/x").parse().expect("uri");
        let err = client.get(uri).await.expect_err("closed mid-request");
        assert!(!is_retryable_connect_error(&err), "{err:?}");
        server.await.expect("server task");
    }
}
