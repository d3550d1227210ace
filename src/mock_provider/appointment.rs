//! Appointments: the stored record, its `GPConnect-Appointment-1` rendering, and the checks on
//! the bodies consumers send to book, amend and cancel, as far as they can be made without the
//! practice's data (shape, status, field lengths, the booking organisation). Checks against
//! slots, patients and the stored version live in `store`.

use chrono::{DateTime, FixedOffset};
use serde_json::{json, Map, Value};

use super::calendar::fhir_date_time;
use super::outcome::ProviderError;
use super::practice::DeliveryChannel;
use super::prune::prune_empty;

pub const APPOINTMENT_PROFILE: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/GPConnect-Appointment-1";
pub const BOOKING_ORGANISATION_URL: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/Extension-GPConnect-BookingOrganisation-1";
pub const CANCELLATION_REASON_URL: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/Extension-GPConnect-AppointmentCancellationReason-1";

/// Longest `Appointment.description` GP Connect allows.
pub const MAX_DESCRIPTION_CHARS: usize = 100;
/// Longest `Appointment.comment` GP Connect allows.
pub const MAX_COMMENT_CHARS: usize = 500;

/// A booked (or since cancelled) appointment as the practice holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Appointment {
    pub id: String,
    pub version: u64,
    /// `Some(reason)` once cancelled.
    pub cancellation_reason: Option<String>,
    pub slot_ids: Vec<String>,
    pub patient_id: String,
    pub location_id: String,
    pub practitioner_id: String,
    pub start: DateTime<FixedOffset>,
    pub end: DateTime<FixedOffset>,
    pub description: Option<String>,
    pub comment: Option<String>,
    pub created: String,
    pub last_updated: DateTime<FixedOffset>,
    /// The contained booking `Organization` (its id is always `1`).
    pub booking_organization: Value,
    pub service_category: String,
    pub service_type: String,
    pub channel: DeliveryChannel,
    pub role_extension: Value,
}

impl Appointment {
    /// The current `versionId` (also the ETag).
    pub fn version_id(&self) -> String {
        self.version.to_string()
    }

    /// The `Appointment` resource.
    pub fn to_fhir(&self) -> Value {
        let mut extension = vec![json!({
            "url": BOOKING_ORGANISATION_URL,
            "valueReference": { "reference": "#1" },
        })];
        if let Some(reason) = &self.cancellation_reason {
            extension.push(json!({ "url": CANCELLATION_REASON_URL, "valueString": reason }));
        }
        extension.push(self.role_extension.clone());
        extension.push(self.channel.extension());
        let mut resource = json!({
            "resourceType": "Appointment",
            "id": self.id,
            "meta": {
                "versionId": self.version_id(),
                "lastUpdated": fhir_date_time(&self.last_updated),
                "profile": [APPOINTMENT_PROFILE],
            },
            "contained": [self.booking_organization],
            "extension": extension,
            "status": if self.cancellation_reason.is_some() { "cancelled" } else { "booked" },
            "serviceCategory": { "text": self.service_category },
            "serviceType": [{ "text": self.service_type }],
        });
        let Some(object) = resource.as_object_mut() else {
            return resource;
        };
        if let Some(description) = &self.description {
            object.insert("description".into(), json!(description));
        }
        object.insert("start".into(), json!(fhir_date_time(&self.start)));
        object.insert("end".into(), json!(fhir_date_time(&self.end)));
        object.insert(
            "slot".into(),
            Value::Array(
                self.slot_ids
                    .iter()
                    .map(|id| json!({ "reference": format!("Slot/{id}") }))
                    .collect(),
            ),
        );
        object.insert("created".into(), json!(self.created));
        if let Some(comment) = &self.comment {
            object.insert("comment".into(), json!(comment));
        }
        object.insert(
            "participant".into(),
            json!([
                { "actor": { "reference": format!("Patient/{}", self.patient_id) }, "status": "accepted" },
                { "actor": { "reference": format!("Location/{}", self.location_id) }, "status": "accepted" },
                { "actor": { "reference": format!("Practitioner/{}", self.practitioner_id) }, "status": "accepted" },
            ]),
        );
        resource
    }
}

