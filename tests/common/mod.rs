//! Test harness: a PKI made at test time, the real gateway started in-process on port 0, the
//! real mock provider or a recording provider upstream, and real mTLS clients (HTTP/1.1, h2).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use ssp_gateway::config::Config;
use ssp_gateway::server::RequestBody;
use ssp_gateway::server::{ConnInfo, ServeOptions};
use ssp_gateway::tls::pki::{Ca, Issued, KeyKind, LeafSpec, Usage, Validity};
use ssp_gateway::tls::{ClientTls, ListenerTls, ServerTls};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub const PROVIDER_ASID: &str = "918999198993";
pub const CONSUMER_ASID: &str = "200000000359";
pub const READONLY_ASID: &str = "200000000360";
pub const BASE_PATH: &str = "/B82617/STU3/1/gpconnect";

pub const IX_METADATA: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";
pub const IX_SEARCH_PATIENT: &str = "urn:nhs:names:services:gpconnect:fhir:rest:search:patient-1";
pub const IX_READ_PATIENT: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:patient-1";
pub const IX_SEARCH_PRACTITIONER: &str =
    "urn:nhs:names:services:gpconnect:fhir:rest:search:practitioner-1";
pub const IX_READ_PRACTITIONER: &str =
    "urn:nhs:names:services:gpconnect:fhir:rest:read:practitioner-1";
pub const IX_SEARCH_ORGANIZATION: &str =
    "urn:nhs:names:services:gpconnect:fhir:rest:search:organization-1";
pub const IX_READ_ORGANIZATION: &str =
    "urn:nhs:names:services:gpconnect:fhir:rest:read:organization-1";
pub const IX_READ_LOCATION: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:location-1";
pub const IX_REGISTER_PATIENT: &str =
    "urn:nhs:names:services:gpconnect:fhir:operation:gpc.registerpatient-1";
pub const IX_SEARCH_SLOT: &str = "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1";
pub const IX_BOOK: &str = "urn:nhs:names:services:gpconnect:fhir:rest:create:appointment-1";
pub const IX_READ_APPOINTMENT: &str =
    "urn:nhs:names:services:gpconnect:fhir:rest:read:appointment-1";
pub const IX_AMEND: &str = "urn:nhs:names:services:gpconnect:fhir:rest:update:appointment-1";
pub const IX_CANCEL: &str = "urn:nhs:names:services:gpconnect:fhir:rest:cancel:appointment-1";
pub const IX_PATIENT_APPOINTMENTS: &str =
    "urn:nhs:names:services:gpconnect:fhir:rest:search:patient_appointments-1";

/// A TCP port free on 127.0.0.1 a moment ago, for a gateway binary's fixed addresses.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A unique, empty scratch directory (`ssp-gateway-test-{name}-{pid}-{nanos}-{n}`). The first
/// call in a test process removes those of earlier test processes that have ended, once they
/// are an hour old, so a machine keeps about an hour's runs (a run's own stay while it runs:
/// its gateways write there).
pub fn scratch_dir(name: &str) -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(remove_ended_runs_scratch_dirs);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "ssp-gateway-test-{name}-{}-{nanos}-{n}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Removes the scratch directories, an hour old or more, of test processes that are no longer
/// running.
fn remove_ended_runs_scratch_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ssp-gateway-test-"))
        else {
            continue;
        };
        // {name}-{pid}-{nanos}-{n}, where the name may itself hold dashes.
        let Some(pid) = rest.rsplit('-').nth(2).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        // An hour old as well: a run in another PID namespace sharing /tmp is not in /proc.
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if old && pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A cert/key pair written to disk.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The test PKI: one CA for everything, plus a second CA nobody trusts.
pub struct World {
    /// The CA everything is issued by (to issue or revoke more in a test).
    pub authority: Ca,
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub crl: PathBuf,
    pub gateway: Pair,
    pub gateway_client: Pair,
    pub provider: Pair,
    pub consumer: Pair,
    pub readonly: Pair,
    pub rogue: Pair,
    pub expired: Pair,
    pub revoked: Pair,
    /// The consumer certificate as issued (to revoke it in a test).
    pub consumer_issued: Issued,
    /// The provider's server certificate as issued (likewise).
    pub provider_issued: Issued,
    pub untrusted: Pair,
}

fn write_pair(dir: &Path, name: &str, issued: &Issued) -> Pair {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert, &issued.cert_pem).expect("write cert");
    std::fs::write(&key, &issued.key_pem).expect("write key");
    Pair { cert, key }
}

fn leaf(names: &[&str], key: KeyKind, usage: Usage, validity: Validity) -> LeafSpec {
    LeafSpec {
        names: names.iter().map(|s| s.to_string()).collect(),
        common_name: names[0].to_string(),
        key,
        usage,
        validity,
    }
}

