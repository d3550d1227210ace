//! Real directory servers for the directory tests: a private OpenLDAP `slapd` loaded with the
//! SDS schema and an LDIF world, and an in-process SDS FHIR API that answers `/Device` and
//! `/Endpoint` in the API's documented shapes from the same LDIF. Both listen on loopback only
//! and stop when dropped.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use ssp_gateway::directory::ldif::{parse_records, Record};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ssp-gateway-{name}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Finds a Debian slapd tool: on PATH, or in /usr/sbin (not on a normal user's PATH).
fn tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
    {
        let candidate = Path::new(dir).join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "{name} not found: the LDAP tests need Debian's slapd (scripts/test.sh installs it: apt-get install slapd ldap-utils)"
    );
}

/// TLS material for `ldaps://`: the server's certificate and key, and the CA client
/// certificates must chain to (slapd demands one).
pub struct SlapdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A gateway's `[directory]` section over LDAPS: each call starts slapd with `ldif` and the
/// server TLS `server`, keeps it in `slot` (killed with it), and gives `backend = "ldap"`,
/// `ldap_url` as `url` makes it of the slapd (its `ldaps://` URL, or a front's), then `client`
/// (the gateway's `ldap_*` keys, each line ending in a newline).
pub fn ldaps_section(
    slot: std::sync::Arc<std::sync::Mutex<Option<Slapd>>>,
    server: SlapdTls,
    url: impl Fn(&Slapd) -> String + 'static,
    client: String,
) -> crate::common::DirectorySection {
    Box::new(move |ldif: &str| {
        let started = Slapd::start(
            ldif,
            Some(SlapdTls {
                cert: server.cert.clone(),
                key: server.key.clone(),
                ca: server.ca.clone(),
            }),
        );
        let url = url(&started);
        *slot.lock().expect("lock") = Some(started);
        format!("backend = \"ldap\"\nldap_url = \"{url}\"\n{client}")
    })
}

impl SlapdTls {
    /// slapd serving the world's provider certificate, demanding client certificates of the
    /// world's CA.
    pub fn of_provider(world: &crate::common::World) -> SlapdTls {
        SlapdTls {
            cert: world.provider.cert.clone(),
            key: world.provider.key.clone(),
            ca: world.ca.clone(),
        }
    }
}

/// A private slapd: SDS schema, `o=nhs` loaded from an LDIF with slapadd, listening on free
/// loopback ports. Killed on drop.
pub struct Slapd {
    pub dir: PathBuf,
    pub port: u16,
    /// The `ldaps://` port, when started with TLS.
    pub tls_port: Option<u16>,
    child: Option<Child>,
}

impl Slapd {
    /// Loads `ldif` into a fresh database and starts slapd. Panics (the test fails loudly) if
    /// slapadd or slapd cannot run.
    pub fn start(ldif: &str, tls: Option<SlapdTls>) -> Slapd {
        let dir = scratch("slapd");
        let db = dir.join("db");
        std::fs::create_dir_all(&db).expect("mkdir db");
        let tls_lines = match &tls {
            Some(t) => format!(
                "TLSCACertificateFile {}\nTLSCertificateFile {}\nTLSCertificateKeyFile {}\nTLSVerifyClient demand\n",
                t.ca.display(),
                t.cert.display(),
                t.key.display()
            ),
            None => String::new(),
        };
        let conf = format!(
            "include /etc/ldap/schema/core.schema\n\
             include /etc/ldap/schema/cosine.schema\n\
             include {schema}\n\
             pidfile {dir}/slapd.pid\n\
             {tls_lines}\
             modulepath /usr/lib/ldap\n\
             moduleload back_mdb\n\
             database mdb\n\
             maxsize 16777216\n\
             suffix \"o=nhs\"\n\
             rootdn \"cn=admin,o=nhs\"\n\
             directory {db}\n\
             index objectClass,nhsIDCode,nhsAsSvcIA,nhsMhsSvcIA,nhsMHSPartyKey,uniqueIdentifier eq\n",
            schema = repo_path("config/sds.schema").display(),
            dir = dir.display(),
            db = db.display(),
        );
        std::fs::write(dir.join("slapd.conf"), conf).expect("write slapd.conf");
        std::fs::write(dir.join("world.ldif"), ldif).expect("write LDIF");
        let out = Command::new(tool("slapadd"))
            .arg("-f")
            .arg(dir.join("slapd.conf"))
            .arg("-l")
            .arg(dir.join("world.ldif"))
            .output()
            .expect("run slapadd");
        assert!(
            out.status.success(),
            "slapadd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut slapd = Slapd {
            dir,
            port: free_port(),
            tls_port: tls.as_ref().map(|_| free_port()),
            child: None,
        };
        slapd.start_again();
        slapd
    }

    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    pub fn ldaps_url(&self) -> String {
        format!(
            "ldaps://localhost:{}",
            self.tls_port.expect("started with TLS")
        )
    }

