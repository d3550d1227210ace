//! What links one audit record to the line before it: the SHA-256 of that line, or, with
//! `[audit] key_file`, its HMAC-SHA256 under a secret key — which someone who can write the
//! audit files but cannot read the key cannot recompute, so cannot rewrite the trail and
//! re-chain it. The key is read raw from its file (at least [`MIN_KEY_BYTES`]) and prepared
//! once; a link then costs one pass over the line, as the SHA-256 does. Never logs or shows
//! the key: only its id, an HMAC of a fixed text under it.

use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use aws_lc_rs::hmac;

use super::record::{hex, sha256};

/// The shortest key accepted: as many bytes as the HMAC-SHA256 output.
pub const MIN_KEY_BYTES: usize = 32;
/// The longest file read as a key (HMAC hashes a key longer than 64 bytes down anyway): a
/// larger file is not a key file.
pub const MAX_KEY_BYTES: usize = 64 * 1024;
/// What a key's id is the HMAC of (not a record: records start with `{"seq":`).
const KEY_ID_TEXT: &[u8] = b"ssp-gateway audit chain key id";

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct KeyError {
    pub path: PathBuf,
    pub reason: String,
}

/// A chain key, prepared for HMAC-SHA256.
#[derive(Clone)]
pub struct ChainKey {
    /// Boxed: the prepared HMAC state is about 0.5 KB.
    key: Box<hmac::Key>,
    /// 16 hex digits naming the key without revealing it (the HMAC of [`KEY_ID_TEXT`]).
    id: String,
}

impl fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself: the id tells two keys apart (a changed key file shows as a
        // changed `[audit]` section, waiting for a restart).
        f.debug_struct("ChainKey").field("id", &self.id).finish()
    }
}

impl ChainKey {
    /// The key in `path`: the file's bytes exactly (a trailing newline is part of the key),
    /// at least [`MIN_KEY_BYTES`] of them.
    pub fn load(path: &Path) -> Result<ChainKey, KeyError> {
        let fail = |reason: String| KeyError {
            path: path.to_path_buf(),
            reason,
        };
        let mut bytes = Vec::new();
        crate::files::open_regular(path)
            .and_then(|f| {
                f.take(MAX_KEY_BYTES as u64 + 1)
                    .read_to_end(&mut bytes)
                    .map(|_| ())
            })
            .map_err(|e| fail(e.to_string()))?;
        let key = ChainKey::from_bytes(&bytes).map_err(fail);
        // The copy read is not kept around.
        zeroize::Zeroize::zeroize(&mut bytes);
        key
    }

    /// The key of `bytes`, or why they are not one.
    pub fn from_bytes(bytes: &[u8]) -> Result<ChainKey, String> {
        if bytes.is_empty() {
            return Err(format!(
                "empty; the key must be at least {MIN_KEY_BYTES} bytes (e.g. `head -c 32 /dev/urandom > FILE`)"
            ));
        }
        if bytes.len() < MIN_KEY_BYTES {
            return Err(format!(
                "{} bytes; the key must be at least {MIN_KEY_BYTES} (e.g. `head -c 32 /dev/urandom > FILE`)",
                bytes.len()
            ));
        }
        if bytes.len() > MAX_KEY_BYTES {
            return Err(format!("more than {MAX_KEY_BYTES} bytes: not a key file"));
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, bytes);
        let id = hex(&hmac::sign(&key, KEY_ID_TEXT).as_ref()[..8]);
        Ok(ChainKey {
            key: Box::new(key),
            id,
        })
    }

    /// The key's id: 16 hex digits, the same for the same key, saying nothing of it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// HMAC-SHA256 of `line` under this key.
    pub fn hmac(&self, line: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(hmac::sign(&self.key, line).as_ref());
        out
    }

    /// The link value of `line` under this key: its `mac` made again (the HMAC of the line up
    /// to it) when it has one, else the HMAC of the whole line.
    pub fn link_of(&self, line: &[u8]) -> [u8; 32] {
        match super::record::sealed_parts(line) {
            Some((signed, _)) => self.hmac(signed),
            None => self.hmac(line),
        }
    }
}

/// How the next record's `prev` is made from the line before it, and, keyed, how a record is
/// sealed (its own `mac`, last in its line).
#[derive(Debug, Clone)]
pub enum Link {
    /// Its SHA-256: anyone can recompute it.
    Sha256,
    /// Its HMAC-SHA256 under the key: a keyed record's `mac` (the HMAC of its line up to the
    /// `mac`), or, for a line with none (written before the trail was keyed), of the line.
    Hmac(ChainKey),
}

impl Link {
    /// The link for `path`'s key, or plain SHA-256 without one.
    pub fn load(key_file: Option<&Path>) -> Result<Link, KeyError> {
        match key_file {
            None => Ok(Link::Sha256),
            Some(path) => ChainKey::load(path).map(Link::Hmac),
        }
    }

    /// The link value of one stored line (without its newline): the next record's `prev`.
    pub fn of(&self, line: &[u8]) -> [u8; 32] {
        match self {
            Link::Sha256 => sha256(line),
            Link::Hmac(key) => key.link_of(line),
        }
    }

    /// Ends the record framed in `out[start..]` (its closing `}` last): keyed, with its own
    /// `mac` (the HMAC of the line so far, which holds `prev`), so that the record, the last
    /// one included, shows any change made without the key. Returns the line's link value: the
    /// `mac`, or the SHA-256 of the line.
    pub fn seal(&self, out: &mut Vec<u8>, start: usize) -> [u8; 32] {
        match self {
            Link::Sha256 => sha256(&out[start..]),
            Link::Hmac(key) => {
                out.pop();
                let mac = key.hmac(&out[start..]);
                out.extend_from_slice(super::record::MAC_FIELD);
                super::record::hex_into(out, &mac);
                out.extend_from_slice(b"\"}");
                mac
            }
        }
    }
}

