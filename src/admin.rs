//! The admin listener: plain HTTP/1.1 on loopback for orchestrators and operators —
//! `/healthz` (the process is alive), `/readyz` (it can serve traffic: loaded, not draining,
//! audit trail writable) and `/metrics` (Prometheus text format). It never carries consumer
//! traffic and never exposes request data.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What `/readyz` reports on. Components flip these; the admin listener only reads them.
#[derive(Debug)]
pub struct Readiness {
    /// Certificates, catalogue and directory loaded (set once at start).
    pub loaded: AtomicBool,
    /// Set when shutdown begins, so load balancers stop sending new traffic.
    pub draining: AtomicBool,
    /// The audit writer's view of the trail (`None`: not reported).
    pub audit_writable: Option<Arc<AtomicBool>>,
}

impl Readiness {
    pub fn new() -> Arc<Readiness> {
        Arc::new(Readiness {
            loaded: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            audit_writable: None,
        })
    }

    /// Readiness that also requires the audit trail to be writable.
    pub fn with_audit(audit_writable: Arc<AtomicBool>) -> Arc<Readiness> {
        Arc::new(Readiness {
            loaded: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            audit_writable: Some(audit_writable),
        })
    }

    fn check(&self) -> (bool, String) {
        let loaded = self.loaded.load(Ordering::Acquire);
        let draining = self.draining.load(Ordering::Acquire);
        let audit = self
            .audit_writable
            .as_ref()
            .map_or(true, |w| w.load(Ordering::Acquire));
        let ready = loaded && !draining && audit;
        let body = serde_json::json!({
            "status": if ready { "ready" } else { "not ready" },
            "checks": {
                "configuration_loaded": loaded,
                "draining": draining,
                "audit_writable": audit,
            }
        });
        (ready, body.to_string())
    }
}

/// Serves the admin endpoints until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let readiness = readiness.clone();
        let metrics = metrics.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let readiness = readiness.clone();
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&req, &readiness, &metrics)) }
            });
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

fn answer(
    req: &Request<Incoming>,
    readiness: &Readiness,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    if (req.method(), req.uri().path()) == (&Method::GET, "/metrics") {
        let mut resp = Response::new(Full::new(Bytes::from(metrics.render())));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        return resp;
    }
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, r#"{"status":"ok"}"#.to_string()),
        (&Method::GET, "/readyz") => {
            let (ready, body) = readiness.check();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, body)
        }
        (_, "/healthz" | "/readyz" | "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method not allowed"}"#.to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            r#"{"error":"not found"}"#.to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}
