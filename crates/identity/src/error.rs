//! The one error type of identity resolution, split by what the caller should do next.

use atpdb_net::NetError;
use atpdb_repo::syntax::{Did, Handle};

/// Why a DID or handle did not resolve.
///
/// "Definitely absent" ([`IdentityError::NotFound`], [`IdentityError::Invalid`],
/// [`IdentityError::Handle`]) is kept apart from "could not find out"
/// ([`IdentityError::Unreachable`], [`IdentityError::HandleUnreachable`]): retry policy hangs
/// on [`IdentityError::is_transient`]. Errors are `Clone` because the cache hands the same
/// failure to every caller until it expires.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The directory says the DID does not exist: unknown to PLC, tombstoned, or a did:web
    /// host answering 404 or 410.
    #[error("{did}: not found (unknown, deleted or tombstoned)")]
    NotFound {
        /// The DID asked for.
        did: Did,
    },
    /// The document was served but is unusable: bad JSON, too large, an `id` that is not the
    /// DID, no usable `#atproto` key or `#atproto_pds` service.
    #[error("{did}: unusable DID document: {reason}")]
    Invalid {
        /// The DID asked for.
        did: Did,
        /// What is wrong with the document or the answer.
        reason: String,
    },
    /// The directory could not be asked or did not answer in time (network error, 5xx, 429,
    /// timeout). Asking again later may succeed.
    #[error("{did}: could not resolve: {reason}")]
    Unreachable {
        /// The DID asked for.
        did: Did,
        /// What failed.
        reason: String,
    },
    /// A DID method other than `plc` and `web`, or a did:web with a path.
    #[error("{did}: unsupported DID method or form (only did:plc and hostname did:web resolve)")]
    Unsupported {
        /// The DID asked for.
        did: Did,
    },
    /// The network guard refused the URL (for instance a loopback or private address while
    /// private networks are not allowed), or the URL itself is malformed. Not transient.
    #[error(transparent)]
    Net(NetError),
    /// The handle does not resolve to a DID: no `_atproto` TXT record and no
    /// `/.well-known/atproto-did`, a reserved TLD, conflicting records, or a malformed answer.
    #[error("handle {handle}: {reason}")]
    Handle {
        /// The handle asked for.
        handle: Handle,
        /// Why it does not resolve.
        reason: String,
    },
    /// Neither DNS nor HTTPS could be asked about the handle (timeouts, server failures).
    /// Asking again later may succeed.
    #[error("handle {handle}: could not resolve: {reason}")]
    HandleUnreachable {
        /// The handle asked for.
        handle: Handle,
        /// What failed.
        reason: String,
    },
}

impl IdentityError {
    /// Whether asking again later may give another answer: the directory or host could not
    /// be reached. "Not found" and "invalid" are answers, and so is a guard refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            IdentityError::Unreachable { .. } | IdentityError::HandleUnreachable { .. } => true,
            IdentityError::Net(err) => err.is_transient(),
            IdentityError::NotFound { .. }
            | IdentityError::Invalid { .. }
            | IdentityError::Unsupported { .. }
            | IdentityError::Handle { .. } => false,
        }
    }
}

impl From<NetError> for IdentityError {
    fn from(err: NetError) -> Self {
        IdentityError::Net(err)
    }
}
