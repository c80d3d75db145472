//! `atpdb fleet ingest` (rsky's FirehoseIngester): a relay's verified firehose →
//! `firehose_live`.
//!
//! Each `#commit` goes through the same checks as on one node (Sync 1.1: blocks hashed, the
//! MST's shape, the ops inverted onto `prevData`, the signature against the resolved key,
//! re-resolved once when it fails), on a pool of tasks so that verification uses every core,
//! while the results are written in firehose order. The chain is checked against each repo's
//! head (rev and MST root), kept in a Redis hash: a commit that does not follow it is still
//! written (its ops are proven) and the repo is queued on `repo_backfill` for a fresh
//! snapshot, which covers what was missed; a `#sync` naming another tree does the same.
//!
//! A batch's events, the heads they move and the cursor (the seq of the batch's last event)
//! are written in one MULTI, so the saved cursor is always the processed low-water mark: a
//! restart resumes after the last event written, never skipping one and repeating none.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atpdb_identity::Resolver;
use atpdb_net::{Firehose, FirehoseConfig, FirehoseEvent, Http};
use atpdb_repo::commit::Commit;
use atpdb_repo::firehose::{
    AccountEvent, Chain, CommitEvent, CommitProof, IdentityEvent, Message, RepoHead, SyncAction,
    SyncEvent, VerifiedCommit, sync_action, verify_sync,
};
use atpdb_repo::repo::Action;
use atpdb_repo::syntax::{Did, Tid};
use atpdb_repo::value::cbor_to_json;
use atpdb_repo::{Cid, Error as RepoError};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    ConnectionManager, FleetError, RecordHead, RepoJob, StreamEvent, Written, read_seq, wait_below,
};

/// What [`run`] does.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// The relay's base URL.
    pub relay: String,
    /// The stream written (`firehose_live`).
    pub stream: String,
    /// Where repos that need a fresh snapshot are queued (`repo_backfill`).
    pub resync_stream: String,
    /// Wait while the stream holds this many entries.
    pub high_water: u64,
    /// Events verified at once.
    pub parallelism: usize,
    /// Most events per write.
    pub batch: usize,
    /// Stop once no event has come for this long (tests); `None`: run until shut down.
    pub exit_when_idle: Option<Duration>,
}

impl Default for IngestConfig {
    fn default() -> IngestConfig {
        IngestConfig {
            relay: "https://bsky.network".to_owned(),
            stream: "firehose_live".to_owned(),
            resync_stream: "repo_backfill".to_owned(),
            high_water: 1_000_000,
            parallelism: 64,
            batch: 500,
            exit_when_idle: None,
        }
    }
}

impl IngestConfig {
    /// The key holding the cursor for this relay.
    pub fn cursor_key(&self) -> String {
        crate::enumerate::cursor_key(&self.stream, &self.relay)
    }

    /// The hash of each repo's head (`rev data`).
    pub fn heads_key(&self) -> String {
        format!("{}:heads", self.stream)
    }
}

/// What an ingester did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Commits written.
    pub commits: u64,
    /// Events written (records, identities, accounts).
    pub events: u64,
    /// Commits not newer than the repo's head (replays).
    pub stale: u64,
    /// Events that failed verification (dropped).
    pub invalid: u64,
    /// Repos queued for a fresh snapshot (broken chain, `#sync` to another tree).
    pub resyncs: u64,
}

/// One firehose event after verification, waiting for its turn to be written.
enum Verified {
    Commit {
        seq: u64,
        commit: Box<VerifiedCommit>,
        events: Vec<StreamEvent>,
    },
    Sync {
        seq: u64,
        commit: Box<Commit>,
    },
    /// Identity and account events: written as they are.
    Event {
        seq: u64,
        event: StreamEvent,
    },
    /// Nothing to write (invalid, or not for us); the cursor still moves past it.
    Skip {
        seq: u64,
        invalid: bool,
    },
}

