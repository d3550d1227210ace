//! The HTTP/1.1 server side of a connection (RFC 9112), purpose-built for a proxy that keeps
//! many connections open: the read buffer exists only while a request is being read (an idle
//! keep-alive connection holds no buffer of its own, only the TLS state), request heads are
//! parsed in place with `httparse` and their header values share that buffer rather than
//! being copied, a body that arrived with its head is handed over whole, and a response's head
//! and a short body go out in one write.
//!
//! It must never guess where a message ends: `Content-Length` with `Transfer-Encoding`,
//! conflicting lengths and a final transfer coding other than `chunked` are refused with 400
//! and the connection closed (request smuggling), as is an HTTP/1.1 head without exactly one
//! valid `Host` (RFC 9112 §3.2), and a connection whose request body was not
//! read to its end is closed after the response rather than parsed from the middle of that
//! body. It never reads a body the handler has not asked for, so `Expect: 100-continue` is
//! honoured, and it never blocks: an idle connection waits for the socket, bounded by the
//! header read timeout, and closes when shutdown starts.

use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::server::ConnInfo;
use crate::ssp::envelope::SSP_HEADER_NAMES;
use crate::tls::stream::ServerStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Headers parsed on the stack; a listener allowing more uses a heap array per head.
const STACK_HEADERS: usize = 128;
/// A chunk-size line (size and extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
/// How much the buffer grows by when a read needs room.
const READ_RESERVE: usize = 8192;
/// Data frames at least this long are written beside their framing rather than copied to it.
const COPY_LIMIT: usize = 16 * 1024;
/// After refusing a request the client may still be sending: read (and drop) for this long at
/// most before closing, so the refusal is not lost to a TCP reset.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// The limits of one listener's HTTP/1.1 side.
#[derive(Clone)]
pub(crate) struct Options {
    /// From the first byte of a head being awaited (including an idle keep-alive connection
    /// waiting for its next request) to the head being complete.
    pub header_read_timeout: Duration,
    /// Largest request head, request line and fields, bytes.
    pub max_header_bytes: usize,
    /// Most header fields in one head.
    pub max_headers: usize,
    /// How long one write may wait for the client to take the bytes.
    pub send_timeout: Duration,
    /// Told of each refused head (the gateway's metrics and audit; none for others).
    pub on_refused: Option<crate::server::OnRefusedHead>,
}

/// A request's body, as the handler reads it: over HTTP/1.1 whole (it came with the head),
/// streamed from the connection as the handler asks for it, or an HTTP/2 stream's.
pub struct RequestBody(Kind);

enum Kind {
    Empty,
    Full(Bytes),
    Streaming(Receiver),
    Http2(hyper::body::Incoming),
}

impl RequestBody {
    pub fn empty() -> RequestBody {
        RequestBody(Kind::Empty)
    }

    /// A body already whole (tests, and bodies that arrived with their head).
    pub fn full(bytes: impl Into<Bytes>) -> RequestBody {
        let bytes = bytes.into();
        if bytes.is_empty() {
            RequestBody::empty()
        } else {
            RequestBody(Kind::Full(bytes))
        }
    }

