//! The clock of `--rate`: request `n` is due at `start + n × interval`, and the pacer releases
//! each request slot to the workers at its due time, to within the kernel's timer precision.
//!
//! Workers used to sleep on tokio's timer to each due time. That timer has a resolution of one
//! millisecond and rounds every deadline up to the next tick, so each request went out up to
//! 1 ms late, and all the requests due within one millisecond went out together. The server saw
//! bursts instead of an even rate, and the latency (counted from the due time) included the
//! generator's own lateness: about 1 ms at the median for a loopback provider that answers in
//! 0.2 ms. The pacer is one OS thread that sleeps to each due time on the high-resolution timer
//! (its timer slack set to 1 µs) and hands the slot over through a semaphore.
//!
//! Coordinated omission is still accounted for: when every worker is busy, released slots wait
//! as permits, and the worker that takes one counts its latency from the slot's due time (the
//! slot is *late*: no worker was free when it fell due). Once the run's end has passed, a late
//! slot is no longer taken: it stays not sent, and the report counts it from the schedule
//! ([`Pacer::due_before`] and [`Pacer::taken`]). Every slot is thus sent or counted as not sent.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The longest the pacer thread sleeps before it checks whether the run was abandoned.
const MAX_NAP: Duration = Duration::from_millis(50);

/// Fixed-rate slots for a run's workers.
pub(super) struct Pacer {
    /// One permit per released slot, then one per worker once every slot is out.
    released: Arc<Semaphore>,
    schedule: Schedule,
    /// The next slot a worker takes (slots are taken in order).
    taken: AtomicU64,
    /// Set when the run is dropped, so the thread stops early.
    stop: Arc<AtomicBool>,
}

/// Request `n` is due at `start + n × interval`; only slots due before `end` are sent.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start: std::time::Instant,
    interval: Duration,
    end: std::time::Instant,
}

impl Schedule {
    /// How many slots are due before `t` (and before the end).
    fn due_before(&self, t: std::time::Instant) -> u64 {
        let t = t.min(self.end);
        let Some(span) = t.checked_duration_since(self.start) else {
            return 0;
        };
        let interval = self.interval.as_nanos().max(1);
        let n = span.as_nanos().div_ceil(interval);
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// Slot `n`'s due time, or None when it is not before the end.
    fn due(&self, n: u64) -> Option<std::time::Instant> {
        let nanos = self.interval.as_nanos().checked_mul(u128::from(n))?;
        let due = self
            .start
            .checked_add(Duration::from_nanos(u64::try_from(nanos).ok()?))?;
        (due < self.end).then_some(due)
    }
}

impl Pacer {
    /// Starts the pacer thread for `workers` workers taking slots from `start` to `end`.
    pub(super) fn start(
        start: Instant,
        interval: Duration,
        end: Instant,
        workers: usize,
    ) -> std::io::Result<Pacer> {
        let schedule = Schedule {
            start: start.into_std(),
            interval,
            end: end.into_std(),
        };
        let released = Arc::new(Semaphore::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let released = released.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("loadtest-pacer".into())
                .spawn(move || release(&schedule, &released, &stop, workers))?;
        }
        Ok(Pacer {
            released,
            schedule,
            taken: AtomicU64::new(0),
            stop,
        })
    }

    /// Waits for the next released slot and returns it: its due time (now, or earlier when
    /// every worker was busy at that time) and whether it was late: due before `free_since`,
    /// when the asking worker became free to send it (the schedule's start for a worker's first
    /// request: it was idle until then, if not yet running). None once every slot before the
    /// end is taken, when `interrupt` is cancelled, or when the slot is late and `end` has
    /// passed (it is then never sent). Each worker passes its own child of the run's token, so
    /// that waiting here takes no lock the other workers share.
    pub(super) async fn next(
        &self,
        free_since: Instant,
        end: Instant,
        interrupt: &CancellationToken,
    ) -> Option<Slot> {
        // The pacer never closes the semaphore: a closed one would refuse the permits still
        // waiting, which are slots already due.
        tokio::select! {
            permit = self.released.acquire() => permit.ok()?.forget(),
            () = interrupt.cancelled() => return None,
        }
        loop {
            let n = self.taken.load(Ordering::Acquire);
            let due = Instant::from_std(self.schedule.due(n)?);
            let late = due < free_since;
            if interrupt.is_cancelled() || (late && Instant::now() >= end) {
                return None;
            }
            if self
                .taken
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Some(Slot { due, late });
            }
        }
    }