impl Verified {
    fn seq(&self) -> u64 {
        match self {
            Verified::Commit { seq, .. }
            | Verified::Sync { seq, .. }
            | Verified::Event { seq, .. }
            | Verified::Skip { seq, .. } => *seq,
        }
    }

    fn did(&self) -> Option<&Did> {
        match self {
            Verified::Commit { commit, .. } => Some(&commit.proof().commit().did),
            Verified::Sync { commit, .. } => Some(&commit.did),
            _ => None,
        }
    }
}

/// Follows the relay until `shutdown` (or, with `exit_when_idle`, a quiet spell).
///
/// # Errors
///
/// [`FleetError::Redis`] when Redis fails in a way a reconnect does not fix; what was
/// written stays written and the cursor says where to resume.
pub async fn run(
    http: &Http,
    identity: Resolver,
    mut redis: ConnectionManager,
    config: &IngestConfig,
    shutdown: &CancellationToken,
) -> Result<Ingested, FleetError> {
    let cursor = read_seq(&mut redis, &config.cursor_key()).await?;
    tracing::info!(relay = %config.relay, ?cursor, "ingest.start");
    let mut firehose = Firehose::connect(
        http,
        FirehoseConfig {
            cursor,
            ..FirehoseConfig::new(config.relay.clone())
        },
    );
    let identity = Arc::new(identity);
    let mut in_flight: FuturesOrdered<JoinHandle<Verified>> = FuturesOrdered::new();
    let mut ready: Vec<Verified> = Vec::new();
    let mut done = Ingested::default();
    let mut last_event = Instant::now();
    let parallelism = config.parallelism.max(1);
    let batch = config.batch.max(1);
    loop {
        // Write when a batch is full, or when nothing more is arriving right now.
        if ready.len() >= batch || (!ready.is_empty() && in_flight.is_empty()) {
            write(&mut redis, config, &mut ready, &mut done, shutdown).await?;
        }
        if shutdown.is_cancelled() && in_flight.is_empty() {
            break;
        }
        if let Some(idle) = config.exit_when_idle
            && in_flight.is_empty()
            && ready.is_empty()
            && last_event.elapsed() >= idle
        {
            break;
        }
        tokio::select! {
            biased;
            Some(joined) = in_flight.next() => match joined {
                Ok(verified) => ready.push(verified),
                Err(err) => {
                    return Err(FleetError::Config(format!("a verification task failed: {err}")));
                }
            },
            () = shutdown.cancelled(), if in_flight.is_empty() => {}
            event = firehose.next(), if in_flight.len() < parallelism && !shutdown.is_cancelled() => {
                last_event = Instant::now();
                match event {
                    FirehoseEvent::Message(message) => {
                        let identity = identity.clone();
                        in_flight.push_back(tokio::spawn(async move { verify(&identity, message).await }));
                    }
                    FirehoseEvent::Invalid { error, len } => {
                        done.invalid += 1;
                        tracing::warn!(%error, len, "ingest.invalid_frame");
                    }
                    FirehoseEvent::Connected { cursor } => {
                        tracing::info!(relay = %config.relay, ?cursor, "ingest.connected");
                    }
                    FirehoseEvent::Disconnected { reason, retry_in } => {
                        tracing::warn!(relay = %config.relay, %reason, retry_in_ms = retry_in.as_millis() as u64, "ingest.disconnected");
                    }
                    FirehoseEvent::OutdatedCursor { message } => {
                        // Events were missed: the repos they touched cannot be named, so the
                        // operator must re-run enumerate + backfill; say it loudly.
                        tracing::error!(relay = %config.relay, ?message, "ingest.outdated_cursor: events were missed; run `atpdb fleet enumerate` again");
                    }
                    FirehoseEvent::FutureCursor { message } => {
                        tracing::warn!(relay = %config.relay, ?message, "ingest.future_cursor: reconnecting live");
                    }
                    FirehoseEvent::ErrorFrame { error, message } => {
                        tracing::warn!(relay = %config.relay, %error, ?message, "ingest.error_frame");
                    }
                }
            }
            () = tokio::time::sleep(Duration::from_millis(100)), if config.exit_when_idle.is_some() => {}
        }
    }
    write(&mut redis, config, &mut ready, &mut done, shutdown).await?;
    Ok(done)
}

