//! Configuration: the TOML file an operator writes, read in two phases — raw TOML, then a
//! validated `Config` whose fields cannot be invalid (parsed addresses, durations, resolved
//! paths). Every problem is reported at once with its key and reason; unknown keys are errors.
//! Relative paths are resolved against the directory of the config file.
//! This module reads the file; it never opens certificates or the directory (see `runtime`).

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::audit::{AuditConfig, Durability};
use crate::directory::fhir::FhirSettings;
use crate::directory::ldap::LdapSettings;
use crate::directory::{self, CachePolicy};
use crate::server::Limits;
use crate::ssp::jwt::JwtPolicy;
use crate::tls::{ClientTls, ServerTls, TlsKeys};

/// Default path of the configuration file, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/gateway.toml";

const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9100";
const DEFAULT_MOCK_LISTEN: &str = "127.0.0.1:9443";
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const DEFAULT_POOL_MAX_IDLE_PER_HOST: u64 = 64;
const DEFAULT_CONNECT_RETRIES: u64 = 1;
const DEFAULT_CONNECT_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// The longest backoff before a connect retry (a retry is for a blip, not an outage).
const MAX_CONNECT_RETRY_BACKOFF: Duration = Duration::from_secs(10);
const DEFAULT_JWT_CLOCK_SKEW: Duration = Duration::from_secs(60);
const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
const DEFAULT_MAX_CONFIG_BYTES: u64 = 1024 * 1024;
const DEFAULT_RELOAD_POLL: Duration = Duration::from_secs(5);
const DEFAULT_AUDIT_DIR: &str = "audit";
const DEFAULT_AUDIT_FSYNC_INTERVAL: Duration = Duration::from_millis(100);
const DEFAULT_AUDIT_MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
const DEFAULT_AUDIT_QUEUE_CAPACITY: u64 = 65_536;
const DEFAULT_AUDIT_QUEUE_MAX_BYTES: u64 = 128 << 20;
const DEFAULT_DIRECTORY_QUERIES_PER_SECOND: u64 = 20;
const DEFAULT_DIRECTORY_QUERY_BURST: u64 = 200;
const DEFAULT_REFUSALS_PER_SECOND: u64 = 20;
const DEFAULT_REFUSAL_BURST: u64 = 100;
const DEFAULT_AUDIT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_AUDIT_RETRY_INTERVAL: Duration = Duration::from_secs(1);
const MAX_GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(10);
const DEFAULT_AUDIT_FSYNC_FOLLOW_UP: Duration = Duration::from_millis(10);
const MAX_AUDIT_FSYNC_FOLLOW_UP: Duration = Duration::from_secs(1);
const DEFAULT_TRACING_SERVICE_NAME: &str = "ssp-gateway";
const DEFAULT_TRACING_QUEUE_CAPACITY: u64 = 4096;
const DEFAULT_TRACING_MAX_BATCH: u64 = 512;
const DEFAULT_TRACING_BATCH_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_TRACING_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The keys naming the files of `[listener]`'s TLS, for the problems found with them.
pub const LISTENER_TLS_KEYS: TlsKeys = TlsKeys {
    cert: "listener.cert",
    key: "listener.key",
    ca: "listener.client_ca",
    crls: "listener.crls",
};
/// Likewise `[upstream]`'s.
pub const UPSTREAM_TLS_KEYS: TlsKeys = TlsKeys {
    cert: "upstream.cert",
    key: "upstream.key",
    ca: "upstream.ca",
    crls: "upstream.crls",
};
/// Likewise `[mock_provider]`'s.
pub const MOCK_PROVIDER_TLS_KEYS: TlsKeys = TlsKeys {
    cert: "mock_provider.cert",
    key: "mock_provider.key",
    ca: "mock_provider.client_ca",
    crls: "mock_provider.crls",
};
/// Likewise those of an `ldaps://` directory backend.
pub const LDAP_TLS_KEYS: TlsKeys = TlsKeys {
    cert: "directory.ldap_cert",
    key: "directory.ldap_key",
    ca: "directory.ldap_ca",
    crls: "directory.ldap_crls",
};

/// The dotted keys whose values differ between the tables `old` and `new` (a key in one only
/// included), under `prefix`, in order: what an operator changed in the file.
pub fn keys_changed(old: &toml::Table, new: &toml::Table, prefix: &str) -> Vec<String> {
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut changed = Vec::new();
    for key in keys {
        let dotted = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (old.get(key), new.get(key)) {
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                changed.extend(keys_changed(a, b, &dotted));
            }
            (a, b) if a != b => changed.push(dotted),
            _ => {}
        }
    }
    changed
}

/// The validated configuration of one gateway process.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from (for messages).
    pub source: PathBuf,
    /// The file's TOML as read, to name the keys a reload cannot apply ([`keys_changed`]).
    pub raw: toml::Table,
    pub listener: ListenerConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub policy: PolicyConfig,
    pub directory: DirectoryConfig,
    pub log: LogConfig,
    pub audit: AuditConfig,
    pub tracing: TracingConfig,
    pub shutdown: ShutdownConfig,
    pub reload: ReloadConfig,
    pub rate_limit: RateLimitConfig,
    pub circuit_breaker: crate::breaker::BreakerPolicy,
    pub dev: DevConfig,
    /// `None` when the embedded mock provider is disabled.
    pub mock_provider: Option<MockProviderConfig>,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub tls: ServerTls,
    pub http2: bool,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub limits: Limits,
}

/// Per-consumer rate limits and global load shedding.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// `None`: no per-consumer limit.
    pub per_consumer: Option<crate::ratelimit::RateLimitPolicy>,
    /// Requests being processed at once across the gateway before new ones get 503.
    pub max_in_flight: usize,
    /// Requests per client certificate that need a directory query (an ASID they name is not
    /// cached), before anything shows the certificate is registered, with the same
    /// `reject_delay` and `max_tracked` as the per-consumer limits; `None`: unbounded.
    pub directory_queries: Option<crate::ratelimit::RateLimitPolicy>,
    /// The gateway's own 4xx refusals per client certificate answered at once; past it each
    /// is held `reject_delay` (as a 429 is), so a flood of refusals (malformed headers, an
    /// unregistered certificate) cannot take the CPU other consumers need; `None`: no bound.
    pub refusals: Option<crate::ratelimit::RateLimitPolicy>,
}

/// How often watched files are checked for changes (TLS material; SIGHUP reloads at once).
#[derive(Debug, Clone)]
pub struct ReloadConfig {
    pub watch_files: bool,
    pub poll_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub address: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub tls: ClientTls,
    /// Optional cap on a request body forwarded to a provider (`None`: no cap, as the SSP
    /// must not restrict payload size).
    pub max_request_body: Option<u64>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// The longest wait for the next bytes of a provider's response body; past it the response
    /// is cut off (the consumer sees it broken off) and the provider's connection closed.
    pub body_idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// How many times a request is sent again after its connection to the provider could not
    /// be made (TCP or TLS connect failed or timed out: nothing was sent). 0: never.
    pub connect_retries: u32,
    /// The wait before the first connect retry; it doubles for each one after.
    pub connect_retry_backoff: Duration,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub interactions_file: PathBuf,
    pub jwt: JwtPolicy,
    pub jwt_clock_skew: Duration,
    /// `None`: sharing agreements are not checked. `Some(pairs)`: only these sender/receiver
    /// ASID pairs may talk.
    pub sharing_agreements: Option<BTreeSet<(String, String)>>,
    /// The web origins whose pages may call the gateway through a browser (CORS).
    pub cors_allowed_origins: crate::cors::AllowedOrigins,
}

#[derive(Debug, Clone)]
pub struct DirectoryConfig {
    pub backend: DirectoryBackendConfig,
    pub cache: CachePolicy,
}

#[derive(Debug, Clone)]
pub enum DirectoryBackendConfig {
    /// An LDIF file in the SDS schema, reloaded on SIGHUP and (unless `poll_interval` is
    /// `None`) when its modification time or size changes.
    Ldif {
        file: PathBuf,
        poll_interval: Option<Duration>,
    },
    /// An SDS-shaped LDAP server.
    Ldap(LdapSettings),
    /// The SDS FHIR API.
    Fhir(FhirSettings),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `info` or `ssp_gateway=debug,info`.
    pub level: String,
}

/// `[tracing]`: OpenTelemetry span export (OTLP/HTTP, JSON encoding).
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// Base URL of an OTLP/HTTP collector (`http://host:4318`); spans go to
    /// `{endpoint}/v1/traces`. `None`: no export (the default).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Spans waiting for export, at most; past it new spans are dropped (and counted).
    pub queue_capacity: usize,
    /// Spans per export request, at most.
    pub max_batch: usize,
    /// How long a span may wait for a batch to fill.
    pub batch_interval: Duration,
    /// One export request's time limit.
    pub export_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    pub grace_period: Duration,
}