impl World {
    /// `server_key` for the two servers (gateway, provider); `client_key` for every client.
    pub fn new(server_key: KeyKind, client_key: KeyKind) -> World {
        let dir = scratch_dir("pki");
        let ca = Ca::new("ssp-gateway test CA", KeyKind::EcdsaP256).expect("CA");
        let other = Ca::new("untrusted CA", KeyKind::EcdsaP256).expect("other CA");
        let issue = |ca: &Ca, names: &[&str], key, usage, validity| {
            ca.issue(&leaf(names, key, usage, validity)).expect("issue")
        };
        let gateway = issue(
            &ca,
            &["localhost", "127.0.0.1"],
            server_key,
            Usage::Server,
            Validity::Current,
        );
        let provider = issue(
            &ca,
            &["localhost", "127.0.0.1"],
            server_key,
            Usage::Server,
            Validity::Current,
        );
        let gateway_client = issue(
            &ca,
            &["ssp.dev.local"],
            client_key,
            Usage::Client,
            Validity::Current,
        );
        let consumer = issue(
            &ca,
            &["consumer.dev.local"],
            client_key,
            Usage::Client,
            Validity::Current,
        );
        let readonly = issue(
            &ca,
            &["readonly.dev.local"],
            client_key,
            Usage::Client,
            Validity::Current,
        );
        let rogue = issue(
            &ca,
            &["rogue.dev.local"],
            client_key,
            Usage::Client,
            Validity::Current,
        );
        let expired = issue(
            &ca,
            &["consumer.dev.local"],
            client_key,
            Usage::Client,
            Validity::Expired,
        );
        let revoked = issue(
            &ca,
            &["consumer.dev.local"],
            client_key,
            Usage::Client,
            Validity::Current,
        );
        let untrusted = issue(
            &other,
            &["consumer.dev.local"],
            client_key,
            Usage::Client,
            Validity::Current,
        );
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca.cert_pem()).expect("write CA");
        let crl = dir.join("ca.crl.pem");
        std::fs::write(&crl, ca.crl(&[&revoked]).expect("CRL")).expect("write CRL");
        World {
            authority: ca,
            ca: ca_path,
            crl,
            gateway: write_pair(&dir, "gateway", &gateway),
            gateway_client: write_pair(&dir, "gateway-client", &gateway_client),
            provider: write_pair(&dir, "provider", &provider),
            consumer: write_pair(&dir, "consumer", &consumer),
            readonly: write_pair(&dir, "readonly", &readonly),
            rogue: write_pair(&dir, "rogue", &rogue),
            expired: write_pair(&dir, "expired", &expired),
            revoked: write_pair(&dir, "revoked", &revoked),
            consumer_issued: consumer,
            provider_issued: provider,
            untrusted: write_pair(&dir, "untrusted", &untrusted),
            dir,
        }
    }

    pub fn ecdsa() -> World {
        World::new(KeyKind::EcdsaP256, KeyKind::EcdsaP256)
    }

    pub fn server_tls(&self, pair: &Pair) -> ServerTls {
        ServerTls {
            cert: pair.cert.clone(),
            key: pair.key.clone(),
            client_ca: self.ca.clone(),
            crls: vec![],
        }
    }

    pub fn client(&self, pair: &Pair, addr: SocketAddr) -> Client {
        self.client_with(pair, addr, false)
    }

    pub fn client_with(&self, pair: &Pair, addr: SocketAddr, http2: bool) -> Client {
        let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = ssp_gateway::tls::client_config(
            &ClientTls {
                cert: pair.cert.clone(),
                key: pair.key.clone(),
                ca: self.ca.clone(),
                crls: Vec::new(),
            },
            alpn,
        )
        .expect("client TLS config");
        Client { tls, addr }
    }
}

/// The development directory with the provider's endpoint moved to `provider_port`.
pub fn directory_ldif(provider_port: u16) -> String {
    let text = std::fs::read_to_string(repo_path("config/directory.ldif")).expect("read LDIF");
    let moved = text.replace(
        "https://localhost:9443/",
        &format!("https://localhost:{provider_port}/"),
    );
    assert_ne!(
        text, moved,
        "the development LDIF names https://localhost:9443/"
    );
    moved
}

pub fn endpoint(provider_port: u16) -> String {
    format!("https://localhost:{provider_port}{BASE_PATH}")
}

