//! The mock provider's errors and their one rendering: a GP Connect `OperationOutcome`
//! (profile `GPConnect-OperationOutcome-1`, Spine code in `issue.details`), as a real 1.2.7
//! provider returns it. These are provider errors; the gateway's own rejections live in
//! `crate::ssp::outcome` and look different on purpose.

use http::StatusCode;
use serde_json::{json, Value};

/// `meta.profile` of every OperationOutcome the provider returns.
pub const OPERATION_OUTCOME_PROFILE: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/GPConnect-OperationOutcome-1";
/// The Spine error or warning CodeSystem (`issue.details.coding.system`).
pub const SPINE_ERROR_CODE_SYSTEM: &str =
    "https://fhir.nhs.uk/STU3/CodeSystem/Spine-ErrorOrWarningCode-1";

/// A request the provider refuses. Each variant knows its HTTP status, Spine error code and FHIR
/// issue type (GP Connect 1.2.7 error handling guidance); the text is the `diagnostics`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// 400 `BAD_REQUEST`: malformed request, missing or wrong header, bad JWT, wrong verb.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 400 `INVALID_IDENTIFIER_SYSTEM`.
    #[error("invalid identifier system: {0}")]
    InvalidIdentifierSystem(String),
    /// 400 `INVALID_IDENTIFIER_VALUE`.
    #[error("invalid identifier value: {0}")]
    InvalidIdentifierValue(String),
    /// 400 `INVALID_NHS_NUMBER`.
    #[error("invalid NHS number: {0}")]
    InvalidNhsNumber(String),
    /// 404 `PATIENT_NOT_FOUND`.
    #[error("patient not found: {0}")]
    PatientNotFound(String),
    /// 404 `PRACTITIONER_NOT_FOUND`.
    #[error("practitioner not found: {0}")]
    PractitionerNotFound(String),
    /// 404 `ORGANISATION_NOT_FOUND`.
    #[error("organisation not found: {0}")]
    OrganisationNotFound(String),
    /// 404 `NO_RECORD_FOUND`: any other missing record, and paths outside the service root.
    #[error("no record found: {0}")]
    NoRecordFound(String),
    /// 409 `DUPLICATE_REJECTED`: the create would duplicate a resource (slot in use, patient
    /// already registered).
    #[error("duplicate rejected: {0}")]
    DuplicateRejected(String),
    /// 409 `FHIR_CONSTRAINT_VIOLATION`: `If-Match` names a version that is not the current one.
    #[error("version conflict: {0}")]
    VersionConflict(String),
    /// 413 `BAD_REQUEST` (issue type `too-long`): the request body is over the provider's cap.
    #[error("payload too large: {0}")]
    PayloadTooLarge(String),
    /// 415 `UNSUPPORTED_MEDIA_TYPE`: XML or another format this provider does not speak.
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    /// 422 `INVALID_RESOURCE`.
    #[error("invalid resource: {0}")]
    InvalidResource(String),
    /// 422 `INVALID_PARAMETER`.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// 422 `REFERENCE_NOT_FOUND`.
    #[error("reference not found: {0}")]
    ReferenceNotFound(String),
    /// 500 `INTERNAL_SERVER_ERROR`.
    #[error("internal error: {0}")]
    Internal(String),
    /// 501 `NOT_IMPLEMENTED`: a FHIR resource or operation this provider does not offer.
    #[error("not implemented: {0}")]
    NotImplemented(String),
}