#[derive(Debug, Clone)]
pub struct DevConfig {
    /// Generate the development PKI into `certs_dir` at start when it is missing.
    pub generate_certs: bool,
    pub certs_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct MockProviderConfig {
    pub address: SocketAddr,
    pub tls: ServerTls,
    /// Certificate names (DNS SAN or CN) the mock accepts as its caller: the gateway's.
    pub allowed_clients: Vec<String>,
    pub asid: String,
    pub ods_code: String,
    /// The endpoint URL registered for the provider, e.g.
    /// `https://localhost:9443/B82617/STU3/1/gpconnect`.
    pub base_url: String,
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `upstream.connect_timeout`; empty for whole-file problems.
    pub key: String,
    pub reason: String,
}

/// Every problem found in one configuration file.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub source: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} problem{}",
            self.source.display(),
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            if p.key.is_empty() {
                write!(f, "\n  - {}", p.reason)?;
            } else {
                write!(f, "\n  - {}: {}", p.key, p.reason)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let fail = |reason: String| ConfigErrors {
            source: path.to_path_buf(),
            problems: vec![Problem {
                key: String::new(),
                reason,
            }],
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        if meta.len() > DEFAULT_MAX_CONFIG_BYTES {
            return Err(fail(format!(
                "file is {} bytes; a configuration file is at most {DEFAULT_MAX_CONFIG_BYTES}",
                meta.len()
            )));
        }
        let text =
            crate::files::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Config::parse(&text, path, &base)
    }

    /// Validates configuration text; relative paths are resolved against `base_dir`.
    pub fn parse(text: &str, source: &Path, base_dir: &Path) -> Result<Config, ConfigErrors> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigErrors {
            source: source.to_path_buf(),
            problems: vec![Problem {
                key: String::new(),
                reason: format!("not valid TOML: {}", e.to_string().trim_end()),
            }],
        })?;
        let mut problems = Vec::new();
        let config = {
            let mut root = Section::root(&table, base_dir, &mut problems);
            let config = build(&mut root);
            root.finish();
            config
        };
        if problems.is_empty() {
            Ok(Config {
                source: source.to_path_buf(),
                raw: table,
                ..config
            })
        } else {
            Err(ConfigErrors {
                source: source.to_path_buf(),
                problems,
            })
        }
    }
}

