//! The admin listener: plain HTTP/1.1 on loopback for orchestrators and operators —
//! `/healthz` (the process is alive), `/readyz` (it can serve traffic: loaded, not draining,
//! audit trail writable, directory backend answering or a cached party servable, the listener's
//! and upstream CRLs not past their nextUpdate; read from state the components keep, never
//! waiting on a backend), `/metrics` (Prometheus text format; `ssp_ready{check}` is `/readyz`'s
//! checks, read at scrape time from the same [`Readiness::checks`]) and
//! `POST /directory/invalidate[?asid=A]` (forget cached directory answers). It never carries
//! consumer traffic and never exposes request data.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
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

use crate::directory::{is_asid, Directory};
use crate::metrics::Metrics;

/// What `/readyz` reports on. Components flip these; the admin listener only reads them.
pub struct Readiness {
    /// Certificates, catalogue and directory loaded (set once at start).
    pub loaded: AtomicBool,
    /// Set when shutdown begins, so load balancers stop sending new traffic.
    pub draining: AtomicBool,
    /// The gateway's directory, for `POST /directory/invalidate` (set once at start).
    pub directory: OnceLock<Directory>,
    /// The audit writer's view of the trail (`None`: not reported).
    pub audit_writable: Option<Arc<AtomicBool>>,
    /// The earliest nextUpdate of each component's CRLs in force (the reader
    /// `ssp_crl_next_update_seconds` and the CRL watcher use; set once at start). Only the
    /// `listener`'s and the `upstream`'s are checks of their own. The `directory`'s (LDAPS
    /// `ldap_crls`) is not: past it, the LDAP connection is retired and every new handshake
    /// fails, so lookups fail and the directory's prober reports the backend down
    /// (`directory_usable`), which is the check that weighs it against the cached parties that
    /// can still be served. A check of its own would make the instance unready while those
    /// cached parties are still served.
    pub crl_horizons: OnceLock<crate::metrics::CrlHorizonsFn>,
}

/// Whether CRLs whose earliest nextUpdate is `horizon` can still be checked against at `now`
/// (unix seconds): a verifier refuses every certificate from the second of nextUpdate on.
fn crls_current(horizon: Option<u64>, now: u64) -> bool {
    horizon.map_or(true, |h| now < h)
}

impl Readiness {
    /// Readiness that also requires the audit trail to be writable.
    pub fn with_audit(audit_writable: Arc<AtomicBool>) -> Arc<Readiness> {
        Arc::new(Readiness {
            loaded: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            directory: OnceLock::new(),
            audit_writable: Some(audit_writable),
            crl_horizons: OnceLock::new(),
        })
    }

    /// Reads what the components keep (atomics, the TLS snapshots in force); never waits on
    /// the directory backend, so `/readyz` and `ssp_ready` answer at once whatever the backend
    /// does. The one source of both.
    pub fn checks(&self) -> Checks {
        let configuration_loaded = self.loaded.load(Ordering::Acquire);
        let draining = self.draining.load(Ordering::Acquire);
        let audit_writable = self
            .audit_writable
            .as_ref()
            .map_or(true, |w| w.load(Ordering::Acquire));
        // The directory is usable when its backend has answered and no probe has failed since
        // (the directory's background prober keeps that: a remote backend counts only once it
        // has answered), or else while a cached party can still be served; cached "not found"
        // answers are never served during an outage, so they do not count.
        let directory_usable = self.directory.get().map_or(true, |d| d.usable());
        // A stale listener CRL fails every handshake (fail closed): the instance serves nobody.
        // A stale provider CRL fails every new provider connection, and the pool is started
        // anew at its nextUpdate: the instance forwards nothing.
        let (mut listener_crls_current, mut upstream_crls_current) = (true, true);
        if let Some(horizons) = self.crl_horizons.get() {
            let now = crate::unix_now();
            for (component, horizon) in horizons() {
                let current = crls_current(horizon, now);
                match component {
                    "listener" => listener_crls_current = current,
                    "upstream" => upstream_crls_current = current,
                    _ => {}
                }
            }
        }
        Checks {
            configuration_loaded,
            draining,
            audit_writable,
            directory_usable,
            listener_crls_current,
            upstream_crls_current,
        }
    }

