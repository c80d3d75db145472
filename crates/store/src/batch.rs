//! Batches: every state change, with the events it produces, as one atomic fjall write.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, TryLockError};
use std::time::{Duration, Instant};

use atpdb_repo::Record;
use atpdb_repo::syntax::Did;
use atpdb_repo::verify::RecordRef;
use fjall::{PersistMode, Slice};

use crate::codec::{self, MAX_KEY_LEN};
use crate::error::{Result, StoreError};
use crate::event::{Event, RecordEventRef};
use crate::store::{Counters, Inner};
use crate::types::{BackfillRun, RepoEntry, RepoState};

/// The ids a commit assigned, each list in the order of the calls that asked for them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitIds {
    /// Ids of the events [`Batch::push`]ed.
    pub events: Vec<u64>,
    /// Ids of the runs [`Batch::put_run`] with id 0 (runs with an id keep it).
    pub runs: Vec<u64>,
    /// Keys of the frames [`Batch::buffer_push`]ed.
    pub buffered: Vec<u64>,
}

/// Writes collected for one atomic commit.
///
/// Nothing is visible to readers, and no id is assigned, until [`Batch::commit`]. Calls are
/// applied in order, so a later call on the same key wins: `put_record` then
/// `delete_record` of one key leaves it deleted, and counts follow the final state.
/// Values are encoded when the call is made, outside the commit lock.
#[must_use = "a batch does nothing until it is committed"]
pub struct Batch {
    inner: Arc<Inner>,
    ops: Vec<Op>,
    /// Where keys and values are assembled before they become fjall slices: one buffer per
    /// batch instead of a vector per value (a backfill writes three values per record).
    scratch: Vec<u8>,
}

/// One collected call, its key and value already encoded.
enum Op {
    PutRepo {
        did: Did,
        state: RepoState,
        value: Vec<u8>,
    },
    DeleteRepo(Did),
    PutRecord {
        key: Slice,
        value: Slice,
        existed: Option<bool>,
    },
    DeleteRecord {
        key: Slice,
        existed: Option<bool>,
    },
    DeleteRecordsOf(Did),
    Push(Slice),
    SetCursor {
        name: String,
        value: Vec<u8>,
    },
    SetConfig {
        key: String,
        value: Vec<u8>,
    },
    BufferPush {
        did: Did,
        value: Vec<u8>,
    },
    BufferRemove {
        did: Did,
        seq: u64,
    },
    BufferClear(Did),
    PutRun(BackfillRun),
}

