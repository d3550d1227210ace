//! The audit trail: JSON Lines, one record per event, append-only, hash-chained, rotated by size,
//! file mode 0600. The request path hands records to `Audit`; one dedicated writer thread (never
//! the async runtime) writes them with group commit — every record that arrived while the
//! previous fsync ran shares the next one. A forwarded request's record is `commit`ted (durable)
//! before the provider sees the request; outcomes and rejections are `enqueue`d and kept until
//! written. When the trail cannot be written, `commit` fails (the gateway answers 503
//! `AUDIT_UNAVAILABLE`), `/readyz` turns unready, and the writer keeps retrying until it works.
//! Each record's `prev` links it to the line before: its SHA-256, or with `[audit] key_file` its
//! HMAC-SHA256 under a secret key (`key`). `verify` proves a chain of files. This module never
//! drops a record of a forwarded request and never writes anything but whole lines.

pub mod key;
pub mod record;
pub mod verify;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::metrics::AuditMetrics;
pub use record::{AuditRecord, ClientInfo, RecordKind};

/// Under `buffered`, how long the writer lets records queue up before writing them (one
/// `write` per delay under load, instead of a thread wake per record).
pub const BUFFERED_WRITE_DELAY: Duration = Duration::from_millis(1);

/// Name of the file being written; rotated files are `audit-<UTC time>-<first seq>.jsonl`.
pub const ACTIVE_FILE: &str = "audit.jsonl";

/// When a record counts as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync before acknowledging: a record survives a power cut once acknowledged. The
    /// default; group commit amortises the fsync across concurrent requests. Records nobody
    /// waits on are written at once and synced within `AuditConfig::fsync_follow_up`.
    Fsync,
    /// Forward once the record is queued for the writer, which writes what has queued up every
    /// `BUFFERED_WRITE_DELAY` (one `write` for all of it) and fsyncs on this interval: a crash
    /// of the gateway process can lose the records of the last write delay, a power cut or
    /// kernel crash those of the last interval. No thread hand-off or wait per request. While
    /// the trail is known to be unwritable, requests are still refused (503).
    Buffered { interval: Duration },
}

/// `[audit]`: where and how the trail is written.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Directory of the trail (created 0700 when missing, at start and whenever the writer
    /// finds it gone). One gateway process per directory: the writer holds its lock.
    pub dir: PathBuf,
    pub durability: Durability,
    /// Rotate the active file before it would grow past this many bytes (a record is never
    /// split; a single record larger than this gets a file of its own).
    pub max_file_bytes: u64,
    /// Records accepted but not yet written, at most. Past it, forwarded requests get 503
    /// and records of refused requests are dropped (and counted).
    pub queue_capacity: usize,
    /// The same bound in bytes of serialised records: a record carries the request's target
    /// URL, so while the trail cannot be written, a flood of refused requests with long URLs
    /// would otherwise hold `queue_capacity` times the largest head in memory.
    pub queue_max_bytes: usize,
    /// How long a request waits for its record to be durable before it is refused with 503.
    pub write_timeout: Duration,
    /// While the trail cannot be written, how often the writer tries again by itself.
    pub retry_interval: Duration,
    /// `fsync` under concurrent load (the last group commit had more than one waiting
    /// request): how long the writer lets more records gather before the next write + fsync.
    /// Fewer, larger fsyncs (less CPU per request) for up to this much more latency. Zero: off.
    pub group_commit_window: Duration,
    /// `fsync`: the longest a record nobody waits on (a response's, a refusal's) stays
    /// written but unsynced. It is made durable by the next waiting record's fsync, or by one
    /// of its own this long after the last. Zero: each is synced at once (which, when requests
    /// do not overlap, means two fsyncs per forwarded request).
    pub fsync_follow_up: Duration,
    /// The file holding the chain's secret key: each record's `prev` is then the HMAC-SHA256
    /// of the line before under it, not its SHA-256. Read when the writer starts (a changed
    /// file takes effect at the next start); never inside `dir`.
    pub key_file: Option<PathBuf>,
}

