//! The development practice's fixed records (organisation, sites, clinicians, rota) and the
//! seeded patients, with their GP Connect 1.2.7 FHIR renderings (CareConnect-GPC and
//! GPConnect profiles, shaped after the specification's examples and the demonstrator's
//! recorded responses). All names, numbers and addresses are synthetic test data.

use chrono::{DateTime, Duration, FixedOffset, NaiveDate, NaiveTime};
use serde_json::{json, Value};

use super::calendar::{fhir_date, fhir_date_time, london_local};

pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// The booking organisation type CodeSystem of the free-slot search's `searchFilter`.
pub const ORGANISATION_TYPE_SYSTEM: &str =
    "https://fhir.nhs.uk/STU3/CodeSystem/GPConnect-OrganisationType-1";
pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
pub const SDS_USER_SYSTEM: &str = "https://fhir.nhs.uk/Id/sds-user-id";
pub const SDS_ROLE_PROFILE_SYSTEM: &str = "https://fhir.nhs.uk/Id/sds-role-profile-id";

const SD: &str = "https://fhir.nhs.uk/STU3/StructureDefinition/";
pub const PATIENT_PROFILE: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/CareConnect-GPC-Patient-1";
pub const PRACTITIONER_PROFILE: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/CareConnect-GPC-Practitioner-1";
pub const ORGANIZATION_PROFILE: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/CareConnect-GPC-Organization-1";
pub const LOCATION_PROFILE: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/CareConnect-GPC-Location-1";
pub const SCHEDULE_PROFILE: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/GPConnect-Schedule-1";
pub const SLOT_PROFILE: &str = "https://fhir.nhs.uk/STU3/StructureDefinition/GPConnect-Slot-1";
pub const DELIVERY_CHANNEL_URL: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/Extension-GPConnect-DeliveryChannel-2";
pub const PRACTITIONER_ROLE_URL: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/Extension-GPConnect-PractitionerRole-1";
const JOB_ROLE_SYSTEM: &str = "https://fhir.nhs.uk/STU3/CodeSystem/CareConnect-SDSJobRoleName-1";

/// How the patient and clinician meet (`Extension-GPConnect-DeliveryChannel-2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryChannel {
    InPerson,
    Telephone,
    Video,
}

impl DeliveryChannel {
    /// The extension's `valueCode`.
    pub fn code(self) -> &'static str {
        match self {
            Self::InPerson => "In-person",
            Self::Telephone => "Telephone",
            Self::Video => "Video",
        }
    }

    /// The extension element.
    pub fn extension(self) -> Value {
        json!({ "url": DELIVERY_CHANNEL_URL, "valueCode": self.code() })
    }
}

/// The practice (`Organization`).
#[derive(Debug, Clone)]
pub struct Organization {
    pub id: &'static str,
    pub ods_code: String,
    pub name: &'static str,
}

/// A surgery site (`Location`).
#[derive(Debug, Clone)]
pub struct Location {
    pub id: &'static str,
    pub name: &'static str,
    pub lines: [&'static str; 2],
    pub city: &'static str,
    pub postcode: &'static str,
    pub phone: &'static str,
}

/// A clinician (`Practitioner`).
#[derive(Debug, Clone)]
pub struct Practitioner {
    pub id: &'static str,
    pub sds_user_id: &'static str,
    pub sds_role_profile_id: &'static str,
    pub prefix: &'static str,
    pub given: &'static str,
    pub family: &'static str,
    pub gender: &'static str,
}

/// One session of a schedule's working day, with the kind of slots it offers.
#[derive(Debug, Clone)]
pub struct Session {
    pub start: (u32, u32),
    pub end: (u32, u32),
    pub service_type: &'static str,
    pub channel: DeliveryChannel,
}

/// A schedule's booking embargo (GP Connect slot availability management): its slots are
/// offered only to booking organisations of one of these types (GPConnect-OrganisationType-1
/// codes) or with one of these ODS codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookableBy {
    pub organisation_types: &'static [&'static str],
    pub ods_codes: &'static [&'static str],
}

