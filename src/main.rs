//! The `ssp-gateway` command line. Parses arguments and calls the library; nothing else.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use ssp_gateway::config::{Config, DirectoryBackendConfig, DEFAULT_CONFIG_PATH};

#[derive(Parser)]
#[command(
    name = "ssp-gateway",
    version,
    about = "An mTLS interoperability gateway for GP Connect 1.2.7, in the style of the NHS Spine Secure Proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (and, in development, the embedded mock provider). Exit 0: stopped
    /// cleanly; 1: could not start; 3: stopped, but audit records were lost at shutdown.
    Run {
        /// Configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a configuration and everything it points at; list every problem.
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Create the development PKI (CA, gateway, consumers, provider).
    DevCerts {
        /// Output directory.
        #[arg(long, default_value = "certs-dev")]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Run only the mock GP Connect provider of a configuration.
    MockProvider {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Ask the configured directory about a system (what an operator asks first when a
    /// consumer is refused).
    Directory {
        #[command(subcommand)]
        command: DirectoryCommand,
    },
    /// Print a valid unsigned GP Connect JWT (alg none) for development requests.
    DevJwt {
        /// requested_scope: patient/*.read, patient/*.write or organization/*.read.
        #[arg(long, default_value = "patient/*.read")]
        scope: String,
        /// aud claim (GP Connect consumers send the provider's endpoint or a legacy value).
        #[arg(long, default_value = "https://localhost:9443/B82617/STU3/1/gpconnect")]
        aud: String,
    },
    /// Work with the audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Load a gateway (or a provider directly) with GP Connect requests and report latency
    /// percentiles, throughput and errors (README "Performance").
    Loadtest(Box<ssp_gateway::loadtest::Args>),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Prove that audit files form one unbroken hash chain (across rotated files, in any
    /// order), or name every break (file, line, seq and what is wrong; the first 100, then a
    /// count). Exit 0: intact; 1: broken; 2: unreadable.
    Verify {
        /// The trail's chain key ([audit] key_file): every link must then be the HMAC-SHA256
        /// of the line before under one of the keys given (give each key the trail was
        /// written with, e.g. the old and the new one after a key change), never its plain
        /// SHA-256. Without --key, every link must be the SHA-256.
        #[arg(long = "key", value_name = "FILE")]
        keys: Vec<PathBuf>,
        /// An anchor for the end of the trail kept outside it: record SEQ must be in the trail
        /// and HEX the link value of its line (what the next record's prev would be), as the
        /// gateway logs them at each rotation and at shutdown (`last_seq=SEQ head=HEX`).
        /// Repeat for several.
        #[arg(long = "head", value_name = "SEQ:HEX")]
        heads: Vec<ssp_gateway::audit::verify::Head>,
        /// The trail must reach seq N (e.g. the highest ssp_audit_last_seq Prometheus saw).
        #[arg(long, value_name = "N")]
        min_seq: Option<u64>,
        /// The trail must begin at seq N (1: its very start; after retention, the first seq
        /// kept), so that files removed from its start show.
        #[arg(long, value_name = "N")]
        first_seq: Option<u64>,
        /// With --key: a trail begun before its key was set, whose records up to seq N are
        /// linked by plain SHA-256 and the rest under a key. N is the seq the gateway logged
        /// when it first ran keyed on the trail (`keyed from the next record:
        /// unkeyed_through=N`); never taken from the trail itself, which a rewrite without the
        /// key would make look the same.
        #[arg(long, value_name = "N", requires = "keys")]
        unkeyed_through: Option<u64>,
        /// The audit directory (its trail files are listed and read, and listed and read
        /// again should the trail rotate meanwhile), or audit files, e.g.
        /// /var/lib/ssp-gateway/audit/*.jsonl. An audit-tail-*.partial file (set aside by the
        /// gateway) is named and not read; a file given twice is read once.
        #[arg(required = true, value_name = "DIR|FILE")]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DirectoryCommand {
    /// Print what the configured backend says about an ASID (uncached) and, with
    /// --interaction, what the gateway would decide for it as sender and as receiver.
    Lookup {
        /// The ASID (Ssp-From or Ssp-To).
        #[arg(long)]
        asid: String,
        /// An interaction id, e.g. urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1.
        #[arg(long)]
        interaction: Option<String>,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `loadtest --json` is read by programs: its argument errors are JSON on stdout too.
        Err(e) if e.use_stderr() && loadtest_json(std::env::args_os()) => {
            let _ = e.print();
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            let reason = first.strip_prefix("error: ").unwrap_or(first);
            println!("{}", serde_json::json!({ "error": reason }));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Run { config } => with_config(&config, |c| serve(c, false)),
        Command::MockProvider { config } => with_config(&config, |c| serve(c, true)),
        Command::CheckConfig { config } => check_config(&config),
        Command::DevCerts { out, force } => {
            match ssp_gateway::tls::pki::write_dev_certs(&out, force) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", out.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Directory {
            command:
                DirectoryCommand::Lookup {
                    asid,
                    interaction,
                    config,
                },
        } => with_config(&config, |c| {
            directory_lookup(&c, &asid, interaction.as_deref())
        }),
        Command::DevJwt { scope, aud } => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let claims = ssp_gateway::ssp::jwt::dev_claims(&scope, now, &aud);
            println!("{}", ssp_gateway::ssp::jwt::encode_unsigned(&claims));
            ExitCode::SUCCESS
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    keys,
                    heads,
                    min_seq,
                    first_seq,
                    unkeyed_through,
                    files,
                },
        } => audit_verify(
            &keys,
            ssp_gateway::audit::verify::Options {
                heads,
                min_seq,
                first_seq,
                unkeyed_through,
                ..Default::default()
            },
            &files,
        ),
        Command::Loadtest(args) => ssp_gateway::loadtest::cli(*args),
    }
}

/// Whether the command line is `loadtest` with `--json` (before a `--`).
fn loadtest_json(args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    let mut args = args.skip(1);
    args.next().is_some_and(|c| c == "loadtest")
        && args.take_while(|a| a != "--").any(|a| a == "--json")
}

/// `audit verify`: exit 0 intact, 1 broken, 2 when a key or a file cannot be read.
fn audit_verify(
    keys: &[PathBuf],
    mut options: ssp_gateway::audit::verify::Options,
    files: &[PathBuf],
) -> ExitCode {
    use ssp_gateway::audit::{key::ChainKey, verify};
    // The trail's files are all held open while they are read (so that one rotated or
    // removed meanwhile is still the one listed): a long trail needs more than the usual soft
    // limit of 1,024. Best effort: past the hard limit, the file that cannot be opened is named.
    let _ = ssp_gateway::files::raise_open_files_limit();
    for path in keys {
        match ChainKey::load(path) {
            Ok(key) => options.keys.push(key),
            Err(e) => {
                eprintln!("error: --key {e}");
                return ExitCode::from(2);
            }
        }
    }
    match verify::verify_files(files, &options) {
        Ok(report) => {
            println!("{report}");
            if report.intact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn with_config(path: &Path, f: impl FnOnce(Config) -> ExitCode) -> ExitCode {
    match Config::load(path) {
        Ok(config) => f(config),
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!(
                "(run `ssp-gateway check-config --config {}` for the full report)",
                path.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut problems = Vec::new();
    let certs_dir = &config.dev.certs_dir;
    let missing = ssp_gateway::tls::pki::missing_dev_certs(certs_dir);
    let all = ssp_gateway::tls::pki::dev_cert_files().len();
    if config.dev.generate_certs && !missing.is_empty() && missing.len() < all {
        // `run` would refuse this set, not make it.
        let partial = ssp_gateway::tls::pki::PkiError::PartialSet {
            dir: certs_dir.clone(),
            missing,
        };
        // Everything but the certificates is still checked: one run lists every problem.
        problems = ssp_gateway::check_without_certificates(&config);
        problems.push(format!("dev.certs_dir: {}: {partial}", certs_dir.display()));
    } else if config.dev.generate_certs
        && !ssp_gateway::tls::pki::dev_certs_present(&config.dev.certs_dir)
    {
        println!(
            "note: {} is missing; `ssp-gateway run` will create it (or run `ssp-gateway dev-certs`); \
             the certificates are not checked",
            config.dev.certs_dir.display()
        );
        problems = ssp_gateway::check_without_certificates(&config);
    } else {
        match ssp_gateway::load_components(&config) {
            Ok(components) => {
                for warning in check_warnings(&config, &components) {
                    println!("warning: {warning}");
                }
            }
            Err(p) => problems = p,
        }
    }
    if problems.is_empty() {
        println!("{}: ok", path.display());
        ExitCode::SUCCESS
    } else {
        let n = problems.len();
        eprintln!("{}: {n} {}", path.display(), plural(n, "problem"));
        for p in problems {
            eprintln!("  - {p}");
        }
        ExitCode::FAILURE
    }
}

/// `word`, or `word`s unless `n` is 1.
fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

/// Own certificates due to run out within this many days are named by `check-config`.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// What `check-config` says about a configuration that loads but would not serve well: an own
/// certificate (the listener's, the upstream client's, the LDAPS directory client's, the mock
/// provider's; any in its file's chain) running out within [`EXPIRY_WARNING_DAYS`], an LDIF
/// directory with no accredited system or no message handler (every request would be refused),
/// or with message handlers it cannot use or values it uses only trimmed (each with its line),
/// a remote directory backend that does not answer now (the gateway would start unready), a
/// CORS allowlist of `"*"` (any web page could call through a clinician's browser), an
/// open-files hard limit below what the connection limits can take, and the TLS material's own
/// warnings (the listener's, the upstream client's, the LDAPS directory client's, the mock
/// provider's: a CA with no CRL while CRLs are configured).
/// Warnings, not problems: the gateway runs with each of them.
fn check_warnings(config: &Config, components: &ssp_gateway::Components) -> Vec<String> {
    let mut warnings = Vec::new();
    // `run` raises the soft limit to the hard one: the hard limit is what it will have if it
    // runs as this user (a service manager may set another: systemd's LimitNOFILE=).
    if let Ok((_, hard)) = ssp_gateway::files::open_files_limit() {
        warnings.extend(ssp_gateway::files::open_files_warning(config, hard));
    }
    // The TLS material's own, as `run` logs them: a CA with no CRL while CRLs are configured.
    warnings.extend(components.server_tls.current().warnings.iter().cloned());
    warnings.extend(components.client_tls.current().warnings.iter().cloned());
    if let Some(directory) = &components.directory_tls {
        warnings.extend(directory.warnings());
    }
    if let Some((_, tls)) = &components.mock_provider {
        warnings.extend(tls.current().warnings.iter().cloned());
    }
    if config.policy.cors_allowed_origins.is_any() {
        warnings.push(
            "policy.cors_allowed_origins: \"*\" lets any web page a clinician opens make their \
             browser send requests through the gateway with the client certificate held there; \
             list the consumers' web origins instead"
                .to_owned(),
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    // The loaded snapshots already hold each chain's earliest notAfter.
    let mut own = vec![
        (
            "listener.cert",
            &config.listener.tls.cert,
            components.server_tls.current().expiry.chain,
        ),
        (
            "upstream.cert",
            &config.upstream.tls.cert,
            components.client_tls.current().expiry.chain,
        ),
    ];
    let ldap_expiry = components
        .directory_tls
        .as_ref()
        .and_then(|t| t.ldap_expiry());
    if let (DirectoryBackendConfig::Ldap(ldap), Some(expiry)) =
        (&config.directory.backend, ldap_expiry)
    {
        if let Some(tls) = &ldap.tls {
            own.push(("directory.ldap_cert", &tls.cert, expiry.chain));
        }
    }
    if let (Some(m), Some((_, tls))) = (&config.mock_provider, &components.mock_provider) {
        own.push((
            "mock_provider.cert",
            &m.tls.cert,
            tls.current().expiry.chain,
        ));
    }
    for (key, file, not_after) in own {
        let days = not_after.saturating_sub(now) / 86_400;
        if days < EXPIRY_WARNING_DAYS {
            warnings.push(format!(
                "{key}: {} runs out in {days} {} (a certificate of its chain); renew it \
                 (a renewed file is taken up without a restart)",
                file.display(),
                plural(usize::try_from(days).unwrap_or(0), "day")
            ));
        }
    }
    if let Some(ldif) = &components.ldif {
        let stats = ldif.stats();
        for (count, what) in [
            (stats.systems, "accredited system (nhsAs)"),
            (stats.handlers, "message handler (nhsMhs)"),
        ] {
            if count == 0 {
                warnings.push(format!(
                    "directory: {} holds no {what}: every request would be refused",
                    ldif.origin()
                ));
            }
        }
        // Message handlers it cannot use, values it uses trimmed: each with its line.
        for warning in ldif.warnings() {
            warnings.push(format!("directory: {}: {warning}", ldif.origin()));
        }
    } else {
        let backend = components.gateway.directory.backend().clone();
        let answered = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(async {
                    match tokio::time::timeout(std::time::Duration::from_secs(30), backend.probe())
                        .await
                    {
                        Ok(answer) => answer.map_err(|e| e.to_string()),
                        Err(_) => Err("no answer within 30 s".to_owned()),
                    }
                })
            });
        if let Err(e) = answered {
            warnings.push(format!(
                "directory: the {} backend does not answer now ({e}); the gateway would start \
                 unready and serve nothing until it does",
                backend.name()
            ));
        }
    }
    warnings
}

/// `directory lookup`: one uncached backend query, described for an operator. Exit 0 when the
/// ASID is registered, 1 when it is not or the directory cannot answer.
fn directory_lookup(config: &Config, asid: &str, interaction: Option<&str>) -> ExitCode {
    use ssp_gateway::directory;
    let catalogue =
        match ssp_gateway::ssp::interactions::Catalogue::load(&config.policy.interactions_file) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: policy.interactions: {e}");
                return ExitCode::FAILURE;
            }
        };
    let opened = match directory::open_backend(&config.directory.backend, &catalogue) {
        Ok(o) => o,
        Err(problems) => {
            for p in problems {
                eprintln!("error: {p}");
            }
            return ExitCode::FAILURE;
        }
    };
    if !directory::is_asid(asid) {
        eprintln!("error: --asid {asid:?}: an ASID is 1 to 32 digits");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(opened.backend.party(asid)) {
        Ok(party) => {
            print!(
                "{}",
                directory::inspect::describe(
                    &opened.description,
                    asid,
                    party.as_ref(),
                    &catalogue,
                    interaction
                )
            );
            if party.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("directory: {}", opened.description);
            eprintln!("error: {e}");
            eprintln!(
                "(the gateway answers 503 DIRECTORY_UNAVAILABLE while nothing usable is cached)"
            );
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config, mock_only: bool) -> ExitCode {
    if let Err(e) = ssp_gateway::telemetry::init(&config.log) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let code = serve_logged(config, mock_only);
    // The log is written in batches by a background thread: out with the last lines.
    ssp_gateway::logwriter::flush();
    code
}

fn serve_logged(config: Config, mock_only: bool) -> ExitCode {
    ssp_gateway::memory::start_trimmer();
    // Up to the hard limit, and said when even that is short of what the limits can take.
    match ssp_gateway::files::raise_open_files_limit() {
        Ok(limit) => {
            if let Some(warning) = ssp_gateway::files::open_files_warning(&config, limit) {
                tracing::warn!("{warning}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let started = if mock_only {
            match &config.mock_provider {
                Some(m) => ssp_gateway::start_mock_provider(&config, m, shutdown.clone()).await,
                None => {
                    eprintln!(
                        "error: {}: [mock_provider] is not enabled",
                        config.source.display()
                    );
                    return ExitCode::FAILURE;
                }
            }
        } else {
            ssp_gateway::start(&config, shutdown.clone()).await
        };
        let running = match started {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::spawn(signal_shutdown(shutdown));
        running.wait().await;
        let lost = ssp_gateway::audit::lost_at_shutdown();
        if lost > 0 {
            tracing::error!(
                lost,
                exit_status = EXIT_AUDIT_RECORDS_LOST,
                "stopped, with audit records lost"
            );
            return ExitCode::from(EXIT_AUDIT_RECORDS_LOST);
        }
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// `run`'s exit status when it stopped but the audit trail could not take every record
/// (1 is for a gateway that could not start): a supervisor must not see a clean stop.
const EXIT_AUDIT_RECORDS_LOST: u8 = 3;

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn signal_shutdown(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    shutdown.cancel();
}
