//! The SDS FHIR API directory backend (`GET {base}/Device` and `/Endpoint`, FHIR R4, API-key
//! auth). Owns the HTTP client (pooled; HTTPS with a CA bundle, hot-reloaded with a new client
//! and pool for each bundle ([`FhirTls`]), or plain HTTP to a loopback test server only), the
//! query encoding, and the mapping of `Device` and `Endpoint` resources
//! to the directory model. It only sends GET requests to the configured base URL, with the
//! `apikey` header and a fresh `X-Correlation-Id` per request; it never logs the API key.
//!
//! ## How an ASID is resolved
//!
//! The API cannot search by ASID: `/Device` needs an ODS code (`organization`) and an
//! interaction (`identifier=…/nhsServiceInteractionId|…`). So the backend is configured with
//! the ODS code of every ASID it may be asked about (`fhir_asid_ods`), and resolves an ASID as:
//!
//! 1. its ODS code from that map (an ASID not in the map is answered "not registered");
//! 2. `GET /Device?organization=<ods>&identifier=<interaction>` for the interactions of the
//!    gateway's catalogue, taken in catalogue order until a Device whose `nhsSpineASID`
//!    identifier is the ASID comes back: the first interaction alone (a GP Connect party is
//!    found by it, in one request), then the others [`DEVICE_SEARCHES_IN_FLIGHT`] at a time
//!    (the searches still running when one finds it are dropped). A Device lists every `nhsAsSvcIA` of its AS record, so one
//!    match gives the whole accreditation; no match for any catalogue interaction is "not
//!    registered". A Device whose `status` is there and not `active` (the API sends none) is
//!    not a match, and ends the lookup: the ASID is not registered (no further searches);
//! 3. `GET /Endpoint?organization=<ods>&identifier=<nhsMhsPartyKey>|<party key>`: every message
//!    handler (`address`, `nhsMhsFQDN`, `nhsMhsCPAId`, `nhsMHSId`, interaction) of the party key.
//!    An Endpoint whose party key is another (ignoring ASCII case, as LDAP's `caseIgnoreMatch`),
//!    whose `managingOrganization` is another ODS code (exactly, as `caseExactMatch`), or whose
//!    `status` is not `active` (the API sends `active`) is dropped with a debug log: its FQDN
//!    must not become one the ASID's certificate may present. The API sends one Endpoint per `nhsMHSEndPoint` value:
//!    Endpoints with one `nhsMHSId` and interaction are one MHS record with several addresses.
//!    What the gateway makes of the records is [`PartyHandlers::judge`]'s, as for the other
//!    backends.
//!
//! Values are used with their leading and trailing white space removed, as the LDAP behind the
//! API matches them.
//!
//! ## What it cannot do
//!
//! - Answer for an ASID that is not in `fhir_asid_ods`: it says "not registered" (403s), so the
//!   map must list every consumer and provider the gateway serves.
//! - Find an AS record accredited only for interactions outside the catalogue (the gateway
//!   would refuse those interactions anyway).
//! - Return product name and version (the API does not expose them).
//! - Follow paged results: a Bundle with a `next` link is refused (the API returns all matches
//!   in one Bundle).
//! - Be fresher than the API's own response cache (30 minutes at the NHS API gateway).
//!
//! ## Time
//!
//! Each request gets `query_timeout`; the whole lookup gets [`LOOKUP_BUDGET_QUERIES`] times
//! that (10 s by default), however many `/Device` searches it needs. A lookup that runs out is
//! a backend error, like a request that does. After the first, the `/Device` searches run
//! [`DEVICE_SEARCHES_IN_FLIGHT`] at a time, so a party found only by the catalogue's last
//! interaction takes four round trips to the API, not seventeen.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, StreamExt};
use http::header::{HeaderValue, ACCEPT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{
    is_asid, mhs_fqdn, trim_value, AccreditedSystem, DirectoryBackend, DirectoryError, JoinKey,
    MhsRecord, Party, PartyHandlers, Requestable,
};
use crate::reload::Reloadable;
use crate::tls;

const BACKEND: &str = "fhir";

/// ODS organisation codes (`organization`, `managingOrganization`).
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// Interaction ids (`identifier` search parameter, interaction extension).
pub const INTERACTION_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsServiceInteractionId";
/// ASIDs (`Device.identifier`).
pub const ASID_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsSpineASID";
/// Party keys (`Device.identifier`, `Endpoint.identifier`, `identifier` search parameter).
pub const PARTY_KEY_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsMhsPartyKey";
/// `Endpoint.identifier`: FQDN of the message handler.
pub const FQDN_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsMhsFQDN";
/// `Endpoint.identifier`: CPA id.
pub const CPA_ID_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsMhsCPAId";
/// `Endpoint.identifier`: the MHS record's `uniqueIdentifier`.
pub const MHS_ID_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsMHSId";
/// The extension carrying interaction ids on Device and Endpoint.
pub const INTERACTION_EXTENSION: &str =
    "https://fhir.nhs.uk/StructureDefinition/Extension-SDS-NhsServiceInteractionId";

/// Default time to open a connection (TCP and TLS).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time one request may take, body included.
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole lookup (all its requests: up to one `/Device` search per catalogue interaction, then
/// one `/Endpoint` search) may take this many times `query_timeout`: time for the usual two
/// requests at their limit, however many `/Device` searches a slow API would otherwise take.
pub const LOOKUP_BUDGET_QUERIES: u32 = 2;
/// The `/Device` searches of one lookup that run at once, at most.
pub const DEVICE_SEARCHES_IN_FLIGHT: usize = 6;
/// The largest response body accepted (an SDS Bundle is a few kilobytes).
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// The largest API key file read.
const MAX_API_KEY_BYTES: u64 = 4096;

/// Characters escaped in a query parameter value (everything but unreserved characters).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How to reach the SDS FHIR API (`[directory]` with `backend = "fhir"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirSettings {
    /// e.g. `https://int.api.service.nhs.uk/spine-directory/FHIR/R4` (no trailing `/`).
    /// `http://` is accepted for a loopback host only (tests, a local stub).
    pub base_url: String,
    /// File holding the API key (sent as the `apikey` header).
    pub api_key_file: PathBuf,
    /// CA bundle (PEM) the API's certificate must chain to; required for `https://`.
    pub ca: Option<PathBuf>,
    /// ASID -> ODS code of every system the gateway may be asked about.
    pub asid_ods: BTreeMap<String, String>,
    pub connect_timeout: Duration,
    pub query_timeout: Duration,
}

/// Why the FHIR backend could not be built, naming the `[directory]` key to fix.
#[derive(Debug, thiserror::Error)]
pub enum FhirSetupError {
    #[error("directory.fhir_base_url: {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("directory.fhir_api_key_file: {}: {reason}", path.display())]
    ApiKey { path: PathBuf, reason: String },
    /// The CA bundle (the error names the file).
    #[error("directory.fhir_ca: {0}")]
    Tls(#[from] tls::TlsError),
}

/// A [`DirectoryBackend`] answering from the SDS FHIR API.
pub struct FhirBackend {
    /// Scheme, authority and path of the base, without a trailing `/`.
    base: String,
    api_key: HeaderValue,
    asid_ods: BTreeMap<String, String>,
    /// The catalogue's interaction ids, in the order they are tried; the ones whose unusable
    /// message handlers a party reports.
    interactions: Requestable,
    /// The client in force: a new one (and pool) after each reload of `fhir_ca`.
    api: Arc<Reloadable<ApiClient>>,
    /// For `https://`: the CA bundle and what rebuilds the client from it; `None` for `http://`.
    tls: Option<FhirTls>,
    query_timeout: Duration,
    /// The time a whole lookup may take ([`LOOKUP_BUDGET_QUERIES`] × `query_timeout`).
    lookup_budget: Duration,
}

impl std::fmt::Debug for FhirBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FhirBackend")
            .field("base", &self.base)
            .field("asids", &self.asid_ods.len())
            .finish()
    }
}