impl Batch {
    pub(crate) fn new(inner: Arc<Inner>) -> Batch {
        Batch {
            inner,
            ops: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Makes room for `calls` more calls, so a bulk writer that knows its batch size does
    /// not regrow the batch as it fills.
    pub fn reserve(&mut self, calls: usize) {
        self.ops.reserve(calls);
    }

    /// What `fill` writes into the batch's buffer, as a fjall slice.
    fn slice(&mut self, fill: impl FnOnce(&mut Vec<u8>)) -> Slice {
        self.scratch.clear();
        fill(&mut self.scratch);
        Slice::from(self.scratch.as_slice())
    }

    fn record_key(&mut self, did: &Did, collection: &str, rkey: &str) -> Slice {
        self.slice(|out| codec::write_record_key(out, did, collection, rkey))
    }

    /// Inserts or replaces a repo entry (and moves it in the state index).
    pub fn put_repo(&mut self, repo: &RepoEntry) {
        self.ops.push(Op::PutRepo {
            did: repo.did.clone(),
            state: repo.state,
            value: codec::repo_value(repo),
        });
    }

    /// Removes a repo entry and, at commit, every record and buffered frame of the DID.
    pub fn delete_repo(&mut self, did: &Did) {
        self.ops.push(Op::DeleteRepo(did.clone()));
    }

    /// Inserts or replaces a record.
    pub fn put_record(&mut self, record: &Record) {
        self.push_record(record, None);
    }

    /// [`Batch::put_record`] for a caller that knows whether the record is stored now (a
    /// backfill's merge-join, an op of a commit proven against the stored root): the commit
    /// then skips the point read it needs to keep the counts exact. A wrong claim miscounts.
    pub fn put_record_known(&mut self, record: &Record, existed: bool) {
        self.push_record(record, Some(existed));
    }

    fn push_record(&mut self, record: &Record, existed: Option<bool>) {
        let key = self.record_key(
            record.did(),
            record.collection().as_str(),
            record.rkey().as_str(),
        );
        let value = self.slice(|out| codec::write_record_value(out, &record.cid(), record.bytes()));
        self.ops.push(Op::PutRecord {
            key,
            value,
            existed,
        });
    }

    /// [`Batch::put_record_known`] of a record a CAR walk lent, without an owned
    /// [`Record`] first: a backfill stores every record it finds, and building one (five
    /// allocations and a copy of the bytes) cost more than storing it.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidRecordName`] when the collection is not an NSID or the record
    /// key not a record key; nothing is added then.
    pub fn put_found_record(&mut self, record: &RecordRef<'_>, existed: bool) -> Result<()> {
        record
            .check_names()
            .map_err(|source| StoreError::InvalidRecordName {
                path: format!("{}/{}", record.collection, record.rkey),
                source,
            })?;
        let key = self.record_key(record.did, record.collection, record.rkey);
        let value = self.slice(|out| codec::write_record_value(out, &record.cid, record.bytes));
        self.ops.push(Op::PutRecord {
            key,
            value,
            existed: Some(existed),
        });
        Ok(())
    }

    /// Removes a record (nothing happens if it is not stored).
    pub fn delete_record(&mut self, did: &Did, collection: &str, rkey: &str) {
        let key = self.record_key(did, collection, rkey);
        self.ops.push(Op::DeleteRecord { key, existed: None });
    }

    /// [`Batch::delete_record`] of a record the caller knows is stored (see
    /// [`Batch::put_record_known`]); the record is removed either way.
    pub fn delete_record_known(&mut self, did: &Did, collection: &str, rkey: &str) {
        let key = self.record_key(did, collection, rkey);
        self.ops.push(Op::DeleteRecord {
            key,
            existed: Some(true),
        });
    }

    /// Removes every record of `did`: those stored when the commit runs and those put
    /// earlier in this batch.
    pub fn delete_records_of(&mut self, did: &Did) {
        self.ops.push(Op::DeleteRecordsOf(did.clone()));
    }

    /// Appends an event to the outbox; its id is assigned at commit, after every id of
    /// earlier commits.
    pub fn push(&mut self, event: Event) {
        let value = self.slice(|out| event.encode_into(out));
        self.ops.push(Op::Push(value));
    }

    /// [`Batch::push`] of a record event from borrowed parts (see
    /// [`Batch::put_found_record`]).
    pub fn push_record_event(&mut self, event: &RecordEventRef<'_>) {
        let value = self.slice(|out| event.encode_into(out));
        self.ops.push(Op::Push(value));
    }

    /// Sets the cursor `name`, so it moves in the same batch as the state it stands for.
    pub fn set_cursor(&mut self, name: &str, value: &str) {
        self.ops.push(Op::SetCursor {
            name: name.to_owned(),
            value: codec::with_format(value.as_bytes()),
        });
    }

    /// Sets the configuration value `key`.
    pub fn set_config(&mut self, key: &str, value: &serde_json::Value) {
        // Serializing a `Value` to a Vec cannot fail: its map keys are strings.
        let json = serde_json::to_vec(value).unwrap_or_default();
        self.ops.push(Op::SetConfig {
            key: key.to_owned(),
            value: codec::with_format(&json),
        });
    }

    /// Buffers a frame for `did` (a live commit that arrived while the repo backfills); its
    /// key is assigned at commit and grows with every push.
    pub fn buffer_push(&mut self, did: &Did, bytes: Vec<u8>) {
        let mut value = bytes;
        value.insert(0, codec::FORMAT);
        self.ops.push(Op::BufferPush {
            did: did.clone(),
            value,
        });
    }

    /// Removes one buffered frame (after it was replayed).
    pub fn buffer_remove(&mut self, did: &Did, key: u64) {
        self.ops.push(Op::BufferRemove {
            did: did.clone(),
            seq: key,
        });
    }

    /// Removes every buffered frame of `did`.
    pub fn buffer_clear(&mut self, did: &Did) {
        self.ops.push(Op::BufferClear(did.clone()));
    }

    /// Inserts or replaces a backfill run; `run.id == 0` asks for the next run id, which
    /// [`Batch::commit_ids`] returns.
    pub fn put_run(&mut self, run: &BackfillRun) {
        self.ops.push(Op::PutRun(run.clone()));
    }

    /// Whether nothing was collected.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// How many calls were collected.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Commits everything collected as one atomic fjall batch, with the counters, the
    /// state index and the id counters it changes. Returns the ids given to pushed events,
    /// in push order.
    ///
    /// Commits are serialized by a store-wide lock, so ids follow commit order. The batch
    /// reaches the operating system before this returns: it survives the process being
    /// killed; [`Store::persist`] makes it survive power loss too. On error nothing of the
    /// batch is visible and no id was used.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidKey`] for an empty or over-long cursor or config key,
    /// [`StoreError::Corrupt`] when a value read to keep counts exact does not decode,
    /// [`StoreError::Fjall`], [`StoreError::Poisoned`].
    pub fn commit(self) -> Result<Vec<u64>> {
        Ok(self.commit_ids()?.events)
    }

    /// [`Batch::commit`] for async callers. While another commit holds the store's lock,
    /// the task yields (its runtime thread runs other tasks, such as the next commit's
    /// verification) and tries again, where [`Batch::commit`] would block the thread. With
    /// two runtime threads, one blocked committer idled half the machine whenever the lock
    /// holder was slow or preempted: a third of the firehose's time with a million repos
    /// stored. (A queue that hands the lock to the next waiter is worse: the lock then waits
    /// for that task to be scheduled.)
    ///
    /// # Errors
    ///
    /// As [`Batch::commit`].
    pub async fn commit_async(self) -> Result<Vec<u64>> {
        if self.ops.is_empty() {
            return Ok(Vec::new());
        }
        self.check_keys()?;
        let inner = self.inner.clone();
        let prepared = self.prepare()?;
        loop {
            match inner.commit.try_lock() {
                Ok(mut counters) => {
                    return Ok(prepared.commit_locked(&inner, &mut counters)?.events);
                }
                Err(TryLockError::Poisoned(_)) => return Err(StoreError::Poisoned),
                Err(TryLockError::WouldBlock) => {}
            }
            tokio::task::yield_now().await;
        }
    }

    /// [`Batch::commit`], returning every id assigned: events, runs and buffered frames.
    ///
    /// # Errors
    ///
    /// As [`Batch::commit`].
    pub fn commit_ids(self) -> Result<CommitIds> {
        self.submit()?.wait()
    }

    /// Hands the batch to the store's commit thread and returns without waiting for the
    /// commit: the caller can prepare its next batch meanwhile. Batches submitted are
    /// committed in the order they were submitted, one at a time, each atomically as by
    /// [`Batch::commit`], whether or not anyone waits for them; [`PendingCommit::wait`]
    /// returns the ids. A bulk writer (a backfill) waits here first while fjall's flush is
    /// behind, which bounds the memory its memtables take.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidKey`] and [`StoreError::Corrupt`] as [`Batch::commit`], found
    /// before anything is submitted; [`StoreError::Poisoned`] when the commit thread is gone.
    pub fn submit(self) -> Result<PendingCommit> {
        if self.ops.is_empty() {
            return Ok(PendingCommit(None));
        }
        self.check_keys()?;
        let inner = self.inner.clone();
        let prepared = self.prepare()?;
        // Never for long, and never holding the lock. The firehose commits through
        // `commit_async`, which does not wait: a stream should not stall behind a compaction.
        let deadline = Instant::now() + FLUSH_WAIT;
        while inner.ks.flush_behind() && Instant::now() < deadline {
            std::thread::sleep(FLUSH_POLL);
        }
        let (reply, result) = sync_channel(1);
        inner
            .committer
            .send(CommitJob {
                inner: inner.clone(),
                prepared,
                reply,
            })
            .map_err(|_| StoreError::Poisoned)?;
        Ok(PendingCommit(Some(result)))
    }

    /// Refuses cursor and config keys fjall cannot hold, before anything is written.
    fn check_keys(&self) -> Result<()> {
        for op in &self.ops {
            let (what, len) = match op {
                Op::SetCursor { name, .. } => ("cursor", name.len()),
                Op::SetConfig { key, .. } => ("config", key.len()),
                _ => continue,
            };
            if len > MAX_KEY_LEN || len == 0 {
                return Err(StoreError::InvalidKey {
                    what,
                    len,
                    limit: MAX_KEY_LEN,
                });
            }
        }
        Ok(())
    }

    /// Does before the store's lock what needs neither the store's current state nor its
    /// counters. Commits are serialized, so the time a commit holds the lock bounds the
    /// store's write rate: a backfill of 400 repos held it for ~85% of the wall time, 40%
    /// of that on the CPU (the rest preempted or waiting on fjall's flush), and over a
    /// third of the CPU part was this sorting and encoding; planned here, the lock's CPU
    /// time fell by a fifth, and backfill and firehose got faster in 13 of 14 alternating
    /// runs (backfill by 4% at the median, firehose by 10%). Batches that delete by prefix
    /// (the stored records must be read at commit) or take buffer or run ids are planned
    /// under the lock as before.
    fn prepare(self) -> Result<Prepared> {
        let planned_early = self.ops.iter().all(|op| {
            !matches!(
                op,
                Op::DeleteRepo(_)
                    | Op::DeleteRecordsOf(_)
                    | Op::BufferClear(_)
                    | Op::BufferPush { .. }
                    | Op::PutRun(_)
            )
        });
        let inner = self.inner;
        if !planned_early {
            return Ok(Prepared::Ops(self.ops));
        }
        // Event ids count from 1 here; `commit_locked` adds the last id committed.
        let (mut plan, ids) = Plan::of(self.ops, &inner, &mut Counters::default())?;
        let mut batch = new_write_batch(&inner);
        plan.write_records(&inner, &mut batch, Reads::Deferred)?;
        Ok(Prepared::Planned {
            plan: Box::new(plan),
            ids,
            batch,
        })
    }
}

/// A batch made ready for the lock by [`Batch::prepare`].
enum Prepared {
    /// Calls to apply under the lock.
    Ops(Vec<Op>),
    /// The plan with event ids counted from 1, and the fjall batch holding the records
    /// whose prior existence the callers knew.
    Planned {
        plan: Box<Plan>,
        ids: CommitIds,
        batch: fjall::OwnedWriteBatch,
    },
}

impl Prepared {
    /// The commit, under the store's lock (`counters` is what it guards).
    fn commit_locked(self, inner: &Arc<Inner>, counters: &mut Counters) -> Result<CommitIds> {
        let before = *counters;
        let (plan, ids, mut batch) = match self {
            Prepared::Ops(ops) => match Plan::of(ops, inner, counters) {
                Ok((plan, ids)) => (Box::new(plan), ids, new_write_batch(inner)),
                Err(error) => {
                    *counters = before;
                    return Err(error);
                }
            },
            Prepared::Planned {
                mut plan,
                mut ids,
                batch,
            } => {
                let base = counters.last_event_id;
                for (id, _) in &mut plan.events {
                    *id += base;
                }
                for id in &mut ids.events {
                    *id += base;
                }
                counters.last_event_id += plan.events.len() as u64;
                (plan, ids, batch)
            }
        };
        if let Err(error) = plan.write(inner, counters, &mut batch) {
            *counters = before;
            return Err(error);
        }
        inner.finish_commit(batch, counters, before)?;
        Ok(ids)
    }
}

/// A batch [`Batch::submit`]ted to the store's commit thread.
#[must_use = "the commit happens anyway; `wait` says whether it succeeded"]
pub struct PendingCommit(Option<Receiver<Result<CommitIds>>>);

impl PendingCommit {
    /// Waits for the commit and returns the ids it assigned.
    ///
    /// # Errors
    ///
    /// As [`Batch::commit`].
    pub fn wait(self) -> Result<CommitIds> {
        match self.0 {
            None => Ok(CommitIds::default()),
            Some(result) => result.recv().map_err(|_| StoreError::Poisoned)?,
        }
    }
}

/// A batch sent to the store's commit thread, and where its outcome goes.
pub(crate) struct CommitJob {
    /// The store's state, carried by the job so the thread holds none between jobs: it
    /// must never be the last holder, or the store would close on the commit thread.
    inner: Arc<Inner>,
    prepared: Prepared,
    reply: SyncSender<Result<CommitIds>>,
}

/// Jobs the commit thread takes under one acquisition of the lock.
const MAX_GROUP: usize = 16;

/// The store's commit thread: commits the jobs [`Batch::submit`] sends, in the order they
/// arrive, those waiting together under one acquisition of the lock.
///
/// Commits are serialized, so the time one holds the lock bounds the store's write rate.
/// When a backfill's workers committed on their own threads, the holder was a thread that
/// had just spent its time slice verifying, and on a saturated machine the scheduler took
/// the CPU from it mid-commit again and again: the lock was held for about three times its
/// CPU time while the other workers queued behind it and cores sat idle. A thread that only
/// commits sleeps between jobs, so it wakes with the scheduler's credit and is preempted
/// less while it holds the lock; and a worker that submits its chunk can verify the next
/// one meanwhile. Together: backfill faster in 5 of 5 alternating runs, by 12% at the
/// median, and 17% more records per CPU-second.
pub(crate) fn run_committer(jobs: Receiver<CommitJob>) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP
            && let Ok(job) = jobs.try_recv()
        {
            group.push(job);
        }
        let inner = group[0].inner.clone();
        let mut replies = Vec::with_capacity(group.len());
        match inner.commit.lock() {
            Ok(mut counters) => {
                for CommitJob {
                    prepared, reply, ..
                } in group
                {
                    replies.push((reply, prepared.commit_locked(&inner, &mut counters)));
                }
            }
            Err(_) => {
                for job in group {
                    replies.push((job.reply, Err(StoreError::Poisoned)));
                }
            }
        }
        // Every handle the thread held goes before the callers hear back (see `CommitJob`).
        drop(inner);
        for (reply, result) in replies {
            // A caller that stopped waiting only misses its ids; the commit stands.
            let _ = reply.send(result);
        }
    }
}

