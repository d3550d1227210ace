//! The load generator's connections: TCP (no Nagle), the mTLS handshake with the client
//! certificate (never resumed, so each new connection is a full handshake), then HTTP/1.1 or
//! HTTP/2 over it, and sending one request while counting (not keeping) the response body.
//! Every failure is classified for the report; nothing here decides what to send.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Why a request got no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Failure {
    /// TCP connect failed.
    Connect,
    /// The TLS handshake failed.
    Tls,
    /// The HTTP exchange failed (connection reset or closed, protocol error, refused client
    /// certificate surfacing on the first read under TLS 1.3).
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

/// An open connection ready to send requests.
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
}

impl Dialer {
    /// TCP connect, TLS handshake and the HTTP handshake; the connection is driven by a
    /// spawned task that ends when the last sender is dropped or the server closes.
    pub async fn open(&self) -> Result<Sender, Failure> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|_| Failure::Connect)?;
        // Best effort: a request still goes through with Nagle on, only slower.
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|_| Failure::Tls)?;
        let io = TokioIo::new(tls);
        if self.http2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|_| Failure::Http)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(|_| Failure::Http)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H1(sender))
        }
    }
}

/// Sends one request and reads the whole response body, counting its bytes.
pub async fn exchange(sender: &mut Sender, req: Request<Full<Bytes>>) -> Result<Exchange, Failure> {
    let resp = match sender {
        Sender::H1(s) => {
            s.ready().await.map_err(|_| Failure::Http)?;
            s.send_request(req).await.map_err(|_| Failure::Http)?
        }
        Sender::H2(s) => {
            s.ready().await.map_err(|_| Failure::Http)?;
            s.send_request(req).await.map_err(|_| Failure::Http)?
        }
    };
    let status = resp.status();
    let mut body = resp.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Failure::Body)?;
        if let Some(data) = frame.data_ref() {
            bytes += data.len() as u64;
        }
    }
    Ok(Exchange { status, bytes })
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
