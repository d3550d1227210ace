//! The LDAP directory backend: the real SDS interface. Owns the SDS search filters (RFC 4515
//! escaped), the one reused connection (`ldap://`, or `ldaps://` with the gateway's client
//! certificate and a CA bundle, as SDS requires), per-query timeouts, reconnection after the
//! server goes away, the `ldaps://` TLS material as a hot-reloadable snapshot ([`LdapTls`]: a
//! connection opened under an earlier snapshot is not used for new searches), and the mapping of `nhsAs`/`nhsMhs` entries to the directory model with
//! the same rules the LDIF backend applies. It only reads: it never binds with credentials,
//! never writes, and never filters on `nhsMhsFQDN` (that attribute has no EQUALITY rule in SDS,
//! so such a filter never matches: FQDNs are compared on fetched values).
//!
//! The searches, all under the configured base (`ou=services,o=nhs`), scope sub:
//!
//! | question | filter |
//! |---|---|
//! | the accredited system with this ASID | `(&(objectClass=nhsAs)(uniqueIdentifier=<asid>))` |
//! | the message handler of a party key and ODS code for an interaction (SDS route lookup) | `(&(objectClass=nhsMhs)(nhsMHSPartyKey=<party key>)(nhsIDCode=<ODS code>)(nhsMhsSvcIA=<interaction>))` |
//! | every message handler (and so every FQDN) of a party key and ODS code | `(&(objectClass=nhsMhs)(nhsMHSPartyKey=<party key>)(nhsIDCode=<ODS code>))` |
//! | readiness probe: does the server answer (scope base, on the search base, no attributes) | `(objectClass=*)` |
//!
//! [`DirectoryBackend::party`] is the first search then the third (with the AS record's party
//! key and ODS code, as the GP Connect SDS searches join on `nhsIDCode`): the same [`Party`]
//! the LDIF backend answers for the same data. Values are used with their leading and trailing
//! white space removed, as LDAP's own matching ignores it (a filter matches `nhsAsSvcIA` stored
//! with a trailing space).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry, SearchOptions};

use super::{
    is_asid, mhs_fqdn, trim_value, AccreditedSystem, DirectoryBackend, DirectoryError, JoinKey,
    MessageHandler, MhsRecord, Party, PartyHandlers, Requestable,
};
use crate::reload::Reloadable;
use crate::tls::{self, ClientTls, UpstreamTls};

const BACKEND: &str = "ldap";

/// Default search base for SDS services.
pub const DEFAULT_SEARCH_BASE: &str = "ou=services,o=nhs";
/// Default time to open a connection (TCP and TLS).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time one search may take (the SDS FHIR API's own LDAP client uses 3 s).
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// The readiness probe's filter (on the search base itself, scope base): any entry matches.
const PROBE_FILTER: &str = "(objectClass=*)";
/// Most entries one search may return; SDS answers a handful per party key.
const SIZE_LIMIT: i32 = 1000;

/// The AS attributes the model reads.
const AS_ATTRS: [&str; 6] = [
    "uniqueIdentifier",
    "nhsIDCode",
    "nhsMHSPartyKey",
    "nhsAsSvcIA",
    "nhsProductName",
    "nhsProductVersion",
];
/// The MHS attributes the model reads.
const MHS_ATTRS: [&str; 7] = [
    "uniqueIdentifier",
    "nhsIDCode",
    "nhsMHSPartyKey",
    "nhsMhsSvcIA",
    "nhsMHSEndPoint",
    "nhsMhsFQDN",
    "nhsMhsCPAId",
];

/// Where and how to reach the LDAP server (`[directory]` with `backend = "ldap"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LdapSettings {
    /// `ldap://host[:port]` or `ldaps://host[:port]`.
    pub url: String,
    /// Search base, e.g. `ou=services,o=nhs`.
    pub search_base: String,
    /// For `ldaps://`: the gateway's client certificate and key, and the CA bundle the server's
    /// certificate must chain to. `None` for `ldap://`.
    pub tls: Option<ClientTls>,
    pub connect_timeout: Duration,
    pub query_timeout: Duration,
}

/// Why the LDAP backend could not be built, naming the `[directory]` key to fix.
#[derive(Debug, thiserror::Error)]
pub enum LdapSetupError {
    #[error("directory.ldap_url: {url}: {reason}")]
    Url { url: String, reason: &'static str },
    /// Every problem with the `ldaps://` TLS files, each naming its key.
    #[error(transparent)]
    Tls(#[from] tls::TlsProblems),
}

/// RFC 4515 escaping of an assertion value: `*`, `(`, `)`, `\`, NUL and other control
/// characters become `\XX`, so a value can never widen or restructure a filter.
pub fn escape_filter_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '*' | '(' | ')' | '\\' | '\0'..='\x1f' | '\x7f' => {
                out.push_str(&format!("\\{:02x}", c as u32));
            }
            _ => out.push(c),
        }
    }
    out
}

/// The accredited system with this ASID.
pub fn system_filter(asid: &str) -> String {
    format!(
        "(&(objectClass=nhsAs)(uniqueIdentifier={}))",
        escape_filter_value(asid)
    )
}

