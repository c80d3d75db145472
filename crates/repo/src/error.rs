//! The one error type of the crate: each variant names the check that failed and its subject.

use crate::cbor::DecodeError;
use crate::cid::{Cid, CidError};
use crate::crypto::KeyError;
use crate::syntax::SyntaxError;
use crate::value::ValueError;

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a repository, CAR, block or commit failed verification.
///
/// Variants are the checks atpdb performs; each carries the CID, key, DID or byte offset it
/// concerns so that a log line points at the bad byte.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An identifier (DID, handle, NSID, TID, record key, AT-URI, datetime) is malformed.
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
    /// A CID is malformed or of a kind atpdb cannot check.
    #[error(transparent)]
    Cid(#[from] CidError),
    /// A public key or signature is malformed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A value does not fit the atproto data model.
    #[error(transparent)]
    Value(#[from] ValueError),
    /// A block's bytes are not valid DRISL, or not the expected schema.
    #[error("block {cid}: {source}")]
    Block {
        /// The block.
        cid: Cid,
        /// What is wrong with its bytes.
        #[source]
        source: DecodeError,
    },
    /// A block's bytes do not hash to the CID it was stored under.
    #[error("block {cid}: bytes hash to {actual}")]
    HashMismatch {
        /// The CID the CAR claimed.
        cid: Cid,
        /// The CID the bytes actually have.
        actual: Cid,
    },
    /// A block the structure links to is not present.
    #[error("missing block {cid} ({context})")]
    MissingBlock {
        /// The linked CID.
        cid: Cid,
        /// What linked to it: `commit`, `MST node`, or the record path.
        context: String,
    },
    /// MST keys are not strictly increasing.
    #[error("MST node {node}: key {key:?} does not sort after {previous:?}")]
    MstOrder {
        /// The node holding the key.
        node: Cid,
        /// The key out of order.
        key: String,
        /// The key before it.
        previous: String,
    },
    /// An MST key sits at the wrong layer for its hash.
    #[error("MST node {node}: key {key:?} has layer {key_layer} but sits in layer {node_layer}")]
    MstLayer {
        /// The node holding the key.
        node: Cid,
        /// The key.
        key: String,
        /// The layer its hash gives.
        key_layer: u32,
        /// The layer of the node.
        node_layer: u32,
    },
    /// Any other MST shape rule: empty nodes, bad prefixes, invalid keys, depth and size limits.
    #[error("MST node {node}: {reason}")]
    MstStructure {
        /// The node.
        node: Cid,
        /// The rule it breaks.
        reason: String,
    },
    /// The commit signature does not verify with the given key.
    #[error("commit {did}@{rev}: bad signature")]
    BadSignature {
        /// The commit's DID.
        did: String,
        /// The commit's rev.
        rev: String,
        /// Why: high-S, DER, wrong length, or not made by this key.
        #[source]
        source: KeyError,
    },
    /// The commit names a different DID than expected.
    #[error("commit DID {found} differs from the expected {expected}")]
    DidMismatch {
        /// The DID the caller expected.
        expected: String,
        /// The DID in the commit.
        found: String,
    },
    /// A commit field is invalid (version, rev, DID syntax).
    #[error("commit {cid}: {reason}")]
    Commit {
        /// The commit block.
        cid: Cid,
        /// What is wrong.
        reason: String,
    },
    /// The CAR container itself is malformed.
    #[error("CAR at byte {offset}: {reason}")]
    Car {
        /// Where in the stream.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The input ended before the CAR or structure was complete.
    #[error("truncated input at byte {offset}: {context}")]
    Truncated {
        /// Bytes read before the end.
        offset: u64,
        /// What was being read.
        context: &'static str,
    },
    /// A configured or protocol limit was exceeded.
    #[error("{what}: limit {limit} exceeded (found {found})")]
    LimitExceeded {
        /// Which limit.
        what: &'static str,
        /// The limit.
        limit: u64,
        /// The value found.
        found: u64,
    },
    /// A Sync 1.1 operation does not match the tree it is applied to.
    #[error("operation on {path:?}: {reason}")]
    Operation {
        /// The record path.
        path: String,
        /// What does not match.
        reason: String,
    },
    /// A firehose event names something its own blocks contradict (commit CID, rev).
    #[error("event {field} is {event}, but its blocks say {found}")]
    EventMismatch {
        /// The event field: `commit` or `rev`.
        field: &'static str,
        /// What the event says.
        event: String,
        /// What the CAR root or the commit block says.
        found: String,
    },
    /// Undoing a commit's operations does not lead back to the `prevData` the event names.
    #[error("inverted operations give MST root {computed}, but prevData is {prev_data}")]
    InversionMismatch {
        /// The root the partial tree has after inversion.
        computed: Cid,
        /// The previous root the event claims.
        prev_data: Cid,
    },
    /// Reading the input or the spill file failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}
