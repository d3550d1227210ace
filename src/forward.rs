//! Forwarding to the provider: one shared, pooled mTLS client; the request and response bodies
//! stream through untouched; hop-by-hop headers are dropped, `Host` becomes the provider's and
//! the forwarding headers are the gateway's own. It only ever sends to a target URL that
//! `authorise` has proven to be a registered endpoint; it never decides where to go itself.

use std::error::Error as StdError;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::breaker::{endpoint_key, is_retryable_connect_error, Breakers, Ticket};
use crate::config::UpstreamConfig;
use crate::reload::Reloadable;
use crate::ssp::envelope::Target;
use crate::ssp::outcome::Rejection;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The upstream side of the gateway: a pooled HTTP/1.1 client over mTLS.
pub struct Upstream {
    client: Client<TlsConnector, Counted<Incoming>>,
    response_timeout: Duration,
    /// Per-host circuit breakers, and the gauge that shows their state.
    breakers: Option<(Breakers, Option<prometheus::IntGaugeVec>)>,
    /// The optional request-body cap, bytes.
    max_request_body: Option<u64>,
}

impl Upstream {
    /// The pooled mTLS client, counting failed connections in `connect_errors` (label
    /// `reason`: `timeout`, `tcp`, `tls`, `other`) when given.
    pub fn with_metrics(
        config: &UpstreamConfig,
        tls: Arc<Reloadable<rustls::ClientConfig>>,
        connect_errors: Option<prometheus::IntCounterVec>,
    ) -> Upstream {
        let connector = TlsConnector {
            tls,
            connect_timeout: config.connect_timeout,
            connect_errors,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .build(connector);
        Upstream {
            client,
            response_timeout: config.response_timeout,
            breakers: None,
            max_request_body: config.max_request_body,
        }
    }

    /// The optional request-body cap, bytes.
    pub fn max_request_body(&self) -> Option<u64> {
        self.max_request_body
    }

    /// Fails fast (502) to a provider host whose circuit is open; `state` shows each host's
    /// circuit (closed 0, open 1, half-open 2).
    pub fn with_breakers(
        mut self,
        breakers: Breakers,
        state: Option<prometheus::IntGaugeVec>,
    ) -> Upstream {
        self.breakers = Some((breakers, state));
        self
    }

    /// Asks the host's breaker for leave to send; `Err` when its circuit is open.
    fn ticket(&self, key: &str, url: &str) -> Result<Option<Ticket>, Rejection> {
        let Some((breakers, _)) = &self.breakers else {
            return Ok(None);
        };
        match breakers.before(key, Instant::now()) {
            Ok(ticket) => Ok(Some(ticket)),
            Err(open) => {
                tracing::warn!(host = key, %open, "circuit open: failing fast");
                Err(Rejection::UpstreamError {
                    url: url.to_owned(),
                })
            }
        }
    }

    /// Publishes the host's circuit state after a verdict.
    fn show_state(&self, key: &str) {
        if let Some((breakers, Some(gauge))) = &self.breakers {
            if let Some(state) = breakers.state(key) {
                gauge
                    .with_label_values(&[key])
                    .set(i64::from(state.metric_value()));
            }
        }
    }

    /// Sends the consumer's request to `target` (already authorised) and returns the provider's
    /// response head with its body still streaming, counting request body bytes in
    /// `request_bytes`. Connect, TLS or protocol failures are 502; no response head within the
    /// response timeout is 504.
    pub async fn forward_counted(
        &self,
        req: Request<Incoming>,
        target: &Target,
        client_addr: SocketAddr,
        request_bytes: Arc<AtomicU64>,
    ) -> Result<Response<Incoming>, Rejection> {
        let limit = self.max_request_body;
        let mut req = req.map(|body| Counted {
            limit,
            inner: body,
            bytes: request_bytes,
        });
        let url = target.without_query().to_string();
        let uri: Uri = match target.url().parse() {
            Ok(uri) => uri,
            Err(_) => return Err(Rejection::UpstreamError { url }),
        };
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        prepare_request_headers(req.headers_mut(), client_addr);

        let key = endpoint_key(target.authority());
        let ticket = self.ticket(&key, &url)?;
        // Connect failures are not retried here: the request body streams and cannot be
        // replayed, and a request a provider may have processed is never sent twice. (hyper
        // itself re-sends only a request that no byte of was written to a pooled connection
        // that had closed.)
        let result = tokio::time::timeout(self.response_timeout, self.client.request(req)).await;
        let answer = match result {
            Err(_) => {
                if let Some(t) = ticket {
                    t.failure(Instant::now());
                }
                Err(Rejection::UpstreamTimeout { url })
            }
            Ok(Err(e)) => {
                if let Some(t) = ticket {
                    if is_retryable_connect_error(&e) {
                        t.failure(Instant::now());
                    }
                }
                tracing::warn!(target_url = %url, error = %error_chain(&e), "upstream request failed");
                Err(Rejection::UpstreamError { url })
            }
            Ok(Ok(mut resp)) => {
                if let Some(t) = ticket {
                    t.success();
                }
                strip_hop_by_hop(resp.headers_mut());
                Ok(resp)
            }
        };
        self.show_state(&key);
        answer
    }
}

/// Formats an error with its sources, for logs (never for consumers).
pub fn error_chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including any named in `Connection`.
/// `Transfer-Encoding` is hyper's to set per hop and is removed too.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// Makes the consumer's headers fit for the provider: hop-by-hop ones removed, `Host` left for
/// the client to set from the target, `Expect` answered here rather than passed on, and the
/// forwarding headers replaced with the gateway's own view of the client.
pub fn prepare_request_headers(headers: &mut HeaderMap, client: SocketAddr) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::EXPECT);
    headers.remove(header::FORWARDED);
    headers.remove(HeaderName::from_static("x-forwarded-for"));
    headers.remove(HeaderName::from_static("x-forwarded-proto"));
    headers.remove(HeaderName::from_static("x-forwarded-host"));
    let ip = client.ip();
    let forwarded = match ip {
        IpAddr::V4(v4) => format!("for={v4};proto=https"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto=https"),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, v);
    }
    if let Ok(v) = HeaderValue::from_str(&ip.to_string()) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
}

