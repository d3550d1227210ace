//! Reading the files an operator names (configuration, certificates, keys, CRLs, the LDIF
//! directory, the interaction catalogue, audit files): regular files only.
//!
//! A FIFO at one of those paths used to block the reader for ever: `check-config` and
//! `audit verify` hung, and a FIFO put in place of the live LDIF hung the directory's reloader
//! (no reload happened again, and shutdown waited for it). The file is opened without
//! blocking and its type checked on the open descriptor, so there is no window between the
//! check and the read.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens `path` for reading if it is a regular file (or a link to one).
pub fn open_regular(path: &Path) -> io::Result<File> {
    // O_NONBLOCK: opening a FIFO with no writer would otherwise wait for one. It does not
    // change how a regular file reads.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        Ok(file)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            if kind.is_dir() {
                "a directory, not a file"
            } else {
                "not a regular file (a FIFO, socket or device)"
            },
        ))
    }
}

/// The whole of a regular file.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_regular(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The whole of a regular file, as UTF-8.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    open_regular(path)?.read_to_string(&mut text)?;
    Ok(text)
}

/// The process's open-files limit (`RLIMIT_NOFILE`): `(soft, hard)`, `u64::MAX` for unlimited.
pub fn open_files_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let value = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            v
        }
    };
    Ok((value(limit.rlim_cur), value(limit.rlim_max)))
}

/// Raises the open-files soft limit to the hard limit (what a server is allowed without
/// privilege; many distributions start services at a soft limit of 1,024), and returns the
/// limit in force after it. An unlimited hard limit (not allowed for open files on Linux;
/// refused by `setrlimit` elsewhere) leaves the soft limit as it is.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let (soft, hard) = open_files_limit()?;
    if soft >= hard || hard == u64::MAX {
        return Ok(soft);
    }
    let limit = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given, nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(hard)
}

/// A warning when `limit` (open files) is below `listener.max_connections`: the connection
/// limit could never be what refuses connections, since accepting fails with "Too many open
/// files" first (the admin listener's too). Only that certain shortfall is warned of: provider
/// connections, the audit trail and the rest need descriptors on top, as the text says.
pub fn open_files_warning(config: &crate::config::Config, limit: u64) -> Option<String> {
    let connections = config.listener.limits.max_connections as u64;
    (limit < connections).then(|| {
        format!(
            "the open-files limit is {limit}, below listener.max_connections ({connections}): \
             new connections (and the admin listener's) would fail with \"Too many open files\" \
             before the connection limit refuses them; raise the limit (LimitNOFILE=, ulimit -n) \
             above max_connections with room for provider connections and files, or lower \
             max_connections"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> crate::tempdir::TempDir {
        crate::tempdir::TempDir::new("files")
    }

    #[test]
    fn a_fifo_or_directory_is_refused_at_once_and_a_file_is_read() {
        let dir = scratch();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        // Opened without blocking, a FIFO with no writer reads as empty: without the type
        // check this would be an empty file, not an error.
        let err = read(&fifo).expect_err("a FIFO");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains("FIFO"), "{err}");
        let err = read_to_string(&dir).expect_err("a directory");
        assert!(err.to_string().contains("directory"), "{err}");
        let file = dir.join("f.txt");
        std::fs::write(&file, "text").expect("write");
        assert_eq!(read_to_string(&file).expect("read"), "text");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        assert_eq!(read(&link).expect("read"), b"text");
        assert_eq!(
            read(&dir.join("missing")).expect_err("missing").kind(),
            io::ErrorKind::NotFound
        );
    }
}
