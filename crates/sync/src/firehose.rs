//! The live path: `subscribeRepos` → workers by DID → Sync 1.1 → store and outbox.
//!
//! One reader takes frames in order and hands each event to the worker its DID hashes to,
//! so one DID's events are applied in firehose order while different DIDs run in parallel.
//! The cursor saved is the low-water mark: the highest seq below which every event has been
//! applied (or decided to be ignored), so a restart never skips an event. Replayed events
//! are harmless: a rev not newer than the stored one is dropped.

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use atpdb_identity::IdentityError;
use atpdb_net::{Firehose, FirehoseConfig, FirehoseEvent};
use atpdb_repo::firehose::{
    AccountEvent, Chain, CommitEvent, CommitProof, IdentityEvent as WireIdentity, Message,
    SyncAction, SyncEvent, VerifiedCommit, encode_message, sync_action, verify_sync,
};
use atpdb_repo::repo::Action as OpAction;
use atpdb_repo::syntax::Did;
use atpdb_repo::{Error as RepoError, Record};
use atpdb_store::{
    AccountStatus, Action, BackfillRun, Batch, Event, RecordEvent, RepoEntry, RepoState, StoreError,
};
use tokio::sync::mpsc;

use crate::backfill::{Head, identity_event, verified_handle};
use crate::scope::Filters;
use crate::{Inner, SyncError, bump, now_us};

/// Events queued per worker before the reader waits: backpressure instead of memory.
const WORKER_QUEUE: usize = 512;

/// The store's cursor names for a relay.
pub fn cursor_name(relay_url: &str) -> String {
    format!("firehose:{}", relay_url.trim_end_matches('/'))
}

fn cursor_time_name(relay_url: &str) -> String {
    format!("{}:saved_us", cursor_name(relay_url))
}

/// Seqs handed to workers and not yet finished.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    state: Mutex<TrackerState>,
}

#[derive(Debug, Default)]
struct TrackerState {
    in_flight: BTreeSet<u64>,
    max_seen: u64,
}

impl Tracker {
    fn with_start(cursor: u64) -> Tracker {
        Tracker {
            state: Mutex::new(TrackerState {
                in_flight: BTreeSet::new(),
                max_seen: cursor,
            }),
        }
    }

    fn begin(&self, seq: u64) {
        if let Ok(mut state) = self.state.lock() {
            state.in_flight.insert(seq);
            state.max_seen = state.max_seen.max(seq);
        }
    }

    fn finish(&self, seq: u64) {
        if let Ok(mut state) = self.state.lock() {
            state.in_flight.remove(&seq);
        }
    }

    /// The highest seq at or below which nothing is in flight.
    fn low_water(&self) -> u64 {
        self.state
            .lock()
            .map_or(0, |state| match state.in_flight.first() {
                Some(&first) => first.saturating_sub(1),
                None => state.max_seen,
            })
    }
}

/// Where to start: decided from the saved cursor's age against the relay's replay window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Replay from the saved cursor.
    Replay(u64),
    /// No cursor yet: live from now (the repos in scope are backfilled anyway).
    Live,
    /// The cursor is older than the replay window: resync what is stored, then live.
    CatchUp,
}

fn decide_start(inner: &Inner) -> Result<Start, StoreError> {
    let relay = &inner.config.relay_url;
    let cursor = inner
        .store
        .cursor(&cursor_name(relay))?
        .and_then(|text| text.parse::<u64>().ok());
    let saved_us = inner
        .store
        .cursor(&cursor_time_name(relay))?
        .and_then(|text| text.parse::<u64>().ok())
        .unwrap_or(0);
    let window_us = u64::try_from(inner.config.replay_window.as_micros()).unwrap_or(u64::MAX);
    let start = match cursor {
        // Repos synced by a run that ended before it saved a cursor may have missed events
        // since: only a resync can tell.
        None if inner.store.count_in_state(RepoState::Synced)? > 0 => Start::CatchUp,
        None => Start::Live,
        Some(cursor) if now_us().saturating_sub(saved_us) <= window_us => Start::Replay(cursor),
        Some(_) => Start::CatchUp,
    };
    tracing::info!(relay = %relay, ?start, "backfill.decision");
    Ok(start)
}

