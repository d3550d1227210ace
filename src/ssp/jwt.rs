//! The GP Connect 1.2.7 bearer token (GPC-JWT): an unsigned JWT (`alg: none`, empty
//! signature) carrying the consumer's audit claims. This module decodes it structurally
//! (`decode`, for policy `log`), judges it against the 1.2.7 rules (`check`, for policy
//! `enforce`) and extracts the claims of audit value. Pure functions: the caller supplies the
//! clock. It never verifies signatures (there are none) and never trusts a claim for routing.
//!
//! Rejection reasons (`JwtError::reason`, sent as `INVALID_JWT_<REASON>`), a fixed set:
//!
//! | Reason | Meaning |
//! |---|---|
//! | `MISSING` | no `Authorization` header |
//! | `NOT_BEARER` | the scheme is not `Bearer` (case-insensitive) |
//! | `MULTIPLE_AUTHORIZATION_HEADERS` | more than one `Authorization` header: which token the provider reads is anyone's guess |
//! | `TOO_LARGE` | the token is longer than 16 KiB |
//! | `MALFORMED` | not three dot-separated base64url parts, or header/payload not a JSON object |
//! | `ALG_NOT_NONE` | header `alg` missing or not `none` |
//! | `TYP_NOT_JWT` | header `typ` present but not `JWT` |
//! | `SIGNATURE_NOT_EMPTY` | the third part is not empty (the token must end in `.`) |
//! | `MISSING_CLAIM_<NAME>` | a required claim is absent, null or an empty string |
//! | `CLAIM_TYPE_<NAME>` | a required claim has the wrong JSON type (string, integer, object) |
//! | `EXP_NOT_IAT_PLUS_300` | `exp` is not exactly `iat + 300` |
//! | `EXPIRED` | `now > exp + skew` |
//! | `IAT_IN_FUTURE` | `iat > now + skew` |
//! | `REASON_FOR_REQUEST` | `reason_for_request` is not `directcare` |
//! | `SCOPE_NOT_ALLOWED` | `requested_scope` is not one the interaction allows |
//! | `INVALID_RESOURCE_<CLAIM>` | `requesting_device`/`_organization`/`_practitioner` is not the minimal resource required |
//! | `SUB_NOT_PRACTITIONER_ID` | `sub` differs from `requesting_practitioner.id` |
//!
//! `<NAME>` is the claim name in upper case: `ISS`, `SUB`, `AUD`, `IAT`, `EXP`,
//! `REASON_FOR_REQUEST`, `REQUESTED_SCOPE`, `REQUESTING_DEVICE`, `REQUESTING_ORGANIZATION`,
//! `REQUESTING_PRACTITIONER`.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use http::HeaderValue;

use super::json::{Invalid, Reader, Token};
use crate::h1::trim_ows;
#[cfg(test)]
use serde_json::Map;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

/// The longest bearer token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// `exp` must be exactly `iat` plus this many seconds.
pub const LIFETIME_SECS: i64 = 300;
/// The only `reason_for_request` GP Connect 1.2.7 allows.
pub const DIRECT_CARE: &str = "directcare";
/// Identifier system of an ODS organisation code.
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// Identifier system of an SDS user id.
pub const SDS_USER_ID_SYSTEM: &str = "https://fhir.nhs.uk/Id/sds-user-id";
/// Identifier system of an SDS role profile id.
pub const SDS_ROLE_PROFILE_SYSTEM: &str = "https://fhir.nhs.uk/Id/sds-role-profile-id";

/// The JOSE header of every unsigned GP Connect token.
const HEADER_JSON: &str = r#"{"alg":"none","typ":"JWT"}"#;

/// base64url, padding optional on input (consumers differ).
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What the gateway does with the bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JwtPolicy {
    /// Reject requests whose token breaks the 1.2.7 rules (`check`). The default.
    #[default]
    Enforce,
    /// Forward regardless; audit the claims when the token decodes (`decode`).
    Log,
    /// Do not look at the token.
    Off,
}

/// The claims of audit value. Every field is optional: under policy `log` a token may lack any.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct JwtClaims {
    /// `iss`: the consumer system's URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// `sub`: the user id (equals `requesting_practitioner.id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// `aud`: as sent (often a legacy value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// `iat`, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// `exp`, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// `reason_for_request`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_for_request: Option<String>,
    /// `requested_scope`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_scope: Option<String>,
    /// `requesting_organization` ODS code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub organization_ods_code: Option<String>,
    /// `requesting_organization.name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub organization_name: Option<String>,
    /// `requesting_practitioner.id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub practitioner_id: Option<String>,
    /// The practitioner's SDS user id (may be `UNK`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sds_user_id: Option<String>,
    /// The practitioner's SDS role profile id (may be `UNK`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sds_role_profile_id: Option<String>,
    /// The practitioner's name as one display string: given names then family name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub practitioner_name: Option<String>,
    /// The first `requesting_device` identifier as `system|value`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_identifier: Option<String>,
    /// `requesting_device.model`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_model: Option<String>,
    /// `requesting_device.version`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_version: Option<String>,
    /// The claims' JSON once rendered (see [`JwtClaims::json`]).
    #[serde(skip)]
    json: RenderedJson,
}

impl JwtClaims {
    /// The claims as compact JSON, exactly as serialising them writes it, rendered on the
    /// first call and kept. A request's audit records share one `Arc<JwtClaims>` and write
    /// this, so the claims are serialised once per request rather than once per record. Claims
    /// are not changed once rendered (a clone renders afresh). Written by the
    /// [`crate::jsonw`] writer: the same bytes as serde_json (a test compares them).
    pub fn json(&self) -> &str {
        self.json.0.get_or_init(|| {
            let mut out = Vec::with_capacity(768);
            self.write_json(&mut out);
            // Only `&str`s and ASCII were written.
            String::from_utf8(out)
                .unwrap_or_else(|_| String::from("{}"))
                .into_boxed_str()
        })
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = crate::jsonw::Object::new(out);
        o.opt_str("iss", self.iss.as_deref());
        o.opt_str("sub", self.sub.as_deref());
        o.opt_str("aud", self.aud.as_deref());
        o.opt_int("iat", self.iat);
        o.opt_int("exp", self.exp);
        o.opt_str("reason_for_request", self.reason_for_request.as_deref());
        o.opt_str("requested_scope", self.requested_scope.as_deref());
        o.opt_str(
            "organization_ods_code",
            self.organization_ods_code.as_deref(),
        );
        o.opt_str("organization_name", self.organization_name.as_deref());
        o.opt_str("practitioner_id", self.practitioner_id.as_deref());
        o.opt_str("sds_user_id", self.sds_user_id.as_deref());
        o.opt_str("sds_role_profile_id", self.sds_role_profile_id.as_deref());
        o.opt_str("practitioner_name", self.practitioner_name.as_deref());
        o.opt_str("device_identifier", self.device_identifier.as_deref());
        o.opt_str("device_model", self.device_model.as_deref());
        o.opt_str("device_version", self.device_version.as_deref());
        o.end();
    }
}

/// [`JwtClaims::json`]'s store. Not part of the claims' value: equal whatever it holds, and a
/// clone starts empty.
#[derive(Default)]
struct RenderedJson(OnceLock<Box<str>>);

impl Clone for RenderedJson {
    fn clone(&self) -> Self {
        RenderedJson::default()
    }
}

impl PartialEq for RenderedJson {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for RenderedJson {}

impl fmt::Debug for RenderedJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "rendered"
        } else {
            "not rendered"
        })
    }
}

/// A required claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Iss,
    Sub,
    Aud,
    Iat,
    Exp,
    ReasonForRequest,
    RequestedScope,
    RequestingDevice,
    RequestingOrganization,
    RequestingPractitioner,
}

impl Claim {
    /// The claim's JSON name.
    pub fn name(self) -> &'static str {
        match self {
            Claim::Iss => "iss",
            Claim::Sub => "sub",
            Claim::Aud => "aud",
            Claim::Iat => "iat",
            Claim::Exp => "exp",
            Claim::ReasonForRequest => "reason_for_request",
            Claim::RequestedScope => "requested_scope",
            Claim::RequestingDevice => "requesting_device",
            Claim::RequestingOrganization => "requesting_organization",
            Claim::RequestingPractitioner => "requesting_practitioner",
        }
    }

    fn missing_reason(self) -> &'static str {
        match self {
            Claim::Iss => "MISSING_CLAIM_ISS",
            Claim::Sub => "MISSING_CLAIM_SUB",
            Claim::Aud => "MISSING_CLAIM_AUD",
            Claim::Iat => "MISSING_CLAIM_IAT",
            Claim::Exp => "MISSING_CLAIM_EXP",
            Claim::ReasonForRequest => "MISSING_CLAIM_REASON_FOR_REQUEST",
            Claim::RequestedScope => "MISSING_CLAIM_REQUESTED_SCOPE",
            Claim::RequestingDevice => "MISSING_CLAIM_REQUESTING_DEVICE",
            Claim::RequestingOrganization => "MISSING_CLAIM_REQUESTING_ORGANIZATION",
            Claim::RequestingPractitioner => "MISSING_CLAIM_REQUESTING_PRACTITIONER",
        }
    }

    fn type_reason(self) -> &'static str {
        match self {
            Claim::Iss => "CLAIM_TYPE_ISS",
            Claim::Sub => "CLAIM_TYPE_SUB",
            Claim::Aud => "CLAIM_TYPE_AUD",
            Claim::Iat => "CLAIM_TYPE_IAT",
            Claim::Exp => "CLAIM_TYPE_EXP",
            Claim::ReasonForRequest => "CLAIM_TYPE_REASON_FOR_REQUEST",
            Claim::RequestedScope => "CLAIM_TYPE_REQUESTED_SCOPE",
            Claim::RequestingDevice => "CLAIM_TYPE_REQUESTING_DEVICE",
            Claim::RequestingOrganization => "CLAIM_TYPE_REQUESTING_ORGANIZATION",
            Claim::RequestingPractitioner => "CLAIM_TYPE_REQUESTING_PRACTITIONER",
        }
    }
}

/// A claim holding a minimal FHIR resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceClaim {
    RequestingDevice,
    RequestingOrganization,
    RequestingPractitioner,
}

impl ResourceClaim {
    /// The claim's JSON name.
    pub fn name(self) -> &'static str {
        match self {
            ResourceClaim::RequestingDevice => "requesting_device",
            ResourceClaim::RequestingOrganization => "requesting_organization",
            ResourceClaim::RequestingPractitioner => "requesting_practitioner",
        }
    }
}

/// Why a bearer token was refused. `reason()` is the bounded token suffix; the `Display` text
/// is for logs only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// `MISSING`
    #[error("no Authorization header")]
    Missing,
    /// `NOT_BEARER`
    #[error("Authorization scheme is not Bearer")]
    NotBearer,
    /// `MULTIPLE_AUTHORIZATION_HEADERS`
    #[error("more than one Authorization header")]
    MultipleAuthorization,
    /// `TOO_LARGE`
    #[error("bearer token longer than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    /// `MALFORMED`; the text says which part (for logs only)
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// `ALG_NOT_NONE`
    #[error("JWT header alg is not \"none\"")]
    AlgNotNone,
    /// `TYP_NOT_JWT`
    #[error("JWT header typ is not \"JWT\"")]
    TypNotJwt,
    /// `SIGNATURE_NOT_EMPTY`
    #[error("JWT signature part is not empty")]
    SignatureNotEmpty,
    /// `MISSING_CLAIM_<NAME>`: absent, null or an empty string
    #[error("claim {} is missing", .0.name())]
    MissingClaim(Claim),
    /// `CLAIM_TYPE_<NAME>`
    #[error("claim {} has the wrong type", .0.name())]
    ClaimType(Claim),
    /// `EXP_NOT_IAT_PLUS_300`
    #[error("exp is not iat + {LIFETIME_SECS}")]
    ExpNotIatPlus300,
    /// `EXPIRED`
    #[error("token has expired")]
    Expired,
    /// `IAT_IN_FUTURE`
    #[error("iat is in the future")]
    IatInFuture,
    /// `REASON_FOR_REQUEST`
    #[error("reason_for_request is not \"directcare\"")]
    ReasonForRequest,
    /// `SCOPE_NOT_ALLOWED`
    #[error("requested_scope is not allowed for this interaction")]
    ScopeNotAllowed,
    /// `SUB_NOT_PRACTITIONER_ID`
    #[error("sub is not requesting_practitioner.id")]
    SubNotPractitionerId,
    /// `INVALID_RESOURCE_<CLAIM>`
    #[error("claim {} is not a valid resource: {why}", .claim.name())]
    InvalidResource {
        claim: ResourceClaim,
        why: &'static str,
    },
}

