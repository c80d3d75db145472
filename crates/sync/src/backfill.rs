//! Resync workers: a verified snapshot of one repo, diffed both ways against the store, then
//! the live commits buffered meanwhile.
//!
//! A resync is crash-safe without a journal of its own: the repo stays `resyncing` until the
//! last buffered commit is replayed, chunks of the diff are committed with their events, and a
//! restart turns `resyncing` back into `desynchronized`. The next snapshot is diffed against
//! what the chunks already wrote, so it emits exactly the changes still missing.

use std::cmp::Ordering as CmpOrdering;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atpdb_identity::Identity;
use atpdb_repo::crypto::PublicKey;
use atpdb_repo::firehose::{self, Chain, Frame, Message, RepoHead};
use atpdb_repo::mst::SubtreeBuilder;
use atpdb_repo::syntax::{Did, Tid};
use atpdb_repo::verify::{Expected, LoadedCar, RecordItem, RecordRef, load_car_async};
use atpdb_repo::{Cid, Error as RepoError};
use atpdb_store::{
    Action, Event, IdentityEvent, RecordEvent, RecordEventRef, RepoEntry, RepoState, Store,
    StoreError,
};

use crate::firehose::{apply_commit, verify_with_identity};
use crate::scope::Filters;
use crate::{Inner, SyncError, bump, now_us};

/// Changes committed per batch while applying a snapshot: large enough to amortise a
/// commit, small enough that a batch stays a few megabytes.
const CHUNK: usize = 1000;

/// The repos claimed by some worker right now, so two workers never take the same one.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    active: Mutex<HashSet<Did>>,
    claiming: tokio::sync::Mutex<()>,
}

impl Claims {
    fn release(&self, did: &Did) {
        if let Ok(mut active) = self.active.lock() {
            active.remove(did);
        }
    }

    fn is_claimed(&self, did: &Did) -> bool {
        self.active.lock().is_ok_and(|active| active.contains(did))
    }

    fn insert(&self, did: Did) {
        if let Ok(mut active) = self.active.lock() {
            active.insert(did);
        }
    }
}

/// Why one repo's resync failed: recorded on the repo, retried later.
#[derive(Debug)]
enum Failure {
    /// The repo's fault or the network's: record and back off.
    Repo(String),
    /// The store's: the engine cannot go on.
    Store(StoreError),
}

impl From<StoreError> for Failure {
    fn from(err: StoreError) -> Failure {
        Failure::Store(err)
    }
}

/// Repos a crash left `resyncing` go back to `desynchronized`; their buffers stay.
pub(crate) fn recover(inner: &Inner) -> Result<(), StoreError> {
    loop {
        let stuck = inner.store.repos_in_state(RepoState::Syncing, 1000)?;
        if stuck.is_empty() {
            return Ok(());
        }
        let mut batch = inner.store.batch();
        for mut entry in stuck {
            tracing::info!(did = %entry.did, "backfill.recover: resync interrupted, will redo");
            entry.state = RepoState::Desynchronized;
            batch.put_repo(&entry);
        }
        batch.commit()?;
    }
}

/// One resync worker: claim, sync, repeat, until shutdown.
pub(crate) async fn run_worker(inner: Arc<Inner>) -> Result<(), SyncError> {
    loop {
        if inner.shutdown.is_cancelled() {
            return Ok(());
        }
        inner.outbox_room().await;
        match claim(&inner).await? {
            Some(entry) => {
                let did = entry.did.clone();
                let result = sync_repo(&inner, entry).await;
                inner.claims.release(&did);
                result?;
            }
            None => {
                let notified = inner.work.notified();
                tokio::select! {
                    () = inner.shutdown.cancelled() => return Ok(()),
                    () = notified => {}
                    () = tokio::time::sleep(inner.config.idle_poll) => {}
                }
            }
        }
    }
}

