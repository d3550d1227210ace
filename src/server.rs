//! Accepting connections: TCP, the TLS handshake under a timeout, the peer's identity, then
//! HTTP/1.1 (`h1`, this crate's own) or HTTP/2 (hyper's; by ALPN) with graceful shutdown.
//! Shared by the gateway listener and the mock provider; what a request means is the
//! service's business, not this module's.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::h1::{BodyError, RequestBody};

use crate::reload::Reloadable;
use crate::tls::identities::{ClientCert, Identities, OpenConnection};
use crate::tls::{HandshakeFailure, ListenerTls, PeerIdentity};

/// What the request path knows about the connection a request came on.
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// The verified client certificate's identity (shared by the connections presenting it).
    pub peer: Arc<PeerIdentity>,
    /// The certificate itself, and the listener's TLS, to judge it again.
    client: Arc<ClientCert>,
    tls: Arc<Reloadable<ListenerTls>>,
    /// The request path asked for the connection to end (see [`ConnInfo::request_close`]).
    close_requested: std::sync::atomic::AtomicBool,
    /// The HTTP/2 connection's task, woken when the request path asks it to close.
    close_waker: futures_util::task::AtomicWaker,
    /// The connection's place in its certificate's count, given back when the last holder of
    /// this info ends: the connection, and each of its requests (an HTTP/2 request runs in a
    /// task of its own, which outlives a connection the client closed).
    _counted: OpenConnection,
}

impl ConnInfo {
    fn new(
        remote: SocketAddr,
        client: Arc<ClientCert>,
        tls: Arc<Reloadable<ListenerTls>>,
        counted: OpenConnection,
    ) -> Self {
        ConnInfo {
            remote,
            peer: client.identity.clone(),
            client,
            tls,
            close_requested: std::sync::atomic::AtomicBool::new(false),
            close_waker: futures_util::task::AtomicWaker::new(),
            _counted: counted,
        }
    }

    /// Asks an HTTP/2 connection to end gracefully: a GOAWAY at once (no new streams; those
    /// open finish). The request path asks it of a client whose refusals are over their
    /// budget, so that holding each refused stream is not undone by opening more streams, or
    /// by resetting each held stream and sending the next. (HTTP/1.1 needs no such thing: a
    /// held answer holds its connection.)
    pub fn request_close(&self) {
        self.close_requested
            .store(true, std::sync::atomic::Ordering::Release);
        self.close_waker.wake();
    }

    fn close_requested(&self) -> bool {
        self.close_requested
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Ready once [`request_close`](Self::request_close) has been called: the HTTP/2
    /// connection's task waits on it beside its streams.
    fn close_asked(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.close_requested() {
            return std::task::Poll::Ready(());
        }
        self.close_waker.register(cx.waker());
        match self.close_requested() {
            true => std::task::Poll::Ready(()),
            false => std::task::Poll::Pending,
        }
    }

    /// Whether the listener would still accept the client certificate this connection was
    /// opened with: a CA bundle or CRL reloaded since, or the certificate's expiry, can end
    /// that while the connection stays open. Judged again only when one of those may have
    /// changed the answer (see [`ClientCert::standing`]).
    pub fn certificate_standing(&self) -> Result<(), HandshakeFailure> {
        self.client
            .standing(&self.tls.current(), rustls::pki_types::UnixTime::now())
    }
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnInfo")
            .field("remote", &self.remote)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// How connections are served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Name for logs ("gateway", "mock-provider").
    pub name: &'static str,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub http2: bool,
    /// How long in-flight requests get to finish once shutdown starts.
    pub grace_period: Duration,
    pub limits: Limits,
}

/// Protocol limits of one listener (each with a safe default; see `config`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections at most; beyond it new connections are accepted and closed at once.
    pub max_connections: usize,
    /// Open connections with one client certificate at most; beyond it a new connection with
    /// that certificate is closed after its handshake.
    pub max_connections_per_certificate: usize,
    /// Largest request head (request line + headers), bytes.
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// HTTP/1.1: how long a write of a response may wait for the client to read before the
    /// connection is closed (a client that stops reading does not hold it, and the provider
    /// connection behind it, for ever).
    pub send_timeout: Duration,
    /// HTTP/2: concurrent streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: reset streams a client may leave pending (reset-flood protection).
    pub h2_max_pending_reset_streams: usize,
    /// HTTP/2: ping interval for idle connections, and how long to wait for the answer.
    pub h2_keep_alive_interval: Duration,
    pub h2_keep_alive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            max_connections_per_certificate: 1_000,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            send_timeout: Duration::from_secs(60),
            h2_max_concurrent_streams: 100,
            h2_max_pending_reset_streams: 20,
            h2_keep_alive_interval: Duration::from_secs(30),
            h2_keep_alive_timeout: Duration::from_secs(20),
        }
    }
}