    /// Starts slapd (again) on the same ports and database, and waits until it accepts
    /// connections (deadline 20 s).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "slapd is already running");
        let mut urls = format!("ldap://127.0.0.1:{}/", self.port);
        if let Some(p) = self.tls_port {
            urls.push_str(&format!(" ldaps://127.0.0.1:{p}/"));
        }
        let log = std::fs::File::create(self.dir.join("slapd.log")).expect("slapd log");
        let mut child = Command::new(tool("slapd"))
            .arg("-f")
            .arg(self.dir.join("slapd.conf"))
            .arg("-h")
            .arg(&urls)
            .arg("-d")
            .arg("0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn slapd");
        let deadline = Instant::now() + Duration::from_secs(20);
        let ports: Vec<u16> = std::iter::once(self.port).chain(self.tls_port).collect();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "slapd exited at start ({status}): {}",
                    std::fs::read_to_string(self.dir.join("slapd.log")).unwrap_or_default()
                );
            }
            if ports
                .iter()
                .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
            {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "slapd did not accept connections within 20 s: {}",
                    std::fs::read_to_string(self.dir.join("slapd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// Kills slapd (as a crash would) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ------------------------------------------------------------------------------------------------
// The SDS FHIR API
// ------------------------------------------------------------------------------------------------

pub const API_KEY: &str = "test-api-key-0123456789";
pub const BASE_PATH: &str = "/spine-directory/FHIR/R4";
const ODS: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const INTERACTION: &str = "https://fhir.nhs.uk/Id/nhsServiceInteractionId";
const PARTY_KEY: &str = "https://fhir.nhs.uk/Id/nhsMhsPartyKey";
const EXT_INTERACTION: &str =
    "https://fhir.nhs.uk/StructureDefinition/Extension-SDS-NhsServiceInteractionId";

/// One request the API received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path_and_query: String,
    pub apikey: Option<String>,
    pub correlation_id: Option<String>,
    pub accept: Option<String>,
}

/// An in-process SDS FHIR API over an LDIF world, behaving as the real one does (API key
/// required, X-Correlation-Id checked and echoed, search parameter rules, Bundles with fresh
/// ids, values matched ignoring leading and trailing spaces as its LDAP does). Plain HTTP on
/// loopback, or HTTPS with the given server config.
pub struct FhirApi {
    pub addr: SocketAddr,
    /// The LDIF records it answers from (replaceable with `serve`).
    world: Arc<Mutex<Arc<Vec<Record>>>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// When set, every request is answered 502 (as the API does when LDAP fails).
    pub failing: Arc<AtomicBool>,
    pub requests: Arc<AtomicUsize>,
    /// How long each answer is held back, in milliseconds (a slow API).
    pub delay_ms: Arc<AtomicU64>,
    /// Requests being answered now, and the most there have been at once.
    pub in_flight: Arc<AtomicUsize>,
    pub max_in_flight: Arc<AtomicUsize>,
    /// `status` of the Endpoints of an MHS record (by its `uniqueIdentifier`) when not
    /// `active`, and of the Device of an ASID (the real API sends none).
    pub statuses: Arc<Mutex<HashMap<String, String>>>,
    stop: CancellationToken,
}

impl FhirApi {
    pub async fn start(ldif: &str, tls: Option<Arc<rustls::ServerConfig>>) -> FhirApi {
        let world = Arc::new(Mutex::new(Arc::new(
            parse_records(ldif).expect("LDIF parses"),
        )));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let api = FhirApi {
            addr,
            world: world.clone(),
            seen: Arc::new(Mutex::new(Vec::new())),
            failing: Arc::new(AtomicBool::new(false)),
            requests: Arc::new(AtomicUsize::new(0)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: Arc::new(AtomicUsize::new(0)),
            statuses: Arc::new(Mutex::new(HashMap::new())),
            stop: CancellationToken::new(),
        };
        let (seen, failing, requests, delay_ms, stop) = (
            api.seen.clone(),
            api.failing.clone(),
            api.requests.clone(),
            api.delay_ms.clone(),
            api.stop.clone(),
        );
        let (in_flight, max_in_flight, statuses) = (
            api.in_flight.clone(),
            api.max_in_flight.clone(),
            api.statuses.clone(),
        );
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = format!("{scheme}://localhost:{}{BASE_PATH}", addr.port());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                let (world, seen, failing, requests, delay_ms, base, acceptor) = (
                    world.clone(),
                    seen.clone(),
                    failing.clone(),
                    requests.clone(),
                    delay_ms.clone(),
                    base.clone(),
                    acceptor.clone(),
                );
                let (in_flight, max_in_flight, statuses) =
                    (in_flight.clone(), max_in_flight.clone(), statuses.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        max_in_flight.fetch_max(now, Ordering::SeqCst);
                        let header = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string)
                        };
                        seen.lock().expect("lock").push(Seen {
                            path_and_query: req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default(),
                            apikey: header("apikey"),
                            correlation_id: header("x-correlation-id"),
                            accept: header("accept"),
                        });
                        let records = world.lock().expect("lock").clone();
                        let resp = if failing.load(Ordering::SeqCst) {
                            outcome(StatusCode::BAD_GATEWAY, "LDAP error", None)
                        } else {
                            let statuses = statuses.lock().expect("lock").clone();
                            answer(&req, &records, &base, &statuses)
                        };
                        let delay = Duration::from_millis(delay_ms.load(Ordering::SeqCst));
                        let in_flight = in_flight.clone();
                        async move {
                            tokio::time::sleep(delay).await;
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        api
    }

    /// Answers from `ldif` from now on.
    pub fn serve(&self, ldif: &str) {
        *self.world.lock().expect("lock") = Arc::new(parse_records(ldif).expect("LDIF parses"));
    }

    /// The base URL over HTTPS (the server certificate names localhost).
    pub fn https_base_url(&self) -> String {
        format!("https://localhost:{}{BASE_PATH}", self.addr.port())
    }

    /// The base URL a backend is configured with.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}{BASE_PATH}", self.addr.port())
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for FhirApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn outcome(
    status: StatusCode,
    diagnostics: &str,
    correlation: Option<&str>,
) -> Response<Full<Bytes>> {
    let body = json!({ "resourceType": "OperationOutcome",
        "issue": [{ "severity": "error", "code": "invalid", "diagnostics": diagnostics }] });
    respond(status, body, correlation)
}

fn respond(status: StatusCode, body: Value, correlation: Option<&str>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/fhir+json"),
    );
    if let Some(id) = correlation.and_then(|c| http::HeaderValue::from_str(c).ok()) {
        resp.headers_mut().insert("x-correlation-id", id);
    }
    resp
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn values<'r>(r: &'r Record, name: &str) -> Vec<&'r str> {
    let lower = name.to_ascii_lowercase();
    r.attributes
        .iter()
        .filter(|a| a.name == lower)
        .map(|a| a.value.as_str())
        .collect()
}

fn first<'r>(r: &'r Record, name: &str) -> Option<&'r str> {
    values(r, name).first().copied()
}