impl FhirBackend {
    /// Reads the API key and TLS material; `interactions` are the catalogue's ids (step 2 of
    /// the resolution in the module doc). A bad URL is the only problem reported; otherwise
    /// both files are read and every problem with them reported. Blocking file I/O: call at
    /// start-up.
    pub fn new(
        settings: &FhirSettings,
        interactions: Vec<String>,
    ) -> Result<Self, Vec<FhirSetupError>> {
        let url_error = |reason: &str| {
            vec![FhirSetupError::Url {
                url: settings.base_url.clone(),
                reason: reason.to_string(),
            }]
        };
        let uri: Uri = settings
            .base_url
            .parse()
            .map_err(|_| url_error("not a URL"))?;
        let host = uri.host().ok_or_else(|| url_error("no host"))?;
        // `Uri` drops a fragment silently; `/Device?…` appended after one would never be sent.
        if settings.base_url.contains(['?', '#']) || settings.base_url.ends_with('/') {
            return Err(url_error(
                "must have no query, no fragment and no trailing `/`",
            ));
        }
        let ca = match uri.scheme_str() {
            Some("https") => Some(settings.ca.as_ref().ok_or_else(|| {
                url_error("https:// needs fhir_ca (the CA bundle the API's certificate chains to)")
            })?),
            Some("http") if is_loopback(host) => None,
            Some("http") => {
                return Err(url_error(
                    "plain http:// is allowed to a loopback host only; use https://",
                ))
            }
            _ => return Err(url_error("must be an https:// URL")),
        };
        let connect_timeout = settings.connect_timeout;
        let (api_key, client) = match (
            read_api_key(&settings.api_key_file),
            ca.map(|ca| ApiClient::with_ca(ca, connect_timeout))
                .transpose(),
        ) {
            (Ok(api_key), Ok(client)) => (api_key, client),
            (api_key, client) => {
                return Err(api_key.err().into_iter().chain(client.err()).collect())
            }
        };
        let client = client.unwrap_or_else(|| ApiClient::new(None, connect_timeout, None));
        let api = Reloadable::new(
            super::TLS_COMPONENT,
            Arc::new(client),
            ca.iter().map(|ca| ca.to_path_buf()).collect(),
        );
        let tls = ca.map(|ca| FhirTls {
            api: api.clone(),
            ca: ca.to_path_buf(),
            connect_timeout,
        });
        Ok(Self {
            base: settings.base_url.clone(),
            api_key,
            asid_ods: settings.asid_ods.clone(),
            interactions: Requestable::new(interactions),
            api,
            tls,
            query_timeout: settings.query_timeout,
            lookup_budget: settings.query_timeout.saturating_mul(LOOKUP_BUDGET_QUERIES),
        })
    }

    /// The configured base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// For `https://`: the CA bundle in force and its reloader; `None` for `http://`.
    pub fn tls(&self) -> Option<&FhirTls> {
        self.tls.as_ref()
    }

    async fn lookup(&self, asid: &str) -> Result<Option<Party>, DirectoryError> {
        if !is_asid(asid) {
            return Ok(None);
        }
        let Some(ods) = self.asid_ods.get(asid) else {
            tracing::debug!(
                asid,
                "ASID not in fhir_asid_ods: answered as not registered"
            );
            return Ok(None);
        };
        let organization = format!("{ODS_SYSTEM}|{ods}");
        let organization = organization.as_str();
        // The first Device with the ASID, or the first failure, decides as it would one search
        // at a time; the searches still running then are dropped.
        let mut searches = std::pin::pin!(self.device_searches(organization));
        let mut found = DeviceMatch::Absent;
        while let Some(answer) = searches.next().await {
            let answer = answer?;
            found = device_with_asid(&answer.body, asid, ods)
                .map_err(|e| backend_error(format!("{}, ASID {asid}: {e}", answer.what)))?;
            if found != DeviceMatch::Absent {
                break;
            }
        }
        let system = match found {
            DeviceMatch::Active(system) => system,
            DeviceMatch::Absent => return Ok(None),
            DeviceMatch::Inactive => {
                // Every catalogue search would find the same Device: not registered, now.
                tracing::debug!(asid, "the ASID's Device is not active: not registered");
                return Ok(None);
            }
        };
        let answer = self
            .get(
                "Endpoint",
                &[
                    ("organization", organization),
                    (
                        "identifier",
                        &format!("{PARTY_KEY_SYSTEM}|{}", system.party_key),
                    ),
                ],
            )
            .await?;
        let records = endpoints(&answer.body, &system.party_key, &system.ods_code)
            .map_err(|e| backend_error(format!("{}, ASID {asid}: {e}", answer.what)))?;
        let handlers = PartyHandlers::judge(&records, &self.interactions);
        Ok(Some(Party::new(system, handlers)))
    }

