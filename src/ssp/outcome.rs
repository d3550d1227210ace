//! The gateway's own rejections (ARCHITECTURE.md "Errors") and their one rendering as a FHIR
//! OperationOutcome, JSON or XML. Every error the gateway itself answers goes through here;
//! provider errors never do (they pass back unchanged).
//!
//! Tokens carry request data (URLs, ids, ASIDs): they are escaped for the body format here and
//! must never be used as metric labels; `Rejection::reason` is the bounded label for that.

use std::borrow::Cow;

use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;

/// Why the gateway refused a request. Each variant knows its HTTP status, Spine code and token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// 405 `METHOD_NOT_ALLOWED_<METHOD>`, with the `Allow` of the target resource (RFC 9110
    /// §15.5.6: the methods it supports, empty when none).
    MethodNotAllowed { method: String, allow: String },
    /// 400 `INVALID_TARGET_URL`
    InvalidTargetUrl,
    /// 400 `MISSING_OR_INVALID_HEADER_<Header-Name>` (canonical name, e.g. `Ssp-TraceID`)
    MissingOrInvalidHeader { header: &'static str },
    /// 400 `UNSUPPORTED_INTERACTION_<id>`
    UnsupportedInteraction { id: String },
    /// 400 `INTERACTION_<id>_DOES_NOT_MATCH_REQUEST_<METHOD>_<path>`
    InteractionMismatch {
        id: String,
        method: String,
        path: String,
    },
    /// 403 `CLIENT_CERTIFICATE_NO_LONGER_ACCEPTED_<REASON>`: the connection's client
    /// certificate passed its handshake, but the listener would refuse it now (revoked by a CRL
    /// loaded since, expired, its CA no longer trusted); `reason` is the handshake failure
    /// label a new connection would be counted under (`certificate_revoked`, ...).
    CertificateNoLongerAccepted { reason: &'static str },
    /// 403 `CORS_ORIGIN_NOT_ALLOWED_<origin>`: a CORS preflight from a web origin not in
    /// `[policy] cors_allowed_origins` (the browser then sends nothing more).
    CorsOriginNotAllowed { origin: String },
    /// 403 `ASID_CHECK_FAILED_MESSAGESENDER_<asid>`
    AsidCheckFailed { sender: String },
    /// 403 `CLIENT_CERTIFICATE_FQDN_<fqdn>_NOT_REGISTERED_FOR_ASID_<asid>`
    FqdnNotRegistered { fqdn: String, asid: String },
    /// 403 `PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_<asid>`
    ReceiverCheckFailed { receiver: String },
    /// 403 `FOT_CHECK_FAILED_MESSAGESENDER_<a>_MESSAGERECEIVER_<b>`
    NoSharingAgreement { sender: String, receiver: String },
    /// 400 `ENDPOINT_<endpoint>_CPAID_<cpaid>_VARIES_FROM_TARGETURL_<url>`
    EndpointMismatch {
        endpoint: String,
        cpa_id: String,
        target: String,
    },
    /// 400 `INVALID_JWT_<REASON>`; `reason` is upper snake case from `JwtError::reason`.
    InvalidJwt { reason: &'static str },
    /// 503 `DIRECTORY_UNAVAILABLE`
    DirectoryUnavailable,
    /// 503 `AUDIT_UNAVAILABLE`: the audit trail cannot be written, so nothing is forwarded.
    AuditUnavailable,
    /// 429 `RATE_LIMIT_EXCEEDED_MESSAGESENDER_<asid>`: the consumer is over its rate limit.
    RateLimited { sender: String },
    /// 429 `DIRECTORY_QUERY_RATE_EXCEEDED`: the client certificate has made its directory
    /// queries' worth of uncached lookups (ASIDs it names that are not cached), before anything
    /// shows it is registered.
    DirectoryQueriesExceeded,
    /// 503 `GATEWAY_OVERLOADED`: too many requests in flight across the gateway (load shedding).
    Overloaded,
    /// 413 `REQUEST_BODY_TOO_LARGE`: the body is over the optional configured cap.
    BodyTooLarge,
    /// 408 `REQUEST_BODY_TIMEOUT`: the consumer stopped sending its request body, and the
    /// response timeout ran out while the gateway waited for the rest (not the provider's fault).
    RequestBodyTimeout,
    /// 400 `INVALID_REQUEST_BODY`: the consumer's request body broke off or was malformed
    /// (bad chunked framing, the connection closed mid-body) while it was being forwarded.
    InvalidRequestBody,
    /// 400 `REQUEST_BODY_NOT_ALLOWED_<METHOD>`: a request for an interaction whose method has
    /// no body (GET) came with one (a non-zero `Content-Length`, chunked, or HTTP/2 DATA); it is
    /// not forwarded, since a provider that ignores the length on a GET would read the body as
    /// the next request on a shared upstream connection.
    BodyNotAllowed { method: String },
    /// 502 `ERROR_COMMUNICATING_TO_ENDPOINT_URL_<url>`
    UpstreamError { url: String },
    /// 502 `ERROR_COMMUNICATING_TO_ENDPOINT_URL_<url>`, failed fast without calling the
    /// provider: its host's circuit breaker is open (or half-open with its probe in flight).
    /// The consumer gets what [`Rejection::UpstreamError`] gives (the SSP's token); its own
    /// reason, `circuit_open`, tells operators the two apart.
    CircuitOpen { url: String },
    /// 504 `TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_<url>`
    UpstreamTimeout { url: String },
}

/// System of the Spine error code coding.
pub const SPINE_CODE_SYSTEM: &str =
    "https://fhir.nhs.uk/STU3/CodeSystem/Spine-ErrorOrWarningCode-1";
/// System of the SSP coding (code = HTTP status, display = token), as the real SSP sends it.
pub const SSP_CODE_SYSTEM: &str =
    "http://fhir.nhs.net/ValueSet/gpconnect-schedule-response-code-1-0";
/// Content-Type of a JSON OperationOutcome.
pub const CONTENT_TYPE_JSON: &str = "application/fhir+json;charset=utf-8";
/// Content-Type of an XML OperationOutcome.
pub const CONTENT_TYPE_XML: &str = "application/fhir+xml;charset=utf-8";

impl Rejection {
    /// The HTTP status the gateway answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::InvalidTargetUrl
            | Rejection::MissingOrInvalidHeader { .. }
            | Rejection::UnsupportedInteraction { .. }
            | Rejection::InteractionMismatch { .. }
            | Rejection::EndpointMismatch { .. }
            | Rejection::InvalidJwt { .. }
            | Rejection::InvalidRequestBody
            | Rejection::BodyNotAllowed { .. } => StatusCode::BAD_REQUEST,
            Rejection::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Rejection::CertificateNoLongerAccepted { .. }
            | Rejection::CorsOriginNotAllowed { .. }
            | Rejection::AsidCheckFailed { .. }
            | Rejection::FqdnNotRegistered { .. }
            | Rejection::ReceiverCheckFailed { .. }
            | Rejection::NoSharingAgreement { .. } => StatusCode::FORBIDDEN,
            Rejection::DirectoryUnavailable
            | Rejection::AuditUnavailable
            | Rejection::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::RateLimited { .. } | Rejection::DirectoryQueriesExceeded => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Rejection::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::UpstreamError { .. } | Rejection::CircuitOpen { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Rejection::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Words for the consumer's developer on what to fix, where the token alone does not say
    /// (the answer's `issue[0].details.text`; the token stays the SSP's). The target URL's
    /// problem is the gateway's to find ([`crate::ssp::envelope::target_problem`]).
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Rejection::MissingOrInvalidHeader { header } => Some(match *header {
                "Ssp-TraceID" => {
                    "Ssp-TraceID must be sent once, a UUID (8-4-4-4-12 hexadecimal digits); a \
                     header named with `_` for `-` is refused too"
                }
                "Ssp-From" | "Ssp-To" => {
                    "Ssp-From and Ssp-To must each be sent once, an ASID: 1 to 32 digits (not \
                     an ODS code); a header named with `_` for `-` is refused too"
                }
                "Ssp-InteractionID" => {
                    "Ssp-InteractionID must be sent once, the interaction's URN; a header named \
                     with `_` for `-` is refused too"
                }
                "Connection" => {
                    "a Connection header must not name an Ssp header or Authorization (they \
                     would be removed after they were checked)"
                }
                _ => return None,
            }),
            Rejection::UnsupportedInteraction { .. } => Some(
                "not an interaction of the gateway's catalogue; interaction ids are URNs \
                 compared exactly, case included \
                 (urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1)",
            ),
            _ => None,
        }
    }

    /// The Spine ErrorOrWarningCode, or `None` where the table gives none (502, 504).
    pub fn spine_code(&self) -> Option<&'static str> {
        match self {
            Rejection::MethodNotAllowed { .. }
            | Rejection::InvalidTargetUrl
            | Rejection::MissingOrInvalidHeader { .. }
            | Rejection::UnsupportedInteraction { .. }
            | Rejection::InteractionMismatch { .. }
            | Rejection::EndpointMismatch { .. }
            | Rejection::InvalidJwt { .. }
            | Rejection::BodyTooLarge
            | Rejection::RequestBodyTimeout
            | Rejection::InvalidRequestBody
            | Rejection::BodyNotAllowed { .. } => Some("BAD_REQUEST"),
            Rejection::CorsOriginNotAllowed { .. }
            | Rejection::AsidCheckFailed { .. }
            | Rejection::ReceiverCheckFailed { .. }
            | Rejection::NoSharingAgreement { .. } => Some("ACCESS_DENIED"),
            Rejection::FqdnNotRegistered { .. } | Rejection::CertificateNoLongerAccepted { .. } => {
                Some("ACCESS_DENIED_SSL")
            }
            Rejection::DirectoryUnavailable | Rejection::AuditUnavailable => {
                Some("INTERNAL_SERVER_ERROR")
            }
            Rejection::UpstreamError { .. }
            | Rejection::CircuitOpen { .. }
            | Rejection::UpstreamTimeout { .. }
            | Rejection::RateLimited { .. }
            | Rejection::DirectoryQueriesExceeded
            | Rejection::Overloaded => None,
        }
    }

    /// The FHIR issue type (`OperationOutcome.issue.code`).
    pub fn issue_type(&self) -> &'static str {
        match self {
            Rejection::MethodNotAllowed { .. } => "not-supported",
            Rejection::InvalidTargetUrl
            | Rejection::MissingOrInvalidHeader { .. }
            | Rejection::UnsupportedInteraction { .. }
            | Rejection::InteractionMismatch { .. }
            | Rejection::EndpointMismatch { .. }
            | Rejection::InvalidJwt { .. }
            | Rejection::InvalidRequestBody
            | Rejection::BodyNotAllowed { .. } => "invalid",
            Rejection::CertificateNoLongerAccepted { .. }
            | Rejection::CorsOriginNotAllowed { .. }
            | Rejection::AsidCheckFailed { .. }
            | Rejection::FqdnNotRegistered { .. }
            | Rejection::ReceiverCheckFailed { .. }
            | Rejection::NoSharingAgreement { .. } => "forbidden",
            Rejection::DirectoryUnavailable
            | Rejection::AuditUnavailable
            | Rejection::UpstreamError { .. }
            | Rejection::CircuitOpen { .. } => "transient",
            Rejection::UpstreamTimeout { .. } | Rejection::RequestBodyTimeout => "timeout",
            Rejection::RateLimited { .. }
            | Rejection::DirectoryQueriesExceeded
            | Rejection::Overloaded => "throttled",
            Rejection::BodyTooLarge => "too-long",
        }
    }

    /// The diagnostics token (also the SSP coding's display). Contains request data.
    pub fn token(&self) -> String {
        match self {
            Rejection::MethodNotAllowed { method, .. } => {
                format!("METHOD_NOT_ALLOWED_{}", method.to_ascii_uppercase())
            }
            Rejection::InvalidTargetUrl => "INVALID_TARGET_URL".to_owned(),
            Rejection::MissingOrInvalidHeader { header } => {
                format!("MISSING_OR_INVALID_HEADER_{header}")
            }
            Rejection::UnsupportedInteraction { id } => format!("UNSUPPORTED_INTERACTION_{id}"),
            Rejection::InteractionMismatch { id, method, path } => format!(
                "INTERACTION_{id}_DOES_NOT_MATCH_REQUEST_{}_{path}",
                method.to_ascii_uppercase()
            ),
            Rejection::CertificateNoLongerAccepted { reason } => format!(
                "CLIENT_CERTIFICATE_NO_LONGER_ACCEPTED_{}",
                reason.to_ascii_uppercase()
            ),
            Rejection::CorsOriginNotAllowed { origin } => {
                format!("CORS_ORIGIN_NOT_ALLOWED_{origin}")
            }
            Rejection::AsidCheckFailed { sender } => {
                format!("ASID_CHECK_FAILED_MESSAGESENDER_{sender}")
            }
            Rejection::FqdnNotRegistered { fqdn, asid } => {
                format!("CLIENT_CERTIFICATE_FQDN_{fqdn}_NOT_REGISTERED_FOR_ASID_{asid}")
            }
            Rejection::ReceiverCheckFailed { receiver } => {
                format!("PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{receiver}")
            }
            Rejection::NoSharingAgreement { sender, receiver } => {
                format!("FOT_CHECK_FAILED_MESSAGESENDER_{sender}_MESSAGERECEIVER_{receiver}")
            }
            Rejection::EndpointMismatch {
                endpoint,
                cpa_id,
                target,
            } => format!("ENDPOINT_{endpoint}_CPAID_{cpa_id}_VARIES_FROM_TARGETURL_{target}"),
            Rejection::InvalidJwt { reason } => format!("INVALID_JWT_{reason}"),
            Rejection::DirectoryUnavailable => "DIRECTORY_UNAVAILABLE".to_owned(),
            Rejection::AuditUnavailable => "AUDIT_UNAVAILABLE".to_owned(),
            Rejection::RateLimited { sender } => {
                format!("RATE_LIMIT_EXCEEDED_MESSAGESENDER_{sender}")
            }
            Rejection::DirectoryQueriesExceeded => "DIRECTORY_QUERY_RATE_EXCEEDED".to_owned(),
            Rejection::Overloaded => "GATEWAY_OVERLOADED".to_owned(),
            Rejection::BodyTooLarge => "REQUEST_BODY_TOO_LARGE".to_owned(),
            Rejection::RequestBodyTimeout => "REQUEST_BODY_TIMEOUT".to_owned(),
            Rejection::InvalidRequestBody => "INVALID_REQUEST_BODY".to_owned(),
            Rejection::BodyNotAllowed { method } => {
                format!("REQUEST_BODY_NOT_ALLOWED_{}", method.to_ascii_uppercase())
            }
            Rejection::UpstreamError { url } | Rejection::CircuitOpen { url } => {
                format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{url}")
            }
            Rejection::UpstreamTimeout { url } => {
                format!("TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_{url}")
            }
        }
    }

    labels! {
        /// A bounded snake_case label for metrics and logs. Never contains request data.
        pub fn reason;
        /// Every [`Rejection::reason`], so that each `ssp_rejections_total` series can be
        /// exposed from 0 at start.
        const REASONS;
        {
            Rejection::MethodNotAllowed { .. } => "method_not_allowed",
            Rejection::InvalidTargetUrl => "invalid_target_url",
            Rejection::MissingOrInvalidHeader { .. } => "missing_or_invalid_header",
            Rejection::UnsupportedInteraction { .. } => "unsupported_interaction",
            Rejection::InteractionMismatch { .. } => "interaction_mismatch",
            Rejection::CertificateNoLongerAccepted { .. } => "certificate_no_longer_accepted",
            Rejection::CorsOriginNotAllowed { .. } => "cors_origin_not_allowed",
            Rejection::AsidCheckFailed { .. } => "asid_check_failed",
            Rejection::FqdnNotRegistered { .. } => "fqdn_not_registered",
            Rejection::ReceiverCheckFailed { .. } => "receiver_check_failed",
            Rejection::NoSharingAgreement { .. } => "no_sharing_agreement",
            Rejection::EndpointMismatch { .. } => "endpoint_mismatch",
            Rejection::InvalidJwt { .. } => "invalid_jwt",
            Rejection::DirectoryUnavailable => "directory_unavailable",
            Rejection::AuditUnavailable => "audit_unavailable",
            Rejection::RateLimited { .. } => "rate_limited",
            Rejection::DirectoryQueriesExceeded => "directory_queries_exceeded",
            Rejection::Overloaded => "overloaded",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::RequestBodyTimeout => "request_body_timeout",
            Rejection::InvalidRequestBody => "invalid_request_body",
            Rejection::BodyNotAllowed { .. } => "request_body_not_allowed",
            Rejection::UpstreamError { .. } => "upstream_error",
            Rejection::CircuitOpen { .. } => "circuit_open",
            Rejection::UpstreamTimeout { .. } => "upstream_timeout",
        }
    }
}

