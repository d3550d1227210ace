//! The log's writer: log lines go into an in-memory buffer and one background thread writes
//! what has gathered to standard output every `FLUSH_DELAY`, with one `write` for all of it. A
//! request's log line then costs a copy, not a system call on the async runtime, and a slow or
//! blocked standard output (a full pipe) never stalls a request. The buffer is bounded: past
//! `MAX_BUFFERED` bytes lines are dropped, counted, and the count is written as a line of its
//! own once output moves again. `flush` writes everything out (at exit). This module never
//! splits a line and never blocks a caller on output.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::Duration;

/// How long the first line of a batch waits for more before they are written together.
pub const FLUSH_DELAY: Duration = Duration::from_millis(5);
/// The most bytes waiting to be written; lines past it are dropped (and counted).
pub const MAX_BUFFERED: usize = 8 << 20;

struct Shared {
    buffer: Mutex<Vec<u8>>,
    dropped: AtomicU64,
    flusher: OnceLock<Thread>,
    /// Serialises writers of standard output (the flusher and `flush`).
    output: Mutex<()>,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// The log is JSON (`[log] format = "json"`): the access line is written here directly.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says the log's format is JSON (set once by `telemetry::init`).
pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// `true` when the log is JSON and `write_line` may be used for a pre-formatted line.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Writes one complete, pre-formatted log line (with its newline), like a `tracing` event.
pub fn write_line(line: &[u8]) {
    let _ = BufferedStdout.write(line);
}

fn shared() -> &'static Shared {
    SHARED.get_or_init(|| Shared {
        buffer: Mutex::new(Vec::with_capacity(64 * 1024)),
        dropped: AtomicU64::new(0),
        flusher: OnceLock::new(),
        output: Mutex::new(()),
    })
}

/// The `tracing` writer: each `write` call is one formatted event (`tracing-subscriber`
/// formats a whole event, then writes it once).
#[derive(Clone, Copy, Default)]
pub struct BufferedStdout;

impl BufferedStdout {
    /// Starts the flusher thread (once). Lines written before it starts wait for it.
    pub fn start() -> io::Result<BufferedStdout> {
        let s = shared();
        if s.flusher.get().is_none() {
            let handle = std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(run)?;
            let _ = s.flusher.set(handle.thread().clone());
        }
        Ok(BufferedStdout)
    }
}

impl Write for BufferedStdout {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let s = shared();
        if append(s, line) {
            if let Some(t) = s.flusher.get() {
                t.unpark();
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BufferedStdout {
    type Writer = BufferedStdout;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Adds `line` to the buffer, or drops and counts it when the buffer is full. `true` when the
/// buffer was empty: the flusher must be woken.
fn append(s: &Shared, line: &[u8]) -> bool {
    // A poisoned lock only means another thread panicked mid-copy; the buffer holds whole
    // lines up to that copy at worst, so keep going.
    let mut buf = s.buffer.lock().unwrap_or_else(|p| p.into_inner());
    if buf.len() + line.len() > MAX_BUFFERED {
        s.dropped.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    let first = buf.is_empty();
    buf.extend_from_slice(line);
    first
}

/// Writes out everything buffered so far (blocking). Call at exit.
pub fn flush() {
    write_out(shared());
}

fn write_out(s: &Shared) {
    let _output = s.output.lock().unwrap_or_else(|p| p.into_inner());
    let batch = {
        let mut buf = s.buffer.lock().unwrap_or_else(|p| p.into_inner());
        if buf.is_empty() {
            return;
        }
        std::mem::replace(&mut *buf, Vec::with_capacity(64 * 1024))
    };
    let mut out = io::stdout().lock();
    // Output that cannot be written (closed pipe) has nowhere to report to; the lines are lost
    // and the gateway carries on.
    let _ = out.write_all(&batch);
    let dropped = s.dropped.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        let _ = writeln!(
            out,
            "{{\"level\":\"WARN\",\"target\":\"ssp_gateway::log\",\"message\":\"{dropped} log lines dropped: standard output was not keeping up\"}}"
        );
    }
    let _ = out.flush();
}

fn run() {
    let s = shared();
    loop {
        std::thread::park();
        // Let the lines of concurrent requests gather, then write them together.
        std::thread::sleep(FLUSH_DELAY);
        write_out(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_bound_are_dropped_and_counted_never_split() {
        let s = Shared {
            buffer: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            flusher: OnceLock::new(),
            output: Mutex::new(()),
        };
        let line = vec![b'x'; MAX_BUFFERED / 2 + 1];
        assert!(append(&s, &line), "the first line wakes the flusher");
        assert!(!append(&s, &line), "over the bound: dropped");
        assert!(!append(&s, b"short\n"), "a line that fits is kept");
        let buf = s.buffer.lock().expect("lock");
        assert_eq!(buf.len(), line.len() + 6);
        assert!(buf.ends_with(b"xshort\n"), "whole lines only");
        assert_eq!(s.dropped.load(Ordering::Relaxed), 1);
    }
}
