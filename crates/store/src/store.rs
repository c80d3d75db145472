//! The store handle: opening a data directory and every read.

use std::fs::{File, OpenOptions, TryLockError};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use atpdb_repo::syntax::Did;
use atpdb_repo::{Cid, Record};
use fjall::config::{FilterPolicy, PinningPolicy};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};

use crate::batch::Batch;
use crate::codec::{self, FORMAT};
use crate::error::{Result, StoreError};
use crate::event::Event;
use crate::types::{BackfillRun, RepoEntry, RepoState};

/// The name of the lock file in the data directory.
const LOCK_FILE: &str = "atpdb.lock";
/// The directory fjall keeps its files in, inside the data directory.
const FJALL_DIR: &str = "fjall";
/// Largest memtable per keyspace. fjall holds up to four sealed memtables per keyspace while
/// their flush runs before it makes writers wait, so a backfill writing records and outbox at
/// full speed holds up to ten of these: with fjall's default (64 MiB) that would be most of
/// the memory a backfill may use. 8 MiB: since backfill chunks go through the commit thread,
/// the store's write rate is what bounds a backfill, and each flush costs it (fjall fsyncs
/// its journal under the journal's lock on every flush, and a new version of the tree
/// blocks writers): against 4 MiB, a backfill was faster in 4 of 5 alternating runs, by 7%
/// at the median, and the 1 GB backfill's peak RSS rose from 200 to 220 MB (bound 256).
const MEMTABLE_BYTES: u64 = 8 << 20;
/// Sealed memtables a bulk keyspace may hold before a synchronous commit (a backfill's
/// chunk) waits for their flush ([`crate::Batch::commit`]). fjall itself lets four pile up
/// per keyspace; with one background thread they queue behind compactions.
pub(crate) const MAX_SEALED_MEMTABLES: usize = 1;
/// Block cache for reads; the working set of a sync engine is its recent writes.
const BLOCK_CACHE_BYTES: u64 = 32 << 20;
/// fjall's flush and compaction threads. One, not fjall's default of one per core (up to
/// four): with more, fjall's first worker hands every compaction request back to the
/// queue and takes it again while the others are busy, a busy loop that took a quarter
/// of the CPU when a million repos were stored (fjall 3.1.13, `worker_tick`).
const BACKGROUND_THREADS: usize = 1;

/// How each keyspace is laid out. fjall by default keeps in memory, for every table, the
/// block index of its first two levels and the filter of the first; for the outbox and the
/// log, which take every event a backfill writes, that grows with the data (a 1 GB backfill
/// held ~30 MB of pinned blocks across the bulk keyspaces). Their keys are event ids, read
/// in ranges or looked up when an event is acknowledged, which finds it: a filter only
/// helps a lookup that misses, so they get none, and their index blocks go through the
/// bounded block cache. The records keep fjall's defaults: a backfill asks about every key
/// of a new repo, all of which miss, and those lookups want filter and index at hand.
fn keyspace_options(name: &str) -> KeyspaceCreateOptions {
    let options = KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES);
    match name {
        "outbox" | "log" => options
            .index_block_pinning_policy(PinningPolicy::all(false))
            .filter_block_pinning_policy(PinningPolicy::all(false))
            .filter_policy(FilterPolicy::disabled()),
        _ => options,
    }
}

/// Names of the counters kept in the `meta` keyspace.
pub(crate) mod meta {
    pub(crate) const FORMAT: &[u8] = b"format";
    /// Every counter in one value ([`super::Counters::encode`]): a commit rewrites one key,
    /// not the three to five a record's commit changes. Earlier stores kept one key per
    /// counter; `load_legacy_counters` reads those once when this key is absent.
    pub(crate) const COUNTERS: &[u8] = b"counters";
}

/// The embedded store of one atpdb data directory. Cloning is cheap (an `Arc`).
///
/// Reads go straight to fjall and see every committed batch. Writes go through a [`Batch`]
/// from [`Store::batch`]; see there for the commit rules.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

/// Everything a [`Store`] handle shares.
pub(crate) struct Inner {
    pub(crate) db: Database,
    pub(crate) ks: Keyspaces,
    /// The commit lock. It guards the counters as of the last commit: a committer takes it,
    /// computes the new counters from them and its reads, writes, then stores them back.
    pub(crate) commit: Mutex<Counters>,
    /// A copy of the counters for readers, so they never wait for a commit.
    pub(crate) published: RwLock<Counters>,
    /// Where [`crate::Batch::submit`] sends its batches: the commit thread
    /// ([`crate::batch::run_committer`]), which ends when this is dropped with the store.
    pub(crate) committer: std::sync::mpsc::Sender<crate::batch::CommitJob>,
    /// The last event id committed, for delivery to wait on instead of polling.
    events: tokio::sync::watch::Sender<u64>,
    /// Whether commits also write events to the log (see [`Store::retain_events`]).
    pub(crate) retain: std::sync::atomic::AtomicBool,
    /// No logged event below this id is left: trims start here instead of walking the
    /// tombstones of every earlier trim (an LSM keeps them until compaction), which made
    /// trimming a growing log quadratic.
    log_floor: std::sync::atomic::AtomicU64,
    dir: PathBuf,
    /// Held for the life of the store; declared last so it is released after fjall closed.
    _lock: File,
}