/// The display text of a Spine ErrorOrWarningCode (CodeSystem Spine-ErrorOrWarningCode-1).
fn spine_display(code: &str) -> &'static str {
    match code {
        "BAD_REQUEST" => "Bad request",
        "ACCESS_DENIED" => "Access has been denied to process this request",
        "ACCESS_DENIED_SSL" => "SSL Protocol or Cipher requirements not met",
        "INTERNAL_SERVER_ERROR" => "Unexpected internal server error",
        _ => "",
    }
}

/// The body format of an OperationOutcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// FHIR JSON (the default).
    Json,
    /// FHIR XML.
    Xml,
}

/// Choose the body format: the `_format` query parameter overrides `Accept`; `Accept` gives XML
/// only when it asks for an XML type with a higher preference than any JSON type (wildcards
/// count as JSON, the default); anything else is JSON.
pub fn negotiate(accept: Option<&str>, query: Option<&str>) -> Format {
    negotiate_request(accept, None, query)
}

/// [`negotiate`] for a request with a body of `content_type`: when neither `_format` nor
/// `Accept` names a FHIR format, the answer is in the request's own (GP Connect general API
/// guidance: the server answers in the `Content-Type` format then).
pub fn negotiate_request(
    accept: Option<&str>,
    content_type: Option<&str>,
    query: Option<&str>,
) -> Format {
    query
        .and_then(format_from_query)
        .or_else(|| accept.and_then(format_from_accept))
        .or_else(|| content_type.and_then(classify_media_type))
        .unwrap_or(Format::Json)
}