/// Checks one message as far as it can be checked without the repo's head.
async fn verify(identity: &Resolver, message: Message) -> Verified {
    match message {
        Message::Commit(event) => verify_commit(identity, event).await,
        Message::Sync(event) => verify_sync_event(identity, event).await,
        Message::Identity(event) => identity_event(identity, event).await,
        Message::Account(event) => account_event(event),
        Message::Info(info) => {
            tracing::info!(name = %info.name, message = ?info.message, "ingest.info");
            Verified::Skip {
                seq: 0,
                invalid: false,
            }
        }
        Message::Unknown { .. } => Verified::Skip {
            seq: 0,
            invalid: false,
        },
    }
}

async fn verify_commit(identity: &Resolver, event: CommitEvent) -> Verified {
    let seq = event.seq;
    let invalid = |err: &dyn std::fmt::Display| {
        tracing::warn!(did = %event.repo, rev = %event.rev, %err, "ingest.invalid commit");
        Verified::Skip { seq, invalid: true }
    };
    // The CPU-heavy part runs off the reactor.
    let checked = {
        let event = event.clone();
        tokio::task::spawn_blocking(move || CommitProof::check(&event)).await
    };
    let proof = match checked {
        Ok(Ok(proof)) => proof,
        Ok(Err(err)) => return invalid(&err),
        Err(err) => return invalid(&err),
    };
    let key = match identity.resolve(&event.repo).await {
        Ok(found) => found.key.clone(),
        Err(err) => return invalid(&err),
    };
    let verified = match proof.try_verify(&key) {
        Ok(verified) => verified,
        Err((proof, _)) => {
            // The key may have rotated since it was cached: look again, once.
            let key = match identity.refresh(&event.repo).await {
                Ok(found) => found.key.clone(),
                Err(err) => return invalid(&err),
            };
            match proof.try_verify(&key) {
                Ok(verified) => verified,
                Err((_, err)) => return invalid(&err),
            }
        }
    };
    match commit_events(&verified, &event) {
        Ok(events) => Verified::Commit {
            seq,
            commit: Box::new(verified),
            events,
        },
        Err(err) => invalid(&err),
    }
}

/// The commit's ops as stream events, in op order.
fn commit_events(
    verified: &VerifiedCommit,
    event: &CommitEvent,
) -> Result<Vec<StreamEvent>, RepoError> {
    let proof = verified.proof();
    let records = proof.records()?;
    let mut records = records.into_iter().peekable();
    let (did, rev, commit) = (
        event.repo.to_string(),
        event.rev.to_string(),
        proof.cid().to_string(),
    );
    let time = event.time.to_string();
    let seq = i64::try_from(event.seq).unwrap_or(i64::MAX);
    let mut events = Vec::with_capacity(proof.ops().len());
    for op in proof.ops() {
        let (collection, rkey) = op.path.split_once('/').unwrap_or((op.path.as_str(), ""));
        let record = if op.cid.is_some() {
            records.next_if(|record| record.path() == op.path)
        } else {
            None
        };
        let (collection, rkey) = (collection.to_owned(), rkey.to_owned());
        let head = RecordHead {
            seq,
            time: time.clone(),
            did: did.clone(),
            commit: commit.clone(),
            rev: rev.clone(),
            collection,
            rkey,
        };
        let written = match (op.action, record) {
            (Action::Delete, _) => Written::Deleted,
            (action, Some(record)) => {
                let json = cbor_to_json(record.bytes()).map_err(|err| RepoError::Operation {
                    path: op.path.clone(),
                    reason: err.to_string(),
                })?;
                let cid = record.cid().to_string();
                if action == Action::Create {
                    Written::Created { cid, record: json }
                } else {
                    Written::Updated { cid, record: json }
                }
            }
            (_, None) => {
                return Err(RepoError::Operation {
                    path: op.path.clone(),
                    reason: "the record is not in the commit's blocks".to_owned(),
                });
            }
        };
        events.push(head.event(written));
    }
    Ok(events)
}