    pub(crate) fn http2(body: hyper::body::Incoming) -> RequestBody {
        RequestBody(Kind::Http2(body))
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.0 {
            Kind::Empty => "empty",
            Kind::Full(_) => "full",
            Kind::Streaming(_) => "streaming",
            Kind::Http2(_) => "http2",
        };
        f.debug_tuple("RequestBody").field(&kind).finish()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.0 {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(_) => match std::mem::replace(&mut this.0, Kind::Empty) {
                Kind::Full(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                _ => Poll::Ready(None),
            },
            Kind::Streaming(rx) => rx
                .poll_chunk(cx)
                .map(|chunk| chunk.map(|c| c.map(Frame::data).map_err(Into::into))),
            Kind::Http2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Empty => true,
            Kind::Full(_) => false,
            Kind::Streaming(rx) => rx.is_end(),
            Kind::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(bytes) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Streaming(rx) => rx.size_hint(),
            Kind::Http2(body) => body.size_hint(),
        }
    }
}

/// Why a request body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the connection closed before the request body ended")]
    Truncated,
    #[error("malformed chunked request body: {0}")]
    Chunked(&'static str),
    #[error("reading the request body: {0}")]
    Io(#[from] std::io::Error),
}

// ---- the body's hand-over between the connection and the handler ----

/// One chunk at a time from the connection to the body's reader; the connection reads the
/// next one only once the reader asks (`want`), which is the back-pressure and what makes
/// `100 Continue` wait for a handler that actually reads the body.
#[derive(Default)]
struct ChannelState {
    chunk: Option<Result<Bytes, BodyError>>,
    /// No chunk follows the one held (or none is held): the body is complete or failed.
    finished: bool,
    /// The reader is waiting for a chunk.
    want: bool,
    reader_gone: bool,
    /// Bytes of a `Content-Length` body not yet handed over.
    remaining: Option<u64>,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

struct Channel(Mutex<ChannelState>);

impl Channel {
    fn lock(&self) -> MutexGuard<'_, ChannelState> {
        // A panic while holding this lock cannot leave the state half-written (each critical
        // section only assigns fields), so a poisoned lock's state is still sound.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn wake(waker: &mut Option<Waker>) {
    if let Some(w) = waker.take() {
        w.wake();
    }
}

fn store(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

struct Receiver(Arc<Channel>);

impl Receiver {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        let mut s = self.0.lock();
        if let Some(chunk) = s.chunk.take() {
            return Poll::Ready(Some(chunk));
        }
        if s.finished {
            return Poll::Ready(None);
        }
        s.want = true;
        store(&mut s.reader, cx);
        wake(&mut s.writer);
        Poll::Pending
    }

    fn is_end(&self) -> bool {
        let s = self.0.lock();
        s.finished && s.chunk.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.0.lock();
        let held = match &s.chunk {
            Some(Ok(b)) => b.len() as u64,
            _ => 0,
        };
        match s.remaining {
            Some(n) => SizeHint::with_exact(n + held),
            None => {
                let mut hint = SizeHint::new();
                hint.set_lower(held);
                hint
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.reader_gone = true;
        wake(&mut s.writer);
    }
}

/// How a request's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers { seen: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoding {
    Length(u64),
    Chunked(Chunked),
}

/// What one step of feeding the body did.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// A chunk was handed over; more follow.
    More,
    /// The reader asked for the body and the client waits for `100 Continue` first.
    Continue,
    /// The body was read to its end.
    Done,
    /// The body is broken (truncated, malformed, unreadable): the reader was told.
    Failed,
    /// The reader dropped the body before its end.
    ReaderGone,
}

/// The connection's side of a streamed body: decodes it from the connection's buffer and
/// socket, one chunk per request of the reader.
struct Feeder {
    chan: Arc<Channel>,
    decoding: Decoding,
    /// `Expect: 100-continue` and nothing of the body sent yet.
    expect_continue: bool,
    max_trailer_bytes: usize,
}

impl Feeder {
    fn new(
        decoding: Decoding,
        expect_continue: bool,
        max_trailer_bytes: usize,
    ) -> (Feeder, Receiver) {
        let remaining = match decoding {
            Decoding::Length(n) => Some(n),
            Decoding::Chunked(_) => None,
        };
        let chan = Arc::new(Channel(Mutex::new(ChannelState {
            remaining,
            ..ChannelState::default()
        })));
        let feeder = Feeder {
            chan: chan.clone(),
            decoding,
            expect_continue,
            max_trailer_bytes,
        };
        (feeder, Receiver(chan))
    }

    /// Waits until the reader wants a chunk: true, or false when the reader is gone.
    fn poll_want(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut s = self.chan.lock();
        if s.reader_gone {
            return Poll::Ready(false);
        }
        if s.want && s.chunk.is_none() {
            return Poll::Ready(true);
        }
        store(&mut s.writer, cx);
        Poll::Pending
    }

    fn hand_over(&self, chunk: Option<Result<Bytes, BodyError>>, last: bool) {
        let mut s = self.chan.lock();
        if let (Some(Ok(b)), Some(n)) = (&chunk, s.remaining.as_mut()) {
            *n = n.saturating_sub(b.len() as u64);
        }
        s.chunk = chunk;
        s.finished = last;
        s.want = false;
        wake(&mut s.reader);
    }

    /// Decodes what `buf` holds: a chunk to hand over (and whether it is the last), `None`
    /// when more bytes are needed.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<(Bytes, bool)>, BodyError> {
        match &mut self.decoding {
            Decoding::Length(remaining) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = (*remaining).min(buf.len() as u64) as usize;
                *remaining -= n as u64;
                Ok(Some((buf.split_to(n).freeze(), *remaining == 0)))
            }
            Decoding::Chunked(state) => decode_chunked(state, buf, self.max_trailer_bytes),
        }
    }

    /// Hands the reader its next chunk, reading from `io` as needed. Cancel-safe: whatever
    /// was read stays in `buf` and the decoding state only moves with a chunk handed over.
    async fn step<S>(&mut self, io: &mut S, buf: &mut BytesMut) -> Step
    where
        S: AsyncRead + Unpin,
    {
        if !poll_fn(|cx| self.poll_want(cx)).await {
            return Step::ReaderGone;
        }
        if self.expect_continue {
            self.expect_continue = false;
            if buf.is_empty() {
                return Step::Continue;
            }
        }
        loop {
            match self.decode(buf) {
                Ok(Some((chunk, last))) => {
                    // The end of a chunked body carries no data: just the end.
                    let chunk = (!chunk.is_empty()).then_some(Ok(chunk));
                    self.hand_over(chunk, last);
                    return if last { Step::Done } else { Step::More };
                }
                Ok(None) => {}
                Err(e) => {
                    self.hand_over(Some(Err(e)), true);
                    return Step::Failed;
                }
            }
            reserve(buf);
            match io.read_buf(buf).await {
                Ok(0) => {
                    self.hand_over(Some(Err(BodyError::Truncated)), true);
                    return Step::Failed;
                }
                Ok(_) => {}
                Err(e) => {
                    self.hand_over(Some(Err(BodyError::Io(e))), true);
                    return Step::Failed;
                }
            }
        }
    }
}

/// One step of the chunked decoder (RFC 9112 §7.1): the data of every chunk `buf` holds, as
/// one piece, as soon as any of it is buffered (so a body of many small chunks is handed on,
/// and forwarded, in pieces the size of what was read, not one per chunk: a body of one-byte
/// chunks would cost a hand-over, a write to the provider and a TLS record per byte); the end
/// (`0` chunk and trailer section, trailers dropped) comes back as the last piece, empty when
/// no data came with it.
fn decode_chunked(
    state: &mut Chunked,
    buf: &mut BytesMut,
    max_trailer_bytes: usize,
) -> Result<Option<(Bytes, bool)>, BodyError> {
    let mut data = Joined::None;
    loop {
        match *state {
            Chunked::Size => {
                let Some(line_end) = find_crlf(buf, MAX_CHUNK_LINE)? else {
                    return Ok(data.so_far());
                };
                let size = chunk_size(&buf[..line_end])?;
                let _ = buf.split_to(line_end + 2);
                *state = if size == 0 {
                    Chunked::Trailers { seen: 0 }
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(left) => {
                let joining = data.len() > 0;
                if buf.is_empty()
                    || joining && (data.len() >= JOIN_UP_TO || left >= JOIN_UP_TO as u64)
                {
                    // A chunk of `JOIN_UP_TO` or more, or one after a piece that size, goes on
                    // its own (its data is not copied): joining is for chunks too small to be
                    // worth a hand-over each.
                    return Ok(data.so_far());
                }
                let n = left.min(buf.len() as u64) as usize;
                data.push(buf.split_to(n).freeze());
                *state = if left == n as u64 {
                    Chunked::DataEnd
                } else {
                    Chunked::Data(left - n as u64)
                };
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(data.so_far());
                }
                if &buf[..2] != b"\r\n" {
                    return Err(BodyError::Chunked("chunk data not followed by CRLF"));
                }
                let _ = buf.split_to(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers { seen } => {
                let limit = max_trailer_bytes.saturating_sub(seen);
                let Some(line_end) = find_crlf(buf, limit)? else {
                    return Ok(data.so_far());
                };
                let _ = buf.split_to(line_end + 2);
                if line_end == 0 {
                    *state = Chunked::Trailers { seen: 0 };
                    return Ok(Some((data.into_bytes().unwrap_or_default(), true)));
                }
                *state = Chunked::Trailers {
                    seen: seen + line_end + 2,
                };
            }
        }
    }
}

/// How much data [`decode_chunked`] joins into one piece: chunks smaller than this are copied
/// into one piece while it is smaller than this; a larger chunk goes on its own, uncopied.
const JOIN_UP_TO: usize = 4096;

/// The data of the chunks one step of [`decode_chunked`] decoded: a single chunk's as it was
/// split off the buffer (no copy), several joined.
enum Joined {
    None,
    One(Bytes),
    Many(BytesMut),
}

impl Joined {
    fn push(&mut self, data: Bytes) {
        *self = match std::mem::replace(self, Joined::None) {
            Joined::None => Joined::One(data),
            Joined::One(first) => {
                let mut many = BytesMut::with_capacity(first.len() + data.len());
                many.extend_from_slice(&first);
                many.extend_from_slice(&data);
                Joined::Many(many)
            }
            Joined::Many(mut many) => {
                many.extend_from_slice(&data);
                Joined::Many(many)
            }
        };
    }

    fn len(&self) -> usize {
        match self {
            Joined::None => 0,
            Joined::One(bytes) => bytes.len(),
            Joined::Many(many) => many.len(),
        }
    }

    fn into_bytes(self) -> Option<Bytes> {
        match self {
            Joined::None => None,
            Joined::One(bytes) => Some(bytes),
            Joined::Many(many) => Some(many.freeze()),
        }
    }

    /// What was decoded before more bytes are needed: a piece that is not the last, if any.
    fn so_far(self) -> Option<(Bytes, bool)> {
        self.into_bytes().map(|bytes| (bytes, false))
    }
}

/// The offset of the first CRLF in `buf`: `None` until it arrives, an error when the line
/// is longer than `limit` or has a bare LF.
fn find_crlf(buf: &[u8], limit: usize) -> Result<Option<usize>, BodyError> {
    let window = &buf[..buf.len().min(limit.saturating_add(2))];
    match window.iter().position(|&b| b == b'\n') {
        Some(0) => Err(BodyError::Chunked("bare LF")),
        Some(i) if window[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err(BodyError::Chunked("bare LF")),
        None if buf.len() > limit => Err(BodyError::Chunked("line too long")),
        None => Ok(None),
    }
}

/// The size of a chunk-size line: hex digits, then optional extensions after `;`.
fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let mut size: u64 = 0;
    let mut digits = 0;
    let mut rest = line;
    while let Some((&b, tail)) = rest.split_first() {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => break,
        };
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(d)))
            .ok_or(BodyError::Chunked("chunk size too large"))?;
        digits += 1;
        rest = tail;
    }
    if digits == 0 {
        return Err(BodyError::Chunked("no chunk size"));
    }
    // Optional whitespace, then extensions (ignored) or nothing.
    let rest = trim_ows(rest);
    if !rest.is_empty() && rest[0] != b';' {
        return Err(BodyError::Chunked("malformed chunk size"));
    }
    if rest.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return Err(BodyError::Chunked("control character in chunk extension"));
    }
    Ok(size)
}

