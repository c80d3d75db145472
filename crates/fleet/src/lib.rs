//! The fleet: rsky's pipeline on Redis Streams, with atpdb's verified core.
//!
//! One machine keeps a collection or a few million accounts current; the full network needs
//! many workers. The stages pass work through Redis Streams, in the formats rsky's services
//! use, so either side can be swapped:
//!
//! - [`enumerate`] (rsky's BackfillIngester): relays' `listRepos` → `repo_backfill`, one
//!   entry per repo (field `repo`, JSON [`RepoJob`]); the cursor per relay is written in the
//!   same transaction as the page's entries, so a restart neither loses nor repeats a page.
//! - [`backfill`] (rsky's RepoBackfiller): a consumer group over `repo_backfill`; each repo's
//!   `getRepo` streams through the verifier (DID, signature against the resolved key, every
//!   block and the MST), its records go to `firehose_backfill` (field `event`, JSON
//!   [`StreamEvent`]) in chunks, each followed by a `repo` event; then XACK + XDEL. Failures
//!   stay pending and are retried with backoff, then parked with the reason; entries left
//!   pending by a dead worker are taken over (XAUTOCLAIM).
//!
//! - [`ingest`] (rsky's FirehoseIngester): a relay's firehose, verified as on one node →
//!   `firehose_live`; the events, the repo heads and the cursor in one MULTI per batch.
//! - [`labels`] (rsky's LabelerIngester): labelers' `subscribeLabels`, each label's signature
//!   checked against the labeler's `#atproto_label` key → `label_live`.
//! - [`index`] (rsky's StreamIndexer): consumer groups over the event streams → PostgreSQL,
//!   one transaction per batch (binary COPY into staging, one upsert in which an older rev
//!   never overwrites a newer one, deletes kept as tombstones), acknowledged after commit.
//!
//! - [`status`]: stream lengths, pending entries and lag per group and consumer, cursors,
//!   parked errors and rows per table, as text, JSON or Prometheus text.
//!
//! Every stage waits while the stream it writes is over its high-water mark, so no stream
//! grows without bound when the next stage is slow or down.

pub mod backfill;
pub mod enumerate;
pub mod index;
pub mod ingest;
pub mod labels;
pub mod sink;
pub mod status;

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The Redis client this crate speaks through, for callers that inspect the streams.
pub use redis;
pub use redis::aio::ConnectionManager;
/// The PostgreSQL client the indexer speaks through, for callers that query its tables.
pub use tokio_postgres;

/// Why a fleet stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Redis refused a command or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// PostgreSQL refused a statement or could not be reached.
    #[error("postgres: {}", postgres_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// A setting is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The engine's outbox could not be read (a sink).
    #[error("outbox: {0}")]
    Outbox(String),
    /// A relay's listing cannot go on.
    #[error("listing {relay}: {reason}")]
    Listing {
        /// The relay.
        relay: String,
        /// What happened.
        reason: String,
    },
}

impl FleetError {
    /// Whether running the stage again can succeed: Redis or PostgreSQL went away or is
    /// starting (a restart, a killed connection, a timeout). Every stage resumes from what
    /// it wrote (cursors, pending entries), so restarting it is safe; other errors (a bad
    /// setting, a refused statement) would fail the same way again.
    pub fn is_transient(&self) -> bool {
        match self {
            FleetError::Redis(err) => {
                err.is_io_error()
                    || err.is_timeout()
                    || err.is_connection_dropped()
                    || err.is_connection_refusal()
                    || err.is_unrecoverable_error()
                    || matches!(
                        err.code(),
                        Some("LOADING" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN")
                    )
            }
            FleetError::Postgres(err) => {
                // Class 08: connection exception; class 57: operator intervention
                // (`pg_terminate_backend`, shutdown, "the database system is starting up");
                // class 40: the transaction was rolled back (deadlock, serialization), so
                // the batch is whole again and runs anew.
                err.is_closed()
                    || err.code().is_some_and(|state| {
                        let code = state.code();
                        code.starts_with("08") || code.starts_with("57") || code.starts_with("40")
                    })
                    || std::error::Error::source(err)
                        .is_some_and(|source| source.is::<std::io::Error>())
            }
            FleetError::Config(_) | FleetError::Listing { .. } | FleetError::Outbox(_) => false,
        }
    }
}

/// The server's own message when there is one: tokio-postgres displays only "db error".
fn postgres_message(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => err.to_string(),
    }
}

