//! Protocol identifiers, each a newtype that can only be built by validating a string.
//!
//! # Overview
//!
//! Identifiers arrive as untrusted text in commits, records, URLs and firehose frames. Parsing
//! one into its type ([`Did`], [`Handle`], [`AtIdentifier`], [`Nsid`], [`RecordKey`], [`Tid`],
//! [`AtUri`], [`Datetime`], [`Language`], [`RepoPath`]) is the only way to get a value of that
//! type, so code that holds one never checks it again. Every type is built through
//! [`FromStr`](std::str::FromStr), `TryFrom<&str>` or `TryFrom<String>` (the latter reuses the
//! allocation), and gives its text back with `as_str()`.
//!
//! CID strings only get a loose check here ([`validate_cid_syntax`]); the binary CID that
//! atpdb hashes with is [`crate::Cid`].
//!
//! # Design
//!
//! - The rules are those of the atproto specifications as pinned by the shared
//!   `atproto-interop-tests/syntax` fixtures; where the two disagree the fixtures win, because
//!   they are what the other implementations accept.
//! - Validators are hand-written byte loops rather than regular expressions: identifiers are
//!   checked on hot paths (every MST key, every commit), and a byte loop neither allocates
//!   nor needs a compiled automaton. Only building the owned value allocates.
//! - This is syntax only: nothing here resolves a DID or handle, or checks a record against
//!   a Lexicon.

use std::fmt;

/// Implements the conversions every identifier newtype shares.
///
/// The type provides `parse_str(&str)` and `parse_string(String)`, both returning
/// `Result<Self, SyntaxError>`; `$field` names the field that holds the text.
macro_rules! string_identifier {
    ($name:ident, $field:tt) => {
        impl $name {
            /// The identifier as text, exactly as it is stored (and as it was validated).
            pub fn as_str(&self) -> &str {
                &self.$field
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::syntax::SyntaxError;

            fn from_str(input: &str) -> Result<Self, Self::Err> {
                Self::parse_str(input)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = $crate::syntax::SyntaxError;

            fn try_from(input: &str) -> Result<Self, Self::Error> {
                Self::parse_str(input)
            }
        }

        impl TryFrom<String> for $name {
            type Error = $crate::syntax::SyntaxError;

            fn try_from(input: String) -> Result<Self, Self::Error> {
                Self::parse_string(input)
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.$field
            }
        }
    };
}

mod atidentifier;
mod aturi;
mod cid;
mod datetime;
mod did;
mod handle;
mod language;
mod nsid;
mod path;
mod rkey;
mod tid;

pub use atidentifier::AtIdentifier;
pub use aturi::AtUri;
pub use cid::validate_cid_syntax;
pub use datetime::Datetime;
pub use did::Did;
pub use handle::Handle;
pub use language::Language;
pub use nsid::Nsid;
pub use path::{RepoPath, is_valid_repo_path};
pub use rkey::RecordKey;
pub use tid::Tid;

/// Which identifier a [`SyntaxError`] is about, so callers can match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdentifierKind {
    /// [`Did`].
    Did,
    /// [`Handle`].
    Handle,
    /// [`Nsid`].
    Nsid,
    /// [`RecordKey`].
    RecordKey,
    /// [`Tid`].
    Tid,
    /// [`AtUri`].
    AtUri,
    /// [`Datetime`].
    Datetime,
    /// [`Language`].
    Language,
    /// A CID string ([`validate_cid_syntax`]).
    Cid,
    /// [`RepoPath`].
    RepoPath,
}

impl fmt::Display for IdentifierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdentifierKind::Did => "DID",
            IdentifierKind::Handle => "handle",
            IdentifierKind::Nsid => "NSID",
            IdentifierKind::RecordKey => "record key",
            IdentifierKind::Tid => "TID",
            IdentifierKind::AtUri => "AT-URI",
            IdentifierKind::Datetime => "datetime",
            IdentifierKind::Language => "language tag",
            IdentifierKind::Cid => "CID",
            IdentifierKind::RepoPath => "repo path",
        })
    }
}

/// Why a string is not a valid identifier.
///
/// The message names the kind, the input (shortened when long, since inputs can be
/// kilobytes of hostile text) and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyntaxError {
    /// The input breaks a syntax rule of its identifier kind.
    #[error("invalid {kind} {input:?}: {rule}")]
    #[non_exhaustive]
    Invalid {
        /// Which identifier kind was being parsed.
        kind: IdentifierKind,
        /// The rejected input, cut to its first [`SyntaxError::MAX_INPUT_SHOWN`] characters
        /// followed by `…` when longer.
        input: String,
        /// The rule it breaks.
        rule: &'static str,
    },
}

impl SyntaxError {
    /// How many characters of a rejected input the error keeps.
    pub const MAX_INPUT_SHOWN: usize = 64;

    /// Which identifier kind was being parsed.
    pub fn kind(&self) -> IdentifierKind {
        match self {
            SyntaxError::Invalid { kind, .. } => *kind,
        }
    }

    /// The rule the input breaks.
    pub fn rule(&self) -> &'static str {
        match self {
            SyntaxError::Invalid { rule, .. } => rule,
        }
    }

    pub(crate) fn invalid(kind: IdentifierKind, input: &str, rule: &'static str) -> Self {
        let input = match input.char_indices().nth(Self::MAX_INPUT_SHOWN) {
            Some((cut, _)) => format!("{}…", &input[..cut]),
            None => input.to_owned(),
        };
        SyntaxError::Invalid { kind, input, rule }
    }
}

/// Whether every byte is an ASCII letter or digit.
fn is_alphanumeric(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_names_kind_input_and_rule() {
        let err = "did:METHOD:val"
            .parse::<Did>()
            .map_err(|err| (err.kind(), err.to_string()));
        assert_eq!(
            err,
            Err((
                IdentifierKind::Did,
                r#"invalid DID "did:METHOD:val": method must be lowercase letters"#.to_owned()
            ))
        );
    }

    #[test]
    fn error_truncates_long_input() {
        let long = format!("did:method:{}", "v".repeat(3000));
        let Err(SyntaxError::Invalid { input, .. }) = long.parse::<Did>() else {
            panic!("accepted a 3011-byte DID");
        };
        assert_eq!(input.chars().count(), SyntaxError::MAX_INPUT_SHOWN + 1);
        assert!(input.ends_with('…'));
    }
}