/// Marks every synced repo for a resync (cheap for the unchanged ones: `getLatestCommit`
/// shows the stored rev) and records the run.
pub(crate) fn catch_up(inner: &Inner, kind: &str, reason: &str) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let page = inner.store.repos_in_state(RepoState::Synced, 1000)?;
        if page.is_empty() {
            break;
        }
        let mut batch = inner.store.batch();
        for mut entry in page {
            entry.state = RepoState::Desynchronized;
            entry.retry_after_us = 0;
            batch.put_repo(&entry);
            total += 1;
        }
        batch.commit()?;
    }
    let mut batch = inner.store.batch();
    batch.put_run(&BackfillRun {
        id: 0,
        kind: kind.to_owned(),
        started_us: now_us(),
        finished_us: None,
        done: 0,
        total,
        records: 0,
        errors: 0,
        checkpoint: None,
    });
    batch.commit()?;
    tracing::warn!(
        reason,
        kind,
        repos = total,
        "backfill.decision: resyncing every synced repo"
    );
    inner.work.notify_waiters();
    Ok(total)
}

/// Follows the relay until shutdown.
pub(crate) async fn run(inner: Arc<Inner>) -> Result<(), SyncError> {
    let relay = inner.config.relay_url.clone();
    let start = decide_start(&inner)?;
    let cursor = match start {
        Start::Replay(cursor) => Some(cursor),
        Start::Live => None,
        Start::CatchUp => {
            catch_up(&inner, "catch-up", "no cursor within the replay window")?;
            None
        }
    };
    let tracker = Arc::new(Tracker::with_start(cursor.unwrap_or(0)));
    inner
        .counters
        .firehose_cursor
        .store(cursor.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    let mut firehose = Firehose::connect(
        &inner.http,
        FirehoseConfig {
            cursor,
            ..FirehoseConfig::new(relay.clone())
        },
    );

    let workers = inner.config.firehose_parallelism.max(1);
    let mut senders = Vec::with_capacity(workers);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (sender, receiver) = mpsc::channel(WORKER_QUEUE);
        senders.push(sender);
        tasks.spawn(work(inner.clone(), tracker.clone(), receiver));
    }
    let hasher = std::collections::hash_map::RandomState::new();
    let mut saved = cursor;
    let mut save_tick = tokio::time::interval(inner.config.cursor_interval);
    save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let result = loop {
        inner.outbox_room().await;
        let event = tokio::select! {
            () = inner.shutdown.cancelled() => break Ok(()),
            _ = save_tick.tick() => {
                save_cursor(&inner, &tracker, &mut saved)?;
                continue;
            }
            Some(ended) = tasks.join_next() => {
                break Err(task_ended(ended));
            }
            event = firehose.next() => event,
        };
        match event {
            FirehoseEvent::Message(message) => {
                bump(&inner.counters.events_in);
                let (Some(seq), Some(did)) = (message.seq(), message.did().cloned()) else {
                    if let Message::Info(info) = &message {
                        tracing::info!(name = %info.name, message = ?info.message, "firehose.info");
                    }
                    continue;
                };
                tracker.begin(seq);
                let index = (hasher.hash_one(did.as_str()) % workers as u64) as usize;
                let Some(sender) = senders.get(index) else {
                    continue;
                };
                if sender.send((seq, message)).await.is_err() {
                    break Err(SyncError::Task {
                        task: "firehose worker",
                        reason: "stopped taking events".to_owned(),
                    });
                }
            }
            FirehoseEvent::Invalid { error, len } => {
                bump(&inner.counters.frames_invalid);
                tracing::warn!(%error, len, "firehose.invalid_frame");
            }
            FirehoseEvent::Connected { cursor } => {
                tracing::info!(relay = %relay, ?cursor, "firehose.connected");
            }
            FirehoseEvent::Disconnected { reason, retry_in } => {
                tracing::warn!(relay = %relay, reason = %reason, retry_in_ms = retry_in.as_millis() as u64, "firehose.disconnected");
            }
            FirehoseEvent::OutdatedCursor { message } => {
                tracing::warn!(relay = %relay, message = ?message, "firehose.outdated_cursor");
                catch_up(&inner, "catch-up", "the relay says the cursor is outdated")?;
            }
            FirehoseEvent::FutureCursor { message } => {
                tracing::warn!(relay = %relay, message = ?message, "firehose.future_cursor: reconnecting live");
            }
            FirehoseEvent::ErrorFrame { error, message } => {
                tracing::warn!(relay = %relay, error = %error, message = ?message, "firehose.error_frame");
            }
        }
    };
    // Let the workers finish what they hold, then save where that leaves the cursor.
    drop(senders);
    while let Some(ended) = tasks.join_next().await {
        if let Ok(Err(err)) = ended {
            tracing::error!(%err, "firehose worker failed");
        }
    }
    save_cursor(&inner, &tracker, &mut saved)?;
    result
}