impl ProviderError {
    /// The HTTP status the provider answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_)
            | Self::InvalidIdentifierSystem(_)
            | Self::InvalidIdentifierValue(_)
            | Self::InvalidNhsNumber(_) => StatusCode::BAD_REQUEST,
            Self::PatientNotFound(_)
            | Self::PractitionerNotFound(_)
            | Self::OrganisationNotFound(_)
            | Self::NoRecordFound(_) => StatusCode::NOT_FOUND,
            Self::DuplicateRejected(_) | Self::VersionConflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidResource(_) | Self::InvalidParameter(_) | Self::ReferenceNotFound(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// The Spine error code (`issue.details.coding.code`).
    pub fn spine_code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) | Self::PayloadTooLarge(_) => "BAD_REQUEST",
            Self::InvalidIdentifierSystem(_) => "INVALID_IDENTIFIER_SYSTEM",
            Self::InvalidIdentifierValue(_) => "INVALID_IDENTIFIER_VALUE",
            Self::InvalidNhsNumber(_) => "INVALID_NHS_NUMBER",
            Self::PatientNotFound(_) => "PATIENT_NOT_FOUND",
            Self::PractitionerNotFound(_) => "PRACTITIONER_NOT_FOUND",
            Self::OrganisationNotFound(_) => "ORGANISATION_NOT_FOUND",
            Self::NoRecordFound(_) => "NO_RECORD_FOUND",
            Self::DuplicateRejected(_) => "DUPLICATE_REJECTED",
            Self::VersionConflict(_) => "FHIR_CONSTRAINT_VIOLATION",
            Self::UnsupportedMediaType(_) => "UNSUPPORTED_MEDIA_TYPE",
            Self::InvalidResource(_) => "INVALID_RESOURCE",
            Self::InvalidParameter(_) => "INVALID_PARAMETER",
            Self::ReferenceNotFound(_) => "REFERENCE_NOT_FOUND",
            Self::Internal(_) => "INTERNAL_SERVER_ERROR",
            Self::NotImplemented(_) => "NOT_IMPLEMENTED",
        }
    }

    /// The CodeSystem display for the Spine code (Spine-ErrorOrWarningCode-1 v1.6.0).
    pub fn spine_display(&self) -> &'static str {
        match self.spine_code() {
            "BAD_REQUEST" => "Bad request",
            "INVALID_IDENTIFIER_SYSTEM" => "Invalid identifier system",
            "INVALID_IDENTIFIER_VALUE" => "Invalid identifier value",
            "INVALID_NHS_NUMBER" => "Invalid NHS number",
            "PATIENT_NOT_FOUND" => "Patient not found",
            "PRACTITIONER_NOT_FOUND" => "Practitioner not found",
            "ORGANISATION_NOT_FOUND" => "Organisation not found",
            "NO_RECORD_FOUND" => "No record found",
            "DUPLICATE_REJECTED" => "Create would lead to creation of a duplicate resource",
            "FHIR_CONSTRAINT_VIOLATION" => "FHIR constraint violated",
            "UNSUPPORTED_MEDIA_TYPE" => "Unsupported media type",
            "INVALID_RESOURCE" => "Invalid validation of resource",
            "INVALID_PARAMETER" => "Invalid parameter",
            "REFERENCE_NOT_FOUND" => "Reference not found",
            "NOT_IMPLEMENTED" => "Not implemented",
            _ => "Unexpected internal server error",
        }
    }

    /// The FHIR STU3 issue type (`issue.code`).
    pub fn issue_type(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "invalid",
            Self::InvalidIdentifierSystem(_)
            | Self::InvalidIdentifierValue(_)
            | Self::InvalidNhsNumber(_) => "value",
            Self::PatientNotFound(_)
            | Self::PractitionerNotFound(_)
            | Self::OrganisationNotFound(_)
            | Self::NoRecordFound(_) => "not-found",
            Self::DuplicateRejected(_) => "duplicate",
            Self::VersionConflict(_) => "conflict",
            Self::PayloadTooLarge(_) => "too-long",
            Self::UnsupportedMediaType(_) | Self::NotImplemented(_) => "not-supported",
            Self::InvalidResource(_) | Self::InvalidParameter(_) | Self::ReferenceNotFound(_) => {
                "invalid"
            }
            Self::Internal(_) => "exception",
        }
    }

    /// The `diagnostics` text.
    pub fn diagnostics(&self) -> &str {
        match self {
            Self::BadRequest(d)
            | Self::InvalidIdentifierSystem(d)
            | Self::InvalidIdentifierValue(d)
            | Self::InvalidNhsNumber(d)
            | Self::PatientNotFound(d)
            | Self::PractitionerNotFound(d)
            | Self::OrganisationNotFound(d)
            | Self::NoRecordFound(d)
            | Self::DuplicateRejected(d)
            | Self::VersionConflict(d)
            | Self::PayloadTooLarge(d)
            | Self::UnsupportedMediaType(d)
            | Self::InvalidResource(d)
            | Self::InvalidParameter(d)
            | Self::ReferenceNotFound(d)
            | Self::Internal(d)
            | Self::NotImplemented(d) => d,
        }
    }

    /// The OperationOutcome resource for this error.
    pub fn operation_outcome(&self) -> Value {
        json!({
            "resourceType": "OperationOutcome",
            "meta": { "profile": [OPERATION_OUTCOME_PROFILE] },
            "issue": [{
                "severity": "error",
                "code": self.issue_type(),
                "details": {
                    "coding": [{
                        "system": SPINE_ERROR_CODE_SYSTEM,
                        "code": self.spine_code(),
                        "display": self.spine_display(),
                    }]
                },
                "diagnostics": self.diagnostics(),
            }]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<ProviderError> {
        let d = || "why".to_string();
        vec![
            ProviderError::BadRequest(d()),
            ProviderError::InvalidIdentifierSystem(d()),
            ProviderError::InvalidIdentifierValue(d()),
            ProviderError::InvalidNhsNumber(d()),
            ProviderError::PatientNotFound(d()),
            ProviderError::PractitionerNotFound(d()),
            ProviderError::OrganisationNotFound(d()),
            ProviderError::NoRecordFound(d()),
            ProviderError::DuplicateRejected(d()),
            ProviderError::VersionConflict(d()),
            ProviderError::PayloadTooLarge(d()),
            ProviderError::UnsupportedMediaType(d()),
            ProviderError::InvalidResource(d()),
            ProviderError::InvalidParameter(d()),
            ProviderError::ReferenceNotFound(d()),
            ProviderError::Internal(d()),
            ProviderError::NotImplemented(d()),
        ]
    }

    #[test]
    fn statuses_follow_the_gp_connect_error_table() {
        let expect = [
            ("BAD_REQUEST", 400),
            ("INVALID_IDENTIFIER_SYSTEM", 400),
            ("INVALID_IDENTIFIER_VALUE", 400),
            ("INVALID_NHS_NUMBER", 400),
            ("PATIENT_NOT_FOUND", 404),
            ("PRACTITIONER_NOT_FOUND", 404),
            ("ORGANISATION_NOT_FOUND", 404),
            ("NO_RECORD_FOUND", 404),
            ("DUPLICATE_REJECTED", 409),
            ("FHIR_CONSTRAINT_VIOLATION", 409),
            ("BAD_REQUEST", 413),
            ("UNSUPPORTED_MEDIA_TYPE", 415),
            ("INVALID_RESOURCE", 422),
            ("INVALID_PARAMETER", 422),
            ("REFERENCE_NOT_FOUND", 422),
            ("INTERNAL_SERVER_ERROR", 500),
            ("NOT_IMPLEMENTED", 501),
        ];
        for (error, (code, status)) in all().iter().zip(expect) {
            assert_eq!(error.spine_code(), code);
            assert_eq!(error.status().as_u16(), status, "{code}");
        }
    }

    #[test]
    fn outcome_has_the_gp_connect_shape() {
        for error in all() {
            let outcome = error.operation_outcome();
            assert_eq!(outcome["resourceType"], "OperationOutcome");
            assert_eq!(outcome["meta"]["profile"][0], OPERATION_OUTCOME_PROFILE);
            let issue = &outcome["issue"][0];
            assert_eq!(issue["severity"], "error");
            assert_eq!(issue["code"], error.issue_type());
            let coding = &issue["details"]["coding"][0];
            assert_eq!(coding["system"], SPINE_ERROR_CODE_SYSTEM);
            assert_eq!(coding["code"], error.spine_code());
            // Only INTERNAL_SERVER_ERROR may use the fallback display.
            let fallback = coding["display"] == "Unexpected internal server error";
            assert_eq!(
                fallback,
                error.spine_code() == "INTERNAL_SERVER_ERROR",
                "{error:?}"
            );
            assert_eq!(issue["diagnostics"], "why");
            assert!(super::super::prune::empty_elements(&outcome).is_empty());
        }
    }
}
