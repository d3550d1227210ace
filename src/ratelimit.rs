//! Per-consumer rate limiting (a token bucket per `Ssp-From` ASID) and global load shedding (a
//! bound on requests in flight). Pure decisions over atomics, with the clock passed in: this
//! module never sleeps, never queues a request and never does I/O. It says "allowed" or
//! "denied, retry in N s"; the request path turns a denial into the 429/503 answer.
//!
//! # The token bucket
//!
//! Each ASID has a bucket of `burst` tokens refilled at `requests` per `per`; a request takes
//! one token or is denied. It is kept as one 64-bit "theoretical arrival time" (the GCRA form
//! of a token bucket): a check is one compare-and-swap, so concurrent requests from one
//! consumer never over-admit and never wait on a lock. Over any window of length `d` a bucket
//! admits at most `burst + requests * d / per` requests (the refill interval is rounded up to
//! a whole nanosecond, never down).
//!
//! Buckets live in a sharded map (the shard chosen by a randomly keyed hash, so a flood cannot
//! aim at one shard). Lookups take one shard's read lock; only an ASID's first request takes a
//! shard's write lock. ASIDs with an override are held apart in a map built once and never
//! locked.
//!
//! # Bounded memory
//!
//! At most `max_tracked` buckets exist. A bucket that has refilled completely is exactly a new
//! bucket, so removing it loses nothing: a full shard first drops its full buckets (at most once
//! per [`SWEEP_INTERVAL`]). If it is still full — many distinct ASIDs all drained at once, which
//! is a flood — a newcomer is checked against one shared overflow bucket with the default
//! limit instead of getting its own. So a flood of distinct ASIDs costs no memory beyond the
//! bound, is limited as a whole to one default bucket, and cannot push a drained consumer's
//! bucket out to give it a fresh burst.
//!
//! # Wiring (for the request path)
//!
//! - Build once: `RateLimiter::new(policy)?` and `Overload::new(max_in_flight)?`, shared by all
//!   connections (both are `Send + Sync`; `Overload` is a cheap `Clone`).
//! - Load shedding, first, before any parsing: `let Some(permit) = overload.try_acquire() else
//!   { 503 }`; keep the permit alive until the response is complete (move it into the response
//!   body, or at least hold it across `handle`). Dropping it releases the slot.
//! - Rate limit, after `authorise` has proven that the certificate belongs to `Ssp-From` (so
//!   the key is a real, registered ASID and one consumer cannot spend another's tokens), before
//!   the JWT check and forwarding: `let d = limiter.check(&headers.from, Instant::now());` and
//!   when `!d.allowed` answer 429 `RATE_LIMIT_EXCEEDED_MESSAGESENDER_<asid>` (no Spine code;
//!   FHIR issue type `throttled`) with `d.apply_headers(resp.headers_mut())`, which sets
//!   `Retry-After` and `X-Rate-Limit-Limit`/`-Remaining`/`-Reset`.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

/// Default sustained rate per consumer: requests per [`DEFAULT_PER`].
pub const DEFAULT_REQUESTS: u32 = 50;
/// Default refill period.
pub const DEFAULT_PER: Duration = Duration::from_secs(1);
/// Default burst: how many requests a consumer that has been idle may send at once.
pub const DEFAULT_BURST: u32 = 100;
/// Default bound on the number of buckets held (one per recently active ASID, ~100 bytes each).
pub const DEFAULT_MAX_TRACKED: usize = 65_536;
/// How long a 429 is held before it is sent (see [`RateLimitPolicy::reject_delay`]).
pub const DEFAULT_REJECT_DELAY: Duration = Duration::from_millis(250);
/// Default bound on requests in flight across the whole gateway before load shedding.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4_096;
/// A full shard drops its refilled buckets at most this often.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Number of shards of the bucket map (a power of two).
const SHARDS: usize = 64;
/// Longest ASID accepted as an override key (as `Ssp-From` allows).
const MAX_ASID_LEN: usize = 32;