fn task_ended(ended: Result<Result<(), SyncError>, tokio::task::JoinError>) -> SyncError {
    match ended {
        Ok(Err(err)) => err,
        Ok(Ok(())) => SyncError::Task {
            task: "firehose worker",
            reason: "ended early".to_owned(),
        },
        Err(err) => SyncError::Task {
            task: "firehose worker",
            reason: err.to_string(),
        },
    }
}

fn save_cursor(
    inner: &Inner,
    tracker: &Tracker,
    saved: &mut Option<u64>,
) -> Result<(), StoreError> {
    let low_water = tracker.low_water();
    inner
        .counters
        .firehose_cursor
        .store(low_water, std::sync::atomic::Ordering::Relaxed);
    if *saved == Some(low_water) || low_water == 0 {
        return Ok(());
    }
    let relay = &inner.config.relay_url;
    let mut batch = inner.store.batch();
    batch.set_cursor(&cursor_name(relay), &low_water.to_string());
    batch.set_cursor(&cursor_time_name(relay), &now_us().to_string());
    batch.commit()?;
    *saved = Some(low_water);
    Ok(())
}

async fn work(
    inner: Arc<Inner>,
    tracker: Arc<Tracker>,
    mut receiver: mpsc::Receiver<(u64, Message)>,
) -> Result<(), SyncError> {
    while let Some((seq, message)) = receiver.recv().await {
        process(&inner, message).await?;
        tracker.finish(seq);
    }
    Ok(())
}

/// Applies one event. Per-repo problems are recorded on the repo; only store failures return.
pub(crate) async fn process(inner: &Inner, message: Message) -> Result<(), StoreError> {
    match message {
        Message::Commit(event) => process_commit(inner, event).await,
        Message::Sync(event) => process_sync(inner, event).await,
        Message::Identity(event) => process_identity(inner, event).await,
        Message::Account(event) => process_account(inner, event).await,
        Message::Info(_) | Message::Unknown { .. } => Ok(()),
    }
}

fn collection_of(path: &str) -> &str {
    path.split_once('/')
        .map_or(path, |(collection, _)| collection)
}

/// Starts tracking an untracked repo the mode says to track.
fn track(inner: &Inner, did: &Did) -> Result<(), StoreError> {
    let mut batch = inner.store.batch();
    batch.put_repo(&RepoEntry::new(did.clone(), now_us()));
    batch.commit()?;
    inner.work.notify_one();
    tracing::debug!(%did, "repo.tracked");
    Ok(())
}

