//! Hot reload of what the gateway loads from files (TLS material first): a new snapshot is
//! built off the hot path — on SIGHUP or when a watched file's size or modification time
//! changes — and swapped in atomically. A snapshot that fails to build is refused, logged and
//! counted; the previous one stays in force, and the build is tried again every
//! [`retry_refused`] while it stays refused: what refused it may pass with no change to the
//! files' size or time (a renewed certificate whose notBefore is still ahead, a key made
//! readable by `chown`). A retry refused for the same reason again is not logged or counted a
//! second time. Connections already open keep the snapshot they were accepted with; nothing is
//! dropped.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Counts of reload outcomes for one component (for logs, tests and metrics).
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
}

impl ReloadStats {
    pub fn succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// A value rebuilt from files on change; readers take `current()` (a cheap `Arc` clone).
pub struct Reloadable<T> {
    name: &'static str,
    value: ArcSwap<T>,
    /// The files watched; a reload may name others ([`Reloadable::watch_files`]).
    files: ArcSwap<Vec<PathBuf>>,
    stats: ReloadStats,
    /// `ssp_reloads_total{component, result}` and `ssp_reload_last_ok`, when metrics are on.
    counter: std::sync::OnceLock<crate::metrics::ReloadMetrics>,
}

/// How long after a refused reload it is tried again with its files as they were refused:
/// twice the poll interval, from 5 s to 10 s (10 s when only SIGHUP reloads), so a refused
/// snapshot (large CRLs, a large LDIF) is not parsed again more often than that.
pub fn retry_refused(poll: Duration) -> Duration {
    poll.saturating_mul(2)
        .clamp(Duration::from_secs(5), Duration::from_secs(10))
}

/// What a watched file looked like at the last check: (modified, length), or absent.
type Fingerprint = Option<(SystemTime, u64)>;

fn fingerprint(path: &PathBuf) -> Fingerprint {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// `files` are the paths whose change triggers a rebuild.
    pub fn new(name: &'static str, initial: Arc<T>, files: Vec<PathBuf>) -> Arc<Reloadable<T>> {
        Arc::new(Reloadable {
            name,
            value: ArcSwap::new(initial),
            files: ArcSwap::from_pointee(files),
            stats: ReloadStats::default(),
            counter: std::sync::OnceLock::new(),
        })
    }

    pub fn current(&self) -> Arc<T> {
        self.value.load_full()
    }

    pub fn stats(&self) -> &ReloadStats {
        &self.stats
    }

    /// Watches `files` from the next check on: a reload that moved a file (the policy's
    /// interaction catalogue to a new path) has the new one watched, not the old.
    pub fn watch_files(&self, files: Vec<PathBuf>) {
        self.files.store(Arc::new(files));
    }

    /// Counts this component's reloads in `metrics` (`ssp_reloads_total`,
    /// `ssp_reload_last_ok`), whose series for this component are exposed from now.
    pub fn count_in(&self, metrics: crate::metrics::ReloadMetrics) {
        metrics.register_component(self.name);
        let _ = self.counter.set(metrics);
    }

    fn count(&self, ok: bool) {
        if let Some(m) = self.counter.get() {
            m.record(self.name, ok);
        }
    }

    /// Rebuilds with `build` and swaps the result in; on failure keeps the old value.
    pub fn reload_with<E: std::fmt::Display>(&self, build: impl FnOnce() -> Result<T, E>) -> bool {
        self.attempt(build, None).is_ok()
    }

    /// [`Reloadable::reload_with`], saying why it was refused. `again`: the reason of the
    /// refusal this retries unchanged; refused for that same reason, it is neither logged nor
    /// counted again (the refusal stands, as `ssp_reload_last_ok` 0 says).
    fn attempt<E: std::fmt::Display>(
        &self,
        build: impl FnOnce() -> Result<T, E>,
        again: Option<&str>,
    ) -> Result<(), String> {
        match build() {
            Ok(value) => {
                self.value.store(Arc::new(value));
                self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
                self.count(true);
                if again.is_some() {
                    tracing::info!(component = self.name, "reloaded on retry");
                } else {
                    tracing::info!(component = self.name, "reloaded");
                }
                Ok(())
            }
            Err(e) => {
                let e = e.to_string();
                if told(again, &e) {
                    tracing::debug!(component = self.name, error = %e, "reload still refused");
                    return Err(e);
                }
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                self.count(false);
                tracing::error!(
                    component = self.name,
                    error = %e,
                    "reload refused; the previous version stays in force"
                );
                Err(e)
            }
        }
    }

    /// Watches the files (every `poll`) and SIGHUP until `shutdown`, rebuilding with `build`
    /// (run on the blocking pool: it reads files and parses certificates), and, while the last
    /// rebuild is refused, every [`retry_refused`] of `poll`.
    pub fn watch<E, F>(
        self: &Arc<Self>,
        build: F,
        poll: Duration,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) where
        E: std::fmt::Display + Send + 'static,
        F: Fn() -> Result<T, E> + Send + Sync + 'static,
    {
        self.watch_retrying(build, poll, retry_refused(poll), shutdown, tasks);
    }

    /// [`Reloadable::watch`], a refused rebuild tried again every `retry` while its files are
    /// as they were refused. A file changed since waits for the poll that sees it (a change is
    /// built as such) or, when only SIGHUP reloads, for SIGHUP: a retry never builds files
    /// the watch has not seen change.
    fn watch_retrying<E, F>(
        self: &Arc<Self>,
        build: F,
        poll: Duration,
        retry: Duration,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) where
        E: std::fmt::Display + Send + 'static,
        F: Fn() -> Result<T, E> + Send + Sync + 'static,
    {
        let this = self.clone();
        let build = Arc::new(build);
        // Taken now, not when the task first runs, so a change made meanwhile is not missed.
        let mut watched = this.files.load_full();
        let mut seen: Vec<Fingerprint> = watched.iter().map(fingerprint).collect();
        tasks.spawn(async move {
            let mut hangup = hangup_signal();
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut refused = Refused::every(retry);
            loop {
                let (forced, retrying) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => (false, false),
                    _ = next_hangup(&mut hangup) => (true, false),
                    _ = refused.due() => (false, true),
                };
                let now: Vec<Fingerprint> = watched.iter().map(fingerprint).collect();
                let again = match wake(forced, now != seen, retrying) {
                    Wake::Nothing => continue,
                    Wake::Defer => {
                        refused.defer();
                        continue;
                    }
                    Wake::Build => None,
                    // The same refusal again is not news.
                    Wake::Retry => refused.reason(),
                };
                seen = now;
                let (this2, build) = (this.clone(), build.clone());
                let joined = tokio::task::spawn_blocking(move || {
                    this2.attempt(|| build(), again.as_deref())
                })
                .await;
                refused.settle(match joined {
                    Ok(built) => built.err(),
                    Err(e) => {
                        tracing::error!(component = this.name, error = %e, "reload task failed");
                        None
                    }
                });
                let files = this.files.load_full();
                if files != watched {
                    // The reload named other files: they are as it read them.
                    seen = files.iter().map(fingerprint).collect();
                    watched = files;
                }
            }
        });
    }
}

