//! `atpdb fleet status`: what every stage is doing, read from Redis and PostgreSQL alone.
//!
//! rsky's operators could not tell whether the backfiller ran at all; here every figure an
//! operator needs to see that is in one place: each stream's length and each consumer
//! group's pending entries and lag, each consumer's pending entries and idle time (a dead
//! worker shows as a growing idle time with entries pending), the cursors, the parked
//! errors and the rows per table. The same figures render as Prometheus text for
//! `/metrics`.

use std::fmt::Write as _;

use redis::streams::{StreamInfoConsumersReply, StreamInfoGroupsReply};
use serde::Serialize;

use crate::{ConnectionManager, FleetError};

/// The streams and keys to report on.
#[derive(Debug, Clone)]
pub struct StatusConfig {
    /// Streams (their groups and consumers are found).
    pub streams: Vec<String>,
    /// Streams of parked entries.
    pub error_streams: Vec<String>,
    /// Patterns of cursor keys (`repo_backfill:cursor:*`).
    pub cursor_patterns: Vec<String>,
}

impl Default for StatusConfig {
    fn default() -> StatusConfig {
        StatusConfig {
            streams: vec![
                "repo_backfill".to_owned(),
                "firehose_backfill".to_owned(),
                "firehose_live".to_owned(),
                "label_live".to_owned(),
            ],
            error_streams: vec!["repo_backfill_errors".to_owned()],
            cursor_patterns: vec![
                "repo_backfill:cursor:*".to_owned(),
                "firehose_live:cursor:*".to_owned(),
                "label_live:cursor:*".to_owned(),
            ],
        }
    }
}

/// Everything [`collect`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetStatus {
    /// One per stream that exists.
    pub streams: Vec<StreamStatus>,
    /// Parked entries per errors stream.
    pub errors: Vec<(String, u64)>,
    /// Cursor keys and their values.
    pub cursors: Vec<(String, String)>,
    /// Rows per table (live rows, and tombstones where the table keeps them); empty without
    /// PostgreSQL.
    pub tables: Vec<TableStatus>,
}

/// One stream.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    /// Its key.
    pub stream: String,
    /// Entries in it (XLEN).
    pub length: u64,
    /// Its consumer groups.
    pub groups: Vec<GroupStatus>,
}

/// One consumer group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    /// Its name.
    pub group: String,
    /// Entries delivered and not acknowledged.
    pub pending: u64,
    /// Entries not yet delivered to the group (Redis ≥ 7); `None` when Redis cannot tell.
    pub lag: Option<u64>,
    /// The last entry delivered.
    pub last_delivered: String,
    /// Its consumers.
    pub consumers: Vec<ConsumerStatus>,
}

/// One consumer.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerStatus {
    /// Its name.
    pub consumer: String,
    /// Entries delivered to it and not acknowledged.
    pub pending: u64,
    /// Milliseconds since it last read.
    pub idle_ms: u64,
}

/// One table's rows.
#[derive(Debug, Clone, Serialize)]
pub struct TableStatus {
    /// The table.
    pub table: String,
    /// Rows that are not tombstones.
    pub rows: u64,
    /// Tombstones (deleted records kept so a late backfill cannot bring them back).
    pub deleted: u64,
}

/// Reads the figures.
///
/// # Errors
///
/// [`FleetError`] when Redis or PostgreSQL fail.
pub async fn collect(
    redis: &mut ConnectionManager,
    postgres: Option<&tokio_postgres::Client>,
    config: &StatusConfig,
) -> Result<FleetStatus, FleetError> {
    let mut status = FleetStatus::default();
    for stream in &config.streams {
        let exists: bool = redis::cmd("EXISTS").arg(stream).query_async(redis).await?;
        if !exists {
            continue;
        }
        let length: u64 = redis::cmd("XLEN").arg(stream).query_async(redis).await?;
        let groups: StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(redis)
            .await?;
        let mut group_status = Vec::new();
        for group in groups.groups {
            let consumers: StreamInfoConsumersReply = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(stream)
                .arg(&group.name)
                .query_async(redis)
                .await?;
            group_status.push(GroupStatus {
                pending: group.pending as u64,
                lag: group.lag.map(|lag| lag as u64),
                last_delivered: group.last_delivered_id,
                consumers: consumers
                    .consumers
                    .into_iter()
                    .map(|consumer| ConsumerStatus {
                        consumer: consumer.name,
                        pending: consumer.pending as u64,
                        idle_ms: consumer.idle as u64,
                    })
                    .collect(),
                group: group.name,
            });
        }
        status.streams.push(StreamStatus {
            stream: stream.clone(),
            length,
            groups: group_status,
        });
    }
    for stream in &config.error_streams {
        let length: u64 = redis::cmd("XLEN").arg(stream).query_async(redis).await?;
        status.errors.push((stream.clone(), length));
    }
    for pattern in &config.cursor_patterns {
        let mut keys = scan(redis, pattern).await?;
        keys.sort();
        for key in keys {
            let value: Option<String> = redis::cmd("GET").arg(&key).query_async(redis).await?;
            if let Some(value) = value {
                status.cursors.push((key, value));
            }
        }
    }
    if let Some(postgres) = postgres {
        // Labels keep negations as their tombstones.
        let tables = crate::index::tables()
            .map(|table| (table, "deleted"))
            .chain([("label", "neg")]);
        for (table, tombstone) in tables {
            let exists: bool = postgres
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
                .await?
                .get(0);
            if !exists {
                continue;
            }
            let row = postgres
                .query_one(
                    &format!(
                        "SELECT count(*) FILTER (WHERE NOT {tombstone}), \
                         count(*) FILTER (WHERE {tombstone}) FROM {table}"
                    ),
                    &[],
                )
                .await?;
            status.tables.push(TableStatus {
                table: table.trim_matches('"').to_owned(),
                rows: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
                deleted: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
            });
        }
    }
    Ok(status)
}

