//! The request path, top to bottom: load shedding -> envelope -> interaction -> directory ->
//! authorise -> rate limit -> JWT -> audit (durable) -> forward -> record. Each step is a pure decision from `ssp`/`authorise` or
//! one I/O call; a rejection at any step is answered here, in one place, as an OperationOutcome.
//! Every request leaves an audit record, a metric sample, an access log line and (when export is
//! on) a span; nothing is forwarded before its audit record is durable.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::server::RequestBody;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::audit::record::Timestamp;
use crate::audit::{Audit, AuditRecord, ClientInfo, RecordKind};
use crate::authorise::{authorise, Facts};
use crate::cors::{self, AllowedOrigins, Grant};
use crate::directory::Directory;
use crate::forward::{BodyCut, BodyEnd, ProxyBody, Upstream, UpstreamFailure};
use crate::metrics::Metrics;
use crate::ratelimit::{Decision, Overload, RateLimiter};
use crate::reload::Reloadable;
use crate::server::ConnInfo;
use crate::ssp::envelope;
use crate::ssp::interactions::Catalogue;
use crate::ssp::jwt::{self, DecodedJwt, JwtClaims, JwtError, JwtPolicy};
use crate::ssp::outcome::{self, Format, Rejection};
use crate::telemetry::{AttrValue, SpanRecord, TraceContext, Tracer};

/// Policy the request path applies, from `[policy]` and the interaction catalogue. Reloaded
/// as one snapshot (SIGHUP, or the config or catalogue file changing); a request keeps the
/// snapshot it started with.
pub struct Policy {
    pub catalogue: Catalogue,
    pub jwt: JwtPolicy,
    pub jwt_clock_skew: Duration,
    pub sharing_agreements: Option<BTreeSet<(String, String)>>,
    /// The web origins whose pages may call through a browser (CORS).
    pub cors_allowed_origins: AllowedOrigins,
}

/// Everything one request needs, shared by all connections.
pub struct Gateway {
    pub policy: Arc<Reloadable<Policy>>,
    pub directory: Directory,
    pub upstream: Upstream,
    pub audit: Audit,
    pub metrics: Arc<Metrics>,
    pub tracer: Tracer,
    /// Per-consumer rate limits (`None`: off).
    pub limiter: Option<RateLimiter>,
    /// Requests needing a directory query, per client certificate (keyed by its SHA-256;
    /// `None`: unbounded).
    pub directory_budget: Option<RateLimiter>,
    /// The gateway's own 4xx refusals answered at once, per client certificate (keyed by its
    /// SHA-256; `None`: no bound): past it each is held `reject_delay`.
    pub refusal_budget: Option<RateLimiter>,
    /// The bound on requests in flight (load shedding).
    pub overload: Overload,
}

/// `Strict-Transport-Security` on every response: consumers must only ever use TLS here.
const HSTS: HeaderValue = HeaderValue::from_static("max-age=31536000");

/// What the request path learnt about one request, for its log line, audit record and span.
#[derive(Default)]
struct Record<'a> {
    trace_id: Option<String>,
    interaction: Option<&'a str>,
    interaction_id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    target_url: Option<String>,
    token: Option<String>,
    reason: Option<&'static str>,
    jwt: Option<Arc<JwtClaims>>,
    jwt_problem: Option<&'static str>,
    preflight: bool,
    /// A `request` record was submitted: the request's last record is an `outcome`.
    audited: bool,
    upstream_latency: Option<Duration>,
    /// Connections tried for the forwarded request (more than 1 after connect retries).
    upstream_attempts: Option<u32>,
    /// Why the provider gave no usable answer, when it did not.
    upstream_failure: Option<UpstreamFailure>,
    request_bytes: Option<Arc<AtomicU64>>,
    /// The rate limiter's refusal, for the 429's headers.
    rate_limit: Option<Decision>,
}

impl<'a> Record<'a> {
    /// The Spine headers a request refused before its envelope passed as a whole declared,
    /// each that is well formed on its own ([`envelope::declared`]). The declared ID only: the
    /// interaction's name (the metrics' label) stays unknown for such a request.
    fn declared(&mut self, req: &Request<RequestBody>) {
        let declared = envelope::declared(req.headers());
        self.trace_id = declared.trace_id.map(str::to_owned);
        self.from = declared.from.map(str::to_owned);
        self.to = declared.to.map(str::to_owned);
        self.interaction_id = declared.interaction_id.map(str::to_owned);
    }
}

/// Guards a request while it is processed: if its future is dropped before the response took
/// the outcome over (the grace period ran out at shutdown), its record is written here, with
/// `completed: false` and no status, so no request is left without one: the outcome record
/// after a request record (the provider had not answered), or else its one record, a
/// rejection with the reason `stopped_at_shutdown` (it was still being checked: waiting on the
/// directory, or on an HTTP/2 GET's end); and its access line.
struct Unfinished<'g, 'r, 'a> {
    gateway: &'g Gateway,
    conn: &'g ConnInfo,
    ctx: &'g Ctx,
    record: &'r mut Record<'a>,
    armed: bool,
}

impl Drop for Unfinished<'_, '_, '_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let text = RecordText::new(self.ctx);
        let latency_us = self.ctx.started.elapsed().as_micros() as u64;
        if self.record.audited {
            let mut outcome =
                audit_record(RecordKind::Outcome, self.conn, self.ctx, self.record, &text);
            outcome.completed = Some(false);
            outcome.request_bytes = request_bytes(self.record);
            outcome.total_latency_us = Some(latency_us);
            self.gateway.audit.enqueue(&outcome);
            tracing::warn!(
                request_id = %self.ctx.request_id,
                "request stopped before the provider answered; outcome recorded as not completed"
            );
        } else {
            self.record.reason = Some(STOPPED_AT_SHUTDOWN);
            let mut rejection = audit_record(
                RecordKind::Rejection,
                self.conn,
                self.ctx,
                self.record,
                &text,
            );
            rejection.completed = Some(false);
            rejection.total_latency_us = Some(latency_us);
            self.gateway.audit.enqueue(&rejection);
            tracing::warn!(
                request_id = %self.ctx.request_id,
                "request stopped at shutdown before it was forwarded; recorded as not completed"
            );
        }
        // Its access line too, like every request's: status 0, as nothing was answered.
        self.gateway
            .access_log(self.conn, self.ctx, self.record, 0, latency_us);
    }
}

