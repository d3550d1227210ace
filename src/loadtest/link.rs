//! One of a run's `--connections` as its workers see it: the connection while it is open
//! (HTTP/2 streams share it; a new one replaces it once, for all of them, when it closes; a
//! stream reset alone leaves it open to the others), the
//! back-off after a failure that closed it, and the one second chance a request gets when a
//! reused connection closed under it: not sent at all, or (HTTP/1.1) an idempotent request
//! (GET, PUT) that got no byte of answer before the connection closed (RFC 9110 §9.2.2); never
//! a POST that may have been processed. Owns no statistics: it tells the worker what happened
//! ([`Notes`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::sync::Mutex;
use tokio::time::{sleep_until, Instant};

use super::conn::{self, Dialer, Exchange, Failed, Failure, Sender, Wire};

/// The first pause after a failure that closed the connection; it doubles with each failure
/// in a row, up to [`MAX_BACKOFF`], and is forgotten after a response.
pub(super) const MIN_BACKOFF: Duration = Duration::from_millis(20);
/// The longest pause between two connection attempts of one link.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What happened to a request on its way, beyond its outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Notes {
    /// New connections opened for it to replace one that had closed.
    pub reconnects: u32,
    /// It was sent again on a new connection after the reused one closed under it: not sent
    /// at all, or (HTTP/1.1) an idempotent request (GET, PUT) that got no byte of answer before
    /// the connection closed (RFC 9110 §9.2.2); never a POST that may have been processed.
    pub retried: bool,
}

/// Why an exchange brought no response.
#[derive(Debug)]
pub(super) enum Missed {
    /// The request failed (sent or not).
    Failed(Failed),
    /// The run's end came during the pause before the connection attempt (another stream's
    /// failure started it after this request was taken): the request was not sent.
    Ended,
}

/// A connection slot.
pub(super) struct Link {
    state: Mutex<State>,
    /// New-connection mode: every request opens its own connection, never kept.
    fresh_each: bool,
    /// HTTP/2: a request abandoned at its timeout resets its stream, not the connection.
    http2: bool,
}

struct State {
    /// The open connection. For HTTP/1.1 it is out (with its one worker) while a request is
    /// on it.
    open: Option<Open>,
    /// Bumped each time the connection is given up, so that of several streams failing on one
    /// connection only the first closes it (and backs off).
    generation: u64,
    backoff: Duration,
    /// No connection attempt before this.
    retry_after: Option<Instant>,
    /// Connections opened so far.
    opened: u64,
}

struct Open {
    sender: Sender,
    wire: Arc<Wire>,
}

/// A connection lent to one request.
struct Lease {
    sender: Sender,
    wire: Arc<Wire>,
    generation: u64,
    /// The connection was open before this request (not opened for it).
    reused: bool,
}

/// How a request left its connection.
enum After {
    /// Usable for the next request.
    Keep,
    /// The server closed it (or said it will): open another, without a pause.
    Closed,
    /// A failure closed it: pause before the next attempt.
    Failed,
    /// Only its HTTP/2 stream failed (reset); the connection stays for the other streams.
    StreamFailed,
}

impl Link {
    pub(super) fn new(fresh_each: bool, http2: bool) -> Link {
        Link {
            state: Mutex::new(State {
                open: None,
                generation: 0,
                backoff: Duration::ZERO,
                retry_after: None,
                opened: 0,
            }),
            fresh_each,
            http2,
        }
    }

    /// Until when the link is pausing after a failure, if it is.
    pub(super) async fn paused_until(&self) -> Option<Instant> {
        let state = self.state.lock().await;
        state.retry_after.filter(|&t| t > Instant::now())
    }

    /// The current pause after a failure (zero after a response).
    #[cfg(test)]
    async fn backoff(&self) -> Duration {
        self.state.lock().await.backoff
    }