/// The message handler of a party key and ODS code for one interaction (the SDS route lookup,
/// joined by ODS code as [`handlers_filter`] is).
pub fn handler_filter(party_key: &str, ods_code: &str, interaction: &str) -> String {
    format!(
        "(&(objectClass=nhsMhs)(nhsMHSPartyKey={})(nhsIDCode={})(nhsMhsSvcIA={}))",
        escape_filter_value(party_key),
        escape_filter_value(ods_code),
        escape_filter_value(interaction)
    )
}

/// Every message handler of a party key and ODS code (their `nhsMhsFQDN`s are the party's
/// FQDNs).
pub fn handlers_filter(party_key: &str, ods_code: &str) -> String {
    format!(
        "(&(objectClass=nhsMhs)(nhsMHSPartyKey={})(nhsIDCode={}))",
        escape_filter_value(party_key),
        escape_filter_value(ods_code)
    )
}

/// A search failure, split by whether the connection is still usable.
enum SearchFailure {
    /// The connection broke (closed, reset, I/O): drop it; a reused one may be retried once.
    Connection(String),
    /// The search took longer than the query timeout: drop the connection, do not retry.
    Timeout,
    /// The server answered with an error code, or with something the model cannot use.
    Answer(String),
}

/// The `ldaps://` client's TLS material (`ldap_cert`, `ldap_key`, `ldap_ca`, `ldap_crls`) as
/// one snapshot in a [`Reloadable`] (component [`super::TLS_COMPONENT`]), and what rebuilds it
/// from the files: reloaded on SIGHUP and file change like the listener's and the upstream
/// client's, never to a CRL older than one loaded before (a [`tls::CrlFloor`] of its own). A
/// new connection is opened with the snapshot in force. Clones share the snapshot.
#[derive(Clone)]
pub struct LdapTls {
    snapshot: Arc<Reloadable<UpstreamTls>>,
    files: ClientTls,
    floor: tls::CrlFloor,
}

impl std::fmt::Debug for LdapTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl LdapTls {
    /// Loads the files (blocking file I/O: at start-up); every problem names its key.
    fn load(files: ClientTls) -> Result<Self, tls::TlsProblems> {
        let floor = tls::CrlFloor::default();
        let initial = tls::upstream_tls_above(&files, &crate::config::LDAP_TLS_KEYS, &[], &floor)?;
        let mut watched: Vec<PathBuf> =
            vec![files.cert.clone(), files.key.clone(), files.ca.clone()];
        watched.extend(files.crls.iter().cloned());
        Ok(Self {
            snapshot: Reloadable::new(super::TLS_COMPONENT, Arc::new(initial), watched),
            files,
            floor,
        })
    }

    /// The snapshot in force and its reloader.
    pub fn reloadable(&self) -> &Arc<Reloadable<UpstreamTls>> {
        &self.snapshot
    }

    /// A new snapshot from the files as they are now, refused when a CRL is older than one
    /// loaded before (blocking file I/O: the reloader runs it on the blocking pool).
    pub fn rebuild(&self) -> Result<UpstreamTls, tls::TlsProblems> {
        tls::upstream_tls_above(&self.files, &crate::config::LDAP_TLS_KEYS, &[], &self.floor)
    }
}

/// The shared connection: its number, the handle, and the TLS snapshot it was opened with
/// (`None` for `ldap://`).
struct Open {
    id: u64,
    ldap: Ldap,
    tls: Option<Arc<UpstreamTls>>,
}

/// A [`DirectoryBackend`] that asks an SDS-shaped LDAP server, over one reused connection.
pub struct LdapBackend {
    settings: LdapSettings,
    /// Without the TLS config: it is taken from the snapshot in force at each connection.
    conn_settings: LdapConnSettings,
    /// The connection in use, if any. Cloning an `Ldap` handle is cheap (a channel sender);
    /// concurrent searches share the connection (message ids multiplex them).
    conn: Mutex<Option<Open>>,
    /// Numbers connections, so a failed search drops only the connection it used.
    opened: AtomicU64,
    /// Held while connecting, so concurrent lookups open one connection, not one each.
    connecting: tokio::sync::Mutex<()>,
    /// For `ldaps://`: the TLS material in force (hot-reloaded).
    tls: Option<LdapTls>,
    /// The interactions whose unusable message handlers a party reports.
    requestable: Requestable,
}

impl std::fmt::Debug for LdapBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapBackend")
            .field("url", &self.settings.url)
            .field("search_base", &self.settings.search_base)
            .finish()
    }
}

impl LdapBackend {
    /// Prepares the backend (loads the TLS material for `ldaps://`); connects on first use.
    pub fn new(settings: LdapSettings) -> Result<Self, LdapSetupError> {
        let url_error = |reason| LdapSetupError::Url {
            url: settings.url.clone(),
            reason,
        };
        let secure = if settings.url.starts_with("ldaps://") {
            true
        } else if settings.url.starts_with("ldap://") {
            false
        } else {
            return Err(url_error("must start with ldap:// or ldaps://"));
        };
        let conn_settings = LdapConnSettings::new().set_conn_timeout(settings.connect_timeout);
        let mut tls = None;
        match (&settings.tls, secure) {
            (Some(client), true) => tls = Some(LdapTls::load(client.clone())?),
            (None, true) => {
                return Err(url_error(
                    "ldaps:// needs ldap_cert, ldap_key and ldap_ca (SDS requires mutual TLS)",
                ))
            }
            (Some(_), false) => {
                return Err(url_error(
                    "ldap_cert, ldap_key and ldap_ca apply to ldaps:// only",
                ))
            }
            (None, false) => {}
        }
        Ok(Self {
            settings,
            conn_settings,
            tls,
            conn: Mutex::new(None),
            opened: AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
            requestable: Requestable::builtin(),
        })
    }