/// Takes the next repo that needs a snapshot: pending first, then desynchronized, then
/// errored, each only once its retry time has come, and only active accounts.
async fn claim(inner: &Inner) -> Result<Option<RepoEntry>, StoreError> {
    let _claiming = inner.claims.claiming.lock().await;
    let now = now_us();
    for state in [
        RepoState::Pending,
        RepoState::Desynchronized,
        RepoState::Error,
    ] {
        for candidate in inner.store.repos_in_state(state, 256)? {
            if candidate.retry_after_us > now
                || !candidate.status.is_active()
                || inner.claims.is_claimed(&candidate.did)
            {
                continue;
            }
            let _guard = inner.locks.lock(&candidate.did).await;
            let Some(mut entry) = inner.store.repo(&candidate.did)? else {
                continue;
            };
            if entry.state != state {
                continue;
            }
            entry.state = RepoState::Syncing;
            let mut batch = inner.store.batch();
            batch.put_repo(&entry);
            batch.commit()?;
            inner.claims.insert(entry.did.clone());
            return Ok(Some(entry));
        }
    }
    Ok(None)
}

/// Keeps the progress of unfinished backfill runs current until shutdown.
///
/// A run's work is the repos it marked; their states are the checkpoint, so a run resumes by
/// itself after a restart and is done when none is left to sync.
pub(crate) async fn track_runs(inner: Arc<Inner>) -> Result<(), SyncError> {
    loop {
        update_runs(&inner)?;
        tokio::select! {
            () = inner.shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(inner.config.cursor_interval) => {}
        }
    }
}

fn update_runs(inner: &Inner) -> Result<(), StoreError> {
    let mut unfinished = inner
        .store
        .runs()?
        .into_iter()
        .filter(|run| run.finished_us.is_none())
        .peekable();
    if unfinished.peek().is_none() {
        return Ok(());
    }
    let remaining = inner.store.count_in_state(RepoState::Pending)?
        + inner.store.count_in_state(RepoState::Desynchronized)?
        + inner.store.count_in_state(RepoState::Syncing)?;
    let errors = inner.store.count_in_state(RepoState::Error)?;
    let mut batch = inner.store.batch();
    for mut run in unfinished {
        let done = run.total.saturating_sub(remaining + errors);
        if done == run.done && errors == run.errors && remaining > 0 {
            continue;
        }
        run.done = done;
        run.errors = errors;
        if remaining == 0 {
            run.finished_us = Some(now_us());
            tracing::info!(run = run.id, kind = %run.kind, done, errors, "backfill.run_finished");
        }
        batch.put_run(&run);
    }
    if !batch.is_empty() {
        batch.commit()?;
    }
    Ok(())
}

/// Syncs one claimed repo, recording a failure on the repo.
async fn sync_repo(inner: &Arc<Inner>, entry: RepoEntry) -> Result<(), SyncError> {
    let did = entry.did.clone();
    let started = Instant::now();
    match fetch_and_apply(inner, entry).await {
        Ok(records) => {
            bump(&inner.counters.resyncs_done);
            tracing::info!(
                %did,
                records,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "backfill.done"
            );
            Ok(())
        }
        Err(Failure::Repo(reason)) => {
            bump(&inner.counters.resyncs_failed);
            fail(inner, &did, reason).await?;
            Ok(())
        }
        Err(Failure::Store(err)) => Err(err.into()),
    }
}

/// Records a failed resync: `error` with the reason, a retry after exponential backoff, and
/// a repo-state event, in one batch.
async fn fail(inner: &Inner, did: &Did, reason: String) -> Result<(), StoreError> {
    let _guard = inner.locks.lock(did).await;
    let Some(mut entry) = inner.store.repo(did)? else {
        return Ok(());
    };
    entry.retries = entry.retries.saturating_add(1);
    let delay = backoff(
        inner.config.backoff_min,
        inner.config.backoff_max,
        entry.retries,
    );
    entry.retry_after_us = now_us().saturating_add(u64::try_from(delay.as_micros()).unwrap_or(0));
    tracing::warn!(
        %did,
        reason = %reason,
        retries = entry.retries,
        retry_in_s = delay.as_secs(),
        "repo.errored"
    );
    inner.set_state(entry, RepoState::Error, Some(reason))
}

/// `min · 2^(retries-1)`, capped at `max`, plus up to a tenth of jitter so that repos that
/// failed together do not retry together.
pub(crate) fn backoff(min: Duration, max: Duration, retries: u32) -> Duration {
    let exponent = retries.saturating_sub(1).min(20);
    let base = min.saturating_mul(1 << exponent).min(max);
    let jitter_range = u64::try_from(base.as_micros() / 10).unwrap_or(0).max(1);
    base + Duration::from_micros(now_us() % jitter_range)
}

