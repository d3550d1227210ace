//! The load generator's connections: TCP (no Nagle), the mTLS handshake with the client
//! certificate (never resumed, so each new connection is a full handshake), then HTTP/1.1 or
//! HTTP/2 over it, and sending one request while counting (not keeping) the response body.
//! Every failure is classified for the report and keeps its cause; whether a request may be
//! sent again is told from what reached the wire. Nothing here decides what to send or when.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::forward::error_chain;

/// Why a request got no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Failure {
    /// TCP connect failed.
    Connect,
    /// The TLS handshake failed, or the server sent a TLS alert after it (a client certificate
    /// refused under TLS 1.3 arrives as an alert on the first read).
    Tls,
    /// The HTTP exchange failed (connection reset or closed, protocol error).
    Http,
    /// The response body broke off.
    Body,
    /// No complete response within `--timeout`.
    Timeout,
}

impl Failure {
    /// Label in reports.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Tls => "tls",
            Failure::Http => "http",
            Failure::Body => "body",
            Failure::Timeout => "timeout",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A failure and its cause, put into words only when a report keeps it.
#[derive(Debug)]
pub struct Failed {
    pub kind: Failure,
    cause: Cause,
}

#[derive(Debug)]
enum Cause {
    Io(io::Error),
    Hyper(hyper::Error),
    /// A TLS error seen on the connection's reads or writes, already in words.
    Tls(String),
}

impl Failed {
    /// What went wrong, with every cause in the error's chain.
    pub fn message(&self) -> String {
        match &self.cause {
            Cause::Io(e) => error_chain(e),
            Cause::Hyper(e) => error_chain(e),
            Cause::Tls(text) => text.clone(),
        }
    }

    /// Whether only the request's HTTP/2 stream failed (RST_STREAM, REFUSED_STREAM included),
    /// not its connection: a GOAWAY, an I/O or TLS error ends the connection.
    pub fn stream_reset(&self) -> bool {
        match &self.cause {
            Cause::Hyper(e) => find::<h2::Error>(e).is_some_and(|h2| h2.is_reset()),
            Cause::Io(_) | Cause::Tls(_) => false,
        }
    }
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message())
    }
}

/// What a completed exchange returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    pub status: StatusCode,
    /// Response body bytes received.
    pub bytes: u64,
}

/// How to reach the server.
#[derive(Clone)]
pub struct Dialer {
    pub addr: SocketAddr,
    pub server_name: ServerName<'static>,
    pub tls: tokio_rustls::TlsConnector,
    pub http2: bool,
}

/// An open connection's request handle.
pub enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    /// Another handle on the same connection, when it can carry several requests at once
    /// (HTTP/2 streams); `None` for HTTP/1.1.
    pub fn share(&self) -> Option<Sender> {
        match self {
            Sender::H2(s) => Some(Sender::H2(s.clone())),
            Sender::H1(_) => None,
        }
    }

    /// Whether the connection is known to be closed (by either side).
    pub fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// What one connection's reads have seen, shared by its senders and its driver task.
#[derive(Debug, Default)]
pub struct Wire {
    /// Plaintext bytes read so far (response bytes: heads and bodies).
    read: AtomicU64,
    /// The first TLS error on the connection after its handshake (an alert from the server).
    tls_error: OnceLock<String>,
}

impl Wire {
    /// Plaintext bytes read so far.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    fn note(&self, e: &io::Error) {
        if e.get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            let _ = self.tls_error.get_or_init(|| e.to_string());
        }
    }

    /// A failure of `kind`, unless the connection saw a TLS error (then that, as `tls`).
    fn failed(&self, kind: Failure, cause: Cause) -> Failed {
        match self.tls_error.get() {
            Some(text) => Failed {
                kind: Failure::Tls,
                cause: Cause::Tls(text.clone()),
            },
            None => Failed { kind, cause },
        }
    }
}