    /// How many slots are due before `t` (never more than the run has).
    pub(super) fn due_before(&self, t: Instant) -> u64 {
        self.schedule.due_before(t.into_std())
    }

    /// How many slots workers have taken.
    pub(super) fn taken(&self) -> u64 {
        self.taken.load(Ordering::Acquire)
    }

    /// Stops releasing slots (the run was interrupted).
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A request slot taken by a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    /// When it was due: the intended send time, from which its latency counts.
    pub due: Instant,
    /// Every worker was busy when it fell due: it waited for one.
    pub late: bool,
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The pacer thread: releases each slot at its due time, then one permit per worker, so each
/// worker wakes, finds no slot left, and stops.
fn release(schedule: &Schedule, released: &Semaphore, stop: &AtomicBool, workers: usize) {
    precise_timers();
    let mut n = 0u64;
    while let Some(next) = schedule.due(n) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let now = std::time::Instant::now();
        if next > now {
            std::thread::sleep((next - now).min(MAX_NAP));
            continue;
        }
        let mut due_now = 0usize;
        while schedule.due(n).is_some_and(|due| due <= now) {
            n += 1;
            due_now += 1;
        }
        released.add_permits(due_now);
    }
    released.add_permits(workers);
}

/// Asks the kernel to wake this thread within 1 µs of its deadline (the default slack is
/// 50 µs, which would shift every slot by up to that much).
fn precise_timers() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK only sets this thread's timer slack; it touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_slot_is_released_once_never_early_and_then_each_worker_stops() {
        // 1,000 requests/s for 60 ms: slots 0..=59, taken by three workers.
        let start = Instant::now();
        let interval = Duration::from_millis(1);
        let end = start + Duration::from_millis(60);
        let pacer = Arc::new(Pacer::start(start, interval, end, 3).expect("pacer thread"));
        let workers = (0..3).map(|_| {
            let pacer = pacer.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                // (Taken whenever the machine lets the workers run: no end for late slots.)
                let never = end + Duration::from_secs(3600);
                let interrupt = CancellationToken::new();
                while let Some(Slot { due, .. }) =
                    pacer.next(Instant::now(), never, &interrupt).await
                {
                    let at = Instant::now();
                    assert!(at >= due, "slot due at {due:?} released early, at {at:?}");
                    got.push(due);
                }
                got
            })
        });
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.expect("worker"));
        }
        all.sort();
        let want: Vec<Instant> = (0..60).map(|n| start + interval * n).collect();
        assert_eq!(all, want, "each slot exactly once");
        assert!(Instant::now() >= start + interval * 59);
        assert_eq!(pacer.due_before(end), 60);
        assert!(pacer.taken() >= 60, "every slot taken");
    }

    #[tokio::test]
    async fn slots_released_while_every_worker_was_busy_are_sent_late() {
        // The one worker is busy for the first 9 ms; then it gets the slots due meanwhile, each
        // with its own due time (so its latency counts the wait) and marked late.
        let start = Instant::now();
        let interval = Duration::from_millis(2);
        let end = start + Duration::from_millis(20);
        let pacer = Pacer::start(start, interval, end, 1).expect("pacer thread");
        tokio::time::sleep_until(start + Duration::from_millis(9)).await;
        let never = end + Duration::from_secs(3600);
        let interrupt = CancellationToken::new();
        let mut got = Vec::new();
        while let Some(slot) = pacer.next(Instant::now(), never, &interrupt).await {
            got.push(slot);
        }
        let want: Vec<Instant> = (0..10).map(|n| start + interval * n).collect();
        assert_eq!(got.iter().map(|s| s.due).collect::<Vec<_>>(), want);
        assert!(
            got[..5].iter().all(|s| s.late),
            "due at 0 to 8 ms, asked for at 9 ms: {got:?}"
        );
    }

    #[tokio::test]
    async fn a_worker_free_since_the_start_is_on_time_however_late_it_first_asks() {
        // The worker is first polled 5 ms after the schedule started (spawning workers takes
        // time): it was free all along, so the slots already due are on time, not late. Busy
        // from 5 ms to 9 ms, it is late for the slots due meanwhile.
        let start = Instant::now();
        let interval = Duration::from_millis(2);
        let end = start + Duration::from_millis(20);
        let pacer = Pacer::start(start, interval, end, 1).expect("pacer thread");
        tokio::time::sleep_until(start + Duration::from_millis(5)).await;
        let never = end + Duration::from_secs(3600);
        let interrupt = CancellationToken::new();
        let mut got = Vec::new();
        for _ in 0..3 {
            got.extend(pacer.next(start, never, &interrupt).await);
        }
        let busy_until = start + Duration::from_millis(9);
        tokio::time::sleep_until(busy_until).await;
        got.extend(pacer.next(busy_until, never, &interrupt).await);
        let want: Vec<Slot> = (0..4)
            .map(|n| Slot {
                due: start + interval * n,
                late: n == 3,
            })
            .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn late_slots_are_not_taken_after_the_end_nor_any_once_interrupted() {
        let start = Instant::now();
        let interval = Duration::from_millis(2);
        let end = start + Duration::from_millis(20);
        let pacer = Pacer::start(start, interval, end, 1).expect("pacer thread");
        tokio::time::sleep_until(end + Duration::from_millis(5)).await;
        let interrupt = CancellationToken::new();
        assert_eq!(pacer.next(Instant::now(), end, &interrupt).await, None);
        assert_eq!(pacer.taken(), 0, "not sent, all ten");
        assert_eq!(pacer.due_before(end), 10);

        let pacer =
            Pacer::start(Instant::now(), interval, end + interval * 100, 1).expect("pacer thread");
        interrupt.cancel();
        let (now, later) = (Instant::now(), end + interval * 100);
        assert_eq!(pacer.next(now, later, &interrupt).await, None);
        assert_eq!(pacer.taken(), 0);
    }

    #[test]
    fn the_schedule_ends_before_its_end_and_never_overflows() {
        let start = std::time::Instant::now();
        let s = Schedule {
            start,
            interval: Duration::from_millis(10),
            end: start + Duration::from_millis(30),
        };
        assert_eq!(s.due(0), Some(start));
        assert_eq!(s.due(2), Some(start + Duration::from_millis(20)));
        assert_eq!(s.due(3), None, "due exactly at the end: not sent");
        assert_eq!(s.due(u64::MAX), None);
        assert_eq!(s.due_before(start), 0);
        assert_eq!(s.due_before(start + Duration::from_nanos(1)), 1);
        assert_eq!(s.due_before(start + Duration::from_millis(10)), 1);
        assert_eq!(s.due_before(start + Duration::from_millis(11)), 2);
        assert_eq!(
            s.due_before(start + Duration::from_secs(60)),
            3,
            "the end bounds it"
        );
        assert_eq!(s.due_before(start - Duration::from_millis(1)), 0);
        let fast = Schedule {
            interval: Duration::from_nanos(1),
            end: start + Duration::from_secs(10),
            ..s
        };
        assert_eq!(
            fast.due(5_000_000_000),
            Some(start + Duration::from_secs(5)),
            "slots past 2^32 (a billion a second for 10 s)"
        );
        let huge = Schedule {
            interval: Duration::MAX,
            end: start + Duration::from_secs(1),
            ..s
        };
        assert_eq!(huge.due(1), None);
    }
}