    /// The `/Device` searches of `organization` for the catalogue's interactions, answers in
    /// catalogue order: the first interaction alone (GP Connect parties are found by it), then
    /// the others [`DEVICE_SEARCHES_IN_FLIGHT`] at a time. Futures do nothing until polled:
    /// `chain` polls the others only once the first has answered, and `buffered` starts them
    /// as it takes them.
    fn device_searches<'a>(
        &'a self,
        organization: &'a str,
    ) -> impl futures_util::Stream<Item = Result<Answer, DirectoryError>> + Send + 'a {
        let mut interactions = self.interactions.iter();
        let first = interactions
            .next()
            .map(|interaction| self.devices(organization, interaction));
        let rest = interactions.map(|interaction| self.devices(organization, interaction));
        stream::iter(first)
            .then(|search| search)
            .chain(stream::iter(rest).buffered(DEVICE_SEARCHES_IN_FLIGHT))
    }

    /// `GET /Device?organization=<organization>&identifier=<interaction>`.
    async fn devices(
        &self,
        organization: &str,
        interaction: &str,
    ) -> Result<Answer, DirectoryError> {
        self.get(
            "Device",
            &[
                ("organization", organization),
                ("identifier", &format!("{INTERACTION_SYSTEM}|{interaction}")),
            ],
        )
        .await
    }

    /// Whether the API answers now: one `/Device` search (the first mapped ODS code and the
    /// first catalogue interaction) that must come back as a Bundle of Devices, whatever it
    /// holds. With no ASID mapped or no interaction, no lookup ever reaches the API, so there
    /// is nothing to ask and the backend answers.
    pub async fn probe(&self) -> Result<(), DirectoryError> {
        let (Some(ods), Some(interaction)) = (
            self.asid_ods.values().next(),
            self.interactions.iter().next(),
        ) else {
            return Ok(());
        };
        let answer = self
            .get(
                "Device",
                &[
                    ("organization", &format!("{ODS_SYSTEM}|{ods}")),
                    ("identifier", &format!("{INTERACTION_SYSTEM}|{interaction}")),
                ],
            )
            .await?;
        resources(&answer.body, "Device")
            .map(|_| ())
            .map_err(|e| backend_error(format!("{} (readiness probe): {e}", answer.what)))
    }

    /// `GET {base}/{resource}?{params}` → the Bundle, or an error naming the correlation id.
    async fn get(&self, resource: &str, params: &[(&str, &str)]) -> Result<Answer, DirectoryError> {
        let query = params
            .iter()
            .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, QUERY_VALUE)))
            .collect::<Vec<_>>()
            .join("&");
        let url = format!("{}/{resource}?{query}", self.base);
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let what = format!("GET /{resource} (X-Correlation-Id {correlation_id})");
        let request = Request::get(&url)
            .header(ACCEPT, "application/fhir+json")
            .header("apikey", self.api_key.clone())
            .header("x-correlation-id", &correlation_id)
            .body(Empty::new())
            .map_err(|e| backend_error(format!("{what}: cannot build the request: {e}")))?;
        // One load of the client in force; a reload swaps in a new one (and pool) for the
        // requests after it.
        let api = self.api.current();
        let exchange = async {
            let response = api
                .client
                .request(request)
                .await
                .map_err(|e| format!("{what}: {}", crate::forward::error_chain(&e)))?;
            let status = response.status();
            // None is asked for (no Accept-Encoding): a coded body is not JSON, say why.
            let coding = response
                .headers()
                .get(http::header::CONTENT_ENCODING)
                .map(|v| printable(&String::from_utf8_lossy(v.as_bytes()), 40))
                .filter(|coding| !coding.trim().eq_ignore_ascii_case("identity"));
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("{what}: reading the response: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, coding, body))
        };
        let (status, coding, body) = match tokio::time::timeout(self.query_timeout, exchange).await
        {
            Err(_) => {
                return Err(backend_error(format!(
                    "{what}: no answer within {:?}",
                    self.query_timeout
                )))
            }
            Ok(result) => result.map_err(backend_error)?,
        };
        if status != StatusCode::OK {
            return Err(backend_error(format!(
                "{what}: HTTP {status}{}",
                diagnostics(&body)
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            )));
        }
        if let Some(coding) = coding {
            return Err(backend_error(format!(
                "{what}: the response has Content-Encoding {coding}, which the gateway does not ask for"
            )));
        }
        serde_json::from_slice(&body)
            .map(|body| Answer {
                body,
                what: what.clone(),
            })
            .map_err(|e| backend_error(format!("{what}: the response is not JSON: {e}")))
    }
}

impl DirectoryBackend for FhirBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    /// [`lookup`](FhirBackend::lookup) within the lookup budget: a lookup still running when
    /// it is spent is a backend error (the gateway serves a stale party or answers 503).
    fn party<'a>(&'a self, asid: &'a str) -> BoxFuture<'a, Result<Option<Party>, DirectoryError>> {
        Box::pin(async move {
            tokio::time::timeout(self.lookup_budget, self.lookup(asid))
                .await
                .unwrap_or_else(|_| {
                    Err(backend_error(format!(
                        "the lookup of ASID {asid} did not finish within {:?} \
                         ({LOOKUP_BUDGET_QUERIES} x query_timeout)",
                        self.lookup_budget
                    )))
                })
        })
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), DirectoryError>> {
        Box::pin(FhirBackend::probe(self))
    }
}