/// A fjall batch that reaches the operating system when committed (see [`Batch::commit`]).
fn new_write_batch(inner: &Inner) -> fjall::OwnedWriteBatch {
    inner.db.batch().durability(Some(PersistMode::Buffer))
}

/// Whether [`Plan::write_records`] may read the store to learn if a record exists.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// Under the lock: read what the callers did not say.
    Now,
    /// Before it: leave those records for later.
    Deferred,
}

/// Longest a synchronous commit waits for a flush that is behind.
const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// How often it looks again.
const FLUSH_POLL: Duration = Duration::from_millis(2);

/// A key's final write in this batch, and whether it exists in the store now (`None`:
/// not known yet, read at the end).
struct Slot {
    value: Option<Slice>,
    existed: Option<bool>,
}

/// The batch reduced to one final write per key.
#[derive(Default)]
struct Plan {
    records: BTreeMap<Slice, Slot>,
    /// Record writes whose keys have only grown, gathered while `records` is empty: a
    /// backfill's chunk comes in key order, and inserting key by key into the map cost
    /// more than the rest of planning it. At most one of the two holds writes: the run
    /// moves into `records` ([`Plan::settle_records`]) before a key out of order or a
    /// prefix delete, and [`Plan::write_records`] takes whichever it finds.
    ascending: Vec<(Slice, Slot)>,
    buffer: BTreeMap<Slice, Slot>,
    repos: BTreeMap<Did, Option<(RepoState, Vec<u8>)>>,
    cursors: BTreeMap<String, Vec<u8>>,
    config: BTreeMap<String, Vec<u8>>,
    events: Vec<(u64, fjall::Slice)>,
    runs: BTreeMap<u64, Vec<u8>>,
    /// Record count changes per DID of the records already in the fjall batch.
    deltas: HashMap<Vec<u8>, i64>,
}