async fn fetch_and_apply(inner: &Arc<Inner>, entry: RepoEntry) -> Result<u64, Failure> {
    let did = entry.did.clone();
    let identity = inner
        .identity
        .refresh(&did)
        .await
        .map_err(|err| Failure::Repo(format!("resolving {did}: {err}")))?;
    record_identity(inner, &identity).await?;

    // A repo stored before and unchanged since needs no CAR: most repos in a catch-up. Not
    // when the filters widened since its last sync: it lacks records they now keep.
    let widened_us = inner.widened_us.load(std::sync::atomic::Ordering::Relaxed);
    if let Some(stored_rev) = entry.rev.as_deref()
        && entry.last_sync_us > widened_us
        && let Ok(latest) = inner.xrpc.get_latest_commit(&identity.pds, &did).await
        && latest.rev.as_str() == stored_rev
    {
        let head = Head::stored(&entry)
            .ok_or_else(|| Failure::Repo(format!("stored head of {did} is unreadable")))?;
        finish(inner, &identity, head, 0).await?;
        return Ok(0);
    }

    // A repo synced before, whose stored records are all its records (no filter has ever
    // left any out), catches up from only what changed since its rev.
    if let Some(stored) = Head::stored(&entry)
        && entry.last_sync_us > widened_us
        && inner.scope().filters.is_all()
    {
        match fetch_since(inner, &identity, &entry, stored).await {
            Ok(applied) => {
                bump(&inner.counters.resyncs_since);
                inner
                    .counters
                    .backfill_records
                    .fetch_add(applied.changes, std::sync::atomic::Ordering::Relaxed);
                let changes = applied.changes;
                finish(inner, &identity, applied.head, changes).await?;
                return Ok(changes);
            }
            Err(Failure::Repo(reason)) => {
                bump(&inner.counters.resyncs_since_fallback);
                tracing::info!(%did, reason = %reason, "backfill.since_fallback");
            }
            Err(failure @ Failure::Store(_)) => return Err(failure),
        }
    }

    let body = inner
        .xrpc
        .get_repo(&identity.pds, &did, None)
        .await
        .map_err(|err| Failure::Repo(format!("getRepo from {}: {err}", identity.pds)))?;
    let loaded = load_car_async(body, &inner.config.verify)
        .await
        .map_err(|err| Failure::Repo(format!("getRepo from {}: {err}", identity.pds)))?;
    let store = inner.store.clone();
    let filters = inner.scope().filters.clone();
    let key = identity.key.clone();
    let applied =
        tokio::task::spawn_blocking(move || apply_snapshot(&store, &filters, loaded, &did, &key))
            .await
            .map_err(|err| Failure::Repo(format!("snapshot task ended: {err}")))??;
    inner
        .counters
        .backfill_records
        .fetch_add(applied.changes, std::sync::atomic::Ordering::Relaxed);
    finish(inner, &identity, applied.head, applied.changes).await?;
    Ok(applied.changes)
}

/// `getRepo?since=<stored rev>`, applied by [`apply_since`].
async fn fetch_since(
    inner: &Arc<Inner>,
    identity: &Identity,
    entry: &RepoEntry,
    stored: Head,
) -> Result<Applied, Failure> {
    let did = entry.did.clone();
    let body = inner
        .xrpc
        .get_repo(&identity.pds, &did, Some(&stored.rev))
        .await
        .map_err(|err| Failure::Repo(format!("getRepo?since from {}: {err}", identity.pds)))?;
    let loaded = load_car_async(body, &inner.config.verify)
        .await
        .map_err(|err| Failure::Repo(format!("getRepo?since from {}: {err}", identity.pds)))?;
    let store = inner.store.clone();
    let key = identity.key.clone();
    tokio::task::spawn_blocking(move || apply_since(&store, loaded, &did, &key, &stored))
        .await
        .map_err(|err| Failure::Repo(format!("catch-up task ended: {err}")))?
}

/// Stores the PDS and the verified handle, and tells consumers when the handle changed (the
/// first resync always does, so every repo's first event names its handle).
async fn record_identity(inner: &Inner, identity: &Identity) -> Result<(), Failure> {
    let handle = verified_handle(inner, identity).await;
    let _guard = inner.locks.lock(&identity.did).await;
    let Some(mut entry) = inner.store.repo(&identity.did)? else {
        return Ok(());
    };
    let handle_changed = entry.handle.as_deref() != Some(handle.as_str());
    if !handle_changed && entry.pds.as_deref() == Some(identity.pds.as_str()) {
        return Ok(());
    }
    entry.pds = Some(identity.pds.clone());
    let mut batch = inner.store.batch();
    if handle_changed {
        entry.handle = Some(handle.clone());
        batch.push(identity_event(&entry));
    }
    batch.put_repo(&entry);
    batch.commit()?;
    Ok(())
}