/// The reason of the record of a request stopped at shutdown before it was forwarded.
const STOPPED_AT_SHUTDOWN: &str = "stopped_at_shutdown";

/// The fixed facts of one request.
struct Ctx {
    request_id: uuid::Uuid,
    started: Instant,
    start_time: SystemTime,
    method: Method,
    raw_target: String,
    trace: TraceContext,
}

impl Gateway {
    /// Answers one request. Never fails: every problem becomes an OperationOutcome.
    pub async fn handle(
        &self,
        conn: Arc<ConnInfo>,
        req: Request<RequestBody>,
    ) -> Response<ProxyBody> {
        let ctx = Ctx {
            request_id: crate::telemetry::new_request_id(),
            started: Instant::now(),
            start_time: SystemTime::now(),
            method: req.method().clone(),
            raw_target: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            trace: TraceContext::continue_or_start(req.headers()),
        };
        let policy = self.policy.current();
        let mut record = Record::default();
        let format = response_format(&req);
        let version = req.version();
        // What a browser consumer's `Origin` is granted (no `Origin`: one header lookup).
        let cors = policy.cors_allowed_origins.judge(req.headers());

        // Load shedding first: past the bound, answer at once rather than queue.
        let mut permit = self.overload.try_acquire();
        let result = match permit {
            Some(_) => {
                let mut unfinished = Unfinished {
                    gateway: self,
                    conn: &conn,
                    ctx: &ctx,
                    record: &mut record,
                    armed: true,
                };
                let result = self
                    .process(&policy, &conn, req, unfinished.record, &ctx, &cors)
                    .await;
                unfinished.armed = false;
                result
            }
            None => Err(Rejection::Overloaded),
        };
        let rate_limited = record.rate_limit.is_some();
        if rate_limited {
            // A refused request gives its in-flight slot back at once: its 429 is held below.
            drop(permit.take());
        }
        let mut response = match result {
            Ok(resp) => resp,
            Err(rejection) => {
                record.token = Some(rejection.token());
                record.reason = Some(rejection.reason());
                let text = hint(&rejection, &policy, &record, &ctx);
                let mut resp = reject(&rejection, format, &ctx.request_id, text.as_deref());
                if let Some(decision) = &record.rate_limit {
                    decision.apply_headers(resp.headers_mut());
                } else if rejection == Rejection::Overloaded {
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                } else if matches!(rejection, Rejection::CertificateNoLongerAccepted { .. })
                    && version < http::Version::HTTP_2
                {
                    // The connection ends with this answer; a new one meets the handshake's
                    // refusal. (HTTP/2 has no such field: each later stream is refused alike.)
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            }
        };
        response
            .headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, HSTS);
        cors.apply(response.headers_mut());
        if ctx.method == Method::HEAD {
            // Only ever refused (405), and a HEAD answer has no body: hyper resets an HTTP/2
            // stream whose HEAD answer sends one.
            *response.body_mut() = ProxyBody::empty();
        }

        let status = response.status().as_u16();
        let elapsed = ctx.started.elapsed();
        let latency_us = elapsed.as_micros() as u64;
        self.metrics
            .observe_request(record.interaction, status, elapsed.as_secs_f64());
        if let Some(reason) = record.reason {
            self.metrics.rejections.with_label_values(&[reason]).inc();
        }
        if let Some(failure) = record.upstream_failure {
            self.metrics
                .upstream_failures
                .with_label_values(&[failure.as_label()])
                .inc();
        }
        if let Some(upstream) = record.upstream_latency {
            let interaction = record
                .interaction
                .unwrap_or(crate::metrics::UNKNOWN_INTERACTION);
            self.metrics
                .upstream_duration
                .with_label_values(&[interaction])
                .observe(upstream.as_secs_f64());
            self.metrics
                .overhead_duration
                .with_label_values(&[interaction])
                .observe(elapsed.saturating_sub(upstream).as_secs_f64());
        }
        if tracing::enabled!(target: "ssp_gateway::access", tracing::Level::INFO) {
            self.access_log(&conn, &ctx, &record, status, latency_us);
        }
        self.record_span(&ctx, &record, status);
        // The gateway's own refusal of what the consumer sent (4xx, not a 429: those are held
        // below anyway), over the certificate's budget for answering them at once.
        let refusal_held = match record.reason {
            Some(_) if !rate_limited && (400..500).contains(&status) => {
                self.hold_refusal(&conn, version == http::Version::HTTP_2)
            }
            _ => None,
        };
        let response = self.record_outcome(&conn, &ctx, record, response);
        // Both limiters hold the configured `reject_delay`, as does the refusal budget.
        let hold = match (rate_limited, refusal_held) {
            (true, _) => self
                .limiter
                .as_ref()
                .or(self.directory_budget.as_ref())
                .map(RateLimiter::reject_delay),
            (false, held) => held,
        };
        if let Some(delay) = hold {
            // A flood of refusals must not take the CPU from other consumers: the answer waits
            // (its in-flight slot given back first), so a connection (or HTTP/2 stream) gets one
            // per delay.
            drop(permit);
            tokio::time::sleep(delay).await;
        }
        response
    }

    /// One of the gateway's own refusals of what a client sent: `None` while the client
    /// certificate's refusals are within their budget (`rate_limit.refusals_per_second`), else
    /// how long to hold the answer. Over HTTP/2, the connection is also asked to close: holding
    /// a stream is undone by opening another (a new connection costs the client a handshake).
    fn hold_refusal(&self, conn: &ConnInfo, http2: bool) -> Option<Duration> {
        let budget = self.refusal_budget.as_ref()?;
        if budget
            .check(&conn.peer.fingerprint_sha256, Instant::now())
            .allowed
        {
            return None;
        }
        self.metrics.refusals_held.inc();
        if http2 {
            conn.request_close();
        }
        static LOG: crate::loglimit::Every = crate::loglimit::Every::second();
        if let Some(held_back) = LOG.allow() {
            let peer = conn.peer.name();
            tracing::warn!(client = %conn.remote, peer, held_back, delay = ?budget.reject_delay(), "this client certificate's refusals are over their budget; each is held");
        }
        Some(budget.reject_delay())
    }