impl Plan {
    /// The plan of `ops` applied in order, ids taken from `counters`.
    fn of(ops: Vec<Op>, inner: &Inner, counters: &mut Counters) -> Result<(Plan, CommitIds)> {
        let mut plan = Plan {
            ascending: Vec::with_capacity(ops.len()),
            ..Plan::default()
        };
        let mut ids = CommitIds::default();
        for op in ops {
            plan.apply(op, inner, counters, &mut ids)?;
        }
        Ok((plan, ids))
    }

    /// Records the final write of a record key, in call order (see [`set`]).
    fn set_record(&mut self, key: Slice, value: Option<Slice>, existed: Option<bool>) {
        if self.records.is_empty()
            && self
                .ascending
                .last()
                .is_none_or(|(last, _)| key.as_ref() > last.as_ref())
        {
            self.ascending.push((key, Slot { value, existed }));
            return;
        }
        self.settle_records();
        set(&mut self.records, key, value, existed);
    }

    /// Moves the ascending run into `records`: its keys are distinct and in order, so
    /// the map is built from them in one pass, and it was empty.
    fn settle_records(&mut self) {
        if !self.ascending.is_empty() {
            self.records = std::mem::take(&mut self.ascending).into_iter().collect();
        }
    }

    /// Applies one call in order. Ids are assigned here, from `counters`.
    fn apply(
        &mut self,
        op: Op,
        inner: &Inner,
        counters: &mut Counters,
        ids: &mut CommitIds,
    ) -> Result<()> {
        match op {
            Op::PutRepo { did, state, value } => {
                self.repos.insert(did, Some((state, value)));
            }
            Op::DeleteRepo(did) => {
                self.delete_prefix(Target::Records, inner, &codec::did_prefix(&did))?;
                self.delete_prefix(Target::Buffer, inner, &codec::did_prefix(&did))?;
                self.repos.insert(did, None);
            }
            Op::PutRecord {
                key,
                value,
                existed,
            } => self.set_record(key, Some(value), existed),
            Op::DeleteRecord { key, existed } => self.set_record(key, None, existed),
            Op::DeleteRecordsOf(did) => {
                self.delete_prefix(Target::Records, inner, &codec::did_prefix(&did))?;
            }
            Op::Push(value) => {
                counters.last_event_id += 1;
                ids.events.push(counters.last_event_id);
                self.events.push((counters.last_event_id, value));
            }
            Op::SetCursor { name, value } => {
                self.cursors.insert(name, value);
            }
            Op::SetConfig { key, value } => {
                self.config.insert(key, value);
            }
            Op::BufferPush { did, value } => {
                counters.buffer_seq += 1;
                ids.buffered.push(counters.buffer_seq);
                let mut key = codec::did_prefix(&did);
                key.extend_from_slice(&counters.buffer_seq.to_be_bytes());
                self.buffer.insert(
                    key.into(),
                    Slot {
                        value: Some(value.into()),
                        existed: Some(false),
                    },
                );
            }
            Op::BufferRemove { did, seq } => {
                let mut key = codec::did_prefix(&did);
                key.extend_from_slice(&seq.to_be_bytes());
                set(&mut self.buffer, key.into(), None, None);
            }
            Op::BufferClear(did) => {
                self.delete_prefix(Target::Buffer, inner, &codec::did_prefix(&did))?;
            }
            Op::PutRun(mut run) => {
                if run.id == 0 {
                    counters.last_run_id += 1;
                    run.id = counters.last_run_id;
                    ids.runs.push(run.id);
                } else {
                    counters.last_run_id = counters.last_run_id.max(run.id);
                }
                self.runs.insert(run.id, codec::run_value(&run));
            }
        }
        Ok(())
    }

