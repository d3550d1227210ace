//! `ssp-gateway audit verify [--key FILE]... DIR|FILE...`: proves that audit files form one
//! unbroken chain — each record's `seq` follows the one before and its `prev` is the link value
//! of the line before: its SHA-256 or, with keys given, its HMAC-SHA256 under one of them (never
//! a plain SHA-256 then: that would let whoever rewrote the trail without the key pass) — across
//! rotated files (taken in the order of their first record, whatever order they are given in;
//! a rotated file's first record must be the seq its name says), or names every break. A torn
//! line (a write cut short by a crash) is reported and tolerated only where the gateway can
//! leave one — at the very end of the last file, the start of a record and shorter than
//! [`MAX_TORN_BYTES`]; anywhere else it is a break. The end of the trail, which the chain alone
//! cannot protect (records cut off its end leave a shorter valid chain), is checked against
//! anchors kept elsewhere: `--head SEQ:HEX` (record SEQ is there and its link value is HEX, as
//! the gateway logs it) and `--min-seq N` (the trail reaches seq N, e.g. from
//! `ssp_audit_last_seq`'s history). Given a directory, it lists the trail files itself, and
//! lists and reads them again when the trail rotated meanwhile; files the gateway set aside
//! (`audit-tail-*.partial`) are named, not read. Read-only: it never changes a file.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::key::ChainKey;
use super::record::{hex, sha256, GENESIS};

/// How every record line starts (`seq` is written first): a torn line is a prefix of a record.
const RECORD_START: &[u8] = b"{\"seq\":";

/// A torn line this long or longer is not tolerated: the gateway's records are far shorter (a
/// record holds the request's target URL and JWT claims, both from a request head of at most
/// `[listener] max_header_bytes`, 64 KiB by default). The writer itself puts no bound on a
/// record, so this is the `audit verify` bound, not the writer's.
pub const MAX_TORN_BYTES: usize = 1 << 20;

/// The longest line read whole; a longer one is a break, skipped to its end without being held.
pub(super) const MAX_LINE_BYTES: usize = 128 << 20;

/// Reads one line (with its newline, when it has one) into `buf`. Returns its length in the
/// file, 0 at the end; a line longer than `max` is read to its end but only its first `max`
/// bytes are kept.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    let n = (&mut *reader).take(max as u64).read_until(b'\n', buf)?;
    if n < max || buf.last() == Some(&b'\n') {
        return Ok(n);
    }
    let mut total = n;
    loop {
        let (used, done) = {
            let available = reader.fill_buf()?;
            match memchr::memchr(b'\n', available) {
                _ if available.is_empty() => (0, true),
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            }
        };
        reader.consume(used);
        total += used;
        if done {
            return Ok(total);
        }
    }
}

/// Why a line without a newline, `len` bytes long of which `line` was kept, cannot be the
/// torn end of the trail (`last`: it ends the last file; `expected`: the next seq).
fn not_torn(line: &[u8], len: usize, last: bool, expected: Option<u64>) -> Option<String> {
    if !last {
        return Some(format!(
            "{len} bytes without a newline at the end of a file that is not the last of the \
             trail: the gateway never leaves a line cut short there (a file cut, or edited)"
        ));
    }
    if !starts_next_record(line, expected) {
        return Some(format!(
            "not an audit record: {len} bytes without a newline that are not the start of the next one"
        ));
    }
    if len >= MAX_TORN_BYTES {
        return Some(format!(
            "{len} bytes without a newline: longer than a record cut short can be ({} bytes at most)",
            MAX_TORN_BYTES - 1
        ));
    }
    None
}

/// Whether the bytes after the last whole record, `len` of them starting with `head`, are what
/// a write cut short leaves and `audit verify` tolerates: the start of the next record (all of
/// `{"seq":`, or a part of it, then its seq), shorter than [`MAX_TORN_BYTES`]. The writer, at start, says so of
/// what it moves out by the same rule.
pub(super) fn torn_record(head: &[u8], len: u64, expected: Option<u64>) -> bool {
    starts_next_record(head, expected) && len < MAX_TORN_BYTES as u64
}

/// Whether a line cut short can be the start of the next record: a part of [`RECORD_START`]
/// (a write cut after its first byte), or all of it, then digits, and once they are complete
/// (a `,` follows), `expected` when known.
fn starts_next_record(line: &[u8], expected: Option<u64>) -> bool {
    if !line.is_empty() && line.len() < RECORD_START.len() {
        return RECORD_START.starts_with(line);
    }
    let Some(rest) = line.strip_prefix(RECORD_START) else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    match rest.get(digits) {
        // Cut inside the number (or right after the key): nothing to compare yet.
        None => true,
        Some(b',') if digits > 0 => {
            let seq = std::str::from_utf8(&rest[..digits])
                .ok()
                .and_then(|t| t.parse::<u64>().ok());
            match (seq, expected) {
                (Some(seq), Some(expected)) => seq == expected,
                (Some(_), None) => true,
                (None, _) => false,
            }
        }
        Some(_) => false,
    }
}

/// What the chain is checked against.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Empty: every link is the SHA-256 of the line before. Otherwise every link must be the
    /// HMAC-SHA256 of the line before under one of these keys (several when the key was
    /// changed at a restart).
    pub keys: Vec<ChainKey>,
    /// Records that must be in the trail with the link values given (`--head SEQ:HEX`).
    pub heads: Vec<Head>,
    /// The seq the trail must reach, at least (`--min-seq N`).
    pub min_seq: Option<u64>,
    /// The seq the trail must begin at (`--first-seq N`; 1: its very start), so that files
    /// removed from its start, which leave a shorter valid chain, show.
    pub first_seq: Option<u64>,
    /// With keys: the last record of a trail begun before its key was set (`--unkeyed-through
    /// N`, the seq the gateway logged when it first ran keyed on it): the links of records up
    /// to it are plain SHA-256, those after it under a key. Never inferred from the trail: a
    /// trail rewritten without the key looks the same, until the gateway links onto it.
    pub unkeyed_through: Option<u64>,
}

/// An anchor for the end of the trail kept outside it: the record `seq` and its line's link
/// value (what the next record's `prev` would be), as the gateway logs them (`last_seq=…
/// head=…` at each rotation and at shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub link: [u8; 32],
}

impl std::str::FromStr for Head {
    type Err = String;

    /// `SEQ:HEX`, HEX being 64 hex digits.
    fn from_str(s: &str) -> Result<Head, String> {
        let bad = || format!("`{s}` is not SEQ:HEX (a seq, then 64 hex digits)");
        let (seq, hex_digits) = s.split_once(':').ok_or_else(bad)?;
        let seq = seq.parse::<u64>().map_err(|_| bad())?;
        // Either case from the command line; the gateway logs it in lowercase.
        let link = super::record::decode_hex(hex_digits.to_ascii_lowercase().as_bytes())
            .ok_or_else(bad)?;
        Ok(Head { seq, link })
    }
}

/// The link values of the line of record `seq`, one per way the next record may link to it
/// (the SHA-256, or its HMAC under each key given, in the order of `Options::keys`; the
/// SHA-256 again before `Options::unkeyed_through`).
fn link_values(options: &Options, seq: u64, line: &[u8]) -> Vec<[u8; 32]> {
    if options.keys.is_empty() || options.unkeyed_through.is_some_and(|n| seq < n) {
        vec![sha256(line)]
    } else {
        options.keys.iter().map(|k| k.link_of(line)).collect()
    }
}

/// Why `prev` (hex) is not a link value of the line before (`values`, of `line`, record `seq`).
fn link_mismatch(options: &Options, prev_hex: &str, seq: u64, line: &[u8]) -> String {
    if options.keys.is_empty() || options.unkeyed_through.is_some_and(|n| seq < n) {
        return format!(
            "prev {prev_hex} is not the SHA-256 of record {seq} ({}): the record before was \
             altered or replaced{}",
            hex(&sha256(line)),
            if options.keys.is_empty() {
                ", or this is a keyed trail (give --key)"
            } else {
                ""
            }
        );
    }
    if prev_hex == hex(&sha256(line)) {
        return format!(
            "prev {prev_hex} is the plain SHA-256 of record {seq}, not its HMAC under a key \
             given: rewritten by someone without the key, or written before the trail was keyed \
             (then give --unkeyed-through with the seq the gateway logged when it first ran \
             keyed on this trail)"
        );
    }
    format!(
        "prev {prev_hex} is not the HMAC of record {seq} under any key given: the record before \
         was altered or replaced, or the trail was keyed with another key"
    )
}