impl JwtError {
    /// The upper snake case reason used in `INVALID_JWT_<REASON>` (see the module table).
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Missing => "MISSING",
            JwtError::NotBearer => "NOT_BEARER",
            JwtError::MultipleAuthorization => "MULTIPLE_AUTHORIZATION_HEADERS",
            JwtError::TooLarge => "TOO_LARGE",
            JwtError::Malformed(_) => "MALFORMED",
            JwtError::AlgNotNone => "ALG_NOT_NONE",
            JwtError::TypNotJwt => "TYP_NOT_JWT",
            JwtError::SignatureNotEmpty => "SIGNATURE_NOT_EMPTY",
            JwtError::MissingClaim(claim) => claim.missing_reason(),
            JwtError::ClaimType(claim) => claim.type_reason(),
            JwtError::ExpNotIatPlus300 => "EXP_NOT_IAT_PLUS_300",
            JwtError::Expired => "EXPIRED",
            JwtError::IatInFuture => "IAT_IN_FUTURE",
            JwtError::ReasonForRequest => "REASON_FOR_REQUEST",
            JwtError::ScopeNotAllowed => "SCOPE_NOT_ALLOWED",
            JwtError::SubNotPractitionerId => "SUB_NOT_PRACTITIONER_ID",
            JwtError::InvalidResource { claim, .. } => match claim {
                ResourceClaim::RequestingDevice => "INVALID_RESOURCE_REQUESTING_DEVICE",
                ResourceClaim::RequestingOrganization => "INVALID_RESOURCE_REQUESTING_ORGANIZATION",
                ResourceClaim::RequestingPractitioner => "INVALID_RESOURCE_REQUESTING_PRACTITIONER",
            },
        }
    }
}

/// A structurally valid token: the claims extracted from it and the verdict of the rules that
/// do not depend on the caller's scopes or clock. Lets a caller audit the claims and then judge
/// the token without decoding twice.
#[derive(Debug, Clone)]
pub struct DecodedJwt {
    /// Shared with the request's audit records.
    claims: std::sync::Arc<JwtClaims>,
    /// The first missing or mistyped required claim, else what the remaining rules need.
    rules: Result<Judged, JwtError>,
}

/// What [`DecodedJwt::validate`] needs once every required claim is present and typed.
#[derive(Debug, Clone)]
struct Judged {
    iat: i64,
    exp: i64,
    direct_care: bool,
    /// The verdict on `requesting_device`, `_organization`, `_practitioner` and `sub`.
    resources: Result<(), JwtError>,
}

impl DecodedJwt {
    /// The claims of audit value.
    pub fn claims(&self) -> &JwtClaims {
        &self.claims
    }

    /// The claims, shared (no copy).
    pub fn shared_claims(&self) -> std::sync::Arc<JwtClaims> {
        std::sync::Arc::clone(&self.claims)
    }

    /// Take the claims.
    pub fn into_claims(self) -> JwtClaims {
        std::sync::Arc::unwrap_or_clone(self.claims)
    }

    /// Judge the token against the GP Connect 1.2.7 rules (see [`check`]).
    pub fn validate(
        &self,
        allowed_scopes: &[String],
        now_unix: i64,
        skew_secs: i64,
    ) -> Result<(), JwtError> {
        let judged = self.rules.as_ref().map_err(Clone::clone)?;
        let skew = skew_secs.max(0);
        if judged.iat.checked_add(LIFETIME_SECS) != Some(judged.exp) {
            return Err(JwtError::ExpNotIatPlus300);
        }
        if now_unix > judged.exp.saturating_add(skew) {
            return Err(JwtError::Expired);
        }
        if judged.iat > now_unix.saturating_add(skew) {
            return Err(JwtError::IatInFuture);
        }
        if !judged.direct_care {
            return Err(JwtError::ReasonForRequest);
        }
        // Judged exists only when requested_scope is a non-empty string.
        let scope = self.claims.requested_scope.as_deref();
        if !allowed_scopes.iter().any(|s| Some(s.as_str()) == scope) {
            return Err(JwtError::ScopeNotAllowed);
        }
        judged.resources.clone()
    }
}

/// Decode the bearer token structurally: `Bearer` scheme (any case), three base64url parts
/// (padding tolerated), header `alg: none` (and `typ: JWT` if present), empty signature, a
/// JSON object payload, at most 16 KiB. No claim is required.
pub fn parse(authorization: Option<&HeaderValue>) -> Result<DecodedJwt, JwtError> {
    let value = authorization.ok_or(JwtError::Missing)?;
    let token = bearer_token(value.as_bytes())?;

    // Exactly two dots (memchr: a vectorised scan, not a closure per byte of a 1.8 KB token).
    let mut dots = memchr::memchr_iter(b'.', token);
    let (Some(first), Some(second), None) = (dots.next(), dots.next(), dots.next()) else {
        return Err(JwtError::Malformed("not three dot-separated parts"));
    };
    let (header, payload, signature) = (
        &token[..first],
        &token[first + 1..second],
        &token[second + 1..],
    );

    // One buffer for both decoded parts, sized so that neither decode reallocates.
    let mut json = Vec::with_capacity(header.len().max(payload.len()).div_ceil(4) * 3);
    BASE64URL
        .decode_vec(header, &mut json)
        .map_err(|_| JwtError::Malformed("header is not base64url"))?;
    let header = json_object::<Header>(&json, "header is not a JSON object")?;
    if header.alg.get().map(AsRef::as_ref) != Some("none") {
        return Err(JwtError::AlgNotNone);
    }
    match &header.typ {
        Slot::Absent => {}
        Slot::Is(typ) if typ.eq_ignore_ascii_case("JWT") => {}
        _ => return Err(JwtError::TypNotJwt),
    }
    if !signature.is_empty() {
        return Err(JwtError::SignatureNotEmpty);
    }
    json.clear();
    BASE64URL
        .decode_vec(payload, &mut json)
        .map_err(|_| JwtError::Malformed("payload is not base64url"))?;
    let payload = json_object::<Payload>(&json, "payload is not a JSON object")?;
    let rules = judge(&payload);
    Ok(DecodedJwt {
        claims: std::sync::Arc::new(payload.claims()),
        rules,
    })
}

/// Decode the token and return its claims without judging them (policy `log`).
pub fn decode(authorization: Option<&HeaderValue>) -> Result<JwtClaims, JwtError> {
    parse(authorization).map(DecodedJwt::into_claims)
}

/// Decode the token and apply the GP Connect 1.2.7 rules (policy `enforce`): `iss`, `sub`,
/// `aud` strings (`aud` may be any value: consumers send legacy ones); `iat`, `exp` integers
/// with `exp == iat + 300`; `now <= exp + skew`; `iat <= now + skew`; `reason_for_request`
/// `directcare`; `requested_scope` in `allowed_scopes`; `requesting_device` a Device with a
/// non-empty `identifier`; `requesting_organization` an Organization with an ODS code
/// identifier; `requesting_practitioner` a Practitioner whose `id` equals `sub`, with SDS user
/// id and SDS role profile id identifiers (value may be `UNK`) and a `name`.
pub fn check(
    authorization: Option<&HeaderValue>,
    allowed_scopes: &[String],
    now_unix: i64,
    skew_secs: i64,
) -> Result<JwtClaims, JwtError> {
    let decoded = parse(authorization)?;
    decoded.validate(allowed_scopes, now_unix, skew_secs)?;
    Ok(decoded.into_claims())
}

/// `base64url(header).base64url(payload).` with header `{"alg":"none","typ":"JWT"}`.
pub fn encode_unsigned(claims_json: &Value) -> String {
    let payload = claims_json.to_string();
    let mut token = String::with_capacity(40 + payload.len() * 4 / 3);
    URL_SAFE_NO_PAD.encode_string(HEADER_JSON, &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut token);
    token.push('.');
    token
}

/// The development consumer's system (`iss`).
pub const DEV_ISSUER: &str = "https://consumer.dev.local/";
/// The development consumer's ODS code.
pub const DEV_ODS: &str = "A20047";
/// The development practitioner's SDS user id.
pub const DEV_USER_ID: &str = "G13579135";
/// The development practitioner's SDS role profile id.
pub const DEV_ROLE_PROFILE: &str = "200000000359";

/// Who a token built by [`claims`] says is asking: the consumer organisation, its system (and
/// the device it names) and the practitioner.
#[derive(Debug, Clone, Copy)]
pub struct Requester<'a> {
    /// `iss`: the consumer system's URL; its device and user-guid identifiers are in its
    /// namespace (`{iss}/Id/device`).
    pub issuer: &'a str,
    /// `requesting_organization`'s ODS code and name.
    pub ods: &'a str,
    pub organization_name: &'a str,
    /// `requesting_device`'s identifier value and model.
    pub device: &'a str,
    pub device_model: &'a str,
    /// The practitioner's SDS user id and role profile id.
    pub user_id: &'a str,
    pub role_profile: &'a str,
}

/// The development world's full-access consumer (ODS A20047), as `dev-jwt` names it.
pub const DEV_REQUESTER: Requester<'static> = Requester {
    issuer: DEV_ISSUER,
    ods: DEV_ODS,
    organization_name: "Development consumer practice",
    device: "ssp-gateway-dev-jwt",
    device_model: "ssp-gateway dev-jwt",
    user_id: DEV_USER_ID,
    role_profile: DEV_ROLE_PROFILE,
};

/// A valid claim set for `requester`, modelled on the recorded GP Connect 1.2.7 booking token:
/// issued `now_unix`, expiring 300 s later.
pub fn claims(requester: &Requester, scope: &str, now_unix: i64, audience: &str) -> Value {
    let namespace = requester.issuer.trim_end_matches('/');
    json!({
        "iss": requester.issuer,
        "sub": "1",
        "aud": audience,
        "exp": now_unix.saturating_add(LIFETIME_SECS),
        "iat": now_unix,
        "reason_for_request": DIRECT_CARE,
        "requesting_device": {
            "resourceType": "Device",
            "identifier": [{
                "system": format!("{namespace}/Id/device"),
                "value": requester.device
            }],
            "model": requester.device_model,
            "version": env!("CARGO_PKG_VERSION")
        },
        "requesting_organization": {
            "resourceType": "Organization",
            "identifier": [{ "system": ODS_SYSTEM, "value": requester.ods }],
            "name": requester.organization_name
        },
        "requesting_practitioner": {
            "resourceType": "Practitioner",
            "id": "1",
            "identifier": [
                { "system": SDS_USER_ID_SYSTEM, "value": requester.user_id },
                { "system": SDS_ROLE_PROFILE_SYSTEM, "value": requester.role_profile },
                {
                    "system": format!("{namespace}/Id/user-guid"),
                    "value": "98ed4f78-814d-4266-8d5b-cde742f3093c"
                }
            ],
            "name": [{ "family": "Practitioner", "given": ["Development"], "prefix": ["Dr"] }]
        },
        "requested_scope": scope
    })
}

/// A valid claim set for the development world's full-access consumer ([`DEV_REQUESTER`]):
/// issued `now_unix`, expiring 300 s later.
pub fn dev_claims(scope: &str, now_unix: i64, audience: &str) -> Value {
    claims(&DEV_REQUESTER, scope, now_unix, audience)
}

