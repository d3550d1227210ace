//! The SDS-style directory: who is accredited for what, and where their endpoints are.
//! Owns the model (accredited systems, message handlers), the backend trait, and the cache in
//! front of it. It answers questions; it never decides whether a request is allowed (authorise does).

//!
//! [`Directory`] is what the rest of the gateway holds: a backend behind a `moka` cache with a
//! TTL for found parties, a shorter one for "not found", and concurrent misses for one ASID
//! coalesced into a single backend query. Backend errors are never cached.

pub mod ldif;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use moka::future::Cache;
use moka::Expiry;

/// An accredited system (`nhsAs`): one ASID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccreditedSystem {
    pub asid: String,
    pub ods_code: String,
    pub party_key: String,
    /// `nhsAsSvcIA`: interactions this system may send (consumer) or serve (provider).
    pub interactions: Vec<String>,
    pub product_name: Option<String>,
    pub product_version: Option<String>,
}

/// A message handler (`nhsMhs`): one endpoint for one interaction of one party key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageHandler {
    /// `uniqueIdentifier` of the MHS record.
    pub id: String,
    pub ods_code: String,
    pub party_key: String,
    /// `nhsMhsSvcIA` (single-valued).
    pub interaction: String,
    /// `nhsMhsEndPoint`, copied exactly (no trailing `/` for GP Connect).
    pub endpoint: String,
    /// `nhsMhsFQDN`.
    pub fqdn: String,
    /// `nhsMhsCPAId`.
    pub cpa_id: String,
}

/// Everything the gateway needs to know about one ASID: its AS record and the message handlers
/// that share its party key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    pub system: AccreditedSystem,
    pub handlers: Vec<MessageHandler>,
}

/// Why the directory could not answer (distinct from "no such ASID", which is `Ok(None)`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum DirectoryError {
    #[error("directory backend {backend}: {reason}")]
    Backend {
        backend: &'static str,
        reason: String,
    },
}

/// A source of directory data (LDIF file, LDAP, SDS FHIR API).
pub trait DirectoryBackend: Send + Sync + 'static {
    /// Short name for logs and metrics ("ldif", "ldap", "fhir").
    fn name(&self) -> &'static str;
    /// The AS record with this ASID and every MHS record with its party key; `Ok(None)` when
    /// no such ASID is registered.
    fn party<'a>(&'a self, asid: &'a str) -> BoxFuture<'a, Result<Option<Party>, DirectoryError>>;
}

impl Party {
    /// Whether this system is accredited for `interaction` (`nhsAsSvcIA`, compared case-exact as
    /// the SDS `caseExactMatch` rule does).
    pub fn may(&self, interaction: &str) -> bool {
        self.system.interactions.iter().any(|i| i == interaction)
    }

    /// The message handler (endpoint) registered for `interaction` under this party key, compared
    /// case-exact. SDS allows one per party key and interaction; the LDIF backend enforces that.
    pub fn handler_for(&self, interaction: &str) -> Option<&MessageHandler> {
        self.handlers.iter().find(|h| h.interaction == interaction)
    }

    /// The distinct `nhsMhsFQDN`s of this party's message handlers (the names a client
    /// certificate may present for this ASID), in directory order, duplicates (ignoring ASCII
    /// case) removed.
    pub fn fqdns(&self) -> impl Iterator<Item = &str> {
        let handlers = &self.handlers;
        handlers.iter().enumerate().filter_map(move |(i, h)| {
            let seen = handlers[..i]
                .iter()
                .any(|earlier| earlier.fqdn.eq_ignore_ascii_case(&h.fqdn));
            (!seen).then_some(h.fqdn.as_str())
        })
    }

    /// Whether `name` is one of this party's registered FQDNs. DNS names compare ASCII
    /// case-insensitively; nothing else is normalised.
    pub fn has_fqdn(&self, name: &str) -> bool {
        self.handlers
            .iter()
            .any(|h| h.fqdn.eq_ignore_ascii_case(name))
    }
}

/// Default lifetime of a cached party (the 900 s the NHS MHS route lookup uses).
pub const DEFAULT_TTL: Duration = Duration::from_secs(900);
/// Default lifetime of a cached "no such ASID".
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// Default maximum number of cached ASIDs (found and not found together).
pub const DEFAULT_CAPACITY: u64 = 100_000;

/// How long the [`Directory`] cache keeps answers, and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// Lifetime of a found party.
    pub ttl: Duration,
    /// Lifetime of a "not found" answer; keep it short so a new registration shows up quickly.
    pub negative_ttl: Duration,
    /// Maximum number of cached ASIDs.
    pub capacity: u64,
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            capacity: DEFAULT_CAPACITY,
        }
    }
}