/// An entry of `repo_backfill` (rsky's `BackfillEvent`), JSON in the field `repo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoJob {
    /// The account.
    pub did: String,
    /// The relay (or PDS) that listed it.
    pub host: String,
    /// The rev the listing reported.
    pub rev: String,
    /// The account status when it is not active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Whether the account is active.
    pub active: bool,
}

/// An event of `firehose_backfill` (rsky's `StreamEvent`), JSON in the field `event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StreamEvent {
    /// One record of a backfilled repo.
    Create {
        /// [`SEQ_BACKFILL`] for backfill events.
        seq: i64,
        /// When the event was made (RFC 3339).
        time: String,
        /// The account.
        did: String,
        /// The commit's CID.
        commit: String,
        /// The commit's rev.
        rev: String,
        /// The record's collection.
        collection: String,
        /// The record key.
        rkey: String,
        /// The record's CID.
        cid: String,
        /// The record in the data model's JSON.
        record: serde_json::Value,
    },
    /// A record replaced by a live commit (same fields as `create`).
    Update {
        /// The firehose sequence number.
        seq: i64,
        /// When the event was made (RFC 3339).
        time: String,
        /// The account.
        did: String,
        /// The commit's CID.
        commit: String,
        /// The commit's rev.
        rev: String,
        /// The record's collection.
        collection: String,
        /// The record key.
        rkey: String,
        /// The record's CID.
        cid: String,
        /// The record in the data model's JSON.
        record: serde_json::Value,
    },
    /// A record removed by a live commit.
    Delete {
        /// The firehose sequence number.
        seq: i64,
        /// When the event was made (RFC 3339).
        time: String,
        /// The account.
        did: String,
        /// The commit's CID.
        commit: String,
        /// The commit's rev.
        rev: String,
        /// The record's collection.
        collection: String,
        /// The record key.
        rkey: String,
    },
    /// The account's handle changed (`handle.invalid` when it does not verify both ways).
    Identity {
        /// The firehose sequence number.
        seq: i64,
        /// When the event was made (RFC 3339).
        time: String,
        /// The account.
        did: String,
        /// The handle, verified.
        handle: String,
    },
    /// The account's hosting status changed.
    Account {
        /// The firehose sequence number.
        seq: i64,
        /// When the event was made (RFC 3339).
        time: String,
        /// The account.
        did: String,
        /// Whether the account is active.
        active: bool,
        /// Why not, when it is not (`deactivated`, `takendown`, `deleted`, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<String>,
    },
    /// Written after each chunk of a repo's records: the repo as of `rev`.
    Repo {
        /// [`SEQ_BACKFILL`] for backfill events.
        seq: i64,
        /// When the event was made (RFC 3339).
        time: String,
        /// The account.
        did: String,
        /// The commit's CID.
        commit: String,
        /// The commit's rev.
        rev: String,
        /// Set on the last chunk's event: every record of the snapshot at `rev` has been
        /// written, so a record the index holds at an older rev that is not among them was
        /// deleted (in commits this pipeline missed) and nothing older than `rev` applies
        /// any more. An extra field for rsky's consumers, which ignore it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        complete: bool,
    },
    /// A label from a labeler's `subscribeLabels`, its signature checked (`label_live`).
    Label {
        /// The labeler's seq.
        seq: i64,
        /// The labeler's DID.
        src: String,
        /// The subject: an `at://` URI or a DID.
        uri: String,
        /// The record version the label is pinned to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cid: Option<String>,
        /// The label value.
        val: String,
        /// A negation: withdraws the label with the same src, uri and val.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        neg: bool,
        /// When the labeler created it.
        cts: String,
        /// When it stops applying.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exp: Option<String>,
    },
}

/// The `seq` of events that come from a backfill rather than the live firehose.
pub const SEQ_BACKFILL: i64 = -1;

