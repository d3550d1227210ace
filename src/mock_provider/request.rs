//! What a GP Connect provider checks on every request before it looks at the data: the four
//! Ssp-* headers (and that `Ssp-To` is this provider's ASID), the interaction id against the
//! route, the unsigned JWT bearer token and its `requested_scope`, the response format, and the
//! small header grammars (`If-Match`, `Prefer`). Also query-string decoding. Pure functions of
//! the request head; nothing here touches provider state.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE, IF_MATCH};
use percent_encoding::percent_decode_str;
use serde_json::Value;

use super::outcome::ProviderError;

/// The JWT scopes GP Connect 1.2.7 defines (`requested_scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `patient/*.read`
    PatientRead,
    /// `patient/*.write`
    PatientWrite,
    /// `organization/*.read`
    OrganizationRead,
}

impl Scope {
    /// The claim value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PatientRead => "patient/*.read",
            Self::PatientWrite => "patient/*.write",
            Self::OrganizationRead => "organization/*.read",
        }
    }
}

/// The 15 GP Connect 1.2.7 Foundations and Appointment Management interactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    ReadMetadata,
    SearchPatient,
    ReadPatient,
    SearchPractitioner,
    ReadPractitioner,
    SearchOrganization,
    ReadOrganization,
    ReadLocation,
    RegisterPatient,
    SearchSlot,
    CreateAppointment,
    ReadAppointment,
    AmendAppointment,
    CancelAppointment,
    SearchPatientAppointments,
}

impl Interaction {
    /// Every interaction, in the order of the reference table.
    pub const ALL: [Interaction; 15] = [
        Self::ReadMetadata,
        Self::SearchPatient,
        Self::ReadPatient,
        Self::SearchPractitioner,
        Self::ReadPractitioner,
        Self::SearchOrganization,
        Self::ReadOrganization,
        Self::ReadLocation,
        Self::RegisterPatient,
        Self::SearchSlot,
        Self::CreateAppointment,
        Self::ReadAppointment,
        Self::AmendAppointment,
        Self::CancelAppointment,
        Self::SearchPatientAppointments,
    ];

    /// The `Ssp-InteractionID` URN.
    pub fn urn(self) -> &'static str {
        match self {
            Self::ReadMetadata => "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1",
            Self::SearchPatient => "urn:nhs:names:services:gpconnect:fhir:rest:search:patient-1",
            Self::ReadPatient => "urn:nhs:names:services:gpconnect:fhir:rest:read:patient-1",
            Self::SearchPractitioner => {
                "urn:nhs:names:services:gpconnect:fhir:rest:search:practitioner-1"
            }
            Self::ReadPractitioner => {
                "urn:nhs:names:services:gpconnect:fhir:rest:read:practitioner-1"
            }
            Self::SearchOrganization => {
                "urn:nhs:names:services:gpconnect:fhir:rest:search:organization-1"
            }
            Self::ReadOrganization => {
                "urn:nhs:names:services:gpconnect:fhir:rest:read:organization-1"
            }
            Self::ReadLocation => "urn:nhs:names:services:gpconnect:fhir:rest:read:location-1",
            Self::RegisterPatient => {
                "urn:nhs:names:services:gpconnect:fhir:operation:gpc.registerpatient-1"
            }
            Self::SearchSlot => "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1",
            Self::CreateAppointment => {
                "urn:nhs:names:services:gpconnect:fhir:rest:create:appointment-1"
            }
            Self::ReadAppointment => {
                "urn:nhs:names:services:gpconnect:fhir:rest:read:appointment-1"
            }
            Self::AmendAppointment => {
                "urn:nhs:names:services:gpconnect:fhir:rest:update:appointment-1"
            }
            Self::CancelAppointment => {
                "urn:nhs:names:services:gpconnect:fhir:rest:cancel:appointment-1"
            }
            Self::SearchPatientAppointments => {
                "urn:nhs:names:services:gpconnect:fhir:rest:search:patient_appointments-1"
            }
        }
    }

    /// The interaction with this URN (exact, case-sensitive as in the specification).
    pub fn from_urn(urn: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|i| i.urn() == urn)
    }

    /// The JWT `requested_scope` the interaction needs.
    pub fn scope(self) -> Scope {
        match self {
            Self::ReadMetadata
            | Self::SearchPractitioner
            | Self::ReadPractitioner
            | Self::SearchOrganization
            | Self::ReadOrganization
            | Self::ReadLocation
            | Self::SearchSlot => Scope::OrganizationRead,
            Self::SearchPatient
            | Self::ReadPatient
            | Self::ReadAppointment
            | Self::SearchPatientAppointments => Scope::PatientRead,
            Self::RegisterPatient
            | Self::CreateAppointment
            | Self::AmendAppointment
            | Self::CancelAppointment => Scope::PatientWrite,
        }
    }
}

