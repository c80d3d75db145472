//! `atpdb fleet backfill` (rsky's RepoBackfiller): a consumer group over `repo_backfill`;
//! each repo verified and its records written to `firehose_backfill`.
//!
//! Delivery is at least once: an entry is acknowledged (XACK + XDEL, one MULTI) only after
//! every chunk of its records is in the output stream, so a worker killed mid-repo leaves the
//! entry pending and another worker takes it over (XAUTOCLAIM once it has been idle for
//! `claim_idle`) and writes the repo again; the indexer's upserts make that harmless. A
//! worker keeps its own in-flight entries fresh (XCLAIM to itself) so a long repo is never
//! taken from a live worker.
//!
//! A failure leaves the entry pending; it is retried after a backoff, and after
//! `max_attempts` it is parked in the errors stream with the reason. An entry that cannot be
//! read is parked at once. A consumer group is created at `0` (every entry), never at `$`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atpdb_identity::Resolver;
use atpdb_net::Xrpc;
use atpdb_repo::syntax::Did;
use atpdb_repo::value::cbor_to_json;
use atpdb_repo::verify::{Expected, VerifyOptions, load_car_async};
use redis::streams::{StreamId, StreamReadOptions, StreamReadReply};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    ConnectionManager, FleetError, RepoJob, SEQ_BACKFILL, StreamEvent, now_rfc3339, wait_below,
};

/// What [`run`] does.
#[derive(Debug, Clone)]
pub struct BackfillConfig {
    /// The stream read (`repo_backfill`).
    pub stream_in: String,
    /// The stream written (`firehose_backfill`).
    pub stream_out: String,
    /// Where entries that failed `max_attempts` times, or could not be read, are parked.
    pub errors_stream: String,
    /// The consumer group.
    pub group: String,
    /// This worker's name in the group: unique per worker.
    pub consumer: String,
    /// Repos backfilled at once.
    pub concurrency: usize,
    /// Wait while the output stream holds this many entries (the indexers are behind).
    pub high_water: u64,
    /// Records per chunk; each chunk is followed by a `repo` event.
    pub chunk: usize,
    /// Attempts before an entry is parked.
    pub max_attempts: u32,
    /// Entries pending this long on another consumer are taken over.
    pub claim_idle: Duration,
    /// First retry delay, doubled per attempt up to `retry_max`.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Stop once nothing has been pending or new for this long (tests, one-off runs);
    /// `None`: run until shut down.
    pub exit_when_idle: Option<Duration>,
    /// Limits of the CAR verifier (memory budget, spill file).
    pub verify: VerifyOptions,
}

impl Default for BackfillConfig {
    fn default() -> BackfillConfig {
        BackfillConfig {
            stream_in: "repo_backfill".to_owned(),
            stream_out: "firehose_backfill".to_owned(),
            errors_stream: "repo_backfill_errors".to_owned(),
            group: "repo_backfill_group".to_owned(),
            consumer: "backfiller_1".to_owned(),
            concurrency: 2,
            high_water: 100_000,
            chunk: 500,
            max_attempts: 5,
            claim_idle: Duration::from_secs(60),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            exit_when_idle: None,
            verify: VerifyOptions::default(),
        }
    }
}

/// What a worker did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backfilled {
    /// Repos written and acknowledged.
    pub repos: u64,
    /// Records written.
    pub records: u64,
    /// Attempts that failed (each retried or parked).
    pub failures: u64,
    /// Entries parked in the errors stream.
    pub parked: u64,
    /// Entries taken over from other consumers.
    pub claimed: u64,
}

/// What the worker needs, shared with its tasks.
struct Worker {
    redis: ConnectionManager,
    xrpc: Xrpc,
    identity: Resolver,
    config: BackfillConfig,
    shutdown: CancellationToken,
}

/// The outcome of one attempt at one entry.
enum Attempt {
    Done {
        records: u64,
    },
    Failed(String),
    /// The entry can never succeed (not a repo job): park it now.
    Unreadable(String),
}