fn backend_error(reason: impl Into<String>) -> DirectoryError {
    DirectoryError::Backend {
        backend: BACKEND,
        reason: reason.into(),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn read_api_key(path: &Path) -> Result<HeaderValue, FhirSetupError> {
    let fail = |reason: String| FhirSetupError::ApiKey {
        path: path.to_path_buf(),
        reason,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| fail(e.to_string()))?
        .len();
    if len > MAX_API_KEY_BYTES {
        return Err(fail(format!("larger than {MAX_API_KEY_BYTES} bytes")));
    }
    let text = crate::files::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(fail("empty".into()));
    }
    let mut value = HeaderValue::from_str(key)
        .map_err(|_| fail("not a valid header value (one line of visible ASCII)".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// The API client as one reloadable snapshot: a pooled HTTP client made with the CA bundle in
/// force. A reload makes a new client, with a new pool: connections made under the previous
/// bundle are not used for new requests (they close once the requests still on them finish).
pub struct ApiClient {
    client: Client<Connector, Empty<Bytes>>,
    /// The earliest notAfter of the CA bundle (unix seconds); `None` for `http://`.
    ca_expiry: Option<i64>,
}

impl ApiClient {
    fn new(
        tls: Option<Arc<rustls::ClientConfig>>,
        connect_timeout: Duration,
        ca_expiry: Option<i64>,
    ) -> Self {
        let connector = Connector {
            tls: tls.map(tokio_rustls::TlsConnector::from),
            connect_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self { client, ca_expiry }
    }

    /// A client for `https://` that trusts the CA bundle `ca` (blocking file I/O).
    fn with_ca(ca: &Path, connect_timeout: Duration) -> Result<Self, FhirSetupError> {
        let (config, expiry) = client_tls(ca)?;
        Ok(Self::new(Some(config), connect_timeout, Some(expiry)))
    }

    /// When the CA bundle of this client runs out (its earliest notAfter, unix seconds);
    /// `None` for `http://`.
    pub fn ca_expiry(&self) -> Option<i64> {
        self.ca_expiry
    }
}

/// The `https://` client's CA bundle (`fhir_ca`) and what rebuilds the client from it: reloaded
/// on SIGHUP and file change (component [`super::TLS_COMPONENT`]), like the listener's TLS.
/// Clones share the client in force.
#[derive(Clone)]
pub struct FhirTls {
    api: Arc<Reloadable<ApiClient>>,
    ca: PathBuf,
    connect_timeout: Duration,
}

impl std::fmt::Debug for FhirTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FhirTls")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl FhirTls {
    /// The client in force and its reloader.
    pub fn reloadable(&self) -> &Arc<Reloadable<ApiClient>> {
        &self.api
    }

    /// A new client from the CA bundle as it is now (blocking file I/O: the reloader runs it on
    /// the blocking pool).
    pub fn rebuild(&self) -> Result<ApiClient, FhirSetupError> {
        ApiClient::with_ca(&self.ca, self.connect_timeout)
    }
}

/// A client config that verifies the API's certificate against `ca` and presents none, and
/// the bundle's earliest notAfter (unix seconds), from the same read of the file.
fn client_tls(ca: &Path) -> Result<(Arc<rustls::ClientConfig>, i64), FhirSetupError> {
    let (roots, expiry) = tls::load_ca_bundle_with_expiry(ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls::TlsError::Rustls {
            path: ca.to_owned(),
            context: "protocol versions",
            source: e,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // No session is resumed: a resumed session skips the check of the API's certificate, so
    // one that has run out would go on being accepted (as for providers and LDAPS).
    config.resumption = rustls::client::Resumption::disabled();
    Ok((Arc::new(config), expiry))
}

/// An answer of the API: its JSON, and what asked for it (`GET /Device (X-Correlation-Id …)`),
/// to name in an error about what it holds.
struct Answer {
    body: Value,
    what: String,
}

/// `issue[0].diagnostics` of an OperationOutcome body, shortened and with control characters
/// escaped ([`printable`]), for error messages.
fn diagnostics(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let d = v.get("issue")?.get(0)?.get("diagnostics")?.as_str()?;
    Some(printable(d, 200))
}

/// Text from the API as it may go into an error, a log line or the CLI's output: at most `max`
/// characters, control characters escaped (`\n`, `\u{1b}`), so that a hostile answer cannot
/// start a log line of its own or drive a terminal.
fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars().take(max) {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Mapping (pure)
// ------------------------------------------------------------------------------------------------

/// The resources of `kind` in a searchset Bundle, which must be whole: a `type` other than
/// `searchset`, a `total` other than the number of entries, a `next` link (any case) or an
/// entry whose `search.mode` is not `match` is an error, never a shorter answer (which would be
/// cached as the party's whole registration).
fn resources<'b>(bundle: &'b Value, kind: &str) -> Result<Vec<&'b Value>, String> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err("the response is not a FHIR Bundle".into());
    }
    match bundle.get("type") {
        None => {}
        Some(Value::String(t)) if t == "searchset" => {}
        Some(other) => {
            return Err(format!(
                "Bundle.type is {}, expected searchset",
                printable(&other.to_string(), 40)
            ))
        }
    }
    let links = match bundle.get("link") {
        None => &[][..],
        Some(Value::Array(links)) => links.as_slice(),
        Some(_) => return Err("Bundle.link is not an array".into()),
    };
    if links.iter().any(|l| {
        l.get("relation")
            .and_then(Value::as_str)
            .is_some_and(|r| r.trim().eq_ignore_ascii_case("next"))
    }) {
        return Err("the Bundle is paged (has a `next` link); paging is not supported".into());
    }
    let entries = match bundle.get("entry") {
        None => &[][..],
        Some(entries) => entries
            .as_array()
            .ok_or("Bundle.entry is not an array")?
            .as_slice(),
    };
    if let Some(total) = bundle.get("total") {
        if total.as_u64() != Some(entries.len() as u64) {
            return Err(format!(
                "Bundle.total is {} but the Bundle holds {} entries: an incomplete answer",
                printable(&total.to_string(), 40),
                entries.len()
            ));
        }
    }
    entries
        .iter()
        .map(|entry| {
            match entry.get("search").and_then(|s| s.get("mode")) {
                None => {}
                Some(Value::String(mode)) if mode == "match" => {}
                Some(mode) => {
                    return Err(format!(
                        "a Bundle entry's search.mode is {}, expected match",
                        printable(&mode.to_string(), 40)
                    ))
                }
            }
            let resource = entry
                .get("resource")
                .ok_or("a Bundle entry has no resource")?;
            match resource.get("resourceType").and_then(Value::as_str) {
                Some(t) if t == kind => Ok(resource),
                other => Err(format!(
                    "a Bundle entry is {}, expected {kind}",
                    printable(other.unwrap_or("not a resource"), 40)
                )),
            }
        })
        .collect()
}

/// Where a value came from, for error messages ([`printable`]).
fn label(resource: &Value) -> String {
    let text = |name: &str| {
        printable(
            resource.get(name).and_then(Value::as_str).unwrap_or("?"),
            80,
        )
    };
    format!("{}/{}", text("resourceType"), text("id"))
}

/// A value the model can use: without leading or trailing white space (the LDAP behind the
/// API ignores it when matching), and then not empty.
fn clean(resource: &Value, what: &str, value: &str) -> Result<String, String> {
    let value = trim_value(value);
    if value.is_empty() {
        return Err(format!("{}: {what}: empty value", label(resource)));
    }
    Ok(value.to_string())
}

/// The values of `resource.identifier[]` with `system`; one that is not a string is an error
/// (never skipped: a second ASID written as a number is still a second ASID).
fn identifiers<'r>(resource: &'r Value, system: &'static str) -> Result<Vec<&'r str>, String> {
    identifier_values(resource, system)
        .map(|value| {
            value
                .and_then(Value::as_str)
                .ok_or_else(|| not_a_string(resource, system))
        })
        .collect()
}

/// The `value` of each of `resource.identifier[]` with `system`, as it is (`None`: absent).
fn identifier_values<'r>(
    resource: &'r Value,
    system: &'static str,
) -> impl Iterator<Item = Option<&'r Value>> + 'r {
    resource
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |id| id.get("system").and_then(Value::as_str) == Some(system))
        .map(|id| id.get("value"))
}

/// The error for an identifier of `system` on `resource` whose value is not a string.
fn not_a_string(resource: &Value, system: &str) -> String {
    format!(
        "{}: an identifier {system} whose value is not a string",
        label(resource)
    )
}

/// Exactly one identifier with `system`.
fn one_identifier(resource: &Value, system: &'static str) -> Result<String, String> {
    match identifiers(resource, system)?.as_slice() {
        [value] => clean(resource, system, value),
        [] => Err(format!("{}: no identifier {system}", label(resource))),
        values => Err(format!(
            "{}: {} identifiers {system}, expected one",
            label(resource),
            values.len()
        )),
    }
}

/// The interaction ids in `resource.extension[]`.
fn interaction_ids(resource: &Value) -> Result<Vec<String>, String> {
    let Some(extensions) = resource.get("extension").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    extensions
        .iter()
        .filter(|e| e.get("url").and_then(Value::as_str) == Some(INTERACTION_EXTENSION))
        .map(|e| {
            let identifier = e
                .get("valueReference")
                .and_then(|r| r.get("identifier"))
                .ok_or_else(|| {
                    format!(
                        "{}: interaction extension without valueReference.identifier",
                        label(resource)
                    )
                })?;
            if identifier.get("system").and_then(Value::as_str) != Some(INTERACTION_SYSTEM) {
                return Err(format!(
                    "{}: interaction extension with a system other than {INTERACTION_SYSTEM}",
                    label(resource)
                ));
            }
            let value = identifier
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    format!("{}: interaction extension without a value", label(resource))
                })?;
            clean(resource, "interaction", value)
        })
        .collect()
}

/// Whether `device` has `asid` among its ASID identifiers. One of them that is not a string
/// is an error only when its JSON text is `asid` (the Device looked for, malformed): a
/// malformed Device of another ASID does not stop the lookup of the organisation's others.
/// The Device found is read strictly after this ([`one_identifier`]).
fn names_asid(device: &Value, asid: &str) -> Result<bool, String> {
    for value in identifier_values(device, ASID_SYSTEM) {
        match value {
            Some(Value::String(value)) if trim_value(value) == asid => return Ok(true),
            Some(Value::String(_)) | None => {}
            Some(other) if trim_value(&other.to_string()) == asid => {
                return Err(not_a_string(device, ASID_SYSTEM))
            }
            Some(_) => {}
        }
    }
    Ok(false)
}

/// What a `/Device` Bundle says of an ASID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceMatch {
    /// No Device has the ASID.
    Absent,
    /// The AS record of the one Device with the ASID that is `active` or says nothing.
    Active(AccreditedSystem),
    /// Devices have the ASID, none of them active: the ASID is not registered.
    Inactive,
}