/// The Ssp-* headers a provider receives from the SSP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SspHeaders {
    pub trace_id: String,
    pub from: String,
    pub to: String,
    pub interaction: Interaction,
}

/// The single value of header `name`; a missing, repeated, blank or non-ASCII value is
/// `BAD_REQUEST`. Header names are matched case-insensitively (the `http` crate stores them
/// lower-cased, so `Ssp-InteractionId` and `Ssp-InteractionID` are the same header).
fn single_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ProviderError> {
    let mut values = headers.get_all(name).iter();
    let value = values
        .next()
        .ok_or_else(|| ProviderError::BadRequest(format!("{name} header is missing")))?;
    if values.next().is_some() {
        return Err(ProviderError::BadRequest(format!(
            "{name} header must appear once"
        )));
    }
    let text = value
        .to_str()
        .map_err(|_| ProviderError::BadRequest(format!("{name} header is not valid text")))?
        .trim();
    if text.is_empty() {
        return Err(ProviderError::BadRequest(format!("{name} header is blank")));
    }
    Ok(text)
}

/// Checks the four Ssp-* headers as a provider does: all present and not blank, `Ssp-To` is
/// `own_asid`, `Ssp-InteractionID` a known GP Connect interaction.
pub fn ssp_headers(headers: &HeaderMap, own_asid: &str) -> Result<SspHeaders, ProviderError> {
    let trace_id = single_header(headers, "Ssp-TraceID")?.to_string();
    let from = single_header(headers, "Ssp-From")?.to_string();
    let to = single_header(headers, "Ssp-To")?.to_string();
    let urn = single_header(headers, "Ssp-InteractionID")?;
    if to != own_asid {
        return Err(ProviderError::BadRequest(format!(
            "Ssp-To {to} is not this provider's ASID"
        )));
    }
    let interaction = Interaction::from_urn(urn).ok_or_else(|| {
        ProviderError::BadRequest(format!("Ssp-InteractionID {urn} is not supported"))
    })?;
    Ok(SspHeaders {
        trace_id,
        from,
        to,
        interaction,
    })
}

/// Decodes one base64url JWT segment (padding tolerated) into a JSON object.
fn jwt_segment(segment: &str, what: &str) -> Result<serde_json::Map<String, Value>, ProviderError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .map_err(|_| ProviderError::BadRequest(format!("JWT {what} is not base64url")))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ProviderError::BadRequest(format!(
            "JWT {what} is not a JSON object"
        ))),
    }
}

