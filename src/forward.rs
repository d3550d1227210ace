//! Forwarding to the provider: one shared, pooled mTLS client; the request and response bodies
//! stream through untouched; hop-by-hop headers are dropped, `Host` becomes the provider's, the
//! forwarding headers are the gateway's own, and the consumer's method and URL overrides and
//! client-identity headers are dropped (see `is_from_consumer`). It only ever sends to a target
//! URL that `authorise` has proven to be a registered endpoint; it never decides where to go
//! itself. A provider's answer whose head hyper accepts but which cannot be passed on as it
//! came (a 1xx final status, `Transfer-Encoding` with `Content-Length`, a transfer coding
//! other than `chunked` alone) is a 502, as one hyper cannot parse is (`malformed_answer`), and
//! so are more than [`MAX_INTERIM_ANSWERS`] interim (1xx) answers before the final one.
//! Each provider answer passed on gets the gateway's `Via` entry, after the provider's.
//!
//! A request whose connection to the provider could not be made is sent again on a new one
//! (`[upstream] connect_retries`); nothing else is ever retried, so a request that reached a
//! provider is never sent twice (see [`Upstream::forward_counted`]).

use std::error::Error as StdError;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::server::RequestBody;
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
use tokio::sync::oneshot;

use crate::breaker::{endpoint_key, is_retryable_connect_error, Breakers, Ticket};
use crate::config::UpstreamConfig;
use crate::reload::Reloadable;
use crate::ssp::envelope::Target;
use crate::ssp::outcome::Rejection;
use arc_swap::ArcSwap;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The upstream side of the gateway: a pooled HTTP/1.1 client over mTLS.
pub struct Upstream {
    /// The upstream TLS in force (reloaded on SIGHUP and file change).
    tls: Arc<Reloadable<crate::tls::UpstreamTls>>,
    /// The connection pool of the TLS configuration in force.
    pool: ArcSwap<Pool>,
    settings: PoolSettings,
    response_timeout: Duration,
    /// The longest wait for the next bytes of a response body ([`UpstreamBody`]).
    body_idle_timeout: Duration,
    /// Connect retries per request, and the backoff before the first.
    connect_retries: u32,
    connect_retry_backoff: Duration,
    /// `ssp_upstream_retries_total{outcome}`.
    retries: Option<prometheus::IntCounterVec>,
    /// Per-host circuit breakers (their state changes are counted and logged as they happen).
    breakers: Option<Breakers>,
    /// The optional request-body cap, bytes.
    max_request_body: Option<u64>,
}

/// Connections to providers, all made with one TLS configuration.
struct Pool {
    tls: Arc<crate::tls::UpstreamTls>,
    /// Unix seconds from which no connection of this pool is used again (see
    /// [`Upstream::pool`]): the CRLs' nextUpdate, when the pool was made before it, lowered by
    /// each new connection to the earliest notAfter of the certificates its provider presented
    /// (`u64::MAX` when neither applies).
    until: Arc<AtomicU64>,
    client: Client<TlsConnector, Reclaimable<Counted<RequestBody>>>,
}

/// What every pool is built with.
struct PoolSettings {
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_host: usize,
    connect_errors: Option<prometheus::IntCounterVec>,
}

impl PoolSettings {
    fn pool(&self, tls: Arc<crate::tls::UpstreamTls>, now: u64) -> Pool {
        let crls_until = tls.crl_horizon.filter(|h| now < *h);
        let until = Arc::new(AtomicU64::new(crls_until.unwrap_or(u64::MAX)));
        let connector = TlsConnector {
            tls: tls.config.clone(),
            connect_timeout: self.connect_timeout,
            connect_errors: self.connect_errors.clone(),
            until: until.clone(),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(self.idle_timeout)
            .pool_max_idle_per_host(self.max_idle_per_host)
            .build(connector);
        Pool { tls, until, client }
    }
}

impl Upstream {
    /// The pooled mTLS client, counting failed connections in `connect_errors` (label
    /// `reason`: `timeout`, `tcp`, `tls`, `other`) when given.
    pub fn with_metrics(
        config: &UpstreamConfig,
        tls: Arc<Reloadable<crate::tls::UpstreamTls>>,
        connect_errors: Option<prometheus::IntCounterVec>,
    ) -> Upstream {
        let settings = PoolSettings {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            max_idle_per_host: config.pool_max_idle_per_host,
            connect_errors,
        };
        let pool = ArcSwap::from_pointee(settings.pool(tls.current(), crate::unix_now()));
        Upstream {
            tls,
            pool,
            settings,
            response_timeout: config.response_timeout,
            body_idle_timeout: config.body_idle_timeout,
            connect_retries: config.connect_retries,
            connect_retry_backoff: config.connect_retry_backoff,
            retries: None,
            breakers: None,
            max_request_body: config.max_request_body,
        }
    }

    /// The optional request-body cap, bytes.
    pub fn max_request_body(&self) -> Option<u64> {
        self.max_request_body
    }

    /// The pool of the upstream TLS configuration in force. After a reload (the client
    /// certificate, the CA bundle, a provider CRL) a new pool is started, so that no connection
    /// made under the old configuration — to a provider whose certificate is now revoked, say
    /// — is used again: the old pool's idle connections close with it, busy ones once their
    /// exchange is done. So too once the provider CRLs' nextUpdate has passed: the new pool's
    /// connections meet the verifier's refusal of a stale CRL, where a connection kept busy
    /// would have gone on being used. And so once a certificate a pooled connection's provider
    /// presented has run out: the handshake checked it was current then, and a connection kept
    /// busy would outlive it. (No upstream session is ever resumed, so each new connection's
    /// handshake checks the provider's certificate: see `tls::upstream_tls_above`.)
    fn pool(&self) -> Arc<Pool> {
        let tls = self.tls.current();
        let pool = self.pool.load_full();
        let now = crate::unix_now();
        if Arc::ptr_eq(&pool.tls, &tls) && now < pool.until.load(Ordering::Relaxed) {
            return pool;
        }
        // Requests racing here may each start one; the last stored stays, the others serve
        // their one request and go.
        let fresh = Arc::new(self.settings.pool(tls, now));
        self.pool.store(fresh.clone());
        tracing::info!("new provider connection pool: the upstream TLS was reloaded, its CRLs' nextUpdate passed, or a provider's certificate ran out");
        fresh
    }

    /// Fails fast (502, reason `circuit_open`) to a provider host whose circuit is open. Each
    /// change of a circuit's state is counted in `metrics` (by state, never by host) and logged
    /// once, naming the host: WARN when it opens and when a failed probe opens it again, INFO
    /// when it closes (the half-open probe at DEBUG).
    pub fn with_breakers(
        mut self,
        breakers: Breakers,
        metrics: Option<crate::metrics::CircuitMetrics>,
    ) -> Upstream {
        let observer: crate::breaker::Observer = Arc::new(move |host: &str, from, to| {
            use crate::breaker::State;
            if let Some(m) = &metrics {
                m.changed(from, to);
            }
            match (from, to) {
                (State::Closed, State::Open) => tracing::warn!(
                    host,
                    "circuit opened: requests to this provider host fail fast (502) until a probe after the cool-down succeeds"
                ),
                (State::HalfOpen, State::Open) => tracing::warn!(
                    host,
                    "circuit reopened: the probe failed; requests to this provider host fail fast (502) for another cool-down"
                ),
                (_, State::Closed) => {
                    tracing::info!(host, "circuit closed: the probe succeeded")
                }
                _ => tracing::debug!(
                    host,
                    from = from.as_str(),
                    to = to.as_str(),
                    "circuit state changed"
                ),
            }
        });
        self.breakers = Some(breakers.with_observer(observer));
        self
    }

    /// Counts connect retries in `retries` (label `outcome`, see [`RetryOutcome`]).
    pub fn with_retry_metrics(mut self, retries: prometheus::IntCounterVec) -> Upstream {
        self.retries = Some(retries);
        self
    }

    fn count_retry(&self, outcome: RetryOutcome) {
        if let Some(retries) = &self.retries {
            retries.with_label_values(&[outcome.as_str()]).inc();
        }
    }

    /// The fast failure of a request to `target` whose provider host's circuit is open (see
    /// [`Breakers::refuses`]), decided before anything is done for it.
    pub fn circuit_refuses(&self, target: &Target, request_id: &uuid::Uuid) -> Option<Rejection> {
        let breakers = self.breakers.as_ref()?;
        let key = endpoint_key(target.authority());
        breakers.refuses(&key, Instant::now()).then(|| {
            tracing::debug!(%request_id, host = %key, "circuit open: failing fast");
            Rejection::CircuitOpen {
                url: target.without_query().to_owned(),
            }
        })
    }

    /// Asks the host's breaker for leave to send; `Err` when its circuit is open.
    fn ticket(
        &self,
        key: &str,
        url: &str,
        request_id: &uuid::Uuid,
    ) -> Result<Option<Ticket>, Rejection> {
        let Some(breakers) = &self.breakers else {
            return Ok(None);
        };
        match breakers.before(key, Instant::now()) {
            Ok(ticket) => Ok(Some(ticket)),
            Err(open) => {
                // Once per request: DEBUG. The circuit's opening was logged once at WARN, and
                // each refused request has its access line, audit record and count.
                tracing::debug!(%request_id, host = key, %open, "circuit open: failing fast");
                Err(Rejection::CircuitOpen {
                    url: url.to_owned(),
                })
            }
        }
    }

