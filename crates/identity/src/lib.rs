//! DID and handle resolution with a bounded TTL cache: did:plc, did:web, DNS TXT and HTTPS handles.
//!
//! # Overview
//!
//! A [`Resolver`] turns a [`Did`](atpdb_repo::syntax::Did) into an [`Identity`]: the
//! `#atproto` signing key, the `#atproto_pds` endpoint, the handle the document claims, and
//! the document itself. did:plc documents come from the PLC directory
//! ([`IdentityConfig::plc_url`]); did:web documents from `https://<host>/.well-known/did.json`.
//! Handles resolve through the `_atproto.<handle>` DNS TXT record, then
//! `https://<handle>/.well-known/atproto-did`; [`Resolver::verified_handle`] checks a
//! claimed handle both ways.
//!
//! Answers are cached, failures too ([`IdentityConfig::hit_ttl`], [`IdentityConfig::miss_ttl`]),
//! in a cache bounded by entries and bytes. [`Resolver::refresh`] purges and asks again, as an
//! `#identity` event or a failed signature calls for; when the directory cannot be reached,
//! it returns the identity known before rather than nothing.
//!
//! # Invariants
//!
//! - "Not found" and "could not find out" are different errors
//!   ([`IdentityError::is_transient`]); retries depend on it.
//! - Every request goes through the guarded [`atpdb_net::Http`]: a document or handle naming
//!   a loopback or private address is refused unless private networks are allowed.
//! - Memory is bounded: documents are read up to [`MAX_DOCUMENT_BYTES`], the caches hold at
//!   most [`IdentityConfig::capacity`] entries and about [`IdentityConfig::max_cache_bytes`]
//!   bytes each, and every lookup ends within [`IdentityConfig::timeout`].
//! - An answer that started before a purge of its DID is never cached.
//! - Input never panics: malformed documents are [`IdentityError::Invalid`].
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use atpdb_identity::{IdentityConfig, Resolver};
//!
//! let http = atpdb_net::Http::new(&atpdb_net::HttpConfig::default())?;
//! let resolver = Resolver::new(IdentityConfig::default(), http)?;
//! let did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz".parse()?;
//! let identity = resolver.resolve(&did).await?;
//! let handle = resolver.verified_handle(&identity).await;
//! println!("{} at {}, handle {:?}", identity.did, identity.pds, handle);
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod cache;
mod document;
mod error;
mod network;
mod resolver;

pub use document::Identity;
pub use error::IdentityError;
pub use network::{Network, NetworkConfig};
pub use resolver::{IdentityConfig, MAX_DOCUMENT_BYTES, Resolver};
