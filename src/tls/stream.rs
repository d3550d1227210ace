//! The server side of TLS on rustls' unbuffered API, so that an idle connection holds no buffer.
//!
//! rustls' buffered `ServerConnection` (what tokio-rustls drives) keeps a 4 KiB receive buffer
//! for the whole life of a connection: 40 MB for 10,000 idle connections, before anything else.
//! Here the three buffers are ours: the TLS bytes received and not yet processed, the decrypted
//! bytes not yet read, and the TLS bytes not yet sent. Each is allocated when there is something
//! to hold and given back when it is empty and the connection waits: when the socket has nothing
//! more to read, when the caller flushes, or when the caller says it is going idle
//! ([`ServerStream::release`]).
//!
//! rustls runs the handshake; after it the records are sealed and opened by our own record
//! layer ([`super::records`]), which lets an idle connection drop its expanded keys too, and
//! the client's certificate chain is handed to the caller ([`Handshaken`]) instead of being kept.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, ReadTraffic, WriteTraffic,
};
use rustls::{CipherSuite, HandshakeKind, ProtocolVersion, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::records::{self, capture, Records, Version};

/// The receive buffer's first size: a request head and its record fit in one read.
const FIRST_READ: usize = 4 * 1024;
/// Received bytes held at most. A handshake message may span records up to 64 KiB (rustls'
/// limit), and the record that completes it may be a whole one (16 KiB plus expansion).
const MAX_INCOMING: usize = 0x1_0000 + 5 + 16 * 1024 + 2048;
/// Plaintext taken by one write: a large body is encrypted and sent a piece at a time.
const WRITE_CHUNK: usize = 64 * 1024;
/// Encrypted bytes queued before a write waits for the socket to take them.
const WRITE_QUEUE: usize = 64 * 1024;

/// What the handshake settled, for the caller to read once: the client's certificate chain is
/// handed over here rather than kept for the life of the connection.
#[derive(Debug)]
pub struct Handshaken {
    /// The client's certificates, leaf first (empty if it sent none).
    pub peer_certificates: Vec<CertificateDer<'static>>,
    /// The protocol ALPN chose.
    pub alpn: Option<Vec<u8>>,
    pub version: Option<ProtocolVersion>,
    pub suite: Option<CipherSuite>,
    pub kind: Option<HandshakeKind>,
}

/// Completes a TLS handshake as the server on `io` and returns the stream, its record layer
/// taken over from rustls ([`records`]), and what the handshake settled.
///
/// Errors are `io::Error`s carrying the `rustls::Error` (as tokio-rustls' are), so
/// [`super::HandshakeFailure::classify`] reads them; the alert that explains a refusal is sent
/// before the error is returned.
pub async fn accept<IO>(
    config: Arc<ServerConfig>,
    io: IO,
) -> io::Result<(ServerStream<IO>, Handshaken)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let tickets = config.send_tls13_tickets > 0;
    let conn = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
    let mut stream = ServerStream {
        io,
        tls: Tls::Handshake(Box::new(Handshaking {
            conn,
            caught: capture::Caught::default(),
        })),
        incoming: Window::default(),
        plain: Plain::default(),
        outgoing: Window::default(),
        peer_closed: false,
        eof: false,
        close_queued: false,
        failed: false,
        deferred: None,
    };
    poll_fn(|cx| stream.poll_handshake(cx)).await?;
    let handshaken = stream.take_over(tickets)?;
    // What the takeover queued (rarely anything) goes now, so the buffer can be released.
    poll_fn(|cx| stream.poll_send(cx)).await?;
    stream.release();
    Ok((stream, handshaken))
}

