//! `ssp-gateway loadtest`: a load generator for a deployed gateway (or, for a baseline, a
//! provider directly). It sends GP Connect requests with a valid SSP envelope and JWT from a
//! client certificate, over keep-alive HTTP/1.1 or HTTP/2 connections, or a new connection with
//! a full mTLS handshake per request, either as fast as the connections allow (closed loop) or
//! at a fixed rate with latency measured from each request's intended send time (so a stalled
//! server is not hidden: coordinated omission is accounted for), and reports an HdrHistogram of
//! latencies, throughput and errors by status, as text or JSON. It is what `cargo bench --bench
//! e2e` drives and what an operator runs against staging.
//!
//! Every request of the measured window is accounted for: a response, a failure (by kind, with
//! the first error in words), unfinished (sent, no answer by the end), or not sent (due at a
//! fixed rate while every connection was busy, and still not sent at the end, or waiting for
//! its connection's pause after a failure to end past the end). Requests still in flight from
//! the warm-up when the window opens count in it. At the end of the duration no request
//! starts; those in flight get until their `--timeout`, at most `--drain`. A request is
//! sent a second time, once, on a new connection only when its reused connection closed and it
//! was not sent at all, or (HTTP/1.1) it is an idempotent request (GET, PUT) that got no byte
//! of answer before the connection closed (RFC 9110 §9.2.2); never a POST that may have been
//! processed. A connection a failure closed is reopened after a pause (20 ms, doubling to 1 s).
//! It never follows redirects, and sends only to the address the URL (or `--connect-to`)
//! names.

mod conn;
mod link;
mod pace;
mod report;
mod request;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use rustls::pki_types::ServerName;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

pub use crate::ssp::jwt::{DEV_ISSUER, DEV_ODS, DEV_ROLE_PROFILE, DEV_USER_ID};
pub use conn::{Exchange, Failed, Failure};
pub use report::{
    FailureReport, IdleReport, InteractionReport, Latency, Report, RunShape, Scheduled, Sending,
    Stats, Window,
};
pub use request::{
    booking_bodies, default_search_query, Bookings, Identity, Kind, Mix, ServiceRoot,
};

use conn::{exchange, Dialer};
use link::{Link, Missed, Notes};
use pace::{Pacer, Slot};
use request::{Addressing, Factory};

/// The highest `--rate`: one request slot per microsecond. Far beyond what one generator can
/// send, and the pacer's clock needs a slot interval it can step (at 1e99/s the interval is
/// zero and every slot of the run is due at once).
const MAX_RATE: f64 = 1_000_000.0;

/// The lowest `--rate`: one request every 1,000 s. At 1e-300/s the slot interval is past what
/// a `Duration` can hold (a panic).
const MIN_RATE: f64 = 0.001;
/// The longest `--duration` and `--warmup`: a month-long soak is the most anyone runs.
const MAX_RUN: Duration = Duration::from_secs(30 * 24 * 3600);
/// The longest `--timeout` for one request.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The development world's full-access consumer ASID (`Ssp-From`).
pub const DEV_FROM: &str = "200000000359";
/// The development world's provider ASID (`Ssp-To`).
pub const DEV_TO: &str = "918999198993";
/// The most connections (or idle connections) one run opens.
pub const MAX_CONNECTIONS: usize = 100_000;
/// The most requests one HTTP/2 connection carries at once (`--streams`).
pub const MAX_STREAMS: usize = 1000;
/// The most requests one run keeps in flight at once: `--connections` × `--streams`. Each is
/// a task with its own request, response and HTTP/2 stream state; as many as the most
/// connections a run opens, so streams add no more than connections alone could (at 100,000 ×
/// 1,000 the run aborted on a failed memory allocation before sending anything).
pub const MAX_IN_FLIGHT: usize = MAX_CONNECTIONS;
/// Most runtime threads `--threads` may ask for.
pub const MAX_THREADS: usize = 256;
/// The largest setup search response read for free slots.
const MAX_SETUP_BODY: usize = 64 * 1024 * 1024;
/// The exit code of a run ended by Ctrl-C (128 + SIGINT, as a shell reports it).
const INTERRUPTED: u8 = 130;