/// Why the trail could not be opened, or a record not written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit directory {dir}: {source}")]
    Open {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("audit directory {dir} is in use by another gateway process")]
    Locked { dir: PathBuf },
    #[error("audit.key_file: {0}")]
    Key(#[from] key::KeyError),
    #[error("audit file {path}: {reason} (run `ssp-gateway audit verify` on the trail)")]
    Corrupt { path: PathBuf, reason: String },
    /// The writer could not write or sync the record.
    #[error("the audit trail cannot be written")]
    Unavailable,
    /// Too many records waiting.
    #[error("the audit queue is full")]
    Overloaded,
    /// The record was not durable within the write timeout.
    #[error("the audit record was not written in time")]
    Timeout,
    /// The writer has stopped (shutdown).
    #[error("the audit writer has stopped")]
    Stopped,
}

/// A record waiting for the writer, with the caller's acknowledgement channel when the caller
/// waits for durability.
struct Pending {
    body: String,
    ack: Option<oneshot::Sender<Result<(), AuditError>>>,
}

enum Msg {
    Record(Pending),
    Shutdown(oneshot::Sender<()>),
}

/// State shared by the request path and the writer thread.
struct Shared {
    /// Records accepted and not yet written or refused (queue plus backlog).
    depth: AtomicUsize,
    /// Their serialised bytes.
    bytes: AtomicUsize,
    writable: Arc<AtomicBool>,
    metrics: AuditMetrics,
}

impl Shared {
    /// `n` records of `bytes` in all have left the queue (written, refused or lost).
    fn done(&self, n: usize, bytes: usize) {
        let left = self.depth.fetch_sub(n, Ordering::AcqRel).saturating_sub(n);
        self.metrics.queue_depth.set(left as i64);
        let left = self
            .bytes
            .fetch_sub(bytes, Ordering::AcqRel)
            .saturating_sub(bytes);
        self.metrics.queue_bytes.set(left as i64);
    }
}

/// The serialised bytes of `records`, for [`Shared::done`].
fn bytes_of<'a>(records: impl IntoIterator<Item = &'a Pending>) -> usize {
    records.into_iter().map(|p| p.body.len()).sum()
}

/// The request path's handle on the trail. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    capacity: usize,
    max_bytes: usize,
    write_timeout: Duration,
    /// `buffered`: commits do not wait for the writer.
    buffered: bool,
}

/// The writer before its thread is started: `Audit::prepare` makes both halves without I/O
/// (so `check-config` can build everything), `start` opens the trail.
pub struct PendingWriter {
    rx: mpsc::Receiver<Msg>,
    config: AuditConfig,
    shared: Arc<Shared>,
}