    /// Reports the unusable message handlers of `requestable`'s interactions (the catalogue in
    /// force) rather than the built-in catalogue's.
    pub fn reporting(mut self, requestable: Requestable) -> Self {
        self.requestable = requestable;
        self
    }

    /// The configured server URL.
    pub fn url(&self) -> &str {
        &self.settings.url
    }

    /// For `ldaps://`: the TLS material in force and its reloader; `None` for `ldap://`.
    pub fn tls(&self) -> Option<&LdapTls> {
        self.tls.as_ref()
    }

    /// The accredited system with this ASID, or `None`.
    pub async fn system(&self, asid: &str) -> Result<Option<AccreditedSystem>, DirectoryError> {
        if !is_asid(asid) {
            return Ok(None);
        }
        let entries = self
            .search(Scope::Subtree, &system_filter(asid), &AS_ATTRS)
            .await?;
        let mut systems = entries
            .iter()
            .map(accredited_system)
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend_error)?;
        // The filter matches uniqueIdentifier case-insensitively; ASIDs are digits, so the
        // match is exact, but check rather than trust.
        systems.retain(|s| s.asid == asid);
        match systems.len() {
            0 => Ok(None),
            1 => Ok(systems.pop()),
            n => Err(backend_error(format!(
                "{n} nhsAs entries have uniqueIdentifier {asid}"
            ))),
        }
    }

    /// The message handler of `party_key` and `ods_code` for `interaction` a request could be
    /// forwarded to, or `None` (none, or none usable: see [`PartyHandlers::judge`]). Joined as
    /// [`LdapBackend::handlers`] joins (an AS's party key and ODS code), so it is the handler a
    /// [`Party`] looked up for that AS has for the interaction.
    pub async fn handler(
        &self,
        party_key: &str,
        ods_code: &str,
        interaction: &str,
    ) -> Result<Option<MessageHandler>, DirectoryError> {
        let entries = self
            .search(
                Scope::Subtree,
                &handler_filter(party_key, ods_code, interaction),
                &MHS_ATTRS,
            )
            .await?;
        let mut records = entries
            .iter()
            .map(mhs_record)
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend_error)?;
        let join = JoinKey::new(party_key, ods_code);
        records.retain(|r| r.join_key() == join && r.interaction == interaction);
        // All of one interaction: at most one is usable.
        Ok(PartyHandlers::judge(&records, &self.requestable)
            .usable
            .pop())
    }

    /// Every MHS record of `party_key` and `ods_code`, as read (see [`PartyHandlers::judge`]
    /// for what the gateway makes of them). The server matches the party key ignoring case and
    /// the ODS code exactly (the schema's rules); what comes back is checked with the join every
    /// backend applies ([`JoinKey`]).
    pub async fn handlers(
        &self,
        party_key: &str,
        ods_code: &str,
    ) -> Result<Vec<MhsRecord>, DirectoryError> {
        let entries = self
            .search(
                Scope::Subtree,
                &handlers_filter(party_key, ods_code),
                &MHS_ATTRS,
            )
            .await?;
        let mut records = entries
            .iter()
            .map(mhs_record)
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend_error)?;
        let join = JoinKey::new(party_key, ods_code);
        records.retain(|r| r.join_key() == join);
        Ok(records)
    }

    async fn lookup(&self, asid: &str) -> Result<Option<Party>, DirectoryError> {
        let Some(system) = self.system(asid).await? else {
            return Ok(None);
        };
        let records = self.handlers(&system.party_key, &system.ods_code).await?;
        let handlers = PartyHandlers::judge(&records, &self.requestable);
        Ok(Some(Party::new(system, handlers)))
    }

    /// Whether the server answers now: a base-scope search of the search base for its entry
    /// (no attributes), the cheapest search that also proves the base the lookups search under
    /// exists. Any error (no connection, no answer in time, a result code) is a failure.
    pub async fn probe(&self) -> Result<(), DirectoryError> {
        self.search(Scope::Base, PROBE_FILTER, &["1.1"])
            .await
            .map(|_| ())
    }

    /// One search under the search base, on the shared connection; a broken reused connection
    /// is replaced and the search retried once (the first search after a server restart
    /// succeeds).
    async fn search(
        &self,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<Vec<SearchEntry>, DirectoryError> {
        let (id, ldap, reused) = self.connection().await?;
        match self.search_on(ldap, scope, filter, attrs).await {
            Ok(entries) => Ok(entries),
            Err(SearchFailure::Connection(reason)) if reused => {
                tracing::info!(url = %self.settings.url, %reason, "LDAP connection lost; reconnecting");
                self.forget(id);
                let (id, ldap, _) = self.connection().await?;
                self.search_on(ldap, scope, filter, attrs)
                    .await
                    .map_err(|failure| self.failed(id, failure))
            }
            Err(failure) => Err(self.failed(id, failure)),
        }
    }

    fn failed(&self, id: u64, failure: SearchFailure) -> DirectoryError {
        match failure {
            SearchFailure::Connection(reason) => {
                self.forget(id);
                backend_error(format!("{}: {reason}", self.settings.url))
            }
            SearchFailure::Timeout => {
                self.forget(id);
                backend_error(format!(
                    "{}: no answer within {:?}",
                    self.settings.url, self.settings.query_timeout
                ))
            }
            SearchFailure::Answer(reason) => backend_error(reason),
        }
    }

    async fn search_on(
        &self,
        mut ldap: Ldap,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<Vec<SearchEntry>, SearchFailure> {
        let timeout = self.settings.query_timeout;
        let search = ldap
            .with_search_options(SearchOptions::new().sizelimit(SIZE_LIMIT))
            .with_timeout(timeout)
            .search(&self.settings.search_base, scope, filter, attrs);
        let result = match tokio::time::timeout(timeout, search).await {
            Err(_) => return Err(SearchFailure::Timeout),
            Ok(Err(e)) => return Err(classify(e)),
            Ok(Ok(result)) => result,
        };
        let (entries, _) = result.success().map_err(|e| match e {
            LdapError::LdapResult { result } => SearchFailure::Answer(format!(
                "search {filter} under {}: result code {} {}{}",
                self.settings.search_base,
                result.rc,
                result_name(result.rc),
                if result.text.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", result.text)
                }
            )),
            other => classify(other),
        })?;
        entries
            .into_iter()
            .map(|raw| {
                entry_of(raw.0).ok_or_else(|| {
                    SearchFailure::Answer("the server sent a malformed entry".into())
                })
            })
            .collect()
    }

    /// The shared connection and its number, opening one if there is none (or it may not be
    /// used any more: see [`current`](Self::current)). The flag says whether it was already open.
    async fn connection(&self) -> Result<(u64, Ldap, bool), DirectoryError> {
        if let Some((id, ldap)) = self.current() {
            return Ok((id, ldap, true));
        }
        let _connecting = self.connecting.lock().await;
        if let Some((id, ldap)) = self.current() {
            return Ok((id, ldap, true));
        }
        let snapshot = self.tls.as_ref().map(|t| t.snapshot.current());
        let conn_settings = match &snapshot {
            Some(tls) => self.conn_settings.clone().set_config(tls.config.clone()),
            None => self.conn_settings.clone(),
        };
        let connect = LdapConnAsync::with_settings(conn_settings, &self.settings.url);
        let limit = self.settings.connect_timeout;
        let (conn, ldap) = match tokio::time::timeout(limit, connect).await {
            Err(_) => {
                return Err(backend_error(format!(
                    "{}: cannot connect within {limit:?}",
                    self.settings.url
                )))
            }
            Ok(Err(e)) => {
                return Err(backend_error(format!(
                    "{}: cannot connect: {e}",
                    self.settings.url
                )))
            }
            Ok(Ok(pair)) => pair,
        };
        let url = self.settings.url.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::warn!(%url, error = %e, "LDAP connection ended with an error");
            }
        });
        let id = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(url = %self.settings.url, connection = id, "LDAP connection open");
        if let Ok(mut slot) = self.conn.lock() {
            *slot = Some(Open {
                id,
                ldap: ldap.clone(),
                tls: snapshot,
            });
        }
        Ok((id, ldap, false))
    }

    /// The open connection, if there is one that may still be used: not closed, opened with
    /// the TLS snapshot in force (after a reload, the next search opens a connection with the
    /// new material; searches already running on the old one finish, and it closes when the
    /// last of them drops its handle), and not past its CRLs' nextUpdate (from then the next
    /// search opens a connection, whose handshake is checked against the CRLs in force: it
    /// fails while they are stale, as the upstream client's connections do).
    fn current(&self) -> Option<(u64, Ldap)> {
        let in_force = self.tls.as_ref().map(|t| t.snapshot.current());
        let mut slot = self.conn.lock().ok()?;
        let open = slot.as_mut()?;
        let reloaded = match (&open.tls, &in_force) {
            (Some(opened_with), Some(in_force)) => !Arc::ptr_eq(opened_with, in_force),
            _ => false,
        };
        let crls_passed = open
            .tls
            .as_ref()
            .and_then(|t| t.crl_horizon)
            .is_some_and(|h| crate::unix_now() >= h);
        if open.ldap.is_closed() || reloaded || crls_passed {
            if reloaded || crls_passed {
                tracing::info!(
                    url = %self.settings.url,
                    connection = open.id,
                    reason = if reloaded { "TLS material reloaded" } else { "CRLs past their nextUpdate" },
                    "LDAP connection retired; the next search opens a new one"
                );
            }
            *slot = None;
            return None;
        }
        Some((open.id, open.ldap.clone()))
    }

    /// Drops the shared connection if it is still connection `id` (another task may already
    /// have replaced it); the next search opens a fresh one.
    fn forget(&self, id: u64) {
        if let Ok(mut slot) = self.conn.lock() {
            if matches!(slot.as_ref(), Some(open) if open.id == id) {
                *slot = None;
            }
        }
    }

    /// How many connections have been opened (for tests and logs).
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }
}

