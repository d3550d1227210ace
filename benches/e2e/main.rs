//! `cargo bench --bench e2e`: the gateway end to end on loopback, beside a direct run and nginx.
//!
//! Starts, as separate processes, a provider (this binary again, answering from memory), the
//! release gateway (`CARGO_BIN_EXE_ssp-gateway`, which cargo builds for the bench) with every
//! check on, and — when it is installed — nginx as the equivalent mTLS reverse proxy. Then, for
//! each workload, runs `ssp-gateway loadtest` with the same load (fixed connections, warm-up,
//! duration) against the provider directly, each gateway configuration and nginx, reads the
//! proxy's and the provider's CPU time from /proc over exactly the measured window, and prints
//! one table. The load generator is pinned to CPU 0, proxy and provider to CPU 1 (`taskset`).
//! Finally it opens 10,000 idle mTLS connections to each proxy and reports its memory.
//!
//! Run by `cargo test` (no `--bench` argument) it is a smoke test: a fraction of a second per
//! run, a few connections, unpinned, and it fails unless every request a run sent got a 2xx
//! answer (or the noisy consumer's expected 429).
//!
//! Options (after `--`): `--quick`, `--duration 5s`, `--warmup 2s`, `--connections 32`,
//! `--idle 10000`, `--no-nginx`, `--key rsa|ecdsa`, `--gateway NAME=SNIPPET.toml` (repeatable:
//! one gateway column per configuration, the TOML snippet merged over the bench's gateway
//! config, e.g. `[audit]` settings), `--json-out FILE`, `--keep` (keep the scratch directory),
//! and workload names (`get-4k`, `post-book`, `get-178k`, `new-conn`, `half-rate`,
//! `noisy-neighbour`, `idle`) to run only those. `SSP_BENCH_GATEWAY_EXTRA=FILE` merges a snippet into the default gateway.

mod nginx;
mod noisy;
mod procs;
mod provider;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use clap::Parser;
use serde_json::Value;
use ssp_gateway::tls::pki::{Ca, KeyKind, LeafSpec};

use procs::Proc;

/// The service root of the bench provider (the development practice's).
const BASE_PATH: &str = "/B82617/STU3/1/gpconnect";
/// The core the load generator runs on; the proxy and provider share the other.
const LOAD_CORE: usize = 0;
const SERVER_CORE: usize = 1;

#[derive(Parser, Debug)]
#[command(
    name = "e2e",
    about = "ssp-gateway end-to-end bench beside a direct run and nginx"
)]
struct Opts {
    /// Set by `cargo bench`; without it this is a smoke test.
    #[arg(long)]
    bench: bool,
    /// Measured time per run.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Warm-up per run.
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Keep-alive connections.
    #[arg(long)]
    connections: Option<usize>,
    /// Idle connections for the memory measurement.
    #[arg(long)]
    idle: Option<usize>,
    /// 1 s warm-up and 3 s per run.
    #[arg(long)]
    quick: bool,
    /// Skip the nginx column.
    #[arg(long)]
    no_nginx: bool,
    /// Key algorithm of every certificate: rsa (RSA 2048, as NHS certificates) or ecdsa (P-256).
    #[arg(long, default_value = "rsa")]
    key: String,
    /// Another gateway column: NAME=FILE, FILE a TOML snippet merged over the gateway config.
    #[arg(long = "gateway", value_name = "NAME=FILE")]
    gateways: Vec<String>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Keep the scratch directory (configs, logs, certificates).
    #[arg(long)]
    keep: bool,
    /// Profile the first gateway during the first workload's run (e.g. `get-4k`, `new-conn`)
    /// with `perf record` (cpu-clock, DWARF call graphs) into this file; that run's figures
    /// then include perf's own overhead.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// Workloads to run (default: all).
    workloads: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Get4k,
    PostBook,
    Get178k,
    NewConn,
    HalfRate,
    /// A quiet consumer's latency alone and beside a consumer flooding past its rate limit
    /// (`noisy.rs`; gateways only).
    NoisyNeighbour,
}

impl Workload {
    const ALL: [Workload; 6] = [
        Workload::Get4k,
        Workload::PostBook,
        Workload::Get178k,
        Workload::NewConn,
        Workload::HalfRate,
        Workload::NoisyNeighbour,
    ];