/// A server-side TLS stream (see the module documentation). It is driven from one task (a read
/// may wait for the socket to take our queued answers, on the same task's write waker); it is
/// never split across tasks.
pub struct ServerStream<IO> {
    io: IO,
    tls: Tls,
    /// TLS bytes received and not yet processed.
    incoming: Window,
    plain: Plain,
    /// TLS bytes not yet sent.
    outgoing: Window,
    /// The peer's close_notify arrived: reads end once `plain` is drained.
    peer_closed: bool,
    /// The transport's read side ended.
    eof: bool,
    /// Our close_notify is queued; nothing more may be written.
    close_queued: bool,
    /// The connection failed (its alert is queued): records are never processed again, as the
    /// same bad bytes would meet the same failure and alert twice.
    failed: bool,
    /// The failure, held back until the data that arrived before it has been read.
    deferred: Option<io::Error>,
}

/// Who keeps the connection's TLS state. (The record layer is held inline: it is the state for
/// the connection's life, and the stream is boxed as a whole; the handshake is boxed because
/// it is dropped at its end.)
#[allow(clippy::large_enum_variant)]
enum Tls {
    /// rustls, until the handshake completes.
    Handshake(Box<Handshaking>),
    /// Our record layer, after.
    Records(Records),
    /// Nobody: taking over from rustls failed.
    Gone,
}

struct Handshaking {
    conn: UnbufferedServerConnection,
    /// The TLS 1.3 traffic secrets, once rustls has reported them.
    caught: capture::Caught,
}

/// Where the connection stands once the work it can do without more input is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stand {
    /// Application data may flow.
    Open,
    /// The handshake needs more bytes from the peer.
    Handshaking,
    /// Both close_notify alerts have been exchanged.
    Closed,
}

/// What to encrypt once application data may be sent.
enum Outbound<'a> {
    Nothing,
    Data(&'a [IoSlice<'a>]),
    CloseNotify,
}

impl<IO> ServerStream<IO> {
    /// The transport.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Whether a read can make progress without the transport: decrypted bytes not yet read, or
    /// received bytes not yet processed. When this is false, waiting for the socket to become
    /// readable is the way to wait for the next read.
    pub fn buffered(&self) -> bool {
        !self.plain.is_empty() || !self.incoming.is_empty()
    }

    /// The bytes this stream's own buffers hold allocated (what an idle connection should not).
    #[cfg(test)]
    pub(crate) fn allocated(&self) -> usize {
        self.incoming.buf.capacity() + self.plain.buf.capacity() + self.outgoing.buf.capacity()
    }

    /// Whether the record layer holds no expanded AEAD context (what an idle connection
    /// should not hold either).
    #[cfg(test)]
    pub(crate) fn keys_released(&self) -> bool {
        matches!(&self.tls, Tls::Records(r) if r.released())
    }

    /// Gives back every buffer that holds nothing, and the record layer's expanded AEAD
    /// contexts: call it when the connection goes idle.
    pub fn release(&mut self) {
        self.plain.release();
        self.incoming.release();
        self.outgoing.release();
        if let Tls::Records(records) = &mut self.tls {
            records.release();
        }
    }

    /// The handshake is complete: what it settled, and rustls' connection replaced by our
    /// record layer with its keys.
    fn take_over(&mut self, tickets: bool) -> io::Result<Handshaken> {
        let Tls::Handshake(hs) = std::mem::replace(&mut self.tls, Tls::Gone) else {
            return Err(io::Error::other("the TLS handshake was already taken over"));
        };
        let Handshaking { conn, caught } = *hs;
        let handshaken = Handshaken {
            peer_certificates: conn
                .peer_certificates()
                .map(<[_]>::to_vec)
                .unwrap_or_default(),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            version: conn.protocol_version(),
            suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
            kind: conn.handshake_kind(),
        };
        let version = match handshaken.version {
            Some(ProtocolVersion::TLSv1_3) => Version::Tls13,
            Some(ProtocolVersion::TLSv1_2) => Version::Tls12,
            other => {
                self.failed = true;
                return Err(io::Error::other(format!(
                    "TLS version {other:?} is not one this gateway offers"
                )));
            }
        };
        let suite = handshaken.suite.unwrap_or(CipherSuite::Unknown(0));
        let records = conn
            .dangerous_into_kernel_connection()
            .and_then(|(secrets, _kernel)| {
                Records::new(
                    version,
                    suite,
                    secrets,
                    caught.client.as_deref(),
                    caught.server.as_deref(),
                    tickets,
                )
            });
        match records {
            Ok((records, first)) => {
                self.tls = Tls::Records(records);
                if !first.is_empty() {
                    self.outgoing.append(|out| out.extend_from_slice(&first));
                }
                Ok(handshaken)
            }
            Err(e) => {
                self.failed = true;
                Err(io::Error::other(e))
            }
        }
    }