/// A clinician's diary at a site (`Schedule`), Monday to Friday.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub id: &'static str,
    /// `None`: open to every booking organisation.
    pub bookable_by: Option<BookableBy>,
    pub practitioner: &'static str,
    pub location: &'static str,
    pub service_category: &'static str,
    pub role_code: &'static str,
    pub role_display: &'static str,
    pub sessions: Vec<Session>,
}

/// Length of every slot.
pub const SLOT_MINUTES: i64 = 10;

/// A patient's registration at the practice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// Regular (GMS) registration since the date.
    Regular { since: NaiveDate },
    /// Temporary registration made through `$gpc.registerpatient`.
    Temporary {
        start: DateTime<FixedOffset>,
        end: DateTime<FixedOffset>,
    },
}

/// A patient (`Patient`). Demographics the consumer sent at registration are kept as JSON.
#[derive(Debug, Clone)]
pub struct Patient {
    pub id: String,
    pub nhs_number: String,
    pub name: Value,
    pub gender: String,
    pub birth_date: String,
    /// Absent rather than empty: FHIR JSON has no empty arrays.
    pub telecom: Option<Value>,
    pub address: Option<Value>,
    pub registration: Registration,
    pub usual_gp: Option<&'static str>,
}

/// The practice's fixed records.
#[derive(Debug, Clone)]
pub struct Practice {
    pub organization: Organization,
    pub locations: Vec<Location>,
    pub practitioners: Vec<Practitioner>,
    pub schedules: Vec<Schedule>,
}

impl Practice {
    /// The development practice with ODS code `ods_code`.
    pub fn seed(ods_code: &str) -> Self {
        let session = |start, end, service_type, channel| Session {
            start,
            end,
            service_type,
            channel,
        };
        Self {
            organization: Organization {
                id: "1",
                ods_code: ods_code.to_string(),
                name: "Riverside Medical Practice",
            },
            locations: vec![
                Location {
                    id: "1",
                    name: "Riverside Medical Practice - Main Surgery",
                    lines: ["1 Riverside Way", "Kirkstall"],
                    city: "Leeds",
                    postcode: "LS5 3AA",
                    phone: "01134960000",
                },
                Location {
                    id: "2",
                    name: "Riverside Medical Practice - Horsforth Branch",
                    lines: ["22 Town Street", "Horsforth"],
                    city: "Leeds",
                    postcode: "LS18 4AA",
                    phone: "01134960001",
                },
            ],
            practitioners: vec![
                Practitioner {
                    id: "1",
                    sds_user_id: "555011111001",
                    sds_role_profile_id: "555021111001",
                    prefix: "Dr",
                    given: "Sarah",
                    family: "Black",
                    gender: "female",
                },
                Practitioner {
                    id: "2",
                    sds_user_id: "555011111002",
                    sds_role_profile_id: "555021111002",
                    prefix: "Dr",
                    given: "Amir",
                    family: "Patel",
                    gender: "male",
                },
                Practitioner {
                    id: "3",
                    sds_user_id: "555011111003",
                    sds_role_profile_id: "555021111003",
                    prefix: "Mrs",
                    given: "Joan",
                    family: "Okafor",
                    gender: "female",
                },
            ],
            schedules: vec![
                Schedule {
                    id: "1",
                    bookable_by: None,
                    practitioner: "1",
                    location: "1",
                    service_category: "General practice",
                    role_code: "R0260",
                    role_display: "General Medical Practitioner",
                    sessions: vec![
                        session(
                            (8, 0),
                            (12, 30),
                            "General GP appointment",
                            DeliveryChannel::InPerson,
                        ),
                        session(
                            (13, 30),
                            (18, 0),
                            "General GP appointment",
                            DeliveryChannel::InPerson,
                        ),
                    ],
                },
                Schedule {
                    id: "2",
                    bookable_by: None,
                    practitioner: "2",
                    location: "1",
                    service_category: "Remote consultations",
                    role_code: "R0260",
                    role_display: "General Medical Practitioner",
                    sessions: vec![
                        session(
                            (8, 0),
                            (12, 30),
                            "Telephone consultation",
                            DeliveryChannel::Telephone,
                        ),
                        session(
                            (13, 30),
                            (18, 0),
                            "Video consultation",
                            DeliveryChannel::Video,
                        ),
                    ],
                },
                // The nurse clinic is kept for GP practices and one named partner.
                Schedule {
                    id: "3",
                    bookable_by: Some(BookableBy {
                        organisation_types: &["gp-practice"],
                        ods_codes: &["A20047"],
                    }),
                    practitioner: "3",
                    location: "2",
                    service_category: "Nurse clinic",
                    role_code: "R0620",
                    role_display: "Staff Nurse",
                    sessions: vec![
                        session(
                            (8, 30),
                            (12, 30),
                            "Practice nurse appointment",
                            DeliveryChannel::InPerson,
                        ),
                        session(
                            (13, 30),
                            (17, 0),
                            "Practice nurse appointment",
                            DeliveryChannel::InPerson,
                        ),
                    ],
                },
            ],
        }
    }