async fn verify_sync_event(identity: &Resolver, event: SyncEvent) -> Verified {
    let seq = event.seq;
    let mut refreshed = false;
    loop {
        let found = if refreshed {
            identity.refresh(&event.did).await
        } else {
            identity.resolve(&event.did).await
        };
        let key = match found {
            Ok(found) => found.key.clone(),
            Err(err) => {
                tracing::warn!(did = %event.did, %err, "ingest.invalid #sync");
                return Verified::Skip { seq, invalid: true };
            }
        };
        match verify_sync(&event, &key) {
            Ok(commit) => {
                return Verified::Sync {
                    seq,
                    commit: Box::new(commit),
                };
            }
            Err(RepoError::BadSignature { .. }) if !refreshed => refreshed = true,
            Err(err) => {
                tracing::warn!(did = %event.did, %err, "ingest.invalid #sync");
                return Verified::Skip { seq, invalid: true };
            }
        }
    }
}

/// The handle as the DID document and the handle's own resolution both say, or
/// `handle.invalid`, as on one node.
async fn identity_event(identity: &Resolver, event: IdentityEvent) -> Verified {
    let seq = event.seq;
    let handle = match identity.refresh(&event.did).await {
        Ok(found) => identity
            .verified_handle(&found)
            .await
            .map_or_else(|| "handle.invalid".to_owned(), |handle| handle.to_string()),
        Err(err) => {
            tracing::warn!(did = %event.did, %err, "ingest.identity unresolved");
            return Verified::Skip { seq, invalid: true };
        }
    };
    Verified::Event {
        seq,
        event: StreamEvent::Identity {
            seq: i64::try_from(seq).unwrap_or(i64::MAX),
            time: event.time.to_string(),
            did: event.did.to_string(),
            handle,
        },
    }
}

fn account_event(event: AccountEvent) -> Verified {
    Verified::Event {
        seq: event.seq,
        event: StreamEvent::Account {
            seq: i64::try_from(event.seq).unwrap_or(i64::MAX),
            time: event.time.to_string(),
            did: event.did.to_string(),
            active: event.active,
            status: event.status,
        },
    }
}

/// A stored head: `rev data`.
fn parse_head(text: &str) -> Option<(Tid, Cid)> {
    let (rev, data) = text.split_once(' ')?;
    Some((rev.parse().ok()?, data.parse().ok()?))
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
        })
}