async fn process_commit(inner: &Inner, event: CommitEvent) -> Result<(), StoreError> {
    let did = event.repo.clone();
    let _guard = inner.locks.lock(&did).await;
    let Some(mut entry) = inner.store.repo(&did)? else {
        if inner
            .scope()
            .mode
            .tracks_commit(event.ops.iter().map(|op| collection_of(&op.path)))
        {
            track(inner, &did)?;
        }
        return Ok(());
    };
    if !entry.status.is_active() {
        return Ok(());
    }
    match entry.state {
        RepoState::Synced => {}
        RepoState::Syncing => {
            // Held until the snapshot is stored; replayed then if it chains onto it.
            let mut batch = inner.store.batch();
            batch.buffer_push(&did, encode_message(&Message::Commit(event)));
            batch.commit_async().await?;
            return Ok(());
        }
        // The snapshot fetched after the claim covers it.
        RepoState::Pending | RepoState::Desynchronized | RepoState::Error => return Ok(()),
    }
    let Some(head) = Head::stored(&entry) else {
        return desynchronize(inner, entry, "the stored head is unreadable".to_owned());
    };
    if event.rev <= head.rev {
        bump(&inner.counters.commits_stale);
        return Ok(());
    }
    // A newer commit that cannot be used still says the repo moved on: waiting for the next
    // commit to notice the gap could wait forever, so the repo is resynced from its PDS (whose
    // snapshot is checked on its own) now.
    let proof = match CommitProof::check(&event) {
        Ok(proof) => proof,
        Err(err) => {
            bump(&inner.counters.commits_invalid);
            tracing::warn!(%did, rev = %event.rev, %err, "firehose.invalid");
            return desynchronize(inner, entry, format!("invalid commit {}: {err}", event.rev));
        }
    };
    let Some(verified) = verify_with_identity(inner, &did, proof).await else {
        return desynchronize(
            inner,
            entry,
            format!("commit {} could not be verified", event.rev),
        );
    };
    match verified.chain(head.as_ref(), now_us()) {
        Chain::Next => {
            let mut batch = inner.store.batch();
            if let Err(err) = apply_commit(
                &mut batch,
                &mut entry,
                &verified,
                &inner.scope().filters,
                now_us(),
            ) {
                bump(&inner.counters.commits_invalid);
                tracing::warn!(%did, rev = %event.rev, %err, "firehose.invalid");
                return desynchronize(inner, entry, format!("invalid commit {}: {err}", event.rev));
            }
            batch.put_repo(&entry);
            batch.commit_async().await?;
            bump(&inner.counters.commits_applied);
            if !verified.is_proven() {
                bump(&inner.counters.commits_unproven);
            }
            Ok(())
        }
        Chain::Stale => {
            bump(&inner.counters.commits_stale);
            Ok(())
        }
        Chain::Future => {
            bump(&inner.counters.commits_invalid);
            tracing::warn!(%did, rev = %event.rev, "firehose.invalid: rev in the future");
            Ok(())
        }
        Chain::Broken(reason) => desynchronize(inner, entry, reason),
    }
}

/// Checks the signature with the cached key; on failure re-resolves (the key may have
/// rotated) and tries once more. `None` means the commit is dropped (and counted).
pub(crate) async fn verify_with_identity(
    inner: &Inner,
    did: &Did,
    proof: CommitProof,
) -> Option<VerifiedCommit> {
    let first = match inner.identity.resolve(did).await {
        Ok(identity) => identity,
        Err(err) => {
            identity_failed(inner, did, &err);
            return None;
        }
    };
    let (proof, _) = match proof.try_verify(&first.key) {
        Ok(verified) => return Some(verified),
        Err(failed) => failed,
    };
    let fresh = match inner.identity.refresh(did).await {
        Ok(identity) => identity,
        Err(err) => {
            identity_failed(inner, did, &err);
            return None;
        }
    };
    match proof.try_verify(&fresh.key) {
        Ok(verified) => Some(verified),
        Err((_, err)) => {
            bump(&inner.counters.commits_invalid);
            tracing::warn!(%did, %err, "firehose.invalid: signature");
            None
        }
    }
}

fn identity_failed(inner: &Inner, did: &Did, err: &IdentityError) {
    bump(&inner.counters.commits_invalid);
    tracing::warn!(%did, %err, "identity.failed");
}

