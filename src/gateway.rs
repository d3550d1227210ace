//! The request path, top to bottom: envelope -> interaction -> directory -> authorise -> JWT ->
//! forward -> log. Each step is a pure decision from `ssp`/`authorise` or one I/O call; a
//! rejection at any step is answered here, in one place, as an OperationOutcome.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::authorise::{authorise, Facts};
use crate::directory::Directory;
use crate::forward::{ProxyBody, Upstream};
use crate::server::ConnInfo;
use crate::ssp::envelope;
use crate::ssp::interactions::Catalogue;
use crate::ssp::jwt::{self, JwtPolicy};
use crate::ssp::outcome::{self, Format, Rejection};

/// The headers a consumer may send, listed in CORS preflight answers.
const CORS_ALLOW_HEADERS: &str = "Accept, Authorization, Content-Type, If-Match, Prefer, \
     Ssp-TraceID, Ssp-From, Ssp-To, Ssp-InteractionID";

/// Policy the request path applies, from `[policy]`.
pub struct Policy {
    pub jwt: JwtPolicy,
    pub jwt_clock_skew: Duration,
    pub sharing_agreements: Option<BTreeSet<(String, String)>>,
}

/// Everything one request needs, shared by all connections.
pub struct Gateway {
    pub catalogue: Catalogue,
    pub directory: Directory,
    pub policy: Policy,
    pub upstream: Upstream,
}

/// What the access log line says about one request.
#[derive(Default)]
struct Record<'a> {
    trace_id: Option<String>,
    interaction: Option<&'a str>,
    from: Option<String>,
    to: Option<String>,
    token: Option<String>,
    jwt_problem: Option<&'static str>,
}

impl Gateway {
    /// Answers one request. Never fails: every problem becomes an OperationOutcome.
    pub async fn handle(&self, conn: Arc<ConnInfo>, req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let request_id = uuid::Uuid::new_v4();
        let method = req.method().clone();
        let mut record = Record::default();
        let format = response_format(&req);

        let response = match self.process(&conn, req, &mut record).await {
            Ok(resp) => resp,
            Err(rejection) => {
                record.token = Some(rejection.token());
                reject(&rejection, format, &request_id)
            }
        };

        let status = response.status().as_u16();
        let latency_us = started.elapsed().as_micros() as u64;
        tracing::info!(
            target: "ssp_gateway::access",
            request_id = %request_id,
            trace_id = record.trace_id.as_deref().unwrap_or("-"),
            interaction = record.interaction.unwrap_or("-"),
            from = record.from.as_deref().unwrap_or("-"),
            to = record.to.as_deref().unwrap_or("-"),
            client = %conn.remote,
            peer = conn.peer.names.first().map(String::as_str).unwrap_or("-"),
            method = %method,
            status,
            latency_us,
            token = record.token.as_deref().unwrap_or("-"),
            jwt_problem = record.jwt_problem.unwrap_or("-"),
            "request"
        );
        response
    }