/// A request head refused before any handler saw it: malformed, with framing that cannot be
/// trusted, too large, an unsupported transfer coding, or not complete in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusedHead {
    /// What the client was answered (the connection closes with it over HTTP/1.1).
    pub status: StatusCode,
    /// The `reason` label of `ssp_http_refused_heads_total`.
    pub reason: &'static str,
}

/// Told of each refused head with the connection it came on (the gateway counts them in
/// `ssp_http_refused_heads_total` and audits them); returns how long to hold the answer (a
/// client over its refusal budget).
pub type OnRefusedHead = Arc<dyn Fn(&ConnInfo, RefusedHead) -> Option<Duration> + Send + Sync>;

/// The `reason`s of `ssp_http2_connection_errors_total`: the GOAWAY error codes (RFC 9113
/// §7) with which the gateway's HTTP/2 ended a connection for the client's violation.
pub const HTTP2_VIOLATIONS: [&str; 6] = [
    "protocol_error",
    "flow_control_error",
    "frame_size_error",
    "compression_error",
    "enhance_your_calm",
    "other",
];

/// The violation an HTTP/2 connection's end reports, as a [`HTTP2_VIOLATIONS`] label: a GOAWAY
/// that hyper's HTTP/2 (h2) sent because the client broke the protocol (a malformed frame,
/// flow-control or HPACK errors) or flooded it (`enhance_your_calm`: rapid resets, too many
/// CONTINUATION frames or pending resets). `None` for any other end: clean, the client's own
/// GOAWAY, an I/O error.
fn h2_violation(e: &hyper::Error) -> Option<&'static str> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2e) = err.downcast_ref::<h2::Error>() {
            if !(h2e.is_go_away() && h2e.is_library()) {
                return None;
            }
            return Some(match h2e.reason()? {
                h2::Reason::PROTOCOL_ERROR => "protocol_error",
                h2::Reason::FLOW_CONTROL_ERROR => "flow_control_error",
                h2::Reason::FRAME_SIZE_ERROR => "frame_size_error",
                h2::Reason::COMPRESSION_ERROR => "compression_error",
                h2::Reason::ENHANCE_YOUR_CALM => "enhance_your_calm",
                _ => "other",
            });
        }
        cur = err.source();
    }
    None
}

/// What a listener counts about its connections (the gateway's metrics; empty for others).
#[derive(Clone, Default)]
pub struct ConnMetrics {
    /// Connections open now (after the handshake).
    pub active: Option<prometheus::IntGauge>,
    /// Failed handshakes by `HandshakeFailure` label, or `timeout`, `unreadable_certificate`.
    pub handshake_failures: Option<prometheus::IntCounterVec>,
    /// Told of every request head refused before any handler saw it, over HTTP/1.1 and
    /// HTTP/2.
    pub on_refused: Option<OnRefusedHead>,
    /// HTTP/2 connections ended for the client's violation, by [`HTTP2_VIOLATIONS`] label.
    pub http2_violations: Option<prometheus::IntCounterVec>,
}

impl ConnMetrics {
    fn handshake_failed(&self, reason: &str) {
        if let Some(c) = &self.handshake_failures {
            c.with_label_values(&[reason]).inc();
        }
    }
}

/// The lines a connection can cause before its request is read: anyone who can reach the port
/// can fail handshakes as fast as it can connect (26,211 "TLS handshake failed" lines in 3 s in
/// a review, past the log writer's buffer, so access lines were dropped with them). Each kind
/// (a handshake failure by its reason, a timeout, no or an unreadable certificate, the
/// connection limit) is held to one line a second with `held_back`, the number left out since
/// its last line; `ssp_tls_handshake_failures_total` still counts every one.
mod conn_log {
    use crate::loglimit::Every;
    use crate::tls::HandshakeFailure;