/// The token after `Bearer` and spaces; the length limit applies to the token itself.
fn bearer_token(value: &[u8]) -> Result<&[u8], JwtError> {
    let value = trim_ows(value);
    let (scheme, token) = match value.iter().position(|&b| b == b' ') {
        Some(space) => (&value[..space], trim_ows(&value[space + 1..])),
        None => (value, &value[value.len()..]),
    };
    if !scheme.eq_ignore_ascii_case(b"Bearer") {
        return Err(JwtError::NotBearer);
    }
    if token.is_empty() {
        return Err(JwtError::Malformed("empty bearer token"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLarge);
    }
    Ok(token)
}

// Decoding. The header and payload are read straight into the typed views below by a strict
// JSON reader (`ssp::json`), borrowing strings from the decoded bytes (escaped strings are
// copied). Every member is read the way a `serde_json::Value` would have been, except that a
// member the gateway reads (`member`) may appear only once in its object: RFC 7515 §5.2 and
// RFC 7519 §4 let a parser either reject duplicate names or keep the last, and the provider,
// which reads the same token after the gateway, may keep the first (cJSON, some streaming
// readers), so a token whose checked claims two readers could see differently is refused. A
// member the gateway does not use is still read in full (`skip_value`), so malformed or too
// deeply nested JSON anywhere in a part makes the part malformed. A member of the wrong JSON
// type is recorded as such (`Slot::Wrong`), never a parse error, so `decode` stays lenient and
// `check` can name the claim.

/// `Invalid::what` for a member the gateway reads that appears twice in its object.
const DUPLICATE_MEMBER: &str = "a member the gateway reads appears twice";

/// Parse one decoded part, which must be a single JSON object: `not_object` names the part
/// when it is not one; a part with a duplicate member the gateway reads is malformed too, and
/// said so.
fn json_object<'a, T: Shape<'a>>(json: &'a [u8], not_object: &'static str) -> Result<T, JwtError> {
    let mut slot = Slot::Absent;
    match Reader::whole(json, |reader| read_into(reader, &mut slot)) {
        Ok(()) => slot.into_is().ok_or(JwtError::Malformed(not_object)),
        Err(Invalid {
            what: DUPLICATE_MEMBER,
            ..
        }) => Err(JwtError::Malformed(DUPLICATE_MEMBER)),
        Err(_) => Err(JwtError::Malformed(not_object)),
    }
}

/// One JSON member as the rules see it.
#[derive(Debug, Default)]
enum Slot<T> {
    /// Not present.
    #[default]
    Absent,
    /// `null`.
    Null,
    /// Present with the expected shape.
    Is(T),
    /// Present with another JSON type.
    Wrong,
}

impl<T> Slot<T> {
    fn get(&self) -> Option<&T> {
        match self {
            Slot::Is(value) => Some(value),
            _ => None,
        }
    }

    fn shaped(value: Option<T>) -> Self {
        value.map_or(Slot::Wrong, Slot::Is)
    }

    fn into_is(self) -> Option<T> {
        match self {
            Slot::Is(value) => Some(value),
            _ => None,
        }
    }

    /// Makes the slot hold `value` and returns it to be filled in place (the views are large:
    /// moving a `Payload` is 1.1 KB).
    fn set(&mut self, value: T) -> &mut T {
        *self = Slot::Is(value);
        match self {
            Slot::Is(value) => value,
            _ => unreachable!("just set"),
        }
    }
}

type Text<'a> = Cow<'a, str>;

impl Slot<Text<'_>> {
    /// The string, if it is one (possibly empty).
    fn str(&self) -> Option<&str> {
        self.get().map(AsRef::as_ref)
    }

    fn string(&self) -> Option<String> {
        self.str().map(str::to_owned)
    }
}

/// A JSON shape a member can be read as. A JSON value of any other type is read in full and
/// becomes `Slot::Wrong`.
trait Shape<'a>: Sized {
    fn from_str(_text: Text<'a>) -> Option<Self> {
        None
    }

    fn from_i64(_number: i64) -> Option<Self> {
        None
    }

    /// An array, from just after its `[`, read to its end into `slot`.
    fn read_array(reader: &mut Reader<'a>, slot: &mut Slot<Self>) -> Result<(), Invalid> {
        *slot = Slot::Wrong;
        reader.skip_rest(&Token::Array)
    }

    /// An object, from just after its `{`, read to its end into `slot`.
    fn read_object(reader: &mut Reader<'a>, slot: &mut Slot<Self>) -> Result<(), Invalid> {
        *slot = Slot::Wrong;
        reader.skip_rest(&Token::Object)
    }
}

/// Reads the next value into `slot`: the value if it has `T`'s shape, else what it is.
fn read_into<'a, T: Shape<'a>>(reader: &mut Reader<'a>, slot: &mut Slot<T>) -> Result<(), Invalid> {
    match reader.value()? {
        Token::Null => *slot = Slot::Null,
        Token::Bool(_) | Token::Number(_) => *slot = Slot::Wrong,
        Token::Int(number) => *slot = Slot::shaped(T::from_i64(number)),
        Token::Str(text) => *slot = Slot::shaped(T::from_str(text)),
        Token::Array => T::read_array(reader, slot)?,
        Token::Object => T::read_object(reader, slot)?,
    }
    Ok(())
}

/// Reads the value of an object's member into its `slot`, which must not have been filled by
/// an earlier member of the same name ([`DUPLICATE_MEMBER`]).
fn member<'a, T: Shape<'a>>(reader: &mut Reader<'a>, slot: &mut Slot<T>) -> Result<(), Invalid> {
    match slot {
        Slot::Absent => read_into(reader, slot),
        _ => Err(reader.invalid(DUPLICATE_MEMBER)),
    }
}

/// Reads the next value as a `T` if it has that shape.
fn read<'a, T: Shape<'a>>(reader: &mut Reader<'a>) -> Result<Slot<T>, Invalid> {
    let mut slot = Slot::Absent;
    read_into(reader, &mut slot)?;
    Ok(slot)
}

/// Calls `member` with each member name of the object the reader is in, to read its value.
fn members<'a>(
    reader: &mut Reader<'a>,
    mut member: impl FnMut(&mut Reader<'a>, &str) -> Result<(), Invalid>,
) -> Result<(), Invalid> {
    let mut first = true;
    while let Some(name) = reader.next_member(&mut first)? {
        member(reader, &name)?;
    }
    Ok(())
}

impl<'a> Shape<'a> for Text<'a> {
    fn from_str(text: Text<'a>) -> Option<Self> {
        Some(text)
    }
}

impl Shape<'_> for i64 {
    fn from_i64(number: i64) -> Option<Self> {
        Some(number)
    }
}

/// The JOSE header members the gateway judges.
#[derive(Default)]
struct Header<'a> {
    alg: Slot<Text<'a>>,
    typ: Slot<Text<'a>>,
}

impl<'a> Shape<'a> for Header<'a> {
    fn read_object(reader: &mut Reader<'a>, slot: &mut Slot<Self>) -> Result<(), Invalid> {
        let header = slot.set(Header::default());
        members(reader, |reader, name| {
            match name {
                "alg" => member(reader, &mut header.alg)?,
                "typ" => member(reader, &mut header.typ)?,
                _ => reader.skip_value()?,
            }
            Ok(())
        })
    }
}

/// The payload members the gateway judges or audits.
#[derive(Default)]
struct Payload<'a> {
    iss: Slot<Text<'a>>,
    sub: Slot<Text<'a>>,
    aud: Slot<Text<'a>>,
    iat: Slot<i64>,
    exp: Slot<i64>,
    reason_for_request: Slot<Text<'a>>,
    requested_scope: Slot<Text<'a>>,
    requesting_device: Slot<Resource<'a>>,
    requesting_organization: Slot<Resource<'a>>,
    requesting_practitioner: Slot<Resource<'a>>,
}

impl<'a> Shape<'a> for Payload<'a> {
    fn read_object(reader: &mut Reader<'a>, slot: &mut Slot<Self>) -> Result<(), Invalid> {
        let p = slot.set(Payload::default());
        members(reader, |reader, name| {
            match name {
                "iss" => member(reader, &mut p.iss)?,
                "sub" => member(reader, &mut p.sub)?,
                "aud" => member(reader, &mut p.aud)?,
                "iat" => member(reader, &mut p.iat)?,
                "exp" => member(reader, &mut p.exp)?,
                "reason_for_request" => member(reader, &mut p.reason_for_request)?,
                "requested_scope" => member(reader, &mut p.requested_scope)?,
                "requesting_device" => member(reader, &mut p.requesting_device)?,
                "requesting_organization" => member(reader, &mut p.requesting_organization)?,
                "requesting_practitioner" => member(reader, &mut p.requesting_practitioner)?,
                _ => reader.skip_value()?,
            }
            Ok(())
        })
    }
}

impl Payload<'_> {
    /// Lenient extraction: take each claim of audit value when it has the expected shape.
    fn claims(&self) -> JwtClaims {
        let organization = self.requesting_organization.get();
        let practitioner = self.requesting_practitioner.get();
        let device = self.requesting_device.get();
        let owned = |value: &Option<Text>| value.as_deref().map(str::to_owned);
        JwtClaims {
            iss: self.iss.string(),
            sub: self.sub.string(),
            aud: self.aud.string(),
            iat: self.iat.get().copied(),
            exp: self.exp.get().copied(),
            reason_for_request: self.reason_for_request.string(),
            requested_scope: self.requested_scope.string(),
            organization_ods_code: organization
                .and_then(Resource::identifiers)
                .and_then(|i| owned(&i.ods)),
            organization_name: organization.and_then(|o| match o.name.get() {
                Some(Name::Text(name)) => Some(name.as_ref().to_owned()),
                _ => None,
            }),
            practitioner_id: practitioner.and_then(|p| p.id.string()),
            sds_user_id: practitioner
                .and_then(Resource::identifiers)
                .and_then(|i| owned(&i.sds_user_id)),
            sds_role_profile_id: practitioner
                .and_then(Resource::identifiers)
                .and_then(|i| owned(&i.sds_role_profile_id)),
            practitioner_name: practitioner
                .and_then(|p| p.name.get())
                .and_then(display_name),
            device_identifier: device
                .and_then(Resource::identifiers)
                .and_then(Identifiers::device_identifier),
            device_model: device.and_then(|d| d.model.string()),
            device_version: device.and_then(|d| d.version.string()),
            json: RenderedJson::default(),
        }
    }
}

/// A minimal FHIR resource claim: the members of Device, Organization and Practitioner the
/// gateway reads.
#[derive(Default)]
struct Resource<'a> {
    resource_type: Slot<Text<'a>>,
    id: Slot<Text<'a>>,
    identifier: Slot<Identifiers<'a>>,
    name: Slot<Name<'a>>,
    model: Slot<Text<'a>>,
    version: Slot<Text<'a>>,
}

impl<'a> Shape<'a> for Resource<'a> {
    fn read_object(reader: &mut Reader<'a>, slot: &mut Slot<Self>) -> Result<(), Invalid> {
        let r = slot.set(Resource::default());
        members(reader, |reader, name| {
            match name {
                "resourceType" => member(reader, &mut r.resource_type)?,
                "id" => member(reader, &mut r.id)?,
                "identifier" => member(reader, &mut r.identifier)?,
                "name" => member(reader, &mut r.name)?,
                "model" => member(reader, &mut r.model)?,
                "version" => member(reader, &mut r.version)?,
                _ => reader.skip_value()?,
            }
            Ok(())
        })
    }
}

impl<'a> Resource<'a> {
    fn identifiers(&self) -> Option<&Identifiers<'a>> {
        self.identifier.get()
    }

    fn is_a(&self, resource_type: &str) -> bool {
        self.resource_type.str() == Some(resource_type)
    }
}

/// An `identifier` array, summarised as it is read.
struct Identifiers<'a> {
    len: usize,
    all_objects: bool,
    /// `system` and `value` of the first element, when it is an object.
    first: Option<(Slot<Text<'a>>, Slot<Text<'a>>)>,
    /// For each known system, the `value` of the first element with that `system`, when that
    /// value is a non-empty string (a later element with the same system is not consulted).
    ods: Option<Text<'a>>,
    sds_user_id: Option<Text<'a>>,
    sds_role_profile_id: Option<Text<'a>>,
}

