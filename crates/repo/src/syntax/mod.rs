//! Protocol identifiers, each a newtype that can only be built by validating a string.

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyntaxError {
    /// Placeholder until the syntax module lands.
    #[error("invalid {kind} {value:?}: {reason}")]
    Invalid {
        /// Which identifier kind.
        kind: &'static str,
        /// The rejected input (truncated if long).
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
}