    /// More than `HandshakeFailure` has variants; any beyond share the last.
    const FAILURE_KINDS: usize = 16;
    static FAILED: [Every; FAILURE_KINDS] = [const { Every::second() }; FAILURE_KINDS];
    pub static TIMED_OUT: Every = Every::second();
    pub static NO_CERTIFICATE: Every = Every::second();
    pub static UNREADABLE: Every = Every::second();
    pub static CONNECTION_LIMIT: Every = Every::second();
    pub static CERTIFICATE_LIMIT: Every = Every::second();

    /// The limit of "TLS handshake failed" lines for `reason`.
    pub fn failed(reason: HandshakeFailure) -> &'static Every {
        FAILED
            .get(reason as usize)
            .unwrap_or(&FAILED[FAILURE_KINDS - 1])
    }
}

/// Decrements the active-connection gauge when the connection ends, however it ends.
struct ActiveGuard(Option<prometheus::IntGauge>);

impl ActiveGuard {
    fn new(gauge: Option<prometheus::IntGauge>) -> ActiveGuard {
        if let Some(g) = &gauge {
            g.inc();
        }
        ActiveGuard(gauge)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.dec();
        }
    }
}

/// Why an HTTP/2 stream is reset rather than answered (hyper resets it with the reason of the
/// `h2::Error` among the error's sources, else INTERNAL_ERROR).
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    /// A request stopped when the grace period ran out.
    #[error("stopped at the end of the shutdown grace period")]
    StoppedAtShutdown,
    /// A stream opened after the connection was sent a GOAWAY for its client's refusals.
    #[error("a stream opened after the GOAWAY for the client's refusals")]
    NotTaken(#[source] h2::Error),
}

/// The size of an HTTP/2 request's header list as RFC 9113 §6.5.2 counts it (each field's
/// name and value, and 32 bytes), pseudo-header fields included.
fn header_list_size<B>(req: &Request<B>) -> usize {
    // `:method`, `:scheme`, `:authority` and `:path`: their names' lengths and their values'.
    let pseudo = [
        7 + req.method().as_str().len(),
        7 + req.uri().scheme_str().map_or(0, str::len),
        10 + req.uri().authority().map_or(0, |a| a.as_str().len()),
        5 + req.uri().path_and_query().map_or(0, |p| p.as_str().len()),
    ];
    let fields = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32);
    pseudo.iter().map(|n| n + 32).chain(fields).sum()
}

/// What is wrong with an HTTP/2 request's `:authority` and `Host`, as HTTP/1.1's `Host` is
/// checked: userinfo in `:authority` (RFC 9113 §8.3.1: MUST NOT), or a `Host` field that is
/// not the `:authority` (§8.3.1: the request is then malformed) or is there more than once.
fn h2_authority_problem<B>(req: &Request<B>) -> Option<&'static str> {
    let authority = req.uri().authority().map(http::uri::Authority::as_str);
    if authority.is_some_and(|a| a.contains('@')) {
        return Some("userinfo in :authority");
    }
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => Some("more than one Host"),
        (Some(host), None) => {
            // The same entity: the same name, in any case, and the same port (443 when none
            // is given).
            fn entity(v: &[u8]) -> &[u8] {
                v.strip_suffix(b":443").unwrap_or(v)
            }
            match authority {
                Some(a) if !entity(host.as_bytes()).eq_ignore_ascii_case(entity(a.as_bytes())) => {
                    Some("Host is not the :authority")
                }
                _ => None,
            }
        }
    }
}

/// How often an HTTP/2 connection's streams are checked (see `h2watch`).
const H2_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long an idle HTTP/2 connection gets to close after its GOAWAY.
const H2_CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Serves mTLS connections from `listener` until `shutdown` is cancelled, then stops accepting
/// and waits up to the grace period for open connections to finish their requests.
pub async fn serve_tls<H, Fut, B>(
    listener: TcpListener,
    tls: Arc<Reloadable<ListenerTls>>,
    opts: ServeOptions,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Arc<ConnInfo>, Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_tls_observed(
        listener,
        tls,
        opts,
        ConnMetrics::default(),
        shutdown,
        handler,
    )
    .await;
}

/// A response with no body, for the HTTP/2 streams refused before the handler.
fn bare<B>(status: StatusCode) -> Response<Either<B, Empty<Bytes>>> {
    let mut resp = Response::new(Either::Right(Empty::new()));
    *resp.status_mut() = status;
    resp
}