/// A value as LDAP matches it: leading and trailing spaces are not significant.
fn matched<'r>(r: &'r Record, name: &str) -> Option<&'r str> {
    first(r, name).map(str::trim)
}

fn is_class(r: &Record, class: &str) -> bool {
    values(r, "objectClass")
        .iter()
        .any(|c| c.eq_ignore_ascii_case(class))
}

fn answer(
    req: &Request<Incoming>,
    records: &[Record],
    base: &str,
    statuses: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    let correlation = req
        .headers()
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let corr = Some(correlation.as_str());
    if !is_uuid(&correlation) {
        return outcome(StatusCode::BAD_REQUEST, "Invalid X-Correlation-Id", None);
    }
    if req.headers().get("apikey").and_then(|v| v.to_str().ok()) != Some(API_KEY) {
        return outcome(StatusCode::UNAUTHORIZED, "Invalid access token", corr);
    }
    if req.method() != http::Method::GET {
        return outcome(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", corr);
    }
    match req.headers().get("accept").and_then(|v| v.to_str().ok()) {
        None | Some("application/fhir+json" | "application/json" | "*/*") => {}
        Some(_) => return outcome(StatusCode::NOT_ACCEPTABLE, "Unsupported Accept", corr),
    }
    let path = req.uri().path();
    let Some(resource) = path
        .strip_prefix(BASE_PATH)
        .and_then(|p| p.strip_prefix('/'))
    else {
        return outcome(StatusCode::NOT_FOUND, "Not found", corr);
    };
    // Parameters: token form system|value; repeated identifiers by system, last one wins.
    let mut org = None;
    let mut interaction = None;
    let mut party_key = None;
    let mut manufacturer = None;
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .to_string();
        let Some((system, value)) = v.split_once('|') else {
            return outcome(
                StatusCode::BAD_REQUEST,
                &format!("Invalid value for {k}"),
                corr,
            );
        };
        match (k, resource, system) {
            ("organization", _, ODS) => org = Some(value.to_string()),
            ("manufacturing-organization", "Device", ODS) => manufacturer = Some(value.to_string()),
            ("identifier", _, INTERACTION) => interaction = Some(value.to_string()),
            ("identifier", _, PARTY_KEY) => party_key = Some(value.to_string()),
            _ => return outcome(StatusCode::BAD_REQUEST, "Illegal query parameter", corr),
        }
    }
    let matches_pk = |r: &Record, pk: &Option<String>| {
        pk.as_ref().map_or(true, |pk| {
            matched(r, "nhsMHSPartyKey").is_some_and(|v| v.eq_ignore_ascii_case(pk))
        })
    };
    let mut resources = Vec::new();
    match resource {
        "Device" => {
            let (Some(org), Some(interaction)) = (&org, &interaction) else {
                return outcome(
                    StatusCode::BAD_REQUEST,
                    "Missing or invalid organization or identifier parameter",
                    corr,
                );
            };
            for r in records.iter().filter(|r| is_class(r, "nhsAs")) {
                if matched(r, "nhsIDCode") == Some(org.as_str())
                    && values(r, "nhsAsSvcIA")
                        .iter()
                        .any(|v| v.trim() == interaction.as_str())
                    && matches_pk(r, &party_key)
                    && manufacturer.as_ref().map_or(true, |m| {
                        first(r, "nhsMhsManufacturerOrg").is_some_and(|v| v.eq_ignore_ascii_case(m))
                    })
                {
                    resources.push(device(r, statuses));
                }
            }
        }
        "Endpoint" => {
            match (&org, &interaction, &party_key) {
                (Some(_), Some(_), _) | (Some(_), None, Some(_)) | (None, Some(_), Some(_)) => {}
                _ => {
                    return outcome(
                        StatusCode::BAD_REQUEST,
                        "Missing or invalid organization, identifier or party key parameter",
                        corr,
                    )
                }
            }
            for r in records.iter().filter(|r| is_class(r, "nhsMhs")) {
                if org
                    .as_ref()
                    .map_or(true, |o| matched(r, "nhsIDCode") == Some(o.as_str()))
                    && interaction
                        .as_ref()
                        .map_or(true, |i| matched(r, "nhsMhsSvcIA") == Some(i.as_str()))
                    && matches_pk(r, &party_key)
                {
                    resources.extend(endpoints(r, statuses));
                }
            }
        }
        _ => return outcome(StatusCode::NOT_FOUND, "Not found", corr),
    }
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| {
            json!({ "fullUrl": format!("{base}/{resource}/{}", r["id"].as_str().unwrap_or("")),
                    "resource": r, "search": { "mode": "match" } })
        })
        .collect();
    let self_url = format!("{base}/{resource}?{}", req.uri().query().unwrap_or(""));
    let bundle = json!({ "resourceType": "Bundle", "id": uuid::Uuid::new_v4().to_string().to_uppercase(),
        "type": "searchset", "total": entries.len(),
        "link": [ { "relation": "self", "url": self_url } ],
        "entry": entries });
    respond(StatusCode::OK, bundle, corr)
}