/// What went wrong before any load was sent.
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error("--url {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("--mix {mix}: {reason}")]
    BadMix { mix: String, reason: String },
    #[error("{what}: {reason}")]
    BadArg { what: &'static str, reason: String },
    #[error("client TLS: {0}")]
    Tls(#[from] crate::tls::TlsProblems),
    #[error("--book-body {path}: {source}")]
    BookBody {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach {target}: {reason}")]
    Unreachable { target: String, reason: String },
    #[error("setup search for free slots to book: {0}")]
    Setup(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start the fixed-rate pacer thread: {0}")]
    Pacer(std::io::Error),
    #[error("interrupted before the load started")]
    Interrupted,
}

/// The command line of `ssp-gateway loadtest`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The GP Connect service root to load: the gateway URL followed by the provider's
    /// registered endpoint (https://gw:8443/https://provider/B82617/STU3/1/gpconnect), or a
    /// provider's own service root for a direct baseline.
    #[arg(long)]
    pub url: String,
    /// Client certificate chain (PEM) presented on every connection.
    #[arg(long)]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// CA bundle (PEM) the server certificate must chain to.
    #[arg(long)]
    pub cacert: PathBuf,
    /// Connect to this address instead of resolving the URL's host (which still gives the TLS
    /// server name and the Host header).
    #[arg(long)]
    pub connect_to: Option<SocketAddr>,
    /// Interaction mix, `name=weight,...` from `metadata` (GET metadata), `search` (GET Slot)
    /// and `book` (POST Appointment).
    #[arg(long, default_value = "search=1")]
    pub mix: String,
    /// Query of the slot search (default: free slots from tomorrow for 7 days, with schedules).
    #[arg(long)]
    pub search_query: Option<String>,
    /// Replay this recorded POST Appointment body for every booking. Without it, a setup search
    /// finds free slots and each is booked once in turn (409 once they are all used).
    #[arg(long)]
    pub book_body: Option<PathBuf>,
    /// Logical id of the patient generated bookings are for.
    #[arg(long, default_value = "1")]
    pub patient: String,
    /// ODS code of the consumer organisation: the JWT's requesting_organization and the
    /// booking organisation of generated bookings.
    #[arg(long, visible_alias = "consumer-ods", default_value = DEV_ODS)]
    pub ods: String,
    /// The JWT's `iss`: the consumer system's URL (its device and user-guid identifiers are
    /// `{iss}/Id/device` and `{iss}/Id/user-guid`).
    #[arg(long, default_value = DEV_ISSUER)]
    pub jwt_issuer: String,
    /// The JWT practitioner's SDS user id.
    #[arg(long, default_value = DEV_USER_ID)]
    pub sds_user_id: String,
    /// The JWT practitioner's SDS role profile id.
    #[arg(long, default_value = DEV_ROLE_PROFILE)]
    pub sds_role_profile_id: String,
    /// Ssp-From: the sending system's ASID.
    #[arg(long, default_value = DEV_FROM)]
    pub from: String,
    /// Ssp-To: the receiving provider's ASID.
    #[arg(long, default_value = DEV_TO)]
    pub to: String,
    /// Concurrent connections (keep-alive), or concurrent connection openers.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Concurrent requests per connection (HTTP/2 keep-alive connections only), at most 1,000;
    /// `--connections` × `--streams` at most 100,000.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Use HTTP/2 (ALPN h2) instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// A new TCP connection and full TLS handshake (no resumption) for every request.
    #[arg(long, conflicts_with = "idle")]
    pub new_connection: bool,
    /// Send at this fixed rate (requests per second, all connections together) and measure
    /// latency from each request's intended send time; without it, each connection sends its
    /// next request as soon as the last is answered. From 0.001 to 1,000,000.
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long to measure, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Load sent before measuring starts (not in the figures).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// A request without a complete response in this time counts as a timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// After the duration, requests in flight get until their --timeout, but no longer than
    /// this, to finish (default: --timeout); those still without an answer are unfinished.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub drain: Option<Duration>,
    /// Exit 1 when more than this share (0 to 1) of the requests due got no 2xx answer.
    /// Without it, only a run in which nothing succeeded exits 1.
    #[arg(long)]
    pub max_error_ratio: Option<f64>,
    /// Open this many connections (the first request of the mix on each), then hold them idle
    /// until the duration is over: for memory measurements. `--connections` open at once.
    #[arg(long)]
    pub idle: Option<usize>,
    /// Runtime worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print `loadtest: measuring` and `loadtest: measured` (idle mode: `loadtest: idle open`)
    /// on stderr as the measured window opens and closes, for harnesses that sample the
    /// server's CPU time over exactly that window.
    #[arg(long)]
    pub markers: bool,
}

impl Args {
    /// The command-line defaults for a run against `url` with the given TLS files.
    pub fn new(url: &str, cert: PathBuf, key: PathBuf, cacert: PathBuf) -> Args {
        Args {
            url: url.to_owned(),
            cert,
            key,
            cacert,
            connect_to: None,
            mix: "search=1".into(),
            search_query: None,
            book_body: None,
            patient: "1".into(),
            ods: DEV_ODS.into(),
            jwt_issuer: DEV_ISSUER.into(),
            sds_user_id: DEV_USER_ID.into(),
            sds_role_profile_id: DEV_ROLE_PROFILE.into(),
            from: DEV_FROM.into(),
            to: DEV_TO.into(),
            connections: 32,
            streams: 1,
            http2: false,
            new_connection: false,
            rate: None,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
            drain: None,
            max_error_ratio: None,
            idle: None,
            threads: None,
            json: false,
            markers: false,
        }
    }
}

/// How connections are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each connection carries request after request.
    KeepAlive,
    /// Each request gets its own connection and full handshake.
    NewConnection,
    /// Open this many connections, one request each, then hold them.
    Idle(usize),
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::NewConnection => "new-connection",
            Mode::Idle(_) => "idle",
        }
    }
}

