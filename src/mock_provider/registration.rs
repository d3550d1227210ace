//! The body of Register a patient (`POST Patient/$gpc.registerpatient`): a `Parameters`
//! resource whose one `registerPatient` parameter holds the `Patient` to register. Checked for
//! what GP Connect 1.2.7 requires (a valid NHS number, an official name, gender, birth date);
//! whether the patient is already registered is the store's question.

use chrono::NaiveDate;
use serde_json::{json, Map, Value};

use super::outcome::ProviderError;
use super::practice::{is_valid_nhs_number, NHS_NUMBER_SYSTEM};
use super::prune::prune_empty;
use super::store::NewPatient;

fn invalid(text: impl Into<String>) -> ProviderError {
    ProviderError::InvalidResource(text.into())
}

/// The `Patient` inside the `registerPatient` parameter, without the empty elements FHIR JSON
/// forbids (a consumer's `"telecom": []` is not kept, so it is never sent back).
fn register_patient_parameter(body: &[u8]) -> Result<Map<String, Value>, ProviderError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ProviderError::BadRequest(format!("request body is not valid JSON: {e}")))?;
    if value.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(invalid(
            "the request body must be a FHIR Parameters resource",
        ));
    }
    let parameters = value
        .get("parameter")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ProviderError::InvalidParameter("Parameters.parameter is required".into())
        })?;
    let mut patient = None;
    for parameter in parameters {
        match parameter.get("name").and_then(Value::as_str) {
            Some("registerPatient") if patient.is_none() => {
                patient = Some(
                    parameter
                        .get("resource")
                        .cloned()
                        .and_then(prune_empty)
                        .unwrap_or(Value::Null),
                );
            }
            Some("registerPatient") => {
                return Err(ProviderError::InvalidParameter(
                    "registerPatient must be given once".into(),
                ))
            }
            other => {
                return Err(ProviderError::InvalidParameter(format!(
                    "parameter {} is not part of $gpc.registerpatient",
                    other.unwrap_or("(unnamed)")
                )))
            }
        }
    }
    match patient {
        Some(Value::Object(object))
            if object.get("resourceType").and_then(Value::as_str) == Some("Patient") =>
        {
            Ok(object)
        }
        Some(_) => Err(invalid(
            "the registerPatient parameter must hold a Patient resource",
        )),
        None => Err(ProviderError::InvalidParameter(
            "the registerPatient parameter is required".into(),
        )),
    }
}

/// Checks a `$gpc.registerpatient` body.
pub fn new_patient(body: &[u8]) -> Result<NewPatient, ProviderError> {
    let patient = register_patient_parameter(body)?;
    let nhs_number = patient
        .get("identifier")
        .and_then(Value::as_array)
        .and_then(|ids| {
            ids.iter()
                .find(|id| id.get("system").and_then(Value::as_str) == Some(NHS_NUMBER_SYSTEM))
        })
        .and_then(|id| id.get("value"))
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("the Patient needs an NHS number identifier"))?;
    if !is_valid_nhs_number(nhs_number) {
        return Err(ProviderError::InvalidNhsNumber(format!(
            "{nhs_number} is not a valid NHS number"
        )));
    }
    let names = patient
        .get("name")
        .and_then(Value::as_array)
        .filter(|names| {
            names.iter().any(|n| {
                n.get("use").and_then(Value::as_str) == Some("official")
                    && n.get("family")
                        .and_then(Value::as_str)
                        .is_some_and(|f| !f.is_empty())
            })
        })
        .ok_or_else(|| invalid("the Patient needs an official name with a family name"))?;
    let gender = patient
        .get("gender")
        .and_then(Value::as_str)
        .filter(|g| matches!(*g, "male" | "female" | "other" | "unknown"))
        .ok_or_else(|| invalid("the Patient needs a gender (male, female, other or unknown)"))?;
    let birth_date = patient
        .get("birthDate")
        .and_then(Value::as_str)
        .filter(|d| d.len() == 10 && NaiveDate::parse_from_str(d, "%Y-%m-%d").is_ok())
        .ok_or_else(|| invalid("the Patient needs a birthDate (yyyy-mm-dd)"))?;
    // Pruned above: an array here has at least one element.
    let array = |field: &str| patient.get(field).filter(|v| v.is_array()).cloned();
    Ok(NewPatient {
        nhs_number: nhs_number.to_string(),
        name: json!(names),
        gender: gender.to_string(),
        birth_date: birth_date.to_string(),
        telecom: array("telecom"),
        address: array("address"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped after the specification's register patient request example.
    pub(crate) fn register_body(nhs_number: &str) -> Value {
        json!({
            "resourceType": "Parameters",
            "parameter": [{
                "name": "registerPatient",
                "resource": {
                    "resourceType": "Patient",
                    "meta": { "profile": ["https://fhir.nhs.uk/STU3/StructureDefinition/CareConnect-GPC-Patient-1"] },
                    "identifier": [{ "system": NHS_NUMBER_SYSTEM, "value": nhs_number }],
                    "name": [{ "use": "official", "family": "Dawes", "given": ["Minnie"], "prefix": ["Mrs"] }],
                    "telecom": [{ "system": "phone", "value": "01454587554", "use": "home" }],
                    "gender": "female",
                    "birthDate": "1952-05-31",
                    "address": [{ "use": "home", "type": "physical", "line": ["1 Withings Lane", "Shadwell"], "city": "Leeds", "postalCode": "LS18 1AE" }]
                }
            }]
        })
    }

    fn parse(v: &Value) -> Result<NewPatient, ProviderError> {
        new_patient(&serde_json::to_vec(v).expect("test JSON"))
    }

    #[test]
    fn the_specification_shape_is_accepted() {
        let patient = parse(&register_body("9000000033")).expect("valid");
        assert_eq!(patient.nhs_number, "9000000033");
        assert_eq!(patient.gender, "female");
        assert_eq!(
            patient.address.expect("address kept")[0]["postalCode"],
            "LS18 1AE"
        );
    }

    #[test]
    fn broken_bodies_get_the_right_codes() {
        let mut wrong_type = register_body("9000000033");
        wrong_type["resourceType"] = json!("Patient");
        assert_eq!(
            parse(&wrong_type).unwrap_err().spine_code(),
            "INVALID_RESOURCE"
        );
        let mut bad_nhs = register_body("9000000034");
        assert_eq!(
            parse(&bad_nhs).unwrap_err().spine_code(),
            "INVALID_NHS_NUMBER"
        );
        bad_nhs["parameter"][0]["name"] = json!("registerPerson");
        assert_eq!(
            parse(&bad_nhs).unwrap_err().spine_code(),
            "INVALID_PARAMETER"
        );
        let mut no_birth = register_body("9000000033");
        no_birth["parameter"][0]["resource"]["birthDate"] = json!("31/05/1952");
        assert_eq!(
            parse(&no_birth).unwrap_err().spine_code(),
            "INVALID_RESOURCE"
        );
        let mut no_name = register_body("9000000033");
        no_name["parameter"][0]["resource"]["name"][0]["use"] = json!("usual");
        assert_eq!(
            parse(&no_name).unwrap_err().spine_code(),
            "INVALID_RESOURCE"
        );
        let mut twice = register_body("9000000033");
        let again = twice["parameter"][0].clone();
        twice["parameter"]
            .as_array_mut()
            .expect("array")
            .push(again);
        assert_eq!(parse(&twice).unwrap_err().spine_code(), "INVALID_PARAMETER");
        assert_eq!(
            new_patient(b"not json").unwrap_err().spine_code(),
            "BAD_REQUEST"
        );
    }
}