impl Inner {
    /// Writes `batch` with the counters that changed, then publishes them. Called with the
    /// commit lock held (`counters` is its guard's content).
    pub(crate) fn finish_commit(
        &self,
        mut batch: fjall::OwnedWriteBatch,
        counters: &mut Counters,
        before: Counters,
    ) -> Result<()> {
        counters.write_changed(&before, &self.ks.meta, &mut batch);
        if let Err(error) = batch.commit() {
            *counters = before;
            return Err(error.into());
        }
        *self
            .published
            .write()
            .unwrap_or_else(PoisonError::into_inner) = *counters;
        if counters.last_event_id != before.last_event_id {
            self.events.send_replace(counters.last_event_id);
        }
        Ok(())
    }
}

/// One handle per keyspace.
pub(crate) struct Keyspaces {
    pub(crate) meta: Keyspace,
    pub(crate) repos: Keyspace,
    pub(crate) states: Keyspace,
    pub(crate) records: Keyspace,
    pub(crate) counts: Keyspace,
    pub(crate) cursors: Keyspace,
    pub(crate) config: Keyspace,
    pub(crate) outbox: Keyspace,
    /// Every event again, kept for a window after delivery removed it from the outbox, when
    /// retention is on ([`Store::retain_events`]): what broadcast streams replay.
    pub(crate) log: Keyspace,
    pub(crate) buffer: Keyspace,
    pub(crate) runs: Keyspace,
}

impl Keyspaces {
    /// Whether a bulk keyspace (records, outbox, log) holds more sealed memtables than
    /// [`MAX_SEALED_MEMTABLES`]: its flush is behind, waiting for the background thread to
    /// finish a compaction.
    pub(crate) fn flush_behind(&self) -> bool {
        [&self.records, &self.outbox, &self.log]
            .into_iter()
            .any(|keyspace| keyspace.sealed_memtable_count() > MAX_SEALED_MEMTABLES)
    }
}

/// The store-wide counters, persisted in `meta` by the same batch that changes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) records: u64,
    pub(crate) repos: u64,
    pub(crate) by_state: [u64; 5],
    pub(crate) last_event_id: u64,
    pub(crate) outbox_len: u64,
    pub(crate) buffer_len: u64,
    pub(crate) buffer_seq: u64,
    pub(crate) last_run_id: u64,
}

impl Counters {
    /// Number of counters in [`meta::COUNTERS`]'s value.
    const LEN: usize = 12;

    fn values(&self) -> [u64; Counters::LEN] {
        let [s0, s1, s2, s3, s4] = self.by_state;
        [
            self.records,
            self.repos,
            self.last_event_id,
            self.outbox_len,
            self.buffer_len,
            self.buffer_seq,
            self.last_run_id,
            s0,
            s1,
            s2,
            s3,
            s4,
        ]
    }

    fn from_values(values: [u64; Counters::LEN]) -> Counters {
        let [
            records,
            repos,
            last_event_id,
            outbox_len,
            buffer_len,
            buffer_seq,
            last_run_id,
            s0,
            s1,
            s2,
            s3,
            s4,
        ] = values;
        Counters {
            records,
            repos,
            by_state: [s0, s1, s2, s3, s4],
            last_event_id,
            outbox_len,
            buffer_len,
            buffer_seq,
            last_run_id,
        }
    }

    /// The counters as [`meta::COUNTERS`] holds them: each a big-endian `u64`, in
    /// [`Counters::values`] order.
    fn encode(&self) -> Vec<u8> {
        self.values()
            .iter()
            .flat_map(|value| value.to_be_bytes())
            .collect()
    }

    fn decode(value: &[u8]) -> Result<Counters> {
        let mut values = [0u64; Counters::LEN];
        if value.len() != Counters::LEN * 8 {
            return Err(StoreError::corrupt(
                "counters",
                meta::COUNTERS,
                format!("{} bytes, expected {}", value.len(), Counters::LEN * 8),
            ));
        }
        for (slot, chunk) in values.iter_mut().zip(value.chunks_exact(8)) {
            *slot = codec::decode_u64("counter", meta::COUNTERS, chunk)?;
        }
        Ok(Counters::from_values(values))
    }

    /// Adds the counters to `batch` if any differs from `before`.
    pub(crate) fn write_changed(
        &self,
        before: &Counters,
        meta: &Keyspace,
        batch: &mut fjall::OwnedWriteBatch,
    ) {
        if self != before {
            batch.insert(meta, meta::COUNTERS, self.encode());
        }
    }
}