/// Options for one gateway under test.
pub struct GatewayOptions {
    pub jwt: &'static str,
    pub http2: bool,
    pub crls: bool,
    pub response_timeout: &'static str,
    pub extra_policy: &'static str,
    /// Extra keys for the `[listener]` section.
    pub extra_listener: &'static str,
    /// Extra keys for the `[upstream]` section.
    pub extra_upstream: &'static str,
    /// Edits the development LDIF (endpoint already moved to the provider's port).
    pub ldif_edit: Option<fn(String) -> String>,
    /// Replaces the `[directory]` section's keys: called with the development LDIF (endpoint
    /// moved, `ldif_edit` applied, also written to `directory.ldif` beside the config) and
    /// returns the keys, e.g. to start an LDAP server with that data and point at it.
    pub directory: Option<DirectorySection>,
    /// Whole sections appended to the configuration (e.g. `[audit]`, `[tracing]`).
    pub extra_sections: String,
    /// The keys of the `[rate_limit]` section (default: per-consumer limits off, so tests
    /// that send bursts are not limited unless they ask to be).
    pub rate_limit: &'static str,
    /// The keys of the `[circuit_breaker]` section.
    pub circuit_breaker: &'static str,
    /// `[shutdown] grace_period`.
    pub grace_period: &'static str,
}

/// Builds the `[directory]` keys from the development LDIF (see `GatewayOptions::directory`).
pub type DirectorySection = Box<dyn Fn(&str) -> String>;

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            jwt: "enforce",
            http2: true,
            crls: true,
            response_timeout: "5s",
            extra_policy: "",
            extra_listener: "",
            extra_upstream: "",
            ldif_edit: None,
            directory: None,
            extra_sections: String::new(),
            rate_limit: "enabled = false",
            circuit_breaker: "",
            grace_period: "5s",
        }
    }
}