/// Per-entry expiry: found parties live `ttl`, "not found" answers `negative_ttl`.
struct PartyExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl PartyExpiry {
    fn lifetime(&self, value: &Option<Arc<Party>>) -> Duration {
        match value {
            Some(_) => self.ttl,
            None => self.negative_ttl,
        }
    }
}

impl Expiry<String, Option<Arc<Party>>> for PartyExpiry {
    fn expire_after_create(
        &self,
        _asid: &String,
        value: &Option<Arc<Party>>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(self.lifetime(value))
    }

    fn expire_after_update(
        &self,
        _asid: &String,
        value: &Option<Arc<Party>>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.lifetime(value))
    }
}

/// The longest ASID the directory will look up. Real ASIDs are 12 digits.
const MAX_ASID_LEN: usize = 32;

/// The cached directory the gateway queries: a [`DirectoryBackend`] behind a `moka` cache.
/// Cloning is cheap and clones share the cache.
#[derive(Clone)]
pub struct Directory {
    backend: Arc<dyn DirectoryBackend>,
    cache: Cache<String, Option<Arc<Party>>>,
}

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Directory")
            .field("backend", &self.backend.name())
            .field("cached", &self.cache.entry_count())
            .finish()
    }
}

impl Directory {
    /// A directory answering from `backend`, caching as `policy` says.
    pub fn new(backend: Arc<dyn DirectoryBackend>, policy: CachePolicy) -> Self {
        let cache = Cache::builder()
            .max_capacity(policy.capacity)
            .expire_after(PartyExpiry {
                ttl: policy.ttl,
                negative_ttl: policy.negative_ttl,
            })
            .build();
        Self { backend, cache }
    }

    /// The party registered under `asid`, from the cache or else the backend; `Ok(None)` when no
    /// such ASID is registered. Concurrent misses for one ASID share a single backend query;
    /// errors are returned to every waiter and are not cached. Anything that is not 1 to 32
    /// ASCII digits cannot be an ASID and is answered `Ok(None)` without touching cache or
    /// backend.
    ///
    /// A cache hit looks the key up by `&str` (no key allocation) and clones one `Arc`.
    pub async fn party(&self, asid: &str) -> Result<Option<Arc<Party>>, DirectoryError> {
        if !is_asid(asid) {
            return Ok(None);
        }
        let backend = &self.backend;
        self.cache
            .try_get_with_by_ref(asid, async move {
                backend.party(asid).await.map(|found| found.map(Arc::new))
            })
            .await
            .map_err(Arc::unwrap_or_clone)
    }

    /// The backend's short name ("ldif", "ldap", "fhir").
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Forget the cached answer for `asid`; the next [`party`](Self::party) asks the backend.
    pub async fn invalidate(&self, asid: &str) {
        self.cache.invalidate(asid).await;
    }

    /// Forget every cached answer (e.g. after the backend's data was reloaded).
    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }
}