/// `serve_tls`, counting connections and handshake failures in `metrics`.
pub async fn serve_tls_observed<H, Fut, B>(
    listener: TcpListener,
    tls: Arc<Reloadable<ListenerTls>>,
    opts: ServeOptions,
    metrics: ConnMetrics,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Arc<ConnInfo>, Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = &opts.limits;
    let h1 = Arc::new(crate::h1::Options {
        // Also bounds how long an idle keep-alive connection waits for its next request.
        header_read_timeout: opts.header_read_timeout,
        max_header_bytes: limits.max_header_bytes,
        max_headers: limits.max_headers,
        send_timeout: limits.send_timeout,
        on_refused: metrics.on_refused.clone(),
    });
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        // Twice the limit: a header list over `max_header_bytes` but under this is refused by
        // the service below, counted and audited as HTTP/1.1's is; h2 refuses one over this
        // itself, unseen, but it has cost the client twice the limit in HPACK-coded bytes.
        .max_header_list_size(
            u32::try_from(limits.max_header_bytes.saturating_mul(2)).unwrap_or(u32::MAX),
        )
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .keep_alive_interval(limits.h2_keep_alive_interval)
        .keep_alive_timeout(limits.h2_keep_alive_timeout);
    // Every connection's task, so shutdown can wait for them to finish their requests; and,
    // once the grace period is over, what stops those still running (dropping a request's
    // future writes its outcome record as not completed, before the audit trail closes).
    let tracker = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    // What every connection shares: one reference per connection instead of a copy of each.
    let listener_state = Arc::new(Listener {
        tls,
        handler,
        h1,
        h2,
        metrics,
        // One identity per client certificate, shared by its connections.
        identities: Arc::new(Identities::default()),
        requests: tracker.clone(),
        request_stop: hard_stop.clone(),
        draining: shutdown.clone(),
        name: opts.name,
        handshake_timeout: opts.handshake_timeout,
        http2: opts.http2,
        max_headers: limits.max_headers,
        max_header_bytes: limits.max_header_bytes,
        max_per_certificate: limits.max_connections_per_certificate,
        idle_limit: opts.header_read_timeout,
        send_limit: limits.send_timeout,
    });

    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly rather than spin.
                    tracing::warn!(listener = opts.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Over the connection limit: refuse at once rather than queue without bound.
            if let Some(held_back) = conn_log::CONNECTION_LIMIT.allow() {
                tracing::warn!(listener = opts.name, %remote, held_back, "connection limit reached; refusing");
            }
            listener_state.metrics.handshake_failed("connection_limit");
            drop(tcp);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(listener = opts.name, %remote, error = %e, "set_nodelay failed");
        }
        tracker.spawn(hard_stop.clone().run_until_cancelled_owned(connection(
            listener_state.clone(),
            tcp,
            remote,
            permit,
        )));
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(opts.grace_period, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = opts.name,
            grace_period = ?opts.grace_period,
            "grace period over; closing connections with requests still in flight"
        );
        hard_stop.cancel();
        // Each task ends at its next poll; bounded all the same.
        if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                listener = opts.name,
                "connections still open after being stopped"
            );
        }
    }
}

/// What every connection of one listener shares (one `Arc` per connection).
struct Listener<H> {
    tls: Arc<Reloadable<ListenerTls>>,
    handler: H,
    h1: Arc<crate::h1::Options>,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    metrics: ConnMetrics,
    identities: Arc<Identities>,
    /// Where HTTP/2 requests run as tasks of their own, and what stops them once the grace
    /// period is over.
    requests: TaskTracker,
    request_stop: CancellationToken,
    /// Shutdown has begun: idle connections close, HTTP/2 ones get a GOAWAY.
    draining: CancellationToken,
    name: &'static str,
    handshake_timeout: Duration,
    http2: bool,
    max_headers: usize,
    max_header_bytes: usize,
    /// Open connections per client certificate at most.
    max_per_certificate: usize,
    /// HTTP/2's idle limit (the header read timeout) and send limit.
    idle_limit: Duration,
    send_limit: Duration,
}