/// Runs one backfill worker until `shutdown` (or, with `exit_when_idle`, until there is
/// nothing left to do).
///
/// # Errors
///
/// [`FleetError::Redis`] when Redis fails in a way a reconnect does not fix.
pub async fn run(
    xrpc: Xrpc,
    identity: Resolver,
    mut redis: ConnectionManager,
    config: BackfillConfig,
    shutdown: CancellationToken,
) -> Result<Backfilled, FleetError> {
    ensure_group(&mut redis, &config.stream_in, &config.group).await?;
    let worker = Arc::new(Worker {
        redis: redis.clone(),
        xrpc,
        identity,
        config,
        shutdown,
    });
    let config = &worker.config;
    let mut done = Backfilled::default();
    let mut tasks: JoinSet<(String, Attempt)> = JoinSet::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut retry_at: HashMap<String, Instant> = HashMap::new();
    let mut last_claim = Instant::now();
    let mut idle_since = Instant::now();
    loop {
        if worker.shutdown.is_cancelled() {
            break;
        }
        while let Some(joined) = tasks.try_join_next() {
            let (id, attempt) = joined.map_err(|err| {
                FleetError::Config(format!("a backfill task ended abnormally: {err}"))
            })?;
            in_flight.remove(&id);
            settle(&mut redis, config, &id, attempt, &mut done, &mut retry_at).await?;
            idle_since = Instant::now();
        }
        if last_claim.elapsed() >= config.claim_idle / 3 {
            last_claim = Instant::now();
            keep_fresh(&mut redis, config, &in_flight).await?;
            done.claimed += crate::claim_abandoned(
                &mut redis,
                &config.stream_in,
                &config.group,
                &config.consumer,
                config.claim_idle,
            )
            .await?;
        }
        let room = config.concurrency.max(1).saturating_sub(in_flight.len());
        let mut started = 0;
        if room > 0 {
            let now = Instant::now();
            // Our own pending entries first (retries, and entries taken over), then new ones.
            let mut entries: Vec<StreamId> = read(&mut redis, config, "0", 100)
                .await?
                .into_iter()
                .filter(|entry| {
                    !in_flight.contains(&entry.id)
                        && retry_at.get(&entry.id).is_none_or(|at| *at <= now)
                })
                .take(room)
                .collect();
            if entries.is_empty() {
                entries = read(&mut redis, config, ">", room).await?;
            }
            for entry in entries {
                let id = entry.id.clone();
                in_flight.insert(id.clone());
                retry_at.remove(&id);
                let worker = worker.clone();
                tasks.spawn(async move {
                    let attempt = worker.attempt(&entry).await;
                    (entry.id, attempt)
                });
                started += 1;
            }
        }
        if started > 0 || !tasks.is_empty() {
            idle_since = Instant::now();
        }
        if tasks.is_empty()
            && started == 0
            && retry_at.is_empty()
            && let Some(idle) = config.exit_when_idle
            && idle_since.elapsed() >= idle
        {
            break;
        }
        if started == 0 {
            // Nothing new: poll again soon (sooner while tasks may finish).
            let pause = if tasks.is_empty() { 100 } else { 20 };
            tokio::select! {
                () = worker.shutdown.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(pause)) => {}
            }
        }
    }
    // Entries still in flight stay pending: the next worker to claim them finishes them.
    tasks.abort_all();
    Ok(done)
}