/// Connects to Redis at `url` (`redis://127.0.0.1:6379`); the connection reconnects by
/// itself after Redis restarts.
///
/// # Errors
///
/// [`FleetError::Redis`] when the URL is malformed or Redis cannot be reached.
///
/// The connection is multiplexed: no stage sends a blocking command (`BLOCK`) on it, which
/// would hold up every other command sharing it.
pub async fn connect(url: &str) -> Result<ConnectionManager, FleetError> {
    let client = redis::Client::open(url)?;
    // A pipeline of a chunk's events can take longer than the client's default 500 ms on a
    // busy server; a dead server is still noticed.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    Ok(ConnectionManager::new_with_config(client, config).await?)
}

/// Takes over the entries of `stream` that any consumer of `group` has left unacknowledged
/// for `idle` (it died); they become `consumer`'s pending entries. Returns how many.
pub(crate) async fn claim_abandoned(
    redis: &mut ConnectionManager,
    stream: &str,
    group: &str,
    consumer: &str,
    idle: Duration,
) -> Result<u64, FleetError> {
    let mut start = "0-0".to_owned();
    let mut claimed = 0;
    loop {
        let (next, ids, _deleted): (String, Vec<String>, Vec<String>) = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(idle.as_millis() as u64)
            .arg(&start)
            .arg("COUNT")
            .arg(100)
            .arg("JUSTID")
            .query_async(redis)
            .await?;
        if !ids.is_empty() {
            claimed += ids.len() as u64;
            tracing::info!(
                stream,
                consumer,
                count = ids.len(),
                "fleet.claimed: entries of a consumer that stopped"
            );
        }
        if next == "0-0" {
            return Ok(claimed);
        }
        start = next;
    }
}

/// The seq saved under `key` (a firehose's or a labeler's processed low-water mark).
pub(crate) async fn read_seq(
    redis: &mut ConnectionManager,
    key: &str,
) -> Result<Option<u64>, FleetError> {
    let stored: Option<String> = redis::cmd("GET").arg(key).query_async(redis).await?;
    stored
        .map(|text| {
            text.parse::<u64>()
                .map_err(|_| FleetError::Config(format!("{key} does not hold a seq")))
        })
        .transpose()
}

/// The fields every record event carries, for [`RecordHead::event`].
pub(crate) struct RecordHead {
    pub(crate) seq: i64,
    pub(crate) time: String,
    pub(crate) did: String,
    pub(crate) commit: String,
    pub(crate) rev: String,
    pub(crate) collection: String,
    pub(crate) rkey: String,
}

/// What a record change left: the record (created or updated), or nothing (deleted).
pub(crate) enum Written {
    Created {
        cid: String,
        record: serde_json::Value,
    },
    Updated {
        cid: String,
        record: serde_json::Value,
    },
    Deleted,
}

impl RecordHead {
    /// The stream event of one record change (the firehose ingester's and serve's sinks').
    pub(crate) fn event(self, written: Written) -> StreamEvent {
        let RecordHead {
            seq,
            time,
            did,
            commit,
            rev,
            collection,
            rkey,
        } = self;
        match written {
            Written::Created { cid, record } => StreamEvent::Create {
                seq,
                time,
                did,
                commit,
                rev,
                collection,
                rkey,
                cid,
                record,
            },
            Written::Updated { cid, record } => StreamEvent::Update {
                seq,
                time,
                did,
                commit,
                rev,
                collection,
                rkey,
                cid,
                record,
            },
            Written::Deleted => StreamEvent::Delete {
                seq,
                time,
                did,
                commit,
                rev,
                collection,
                rkey,
            },
        }
    }
}

/// Waits while `stream` holds `high_water` entries or more; returns how long it waited.
pub(crate) async fn wait_below(
    redis: &mut ConnectionManager,
    stream: &str,
    high_water: u64,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Duration, FleetError> {
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        let length: u64 = redis::cmd("XLEN").arg(stream).query_async(redis).await?;
        if length < high_water || shutdown.is_cancelled() {
            return Ok(started.elapsed());
        }
        if !said {
            tracing::info!(
                stream,
                length,
                high_water,
                "fleet.paused: the stream is full"
            );
            said = true;
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Now as RFC 3339 UTC with milliseconds, as rsky writes `time`.
pub(crate) fn now_rfc3339() -> String {
    atpdb_repo::syntax::Datetime::now().to_string()
}

/// The host part of a relay URL (`https://relay.example` → `relay.example`), for key names.
pub(crate) fn hostname(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.trim_end_matches('/')
}