    /// Registers `ssp_ready{check}` on `metrics`: [`Checks::series`] of [`Readiness::checks`],
    /// read at scrape time, so the metric says what `/readyz` would say at that moment.
    pub fn register_metrics(self: &Arc<Self>, metrics: &Metrics) {
        let readiness = self.clone();
        metrics.register_readiness(Arc::new(move || readiness.checks().series().to_vec()));
    }
}

/// What `/readyz` reports, read at one moment ([`Readiness::checks`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checks {
    pub configuration_loaded: bool,
    /// True once shutdown has begun (the one check where true is bad).
    pub draining: bool,
    pub audit_writable: bool,
    pub directory_usable: bool,
    pub listener_crls_current: bool,
    pub upstream_crls_current: bool,
}

impl Checks {
    /// Whether `/readyz` answers 200: every check passes.
    pub fn ready(&self) -> bool {
        self.configuration_loaded
            && !self.draining
            && self.audit_writable
            && self.directory_usable
            && self.listener_crls_current
            && self.upstream_crls_current
    }

    /// The `ssp_ready{check}` series, each true when it passes: `/readyz`'s checks by their
    /// names, except `draining`, exposed as `not_draining` (true before shutdown begins), so
    /// that 1 always means good; and `all`, true when `/readyz` answers 200.
    pub fn series(&self) -> [(&'static str, bool); 7] {
        [
            ("audit_writable", self.audit_writable),
            ("configuration_loaded", self.configuration_loaded),
            ("directory_usable", self.directory_usable),
            ("not_draining", !self.draining),
            ("listener_crls_current", self.listener_crls_current),
            ("upstream_crls_current", self.upstream_crls_current),
            ("all", self.ready()),
        ]
    }

    /// The `/readyz` body.
    fn body(&self) -> String {
        serde_json::json!({
            "status": if self.ready() { "ready" } else { "not ready" },
            "checks": {
                "configuration_loaded": self.configuration_loaded,
                "draining": self.draining,
                "audit_writable": self.audit_writable,
                "directory_usable": self.directory_usable,
                "listener_crls_current": self.listener_crls_current,
                "upstream_crls_current": self.upstream_crls_current,
            }
        })
        .to_string()
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
                async move {
                    let resp = match directory_route(&req, &readiness).await {
                        Some(resp) => resp,
                        None if req.method() == Method::HEAD => {
                            without_body(answer(&req, &readiness, &metrics).await)
                        }
                        None => answer(&req, &readiness, &metrics).await,
                    };
                    Ok::<_, Infallible>(resp)
                }
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

async fn answer(
    req: &Request<Incoming>,
    readiness: &Readiness,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    // HEAD is answered as GET is (the caller drops the body).
    let method = match req.method() {
        &Method::HEAD => &Method::GET,
        other => other,
    };
    if (method, req.uri().path()) == (&Method::GET, "/metrics") {
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
    let (status, body) = match (method, req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, r#"{"status":"ok"}"#.to_string()),
        (&Method::GET, "/readyz") => {
            let checks = readiness.checks();
            let status = if checks.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, checks.body())
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

/// The answer to a HEAD request: the GET answer's status and headers (its `Content-Length`
/// too), no body.
fn without_body(resp: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let (mut parts, body) = resp.into_parts();
    let len = http_body::Body::size_hint(&body).exact().unwrap_or(0);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    Response::from_parts(parts, Full::new(Bytes::new()))
}

/// `POST /directory/invalidate?asid=A` forgets the cached answer for one ASID (a stale copy
/// too); without `asid`, every cached answer. `None` for any other path.
async fn directory_route(
    req: &Request<Incoming>,
    readiness: &Readiness,
) -> Option<Response<Full<Bytes>>> {
    if req.uri().path() != "/directory/invalidate" {
        return None;
    }
    let json = |status, body: serde_json::Value| {
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        resp
    };
    if req.method() != Method::POST {
        return Some(json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({ "error": "method not allowed: use POST" }),
        ));
    }
    let Some(directory) = readiness.directory.get() else {
        return Some(json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": "the directory is not loaded" }),
        ));
    };
    let mut asid = None;
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("asid", value)) if asid.is_none() && is_asid(value) => asid = Some(value),
            _ => {
                return Some(json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": "the only parameter is asid=<digits>, at most once" }),
                ))
            }
        }
    }
    let body = match asid {
        Some(asid) => {
            directory.invalidate(asid).await;
            tracing::info!(
                asid,
                "directory cache entry invalidated by the admin listener"
            );
            serde_json::json!({ "invalidated": "asid", "asid": asid })
        }
        None => {
            directory.invalidate_all();
            tracing::info!("directory cache emptied by the admin listener");
            serde_json::json!({ "invalidated": "all" })
        }
    };
    Some(json(StatusCode::OK, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crls_are_stale_from_their_next_update_on() {
        assert!(crls_current(None, 1_000));
        assert!(crls_current(Some(1_001), 1_000));
        assert!(!crls_current(Some(1_000), 1_000));
        assert!(!crls_current(Some(999), 1_000));
    }

    fn scraped(metrics: &Metrics) -> Vec<String> {
        String::from_utf8(metrics.render())
            .expect("utf-8")
            .lines()
            .filter(|l| l.starts_with("ssp_ready{"))
            .map(str::to_owned)
            .collect()
    }

    /// `ssp_ready` is read from the same checks as `/readyz`, at each scrape: 1 for a check
    /// that passes, `not_draining` for `draining`, and `all` exactly when `/readyz` says 200.
    #[test]
    fn ssp_ready_follows_the_readyz_checks_at_each_scrape() {
        let writable = Arc::new(AtomicBool::new(true));
        let readiness = Readiness::with_audit(writable.clone());
        let metrics = Metrics::new();
        readiness.register_metrics(&metrics);
        let series = |check: &str, value: u8| format!("ssp_ready{{check=\"{check}\"}} {value}");

        // Not loaded yet.
        let text = scraped(&metrics);
        assert!(
            text.contains(&series("configuration_loaded", 0)),
            "{text:?}"
        );
        assert!(text.contains(&series("all", 0)), "{text:?}");
        assert!(!readiness.checks().ready());

        readiness.loaded.store(true, Ordering::Release);
        let all_good = [
            "audit_writable",
            "configuration_loaded",
            "directory_usable",
            "not_draining",
            "listener_crls_current",
            "upstream_crls_current",
            "all",
        ];
        let text = scraped(&metrics);
        assert_eq!(text.len(), all_good.len(), "{text:?}");
        for check in all_good {
            assert!(text.contains(&series(check, 1)), "{check}: {text:?}");
        }
        assert!(readiness.checks().ready());

        writable.store(false, Ordering::Release);
        let text = scraped(&metrics);
        assert!(text.contains(&series("audit_writable", 0)), "{text:?}");
        assert!(text.contains(&series("all", 0)), "{text:?}");
        assert!(readiness
            .checks()
            .body()
            .contains("\"audit_writable\":false"));
        writable.store(true, Ordering::Release);

        readiness.draining.store(true, Ordering::Release);
        let text = scraped(&metrics);
        assert!(text.contains(&series("not_draining", 0)), "{text:?}");
        assert!(text.contains(&series("audit_writable", 1)), "{text:?}");
        assert!(text.contains(&series("all", 0)), "{text:?}");
        let body = readiness.checks().body();
        assert!(body.contains("\"draining\":true"), "{body}");
        assert!(body.contains("\"status\":\"not ready\""), "{body}");

        // A stale upstream CRL.
        readiness.draining.store(false, Ordering::Release);
        let horizons: crate::metrics::CrlHorizonsFn =
            Arc::new(|| vec![("listener", None), ("upstream", Some(1))]);
        let _ = readiness.crl_horizons.set(horizons);
        let text = scraped(&metrics);
        assert!(
            text.contains(&series("upstream_crls_current", 0)),
            "{text:?}"
        );
        assert!(
            text.contains(&series("listener_crls_current", 1)),
            "{text:?}"
        );
        assert!(text.contains(&series("all", 0)), "{text:?}");
    }
}
