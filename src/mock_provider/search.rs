//! The search parameters of the GP Connect 1.2.7 searches, checked as the specification asks:
//! `identifier=<system>|<value>` for the Find interactions, the free-slot search's `start`,
//! `end`, `status`, `_include`, `_include:recurse` and `searchFilter`, and the two `start`
//! bounds of Retrieve a patient's appointments. Pure functions of the decoded query.

use chrono::{DateTime, Duration, FixedOffset, NaiveDate};

use super::calendar::SearchDate;
use super::outcome::ProviderError;
use super::practice::{BookableBy, ODS_SYSTEM, ORGANISATION_TYPE_SYSTEM};
use super::request::param_values;

/// The longest free-slot search window GP Connect allows.
pub const MAX_SLOT_SEARCH_DAYS: i64 = 14;

/// The value of `identifier=<system>|<value>`, which must be given once with system `system`.
pub fn identifier<'a>(
    params: &'a [(String, String)],
    system: &str,
) -> Result<&'a str, ProviderError> {
    let values = param_values(params, "identifier");
    let one = match values.as_slice() {
        [one] => *one,
        [] => {
            return Err(ProviderError::BadRequest(
                "the identifier search parameter is required".into(),
            ))
        }
        _ => {
            return Err(ProviderError::BadRequest(
                "the identifier search parameter must be given once".into(),
            ))
        }
    };
    let (given_system, value) = one.split_once('|').ok_or_else(|| {
        ProviderError::InvalidIdentifierSystem(format!("identifier {one} must be {system}|<value>"))
    })?;
    if given_system != system {
        return Err(ProviderError::InvalidIdentifierSystem(format!(
            "identifier system {given_system} is not supported here: use {system}"
        )));
    }
    if value.trim().is_empty() {
        return Err(ProviderError::InvalidIdentifierValue(
            "identifier value is empty".into(),
        ));
    }
    Ok(value)
}

fn invalid(text: impl Into<String>) -> ProviderError {
    ProviderError::InvalidParameter(text.into())
}

/// The single value of a required parameter: missing is 400 BAD_REQUEST (as the provider test
/// pack expects), given twice 422 INVALID_PARAMETER.
fn exactly_one<'a>(params: &'a [(String, String)], name: &str) -> Result<&'a str, ProviderError> {
    match param_values(params, name).as_slice() {
        [one] => Ok(one),
        [] => Err(ProviderError::BadRequest(format!(
            "the {name} parameter is required"
        ))),
        _ => Err(invalid(format!("the {name} parameter must be given once"))),
    }
}

/// `<prefix><date>` with the given prefix (`ge`, `le`).
fn prefixed_date(name: &str, value: &str, prefix: &str) -> Result<SearchDate, ProviderError> {
    let date = value
        .strip_prefix(prefix)
        .ok_or_else(|| invalid(format!("{name}={value} must use the {prefix} prefix")))?;
    SearchDate::parse(date).ok_or_else(|| {
        invalid(format!(
            "{name}={value} is not yyyy-mm-dd or yyyy-mm-ddThh:mm:ss+hh:mm"
        ))
    })
}

/// The booking organisation a free-slot search names through `searchFilter`: its ODS codes and
/// organisation types. Empty when the consumer sent none (or none this provider recognises).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BookingFilter {
    pub ods_codes: Vec<String>,
    pub organisation_types: Vec<String>,
}

impl BookingFilter {
    /// The recognised `searchFilter`s (`<ODS system>|<code>`, `<organisation type system>|<code>`);
    /// any other system, and a malformed or empty value, is ignored.
    fn parse(params: &[(String, String)]) -> Self {
        let mut filter = Self::default();
        for value in param_values(params, "searchFilter") {
            match value.split_once('|') {
                Some((ODS_SYSTEM, code)) if !code.is_empty() => {
                    filter.ods_codes.push(code.to_string());
                }
                Some((ORGANISATION_TYPE_SYSTEM, code)) if !code.is_empty() => {
                    filter.organisation_types.push(code.to_string());
                }
                _ => {}
            }
        }
        filter
    }