/// `X-Rate-Limit-Limit`: the bucket's burst (the most requests accepted at once).
pub const X_RATE_LIMIT_LIMIT: HeaderName = HeaderName::from_static("x-rate-limit-limit");
/// `X-Rate-Limit-Remaining`: tokens left after this request.
pub const X_RATE_LIMIT_REMAINING: HeaderName = HeaderName::from_static("x-rate-limit-remaining");
/// `X-Rate-Limit-Reset`: seconds until the bucket is full again (delta seconds, like
/// `Retry-After`; not a timestamp).
pub const X_RATE_LIMIT_RESET: HeaderName = HeaderName::from_static("x-rate-limit-reset");

/// One rate: `requests` per `per`, with bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
}

impl Limit {
    /// `requests` per second, bursts of `burst`.
    pub const fn per_second(requests: u32, burst: u32) -> Limit {
        Limit {
            requests,
            per: Duration::from_secs(1),
            burst,
        }
    }
}

impl Default for Limit {
    fn default() -> Self {
        Limit {
            requests: DEFAULT_REQUESTS,
            per: DEFAULT_PER,
            burst: DEFAULT_BURST,
        }
    }
}

/// What the rate limiter enforces. Plain values; [`RateLimiter::new`] validates them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    /// The limit of every ASID without an override.
    pub default: Limit,
    /// Per-ASID limits (key: the `Ssp-From` ASID, digits).
    pub overrides: BTreeMap<String, Limit>,
    /// Most buckets held for ASIDs without an override (see the module doc).
    pub max_tracked: usize,
    /// A 429 is held this long before it is sent (the request's in-flight permit released
    /// first). A consumer flooding past its limit then gets at most one answer per connection
    /// (or HTTP/2 stream) per delay, so its refusals cannot take the gateway's CPU from other
    /// consumers; a well-behaved consumer waits for `Retry-After` anyway. Zero: at once.
    pub reject_delay: Duration,
}

impl Default for RateLimitPolicy {
    fn default() -> Self {
        RateLimitPolicy {
            default: Limit::default(),
            overrides: BTreeMap::new(),
            max_tracked: DEFAULT_MAX_TRACKED,
            reject_delay: DEFAULT_REJECT_DELAY,
        }
    }
}

/// One thing wrong with a rate-limit policy; `which` is `default` or `override <asid>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyProblem {
    #[error("{which}: requests must be at least 1")]
    ZeroRequests { which: String },
    #[error("{which}: burst must be at least 1")]
    ZeroBurst { which: String },
    #[error("{which}: the period must be longer than zero")]
    ZeroPeriod { which: String },
    #[error("{which}: {requests} per {per:?} is more than one request per nanosecond")]
    RateTooHigh {
        which: String,
        requests: u32,
        per: Duration,
    },
    #[error("{which}: period {per:?} times burst {burst} is too long to represent")]
    TooLong {
        which: String,
        per: Duration,
        burst: u32,
    },
    #[error("override key {asid:?} is not an ASID (1 to {MAX_ASID_LEN} digits)")]
    BadAsid { asid: String },
    #[error("max_tracked must be at least 1")]
    ZeroMaxTracked,
    #[error("max_in_flight must be at least 1")]
    ZeroMaxInFlight,
}

/// A policy that cannot be enforced; every problem is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate-limit policy:{}", .0.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
pub struct PolicyError(pub Vec<PolicyProblem>);

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The bucket's burst (`X-Rate-Limit-Limit`).
    pub limit: u32,
    /// Tokens left after this request (`X-Rate-Limit-Remaining`).
    pub remaining: u32,
    /// Until the bucket is full again (`X-Rate-Limit-Reset`).
    pub reset_after: Duration,
    /// Until the next request would be allowed; zero when this one was.
    pub retry_after: Duration,
    /// True when the ASID was checked against the shared overflow bucket because the map was
    /// full (see the module doc): worth a metric, never expected in normal operation.
    pub overflow: bool,
}

impl Decision {
    /// `X-Rate-Limit-Reset` in whole seconds, rounded up.
    pub fn reset_after_secs(&self) -> u64 {
        ceil_secs(self.reset_after)
    }

