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
//! Every record goes to the generic `record` table; the collections AppViews count also go
//! to a typed table with the record's own fields as columns (`post`, `like`, `repost`,
//! `follow`, `actor`, `feed_generator`), projected in SQL from the same staged rows under
//! the same guard, so the two never disagree.

use std::time::{Duration, Instant};

use redis::streams::StreamReadOptions;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use crate::backfill::ensure_group;
use crate::{ConnectionManager, FleetError, StreamEvent};

/// The schema, created by the binary. Append only: [`migrate`] runs each statement once,
/// in order, and a database remembers how many it has had (each can still run again, so a
/// database set up before the count was kept takes them all once more).
///
/// Identifiers (uri, did, collection, rkey, rev, label keys) compare as bytes (`COLLATE
/// "C"`): they are ASCII, and under a database's default collation — even `C.UTF-8` —
/// every index insert, sort and join on them calls `strcoll`, which cost a third of the
/// indexer's time.
pub const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS record (
        uri text COLLATE \"C\" PRIMARY KEY,
        cid text,
        did text COLLATE \"C\" NOT NULL,
        collection text COLLATE \"C\" NOT NULL,
        rkey text COLLATE \"C\" NOT NULL,
        rev text COLLATE \"C\" NOT NULL,
        json jsonb,
        deleted boolean NOT NULL DEFAULT false,
        indexed_at timestamptz NOT NULL DEFAULT now()
    )",
    // One repo's records, or one collection of it, are a range of the primary key (`uri`
    // starts `at://DID/COLLECTION/`, and byte order keeps it together: `uri LIKE
    // 'at://did:plc:…/app.bsky.feed.post/%'`); this index serves the sweep of a repo's rows
    // older than a snapshot, which then reads only those rows.
    "CREATE INDEX IF NOT EXISTS record_did_rev ON record (did, rev)",
    "CREATE INDEX IF NOT EXISTS record_collection ON record (collection) WHERE NOT deleted",
    "CREATE TABLE IF NOT EXISTS repo (
        did text COLLATE \"C\" PRIMARY KEY,
        rev text COLLATE \"C\" NOT NULL,
        commit text,
        updated_at timestamptz NOT NULL DEFAULT now()
    )",
    // The account as the live firehose describes it; each column moves only forward in seq.
    "ALTER TABLE repo ADD COLUMN IF NOT EXISTS handle text,
        ADD COLUMN IF NOT EXISTS active boolean,
        ADD COLUMN IF NOT EXISTS status text,
        ADD COLUMN IF NOT EXISTS identity_seq bigint,
        ADD COLUMN IF NOT EXISTS account_seq bigint,
        ADD COLUMN IF NOT EXISTS snapshot_rev text COLLATE \"C\"",
    // The typed tables: what AppViews count, one row per record with its own fields as
    // columns, under the same rev guard and tombstones as `record`. `created_at` stays the
    // record's text: a malformed datetime in one record must not fail its whole batch.
    "CREATE TABLE IF NOT EXISTS post (
        uri text COLLATE \"C\" PRIMARY KEY,
        did text COLLATE \"C\" NOT NULL,
        rkey text COLLATE \"C\" NOT NULL,
        cid text,
        rev text COLLATE \"C\" NOT NULL,
        text text,
        created_at text,
        reply_root_uri text COLLATE \"C\",
        reply_parent_uri text,
        quote_uri text,
        langs text[],
        deleted boolean NOT NULL DEFAULT false,
        indexed_at timestamptz NOT NULL DEFAULT now()
    )",
    "CREATE INDEX IF NOT EXISTS post_did ON post (did)",
    "CREATE INDEX IF NOT EXISTS post_reply_root ON post (reply_root_uri) WHERE NOT deleted",
    "CREATE TABLE IF NOT EXISTS \"like\" (
        uri text COLLATE \"C\" PRIMARY KEY,
        did text COLLATE \"C\" NOT NULL,
        rkey text COLLATE \"C\" NOT NULL,
        cid text,
        rev text COLLATE \"C\" NOT NULL,
        subject_uri text COLLATE \"C\",
        subject_cid text,
        created_at text,
        deleted boolean NOT NULL DEFAULT false,
        indexed_at timestamptz NOT NULL DEFAULT now()
    )",
    "CREATE INDEX IF NOT EXISTS like_subject ON \"like\" (subject_uri) WHERE NOT deleted",
    "CREATE TABLE IF NOT EXISTS repost (
        uri text COLLATE \"C\" PRIMARY KEY,
        did text COLLATE \"C\" NOT NULL,
        rkey text COLLATE \"C\" NOT NULL,
        cid text,
        rev text COLLATE \"C\" NOT NULL,
        subject_uri text COLLATE \"C\",
        subject_cid text,
        created_at text,
        deleted boolean NOT NULL DEFAULT false,
        indexed_at timestamptz NOT NULL DEFAULT now()
    )",
    "CREATE INDEX IF NOT EXISTS repost_subject ON repost (subject_uri) WHERE NOT deleted",
    "CREATE TABLE IF NOT EXISTS follow (
        uri text COLLATE \"C\" PRIMARY KEY,
        did text COLLATE \"C\" NOT NULL,
        rkey text COLLATE \"C\" NOT NULL,
        cid text,
        rev text COLLATE \"C\" NOT NULL,
        subject_did text COLLATE \"C\",
        created_at text,
        deleted boolean NOT NULL DEFAULT false,
        indexed_at timestamptz NOT NULL DEFAULT now()
    )",
    "CREATE INDEX IF NOT EXISTS follow_subject ON follow (subject_did) WHERE NOT deleted",
    "CREATE TABLE IF NOT EXISTS actor (
        did text COLLATE \"C\" PRIMARY KEY,
        cid text,
        rev text COLLATE \"C\" NOT NULL,
        display_name text,
        description text,
        avatar_cid text,
        banner_cid text,
        created_at text,
        deleted boolean NOT NULL DEFAULT false,
        indexed_at timestamptz NOT NULL DEFAULT now()
    )",
    "CREATE TABLE IF NOT EXISTS feed_generator (
        uri text COLLATE \"C\" PRIMARY KEY,
        did text COLLATE \"C\" NOT NULL,
        rkey text COLLATE \"C\" NOT NULL,
        cid text,
        rev text COLLATE \"C\" NOT NULL,
        service_did text,
        display_name text,
        description text,
        created_at text,
        deleted boolean NOT NULL DEFAULT false,
        indexed_at timestamptz NOT NULL DEFAULT now()
    )",
    // One row per (src, uri, val), the key the label specification names: the newest label
    // by `cts` wins, and a negation stays as a row with `neg` so that a late copy of the
    // label it withdrew cannot bring it back. Labels that apply now:
    // `WHERE NOT neg AND (exp IS NULL OR exp::timestamptz > now())`.
    "CREATE TABLE IF NOT EXISTS label (
        src text COLLATE \"C\" NOT NULL,
        uri text COLLATE \"C\" NOT NULL,
        val text COLLATE \"C\" NOT NULL,
        cid text,
        neg boolean NOT NULL DEFAULT false,
        cts text COLLATE \"C\" NOT NULL,
        exp text,
        seq bigint NOT NULL,
        indexed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (src, uri, val)
    )",
    "CREATE INDEX IF NOT EXISTS label_uri ON label (uri) WHERE NOT neg",
    // Where `serve --postgres` has written up to in its outbox, per named sink.
    "CREATE TABLE IF NOT EXISTS sink_cursor (name text PRIMARY KEY, position bigint NOT NULL)",
];

