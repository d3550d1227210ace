//! The embedded mock GP Connect 1.2.7 provider: the practice the gateway forwards to in
//! development, tests and benchmarks (ODS B82617, ASID 918999198993 in the development world).
//! It owns everything HTTP-level for one request — provider-side header and JWT checks, routing
//! of the 15 Foundations and Appointment Management interactions, GP Connect OperationOutcomes —
//! and the practice's in-memory diary, appointments and patients. The caller owns the TLS
//! accept loop and calls [`MockProvider::handle`] per request.
//!
//! It serves synthetic data only and must never be deployed as a real provider. It speaks
//! FHIR JSON only: a request for XML (`_format`, `Accept` or `Content-Type`) is answered 415.
//!
//! The practice: Organization/1 (the configured ODS code), Location/1 (main surgery) and
//! Location/2 (branch), Practitioner/1-3 (SDS user ids `555011111001`-`003`), Patient/1-3 (NHS
//! numbers 9000000009, 9000000017, 9000000025), and three schedules with 10-minute slots on
//! weekdays for four weeks from "today" (London time): Schedule/1 "General practice" (General
//! GP appointment, In-person, 08:00-18:00), Schedule/2 "Remote consultations" (Telephone
//! mornings, Video afternoons), Schedule/3 "Nurse clinic" at the branch (In-person). Slot ids
//! are `<schedule>-<yyyymmdd>-<hhmm>`, stable across restarts. Appointment/1 is a booking the
//! practice made itself for Patient/3, so retrieval has something to show.
//!
//! Choices where the specification leaves room (each has a test):
//! - Checks run in this order: service root (404), Ssp-* headers and `Ssp-To` (400), route
//!   (400 wrong verb or bad id, 501 unknown resource/operation), interaction fits the route
//!   (400), bearer token (400: unsigned, `alg` none, `requested_scope` matching the
//!   interaction; expiry is not checked), formats (415), body cap (413).
//! - Amend and cancel need `If-Match`: missing is 400 BAD_REQUEST, a stale version 409
//!   FHIR_CONSTRAINT_VIOLATION; changing anything the interaction does not allow, or changing a
//!   cancelled or past appointment, is 422 INVALID_RESOURCE.
//! - A body that is not JSON is 400 BAD_REQUEST; valid JSON that is the wrong resource or
//!   breaks a rule is 422.
//! - Slot search: unrecognised criteria are ignored, never an error (other `_include` and
//!   `_include:recurse` values, malformed `searchFilter`s); a date-only `end` covers that
//!   whole day; the 14-day limit is measured between the two given values.
//! - Booking embargo: Schedule/3 (the nurse clinic) is open only to booking organisations of
//!   type `gp-practice` or with ODS code A20047; Schedules 1 and 2 are open to all. A slot
//!   search whose `searchFilter`s (ODS code, organisation type) name neither leaves its slots
//!   out; a search with no such filter is not restricted. Booking does not re-check the embargo. The consumer's `serviceType` and
//!   `serviceCategory` in a booking are ignored: the appointment takes the slot's.
//! - `Prefer: return=minimal` empties the body of create and update answers (headers stay).

mod appointment;
mod calendar;
mod capability;
pub mod outcome;
mod practice;
mod prune;
mod registration;
mod request;
mod search;
mod store;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::{BufMut, Bytes};
use chrono::{DateTime, Utc};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, ETAG, LOCATION};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};

pub use outcome::ProviderError;
pub use request::{Interaction, Scope};

use calendar::{fhir_date_time, london_today, to_london};
use practice::{Practice, NHS_NUMBER_SYSTEM, ODS_SYSTEM, SDS_USER_SYSTEM};
use request::SspHeaders;
use search::SlotQuery;
use store::State;

/// Largest request body the provider reads (larger is 413).
pub const MAX_REQUEST_BODY_BYTES: usize = 1024 * 1024;
/// The `Content-Type` of every response.
pub const FHIR_JSON: &str = "application/fhir+json;charset=utf-8";
/// `meta.profile` of search result Bundles.
pub const SEARCHSET_PROFILE: &str =
    "https://fhir.nhs.uk/STU3/StructureDefinition/GPConnect-Searchset-Bundle-1";

/// A real 178 KB GP Connect 1.2.7 free-slot search response (225 slots), recorded from the
/// nhsconnect gpconnect-demonstrator (Apache-2.0) running the official provider test pack; see
/// `fixtures/SOURCES.md`.
static SLOT_BUNDLE_FIXTURE: &[u8] =
    include_bytes!("fixtures/slot-search-response.demonstrator-1.2.7-recorded.json");

/// The recorded 178 KB slot-search Bundle, for benchmarks and large-body tests.
pub fn slot_bundle_fixture() -> Bytes {
    Bytes::from_static(SLOT_BUNDLE_FIXTURE)
}

pub use crate::ssp::interactions::is_fhir_id;

/// Who the mock provider is and where it is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockSettings {
    /// The provider's ASID: `Ssp-To` must equal it.
    pub asid: String,
    /// The practice's ODS code.
    pub ods_code: String,
    /// The service root path, e.g. `/B82617/STU3/1/gpconnect`; requests elsewhere are 404.
    pub base_path: String,
    /// The absolute service root, used for `fullUrl` and `Location`.
    pub base_url: String,
}

impl Default for MockSettings {
    /// The development world's provider practice.
    fn default() -> Self {
        Self {
            asid: "918999198993".into(),
            ods_code: "B82617".into(),
            base_path: "/B82617/STU3/1/gpconnect".into(),
            base_url: "https://localhost:9443/B82617/STU3/1/gpconnect".into(),
        }
    }
}

/// The head of the last request the provider received (for tests of what the gateway forwards).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

/// Where "now" comes from.
#[derive(Debug, Clone, Copy)]
enum Clock {
    System,
    Fixed(DateTime<Utc>),
}

/// The mock provider. `Send + Sync`: share it as `Arc<MockProvider>` across connections.
#[derive(Debug)]
pub struct MockProvider {
    settings: MockSettings,
    practice: Practice,
    /// Never held across an `.await`: every use is inside a synchronous method.
    state: RwLock<State>,
    clock: Clock,
    requests: AtomicU64,
    last_request: Mutex<Option<RecordedRequest>>,
}

/// The interaction a request path and method can be.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Metadata,
    PatientSearch,
    PatientRead(String),
    PatientRegister,
    PatientAppointments(String),
    PractitionerSearch,
    PractitionerRead(String),
    OrganizationSearch,
    OrganizationRead(String),
    LocationRead(String),
    SlotSearch,
    AppointmentCreate,
    AppointmentRead(String),
    /// Amend or cancel: only `Ssp-InteractionID` tells them apart.
    AppointmentUpdate(String),
}

impl Route {
    /// The interactions that may be declared for this route.
    fn interactions(&self) -> &'static [Interaction] {
        use Interaction as I;
        match self {
            Self::Metadata => &[I::ReadMetadata],
            Self::PatientSearch => &[I::SearchPatient],
            Self::PatientRead(_) => &[I::ReadPatient],
            Self::PatientRegister => &[I::RegisterPatient],
            Self::PatientAppointments(_) => &[I::SearchPatientAppointments],
            Self::PractitionerSearch => &[I::SearchPractitioner],
            Self::PractitionerRead(_) => &[I::ReadPractitioner],
            Self::OrganizationSearch => &[I::SearchOrganization],
            Self::OrganizationRead(_) => &[I::ReadOrganization],
            Self::LocationRead(_) => &[I::ReadLocation],
            Self::SlotSearch => &[I::SearchSlot],
            Self::AppointmentCreate => &[I::CreateAppointment],
            Self::AppointmentRead(_) => &[I::ReadAppointment],
            Self::AppointmentUpdate(_) => &[I::AmendAppointment, I::CancelAppointment],
        }
    }

    fn has_body(&self) -> bool {
        matches!(
            self,
            Self::PatientRegister | Self::AppointmentCreate | Self::AppointmentUpdate(_)
        )
    }
}

/// Resource types and operations GP Connect has but this provider does not serve.
fn not_implemented(method: &Method, path: &str) -> ProviderError {
    ProviderError::NotImplemented(format!(
        "{method} {path} is not implemented by this provider"
    ))
}

/// Maps method and decoded path segments (relative to the service root) to a route.
fn route(method: &Method, segments: &[String]) -> Result<Route, ProviderError> {
    let path = segments.join("/");
    let wrong_verb =
        || ProviderError::BadRequest(format!("{method} is not a supported method for {path}"));
    let id = |raw: &str| {
        if is_fhir_id(raw) {
            Ok(raw.to_string())
        } else {
            Err(ProviderError::BadRequest(format!(
                "{raw:?} is not a valid FHIR logical id"
            )))
        }
    };
    let parts: Vec<&str> = segments.iter().map(String::as_str).collect();
    let get = *method == Method::GET;
    let (route, allowed) = match parts.as_slice() {
        ["metadata"] => (Route::Metadata, get),
        ["Patient"] => (Route::PatientSearch, get),
        ["Patient", "$gpc.registerpatient"] => (Route::PatientRegister, *method == Method::POST),
        ["Patient", op] if op.starts_with('$') => return Err(not_implemented(method, &path)),
        ["Patient", raw] => (Route::PatientRead(id(raw)?), get),
        ["Patient", raw, "Appointment"] => (Route::PatientAppointments(id(raw)?), get),
        ["Practitioner"] => (Route::PractitionerSearch, get),
        ["Practitioner", raw] => (Route::PractitionerRead(id(raw)?), get),
        ["Organization"] => (Route::OrganizationSearch, get),
        ["Organization", raw] => (Route::OrganizationRead(id(raw)?), get),
        ["Location", raw] => (Route::LocationRead(id(raw)?), get),
        ["Slot"] => (Route::SlotSearch, get),
        ["Appointment"] => (Route::AppointmentCreate, *method == Method::POST),
        ["Appointment", raw] => {
            let id = id(raw)?;
            match *method {
                Method::GET => (Route::AppointmentRead(id), true),
                Method::PUT => (Route::AppointmentUpdate(id), true),
                _ => return Err(wrong_verb()),
            }
        }
        _ => return Err(not_implemented(method, &path)),
    };
    if allowed {
        Ok(route)
    } else {
        Err(wrong_verb())
    }
}