/// The handle to report: verified both ways, or `handle.invalid` (never empty, which the
/// TypeScript client would reject forever).
pub(crate) async fn verified_handle(inner: &Inner, identity: &Identity) -> String {
    match inner.identity.verified_handle(identity).await {
        Some(handle) => handle.to_string(),
        None => "handle.invalid".to_owned(),
    }
}

/// Tap's identity event for the repo as stored.
pub(crate) fn identity_event(entry: &RepoEntry) -> Event {
    Event::Identity(IdentityEvent {
        did: entry.did.clone(),
        handle: entry
            .handle
            .clone()
            .unwrap_or_else(|| "handle.invalid".to_owned()),
        is_active: entry.status.is_active(),
        status: entry.status.as_str().to_owned(),
        time_us: now_us(),
    })
}

/// The rev and MST root a repo's stored records reflect.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub(crate) rev: Tid,
    pub(crate) data: Cid,
}

impl Head {
    pub(crate) fn stored(entry: &RepoEntry) -> Option<Head> {
        Some(Head {
            rev: entry.rev.as_deref()?.parse().ok()?,
            data: entry.data?,
        })
    }

    pub(crate) fn as_ref(&self) -> RepoHead<'_> {
        RepoHead {
            rev: &self.rev,
            data: &self.data,
        }
    }
}

struct Applied {
    head: Head,
    changes: u64,
}

/// Verifies the snapshot and merges it into the store in key order: records the store lacks
/// are created, records whose CID differs are updated, and stored records the snapshot lacks
/// are deleted, each with its event. Runs on a blocking thread (hashing, disk).
fn apply_snapshot(
    store: &Store,
    filters: &Filters,
    loaded: LoadedCar,
    did: &Did,
    key: &PublicKey,
) -> Result<Applied, Failure> {
    let verified = loaded
        .verify(Expected {
            did: Some(did),
            key,
        })
        .map_err(|err| Failure::Repo(format!("verifying the snapshot: {err}")))?;
    let commit = verified.commit();
    let head = Head {
        rev: commit.rev.clone(),
        data: commit.data,
    };
    let rev = commit.rev.to_string();
    let time_us = now_us();
    let mut writer = ChunkWriter::new(store);
    let mut stored = StoredKeys::new(store, did, filters);
    let mut walker = verified.records();
    loop {
        let next = walker
            .next_record()
            .map_err(|err| Failure::Repo(format!("verifying the snapshot: {err}")))?;
        let Some(found) = next else { break };
        if !filters.matches(found.collection) {
            continue;
        }
        while let Some((collection, rkey, _)) = stored.next_before(found.collection, found.rkey)? {
            writer.push_delete(did, &rev, collection, rkey, false, time_us)?;
        }
        let action = match stored.take_equal(found.collection, found.rkey)? {
            Some(cid) if cid == found.cid => continue,
            Some(_) => Action::Update,
            None => Action::Create,
        };
        writer.push_record(&rev, &found, action, time_us)?;
    }
    while let Some((collection, rkey, _)) = stored.next_remaining()? {
        writer.push_delete(did, &rev, collection, rkey, false, time_us)?;
    }
    let changes = writer.finish()?;
    Ok(Applied { head, changes })
}

