//! Reloading the LDIF directory while the gateway runs: when the file changes (polled by
//! modification time and size, and loaded once it has stayed unchanged for one poll interval, so
//! a file still being written is not loaded half-way) and on SIGHUP (at once). Owns the watcher task only: the parsing and the
//! atomic swap are `LdifBackend::reload`'s. A file that does not load is refused with a log line
//! naming the file, the line and the reason, and the previous data stays in service; a
//! successful reload empties the directory cache so the next lookups see the new data. It never
//! reads the file on the request path (reloads run on the blocking pool).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::ldif::{LdifBackend, LdifLoadError, Stats};
use super::Directory;

/// The `component` label of the directory's reloads in `ssp_reloads_total`.
pub const COMPONENT: &str = "directory";

/// Default interval between checks of the LDIF file for changes.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What identifies one version of the file: (modification time, size).
type Signature = Option<(SystemTime, u64)>;

async fn signature(path: &Path) -> Signature {
    let meta = tokio::fs::metadata(path).await.ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Decides, poll by poll, when a changed file is loaded: once two polls in a row see the same
/// new (modification time, size), i.e. it has stayed unchanged for one poll interval. A file
/// being copied or written in place changes between polls and waits; one cut short for good is
/// left to the load's own guards (a last line without its newline, no systems or handlers).
#[derive(Debug)]
struct Settle {
    /// The version last loaded (or refused).
    loaded: Signature,
    /// A changed version seen on the last poll, waiting to be seen unchanged once more.
    pending: Option<Signature>,
}

impl Settle {
    fn new(loaded: Signature) -> Self {
        Self {
            loaded,
            pending: None,
        }
    }

    /// A poll saw `now`: whether to load it.
    fn poll(&mut self, now: Signature) -> bool {
        if now == self.loaded {
            self.pending = None;
            return false;
        }
        if self.pending == Some(now) {
            self.loaded(now);
            return true;
        }
        self.pending = Some(now);
        false
    }

    /// `now` is being loaded (SIGHUP loads at once, whatever the polls saw).
    fn loaded(&mut self, now: Signature) {
        self.loaded = now;
        self.pending = None;
    }
}

/// Why a reload happened (for the log line).
#[derive(Debug, Clone, Copy)]
enum Trigger {
    FileChanged,
    Sighup,
    /// The last load was refused: the file is tried again.
    Retry,
}

impl Trigger {
    /// As logged.
    fn as_str(self) -> &'static str {
        match self {
            Trigger::FileChanged => "file changed",
            Trigger::Sighup => "SIGHUP",
            Trigger::Retry => "retry of a refused load",
        }
    }
}

/// Reloads `backend` from its file (on the blocking pool); on success empties the cache of
/// `directory`. Counts the outcome in `reloads` (`ssp_reloads_total{component="directory",
/// result="ok"|"refused"}`) when given. Returns what the new data holds, or why it was refused
/// (already logged).
pub async fn reload_now(
    backend: &Arc<LdifBackend>,
    directory: &Directory,
    reloads: Option<&crate::metrics::ReloadMetrics>,
) -> Result<Stats, Arc<LdifLoadError>> {
    reload_again(backend, directory, reloads, None).await
}

/// [`reload_now`]; `again`: the reason of the refusal this retries with the file unchanged,
/// which, refused for that same reason, is neither logged nor counted again.
async fn reload_again(
    backend: &Arc<LdifBackend>,
    directory: &Directory,
    reloads: Option<&crate::metrics::ReloadMetrics>,
    again: Option<&str>,
) -> Result<Stats, Arc<LdifLoadError>> {
    let worker = backend.clone();
    let result = match tokio::task::spawn_blocking(move || worker.reload()).await {
        Ok(result) => result.map_err(Arc::new),
        Err(e) => Err(Arc::new(LdifLoadError::Io {
            path: PathBuf::from(backend.origin()),
            source: std::io::Error::other(format!("reload task failed: {e}")),
        })),
    };
    if let Err(e) = &result {
        if crate::reload::told(again, &e.to_string()) {
            tracing::debug!(error = %e, "directory reload still refused");
            return result;
        }
    }
    if let Some(reloads) = reloads {
        reloads.record(COMPONENT, result.is_ok());
    }
    match &result {
        Ok(stats) => {
            directory.invalidate_all();
            tracing::info!(
                file = backend.origin(),
                systems = stats.systems,
                handlers = stats.handlers,
                warnings = stats.warnings,
                "directory reloaded; cache emptied"
            );
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                "directory reload refused; the previous directory data stays in service"
            );
        }
    }
    result
}