/// One projection from the staged records into a typed table: the newest staged row per
/// key of `collection`, merged under the rev guard like `record`.
struct Typed {
    table: &'static str,
    collection: &'static str,
    /// The table's key column (`uri`, or `did` for the one-per-account profile).
    key: &'static str,
    /// Extra rows to skip (the profile is only `self`).
    filter: &'static str,
    /// `(column, expression over the staged row)` for the record's own fields.
    fields: &'static [(&'static str, &'static str)],
}

/// `jsonb ->> text` only when the value is a string: an object where a string belongs (a
/// malformed record) gives NULL instead of its JSON text.
macro_rules! string_at {
    ($path:literal) => {
        concat!(
            "CASE WHEN jsonb_typeof(json #> '{",
            $path,
            "}') = 'string' THEN json #>> '{",
            $path,
            "}' END"
        )
    };
}

const TYPED: &[Typed] = &[
    Typed {
        table: "post",
        collection: "app.bsky.feed.post",
        key: "uri",
        filter: "",
        fields: &[
            ("text", string_at!("text")),
            ("created_at", string_at!("createdAt")),
            ("reply_root_uri", string_at!("reply,root,uri")),
            ("reply_parent_uri", string_at!("reply,parent,uri")),
            (
                "quote_uri",
                concat!(
                    "COALESCE(",
                    string_at!("embed,record,uri"),
                    ", ",
                    string_at!("embed,record,record,uri"),
                    ")"
                ),
            ),
            (
                "langs",
                "CASE WHEN jsonb_typeof(json -> 'langs') = 'array' THEN ARRAY(\
                 SELECT value #>> '{}' FROM jsonb_array_elements(json -> 'langs') AS value \
                 WHERE jsonb_typeof(value) = 'string') END",
            ),
        ],
    },
    Typed {
        table: "\"like\"",
        collection: "app.bsky.feed.like",
        key: "uri",
        filter: "",
        fields: &[
            ("subject_uri", string_at!("subject,uri")),
            ("subject_cid", string_at!("subject,cid")),
            ("created_at", string_at!("createdAt")),
        ],
    },
    Typed {
        table: "repost",
        collection: "app.bsky.feed.repost",
        key: "uri",
        filter: "",
        fields: &[
            ("subject_uri", string_at!("subject,uri")),
            ("subject_cid", string_at!("subject,cid")),
            ("created_at", string_at!("createdAt")),
        ],
    },
    Typed {
        table: "follow",
        collection: "app.bsky.graph.follow",
        key: "uri",
        filter: "",
        fields: &[
            ("subject_did", string_at!("subject")),
            ("created_at", string_at!("createdAt")),
        ],
    },
    Typed {
        table: "actor",
        collection: "app.bsky.actor.profile",
        key: "did",
        filter: "AND rkey = 'self'",
        fields: &[
            ("display_name", string_at!("displayName")),
            ("description", string_at!("description")),
            ("avatar_cid", string_at!("avatar,ref,$link")),
            ("banner_cid", string_at!("banner,ref,$link")),
            ("created_at", string_at!("createdAt")),
        ],
    },
    Typed {
        table: "feed_generator",
        collection: "app.bsky.feed.generator",
        key: "uri",
        filter: "",
        fields: &[
            ("service_did", string_at!("did")),
            ("display_name", string_at!("displayName")),
            ("description", string_at!("description")),
            ("created_at", string_at!("createdAt")),
        ],
    },
];

