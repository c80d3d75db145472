//! Decentralized identifiers: the permanent name of an account.

use super::{IdentifierKind, SyntaxError};

/// Longest DID accepted, in bytes (spec-did).
const MAX_DID_LEN: usize = 2048;

/// A DID such as `did:plc:7iza6de2dwap2sbkpav7c6c6`, checked against the generic DID syntax.
///
/// DIDs are case-sensitive and never normalized, so equality is byte equality. Any method
/// is accepted here: whether atpdb can resolve `did:plc` or `did:web` (or anything else) is
/// a question for the identity layer, which must report "unsupported method" apart from
/// "bad syntax".
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Did(String);

string_identifier!(Did, 0);

impl Did {
    /// The method name (`plc` in `did:plc:...`), which decides how the DID resolves.
    pub fn method(&self) -> &str {
        let rest = self.0.get(4..).unwrap_or_default();
        rest.split_once(':').map_or(rest, |(method, _)| method)
    }

    /// The method-specific identifier: everything after the method's colon.
    pub fn identifier(&self) -> &str {
        let rest = self.0.get(4..).unwrap_or_default();
        rest.split_once(':')
            .map_or("", |(_, identifier)| identifier)
    }

    fn parse_str(input: &str) -> Result<Self, SyntaxError> {
        validate(input)?;
        Ok(Did(input.to_owned()))
    }

    fn parse_string(input: String) -> Result<Self, SyntaxError> {
        validate(&input)?;
        Ok(Did(input))
    }
}

fn validate(input: &str) -> Result<(), SyntaxError> {
    check_did(input.as_bytes())
        .map_err(|rule| SyntaxError::invalid(IdentifierKind::Did, input, rule))
}

/// The DID rule, `^did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]$` and at most 2048 bytes,
/// as a byte loop; shared with the AT identifier and AT-URI parsers.
pub(crate) fn check_did(bytes: &[u8]) -> Result<(), &'static str> {
    if bytes.len() > MAX_DID_LEN {
        return Err("longer than 2048 bytes");
    }
    let Some(rest) = bytes.strip_prefix(b"did:") else {
        return Err("must start with \"did:\"");
    };
    let Some(colon) = rest.iter().position(|&b| b == b':') else {
        return Err("has no method-specific identifier after the method");
    };
    let (method, identifier) = rest.split_at(colon);
    if method.is_empty() {
        return Err("method is empty");
    }
    if !method.iter().all(u8::is_ascii_lowercase) {
        return Err("method must be lowercase letters");
    }
    let identifier = identifier.get(1..).unwrap_or_default();
    let Some(&last) = identifier.last() else {
        return Err("method-specific identifier is empty");
    };
    for &b in identifier {
        if !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'%' | b'-')) {
            return Err("method-specific identifier allows only letters, digits and . _ : % -");
        }
    }
    if matches!(last, b':' | b'%') {
        return Err("must not end with ':' or '%'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_and_identifier() -> Result<(), SyntaxError> {
        let did: Did = "did:plc:7iza6de2dwap2sbkpav7c6c6".parse()?;
        assert_eq!(did.method(), "plc");
        assert_eq!(did.identifier(), "7iza6de2dwap2sbkpav7c6c6");
        let did: Did = "did:web:localhost%3A1234".parse()?;
        assert_eq!(did.method(), "web");
        assert_eq!(did.identifier(), "localhost%3A1234");
        Ok(())
    }

    #[test]
    fn length_limit() {
        let at_limit = format!("did:m:{}", "v".repeat(MAX_DID_LEN - 6));
        assert!(at_limit.parse::<Did>().is_ok());
        let over = format!("{at_limit}v");
        assert_eq!(
            over.parse::<Did>().map_err(|err| err.rule()),
            Err("longer than 2048 bytes")
        );
    }
}