    /// `Retry-After` in whole seconds, rounded up, and at least 1 when denied.
    pub fn retry_after_secs(&self) -> u64 {
        let secs = ceil_secs(self.retry_after);
        if self.allowed {
            secs
        } else {
            secs.max(1)
        }
    }

    /// Sets `X-Rate-Limit-Limit`, `-Remaining` and `-Reset`, and `Retry-After` when denied.
    pub fn apply_headers(&self, headers: &mut HeaderMap) {
        headers.insert(X_RATE_LIMIT_LIMIT, HeaderValue::from(self.limit));
        headers.insert(X_RATE_LIMIT_REMAINING, HeaderValue::from(self.remaining));
        headers.insert(
            X_RATE_LIMIT_RESET,
            HeaderValue::from(self.reset_after_secs()),
        );
        if !self.allowed {
            headers.insert(RETRY_AFTER, HeaderValue::from(self.retry_after_secs()));
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A limit in GCRA form, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gcra {
    /// Time one token takes to refill (rounded up).
    interval: i64,
    /// `interval * burst`: how far ahead of now the arrival time may run.
    tolerance: i64,
    burst: u32,
}

impl Gcra {
    fn new(limit: &Limit, which: &str, problems: &mut Vec<PolicyProblem>) -> Option<Gcra> {
        let which = || which.to_string();
        let before = problems.len();
        if limit.requests == 0 {
            problems.push(PolicyProblem::ZeroRequests { which: which() });
        }
        if limit.burst == 0 {
            problems.push(PolicyProblem::ZeroBurst { which: which() });
        }
        if limit.per.is_zero() {
            problems.push(PolicyProblem::ZeroPeriod { which: which() });
        }
        if problems.len() > before {
            return None;
        }
        let per = limit.per.as_nanos();
        let requests = u128::from(limit.requests);
        let interval = per.div_ceil(requests);
        if per < requests {
            problems.push(PolicyProblem::RateTooHigh {
                which: which(),
                requests: limit.requests,
                per: limit.per,
            });
            return None;
        }
        // Keep tolerance well inside i64 so `now + tolerance` cannot overflow for centuries.
        let tolerance = interval.checked_mul(u128::from(limit.burst));
        match (i64::try_from(interval), tolerance.map(i64::try_from)) {
            (Ok(interval), Some(Ok(tolerance))) if tolerance <= i64::MAX / 4 => Some(Gcra {
                interval,
                tolerance,
                burst: limit.burst,
            }),
            _ => {
                problems.push(PolicyProblem::TooLong {
                    which: which(),
                    per: limit.per,
                    burst: limit.burst,
                });
                None
            }
        }
    }
}

/// One token bucket: its theoretical arrival time, in nanoseconds from the limiter's epoch.
/// The bucket is full when that time is not after now.
#[derive(Debug)]
struct Bucket {
    tat: AtomicI64,
    gcra: Gcra,
}

impl Bucket {
    fn new(gcra: Gcra) -> Bucket {
        Bucket {
            tat: AtomicI64::new(i64::MIN),
            gcra,
        }
    }

    fn is_full(&self, now: i64) -> bool {
        self.tat.load(Ordering::Acquire) <= now
    }

    fn check(&self, now: i64, overflow: bool) -> Decision {
        let g = self.gcra;
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let base = tat.max(now);
            let next = base.saturating_add(g.interval);
            let ahead = next - now;
            if ahead > g.tolerance {
                return Decision {
                    allowed: false,
                    limit: g.burst,
                    remaining: 0,
                    reset_after: nanos(base - now),
                    retry_after: nanos(ahead - g.tolerance),
                    overflow,
                };
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let left = (g.tolerance - ahead) / g.interval;
                    return Decision {
                        allowed: true,
                        limit: g.burst,
                        remaining: u32::try_from(left).unwrap_or(g.burst),
                        reset_after: nanos(ahead),
                        retry_after: Duration::ZERO,
                        overflow,
                    };
                }
                Err(current) => tat = current,
            }
        }
    }
}

fn nanos(n: i64) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(0))
}