/// Whether `file` is, or may be, inside the directory `dir`: by its path as written (with `.`
/// and `..` taken out), by the real path of its directory, and by its own real path (the
/// file and its directory may be links). Someone who can write the audit directory could
/// otherwise replace a key kept there with one of their own.
pub fn inside_dir(file: &Path, dir: &Path) -> bool {
    let dirs: Vec<PathBuf> = [Some(normal(dir)), dir.canonicalize().ok()]
        .into_iter()
        .flatten()
        .collect();
    let real_parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .canonicalize()
        .ok()
        .zip(file.file_name())
        .map(|(parent, name)| parent.join(name));
    let files = [Some(normal(file)), real_parent, file.canonicalize().ok()];
    files
        .iter()
        .flatten()
        .any(|f| dirs.iter().any(|d| f.starts_with(d)))
}

/// `path` made absolute (against the working directory) with `.` and `..` taken out by their
/// text alone.
fn normal(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> crate::tempdir::TempDir {
        crate::tempdir::TempDir::new("key")
    }

    /// RFC 4231 test case 2 would need a 4-byte key, below the minimum; case 6's key is 131
    /// bytes of 0xaa (hashed down, as for any key over 64 bytes).
    #[test]
    fn the_link_is_hmac_sha256_under_the_key() {
        let key = ChainKey::from_bytes(&[0xaa; 131]).expect("key");
        assert_eq!(
            hex(&key.hmac(b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        assert_eq!(
            hex(&Link::Sha256.of(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let link = Link::Hmac(key.clone());
        assert_eq!(link.of(b"x"), key.hmac(b"x"));
        // A sealed line: its mac made again, from the line up to it.
        let mut line = b"{\"seq\":1}".to_vec();
        let mac = link.seal(&mut line, 0);
        assert_eq!(mac, key.hmac(b"{\"seq\":1"));
        assert!(line.ends_with(format!(",\"mac\":\"{}\"}}", hex(&mac)).as_bytes()));
        assert_eq!(link.of(&line), mac);
        assert_eq!(
            super::super::record::sealed_parts(&line).map(|p| p.1),
            Some(mac)
        );
        assert_ne!(link.of(b"x"), Link::Sha256.of(b"x"));
    }

    #[test]
    fn a_key_has_an_id_and_never_shows_itself() {
        let a = ChainKey::from_bytes(&[7u8; 32]).expect("key");
        let b = ChainKey::from_bytes(&[8u8; 32]).expect("key");
        assert_eq!(a.id().len(), 16);
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id(), ChainKey::from_bytes(&[7u8; 32]).expect("key").id());
        let shown = format!("{:?}", Link::Hmac(a.clone()));
        assert!(shown.contains(a.id()), "{shown}");
        assert!(!shown.contains("0707"), "{shown}");
    }

    #[test]
    fn key_files_that_are_not_keys_are_refused_with_the_reason() {
        let d = scratch();
        let write = |name: &str, bytes: &[u8]| {
            let p = d.join(name);
            std::fs::write(&p, bytes).expect("write");
            p
        };
        let cases = [
            (write("empty", b""), "empty"),
            (
                write("short", &[1u8; 31]),
                "31 bytes; the key must be at least 32",
            ),
            (
                write("long", &vec![1u8; MAX_KEY_BYTES + 1]),
                "not a key file",
            ),
            (d.join("missing"), "No such file"),
            (d.0.clone(), "a directory"),
        ];
        for (path, reason) in cases {
            let e = ChainKey::load(&path).expect_err(reason);
            assert_eq!(e.path, path);
            assert!(e.to_string().contains(reason), "{e}");
        }
        let ok = write("ok", &[1u8; 32]);
        assert!(ChainKey::load(&ok).is_ok());
        // Read raw: a newline is part of the key.
        let with_newline = write("nl", b"0123456789abcdef0123456789abcdef\n");
        let without = write("no-nl", b"0123456789abcdef0123456789abcdef");
        let (a, b) = (
            ChainKey::load(&with_newline).expect("key"),
            ChainKey::load(&without).expect("key"),
        );
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn a_key_inside_the_audit_directory_is_found_however_it_is_named() {
        let d = scratch();
        let audit = d.join("audit");
        std::fs::create_dir_all(audit.join("sub")).expect("mkdir");
        std::fs::create_dir_all(d.join("keys")).expect("mkdir");
        std::os::unix::fs::symlink(&audit, d.join("link-to-audit")).expect("symlink");
        std::fs::write(audit.join("k"), [1u8; 32]).expect("write");
        std::os::unix::fs::symlink(audit.join("k"), d.join("keys/link-to-k")).expect("symlink");
        for inside in [
            audit.join("k"),
            audit.join("sub/../k"),
            d.join("keys/../audit/new"),
            d.join("link-to-audit/k"),
            d.join("keys/link-to-k"),
        ] {
            assert!(inside_dir(&inside, &audit), "{}", inside.display());
        }
        for outside in [d.join("keys/k"), d.join("audit-key"), d.join("k")] {
            assert!(!inside_dir(&outside, &audit), "{}", outside.display());
        }
        // Not there yet: by the path as written.
        assert!(inside_dir(&d.join("later/k"), &d.join("later")));
    }
}