/// The members of one identifier.
#[derive(Default)]
struct Identifier<'a> {
    system: Slot<Text<'a>>,
    value: Slot<Text<'a>>,
}

impl<'a> Shape<'a> for Identifier<'a> {
    fn read_object(reader: &mut Reader<'a>, slot: &mut Slot<Self>) -> Result<(), Invalid> {
        let identifier = slot.set(Identifier::default());
        members(reader, |reader, name| {
            match name {
                "system" => member(reader, &mut identifier.system)?,
                "value" => member(reader, &mut identifier.value)?,
                _ => reader.skip_value()?,
            }
            Ok(())
        })
    }
}

impl<'a> Shape<'a> for Identifiers<'a> {
    fn read_array(reader: &mut Reader<'a>, slot: &mut Slot<Self>) -> Result<(), Invalid> {
        let mut ids = Identifiers {
            len: 0,
            all_objects: true,
            first: None,
            ods: None,
            sds_user_id: None,
            sds_role_profile_id: None,
        };
        // Whether an element with each known system has been seen (the first one decides).
        let (mut ods, mut user, mut role) = (false, false, false);
        let mut first = true;
        while reader.next_element(&mut first)? {
            let element: Slot<Identifier<'a>> = read(reader)?;
            ids.len += 1;
            let Slot::Is(identifier) = element else {
                ids.all_objects = false;
                continue;
            };
            let known = match identifier.system.str() {
                Some(ODS_SYSTEM) => Some((&mut ods, &mut ids.ods)),
                Some(SDS_USER_ID_SYSTEM) => Some((&mut user, &mut ids.sds_user_id)),
                Some(SDS_ROLE_PROFILE_SYSTEM) => Some((&mut role, &mut ids.sds_role_profile_id)),
                _ => None,
            };
            if let Some((seen, value)) = known {
                if !*seen {
                    *seen = true;
                    *value = identifier.value.get().filter(|v| !v.is_empty()).cloned();
                }
            }
            if ids.len == 1 {
                ids.first = Some((identifier.system, identifier.value));
            }
        }
        *slot = Slot::Is(ids);
        Ok(())
    }
}

impl Identifiers<'_> {
    /// `system|value` of the first identifier.
    fn device_identifier(&self) -> Option<String> {
        let (system, value) = self.first.as_ref()?;
        let system = system.str().unwrap_or("");
        let value = value.str().unwrap_or("");
        (!system.is_empty() || !value.is_empty()).then(|| format!("{system}|{value}"))
    }
}

/// A resource's `name`: an organisation's string, or a practitioner's HumanName list or lone
/// HumanName.
enum Name<'a> {
    Text(Text<'a>),
    /// An empty array.
    Empty,
    /// A non-empty array: its first element.
    List(Slot<HumanName<'a>>),
    Human(HumanName<'a>),
}

impl<'a> Shape<'a> for Name<'a> {
    fn from_str(text: Text<'a>) -> Option<Self> {
        Some(Name::Text(text))
    }

    fn read_array(reader: &mut Reader<'a>, slot: &mut Slot<Self>) -> Result<(), Invalid> {
        let mut first = true;
        if !reader.next_element(&mut first)? {
            *slot = Slot::Is(Name::Empty);
            return Ok(());
        }
        let mut human = Slot::Absent;
        read_into(reader, &mut human)?;
        while reader.next_element(&mut first)? {
            reader.skip_value()?;
        }
        *slot = Slot::Is(Name::List(human));
        Ok(())
    }

    fn read_object(reader: &mut Reader<'a>, slot: &mut Slot<Self>) -> Result<(), Invalid> {
        let mut human = HumanName::default();
        members(reader, |reader, name| human.member(reader, name))?;
        *slot = Slot::Is(Name::Human(human));
        Ok(())
    }
}

impl<'a> Name<'a> {
    /// The first HumanName (of an array, or a lone object, as DSTU2-era tokens send it).
    fn human(&self) -> Option<&HumanName<'a>> {
        match self {
            Name::List(first) => first.get(),
            Name::Human(human) => Some(human),
            Name::Text(_) | Name::Empty => None,
        }
    }

    /// A string that is not empty once trimmed (an Organization's `name`).
    fn text(&self) -> Option<&str> {
        match self {
            Name::Text(text) => Some(text.as_ref()).filter(|t| !t.trim().is_empty()),
            _ => None,
        }
    }
}

/// The members of a HumanName used for its display string.
#[derive(Default)]
struct HumanName<'a> {
    /// The `given` words, already joined.
    given: Slot<Words>,
    /// The `family` name: a string (STU3), or the strings of an array (DSTU2), joined.
    family: Slot<Words>,
    text: Slot<Text<'a>>,
}

impl HumanName<'_> {
    /// Both a family and a given name, as GP Connect 1.2.7 requires of the requesting
    /// practitioner ("`family` containing the user's family name, `given` containing the
    /// user's given name").
    fn has_family_and_given(&self) -> bool {
        let words = |slot: &Slot<Words>| slot.get().is_some_and(|w| !w.0.is_empty());
        words(&self.family) && words(&self.given)
    }
}

impl<'a> HumanName<'a> {
    fn member(&mut self, reader: &mut Reader<'a>, name: &str) -> Result<(), Invalid> {
        match name {
            "given" => member(reader, &mut self.given),
            "family" => member(reader, &mut self.family),
            "text" => member(reader, &mut self.text),
            _ => reader.skip_value(),
        }
    }
}

impl<'a> Shape<'a> for HumanName<'a> {
    fn read_object(reader: &mut Reader<'a>, slot: &mut Slot<Self>) -> Result<(), Invalid> {
        let human = slot.set(HumanName::default());
        members(reader, |reader, name| human.member(reader, name))
    }
}

/// `given` as display words: a string, or the strings of an array (other elements ignored).
struct Words(String);

impl<'a> Shape<'a> for Words {
    fn from_str(text: Text<'a>) -> Option<Self> {
        let mut words = String::new();
        push_word(&mut words, &text);
        Some(Words(words))
    }

    fn read_array(reader: &mut Reader<'a>, slot: &mut Slot<Self>) -> Result<(), Invalid> {
        let mut words = String::new();
        let mut first = true;
        while reader.next_element(&mut first)? {
            let element: Slot<Text<'a>> = read(reader)?;
            if let Some(word) = element.str() {
                push_word(&mut words, word);
            }
        }
        *slot = Slot::Is(Words(words));
        Ok(())
    }
}