    /// Whether a schedule with this embargo matches the search: an open schedule always does;
    /// an embargoed one when the named booking organisation has one of its types or ODS codes.
    /// A search that names no booking organisation is not filtered (the filters are a SHOULD
    /// for consumers).
    pub fn admits(&self, bookable_by: Option<&BookableBy>) -> bool {
        let Some(embargo) = bookable_by else {
            return true;
        };
        if self.ods_codes.is_empty() && self.organisation_types.is_empty() {
            return true;
        }
        self.organisation_types
            .iter()
            .any(|t| embargo.organisation_types.contains(&t.as_str()))
            || self
                .ods_codes
                .iter()
                .any(|c| embargo.ods_codes.contains(&c.as_str()))
    }
}

/// A checked free-slot search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotQuery {
    /// Slots starting at or after this instant.
    pub from: DateTime<FixedOffset>,
    /// Slots ending at or before this instant (the end of the day for a date).
    pub to: DateTime<FixedOffset>,
    pub include_practitioners: bool,
    pub include_locations: bool,
    pub include_organization: bool,
    /// Who is booking, from `searchFilter`: only the slots open to them are returned.
    pub booking: BookingFilter,
}

impl SlotQuery {
    /// Checks the SHALL parameters (`start=ge`, `end=le`, `status=free`, `_include=Slot:schedule`)
    /// and the window (end not before start, at most 14 days). A missing `start`, `end` or
    /// `status` is 400 BAD_REQUEST; anything else wrong is 422 INVALID_PARAMETER. Criteria it does not recognise are ignored, never an error ("SHALL
    /// always be ignored"): other `_include` and `_include:recurse` values, and a `searchFilter`
    /// that is malformed or not an ODS code or organisation type (see [`BookingFilter`]).
    pub fn parse(params: &[(String, String)]) -> Result<Self, ProviderError> {
        // Presence first: a missing parameter is reported before a malformed one.
        let (start, end, status) = (
            exactly_one(params, "start")?,
            exactly_one(params, "end")?,
            exactly_one(params, "status")?,
        );
        let start = prefixed_date("start", start, "ge")?;
        let end = prefixed_date("end", end, "le")?;
        if status != "free" {
            return Err(invalid(format!(
                "status={status} is not supported: use free"
            )));
        }
        let includes = param_values(params, "_include");
        if !includes.contains(&"Slot:schedule") {
            return Err(invalid("_include=Slot:schedule is required"));
        }
        let mut query = Self {
            from: start.first_instant(),
            to: end.end_instant(),
            include_practitioners: false,
            include_locations: false,
            include_organization: false,
            booking: BookingFilter::parse(params),
        };
        for recurse in param_values(params, "_include:recurse") {
            match recurse {
                "Schedule:actor:Practitioner" => query.include_practitioners = true,
                "Schedule:actor:Location" => query.include_locations = true,
                "Location:managingOrganization" => query.include_organization = true,
                _ => {}
            }
        }
        // The last instant `end` covers (all of its day, for a date) is before the first one
        // `start` covers: `end=le<d-1>` with `start=ge<d>` is refused, `end=le<d>` is not.
        let end_before_start = match end {
            SearchDate::Date(_) => end.end_instant() <= start.first_instant(),
            SearchDate::DateTime(instant) => instant < start.first_instant(),
        };
        if end_before_start {
            return Err(invalid("the end of the search window is before its start"));
        }
        if end.first_instant() - start.first_instant() > Duration::days(MAX_SLOT_SEARCH_DAYS) {
            return Err(invalid(format!(
                "the search window is longer than {MAX_SLOT_SEARCH_DAYS} days"
            )));
        }
        Ok(query)
    }
}