/// The first recognised `_format` value in a query string (percent-encoding allowed).
fn format_from_query(query: &str) -> Option<Format> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        if key != "_format" {
            return None;
        }
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .ok()?;
        classify_media_type(&value)
    })
}

/// XML when an XML media range beats every JSON one (q-value, ties go to JSON; a wildcard
/// range counts as JSON), JSON when a JSON range is acceptable, `None` when `Accept` names
/// neither: no header, or wildcards alone (`*/*`, which most HTTP clients send by default,
/// says any format will do, so the request's own body decides).
fn format_from_accept(accept: &str) -> Option<Format> {
    let mut best_xml = 0u16;
    let mut best_json = 0u16;
    let mut named = false;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let mut q = 1000u16;
        for param in parts {
            if let Some((name, value)) = param.split_once('=') {
                if name.trim().eq_ignore_ascii_case("q") {
                    q = parse_qvalue(value.trim()).unwrap_or(0);
                }
            }
        }
        let kind = if media == "*/*" || media.eq_ignore_ascii_case("application/*") {
            Some(Format::Json)
        } else {
            let kind = classify_media_type(media);
            named |= kind.is_some();
            kind
        };
        match kind {
            Some(Format::Xml) => best_xml = best_xml.max(q),
            Some(Format::Json) => best_json = best_json.max(q),
            None => {}
        }
    }
    if !named {
        None
    } else if best_xml > 0 && best_xml > best_json {
        Some(Format::Xml)
    } else {
        (best_json > 0).then_some(Format::Json)
    }
}

