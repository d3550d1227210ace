//! ssp-gateway: an mTLS interoperability gateway in the style of the NHS Spine Secure Proxy,
//! for GP Connect 1.2.7. `start` loads a validated `Config`, binds the listeners and returns
//! their addresses (so tests can use port 0); `run` does the same and waits for shutdown.

/// A `&'static str` label for each variant of an enum, from one list of arms: the label
/// method's exhaustive `match` and the constant listing every label (for metrics exposed
/// from 0 at start) are made from the same arms, so no variant is added without its label
/// and no label is left out of the list.
macro_rules! labels {
    (
        $(#[$fn_doc:meta])* $vis:vis fn $method:ident;
        $(#[$all_doc:meta])* const $all:ident;
        { $($pat:pat => $label:literal,)+ }
    ) => {
        $(#[$all_doc])*
        $vis const $all: &'static [&'static str] = &[$($label),+];

        $(#[$fn_doc])*
        $vis fn $method(&self) -> &'static str {
            match self {
                $($pat => $label,)+
            }
        }
    };
}

pub mod admin;
pub mod audit;
pub mod authorise;
pub mod breaker;
pub mod config;
pub mod cors;
pub mod crlwatch;
pub mod directory;
pub mod files;
pub mod forward;
pub mod gateway;
mod h1;
mod h2watch;
mod jsonw;
pub mod loadtest;
pub mod loglimit;
pub mod logwriter;
pub mod memory;
pub mod metrics;
pub mod mock_provider;
pub mod ratelimit;
pub mod reload;
pub mod server;
pub mod ssp;
pub mod telemetry;
#[cfg(test)]
mod tempdir;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, DirectoryBackendConfig, MockProviderConfig};
use crate::directory::ldif::LdifBackend;
use crate::directory::Directory;
use crate::gateway::{Gateway, Policy};
use crate::mock_provider::{MockProvider, MockSettings};
use crate::reload::Reloadable;
use crate::server::ServeOptions;
use crate::ssp::interactions::Catalogue;

/// ALPN protocols the consumer-facing listener offers.
const ALPN_H2_H1: [&[u8]; 2] = [b"h2", b"http/1.1"];
const ALPN_H1: [&[u8]; 1] = [b"http/1.1"];

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Something the configuration points at could not be loaded; every problem is listed.
    #[error("cannot load what the configuration points at:{}", .0.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
    Load(Vec<String>),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("development certificates in {dir}: {source}")]
    DevCerts {
        dir: String,
        source: tls::pki::PkiError,
    },
    #[error("{0}")]
    Audit(#[from] audit::AuditError),
}

/// A started gateway: where it listens, and a handle to wait for it to stop.
pub struct Running {
    pub gateway_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Where the embedded mock provider listens, when enabled.
    pub mock_provider_addr: Option<SocketAddr>,
    /// The gateway's directory (its cache and counters); `None` for the mock provider alone.
    pub directory: Option<Directory>,
    tasks: TaskTracker,
}