/// SCAN over `pattern` (never KEYS, which blocks a large Redis).
async fn scan(redis: &mut ConnectionManager, pattern: &str) -> Result<Vec<String>, FleetError> {
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

impl FleetStatus {
    /// The figures as Prometheus text (`/metrics`).
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let help = |out: &mut String, name: &str, kind: &str, text: &str| {
            let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}");
        };
        help(
            &mut out,
            "atpdb_fleet_stream_length",
            "gauge",
            "Entries in a stream.",
        );
        for stream in &self.streams {
            let _ = writeln!(
                out,
                "atpdb_fleet_stream_length{{stream=\"{}\"}} {}",
                label(&stream.stream),
                stream.length
            );
        }
        help(
            &mut out,
            "atpdb_fleet_group_pending",
            "gauge",
            "Entries delivered to a consumer group and not acknowledged.",
        );
        help(
            &mut out,
            "atpdb_fleet_group_lag",
            "gauge",
            "Entries not yet delivered to a consumer group.",
        );
        help(
            &mut out,
            "atpdb_fleet_consumer_pending",
            "gauge",
            "Entries pending on one consumer.",
        );
        help(
            &mut out,
            "atpdb_fleet_consumer_idle_seconds",
            "gauge",
            "Seconds since a consumer last read.",
        );
        for stream in &self.streams {
            for group in &stream.groups {
                let labels = format!(
                    "stream=\"{}\",group=\"{}\"",
                    label(&stream.stream),
                    label(&group.group)
                );
                let _ = writeln!(
                    out,
                    "atpdb_fleet_group_pending{{{labels}}} {}",
                    group.pending
                );
                if let Some(lag) = group.lag {
                    let _ = writeln!(out, "atpdb_fleet_group_lag{{{labels}}} {lag}");
                }
                for consumer in &group.consumers {
                    let labels = format!("{labels},consumer=\"{}\"", label(&consumer.consumer));
                    let _ = writeln!(
                        out,
                        "atpdb_fleet_consumer_pending{{{labels}}} {}",
                        consumer.pending
                    );
                    let _ = writeln!(
                        out,
                        "atpdb_fleet_consumer_idle_seconds{{{labels}}} {:.3}",
                        consumer.idle_ms as f64 / 1000.0
                    );
                }
            }
        }
        help(
            &mut out,
            "atpdb_fleet_parked",
            "gauge",
            "Entries parked in an errors stream.",
        );
        for (stream, length) in &self.errors {
            let _ = writeln!(
                out,
                "atpdb_fleet_parked{{stream=\"{}\"}} {length}",
                label(stream)
            );
        }
        help(
            &mut out,
            "atpdb_fleet_cursor",
            "gauge",
            "A numeric cursor (a firehose seq).",
        );
        for (key, value) in &self.cursors {
            if let Ok(value) = value.parse::<u64>() {
                let _ = writeln!(out, "atpdb_fleet_cursor{{key=\"{}\"}} {value}", label(key));
            }
        }
        help(
            &mut out,
            "atpdb_fleet_rows",
            "gauge",
            "Rows of an indexer table (state=live or deleted).",
        );
        for table in &self.tables {
            let name = label(&table.table);
            let _ = writeln!(
                out,
                "atpdb_fleet_rows{{table=\"{name}\",state=\"live\"}} {}",
                table.rows
            );
            let _ = writeln!(
                out,
                "atpdb_fleet_rows{{table=\"{name}\",state=\"deleted\"}} {}",
                table.deleted
            );
        }
        out
    }

    /// The figures for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for stream in &self.streams {
            let _ = writeln!(out, "{}: {} entries", stream.stream, stream.length);
            for group in &stream.groups {
                let lag = group
                    .lag
                    .map_or_else(|| "?".to_owned(), |lag| lag.to_string());
                let _ = writeln!(
                    out,
                    "  group {}: {} pending, {lag} not yet read, last {}",
                    group.group, group.pending, group.last_delivered
                );
                for consumer in &group.consumers {
                    let _ = writeln!(
                        out,
                        "    {}: {} pending, idle {:.1} s",
                        consumer.consumer,
                        consumer.pending,
                        consumer.idle_ms as f64 / 1000.0
                    );
                }
            }
        }
        for (stream, length) in &self.errors {
            let _ = writeln!(out, "{stream}: {length} parked");
        }
        for (key, value) in &self.cursors {
            let _ = writeln!(out, "{key} = {value}");
        }
        for table in &self.tables {
            let _ = writeln!(
                out,
                "table {}: {} rows, {} tombstones",
                table.table, table.rows, table.deleted
            );
        }
        out
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