    fn name(self) -> &'static str {
        match self {
            Workload::Get4k => "get-4k",
            Workload::PostBook => "post-book",
            Workload::Get178k => "get-178k",
            Workload::NewConn => "new-conn",
            Workload::HalfRate => "half-rate",
            Workload::NoisyNeighbour => "noisy-neighbour",
        }
    }

    fn title(self, connections: usize) -> String {
        match self {
            Workload::Get4k => {
                format!("GET Slot search, 4.9 KB Bundle, keep-alive, {connections} connections")
            }
            Workload::PostBook => format!(
                "POST Appointment (2.3 KB recorded booking), keep-alive, {connections} connections"
            ),
            Workload::Get178k => format!(
                "GET Slot search, 178 KB recorded Bundle, keep-alive, {connections} connections"
            ),
            Workload::NewConn => format!(
                "GET Slot search 4.9 KB, new TLS connection per request (full mTLS handshake), {connections} concurrent"
            ),
            Workload::HalfRate => format!(
                "GET Slot search 4.9 KB at a fixed rate of half each gateway column's keep-alive maximum (direct and nginx at the same rate), {connections} connections"
            ),
            Workload::NoisyNeighbour => format!(
                "Noisy neighbour: a quiet consumer's GET Slot search at a fixed rate, alone and while another consumer floods past its limit of {}/s on {connections} connections",
                noisy::NOISY_LIMIT
            ),
        }
    }
}

/// One column of the comparison.
struct Target {
    label: String,
    /// The service root the load generator is pointed at.
    url: String,
    addr: SocketAddr,
    /// The proxy process (None for the direct run).
    proxy: Option<u32>,
}

/// What one run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Row {
    workload: &'static str,
    target: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    responses: u64,
    ok: u64,
    /// Every request due without a 2xx answer (the report's `errors`): non-2xx responses,
    /// failures, unfinished and not sent.
    errors: u64,
    /// Requests sent that got no answer: failures (every cause) and unfinished.
    unanswered: u64,
    proxy_cpu_us_per_req: Option<f64>,
    proxy_rss_mb: Option<f64>,
    provider_cpu_us_per_req: Option<f64>,
    rate: Option<f64>,
    /// Responses that were 429 (the noisy consumer's), when that is expected.
    throttled: Option<u64>,
    failed: Option<String>,
}

impl Row {
    /// The load generator's figures from its JSON report; CPU and memory are the caller's.
    fn from_report(workload: &'static str, target: String, report: &Value) -> Row {
        let num = |v: &Value| v.as_f64().unwrap_or(0.0);
        let failures: u64 = report["failures"]
            .as_object()
            .map(|kinds| kinds.values().filter_map(|f| f["count"].as_u64()).sum())
            .unwrap_or(0);
        Row {
            workload,
            target,
            rps: num(&report["rps"]),
            p50_ms: num(&report["latency_ms"]["p50"]),
            p99_ms: num(&report["latency_ms"]["p99"]),
            p999_ms: num(&report["latency_ms"]["p999"]),
            responses: report["responses"].as_u64().unwrap_or(0),
            ok: report["ok"].as_u64().unwrap_or(0),
            errors: report["errors"].as_u64().unwrap_or(0),
            unanswered: failures + report["unfinished"].as_u64().unwrap_or(0),
            ..Row::default()
        }
    }
}

/// What the idle-connection measurement found for one proxy.
#[derive(Debug, Clone, serde::Serialize)]
struct IdleRow {
    target: String,
    requested: usize,
    open: u64,
    rss_before_mb: f64,
    rss_open_mb: f64,
    kb_per_connection: f64,
}

struct Bench {
    bin: PathBuf,
    dir: PathBuf,
    pin: bool,
    ticks: f64,
    warmup: Duration,
    duration: Duration,
    connections: usize,
    provider_pid: u32,
    provider_port: u16,
    perf: Option<PathBuf>,
}