fn build(root: &mut Section<'_, '_>) -> Config {
    let mut s = root.section("listener");
    let listener = ListenerConfig {
        address: s.addr("address", DEFAULT_LISTEN),
        tls: ServerTls {
            cert: s.path("cert"),
            key: s.path("key"),
            client_ca: s.path("client_ca"),
            crls: s.paths("crls"),
        },
        http2: s.bool("http2", true),
        handshake_timeout: s.duration("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT),
        header_read_timeout: s.duration("header_read_timeout", DEFAULT_HEADER_READ_TIMEOUT),
        limits: listener_limits(&mut s),
    };
    s.finish();

    let mut s = root.section("admin");
    let admin = AdminConfig {
        address: s.addr("address", DEFAULT_ADMIN_LISTEN),
    };
    if same_socket(admin.address, listener.address) {
        s.problem("address", "is the listener's address too".into());
    }
    s.finish();

    let mut s = root.section("upstream");
    let upstream = UpstreamConfig {
        tls: ClientTls {
            cert: s.path("cert"),
            key: s.path("key"),
            ca: s.path("ca"),
            crls: s.paths("crls"),
        },
        connect_timeout: s.duration("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        response_timeout: s.duration("response_timeout", DEFAULT_RESPONSE_TIMEOUT),
        body_idle_timeout: s.duration("body_idle_timeout", DEFAULT_BODY_IDLE_TIMEOUT),
        pool_idle_timeout: s.duration("pool_idle_timeout", DEFAULT_POOL_IDLE_TIMEOUT),
        max_request_body: match s.uint("max_request_body_bytes", 0, 0, u64::MAX / 2) {
            0 => None,
            n => Some(n),
        },
        pool_max_idle_per_host: s.uint(
            "pool_max_idle_per_host",
            DEFAULT_POOL_MAX_IDLE_PER_HOST,
            0,
            100_000,
        ) as usize,
        connect_retries: s.uint("connect_retries", DEFAULT_CONNECT_RETRIES, 0, 5) as u32,
        connect_retry_backoff: duration_or_zero(
            &mut s,
            "connect_retry_backoff",
            DEFAULT_CONNECT_RETRY_BACKOFF,
        ),
    };
    if upstream.connect_retry_backoff > MAX_CONNECT_RETRY_BACKOFF {
        s.problem(
            "connect_retry_backoff",
            format!("must be at most {MAX_CONNECT_RETRY_BACKOFF:?}"),
        );
    }
    s.finish();

    let mut s = root.section("policy");
    let jwt = match s.string("jwt", Some("enforce")).as_str() {
        "enforce" => JwtPolicy::Enforce,
        "log" => JwtPolicy::Log,
        "off" => JwtPolicy::Off,
        other => {
            s.problem("jwt", format!("`{other}` is not one of enforce, log, off"));
            JwtPolicy::Enforce
        }
    };
    let policy = PolicyConfig {
        interactions_file: s.path("interactions"),
        jwt,
        jwt_clock_skew: s.duration("jwt_clock_skew", DEFAULT_JWT_CLOCK_SKEW),
        sharing_agreements: sharing_agreements(&mut s),
        cors_allowed_origins: cors_allowed_origins(&mut s),
    };
    s.finish();

    let mut s = root.section("directory");
    let directory = directory_config(&mut s);
    s.finish();

    let mut s = root.section("log");
    let format = match s.string("format", Some("pretty")).as_str() {
        "pretty" => LogFormat::Pretty,
        "json" => LogFormat::Json,
        other => {
            s.problem("format", format!("`{other}` is not one of pretty, json"));
            LogFormat::Pretty
        }
    };
    let level = s.string("level", Some("info"));
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&level) {
        s.problem("level", format!("not a valid log filter: {e}"));
    } else if let Some(word) = level
        .split(',')
        .map(str::trim)
        .find(|d| !d.contains(['=', '[']) && !LOG_LEVELS.contains(&d.to_ascii_lowercase().as_str()))
    {
        // The filter would read a bare word as a target at TRACE: `warning` or a blank would
        // silently turn every other log line, errors included, off.
        s.problem(
            "level",
            format!(
                "`{word}` is neither a level ({}) nor target=level",
                LOG_LEVELS.join(", ")
            ),
        );
    }
    let log = LogConfig { format, level };
    s.finish();

    let mut s = root.section("audit");
    let durability = match s.string("durability", Some("fsync")).as_str() {
        "fsync" => {
            // Unused under fsync, but still a duration: the setting a switch to `buffered`
            // would use must not hide a mistake until then.
            s.duration("fsync_interval", DEFAULT_AUDIT_FSYNC_INTERVAL);
            Durability::Fsync
        }
        "buffered" => Durability::Buffered {
            interval: s.duration("fsync_interval", DEFAULT_AUDIT_FSYNC_INTERVAL),
        },
        other => {
            s.problem(
                "durability",
                format!("`{other}` is not one of fsync, buffered"),
            );
            // Still checked, and not reported as an unknown key besides: one mistake, one
            // problem.
            s.duration("fsync_interval", DEFAULT_AUDIT_FSYNC_INTERVAL);
            Durability::Fsync
        }
    };
    let audit = AuditConfig {
        dir: s
            .optional_path("dir")
            .unwrap_or_else(|| s.resolve(DEFAULT_AUDIT_DIR)),
        durability,
        max_file_bytes: s.uint(
            "max_file_bytes",
            DEFAULT_AUDIT_MAX_FILE_BYTES,
            4096,
            1 << 40,
        ),
        queue_capacity: s.uint(
            "queue_capacity",
            DEFAULT_AUDIT_QUEUE_CAPACITY,
            1,
            10_000_000,
        ) as usize,
        queue_max_bytes: s.uint(
            "queue_max_bytes",
            DEFAULT_AUDIT_QUEUE_MAX_BYTES,
            1 << 20,
            1 << 36,
        ) as usize,
        write_timeout: s.duration("write_timeout", DEFAULT_AUDIT_WRITE_TIMEOUT),
        retry_interval: s.duration("retry_interval", DEFAULT_AUDIT_RETRY_INTERVAL),
        group_commit_window: duration_or_zero(&mut s, "group_commit_window", Duration::ZERO),
        fsync_follow_up: duration_or_zero(&mut s, "fsync_follow_up", DEFAULT_AUDIT_FSYNC_FOLLOW_UP),
        key_file: s.optional_path("key_file"),
    };
    if let Some(key_file) = &audit.key_file {
        // Its bytes are read where the other keys are (`check-config`, and the writer at
        // start: the development key is made with the development certificates).
        if crate::audit::key::inside_dir(key_file, &audit.dir) {
            s.problem(
                "key_file",
                format!(
                    "{} is inside the audit directory {}: whoever can write the trail could \
                     replace the key; keep it elsewhere, readable by the gateway alone",
                    key_file.display(),
                    audit.dir.display()
                ),
            );
        }
    }
    if audit.group_commit_window > MAX_GROUP_COMMIT_WINDOW {
        s.problem("group_commit_window", "must be at most 10ms".into());
    }
    if audit.fsync_follow_up > MAX_AUDIT_FSYNC_FOLLOW_UP {
        s.problem("fsync_follow_up", "must be at most 1s".into());
    }
    s.finish();

    let mut s = root.section("tracing");
    let endpoint = s.string("otlp_endpoint", Some(""));
    let otlp_endpoint = if endpoint.is_empty() {
        None
    } else {
        if !has_host(&endpoint, &["http://"])
            || endpoint.contains(['?', '#'])
            || endpoint.parse::<http::Uri>().is_err()
        {
            s.problem(
                "otlp_endpoint",
                format!("`{endpoint}` is not an http://host:port URL of an OTLP/HTTP collector"),
            );
        }
        Some(endpoint.trim_end_matches('/').to_owned())
    };
    let tracing = TracingConfig {
        otlp_endpoint,
        service_name: s.string("service_name", Some(DEFAULT_TRACING_SERVICE_NAME)),
        queue_capacity: s.uint(
            "queue_capacity",
            DEFAULT_TRACING_QUEUE_CAPACITY,
            1,
            1_000_000,
        ) as usize,
        max_batch: s.uint("max_batch", DEFAULT_TRACING_MAX_BATCH, 1, 100_000) as usize,
        batch_interval: s.duration("batch_interval", DEFAULT_TRACING_BATCH_INTERVAL),
        export_timeout: s.duration("export_timeout", DEFAULT_TRACING_EXPORT_TIMEOUT),
    };
    s.finish();

    let mut s = root.section("shutdown");
    let shutdown = ShutdownConfig {
        grace_period: s.duration("grace_period", DEFAULT_GRACE_PERIOD),
    };
    s.finish();

    let mut s = root.section("rate_limit");
    let rate_limit = rate_limit_config(&mut s);
    s.finish();

    let mut s = root.section("circuit_breaker");
    let b = crate::breaker::BreakerPolicy::default();
    let circuit_breaker = crate::breaker::BreakerPolicy {
        failure_threshold: s.uint("failure_threshold", u64::from(b.failure_threshold), 1, 1000)
            as u32,
        cool_down: s.duration("cool_down", b.cool_down),
        max_hosts: s.uint("max_hosts", b.max_hosts as u64, 1, 1_000_000) as usize,
    };
    s.finish();

    let mut s = root.section("reload");
    let reload = ReloadConfig {
        watch_files: s.bool("watch_files", true),
        poll_interval: s.duration("poll_interval", DEFAULT_RELOAD_POLL),
    };
    if reload.poll_interval < MIN_POLL_INTERVAL {
        s.problem("poll_interval", too_often());
    }
    s.finish();

    let mut s = root.section("dev");
    let dev = DevConfig {
        generate_certs: s.bool("generate_certs", false),
        certs_dir: s.optional_path("certs_dir").unwrap_or_default(),
    };
    if dev.generate_certs && dev.certs_dir.as_os_str().is_empty() {
        s.problem("certs_dir", "required when generate_certs = true".into());
    }
    s.finish();

    let mut s = root.section("mock_provider");
    let mock_provider = if s.bool("enabled", false) {
        let m = MockProviderConfig {
            address: s.addr("address", DEFAULT_MOCK_LISTEN),
            tls: ServerTls {
                cert: s.path("cert"),
                key: s.path("key"),
                client_ca: s.path("client_ca"),
                crls: s.paths("crls"),
            },
            allowed_clients: s.strings("allowed_clients"),
            asid: s.string("asid", None),
            ods_code: s.string("ods_code", None),
            base_url: s.string("base_url", None),
        };
        if m.allowed_clients.is_empty() {
            s.problem(
                "allowed_clients",
                "must name at least one client certificate name".into(),
            );
        }
        if m.asid.is_empty() || !m.asid.bytes().all(|b| b.is_ascii_digit()) {
            s.problem("asid", "an ASID is one or more digits".into());
        }
        if m.ods_code.is_empty() {
            s.problem("ods_code", "must not be empty".into());
        }
        for (other, name) in [(listener.address, "listener"), (admin.address, "admin")] {
            if same_socket(m.address, other) {
                s.problem("address", format!("is the {name}'s address too"));
            }
        }
        match m.base_url.strip_prefix("https://") {
            Some(rest)
                if rest.contains('/')
                    && !m.base_url.ends_with('/')
                    && has_host(&m.base_url, &["https://"]) => {}
            _ => s.problem(
                "base_url",
                "must be an https:// URL with a path and no trailing `/`".into(),
            ),
        }
        Some(m)
    } else {
        s.ignore_rest();
        None
    };
    s.finish();

    Config {
        source: PathBuf::new(),
        raw: toml::Table::new(),
        listener,
        admin,
        upstream,
        policy,
        directory,
        log,
        audit,
        tracing,
        shutdown,
        reload,
        rate_limit,
        circuit_breaker,
        dev,
        mock_provider,
    }
}

fn rate_limit_config(s: &mut Section<'_, '_>) -> RateLimitConfig {
    use crate::ratelimit::{Limit, RateLimitPolicy};
    let d = RateLimitPolicy::default();
    let enabled = s.bool("enabled", true);
    let requests = s.uint(
        "requests_per_second",
        u64::from(d.default.requests),
        1,
        10_000_000,
    ) as u32;
    let burst = s.uint("burst", u64::from(d.default.burst), 1, 10_000_000) as u32;
    let max_tracked = s.uint("max_tracked", d.max_tracked as u64, 1, 100_000_000) as usize;
    let reject_delay = duration_or_zero(s, "reject_delay", d.reject_delay);
    if reject_delay > Duration::from_secs(10) {
        s.problem("reject_delay", "must be at most 10s".into());
    }
    let max_in_flight = s.uint(
        "max_in_flight",
        crate::ratelimit::DEFAULT_MAX_IN_FLIGHT as u64,
        1,
        10_000_000,
    ) as usize;
    let mut overrides = std::collections::BTreeMap::new();
    match s.take("overrides") {
        None => {}
        Some(toml::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let parsed = item.as_table().and_then(|t| {
                    let asid = t.get("asid")?.as_str()?;
                    let rps = u32::try_from(t.get("requests_per_second")?.as_integer()?).ok()?;
                    let burst = u32::try_from(t.get("burst")?.as_integer()?).ok()?;
                    (t.len() == 3 && is_asid(asid) && rps > 0 && burst > 0)
                        .then(|| (asid.to_string(), Limit::per_second(rps, burst)))
                });
                match parsed {
                    Some((asid, limit)) => {
                        if overrides.insert(asid.clone(), limit).is_some() {
                            // Which of two limits was meant cannot be guessed.
                            s.problem(
                                &format!("overrides[{i}]"),
                                format!("a second override for ASID {asid}"),
                            );
                        }
                    }
                    None => s.problem(
                        &format!("overrides[{i}]"),
                        "must be { asid = \"<digits>\", requests_per_second = N, burst = N } with N > 0"
                            .into(),
                    ),
                }
            }
        }
        Some(_) => s.problem("overrides", "must be an array of tables".into()),
    }
    let directory_rate = s.uint(
        "directory_queries_per_second",
        DEFAULT_DIRECTORY_QUERIES_PER_SECOND,
        0,
        10_000_000,
    ) as u32;
    let directory_burst = s.uint(
        "directory_query_burst",
        DEFAULT_DIRECTORY_QUERY_BURST,
        1,
        10_000_000,
    ) as u32;
    let refusal_rate = s.uint(
        "refusals_per_second",
        DEFAULT_REFUSALS_PER_SECOND,
        0,
        10_000_000,
    ) as u32;
    let refusal_burst = s.uint("refusal_burst", DEFAULT_REFUSAL_BURST, 1, 10_000_000) as u32;
    RateLimitConfig {
        refusals: (refusal_rate > 0).then(|| RateLimitPolicy {
            default: Limit::per_second(refusal_rate, refusal_burst),
            overrides: Default::default(),
            max_tracked,
            reject_delay,
        }),
        per_consumer: enabled.then(|| RateLimitPolicy {
            default: Limit::per_second(requests, burst),
            overrides,
            max_tracked,
            reject_delay,
        }),
        max_in_flight,
        directory_queries: (directory_rate > 0).then(|| RateLimitPolicy {
            default: Limit::per_second(directory_rate, directory_burst),
            overrides: Default::default(),
            max_tracked,
            reject_delay,
        }),
    }
}

