//! The gateway's own rejections (ARCHITECTURE.md "Errors") and their one rendering as a FHIR
//! OperationOutcome, JSON or XML. Every error the gateway itself answers goes through here;
//! provider errors never do (they pass back unchanged).

use http::StatusCode;

/// Why the gateway refused a request. Each variant knows its HTTP status, Spine code and token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// 405 `METHOD_NOT_ALLOWED_<METHOD>`
    MethodNotAllowed { method: String },
    /// 400 `INVALID_TARGET_URL`
    InvalidTargetUrl,
    /// 400 `MISSING_OR_INVALID_HEADER_<Header-Name>` (canonical name, e.g. `Ssp-TraceID`)
    MissingOrInvalidHeader { header: &'static str },
    /// 400 `UNSUPPORTED_INTERACTION_<id>`
    UnsupportedInteraction { id: String },
    /// 400 `INTERACTION_<id>_DOES_NOT_MATCH_REQUEST_<METHOD>_<path>`
    InteractionMismatch { id: String, method: String, path: String },
    /// 403 `ASID_CHECK_FAILED_MESSAGESENDER_<asid>`
    AsidCheckFailed { sender: String },
    /// 403 `CLIENT_CERTIFICATE_FQDN_<fqdn>_NOT_REGISTERED_FOR_ASID_<asid>`
    FqdnNotRegistered { fqdn: String, asid: String },
    /// 403 `PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_<asid>`
    ReceiverCheckFailed { receiver: String },
    /// 403 `FOT_CHECK_FAILED_MESSAGESENDER_<a>_MESSAGERECEIVER_<b>`
    NoSharingAgreement { sender: String, receiver: String },
    /// 400 `ENDPOINT_<endpoint>_CPAID_<cpaid>_VARIES_FROM_TARGETURL_<url>`
    EndpointMismatch { endpoint: String, cpa_id: String, target: String },
    /// 400 `INVALID_JWT_<REASON>`; `reason` is upper snake case from `JwtError::reason`.
    InvalidJwt { reason: &'static str },
    /// 503 `DIRECTORY_UNAVAILABLE`
    DirectoryUnavailable,
    /// 502 `ERROR_COMMUNICATING_TO_ENDPOINT_URL_<url>`
    UpstreamError { url: String },
    /// 504 `TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_<url>`
    UpstreamTimeout { url: String },
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}