/// An RFC 9110 qvalue as thousandths (`1`, `0.8`, `0.125`); `None` when malformed.
fn parse_qvalue(text: &str) -> Option<u16> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths = 0u16;
    for (i, b) in frac.bytes().enumerate() {
        thousandths += u16::from(b - b'0') * [100, 10, 1][i];
    }
    match whole {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// FHIR format names and media types (parameters such as `charset` ignored).
fn classify_media_type(value: &str) -> Option<Format> {
    let media = value.split(';').next().unwrap_or("").trim();
    const XML: [&str; 5] = [
        "xml",
        "text/xml",
        "application/xml",
        "application/fhir+xml",
        "application/xml+fhir",
    ];
    const JSON: [&str; 5] = [
        "json",
        "text/json",
        "application/json",
        "application/fhir+json",
        "application/json+fhir",
    ];
    if XML.iter().any(|t| media.eq_ignore_ascii_case(t)) {
        Some(Format::Xml)
    } else if JSON.iter().any(|t| media.eq_ignore_ascii_case(t)) {
        Some(Format::Json)
    } else {
        None
    }
}

/// A rendered OperationOutcome body and its Content-Type.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// `application/fhir+json;charset=utf-8` or `application/fhir+xml;charset=utf-8`.
    pub content_type: &'static str,
    /// The complete body.
    pub body: Bytes,
}

/// Render a rejection as an OperationOutcome with resource id `id` (the gateway request id).
pub fn render(rejection: &Rejection, format: Format, id: &str) -> Rendered {
    render_with_text(rejection, format, id, rejection.hint())
}

/// [`render`], with `text` (what to fix, in words) as `issue[0].details.text` when given.
pub fn render_with_text(
    rejection: &Rejection,
    format: Format,
    id: &str,
    text: Option<&str>,
) -> Rendered {
    let token = rejection.token();
    let status = rejection.status();
    let status_code = status.as_str();
    // The SSP coding first: the real SSP sends it alone, so a consumer reading the first
    // coding finds what it expects; the Spine code follows where there is one.
    let mut codings: [Coding<'_>; 2] = [
        Coding {
            system: SSP_CODE_SYSTEM,
            code: status_code,
            display: &token,
        },
        Coding {
            system: SPINE_CODE_SYSTEM,
            code: "",
            display: "",
        },
    ];
    let codings: &[Coding<'_>] = match rejection.spine_code() {
        Some(code) => {
            codings[1].code = code;
            codings[1].display = spine_display(code);
            &codings
        }
        None => &codings[..1],
    };
    let outcome = Outcome {
        resource_type: "OperationOutcome",
        id,
        issue: [Issue {
            severity: "error",
            code: rejection.issue_type(),
            details: Details {
                coding: codings,
                text,
            },
            diagnostics: &token,
        }],
    };
    match format {
        Format::Json => Rendered {
            content_type: CONTENT_TYPE_JSON,
            body: Bytes::from(outcome.to_json()),
        },
        Format::Xml => Rendered {
            content_type: CONTENT_TYPE_XML,
            body: Bytes::from(outcome.to_xml()),
        },
    }
}