    pub fn location(&self, id: &str) -> Option<&Location> {
        self.locations.iter().find(|l| l.id == id)
    }

    pub fn practitioner(&self, id: &str) -> Option<&Practitioner> {
        self.practitioners.iter().find(|p| p.id == id)
    }

    pub fn schedule(&self, id: &str) -> Option<&Schedule> {
        self.schedules.iter().find(|s| s.id == id)
    }

    /// The seeded patients, registered regularly with this practice.
    pub fn seed_patients() -> Vec<Patient> {
        [
            SeedPatient {
                id: "1",
                nhs_number: "9000000009",
                prefix: "Ms",
                given: "Amelia",
                family: "Watson",
                gender: "female",
                birth_date: "1985-03-14",
                street: "4 Abbey Road",
                postcode: "LS5 3HP",
                phone: "01134960101",
                usual_gp: "1",
                registered: (2012, 9, 3),
            },
            SeedPatient {
                id: "2",
                nhs_number: "9000000017",
                prefix: "Mr",
                given: "Oliver",
                family: "Hughes",
                gender: "male",
                birth_date: "1962-11-02",
                street: "17 Bridge Road",
                postcode: "LS5 3BW",
                phone: "01134960102",
                usual_gp: "2",
                registered: (1998, 1, 12),
            },
            SeedPatient {
                id: "3",
                nhs_number: "9000000025",
                prefix: "Miss",
                given: "Priya",
                family: "Sharma",
                gender: "female",
                birth_date: "2001-07-23",
                street: "9 Canal Walk",
                postcode: "LS5 3NN",
                phone: "01134960103",
                usual_gp: "1",
                registered: (2019, 10, 28),
            },
        ]
        .into_iter()
        .map(SeedPatient::into_patient)
        .collect()
    }
}

/// The demographics of a seeded patient.
struct SeedPatient {
    id: &'static str,
    nhs_number: &'static str,
    prefix: &'static str,
    given: &'static str,
    family: &'static str,
    gender: &'static str,
    birth_date: &'static str,
    street: &'static str,
    postcode: &'static str,
    phone: &'static str,
    usual_gp: &'static str,
    registered: (i32, u32, u32),
}