impl DirectoryBackend for LdapBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn party<'a>(&'a self, asid: &'a str) -> BoxFuture<'a, Result<Option<Party>, DirectoryError>> {
        Box::pin(self.lookup(asid))
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), DirectoryError>> {
        Box::pin(LdapBackend::probe(self))
    }
}

fn backend_error(reason: impl Into<String>) -> DirectoryError {
    DirectoryError::Backend {
        backend: BACKEND,
        reason: reason.into(),
    }
}

fn classify(e: LdapError) -> SearchFailure {
    match e {
        LdapError::Timeout { .. } => SearchFailure::Timeout,
        LdapError::Io { .. }
        | LdapError::OpSend { .. }
        | LdapError::ResultRecv { .. }
        | LdapError::IdScrubSend { .. }
        | LdapError::MiscSend { .. }
        | LdapError::EndOfStream => SearchFailure::Connection(e.to_string()),
        other => SearchFailure::Answer(other.to_string()),
    }
}

/// The names of the result codes an SDS search can meet (RFC 4511 §4.1.9).
fn result_name(rc: u32) -> &'static str {
    match rc {
        3 => "timeLimitExceeded",
        4 => "sizeLimitExceeded",
        11 => "adminLimitExceeded",
        32 => "noSuchObject (check ldap_search_base)",
        48 => "inappropriateAuthentication",
        49 => "invalidCredentials",
        50 => "insufficientAccessRights",
        51 => "busy",
        52 => "unavailable",
        53 => "unwillingToPerform",
        _ => "",
    }
}