/// A file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct VerifyError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// Breaks kept, and printed, one by one; past them they are counted.
pub const MAX_BREAKS_LISTED: usize = 100;

/// One place where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub path: PathBuf,
    /// 1-based line number in `path` (0: the file as a whole).
    pub line: u64,
    /// The record's `seq`, when it has one.
    pub seq: Option<u64>,
    pub reason: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BROKEN: {}", self.path.display())?;
        if self.line > 0 {
            write!(f, " line {}", self.line)?;
        }
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// The trail's last line without its newline, tolerated: the start of the next record, cut
/// short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Torn {
    pub path: PathBuf,
    pub line: u64,
    pub bytes: usize,
}

/// One file's part of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    pub path: PathBuf,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Lines read (whole or torn).
    pub lines: u64,
}

/// What `verify_files` found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// In chain order.
    pub files: Vec<FileReport>,
    /// Whole records read (those in a break included).
    pub records: u64,
    pub first_seq: Option<u64>,
    /// The seq of the last record read, in chain order.
    pub last_seq: Option<u64>,
    /// `prev` of the first record checked (64 zeros at the very start of a trail).
    pub anchor: Option<String>,
    /// The link value of the last record checked (what the next record's `prev` would be):
    /// anchor it elsewhere to make the end tamper-evident. With keys, under the key that
    /// proved the last link (the last key given when none did).
    pub head: Option<String>,
    /// The links were checked as HMACs under keys given (`--key`), not as SHA-256s.
    pub keyed: bool,
    /// With keys and `--unkeyed-through`: the seq given, whose records' links are plain
    /// SHA-256 (the first keyed link, after it, covers them: it is the HMAC of a line that holds
    /// the SHA-256 of the line before, and so on back).
    pub unkeyed_through: Option<u64>,
    /// With keys: links checked under one (none: a trail of one record, or all of it before
    /// `--unkeyed-through`).
    pub keyed_links: u64,
    /// At the end of the last file only.
    pub torn: Option<Torn>,
    /// The first [`MAX_BREAKS_LISTED`] breaks, in the order found.
    pub breaks: Vec<Broken>,
    /// Breaks found past those.
    pub more_breaks: u64,
    /// The `--head` anchors found in the trail with their link values.
    pub heads_found: Vec<u64>,
    /// Files the gateway set aside (`audit-tail-*.partial`), given or found: not read.
    pub set_aside: Vec<PathBuf>,
    /// Paths given more than once (the same file): read once.
    pub given_twice: Vec<PathBuf>,
    /// How many times a directory given was listed and read again because its trail rotated
    /// while it was read.
    pub read_again: u32,
}

impl Report {
    /// No break (a torn line at the end is tolerated).
    pub fn intact(&self) -> bool {
        self.breaks.is_empty()
    }

    /// Every break found, those listed and those counted.
    pub fn break_count(&self) -> u64 {
        self.breaks.len() as u64 + self.more_breaks
    }

    fn broke(&mut self, broken: Broken) {
        if self.breaks.len() < MAX_BREAKS_LISTED {
            self.breaks.push(broken);
        } else {
            self.more_breaks += 1;
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.set_aside {
            writeln!(
                f,
                "set aside: {}: kept aside by the gateway, not part of the chain; not read",
                p.display()
            )?;
        }
        for p in &self.given_twice {
            writeln!(f, "note: {} given twice; read once", p.display())?;
        }
        if self.read_again > 0 {
            writeln!(
                f,
                "note: the trail rotated while it was read; listed and read again ({} time(s))",
                self.read_again
            )?;
        }
        if let Some(t) = &self.torn {
            writeln!(
                f,
                "torn: {} line {}: {} bytes without a newline at the end of the trail (the start \
                 of the next record: a write cut short by a crash, or an edit); tolerated",
                t.path.display(),
                t.line,
                t.bytes
            )?;
        }
        for seq in &self.heads_found {
            writeln!(
                f,
                "anchor: record {seq} is there with the link value --head gave"
            )?;
        }
        let seqs = match (self.first_seq, self.last_seq) {
            (Some(first), Some(last)) => format!("seq {first}..={last}"),
            _ => "no complete records".to_owned(),
        };
        if !self.intact() {
            for b in &self.breaks {
                writeln!(f, "{b}")?;
            }
            if self.more_breaks > 0 {
                writeln!(
                    f,
                    "BROKEN: … and {} more break(s), not listed",
                    self.more_breaks
                )?;
            }
            return write!(
                f,
                "BROKEN: {} break(s) in {} records, {seqs}, {} file(s)",
                self.break_count(),
                self.records,
                self.files.len()
            );
        }
        match self.last_seq {
            Some(last) => {
                let start = if self.anchor.as_deref() == Some(&hex(&GENESIS))
                    && self.first_seq == Some(1)
                {
                    "from the start of the trail".to_owned()
                } else {
                    format!(
                        "anchored at prev {} (earlier files not given)",
                        self.anchor.as_deref().unwrap_or("-")
                    )
                };
                let head = self.head.as_deref().unwrap_or("-");
                if let Some(through) = self.unkeyed_through {
                    writeln!(
                        f,
                        "note: the links up to record {through} are plain SHA-256 (--unkeyed-through: \
                         written before the trail was keyed; take it from the first \
                         `unkeyed_through=` line the gateway logged for this trail, a later one is \
                         a rewrite); the first keyed link, after it, covers them"
                    )?;
                }
                if self.keyed && self.keyed_links == 0 {
                    writeln!(
                        f,
                        "note: no link was checked under a key (the trail holds no keyed link)"
                    )?;
                }
                write!(
                    f,
                    "ok: {} records, {seqs}, {} file(s), chain intact {start}, every link {}; head {} {head} (anchor the end elsewhere: --head {last}:{head})",
                    self.records,
                    self.files.len(),
                    if self.keyed {
                        "the HMAC-SHA256 of the line before under a key given"
                    } else {
                        "the SHA-256 of the line before"
                    },
                    if self.keyed { "hmac-sha256" } else { "sha256" },
                )
            }
            None => write!(f, "ok: no complete records"),
        }
    }
}

/// `seq` and `prev` of a stored line, or why it is not an audit record.
pub(super) fn parse_line(line: &[u8]) -> Result<(u64, String), String> {
    let v: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let seq = v
        .get("seq")
        .and_then(serde_json::Value::as_u64)
        .ok_or("no numeric `seq`")?;
    let prev = v
        .get("prev")
        .and_then(serde_json::Value::as_str)
        .filter(|p| p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or("no 64-hex-digit `prev`")?;
    Ok((seq, prev.to_owned()))
}

/// The seq of the first record of an open file (read from its start; the file is left at
/// its start again).
fn first_seq(file: &mut File) -> io::Result<Option<u64>> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(&mut *file);
    let mut line = Vec::new();
    read_line(&mut reader, &mut line, MAX_LINE_BYTES)?;
    drop(reader);
    file.seek(SeekFrom::Start(0))?;
    if line.pop() != Some(b'\n') {
        return Ok(None);
    }
    Ok(parse_line(&line).ok().map(|(seq, _)| seq))
}

/// How many times `audit verify DIR` lists and reads the trail when it rotated meanwhile.
const READS: u32 = 3;

/// What the gateway sets aside (`audit-tail-<time>.partial`): kept, not part of the chain.
fn set_aside_name(name: &str) -> bool {
    name.starts_with("audit-tail-") && name.ends_with(".partial")
}

/// A trail file's name, as the gateway names them: the active one or a rotated one.
fn trail_name(name: &str) -> bool {
    name == super::ACTIVE_FILE || (name.starts_with("audit-") && name.ends_with(".jsonl"))
}

/// One trail file, open.
struct Opened {
    path: PathBuf,
    file: File,
}

/// The files to read, open, and what was said about the paths given.
#[derive(Default)]
struct Gathered {
    files: Vec<Opened>,
    set_aside: Vec<PathBuf>,
    given_twice: Vec<PathBuf>,
    /// Each directory given, with the trail file names it held when listed.
    listings: Vec<(PathBuf, Vec<String>)>,
}

/// The trail file names in `dir` (sorted), and the files it sets aside.
fn list_dir(dir: &Path) -> io::Result<(Vec<String>, Vec<PathBuf>)> {
    let (mut names, mut aside) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if set_aside_name(&name) {
            aside.push(entry.path());
        } else if trail_name(&name) {
            names.push(name);
        }
    }
    names.sort();
    aside.sort();
    Ok((names, aside))
}

/// Why a gathering failed: a file could not be read, or (in a directory) vanished after it
/// was listed, which a rotation or a retention job does.
enum GatherError {
    Unreadable(VerifyError),
    Vanished(VerifyError),
}