/// Every table that keeps tombstones: `record` and the typed tables.
pub fn tables() -> impl Iterator<Item = &'static str> {
    std::iter::once("record").chain(TYPED.iter().map(|typed| typed.table))
}

impl Typed {
    /// This projection's part of [`merge_statement`]: an upsert from `fresh`.
    fn upsert(&self) -> String {
        let mut columns = vec!["did", "cid", "rev", "deleted"];
        if self.key == "uri" {
            columns.extend(["uri", "rkey"]);
        }
        let mut selected: Vec<String> = columns.iter().map(|column| (*column).to_owned()).collect();
        for (column, expression) in self.fields {
            columns.push(column);
            selected.push(expression.to_string());
        }
        let updates: Vec<String> = columns
            .iter()
            .filter(|column| **column != self.key)
            .map(|column| format!("{column} = EXCLUDED.{column}"))
            .collect();
        format!(
            "INSERT INTO {table} ({columns})
             SELECT {selected} FROM fresh WHERE collection = '{collection}' {filter}
             ON CONFLICT ({key}) DO UPDATE SET {updates}, indexed_at = now()
             WHERE {table}.rev < EXCLUDED.rev",
            table = self.table,
            columns = columns.join(", "),
            key = self.key,
            selected = selected.join(", "),
            collection = self.collection,
            filter = self.filter,
            updates = updates.join(", "),
        )
    }

    /// This projection's part of [`tombstone_statement`]: the rows of the records `swept`.
    fn tombstone(&self) -> String {
        let keys = if self.key == "uri" { "uri" } else { "$1::text" };
        format!(
            "UPDATE {table} SET deleted = true, cid = NULL, indexed_at = now()
             WHERE {key} IN (SELECT {keys} FROM swept
                             WHERE collection = '{collection}' {filter}) AND NOT deleted",
            table = self.table,
            key = self.key,
            collection = self.collection,
            filter = self.filter,
        )
    }
}

/// One statement merges a batch's staged rows into `record` and every typed table: one pass
/// over the staging table instead of one per table, and one round trip.
///
/// `fresh` is the newest staged row per record, without the rows older than their repo's
/// last complete snapshot: such a row says nothing the snapshot did not (a record that
/// existed then is in it, at its rev), and merging it could bring back a record the
/// snapshot's sweep removed. Each table then takes a row only over an older rev, so the
/// typed tables move in step with `record`.
fn merge_statement() -> &'static str {
    static STATEMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    STATEMENT.get_or_init(|| {
        let mut statement = String::from(
            "WITH fresh AS MATERIALIZED (
                 SELECT DISTINCT ON (staged.uri) staged.uri, staged.cid, staged.did,
                     staged.collection, staged.rkey, staged.rev, staged.json, staged.deleted
                 FROM record_staging AS staged LEFT JOIN repo ON repo.did = staged.did
                 WHERE repo.snapshot_rev IS NULL OR repo.snapshot_rev <= staged.rev
                 ORDER BY staged.uri, staged.rev DESC
             ), merged AS (
                 INSERT INTO record (uri, cid, did, collection, rkey, rev, json, deleted)
                 SELECT uri, cid, did, collection, rkey, rev, json, deleted FROM fresh
                 ON CONFLICT (uri) DO UPDATE SET
                     cid = EXCLUDED.cid, rev = EXCLUDED.rev, json = EXCLUDED.json,
                     deleted = EXCLUDED.deleted, indexed_at = now()
                 WHERE record.rev < EXCLUDED.rev
             )",
        );
        for (index, typed) in TYPED.iter().enumerate() {
            statement.push_str(&format!(", typed{index} AS ({})", typed.upsert()));
        }
        statement.push_str(" SELECT count(*) FROM fresh");
        statement
    })
}

/// Marks `$1`'s live rows deleted in every table: all of them, or (with `$2`) those older
/// than that rev. The typed tables move in step with `record`, so they are tombstoned by the
/// keys `record` returns — no scan of a typed table by DID.
fn tombstone_statement() -> &'static str {
    static STATEMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    STATEMENT.get_or_init(|| {
        let mut statement = String::from(
            "WITH swept AS (
                 UPDATE record SET deleted = true, cid = NULL, json = NULL, indexed_at = now()
                 WHERE did = $1 AND ($2::text IS NULL OR rev < $2) AND NOT deleted
                 RETURNING uri, collection, rkey
             )",
        );
        for (index, typed) in TYPED.iter().enumerate() {
            statement.push_str(&format!(", typed{index} AS ({})", typed.tombstone()));
        }
        statement.push_str(" SELECT count(*) FROM swept");
        statement
    })
}

