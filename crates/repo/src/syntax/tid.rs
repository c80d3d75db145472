//! Timestamp identifiers: the sortable clock behind commit revs and most record keys.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{IdentifierKind, SyntaxError};

/// The base32-sortable alphabet: digit values follow byte order, so text order is numeric order.
const ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";
/// A TID is always 13 characters.
const TID_LEN: usize = 13;
/// The timestamp occupies 53 bits.
const MICROS_MASK: u64 = (1 << 53) - 1;
/// The clock identifier occupies the low 10 bits.
const CLOCK_ID_MASK: u16 = (1 << 10) - 1;

/// A TID such as `3jzfcijpj2z2a`: 53 bits of microseconds since the Unix epoch and a 10-bit
/// clock identifier, in 13 base32-sortable characters.
///
/// Because the encoding is fixed-width and its alphabet sorts like its digit values, the
/// derived order (text order) is time order, which is what rev comparisons rely on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tid(String);

string_identifier!(Tid, 0);

impl Tid {
    /// The TID for a timestamp and clock identifier.
    ///
    /// Only the low 53 bits of `micros` and the low 10 bits of `clock_id` fit; higher bits are
    /// dropped (53 bits of microseconds last until the year 2255).
    pub fn from_parts(micros: u64, clock_id: u16) -> Tid {
        let mut value = ((micros & MICROS_MASK) << 10) | u64::from(clock_id & CLOCK_ID_MASK);
        let mut text = [0u8; TID_LEN];
        for slot in text.iter_mut().rev() {
            *slot = ALPHABET[(value & 31) as usize];
            value >>= 5;
        }
        Tid(text.iter().map(|&b| char::from(b)).collect())
    }

    /// A TID for the current system time.
    ///
    /// This does not guarantee that successive calls increase (the clock may step back or
    /// repeat); a writer that needs monotonic revs must compare with its last one. A clock set
    /// before 1970 gives timestamp zero.
    pub fn now(clock_id: u16) -> Tid {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
            });
        Tid::from_parts(micros, clock_id)
    }

    /// Microseconds since the Unix epoch.
    ///
    /// The syntax lets the first character set the integer's top bit, which the spec says is
    /// zero; such a TID reports a timestamp of 2^53 or more rather than hiding the bit.
    pub fn timestamp_micros(&self) -> u64 {
        self.value() >> 10
    }

    /// The clock identifier, which separates TIDs minted in the same microsecond.
    pub fn clock_id(&self) -> u16 {
        u16::try_from(self.value() & u64::from(CLOCK_ID_MASK)).unwrap_or_default()
    }

    /// The 64-bit integer the text encodes; the first character is at most 15, so 13
    /// characters of 5 bits fit in 64 bits.
    fn value(&self) -> u64 {
        self.0.bytes().fold(0, |value, b| {
            (value << 5) | u64::from(digit(b).unwrap_or(0))
        })
    }

    fn parse_str(input: &str) -> Result<Self, SyntaxError> {
        validate(input)?;
        Ok(Tid(input.to_owned()))
    }

    fn parse_string(input: String) -> Result<Self, SyntaxError> {
        validate(&input)?;
        Ok(Tid(input))
    }
}

/// The value of one base32-sortable character.
fn digit(b: u8) -> Option<u8> {
    match b {
        b'2'..=b'7' => Some(b - b'2'),
        b'a'..=b'z' => Some(b - b'a' + 6),
        _ => None,
    }
}

fn validate(input: &str) -> Result<(), SyntaxError> {
    check_tid(input.as_bytes())
        .map_err(|rule| SyntaxError::invalid(IdentifierKind::Tid, input, rule))
}

/// The TID rule: `^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$`.
pub(crate) fn check_tid(bytes: &[u8]) -> Result<(), &'static str> {
    if bytes.len() != TID_LEN {
        return Err("must be 13 characters");
    }
    if !bytes.iter().all(|&b| digit(b).is_some()) {
        return Err("allows only the base32-sortable characters 2-7 and a-z");
    }
    if bytes
        .first()
        .and_then(|&b| digit(b))
        .is_none_or(|first| first > 15)
    {
        return Err("first character must be one of 234567abcdefghij (the top bit is zero)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_parts_round_trips() -> Result<(), SyntaxError> {
        for (micros, clock_id) in [
            (0, 0),
            (1, 1),
            (1_700_000_000_123_456, 42),
            (MICROS_MASK, CLOCK_ID_MASK),
        ] {
            let tid = Tid::from_parts(micros, clock_id);
            assert_eq!(tid.timestamp_micros(), micros, "{tid}");
            assert_eq!(tid.clock_id(), clock_id, "{tid}");
            assert_eq!(tid.as_str().parse::<Tid>()?, tid);
        }
        assert_eq!(Tid::from_parts(0, 0).as_str(), "2222222222222");
        Ok(())
    }

    #[test]
    fn from_parts_drops_high_bits() {
        let tid = Tid::from_parts(u64::MAX, u16::MAX);
        assert_eq!(tid.timestamp_micros(), MICROS_MASK);
        assert_eq!(tid.clock_id(), CLOCK_ID_MASK);
    }

    #[test]
    fn decodes_known_tid() -> Result<(), SyntaxError> {
        let tid: Tid = "3jzfcijpj2z2a".parse()?;
        // 2023-06-30T15:03:01.887007Z, clock 6 (decoded independently).
        assert_eq!(tid.timestamp_micros(), 1_688_137_381_887_007);
        assert_eq!(tid.clock_id(), 6);
        assert_eq!(Tid::from_parts(tid.timestamp_micros(), tid.clock_id()), tid);
        Ok(())
    }

    #[test]
    fn text_order_is_time_order() {
        assert!(Tid::from_parts(1_000_000, 1023) < Tid::from_parts(1_000_001, 0));
        assert!(Tid::from_parts(5, 1) < Tid::from_parts(5, 2));
        assert!(Tid::from_parts(1 << 40, 0) < Tid::from_parts(1 << 41, 0));
    }

    #[test]
    fn now_is_recent() {
        let year_2024 = 1_704_067_200_000_000;
        let tid = Tid::now(7);
        assert!(tid.timestamp_micros() > year_2024, "{tid}");
        assert_eq!(tid.clock_id(), 7);
    }
}