fn reference(system: &str, value: &str) -> Value {
    json!({ "identifier": { "system": system, "value": value } })
}

fn interaction_ext(id: &str) -> Value {
    json!({ "url": EXT_INTERACTION, "valueReference": reference(INTERACTION, id) })
}

/// An `nhsAs` record as the API maps it (`fhir_json_mapper.py`): no `status`, unless the test
/// set one for its ASID.
fn device(r: &Record, statuses: &HashMap<String, String>) -> Value {
    let mut extensions = Vec::new();
    if let Some(m) = first(r, "nhsMhsManufacturerOrg") {
        extensions.push(json!({
            "url": "https://fhir.nhs.uk/StructureDefinition/Extension-SDS-ManufacturingOrganisation",
            "valueReference": reference(ODS, m) }));
    }
    extensions.extend(values(r, "nhsAsSvcIA").into_iter().map(interaction_ext));
    let mut device = json!({
        "resourceType": "Device", "id": uuid::Uuid::new_v4().to_string().to_uppercase(),
        "identifier": [
            { "system": "https://fhir.nhs.uk/Id/nhsSpineASID", "value": first(r, "uniqueIdentifier") },
            { "system": PARTY_KEY, "value": first(r, "nhsMHSPartyKey") } ],
        "extension": extensions });
    if let Some(client) = first(r, "nhsAsClient") {
        device["owner"] = reference(ODS, client);
    }
    if let Some(status) = matched(r, "uniqueIdentifier").and_then(|id| statuses.get(id)) {
        device["status"] = json!(status);
    }
    device
}