/// `bytes` without optional whitespace (RFC 9110 §5.6.3) at either end.
pub(crate) fn trim_ows(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_RESERVE / 4 {
        buf.reserve(READ_RESERVE);
    }
}

// ---- request heads ----

/// A request head refused before it reaches the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// 400: malformed.
    Bad(&'static str),
    /// 400: a body length that cannot be trusted (conflicting or smuggling-shaped framing).
    Framing(&'static str),
    /// 400: no `Host` in an HTTP/1.1 request, more than one, or an invalid value (RFC 9112
    /// §3.2).
    Host(&'static str),
    /// 431: larger than `max_header_bytes` or more than `max_headers` fields.
    TooLarge,
    /// 414: a request line (its target) longer than `max_header_bytes` by itself (RFC 9112 §3).
    UriTooLong,
    /// 501: a transfer coding other than `chunked` before a final `chunked`.
    Unsupported,
    /// 408: the head did not arrive within the header read timeout.
    Timeout,
}

impl HeadError {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            HeadError::Bad(_) | HeadError::Framing(_) | HeadError::Host(_) => {
                StatusCode::BAD_REQUEST
            }
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::UriTooLong => StatusCode::URI_TOO_LONG,
            HeadError::Unsupported => StatusCode::NOT_IMPLEMENTED,
            HeadError::Timeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    labels! {
        /// The `reason` label of `ssp_http_refused_heads_total`.
        pub(crate) fn label;
        /// Every [`HeadError::label`], so that each series can be exposed from 0 at start.
        const LABELS;
        {
            HeadError::Bad(_) => "malformed",
            HeadError::Framing(_) => "framing",
            HeadError::Host(_) => "host",
            HeadError::TooLarge => "too_large",
            HeadError::UriTooLong => "uri_too_long",
            HeadError::Unsupported => "unsupported_coding",
            HeadError::Timeout => "timeout",
        }
    }

    /// The refusal's log line, one a second per label (with the number held back): a client
    /// looping on bad heads must not flood the log; the metric counts every one.
    fn log_limit(self) -> &'static crate::loglimit::Every {
        use crate::loglimit::Every;
        static LINES: [Every; 7] = [const { Every::second() }; 7];
        &LINES[match self {
            HeadError::Bad(_) => 0,
            HeadError::Framing(_) => 1,
            HeadError::Host(_) => 2,
            HeadError::TooLarge => 3,
            HeadError::Unsupported => 4,
            HeadError::Timeout => 5,
            HeadError::UriTooLong => 6,
        }]
    }

    fn reason(self) -> &'static str {
        match self {
            HeadError::Bad(why) | HeadError::Framing(why) | HeadError::Host(why) => why,
            HeadError::TooLarge => "request head too large",
            HeadError::UriTooLong => "request line longer than the request head limit",
            HeadError::Unsupported => "unsupported transfer coding",
            HeadError::Timeout => "request head not complete within the header read timeout",
        }
    }
}