#[derive(Debug, Default)]
struct ShardMap {
    buckets: HashMap<Box<str>, Bucket>,
    /// When this shard last dropped its full buckets (limiter nanoseconds).
    last_sweep: Option<i64>,
}

/// Token buckets per ASID. See the module doc.
#[derive(Debug)]
pub struct RateLimiter {
    epoch: Instant,
    default: Gcra,
    /// ASIDs with an override: built once, never locked, never evicted.
    overrides: HashMap<Box<str>, Bucket>,
    shards: Box<[RwLock<ShardMap>]>,
    per_shard: usize,
    hasher: RandomState,
    /// Shared by newcomers while their shard is full of drained buckets.
    overflow: Bucket,
    overflow_checks: AtomicU64,
    reject_delay: Duration,
}

impl RateLimiter {
    /// How long a 429 is held before it is sent.
    pub fn reject_delay(&self) -> Duration {
        self.reject_delay
    }

    /// Validates `policy` (every problem reported at once) and builds the limiter.
    pub fn new(policy: RateLimitPolicy) -> Result<RateLimiter, PolicyError> {
        let mut problems = Vec::new();
        let default = Gcra::new(&policy.default, "default", &mut problems);
        let mut overrides = HashMap::with_capacity(policy.overrides.len());
        for (asid, limit) in &policy.overrides {
            if !is_asid(asid) {
                problems.push(PolicyProblem::BadAsid { asid: asid.clone() });
                continue;
            }
            if let Some(g) = Gcra::new(limit, &format!("override {asid}"), &mut problems) {
                overrides.insert(asid.as_str().into(), Bucket::new(g));
            }
        }
        if policy.max_tracked == 0 {
            problems.push(PolicyProblem::ZeroMaxTracked);
        }
        match default {
            Some(default) if problems.is_empty() => Ok(RateLimiter {
                epoch: Instant::now(),
                default,
                overrides,
                shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
                per_shard: policy.max_tracked.div_ceil(SHARDS),
                hasher: RandomState::new(),
                overflow: Bucket::new(default),
                reject_delay: policy.reject_delay,
                overflow_checks: AtomicU64::new(0),
            }),
            _ => Err(PolicyError(problems)),
        }
    }

    /// Takes a token from `asid`'s bucket at time `now` (pass `Instant::now()`; tests pass a
    /// made-up clock). Never blocks beyond one shard lock, never sleeps.
    pub fn check(&self, asid: &str, now: Instant) -> Decision {
        let t = self.nanos_since_epoch(now);
        if let Some(bucket) = self.overrides.get(asid) {
            return bucket.check(t, false);
        }
        let shard = &self.shards[self.shard_of(asid)];
        {
            let map = shard.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(bucket) = map.buckets.get(asid) {
                return bucket.check(t, false);
            }
        }
        let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = map.buckets.get(asid) {
            return bucket.check(t, false);
        }
        if map.buckets.len() >= self.per_shard {
            let due = match map.last_sweep {
                None => true,
                Some(last) => t.saturating_sub(last) >= SWEEP_INTERVAL.as_nanos() as i64,
            };
            if due {
                map.buckets.retain(|_, b| !b.is_full(t));
                map.last_sweep = Some(t);
            }
        }
        if map.buckets.len() >= self.per_shard {
            drop(map);
            self.overflow_checks.fetch_add(1, Ordering::Relaxed);
            return self.overflow.check(t, true);
        }
        let bucket = Bucket::new(self.default);
        let decision = bucket.check(t, false);
        map.buckets.insert(asid.into(), bucket);
        decision
    }