    /// Deletes every key under `prefix`: those stored (which therefore exist) and those
    /// written earlier in this batch.
    fn delete_prefix(&mut self, target: Target, inner: &Inner, prefix: &[u8]) -> Result<()> {
        self.settle_records();
        let (map, keyspace) = match target {
            Target::Records => (&mut self.records, &inner.ks.records),
            Target::Buffer => (&mut self.buffer, &inner.ks.buffer),
        };
        for slot in map
            .range_mut::<[u8], _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(key, _)| key.starts_with(prefix))
        {
            slot.1.value = None;
        }
        for guard in keyspace.prefix(prefix) {
            let key = guard.key()?;
            map.insert(
                key,
                Slot {
                    value: None,
                    existed: Some(true),
                },
            );
        }
        Ok(())
    }

    /// Moves the records' final writes into `batch` and counts what they change per DID.
    /// Records whose prior existence no caller claimed are read (one read per DID tells
    /// whether it has any records: a first backfill needs no point reads), or with
    /// [`Reads::Deferred`] left in the plan.
    fn write_records(
        &mut self,
        inner: &Inner,
        batch: &mut fjall::OwnedWriteBatch,
        reads: Reads,
    ) -> Result<()> {
        let ks = &inner.ks;
        let mut has_records: HashMap<Vec<u8>, bool> = HashMap::new();
        let ascending = std::mem::take(&mut self.ascending);
        for (key, slot) in ascending
            .into_iter()
            .chain(std::mem::take(&mut self.records))
        {
            let existed = match slot.existed {
                Some(existed) => existed,
                None if reads == Reads::Deferred => {
                    self.records.insert(key, slot);
                    continue;
                }
                None => {
                    let did = codec::key_did(&key);
                    let any = match has_records.get(did) {
                        Some(&any) => any,
                        None => {
                            let any = ks.counts.contains_key(did)?;
                            has_records.insert(did.to_vec(), any);
                            any
                        }
                    };
                    any && ks.records.contains_key(&key)?
                }
            };
            let delta = i64::from(slot.value.is_some()) - i64::from(existed);
            if delta != 0 {
                *self
                    .deltas
                    .entry(codec::key_did(&key).to_vec())
                    .or_default() += delta;
            }
            match slot.value {
                Some(value) => batch.insert(&ks.records, key, value),
                None if existed => batch.remove(&ks.records, key),
                None => {}
            }
        }
        Ok(())
    }

    /// Resolves what the store held before, updates counters and fills `batch`.
    fn write(
        mut self,
        inner: &Inner,
        counters: &mut Counters,
        batch: &mut fjall::OwnedWriteBatch,
    ) -> Result<()> {
        let ks = &inner.ks;
        self.write_records(inner, batch, Reads::Now)?;
        let total = self.deltas.values().sum();
        for (did, delta) in std::mem::take(&mut self.deltas) {
            if delta == 0 {
                continue;
            }
            let old = match ks.counts.get(&did)? {
                Some(value) => codec::decode_u64("record count", &did, &value)?,
                None => 0,
            };
            let new = apply_delta(old, delta, "record count", &did);
            if new == 0 {
                batch.remove(&ks.counts, did);
            } else {
                batch.insert(&ks.counts, did, new.to_be_bytes());
            }
        }
        counters.records = apply_delta(counters.records, total, "record count", b"total");

        // Buffer.
        let mut buffered: i64 = 0;
        for (key, slot) in self.buffer {
            let existed = match slot.existed {
                Some(existed) => existed,
                None => ks.buffer.contains_key(&key)?,
            };
            buffered += i64::from(slot.value.is_some()) - i64::from(existed);
            match slot.value {
                Some(value) => batch.insert(&ks.buffer, key, value),
                None if existed => batch.remove(&ks.buffer, key),
                None => {}
            }
        }
        counters.buffer_len = apply_delta(counters.buffer_len, buffered, "buffer length", b"");

        // Repos and the state index.
        for (did, new) in self.repos {
            let key = did.as_str().as_bytes();
            let old = match ks.repos.get(key)? {
                Some(value) => Some(codec::repo_state(key, &value)?),
                None => None,
            };
            let new_state = new.as_ref().map(|(state, _)| *state);
            if old != new_state {
                if let Some(old) = old {
                    batch.remove(&ks.states, codec::state_key(old, key));
                    let count = &mut counters.by_state[usize::from(old.code())];
                    *count = count.saturating_sub(1);
                }
                if let Some(new) = new_state {
                    batch.insert(&ks.states, codec::state_key(new, key), []);
                    counters.by_state[usize::from(new.code())] += 1;
                }
            }
            match (old.is_some(), new) {
                (_, Some((_, value))) => {
                    if old.is_none() {
                        counters.repos += 1;
                    }
                    batch.insert(&ks.repos, key, value);
                }
                (true, None) => {
                    counters.repos = counters.repos.saturating_sub(1);
                    batch.remove(&ks.repos, key);
                }
                (false, None) => {}
            }
        }

        // Outbox, cursors, config, runs.
        counters.outbox_len += self.events.len() as u64;
        // Written once: with retention on, an event moves to the log when it leaves the
        // outbox (`Store::delete_events`), so a backfill nobody consumes yet writes each
        // event once, not twice.
        for (id, value) in self.events {
            batch.insert(&ks.outbox, id.to_be_bytes(), value);
        }
        for (name, value) in self.cursors {
            batch.insert(&ks.cursors, name.into_bytes(), value);
        }
        for (key, value) in self.config {
            batch.insert(&ks.config, key.into_bytes(), value);
        }
        for (id, value) in self.runs {
            batch.insert(&ks.runs, id.to_be_bytes(), value);
        }
        Ok(())
    }
}