/// A request that passed the provider's checks, ready to be served.
struct Checked {
    route: Route,
    ssp: SspHeaders,
    params: Vec<(String, String)>,
}

/// A successful answer before it becomes an HTTP response.
struct Reply {
    status: StatusCode,
    body: Value,
    /// `meta.versionId` of a single resource: sent as `ETag: W/"<v>"`.
    version: Option<String>,
    location: Option<String>,
    /// Create and update honour `Prefer: return=minimal`; reads and searches always return
    /// the representation.
    honours_prefer: bool,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            version: None,
            location: None,
            honours_prefer: false,
        }
    }

    fn resource(body: Value, version: String) -> Self {
        Self {
            version: Some(version),
            ..Self::ok(body)
        }
    }
}

/// A response with the headers every provider response carries.
fn response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Serialises a JSON value (a `Value` always serialises; the fallback is for completeness).
fn json_bytes(value: &Value) -> Bytes {
    serde_json::to_vec(value).map(Bytes::from).unwrap_or_else(|_| {
        Bytes::from_static(
            br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"response serialisation failed"}]}"#,
        )
    })
}

/// The OperationOutcome response for an error.
pub fn error_response(error: &ProviderError) -> Response<Full<Bytes>> {
    response(error.status(), json_bytes(&error.operation_outcome()))
}

/// Reads the whole body, refusing more than `limit` bytes.
async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, ProviderError>
where
    B: Body,
    B::Error: std::fmt::Display,
{
    let too_large =
        || ProviderError::PayloadTooLarge(format!("the request body is larger than {limit} bytes"));
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let mut body = std::pin::pin!(body);
    let mut buffer = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ProviderError::BadRequest(format!("the request body could not be read: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() + bytes::Buf::remaining(&data) > limit {
                return Err(too_large());
            }
            buffer.put(data);
        }
    }
    Ok(Bytes::from(buffer))
}

impl MockProvider {
    /// The practice with its diary generated from today (London time) for four weeks.
    pub fn new(settings: MockSettings) -> Self {
        Self::build(settings, Clock::System)
    }

    /// The practice as it is at `now`, with the clock stopped there: deterministic for tests
    /// (slot ids, "in the past" checks and retrieval windows all use `now`).
    pub fn at(settings: MockSettings, now: DateTime<Utc>) -> Self {
        Self::build(settings, Clock::Fixed(now))
    }

    fn build(mut settings: MockSettings, clock: Clock) -> Self {
        while settings.base_path.ends_with('/') {
            settings.base_path.pop();
        }
        while settings.base_url.ends_with('/') {
            settings.base_url.pop();
        }
        let practice = Practice::seed(&settings.ods_code);
        let now = match clock {
            Clock::System => Utc::now(),
            Clock::Fixed(now) => now,
        };
        let state = State::seed(&practice, now);
        Self {
            settings,
            practice,
            state: RwLock::new(state),
            clock,
            requests: AtomicU64::new(0),
            last_request: Mutex::new(None),
        }
    }

    /// The settings in force (paths without trailing `/`).
    pub fn settings(&self) -> &MockSettings {
        &self.settings
    }

    /// How many requests reached the provider (whatever their outcome).
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The head of the last request that reached the provider.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.last_request
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn now(&self) -> DateTime<Utc> {
        match self.clock {
            Clock::System => Utc::now(),
            Clock::Fixed(now) => now,
        }
    }

    // A panic under the lock cannot leave half-applied state (store methods check before they
    // mutate), so a poisoned lock is safe to keep using.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves one request: checks, routes, reads the body (up to [`MAX_REQUEST_BODY_BYTES`]),
    /// and answers with a FHIR resource or a GP Connect OperationOutcome.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body + Send,
        B::Data: Send,
        B::Error: std::fmt::Display,
    {
        let (parts, body) = req.into_parts();
        self.requests.fetch_add(1, Ordering::Relaxed);
        *self
            .last_request
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(RecordedRequest {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        });
        let checked = match self.check(&parts.method, &parts.uri, &parts.headers) {
            Ok(checked) => checked,
            Err(error) => return error_response(&error),
        };
        let body = if checked.route.has_body() {
            match read_body(body, MAX_REQUEST_BODY_BYTES).await {
                Ok(body) => body,
                Err(error) => return error_response(&error),
            }
        } else {
            Bytes::new()
        };
        let minimal = request::prefers_minimal(&parts.headers);
        match self.serve(checked, &parts.headers, &body) {
            Ok(reply) => self.respond(reply, minimal),
            Err(error) => error_response(&error),
        }
    }