impl SeedPatient {
    fn into_patient(self) -> Patient {
        let (year, month, day) = self.registered;
        Patient {
            id: self.id.to_string(),
            nhs_number: self.nhs_number.to_string(),
            name: json!([{
                "use": "official",
                "text": format!("{} {} ({})", self.family.to_uppercase(), self.given, self.prefix),
                "family": self.family,
                "given": [self.given],
                "prefix": [self.prefix],
            }]),
            gender: self.gender.to_string(),
            birth_date: self.birth_date.to_string(),
            telecom: Some(json!([{ "system": "phone", "value": self.phone, "use": "home" }])),
            address: Some(json!([{
                "use": "home",
                "type": "physical",
                "line": [self.street, "Kirkstall"],
                "city": "Leeds",
                "district": "West Yorkshire",
                "postalCode": self.postcode,
            }])),
            registration: Registration::Regular {
                since: NaiveDate::from_ymd_opt(year, month, day).unwrap_or_default(),
            },
            usual_gp: Some(self.usual_gp),
        }
    }
}

/// Every slot of a schedule on `date` (one day), in order: `(start, end, session)`.
pub fn day_slots(
    schedule: &Schedule,
    date: NaiveDate,
) -> Vec<(DateTime<FixedOffset>, DateTime<FixedOffset>, &Session)> {
    let mut out = Vec::new();
    for session in &schedule.sessions {
        let (Some(from), Some(to)) = (
            NaiveTime::from_hms_opt(session.start.0, session.start.1, 0),
            NaiveTime::from_hms_opt(session.end.0, session.end.1, 0),
        ) else {
            continue;
        };
        let mut at = london_local(date, from);
        let until = london_local(date, to);
        while at + Duration::minutes(SLOT_MINUTES) <= until {
            let end = at + Duration::minutes(SLOT_MINUTES);
            out.push((at, end, session));
            at = end;
        }
    }
    out
}

/// The stable id of the slot of `schedule` starting at `start` (`<schedule>-<yyyymmdd>-<hhmm>`,
/// London time): the same slot keeps its id across restarts.
pub fn slot_id(schedule: &Schedule, start: &DateTime<FixedOffset>) -> String {
    format!("{}-{}", schedule.id, start.format("%Y%m%d-%H%M"))
}

fn meta(version: &str, profile: &str) -> Value {
    json!({ "versionId": version, "profile": [profile] })
}

impl Organization {
    /// The `Organization` resource.
    pub fn to_fhir(&self, practice: &Practice) -> Value {
        let mut organization = json!({
            "resourceType": "Organization",
            "id": self.id,
            "meta": meta("1", ORGANIZATION_PROFILE),
            "identifier": [{ "system": ODS_SYSTEM, "value": self.ods_code }],
            "name": self.name,
        });
        // The practice is reached at its main surgery.
        if let (Some(main), Some(object)) =
            (practice.locations.first(), organization.as_object_mut())
        {
            object.insert(
                "telecom".into(),
                json!([{ "system": "phone", "value": main.phone, "use": "work" }]),
            );
            object.insert(
                "address".into(),
                json!([{
                    "use": "work",
                    "line": main.lines,
                    "city": main.city,
                    "district": "West Yorkshire",
                    "postalCode": main.postcode,
                }]),
            );
        }
        organization
    }
}

impl Location {
    /// The `Location` resource.
    pub fn to_fhir(&self, organization: &Organization) -> Value {
        json!({
            "resourceType": "Location",
            "id": self.id,
            "meta": meta("1", LOCATION_PROFILE),
            "status": "active",
            "name": self.name,
            "telecom": [{ "system": "phone", "value": self.phone, "use": "work" }],
            "address": {
                "use": "work",
                "line": self.lines,
                "city": self.city,
                "district": "West Yorkshire",
                "postalCode": self.postcode,
                "country": "UK",
            },
            "managingOrganization": { "reference": format!("Organization/{}", organization.id) },
        })
    }
}