/// A parsed request head: the request without its body, and how to read and answer it.
#[derive(Debug)]
struct Head {
    request: Request<()>,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

/// A header name as `HeaderName::from_bytes` reads it, except that the four Spine headers every
/// gateway request carries are their static names: a custom name read from bytes is a new
/// allocation, and another one each time a copy of the head (the forwarding path keeps one for
/// a connect retry) clones it; a static one is neither.
fn header_name(raw: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    if raw.len() > 4 && raw[..4].eq_ignore_ascii_case(b"ssp-") {
        if let Some(known) = SSP_HEADER_NAMES
            .iter()
            .find(|known| raw.eq_ignore_ascii_case(known.as_str().as_bytes()))
        {
            return Ok(known.clone());
        }
    }
    HeaderName::from_bytes(raw)
}

/// Why a head longer than `max` bytes is refused: 414 when its request line alone is (its
/// target is what makes it so: RFC 9112 §3), else 431.
fn over_limit(buf: &[u8], max: usize) -> HeadError {
    // The request line with its CRLF within the limit: its `\n` at `max + 1` at the latest.
    if buf[..max.saturating_add(2).min(buf.len())].contains(&b'\n') {
        HeadError::TooLarge
    } else {
        HeadError::UriTooLong
    }
}

/// Parses the head at the start of `buf`, removing it: `None` while it is incomplete.
fn parse_head(buf: &mut BytesMut, opts: &Options) -> Result<Option<Head>, HeadError> {
    let mut stack = [MaybeUninit::<httparse::Header<'_>>::uninit(); STACK_HEADERS];
    let mut heap = Vec::new();
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if opts.max_headers <= STACK_HEADERS {
        &mut stack[..opts.max_headers]
    } else {
        heap.resize(opts.max_headers, MaybeUninit::uninit());
        &mut heap[..]
    };
    let mut req = httparse::Request::new(&mut []);
    let base = buf.as_ptr() as usize;
    let buf_len = buf.len();
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        &buf[..],
        slots,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() <= opts.max_header_bytes {
                Ok(None)
            } else {
                Err(over_limit(buf, opts.max_header_bytes))
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::Bad("unsupported HTTP version")),
        Err(_) => return Err(HeadError::Bad("malformed request head")),
    };
    if len > opts.max_header_bytes {
        return Err(over_limit(buf, opts.max_header_bytes));
    }
    let method = req
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(HeadError::Bad("malformed method"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let path = req.path.ok_or(HeadError::Bad("no request target"))?;
    if path.contains('#') {
        // Not part of a request target (RFC 9112 §3.2); `http::Uri` would drop it unseen.
        return Err(HeadError::Bad("a fragment in the request target"));
    }
    let path_range = offset(base, buf_len, path.as_bytes())?;
    let mut fields = Vec::with_capacity(req.headers.len());
    let mut framing = Framing::None;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut codings = 0usize;
    let mut transfer_encoding = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    let mut hosts = 0usize;
    for h in req.headers.iter() {
        let name =
            header_name(h.name.as_bytes()).map_err(|_| HeadError::Bad("malformed header name"))?;
        if name == header::CONTENT_LENGTH {
            for v in h.value.split(|&b| b == b',') {
                let n = content_length_value(v)?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(HeadError::Framing("conflicting Content-Length values"));
                }
                content_length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            for coding in tokens(h.value) {
                if chunked {
                    // Anything after `chunked` (or `chunked` twice): the length is unknowable.
                    return Err(HeadError::Framing(
                        "chunked is not the final transfer coding",
                    ));
                }
                codings += 1;
                chunked = coding.eq_ignore_ascii_case(b"chunked");
            }
        } else if name == header::CONNECTION {
            for t in tokens(h.value) {
                close |= t.eq_ignore_ascii_case(b"close");
                keep_alive_token |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::EXPECT {
            expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
        } else if name == header::HOST {
            hosts += 1;
            if hosts > 1 {
                return Err(HeadError::Host("more than one Host"));
            }
            if !valid_host(h.value) {
                return Err(HeadError::Host("an invalid Host"));
            }
        }
        fields.push((name, offset(base, buf_len, h.value)?));
    }
    if transfer_encoding && codings == 0 {
        // An empty `Transfer-Encoding` names no final `chunked`: the body's length cannot be
        // known (RFC 9112 §6.3), and read as none, its bytes would be the next request.
        return Err(HeadError::Framing("Transfer-Encoding without a coding"));
    }
    if codings > 0 {
        if version == Version::HTTP_10 {
            return Err(HeadError::Framing(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if content_length.is_some() {
            return Err(HeadError::Framing(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if !chunked {
            // RFC 9112 §6.3: without a final `chunked` the body's length cannot be known; a
            // server MUST answer 400 and close (this before §6.1's 501 for a coding it does not
            // know, which `gzip, chunked` gets below).
            return Err(HeadError::Framing(
                "chunked is not the final transfer coding",
            ));
        }
        if codings > 1 {
            // e.g. `gzip, chunked`: the body would reach the provider still coded.
            return Err(HeadError::Unsupported);
        }
        framing = Framing::Chunked;
    } else if let Some(n) = content_length {
        framing = Framing::Length(n);
    }
    if hosts == 0 && version == Version::HTTP_11 {
        // RFC 9112 §3.2: a server MUST answer 400 (an HTTP/1.0 client need not send one).
        return Err(HeadError::Host("no Host"));
    }
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path_range.0..path_range.1))
        .map_err(|_| HeadError::Bad("malformed request target"))?;
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, (start, end)) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| HeadError::Bad("malformed header value"))?;
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    let keep_alive = match version {
        Version::HTTP_10 => keep_alive_token && !close,
        _ => !close,
    };
    Ok(Some(Head {
        request,
        framing,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
    }))
}

/// Where `part` (a slice `httparse` returned) lies in the buffer at `base` of `len` bytes; an
/// empty part may point anywhere, so it is the empty range.
fn offset(base: usize, len: usize, part: &[u8]) -> Result<(usize, usize), HeadError> {
    if part.is_empty() {
        return Ok((0, 0));
    }
    (part.as_ptr() as usize)
        .checked_sub(base)
        .and_then(|start| Some((start, start.checked_add(part.len())?)))
        .filter(|&(_, end)| end <= len)
        .ok_or(HeadError::Bad("malformed request head"))
}

/// A `Host` field value: `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2), where
/// `uri-host` is a reg-name (unreserved, sub-delims, `%HH`) or an IP literal in brackets, and
/// the port digits. Empty is refused too: the gateway's scheme, https, requires an authority
/// (RFC 9112 §3.3). Spaces, a second `:`, `@` (userinfo) and `/` are never part of one.
fn valid_host(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(end) = v.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &v[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b":.-_~!$&'()*+,;=".contains(&b))
        {
            return false;
        }
        match &v[end + 1..] {
            [] => (&v[..=end], None),
            [b':', port @ ..] => (&v[..=end], Some(port)),
            _ => return false,
        }
    } else {
        match v.iter().position(|&b| b == b':') {
            Some(i) => (&v[..i], Some(&v[i + 1..])),
            None => (v, None),
        }
    };
    if host.is_empty() || port.is_some_and(|p| !p.iter().all(u8::is_ascii_digit)) {
        return false;
    }
    if host[0] == b'[' {
        return true;
    }
    let mut i = 0;
    while i < host.len() {
        match host[i] {
            b'%' => {
                if !(i + 2 < host.len()
                    && host[i + 1].is_ascii_hexdigit()
                    && host[i + 2].is_ascii_hexdigit())
                {
                    return false;
                }
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b) => i += 1,
            _ => return false,
        }
    }
    true
}

fn content_length_value(v: &[u8]) -> Result<u64, HeadError> {
    let v = trim_ows(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::Framing("malformed Content-Length"));
    }
    Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The comma-separated list elements of a field value, trimmed, empty ones skipped.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

// ---- the connection ----

/// Serves HTTP/1.1 requests on `io` until the client closes, a head times out, framing is
/// lost, or `shutdown` starts (an idle connection closes at once; a busy one after its
/// response, which says `Connection: close`).
pub(crate) async fn serve<H, Fut, B>(
    mut io: Box<ServerStream<TcpStream>>,
    info: Arc<ConnInfo>,
    handler: H,
    opts: Arc<Options>,
    shutdown: CancellationToken,
) where
    H: Fn(Arc<ConnInfo>, Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut buf = BytesMut::new();
    // A refused head's status. The answer is written after the loop: written in the `match`
    // below, it would keep the match's `Result` (and its `Head`) in every connection's future.
    let mut refused = None;
    loop {
        let head = match read_head(&mut io, &mut buf, &opts, &shutdown).await {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(e) => {
                if let Some(held_back) = e.log_limit().allow() {
                    tracing::info!(remote = %info.remote, reason = e.reason(), held_back, "refused an HTTP/1.1 request head");
                }
                let hold = opts.on_refused.as_ref().and_then(|tell| {
                    tell(
                        &info,
                        crate::server::RefusedHead {
                            status: e.status(),
                            reason: e.label(),
                        },
                    )
                });
                refused = Some((e.status(), hold));
                break;
            }
        };
        // Boxed: the exchange's state (the handler's future, the response body) exists only
        // while there is a request, not in every idle connection.
        let exchange = Box::pin(exchange(
            &mut io, &mut buf, head, &info, &handler, &opts, &shutdown,
        ));
        match exchange.await {
            Ending::KeepAlive => {}
            Ending::Close => break,
            Ending::Linger => {
                Box::pin(linger(&mut io)).await;
                return;
            }
            Ending::Abort => return,
        }
        if buf.is_empty() {
            // Idle until the next request: hold no buffer, here or in the TLS layer.
            buf = BytesMut::new();
            io.release();
        }
    }
    // Boxed too, for the same reason as the exchange.
    match refused {
        Some((status, hold)) => {
            Box::pin(refuse(&mut io, status, hold, &shutdown, opts.send_timeout)).await
        }
        // close_notify: bounded too, the client may have stopped reading.
        None => {
            let _ = Box::pin(tokio::time::timeout(opts.send_timeout, io.shutdown())).await;
        }
    }
}

/// Answers a refused head with its status, after `hold` (a client over its refusal budget;
/// cut short at shutdown), then lingers so the answer is read.
async fn refuse(
    io: &mut ServerStream<TcpStream>,
    status: StatusCode,
    hold: Option<Duration>,
    shutdown: &CancellationToken,
    send_timeout: Duration,
) {
    if let Some(hold) = hold {
        tokio::select! {
            _ = tokio::time::sleep(hold) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    let mut out = Vec::with_capacity(160);
    error_response(&mut out, status);
    if write_all_parts(io, &[&out], send_timeout).await.is_ok() {
        linger(io).await;
    }
}

/// Reads until a whole head is in `buf`: `None` when the connection ends quietly (closed, idle
/// past the header read timeout, or shutdown while idle).
async fn read_head(
    io: &mut ServerStream<TcpStream>,
    buf: &mut BytesMut,
    opts: &Options,
    shutdown: &CancellationToken,
) -> Result<Option<Head>, HeadError> {
    let deadline = tokio::time::sleep(opts.header_read_timeout);
    tokio::pin!(deadline);
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf, opts)? {
                return Ok(Some(head));
            }
        } else {
            // Idle: wait for the socket without a buffer (unless TLS already holds plaintext).
            if !io.buffered() {
                // The socket's readiness is polled, not awaited as a future: this wait is the
                // state of every idle connection, and the smaller the better.
                let tcp = io.get_ref();
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = &mut deadline => return Ok(None),
                    ready = std::future::poll_fn(|cx| tcp.poll_read_ready(cx)) => if ready.is_err() { return Ok(None) },
                }
            }
        }
        reserve(buf);
        tokio::select! {
            biased;
            read = io.read_buf(buf) => match read {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            },
            _ = &mut deadline => {
                return if buf.is_empty() { Ok(None) } else { Err(HeadError::Timeout) };
            }
        }
    }
}

/// How an exchange left the connection.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    KeepAlive,
    /// Close after the response (the client's request, HTTP/1.0, shutdown).
    Close,
    /// Close, but the client may still be sending a body nobody read: drain it first.
    Linger,
    /// The connection failed: drop it.
    Abort,
}

/// One request and its response.
async fn exchange<H, Fut, B>(
    io: &mut ServerStream<TcpStream>,
    buf: &mut BytesMut,
    head: Head,
    info: &Arc<ConnInfo>,
    handler: &H,
    opts: &Options,
    shutdown: &CancellationToken,
) -> Ending
where
    H: Fn(Arc<ConnInfo>, Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let Head {
        request,
        framing,
        keep_alive,
        expect_continue,
    } = head;
    let version = request.version();
    let head_method = request.method() == Method::HEAD;
    let streamed = |decoding| {
        let continue_first = expect_continue && buf.is_empty();
        let (feeder, rx) = Feeder::new(decoding, continue_first, opts.max_header_bytes);
        (RequestBody(Kind::Streaming(rx)), Some(feeder))
    };
    let (body, mut feeder) = match framing {
        Framing::None | Framing::Length(0) => (RequestBody::empty(), None),
        Framing::Length(n) if buf.len() as u64 >= n => {
            (RequestBody::full(buf.split_to(n as usize).freeze()), None)
        }
        Framing::Length(n) => streamed(Decoding::Length(n)),
        Framing::Chunked => streamed(Decoding::Chunked(Chunked::Size)),
    };
    let mut body_done = feeder.is_none();
    let mut response = std::pin::pin!(handler(info.clone(), request.map(|()| body)));
    let response = loop {
        let Some(f) = feeder.as_mut() else {
            break response.await;
        };
        let step = tokio::select! {
            biased;
            r = &mut response => break r,
            step = f.step(io, buf) => step,
        };
        if settle(step, &mut feeder, &mut body_done) {
            let interim: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
            if write_all_parts(io, &[interim], opts.send_timeout)
                .await
                .is_err()
            {
                return Ending::Abort;
            }
        }
    };

    let (mut parts, body) = response.into_parts();
    let mut body = std::pin::pin!(body);
    let no_body = head_method
        || parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    let mut close =
        !keep_alive || shutdown.is_cancelled() || !body_done || connection_close(&parts.headers);
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| content_length_value(v.as_bytes()).ok());
    let mut encoding = if no_body {
        Encoding::None
    } else if let Some(n) = declared {
        Encoding::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        Encoding::Length(n)
    } else if version == Version::HTTP_11 {
        Encoding::Chunked
    } else {
        close = true;
        Encoding::UntilClose
    };
    if head_method && declared.is_none() {
        if let Some(n) = body.size_hint().exact() {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    // Room for the head and, when it is short and its size known, the body: one allocation.
    let short_body = match encoding {
        Encoding::Length(n) if n < COPY_LIMIT as u64 => n as usize,
        _ => 0,
    };
    let mut out = Vec::with_capacity(512 + 32 * parts.headers.len() + short_body);
    write_head(&mut out, &parts, encoding, close, version);
    if no_body {
        return finish(io, &out, close, body_done, opts.send_timeout).await;
    }

    // The body: frames as they come, the first (and a short one) in the head's write.
    loop {
        let frame = match feeder.as_mut() {
            Some(f) => tokio::select! {
                biased;
                frame = body.frame() => frame,
                step = f.step(io, buf) => {
                    if settle(step, &mut feeder, &mut body_done) {
                        // Too late for 100 Continue: the client gets the answer and a close.
                        feeder = None;
                    }
                    continue;
                }
            },
            None => body.frame().await,
        };
        let frame = frame.map(|f| f.map_err(Into::<BoxError>::into));
        match frame {
            None => {
                match encoding {
                    Encoding::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
                    Encoding::Length(left) if left > 0 => {
                        // Shorter than declared: the client can only learn it from a close.
                        tracing::debug!(remote = %info.remote, missing = left, "response body ended early");
                        close = true;
                    }
                    _ => {}
                }
                return finish(io, &out, close, body_done, opts.send_timeout).await;
            }
            Some(Err(e)) => {
                tracing::debug!(remote = %info.remote, error = %e, "response body failed; closing");
                if !out.is_empty() {
                    let _ = write_all_parts(io, &[&out], opts.send_timeout).await;
                }
                return Ending::Abort;
            }
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else {
                    continue; // trailers: not forwarded over HTTP/1.1
                };
                if data.is_empty() {
                    continue;
                }
                let suffix: &[u8] = match &mut encoding {
                    Encoding::Length(left) => {
                        if data.len() as u64 > *left {
                            // Longer than declared: send what was declared, then close.
                            data.truncate(*left as usize);
                            close = true;
                        }
                        *left -= data.len() as u64;
                        b""
                    }
                    Encoding::Chunked => {
                        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                        b"\r\n"
                    }
                    Encoding::UntilClose | Encoding::None => b"",
                };
                let ended = body.is_end_stream();
                if data.len() < COPY_LIMIT {
                    out.extend_from_slice(&data);
                    out.extend_from_slice(suffix);
                    if ended {
                        continue; // the end (and the chunked terminator) joins this write
                    }
                    if write_all_parts(io, &[&out], opts.send_timeout)
                        .await
                        .is_err()
                    {
                        return Ending::Abort;
                    }
                } else if write_all_parts(io, &[&out, &data, suffix], opts.send_timeout)
                    .await
                    .is_err()
                {
                    return Ending::Abort;
                }
                out.clear();
            }
        }
    }
}

/// Applies a feeding step: the feeder goes once the body is over (`body_done` says whether
/// it was read to its end). True when the client waits for `100 Continue` first.
fn settle(step: Step, feeder: &mut Option<Feeder>, body_done: &mut bool) -> bool {
    match step {
        Step::More => {}
        Step::Continue => return true,
        Step::Done => {
            *feeder = None;
            *body_done = true;
        }
        Step::Failed | Step::ReaderGone => *feeder = None,
    }
    false
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Writes what remains of the response and says how the connection goes on.
async fn finish(
    io: &mut ServerStream<TcpStream>,
    out: &[u8],
    close: bool,
    body_read: bool,
    send_timeout: Duration,
) -> Ending {
    if !out.is_empty() && write_all_parts(io, &[out], send_timeout).await.is_err() {
        return Ending::Abort;
    }
    if !matches!(
        tokio::time::timeout(send_timeout, io.flush()).await,
        Ok(Ok(()))
    ) {
        return Ending::Abort;
    }
    match (close, body_read) {
        (false, _) => Ending::KeepAlive,
        (true, true) => Ending::Close,
        (true, false) => Ending::Linger,
    }
}

fn connection_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close")))
}

/// The status line and fields; framing and `Connection` are this module's own, `Date` added
/// when the handler gave none.
fn write_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    encoding: Encoding,
    close: bool,
    version: Version,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    // The provider's own reason phrase when it was not the canonical one (hyper's client keeps
    // it, checked to be reason-phrase bytes: no CR, LF or NUL), as a proxy passes it on. An empty
    // one (which is also what httparse makes of a phrase with obs-text bytes) gets the canonical.
    match parts
        .extensions
        .get::<hyper::ext::ReasonPhrase>()
        .filter(|r| !r.as_bytes().is_empty())
    {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(
            parts
                .status
                .canonical_reason()
                .unwrap_or("Unknown")
                .as_bytes(),
        ),
    }
    out.extend_from_slice(b"\r\n");
    for (name, value) in parts.headers.iter() {
        if name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
            || name == "keep-alive"
            || (name == header::CONTENT_LENGTH && encoding == Encoding::Chunked)
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        date::append(out);
        out.extend_from_slice(b"\r\n");
    }
    if encoding == Encoding::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A bodiless answer of this module's own (a refused head), closing the connection.
fn error_response(out: &mut Vec<u8>, status: StatusCode) {
    let parts = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, 0)
        .body(())
        .map(|r| r.into_parts().0);
    if let Ok(parts) = parts {
        write_head(out, &parts, Encoding::Length(0), true, Version::HTTP_11);
    }
}

/// Writes all of `parts` in as few writes as the TLS layer allows; a write that makes no
/// progress for `timeout` (a client that stopped reading) is an error.
async fn write_all_parts<S: AsyncWrite + Unpin>(
    io: &mut S,
    parts: &[&[u8]],
    timeout: Duration,
) -> std::io::Result<()> {
    let mut index = 0;
    let mut within = 0;
    while index < parts.len() {
        if parts[index].len() == within {
            index += 1;
            within = 0;
            continue;
        }
        let mut slices: [IoSlice<'_>; 3] =
            [IoSlice::new(&[]), IoSlice::new(&[]), IoSlice::new(&[])];
        let mut n = 0;
        for (k, part) in parts[index..].iter().take(3).enumerate() {
            slices[k] = IoSlice::new(if k == 0 { &part[within..] } else { part });
            n += 1;
        }
        let mut written = tokio::time::timeout(timeout, io.write_vectored(&slices[..n]))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 && index < parts.len() {
            let left = parts[index].len() - within;
            if written >= left {
                written -= left;
                index += 1;
                within = 0;
            } else {
                within += written;
                written = 0;
            }
        }
    }
    Ok(())
}

/// Closes our side, then reads and drops what the client still sends, for a moment, so the
/// answer is not lost to a reset of a socket closed with unread data.
async fn linger(io: &mut ServerStream<TcpStream>) {
    let _ = tokio::time::timeout(LINGER, async {
        let _ = io.flush().await;
        let _ = io.shutdown().await;
        // On the heap: a buffer in this future would be in every connection's.
        let mut sink = vec![0u8; 4096];
        let mut total = 0;
        while total < LINGER_BYTES {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// The `Date` field value (RFC 9110 §5.6.7), formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    pub(super) fn append(out: &mut Vec<u8>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != now {
                *c = (now, format(now));
            }
            out.extend_from_slice(c.1.as_bytes());
        });
    }

    /// IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
    pub(super) fn format(secs: u64) -> String {
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            header_read_timeout: Duration::from_secs(5),
            max_header_bytes: 1024,
            max_headers: 8,
            send_timeout: Duration::from_secs(5),
            on_refused: None,
        }
    }

    fn parse(raw: &str) -> Result<Option<Head>, HeadError> {
        let mut buf = BytesMut::from(raw.as_bytes());
        parse_head(&mut buf, &opts())
    }

    #[test]
    fn a_head_is_parsed_in_place_and_its_body_left_behind() {
        let mut buf = BytesMut::from(
            &b"POST /https://p.example/x?a=b%20c HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\nX-Empty:\r\nSsp-From: 200000000359\r\n\r\nbody"[..],
        );
        let head = parse_head(&mut buf, &opts())
            .expect("valid")
            .expect("complete");
        assert_eq!(head.request.method(), Method::POST);
        assert_eq!(head.request.uri().path(), "/https://p.example/x");
        assert_eq!(head.request.uri().query(), Some("a=b%20c"));
        assert_eq!(head.request.headers()["ssp-from"], "200000000359");
        assert_eq!(head.request.headers()["x-empty"], "");
        assert_eq!(head.framing, Framing::Length(4));
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"body");
    }