    /// A request head refused before any handler saw it (`server::RefusedHead`): counted in
    /// `ssp_http_refused_heads_total`, audited as `REQUEST_HEAD_REFUSED_<REASON>`, and within
    /// the same refusal budget as the request path's own refusals: past it the answer is held
    /// and an HTTP/2 connection is closed (its later streams refused unseen), so a client's
    /// refused heads cost it a held answer per connection, or a new connection. Returns how
    /// long to hold the answer.
    pub fn refused_head(
        &self,
        conn: &ConnInfo,
        head: crate::server::RefusedHead,
    ) -> Option<Duration> {
        self.metrics
            .http_refused_heads
            .with_label_values(&[head.reason])
            .inc();
        let client = crate::audit::ClientInfo {
            address: conn.remote,
            certificate: conn.peer.clone(),
        };
        self.audit
            .refused_head(client, head.status.as_u16(), head.reason);
        // Only the client's faults (4xx), as for the request path: a 501 for a coding the
        // gateway does not take is not one. A refused HTTP/1.1 head ends its connection anyway:
        // asking it to close is harmless.
        if !head.status.is_client_error() {
            return None;
        }
        self.hold_refusal(conn, true)
    }

    /// The request's last audit record: a `rejection` or `preflight` now, or the `outcome` of a
    /// forwarded request when its response body has ended.
    fn record_outcome(
        &self,
        conn: &Arc<ConnInfo>,
        ctx: &Ctx,
        record: Record<'_>,
        response: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let kind = if record.audited {
            RecordKind::Outcome
        } else if record.preflight {
            RecordKind::Preflight
        } else {
            RecordKind::Rejection
        };
        let status = response.status().as_u16();
        let forwarded = record.audited && record.token.is_none();
        if !forwarded {
            let text = RecordText::new(ctx);
            let mut audit_record = audit_record(kind, conn, ctx, &record, &text);
            audit_record.status = Some(status);
            audit_record.total_latency_us = Some(ctx.started.elapsed().as_micros() as u64);
            audit_record.request_bytes = request_bytes(&record);
            self.audit.enqueue(&audit_record);
            return response;
        }
        // The outcome is written when the response body ends: what it says is moved (not
        // copied) out of the request path's record, and written from there then. A body the
        // provider stalled or broke off is logged with the request's ids and counted then too.
        let audit = self.audit.clone();
        let metrics = Arc::clone(&self.metrics);
        let conn = Arc::clone(conn);
        let ctx = Ctx {
            request_id: ctx.request_id,
            started: ctx.started,
            start_time: ctx.start_time,
            method: ctx.method.clone(),
            // Only written when the target URL did not parse.
            raw_target: match record.target_url {
                Some(_) => String::new(),
                None => ctx.raw_target.clone(),
            },
            trace: ctx.trace,
        };
        let record = record.into_outcome();
        response.map(move |body| {
            ProxyBody::observed(
                body,
                Box::new(
                    move |end: BodyEnd, error: Option<&(dyn std::error::Error + 'static)>| {
                        if let Some(cut) = end.cut {
                            body_cut(&metrics, &ctx, &record, end, cut, error);
                        }
                        let text = RecordText::new(&ctx);
                        let mut audit_record = audit_record(kind, &conn, &ctx, &record, &text);
                        audit_record.status = Some(status);
                        audit_record.response_bytes = Some(end.bytes);
                        audit_record.completed = Some(end.completed);
                        audit_record.request_bytes = request_bytes(&record);
                        audit_record.total_latency_us =
                            Some(ctx.started.elapsed().as_micros() as u64);
                        audit.enqueue(&audit_record);
                    },
                ),
            )
        })
    }

    /// The request's access-log line. With a JSON log it is formatted here, with the fields of
    /// `tracing`'s JSON formatter, and handed to the log writer: the generic formatter cost
    /// about 5% of a request's CPU.
    fn access_log(
        &self,
        conn: &ConnInfo,
        ctx: &Ctx,
        record: &Record<'_>,
        status: u16,
        latency_us: u64,
    ) {
        let mut id = uuid::Uuid::encode_buffer();
        let trace = ctx.trace.trace_id_hex_bytes();
        let line = AccessLine {
            request_id: ctx.request_id.hyphenated().encode_lower(&mut id),
            trace_id: record.trace_id.as_deref().unwrap_or("-"),
            interaction: record.interaction.unwrap_or("-"),
            from: record.from.as_deref().unwrap_or("-"),
            to: record.to.as_deref().unwrap_or("-"),
            client: conn.remote,
            peer: conn.peer.name(),
            method: ctx.method.as_str(),
            status,
            latency_us,
            token: record.token.as_deref().unwrap_or("-"),
            reason: record.reason.unwrap_or("-"),
            upstream_failure: record
                .upstream_failure
                .map_or("-", UpstreamFailure::as_label),
            jwt_problem: record.jwt_problem.unwrap_or("-"),
            // Lowercase hex digits only.
            otel_trace_id: std::str::from_utf8(&trace).unwrap_or("-"),
        };
        if crate::logwriter::json() {
            let now = Timestamp::now();
            crate::logwriter::write_line(access_json_line(now.as_str(), &line).as_bytes());
        } else {
            tracing::info!(
                target: "ssp_gateway::access",
                request_id = line.request_id,
                trace_id = line.trace_id,
                interaction = line.interaction,
                from = line.from,
                to = line.to,
                client = %line.client,
                peer = line.peer,
                method = line.method,
                status,
                latency_us,
                token = line.token,
                reason = line.reason,
                upstream_failure = line.upstream_failure,
                jwt_problem = line.jwt_problem,
                otel_trace_id = line.otel_trace_id,
                "request"
            );
        }
    }

