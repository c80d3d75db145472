//! Reading the outbox as a log from a position: what broadcast streams (`/stream`, the
//! Jetstream-compatible `/subscribe`) send, each client from its own cursor, without acks
//! and without deleting anything.

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
        let first = blocking(move || store.events_after(0, 1)).await?;
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
                let page = blocking(move || store.events_after(after, PAGE)).await?;
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
