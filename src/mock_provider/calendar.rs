//! Dates and times as a GP practice in England sees them: Europe/London local time (GMT in
//! winter, BST from the last Sunday of March to the last Sunday of October, both changes at
//! 01:00 UTC) computed without a time-zone database; FHIR `date`/`dateTime` parsing for search
//! parameters; and the `yyyy-mm-ddThh:mm:ss+hh:mm` format GP Connect resources use.

use chrono::{
    DateTime, Datelike, Duration, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, Offset, Utc,
};

/// A fixed offset of `seconds` east of UTC (only ever 0 or 3600 here).
fn fixed(seconds: i32) -> FixedOffset {
    FixedOffset::east_opt(seconds).unwrap_or_else(|| Utc.fix())
}

/// The last Sunday of `month` in `year`.
fn last_sunday(year: i32, month: u32) -> Option<NaiveDate> {
    let first_of_next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)?
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)?
    };
    let last = first_of_next.pred_opt()?;
    let back = i64::from(last.weekday().num_days_from_sunday());
    Some(last - Duration::days(back))
}

/// The UTC instants at which British Summer Time starts and ends in `year`.
fn bst_window(year: i32) -> Option<(NaiveDateTime, NaiveDateTime)> {
    let one_am = NaiveTime::from_hms_opt(1, 0, 0)?;
    Some((
        last_sunday(year, 3)?.and_time(one_am),
        last_sunday(year, 10)?.and_time(one_am),
    ))
}

/// The Europe/London offset in force at `instant`.
pub fn london_offset_at(instant: DateTime<Utc>) -> FixedOffset {
    let naive = instant.naive_utc();
    match bst_window(naive.year()) {
        Some((start, end)) if naive >= start && naive < end => fixed(3600),
        _ => fixed(0),
    }
}

/// The London wall-clock time `date` `time` as an instant with its offset. Exact for every time
/// of day except the hour after 01:00 on the two change-over Sundays (never a surgery hour).
pub fn london_local(date: NaiveDate, time: NaiveTime) -> DateTime<FixedOffset> {
    let naive = date.and_time(time);
    let offset = london_offset_at(naive.and_utc());
    let utc = naive - Duration::seconds(i64::from(offset.local_minus_utc()));
    DateTime::from_naive_utc_and_offset(utc, offset)
}

/// Today's date at the practice.
pub fn london_today(now: DateTime<Utc>) -> NaiveDate {
    now.with_timezone(&london_offset_at(now)).date_naive()
}

/// `instant` in London local time.
pub fn to_london(instant: DateTime<Utc>) -> DateTime<FixedOffset> {
    instant.with_timezone(&london_offset_at(instant))
}

/// The FHIR `instant`/`dateTime` form GP Connect uses: `2025-05-21T14:50:00+01:00`.
pub fn fhir_date_time(instant: &DateTime<FixedOffset>) -> String {
    instant.format("%Y-%m-%dT%H:%M:%S%:z").to_string()
}

/// The FHIR `date` form: `2025-05-21`.
pub fn fhir_date(date: NaiveDate) -> String {
    date.format("%Y-%m-%d").to_string()
}

/// A search parameter value: `yyyy-mm-dd` or `yyyy-mm-ddThh:mm:ss+hh:mm` (or `Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchDate {
    /// A whole day at the practice.
    Date(NaiveDate),
    /// An exact instant.
    DateTime(DateTime<FixedOffset>),
}

