//! What HTTP/1.1's own server bounds and hyper's HTTP/2 server does not: a connection with no
//! stream open for `header_read_timeout` (including one that never sent its preface) is closed,
//! and so is one whose client stopped accepting a response (flow-control window left at zero)
//! for `send_timeout`. Without them a client could hold a connection slot for ever, or, by
//! never opening its window, a provider connection and the response buffered for it.
//!
//! Each HTTP/2 connection has one [`Activity`]; each request holds a [`StreamGuard`] from the
//! moment it arrives until its response body is done or dropped, and the response body is
//! wrapped in a [`Watched`] body that notes when it handed a frame (or the response head) to
//! hyper and is not yet asked for the next: hyper asks for the next frame only once the client's window and the stream's
//! send buffer have room, so a frame not followed by a request for the next is one the client
//! is not taking. (A body waiting on the provider is waiting on the provider, not the client,
//! and is not counted.) The connection's task checks the activity once a second. A stream
//! the client stopped reading gets the connection a GOAWAY, and the streams it reads finish;
//! the connection is closed once only unread streams are left (for another send limit).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body, Frame, SizeHint};

/// One HTTP/2 connection's streams.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    /// Streams open: requests arrived whose response body is not done.
    open: AtomicUsize,
    /// When the last stream closed, or the connection started (ms since `started`).
    idle_since_ms: AtomicU64,
    /// Each response body's "handed a frame at" (ms since `started`, plus one; 0: not waiting
    /// on the client).
    sending: Mutex<Vec<Weak<AtomicU64>>>,
}

/// What the connection's task should do after a check.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Carry,
    /// No stream open for the idle limit: close gracefully (GOAWAY).
    Idle,
    /// A response frame not taken for the send limit on some streams, while others are open:
    /// the client stopped reading those (its window for them left shut). No new streams
    /// (GOAWAY); the others finish.
    PartlyStalled,
    /// Every open stream's response frame not taken for the send limit: the client stopped
    /// reading. Close.
    Stalled,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            started: Instant::now(),
            open: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            sending: Mutex::new(Vec::new()),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A request arrived: its stream is open until the guard (moved into its response body)
    /// is dropped.
    pub fn opened(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    /// Wraps a response body so a frame the client does not take is noticed. The response
    /// head counts as the first: hyper asks for the body's first frame only once the client's
    /// window has room, so a client that opens with a window of zero is seen too.
    pub fn watch<B>(&self, body: B, guard: StreamGuard) -> Watched<B> {
        let handed = Arc::new(AtomicU64::new(self.now_ms() + 1));
        let mut sending = self.sending.lock().unwrap_or_else(PoisonError::into_inner);
        sending.retain(|w| w.strong_count() > 0);
        sending.push(Arc::downgrade(&handed));
        Watched {
            body: Box::pin(body),
            handed,
            activity: guard,
        }
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Whether the connection should go on, be closed as idle, or as stalled.
    pub fn check(&self, idle_limit: Duration, send_limit: Duration) -> Verdict {
        let now = self.now_ms();
        let sending = self.sending.lock().unwrap_or_else(PoisonError::into_inner);
        let stalled = sending
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|handed| {
                let at = handed.load(Ordering::Acquire);
                at != 0 && now.saturating_sub(at - 1) >= send_limit.as_millis() as u64
            })
            .count();
        drop(sending);
        let open = self.open.load(Ordering::Acquire);
        if stalled > 0 {
            // A stream the client stopped reading holds its provider connection; those it
            // reads (or that wait on their provider) are bounded by their own timeouts.
            return if stalled >= open {
                Verdict::Stalled
            } else {
                Verdict::PartlyStalled
            };
        }
        let idle_for = now.saturating_sub(self.idle_since_ms.load(Ordering::Acquire));
        if open == 0 && idle_for >= idle_limit.as_millis() as u64 {
            return Verdict::Idle;
        }
        Verdict::Carry
    }
}

/// Holds one stream open (see [`Activity::opened`]).
#[derive(Debug)]
pub struct StreamGuard(Arc<Activity>);

impl StreamGuard {
    fn activity(&self) -> &Activity {
        &self.0
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since_ms
            .store(activity.now_ms(), Ordering::Release);
        activity.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body whose frames the connection's check can see waiting on the client.
pub struct Watched<B> {
    body: Pin<Box<B>>,
    handed: Arc<AtomicU64>,
    activity: StreamGuard,
}

impl<B: Body> Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        // Asked again: the last frame was taken.
        this.handed.store(0, Ordering::Release);
        let polled = this.body.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            let at = this.activity.activity().now_ms() + 1;
            this.handed.store(at, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn idle_only_with_no_stream_open_and_stalled_only_on_an_untaken_frame() {
        let activity = Activity::new();
        assert_eq!(activity.check(Duration::ZERO, LONG), Verdict::Idle);
        assert_eq!(activity.check(LONG, LONG), Verdict::Carry);

        let guard = activity.opened();
        assert_eq!(
            activity.check(Duration::ZERO, Duration::ZERO),
            Verdict::Carry,
            "a stream is open and nothing was handed yet"
        );
        let mut body = activity.watch(Full::new(Bytes::from_static(b"data")), guard);
        assert_eq!(
            activity.check(LONG, Duration::ZERO),
            Verdict::Stalled,
            "the head handed and the first frame not asked for (a window of zero)"
        );
        let frame = body.frame().await.expect("a frame").expect("ok");
        assert_eq!(frame.into_data().expect("data"), "data");
        assert_eq!(
            activity.check(Duration::ZERO, Duration::ZERO),
            Verdict::Stalled,
            "a frame handed and the next not asked for"
        );
        assert_eq!(activity.check(Duration::ZERO, LONG), Verdict::Carry);
        assert!(
            body.frame().await.is_none(),
            "asked again: taken, and ended"
        );
        assert_eq!(
            activity.check(LONG, Duration::ZERO),
            Verdict::Carry,
            "nothing waits on the client"
        );
        drop(body);
        assert_eq!(
            activity.check(Duration::ZERO, Duration::ZERO),
            Verdict::Idle
        );
        // Two streams, one of them not read: partly stalled until the other is done.
        let read = activity.watch(Full::new(Bytes::from_static(b"a")), activity.opened());
        let unread = activity.watch(Full::new(Bytes::from_static(b"b")), activity.opened());
        let mut read = read;
        // Its frame taken, and asked for the next (its end).
        let _ = read.frame().await;
        assert!(read.frame().await.is_none());
        assert_eq!(
            activity.check(LONG, Duration::ZERO),
            Verdict::PartlyStalled,
            "one stream's frame not taken, the other's taken"
        );
        drop(read);
        assert_eq!(activity.check(LONG, Duration::ZERO), Verdict::Stalled);
        drop(unread);
        assert_eq!(activity.check(LONG, Duration::ZERO), Verdict::Carry);
    }
}