/// Opens what `paths` name: files as given (an `audit-tail-*.partial` is set aside, a path
/// given twice read once), directories by listing their trail files. A directory's active
/// file is opened before its listing, so that a rotation while it is listed or read leaves a
/// consistent set: the file held is either listed under its new name (read once) or rotated
/// after the listing (the newer files are not read).
///
/// A directory with no trail file in it is an error when `anchored` is false: a mistyped path
/// is not an intact trail. With anchors (`--head`, `--min-seq`, `--first-seq`) it is read as
/// an empty trail, which the anchors then show broken (every file removed).
fn gather(paths: &[PathBuf], anchored: bool) -> Result<Gathered, GatherError> {
    let mut g = Gathered::default();
    let mut canonical: Vec<PathBuf> = Vec::new();
    let mut held: Vec<(u64, u64)> = Vec::new();
    let unreadable = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GatherError::Unreadable(VerifyError { path, source })
    };
    let mut open = |g: &mut Gathered, path: &Path, in_dir: bool| -> Result<(), GatherError> {
        let file = match crate::files::open_regular(path) {
            Ok(f) => f,
            Err(e) if in_dir && e.kind() == io::ErrorKind::NotFound => {
                return Err(GatherError::Vanished(VerifyError {
                    path: path.to_path_buf(),
                    source: e,
                }))
            }
            Err(e) => return Err(unreadable(path)(e)),
        };
        let meta = file.metadata().map_err(unreadable(path))?;
        let id = (
            std::os::unix::fs::MetadataExt::dev(&meta),
            std::os::unix::fs::MetadataExt::ino(&meta),
        );
        if held.contains(&id) {
            // The same file under another name: the active file rotated after it was opened.
            return Ok(());
        }
        held.push(id);
        g.files.push(Opened {
            path: path.to_path_buf(),
            file,
        });
        Ok(())
    };
    for path in paths {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            let active = path.join(super::ACTIVE_FILE);
            if active.exists() {
                open(&mut g, &active, true)?;
            }
            let (names, aside) = list_dir(path).map_err(unreadable(path))?;
            if names.is_empty() && !anchored {
                return Err(unreadable(path)(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no audit trail file here ({} or audit-<seq>.jsonl)",
                        super::ACTIVE_FILE
                    ),
                )));
            }
            for name in &names {
                if name != super::ACTIVE_FILE {
                    open(&mut g, &path.join(name), true)?;
                }
            }
            g.set_aside.extend(aside);
            g.listings.push((path.clone(), names));
            continue;
        }
        if set_aside_name(name) {
            g.set_aside.push(path.clone());
            continue;
        }
        match path.canonicalize() {
            Ok(c) if canonical.contains(&c) => {
                g.given_twice.push(path.clone());
                continue;
            }
            Ok(c) => canonical.push(c),
            Err(e) => return Err(unreadable(path)(e)),
        }
        open(&mut g, path, false)?;
    }
    // A set-aside file found in a directory and also given is named once.
    let mut seen = Vec::new();
    g.set_aside.retain(|p| {
        let c = p.canonicalize().unwrap_or_else(|_| p.clone());
        let new = !seen.contains(&c);
        seen.push(c);
        new
    });
    Ok(g)
}

/// Whether a directory given holds other trail files now than when it was listed.
fn relisted_differently(listings: &[(PathBuf, Vec<String>)]) -> bool {
    listings
        .iter()
        .any(|(dir, names)| list_dir(dir).map_or(true, |(now, _)| now != *names))
}

/// The last record accepted into the chain: the next one is checked against it.
struct Last {
    seq: u64,
    /// Its link values (`link_values`).
    values: Vec<[u8; 32]>,
}

/// Checks the chain through `paths` (files, or directories whose trail files are listed),
/// and reports every break (the first [`MAX_BREAKS_LISTED`] of them one by one). A directory
/// whose trail rotated while it was read (a file listed then gone, or other files there after
/// a read that found a break) is listed and read again, up to [`READS`] times in all.
pub fn verify_files(paths: &[PathBuf], options: &Options) -> Result<Report, VerifyError> {
    let mut read = 1;
    loop {
        let anchored =
            !options.heads.is_empty() || options.min_seq.is_some() || options.first_seq.is_some();
        let gathered = match gather(paths, anchored) {
            Ok(g) => g,
            Err(GatherError::Vanished(_)) if read < READS => {
                read += 1;
                continue;
            }
            Err(GatherError::Vanished(e) | GatherError::Unreadable(e)) => return Err(e),
        };
        let listings = gathered.listings.clone();
        let given = paths.first().cloned().unwrap_or_default();
        let mut report = check(gathered, options, &given)?;
        if !report.intact() && read < READS && relisted_differently(&listings) {
            read += 1;
            continue;
        }
        report.read_again = read - 1;
        return Ok(report);
    }
}