    /// Sends the consumer's request to `target` (already authorised) and returns the provider's
    /// response head with its body still streaming, and how many connections were tried for it
    /// (1 unless a connect failed and was retried); request body bytes are counted in
    /// `request_bytes`; its log lines carry `request_id`. Connect, TLS or protocol failures are
    /// 502; no response head within the response timeout (all attempts together) is 504. The
    /// body then fails when none of it arrives for the body idle timeout ([`UpstreamBody`]).
    ///
    /// A failed attempt is retried (up to `connect_retries` times, after a backoff that doubles)
    /// only when both hold:
    /// - the client says its connector failed (`is_connect()`: TCP connect, TLS handshake or
    ///   the connect timeout), so no connection existed to write the request to; and
    /// - the request body came back unread ([`Reclaimable`]): no byte of it was taken.
    ///
    /// Anything else — a response timeout, a connection closed or reset after the request was
    /// written, a broken answer, any HTTP response — is final. Every attempt asks the host's
    /// circuit breaker first and reports its failure to it, so retries count towards opening
    /// the circuit, and an open circuit ends them (502, reason `circuit_open`). An attempt with
    /// no usable response head (none in time, the connection closed or reset before it, a head
    /// that does not parse or is malformed) is the provider's failure, unless the consumer's
    /// request body may be the cause ([`ExchangeProgress`]): then it has no verdict. No retry
    /// starts that could not finish its backoff before the response timeout. A request that
    /// ends with no usable answer says why in [`Forwarded::failure`] (the last attempt's).
    pub async fn forward_counted(
        &self,
        req: Request<RequestBody>,
        target: &Target,
        client_addr: SocketAddr,
        traceparent: &[u8; 55],
        request_bytes: Arc<AtomicU64>,
        request_id: &uuid::Uuid,
    ) -> Forwarded {
        // Only a rejection or a log line needs it as a `String`.
        let url = target.without_query();
        let Some(out) = Outgoing::new(target, traceparent, client_addr) else {
            return Forwarded::upstream_error(url, 0, Some(UpstreamFailure::Other));
        };
        let (mut head, body) = req.into_parts();
        head.uri = out.uri;
        // RFC 9110 §7.6.3: a gateway adds itself to `Via` on each request it forwards, with the
        // protocol it was received in, after any the consumer's side added.
        let via = match head.version {
            Version::HTTP_2 => VIA_HTTP2,
            Version::HTTP_10 => VIA_HTTP10,
            _ => VIA_HTTP11,
        };
        head.version = Version::HTTP_11;
        replace_consumer_headers(&mut head.headers, out.forwarded, out.forwarded_for);
        head.headers.append(header::VIA, via);
        // The request's span is the provider's parent. Set after the consumer's headers are
        // stripped, so that a `Connection: traceparent` cannot remove it.
        if let Some(traceparent) = out.traceparent {
            head.headers.insert(TRACEPARENT, traceparent);
        }
        // One Content-Length, the body's own, for the `5, 5` or repeated field the consumer
        // may send (RFC 9110 §8.6: a proxy must not forward it as it came).
        if head.headers.contains_key(header::CONTENT_LENGTH) {
            match http_body::Body::size_hint(&body).exact() {
                Some(len) => {
                    head.headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                }
                None => {
                    head.headers.remove(header::CONTENT_LENGTH);
                }
            }
        }
        // The `Host` hyper-util's client would add (last, from the URI), added here from the
        // same bytes so that it is not formatted and copied per request.
        if let Some(host) = out.host {
            head.headers.insert(header::HOST, host);
        }
        // A request with a body: a provider that refuses it may not have read it (see
        // `reuse_unsafe`).
        let with_body = http_body::Body::size_hint(&body).exact() != Some(0);
        let progress = Arc::new(ExchangeProgress::default());
        let mut body = Some(Counted {
            limit: self.max_request_body,
            inner: body,
            bytes: request_bytes,
            progress: progress.clone(),
        });
        let mut head = Some(head);

        let key = endpoint_key(target.authority());
        let deadline = tokio::time::Instant::now() + self.response_timeout;
        let mut attempt: u32 = 0;
        // Why the last failed attempt failed, for a retry that the circuit then refuses.
        let mut failed: Option<UpstreamFailure> = None;
        loop {
            attempt += 1;
            let retry_left = attempt <= self.connect_retries;
            let ticket = match self.ticket(&key, url, request_id) {
                Ok(ticket) => ticket,
                Err(circuit_open) => {
                    if attempt > 1 {
                        // The request's own attempt failed (that failure may be what opened
                        // the circuit): an upstream error, not a fast failure.
                        self.count_retry(RetryOutcome::CircuitOpen);
                        return Forwarded::upstream_error(url, attempt - 1, failed);
                    }
                    return Forwarded {
                        answer: Err(circuit_open),
                        attempts: attempt - 1,
                        failure: None,
                    };
                }
            };
            // The head is kept for a retry while one may follow; the last attempt takes it.
            let (Some(this_head), Some(this_body)) = (
                if retry_left {
                    head.clone()
                } else {
                    head.take()
                },
                body.take(),
            ) else {
                // Unreachable: a retry only starts once the body came back, and the head is
                // only taken by the last attempt.
                return Forwarded::upstream_error(url, attempt - 1, failed);
            };
            let (this_body, returned) = Reclaimable::new(this_body, retry_left);
            let mut req = Request::from_parts(this_head, this_body);
            // The connection the answer comes on, to keep it out of the pool when the answer
            // leaves it unsafe to reuse (see `reuse_unsafe`).
            let connection = hyper_util::client::legacy::connect::capture_connection(&mut req);
            let counter = progress.clone();
            hyper::ext::on_informational(&mut req, move |_| counter.interim_answer());
            let exchange = tokio::time::timeout_at(deadline, self.pool().client.request(req));
            // `None`: the provider passed the interim-answer limit. Dropping the exchange drops
            // hyper's wait for the answer, and with it the connection (hyper closes one whose
            // answer nobody waits for).
            let result = tokio::select! {
                biased;
                result = exchange => Some(result),
                () = progress.flooded() => None,
            };
            let answer = match result {
                None => {
                    tracing::warn!(
                        %request_id,
                        target_url = %url,
                        attempt,
                        limit = MAX_INTERIM_ANSWERS,
                        "the provider sent more interim (1xx) answers than the limit; the answer is not passed on"
                    );
                    not_passed_on(&connection, ticket, url)
                }
                Some(Err(_)) if progress.awaiting_consumer() => {
                    // The time ran out waiting for the consumer's body, not for the provider:
                    // nothing is held against the provider's circuit. (The ticket, dropped
                    // unused, counts as neither.)
                    tracing::warn!(%request_id, target_url = %url, "the consumer stopped sending its request body; the response timeout ran out");
                    Err((RetryOutcome::Timeout, Rejection::RequestBodyTimeout, None))
                }
                Some(Err(_)) => {
                    if let Some(t) = ticket {
                        t.failure(Instant::now());
                    }
                    Err((
                        RetryOutcome::Timeout,
                        Rejection::UpstreamTimeout {
                            url: url.to_owned(),
                        },
                        Some(UpstreamFailure::ResponseTimeout),
                    ))
                }
                Some(Ok(Err(e))) if progress.consumer_failed() => {
                    tracing::warn!(%request_id, target_url = %url, error = %error_chain(&e), "the consumer's request body broke off or was malformed");
                    Err((RetryOutcome::Error, Rejection::InvalidRequestBody, None))
                }
                Some(Ok(Err(e))) => {
                    let connect = is_retryable_connect_error(&e);
                    // The connection could not be made, or the request went (or was going) out
                    // and no usable head came back: closed or reset before it, or a head that
                    // does not parse. The provider's failure, as much as a connect failure is,
                    // unless the consumer's request body stalled or went past the cap (the
                    // ticket then drops with no verdict, and no provider failure is recorded).
                    let provider_at_fault = connect || !progress.consumer_at_fault();
                    let failure = provider_at_fault.then(|| UpstreamFailure::of(&e));
                    if let Some(t) = ticket {
                        if provider_at_fault {
                            t.failure(Instant::now());
                        }
                    }
                    // The body is handed back only when the client dropped it unread.
                    let unread = returned.and_then(|mut rx| rx.try_recv().ok());
                    let backoff = self
                        .connect_retry_backoff
                        .saturating_mul(1 << (attempt - 1).min(16));
                    let in_time = tokio::time::Instant::now() + backoff < deadline;
                    match unread {
                        Some(unread) if connect && retry_left && in_time => {
                            if attempt > 1 {
                                self.count_retry(RetryOutcome::ConnectError);
                            }
                            tracing::warn!(
                                %request_id,
                                target_url = %url,
                                attempt,
                                backoff_ms = backoff.as_millis() as u64,
                                error = %error_chain(&e),
                                "upstream connect failed; nothing was sent, retrying"
                            );
                            failed = failure;
                            body = Some(unread);
                            tokio::time::sleep(backoff).await;
                            continue;
                        }
                        _ => {
                            let cause = failure.map_or("-", UpstreamFailure::as_label);
                            tracing::warn!(%request_id, target_url = %url, attempt, cause, error = %error_chain(&e), "upstream request failed");
                            let outcome = if connect {
                                RetryOutcome::ConnectError
                            } else {
                                RetryOutcome::Error
                            };
                            Err((
                                outcome,
                                Rejection::UpstreamError {
                                    url: url.to_owned(),
                                },
                                failure,
                            ))
                        }
                    }
                }
                Some(Ok(Ok(mut resp))) => match malformed_answer(&resp) {
                    Some(problem) => {
                        // As an answer hyper could not parse: 502, and a failure for the breaker.
                        // Its connection is never used again: what the provider sent past the
                        // head is not known to be where hyper took its end to be.
                        tracing::warn!(
                            %request_id,
                            target_url = %url,
                            attempt,
                            status = resp.status().as_u16(),
                            problem,
                            "the provider's answer is malformed; it is not passed on"
                        );
                        not_passed_on(&connection, ticket, url)
                    }
                    None => {
                        if let Some(why) = reuse_unsafe(&resp, with_body) {
                            never_reused(&connection);
                            tracing::debug!(%request_id, target_url = %url, status = resp.status().as_u16(), why, "the provider connection is not reused after this answer");
                        }
                        prepare_answer_headers(resp.headers_mut());
                        // RFC 9110 §7.6.3: the gateway's entry on each answer it passes on,
                        // after any the provider's side added, with the protocol it came in
                        // (HTTP/1.1 on the provider leg; 1.0 when the provider answered so).
                        let via = match resp.version() {
                            Version::HTTP_10 => VIA_HTTP10,
                            _ => VIA_HTTP11,
                        };
                        resp.headers_mut().append(header::VIA, via);
                        // The breaker's verdict waits for the body's end (see `UpstreamBody`).
                        let idle = self.body_idle_timeout;
                        let verdict = Some(Verdict {
                            ticket,
                            progress: progress.clone(),
                        });
                        Ok(resp.map(|body| UpstreamBody::new(body, idle, verdict)))
                    }
                },
            };
            if attempt > 1 {
                self.count_retry(match &answer {
                    Ok(_) => RetryOutcome::Answered,
                    Err((outcome, _, _)) => *outcome,
                });
            }
            let (answer, failure) = match answer {
                Ok(resp) => (Ok(resp), None),
                Err((_, rejection, failure)) => (Err(rejection), failure),
            };
            return Forwarded {
                answer,
                attempts: attempt,
                failure,
            };
        }
    }
}

/// An answer not passed on (malformed, or past the interim-answer limit): a 502
/// `ERROR_COMMUNICATING_TO_ENDPOINT_URL_<url>`, a failure for the provider's circuit, and its
/// connection never used again (what the provider sent past what hyper read is not known to
/// be where hyper took the answer's end to be).
fn not_passed_on(
    connection: &hyper_util::client::legacy::connect::CaptureConnection,
    ticket: Option<Ticket>,
    url: &str,
) -> Attempt {
    never_reused(connection);
    if let Some(t) = ticket {
        t.failure(Instant::now());
    }
    Err((
        RetryOutcome::Error,
        Rejection::UpstreamError {
            url: url.to_owned(),
        },
        Some(UpstreamFailure::MalformedAnswer),
    ))
}

/// How an attempt ended: the provider's answer, or why there is none (how the retry counter
/// counts it, the refusal, the provider's failure if it was one).
type Attempt = Result<Response<UpstreamBody>, (RetryOutcome, Rejection, Option<UpstreamFailure>)>;

/// What [`Upstream::forward_counted`] made of a request.
pub struct Forwarded {
    /// The provider's response (head; its body streams), or the gateway's refusal.
    pub answer: Result<Response<UpstreamBody>, Rejection>,
    /// Connections tried (1 unless a connect failed and was retried; 0 when none could be).
    pub attempts: u32,
    /// Why no usable answer came, when that is the provider's side (not for a refusal of the
    /// gateway's own, such as an open circuit, nor for the consumer's body failing).
    pub failure: Option<UpstreamFailure>,
}

impl Forwarded {
    /// A 502 `ERROR_COMMUNICATING_TO_ENDPOINT_URL_<url>` after `attempts` connections.
    fn upstream_error(url: &str, attempts: u32, failure: Option<UpstreamFailure>) -> Forwarded {
        Forwarded {
            answer: Err(Rejection::UpstreamError {
                url: url.to_owned(),
            }),
            attempts,
            failure,
        }
    }
}

/// Why a provider's response head that hyper accepted is not an answer the gateway passes on,
/// or `None` when it is one (the common case costs one header lookup):
/// - a 1xx status as the final answer: the gateway never asks for an upgrade, and hyper hands
///   on a `101 Switching Protocols` as the response (an HTTP/1.1 consumer given it would wait
///   for the switched protocol, an HTTP/2 one cannot be given it at all);
/// - a status above 599, which is no HTTP status (hyper accepts up to 999);
/// - a 204 or 205 announcing content (`Content-Length` other than 0, or `Transfer-Encoding`):
///   hyper reads none, and an HTTP/2 consumer resets a stream whose 204 says otherwise;
/// - `Transfer-Encoding` with `Content-Length`: RFC 9112 §6.3 says such a message "ought to be
///   handled as an error" (response splitting); hyper decodes the chunked body, and the
///   provider's `Content-Length` would go to the consumer with it;
/// - a transfer coding other than `chunked` alone (`gzip, chunked`): hyper removes only the
///   chunked framing, so the consumer would get the other coding's bytes with nothing saying so
///   (`Transfer-Encoding` is hop-by-hop and removed).
///
/// The answer's body is dropped unread, and its connection is poisoned (never used again): a
/// connection whose answer hyper had read whole by its own reading (chunks before
/// `Content-Length`, no content on a 204) would otherwise go back to the pool, and content the
/// provider meant, sent late, would be taken for the next request's answer.
fn malformed_answer<B>(resp: &Response<B>) -> Option<&'static str> {
    let status = resp.status();
    if status.is_informational() {
        return Some("an interim (1xx) status as its final answer");
    }
    if status.as_u16() > 599 {
        // RFC 9110 §15: three digits from 100 to 599; hyper accepts up to 999.
        return Some("a status code above 599");
    }
    if (status == http::StatusCode::NO_CONTENT || status == http::StatusCode::RESET_CONTENT)
        && announces_content(resp.headers())
    {
        // RFC 9110 §15.3.5, §15.3.6, RFC 9112 §6.1: no content, no Transfer-Encoding. hyper
        // reads none; the content announced would come after it, as the next answer's start.
        return Some("content announced on a 204 or 205");
    }
    let mut codings = resp.headers().get_all(header::TRANSFER_ENCODING).iter();
    let first = codings.next()?;
    if resp.headers().contains_key(header::CONTENT_LENGTH) {
        return Some("both Transfer-Encoding and Content-Length");
    }
    let chunked_alone = codings.next().is_none()
        && first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked");
    if !chunked_alone {
        return Some("a transfer coding other than chunked alone");
    }
    None
}

