//! The directory cache: a [`DirectoryBackend`] behind a bounded `moka` cache that keeps answering
//! when its backend cannot. Owns the cache policy (TTL, negative TTL, size, maximum staleness),
//! the coalescing of concurrent misses, stale-if-error, invalidation and the counters behind the
//! directory metrics. It never decides whether a request is allowed, and never caches an error.
//!
//! One slot per ASID holds the last answer the backend gave (a party, or "not registered"):
//!
//! - **fresh** (younger than `ttl`, or `negative_ttl` for "not registered"): served from memory;
//!   this is the hot path — a `&str` map lookup, one clock read and one `Arc` clone.
//! - **stale** (a party older than `ttl` but within `ttl + max_stale`): the backend is asked
//!   again; if it fails, the stale party is served and counted (stale-if-error). Once a refresh
//!   of it has failed, the stale party is served at once, and the backend is asked again in the
//!   background, at most once per `stale_retry`: a backend that hangs puts its query timeout
//!   on the first request that found the party stale, not on one request per `stale_retry`.
//! - **gone** (older than `ttl + max_stale`; "not registered" past `negative_ttl`): the backend
//!   must answer; if it fails, the caller gets [`DirectoryError`] (the gateway answers 503
//!   `DIRECTORY_UNAVAILABLE`). "Not registered" is never served stale: during an outage an
//!   unknown ASID gets 503, not a 403 that blames the consumer.
//!
//! Refreshes are single-flight: the first caller that misses starts one refresh task for the
//! ASID and every caller that misses while it runs awaits the same outcome (answer, stale party
//! or error), so N concurrent misses make one backend query whatever the cache admits. The task
//! is spawned, so a caller that goes away does not cancel the query the others wait for.
//!
//! Whether the backend answers is kept here too, for readiness, which only reads it and never
//! waits on the backend. A remote backend (LDAP, FHIR) counts as not answering until it has
//! answered once; the LDIF backend answers from memory from the start. A failed lookup does not
//! by itself make the backend count as down (it may be one party's bad data): it wakes the
//! background prober ([`Directory::run_prober`]), whose probe decides. While the backend does
//! not answer, the prober asks it again with back-off, so readiness follows the backend without
//! any consumer traffic.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use moka::future::Cache;
use moka::Expiry;
use tokio_util::sync::CancellationToken;

use super::{is_asid, DirectoryBackend, DirectoryError, Party};

/// Default lifetime of a cached party (the 900 s the NHS MHS route lookup uses).
pub const DEFAULT_TTL: Duration = Duration::from_secs(900);
/// Default lifetime of a cached "no such ASID".
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// Default maximum number of cached ASIDs (found and not found together).
pub const DEFAULT_CAPACITY: u64 = 100_000;
/// Default time past `ttl` that a party is still served while the backend is failing.
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(3600);
/// Default pause, after a failed refresh, before the backend is asked again for a key whose
/// stale party is being served.
pub const DEFAULT_STALE_RETRY: Duration = Duration::from_secs(1);
/// After a failed probe, the prober waits this long before the next one, doubling the wait
/// after each failure up to [`PROBE_BACKOFF_MAX`].
pub const PROBE_BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two probes of a backend that does not answer.
pub const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(16);

/// The backend answered the last query or probe.
const ANSWERING: u8 = 0;
/// A query failed since the backend last answered: it counts as answering until the prober's
/// probe says otherwise (a failed lookup may be one party's bad data, not an outage).
const SUSPECT: u8 = 1;
/// The last probe failed, or the backend has not answered yet since start.
const DOWN: u8 = 2;

/// How long the [`Directory`] cache keeps answers, and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// Lifetime of a found party.
    pub ttl: Duration,
    /// Lifetime of a "not found" answer; keep it short so a new registration shows up quickly.
    pub negative_ttl: Duration,
    /// Maximum number of cached ASIDs.
    pub capacity: u64,
    /// How long past `ttl` a party is served while the backend fails (zero: never stale).
    pub max_stale: Duration,
    /// After a failed refresh, serve the stale party this long before asking the backend again.
    pub stale_retry: Duration,
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            capacity: DEFAULT_CAPACITY,
            max_stale: DEFAULT_MAX_STALE,
            stale_retry: DEFAULT_STALE_RETRY,
        }
    }
}

/// Counters of the directory cache, for metrics. Cumulative since start, except `entries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirectoryStats {
    /// Lookups answered from a fresh cache entry.
    pub hits: u64,
    /// Lookups that needed the backend (cold, expired or stale); coalesced callers each count.
    pub misses: u64,
    /// Lookups answered with a stale party because the backend failed.
    pub stale_served: u64,
    /// Backend queries that failed.
    pub backend_errors: u64,
    /// Message handlers the backend returned that cannot be used (each interaction taken out
    /// of a party by one), counted at each lookup that returned them: while the directory
    /// holds them, this grows at the rate the parties holding them are looked up.
    pub unusable_handlers: u64,
    /// Cached ASIDs now (moka's estimate: it settles after pending maintenance).
    pub entries: u64,
}

/// `t + d`, saturating far in the future instead of panicking on overflow.
fn later(t: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    t.checked_add(d).or_else(|| t.checked_add(FAR)).unwrap_or(t)
}

/// The last answer the backend gave for one ASID.
#[derive(Debug, Clone)]
struct Answer {
    party: Option<Arc<Party>>,
    fresh_until: Instant,
    /// Until when it may be served while the backend fails; `None`: never ("not found").
    stale_until: Option<Instant>,
}

/// What the cache holds for one ASID.
#[derive(Debug)]
struct Slot {
    answer: Answer,
    /// When the newest refresh since `answer` was fetched failed.
    failed_at: Option<Instant>,
    /// When moka drops the slot.
    evict_at: Instant,
}

impl Slot {
    fn answered(party: Option<Arc<Party>>, at: Instant, policy: &CachePolicy) -> Slot {
        let answer = match party {
            Some(party) => {
                let fresh_until = later(at, policy.ttl);
                Answer {
                    party: Some(party),
                    fresh_until,
                    stale_until: Some(later(fresh_until, policy.max_stale)),
                }
            }
            None => Answer {
                party: None,
                fresh_until: later(at, policy.negative_ttl),
                stale_until: None,
            },
        };
        Slot {
            evict_at: answer.stale_until.unwrap_or(answer.fresh_until),
            answer,
            failed_at: None,
        }
    }

    /// The answer when it is fresh at `now`.
    fn fresh(&self, now: Instant) -> Option<&Option<Arc<Party>>> {
        (now < self.answer.fresh_until).then_some(&self.answer.party)
    }

