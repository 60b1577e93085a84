//! RFC 3339 timestamps as Go's `time.RFC3339Nano` writes them (trailing zeros of the
//! fraction trimmed, no fraction when it is zero), so both codecs match Go peers byte for byte.

use std::fmt::Write as _;

use chrono::{DateTime, Datelike, Timelike, Utc};

/// Formats `t` in UTC as `2006-01-02T15:04:05.999999999Z` with trailing zeros trimmed.
pub(crate) fn format_rfc3339_nano(t: &DateTime<Utc>) -> String {
    let mut s = String::with_capacity(30);
    // Writing to a String cannot fail.
    let _ = write!(
        s,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    // chrono folds leap seconds into nanoseconds >= 1e9; clamp them like Go does not have them.
    let nanos = t.nanosecond().min(999_999_999);
    if nanos != 0 {
        let digits = format!("{nanos:09}");
        s.push('.');
        s.push_str(digits.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Parses an RFC 3339 timestamp with any offset into UTC.
pub(crate) fn parse_rfc3339(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn go_style() {
        let t = Utc.with_ymd_and_hms(2024, 3, 1, 12, 0, 5).unwrap();
        assert_eq!(format_rfc3339_nano(&t), "2024-03-01T12:00:05Z");
        let t = t + chrono::Duration::nanoseconds(120_000_000);
        assert_eq!(format_rfc3339_nano(&t), "2024-03-01T12:00:05.12Z");
        let t = t + chrono::Duration::nanoseconds(7);
        assert_eq!(format_rfc3339_nano(&t), "2024-03-01T12:00:05.120000007Z");
        assert_eq!(parse_rfc3339(&format_rfc3339_nano(&t)), Some(t));
        assert_eq!(
            parse_rfc3339("2024-03-01T20:00:05.120000007+08:00"),
            Some(t)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
