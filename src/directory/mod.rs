//! The SDS-style directory: who is accredited for what, and where their endpoints are.
//! Owns the model (accredited systems, message handlers), the backend trait, the backends (an
//! LDIF file, LDAP, the SDS FHIR API) and the cache in front of them. It answers questions; it
//! never decides whether a request is allowed (authorise does).
//!
//! [`Directory`] (in `cache`) is what the rest of the gateway holds: a backend behind a `moka`
//! cache with a TTL for found parties, a shorter one for "not found", concurrent misses for one
//! ASID coalesced into a single backend query, and stale entries served while the backend fails.

pub mod cache;
pub mod fhir;
pub mod inspect;
pub mod ldap;
pub mod ldif;
pub mod reload;

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::config::DirectoryBackendConfig;
use crate::ssp::interactions::Catalogue;

pub use cache::{
    CachePolicy, Directory, DirectoryStats, DEFAULT_CAPACITY, DEFAULT_MAX_STALE,
    DEFAULT_NEGATIVE_TTL, DEFAULT_STALE_RETRY, DEFAULT_TTL, PROBE_BACKOFF_FIRST, PROBE_BACKOFF_MAX,
};

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
    /// Whether the backend answers now, asked with the cheapest query that reaches it (LDAP: a
    /// base-scope search of the search base; FHIR: one `/Device` search; LDIF: always, it answers
    /// from memory). The directory's background prober asks this at start and after a lookup
    /// failed, until it answers: one party's bad data fails its lookup but not the probe, so it
    /// is not taken for an outage.
    fn probe(&self) -> BoxFuture<'_, Result<(), DirectoryError>>;
    /// Whether the backend answers from memory (the LDIF file, loaded before the gateway
    /// starts): it counts as answering from the start, and is never probed. A remote backend
    /// counts as answering only once it has answered.
    fn answers_from_memory(&self) -> bool {
        false
    }
}