    /// The stale party that may be served at `now` while the backend fails.
    fn stale(&self, now: Instant) -> Option<&Arc<Party>> {
        let answer = &self.answer;
        match (&answer.party, answer.stale_until) {
            (Some(party), Some(until)) if now < until => Some(party),
            _ => None,
        }
    }
}

/// Per-slot expiry: moka drops a slot at its `evict_at`.
struct SlotExpiry;

impl Expiry<String, Arc<Slot>> for SlotExpiry {
    fn expire_after_create(
        &self,
        _asid: &String,
        slot: &Arc<Slot>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(slot.evict_at.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _asid: &String,
        slot: &Arc<Slot>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.evict_at.saturating_duration_since(updated_at))
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale_served: AtomicU64,
    backend_errors: AtomicU64,
    unusable_handlers: AtomicU64,
}

struct Inner {
    backend: Arc<dyn DirectoryBackend>,
    cache: Cache<String, Arc<Slot>>,
    policy: CachePolicy,
    counters: Counters,
    /// [`ANSWERING`], [`SUSPECT`] or [`DOWN`]: one atomic, so no two writers can leave a
    /// combination that says "down" without the prober seeing it.
    state: AtomicU8,
    /// Wakes the prober when a query fails while the backend was answering.
    probe_wanted: tokio::sync::Notify,
    /// Bumped by every invalidation. A refresh caches its answer only if no invalidation came
    /// after it started, so an answer fetched before an invalidation is not kept after it.
    generation: AtomicU64,
    /// The refresh running for each ASID, with the generation it started in, shared by every
    /// caller that misses meanwhile (in the same generation). The lock is held only to look up
    /// or insert, never across an await.
    inflight: Mutex<HashMap<String, (u64, Flight)>>,
}

/// One refresh, awaited by every caller that missed while it runs.
type Flight = Shared<BoxFuture<'static, Outcome>>;

/// The cached directory the gateway queries: a [`DirectoryBackend`] behind a `moka` cache.
/// Cloning is cheap and clones share the cache and the counters.
#[derive(Clone)]
pub struct Directory {
    inner: Arc<Inner>,
}

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Directory")
            .field("backend", &self.inner.backend.name())
            .field("policy", &self.inner.policy)
            .field("stats", &self.stats())
            .finish()
    }
}

/// How a slow-path lookup ended.
#[derive(Clone)]
enum Outcome {
    Answer(Option<Arc<Party>>),
    Stale(Arc<Party>),
    Failed(DirectoryError),
}