/// `given… family` of the first HumanName (an array, or a lone object), else its `text`.
fn display_name(name: &Name) -> Option<String> {
    let human = name.human()?;
    let mut out = human.given.get().map(|w| w.0.clone()).unwrap_or_default();
    if let Some(family) = human.family.get() {
        push_word(&mut out, &family.0);
    }
    if out.is_empty() {
        if let Some(text) = human.text.str() {
            push_word(&mut out, text);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Append a trimmed, non-empty word, space-separated.
fn push_word(out: &mut String, word: &str) {
    let word = word.trim();
    if !word.is_empty() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
}

// Judging: the 1.2.7 rules that need neither the caller's scopes nor its clock.

/// The required claims in order, then the resource rules.
fn judge(p: &Payload) -> Result<Judged, JwtError> {
    let _iss = required_str(&p.iss, Claim::Iss)?;
    let sub = required_str(&p.sub, Claim::Sub)?;
    let _aud = required_str(&p.aud, Claim::Aud)?;
    let iat = *required(&p.iat, Claim::Iat)?;
    let exp = *required(&p.exp, Claim::Exp)?;
    let reason = required_str(&p.reason_for_request, Claim::ReasonForRequest)?;
    let _scope = required_str(&p.requested_scope, Claim::RequestedScope)?;
    let device = required(&p.requesting_device, Claim::RequestingDevice)?;
    let organization = required(&p.requesting_organization, Claim::RequestingOrganization)?;
    let practitioner = required(&p.requesting_practitioner, Claim::RequestingPractitioner)?;
    let resources = check_device(device)
        .and_then(|()| check_organization(organization))
        .and_then(|()| check_practitioner(practitioner, sub));
    Ok(Judged {
        iat,
        exp,
        direct_care: reason == DIRECT_CARE,
        resources,
    })
}

/// Present and not `null`, of the expected type.
fn required<T>(slot: &Slot<T>, claim: Claim) -> Result<&T, JwtError> {
    match slot {
        Slot::Absent | Slot::Null => Err(JwtError::MissingClaim(claim)),
        Slot::Wrong => Err(JwtError::ClaimType(claim)),
        Slot::Is(value) => Ok(value),
    }
}

/// A required string; empty counts as missing.
fn required_str<'s>(slot: &'s Slot<Text<'_>>, claim: Claim) -> Result<&'s str, JwtError> {
    match required(slot, claim)?.as_ref() {
        "" => Err(JwtError::MissingClaim(claim)),
        text => Ok(text),
    }
}

fn check_device(device: &Resource) -> Result<(), JwtError> {
    let invalid = |why| JwtError::InvalidResource {
        claim: ResourceClaim::RequestingDevice,
        why,
    };
    if !device.is_a("Device") {
        return Err(invalid("resourceType is not Device"));
    }
    match device.identifier.get() {
        Some(ids) if ids.len > 0 && ids.all_objects => {}
        _ => {
            return Err(invalid(
                "identifier is not a non-empty array of identifiers",
            ))
        }
    }
    // 1.2.7: "The consumer SHALL populate ... `model` with the consumer product or system
    // name, `version` with the version number of the consumer product or system".
    if !device.model.str().is_some_and(|m| !m.trim().is_empty()) {
        return Err(invalid("no model (the consumer product's name)"));
    }
    if !device.version.str().is_some_and(|v| !v.trim().is_empty()) {
        return Err(invalid("no version (the consumer product's version)"));
    }
    Ok(())
}

fn check_organization(organization: &Resource) -> Result<(), JwtError> {
    let invalid = |why| JwtError::InvalidResource {
        claim: ResourceClaim::RequestingOrganization,
        why,
    };
    if !organization.is_a("Organization") {
        return Err(invalid("resourceType is not Organization"));
    }
    match organization.identifier.get() {
        Some(Identifiers { ods: Some(_), .. }) => {}
        _ => return Err(invalid("no ODS organisation code identifier")),
    }
    // 1.2.7: "The consumer SHALL populate ... `name` with the name of the organisation".
    if organization.name.get().and_then(Name::text).is_none() {
        return Err(invalid("no name"));
    }
    Ok(())
}

fn check_practitioner(practitioner: &Resource, sub: &str) -> Result<(), JwtError> {
    let invalid = |why| JwtError::InvalidResource {
        claim: ResourceClaim::RequestingPractitioner,
        why,
    };
    if !practitioner.is_a("Practitioner") {
        return Err(invalid("resourceType is not Practitioner"));
    }
    let ids = practitioner.identifier.get();
    if ids.and_then(|i| i.sds_user_id.as_ref()).is_none() {
        return Err(invalid("no SDS user id identifier"));
    }
    if ids.and_then(|i| i.sds_role_profile_id.as_ref()).is_none() {
        return Err(invalid("no SDS role profile id identifier"));
    }
    match practitioner.name.get().and_then(Name::human) {
        None => return Err(invalid("no name")),
        Some(human) if !human.has_family_and_given() => {
            return Err(invalid("name has no family or no given name"))
        }
        Some(_) => {}
    }
    if practitioner.id.str() != Some(sub) {
        return Err(JwtError::SubNotPractitionerId);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_747_730_256;
    const AUD: &str = "https://localhost:9443/B82617/STU3/1/gpconnect";

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn bearer(token: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header value")
    }

    fn token_for(claims: &Value) -> HeaderValue {
        bearer(&encode_unsigned(claims))
    }

    fn check_claims(claims: &Value) -> Result<JwtClaims, JwtError> {
        check(
            Some(&token_for(claims)),
            &scopes(&["patient/*.read", "patient/*.write"]),
            NOW,
            0,
        )
    }

    fn valid() -> Value {
        dev_claims("patient/*.read", NOW, AUD)
    }

    fn with(mutate: impl FnOnce(&mut Map<String, Value>)) -> Value {
        let mut claims = valid();
        mutate(claims.as_object_mut().expect("object"));
        claims
    }

    fn reason_of(claims: &Value) -> &'static str {
        check_claims(claims).expect_err("rejected").reason()
    }

    /// The payload of `appointment-create-jwt.demonstrator-1.2.7-recorded.json` (Apache-2.0).
    const RECORDED: &str = r#"{"iss":"https://ConsumerSystemURL","sub":"1","aud":"https://authorize.fhir.nhs.net/token","exp":1747730556,"iat":1747730256,"reason_for_request":"directcare","requesting_device":{"resourceType":"Device","identifier":[{"system":"GPConnectTestSystem","value":"Client"}],"model":"v1","version":"1.1"},"requesting_organization":{"resourceType":"Organization","identifier":[{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"GPCA0001"}],"name":"GP Connect Assurance"},"requesting_practitioner":{"resourceType":"Practitioner","id":"1","identifier":[{"system":"https://fhir.nhs.uk/Id/sds-user-id","value":"GCASDS0001"},{"system":"https://fhir.nhs.uk/Id/sds-role-profile-id","value":"112233445566"},{"system":"https://consumersupplier.com/Id/user-guid","value":"98ed4f78-814d-4266-8d5b-cde742f3093c"}],"name":[{"family":"AssurancePractitioner","given":["AssuranceTest"],"prefix":["Mr"]}]},"requested_scope":"patient/*.write"}"#;

    #[test]
    fn the_recorded_demonstrator_token_is_accepted_with_its_legacy_aud() {
        let payload: Value = serde_json::from_str(RECORDED).expect("json");
        let claims = check(
            Some(&token_for(&payload)),
            &scopes(&["patient/*.write"]),
            NOW + 10,
            0,
        )
        .expect("valid");
        assert_eq!(
            claims,
            JwtClaims {
                iss: Some("https://ConsumerSystemURL".into()),
                sub: Some("1".into()),
                aud: Some("https://authorize.fhir.nhs.net/token".into()),
                iat: Some(1747730256),
                exp: Some(1747730556),
                reason_for_request: Some("directcare".into()),
                requested_scope: Some("patient/*.write".into()),
                organization_ods_code: Some("GPCA0001".into()),
                organization_name: Some("GP Connect Assurance".into()),
                practitioner_id: Some("1".into()),
                sds_user_id: Some("GCASDS0001".into()),
                sds_role_profile_id: Some("112233445566".into()),
                practitioner_name: Some("AssuranceTest AssurancePractitioner".into()),
                device_identifier: Some("GPConnectTestSystem|Client".into()),
                device_model: Some("v1".into()),
                device_version: Some("1.1".into()),
                ..JwtClaims::default()
            }
        );
        let audit = serde_json::to_value(&claims).expect("serialise");
        assert_eq!(audit["organization_ods_code"], "GPCA0001");
    }

    #[test]
    fn encode_unsigned_has_the_gp_connect_shape() {
        let token = encode_unsigned(&json!({"a": 1}));
        assert!(token.starts_with("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0."));
        assert!(token.ends_with('.'));
        assert_eq!(token.matches('.').count(), 2);
        assert!(!token.contains('='));
        let payload = token.split('.').nth(1).expect("payload");
        assert_eq!(
            URL_SAFE_NO_PAD.decode(payload).expect("b64"),
            br#"{"a":1}"#.to_vec()
        );
    }

    #[test]
    fn dev_claims_pass_check_and_are_the_a20047_consumer() {
        let claims = check_claims(&valid()).expect("valid");
        assert_eq!(claims.organization_ods_code.as_deref(), Some("A20047"));
        assert_eq!(claims.aud.as_deref(), Some(AUD));
        assert_eq!(claims.exp, Some(NOW + 300));
        assert_eq!(
            claims.practitioner_name.as_deref(),
            Some("Development Practitioner")
        );
    }

    #[test]
    fn claims_name_the_requester_and_its_namespace() {
        let c = dev_claims("patient/*.read", NOW, AUD);
        assert_eq!(c["iss"], "https://consumer.dev.local/");
        let device = &c["requesting_device"];
        assert_eq!(
            device["identifier"][0]["system"],
            "https://consumer.dev.local/Id/device"
        );
        assert_eq!(device["identifier"][0]["value"], "ssp-gateway-dev-jwt");
        assert_eq!(device["model"], "ssp-gateway dev-jwt");
        let org = &c["requesting_organization"];
        assert_eq!(org["name"], "Development consumer practice");
        let ids = &c["requesting_practitioner"]["identifier"];
        assert_eq!(ids[0]["value"], "G13579135");
        assert_eq!(ids[1]["value"], "200000000359");
        assert_eq!(ids[2]["system"], "https://consumer.dev.local/Id/user-guid");

        let other = Requester {
            issuer: "https://other.example/x/",
            ods: "Y1",
            organization_name: "Other",
            device: "d",
            device_model: "m",
            user_id: "U1",
            role_profile: "R1",
        };
        let c = claims(&other, "organization/*.read", NOW, AUD);
        assert_eq!(c["iss"], "https://other.example/x/");
        let device = &c["requesting_device"];
        assert_eq!(
            device["identifier"][0]["system"],
            "https://other.example/x/Id/device"
        );
        assert_eq!(
            (&device["identifier"][0]["value"], &device["model"]),
            (&"d".into(), &"m".into())
        );
        assert_eq!(c["requesting_organization"]["identifier"][0]["value"], "Y1");
        assert_eq!(c["requesting_organization"]["name"], "Other");
        let ids = &c["requesting_practitioner"]["identifier"];
        assert_eq!(
            (&ids[0]["value"], &ids[1]["value"]),
            (&"U1".into(), &"R1".into())
        );
        assert_eq!(c["requested_scope"], "organization/*.read");
    }

    #[test]
    fn structural_errors() {
        let good = encode_unsigned(&valid());
        let (h, rest) = good.split_once('.').expect("dot");
        let p = rest.trim_end_matches('.');
        let enc = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let cases: Vec<(Option<HeaderValue>, &str)> = vec![
            (None, "MISSING"),
            (
                Some(HeaderValue::from_static("Basic dXNlcjpwYXNz")),
                "NOT_BEARER",
            ),
            (Some(HeaderValue::from_static("Bearerx")), "NOT_BEARER"),
            (Some(HeaderValue::from_static("")), "NOT_BEARER"),
            (Some(HeaderValue::from_static("Bearer")), "MALFORMED"),
            (Some(HeaderValue::from_static("Bearer   ")), "MALFORMED"),
            (Some(bearer(&format!("{h}.{p}"))), "MALFORMED"),
            (Some(bearer(&format!("{h}.{p}.."))), "MALFORMED"),
            (Some(bearer(&format!("{h}!.{p}."))), "MALFORMED"),
            (Some(bearer(&format!("{h}.{p}*."))), "MALFORMED"),
            (Some(bearer(&format!("{}.{p}.", enc("[1]")))), "MALFORMED"),
            (Some(bearer(&format!("{}.{p}.", enc("{")))), "MALFORMED"),
            (Some(bearer(&format!("{h}.{}.", enc("[]")))), "MALFORMED"),
            (Some(bearer(&format!("{h}.{}.", enc("\"x\"")))), "MALFORMED"),
            (Some(bearer(&format!(".{p}."))), "MALFORMED"),
            (
                Some(bearer(&format!("{}.{p}.", enc(r#"{"alg":"HS256"}"#)))),
                "ALG_NOT_NONE",
            ),
            (
                Some(bearer(&format!("{}.{p}.", enc(r#"{"alg":"None"}"#)))),
                "ALG_NOT_NONE",
            ),
            (
                Some(bearer(&format!("{}.{p}.", enc(r#"{"typ":"JWT"}"#)))),
                "ALG_NOT_NONE",
            ),
            (
                Some(bearer(&format!(
                    "{}.{p}.",
                    enc(r#"{"alg":"none","typ":"JWS"}"#)
                ))),
                "TYP_NOT_JWT",
            ),
            (
                Some(bearer(&format!(
                    "{}.{p}.",
                    enc(r#"{"alg":"none","typ":1}"#)
                ))),
                "TYP_NOT_JWT",
            ),
            (
                Some(bearer(&format!("{h}.{p}.c2ln"))),
                "SIGNATURE_NOT_EMPTY",
            ),
            (
                Some(bearer(&format!("{h}.{}.", "A".repeat(MAX_TOKEN_LEN)))),
                "TOO_LARGE",
            ),
        ];
        for (header, reason) in cases {
            let err = decode(header.as_ref()).expect_err(reason);
            assert_eq!(err.reason(), reason, "{header:?}");
            let err =
                check(header.as_ref(), &scopes(&["patient/*.read"]), NOW, 0).expect_err(reason);
            assert_eq!(err.reason(), reason, "{header:?}");
        }
    }

    #[test]
    fn structural_leniency() {
        let good = encode_unsigned(&valid());
        let allowed = scopes(&["patient/*.read"]);
        for header in [
            format!("bearer {good}"),
            format!("BEARER {good}"),
            format!("Bearer   {good}  "),
        ] {
            let value = HeaderValue::from_str(&header).expect("value");
            assert!(check(Some(&value), &allowed, NOW, 0).is_ok(), "{header}");
        }
        // Padding is tolerated; typ is optional and case-insensitive.
        let padded_header = base64::engine::general_purpose::URL_SAFE.encode(r#"{"alg":"none"}"#);
        assert!(padded_header.ends_with('='));
        let payload = good.split('.').nth(1).expect("payload");
        let value = bearer(&format!("{padded_header}.{payload}."));
        assert!(check(Some(&value), &allowed, NOW, 0).is_ok());
        let lower = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"jwt"}"#);
        assert!(check(
            Some(&bearer(&format!("{lower}.{payload}."))),
            &allowed,
            NOW,
            0
        )
        .is_ok());
        // decode requires no claim at all.
        let empty = bearer(&encode_unsigned(&json!({})));
        assert_eq!(decode(Some(&empty)), Ok(JwtClaims::default()));
        // Exactly at the size limit is fine structurally.
        let pad = MAX_TOKEN_LEN - good.len();
        let mut big = valid();
        big["padding"] = Value::String("x".repeat(pad * 3 / 4 - 20));
        let token = encode_unsigned(&big);
        assert!(token.len() <= MAX_TOKEN_LEN, "{}", token.len());
        assert!(check(Some(&bearer(&token)), &allowed, NOW, 0).is_ok());
    }

    #[test]
    fn required_claims_missing_or_wrong_type() {
        let required = [
            ("iss", "ISS", json!(1)),
            ("sub", "SUB", json!(1)),
            ("aud", "AUD", json!(["a"])),
            ("iat", "IAT", json!("1747730256")),
            ("exp", "EXP", json!(1747730556.5)),
            ("reason_for_request", "REASON_FOR_REQUEST", json!(true)),
            (
                "requested_scope",
                "REQUESTED_SCOPE",
                json!(["patient/*.read"]),
            ),
            ("requesting_device", "REQUESTING_DEVICE", json!("Device")),
            (
                "requesting_organization",
                "REQUESTING_ORGANIZATION",
                json!([]),
            ),
            (
                "requesting_practitioner",
                "REQUESTING_PRACTITIONER",
                json!(1),
            ),
        ];
        for (claim, upper, wrong) in required {
            let removed = with(|m| {
                m.remove(claim);
            });
            assert_eq!(reason_of(&removed), format!("MISSING_CLAIM_{upper}"));
            let null = with(|m| {
                m.insert(claim.into(), Value::Null);
            });
            assert_eq!(reason_of(&null), format!("MISSING_CLAIM_{upper}"));
            let typed = with(|m| {
                m.insert(claim.into(), wrong);
            });
            assert_eq!(reason_of(&typed), format!("CLAIM_TYPE_{upper}"));
        }
        for claim in ["iss", "sub", "aud"] {
            let empty = with(|m| {
                m.insert(claim.into(), json!(""));
            });
            assert_eq!(
                reason_of(&empty),
                format!("MISSING_CLAIM_{}", claim.to_uppercase())
            );
        }
    }

    #[test]
    fn time_rules() {
        let allowed = scopes(&["patient/*.read"]);
        let run = |claims: &Value, now: i64, skew: i64| {
            check(Some(&token_for(claims)), &allowed, now, skew).map(|_| ())
        };
        let claims = valid();
        assert_eq!(run(&claims, NOW, 0), Ok(()));
        assert_eq!(run(&claims, NOW + 300, 0), Ok(()));
        assert_eq!(run(&claims, NOW + 301, 0), Err(JwtError::Expired));
        assert_eq!(run(&claims, NOW + 330, 30), Ok(()));
        assert_eq!(run(&claims, NOW + 331, 30), Err(JwtError::Expired));
        assert_eq!(run(&claims, NOW - 1, 0), Err(JwtError::IatInFuture));
        assert_eq!(run(&claims, NOW - 30, 30), Ok(()));
        assert_eq!(run(&claims, NOW - 31, 30), Err(JwtError::IatInFuture));
        // A negative skew counts as none.
        assert_eq!(run(&claims, NOW, -100), Ok(()));
        // Consumer clock slow by 600 s: expired.
        assert_eq!(
            run(&dev_claims("patient/*.read", NOW - 600, AUD), NOW, 60),
            Err(JwtError::Expired)
        );
        for exp in [NOW + 299, NOW + 301, NOW, NOW + 3600] {
            let claims = with(|m| {
                m.insert("exp".into(), json!(exp));
            });
            assert_eq!(reason_of(&claims), "EXP_NOT_IAT_PLUS_300");
        }
        // Extreme values neither overflow nor pass.
        let huge = with(|m| {
            m.insert("iat".into(), json!(i64::MAX));
            m.insert("exp".into(), json!(i64::MAX));
        });
        assert_eq!(reason_of(&huge), "EXP_NOT_IAT_PLUS_300");
        let far = dev_claims("patient/*.read", i64::MAX - 300, AUD);
        assert_eq!(run(&far, i64::MIN, i64::MAX), Err(JwtError::IatInFuture));
        assert_eq!(run(&valid(), i64::MAX, i64::MAX), Ok(()));
    }

    #[test]
    fn reason_and_scope() {
        let claims = with(|m| {
            m.insert("reason_for_request".into(), json!("secondaryuses"));
        });
        assert_eq!(reason_of(&claims), "REASON_FOR_REQUEST");
        let claims = with(|m| {
            m.insert("reason_for_request".into(), json!("DirectCare"));
        });
        assert_eq!(reason_of(&claims), "REASON_FOR_REQUEST");
        let claims = dev_claims("organization/*.read", NOW, AUD);
        assert_eq!(reason_of(&claims), "SCOPE_NOT_ALLOWED");
        assert_eq!(
            check(Some(&token_for(&valid())), &[], NOW, 0),
            Err(JwtError::ScopeNotAllowed)
        );
    }

    #[test]
    fn resource_claims() {
        let set = |pointer: &'static str, value: Value| {
            let mut claims = valid();
            *claims.pointer_mut(pointer).expect(pointer) = value;
            claims
        };
        let remove = |object: &'static str, key: &'static str| {
            let mut claims = valid();
            claims
                .pointer_mut(object)
                .and_then(Value::as_object_mut)
                .expect(object)
                .remove(key);
            claims
        };
        let device = "INVALID_RESOURCE_REQUESTING_DEVICE";
        let org = "INVALID_RESOURCE_REQUESTING_ORGANIZATION";
        let prac = "INVALID_RESOURCE_REQUESTING_PRACTITIONER";
        let cases = [
            (
                set("/requesting_device/resourceType", json!("Organization")),
                device,
            ),
            (remove("/requesting_device", "resourceType"), device),
            (set("/requesting_device/identifier", json!([])), device),
            (
                set("/requesting_device/identifier", json!({"system": "x"})),
                device,
            ),
            (set("/requesting_device/identifier", json!(["x"])), device),
            (remove("/requesting_device", "identifier"), device),
            // 1.2.7: model and version are required (the consumer product and its version).
            (remove("/requesting_device", "model"), device),
            (remove("/requesting_device", "version"), device),
            (set("/requesting_device/model", json!(" ")), device),
            (set("/requesting_device/version", json!(1.1)), device),
            (
                set("/requesting_organization/resourceType", json!("Device")),
                org,
            ),
            (
                set(
                    "/requesting_organization/identifier/0/system",
                    json!("https://x"),
                ),
                org,
            ),
            (
                set("/requesting_organization/identifier/0/value", json!("")),
                org,
            ),
            (
                set("/requesting_organization/identifier/0/value", json!(7)),
                org,
            ),
            (remove("/requesting_organization", "identifier"), org),
            // 1.2.7: the organisation's name is required.
            (remove("/requesting_organization", "name"), org),
            (set("/requesting_organization/name", json!("")), org),
            (set("/requesting_organization/name", json!(["Org"])), org),
            (
                set("/requesting_practitioner/resourceType", json!("Patient")),
                prac,
            ),
            (
                set(
                    "/requesting_practitioner/identifier/0/system",
                    json!("https://x"),
                ),
                prac,
            ),
            (
                set(
                    "/requesting_practitioner/identifier/1/system",
                    json!("https://x"),
                ),
                prac,
            ),
            (remove("/requesting_practitioner", "identifier"), prac),
            (remove("/requesting_practitioner", "name"), prac),
            (set("/requesting_practitioner/name", json!([])), prac),
            (set("/requesting_practitioner/name", json!("Dr Who")), prac),
            // 1.2.7: a family and a given name.
            (set("/requesting_practitioner/name", json!([{}])), prac),
            (
                set("/requesting_practitioner/name", json!([{"prefix": ["Dr"]}])),
                prac,
            ),
            (
                set("/requesting_practitioner/name", json!([{"family": "Who"}])),
                prac,
            ),
            (
                set(
                    "/requesting_practitioner/name",
                    json!([{"given": ["A"], "family": " "}]),
                ),
                prac,
            ),
            (
                set("/requesting_practitioner/id", json!("2")),
                "SUB_NOT_PRACTITIONER_ID",
            ),
            (
                set("/requesting_practitioner/id", json!(1)),
                "SUB_NOT_PRACTITIONER_ID",
            ),
            (
                remove("/requesting_practitioner", "id"),
                "SUB_NOT_PRACTITIONER_ID",
            ),
            (set("/sub", json!("2")), "SUB_NOT_PRACTITIONER_ID"),
        ];
        for (claims, reason) in cases {
            assert_eq!(reason_of(&claims), reason, "{claims}");
        }
        // UNK is an accepted SDS value; a lone HumanName object is accepted.
        let unk = set("/requesting_practitioner/identifier/0/value", json!("UNK"));
        assert!(check_claims(&unk).is_ok());
        let unk = set("/requesting_practitioner/identifier/1/value", json!("UNK"));
        assert!(check_claims(&unk).is_ok());
        let object_name = set(
            "/requesting_practitioner/name",
            json!({"family": "Who", "given": "John", "prefix": ["Dr"]}),
        );
        assert_eq!(
            check_claims(&object_name)
                .expect("valid")
                .practitioner_name
                .as_deref(),
            Some("John Who")
        );
        // DSTU2-era tokens give `family` as an array of strings.
        let dstu2_family = set(
            "/requesting_practitioner/name",
            json!([{"family": ["Who"], "given": ["John", "H"]}]),
        );
        assert_eq!(
            check_claims(&dstu2_family)
                .expect("valid")
                .practitioner_name
                .as_deref(),
            Some("John H Who")
        );
    }

    #[test]
    fn every_reason_is_upper_snake_and_distinct() {
        let claims = [
            Claim::Iss,
            Claim::Sub,
            Claim::Aud,
            Claim::Iat,
            Claim::Exp,
            Claim::ReasonForRequest,
            Claim::RequestedScope,
            Claim::RequestingDevice,
            Claim::RequestingOrganization,
            Claim::RequestingPractitioner,
        ];
        let mut errors = vec![
            JwtError::Missing,
            JwtError::NotBearer,
            JwtError::TooLarge,
            JwtError::Malformed("x"),
            JwtError::AlgNotNone,
            JwtError::TypNotJwt,
            JwtError::SignatureNotEmpty,
            JwtError::ExpNotIatPlus300,
            JwtError::Expired,
            JwtError::IatInFuture,
            JwtError::ReasonForRequest,
            JwtError::ScopeNotAllowed,
            JwtError::SubNotPractitionerId,
        ];
        for claim in claims {
            errors.push(JwtError::MissingClaim(claim));
            errors.push(JwtError::ClaimType(claim));
            assert_eq!(
                JwtError::MissingClaim(claim).reason(),
                format!("MISSING_CLAIM_{}", claim.name().to_uppercase())
            );
            assert_eq!(
                JwtError::ClaimType(claim).reason(),
                format!("CLAIM_TYPE_{}", claim.name().to_uppercase())
            );
        }
        for claim in [
            ResourceClaim::RequestingDevice,
            ResourceClaim::RequestingOrganization,
            ResourceClaim::RequestingPractitioner,
        ] {
            let e = JwtError::InvalidResource { claim, why: "x" };
            assert_eq!(
                e.reason(),
                format!("INVALID_RESOURCE_{}", claim.name().to_uppercase())
            );
            errors.push(e);
        }
        let mut seen = std::collections::HashSet::new();
        for e in &errors {
            let r = e.reason();
            assert!(r
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'));
            assert!(seen.insert(r), "duplicate {r}");
        }
        assert_eq!(seen.len(), 36);
        let rejection = crate::ssp::outcome::Rejection::InvalidJwt {
            reason: JwtError::Expired.reason(),
        };
        assert_eq!(rejection.token(), "INVALID_JWT_EXPIRED");
    }

    #[test]
    fn lenient_extraction_under_log() {
        let claims = json!({
            "iss": 5,
            "sub": "u",
            "requesting_practitioner": {"name": [{"text": "Dr A Smith"}], "identifier": "x"},
            "requesting_device": {"identifier": [{"value": "v"}]},
            "requesting_organization": {"name": "Org"}
        });
        let decoded = decode(Some(&token_for(&claims))).expect("decodes");
        assert_eq!(decoded.iss, None);
        assert_eq!(decoded.sub.as_deref(), Some("u"));
        assert_eq!(decoded.practitioner_name.as_deref(), Some("Dr A Smith"));
        assert_eq!(decoded.sds_user_id, None);
        assert_eq!(decoded.device_identifier.as_deref(), Some("|v"));
        assert_eq!(decoded.organization_name.as_deref(), Some("Org"));
        let audit = serde_json::to_value(&decoded).expect("serialise");
        assert!(audit.get("iss").is_none(), "absent claims are omitted");
    }

    /// A token whose payload is this exact JSON text (for shapes `json!` cannot build).
    fn raw(payload: &str) -> HeaderValue {
        raw_with_header(HEADER_JSON, payload)
    }

    fn raw_reason(payload: &str) -> &'static str {
        check(
            Some(&raw(payload)),
            &scopes(&["patient/*.write"]),
            NOW + 10,
            0,
        )
        .expect_err("rejected")
        .reason()
    }

    /// A token whose payload is `payload` under the header `header`.
    fn raw_with_header(header: &str, payload: &str) -> HeaderValue {
        bearer(&format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        ))
    }

    #[test]
    fn a_member_the_gateway_reads_may_appear_once_in_its_object() {
        let duplicated = JwtError::Malformed(DUPLICATE_MEMBER);
        let allowed = scopes(&["patient/*.write"]);
        let verdict = |payload: &str| check(Some(&raw(payload)), &allowed, NOW + 10, 0);
        let without_end = &RECORDED[..RECORDED.len() - 1];
        // The same claim twice, whichever copy is the valid one, null or escaped.
        for twice in [
            format!(r#"{{"sub":7,"reason_for_request":"x",{}"#, &RECORDED[1..]),
            format!(r#"{without_end}, "sub": "1"}}"#),
            format!(r#"{without_end}, "iss": null}}"#),
            format!(r#"{without_end}, "iss": "https://ConsumerSystemURL"}}"#),
            format!(r#"{without_end}, "requested_scope": "patient/*.read"}}"#),
        ] {
            assert_eq!(verdict(&twice), Err(duplicated.clone()), "{twice}");
            assert_eq!(decode(Some(&raw(&twice))), Err(duplicated.clone()));
        }
        // In a resource, an identifier, a HumanName (in its array and alone).
        for (from, to) in [
            (
                r#""resourceType":"Device","#,
                r#""resourceType":"Device","identifier":7,"#,
            ),
            (r#","model":"v1""#, r#","model":"v1","model":"v2""#),
            (
                r#""value":"GPCA0001""#,
                r#""value":"GPCA0001","value":"GPCA0002""#,
            ),
            (
                r#""family":"AssurancePractitioner""#,
                r#""family":"AssurancePractitioner","family":"Other""#,
            ),
            (
                r#""name":[{"family":"AssurancePractitioner","given":["AssuranceTest"],"prefix":["Mr"]}]"#,
                r#""name":{"given":"A","given":"B","family":"C"}"#,
            ),
        ] {
            let twice = RECORDED.replace(from, to);
            assert_ne!(twice, RECORDED, "{from}");
            assert_eq!(verdict(&twice), Err(duplicated.clone()), "{twice}");
        }
        // In the header.
        let header = r#"{"alg":"none","typ":"JWT","alg":"none"}"#;
        assert_eq!(
            check(
                Some(&raw_with_header(header, RECORDED)),
                &allowed,
                NOW + 10,
                0
            ),
            Err(duplicated.clone())
        );
        assert_eq!(duplicated.reason(), "MALFORMED");
        // Members the gateway does not read may repeat (their reading decides nothing here),
        // and a name may appear once in each of several objects.
        let unread = format!(r#"{without_end}, "jti": "a", "jti": "b"}}"#);
        assert!(verdict(&unread).is_ok());
        let unread = RECORDED.replace(r#""prefix":["Mr"]"#, r#""prefix":["Mr"],"prefix":[]"#);
        assert!(verdict(&unread).is_ok());
        let header = r#"{"alg":"none","typ":"JWT","kid":"a","kid":"b"}"#;
        assert!(check(
            Some(&raw_with_header(header, RECORDED)),
            &allowed,
            NOW + 10,
            0
        )
        .is_ok());
        assert!(verdict(RECORDED).is_ok());
    }

    #[test]
    fn escaped_strings_and_members_are_read_as_their_text() {
        let escaped = RECORDED
            .replace(r#""directcare""#, r#""direct\u0063are""#)
            .replace(r#""iss":"#, r#""i\u0073s":"#)
            .replace(
                r#""family":"AssurancePractitioner""#,
                r#""family":"Assurance\/Pr""#,
            );
        let claims = check(
            Some(&raw(&escaped)),
            &scopes(&["patient/*.write"]),
            NOW + 10,
            0,
        )
        .expect("valid");
        assert_eq!(claims.reason_for_request.as_deref(), Some("directcare"));
        assert_eq!(claims.iss.as_deref(), Some("https://ConsumerSystemURL"));
        assert_eq!(
            claims.practitioner_name.as_deref(),
            Some("AssuranceTest Assurance/Pr")
        );
    }

    /// A number serde_json refuses (its f64 arithmetic overflows) makes the payload malformed,
    /// as it did when serde_json read the payload: found by review, near f64::MAX.
    #[test]
    fn a_number_serde_json_refuses_makes_the_payload_malformed() {
        let payload = RECORDED.replacen('{', r#"{"x":1.7976931348623158e308,"#, 1);
        assert_eq!(raw_reason(&payload), "MALFORMED");
        let in_iat = RECORDED.replace("\"iat\":1747730256", "\"iat\":17976931348623158e292");
        assert_eq!(raw_reason(&in_iat), "MALFORMED");
        let accepted = RECORDED.replacen('{', r#"{"x":1.79769313486231590e308,"#, 1);
        assert!(check(
            Some(&raw(&accepted)),
            &scopes(&["patient/*.write"]),
            NOW + 10,
            0
        )
        .is_ok());
    }

    #[test]
    fn integers_must_fit_i64_and_not_be_floats() {
        for iat in [
            "9223372036854775808",
            "1747730256.0",
            "1.747730256e9",
            "true",
            "{}",
        ] {
            let claims = RECORDED.replace("\"iat\":1747730256", &format!("\"iat\":{iat}"));
            assert_eq!(raw_reason(&claims), "CLAIM_TYPE_IAT", "{iat}");
            let decoded = decode(Some(&raw(&claims))).expect("decodes");
            assert_eq!(decoded.iat, None, "{iat}");
        }
        let negative = RECORDED
            .replace("\"iat\":1747730256", "\"iat\":-300")
            .replace("\"exp\":1747730556", "\"exp\":0");
        assert_eq!(raw_reason(&negative), "EXPIRED");
        assert_eq!(
            decode(Some(&raw(&negative))).expect("decodes").iat,
            Some(-300)
        );
    }

    #[test]
    fn invalid_json_anywhere_is_malformed() {
        let body = &RECORDED[1..];
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for extra in [
            deep.as_str(),
            r#""\ud800""#,
            "01",
            "1e999",
            r#"[1,]"#,
            r#"{"a":1,}"#,
            "nul",
        ] {
            let payload = format!(r#"{{"extra":{extra},{body}"#);
            let err = decode(Some(&raw(&payload))).expect_err("malformed");
            assert_eq!(err.reason(), "MALFORMED", "{extra}");
        }
        let trailing = format!("{RECORDED} x");
        assert_eq!(
            decode(Some(&raw(&trailing)))
                .expect_err("trailing")
                .reason(),
            "MALFORMED"
        );
        // Deep but within serde_json's limit is fine.
        let nested = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let payload = format!(r#"{{"extra":{nested},{body}"#);
        assert!(decode(Some(&raw(&payload))).is_ok());
    }

    #[test]
    fn header_member_types() {
        let payload = URL_SAFE_NO_PAD.encode(RECORDED);
        let reason = |header: &str| {
            let token = bearer(&format!("{}.{payload}.", URL_SAFE_NO_PAD.encode(header)));
            decode(Some(&token)).map(|_| ()).map_err(|e| e.reason())
        };
        assert_eq!(reason(r#"{"alg":"none","typ":null}"#), Err("TYP_NOT_JWT"));
        assert_eq!(reason(r#"{"alg":null}"#), Err("ALG_NOT_NONE"));
        assert_eq!(reason(r#"{"alg":["none"]}"#), Err("ALG_NOT_NONE"));
        assert_eq!(reason(r#"{"alg":"HS256","alg":"none"}"#), Err("MALFORMED"));
        assert_eq!(reason(r#"{"alg":"n\u006fne","kid":{"x":[1]}}"#), Ok(()));
        assert_eq!(reason(r#" {"alg":"none"} "#), Ok(()));
        assert_eq!(reason(""), Err("MALFORMED"));
        assert_eq!(reason("null"), Err("MALFORMED"));
    }

    #[test]
    fn identifier_lookup_takes_the_first_identifier_with_the_system() {
        let ods = r#"{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"GPCA0001"}"#;
        let org = |identifiers: &str| RECORDED.replace(&format!("[{ods}]"), identifiers);
        let allowed = scopes(&["patient/*.write"]);
        // A non-object or other-system element before the ODS code is passed over.
        let passed = org(&format!(
            r#"["x", null, {{"system":"s","value":"v"}}, {ods}]"#
        ));
        let claims = check(Some(&raw(&passed)), &allowed, NOW + 10, 0).expect("valid");
        assert_eq!(claims.organization_ods_code.as_deref(), Some("GPCA0001"));
        // The first ODS identifier decides, even when a later one is good.
        let empty_first = ods.replace("GPCA0001", "");
        let first = org(&format!("[{empty_first}, {ods}]"));
        assert_eq!(
            raw_reason(&first),
            "INVALID_RESOURCE_REQUESTING_ORGANIZATION"
        );
        assert_eq!(
            decode(Some(&raw(&first)))
                .expect("decodes")
                .organization_ods_code,
            None
        );
        let numeric_first = ods.replace("\"GPCA0001\"", "1");
        let first = org(&format!("[{numeric_first}, {ods}]"));
        assert_eq!(
            raw_reason(&first),
            "INVALID_RESOURCE_REQUESTING_ORGANIZATION"
        );
        // The device identifier is the first element, and only when it is an object.
        let device = RECORDED.replace(
            r#"[{"system":"GPConnectTestSystem","value":"Client"}]"#,
            r#"[{"value":"Client","system":5}, 3]"#,
        );
        assert_eq!(raw_reason(&device), "INVALID_RESOURCE_REQUESTING_DEVICE");
        let decoded = decode(Some(&raw(&device))).expect("decodes");
        assert_eq!(decoded.device_identifier.as_deref(), Some("|Client"));
        let device = RECORDED.replace(
            r#"[{"system":"GPConnectTestSystem","value":"Client"}]"#,
            r#"[[], {"system":"s","value":"v"}]"#,
        );
        assert_eq!(
            decode(Some(&raw(&device)))
                .expect("decodes")
                .device_identifier,
            None
        );
    }

    #[test]
    fn practitioner_name_shapes() {
        let name = |value: &str| {
            let claims = RECORDED.replace(
                r#"[{"family":"AssurancePractitioner","given":["AssuranceTest"],"prefix":["Mr"]}]"#,
                value,
            );
            let decoded = decode(Some(&raw(&claims))).expect("decodes");
            let verdict = check(
                Some(&raw(&claims)),
                &scopes(&["patient/*.write"]),
                NOW + 10,
                0,
            );
            (
                decoded.practitioner_name,
                verdict.map(|_| ()).map_err(|e| e.reason()),
            )
        };
        let prac = Err("INVALID_RESOURCE_REQUESTING_PRACTITIONER");
        assert_eq!(name(r#"[null]"#), (None, prac));
        assert_eq!(
            name(r#"[{"given":" A  ","family":" B "}, 1]"#),
            (Some("A B".into()), Ok(()))
        );
        assert_eq!(
            name(r#"[{"given":["A",1,"","C"],"family":"F"}]"#),
            (Some("A C F".into()), Ok(()))
        );
        assert_eq!(
            name(r#"[{"family":["F",2,"G"],"given":["A"]}]"#),
            (Some("A F G".into()), Ok(()))
        );
        // Decoded for the audit record whatever the verdict; refused without both names.
        assert_eq!(
            name(r#"[{"given":["A",1,"","C"],"text":"T"}]"#),
            (Some("A C".into()), prac)
        );
        assert_eq!(
            name(r#"[{"text":" Dr T ","family":""}]"#),
            (Some("Dr T".into()), prac)
        );
        assert_eq!(
            name(r#"{"family":"F","given":null}"#),
            (Some("F".into()), prac)
        );
        assert_eq!(
            name(r#"{"family":"F","given":[""]}"#),
            (Some("F".into()), prac)
        );
        assert_eq!(name(r#"{}"#), (None, prac));
        assert_eq!(name(r#"[]"#), (None, prac));
        assert_eq!(name(r#""Dr Who""#), (None, prac));
        assert_eq!(name("null"), (None, prac));
    }

    #[test]
    fn wrong_types_inside_resources_are_lenient_in_decode() {
        let claims = RECORDED
            .replace(r#""model":"v1""#, r#""model":1"#)
            .replace(r#""name":"GP Connect Assurance""#, r#""name":{"a":"b"}"#)
            .replace(r#""id":"1""#, r#""id":1"#);
        let decoded = decode(Some(&raw(&claims))).expect("decodes");
        assert_eq!(decoded.device_model, None);
        assert_eq!(decoded.device_version.as_deref(), Some("1.1"));
        assert_eq!(decoded.organization_name, None);
        assert_eq!(decoded.practitioner_id, None);
        // A model that is not a string is no model.
        assert_eq!(raw_reason(&claims), "INVALID_RESOURCE_REQUESTING_DEVICE");
        let empty_strings = RECORDED.replace(r#""sub":"1""#, r#""sub":"""#);
        assert_eq!(raw_reason(&empty_strings), "MISSING_CLAIM_SUB");
        assert_eq!(
            decode(Some(&raw(&empty_strings)))
                .expect("decodes")
                .sub
                .as_deref(),
            Some("")
        );
        let empty_reason = RECORDED.replace(r#""directcare""#, r#""""#);
        assert_eq!(
            raw_reason(&empty_reason),
            "MISSING_CLAIM_REASON_FOR_REQUEST"
        );
    }

    #[test]
    fn policy_deserialises_lowercase_with_enforce_default() {
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            jwt: JwtPolicy,
        }
        let parse = |s: &str| toml::from_str::<Config>(s).map(|c| c.jwt);
        assert_eq!(parse("").expect("default"), JwtPolicy::Enforce);
        assert_eq!(
            parse("jwt = \"enforce\"").expect("enforce"),
            JwtPolicy::Enforce
        );
        assert_eq!(parse("jwt = \"log\"").expect("log"), JwtPolicy::Log);
        assert_eq!(parse("jwt = \"off\"").expect("off"), JwtPolicy::Off);
        assert!(parse("jwt = \"Log\"").is_err());
    }

    fn arb_claims() -> impl Strategy<Value = JwtClaims> {
        (
            proptest::collection::vec(proptest::option::of(any::<String>()), 14),
            proptest::option::of(any::<i64>()),
            proptest::option::of(any::<i64>()),
        )
            .prop_map(|(t, iat, exp)| {
                let mut c = JwtClaims::default();
                [
                    &mut c.iss,
                    &mut c.sub,
                    &mut c.aud,
                    &mut c.reason_for_request,
                    &mut c.requested_scope,
                    &mut c.organization_ods_code,
                    &mut c.organization_name,
                    &mut c.practitioner_id,
                    &mut c.sds_user_id,
                    &mut c.sds_role_profile_id,
                    &mut c.practitioner_name,
                    &mut c.device_identifier,
                    &mut c.device_model,
                    &mut c.device_version,
                ]
                .into_iter()
                .zip(t)
                .for_each(|(field, value)| *field = value);
                c.iat = iat;
                c.exp = exp;
                c
            })
    }

    proptest! {
        /// The claims' JSON, written once per request, is what serde_json writes for them.
        #[test]
        fn the_claims_json_is_what_serde_json_writes(claims in arb_claims()) {
            prop_assert_eq!(claims.json(), serde_json::to_string(&claims).expect("json"));
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-zA-Z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const CLAIM_PATHS: [&str; 14] = [
        "/iss",
        "/sub",
        "/aud",
        "/iat",
        "/exp",
        "/reason_for_request",
        "/requested_scope",
        "/requesting_device",
        "/requesting_device/identifier",
        "/requesting_organization/identifier/0",
        "/requesting_practitioner/id",
        "/requesting_practitioner/identifier",
        "/requesting_practitioner/name",
        "/requesting_organization",
    ];

    /// The claims of a payload read the plain way, through a `serde_json::Value`: the rules
    /// of `Payload::claims` restated independently of the typed views and the JSON reader.
    fn claims_through_value(payload: &Value) -> JwtClaims {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let int = |v: Option<&Value>| v.and_then(Value::as_i64);
        let resource = |name: &str| payload.get(name).filter(|r| r.is_object());
        // The first object identifier with `system` decides; a non-empty string value counts.
        let identified = |r: Option<&Value>, system: &str| {
            let ids = r?.get("identifier")?.as_array()?;
            let first = ids
                .iter()
                .filter(|id| id.is_object())
                .find(|id| id.get("system").and_then(Value::as_str) == Some(system))?;
            text(first.get("value")).filter(|v| !v.is_empty())
        };
        let (device, organization, practitioner) = (
            resource("requesting_device"),
            resource("requesting_organization"),
            resource("requesting_practitioner"),
        );
        let human = practitioner.and_then(|p| match p.get("name")? {
            Value::Array(names) => names.first().filter(|n| n.is_object()),
            name @ Value::Object(_) => Some(name),
            _ => None,
        });
        let practitioner_name = human.and_then(|h| {
            let mut out = String::new();
            // `given`, then `family`: each a string or the strings of an array.
            for member in ["given", "family"] {
                match h.get(member) {
                    Some(Value::String(word)) => push_word(&mut out, word),
                    Some(Value::Array(words)) => words
                        .iter()
                        .filter_map(Value::as_str)
                        .for_each(|w| push_word(&mut out, w)),
                    _ => {}
                }
            }
            if out.is_empty() {
                if let Some(t) = h.get("text").and_then(Value::as_str) {
                    push_word(&mut out, t);
                }
            }
            (!out.is_empty()).then_some(out)
        });
        let device_identifier = device
            .and_then(|d| d.get("identifier")?.as_array()?.first())
            .filter(|id| id.is_object())
            .and_then(|id| {
                let system = id.get("system").and_then(Value::as_str).unwrap_or("");
                let value = id.get("value").and_then(Value::as_str).unwrap_or("");
                (!system.is_empty() || !value.is_empty()).then(|| format!("{system}|{value}"))
            });
        JwtClaims {
            iss: text(payload.get("iss")),
            sub: text(payload.get("sub")),
            aud: text(payload.get("aud")),
            iat: int(payload.get("iat")),
            exp: int(payload.get("exp")),
            reason_for_request: text(payload.get("reason_for_request")),
            requested_scope: text(payload.get("requested_scope")),
            organization_ods_code: identified(organization, ODS_SYSTEM),
            organization_name: text(organization.and_then(|o| o.get("name"))),
            practitioner_id: text(practitioner.and_then(|p| p.get("id"))),
            sds_user_id: identified(practitioner, SDS_USER_ID_SYSTEM),
            sds_role_profile_id: identified(practitioner, SDS_ROLE_PROFILE_SYSTEM),
            practitioner_name,
            device_identifier,
            device_model: text(device.and_then(|d| d.get("model"))),
            device_version: text(device.and_then(|d| d.get("version"))),
            json: RenderedJson::default(),
        }
    }

    /// Values the extraction treats specially, beside arbitrary JSON: the known identifier
    /// systems, identifiers and lists of them (a later one with the same system must not
    /// count), and names in their shapes.
    fn extraction_value() -> impl Strategy<Value = Value> {
        let system = prop_oneof![
            Just(json!(ODS_SYSTEM)),
            Just(json!(SDS_USER_ID_SYSTEM)),
            Just(json!(SDS_ROLE_PROFILE_SYSTEM)),
            Just(json!("")),
            Just(json!(7)),
        ];
        let value = prop_oneof![
            Just(json!("")),
            Just(json!(" v ")),
            Just(json!(null)),
            "[a-z]{1,3}".prop_map(Value::String)
        ];
        let identifier =
            (system, value).prop_map(|(system, value)| json!({"system": system, "value": value}));
        let word = prop_oneof![
            Just(json!(" ")),
            Just(json!(3)),
            "[a-z ]{0,4}".prop_map(Value::String)
        ];
        let human = (
            prop_oneof![
                word.clone(),
                proptest::collection::vec(word.clone(), 0..3).prop_map(Value::Array)
            ],
            word.clone(),
            word,
        )
            .prop_map(
                |(given, family, text)| json!({"given": given, "family": family, "text": text}),
            );
        prop_oneof![
            arb_json(),
            identifier.clone(),
            proptest::collection::vec(identifier, 0..4).prop_map(Value::Array),
            human.clone(),
            proptest::collection::vec(human, 0..3).prop_map(Value::Array),
        ]
    }

    /// Where the claims' extraction looks, for the property below to put other values.
    const EXTRACTION_PATHS: [&str; 16] = [
        "/iat",
        "/sub",
        "/requesting_device/identifier",
        "/requesting_device/identifier/0",
        "/requesting_device/identifier/0/system",
        "/requesting_device/model",
        "/requesting_organization/identifier/0",
        "/requesting_organization/identifier/0/value",
        "/requesting_organization/name",
        "/requesting_practitioner/identifier/0",
        "/requesting_practitioner/identifier/1/system",
        "/requesting_practitioner/name",
        "/requesting_practitioner/name/0",
        "/requesting_practitioner/name/0/given",
        "/requesting_practitioner/name/0/family",
        "/requesting_practitioner",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// The claims `decode` extracts are those a plain reading of the payload through
        /// serde_json gives, whatever is put where the extraction looks; a second copy of a
        /// member the gateway reads makes the token malformed.
        #[test]
        fn decoded_claims_are_those_of_a_plain_reading(
            edits in proptest::collection::vec((0..EXTRACTION_PATHS.len(), extraction_value()), 1..4),
            duplicate in proptest::option::of((0..EXTRACTION_PATHS.len(), extraction_value())),
        ) {
            let mut claims = valid();
            for (path, replacement) in edits {
                if let Some(slot) = claims.pointer_mut(EXTRACTION_PATHS[path]) {
                    *slot = replacement;
                }
            }
            let mut payload = claims.to_string();
            if let Some((path, ref value)) = duplicate {
                let name = EXTRACTION_PATHS[path].trim_start_matches('/').split('/').next().unwrap_or("iat");
                payload.pop();
                payload.push_str(&format!(",{}:{value}}}", json!(name)));
            }
            let plain: Value = serde_json::from_str(&payload).expect("serde reads it");
            let decoded = decode(Some(&raw(&payload)));
            match duplicate {
                Some(_) => prop_assert_eq!(decoded, Err(JwtError::Malformed(DUPLICATE_MEMBER))),
                None => prop_assert_eq!(decoded, Ok(claims_through_value(&plain)), "{}", payload),
            }
        }

        #[test]
        fn decode_and_check_never_panic_on_arbitrary_headers(
            bytes in proptest::collection::vec(any::<u8>(), 0..300)
        ) {
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                let _ = decode(Some(&value));
                let _ = check(Some(&value), &scopes(&["patient/*.read"]), NOW, 60);
            }
        }

        #[test]
        fn decode_and_check_never_panic_on_arbitrary_parts(
            header in proptest::collection::vec(any::<u8>(), 0..64),
            payload in proptest::collection::vec(any::<u8>(), 0..256),
            signature in "[A-Za-z0-9_=-]{0,4}",
        ) {
            let token = format!(
                "{}.{}.{signature}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(payload)
            );
            let value = bearer(&token);
            let _ = decode(Some(&value));
            let _ = check(Some(&value), &scopes(&["patient/*.read"]), NOW, 60);
        }

        #[test]
        fn check_never_panics_on_mutated_claims(
            which in 0..CLAIM_PATHS.len(),
            replacement in arb_json(),
            now in any::<i64>(),
            skew in any::<i64>(),
        ) {
            let mut claims = valid();
            if let Some(slot) = claims.pointer_mut(CLAIM_PATHS[which]) {
                *slot = replacement;
            }
            let _ = decode(Some(&token_for(&claims)));
            let _ = check(Some(&token_for(&claims)), &scopes(&["patient/*.read"]), now, skew);
        }

        #[test]
        fn valid_dev_tokens_round_trip(
            scope_index in 0..4usize,
            now in 0i64..8_000_000_000,
            audience in "[ -~]{0,40}",
            skew in 0i64..600,
            age in 0i64..300,
        ) {
            let scope = crate::ssp::interactions::ALLOWED_SCOPES[scope_index];
            let claims = dev_claims(scope, now, &audience);
            let result = check(Some(&token_for(&claims)), &scopes(&[scope]), now + age, skew);
            if audience.is_empty() {
                prop_assert_eq!(result, Err(JwtError::MissingClaim(Claim::Aud)));
            } else {
                let claims = result.expect("a dev token is valid");
                prop_assert_eq!(claims.requested_scope.as_deref(), Some(scope));
                prop_assert_eq!(claims.aud.as_deref(), Some(audience.as_str()));
                prop_assert_eq!(claims.iat, Some(now));
                prop_assert_eq!(claims.exp, Some(now + 300));
                prop_assert_eq!(claims.organization_ods_code.as_deref(), Some("A20047"));
            }
        }
    }
}
