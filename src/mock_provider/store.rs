//! The practice's changing data: the slot diary, appointments and patients, and the rules for
//! changing them (book, amend, cancel, register). Every operation is a plain synchronous method
//! on [`State`], meant to run under the provider's write lock: it checks everything first and
//! only then mutates, so a refused request changes nothing and a slot can never be booked twice.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, Duration, FixedOffset, NaiveDate, NaiveTime, Utc, Weekday};
use serde_json::{json, Value};

use super::appointment::{Appointment, BookingRequest, UpdateRequest};
use super::calendar::{fhir_date_time, london_local, london_today, to_london};
use super::outcome::ProviderError;
use super::practice::{
    day_slots, slot_id, DeliveryChannel, Patient, Practice, Registration, DELIVERY_CHANNEL_URL,
    SLOT_PROFILE,
};

/// How far ahead the diary is generated.
pub const DIARY_DAYS: i64 = 28;
/// How long a temporary registration lasts.
const TEMPORARY_REGISTRATION_DAYS: i64 = 90;

/// One bookable slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub id: String,
    pub schedule_id: &'static str,
    pub start: DateTime<FixedOffset>,
    pub end: DateTime<FixedOffset>,
    pub service_type: &'static str,
    pub channel: DeliveryChannel,
    pub free: bool,
    pub version: u64,
}

impl Slot {
    /// The `Slot` resource.
    pub fn to_fhir(&self) -> Value {
        json!({
            "resourceType": "Slot",
            "id": self.id,
            "meta": { "versionId": self.version.to_string(), "profile": [SLOT_PROFILE] },
            "extension": [{ "url": DELIVERY_CHANNEL_URL, "valueCode": self.channel.code() }],
            "serviceType": [{ "text": self.service_type }],
            "schedule": { "reference": format!("Schedule/{}", self.schedule_id) },
            "status": if self.free { "free" } else { "busy" },
            "start": fhir_date_time(&self.start),
            "end": fhir_date_time(&self.end),
        })
    }
}

/// A patient to register (`$gpc.registerpatient`), checked for shape.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPatient {
    pub nhs_number: String,
    pub name: Value,
    pub gender: String,
    pub birth_date: String,
    /// Absent rather than empty: FHIR JSON has no empty arrays.
    pub telecom: Option<Value>,
    pub address: Option<Value>,
}

/// The practice's mutable records.
#[derive(Debug)]
pub struct State {
    /// Sorted by start, then schedule.
    slots: Vec<Slot>,
    slot_index: HashMap<String, usize>,
    appointments: HashMap<String, Appointment>,
    next_appointment: u64,
    patients: Vec<Patient>,
    /// First and last-plus-one day of the diary.
    pub horizon: (NaiveDate, NaiveDate),
}

impl State {
    /// The diary from today for [`DIARY_DAYS`] days (weekdays, future slots only), the seeded
    /// patients, and one appointment the practice booked itself (so retrieval has something to
    /// show before a consumer books).
    pub fn seed(practice: &Practice, now: DateTime<Utc>) -> Self {
        let today = london_today(now);
        let until = today + Duration::days(DIARY_DAYS);
        let mut slots = Vec::new();
        let mut date = today;
        while date < until {
            if !matches!(date.weekday(), Weekday::Sat | Weekday::Sun) {
                for schedule in &practice.schedules {
                    for (start, end, session) in day_slots(schedule, date) {
                        if start <= now {
                            continue;
                        }
                        slots.push(Slot {
                            id: slot_id(schedule, &start),
                            schedule_id: schedule.id,
                            start,
                            end,
                            service_type: session.service_type,
                            channel: session.channel,
                            free: true,
                            version: 1,
                        });
                    }
                }
            }
            date += Duration::days(1);
        }
        slots.sort_by(|a, b| (a.start, a.schedule_id).cmp(&(b.start, b.schedule_id)));
        let slot_index = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let mut state = Self {
            slots,
            slot_index,
            appointments: HashMap::new(),
            next_appointment: 1,
            patients: Practice::seed_patients(),
            horizon: (today, until),
        };
        state.seed_practice_booking(practice, now);
        state
    }

