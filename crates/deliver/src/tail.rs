//! Reading events as a log from a position: what broadcast streams (`/stream`, the
//! Jetstream-compatible `/subscribe`) send, each client from its own cursor, without acks
//! and without deleting anything.
//!
//! With retention on ([`atpdb_store::Store::retain_events`]) the log keeps every event for
//! a window whatever delivery did with it; without, the outbox is what there is, and an
//! event acknowledged on `/channel` is gone.

use atpdb_store::{Event, Store};
use tokio::sync::watch;

use crate::{DeliveryError, blocking};

/// Events read from the store at once.
const PAGE: usize = 512;

/// A reader of the outbox from a position: every event after it, then each new one as it
/// is committed.
#[derive(Debug)]
pub struct Tail {
    store: Store,
    events: watch::Receiver<u64>,
    after: u64,
}

impl Tail {
    /// Starts after event `after` (0: from the oldest event the outbox still holds).
    pub fn new(store: Store, after: u64) -> Tail {
        let events = store.watch_events();
        Tail {
            store,
            events,
            after,
        }
    }

    /// Starts at the newest event: only what is committed from now on.
    pub fn live(store: Store) -> Tail {
        let after = store.last_event_id();
        Tail::new(store, after)
    }

    /// Starts at the first event at or after `time_us` (µs since the Unix epoch): Jetstream's
    /// time cursors. Ids follow commit order and times are taken just before commit, so a
    /// binary search over ids finds the place; the caller drops the few events around it
    /// whose times are out of step.
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn from_time(store: Store, time_us: u64) -> Result<Tail, DeliveryError> {
        let reader = store.clone();
        let after = blocking(move || {
            let first_at = |id: u64| -> atpdb_store::Result<Option<(u64, u64)>> {
                Ok(read(&reader, id, 1)?
                    .first()
                    .map(|(id, event)| (*id, event.time_us())))
            };
            // Find the last id whose event is older than `time_us`.
            let (mut low, mut high) = (0u64, reader.last_event_id());
            while low < high {
                let mid = low + (high - low).div_ceil(2);
                match first_at(mid - 1)? {
                    Some((id, time)) if time < time_us => low = id.max(mid),
                    _ => high = mid - 1,
                }
            }
            Ok(low)
        })
        .await?;
        Ok(Tail::new(store, after))
    }

    /// The id of the last event returned (the cursor to resume after).
    pub fn position(&self) -> u64 {
        self.after
    }

    /// The oldest event id the outbox still holds, if any: a cursor before it has lost
    /// events (acknowledged and deleted, or trimmed).
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn oldest(&self) -> Result<Option<u64>, DeliveryError> {
        let store = self.store.clone();
        let first = blocking(move || read(&store, 0, 1)).await?;
        Ok(first.first().map(|(id, _)| *id))
    }

    /// The next events, waiting until there is at least one. Cancel-safe.
    ///
    /// # Errors
    ///
    /// The store's; [`DeliveryError::Task`] when the store is gone.
    pub async fn next(&mut self) -> Result<Vec<(u64, Event)>, DeliveryError> {
        loop {
            let newest = *self.events.borrow_and_update();
            if newest > self.after {
                let store = self.store.clone();
                let after = self.after;
                let page = blocking(move || read(&store, after, PAGE)).await?;
                match page.last() {
                    Some(&(last, _)) => {
                        self.after = last;
                        return Ok(page);
                    }
                    // Everything up to `newest` was deleted meanwhile.
                    None => self.after = newest,
                }
            }
            self.events
                .changed()
                .await
                .map_err(|_| DeliveryError::Task("the store closed".to_owned()))?;
        }
    }
}

/// The log when events are retained, the outbox otherwise.
fn read(store: &Store, after: u64, limit: usize) -> atpdb_store::Result<Vec<(u64, Event)>> {
    if store.retains_events() {
        store.retained_after(after, limit)
    } else {
        store.events_after(after, limit)
    }
}

/// How long the log keeps events for broadcast streams.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// At most this many of the newest events.
    pub max_events: u64,
    /// None older than this.
    pub max_age: std::time::Duration,
}

/// Turns retention on in `store` and trims its log to `retention` every few seconds until
/// `cancel` fires.
pub fn retain(
    store: Store,
    retention: Retention,
    cancel: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Result<(), DeliveryError>> {
    /// Entries removed per store batch.
    const BUDGET: usize = 10_000;
    store.retain_events(true);
    tokio::spawn(async move {
        loop {
            loop {
                let now = atpdb_now_us();
                let min_time = now.saturating_sub(
                    u64::try_from(retention.max_age.as_micros()).unwrap_or(u64::MAX),
                );
                let trimmed = store.clone();
                let removed =
                    blocking(move || trimmed.trim_log(min_time, retention.max_events, BUDGET))
                        .await?;
                if removed < BUDGET as u64 {
                    break;
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            }
        }
    })
}

fn atpdb_now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
        })
}