#[derive(Serialize)]
struct Outcome<'a> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    id: &'a str,
    issue: [Issue<'a>; 1],
}

#[derive(Serialize)]
struct Issue<'a> {
    severity: &'static str,
    code: &'static str,
    details: Details<'a>,
    diagnostics: &'a str,
}

#[derive(Serialize)]
struct Details<'a> {
    coding: &'a [Coding<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

#[derive(Serialize)]
struct Coding<'a> {
    system: &'static str,
    code: &'a str,
    display: &'a str,
}

impl Outcome<'_> {
    fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs of strings into a Vec cannot fail; fall back to an empty
        // object rather than panic should that ever change.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    fn to_xml(&self) -> String {
        let issue = &self.issue[0];
        let mut out = String::with_capacity(512 + 2 * issue.diagnostics.len());
        out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
        out.push_str("<OperationOutcome xmlns=\"http://hl7.org/fhir\">");
        xml_value(&mut out, "id", self.id);
        out.push_str("<issue>");
        xml_value(&mut out, "severity", issue.severity);
        xml_value(&mut out, "code", issue.code);
        out.push_str("<details>");
        for coding in issue.details.coding {
            out.push_str("<coding>");
            xml_value(&mut out, "system", coding.system);
            xml_value(&mut out, "code", coding.code);
            xml_value(&mut out, "display", coding.display);
            out.push_str("</coding>");
        }
        if let Some(text) = issue.details.text {
            xml_value(&mut out, "text", text);
        }
        out.push_str("</details>");
        xml_value(&mut out, "diagnostics", issue.diagnostics);
        out.push_str("</issue></OperationOutcome>");
        out
    }
}

/// `<name value="escaped"/>`
fn xml_value(out: &mut String, name: &str, value: &str) {
    out.push('<');
    out.push_str(name);
    out.push_str(" value=\"");
    out.push_str(&xml_escape_attr(value));
    out.push_str("\"/>");
}