/// Checks the chain through the files gathered (`given`: the first path given, to name when
/// there is no file).
fn check(gathered: Gathered, options: &Options, given: &Path) -> Result<Report, VerifyError> {
    // Chain order: by first record; files with no whole record last, as given. Read once all
    // are open: a file found empty now is the newest of those held, whatever rotated since.
    let mut ordered = Vec::with_capacity(gathered.files.len());
    for mut opened in gathered.files {
        let first = first_seq(&mut opened.file).map_err(|source| VerifyError {
            path: opened.path.clone(),
            source,
        })?;
        ordered.push((first, opened));
    }
    ordered.sort_by_key(|(first, _)| first.unwrap_or(u64::MAX));

    let mut report = Report {
        set_aside: gathered.set_aside,
        given_twice: gathered.given_twice,
        keyed: !options.keys.is_empty(),
        ..Report::default()
    };
    let mut last: Option<Last> = None;
    // The line of `last`, for saying what a link that does not match is.
    let mut last_line = Vec::new();
    // Which way of linking (key) proved the last link.
    let mut proved_by = options.keys.len().saturating_sub(1);
    // With keys: the index of the latest key a link was proved under; keys are used in the
    // order given (an old key after a new one is a forgery under a key given up).
    let mut key_floor = 0usize;
    let last_file = ordered.len().saturating_sub(1);
    let mut buf = Vec::new();
    // The `--head` anchors whose record was read, matching or not.
    let mut anchors_read = Vec::new();
    for (index, (_, opened)) in ordered.into_iter().enumerate() {
        let path = opened.path;
        let err = |source| VerifyError {
            path: path.clone(),
            source,
        };
        // The seq a rotated file's name says its first record has.
        let named_seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(super::writer::rotated_seq);
        let mut reader = BufReader::new(opened.file);
        let mut file = FileReport {
            path: path.clone(),
            records: 0,
            first_seq: None,
            last_seq: None,
            lines: 0,
        };
        loop {
            buf.clear();
            let n = read_line(&mut reader, &mut buf, MAX_LINE_BYTES).map_err(err)?;
            if n == 0 {
                break;
            }
            file.lines += 1;
            let at = |seq, reason: String| Broken {
                path: path.clone(),
                line: file.lines,
                seq,
                reason,
            };
            if n > MAX_LINE_BYTES {
                report.broke(at(
                    None,
                    format!(
                        "not an audit record: a line of {n} bytes, longer than any record ({MAX_LINE_BYTES} bytes at most)"
                    ),
                ));
                continue;
            }
            if buf.last() != Some(&b'\n') {
                // A write cut short leaves the start of a record, at the very end of the
                // trail; anything else (NULs, text, a cut elsewhere) is not the trail.
                let expected = last.as_ref().and_then(|l| l.seq.checked_add(1));
                match not_torn(&buf, n, index == last_file, expected) {
                    Some(reason) => report.broke(at(None, reason)),
                    None => {
                        report.torn = Some(Torn {
                            path: path.clone(),
                            line: file.lines,
                            bytes: n,
                        })
                    }
                }
                break;
            }
            buf.pop();
            let (seq, prev_hex) = match parse_line(&buf) {
                Ok(x) => x,
                Err(reason) => {
                    // Not part of the chain: the next record is checked against the last one.
                    report.broke(at(None, format!("not an audit record: {reason}")));
                    continue;
                }
            };
            // Everything wrong with this record, as one break.
            let mut wrong = Vec::new();
            if let Some(named) = named_seq.filter(|n| file.records == 0 && *n != seq) {
                wrong.push(format!(
                    "the file's name says its first record is seq {named}, but it is seq {seq}: \
                     renamed, or records removed from (or added to) its start"
                ));
            }
            if prev_hex == hex(&GENESIS) && seq != 1 {
                wrong.push(format!(
                    "prev is 64 zeros, the start of a trail, but the record is seq {seq}: a \
                     trail begins at seq 1 (records replaced by a trail of another start)"
                ));
            }
            if seq == 1 && prev_hex != hex(&GENESIS) {
                wrong.push(
                    "seq 1, the start of a trail, but prev is not 64 zeros: a trail begins \
                     with them"
                        .to_owned(),
                );
            }
            match &last {
                None => report.anchor = Some(prev_hex.clone()),
                Some(l) => {
                    if l.seq.checked_add(1) != Some(seq) {
                        wrong.push(format!(
                            "seq {seq} does not follow {}: a record is missing, repeated or out of order",
                            l.seq
                        ));
                    }
                    let keyed = !options.keys.is_empty()
                        && !options.unkeyed_through.is_some_and(|n| l.seq < n);
                    match l.values.iter().position(|v| hex(v) == prev_hex) {
                        Some(i) if keyed && i < key_floor => wrong.push(format!(
                            "prev is the HMAC of record {} under key {} given, after links under \
                             key {}: keys are used in the order given, so this link was made under \
                             a key given up (by someone holding it)",
                            l.seq,
                            i + 1,
                            key_floor + 1
                        )),
                        Some(i) => {
                            proved_by = i;
                            if keyed {
                                key_floor = i;
                                report.keyed_links += 1;
                            }
                        }
                        // With the seq already wrong, the link to the record before says
                        // nothing new unless it was kept (records removed, chained again).
                        None if !wrong.is_empty() => {}
                        None => wrong.push(link_mismatch(options, &prev_hex, l.seq, &last_line)),
                    }
                }
            }
            let values = link_values(options, seq, &buf);
            // A keyed record (past any unkeyed start) carries its own mac, the HMAC of its line
            // up to it: the record itself, the last one included, shows a change.
            if !options.keys.is_empty() && !options.unkeyed_through.is_some_and(|n| seq <= n) {
                match super::record::sealed_parts(&buf) {
                    Some((_, mac)) if values.contains(&mac) => {}
                    Some(_) => wrong.push(
                        "its mac is not the HMAC of the record under any key given: the record \
                         was altered"
                            .to_owned(),
                    ),
                    None => wrong.push(
                        "no mac: every record of a keyed trail ends with its own (a record \
                         written by someone without the key, or one from before the trail was \
                         keyed: then give --unkeyed-through)"
                            .to_owned(),
                    ),
                }
            }
            for head in options.heads.iter().filter(|h| h.seq == seq) {
                anchors_read.push(seq);
                // Anchored while the trail was not yet keyed: its SHA-256 then.
                let unkeyed_head =
                    options.unkeyed_through.is_some_and(|n| seq <= n) && sha256(&buf) == head.link;
                if !unkeyed_head && !values.contains(&head.link) {
                    wrong.push(format!(
                        "record {seq} is not the one anchored: the anchor (--head) says its \
                         link value is {}, {}: the record was altered or replaced{}",
                        hex(&head.link),
                        match &values[..] {
                            [one] => format!("it is {}", hex(one)),
                            _ => "it is not that under any key given".to_owned(),
                        },
                        if options.keys.is_empty() {
                            ", or this is a keyed trail (give --key)"
                        } else {
                            ""
                        }
                    ));
                } else if !report.heads_found.contains(&seq) {
                    report.heads_found.push(seq);
                }
            }
            if !wrong.is_empty() {
                report.broke(at(Some(seq), wrong.join("; and ")));
            }
            // The chain carries on from this record, so that each break is reported once.
            last = Some(Last { seq, values });
            std::mem::swap(&mut last_line, &mut buf);
            file.records += 1;
            file.first_seq.get_or_insert(seq);
            file.last_seq = Some(seq);
            report.records += 1;
            report.first_seq.get_or_insert(seq);
            report.last_seq = Some(seq);
        }
        if let (Some(named), 0) = (named_seq, file.records) {
            report.broke(Broken {
                path: path.clone(),
                line: 0,
                seq: None,
                reason: format!(
                    "the file's name says its first record is seq {named}, but it holds none: \
                     emptied (the gateway never rotates an empty file)"
                ),
            });
        }
        report.files.push(file);
    }
    report.head = last.map(|l| hex(&l.values[proved_by.min(l.values.len() - 1)]));
    report.unkeyed_through = options.unkeyed_through.filter(|_| !options.keys.is_empty());
    // An unkeyed start the trail does not go past: nothing keyed covers it.
    if let (Some(through), Some(last)) = (report.unkeyed_through, report.last_seq) {
        if last <= through {
            report.broke(Broken {
                path: given.to_path_buf(),
                line: 0,
                seq: Some(last),
                reason: format!(
                    "the trail ends at seq {last}, not past --unkeyed-through {through}: no \
                     keyed link covers its records (plain SHA-256 links anyone can make again)"
                ),
            });
        }
    }
    for broken in check_end(&report, options, &anchors_read, given) {
        report.broke(broken);
    }
    Ok(report)
}

/// Whether the trail reaches the anchors given for its end (`--head`, `--min-seq`): a trail
/// cut short is still a valid chain, so only an anchor kept outside it tells.
fn check_end(
    report: &Report,
    options: &Options,
    anchors_read: &[u64],
    given: &Path,
) -> Vec<Broken> {
    let (path, line) = report
        .files
        .iter()
        .rev()
        .find(|f| f.records > 0)
        .or(report.files.last())
        .map_or((given.to_path_buf(), 0), |f| (f.path.clone(), f.lines));
    let ends = report
        .last_seq
        .map_or("the trail holds no record".to_owned(), |s| {
            format!("the trail ends at seq {s}")
        });
    let at_end = |reason: String| Broken {
        path: path.clone(),
        line,
        seq: report.last_seq,
        reason,
    };
    let mut broken = Vec::new();
    let last = report.last_seq.unwrap_or(0);
    let first = report.first_seq.unwrap_or(0);
    let highest_anchor = options.heads.iter().map(|h| h.seq).max();
    if let Some(anchored) = highest_anchor.filter(|s| *s > last) {
        broken.push(at_end(format!(
            "{ends}, before the anchored seq {anchored}: records removed from its end"
        )));
    }
    if let Some(min) = options.min_seq.filter(|m| *m > last) {
        broken.push(at_end(format!(
            "{ends}, before seq {min} (--min-seq): records removed from its end"
        )));
    }
    if let Some(from) = options.first_seq.filter(|f| report.first_seq != Some(*f)) {
        let begins = report
            .first_seq
            .map_or("the trail holds no record".to_owned(), |s| {
                format!("the trail begins at seq {s}")
            });
        broken.push(Broken {
            path: report
                .files
                .first()
                .map_or(given.to_path_buf(), |f| f.path.clone()),
            line: 1,
            seq: report.first_seq,
            reason: format!(
                "{begins}, not at seq {from} (--first-seq): records removed from its start, or \
                 the files before not given"
            ),
        });
    }
    for missing in options
        .heads
        .iter()
        .filter(|h| h.seq <= last && !anchors_read.contains(&h.seq))
    {
        let why = if missing.seq < first {
            format!("it is before the first record given (seq {first}): give the files before")
        } else {
            "the records around it are missing or out of order".to_owned()
        };
        broken.push(at_end(format!(
            "the anchored record {} (--head) is not in the trail: {why}",
            missing.seq
        )));
    }
    broken
}

#[cfg(test)]
mod tests {
    use super::super::key::Link;
    use super::super::record::frame;
    use super::*;

    /// `n` records from `start_seq`, the first linked to `prev`, each ended by `link` as the
    /// writer ends it (sealed with its own mac when keyed); and the last one's link value.
    fn linked(start_seq: u64, prev: [u8; 32], n: usize, link: &Link) -> (Vec<String>, [u8; 32]) {
        let mut lines = Vec::new();
        let mut prev = prev;
        for i in 0..n {
            let mut line = frame(
                start_seq + i as u64,
                &prev,
                &format!("{{\"kind\":\"rejection\",\"n\":{i}}}"),
            )
            .into_bytes();
            prev = link.seal(&mut line, 0);
            lines.push(String::from_utf8(line).expect("utf-8"));
        }
        (lines, prev)
    }

    /// A chain linked by SHA-256.
    fn chain(start_seq: u64, prev: [u8; 32], n: usize) -> (Vec<String>, [u8; 32]) {
        linked(start_seq, prev, n, &Link::Sha256)
    }