/// Applies a CAR of the blocks written since the stored rev: the records in it are merged
/// as a snapshot's are, each record left out must be stored with the same CID, and each
/// subtree left out must rebuild, from the stored records of its key range, to its CID.
///
/// Every change written is true of the signed new commit, so a proof that fails halfway
/// leaves nothing wrong behind: the whole snapshot that follows diffs against it.
fn apply_since(
    store: &Store,
    loaded: LoadedCar,
    did: &Did,
    key: &PublicKey,
    stored_head: &Head,
) -> Result<Applied, Failure> {
    let failed = |err: RepoError| Failure::Repo(format!("verifying the catch-up: {err}"));
    let verified = loaded
        .verify(Expected {
            did: Some(did),
            key,
        })
        .map_err(failed)?;
    let commit = verified.commit();
    if commit.rev <= stored_head.rev {
        return Err(Failure::Repo(format!(
            "the catch-up's rev {} does not follow the stored {}",
            commit.rev, stored_head.rev
        )));
    }
    let head = Head {
        rev: commit.rev.clone(),
        data: commit.data,
    };
    let rev = commit.rev.to_string();
    let time_us = now_us();
    let all = Filters::all();
    let mut writer = ChunkWriter::new(store);
    let mut stored = StoredKeys::new(store, did, &all);
    let mut gap: Option<(SubtreeBuilder, Cid)> = None;
    let mut path = Vec::new();
    let mut walker = verified.records_since();
    loop {
        let item = walker.next_item().map_err(failed)?;
        // Where the stored keys before this item go: into the open gap's proof, or deleted.
        let bound = match &item {
            Some(RecordItem::Record(found)) => Some((found.collection, found.rkey)),
            Some(RecordItem::Unfetched {
                collection, rkey, ..
            }) => Some((*collection, *rkey)),
            Some(RecordItem::Gap { .. }) => {
                if gap.is_some() {
                    return Err(Failure::Repo(
                        "two left-out subtrees with no entry between them".to_owned(),
                    ));
                }
                None
            }
            None => None,
        };
        if !matches!(item, Some(RecordItem::Gap { .. })) {
            loop {
                let next = match bound {
                    Some((collection, rkey)) => stored.next_before(collection, rkey)?,
                    None => stored.next_remaining()?,
                };
                let Some((collection, rkey, cid)) = next else {
                    break;
                };
                match &mut gap {
                    Some((builder, _)) => {
                        path.clear();
                        path.extend_from_slice(collection.as_bytes());
                        path.push(b'/');
                        path.extend_from_slice(rkey.as_bytes());
                        builder.push(&path, cid).map_err(failed)?;
                    }
                    None => writer.push_delete(did, &rev, collection, rkey, false, time_us)?,
                }
            }
            if let Some((builder, expected)) = gap.take() {
                let rebuilt = builder.finish();
                if rebuilt != expected {
                    return Err(Failure::Repo(format!(
                        "the left-out subtree {expected} is not the stored records of its range                          (they make {rebuilt})"
                    )));
                }
            }
        }
        match item {
            None => break,
            Some(RecordItem::Gap { cid, layer }) => {
                gap = Some((SubtreeBuilder::new(layer).map_err(failed)?, cid));
            }
            Some(RecordItem::Unfetched {
                collection,
                rkey,
                cid,
            }) => {
                let held = stored.take_equal(collection, rkey)?;
                if held != Some(cid) {
                    return Err(Failure::Repo(format!(
                        "the catch-up left out {collection}/{rkey} ({cid}), which is not stored"
                    )));
                }
            }
            Some(RecordItem::Record(found)) => {
                let action = match stored.take_equal(found.collection, found.rkey)? {
                    Some(cid) if cid == found.cid => continue,
                    Some(_) => Action::Update,
                    None => Action::Create,
                };
                writer.push_record(&rev, &found, action, time_us)?;
            }
        }
    }
    let changes = writer.finish()?;
    Ok(Applied { head, changes })
}

/// Commits a batch every [`CHUNK`] changes.
struct ChunkWriter<'a> {
    store: &'a Store,
    batch: atpdb_store::Batch,
    pending: usize,
    total: u64,
    /// The chunk before this one, submitted and not yet waited for: the worker builds the
    /// next chunk while the commit thread writes it (a worker that waited for each of its
    /// commits left a core idle whenever every worker did).
    in_flight: Option<atpdb_store::PendingCommit>,
}