/// Streams `(collection, rkey, cid)` of one DID in MST key order, from a snapshot taken
/// when it was made. Returned by [`Store::record_keys`].
///
/// It reads one entry at a time, so a repo of millions of records never sits in memory,
/// and it keeps the store open while it lives.
pub struct RecordKeys {
    store: Arc<Inner>,
    prefix: Vec<u8>,
    /// The last key handed out; the next page starts after it.
    after: Option<Vec<u8>>,
    page: std::collections::VecDeque<(String, String, Cid)>,
    done: bool,
}

/// Keys read per page of [`RecordKeys`].
const RECORD_KEYS_PAGE: usize = 4096;

impl RecordKeys {
    fn next_page(&mut self) -> Result<()> {
        let records = &self.store.ks.records;
        let start = match &self.after {
            Some(after) => Bound::Excluded(after.clone()),
            None => Bound::Included(self.prefix.clone()),
        };
        let end = match prefix_end(&self.prefix) {
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        let mut read = 0;
        for guard in records.range((start, end)).take(RECORD_KEYS_PAGE) {
            let (key, value) = guard.into_inner()?;
            let (collection, rkey) = codec::split_path(&key, self.prefix.len())?;
            let (cid, _) = codec::split_record_value(&key, &value)?;
            self.page
                .push_back((collection.to_owned(), rkey.to_owned(), cid));
            self.after = Some(key.to_vec());
            read += 1;
        }
        if read < RECORD_KEYS_PAGE {
            self.done = true;
        }
        Ok(())
    }
}

impl Iterator for RecordKeys {
    type Item = Result<(String, String, Cid), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.page.is_empty()
            && !self.done
            && let Err(err) = self.next_page()
        {
            self.done = true;
            return Some(Err(err));
        }
        self.page.pop_front().map(Ok)
    }
}