    /// The first break `audit verify` finds in `files`, and the whole report (for messages).
    fn first_break(files: &[PathBuf], options: &Options) -> (Broken, Report) {
        let r = verify_files(files, options).expect("read");
        let b = r
            .breaks
            .first()
            .cloned()
            .unwrap_or_else(|| panic!("intact: {r}"));
        (b, r)
    }

    fn write(dir: &Path, name: &str, lines: &[String], tail: &str) -> PathBuf {
        let p = dir.join(name);
        let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        text.push_str(tail);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn scratch() -> crate::tempdir::TempDir {
        crate::tempdir::TempDir::new("verify")
    }

    #[test]
    fn an_intact_chain_across_files_in_any_order_verifies() {
        let d = scratch();
        let (a, h) = chain(1, GENESIS, 3);
        let (b, _) = chain(4, h, 2);
        let fa = write(&d, "audit-a.jsonl", &a, "");
        let fb = write(&d, "audit.jsonl", &b, "");
        let r = verify_files(&[fb, fa], &Options::default()).expect("read");
        assert!(r.intact(), "{r}");
        assert_eq!((r.records, r.first_seq, r.last_seq), (5, Some(1), Some(5)));
        assert!(r.to_string().contains("from the start of the trail"), "{r}");
    }

    #[test]
    fn an_altered_record_breaks_the_chain_at_the_next_one() {
        let d = scratch();
        let (mut a, _) = chain(1, GENESIS, 4);
        a[1] = a[1].replace("\"n\":1", "\"n\":9");
        let f = write(&d, "audit.jsonl", &a, "");
        let (b, _) = first_break(std::slice::from_ref(&f), &Options::default());
        assert_eq!((b.line, b.seq), (3, Some(3)));
        assert!(b.reason.contains("altered"), "{}", b.reason);
    }

    #[test]
    fn a_removed_record_is_named() {
        let d = scratch();
        let (mut a, _) = chain(1, GENESIS, 4);
        a.remove(2);
        let f = write(&d, "audit.jsonl", &a, "");
        let (b, _) = first_break(&[f], &Options::default());
        assert_eq!((b.line, b.seq), (3, Some(4)));
        assert!(b.reason.contains("missing"), "{}", b.reason);
    }

    #[test]
    fn a_torn_line_at_the_end_of_the_trail_is_reported_and_tolerated() {
        let d = scratch();
        let (a, h) = chain(1, GENESIS, 2);
        let (b, _) = chain(3, h, 1);
        let fa = write(&d, "audit-1.jsonl", &a, "");
        let fb = write(&d, "audit.jsonl", &b, "{\"seq\":4,\"prev\":\"ab");
        let r = verify_files(&[fb.clone(), fa], &Options::default()).expect("read");
        assert!(r.intact(), "{r}");
        assert_eq!(r.records, 3);
        let torn = r.torn.clone().expect("torn");
        assert_eq!((torn.path, torn.line, torn.bytes), (fb, 2, 19));
        assert!(r.to_string().starts_with("torn: "), "{r}");
    }

    /// The gateway never leaves a line cut short at the end of a file it rotated: there it is
    /// a break, as is one cut short before the very end of the trail.
    #[test]
    fn a_torn_line_before_the_last_file_is_broken() {
        let d = scratch();
        let (a, h) = chain(1, GENESIS, 2);
        let (b, _) = chain(3, h, 1);
        let fa = write(&d, "audit-1.jsonl", &a, "{\"seq\":3,\"prev\":\"ab");
        let fb = write(&d, "audit.jsonl", &b, "");
        let (b, r) = first_break(&[fa.clone(), fb], &Options::default());
        assert_eq!((b.path, b.line), (fa, 3));
        assert!(
            b.reason.contains("not the last of the trail"),
            "{}",
            b.reason
        );
        assert!(r.torn.is_none());
    }

    /// Tolerated: the start of a record (`{"seq":` or a part of it, as short as its first byte,
    /// then the next seq once it is complete), shorter than 1 MiB: a power cut can leave any of
    /// them. Anything else without a newline (NULs, text, another key, the wrong seq, a
    /// megabyte) is not the trail.
    #[test]
    fn an_unterminated_line_that_is_no_record_start_is_broken() {
        let d = scratch();
        let (a, h) = chain(1, GENESIS, 2);
        let (c, _) = chain(3, h, 1);
        let fa = write(&d, "audit-1.jsonl", &a, "");
        let fc = write(&d, "audit.jsonl", &c, "");
        let mut long = b"{\"seq\":4,\"prev\":\"".to_vec();
        long.resize(MAX_TORN_BYTES, b'a');
        for (name, junk, reason) in [
            ("nul", vec![0u8; 100], "not the start of the next one"),
            (
                "text",
                b"aaaaaaaa".to_vec(),
                "not the start of the next one",
            ),
            ("key", b"{\"sex".to_vec(), "not the start of the next one"),
            ("space", b"{ ".to_vec(), "not the start of the next one"),
            (
                "late",
                b"{\"seq\"x".to_vec(),
                "not the start of the next one",
            ),
            (
                "string",
                b"{\"seq\":\"x".to_vec(),
                "not the start of the next one",
            ),
            (
                "wrong",
                b"{\"seq\":51,\"prev\":\"ab".to_vec(),
                "not the start of the next one",
            ),
            (
                "long",
                long.clone(),
                "longer than a record cut short can be",
            ),
        ] {
            let mut text: String = c.iter().map(|l| format!("{l}\n")).collect();
            text.push_str(&String::from_utf8_lossy(&junk));
            std::fs::write(&fc, text).expect("write");
            let r = verify_files(&[fa.clone(), fc.clone()], &Options::default()).expect("read");
            let b = r.breaks.first().cloned().expect(name);
            assert_eq!((b.path.clone(), b.line), (fc.clone(), 2), "{name}");
            assert!(b.reason.contains(reason), "{name}: {}", b.reason);
        }
        long.truncate(MAX_TORN_BYTES - 1);
        for torn in [
            b"{".to_vec(),
            b"{\"se".to_vec(),
            b"{\"seq\"".to_vec(),
            b"{\"seq\":".to_vec(),
            b"{\"seq\":4".to_vec(),
            b"{\"seq\":4,\"pr".to_vec(),
            long,
        ] {
            let mut text: String = c.iter().map(|l| format!("{l}\n")).collect();
            text.push_str(&String::from_utf8_lossy(&torn));
            std::fs::write(&fc, text).expect("write");
            let r = verify_files(&[fa.clone(), fc.clone()], &Options::default()).expect("read");
            assert!(r.intact(), "{}: {r}", torn.len());
            assert_eq!(r.torn.map(|t| t.bytes), Some(torn.len()));
        }
    }

    /// A line longer than the bound is read to its end without being held whole.
    #[test]
    fn an_over_long_line_is_skipped_to_its_end() {
        let mut reader = io::BufReader::with_capacity(8, &b"0123456789abcdef\nnext\n"[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut reader, &mut buf, 10).expect("read"), 17);
        assert_eq!(buf, b"0123456789");
        buf.clear();
        assert_eq!(read_line(&mut reader, &mut buf, 10).expect("read"), 5);
        assert_eq!(buf, b"next\n");
        buf.clear();
        assert_eq!(read_line(&mut reader, &mut buf, 10).expect("read"), 0);
    }

    /// A chain linked by HMAC under `key`, each record sealed (as the writer links it with
    /// `[audit] key_file`).
    fn keyed_chain(
        start_seq: u64,
        prev: [u8; 32],
        n: usize,
        key: &ChainKey,
    ) -> (Vec<String>, [u8; 32]) {
        linked(start_seq, prev, n, &Link::Hmac(key.clone()))
    }

    /// `line` ended with its own mac under `key`, as the writer seals a keyed record; and that
    /// mac, the next record's `prev`.
    fn seal(line: String, key: &ChainKey) -> (String, [u8; 32]) {
        let mut bytes = line.into_bytes();
        let mac = Link::Hmac(key.clone()).seal(&mut bytes, 0);
        (String::from_utf8(bytes).expect("utf-8"), mac)
    }

    fn keys(keys: &[&ChainKey]) -> Options {
        Options {
            keys: keys.iter().map(|k| (*k).clone()).collect(),
            ..Options::default()
        }
    }

    #[test]
    fn a_keyed_chain_verifies_with_its_key_only() {
        let d = scratch();
        let key = ChainKey::from_bytes(&[3u8; 32]).expect("key");
        let other = ChainKey::from_bytes(&[4u8; 32]).expect("key");
        let (a, head) = keyed_chain(1, GENESIS, 4, &key);
        let f = write(&d, "audit.jsonl", &a, "");
        let r = verify_files(std::slice::from_ref(&f), &keys(&[&key])).expect("read");
        assert!(r.intact(), "{r}");
        assert_eq!(r.head, Some(hex(&head)));
        assert!(r.to_string().contains("head hmac-sha256"), "{r}");
        // Without the key: the links are not SHA-256, and the message says what that means.
        let (b, _) = first_break(std::slice::from_ref(&f), &Options::default());
        assert_eq!((b.line, b.seq), (2, Some(2)));
        assert!(b.reason.contains("give --key"), "{}", b.reason);
        // Under another key: no record's mac, no link, is the HMAC under any key given.
        let (b, r) = first_break(std::slice::from_ref(&f), &keys(&[&other]));
        assert_eq!((b.line, b.seq), (1, Some(1)), "{r}");
        assert!(b.reason.contains("its mac is not the HMAC"), "{}", b.reason);
        assert!(
            r.to_string()
                .contains("not the HMAC of record 1 under any key given"),
            "{r}"
        );
        // Either of several keys.
        assert!(verify_files(&[f], &keys(&[&other, &key]))
            .expect("read")
            .intact());
    }

    /// `lines` linked again from the first: each line's body kept (record `edit`'s `n` set to
    /// 99), its `prev` the plain SHA-256 of the line before for the records before `keyed_from`
    /// (1-based seq) and the HMAC under `key` from it on, as whoever writes the files could, or
    /// as a trail begun before its key was set is.
    fn relinked(
        lines: &[String],
        edit: Option<usize>,
        keyed_from: u64,
        key: &ChainKey,
    ) -> Vec<String> {
        let mut prev = GENESIS;
        let mut out = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            let mut body = v.as_object().expect("object").clone();
            body.remove("seq");
            body.remove("prev");
            body.remove("mac");
            if Some(i + 1) == edit {
                body.insert("n".into(), 99.into());
            }
            let body = serde_json::to_string(&body).expect("json");
            let seq = i as u64 + 1;
            let mut line = frame(seq, &prev, &body);
            // Keyed records (from `keyed_from` on) are sealed with their own mac.
            if seq >= keyed_from {
                line = seal(line, key).0;
            }
            prev = if seq + 1 >= keyed_from {
                key.link_of(line.as_bytes())
            } else {
                sha256(line.as_bytes())
            };
            out.push(line);
        }
        out
    }