/// Connects to a provider: TCP (no Nagle) then TLS with the gateway's client certificate, all
/// within the connect timeout.
/// The client configuration is read per connection, so a reloaded client certificate is used
/// by new connections while pooled ones finish with the old one.
#[derive(Clone)]
pub struct TlsConnector {
    tls: Arc<Reloadable<rustls::ClientConfig>>,
    connect_timeout: Duration,
    connect_errors: Option<prometheus::IntCounterVec>,
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsConn>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = tokio_rustls::TlsConnector::from(self.tls.current());
        let limit = self.connect_timeout;
        let errors = self.connect_errors.clone();
        Box::pin(async move {
            let result = match tokio::time::timeout(limit, connect(tls, uri)).await {
                Ok(result) => result,
                Err(_) => Err((
                    "timeout",
                    format!("connect timed out after {limit:?}").into(),
                )),
            };
            result.map_err(|(reason, e)| {
                if let Some(errors) = &errors {
                    errors.with_label_values(&[reason]).inc();
                }
                e
            })
        })
    }
}

/// Connects, naming the step that failed (the `reason` label of connect errors).
async fn connect(
    tls: tokio_rustls::TlsConnector,
    uri: Uri,
) -> Result<TokioIo<TlsConn>, (&'static str, BoxError)> {
    if uri.scheme_str() != Some("https") {
        return Err(("other", "upstream scheme must be https".into()));
    }
    let host = uri
        .host()
        .ok_or(("other", BoxError::from("upstream URL has no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let server_name =
        ServerName::try_from(host.to_string()).map_err(|e| ("other", BoxError::from(e)))?;
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| ("tcp", BoxError::from(e)))?;
    tcp.set_nodelay(true)
        .map_err(|e| ("tcp", BoxError::from(e)))?;
    let stream = tls
        .connect(server_name, tcp)
        .await
        .map_err(|e| ("tls", BoxError::from(e)))?;
    Ok(TokioIo::new(TlsConn(stream)))
}

/// An established mTLS connection to a provider.
pub struct TlsConn(tokio_rustls::client::TlsStream<TcpStream>);

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A request body on its way to the provider, counting the bytes that pass.
pub struct Counted<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
    /// Past this many bytes the body fails (the optional request-body cap).
    limit: Option<u64>,
}

/// The request body went past the configured cap.
#[derive(Debug, thiserror::Error)]
#[error("request body is over the configured cap of {0} bytes")]
pub struct BodyTooLarge(pub u64);

impl<B> http_body::Body for Counted<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let total =
                    this.bytes.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
                if let Some(limit) = this.limit.filter(|limit| total > *limit) {
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge(limit)))));
                }
            }
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How a response body ended, for the audit outcome record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyEnd {
    /// Body bytes that passed to the consumer.
    pub bytes: u64,
    /// `true` when the body reached its end; `false` when it was abandoned (consumer gone) or
    /// failed (provider error mid-body).
    pub completed: bool,
}

