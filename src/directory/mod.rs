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

/// A message handler (`nhsMhs`) a request can be forwarded to: one endpoint for one interaction
/// of one party key.
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

/// What joins an AS record to its MHS records, on every backend: the party key compared
/// ignoring ASCII case (SDS's `caseIgnoreMatch`; party keys are ASCII) and the ODS code compared
/// exactly (`nhsIDCode` is `caseExactMatch` in SDS: slapd's filter and the FHIR API's
/// `organization` search match it so). An MHS record joins an AS record when their keys are
/// equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JoinKey {
    /// ASCII-lowercased.
    party_key: String,
    ods_code: String,
}

impl JoinKey {
    /// The key of a record with this party key and ODS code.
    pub fn new(party_key: &str, ods_code: &str) -> JoinKey {
        JoinKey {
            party_key: party_key.to_ascii_lowercase(),
            ods_code: ods_code.to_owned(),
        }
    }
}

impl AccreditedSystem {
    /// The key its MHS records have ([`JoinKey`]).
    pub fn join_key(&self) -> JoinKey {
        JoinKey::new(&self.party_key, &self.ods_code)
    }
}

impl MhsRecord {
    /// The key of the AS records it belongs to ([`JoinKey`]).
    pub fn join_key(&self) -> JoinKey {
        JoinKey::new(&self.party_key, &self.ods_code)
    }
}

/// An `nhsMhs` record as a backend read it, before the party's rules are applied
/// ([`PartyHandlers::judge`]). Values have their leading and trailing white space removed (as
/// LDAP's matching ignores it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MhsRecord {
    /// `uniqueIdentifier`.
    pub id: String,
    /// `nhsIDCode`.
    pub ods_code: String,
    /// `nhsMHSPartyKey`.
    pub party_key: String,
    /// `nhsMhsSvcIA`.
    pub interaction: String,
    /// Every `nhsMHSEndPoint` value, in directory order (the attribute is multi-valued in SDS);
    /// at least one.
    pub endpoints: Vec<String>,
    /// `nhsMhsFQDN`, or why the record has none the gateway can use (none, empty, several).
    pub fqdn: Result<String, String>,
    /// `nhsMhsCPAId`.
    pub cpa_id: String,
}

/// A directory value as every backend uses it: without the leading or trailing spaces LDAP's
/// matching ignores (a filter matches a value stored with a trailing space), and no others.
/// slapd ignores a space, a no-break space and the other spaces of [`is_insignificant_space`],
/// but not a tab, a line or paragraph separator or an Ogham space mark (measured with
/// `ldapsearch`): a party key ending in a tab is another party key there, so it is here too.
pub fn trim_value(value: &str) -> &str {
    value.trim_matches(is_insignificant_space)
}

/// The space characters slapd's matching ignores at the ends of a value and takes as one space
/// inside it: U+0020, U+00A0, U+2000 to U+200A, U+202F, U+205F and U+3000.
pub fn is_insignificant_space(c: char) -> bool {
    matches!(
        c,
        ' ' | '\u{a0}' | '\u{2000}'..='\u{200a}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
    )
}

/// An MHS record's FQDN from its `nhsMhsFQDN` values, as every backend reads it: exactly one,
/// non-empty once trimmed ([`trim_value`]); otherwise why the record has none the gateway can
/// use (`missing`, `empty value`, `N values, expected one`), for [`MhsRecord::fqdn`].
pub fn mhs_fqdn<S: AsRef<str>>(values: &[S]) -> Result<String, String> {
    match values {
        [] => Err("missing".to_owned()),
        [one] => match trim_value(one.as_ref()) {
            "" => Err("empty value".to_owned()),
            fqdn => Ok(fqdn.to_owned()),
        },
        many => Err(format!("{} values, expected one", many.len())),
    }
}