/// Keeps the connection an answer came on out of the pool from now (see [`reuse_unsafe`]).
fn never_reused(connection: &hyper_util::client::legacy::connect::CaptureConnection) {
    if let Some(c) = connection.connection_metadata().as_ref() {
        c.poison();
    }
}

/// Whether `headers` announce content: a `Transfer-Encoding`, or a `Content-Length` other
/// than 0.
fn announces_content(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes().trim_ascii() != b"0")
}

/// Why the connection an answer `resp` came on is not to be used for another request, though
/// the answer is passed on: `None` for nearly every answer (a status compare). hyper returns a
/// connection to the pool once it has read what it takes to be the answer's end, and whatever
/// the provider sends after that would be read as the answer to the next request on it, which
/// may be another consumer's (the late bytes of a provider's bug become that consumer's
/// answer, or the answer to a request hidden in a body the provider did not read).
/// - a 304 announcing content (`Content-Length` is allowed on it, RFC 9110 §15.4.5, but
///   hyper reads none: a provider that sends it anyway would answer the next request);
/// - an answer other than 2xx to a request with a body (`with_body`): a provider that
///   refuses or redirects early may leave the body unread on the connection, to be parsed as
///   the start of the next request (a request a consumer hid in its body would run unchecked,
///   its answer the next request's). Such answers are rare, so a new connection after one costs
///   little.
///
/// A connection is poisoned once the gateway has the answer's head. hyper-util returns the
/// connection of an answer with no body (a 204, a `Content-Length: 0`) to the pool just before
/// that: a request that takes a connection in those microseconds may still get it.
fn reuse_unsafe<B>(resp: &Response<B>, with_body: bool) -> Option<&'static str> {
    let status = resp.status();
    if !status.is_success() && with_body {
        return Some("an answer other than 2xx to a request with a body, which may be unread");
    }
    (status == http::StatusCode::NOT_MODIFIED && announces_content(resp.headers()))
        .then_some("a 304 announcing content")
}

/// What became of a connect retry (the `outcome` label of `ssp_upstream_retries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The provider answered (any status).
    Answered,
    /// The connection could not be made this time either.
    ConnectError,
    /// The response timeout ran out during the retry.
    Timeout,
    /// The retry failed after its connection was made (it is not retried again).
    Error,
    /// The host's circuit opened (the failures so far reached the threshold): not sent.
    CircuitOpen,
}

impl RetryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOutcome::Answered => "answered",
            RetryOutcome::ConnectError => "connect_error",
            RetryOutcome::Timeout => "timeout",
            RetryOutcome::Error => "error",
            RetryOutcome::CircuitOpen => "circuit_open",
        }
    }
}

/// Why a forwarded request got no usable answer from its provider: a bounded label for the
/// audit record (`upstream_failure`), the access line and `ssp_upstream_failures_total{cause}`,
/// so that an engineer reading the trail sees what the WARN line says in words (an expired
/// provider certificate, a refused connection, a provider that hung up) without the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The TCP connection was refused (nothing listens at the registered endpoint).
    TcpRefused,
    /// Any other TCP connect failure (unreachable, no route, name not resolved).
    TcpError,
    /// The connection (TCP and TLS) was not made within `connect_timeout`.
    ConnectTimeout,
    /// The provider's certificate has run out (or its CA's, or an intermediate's).
    TlsCertificateExpired,
    /// The provider's certificate is not valid yet.
    TlsCertificateNotYetValid,
    /// The provider's certificate is revoked by a CRL in force.
    TlsCertificateRevoked,
    /// The CRL the provider's certificate is checked against has passed its nextUpdate.
    TlsCrlExpired,
    /// The provider's certificate does not chain to `upstream.ca`.
    TlsUnknownIssuer,
    /// The provider's certificate is not for the registered endpoint's host.
    TlsNameMismatch,
    /// The provider's certificate is unusable otherwise (bad signature, wrong key usage, ...).
    TlsBadCertificate,
    /// The provider ended the handshake with an alert (it refused the gateway's certificate,
    /// or shares no protocol version or cipher suite with it).
    TlsAlertReceived,
    /// Any other TLS failure (in the handshake, or a record that does not decrypt).
    TlsError,
    /// The connection closed before a whole response head arrived.
    ClosedBeforeAnswer,
    /// The connection was reset.
    Reset,
    /// The response head does not parse (or is too large).
    MalformedHead,
    /// The response head parsed but is not passed on (a 1xx final status, a status above 599,
    /// content announced on a 204 or 205, Transfer-Encoding with Content-Length, a coding other
    /// than chunked alone).
    MalformedAnswer,
    /// No response head within the response timeout.
    ResponseTimeout,
    /// Anything else (the registered URL cannot be used, an I/O error of another kind).
    Other,
}