/// One entry of a search answer, read from its BER (RFC 4511 §4.5.2, SearchResultEntry), with
/// every block of an attribute kept: its values are merged under the attribute's name,
/// lowercased and without options (`;lang-en`). slapd answers an attribute in two blocks when an entry was loaded with it under
/// both its name and its OID; ldap3's `SearchEntry::construct` keeps only the last block, so a
/// second endpoint, handler interaction or ASID went unseen (and the rules for several values
/// never applied), and it panics on a malformed entry. `None` when the entry is malformed.
fn entry_of(raw: ldap3::asn1::StructureTag) -> Option<SearchEntry> {
    let mut parts = raw.match_id(4)?.expect_constructed()?.into_iter();
    let dn = String::from_utf8(parts.next()?.expect_primitive()?).ok()?;
    let mut attrs: HashMap<String, Vec<String>> = HashMap::new();
    let mut bin_attrs: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for attribute in parts.next()?.expect_constructed()? {
        let mut attribute = attribute.expect_constructed()?.into_iter();
        // An attribute description with options (`nhsMHSEndPoint;lang-en`) is a subtype of
        // the attribute: its values are the attribute's too (RFC 4512 §2.5), as slapd counts them.
        let description = String::from_utf8(attribute.next()?.expect_primitive()?).ok()?;
        let name = description
            .split(';')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        for value in attribute.next()?.expect_constructed()? {
            match String::from_utf8(value.expect_primitive()?) {
                Ok(text) => attrs.entry(name.clone()).or_default().push(text),
                Err(binary) => bin_attrs
                    .entry(name.clone())
                    .or_default()
                    .push(binary.into_bytes()),
            }
        }
    }
    Some(SearchEntry {
        dn,
        attrs,
        bin_attrs,
    })
}

/// The values of one entry, by lowercased attribute name (LDAP names are case-insensitive and
/// servers answer with the schema's spelling, not the request's).
struct Values<'e> {
    dn: &'e str,
    attrs: HashMap<String, &'e [String]>,
    binary: Vec<String>,
}

impl<'e> Values<'e> {
    fn new(entry: &'e SearchEntry) -> Self {
        Self {
            dn: &entry.dn,
            attrs: entry
                .attrs
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.as_slice()))
                .collect(),
            binary: entry
                .bin_attrs
                .keys()
                .map(|k| k.to_ascii_lowercase())
                .collect(),
        }
    }

    fn all(&self, name: &str) -> &'e [String] {
        self.attrs
            .get(&name.to_ascii_lowercase())
            .copied()
            .unwrap_or(&[])
    }

    /// Every value, as sent; an error when the server sent them as binary (not UTF-8).
    fn utf8(&self, name: &str) -> Result<&'e [String], String> {
        if self.binary.contains(&name.to_ascii_lowercase()) {
            return Err(format!("entry {}: {name}: value is not UTF-8", self.dn));
        }
        Ok(self.all(name))
    }

    /// Every value, trimmed ([`trim_value`]).
    fn trimmed(&self, name: &str) -> Result<Vec<String>, String> {
        Ok(self
            .utf8(name)?
            .iter()
            .map(|v| trim_value(v).to_owned())
            .collect())
    }

    /// At most one value; when present, non-empty once trimmed (the rules the LDIF backend
    /// applies).
    fn optional(&self, name: &str) -> Result<Option<String>, String> {
        match self.trimmed(name)?.as_mut_slice() {
            [] => Ok(None),
            [value] if value.is_empty() => Err(format!("entry {}: {name}: empty value", self.dn)),
            [value] => Ok(Some(std::mem::take(value))),
            values => Err(format!(
                "entry {}: {name} must have exactly one value, found {}",
                self.dn,
                values.len()
            )),
        }
    }

    fn required(&self, name: &str) -> Result<String, String> {
        self.optional(name)?
            .ok_or_else(|| format!("entry {}: missing {name}", self.dn))
    }
}