impl Directory {
    /// A directory answering from `backend`, caching as `policy` says.
    pub fn new(backend: Arc<dyn DirectoryBackend>, policy: CachePolicy) -> Self {
        let cache = Cache::builder()
            .max_capacity(policy.capacity)
            .expire_after(SlotExpiry)
            .build();
        let state = if backend.answers_from_memory() {
            ANSWERING
        } else {
            DOWN
        };
        Self {
            inner: Arc::new(Inner {
                backend,
                cache,
                policy,
                counters: Counters::default(),
                state: AtomicU8::new(state),
                probe_wanted: tokio::sync::Notify::new(),
                generation: AtomicU64::new(0),
                inflight: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The party registered under `asid`, from the cache or else the backend; `Ok(None)` when no
    /// such ASID is registered. Concurrent misses for one ASID share a single backend query. When
    /// the backend fails, a party cached within `ttl + max_stale` is served (and counted);
    /// otherwise the error is returned. Anything that is not 1 to 32 ASCII digits cannot be an
    /// ASID and is answered `Ok(None)` without touching cache or backend.
    ///
    /// A hit looks the key up by `&str` (no key allocation) and clones one `Arc`. A miss spawns
    /// the refresh on the Tokio runtime, so call it from within one.
    pub async fn party(&self, asid: &str) -> Result<Option<Arc<Party>>, DirectoryError> {
        if !is_asid(asid) {
            return Ok(None);
        }
        let now = Instant::now();
        if let Some(slot) = self.inner.cache.get(asid).await {
            if let Some(answer) = slot.fresh(now) {
                self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(answer.clone());
            }
            if let (Some(party), Some(failed_at)) = (slot.stale(now), slot.failed_at) {
                // The backend failed the last time this party was refreshed: serve it stale
                // without waiting, and ask the backend again behind the request (joining a
                // refresh already running) once `stale_retry` has passed.
                let counters = &self.inner.counters;
                counters.misses.fetch_add(1, Ordering::Relaxed);
                counters.stale_served.fetch_add(1, Ordering::Relaxed);
                let party = party.clone();
                if now >= later(failed_at, self.inner.policy.stale_retry) {
                    drop(self.flight(asid));
                }
                return Ok(Some(party));
            }
        }
        self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
        // Boxed: the refresh's state (the backend query) is large, and held only on a miss;
        // inline, every request's future would carry it (twice: sender and receiver), and be
        // copied whole where the request's future is boxed.
        match Box::pin(self.refresh(asid)).await {
            Outcome::Answer(answer) => Ok(answer),
            Outcome::Stale(party) => {
                self.inner
                    .counters
                    .stale_served
                    .fetch_add(1, Ordering::Relaxed);
                Ok(Some(party))
            }
            Outcome::Failed(error) => Err(error),
        }
    }

    /// The slow path: join the refresh running for `asid`, or start one.
    async fn refresh(&self, asid: &str) -> Outcome {
        match self.flight(asid) {
            Some(flight) => flight.await,
            None => {
                // The map is poisoned only if a panic happened while it was locked (a bug):
                // query directly rather than fail every lookup from now on.
                let generation = self.inner.generation.load(Ordering::SeqCst);
                refresh_now(&self.inner, asid, generation).await
            }
        }
    }

    /// The refresh of `asid` running, or a new one: a spawned task, so it runs to its end
    /// whether or not the future returned is awaited. `None` if the map of refreshes is
    /// poisoned.
    fn flight(&self, asid: &str) -> Option<Flight> {
        let flight = {
            let Ok(mut inflight) = self.inner.inflight.lock() else {
                return None;
            };
            // Read under the map's lock, which an invalidation holds while it bumps it.
            let generation = self.inner.generation.load(Ordering::SeqCst);
            match inflight.get(asid) {
                // A refresh started before the latest invalidation is not joined: its answer
                // may be what the invalidation was meant to forget.
                Some((started, flight)) if *started == generation => flight.clone(),
                _ => {
                    let inner = self.inner.clone();
                    let key = asid.to_string();
                    let task = tokio::spawn(async move {
                        let _landing = Landing {
                            inner: inner.clone(),
                            key: key.clone(),
                            generation,
                        };
                        refresh_now(&inner, &key, generation).await
                    });
                    let backend = self.inner.backend.name();
                    // Weak: the map holds this future, so a strong reference would be a cycle.
                    let weak = Arc::downgrade(&self.inner);
                    let key = asid.to_string();
                    let flight = async move {
                        task.await.unwrap_or_else(|e| {
                            // The task panicked or was cancelled before its `Landing` could
                            // clear the map: clear it here so the next miss starts afresh.
                            if let Some(inner) = weak.upgrade() {
                                land(&inner, &key, generation);
                            }
                            Outcome::Failed(DirectoryError::Backend {
                                backend,
                                reason: format!("the lookup task failed: {e}"),
                            })
                        })
                    }
                    .boxed()
                    .shared();
                    inflight.insert(asid.to_string(), (generation, flight.clone()));
                    flight
                }
            }
        };
        Some(flight)
    }

    /// The backend's short name ("ldif", "ldap", "fhir").
    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// The backend itself (uncached), e.g. for the operator's `directory lookup`.
    pub fn backend(&self) -> &Arc<dyn DirectoryBackend> {
        &self.inner.backend
    }

    /// The cache policy in force.
    pub fn policy(&self) -> &CachePolicy {
        &self.inner.policy
    }

    /// Forget the cached answer for `asid` (a stale copy too); the next
    /// [`party`](Self::party) asks the backend. Refreshes already running are voided: callers
    /// already waiting get their answer, but it is not cached, and later callers ask anew.
    /// (Every running refresh is voided, not only this ASID's: the cost is a few extra queries.)
    pub async fn invalidate(&self, asid: &str) {
        self.void_running_refreshes();
        self.inner.cache.invalidate(asid).await;
    }

    /// Forget every cached answer (e.g. after the backend's data was reloaded), voiding the
    /// refreshes already running as [`invalidate`](Self::invalidate) does.
    pub fn invalidate_all(&self) {
        self.void_running_refreshes();
        self.inner.cache.invalidate_all();
    }

    /// Starts a new generation: refreshes started before it neither cache their answers nor
    /// are joined by later callers.
    fn void_running_refreshes(&self) {
        // Bumped under the map's lock, so no caller joins an old refresh after this returns.
        let _inflight = self.inner.inflight.lock();
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The cache counters (a few relaxed atomic loads).
    pub fn stats(&self) -> DirectoryStats {
        let c = &self.inner.counters;
        DirectoryStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            stale_served: c.stale_served.load(Ordering::Relaxed),
            backend_errors: c.backend_errors.load(Ordering::Relaxed),
            unusable_handlers: c.unusable_handlers.load(Ordering::Relaxed),
            entries: self.inner.cache.entry_count(),
        }
    }

    /// Whether an answer for `asid` is cached (found or not, fresh or stale): a lookup of it
    /// needs no backend query unless it has gone past its TTL.
    pub fn is_cached(&self, asid: &str) -> bool {
        self.inner.cache.contains_key(asid)
    }

    /// Whether the backend answered the last query or probe (and nothing has failed since).
    /// False before a remote backend's first answer; the LDIF backend answers from the start.
    pub fn healthy(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) == ANSWERING
    }

    /// Whether the backend counts as answering, for readiness: it has answered, and no probe
    /// has failed since. A failed lookup alone does not change it: the prober's probe then
    /// decides (one party's bad data fails its lookup but not the probe). Reads one atomic;
    /// never waits on the backend.
    pub fn backend_answers(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) != DOWN
    }

    /// Whether the directory can serve anything, for readiness: the backend answers, or else a
    /// cached party can still be served. Never waits on the backend.
    pub fn usable(&self) -> bool {
        self.backend_answers() || self.holds_servable_party()
    }

    /// The background prober, until `shutdown`: while the backend is not known to answer (at
    /// start for a remote backend, after a failed lookup, after a failed probe) it asks
    /// [`DirectoryBackend::probe`], each probe given at most `bound`. A probe that fails is
    /// followed by another after [`PROBE_BACKOFF_FIRST`], the wait doubling up to
    /// [`PROBE_BACKOFF_MAX`]; one that succeeds makes the backend count as answering. While it
    /// answers, the prober waits for a failed lookup and asks nothing.
    pub async fn run_prober(&self, bound: Duration, shutdown: CancellationToken) {
        let inner = &self.inner;
        let backend = inner.backend.name();
        let mut backoff = PROBE_BACKOFF_FIRST;
        loop {
            if inner.state.load(Ordering::Acquire) == ANSWERING {
                backoff = PROBE_BACKOFF_FIRST;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = inner.probe_wanted.notified() => continue,
                }
            }
            // What the probe's verdict replaces: a lookup that settles the question while the
            // probe runs (an answer, or a failure that wants a probe of its own) wins over it.
            let seen = inner.state.load(Ordering::Acquire);
            let probe = tokio::select! {
                _ = shutdown.cancelled() => return,
                probe = tokio::time::timeout(bound, inner.backend.probe()) => probe,
            };
            let error = match probe {
                Ok(Ok(())) => {
                    if inner
                        .state
                        .compare_exchange(seen, ANSWERING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                        && seen == DOWN
                    {
                        tracing::info!(backend, "directory backend answers");
                    }
                    continue;
                }
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("directory backend {backend}: no answer within {bound:?}"),
            };
            if inner
                .state
                .compare_exchange(seen, DOWN, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // A lookup answered (or failed anew) while the probe ran: look again.
                continue;
            }
            tracing::warn!(
                %error,
                retry_in = ?backoff,
                "directory backend does not answer the probe; the gateway is not ready unless \
                 it holds cached parties to serve"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = backoff.saturating_mul(2).min(PROBE_BACKOFF_MAX);
        }
    }

    /// Whether the cache holds a found party that can still be served (fresh, or within
    /// `max_stale` of its TTL): what keeps the gateway useful while the backend is down. "Not
    /// found" answers do not count: they are never served during an outage. Walks the cache
    /// until the first such party, so call it only when the backend does not answer.
    pub fn holds_servable_party(&self) -> bool {
        let now = Instant::now();
        self.inner
            .cache
            .iter()
            .any(|(_, slot)| slot.stale(now).is_some())
    }
}

/// Removes a finished (or panicked) refresh from the in-flight map.
struct Landing {
    inner: Arc<Inner>,
    key: String,
    generation: u64,
}

impl Drop for Landing {
    fn drop(&mut self) {
        land(&self.inner, &self.key, self.generation);
    }
}

/// Removes the refresh of `key` started in `generation` from the in-flight map, leaving a newer
/// one (started after an invalidation) in place.
fn land(inner: &Inner, key: &str, generation: u64) {
    if let Ok(mut inflight) = inner.inflight.lock() {
        if inflight
            .get(key)
            .is_some_and(|(started, _)| *started == generation)
        {
            inflight.remove(key);
        }
    }
}

/// Caches `slot` for `asid` unless an invalidation came after the refresh started in
/// `generation`. Checked before and after the insert: an invalidation between the check and the
/// insert is caught by the second check (and one after it empties the cache itself).
async fn keep(inner: &Inner, asid: &str, generation: u64, slot: Slot) {
    let current = || inner.generation.load(Ordering::SeqCst) == generation;
    if !current() {
        tracing::debug!(
            asid,
            "directory answer not cached: invalidated while it was fetched"
        );
        return;
    }
    inner.cache.insert(asid.to_string(), Arc::new(slot)).await;
    if !current() {
        inner.cache.invalidate(asid).await;
    }
}

/// Logs (WARN) what a party a backend lookup just returned holds that the gateway cannot use:
/// per lookup, not per request (the party is cached with it). One limit for every party: at
/// most one line a second in all; the lines over it are dropped, and the next line that goes
/// out counts them (`held_back`).
fn warn_unusable(backend: &'static str, party: &Party) {
    static LOG: crate::loglimit::Every = crate::loglimit::Every::second();
    if let Some(held_back) = LOG.allow() {
        let unusable: Vec<String> = party.unusable.iter().map(ToString::to_string).collect();
        tracing::warn!(
            backend,
            asid = %party.system.asid,
            party_key = %party.system.party_key,
            ods_code = %party.system.ods_code,
            unusable = %unusable.join("; "),
            held_back,
            "directory: message handlers of this party cannot be used; the rest of the party is"
        );
    }
}

/// One refresh of `asid`: what a refresh that finished just before left behind, the stale party
/// within `stale_retry` of a failure, or else the backend's answer (stale party on failure).
async fn refresh_now(inner: &Inner, asid: &str, generation: u64) -> Outcome {
    let policy = &inner.policy;
    let now = Instant::now();
    let current = inner.cache.get(asid).await;
    if let Some(slot) = &current {
        if let Some(answer) = slot.fresh(now) {
            return Outcome::Answer(answer.clone());
        }
        if let (Some(party), Some(failed_at)) = (slot.stale(now), slot.failed_at) {
            if now < later(failed_at, policy.stale_retry) {
                return Outcome::Stale(party.clone());
            }
        }
    }
    let result = inner.backend.party(asid).await;
    let now = Instant::now();
    match result {
        Ok(found) => {
            inner.state.store(ANSWERING, Ordering::Release);
            if let Some(party) = found.as_ref().filter(|p| !p.unusable.is_empty()) {
                inner
                    .counters
                    .unusable_handlers
                    .fetch_add(party.unusable.len() as u64, Ordering::Relaxed);
                warn_unusable(inner.backend.name(), party);
            }
            let found = found.map(Arc::new);
            keep(
                inner,
                asid,
                generation,
                Slot::answered(found.clone(), now, policy),
            )
            .await;
            Outcome::Answer(found)
        }
        Err(error) => {
            // Answering until a probe says otherwise: wake the prober to ask.
            if inner
                .state
                .compare_exchange(ANSWERING, SUSPECT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                inner.probe_wanted.notify_one();
            }
            inner
                .counters
                .backend_errors
                .fetch_add(1, Ordering::Relaxed);
            let stale = current
                .as_deref()
                .and_then(|slot| Some((slot, slot.stale(now)?.clone())));
            match stale {
                Some((slot, party)) => {
                    tracing::warn!(asid, error = %error, "directory backend failed; serving the cached entry past its TTL");
                    let marked = Slot {
                        answer: slot.answer.clone(),
                        failed_at: Some(now),
                        evict_at: slot.evict_at,
                    };
                    keep(inner, asid, generation, marked).await;
                    Outcome::Stale(party)
                }
                None => Outcome::Failed(error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ldif, AccreditedSystem, MessageHandler};
    use super::*;
    use futures_util::future::BoxFuture;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use tokio::sync::Semaphore;

    const METADATA: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";
    const SLOT: &str = "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1";
    const LONG: Duration = Duration::from_secs(3600);

    fn party(asid: &str) -> Party {
        Party {
            system: AccreditedSystem {
                asid: asid.into(),
                ods_code: "B82617".into(),
                party_key: "B82617-0000806".into(),
                interactions: vec![METADATA.into(), SLOT.into()],
                product_name: None,
                product_version: None,
            },
            handlers: vec![MessageHandler {
                id: "a".into(),
                ods_code: "B82617".into(),
                party_key: "B82617-0000806".into(),
                interaction: METADATA.into(),
                endpoint: "https://localhost:9443/B82617/STU3/1/gpconnect".into(),
                fqdn: "localhost".into(),
                cpa_id: "a".into(),
            }],
            registered_fqdns: vec!["localhost".into()],
            unusable: Vec::new(),
        }
    }

    /// A backend that counts queries, can be made to fail, and can hold queries at a gate.
    struct CountingBackend {
        parties: HashMap<String, Party>,
        calls: AtomicUsize,
        probes: AtomicUsize,
        fail: AtomicBool,
        /// Lookups fail, probes do not (one party's bad data).
        fail_lookups: AtomicBool,
        /// Probes never answer.
        hang_probes: AtomicBool,
        /// When set, each query waits for a permit before answering.
        gate: Option<Arc<Semaphore>>,
    }

    impl CountingBackend {
        fn new(asids: &[&str]) -> Arc<Self> {
            Arc::new(Self::with_gate(asids, None))
        }

        fn with_gate(asids: &[&str], gate: Option<Arc<Semaphore>>) -> Self {
            Self {
                parties: asids.iter().map(|a| (a.to_string(), party(a))).collect(),
                calls: AtomicUsize::new(0),
                probes: AtomicUsize::new(0),
                fail: AtomicBool::new(false),
                fail_lookups: AtomicBool::new(false),
                hang_probes: AtomicBool::new(false),
                gate,
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn probes(&self) -> usize {
            self.probes.load(Ordering::SeqCst)
        }

        fn fail(&self, fail: bool) {
            self.fail.store(fail, Ordering::SeqCst);
        }

        fn fail_lookups(&self, fail: bool) {
            self.fail_lookups.store(fail, Ordering::SeqCst);
        }

        fn hang_probes(&self, hang: bool) {
            self.hang_probes.store(hang, Ordering::SeqCst);
        }
    }

    impl DirectoryBackend for CountingBackend {
        fn name(&self) -> &'static str {
            "counting"
        }

        fn party<'a>(
            &'a self,
            asid: &'a str,
        ) -> BoxFuture<'a, Result<Option<Party>, DirectoryError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if let Some(gate) = &self.gate {
                    let _permit = gate.acquire().await.map_err(|_| DirectoryError::Backend {
                        backend: "counting",
                        reason: "gate closed".into(),
                    })?;
                }
                if self.fail.load(Ordering::SeqCst) || self.fail_lookups.load(Ordering::SeqCst) {
                    return Err(DirectoryError::Backend {
                        backend: "counting",
                        reason: "down".into(),
                    });
                }
                Ok(self.parties.get(asid).cloned())
            })
        }

        /// Fails while the backend is down; hangs while told to.
        fn probe(&self) -> BoxFuture<'_, Result<(), DirectoryError>> {
            Box::pin(async move {
                self.probes.fetch_add(1, Ordering::SeqCst);
                if self.hang_probes.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                if self.fail.load(Ordering::SeqCst) {
                    return Err(DirectoryError::Backend {
                        backend: "counting",
                        reason: "down".into(),
                    });
                }
                Ok(())
            })
        }
    }

    fn policy(ttl: Duration, negative_ttl: Duration) -> CachePolicy {
        CachePolicy {
            ttl,
            negative_ttl,
            capacity: 1000,
            max_stale: Duration::ZERO,
            stale_retry: Duration::ZERO,
        }
    }

    fn directory(backend: &Arc<CountingBackend>, policy: CachePolicy) -> Directory {
        let backend: Arc<dyn DirectoryBackend> = backend.clone();
        Directory::new(backend, policy)
    }

    #[test]
    fn default_policy_uses_the_named_defaults() {
        let policy = CachePolicy::default();
        assert_eq!(policy.ttl, Duration::from_secs(900));
        assert_eq!(policy.negative_ttl, Duration::from_secs(60));
        assert_eq!(policy.capacity, 100_000);
        assert_eq!(policy.max_stale, Duration::from_secs(3600));
        assert_eq!(policy.stale_retry, Duration::from_secs(1));
    }

    #[test]
    fn later_saturates_instead_of_panicking() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now);
        assert_eq!(later(now, Duration::ZERO), now);
    }

    /// What a lookup found unusable is counted for the metric once per backend lookup that
    /// returned it, not per request served from the cache.
    #[tokio::test]
    async fn unusable_handlers_are_counted_per_backend_lookup() {
        let mut backend = CountingBackend::with_gate(&["1", "2"], None);
        let bad = backend.parties.get_mut("1").expect("party");
        for interaction in [
            SLOT,
            "urn:nhs:names:services:gpconnect:fhir:rest:create:appointment-1",
        ] {
            bad.unusable.push(crate::directory::Unusable {
                interaction: interaction.into(),
                handlers: vec!["x".into()],
                reason: "a trailing /".into(),
                effect: crate::directory::Effect::Interaction,
            });
        }
        let backend = Arc::new(backend);
        let dir = directory(&backend, policy(LONG, LONG));
        for _ in 0..3 {
            dir.party("1").await.unwrap().unwrap();
            dir.party("2").await.unwrap().unwrap();
        }
        assert_eq!(backend.calls(), 2);
        assert_eq!(
            dir.stats().unusable_handlers,
            2,
            "once per lookup, not per hit"
        );
        dir.invalidate("1").await;
        dir.party("1").await.unwrap().unwrap();
        assert_eq!(backend.calls(), 3);
        assert_eq!(dir.stats().unusable_handlers, 4);
    }

    #[tokio::test]
    async fn found_and_not_found_are_both_cached_and_counted() {
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(&backend, policy(LONG, LONG));
        assert_eq!(dir.backend_name(), "counting");
        let first = dir.party("1").await.unwrap().unwrap();
        let second = dir.party("1").await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &second), "a hit returns the cached Arc");
        assert_eq!(first.system.asid, "1");
        assert_eq!(dir.party("2").await.unwrap(), None);
        assert_eq!(dir.party("2").await.unwrap(), None);
        assert_eq!(backend.calls(), 2);
        let stats = dir.stats();
        assert_eq!((stats.hits, stats.misses), (2, 2));
        assert_eq!((stats.stale_served, stats.backend_errors), (0, 0));
        assert!(dir.healthy());
    }

    #[tokio::test]
    async fn negative_ttl_applies_to_not_found_only() {
        // Zero lifetime expires an entry at once, so no waiting.
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(&backend, policy(LONG, Duration::ZERO));
        for _ in 0..3 {
            assert!(dir.party("1").await.unwrap().is_some());
            assert!(dir.party("2").await.unwrap().is_none());
        }
        // "1" asked once (cached for LONG), "2" asked every time (expired at once).
        assert_eq!(backend.calls(), 1 + 3);
    }

    #[tokio::test]
    async fn ttl_applies_to_found_only() {
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(&backend, policy(Duration::ZERO, LONG));
        for _ in 0..3 {
            assert!(dir.party("1").await.unwrap().is_some());
            assert!(dir.party("2").await.unwrap().is_none());
        }
        assert_eq!(backend.calls(), 3 + 1);
    }

    #[tokio::test]
    async fn invalidate_forgets_one_and_invalidate_all_forgets_everything() {
        let backend = CountingBackend::new(&["1", "2"]);
        let dir = directory(&backend, policy(LONG, LONG));
        dir.party("1").await.unwrap();
        dir.party("2").await.unwrap();
        assert_eq!(backend.calls(), 2);

        dir.invalidate("1").await;
        dir.party("1").await.unwrap();
        dir.party("2").await.unwrap();
        assert_eq!(
            backend.calls(),
            3,
            "only the invalidated ASID is asked again"
        );

        dir.invalidate_all();
        dir.party("1").await.unwrap();
        dir.party("2").await.unwrap();
        assert_eq!(backend.calls(), 5);
    }

    /// An invalidation voids a refresh already running: the answer it fetched reaches the
    /// callers already waiting but is not cached, and a caller arriving after the invalidation
    /// does not join it but asks the backend anew.
    /// Yields while `waiting`, failing with `what` after 100,000 turns.
    async fn spin_while(what: &str, waiting: impl Fn() -> bool) {
        let mut spins = 0;
        while waiting() {
            tokio::task::yield_now().await;
            spins += 1;
            assert!(spins < 100_000, "{what}");
        }
    }

    #[tokio::test]
    async fn an_invalidation_voids_the_refreshes_already_running() {
        for all in [false, true] {
            let gate = Arc::new(Semaphore::new(0));
            let backend = Arc::new(CountingBackend::with_gate(&["42"], Some(gate.clone())));
            let dir = directory(&backend, policy(LONG, LONG));
            let before = {
                let dir = dir.clone();
                tokio::spawn(async move { dir.party("42").await })
            };
            spin_while("the refresh never started", || backend.calls() == 0).await;
            if all {
                dir.invalidate_all();
            } else {
                dir.invalidate("42").await;
            }
            let after = {
                let dir = dir.clone();
                tokio::spawn(async move { dir.party("42").await })
            };
            spin_while(
                "the caller after the invalidation joined the old refresh",
                || backend.calls() < 2,
            )
            .await;
            // The old refresh ends first: its answer is not kept.
            gate.add_permits(1);
            assert!(before.await.unwrap().unwrap().is_some());
            gate.add_permits(1);
            assert!(after.await.unwrap().unwrap().is_some());
            assert!(dir.party("42").await.unwrap().is_some());
            assert_eq!(
                backend.calls(),
                2,
                "the new refresh's answer is cached (all: {all})"
            );
        }

        // Without a newer refresh, the voided answer leaves nothing cached.
        let gate = Arc::new(Semaphore::new(0));
        let backend = Arc::new(CountingBackend::with_gate(&["42"], Some(gate.clone())));
        let dir = directory(&backend, policy(LONG, LONG));
        let before = {
            let dir = dir.clone();
            tokio::spawn(async move { dir.party("42").await })
        };
        while backend.calls() == 0 {
            tokio::task::yield_now().await;
        }
        dir.invalidate("42").await;
        gate.add_permits(2);
        assert!(before.await.unwrap().unwrap().is_some());
        assert!(dir.party("42").await.unwrap().is_some());
        assert_eq!(backend.calls(), 2, "the voided answer was not cached");
    }

    #[tokio::test]
    async fn backend_errors_are_returned_and_not_cached() {
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(&backend, policy(LONG, LONG));
        backend.fail(true);
        let err = dir.party("1").await.unwrap_err();
        assert_eq!(err.to_string(), "directory backend counting: down");
        assert!(
            !dir.healthy(),
            "a failed query makes the directory unhealthy"
        );
        backend.fail(false);
        assert!(dir.party("1").await.unwrap().is_some());
        assert!(dir.healthy(), "a successful query makes it healthy again");
        assert_eq!(backend.calls(), 2);
        assert_eq!(dir.stats().backend_errors, 1);
    }

    /// A prober for `dir` until the returned token is cancelled (each probe bounded by `bound`).
    fn prober(dir: &Directory, bound: Duration) -> CancellationToken {
        let stop = CancellationToken::new();
        let (dir, token) = (dir.clone(), stop.clone());
        tokio::spawn(async move { dir.run_prober(bound, token).await });
        stop
    }

    /// A remote backend is not usable before it has answered. The prober asks it at start,
    /// then with back-off (1 s, 2 s, 4 s, 8 s, 16 s, 16 s...) while it fails; once it answers it
    /// is usable without any lookup, and the prober stops asking.
    #[tokio::test(start_paused = true)]
    async fn a_remote_backend_is_usable_once_it_answers_and_probed_with_back_off_until_then() {
        let backend = CountingBackend::new(&["1"]);
        backend.fail(true);
        let dir = directory(&backend, policy(LONG, LONG));
        assert!(!dir.backend_answers() && !dir.usable() && !dir.healthy());
        let start = tokio::time::Instant::now();
        let stop = prober(&dir, Duration::from_secs(3));
        // Probes at 0, 1, 3, 7, 15, 31, 47 s: each check is half a second after one.
        for (at, probes) in [(0.5, 1), (1.5, 2), (3.5, 3), (7.5, 4), (15.5, 5), (31.5, 6)] {
            tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
            assert_eq!(backend.probes(), probes, "at {at} s");
            assert!(!dir.usable(), "at {at} s");
        }
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(backend.probes(), 6, "the back-off stops growing at 16 s");
        backend.fail(false);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(backend.probes(), 7);
        assert!(dir.backend_answers() && dir.usable() && dir.healthy());
        assert_eq!(backend.calls(), 0, "no lookup made it usable");
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(backend.probes(), 7, "an answering backend is not probed");
        stop.cancel();
    }

    /// A probe that hangs is given up after its bound and counts as a failure; the next one
    /// comes after the back-off.
    #[tokio::test(start_paused = true)]
    async fn a_hung_probe_is_a_failure_after_its_bound() {
        let backend = CountingBackend::new(&["1"]);
        backend.hang_probes(true);
        let dir = directory(&backend, policy(LONG, LONG));
        let stop = prober(&dir, Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(backend.probes(), 1);
        assert!(!dir.usable());
        // Given up at 3 s, asked again at 4 s.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(backend.probes(), 2);
        backend.hang_probes(false);
        // That probe hangs to 7 s; the next, at 9 s, is answered.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(backend.probes(), 3);
        assert!(dir.usable() && dir.healthy());
        stop.cancel();
    }

    /// A lookup answered while a probe hangs settles the question: the probe's later failure
    /// does not put the backend back down (before, it did, and readiness said not usable until
    /// the next probe, up to 16 s later).
    #[tokio::test(start_paused = true)]
    async fn a_lookup_answered_while_a_probe_runs_wins_over_its_failure() {
        let backend = CountingBackend::new(&["1"]);
        backend.hang_probes(true);
        let dir = directory(&backend, policy(LONG, LONG));
        let stop = prober(&dir, Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(backend.probes(), 1, "a probe is running");
        assert!(!dir.backend_answers());
        assert!(dir.party("1").await.expect("lookup").is_some());
        assert!(
            dir.backend_answers() && dir.healthy(),
            "the lookup answered"
        );
        // The probe is given up at 3 s: a failure, which must not undo the answer.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            dir.backend_answers() && dir.healthy(),
            "the hung probe put it down"
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(backend.probes(), 1, "an answering backend is not probed");
        stop.cancel();
    }

    /// A lookup that fails while the backend answers (one party's bad data) is not an outage:
    /// the backend keeps counting as answering, and the prober's one probe clears the failure.
    /// A lookup that fails because the backend is down makes it unusable once the probe fails.
    #[tokio::test(start_paused = true)]
    async fn a_failed_lookup_wakes_the_prober_which_decides() {
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(&backend, policy(LONG, LONG));
        let stop = prober(&dir, Duration::from_secs(3));
        until("the first probe", || dir.healthy()).await;
        assert_eq!(backend.probes(), 1);

        backend.fail_lookups(true);
        assert!(dir.party("1").await.is_err());
        assert!(dir.backend_answers(), "one failed lookup is not an outage");
        until("the probe after the failure", || dir.healthy()).await;
        assert_eq!(backend.probes(), 2);
        assert!(dir.backend_answers());

        backend.fail(true);
        assert!(dir.party("2").await.is_err());
        until("the failed probe", || !dir.backend_answers()).await;
        assert_eq!(backend.probes(), 3);
        assert!(!dir.usable(), "nothing cached to serve");
        stop.cancel();
    }

    /// Only found parties that may still be served keep the directory usable during an
    /// outage; "not found" answers (never served stale) do not.
    #[tokio::test]
    async fn only_servable_parties_count_as_a_fallback() {
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(&backend, policy(LONG, LONG));
        assert!(!dir.holds_servable_party());
        assert_eq!(dir.party("2").await.unwrap(), None);
        dir.inner.cache.run_pending_tasks().await;
        assert_eq!(dir.stats().entries, 1);
        assert!(
            !dir.holds_servable_party(),
            "a cached 'not found' is no fallback"
        );
        assert!(dir.party("1").await.unwrap().is_some());
        assert!(dir.holds_servable_party());

        // Past its TTL with no max_stale, a party cannot be served any more.
        let dir = directory(&backend, policy(Duration::ZERO, LONG));
        assert!(dir.party("1").await.unwrap().is_some());
        assert!(!dir.holds_servable_party());
    }

    #[tokio::test]
    async fn values_that_cannot_be_asids_never_reach_the_backend() {
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(&backend, policy(LONG, LONG));
        for asid in ["", "abc", "1 ", "１", &"9".repeat(33)] {
            assert_eq!(dir.party(asid).await.unwrap(), None, "{asid:?}");
        }
        assert_eq!(backend.calls(), 0);
    }

    #[tokio::test]
    async fn a_stale_party_is_served_while_the_backend_fails_and_counted() {
        // ttl zero: stale at once; max_stale long: still servable.
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(
            &backend,
            CachePolicy {
                max_stale: LONG,
                ..policy(Duration::ZERO, LONG)
            },
        );
        let fetched = dir.party("1").await.unwrap().unwrap();
        backend.fail(true);
        let served = dir.party("1").await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&fetched, &served), "the last known party");
        let stats = dir.stats();
        assert_eq!(
            (stats.stale_served, stats.backend_errors, stats.misses),
            (1, 1, 2)
        );
        assert!(!dir.healthy());

        // stale_retry is zero: each stale request is served stale at once, and asks again
        // behind it.
        dir.party("1").await.unwrap().unwrap();
        assert_eq!(dir.stats().stale_served, 2);
        until("the third query", || backend.calls() == 3).await;

        // The backend recovers: the request that finds it so is still served stale, and the
        // fresh answer fetched behind it replaces the stale one for the next.
        backend.fail(false);
        dir.party("1").await.unwrap().unwrap();
        assert_eq!(dir.stats().stale_served, 3);
        until("healthy again", || dir.healthy()).await;
        assert_eq!(backend.calls(), 4);
        dir.party("1").await.unwrap().unwrap();
        assert_eq!(dir.stats().stale_served, 3);
        assert_eq!(dir.stats().hits, 0, "ttl is zero: never fresh");

        // "Not found" is never served stale: an unknown ASID during an outage is an error.
        let dir = directory(
            &backend,
            CachePolicy {
                max_stale: LONG,
                ..policy(Duration::ZERO, Duration::ZERO)
            },
        );
        assert_eq!(dir.party("2").await.unwrap(), None);
        backend.fail(true);
        assert!(dir.party("2").await.is_err());
    }

    /// Waits (yielding to the refreshes spawned behind requests) until `done`.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..5000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("never happened: {what}");
    }

    /// A backend that hangs costs one request its wait, not one per `stale_retry`: once a
    /// refresh of a stale party has failed, the party is served at once and the backend is
    /// asked again behind the request, one query at a time, however many requests come.
    #[tokio::test]
    async fn a_hung_backend_delays_no_request_once_a_refresh_has_failed() {
        let gate = Arc::new(Semaphore::new(0));
        let backend = Arc::new(CountingBackend::with_gate(&["1"], Some(gate.clone())));
        let dir = directory(
            &backend,
            CachePolicy {
                max_stale: LONG,
                ..policy(Duration::ZERO, LONG)
            },
        );
        gate.add_permits(1);
        dir.party("1").await.unwrap().unwrap();
        backend.fail(true);
        dir.party("1").await.unwrap().unwrap();
        assert_eq!((backend.calls(), dir.stats().stale_served), (2, 1));
        // Now it hangs (its one permit held here): requests are served stale without waiting
        // for it.
        let hung = gate.acquire().await.expect("permit");
        for _ in 0..20 {
            let served = tokio::time::timeout(Duration::from_secs(10), dir.party("1")).await;
            assert!(
                served
                    .expect("a request waited on the hung backend")
                    .is_ok(),
                "served stale"
            );
        }
        assert_eq!(dir.stats().stale_served, 21);
        until("the third query", || backend.calls() == 3).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            backend.calls(),
            3,
            "one query at a time to the hung backend"
        );
        // It answers again: the refresh behind the requests lands, and the next request is
        // answered by the backend, not served stale.
        backend.fail(false);
        drop(hung);
        until("healthy again", || dir.healthy()).await;
        dir.party("1").await.unwrap().unwrap();
        assert_eq!(dir.stats().stale_served, 21);
    }

    #[tokio::test]
    async fn after_a_failed_refresh_the_stale_party_is_served_without_asking_again() {
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(
            &backend,
            CachePolicy {
                max_stale: LONG,
                stale_retry: LONG,
                ..policy(Duration::ZERO, LONG)
            },
        );
        dir.party("1").await.unwrap().unwrap();
        backend.fail(true);
        for _ in 0..5 {
            dir.party("1").await.unwrap().unwrap();
        }
        assert_eq!(
            backend.calls(),
            2,
            "one failed refresh, then stale_retry holds"
        );
        assert_eq!(dir.stats().stale_served, 5);
        assert_eq!(dir.stats().backend_errors, 1);
    }

    #[tokio::test]
    async fn past_max_stale_the_error_is_returned() {
        // ttl and max_stale zero: the party is gone at once, so a failing backend is an error.
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(&backend, policy(Duration::ZERO, LONG));
        dir.party("1").await.unwrap().unwrap();
        backend.fail(true);
        let err = dir.party("1").await.unwrap_err();
        assert_eq!(err.to_string(), "directory backend counting: down");
        assert_eq!(dir.stats().stale_served, 0);
    }

    /// 100 concurrent cold lookups of one ASID make exactly one backend query. The backend is
    /// held at a gate until every caller is waiting, so without coalescing each would query.
    #[tokio::test]
    async fn concurrent_misses_are_coalesced_into_one_query() {
        const CALLERS: usize = 100;
        let gate = Arc::new(Semaphore::new(0));
        let backend = Arc::new(CountingBackend::with_gate(&["42"], Some(gate.clone())));
        let dir = directory(&backend, policy(LONG, LONG));
        let started = Arc::new(AtomicUsize::new(0));

        let tasks: Vec<_> = (0..CALLERS)
            .map(|_| {
                let dir = dir.clone();
                let started = started.clone();
                tokio::spawn(async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    dir.party("42").await
                })
            })
            .collect();

        // Single-threaded runtime: a task that has counted itself has run on to its first
        // await inside `party` (the shared refresh); the refresh task is at the gate.
        spin_while("callers never started", || {
            started.load(Ordering::SeqCst) < CALLERS || backend.calls() == 0
        })
        .await;
        assert_eq!(backend.calls(), 1, "only one caller may reach the backend");
        gate.add_permits(CALLERS);

        let mut results = Vec::with_capacity(CALLERS);
        for task in tasks {
            results.push(task.await.unwrap().unwrap().unwrap());
        }
        assert_eq!(backend.calls(), 1);
        assert!(
            results.iter().all(|p| Arc::ptr_eq(p, &results[0])),
            "every caller shares one answer"
        );
        assert_eq!(dir.stats().misses, CALLERS as u64);
    }

    /// Callers queued behind a failing query share its failure: one backend query, not 100.
    #[tokio::test]
    async fn concurrent_misses_share_a_failure() {
        const CALLERS: usize = 100;
        let gate = Arc::new(Semaphore::new(0));
        let backend = Arc::new(CountingBackend::with_gate(&["42"], Some(gate.clone())));
        backend.fail(true);
        let dir = directory(&backend, policy(LONG, LONG));
        let started = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..CALLERS)
            .map(|_| {
                let dir = dir.clone();
                let started = started.clone();
                tokio::spawn(async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    dir.party("42").await
                })
            })
            .collect();
        spin_while("callers never started", || {
            started.load(Ordering::SeqCst) < CALLERS || backend.calls() == 0
        })
        .await;
        gate.add_permits(CALLERS);
        for task in tasks {
            assert!(task.await.unwrap().is_err());
        }
        assert_eq!(backend.calls(), 1);
        assert_eq!(dir.stats().backend_errors, 1);

        // A caller arriving after the failure asks again: errors are not cached.
        backend.fail(false);
        assert!(dir.party("42").await.unwrap().is_some());
        assert_eq!(backend.calls(), 2);
    }

    /// A backend that panics fails the lookups waiting on it, and the next miss starts afresh.
    #[tokio::test]
    async fn a_panicking_backend_is_an_error_not_a_stuck_key() {
        struct Panics(AtomicUsize);
        impl DirectoryBackend for Panics {
            fn name(&self) -> &'static str {
                "panics"
            }
            fn party<'a>(
                &'a self,
                _asid: &'a str,
            ) -> BoxFuture<'a, Result<Option<Party>, DirectoryError>> {
                let n = self.0.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    if n == 0 {
                        panic!("backend bug");
                    }
                    Ok(None)
                })
            }
            fn probe(&self) -> BoxFuture<'_, Result<(), DirectoryError>> {
                Box::pin(async { Ok(()) })
            }
        }
        let dir = Directory::new(Arc::new(Panics(AtomicUsize::new(0))), policy(LONG, LONG));
        let err = dir.party("1").await.unwrap_err();
        assert!(err.to_string().contains("the lookup task failed"), "{err}");
        assert_eq!(
            dir.party("1").await.unwrap(),
            None,
            "the next miss asks again"
        );
    }

    /// A caller that goes away does not cancel the query the others wait for.
    #[tokio::test]
    async fn a_cancelled_caller_does_not_cancel_the_shared_refresh() {
        let gate = Arc::new(Semaphore::new(0));
        let backend = Arc::new(CountingBackend::with_gate(&["42"], Some(gate.clone())));
        let dir = directory(&backend, policy(LONG, LONG));
        let first = {
            let dir = dir.clone();
            tokio::spawn(async move { dir.party("42").await })
        };
        let second = {
            let dir = dir.clone();
            tokio::spawn(async move { dir.party("42").await })
        };
        spin_while("the refresh never started", || backend.calls() == 0).await;
        first.abort();
        gate.add_permits(1);
        assert!(second.await.unwrap().unwrap().is_some());
        assert_eq!(backend.calls(), 1);
        assert!(
            dir.party("42").await.unwrap().is_some(),
            "cached by the refresh"
        );
        assert_eq!(backend.calls(), 1);
    }

    #[tokio::test]
    async fn the_ldif_backend_is_always_healthy() {
        let backend: Arc<dyn DirectoryBackend> =
            Arc::new(ldif::LdifBackend::development_world().unwrap());
        let dir = Directory::new(backend, CachePolicy::default());
        assert!(
            dir.healthy(),
            "usable from the start, with no probe and no lookup"
        );
        assert!(dir.backend_answers() && dir.usable());
        assert_eq!(dir.backend_name(), "ldif");
        let consumer = dir.party("200000000359").await.unwrap().unwrap();
        assert!(consumer.has_fqdn("consumer.dev.local"));
        assert!(consumer.may(SLOT));
        let provider = dir.party("918999198993").await.unwrap().unwrap();
        assert_eq!(
            provider.handler_for(SLOT).map(|h| h.endpoint.as_str()),
            Some("https://localhost:9443/B82617/STU3/1/gpconnect")
        );
        assert!(dir.party("123456789012").await.unwrap().is_none());
    }
}