impl UpstreamFailure {
    /// Every failure, for the metric's series zeroed at start.
    pub const ALL: [UpstreamFailure; 18] = [
        UpstreamFailure::TcpRefused,
        UpstreamFailure::TcpError,
        UpstreamFailure::ConnectTimeout,
        UpstreamFailure::TlsCertificateExpired,
        UpstreamFailure::TlsCertificateNotYetValid,
        UpstreamFailure::TlsCertificateRevoked,
        UpstreamFailure::TlsCrlExpired,
        UpstreamFailure::TlsUnknownIssuer,
        UpstreamFailure::TlsNameMismatch,
        UpstreamFailure::TlsBadCertificate,
        UpstreamFailure::TlsAlertReceived,
        UpstreamFailure::TlsError,
        UpstreamFailure::ClosedBeforeAnswer,
        UpstreamFailure::Reset,
        UpstreamFailure::MalformedHead,
        UpstreamFailure::MalformedAnswer,
        UpstreamFailure::ResponseTimeout,
        UpstreamFailure::Other,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            UpstreamFailure::TcpRefused => "tcp_refused",
            UpstreamFailure::TcpError => "tcp_error",
            UpstreamFailure::ConnectTimeout => "connect_timeout",
            UpstreamFailure::TlsCertificateExpired => "tls_certificate_expired",
            UpstreamFailure::TlsCertificateNotYetValid => "tls_certificate_not_yet_valid",
            UpstreamFailure::TlsCertificateRevoked => "tls_certificate_revoked",
            UpstreamFailure::TlsCrlExpired => "tls_crl_expired",
            UpstreamFailure::TlsUnknownIssuer => "tls_unknown_issuer",
            UpstreamFailure::TlsNameMismatch => "tls_name_mismatch",
            UpstreamFailure::TlsBadCertificate => "tls_bad_certificate",
            UpstreamFailure::TlsAlertReceived => "tls_alert_received",
            UpstreamFailure::TlsError => "tls_error",
            UpstreamFailure::ClosedBeforeAnswer => "closed_before_answer",
            UpstreamFailure::Reset => "reset",
            UpstreamFailure::MalformedHead => "malformed_head",
            UpstreamFailure::MalformedAnswer => "malformed_answer",
            UpstreamFailure::ResponseTimeout => "response_timeout",
            UpstreamFailure::Other => "other",
        }
    }

    /// The failure a client error reports: the connector's own classification when the
    /// connection could not be made ([`ConnectFailure`]), otherwise what hyper or the
    /// connection's TLS or socket said.
    pub fn of(e: &hyper_util::client::legacy::Error) -> UpstreamFailure {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(connect) = err.downcast_ref::<ConnectFailure>() {
                return connect.failure;
            }
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                return UpstreamFailure::of_tls(tls);
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                return UpstreamFailure::of_io(io, UpstreamFailure::Other);
            }
            if let Some(h) = err.downcast_ref::<hyper::Error>() {
                if h.is_parse() || h.is_parse_too_large() || h.is_parse_status() {
                    return UpstreamFailure::MalformedHead;
                }
                if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                    // An I/O cause below (a reset, a TLS alert) says more.
                    let below = h.source().map(|s| {
                        s.downcast_ref::<std::io::Error>().map(|io| {
                            UpstreamFailure::of_io(io, UpstreamFailure::ClosedBeforeAnswer)
                        })
                    });
                    return below
                        .flatten()
                        .unwrap_or(UpstreamFailure::ClosedBeforeAnswer);
                }
            }
            cur = err.source();
        }
        UpstreamFailure::Other
    }

    /// An I/O error: a TLS error inside it (tokio-rustls wraps rustls' errors so), a reset, or
    /// `otherwise`. (`io::Error::source` skips the wrapped error itself, so it is read here.)
    fn of_io(io: &std::io::Error, otherwise: UpstreamFailure) -> UpstreamFailure {
        if let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            return UpstreamFailure::of_tls(tls);
        }
        match io.kind() {
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => {
                UpstreamFailure::Reset
            }
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::BrokenPipe => {
                UpstreamFailure::ClosedBeforeAnswer
            }
            _ => otherwise,
        }
    }

    /// As the listener classifies a consumer's handshake failure ([`HandshakeFailure`]), with
    /// a name mismatch told apart (a provider's certificate is checked against its host).
    fn of_tls(e: &rustls::Error) -> UpstreamFailure {
        use crate::tls::HandshakeFailure as H;
        use rustls::CertificateError as C;
        match H::from_rustls(e) {
            H::CertificateExpired => UpstreamFailure::TlsCertificateExpired,
            H::CertificateNotYetValid => UpstreamFailure::TlsCertificateNotYetValid,
            H::CertificateRevoked => UpstreamFailure::TlsCertificateRevoked,
            H::CrlExpired => UpstreamFailure::TlsCrlExpired,
            H::UnknownIssuer => UpstreamFailure::TlsUnknownIssuer,
            H::BadCertificate => match e {
                rustls::Error::InvalidCertificate(
                    C::NotValidForName | C::NotValidForNameContext { .. },
                ) => UpstreamFailure::TlsNameMismatch,
                _ => UpstreamFailure::TlsBadCertificate,
            },
            H::AlertReceived => UpstreamFailure::TlsAlertReceived,
            _ => UpstreamFailure::TlsError,
        }
    }
}

/// A connection to a provider that could not be made, with its [`UpstreamFailure`] (what the
/// connector knows best: which step failed and how). Displayed as the error it wraps, so the
/// log lines read as before.
#[derive(Debug)]
pub struct ConnectFailure {
    failure: UpstreamFailure,
    inner: BoxError,
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl StdError for ConnectFailure {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner.source()
    }
}

/// A request body that hands itself back, through a oneshot channel, when it is dropped
/// before anyone asked it for a frame: the upstream client dropped the request without
/// sending it (its connection could not be made), so the body can go out again, whole, on
/// another attempt. Once a frame has been asked for it is never handed back. Nothing is
/// buffered: the consumer's stream is only read once a connection is up.
///
/// An unread body alone does not prove the request was not sent (a request without a body is
/// written without its body ever being polled); [`Upstream::forward_counted`] also requires a
/// connect error.
pub struct Reclaimable<B> {
    body: Option<B>,
    back: Option<oneshot::Sender<B>>,
}

impl<B> Reclaimable<B> {
    /// Wraps `body`; with `reclaim`, also the receiver that gets it back if it goes unread.
    pub fn new(body: B, reclaim: bool) -> (Reclaimable<B>, Option<oneshot::Receiver<B>>) {
        if !reclaim {
            return (
                Reclaimable {
                    body: Some(body),
                    back: None,
                },
                None,
            );
        }
        let (tx, rx) = oneshot::channel();
        (
            Reclaimable {
                body: Some(body),
                back: Some(tx),
            },
            Some(rx),
        )
    }
}

impl<B> Drop for Reclaimable<B> {
    fn drop(&mut self) {
        if let (Some(back), Some(body)) = (self.back.take(), self.body.take()) {
            // The receiver may be gone (the request was answered): then the body just drops.
            let _ = back.send(body);
        }
    }
}

impl<B> http_body::Body for Reclaimable<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        // Asked for a frame: the body is being sent and is no longer the gateway's to resend.
        this.back = None;
        match this.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().map_or(true, |b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// The W3C trace context header the gateway sends the provider.
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// What the gateway writes of its own into a forwarded request, all slices of one buffer: the
/// target URI, `traceparent`, `Forwarded`, `X-Forwarded-For` and `Host`. Two allocations
/// (the buffer and, once it is sliced, its shared count) where a parsed URI and a copy of each
/// value took two each, and the values' copy for a connect retry another each.
struct Outgoing {
    uri: Uri,
    traceparent: Option<HeaderValue>,
    forwarded: Option<HeaderValue>,
    forwarded_for: Option<HeaderValue>,
    host: Option<HeaderValue>,
}

impl Outgoing {
    /// `None` when the target is not a URI hyper can send to.
    fn new(target: &Target, traceparent: &[u8; 55], client: SocketAddr) -> Option<Outgoing> {
        let url = target.url().as_bytes();
        // `for="[` + the longest IPv6 text (45) + `]";proto=https`.
        let mut buf = Vec::with_capacity(url.len() + traceparent.len() + 72);
        buf.extend_from_slice(url);
        buf.extend_from_slice(traceparent);
        let forwarded_start = buf.len();
        let address = match client.ip() {
            IpAddr::V4(v4) => {
                buf.extend_from_slice(b"for=");
                let start = buf.len();
                crate::jsonw::ipv4_into(&mut buf, v4);
                let address = start..buf.len();
                buf.extend_from_slice(b";proto=https");
                address
            }
            IpAddr::V6(v6) => {
                use std::io::Write as _;
                buf.extend_from_slice(b"for=\"[");
                let start = buf.len();
                // Writing to a `Vec` cannot fail.
                let _ = write!(buf, "{v6}");
                let address = start..buf.len();
                buf.extend_from_slice(b"]\";proto=https");
                address
            }
        };
        let forwarded = forwarded_start..buf.len();
        let shared = Bytes::from(buf);
        let value = |range: std::ops::Range<usize>| {
            HeaderValue::from_maybe_shared(shared.slice(range)).ok()
        };
        let uri = Uri::from_maybe_shared(shared.slice(..url.len())).ok()?;
        let host = host_value(&uri, &shared);
        Some(Outgoing {
            traceparent: value(url.len()..forwarded_start),
            forwarded: value(forwarded),
            forwarded_for: value(address),
            host,
            uri,
        })
    }
}

/// The `Host` hyper-util's client sets on an HTTP/1 request without one: the URI's host, with
/// `:port` unless it is the scheme's default. A slice of `shared` (which `uri` was parsed
/// from) where the text stands there as is; otherwise formatted as hyper-util formats it.
fn host_value(uri: &Uri, shared: &Bytes) -> Option<HeaderValue> {
    let host = uri.host()?;
    let secure = matches!(uri.scheme_str(), Some("https" | "wss"));
    let port = match (uri.port_u16(), secure) {
        (Some(443), true) | (Some(80), false) => None,
        _ => uri.port(),
    };
    // Where `text` (a part of `uri`) lies in `shared`.
    let base = shared.as_ptr() as usize;
    let offset = |text: &str| {
        let start = (text.as_ptr() as usize).checked_sub(base)?;
        (start + text.len() <= shared.len()).then_some(start)
    };
    let start = offset(host)?;
    let end = match &port {
        None => start + host.len(),
        Some(port) => {
            let port_start = offset(port.as_str())?;
            if port_start != start + host.len() + 1 || shared[start + host.len()] != b':' {
                return HeaderValue::from_maybe_shared(Bytes::from(format!("{host}:{port}"))).ok();
            }
            port_start + port.as_str().len()
        }
    };
    HeaderValue::from_maybe_shared(shared.slice(start..end)).ok()
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

/// Hop-by-hop (RFC 9110 §7.6.1), or `Transfer-Encoding`, which is hyper's to set per hop.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == header::TRANSFER_ENCODING
}

/// Removes the headers `doomed` names, and those named in `Connection`, in one pass over the
/// headers: most messages carry none of them, and then nothing is looked up or removed.
fn strip(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    let mut gone: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        if name == header::CONNECTION {
            let listed = value.to_str().ok().into_iter().flat_map(|v| v.split(','));
            gone.extend(listed.filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()));
        }
        if doomed(name) {
            gone.push(name.clone());
        }
    }
    for name in gone {
        headers.remove(name);
    }
}

/// Makes a provider's answer headers fit for the consumer: hop-by-hop ones removed, and those
/// that speak for the gateway's whole origin, which every provider shares behind it, so that
/// one provider cannot set them for the others: `Set-Cookie` (a cookie of one provider's would
/// go with requests to every provider), `Alt-Svc` (would send the consumer to another host for
/// the gateway's origin), `Clear-Site-Data`, `Strict-Transport-Security` (the gateway's own is
/// set on every answer) and `Proxy-Authentication-Info`.
///
/// A `Content-Length` the provider repeated, as fields or as a list (hyper takes the answer
/// only when every value is the same), goes on once: RFC 9110 §8.6 lets a recipient collapse
/// them, and a strict consumer (an HTTP/2 one above all) refuses the repeated form.
pub fn prepare_answer_headers(headers: &mut HeaderMap) {
    strip(headers, |name| {
        is_hop_by_hop(name) || speaks_for_origin(name)
    });
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return;
    };
    if lengths.next().is_some() || first.as_bytes().contains(&b',') {
        // Repeated, as fields or as a list (`2, 2`): hyper took the answer, so every value is
        // the same number; it goes on once.
        let one = first
            .as_bytes()
            .split(|&b| b == b',')
            .next()
            .unwrap_or_default();
        if let Ok(one) = HeaderValue::from_bytes(one.trim_ascii()) {
            headers.insert(header::CONTENT_LENGTH, one);
        }
    }
}

/// A field of a provider's answer that would speak for the gateway's whole origin (see
/// [`prepare_answer_headers`]).
fn speaks_for_origin(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "set-cookie"
            | "set-cookie2"
            | "alt-svc"
            | "clear-site-data"
            | "strict-transport-security"
            | "proxy-authentication-info"
    )
}