/// Applies a verified commit's ops that pass the filters to `batch` (records and their
/// `live` events) and moves `entry` to the commit's rev and root. Filtered-out ops still move
/// the head: the chain is about the repo, not about what is kept.
///
/// # Errors
///
/// A created or updated record whose path is not a valid collection and record key.
pub(crate) fn apply_commit(
    batch: &mut Batch,
    entry: &mut RepoEntry,
    verified: &VerifiedCommit,
    filters: &Filters,
    time_us: u64,
) -> Result<usize, RepoError> {
    let proof = verified.proof();
    let commit = proof.commit();
    let rev = commit.rev.to_string();
    let records: Vec<Record> = proof.records()?;
    let mut records = records.into_iter().peekable();
    // A proven commit's ops were inverted onto the stored root, so they say exactly what is
    // stored (creates are new, updates and deletes exist): the store need not look.
    let proven = verified.is_proven();
    let mut changes = 0;
    for op in proof.ops() {
        let (collection, rkey) = op.path.split_once('/').unwrap_or((op.path.as_str(), ""));
        // records() yields the created and updated records in op (path) order.
        let record = if op.cid.is_some() {
            records.next_if(|record| record.path() == op.path)
        } else {
            None
        };
        if !filters.matches(collection) {
            continue;
        }
        let action = match op.action {
            OpAction::Create => Action::Create,
            OpAction::Update => Action::Update,
            OpAction::Delete => Action::Delete,
        };
        let (cid, bytes) = match (&action, record) {
            (Action::Delete, _) => {
                if proven {
                    batch.delete_record_known(&entry.did, collection, rkey);
                } else {
                    batch.delete_record(&entry.did, collection, rkey);
                }
                (None, None)
            }
            (_, Some(record)) => {
                if proven {
                    batch.put_record_known(&record, action == Action::Update);
                } else {
                    batch.put_record(&record);
                }
                (Some(record.cid()), Some(record.into_bytes()))
            }
            (_, None) => continue,
        };
        batch.push(Event::Record(RecordEvent {
            live: true,
            did: entry.did.clone(),
            rev: rev.clone(),
            collection: collection.to_owned(),
            rkey: rkey.to_owned(),
            action,
            cid,
            record: bytes,
            time_us,
        }));
        changes += 1;
    }
    entry.rev = Some(rev);
    entry.data = Some(commit.data);
    Ok(changes)
}

/// Marks a repo desynchronized (a broken chain or a `#sync` to another tree) with the
/// reason and its event; a resync worker picks it up.
fn desynchronize(inner: &Inner, entry: RepoEntry, reason: String) -> Result<(), StoreError> {
    bump(&inner.counters.desyncs);
    tracing::warn!(did = %entry.did, reason = %reason, "repo.desynchronized");
    let did = entry.did.clone();
    let mut entry = entry;
    entry.retry_after_us = 0;
    inner.set_state(entry, RepoState::Desynchronized, Some(reason))?;
    let mut batch = inner.store.batch();
    batch.buffer_clear(&did);
    batch.commit()?;
    inner.work.notify_one();
    Ok(())
}

async fn process_sync(inner: &Inner, event: SyncEvent) -> Result<(), StoreError> {
    let did = event.did.clone();
    let _guard = inner.locks.lock(&did).await;
    let Some(mut entry) = inner.store.repo(&did)? else {
        if inner.scope().mode.tracks_any_event() {
            track(inner, &did)?;
        }
        return Ok(());
    };
    if !entry.status.is_active() || entry.state != RepoState::Synced {
        return Ok(());
    }
    let Some(head) = Head::stored(&entry) else {
        return desynchronize(inner, entry, "the stored head is unreadable".to_owned());
    };
    let identity = match inner.identity.resolve(&did).await {
        Ok(identity) => identity,
        Err(err) => {
            identity_failed(inner, &did, &err);
            return Ok(());
        }
    };
    let commit = match verify_sync(&event, &identity.key) {
        Ok(commit) => commit,
        Err(RepoError::BadSignature { .. }) => match inner.identity.refresh(&did).await {
            Ok(fresh) => match verify_sync(&event, &fresh.key) {
                Ok(commit) => commit,
                Err(err) => {
                    bump(&inner.counters.commits_invalid);
                    tracing::warn!(%did, %err, "firehose.invalid: #sync");
                    return Ok(());
                }
            },
            Err(err) => {
                identity_failed(inner, &did, &err);
                return Ok(());
            }
        },
        Err(err) => {
            bump(&inner.counters.commits_invalid);
            tracing::warn!(%did, %err, "firehose.invalid: #sync");
            return Ok(());
        }
    };
    match sync_action(&commit, head.as_ref(), now_us()) {
        SyncAction::Ignore => {
            bump(&inner.counters.commits_stale);
            Ok(())
        }
        SyncAction::AdvanceRev => {
            entry.rev = Some(commit.rev.to_string());
            let mut batch = inner.store.batch();
            batch.put_repo(&entry);
            batch.commit()?;
            Ok(())
        }
        SyncAction::Resync => desynchronize(
            inner,
            entry,
            format!("#sync at rev {} names another tree", commit.rev),
        ),
        SyncAction::Future => {
            bump(&inner.counters.commits_invalid);
            Ok(())
        }
    }
}