/// A validated run.
pub struct Settings {
    pub root: ServiceRoot,
    pub url: String,
    pub connect_to: Option<SocketAddr>,
    pub tls: Arc<rustls::ClientConfig>,
    pub http2: bool,
    pub connections: usize,
    pub streams: usize,
    pub mode: Mode,
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub duration: Duration,
    pub timeout: Duration,
    pub drain: Duration,
    pub max_error_ratio: Option<f64>,
    pub mix: Mix,
    pub search_query: String,
    pub book_body: Option<Bytes>,
    pub patient: String,
    pub identity: Identity,
    pub from: String,
    pub to: String,
    pub markers: bool,
    /// The TLS server name: the URL's host.
    server_name: ServerName<'static>,
    /// Every request's target and Host, Ssp-From and Ssp-To values.
    addressing: Addressing,
}

impl Settings {
    /// Checks the arguments and loads the TLS material and any recorded body.
    pub fn from_args(args: &Args) -> Result<Settings, LoadtestError> {
        let bad = |what: &'static str, reason: &str| LoadtestError::BadArg {
            what,
            reason: reason.to_owned(),
        };
        let root = ServiceRoot::parse(&args.url)?;
        let mix = Mix::parse(&args.mix)?;
        if args.connections == 0 || args.connections > MAX_CONNECTIONS {
            return Err(bad("--connections", "must be 1 to 100000"));
        }
        if args.threads.is_some_and(|n| n == 0 || n > MAX_THREADS) {
            return Err(bad("--threads", &format!("must be 1 to {MAX_THREADS}")));
        }
        if args.streams == 0 || args.streams > MAX_STREAMS {
            return Err(bad("--streams", &format!("must be 1 to {MAX_STREAMS}")));
        }
        if args.streams > 1 && !args.http2 {
            return Err(bad(
                "--streams",
                "several requests per connection need --http2",
            ));
        }
        // (NaN and infinities are outside the range too.)
        if args
            .rate
            .is_some_and(|rate| !(MIN_RATE..=MAX_RATE).contains(&rate))
        {
            let range = format!("must be from {MIN_RATE} to {MAX_RATE} requests/s");
            return Err(bad("--rate", &range));
        }
        if args.duration.is_zero() {
            return Err(bad("--duration", "must be above 0"));
        }
        if args.timeout.is_zero() {
            return Err(bad("--timeout", "must be above 0"));
        }
        if args
            .max_error_ratio
            .is_some_and(|r| !(0.0..=1.0).contains(&r))
        {
            return Err(bad("--max-error-ratio", "must be from 0 to 1"));
        }
        let drain = args.drain.unwrap_or(args.timeout);
        // Beyond these the run's deadlines overflow the clock (a panic, not a long run).
        for (flag, value, most) in [
            ("--duration", args.duration, MAX_RUN),
            ("--warmup", args.warmup, MAX_RUN),
            ("--timeout", args.timeout, MAX_TIMEOUT),
            ("--drain", drain, MAX_TIMEOUT),
        ] {
            if value > most {
                let most = humantime::format_duration(most);
                return Err(bad(flag, &format!("must be at most {most}")));
            }
        }
        let mode = match (args.new_connection, args.idle) {
            (true, Some(_)) => {
                return Err(bad("--idle", "cannot be combined with --new-connection"))
            }
            (true, None) => Mode::NewConnection,
            (false, Some(n)) if n == 0 || n > MAX_CONNECTIONS => {
                return Err(bad("--idle", "must be 1 to 100000"))
            }
            (false, Some(n)) => Mode::Idle(n),
            (false, None) => Mode::KeepAlive,
        };
        if args.streams > 1 && mode != Mode::KeepAlive {
            return Err(bad(
                "--streams",
                &format!(
                    "several requests per connection need keep-alive connections; --{} sends \
                     one request per connection",
                    if args.new_connection {
                        "new-connection"
                    } else {
                        "idle"
                    }
                ),
            ));
        }
        // (Both are bounded above, so the product cannot overflow.)
        let in_flight = args.connections * args.streams;
        if in_flight > MAX_IN_FLIGHT {
            let (c, s) = (args.connections, args.streams);
            return Err(bad(
                "--connections × --streams",
                &format!(
                    "{c} × {s} = {in_flight} requests in flight at once; at most {MAX_IN_FLIGHT}"
                ),
            ));
        }
        if args.rate.is_some() && matches!(mode, Mode::Idle(_)) {
            return Err(bad("--rate", "has no meaning with --idle"));
        }
        let book_body = match &args.book_body {
            Some(path) => Some(Bytes::from(crate::files::read(path).map_err(|source| {
                LoadtestError::BookBody {
                    path: path.clone(),
                    source,
                }
            })?)),
            None => None,
        };
        let tls = conn::client_tls(
            &crate::tls::ClientTls {
                cert: args.cert.clone(),
                key: args.key.clone(),
                ca: args.cacert.clone(),
                crls: Vec::new(),
            },
            args.http2,
        )?;
        let search_query = args
            .search_query
            .clone()
            .unwrap_or_else(|| default_search_query(chrono::Utc::now().date_naive()));
        // Checked here, not when the first request is made: an argument no request can carry
        // is refused before any connection, not hidden behind an unreachable server.
        let server_name =
            ServerName::try_from(root.host.clone()).map_err(|_| LoadtestError::BadUrl {
                url: args.url.clone(),
                reason: "the host is not a valid TLS server name".into(),
            })?;
        let addressing = Addressing::new(&root, &args.from, &args.to, &search_query)?;
        Ok(Settings {
            root,
            url: args.url.clone(),
            connect_to: args.connect_to,
            tls,
            http2: args.http2,
            connections: args.connections,
            streams: args.streams,
            mode,
            rate: args.rate,
            warmup: args.warmup,
            duration: args.duration,
            timeout: args.timeout,
            drain,
            max_error_ratio: args.max_error_ratio,
            mix,
            search_query,
            book_body,
            patient: args.patient.clone(),
            identity: Identity {
                issuer: args.jwt_issuer.clone(),
                ods: args.ods.clone(),
                user_id: args.sds_user_id.clone(),
                role_profile: args.sds_role_profile_id.clone(),
            },
            from: args.from.clone(),
            to: args.to.clone(),
            markers: args.markers,
            server_name,
            addressing,
        })
    }

    fn shape(&self) -> RunShape {
        RunShape {
            url: self.url.clone(),
            mode: self.mode.label(),
            protocol: if self.http2 { "h2" } else { "http/1.1" },
            connections: self.connections,
            streams_per_connection: self.streams,
            rate: self.rate,
            mix: self.mix.describe(),
            // The idle mode has no warm-up: its whole duration is the hold.
            warmup_s: match self.mode {
                Mode::Idle(_) => 0.0,
                _ => self.warmup.as_secs_f64(),
            },
            duration_s: self.duration.as_secs_f64(),
            drain_s: self.drain.as_secs_f64(),
        }
    }
}

