//! Error lines that a request can cause, bounded under a flood: while the directory or the
//! audit trail is down, every request would log the same error (25,000 lines in 4 s in a
//! review). A call site keeps one [`Every`]; it lets one line through per interval and the next
//! line says how many were held back. Each request still has its access-log line and its audit
//! record, and the metrics count every one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// One call site's limit: at most one line per `interval_ms`.
pub struct Every {
    interval_ms: u64,
    /// When the next line may go out (ms since the process's first use of this module).
    next_ms: AtomicU64,
    held: AtomicU64,
}

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Every {
    /// One line a second.
    pub const fn second() -> Every {
        Every {
            interval_ms: 1000,
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when this line may be logged; `None` (and
    /// counted) when it is held back.
    pub fn allow(&self) -> Option<u64> {
        let now = now_ms();
        let next = self.next_ms.load(Ordering::Acquire);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval_ms,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::AcqRel));
        }
        self.held.fetch_add(1, Ordering::AcqRel);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_next_counts_those_held_back() {
        let every = Every {
            interval_ms: 60_000,
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        };
        assert_eq!(every.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(every.allow(), None);
        }
        // The interval has passed.
        every.next_ms.store(0, Ordering::Release);
        assert_eq!(every.allow(), Some(5));
        assert_eq!(every.allow(), None);
    }
}
