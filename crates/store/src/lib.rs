//! The embedded store (fjall): repos, records, cursors, outbox and resync buffer, one atomic
//! batch per change.
//!
//! # Overview
//!
//! A [`Store`] is one data directory. Reads are methods on it; every write is collected in a
//! [`Batch`] and lands with [`Batch::commit`] as a single fjall write batch, together with
//! the counters, the state index and the ids that the write changes. The sync engine builds
//! one batch per state change (a backfilled chunk, a firehose commit) holding the records,
//! the repo entry, the cursor and the [`Event`]s that change produces.
//!
//! What is kept: [`RepoEntry`] per tracked account (indexed by [`RepoState`]); records,
//! keyed so one account's records stream in MST order ([`Store::record_keys`]); named
//! cursors and JSON configuration; the outbox of [`Event`]s with their ids; frames buffered
//! while a repo backfills; [`BackfillRun`] progress.
//!
//! # Invariants
//!
//! - A batch is all or nothing, also across a crash (SIGKILL) at any instant: repos,
//!   records, cursors, counters and the outbox always agree with each other.
//! - A commit has reached the operating system when `commit` returns (it survives the
//!   process dying); [`Store::persist`] fsyncs for power loss.
//! - Event ids are assigned at commit under a store-wide lock, so outbox order is commit
//!   order; they only grow, never repeat, across restarts and after the outbox is emptied.
//!   Batches handed over with [`Batch::submit`] commit in the order they were submitted,
//!   whether or not the caller waits for them.
//! - Counters (records, per-DID records, repos per state, outbox and buffer lengths) are
//!   exact: they are computed from what the batch finally does to each key, under the same
//!   lock, and written in the same batch.
//! - Bytes on disk that do not decode are [`StoreError::Corrupt`], never a panic.
//! - One process per directory: [`Store::open`] takes an exclusive lock file.
//!
//! The on-disk layout is described in the `codec` module; every value starts with a format
//! byte.
//!
//! # Example
//!
//! ```
//! use atpdb_store::{Event, IdentityEvent, RepoEntry, RepoState, Store};
//! # let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path())?;
//! let did: atpdb_repo::syntax::Did = "did:plc:alice".parse()?;
//!
//! let mut batch = store.batch();
//! batch.put_repo(&RepoEntry::new(did.clone(), 1_700_000_000_000_000));
//! batch.push(Event::Identity(IdentityEvent {
//!     did: did.clone(),
//!     handle: "alice.test".to_owned(),
//!     is_active: true,
//!     status: "active".to_owned(),
//!     time_us: 1_700_000_000_000_000,
//! }));
//! batch.set_cursor("firehose", "42");
//! let ids = batch.commit()?;
//!
//! assert_eq!(ids, [1]);
//! assert_eq!(store.count_in_state(RepoState::Pending)?, 1);
//! let events = store.events_after(0, 10)?;
//! assert_eq!(
//!     events[0].1.to_tap_string(events[0].0),
//!     r#"{"id":1,"type":"identity","identity":{"did":"did:plc:alice","handle":"alice.test","is_active":true,"status":"active"}}"#
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod batch;
mod codec;
mod error;
mod event;
mod store;
mod types;

pub use batch::{Batch, CommitIds, PendingCommit};
pub use error::{Result, StoreError};
pub use event::{Action, Event, IdentityEvent, RecordEvent, RecordEventRef, RepoStateEvent};
pub use store::{RecordKeys, Store};
pub use types::{AccountStatus, BackfillRun, RepoEntry, RepoState, UnknownRepoState};
