//! Handles: the DNS names accounts display, normalized to lowercase.

use super::{IdentifierKind, SyntaxError};

/// Longest handle accepted, in bytes (a DNS name).
const MAX_HANDLE_LEN: usize = 253;
/// Longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// Top-level domains a handle may be spelled with but must never resolve under (spec-handle).
const DISALLOWED_TLDS: [&str; 8] = [
    "alt",
    "arpa",
    "example",
    "internal",
    "invalid",
    "local",
    "localhost",
    "onion",
];

/// A handle such as `alice.bsky.social`, always stored in lowercase.
///
/// Handles are DNS names and therefore case-insensitive; parsing accepts any case and
/// lowercases, so that two spellings of one handle compare, hash and print the same.
/// Handles under the disallowed TLDs (`.local`, `.onion`, `handle.invalid`...) are
/// syntactically valid, as the interop fixtures require; [`Handle::has_disallowed_tld`]
/// tells the resolver to refuse them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(String);

string_identifier!(Handle, 0);

impl Handle {
    /// Whether the TLD is one the spec reserves (`.alt .arpa .example .internal .invalid
    /// .local .localhost .onion`): such a handle is well-formed but must not be resolved or
    /// trusted. It includes `handle.invalid`, the placeholder for a handle that failed
    /// verification.
    pub fn has_disallowed_tld(&self) -> bool {
        let tld = self
            .0
            .rsplit_once('.')
            .map_or(self.0.as_str(), |(_, tld)| tld);
        DISALLOWED_TLDS.contains(&tld)
    }

    fn parse_str(input: &str) -> Result<Self, SyntaxError> {
        validate(input)?;
        Ok(Handle(input.to_ascii_lowercase()))
    }

    fn parse_string(mut input: String) -> Result<Self, SyntaxError> {
        validate(&input)?;
        input.make_ascii_lowercase();
        Ok(Handle(input))
    }
}

fn validate(input: &str) -> Result<(), SyntaxError> {
    check_handle(input.as_bytes())
        .map_err(|rule| SyntaxError::invalid(IdentifierKind::Handle, input, rule))
}

/// The handle rule: at most 253 bytes, two or more labels of 1–63 `[a-zA-Z0-9-]` that
/// neither start nor end with `-`, and a last label (TLD) that starts with a letter.
pub(crate) fn check_handle(bytes: &[u8]) -> Result<(), &'static str> {
    if bytes.len() > MAX_HANDLE_LEN {
        return Err("longer than 253 bytes");
    }
    let mut n_labels = 0;
    let mut last_label: &[u8] = &[];
    for label in bytes.split(|&b| b == b'.') {
        check_label(label)?;
        n_labels += 1;
        last_label = label;
    }
    if n_labels < 2 {
        return Err("needs at least two labels");
    }
    if !last_label.first().is_some_and(u8::is_ascii_alphabetic) {
        return Err("top-level domain must start with a letter");
    }
    Ok(())
}

/// One DNS label: 1–63 letters, digits or hyphens, not starting or ending with a hyphen.
pub(crate) fn check_label(label: &[u8]) -> Result<(), &'static str> {
    let (Some(&first), Some(&last)) = (label.first(), label.last()) else {
        return Err("has an empty label");
    };
    if label.len() > MAX_LABEL_LEN {
        return Err("has a label longer than 63 bytes");
    }
    if !label
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err("labels allow only ASCII letters, digits and '-'");
    }
    if first == b'-' || last == b'-' {
        return Err("has a label starting or ending with '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercases() -> Result<(), SyntaxError> {
        let handle: Handle = "XX.LCS.MIT.EDU".parse()?;
        assert_eq!(handle.as_str(), "xx.lcs.mit.edu");
        let owned = Handle::try_from(String::from("Alice.Test"))?;
        assert_eq!(owned, "alice.test".parse::<Handle>()?);
        Ok(())
    }

    #[test]
    fn disallowed_tlds_parse_but_are_flagged() -> Result<(), SyntaxError> {
        assert!("laptop.LOCAL".parse::<Handle>()?.has_disallowed_tld());
        assert!("handle.invalid".parse::<Handle>()?.has_disallowed_tld());
        assert!(!"alice.bsky.social".parse::<Handle>()?.has_disallowed_tld());
        assert!(!"invalid.social".parse::<Handle>()?.has_disallowed_tld());
        Ok(())
    }
}