impl<'a> ChunkWriter<'a> {
    fn new(store: &'a Store) -> ChunkWriter<'a> {
        ChunkWriter {
            store,
            batch: chunk_batch(store),
            pending: 0,
            total: 0,
            in_flight: None,
        }
    }

    /// A create or update found by a merge, which knows what is stored: the commit need not
    /// look.
    fn push_record(
        &mut self,
        rev: &str,
        found: &RecordRef<'_>,
        action: Action,
        time_us: u64,
    ) -> Result<(), Failure> {
        // A name the record rules refuse fails the repo, as a bad block would: what the
        // account signed cannot be mirrored as it is.
        self.batch
            .put_found_record(found, action == Action::Update)
            .map_err(|err| match err {
                StoreError::InvalidRecordName { path, source } => {
                    Failure::Repo(format!("record {path}: {source}"))
                }
                other => Failure::Store(other),
            })?;
        self.batch.push_record_event(&RecordEventRef {
            live: false,
            did: found.did,
            rev,
            collection: found.collection,
            rkey: found.rkey,
            action,
            cid: Some(&found.cid),
            record: Some(found.bytes),
            time_us,
        });
        self.count()
    }

    fn push_delete(
        &mut self,
        did: &Did,
        rev: &str,
        collection: String,
        rkey: String,
        live: bool,
        time_us: u64,
    ) -> Result<(), Failure> {
        self.batch.delete_record_known(did, &collection, &rkey);
        self.batch.push(Event::Record(RecordEvent {
            live,
            did: did.clone(),
            rev: rev.to_owned(),
            collection,
            rkey,
            action: Action::Delete,
            cid: None,
            record: None,
            time_us,
        }));
        self.count()
    }

    fn count(&mut self) -> Result<(), Failure> {
        self.pending += 1;
        self.total += 1;
        if self.pending >= CHUNK {
            let full = std::mem::replace(&mut self.batch, chunk_batch(self.store));
            let submitted = full.submit()?;
            self.pending = 0;
            if let Some(previous) = self.in_flight.replace(submitted) {
                previous.wait()?;
            }
        }
        Ok(())
    }

    /// Commits the last chunk and waits for every chunk: what the caller commits next (the
    /// repo's new state) lands after them.
    fn finish(self) -> Result<u64, Failure> {
        let last = self.batch.submit()?;
        if let Some(previous) = self.in_flight {
            previous.wait()?;
        }
        last.wait()?;
        Ok(self.total)
    }
}

/// A batch with room for a chunk: a record and its event are two calls.
fn chunk_batch(store: &Store) -> atpdb_store::Batch {
    let mut batch = store.batch();
    batch.reserve(2 * CHUNK);
    batch
}

/// The stored side of the merge: one DID's record keys in MST key order.
struct StoredKeys<'a> {
    keys: std::iter::Peekable<atpdb_store::RecordKeys>,
    filters: &'a Filters,
}