fn listener_limits(s: &mut Section<'_, '_>) -> Limits {
    let d = Limits::default();
    let mut uint = |key: &str, default: usize, min: u64, max: u64| {
        s.uint(key, default as u64, min, max) as usize
    };
    let max_connections = uint("max_connections", d.max_connections, 1, 10_000_000);
    let max_connections_per_certificate = uint(
        "max_connections_per_certificate",
        d.max_connections_per_certificate,
        1,
        10_000_000,
    );
    let max_header_bytes = uint(
        "max_header_bytes",
        d.max_header_bytes,
        1024,
        16 * 1024 * 1024,
    );
    let max_headers = uint("max_headers", d.max_headers, 8, 10_000);
    let h2_max_concurrent_streams = uint(
        "http2_max_concurrent_streams",
        d.h2_max_concurrent_streams as usize,
        1,
        100_000,
    ) as u32;
    let h2_max_pending_reset_streams = uint(
        "http2_max_pending_reset_streams",
        d.h2_max_pending_reset_streams,
        1,
        100_000,
    );
    Limits {
        max_connections,
        max_connections_per_certificate,
        max_header_bytes,
        max_headers,
        send_timeout: s.duration("send_timeout", d.send_timeout),
        h2_max_concurrent_streams,
        h2_max_pending_reset_streams,
        h2_keep_alive_interval: s.duration("http2_keep_alive_interval", d.h2_keep_alive_interval),
        h2_keep_alive_timeout: s.duration("http2_keep_alive_timeout", d.h2_keep_alive_timeout),
    }
}

/// The keys each directory backend reads; any of them under another backend is a mistake.
const LDIF_KEYS: [&str; 2] = ["ldif_file", "ldif_poll_interval"];
const LDAP_KEYS: [&str; 6] = [
    "ldap_url",
    "ldap_search_base",
    "ldap_cert",
    "ldap_key",
    "ldap_ca",
    "ldap_crls",
];
const FHIR_KEYS: [&str; 4] = [
    "fhir_base_url",
    "fhir_api_key_file",
    "fhir_ca",
    "fhir_asid_ods",
];
const REMOTE_KEYS: [&str; 2] = ["connect_timeout", "query_timeout"];
/// The longest any cache duration may be (keeps instant arithmetic far from overflow).
/// The longest duration any setting takes. Far beyond every sensible value, and short enough
/// that a deadline `now + it` cannot overflow the clock (a `response_timeout` of u64::MAX
/// seconds passed the checks and then panicked every forwarded request).
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

fn directory_config(s: &mut Section<'_, '_>) -> DirectoryConfig {
    let kind = s.string("backend", Some("ldif"));
    let (own, remote): (&[&str], bool) = match kind.as_str() {
        "ldif" => (&LDIF_KEYS, false),
        "ldap" => (&LDAP_KEYS, true),
        "fhir" => (&FHIR_KEYS, true),
        other => {
            s.problem(
                "backend",
                format!("`{other}` is not a directory backend (ldif, ldap, fhir)"),
            );
            s.ignore_rest();
            (&[], false)
        }
    };
    // With no valid backend named, no key can be said not to apply to it.
    let known = !own.is_empty();
    for key in LDIF_KEYS.iter().chain(&LDAP_KEYS).chain(&FHIR_KEYS) {
        if known && !own.contains(key) && s.take(key).is_some() {
            s.problem(key, format!("does not apply to backend = \"{kind}\""));
        }
    }
    if known && !remote {
        for key in REMOTE_KEYS {
            if s.take(key).is_some() {
                s.problem(key, "applies to backend = \"ldap\" or \"fhir\" only".into());
            }
        }
    }
    let backend = match kind.as_str() {
        "ldap" => {
            let url = s.string("ldap_url", None);
            if !url.is_empty() && !has_host(&url, &["ldap://", "ldaps://"]) {
                s.problem(
                    "ldap_url",
                    format!(
                        "`{url}` is not an ldap:// or ldaps:// URL with a host (and a port of 1-65535)"
                    ),
                );
            }
            let search_base = s.string(
                "ldap_search_base",
                Some(directory::ldap::DEFAULT_SEARCH_BASE),
            );
            let tls = if url.starts_with("ldaps://") {
                Some(ClientTls {
                    cert: s.path("ldap_cert"),
                    key: s.path("ldap_key"),
                    ca: s.path("ldap_ca"),
                    crls: s.paths("ldap_crls"),
                })
            } else {
                for key in ["ldap_cert", "ldap_key", "ldap_ca", "ldap_crls"] {
                    if s.take(key).is_some() {
                        s.problem(key, "applies to an ldaps:// ldap_url only".into());
                    }
                }
                None
            };
            DirectoryBackendConfig::Ldap(LdapSettings {
                url,
                search_base,
                tls,
                connect_timeout: s
                    .duration("connect_timeout", directory::ldap::DEFAULT_CONNECT_TIMEOUT),
                query_timeout: s.duration("query_timeout", directory::ldap::DEFAULT_QUERY_TIMEOUT),
            })
        }
        "fhir" => {
            let base_url = s.string("fhir_base_url", None);
            let https = base_url.starts_with("https://");
            if !base_url.is_empty() && !has_host(&base_url, &["https://", "http://"]) {
                s.problem(
                    "fhir_base_url",
                    format!(
                        "`{base_url}` is not an https:// URL with a host (and a port of 1-65535)"
                    ),
                );
            } else if base_url.contains(['?', '#']) {
                s.problem(
                    "fhir_base_url",
                    format!(
                        "`{base_url}` has a query or a fragment: the base URL is the API's path \
                         only (`/Device?…` is appended to it)"
                    ),
                );
            }
            let api_key_file = s.path("fhir_api_key_file");
            let ca = if https {
                Some(s.path("fhir_ca"))
            } else {
                s.optional_path("fhir_ca")
            };
            DirectoryBackendConfig::Fhir(FhirSettings {
                base_url,
                api_key_file,
                ca,
                asid_ods: asid_ods(s),
                connect_timeout: s
                    .duration("connect_timeout", directory::fhir::DEFAULT_CONNECT_TIMEOUT),
                query_timeout: s.duration("query_timeout", directory::fhir::DEFAULT_QUERY_TIMEOUT),
            })
        }
        _ => DirectoryBackendConfig::Ldif {
            file: if kind == "ldif" {
                s.path("ldif_file")
            } else {
                PathBuf::new()
            },
            poll_interval: if kind == "ldif" {
                ldif_poll_interval(s)
            } else {
                None
            },
        },
    };
    let defaults = CachePolicy::default();
    let cache = CachePolicy {
        ttl: s.duration("cache_ttl", defaults.ttl),
        negative_ttl: s.duration("negative_cache_ttl", defaults.negative_ttl),
        capacity: s.uint("cache_capacity", defaults.capacity, 1, 100_000_000),
        max_stale: duration_or_zero(s, "max_stale", defaults.max_stale),
        stale_retry: duration_or_zero(s, "stale_retry", defaults.stale_retry),
    };
    DirectoryConfig { backend, cache }
}

/// Two listening addresses that cannot both be bound: the same port (not 0, which picks a free
/// one) on the same address, or on any address where one of them is the wildcard.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// What `level` may say without `=`.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// The shortest file-polling interval: checking more often keeps an idle gateway busy (a
/// nanosecond interval took 88% of a core).
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

fn too_often() -> String {
    format!(
        "must be at least {}",
        humantime::format_duration(MIN_POLL_INTERVAL)
    )
}

/// `ldif_poll_interval`: a duration, or "off" for SIGHUP only.
fn ldif_poll_interval(s: &mut Section<'_, '_>) -> Option<Duration> {
    match s.take("ldif_poll_interval") {
        Some(toml::Value::String(v)) if v == "off" => None,
        Some(_) => {
            // Let the shared parser report a bad value; it reads the key again.
            s.used.remove("ldif_poll_interval");
            let every = s.duration(
                "ldif_poll_interval",
                directory::reload::DEFAULT_POLL_INTERVAL,
            );
            if every < MIN_POLL_INTERVAL {
                s.problem("ldif_poll_interval", too_often());
            }
            Some(every)
        }
        None => Some(directory::reload::DEFAULT_POLL_INTERVAL),
    }
}

/// A duration that may be zero ("0s").
fn duration_or_zero(s: &mut Section<'_, '_>, key: &str, default: Duration) -> Duration {
    match s.take(key) {
        Some(toml::Value::String(v)) if humantime::parse_duration(v).is_ok_and(|d| d.is_zero()) => {
            Duration::ZERO
        }
        Some(_) => {
            s.used.remove(key);
            s.duration(key, default)
        }
        None => default,
    }
}

/// `fhir_asid_ods`: a table of ASID = "ODS code".
fn asid_ods(s: &mut Section<'_, '_>) -> std::collections::BTreeMap<String, String> {
    let key = "fhir_asid_ods";
    let mut map = std::collections::BTreeMap::new();
    match s.take(key) {
        None => s.problem(
            key,
            "required: the ODS code of every ASID the gateway serves, e.g. { \"918999198993\" = \"B82617\" }".into(),
        ),
        Some(toml::Value::Table(t)) => {
            for (asid, ods) in t {
                match ods.as_str() {
                    Some(ods) if is_asid(asid) && is_ods_code(ods) => {
                        map.insert(asid.clone(), ods.to_string());
                    }
                    _ => s.problem(
                        &format!("{key}.{asid}"),
                        "must be \"<ASID digits>\" = \"<ODS code>\"".into(),
                    ),
                }
            }
        }
        Some(_) => s.problem(key, "must be a table of ASID = \"ODS code\"".into()),
    }
    map
}