/// One connection, from the handshake to its end.
///
/// Each stage whose state is large is boxed (the handshake, the TLS stream, each protocol's
/// connection), so that the task itself stays small: a task is as large as its largest state,
/// and the 10,000 idle HTTP/1.1 connections of the memory target should carry neither the
/// handshake's state nor HTTP/2's. `an_idle_connection_state_is_small` below holds it to that.
async fn connection<H, Fut, B>(
    shared: Arc<Listener<H>>,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
) where
    H: Fn(Arc<ConnInfo>, Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _permit = permit;
    let name = shared.name;
    let listener_tls = shared.tls.current();
    let handshake = Box::pin(tokio::time::timeout(
        shared.handshake_timeout,
        crate::tls::stream::accept(listener_tls.config.clone(), tcp),
    ));
    let (stream, handshaken) = match handshake.await {
        // Boxed too: a stream held inline would stay in the task's state.
        Ok(Ok((stream, handshaken))) => (Box::new(stream), handshaken),
        Ok(Err(e)) => {
            let failure = HandshakeFailure::classify(&e);
            let reason = failure.as_label();
            shared.metrics.handshake_failed(reason);
            if let Some(held_back) = conn_log::failed(failure).allow() {
                tracing::info!(listener = name, %remote, reason, error = %e, held_back, "TLS handshake failed");
            }
            return;
        }
        Err(_) => {
            shared.metrics.handshake_failed("timeout");
            if let Some(held_back) = conn_log::TIMED_OUT.allow() {
                tracing::info!(listener = name, %remote, held_back, "TLS handshake timed out");
            }
            return;
        }
    };
    if handshaken.peer_certificates.is_empty() {
        shared
            .metrics
            .handshake_failed(HandshakeFailure::NoClientCertificate.as_label());
        if let Some(held_back) = conn_log::NO_CERTIFICATE.allow() {
            tracing::info!(listener = name, %remote, held_back, "no client certificate");
        }
        return;
    }
    let client = match shared.identities.get(&handshaken.peer_certificates) {
        Ok(client) => client,
        Err(e) => {
            shared.metrics.handshake_failed("unreadable_certificate");
            if let Some(held_back) = conn_log::UNREADABLE.allow() {
                tracing::info!(listener = name, %remote, error = %e, held_back, "unreadable client certificate");
            }
            return;
        }
    };
    client.accepted(&listener_tls, rustls::pki_types::UnixTime::now());
    drop(listener_tls);
    // One certificate (registered or not: nothing is looked up yet) cannot take every
    // connection slot: past its own limit its new connections are closed.
    let Some(counted) = client.open_connection(shared.max_per_certificate) else {
        shared
            .metrics
            .handshake_failed("certificate_connection_limit");
        if let Some(held_back) = conn_log::CERTIFICATE_LIMIT.allow() {
            let peer = client.identity.name();
            tracing::warn!(listener = name, %remote, peer, limit = shared.max_per_certificate, held_back, "connection limit of this client certificate reached; closing");
        }
        return;
    };
    let _active = ActiveGuard::new(shared.metrics.active.clone());
    let info = Arc::new(ConnInfo::new(remote, client, shared.tls.clone(), counted));
    // The protocol is the one ALPN negotiated (h2 over TLS requires ALPN, RFC 9113 §3.2); no
    // sniffing of the first bytes, so a silent client meets the header read timeout.
    let negotiated_h2 = handshaken.alpn.as_deref() == Some(b"h2".as_slice());
    // The chain is not kept for the life of the connection (one copy per certificate is, with
    // its identity).
    drop(handshaken);
    if negotiated_h2 && shared.http2 {
        Box::pin(serve_h2(&shared, stream, info)).await;
    } else {
        Box::pin(crate::h1::serve(
            stream,
            info,
            shared.handler.clone(),
            shared.h1.clone(),
            shared.draining.clone(),
        ))
        .await;
    }
}