/// Writes a gateway configuration for `world`, upstream at `provider_port`, and loads it.
pub fn gateway_config(world: &World, provider_port: u16, opts: &GatewayOptions) -> Config {
    let dir = scratch_dir("config");
    let mut ldif = directory_ldif(provider_port);
    if let Some(edit) = opts.ldif_edit {
        ldif = edit(ldif);
    }
    std::fs::write(dir.join("directory.ldif"), &ldif).expect("write LDIF");
    let directory = match &opts.directory {
        Some(section) => section(&ldif),
        None => "ldif_file = \"directory.ldif\"".to_string(),
    };
    let crls = if opts.crls {
        format!("[\"{}\"]", world.crl.display())
    } else {
        "[]".to_string()
    };
    let text = format!(
        r#"
[listener]
address = "127.0.0.1:0"
cert = "{gw_cert}"
key = "{gw_key}"
client_ca = "{ca}"
crls = {crls}
http2 = {http2}
handshake_timeout = "5s"
{extra_listener}
[admin]
address = "127.0.0.1:0"
[upstream]
cert = "{gc_cert}"
key = "{gc_key}"
ca = "{ca}"
connect_timeout = "2s"
response_timeout = "{response_timeout}"
{extra_upstream}
[policy]
interactions = "{interactions}"
jwt = "{jwt}"
{extra_policy}
[directory]
{directory}
[shutdown]
grace_period = "{grace_period}"
[log]
level = "warn"
[reload]
poll_interval = "100ms"
[rate_limit]
{rate_limit}
[circuit_breaker]
{circuit_breaker}
{extra_sections}
"#,
        gw_cert = world.gateway.cert.display(),
        gw_key = world.gateway.key.display(),
        ca = world.ca.display(),
        http2 = opts.http2,
        gc_cert = world.gateway_client.cert.display(),
        gc_key = world.gateway_client.key.display(),
        response_timeout = opts.response_timeout,
        interactions = repo_path("config/interactions.toml").display(),
        jwt = opts.jwt,
        extra_policy = opts.extra_policy,
        extra_listener = opts.extra_listener,
        extra_upstream = opts.extra_upstream,
        directory = directory,
        extra_sections = opts.extra_sections,
        rate_limit = opts.rate_limit,
        circuit_breaker = opts.circuit_breaker,
        grace_period = opts.grace_period,
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// A running gateway and its upstream.
pub struct Harness {
    pub world: World,
    pub gateway: SocketAddr,
    pub admin: SocketAddr,
    pub provider_port: u16,
    pub recorder: Arc<Recorder>,
    pub shutdown: CancellationToken,
    pub running: Option<ssp_gateway::Running>,
    /// Where this gateway writes its audit trail.
    pub audit_dir: PathBuf,
    /// The configuration file it was started from.
    pub config_path: PathBuf,
}

impl Harness {
    pub fn endpoint(&self) -> String {
        endpoint(self.provider_port)
    }

    pub fn consumer(&self) -> Client {
        self.world.client(&self.world.consumer, self.gateway)
    }

    /// The running gateway's directory (its cache and backend).
    pub fn directory(&self) -> ssp_gateway::directory::cache::Directory {
        self.running
            .as_ref()
            .and_then(|r| r.directory.clone())
            .expect("the gateway's directory")
    }

    /// The consumer's GET metadata (capability statement) through the gateway.
    pub async fn consumer_metadata(&self) -> Answer {
        self.consumer()
            .gpc(Gpc::new(
                Method::GET,
                format!("{}/metadata", self.endpoint()),
                IX_METADATA,
            ))
            .await
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(r) = self.running.take() {
            r.wait().await;
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The gateway in front of the real mock provider.
pub async fn start_with_mock(world: World, opts: GatewayOptions) -> Harness {
    let shutdown = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind provider");
    let provider_port = listener.local_addr().expect("addr").port();
    let settings = ssp_gateway::mock_provider::MockSettings {
        base_url: endpoint(provider_port),
        ..Default::default()
    };
    let mock = Arc::new(ssp_gateway::mock_provider::MockProvider::new(settings));
    let recorder = Recorder::new(Behaviour::Echo);
    let tls = provider_tls(&world);
    {
        let recorder = recorder.clone();
        tokio::spawn(ssp_gateway::server::serve_tls(
            listener,
            tls,
            serve_options("mock-provider"),
            shutdown.clone(),
            move |conn: Arc<ConnInfo>, req: Request<RequestBody>| {
                let mock = mock.clone();
                let recorder = recorder.clone();
                async move {
                    recorder.count.fetch_add(1, Ordering::SeqCst);
                    recorder
                        .peers
                        .lock()
                        .expect("lock")
                        .push(conn.peer.names.clone());
                    recorder.heads.lock().expect("lock").push((
                        req.method().clone(),
                        req.uri().to_string(),
                        req.headers().clone(),
                    ));
                    mock.handle(req).await
                }
            },
        ));
    }
    start_gateway(world, provider_port, recorder, shutdown, opts).await
}

/// The gateway in front of a recording provider with the given behaviour.
pub async fn start_with_recorder(
    world: World,
    behaviour: Behaviour,
    opts: GatewayOptions,
) -> Harness {
    let shutdown = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind provider");
    let provider_port = listener.local_addr().expect("addr").port();
    let recorder = Recorder::new(behaviour);
    serve_recorder(&world, listener, recorder.clone(), shutdown.clone());
    start_gateway(world, provider_port, recorder, shutdown, opts).await
}

/// The gateway in front of a recording provider whose TLS offers session resumption (a
/// session cache, and two TLS 1.3 tickets after each full handshake), as many providers' TLS
/// stacks do by default.
pub async fn start_with_resuming_recorder(
    world: World,
    behaviour: Behaviour,
    opts: GatewayOptions,
) -> Harness {
    let shutdown = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind provider");
    let provider_port = listener.local_addr().expect("addr").port();
    let recorder = Recorder::new(behaviour);
    let mut tls =
        ssp_gateway::tls::listener_tls(&world.server_tls(&world.provider), &[b"http/1.1"])
            .expect("provider TLS");
    let mut resumable = (*tls.config).clone();
    resumable.session_storage = rustls::server::ServerSessionMemoryCache::new(64);
    resumable.send_tls13_tickets = 2;
    tls.config = Arc::new(resumable);
    let tls = ssp_gateway::reload::Reloadable::new("resuming provider TLS", Arc::new(tls), vec![]);
    serve_recorder_with(listener, tls, recorder.clone(), shutdown.clone());
    start_gateway(world, provider_port, recorder, shutdown, opts).await
}

/// Serves `recorder` as an mTLS provider on `listener` until `shutdown`.
pub fn serve_recorder(
    world: &World,
    listener: TcpListener,
    recorder: Arc<Recorder>,
    shutdown: CancellationToken,
) {
    serve_recorder_with(listener, provider_tls(world), recorder, shutdown);
}

/// [`serve_recorder`] with the given provider TLS.
fn serve_recorder_with(
    listener: TcpListener,
    tls: Arc<ssp_gateway::reload::Reloadable<ListenerTls>>,
    recorder: Arc<Recorder>,
    shutdown: CancellationToken,
) {
    tokio::spawn(ssp_gateway::server::serve_tls(
        listener,
        tls,
        serve_options("recording-provider"),
        shutdown,
        move |conn: Arc<ConnInfo>, req: Request<RequestBody>| {
            let recorder = recorder.clone();
            async move { recorder.answer(conn, req).await }
        },
    ));
}

fn provider_tls(world: &World) -> Arc<ssp_gateway::reload::Reloadable<ListenerTls>> {
    let tls = ssp_gateway::tls::listener_tls(&world.server_tls(&world.provider), &[b"http/1.1"])
        .expect("provider TLS");
    ssp_gateway::reload::Reloadable::new("test provider TLS", Arc::new(tls), vec![])
}

fn serve_options(name: &'static str) -> ServeOptions {
    ServeOptions {
        limits: Default::default(),
        name,
        handshake_timeout: Duration::from_secs(5),
        header_read_timeout: Duration::from_secs(5),
        http2: false,
        grace_period: Duration::from_secs(1),
    }
}

async fn start_gateway(
    world: World,
    provider_port: u16,
    recorder: Arc<Recorder>,
    shutdown: CancellationToken,
    opts: GatewayOptions,
) -> Harness {
    let config = gateway_config(&world, provider_port, &opts);
    let running = ssp_gateway::start(&config, shutdown.clone())
        .await
        .unwrap_or_else(|e| panic!("gateway start: {e}"));
    Harness {
        world,
        gateway: running.gateway_addr,
        admin: running.admin_addr,
        provider_port,
        recorder,
        shutdown,
        running: Some(running),
        audit_dir: config.audit.dir.clone(),
        config_path: config.source.clone(),
    }
}

/// What the recording provider does with a request.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// 200 with a JSON description of what arrived (method, uri, headers, body length).
    Echo,
    /// Waits this long before answering.
    Slow(Duration),
    /// Streams a body of this many bytes back, in 64 KiB chunks.
    Big(usize),
    /// Answers with this status and body, as a provider error would.
    Status(u16, &'static str),
    /// Holds each request until the test adds a permit to this semaphore, then answers as
    /// `Echo` (streams and upstream connections stay busy for as long as the test needs).
    Hold(Arc<tokio::sync::Semaphore>),
}

/// A provider that records what reached it.
pub struct Recorder {
    pub behaviour: Behaviour,
    pub count: AtomicUsize,
    pub body_bytes: AtomicUsize,
    /// Pieces of request body data the provider was handed, in all.
    pub body_pieces: AtomicUsize,
    pub peers: Mutex<Vec<Vec<String>>>,
    pub heads: Mutex<Vec<(Method, String, HeaderMap)>>,
    /// Signalled each time a request arrives.
    pub arrived: tokio::sync::Notify,
}

impl Recorder {
    pub fn new(behaviour: Behaviour) -> Arc<Recorder> {
        Arc::new(Recorder {
            behaviour,
            count: AtomicUsize::new(0),
            body_bytes: AtomicUsize::new(0),
            body_pieces: AtomicUsize::new(0),
            peers: Mutex::new(Vec::new()),
            heads: Mutex::new(Vec::new()),
            arrived: tokio::sync::Notify::new(),
        })
    }

    pub fn seen(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn last_head(&self) -> (Method, String, HeaderMap) {
        self.heads
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("a request reached the provider")
    }

    async fn answer(&self, conn: Arc<ConnInfo>, req: Request<RequestBody>) -> Response<StreamBody> {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.arrived.notify_one();
        self.peers
            .lock()
            .expect("lock")
            .push(conn.peer.names.clone());
        let (parts, mut body) = req.into_parts();
        self.heads.lock().expect("lock").push((
            parts.method.clone(),
            parts.uri.to_string(),
            parts.headers.clone(),
        ));
        // Read the body as a stream, counting, never holding it whole.
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        len += d.len();
                        self.body_pieces.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Err(_) => break,
            }
        }
        self.body_bytes.fetch_add(len, Ordering::SeqCst);
        if let Behaviour::Hold(gate) = &self.behaviour {
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
        }
        match &self.behaviour {
            Behaviour::Echo | Behaviour::Hold(_) => {
                let headers: serde_json::Map<String, serde_json::Value> = parts
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_string(),
                            serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into()),
                        )
                    })
                    .collect();
                let body = serde_json::json!({
                    "method": parts.method.as_str(),
                    "uri": parts.uri.to_string(),
                    "headers": headers,
                    "body_length": len,
                });
                json_response(200, body.to_string())
            }
            Behaviour::Slow(d) => {
                tokio::time::sleep(*d).await;
                json_response(200, "{}".into())
            }
            Behaviour::Big(n) => {
                let mut resp = Response::new(StreamBody::Sized { remaining: *n });
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/octet-stream"),
                );
                resp
            }
            Behaviour::Status(code, body) => json_response(*code, body.to_string()),
        }
    }
}

