//! Accepting connections: TCP, the TLS handshake under a timeout, the peer's identity, then
//! HTTP/1.1 or HTTP/2 (by ALPN / preface) with graceful shutdown. Shared by the gateway listener
//! and the mock provider; what a request means is the service's business, not this module's.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::tls::{peer_identity, HandshakeFailure, PeerIdentity};

/// What the request path knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// The verified client certificate's identity.
    pub peer: PeerIdentity,
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
}

/// What a listener counts about its connections (the gateway's metrics; empty for others).
#[derive(Clone, Default)]
pub struct ConnMetrics {
    /// Connections open now (after the handshake).
    pub active: Option<prometheus::IntGauge>,
    /// Failed handshakes by `HandshakeFailure` label, or `timeout`, `unreadable_certificate`.
    pub handshake_failures: Option<prometheus::IntCounterVec>,
}

impl ConnMetrics {
    fn handshake_failed(&self, reason: &str) {
        if let Some(c) = &self.handshake_failures {
            c.with_label_values(&[reason]).inc();
        }
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

/// Serves mTLS connections from `listener` until `shutdown` is cancelled, then stops accepting
/// and waits up to the grace period for open connections to finish their requests.
pub async fn serve_tls<H, Fut, B>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    opts: ServeOptions,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Arc<ConnInfo>, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
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

/// `serve_tls`, counting connections and handshake failures in `metrics`.
pub async fn serve_tls_observed<H, Fut, B>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    opts: ServeOptions,
    metrics: ConnMetrics,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Arc<ConnInfo>, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    if !opts.http2 {
        builder = builder.http1_only();
    }
    let builder = Arc::new(builder);

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
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(listener = opts.name, %remote, error = %e, "set_nodelay failed");
        }
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = opts.handshake_timeout;
        let name = opts.name;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    let reason = HandshakeFailure::classify(&e).as_label();
                    metrics.handshake_failed(reason);
                    tracing::info!(listener = name, %remote, reason, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.handshake_failed("timeout");
                    tracing::info!(listener = name, %remote, "TLS handshake timed out");
                    return;
                }
            };
            let leaf = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first());
            let peer = match leaf.map(peer_identity) {
                Some(Ok(peer)) => peer,
                Some(Err(e)) => {
                    metrics.handshake_failed("unreadable_certificate");
                    tracing::info!(listener = name, %remote, error = %e, "unreadable client certificate");
                    return;
                }
                None => {
                    metrics.handshake_failed(HandshakeFailure::NoClientCertificate.as_label());
                    tracing::info!(listener = name, %remote, "no client certificate");
                    return;
                }
            };
            let _active = ActiveGuard::new(metrics.active.clone());
            let info = Arc::new(ConnInfo { remote, peer });
            let service = hyper::service::service_fn(move |req| {
                let fut = handler(info.clone(), req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(listener = name, %remote, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(opts.grace_period, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = opts.name,
            grace_period = ?opts.grace_period,
            "grace period over; closing connections with requests still in flight"
        );
    }
}