    /// The Spine headers, in any case, are the static names (no allocation); other names,
    /// near misses included, are read as `from_bytes` reads them, and bad ones still refused.
    #[test]
    fn spine_header_names_are_the_static_ones_whatever_their_case() {
        for raw in ["Ssp-TraceID", "SSP-FROM", "ssp-to", "sSp-InteractionId"] {
            let name = header_name(raw.as_bytes()).expect("valid");
            assert_eq!(name, HeaderName::from_bytes(raw.as_bytes()).expect("valid"));
            assert!(
                SSP_HEADER_NAMES.iter().any(|k| k.as_str() == name.as_str()),
                "{raw}"
            );
        }
        for raw in ["Ssp-Fromx", "Ssp-", "Ssp-T", "X-Ssp-To", "Content-Type"] {
            assert_eq!(
                header_name(raw.as_bytes()).expect("valid"),
                HeaderName::from_bytes(raw.as_bytes()).expect("valid"),
                "{raw}"
            );
        }
        assert!(header_name(b"Ssp-To ").is_err());
        assert!(header_name(b"Ssp-\xff").is_err());
        let head = parse("GET / HTTP/1.1\r\nHost: g\r\nSSP-TRACEID: abc\r\nSsp-To: 1\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(head.request.headers()["ssp-traceid"], "abc");
        assert_eq!(head.request.headers()["ssp-to"], "1");
    }

    #[test]
    fn incomplete_heads_wait_and_oversized_ones_are_refused() {
        assert!(parse("GET / HTTP/1.1\r\nHost: g\r\n")
            .expect("partial")
            .is_none());
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        assert_eq!(parse(&big).err(), Some(HeadError::TooLarge));
        // A target longer than the limit by itself: 414, whole or still arriving.
        let long = format!("GET /{} HTTP/1.1\r\nHost: g\r\n\r\n", "a".repeat(2000));
        assert_eq!(parse(&long).err(), Some(HeadError::UriTooLong));
        assert_eq!(HeadError::UriTooLong.status(), StatusCode::URI_TOO_LONG);
        let arriving = format!("GET /{}", "a".repeat(2000));
        assert_eq!(parse(&arriving).err(), Some(HeadError::UriTooLong));
        // A request line of the limit exactly (its CRLF past it), with fields over it: 431.
        let line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(1024 - 14));
        assert_eq!(line.len(), 1024 + 2);
        let full = format!("{line}X: {}\r\n\r\n", "b".repeat(100));
        assert_eq!(parse(&full).err(), Some(HeadError::TooLarge));
        let many: String = (0..9).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err(),
            Some(HeadError::TooLarge)
        );
    }

    #[test]
    fn untrustworthy_framing_is_refused() {
        for (raw, want) in [
            ("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: ,\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: \r\nContent-Length: 3\r\n\r\n", StatusCode::BAD_REQUEST),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", StatusCode::NOT_IMPLEMENTED),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", StatusCode::BAD_REQUEST),
            ("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", StatusCode::BAD_REQUEST),
            ("GET /https://h/x#frag HTTP/1.1\r\n\r\n", StatusCode::BAD_REQUEST),
            ("GET /https://h/x?a=1# HTTP/1.1\r\n\r\n", StatusCode::BAD_REQUEST),
            ("GET / HTTP/1.1\r\nX: a\0b\r\n\r\n", StatusCode::BAD_REQUEST),
            ("HELLO\r\n\r\n", StatusCode::BAD_REQUEST),
            ("GET / HTTP/2.0\r\n\r\n", StatusCode::BAD_REQUEST),
        ] {
            assert_eq!(parse(raw).map(|_| ()).map_err(HeadError::status), Err(want), "{raw:?}");
        }
        // Repeated identical lengths are one length (RFC 9110 §8.6).
        let head = parse("POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 3, 3\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(head.framing, Framing::Length(3));
    }

    /// RFC 9112 §3.2: an HTTP/1.1 request with no Host, more than one, or an invalid value
    /// is 400 (counted as `host`).
    #[test]
    fn host_is_required_once_and_valid() {
        let host = |value: &str| parse(&format!("GET / HTTP/1.1\r\nHost: {value}\r\n\r\n"));
        for good in [
            "localhost",
            "localhost:8443",
            "gw.example",
            "127.0.0.1:443",
            "[::1]:8443",
            "[2001:db8::1]",
            "xn--bcher-kva.example",
            "a%2Db",
            "localhost:",
        ] {
            assert!(host(good).is_ok_and(|h| h.is_some()), "{good:?}");
        }
        for bad in [
            "a b c",
            "",
            "a:b:c",
            "user@host",
            "host/path",
            "host:8x",
            "[::1",
            "[]",
            "[::1]x",
            "a%2",
            "a%zz",
            ":443",
        ] {
            assert_eq!(
                host(bad).err(),
                Some(HeadError::Host("an invalid Host")),
                "{bad:?}"
            );
        }
        let two = parse("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").err();
        assert_eq!(two, Some(HeadError::Host("more than one Host")));
        let same = parse("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n").err();
        assert_eq!(same, Some(HeadError::Host("more than one Host")));
        let none = parse("GET / HTTP/1.1\r\nX: 1\r\n\r\n").err();
        assert_eq!(none, Some(HeadError::Host("no Host")));
        assert_eq!(none.map(HeadError::status), Some(StatusCode::BAD_REQUEST));
        assert_eq!(none.as_ref().map(HeadError::label), Some("host"));
        // An HTTP/1.0 client need not send one.
        assert!(parse("GET / HTTP/1.0\r\n\r\n").is_ok_and(|h| h.is_some()));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_tokens() {
        let ka = |raw: &str| parse(raw).expect("ok").expect("complete").keep_alive;
        assert!(ka("GET / HTTP/1.1\r\nHost: g\r\n\r\n"));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: g\r\nConnection: Close\r\n\r\n"
        ));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        let head = parse(
            "POST / HTTP/1.1\r\nHost: g\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
        )
        .expect("ok")
        .expect("complete");
        assert!(head.expect_continue);
        let head = parse("POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert!(
            !head.expect_continue,
            "HTTP/1.0 clients do not understand 100"
        );
    }

    fn dechunk(input: &[&[u8]]) -> Result<(Vec<u8>, bool), BodyError> {
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for part in input {
            buf.extend_from_slice(part);
            while let Some((data, last)) = decode_chunked(&mut state, &mut buf, 256)? {
                out.extend_from_slice(&data);
                if last {
                    return Ok((out, true));
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nTrailer: x\r\n\r\n";
        for split in 0..wire.len() {
            let (a, b) = wire.split_at(split);
            let (body, complete) = dechunk(&[a, b]).expect("valid");
            assert_eq!(body, b"hello, world");
            assert!(complete, "split at {split}");
        }
    }

    /// The data of every chunk the buffer holds comes back as one piece; a chunk cut by the
    /// end of the buffer comes back as far as it goes, and the end with the data before it.
    #[test]
    fn the_chunks_a_buffer_holds_come_back_as_one_piece() {
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        for _ in 0..1000 {
            buf.extend_from_slice(b"1\r\nx\r\n");
        }
        buf.extend_from_slice(b"3\r\nab");
        let (data, last) = decode_chunked(&mut state, &mut buf, 256)
            .expect("valid")
            .expect("data");
        assert_eq!((data.len(), last), (1002, false));
        assert!(data[..1000].iter().all(|&b| b == b'x') && &data[1000..] == b"ab");
        assert!(buf.is_empty());
        assert_eq!(
            decode_chunked(&mut state, &mut buf, 256).expect("valid"),
            None
        );
        buf.extend_from_slice(b"c\r\n2\r\nde\r\n0\r\nT: v\r\n\r\n");
        let (data, last) = decode_chunked(&mut state, &mut buf, 256)
            .expect("valid")
            .expect("data");
        assert_eq!((&data[..], last), (&b"cde"[..], true));
        // A large chunk after small ones, and small ones after a large one, are not joined to
        // it: it goes on its own, uncopied.
        let mut state = Chunked::Size;
        let mut buf = BytesMut::from(&b"1\r\na\r\n"[..]);
        buf.extend_from_slice(format!("{:x}\r\n", JOIN_UP_TO).as_bytes());
        buf.extend_from_slice(&vec![b'b'; JOIN_UP_TO]);
        buf.extend_from_slice(b"\r\n1\r\nc\r\n");
        let mut pieces = Vec::new();
        while let Some((data, _)) = decode_chunked(&mut state, &mut buf, 256).expect("valid") {
            pieces.push(data.len());
        }
        assert_eq!(pieces, [1, JOIN_UP_TO, 1]);
        // One chunk whole in the buffer: handed on as it was split off, not copied.
        let mut buf = BytesMut::from(&b"4\r\nwxyz\r\n"[..]);
        let at = buf[3..].as_ptr();
        let mut state = Chunked::Size;
        let (data, last) = decode_chunked(&mut state, &mut buf, 256)
            .expect("valid")
            .expect("data");
        assert_eq!((&data[..], last, data.as_ptr()), (&b"wxyz"[..], false, at));
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"fffffffffffffffff\r\n",
            b"5 x\r\nhello\r\n",
        ] {
            assert!(
                dechunk(&[bad]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A size line or trailer section without end is refused once over its limit.
        assert!(dechunk(&[&[b'1'; 5000]]).is_err());
        let mut endless = b"0\r\n".to_vec();
        endless.extend(std::iter::repeat(&b"X: y\r\n"[..]).take(100).flatten());
        assert!(dechunk(&[&endless]).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any bytes at all: a head, an error or "more please", never a panic, and a head
        /// only ever consumes what it parsed.
        #[test]
        fn any_bytes_parse_or_refuse_without_panicking(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            prefix in proptest::sample::select(vec![&b""[..], b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n"]),
        ) {
            let mut buf = BytesMut::from(prefix);
            buf.extend_from_slice(&bytes);
            let before = buf.len();
            match parse_head(&mut buf, &opts()) {
                Ok(Some(_)) => proptest::prop_assert!(buf.len() < before),
                Ok(None) | Err(_) => proptest::prop_assert_eq!(buf.len(), before),
            }
        }

        /// The chunked decoder on any bytes: data, an error or "more please", never a panic;
        /// and on a valid body cut anywhere, exactly the data.
        #[test]
        fn the_chunked_decoder_never_panics_and_any_cut_of_a_valid_body_decodes(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 1..40), 0..6),
            cut in 0usize..400,
        ) {
            let _ = dechunk(&[&bytes]);
            let mut wire = Vec::new();
            for c in &chunks {
                wire.extend_from_slice(format!("{:X};x=y\r\n", c.len()).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\nT: v\r\n\r\n");
            let (a, b) = wire.split_at(cut.min(wire.len()));
            let (body, complete) = dechunk(&[a, b]).expect("a valid body");
            proptest::prop_assert!(complete);
            proptest::prop_assert_eq!(body, chunks.concat());
        }
    }

    #[test]
    fn dates_are_imf_fixdate() {
        assert_eq!(date::format(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(date::format(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(date::format(1_795_046_400), "Thu, 19 Nov 2026 00:00:00 GMT");
        assert_eq!(date::format(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
    }

    #[tokio::test]
    async fn a_streamed_body_is_read_only_when_asked_and_in_order() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let (mut feeder, rx) = Feeder::new(Decoding::Chunked(Chunked::Size), true, 256);
        let body = RequestBody(Kind::Streaming(rx));
        let mut buf = BytesMut::new();
        // Nobody asked yet: the feeder waits.
        let step = tokio::time::timeout(
            Duration::from_millis(50),
            feeder.step(&mut server, &mut buf),
        )
        .await;
        assert!(step.is_err(), "fed a body nobody asked for");
        let reader = tokio::spawn(async move { body.collect().await.map(|c| c.to_bytes()) });
        assert_eq!(feeder.step(&mut server, &mut buf).await, Step::Continue);
        client
            .write_all(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .await
            .expect("write");
        let mut steps = Vec::new();
        loop {
            let s = feeder.step(&mut server, &mut buf).await;
            let done = s == Step::Done;
            steps.push(s);
            if done {
                break;
            }
        }
        // The whole body was read at once: its two chunks and its end are one piece.
        assert_eq!(steps, [Step::Done]);
        let body = reader.await.expect("task").expect("body");
        assert_eq!(&body[..], b"abcde");
    }

    #[tokio::test]
    async fn a_truncated_body_is_an_error_for_the_reader() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let (mut feeder, rx) = Feeder::new(Decoding::Length(10), false, 256);
        let body = RequestBody(Kind::Streaming(rx));
        assert_eq!(body.size_hint().exact(), Some(10));
        let reader = tokio::spawn(async move { body.collect().await.map(|c| c.to_bytes()) });
        client.write_all(b"abc").await.expect("write");
        drop(client);
        let mut buf = BytesMut::new();
        assert_eq!(feeder.step(&mut server, &mut buf).await, Step::More);
        assert_eq!(feeder.step(&mut server, &mut buf).await, Step::Failed);
        let err = reader.await.expect("task").expect_err("truncated");
        assert!(err.to_string().contains("closed before"), "{err}");
    }
}