fn json_response(status: u16, body: String) -> Response<StreamBody> {
    let mut resp = Response::new(StreamBody::Full(Some(Bytes::from(body))));
    *resp.status_mut() = StatusCode::from_u16(status).expect("valid status");
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/fhir+json;charset=utf-8"),
    );
    resp
}

/// A response body that is either small and whole, or generated chunk by chunk.
pub enum StreamBody {
    Full(Option<Bytes>),
    Sized { remaining: usize },
}

impl http_body::Body for StreamBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        const CHUNK: usize = 64 * 1024;
        let this = self.get_mut();
        let frame = match this {
            StreamBody::Full(b) => b.take().map(http_body::Frame::data),
            StreamBody::Sized { remaining } => {
                if *remaining == 0 {
                    None
                } else {
                    let n = (*remaining).min(CHUNK);
                    *remaining -= n;
                    Some(http_body::Frame::data(Bytes::from(vec![b'x'; n])))
                }
            }
        };
        std::task::Poll::Ready(frame.map(Ok))
    }
}

/// A real mTLS client, one fresh connection per request.
#[derive(Clone)]
pub struct Client {
    pub tls: Arc<rustls::ClientConfig>,
    pub addr: SocketAddr,
}

/// A response with its body collected.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
    /// The status line's reason phrase when it was not the status's canonical one (HTTP/1.1).
    pub reason: Option<String>,
}