/// Called once when an observed body ends or is dropped.
pub type OnBodyEnd = Box<dyn FnOnce(BodyEnd) + Send + Sync>;

/// A response body whose end is reported.
pub struct Observed {
    inner: ProxyBody,
    bytes: u64,
    on_end: Option<OnBodyEnd>,
}

impl Observed {
    fn finish(&mut self, completed: bool) {
        if let Some(on_end) = self.on_end.take() {
            on_end(BodyEnd {
                bytes: self.bytes,
                completed,
            });
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // hyper may stop polling once the body says it is at its end.
        let completed = http_body::Body::is_end_stream(&self.inner);
        self.finish(completed);
    }
}

/// The body of a response the gateway sends: its own OperationOutcome, or the provider's
/// body streaming through (observed, when its end is to be reported).
pub enum ProxyBody {
    Full(http_body_util::Full<Bytes>),
    Upstream(Incoming),
    Observed(Box<Observed>),
}

impl ProxyBody {
    /// Wraps `body` so that `on_end` learns how it ended, exactly once.
    pub fn observed(body: ProxyBody, on_end: OnBodyEnd) -> ProxyBody {
        ProxyBody::Observed(Box::new(Observed {
            inner: body,
            bytes: 0,
            on_end: Some(on_end),
        }))
    }

    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(http_body_util::Full::new(bytes.into()))
    }

    pub fn empty() -> ProxyBody {
        ProxyBody::full(Bytes::new())
    }
}

impl http_body::Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Observed(o) => {
                let polled = Pin::new(&mut o.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            o.bytes += data.len() as u64;
                        }
                        if http_body::Body::is_end_stream(&o.inner) {
                            o.finish(true);
                        }
                    }
                    Poll::Ready(Some(Err(_))) => o.finish(false),
                    Poll::Ready(None) => o.finish(true),
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_end_stream(),
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Observed(o) => http_body::Body::is_end_stream(&o.inner),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ProxyBody::Full(b) => b.size_hint(),
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Observed(o) => http_body::Body::size_hint(&o.inner),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_forwarding_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::HOST, HeaderValue::from_static("gateway.example"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert(header::FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        h.insert("ssp-traceid", HeaderValue::from_static("kept"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer kept"),
        );
        prepare_request_headers(&mut h, "10.1.2.3:5555".parse().expect("addr"));
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "host",
            "te",
            "upgrade",
            "proxy-authorization",
            "transfer-encoding",
        ] {
            assert!(!h.contains_key(gone), "{gone} should be removed");
        }
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h[header::FORWARDED], "for=10.1.2.3;proto=https");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["ssp-traceid"], "kept");
        assert_eq!(h[header::AUTHORIZATION], "Bearer kept");

        let mut h = HeaderMap::new();
        prepare_request_headers(&mut h, "[::1]:5555".parse().expect("addr"));
        assert_eq!(h[header::FORWARDED], "for=\"[::1]\";proto=https");
    }
}