/// ODS codes: 3 to 10 ASCII letters and digits.
fn is_ods_code(s: &str) -> bool {
    (3..=10).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn sharing_agreements(s: &mut Section<'_, '_>) -> Option<BTreeSet<(String, String)>> {
    let enabled = s.bool("sharing_agreements_enforced", false);
    let key = "sharing_agreements";
    let mut pairs = BTreeSet::new();
    match s.take(key) {
        None => {}
        Some(toml::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let pair = item.as_table().and_then(|t| {
                    let from = t.get("from")?.as_str()?;
                    let to = t.get("to")?.as_str()?;
                    (t.len() == 2).then(|| (from.to_string(), to.to_string()))
                });
                match pair {
                    Some((from, to)) if is_asid(&from) && is_asid(&to) => {
                        pairs.insert((from, to));
                    }
                    _ => s.problem(
                        &format!("{key}[{i}]"),
                        "must be { from = \"<ASID>\", to = \"<ASID>\" } with digit-only ASIDs"
                            .into(),
                    ),
                }
            }
        }
        Some(_) => s.problem(key, "must be an array of { from, to } tables".into()),
    }
    enabled.then_some(pairs)
}

/// `cors_allowed_origins`: origins as browsers send them, or `["*"]`; none when absent.
fn cors_allowed_origins(s: &mut Section<'_, '_>) -> crate::cors::AllowedOrigins {
    let key = "cors_allowed_origins";
    let Some(value) = s.take(key) else {
        return crate::cors::AllowedOrigins::None;
    };
    let entries: Option<Vec<&str>> = value
        .as_array()
        .and_then(|items| items.iter().map(toml::Value::as_str).collect());
    let Some(entries) = entries else {
        s.problem(
            key,
            "must be an array of origins, e.g. [\"https://consumer.example\"], or [\"*\"]".into(),
        );
        return crate::cors::AllowedOrigins::None;
    };
    match crate::cors::AllowedOrigins::parse(&entries) {
        Ok(origins) => origins,
        Err(problems) => {
            for (at, reason) in problems {
                match at {
                    Some(i) => s.problem(&format!("{key}[{i}]"), reason),
                    None => s.problem(key, reason),
                }
            }
            crate::cors::AllowedOrigins::None
        }
    }
}

fn is_asid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_digit())
}

/// A view of one TOML table that hands out typed values, records problems, and reports the
/// keys nobody asked for.
struct Section<'t, 'p> {
    name: String,
    table: Option<&'t toml::Table>,
    used: BTreeSet<String>,
    base_dir: &'t Path,
    problems: &'p mut Vec<Problem>,
    check_unknown: bool,
}

impl<'t, 'p> Section<'t, 'p> {
    fn root(table: &'t toml::Table, base_dir: &'t Path, problems: &'p mut Vec<Problem>) -> Self {
        Section {
            name: String::new(),
            table: Some(table),
            used: BTreeSet::new(),
            base_dir,
            problems,
            check_unknown: true,
        }
    }

    fn key(&self, key: &str) -> String {
        if self.name.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.name)
        }
    }

    fn problem(&mut self, key: &str, reason: String) {
        let key = self.key(key);
        self.problems.push(Problem { key, reason });
    }

    fn take(&mut self, key: &str) -> Option<&'t toml::Value> {
        self.used.insert(key.to_string());
        self.table.and_then(|t| t.get(key))
    }

    /// A sub-section; a missing table is treated as empty (all defaults).
    fn section<'s>(&'s mut self, name: &str) -> Section<'t, 's> {
        let table = match self.take(name) {
            None => None,
            Some(toml::Value::Table(t)) => Some(t),
            Some(_) => {
                self.problem(name, "must be a table ([section])".into());
                None
            }
        };
        Section {
            name: self.key(name),
            table,
            used: BTreeSet::new(),
            base_dir: self.base_dir,
            problems: self.problems,
            check_unknown: true,
        }
    }

    fn ignore_rest(&mut self) {
        self.check_unknown = false;
    }

    fn finish(self) {
        if !self.check_unknown {
            return;
        }
        if let Some(t) = self.table {
            for k in t.keys() {
                if !self.used.contains(k) {
                    let key = if self.name.is_empty() {
                        k.clone()
                    } else {
                        format!("{}.{k}", self.name)
                    };
                    self.problems.push(Problem {
                        key,
                        reason: "unknown key".into(),
                    });
                }
            }
        }
    }

    fn string(&mut self, key: &str, default: Option<&str>) -> String {
        match (self.take(key), default) {
            (Some(toml::Value::String(s)), _) => s.clone(),
            (Some(_), d) => {
                self.problem(key, "must be a string".into());
                d.unwrap_or_default().to_string()
            }
            (None, Some(d)) => d.to_string(),
            (None, None) => {
                self.problem(key, "required".into());
                String::new()
            }
        }
    }

    fn strings(&mut self, key: &str) -> Vec<String> {
        match self.take(key) {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => {
                let out: Vec<String> = items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                if out.len() != items.len() {
                    self.problem(key, "must be an array of strings".into());
                }
                out
            }
            Some(_) => {
                self.problem(key, "must be an array of strings".into());
                Vec::new()
            }
        }
    }

    fn bool(&mut self, key: &str, default: bool) -> bool {
        match self.take(key) {
            None => default,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => {
                self.problem(key, "must be true or false".into());
                default
            }
        }
    }

    fn uint(&mut self, key: &str, default: u64, min: u64, max: u64) -> u64 {
        match self.take(key) {
            None => default,
            Some(toml::Value::Integer(i))
                if (min as i128..=max as i128).contains(&(*i as i128)) =>
            {
                *i as u64
            }
            Some(_) => {
                self.problem(key, format!("must be a whole number from {min} to {max}"));
                default
            }
        }
    }

    fn duration(&mut self, key: &str, default: Duration) -> Duration {
        match self.take(key) {
            None => default,
            Some(toml::Value::String(s)) => match humantime::parse_duration(s) {
                Ok(d) if d > MAX_DURATION => {
                    self.problem(key, format!("`{s}` is longer than 30 days"));
                    default
                }
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    self.problem(key, "must be longer than zero".into());
                    default
                }
                Err(e) => {
                    self.problem(
                        key,
                        format!("`{s}` is not a duration like \"30s\" or \"5m\": {e}"),
                    );
                    default
                }
            },
            Some(_) => {
                self.problem(key, "must be a duration string like \"30s\"".into());
                default
            }
        }
    }

    fn addr(&mut self, key: &str, default: &str) -> SocketAddr {
        let fallback: SocketAddr = ([127, 0, 0, 1], 0).into();
        let text = self.string(key, Some(default));
        match text.parse() {
            Ok(a) => a,
            Err(_) => {
                self.problem(key, format!("`{text}` is not an IP:port socket address"));
                fallback
            }
        }
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    fn optional_path(&mut self, key: &str) -> Option<PathBuf> {
        match self.take(key) {
            None => None,
            Some(toml::Value::String(s)) if !s.is_empty() => Some(self.resolve(s)),
            Some(_) => {
                self.problem(key, "must be a non-empty path string".into());
                None
            }
        }
    }

    fn path(&mut self, key: &str) -> PathBuf {
        match self.optional_path(key) {
            Some(p) => p,
            None => {
                if !self.problems.iter().any(|p| p.key == self.key(key)) {
                    self.problem(key, "required".into());
                }
                PathBuf::new()
            }
        }
    }

    fn paths(&mut self, key: &str) -> Vec<PathBuf> {
        self.strings(key).iter().map(|p| self.resolve(p)).collect()
    }
}

/// `url` starts with one of `schemes` and names a host, with no userinfo and a port (if any) of
/// 1 to 65535: ldap3 panics on a URL without a host, and a port that does not fit is otherwise
/// read as none, which means the scheme's default port.
fn has_host(url: &str, schemes: &[&str]) -> bool {
    schemes
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme))
        .is_some_and(|rest| {
            let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
            !authority.contains('@') && crate::ssp::envelope::split_authority(authority).is_some()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, Path::new("test.toml"), Path::new("/etc/ssp"))
    }

    const MINIMAL: &str = r#"