impl<'a> StoredKeys<'a> {
    fn new(store: &Store, did: &Did, filters: &'a Filters) -> StoredKeys<'a> {
        StoredKeys {
            keys: store.record_keys(did).peekable(),
            filters,
        }
    }

    /// The next stored key ordered before `collection/rkey`, taken.
    fn next_before(
        &mut self,
        collection: &str,
        rkey: &str,
    ) -> Result<Option<(String, String, Cid)>, Failure> {
        loop {
            if let Some(Ok((stored_collection, stored_rkey, _))) = self.keys.peek()
                && path_cmp(stored_collection, stored_rkey, collection, rkey) != CmpOrdering::Less
            {
                return Ok(None);
            }
            match self.keys.next() {
                None => return Ok(None),
                Some(Err(err)) => return Err(err.into()),
                Some(Ok((stored_collection, stored_rkey, cid))) => {
                    // Records of collections now filtered out are left alone: not emitted,
                    // not deleted.
                    if self.filters.matches(&stored_collection) {
                        return Ok(Some((stored_collection, stored_rkey, cid)));
                    }
                }
            }
        }
    }

    /// The stored CID at exactly `collection/rkey`, taken, if there is one.
    fn take_equal(&mut self, collection: &str, rkey: &str) -> Result<Option<Cid>, Failure> {
        match self.keys.peek() {
            Some(Ok((stored_collection, stored_rkey, cid)))
                if stored_collection == collection && stored_rkey == rkey =>
            {
                let cid = *cid;
                self.keys.next();
                Ok(Some(cid))
            }
            Some(Err(_)) => match self.keys.next() {
                Some(Err(err)) => Err(err.into()),
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }

    /// Every stored key left, after the snapshot ended.
    fn next_remaining(&mut self) -> Result<Option<(String, String, Cid)>, Failure> {
        loop {
            match self.keys.next() {
                None => return Ok(None),
                Some(Err(err)) => return Err(err.into()),
                Some(Ok((collection, rkey, cid))) => {
                    if self.filters.matches(&collection) {
                        return Ok(Some((collection, rkey, cid)));
                    }
                }
            }
        }
    }
}

/// Orders `collection/rkey` paths the way the MST does: by their bytes with `/` between.
pub(crate) fn path_cmp(
    a_collection: &str,
    a_rkey: &str,
    b_collection: &str,
    b_rkey: &str,
) -> CmpOrdering {
    let a = a_collection
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(a_rkey.bytes());
    let b = b_collection
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(b_rkey.bytes());
    a.cmp(b)
}

/// Ends a resync under the DID's lock: stores the snapshot's head, replays the buffered
/// commits that chain onto it, and marks the repo synced — or desynchronized again when the
/// chain breaks.
async fn finish(
    inner: &Inner,
    identity: &Identity,
    snapshot: Head,
    changes: u64,
) -> Result<(), Failure> {
    let did = &identity.did;
    let _guard = inner.locks.lock(did).await;
    let Some(mut entry) = inner.store.repo(did)? else {
        return Ok(()); // removed meanwhile
    };
    if entry.state != RepoState::Syncing {
        return Ok(());
    }
    entry.rev = Some(snapshot.rev.to_string());
    entry.data = Some(snapshot.data);
    entry.pds = Some(identity.pds.clone());
    entry.error = None;
    entry.retries = 0;
    entry.retry_after_us = 0;
    entry.last_sync_us = now_us();
    let mut head = snapshot;
    for (key, bytes) in inner.store.buffered(did)? {
        let mut batch = inner.store.batch();
        batch.buffer_remove(did, key);
        let event = match firehose::decode_frame(&bytes) {
            Ok(Frame::Message(Message::Commit(event))) => event,
            _ => {
                // Only the engine writes the buffer; an unreadable entry is dropped.
                batch.commit()?;
                continue;
            }
        };
        let proof = match firehose::CommitProof::check(&event) {
            Ok(proof) => proof,
            Err(err) => {
                bump(&inner.counters.commits_invalid);
                tracing::warn!(%did, rev = %event.rev, %err, "firehose.invalid: buffered commit");
                batch.commit()?;
                continue;
            }
        };
        let Some(verified) = verify_with_identity(inner, did, proof).await else {
            batch.commit()?;
            continue;
        };
        match verified.chain(head.as_ref(), now_us()) {
            Chain::Next => {
                apply_commit(
                    &mut batch,
                    &mut entry,
                    &verified,
                    &inner.scope().filters,
                    now_us(),
                )
                .map_err(|err: RepoError| Failure::Repo(format!("buffered commit: {err}")))?;
                head = Head::stored(&entry).unwrap_or(head);
                batch.put_repo(&entry);
                batch.commit()?;
            }
            Chain::Stale | Chain::Future => {
                batch.commit()?;
            }
            Chain::Broken(reason) => {
                drop(batch);
                let mut batch = inner.store.batch();
                batch.buffer_clear(did);
                batch.commit()?;
                bump(&inner.counters.desyncs);
                tracing::warn!(%did, reason = %reason, "repo.desynchronized: buffered commit does not chain");
                inner.set_state(entry, RepoState::Desynchronized, Some(reason))?;
                inner.work.notify_one();
                return Ok(());
            }
        }
    }
    tracing::debug!(%did, changes, "backfill.synced");
    inner.set_state(entry, RepoState::Synced, None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_order_like_the_mst() {
        // "x/..." sorts after "x.y/..." in the MST ('/' > '.'), unlike a NUL-separated key.
        assert_eq!(
            path_cmp("app.bsky.feed.post", "a", "app.bsky.feed.post.extra", "a"),
            CmpOrdering::Greater
        );
        assert_eq!(path_cmp("a.b.c", "x", "a.b.c", "y"), CmpOrdering::Less);
        assert_eq!(path_cmp("a.b.c", "x", "a.b.c", "x"), CmpOrdering::Equal);
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let min = Duration::from_secs(60);
        let max = Duration::from_secs(3600);
        let first = backoff(min, max, 1);
        assert!(first >= min && first <= min + min / 10);
        let third = backoff(min, max, 3);
        assert!(third >= min * 4 && third <= min * 4 + min * 4 / 10);
        let late = backoff(min, max, 40);
        assert!(late >= max && late <= max + max / 10);
    }
}
