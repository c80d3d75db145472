//! Datetimes in the one profile atproto accepts: the intersection of RFC 3339 and ISO 8601.

use super::{IdentifierKind, SyntaxError};

/// Longest datetime accepted, in bytes (the reference implementations' limit).
const MAX_DATETIME_LEN: usize = 64;

/// A datetime such as `1985-04-12T23:20:50.123Z`, checked for syntax and for meaning.
///
/// Syntax: `YYYY-MM-DDTHH:MM:SS`, an optional fraction of one or more digits, and a
/// required timezone, `Z` or `±HH:MM`, with uppercase `T` and `Z`. RFC 3339's `-00:00`
/// ("offset unknown") is not ISO 8601 and is rejected.
///
/// Meaning: the month, day (including leap years), hour, minute, second and offset must
/// exist, and the instant must not fall before `0000-01-01T00:00:00Z` once the offset is
/// applied. Checking meaning at parse time means the fixtures' `datetime_parse_invalid`
/// lines are rejected too: a `Datetime` always names a real instant. Leap seconds (`:60`)
/// are rejected, as the reference implementations do.
///
/// The text is kept as given. Order is text order, which is chronological only between
/// datetimes written with the same offset and precision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Datetime(String);

string_identifier!(Datetime, 0);

impl Datetime {
    /// The UTC datetime of a Unix timestamp in microseconds, with millisecond precision
    /// (`2026-11-23T10:00:00.000Z`), the form the reference implementations write.
    pub fn from_unix_micros(micros: u64) -> Datetime {
        Datetime(civil(micros))
    }

    /// The current time (`createdAt`, firehose `time`).
    pub fn now() -> Datetime {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_micros() as u64);
        Datetime::from_unix_micros(micros)
    }

    fn parse_str(input: &str) -> Result<Self, SyntaxError> {
        validate(input)?;
        Ok(Datetime(input.to_owned()))
    }

    fn parse_string(input: String) -> Result<Self, SyntaxError> {
        validate(&input)?;
        Ok(Datetime(input))
    }
}

fn civil(micros: u64) -> String {
    let secs = micros / 1_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant), valid for the years samples use.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        micros % 1_000_000 / 1000
    )
}

fn validate(input: &str) -> Result<(), SyntaxError> {
    check_datetime(input.as_bytes())
        .map_err(|rule| SyntaxError::invalid(IdentifierKind::Datetime, input, rule))
}

/// Reads `N` ASCII digits starting at `at` as a number.
fn number<const N: usize>(bytes: &[u8], at: usize) -> Option<u32> {
    let digits = bytes.get(at..at + N)?;
    digits.iter().try_fold(0u32, |value, &b| {
        b.is_ascii_digit().then(|| value * 10 + u32::from(b - b'0'))
    })
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

pub(crate) fn check_datetime(bytes: &[u8]) -> Result<(), &'static str> {
    const SHAPE: &str = "must look like YYYY-MM-DDTHH:MM:SS[.fraction] followed by Z or ±HH:MM";
    if bytes.len() > MAX_DATETIME_LEN {
        return Err("longer than 64 bytes");
    }
    let separator = |at: usize, expected: u8| bytes.get(at) == Some(&expected);
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        number::<4>(bytes, 0),
        number::<2>(bytes, 5),
        number::<2>(bytes, 8),
        number::<2>(bytes, 11),
        number::<2>(bytes, 14),
        number::<2>(bytes, 17),
    ) else {
        return Err(SHAPE);
    };
    if !(separator(4, b'-')
        && separator(7, b'-')
        && separator(10, b'T')
        && separator(13, b':')
        && separator(16, b':'))
    {
        return Err(SHAPE);
    }

    let mut at = 19;
    if separator(at, b'.') {
        at += 1;
        let n_digits = bytes
            .get(at..)
            .unwrap_or_default()
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if n_digits == 0 {
            return Err("fraction after '.' has no digits");
        }
        at += n_digits;
    }

    let timezone = bytes.get(at..).unwrap_or_default();
    let offset_minutes: i64 = match timezone {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (Some(offset_hour), Some(offset_minute)) =
                (number::<2>(timezone, 1), number::<2>(timezone, 4))
            else {
                return Err(SHAPE);
            };
            if offset_hour > 23 || offset_minute > 59 {
                return Err("timezone offset is out of range");
            }
            let minutes = i64::from(offset_hour * 60 + offset_minute);
            if *sign == b'-' {
                if minutes == 0 {
                    return Err("timezone -00:00 is not allowed (use Z or +00:00)");
                }
                -minutes
            } else {
                minutes
            }
        }
        [] => return Err("timezone is required"),
        _ => return Err(SHAPE),
    };

    if !(1..=12).contains(&month) {
        return Err("month is out of range");
    }
    if day == 0 || day > days_in_month(year, month) {
        return Err("day is out of range for the month");
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err("time of day is out of range");
    }
    // UTC is the local time minus the offset, and offsets are under a day, so only the
    // first day of year zero can move before it. A fraction cannot push a whole second
    // below the offset back over it.
    if year == 0 && month == 1 && day == 1 {
        let seconds = i64::from(hour * 3600 + minute * 60 + second);
        let offset_seconds = offset_minutes * 60;
        if seconds < offset_seconds {
            return Err("falls before year zero once the offset is applied");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leap_years() {
        assert!("2024-02-29T00:00:00Z".parse::<Datetime>().is_ok());
        assert!("2000-02-29T00:00:00Z".parse::<Datetime>().is_ok());
        assert!("1900-02-29T00:00:00Z".parse::<Datetime>().is_err());
        assert!("2023-02-29T00:00:00Z".parse::<Datetime>().is_err());
    }

    #[test]
    fn year_zero_boundary() {
        assert!("0000-01-01T01:00:00+01:00".parse::<Datetime>().is_ok());
        assert!("0000-01-01T00:59:59.999+01:00".parse::<Datetime>().is_err());
        assert!("0000-01-01T00:00:00-01:00".parse::<Datetime>().is_ok());
        assert!("0000-01-02T00:00:00+23:59".parse::<Datetime>().is_ok());
    }

    #[test]
    fn rules() {
        let rule = |input: &str| input.parse::<Datetime>().map_err(|err| err.rule());
        assert_eq!(rule("1985-04-12T23:20:50.123"), Err("timezone is required"));
        assert_eq!(
            rule("1985-13-12T23:20:50.123Z"),
            Err("month is out of range")
        );
        assert_eq!(
            rule("1985-04-12T23:20:50.123-00:00"),
            Err("timezone -00:00 is not allowed (use Z or +00:00)")
        );
        assert_eq!(
            rule("1985-04-12T23:20:50.Z"),
            Err("fraction after '.' has no digits")
        );
    }
}
