//! The audit writer thread: takes records off the channel in batches, chains and frames them,
//! writes each batch with one `write` and (durability `fsync`) one `fdatasync`, then
//! acknowledges. It alone touches the files. On any failure it rolls the file back to the last
//! whole line it knows is there, refuses waiting commits, keeps queued records, and retries.
//! It never writes a partial line it would then build on, and never runs on the async runtime.
//! It writes only while it holds the directory's lock: whenever it opens a new active file
//! outside a rotation (the old one moved or deleted, the directory removed or recreated), it
//! first makes sure the directory exists and that the lock it holds is that directory's, taking
//! the lock again if not; while another process holds it, the trail stays unwritable.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::key::Link;
use super::record::{frame_into, hex, GENESIS};
use super::{
    AuditConfig, AuditError, Durability, Msg, Pending, Shared, ACTIVE_FILE, BUFFERED_WRITE_DELAY,
};

/// Most records taken into one group commit.
const MAX_BATCH: usize = 4096;
/// How far back from the end of a file to look for its last line, per step.
const TAIL_CHUNK: u64 = 64 * 1024;
/// At shutdown, how long a failing trail is retried for the records it still owes before they
/// are reported lost.
const SHUTDOWN_RETRY_FOR: Duration = Duration::from_secs(5);
/// While the trail is failing or owes a backlog, the most bytes written (and rolled back on
/// failure) as one unit, so that a nearly full disk takes what fits instead of refusing the
/// whole backlog again and again.
const RECOVERY_UNIT_BYTES: usize = 64 * 1024;
/// How often, at most, the durable head of a growing trail is logged (`audit head`).
const HEAD_LOG_EVERY: Duration = Duration::from_secs(60);
/// The lock file in the audit directory: the process writing the trail holds it (`flock`).
const LOCK_FILE: &str = ".lock";

/// The last record written: the next one's `seq - 1` and `prev` (its line's link value).
#[derive(Debug, Clone, Copy)]
struct Head {
    seq: u64,
    hash: [u8; 32],
}

/// The open active file.
struct Active {
    file: File,
    dev: u64,
    ino: u64,
    /// `seq` of its first record, once it has one (names the file when it is rotated).
    first_seq: Option<u64>,
}

pub(super) struct Writer {
    dir: PathBuf,
    active_path: PathBuf,
    durability: Durability,
    max_file_bytes: u64,
    retry_interval: Duration,
    active: Option<Active>,
    head: Head,
    /// How a line's link value (the next record's `prev`) is made: SHA-256, or HMAC-SHA256
    /// under the key read at start.
    link: Link,
    /// Bytes of the active file known to be durable.
    synced_len: u64,
    /// Bytes written to the active file: `synced_len + unsynced.len()`.
    written_len: u64,
    /// What was written since the last sync (acknowledged under `buffered`), kept so it can be
    /// written again if the sync fails or the file is lost.
    unsynced: Vec<u8>,
    /// The file may hold bytes past `written_len` (a failed write whose rollback failed), or
    /// lost `unsynced`: truncate to `synced_len` and write `unsynced` again before anything else.
    needs_repair: bool,
    /// Records waiting for the trail to work again (never commits: those are refused).
    backlog: VecDeque<Pending>,
    failed: bool,
    /// Waiting requests (commits) in the last batch: more than one means concurrent load.
    last_commits: usize,
    /// `fsync` only (see `AuditConfig::group_commit_window`).
    group_commit_window: Duration,
    /// `fsync` only (see `AuditConfig::fsync_follow_up`).
    fsync_follow_up: Duration,
    last_attempt: Instant,
    last_sync: Instant,
    /// When the durable head was last logged (`audit head`), and its seq then.
    head_logged: (Instant, u64),
    shared: Arc<Shared>,
    /// The directory's lock: one process per audit directory.
    lock: DirLock,
}

/// A held lock on an audit directory, and which `.lock` file it is on.
struct DirLock {
    /// Closing it releases the lock.
    _file: File,
    dev: u64,
    ino: u64,
}