    fn record_span(&self, ctx: &Ctx, record: &Record<'_>, status: u16) {
        if !self.tracer.exporting() || !ctx.trace.sampled {
            return;
        }
        let mut attributes = vec![
            ("ssp.request_id", AttrValue::Str(ctx.request_id.to_string())),
            (
                "http.request.method",
                AttrValue::Str(ctx.method.to_string()),
            ),
            (
                "http.response.status_code",
                AttrValue::Int(i64::from(status)),
            ),
        ];
        let strings = [
            ("ssp.trace_id", record.trace_id.as_deref()),
            ("ssp.interaction", record.interaction_id.as_deref()),
            ("ssp.interaction.name", record.interaction),
            ("ssp.from_asid", record.from.as_deref()),
            ("ssp.to_asid", record.to.as_deref()),
            ("ssp.rejection.reason", record.reason),
        ];
        for (key, value) in strings {
            if let Some(v) = value {
                attributes.push((key, AttrValue::Str(v.to_owned())));
            }
        }
        if let Some(up) = record.upstream_latency {
            attributes.push((
                "ssp.upstream.duration_us",
                AttrValue::Int(up.as_micros() as i64),
            ));
        }
        self.tracer.record(SpanRecord {
            context: ctx.trace,
            name: format!(
                "{} {}",
                ctx.method,
                record
                    .interaction
                    .unwrap_or(crate::metrics::UNKNOWN_INTERACTION)
            ),
            start: ctx.start_time,
            end: SystemTime::now(),
            attributes,
            error: (status >= 500).then(|| record.reason.unwrap_or("provider error").to_owned()),
        });
    }