impl Running {
    /// Waits until every listener has stopped (after the shutdown token is cancelled and the
    /// grace period has run out or all connections have finished).
    pub async fn wait(self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Everything loaded from the files a configuration points at, before any socket is bound.
pub struct Components {
    pub gateway: Gateway,
    pub server_tls: Arc<Reloadable<tls::ListenerTls>>,
    /// The listener's CRL Numbers so far, so its reloads never go back to an older CRL.
    pub crl_floor: tls::CrlFloor,
    /// The upstream client's (providers' CRLs), likewise.
    pub upstream_crl_floor: tls::CrlFloor,
    pub client_tls: Arc<Reloadable<tls::UpstreamTls>>,
    pub mock_provider: Option<(Arc<MockProvider>, Arc<Reloadable<tls::ListenerTls>>)>,
    /// The LDIF directory backend, for reloading; `None` for the remote backends.
    pub ldif: Option<Arc<LdifBackend>>,
    /// The remote directory's TLS material (`ldaps://`, or the FHIR API's CA bundle), reloaded
    /// like the listener's; `None` for the LDIF backend and `ldap://`.
    pub directory_tls: Option<directory::DirectoryTls>,
    /// The audit writer, started by `start` (it opens the trail).
    pub audit_writer: audit::PendingWriter,
    /// The span exporter, when `[tracing] otlp_endpoint` is set.
    pub span_exporter: Option<telemetry::PendingExporter>,
}

/// Seconds since the Unix epoch (0 for a clock before it): for comparing with certificates'
/// notAfter and CRLs' nextUpdate.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The interaction catalogue and the directory, each problem added to `problems`.
fn load_catalogue_and_directory(
    config: &Config,
    problems: &mut Vec<String>,
) -> (Option<Catalogue>, Option<directory::OpenedBackend>) {
    let catalogue = Catalogue::load(&config.policy.interactions_file)
        .map_err(|e| problems.push(format!("policy.interactions: {e}")))
        .ok();
    // The FHIR backend takes the catalogue's interactions; when the catalogue did not load, the
    // built-in one stands in so directory problems are still reported (nothing is started).
    let builtin;
    let interactions = match &catalogue {
        Some(c) => c,
        None => {
            builtin = Catalogue::builtin();
            &builtin
        }
    };
    let backend = directory::open_backend(&config.directory.backend, interactions)
        .map_err(|e| problems.extend(e))
        .ok();
    (catalogue, backend)
}

/// The audit directory, or the nearest part of its path that exists (it is created when
/// missing), must be a directory; the chain key file, when one is named, must hold a key
/// (`make_dev_key`: unless it is the development key that `run` is about to make beside the
/// development certificates).
fn check_audit_dir(config: &Config, problems: &mut Vec<String>, make_dev_key: bool) {
    let audit_dir = &config.audit.dir;
    if let Some(existing) = audit_dir.ancestors().find(|p| p.symlink_metadata().is_ok()) {
        if !existing.is_dir() {
            problems.push(format!(
                "audit.dir: {} is not a directory",
                existing.display()
            ));
        }
    }
    if let Some(key_file) = &config.audit.key_file {
        let made_later = make_dev_key
            && *key_file == config.dev.certs_dir.join(tls::pki::DEV_AUDIT_KEY)
            && key_file.symlink_metadata().is_err();
        if !made_later {
            if let Err(e) = audit::key::ChainKey::load(key_file) {
                problems.push(format!("audit.key_file: {e}"));
            }
        }
    }
}

/// What `check-config` can check while the development certificates are still to be made
/// (`[dev] generate_certs`): everything but the TLS material and a directory backend that needs
/// it (LDAPS, FHIR).
pub fn check_without_certificates(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let needs_certificates = matches!(
        &config.directory.backend,
        config::DirectoryBackendConfig::Ldap(l) if l.tls.is_some()
    ) || matches!(
        &config.directory.backend,
        config::DirectoryBackendConfig::Fhir(_)
    );
    if needs_certificates {
        if let Err(e) = Catalogue::load(&config.policy.interactions_file) {
            problems.push(format!("policy.interactions: {e}"));
        }
    } else {
        load_catalogue_and_directory(config, &mut problems);
    }
    check_audit_dir(config, &mut problems, true);
    problems
}

/// Loads certificates, the interaction catalogue and the directory, reporting every problem.
pub fn load_components(config: &Config) -> Result<Components, Vec<String>> {
    let mut problems = Vec::new();
    // The CRLs loaded now set the floor no reload may go below.
    let crl_floor = tls::CrlFloor::default();
    let server_tls = tls::listener_tls_above(
        &config.listener.tls,
        &config::LISTENER_TLS_KEYS,
        listener_alpn(config),
        &crl_floor,
    )
    .map_err(|e| problems.extend(lines(e)))
    .ok();
    let upstream_crl_floor = tls::CrlFloor::default();
    let client_tls = tls::upstream_tls_above(
        &config.upstream.tls,
        &config::UPSTREAM_TLS_KEYS,
        &ALPN_H1,
        &upstream_crl_floor,
    )
    .map_err(|e| problems.extend(lines(e)))
    .ok();
    let (catalogue, backend) = load_catalogue_and_directory(config, &mut problems);
    check_audit_dir(config, &mut problems, false);
    let mock_provider = config.mock_provider.as_ref().and_then(|m| {
        mock_provider_tls(m)
            .map_err(|e| problems.extend(lines(e)))
            .ok()
            .map(|tls| {
                let tls = Reloadable::new("mock provider TLS", Arc::new(tls), vec![]);
                (Arc::new(MockProvider::new(mock_settings(m))), tls)
            })
    });
    // `Some(None)`: no limiter configured; `None`: a problem was reported.
    let mut limiter = |policy: &Option<ratelimit::RateLimitPolicy>, key: &str| match policy {
        None => Some(None),
        Some(policy) => ratelimit::RateLimiter::new(policy.clone())
            .map(Some)
            .map_err(|e| problems.push(format!("{key}: {e}")))
            .ok(),
    };
    let directory_budget = limiter(
        &config.rate_limit.directory_queries,
        "rate_limit.directory_queries_per_second",
    );
    let refusal_budget = limiter(
        &config.rate_limit.refusals,
        "rate_limit.refusals_per_second",
    );
    let limiter = limiter(&config.rate_limit.per_consumer, "rate_limit");
    let overload = ratelimit::Overload::new(config.rate_limit.max_in_flight)
        .map_err(|e| problems.push(format!("rate_limit.max_in_flight: {e}")))
        .ok();
    let breakers = breaker::Breakers::new(config.circuit_breaker)
        .map_err(|e| problems.push(format!("circuit_breaker: {e}")))
        .ok();
    match (
        server_tls,
        client_tls,
        catalogue,
        backend,
        limiter,
        directory_budget,
        refusal_budget,
        overload,
        breakers,
    ) {
        (
            Some(server_tls),
            Some(client_tls),
            Some(catalogue),
            Some(backend),
            Some(limiter),
            Some(directory_budget),
            Some(refusal_budget),
            Some(overload),
            Some(breakers),
        ) if problems.is_empty() => {
            let directory = Directory::new(backend.backend, config.directory.cache);
            let server_tls = Reloadable::new(
                "listener TLS",
                Arc::new(server_tls),
                server_tls_files(config),
            );
            let client_tls = Reloadable::new(
                "upstream TLS",
                Arc::new(client_tls),
                client_tls_files(config),
            );
            let metrics = metrics::Metrics::new();
            let (audit, audit_writer) = audit::Audit::prepare(&config.audit, metrics.audit.clone());
            let (tracer, span_exporter) =
                telemetry::Tracer::prepare(&config.tracing, metrics.tracing.clone());
            server_tls.count_in(metrics.reloads.clone());
            client_tls.count_in(metrics.reloads.clone());
            if let Some(directory_tls) = &backend.tls {
                directory_tls.count_in(metrics.reloads.clone());
            }
            let upstream = forward::Upstream::with_metrics(
                &config.upstream,
                client_tls.clone(),
                Some(metrics.upstream_connect_errors.clone()),
            )
            .with_breakers(breakers, Some(metrics.circuits.clone()))
            .with_retry_metrics(metrics.upstream_retries.clone());
            let policy = Reloadable::new(
                "policy",
                Arc::new(policy_from(config, catalogue)),
                policy_files(config),
            );
            policy.count_in(metrics.reloads.clone());
            let gateway = Gateway {
                policy,
                directory,
                upstream,
                audit,
                metrics,
                tracer,
                limiter,
                directory_budget,
                refusal_budget,
                overload,
            };
            Ok(Components {
                gateway,
                server_tls,
                crl_floor,
                upstream_crl_floor,
                client_tls,
                mock_provider,
                ldif: backend.ldif,
                directory_tls: backend.tls,
                audit_writer,
                span_exporter,
            })
        }
        _ => Err(problems),
    }
}

fn policy_from(config: &Config, catalogue: Catalogue) -> Policy {
    Policy {
        catalogue,
        jwt: config.policy.jwt,
        jwt_clock_skew: config.policy.jwt_clock_skew,
        sharing_agreements: config.policy.sharing_agreements.clone(),
        cors_allowed_origins: config.policy.cors_allowed_origins.clone(),
    }
}

fn policy_files(config: &Config) -> Vec<std::path::PathBuf> {
    vec![
        config.source.clone(),
        config.policy.interactions_file.clone(),
    ]
}

/// Reloads `[policy]` and the interaction catalogue from the configuration file (other
/// sections need a restart and are not applied; a file that no longer validates is refused),
/// and the files to watch from then on (the catalogue may have moved).
fn reload_policy(
    running: &Config,
    restart_pending: &prometheus::IntGauge,
) -> Result<(Policy, Vec<std::path::PathBuf>), String> {
    let config = Config::load(&running.source).map_err(|e| e.to_string())?;
    let catalogue = Catalogue::load(&config.policy.interactions_file)
        .map_err(|e| format!("policy.interactions: {e}"))?;
    let unapplied = sections_changed(running, &config);
    if !unapplied.is_empty() {
        // The keys the operator changed in those sections, as the file has them.
        let keys: Vec<String> = config::keys_changed(&running.raw, &config.raw, "")
            .into_iter()
            .filter(|k| {
                unapplied
                    .iter()
                    .any(|s| k == s || k.starts_with(&format!("{s}.")))
            })
            .collect();
        tracing::warn!(
            sections = %unapplied.join(", "),
            keys = %keys.join(", "),
            "configuration changed outside [policy]: not applied until a restart"
        );
    }
    restart_pending.set(i64::from(!unapplied.is_empty()));
    Ok((policy_from(&config, catalogue), policy_files(&config)))
}

/// The sections other than `[policy]` that differ between `running` and `new`: a reload
/// applies only `[policy]`, and an operator who changed more must hear that it waits for a
/// restart.
fn sections_changed(running: &Config, new: &Config) -> Vec<&'static str> {
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let sections: [(&'static str, &dyn std::fmt::Debug, &dyn std::fmt::Debug); 13] = [
        ("listener", &running.listener, &new.listener),
        ("admin", &running.admin, &new.admin),
        ("upstream", &running.upstream, &new.upstream),
        ("directory", &running.directory, &new.directory),
        ("log", &running.log, &new.log),
        ("audit", &running.audit, &new.audit),
        ("tracing", &running.tracing, &new.tracing),
        ("shutdown", &running.shutdown, &new.shutdown),
        ("reload", &running.reload, &new.reload),
        ("rate_limit", &running.rate_limit, &new.rate_limit),
        (
            "circuit_breaker",
            &running.circuit_breaker,
            &new.circuit_breaker,
        ),
        ("dev", &running.dev, &new.dev),
        ("mock_provider", &running.mock_provider, &new.mock_provider),
    ];
    sections
        .into_iter()
        .filter(|(_, a, b)| differs(*a, *b))
        .map(|(name, _, _)| name)
        .collect()
}

fn server_tls_files(config: &Config) -> Vec<std::path::PathBuf> {
    let t = &config.listener.tls;
    let mut files = vec![t.cert.clone(), t.key.clone(), t.client_ca.clone()];
    files.extend(t.crls.iter().cloned());
    files
}

fn client_tls_files(config: &Config) -> Vec<std::path::PathBuf> {
    let t = &config.upstream.tls;
    let mut files = vec![t.cert.clone(), t.key.clone(), t.ca.clone()];
    files.extend(t.crls.iter().cloned());
    files
}

/// How often watched files are polled (SIGHUP always reloads at once).
fn reload_poll(config: &Config) -> std::time::Duration {
    if config.reload.watch_files {
        config.reload.poll_interval
    } else {
        // SIGHUP only: a poll so rare it never fires in practice.
        std::time::Duration::from_secs(60 * 60 * 24 * 365)
    }
}

/// Reloads the listener's, the upstream client's and the remote directory's TLS material on
/// SIGHUP and file change.
fn watch_tls(config: &Config, c: &Components, shutdown: &CancellationToken, tasks: &TaskTracker) {
    let poll = reload_poll(config);
    let (listener, alpn) = (config.listener.tls.clone(), listener_alpn(config));
    let floor = c.crl_floor.clone();
    c.server_tls.watch(
        move || tls::listener_tls_above(&listener, &config::LISTENER_TLS_KEYS, alpn, &floor),
        poll,
        shutdown.clone(),
        tasks,
    );
    let upstream = config.upstream.tls.clone();
    let floor = c.upstream_crl_floor.clone();
    c.client_tls.watch(
        move || tls::upstream_tls_above(&upstream, &config::UPSTREAM_TLS_KEYS, &ALPN_H1, &floor),
        poll,
        shutdown.clone(),
        tasks,
    );
    if let Some(directory) = &c.directory_tls {
        directory.watch(poll, shutdown.clone(), tasks);
    }
}

/// The mock provider's listener TLS (not reloaded).
fn mock_provider_tls(m: &MockProviderConfig) -> Result<tls::ListenerTls, tls::TlsProblems> {
    tls::listener_tls_above(
        &m.tls,
        &config::MOCK_PROVIDER_TLS_KEYS,
        &ALPN_H1,
        &tls::CrlFloor::default(),
    )
}

/// Each problem of a TLS configuration, as a line naming its key and file.
fn lines(problems: tls::TlsProblems) -> Vec<String> {
    problems.into_iter().map(|p| p.to_string()).collect()
}

fn listener_alpn(config: &Config) -> &'static [&'static [u8]] {
    if config.listener.http2 {
        &ALPN_H2_H1
    } else {
        &ALPN_H1
    }
}

fn mock_settings(m: &MockProviderConfig) -> MockSettings {
    let base_path = m
        .base_url
        .strip_prefix("https://")
        .and_then(|rest| rest.find('/').map(|i| rest[i..].to_string()))
        .unwrap_or_default();
    MockSettings {
        asid: m.asid.clone(),
        ods_code: m.ods_code.clone(),
        base_path,
        base_url: m.base_url.clone(),
    }
}

/// Creates the development PKI when the configuration asks for it and it is missing.
pub fn ensure_dev_certs(config: &Config) -> Result<(), StartError> {
    if !config.dev.generate_certs || tls::pki::dev_certs_present(&config.dev.certs_dir) {
        return Ok(());
    }
    tls::pki::write_dev_certs(&config.dev.certs_dir, false).map_err(|source| {
        StartError::DevCerts {
            dir: config.dev.certs_dir.display().to_string(),
            source,
        }
    })?;
    tracing::info!(dir = %config.dev.certs_dir.display(), "created the development certificates");
    Ok(())
}

/// Starts the gateway, the admin listener and (when enabled) the embedded mock provider.
pub async fn start(config: &Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    ensure_dev_certs(config)?;
    let components = load_components(config).map_err(StartError::Load)?;
    let tasks = TaskTracker::new();
    watch_tls(config, &components, &shutdown, &tasks);
    {
        let running = config.clone();
        let policy = Arc::downgrade(&components.gateway.policy);
        let restart_pending = components.gateway.metrics.reloads.restart_pending.clone();
        components.gateway.policy.watch(
            move || {
                let (new, files) = reload_policy(&running, &restart_pending)?;
                if let Some(policy) = policy.upgrade() {
                    policy.watch_files(files);
                }
                Ok::<_, String>(new)
            },
            reload_poll(config),
            shutdown.clone(),
            &tasks,
        );
    }

    // The audit trail first: nothing is served unless it can be written.
    let audit_writer = components.audit_writer;
    tokio::task::spawn_blocking(move || audit_writer.start())
        .await
        .map_err(|e| StartError::Load(vec![format!("audit: writer start panicked: {e}")]))??;
    let audit = components.gateway.audit.clone();
    let metrics = components.gateway.metrics.clone();
    {
        // Read at scrape time from the snapshots in force, so a renewal by hot reload shows.
        let (listener, upstream) = (components.server_tls.clone(), components.client_tls.clone());
        let directory = components.directory_tls.clone();
        let expiries: metrics::CertificateExpiriesFn = Arc::new(move || {
            let (listener, upstream) = (listener.current().expiry, upstream.current().expiry);
            let mut expiries = vec![
                ("server", listener.chain),
                ("client_ca", listener.ca_bundle),
                ("upstream_client", upstream.chain),
                ("upstream_ca", upstream.ca_bundle),
            ];
            if let Some(directory) = &directory {
                directory.certificate_expiries(&mut expiries);
            }
            expiries
        });
        metrics.register_certificates(expiries.clone());
        tasks.spawn(crlwatch::watch_certificates(expiries, shutdown.clone()));
    }
    // The CRLs in force (after hot reloads): the metric, the CRL watcher and `/readyz` read
    // them alike (`/readyz` the listener's and the upstream's only: see `admin::Readiness`).
    let crl_horizons: metrics::CrlHorizonsFn = {
        let (listener, upstream) = (components.server_tls.clone(), components.client_tls.clone());
        let directory = components.directory_tls.clone();
        Arc::new(move || {
            let mut horizons = vec![
                ("listener", listener.current().crl_horizon()),
                ("upstream", upstream.current().crl_horizon),
            ];
            if let Some(directory) = &directory {
                horizons.push(("directory", directory.crl_horizon()));
            }
            horizons
        })
    };
    metrics.register_crl_next_update(crl_horizons.clone());
    tasks.spawn(crlwatch::watch(crl_horizons.clone(), shutdown.clone()));
    let exporter_stop = CancellationToken::new();
    if let Some(exporter) = components.span_exporter {
        tasks.spawn(exporter.run(exporter_stop.clone()));
    }

    let mock_provider_addr = match (&components.mock_provider, &config.mock_provider) {
        (Some((mock, tls)), Some(m)) => {
            let listener = bind("mock provider", m.address).await?;
            let addr = local_addr("mock provider", &listener)?;
            let opts = mock_serve_options(config);
            tasks.spawn(serve_mock(
                listener,
                mock.clone(),
                tls.clone(),
                m.allowed_clients.clone(),
                opts,
                shutdown.clone(),
            ));
            Some(addr)
        }
        _ => None,
    };

    let listener = bind("gateway", config.listener.address).await?;
    let gateway_addr = local_addr("gateway", &listener)?;
    let admin_listener = bind("admin", config.admin.address).await?;
    let admin_addr = local_addr("admin", &admin_listener)?;

    let readiness = admin::Readiness::with_audit(audit.writable());
    readiness.loaded.store(true, Ordering::Release);
    let _ = readiness.crl_horizons.set(crl_horizons);
    let _ = readiness
        .directory
        .set(components.gateway.directory.clone());
    readiness.register_metrics(&metrics);
    {
        let directory = components.gateway.directory.clone();
        components
            .gateway
            .metrics
            .register_directory_stats(Arc::new(move || directory.stats()));
    }
    if let Some(bound) = directory::probe_bound(&config.directory.backend) {
        // A remote backend is probed now and whenever it stops answering, so readiness
        // follows it without waiting on it and without consumer traffic.
        let directory = components.gateway.directory.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move { directory.run_prober(bound, shutdown).await });
    }
    if let (
        Some(ldif),
        DirectoryBackendConfig::Ldif {
            file,
            poll_interval,
        },
    ) = (&components.ldif, &config.directory.backend)
    {
        components
            .gateway
            .metrics
            .reloads
            .register_component(directory::reload::COMPONENT);
        tasks.spawn(directory::reload::watch(
            ldif.clone(),
            file.clone(),
            components.gateway.directory.clone(),
            *poll_interval,
            Some(components.gateway.metrics.reloads.clone()),
            shutdown.clone(),
        ));
    }
    {
        let readiness = readiness.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            shutdown.cancelled().await;
            readiness.draining.store(true, Ordering::Release);
        });
    }
    // The admin listener outlives the gateway listener, so /readyz reports "draining" while
    // requests in flight finish.
    let admin_stop = CancellationToken::new();
    tasks.spawn(admin::serve(
        admin_listener,
        readiness,
        metrics.clone(),
        admin_stop.clone(),
    ));

    let directory = components.gateway.directory.clone();
    let http2_violations = metrics.http2_violations.clone();
    let gateway = Arc::new(components.gateway);
    let opts = ServeOptions {
        name: "gateway",
        handshake_timeout: config.listener.handshake_timeout,
        header_read_timeout: config.listener.header_read_timeout,
        http2: config.listener.http2,
        grace_period: config.shutdown.grace_period,
        limits: config.listener.limits.clone(),
    };
    let conn_metrics = server::ConnMetrics {
        active: Some(metrics.active_connections.clone()),
        handshake_failures: Some(metrics.tls_handshake_failures.clone()),
        on_refused: Some({
            let gateway = gateway.clone();
            Arc::new(move |conn: &server::ConnInfo, head: server::RefusedHead| {
                gateway.refused_head(conn, head)
            })
        }),
        http2_violations: Some(http2_violations),
    };
    let serve = server::serve_tls_observed(
        listener,
        components.server_tls,
        opts,
        conn_metrics,
        shutdown,
        move |conn, req| {
            let gateway = gateway.clone();
            async move { gateway.handle(conn, req).await }
        },
    );
    tasks.spawn(async move {
        serve.await;
        // Requests are done: write and sync what the trail still holds, stop exporting.
        audit.shutdown().await;
        exporter_stop.cancel();
        admin_stop.cancel();
    });

    tracing::info!(
        %gateway_addr,
        %admin_addr,
        mock_provider = mock_provider_addr.map(tracing::field::display),
        "ssp-gateway started"
    );
    Ok(Running {
        gateway_addr,
        admin_addr,
        mock_provider_addr,
        directory: Some(directory),
        tasks,
    })
}