/// Creates the audit directory (0700, and its parents) when it is missing.
fn create_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Takes `dir`'s lock, without waiting: `Locked` while another process holds it.
fn lock_dir(dir: &Path) -> Result<DirLock, AuditError> {
    let io_err = |source: io::Error| AuditError::Open {
        dir: dir.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))
        .map_err(io_err)?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(match e.kind() {
            io::ErrorKind::WouldBlock => AuditError::Locked {
                dir: dir.to_path_buf(),
            },
            _ => io_err(e),
        });
    }
    let meta = file.metadata().map_err(io_err)?;
    Ok(DirLock {
        _file: file,
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// Below this, the buffer of unsynced bytes keeps its room whatever the load.
const UNSYNCED_KEEP: usize = 64 * 1024;

/// Empties the buffer of unsynced bytes after a sync. It keeps its room while the load that
/// filled it lasts; once an interval holds less than half of it, it shrinks to that interval's
/// size, so a burst under `buffered` (a second of records at full rate, tens of MB) is not held
/// for the life of the process (and `crate::memory`'s trimmer gives the freed pages back).
fn empty_after_sync(buf: &mut Vec<u8>) {
    let held = buf.len();
    if buf.capacity() > 2 * held.max(UNSYNCED_KEEP) {
        *buf = Vec::with_capacity(held);
    } else {
        buf.clear();
    }
}

/// A seq as a gauge's value.
fn gauge(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn rotated_name(first_seq: u64) -> String {
    let time = chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ");
    format!("audit-{time}-{first_seq:012}.jsonl")
}

/// The first-record seq a rotated file's name says, for names the gateway gives
/// (`audit-<UTC time>-<first seq>.jsonl`, e.g. `audit-20260101T000000.000000Z-000000000042.jsonl`):
/// what the writer looks for its newest rotated file by, and what `audit verify` checks each
/// rotated file's first record against.
pub(super) fn rotated_seq(name: &str) -> Option<u64> {
    let stem = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    let (time, seq) = stem.rsplit_once('-')?;
    let time_ok = time.len() == 23
        && time.ends_with('Z')
        && time.as_bytes()[8] == b'T'
        && time.bytes().filter(u8::is_ascii_digit).count() == 20;
    (time_ok && !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()))
        .then(|| seq.parse().ok())
        .flatten()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn open_new(path: &Path) -> io::Result<Active> {
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let meta = file.metadata()?;
    Ok(Active {
        file,
        dev: meta.dev(),
        ino: meta.ino(),
        first_seq: None,
    })
}

/// What the end of a trail file holds.
struct Tail {
    /// The last complete line (without its newline), if any.
    last: Option<Vec<u8>>,
    /// Where the bytes after the last newline start, when there are any (a record cut short by
    /// a crash, or what a power cut left).
    torn_from: Option<u64>,
    /// The first complete line, if any.
    first: Option<Vec<u8>>,
    /// The complete line before the last, if the file holds one (and it is no longer than
    /// [`MAX_LINE_READ`]): what the last record's `prev` links to.
    before_last: Option<Vec<u8>>,
    /// The last complete line is the file's first: the line before it is in another file.
    last_is_first: bool,
}

fn read_tail(path: &Path) -> io::Result<Tail> {
    // Not a FIFO or a device put in the trail's place: it would hang the start.
    let mut file = crate::files::open_regular(path)?;
    let len = file.metadata()?.len();
    // After the last newline: the bytes of a record cut short, or what else was left there.
    let end = match newline_before(&mut file, len)? {
        Some(i) => i,
        None => {
            // No newline at all: no whole line.
            return Ok(Tail {
                last: None,
                torn_from: (len > 0).then_some(0),
                first: None,
                before_last: None,
                last_is_first: false,
            });
        }
    };
    let torn_from = (end + 1 < len).then_some(end + 1);
    // The last complete line: from after the newline before it (or the start) to `end`.
    let begin = newline_before(&mut file, end)?.map_or(0, |i| i + 1);
    let last_len = end - begin;
    if last_len > MAX_LINE_READ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "its last line is {last_len} bytes long, longer than any audit record \
                 ({MAX_LINE_READ} bytes at most)"
            ),
        ));
    }
    let mut last = vec![0u8; last_len as usize];
    file.seek(SeekFrom::Start(begin))?;
    file.read_exact(&mut last)?;
    // The line before it, ending at the newline just before `begin`.
    let before_last = match begin.checked_sub(1) {
        Some(newline) => {
            let start = newline_before(&mut file, newline)?.map_or(0, |i| i + 1);
            if newline - start <= MAX_LINE_READ {
                let mut line = vec![0u8; (newline - start) as usize];
                file.seek(SeekFrom::Start(start))?;
                file.read_exact(&mut line)?;
                Some(line)
            } else {
                None
            }
        }
        None => None,
    };
    // The first complete line (read no further than a record can be long).
    file.seek(SeekFrom::Start(0))?;
    let mut first = Vec::new();
    let mut reader = io::BufReader::new((&mut file).take((end + 1).min(MAX_LINE_READ + 1)));
    io::BufRead::read_until(&mut reader, b'\n', &mut first)?;
    let first = (first.last() == Some(&b'\n')).then(|| {
        first.pop();
        first
    });
    Ok(Tail {
        last: Some(last),
        torn_from,
        first,
        before_last,
        last_is_first: begin == 0,
    })
}

/// The longest line the writer reads back at start (the last and the first record of a file):
/// `audit verify`'s bound, longer than any record it writes (whose text, the target URL twice
/// and the JWT's claims, comes from a request head of at most `[listener] max_header_bytes`,
/// 16 MiB at most).
const MAX_LINE_READ: u64 = super::verify::MAX_LINE_BYTES as u64;

/// The offset of the last newline in `file` before `before`, looking back [`TAIL_CHUNK`] bytes
/// at a time (memory stays bounded whatever the file holds), or `None` when there is none.
fn newline_before(file: &mut File, before: u64) -> io::Result<Option<u64>> {
    let mut buf = vec![0u8; TAIL_CHUNK as usize];
    let mut end = before;
    while end > 0 {
        let start = end.saturating_sub(TAIL_CHUNK);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            return Ok(Some(start + i as u64));
        }
        end = start;
    }
    Ok(None)
}

/// `seq` of a stored line.
fn line_seq(line: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    v.get("seq")?.as_u64()
}