/// The AS record among a `/Device` Bundle's Devices whose ASID is `asid`, if any. `ods` is the
/// ODS code searched for (the API filters on the AS record's `nhsIDCode` but does not return it).
pub fn device_with_asid(bundle: &Value, asid: &str, ods: &str) -> Result<DeviceMatch, String> {
    let mut found = Vec::new();
    let mut inactive = false;
    for device in resources(bundle, "Device")? {
        if !names_asid(device, asid)? {
            continue;
        }
        // The API sends no status; a Device that says it is not active is not a registration.
        match device.get("status") {
            None => {}
            Some(Value::String(status)) if status == "active" => {}
            Some(status) => {
                tracing::debug!(device = %label(device), %status, "a Device with the ASID is not active; not used");
                inactive = true;
                continue;
            }
        }
        let device_asid = one_identifier(device, ASID_SYSTEM)?;
        found.push(AccreditedSystem {
            asid: device_asid,
            ods_code: ods.to_string(),
            party_key: one_identifier(device, PARTY_KEY_SYSTEM)?,
            interactions: interaction_ids(device)?,
            product_name: None,
            product_version: None,
        });
    }
    match (found.len(), inactive) {
        (0, false) => Ok(DeviceMatch::Absent),
        (0, true) => Ok(DeviceMatch::Inactive),
        (1, _) => Ok(found.pop().map_or(DeviceMatch::Absent, DeviceMatch::Active)),
        (n, _) => Err(format!("{n} Devices have ASID {asid}")),
    }
}

/// The MHS records of `party_key` and `ods` in an `/Endpoint` Bundle, for
/// [`PartyHandlers::judge`]. An Endpoint with another party key or `managingOrganization`
/// (compared as every backend joins, [`JoinKey`]: the party key ignoring ASCII case, the ODS
/// code exactly) is not this party's, whatever the API returned, and one whose `status`
/// is not `active` is not in service: each is dropped, so its FQDN never becomes one a
/// certificate may present for this ASID. That is decided first, on what the Endpoint has: a
/// dropped Endpoint needs no readable party key or `managingOrganization`; one kept does. The
/// API sends one Endpoint per `nhsMHSEndPoint` value: Endpoints with the same `nhsMHSId` make
/// one record, so they must agree on all else the record holds (an MHS record has one
/// interaction, FQDN and CPA id: the LDAP backend refuses a record with two; the party key and
/// ODS code already agree, as the join compares them). Endpoints of one id are not told apart
/// from two entries of one id (the API says nothing of the entry): the same address twice is
/// two values, an unusable handler, as the LDAP backend finds two handlers unusable; two
/// interactions under one id are refused, where the LDAP backend would take two entries.
pub fn endpoints(bundle: &Value, party_key: &str, ods: &str) -> Result<Vec<MhsRecord>, String> {
    let join = JoinKey::new(party_key, ods);
    let mut records: Vec<MhsRecord> = Vec::new();
    for endpoint in resources(bundle, "Endpoint")? {
        // Whether the Endpoint is dropped is decided first, on what it has: its party key and
        // ODS code are required only of the Endpoints kept.
        let key = one_identifier(endpoint, PARTY_KEY_SYSTEM);
        let managing = endpoint
            .get("managingOrganization")
            .and_then(|o| o.get("identifier"))
            .filter(|i| i.get("system").and_then(Value::as_str) == Some(ODS_SYSTEM))
            .and_then(|i| i.get("value"))
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{}: no managingOrganization ODS code", label(endpoint)))
            .and_then(|managing| clean(endpoint, "managingOrganization", managing));
        let status = endpoint.get("status").and_then(Value::as_str);
        let dropped = if status != Some("active") {
            Some("not active")
        } else if JoinKey::new(
            key.as_deref().unwrap_or(party_key),
            managing.as_deref().unwrap_or(ods),
        ) != join
        {
            Some("of another party key or ODS code")
        } else {
            None
        };
        if let Some(why) = dropped {
            tracing::debug!(
                endpoint = %label(endpoint),
                endpoint_party_key = key.as_deref().unwrap_or("(unreadable)"),
                endpoint_ods = managing.as_deref().unwrap_or("(unreadable)"),
                endpoint_status = status.unwrap_or("(none)"),
                party_key,
                ods,
                "the API returned an Endpoint {why}; dropped"
            );
            continue;
        }
        let (key, managing) = (key?, managing?);
        let interaction = match interaction_ids(endpoint)?.as_slice() {
            [one] => one.clone(),
            other => {
                return Err(format!(
                    "{}: {} interaction ids, expected one (nhsMhsSvcIA is single-valued)",
                    label(endpoint),
                    other.len()
                ))
            }
        };
        // Whether the address can be forwarded to is judged with the party.
        let address = endpoint
            .get("address")
            .and_then(Value::as_str)
            .map(trim_value)
            .ok_or_else(|| format!("{}: no address", label(endpoint)))?
            .to_owned();
        let id = one_identifier(endpoint, MHS_ID_SYSTEM)?;
        let fqdn = mhs_fqdn(&identifiers(endpoint, FQDN_SYSTEM)?);
        let cpa_id = one_identifier(endpoint, CPA_ID_SYSTEM)?;
        if let Some(record) = records.iter_mut().find(|r| r.id == id) {
            let differs = [
                ("interaction", record.interaction != interaction),
                ("FQDN", record.fqdn != fqdn),
                ("CPA id", record.cpa_id != cpa_id),
            ];
            if let Some((what, _)) = differs.iter().find(|(_, differs)| *differs) {
                return Err(format!(
                    "{}: nhsMHSId {} is on Endpoints with another {what}: one MHS record cannot hold both",
                    label(endpoint),
                    printable(&id, 80)
                ));
            }
            // The same address twice is two values, as LDAP answers it: slapd refuses one
            // entry holding a value twice, so the API can only have read it from two entries of
            // one id, which the LDAP backend finds to be two handlers (unusable either way).
            record.endpoints.push(address);
            continue;
        }
        records.push(MhsRecord {
            id,
            ods_code: managing,
            party_key: key,
            interaction,
            endpoints: vec![address],
            fqdn,
            cpa_id,
        });
    }
    Ok(records)
}

// ------------------------------------------------------------------------------------------------
// Connector: TCP, then TLS for https
// ------------------------------------------------------------------------------------------------

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens connections to the API: TCP (no Nagle), then TLS for `https`, within the timeout.
#[derive(Clone)]
struct Connector {
    /// `None`: plain HTTP (loopback only, checked when the backend is built).
    tls: Option<tokio_rustls::TlsConnector>,
    connect_timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let limit = self.connect_timeout;
        Box::pin(async move {
            match tokio::time::timeout(limit, connect(tls, uri)).await {
                Ok(result) => result,
                Err(_) => Err(format!("connect timed out after {limit:?}").into()),
            }
        })
    }
}

async fn connect(
    tls: Option<tokio_rustls::TlsConnector>,
    uri: Uri,
) -> Result<TokioIo<Stream>, BoxError> {
    let host = uri.host().ok_or("the URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match (tls, uri.scheme_str()) {
        (Some(tls), Some("https")) => {
            let port = uri.port_u16().unwrap_or(443);
            let server_name = ServerName::try_from(host.to_string())?;
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(server_name, tcp).await?;
            Ok(TokioIo::new(Stream::Tls(Box::new(stream))))
        }
        (None, Some("http")) if is_loopback(host) => {
            let port = uri.port_u16().unwrap_or(80);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(Stream::Plain(tcp)))
        }
        _ => Err(format!("refusing to connect to {uri}: not the configured API").into()),
    }
}