/// Watches the LDIF file of `backend` until `shutdown`: reloads when its modification time or
/// size changed and then stayed so for one poll (checked every `poll_interval`; `None` turns
/// polling off), and on SIGHUP at once. A file that failed to load is tried again every
/// [`crate::reload::retry_refused`] of the poll interval while it stays refused (what refused
/// it may pass with no change to its size or time, e.g. a `chown`), and a retry refused for the
/// same reason is not logged or counted again. Reloads are counted in `reloads` when given
/// (see [`reload_now`]).
pub async fn watch(
    backend: Arc<LdifBackend>,
    path: PathBuf,
    directory: Directory,
    poll_interval: Option<Duration>,
    reloads: Option<crate::metrics::ReloadMetrics>,
    shutdown: CancellationToken,
) {
    let retry = crate::reload::retry_refused(poll_interval.unwrap_or(Duration::MAX));
    watch_retrying(
        backend,
        path,
        directory,
        poll_interval,
        retry,
        reloads,
        shutdown,
    )
    .await
}

/// [`watch`], a refused file tried again every `retry` while it is as it was refused (the
/// same modification time and size): a file changed since is loaded once a poll sees it
/// settled, or on SIGHUP when polling is off, never by a retry (which could take a copy in
/// progress).
async fn watch_retrying(
    backend: Arc<LdifBackend>,
    path: PathBuf,
    directory: Directory,
    poll_interval: Option<Duration>,
    retry: Duration,
    reloads: Option<crate::metrics::ReloadMetrics>,
    shutdown: CancellationToken,
) {
    let mut hangup = sighup();
    let mut settle = Settle::new(signature(&path).await);
    let mut ticker = poll_interval.map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut refused = crate::reload::Refused::every(retry);
    loop {
        let trigger = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick(&mut ticker) => Trigger::FileChanged,
            _ = refused.due() => Trigger::Retry,
            received = recv(&mut hangup) => {
                if received {
                    Trigger::Sighup
                } else {
                    // The signal stream ended: keep polling only.
                    hangup = None;
                    continue;
                }
            }
        };
        let now = signature(&path).await;
        match trigger {
            Trigger::FileChanged => {
                if !settle.poll(now) {
                    continue;
                }
            }
            Trigger::Sighup => settle.loaded(now),
            Trigger::Retry => {
                if now != settle.loaded {
                    // Changed since it was refused: loaded as a change once a poll sees it
                    // settled (or on SIGHUP), not half-way by a retry.
                    refused.defer();
                    continue;
                }
            }
        }
        let again = match trigger {
            Trigger::Retry => refused.reason(),
            _ => None,
        };
        if again.is_none() {
            tracing::info!(file = %path.display(), trigger = trigger.as_str(), "reloading the directory");
        }
        let loaded = reload_again(&backend, &directory, reloads.as_ref(), again.as_deref()).await;
        refused.settle(loaded.err().map(|e| e.to_string()));
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn sighup() -> Hangup {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the directory reloads on file change only");
            None
        }
    }
}

#[cfg(not(unix))]
fn sighup() -> Hangup {
    None
}

/// Waits for SIGHUP; `false` when the stream ended. Never resolves without a stream.
async fn recv(hangup: &mut Hangup) -> bool {
    #[cfg(unix)]
    if let Some(s) = hangup {
        return s.recv().await.is_some();
    }
    let _ = hangup;
    std::future::pending().await
}