/// An `nhsMhs` record as the API maps it: one Endpoint per `nhsMHSEndPoint` value, `status`
/// `active` unless the test set another for its `uniqueIdentifier`.
fn endpoints(r: &Record, statuses: &HashMap<String, String>) -> Vec<Value> {
    let status = matched(r, "uniqueIdentifier")
        .and_then(|id| statuses.get(id))
        .map_or("active", String::as_str);
    let mut reliability = Vec::new();
    let attrs: HashMap<&str, &str> = [
        ("nhsMHSSyncReplyMode", "valueString"),
        ("nhsMHSRetryInterval", "valueString"),
        ("nhsMHSPersistDuration", "valueString"),
        ("nhsMHSDuplicateElimination", "valueString"),
        ("nhsMHSAckRequested", "valueString"),
    ]
    .into_iter()
    .collect();
    for (name, kind) in &attrs {
        if let Some(v) = first(r, name) {
            reliability.push(json!({ "url": name, *kind: v }));
        }
    }
    values(r, "nhsMHSEndPoint")
        .into_iter()
        .map(|address| {
            json!({
                "resourceType": "Endpoint", "id": uuid::Uuid::new_v4().to_string().to_uppercase(),
                "status": status,
                "connectionType": { "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                                    "code": "hl7-fhir-msg", "display": "HL7 FHIR Messaging" },
                "payloadType": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/endpoint-payload-type",
                                               "code": "any", "display": "Any" }] }],
                "address": address,
                "managingOrganization": reference(ODS, first(r, "nhsIDCode").unwrap_or("")),
                "identifier": [
                    { "system": "https://fhir.nhs.uk/Id/nhsMhsFQDN", "value": first(r, "nhsMhsFQDN") },
                    { "system": PARTY_KEY, "value": first(r, "nhsMHSPartyKey") },
                    { "system": "https://fhir.nhs.uk/Id/nhsMhsCPAId", "value": first(r, "nhsMhsCPAId") },
                    { "system": "https://fhir.nhs.uk/Id/nhsMHSId", "value": first(r, "uniqueIdentifier") } ],
                "extension": [
                    { "url": "https://fhir.nhs.uk/StructureDefinition/Extension-SDS-ReliabilityConfiguration",
                      "extension": reliability.clone() },
                    interaction_ext(first(r, "nhsMhsSvcIA").unwrap_or("")) ]
            })
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// The admin listener
// ------------------------------------------------------------------------------------------------

