//! `atpdb serve --redis URL` and `--postgres URL`: the engine's events into the fleet's
//! event stream (rsky's format, for `atpdb fleet index` or rsky's indexers) or straight into
//! the indexer's tables — so one machine's mirror feeds the same consumers a fleet does.
//!
//! A sink reads the outbox as `/stream` does (a [`Tail`] from its own cursor) and keeps
//! that cursor where it writes: in the MULTI that adds the entries, or in the transaction
//! that writes the rows. A crash between two writes neither repeats nor skips an event.
//! The outbox is what a sink reads, so events `/channel` acknowledged (and deleted) before
//! the sink read them are gone: run `serve` with `--retain-events` when a sink and
//! acknowledging consumers share it. A sink that finds such a gap says so (`sink.gap`).
//!
//! The engine's resyncs emit creates, updates and deletes as a diff, so no snapshot sweep
//! is needed: the rows follow the events. Its outbox keeps revs, not commit CIDs, so
//! `commit` is empty in what a sink writes.

use atpdb_deliver::Tail;
use atpdb_store::{Action, Event, Store};
use tokio_util::sync::CancellationToken;

use crate::index::{self, Batch};
use crate::{ConnectionManager, FleetError, RecordHead, StreamEvent, Written};

/// The fleet's events for one outbox event (`id` becomes `seq`): a record change, or an
/// identity change as `identity` plus `account`; repo sync states have no counterpart.
pub fn stream_events(id: u64, event: &Event) -> Vec<StreamEvent> {
    let seq = i64::try_from(id).unwrap_or(i64::MAX);
    let time = atpdb_repo::syntax::Datetime::from_unix_micros(event.time_us()).to_string();
    match event {
        Event::Record(change) => {
            let head = RecordHead {
                seq,
                time,
                did: change.did.to_string(),
                commit: String::new(),
                rev: change.rev.clone(),
                collection: change.collection.clone(),
                rkey: change.rkey.clone(),
            };
            let cid = change.cid.as_ref().map(ToString::to_string);
            let written = match (change.action, cid, change.record_json()) {
                (Action::Create, Some(cid), Some(record)) => Written::Created { cid, record },
                (Action::Update, Some(cid), Some(record)) => Written::Updated { cid, record },
                _ => Written::Deleted,
            };
            vec![head.event(written)]
        }
        Event::Identity(identity) => vec![
            StreamEvent::Identity {
                seq,
                time: time.clone(),
                did: identity.did.to_string(),
                handle: identity.handle.clone(),
            },
            StreamEvent::Account {
                seq,
                time,
                did: identity.did.to_string(),
                active: identity.is_active,
                status: (!identity.is_active).then(|| identity.status.clone()),
            },
        ],
        Event::RepoState(_) => Vec::new(),
    }
}

/// Where a sink writes.
pub enum Sink {
    /// XADD to a stream, with the cursor in a key beside it.
    Redis {
        /// The connection.
        redis: ConnectionManager,
        /// The stream (`firehose_live`).
        stream: String,
        /// Waits while the stream holds this many entries (its consumers are behind).
        high_water: u64,
    },
    /// The indexer's tables, with the cursor in `sink_cursor`.
    Postgres {
        /// The connection, with the indexer's schema and staging table.
        postgres: tokio_postgres::Client,
        /// [`index::merge_statement`], prepared.
        merge: tokio_postgres::Statement,
    },
}

impl Sink {
    /// A Redis sink.
    pub fn redis(redis: ConnectionManager, stream: String, high_water: u64) -> Sink {
        Sink::Redis {
            redis,
            stream,
            high_water,
        }
    }

    /// A PostgreSQL sink: connects, runs the indexer's migrations.
    ///
    /// # Errors
    ///
    /// [`FleetError::Postgres`] when the server refuses.
    pub async fn postgres(url: &str) -> Result<Sink, FleetError> {
        let mut postgres = index::connect(url).await?;
        let merge = index::prepare(&mut postgres).await?;
        Ok(Sink::Postgres { postgres, merge })
    }