/// A field the gateway does not pass on in a trailer section: hop-by-hop ones, and those RFC
/// 9110 §6.5.1 says a trailer must not carry (framing, routing, request modifiers,
/// authentication, response control data, how to process the content), and those that speak
/// for the gateway's origin (see [`prepare_answer_headers`]).
fn is_not_a_trailer(name: &HeaderName) -> bool {
    is_hop_by_hop(name)
        || speaks_for_origin(name)
        || matches!(
            name.as_str(),
            "content-length"
                | "host"
                | "cache-control"
                | "expect"
                | "max-forwards"
                | "pragma"
                | "range"
                | "authorization"
                | "www-authenticate"
                | "age"
                | "expires"
                | "date"
                | "location"
                | "retry-after"
                | "vary"
                | "content-encoding"
                | "content-type"
                | "content-range"
        )
}

/// The consumer's headers the gateway sets itself or does not pass on, beside hop-by-hop ones.
/// `Forwarded` and `X-Forwarded-For` are replaced below; the others go:
/// - `Host` (the client sets the provider's) and `Expect` (answered here);
/// - what a provider's stack may believe about the client, the URL it was called by or the
///   client certificate (its own reverse proxy or framework sets them, and would take the
///   consumer's for its own): the other forwarding headers, the client-IP ones CDNs and load
///   balancers set, and the client-certificate ones of TLS-terminating proxies (RFC 9440
///   `Client-Cert`, Envoy's `X-Forwarded-Client-Cert`, …);
/// - method and URL overrides, which stacks that honour them (method-override middleware,
///   IIS URL Rewrite, old Symfony) would run instead of the interaction the gateway checked.
///
/// Split on the first byte, so a name is compared only with the list of its kind (`x-` or not);
/// header names are lower case.
fn is_from_consumer(name: &HeaderName) -> bool {
    let name = name.as_str();
    match name.as_bytes().first() {
        Some(b'x') => matches!(
            name,
            // Forwarding and client identity.
            "x-forwarded-for"
                | "x-forwarded"
                | "x-forwarded-host"
                | "x-forwarded-proto"
                | "x-forwarded-protocol"
                | "x-forwarded-scheme"
                | "x-forwarded-ssl"
                | "x-forwarded-port"
                | "x-forwarded-prefix"
                | "x-forwarded-server"
                | "x-forwarded-client-cert"
                | "x-url-scheme"
                | "x-host"
                | "x-original-host"
                | "x-real-ip"
                | "x-client-ip"
                | "x-cluster-client-ip"
                | "x-proxyuser-ip"
                | "x-originating-ip"
                | "x-remote-ip"
                | "x-remote-addr"
                | "x-envoy-external-address"
                | "x-client-cert"
                | "x-ssl-client-cert"
                | "x-ssl-client-verify"
                | "x-ssl-client-dn"
                | "x-ssl-client-s-dn"
                // Method and URL overrides.
                | "x-http-method-override"
                | "x-http-method"
                | "x-method-override"
                | "x-original-method"
                | "x-forwarded-method"
                | "x-original-url"
                | "x-original-uri"
                | "x-rewrite-url"
                | "x-forwarded-uri"
                | "x-forwarded-path"
                | "x-envoy-original-path"
        ),
        _ => matches!(
            name,
            "host"
                | "expect"
                | "forwarded"
                | "forwarded-for"
                | "client-ip"
                | "true-client-ip"
                | "cf-connecting-ip"
                | "fastly-client-ip"
                | "front-end-https"
                | "client-cert"
                | "client-cert-chain"
                | "ssl-client-cert"
        ),
    }
}

/// Makes the consumer's headers fit for the provider: hop-by-hop ones removed, `Host` left for
/// the client to set from the target, `Expect` answered here rather than passed on, several
/// `Cookie` fields (as HTTP/2 splits them) joined into one for the HTTP/1.1 provider (RFC 9113
/// §8.2.3), the forwarding headers replaced with the gateway's own view of the client, and
/// method and URL overrides and other client-identity headers removed (`is_from_consumer`).
pub fn prepare_request_headers(headers: &mut HeaderMap, client: SocketAddr) {
    let (forwarded, address) = match client.ip() {
        IpAddr::V4(v4) => {
            let mut value = Vec::with_capacity(32);
            value.extend_from_slice(b"for=");
            crate::jsonw::ipv4_into(&mut value, v4);
            let address = HeaderValue::from_bytes(&value[4..]);
            value.extend_from_slice(b";proto=https");
            (HeaderValue::from_maybe_shared(Bytes::from(value)), address)
        }
        IpAddr::V6(v6) => (
            HeaderValue::from_str(&format!("for=\"[{v6}]\";proto=https")),
            HeaderValue::from_str(&v6.to_string()),
        ),
    };
    replace_consumer_headers(headers, forwarded.ok(), address.ok());
}