    /// Whoever can write the files but not read the key edits a record and links every later
    /// record again with plain SHA-256: that passes a check without --key, never one with it;
    /// nor does linking again with SHA-256 only from the edit on (a keyed trail never goes back
    /// to SHA-256).
    #[test]
    fn a_trail_rewritten_and_chained_again_without_the_key_fails_with_it() {
        let d = scratch();
        let key = ChainKey::from_bytes(&[5u8; 32]).expect("key");
        let (a, _) = keyed_chain(1, GENESIS, 5, &key);
        // All of it, from the genesis: every link is a break.
        let forged = relinked(&a, Some(3), u64::MAX, &key);
        let f = write(&d, "audit.jsonl", &forged, "");
        assert!(verify_files(std::slice::from_ref(&f), &Options::default())
            .expect("read")
            .intact());
        let r = verify_files(std::slice::from_ref(&f), &keys(&[&key])).expect("read");
        assert_eq!(r.break_count(), 5, "{r}");
        let b = r.breaks[0].clone();
        assert_eq!((b.line, b.seq), (1, Some(1)));
        assert!(b.reason.contains("no mac"), "{}", b.reason);
        assert!(
            r.breaks[1]
                .reason
                .contains("plain SHA-256 of record 1, not its HMAC under a key given"),
            "{r}"
        );
        // From the edit on: records 1 to 3 as written (3 edited, its keyed prev kept), 4 and 5
        // linked with SHA-256.
        let mut forged = a[..2].to_vec();
        forged.push(a[2].replace("\"n\":2", "\"n\":99"));
        assert_ne!(forged[2], a[2]);
        let mut prev = sha256(forged[2].as_bytes());
        for (i, line) in a.iter().enumerate().skip(3) {
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            let mut body = v.as_object().expect("object").clone();
            body.remove("seq");
            body.remove("prev");
            let line = frame(
                i as u64 + 1,
                &prev,
                &serde_json::to_string(&body).expect("json"),
            );
            prev = sha256(line.as_bytes());
            forged.push(line);
        }
        let f = write(&d, "audit.jsonl", &forged, "");
        let r = verify_files(&[f], &keys(&[&key])).expect("read");
        // The edited record shows it itself (its mac), and the SHA-256 link after it.
        let b = r.breaks.first().cloned().expect("broken");
        assert_eq!((b.line, b.seq), (3, Some(3)), "{r}");
        assert!(b.reason.contains("its mac is not the HMAC"), "{}", b.reason);
        assert!(
            r.breaks[1]
                .reason
                .contains("plain SHA-256 of record 3, not its HMAC"),
            "{r}"
        );
        // The last record edited, its prev kept (nothing links to it): its own mac shows it.
        // Before the records were sealed, only an anchor kept elsewhere could.
        let mut forged = a.clone();
        forged[4] = forged[4].replace("\"n\":4", "\"n\":44");
        assert_ne!(forged[4], a[4]);
        let f = write(&d, "audit.jsonl", &forged, "");
        let r = verify_files(&[f], &keys(&[&key])).expect("read");
        assert_eq!(r.break_count(), 1, "{r}");
        assert_eq!((r.breaks[0].line, r.breaks[0].seq), (5, Some(5)), "{r}");
        assert!(
            r.breaks[0].reason.contains("its mac is not the HMAC"),
            "{r}"
        );
    }

    /// A trail begun before `[audit] key_file` was set: its first links are plain SHA-256, the
    /// rest keyed. It verifies with the key and the seq the gateway logged as the last unkeyed
    /// one (never inferred: a rewrite looks the same), saying so; the first keyed link covers
    /// the records before it, so an edit among them breaks it.
    #[test]
    fn a_trail_keyed_after_it_began_verifies_and_its_unkeyed_start_is_covered() {
        let d = scratch();
        let key = ChainKey::from_bytes(&[8u8; 32]).expect("key");
        let (a, _) = keyed_chain(1, GENESIS, 6, &key);
        // Records 2 to 4 link with SHA-256, 5 and 6 with the HMAC.
        let lines = relinked(&a, None, 5, &key);
        let f = write(&d, "audit.jsonl", &lines, "");
        let (b, _) = first_break(std::slice::from_ref(&f), &keys(&[&key]));
        assert!(b.reason.contains("--unkeyed-through"), "{}", b.reason);
        let unkeyed = |through| Options {
            unkeyed_through: Some(through),
            ..keys(&[&key])
        };
        let r = verify_files(std::slice::from_ref(&f), &unkeyed(4)).expect("read");
        assert!(r.intact(), "{r}");
        assert_eq!((r.unkeyed_through, r.keyed_links), (Some(4), 2));
        assert!(
            r.to_string()
                .contains("links up to record 4 are plain SHA-256"),
            "{r}"
        );
        // A seq too early or too late: broken.
        for through in [3, 5] {
            assert!(!verify_files(std::slice::from_ref(&f), &unkeyed(through))
                .expect("read")
                .intact());
        }
        // Record 2 edited and linked again with SHA-256 up to 4: the keyed link of 5 breaks.
        let mut forged = relinked(&a, Some(2), u64::MAX, &key)[..4].to_vec();
        forged.extend(lines[4..].iter().cloned());
        let f = write(&d, "audit.jsonl", &forged, "");
        let (b, r) = first_break(&[f], &unkeyed(4));
        assert_eq!((b.line, b.seq), (5, Some(5)), "{r}");
        assert!(
            b.reason
                .contains("not the HMAC of record 4 under any key given"),
            "{}",
            b.reason
        );
    }

    /// A trail replaced by one record that claims the start of a trail at another seq is a
    /// break, and with keys a trail whose links were none checked under one says so.
    #[test]
    fn a_start_of_trail_at_another_seq_is_broken() {
        let d = scratch();
        let key = ChainKey::from_bytes(&[9u8; 32]).expect("key");
        let (one, _) = keyed_chain(41, GENESIS, 1, &key);
        let f = write(&d, "audit.jsonl", &one, "");
        let (b, r) = first_break(std::slice::from_ref(&f), &keys(&[&key]));
        assert_eq!((b.line, b.seq), (1, Some(41)), "{r}");
        assert!(b.reason.contains("a trail begins at seq 1"), "{}", b.reason);
        let (one, _) = keyed_chain(1, GENESIS, 1, &key);
        let f = write(&d, "audit.jsonl", &one, "");
        let r = verify_files(&[f], &keys(&[&key])).expect("read");
        assert!(r.intact(), "{r}");
        assert!(
            r.to_string().contains("no link was checked under a key"),
            "{r}"
        );
    }