fn corrupt(path: &Path, reason: impl Into<String>) -> AuditError {
    AuditError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The head of the chain as stored in `line` of `path`, linked by `link`.
fn head_of(path: &Path, line: &[u8], link: &Link) -> Result<Head, AuditError> {
    let seq =
        line_seq(line).ok_or_else(|| corrupt(path, "its last line is not an audit record"))?;
    if seq == u64::MAX {
        return Err(corrupt(
            path,
            "its last record's seq is the largest there is",
        ));
    }
    Ok(Head {
        seq,
        hash: link.of(line),
    })
}

/// The newest rotated file in `dir`, by the first seq in its name.
fn newest_rotated(dir: &Path) -> io::Result<Option<PathBuf>> {
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(seq) = name.to_str().and_then(rotated_seq) else {
            continue;
        };
        if best.as_ref().map_or(true, |(s, _)| seq >= *s) {
            best = Some((seq, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// The end of the newest rotated file, if there is one.
fn newest_tail(dir: &Path) -> Result<Option<(PathBuf, Tail)>, AuditError> {
    let io_err = |source: io::Error| AuditError::Open {
        dir: dir.to_path_buf(),
        source,
    };
    let Some(rotated) = newest_rotated(dir).map_err(io_err)? else {
        return Ok(None);
    };
    let tail = read_tail(&rotated).map_err(io_err)?;
    Ok(Some((rotated, tail)))
}

/// The last record of the newest rotated file, if there is one, with its line and the line
/// before it.
fn newest_head(dir: &Path, link: &Link) -> Result<Option<(Head, EndLines)>, AuditError> {
    let Some((rotated, tail)) = newest_tail(dir)? else {
        return Ok(None);
    };
    match tail.last {
        Some(line) => Ok(Some((
            head_of(&rotated, &line, link)?,
            EndLines {
                last: line,
                before: tail.before_last,
            },
        ))),
        None => Ok(None),
    }
}

/// The trail's last record's line and the line before it (when it could be read).
struct EndLines {
    last: Vec<u8>,
    before: Option<Vec<u8>>,
}

/// How the trail the writer carries on ends, as its link mode sees it: whether the last
/// record's `prev` is the link the writer would have made to the line before it. Logged, never
/// refused (refusing would let whoever can write the files stop the gateway); `audit verify`
/// is what proves the trail.
fn judge_end(link: &Link, end: &EndLines, head: &Head) {
    let Ok((seq, prev)) = super::verify::parse_line(&end.last) else {
        tracing::warn!("the trail's last record has no prev to check: not one the writer wrote");
        return;
    };
    // Keyed, the last record carries its own mac: a change to it (its prev kept) shows. The
    // head's link value is that mac made again (`head_of`).
    if let (Link::Hmac(_), Some((_, mac))) = (link, super::record::sealed_parts(&end.last)) {
        if head.hash != mac {
            tracing::error!(
                seq,
                "the trail's last record's mac is not its HMAC under the key: the record was \
                 altered, or written under another key (the key was changed)"
            );
        }
    }
    if seq == 1 {
        if prev != hex(&GENESIS) {
            tracing::error!(
                seq,
                "the trail's last record is seq 1 but its prev is not 64 zeros: the trail was \
                 altered or replaced"
            );
        }
        return;
    }
    let Some(before) = &end.before else {
        // The line before is in a file no longer there (retention), or too long to read.
        return;
    };
    let sha = hex(&super::record::sha256(before)) == prev;
    match link {
        Link::Hmac(key) if hex(&key.link_of(before)) == prev => {}
        Link::Hmac(_) if sha => tracing::error!(
            unkeyed_through = seq,
            "keyed from the next record: unkeyed_through={seq}; the trail's records up to seq \
             {seq} are linked by plain SHA-256: begun before [audit] key_file was set, or, if \
             this trail was ever keyed, rewritten by someone without the key (keep this line: \
             `audit verify --key … --unkeyed-through N` takes N from the FIRST such line for a \
             trail; any later one is a rewrite)"
        ),
        Link::Hmac(_) => tracing::warn!(
            seq,
            "the trail's last record is linked neither under the key nor by plain SHA-256: \
             written under another key (the key was changed), or the trail's end was altered"
        ),
        Link::Sha256 if sha => {}
        Link::Sha256 => tracing::warn!(
            seq,
            "the trail's last record is not linked by the SHA-256 of the one before: a keyed \
             trail carried on without its key ([audit] key_file removed?), or the trail's end \
             was altered"
        ),
    }
}

/// Moves the active file's bytes from `start` (just after its last newline, as [`read_tail`]
/// found it) into a file of their own beside it (`audit-tail-<time>.partial`, 0600, synced),
/// then cuts the active file back to its last whole line. Returns that file and the bytes.
fn move_out_tail(dir: &Path, active: &Path, start: u64) -> io::Result<MovedOut> {
    let mut file = OpenOptions::new().read(true).write(true).open(active)?;
    let len = file.metadata()?.len();
    let bytes = len.saturating_sub(start);
    let time = chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ");
    let kept = dir.join(format!("audit-tail-{time}.partial"));
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&kept)?;
    // Copied through a small buffer: what follows the last record may be any size.
    let copy = |file: &mut File, out: &mut File| -> io::Result<Vec<u8>> {
        file.seek(SeekFrom::Start(start))?;
        let mut head = vec![0u8; bytes.min(MOVED_OUT_HEAD) as usize];
        file.read_exact(&mut head)?;
        out.write_all(&head)?;
        let copied = io::copy(&mut file.take(bytes - head.len() as u64), out)?;
        if copied + head.len() as u64 != bytes {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the audit file shrank while its tail was moved out",
            ));
        }
        out.sync_all()?;
        Ok(head)
    };
    let head = match copy(&mut file, &mut out) {
        Ok(head) => head,
        Err(e) => {
            // The bytes are still in the trail, and the next start copies them again: a copy
            // cut short (a full disk) is not left beside them.
            drop(out);
            let _ = fs::remove_file(&kept);
            return Err(e);
        }
    };
    sync_dir(dir)?;
    // Only once the bytes are safe elsewhere.
    file.set_len(start)?;
    file.sync_all()?;
    Ok(MovedOut { kept, head, bytes })
}

/// How much of the bytes moved out [`move_out_tail`] keeps to say what they are.
const MOVED_OUT_HEAD: u64 = 64;

/// What [`move_out_tail`] moved out of the trail.
struct MovedOut {
    /// The file they are kept in.
    kept: PathBuf,
    /// Their first [`MOVED_OUT_HEAD`] bytes.
    head: Vec<u8>,
    /// How many there were.
    bytes: u64,
}

impl Writer {
    pub(super) fn open(config: &AuditConfig, shared: Arc<Shared>) -> Result<Writer, AuditError> {
        let dir = config.dir.clone();
        let io_err = |source: io::Error| AuditError::Open {
            dir: dir.clone(),
            source,
        };
        // The key first: a trail is never continued with a link the operator did not ask for.
        let link = Link::load(config.key_file.as_deref())?;
        create_dir(&dir).map_err(io_err)?;
        let lock = lock_dir(&dir)?;

        let active_path = dir.join(ACTIVE_FILE);
        let mut tail = if active_path.exists() {
            Some(read_tail(&active_path).map_err(io_err)?)
        } else {
            None
        };
        // The head the trail ends at: the active file's last whole record, or the newest
        // rotated file's; and that record's line and the one before it, for `judge_end`.
        let mut head = None;
        let mut end = None;
        if let Some(t) = tail.as_mut() {
            if let Some(line) = t.last.take() {
                head = Some(head_of(&active_path, &line, &link)?);
                let before = match t.before_last.take() {
                    Some(before) => Some(before),
                    // The active file's first record links to the newest rotated file's last.
                    None if t.last_is_first => newest_tail(&dir)?.and_then(|(_, t)| t.last),
                    None => None,
                };
                end = Some(EndLines { last: line, before });
            }
        }
        if head.is_none() {
            if let Some((h, lines)) = newest_head(&dir, &link)? {
                head = Some(h);
                end = Some(lines);
            }
        }
        let mut active = None;
        if let Some(tail) = tail {
            let first_seq = tail.first.as_deref().and_then(line_seq);
            if let Some(from) = tail.torn_from {
                // Bytes after the last whole record: a record cut short by a crash, what a
                // power cut left (NULs), or an edit: the gateway cannot tell which, so it does
                // not say. They are moved out of the trail into a file of their own, kept for
                // inspection, and the chain carries on from the last whole record, so `audit
                // verify` finds the trail intact.
                let next = head.map_or(1, |h| h.seq + 1);
                let MovedOut { kept, head, bytes } =
                    move_out_tail(&dir, &active_path, from).map_err(io_err)?;
                if super::verify::torn_record(&head, bytes, Some(next)) {
                    tracing::warn!(
                        file = %kept.display(),
                        bytes,
                        "bytes after the last whole audit record, the start of a record: a write \
                         cut short by a crash, or an edit; moved out of the trail for inspection"
                    );
                } else {
                    tracing::error!(
                        file = %kept.display(),
                        bytes,
                        "bytes after the last whole audit record that are not the start of a \
                         record (such as the NULs a power cut can leave, or an edit); moved out \
                         of the trail for inspection"
                    );
                }
            }
            {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&active_path)
                    .map_err(io_err)?;
                file.set_permissions(fs::Permissions::from_mode(0o600))
                    .map_err(io_err)?;
                // What a crash left in the page cache is made durable before building on it.
                file.sync_all().map_err(io_err)?;
                let meta = file.metadata().map_err(io_err)?;
                active = Some(Active {
                    file,
                    dev: meta.dev(),
                    ino: meta.ino(),
                    first_seq,
                });
            }
        }
        if let (Some(end), Some(head)) = (&end, &head) {
            judge_end(&link, end, head);
        }
        let head = head.unwrap_or(Head {
            seq: 0,
            hash: GENESIS,
        });
        let len = match &active {
            Some(a) => a.file.metadata().map_err(io_err)?.len(),
            None => {
                active = Some(open_new(&active_path).map_err(io_err)?);
                sync_dir(&dir).map_err(io_err)?;
                0
            }
        };
        match &link {
            Link::Hmac(key) => tracing::info!(
                dir = %dir.display(),
                next_seq = head.seq + 1,
                prev = %hex(&head.hash),
                chain = "hmac-sha256",
                key_file = %config.key_file.as_deref().unwrap_or(Path::new("")).display(),
                key_id = key.id(),
                "audit trail open, keyed: each record's prev is the HMAC-SHA256 of the line before"
            ),
            Link::Sha256 => tracing::info!(
                dir = %dir.display(),
                next_seq = head.seq + 1,
                prev = %hex(&head.hash),
                chain = "sha256",
                "audit trail open, not keyed: each record's prev is the SHA-256 of the line before \
                 (set [audit] key_file to make a rewritten trail detectable)"
            ),
        }
        // What the trail holds now is durable (the active file was synced above; rotated
        // files were at their rotation).
        shared.metrics.last_seq.set(gauge(head.seq));
        let now = Instant::now();
        Ok(Writer {
            dir,
            active_path,
            durability: config.durability,
            max_file_bytes: config.max_file_bytes,
            retry_interval: config.retry_interval,
            active,
            head,
            link,
            synced_len: len,
            written_len: len,
            unsynced: Vec::new(),
            needs_repair: false,
            backlog: VecDeque::new(),
            failed: false,
            last_commits: 0,
            group_commit_window: match config.durability {
                Durability::Fsync => config.group_commit_window,
                Durability::Buffered { .. } => Duration::ZERO,
            },
            fsync_follow_up: config.fsync_follow_up,
            last_attempt: now,
            last_sync: now,
            head_logged: (now, head.seq),
            shared,
            lock,
        })
    }

    /// The writer loop: until shutdown, or until every `Audit` handle is gone.
    pub(super) fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            let first = match self.next_wakeup() {
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(wait) => rx.recv_timeout(wait),
            };
            let mut batch = Vec::new();
            let mut stop = None;
            let mut disconnected = false;
            match first {
                Ok(Msg::Record(p)) => batch.push(p),
                Ok(Msg::Shutdown(done)) => stop = Some(done),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => disconnected = true,
            }
            // Group commit: everything that queued up meanwhile goes in the same write + sync.
            let drain =
                |batch: &mut Vec<Pending>, stop: &mut Option<tokio::sync::oneshot::Sender<()>>| {
                    while stop.is_none() && !disconnected && batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(Msg::Record(p)) => batch.push(p),
                            Ok(Msg::Shutdown(done)) => *stop = Some(done),
                            Err(_) => break,
                        }
                    }
                };
            drain(&mut batch, &mut stop);
            let under_load = self.last_commits > 1;
            if under_load && !self.group_commit_window.is_zero() && stop.is_none() {
                // Several requests were waiting last time: let more join this fsync.
                std::thread::sleep(self.group_commit_window);
                drain(&mut batch, &mut stop);
            }
            self.last_commits = batch.iter().filter(|p| p.ack.is_some()).count();
            let wrote = !batch.is_empty();
            self.process(batch);
            self.sync_if_due();
            if wrote && stop.is_none() && !disconnected && self.durability != Durability::Fsync {
                // Buffered: nobody waits on these records, so let the next ones queue up and
                // write them together, rather than being woken by each one. (Idle, the writer
                // blocks on the channel and the first record wakes it.)
                std::thread::sleep(BUFFERED_WRITE_DELAY);
            }
            if stop.is_some() || disconnected {
                // Whatever is still queued behind the stop request, then a final sync.
                let rest: Vec<Pending> = rx
                    .try_iter()
                    .filter_map(|m| match m {
                        Msg::Record(p) => Some(p),
                        Msg::Shutdown(_) => None,
                    })
                    .collect();
                self.process(rest);
                if self.failed && !self.backlog.is_empty() {
                    self.retry_now();
                    self.retry_before_shutdown();
                }
                let not_durable = self.final_sync();
                self.report_lost(not_durable);
                if let Some(done) = stop {
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    /// At shutdown, records the trail could not take (it was still failing) are lost with the
    /// process: said loudly and counted, never dropped in silence. With those written but not
    /// made durable by the final sync (`not_durable`), they are added to
    /// [`super::lost_at_shutdown`], so `ssp-gateway run` exits non-zero.
    fn report_lost(&mut self, not_durable: usize) {
        super::count_lost_at_shutdown(self.backlog.len() + not_durable);
        if self.backlog.is_empty() {
            return;
        }
        let lost = self.backlog.len();
        let lost_bytes = super::bytes_of(&self.backlog);
        self.backlog.clear();
        self.shared.done(lost, lost_bytes);
        self.shared.metrics.records_dropped.inc_by(lost as u64);
        tracing::error!(
            dir = %self.dir.display(),
            lost,
            "the audit trail could not be written before shutdown: records lost"
        );
    }

    /// When the loop must wake without a message: to retry, or for a buffered sync.
    fn next_wakeup(&self) -> Option<Duration> {
        let mut wake: Option<Duration> = None;
        if self.failed {
            wake = Some(
                self.retry_interval
                    .saturating_sub(self.last_attempt.elapsed()),
            );
        }
        if !self.unsynced.is_empty() {
            let due = self
                .sync_interval()
                .saturating_sub(self.last_sync.elapsed());
            wake = Some(wake.map_or(due, |w| w.min(due)));
        }
        wake
    }

    /// The longest written records stay unsynced: the `buffered` interval, or under `fsync`
    /// (for records nobody waits on) the follow-up.
    fn sync_interval(&self) -> Duration {
        match self.durability {
            Durability::Buffered { interval } => interval,
            Durability::Fsync => self.fsync_follow_up,
        }
    }

    fn process(&mut self, batch: Vec<Pending>) {
        let has_commit = batch.iter().any(|p| p.ack.is_some());
        let retry_due = self.last_attempt.elapsed() >= self.retry_interval;
        if self.failed && !has_commit && !retry_due {
            // Not hammering a broken disk for records nobody waits on: keep them for the retry.
            self.backlog.extend(batch);
            return;
        }
        if self.failed || !self.backlog.is_empty() {
            // Recovering: what is owed, oldest first, in units small enough for a nearly full
            // disk to take some of it.
            let mut work: Vec<Pending> = self.backlog.drain(..).collect();
            work.extend(batch);
            if work.is_empty() {
                if self.failed && retry_due {
                    self.probe();
                }
                return;
            }
            self.write_records(work, RECOVERY_UNIT_BYTES);
        } else if !batch.is_empty() {
            self.write_records(batch, usize::MAX);
        }
    }

    /// At shutdown, with records still unwritten because the trail is failing: the trail gets
    /// [`SHUTDOWN_RETRY_FOR`] to come back (space freed, a disk remounted), tried every
    /// `retry_interval`, before they are given up as lost.
    fn retry_before_shutdown(&mut self) {
        if !self.failed || self.backlog.is_empty() {
            return;
        }
        tracing::warn!(
            dir = %self.dir.display(),
            records = self.backlog.len(),
            retry_for = ?SHUTDOWN_RETRY_FOR,
            "stopping with audit records the trail cannot take yet: retrying before giving them up"
        );
        let until = Instant::now() + SHUTDOWN_RETRY_FOR;
        while self.failed && !self.backlog.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(self.retry_interval.min(left));
            self.retry_now();
        }
    }

    fn retry_now(&mut self) {
        let work: Vec<Pending> = self.backlog.drain(..).collect();
        self.write_records(work, RECOVERY_UNIT_BYTES);
    }

    /// With nothing to write while failed: is the trail usable again?
    fn probe(&mut self) {
        self.last_attempt = Instant::now();
        match self.ensure_ready() {
            Ok(()) => self.recovered(),
            Err(e) => self.note_failure(&e),
        }
    }

    /// Writes `work` in order, rotating between records as needed, acknowledging each unit
    /// once it is durable. A unit holds at most `unit_bytes` (and always one record): on a
    /// failure the unit is rolled back, the units before it stay written.
    fn write_records(&mut self, work: Vec<Pending>, unit_bytes: usize) {
        self.last_attempt = Instant::now();
        let mut pending = work.into_iter().peekable();
        while pending.peek().is_some() {
            if let Err(e) = self.ensure_ready() {
                return self.fail(e, pending.collect());
            }
            let room = self.max_file_bytes.saturating_sub(self.written_len);
            let mut head = self.head;
            let mut bytes = Vec::new();
            let mut unit = Vec::new();
            while let Some(p) = pending.peek() {
                let start = frame_into(&mut bytes, head.seq + 1, &head.hash, &p.body);
                let hash = self.link.seal(&mut bytes, start);
                let need = (bytes.len() + 1) as u64;
                if need > room && (self.written_len > 0 || start > 0) {
                    bytes.truncate(start);
                    break;
                }
                if start > 0 && bytes.len() + 1 > unit_bytes {
                    bytes.truncate(start);
                    break;
                }
                head = Head {
                    seq: head.seq + 1,
                    hash,
                };
                bytes.push(b'\n');
                if let Some(p) = pending.next() {
                    unit.push(p);
                }
            }
            if unit.is_empty() {
                // The active file is full: close it off and start the next one.
                if let Err(e) = self.rotate() {
                    return self.fail(e, pending.collect());
                }
                continue;
            }
            let first_seq = self.head.seq + 1;
            let waited_on = unit.iter().any(|p| p.ack.is_some());
            // The head the unit ends at, in place before the unit is written: a sync with it
            // makes this head durable (`note_durable`). Put back if the unit fails.
            let before = std::mem::replace(&mut self.head, head);
            match self.write_unit(&bytes, waited_on) {
                Ok(()) => {
                    if let Some(a) = self.active.as_mut() {
                        a.first_seq.get_or_insert(first_seq);
                    }
                    self.shared
                        .metrics
                        .records_written
                        .inc_by(unit.len() as u64);
                    self.shared.metrics.batch_records.observe(unit.len() as f64);
                    let (n, unit_bytes) = (unit.len(), super::bytes_of(&unit));
                    for p in unit {
                        if let Some(ack) = p.ack {
                            let _ = ack.send(Ok(()));
                        }
                    }
                    self.shared.done(n, unit_bytes);
                    self.recovered();
                }
                Err(e) => {
                    self.head = before;
                    unit.extend(pending);
                    return self.fail(e, unit);
                }
            }
        }
    }

    /// Appends `bytes` (whole lines) and, under `fsync` when someone waits on them, syncs
    /// (with them everything written before). Bytes nobody waits on are synced when due
    /// (`sync_if_due`, at once with a zero follow-up). On failure the file is rolled back to
    /// where it was.
    fn write_unit(&mut self, bytes: &[u8], waited_on: bool) -> io::Result<()> {
        let before = self.written_len;
        let Some(active) = self.active.as_mut() else {
            return Err(io::Error::other("no active audit file"));
        };
        if let Err(e) = active.file.write_all(bytes) {
            self.rollback_to(before);
            return Err(e);
        }
        self.written_len += bytes.len() as u64;
        self.unsynced.extend_from_slice(bytes);
        if self.durability == Durability::Fsync && waited_on {
            if let Err(e) = self.sync() {
                // Not durable: take the unit back out (sync failed, so nothing after
                // `synced_len` can be trusted).
                self.rollback_to(before);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Forgets everything written after `len` and cuts the file back to it.
    fn rollback_to(&mut self, len: u64) {
        let keep = len.saturating_sub(self.synced_len) as usize;
        self.unsynced.truncate(keep);
        self.written_len = self.synced_len + self.unsynced.len() as u64;
        let cut = self
            .active
            .as_ref()
            .map(|a| a.file.set_len(self.written_len));
        if !matches!(cut, Some(Ok(()))) {
            self.needs_repair = true;
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        let Some(active) = self.active.as_ref() else {
            return Err(io::Error::other("no active audit file"));
        };
        let started = Instant::now();
        let result = active.file.sync_data();
        self.shared
            .metrics
            .fsync_duration
            .observe(started.elapsed().as_secs_f64());
        self.last_sync = Instant::now();
        match result {
            Ok(()) => {
                self.synced_len = self.written_len;
                empty_after_sync(&mut self.unsynced);
                self.note_durable();
                Ok(())
            }
            Err(e) => {
                // After a failed fsync the page cache cannot be trusted: rewrite on recovery.
                self.needs_repair = true;
                Err(e)
            }
        }
    }

    /// Everything written so far, up to the head, is durable: `ssp_audit_last_seq` says up to
    /// which record (`write_records` puts a unit's head in place before writing it).
    fn note_durable(&mut self) {
        self.shared.metrics.last_seq.set(gauge(self.head.seq));
        // An anchor for the end of the trail, logged at the first durable write a minute or
        // more after the last one, so that after a crash (no `audit trail closed` line) the
        // records up to it are covered by a line kept outside the trail (those written after
        // it, or by a trail that then stopped growing, are not).
        if self.head.seq != self.head_logged.1 && self.head_logged.0.elapsed() >= HEAD_LOG_EVERY {
            self.head_logged = (Instant::now(), self.head.seq);
            tracing::info!(
                last_seq = self.head.seq,
                head = %hex(&self.head.hash),
                "audit head"
            );
        }
    }

    fn sync_if_due(&mut self) {
        if !self.unsynced.is_empty() && self.last_sync.elapsed() >= self.sync_interval() {
            if let Err(e) = self.sync() {
                self.fail(e, Vec::new());
            }
        }
    }

    /// The last sync before the writer stops. Returns how many records it could not make
    /// durable (written, under `buffered` or nobody waiting on them, but the trail failed
    /// before they were synced: they may not be in the file).
    fn final_sync(&mut self) -> usize {
        let mut not_durable = 0;
        if !self.unsynced.is_empty() {
            if let Err(e) = self.ensure_ready().and_then(|()| self.sync()) {
                self.note_failure(&e);
                not_durable = self.unsynced.iter().filter(|b| **b == b'\n').count();
                tracing::error!(
                    dir = %self.dir.display(),
                    records = not_durable,
                    error = %e,
                    "audit records written but not made durable before shutdown: they may be lost"
                );
            }
        }
        tracing::info!(
            last_seq = self.head.seq,
            head = %hex(&self.head.hash),
            "audit trail closed"
        );
        not_durable
    }

    /// Makes sure the active file is the one at the path, open, and holds exactly the lines
    /// the writer believes it holds. A new active file is opened only in a directory that
    /// exists and whose lock this process holds ([`Writer::claim_dir`]).
    fn ensure_ready(&mut self) -> io::Result<()> {
        if let Some(active) = &self.active {
            match fs::metadata(&self.active_path) {
                Ok(m) if m.dev() == active.dev && m.ino() == active.ino => {}
                Ok(_) => {
                    // When the directory was recreated and another gateway took it, that is
                    // the error to report.
                    self.claim_dir()?;
                    return Err(io::Error::other(
                        "the active audit file was replaced by another file",
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Moved or deleted from under us (or its directory with it): what was not
                    // yet synced goes into a new file, and the chain carries on (the head is
                    // still ours).
                    tracing::error!(
                        file = %self.active_path.display(),
                        "the active audit file was moved or deleted; starting a new one"
                    );
                    self.active = None;
                    self.synced_len = 0;
                    self.written_len = self.unsynced.len() as u64;
                    self.needs_repair = !self.unsynced.is_empty();
                }
                Err(e) => return Err(e),
            }
        }
        if self.active.is_none() {
            self.claim_dir()?;
            self.active = Some(open_new(&self.active_path)?);
            sync_dir(&self.dir)?;
        }
        if self.needs_repair {
            let Some(active) = self.active.as_mut() else {
                return Err(io::Error::other("no active audit file"));
            };
            active.file.set_len(self.synced_len)?;
            active.file.write_all(&self.unsynced)?;
            active.file.sync_data()?;
            self.synced_len += self.unsynced.len() as u64;
            self.written_len = self.synced_len;
            self.unsynced.clear();
            self.needs_repair = false;
            self.note_durable();
        }
        Ok(())
    }

    /// Before a new active file is opened in the directory: the directory exists (created
    /// again, as at start, when it was removed) and the lock held is on its `.lock` (taken
    /// again, as at start, when the directory was recreated and the lock held is on a file no
    /// longer there). `Locked` while another process holds the directory's lock: nothing is
    /// written beside another writer. Not on the per-record path: only when the active file
    /// is gone or replaced, or none is open.
    fn claim_dir(&mut self) -> io::Result<()> {
        match fs::metadata(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_dir(&self.dir)?;
                tracing::error!(
                    dir = %self.dir.display(),
                    "the audit directory was removed; created it again"
                );
            }
            _ => {}
        }
        let held = fs::metadata(self.dir.join(LOCK_FILE))
            .is_ok_and(|m| m.dev() == self.lock.dev && m.ino() == self.lock.ino);
        if !held {
            self.lock = lock_dir(&self.dir).map_err(io::Error::other)?;
            tracing::warn!(
                dir = %self.dir.display(),
                "the audit directory's lock file was gone (the directory removed or recreated); \
                 took its lock again"
            );
        }
        Ok(())
    }

    /// Closes the active file off (synced) under its rotated name and opens a new one.
    fn rotate(&mut self) -> io::Result<()> {
        if !self.unsynced.is_empty() {
            self.sync()?;
        }
        let first_seq = self
            .active
            .as_ref()
            .and_then(|a| a.first_seq)
            .unwrap_or(self.head.seq + 1);
        let rotated = self.dir.join(rotated_name(first_seq));
        fs::rename(&self.active_path, &rotated)?;
        self.active = None;
        self.synced_len = 0;
        self.written_len = 0;
        tracing::info!(
            file = %rotated.display(),
            last_seq = self.head.seq,
            head = %hex(&self.head.hash),
            "audit file rotated"
        );
        sync_dir(&self.dir)?;
        self.active = Some(open_new(&self.active_path)?);
        sync_dir(&self.dir)
    }

    fn note_failure(&mut self, e: &io::Error) {
        self.shared.metrics.write_errors.inc();
        if !self.failed {
            tracing::error!(
                dir = %self.dir.display(),
                error = %e,
                "the audit trail cannot be written: refusing traffic until it can"
            );
        } else {
            tracing::debug!(error = %e, "audit trail still cannot be written");
        }
        self.failed = true;
        self.shared.writable.store(false, Ordering::Release);
        self.shared.metrics.writable.set(0);
    }

    /// A write failed: waiting commits are refused, everything else waits for the retry.
    fn fail(&mut self, e: io::Error, records: Vec<Pending>) {
        self.note_failure(&e);
        let (mut refused, mut refused_bytes) = (0, 0);
        for p in records {
            match p.ack {
                Some(ack) => {
                    let _ = ack.send(Err(AuditError::Unavailable));
                    refused += 1;
                    refused_bytes += p.body.len();
                }
                None => self.backlog.push_back(p),
            }
        }
        if refused > 0 {
            self.shared.done(refused, refused_bytes);
        }
    }

    fn recovered(&mut self) {
        if self.failed {
            tracing::warn!(dir = %self.dir.display(), "the audit trail can be written again");
            self.failed = false;
        }
        self.shared.writable.store(true, Ordering::Release);
        self.shared.metrics.writable.set(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unsynced_buffer_keeps_its_room_under_load_and_gives_it_back_after() {
        let mut buf = vec![7u8; 8 << 20];
        empty_after_sync(&mut buf);
        assert!(buf.is_empty());
        assert!(buf.capacity() >= 8 << 20, "steady load: room kept");
        buf.extend_from_slice(&[1u8; 3 << 20]);
        empty_after_sync(&mut buf);
        assert!(
            buf.capacity() < 4 << 20,
            "load fell: shrunk to the last interval's size"
        );
        buf.extend_from_slice(&[1u8; 100]);
        empty_after_sync(&mut buf);
        assert!(buf.capacity() <= 100, "idle: {} bytes held", buf.capacity());
        buf.extend_from_slice(&[1u8; 100]);
        let cap = buf.capacity();
        empty_after_sync(&mut buf);
        assert_eq!(buf.capacity(), cap, "small buffers are not churned");
    }

    fn scratch() -> crate::tempdir::TempDir {
        crate::tempdir::TempDir::new("writer")
    }

    /// The end of a file is found looking back a chunk at a time: lines across chunk
    /// boundaries, and a tail of many chunks after the last newline, are read right, and the
    /// tail is moved out whole, byte for byte, through a small buffer (before, both were read
    /// into memory whole: bytes appended to the trail could exhaust the gateway's at start).
    #[test]
    fn the_end_of_a_file_is_read_and_its_tail_moved_out_a_chunk_at_a_time() {
        let d = scratch();
        let path = d.join("audit.jsonl");
        let first = format!("{{\"seq\":1,\"x\":\"{}\"}}", "a".repeat(100_000));
        let last = format!("{{\"seq\":2,\"x\":\"{}\"}}", "b".repeat(150_000));
        let tail = vec![b'Z'; 3 * TAIL_CHUNK as usize + 17];
        let mut bytes = format!("{first}\n{last}\n").into_bytes();
        let whole = bytes.len() as u64;
        bytes.extend_from_slice(&tail);
        fs::write(&path, &bytes).expect("write");
        let t = read_tail(&path).expect("tail");
        assert_eq!(t.first.as_deref(), Some(first.as_bytes()));
        assert_eq!(t.last.as_deref(), Some(last.as_bytes()));
        assert_eq!(t.torn_from, Some(whole));
        let moved = move_out_tail(&d, &path, whole).expect("moved");
        assert_eq!(moved.bytes, tail.len() as u64);
        assert_eq!(moved.head, &tail[..MOVED_OUT_HEAD as usize]);
        assert_eq!(fs::read(&moved.kept).expect("kept"), tail);
        assert_eq!(fs::read(&path).expect("trail").len() as u64, whole);
        // Whole lines only, then none at all.
        let t = read_tail(&path).expect("tail");
        assert_eq!(
            (t.last.as_deref(), t.torn_from),
            (Some(last.as_bytes()), None)
        );
        fs::write(&path, &tail).expect("write");
        let t = read_tail(&path).expect("tail");
        assert_eq!((t.last, t.first, t.torn_from), (None, None, Some(0)));
        // A last line longer than any record is refused, not read.
        let mut huge = vec![b'{'; MAX_LINE_READ as usize + 1];
        huge.push(b'\n');
        fs::write(&path, &huge).expect("write");
        let err = read_tail(&path).err().expect("refused");
        assert!(
            err.to_string().contains("longer than any audit record"),
            "{err}"
        );
    }

    /// A last record at the largest seq cannot be carried on (the next would wrap), and a FIFO
    /// in the active file's place is refused at once, not waited on.
    #[test]
    fn a_trail_at_the_largest_seq_or_a_fifo_is_refused_not_carried_on() {
        let d = scratch();
        let path = d.join("audit.jsonl");
        let line = format!("{{\"seq\":{},\"prev\":\"{}\"}}", u64::MAX, hex(&GENESIS));
        let err = head_of(&path, line.as_bytes(), &Link::Sha256).expect_err("refused");
        assert!(err.to_string().contains("largest"), "{err}");
        let fifo =
            std::ffi::CString::new(d.join("fifo").as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(read_tail(&d.join("fifo")).is_err());
    }

    #[test]
    fn rotated_names_carry_their_first_seq() {
        let name = rotated_name(42);
        assert!(
            name.starts_with("audit-") && name.ends_with("-000000000042.jsonl"),
            "{name}"
        );
        assert_eq!(rotated_seq(&name), Some(42));
        assert_eq!(rotated_seq("audit.jsonl"), None);
        assert_eq!(rotated_seq("notes.txt"), None);
    }
}