fn main() -> ExitCode {
    if std::env::var("SSP_E2E_ROLE").as_deref() == Ok("provider") {
        return provider::main();
    }
    let opts = Opts::parse();
    match run(opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("e2e: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: Opts) -> Result<ExitCode, String> {
    let smoke = !opts.bench;
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_ssp-gateway"));
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (warmup, duration, connections, idle_default) = if smoke {
        (
            Duration::from_millis(200),
            Duration::from_millis(500),
            2,
            20,
        )
    } else if opts.quick {
        (Duration::from_secs(1), Duration::from_secs(3), 32, 10_000)
    } else {
        (Duration::from_secs(2), Duration::from_secs(5), 32, 10_000)
    };
    let warmup = opts.warmup.unwrap_or(warmup);
    let duration = opts.duration.unwrap_or(duration);
    let connections = opts.connections.unwrap_or(connections);
    let key = match (opts.key.as_str(), smoke) {
        (_, true) | ("ecdsa", _) => KeyKind::EcdsaP256,
        ("rsa", _) => KeyKind::Rsa2048,
        (other, _) => return Err(format!("--key {other}: rsa or ecdsa")),
    };
    let selected =
        |name: &str| opts.workloads.is_empty() || opts.workloads.iter().any(|w| w == name);
    let mut workloads: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|w| selected(w.name()))
        .collect();
    if smoke {
        workloads.retain(|w| *w != Workload::HalfRate);
    }
    let pin = !smoke && procs::can_pin();
    let (soft_files, hard_files) = procs::nofile_limits();
    let mut idle = opts.idle.unwrap_or(idle_default);
    if selected("idle") && idle as u64 + 500 > soft_files {
        let fit = soft_files.saturating_sub(500) as usize;
        println!(
            "note: open-file limit {soft_files}; measuring {fit} idle connections instead of {idle} (raise it with `ulimit -n`)"
        );
        idle = fit;
    }

    let dir = std::env::temp_dir().join(format!("ssp-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _cleanup = Cleanup {
        dir: dir.clone(),
        keep: opts.keep,
    };
    write_pki(&dir, key)?;

    // The provider.
    let provider_port = procs::free_port()?;
    let provider_addr: SocketAddr = ([127, 0, 0, 1], provider_port).into();
    let provider_log = dir.join("provider.log");
    let self_exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut provider = Proc::spawn(
        "provider",
        &self_exe,
        &[],
        &[
            ("SSP_E2E_ROLE", "provider".into()),
            ("SSP_E2E_ADDR", provider_addr.to_string()),
            ("SSP_E2E_DIR", dir.display().to_string()),
        ],
        pin.then_some(SERVER_CORE),
        &provider_log,
    )?;
    provider.wait_for_port(provider_addr, &provider_log)?;
    let endpoint = format!("https://127.0.0.1:{provider_port}{BASE_PATH}");

    // The gateways: one per configuration.
    let ldif = std::fs::read_to_string(repo.join("config/directory.ldif"))
        .map_err(|e| format!("config/directory.ldif: {e}"))?
        .replace(
            "https://localhost:9443/",
            &format!("https://127.0.0.1:{provider_port}/"),
        );
    std::fs::write(dir.join("directory.ldif"), ldif).map_err(|e| e.to_string())?;
    let mut variants: Vec<(String, Option<PathBuf>)> = Vec::new();
    if opts.gateways.is_empty() {
        let extra = std::env::var_os("SSP_BENCH_GATEWAY_EXTRA").map(PathBuf::from);
        variants.push(("gateway".into(), extra));
    }
    for g in &opts.gateways {
        let (name, file) = g
            .split_once('=')
            .ok_or_else(|| format!("--gateway {g}: NAME=FILE"))?;
        variants.push((format!("gateway {name}"), Some(PathBuf::from(file))));
    }
    let mut procs_alive: Vec<Proc> = Vec::new();
    let mut targets = vec![Target {
        label: "direct".into(),
        url: endpoint.clone(),
        addr: provider_addr,
        proxy: None,
    }];
    for (i, (label, extra)) in variants.iter().enumerate() {
        let port = procs::free_port()?;
        let config = gateway_config(&dir, &repo, port, i, extra.as_deref())?;
        let path = dir.join(format!("gateway-{i}.toml"));
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let log = dir.join(format!("gateway-{i}.log"));
        let mut gw = Proc::spawn(
            label,
            &bin,
            &["run".into(), "--config".into(), path.display().to_string()],
            &[],
            pin.then_some(SERVER_CORE),
            &log,
        )?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        gw.wait_for_port(addr, &log)?;
        targets.push(Target {
            label: label.clone(),
            url: format!("https://127.0.0.1:{port}/{endpoint}"),
            addr,
            proxy: Some(gw.pid()),
        });
        procs_alive.push(gw);
    }

    // nginx, when installed.
    let mut nginx_version = String::from("not run");
    match (opts.no_nginx, nginx::binary()) {
        (true, _) => println!("nginx: skipped (--no-nginx)"),
        (false, None) => println!(
            "nginx: not installed, so there is no nginx column (Debian: apt-get install nginx)"
        ),
        (false, Some(nginx_bin)) => {
            nginx_version = nginx::version(&nginx_bin);
            let port = procs::free_port()?;
            let conf = nginx::write_config(&dir, port, provider_port, BASE_PATH, hard_files)
                .map_err(|e| format!("nginx.conf: {e}"))?;
            let log = dir.join("nginx-stdout.log");
            let mut ngx = Proc::spawn(
                "nginx",
                &nginx_bin,
                &[
                    "-p".into(),
                    dir.display().to_string(),
                    "-c".into(),
                    conf.display().to_string(),
                ],
                &[],
                pin.then_some(SERVER_CORE),
                &log,
            )?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            ngx.wait_for_port(addr, &dir.join("nginx-error.log"))?;
            targets.push(Target {
                label: "nginx".into(),
                url: format!("https://127.0.0.1:{port}/{endpoint}"),
                addr,
                proxy: Some(ngx.pid()),
            });
            procs_alive.push(ngx);
        }
    }

    let bench = Bench {
        bin: bin.clone(),
        dir: dir.clone(),
        pin,
        ticks: procs::clock_ticks(),
        warmup,
        duration,
        connections,
        provider_pid: provider.pid(),
        provider_port,
        perf: opts.perf.clone(),
    };
    let load_before = loadavg();
    print_header(&bench, key, smoke, &nginx_version, &load_before);

    let mut rows: Vec<Row> = Vec::new();
    for w in &workloads {
        println!("\n{}", w.title(connections));
        if *w == Workload::NoisyNeighbour {
            for t in targets.iter().filter(|t| t.label.starts_with("gateway")) {
                for row in noisy::measure(&bench, t, smoke) {
                    println!("  {}", row_line(&row));
                    rows.push(row);
                }
            }
            continue;
        }
        if *w == Workload::HalfRate {
            // Each gateway column at half of its own keep-alive maximum, with the direct run
            // and nginx at that same rate beside it.
            let groups: Vec<(String, f64)> = targets
                .iter()
                .filter(|t| t.label.starts_with("gateway"))
                .filter_map(|t| {
                    rows.iter()
                        .find(|r| {
                            r.workload == Workload::Get4k.name()
                                && r.target == t.label
                                && r.failed.is_none()
                                && r.rps > 0.0
                        })
                        .map(|r| (t.label.clone(), (r.rps / 2.0).round()))
                })
                .collect();
            if groups.is_empty() {
                println!("  skipped: needs the get-4k gateway run first");
                continue;
            }
            for (gateway, rate) in groups {
                let start = rows.len();
                for t in targets
                    .iter()
                    .filter(|t| t.label == "direct" || t.label == gateway || t.label == "nginx")
                {
                    let row = bench.measure(*w, t, Some(rate), false);
                    println!("  {}", row_line(&row));
                    rows.push(row);
                }
                if let Some(line) = added_latency_line(&rows[start..]) {
                    println!("  {line}");
                }
            }
            continue;
        }
        let rate = None;
        for t in &targets {
            let profile = Some(w) == workloads.iter().find(|w| **w != Workload::NoisyNeighbour)
                && t.label == targets_first_gateway(&targets);
            let row = bench.measure(*w, t, rate, profile);
            println!("  {}", row_line(&row));
            rows.push(row);
        }
        if let Some(ratio) = ratio_line(&rows, w.name()) {
            println!("  {ratio}");
        }
    }

    let mut idle_rows = Vec::new();
    if selected("idle") && idle > 0 {
        println!("\n{idle} idle mTLS connections (one request each, then held open)");
        for t in targets.iter().filter(|t| t.proxy.is_some()) {
            match bench.idle(t, idle) {
                Ok(r) => {
                    println!(
                        "  {:<16} RSS {:.1} MB before, {:.1} MB with {} open: {:.1} KB per connection",
                        r.target, r.rss_before_mb, r.rss_open_mb, r.open, r.kb_per_connection
                    );
                    idle_rows.push(r);
                }
                Err(e) => println!("  {:<16} failed: {e}", t.label),
            }
        }
    }

    let load_after = loadavg();
    println!("\n{}", table(&rows, &workloads, connections));
    println!(
        "load average before {load_before}, after {load_after} (the machine is shared: other builds add noise)"
    );
    if let Some(path) = &opts.json_out {
        let json = serde_json::json!({
            "key": format!("{key:?}"),
            "pinned": pin,
            "warmup_s": warmup.as_secs_f64(),
            "duration_s": duration.as_secs_f64(),
            "connections": connections,
            "nginx": nginx_version,
            "rows": rows,
            "idle": idle_rows,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        });
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }

    drop(procs_alive);
    drop(provider);

    if smoke {
        // A real error is a non-2xx answer other than the noisy consumer's expected 429s, or a
        // request sent that got no answer. Requests not sent (a fixed rate the generator's
        // connections could not keep up with on a busy machine) are the generator's, not the
        // proxy's, and do not fail the smoke.
        let failed: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                let non_2xx = r.responses.saturating_sub(r.ok);
                r.failed.is_some()
                    || r.ok == 0
                    || non_2xx > r.throttled.unwrap_or(0)
                    || r.unanswered > 0
            })
            .collect();
        let idle_failed = idle_rows.iter().filter(|r| r.open == 0).count();
        let passed = rows.len() - failed.len() + idle_rows.len() - idle_failed;
        for r in &failed {
            eprintln!(
                "smoke failure: {} {}: {}",
                r.workload,
                r.target,
                row_line(r)
            );
        }
        println!(
            "e2e-smoke: {passed} passed, {} failed",
            failed.len() + idle_failed
        );
        if !failed.is_empty() || idle_failed > 0 {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn targets_first_gateway(targets: &[Target]) -> &str {
    targets
        .iter()
        .find(|t| t.label.starts_with("gateway"))
        .map_or("", |t| t.label.as_str())
}

/// Removes the scratch directory at the end (unless kept).
struct Cleanup {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.keep {
            println!("scratch directory kept: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The bench PKI: CA + CRL, the gateway's server and client certificates, the provider's, and
/// the development consumer's (consumer.dev.local, registered for ASID 200000000359).
fn write_pki(dir: &Path, key: KeyKind) -> Result<(), String> {
    let e = |what: &str, err: &dyn std::fmt::Display| format!("bench PKI: {what}: {err}");
    let ca = Ca::new("ssp-gateway bench CA", key).map_err(|x| e("CA", &x))?;
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).map_err(|x| e("ca.pem", &x))?;
    std::fs::write(
        dir.join("ca.crl.pem"),
        ca.crl(&[]).map_err(|x| e("CRL", &x))?,
    )
    .map_err(|x| e("ca.crl.pem", &x))?;
    let leaves = [
        ("gateway", LeafSpec::server(&["localhost", "127.0.0.1"])),
        ("provider", LeafSpec::server(&["localhost", "127.0.0.1"])),
        ("gateway-client", LeafSpec::client(&["ssp.dev.local"])),
        ("consumer", LeafSpec::client(&["consumer.dev.local"])),
        // The read-only consumer (ASID 200000000360): the noisy neighbour.
        ("readonly", LeafSpec::client(&["readonly.dev.local"])),
    ];
    for (stem, spec) in leaves {
        let issued = ca.issue(&spec.with_key(key)).map_err(|x| e(stem, &x))?;
        issued
            .write(
                &dir.join(format!("{stem}.pem")),
                &dir.join(format!("{stem}-key.pem")),
            )
            .map_err(|x| e(stem, &x))?;
    }
    Ok(())
}

/// The gateway's bench configuration: every check on (CRL, JWT enforce, directory, catalogue),
/// JSON access log, and `extra` (a TOML snippet) merged over it.
fn gateway_config(
    dir: &Path,
    repo: &Path,
    port: u16,
    index: usize,
    extra: Option<&Path>,
) -> Result<String, String> {
    let d = dir.display();
    let admin = procs::free_port()?;
    let base = format!(
        r#"
[listener]
address = "127.0.0.1:{port}"
cert = "{d}/gateway.pem"
key = "{d}/gateway-key.pem"
client_ca = "{d}/ca.pem"
crls = ["{d}/ca.crl.pem"]
http2 = true
handshake_timeout = "10s"
header_read_timeout = "300s"
# The idle workload opens 10,000 connections with the one load-generator certificate.
max_connections_per_certificate = 20000

[admin]
address = "127.0.0.1:{admin}"

[upstream]
cert = "{d}/gateway-client.pem"
key = "{d}/gateway-client-key.pem"
ca = "{d}/ca.pem"
connect_timeout = "5s"
response_timeout = "30s"
pool_idle_timeout = "90s"
pool_max_idle_per_host = 64

[policy]
interactions = "{interactions}"
jwt = "enforce"
jwt_clock_skew = "60s"

[directory]
backend = "ldif"
ldif_file = "{d}/directory.ldif"

# One trail per gateway column (a trail belongs to one process).
[audit]
dir = "{d}/audit-{index}"

[log]
format = "json"
level = "info"

[shutdown]
grace_period = "1s"

# The per-consumer check runs on every request; the limit is far above any load here, so
# nothing is refused (one consumer certificate drives the whole benchmark), except for the
# noisy-neighbour workload's noisy consumer (the override).
[rate_limit]
requests_per_second = 10000000
burst = 10000000
max_in_flight = 100000
{noisy_override}
"#,
        interactions = repo.join("config/interactions.toml").display(),
        noisy_override = noisy::rate_limit_override(),
    );
    let mut table: toml::Table = base.parse().map_err(|e| format!("bench config: {e}"))?;
    if let Some(path) = extra {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let snippet: toml::Table = text
            .parse()
            .map_err(|e| format!("{}: not TOML: {e}", path.display()))?;
        merge(&mut table, snippet);
    }
    Ok(emit(&table))
}

/// Merges `over` into `base`, tables recursively, everything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Writes a TOML table (nested tables as `[a.b]` sections).
fn emit(table: &toml::Table) -> String {
    fn quote(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => {
                    let _ = write!(out, "\\u{:04X}", c as u32);
                }
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }
    fn key(k: &str) -> String {
        if !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            k.to_owned()
        } else {
            quote(k)
        }
    }
    fn value(v: &toml::Value) -> String {
        match v {
            toml::Value::String(s) => quote(s),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => format!("{f:?}"),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Datetime(d) => d.to_string(),
            toml::Value::Array(a) => {
                format!("[{}]", a.iter().map(value).collect::<Vec<_>>().join(", "))
            }
            toml::Value::Table(t) => format!(
                "{{ {} }}",
                t.iter()
                    .map(|(k, v)| format!("{} = {}", key(k), value(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    fn section(out: &mut String, path: &str, t: &toml::Table) {
        for (k, v) in t.iter().filter(|(_, v)| !v.is_table()) {
            let _ = writeln!(out, "{} = {}", key(k), value(v));
        }
        for (k, v) in t {
            if let toml::Value::Table(sub) = v {
                let p = if path.is_empty() {
                    key(k)
                } else {
                    format!("{path}.{}", key(k))
                };
                let _ = writeln!(out, "\n[{p}]");
                section(out, &p, sub);
            }
        }
    }
    let mut out = String::new();
    section(&mut out, "", table);
    out
}

impl Bench {
    fn load_args(&self, t: &Target) -> Vec<String> {
        let d = &self.dir;
        let f = |n: &str| d.join(n).display().to_string();
        vec![
            "loadtest".into(),
            "--url".into(),
            t.url.clone(),
            "--connect-to".into(),
            t.addr.to_string(),
            "--cert".into(),
            f("consumer.pem"),
            "--key".into(),
            f("consumer-key.pem"),
            "--cacert".into(),
            f("ca.pem"),
            "--threads".into(),
            "1".into(),
            "--timeout".into(),
            "10s".into(),
            "--json".into(),
            "--markers".into(),
        ]
    }

    /// One run of `w` against `t`, with the proxy's and provider's CPU over the measured window.
    fn measure(&self, w: Workload, t: &Target, rate: Option<f64>, profile: bool) -> Row {
        let mut args = self.load_args(t);
        let search = ssp_gateway::loadtest::default_search_query(chrono::Utc::now().date_naive());
        args.extend([
            "--connections".into(),
            self.connections.to_string(),
            "--warmup".into(),
            format!("{}ms", self.warmup.as_millis()),
            "--duration".into(),
            format!("{}ms", self.duration.as_millis()),
        ]);
        match w {
            Workload::Get4k => args.extend(["--mix".into(), "search=1".into()]),
            Workload::PostBook => {
                let body = self.dir.join("booking.json");
                if std::fs::write(&body, provider::BOOKING_REQUEST).is_err() {
                    return failed_row(w, t, "cannot write the booking body".into());
                }
                args.extend([
                    "--mix".into(),
                    "book=1".into(),
                    "--book-body".into(),
                    body.display().to_string(),
                ]);
            }
            Workload::Get178k => args.extend([
                "--mix".into(),
                "search=1".into(),
                "--search-query".into(),
                format!("{search}&{}", provider::LARGE_BUNDLE_PARAM),
            ]),
            Workload::NewConn => {
                args.extend(["--mix".into(), "search=1".into(), "--new-connection".into()])
            }
            Workload::HalfRate => args.extend([
                "--mix".into(),
                "search=1".into(),
                "--rate".into(),
                format!("{}", rate.unwrap_or(1.0)),
            ]),
            Workload::NoisyNeighbour => {
                return failed_row(w, t, "measured by noisy::measure".into());
            }
        }
        let proxy_tree = || t.proxy.map(procs::tree).unwrap_or_default();
        let provider_tree = vec![self.provider_pid];
        let mut start = (0u64, 0u64);
        let mut end = (0u64, 0u64);
        let mut rss = 0u64;
        let perf_file = self.perf.as_ref().filter(|_| profile);
        let mut perf: Option<std::process::Child> = None;
        let outcome = self.drive(&args, |line| {
            if line == "loadtest: measuring" {
                start = (
                    procs::cpu_ticks(&proxy_tree()),
                    procs::cpu_ticks(&provider_tree),
                );
                if let (Some(file), Some(pid)) = (perf_file, t.proxy) {
                    perf = start_perf(file, pid);
                }
            } else if line == "loadtest: measured" {
                let tree = proxy_tree();
                end = (procs::cpu_ticks(&tree), procs::cpu_ticks(&provider_tree));
                rss = procs::rss_kb(&tree);
                if let (Some(p), Some(file)) = (perf.take(), perf_file) {
                    stop_perf(p, file);
                }
            }
            false
        });
        let report = match outcome {
            Ok(r) => r,
            Err(e) => return failed_row(w, t, e),
        };
        let row = Row::from_report(w.name(), t.label.clone(), &report);
        let responses = row.responses;
        let per_req = |ticks: u64| {
            (responses > 0).then(|| ticks as f64 / self.ticks * 1e6 / responses as f64)
        };
        Row {
            proxy_cpu_us_per_req: t.proxy.and_then(|_| per_req(end.0.saturating_sub(start.0))),
            proxy_rss_mb: t.proxy.map(|_| rss as f64 / 1024.0),
            provider_cpu_us_per_req: per_req(end.1.saturating_sub(start.1)),
            rate,
            ..row
        }
    }

    /// Opens `count` idle connections to `t`'s proxy and reads its memory once they are open.
    fn idle(&self, t: &Target, count: usize) -> Result<IdleRow, String> {
        let tree = || t.proxy.map(procs::tree).unwrap_or_default();
        let before = procs::rss_kb(&tree());
        let mut args = self.load_args(t);
        args.extend([
            "--idle".into(),
            count.to_string(),
            "--connections".into(),
            "64".into(),
            "--mix".into(),
            "metadata=1".into(),
            "--duration".into(),
            "300s".into(),
        ]);
        let mut open = 0u64;
        let mut with = 0u64;
        self.drive(&args, |line| {
            match line.strip_prefix("loadtest: idle open ") {
                Some(n) => {
                    open = n.trim().parse().unwrap_or(0);
                    // Let the proxy settle, then read it and end the run.
                    std::thread::sleep(Duration::from_millis(500));
                    with = procs::rss_kb(&tree());
                    true
                }
                None => false,
            }
        })
        .or_else(|e| if open > 0 { Ok(Value::Null) } else { Err(e) })?;
        Ok(IdleRow {
            target: t.label.clone(),
            requested: count,
            open,
            rss_before_mb: before as f64 / 1024.0,
            rss_open_mb: with as f64 / 1024.0,
            kb_per_connection: if open > 0 {
                with.saturating_sub(before) as f64 / open as f64
            } else {
                0.0
            },
        })
    }

    /// Runs `ssp-gateway loadtest args` on the load core, calling `on_line` for each stderr
    /// line (returning true stops the load generator), and returns its JSON report.
    fn drive(
        &self,
        args: &[String],
        mut on_line: impl FnMut(&str) -> bool,
    ) -> Result<Value, String> {
        use std::io::{BufRead, BufReader, Read};
        let mut cmd = procs::pinned(&self.bin, self.pin.then_some(LOAD_CORE));
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the load generator: {e}"))?;
        let mut stdout = child.stdout.take().ok_or("no stdout")?;
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            let _ = stdout.read_to_string(&mut out);
            out
        });
        let mut other = Vec::new();
        let mut stopped = false;
        if let Some(stderr) = child.stderr.take() {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if on_line(line.trim()) && !stopped {
                    let _ = Command::new("kill")
                        .args(["-TERM", &child.id().to_string()])
                        .status();
                    stopped = true;
                } else if !line.starts_with("loadtest: ") {
                    other.push(line);
                }
            }
        }
        let status = child.wait().map_err(|e| format!("load generator: {e}"))?;
        let out = reader.join().unwrap_or_default();
        if stopped {
            return Ok(Value::Null);
        }
        let report: Value = serde_json::from_str(&out).map_err(|_| {
            format!(
                "load generator exited {status} without a report: {}",
                other.join(" | ")
            )
        })?;
        Ok(report)
    }
}

/// `perf record` of `pid` into `file`, or None (with a note) when perf cannot run.
fn start_perf(file: &Path, pid: u32) -> Option<std::process::Child> {
    let child = Command::new("perf")
        .args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "999",
            "--call-graph",
            "dwarf,16384",
            "-o",
        ])
        .arg(file)
        .args(["-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(c) => Some(c),
        Err(e) => {
            println!("  perf: cannot start `perf record`: {e}");
            None
        }
    }
}

/// Stops `perf record` (SIGINT, as Ctrl-C) and waits for it to write `file`.
fn stop_perf(mut perf: std::process::Child, file: &Path) {
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let _ = perf.wait();
    match std::fs::metadata(file) {
        Ok(m) if m.len() > 0 => println!(
            "  perf: profile in {} (this run includes perf's overhead); read it with `perf report -i {}`",
            file.display(),
            file.display()
        ),
        _ => println!("  perf: `perf record` wrote no profile"),
    }
}

fn failed_row(w: Workload, t: &Target, why: String) -> Row {
    Row {
        workload: w.name(),
        target: t.label.clone(),
        failed: Some(why),
        ..Row::default()
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

fn row_line(r: &Row) -> String {
    if let Some(why) = &r.failed {
        return format!("{:<16} failed: {why}", r.target);
    }
    let throttled = r
        .throttled
        .map_or(String::new(), |n| format!(" (429: {n})"));
    format!(
        "{:<16} {:>9.0} req/s  p50 {:.3}  p99 {:.3}  p99.9 {:.3} ms  errors {}{throttled}  proxy {} µs/req  RSS {} MB  provider {} µs/req",
        r.target,
        r.rps,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.errors,
        opt(r.proxy_cpu_us_per_req, 1),
        opt(r.proxy_rss_mb, 1),
        opt(r.provider_cpu_us_per_req, 1)
    )
}

/// gateway/nginx ratios of one workload, when both ran.
fn ratio_line(rows: &[Row], workload: &str) -> Option<String> {
    let of = |label: &str| {
        rows.iter()
            .find(|r| r.workload == workload && r.target == label && r.failed.is_none())
    };
    let nginx = of("nginx")?;
    let mut parts = Vec::new();
    for gw in rows
        .iter()
        .filter(|r| r.workload == workload && r.target.starts_with("gateway") && r.failed.is_none())
    {
        let cpu = match (gw.proxy_cpu_us_per_req, nginx.proxy_cpu_us_per_req) {
            (Some(g), Some(n)) if n > 0.0 => format!("{:.2}", g / n),
            _ => "-".into(),
        };
        let rps = if nginx.rps > 0.0 {
            format!("{:.2}", gw.rps / nginx.rps)
        } else {
            "-".into()
        };
        parts.push(format!(
            "{}/nginx: req/s x{rps}, CPU per request x{cpu}",
            gw.target
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// What each proxy adds over the direct run at the same fixed rate, p50 and p99.
fn added_latency_line(group: &[Row]) -> Option<String> {
    let direct = group
        .iter()
        .find(|r| r.target == "direct" && r.failed.is_none())?;
    let parts: Vec<String> = group
        .iter()
        .filter(|r| r.target != "direct" && r.failed.is_none())
        .map(|r| {
            format!(
                "{} adds p50 {:.3} ms, p99 {:.3} ms",
                r.target,
                r.p50_ms - direct.p50_ms,
                r.p99_ms - direct.p99_ms
            )
        })
        .collect();
    let rate = direct.rate.unwrap_or_default();
    (!parts.is_empty()).then(|| format!("at {rate:.0}/s: {}", parts.join("; ")))
}

/// The one table of the run.
fn table(rows: &[Row], workloads: &[Workload], connections: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| workload | target | req/s | p50 ms | p99 ms | p99.9 ms | errors | proxy CPU µs/req | proxy RSS MB | provider CPU µs/req | req/s vs direct | gateway/nginx req/s, CPU |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for w in workloads {
        // The rows to compare with: the same workload at the same rate (half-rate runs each
        // gateway column at its own rate, with direct and nginx beside it).
        let beside = |target: &str, rate: Option<f64>| {
            rows.iter().find(|r| {
                r.workload == w.name() && r.target == target && r.rate == rate && r.failed.is_none()
            })
        };
        for r in rows.iter().filter(|r| r.workload == w.name()) {
            let direct = beside("direct", r.rate);
            let nginx = beside("nginx", r.rate);
            let name = match (w, r.rate) {
                (Workload::HalfRate, Some(rate)) => format!("{} ({rate:.0}/s)", w.name()),
                _ => w.name().to_owned(),
            };
            if let Some(why) = &r.failed {
                let _ = writeln!(out, "| {name} | {} | failed: {why} ||||||||||", r.target);
                continue;
            }
            let vs_direct = match direct {
                Some(d) if d.rps > 0.0 && r.target != "direct" => format!("{:.2}", r.rps / d.rps),
                _ => "".into(),
            };
            let vs_nginx = match nginx {
                Some(n) if r.target.starts_with("gateway") && n.rps > 0.0 => {
                    let cpu = match (r.proxy_cpu_us_per_req, n.proxy_cpu_us_per_req) {
                        (Some(g), Some(nc)) if nc > 0.0 => format!("{:.2}", g / nc),
                        _ => "-".into(),
                    };
                    format!("{:.2}, {cpu}", r.rps / n.rps)
                }
                _ => "".into(),
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {vs_direct} | {vs_nginx} |",
                r.target,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.p999_ms,
                r.errors,
                opt(r.proxy_cpu_us_per_req, 1),
                opt(r.proxy_rss_mb, 1),
                opt(r.provider_cpu_us_per_req, 1),
            );
        }
    }
    let _ = write!(
        out,
        "({connections} connections; latency from the load generator; CPU from /proc utime+stime over the measured window)"
    );
    out
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn print_header(b: &Bench, key: KeyKind, smoke: bool, nginx: &str, load: &str) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "ssp-gateway e2e bench{}: {cpus} x {cpu}; load average {load}",
        if smoke { " (smoke test)" } else { "" }
    );
    println!(
        "  gateway {}; provider 127.0.0.1:{}; {nginx}; certificates {key:?}",
        b.bin.display(),
        b.provider_port
    );
    println!(
        "  {}; {}s warm-up + {}s measured per run",
        if b.pin {
            "load generator on CPU 0, proxy and provider on CPU 1 (taskset)"
        } else {
            "not pinned"
        },
        b.warmup.as_secs_f64(),
        b.duration.as_secs_f64()
    );
}