    /// The provider-side checks, in order: service root (404), Ssp headers (400), route
    /// (400/501), interaction matches the route (400), bearer token (400), formats (415).
    fn check(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Checked, ProviderError> {
        let relative = uri
            .path()
            .strip_prefix(self.settings.base_path.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|rest| !rest.is_empty())
            .ok_or_else(|| {
                ProviderError::NoRecordFound(format!(
                    "no GP Connect resource at {}: the service root is {}",
                    uri.path(),
                    self.settings.base_path
                ))
            })?;
        let ssp = request::ssp_headers(headers, &self.settings.asid)?;
        let segments = relative
            .split('/')
            .map(|s| {
                percent_decode_str(s)
                    .decode_utf8()
                    .map(|s| s.into_owned())
                    .map_err(|_| ProviderError::BadRequest("the path is not valid UTF-8".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let route = route(method, &segments)?;
        if !route.interactions().contains(&ssp.interaction) {
            return Err(ProviderError::BadRequest(format!(
                "Ssp-InteractionID {} does not match the request {method} {relative}",
                ssp.interaction.urn()
            )));
        }
        request::bearer_token(headers, ssp.interaction)?;
        let params = request::query_params(uri.query())?;
        request::response_format(headers, &params)?;
        if route.has_body() {
            request::request_format(headers)?;
        }
        Ok(Checked { route, ssp, params })
    }

    /// Turns a reply into the HTTP response; `minimal` drops the body (`Prefer: return=minimal`
    /// on create and update).
    fn respond(&self, reply: Reply, minimal: bool) -> Response<Full<Bytes>> {
        let body = if minimal && reply.honours_prefer {
            Bytes::new()
        } else {
            json_bytes(&reply.body)
        };
        let mut response = response(reply.status, body);
        let headers = response.headers_mut();
        if let Some(version) = &reply.version {
            if let Ok(value) = HeaderValue::from_str(&format!("W/\"{version}\"")) {
                headers.insert(ETAG, value);
            }
        }
        if let Some(location) = &reply.location {
            if let Ok(value) = HeaderValue::from_str(location) {
                headers.insert(LOCATION, value);
            }
        }
        response
    }

    /// Serves a checked request. Synchronous: the state lock is taken and released inside.
    fn serve(
        &self,
        checked: Checked,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Reply, ProviderError> {
        let Checked { route, ssp, params } = checked;
        tracing::debug!(
            trace_id = %ssp.trace_id,
            from = %ssp.from,
            interaction = ssp.interaction.urn(),
            "mock provider serving"
        );
        match route {
            Route::Metadata => Ok(Reply::resource(
                capability::capability_statement(),
                capability::VERSION_ID.to_string(),
            )),
            Route::PatientSearch => self.search_patient(&params),
            Route::PatientRead(id) => {
                let state = self.read();
                let patient = state.patient(&id).ok_or_else(|| {
                    ProviderError::PatientNotFound(format!("Patient/{id} not found"))
                })?;
                Ok(Reply::resource(
                    patient.to_fhir(&self.practice.organization),
                    "1".into(),
                ))
            }
            Route::PatientRegister => self.register_patient(body),
            Route::PatientAppointments(id) => self.patient_appointments(&id, &params),
            Route::PractitionerSearch => {
                let value = search::identifier(&params, SDS_USER_SYSTEM)?;
                let found = self
                    .practice
                    .practitioners
                    .iter()
                    .filter(|p| p.sds_user_id == value)
                    .map(|p| (p.to_fhir(), "match"))
                    .collect();
                Ok(Reply::ok(self.searchset(found)))
            }
            Route::PractitionerRead(id) => {
                let practitioner = self.practice.practitioner(&id).ok_or_else(|| {
                    ProviderError::PractitionerNotFound(format!("Practitioner/{id} not found"))
                })?;
                Ok(Reply::resource(practitioner.to_fhir(), "1".into()))
            }
            Route::OrganizationSearch => {
                let value = search::identifier(&params, ODS_SYSTEM)?;
                let organization = &self.practice.organization;
                let found = if value == organization.ods_code {
                    vec![(organization.to_fhir(&self.practice), "match")]
                } else {
                    Vec::new()
                };
                Ok(Reply::ok(self.searchset(found)))
            }
            Route::OrganizationRead(id) => {
                let organization = &self.practice.organization;
                if id != organization.id {
                    return Err(ProviderError::OrganisationNotFound(format!(
                        "Organization/{id} not found"
                    )));
                }
                Ok(Reply::resource(
                    organization.to_fhir(&self.practice),
                    "1".into(),
                ))
            }
            Route::LocationRead(id) => {
                let location = self.practice.location(&id).ok_or_else(|| {
                    ProviderError::NoRecordFound(format!("Location/{id} not found"))
                })?;
                Ok(Reply::resource(
                    location.to_fhir(&self.practice.organization),
                    "1".into(),
                ))
            }
            Route::SlotSearch => self.search_slots(&params),
            Route::AppointmentCreate => self.book(body),
            Route::AppointmentRead(id) => {
                let state = self.read();
                let appointment = state.appointment(&id).ok_or_else(|| {
                    ProviderError::NoRecordFound(format!("Appointment/{id} not found"))
                })?;
                Ok(Reply::resource(
                    appointment.to_fhir(),
                    appointment.version_id(),
                ))
            }
            Route::AppointmentUpdate(id) => self.update(&id, ssp.interaction, headers, body),
        }
    }

    /// A searchset Bundle of `(resource, search mode)` entries.
    fn searchset(&self, entries: Vec<(Value, &'static str)>) -> Value {
        let mut bundle = json!({
            "resourceType": "Bundle",
            "id": uuid::Uuid::new_v4().to_string(),
            "meta": {
                "lastUpdated": fhir_date_time(&to_london(self.now())),
                "profile": [SEARCHSET_PROFILE],
            },
            "type": "searchset",
        });
        if !entries.is_empty() {
            let entries: Vec<Value> = entries
                .into_iter()
                .map(|(resource, mode)| {
                    let full_url = format!(
                        "{}/{}/{}",
                        self.settings.base_url,
                        resource["resourceType"].as_str().unwrap_or_default(),
                        resource["id"].as_str().unwrap_or_default()
                    );
                    json!({ "fullUrl": full_url, "resource": resource, "search": { "mode": mode } })
                })
                .collect();
            if let Some(object) = bundle.as_object_mut() {
                object.insert("entry".into(), Value::Array(entries));
            }
        }
        bundle
    }

    fn search_patient(&self, params: &[(String, String)]) -> Result<Reply, ProviderError> {
        let nhs_number = search::identifier(params, NHS_NUMBER_SYSTEM)?;
        if !practice::is_valid_nhs_number(nhs_number) {
            return Err(ProviderError::InvalidNhsNumber(format!(
                "{nhs_number} is not a valid NHS number"
            )));
        }
        let found = self
            .read()
            .patient_by_nhs_number(nhs_number)
            .map(|p| vec![(p.to_fhir(&self.practice.organization), "match")])
            .unwrap_or_default();
        Ok(Reply::ok(self.searchset(found)))
    }

    fn register_patient(&self, body: &[u8]) -> Result<Reply, ProviderError> {
        let new = registration::new_patient(body)?;
        let patient = self.write().register(new, self.now())?;
        Ok(Reply::ok(self.searchset(vec![(
            patient.to_fhir(&self.practice.organization),
            "match",
        )])))
    }

    fn search_slots(&self, params: &[(String, String)]) -> Result<Reply, ProviderError> {
        let query = SlotQuery::parse(params)?;
        let (mut slots, horizon) = {
            let state = self.read();
            (
                state.free_slots(query.from, query.to, self.now()),
                state.horizon,
            )
        };
        // Only the slots open to the booking organisation the search filters name.
        slots.retain(|slot| {
            self.practice
                .schedule(slot.schedule_id)
                .is_some_and(|s| query.booking.admits(s.bookable_by.as_ref()))
        });
        // A search with no free slots is an empty Bundle, includes and all.
        let schedules: BTreeSet<&str> = slots.iter().map(|s| s.schedule_id).collect();
        let schedules: Vec<_> = self
            .practice
            .schedules
            .iter()
            .filter(|s| schedules.contains(s.id))
            .collect();
        let mut entries: Vec<(Value, &'static str)> =
            slots.iter().map(|s| (s.to_fhir(), "match")).collect();
        entries.extend(schedules.iter().map(|s| (s.to_fhir(horizon), "include")));
        if query.include_practitioners {
            let ids: BTreeSet<&str> = schedules.iter().map(|s| s.practitioner).collect();
            entries.extend(
                ids.into_iter()
                    .filter_map(|id| self.practice.practitioner(id))
                    .map(|p| (p.to_fhir(), "include")),
            );
        }
        if query.include_locations {
            let ids: BTreeSet<&str> = schedules.iter().map(|s| s.location).collect();
            entries.extend(
                ids.into_iter()
                    .filter_map(|id| self.practice.location(id))
                    .map(|l| (l.to_fhir(&self.practice.organization), "include")),
            );
        }
        if query.include_organization && !schedules.is_empty() {
            entries.push((
                self.practice.organization.to_fhir(&self.practice),
                "include",
            ));
        }
        Ok(Reply::ok(self.searchset(entries)))
    }

    fn patient_appointments(
        &self,
        patient_id: &str,
        params: &[(String, String)],
    ) -> Result<Reply, ProviderError> {
        let now = self.now();
        let (from, to) = search::appointment_window(params, london_today(now))?;
        let appointments = {
            let state = self.read();
            if state.patient(patient_id).is_none() {
                return Err(ProviderError::PatientNotFound(format!(
                    "Patient/{patient_id} not found"
                )));
            }
            state.patient_appointments(patient_id, from, to)
        };
        let entries = appointments
            .iter()
            .map(|a| (a.to_fhir(), "match"))
            .collect();
        Ok(Reply::ok(self.searchset(entries)))
    }

    fn book(&self, body: &[u8]) -> Result<Reply, ProviderError> {
        let request = appointment::booking_request(body)?;
        let appointment = self.write().book(&self.practice, request, self.now())?;
        let version = appointment.version_id();
        Ok(Reply {
            status: StatusCode::CREATED,
            body: appointment.to_fhir(),
            location: Some(format!(
                "{}/Appointment/{}/_history/{version}",
                self.settings.base_url, appointment.id
            )),
            version: Some(version),
            honours_prefer: true,
        })
    }

    /// Amend or cancel. `If-Match` is required (400 when missing, a choice this mock documents:
    /// the specification says consumers SHALL send it), must name the current version (409),
    /// and then the body must change only what the interaction allows (422).
    fn update(
        &self,
        id: &str,
        interaction: Interaction,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Reply, ProviderError> {
        let version = request::if_match(headers)?.ok_or_else(|| {
            ProviderError::BadRequest(
                "If-Match is required to amend or cancel an appointment (e.g. If-Match: W/\"1\")"
                    .into(),
            )
        })?;
        {
            let state = self.read();
            let current = state.appointment(id).ok_or_else(|| {
                ProviderError::NoRecordFound(format!("Appointment/{id} not found"))
            })?;
            if current.version_id() != version {
                return Err(ProviderError::VersionConflict(format!(
                    "If-Match version {version} is not the current version {} of Appointment/{id}",
                    current.version
                )));
            }
        }
        let request = appointment::update_request(body, id)?;
        let now = self.now();
        let updated = if interaction == Interaction::CancelAppointment {
            self.write().cancel(id, &version, request, now)?
        } else {
            self.write().amend(id, &version, request, now)?
        };
        Ok(Reply {
            honours_prefer: true,
            ..Reply::resource(updated.to_fhir(), updated.version_id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use chrono::TimeZone;
    use std::sync::Arc;

    const BASE: &str = "/B82617/STU3/1/gpconnect";
    const CONSUMER_ASID: &str = "200000000359";
    const SLOT_SEARCH: &str = "/Slot?start=ge2025-05-21T09%3A00%3A00%2B01%3A00&end=le2025-05-28T18%3A00%3A00%2B01%3A00&status=free&_include=Slot%3Aschedule&_include%3Arecurse=Schedule%3Aactor%3APractitioner&_include%3Arecurse=Schedule%3Aactor%3ALocation&_include%3Arecurse=Location%3AmanagingOrganization&searchFilter=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7CA20047&searchFilter=https%3A%2F%2Ffhir.nhs.uk%2FSTU3%2FCodeSystem%2FGPConnect-OrganisationType-1%7Cgp-practice";

    /// Wednesday 21 May 2025, 09:00 in London.
    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 5, 21, 8, 0, 0).unwrap()
    }

    fn provider() -> MockProvider {
        MockProvider::at(MockSettings::default(), now())
    }

    /// An unsigned JWT shaped like the recorded demonstrator one.
    fn jwt(scope: &str) -> String {
        let header = json!({ "alg": "none", "typ": "JWT" });
        let payload = json!({
            "iss": "https://consumer.dev.local/",
            "sub": "1",
            "aud": "https://localhost:9443/B82617/STU3/1/gpconnect",
            "exp": 1747730556,
            "iat": 1747730256,
            "reason_for_request": "directcare",
            "requested_scope": scope,
            "requesting_organization": {
                "resourceType": "Organization",
                "identifier": [{ "system": ODS_SYSTEM, "value": "A20047" }],
                "name": "Consumer Surgery"
            },
        });
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        )
    }

    /// A request as the SSP forwards it: all four Ssp headers, the bearer token with the
    /// interaction's scope, `Accept: application/fhir+json`.
    fn request(
        method: Method,
        target: &str,
        interaction: Interaction,
        body: Option<&Value>,
    ) -> http::request::Builder {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{BASE}{target}"))
            .header("Ssp-TraceID", uuid::Uuid::new_v4().to_string())
            .header("Ssp-From", CONSUMER_ASID)
            .header("Ssp-To", "918999198993")
            .header("Ssp-InteractionID", interaction.urn())
            .header(
                "Authorization",
                format!("Bearer {}", jwt(interaction.scope().as_str())),
            )
            .header("Accept", "application/fhir+json");
        if body.is_some() {
            builder = builder.header("Content-Type", FHIR_JSON);
        }
        builder
    }

    fn build(builder: http::request::Builder, body: Option<&Value>) -> Request<Full<Bytes>> {
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        builder.body(Full::new(bytes)).expect("test request builds")
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Value,
        raw: Bytes,
    }

    async fn send_request(provider: &MockProvider, req: Request<Full<Bytes>>) -> Answer {
        let response = provider.handle(req).await;
        let status = response.status();
        let headers = response.headers().clone();
        let raw = response
            .into_body()
            .collect()
            .await
            .expect("Full never fails")
            .to_bytes();
        let body = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw).expect("every response body is JSON")
        };
        assert_eq!(headers[CONTENT_TYPE], FHIR_JSON);
        assert_eq!(headers[CACHE_CONTROL], "no-store");
        // Every body any test receives is checked: FHIR JSON has no empty elements.
        let empty = prune::empty_elements(&body);
        assert!(
            raw.is_empty() || empty.is_empty(),
            "empty elements at {empty:?} in {body}"
        );
        Answer {
            status,
            headers,
            body,
            raw,
        }
    }

    async fn send(
        provider: &MockProvider,
        method: Method,
        target: &str,
        interaction: Interaction,
        body: Option<&Value>,
    ) -> Answer {
        let req = build(request(method, target, interaction, body), body);
        send_request(provider, req).await
    }

    /// Asserts a GP Connect OperationOutcome with this status and Spine code.
    fn assert_outcome(answer: &Answer, status: u16, code: &str) {
        assert_eq!(answer.status.as_u16(), status, "{}", answer.body);
        let outcome = &answer.body;
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert_eq!(
            outcome["meta"]["profile"][0],
            outcome::OPERATION_OUTCOME_PROFILE
        );
        let issue = &outcome["issue"][0];
        assert_eq!(issue["severity"], "error");
        assert!(issue["code"].as_str().is_some_and(|c| !c.is_empty()));
        let coding = &issue["details"]["coding"][0];
        assert_eq!(coding["system"], outcome::SPINE_ERROR_CODE_SYSTEM);
        assert_eq!(coding["code"], code, "{outcome}");
        assert!(coding["display"].as_str().is_some_and(|d| !d.is_empty()));
        assert!(issue["diagnostics"].as_str().is_some_and(|d| !d.is_empty()));
        assert!(answer.headers.get(ETAG).is_none());
    }

    fn entries<'a>(bundle: &'a Value, resource_type: &str) -> Vec<&'a Value> {
        bundle["entry"]
            .as_array()
            .map(|e| e.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|e| &e["resource"])
            .filter(|r| r["resourceType"] == resource_type)
            .collect()
    }

    fn etag(answer: &Answer) -> &str {
        answer
            .headers
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The recorded demonstrator create body, re-pointed at `slots` and `patient`.
    fn booking_body(slots: &[&Value], patient: &str) -> Value {
        let mut body: Value = serde_json::from_str(include_str!(
            "fixtures/appointment-create-request.demonstrator-1.2.7-recorded.json"
        ))
        .expect("recorded fixture is JSON");
        let first = slots[0];
        let last = slots[slots.len() - 1];
        body["slot"] = Value::Array(
            slots
                .iter()
                .map(|s| json!({ "reference": format!("Slot/{}", s["id"].as_str().unwrap_or_default()) }))
                .collect(),
        );
        body["start"] = first["start"].clone();
        body["end"] = last["end"].clone();
        body["participant"][0]["actor"]["reference"] = json!(format!("Patient/{patient}"));
        body["participant"][1]["actor"]["reference"] = json!("Location/1");
        body
    }

    async fn free_slots(provider: &MockProvider, schedule: &str) -> Vec<Value> {
        let answer = send(
            provider,
            Method::GET,
            SLOT_SEARCH,
            Interaction::SearchSlot,
            None,
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        entries(&answer.body, "Slot")
            .into_iter()
            .filter(|s| s["schedule"]["reference"] == format!("Schedule/{schedule}"))
            .cloned()
            .collect()
    }

    #[tokio::test]
    async fn metadata_is_the_1_2_7_capability_statement() {
        let p = provider();
        let answer = send(
            &p,
            Method::GET,
            "/metadata",
            Interaction::ReadMetadata,
            None,
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body["resourceType"], "CapabilityStatement");
        assert_eq!(answer.body["version"], "1.2.7");
        assert_eq!(answer.body["fhirVersion"], "3.0.1");
        assert_eq!(answer.body["meta"]["versionId"], "1");
        assert_eq!(etag(&answer), "W/\"1\"");
        let types: Vec<&str> = answer.body["rest"][0]["resource"]
            .as_array()
            .expect("resources")
            .iter()
            .filter_map(|r| r["type"].as_str())
            .collect();
        assert_eq!(
            types,
            [
                "Patient",
                "Organization",
                "Practitioner",
                "Location",
                "Appointment",
                "Slot"
            ]
        );
        assert_eq!(
            answer.body["rest"][0]["operation"][0]["name"],
            "gpc.registerpatient"
        );
    }

    #[tokio::test]
    async fn find_patient_decodes_the_identifier_and_checks_it() {
        let p = provider();
        for target in [
            "/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number%7C9000000009",
            "/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9000000009",
        ] {
            let answer = send(&p, Method::GET, target, Interaction::SearchPatient, None).await;
            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(answer.body["type"], "searchset");
            assert_eq!(answer.body["meta"]["profile"][0], SEARCHSET_PROFILE);
            let patients = entries(&answer.body, "Patient");
            assert_eq!(patients.len(), 1);
            assert_eq!(patients[0]["identifier"][0]["value"], "9000000009");
            assert_eq!(
                answer.body["entry"][0]["fullUrl"],
                "https://localhost:9443/B82617/STU3/1/gpconnect/Patient/1"
            );
        }
        let unknown = send(
            &p,
            Method::GET,
            "/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9000000033",
            Interaction::SearchPatient,
            None,
        )
        .await;
        assert_eq!(unknown.status, StatusCode::OK);
        assert!(unknown.body.get("entry").is_none(), "empty bundle");
        let bad_system = send(
            &p,
            Method::GET,
            "/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-numbers%7C9000000009",
            Interaction::SearchPatient,
            None,
        )
        .await;
        assert_outcome(&bad_system, 400, "INVALID_IDENTIFIER_SYSTEM");
        let bad_number = send(
            &p,
            Method::GET,
            "/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9000000001",
            Interaction::SearchPatient,
            None,
        )
        .await;
        assert_outcome(&bad_number, 400, "INVALID_NHS_NUMBER");
        let missing = send(
            &p,
            Method::GET,
            "/Patient",
            Interaction::SearchPatient,
            None,
        )
        .await;
        assert_outcome(&missing, 400, "BAD_REQUEST");
    }

    #[tokio::test]
    async fn reads_return_single_resources_with_etags_or_their_not_found_code() {
        let p = provider();
        let cases = [
            (
                "/Patient/2",
                Interaction::ReadPatient,
                "Patient",
                "PATIENT_NOT_FOUND",
                "/Patient/99",
            ),
            (
                "/Practitioner/1",
                Interaction::ReadPractitioner,
                "Practitioner",
                "PRACTITIONER_NOT_FOUND",
                "/Practitioner/99",
            ),
            (
                "/Organization/1",
                Interaction::ReadOrganization,
                "Organization",
                "ORGANISATION_NOT_FOUND",
                "/Organization/99",
            ),
            (
                "/Location/2",
                Interaction::ReadLocation,
                "Location",
                "NO_RECORD_FOUND",
                "/Location/99",
            ),
            (
                "/Appointment/1",
                Interaction::ReadAppointment,
                "Appointment",
                "NO_RECORD_FOUND",
                "/Appointment/99",
            ),
        ];
        for (found, interaction, resource_type, code, missing) in cases {
            let answer = send(&p, Method::GET, found, interaction, None).await;
            assert_eq!(answer.status, StatusCode::OK, "{found}");
            assert_eq!(answer.body["resourceType"], resource_type);
            let version = answer.body["meta"]["versionId"]
                .as_str()
                .expect("versionId");
            assert_eq!(etag(&answer), format!("W/\"{version}\""));
            let answer = send(&p, Method::GET, missing, interaction, None).await;
            assert_outcome(&answer, 404, code);
        }
        let patient = send(
            &p,
            Method::GET,
            "/Patient/2",
            Interaction::ReadPatient,
            None,
        )
        .await;
        assert_eq!(
            patient.body["meta"]["profile"][0],
            practice::PATIENT_PROFILE
        );
        assert_eq!(patient.body["identifier"][0]["value"], "9000000017");
    }

    #[tokio::test]
    async fn find_practitioner_and_organisation_by_identifier() {
        let p = provider();
        let answer = send(
            &p,
            Method::GET,
            "/Practitioner?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fsds-user-id%7C555011111002",
            Interaction::SearchPractitioner,
            None,
        )
        .await;
        let found = entries(&answer.body, "Practitioner");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0]["name"][0]["family"], "Patel");
        assert_eq!(found[0]["identifier"][0]["system"], SDS_USER_SYSTEM);
        let answer = send(
            &p,
            Method::GET,
            "/Organization?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7CB82617",
            Interaction::SearchOrganization,
            None,
        )
        .await;
        let found = entries(&answer.body, "Organization");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0]["identifier"][0]["value"], "B82617");
        let answer = send(
            &p,
            Method::GET,
            "/Organization?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7CA20047",
            Interaction::SearchOrganization,
            None,
        )
        .await;
        assert!(entries(&answer.body, "Organization").is_empty());
        let answer = send(
            &p,
            Method::GET,
            "/Practitioner?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7CB82617",
            Interaction::SearchPractitioner,
            None,
        )
        .await;
        assert_outcome(&answer, 400, "INVALID_IDENTIFIER_SYSTEM");
    }

    fn register_body(nhs_number: &str) -> Value {
        json!({
            "resourceType": "Parameters",
            "parameter": [{
                "name": "registerPatient",
                "resource": {
                    "resourceType": "Patient",
                    "meta": { "profile": [practice::PATIENT_PROFILE] },
                    "identifier": [{ "system": NHS_NUMBER_SYSTEM, "value": nhs_number }],
                    "name": [{ "use": "official", "family": "Dawes", "given": ["Minnie"], "prefix": ["Mrs"] }],
                    "gender": "female",
                    "birthDate": "1952-05-31"
                }
            }]
        })
    }

    #[tokio::test]
    async fn register_patient_creates_a_temporary_registration_once() {
        let p = provider();
        let body = register_body("9000000033");
        let answer = send(
            &p,
            Method::POST,
            "/Patient/$gpc.registerpatient",
            Interaction::RegisterPatient,
            Some(&body),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        let patient = entries(&answer.body, "Patient")[0].clone();
        assert_eq!(patient["id"], "4");
        let registration = &patient["extension"][0]["extension"];
        assert_eq!(
            registration[1]["valueCodeableConcept"]["coding"][0]["code"],
            "T"
        );
        assert!(registration[0]["valuePeriod"]["end"].is_string());
        // Found afterwards, and the $ may arrive percent-encoded.
        let found = send(
            &p,
            Method::GET,
            "/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9000000033",
            Interaction::SearchPatient,
            None,
        )
        .await;
        assert_eq!(entries(&found.body, "Patient").len(), 1);
        let again = send(
            &p,
            Method::POST,
            "/Patient/%24gpc.registerpatient",
            Interaction::RegisterPatient,
            Some(&body),
        )
        .await;
        assert_outcome(&again, 409, "DUPLICATE_REJECTED");
        let seeded = send(
            &p,
            Method::POST,
            "/Patient/$gpc.registerpatient",
            Interaction::RegisterPatient,
            Some(&register_body("9000000009")),
        )
        .await;
        assert_outcome(&seeded, 409, "DUPLICATE_REJECTED");
        let invalid = send(
            &p,
            Method::POST,
            "/Patient/$gpc.registerpatient",
            Interaction::RegisterPatient,
            Some(&register_body("9000000034")),
        )
        .await;
        assert_outcome(&invalid, 400, "INVALID_NHS_NUMBER");
    }

    #[tokio::test]
    async fn registered_and_booked_resources_leave_out_empty_elements() {
        let p = provider();
        // Only the required demographics: no telecom, no address.
        let answer = send(
            &p,
            Method::POST,
            "/Patient/$gpc.registerpatient",
            Interaction::RegisterPatient,
            Some(&register_body("9000000033")),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        let patient = entries(&answer.body, "Patient")[0];
        assert!(patient.get("telecom").is_none() && patient.get("address").is_none());
        let read = send(
            &p,
            Method::GET,
            "/Patient/4",
            Interaction::ReadPatient,
            None,
        )
        .await;
        assert_eq!(read.status, StatusCode::OK);
        assert!(read.body.get("telecom").is_none() && read.body.get("address").is_none());
        // Empty elements the consumer sent are not kept.
        let mut body = register_body("9000000041");
        let sent = &mut body["parameter"][0]["resource"];
        sent["telecom"] = json!([]);
        sent["address"] = json!([{ "line": [""], "city": "" }]);
        sent["name"][0]["given"] = json!(["", "Minnie"]);
        sent["name"][0]["prefix"] = json!([]);
        let answer = send(
            &p,
            Method::POST,
            "/Patient/$gpc.registerpatient",
            Interaction::RegisterPatient,
            Some(&body),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        let patient = entries(&answer.body, "Patient")[0];
        assert!(patient.get("telecom").is_none() && patient.get("address").is_none());
        assert_eq!(patient["name"][0]["given"], json!(["Minnie"]));
        assert!(patient["name"][0].get("prefix").is_none());
        // A booking with an empty description and a booking organisation with empty elements.
        let slots = free_slots(&p, "1").await;
        let mut booking = booking_body(&[&slots[0]], "4");
        booking["description"] = json!("");
        booking["comment"] = json!("");
        booking["contained"][0]["telecom"] = json!([]);
        booking["contained"][0]["address"] = json!({});
        let booked = send(
            &p,
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&booking),
        )
        .await;
        assert_eq!(booked.status, StatusCode::CREATED, "{}", booked.body);
        assert!(booked.body.get("description").is_none());
        assert!(booked.body.get("comment").is_none());
        let contained = &booked.body["contained"][0];
        assert!(contained.get("telecom").is_none() && contained.get("address").is_none());
        assert_eq!(contained["identifier"][0]["value"], "A20047");
    }

    /// Every resource the provider can render, straight from the model: no empty elements.
    #[test]
    fn every_rendering_leaves_out_empty_elements() {
        let p = provider();
        let practice = &p.practice;
        let state = p.read();
        let mut rendered = vec![
            capability::capability_statement(),
            practice.organization.to_fhir(practice),
            p.searchset(Vec::new()),
        ];
        rendered.extend(
            practice
                .locations
                .iter()
                .map(|l| l.to_fhir(&practice.organization)),
        );
        rendered.extend(practice.practitioners.iter().map(|x| x.to_fhir()));
        rendered.extend(practice.schedules.iter().map(|s| s.to_fhir(state.horizon)));
        rendered.extend(
            Practice::seed_patients()
                .iter()
                .map(|x| x.to_fhir(&practice.organization)),
        );
        let until = now() + chrono::Duration::days(store::DIARY_DAYS);
        let slots = state.free_slots(to_london(now()), to_london(until), now());
        assert!(!slots.is_empty());
        rendered.extend(slots.iter().map(|s| s.to_fhir()));
        let seeded = state.appointment("1").expect("the practice's own booking");
        rendered.push(seeded.to_fhir());
        for resource in &rendered {
            let empty = prune::empty_elements(resource);
            assert!(
                empty.is_empty(),
                "empty elements at {empty:?} in {resource}"
            );
        }
    }

    #[tokio::test]
    async fn slot_search_returns_free_slots_and_includes_shaped_like_the_recorded_bundle() {
        let p = provider();
        let answer = send(&p, Method::GET, SLOT_SEARCH, Interaction::SearchSlot, None).await;
        assert_eq!(answer.status, StatusCode::OK);
        let bundle = &answer.body;
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["type"], "searchset");
        assert_eq!(bundle["meta"]["profile"][0], SEARCHSET_PROFILE);
        let slots = entries(bundle, "Slot");
        // Five weekdays (21-23, 26-28 May less today's first hour) on three schedules.
        assert!(slots.len() > 700, "{}", slots.len());
        let from = DateTime::parse_from_rfc3339("2025-05-21T09:00:00+01:00").unwrap();
        let to = DateTime::parse_from_rfc3339("2025-05-28T18:00:00+01:00").unwrap();
        let mut ids = BTreeSet::new();
        for slot in &slots {
            assert_eq!(slot["status"], "free");
            let start = DateTime::parse_from_rfc3339(slot["start"].as_str().unwrap()).unwrap();
            let end = DateTime::parse_from_rfc3339(slot["end"].as_str().unwrap()).unwrap();
            assert!(start >= from && end <= to);
            assert_eq!(end - start, chrono::Duration::minutes(10));
            assert!(
                ids.insert(slot["id"].as_str().unwrap().to_string()),
                "unique ids"
            );
        }
        // The recorded demonstrator slot has exactly the same elements.
        let recorded: Value = serde_json::from_slice(&slot_bundle_fixture()).unwrap();
        let keys =
            |v: &Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
        let recorded_slot = entries(&recorded, "Slot")[0];
        assert_eq!(keys(slots[0]), keys(recorded_slot));
        assert_eq!(
            keys(entries(bundle, "Schedule")[0]),
            keys(entries(&recorded, "Schedule")[0])
        );
        let channels: BTreeSet<&str> = slots
            .iter()
            .filter_map(|s| s["extension"][0]["valueCode"].as_str())
            .collect();
        assert_eq!(
            channels,
            BTreeSet::from(["In-person", "Telephone", "Video"])
        );
        let types: BTreeSet<&str> = slots
            .iter()
            .filter_map(|s| s["serviceType"][0]["text"].as_str())
            .collect();
        assert!(types.len() >= 3);
        let schedules = entries(bundle, "Schedule");
        assert_eq!(schedules.len(), 3);
        assert!(schedules
            .iter()
            .all(|s| s["serviceCategory"]["text"].is_string()));
        assert_eq!(entries(bundle, "Practitioner").len(), 3);
        assert_eq!(entries(bundle, "Location").len(), 2);
        assert_eq!(entries(bundle, "Organization").len(), 1);
        // Without the recursive includes only Slots and Schedules come back.
        let plain = send(
            &p,
            Method::GET,
            "/Slot?start=ge2025-05-22&end=le2025-05-22&status=free&_include=Slot:schedule",
            Interaction::SearchSlot,
            None,
        )
        .await;
        assert!(entries(&plain.body, "Practitioner").is_empty());
        assert!(entries(&plain.body, "Location").is_empty());
        assert_eq!(entries(&plain.body, "Schedule").len(), 3);
        // A weekend has no slots: an empty bundle.
        let weekend = send(
            &p,
            Method::GET,
            "/Slot?start=ge2025-05-24&end=le2025-05-25&status=free&_include=Slot:schedule",
            Interaction::SearchSlot,
            None,
        )
        .await;
        assert!(weekend.body.get("entry").is_none());
    }

    #[tokio::test]
    async fn slot_search_ignores_unrecognised_includes_and_malformed_filters() {
        let p = provider();
        let plain = "/Slot?start=ge2025-05-22&end=le2025-05-23&status=free&_include=Slot:schedule";
        let expected = send(&p, Method::GET, plain, Interaction::SearchSlot, None).await;
        assert_eq!(expected.status, StatusCode::OK);
        let ids = |bundle: &Value| -> Vec<Value> {
            entries(bundle, "Slot")
                .iter()
                .map(|s| s["id"].clone())
                .collect()
        };
        assert!(!ids(&expected.body).is_empty());
        for extra in [
            "searchFilter=abc",
            "searchFilter=https%3A%2F%2Ffhir.nhs.uk%2FSTU3%2FCodeSystem%2FGPConnect-OrganisationType-1%7C",
            "searchFilter=%7Curgent-care",
            "_include=Schedule:actor:Practitioner",
            "_include:recurse=Slot:patient",
        ] {
            let answer = send(
                &p,
                Method::GET,
                &format!("{plain}&{extra}"),
                Interaction::SearchSlot,
                None,
            )
            .await;
            assert_eq!(answer.status, StatusCode::OK, "{extra}: {}", answer.body);
            assert_eq!(ids(&answer.body), ids(&expected.body), "{extra}");
            assert!(entries(&answer.body, "Practitioner").is_empty(), "{extra}");
        }
    }

    #[tokio::test]
    async fn slot_search_filters_leave_out_schedules_embargoed_from_the_booking_organisation() {
        let p = provider();
        let search = |filters: &str| {
            format!(
                "/Slot?start=ge2025-05-22&end=le2025-05-23&status=free&_include=Slot:schedule{filters}"
            )
        };
        let ods = |code: &str| {
            format!("&searchFilter=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7C{code}")
        };
        let kind = |code: &str| {
            format!("&searchFilter=https%3A%2F%2Ffhir.nhs.uk%2FSTU3%2FCodeSystem%2FGPConnect-OrganisationType-1%7C{code}")
        };
        let schedules_of = |body: &Value| -> BTreeSet<String> {
            entries(body, "Slot")
                .iter()
                .filter_map(|s| s["schedule"]["reference"].as_str())
                .map(str::to_string)
                .collect()
        };
        let all: BTreeSet<String> = ["Schedule/1", "Schedule/2", "Schedule/3"]
            .map(String::from)
            .into();
        let open: BTreeSet<String> = ["Schedule/1", "Schedule/2"].map(String::from).into();
        let cases = [
            (String::new(), &all),
            (format!("{}{}", ods("A20047"), kind("urgent-care")), &all),
            (format!("{}{}", ods("Y12345"), kind("gp-practice")), &all),
            (format!("{}{}", ods("Y12345"), kind("urgent-care")), &open),
            (ods("Y12345"), &open),
            (kind("urgent-care"), &open),
        ];
        let unfiltered = send(&p, Method::GET, &search(""), Interaction::SearchSlot, None).await;
        for (filters, expected) in cases {
            let answer = send(
                &p,
                Method::GET,
                &search(&filters),
                Interaction::SearchSlot,
                None,
            )
            .await;
            assert_eq!(answer.status, StatusCode::OK, "{filters}");
            assert_eq!(&schedules_of(&answer.body), expected, "{filters}");
            let included: BTreeSet<String> = entries(&answer.body, "Schedule")
                .iter()
                .filter_map(|s| s["id"].as_str())
                .map(|id| format!("Schedule/{id}"))
                .collect();
            assert_eq!(&included, expected, "{filters}");
            let fewer =
                entries(&answer.body, "Slot").len() < entries(&unfiltered.body, "Slot").len();
            assert_eq!(fewer, expected.len() < all.len(), "{filters}");
        }
    }

    /// Parameter errors as the provider test pack (SearchForFreeSlots.feature) expects: a
    /// missing start, end or status is 400 BAD_REQUEST; a bad value, a range over 14 days or
    /// an end before the start is 422 INVALID_PARAMETER.
    #[tokio::test]
    async fn slot_search_parameter_errors_are_those_of_the_provider_test_pack() {
        let p = provider();
        for (target, status, code) in [
            ("/Slot?end=le2025-05-23&status=free&_include=Slot:schedule", 400, "BAD_REQUEST"),
            ("/Slot?status=free&_include=Slot:schedule", 400, "BAD_REQUEST"),
            ("/Slot?start=ge2025-05-21&status=free&_include=Slot:schedule", 400, "BAD_REQUEST"),
            ("/Slot?start=ge2025-05-21&end=le2025-05-23&_include=Slot:schedule", 400, "BAD_REQUEST"),
            ("/Slot?start=ge2025-05-21&end=le2025-05-23&status=busy&_include=Slot:schedule", 422, "INVALID_PARAMETER"),
            ("/Slot?start=ge2025-05-21&end=le2025-06-23&status=free&_include=Slot:schedule", 422, "INVALID_PARAMETER"),
            ("/Slot?start=ge2025-05-21T09:00:00%2001:00&end=le2025-05-23&status=free&_include=Slot:schedule", 422, "INVALID_PARAMETER"),
            ("/Slot?start=ge2025-05-23&end=le2025-05-22&status=free&_include=Slot:schedule", 422, "INVALID_PARAMETER"),
        ] {
            let answer = send(&p, Method::GET, target, Interaction::SearchSlot, None).await;
            assert_outcome(&answer, status, code);
        }
    }

    #[tokio::test]
    async fn search_book_read_amend_cancel_with_versions_and_if_match() {
        let p = provider();
        let slots = free_slots(&p, "1").await;
        let slot = &slots[0];
        let slot_id = slot["id"].as_str().unwrap().to_string();

        // Book: 201, Location, ETag, the 1.2.7 appointment shape.
        let body = booking_body(&[slot], "1");
        let booked = send(
            &p,
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&body),
        )
        .await;
        assert_eq!(booked.status, StatusCode::CREATED, "{}", booked.body);
        let appointment = booked.body.clone();
        let id = appointment["id"].as_str().unwrap().to_string();
        assert_eq!(appointment["meta"]["versionId"], "1");
        assert_eq!(
            appointment["meta"]["profile"][0],
            appointment::APPOINTMENT_PROFILE
        );
        assert_eq!(etag(&booked), "W/\"1\"");
        assert_eq!(
            booked.headers[LOCATION],
            format!("https://localhost:9443/B82617/STU3/1/gpconnect/Appointment/{id}/_history/1")
        );
        assert_eq!(appointment["status"], "booked");
        assert_eq!(
            appointment["serviceType"][0]["text"],
            "General GP appointment"
        );
        assert_eq!(appointment["serviceCategory"]["text"], "General practice");
        assert_eq!(appointment["start"], slot["start"]);
        assert_eq!(
            appointment["slot"][0]["reference"],
            format!("Slot/{slot_id}")
        );
        assert_eq!(appointment["contained"][0]["name"], "Test Suite Validator");
        assert_eq!(appointment["description"], "Default Description");

        // The slot is no longer free.
        assert!(free_slots(&p, "1")
            .await
            .iter()
            .all(|s| s["id"] != slot_id.as_str()));

        // Read.
        let read = send(
            &p,
            Method::GET,
            &format!("/Appointment/{id}"),
            Interaction::ReadAppointment,
            None,
        )
        .await;
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(read.body, appointment);
        assert_eq!(etag(&read), "W/\"1\"");

        // Amend the comment at version 1.
        let mut amend = read.body.clone();
        amend["comment"] = json!("Patient would like a chaperone");
        let builder = request(
            Method::PUT,
            &format!("/Appointment/{id}"),
            Interaction::AmendAppointment,
            Some(&amend),
        )
        .header("If-Match", "W/\"1\"");
        let amended = send_request(&p, build(builder, Some(&amend))).await;
        assert_eq!(amended.status, StatusCode::OK, "{}", amended.body);
        assert_eq!(amended.body["meta"]["versionId"], "2");
        assert_eq!(amended.body["comment"], "Patient would like a chaperone");
        assert_eq!(etag(&amended), "W/\"2\"");

        // The same amend again with the stale version: 409.
        let builder = request(
            Method::PUT,
            &format!("/Appointment/{id}"),
            Interaction::AmendAppointment,
            Some(&amend),
        )
        .header("If-Match", "W/\"1\"");
        let stale = send_request(&p, build(builder, Some(&amend))).await;
        assert_outcome(&stale, 409, "FHIR_CONSTRAINT_VIOLATION");

        // Amending anything but description/comment: 422.
        let mut moved = amended.body.clone();
        moved["start"] = slots[1]["start"].clone();
        let builder = request(
            Method::PUT,
            &format!("/Appointment/{id}"),
            Interaction::AmendAppointment,
            Some(&moved),
        )
        .header("If-Match", "W/\"2\"");
        assert_outcome(
            &send_request(&p, build(builder, Some(&moved))).await,
            422,
            "INVALID_RESOURCE",
        );

        // Cancel at version 2.
        let mut cancel = amended.body.clone();
        cancel["status"] = json!("cancelled");
        cancel["extension"].as_array_mut().unwrap().push(json!({
            "url": appointment::CANCELLATION_REASON_URL,
            "valueString": "Patient no longer needs the appointment"
        }));
        let builder = request(
            Method::PUT,
            &format!("/Appointment/{id}"),
            Interaction::CancelAppointment,
            Some(&cancel),
        )
        .header("If-Match", "W/\"2\"");
        let cancelled = send_request(&p, build(builder, Some(&cancel))).await;
        assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
        assert_eq!(cancelled.body["status"], "cancelled");
        assert_eq!(cancelled.body["meta"]["versionId"], "3");
        assert_eq!(etag(&cancelled), "W/\"3\"");
        let reason = cancelled.body["extension"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["url"] == appointment::CANCELLATION_REASON_URL)
            .expect("cancellation reason extension");
        assert_eq!(
            reason["valueString"],
            "Patient no longer needs the appointment"
        );

        // The slot is free again and the appointment reads as cancelled.
        assert!(free_slots(&p, "1")
            .await
            .iter()
            .any(|s| s["id"] == slot_id.as_str()));
        let read = send(
            &p,
            Method::GET,
            &format!("/Appointment/{id}"),
            Interaction::ReadAppointment,
            None,
        )
        .await;
        assert_eq!(read.body["status"], "cancelled");

        // The patient's appointments include it.
        let listed = send(
            &p,
            Method::GET,
            "/Patient/1/Appointment?start=ge2025-05-21&start=le2025-06-18",
            Interaction::SearchPatientAppointments,
            None,
        )
        .await;
        assert_eq!(listed.status, StatusCode::OK);
        let appointments = entries(&listed.body, "Appointment");
        assert_eq!(appointments.len(), 1);
        assert_eq!(appointments[0]["id"], id.as_str());
        assert_eq!(appointments[0]["status"], "cancelled");

        // A cancelled appointment cannot be amended.
        let builder = request(
            Method::PUT,
            &format!("/Appointment/{id}"),
            Interaction::AmendAppointment,
            Some(&amend),
        )
        .header("If-Match", "W/\"3\"");
        let mut late = amend.clone();
        late["status"] = json!("booked");
        assert_outcome(
            &send_request(&p, build(builder, Some(&late))).await,
            422,
            "INVALID_RESOURCE",
        );
    }

    #[tokio::test]
    async fn adjacent_slots_book_as_one_appointment() {
        let p = provider();
        let slots = free_slots(&p, "2").await;
        let body = booking_body(&[&slots[0], &slots[1]], "2");
        let booked = send(
            &p,
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&body),
        )
        .await;
        assert_eq!(booked.status, StatusCode::CREATED, "{}", booked.body);
        assert_eq!(booked.body["slot"].as_array().map(Vec::len), Some(2));
        assert_eq!(booked.body["end"], slots[1]["end"]);
        let gap = booking_body(&[&slots[2], &slots[4]], "2");
        let answer = send(
            &p,
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&gap),
        )
        .await;
        assert_outcome(&answer, 422, "INVALID_RESOURCE");
    }

    #[tokio::test]
    async fn booking_errors_have_their_codes() {
        let p = provider();
        let slots = free_slots(&p, "3").await;
        let mut unknown_patient = booking_body(&[&slots[0]], "42");
        let answer = send(
            &p,
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&unknown_patient),
        )
        .await;
        assert_outcome(&answer, 422, "REFERENCE_NOT_FOUND");
        unknown_patient["slot"][0]["reference"] = json!("Slot/3-20250101-0900");
        unknown_patient["participant"][0]["actor"]["reference"] = json!("Patient/1");
        let answer = send(
            &p,
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&unknown_patient),
        )
        .await;
        assert_outcome(&answer, 422, "REFERENCE_NOT_FOUND");
        let mut long = booking_body(&[&slots[0]], "1");
        long["description"] = json!("d".repeat(101));
        let answer = send(
            &p,
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&long),
        )
        .await;
        assert_outcome(&answer, 422, "INVALID_RESOURCE");
        let mut proposed = booking_body(&[&slots[0]], "1");
        proposed["status"] = json!("proposed");
        let answer = send(
            &p,
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&proposed),
        )
        .await;
        assert_outcome(&answer, 422, "INVALID_RESOURCE");
        let not_json = request(
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            None,
        )
        .header("Content-Type", FHIR_JSON)
        .body(Full::new(Bytes::from_static(b"{\"resourceType\":")))
        .unwrap();
        assert_outcome(&send_request(&p, not_json).await, 400, "BAD_REQUEST");
    }

    #[tokio::test]
    async fn booking_a_busy_slot_is_409_duplicate_rejected() {
        let p = provider();
        let slots = free_slots(&p, "1").await;
        let body = booking_body(&[&slots[0]], "1");
        let first = send(
            &p,
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&body),
        )
        .await;
        assert_eq!(first.status, StatusCode::CREATED);
        let second = send(
            &p,
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&booking_body(&[&slots[0]], "2")),
        )
        .await;
        assert_outcome(&second, 409, "DUPLICATE_REJECTED");
        assert_eq!(second.body["issue"][0]["code"], "duplicate");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_bookings_of_one_slot_succeed_exactly_once() {
        let p = Arc::new(provider());
        let slots = free_slots(&p, "2").await;
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let p = Arc::clone(&p);
                let body = booking_body(&[&slots[5]], if i % 2 == 0 { "1" } else { "2" });
                tokio::spawn(async move {
                    let req = build(
                        request(
                            Method::POST,
                            "/Appointment",
                            Interaction::CreateAppointment,
                            Some(&body),
                        ),
                        Some(&body),
                    );
                    let answer = send_request(&p, req).await;
                    if answer.status != StatusCode::CREATED {
                        assert_outcome(&answer, 409, "DUPLICATE_REJECTED");
                    }
                    answer.status
                })
            })
            .collect();
        let mut created = 0;
        for task in tasks {
            if task.await.expect("task completes") == StatusCode::CREATED {
                created += 1;
            }
        }
        assert_eq!(created, 1);
        let mut booked = 0;
        for patient in ["1", "2"] {
            let listed = send(
                &p,
                Method::GET,
                &format!("/Patient/{patient}/Appointment?start=ge2025-05-21&start=le2025-06-18"),
                Interaction::SearchPatientAppointments,
                None,
            )
            .await;
            booked += entries(&listed.body, "Appointment").len();
        }
        assert_eq!(booked, 1);
    }

    #[tokio::test]
    async fn prefer_return_minimal_sends_no_body() {
        let p = provider();
        let slots = free_slots(&p, "1").await;
        let body = booking_body(&[&slots[3]], "3");
        let builder = request(
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&body),
        )
        .header("Prefer", "return=minimal");
        let answer = send_request(&p, build(builder, Some(&body))).await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(answer.raw.is_empty());
        assert_eq!(etag(&answer), "W/\"1\"");
        assert!(answer.headers.get(LOCATION).is_some());
        let builder = request(
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&body),
        )
        .header("Prefer", "return=representation");
        let answer = send_request(&p, build(builder, Some(&body))).await;
        assert_outcome(&answer, 409, "DUPLICATE_REJECTED");
    }

    #[tokio::test]
    async fn the_seeded_practice_booking_is_retrievable() {
        let p = provider();
        let listed = send(
            &p,
            Method::GET,
            "/Patient/3/Appointment?start=ge2025-05-21&start=le2025-06-18",
            Interaction::SearchPatientAppointments,
            None,
        )
        .await;
        let appointments = entries(&listed.body, "Appointment");
        assert_eq!(appointments.len(), 1);
        assert_eq!(appointments[0]["start"], "2025-05-22T08:30:00+01:00");
        assert_eq!(
            appointments[0]["contained"][0]["identifier"][0]["value"],
            "B82617"
        );
    }

    #[tokio::test]
    async fn patient_appointment_search_checks_its_parameters_and_patient() {
        let p = provider();
        for target in [
            "/Patient/1/Appointment",
            "/Patient/1/Appointment?start=ge2025-05-21",
            "/Patient/1/Appointment?start=ge2025-05-20&start=le2025-06-01",
            "/Patient/1/Appointment?start=ge2025-05-21T09%3A00%3A00%2B01%3A00&start=le2025-06-01",
        ] {
            let answer = send(
                &p,
                Method::GET,
                target,
                Interaction::SearchPatientAppointments,
                None,
            )
            .await;
            assert_outcome(&answer, 422, "INVALID_PARAMETER");
        }
        let answer = send(
            &p,
            Method::GET,
            "/Patient/77/Appointment?start=ge2025-05-21&start=le2025-06-01",
            Interaction::SearchPatientAppointments,
            None,
        )
        .await;
        assert_outcome(&answer, 404, "PATIENT_NOT_FOUND");
    }

    #[tokio::test]
    async fn every_ssp_header_is_required_and_ssp_to_must_be_ours() {
        let p = provider();
        for header in ["Ssp-TraceID", "Ssp-From", "Ssp-To", "Ssp-InteractionID"] {
            let mut req = build(
                request(Method::GET, "/metadata", Interaction::ReadMetadata, None),
                None,
            );
            req.headers_mut().remove(header);
            let answer = send_request(&p, req).await;
            assert_outcome(&answer, 400, "BAD_REQUEST");
            assert!(answer.body["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains(header));
        }
        let mut req = build(
            request(Method::GET, "/metadata", Interaction::ReadMetadata, None),
            None,
        );
        req.headers_mut()
            .insert("ssp-to", HeaderValue::from_static("123456789123"));
        assert_outcome(&send_request(&p, req).await, 400, "BAD_REQUEST");
        // Real consumers send Ssp-InteractionId (lower-case d): the same header.
        let mut req = build(
            request(Method::GET, "/metadata", Interaction::ReadMetadata, None),
            None,
        );
        req.headers_mut().remove("Ssp-InteractionID");
        req.headers_mut().insert(
            http::HeaderName::from_static("ssp-interactionid"),
            HeaderValue::from_static("urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1"),
        );
        assert_eq!(send_request(&p, req).await.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn the_interaction_must_fit_the_method_and_path() {
        let p = provider();
        let answer = send(&p, Method::GET, "/metadata", Interaction::ReadPatient, None).await;
        assert_outcome(&answer, 400, "BAD_REQUEST");
        let answer = send(
            &p,
            Method::GET,
            "/Patient/1",
            Interaction::ReadPractitioner,
            None,
        )
        .await;
        assert_outcome(&answer, 400, "BAD_REQUEST");
        let slots = free_slots(&p, "1").await;
        let body = booking_body(&[&slots[0]], "1");
        let answer = send(
            &p,
            Method::PUT,
            "/Appointment/1",
            Interaction::CreateAppointment,
            Some(&body),
        )
        .await;
        assert_outcome(&answer, 400, "BAD_REQUEST");
        let answer = send(
            &p,
            Method::POST,
            "/Appointment",
            Interaction::AmendAppointment,
            Some(&body),
        )
        .await;
        assert_outcome(&answer, 400, "BAD_REQUEST");
    }

    #[tokio::test]
    async fn amend_and_cancel_swapped_are_refused() {
        let p = provider();
        let slots = free_slots(&p, "1").await;
        let body = booking_body(&[&slots[0]], "1");
        let booked = send(
            &p,
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            Some(&body),
        )
        .await;
        let id = booked.body["id"].as_str().unwrap().to_string();
        // A cancel body declared as an amend.
        let mut cancel = booked.body.clone();
        cancel["status"] = json!("cancelled");
        cancel["extension"].as_array_mut().unwrap().push(json!({
            "url": appointment::CANCELLATION_REASON_URL, "valueString": "Unwell"
        }));
        let builder = request(
            Method::PUT,
            &format!("/Appointment/{id}"),
            Interaction::AmendAppointment,
            Some(&cancel),
        )
        .header("If-Match", "W/\"1\"");
        assert_outcome(
            &send_request(&p, build(builder, Some(&cancel))).await,
            422,
            "INVALID_RESOURCE",
        );
        // An amend body declared as a cancel.
        let mut amend = booked.body.clone();
        amend["comment"] = json!("New comment");
        let builder = request(
            Method::PUT,
            &format!("/Appointment/{id}"),
            Interaction::CancelAppointment,
            Some(&amend),
        )
        .header("If-Match", "W/\"1\"");
        assert_outcome(
            &send_request(&p, build(builder, Some(&amend))).await,
            422,
            "INVALID_RESOURCE",
        );
        // Nothing changed.
        let read = send(
            &p,
            Method::GET,
            &format!("/Appointment/{id}"),
            Interaction::ReadAppointment,
            None,
        )
        .await;
        assert_eq!(read.body, booked.body);
    }

    #[tokio::test]
    async fn if_match_is_required_and_must_be_an_entity_tag() {
        let p = provider();
        let read = send(
            &p,
            Method::GET,
            "/Appointment/1",
            Interaction::ReadAppointment,
            None,
        )
        .await;
        let mut amend = read.body.clone();
        amend["comment"] = json!("x");
        let answer = send(
            &p,
            Method::PUT,
            "/Appointment/1",
            Interaction::AmendAppointment,
            Some(&amend),
        )
        .await;
        assert_outcome(&answer, 400, "BAD_REQUEST");
        let builder = request(
            Method::PUT,
            "/Appointment/1",
            Interaction::AmendAppointment,
            Some(&amend),
        )
        .header("If-Match", "1");
        assert_outcome(
            &send_request(&p, build(builder, Some(&amend))).await,
            400,
            "BAD_REQUEST",
        );
        let builder = request(
            Method::PUT,
            "/Appointment/99",
            Interaction::AmendAppointment,
            Some(&amend),
        )
        .header("If-Match", "W/\"1\"");
        assert_outcome(
            &send_request(&p, build(builder, Some(&amend))).await,
            404,
            "NO_RECORD_FOUND",
        );
        // A strong tag is accepted too.
        let builder = request(
            Method::PUT,
            "/Appointment/1",
            Interaction::AmendAppointment,
            Some(&amend),
        )
        .header("If-Match", "\"1\"");
        let answer = send_request(&p, build(builder, Some(&amend))).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }

    #[tokio::test]
    async fn bearer_token_is_checked() {
        let p = provider();
        let mut req = build(
            request(Method::GET, "/metadata", Interaction::ReadMetadata, None),
            None,
        );
        req.headers_mut().remove("Authorization");
        assert_outcome(&send_request(&p, req).await, 400, "BAD_REQUEST");
        let mut req = build(
            request(Method::GET, "/metadata", Interaction::ReadMetadata, None),
            None,
        );
        req.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {}", jwt("patient/*.read"))).unwrap(),
        );
        assert_outcome(&send_request(&p, req).await, 400, "BAD_REQUEST");
        let mut req = build(
            request(Method::GET, "/metadata", Interaction::ReadMetadata, None),
            None,
        );
        let signed = format!("Bearer {}c2lnbmF0dXJl", jwt("organization/*.read"));
        req.headers_mut()
            .insert("Authorization", HeaderValue::from_str(&signed).unwrap());
        assert_outcome(&send_request(&p, req).await, 400, "BAD_REQUEST");
    }

    #[tokio::test]
    async fn paths_methods_and_ids() {
        let p = provider();
        let req = Request::get("/other/metadata")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_outcome(&send_request(&p, req).await, 404, "NO_RECORD_FOUND");
        let answer = send(&p, Method::GET, "", Interaction::ReadMetadata, None).await;
        assert_outcome(&answer, 404, "NO_RECORD_FOUND");
        let answer = send(
            &p,
            Method::GET,
            "/Encounter/1",
            Interaction::ReadPatient,
            None,
        )
        .await;
        assert_outcome(&answer, 501, "NOT_IMPLEMENTED");
        let answer = send(
            &p,
            Method::POST,
            "/Patient/$gpc.getcarerecord",
            Interaction::RegisterPatient,
            None,
        )
        .await;
        assert_outcome(&answer, 501, "NOT_IMPLEMENTED");
        let answer = send(
            &p,
            Method::DELETE,
            "/Appointment/1",
            Interaction::CancelAppointment,
            None,
        )
        .await;
        assert_outcome(&answer, 400, "BAD_REQUEST");
        let answer = send(
            &p,
            Method::POST,
            "/metadata",
            Interaction::ReadMetadata,
            None,
        )
        .await;
        assert_outcome(&answer, 400, "BAD_REQUEST");
        let answer = send(
            &p,
            Method::GET,
            "/Patient/a_b",
            Interaction::ReadPatient,
            None,
        )
        .await;
        assert_outcome(&answer, 400, "BAD_REQUEST");
        assert!(is_fhir_id("Aa-9.z") && !is_fhir_id("") && !is_fhir_id(&"a".repeat(65)));
    }

    #[tokio::test]
    async fn json_only_and_xml_is_415() {
        let p = provider();
        let mut req = build(
            request(Method::GET, "/metadata", Interaction::ReadMetadata, None),
            None,
        );
        req.headers_mut()
            .insert("Accept", HeaderValue::from_static("application/fhir+xml"));
        assert_outcome(&send_request(&p, req).await, 415, "UNSUPPORTED_MEDIA_TYPE");
        let answer = send(
            &p,
            Method::GET,
            "/metadata?_format=application%2Ffhir%2Bxml",
            Interaction::ReadMetadata,
            None,
        )
        .await;
        assert_outcome(&answer, 415, "UNSUPPORTED_MEDIA_TYPE");
        let answer = send(
            &p,
            Method::GET,
            "/metadata?_format=json",
            Interaction::ReadMetadata,
            None,
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        let body = register_body("9000000033");
        let mut req = build(
            request(
                Method::POST,
                "/Patient/$gpc.registerpatient",
                Interaction::RegisterPatient,
                Some(&body),
            ),
            Some(&body),
        );
        req.headers_mut().insert(
            "Content-Type",
            HeaderValue::from_static("application/fhir+xml"),
        );
        assert_outcome(&send_request(&p, req).await, 415, "UNSUPPORTED_MEDIA_TYPE");
    }

    #[tokio::test]
    async fn bodies_over_the_cap_are_413() {
        let p = provider();
        let huge = Bytes::from(vec![b' '; MAX_REQUEST_BODY_BYTES + 1]);
        let req = request(
            Method::POST,
            "/Appointment",
            Interaction::CreateAppointment,
            None,
        )
        .header("Content-Type", FHIR_JSON)
        .body(Full::new(huge))
        .unwrap();
        let answer = send_request(&p, req).await;
        assert_outcome(&answer, 413, "BAD_REQUEST");
        assert_eq!(answer.body["issue"][0]["code"], "too-long");
    }

    #[tokio::test]
    async fn requests_are_counted_and_the_last_one_recorded() {
        let p = provider();
        assert_eq!(p.request_count(), 0);
        assert!(p.last_request().is_none());
        send(
            &p,
            Method::GET,
            "/metadata?x=1",
            Interaction::ReadMetadata,
            None,
        )
        .await;
        let req = Request::get("/nowhere")
            .body(Full::new(Bytes::new()))
            .unwrap();
        send_request(&p, req).await;
        assert_eq!(p.request_count(), 2);
        let last = p.last_request().expect("recorded");
        assert_eq!(last.uri.path(), "/nowhere");
        assert_eq!(last.method, Method::GET);
    }

    #[test]
    fn the_recorded_slot_bundle_is_embedded() {
        let fixture = slot_bundle_fixture();
        assert_eq!(fixture.len(), 178_437);
        let bundle: Value = serde_json::from_slice(&fixture).expect("fixture is JSON");
        assert_eq!(bundle["type"], "searchset");
        assert_eq!(entries(&bundle, "Slot").len(), 225);
        assert_eq!(entries(&bundle, "Schedule").len(), 3);
    }

    #[test]
    fn default_settings_are_the_development_world() {
        let settings = MockSettings::default();
        assert_eq!(settings.asid, "918999198993");
        assert_eq!(settings.ods_code, "B82617");
        assert!(settings.base_url.ends_with(&settings.base_path));
        let trailing = MockSettings {
            base_path: format!("{BASE}/"),
            ..MockSettings::default()
        };
        assert_eq!(MockProvider::at(trailing, now()).settings().base_path, BASE);
    }

    /// `handle`'s future is `Send` for any body the signature admits, so the integrator can
    /// spawn it (this only has to compile).
    #[allow(dead_code)]
    fn handle_future_is_send<B>(
        provider: &MockProvider,
        req: Request<B>,
    ) -> impl std::future::Future<Output = Response<Full<Bytes>>> + Send + '_
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: std::fmt::Display,
    {
        provider.handle(req)
    }

    #[test]
    fn the_provider_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<MockProvider>();
    }
}