async fn process_identity(inner: &Inner, event: WireIdentity) -> Result<(), StoreError> {
    let did = event.did.clone();
    // Resolve before taking the lock: a slow directory must not hold up the DID's stripe.
    let tracked = inner.store.repo(&did)?.is_some();
    if !tracked {
        if inner.scope().mode.tracks_any_event() {
            let _guard = inner.locks.lock(&did).await;
            if inner.store.repo(&did)?.is_none() {
                track(inner, &did)?;
            }
        }
        return Ok(());
    }
    let identity = match inner.identity.refresh(&did).await {
        Ok(identity) => identity,
        Err(err) => {
            tracing::warn!(%did, %err, "identity.failed: keeping the stored identity");
            return Ok(());
        }
    };
    let handle = verified_handle(inner, &identity).await;
    let _guard = inner.locks.lock(&did).await;
    let Some(mut entry) = inner.store.repo(&did)? else {
        return Ok(());
    };
    let handle_changed = entry.handle.as_deref() != Some(handle.as_str());
    let pds_changed = entry.pds.as_deref() != Some(identity.pds.as_str());
    if !handle_changed && !pds_changed {
        return Ok(());
    }
    entry.handle = Some(handle);
    entry.pds = Some(identity.pds.clone());
    let mut batch = inner.store.batch();
    if handle_changed {
        batch.push(identity_event(&entry));
    }
    batch.put_repo(&entry);
    batch.commit()?;
    tracing::info!(%did, handle = ?entry.handle, pds = %identity.pds, "identity.changed");
    Ok(())
}

async fn process_account(inner: &Inner, event: AccountEvent) -> Result<(), StoreError> {
    let did = event.did.clone();
    let _guard = inner.locks.lock(&did).await;
    let Some(mut entry) = inner.store.repo(&did)? else {
        if event.active && inner.scope().mode.tracks_any_event() {
            track(inner, &did)?;
        }
        return Ok(());
    };
    let status = if event.active {
        AccountStatus::Active
    } else {
        match event.status.as_deref() {
            Some("deactivated") => AccountStatus::Deactivated,
            Some("takendown") => AccountStatus::Takendown,
            Some("suspended") => AccountStatus::Suspended,
            Some("deleted") => AccountStatus::Deleted,
            // `throttled`, `desynchronized` and later values say nothing about the data.
            _ => return Ok(()),
        }
    };
    if status == entry.status {
        return Ok(());
    }
    let was_active = entry.status.is_active();
    entry.status = status.clone();
    let mut batch = inner.store.batch();
    if status == AccountStatus::Deleted {
        // Consumers treat status "deleted" as "drop everything", as Tap's do.
        batch.delete_records_of(&did);
        batch.buffer_clear(&did);
        entry.rev = None;
        entry.data = None;
    }
    if status == AccountStatus::Active && !was_active {
        // Commits were ignored while inactive: take a fresh snapshot.
        entry.state = RepoState::Desynchronized;
        entry.retry_after_us = 0;
    }
    batch.push(identity_event(&entry));
    batch.put_repo(&entry);
    batch.commit()?;
    inner.work.notify_one();
    tracing::info!(%did, status = entry.status.as_str(), "account.status");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_water_never_passes_an_unfinished_seq() {
        let tracker = Tracker::with_start(10);
        assert_eq!(tracker.low_water(), 10);
        for seq in 11..=15 {
            tracker.begin(seq);
        }
        tracker.finish(12);
        tracker.finish(13);
        assert_eq!(tracker.low_water(), 10, "11 is still in flight");
        tracker.finish(11);
        assert_eq!(tracker.low_water(), 13, "14 is in flight");
        tracker.finish(15);
        tracker.finish(14);
        assert_eq!(tracker.low_water(), 15);
    }
}
