//! The provider's `CapabilityStatement` (Read metadata), shaped after the GP Connect 1.2.7
//! example: version `1.2.7`, FHIR 3.0.1, the Foundations and Appointment Management resources,
//! searches and the `gpc.registerpatient` operation this mock implements. JSON only.

use serde_json::{json, Value};

use super::appointment::APPOINTMENT_PROFILE;
use super::outcome::OPERATION_OUTCOME_PROFILE;
use super::practice::{
    LOCATION_PROFILE, ORGANIZATION_PROFILE, PATIENT_PROFILE, PRACTITIONER_PROFILE,
    SCHEDULE_PROFILE, SLOT_PROFILE,
};

/// The CapabilityStatement's `meta.versionId` (and ETag).
pub const VERSION_ID: &str = "1";

fn identifier_search(documentation: &str) -> Value {
    json!([{ "name": "identifier", "type": "token", "documentation": documentation }])
}

/// The `CapabilityStatement` resource.
pub fn capability_statement() -> Value {
    json!({
        "resourceType": "CapabilityStatement",
        "meta": { "versionId": VERSION_ID },
        "version": "1.2.7",
        "name": "GP Connect",
        "status": "active",
        "date": "2020-05-05",
        "publisher": "ssp-gateway development mock provider",
        "contact": [{ "name": "ssp-gateway maintainers" }],
        "description": "This server implements the GP Connect API version 1.2.7 (Foundations and Appointment Management) with synthetic data, for development and testing",
        "copyright": "Copyright NHS Digital 2016-20",
        "kind": "capability",
        "software": {
            "name": "ssp-gateway mock provider",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "fhirVersion": "3.0.1",
        "acceptUnknown": "both",
        "format": ["application/fhir+json"],
        "profile": [
            { "reference": PATIENT_PROFILE },
            { "reference": ORGANIZATION_PROFILE },
            { "reference": PRACTITIONER_PROFILE },
            { "reference": LOCATION_PROFILE },
            { "reference": OPERATION_OUTCOME_PROFILE },
            { "reference": APPOINTMENT_PROFILE },
            { "reference": SCHEDULE_PROFILE },
            { "reference": SLOT_PROFILE },
        ],
        "rest": [{
            "mode": "server",
            "security": { "cors": true },
            "resource": [
                {
                    "type": "Patient",
                    "interaction": [{ "code": "read" }, { "code": "search-type" }],
                    "searchParam": identifier_search("NHS Number (i.e. https://fhir.nhs.uk/Id/nhs-number|123456789)"),
                },
                {
                    "type": "Organization",
                    "interaction": [{ "code": "read" }, { "code": "search-type" }],
                    "searchParam": identifier_search("ODS Code (i.e. https://fhir.nhs.uk/Id/ods-organization-code|Y12345)"),
                },
                {
                    "type": "Practitioner",
                    "interaction": [{ "code": "read" }, { "code": "search-type" }],
                    "searchParam": identifier_search("SDS User Id (i.e. https://fhir.nhs.uk/Id/sds-user-id|999999)"),
                },
                {
                    "type": "Location",
                    "interaction": [{ "code": "read" }],
                },
                {
                    "type": "Appointment",
                    "interaction": [
                        { "code": "read" },
                        { "code": "create" },
                        { "code": "update" },
                        { "code": "search-type" },
                    ],
                    "updateCreate": false,
                    "searchParam": [{ "name": "start", "type": "date" }],
                },
                {
                    "type": "Slot",
                    "interaction": [{ "code": "search-type" }],
                    "searchInclude": [
                        "Slot:schedule",
                        "Schedule:actor:Practitioner",
                        "Schedule:actor:Location",
                        "Location:managingOrganization",
                    ],
                    "searchParam": [
                        { "name": "start", "type": "date" },
                        { "name": "end", "type": "date" },
                        { "name": "status", "type": "token" },
                        { "name": "searchFilter", "type": "token" },
                    ],
                },
            ],
            "operation": [{
                "name": "gpc.registerpatient",
                "definition": {
                    "reference": "https://fhir.nhs.uk/STU3/OperationDefinition/GPConnect-RegisterPatient-Operation-1"
                },
            }],
        }],
    })
}