    /// Sends one request (built by `build`, again if it is sent a second time) and reads its
    /// response, opening a connection when none is open. A request gets a second connection,
    /// once, only when the reused one closed under it and it was not sent at all, or (HTTP/1.1)
    /// it is an idempotent request (GET, PUT) that got no byte of answer before the connection
    /// closed (RFC 9110 §9.2.2); never a POST that may have been processed: a booking's POST
    /// that got no byte of answer is a failure, never sent again.
    /// A pause before the connection attempt that lasts until `end` sends nothing
    /// ([`Missed::Ended`]; on the second chance, the first attempt's failure stands).
    pub(super) async fn exchange(
        &self,
        dialer: &Dialer,
        build: impl Fn() -> Request<Full<Bytes>>,
        end: Instant,
        notes: &mut Notes,
    ) -> Result<Exchange, Missed> {
        let mut first_failure: Option<Failed> = None;
        loop {
            let mut lease = match self.checkout(dialer, end, notes).await {
                Ok(lease) => lease,
                Err(Missed::Ended) => {
                    return Err(first_failure.map_or(Missed::Ended, Missed::Failed))
                }
                Err(missed) => return Err(missed),
            };
            let read_before = lease.wire.read();
            let req = build();
            let idempotent = req.method().is_idempotent();
            match conn::send(&mut lease.sender, &lease.wire, req).await {
                Ok(resp) => {
                    let closing = conn::closes_after(&resp);
                    let result = conn::read_body(resp, &lease.wire).await;
                    let after = match (&result, closing) {
                        (Err(failed), _) if self.stream_only(&lease, failed) => After::StreamFailed,
                        (Err(_), _) => After::Failed,
                        (Ok(_), true) => After::Closed,
                        (Ok(_), false) => After::Keep,
                    };
                    self.give_back(lease, after).await;
                    return result.map_err(Missed::Failed);
                }
                Err(e) => {
                    let h1 = matches!(lease.sender, Sender::H1(_));
                    let never_had_it = e.unsent
                        || (h1
                            && idempotent
                            && e.ended
                            && lease.wire.read() == read_before
                            && !tls(&e.failed));
                    let stream_only = self.stream_only(&lease, &e.failed);
                    let second_chance = first_failure.is_none();
                    if lease.reused && never_had_it && second_chance && !self.fresh_each {
                        if !e.closed_before {
                            notes.retried = true;
                        }
                        let after = if stream_only {
                            After::StreamFailed
                        } else {
                            After::Closed
                        };
                        self.give_back(lease, after).await;
                        first_failure = Some(e.failed);
                        continue;
                    }
                    let after = if stream_only {
                        After::StreamFailed
                    } else {
                        After::Failed
                    };
                    self.give_back(lease, after).await;
                    return Err(Missed::Failed(e.failed));
                }
            }
        }
    }

    /// Whether a failure was of the request's HTTP/2 stream alone, on a shared connection that
    /// is still open: the other streams keep it, and no pause follows.
    fn stream_only(&self, lease: &Lease, failed: &Failed) -> bool {
        self.http2 && !self.fresh_each && failed.stream_reset() && !lease.sender.is_closed()
    }

    /// A request on the link was abandoned at its timeout. Over HTTP/1.1, and in new-connection
    /// mode over either protocol, its connection went with it (a pause follows, as after any
    /// failure that closes one); a keep-alive HTTP/2 stream is reset and the connection stays.
    pub(super) async fn abandoned(&self) {
        let mut state = self.state.lock().await;
        if !self.http2 || self.fresh_each {
            state.open = None;
            state.generation += 1;
            state.pause();
        }
    }