/// The exit code of a refused argument, as clap's own usage errors.
const REFUSED: u8 = 2;

/// `ssp-gateway loadtest`: runs, prints the report, and exits 1 when nothing succeeded, the
/// error ratio is above `--max-error-ratio` or the run could not start, 2 when an argument is
/// refused (both with `--json` also as a JSON object with an `error` field on stdout), 130
/// after a Ctrl-C (the first ends the run and prints the partial report; a second exits at
/// once; before the load starts, it ends the command with that JSON error and no report).
pub fn cli(args: Args) -> ExitCode {
    let failed = |e: &LoadtestError| {
        eprintln!("error: {e}");
        if args.json {
            println!("{}", serde_json::json!({ "error": e.to_string() }));
        }
        ExitCode::FAILURE
    };
    // Checked before the runtime is built with the threads asked for, and before any
    // connection: whatever is wrong here is the command line's (a value, a combination, a file
    // it names), so it exits as clap's usage errors do.
    let settings = match Settings::from_args(&args) {
        Ok(settings) => settings,
        Err(e) => {
            failed(&e);
            return ExitCode::from(REFUSED);
        }
    };
    let max_error_ratio = settings.max_error_ratio;
    let threads = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let result = runtime.map_err(LoadtestError::Runtime).and_then(|rt| {
        rt.block_on(async {
            let interrupt = CancellationToken::new();
            let ctrl_c = tokio::spawn(on_ctrl_c(interrupt.clone()));
            let result = run_until(settings, interrupt).await;
            ctrl_c.abort();
            result
        })
    });
    let report = match result {
        Ok(report) => report,
        Err(LoadtestError::Interrupted) => {
            let e = LoadtestError::Interrupted;
            failed(&e);
            return ExitCode::from(INTERRUPTED);
        }
        Err(e) => return failed(&e),
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    // Only a 2xx answer is a success, in the idle mode too: a connection held after a refusal
    // (a 403, a 429) is no sign that the target works.
    let succeeded = report.ok > 0;
    if report.interrupted {
        eprintln!("loadtest: interrupted; the report is of the part measured");
        ExitCode::from(INTERRUPTED)
    } else if !succeeded {
        eprintln!("loadtest: no request succeeded");
        ExitCode::FAILURE
    } else if let Some(most) = max_error_ratio.filter(|&most| report.error_ratio() > most) {
        eprintln!(
            "loadtest: {} errors in {} requests due ({:.4}), above --max-error-ratio {most}",
            report.errors,
            report.due,
            report.error_ratio()
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The first Ctrl-C ends the run (its report is printed); a second exits at once.
async fn on_ctrl_c(interrupt: CancellationToken) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    eprintln!("loadtest: interrupted, ending the run (Ctrl-C again to exit at once)");
    interrupt.cancel();
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(i32::from(INTERRUPTED));
    }
}

/// Everything the workers of one run share.
struct Run {
    dialer: Dialer,
    factory: Factory,
    mix: Mix,
    mode: Mode,
    http2: bool,
    /// When the run (its warm-up, its fixed-rate schedule) began.
    start: Instant,
    /// Start of the measured window, its end, and the end of the drain after it.
    measure_from: Instant,
    end: Instant,
    drain_end: Instant,
    timeout: Duration,
    /// Ctrl-C: the run ends now (requests in flight are unfinished).
    interrupt: CancellationToken,
    /// When it was interrupted.
    interrupted_at: OnceLock<Instant>,
    /// At a fixed rate, the slots and their due times.
    pacer: Option<Pacer>,
    /// What the workers measured. Shared, not one per worker: a worker's histograms would be
    /// about 750 KB, 75 GB at 100,000 connections.
    stats: StatShards,
}

/// Shards of the run's statistics; worker `id` records into shard `id % STAT_SHARDS`, so
/// workers on different threads rarely wait for each other's lock.
struct StatShards(Vec<std::sync::Mutex<Stats>>);

const STAT_SHARDS: usize = 16;

impl StatShards {
    fn new() -> StatShards {
        StatShards((0..STAT_SHARDS).map(|_| Default::default()).collect())
    }

    fn record<R>(&self, id: usize, f: impl FnOnce(&mut Stats) -> R) -> R {
        let mut stats = self.0[id % STAT_SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut stats)
    }

    fn total(&self) -> Stats {
        let mut total = Stats::default();
        for shard in &self.0 {
            total.merge(
                &shard
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
        }
        total
    }
}

impl Run {
    /// The next request to send: at a fixed rate, the next released slot (None once none is
    /// left, or a late one after the end), late when due before `free_since`, when the asking
    /// worker became free; closed loop, now (None once the run is over). `interrupt` is the
    /// asking worker's child of the run's token.
    async fn next_slot(&self, free_since: Instant, interrupt: &CancellationToken) -> Option<Slot> {
        match &self.pacer {
            Some(pacer) => pacer.next(free_since, self.end, interrupt).await,
            None => {
                let now = Instant::now();
                (now < self.end && !interrupt.is_cancelled()).then_some(Slot {
                    due: now,
                    late: false,
                })
            }
        }
    }

    /// The end of the window: its planned end, or the interruption before it.
    fn window_end(&self) -> Instant {
        self.interrupted_at
            .get()
            .map_or(self.end, |&at| at.min(self.end))
    }

    /// What the window was, once every worker has stopped. Interrupted in the warm-up, the
    /// window never opened: nothing of it was due, and the warm-up's slots not yet sent were
    /// never waiting at its start (they are not `from_warmup`).
    fn window(&self) -> Window {
        let window_end = self.window_end();
        let schedule = self.pacer.as_ref().map(|pacer| {
            if window_end <= self.measure_from {
                return Scheduled {
                    due_in_window: 0,
                    not_sent: 0,
                    not_sent_from_warmup: 0,
                };
            }
            let taken = pacer.taken();
            let total = pacer.due_before(window_end).max(taken);
            let first_in_window = pacer.due_before(self.measure_from);
            Scheduled {
                due_in_window: total.saturating_sub(first_in_window),
                not_sent: total - taken,
                not_sent_from_warmup: first_in_window.saturating_sub(taken),
            }
        });
        Window {
            measured: window_end.saturating_duration_since(self.measure_from),
            interrupted: self.interrupted_at.get().is_some(),
            schedule,
        }
    }
}

/// Runs the load described by `settings` and reports what was measured.
pub async fn run(settings: Settings) -> Result<Report, LoadtestError> {
    run_until(settings, CancellationToken::new()).await
}

/// [`run`], ended early when `interrupt` is cancelled: the report is then of the part
/// measured, marked as interrupted.
pub async fn run_until(
    settings: Settings,
    interrupt: CancellationToken,
) -> Result<Report, LoadtestError> {
    let root = settings.root.clone();
    let mut dialer = Dialer {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        server_name: settings.server_name.clone(),
        tls: tokio_rustls::TlsConnector::from(settings.tls.clone()),
        http2: settings.http2,
    };
    let setup = async {
        dialer.addr = resolve(&root, settings.connect_to, settings.timeout, &dialer).await?;
        let bookings = if settings.mix.contains(Kind::Book) {
            Some(match &settings.book_body {
                Some(body) => Bookings::Replay(body.clone()),
                None => free_slot_bookings(&settings, &dialer).await?,
            })
        } else {
            None
        };
        Ok::<_, LoadtestError>(bookings)
    };
    let bookings = tokio::select! {
        bookings = setup => bookings?,
        () = interrupt.cancelled() => return Err(LoadtestError::Interrupted),
    };
    let book_slots = bookings.as_ref().and_then(Bookings::slots);
    let factory = Factory::new(
        root,
        settings.identity.clone(),
        settings.addressing.clone(),
        bookings,
        settings.mode == Mode::NewConnection,
    );

    let start = Instant::now();
    let (measure_from, end) = match settings.mode {
        // Idle: the whole duration is the hold; there is no warm-up.
        Mode::Idle(_) => (start, start + settings.duration),
        _ => (
            start + settings.warmup,
            start + settings.warmup + settings.duration,
        ),
    };
    // Workers sharing one connection: above one only on keep-alive HTTP/2 connections
    // (`Settings::from_args` refuses `--streams` otherwise).
    let per_connection = settings.streams;
    let pacer = match settings.rate {
        Some(rate) if !matches!(settings.mode, Mode::Idle(_)) => Some(
            Pacer::start(
                start,
                Duration::from_secs_f64(1.0 / rate),
                end,
                settings.connections * per_connection,
            )
            .map_err(LoadtestError::Pacer)?,
        ),
        _ => None,
    };
    let run = Arc::new(Run {
        dialer,
        factory,
        mix: settings.mix.clone(),
        mode: settings.mode,
        http2: settings.http2,
        start,
        measure_from,
        end,
        drain_end: end + settings.drain,
        timeout: settings.timeout,
        interrupt: interrupt.clone(),
        interrupted_at: OnceLock::new(),
        pacer,
        stats: StatShards::new(),
    });

    let refresher = {
        let run = run.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                run.factory.refresh_tokens();
            }
        })
    };
    let watcher = {
        let run = run.clone();
        tokio::spawn(async move {
            run.interrupt.cancelled().await;
            let _ = run.interrupted_at.set(Instant::now());
            if let Some(pacer) = &run.pacer {
                pacer.stop();
            }
        })
    };
    let markers = settings.markers.then(|| {
        let run = run.clone();
        tokio::spawn(async move {
            if !matches!(run.mode, Mode::Idle(_)) {
                tokio::select! {
                    () = sleep_until(run.measure_from) => {}
                    () = run.interrupt.cancelled() => return,
                }
                eprintln!("loadtest: measuring");
                tokio::select! {
                    () = sleep_until(run.end) => {}
                    () = run.interrupt.cancelled() => {}
                }
                eprintln!("loadtest: measured");
            }
        })
    });

    let (stats, idle) = match settings.mode {
        Mode::Idle(n) => {
            let (stats, idle) = hold_idle(&run, n, settings.connections, settings.markers).await;
            (stats, Some(idle))
        }
        _ => (
            drive(&run, settings.connections, per_connection).await,
            None,
        ),
    };
    refresher.abort();
    // The watcher may not have run yet; a Ctrl-C after the last worker stopped changes
    // nothing.
    watcher.abort();
    let _ = watcher.await;
    if run.interrupt.is_cancelled() {
        let _ = run.interrupted_at.set(Instant::now());
    }
    if let Some(m) = markers {
        let _ = m.await;
    }
    Ok(Report::new(
        settings.shape(),
        &stats,
        run.window(),
        book_slots,
        idle,
    ))
}