/// Waits for the next poll; never resolves when polling is off.
async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::{CachePolicy, DirectoryBackend};

    const AS_ENTRY: &str = "dn: uniqueIdentifier=1,ou=services,o=nhs\nobjectClass: nhsAs\nuniqueIdentifier: 1\nnhsIDCode: X\nnhsMHSPartyKey: X-1\n";

    /// A changed file is loaded only once a poll sees it as the last one did: a file growing
    /// between polls (a copy in progress) waits until it stops.
    #[test]
    fn a_changed_file_is_loaded_once_it_stays_unchanged_for_a_poll() {
        let at =
            |secs: u64, len: u64| Some((SystemTime::UNIX_EPOCH + Duration::from_secs(secs), len));
        let mut settle = Settle::new(at(1, 100));
        assert!(!settle.poll(at(1, 100)), "unchanged");
        // A copy in progress: a different size at every poll.
        for len in [10, 40, 70] {
            assert!(!settle.poll(at(2, len)), "still changing at {len}");
        }
        assert!(!settle.poll(at(2, 120)), "first seen finished");
        assert!(settle.poll(at(2, 120)), "unchanged for one poll: loaded");
        assert!(!settle.poll(at(2, 120)), "loaded once");
        // A file removed (mid-rename) then back as it was is no change.
        assert!(!settle.poll(None));
        assert!(!settle.poll(at(2, 120)));
        // SIGHUP loads at once; the polls after it see nothing new.
        assert!(!settle.poll(at(3, 130)));
        settle.loaded(at(3, 130));
        assert!(!settle.poll(at(3, 130)));
    }

    /// A scratch directory holding `directory.ldif` with [`AS_ENTRY`], loaded: the directory,
    /// the file, its backend and a directory over it.
    fn one_system(
        name: &str,
    ) -> (
        crate::tempdir::TempDir,
        PathBuf,
        Arc<LdifBackend>,
        Directory,
    ) {
        let dir = crate::tempdir::TempDir::new(name);
        let path = dir.join("directory.ldif");
        std::fs::write(&path, AS_ENTRY).unwrap();
        let backend = Arc::new(LdifBackend::from_path(&path).unwrap());
        let as_dyn: Arc<dyn DirectoryBackend> = backend.clone();
        let directory = Directory::new(as_dyn, CachePolicy::default());
        (dir, path, backend, directory)
    }

    /// A refused file is tried again while it stays refused, though its size and modification
    /// time do not change (as when a `chown` makes it readable), and the same refusal is
    /// counted once. Here the fixed file has the refused one's size and time.
    #[tokio::test]
    async fn a_refused_file_is_tried_again_with_its_size_and_time_unchanged() {
        let (_dir, path, backend, directory) = one_system("retry");
        let reloads = crate::metrics::ReloadMetrics::new();
        let shutdown = CancellationToken::new();
        let watcher = tokio::spawn(watch_retrying(
            backend.clone(),
            path.clone(),
            directory.clone(),
            Some(Duration::from_millis(20)),
            Duration::from_millis(40),
            Some(reloads.clone()),
            shutdown.clone(),
        ));
        let count = |result: &str| reloads.total.with_label_values(&[COMPONENT, result]).get();
        // Refused: a line that is not LDIF, in a file of the good one's size.
        let fixed = AS_ENTRY.replace("=1,", "=2,").replace(": 1\n", ": 2\n");
        let broken = fixed.replace("objectClass: nhsAs", "objectClass  nhsAs");
        assert_eq!(broken.len(), fixed.len());
        // (The first file is of the same size: its modification time must differ.)
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(&path, &broken).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while count("refused") == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never refused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let refused_at = std::fs::metadata(&path).unwrap().modified().unwrap();
        // Refused again on retry, for the same reason: counted once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(count("refused"), 1, "the same refusal counted again");
        // Fixed in place, its size and time as refused.
        std::fs::write(&path, &fixed).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(refused_at)
            .unwrap();
        while directory.party("2").await.unwrap().is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the fixed file was never loaded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!((count("ok"), count("refused")), (1, 1));
        shutdown.cancel();
        watcher.await.unwrap();
    }

    #[tokio::test]
    async fn reload_now_swaps_data_empties_the_cache_and_keeps_old_data_on_error() {
        let (_dir, path, backend, directory) = one_system("reload");
        assert!(directory.party("1").await.unwrap().is_some());

        std::fs::write(
            &path,
            AS_ENTRY
                .replace("uniqueIdentifier: 1", "uniqueIdentifier: 2")
                .replace("=1,", "=2,"),
        )
        .unwrap();
        let reloads = crate::metrics::ReloadMetrics::new();
        let count = |result: &str| reloads.total.with_label_values(&[COMPONENT, result]).get();
        let last_ok = || reloads.last_ok.with_label_values(&[COMPONENT]).get();
        let stats = reload_now(&backend, &directory, Some(&reloads))
            .await
            .unwrap();
        assert_eq!((count("ok"), count("refused"), last_ok()), (1, 0, 1));
        assert_eq!(stats.systems, 1);
        assert!(
            directory.party("1").await.unwrap().is_none(),
            "the cache was emptied"
        );
        assert!(directory.party("2").await.unwrap().is_some());

        std::fs::write(&path, "dn: o=nhs\nnot ldif\n").unwrap();
        let err = reload_now(&backend, &directory, Some(&reloads))
            .await
            .unwrap_err();
        assert_eq!((count("ok"), count("refused"), last_ok()), (1, 1, 0));
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(
            directory.party("2").await.unwrap().is_some(),
            "old data stays"
        );
    }
}