    /// Runs the TLS state machine over what has been received until it needs more input, has
    /// sent (queued) what `send` asked for, or has reached the end. Returns where it stands and
    /// how many bytes of `send`'s data were taken.
    fn process(&mut self, send: Outbound<'_>) -> io::Result<(Stand, usize)> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the TLS connection failed earlier",
            ));
        }
        match self.tls {
            Tls::Handshake(_) => {
                let armed = capture::arm();
                let result = self.process_handshake(send);
                if let (Some(caught), Tls::Handshake(hs)) = (armed.disarm(), &mut self.tls) {
                    hs.caught.merge(caught);
                }
                result
            }
            Tls::Records(_) => self.process_records(send),
            Tls::Gone => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the TLS connection failed earlier",
            )),
        }
    }

    /// [`Self::process`] after the handshake: opens the whole records received, seals what
    /// must precede our data (a key update's answer), then what `send` asks for.
    fn process_records(&mut self, send: Outbound<'_>) -> io::Result<(Stand, usize)> {
        let Tls::Records(rec) = &mut self.tls else {
            return Err(io::Error::other("no TLS record layer"));
        };
        // Shutting down opens nothing more: our close_notify is what remains to send.
        let closing = matches!(send, Outbound::CloseNotify);
        if !self.peer_closed && !closing && !self.incoming.is_empty() {
            let plain = &mut self.plain;
            match rec.open(self.incoming.window(), |data| plain.push(data)) {
                Ok(opened) => {
                    self.incoming.consume(opened.consumed);
                    self.peer_closed |= opened.closed;
                }
                Err(records::Fatal { error, alert }) => {
                    self.failed = true;
                    // Nothing follows our close_notify, not even an alert.
                    if let (Some(alert), false) = (alert, self.close_queued) {
                        let _ = self.outgoing.append(|out| rec.seal_fatal(alert, out));
                    }
                    return Err(invalid_data(error));
                }
            }
        }
        // After our close_notify (queued before `process(CloseNotify)` runs) only it is sealed;
        // a read with nothing pending to answer seals nothing, and takes no send buffer.
        let sealed = match send {
            Outbound::CloseNotify => self
                .outgoing
                .append(|out| rec.seal_close_notify(out).map(|()| 0)),
            _ if self.close_queued => Ok(0),
            Outbound::Nothing if !rec.pending() => Ok(0),
            Outbound::Nothing => self
                .outgoing
                .append(|out| rec.seal_pending(out).map(|()| 0)),
            Outbound::Data(bufs) => self.outgoing.append(|out| {
                rec.seal_pending(out)?;
                rec.seal_gathered(bufs, WRITE_CHUNK, out)
            }),
        };
        match sealed {
            Ok(taken) => {
                let stand = if self.peer_closed && self.close_queued {
                    Stand::Closed
                } else {
                    Stand::Open
                };
                Ok((stand, taken))
            }
            Err(e) => {
                self.failed = true;
                Err(invalid_data(e))
            }
        }
    }

    /// [`Self::process`] during the handshake, by rustls.
    fn process_handshake(&mut self, mut send: Outbound<'_>) -> io::Result<(Stand, usize)> {
        let mut taken = 0;
        loop {
            let Tls::Handshake(hs) = &mut self.tls else {
                return Err(io::Error::other("the TLS handshake is over"));
            };
            let status = hs.conn.process_tls_records(self.incoming.window());
            let mut discard = status.discard;
            let outcome: io::Result<Option<Stand>> = match status.state {
                Err(e) => Err(invalid_data(e)),
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    take_records(&mut traffic, &mut self.plain, &mut discard).map(|()| None)
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(&mut encode, &mut self.outgoing).map(|()| None)
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    // What was encoded is queued in `outgoing`, ahead of anything encoded later,
                    // and goes out with the next send: the order on the wire is kept.
                    transmit.done();
                    Ok(None)
                }
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    match std::mem::replace(&mut send, Outbound::Nothing) {
                        Outbound::Nothing => Ok(Some(Stand::Open)),
                        Outbound::Data(bufs) => {
                            let mut outcome = Ok(Some(Stand::Open));
                            for buf in bufs {
                                let n = buf.len().min(WRITE_CHUNK - taken);
                                if n == 0 {
                                    continue;
                                }
                                if let Err(e) =
                                    encrypt_into(&mut traffic, &buf[..n], &mut self.outgoing)
                                {
                                    outcome = Err(e);
                                    break;
                                }
                                taken += n;
                            }
                            outcome
                        }
                        Outbound::CloseNotify => {
                            close_notify_into(&mut traffic, &mut self.outgoing)
                                .map(|()| Some(Stand::Open))
                        }
                    }
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Some(Stand::Handshaking)),
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    Ok(None)
                }
                Ok(ConnectionState::Closed) => {
                    self.peer_closed = true;
                    Ok(Some(Stand::Closed))
                }
                Ok(ConnectionState::ReadEarlyData(_)) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS early data, which this server never accepts",
                )),
                Ok(other) => Err(io::Error::other(format!(
                    "TLS connection state {other:?} is not handled"
                ))),
            };
            self.incoming.consume(discard);
            match outcome {
                Ok(Some(stand)) => return Ok((stand, taken)),
                // Once the handshake is over and rustls has nothing to send, the records still
                // to come are our layer's: rustls is not asked to follow more of them (it would
                // follow KeyUpdates past what the takeover can catch up with).
                Ok(None)
                    if matches!(&self.tls, Tls::Handshake(hs)
                    if !hs.conn.is_handshaking() && !hs.conn.wants_write()) =>
                {
                    return Ok((Stand::Open, taken));
                }
                Ok(None) => {}
                Err(e) => {
                    self.failed = true;
                    self.queue_alert();
                    return Err(e);
                }
            }
        }
    }

    /// After an error in the handshake: queues the alert rustls prepared, so the peer learns
    /// why.
    ///
    /// rustls hands out what it has queued before it looks at the received bytes again, so
    /// asking only while it has something queued never makes it process the bad bytes twice.
    fn queue_alert(&mut self) {
        // The bound only guards against a state machine that keeps asking.
        for _ in 0..8 {
            let Tls::Handshake(hs) = &mut self.tls else {
                return;
            };
            if !hs.conn.wants_write() {
                break;
            }
            let status = hs.conn.process_tls_records(self.incoming.window());
            let mut discard = status.discard;
            let go_on = match status.state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(&mut encode, &mut self.outgoing).is_ok()
                }
                // Data that arrived before the failure stays readable.
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    take_records(&mut traffic, &mut self.plain, &mut discard).is_ok()
                }
                _ => false,
            };
            self.incoming.consume(discard);
            if !go_on {
                break;
            }
        }
    }

    /// Whether rustls still runs the handshake.
    fn is_handshaking(&self) -> bool {
        matches!(&self.tls, Tls::Handshake(hs) if hs.conn.is_handshaking())
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ServerStream<IO> {
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let stand = match self.process(Outbound::Nothing) {
                Ok((stand, _)) => stand,
                Err(e) => {
                    // Best effort: the alert goes if the socket takes it now.
                    let _ = self.poll_send(cx);
                    return Poll::Ready(Err(e));
                }
            };
            ready!(self.poll_send(cx))?;
            // In TLS 1.3 the server may send before the client's certificate has arrived; the
            // handshake is done only when both directions are open.
            if !self.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if stand == Stand::Closed || self.peer_closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                )));
            }
            if self.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection ended during the TLS handshake",
                )));
            }
            ready!(self.poll_fill(cx))?;
        }
    }

    /// Reads from the transport into the receive buffer (setting `eof` at its end).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let room = self.incoming.room_to_read()?;
        let mut read = ReadBuf::new(room);
        match Pin::new(&mut self.io).poll_read(cx, &mut read) {
            Poll::Pending => {
                // Waiting on the peer: hold no empty buffer meanwhile.
                self.incoming.release();
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    self.eof = true;
                } else {
                    self.incoming.commit(n);
                }
                Poll::Ready(Ok(()))
            }
        }
    }

    /// Ready once the send queue is under its limit ([`WRITE_QUEUE`]): past it, the socket
    /// must take some of it first.
    fn poll_queue_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.outgoing.len() >= WRITE_QUEUE {
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if self.outgoing.len() >= WRITE_QUEUE {
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the queued TLS bytes until none are left (ready) or the transport is full.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.outgoing.window()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.consume(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.plain.read_into(buf) {
                return Poll::Ready(Ok(()));
            }
            // An error met after data that arrived ahead of it: the data has been read.
            if let Some(e) = this.deferred.take() {
                return Poll::Ready(Err(e));
            }
            // Back-pressure on the read side too: a peer that sends what must be answered (key
            // updates) and never reads our answers is not read from until it does.
            ready!(this.poll_queue_room(cx))?;
            match this.process(Outbound::Nothing) {
                Ok(_) => {}
                Err(e) => {
                    let _ = this.poll_send(cx);
                    if this.plain.is_empty() {
                        return Poll::Ready(Err(e));
                    }
                    // Data that arrived before the failure is read first.
                    this.deferred = Some(e);
                    continue;
                }
            }
            // Anything processing produced (a key update's answer) goes now if it can; a full
            // socket does not hold up the read.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if !this.plain.is_empty() {
                continue;
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without sending a TLS close_notify",
                )));
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_queued {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the TLS close_notify",
            )));
        }
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        ready!(this.poll_queue_room(cx))?;
        let (stand, taken) = match this.process(Outbound::Data(bufs)) {
            Ok(done) => done,
            Err(e) => {
                // Best effort: the alert that explains it goes if the socket takes it now.
                let _ = this.poll_send(cx);
                return Poll::Ready(Err(e));
            }
        };
        if stand != Stand::Open || taken == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection is closed",
            )));
        }
        // Send now if the socket takes it; what it does not take goes with the next write or
        // the flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        this.outgoing.release();
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            this.close_queued = true;
            // A connection already broken has no close_notify to send; the transport still
            // closes.
            if let Err(e) = this.process(Outbound::CloseNotify) {
                tracing::debug!(error = %e, "no TLS close_notify sent");
            }
        }
        ready!(this.poll_send(cx))?;
        this.release();
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