impl SearchDate {
    /// Parses the two forms GP Connect allows; anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        let date_shaped = |b: &[u8]| {
            b.len() == 10
                && b.iter().enumerate().all(|(i, c)| match i {
                    4 | 7 => *c == b'-',
                    _ => c.is_ascii_digit(),
                })
        };
        if bytes.len() == 10 {
            return date_shaped(bytes)
                .then(|| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok())
                .flatten()
                .map(Self::Date);
        }
        let normalised;
        let text = match text.strip_suffix('Z') {
            Some(stem) => {
                normalised = format!("{stem}+00:00");
                normalised.as_str()
            }
            None => text,
        };
        let b = text.as_bytes();
        let shaped = b.len() == 25
            && date_shaped(&b[..10])
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && (b[19] == b'+' || b[19] == b'-')
            && b[22] == b':';
        if !shaped {
            return None;
        }
        DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%:z")
            .ok()
            .map(Self::DateTime)
    }

    /// The first instant the value covers (a date starts at London midnight).
    pub fn first_instant(&self) -> DateTime<FixedOffset> {
        match self {
            Self::Date(date) => london_local(*date, NaiveTime::MIN),
            Self::DateTime(instant) => *instant,
        }
    }

    /// The end of the value, exclusive for a date (next London midnight), the instant itself
    /// for a dateTime.
    pub fn end_instant(&self) -> DateTime<FixedOffset> {
        match self {
            Self::Date(date) => match date.succ_opt() {
                Some(next) => london_local(next, NaiveTime::MIN),
                None => london_local(*date, NaiveTime::MIN),
            },
            Self::DateTime(instant) => *instant,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("valid test date")
    }

    #[test]
    fn bst_runs_from_last_sunday_of_march_to_last_sunday_of_october() {
        assert_eq!(last_sunday(2025, 3), Some(date(2025, 3, 30)));
        assert_eq!(last_sunday(2025, 10), Some(date(2025, 10, 26)));
        assert_eq!(last_sunday(2024, 12), Some(date(2024, 12, 29)));
        let at = |y, mo, d, h, mi| Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap();
        assert_eq!(
            london_offset_at(at(2025, 3, 30, 0, 59)).local_minus_utc(),
            0
        );
        assert_eq!(
            london_offset_at(at(2025, 3, 30, 1, 0)).local_minus_utc(),
            3600
        );
        assert_eq!(
            london_offset_at(at(2025, 10, 26, 0, 59)).local_minus_utc(),
            3600
        );
        assert_eq!(
            london_offset_at(at(2025, 10, 26, 1, 0)).local_minus_utc(),
            0
        );
        assert_eq!(
            london_offset_at(at(2025, 1, 15, 12, 0)).local_minus_utc(),
            0
        );
    }

    #[test]
    fn local_surgery_times_carry_the_right_offset() {
        let eight = NaiveTime::from_hms_opt(8, 0, 0).unwrap();
        assert_eq!(
            fhir_date_time(&london_local(date(2025, 5, 21), eight)),
            "2025-05-21T08:00:00+01:00"
        );
        assert_eq!(
            fhir_date_time(&london_local(date(2025, 12, 1), eight)),
            "2025-12-01T08:00:00+00:00"
        );
        let late = Utc.with_ymd_and_hms(2025, 6, 1, 23, 30, 0).unwrap();
        assert_eq!(london_today(late), date(2025, 6, 2));
    }

    #[test]
    fn search_dates_parse_only_the_gp_connect_forms() {
        assert_eq!(
            SearchDate::parse("2025-05-21"),
            Some(SearchDate::Date(date(2025, 5, 21)))
        );
        let dt = SearchDate::parse("2025-05-21T01:00:00+01:00").expect("dateTime parses");
        assert_eq!(
            fhir_date_time(&dt.first_instant()),
            "2025-05-21T01:00:00+01:00"
        );
        assert!(SearchDate::parse("2025-05-21T01:00:00Z").is_some());
        for bad in [
            "",
            "2025-5-21",
            "21-05-2025",
            "2025-02-30",
            "2025-05-21T01:00:00",
            "2025-05-21T01:00:00 01:00",
            "2025-05-21T01:00+01:00",
            "2025-05-21T25:00:00+01:00",
            "2025",
            "ge2025-05-21",
        ] {
            assert_eq!(SearchDate::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_date_covers_the_whole_london_day() {
        let day = SearchDate::parse("2025-07-01").unwrap();
        assert_eq!(
            fhir_date_time(&day.first_instant()),
            "2025-07-01T00:00:00+01:00"
        );
        assert_eq!(
            fhir_date_time(&day.end_instant()),
            "2025-07-02T00:00:00+01:00"
        );
    }

    proptest::proptest! {
        #[test]
        fn search_date_parsing_never_panics(text in "\\PC{0,40}") {
            let _ = SearchDate::parse(&text);
        }
    }
}