fn accredited_system(entry: &SearchEntry) -> Result<AccreditedSystem, String> {
    let v = Values::new(entry);
    let asid = v.required("uniqueIdentifier")?;
    if !asid.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "entry {}: uniqueIdentifier: an ASID must be ASCII digits",
            v.dn
        ));
    }
    Ok(AccreditedSystem {
        asid,
        ods_code: v.required("nhsIDCode")?,
        party_key: v.required("nhsMHSPartyKey")?,
        interactions: v.trimmed("nhsAsSvcIA")?,
        product_name: v.optional("nhsProductName")?,
        product_version: v.optional("nhsProductVersion")?,
    })
}

/// An `nhsMhs` entry: its identity, CPA id and at least one endpoint are required (the SDS
/// schema makes them MUST); whether its endpoints and FQDN can be used is judged with its
/// party's other handlers ([`PartyHandlers::judge`]), so one record's problem is not the
/// party's.
fn mhs_record(entry: &SearchEntry) -> Result<MhsRecord, String> {
    let v = Values::new(entry);
    let endpoints = v.trimmed("nhsMHSEndPoint")?;
    if endpoints.is_empty() {
        return Err(format!("entry {}: missing nhsMHSEndPoint", v.dn));
    }
    let fqdn = match v.utf8("nhsMhsFQDN") {
        Err(_) => Err("value is not UTF-8".to_owned()),
        Ok(values) => mhs_fqdn(values),
    };
    Ok(MhsRecord {
        id: v.required("uniqueIdentifier")?,
        ods_code: v.required("nhsIDCode")?,
        party_key: v.required("nhsMHSPartyKey")?,
        interaction: v.required("nhsMhsSvcIA")?,
        endpoints,
        fqdn,
        cpa_id: v.required("nhsMhsCPAId")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(dn: &str, attrs: &[(&str, &[&str])]) -> SearchEntry {
        SearchEntry {
            dn: dn.into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect(),
            bin_attrs: HashMap::new(),
        }
    }

    /// A SearchResultEntry's BER: `dn` and each attribute block as sent.
    fn raw_entry(dn: &[u8], blocks: &[(&str, &[&[u8]])]) -> ldap3::asn1::StructureTag {
        use ldap3::asn1::{StructureTag, TagClass, PL};
        let octets = |bytes: &[u8]| StructureTag {
            class: TagClass::Universal,
            id: 4,
            payload: PL::P(bytes.to_vec()),
        };
        let constructed = |class, id, inner| StructureTag {
            class,
            id,
            payload: PL::C(inner),
        };
        let attributes = blocks
            .iter()
            .map(|(name, values)| {
                let values = values.iter().map(|v| octets(v)).collect();
                constructed(
                    TagClass::Universal,
                    16,
                    vec![
                        octets(name.as_bytes()),
                        constructed(TagClass::Universal, 17, values),
                    ],
                )
            })
            .collect();
        constructed(
            TagClass::Application,
            4,
            vec![octets(dn), constructed(TagClass::Universal, 16, attributes)],
        )
    }

    /// slapd answers an attribute loaded under its name and its OID in two blocks: both are
    /// kept, so a second endpoint or ASID is seen and the rules for several values apply. A
    /// malformed entry is refused, never a panic.
    #[test]
    fn every_block_of_an_attribute_is_kept() {
        let handler = entry_of(raw_entry(
            b"uniqueIdentifier=m,ou=services,o=nhs",
            &[
                ("uniqueIdentifier", &[b"m"]),
                ("nhsIDCode", &[b"B82617"]),
                ("nhsMHSPartyKey", &[b"B82617-1"]),
                ("nhsMhsSvcIA", &[b"urn:a"]),
                ("nhsMHSEndPoint", &[b"https://x.example/a"]),
                ("nhsMhsCPAId", &[b"m"]),
                ("nhsMHSEndPoint", &[b"https://evil.example/b"]),
                ("NHSMHSENDPOINT", &[b"https://evil.example/c"]),
                ("nhsMHSEndPoint;lang-en", &[b"https://evil.example/d"]),
            ],
        ))
        .expect("well formed");
        let h = mhs_record(&handler).expect("a record");
        assert_eq!(
            h.endpoints,
            [
                "https://x.example/a",
                "https://evil.example/b",
                "https://evil.example/c",
                "https://evil.example/d"
            ]
        );
        let system = entry_of(raw_entry(
            b"uniqueIdentifier=1,ou=services,o=nhs",
            &[
                ("uniqueIdentifier", &[b"1"]),
                ("nhsIDCode", &[b"B82617"]),
                ("nhsMHSPartyKey", &[b"B82617-1"]),
                ("uniqueIdentifier", &[b"2"]),
            ],
        ))
        .expect("well formed");
        let refused = accredited_system(&system).expect_err("two ASIDs");
        assert!(refused.contains("exactly one value, found 2"), "{refused}");
        // A binary value in one block makes the attribute not UTF-8, whichever block.
        let binary = entry_of(raw_entry(
            b"uniqueIdentifier=1,ou=services,o=nhs",
            &[("nhsIDCode", &[b"B82617"]), ("nhsIDCode", &[b"\xff"])],
        ))
        .expect("well formed");
        assert!(Values::new(&binary).utf8("nhsIDCode").is_err());

        use ldap3::asn1::{StructureTag, TagClass, PL};
        let bare = |payload| StructureTag {
            class: TagClass::Application,
            id: 4,
            payload,
        };
        assert!(entry_of(bare(PL::P(vec![1]))).is_none());
        assert!(entry_of(bare(PL::C(Vec::new()))).is_none());
        assert!(
            entry_of(raw_entry(b"\xff", &[])).is_none(),
            "a DN not UTF-8"
        );
        let mut wrong_id = raw_entry(b"dn", &[]);
        wrong_id.id = 5;
        assert!(entry_of(wrong_id).is_none());
        let mut no_values = raw_entry(b"dn", &[("a", &[b"1"])]);
        if let PL::C(parts) = &mut no_values.payload {
            if let PL::C(attributes) = &mut parts[1].payload {
                if let PL::C(attribute) = &mut attributes[0].payload {
                    attribute.truncate(1);
                }
            }
        }
        assert!(entry_of(no_values).is_none());
    }

    #[test]
    fn filter_values_are_escaped_per_rfc_4515() {
        assert_eq!(escape_filter_value("B82617-0000806"), "B82617-0000806");
        assert_eq!(escape_filter_value("a*b"), "a\\2ab");
        assert_eq!(escape_filter_value("(x)"), "\\28x\\29");
        assert_eq!(escape_filter_value("a\\b"), "a\\5cb");
        assert_eq!(escape_filter_value("a\0b\nc"), "a\\00b\\0ac");
        assert_eq!(escape_filter_value("é"), "é", "UTF-8 passes as is");
        assert_eq!(
            handler_filter("*", "B*", "x)(objectClass=*"),
            "(&(objectClass=nhsMhs)(nhsMHSPartyKey=\\2a)(nhsIDCode=B\\2a)(nhsMhsSvcIA=x\\29\\28objectClass=\\2a))"
        );
    }

    #[test]
    fn the_sds_filters_are_exact() {
        assert_eq!(
            system_filter("918999198993"),
            "(&(objectClass=nhsAs)(uniqueIdentifier=918999198993))"
        );
        assert_eq!(
            handler_filter(
                "B82617-0000806",
                "B82617",
                "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1"
            ),
            "(&(objectClass=nhsMhs)(nhsMHSPartyKey=B82617-0000806)(nhsIDCode=B82617)(nhsMhsSvcIA=urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1))"
        );
        assert_eq!(
            handlers_filter("B82617-0000806", "B82617"),
            "(&(objectClass=nhsMhs)(nhsMHSPartyKey=B82617-0000806)(nhsIDCode=B82617))"
        );
        assert_eq!(
            handlers_filter("p", "X*)(a=b"),
            "(&(objectClass=nhsMhs)(nhsMHSPartyKey=p)(nhsIDCode=X\\2a\\29\\28a=b))"
        );
        for filter in [
            system_filter("1"),
            handler_filter("p", "o", "i"),
            handlers_filter("p", "o"),
        ] {
            assert!(!filter.to_lowercase().contains("fqdn"), "{filter}");
        }
    }

    #[test]
    fn entries_map_to_the_model_with_case_insensitive_names() {
        let e = entry(
            "uniqueIdentifier=1,ou=services,o=nhs",
            &[
                ("uniqueIdentifier", &["1"]),
                ("nhsIDCode", &["B82617"]),
                ("nhsMHSPartyKey", &["B82617-1"]),
                ("nhsAsSvcIA", &["urn:a", "urn:b"]),
                ("nhsProductName", &["Example"]),
            ],
        );
        let s = accredited_system(&e).unwrap();
        assert_eq!(s.asid, "1");
        assert_eq!(s.interactions, ["urn:a", "urn:b"]);
        assert_eq!(s.product_name.as_deref(), Some("Example"));
        assert_eq!(s.product_version, None);

        let e = entry(
            "uniqueIdentifier=m,ou=services,o=nhs",
            &[
                ("uniqueidentifier", &["m"]),
                ("NHSIDCODE", &["B82617"]),
                ("nhsMhsPartyKey", &["B82617-1"]),
                ("nhsMHSSvcIA", &["urn:a"]),
                ("nhsMhsEndPoint", &["https://x.example/a"]),
                ("nhsMHSFQDN", &["x.example"]),
                ("nhsMhsCPAId", &["m"]),
            ],
        );
        let h = mhs_record(&e).unwrap();
        assert_eq!(h.endpoints, ["https://x.example/a"]);
        assert_eq!(h.fqdn.as_deref(), Ok("x.example"));
    }

    /// Values are trimmed, as LDAP's matching ignores leading and trailing spaces; an MHS
    /// record's endpoints and FQDN are read whatever they hold, to be judged with the party.
    #[test]
    fn values_are_trimmed_and_endpoints_and_fqdns_judged_later() {
        let e = entry(
            "uniqueIdentifier=1,ou=services,o=nhs",
            &[
                ("uniqueIdentifier", &["1 "]),
                ("nhsIDCode", &[" B82617"]),
                ("nhsMHSPartyKey", &["V60-1 "]),
                ("nhsAsSvcIA", &["urn:a ", "urn:b"]),
            ],
        );
        let s = accredited_system(&e).unwrap();
        assert_eq!(
            (s.asid.as_str(), s.ods_code.as_str(), s.party_key.as_str()),
            ("1", "B82617", "V60-1")
        );
        assert_eq!(s.interactions, ["urn:a", "urn:b"]);

        let e = entry(
            "uniqueIdentifier=m,ou=services,o=nhs",
            &[
                ("uniqueIdentifier", &["m"]),
                ("nhsIDCode", &["B82617"]),
                ("nhsMHSPartyKey", &["B82617-1"]),
                ("nhsMhsSvcIA", &["urn:a"]),
                (
                    "nhsMhsEndPoint",
                    &["https://x.example/a/ ", "https://y.example/b"],
                ),
                ("nhsMhsFQDN", &["a.example", "b.example"]),
                ("nhsMhsCPAId", &["m"]),
            ],
        );
        let h = mhs_record(&e).unwrap();
        assert_eq!(h.endpoints, ["https://x.example/a/", "https://y.example/b"]);
        assert_eq!(h.fqdn, Err("2 values, expected one".to_owned()));
        let mut no_endpoint = e.clone();
        no_endpoint.attrs.remove("nhsMhsEndPoint");
        no_endpoint.attrs.remove("nhsMhsFQDN");
        assert_eq!(
            mhs_record(&no_endpoint).unwrap_err(),
            "entry uniqueIdentifier=m,ou=services,o=nhs: missing nhsMHSEndPoint"
        );
    }

    #[test]
    fn entries_that_do_not_fit_the_model_are_named() {
        let base: Vec<(&str, &[&str])> = vec![
            ("uniqueIdentifier", &["1"]),
            ("nhsIDCode", &["B82617"]),
            ("nhsMHSPartyKey", &["B82617-1"]),
        ];
        let dn = "uniqueIdentifier=1,ou=services,o=nhs";
        let missing = entry(dn, &base[..2]);
        assert_eq!(
            accredited_system(&missing).unwrap_err(),
            format!("entry {dn}: missing nhsMHSPartyKey")
        );
        let mut twice = base.clone();
        twice[1] = ("nhsIDCode", &["A", "B"]);
        assert!(accredited_system(&entry(dn, &twice))
            .unwrap_err()
            .contains("nhsIDCode must have exactly one value, found 2"));
        let mut letters = base.clone();
        letters[0] = ("uniqueIdentifier", &["12a"]);
        assert!(accredited_system(&entry(dn, &letters))
            .unwrap_err()
            .contains("ASCII digits"));
        let mut blank = base.clone();
        blank[1] = ("nhsIDCode", &["  "]);
        assert!(accredited_system(&entry(dn, &blank))
            .unwrap_err()
            .contains("nhsIDCode: empty value"));
        let mut binary = entry(dn, &base);
        binary.attrs.remove("nhsIDCode");
        binary
            .bin_attrs
            .insert("nhsIDCode".into(), vec![vec![0xff, 0xfe]]);
        assert!(accredited_system(&binary)
            .unwrap_err()
            .contains("not UTF-8"));
    }

    fn settings(url: &str, tls: Option<ClientTls>) -> LdapSettings {
        LdapSettings {
            url: url.into(),
            search_base: DEFAULT_SEARCH_BASE.into(),
            tls,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            query_timeout: DEFAULT_QUERY_TIMEOUT,
        }
    }

    #[test]
    fn urls_and_tls_settings_are_checked() {
        let tls = ClientTls {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            ca: "ca.pem".into(),
            crls: Vec::new(),
        };
        assert!(LdapBackend::new(settings("ldap://127.0.0.1:1", None)).is_ok());
        for (url, tls, expected) in [
            ("http://127.0.0.1", None, "must start with"),
            ("ldaps://127.0.0.1", None, "mutual TLS"),
            ("ldap://127.0.0.1", Some(tls.clone()), "ldaps:// only"),
        ] {
            let err = LdapBackend::new(settings(url, tls))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{url}: {err}");
        }
        // Every file that does not load is named, with its key.
        let err = LdapBackend::new(settings("ldaps://127.0.0.1", Some(tls)))
            .unwrap_err()
            .to_string();
        for expected in [
            "directory.ldap_cert: c.pem: cannot read",
            "directory.ldap_key: k.pem: cannot read",
            "directory.ldap_ca: ca.pem: cannot read",
        ] {
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_backend_error_not_a_panic_or_a_hang() {
        // A port nothing listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let backend =
            LdapBackend::new(settings(&format!("ldap://127.0.0.1:{port}"), None)).unwrap();
        let err = DirectoryBackend::party(&backend, "918999198993")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cannot connect"), "{err}");
        assert_eq!(
            DirectoryBackend::party(&backend, "not-an-asid")
                .await
                .unwrap(),
            None,
            "a value that cannot be an ASID is not sent to the server"
        );
    }

    proptest! {
        #[test]
        fn escaped_values_never_contain_filter_metacharacters(value in ".*") {
            let escaped = escape_filter_value(&value);
            prop_assert!(!escaped.contains(['*', '(', ')', '\0']));
            // Every backslash starts a two-hex-digit escape.
            let bytes = escaped.as_bytes();
            for (i, b) in bytes.iter().enumerate() {
                if *b == b'\\' {
                    prop_assert!(bytes.len() > i + 2);
                    prop_assert!(bytes[i + 1].is_ascii_hexdigit() && bytes[i + 2].is_ascii_hexdigit());
                }
            }
        }
    }
}