fn invalid_data<E>(e: E) -> io::Error
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Why a write into a [`Window`] did not happen.
enum Unwritten {
    /// It needs this much room.
    Room(usize),
    /// There was nothing (left) to write.
    Nothing,
    Failed(io::Error),
}

impl From<EncodeError> for Unwritten {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Unwritten::Room(required_size)
            }
            // Encoded by an earlier call.
            EncodeError::AlreadyEncoded => Unwritten::Nothing,
        }
    }
}

impl From<EncryptError> for Unwritten {
    fn from(e: EncryptError) -> Self {
        match e {
            EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Unwritten::Room(required_size)
            }
            e @ EncryptError::EncryptExhausted => Unwritten::Failed(io::Error::other(e)),
        }
    }
}

/// Lets `write` put bytes after what `out` holds, offering `need` bytes of room first and then
/// as much as it says it needs.
fn write_into(
    out: &mut Window,
    mut need: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Unwritten>,
) -> io::Result<()> {
    loop {
        match write(out.room_for(need)) {
            Ok(n) => {
                out.commit(n);
                return Ok(());
            }
            Err(Unwritten::Room(required)) => need = required,
            Err(Unwritten::Nothing) => return Ok(()),
            Err(Unwritten::Failed(e)) => return Err(e),
        }
    }
}

