//! Verified repository primitives: identifiers, DRISL, CIDs, CAR streams, the MST and signed commits.
//!
//! # Overview
//!
//! Everything atpdb knows about an account's data starts here, as bytes, and leaves as
//! records it can prove the account signed.
//!
//! # Invariants
//!
//! - No I/O beyond the `Read`/`AsyncRead` a caller hands in (and the spill file it configures).
//! - No block is used before its bytes were hashed and matched to its CID.
//! - Untrusted input never reaches a panic, and no length read from input drives an
//!   allocation before the bytes behind it have arrived.

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod blocks;
pub mod car;
pub mod cbor;
pub mod cid;
pub mod commit;
pub mod crypto;
mod error;
pub mod firehose;
pub mod label;
pub mod mst;
pub mod multiformats;
pub mod record;
pub mod repo;
pub mod sample;
pub mod syntax;
pub mod value;
pub mod verify;

pub use cid::Cid;
pub use error::{Error, Result};
pub use record::Record;