    /// The open connection, or a new one (after any pause another stream's failure started;
    /// none when that pause lasts until `end`).
    async fn checkout(
        &self,
        dialer: &Dialer,
        end: Instant,
        notes: &mut Notes,
    ) -> Result<Lease, Missed> {
        let mut state = self.state.lock().await;
        if let Some(open) = state.open.take() {
            if !open.sender.is_closed() {
                let wire = open.wire.clone();
                // An HTTP/2 connection stays for the other streams; an HTTP/1.1 one goes out
                // with its request.
                let sender = match open.sender.share() {
                    Some(stream) => {
                        state.open = Some(open);
                        stream
                    }
                    None => open.sender,
                };
                return Ok(Lease {
                    sender,
                    wire,
                    generation: state.generation,
                    reused: true,
                });
            }
            // The server closed it while it was idle.
            state.generation += 1;
        }
        if let Some(at) = state.retry_after.filter(|&t| t > Instant::now()) {
            if at >= end {
                return Err(Missed::Ended);
            }
            sleep_until(at).await;
        }
        match dialer.open().await {
            Ok(conn) => {
                if state.opened > 0 && !self.fresh_each {
                    notes.reconnects += 1;
                }
                state.opened += 1;
                let wire = conn.wire.clone();
                let sender = match conn.sender.share() {
                    Some(stream) if !self.fresh_each => {
                        state.open = Some(Open {
                            sender: conn.sender,
                            wire: conn.wire,
                        });
                        stream
                    }
                    _ => conn.sender,
                };
                Ok(Lease {
                    sender,
                    wire,
                    generation: state.generation,
                    reused: false,
                })
            }
            Err(failed) => {
                state.pause();
                Err(Missed::Failed(failed))
            }
        }
    }

    async fn give_back(&self, lease: Lease, after: After) {
        let mut state = self.state.lock().await;
        match after {
            After::Keep => {
                state.backoff = Duration::ZERO;
                state.retry_after = None;
                if !self.fresh_each && state.open.is_none() && lease.generation == state.generation
                {
                    state.open = Some(Open {
                        sender: lease.sender,
                        wire: lease.wire,
                    });
                }
            }
            After::Closed | After::Failed if lease.generation == state.generation => {
                if let After::Closed = after {
                    state.backoff = Duration::ZERO;
                    state.retry_after = None;
                } else {
                    state.pause();
                }
                state.open = None;
                state.generation += 1;
            }
            // Another stream already gave this connection up, or only this stream failed.
            After::Closed | After::Failed | After::StreamFailed => {}
        }
    }
}

impl State {
    /// Starts (or lengthens) the pause before the next connection attempt.
    fn pause(&mut self) {
        self.backoff = (self.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
        self.retry_after = Some(Instant::now() + self.backoff);
    }
}

fn tls(failed: &Failed) -> bool {
    failed.kind == Failure::Tls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_double_the_pause_up_to_a_second() {
        let link = Link::new(false, false);
        let mut pauses = Vec::new();
        for _ in 0..8 {
            link.abandoned().await;
            pauses.push(link.backoff().await);
        }
        let ms: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [20, 40, 80, 160, 320, 640, 1000, 1000]);
        let until = link.paused_until().await.expect("pausing");
        assert_eq!(until - Instant::now(), MAX_BACKOFF);
        tokio::time::advance(MAX_BACKOFF).await;
        assert_eq!(link.paused_until().await, None, "over once it has passed");
    }

    /// A dialer to a port nothing listens on: any attempt is a `connect` failure.
    fn refused() -> Dialer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("default versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Dialer {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            server_name: "localhost".try_into().expect("a server name"),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            http2: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_that_lasts_until_the_end_sends_nothing() {
        let dialer = refused();
        let build = || Request::new(Full::new(Bytes::new()));
        let link = Link::new(false, false);
        link.abandoned().await;
        let mut notes = Notes::default();
        let end = Instant::now() + MIN_BACKOFF / 2;
        let missed = link.exchange(&dialer, build, end, &mut notes).await;
        assert!(matches!(missed, Err(Missed::Ended)), "{missed:?}");
        assert_eq!(
            Instant::now() + MIN_BACKOFF / 2,
            end,
            "no wait for the pause"
        );

        let end = Instant::now() + MIN_BACKOFF * 2;
        let missed = link.exchange(&dialer, build, end, &mut notes).await;
        let Err(Missed::Failed(failed)) = missed else {
            panic!("a pause over before the end, then an attempt: {missed:?}");
        };
        assert_eq!(failed.kind, Failure::Connect);
    }
}
