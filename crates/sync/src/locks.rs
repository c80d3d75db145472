//! One DID is changed by one task at a time.
//!
//! The firehose worker that owns a DID and a resync worker finishing that DID's snapshot both
//! read the repo's state, decide, and write; interleaved, a live commit could slip between a
//! snapshot and its buffer replay. A fixed array of mutexes indexed by a hash of the DID
//! serialises them without a map that grows with the network (two DIDs may share a stripe,
//! which only costs a little waiting).

use std::hash::BuildHasher;

use atpdb_repo::syntax::Did;
use tokio::sync::{Mutex, MutexGuard};

const STRIPES: usize = 1024;

pub(crate) struct DidLocks {
    stripes: Vec<Mutex<()>>,
    hasher: std::collections::hash_map::RandomState,
}

impl DidLocks {
    pub(crate) fn new() -> DidLocks {
        DidLocks {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    pub(crate) async fn lock(&self, did: &Did) -> MutexGuard<'_, ()> {
        // STRIPES is a power of two and non-zero, so the index is in range.
        let index = (self.hasher.hash_one(did.as_str()) as usize) & (STRIPES - 1);
        self.stripes[index].lock().await
    }
}