/// The address to connect to: `--connect-to`, or the first resolved address that answers a TLS
/// handshake (see [`Dialer::probe`]).
async fn resolve(
    root: &ServiceRoot,
    connect_to: Option<SocketAddr>,
    limit: Duration,
    dialer: &Dialer,
) -> Result<SocketAddr, LoadtestError> {
    if let Some(addr) = connect_to {
        return Ok(addr);
    }
    let target = format!("{}:{}", root.host, root.port);
    let unreachable = |reason: String| LoadtestError::Unreachable {
        target: target.clone(),
        reason,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((root.host.as_str(), root.port))
        .await
        .map_err(|e| unreachable(format!("cannot resolve: {e}")))?
        .collect();
    let mut last = String::from("the name has no address");
    for addr in addrs {
        match dialer.probe(addr, limit).await {
            Ok(()) => return Ok(addr),
            Err(reason) => last = reason,
        }
    }
    Err(unreachable(last))
}

/// Finds free slots with one search and makes a booking body for each.
async fn free_slot_bookings(
    settings: &Settings,
    dialer: &Dialer,
) -> Result<Bookings, LoadtestError> {
    let setup = |reason: String| LoadtestError::Setup(reason);
    let factory = Factory::new(
        settings.root.clone(),
        settings.identity.clone(),
        settings.addressing.clone(),
        None,
        false,
    );
    let fetch = async {
        let mut conn = dialer
            .open()
            .await
            .map_err(|f| setup(format!("connecting: {f}")))?;
        let req = factory.build(Kind::Search, settings.http2);
        let resp = conn::send(&mut conn.sender, &conn.wire, req)
            .await
            .map_err(|e| setup(format!("request failed: {}", e.failed)))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_SETUP_BODY)
            .collect()
            .await
            .map_err(|e| setup(format!("reading the Bundle: {e}")))?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err(setup(format!("status {status}: {text}")));
        }
        Ok(body)
    };
    let body = tokio::time::timeout(settings.timeout, fetch)
        .await
        .map_err(|_| setup("no answer within --timeout".into()))??;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
    let bodies = booking_bodies(&body, &settings.patient, &settings.identity.ods, &now);
    if bodies.is_empty() {
        return Err(setup(
            "the search found no free slot; widen --search-query or replay a recorded body with --book-body".into(),
        ));
    }
    Ok(Bookings::Slots {
        bodies,
        next: AtomicUsize::new(0),
    })
}