/// What the gateway does without the message handlers an [`Unusable`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The interaction (one of the catalogue's) is refused for this party as receiver: 403
    /// `PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_<asid>`, as for a party with no
    /// handler for it. The party's other interactions are not affected.
    Interaction,
    /// The handler's FQDN is not one a client certificate may present for the party.
    Fqdn,
}

/// Message handlers of a party the gateway cannot use, and why: found when the party is built
/// from the directory's answer, never per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    /// `nhsMhsSvcIA` of the handlers.
    pub interaction: String,
    /// Their `uniqueIdentifier`s, in directory order.
    pub handlers: Vec<String>,
    /// What is wrong with them, for operators.
    pub reason: String,
    pub effect: Effect,
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (noun, ids) = match self.handlers.as_slice() {
            [one] => ("message handler", one.clone()),
            many => ("message handlers", many.join(", ")),
        };
        match self.effect {
            Effect::Interaction => write!(
                f,
                "{}: {noun} {ids}: {}: the interaction is refused for this party (403)",
                self.interaction, self.reason
            ),
            Effect::Fqdn => write!(
                f,
                "{noun} {ids} ({}): {}: its FQDN is not one a client certificate may present",
                self.interaction, self.reason
            ),
        }
    }
}

/// The interactions requests can name (the interaction catalogue's, when the backend was
/// opened): the handlers whose problems are reported. A handler for any other interaction is
/// never forwarded to, so its endpoint and its duplicates are not reported (they still supply
/// their FQDN). Clones share the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requestable(Arc<[String]>);

impl Requestable {
    /// These interaction ids, in this order.
    pub fn new(ids: impl IntoIterator<Item = String>) -> Requestable {
        Requestable(ids.into_iter().collect())
    }

    /// The interactions of a catalogue, in its order.
    pub fn of(catalogue: &Catalogue) -> Requestable {
        Requestable::new(catalogue.iter().map(|i| i.id.clone()))
    }

    /// The built-in catalogue's (`config/interactions.toml` as shipped).
    pub fn builtin() -> Requestable {
        Requestable::of(&Catalogue::builtin())
    }

    /// Whether requests can name `interaction` (compared case-exact).
    pub fn contains(&self, interaction: &str) -> bool {
        self.0.iter().any(|i| i == interaction)
    }

    /// The ids, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, String> {
        self.0.iter()
    }
}

/// The message handlers of one party key (and ODS code) with the gateway's rules applied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartyHandlers {
    /// The handlers requests can be forwarded to, in directory order.
    pub usable: Vec<MessageHandler>,
    /// Every handler's `nhsMhsFQDN` that can be read (usable handler or not), distinct ignoring
    /// ASCII case, in directory order.
    pub fqdns: Vec<String>,
    /// What cannot be used, and why (see [`PartyHandlers::judge`]).
    pub unusable: Vec<Unusable>,
}