/// What a consumer asked to book, checked for shape.
#[derive(Debug, Clone, PartialEq)]
pub struct BookingRequest {
    pub slot_ids: Vec<String>,
    pub patient_id: String,
    /// Other participants named (`Location/..`, `Practitioner/..`): must exist.
    pub other_actors: Vec<(String, String)>,
    pub start: DateTime<FixedOffset>,
    pub end: DateTime<FixedOffset>,
    pub description: Option<String>,
    pub comment: Option<String>,
    pub created: Option<String>,
    pub booking_organization: Value,
}

/// What a consumer sent to amend or cancel, checked for shape.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRequest {
    pub status: String,
    pub slot_ids: Vec<String>,
    pub patient_id: Option<String>,
    pub start: DateTime<FixedOffset>,
    pub end: DateTime<FixedOffset>,
    pub description: Option<String>,
    pub comment: Option<String>,
    pub cancellation_reason: Option<String>,
}

fn invalid(text: impl Into<String>) -> ProviderError {
    ProviderError::InvalidResource(text.into())
}

/// The JSON object of an `Appointment` body (`400` if it is not JSON at all).
pub fn appointment_object(body: &[u8]) -> Result<Map<String, Value>, ProviderError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ProviderError::BadRequest(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(invalid("request body must be a FHIR Appointment resource"));
    };
    match object.get("resourceType").and_then(Value::as_str) {
        Some("Appointment") => Ok(object),
        Some(other) => Err(invalid(format!(
            "resourceType must be Appointment, not {other}"
        ))),
        None => Err(invalid("resourceType is missing")),
    }
}

/// An optional string element; an empty one counts as absent (FHIR JSON has no empty strings,
/// and the appointment is rendered without it).
fn optional_text(
    object: &Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<Option<String>, ProviderError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.is_empty() => Ok(None),
        Some(Value::String(text)) if text.chars().count() <= max => Ok(Some(text.clone())),
        Some(Value::String(_)) => Err(invalid(format!(
            "Appointment.{field} is longer than {max} characters"
        ))),
        Some(_) => Err(invalid(format!("Appointment.{field} must be a string"))),
    }
}

fn instant(
    object: &Map<String, Value>,
    field: &str,
) -> Result<DateTime<FixedOffset>, ProviderError> {
    let text = object
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("Appointment.{field} is required")))?;
    DateTime::parse_from_rfc3339(text)
        .map_err(|_| invalid(format!("Appointment.{field} {text} is not a FHIR instant")))
}

/// The id in a relative reference `Type/id`.
fn reference_id<'a>(reference: &'a str, resource_type: &str) -> Option<&'a str> {
    let id = reference.strip_prefix(resource_type)?.strip_prefix('/')?;
    super::is_fhir_id(id).then_some(id)
}

fn slot_ids(object: &Map<String, Value>) -> Result<Vec<String>, ProviderError> {
    let slots = object
        .get("slot")
        .and_then(Value::as_array)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("Appointment.slot must reference at least one Slot"))?;
    slots
        .iter()
        .map(|slot| {
            let reference = slot
                .get("reference")
                .and_then(Value::as_str)
                .unwrap_or_default();
            reference_id(reference, "Slot")
                .map(str::to_string)
                .ok_or_else(|| {
                    invalid(format!(
                        "Appointment.slot reference {reference:?} is not Slot/<id>"
                    ))
                })
        })
        .collect()
}

/// The participants' actor references, split as `(type, id)`.
fn actors(object: &Map<String, Value>) -> Result<Vec<(String, String)>, ProviderError> {
    let participants = object
        .get("participant")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("Appointment.participant is required"))?;
    participants
        .iter()
        .map(|participant| {
            let reference = participant
                .pointer("/actor/reference")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("every Appointment.participant needs actor.reference"))?;
            let (kind, id) = reference
                .split_once('/')
                .filter(|(kind, id)| {
                    matches!(*kind, "Patient" | "Location" | "Practitioner") && super::is_fhir_id(id)
                })
                .ok_or_else(|| {
                    invalid(format!(
                        "participant actor {reference:?} must be Patient/, Location/ or Practitioner/<id>"
                    ))
                })?;
            Ok((kind.to_string(), id.to_string()))
        })
        .collect()
}

fn single_patient(actors: &[(String, String)]) -> Result<String, ProviderError> {
    let mut patients = actors.iter().filter(|(kind, _)| kind == "Patient");
    match (patients.next(), patients.next()) {
        (Some((_, id)), None) => Ok(id.clone()),
        _ => Err(invalid(
            "Appointment.participant must include exactly one Patient",
        )),
    }
}