    async fn process<'a>(
        &'a self,
        policy: &'a Policy,
        conn: &ConnInfo,
        mut req: Request<RequestBody>,
        record: &mut Record<'a>,
        ctx: &Ctx,
        cors: &Grant,
    ) -> Result<Response<ProxyBody>, Rejection> {
        // An HTTP/2 GET whose HEADERS did not end its stream: whether its body is empty after
        // all is waited for (up to EMPTY_BODY_WAIT) only once the consumer is proven, within
        // its rate and its JWT checked, about to be forwarded: streams held open by anyone
        // else, such as a certificate registered nowhere, are refused at once instead of
        // holding the gateway's in-flight slots while they wait.
        let h2_get_open = req.method() == Method::GET
            && req.version() == http::Version::HTTP_2
            && !http_body::Body::is_end_stream(req.body())
            && !declares_content(&req);
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());

        // 0. The connection's client certificate, judged again when a reload of the CA bundle
        //    or the CRLs, or its expiry, may have changed the handshake's verdict.
        if let Err(failure) = conn.certificate_standing() {
            // Who the refused request said it was from, for the audit record, where it says.
            record.declared(&req);
            if let Ok(target) = envelope::parse_target(path_and_query) {
                record.target_url = Some(target.url().to_owned());
            }
            return Err(Rejection::CertificateNoLongerAccepted {
                reason: failure.as_label(),
            });
        }

        // CORS preflight for a known interaction.
        if req.method() == Method::OPTIONS {
            record.preflight = true;
            return self.preflight(policy, &req, path_and_query, cors);
        }

        // The bearer token, decoded once: its claims are audited whatever happens next.
        // Two tokens: the one checked here need not be the one the provider reads.
        let mut authorizations = req.headers().get_all(header::AUTHORIZATION).iter();
        let token = match (authorizations.next(), authorizations.next()) {
            (first, None) => jwt::parse(first),
            (_, Some(_)) => Err(jwt::JwtError::MultipleAuthorization),
        };
        if let Ok(decoded) = &token {
            record.jwt = Some(decoded.shared_claims());
        }

        // 1. The SSP envelope: method, target URL, Ssp-* headers. A request refused here has
        //    its target and what it declared well formed in its audit record all the same.
        let target = envelope::parse_target(path_and_query);
        if let Ok(target) = &target {
            record.target_url = Some(target.url().to_owned());
        }
        if let Err(mut rejection) = envelope::check_method(req.method()) {
            record.declared(&req);
            // A method the gateway never takes: `Allow` names what the target takes.
            if let (Rejection::MethodNotAllowed { allow, .. }, Ok(target)) =
                (&mut rejection, &target)
            {
                *allow = policy.catalogue.allow_for_target(target);
            }
            return Err(rejection);
        }
        let target = target.inspect_err(|_| record.declared(&req))?;
        let headers =
            envelope::parse_headers(req.headers()).inspect_err(|_| record.declared(&req))?;
        record.trace_id = Some(headers.trace_id.clone());
        record.from = Some(headers.from.clone());
        record.to = Some(headers.to.clone());
        record.interaction_id = Some(headers.interaction_id.clone());

        // 2. The declared interaction, and the request matching its method and path.
        let interaction = policy
            .catalogue
            .get(&headers.interaction_id)
            .ok_or_else(|| Rejection::UnsupportedInteraction {
                id: headers.interaction_id.clone(),
            })?;
        record.interaction = Some(interaction.name.as_str());
        let matched = interaction.match_request(req.method(), &target)?;
        // No GP Connect GET has a body. One sent anyway is refused, never forwarded: a provider
        // that ignores Content-Length on a GET would read the body as the next request on a
        // pooled connection other consumers share (and HTTP/2 to the provider would drop it).
        if bodiless(&interaction.method) && !h2_get_open && carries_body(&req) {
            return Err(Rejection::BodyNotAllowed {
                method: interaction.method.as_str().to_owned(),
            });
        }

        // 3. The directory: both parties, looked up together (cached). A certificate that names
        //    ASIDs not cached makes the gateway query the directory before anything shows it is
        //    registered: such requests are bounded per certificate.
        if let Some(budget) = &self.directory_budget {
            if !(self.directory.is_cached(&headers.from) && self.directory.is_cached(&headers.to)) {
                let decision = budget.check(&conn.peer.fingerprint_sha256, Instant::now());
                if !decision.allowed {
                    record.rate_limit = Some(decision);
                    return Err(Rejection::DirectoryQueriesExceeded);
                }
            }
        }
        let (sender, receiver) = tokio::join!(
            self.directory.party(&headers.from),
            self.directory.party(&headers.to)
        );
        let (sender, receiver) = match (sender, receiver) {
            (Ok(s), Ok(r)) => (s, r),
            (sender, receiver) => {
                // The sender's checks come first: one the directory answered for (cached, say)
                // and that fails them is refused as such, not with 503.
                if let Ok(sender) = &sender {
                    crate::authorise::check_sender(
                        &headers,
                        interaction,
                        &conn.peer,
                        sender.as_deref(),
                    )?;
                }
                if let Some(e) = sender.err().or(receiver.err()) {
                    static LOG: crate::loglimit::Every = crate::loglimit::Every::second();
                    if let Some(held_back) = LOG.allow() {
                        tracing::error!(error = %e, held_back, "directory lookup failed");
                    }
                }
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
            sharing_agreements: policy.sharing_agreements.as_ref(),
        })?;

        // 5. The consumer's rate limit (its certificate is proven to be Ssp-From's by now, so
        //    one consumer cannot spend another's tokens).
        if let Some(limiter) = &self.limiter {
            let decision = limiter.check(&headers.from, Instant::now());
            if !decision.allowed {
                record.rate_limit = Some(decision);
                return Err(Rejection::RateLimited {
                    sender: headers.from.clone(),
                });
            }
        }
        // 6. The JWT, per policy.
        self.check_jwt(policy, &token, &interaction.scopes, record)?;

        // The HTTP/2 GET left open at its HEADERS (see above): no body after all, or refused.
        if h2_get_open {
            match settle_empty_body(req.body_mut()).await {
                Settled::Empty => {}
                Settled::Body => {
                    return Err(Rejection::BodyNotAllowed {
                        method: interaction.method.as_str().to_owned(),
                    })
                }
                // Reset or cut off by the consumer before its end: not a body it sent.
                Settled::Broken => return Err(Rejection::InvalidRequestBody),
            }
        }

        // The optional body cap: a declared length over it is refused before anything is sent
        // or audited as about to be (the refusal is the request's one record).
        let cap = self.upstream.max_request_body();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let (Some(cap), Some(len)) = (cap, declared) {
            if len > cap {
                return Err(Rejection::BodyTooLarge);
            }
        }

        // A provider host whose circuit is open: failed fast, before the request is audited as
        // about to be forwarded (nothing is sent; the refusal is its one record).
        if let Some(open) = self.upstream.circuit_refuses(&target, &ctx.request_id) {
            return Err(open);
        }

        // 7. The audit record, durable before the provider sees anything.
        record.audited = true;
        let text = RecordText::new(ctx);
        let request_record = audit_record(RecordKind::Request, conn, ctx, record, &text);
        if let Err(e) = self.audit.commit(&request_record).await {
            static LOG: crate::loglimit::Every = crate::loglimit::Every::second();
            if let Some(held_back) = LOG.allow() {
                tracing::error!(request_id = %ctx.request_id, error = %e, held_back, "audit record not written; request refused");
            }
            // Refused by the trail, the request record will never be written: the refusal is
            // the request's one record. Only one that timed out may still land, and is then
            // followed by its outcome.
            record.audited = matches!(e, crate::audit::AuditError::Timeout);
            return Err(Rejection::AuditUnavailable);
        }

        // 8. Forward to the registered endpoint, with this span as the provider's parent; the
        //    provider's answer passes back unchanged.
        let request_bytes = Arc::new(AtomicU64::new(0));
        record.request_bytes = Some(request_bytes.clone());
        let sent = Instant::now();
        let forwarded = self
            .upstream
            .forward_counted(
                req,
                &target,
                conn.remote,
                &ctx.trace.traceparent(),
                request_bytes,
                &ctx.request_id,
            )
            .await;
        // The provider's time: only when it answered or its side failed (not an open circuit,
        // nothing sent; nor the consumer's body failing, the consumer's time).
        if forwarded.attempts > 0 && (forwarded.answer.is_ok() || forwarded.failure.is_some()) {
            record.upstream_latency = Some(sent.elapsed());
        }
        record.upstream_attempts = Some(forwarded.attempts);
        record.upstream_failure = forwarded.failure;
        // A streamed body that went past the cap was cut off: say so, not "provider error".
        let over_cap =
            |bytes: &AtomicU64| cap.is_some_and(|cap| bytes.load(Ordering::Relaxed) > cap);
        let resp = match forwarded.answer {
            Err(_) if record.request_bytes.as_deref().is_some_and(over_cap) => {
                return Err(Rejection::BodyTooLarge)
            }
            other => other?,
        };
        Ok(resp.map(ProxyBody::Upstream))
    }

    fn check_jwt(
        &self,
        policy: &Policy,
        token: &Result<DecodedJwt, JwtError>,
        scopes: &[String],
        record: &mut Record<'_>,
    ) -> Result<(), Rejection> {
        if policy.jwt == JwtPolicy::Off {
            return Ok(());
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let skew = policy.jwt_clock_skew.as_secs() as i64;
        let problem = match token {
            Ok(decoded) => decoded.validate(scopes, now, skew).err(),
            Err(e) => Some(e.clone()),
        };
        match problem {
            None => Ok(()),
            Some(e) => {
                record.jwt_problem = Some(e.reason());
                if policy.jwt == JwtPolicy::Log {
                    Ok(())
                } else {
                    Err(Rejection::InvalidJwt { reason: e.reason() })
                }
            }
        }
    }

    /// Answers a CORS preflight: the methods the catalogue allows on this target (for the
    /// declared interaction when the header is sent), granted to an allowed origin. One from an
    /// origin not allowed is refused (403): the browser then sends nothing more. One without
    /// `Origin` (not a browser: the SSP test pack) still gets the methods, and no grant unless
    /// any origin is allowed.
    fn preflight(
        &self,
        policy: &Policy,
        req: &Request<RequestBody>,
        path_and_query: &str,
        cors: &Grant,
    ) -> Result<Response<ProxyBody>, Rejection> {
        if *cors == Grant::NotAllowed {
            let origin = req
                .headers()
                .get(header::ORIGIN)
                .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned())
                .unwrap_or_default();
            return Err(Rejection::CorsOriginNotAllowed { origin });
        }
        let target = envelope::parse_target(path_and_query)?;
        let declared = req
            .headers()
            .get("ssp-interactionid")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        if let Some(id) = declared {
            // The declared interaction must fit the path; the answer still lists every method
            // the path allows (the SSP test pack expects `GET, PUT` for `Appointment/{id}`
            // whichever of read, amend and cancel is declared).
            let ix = policy
                .catalogue
                .get(id)
                .ok_or_else(|| Rejection::UnsupportedInteraction { id: id.to_string() })?;
            // Only the path is the interaction's to check: the request is OPTIONS, and a
            // mismatch says so.
            ix.match_preflight(&target)?;
        }
        let allowed = policy.catalogue.methods_text(&target);
        if allowed.is_empty() {
            return Err(Rejection::MethodNotAllowed {
                method: Method::OPTIONS.to_string(),
                allow: String::new(),
            });
        }
        let mut builder = Response::builder().status(StatusCode::OK);
        // An allowed origin's grant (and its `Vary`) is added by `Grant::apply`, as on every
        // answer; without `Origin`, the answer still depends on it, and `["*"]` grants `*`.
        if *cors == Grant::NoOrigin {
            builder = builder.header(header::VARY, "Origin");
            if policy.cors_allowed_origins.is_any() {
                builder = builder.header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*");
            }
        }
        builder = builder
            .header(header::ACCESS_CONTROL_ALLOW_HEADERS, cors::ALLOW_HEADERS)
            .header(header::ACCESS_CONTROL_MAX_AGE, "600")
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

/// The fields of one access-log line. (`Serialize` only for the test that holds
/// `access_json_line` to what serde_json writes.)
#[cfg_attr(test, derive(serde::Serialize))]
struct AccessLine<'a> {
    request_id: &'a str,
    trace_id: &'a str,
    interaction: &'a str,
    from: &'a str,
    to: &'a str,
    client: std::net::SocketAddr,
    peer: &'a str,
    method: &'a str,
    status: u16,
    latency_us: u64,
    token: &'a str,
    /// The rejection's bounded reason (`Rejection::reason`), as in `ssp_rejections_total`.
    reason: &'a str,
    /// Why the provider gave no usable answer (`forward::UpstreamFailure`), or `-`.
    upstream_failure: &'a str,
    jwt_problem: &'a str,
    otel_trace_id: &'a str,
}