/// An HTTP/2 connection (hyper's server): each request in a task of its own, the streams
/// watched for stalled readers and idleness, a GOAWAY at shutdown.
async fn serve_h2<H, Fut, B>(
    shared: &Listener<H>,
    stream: Box<crate::tls::stream::ServerStream<tokio::net::TcpStream>>,
    info: Arc<ConnInfo>,
) where
    H: Fn(Arc<ConnInfo>, Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (name, remote) = (shared.name, info.remote);
    // For the connection's own checks and log lines (`info` moves into the service).
    let conn_info = info.clone();
    let (idle_limit, send_limit) = (shared.idle_limit, shared.send_limit);
    let (max_headers, max_header_bytes) = (shared.max_headers, shared.max_header_bytes);
    let on_refused = shared.metrics.on_refused.clone();
    let requests = shared.requests.clone();
    let request_stop = shared.request_stop.clone();
    let handler = shared.handler.clone();
    let activity = crate::h2watch::Activity::new();
    let streams = activity.clone();
    let draining = shared.draining.clone();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        // Open from now until its response body is done.
        let stream = streams.opened();
        let streams = streams.clone();
        // The limits HTTP/1.1's parser applies: the field count (hyper's HTTP/2 bounds only
        // the header list's size) and the size, as RFC 9113 counts a header list.
        let refused =
            if req.headers().len() > max_headers || header_list_size(&req) > max_header_bytes {
                Some(crate::h1::HeadError::TooLarge)
            } else {
                h2_authority_problem(&req).map(crate::h1::HeadError::Host)
            };
        let task = match refused {
            // The connection was sent a GOAWAY for its client's refusals (over their budget),
            // and the client goes on opening streams (h2's graceful GOAWAY admits them until
            // the client answers its PING, which a hostile one never does): each is reset
            // with REFUSED_STREAM (nothing was done; a client may send it again on a new
            // connection), neither run, answered nor audited.
            _ if info.close_requested() => Err(None),
            Some(problem) => {
                let hold = on_refused.as_ref().and_then(|tell| {
                    tell(
                        &info,
                        RefusedHead {
                            status: problem.status(),
                            reason: problem.label(),
                        },
                    )
                });
                Err(Some((
                    problem.status(),
                    hold.map(|hold| (hold, draining.clone())),
                )))
            }
            // Its own task: hyper drops a stream's future when the client resets the stream,
            // and a request already forwarded must still get its outcome record (as over
            // HTTP/1.1, where a closed connection does not stop it).
            None => Ok(requests.spawn(
                request_stop
                    .clone()
                    .run_until_cancelled_owned(handler(info.clone(), req.map(RequestBody::http2))),
            )),
        };
        async move {
            match task {
                Ok(task) => match task.await {
                    Ok(Some(resp)) => {
                        Ok(resp.map(|body| Either::Left(streams.watch(body, stream))))
                    }
                    // Stopped at the end of the grace period: the stream is reset, as an
                    // HTTP/1.1 request's connection is closed; its outcome record says it did
                    // not complete, with no status.
                    Ok(None) => Err(StreamEnd::StoppedAtShutdown),
                    // A handler never panics; if one did, its stream gets a 500.
                    Err(_) => Ok(bare(StatusCode::INTERNAL_SERVER_ERROR)),
                },
                Err(None) => Err(StreamEnd::NotTaken(h2::Reason::REFUSED_STREAM.into())),
                Err(Some((status, hold))) => {
                    if let Some((hold, draining)) = hold {
                        // Cut short when the listener drains, as HTTP/1.1's is at shutdown.
                        tokio::select! {
                            _ = tokio::time::sleep(hold) => {}
                            _ = draining.cancelled() => {}
                        }
                    }
                    Ok(bare(status))
                }
            }
        }
    });
    let mut conn = shared.h2.serve_connection(TokioIo::new(*stream), service);
    let mut conn = std::pin::Pin::new(&mut conn);
    let mut check = tokio::time::interval(H2_CHECK_INTERVAL);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A GOAWAY was sent (shutdown or idle); after an idle one, when the connection is given up
    // (at shutdown the grace period bounds it).
    let mut goaway_sent = false;
    let mut give_up: Option<tokio::time::Instant> = None;
    // Since when every open stream has been stalled, after a GOAWAY.
    let mut all_stalled_since: Option<tokio::time::Instant> = None;
    let ended = loop {
        tokio::select! {
            ended = conn.as_mut() => break ended,
            _ = shared.draining.cancelled(), if !goaway_sent => {
                // GOAWAY: streams already open finish, no new ones start.
                conn.as_mut().graceful_shutdown();
                goaway_sent = true;
            }
            () = std::future::poll_fn(|cx| conn_info.close_asked(cx)), if !goaway_sent => {
                // The request path asked (a client over its refusal budget): no new streams;
                // those open finish. At once: a client resetting each held stream and sending
                // the next would have its refusals answered and audited at will until then.
                tracing::debug!(listener = name, %remote, "HTTP/2 connection asked to close; GOAWAY");
                conn.as_mut().graceful_shutdown();
                goaway_sent = true;
                give_up = Some(tokio::time::Instant::now() + H2_CLOSE_LIMIT);
            }
            _ = check.tick() => {
                let verdict = activity.check(idle_limit, send_limit);
                if verdict != crate::h2watch::Verdict::Stalled {
                    all_stalled_since = None;
                }
                match verdict {
                    crate::h2watch::Verdict::Stalled if goaway_sent => {
                        // Like HTTP/1.1's send timeout: the connection goes, and with it the
                        // provider's streams; the outcome records say not completed. Only once
                        // every open stream has been stalled for another send limit: a stream
                        // just done has handed hyper its last frames, which may still be on
                        // their way to the client.
                        let now = tokio::time::Instant::now();
                        let since = *all_stalled_since.get_or_insert(now);
                        if now.duration_since(since) >= send_limit {
                            tracing::info!(listener = name, %remote, ?send_limit, "HTTP/2 client stopped reading its responses; closing");
                            break Ok(());
                        }
                    }
                    crate::h2watch::Verdict::Stalled | crate::h2watch::Verdict::PartlyStalled
                        if !goaway_sent =>
                    {
                        // GOAWAY first (RFC 9113 §6.8): no new streams, and the client learns
                        // which were processed. Streams it reads finish; once only those it
                        // does not read are left, the connection closes (next check).
                        tracing::info!(listener = name, %remote, ?send_limit, "HTTP/2 client stopped reading a response; GOAWAY, its other streams finish");
                        conn.as_mut().graceful_shutdown();
                        goaway_sent = true;
                        // Once no stream is open, the connection goes even if h2 still holds
                        // bytes the client does not take (a last frame handed over).
                        give_up = Some(tokio::time::Instant::now() + send_limit);
                    }
                    crate::h2watch::Verdict::Idle if !goaway_sent => {
                        tracing::debug!(listener = name, %remote, "HTTP/2 connection idle; closing");
                        conn.as_mut().graceful_shutdown();
                        goaway_sent = true;
                        give_up = Some(tokio::time::Instant::now() + H2_CLOSE_LIMIT);
                    }
                    _ if activity.open() == 0
                        && give_up.is_some_and(|at| tokio::time::Instant::now() >= at) =>
                    {
                        // A client that never sent its preface, or ignores the GOAWAY. Never
                        // while a stream is open: those finish (each is bounded by the response,
                        // body and send timeouts), or a request the provider took would come
                        // back as a reset.
                        break Ok(());
                    }
                    _ => {}
                }
            }
        }
    };
    if let Err(e) = ended {
        match h2_violation(&e) {
            Some(reason) => {
                if let Some(c) = &shared.metrics.http2_violations {
                    c.with_label_values(&[reason]).inc();
                }
                // A flood makes one line a second, with the number held back.
                static LOG: crate::loglimit::Every = crate::loglimit::Every::second();
                if let Some(held_back) = LOG.allow() {
                    let peer = conn_info.peer.name();
                    tracing::warn!(listener = name, %remote, peer, reason, held_back, error = %e, "HTTP/2 connection ended: the client broke the protocol or flooded it");
                }
            }
            None => {
                tracing::debug!(listener = name, %remote, error = %e, "connection ended with an error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Handler =
        fn(Arc<ConnInfo>, Request<RequestBody>) -> std::future::Ready<Response<Empty<Bytes>>>;
    type HandlerFuture = std::future::Ready<Response<Empty<Bytes>>>;

    /// The size of the future an async fn of four arguments returns, without calling it.
    fn future_size4<F, A, B, C, D, Out>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> Out,
    {
        std::mem::size_of::<Out>()
    }

    /// The same for five arguments.
    fn future_size5<F, A, B, C, D, E, Out>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D, E) -> Out,
    {
        std::mem::size_of::<Out>()
    }

    /// An idle HTTP/1.1 connection is its task (the `connection` future) and the boxed
    /// `h1::serve` future waiting for the next request, so their sizes count 10,000 times over
    /// at the memory target. Before they were trimmed (debug build): 2,584 bytes with HTTP/2's
    /// connection inline in the task, 864 for `h1::serve` with a refused head's answer and the
    /// socket's readiness future inline.
    #[test]
    fn an_idle_connection_state_is_small() {
        let task = future_size4(connection::<Handler, HandlerFuture, Empty<Bytes>>);
        assert!(task <= 512, "connection future: {task} bytes");
        let serve = future_size5(crate::h1::serve::<Handler, HandlerFuture, Empty<Bytes>>);
        assert!(serve <= 512, "h1::serve future: {serve} bytes");
    }
}
