//! The atproto data model: values decoded from DRISL, canonical encoding, JSON form.

/// Why a value does not fit the data model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// Placeholder until the value module lands.
    #[error("{0}")]
    Invalid(String),
}