/// Keep-alive or new-connection load: `connections` links, each with `per_connection` workers
/// (HTTP/2 streams sharing its connection) sending until the end.
async fn drive(run: &Arc<Run>, connections: usize, per_connection: usize) -> Stats {
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            let link = Link::new(run.mode == Mode::NewConnection, run.http2);
            let workers = (0..per_connection).map(|s| worker(&run, c * per_connection + s, &link));
            futures_util::future::join_all(workers).await;
        }));
    }
    for task in tasks {
        if let Err(e) = task.await {
            eprintln!("loadtest: a worker failed: {e}");
        }
    }
    run.stats.total()
}

/// How one request ended.
enum Outcome {
    Response(Exchange),
    Failed(Failed),
    /// No complete response within `--timeout`.
    Timeout,
    /// Still in flight when the drain was over or the run was interrupted.
    Unfinished,
    /// Not sent: the run's end came while its connection was pausing after a failure.
    NotSent,
}

/// One worker: sends request after request (or one per due time at a fixed rate) until the
/// run ends, then lets its last one finish within the drain.
async fn worker(run: &Run, id: usize, link: &Link) {
    // The worker's own token: waiting on the run's shared one would register on its one lock
    // with every request of every worker.
    let interrupt = run.interrupt.child_token();
    let mut n = id;
    // Since when the worker has been free to send, for `late`: for its first request, the
    // run's start (it was idle, only perhaps not yet running: a slot due before it first asks
    // is not late); then the end of its last request, or the end of its connection's pause
    // (None: when it asks).
    let mut free_since = Some(run.start);
    loop {
        // After a failure that closed the connection, the link pauses before the next
        // attempt; closed loop, that pause is no request's latency.
        if let Some(at) = link.paused_until().await {
            tokio::select! {
                () = sleep_until(at.min(run.end)) => {}
                () = interrupt.cancelled() => break,
            }
            free_since = None;
        }
        let asked = free_since.take().unwrap_or_else(Instant::now);
        let Some(slot) = run.next_slot(asked, &interrupt).await else {
            break;
        };
        let kind = run.mix.kind(n);
        n += 1;
        let body = run.factory.body(kind);
        let limit = Instant::now() + run.timeout;
        let mut notes = Notes::default();
        let outcome = {
            let build = || run.factory.request(kind, run.http2, body.clone());
            let exchange = link.exchange(&run.dialer, build, run.end, &mut notes);
            tokio::select! {
                result = exchange => match result {
                    Ok(done) => Outcome::Response(done),
                    Err(Missed::Failed(failed)) => Outcome::Failed(failed),
                    Err(Missed::Ended) => Outcome::NotSent,
                },
                () = sleep_until(limit.min(run.drain_end)) => {
                    if limit <= run.drain_end {
                        Outcome::Timeout
                    } else {
                        Outcome::Unfinished
                    }
                }
                () = interrupt.cancelled() => Outcome::Unfinished,
            }
        };
        let done = Instant::now();
        if done >= run.measure_from {
            let sending = Sending {
                from_warmup: slot.due < run.measure_from,
                late: slot.late,
                reconnects: notes.reconnects,
                retried: notes.retried,
            };
            run.stats.record(id, |s| {
                s.request(sending);
                match &outcome {
                    Outcome::Response(r) => {
                        let latency = done - slot.due;
                        s.response(kind, r.status.as_u16(), latency, r.bytes, done >= run.end);
                    }
                    Outcome::Failed(f) => s.failure(f.kind, done.into_std(), || f.message()),
                    Outcome::Timeout => s.failure(Failure::Timeout, done.into_std(), || {
                        let limit = humantime::format_duration(run.timeout);
                        format!("no complete response within --timeout {limit}")
                    }),
                    Outcome::Unfinished => s.unfinished(),
                    Outcome::NotSent => s.not_sent(),
                }
            });
        }
        match outcome {
            Outcome::Response(_) | Outcome::Failed(_) => free_since = Some(done),
            Outcome::Timeout => link.abandoned().await,
            Outcome::Unfinished | Outcome::NotSent => break,
        }
    }
}