/// The access line with the members `tracing-subscriber`'s flattened JSON formatter gives it
/// (timestamp, level, message, the fields, target); one line with its newline. Written by the
/// [`crate::jsonw`] writer: the same bytes serde_json writes for it (a test compares them).
fn access_json_line(timestamp: &str, fields: &AccessLine<'_>) -> String {
    // Room for the whole line (about 600 bytes), so the buffer is not grown.
    let mut line = Vec::with_capacity(1024);
    let mut o = crate::jsonw::Object::new(&mut line);
    o.str("timestamp", timestamp);
    o.str("level", "INFO");
    o.str("message", "request");
    o.str("request_id", fields.request_id);
    o.str("trace_id", fields.trace_id);
    o.str("interaction", fields.interaction);
    o.str("from", fields.from);
    o.str("to", fields.to);
    o.socket_addr("client", fields.client);
    o.str("peer", fields.peer);
    o.str("method", fields.method);
    o.uint("status", u64::from(fields.status));
    o.uint("latency_us", fields.latency_us);
    o.str("token", fields.token);
    o.str("reason", fields.reason);
    o.str("upstream_failure", fields.upstream_failure);
    o.str("jwt_problem", fields.jwt_problem);
    o.str("otel_trace_id", fields.otel_trace_id);
    o.str("target", "ssp_gateway::access");
    o.end();
    line.push(b'\n');
    // Only `&str`s and ASCII were written.
    String::from_utf8(line).unwrap_or_else(|_| String::from("\n"))
}

impl Record<'_> {
    /// What the outcome record of a forwarded request writes, moved out of the request path's
    /// record (no copies) so that it can be written once the response body has ended.
    fn into_outcome(self) -> Record<'static> {
        Record {
            trace_id: self.trace_id,
            interaction_id: self.interaction_id,
            from: self.from,
            to: self.to,
            target_url: self.target_url,
            token: self.token,
            jwt: self.jwt,
            jwt_problem: self.jwt_problem,
            audited: self.audited,
            upstream_latency: self.upstream_latency,
            upstream_attempts: self.upstream_attempts,
            upstream_failure: self.upstream_failure,
            request_bytes: self.request_bytes,
            ..Record::default()
        }
    }
}

/// The text a record writes of its time and its request's ids, on the stack.
struct RecordText {
    time: Timestamp,
    request_id: [u8; uuid::fmt::Hyphenated::LENGTH],
    trace_id: [u8; 32],
}

impl RecordText {
    /// Now, for the request of `ctx`.
    fn new(ctx: &Ctx) -> RecordText {
        let mut request_id = [0; uuid::fmt::Hyphenated::LENGTH];
        ctx.request_id.hyphenated().encode_lower(&mut request_id);
        RecordText {
            time: Timestamp::now(),
            request_id,
            trace_id: ctx.trace.trace_id_hex_bytes(),
        }
    }
}