/// Starts the gateway and waits until it has shut down.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<(), StartError> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}

/// Runs only the mock provider of `config` (the `mock-provider` command).
pub async fn start_mock_provider(
    config: &Config,
    mock: &MockProviderConfig,
    shutdown: CancellationToken,
) -> Result<Running, StartError> {
    ensure_dev_certs(config)?;
    let tls = mock_provider_tls(mock).map_err(|e| StartError::Load(lines(e)))?;
    let tls = Reloadable::new("mock provider TLS", Arc::new(tls), vec![]);
    let provider = Arc::new(MockProvider::new(mock_settings(mock)));
    let listener = bind("mock provider", mock.address).await?;
    let addr = local_addr("mock provider", &listener)?;
    let tasks = TaskTracker::new();
    tasks.spawn(serve_mock(
        listener,
        provider,
        tls,
        mock.allowed_clients.clone(),
        mock_serve_options(config),
        shutdown,
    ));
    tracing::info!(%addr, "mock provider started");
    Ok(Running {
        gateway_addr: addr,
        admin_addr: addr,
        mock_provider_addr: Some(addr),
        directory: None,
        tasks,
    })
}

fn mock_serve_options(config: &Config) -> ServeOptions {
    ServeOptions {
        name: "mock-provider",
        handshake_timeout: config.listener.handshake_timeout,
        header_read_timeout: config.listener.header_read_timeout,
        http2: false,
        grace_period: config.shutdown.grace_period,
        limits: server::Limits::default(),
    }
}