/// Checks `Authorization: Bearer <jwt>`: an unsecured JWT (`alg` `none`, empty signature so the
/// token ends in `.`) whose payload has `requested_scope` equal to the interaction's scope.
/// Claims beyond that (expiry, requesting_* resources) are the gateway's JWT policy's concern;
/// the mock stays lenient so long benchmarks can reuse one token.
pub fn bearer_token(headers: &HeaderMap, interaction: Interaction) -> Result<(), ProviderError> {
    let value = single_header(headers, AUTHORIZATION.as_str())?;
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => {
            return Err(ProviderError::BadRequest(
                "Authorization header must be a Bearer token".into(),
            ))
        }
    };
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = parts.as_slice() else {
        return Err(ProviderError::BadRequest(
            "JWT must have three dot-separated parts".into(),
        ));
    };
    if !signature.is_empty() {
        return Err(ProviderError::BadRequest(
            "JWT must be unsigned: the signature part must be empty".into(),
        ));
    }
    let header = jwt_segment(header, "header")?;
    if header.get("alg").and_then(Value::as_str) != Some("none") {
        return Err(ProviderError::BadRequest(
            "JWT header alg must be \"none\"".into(),
        ));
    }
    let payload = jwt_segment(payload, "payload")?;
    let scope = payload
        .get("requested_scope")
        .and_then(Value::as_str)
        .ok_or_else(|| ProviderError::BadRequest("JWT requested_scope claim is missing".into()))?;
    let expected = interaction.scope().as_str();
    if scope != expected {
        return Err(ProviderError::BadRequest(format!(
            "JWT requested_scope {scope} does not match the interaction (expected {expected})"
        )));
    }
    Ok(())
}

/// Decoded query parameters in order. Percent-decoding only: a literal `+` stays a `+` (FHIR
/// dates carry `+01:00`), which is what RFC 3986 says and what GP Connect consumers rely on.
pub fn query_params(query: Option<&str>) -> Result<Vec<(String, String)>, ProviderError> {
    let Some(query) = query else {
        return Ok(Vec::new());
    };
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| ProviderError::BadRequest("query string is not valid UTF-8".into()))
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(key)?, decode(value)?))
        })
        .collect()
}

