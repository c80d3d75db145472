//! Namespaced identifiers: the names of Lexicon schemas, record collections and XRPC methods.

use super::handle::check_label;
use super::{IdentifierKind, SyntaxError};

/// Longest NSID accepted, in bytes: a 253-byte domain, a dot and a 63-byte name.
const MAX_NSID_LEN: usize = 253 + 1 + 63;
/// Longest name segment.
const MAX_NAME_LEN: usize = 63;

/// An NSID such as `app.bsky.feed.post`: a reversed domain (the authority) and a name.
///
/// The text is kept exactly as given, never lowercased. The spec asks for the authority to
/// be normalized to lowercase, but NSIDs are also collection names inside repo paths, where
/// the bytes are what the MST hashes; rewriting them would address a different record.
/// The interop fixtures accept a 283-byte authority, so only the total length (317) is
/// limited, not the authority's 253.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nsid(String);

string_identifier!(Nsid, 0);

impl Nsid {
    /// The reversed-domain authority (`app.bsky.feed` in `app.bsky.feed.post`): who
    /// controls the schema.
    pub fn authority(&self) -> &str {
        self.0
            .rsplit_once('.')
            .map_or("", |(authority, _)| authority)
    }

    /// The name segment (`post` in `app.bsky.feed.post`), which is case-sensitive.
    pub fn name(&self) -> &str {
        self.0
            .rsplit_once('.')
            .map_or(self.0.as_str(), |(_, name)| name)
    }

    fn parse_str(input: &str) -> Result<Self, SyntaxError> {
        validate(input)?;
        Ok(Nsid(input.to_owned()))
    }

    /// Whether `input` is an NSID, without building one: for a caller that holds the text
    /// already and only needs the answer (a record walked out of a CAR, once per record).
    ///
    /// # Errors
    ///
    /// The rule `input` breaks.
    pub fn check(input: &str) -> Result<(), SyntaxError> {
        validate(input)
    }

    fn parse_string(input: String) -> Result<Self, SyntaxError> {
        validate(&input)?;
        Ok(Nsid(input))
    }
}

fn validate(input: &str) -> Result<(), SyntaxError> {
    check_nsid(input.as_bytes())
        .map_err(|rule| SyntaxError::invalid(IdentifierKind::Nsid, input, rule))
}

/// The NSID rule: at most 317 bytes; two or more domain labels (1–63 `[a-zA-Z0-9-]`, no
/// leading or trailing `-`, the first starting with a letter); then a name of 1–63
/// `[a-zA-Z0-9]` starting with a letter.
pub(crate) fn check_nsid(bytes: &[u8]) -> Result<(), &'static str> {
    if bytes.len() > MAX_NSID_LEN {
        return Err("longer than 317 bytes");
    }
    let Some(last_dot) = bytes.iter().rposition(|&b| b == b'.') else {
        return Err("needs at least three segments");
    };
    let (authority, name) = bytes.split_at(last_dot);
    let name = name.get(1..).unwrap_or_default();

    let mut n_labels = 0;
    for label in authority.split(|&b| b == b'.') {
        check_label(label)?;
        n_labels += 1;
    }
    if n_labels < 2 {
        return Err("needs at least three segments");
    }
    if !authority.first().is_some_and(u8::is_ascii_alphabetic) {
        return Err("first segment must start with a letter");
    }

    if name.is_empty() {
        return Err("name segment is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("name segment is longer than 63 bytes");
    }
    if !super::is_alphanumeric(name) {
        return Err("name segment allows only ASCII letters and digits");
    }
    if !name.first().is_some_and(u8::is_ascii_alphabetic) {
        return Err("name segment must start with a letter");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_and_name() -> Result<(), SyntaxError> {
        let nsid: Nsid = "app.bsky.feed.post".parse()?;
        assert_eq!(nsid.authority(), "app.bsky.feed");
        assert_eq!(nsid.name(), "post");
        Ok(())
    }

    #[test]
    fn keeps_case() -> Result<(), SyntaxError> {
        let nsid: Nsid = "Com.Example.fooBar".parse()?;
        assert_eq!(nsid.as_str(), "Com.Example.fooBar");
        Ok(())
    }
}