impl Audit {
    /// The handle and its not-yet-started writer.
    pub fn prepare(config: &AuditConfig, metrics: AuditMetrics) -> (Audit, PendingWriter) {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            depth: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            writable: Arc::new(AtomicBool::new(false)),
            metrics,
        });
        (
            Audit {
                tx,
                shared: shared.clone(),
                capacity: config.queue_capacity,
                max_bytes: config.queue_max_bytes,
                write_timeout: config.write_timeout,
                buffered: matches!(config.durability, Durability::Buffered { .. }),
            },
            PendingWriter {
                rx,
                config: config.clone(),
                shared,
            },
        )
    }

    /// `true` while the trail can be written (for `/readyz`).
    pub fn writable(&self) -> Arc<AtomicBool> {
        self.shared.writable.clone()
    }

    /// Counts a record of `len` bytes into the queue, or refuses it when either bound would
    /// be passed.
    fn admit(&self, len: usize) -> bool {
        let depth = self.shared.depth.fetch_add(1, Ordering::AcqRel) + 1;
        let bytes = self.shared.bytes.fetch_add(len, Ordering::AcqRel) + len;
        if depth > self.capacity || bytes > self.max_bytes {
            self.shared.done(1, len);
            return false;
        }
        self.shared.metrics.queue_depth.set(depth as i64);
        self.shared.metrics.queue_bytes.set(bytes as i64);
        true
    }

    /// Queues `record` for the writer (with `ack` when the caller waits for it): `Overloaded`
    /// when the queue is full, `Stopped` when the writer is gone.
    fn submit(
        &self,
        record: &AuditRecord<'_>,
        ack: Option<oneshot::Sender<Result<(), AuditError>>>,
    ) -> Result<(), AuditError> {
        let body = record.to_body();
        let len = body.len();
        if !self.admit(len) {
            return Err(AuditError::Overloaded);
        }
        let pending = Pending { body, ack };
        if self.tx.send(Msg::Record(pending)).is_err() {
            self.shared.done(1, len);
            return Err(AuditError::Stopped);
        }
        Ok(())
    }

    /// Writes `record` and waits until it is durable (`fsync`). Under `buffered`, queues it
    /// without waiting — kept until written, like `enqueue` — but refuses while the trail is
    /// known to be unwritable: nothing is forwarded unaudited.
    pub async fn commit(&self, record: &AuditRecord<'_>) -> Result<(), AuditError> {
        if self.buffered {
            if !self.shared.writable.load(Ordering::Acquire) {
                return Err(AuditError::Unavailable);
            }
            return self.submit(record, None);
        }
        let (ack, done) = oneshot::channel();
        let handed = std::time::Instant::now();
        self.submit(record, Some(ack))?;
        let result = match tokio::time::timeout(self.write_timeout, done).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AuditError::Stopped),
            Err(_) => Err(AuditError::Timeout),
        };
        self.shared
            .metrics
            .commit_wait
            .observe(handed.elapsed().as_secs_f64());
        result
    }

    /// Hands `record` to the writer without waiting. It is kept (and retried while the trail
    /// cannot be written) until it is written; only a full queue drops it, counted and logged.
    pub fn enqueue(&self, record: &AuditRecord<'_>) {
        if let Err(e) = self.submit(record, None) {
            self.shared.metrics.records_dropped.inc();
            static LOG: crate::loglimit::Every = crate::loglimit::Every::second();
            if let Some(held_back) = LOG.allow() {
                tracing::error!(
                    request_id = %record.request_id,
                    kind = record.kind.as_str(),
                    error = %e,
                    held_back,
                    "audit record dropped"
                );
            }
        }
    }

    /// Records a request head refused before the gateway's checks could read it (malformed,
    /// framing that cannot be trusted, too large, not complete in time): a `rejection` with a
    /// new request id, the connection's address and certificate, `status` and the token
    /// `REQUEST_HEAD_REFUSED_<REASON>`. No method or target is known: both are empty.
    pub fn refused_head(&self, client: ClientInfo, status: u16, reason: &str) {
        let time = record::Timestamp::now();
        let request_id = uuid::Uuid::new_v4().to_string();
        let token = format!("REQUEST_HEAD_REFUSED_{}", reason.to_ascii_uppercase());
        self.enqueue(&AuditRecord {
            kind: RecordKind::Rejection,
            time: std::borrow::Cow::Borrowed(time.as_str()),
            request_id: request_id.into(),
            ssp_trace_id: None,
            trace_id: None,
            from: None,
            to: None,
            interaction: None,
            method: "".into(),
            target_url: "".into(),
            client,
            jwt: None,
            jwt_problem: None,
            status: Some(status),
            token: Some(token.into()),
            reason: Some(reason),
            request_bytes: None,
            response_bytes: None,
            upstream_latency_us: None,
            upstream_attempts: None,
            upstream_failure: None,
            total_latency_us: None,
            completed: None,
        });
    }

    /// Asks the writer to write everything queued so far, sync, and stop; waits for it.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Records lost at shutdown in this process: still unwritable after the shutdown retries, or
/// written but not made durable by the final sync.
static LOST_AT_SHUTDOWN: AtomicU64 = AtomicU64::new(0);