/// Checks Retrieve a patient's appointments' bounds: exactly two `start` parameters, one `ge`
/// and one `le`, both `yyyy-mm-dd`, not before `today` and in order. Returns the window as
/// `[from, to)` instants.
pub fn appointment_window(
    params: &[(String, String)],
    today: NaiveDate,
) -> Result<(DateTime<FixedOffset>, DateTime<FixedOffset>), ProviderError> {
    let starts = param_values(params, "start");
    let [a, b] = starts.as_slice() else {
        return Err(invalid(
            "exactly two start parameters are required: start=ge<date>&start=le<date>",
        ));
    };
    let (lower, upper) = match (a.starts_with("ge"), b.starts_with("ge")) {
        (true, false) => (*a, *b),
        (false, true) => (*b, *a),
        _ => return Err(invalid("one start parameter must use ge and the other le")),
    };
    let lower = prefixed_date("start", lower, "ge")?;
    let upper = prefixed_date("start", upper, "le")?;
    let (SearchDate::Date(from), SearchDate::Date(to)) = (lower, upper) else {
        return Err(invalid("start bounds must be dates (yyyy-mm-dd)"));
    };
    if from < today {
        return Err(invalid(format!(
            "start=ge{from} is in the past: only future appointments can be retrieved"
        )));
    }
    if to < from {
        return Err(invalid("start=le is before start=ge"));
    }
    Ok((lower.first_instant(), upper.end_instant()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_provider::calendar::fhir_date_time;
    use crate::mock_provider::request::query_params;

    fn params(query: &str) -> Vec<(String, String)> {
        query_params(Some(query)).expect("test query decodes")
    }

    #[test]
    fn identifier_needs_the_right_system_and_a_value() {
        let system = "https://fhir.nhs.uk/Id/nhs-number";
        let ok = params("identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9000000009");
        assert_eq!(identifier(&ok, system), Ok("9000000009"));
        let raw = params("identifier=https://fhir.nhs.uk/Id/nhs-number|9000000009");
        assert_eq!(identifier(&raw, system), Ok("9000000009"));
        let cases = [
            ("", "BAD_REQUEST"),
            ("identifier=a|1&identifier=a|2", "BAD_REQUEST"),
            ("identifier=9000000009", "INVALID_IDENTIFIER_SYSTEM"),
            (
                "identifier=https://fhir.nhs.uk/Id/sds-user-id|9000000009",
                "INVALID_IDENTIFIER_SYSTEM",
            ),
            (
                "identifier=https://fhir.nhs.uk/Id/nhs-number|",
                "INVALID_IDENTIFIER_VALUE",
            ),
        ];
        for (query, code) in cases {
            assert_eq!(
                identifier(&params(query), system).unwrap_err().spine_code(),
                code,
                "{query}"
            );
        }
    }

    const GOOD: &str = "start=ge2025-05-21T01:00:00%2B01:00&end=le2025-05-23T01:00:00%2B01:00&status=free&_include=Slot:schedule";

    #[test]
    fn the_recorded_slot_search_parses() {
        let query = SlotQuery::parse(&params(&format!(
            "{GOOD}&searchFilter=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7CA20047&searchFilter=https%3A%2F%2Ffhir.nhs.uk%2FSTU3%2FCodeSystem%2FGPConnect-OrganisationType-1%7Curgent-care&_include%3Arecurse=Schedule%3Aactor%3ALocation"
        )))
        .expect("valid search");
        assert_eq!(fhir_date_time(&query.from), "2025-05-21T01:00:00+01:00");
        assert_eq!(fhir_date_time(&query.to), "2025-05-23T01:00:00+01:00");
        assert!(query.include_locations && !query.include_practitioners);
        assert_eq!(query.booking.ods_codes, ["A20047"]);
        assert_eq!(query.booking.organisation_types, ["urgent-care"]);
    }

    #[test]
    fn an_embargoed_schedule_admits_only_the_booking_organisations_it_names() {
        let embargo = BookableBy {
            organisation_types: &["gp-practice"],
            ods_codes: &["A20047"],
        };
        let filter = |ods: &[&str], types: &[&str]| BookingFilter {
            ods_codes: ods.iter().map(|s| s.to_string()).collect(),
            organisation_types: types.iter().map(|s| s.to_string()).collect(),
        };
        let nobody = filter(&[], &[]);
        assert!(nobody.admits(None) && nobody.admits(Some(&embargo)));
        assert!(filter(&["B1"], &["urgent-care"]).admits(None));
        assert!(filter(&["B1"], &["gp-practice"]).admits(Some(&embargo)));
        assert!(filter(&["A20047"], &["urgent-care"]).admits(Some(&embargo)));
        assert!(filter(&[], &["gp-practice"]).admits(Some(&embargo)));
        assert!(!filter(&["B1"], &["urgent-care"]).admits(Some(&embargo)));
        assert!(!filter(&["B1"], &[]).admits(Some(&embargo)));
        assert!(!filter(&[], &["urgent-care"]).admits(Some(&embargo)));
    }

    #[test]
    fn date_only_bounds_cover_whole_days_and_fourteen_days_is_the_limit() {
        let query = SlotQuery::parse(&params(
            "start=ge2025-06-02&end=le2025-06-16&status=free&_include=Slot:schedule",
        ))
        .expect("fourteen days is allowed");
        assert_eq!(fhir_date_time(&query.to), "2025-06-17T00:00:00+01:00");
        let err = SlotQuery::parse(&params(
            "start=ge2025-06-02&end=le2025-06-17&status=free&_include=Slot:schedule",
        ))
        .unwrap_err();
        assert_eq!(err.spine_code(), "INVALID_PARAMETER");
    }

    #[test]
    fn a_missing_start_end_or_status_is_a_bad_request() {
        // SearchForFreeSlots.feature: "should fail due to missing parameters" (400 BAD_REQUEST).
        for query in [
            "end=le2025-05-23&status=free&_include=Slot:schedule",
            "status=free&_include=Slot:schedule",
            "start=ge2025-05-21&status=free&_include=Slot:schedule",
            "start=ge2025-05-21&end=le2025-05-23&_include=Slot:schedule",
            // Missing wins over malformed.
            "start=2025-05-21&status=free&_include=Slot:schedule",
        ] {
            let err = SlotQuery::parse(&params(query)).unwrap_err();
            assert_eq!(err.spine_code(), "BAD_REQUEST", "{query}");
            assert_eq!(err.status().as_u16(), 400, "{query}");
        }
    }

    #[test]
    fn an_end_before_the_start_is_an_invalid_parameter_and_the_same_day_is_not() {
        let refused = [
            // SearchForFreeSlots.feature: a time period of -1 days.
            ("ge2025-05-21", "le2025-05-20"),
            ("ge2025-05-21", "le2025-05-01"),
            (
                "ge2025-05-21T10:00:00%2B01:00",
                "le2025-05-21T09:59:59%2B01:00",
            ),
            ("ge2025-05-21", "le2025-05-20T23:59:59%2B01:00"),
            ("ge2025-05-21T00:00:00%2B01:00", "le2025-05-20"),
        ];
        for (start, end) in refused {
            let query = format!("start={start}&end={end}&status=free&_include=Slot:schedule");
            let err = SlotQuery::parse(&params(&query)).unwrap_err();
            assert_eq!(err.spine_code(), "INVALID_PARAMETER", "{query}");
            assert_eq!(err.status().as_u16(), 422, "{query}");
        }
        let allowed = [
            ("ge2025-05-21", "le2025-05-21"),
            (
                "ge2025-05-21T10:00:00%2B01:00",
                "le2025-05-21T10:00:00%2B01:00",
            ),
            ("ge2025-05-21T10:00:00%2B01:00", "le2025-05-21"),
            ("ge2025-05-21", "le2025-05-21T00:00:00%2B01:00"),
        ];
        for (start, end) in allowed {
            let query = format!("start={start}&end={end}&status=free&_include=Slot:schedule");
            assert!(SlotQuery::parse(&params(&query)).is_ok(), "{query}");
        }
    }

    #[test]
    fn every_broken_slot_search_is_an_invalid_parameter() {
        let cases = [
            "start=ge2025-05-21&end=le2025-05-23&status=free",
            "start=&end=le2025-05-23&status=free&_include=Slot:schedule",
            "start=ge2025-05-21&end=&status=free&_include=Slot:schedule",
            "start=2025-05-21&end=le2025-05-23&status=free&_include=Slot:schedule",
            "start=ge2025-05-21&end=ge2025-05-23&status=free&_include=Slot:schedule",
            "start=ge2025-05-21&start=ge2025-05-22&end=le2025-05-23&status=free&_include=Slot:schedule",
            "start=ge21-05-2025&end=le2025-05-23&status=free&_include=Slot:schedule",
            "start=ge2025-05-21&end=le2025-05-23&status=busy&_include=Slot:schedule",
            "start=ge2025-05-23&end=le2025-05-21&status=free&_include=Slot:schedule",
            // An unencoded '+' survives; an encoded space does not parse.
            "start=ge2025-05-21T01:00:00%2001:00&end=le2025-05-23&status=free&_include=Slot:schedule",
        ];
        for query in cases {
            let err = SlotQuery::parse(&params(query)).unwrap_err();
            assert_eq!(err.spine_code(), "INVALID_PARAMETER", "{query}");
            assert_eq!(err.status().as_u16(), 422);
        }
        let plus =
            "start=ge2025-05-21T01:00:00+01:00&end=le2025-05-23&status=free&_include=Slot:schedule";
        assert!(SlotQuery::parse(&params(plus)).is_ok());
    }

    #[test]
    fn unrecognised_includes_and_malformed_search_filters_are_ignored() {
        let expected = SlotQuery::parse(&params(&format!(
            "{GOOD}&_include%3Arecurse=Schedule%3Aactor%3ALocation"
        )))
        .expect("valid search");
        for extra in [
            "_include=Schedule:actor",
            "_include=Slot:schedule&_include=Slot:schedule",
            "_include:recurse=Patient:x",
            "_include:recurse=",
            "searchFilter=A20047",
            "searchFilter=abc",
            "searchFilter=",
            "searchFilter=%7C",
            "searchFilter=%7CA20047",
            "searchFilter=https%3A%2F%2Ffhir.nhs.uk%2FSTU3%2FCodeSystem%2FGPConnect-OrganisationType-1%7C",
            "searchFilter=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7C",
            "searchFilter=https%3A%2F%2Fexample.org%2Fuc-disposition%7CDx06",
        ] {
            let query = SlotQuery::parse(&params(&format!(
                "{GOOD}&_include%3Arecurse=Schedule%3Aactor%3ALocation&{extra}"
            )));
            assert_eq!(query.as_ref(), Ok(&expected), "{extra}");
        }
    }

    #[test]
    fn appointment_window_takes_exactly_two_future_dates() {
        let today = NaiveDate::from_ymd_opt(2025, 5, 21).expect("date");
        let (from, to) =
            appointment_window(&params("start=le2025-06-01&start=ge2025-05-21"), today)
                .expect("valid window");
        assert_eq!(fhir_date_time(&from), "2025-05-21T00:00:00+01:00");
        assert_eq!(fhir_date_time(&to), "2025-06-02T00:00:00+01:00");
        for query in [
            "",
            "start=ge2025-05-21",
            "start=ge2025-05-21&start=le2025-06-01&start=le2025-06-02",
            "start=ge2025-05-21&start=ge2025-06-01",
            "start=ge2025-05-20&start=le2025-06-01",
            "start=ge2025-05-22&start=le2025-05-21",
            "start=ge2025-05-21T10:00:00%2B01:00&start=le2025-06-01",
            "start=ge2025-13-01&start=le2025-06-01",
        ] {
            let err = appointment_window(&params(query), today).unwrap_err();
            assert_eq!(err.spine_code(), "INVALID_PARAMETER", "{query}");
        }
    }
}