    /// Books patient 3 into the first nurse-clinic slot from tomorrow, as the practice.
    fn seed_practice_booking(&mut self, practice: &Practice, now: DateTime<Utc>) {
        let tomorrow = london_local(london_today(now) + Duration::days(1), NaiveTime::MIN);
        let Some(slot) = self
            .slots
            .iter()
            .find(|s| s.schedule_id == "3" && s.start >= tomorrow)
        else {
            return;
        };
        let request = BookingRequest {
            slot_ids: vec![slot.id.clone()],
            patient_id: "3".into(),
            other_actors: Vec::new(),
            start: slot.start,
            end: slot.end,
            description: Some("Asthma review".into()),
            comment: Some("Booked at reception".into()),
            created: None,
            booking_organization: json!({
                "resourceType": "Organization",
                "id": "1",
                "meta": { "profile": [super::practice::ORGANIZATION_PROFILE] },
                "identifier": [{
                    "system": super::practice::ODS_SYSTEM,
                    "value": practice.organization.ods_code,
                }],
                "name": practice.organization.name,
            }),
        };
        // The seed slot is free and valid by construction; should that ever change, the
        // practice simply starts without a pre-booked appointment.
        let _ = self.book(practice, request, now);
    }

    #[cfg(test)]
    pub fn slot(&self, id: &str) -> Option<&Slot> {
        self.slot_index.get(id).and_then(|i| self.slots.get(*i))
    }

    /// Free slots starting at or after `from` and ending at or before `to`, and in the future.
    pub fn free_slots(
        &self,
        from: DateTime<FixedOffset>,
        to: DateTime<FixedOffset>,
        now: DateTime<Utc>,
    ) -> Vec<Slot> {
        let first = self.slots.partition_point(|s| s.start < from);
        self.slots[first..]
            .iter()
            .take_while(|s| s.start < to)
            .filter(|s| s.free && s.end <= to && s.start > now)
            .cloned()
            .collect()
    }

    pub fn patient(&self, id: &str) -> Option<&Patient> {
        self.patients.iter().find(|p| p.id == id)
    }

    pub fn patient_by_nhs_number(&self, nhs_number: &str) -> Option<&Patient> {
        self.patients.iter().find(|p| p.nhs_number == nhs_number)
    }

    pub fn appointment(&self, id: &str) -> Option<&Appointment> {
        self.appointments.get(id)
    }

    /// The patient's appointments starting in `[from, to)`, earliest first.
    pub fn patient_appointments(
        &self,
        patient_id: &str,
        from: DateTime<FixedOffset>,
        to: DateTime<FixedOffset>,
    ) -> Vec<Appointment> {
        let mut found: Vec<Appointment> = self
            .appointments
            .values()
            .filter(|a| a.patient_id == patient_id && a.start >= from && a.start < to)
            .cloned()
            .collect();
        found.sort_by(|a, b| (a.start, &a.id).cmp(&(b.start, &b.id)));
        found
    }