fn encode_into<Data>(
    encode: &mut rustls::unbuffered::EncodeTlsData<'_, Data>,
    out: &mut Window,
) -> io::Result<()> {
    write_into(out, 1024, |room| Ok(encode.encode(room)?))
}

fn encrypt_into<Data>(
    traffic: &mut WriteTraffic<'_, Data>,
    data: &[u8],
    out: &mut Window,
) -> io::Result<()> {
    let need = data.len() + (data.len() / records::MAX_FRAGMENT + 1) * RECORD_OVERHEAD;
    write_into(out, need, |room| Ok(traffic.encrypt(data, room)?))
}

fn close_notify_into<Data>(
    traffic: &mut WriteTraffic<'_, Data>,
    out: &mut Window,
) -> io::Result<()> {
    write_into(out, RECORD_OVERHEAD, |room| {
        Ok(traffic.queue_close_notify(room)?)
    })
}

/// Moves the decrypted records into `plain`, adding what they free of the received bytes to
/// `discard`.
fn take_records<Data>(
    traffic: &mut ReadTraffic<'_, '_, Data>,
    plain: &mut Plain,
    discard: &mut usize,
) -> io::Result<()> {
    while let Some(record) = traffic.next_record() {
        let record = record.map_err(invalid_data)?;
        *discard += record.discard;
        plain.push(record.payload);
    }
    Ok(())
}