impl Answer {
    /// The answer of a response's head and collected body.
    pub fn of(parts: http::response::Parts, body: Bytes) -> Answer {
        Answer {
            reason: parts
                .extensions
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned()),
            status: parts.status,
            headers: parts.headers,
            body,
            version: parts.version,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts this is the gateway's OperationOutcome for `status` with `token`, with both
    /// codings, and returns the JSON.
    pub fn assert_outcome(
        &self,
        status: u16,
        spine_code: Option<&str>,
        token: &str,
    ) -> serde_json::Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "status; body: {}",
            self.text()
        );
        assert_eq!(
            self.headers[http::header::CONTENT_TYPE],
            "application/fhir+json;charset=utf-8"
        );
        let v = self.json();
        assert_eq!(v["resourceType"], "OperationOutcome");
        let issue = &v["issue"][0];
        assert_eq!(issue["diagnostics"], token, "token");
        let codings = issue["details"]["coding"].as_array().expect("codings");
        let ssp = codings
            .iter()
            .find(|c| {
                c["system"] == "http://fhir.nhs.net/ValueSet/gpconnect-schedule-response-code-1-0"
            })
            .expect("SSP coding");
        assert_eq!(ssp["code"], status.to_string());
        assert_eq!(ssp["display"], token);
        let spine = codings.iter().find(|c| {
            c["system"] == "https://fhir.nhs.uk/STU3/CodeSystem/Spine-ErrorOrWarningCode-1"
        });
        match spine_code {
            Some(code) => assert_eq!(spine.expect("Spine coding")["code"], code),
            None => assert!(spine.is_none(), "no Spine coding expected"),
        }
        v
    }
}

impl Client {
    /// Opens an mTLS connection (the handshake alone).
    pub async fn handshake(&self) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let name = ServerName::try_from("localhost").expect("server name");
        let mut stream = connector.connect(name, tcp).await?;
        // With TLS 1.3 a refused client certificate surfaces on the first read: probe it.
        use tokio::io::AsyncReadExt;
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut probe)).await {
            Ok(Ok(0)) => return Err(std::io::Error::other("connection closed by the server")),
            Ok(Err(e)) => return Err(e),
            _ => {}
        }
        Ok(stream)
    }

    pub async fn send<B>(&self, mut req: Request<B>) -> Result<Answer, String>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let name = ServerName::try_from("localhost").expect("server name");
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        // Speak what ALPN settled on, as a real client does.
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
        let io = TokioIo::new(tls);
        // An HTTP/1.1 request names the host (hyper adds none for an origin-form target); an
        // HTTP/2 one has `:authority` instead.
        if h2 {
            req.headers_mut().remove(http::header::HOST);
        } else if !req.headers().contains_key(http::header::HOST) {
            req.headers_mut().insert(
                http::header::HOST,
                http::HeaderValue::from_static("localhost"),
            );
        }
        let resp = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender
                .send_request(req)
                .await
                .map_err(|e| format!("{e:?}"))?
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender
                .send_request(req)
                .await
                .map_err(|e| format!("{e:?}"))?
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer::of(parts, body))
    }

    /// Sends a GP Connect request through the gateway with valid Ssp headers and JWT.
    pub async fn gpc(&self, r: Gpc<'_>) -> Answer {
        self.send(r.build())
            .await
            .unwrap_or_else(|e| panic!("request failed: {e}"))
    }
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A valid unsigned JWT for `scope`.
pub fn jwt(scope: &str) -> String {
    let claims =
        ssp_gateway::ssp::jwt::dev_claims(scope, now(), "https://authorize.fhir.nhs.net/token");
    ssp_gateway::ssp::jwt::encode_unsigned(&claims)
}

/// Scope for an interaction, from the catalogue.
pub fn scope_for(interaction: &str) -> &'static str {
    match interaction {
        IX_SEARCH_PATIENT | IX_READ_PATIENT | IX_READ_APPOINTMENT | IX_PATIENT_APPOINTMENTS => {
            "patient/*.read"
        }
        IX_REGISTER_PATIENT | IX_BOOK | IX_AMEND | IX_CANCEL => "patient/*.write",
        _ => "organization/*.read",
    }
}

/// One GP Connect request through the gateway.
pub struct Gpc<'a> {
    pub method: Method,
    /// The full request target after the gateway's `/`, e.g. `https://localhost:1/B82617/.../Slot?x`.
    pub target: String,
    pub interaction: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub body: Option<String>,
    pub extra: Vec<(&'a str, String)>,
    pub jwt: Option<String>,
}