/// Escape text for a double-quoted XML 1.0 attribute. Tab, CR and LF become character
/// references (so attribute normalisation keeps them); characters XML 1.0 cannot carry at all
/// (other C0 controls, U+FFFE, U+FFFF) become U+FFFD.
fn xml_escape_attr(value: &str) -> Cow<'_, str> {
    let needs =
        |c: char| matches!(c, '&' | '<' | '>' | '"' | '\'' | '\u{FFFE}' | '\u{FFFF}') || c < ' ';
    if !value.chars().any(needs) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 16);
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn all_rejections() -> Vec<(
        Rejection,
        u16,
        Option<&'static str>,
        &'static str,
        &'static str,
    )> {
        vec![
            (
                Rejection::MethodNotAllowed {
                    method: "delete".into(),
                    allow: String::new(),
                },
                405,
                Some("BAD_REQUEST"),
                "not-supported",
                "METHOD_NOT_ALLOWED_DELETE",
            ),
            (
                Rejection::InvalidTargetUrl,
                400,
                Some("BAD_REQUEST"),
                "invalid",
                "INVALID_TARGET_URL",
            ),
            (
                Rejection::MissingOrInvalidHeader {
                    header: "Ssp-TraceID",
                },
                400,
                Some("BAD_REQUEST"),
                "invalid",
                "MISSING_OR_INVALID_HEADER_Ssp-TraceID",
            ),
            (
                Rejection::UnsupportedInteraction {
                    id: "urn:x:y".into(),
                },
                400,
                Some("BAD_REQUEST"),
                "invalid",
                "UNSUPPORTED_INTERACTION_urn:x:y",
            ),
            (
                Rejection::InteractionMismatch {
                    id: "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1".into(),
                    method: "post".into(),
                    path: "/B82617/STU3/1/gpconnect/Slot".into(),
                },
                400,
                Some("BAD_REQUEST"),
                "invalid",
                "INTERACTION_urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1_DOES_NOT_MATCH_REQUEST_POST_/B82617/STU3/1/gpconnect/Slot",
            ),
            (
                Rejection::CorsOriginNotAllowed {
                    origin: "https://elsewhere.example".into(),
                },
                403,
                Some("ACCESS_DENIED"),
                "forbidden",
                "CORS_ORIGIN_NOT_ALLOWED_https://elsewhere.example",
            ),
            (
                Rejection::AsidCheckFailed {
                    sender: "100000000001".into(),
                },
                403,
                Some("ACCESS_DENIED"),
                "forbidden",
                "ASID_CHECK_FAILED_MESSAGESENDER_100000000001",
            ),
            (
                Rejection::FqdnNotRegistered {
                    fqdn: "rogue.dev.local".into(),
                    asid: "200000000359".into(),
                },
                403,
                Some("ACCESS_DENIED_SSL"),
                "forbidden",
                "CLIENT_CERTIFICATE_FQDN_rogue.dev.local_NOT_REGISTERED_FOR_ASID_200000000359",
            ),
            (
                Rejection::ReceiverCheckFailed {
                    receiver: "200000000002".into(),
                },
                403,
                Some("ACCESS_DENIED"),
                "forbidden",
                "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_200000000002",
            ),
            (
                Rejection::NoSharingAgreement {
                    sender: "200000000001".into(),
                    receiver: "200000000002".into(),
                },
                403,
                Some("ACCESS_DENIED"),
                "forbidden",
                "FOT_CHECK_FAILED_MESSAGESENDER_200000000001_MESSAGERECEIVER_200000000002",
            ),
            (
                Rejection::EndpointMismatch {
                    endpoint: "https://supplier.thirdparty.nhs.uk/v1/fhir/".into(),
                    cpa_id: "S000000000001".into(),
                    target: "https://supplier.thirdparty.nhs.uk/v1/test".into(),
                },
                400,
                Some("BAD_REQUEST"),
                "invalid",
                "ENDPOINT_https://supplier.thirdparty.nhs.uk/v1/fhir/_CPAID_S000000000001_VARIES_FROM_TARGETURL_https://supplier.thirdparty.nhs.uk/v1/test",
            ),
            (
                Rejection::InvalidJwt { reason: "EXPIRED" },
                400,
                Some("BAD_REQUEST"),
                "invalid",
                "INVALID_JWT_EXPIRED",
            ),
            (
                Rejection::DirectoryUnavailable,
                503,
                Some("INTERNAL_SERVER_ERROR"),
                "transient",
                "DIRECTORY_UNAVAILABLE",
            ),
            (
                Rejection::AuditUnavailable,
                503,
                Some("INTERNAL_SERVER_ERROR"),
                "transient",
                "AUDIT_UNAVAILABLE",
            ),
            (
                Rejection::RateLimited {
                    sender: "200000000359".into(),
                },
                429,
                None,
                "throttled",
                "RATE_LIMIT_EXCEEDED_MESSAGESENDER_200000000359",
            ),
            (Rejection::Overloaded, 503, None, "throttled", "GATEWAY_OVERLOADED"),
            (
                Rejection::BodyTooLarge,
                413,
                Some("BAD_REQUEST"),
                "too-long",
                "REQUEST_BODY_TOO_LARGE",
            ),
            (
                Rejection::RequestBodyTimeout,
                408,
                Some("BAD_REQUEST"),
                "timeout",
                "REQUEST_BODY_TIMEOUT",
            ),
            (
                Rejection::InvalidRequestBody,
                400,
                Some("BAD_REQUEST"),
                "invalid",
                "INVALID_REQUEST_BODY",
            ),
            (
                Rejection::BodyNotAllowed {
                    method: "GET".into(),
                },
                400,
                Some("BAD_REQUEST"),
                "invalid",
                "REQUEST_BODY_NOT_ALLOWED_GET",
            ),
            (
                Rejection::UpstreamError {
                    url: "https://p.example/D11111/STU3/1/GPConnect/Patient".into(),
                },
                502,
                None,
                "transient",
                "ERROR_COMMUNICATING_TO_ENDPOINT_URL_https://p.example/D11111/STU3/1/GPConnect/Patient",
            ),
            (
                Rejection::CircuitOpen {
                    url: "https://p.example/D11111/STU3/1/GPConnect/Patient".into(),
                },
                502,
                None,
                "transient",
                "ERROR_COMMUNICATING_TO_ENDPOINT_URL_https://p.example/D11111/STU3/1/GPConnect/Patient",
            ),
            (
                Rejection::UpstreamTimeout {
                    url: "https://p.example/x".into(),
                },
                504,
                None,
                "timeout",
                "TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_https://p.example/x",
            ),
        ]
    }

    #[test]
    fn every_rejection_has_its_status_code_issue_type_and_token() {
        for (rejection, status, spine, issue, token) in all_rejections() {
            assert_eq!(rejection.status().as_u16(), status, "{rejection:?}");
            assert_eq!(rejection.spine_code(), spine, "{rejection:?}");
            assert_eq!(rejection.issue_type(), issue, "{rejection:?}");
            assert_eq!(rejection.token(), token, "{rejection:?}");
        }
    }

    #[test]
    fn reasons_are_distinct_bounded_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for (rejection, ..) in all_rejections() {
            let reason = rejection.reason();
            assert!(
                reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{reason}"
            );
            assert!(seen.insert(reason), "duplicate reason {reason}");
        }
        // The two rejections the table above does not hold.
        for rejection in [
            Rejection::CertificateNoLongerAccepted {
                reason: "CERTIFICATE_REVOKED",
            },
            Rejection::DirectoryQueriesExceeded,
        ] {
            assert!(seen.insert(rejection.reason()), "{rejection:?}");
        }
        let listed: std::collections::HashSet<_> = Rejection::REASONS.iter().copied().collect();
        assert_eq!(seen, listed, "Rejection::REASONS is every reason, once");
        assert_eq!(
            Rejection::AsidCheckFailed {
                sender: "123".into()
            }
            .reason(),
            "asid_check_failed"
        );
        assert_eq!(
            Rejection::InvalidJwt { reason: "EXPIRED" }.reason(),
            "invalid_jwt"
        );
    }

    #[test]
    fn negotiate_defaults_to_json() {
        assert_eq!(negotiate(None, None), Format::Json);
        assert_eq!(negotiate(Some(""), Some("")), Format::Json);
        assert_eq!(negotiate(Some("*/*"), None), Format::Json);
        assert_eq!(negotiate(Some("text/html"), None), Format::Json);
        // The request's own Content-Type when neither _format nor Accept names a format.
        let xml_body = Some("application/fhir+xml;charset=utf-8");
        assert_eq!(negotiate_request(None, xml_body, None), Format::Xml);
        assert_eq!(
            negotiate_request(Some("text/html"), xml_body, None),
            Format::Xml
        );
        // Wildcards alone name no format: the XML body decides (curl sends `*/*`).
        assert_eq!(negotiate_request(Some("*/*"), xml_body, None), Format::Xml);
        assert_eq!(
            negotiate_request(Some("application/*;q=0.9, */*;q=0.1"), xml_body, None),
            Format::Xml
        );
        assert_eq!(
            negotiate_request(Some("*/*"), Some("application/fhir+json"), None),
            Format::Json
        );
        // A JSON range named beside the wildcard still wins over the XML body.
        assert_eq!(
            negotiate_request(Some("application/fhir+json, */*"), xml_body, None),
            Format::Json
        );
        assert_eq!(
            negotiate_request(Some("application/fhir+json"), xml_body, None),
            Format::Json
        );
        assert_eq!(
            negotiate_request(None, xml_body, Some("_format=json")),
            Format::Json
        );
        assert_eq!(
            negotiate_request(None, Some("application/fhir+json"), None),
            Format::Json
        );
        assert_eq!(
            negotiate_request(None, Some("text/plain"), None),
            Format::Json
        );
    }

    #[test]
    fn negotiate_format_param_overrides_accept() {
        let json_accept = Some("application/fhir+json");
        for xml in [
            "xml",
            "text/xml",
            "application/xml",
            "application/fhir+xml",
            "application/xml+fhir",
            "application%2Ffhir%2Bxml",
            "application%2ffhir%2bxml",
            "APPLICATION/FHIR+XML",
            "application/fhir+xml;charset=utf-8",
        ] {
            let query = format!("status=free&_format={xml}");
            assert_eq!(negotiate(json_accept, Some(&query)), Format::Xml, "{xml}");
        }
        for json in [
            "json",
            "application/json",
            "application/fhir+json",
            "application/json+fhir",
            "application%2Ffhir%2Bjson",
        ] {
            let query = format!("_format={json}");
            assert_eq!(
                negotiate(Some("application/fhir+xml"), Some(&query)),
                Format::Json,
                "{json}"
            );
        }
        // An unrecognised _format is ignored; Accept decides.
        assert_eq!(
            negotiate(Some("application/fhir+xml"), Some("_format=turtle")),
            Format::Xml
        );
        // Only the exact key counts.
        assert_eq!(
            negotiate(None, Some("x_format=xml&format=xml")),
            Format::Json
        );
    }

    #[test]
    fn negotiate_accept_preferences() {
        assert_eq!(
            negotiate(Some("application/fhir+xml;charset=utf-8"), None),
            Format::Xml
        );
        assert_eq!(
            negotiate(Some("application/fhir+xml, application/fhir+json"), None),
            Format::Json
        );
        assert_eq!(
            negotiate(
                Some("application/fhir+json;q=0.5, application/fhir+xml"),
                None
            ),
            Format::Xml
        );
        assert_eq!(
            negotiate(Some("application/fhir+xml;q=0.5, */*;q=0.5"), None),
            Format::Json
        );
        assert_eq!(
            negotiate(
                Some("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
                None
            ),
            Format::Xml
        );
        assert_eq!(negotiate(Some("application/xml;q=0"), None), Format::Json);
        assert_eq!(
            negotiate(Some("application/xml;q=bogus"), None),
            Format::Json
        );
    }

    #[test]
    fn json_render_has_the_exact_shape() {
        let rejection = Rejection::AsidCheckFailed {
            sender: "100000000001".into(),
        };
        let rendered = render(
            &rejection,
            Format::Json,
            "10960df2-29d1-4e71-823c-c0bb9d723012",
        );
        assert_eq!(rendered.content_type, "application/fhir+json;charset=utf-8");
        let got: Value = serde_json::from_slice(&rendered.body).expect("valid JSON");
        let want = serde_json::json!({
            "resourceType": "OperationOutcome",
            "id": "10960df2-29d1-4e71-823c-c0bb9d723012",
            "issue": [{
                "severity": "error",
                "code": "forbidden",
                "details": {"coding": [
                    {"system": "http://fhir.nhs.net/ValueSet/gpconnect-schedule-response-code-1-0",
                     "code": "403",
                     "display": "ASID_CHECK_FAILED_MESSAGESENDER_100000000001"},
                    {"system": "https://fhir.nhs.uk/STU3/CodeSystem/Spine-ErrorOrWarningCode-1",
                     "code": "ACCESS_DENIED",
                     "display": "Access has been denied to process this request"}
                ]},
                "diagnostics": "ASID_CHECK_FAILED_MESSAGESENDER_100000000001"
            }]
        });
        assert_eq!(got, want);
    }

    #[test]
    fn json_render_omits_the_spine_coding_when_there_is_none() {
        let rejection = Rejection::UpstreamTimeout {
            url: "https://p.example/x".into(),
        };
        let rendered = render(&rejection, Format::Json, "id-1");
        let got: Value = serde_json::from_slice(&rendered.body).expect("valid JSON");
        let coding = got["issue"][0]["details"]["coding"]
            .as_array()
            .expect("coding array");
        assert_eq!(coding.len(), 1);
        assert_eq!(coding[0]["code"], "504");
        assert_eq!(coding[0]["system"], SSP_CODE_SYSTEM);
        assert_eq!(got["issue"][0]["code"], "timeout");
    }

    const HOSTILE: &str = "a\"b'c<d>e&f\\g\u{0}h\u{1f}i\tj\nk\rl\u{7f}m é 日本 \u{FFFF}</x><!--";

    #[test]
    fn json_render_escapes_hostile_tokens_and_ids() {
        for (rejection, ..) in all_rejections() {
            let hostile = match rejection {
                Rejection::UpstreamError { .. } => Rejection::UpstreamError {
                    url: HOSTILE.into(),
                },
                other => other,
            };
            let rendered = render(&hostile, Format::Json, HOSTILE);
            let got: Value = serde_json::from_slice(&rendered.body).expect("valid JSON");
            assert_eq!(got["id"], HOSTILE);
            assert_eq!(got["issue"][0]["diagnostics"], hostile.token());
            let coding = got["issue"][0]["details"]["coding"]
                .as_array()
                .expect("coding");
            assert_eq!(coding[0]["system"], SSP_CODE_SYSTEM);
            assert_eq!(coding[0]["display"], hostile.token());
        }
    }

    #[test]
    fn xml_render_exact_text() {
        let rejection = Rejection::AsidCheckFailed {
            sender: "100000000001".into(),
        };
        let rendered = render(&rejection, Format::Xml, "abc");
        assert_eq!(rendered.content_type, "application/fhir+xml;charset=utf-8");
        let want = concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            r#"<OperationOutcome xmlns="http://hl7.org/fhir">"#,
            r#"<id value="abc"/>"#,
            r#"<issue><severity value="error"/><code value="forbidden"/>"#,
            r#"<details>"#,
            r#"<coding><system value="http://fhir.nhs.net/ValueSet/gpconnect-schedule-response-code-1-0"/>"#,
            r#"<code value="403"/><display value="ASID_CHECK_FAILED_MESSAGESENDER_100000000001"/></coding>"#,
            r#"<coding><system value="https://fhir.nhs.uk/STU3/CodeSystem/Spine-ErrorOrWarningCode-1"/>"#,
            r#"<code value="ACCESS_DENIED"/><display value="Access has been denied to process this request"/></coding>"#,
            r#"</details>"#,
            r#"<diagnostics value="ASID_CHECK_FAILED_MESSAGESENDER_100000000001"/>"#,
            r#"</issue></OperationOutcome>"#
        );
        assert_eq!(std::str::from_utf8(&rendered.body).expect("utf-8"), want);
    }

    /// Minimal reader for the attribute values this module writes (test only).
    fn xml_unescape(text: &str) -> String {
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&#9;", "\t")
            .replace("&#10;", "\n")
            .replace("&#13;", "\r")
            .replace("&amp;", "&")
    }

    /// The raw text of every `value="..."` attribute of elements named `name`.
    fn xml_values<'a>(xml: &'a str, name: &str) -> Vec<&'a str> {
        let open = format!("<{name} value=\"");
        let mut out = Vec::new();
        let mut rest = xml;
        while let Some(start) = rest.find(&open) {
            let after = &rest[start + open.len()..];
            let end = after.find('"').expect("closing quote");
            out.push(&after[..end]);
            rest = &after[end..];
        }
        out
    }

    #[test]
    fn xml_render_escapes_hostile_input() {
        let rejection = Rejection::UpstreamError {
            url: HOSTILE.into(),
        };
        let rendered = render(&rejection, Format::Xml, HOSTILE);
        let xml = std::str::from_utf8(&rendered.body).expect("utf-8");
        // Nothing raw that could end an attribute, open markup or be illegal in XML 1.0.
        for value in xml_values(xml, "diagnostics")
            .into_iter()
            .chain(xml_values(xml, "id"))
        {
            assert!(!value.contains(['<', '>', '\'', '\t', '\n', '\r', '\u{0}', '\u{1f}']));
            assert!(!value.contains('\u{FFFF}'));
            for (i, _) in value.match_indices('&') {
                let entity = &value[i..];
                assert!(
                    ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#9;", "&#10;", "&#13;"]
                        .iter()
                        .any(|e| entity.starts_with(e)),
                    "bare & in {value}"
                );
            }
        }
        let expected_text = HOSTILE.replace(['\u{0}', '\u{1f}', '\u{FFFF}'], "\u{FFFD}");
        let diagnostics = xml_values(xml, "diagnostics");
        assert_eq!(diagnostics.len(), 1);
        assert_eq!(
            xml_unescape(diagnostics[0]),
            format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{expected_text}")
        );
        assert_eq!(xml_unescape(xml_values(xml, "id")[0]), expected_text);
        // Structure intact: exactly one issue, the elements closed.
        assert_eq!(xml.matches("<issue>").count(), 1);
        assert!(xml.ends_with("</issue></OperationOutcome>"));
        // The 502 has no Spine coding.
        assert_eq!(xml.matches("<coding>").count(), 1);
    }

    #[test]
    fn a_hint_is_the_details_text_in_both_formats_and_absent_without_one() {
        let header = Rejection::MissingOrInvalidHeader { header: "Ssp-To" };
        let hint = header.hint().expect("a hint");
        assert!(hint.contains("not an ODS code"), "{hint}");
        let json: Value =
            serde_json::from_slice(&render(&header, Format::Json, "id").body).expect("JSON");
        assert_eq!(json["issue"][0]["details"]["text"], hint);
        assert_eq!(
            json["issue"][0]["diagnostics"],
            "MISSING_OR_INVALID_HEADER_Ssp-To"
        );
        let xml =
            String::from_utf8(render(&header, Format::Xml, "id").body.to_vec()).expect("utf-8");
        assert!(
            xml.contains("</coding><text value=\"Ssp-From and Ssp-To must each be sent once"),
            "{xml}"
        );
        // Given by the caller (the target URL's problem).
        let target = render_with_text(
            &Rejection::InvalidTargetUrl,
            Format::Json,
            "id",
            Some("the target URL's path holds `..`"),
        );
        let json: Value = serde_json::from_slice(&target.body).expect("JSON");
        assert_eq!(
            json["issue"][0]["details"]["text"],
            "the target URL's path holds `..`"
        );
        // None: no `text` at all.
        let upstream = Rejection::UpstreamError {
            url: "https://p.example/x".into(),
        };
        assert_eq!(upstream.hint(), None);
        let json: Value =
            serde_json::from_slice(&render(&upstream, Format::Json, "id").body).expect("JSON");
        assert!(json["issue"][0]["details"].get("text").is_none(), "{json}");
        let xml =
            String::from_utf8(render(&upstream, Format::Xml, "id").body.to_vec()).expect("utf-8");
        assert!(!xml.contains("<text"), "{xml}");
    }

    #[test]
    fn xml_escape_is_borrowed_when_clean() {
        assert!(matches!(xml_escape_attr("plain-text_1"), Cow::Borrowed(_)));
        assert_eq!(
            xml_escape_attr("&<>\"'"),
            "&amp;&lt;&gt;&quot;&apos;".to_owned()
        );
    }
}
