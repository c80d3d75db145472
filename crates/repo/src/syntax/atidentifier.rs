//! AT identifiers: the places where either a DID or a handle may name an account.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use super::{Did, Handle, SyntaxError};

/// A DID or a handle, as accepted by `repo` parameters and AT-URI authorities.
///
/// The two cannot be confused: a DID starts with `did:` and a handle has no `:`, so the
/// prefix decides which parser runs, and the error is that parser's (a malformed
/// `did:...` is reported as a bad DID, not as a bad handle).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AtIdentifier {
    /// The account's DID.
    Did(Did),
    /// One of the account's handles (lowercased).
    Handle(Handle),
}

impl AtIdentifier {
    /// The identifier as text (the handle in lowercase).
    pub fn as_str(&self) -> &str {
        match self {
            AtIdentifier::Did(did) => did.as_str(),
            AtIdentifier::Handle(handle) => handle.as_str(),
        }
    }

    /// The DID, when this is one.
    pub fn as_did(&self) -> Option<&Did> {
        match self {
            AtIdentifier::Did(did) => Some(did),
            AtIdentifier::Handle(_) => None,
        }
    }

    /// The handle, when this is one.
    pub fn as_handle(&self) -> Option<&Handle> {
        match self {
            AtIdentifier::Did(_) => None,
            AtIdentifier::Handle(handle) => Some(handle),
        }
    }
}

/// Whether `bytes` is a DID or a handle, for parsers that only need the answer.
pub(crate) fn check_at_identifier(bytes: &[u8]) -> Result<(), &'static str> {
    if bytes.starts_with(b"did:") {
        super::did::check_did(bytes)
    } else {
        super::handle::check_handle(bytes)
    }
}

impl FromStr for AtIdentifier {
    type Err = SyntaxError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.starts_with("did:") {
            input.parse().map(AtIdentifier::Did)
        } else {
            input.parse().map(AtIdentifier::Handle)
        }
    }
}

impl TryFrom<&str> for AtIdentifier {
    type Error = SyntaxError;

    fn try_from(input: &str) -> Result<Self, Self::Error> {
        input.parse()
    }
}

impl TryFrom<String> for AtIdentifier {
    type Error = SyntaxError;

    fn try_from(input: String) -> Result<Self, Self::Error> {
        if input.starts_with("did:") {
            Did::try_from(input).map(AtIdentifier::Did)
        } else {
            Handle::try_from(input).map(AtIdentifier::Handle)
        }
    }
}

impl From<Did> for AtIdentifier {
    fn from(did: Did) -> Self {
        AtIdentifier::Did(did)
    }
}

impl From<Handle> for AtIdentifier {
    fn from(handle: Handle) -> Self {
        AtIdentifier::Handle(handle)
    }
}

impl From<AtIdentifier> for String {
    fn from(value: AtIdentifier) -> String {
        match value {
            AtIdentifier::Did(did) => did.into(),
            AtIdentifier::Handle(handle) => handle.into(),
        }
    }
}

impl fmt::Display for AtIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<str> for AtIdentifier {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

// Ordered by text, like every other identifier; a DID and a handle never share a text,
// so this agrees with `Eq`.
impl PartialOrd for AtIdentifier {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for AtIdentifier {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syntax::IdentifierKind;

    #[test]
    fn picks_the_parser_by_prefix() -> Result<(), SyntaxError> {
        let did: AtIdentifier = "did:plc:7iza6de2dwap2sbkpav7c6c6".parse()?;
        assert!(did.as_did().is_some());
        let handle: AtIdentifier = "Alice.Test".parse()?;
        assert_eq!(handle.as_handle().map(Handle::as_str), Some("alice.test"));
        let err = "did:thing.test"
            .parse::<AtIdentifier>()
            .map_err(|err| err.kind());
        assert_eq!(err, Err(IdentifierKind::Did));
        Ok(())
    }
}
