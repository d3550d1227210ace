//! Memory a burst freed goes back to the system.
//!
//! glibc's malloc keeps freed memory in its arenas for reuse, and gives back only what lies
//! free at the top of a heap. After a burst (large bodies streamed, thousands of connections
//! opened and closed), most of what the burst used is free but scattered between chunks still
//! in use, so the process's RSS stays at the burst's high-water mark for as long as it runs.
//! Measured: 28 MB after a burst of 178 KB Bundles through 32 connections, 11 MB of it in use,
//! against 20 MB once trimmed.
//!
//! [`start_trimmer`] starts one thread that looks every [`CHECK_EVERY`] at how much the
//! arenas hold free (`mallinfo2`) and, when that is above [`FREE_HELD_LIMIT`] and has moved by
//! more than [`FREE_HELD_CHANGE`] since the last look ([`TrimPolicy`]), asks glibc to return
//! the free pages (`malloc_trim`, which `madvise`s them away). A trim does not change what is
//! counted free (the chunks stay free, their pages are gone), so an idle process is trimmed
//! once, not at every look. Under load, a trim happens only at a look that finds more than
//! the limit free and moved; it costs the page faults of memory touched again later. Other
//! allocators (musl, a build for another target) manage their own memory: there, nothing is
//! done.

use std::sync::Once;
use std::time::Duration;

/// How often the trimmer looks.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Free memory the arenas may hold before it is given back.
pub const FREE_HELD_LIMIT: usize = 8 << 20;

/// How far the free memory must have moved since the last look for another trim.
pub const FREE_HELD_CHANGE: usize = 1 << 20;

/// When to trim, from what the arenas hold free at each look.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    last_seen: usize,
}

impl TrimPolicy {
    /// Whether to trim now, holding `free` bytes free (and remembers it for the next look).
    pub fn should_trim(&mut self, free: usize) -> bool {
        let moved = free.abs_diff(self.last_seen) > FREE_HELD_CHANGE;
        self.last_seen = free;
        moved && free > FREE_HELD_LIMIT
    }
}

/// Bytes the allocator's arenas hold free (`None` where that cannot be asked).
pub fn free_held() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics, under its own locks.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Gives the arenas' free pages back to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Starts the trimmer thread, once per process (later calls do nothing).
pub fn start_trimmer() {
    static STARTED: Once = Once::new();
    if free_held().is_none() {
        return;
    }
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("memory-trim".into())
            .stack_size(64 * 1024)
            .spawn(|| {
                let mut policy = TrimPolicy::default();
                loop {
                    std::thread::sleep(CHECK_EVERY);
                    let Some(free) = free_held() else { return };
                    if policy.should_trim(free) {
                        trim();
                        tracing::debug!(
                            free_bytes = free,
                            "memory: free memory held by the allocator returned to the system"
                        );
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "memory: cannot start the trimmer thread; freed memory stays with the process");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_per_burst_freed_not_at_every_look() {
        let mut p = TrimPolicy::default();
        // Below the limit: nothing, however it moves.
        assert!(!p.should_trim(2 << 20));
        assert!(!p.should_trim(FREE_HELD_LIMIT));
        // A burst freed: 20 MiB free.
        assert!(p.should_trim(20 << 20));
        // Idle: the same free memory (its pages already returned), or nearly.
        assert!(!p.should_trim(20 << 20));
        assert!(!p.should_trim((20 << 20) + 4096));
        // Load again, the free memory reused; then freed again.
        assert!(!p.should_trim(3 << 20));
        assert!(p.should_trim(19 << 20));
        // More freed while idle above the limit.
        assert!(p.should_trim(30 << 20));
    }
}