/// What one wake-up of a watch does.
#[derive(Debug, PartialEq, Eq)]
enum Wake {
    /// Nothing changed, and nothing to retry.
    Nothing,
    /// Build the files as they are now: SIGHUP, or a poll that saw them change.
    Build,
    /// Build again the files as they were refused.
    Retry,
    /// A retry's time came, but the files changed since the refusal: a poll that sees the
    /// change builds them as a change, or, when only SIGHUP reloads, SIGHUP does; a retry
    /// never builds files nobody asked for. The retry waits its interval again.
    Defer,
}

/// What a wake-up by SIGHUP (`forced`), the poll, or the retry timer (`retrying`) does, the
/// watched files having `changed` since they were last built.
fn wake(forced: bool, changed: bool, retrying: bool) -> Wake {
    match (forced, changed, retrying) {
        (true, _, _) => Wake::Build,
        (false, true, false) => Wake::Build,
        (false, true, true) => Wake::Defer,
        (false, false, true) => Wake::Retry,
        (false, false, false) => Wake::Nothing,
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload on file change only");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {
    None
}

/// The refusal a watch tries again: its reason, and when the files as refused are next built.
/// Shared by [`Reloadable`]'s watch and the LDIF directory's.
#[derive(Debug)]
pub(crate) struct Refused {
    refusal: Option<(String, tokio::time::Instant)>,
    every: Duration,
}

impl Refused {
    /// None yet; a refusal is tried again every `every`.
    pub(crate) fn every(every: Duration) -> Refused {
        Refused {
            refusal: None,
            every,
        }
    }

    /// Resolves when the refusal is due to be tried again; never without one.
    pub(crate) async fn due(&self) {
        match &self.refusal {
            Some((_, at)) => tokio::time::sleep_until(*at).await,
            None => std::future::pending().await,
        }
    }

    /// The files changed since the refusal: not retried now (the change is built as one), the
    /// retry waits its interval again.
    pub(crate) fn defer(&mut self) {
        if let Some((_, at)) = &mut self.refusal {
            *at = tokio::time::Instant::now() + self.every;
        }
    }

    /// The reason a retry is compared with ([`told`]).
    pub(crate) fn reason(&self) -> Option<String> {
        self.refusal.as_ref().map(|(e, _)| e.clone())
    }

    /// The outcome of a build: a refusal (its reason) is tried again after the interval, a
    /// success ends the retries.
    pub(crate) fn settle(&mut self, refused: Option<String>) {
        self.refusal = refused.map(|e| (e, tokio::time::Instant::now() + self.every));
    }
}

/// Whether a refusal for `reason` was already told: a retry (`again`, the reason it retries)
/// refused for the same reason is neither logged nor counted a second time.
pub(crate) fn told(again: Option<&str>, reason: &str) -> bool {
    again == Some(reason)
}

async fn next_hangup(h: &mut Hangup) {
    #[cfg(unix)]
    if let Some(s) = h {
        if s.recv().await.is_some() {
            return;
        }
    }
    let _ = h;
    std::future::pending::<()>().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A retry builds only files as they were refused; files changed since wait for the poll
    /// that sees them, or for SIGHUP when only SIGHUP reloads (whose poll never comes): a
    /// half-made edit across files is not taken up by a retry.
    #[test]
    fn a_retry_never_builds_changed_files() {
        assert_eq!(wake(false, true, true), Wake::Defer);
        assert_eq!(wake(false, false, true), Wake::Retry);
        assert_eq!(wake(false, true, false), Wake::Build);
        assert_eq!(wake(true, true, true), Wake::Build);
        assert_eq!(wake(true, false, false), Wake::Build);
        assert_eq!(wake(false, false, false), Wake::Nothing);
        assert_eq!(
            retry_refused(Duration::from_millis(100)),
            Duration::from_secs(5)
        );
        assert_eq!(
            retry_refused(Duration::from_secs(5)),
            Duration::from_secs(10)
        );
        assert_eq!(retry_refused(Duration::MAX), Duration::from_secs(10));
    }

    #[test]
    fn a_failed_rebuild_keeps_the_old_value() {
        let r = Reloadable::new("test", Arc::new(1u32), vec![]);
        assert!(r.reload_with(|| Ok::<_, String>(2)));
        assert_eq!(*r.current(), 2);
        assert!(!r.reload_with(|| Err::<u32, _>("broken file".to_string())));
        assert_eq!(*r.current(), 2);
        assert_eq!((r.stats().succeeded(), r.stats().failed()), (1, 1));
    }

    /// `ssp_reload_last_ok` says how the last reload went until the next one: a refusal stays
    /// visible after `increase(ssp_reloads_total[...])` has forgotten it.
    #[test]
    fn the_last_outcome_is_exposed_until_the_next_reload() {
        let r = Reloadable::new("test", Arc::new(1u32), vec![]);
        let m = crate::metrics::ReloadMetrics::new();
        r.count_in(m.clone());
        let last = || m.last_ok.with_label_values(&["test"]).get();
        let refused = || m.total.with_label_values(&["test", "refused"]).get();
        assert_eq!((last(), refused()), (1, 0));
        assert!(!r.reload_with(|| Err::<u32, _>("broken file".to_string())));
        assert_eq!((last(), refused()), (0, 1));
        assert!(r.reload_with(|| Ok::<_, String>(2)));
        assert_eq!((last(), refused()), (1, 1));
    }

    /// A reload that names another file (the policy's catalogue moved) has that file watched:
    /// before, the old path stayed watched and edits to the new one were never picked up.
    #[tokio::test]
    async fn a_file_named_by_a_reload_is_watched_from_then_on() {
        let dir = crate::tempdir::TempDir::new("reload-moved");
        let (pointer, a, b) = (dir.join("pointer"), dir.join("a"), dir.join("b"));
        std::fs::write(&a, "1").expect("write");
        std::fs::write(&b, "2").expect("write");
        std::fs::write(&pointer, a.to_str().expect("utf-8")).expect("write");
        let r = Reloadable::new("test", Arc::new(1u32), vec![pointer.clone(), a.clone()]);
        let weak = Arc::downgrade(&r);
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let named = pointer.clone();
        r.watch(
            move || {
                let target =
                    PathBuf::from(std::fs::read_to_string(&named).map_err(|e| e.to_string())?);
                let value = std::fs::read_to_string(&target)
                    .map_err(|e| e.to_string())?
                    .trim()
                    .parse::<u32>()
                    .map_err(|e| e.to_string())?;
                if let Some(r) = weak.upgrade() {
                    r.watch_files(vec![named.clone(), target]);
                }
                Ok::<_, String>(value)
            },
            Duration::from_millis(10),
            shutdown.clone(),
            &tasks,
        );
        let until = |want: u32, what: &'static str| {
            let r = r.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while *r.current() != want {
                    assert!(tokio::time::Instant::now() < deadline, "{what}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        std::fs::write(&pointer, b.to_str().expect("utf-8")).expect("write");
        until(2, "the move to b was not picked up").await;
        std::fs::write(&b, "33").expect("write");
        until(33, "an edit of the new file was not picked up").await;
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
    }

    /// A refused rebuild is tried again with the files unchanged, and taken once what refused
    /// it passes (here a flag; in life a certificate's notBefore reached, a key made readable).
    /// The same refusal again is counted once; another reason is counted. Before, nothing but
    /// a change of a file's size or time, or SIGHUP, tried it again.
    #[tokio::test]
    async fn a_refused_reload_is_tried_again_until_it_passes() {
        use std::sync::atomic::AtomicU32;
        let dir = crate::tempdir::TempDir::new("reload-retry");
        let file = dir.join("value.txt");
        std::fs::write(&file, "1").expect("write");
        let r = Reloadable::new("test", Arc::new(1u32), vec![file.clone()]);
        // 0: refused "not yet"; 1: refused "other"; 2: the file's value.
        let state = Arc::new(AtomicU32::new(0));
        let builds = Arc::new(AtomicU32::new(0));
        let (path, st, n) = (file.clone(), state.clone(), builds.clone());
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        r.watch_retrying(
            move || {
                n.fetch_add(1, Ordering::SeqCst);
                match st.load(Ordering::SeqCst) {
                    0 => Err("not yet".to_owned()),
                    1 => Err("other".to_owned()),
                    _ => std::fs::read_to_string(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|t| t.trim().parse::<u32>().map_err(|e| e.to_string())),
                }
            },
            Duration::from_millis(10),
            Duration::from_millis(20),
            shutdown.clone(),
            &tasks,
        );
        async fn until(what: &str, done: impl Fn() -> bool) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !done() {
                assert!(tokio::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // (Of another size: a same-size write within the clock's tick may keep the mtime.)
        std::fs::write(&file, "77").expect("write");
        until("the change was never tried", || r.stats().failed() == 1).await;
        // Retried, unchanged, and refused for the same reason: counted once.
        let tried = builds.load(Ordering::SeqCst);
        until("never retried", || {
            builds.load(Ordering::SeqCst) >= tried + 3
        })
        .await;
        assert_eq!(r.stats().failed(), 1, "the same refusal counted again");
        assert_eq!(*r.current(), 1);
        // Refused for another reason: counted.
        state.store(1, Ordering::SeqCst);
        until("the new reason was not counted", || r.stats().failed() == 2).await;
        // What refused it passes, with the file as it was: taken on the next retry.
        state.store(2, Ordering::SeqCst);
        until("never taken on retry", || *r.current() == 77).await;
        assert_eq!((r.stats().succeeded(), r.stats().failed()), (1, 2));
        // Taken: no more retries.
        let tried = builds.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            builds.load(Ordering::SeqCst),
            tried,
            "retried after success"
        );
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
    }

    #[tokio::test]
    async fn a_changed_file_is_picked_up() {
        let dir = crate::tempdir::TempDir::new("reload");
        let file = dir.join("value.txt");
        std::fs::write(&file, "1").expect("write");
        let r = Reloadable::new("test", Arc::new(1u32), vec![file.clone()]);
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let path = file.clone();
        r.watch(
            move || {
                std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| t.trim().parse::<u32>().map_err(|e| e.to_string()))
            },
            Duration::from_millis(10),
            shutdown.clone(),
            &tasks,
        );
        std::fs::write(&file, "22").expect("write");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while *r.current() != 22 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "change not picked up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A broken file is refused and the value stays.
        std::fs::write(&file, "not a number").expect("write");
        while r.stats().failed() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "broken file not noticed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*r.current(), 22);
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
    }
}