impl<'a> Gpc<'a> {
    pub fn new(method: Method, target: String, interaction: &'a str) -> Gpc<'a> {
        Gpc {
            method,
            target,
            interaction,
            from: CONSUMER_ASID,
            to: PROVIDER_ASID,
            body: None,
            extra: vec![],
            jwt: Some(jwt(scope_for(interaction))),
        }
    }

    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = Some(body.into());
        self
    }

    pub fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.extra.push((name, value.into()));
        self
    }

    pub fn from(mut self, asid: &'a str) -> Self {
        self.from = asid;
        self
    }

    pub fn to(mut self, asid: &'a str) -> Self {
        self.to = asid;
        self
    }

    pub fn jwt(mut self, token: Option<String>) -> Self {
        self.jwt = token;
        self
    }

    pub fn build(self) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(self.method)
            .uri(format!("/{}", self.target))
            .header("Ssp-TraceID", uuid::Uuid::new_v4().to_string())
            .header("Ssp-From", self.from)
            .header("Ssp-To", self.to)
            .header("Ssp-InteractionID", self.interaction)
            .header("Accept", "application/fhir+json");
        if let Some(t) = self.jwt {
            b = b.header("Authorization", format!("Bearer {t}"));
        }
        if self.body.is_some() {
            b = b.header("Content-Type", "application/fhir+json;charset=utf-8");
        }
        if !self
            .extra
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("host"))
        {
            // What any HTTP/1.1 client sends (RFC 9112 §3.2); `Client::send` drops it on HTTP/2.
            b = b.header("Host", "localhost");
        }
        for (k, v) in self.extra {
            b = b.header(k, v);
        }
        b.body(Full::new(Bytes::from(self.body.unwrap_or_default())))
            .expect("valid request")
    }
}

/// Removes the lines containing `needle` from the LDIF entry whose lines include all of `entry`.
pub fn edit_entry(ldif: &str, entry: &[&str], needle: &str) -> String {
    let edited: String = ldif
        .split("\n\n")
        .map(|block| {
            if entry.iter().all(|e| block.lines().any(|l| l.trim() == *e)) {
                block
                    .lines()
                    .filter(|l| !l.contains(needle))
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                block.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n\n");
    assert_ne!(edited, ldif, "the LDIF edit changed nothing");
    edited
}

/// A plain HTTP/1.1 GET (the admin listener, a Prometheus API): status and body.
pub async fn http_get(addr: SocketAddr, path_and_query: &str) -> (StatusCode, String) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let req = Request::get(path_and_query)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of the sample `series` (name with its labels, as exposed) in a Prometheus text
/// exposition, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Every audit record in the trail directory `dir` so far (all files, unsorted; a line that is
/// not whole JSON, such as one being written, is skipped).
pub fn audit_records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<serde_json::Value>>()
        })
        .collect()
}

/// Waits (up to 20 s) until the audit trail in `dir` holds a record `wanted` accepts, and
/// returns it; `what` names it in the failure.
pub async fn audit_record_where(
    dir: &Path,
    what: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(r) = audit_records(dir).into_iter().find(|r| wanted(r)) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no audit record of {what} in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether an audit record is a request's last (`outcome` or `rejection`).
pub fn is_final_record(r: &serde_json::Value) -> bool {
    r["kind"] == "outcome" || r["kind"] == "rejection"
}

/// Waits until the audit trail in `dir` holds the final record (`outcome` or `rejection`) of a
/// request answered with `status`, and returns it.
pub async fn audited(dir: &Path, status: u16) -> serde_json::Value {
    audit_record_where(dir, &format!("the {status}"), |r| {
        is_final_record(r) && r["status"] == status
    })
    .await
}

/// The audit record of the answer `a` (by its `x-request-id`: a refusal's).
pub async fn audited_answer(dir: &Path, a: &Answer) -> serde_json::Value {
    let id = a.headers["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    audit_record_where(dir, &format!("request {id}"), |r| {
        r["request_id"] == id.as_str()
    })
    .await
}

/// A TCP front for a provider: resets the first `resets` connections as soon as they are
/// accepted, before a byte of TLS (as a provider restarting behind a load balancer does), and
/// pipes every later one to `upstream`. Returns its port and how many connections it accepted.
pub async fn tcp_front(resets: usize, upstream: SocketAddr) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            if n < resets {
                // SO_LINGER 0: close with a TCP RST.
                #[allow(deprecated)]
                let _ = tcp.set_linger(Some(Duration::ZERO));
                drop(tcp);
                continue;
            }
            tokio::spawn(async move {
                let Ok(mut provider) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let mut tcp = tcp;
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut provider).await;
            });
        }
    });
    (port, accepted)
}

/// One request head, up to and including its blank line, read a byte at a time so that nothing
/// after it is taken from `s`; `None` when the stream ends or fails first.
pub async fn read_request_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}