    /// Books the slots for the patient. Checks, in order: references (422 REFERENCE_NOT_FOUND),
    /// the slots form one booking (422 INVALID_RESOURCE), they are free (409
    /// DUPLICATE_REJECTED). Marks the slots busy.
    pub fn book(
        &mut self,
        practice: &Practice,
        request: BookingRequest,
        now: DateTime<Utc>,
    ) -> Result<Appointment, ProviderError> {
        if self.patient(&request.patient_id).is_none() {
            return Err(ProviderError::ReferenceNotFound(format!(
                "Patient/{} does not exist",
                request.patient_id
            )));
        }
        for (kind, id) in &request.other_actors {
            let exists = match kind.as_str() {
                "Location" => practice.location(id).is_some(),
                _ => practice.practitioner(id).is_some(),
            };
            if !exists {
                return Err(ProviderError::ReferenceNotFound(format!(
                    "{kind}/{id} does not exist"
                )));
            }
        }
        let mut indexes = Vec::with_capacity(request.slot_ids.len());
        for id in &request.slot_ids {
            let index = self.slot_index.get(id).copied().ok_or_else(|| {
                ProviderError::ReferenceNotFound(format!("Slot/{id} does not exist"))
            })?;
            if indexes.contains(&index) {
                return Err(ProviderError::InvalidResource(format!(
                    "Slot/{id} is referenced twice"
                )));
            }
            indexes.push(index);
        }
        indexes.sort_by_key(|i| self.slots[*i].start);
        let slots: Vec<&Slot> = indexes.iter().map(|i| &self.slots[*i]).collect();
        let (Some(first), Some(last)) = (slots.first(), slots.last()) else {
            return Err(ProviderError::InvalidResource(
                "Appointment.slot must reference at least one Slot".into(),
            ));
        };
        for pair in slots.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if a.schedule_id != b.schedule_id {
                return Err(ProviderError::InvalidResource(
                    "all slots of an appointment must belong to the same Schedule".into(),
                ));
            }
            if a.end != b.start {
                return Err(ProviderError::InvalidResource(format!(
                    "Slot/{} and Slot/{} are not adjacent",
                    a.id, b.id
                )));
            }
            if a.service_type != b.service_type || a.channel != b.channel {
                return Err(ProviderError::InvalidResource(
                    "all slots of an appointment must share service type and delivery channel"
                        .into(),
                ));
            }
        }
        if request.start != first.start || request.end != last.end {
            return Err(ProviderError::InvalidResource(format!(
                "Appointment start/end must match its slots ({} to {})",
                fhir_date_time(&first.start),
                fhir_date_time(&last.end)
            )));
        }
        if first.start <= now {
            return Err(ProviderError::InvalidResource(
                "the appointment starts in the past".into(),
            ));
        }
        if let Some(busy) = slots.iter().find(|s| !s.free) {
            return Err(ProviderError::DuplicateRejected(format!(
                "Slot/{} is already in use.",
                busy.id
            )));
        }
        let schedule = practice.schedule(first.schedule_id).ok_or_else(|| {
            ProviderError::Internal(format!("Schedule/{} is missing", first.schedule_id))
        })?;
        let now_local = to_london(now);
        let appointment = Appointment {
            id: self.next_appointment.to_string(),
            version: 1,
            cancellation_reason: None,
            slot_ids: slots.iter().map(|s| s.id.clone()).collect(),
            patient_id: request.patient_id,
            location_id: schedule.location.to_string(),
            practitioner_id: schedule.practitioner.to_string(),
            start: first.start,
            end: last.end,
            description: request.description,
            comment: request.comment,
            created: request
                .created
                .unwrap_or_else(|| fhir_date_time(&now_local)),
            last_updated: now_local,
            booking_organization: request.booking_organization,
            service_category: schedule.service_category.to_string(),
            service_type: first.service_type.to_string(),
            channel: first.channel,
            role_extension: schedule.role_extension(),
        };
        for index in indexes {
            let slot = &mut self.slots[index];
            slot.free = false;
            slot.version += 1;
        }
        self.next_appointment += 1;
        self.appointments
            .insert(appointment.id.clone(), appointment.clone());
        Ok(appointment)
    }

    /// The stored appointment `id` if `version` is its current one (404 / 409 otherwise), and
    /// still open to change (422 when cancelled or in the past).
    fn changeable(
        &self,
        id: &str,
        version: &str,
        now: DateTime<Utc>,
    ) -> Result<&Appointment, ProviderError> {
        let current = self
            .appointments
            .get(id)
            .ok_or_else(|| ProviderError::NoRecordFound(format!("Appointment/{id} not found")))?;
        if current.version_id() != version {
            return Err(ProviderError::VersionConflict(format!(
                "If-Match version {version} is not the current version {} of Appointment/{id}",
                current.version
            )));
        }
        if current.cancellation_reason.is_some() {
            return Err(ProviderError::InvalidResource(format!(
                "Appointment/{id} has been cancelled and cannot be changed"
            )));
        }
        if current.start <= now {
            return Err(ProviderError::InvalidResource(format!(
                "Appointment/{id} is in the past and cannot be changed"
            )));
        }
        Ok(current)
    }

    /// True when the request names the same booking (slots, times, patient) as `current`.
    fn same_booking(current: &Appointment, request: &UpdateRequest) -> bool {
        let mut requested = request.slot_ids.clone();
        requested.sort();
        let mut held = current.slot_ids.clone();
        held.sort();
        requested == held
            && request.start == current.start
            && request.end == current.end
            && request.patient_id.as_deref() == Some(current.patient_id.as_str())
    }

    /// Amends description and comment; anything else changed is 422 INVALID_RESOURCE.
    pub fn amend(
        &mut self,
        id: &str,
        version: &str,
        request: UpdateRequest,
        now: DateTime<Utc>,
    ) -> Result<Appointment, ProviderError> {
        let current = self.changeable(id, version, now)?;
        if request.status != "booked" {
            return Err(ProviderError::InvalidResource(format!(
                "amend cannot change the status to {:?}: cancel with the cancel:appointment-1 interaction",
                request.status
            )));
        }
        if request.cancellation_reason.is_some() {
            return Err(ProviderError::InvalidResource(
                "amend cannot add a cancellation reason".into(),
            ));
        }
        if !Self::same_booking(current, &request) {
            return Err(ProviderError::InvalidResource(
                "only the description and comment of an appointment may be amended".into(),
            ));
        }
        let Some(appointment) = self.appointments.get_mut(id) else {
            return Err(ProviderError::NoRecordFound(format!(
                "Appointment/{id} not found"
            )));
        };
        appointment.description = request.description;
        appointment.comment = request.comment;
        appointment.version += 1;
        appointment.last_updated = to_london(now);
        Ok(appointment.clone())
    }

    /// Cancels with the reason and frees the slots; anything else changed is 422.
    pub fn cancel(
        &mut self,
        id: &str,
        version: &str,
        request: UpdateRequest,
        now: DateTime<Utc>,
    ) -> Result<Appointment, ProviderError> {
        let current = self.changeable(id, version, now)?;
        if request.status != "cancelled" {
            return Err(ProviderError::InvalidResource(format!(
                "cancel must set the status to cancelled, not {:?}",
                request.status
            )));
        }
        let Some(reason) = request.cancellation_reason.clone() else {
            return Err(ProviderError::InvalidResource(
                "cancel needs the Extension-GPConnect-AppointmentCancellationReason-1 extension"
                    .into(),
            ));
        };
        if !Self::same_booking(current, &request)
            || request.description != current.description
            || request.comment != current.comment
        {
            return Err(ProviderError::InvalidResource(
                "only the status and cancellation reason may change when cancelling".into(),
            ));
        }
        let slot_ids = current.slot_ids.clone();
        for slot_id in &slot_ids {
            if let Some(slot) = self
                .slot_index
                .get(slot_id)
                .and_then(|i| self.slots.get_mut(*i))
            {
                slot.free = true;
                slot.version += 1;
            }
        }
        let Some(appointment) = self.appointments.get_mut(id) else {
            return Err(ProviderError::NoRecordFound(format!(
                "Appointment/{id} not found"
            )));
        };
        appointment.cancellation_reason = Some(reason);
        appointment.version += 1;
        appointment.last_updated = to_london(now);
        Ok(appointment.clone())
    }

    /// Registers a new patient temporarily (409 DUPLICATE_REJECTED when the NHS number is
    /// already registered here).
    pub fn register(
        &mut self,
        patient: NewPatient,
        now: DateTime<Utc>,
    ) -> Result<Patient, ProviderError> {
        if self.patient_by_nhs_number(&patient.nhs_number).is_some() {
            return Err(ProviderError::DuplicateRejected(format!(
                "a patient with NHS number {} is already registered at this practice",
                patient.nhs_number
            )));
        }
        let start = to_london(now);
        let registered = Patient {
            id: (self.patients.len() + 1).to_string(),
            nhs_number: patient.nhs_number,
            name: patient.name,
            gender: patient.gender,
            birth_date: patient.birth_date,
            telecom: patient.telecom,
            address: patient.address,
            registration: Registration::Temporary {
                start,
                end: start + Duration::days(TEMPORARY_REGISTRATION_DAYS),
            },
            usual_gp: None,
        };
        self.patients.push(registered.clone());
        Ok(registered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// Wednesday 21 May 2025, 09:00 London (BST).
    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 5, 21, 8, 0, 0).unwrap()
    }

    fn setup() -> (Practice, State) {
        let practice = Practice::seed("B82617");
        let state = State::seed(&practice, now());
        (practice, state)
    }

    fn org() -> Value {
        json!({"resourceType": "Organization", "id": "1", "name": "X",
               "identifier": [{"system": super::super::practice::ODS_SYSTEM, "value": "A20047"}]})
    }

    fn booking(slots: &[&Slot], patient: &str) -> BookingRequest {
        BookingRequest {
            slot_ids: slots.iter().map(|s| s.id.clone()).collect(),
            patient_id: patient.into(),
            other_actors: vec![("Location".into(), "1".into())],
            start: slots
                .iter()
                .map(|s| s.start)
                .min()
                .expect("at least one slot"),
            end: slots
                .iter()
                .map(|s| s.end)
                .max()
                .expect("at least one slot"),
            description: Some("d".into()),
            comment: None,
            created: None,
            booking_organization: org(),
        }
    }

    fn free_on(state: &State, schedule: &str) -> Vec<Slot> {
        let from = london_local(state.horizon.0, NaiveTime::MIN);
        let to = london_local(state.horizon.1, NaiveTime::MIN);
        state
            .free_slots(from, to, now())
            .into_iter()
            .filter(|s| s.schedule_id == schedule)
            .collect()
    }

    #[test]
    fn the_diary_covers_four_weeks_of_weekdays_with_unique_future_slots() {
        let (_, state) = setup();
        assert!(state.slots.iter().all(|s| s.start > now()));
        assert!(state
            .slots
            .iter()
            .all(|s| !matches!(s.start.weekday(), Weekday::Sat | Weekday::Sun)));
        assert_eq!(state.slot_index.len(), state.slots.len(), "ids are unique");
        let last = state.slots.last().expect("slots exist");
        assert!(last.start.date_naive() >= state.horizon.0 + Duration::days(DIARY_DAYS - 4));
        // 20 weekdays, today's 08:00-09:00 already gone: well over two thousand slots.
        assert!(state.slots.len() > 2500, "{}", state.slots.len());
        // The seeded practice booking holds one nurse slot.
        assert_eq!(state.slots.iter().filter(|s| !s.free).count(), 1);
        assert_eq!(
            state
                .patient_appointments("3", state.slots[0].start, last.end)
                .len(),
            1
        );
    }

    #[test]
    fn booking_marks_slots_busy_and_rejects_a_second_booking() {
        let (practice, mut state) = setup();
        let slot = free_on(&state, "1")[0].clone();
        let appointment = state
            .book(&practice, booking(&[&slot], "1"), now())
            .expect("books");
        assert_eq!(appointment.version, 1);
        assert_eq!(appointment.service_category, "General practice");
        assert!(!state.slot(&slot.id).expect("slot").free);
        assert_eq!(state.slot(&slot.id).expect("slot").version, 2);
        let err = state
            .book(&practice, booking(&[&slot], "2"), now())
            .unwrap_err();
        assert_eq!(err.spine_code(), "DUPLICATE_REJECTED");
    }

    #[test]
    fn adjacent_slots_book_together_but_gaps_and_mixed_schedules_do_not() {
        let (practice, mut state) = setup();
        let ones = free_on(&state, "1");
        let twos = free_on(&state, "2");
        let err = state
            .book(&practice, booking(&[&ones[0], &ones[2]], "1"), now())
            .unwrap_err();
        assert_eq!(err.spine_code(), "INVALID_RESOURCE");
        let err = state
            .book(&practice, booking(&[&ones[0], &twos[0]], "1"), now())
            .unwrap_err();
        assert_eq!(err.spine_code(), "INVALID_RESOURCE");
        let appointment = state
            .book(&practice, booking(&[&ones[1], &ones[0]], "1"), now())
            .expect("adjacent slots book");
        assert_eq!(appointment.end - appointment.start, Duration::minutes(20));
        assert_eq!(
            appointment.slot_ids,
            [ones[0].id.clone(), ones[1].id.clone()]
        );
    }

    #[test]
    fn references_must_exist() {
        let (practice, mut state) = setup();
        let slot = free_on(&state, "1")[0].clone();
        let mut request = booking(&[&slot], "99");
        assert_eq!(
            state
                .book(&practice, request.clone(), now())
                .unwrap_err()
                .spine_code(),
            "REFERENCE_NOT_FOUND"
        );
        request.patient_id = "1".into();
        request.slot_ids = vec!["1-20000101-0800".into()];
        assert_eq!(
            state
                .book(&practice, request.clone(), now())
                .unwrap_err()
                .spine_code(),
            "REFERENCE_NOT_FOUND"
        );
        let mut request = booking(&[&slot], "1");
        request.other_actors = vec![("Location".into(), "16".into())];
        assert_eq!(
            state
                .book(&practice, request, now())
                .unwrap_err()
                .spine_code(),
            "REFERENCE_NOT_FOUND"
        );
        let mut request = booking(&[&slot], "1");
        request.end += Duration::minutes(10);
        assert_eq!(
            state
                .book(&practice, request, now())
                .unwrap_err()
                .spine_code(),
            "INVALID_RESOURCE"
        );
    }

    fn update_from(appointment: &Appointment, status: &str) -> UpdateRequest {
        UpdateRequest {
            status: status.into(),
            slot_ids: appointment.slot_ids.clone(),
            patient_id: Some(appointment.patient_id.clone()),
            start: appointment.start,
            end: appointment.end,
            description: appointment.description.clone(),
            comment: appointment.comment.clone(),
            cancellation_reason: None,
        }
    }

    #[test]
    fn amend_changes_only_description_and_comment_at_the_current_version() {
        let (practice, mut state) = setup();
        let slot = free_on(&state, "1")[0].clone();
        let booked = state
            .book(&practice, booking(&[&slot], "1"), now())
            .expect("books");
        let mut amend = update_from(&booked, "booked");
        amend.comment = Some("Please call first".into());
        let amended = state
            .amend(&booked.id, "1", amend.clone(), now())
            .expect("amends");
        assert_eq!(amended.version, 2);
        assert_eq!(amended.comment.as_deref(), Some("Please call first"));
        let stale = state
            .amend(&booked.id, "1", amend.clone(), now())
            .unwrap_err();
        assert_eq!(stale.spine_code(), "FHIR_CONSTRAINT_VIOLATION");
        let mut moved = amend.clone();
        moved.start += Duration::minutes(10);
        assert_eq!(
            state
                .amend(&booked.id, "2", moved, now())
                .unwrap_err()
                .spine_code(),
            "INVALID_RESOURCE"
        );
        let cancelled = update_from(&amended, "cancelled");
        assert_eq!(
            state
                .amend(&booked.id, "2", cancelled, now())
                .unwrap_err()
                .spine_code(),
            "INVALID_RESOURCE"
        );
        assert_eq!(
            state
                .amend("404", "1", amend, now())
                .unwrap_err()
                .spine_code(),
            "NO_RECORD_FOUND"
        );
    }

    #[test]
    fn cancel_frees_the_slots_and_closes_the_appointment() {
        let (practice, mut state) = setup();
        let slot = free_on(&state, "2")[0].clone();
        let booked = state
            .book(&practice, booking(&[&slot], "2"), now())
            .expect("books");
        let mut cancel = update_from(&booked, "cancelled");
        assert_eq!(
            state
                .cancel(&booked.id, "1", cancel.clone(), now())
                .unwrap_err()
                .spine_code(),
            "INVALID_RESOURCE",
            "a reason is required"
        );
        cancel.cancellation_reason = Some("No longer needed".into());
        let mut sneaky = cancel.clone();
        sneaky.description = Some("changed".into());
        assert_eq!(
            state
                .cancel(&booked.id, "1", sneaky, now())
                .unwrap_err()
                .spine_code(),
            "INVALID_RESOURCE"
        );
        let cancelled = state
            .cancel(&booked.id, "1", cancel.clone(), now())
            .expect("cancels");
        assert_eq!(cancelled.version, 2);
        assert_eq!(cancelled.to_fhir()["status"], "cancelled");
        let freed = state.slot(&slot.id).expect("slot");
        assert!(freed.free);
        assert_eq!(freed.version, 3);
        assert_eq!(
            state
                .cancel(&booked.id, "2", cancel, now())
                .unwrap_err()
                .spine_code(),
            "INVALID_RESOURCE"
        );
        // The freed slot can be booked again.
        state
            .book(&practice, booking(&[&slot], "1"), now())
            .expect("rebooks");
    }

    #[test]
    fn registering_twice_is_a_duplicate() {
        let (_, mut state) = setup();
        let new = NewPatient {
            nhs_number: "9000000033".into(),
            name: json!([{ "use": "official", "family": "Dawes", "given": ["Minnie"] }]),
            gender: "female".into(),
            birth_date: "1952-05-31".into(),
            telecom: None,
            address: None,
        };
        let patient = state.register(new.clone(), now()).expect("registers");
        assert_eq!(patient.id, "4");
        assert!(matches!(
            patient.registration,
            Registration::Temporary { .. }
        ));
        assert_eq!(
            state.register(new, now()).unwrap_err().spine_code(),
            "DUPLICATE_REJECTED"
        );
        let mut seeded = NewPatient {
            nhs_number: "9000000009".into(),
            name: json!([]),
            gender: "male".into(),
            birth_date: "1990-01-01".into(),
            telecom: None,
            address: None,
        };
        assert!(state.register(seeded.clone(), now()).is_err());
        seeded.nhs_number = "9000000041".into();
        assert!(state.register(seeded, now()).is_ok());
    }
}