/// All values of query parameter `name`.
pub fn param_values<'a>(params: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    params
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The media type part of a header value (`application/fhir+json;charset=utf-8` →
/// `application/fhir+json`), lower-cased.
fn media_type(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn is_json(media: &str) -> bool {
    matches!(
        media,
        "application/fhir+json" | "application/json" | "json" | "text/json"
    )
}

/// Checks the response format the consumer asked for (`_format` overrides `Accept`). This
/// provider speaks JSON only: a request for XML, or only for formats it cannot produce, is 415.
pub fn response_format(
    headers: &HeaderMap,
    params: &[(String, String)],
) -> Result<(), ProviderError> {
    if let Some(format) = param_values(params, "_format").first() {
        let media = media_type(format);
        return if is_json(&media) {
            Ok(())
        } else {
            Err(ProviderError::UnsupportedMediaType(format!(
                "_format {format} is not supported: this provider returns application/fhir+json only"
            )))
        };
    }
    let Some(accept) = headers.get(ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let acceptable = accept.split(',').map(media_type).any(|m| {
        is_json(&m) || m == "*/*" || m == "application/*" || m.is_empty() || m.ends_with("+json")
    });
    if acceptable {
        Ok(())
    } else {
        Err(ProviderError::UnsupportedMediaType(format!(
            "Accept {accept} is not supported: this provider returns application/fhir+json only"
        )))
    }
}

/// Checks the request body's `Content-Type` (absent means JSON).
pub fn request_format(headers: &HeaderMap) -> Result<(), ProviderError> {
    match headers.get(CONTENT_TYPE) {
        None => Ok(()),
        Some(value) => {
            let media = value.to_str().map(media_type).unwrap_or_default();
            if is_json(&media) {
                Ok(())
            } else {
                Err(ProviderError::UnsupportedMediaType(format!(
                    "Content-Type {media} is not supported: send application/fhir+json"
                )))
            }
        }
    }
}

/// The version named by `If-Match` (`W/"3"` or `"3"`), `None` when the header is absent.
pub fn if_match(headers: &HeaderMap) -> Result<Option<String>, ProviderError> {
    if headers.get(IF_MATCH).is_none() {
        return Ok(None);
    }
    let value = single_header(headers, IF_MATCH.as_str())?;
    let tag = value.strip_prefix("W/").unwrap_or(value);
    let version = tag
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .filter(|v| !v.is_empty() && !v.contains('"'))
        .ok_or_else(|| {
            ProviderError::BadRequest(format!(
                "If-Match {value} is not an entity tag such as W/\"1\""
            ))
        })?;
    Ok(Some(version.to_string()))
}

/// True when the consumer sent `Prefer: return=minimal` (representation is the default).
pub fn prefers_minimal(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .any(|token| {
            token
                .trim()
                .split_once('=')
                .is_some_and(|(k, v)| k.trim() == "return" && v.trim() == "minimal")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const ASID: &str = "918999198993";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                *name,
                HeaderValue::from_str(value).expect("test header value"),
            );
        }
        map
    }

    fn jwt(header: &str, payload: &str, signature: &str) -> String {
        format!(
            "Bearer {}.{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload),
            signature
        )
    }

    #[test]
    fn ssp_headers_are_case_insensitive_and_complete() {
        let h = headers(&[
            ("ssp-traceid", "629ea9ba-a077-4d99-b289-7a9b19fd4e03"),
            ("SSP-FROM", "200000000359"),
            ("Ssp-To", ASID),
            (
                "Ssp-InteractionId",
                "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1",
            ),
        ]);
        let ssp = ssp_headers(&h, ASID).expect("valid headers");
        assert_eq!(ssp.interaction, Interaction::SearchSlot);
        assert_eq!(ssp.from, "200000000359");
    }

    #[test]
    fn missing_blank_repeated_or_foreign_ssp_headers_are_bad_requests() {
        let full = [
            ("Ssp-TraceID", "t"),
            ("Ssp-From", "200000000359"),
            ("Ssp-To", ASID),
            (
                "Ssp-InteractionID",
                "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1",
            ),
        ];
        for skip in 0..full.len() {
            let partial: Vec<_> = full
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, p)| *p)
                .collect();
            let err = ssp_headers(&headers(&partial), ASID).unwrap_err();
            assert_eq!(err.spine_code(), "BAD_REQUEST");
            assert!(err.diagnostics().contains(full[skip].0), "{err:?}");
        }
        let mut blank = full;
        blank[0].1 = "  ";
        assert!(ssp_headers(&headers(&blank), ASID).is_err());
        let mut repeated = full.to_vec();
        repeated.push(("Ssp-To", ASID));
        assert!(ssp_headers(&headers(&repeated), ASID).is_err());
        let mut wrong_to = full;
        wrong_to[2].1 = "123456789123";
        let err = ssp_headers(&headers(&wrong_to), ASID).unwrap_err();
        assert!(err.diagnostics().contains("123456789123"));
        let mut unknown = full;
        unknown[3].1 = "urn:nhs:names:services:gpconnect:fhir:rest:read:nothing-1";
        assert!(ssp_headers(&headers(&unknown), ASID).is_err());
    }

    #[test]
    fn every_interaction_round_trips_through_its_urn() {
        for interaction in Interaction::ALL {
            assert_eq!(Interaction::from_urn(interaction.urn()), Some(interaction));
        }
    }

    #[test]
    fn unsigned_jwt_with_matching_scope_is_accepted() {
        let token = jwt(
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"requested_scope":"patient/*.write","iss":"x"}"#,
            "",
        );
        let h = headers(&[("authorization", &token)]);
        assert_eq!(bearer_token(&h, Interaction::CreateAppointment), Ok(()));
        // Padded base64 is tolerated.
        let padded = format!(
            "Bearer {}.{}.",
            base64::engine::general_purpose::URL_SAFE.encode(r#"{"alg":"none"}"#),
            base64::engine::general_purpose::URL_SAFE
                .encode(r#"{"requested_scope":"organization/*.read"}"#)
        );
        let h = headers(&[("authorization", &padded)]);
        assert_eq!(bearer_token(&h, Interaction::ReadMetadata), Ok(()));
    }

    #[test]
    fn bad_tokens_are_bad_requests() {
        let ok_header = r#"{"alg":"none","typ":"JWT"}"#;
        let ok_payload = r#"{"requested_scope":"patient/*.read"}"#;
        let cases = [
            String::new(),
            "Basic dXNlcjpwYXNz".to_string(),
            "Bearer".to_string(),
            jwt(ok_header, ok_payload, "c2lnbmF0dXJl"),
            jwt(r#"{"alg":"HS256"}"#, ok_payload, ""),
            jwt(ok_header, r#"{"sub":"1"}"#, ""),
            jwt(ok_header, r#"{"requested_scope":"patient/*.write"}"#, ""),
            jwt(ok_header, "[1,2]", ""),
            format!("Bearer {}", URL_SAFE_NO_PAD.encode(ok_header)),
            "Bearer !!!.???.".to_string(),
        ];
        for token in cases {
            let h = if token.is_empty() {
                HeaderMap::new()
            } else {
                headers(&[("authorization", &token)])
            };
            let err = bearer_token(&h, Interaction::ReadPatient).unwrap_err();
            assert_eq!(err.spine_code(), "BAD_REQUEST", "{token}");
        }
    }

    #[test]
    fn query_is_percent_decoded_and_plus_is_kept() {
        let params = query_params(Some(
            "identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9000000009&start=ge2025-05-21T01:00:00+01:00&end=le2025-05-23T01:00:00%2B01:00&&flag",
        ))
        .expect("decodes");
        assert_eq!(
            param_values(&params, "identifier"),
            ["https://fhir.nhs.uk/Id/nhs-number|9000000009"]
        );
        assert_eq!(
            param_values(&params, "start"),
            ["ge2025-05-21T01:00:00+01:00"]
        );
        assert_eq!(
            param_values(&params, "end"),
            ["le2025-05-23T01:00:00+01:00"]
        );
        assert_eq!(param_values(&params, "flag"), [""]);
        assert!(query_params(Some("a=%FF")).is_err());
        assert_eq!(query_params(None), Ok(Vec::new()));
    }

    #[test]
    fn json_is_the_only_format() {
        let none = HeaderMap::new();
        assert!(response_format(&none, &[]).is_ok());
        let json = headers(&[("accept", "application/fhir+json;charset=utf-8")]);
        assert!(response_format(&json, &[]).is_ok());
        let any = headers(&[("accept", "text/html, */*;q=0.1")]);
        assert!(response_format(&any, &[]).is_ok());
        let xml = headers(&[("accept", "application/fhir+xml")]);
        assert_eq!(
            response_format(&xml, &[]).unwrap_err().status().as_u16(),
            415
        );
        let format = vec![("_format".to_string(), "xml".to_string())];
        assert!(response_format(&json, &format).is_err());
        let format = vec![("_format".to_string(), "application/fhir+json".to_string())];
        assert!(response_format(&xml, &format).is_ok());
        assert!(request_format(&headers(&[("content-type", "application/fhir+xml")])).is_err());
        assert!(request_format(&headers(&[(
            "content-type",
            "application/fhir+json;charset=utf-8"
        )]))
        .is_ok());
    }

    #[test]
    fn if_match_and_prefer_grammars() {
        assert_eq!(if_match(&HeaderMap::new()), Ok(None));
        assert_eq!(
            if_match(&headers(&[("if-match", "W/\"3\"")])),
            Ok(Some("3".into()))
        );
        assert_eq!(
            if_match(&headers(&[("if-match", "\"12\"")])),
            Ok(Some("12".into()))
        );
        assert!(if_match(&headers(&[("if-match", "3")])).is_err());
        assert!(if_match(&headers(&[("if-match", "W/\"\"")])).is_err());
        assert!(prefers_minimal(&headers(&[("prefer", "return=minimal")])));
        assert!(prefers_minimal(&headers(&[(
            "prefer",
            "respond-async, return = minimal"
        )])));
        assert!(!prefers_minimal(&headers(&[(
            "prefer",
            "return=representation"
        )])));
        assert!(!prefers_minimal(&HeaderMap::new()));
    }

    proptest::proptest! {
        #[test]
        fn query_decoding_never_panics(query in "\\PC{0,80}") {
            let _ = query_params(Some(&query));
        }
    }
}