/// The audit record of `kind` for what is known about the request so far, borrowing its text
/// from the request (written into the trail's line by `Audit::commit` or `enqueue`).
fn audit_record<'a>(
    kind: RecordKind,
    conn: &ConnInfo,
    ctx: &'a Ctx,
    record: &'a Record<'_>,
    text: &'a RecordText,
) -> AuditRecord<'a> {
    let borrowed = |s: &'a Option<String>| s.as_deref().map(Cow::Borrowed);
    AuditRecord {
        kind,
        time: Cow::Borrowed(text.time.as_str()),
        // Only ASCII (hex digits and hyphens) was written.
        request_id: Cow::Borrowed(std::str::from_utf8(&text.request_id).unwrap_or_default()),
        ssp_trace_id: borrowed(&record.trace_id),
        trace_id: Some(Cow::Borrowed(
            std::str::from_utf8(&text.trace_id).unwrap_or_default(),
        )),
        from: borrowed(&record.from),
        to: borrowed(&record.to),
        interaction: borrowed(&record.interaction_id),
        method: Cow::Borrowed(ctx.method.as_str()),
        target_url: Cow::Borrowed(record.target_url.as_deref().unwrap_or(&ctx.raw_target)),
        client: ClientInfo {
            address: conn.remote,
            certificate: conn.peer.clone(),
        },
        jwt: record.jwt.clone(),
        jwt_problem: record.jwt_problem,
        status: None,
        token: borrowed(&record.token),
        reason: record.reason,
        request_bytes: None,
        response_bytes: None,
        upstream_latency_us: record.upstream_latency.map(|d| d.as_micros() as u64),
        upstream_attempts: record.upstream_attempts.filter(|n| *n > 1),
        upstream_failure: record.upstream_failure.map(UpstreamFailure::as_label),
        total_latency_us: None,
        completed: None,
    }
}

/// A forwarded response whose provider body stalled or broke off after its head was passed on
/// (the consumer's status is the provider's; its body ends broken): counted in
/// `ssp_upstream_bodies_cut_total{reason}` and logged with the request id and the target URL
/// (without its query, as the forwarder's lines), so that it can be joined with the access line
/// and the outcome record (`completed: false`). Only on that path is anything formatted.
fn body_cut(
    metrics: &Metrics,
    ctx: &Ctx,
    record: &Record<'_>,
    end: BodyEnd,
    cut: BodyCut,
    error: Option<&(dyn std::error::Error + 'static)>,
) {
    metrics
        .upstream_bodies_cut
        .with_label_values(&[cut.as_str()])
        .inc();
    let url = record
        .target_url
        .as_deref()
        .map_or("-", |u| u.split_once('?').map_or(u, |(path, _)| path));
    let error = error.map(crate::forward::error_chain).unwrap_or_default();
    match cut {
        BodyCut::Stalled => tracing::warn!(
            request_id = %ctx.request_id,
            target_url = url,
            response_bytes = end.bytes,
            error,
            "the provider's response body stalled; the response is cut off"
        ),
        BodyCut::Broken => tracing::warn!(
            request_id = %ctx.request_id,
            target_url = url,
            response_bytes = end.bytes,
            error,
            "the provider's response body broke off; the response is cut off"
        ),
    }
}

fn request_bytes(record: &Record<'_>) -> Option<u64> {
    record
        .request_bytes
        .as_ref()
        .map(|b| b.load(Ordering::Relaxed))
}

/// Methods whose requests have no body (of those the catalogue may use: GET, POST, PUT).
fn bodiless(method: &Method) -> bool {
    *method == Method::GET
}

/// Whether the request comes with a body, from its framing alone (nothing is read): a
/// `Content-Length` other than 0, or a body that does not end with its head (HTTP/1.1 chunked
/// or a length over 0; an HTTP/2 stream that its HEADERS frame did not end and that
/// [`settle_empty_body`] did not find empty).
fn carries_body(req: &Request<RequestBody>) -> bool {
    use http_body::Body as _;
    !req.body().is_end_stream() || declares_content(req)
}

/// A `Content-Length` other than 0.
fn declares_content(req: &Request<RequestBody>) -> bool {
    req.headers()
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .any(|v| {
            !v.as_bytes()
                .iter()
                .all(|b| matches!(b, b'0' | b',' | b' ' | b'\t'))
        })
}

/// How long an HTTP/2 GET's stream may take to end after HEADERS that did not end it.
const EMPTY_BODY_WAIT: Duration = Duration::from_secs(5);

/// An HTTP/2 request whose HEADERS frame did not end its stream may still have no body: RFC
/// 9113 lets a client end it with an empty DATA frame, and some clients send a GET so. Awaits
/// the stream's end (empty DATA frames skipped, at most [`EMPTY_BODY_WAIT`]): see [`Settled`].
/// What was read of a body is not kept, since it is never forwarded.
async fn settle_empty_body(body: &mut RequestBody) -> Settled {
    use http_body_util::BodyExt as _;
    let deadline = tokio::time::Instant::now() + EMPTY_BODY_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(None) => {
                *body = RequestBody::empty();
                return Settled::Empty;
            }
            Ok(Some(Ok(frame))) if frame.data_ref().is_some_and(bytes::Bytes::is_empty) => {}
            Ok(Some(Ok(_))) | Err(_) => return Settled::Body,
            Ok(Some(Err(_))) => return Settled::Broken,
        }
    }
}

/// How an HTTP/2 GET's stream left open at its HEADERS ended ([`settle_empty_body`]).
enum Settled {
    /// Without a byte: the body is replaced by an empty one.
    Empty,
    /// A byte or a trailer came, or it did not end in time: refused as a GET with a body.
    Body,
    /// The stream failed before its end (reset by the consumer, its connection gone): refused
    /// as a body broken off (`INVALID_REQUEST_BODY`), not as a body it never sent.
    Broken,
}

/// The format the consumer wants errors in: `_format` in the target's query, then `Accept`,
/// then the request's own `Content-Type` (see [`outcome::negotiate_request`]). Worked out before
/// the request is handed on, since only then are its headers still to hand.
fn response_format<B>(req: &Request<B>) -> Format {
    let text = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    outcome::negotiate_request(
        text(header::ACCEPT),
        text(header::CONTENT_TYPE),
        req.uri().query(),
    )
}