// The gateway binary itself (`ssp-gateway run`), on a configuration written for a test world.

/// The gateway binary the tests start.
pub const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_ssp-gateway");
/// How long the binary has to become ready or to exit.
pub const BINARY_DEADLINE: Duration = Duration::from_secs(30);

/// The gateway binary on a config written for `world` and `provider_port`.
pub struct Spawned {
    pub child: Child,
    pub gateway: SocketAddr,
    pub admin: SocketAddr,
    pub audit_dir: PathBuf,
    /// Its log (standard output and error), beside its config.
    pub log: PathBuf,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the config (ports fixed, `extra` sections appended) and returns its path.
pub fn spawned_config(
    world: &World,
    provider_port: u16,
    extra: &str,
) -> (PathBuf, SocketAddr, SocketAddr, PathBuf) {
    let opts = GatewayOptions {
        extra_sections: extra.to_owned(),
        ..Default::default()
    };
    let config = gateway_config(world, provider_port, &opts);
    let (gateway, admin) = fix_listener_ports(&config.source);
    (
        config.source.clone(),
        gateway,
        admin,
        config.audit.dir.clone(),
    )
}

/// Gives the gateway's listener and then its admin listener, written `127.0.0.1:0` in the
/// config file at `config` (a process started from it cannot say which ports it took), free
/// ports of their own; returns them (listener, admin).
pub fn fix_listener_ports(config: &Path) -> (SocketAddr, SocketAddr) {
    let gateway: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let text = std::fs::read_to_string(config)
        .expect("read config")
        .replacen(
            "address = \"127.0.0.1:0\"",
            &format!("address = \"{gateway}\""),
            1,
        )
        .replacen(
            "address = \"127.0.0.1:0\"",
            &format!("address = \"{admin}\""),
            1,
        );
    std::fs::write(config, text).expect("write config");
    (gateway, admin)
}

pub async fn spawn_gateway(
    config: &Path,
    gateway: SocketAddr,
    admin: SocketAddr,
    audit_dir: &Path,
    wrap: &[&str],
) -> Spawned {
    let mut cmd = if wrap.is_empty() {
        Command::new(GATEWAY_BIN)
    } else {
        let mut c = Command::new(wrap[0]);
        c.args(&wrap[1..]).arg(GATEWAY_BIN);
        c
    };
    let log = config.with_extension("log");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("open the gateway's log");
    let err = out.try_clone().expect("log");
    let child = cmd
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn the gateway");
    let spawned = Spawned {
        child,
        gateway,
        admin,
        audit_dir: audit_dir.to_path_buf(),
        log,
    };
    let start = Instant::now();
    loop {
        if let Ok(tcp) = tokio::net::TcpStream::connect(admin).await {
            drop(tcp);
            if http_get(admin, "/readyz").await.0 == StatusCode::OK {
                return spawned;
            }
        }
        assert!(
            start.elapsed() < BINARY_DEADLINE,
            "the gateway binary never became ready"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// SIGTERM, then the exit status (within the deadline).
pub async fn stop_gateway(g: &mut Spawned) -> std::process::ExitStatus {
    let term = Command::new("kill")
        .args(["-TERM", &g.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let start = Instant::now();
    loop {
        if let Some(status) = g.child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            start.elapsed() < BINARY_DEADLINE,
            "the gateway did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn log_of(g: &Spawned) -> String {
    std::fs::read_to_string(&g.log).expect("the gateway's log")
}

/// A copy of the shipped `config/` (gateway.toml and the files beside it) into `root/config`,
/// with the gateway, admin and mock provider ports moved to `ports` when given; the copied
/// `gateway.toml`. Its relative paths (`certs-dev/`, `audit-dev/`) resolve under `root`.
pub fn shipped_config(root: &Path, ports: Option<(u16, u16, u16)>) -> PathBuf {
    let config_dir = root.join("config");
    std::fs::create_dir_all(&config_dir).expect("mkdir");
    for name in [
        "gateway.toml",
        "interactions.toml",
        "directory.ldif",
        "sds.schema",
    ] {
        let mut text = std::fs::read_to_string(repo_path(&format!("config/{name}"))).expect("read");
        if let Some((gw, admin, mock)) = ports {
            text = text
                .replace("127.0.0.1:8443", &format!("127.0.0.1:{gw}"))
                .replace("127.0.0.1:9100", &format!("127.0.0.1:{admin}"))
                .replace("127.0.0.1:9443", &format!("127.0.0.1:{mock}"))
                .replace(
                    "https://localhost:9443/",
                    &format!("https://localhost:{mock}/"),
                );
        }
        std::fs::write(config_dir.join(name), text).expect("write");
    }
    config_dir.join("gateway.toml")
}

/// The audit trail's files (`*.jsonl`) in `dir`, by name.
pub fn audit_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("audit dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    files
}