/// [`prepare_request_headers`] with the `Forwarded` and `X-Forwarded-For` values made.
fn replace_consumer_headers(
    headers: &mut HeaderMap,
    forwarded: Option<HeaderValue>,
    address: Option<HeaderValue>,
) {
    let cookies = std::cell::Cell::new(0usize);
    strip(headers, |name| {
        if name == header::COOKIE {
            cookies.set(cookies.get() + 1);
        }
        is_hop_by_hop(name) || is_from_consumer(name) || imitates_a_stripped_field(name)
    });
    if cookies.get() > 1 {
        join_cookies(headers);
    }
    if let Some(v) = forwarded {
        headers.insert(header::FORWARDED, v);
    }
    if let Some(v) = address {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
}

/// A name with `_` where a field the gateway removes or sets itself has `-` (`X_Forwarded_For`,
/// `X_Real_IP`, `Transfer_Encoding`, `Content_Length`): CGI, WSGI, PHP and Rack give both
/// spellings the same variable (`HTTP_X_FORWARDED_FOR`), so a provider on such a stack could
/// take the consumer's look-alike for the field the gateway replaced. Looked at only for names
/// with `_`, which requests seldom carry.
fn imitates_a_stripped_field(name: &HeaderName) -> bool {
    let name = name.as_str();
    if !name.as_bytes().contains(&b'_') {
        return false;
    }
    HeaderName::from_bytes(name.replace('_', "-").as_bytes()).is_ok_and(|dashed| {
        is_hop_by_hop(&dashed) || is_from_consumer(&dashed) || dashed == header::CONTENT_LENGTH
    })
}

fn join_cookies(headers: &mut HeaderMap) {
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if joined.is_empty() {
        // Named in Connection, and so removed.
        return;
    }
    // Each part was a valid field value, and so is their join.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Connects to a provider: TCP (no Nagle) then TLS with the gateway's client certificate, all
/// within the connect timeout, with its pool's TLS configuration (see [`Upstream::pool`]).
#[derive(Clone)]
pub struct TlsConnector {
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    connect_errors: Option<prometheus::IntCounterVec>,
    /// Its pool's `until`, lowered to the earliest notAfter of each provider's certificates.
    until: Arc<AtomicU64>,
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsConn>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone());
        let limit = self.connect_timeout;
        let errors = self.connect_errors.clone();
        let until = self.until.clone();
        Box::pin(async move {
            let result = match tokio::time::timeout(limit, connect(tls, uri)).await {
                Ok(Ok(conn)) => {
                    until.fetch_min(conn.inner().certs_until(), Ordering::Relaxed);
                    Ok(conn)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err((
                    "timeout",
                    format!("connect timed out after {limit:?}").into(),
                )),
            };
            result.map_err(|(reason, e)| {
                if let Some(errors) = &errors {
                    errors.with_label_values(&[reason]).inc();
                }
                let failure = match reason {
                    "timeout" => UpstreamFailure::ConnectTimeout,
                    "tcp" => match e.downcast_ref::<std::io::Error>().map(|io| io.kind()) {
                        Some(std::io::ErrorKind::ConnectionRefused) => UpstreamFailure::TcpRefused,
                        _ => UpstreamFailure::TcpError,
                    },
                    // A handshake cut short is a TLS failure, not a missing answer.
                    "tls" => e
                        .downcast_ref::<std::io::Error>()
                        .and_then(|io| io.get_ref())
                        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                        .map_or(UpstreamFailure::TlsError, UpstreamFailure::of_tls),
                    _ => UpstreamFailure::Other,
                };
                BoxError::from(ConnectFailure { failure, inner: e })
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
    // The port as written: `http::Uri` reads a port that does not fit in 16 bits as none,
    // which would be the default port, not the one registered.
    let (host, port) = uri
        .authority()
        .and_then(|a| crate::ssp::envelope::split_authority(a.as_str()))
        .ok_or((
            "other",
            BoxError::from("upstream URL has no host or a malformed port"),
        ))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.unwrap_or(443);
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

impl TlsConn {
    /// Unix seconds: the earliest notAfter of the certificates the provider presented, leaf
    /// and intermediates (`u64::MAX` if there were none; the verifier has parsed every one).
    fn certs_until(&self) -> u64 {
        self.0
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .iter()
            .filter_map(|cert| crate::tls::not_after(cert).ok())
            .map(|t| u64::try_from(t).unwrap_or(0))
            .min()
            .unwrap_or(u64::MAX)
    }
}

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
    progress: Arc<ExchangeProgress>,
}

/// How one exchange with the provider is going, shared (one `Arc`) by the forwarder, the
/// request body and hyper's interim-answer callback:
/// - what the consumer's request body was doing when the exchange ended, so that a consumer
///   that stopped sending its body, or sent a broken one, is not taken for a failing provider
///   (a 504 or 502, and a failure counted against the provider's circuit);
/// - the provider's interim (1xx) answers to the request, waking the forwarder once they pass
///   [`MAX_INTERIM_ANSWERS`] (see [`ExchangeProgress::interim_answer`]).
#[derive(Debug, Default)]
pub struct ExchangeProgress {
    state: std::sync::atomic::AtomicU8,
    /// Interim answers the provider has sent to the request.
    interim: std::sync::atomic::AtomicU32,
    /// Notified once `interim` goes past [`MAX_INTERIM_ANSWERS`].
    flooded: tokio::sync::Notify,
}

/// The most interim (1xx) answers a provider may send before its final answer: beyond it, the
/// exchange is a malformed answer (502, a failure for the provider's circuit, the connection
/// dropped). hyper's client reads and discards interim answers without end, and without reading
/// the consumer's pace: a provider sending `102 Processing` in a loop had the gateway parse
/// them on one core until the response timeout. A real provider sends one `100 Continue`, a
/// few `103 Early Hints`, or a `102 Processing` now and then.
const MAX_INTERIM_ANSWERS: u32 = 32;

impl ExchangeProgress {
    /// Not asked for a frame yet, or the last frame asked for was delivered (or the end).
    const FLOWING: u8 = 0;
    /// The last frame asked for was not there yet: the client waits for the consumer.
    const AWAITING_CONSUMER: u8 = 1;
    /// The consumer's body failed (malformed framing, connection closed mid-body).
    const CONSUMER_FAILED: u8 = 2;
    /// The consumer's body went past the request-body cap, and was cut off.
    const CONSUMER_OVER_CAP: u8 = 3;

    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Relaxed);
    }

    fn awaiting_consumer(&self) -> bool {
        self.state.load(Ordering::Relaxed) == Self::AWAITING_CONSUMER
    }

    fn consumer_failed(&self) -> bool {
        self.state.load(Ordering::Relaxed) == Self::CONSUMER_FAILED
    }

    /// One more interim answer from the provider (hyper's `on_informational`, called on the
    /// connection's task as it parses one); the one past [`MAX_INTERIM_ANSWERS`] wakes
    /// [`ExchangeProgress::flooded`]. A permit is kept when nobody waits yet, so none is lost.
    fn interim_answer(&self) {
        if self.interim.fetch_add(1, Ordering::Relaxed) == MAX_INTERIM_ANSWERS {
            self.flooded.notify_one();
        }
    }

    /// Resolves once the provider has sent more than [`MAX_INTERIM_ANSWERS`] interim answers.
    async fn flooded(&self) {
        self.flooded.notified().await;
    }

    /// Whether the exchange may have ended for the consumer's sake: the client was waiting
    /// for its body, or its body failed or went past the cap (which breaks the provider's
    /// connection, and so a response body still coming on it).
    fn consumer_at_fault(&self) -> bool {
        self.state.load(Ordering::Relaxed) != Self::FLOWING
    }
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
        this.progress.set(match &polled {
            Poll::Pending => ExchangeProgress::AWAITING_CONSUMER,
            Poll::Ready(Some(Err(_))) => ExchangeProgress::CONSUMER_FAILED,
            Poll::Ready(_) => ExchangeProgress::FLOWING,
        });
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let total =
                    this.bytes.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
                if let Some(limit) = this.limit.filter(|limit| total > *limit) {
                    this.progress.set(ExchangeProgress::CONSUMER_OVER_CAP);
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

/// The gateway's `Via` entry, by the protocol the message came in (a request from the consumer,
/// an answer from the provider): a pseudonym, not its host.
const VIA_HTTP11: HeaderValue = HeaderValue::from_static("1.1 ssp-gateway");
const VIA_HTTP2: HeaderValue = HeaderValue::from_static("2 ssp-gateway");
const VIA_HTTP10: HeaderValue = HeaderValue::from_static("1.0 ssp-gateway");

/// A provider's response body, failed when none of it arrives for the body idle timeout
/// (`[upstream] body_idle_timeout`): a provider that sends a head and part of its body, then
/// stalls, would otherwise hold the consumer's request and both connections until the consumer
/// gave up. The failure reaches the consumer as a body broken off (HTTP/1.1: the connection
/// closes; HTTP/2: the stream is reset), never as a complete-looking one, and the provider's
/// connection is dropped with the body, unread to its end, so it is never used again. A body
/// cut off so, or broken off by the provider, is logged and counted where the request's ids
/// are known, from its [`BodyEnd::cut`] (`ssp_upstream_bodies_cut_total{reason}`).
///
/// The timer costs nothing while the body flows: it is made the first time the provider has
/// nothing to give, and moved on only when it has nothing to give again after a frame came
/// (a body that arrives whole, as most do, never makes one). Time the consumer takes to read
/// what was sent is not counted: the body is not asked for its next frame meanwhile.
///
/// The attempt's circuit-breaker ticket travels with the body, and the body's end is the
/// breaker's verdict (see [`crate::breaker`]): success when the body reaches its end (its
/// trailers, when it has them; a body
/// empty from the start — HEAD, 204, 304, `Content-Length: 0` — when it is made); failure when
/// it stalls past the idle timeout or the provider's connection breaks mid-body (hyper's body
/// error: reset, closed early, malformed chunks), unless the consumer's request body may be the
/// cause ([`ExchangeProgress`]); none when it is dropped before its end (the consumer went away).
pub struct UpstreamBody {
    /// `None` once the body timed out (and the provider's connection was let go).
    inner: Option<Incoming>,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last set.
    moved: bool,
    /// Until the body ends: what its end reports to (`None` without circuit breakers).
    verdict: Option<Verdict>,
}

/// What a response body's end reports to: the attempt's circuit-breaker ticket, and what the
/// consumer's request body was doing (the provider is not blamed for the consumer's doing).
struct Verdict {
    /// `None` when the gateway runs without circuit breakers.
    ticket: Option<Ticket>,
    progress: Arc<ExchangeProgress>,
}

/// Gives the breaker its verdict on a body that ended, `completed` or broken, once.
fn settle(verdict: &mut Option<Verdict>, completed: bool) {
    let Some(Verdict {
        ticket: Some(ticket),
        progress,
    }) = verdict.take()
    else {
        return;
    };
    if completed {
        ticket.success();
    } else if !progress.consumer_at_fault() {
        ticket.failure(Instant::now());
    }
    // Otherwise the ticket drops without a verdict.
}

/// A response body that broke off because the consumer's own request body failed (stalled,
/// broke, or went past the cap) and took the provider's connection with it: not a cut the
/// provider made ([`BodyCut::of`] gives none).
#[derive(Debug, thiserror::Error)]
#[error("the consumer's request body failed or stalled, and the provider's answer with it: {0}")]
pub struct ConsumerBodyFailed(#[source] BoxError);

/// The provider sent no response body bytes for the body idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the provider sent nothing more of its response body for {0:?}")]
pub struct BodyIdleTimeout(pub Duration);

impl UpstreamBody {
    fn new(inner: Incoming, idle: Duration, mut verdict: Option<Verdict>) -> UpstreamBody {
        // hyper need never poll a body that is at its end from the start.
        if http_body::Body::is_end_stream(&inner) {
            settle(&mut verdict, true);
        }
        UpstreamBody {
            inner: Some(inner),
            idle,
            timer: None,
            moved: false,
            verdict,
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(mut frame))) => {
                this.moved = true;
                if let Some(trailers) = frame.trailers_mut() {
                    // Trailers pass with the fields a trailer section may carry: not framing,
                    // routing or connection ones (RFC 9110 §6.5.1), which an HTTP/2 consumer
                    // would take as a malformed stream.
                    strip(trailers, is_not_a_trailer);
                }
                // hyper may stop polling once the body says it is at its end, or once it has
                // the trailers, which are always a body's last frame (its HTTP/2 server ends
                // the stream with them).
                if this.verdict.is_some() && (frame.is_trailers() || inner.is_end_stream()) {
                    settle(&mut this.verdict, true);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(None) => {
                settle(&mut this.verdict, true);
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                let consumer = this
                    .verdict
                    .as_ref()
                    .is_some_and(|v| v.progress.consumer_at_fault());
                settle(&mut this.verdict, false);
                if consumer {
                    // Not the provider's doing: the consumer's own request body failed, and the
                    // provider's connection went with it.
                    return Poll::Ready(Some(Err(Box::new(ConsumerBodyFailed(e.into())))));
                }
                return Poll::Ready(Some(Err(e.into())));
            }
        }
        let idle = this.idle;
        let deadline = || tokio::time::Instant::now() + idle;
        let timer = match this.timer.as_mut() {
            None => this
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline()))),
            Some(timer) => {
                if this.moved {
                    timer.as_mut().reset(deadline());
                }
                timer
            }
        };
        this.moved = false;
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // Dropped unread to its end, the connection is closed rather than put back in the pool.
        // (Logged with the request's ids by whoever observes the body's end: `BodyEnd::cut`.)
        this.inner = None;
        let consumer = this
            .verdict
            .as_ref()
            .is_some_and(|v| v.progress.consumer_at_fault());
        settle(&mut this.verdict, false);
        let stalled = Box::new(BodyIdleTimeout(this.idle));
        if consumer {
            // The provider waited on the consumer's request body, which stalled or failed.
            return Poll::Ready(Some(Err(Box::new(ConsumerBodyFailed(stalled)))));
        }
        Poll::Ready(Some(Err(stalled)))
    }

    fn is_end_stream(&self) -> bool {
        // A body cut off is not at its end.
        self.inner.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(http_body::SizeHint::default, |b| b.size_hint())
    }
}

/// How a response body ended, for the audit outcome record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyEnd {
    /// Body bytes that passed to the consumer.
    pub bytes: u64,
    /// `true` when the body reached its end (its trailers, when it has them); `false` when it
    /// was abandoned (consumer gone) or failed (provider error mid-body).
    pub completed: bool,
    /// Why the provider's body failed mid-way, cutting the consumer's response off; `None` when
    /// it reached its end, was dropped (the consumer went away), or broke off because the
    /// consumer's own request body failed.
    pub cut: Option<BodyCut>,
}

/// Why a provider's response body was cut off before its end (the `reason` label of
/// `ssp_upstream_bodies_cut_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCut {
    /// Nothing more of it came for the body idle timeout ([`BodyIdleTimeout`]).
    Stalled,
    /// It broke off: the provider's connection was reset or closed early, or its chunked
    /// framing was malformed (hyper's body error).
    Broken,
}

impl BodyCut {
    labels! {
        /// A bounded label for metrics and logs.
        pub fn as_str;
        /// Every [`BodyCut::as_str`], so that each series can be exposed from 0 at start.
        const LABELS;
        {
            BodyCut::Stalled => "stalled",
            BodyCut::Broken => "broken",
        }
    }

    /// What cut a body off, from the error its stream ended with: `None` when the provider
    /// did not ([`ConsumerBodyFailed`]).
    pub fn of(error: &(dyn StdError + 'static)) -> Option<BodyCut> {
        if error.is::<BodyIdleTimeout>() {
            Some(BodyCut::Stalled)
        } else if error.is::<ConsumerBodyFailed>() {
            None
        } else {
            Some(BodyCut::Broken)
        }
    }
}

/// Called once when an observed body ends or is dropped: how it ended, and the error that cut
/// it off, if one did (for the log; only then is it formatted).
pub type OnBodyEnd = Box<dyn FnOnce(BodyEnd, Option<&(dyn StdError + 'static)>) + Send + Sync>;

/// A response body whose end is reported.
pub struct Observed {
    inner: ProxyBody,
    bytes: u64,
    on_end: Option<OnBodyEnd>,
}

impl Observed {
    fn finish(&mut self, completed: bool, error: Option<&(dyn StdError + 'static)>) {
        if let Some(on_end) = self.on_end.take() {
            on_end(
                BodyEnd {
                    bytes: self.bytes,
                    completed,
                    cut: error.and_then(BodyCut::of),
                },
                error,
            );
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // hyper may stop polling once the body says it is at its end.
        let completed = http_body::Body::is_end_stream(&self.inner);
        self.finish(completed, None);
    }
}

/// The body of a response the gateway sends: its own OperationOutcome, or the provider's
/// body streaming through (observed, when its end is to be reported).
pub enum ProxyBody {
    Full(http_body_util::Full<Bytes>),
    Upstream(UpstreamBody),
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
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
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
                        // Trailers are the last frame: hyper's HTTP/2 server ends the stream
                        // with them and polls no more.
                        if frame.is_trailers() || http_body::Body::is_end_stream(&o.inner) {
                            o.finish(true, None);
                        }
                    }
                    Poll::Ready(Some(Err(e))) => o.finish(false, Some(&**e)),
                    Poll::Ready(None) => o.finish(true, None),
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
    use http_body::Body as _;
    use http_body_util::{BodyExt, Full};

    /// A trailer section loses what speaks for the gateway's whole origin, as the answer's
    /// head does (one list, `speaks_for_origin`), besides what RFC 9110 §6.5.1 keeps out of
    /// trailers; a checksum passes.
    #[test]
    fn trailers_lose_origin_wide_and_forbidden_fields() {
        for gone in [
            "set-cookie",
            "set-cookie2",
            "alt-svc",
            "clear-site-data",
            "strict-transport-security",
            "proxy-authentication-info",
            "connection",
            "content-length",
            "transfer-encoding",
        ] {
            assert!(is_not_a_trailer(&HeaderName::from_static(gone)), "{gone}");
        }
        assert!(!is_not_a_trailer(&HeaderName::from_static("x-checksum")));
    }

    #[tokio::test]
    async fn an_unread_body_comes_back_and_a_read_one_never_does() {
        let (body, back) = Reclaimable::new(Full::new(Bytes::from_static(b"booking")), true);
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(7));
        drop(body);
        let mut back = back.expect("a receiver");
        let whole = back.try_recv().expect("handed back unread");
        assert_eq!(
            whole.collect().await.expect("body").to_bytes(),
            Bytes::from_static(b"booking")
        );

        let (mut body, back) = Reclaimable::new(Full::new(Bytes::from_static(b"booking")), true);
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"booking")));
        drop(body);
        assert!(
            back.expect("a receiver").try_recv().is_err(),
            "read bodies stay gone"
        );

        let (body, back) = Reclaimable::new(Full::new(Bytes::from_static(b"x")), false);
        assert!(back.is_none());
        drop(body);
    }

    /// Through a real hyper-util client: a refused connection is a connect error and the body
    /// comes back unread; a peer that takes the request and hangs up is not a connect error and
    /// the body (read and sent) does not come back.
    #[tokio::test]
    async fn the_client_drops_the_body_unread_only_when_it_could_not_connect() {
        use hyper_util::client::legacy::connect::HttpConnector;
        use tokio::io::AsyncReadExt;

        type Body = Reclaimable<Full<Bytes>>;
        let client: Client<HttpConnector, Body> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let post = |uri: String| {
            let (body, back) = Reclaimable::new(Full::new(Bytes::from(vec![b'x'; 4096])), true);
            let req = Request::post(uri).body(body).expect("request");
            (req, back.expect("a receiver"))
        };

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let (req, mut back) = post(format!("http://127.0.0.1:{port}/x"));
        let err = client.request(req).await.expect_err("refused");
        assert!(is_retryable_connect_error(&err), "{err:?}");
        let body = back.try_recv().expect("the body came back unread");
        assert_eq!(body.collect().await.expect("body").to_bytes().len(), 4096);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            if let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 8192];
                // The whole request: its head, then the 4096-byte body.
                while !(got.len() > 4096 && got[got.len() - 4096..].iter().all(|b| *b == b'x')) {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            }
            got.len()
        });
        let (req, mut back) = post(format!("http://{addr}/x"));
        let err = client.request(req).await.expect_err("hung up");
        assert!(!is_retryable_connect_error(&err), "{err:?}");
        assert!(back.try_recv().is_err(), "a sent body never comes back");
        assert!(server.await.expect("server") > 4096, "the request was sent");
    }

    /// A port that does not fit in 16 bits is refused before any connection is made; read as
    /// "no port", it would have sent the request to port 443.
    #[tokio::test]
    async fn a_port_out_of_range_is_refused_not_defaulted() {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
        for url in [
            "https://127.0.0.1:99999/x",
            "https://127.0.0.1:65536/x",
            "https://127.0.0.1:0/x",
        ] {
            let uri: Uri = url.parse().expect("http::Uri takes it");
            match connect(tls.clone(), uri).await {
                Err((reason, e)) => {
                    assert_eq!(reason, "other", "{url}: {e}");
                    assert!(e.to_string().contains("malformed port"), "{url}: {e}");
                }
                Ok(_) => panic!("{url} connected"),
            }
        }
    }

    /// Each head the gateway does not pass on, and heads it does.
    #[test]
    fn malformed_answers_are_told_from_well_formed_ones() {
        let head = |status: u16, fields: &[(&str, &str)]| {
            let mut resp = Response::new(());
            *resp.status_mut() = http::StatusCode::from_u16(status).expect("status");
            for (name, value) in fields {
                resp.headers_mut().append(
                    HeaderName::from_bytes(name.as_bytes()).expect("name"),
                    HeaderValue::from_str(value).expect("value"),
                );
            }
            malformed_answer(&resp)
        };
        let te = "transfer-encoding";
        let cl = "content-length";
        for (status, fields, problem) in [
            (101, &[][..], "interim"),
            (103, &[], "interim"),
            (200, &[(te, "chunked"), (cl, "1")], "Content-Length"),
            (200, &[(cl, "1"), (te, "chunked")], "Content-Length"),
            (204, &[(te, "chunked"), (cl, "0")], "204 or 205"),
            (204, &[(cl, "47")], "204 or 205"),
            (205, &[(te, "chunked")], "204 or 205"),
            (600, &[(cl, "2")], "above 599"),
            (999, &[], "above 599"),
            (200, &[(te, "gzip, chunked")], "other than chunked"),
            (200, &[(te, "gzip")], "other than chunked"),
            (200, &[(te, "chunked, chunked")], "other than chunked"),
            (
                200,
                &[(te, "chunked"), (te, "chunked")],
                "other than chunked",
            ),
            (200, &[(te, "gzip"), (te, "chunked")], "other than chunked"),
            (200, &[(te, "")], "other than chunked"),
        ] {
            let found = head(status, fields).unwrap_or_else(|| panic!("{status} {fields:?}"));
            assert!(found.contains(problem), "{status} {fields:?}: {found}");
        }
        for (status, fields) in [
            (200, &[][..]),
            (200, &[(cl, "12")]),
            (200, &[(te, "chunked")]),
            (200, &[(te, " Chunked\t")]),
            (503, &[(te, "CHUNKED")]),
            (204, &[]),
            (204, &[(cl, "0")]),
            (205, &[(cl, " 0 ")]),
            (304, &[(cl, "12")]),
            (599, &[(cl, "2")]),
        ] {
            assert_eq!(head(status, fields), None, "{status} {fields:?}");
        }
    }

    #[test]
    fn cookie_fields_are_joined_into_one() {
        let client = "10.1.2.3:5555".parse().expect("addr");
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        prepare_request_headers(&mut h, client);
        let cookies: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);

        let mut one = HeaderMap::new();
        one.insert(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        prepare_request_headers(&mut one, client);
        assert_eq!(one[header::COOKIE], "a=1; b=2");

        let mut dropped = HeaderMap::new();
        dropped.insert(header::CONNECTION, HeaderValue::from_static("cookie"));
        dropped.append(header::COOKIE, HeaderValue::from_static("a=1"));
        dropped.append(header::COOKIE, HeaderValue::from_static("b=2"));
        prepare_request_headers(&mut dropped, client);
        assert!(!dropped.contains_key(header::COOKIE));
    }

    /// The values made in one buffer are those made one by one, and the `Host` is the one
    /// hyper-util's client sets: the host, with the port unless it is the scheme's default.
    #[test]
    fn the_outgoing_values_are_those_made_one_by_one() {
        let tp = *b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cases = [
            ("provider.example:9443", "provider.example:9443"),
            ("provider.example", "provider.example"),
            ("provider.example:443", "provider.example"),
            ("127.0.0.1:08443", "127.0.0.1:08443"),
            ("[::1]:8443", "[::1]:8443"),
            ("[::1]", "[::1]"),
        ];
        for client in ["10.1.2.3:5000", "[2001:db8::1]:443"] {
            let client: SocketAddr = client.parse().expect("addr");
            for (authority, host) in cases {
                let path = format!("/https://{authority}/B82617/STU3/1/gpconnect/Slot?x=1");
                let target = crate::ssp::envelope::parse_target(&path).expect("target");
                let out = Outgoing::new(&target, &tp, client).expect("outgoing");
                assert_eq!(out.uri, target.url().parse::<Uri>().expect("uri"));
                assert_eq!(out.traceparent.expect("traceparent").as_bytes(), &tp);
                let mut h = HeaderMap::new();
                prepare_request_headers(&mut h, client);
                assert_eq!(out.forwarded.as_ref(), h.get(header::FORWARDED));
                assert_eq!(out.forwarded_for.as_ref(), h.get("x-forwarded-for"));
                assert_eq!(out.host.expect("host"), host, "{authority}");
            }
        }
    }

    #[test]
    fn hop_by_hop_and_forwarding_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static(" x-other ,,"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.append("x-secret", HeaderValue::from_static("2"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-t"));
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
        h.insert("x-http-method-override", HeaderValue::from_static("DELETE"));
        h.insert("x-original-url", HeaderValue::from_static("/Patient/1"));
        h.insert("true-client-ip", HeaderValue::from_static("6.6.6.6"));
        h.insert("client-cert", HeaderValue::from_static(":AA==:"));
        h.insert("x-request-id", HeaderValue::from_static("kept"));
        h.insert("ssp-traceid", HeaderValue::from_static("kept"));
        // Look-alikes with `_` of fields removed or replaced (CGI reads both alike).
        h.insert("x_forwarded_for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x_real_ip", HeaderValue::from_static("6.6.6.6"));
        h.insert("transfer_encoding", HeaderValue::from_static("chunked"));
        h.insert("content_length", HeaderValue::from_static("5"));
        h.insert("x_custom_field", HeaderValue::from_static("kept"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer kept"),
        );
        prepare_request_headers(&mut h, "10.1.2.3:5555".parse().expect("addr"));
        for gone in [
            "connection",
            "x-secret",
            "x-other",
            "expect",
            "x-forwarded-proto",
            "x-forwarded-host",
            "proxy-connection",
            "trailer",
            "keep-alive",
            "host",
            "te",
            "upgrade",
            "proxy-authorization",
            "transfer-encoding",
            "x-http-method-override",
            "x-original-url",
            "true-client-ip",
            "client-cert",
            "x_forwarded_for",
            "x_real_ip",
            "transfer_encoding",
            "content_length",
        ] {
            assert!(!h.contains_key(gone), "{gone} should be removed");
        }
        assert_eq!(h["x_custom_field"], "kept");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h[header::FORWARDED], "for=10.1.2.3;proto=https");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["ssp-traceid"], "kept");
        assert_eq!(h[header::AUTHORIZATION], "Bearer kept");
        assert_eq!(h["x-request-id"], "kept");
        assert_eq!(h.len(), 6, "only the kept and the gateway's own: {h:?}");

        let mut h = HeaderMap::new();
        prepare_request_headers(&mut h, "[::1]:5555".parse().expect("addr"));
        assert_eq!(h[header::FORWARDED], "for=\"[::1]\";proto=https");
    }

    mod breaker_verdict {
        //! The circuit breaker's verdict on a call that got a response is its body's end.

        use super::*;
        use crate::breaker::BreakerPolicy;
        use http::Method;
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        const HOST: &str = "provider.example:443";
        const COOL: Duration = Duration::from_secs(60);

        /// Breakers whose circuit to `HOST` opened at `t0`, and the half-open probe taken at
        /// `t0 + COOL`: each verdict on the probe leaves a different mark (see [`verdict`]).
        fn probing() -> (Breakers, Instant, Verdict) {
            let b = Breakers::new(BreakerPolicy {
                failure_threshold: 1,
                cool_down: COOL,
                max_hosts: 4,
            })
            .expect("valid policy");
            let t0 = Instant::now();
            b.before(HOST, t0).expect("closed").failure(t0);
            let ticket = b.before(HOST, t0 + COOL).expect("the probe");
            assert!(ticket.is_probe());
            let verdict = Verdict {
                ticket: Some(ticket),
                progress: Arc::default(),
            };
            (b, t0, verdict)
        }

        /// The probe's verdict so far, as the next call at `t0 + COOL` finds the circuit.
        fn verdict(b: &Breakers, t0: Instant) -> &'static str {
            match b.before(HOST, t0 + COOL) {
                Ok(t) if !t.is_probe() => "success",
                // A probe dropped with no verdict leaves its place to the next call.
                Ok(_) => "none",
                // A failed probe reopens it for a fresh cool-down.
                Err(open) if open.retry_after.is_some() => "failure",
                Err(_) => "pending",
            }
        }

        /// A response from a provider the test plays by hand over an in-memory connection:
        /// hyper's client reads `answer`, and whatever the test writes to the returned stream
        /// after it, as the provider's.
        async fn answer(method: Method, answer: &[u8]) -> (Incoming, tokio::io::DuplexStream) {
            let (client, mut provider) = tokio::io::duplex(64 * 1024);
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let req = Request::builder()
                .method(method)
                .uri("/x")
                .header(header::HOST, "provider.example")
                .body(http_body_util::Empty::<Bytes>::new())
                .expect("request");
            let play = async {
                // The request's head, then the answer.
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    provider.read_exact(&mut byte).await.expect("the request");
                    head.push(byte[0]);
                }
                provider.write_all(answer).await.expect("write");
            };
            let (resp, ()) = tokio::join!(send.send_request(req), play);
            (resp.expect("a response").into_body(), provider)
        }

        const HALF: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello";

        #[tokio::test]
        async fn a_body_read_to_its_end_is_a_success_and_not_before() {
            let (b, t0, probe) = probing();
            let (incoming, mut provider) = answer(Method::GET, HALF).await;
            let mut body = UpstreamBody::new(incoming, Duration::from_secs(30), Some(probe));
            let first = body.frame().await.expect("a frame").expect("data");
            assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"hello")));
            assert_eq!(verdict(&b, t0), "pending", "the head alone is no verdict");
            provider.write_all(b"world").await.expect("write");
            let last = body.frame().await.expect("a frame").expect("data");
            assert_eq!(last.into_data().ok(), Some(Bytes::from_static(b"world")));
            // Not polled again: hyper stops at a frame that ends the body.
            assert_eq!(verdict(&b, t0), "success");

            // A 5xx is the provider's answer; a chunked body ends with its last chunk.
            let (b, t0, probe) = probing();
            let (incoming, _provider) = answer(
                Method::GET,
                b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbusy\r\n0\r\n\r\n",
            )
            .await;
            let body = UpstreamBody::new(incoming, Duration::from_secs(30), Some(probe));
            let whole = body.collect().await.expect("the whole body").to_bytes();
            assert_eq!(whole, Bytes::from_static(b"busy"));
            assert_eq!(verdict(&b, t0), "success");
        }

        /// A body that ends with trailers is whole once they come, for the breaker and for the
        /// audit outcome: hyper's HTTP/2 server ends the stream with the trailers and polls no
        /// more, so the body's end of data is never asked for. Before, the verdict was none
        /// and the outcome `completed: false`.
        #[tokio::test]
        async fn a_body_ended_by_trailers_is_whole_when_they_come() {
            const TRAILED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Checksum: abc\r\n\r\n";
            let (b, t0, probe) = probing();
            let (incoming, _provider) = answer(Method::GET, TRAILED).await;
            let ended = Arc::new(std::sync::Mutex::new(None));
            let end = ended.clone();
            let mut body = ProxyBody::observed(
                ProxyBody::Upstream(UpstreamBody::new(
                    incoming,
                    Duration::from_secs(30),
                    Some(probe),
                )),
                Box::new(move |e: BodyEnd, _| {
                    *end.lock().expect("lock") = Some(e);
                }),
            );
            let data = body.frame().await.expect("a frame").expect("data");
            assert_eq!(data.into_data().ok(), Some(Bytes::from_static(b"{}")));
            assert_eq!(verdict(&b, t0), "pending");
            assert_eq!(*ended.lock().expect("lock"), None);
            let trailers = body.frame().await.expect("a frame").expect("trailers");
            assert_eq!(
                trailers.into_trailers().expect("trailers")["x-checksum"],
                "abc"
            );
            // Not polled again, as hyper's HTTP/2 server does not.
            assert_eq!(verdict(&b, t0), "success");
            assert_eq!(
                *ended.lock().expect("lock"),
                Some(BodyEnd {
                    bytes: 2,
                    completed: true,
                    cut: None,
                })
            );
            drop(body);
            assert_eq!(ended.lock().expect("lock").map(|e| e.completed), Some(true));
        }

        #[tokio::test]
        async fn a_body_empty_from_the_start_is_a_success_unpolled() {
            for (method, head) in [
                (
                    Method::HEAD,
                    &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"[..],
                ),
                (Method::GET, b"HTTP/1.1 204 No Content\r\n\r\n"),
                (Method::GET, b"HTTP/1.1 304 Not Modified\r\n\r\n"),
                (Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            ] {
                let (b, t0, probe) = probing();
                let (incoming, _provider) = answer(method, head).await;
                let body = UpstreamBody::new(incoming, Duration::from_secs(30), Some(probe));
                assert!(body.is_end_stream());
                assert_eq!(verdict(&b, t0), "success", "{head:?}");
                drop(body);
            }
        }

        #[tokio::test]
        async fn a_body_dropped_before_its_end_gives_no_verdict() {
            let (b, t0, probe) = probing();
            let (incoming, _provider) = answer(Method::GET, HALF).await;
            let mut body = UpstreamBody::new(incoming, Duration::from_secs(30), Some(probe));
            body.frame().await.expect("a frame").expect("data");
            // The consumer went away.
            drop(body);
            assert_eq!(verdict(&b, t0), "none");
        }

        #[tokio::test]
        async fn a_stalled_or_broken_body_is_the_providers_failure() {
            let (b, t0, probe) = probing();
            let (incoming, _provider) = answer(Method::GET, HALF).await;
            let mut body = UpstreamBody::new(incoming, Duration::from_millis(50), Some(probe));
            body.frame().await.expect("a frame").expect("data");
            let err = body.frame().await.expect("an end").expect_err("stalled");
            assert!(err.is::<BodyIdleTimeout>(), "{err}");
            assert_eq!(BodyCut::of(&*err), Some(BodyCut::Stalled));
            assert_eq!(verdict(&b, t0), "failure");

            // The provider's connection closes mid-body.
            let (b, t0, probe) = probing();
            let (incoming, provider) = answer(Method::GET, HALF).await;
            let mut body = UpstreamBody::new(incoming, Duration::from_secs(30), Some(probe));
            body.frame().await.expect("a frame").expect("data");
            drop(provider);
            let err = body.frame().await.expect("an end").expect_err("broken");
            assert!(err.is::<hyper::Error>(), "{err}");
            assert_eq!(BodyCut::of(&*err), Some(BodyCut::Broken));
            assert_eq!(verdict(&b, t0), "failure");
        }

        /// A request body cut off at the cap marks the exchange as the consumer's doing; one
        /// read whole does not.
        #[tokio::test]
        async fn a_request_body_over_the_cap_is_the_consumers_doing() {
            for (limit, at_fault) in [(Some(3), true), (Some(7), false), (None, false)] {
                let progress = Arc::new(ExchangeProgress::default());
                let mut body = Counted {
                    inner: http_body_util::Full::new(Bytes::from_static(b"booking")),
                    bytes: Arc::default(),
                    limit,
                    progress: progress.clone(),
                };
                let frame = body.frame().await.expect("a frame");
                assert_eq!(frame.is_err(), at_fault, "{limit:?}");
                assert_eq!(progress.consumer_at_fault(), at_fault, "{limit:?}");
            }
        }

        /// A body that breaks or stalls while the consumer's request body was what failed is
        /// not held against the provider.
        #[tokio::test]
        async fn a_body_ended_for_the_consumers_sake_gives_no_verdict() {
            for state in [
                ExchangeProgress::AWAITING_CONSUMER,
                ExchangeProgress::CONSUMER_FAILED,
                ExchangeProgress::CONSUMER_OVER_CAP,
            ] {
                let (b, t0, probe) = probing();
                probe.progress.set(state);
                let (incoming, _provider) = answer(Method::GET, HALF).await;
                let mut body = UpstreamBody::new(incoming, Duration::from_millis(50), Some(probe));
                body.frame().await.expect("a frame").expect("data");
                let err = body.frame().await.expect("an end").expect_err("stalled");
                assert_eq!(verdict(&b, t0), "none", "state {state}");
                // Nor counted or logged as a cut the provider made.
                assert_eq!(BodyCut::of(&*err), None, "state {state}: {err}");

                // The provider's connection goes mid-body, with the consumer's request body.
                let (b, t0, probe) = probing();
                probe.progress.set(state);
                let (incoming, provider) = answer(Method::GET, HALF).await;
                let mut body = UpstreamBody::new(incoming, Duration::from_secs(30), Some(probe));
                body.frame().await.expect("a frame").expect("data");
                drop(provider);
                let err = body.frame().await.expect("an end").expect_err("broken");
                assert_eq!(verdict(&b, t0), "none", "state {state}");
                assert_eq!(BodyCut::of(&*err), None, "state {state}: {err}");
            }
        }
    }
}