/// Idle mode: opens `count` connections, `parallel` at a time, sends one request on each, and
/// holds them all until the run ends. Every one of `count` is accounted for: an attempt still
/// going at the end (or at Ctrl-C) is unfinished, and one never started is not sent.
async fn hold_idle(
    run: &Arc<Run>,
    count: usize,
    parallel: usize,
    markers: bool,
) -> (Stats, IdleReport) {
    let started = Instant::now();
    let claimed = Arc::new(AtomicUsize::new(0));
    let mut openers = Vec::with_capacity(parallel.min(count));
    for id in 0..parallel.min(count) {
        let run = run.clone();
        let claimed = claimed.clone();
        openers.push(tokio::spawn(async move {
            let interrupt = run.interrupt.child_token();
            let mut held = Vec::new();
            let mut failed = 0usize;
            let mut attempted = 0usize;
            // No attempt starts once the run is over (the claim comes last: a connection
            // claimed is attempted).
            while Instant::now() < run.end
                && !interrupt.is_cancelled()
                && claimed.fetch_add(1, Ordering::Relaxed) < count
            {
                attempted += 1;
                let t = Instant::now();
                let limit = t + run.timeout;
                let kind = run.mix.kind(0);
                let attempt = async {
                    let mut conn = run.dialer.open().await?;
                    let done = exchange(&mut conn, run.factory.build(kind, run.http2)).await?;
                    Ok::<_, Failed>((done, conn))
                };
                let mut conn = None;
                let outcome = tokio::select! {
                    biased;
                    r = attempt => match r {
                        Ok((done, c)) => {
                            conn = Some(c);
                            Outcome::Response(done)
                        }
                        Err(f) => Outcome::Failed(f),
                    },
                    () = sleep_until(limit.min(run.end)) => {
                        if limit <= run.end {
                            Outcome::Timeout
                        } else {
                            Outcome::Unfinished
                        }
                    }
                    () = interrupt.cancelled() => Outcome::Unfinished,
                };
                let at = Instant::now();
                run.stats.record(id, |s| {
                    s.request(Sending::default());
                    match &outcome {
                        Outcome::Response(done) => {
                            let status = done.status.as_u16();
                            s.response(kind, status, at - t, done.bytes, false);
                        }
                        Outcome::Failed(f) => s.failure(f.kind, at.into_std(), || f.message()),
                        Outcome::Timeout => s.failure(Failure::Timeout, at.into_std(), || {
                            let limit = humantime::format_duration(run.timeout);
                            format!("no complete response within --timeout {limit}")
                        }),
                        Outcome::Unfinished => s.unfinished(),
                        Outcome::NotSent => s.not_sent(),
                    }
                });
                match (conn, outcome) {
                    (Some(conn), _) => held.push(conn),
                    (None, Outcome::Unfinished) => break,
                    (None, _) => failed += 1,
                }
            }
            (held, failed, attempted)
        }));
    }
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    let mut attempted = 0;
    for opener in openers {
        match opener.await {
            Ok((h, f, a)) => {
                held.extend(h);
                failed += f;
                attempted += a;
            }
            Err(e) => eprintln!("loadtest: an opener failed: {e}"),
        }
    }
    // The connections the run ended (or was interrupted) before attempting.
    run.stats.record(0, |s| {
        for _ in attempted..count {
            s.request(Sending::default());
            s.not_sent();
        }
    });
    let open_after = started.elapsed();
    if markers {
        eprintln!("loadtest: idle open {}", held.len());
    }
    tokio::select! {
        () = sleep_until(run.end) => {}
        () = run.interrupt.cancelled() => {}
    }
    let report = IdleReport {
        requested: count,
        open: held.len(),
        failed,
        open_after_s: open_after.as_secs_f64(),
    };
    drop(held);
    (run.stats.total(), report)
}