/// What to fix, in words, for the answer's `details.text`: the rejection's own hint, or
/// what only the request shows (a refused target URL's problem; the declared interaction's
/// method and path, or the scopes it allows when the JWT's is not one of them).
fn hint(
    rejection: &Rejection,
    policy: &Policy,
    record: &Record<'_>,
    ctx: &Ctx,
) -> Option<Cow<'static, str>> {
    match rejection {
        Rejection::InvalidTargetUrl => envelope::target_problem(&ctx.raw_target).map(Cow::Borrowed),
        Rejection::InvalidJwt {
            reason: "SCOPE_NOT_ALLOWED",
        } => {
            let id = record.interaction_id.as_deref()?;
            let ix = policy.catalogue.get(id)?;
            Some(Cow::Owned(format!(
                "requested_scope must be {} for {}",
                ix.scopes.join(" or "),
                ix.id
            )))
        }
        Rejection::InteractionMismatch { id, .. } => {
            let ix = policy.catalogue.get(id)?;
            let mut text = format!(
                "{} is {} [endpoint]/{}",
                ix.id,
                ix.method.as_str(),
                ix.path()
            );
            if ctx.raw_target.contains("%24") {
                text.push_str("; an operation's `$` is sent as is, not as %24");
            }
            Some(Cow::Owned(text))
        }
        _ => rejection.hint().map(Cow::Borrowed),
    }
}

/// Renders a rejection as the gateway's OperationOutcome response, with `text` (what to fix,
/// in words: [`hint`]) as its `details.text`.
fn reject(
    rejection: &Rejection,
    format: Format,
    request_id: &uuid::Uuid,
    text: Option<&str>,
) -> Response<ProxyBody> {
    let id = request_id.to_string();
    let rendered = outcome::render_with_text(rejection, format, &id, text);
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
    if let Rejection::MethodNotAllowed { allow, .. } = rejection {
        // The target's methods (RFC 9110 §15.5.6); empty on a path no interaction has.
        if let Ok(v) = HeaderValue::from_str(allow) {
            h.insert(header::ALLOW, v);
        }
    }
    if let Rejection::InvalidJwt { reason } = rejection {
        // RFC 6750 §3.1, which GP Connect's JWT guidance follows: no error code when there was
        // no bearer token (none, or another scheme); a token that is not acceptable is an
        // `invalid_request` (400).
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(if matches!(*reason, "MISSING" | "NOT_BEARER") {
                "Bearer"
            } else {
                "Bearer error=\"invalid_request\""
            }),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_line_is_one_json_object_with_every_field_escaped() {
        let id = crate::telemetry::new_request_id().to_string();
        let line = access_json_line(
            "2026-11-25T16:00:00.000001Z",
            &AccessLine {
                request_id: &id,
                trace_id: "7c1f0e2a-0000-4000-8000-000000000001",
                interaction: "search-slots",
                from: "200000000359",
                to: "918999198993",
                client: "127.0.0.1:5000".parse().expect("addr"),
                peer: "odd \"name\"\\\n\u{1}é",
                method: "GET",
                status: 200,
                latency_us: 1234,
                token: "-",
                reason: "-",
                upstream_failure: "tls_certificate_expired",
                jwt_problem: "-",
                otel_trace_id: "0af7651916cd43dd8448eb211c80319c",
            },
        );
        assert!(
            line.ends_with("}\n") && line.matches('\n').count() == 1,
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["peer"], "odd \"name\"\\\n\u{1}é");
        assert_eq!(v["request_id"], id);
        assert_eq!(v["target"], "ssp_gateway::access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "request");
        assert_eq!(v["status"], 200);
        assert_eq!(v["latency_us"], 1234);
        assert_eq!(v["client"], "127.0.0.1:5000");
        assert_eq!(v["reason"], "-");
        assert_eq!(v["upstream_failure"], "tls_certificate_expired");
        assert_eq!(v.as_object().expect("object").len(), 19);
    }

    /// The hand-written line is byte for byte what serde_json wrote for it before (the
    /// fields of `tracing`'s flattened JSON formatter, in its order).
    #[test]
    fn the_access_line_is_what_serde_json_writes_for_it() {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            timestamp: &'a str,
            level: &'static str,
            message: &'static str,
            #[serde(flatten)]
            fields: &'a AccessLine<'a>,
            target: &'static str,
        }
        let odd = ["plain", "odd \"name\"\\\n\u{1}é", "", "\u{7f}\u{2028}\t/"];
        for (i, text) in odd.iter().enumerate() {
            let client: std::net::SocketAddr = if i % 2 == 0 {
                "127.0.0.1:5000".parse().expect("addr")
            } else {
                "[2001:db8::1]:443".parse().expect("addr")
            };
            let fields = AccessLine {
                request_id: text,
                trace_id: text,
                interaction: text,
                from: text,
                to: text,
                client,
                peer: text,
                method: text,
                status: 100 + i as u16,
                latency_us: u64::MAX - i as u64,
                token: text,
                reason: text,
                upstream_failure: text,
                jwt_problem: text,
                otel_trace_id: text,
            };
            let mut expected = serde_json::to_string(&Json {
                timestamp: text,
                level: "INFO",
                message: "request",
                fields: &fields,
                target: "ssp_gateway::access",
            })
            .expect("json");
            expected.push('\n');
            assert_eq!(access_json_line(text, &fields), expected);
        }
    }
}

#[cfg(test)]
mod future_size {
    use super::*;

    /// The size of the future a method of two arguments returns, without calling it.
    fn returned<'a, A: 'a, B, C, Fut, F: FnOnce(&'a A, B, C) -> Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// [`returned`] for a method of one borrowed argument.
    fn returned1<'a, A: 'a, B: ?Sized + 'a, Fut, F: FnOnce(&'a A, &'a B) -> Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// A request's future is copied whole where it is boxed (once per request, with its
    /// HTTP/1.1 exchange), so what only a rare path needs is boxed on that path: the directory
    /// lookup's refresh (its backend query) took 1 KB of each lookup's future, twice per
    /// request (6.6 KB in all before, 5.1 KB after, in a debug build).
    #[test]
    fn the_request_future_holds_no_directory_refresh() {
        let party = returned1(crate::directory::Directory::party);
        assert!(party <= 1024, "Directory::party's future: {party} bytes");
        let handle = returned(Gateway::handle);
        assert!(handle <= 5632, "Gateway::handle's future: {handle} bytes");
    }
}
