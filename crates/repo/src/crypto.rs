//! Signing keys: k256 and p256, did:key / Multikey encodings, compact low-S signatures.

/// Why a key or signature is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Placeholder until the crypto module lands.
    #[error("{0}")]
    Invalid(String),
}