impl PartyHandlers {
    /// Applies the rules SDS promises and the gateway relies on to one party's MHS records:
    ///
    /// - one handler per interaction under a party key: two or more for one interaction make
    ///   that interaction unusable (the gateway cannot tell which is registered);
    /// - one `nhsMHSEndPoint`, one a request can be forwarded to ([`is_forwardable_endpoint`]):
    ///   otherwise the handler's interaction is unusable;
    /// - a readable `nhsMhsFQDN`: otherwise that handler supplies no FQDN.
    ///
    /// Each problem takes out only what it concerns: the party's other interactions and FQDNs
    /// stay. Problems with handlers for interactions not in `requestable` are not reported
    /// (such a handler is never forwarded to: it only supplies its FQDN); a bad FQDN always is.
    pub fn judge(records: &[MhsRecord], requestable: &Requestable) -> PartyHandlers {
        let mut out = PartyHandlers::default();
        let mut seen_fqdns = std::collections::HashSet::new();
        // Interactions in directory order, each with its records.
        let mut order: Vec<(&str, Vec<usize>)> = Vec::new();
        let mut slot: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (i, r) in records.iter().enumerate() {
            match &r.fqdn {
                Ok(fqdn) => {
                    if seen_fqdns.insert(fqdn.to_ascii_lowercase()) {
                        out.fqdns.push(fqdn.clone());
                    }
                }
                Err(reason) => out.unusable.push(Unusable {
                    interaction: r.interaction.clone(),
                    handlers: vec![r.id.clone()],
                    reason: format!("nhsMhsFQDN: {reason}"),
                    effect: Effect::Fqdn,
                }),
            }
            match slot.get(r.interaction.as_str()) {
                Some(&at) => order[at].1.push(i),
                None => {
                    slot.insert(&r.interaction, order.len());
                    order.push((&r.interaction, vec![i]));
                }
            }
        }
        for (interaction, at) in order {
            let first = &records[at[0]];
            let reason = match (at.len(), first.endpoints.as_slice()) {
                (1, [endpoint]) if is_forwardable_endpoint(endpoint) => {
                    out.usable.push(MessageHandler {
                        id: first.id.clone(),
                        ods_code: first.ods_code.clone(),
                        party_key: first.party_key.clone(),
                        interaction: first.interaction.clone(),
                        endpoint: endpoint.clone(),
                        fqdn: first.fqdn.clone().unwrap_or_default(),
                        cpa_id: first.cpa_id.clone(),
                    });
                    continue;
                }
                (1, [endpoint]) => format!("nhsMHSEndPoint {endpoint:?}: {UNFORWARDABLE_ENDPOINT}"),
                (1, endpoints) => format!(
                    "{} nhsMHSEndPoint values ({}): the gateway cannot tell which one is registered",
                    endpoints.len(),
                    endpoints
                        .iter()
                        .map(|e| format!("{e:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                (n, _) => format!(
                    "{n} message handlers for one interaction under party key {}: SDS allows one, \
                     and the gateway cannot tell which is registered",
                    first.party_key
                ),
            };
            if requestable.contains(interaction) {
                out.unusable.push(Unusable {
                    interaction: interaction.to_owned(),
                    handlers: at.iter().map(|&i| records[i].id.clone()).collect(),
                    reason,
                    effect: Effect::Interaction,
                });
            }
        }
        out
    }
}

/// Everything the gateway needs to know about one ASID: its AS record and what the message
/// handlers sharing its party key and ODS code give it (endpoints to forward to, FQDNs a client
/// certificate may present), decided when the party is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    pub system: AccreditedSystem,
    /// The message handlers requests can be forwarded to (see [`PartyHandlers::judge`]), in
    /// directory order: at most one per interaction.
    pub handlers: Vec<MessageHandler>,
    /// The names a client certificate may present for this ASID: the `nhsMhsFQDN` of every
    /// message handler sharing its party key, usable or not (a handler whose FQDN cannot be
    /// read gives none), distinct ignoring ASCII case, in directory order.
    pub registered_fqdns: Vec<String>,
    /// The handlers that cannot be used, and why (catalogue interactions refused for this party,
    /// FQDNs not accepted).
    pub unusable: Vec<Unusable>,
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
    /// The party of `system` with its message handlers, judged.
    pub fn new(system: AccreditedSystem, handlers: PartyHandlers) -> Party {
        Party {
            system,
            handlers: handlers.usable,
            registered_fqdns: handlers.fqdns,
            unusable: handlers.unusable,
        }
    }

    /// Whether this system is accredited for `interaction` (`nhsAsSvcIA`, compared case-exact as
    /// the SDS `caseExactMatch` rule does).
    pub fn may(&self, interaction: &str) -> bool {
        self.system.interactions.iter().any(|i| i == interaction)
    }

    /// The message handler (endpoint) a request for `interaction` can be forwarded to under this
    /// party key, compared case-exact; `None` when there is none, or none usable (see
    /// [`Party::unusable_for`]).
    pub fn handler_for(&self, interaction: &str) -> Option<&MessageHandler> {
        self.handlers.iter().find(|h| h.interaction == interaction)
    }

    /// Why the party's handlers for `interaction` cannot be used, if they cannot.
    pub fn unusable_for(&self, interaction: &str) -> Option<&Unusable> {
        self.unusable
            .iter()
            .find(|u| u.effect == Effect::Interaction && u.interaction == interaction)
    }

    /// The distinct `nhsMhsFQDN`s of this party's message handlers (the names a client
    /// certificate may present for this ASID), in directory order, duplicates (ignoring ASCII
    /// case) removed.
    pub fn fqdns(&self) -> impl Iterator<Item = &str> {
        self.registered_fqdns.iter().map(String::as_str)
    }

    /// Whether `name` is one of this party's registered FQDNs. DNS names compare ASCII
    /// case-insensitively; nothing else is normalised.
    pub fn has_fqdn(&self, name: &str) -> bool {
        self.registered_fqdns
            .iter()
            .any(|fqdn| fqdn.eq_ignore_ascii_case(name))
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
/// backend the interactions it resolves ASIDs with, and every backend the interactions whose
/// unusable message handlers it reports ([`Requestable`]). Blocking file I/O: call at start-up.
/// Fails with every problem found, each naming its `[directory]` key (`directory.ldif_file: …`,
/// `directory.ldap_crls[0]: …`) and the file.
pub fn open_backend(
    config: &DirectoryBackendConfig,
    catalogue: &Catalogue,
) -> Result<OpenedBackend, Vec<String>> {
    let requestable = Requestable::of(catalogue);
    match config {
        DirectoryBackendConfig::Ldif { file, .. } => {
            let backend = Arc::new(
                ldif::LdifBackend::from_path_with(file, requestable)
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
            let backend = ldap::LdapBackend::new(settings.clone())
                .map_err(|e| match e {
                    ldap::LdapSetupError::Tls(problems) => {
                        problems.into_iter().map(|p| p.to_string()).collect()
                    }
                    other => vec![other.to_string()],
                })?
                .reporting(requestable);
            Ok(OpenedBackend {
                description: format!("ldap {} (base {})", settings.url, settings.search_base),
                tls: backend.tls().cloned().map(DirectoryTls::Ldap),
                backend: Arc::new(backend),
                ldif: None,
            })
        }
        DirectoryBackendConfig::Fhir(settings) => {
            let backend = fhir::FhirBackend::new(settings, requestable.iter().cloned().collect())
                .map_err(|problems| {
                problems.iter().map(ToString::to_string).collect::<Vec<_>>()
            })?;
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
    const MCCI: &str = "urn:nhs:names:services:psis:MCCI_IN010000UK13";
    const ENDPOINT: &str = "https://localhost:9443/B82617/STU3/1/gpconnect";

    /// Only the spaces slapd's matching ignores are trimmed: a value ending in a tab (or a line
    /// separator, or an Ogham space mark) is another value there, so it is here too. Before,
    /// every Unicode white space was trimmed, and the LDIF backend joined a handler whose party
    /// key ends in a tab to a party slapd never joins it to.
    #[test]
    fn only_the_spaces_ldap_ignores_are_trimmed() {
        for ignored in [
            " ", "\u{a0}", "\u{2000}", "\u{2009}", "\u{200a}", "\u{202f}", "\u{205f}", "\u{3000}",
        ] {
            assert_eq!(
                trim_value(&format!("{ignored}B82617-1{ignored}")),
                "B82617-1",
                "{ignored:?}"
            );
        }
        for kept in [
            "\t", "\n", "\u{b}", "\u{c}", "\r", "\u{85}", "\u{1680}", "\u{2028}", "\u{2029}",
            "\u{200b}",
        ] {
            let value = format!("B82617-1{kept}");
            assert_eq!(trim_value(&value), value, "{kept:?}");
        }
        assert_eq!(trim_value(" \u{a0} "), "");
    }

    fn record(id: &str, interaction: &str, fqdn: &str) -> MhsRecord {
        MhsRecord {
            id: id.into(),
            ods_code: "B82617".into(),
            party_key: "B82617-0000806".into(),
            interaction: interaction.into(),
            endpoints: vec![ENDPOINT.into()],
            fqdn: Ok(fqdn.into()),
            cpa_id: id.into(),
        }
    }

    fn system(asid: &str) -> AccreditedSystem {
        AccreditedSystem {
            asid: asid.into(),
            ods_code: "B82617".into(),
            party_key: "B82617-0000806".into(),
            interactions: vec![METADATA.into(), SLOT.into()],
            product_name: None,
            product_version: None,
        }
    }

    fn judged(records: Vec<MhsRecord>) -> Party {
        Party::new(
            system("1"),
            PartyHandlers::judge(&records, &Requestable::builtin()),
        )
    }

    #[test]
    fn may_and_handler_for_are_case_exact() {
        let p = judged(party_records());
        assert!(p.may(METADATA));
        assert!(!p.may(&METADATA.to_uppercase()));
        assert!(!p.may(MCCI), "an MHS record is not accreditation");
        assert_eq!(p.handler_for(SLOT).map(|h| h.id.as_str()), Some("b"));
        assert!(p.handler_for(&SLOT.to_uppercase()).is_none());
        assert!(p.handler_for("urn:unknown").is_none());
        assert!(p.unusable.is_empty());
    }

    #[test]
    fn fqdns_are_distinct_ignoring_case_and_match_case_insensitively() {
        let p = judged(party_records());
        assert_eq!(p.fqdns().collect::<Vec<_>>(), ["localhost", "mhs.example"]);
        assert!(p.has_fqdn("LOCALHOST"));
        assert!(p.has_fqdn("mhs.example"));
        assert!(!p.has_fqdn("mhs.example."));
        assert!(!p.has_fqdn("rogue.dev.local"));
        assert!(!p.has_fqdn(""));
    }

    /// The join: party keys ignoring ASCII case, ODS codes exactly.
    #[test]
    fn the_join_ignores_the_party_keys_case_not_the_ods_codes() {
        let system = system("1");
        let mut r = record("a", METADATA, "localhost");
        assert_eq!(r.join_key(), system.join_key());
        r.party_key = "b82617-0000806".into();
        assert_eq!(r.join_key(), system.join_key(), "party key case ignored");
        r.ods_code = "b82617".into();
        assert_ne!(r.join_key(), system.join_key(), "ODS code case-exact");
        r.ods_code = "B82617".into();
        r.party_key = "B82617-0000807".into();
        assert_ne!(r.join_key(), system.join_key());
    }

    #[test]
    fn an_fqdn_is_one_value_not_empty_once_trimmed() {
        assert_eq!(mhs_fqdn(&[" mhs.example "]), Ok("mhs.example".to_owned()));
        assert_eq!(mhs_fqdn::<&str>(&[]), Err("missing".to_owned()));
        assert_eq!(mhs_fqdn(&[" "]), Err("empty value".to_owned()));
        assert_eq!(
            mhs_fqdn(&["a.example", "b.example"]),
            Err("2 values, expected one".to_owned())
        );
    }

    #[test]
    fn asids_are_one_to_32_digits() {
        assert!(is_asid("918999198993"));
        assert!(is_asid(&"9".repeat(MAX_ASID_LEN)));
        for bad in ["", "abc", "1 ", "１", "-1", &"9".repeat(MAX_ASID_LEN + 1)] {
            assert!(!is_asid(bad), "{bad:?}");
        }
    }

    /// Two handlers for one catalogue interaction make that interaction unusable, and only it:
    /// the party's other interactions and every FQDN stay.
    #[test]
    fn two_handlers_for_one_interaction_make_it_unusable() {
        let mut records = party_records();
        records.push(record("z", METADATA, "other.example"));
        let p = judged(records);
        assert!(p.handler_for(METADATA).is_none());
        assert_eq!(p.handler_for(SLOT).map(|h| h.id.as_str()), Some("b"));
        assert_eq!(
            p.fqdns().collect::<Vec<_>>(),
            ["localhost", "mhs.example", "other.example"]
        );
        assert_eq!(p.unusable.len(), 1, "{:?}", p.unusable);
        let u = p.unusable_for(METADATA).expect("reported");
        assert_eq!(u.handlers, ["a", "z"]);
        assert!(
            u.reason
                .starts_with("2 message handlers for one interaction"),
            "{u}"
        );
        assert_eq!(
            u.to_string(),
            format!(
                "{METADATA}: message handlers a, z: 2 message handlers for one interaction under \
                 party key B82617-0000806: SDS allows one, and the gateway cannot tell which is \
                 registered: the interaction is refused for this party (403)"
            )
        );
    }

    fn party_records() -> Vec<MhsRecord> {
        vec![
            record("a", METADATA, "localhost"),
            record("b", SLOT, "LocalHost"),
            record("c", MCCI, "mhs.example"),
        ]
    }

    /// An endpoint no request could be forwarded to, or two of them, on a catalogue
    /// interaction's handler: that interaction is unusable, reported with the reason.
    #[test]
    fn an_unforwardable_endpoint_or_two_make_the_interaction_unusable() {
        let mut records = party_records();
        records[0].endpoints = vec![format!("{ENDPOINT}/")];
        records[1].endpoints = vec![ENDPOINT.into(), format!("{ENDPOINT}2")];
        let p = judged(records);
        assert!(p.handlers.is_empty() || p.handlers.iter().all(|h| h.interaction == MCCI));
        assert_eq!(p.handlers.len(), 1);
        let metadata = p.unusable_for(METADATA).expect("metadata");
        assert_eq!(
            metadata.reason,
            format!("nhsMHSEndPoint \"{ENDPOINT}/\": {UNFORWARDABLE_ENDPOINT}")
        );
        let slot = p.unusable_for(SLOT).expect("slot");
        assert!(slot.reason.starts_with("2 nhsMHSEndPoint values"), "{slot}");
        assert_eq!(p.fqdns().count(), 2, "their FQDNs stay");
    }

    /// A handler for an interaction outside the catalogue is never forwarded to: its endpoint
    /// and its duplicates are not reported, and it still supplies its FQDN (the OpenTest MHS
    /// record's endpoint ends in `/`).
    #[test]
    fn handlers_outside_the_catalogue_only_supply_their_fqdn() {
        let mut records = party_records();
        records[2].endpoints = vec!["https://vpn-client-1411.opentest.hscic.gov.uk/".into()];
        let mut twin = record("d", MCCI, "twin.example");
        twin.endpoints = vec![" not a url".into(), "x".into()];
        records.push(twin);
        let p = judged(records);
        assert!(p.unusable.is_empty(), "{:?}", p.unusable);
        assert!(p.handler_for(MCCI).is_none(), "never forwarded to");
        assert_eq!(
            p.fqdns().collect::<Vec<_>>(),
            ["localhost", "mhs.example", "twin.example"]
        );
        assert!(p.handler_for(METADATA).is_some() && p.handler_for(SLOT).is_some());
    }

    /// A handler whose FQDN cannot be read supplies none, reported; its endpoint stays usable.
    #[test]
    fn a_bad_fqdn_is_skipped_and_reported() {
        let mut records = party_records();
        records[2].fqdn = Err("2 values, expected one".into());
        let p = judged(records);
        assert_eq!(p.fqdns().collect::<Vec<_>>(), ["localhost"]);
        assert_eq!(p.unusable.len(), 1);
        assert_eq!(p.unusable[0].effect, Effect::Fqdn);
        assert!(p.unusable_for(MCCI).is_none(), "not an interaction problem");
        assert_eq!(
            p.unusable[0].to_string(),
            format!(
                "message handler c ({MCCI}): nhsMhsFQDN: 2 values, expected one: its FQDN is not \
                 one a client certificate may present"
            )
        );
    }
}