/// The extension with `url`, if any.
fn extension<'a>(object: &'a Map<String, Value>, url: &str) -> Option<&'a Value> {
    object
        .get("extension")
        .and_then(Value::as_array)?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url))
}

/// The contained `Organization` the booking-organisation extension points at, without empty
/// elements and re-identified as `#1` for storage.
fn booking_organization(object: &Map<String, Value>) -> Result<Value, ProviderError> {
    let reference = extension(object, BOOKING_ORGANISATION_URL)
        .and_then(|e| e.pointer("/valueReference/reference"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid("the Extension-GPConnect-BookingOrganisation-1 extension is required")
        })?;
    let local_id = reference.strip_prefix('#').ok_or_else(|| {
        invalid("the booking organisation must reference a contained Organization (#id)")
    })?;
    let organization = object
        .get("contained")
        .and_then(Value::as_array)
        .and_then(|contained| {
            contained.iter().find(|r| {
                r.get("resourceType").and_then(Value::as_str) == Some("Organization")
                    && r.get("id").and_then(Value::as_str) == Some(local_id)
            })
        })
        .cloned()
        .and_then(prune_empty)
        .ok_or_else(|| {
            invalid(format!(
                "the booking organisation #{local_id} is not a contained Organization"
            ))
        })?;
    let has_ods = organization
        .get("identifier")
        .and_then(Value::as_array)
        .is_some_and(|ids| {
            ids.iter().any(|id| {
                id.get("system").and_then(Value::as_str) == Some(super::practice::ODS_SYSTEM)
                    && id
                        .get("value")
                        .and_then(Value::as_str)
                        .is_some_and(|v| !v.is_empty())
            })
        });
    if !has_ods || organization.get("name").and_then(Value::as_str).is_none() {
        return Err(invalid(
            "the booking organisation needs an ODS code identifier and a name",
        ));
    }
    let mut organization = organization;
    if let Some(object) = organization.as_object_mut() {
        object.insert("id".into(), json!("1"));
    }
    Ok(organization)
}

/// Checks a Book Appointment body.
pub fn booking_request(body: &[u8]) -> Result<BookingRequest, ProviderError> {
    let object = appointment_object(body)?;
    match object.get("status").and_then(Value::as_str) {
        Some("booked") => {}
        other => {
            return Err(invalid(format!(
                "Appointment.status must be booked, not {}",
                other.unwrap_or("missing")
            )))
        }
    }
    if extension(&object, CANCELLATION_REASON_URL).is_some() {
        return Err(invalid(
            "a new appointment cannot carry a cancellation reason",
        ));
    }
    let actors = actors(&object)?;
    let patient_id = single_patient(&actors)?;
    Ok(BookingRequest {
        slot_ids: slot_ids(&object)?,
        patient_id,
        other_actors: actors
            .into_iter()
            .filter(|(kind, _)| kind != "Patient")
            .collect(),
        start: instant(&object, "start")?,
        end: instant(&object, "end")?,
        description: optional_text(&object, "description", MAX_DESCRIPTION_CHARS)?,
        comment: optional_text(&object, "comment", MAX_COMMENT_CHARS)?,
        created: object
            .get("created")
            .and_then(Value::as_str)
            .filter(|c| DateTime::parse_from_rfc3339(c).is_ok())
            .map(str::to_string),
        booking_organization: booking_organization(&object)?,
    })
}