/// Which keyspace [`Plan::delete_prefix`] works on.
#[derive(Clone, Copy)]
enum Target {
    Records,
    Buffer,
}

/// Records the final write of `key`, keeping what is known about its prior existence (an
/// earlier write in the batch knows better than a caller's claim about this one).
fn set(map: &mut BTreeMap<Slice, Slot>, key: Slice, value: Option<Slice>, existed: Option<bool>) {
    match map.get_mut(&key) {
        Some(slot) => slot.value = value,
        None => {
            map.insert(key, Slot { value, existed });
        }
    }
}

/// `old + delta`, clamped at 0: a count below zero means the stored counter was already
/// wrong, which is logged rather than failing every later commit of the DID.
fn apply_delta(old: u64, delta: i64, what: &str, key: &[u8]) -> u64 {
    let new = i128::from(old) + i128::from(delta);
    if new < 0 {
        tracing::warn!(
            what,
            key = %crate::error::printable(key),
            old,
            delta,
            "counter would go below zero; clamped to 0"
        );
    }
    u64::try_from(new.max(0)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::Store;

    /// The commit thread holds nothing of the store once a caller has heard back: were it
    /// the last holder, the store would close on that thread, after the caller had dropped
    /// its handle and perhaps tried to open the directory again. (Counted here rather than
    /// by reopening: a test elsewhere in the process that forks a child shares the lock
    /// file's descriptor with it for a moment, which makes a reopen fail on its own.)
    #[test]
    fn the_commit_thread_holds_no_handle_once_a_caller_heard_back()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        // A holder that lingers is caught by a race: many rounds make it near certain.
        for round in 0..1000u64 {
            let mut pending = Vec::new();
            for _ in 0..3 {
                let mut batch = store.batch();
                batch.set_cursor("c", &round.to_string());
                pending.push(batch.submit()?);
            }
            // The last: jobs still queued behind an earlier one each carry a handle.
            for commit in pending {
                commit.wait()?;
            }
            assert_eq!(Arc::strong_count(&store.inner), 1, "round {round}");
            let mut batch = store.batch();
            batch.set_cursor("d", &round.to_string());
            batch.commit()?;
            assert_eq!(Arc::strong_count(&store.inner), 1, "round {round}");
        }
        Ok(())
    }

    /// While another thread holds the commit lock, an async commit must leave its runtime
    /// thread to other tasks: here the only other task is the one that lets the holder go,
    /// so a commit that blocked the thread would wait out the holder's timeout.
    #[tokio::test(flavor = "current_thread")]
    async fn an_async_commit_waits_for_the_lock_without_blocking_its_thread()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let (held_tx, held_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let holder = {
            let store = store.clone();
            std::thread::spawn(move || -> bool {
                let Ok(_counters) = store.inner.commit.lock() else {
                    return false;
                };
                let _ = held_tx.send(());
                release_rx.recv_timeout(Duration::from_secs(10)).is_ok()
            })
        };
        held_rx.recv_timeout(Duration::from_secs(10))?;
        let mut batch = store.batch();
        batch.set_cursor("firehose", "42");
        let commit = tokio::spawn(batch.commit_async());
        // Let the commit find the lock taken, then release it from another task of this thread.
        tokio::task::yield_now().await;
        let release = tokio::spawn(async move { release_tx.send(()).is_ok() });
        assert!(release.await?, "the holder is waiting for the release");
        commit.await??;
        assert!(
            holder.join().map_err(|_| "the holder panicked")?,
            "the release reached the holder while the async commit waited"
        );
        assert_eq!(store.cursor("firehose")?.as_deref(), Some("42"));
        Ok(())
    }
}