[listener]
cert = "gw.pem"
key = "gw-key.pem"
client_ca = "ca.pem"
[upstream]
cert = "c.pem"
key = "c-key.pem"
ca = "ca.pem"
[policy]
interactions = "interactions.toml"
[directory]
ldif_file = "directory.ldif"
"#;

    /// Each TLS key constant names a key the configuration reads where it says: a value of the
    /// wrong type there is reported under exactly that key (not as an unknown key).
    #[test]
    fn tls_keys_name_the_keys_the_configuration_reads() {
        let base = MINIMAL.replace("[directory]\nldif_file = \"directory.ldif\"\n", "");
        let mock = "[mock_provider]\nenabled = true\ncert = \"m.pem\"\nkey = \"m-key.pem\"\n\
                    client_ca = \"ca.pem\"\nallowed_clients = [\"gw\"]\n";
        let ldap = "[directory]\nbackend = \"ldap\"\nldap_url = \"ldaps://sds.example\"\n\
                    ldap_cert = \"l.pem\"\nldap_key = \"l-key.pem\"\nldap_ca = \"ca.pem\"\n";
        let ldif = "[directory]\nldif_file = \"directory.ldif\"\n";
        for (keys, extra) in [
            (LISTENER_TLS_KEYS, ldif),
            (UPSTREAM_TLS_KEYS, ldif),
            (MOCK_PROVIDER_TLS_KEYS, &format!("{ldif}{mock}")),
            (LDAP_TLS_KEYS, ldap),
        ] {
            let text = format!("{base}{extra}");
            for key in [keys.cert, keys.key, keys.ca, keys.crls] {
                let (section, name) = key.split_once('.').expect("section.key");
                // `name = 5` in `section`, in place of its value there if it has one.
                let mut edited = String::new();
                let mut current = "";
                for line in text.lines() {
                    if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                        current = header;
                        edited.push_str(line);
                        edited.push('\n');
                        if current == section {
                            edited.push_str(&format!("{name} = 5\n"));
                        }
                        continue;
                    }
                    if current == section && line.starts_with(&format!("{name} =")) {
                        continue;
                    }
                    edited.push_str(line);
                    edited.push('\n');
                }
                let err = parse(&edited).expect_err(key);
                assert!(
                    err.problems
                        .iter()
                        .any(|p| p.key == key && p.reason != "unknown key"),
                    "{key}: {err}"
                );
            }
        }
    }

    #[test]
    fn shipped_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.mock_provider.is_some());
        assert_eq!(c.listener.address.port(), 8443);
        assert_eq!(c.admin.address.port(), 9100);
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolves_paths() {
        let c = parse(MINIMAL).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listener.address, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(c.listener.tls.cert, PathBuf::from("/etc/ssp/gw.pem"));
        assert_eq!(c.upstream.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert!(c.upstream.tls.crls.is_empty());
        let with_crls = MINIMAL.replace(
            "ca = \"ca.pem\"\n[policy]",
            "ca = \"ca.pem\"\ncrls = [\"p.crl\"]\n[policy]",
        );
        let upstream = parse(&with_crls).unwrap_or_else(|e| panic!("{e}")).upstream;
        assert_eq!(upstream.tls.crls, [PathBuf::from("/etc/ssp/p.crl")]);
        assert_eq!(c.policy.jwt, JwtPolicy::Enforce);
        assert!(c.policy.sharing_agreements.is_none());
        assert!(c.mock_provider.is_none());
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = format!(
            "bogus = 1\n{MINIMAL}\nstray = 2\n[log]\nformat = \"xml\"\ncolour = true\n[shutdown]\ngrace_period = \"soon\"\n"
        )
        .replace("address = ", "x = ");
        let text = text.replace(
            "[upstream]\n",
            "[upstream]\nconnect_timeout = 5\npool_max_idle_per_host = -1\n",
        );
        let err = parse(&text).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "bogus",
            "directory.stray",
            "log.format",
            "log.colour",
            "shutdown.grace_period",
            "upstream.connect_timeout",
            "upstream.pool_max_idle_per_host",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
        let shown = err.to_string();
        assert!(shown.contains("log.colour: unknown key"), "{shown}");
    }

    /// `MINIMAL` with `setting` in `section` (added to it when it is there already).
    fn with_setting(section: &str, setting: &str) -> String {
        let header = format!("[{section}]\n");
        match MINIMAL.contains(&header) {
            true => MINIMAL.replacen(&header, &format!("{header}{setting}\n"), 1),
            false => format!("{MINIMAL}\n{header}{setting}\n"),
        }
    }

    /// No duration may be so long that a deadline `now + it` overflows the clock: a
    /// `response_timeout` of u64::MAX seconds passed these checks and then panicked every
    /// forwarded request.
    #[test]
    fn every_duration_is_at_most_30_days() {
        for (section, key) in [
            ("upstream", "response_timeout"),
            ("upstream", "body_idle_timeout"),
            ("upstream", "connect_timeout"),
            ("listener", "handshake_timeout"),
            ("audit", "write_timeout"),
            ("audit", "fsync_follow_up"),
            ("shutdown", "grace_period"),
        ] {
            let text = with_setting(section, &format!("{key} = \"18446744073709551615s\""));
            let err = parse(&text).expect_err(key);
            let problem = err
                .problems
                .iter()
                .find(|p| p.key == format!("{section}.{key}"))
                .unwrap_or_else(|| panic!("no problem for {section}.{key}: {err:?}"));
            assert!(problem.reason.contains("30 days"), "{problem:?}");
        }
        let c = parse(&with_setting("upstream", "response_timeout = \"30days\""))
            .expect("30 days is allowed");
        assert_eq!(
            c.upstream.response_timeout,
            Duration::from_secs(30 * 24 * 3600)
        );
    }

    #[test]
    fn body_idle_timeout_has_a_default_and_is_never_zero() {
        let c = parse(MINIMAL).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.upstream.body_idle_timeout, DEFAULT_BODY_IDLE_TIMEOUT);
        let c = parse(&with_setting("upstream", "body_idle_timeout = \"2s\""))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.upstream.body_idle_timeout, Duration::from_secs(2));
        for bad in ["\"0s\"", "\"soon\"", "30"] {
            let err = parse(&with_setting(
                "upstream",
                &format!("body_idle_timeout = {bad}"),
            ))
            .expect_err(bad);
            let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
            assert_eq!(keys, ["upstream.body_idle_timeout"], "{bad}");
        }
    }

    #[test]
    fn connect_retries_have_defaults_and_bounds() {
        let c = parse(MINIMAL).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.upstream.connect_retries, 1);
        assert_eq!(
            c.upstream.connect_retry_backoff,
            DEFAULT_CONNECT_RETRY_BACKOFF
        );
        let c = parse(&MINIMAL.replace(
            "[upstream]\n",
            "[upstream]\nconnect_retries = 0\nconnect_retry_backoff = \"0s\"\n",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.upstream.connect_retries, 0);
        assert_eq!(c.upstream.connect_retry_backoff, Duration::ZERO);
        let err = parse(&MINIMAL.replace(
            "[upstream]\n",
            "[upstream]\nconnect_retries = 6\nconnect_retry_backoff = \"1m\"\n",
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["upstream.connect_retries", "upstream.connect_retry_backoff"]
        );
        let err = parse(&MINIMAL.replace(
            "[upstream]\n",
            "[upstream]\nconnect_retry_backoff = \"soon\"\n",
        ))
        .unwrap_err();
        assert_eq!(err.problems[0].key, "upstream.connect_retry_backoff");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let err = parse("").unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "listener.cert",
            "listener.key",
            "listener.client_ca",
            "upstream.cert",
            "policy.interactions",
            "directory.ldif_file",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }

    #[test]
    fn bad_toml_and_bad_values_are_clear() {
        let err = parse("[listener\n").unwrap_err();
        assert!(err.problems[0].reason.starts_with("not valid TOML"));
        let err = parse(&format!("{MINIMAL}\n[admin]\naddress = \"localhost\"\n")).unwrap_err();
        assert_eq!(err.problems[0].key, "admin.address");
        let err = parse(&MINIMAL.replace(
            "[policy]\n",
            "[policy]\njwt = \"maybe\"\nsharing_agreements = [{ from = \"x\", to = \"1\" }]\n",
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["policy.jwt", "policy.sharing_agreements[0]"]);
    }

    #[test]
    fn audit_and_tracing_have_defaults_and_are_validated() {
        let c = parse(MINIMAL).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.audit.dir, PathBuf::from("/etc/ssp/audit"));
        assert_eq!(c.audit.durability, Durability::Fsync);
        assert_eq!(c.audit.max_file_bytes, DEFAULT_AUDIT_MAX_FILE_BYTES);
        assert!(c.tracing.otlp_endpoint.is_none());

        let c = parse(&format!(
            "{MINIMAL}\n[audit]\ndir = \"/var/lib/ssp/audit\"\ndurability = \"buffered\"\nfsync_interval = \"250ms\"\n[tracing]\notlp_endpoint = \"http://127.0.0.1:4318/\"\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.audit.dir, PathBuf::from("/var/lib/ssp/audit"));
        assert_eq!(
            c.audit.durability,
            Durability::Buffered {
                interval: Duration::from_millis(250)
            }
        );
        assert_eq!(
            c.tracing.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4318")
        );

        assert_eq!(
            c.audit.group_commit_window,
            Duration::ZERO,
            "off by default"
        );
        let c = parse(&format!(
            "{MINIMAL}\n[audit]\ngroup_commit_window = \"300us\"\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.audit.group_commit_window, Duration::from_micros(300));
        assert_eq!(
            c.audit.fsync_follow_up,
            Duration::from_millis(10),
            "default"
        );
        let c = parse(&format!("{MINIMAL}\n[audit]\nfsync_follow_up = \"0s\"\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.audit.fsync_follow_up,
            Duration::ZERO,
            "0s: every record synced at once"
        );

        // The chain key: a path, never inside the audit directory (read at start, not here).
        assert_eq!(c.audit.key_file, None, "not keyed by default");
        let c = parse(&format!(
            "{MINIMAL}\n[audit]\nkey_file = \"/etc/ssp/audit-key\"\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.audit.key_file, Some(PathBuf::from("/etc/ssp/audit-key")));
        for inside in [
            "dir = \"/etc/ssp/audit\"\nkey_file = \"/etc/ssp/audit/key\"",
            "key_file = \"/etc/ssp/audit/sub/../key\"",
            "dir = \"/var/a\"\nkey_file = \"/var/b/../a/key\"",
        ] {
            let err = parse(&format!("{MINIMAL}\n[audit]\n{inside}\n")).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{err}");
            assert_eq!(err.problems[0].key, "audit.key_file");
            assert!(
                err.problems[0]
                    .reason
                    .contains("inside the audit directory"),
                "{err}"
            );
        }

        let err = parse(&format!(
            "{MINIMAL}\n[audit]\ndurability = \"sometimes\"\nmax_file_bytes = 10\nrotate = 1\ngroup_commit_window = \"1s\"\nfsync_follow_up = \"2s\"\n[tracing]\notlp_endpoint = \"https://collector\"\n"
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "audit.group_commit_window",
            "audit.fsync_follow_up",
            "audit.durability",
            "audit.max_file_bytes",
            "audit.rotate",
            "tracing.otlp_endpoint",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }

    /// A bare word that is not a level would be read as a target at TRACE, turning every
    /// other log line off; a poll interval under 100ms keeps an idle gateway busy.
    /// The keys a changed file differs in, dotted, nested tables walked, added and removed
    /// keys included.
    #[test]
    fn the_keys_a_file_changed_are_named() {
        let table = |t: &str| t.parse::<toml::Table>().expect("toml");
        let old = table("[listener]\naddress = \"a\"\nhttp2 = true\n[audit]\ndir = \"x\"\n");
        let new = table(
            "[listener]\naddress = \"b\"\nhttp2 = true\nmax_headers = 9\n[log]\nlevel = \"info\"\n",
        );
        assert_eq!(
            keys_changed(&old, &new, ""),
            ["audit", "listener.address", "listener.max_headers", "log"]
        );
        assert!(keys_changed(&old, &old, "").is_empty());
    }

    #[test]
    fn log_levels_and_poll_intervals_are_checked() {
        for ok in [
            "info",
            "WARN",
            "ssp_gateway=debug,info",
            "off",
            "hyper=warn, error",
        ] {
            let c = parse(&format!("{MINIMAL}\n[log]\nlevel = \"{ok}\"\n"));
            assert!(c.is_ok(), "{ok}: {:?}", c.err().map(|e| e.to_string()));
        }
        for bad in ["warning", "", "nan", "inf", "info,verbose"] {
            let err = parse(&format!("{MINIMAL}\n[log]\nlevel = \"{bad}\"\n")).unwrap_err();
            assert!(
                err.problems.iter().any(|p| p.key == "log.level"),
                "{bad}: {err}"
            );
        }
        let err = parse(&format!("{MINIMAL}\n[reload]\npoll_interval = \"1ns\"\n")).unwrap_err();
        assert!(
            err.problems.iter().any(|p| p.key == "reload.poll_interval"),
            "{err}"
        );
        let err = parse(&MINIMAL.replace(
            "ldif_file = \"directory.ldif\"",
            "ldif_file = \"d.ldif\"\nldif_poll_interval = \"99ms\"",
        ))
        .unwrap_err();
        assert!(
            err.problems
                .iter()
                .any(|p| p.key == "directory.ldif_poll_interval"),
            "{err}"
        );
        let c = parse(&format!("{MINIMAL}\n[reload]\npoll_interval = \"100ms\"\n")).expect("100ms");
        assert_eq!(c.reload.poll_interval, Duration::from_millis(100));
    }

    /// Two rate-limit overrides for one ASID: which was meant cannot be guessed (the last had
    /// silently won).
    #[test]
    fn the_directory_query_budget_takes_the_configured_reject_delay_and_max_tracked() {
        let c = parse(&format!(
            "{MINIMAL}\n[rate_limit]\nenabled = false\nreject_delay = \"0s\"\nmax_tracked = 7\n\
             directory_queries_per_second = 3\ndirectory_query_burst = 4\n"
        ))
        .expect("parse");
        assert!(c.rate_limit.per_consumer.is_none());
        let budget = c.rate_limit.directory_queries.expect("budget");
        assert_eq!(budget.default, crate::ratelimit::Limit::per_second(3, 4));
        assert_eq!(
            (budget.reject_delay, budget.max_tracked),
            (Duration::ZERO, 7)
        );
        let off = parse(&format!(
            "{MINIMAL}\n[rate_limit]\ndirectory_queries_per_second = 0\n"
        ))
        .expect("parse");
        assert!(off.rate_limit.directory_queries.is_none());
    }

    #[test]
    fn a_repeated_rate_limit_override_is_refused() {
        let one = "{ asid = \"1\", requests_per_second = 5, burst = 5 }";
        let other = "{ asid = \"1\", requests_per_second = 50, burst = 50 }";
        let err = parse(&format!(
            "{MINIMAL}\n[rate_limit]\noverrides = [{one}, {other}]\n"
        ))
        .unwrap_err();
        assert!(
            err.problems
                .iter()
                .any(|p| p.key == "rate_limit.overrides[1]"),
            "{err}"
        );
        assert!(parse(&format!("{MINIMAL}\n[rate_limit]\noverrides = [{one}]\n")).is_ok());
    }

    /// `stale_retry` is the operator's: how long a failed refresh stands before the backend is
    /// asked again behind the requests served stale ("0s": every stale request asks).
    #[test]
    fn stale_retry_is_read_and_may_be_zero() {
        for (text, expected) in [
            ("250ms", Duration::from_millis(250)),
            ("0s", Duration::ZERO),
        ] {
            let c = parse(&MINIMAL.replace(
                "ldif_file = \"directory.ldif\"",
                &format!("ldif_file = \"directory.ldif\"\nstale_retry = \"{text}\""),
            ))
            .expect("valid");
            assert_eq!(c.directory.cache.stale_retry, expected, "{text}");
        }
    }

    /// A mistyped value is one problem: not also its section's other keys called unknown or out
    /// of place.
    #[test]
    fn a_mistyped_choice_is_one_problem() {
        for (snippet, key) in [
            (
                "[audit]\ndurability = \"fsnyc\"\nfsync_interval = \"100ms\"\n",
                "audit.durability",
            ),
            (
                "[directory]\nbackend = \"ldiff\"\nldif_file = \"d.ldif\"\nquery_timeout = \"2s\"\n",
                "directory.backend",
            ),
        ] {
            let base = if snippet.starts_with("[directory]") {
                MINIMAL.replace("[directory]\nldif_file = \"directory.ldif\"\n", "")
            } else {
                MINIMAL.to_owned()
            };
            let err = parse(&format!("{base}\n{snippet}")).unwrap_err();
            let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
            assert_eq!(keys, [key], "{err}");
        }
    }

    /// `fsync_interval` is checked under `fsync` too, where it is kept for a switch to buffered.
    #[test]
    fn fsync_interval_is_a_duration_whatever_the_durability() {
        for bad in ["true", "[]", "-1", "\"nan\""] {
            let err = parse(&format!(
                "{MINIMAL}\n[audit]\ndurability = \"fsync\"\nfsync_interval = {bad}\n"
            ))
            .unwrap_err();
            assert!(
                err.problems.iter().any(|p| p.key == "audit.fsync_interval"),
                "{bad}: {err}"
            );
        }
        assert!(parse(&format!(
            "{MINIMAL}\n[audit]\ndurability = \"fsync\"\nfsync_interval = \"100ms\"\n"
        ))
        .is_ok());
    }

    /// Addresses that cannot all be bound, and a mock provider with nothing to answer as, are
    /// refused by the configuration rather than by `run`.
    #[test]
    fn clashing_addresses_and_an_empty_mock_identity_are_refused() {
        let listener = MINIMAL.replace("[listener]\n", "[listener]\naddress = \"0.0.0.0:8443\"\n");
        let err = parse(&format!(
            "{listener}\n[admin]\naddress = \"127.0.0.1:8443\"\n"
        ))
        .unwrap_err();
        assert!(
            err.problems.iter().any(|p| p.key == "admin.address"),
            "{err}"
        );
        assert!(parse(&format!(
            "{listener}\n[admin]\naddress = \"127.0.0.1:8444\"\n"
        ))
        .is_ok());
        let mock = |address: &str, asid: &str, ods: &str, base: &str| {
            format!(
                "{listener}\n[mock_provider]\nenabled = true\naddress = \"{address}\"\ncert = \"m.pem\"\nkey = \"m-key.pem\"\nclient_ca = \"ca.pem\"\nallowed_clients = [\"gw\"]\nasid = \"{asid}\"\nods_code = \"{ods}\"\nbase_url = \"{base}\"\n"
            )
        };
        let good = "https://localhost:9443/B82617/STU3/1/gpconnect";
        assert!(parse(&mock("127.0.0.1:9443", "918999198993", "B82617", good)).is_ok());
        for (text, key) in [
            (
                mock("[::1]:8443", "918999198993", "B82617", good),
                "mock_provider.address",
            ),
            (
                mock("127.0.0.1:9100", "918999198993", "B82617", good),
                "mock_provider.address",
            ),
            (
                mock("127.0.0.1:9443", "", "B82617", good),
                "mock_provider.asid",
            ),
            (
                mock("127.0.0.1:9443", "918999198993", "", good),
                "mock_provider.ods_code",
            ),
            (
                mock("127.0.0.1:9443", "918999198993", "B82617", ""),
                "mock_provider.base_url",
            ),
            (
                mock(
                    "127.0.0.1:9443",
                    "918999198993",
                    "B82617",
                    "https://localhost:65536/B82617/gpconnect",
                ),
                "mock_provider.base_url",
            ),
        ] {
            let err = parse(&text).unwrap_err();
            assert!(err.problems.iter().any(|p| p.key == key), "{key}: {err}");
        }
    }

    #[test]
    fn sharing_agreements_parse() {
        let c = parse(&MINIMAL.replace(
            "[policy]\n",
            "[policy]\nsharing_agreements_enforced = true\nsharing_agreements = [{ from = \"1\", to = \"2\" }]\n",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let pairs = c.policy.sharing_agreements.expect("enforced");
        assert!(pairs.contains(&("1".to_string(), "2".to_string())));
    }

    #[test]
    fn cors_allowed_origins_default_to_none_and_bad_entries_are_named() {
        use crate::cors::AllowedOrigins;
        let with = |list: &str| {
            parse(&MINIMAL.replace(
                "[policy]\n",
                &format!("[policy]\ncors_allowed_origins = {list}\n"),
            ))
        };
        let c = parse(MINIMAL).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.policy.cors_allowed_origins, AllowedOrigins::None);
        let c = with("[\"*\"]").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.policy.cors_allowed_origins.is_any());
        let c = with("[\"https://Consumer.example\", \"http://localhost:3000\"]")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(c
            .policy
            .cors_allowed_origins
            .allows(b"https://consumer.example"));

        let err = with("[\"https://ok.example\", \"https://slash.example/\", \"https://a.example/app\", \"null\", 3]")
            .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["policy.cors_allowed_origins"], "{err}");
        let err = with("[\"https://ok.example\", \"https://slash.example/\", \"https://a.example/app\", \"null\"]")
            .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "policy.cors_allowed_origins[1]",
                "policy.cors_allowed_origins[2]",
                "policy.cors_allowed_origins[3]"
            ],
            "{err}"
        );
        assert!(err.to_string().contains("ends with `/`"), "{err}");
        for bad in ["\"https://a.example\"", "[\"*\", \"https://a.example\"]"] {
            let err = with(bad).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{err}");
            assert_eq!(err.problems[0].key, "policy.cors_allowed_origins", "{err}");
        }
    }

    #[test]
    fn directory_backends_read_their_own_keys_and_refuse_the_others() {
        let c = parse(MINIMAL).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            c.directory.backend,
            DirectoryBackendConfig::Ldif { ref file, poll_interval: Some(_) } if file == Path::new("/etc/ssp/directory.ldif")
        ));
        assert_eq!(c.directory.cache, CachePolicy::default());

        let ldap = MINIMAL.replace(
            "ldif_file = \"directory.ldif\"",
            "backend = \"ldap\"\nldap_url = \"ldaps://sds.example:636\"\nldap_cert = \"c.pem\"\nldap_key = \"k.pem\"\nldap_ca = \"ca.pem\"\nldap_crls = [\"sds.crl\"]\nquery_timeout = \"2s\"\nmax_stale = \"0s\"",
        );
        let c = parse(&ldap).unwrap_or_else(|e| panic!("{e}"));
        let DirectoryBackendConfig::Ldap(l) = &c.directory.backend else {
            panic!("ldap expected");
        };
        assert_eq!(l.search_base, "ou=services,o=nhs");
        assert_eq!(l.query_timeout, Duration::from_secs(2));
        assert_eq!(
            l.tls.as_ref().map(|t| t.ca.clone()),
            Some(PathBuf::from("/etc/ssp/ca.pem"))
        );
        assert_eq!(
            l.tls.as_ref().map(|t| t.crls.clone()),
            Some(vec![PathBuf::from("/etc/ssp/sds.crl")])
        );
        assert_eq!(c.directory.cache.max_stale, Duration::ZERO);
        assert_eq!(
            c.directory.cache.stale_retry,
            Duration::from_secs(1),
            "the default"
        );

        let fhir = MINIMAL.replace(
            "ldif_file = \"directory.ldif\"",
            "backend = \"fhir\"\nfhir_base_url = \"https://api.example/R4\"\nfhir_api_key_file = \"key\"\nfhir_ca = \"ca.pem\"\nfhir_asid_ods = { \"918999198993\" = \"B82617\" }",
        );
        let c = parse(&fhir).unwrap_or_else(|e| panic!("{e}"));
        let DirectoryBackendConfig::Fhir(f) = &c.directory.backend else {
            panic!("fhir expected");
        };
        assert_eq!(
            f.asid_ods.get("918999198993").map(String::as_str),
            Some("B82617")
        );

        for bad in [
            "ldap://",
            "ldap:///o=nhs",
            "ldap://?x",
            "ldap://#f",
            "ldap://@",
            "ldaps://",
            "ldap://:389",
            "ldap://127.0.0.1:99999",
            "ldap://u@sds.example",
            "http://sds.example",
        ] {
            let err = parse(&MINIMAL.replace(
                "ldif_file = \"directory.ldif\"",
                &format!("backend = \"ldap\"\nldap_url = \"{bad}\""),
            ))
            .unwrap_err();
            assert!(
                err.problems.iter().any(|p| p.key == "directory.ldap_url"),
                "{bad}: {err}"
            );
        }
        for bad in ["http://127.0.0.1:99999/x", "https://", "https://:443/R4"] {
            let err = parse(&MINIMAL.replace(
                "ldif_file = \"directory.ldif\"",
                &format!("backend = \"fhir\"\nfhir_base_url = \"{bad}\"\nfhir_api_key_file = \"key\"\nfhir_ca = \"ca.pem\""),
            ))
            .unwrap_err();
            assert!(
                err.problems
                    .iter()
                    .any(|p| p.key == "directory.fhir_base_url"),
                "{bad}: {err}"
            );
        }
        for bad in [
            "http://127.0.0.1:99999",
            "http://:4318",
            "http://",
            "http://collector:4318/?x=1",
            "http://collector:4318/#f",
        ] {
            let err = parse(&format!(
                "{MINIMAL}\n[tracing]\notlp_endpoint = \"{bad}\"\n"
            ))
            .unwrap_err();
            assert!(
                err.problems
                    .iter()
                    .any(|p| p.key == "tracing.otlp_endpoint"),
                "{bad}: {err}"
            );
        }

        let err = parse(&MINIMAL.replace(
            "ldif_file = \"directory.ldif\"",
            "ldif_file = \"d.ldif\"\nldap_url = \"ldap://x\"\nquery_timeout = \"1s\"\nmax_stale = \"forever\"\ncache_ttl = \"400days\"\nldif_poll_interval = \"sometimes\"\nstale_retry = \"often\"",
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "directory.ldap_url",
            "directory.query_timeout",
            "directory.max_stale",
            "directory.stale_retry",
            "directory.cache_ttl",
            "directory.ldif_poll_interval",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }

        let err = parse(&MINIMAL.replace(
            "ldif_file = \"directory.ldif\"",
            "backend = \"fhir\"\nfhir_base_url = \"https://api.example/R4\"\nfhir_api_key_file = \"key\"\nfhir_asid_ods = { \"x\" = \"B82617\" }",
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["directory.fhir_ca", "directory.fhir_asid_ods.x"]);

        let off = MINIMAL.replace(
            "ldif_file = \"directory.ldif\"",
            "ldif_file = \"d.ldif\"\nldif_poll_interval = \"off\"",
        );
        let c = parse(&off).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            c.directory.backend,
            DirectoryBackendConfig::Ldif {
                poll_interval: None,
                ..
            }
        ));
    }
}
