//! `atpdb fleet index` (rsky's StreamIndexer): consumer groups over the event streams →
//! PostgreSQL.
//!
//! A batch of entries becomes one transaction: the rows are copied (binary COPY) into a
//! temporary staging table, reduced to the newest row per key, and merged by one upsert
//! that **never lets an older rev overwrite a newer one** — a backfill's create, which
//! carries the rev of the snapshot it came from, cannot undo a later live update, and a
//! delete is kept as a tombstone (`deleted`) so that a late backfill cannot bring the
//! record back. The entries are acknowledged only after the transaction commits, so a
//! crash redelivers them, and redelivery is harmless: an equal rev changes nothing.
//!
//! This slice indexes the generic tables (`record`, `repo`); the typed tables of the issue
//! (`post`, `like`, ...) and labels come next.

use std::time::{Duration, Instant};

use redis::streams::{StreamId, StreamReadOptions, StreamReadReply};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use crate::backfill::ensure_group;
use crate::{ConnectionManager, FleetError, StreamEvent};

/// The schema, created by the binary; every statement can run again.
pub const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS record (
        uri text PRIMARY KEY,
        cid text,
        did text NOT NULL,
        collection text NOT NULL,
        rkey text NOT NULL,
        rev text COLLATE \"C\" NOT NULL,
        json jsonb,
        deleted boolean NOT NULL DEFAULT false,
        indexed_at timestamptz NOT NULL DEFAULT now()
    )",
    "CREATE INDEX IF NOT EXISTS record_did_collection ON record (did, collection)",
    "CREATE INDEX IF NOT EXISTS record_collection ON record (collection) WHERE NOT deleted",
    "CREATE TABLE IF NOT EXISTS repo (
        did text PRIMARY KEY,
        rev text COLLATE \"C\" NOT NULL,
        commit text,
        updated_at timestamptz NOT NULL DEFAULT now()
    )",
];

/// What [`run`] does.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// The streams read (`firehose_live`, `firehose_backfill`).
    pub streams: Vec<String>,
    /// The consumer group (one per stream, same name).
    pub group: String,
    /// This indexer's name in the group.
    pub consumer: String,
    /// Entries per transaction.
    pub batch_size: usize,
    /// Stop once nothing has been new for this long; `None`: run until shut down.
    pub exit_when_idle: Option<Duration>,
}

impl Default for IndexConfig {
    fn default() -> IndexConfig {
        IndexConfig {
            streams: vec!["firehose_live".to_owned(), "firehose_backfill".to_owned()],
            group: "firehose_group".to_owned(),
            consumer: "indexer_1".to_owned(),
            batch_size: 500,
            exit_when_idle: None,
        }
    }
}

/// What an indexer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Indexed {
    /// Entries acknowledged.
    pub entries: u64,
    /// Record rows offered to the upsert (before the rev check).
    pub records: u64,
    /// Entries that could not be read, acknowledged and skipped.
    pub unreadable: u64,
}

/// Connects to PostgreSQL at `url` (no TLS: the database sits beside the fleet); the
/// connection's driver runs on its own task and logs when it ends.
///
/// # Errors
///
/// [`FleetError::Postgres`] when the URL is malformed or the server refuses.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, FleetError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(%err, "index.postgres_connection_ended");
        }
    });
    Ok(client)
}