    /// `--first-seq`: a trail whose first files were removed (or not given) is a break; one
    /// that begins there is not.
    #[test]
    fn a_trail_must_begin_at_the_first_seq_given() {
        let d = scratch();
        let (a, h) = chain(1, GENESIS, 2);
        let (b, _) = chain(3, h, 2);
        let fa = write(&d, "audit-1.jsonl", &a, "");
        let fb = write(&d, "audit.jsonl", &b, "");
        let from = |n| Options {
            first_seq: Some(n),
            ..Options::default()
        };
        assert!(verify_files(&[fa.clone(), fb.clone()], &from(1))
            .expect("read")
            .intact());
        let r = verify_files(std::slice::from_ref(&fb), &from(1)).expect("read");
        assert_eq!(r.break_count(), 1, "{r}");
        assert!(
            r.breaks[0]
                .reason
                .contains("the trail begins at seq 3, not at seq 1 (--first-seq)"),
            "{r}"
        );
        assert!(verify_files(&[fb], &from(3)).expect("read").intact());
    }

    /// Seq 1 with a prev other than 64 zeros is no start of a trail; and an unkeyed start the
    /// trail does not go past leaves nothing keyed to cover it: both are breaks.
    #[test]
    fn a_start_without_zeros_and_an_unkeyed_start_not_passed_are_broken() {
        let d = scratch();
        let (a, _) = chain(1, [7u8; 32], 2);
        let f = write(&d, "audit.jsonl", &a, "");
        let (b, r) = first_break(&[f], &Options::default());
        assert_eq!((b.line, b.seq), (1, Some(1)), "{r}");
        assert!(b.reason.contains("prev is not 64 zeros"), "{}", b.reason);
        let key = ChainKey::from_bytes(&[12u8; 32]).expect("key");
        let (a, _) = chain(1, GENESIS, 3);
        let f = write(&d, "audit.jsonl", &a, "");
        for (through, intact) in [(3, false), (9, false), (2, false)] {
            let r = verify_files(
                std::slice::from_ref(&f),
                &Options {
                    unkeyed_through: Some(through),
                    ..keys(&[&key])
                },
            )
            .expect("read");
            assert_eq!(r.intact(), intact, "{through}: {r}");
        }
        let r = verify_files(
            &[f],
            &Options {
                unkeyed_through: Some(3),
                ..keys(&[&key])
            },
        )
        .expect("read");
        assert!(
            r.breaks
                .iter()
                .any(|b| b.reason.contains("not past --unkeyed-through 3")),
            "{r}"
        );
    }

    /// Keys are used in the order given: a link under the old key after links under the new
    /// one was made under a key given up (as after a leak), and is a break.
    #[test]
    fn an_old_key_after_a_new_one_is_broken() {
        let d = scratch();
        let old = ChainKey::from_bytes(&[10u8; 32]).expect("key");
        let new = ChainKey::from_bytes(&[11u8; 32]).expect("key");
        let (a, _) = keyed_chain(1, GENESIS, 3, &old);
        let (b, _) = keyed_chain(4, new.link_of(a[2].as_bytes()), 2, &new);
        let (c, _) = keyed_chain(6, old.link_of(b[1].as_bytes()), 2, &old);
        let lines: Vec<String> = a.into_iter().chain(b).chain(c).collect();
        let f = write(&d, "audit.jsonl", &lines, "");
        let (b, r) = first_break(std::slice::from_ref(&f), &keys(&[&old, &new]));
        assert_eq!((b.line, b.seq), (6, Some(6)), "{r}");
        assert!(b.reason.contains("a key given up"), "{}", b.reason);
        // Each link under the old key after the new one (records 6 and 7).
        assert_eq!(r.break_count(), 2, "{r}");
    }

    /// A key changed at a restart: links before it under the old key, after it under the new.
    #[test]
    fn a_key_change_verifies_with_both_keys() {
        let d = scratch();
        let old = ChainKey::from_bytes(&[6u8; 32]).expect("key");
        let new = ChainKey::from_bytes(&[7u8; 40]).expect("key");
        let (a, _) = keyed_chain(1, GENESIS, 3, &old);
        // The writer restarted with the new key links the old last line under it.
        let (b, head) = keyed_chain(4, new.link_of(a[2].as_bytes()), 2, &new);
        let fa = write(&d, "audit-1.jsonl", &a, "");
        let fb = write(&d, "audit.jsonl", &b, "");
        let both = [fa, fb];
        let r = verify_files(&both, &keys(&[&old, &new])).expect("read");
        assert!(r.intact(), "{r}");
        assert_eq!(
            r.head,
            Some(hex(&head)),
            "the head under the key of the last link"
        );
        for one in [&old, &new] {
            assert!(!verify_files(&both, &keys(&[one])).expect("read").intact());
        }
    }

    #[test]
    fn the_end_is_checked_against_the_anchors_given() {
        let d = scratch();
        let (a, _) = chain(1, GENESIS, 5);
        let link = |i: usize| sha256(a[i].as_bytes());
        let f = write(&d, "audit.jsonl", &a, "");
        let check = |heads: Vec<Head>, min_seq: Option<u64>, files: &[PathBuf]| {
            let options = Options {
                heads,
                min_seq,
                ..Options::default()
            };
            verify_files(files, &options).expect("read")
        };
        let at = |seq: u64, link: [u8; 32]| Head { seq, link };
        let all = std::slice::from_ref(&f);
        let r = check(vec![at(3, link(2)), at(5, link(4))], Some(5), all);
        assert!(r.intact(), "{r}");
        assert_eq!(r.heads_found, [3, 5]);
        assert!(r.to_string().contains("anchor: record 3 is there"), "{r}");

        let b = check(vec![at(3, link(3))], None, all)
            .breaks
            .first()
            .cloned()
            .expect("altered");
        assert_eq!((b.line, b.seq), (3, Some(3)));
        assert!(
            b.reason.contains("record 3 is not the one anchored"),
            "{}",
            b.reason
        );

        // The last two records cut off: a valid chain, short of the anchors.
        let cut = write(&d, "cut.jsonl", &a[..3], "");
        let cut = std::slice::from_ref(&cut);
        assert!(check(vec![], None, cut).intact());
        let b = check(vec![at(5, link(4))], None, cut)
            .breaks
            .first()
            .cloned()
            .expect("cut");
        assert_eq!(
            (b.path.clone(), b.line, b.seq),
            (cut[0].clone(), 3, Some(3))
        );
        assert_eq!(
            b.reason,
            "the trail ends at seq 3, before the anchored seq 5: records removed from its end"
        );
        let b = check(vec![], Some(4), cut)
            .breaks
            .first()
            .cloned()
            .expect("cut");
        assert!(
            b.reason
                .contains("the trail ends at seq 3, before seq 4 (--min-seq)"),
            "{}",
            b.reason
        );
        // An anchor before the first file given cannot be checked.
        let (later, _) = chain(6, link(4), 2);
        let later = write(&d, "later.jsonl", &later, "");
        let b = check(vec![at(5, link(4))], None, &[later])
            .breaks
            .first()
            .cloned()
            .expect("before");
        assert!(
            b.reason.contains("before the first record given (seq 6)"),
            "{}",
            b.reason
        );
    }

    #[test]
    fn a_head_is_seq_colon_64_hex_digits() {
        let head: Head = format!("42:{}", "ab".repeat(32)).parse().expect("head");
        assert_eq!((head.seq, head.link), (42, [0xab; 32]));
        for bad in [
            "42",
            "x:ab",
            "42:abc",
            &format!("42:{}", "zz".repeat(32)),
            "",
        ] {
            let e = bad.parse::<Head>().expect_err(bad);
            assert!(e.contains("is not SEQ:HEX"), "{e}");
        }
    }

