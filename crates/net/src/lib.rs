//! The network client: guarded HTTP, XRPC calls with per-host limits and backoff, and a
//! reconnecting firehose.
//!
//! Every address atpdb dials comes from someone else: a DID document names the PDS, a did:web
//! names its own host, a relay lists hosts. So every connection goes through [`guard`], which
//! refuses loopback, private, link-local and multicast addresses unless the operator allowed
//! them (the devnet needs them).
//!
//! # Overview
//!
//! - [`Http`] is the one guarded `reqwest` client ([`HttpConfig`] says whether private
//!   networks are allowed); everything else sends through it.
//! - [`Xrpc`] calls the sync endpoints a backfill needs — [`Xrpc::get_repo`] (a streamed
//!   [`RepoBody`]), [`Xrpc::list_repos`], [`Xrpc::list_repos_by_collection`],
//!   [`Xrpc::get_latest_commit`], [`Xrpc::get_repo_status`] — with per-host concurrency, a
//!   token bucket, a shared pause on 429, retries with jittered backoff, and size and time
//!   limits on every body ([`XrpcConfig`]). [`Xrpc::stats`] counts per host.
//! - [`Firehose`] is a reconnecting `subscribeRepos` client: [`Firehose::next`] yields
//!   [`FirehoseEvent`]s forever, resuming from the last seq after every drop.
//! - [`NetError`] is every failure, split by [`NetError::is_transient`] into "try again later"
//!   and "will not work", with [`NetError::repo_unavailable`] for hosts that will not serve
//!   an account.
//!
//! # Invariants
//!
//! - Memory per response is bounded: JSON and error bodies by size, `getRepo` bodies are
//!   streamed (never buffered here) and cut at a size limit, firehose frames refused above a
//!   size limit before they are buffered.
//! - Time per response is bounded: every request has a timeout, a `getRepo` body has a
//!   whole-body deadline and an idle timeout, a firehose connection an idle timeout.
//! - No address is dialled without the guard's check, WebSocket connections included.
//! - Nothing here parses repositories or verifies commits: that is `atpdb-repo`'s job, fed
//!   with the bytes this crate fetches.
//!
//! # Example
//!
//! ```no_run
//! use atpdb_net::{Http, HttpConfig, Xrpc, XrpcConfig};
//! use atpdb_repo::verify::{VerifyOptions, load_car_async};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let http = Http::new(&HttpConfig::default())?;
//! let xrpc = Xrpc::new(http, XrpcConfig::default());
//! let page = xrpc.list_repos("https://pds.example", None, 1000).await?;
//! for repo in &page.repos {
//!     let body = xrpc.get_repo("https://pds.example", &repo.did, None).await?;
//!     let car = load_car_async(body, &VerifyOptions::default()).await?;
//!     println!("{}: {} blocks", repo.did, car.blocks());
//! }
//! # Ok(()) }
//! ```

pub mod firehose;
pub mod guard;
pub mod listing;
pub mod xrpc;

pub use firehose::{Firehose, FirehoseConfig, FirehoseEvent, SUBSCRIBE_LABELS, SUBSCRIBE_REPOS};
pub use guard::{Http, HttpConfig, NetError};
pub use xrpc::{
    DidPage, HostStats, LatestCommit, ListReposPage, ListedRepo, RepoBody, RepoStatus, Xrpc,
    XrpcConfig,
};

/// A number in `[0, 1)` for jitter, from the standard library's randomly keyed hasher (no
/// dependency for a few random bits that need not be secure).
pub(crate) fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}