/// Runs the migrations.
///
/// # Errors
///
/// [`FleetError::Postgres`] when a statement fails.
pub async fn migrate(postgres: &mut tokio_postgres::Client) -> Result<(), FleetError> {
    // Indexers that start together would race on CREATE ... IF NOT EXISTS (PostgreSQL can
    // then fail one of them on its catalog's unique index): one at a time.
    let transaction = postgres.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    for statement in MIGRATIONS {
        transaction.batch_execute(statement).await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// The advisory lock key the migrations hold ("atpdb" in ASCII).
const MIGRATION_LOCK: i64 = 0x61_7470_6462;

/// One row for the `record` upsert.
struct RecordRow {
    uri: String,
    cid: Option<String>,
    did: String,
    collection: String,
    rkey: String,
    rev: String,
    json: Option<serde_json::Value>,
    deleted: bool,
}

/// Indexes until `shutdown` (or idle, with `exit_when_idle`).
///
/// # Errors
///
/// [`FleetError`] when Redis or PostgreSQL fail; the entries of the failed batch stay
/// pending and are read again by the next run.
pub async fn run(
    mut redis: ConnectionManager,
    postgres: &mut tokio_postgres::Client,
    config: &IndexConfig,
    shutdown: &CancellationToken,
) -> Result<Indexed, FleetError> {
    migrate(postgres).await?;
    for stream in &config.streams {
        ensure_group(&mut redis, stream, &config.group).await?;
    }
    let mut done = Indexed::default();
    let mut idle_since = Instant::now();
    // Our own pending entries first (a batch that failed, or a restart), then new ones.
    let mut from = "0";
    while !shutdown.is_cancelled() {
        let mut read_any = false;
        for stream in &config.streams {
            let entries = read(&mut redis, config, stream, from).await?;
            if entries.is_empty() {
                continue;
            }
            read_any = true;
            index_batch(&mut redis, postgres, config, stream, &entries, &mut done).await?;
        }
        if read_any {
            idle_since = Instant::now();
            continue;
        }
        if from == "0" {
            from = ">";
            continue;
        }
        if let Some(idle) = config.exit_when_idle
            && idle_since.elapsed() >= idle
        {
            break;
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    Ok(done)
}

async fn read(
    redis: &mut ConnectionManager,
    config: &IndexConfig,
    stream: &str,
    from: &str,
) -> Result<Vec<StreamId>, FleetError> {
    let options = StreamReadOptions::default()
        .group(&config.group, &config.consumer)
        .count(config.batch_size.max(1));
    let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg(&options)
        .arg("STREAMS")
        .arg(stream)
        .arg(from)
        .query_async(redis)
        .await?;
    Ok(reply
        .into_iter()
        .flat_map(|reply| reply.keys)
        .flat_map(|key| key.ids)
        .collect())
}

/// One batch: one transaction, then XACK.
async fn index_batch(
    redis: &mut ConnectionManager,
    postgres: &mut tokio_postgres::Client,
    config: &IndexConfig,
    stream: &str,
    entries: &[StreamId],
    done: &mut Indexed,
) -> Result<(), FleetError> {
    let mut records = Vec::new();
    let mut repos: Vec<(String, String, String)> = Vec::new();
    for entry in entries {
        let event = entry
            .get::<String>("event")
            .and_then(|text| serde_json::from_str::<StreamEvent>(&text).ok());
        match event {
            Some(
                StreamEvent::Create {
                    did,
                    rev,
                    collection,
                    rkey,
                    cid,
                    record,
                    ..
                }
                | StreamEvent::Update {
                    did,
                    rev,
                    collection,
                    rkey,
                    cid,
                    record,
                    ..
                },
            ) => records.push(RecordRow {
                uri: format!("at://{did}/{collection}/{rkey}"),
                cid: Some(cid),
                did,
                collection,
                rkey,
                rev,
                json: Some(record),
                deleted: false,
            }),
            Some(StreamEvent::Delete {
                did,
                rev,
                collection,
                rkey,
                ..
            }) => records.push(RecordRow {
                uri: format!("at://{did}/{collection}/{rkey}"),
                cid: None,
                did,
                collection,
                rkey,
                rev,
                json: None,
                deleted: true,
            }),
            Some(StreamEvent::Repo {
                did, rev, commit, ..
            }) => repos.push((did, rev, commit)),
            None => {
                done.unreadable += 1;
                tracing::warn!(stream, id = %entry.id, "index.unreadable entry skipped");
            }
        }
    }
    let transaction = postgres.transaction().await?;
    if !records.is_empty() {
        transaction
            .batch_execute(
                "CREATE TEMPORARY TABLE IF NOT EXISTS record_staging
                     (LIKE record INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
            )
            .await?;
        let sink = transaction
            .copy_in(
                "COPY record_staging (uri, cid, did, collection, rkey, rev, json, deleted) \
                 FROM STDIN BINARY",
            )
            .await?;
        let writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::JSONB,
                Type::BOOL,
            ],
        );
        let mut writer = std::pin::pin!(writer);
        for row in &records {
            writer
                .as_mut()
                .write(&[
                    &row.uri,
                    &row.cid,
                    &row.did,
                    &row.collection,
                    &row.rkey,
                    &row.rev,
                    &row.json,
                    &row.deleted,
                ])
                .await?;
        }
        writer.finish().await?;
        // The newest row per record, merged only over an older one.
        transaction
            .batch_execute(
                "INSERT INTO record (uri, cid, did, collection, rkey, rev, json, deleted)
                 SELECT DISTINCT ON (uri) uri, cid, did, collection, rkey, rev, json, deleted
                 FROM record_staging ORDER BY uri, rev DESC
                 ON CONFLICT (uri) DO UPDATE SET
                     cid = EXCLUDED.cid, rev = EXCLUDED.rev, json = EXCLUDED.json,
                     deleted = EXCLUDED.deleted, indexed_at = now()
                 WHERE record.rev < EXCLUDED.rev",
            )
            .await?;
    }
    for (did, rev, commit) in &repos {
        transaction
            .execute(
                "INSERT INTO repo (did, rev, commit) VALUES ($1, $2, $3)
                 ON CONFLICT (did) DO UPDATE SET rev = EXCLUDED.rev, commit = EXCLUDED.commit,
                     updated_at = now()
                 WHERE repo.rev < EXCLUDED.rev",
                &[did, rev, commit],
            )
            .await?;
    }
    transaction.commit().await?;
    let ids: Vec<&str> = entries.iter().map(|entry| entry.id.as_str()).collect();
    let _: u64 = redis::cmd("XACK")
        .arg(stream)
        .arg(&config.group)
        .arg(&ids)
        .query_async(redis)
        .await?;
    done.entries += entries.len() as u64;
    done.records += records.len() as u64;
    Ok(())
}