/// A plain HTTP/1.1 request to the admin listener: status and JSON body.
pub async fn admin(addr: SocketAddr, method: http::Method, path: &str) -> (u16, Value) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&body).expect("admin answers JSON"),
    )
}

/// `/readyz`: its status and `checks.directory_usable`.
pub async fn directory_readiness(addr: SocketAddr) -> (u16, Option<bool>) {
    let (status, body) = admin(addr, http::Method::GET, "/readyz").await;
    (status, body["checks"]["directory_usable"].as_bool())
}

/// Polls `/readyz` until it reports `expected` (status and `directory_usable`), failing the
/// test after 20 s with the last answer.
pub async fn until_readiness(addr: SocketAddr, expected: (u16, Option<bool>), what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = directory_readiness(addr).await;
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: /readyz still says {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TLS server config with the world's provider certificate (it names localhost): the SDS
/// FHIR API's, for the tests that start one over HTTPS.
pub fn api_server_tls(world: &crate::common::World) -> std::sync::Arc<rustls::ServerConfig> {
    let certs = ssp_gateway::tls::load_certs(&world.provider.cert).expect("certs");
    let key = ssp_gateway::tls::load_private_key(&world.provider.key).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    std::sync::Arc::new(config)
}

// ------------------------------------------------------------------------------------------------
// Real SDS data's quirks
// ------------------------------------------------------------------------------------------------

/// The `uniqueIdentifier` of the provider's MHS record for `read:metadata-1`.
pub const METADATA_MHS: &str = "4312b49572e113d450cf";
/// A second MHS record for the provider's `search:slot-1`.
pub const DUPLICATE_SLOT_MHS: &str = "5d0b1e5a0000000000d2";
/// An MHS record under the provider's party key but another organisation's ODS code.
pub const OTHER_ODS_MHS: &str = "0d5c0de00000000000e1";
/// An MHS record under the provider's party key whose ODS code is the provider's in lower case
/// (`nhsIDCode` is `caseExactMatch`: not the provider's).
pub const LOWER_ODS_MHS: &str = "0d5c0de00000000000e2";
/// A second MHS record of the consumer's, OpenTest-like (a trailing `/`), outside the catalogue.
pub const OPENTEST_MHS: &str = "S918999410559";

/// The LDIF blocks (entries with their comments) of `ldif`, edited by `edit` where a block has
/// every line of `entry`; panics if none has.
fn edit_blocks(ldif: &str, entry: &[&str], edit: impl Fn(&str) -> String) -> String {
    let mut hit = false;
    let edited: Vec<String> = ldif
        .split("\n\n")
        .map(|block| {
            if entry.iter().all(|e| block.lines().any(|l| l == *e)) {
                hit = true;
                edit(block)
            } else {
                block.to_string()
            }
        })
        .collect();
    assert!(hit, "no LDIF entry has {entry:?}");
    edited.join("\n\n")
}

/// `v` as line slices.
fn lines(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The block of `ldif` with every line of `entry`.
fn block_of(ldif: &str, entry: &[&str]) -> String {
    ldif.split("\n\n")
        .find(|block| entry.iter().all(|e| block.lines().any(|l| l == *e)))
        .unwrap_or_else(|| panic!("no LDIF entry has {entry:?}"))
        .to_string()
}

/// `name:: base64(value)`: how LDIF writes a value with a trailing space.
fn encoded(name: &str, value: &str) -> String {
    use base64::Engine as _;
    format!(
        "{name}:: {}",
        base64::engine::general_purpose::STANDARD.encode(value)
    )
}

/// The lines of `block` that start with `prefix`, each replaced by `with(line)`.
fn map_lines(block: &str, prefix: &str, with: impl Fn(&str) -> String) -> String {
    block
        .lines()
        .map(|l| {
            if l.starts_with(prefix) {
                with(l)
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The development world (`ldif`, its endpoints possibly moved) with what real SDS data holds
/// and the gateway must survive, every entry still valid for slapd:
///
/// - the provider's `read:metadata-1` handler at an endpoint with a trailing `/` (unusable);
/// - a second handler for the provider's `search:slot-1` (unusable: two);
/// - a second `nhsMHSEndPoint` on the provider's `read:patient-1` handler (unusable: two);
/// - `read:location-1` on the provider's AS record, and the party key of its handler, with a
///   trailing space (usable: trimmed);
/// - a handler of another organisation (ODS code X99999) under the provider's party key, for
///   `search:organization-1`, FQDN `rogue.dev.local` (not the provider's: neither a duplicate
///   nor an FQDN);
/// - a handler under the provider's party key whose ODS code is the provider's in lower case
///   (`b82617`), for `search:practitioner-1`, FQDN `lower-ods.dev.local` (not the provider's:
///   `nhsIDCode` is `caseExactMatch`);
/// - the consumer's own (non-GP Connect) handler at an endpoint with a trailing `/`, and a
///   second one for the same interaction, OpenTest-like, FQDN `opentest.dev.local` (outside
///   the catalogue: both FQDNs count, nothing reported);
/// - the consumer's AS party key with a trailing space (trimmed).
pub fn quirky_world(ldif: &str) -> String {
    let gpc = "urn:nhs:names:services:gpconnect:fhir:rest:";
    let provider_mhs = |ix: &str| -> Vec<String> {
        vec![
            "objectClass: nhsMhs".into(),
            "nhsIDCode: B82617".into(),
            format!("nhsMhsSvcIA: {gpc}{ix}"),
        ]
    };

    let metadata = provider_mhs("read:metadata-1");
    let mut out = edit_blocks(ldif, &lines(&metadata), |b| {
        map_lines(b, "nhsMHSEndPoint: ", |l| format!("{l}/"))
    });
    let patient = provider_mhs("read:patient-1");
    out = edit_blocks(&out, &lines(&patient), |b| {
        map_lines(b, "nhsMHSEndPoint: ", |l| {
            format!(
                "{l}\nnhsMHSEndPoint: {}/second",
                &l["nhsMHSEndPoint: ".len()..]
            )
        })
    });
    let location = provider_mhs("read:location-1");
    out = edit_blocks(&out, &lines(&location), |b| {
        map_lines(b, "nhsMHSPartyKey: ", |_| {
            encoded("nhsMHSPartyKey", "B82617-0000806 ")
        })
    });
    out = edit_blocks(
        &out,
        &["objectClass: nhsAs", "uniqueIdentifier: 918999198993"],
        |b| {
            map_lines(b, &format!("nhsAsSvcIA: {gpc}read:location-1"), |_| {
                encoded("nhsAsSvcIA", &format!("{gpc}read:location-1 "))
            })
        },
    );
    let slot = block_of(&out, &lines(&provider_mhs("search:slot-1")));
    let slot_id = slot
        .lines()
        .find_map(|l| l.strip_prefix("uniqueIdentifier: "))
        .expect("slot MHS id")
        .to_string();
    let duplicate_slot = slot.replace(&slot_id, DUPLICATE_SLOT_MHS);
    let organization = block_of(&out, &lines(&provider_mhs("search:organization-1")));
    let organization_id = organization
        .lines()
        .find_map(|l| l.strip_prefix("uniqueIdentifier: "))
        .expect("organization MHS id")
        .to_string();
    let other_ods = map_lines(
        &map_lines(
            &organization.replace(&organization_id, OTHER_ODS_MHS),
            "nhsIDCode: ",
            |_| "nhsIDCode: X99999".into(),
        ),
        "nhsMhsFQDN: ",
        |_| "nhsMhsFQDN: rogue.dev.local".into(),
    );
    let practitioner = block_of(&out, &lines(&provider_mhs("search:practitioner-1")));
    let practitioner_id = practitioner
        .lines()
        .find_map(|l| l.strip_prefix("uniqueIdentifier: "))
        .expect("practitioner MHS id")
        .to_string();
    let lower_ods = map_lines(
        &map_lines(
            &practitioner.replace(&practitioner_id, LOWER_ODS_MHS),
            "nhsIDCode: ",
            |_| "nhsIDCode: b82617".into(),
        ),
        "nhsMhsFQDN: ",
        |_| "nhsMhsFQDN: lower-ods.dev.local".into(),
    );

    let consumer_mhs = [
        "objectClass: nhsMhs",
        "nhsIDCode: A20047",
        "uniqueIdentifier: f547f3250008191f91b9",
    ];
    out = edit_blocks(&out, &consumer_mhs, |b| {
        map_lines(b, "nhsMHSEndPoint: ", |l| format!("{l}/"))
    });
    let opentest = map_lines(
        &map_lines(
            &block_of(&out, &consumer_mhs).replace("f547f3250008191f91b9", OPENTEST_MHS),
            "nhsMHSEndPoint: ",
            |_| "nhsMHSEndPoint: https://vpn-client-1411.opentest.hscic.gov.uk/".into(),
        ),
        "nhsMhsFQDN: ",
        |_| "nhsMhsFQDN: opentest.dev.local".into(),
    );
    out = edit_blocks(
        &out,
        &["objectClass: nhsAs", "uniqueIdentifier: 200000000359"],
        |b| {
            map_lines(b, "nhsMHSPartyKey: ", |_| {
                encoded("nhsMHSPartyKey", "A20047-821870 ")
            })
        },
    );
    format!(
        "{}\n\n{duplicate_slot}\n\n{other_ods}\n\n{lower_ods}\n\n{opentest}\n",
        out.trim_end()
    )
}

/// The `uniqueIdentifier` of the MHS record in `ldif` for `interaction` with ODS code `ods`.
pub fn mhs_id(ldif: &str, interaction: &str, ods: &str) -> String {
    block_of(
        ldif,
        &[
            "objectClass: nhsMhs",
            &format!("nhsIDCode: {ods}"),
            &format!("nhsMhsSvcIA: {interaction}"),
        ],
    )
    .lines()
    .find_map(|l| l.strip_prefix("uniqueIdentifier: "))
    .expect("an MHS id")
    .to_string()
}