fn count_lost_at_shutdown(n: usize) {
    if n > 0 {
        LOST_AT_SHUTDOWN.fetch_add(n as u64, Ordering::AcqRel);
    }
}

/// How many audit records the writers of this process lost when they stopped (the trail could
/// not take them): `ssp-gateway run` exits non-zero when any were, so that a supervisor does
/// not see a clean stop. Read it once the gateway has stopped (`Running::wait`).
pub fn lost_at_shutdown() -> u64 {
    LOST_AT_SHUTDOWN.load(Ordering::Acquire)
}

/// Marks the trail unwritable when the writer thread ends.
struct Stopped(Arc<Shared>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.writable.store(false, Ordering::Release);
        self.0.metrics.writable.set(0);
    }
}

impl PendingWriter {
    /// Opens the trail (creating the directory, taking its lock, finding the chain's head,
    /// setting a torn last line aside) and starts the writer thread.
    pub fn start(self) -> Result<std::thread::JoinHandle<()>, AuditError> {
        let writer = writer::Writer::open(&self.config, self.shared.clone())?;
        self.shared.writable.store(true, Ordering::Release);
        self.shared.metrics.writable.set(1);
        let rx = self.rx;
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                // However the writer ends (stopped, or a bug panicking it), the trail is no
                // longer writable: readiness must say so.
                let _stopped = Stopped(shared);
                writer.run(rx)
            })
            .map_err(|source| AuditError::Open {
                dir: self.config.dir.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn scratch() -> crate::tempdir::TempDir {
        crate::tempdir::TempDir::new("audit")
    }

    fn config(dir: &std::path::Path, durability: Durability) -> AuditConfig {
        AuditConfig {
            dir: dir.to_path_buf(),
            durability,
            max_file_bytes: 1 << 20,
            queue_capacity: 1000,
            queue_max_bytes: 1 << 20,
            write_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_millis(50),
            group_commit_window: Duration::ZERO,
            fsync_follow_up: Duration::from_millis(10),
            key_file: None,
        }
    }

    fn record(n: u32) -> AuditRecord<'static> {
        AuditRecord {
            time: record::now_rfc3339().into(),
            request_id: format!("r{n}").into(),
            status: Some(400),
            ..AuditRecord::bare(RecordKind::Rejection)
        }
    }

    fn files(dir: &std::path::Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect()
    }

    async fn run_once(dir: &std::path::Path, durability: Durability, n: u32) {
        let (audit, pending) =
            Audit::prepare(&config(dir, durability), Metrics::new().audit.clone());
        let thread = pending.start().expect("start");
        for i in 0..n {
            audit.commit(&record(i)).await.expect("commit");
        }
        audit.enqueue(&record(1000));
        audit.shutdown().await;
        thread.join().expect("writer thread");
        assert!(
            !audit.writable().load(Ordering::Acquire),
            "stopped means unwritable"
        );
    }

    fn partials(dir: &std::path::Path) -> Vec<Vec<u8>> {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "partial"))
            .map(|p| std::fs::read(p).expect("read"))
            .collect()
    }

    /// What a crash or a power cut leaves after the last whole record (a record cut short, or
    /// NULs) is moved out of the trail, kept in a file of its own, and the chain carries on
    /// from the last whole record: `audit verify` then finds the trail intact, whatever the
    /// tail was, and also when the active file held nothing else (a crash just after a
    /// rotation).
    #[tokio::test]
    async fn a_restart_moves_what_follows_the_last_whole_record_out_of_the_trail() {
        let buffered = Durability::Buffered {
            interval: Duration::from_millis(10),
        };
        for (tail, only_the_tail) in [
            (b"{\"seq\":5,\"prev\":\"00".to_vec(), false),
            (vec![0u8; 600], false),
            (b"{\"seq\":5,\"prev\":\"3a23".to_vec(), true),
            (vec![0u8; 600], true),
        ] {
            let dir = scratch();
            run_once(&dir, Durability::Fsync, 3).await;
            let active = dir.join(ACTIVE_FILE);
            if only_the_tail {
                // A rotation, then the crash: the new active file holds only the tail.
                std::fs::rename(
                    &active,
                    dir.join("audit-20261126T131900.000000Z-000000000001.jsonl"),
                )
                .expect("rotate");
                std::fs::write(&active, &tail).expect("write");
            } else {
                let mut text = std::fs::read(&active).expect("read");
                text.extend_from_slice(&tail);
                std::fs::write(&active, text).expect("write");
            }

            run_once(&dir, buffered, 2).await;
            let all = files(&dir);
            let report = verify::verify_files(&all, &verify::Options::default()).expect("verify");
            assert!(report.intact(), "{report}");
            assert!(report.torn.is_none(), "{report}");
            assert_eq!(
                (report.first_seq, report.last_seq),
                (Some(1), Some(7)),
                "{report}"
            );
            assert_eq!(partials(&dir), [tail], "the tail is kept, byte for byte");
        }
        let dir = scratch();
        run_once(&dir, Durability::Fsync, 1).await;
        let mode = std::fs::metadata(dir.join(ACTIVE_FILE))
            .expect("meta")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    /// After a group commit that served several waiting requests, the writer gathers for
    /// `group_commit_window`: a commit sent while it waits shares the next fsync.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_load_the_group_commit_window_gathers_later_commits() {
        async fn batches(window: Duration) -> u64 {
            let dir = scratch();
            let mut cfg = config(&dir, Durability::Fsync);
            cfg.group_commit_window = window;
            let metrics = Metrics::new().audit.clone();
            let (audit, pending) = Audit::prepare(&cfg, metrics.clone());
            // Two commits queued before the writer starts: its first batch serves both.
            let first: Vec<_> = (0..2)
                .map(|i| {
                    let audit = audit.clone();
                    tokio::spawn(async move { audit.commit(&record(i)).await })
                })
                .collect();
            while audit.shared.depth.load(Ordering::Acquire) < 2 {
                tokio::task::yield_now().await;
            }
            let thread = pending.start().expect("start");
            for f in first {
                f.await.expect("task").expect("commit");
            }
            // Then one commit, and another 50 ms later.
            let a = tokio::spawn({
                let audit = audit.clone();
                async move { audit.commit(&record(10)).await }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            audit.commit(&record(11)).await.expect("commit");
            a.await.expect("task").expect("commit");
            audit.shutdown().await;
            thread.join().expect("writer thread");
            metrics.batch_records.get_sample_count()
        }
        assert_eq!(
            batches(Duration::ZERO).await,
            3,
            "without a window each later commit has its own fsync"
        );
        assert_eq!(
            batches(Duration::from_millis(500)).await,
            2,
            "the second later commit joined the first's fsync"
        );
    }

    /// Polls `done` every millisecond; fails the test naming `what` after 10 s.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "never {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Under `fsync`, a record nobody waits on is in the file at once, and is made durable by
    /// the next waiting record's fsync or, with none, by its own after the follow-up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_fsync_a_record_nobody_waits_on_shares_the_next_sync() {
        async fn syncs(follow_up: Duration) -> (u64, u64) {
            let dir = scratch();
            let mut cfg = config(&dir, Durability::Fsync);
            cfg.fsync_follow_up = follow_up;
            let metrics = Metrics::new().audit.clone();
            let (audit, pending) = Audit::prepare(&cfg, metrics.clone());
            let thread = pending.start().expect("start");
            audit.enqueue(&record(0));
            until("written", || metrics.records_written.get() >= 1).await;
            let text = std::fs::read_to_string(dir.join(ACTIVE_FILE)).expect("trail");
            assert!(text.contains("\"r0\""), "written at once: {text}");
            audit.commit(&record(1)).await.expect("commit");
            let with_commit = metrics.fsync_duration.get_sample_count();
            // Alone: its own sync, after the follow-up.
            audit.enqueue(&record(2));
            until("written", || metrics.records_written.get() >= 3).await;
            until("synced", || {
                metrics.fsync_duration.get_sample_count() > with_commit
            })
            .await;
            let alone = metrics.fsync_duration.get_sample_count() - with_commit;
            audit.shutdown().await;
            thread.join().expect("writer thread");
            (with_commit, alone)
        }
        assert_eq!(
            syncs(Duration::from_secs(1)).await,
            (1, 1),
            "one fsync for the record and the commit after it, then one for a record alone"
        );
        assert_eq!(
            syncs(Duration::ZERO).await,
            (2, 1),
            "follow-up 0s: every record synced at once"
        );
    }

    /// A record carries the request's target URL: while nothing is written, records of long
    /// URLs are bounded by their bytes (`queue_max_bytes`), not only by their number.
    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_as_well_as_records() {
        let dir = scratch();
        let mut cfg = config(&dir, Durability::Fsync);
        cfg.queue_capacity = 1000;
        cfg.queue_max_bytes = 1 << 20;
        let metrics = Metrics::new().audit.clone();
        let (audit, pending) = Audit::prepare(&cfg, metrics.clone());
        let long = AuditRecord {
            target_url: format!("https://provider.example/{}", "a".repeat(60_000)).into(),
            ..record(0)
        };
        // The writer is not started yet: everything waits in the queue.
        for _ in 0..100 {
            audit.enqueue(&long);
        }
        let queued = metrics.queue_depth.get();
        assert_eq!(
            (queued, metrics.records_dropped.get()),
            (17, 83),
            "1 MiB holds 17 records of 60 KB; the rest are dropped and counted"
        );
        assert!(metrics.queue_bytes.get() <= 1 << 20);
        assert!(metrics.queue_bytes.get() > 17 * 60_000);
        // Small records still fit under the count bound once the long ones are written.
        let thread = pending.start().expect("start");
        audit.commit(&record(1)).await.expect("commit");
        audit.shutdown().await;
        thread.join().expect("writer thread");
        assert_eq!(metrics.records_written.get(), 18);
        assert_eq!(
            (metrics.queue_depth.get(), metrics.queue_bytes.get()),
            (0, 0)
        );
    }

    /// Records the trail still cannot take when the gateway stops are lost with the process:
    /// counted as dropped (and logged), not gone in silence.
    #[tokio::test]
    async fn records_still_unwritable_at_shutdown_are_counted_as_lost() {
        let dir = scratch();
        let metrics = Metrics::new().audit.clone();
        let (audit, pending) = Audit::prepare(&config(&dir, Durability::Fsync), metrics.clone());
        let thread = pending.start().expect("start");
        audit.commit(&record(0)).await.expect("commit");
        // The trail's directory becomes a file: nothing can be written from now on.
        std::fs::remove_dir_all(&dir).expect("rm");
        std::fs::write(&dir, b"not a directory").expect("file");
        for i in 1..=3 {
            audit.enqueue(&record(i));
        }
        until("failed", || metrics.writable.get() == 0).await;
        audit.shutdown().await;
        thread.join().expect("writer thread");
        assert_eq!(metrics.records_written.get(), 1);
        assert_eq!(
            metrics.records_dropped.get(),
            3,
            "the three are counted as lost"
        );
        assert_eq!(
            (metrics.queue_depth.get(), metrics.queue_bytes.get()),
            (0, 0)
        );
        std::fs::remove_file(&dir).expect("rm");
    }

    #[tokio::test]
    async fn one_directory_one_writer() {
        let dir = scratch();
        let (_a, first) = Audit::prepare(
            &config(&dir, Durability::Fsync),
            Metrics::new().audit.clone(),
        );
        let _running = first.start().expect("first writer");
        let (_b, second) = Audit::prepare(
            &config(&dir, Durability::Fsync),
            Metrics::new().audit.clone(),
        );
        assert!(matches!(second.start(), Err(AuditError::Locked { .. })));
    }
}
