//! `memory::trim` gives a burst's freed memory back to the system. Its own test
//! binary, so no other test allocates while it measures the process's RSS.

use ssp_gateway::memory;

/// Resident bytes of this process, from /proc.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages in statm");
    // SAFETY: sysconf only reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    pages * page
}

#[test]
fn a_burst_freed_between_live_chunks_goes_back_to_the_system() {
    // 64 MiB in 4 KiB blocks (below the mmap threshold: from the heap), written so they are
    // resident; then all but every 64th freed, so no free space lies at the heap's top to be
    // returned on its own.
    let blocks: Vec<Box<[u8; 4096]>> = (0..16_384).map(|i| Box::new([i as u8; 4096])).collect();
    let kept: Vec<Box<[u8; 4096]>> = blocks
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 64 == 63)
        .map(|(_, b)| b)
        .collect();
    let free = memory::free_held().expect("glibc on Linux");
    assert!(free > 48 << 20, "the freed blocks are held free: {free}");
    let before = rss();

    assert!(memory::TrimPolicy::default().should_trim(free));
    memory::trim();
    let after = rss();
    assert!(
        before.saturating_sub(after) > 40 << 20,
        "RSS {before} -> {after}: the free pages were given back"
    );

    // The chunks are still free, their pages gone: what is counted free has not moved.
    let still = memory::free_held().expect("glibc on Linux");
    assert!(
        still.abs_diff(free) < memory::FREE_HELD_CHANGE,
        "{free} -> {still}"
    );
    assert_eq!(kept.len(), 256);
    assert!(kept.iter().all(|b| b[0] == b[4095]));
}