    /// Every break is named (file, line, seq, what), not only the first; the chain carries on
    /// from each, so none is reported twice.
    #[test]
    fn every_break_is_reported() {
        let d = scratch();
        let (mut a, h) = chain(1, GENESIS, 6);
        let (mut b, _) = chain(7, h, 6);
        a[2] = a[2].replace("\"n\":2", "\"n\":9"); // record 3 altered: 4's link breaks
        a.remove(4); // record 5 removed: 6 does not follow 4
        b.insert(2, "not json".into()); // after record 8
        b[4] = b[4].replace("\"seq\":10", "\"seq\":11"); // 10 renumbered: 11 twice
        let fa = write(&d, "audit-a.jsonl", &a, "");
        let fb = write(&d, "audit.jsonl", &b, "");
        let r = verify_files(&[fb.clone(), fa.clone()], &Options::default()).expect("read");
        let found: Vec<(PathBuf, u64, Option<u64>)> = r
            .breaks
            .iter()
            .map(|b| (b.path.clone(), b.line, b.seq))
            .collect();
        assert_eq!(
            found,
            [
                (fa.clone(), 4, Some(4)),
                (fa.clone(), 5, Some(6)),
                (fb.clone(), 3, None),
                (fb.clone(), 5, Some(11)),
                (fb.clone(), 6, Some(11)),
            ],
            "{r}"
        );
        assert!(
            r.breaks[0].reason.contains("not the SHA-256 of record 3"),
            "{r}"
        );
        assert!(
            r.breaks[1].reason.contains("seq 6 does not follow 4"),
            "{r}"
        );
        assert!(r.breaks[2].reason.contains("not an audit record"), "{r}");
        assert!(
            r.breaks[3].reason.contains("seq 11 does not follow 9"),
            "{r}"
        );
        assert!(
            r.breaks[4].reason.contains("seq 11 does not follow 11"),
            "{r}"
        );
        assert_eq!(r.records, 11);
        let text = r.to_string();
        assert_eq!(text.matches("BROKEN: ").count(), 6, "{text}");
        assert!(
            text.ends_with("BROKEN: 5 break(s) in 11 records, seq 1..=12, 2 file(s)"),
            "{text}"
        );
    }

    /// Past 100 breaks the rest are counted, not listed (nor held).
    #[test]
    fn past_a_hundred_breaks_the_rest_are_counted() {
        let d = scratch();
        // Every second record altered: the link of each record after one breaks (149).
        let (a, _) = chain(1, GENESIS, 300);
        let a: Vec<String> = a
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i % 2 == 1 {
                    l.replacen("\"kind\"", "\"kind2\"", 1)
                } else {
                    l.clone()
                }
            })
            .collect();
        let f = write(&d, "audit.jsonl", &a, "");
        let r = verify_files(&[f], &Options::default()).expect("read");
        assert_eq!(r.breaks.len(), MAX_BREAKS_LISTED);
        assert_eq!((r.break_count(), r.more_breaks), (149, 49));
        let text = r.to_string();
        assert_eq!(text.lines().count(), MAX_BREAKS_LISTED + 2, "{text}");
        assert!(
            text.contains("BROKEN: … and 49 more break(s), not listed"),
            "{text}"
        );
        assert!(text.ends_with("BROKEN: 149 break(s) in 300 records, seq 1..=300, 1 file(s)"));
    }

    const ROTATED_1: &str = "audit-20260101T000000.000000Z-000000000001.jsonl";
    const ROTATED_4: &str = "audit-20260101T000001.000000Z-000000000004.jsonl";

    #[test]
    fn a_rotated_name_says_its_first_seq() {
        assert_eq!(super::super::writer::rotated_seq(ROTATED_4), Some(4));
        for not in [
            "audit.jsonl",
            "audit-1.jsonl",
            "audit-a.jsonl",
            "audit-20260101T000000.000000Z-.jsonl",
            "audit-20260101T000000.000000Z-x1.jsonl",
            "audit-tail-20260101T000000.000000Z.partial",
        ] {
            assert_eq!(super::super::writer::rotated_seq(not), None, "{not}");
        }
    }

    /// A rotated file must start at the seq its name says: a file renamed, or cut at its
    /// start, is a break even when the chain through it holds.
    #[test]
    fn a_rotated_file_whose_first_record_is_not_its_name_is_broken() {
        let d = scratch();
        let (a, h) = chain(1, GENESIS, 3);
        let (b, _) = chain(4, h, 2);
        let fa = write(&d, ROTATED_1, &a, "");
        let fb = write(&d, "audit.jsonl", &b, "");
        assert!(verify_files(&[fa.clone(), fb.clone()], &Options::default())
            .expect("read")
            .intact());
        // The first file's first record removed: its name says 1, it starts at 2.
        write(&d, ROTATED_1, &a[1..], "");
        let r = verify_files(&[fa.clone(), fb.clone()], &Options::default()).expect("read");
        let b0 = r.breaks.first().cloned().expect("broken");
        assert_eq!((b0.path, b0.line, b0.seq), (fa.clone(), 1, Some(2)), "{r}");
        assert!(
            b0.reason
                .contains("the file's name says its first record is seq 1, but it is seq 2"),
            "{r}"
        );
        // Renamed to another rotated name; emptied.
        let renamed = d.join(ROTATED_4);
        std::fs::rename(&fa, &renamed).expect("rename");
        write(&d, ROTATED_1, &[], "");
        let r = verify_files(&[fa.clone(), renamed.clone()], &Options::default()).expect("read");
        let reasons: Vec<&str> = r.breaks.iter().map(|b| b.reason.as_str()).collect();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("says its first record is seq 4, but it is seq 2")),
            "{r}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("but it holds none")),
            "{r}"
        );
    }

    /// The same file given twice is read once and named as such, not taken for a gap; what
    /// the gateway set aside is named and not read.
    #[test]
    fn a_file_given_twice_is_read_once_and_what_is_set_aside_is_not_read() {
        let d = scratch();
        let (a, _) = chain(1, GENESIS, 3);
        let f = write(&d, "audit.jsonl", &a, "");
        let again = d.join(".").join("audit.jsonl");
        let tail = d.join("audit-tail-20260101T000000.000000Z.partial");
        std::fs::write(&tail, [0u8; 40]).expect("write");
        let r = verify_files(
            &[f.clone(), tail.clone(), again.clone()],
            &Options::default(),
        )
        .expect("read");
        assert!(r.intact(), "{r}");
        assert_eq!(r.records, 3);
        assert_eq!(r.given_twice, std::slice::from_ref(&again));
        assert_eq!(r.set_aside, std::slice::from_ref(&tail));
        let text = r.to_string();
        assert!(
            text.contains(&format!("note: {} given twice; read once", again.display())),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "set aside: {}: kept aside by the gateway, not part of the chain; not read",
                tail.display()
            )),
            "{text}"
        );
    }

    /// Given the directory, it lists the trail files itself (rotated ones and the active
    /// one; what is set aside named; nothing else read).
    #[test]
    fn a_directory_is_read_as_its_trail() {
        let d = scratch();
        let (a, h) = chain(1, GENESIS, 3);
        let (b, _) = chain(4, h, 2);
        write(&d, ROTATED_1, &a, "");
        write(&d, "audit.jsonl", &b, "{\"seq\":6,");
        std::fs::write(d.join("audit-tail-20260101T000000.000000Z.partial"), b"x").expect("w");
        std::fs::write(d.join(".lock"), b"").expect("write");
        std::fs::write(d.join("notes.txt"), b"not the trail").expect("write");
        let r = verify_files(std::slice::from_ref(&d.0), &Options::default()).expect("read");
        assert!(r.intact(), "{r}");
        assert_eq!((r.records, r.files.len(), r.set_aside.len()), (5, 2, 1));
        assert!(r.torn.is_some());
        assert_eq!(r.read_again, 0);
        // A directory that is not there is unreadable, not an empty trail.
        assert!(verify_files(&[d.join("missing")], &Options::default()).is_err());
        // An empty one holds no record: short of any anchor, named by the directory; with no
        // anchor it is no trail at all (a mistyped path), not an intact one.
        let empty = d.join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        let none = verify_files(std::slice::from_ref(&empty), &Options::default())
            .err()
            .map(|e| e.to_string());
        assert!(
            none.as_deref()
                .is_some_and(|e| e.contains("no audit trail file here")),
            "{none:?}"
        );
        let options = Options {
            min_seq: Some(1),
            ..Options::default()
        };
        let r = verify_files(std::slice::from_ref(&empty), &options).expect("read");
        assert_eq!(
            r.breaks.first().map(|b| b.to_string()),
            Some(format!(
                "BROKEN: {}: the trail holds no record, before seq 1 (--min-seq): records removed from its end",
                empty.display()
            ))
        );
    }

    #[test]
    fn garbage_in_the_middle_is_broken() {
        let d = scratch();
        let (mut a, _) = chain(1, GENESIS, 3);
        a.insert(1, "not json".into());
        let f = write(&d, "audit.jsonl", &a, "");
        let (b, _) = first_break(&[f], &Options::default());
        assert_eq!((b.line, b.seq), (2, None));
    }
}