impl Practitioner {
    /// The `Practitioner` resource.
    pub fn to_fhir(&self) -> Value {
        json!({
            "resourceType": "Practitioner",
            "id": self.id,
            "meta": meta("1", PRACTITIONER_PROFILE),
            "identifier": [
                { "system": SDS_USER_SYSTEM, "value": self.sds_user_id },
                { "system": SDS_ROLE_PROFILE_SYSTEM, "value": self.sds_role_profile_id },
            ],
            "name": [{
                "use": "usual",
                "family": self.family,
                "given": [self.given],
                "prefix": [self.prefix],
            }],
            "gender": self.gender,
        })
    }
}

impl Schedule {
    /// The `Extension-GPConnect-PractitionerRole-1` element.
    pub fn role_extension(&self) -> Value {
        json!({
            "url": PRACTITIONER_ROLE_URL,
            "valueCodeableConcept": {
                "coding": [{
                    "system": JOB_ROLE_SYSTEM,
                    "code": self.role_code,
                    "display": self.role_display,
                }]
            }
        })
    }

    /// The `Schedule` resource; the planning horizon is the generated diary.
    pub fn to_fhir(&self, horizon: (NaiveDate, NaiveDate)) -> Value {
        let start = london_local(horizon.0, NaiveTime::MIN);
        let end = london_local(horizon.1, NaiveTime::MIN);
        json!({
            "resourceType": "Schedule",
            "id": self.id,
            "meta": meta("1", SCHEDULE_PROFILE),
            "extension": [self.role_extension()],
            "serviceCategory": { "text": self.service_category },
            "actor": [
                { "reference": format!("Practitioner/{}", self.practitioner) },
                { "reference": format!("Location/{}", self.location) },
            ],
            "planningHorizon": {
                "start": fhir_date_time(&start),
                "end": fhir_date_time(&end),
            },
        })
    }
}

impl Patient {
    /// The NHS number verification status extension (`01` number present and verified).
    fn nhs_number_identifier(&self) -> Value {
        json!({
            "extension": [{
                "url": format!("{SD}Extension-CareConnect-GPC-NHSNumberVerificationStatus-1"),
                "valueCodeableConcept": {
                    "coding": [{
                        "system": "https://fhir.nhs.uk/STU3/CodeSystem/CareConnect-NHSNumberVerificationStatus-1",
                        "code": "01",
                        "display": "Number present and verified",
                    }]
                }
            }],
            "system": NHS_NUMBER_SYSTEM,
            "value": self.nhs_number,
        })
    }

    /// `Extension-CareConnect-GPC-RegistrationDetails-1`.
    fn registration_extension(&self) -> Value {
        let (period, code, display) = match &self.registration {
            Registration::Regular { since } => {
                (json!({ "start": fhir_date(*since) }), "R", "Regular")
            }
            Registration::Temporary { start, end } => (
                json!({ "start": fhir_date_time(start), "end": fhir_date_time(end) }),
                "T",
                "Temporary",
            ),
        };
        json!({
            "url": format!("{SD}Extension-CareConnect-GPC-RegistrationDetails-1"),
            "extension": [
                { "url": "registrationPeriod", "valuePeriod": period },
                {
                    "url": "registrationType",
                    "valueCodeableConcept": {
                        "coding": [{
                            "system": "https://fhir.nhs.uk/STU3/CodeSystem/CareConnect-RegistrationType-1",
                            "code": code,
                            "display": display,
                        }]
                    }
                },
                { "url": "preferredBranchSurgery", "valueReference": { "reference": "Location/1" } },
            ]
        })
    }

    /// The `Patient` resource.
    pub fn to_fhir(&self, organization: &Organization) -> Value {
        let mut patient = json!({
            "resourceType": "Patient",
            "id": self.id,
            "meta": meta("1", PATIENT_PROFILE),
            "extension": [self.registration_extension()],
            "identifier": [self.nhs_number_identifier()],
            "active": true,
            "name": self.name,
            "gender": self.gender,
            "birthDate": self.birth_date,
            "managingOrganization": { "reference": format!("Organization/{}", organization.id) },
        });
        let Some(object) = patient.as_object_mut() else {
            return patient;
        };
        // Optional elements are left out when there is nothing to say (FHIR JSON forbids `[]`).
        for (field, value) in [("telecom", &self.telecom), ("address", &self.address)] {
            if let Some(value) = value {
                object.insert(field.into(), value.clone());
            }
        }
        if let Some(gp) = self.usual_gp {
            object.insert(
                "generalPractitioner".into(),
                json!([{ "reference": format!("Practitioner/{gp}") }]),
            );
        }
        patient
    }
}