/// A record's overhead (header, explicit nonce, content type, tag), bounded above for every
/// suite rustls offers; only a first guess at the room rustls' encryption needs.
const RECORD_OVERHEAD: usize = 64;

/// TLS bytes held in `buf[start..end]`: received and not yet processed, or encoded and not yet
/// sent. All of `buf` is initialised, so reads and encryption go straight into it; it is zeroed
/// only where it grows.
#[derive(Default)]
struct Window {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Window {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    /// The bytes held.
    fn window(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    /// Drops `n` bytes (processed or sent) from the front.
    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Keeps the `n` bytes just written into the room after what is held.
    fn commit(&mut self, n: usize) {
        self.end += n;
    }

    /// Room for the next read from the transport: after the held bytes, moving them to the
    /// front or growing the buffer (doubling, up to [`MAX_INCOMING`]) when there is none.
    fn room_to_read(&mut self) -> io::Result<&mut [u8]> {
        if self.buf.is_empty() {
            self.buf = spare::take();
            if self.buf.len() < FIRST_READ {
                self.buf.resize(FIRST_READ, 0);
            }
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.compact();
            } else if self.buf.len() >= MAX_INCOMING {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a TLS message larger than the gateway accepts (64 KiB)",
                ));
            } else {
                let len = (self.buf.len() * 2).clamp(FIRST_READ, MAX_INCOMING);
                self.buf.resize(len, 0);
            }
        }
        Ok(&mut self.buf[self.end..])
    }

    /// At least `need` bytes of room after what is held.
    fn room_for(&mut self, need: usize) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = spare::take();
        }
        self.compact();
        if self.buf.len() < self.end + need {
            self.buf.resize(self.end + need, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Moves the held bytes to the front of the buffer, so that what was sent or processed
    /// ahead of them does not make the buffer grow (a peer that reads slowly would otherwise
    /// make it as large as all that was ever written to it).
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Lets `write` append to what is held (the buffer's length is where the held bytes end
    /// while it runs).
    fn append<R>(&mut self, write: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        if self.buf.capacity() == 0 {
            self.buf = spare::take();
        }
        self.compact();
        self.buf.truncate(self.end);
        let result = write(&mut self.buf);
        self.end = self.buf.len();
        result
    }

    /// Gives the buffer back to the spares if it holds nothing.
    fn release(&mut self) {
        if self.is_empty() {
            spare::give(std::mem::take(&mut self.buf));
            self.start = 0;
            self.end = 0;
        }
    }
}

/// Decrypted application data not yet read: `buf[at..]`.
#[derive(Default)]
struct Plain {
    buf: Vec<u8>,
    at: usize,
}

impl Plain {
    fn is_empty(&self) -> bool {
        self.at == self.buf.len()
    }

    fn push(&mut self, payload: &[u8]) {
        if self.buf.capacity() == 0 {
            self.buf = spare::take();
            self.buf.clear();
        }
        self.buf.extend_from_slice(payload);
    }

    /// Copies what fits into `out`; false if there was nothing to copy.
    fn read_into(&mut self, out: &mut ReadBuf<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let n = out.remaining().min(self.buf.len() - self.at);
        out.put_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        self.release();
        true
    }

    /// Gives the buffer back to the spares if everything in it has been read. What it held
    /// was one client's decrypted requests (tokens, patient identifiers): it is zeroed first,
    /// as the next connection to take it may be another client's.
    fn release(&mut self) {
        if self.is_empty() {
            self.buf.fill(0);
            spare::give(std::mem::take(&mut self.buf));
            self.at = 0;
        }
    }
}

/// Buffers between connections. An idle connection holds none of its own; a busy one takes one
/// from its thread's few spares and gives it back when it is empty, so the busy path allocates
/// and zeroes only when a spare is missing or too short. A spare's length is how much of it is
/// initialised.
mod spare {
    use std::cell::RefCell;

    /// Spares kept per thread.
    const KEEP: usize = 32;
    /// Larger buffers (a big handshake message, a large write) are freed, not kept.
    const KEEP_MAX: usize = 20 * 1024;

    thread_local! {
        static SPARES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// A spare buffer, or a new empty one.
    pub(super) fn take() -> Vec<u8> {
        SPARES
            .try_with(|s| s.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Keeps `buf` as a spare if there is room for it, otherwise frees it.
    pub(super) fn give(buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > KEEP_MAX {
            return;
        }
        let _ = SPARES.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP {
                s.push(buf);
            }
        });
    }

    #[cfg(test)]
    pub(super) fn count() -> usize {
        SPARES.with(|s| s.borrow().len())
    }
}

#[cfg(test)]
mod tests {
    use super::{spare, Plain};

    #[test]
    fn decrypted_bytes_are_zeroed_before_their_buffer_goes_back_to_the_spares() {
        while spare::count() > 0 {
            spare::take();
        }
        let mut plain = Plain::default();
        plain.push(b"Bearer secret-token");
        let mut out = [0u8; 64];
        let mut read = tokio::io::ReadBuf::new(&mut out);
        assert!(plain.read_into(&mut read));
        assert_eq!(read.filled(), b"Bearer secret-token");
        assert_eq!(spare::count(), 1, "read in full: the buffer went back");
        let spare = spare::take();
        assert_eq!(spare.len(), 19);
        assert!(spare.iter().all(|&b| b == 0), "{spare:?}");
    }

    #[test]
    fn spares_are_kept_up_to_a_count_and_a_size_and_come_back_initialised() {
        while spare::count() > 0 {
            spare::take();
        }
        for _ in 0..40 {
            spare::give(vec![1u8; 4096]);
        }
        assert_eq!(spare::count(), 32, "at most 32 spares per thread");
        let buf = spare::take();
        assert_eq!(buf.len(), 4096, "a spare's length is what is initialised");
        assert_eq!(spare::count(), 31);
        spare::give(vec![0u8; 1 << 20]);
        spare::give(Vec::new());
        assert_eq!(spare::count(), 31, "large and empty buffers are not kept");
        while spare::count() > 0 {
            spare::take();
        }
        assert_eq!(spare::take().capacity(), 0, "none left: a new empty buffer");
    }
}