/// The longest one probe of the configured backend may take: LDAP, a search on the connection
/// it holds and, when that connection turns out broken, a new connection and the search again
/// (`connect_timeout` + 2 × `query_timeout`); FHIR, one request (`query_timeout`, which bounds
/// connecting too). `None` for the LDIF backend, which is never probed.
pub fn probe_bound(config: &DirectoryBackendConfig) -> Option<std::time::Duration> {
    match config {
        DirectoryBackendConfig::Ldif { .. } => None,
        DirectoryBackendConfig::Ldap(s) => Some(
            s.connect_timeout
                .saturating_add(s.query_timeout.saturating_mul(2)),
        ),
        DirectoryBackendConfig::Fhir(s) => Some(s.query_timeout),
    }
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

/// ASIDs are digits (SDS `uniqueIdentifier` of an `nhsAs` record), at most this long.
pub const MAX_ASID_LEN: usize = 32;

/// Whether `asid` can be an ASID: 1 to [`MAX_ASID_LEN`] ASCII digits.
pub fn is_asid(asid: &str) -> bool {
    !asid.is_empty() && asid.len() <= MAX_ASID_LEN && asid.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a registered `nhsMhsEndPoint` is one a request can be forwarded to: `https://`, a
/// host and a port of 1-65535, a path of non-empty segments (so no trailing `/`), no query, no
/// `..` or userinfo: exactly the endpoints a request's target URL can name (`parse_target`).
/// Anything else is a mistake in the directory data, not a provider to list.
pub fn is_forwardable_endpoint(endpoint: &str) -> bool {
    crate::ssp::envelope::parse_target(&format!("/{endpoint}"))
        .is_ok_and(|target| target.query().is_none())
}

/// Why an endpoint [`is_forwardable_endpoint`] refuses is refused, for operators.
pub const UNFORWARDABLE_ENDPOINT: &str = "not an https:// endpoint the gateway can forward to \
     (host, port 1-65535, a path of non-empty segments, no query)";

/// Checks what SDS promises of one party's message handlers and the LDIF backend enforces at
/// load time: one handler per interaction (party keys compare ignoring case, as
/// `caseIgnoreMatch` does), each at an endpoint a request can be forwarded to. Remote backends
/// call it on every answer.
pub fn check_handlers(handlers: &[MessageHandler]) -> Result<(), String> {
    for (i, h) in handlers.iter().enumerate() {
        if !is_forwardable_endpoint(&h.endpoint) {
            return Err(format!(
                "message handler {}: nhsMhsEndPoint {:?}: {UNFORWARDABLE_ENDPOINT}",
                h.id, h.endpoint
            ));
        }
        if let Some(first) = handlers[..i].iter().find(|earlier| {
            earlier.interaction == h.interaction
                && earlier.party_key.eq_ignore_ascii_case(&h.party_key)
        }) {
            return Err(format!(
                "party key {} has two message handlers for {}: {} and {}",
                h.party_key, h.interaction, first.id, h.id
            ));
        }
    }
    Ok(())
}

/// The `component` label of the remote directory's TLS reloads (`ldaps://`'s `ldap_cert`,
/// `ldap_key`, `ldap_ca`, `ldap_crls`, or the FHIR API's `fhir_ca`) in `ssp_reloads_total`:
/// one backend is configured at a time.
pub const TLS_COMPONENT: &str = "directory TLS";

/// The remote backend's TLS material in force, hot-reloaded on SIGHUP and file change like the
/// listener's and the upstream client's; what the expiry and CRL metrics and the CRL watcher
/// read. Clones share the material in force.
#[derive(Clone, Debug)]
pub enum DirectoryTls {
    /// `ldaps://`: client certificate, key, CA bundle and CRLs.
    Ldap(ldap::LdapTls),
    /// The SDS FHIR API over `https://`: its CA bundle.
    Fhir(fhir::FhirTls),
}

impl DirectoryTls {
    /// Counts the reloads in `metrics` (`ssp_reloads_total{component="directory TLS"}`,
    /// `ssp_reload_last_ok`).
    pub fn count_in(&self, metrics: crate::metrics::ReloadMetrics) {
        match self {
            DirectoryTls::Ldap(t) => t.reloadable().count_in(metrics),
            DirectoryTls::Fhir(t) => t.reloadable().count_in(metrics),
        }
    }

    /// Reloads on SIGHUP and when a file changes (checked every `poll`) until `shutdown`.
    pub fn watch(
        &self,
        poll: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        match self {
            DirectoryTls::Ldap(t) => {
                let rebuild = t.clone();
                t.reloadable()
                    .watch(move || rebuild.rebuild(), poll, shutdown, tasks)
            }
            DirectoryTls::Fhir(t) => {
                let rebuild = t.clone();
                t.reloadable()
                    .watch(move || rebuild.rebuild(), poll, shutdown, tasks)
            }
        }
    }

    /// The reload counts (for tests and logs).
    pub fn stats(&self) -> &crate::reload::ReloadStats {
        match self {
            DirectoryTls::Ldap(t) => t.reloadable().stats(),
            DirectoryTls::Fhir(t) => t.reloadable().stats(),
        }
    }

    /// `ldaps://`: when the client certificate chain and the CA bundle in force run out; `None`
    /// for the FHIR API (it presents no client certificate).
    pub fn ldap_expiry(&self) -> Option<crate::tls::Expiry> {
        match self {
            DirectoryTls::Ldap(t) => Some(t.reloadable().current().expiry),
            DirectoryTls::Fhir(_) => None,
        }
    }

    /// The `ssp_certificate_expiry_seconds` series of the material in force, added to `out`:
    /// `directory_client` (`ldap_cert`'s chain) and `directory_ca` (`ldap_ca`, or `fhir_ca`).
    pub fn certificate_expiries(&self, out: &mut Vec<(&'static str, i64)>) {
        match self {
            DirectoryTls::Ldap(t) => {
                let expiry = t.reloadable().current().expiry;
                out.push(("directory_client", expiry.chain));
                out.push(("directory_ca", expiry.ca_bundle));
            }
            DirectoryTls::Fhir(t) => {
                if let Some(ca) = t.reloadable().current().ca_expiry() {
                    out.push(("directory_ca", ca));
                }
            }
        }
    }

    /// The warnings of the material in force (`ldaps://`: a CA of `ldap_ca` with no CRL while
    /// `ldap_crls` are configured), as logged when it loaded; none for the FHIR API (it takes
    /// no CRLs).
    pub fn warnings(&self) -> Vec<String> {
        match self {
            DirectoryTls::Ldap(t) => t.reloadable().current().warnings.clone(),
            DirectoryTls::Fhir(_) => Vec::new(),
        }
    }

    /// The earliest nextUpdate (unix seconds) of the CRLs in force: `ldaps://` with `ldap_crls`
    /// that have one; `None` otherwise (the FHIR API client takes no CRLs).
    pub fn crl_horizon(&self) -> Option<u64> {
        match self {
            DirectoryTls::Ldap(t) => t.reloadable().current().crl_horizon,
            DirectoryTls::Fhir(_) => None,
        }
    }
}

/// A backend built from the `[directory]` configuration.
pub struct OpenedBackend {
    pub backend: Arc<dyn DirectoryBackend>,
    /// The LDIF backend itself, for reloading (`None` for the remote backends).
    pub ldif: Option<Arc<ldif::LdifBackend>>,
    /// What it is, for operators: e.g. `ldap ldaps://sds.example:636`.
    pub description: String,
    /// `ldaps://` or the FHIR API over `https://`: the TLS material in force, for reloading and
    /// the metrics; `None` for the LDIF backend and `ldap://`.
    pub tls: Option<DirectoryTls>,
}

/// Builds the configured backend: loads the LDIF file, or prepares the LDAP or FHIR client
/// (TLS material, API key). Remote backends connect on first use. `catalogue` gives the FHIR
/// backend the interactions it resolves ASIDs with. Blocking file I/O: call at start-up.
/// Fails with every problem found, each naming its `[directory]` key (`directory.ldif_file: …`,
/// `directory.ldap_crls[0]: …`) and the file.
pub fn open_backend(
    config: &DirectoryBackendConfig,
    catalogue: &Catalogue,
) -> Result<OpenedBackend, Vec<String>> {
    match config {
        DirectoryBackendConfig::Ldif { file, .. } => {
            let backend = Arc::new(
                ldif::LdifBackend::from_path(file)
                    .map_err(|e| vec![format!("directory.ldif_file: {e}")])?,
            );
            Ok(OpenedBackend {
                backend: backend.clone(),
                description: format!("ldif {}", file.display()),
                ldif: Some(backend),
                tls: None,
            })
        }
        DirectoryBackendConfig::Ldap(settings) => {
            let backend = ldap::LdapBackend::new(settings.clone()).map_err(|e| match e {
                ldap::LdapSetupError::Tls(problems) => {
                    problems.into_iter().map(|p| p.to_string()).collect()
                }
                other => vec![other.to_string()],
            })?;
            Ok(OpenedBackend {
                description: format!("ldap {} (base {})", settings.url, settings.search_base),
                tls: backend.tls().cloned().map(DirectoryTls::Ldap),
                backend: Arc::new(backend),
                ldif: None,
            })
        }
        DirectoryBackendConfig::Fhir(settings) => {
            let interactions = catalogue.iter().map(|i| i.id.clone()).collect();
            let backend = fhir::FhirBackend::new(settings, interactions)
                .map_err(|problems| problems.iter().map(ToString::to_string).collect::<Vec<_>>())?;
            Ok(OpenedBackend {
                description: format!(
                    "fhir {} ({} ASIDs mapped to ODS codes)",
                    settings.base_url,
                    settings.asid_ods.len()
                ),
                tls: backend.tls().cloned().map(DirectoryTls::Fhir),
                backend: Arc::new(backend),
                ldif: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn asids_are_one_to_32_digits() {
        assert!(is_asid("918999198993"));
        assert!(is_asid(&"9".repeat(MAX_ASID_LEN)));
        for bad in ["", "abc", "1 ", "１", "-1", &"9".repeat(MAX_ASID_LEN + 1)] {
            assert!(!is_asid(bad), "{bad:?}");
        }
    }

    #[test]
    fn two_handlers_for_one_interaction_are_refused() {
        let p = party("1");
        assert_eq!(check_handlers(&p.handlers), Ok(()));
        let mut twice = p.handlers.clone();
        let mut again = handler("z", METADATA, "other");
        again.party_key = "b82617-0000806".into();
        twice.push(again);
        let err = check_handlers(&twice).unwrap_err();
        assert!(err.contains("two message handlers"), "{err}");
        assert!(err.contains(": a and z"), "{err}");
    }
}