/// Writes `ready` (in firehose order) with the heads it moves and the cursor, in one MULTI.
async fn write(
    redis: &mut ConnectionManager,
    config: &IngestConfig,
    ready: &mut Vec<Verified>,
    done: &mut Ingested,
    shutdown: &CancellationToken,
) -> Result<(), FleetError> {
    if ready.is_empty() {
        return Ok(());
    }
    wait_below(redis, &config.stream, config.high_water, shutdown).await?;
    let heads_key = config.heads_key();
    let dids: Vec<String> = {
        let mut dids: Vec<String> = ready
            .iter()
            .filter_map(|verified| verified.did().map(Did::to_string))
            .collect();
        dids.sort_unstable();
        dids.dedup();
        dids
    };
    let mut heads: HashMap<String, Option<(Tid, Cid)>> = HashMap::new();
    if !dids.is_empty() {
        let stored: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&heads_key)
            .arg(&dids)
            .query_async(redis)
            .await?;
        for (did, head) in dids.into_iter().zip(stored) {
            heads.insert(did, head.as_deref().and_then(parse_head));
        }
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut moved: HashMap<String, (Tid, Cid)> = HashMap::new();
    let mut last_seq = 0;
    let now = now_us();
    let mut written = Ingested::default();
    let resync = |pipe: &mut redis::Pipeline, did: &Did, rev: &Tid, reason: &str| {
        tracing::warn!(%did, %rev, reason, "ingest.resync: queued for a fresh snapshot");
        let job = RepoJob {
            did: did.to_string(),
            host: config.relay.clone(),
            rev: rev.to_string(),
            status: None,
            active: true,
        };
        if let Ok(json) = serde_json::to_string(&job) {
            pipe.cmd("XADD")
                .arg(&config.resync_stream)
                .arg("*")
                .arg("repo")
                .arg(json)
                .ignore();
        }
    };
    for verified in ready.drain(..) {
        last_seq = last_seq.max(verified.seq());
        match verified {
            Verified::Commit { commit, events, .. } => {
                let proof = commit.proof();
                let did = proof.commit().did.clone();
                let (rev, data) = (proof.commit().rev.clone(), proof.commit().data);
                let head = moved
                    .get(did.as_str())
                    .cloned()
                    .or_else(|| heads.get(did.as_str()).cloned().flatten());
                let chain = match &head {
                    Some((head_rev, head_data)) => commit.chain(
                        RepoHead {
                            rev: head_rev,
                            data: head_data,
                        },
                        now,
                    ),
                    // The first commit seen for a repo: the backfill covers what came before.
                    None => Chain::Next,
                };
                match chain {
                    Chain::Next => {}
                    Chain::Stale => {
                        written.stale += 1;
                        continue;
                    }
                    Chain::Future => {
                        written.invalid += 1;
                        tracing::warn!(%did, %rev, "ingest.invalid: rev in the future");
                        continue;
                    }
                    Chain::Broken(reason) => {
                        // The ops are proven against the previous tree, so they are true;
                        // what came between is fetched again.
                        written.resyncs += 1;
                        resync(&mut pipe, &did, &rev, &reason);
                    }
                }
                for event in &events {
                    push_event(&mut pipe, &config.stream, event)?;
                }
                written.events += events.len() as u64;
                written.commits += 1;
                moved.insert(did.to_string(), (rev, data));
            }
            Verified::Sync { commit, .. } => {
                let (did, rev, data) = (&commit.did, commit.rev.clone(), commit.data);
                let head = moved
                    .get(did.as_str())
                    .cloned()
                    .or_else(|| heads.get(did.as_str()).cloned().flatten());
                let action = match &head {
                    Some((head_rev, head_data)) => sync_action(
                        &commit,
                        RepoHead {
                            rev: head_rev,
                            data: head_data,
                        },
                        now,
                    ),
                    None => SyncAction::Resync,
                };
                match action {
                    SyncAction::Ignore => written.stale += 1,
                    SyncAction::Future => written.invalid += 1,
                    SyncAction::AdvanceRev => {
                        moved.insert(did.to_string(), (rev, data));
                    }
                    SyncAction::Resync => {
                        written.resyncs += 1;
                        resync(&mut pipe, did, &rev, "#sync names another tree");
                        moved.insert(did.to_string(), (rev, data));
                    }
                }
            }
            Verified::Event { event, .. } => {
                push_event(&mut pipe, &config.stream, &event)?;
                written.events += 1;
            }
            Verified::Skip { invalid, .. } => {
                if invalid {
                    written.invalid += 1;
                }
            }
        }
    }
    for (did, (rev, data)) in &moved {
        pipe.cmd("HSET")
            .arg(&heads_key)
            .arg(did)
            .arg(format!("{rev} {data}"))
            .ignore();
    }
    if last_seq > 0 {
        pipe.cmd("SET")
            .arg(config.cursor_key())
            .arg(last_seq)
            .ignore();
    }
    pipe.query_async::<()>(redis).await?;
    done.commits += written.commits;
    done.events += written.events;
    done.stale += written.stale;
    done.invalid += written.invalid;
    done.resyncs += written.resyncs;
    Ok(())
}

fn push_event(
    pipe: &mut redis::Pipeline,
    stream: &str,
    event: &StreamEvent,
) -> Result<(), FleetError> {
    let json = serde_json::to_string(event)
        .map_err(|err| FleetError::Config(format!("encoding an event: {err}")))?;
    pipe.cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("event")
        .arg(json)
        .ignore();
    Ok(())
}