    /// Drops every bucket that has refilled completely (losslessly: a full bucket is a new
    /// one). Optional: the map is bounded without it; call it from a periodic task to give
    /// memory back after a burst of distinct consumers. Returns how many were dropped.
    pub fn evict_idle(&self, now: Instant) -> usize {
        let t = self.nanos_since_epoch(now);
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
            let before = map.buckets.len();
            map.buckets.retain(|_, b| !b.is_full(t));
            dropped += before - map.buckets.len();
        }
        dropped
    }

    /// Buckets currently held for ASIDs without an override (for a gauge).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .buckets
                    .len()
            })
            .sum()
    }

    /// Most buckets held for ASIDs without an override (`max_tracked` rounded up to the shards).
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }

    /// Checks made against the shared overflow bucket so far (for a counter).
    pub fn overflow_checks(&self) -> u64 {
        self.overflow_checks.load(Ordering::Relaxed)
    }

    fn shard_of(&self, asid: &str) -> usize {
        // SHARDS is a power of two; the high bits of SipHash are as good as the low ones.
        (self.hasher.hash_one(asid) >> 32) as usize & (SHARDS - 1)
    }

    /// Signed nanoseconds from the epoch, so a clock reading taken before construction works.
    fn nanos_since_epoch(&self, now: Instant) -> i64 {
        match now.checked_duration_since(self.epoch) {
            Some(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX / 2),
            None => {
                let back = self.epoch.duration_since(now).as_nanos();
                -i64::try_from(back).unwrap_or(i64::MAX / 2)
            }
        }
    }
}

fn is_asid(text: &str) -> bool {
    (1..=MAX_ASID_LEN).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit())
}

/// A bound on requests in flight across the gateway: past it, requests are shed (503) at once
/// instead of queueing. Lock-free; clones share one counter.
#[derive(Debug, Clone)]
pub struct Overload {
    inner: Arc<OverloadInner>,
}

#[derive(Debug)]
struct OverloadInner {
    in_flight: AtomicUsize,
    max: usize,
    shed: AtomicU64,
}

/// One admitted request's slot; dropping it gives the slot back.
#[derive(Debug)]
#[must_use = "the slot is released as soon as the permit is dropped"]
pub struct Permit {
    inner: Arc<OverloadInner>,
}

impl Overload {
    /// Admits at most `max_in_flight` requests at once.
    pub fn new(max_in_flight: usize) -> Result<Overload, PolicyError> {
        if max_in_flight == 0 {
            return Err(PolicyError(vec![PolicyProblem::ZeroMaxInFlight]));
        }
        Ok(Overload {
            inner: Arc::new(OverloadInner {
                in_flight: AtomicUsize::new(0),
                max: max_in_flight,
                shed: AtomicU64::new(0),
            }),
        })
    }

