//! Record keys: the name of a record within its collection.

use super::{IdentifierKind, SyntaxError};

/// Longest record key accepted, in bytes (spec-rkey).
const MAX_RKEY_LEN: usize = 512;

/// Which bytes a record key may contain: `A-Za-z0-9 . - _ : ~`.
///
/// A table keeps the check to one load per byte on the MST hot path.
pub(crate) static RKEY_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        table[b] = byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'-' | b'_' | b':' | b'~');
        b += 1;
    }
    table
};

/// A record key such as `3jzfcijpj2z2a` or `self`.
///
/// Record keys are case-sensitive and kept as given. Their shape depends on the collection's
/// Lexicon (`tid`, `nsid`, `literal:self`, `any`), which this type does not know; it checks
/// only the rules every record key obeys, so do not assume a record key is a TID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey(String);

string_identifier!(RecordKey, 0);

impl RecordKey {
    /// Whether `input` is a record key, without building one (see [`super::Nsid::check`]).
    ///
    /// # Errors
    ///
    /// The rule `input` breaks.
    pub fn check(input: &str) -> Result<(), SyntaxError> {
        validate(input)
    }

    fn parse_str(input: &str) -> Result<Self, SyntaxError> {
        validate(input)?;
        Ok(RecordKey(input.to_owned()))
    }

    fn parse_string(input: String) -> Result<Self, SyntaxError> {
        validate(&input)?;
        Ok(RecordKey(input))
    }
}

impl From<super::Tid> for RecordKey {
    /// Every TID is a valid record key: its alphabet is a subset and it is 13 bytes long.
    fn from(tid: super::Tid) -> Self {
        RecordKey(tid.into())
    }
}

fn validate(input: &str) -> Result<(), SyntaxError> {
    check_record_key(input.as_bytes())
        .map_err(|rule| SyntaxError::invalid(IdentifierKind::RecordKey, input, rule))
}

/// The record key rule: 1–512 bytes of `A-Za-z0-9 . - _ : ~`, and not `.` or `..`.
pub(crate) fn check_record_key(bytes: &[u8]) -> Result<(), &'static str> {
    if bytes.is_empty() {
        return Err("is empty");
    }
    if bytes.len() > MAX_RKEY_LEN {
        return Err("longer than 512 bytes");
    }
    if !bytes.iter().all(|&b| RKEY_BYTES[usize::from(b)]) {
        return Err("allows only ASCII letters, digits and . - _ : ~");
    }
    if bytes == b"." || bytes == b".." {
        return Err("must not be '.' or '..'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tid_is_a_record_key() -> Result<(), SyntaxError> {
        let tid: super::super::Tid = "3jzfcijpj2z2a".parse()?;
        assert_eq!(RecordKey::from(tid).as_str(), "3jzfcijpj2z2a");
        Ok(())
    }

    #[test]
    fn dots() {
        assert!(".".parse::<RecordKey>().is_err());
        assert!("..".parse::<RecordKey>().is_err());
        assert!("...".parse::<RecordKey>().is_ok());
    }
}