    async fn process<'a>(
        &'a self,
        conn: &ConnInfo,
        req: Request<Incoming>,
        record: &mut Record<'a>,
    ) -> Result<Response<ProxyBody>, Rejection> {
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());

        // CORS preflight for a known interaction.
        if req.method() == Method::OPTIONS {
            return self.preflight(&req, path_and_query);
        }

        // 1. The SSP envelope: method, target URL, Ssp-* headers.
        envelope::check_method(req.method())?;
        let target = envelope::parse_target(path_and_query)?;
        let headers = envelope::parse_headers(req.headers())?;
        record.trace_id = Some(headers.trace_id.clone());
        record.from = Some(headers.from.clone());
        record.to = Some(headers.to.clone());

        // 2. The declared interaction, and the request matching its method and path.
        let interaction = self.catalogue.get(&headers.interaction_id).ok_or_else(|| {
            Rejection::UnsupportedInteraction {
                id: headers.interaction_id.clone(),
            }
        })?;
        record.interaction = Some(interaction.name.as_str());
        let matched = interaction.match_request(req.method(), &target)?;

        // 3. The directory: both parties, looked up together (cached).
        let (sender, receiver) = tokio::join!(
            self.directory.party(&headers.from),
            self.directory.party(&headers.to)
        );
        let (sender, receiver) = match (sender, receiver) {
            (Ok(s), Ok(r)) => (s, r),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "directory lookup failed");
                return Err(Rejection::DirectoryUnavailable);
            }
        };

        // 4. Authorise: sender, identity, receiver, sharing agreement, endpoint.
        authorise(&Facts {
            headers: &headers,
            interaction,
            target: &target,
            matched: &matched,
            peer: &conn.peer,
            sender: sender.as_deref(),
            receiver: receiver.as_deref(),
            sharing_agreements: self.policy.sharing_agreements.as_ref(),
        })?;

        // 5. The JWT, per policy.
        self.check_jwt(&req, &interaction.scopes, record)?;

        // 6. Forward to the registered endpoint; the provider's answer passes back unchanged.
        let resp = self.upstream.forward(req, &target, conn.remote).await?;
        Ok(resp.map(ProxyBody::Upstream))
    }

    fn check_jwt(
        &self,
        req: &Request<Incoming>,
        scopes: &[String],
        record: &mut Record<'_>,
    ) -> Result<(), Rejection> {
        let authorization = req.headers().get(header::AUTHORIZATION);
        match self.policy.jwt {
            JwtPolicy::Off => Ok(()),
            JwtPolicy::Enforce | JwtPolicy::Log => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                let skew = self.policy.jwt_clock_skew.as_secs() as i64;
                match jwt::check(authorization, scopes, now, skew) {
                    Ok(_) => Ok(()),
                    Err(e) if self.policy.jwt == JwtPolicy::Log => {
                        record.jwt_problem = Some(e.reason());
                        Ok(())
                    }
                    Err(e) => Err(Rejection::InvalidJwt { reason: e.reason() }),
                }
            }
        }
    }

    /// Answers a CORS preflight: the methods the catalogue allows on this target (for the
    /// declared interaction when the header is sent).
    fn preflight(
        &self,
        req: &Request<Incoming>,
        path_and_query: &str,
    ) -> Result<Response<ProxyBody>, Rejection> {
        let target = envelope::parse_target(path_and_query)?;
        let declared = req
            .headers()
            .get("ssp-interactionid")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        let methods: Vec<Method> = match declared {
            Some(id) => {
                let ix = self
                    .catalogue
                    .get(id)
                    .ok_or_else(|| Rejection::UnsupportedInteraction { id: id.to_string() })?;
                ix.match_request(&ix.method, &target)?;
                vec![ix.method.clone()]
            }
            None => self.catalogue.methods_for_target(&target),
        };
        if methods.is_empty() {
            return Err(Rejection::MethodNotAllowed {
                method: Method::OPTIONS.to_string(),
            });
        }
        let allowed = methods
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .cloned()
            .unwrap_or(HeaderValue::from_static("*"));
        let mut builder = Response::builder()
            .status(StatusCode::OK)
            .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)
            .header(header::ACCESS_CONTROL_ALLOW_HEADERS, CORS_ALLOW_HEADERS)
            .header(header::ACCESS_CONTROL_MAX_AGE, "600")
            .header(header::VARY, "Origin")
            .header(header::CACHE_CONTROL, "no-store");
        if let Ok(v) = HeaderValue::from_str(&allowed) {
            // The SSP test pack reads the allowed methods from Access-Control-Request-Method.
            builder = builder
                .header(header::ACCESS_CONTROL_ALLOW_METHODS, v.clone())
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, v);
        }
        builder
            .body(ProxyBody::empty())
            .map_err(|_| Rejection::InvalidTargetUrl)
    }
}

/// The format the consumer wants errors in: `_format` in the target's query, then `Accept`.
fn response_format<B>(req: &Request<B>) -> Format {
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    outcome::negotiate(accept, req.uri().query())
}

/// Renders a rejection as the gateway's OperationOutcome response.
pub fn reject(
    rejection: &Rejection,
    format: Format,
    request_id: &uuid::Uuid,
) -> Response<ProxyBody> {
    let id = request_id.to_string();
    let rendered = outcome::render(rejection, format, &id);
    let mut resp = Response::new(ProxyBody::full(rendered.body));
    *resp.status_mut() = rejection.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(rendered.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert("x-request-id", v);
    }
    if rejection.status() == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(
            header::ALLOW,
            HeaderValue::from_static("GET, POST, PUT, OPTIONS"),
        );
    }
    resp
}