    /// The id of the last outbox event written (0: none yet).
    async fn cursor(&mut self, name: &str) -> Result<u64, FleetError> {
        match self {
            Sink::Redis { redis, stream, .. } => {
                Ok(crate::read_seq(redis, &cursor_key(stream, name))
                    .await?
                    .unwrap_or(0))
            }
            Sink::Postgres { postgres, .. } => {
                let row = postgres
                    .query_opt("SELECT position FROM sink_cursor WHERE name = $1", &[&name])
                    .await?;
                Ok(row.map_or(0, |row| u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)))
            }
        }
    }

    /// Writes `events` and moves the cursor to `through`, atomically.
    async fn write(
        &mut self,
        name: &str,
        events: Vec<StreamEvent>,
        through: u64,
        shutdown: &CancellationToken,
    ) -> Result<(), FleetError> {
        match self {
            Sink::Redis {
                redis,
                stream,
                high_water,
            } => {
                crate::wait_below(redis, stream, *high_water, shutdown).await?;
                let mut pipe = redis::pipe();
                pipe.atomic();
                for event in &events {
                    let text = serde_json::to_string(event)
                        .map_err(|err| FleetError::Config(format!("an event: {err}")))?;
                    pipe.cmd("XADD")
                        .arg(&*stream)
                        .arg("*")
                        .arg("event")
                        .arg(text)
                        .ignore();
                }
                pipe.cmd("SET")
                    .arg(cursor_key(stream, name))
                    .arg(through)
                    .ignore();
                let () = pipe.query_async(redis).await?;
            }
            Sink::Postgres { postgres, merge } => {
                let mut batch = Batch::default();
                for event in events {
                    batch.add(event);
                }
                let position = i64::try_from(through).unwrap_or(i64::MAX);
                let transaction = postgres.transaction().await?;
                batch.apply(&transaction, merge).await?;
                transaction
                    .execute(
                        "INSERT INTO sink_cursor (name, position) VALUES ($1, $2)
                         ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position",
                        &[&name, &position],
                    )
                    .await?;
                transaction.commit().await?;
            }
        }
        Ok(())
    }
}

/// The key of a Redis sink's cursor: beside its stream, per named sink.
pub fn cursor_key(stream: &str, name: &str) -> String {
    format!("{stream}:cursor:{name}")
}

/// Writes every outbox event after the sink's cursor, then each new one, until `shutdown`;
/// returns how many outbox events it wrote. `name` tells sinks sharing a stream or a
/// database apart. `written` hears each position the sink has durably reached (its cursor
/// at the start, then after each write): a server whose consumers are its sinks
/// acknowledges the outbox from it.
///
/// # Errors
///
/// [`FleetError`] when Redis, PostgreSQL or the store fail; the sink resumes from its
/// cursor when run again.
pub async fn run(
    sink: &mut Sink,
    name: &str,
    store: Store,
    shutdown: &CancellationToken,
    written: &(dyn Fn(u64) + Sync),
) -> Result<u64, FleetError> {
    let after = sink.cursor(name).await?;
    written(after);
    let mut tail = Tail::new(store, after);
    let oldest = tail.oldest().await.map_err(outbox)?;
    if let Some(oldest) = oldest
        && oldest > after + 1
        && after > 0
    {
        tracing::error!(
            sink = name,
            after,
            oldest,
            "sink.gap: events after the cursor were deleted before the sink read them; \
             run serve with --retain-events"
        );
    }
    let mut count = 0;
    loop {
        let page = tokio::select! {
            () = shutdown.cancelled() => return Ok(count),
            page = tail.next() => page.map_err(outbox)?,
        };
        let Some(&(through, _)) = page.last() else {
            continue;
        };
        let events = page
            .iter()
            .flat_map(|(id, event)| stream_events(*id, event))
            .collect();
        sink.write(name, events, through, shutdown).await?;
        written(through);
        count += page.len() as u64;
    }
}

fn outbox(err: atpdb_deliver::DeliveryError) -> FleetError {
    FleetError::Outbox(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use atpdb_store::{IdentityEvent, RepoState, RepoStateEvent};

    #[test]
    fn an_identity_change_is_the_fleets_identity_and_account_events() -> Result<(), String> {
        let did: atpdb_repo::syntax::Did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
            .parse()
            .map_err(|err| format!("{err:?}"))?;
        let identity = |is_active: bool, status: &str| {
            Event::Identity(IdentityEvent {
                did: did.clone(),
                handle: "a.test".to_owned(),
                is_active,
                status: status.to_owned(),
                time_us: 1_700_000_000_000_000,
            })
        };
        let events = stream_events(42, &identity(false, "takendown"));
        let [
            StreamEvent::Identity {
                seq, handle, time, ..
            },
            StreamEvent::Account {
                seq: account_seq,
                active,
                status,
                ..
            },
        ] = events.as_slice()
        else {
            return Err(format!("{events:?}"));
        };
        assert_eq!((*seq, handle.as_str(), *account_seq), (42, "a.test", 42));
        assert_eq!(time, "2023-11-14T22:13:20.000Z");
        assert_eq!((*active, status.as_deref()), (false, Some("takendown")));
        // An active account has no status to give.
        match stream_events(43, &identity(true, "active")).as_slice() {
            [_, StreamEvent::Account { active, status, .. }] => {
                assert_eq!((*active, status.as_deref()), (true, None));
            }
            other => return Err(format!("{other:?}")),
        }
        let state = Event::RepoState(RepoStateEvent {
            did: did.clone(),
            state: RepoState::Synced,
            reason: None,
            time_us: 0,
        });
        assert!(stream_events(44, &state).is_empty());
        Ok(())
    }
}