/// True when `text` is a 10-digit NHS number with a valid modulus-11 check digit.
pub fn is_valid_nhs_number(text: &str) -> bool {
    let digits: Vec<u32> = text.chars().filter_map(|c| c.to_digit(10)).collect();
    if text.len() != 10 || digits.len() != 10 {
        return false;
    }
    let sum: u32 = digits[..9]
        .iter()
        .zip((2..=10).rev())
        .map(|(d, w)| d * w)
        .sum();
    match 11 - (sum % 11) {
        11 => digits[9] == 0,
        10 => false,
        check => digits[9] == check,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nhs_number_check_digit() {
        for good in [
            "9000000009",
            "9000000017",
            "9000000025",
            "9000000033",
            "9476719931",
        ] {
            assert!(is_valid_nhs_number(good), "{good}");
        }
        for bad in [
            "9000000001",
            "900000000",
            "90000000090",
            "900000000a",
            "",
            "+900000009",
        ] {
            assert!(!is_valid_nhs_number(bad), "{bad}");
        }
    }

    #[test]
    fn seeded_patients_have_valid_nhs_numbers_and_the_gpc_profile() {
        let practice = Practice::seed("B82617");
        for patient in Practice::seed_patients() {
            assert!(is_valid_nhs_number(&patient.nhs_number));
            let fhir = patient.to_fhir(&practice.organization);
            assert_eq!(fhir["meta"]["profile"][0], PATIENT_PROFILE);
            assert_eq!(fhir["identifier"][0]["system"], NHS_NUMBER_SYSTEM);
            let reg = &fhir["extension"][0];
            assert!(reg["url"]
                .as_str()
                .is_some_and(|u| u.ends_with("RegistrationDetails-1")));
            assert_eq!(
                reg["extension"][1]["valueCodeableConcept"]["coding"][0]["code"],
                "R"
            );
        }
    }

    #[test]
    fn schedules_differ_in_category_type_and_channel() {
        let practice = Practice::seed("B82617");
        let categories: std::collections::HashSet<_> = practice
            .schedules
            .iter()
            .map(|s| s.service_category)
            .collect();
        assert_eq!(categories.len(), practice.schedules.len());
        let channels: std::collections::HashSet<_> = practice
            .schedules
            .iter()
            .flat_map(|s| s.sessions.iter().map(|x| x.channel))
            .collect();
        assert_eq!(channels.len(), 3);
        for schedule in &practice.schedules {
            assert!(practice.practitioner(schedule.practitioner).is_some());
            assert!(practice.location(schedule.location).is_some());
        }
    }

    #[test]
    fn a_day_has_ten_minute_slots_in_surgery_hours() {
        let practice = Practice::seed("B82617");
        let date = NaiveDate::from_ymd_opt(2025, 5, 21).unwrap();
        let slots = day_slots(&practice.schedules[0], date);
        assert_eq!(slots.len(), 27 + 27);
        assert_eq!(fhir_date_time(&slots[0].0), "2025-05-21T08:00:00+01:00");
        assert_eq!(fhir_date_time(&slots[53].1), "2025-05-21T18:00:00+01:00");
        for (start, end, _) in &slots {
            assert_eq!(*end - *start, Duration::minutes(10));
        }
        assert_eq!(
            slot_id(&practice.schedules[0], &slots[1].0),
            "1-20250521-0810"
        );
    }
}