/// What [`run`] does.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// The streams read (`firehose_live`, `firehose_backfill`, `label_live`).
    pub streams: Vec<String>,
    /// The consumer group (one per stream, same name).
    pub group: String,
    /// This indexer's name in the group.
    pub consumer: String,
    /// Entries per transaction.
    pub batch_size: usize,
    /// Stop once nothing has been new for this long; `None`: run until shut down.
    pub exit_when_idle: Option<Duration>,
    /// Entries another indexer has held this long without acknowledging them are taken
    /// over (XAUTOCLAIM): that indexer died, and nothing else would index them.
    pub claim_idle: Duration,
    /// Delete entries once indexed (XACK + XDEL in one MULTI), as rsky's indexer does: the
    /// streams stay as long as the backlog, so the stages writing them, which wait above
    /// their high-water marks, are not stopped for good by entries already indexed. Turn it
    /// off only when another consumer group also reads the streams.
    pub delete_acked: bool,
}

impl Default for IndexConfig {
    fn default() -> IndexConfig {
        IndexConfig {
            streams: vec![
                "firehose_live".to_owned(),
                "firehose_backfill".to_owned(),
                "label_live".to_owned(),
            ],
            group: "firehose_group".to_owned(),
            consumer: "indexer_1".to_owned(),
            batch_size: 1000,
            exit_when_idle: None,
            claim_idle: Duration::from_secs(60),
            delete_acked: true,
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
    /// Entries taken over from indexers that stopped.
    pub claimed: u64,
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

/// Runs the migrations this database has not had yet.
///
/// Each statement of [`MIGRATIONS`] runs once, in order, and the count applied is kept in
/// `fleet_schema` in the same transaction. An up-to-date schema is therefore checked without
/// touching a table: an indexer that starts beside running ones must not take table locks
/// (`CREATE INDEX IF NOT EXISTS` takes a share lock on its table before it looks, `ALTER
/// TABLE` an exclusive one), which deadlocked with their batches.
///
/// # Errors
///
/// [`FleetError::Postgres`] when a statement fails; [`FleetError::Config`] when the database
/// has more migrations than this binary knows (a newer binary set it up).
pub async fn migrate(postgres: &mut tokio_postgres::Client) -> Result<(), FleetError> {
    // Indexers that start together would race on CREATE ... IF NOT EXISTS (PostgreSQL can
    // then fail one of them on its catalog's unique index): one at a time.
    let transaction = postgres.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    transaction
        .batch_execute("CREATE TABLE IF NOT EXISTS fleet_schema (applied integer NOT NULL)")
        .await?;
    let applied: i32 = transaction
        .query_opt("SELECT max(applied) FROM fleet_schema", &[])
        .await?
        .and_then(|row| row.get::<_, Option<i32>>(0))
        .unwrap_or(0);
    let applied = usize::try_from(applied).unwrap_or(0);
    let Some(pending) = MIGRATIONS.get(applied..) else {
        return Err(FleetError::Config(format!(
            "the database's schema has {applied} migrations, this binary knows {}: run a \
             newer atpdb",
            MIGRATIONS.len()
        )));
    };
    if pending.is_empty() {
        return Ok(transaction.commit().await?);
    }
    for statement in pending {
        transaction.batch_execute(statement).await?;
    }
    let known = i32::try_from(MIGRATIONS.len())
        .map_err(|_| FleetError::Config("too many migrations".to_owned()))?;
    transaction.execute("DELETE FROM fleet_schema", &[]).await?;
    transaction
        .execute("INSERT INTO fleet_schema (applied) VALUES ($1)", &[&known])
        .await?;
    transaction.commit().await?;
    Ok(())
}

/// Readies a connection for [`Batch::apply`]: runs the migrations, creates the session's
/// staging table and prepares [`merge_statement`] on it.
///
/// # Errors
///
/// [`migrate`]'s, and [`FleetError::Postgres`].
pub(crate) async fn prepare(
    postgres: &mut tokio_postgres::Client,
) -> Result<tokio_postgres::Statement, FleetError> {
    migrate(postgres).await?;
    // The staging table lives as long as the session (its rows as long as a transaction),
    // and the merge is planned once: per batch, both cost as much as a tenth of the rows.
    postgres
        .batch_execute(
            "CREATE TEMPORARY TABLE IF NOT EXISTS record_staging
                 (LIKE record INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
        )
        .await?;
    Ok(postgres.prepare(merge_statement()).await?)
}

/// The advisory lock key the migrations hold ("atpdb" in ASCII).
const MIGRATION_LOCK: i64 = 0x61_7470_6462;

/// A batch's labels, column by column (for `unnest`).
#[derive(Default)]
struct LabelRows {
    src: Vec<String>,
    uri: Vec<String>,
    val: Vec<String>,
    cid: Vec<Option<String>>,
    neg: Vec<bool>,
    cts: Vec<String>,
    exp: Vec<Option<String>>,
    seq: Vec<i64>,
}

/// One row for the `record` upsert.
struct RecordRow {
    uri: String,
    cid: Option<String>,
    did: String,
    collection: String,
    rkey: String,
    rev: String,
    json: Option<Jsonb>,
    deleted: bool,
}

/// A record's JSON text, sent as a `jsonb` parameter as it is: the indexer never builds the
/// value tree (PostgreSQL parses the text once, as it must for `jsonb`).
#[derive(Debug)]
struct Jsonb(String);

impl Jsonb {
    /// From an event's raw record. Text that carries a `\u` escape goes through a value
    /// tree instead: U+0000 must become U+FFFD (see [`without_nul`]), and a lone surrogate,
    /// which PostgreSQL refuses, makes the entry unreadable rather than failing its batch.
    /// serde_json writes `\u` only for control characters, so the events the fleet writes
    /// almost never take that path.
    fn from_raw(raw: &serde_json::value::RawValue) -> Option<Jsonb> {
        let text = raw.get();
        if !text.contains("\\u") {
            return Some(Jsonb(text.to_owned()));
        }
        let value = serde_json::from_str::<serde_json::Value>(text).ok()?;
        Some(Jsonb::from(value))
    }
}

impl From<serde_json::Value> for Jsonb {
    fn from(value: serde_json::Value) -> Jsonb {
        Jsonb(without_nul(value).to_string())
    }
}

impl tokio_postgres::types::ToSql for Jsonb {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // jsonb's binary format: version 1, then the text.
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A record event read without its value tree: the indexer's hot path. [`StreamEvent`]'s
/// `type` tag makes serde buffer every field (the record's whole tree included) before it
/// knows the variant, and a raw value cannot pass through that buffer; this view reads the
/// same JSON in one pass and keeps the record as text. Anything else — other event types,
/// or what this view cannot read — goes through [`StreamEvent`].
#[derive(serde::Deserialize)]
struct RecordView<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    did: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    rev: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    commit: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    collection: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    rkey: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    cid: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    record: Option<&'a serde_json::value::RawValue>,
}

/// What one record event contributes: its row, and its repo at its rev.
fn record_row(text: &str) -> Option<(RecordRow, (String, String, String))> {
    let view: RecordView<'_> = serde_json::from_str(text).ok()?;
    let deleted = match view.kind.as_ref() {
        "create" | "update" => false,
        "delete" => true,
        _ => return None,
    };
    let (json, cid) = if deleted {
        (None, None)
    } else {
        (
            Some(Jsonb::from_raw(view.record?)?),
            Some(view.cid?.into_owned()),
        )
    };
    let (did, rev) = (view.did.into_owned(), view.rev.into_owned());
    let row = RecordRow {
        uri: format!("at://{did}/{}/{}", view.collection, view.rkey),
        cid,
        did: did.clone(),
        collection: view.collection.into_owned(),
        rkey: view.rkey.into_owned(),
        rev: rev.clone(),
        json,
        deleted,
    };
    Some((row, (did, rev, view.commit.into_owned())))
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
    let merge = prepare(postgres).await?;
    for stream in &config.streams {
        ensure_group(&mut redis, stream, &config.group).await?;
    }
    let mut done = Indexed::default();
    let mut idle_since = Instant::now();
    let mut last_claim = Instant::now();
    let claim_every = (config.claim_idle / 2).max(Duration::from_secs(1));
    // Our own pending entries first (a batch that failed, or a restart), then new ones.
    let mut from = "0";
    while !shutdown.is_cancelled() {
        if last_claim.elapsed() >= claim_every {
            last_claim = Instant::now();
            for stream in &config.streams {
                let claimed = crate::claim_abandoned(
                    &mut redis,
                    stream,
                    &config.group,
                    &config.consumer,
                    config.claim_idle,
                )
                .await?;
                if claimed > 0 {
                    done.claimed += claimed;
                    // They are ours now: read our pending entries again.
                    from = "0";
                }
            }
        }
        let mut read_any = false;
        for stream in &config.streams {
            let entries = read(&mut redis, config, stream, from).await?;
            if entries.is_empty() {
                continue;
            }
            read_any = true;
            index_batch(
                &mut redis, postgres, &merge, config, stream, &entries, &mut done,
            )
            .await?;
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

/// A stream entry as the indexer needs it: its id and its `event` field.
struct Entry {
    id: String,
    event: Option<String>,
}

async fn read(
    redis: &mut ConnectionManager,
    config: &IndexConfig,
    stream: &str,
    from: &str,
) -> Result<Vec<Entry>, FleetError> {
    let options = StreamReadOptions::default()
        .group(&config.group, &config.consumer)
        .count(config.batch_size.max(1));
    // The reply is taken apart by hand: redis-rs's `StreamReadReply` copies every field into
    // a map of values per entry, a tenth of the indexer's time for what it then discards.
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg(&options)
        .arg("STREAMS")
        .arg(stream)
        .arg(from)
        .query_async(redis)
        .await?;
    let mut entries = Vec::new();
    for (_, ids) in pairs(reply) {
        for entry in items(ids) {
            let mut parts = items(entry).into_iter();
            let Some(id) = parts.next().and_then(text) else {
                continue;
            };
            let mut event = None;
            let mut fields = parts.next().map(items).unwrap_or_default().into_iter();
            while let (Some(field), Some(value)) = (fields.next(), fields.next()) {
                if text(field).as_deref() == Some("event") {
                    event = text(value);
                }
            }
            entries.push(Entry { id, event });
        }
    }
    Ok(entries)
}

/// The items of an array reply (none for anything else: nil when nothing was read).
fn items(value: redis::Value) -> Vec<redis::Value> {
    match value {
        redis::Value::Array(items) | redis::Value::Set(items) => items,
        _ => Vec::new(),
    }
}

/// `(key, value)` pairs of a RESP2 array of pairs or a RESP3 map.
fn pairs(value: redis::Value) -> Vec<(redis::Value, redis::Value)> {
    match value {
        redis::Value::Map(pairs) => pairs,
        other => items(other)
            .into_iter()
            .filter_map(|pair| {
                let mut pair = items(pair).into_iter();
                Some((pair.next()?, pair.next()?))
            })
            .collect(),
    }
}

/// A string reply's text (an entry that is not UTF-8 is unreadable, not a failure).
fn text(value: redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        redis::Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

/// One batch: one transaction, then XACK.
async fn index_batch(
    redis: &mut ConnectionManager,
    postgres: &mut tokio_postgres::Client,
    merge: &tokio_postgres::Statement,
    config: &IndexConfig,
    stream: &str,
    entries: &[Entry],
    done: &mut Indexed,
) -> Result<(), FleetError> {
    let mut batch = Batch::default();
    for entry in entries {
        let text = entry.event.as_deref();
        if let Some((row, repo)) = text.and_then(record_row) {
            batch.records.push(row);
            batch.repos.push(repo);
            continue;
        }
        match text.and_then(|text| serde_json::from_str::<StreamEvent>(text).ok()) {
            Some(event) => batch.add(event),
            None => {
                done.unreadable += 1;
                tracing::warn!(stream, id = %entry.id, "index.unreadable entry skipped");
            }
        }
    }
    let records = batch.records.len() as u64;
    let transaction = postgres.transaction().await?;
    batch.apply(&transaction, merge).await?;
    transaction.commit().await?;
    let ids: Vec<&str> = entries.iter().map(|entry| entry.id.as_str()).collect();
    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.cmd("XACK")
        .arg(stream)
        .arg(&config.group)
        .arg(&ids)
        .ignore();
    if config.delete_acked {
        pipe.cmd("XDEL").arg(stream).arg(&ids).ignore();
    }
    let () = pipe.query_async(redis).await?;
    done.entries += entries.len() as u64;
    done.records += records;
    Ok(())
}

/// A batch's events as rows for each table, applied in one transaction by [`Batch::apply`].
#[derive(Default)]
pub(crate) struct Batch {
    records: Vec<RecordRow>,
    /// Every event moves its repo's row to its rev (the newest wins, as for records).
    repos: Vec<(String, String, String)>,
    identities: Vec<(String, String, i64)>,
    snapshots: Vec<(String, String)>,
    accounts: Vec<(String, bool, Option<String>, i64)>,
    labels: LabelRows,
}

impl Batch {
    pub(crate) fn add(&mut self, event: StreamEvent) {
        match event {
            StreamEvent::Create {
                did,
                rev,
                commit,
                collection,
                rkey,
                cid,
                record,
                ..
            }
            | StreamEvent::Update {
                did,
                rev,
                commit,
                collection,
                rkey,
                cid,
                record,
                ..
            } => {
                self.repos.push((did.clone(), rev.clone(), commit));
                self.records.push(RecordRow {
                    uri: format!("at://{did}/{collection}/{rkey}"),
                    cid: Some(cid),
                    did,
                    collection,
                    rkey,
                    rev,
                    json: Some(Jsonb::from(record)),
                    deleted: false,
                });
            }
            StreamEvent::Delete {
                did,
                rev,
                commit,
                collection,
                rkey,
                ..
            } => {
                self.repos.push((did.clone(), rev.clone(), commit));
                self.records.push(RecordRow {
                    uri: format!("at://{did}/{collection}/{rkey}"),
                    cid: None,
                    did,
                    collection,
                    rkey,
                    rev,
                    json: None,
                    deleted: true,
                });
            }
            StreamEvent::Repo {
                did,
                rev,
                commit,
                complete,
                ..
            } => {
                if complete {
                    self.snapshots.push((did.clone(), rev.clone()));
                }
                self.repos.push((did, rev, commit));
            }
            StreamEvent::Identity {
                did, handle, seq, ..
            } => self.identities.push((did, handle, seq)),
            StreamEvent::Account {
                did,
                active,
                status,
                seq,
                ..
            } => self.accounts.push((did, active, status, seq)),
            StreamEvent::Label {
                seq,
                src,
                uri,
                cid,
                val,
                neg,
                cts,
                exp,
            } => {
                self.labels.src.push(src);
                self.labels.uri.push(nul_free(uri));
                self.labels.val.push(nul_free(val));
                self.labels.cid.push(cid.map(nul_free));
                self.labels.neg.push(neg);
                self.labels.cts.push(cts);
                self.labels.exp.push(exp);
                self.labels.seq.push(seq);
            }
        }
    }

    /// Writes the batch in `transaction` (which the caller commits); `merge` is
    /// [`merge_statement`] prepared on its connection, after `record_staging` exists.
    pub(crate) async fn apply(
        self,
        transaction: &tokio_postgres::Transaction<'_>,
        merge: &tokio_postgres::Statement,
    ) -> Result<(), FleetError> {
        if !self.records.is_empty() {
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
            for row in &self.records {
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
            transaction.execute(merge, &[]).await?;
        }
        if !self.repos.is_empty() {
            let (dids, revs, commits): (Vec<_>, Vec<_>, Vec<_>) = self.repos.into_iter().fold(
                (Vec::new(), Vec::new(), Vec::new()),
                |(mut dids, mut revs, mut commits), (did, rev, commit)| {
                    dids.push(did);
                    revs.push(rev);
                    commits.push(commit);
                    (dids, revs, commits)
                },
            );
            transaction
                .execute(
                    "INSERT INTO repo (did, rev, commit)
                     SELECT DISTINCT ON (did) did, rev, commit
                     FROM unnest($1::text[], $2::text[], $3::text[]) AS t(did, rev, commit)
                     ORDER BY did, rev COLLATE \"C\" DESC
                     ON CONFLICT (did) DO UPDATE SET rev = EXCLUDED.rev, commit = EXCLUDED.commit,
                         updated_at = now()
                     WHERE repo.rev < EXCLUDED.rev",
                    &[&dids, &revs, &commits],
                )
                .await?;
        }
        // Identity and account changes apply in firehose order (seq), whichever indexer sees
        // them first; a repo row they create has no rev yet ('').
        for (did, handle, seq) in &self.identities {
            transaction
                .execute(
                    "INSERT INTO repo (did, rev, handle, identity_seq) VALUES ($1, '', $2, $3)
                     ON CONFLICT (did) DO UPDATE SET handle = EXCLUDED.handle,
                         identity_seq = EXCLUDED.identity_seq, updated_at = now()
                     WHERE repo.identity_seq IS NULL OR repo.identity_seq < EXCLUDED.identity_seq",
                    &[did, handle, seq],
                )
                .await?;
        }
        for (did, active, status, seq) in &self.accounts {
            let changed = transaction
                .execute(
                    "INSERT INTO repo (did, rev, active, status, account_seq) VALUES ($1, '', $2, $3, $4)
                     ON CONFLICT (did) DO UPDATE SET active = EXCLUDED.active,
                         status = EXCLUDED.status, account_seq = EXCLUDED.account_seq,
                         updated_at = now()
                     WHERE repo.account_seq IS NULL OR repo.account_seq < EXCLUDED.account_seq",
                    &[did, active, status, seq],
                )
                .await?;
            if changed > 0 && !active && status.as_deref() == Some("deleted") {
                // A deleted account's records are gone: tombstones, as for a deleted record.
                tombstone(transaction, did, None).await?;
            }
        }
        for (did, rev) in &self.snapshots {
            sweep(transaction, did, rev).await?;
        }
        if !self.labels.src.is_empty() {
            // The newest per key in the batch, merged only over an older one: redelivery and
            // a replay in any order end in the same row.
            transaction
                .execute(
                    "INSERT INTO label (src, uri, val, cid, neg, cts, exp, seq)
                     SELECT DISTINCT ON (src, uri, val) src, uri, val, cid, neg, cts, exp, seq
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[],
                                 $6::text[], $7::text[], $8::int8[])
                         AS t(src, uri, val, cid, neg, cts, exp, seq)
                     ORDER BY src, uri, val, cts COLLATE \"C\" DESC, seq DESC
                     ON CONFLICT (src, uri, val) DO UPDATE SET cid = EXCLUDED.cid,
                         neg = EXCLUDED.neg, cts = EXCLUDED.cts, exp = EXCLUDED.exp,
                         seq = EXCLUDED.seq, indexed_at = now()
                     WHERE (label.cts, label.seq) < (EXCLUDED.cts, EXCLUDED.seq)",
                    &[
                        &self.labels.src,
                        &self.labels.uri,
                        &self.labels.val,
                        &self.labels.cid,
                        &self.labels.neg,
                        &self.labels.cts,
                        &self.labels.exp,
                        &self.labels.seq,
                    ],
                )
                .await?;
        }
        Ok(())
    }
}

/// The record with every U+0000 in its strings and keys replaced by U+FFFD: the data model
/// allows it, PostgreSQL's `jsonb` and `text` refuse it, and one such record must not stop
/// its batch (and every batch after it) from being indexed.
fn without_nul(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let clean = nul_free;
    match value {
        Value::String(text) => Value::String(clean(text)),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nul).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(key, value)| (clean(key), without_nul(value)))
                .collect(),
        ),
        other => other,
    }
}

/// `text` with every U+0000 replaced by U+FFFD (see [`without_nul`]).
fn nul_free(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{fffd}")
    } else {
        text
    }
}

/// A complete snapshot of `did` at `rev` was written: records the index holds at an older rev
/// were not in it, so they were deleted in commits this pipeline missed. They become
/// tombstones that keep their rev, so a row of the same snapshot indexed later (by another
/// indexer) still replaces one; rows older than `rev` are refused from now on.
async fn sweep(
    transaction: &tokio_postgres::Transaction<'_>,
    did: &str,
    rev: &str,
) -> Result<(), FleetError> {
    transaction
        .execute(
            "INSERT INTO repo (did, rev, snapshot_rev) VALUES ($1, $2, $2)
             ON CONFLICT (did) DO UPDATE SET snapshot_rev = EXCLUDED.snapshot_rev
             WHERE repo.snapshot_rev IS NULL OR repo.snapshot_rev < EXCLUDED.snapshot_rev",
            &[&did, &rev],
        )
        .await?;
    tombstone(transaction, did, Some(rev)).await
}

/// Marks `did`'s rows deleted in every table: all of them, or those older than `rev`.
async fn tombstone(
    transaction: &tokio_postgres::Transaction<'_>,
    did: &str,
    older_than: Option<&str>,
) -> Result<(), FleetError> {
    transaction
        .execute(tombstone_statement(), &[&did, &older_than])
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn create(record: serde_json::Value) -> StreamEvent {
        StreamEvent::Create {
            seq: -1,
            time: "2026-01-01T00:00:00.000Z".to_owned(),
            did: "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".to_owned(),
            commit: "bafycommit".to_owned(),
            rev: "3kaaaaaaaaa22".to_owned(),
            collection: "app.bsky.feed.post".to_owned(),
            rkey: "3kbbbbbbbbb22".to_owned(),
            cid: "bafyrecord".to_owned(),
            record,
        }
    }

    /// The hot path reads what [`StreamEvent`] reads: the same row, the record's JSON equal.
    #[test]
    fn the_record_view_reads_the_row_the_event_holds() -> TestResult {
        let record = serde_json::json!({
            "$type": "app.bsky.feed.post", "text": "héllo \"quoted\"", "langs": ["en"],
            "embed": {"images": [{"alt": "", "image": {"ref": {"$link": "bafyblob"}}}]},
        });
        let text = serde_json::to_string(&create(record.clone()))?;
        let (row, repo) = record_row(&text).ok_or("not read")?;
        assert_eq!(
            row.uri,
            "at://did:plc:aaaaaaaaaaaaaaaaaaaaaaaa/app.bsky.feed.post/3kbbbbbbbbb22"
        );
        assert_eq!(
            (row.cid.as_deref(), row.rev.as_str(), row.deleted),
            (Some("bafyrecord"), "3kaaaaaaaaa22", false)
        );
        let json = row.json.ok_or("no json")?;
        assert_eq!(serde_json::from_str::<serde_json::Value>(&json.0)?, record);
        assert_eq!(repo.2, "bafycommit");

        let delete = StreamEvent::Delete {
            seq: 7,
            time: "2026-01-01T00:00:00.000Z".to_owned(),
            did: "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".to_owned(),
            commit: "bafycommit".to_owned(),
            rev: "3kaaaaaaaaa22".to_owned(),
            collection: "app.bsky.feed.post".to_owned(),
            rkey: "3kbbbbbbbbb22".to_owned(),
        };
        let (row, _) = record_row(&serde_json::to_string(&delete)?).ok_or("not read")?;
        assert!(row.deleted && row.json.is_none() && row.cid.is_none());

        // Not a record event: left to StreamEvent.
        let identity = StreamEvent::Identity {
            seq: 8,
            time: "2026-01-01T00:00:00.000Z".to_owned(),
            did: "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".to_owned(),
            handle: "a.test".to_owned(),
        };
        assert!(record_row(&serde_json::to_string(&identity)?).is_none());
        Ok(())
    }

    #[test]
    fn a_record_with_escapes_goes_through_the_value_tree() -> TestResult {
        // U+0000, which PostgreSQL refuses, becomes U+FFFD, in values and in keys.
        let text = serde_json::to_string(&create(serde_json::json!({"a\u{0}": "b\u{0}c"})))?;
        let (row, _) = record_row(&text).ok_or("not read")?;
        let json = row.json.ok_or("no json")?;
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json.0)?,
            serde_json::json!({"a\u{fffd}": "b\u{fffd}c"})
        );
        // A lone surrogate cannot be stored: the entry is unreadable, not its batch's end.
        let text = text.replace("b\\u0000c", "\\ud800");
        assert!(text.contains("\\ud800"));
        assert!(record_row(&text).is_none());
        assert!(serde_json::from_str::<StreamEvent>(&text).is_err());
        Ok(())
    }
}