/// Creates the consumer group at the stream's start, with the stream, unless it exists.
///
/// # Errors
///
/// [`FleetError::Redis`] for anything but "the group exists".
pub async fn ensure_group(
    redis: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<(), FleetError> {
    let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(redis)
        .await;
    match created {
        Err(err) if err.code() != Some("BUSYGROUP") => Err(err.into()),
        _ => Ok(()),
    }
}

async fn read(
    redis: &mut ConnectionManager,
    config: &BackfillConfig,
    from: &str,
    count: usize,
) -> Result<Vec<StreamId>, FleetError> {
    // Never BLOCK: the connection is shared with the tasks' writes.
    let options = StreamReadOptions::default()
        .group(&config.group, &config.consumer)
        .count(count.max(1));
    let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg(&options)
        .arg("STREAMS")
        .arg(&config.stream_in)
        .arg(from)
        .query_async(redis)
        .await?;
    Ok(reply
        .into_iter()
        .flat_map(|reply| reply.keys)
        .flat_map(|key| key.ids)
        .collect())
}

/// Acknowledges, schedules a retry, or parks, after an attempt.
async fn settle(
    redis: &mut ConnectionManager,
    config: &BackfillConfig,
    id: &str,
    attempt: Attempt,
    done: &mut Backfilled,
    retry_at: &mut HashMap<String, Instant>,
) -> Result<(), FleetError> {
    let attempts_key = format!("{}:attempts", config.stream_in);
    let reason = match attempt {
        Attempt::Done { records } => {
            let mut pipe = redis::pipe();
            pipe.atomic();
            finish_entry(&mut pipe, config, &attempts_key, id);
            pipe.query_async::<()>(redis).await?;
            done.repos += 1;
            done.records += records;
            return Ok(());
        }
        Attempt::Unreadable(reason) => reason,
        Attempt::Failed(reason) => {
            done.failures += 1;
            let attempts: u32 = redis::cmd("HINCRBY")
                .arg(&attempts_key)
                .arg(id)
                .arg(1)
                .query_async(redis)
                .await?;
            if attempts < config.max_attempts {
                let delay = config
                    .retry_min
                    .saturating_mul(1 << (attempts - 1).min(16))
                    .min(config.retry_max);
                tracing::warn!(id, attempts, reason = %reason, retry_in_ms = delay.as_millis() as u64, "backfill.failed");
                retry_at.insert(id.to_owned(), Instant::now() + delay);
                return Ok(());
            }
            format!("{reason} (after {attempts} attempts)")
        }
    };
    let entry: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(&config.stream_in)
        .arg(id)
        .arg(id)
        .query_async(redis)
        .await
        .unwrap_or_default();
    let original = entry
        .first()
        .and_then(|(_, fields)| fields.get("repo").cloned())
        .unwrap_or_default();
    tracing::warn!(id, reason = %reason, "backfill.parked");
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("XADD")
        .arg(&config.errors_stream)
        .arg("*")
        .arg("id")
        .arg(id)
        .arg("repo")
        .arg(original)
        .arg("reason")
        .arg(&reason)
        .ignore();
    finish_entry(&mut pipe, config, &attempts_key, id);
    pipe.query_async::<()>(redis).await?;
    retry_at.remove(id);
    done.parked += 1;
    Ok(())
}

/// Adds to `pipe` what ends an entry, done or parked: acknowledged, deleted, and its
/// attempt count dropped.
fn finish_entry(pipe: &mut redis::Pipeline, config: &BackfillConfig, attempts_key: &str, id: &str) {
    pipe.cmd("XACK")
        .arg(&config.stream_in)
        .arg(&config.group)
        .arg(id)
        .ignore()
        .cmd("XDEL")
        .arg(&config.stream_in)
        .arg(id)
        .ignore()
        .cmd("HDEL")
        .arg(attempts_key)
        .arg(id)
        .ignore();
}

/// Resets the idle time of the entries this worker is on, so nobody takes them over.
async fn keep_fresh(
    redis: &mut ConnectionManager,
    config: &BackfillConfig,
    in_flight: &HashSet<String>,
) -> Result<(), FleetError> {
    if in_flight.is_empty() {
        return Ok(());
    }
    let mut command = redis::cmd("XCLAIM");
    command
        .arg(&config.stream_in)
        .arg(&config.group)
        .arg(&config.consumer)
        .arg(0);
    for id in in_flight {
        command.arg(id);
    }
    command.arg("JUSTID");
    let _: Vec<String> = command.query_async(redis).await?;
    Ok(())
}

impl Worker {
    async fn attempt(&self, entry: &StreamId) -> Attempt {
        let Some(text) = entry.get::<String>("repo") else {
            return Attempt::Unreadable("the entry has no `repo` field".to_owned());
        };
        let job: RepoJob = match serde_json::from_str(&text) {
            Ok(job) => job,
            Err(err) => {
                return Attempt::Unreadable(format!("the `repo` field is not a job: {err}"));
            }
        };
        let did: Did = match job.did.parse() {
            Ok(did) => did,
            Err(err) => return Attempt::Unreadable(format!("{}: {err}", job.did)),
        };
        match self.backfill(&did).await {
            Ok(records) => Attempt::Done { records },
            Err(reason) => Attempt::Failed(format!("{did}: {reason}")),
        }
    }

    /// getRepo from the DID's PDS → verify → chunks of events; returns the records written.
    async fn backfill(&self, did: &Did) -> Result<u64, String> {
        let mut identity = self
            .identity
            .resolve(did)
            .await
            .map_err(|err| format!("resolving: {err}"))?;
        let mut refreshed = false;
        loop {
            let body = self
                .xrpc
                .get_repo(&identity.pds, did, None)
                .await
                .map_err(|err| format!("getRepo from {}: {err}", identity.pds))?;
            let loaded = load_car_async(body, &self.config.verify)
                .await
                .map_err(|err| format!("getRepo from {}: {err}", identity.pds))?;
            let verified = match loaded.verify(Expected {
                did: Some(did),
                key: &identity.key,
            }) {
                Ok(verified) => verified,
                Err(atpdb_repo::Error::BadSignature { .. }) if !refreshed => {
                    // The key may have rotated since it was cached: look again, once.
                    refreshed = true;
                    identity = self
                        .identity
                        .refresh(did)
                        .await
                        .map_err(|err| format!("resolving: {err}"))?;
                    continue;
                }
                Err(err) => return Err(format!("verifying: {err}")),
            };
            return self.write(did, &verified).await;
        }
    }

    async fn write(
        &self,
        did: &Did,
        verified: &atpdb_repo::verify::VerifiedRepo,
    ) -> Result<u64, String> {
        let redis_err = |err: redis::RedisError| format!("writing events: {err}");
        let mut redis = self.redis.clone();
        let commit = verified.commit_cid().to_string();
        let rev = verified.commit().rev.to_string();
        let mut records = 0;
        let mut walker = verified.records();
        loop {
            let mut events = Vec::with_capacity(self.config.chunk + 1);
            let time = now_rfc3339();
            while events.len() < self.config.chunk.max(1) {
                let next = walker
                    .next_record()
                    .map_err(|err| format!("verifying: {err}"))?;
                let Some(record) = next else { break };
                let json = cbor_to_json(record.bytes).map_err(|err| {
                    format!("record {}/{}: {err}", record.collection, record.rkey)
                })?;
                events.push(StreamEvent::Create {
                    seq: SEQ_BACKFILL,
                    time: time.clone(),
                    did: did.to_string(),
                    commit: commit.clone(),
                    rev: rev.clone(),
                    collection: record.collection.to_owned(),
                    rkey: record.rkey.to_owned(),
                    cid: record.cid.to_string(),
                    record: json,
                });
            }
            // A chunk shorter than full is the last; after a full one, the next may be empty
            // and then carries only the `complete` event.
            let last = events.len() < self.config.chunk.max(1);
            records += events.len() as u64;
            events.push(StreamEvent::Repo {
                seq: SEQ_BACKFILL,
                time,
                did: did.to_string(),
                commit: commit.clone(),
                rev: rev.clone(),
                complete: last,
            });
            wait_below(
                &mut redis,
                &self.config.stream_out,
                self.config.high_water,
                &self.shutdown,
            )
            .await
            .map_err(|err| err.to_string())?;
            if self.shutdown.is_cancelled() {
                return Err("shutting down".to_owned());
            }
            let mut pipe = redis::pipe();
            for event in &events {
                let json = serde_json::to_string(event).map_err(|err| err.to_string())?;
                pipe.cmd("XADD")
                    .arg(&self.config.stream_out)
                    .arg("*")
                    .arg("event")
                    .arg(json)
                    .ignore();
            }
            pipe.query_async::<()>(&mut redis)
                .await
                .map_err(redis_err)?;
            if last {
                return Ok(records);
            }
        }
    }
}