/// ASIDs are digits (SDS `uniqueIdentifier` of an `nhsAs` record).
fn is_asid(asid: &str) -> bool {
    !asid.is_empty() && asid.len() <= MAX_ASID_LEN && asid.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tokio::sync::Semaphore;

    const METADATA: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";
    const SLOT: &str = "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1";

    fn handler(id: &str, interaction: &str, fqdn: &str) -> MessageHandler {
        MessageHandler {
            id: id.into(),
            ods_code: "B82617".into(),
            party_key: "B82617-0000806".into(),
            interaction: interaction.into(),
            endpoint: "https://localhost:9443/B82617/STU3/1/gpconnect".into(),
            fqdn: fqdn.into(),
            cpa_id: id.into(),
        }
    }

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
            handlers: vec![
                handler("a", METADATA, "localhost"),
                handler("b", SLOT, "LocalHost"),
                handler(
                    "c",
                    "urn:nhs:names:services:psis:MCCI_IN010000UK13",
                    "mhs.example",
                ),
            ],
        }
    }

    #[test]
    fn may_and_handler_for_are_case_exact() {
        let p = party("1");
        assert!(p.may(METADATA));
        assert!(!p.may(&METADATA.to_uppercase()));
        assert!(
            !p.may("urn:nhs:names:services:psis:MCCI_IN010000UK13"),
            "an MHS record is not accreditation"
        );
        assert_eq!(p.handler_for(SLOT).map(|h| h.id.as_str()), Some("b"));
        assert!(p.handler_for(&SLOT.to_uppercase()).is_none());
        assert!(p.handler_for("urn:unknown").is_none());
    }

    #[test]
    fn fqdns_are_distinct_ignoring_case_and_match_case_insensitively() {
        let p = party("1");
        assert_eq!(p.fqdns().collect::<Vec<_>>(), ["localhost", "mhs.example"]);
        assert!(p.has_fqdn("LOCALHOST"));
        assert!(p.has_fqdn("mhs.example"));
        assert!(!p.has_fqdn("mhs.example."));
        assert!(!p.has_fqdn("rogue.dev.local"));
        assert!(!p.has_fqdn(""));
    }

    #[test]
    fn default_policy_uses_the_named_defaults() {
        let policy = CachePolicy::default();
        assert_eq!(policy.ttl, Duration::from_secs(900));
        assert_eq!(policy.negative_ttl, Duration::from_secs(60));
        assert_eq!(policy.capacity, 100_000);
    }

    /// A backend that counts queries, can be made to fail, and can hold queries at a gate.
    struct CountingBackend {
        parties: HashMap<String, Party>,
        calls: AtomicUsize,
        fail: AtomicBool,
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
                fail: AtomicBool::new(false),
                gate,
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
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
                if self.fail.load(Ordering::SeqCst) {
                    return Err(DirectoryError::Backend {
                        backend: "counting",
                        reason: "down".into(),
                    });
                }
                Ok(self.parties.get(asid).cloned())
            })
        }
    }

    const LONG: Duration = Duration::from_secs(3600);

    fn directory(
        backend: &Arc<CountingBackend>,
        ttl: Duration,
        negative_ttl: Duration,
    ) -> Directory {
        let backend: Arc<dyn DirectoryBackend> = backend.clone();
        Directory::new(
            backend,
            CachePolicy {
                ttl,
                negative_ttl,
                capacity: 1000,
            },
        )
    }

    #[tokio::test]
    async fn found_and_not_found_are_both_cached() {
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(&backend, LONG, LONG);
        assert_eq!(dir.backend_name(), "counting");
        let first = dir.party("1").await.unwrap().unwrap();
        let second = dir.party("1").await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &second), "a hit returns the cached Arc");
        assert_eq!(first.system.asid, "1");
        assert_eq!(dir.party("2").await.unwrap(), None);
        assert_eq!(dir.party("2").await.unwrap(), None);
        assert_eq!(backend.calls(), 2);
    }

    #[tokio::test]
    async fn negative_ttl_applies_to_not_found_only() {
        // Zero lifetime expires an entry at once (moka: expired when expiry <= now), so no waiting.
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(&backend, LONG, Duration::ZERO);
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
        let dir = directory(&backend, Duration::ZERO, LONG);
        for _ in 0..3 {
            assert!(dir.party("1").await.unwrap().is_some());
            assert!(dir.party("2").await.unwrap().is_none());
        }
        assert_eq!(backend.calls(), 3 + 1);
    }

    #[tokio::test]
    async fn invalidate_forgets_one_and_invalidate_all_forgets_everything() {
        let backend = CountingBackend::new(&["1", "2"]);
        let dir = directory(&backend, LONG, LONG);
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

    #[tokio::test]
    async fn backend_errors_are_returned_and_not_cached() {
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(&backend, LONG, LONG);
        backend.fail.store(true, Ordering::SeqCst);
        let err = dir.party("1").await.unwrap_err();
        assert_eq!(err.to_string(), "directory backend counting: down");
        backend.fail.store(false, Ordering::SeqCst);
        assert!(dir.party("1").await.unwrap().is_some());
        assert_eq!(backend.calls(), 2);
    }

    #[tokio::test]
    async fn values_that_cannot_be_asids_never_reach_the_backend() {
        let backend = CountingBackend::new(&["1"]);
        let dir = directory(&backend, LONG, LONG);
        for asid in ["", "abc", "1 ", "１", &"9".repeat(MAX_ASID_LEN + 1)] {
            assert_eq!(dir.party(asid).await.unwrap(), None, "{asid:?}");
        }
        assert_eq!(backend.calls(), 0);
    }

    /// 100 concurrent cold lookups of one ASID make exactly one backend query. The backend is
    /// held at a gate until every caller is waiting, so without coalescing each would query.
    #[tokio::test]
    async fn concurrent_misses_are_coalesced_into_one_query() {
        const CALLERS: usize = 100;
        let gate = Arc::new(Semaphore::new(0));
        let backend = Arc::new(CountingBackend::with_gate(&["42"], Some(gate.clone())));
        let dir = directory(&backend, LONG, LONG);
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
        // await inside `party` (the gate, or moka's wait for the in-flight query).
        let mut spins = 0;
        while started.load(Ordering::SeqCst) < CALLERS {
            tokio::task::yield_now().await;
            spins += 1;
            assert!(spins < 100_000, "callers never started");
        }
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
    }

    #[tokio::test]
    async fn directory_over_the_ldif_development_world() {
        let backend: Arc<dyn DirectoryBackend> =
            Arc::new(ldif::LdifBackend::development_world().unwrap());
        let dir = Directory::new(backend, CachePolicy::default());
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