async fn serve_mock(
    listener: TcpListener,
    provider: Arc<MockProvider>,
    tls: Arc<Reloadable<tls::ListenerTls>>,
    allowed_clients: Vec<String>,
    opts: ServeOptions,
    shutdown: CancellationToken,
) {
    let allowed = Arc::new(allowed_clients);
    server::serve_tls(listener, tls, opts, shutdown, move |conn, req| {
        let provider = provider.clone();
        let allowed = allowed.clone();
        async move {
            let caller_allowed = conn
                .peer
                .names
                .iter()
                .any(|n| allowed.iter().any(|a| a.eq_ignore_ascii_case(n)));
            if caller_allowed {
                provider.handle(req).await
            } else {
                tracing::warn!(peer = ?conn.peer.names, "mock provider refused a caller that is not the gateway");
                provider_access_denied()
            }
        }
    })
    .await;
}

/// The mock provider's answer to a caller that is not the gateway: 403 ACCESS_DENIED, as a
/// GP Connect provider answers it.
fn provider_access_denied() -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let body = serde_json::json!({
        "resourceType": "OperationOutcome",
        "meta": { "profile": ["https://fhir.nhs.uk/STU3/StructureDefinition/GPConnect-OperationOutcome-1"] },
        "issue": [{
            "severity": "error",
            "code": "forbidden",
            "details": { "coding": [{
                "system": "https://fhir.nhs.uk/STU3/CodeSystem/Spine-ErrorOrWarningCode-1",
                "code": "ACCESS_DENIED",
                "display": "Access denied"
            }]},
            "diagnostics": "The client certificate is not the Spine Secure Proxy's"
        }]
    });
    let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
        body.to_string(),
    )));
    *resp.status_mut() = http::StatusCode::FORBIDDEN;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/fhir+json;charset=utf-8"),
    );
    resp
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local_addr(what: &'static str, listener: &TcpListener) -> Result<SocketAddr, StartError> {
    let addr = listener.local_addr();
    addr.map_err(|source| StartError::Bind {
        what,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload applies `[policy]` only; other sections that changed are named for a restart.
    #[test]
    fn sections_changed_outside_policy_are_named() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(config::DEFAULT_CONFIG_PATH);
        let running = Config::load(&path).expect("shipped config");
        let mut new = running.clone();
        assert!(sections_changed(&running, &new).is_empty());
        new.policy.jwt_clock_skew += std::time::Duration::from_secs(1);
        assert!(
            sections_changed(&running, &new).is_empty(),
            "policy is applied"
        );
        new.listener.address.set_port(8444);
        new.audit.max_file_bytes += 1;
        assert_eq!(sections_changed(&running, &new), ["listener", "audit"]);
    }
}