/// Checks an Amend or Cancel body for `PUT Appointment/{id}`: the body's id must be the path's.
pub fn update_request(body: &[u8], path_id: &str) -> Result<UpdateRequest, ProviderError> {
    let object = appointment_object(body)?;
    match object.get("id").and_then(Value::as_str) {
        Some(id) if id == path_id => {}
        Some(id) => {
            return Err(ProviderError::BadRequest(format!(
                "Appointment.id {id} does not match the URL's id {path_id}"
            )))
        }
        None => {
            return Err(ProviderError::BadRequest(
                "Appointment.id is required on update".into(),
            ))
        }
    }
    let actors = actors(&object)?;
    let patient_id = actors
        .iter()
        .find(|(kind, _)| kind == "Patient")
        .map(|(_, id)| id.clone());
    Ok(UpdateRequest {
        status: object
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        slot_ids: slot_ids(&object)?,
        patient_id,
        start: instant(&object, "start")?,
        end: instant(&object, "end")?,
        description: optional_text(&object, "description", MAX_DESCRIPTION_CHARS)?,
        comment: optional_text(&object, "comment", MAX_COMMENT_CHARS)?,
        cancellation_reason: extension(&object, CANCELLATION_REASON_URL)
            .and_then(|e| e.get("valueString"))
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorded demonstrator create body (fixtures/appointment-create-request…).
    pub(crate) fn recorded_create_body() -> Value {
        serde_json::from_str(include_str!(
            "fixtures/appointment-create-request.demonstrator-1.2.7-recorded.json"
        ))
        .expect("the recorded fixture is valid JSON")
    }

    fn bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).expect("test JSON serialises")
    }

    #[test]
    fn the_recorded_create_body_is_accepted() {
        let request = booking_request(&bytes(&recorded_create_body())).expect("valid body");
        assert_eq!(request.slot_ids, ["16584"]);
        assert_eq!(request.patient_id, "6");
        assert_eq!(
            request.other_actors,
            [("Location".to_string(), "16".to_string())]
        );
        assert_eq!(request.description.as_deref(), Some("Default Description"));
        assert_eq!(
            request.created.as_deref(),
            Some("2025-05-20T09:37:38.216+01:00")
        );
        assert_eq!(request.booking_organization["name"], "Test Suite Validator");
    }

    fn rejected(mutate: impl FnOnce(&mut Value)) -> ProviderError {
        let mut body = recorded_create_body();
        mutate(&mut body);
        booking_request(&bytes(&body)).unwrap_err()
    }

    #[test]
    fn invalid_booking_bodies_are_invalid_resources() {
        type Mutation = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<Mutation> = vec![
            Box::new(|b| b["resourceType"] = json!("Patient")),
            Box::new(|b| b["status"] = json!("proposed")),
            Box::new(|b| b["description"] = json!("x".repeat(101))),
            Box::new(|b| b["comment"] = json!("x".repeat(501))),
            Box::new(|b| b["slot"] = json!([])),
            Box::new(|b| b["slot"] = json!([{ "reference": "Schedule/1" }])),
            Box::new(|b| b["participant"][1]["actor"]["reference"] = json!("Patient/7")),
            Box::new(|b| b["participant"][0]["actor"]["reference"] = json!("Device/1")),
            Box::new(|b| b["start"] = json!("22/05/2025 10:40")),
            Box::new(|b| b["extension"] = json!([])),
            Box::new(|b| b["contained"][0]["id"] = json!("2")),
            Box::new(|b| b["contained"][0]["identifier"] = json!([])),
        ];
        for mutate in cases {
            let err = rejected(mutate);
            assert_eq!(err.spine_code(), "INVALID_RESOURCE", "{err:?}");
        }
        // Boundaries are inclusive.
        let mut body = recorded_create_body();
        body["description"] = json!("é".repeat(100));
        body["comment"] = json!("x".repeat(500));
        assert!(booking_request(&bytes(&body)).is_ok());
        // Not JSON at all is a bad request.
        assert_eq!(
            booking_request(b"<Appointment/>").unwrap_err().spine_code(),
            "BAD_REQUEST"
        );
    }

    #[test]
    fn update_body_id_must_match_the_url() {
        let mut body = recorded_create_body();
        body["id"] = json!("5");
        assert!(update_request(&bytes(&body), "5").is_ok());
        let err = update_request(&bytes(&body), "6").unwrap_err();
        assert_eq!(err.spine_code(), "BAD_REQUEST");
        body.as_object_mut().expect("object").remove("id");
        assert!(update_request(&bytes(&body), "5").is_err());
    }

    #[test]
    fn cancellation_reason_is_read_from_its_extension() {
        let mut body = recorded_create_body();
        body["id"] = json!("5");
        body["status"] = json!("cancelled");
        body["extension"]
            .as_array_mut()
            .expect("extensions")
            .push(json!({ "url": CANCELLATION_REASON_URL, "valueString": "Patient is better" }));
        let request = update_request(&bytes(&body), "5").expect("valid");
        assert_eq!(request.status, "cancelled");
        assert_eq!(
            request.cancellation_reason.as_deref(),
            Some("Patient is better")
        );
    }
}