/// A connection to the API.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The SDS API's client never resumes a TLS session: a resumed session skips the check of
    /// the API's certificate, so one that had run out would go on being accepted.
    #[test]
    fn the_api_client_never_resumes_a_session() {
        let dir = crate::tempdir::TempDir::new("fhir-resume");
        let ca = crate::tls::pki::Ca::new("FHIR resume CA", crate::tls::pki::KeyKind::EcdsaP256)
            .expect("ca");
        let path = dir.join("ca.pem");
        std::fs::write(&path, ca.cert_pem()).expect("write");
        let (config, _) = client_tls(&path).expect("client config");
        let seen = format!("{:?}", config.resumption);
        let disabled = format!("{:?}", rustls::client::Resumption::disabled());
        let default = format!("{:?}", rustls::client::Resumption::default());
        assert_ne!(disabled, default, "the two can be told apart");
        assert_eq!(seen, disabled);
    }

    const SLOT: &str = "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1";

    fn interaction_ext(id: &str) -> Value {
        json!({ "url": INTERACTION_EXTENSION,
                "valueReference": { "identifier": { "system": INTERACTION_SYSTEM, "value": id } } })
    }

    fn device(asid: &str, pk: &str, interactions: &[&str]) -> Value {
        let mut extensions: Vec<Value> = interactions.iter().map(|i| interaction_ext(i)).collect();
        extensions.insert(0, json!({
            "url": "https://fhir.nhs.uk/StructureDefinition/Extension-SDS-ManufacturingOrganisation",
            "valueReference": { "identifier": { "system": ODS_SYSTEM, "value": "YGA" } } }));
        json!({ "resourceType": "Device", "id": uuid::Uuid::new_v4().to_string(),
                "identifier": [ { "system": ASID_SYSTEM, "value": asid },
                                { "system": PARTY_KEY_SYSTEM, "value": pk } ],
                "extension": extensions,
                "owner": { "identifier": { "system": ODS_SYSTEM, "value": "B82617" } } })
    }

    fn endpoint(id: &str, interaction: &str, address: &str) -> Value {
        json!({ "resourceType": "Endpoint", "id": uuid::Uuid::new_v4().to_string(), "status": "active",
                "address": address,
                "managingOrganization": { "identifier": { "system": ODS_SYSTEM, "value": "B82617" } },
                "identifier": [ { "system": FQDN_SYSTEM, "value": "localhost" },
                                { "system": PARTY_KEY_SYSTEM, "value": "B82617-0000806" },
                                { "system": CPA_ID_SYSTEM, "value": id },
                                { "system": MHS_ID_SYSTEM, "value": id } ],
                "extension": [ interaction_ext(interaction) ] })
    }

    fn bundle(resources: Vec<Value>) -> Value {
        let entries: Vec<Value> = resources
            .into_iter()
            .map(|r| json!({ "fullUrl": "https://x/y", "resource": r, "search": { "mode": "match" } }))
            .collect();
        json!({ "resourceType": "Bundle", "type": "searchset", "total": entries.len(),
                "link": [ { "relation": "self", "url": "https://x/Device?organization=y" } ],
                "entry": entries })
    }

    #[test]
    fn devices_are_matched_by_asid_and_mapped() {
        let b = bundle(vec![
            device("111", "B82617-1", &["urn:a"]),
            device("918999198993", "B82617-0000806", &[SLOT, "urn:b"]),
        ]);
        let DeviceMatch::Active(s) = device_with_asid(&b, "918999198993", "B82617").unwrap() else {
            panic!("found")
        };
        assert_eq!(s.party_key, "B82617-0000806");
        assert_eq!(s.interactions, [SLOT, "urn:b"]);
        assert_eq!(s.ods_code, "B82617");
        assert_eq!(
            device_with_asid(&b, "222", "B82617").unwrap(),
            DeviceMatch::Absent
        );
        let empty = json!({ "resourceType": "Bundle", "type": "searchset", "total": 0 });
        assert_eq!(
            device_with_asid(&empty, "1", "X").unwrap(),
            DeviceMatch::Absent
        );

        let twice = bundle(vec![device("1", "P-1", &[]), device("1", "P-2", &[])]);
        assert!(device_with_asid(&twice, "1", "X")
            .unwrap_err()
            .contains("2 Devices"));
        let no_pk = bundle(vec![json!({ "resourceType": "Device", "id": "d",
            "identifier": [ { "system": ASID_SYSTEM, "value": "1" } ] })]);
        assert_eq!(
            device_with_asid(&no_pk, "1", "X").unwrap_err(),
            format!("Device/d: no identifier {PARTY_KEY_SYSTEM}")
        );
    }

    #[test]
    fn endpoints_map_to_message_handlers() {
        let b = bundle(vec![
            endpoint(
                "aaa",
                SLOT,
                "https://localhost:9443/B82617/STU3/1/gpconnect",
            ),
            endpoint(
                "bbb",
                "urn:b",
                "https://localhost:9443/B82617/STU3/1/gpconnect",
            ),
        ]);
        let handlers = endpoints(&b, "B82617-0000806", "B82617").unwrap();
        assert_eq!(handlers.len(), 2);
        assert_eq!(
            handlers[0],
            MhsRecord {
                id: "aaa".into(),
                ods_code: "B82617".into(),
                party_key: "B82617-0000806".into(),
                interaction: SLOT.into(),
                endpoints: vec!["https://localhost:9443/B82617/STU3/1/gpconnect".into()],
                fqdn: Ok("localhost".into()),
                cpa_id: "aaa".into(),
            }
        );
    }

    /// Only `active` Endpoints are in service, and only Devices that are `active` or say
    /// nothing (the API sends no Device status): others are not used.
    #[test]
    fn only_active_endpoints_and_devices_are_used() {
        let address = "https://localhost:9443/B82617/STU3/1/gpconnect";
        for status in [
            json!("off"),
            json!("suspended"),
            json!("entered-in-error"),
            json!(null),
        ] {
            let mut e = endpoint("aaa", SLOT, address);
            match &status {
                Value::Null => {
                    e.as_object_mut().unwrap().remove("status");
                }
                other => e["status"] = other.clone(),
            }
            let b = bundle(vec![e, endpoint("bbb", "urn:b", address)]);
            let records = endpoints(&b, "B82617-0000806", "B82617").unwrap();
            assert_eq!(
                records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
                ["bbb"],
                "{status}"
            );
        }
        for (status, used) in [
            (Some("active"), true),
            (None, true),
            (Some("inactive"), false),
            (Some("entered-in-error"), false),
            (Some("unknown"), false),
        ] {
            let mut d = device("918999198993", "B82617-0000806", &[SLOT]);
            if let Some(status) = status {
                d["status"] = json!(status);
            }
            let found = device_with_asid(&bundle(vec![d]), "918999198993", "B82617").unwrap();
            if used {
                assert!(matches!(found, DeviceMatch::Active(_)), "{status:?}");
            } else {
                assert_eq!(found, DeviceMatch::Inactive, "{status:?}");
            }
        }
        // An inactive Device beside the active one with the ASID: the active one is used.
        let mut off = device("918999198993", "B82617-0000806", &[SLOT]);
        off["status"] = json!("inactive");
        let on = device("918999198993", "B82617-0000806", &[SLOT]);
        let found = device_with_asid(&bundle(vec![off, on]), "918999198993", "B82617").unwrap();
        assert!(matches!(found, DeviceMatch::Active(_)), "{found:?}");
    }

    /// Values are trimmed, as the LDAP behind the API matches them; two Endpoints of one MHS
    /// record (one per address) are one record with two addresses, for the party's judging.
    #[test]
    fn values_are_trimmed_and_addresses_of_one_record_gathered() {
        let mut padded = endpoint("aaa", SLOT, " https://x/1 ");
        padded["identifier"][1]["value"] = json!("B82617-0000806 ");
        padded["managingOrganization"]["identifier"]["value"] = json!(" B82617");
        let b = bundle(vec![padded, endpoint("aaa", SLOT, "https://x/2")]);
        let records = endpoints(&b, "B82617-0000806", "B82617").unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].endpoints, ["https://x/1", "https://x/2"]);
        assert_eq!(records[0].party_key, "B82617-0000806");

        let mut d = device("918999198993 ", " B82617-0000806", &[SLOT]);
        d["extension"][1]["valueReference"]["identifier"]["value"] = json!(format!("{SLOT} "));
        let DeviceMatch::Active(s) =
            device_with_asid(&bundle(vec![d]), "918999198993", "B82617").unwrap()
        else {
            panic!("found")
        };
        assert_eq!(s.asid, "918999198993");
        assert_eq!(s.party_key, "B82617-0000806");
        assert_eq!(s.interactions, [SLOT]);
    }

    /// An Endpoint of another party key or ODS code is not the party's: dropped, so its FQDN is
    /// never one the ASID's certificate may present. Party keys compare ignoring case, ODS codes
    /// exactly.
    #[test]
    fn endpoints_of_another_party_key_are_dropped() {
        let mut foreign = endpoint("ccc", "urn:c", "https://rogue.example/x");
        foreign["identifier"] = json!([
            { "system": FQDN_SYSTEM, "value": "rogue.example" },
            { "system": PARTY_KEY_SYSTEM, "value": "X99999-0000001" },
            { "system": CPA_ID_SYSTEM, "value": "ccc" },
            { "system": MHS_ID_SYSTEM, "value": "ccc" } ]);
        let b = bundle(vec![
            endpoint(
                "aaa",
                SLOT,
                "https://localhost:9443/B82617/STU3/1/gpconnect",
            ),
            foreign,
        ]);
        let handlers = endpoints(&b, "b82617-0000806", "B82617").unwrap();
        assert_eq!(
            handlers.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
            ["aaa"]
        );
        assert!(handlers
            .iter()
            .all(|h| h.fqdn.as_deref() != Ok("rogue.example")));
        assert_eq!(
            endpoints(&b, "X99999-0000001", "B82617").unwrap()[0].fqdn,
            Ok("rogue.example".to_owned())
        );
        assert!(endpoints(&b, "b82617-0000806", "A20047")
            .unwrap()
            .is_empty());
        assert!(
            endpoints(&b, "B82617-0000806", "b82617")
                .unwrap()
                .is_empty(),
            "the ODS code is compared exactly"
        );
    }

    /// Whether an Endpoint is dropped is decided before its fields are required: an inactive
    /// one, or one of another party key, without a managingOrganization (or party key) does
    /// not fail the party; an active one of the party's without them does.
    #[test]
    fn only_endpoints_kept_need_a_party_key_and_managing_organization() {
        let address = "https://localhost:9443/B82617/STU3/1/gpconnect";
        let mut inactive = endpoint("ccc", "urn:c", address);
        inactive["status"] = json!("off");
        inactive
            .as_object_mut()
            .unwrap()
            .remove("managingOrganization");
        inactive["identifier"] = json!([{ "system": MHS_ID_SYSTEM, "value": "ccc" }]);
        let mut foreign = endpoint("ddd", "urn:d", address);
        foreign
            .as_object_mut()
            .unwrap()
            .remove("managingOrganization");
        foreign["identifier"][1]["value"] = json!("X99999-0000001");
        let b = bundle(vec![inactive, foreign, endpoint("aaa", SLOT, address)]);
        let records = endpoints(&b, "B82617-0000806", "B82617").unwrap();
        assert_eq!(
            records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["aaa"]
        );

        let mut own = endpoint("eee", SLOT, address);
        own["id"] = json!("own");
        own.as_object_mut().unwrap().remove("managingOrganization");
        assert_eq!(
            endpoints(&bundle(vec![own]), "B82617-0000806", "B82617").unwrap_err(),
            "Endpoint/own: no managingOrganization ODS code"
        );
    }

    #[test]
    fn malformed_bundles_and_endpoints_are_refused_with_a_reason() {
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({ "resourceType": "OperationOutcome" }),
                "not a FHIR Bundle",
            ),
            (
                json!({ "resourceType": "Bundle", "link": [ { "relation": "next", "url": "x" } ] }),
                "paged",
            ),
            (bundle(vec![device("1", "P", &[])]), "expected Endpoint"),
            (
                bundle(vec![{
                    let mut e = endpoint("a", SLOT, "https://x/y");
                    e["extension"] = json!([interaction_ext(SLOT), interaction_ext("urn:b")]);
                    e
                }]),
                "2 interaction ids",
            ),
            (
                bundle(vec![{
                    let mut e = endpoint("a", SLOT, "https://x/y");
                    e.as_object_mut().unwrap().remove("address");
                    e
                }]),
                "no address",
            ),
        ];
        for (b, expected) in cases {
            let err = endpoints(&b, "B82617-0000806", "B82617").unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn query_values_are_percent_encoded() {
        let v = format!("{ODS_SYSTEM}|B82617");
        assert_eq!(
            utf8_percent_encode(&v, QUERY_VALUE).to_string(),
            "https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7CB82617"
        );
    }

    fn settings(url: &str, key_file: PathBuf) -> FhirSettings {
        FhirSettings {
            base_url: url.into(),
            api_key_file: key_file,
            ca: None,
            asid_ods: BTreeMap::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            query_timeout: DEFAULT_QUERY_TIMEOUT,
        }
    }

    #[test]
    fn settings_are_checked() {
        let dir = crate::tempdir::TempDir::new("fhir");
        let key = dir.join("apikey");
        std::fs::write(&key, "secret-key\n").unwrap();
        assert!(
            FhirBackend::new(&settings("http://127.0.0.1:1/FHIR/R4", key.clone()), vec![]).is_ok()
        );
        for (url, expected) in [
            ("http://api.example/FHIR/R4", "loopback host only"),
            ("https://api.example/FHIR/R4", "needs fhir_ca"),
            ("https://api.example/FHIR/R4/", "trailing"),
            ("http://127.0.0.1:1/FHIR/R4#top", "no fragment"),
            ("http://127.0.0.1:1/FHIR/R4?x=1", "no query"),
            ("ftp://api.example/x", "https://"),
            ("not a url", "not a URL"),
        ] {
            let err = FhirBackend::new(&settings(url, key.clone()), vec![])
                .unwrap_err()
                .iter()
                .map(ToString::to_string)
                .collect::<String>();
            assert!(err.contains(expected), "{url}: {err}");
        }
        std::fs::write(&key, "  \n").unwrap();
        let err = FhirBackend::new(&settings("http://[::1]:1/R4", key.clone()), vec![])
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect::<String>();
        assert!(err.contains("empty"), "{err}");
        std::fs::write(&key, "two\nlines").unwrap();
        let err = FhirBackend::new(&settings("http://localhost:1/R4", key.clone()), vec![])
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect::<String>();
        assert!(err.contains("header value"), "{err}");
        // Both files bad: both named, each with its key.
        let mut https = settings("https://api.example/FHIR/R4", key.clone());
        https.ca = Some(dir.join("missing-ca.pem"));
        let problems: Vec<String> = FhirBackend::new(&https, vec![])
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!(
                "directory.fhir_api_key_file: {}: not a valid header value",
                key.display()
            )),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with(&format!(
                "directory.fhir_ca: {}: cannot read",
                dir.join("missing-ca.pem").display()
            )),
            "{problems:?}"
        );
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "localhost",
            "LOCALHOST",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "10.0.0.1",
            "api.service.nhs.uk",
            "localhost.example",
            "0.0.0.0",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    /// Endpoints with one `nhsMHSId` are one MHS record: they must agree on its interaction,
    /// FQDN and CPA id (else the answer is refused, as the LDAP backend refuses a record with
    /// two values of one), and the same address twice is two values (unusable), as LDAP
    /// answers two entries of one id.
    /// Before, Endpoints of one id with two interactions made two usable handlers, and the
    /// gateway forwarded to the second's address.
    #[test]
    fn endpoints_of_one_mhs_id_are_one_record() {
        let address = "https://localhost:9443/B82617/STU3/1/gpconnect";
        let twice = bundle(vec![
            endpoint("aaa", SLOT, address),
            endpoint("aaa", SLOT, address),
        ]);
        let records = endpoints(&twice, "B82617-0000806", "B82617").expect("one record");
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].endpoints, [address, address]);
        let two = bundle(vec![
            endpoint("aaa", SLOT, address),
            endpoint("aaa", SLOT, "https://localhost:9443/other"),
        ]);
        let records = endpoints(&two, "B82617-0000806", "B82617").expect("one record");
        assert_eq!(records[0].endpoints.len(), 2, "two values: judged unusable");
        // The party key in another case is the same party key (as every backend joins them;
        // one of another party is dropped before this).
        let mut lower = endpoint("aaa", SLOT, address);
        lower["identifier"][1]["value"] = json!("b82617-0000806");
        let b = bundle(vec![endpoint("aaa", SLOT, address), lower]);
        assert_eq!(
            endpoints(&b, "B82617-0000806", "B82617")
                .expect("one")
                .len(),
            1
        );

        let other_interaction = bundle(vec![
            endpoint("aaa", SLOT, address),
            endpoint("aaa", "urn:b", "https://evil.example/x"),
        ]);
        let e = endpoints(&other_interaction, "B82617-0000806", "B82617").unwrap_err();
        assert!(
            e.contains("nhsMHSId aaa") && e.contains("another interaction"),
            "{e}"
        );
        let with = |system: &str, value: &str| {
            let mut e = endpoint("aaa", SLOT, address);
            for id in e["identifier"].as_array_mut().expect("identifiers") {
                if id["system"] == system {
                    id["value"] = json!(value);
                }
            }
            e
        };
        for (system, value, what) in [
            (FQDN_SYSTEM, "rogue.example", "another FQDN"),
            (CPA_ID_SYSTEM, "other-cpa", "another CPA id"),
        ] {
            let b = bundle(vec![endpoint("aaa", SLOT, address), with(system, value)]);
            let e = endpoints(&b, "B82617-0000806", "B82617").unwrap_err();
            assert!(e.contains(what), "{what}: {e}");
        }
    }

    /// A Bundle that is not a whole searchset answer is an error, never a shorter answer
    /// cached as the party's whole registration.
    #[test]
    fn only_a_whole_searchset_bundle_is_read() {
        let whole = bundle(vec![device("1", "B82617-1", &[SLOT])]);
        assert_eq!(resources(&whole, "Device").expect("whole").len(), 1);
        let edited = |edit: &dyn Fn(&mut Value)| {
            let mut b = whole.clone();
            edit(&mut b);
            resources(&b, "Device").map(|r| r.len())
        };
        let refused = |edit: &dyn Fn(&mut Value), why: &str| {
            let e = edited(edit).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        };
        refused(
            &|b| {
                b.as_object_mut().expect("object").remove("entry");
            },
            "Bundle.total is 1 but the Bundle holds 0 entries",
        );
        refused(&|b| b["total"] = json!(40), "Bundle.total is 40");
        refused(&|b| b["total"] = json!("1"), "Bundle.total is \"1\"");
        refused(
            &|b| b["type"] = json!("transaction-response"),
            "Bundle.type is \"transaction-response\"",
        );
        refused(
            &|b| b["link"] = json!({ "relation": "next", "url": "https://x/2" }),
            "Bundle.link is not an array",
        );
        refused(
            &|b| b["link"] = json!([{ "relation": "Next", "url": "https://x/2" }]),
            "paged",
        );
        refused(
            &|b| b["entry"][0]["search"]["mode"] = json!("include"),
            "search.mode is \"include\"",
        );
        // What a whole answer may leave out.
        assert_eq!(
            edited(&|b| {
                let b = b.as_object_mut().expect("object");
                b.remove("total");
                b.remove("type");
                b.remove("link");
            }),
            Ok(1)
        );
        assert_eq!(
            edited(&|b| {
                b["entry"][0]
                    .as_object_mut()
                    .expect("entry")
                    .remove("search");
            }),
            Ok(1)
        );
    }

    /// An identifier whose value is not a string is an error, never skipped: a second ASID
    /// written as a number is a second ASID, and an ASID only as a number is no registration
    /// said silently.
    #[test]
    fn an_identifier_value_that_is_not_a_string_is_refused() {
        let mut d = device("918999198993", "B82617-0000806", &[SLOT]);
        d["identifier"]
            .as_array_mut()
            .expect("identifiers")
            .push(json!({ "system": ASID_SYSTEM, "value": 918999198994u64 }));
        let e = device_with_asid(&bundle(vec![d.clone()]), "918999198993", "B82617").unwrap_err();
        assert!(e.contains("not a string"), "{e}");
        // Only the numeric ASID: the Device looked for, malformed.
        let mut only_number = device("918999198993", "B82617-0000806", &[SLOT]);
        only_number["identifier"][0]["value"] = json!(918999198993u64);
        let b = bundle(vec![only_number.clone()]);
        let e = device_with_asid(&b, "918999198993", "B82617").unwrap_err();
        assert!(e.contains("not a string"), "{e}");
        // Another ASID's malformed Device does not stop the lookup of this one.
        let b = bundle(vec![only_number, device("111", "B82617-1", &[SLOT])]);
        assert!(matches!(
            device_with_asid(&b, "111", "B82617"),
            Ok(DeviceMatch::Active(_))
        ));
        let mut e = endpoint("aaa", SLOT, "https://localhost:9443/x");
        e["identifier"][0]["value"] = json!(["localhost"]);
        let refused = endpoints(&bundle(vec![e]), "B82617-0000806", "B82617").unwrap_err();
        assert!(refused.contains("not a string"), "{refused}");
    }

    /// Text from the API goes into errors and logs with its control characters escaped.
    #[test]
    fn api_text_in_errors_is_printable() {
        assert_eq!(
            printable("LDAP error\n2026 INFO forged \u{1b}[31mX", 200),
            "LDAP error\\n2026 INFO forged \\u{1b}[31mX"
        );
        assert_eq!(printable("ünïcode stays", 200), "ünïcode stays");
        assert_eq!(printable("abcdef", 3), "abc");
        let body = br#"{"issue":[{"diagnostics":"a\nb"}]}"#;
        assert_eq!(diagnostics(body).as_deref(), Some("a\\nb"));
        let d = json!({ "resourceType": "Device", "id": "x\ny" });
        assert_eq!(label(&d), "Device/x\\ny");
    }
}