    /// A slot if fewer than `max_in_flight` requests are in flight; `None` means shed this one
    /// (503 with `Retry-After`), never wait.
    pub fn try_acquire(&self) -> Option<Permit> {
        let max = self.inner.max;
        let taken = self
            .inner
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Some(Permit {
                inner: self.inner.clone(),
            }),
            Err(_) => {
                self.inner.shed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Requests in flight now (for a gauge).
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    pub fn max_in_flight(&self) -> usize {
        self.inner.max
    }

    /// Requests shed so far (for a counter).
    pub fn shed_total(&self) -> u64 {
        self.inner.shed.load(Ordering::Relaxed)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    const A: &str = "200000000359";
    const B: &str = "200000000360";

    fn limiter(requests: u32, per: Duration, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimitPolicy {
            default: Limit {
                requests,
                per,
                burst,
            },
            ..RateLimitPolicy::default()
        })
        .expect("valid policy")
    }

    fn admitted(rl: &RateLimiter, asid: &str, now: Instant, n: usize) -> usize {
        (0..n).filter(|_| rl.check(asid, now).allowed).count()
    }

    #[test]
    fn burst_then_refill_one_token_per_interval() {
        let t0 = Instant::now();
        let rl = limiter(2, Duration::from_secs(1), 5);

        let first = rl.check(A, t0);
        assert!(first.allowed);
        assert_eq!((first.limit, first.remaining), (5, 4));
        assert_eq!(first.reset_after, Duration::from_millis(500));
        assert_eq!(admitted(&rl, A, t0, 10), 4, "the rest of the burst");

        let denied = rl.check(A, t0);
        assert!(!denied.allowed);
        assert_eq!(denied.remaining, 0);
        assert_eq!(denied.retry_after, Duration::from_millis(500));
        assert_eq!(denied.reset_after, Duration::from_millis(2500));
        assert_eq!(
            (denied.retry_after_secs(), denied.reset_after_secs()),
            (1, 3)
        );

        // 499 ms later still nothing; at 500 ms exactly one token.
        assert!(!rl.check(A, t0 + Duration::from_millis(499)).allowed);
        let t1 = t0 + Duration::from_millis(500);
        let one = rl.check(A, t1);
        assert!(one.allowed && one.remaining == 0);
        assert!(!rl.check(A, t1).allowed);

        // Idle long enough to refill the whole bucket, and no more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(admitted(&rl, A, t2, 100), 5);
    }

    #[test]
    fn headers_say_limit_remaining_reset_and_retry_after() {
        let t0 = Instant::now();
        let rl = limiter(1, Duration::from_secs(2), 2);
        let mut h = HeaderMap::new();
        rl.check(A, t0).apply_headers(&mut h);
        assert_eq!(h[&X_RATE_LIMIT_LIMIT], "2");
        assert_eq!(h[&X_RATE_LIMIT_REMAINING], "1");
        assert_eq!(h[&X_RATE_LIMIT_RESET], "2");
        assert!(!h.contains_key(RETRY_AFTER), "no Retry-After when allowed");

        rl.check(A, t0);
        let mut h = HeaderMap::new();
        let d = rl.check(A, t0 + Duration::from_millis(100));
        assert!(!d.allowed);
        d.apply_headers(&mut h);
        assert_eq!(h[&X_RATE_LIMIT_REMAINING], "0");
        assert_eq!(h[RETRY_AFTER], "2", "1.9 s rounds up");
        assert_eq!(h[&X_RATE_LIMIT_RESET], "4", "3.9 s until full");
    }

    #[test]
    fn one_noisy_consumer_does_not_spend_anothers_tokens() {
        let t0 = Instant::now();
        let rl = limiter(1, Duration::from_secs(1), 3);
        assert_eq!(admitted(&rl, A, t0, 1000), 3);
        assert!(!rl.check(A, t0).allowed);
        assert_eq!(admitted(&rl, B, t0, 3), 3, "B still has its whole burst");
    }

    #[test]
    fn overrides_apply_to_their_asid_only() {
        let t0 = Instant::now();
        let mut overrides = BTreeMap::new();
        overrides.insert(B.to_string(), Limit::per_second(100, 20));
        let rl = RateLimiter::new(RateLimitPolicy {
            default: Limit::per_second(1, 2),
            overrides,
            max_tracked: 16,
            reject_delay: DEFAULT_REJECT_DELAY,
        })
        .expect("valid");
        assert_eq!(admitted(&rl, A, t0, 50), 2);
        assert_eq!(admitted(&rl, B, t0, 50), 20);
        assert_eq!(rl.check(B, t0).limit, 20);
        // 100 ms refills 10 of B's tokens and none of A's.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(admitted(&rl, B, t1, 50), 10);
        assert_eq!(admitted(&rl, A, t1, 50), 0);
        assert_eq!(rl.tracked(), 1, "overrides are not in the bounded map");
    }

    #[test]
    fn bad_policies_are_refused_with_every_problem() {
        let mut overrides = BTreeMap::new();
        overrides.insert("not-an-asid".to_string(), Limit::per_second(1, 1));
        overrides.insert("123".to_string(), Limit::per_second(1, 0));
        let err = RateLimiter::new(RateLimitPolicy {
            default: Limit {
                requests: 0,
                per: Duration::ZERO,
                burst: 0,
            },
            overrides,
            max_tracked: 0,
            reject_delay: DEFAULT_REJECT_DELAY,
        })
        .expect_err("invalid");
        assert_eq!(
            err.0,
            vec![
                PolicyProblem::ZeroRequests {
                    which: "default".into()
                },
                PolicyProblem::ZeroBurst {
                    which: "default".into()
                },
                PolicyProblem::ZeroPeriod {
                    which: "default".into()
                },
                PolicyProblem::ZeroBurst {
                    which: "override 123".into()
                },
                PolicyProblem::BadAsid {
                    asid: "not-an-asid".into()
                },
                PolicyProblem::ZeroMaxTracked,
            ]
        );
        assert!(err
            .to_string()
            .contains("default: burst must be at least 1"));

        let too_fast = RateLimiter::new(RateLimitPolicy {
            default: Limit {
                requests: 10,
                per: Duration::from_nanos(5),
                burst: 1,
            },
            ..RateLimitPolicy::default()
        });
        assert!(matches!(
            too_fast.expect_err("too fast").0[..],
            [PolicyProblem::RateTooHigh { .. }]
        ));
        let too_long = RateLimiter::new(RateLimitPolicy {
            default: Limit {
                requests: 1,
                per: Duration::from_secs(u64::MAX / 4),
                burst: u32::MAX,
            },
            ..RateLimitPolicy::default()
        });
        assert!(matches!(
            too_long.expect_err("too long").0[..],
            [PolicyProblem::TooLong { .. }]
        ));
        assert_eq!(
            Overload::new(0).expect_err("zero").0,
            vec![PolicyProblem::ZeroMaxInFlight]
        );
        assert!(RateLimiter::new(RateLimitPolicy::default()).is_ok());
    }

    #[test]
    fn a_flood_of_distinct_asids_is_bounded_and_shares_one_bucket() {
        let t0 = Instant::now();
        let rl = RateLimiter::new(RateLimitPolicy {
            default: Limit::per_second(1, 10),
            overrides: BTreeMap::new(),
            max_tracked: SHARDS * 4,
            reject_delay: DEFAULT_REJECT_DELAY,
        })
        .expect("valid");
        // A real consumer drains its bucket first.
        assert_eq!(admitted(&rl, A, t0, 100), 10);

        let flood: Vec<String> = (0..20_000u64).map(|i| format!("9{i:011}")).collect();
        let mut overflowed = 0;
        let mut overflow_allowed = 0;
        for asid in &flood {
            let d = rl.check(asid, t0);
            if d.overflow {
                overflowed += 1;
                overflow_allowed += usize::from(d.allowed);
            }
        }
        assert!(rl.tracked() <= rl.capacity(), "bounded: {}", rl.tracked());
        assert_eq!(rl.capacity(), SHARDS * 4);
        assert!(overflowed > 19_000, "{overflowed}");
        assert_eq!(
            overflow_allowed, 10,
            "the overflow bucket is one default bucket"
        );
        assert_eq!(rl.overflow_checks(), overflowed as u64);
        // The flood did not push the drained consumer out (that would give it a fresh burst).
        assert!(!rl.check(A, t0).allowed);

        // Once the flood's buckets have refilled, a full shard sweeps them and newcomers get
        // their own buckets again.
        let later = t0 + Duration::from_secs(11);
        let d = rl.check("123456789012", later);
        assert!(d.allowed && !d.overflow);
        let held = rl.tracked();
        assert_eq!(rl.evict_idle(later), held - 1, "all but the newcomer");
        assert_eq!(rl.tracked(), 1);
    }

    #[test]
    fn a_bucket_is_evicted_only_once_full() {
        let t0 = Instant::now();
        let rl = limiter(1, Duration::from_secs(1), 4);
        assert_eq!(admitted(&rl, A, t0, 3), 3);
        assert_eq!(rl.evict_idle(t0 + Duration::from_millis(2999)), 0);
        assert_eq!(rl.tracked(), 1);
        assert_eq!(rl.evict_idle(t0 + Duration::from_secs(3)), 1);
        assert_eq!(admitted(&rl, A, t0 + Duration::from_secs(3), 10), 4);
    }

    #[test]
    fn clock_readings_before_construction_work() {
        let t0 = Instant::now();
        let past = t0.checked_sub(Duration::from_secs(1)).unwrap_or(t0);
        let rl = limiter(1, Duration::from_secs(1), 1);
        assert!(rl.check(A, past).allowed);
        assert!(!rl.check(A, past).allowed);
        assert!(rl.check(A, past + Duration::from_secs(1)).allowed);
    }

    #[test]
    fn many_threads_never_over_admit() {
        const THREADS: usize = 8;
        let t0 = Instant::now();
        let rl = Arc::new(limiter(1, Duration::from_secs(3600), 500));
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let rl = rl.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut ok = [0usize; 2];
                    for n in 0..1000 {
                        // Half the threads also hit a second ASID, through first-use inserts.
                        let asid = if i % 2 == 0 || n % 2 == 0 { A } else { B };
                        if rl.check(asid, t0).allowed {
                            ok[usize::from(asid == B)] += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let mut totals = [0usize; 2];
        for h in handles {
            let ok = h.join().expect("thread");
            totals[0] += ok[0];
            totals[1] += ok[1];
        }
        assert_eq!(totals, [500, 500]);
    }

    #[test]
    fn overload_sheds_past_the_bound_and_releases_on_drop() {
        let guard = Overload::new(2).expect("valid");
        let a = guard.try_acquire().expect("first");
        let b = guard.try_acquire().expect("second");
        assert!(guard.try_acquire().is_none());
        assert_eq!((guard.in_flight(), guard.shed_total()), (2, 1));
        drop(a);
        let c = guard.try_acquire().expect("a slot came back");
        drop((b, c));
        assert_eq!(guard.in_flight(), 0);
    }

    #[test]
    fn overload_bound_holds_under_many_threads() {
        const THREADS: usize = 8;
        const MAX: usize = 3;
        let guard = Overload::new(MAX).expect("valid");
        let peak = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let guard = guard.clone();
                let peak = peak.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut admitted = 0;
                    for _ in 0..20_000 {
                        if let Some(permit) = guard.try_acquire() {
                            peak.fetch_max(guard.in_flight(), Ordering::Relaxed);
                            admitted += 1;
                            drop(permit);
                        }
                    }
                    admitted
                })
            })
            .collect();
        let admitted: u64 = handles.into_iter().map(|h| h.join().expect("thread")).sum();
        assert!(peak.load(Ordering::Relaxed) <= MAX);
        assert_eq!(guard.in_flight(), 0);
        assert_eq!(admitted + guard.shed_total(), (THREADS * 20_000) as u64);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Over every window of every ASID's history, admitted <= burst + rate * window.
        #[test]
        fn never_admits_more_than_burst_plus_rate_times_window(
            requests in 1u32..100,
            per_ns in proptest::prop_oneof![1u64..10_000, 1_000_000u64..5_000_000_000],
            burst in 1u32..20,
            steps in proptest::collection::vec((0u64..4_000, 0usize..3), 1..300),
        ) {
            proptest::prop_assume!(per_ns >= u64::from(requests));
            let per = Duration::from_nanos(per_ns);
            let t0 = Instant::now();
            let rl = limiter(requests, per, burst);
            let asids = ["1", "2", "3"];
            let mut offset = 0u64;
            let mut admitted: [Vec<u64>; 3] = Default::default();
            // Steps of 0 to 4 refill intervals, in thousandths.
            for (permille, who) in steps {
                offset += permille * per_ns / (1000 * u64::from(requests));
                if rl.check(asids[who], t0 + Duration::from_nanos(offset)).allowed {
                    admitted[who].push(offset);
                }
            }
            let per_ns = u128::from(per_ns);
            for times in &admitted {
                for i in 0..times.len() {
                    for j in i..times.len() {
                        let window = u128::from(times[j] - times[i]);
                        let bound = u128::from(burst) + window * u128::from(requests) / per_ns;
                        proptest::prop_assert!(
                            (j - i + 1) as u128 <= bound,
                            "{} admitted in {} ns, bound {}", j - i + 1, window, bound
                        );
                    }
                }
            }
        }
    }
}