impl std::fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordKeys").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the data directory `dir`, creating it if needed.
    ///
    /// One process (and one `Store`) per directory: an exclusive lock on `dir/atpdb.lock`
    /// is held until the last clone of the store (and of any [`RecordKeys`]) is dropped.
    ///
    /// # Errors
    ///
    /// [`StoreError::Locked`] when another store holds the directory, [`StoreError::Io`] when
    /// it cannot be created, [`StoreError::UnsupportedFormat`] when a newer atpdb wrote it,
    /// [`StoreError::Fjall`] when fjall cannot recover it.
    pub fn open(dir: &Path) -> Result<Store> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(StoreError::Io {
                    path: lock_path,
                    source,
                });
            }
        }
        let db = match Database::builder(dir.join(FJALL_DIR))
            .cache_size(BLOCK_CACHE_BYTES)
            .worker_threads(BACKGROUND_THREADS)
            .open()
        {
            Ok(db) => db,
            Err(fjall::Error::Locked) => {
                return Err(StoreError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            Err(error) => return Err(error.into()),
        };
        let keyspace = |name: &str| db.keyspace(name, || keyspace_options(name));
        let ks = Keyspaces {
            meta: keyspace("meta")?,
            repos: keyspace("repos")?,
            states: keyspace("states")?,
            records: keyspace("records")?,
            counts: keyspace("counts")?,
            cursors: keyspace("cursors")?,
            config: keyspace("config")?,
            outbox: keyspace("outbox")?,
            log: keyspace("log")?,
            buffer: keyspace("buffer")?,
            runs: keyspace("runs")?,
        };
        match ks.meta.get(meta::FORMAT)? {
            None => {
                ks.meta
                    .insert(meta::FORMAT, u64::from(FORMAT).to_be_bytes())?;
                db.persist(PersistMode::SyncAll)?;
            }
            Some(value) => {
                let found = codec::decode_u64("counter", meta::FORMAT, &value)?;
                if found != u64::from(FORMAT) {
                    return Err(StoreError::UnsupportedFormat {
                        dir: dir.to_path_buf(),
                        found,
                        expected: u64::from(FORMAT),
                    });
                }
            }
        }
        let counters = load_counters(&ks)?;
        let (committer, jobs) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("atpdb-commit".to_owned())
            .spawn(move || crate::batch::run_committer(jobs))
            .map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        tracing::debug!(dir = %dir.display(), ?counters, "store opened");
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                ks,
                commit: Mutex::new(counters),
                committer,
                published: RwLock::new(counters),
                events: tokio::sync::watch::Sender::new(counters.last_event_id),
                retain: std::sync::atomic::AtomicBool::new(false),
                log_floor: std::sync::atomic::AtomicU64::new(0),
                dir: dir.to_path_buf(),
                _lock: lock,
            }),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// An empty batch. Nothing it collects is visible until [`Batch::commit`].
    pub fn batch(&self) -> Batch {
        Batch::new(self.inner.clone())
    }

    /// Makes every committed batch durable against power loss (fsync of the journal).
    ///
    /// A commit alone survives the process being killed; this also survives the machine
    /// going down. Call it at checkpoints, not per commit: it costs a disk flush.
    ///
    /// # Errors
    ///
    /// [`StoreError::Fjall`] when the flush fails (fjall is then poisoned).
    pub fn persist(&self) -> Result<()> {
        self.inner.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Waits until no memtable flush or compaction has run for `quiet`, or `timeout` passes;
    /// returns whether it got quiet. A bulk load leaves minutes of background work behind:
    /// a benchmark of the store in steady state waits for it first.
    pub fn wait_idle(&self, quiet: std::time::Duration, timeout: std::time::Duration) -> bool {
        let started = std::time::Instant::now();
        let mut quiet_since = std::time::Instant::now();
        loop {
            if self.inner.db.outstanding_flushes() > 0 || self.inner.db.active_compactions() > 0 {
                quiet_since = std::time::Instant::now();
            } else if quiet_since.elapsed() >= quiet {
                return true;
            }
            if started.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn counters(&self) -> Counters {
        *self
            .inner
            .published
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The tracked account `did`, if it is tracked.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] when the stored entry does not decode, [`StoreError::Fjall`].
    pub fn repo(&self, did: &Did) -> Result<Option<RepoEntry>> {
        let key = did.as_str().as_bytes();
        match self.inner.ks.repos.get(key)? {
            Some(value) => Ok(Some(codec::decode_repo(key, &value)?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` tracked accounts in DID byte order, starting after `after`: a page of
    /// the repo list, the last DID of one page being the cursor of the next.
    ///
    /// # Errors
    ///
    /// As [`Store::repo`].
    pub fn repos(&self, after: Option<&Did>, limit: usize) -> Result<Vec<RepoEntry>> {
        let repos = &self.inner.ks.repos;
        let iter = match after {
            Some(after) => repos
                .range::<&[u8], _>((Bound::Excluded(after.as_str().as_bytes()), Bound::Unbounded)),
            None => repos.iter(),
        };
        iter.take(limit)
            .map(|guard| {
                let (key, value) = guard.into_inner()?;
                codec::decode_repo(&key, &value)
            })
            .collect()
    }

    /// Up to `limit` accounts in `state`, in DID order, found through the state index (no
    /// scan of other repos): how the engine picks what to backfill or retry next.
    ///
    /// # Errors
    ///
    /// As [`Store::repo`]; [`StoreError::Corrupt`] also when the index names a missing repo.
    pub fn repos_in_state(&self, state: RepoState, limit: usize) -> Result<Vec<RepoEntry>> {
        self.repos_in_state_after(state, None, limit)
    }

    /// [`Store::repos_in_state`], continuing after the DID `after` (a page cursor).
    ///
    /// # Errors
    ///
    /// As [`Store::repos_in_state`].
    pub fn repos_in_state_after(
        &self,
        state: RepoState,
        after: Option<&Did>,
        limit: usize,
    ) -> Result<Vec<RepoEntry>> {
        let ks = &self.inner.ks;
        // One snapshot for index and entries: a commit between the two reads cannot show a
        // repo under a state it has already left.
        let snapshot = self.inner.db.snapshot();
        let prefix = [state.code()];
        let iter = match after {
            Some(after) => snapshot.range(
                &ks.states,
                (
                    Bound::Excluded(codec::state_key(state, after.as_str().as_bytes())),
                    Bound::Excluded(vec![state.code() + 1]),
                ),
            ),
            None => snapshot.prefix(&ks.states, prefix),
        };
        let mut entries = Vec::new();
        for guard in iter.take(limit) {
            let index_key = guard.key()?;
            let did = index_key.get(1..).unwrap_or_default();
            let value = snapshot.get(&ks.repos, did)?.ok_or_else(|| {
                StoreError::corrupt("state index", &index_key, "names a repo that is not stored")
            })?;
            let entry = codec::decode_repo(did, &value)?;
            if entry.state != state {
                return Err(StoreError::corrupt(
                    "state index",
                    &index_key,
                    format!("repo is in state {}", entry.state),
                ));
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    /// How many accounts are tracked (a counter kept by every commit, no scan).
    ///
    /// # Errors
    ///
    /// None today; `Result` leaves room for a counter that must be read from disk.
    pub fn repo_count(&self) -> Result<u64> {
        Ok(self.counters().repos)
    }

    /// How many accounts are in `state` (a counter kept by every commit, no scan).
    ///
    /// # Errors
    ///
    /// As [`Store::repo_count`].
    pub fn count_in_state(&self, state: RepoState) -> Result<u64> {
        Ok(self
            .counters()
            .by_state
            .get(usize::from(state.code()))
            .copied()
            .unwrap_or(0))
    }

    /// One record, checked against its CID on the way out.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] when the stored bytes do not decode or do not hash to the
    /// stored CID, [`StoreError::Fjall`].
    pub fn record(&self, did: &Did, collection: &str, rkey: &str) -> Result<Option<Record>> {
        let key = codec::record_key(did, collection, rkey);
        match self.inner.ks.records.get(&key)? {
            Some(value) => Ok(Some(make_record(did, &key, collection, rkey, &value)?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` records of `did` (of one `collection`, if given), in key order or, with
    /// `reverse`, backwards.
    ///
    /// `after_rkey` is the cursor of the previous page, exclusive, in the direction of travel
    /// (with `reverse`, the page holds keys before it). With a collection it is an rkey;
    /// without one it is a `collection/rkey` path, the key order of all of a DID's records.
    ///
    /// # Errors
    ///
    /// As [`Store::record`].
    pub fn records(
        &self,
        did: &Did,
        collection: Option<&str>,
        after_rkey: Option<&str>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<Record>> {
        let records = &self.inner.ks.records;
        let did_len = did.as_str().len() + 1;
        let prefix = match collection {
            Some(collection) => codec::collection_prefix(did, collection),
            None => codec::did_prefix(did),
        };
        let iter: Box<dyn Iterator<Item = fjall::Guard>> = match (after_rkey, reverse) {
            (None, false) => Box::new(records.prefix(&prefix)),
            (None, true) => Box::new(records.prefix(&prefix).rev()),
            (Some(after), false) => {
                let mut start = prefix.clone();
                start.extend_from_slice(after.as_bytes());
                let end = match prefix_end(&prefix) {
                    Some(end) => Bound::Excluded(end),
                    None => Bound::Unbounded,
                };
                Box::new(records.range((Bound::Excluded(start), end)))
            }
            (Some(after), true) => {
                let mut end = prefix.clone();
                end.extend_from_slice(after.as_bytes());
                Box::new(
                    records
                        .range((Bound::Included(prefix.clone()), Bound::Excluded(end)))
                        .rev(),
                )
            }
        };
        iter.take(limit)
            .map(|guard| {
                let (key, value) = guard.into_inner()?;
                let (collection, rkey) = codec::split_path(&key, did_len)?;
                make_record(did, &key, collection, rkey, &value)
            })
            .collect()
    }

    /// The collections `did` has records in, in byte order, at most `limit`: one seek per
    /// collection (past its last key), not a scan of the records.
    ///
    /// # Errors
    ///
    /// As [`Store::record`].
    pub fn collections(&self, did: &Did, limit: usize) -> Result<Vec<String>> {
        let records = &self.inner.ks.records;
        let prefix = codec::did_prefix(did);
        let Some(end) = prefix_end(&prefix) else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        let mut start = prefix.clone();
        while found.len() < limit {
            let Some(guard) = records
                .range((Bound::Included(start), Bound::Excluded(end.clone())))
                .next()
            else {
                break;
            };
            let key = guard.key()?;
            let (collection, _) = codec::split_path(&key, prefix.len())?;
            // `collection ‖ '0'` sorts after every `collection/…` key ('/' + 1 = '0') and
            // before any longer collection name that starts with this one.
            start = codec::collection_prefix(did, collection);
            if let Some(slash) = start.last_mut() {
                *slash = b'/' + 1;
            }
            found.push(collection.to_owned());
        }
        Ok(found)
    }

    /// Streams `(collection, rkey, cid)` of `did` in MST key order (`collection/rkey`
    /// bytewise), a page at a time: what a backfill merge-joins against the repo it downloads.
    ///
    /// Each page reads the state of its moment, not a snapshot of the first: a snapshot held
    /// for a whole backfill keeps every memtable written meanwhile alive (hundreds of MB for a
    /// large repo). The merge only writes keys at or before the one it last read, so later
    /// pages see exactly what a snapshot would have.
    pub fn record_keys(&self, did: &Did) -> RecordKeys {
        RecordKeys {
            store: self.inner.clone(),
            prefix: codec::did_prefix(did),
            after: None,
            page: std::collections::VecDeque::new(),
            done: false,
        }
    }

    /// How many records the store holds (a counter kept by every commit, no scan).
    pub fn record_count(&self) -> u64 {
        self.counters().records
    }

    /// How many records `did` has (a per-DID counter kept by every commit, no scan).
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] when the counter is not 8 bytes, [`StoreError::Fjall`].
    pub fn record_count_of(&self, did: &Did) -> Result<u64> {
        let key = did.as_str().as_bytes();
        match self.inner.ks.counts.get(key)? {
            Some(value) => codec::decode_u64("record count", key, &value),
            None => Ok(0),
        }
    }

    /// The cursor `name` (a firehose seq, a `listRepos` cursor...).
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] when the value is not text, [`StoreError::Fjall`].
    pub fn cursor(&self, name: &str) -> Result<Option<String>> {
        match self.inner.ks.cursors.get(name)? {
            Some(value) => Ok(Some(decode_text(name.as_bytes(), &value)?)),
            None => Ok(None),
        }
    }

    /// Every cursor, by name.
    ///
    /// # Errors
    ///
    /// As [`Store::cursor`].
    pub fn cursors(&self) -> Result<Vec<(String, String)>> {
        self.inner
            .ks
            .cursors
            .iter()
            .map(|guard| {
                let (key, value) = guard.into_inner()?;
                let name = std::str::from_utf8(&key)
                    .map_err(|_| StoreError::corrupt("cursor", &key, "name is not UTF-8"))?;
                Ok((name.to_owned(), decode_text(&key, &value)?))
            })
            .collect()
    }

    /// The configuration value `key` (settings that must survive a restart: scope, mode...).
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] when the value is not JSON, [`StoreError::Fjall`].
    pub fn config(&self, key: &str) -> Result<Option<serde_json::Value>> {
        match self.inner.ks.config.get(key)? {
            Some(value) => {
                let body = codec::format_body("config", key.as_bytes(), &value)?;
                let json = serde_json::from_slice(body)
                    .map_err(|error| StoreError::corrupt("config", key.as_bytes(), error))?;
                Ok(Some(json))
            }
            None => Ok(None),
        }
    }

    /// Up to `limit` outbox events with ids above `after`, ascending: commit order.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] when an event does not decode, [`StoreError::Fjall`].
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Event)>> {
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        self.inner
            .ks
            .outbox
            .range(start.to_be_bytes()..)
            .take(limit)
            .map(|guard| {
                let (key, value) = guard.into_inner()?;
                let id = codec::decode_u64("event", &key, &key)?;
                let event = Event::decode(&value)
                    .map_err(|reason| StoreError::corrupt("event", &key, reason))?;
                Ok((id, event))
            })
            .collect()
    }

    /// The outbox event `id`, if it is still there.
    ///
    /// # Errors
    ///
    /// As [`Store::events_after`].
    pub fn event(&self, id: u64) -> Result<Option<Event>> {
        let key = id.to_be_bytes();
        match self.inner.ks.outbox.get(key)? {
            Some(value) => {
                Ok(Some(Event::decode(&value).map_err(|reason| {
                    StoreError::corrupt("event", &key, reason)
                })?))
            }
            None => Ok(None),
        }
    }

    /// The highest event id ever assigned, 0 if none: ids only grow, across restarts and
    /// after the outbox was emptied, so a consumer's ack position stays meaningful.
    pub fn last_event_id(&self) -> u64 {
        self.counters().last_event_id
    }

    /// Keeps delivered events: from now on an event leaving the outbox
    /// ([`Store::delete_events`]) moves to the log, which [`Store::trim_log`] keeps to a
    /// window, and broadcast streams replay outbox and log together
    /// ([`Store::retained_after`]). Costs one more write per event, at delivery rather than
    /// at ingest.
    pub fn retain_events(&self, on: bool) {
        self.inner
            .retain
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether events are kept in the log.
    pub fn retains_events(&self) -> bool {
        self.inner.retain.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Up to `limit` logged events with ids above `after`, ascending.
    ///
    /// # Errors
    ///
    /// As [`Store::events_after`].
    pub fn log_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Event)>> {
        self.log_page(after, limit)
    }

    /// Up to `limit` events with ids above `after` from the outbox and the log together
    /// (everything retention keeps: delivered or not), ascending.
    ///
    /// The outbox is read first: an event that moves to the log between the two reads is
    /// then seen in the log (or twice, and kept once), never missed.
    ///
    /// # Errors
    ///
    /// As [`Store::events_after`].
    pub fn retained_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Event)>> {
        let pending = self.events_after(after, limit)?;
        let logged = self.log_page(after, limit)?;
        let mut merged = Vec::with_capacity(limit.min(pending.len() + logged.len()));
        let (mut pending, mut logged) = (
            pending.into_iter().peekable(),
            logged.into_iter().peekable(),
        );
        while merged.len() < limit {
            let next = match (pending.peek(), logged.peek()) {
                (Some((a, _)), Some((b, _))) if a == b => {
                    logged.next();
                    pending.next()
                }
                (Some((a, _)), Some((b, _))) if a < b => pending.next(),
                (Some(_), None) => pending.next(),
                (_, Some(_)) => logged.next(),
                (None, None) => None,
            };
            let Some(next) = next else { break };
            merged.push(next);
        }
        Ok(merged)
    }

    fn log_page(&self, after: u64, limit: usize) -> Result<Vec<(u64, Event)>> {
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        self.inner
            .ks
            .log
            .range(start.to_be_bytes()..)
            .take(limit)
            .map(|guard| {
                let (key, value) = guard.into_inner()?;
                let id = codec::decode_u64("event", &key, &key)?;
                let event = Event::decode(&value)
                    .map_err(|reason| StoreError::corrupt("event", &key, reason))?;
                Ok((id, event))
            })
            .collect()
    }

    /// Drops logged events beyond the window: those older than `min_time_us`, and all but
    /// the newest `max_events`. Returns how many ids were dropped. Each call removes at most
    /// `budget`, so a large trim does not hold a batch of millions.
    ///
    /// Ids below the count window go whatever their time, so they are removed without
    /// being read back: with retention on every delivered event is logged, and the trim
    /// would otherwise read and decode each one a second time only to drop it. Only the
    /// window's own events are read, for their time.
    ///
    /// # Errors
    ///
    /// As [`Store::events_after`].
    pub fn trim_log(&self, min_time_us: u64, max_events: u64, budget: usize) -> Result<u64> {
        let keep_from = self
            .last_event_id()
            .saturating_sub(max_events.saturating_sub(1));
        let floor = self
            .inner
            .log_floor
            .load(std::sync::atomic::Ordering::Relaxed);
        // The first id still logged: after a restart, or when retention was off for a
        // while, that can be far above the floor.
        let Some(first) = self.inner.ks.log.range(floor.to_be_bytes()..).next() else {
            return Ok(0);
        };
        let key = first.key()?;
        let first = codec::decode_u64("event", &key, &key)?;
        let budget = budget as u64;
        let mut batch = self.inner.db.batch().durability(Some(PersistMode::Buffer));
        let below_window = first..keep_from.min(first.saturating_add(budget));
        let mut removed = below_window.end.saturating_sub(below_window.start);
        let mut next_floor = below_window.end.max(first);
        for id in below_window {
            batch.remove(&self.inner.ks.log, id.to_be_bytes());
        }
        if removed < budget {
            for guard in self
                .inner
                .ks
                .log
                .range(next_floor.to_be_bytes()..)
                .take(usize::try_from(budget - removed).unwrap_or(usize::MAX))
            {
                let (key, value) = guard.into_inner()?;
                let id = codec::decode_u64("event", &key, &key)?;
                let old = Event::decode(&value)
                    .map_err(|reason| StoreError::corrupt("event", &key, reason))?
                    .time_us()
                    < min_time_us;
                if !old {
                    break;
                }
                batch.remove(&self.inner.ks.log, key);
                removed += 1;
                next_floor = id.saturating_add(1);
            }
        }
        if removed > 0 {
            batch.commit()?;
            self.inner
                .log_floor
                .fetch_max(next_floor, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(removed)
    }

    /// Follows the last committed event id: it changes after every commit that pushed
    /// events, so delivery wakes when there is something new rather than polling.
    pub fn watch_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.events.subscribe()
    }

    /// How many events the outbox holds (a counter kept by every commit, no scan).
    pub fn outbox_len(&self) -> u64 {
        self.counters().outbox_len
    }

    /// Removes acknowledged events, in one batch of its own. Ids not in the outbox are
    /// ignored.
    ///
    /// # Errors
    ///
    /// [`StoreError::Fjall`], [`StoreError::Poisoned`].
    pub fn delete_events(&self, ids: &[u64]) -> Result<()> {
        let inner = &self.inner;
        let mut counters = inner.commit.lock().map_err(|_| StoreError::Poisoned)?;
        let before = *counters;
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut batch = inner.db.batch().durability(Some(PersistMode::Buffer));
        let retain = self.retains_events();
        // Below the floor the trimmer has passed: it would never come back for it.
        let floor = inner.log_floor.load(std::sync::atomic::Ordering::Relaxed);
        for id in ids {
            let key = id.to_be_bytes();
            if retain && id >= floor {
                if let Some(value) = inner.ks.outbox.get(key)? {
                    batch.remove(&inner.ks.outbox, key);
                    batch.insert(&inner.ks.log, key, value);
                    counters.outbox_len = counters.outbox_len.saturating_sub(1);
                }
            } else if inner.ks.outbox.contains_key(key)? {
                batch.remove(&inner.ks.outbox, key);
                counters.outbox_len = counters.outbox_len.saturating_sub(1);
            }
        }
        self.inner.finish_commit(batch, &mut counters, before)
    }

    /// Removes every event with an id below `id` (a retention limit), in one batch of its
    /// own; returns how many were removed.
    ///
    /// # Errors
    ///
    /// As [`Store::delete_events`].
    pub fn trim_events_before(&self, id: u64) -> Result<u64> {
        let inner = &self.inner;
        let mut counters = inner.commit.lock().map_err(|_| StoreError::Poisoned)?;
        let before = *counters;
        let mut batch = inner.db.batch().durability(Some(PersistMode::Buffer));
        let mut removed = 0;
        for guard in inner.ks.outbox.range(..id.to_be_bytes()) {
            batch.remove(&inner.ks.outbox, guard.key()?);
            removed += 1;
        }
        counters.outbox_len = counters.outbox_len.saturating_sub(removed);
        self.inner.finish_commit(batch, &mut counters, before)?;
        Ok(removed)
    }

    /// The frames buffered for `did` while it backfills, as `(key, bytes)` in the order they
    /// were pushed; the key is what [`Batch::buffer_remove`] takes.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] when a key or value is malformed, [`StoreError::Fjall`].
    pub fn buffered(&self, did: &Did) -> Result<Vec<(u64, Vec<u8>)>> {
        let prefix = codec::did_prefix(did);
        self.inner
            .ks
            .buffer
            .prefix(&prefix)
            .map(|guard| {
                let (key, value) = guard.into_inner()?;
                let seq = codec::decode_u64(
                    "buffered frame",
                    &key,
                    key.get(prefix.len()..).unwrap_or_default(),
                )?;
                let body = codec::format_body("buffered frame", &key, &value)?;
                Ok((seq, body.to_vec()))
            })
            .collect()
    }

    /// How many frames are buffered, over all DIDs (a counter kept by every commit).
    pub fn buffer_len(&self) -> u64 {
        self.counters().buffer_len
    }

    /// Every backfill run, oldest first.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] when a run does not decode, [`StoreError::Fjall`].
    pub fn runs(&self) -> Result<Vec<BackfillRun>> {
        self.inner
            .ks
            .runs
            .iter()
            .map(|guard| {
                let (key, value) = guard.into_inner()?;
                codec::decode_run(&key, &value)
            })
            .collect()
    }

    /// The backfill run `id`.
    ///
    /// # Errors
    ///
    /// As [`Store::runs`].
    pub fn run(&self, id: u64) -> Result<Option<BackfillRun>> {
        let key = id.to_be_bytes();
        match self.inner.ks.runs.get(key)? {
            Some(value) => Ok(Some(codec::decode_run(&key, &value)?)),
            None => Ok(None),
        }
    }
}

/// The counters as the last commit before shutdown left them.
fn load_counters(ks: &Keyspaces) -> Result<Counters> {
    let mut counters = match ks.meta.get(meta::COUNTERS)? {
        Some(value) => Counters::decode(&value)?,
        None => load_legacy_counters(ks)?,
    };
    // The id counter and the outbox are written by the same batches, so they agree; taking
    // the larger still keeps ids from repeating should they not.
    if let Some(guard) = ks.outbox.last_key_value() {
        let key = guard.key()?;
        let last = codec::decode_u64("event", &key, &key)?;
        counters.last_event_id = counters.last_event_id.max(last);
    }
    if let Some(guard) = ks.runs.last_key_value() {
        let key = guard.key()?;
        let last = codec::decode_u64("run", &key, &key)?;
        counters.last_run_id = counters.last_run_id.max(last);
    }
    Ok(counters)
}

/// The counters of a store written before [`meta::COUNTERS`], one key each (absent: 0).
/// The next commit writes them under the one key, which is read from then on.
fn load_legacy_counters(ks: &Keyspaces) -> Result<Counters> {
    const KEYS: [&[u8]; Counters::LEN] = [
        b"records",
        b"repos",
        b"last_event_id",
        b"outbox_len",
        b"buffer_len",
        b"buffer_seq",
        b"last_run_id",
        b"state/0",
        b"state/1",
        b"state/2",
        b"state/3",
        b"state/4",
    ];
    let mut values = [0u64; Counters::LEN];
    for (slot, key) in values.iter_mut().zip(KEYS) {
        if let Some(value) = ks.meta.get(key)? {
            *slot = codec::decode_u64("counter", key, &value)?;
        }
    }
    Ok(Counters::from_values(values))
}

/// A [`Record`] from its stored value, its bytes checked against its CID.
fn make_record(
    did: &Did,
    key: &[u8],
    collection: &str,
    rkey: &str,
    value: &[u8],
) -> Result<Record> {
    let (cid, bytes) = codec::split_record_value(key, value)?;
    let corrupt = |error: atpdb_repo::Error| StoreError::corrupt("record", key, error);
    Record::new(
        did.clone(),
        collection
            .parse()
            .map_err(|e: atpdb_repo::syntax::SyntaxError| corrupt(e.into()))?,
        rkey.parse()
            .map_err(|e: atpdb_repo::syntax::SyntaxError| corrupt(e.into()))?,
        cid,
        bytes.to_vec(),
    )
    .map_err(corrupt)
}

/// A text value after its format byte.
fn decode_text(key: &[u8], value: &[u8]) -> Result<String> {
    let body = codec::format_body("cursor", key, value)?;
    String::from_utf8(body.to_vec())
        .map_err(|_| StoreError::corrupt("cursor", key, "value is not UTF-8"))
}

/// The smallest key above every key starting with `prefix`, if there is one.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// `Store`, `Batch` and `RecordKeys` cross threads and tasks.
#[allow(dead_code)]
fn assert_thread_safety() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Store>();
    send::<Batch>();
    send::<RecordKeys>();
}