/// A TLS stream that counts the plaintext bytes read and keeps the first TLS error.
struct Counted {
    inner: TlsStream<TcpStream>,
    wire: Arc<Wire>,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.wire.read.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(Err(e)) => this.wire.note(e),
            Poll::Pending => {}
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Err(e)) = &polled {
            this.wire.note(e);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Err(e)) = &polled {
            this.wire.note(e);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// An open connection ready to send requests.
pub struct Conn {
    pub sender: Sender,
    pub wire: Arc<Wire>,
}

impl Dialer {
    /// TCP connect and the TLS handshake.
    async fn tls(&self) -> Result<TlsStream<TcpStream>, Failed> {
        self.handshake(self.connect().await?).await
    }

    /// TCP connect, without Nagle.
    async fn connect(&self) -> Result<TcpStream, Failed> {
        let tcp = TcpStream::connect(self.addr).await.map_err(|e| Failed {
            kind: Failure::Connect,
            cause: Cause::Io(e),
        })?;
        // Best effort: a request still goes through with Nagle on, only slower.
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// The TLS handshake on a connected `tcp`.
    async fn handshake(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, Failed> {
        self.tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| Failed {
                kind: Failure::Tls,
                cause: Cause::Io(e),
            })
    }

    /// TCP connect, TLS handshake and the HTTP handshake; the connection is driven by a
    /// spawned task that ends when the last sender is dropped or the server closes.
    pub async fn open(&self) -> Result<Conn, Failed> {
        let wire = Arc::new(Wire::default());
        let io = TokioIo::new(Counted {
            inner: self.tls().await?,
            wire: wire.clone(),
        });
        let http = |e| Failed {
            kind: Failure::Http,
            cause: Cause::Hyper(e),
        };
        let sender = if self.http2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(http)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Sender::H2(sender)
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(http)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Sender::H1(sender)
        };
        Ok(Conn { sender, wire })
    }

    /// Whether `addr` answers: a TCP connection and a TLS handshake, closed with close_notify
    /// (a bare TCP connection would be a failed handshake in the server's metrics and logs).
    /// A handshake the server refuses still proves the address answers: the run reports it.
    pub async fn probe(&self, addr: SocketAddr, limit: Duration) -> Result<(), String> {
        let dialer = Dialer {
            addr,
            ..self.clone()
        };
        let deadline = tokio::time::Instant::now() + limit;
        let tcp = match tokio::time::timeout_at(deadline, dialer.connect()).await {
            Err(_) => return Err(format!("{addr}: connect timed out")),
            Ok(Err(failed)) => return Err(format!("{addr}: {}", failed.message())),
            Ok(Ok(tcp)) => tcp,
        };
        // A server that takes the TCP connection but never finishes the handshake (a port
        // forwarded to nothing, a TLS terminator whose backend is down) is unreachable too,
        // and said to be so.
        match tokio::time::timeout_at(deadline, dialer.handshake(tcp)).await {
            Err(_) => Err(format!(
                "{addr}: the TLS handshake timed out (the TCP connection was accepted)"
            )),
            Ok(Err(_)) => Ok(()),
            Ok(Ok(mut tls)) => {
                let _ = tokio::time::timeout(limit, tls.shutdown()).await;
                Ok(())
            }
        }
    }
}

/// Why a request got no response head, and whether it may be sent again on a new connection.
#[derive(Debug)]
pub struct SendError {
    pub failed: Failed,
    /// Nothing of the request was written: the connection was closed before it (found closed
    /// when the request was handed to it, or it gave the request back, or HTTP/2 refused the
    /// stream unprocessed).
    pub unsent: bool,
    /// The connection was already closed when the request came to it (a reconnect, not a
    /// retry).
    pub closed_before: bool,
    /// The connection ended (EOF or reset), rather than failing some other way.
    pub ended: bool,
}

/// Sends one request; the response head, or why there is none.
pub async fn send(
    sender: &mut Sender,
    wire: &Wire,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, SendError> {
    let ready = match sender {
        Sender::H1(s) => s.ready().await,
        Sender::H2(s) => s.ready().await,
    };
    if let Err(e) = ready {
        return Err(SendError {
            failed: wire.failed(Failure::Http, Cause::Hyper(e)),
            unsent: true,
            closed_before: true,
            ended: true,
        });
    }
    let sent = match sender {
        Sender::H1(s) => s.try_send_request(req).await,
        Sender::H2(s) => s.try_send_request(req).await,
    };
    sent.map_err(|mut e| {
        let unsent = e.take_message().is_some() || refused_unprocessed(e.error());
        let error = e.into_error();
        let ended = error.is_incomplete_message() || error.is_canceled() || ended_by_peer(&error);
        SendError {
            failed: wire.failed(Failure::Http, Cause::Hyper(error)),
            unsent,
            closed_before: false,
            ended,
        }
    })
}

/// Whether HTTP/2 says the server never processed the stream: REFUSED_STREAM, or a GOAWAY
/// from the server that left it out (RFC 9113 §8.7: safe to send again).
fn refused_unprocessed(e: &hyper::Error) -> bool {
    find::<h2::Error>(e).is_some_and(|h2| {
        h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote())
    })
}

/// Whether the error is the peer ending the connection: EOF, reset or a broken pipe.
fn ended_by_peer(e: &hyper::Error) -> bool {
    find::<io::Error>(e).is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        )
    })
}

/// The first error of type `T` in `e`'s chain.
fn find<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        next = err.source();
    }
    None
}

/// Whether the server said it closes the connection after this response: `Connection:
/// close`, or HTTP/1.0 without `Connection: keep-alive`.
pub fn closes_after(resp: &Response<Incoming>) -> bool {
    let has = |token: &str| {
        resp.headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, token))
    };
    has("close") || (resp.version() == Version::HTTP_10 && !has("keep-alive"))
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Reads the whole response body, counting its bytes.
pub async fn read_body(resp: Response<Incoming>, wire: &Wire) -> Result<Exchange, Failed> {
    let status = resp.status();
    let mut body = resp.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| wire.failed(Failure::Body, Cause::Hyper(e)))?;
        if let Some(data) = frame.data_ref() {
            bytes += data.len() as u64;
        }
    }
    Ok(Exchange { status, bytes })
}

/// Sends one request on `conn` and reads the whole response (setup and idle connections: no
/// second chance).
pub async fn exchange(conn: &mut Conn, req: Request<Full<Bytes>>) -> Result<Exchange, Failed> {
    let resp = send(&mut conn.sender, &conn.wire, req)
        .await
        .map_err(|e| e.failed)?;
    read_body(resp, &conn.wire).await
}

/// The client TLS config of a run: the consumer certificate, the CA, the ALPN protocol of the
/// chosen HTTP version, and no resumption (every new connection is a full handshake).
pub fn client_tls(
    tls: &crate::tls::ClientTls,
    http2: bool,
) -> Result<Arc<rustls::ClientConfig>, crate::tls::TlsProblems> {
    let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
    let config = crate::tls::client_config(tls, alpn)?;
    let mut config = Arc::unwrap_or_clone(config);
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_error_on_the_wire_makes_any_failure_a_tls_one() {
        let wire = Wire::default();
        let closed = || Cause::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        let plain = wire.failed(Failure::Http, closed());
        assert_eq!(plain.kind, Failure::Http);
        wire.note(&io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
        assert_eq!(
            wire.failed(Failure::Http, closed()).kind,
            Failure::Http,
            "an I/O error is no TLS error"
        );
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        wire.note(&io::Error::new(io::ErrorKind::InvalidData, alert));
        let failed = wire.failed(Failure::Http, closed());
        assert_eq!(failed.kind, Failure::Tls);
        assert!(failed.message().contains("CertificateRequired"), "{failed}");
    }

    #[test]
    fn messages_carry_the_whole_chain() {
        let inner = io::Error::other("inner cause");
        let outer = io::Error::other(Wrapped(inner));
        let failed = Failed {
            kind: Failure::Connect,
            cause: Cause::Io(outer),
        };
        assert_eq!(failed.message(), "wrapped: inner cause");
        assert_eq!(failed.to_string(), "connect: wrapped: inner cause");
    }

    #[derive(Debug)]
    struct Wrapped(io::Error);
    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
