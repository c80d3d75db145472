//! The dispatcher: one task that owns what is loaded, what is in flight and with whom.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use atpdb_store::{Event, Store};
use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::schedule::{Overlap, Scheduler};
use crate::{Command, DeliveryConfig, DeliveryError, DeliveryStats, Mode, Outgoing, blocking};

/// Events read from the store at once.
const PAGE: usize = 4096;
/// Acknowledged ids deleted together at most (sooner after `ack_flush`).
const DELETE_BATCH: usize = 4096;

/// What woke the dispatcher.
enum Wake {
    Stop,
    Command(Command),
    Room(mpsc::OwnedPermit<Outgoing>),
    Events,
    Tick,
}

/// An event handed out and not yet acknowledged.
struct InFlight {
    /// The consumer writing it; `None` while it sits in the shared queue.
    conn: Option<u64>,
    /// When it was taken (for the retry timeout).
    taken: Instant,
}

pub(crate) struct Dispatcher {
    store: Store,
    config: DeliveryConfig,
    commands: mpsc::UnboundedReceiver<Command>,
    queue: mpsc::Sender<Outgoing>,
    stats: Arc<DeliveryStats>,
    events: watch::Receiver<u64>,
    scheduler: Scheduler,
    /// The frames of loaded events.
    frames: HashMap<u64, Bytes>,
    in_flight: HashMap<u64, InFlight>,
    /// Events to send again, before anything new: ordered by id, so a repo's re-sent events
    /// go out in their order.
    resend: BTreeSet<u64>,
    /// Acknowledged before they were handed out (an ack from before a restart).
    acked_early: HashSet<u64>,
    /// The highest id loaded so far.
    loaded_to: u64,
    /// The highest id known durable (fsynced).
    persisted_to: u64,
    /// The windows of consumers that limit what they hold (see `DeliveryConfig::window`).
    windows: HashMap<u64, Arc<Semaphore>>,
    /// Acknowledged ids waiting to be deleted.
    to_delete: Vec<u64>,
    /// When `to_delete` was last flushed.
    flushed: Instant,
}

impl Dispatcher {
    pub(crate) fn new(
        store: Store,
        config: DeliveryConfig,
        commands: mpsc::UnboundedReceiver<Command>,
        queue: mpsc::Sender<Outgoing>,
        stats: Arc<DeliveryStats>,
    ) -> Dispatcher {
        let events = store.watch_events();
        Dispatcher {
            store,
            config,
            commands,
            queue,
            stats,
            events,
            scheduler: Scheduler::default(),
            frames: HashMap::new(),
            in_flight: HashMap::new(),
            resend: BTreeSet::new(),
            acked_early: HashSet::new(),
            windows: HashMap::new(),
            loaded_to: 0,
            persisted_to: 0,
            to_delete: Vec::new(),
            flushed: Instant::now(),
        }
    }

    pub(crate) async fn run(mut self, cancel: CancellationToken) -> Result<(), DeliveryError> {
        let times_out = !matches!(self.config.mode, Mode::Webhook(_));
        let tick_every = (self.config.retry_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1))
            .min(self.config.ack_flush.max(Duration::from_millis(1)));
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = self.scheduler.len() < self.config.capacity.max(1);
            if room && self.loaded_to < *self.events.borrow_and_update() {
                self.load().await?;
                continue;
            }
            let has_work = !self.resend.is_empty() || self.scheduler.has_ready();
            let wake = tokio::select! {
                biased;
                () = cancel.cancelled() => Wake::Stop,
                command = self.commands.recv() => command.map_or(Wake::Stop, Wake::Command),
                permit = self.queue.clone().reserve_owned(), if has_work => {
                    permit.map_or(Wake::Stop, Wake::Room)
                }
                changed = self.events.changed(), if room => {
                    if changed.is_err() { Wake::Stop } else { Wake::Events }
                }
                _ = tick.tick() => Wake::Tick,
            };
            match wake {
                Wake::Stop => break,
                Wake::Command(command) => {
                    self.handle(command);
                    // Drain what else arrived, so acks are not starved by sending.
                    for _ in 0..1024 {
                        match self.commands.try_recv() {
                            Ok(command) => self.handle(command),
                            Err(_) => break,
                        }
                    }
                }
                Wake::Room(permit) => {
                    if let Some(outgoing) = self.next_outgoing() {
                        permit.send(outgoing);
                        // Fill what else the queue has room for without another select.
                        while let Some(outgoing) = self.peek_outgoing() {
                            let Ok(permit) = self.queue.clone().try_reserve_owned() else {
                                break;
                            };
                            self.commit_outgoing(outgoing.id);
                            permit.send(outgoing);
                        }
                    }
                }
                Wake::Events => {}
                Wake::Tick => {
                    if times_out {
                        self.expire();
                    }
                }
            }
            if self.to_delete.len() >= DELETE_BATCH
                || (!self.to_delete.is_empty() && self.flushed.elapsed() >= self.config.ack_flush)
            {
                self.flush_deletes().await?;
            }
        }
        if cancel.is_cancelled() {
            self.drain().await;
        }
        self.flush_deletes().await
    }

    /// At shutdown, hands out nothing more but keeps taking acks for what consumers hold,
    /// up to `DeliveryConfig::drain`: a client that acknowledges what it has before the
    /// connection drops is not sent it again, and `@atproto/tap` 0.3.x, which hangs when its
    /// socket drops while it holds events, is left holding none.
    async fn drain(&mut self) {
        let deadline = Instant::now() + self.config.drain;
        // What consumers reported before the stop (takes, acks) first.
        while let Ok(command) = self.commands.try_recv() {
            self.handle(command);
        }
        while self.in_flight.values().any(|flight| flight.conn.is_some()) {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => return,
                },
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Reads the next page of the outbox, makes it durable, and schedules it.
    async fn load(&mut self) -> Result<(), DeliveryError> {
        let room = self.config.capacity.max(1) - self.scheduler.len();
        let after = self.loaded_to;
        let store = self.store.clone();
        let page = blocking(move || store.events_after(after, room.min(PAGE))).await?;
        let Some(&(last, _)) = page.last() else {
            // Everything up to the watched id was acknowledged and deleted meanwhile.
            self.loaded_to = *self.events.borrow();
            return Ok(());
        };
        if last > self.persisted_to {
            // Before an id leaves the process, make it durable, so it never names another
            // event after a power loss.
            let target = self.store.last_event_id();
            let store = self.store.clone();
            blocking(move || store.persist()).await?;
            self.persisted_to = target;
        }
        self.loaded_to = last;
        for (id, event) in page {
            let overlap = match &event {
                Event::Record(record) if !record.live => Overlap::Snapshot(record.rev.clone()),
                Event::RepoState(_) if !self.config.repo_events => {
                    self.to_delete.push(id);
                    continue;
                }
                _ => Overlap::Alone,
            };
            self.frames
                .insert(id, Bytes::from(event.to_tap_string(id).into_bytes()));
            self.scheduler.push(id, event.did(), overlap);
        }
        self.stats
            .loaded
            .store(self.scheduler.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The next event to hand out, without taking it.
    fn peek_outgoing(&mut self) -> Option<Outgoing> {
        loop {
            let id = match self.resend.first() {
                Some(&id) => id,
                None => {
                    let id = self.scheduler.pop_ready()?;
                    // Keep it at the head until it is committed.
                    self.resend.insert(id);
                    id
                }
            };
            if self.acked_early.remove(&id) {
                self.resend.remove(&id);
                self.complete(id);
                continue;
            }
            match self.frames.get(&id) {
                Some(frame) => {
                    return Some(Outgoing {
                        id,
                        frame: frame.clone(),
                    });
                }
                None => {
                    // Acknowledged while it waited to be re-sent.
                    self.resend.remove(&id);
                }
            }
        }
    }

    /// Records that the event from [`Dispatcher::peek_outgoing`] went into the queue.
    fn commit_outgoing(&mut self, id: u64) {
        self.resend.remove(&id);
        if self
            .in_flight
            .insert(
                id,
                InFlight {
                    conn: None,
                    taken: Instant::now(),
                },
            )
            .is_some()
        {
            self.stats.resent.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        self.stats
            .in_flight
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
    }

    fn next_outgoing(&mut self) -> Option<Outgoing> {
        let outgoing = self.peek_outgoing()?;
        self.commit_outgoing(outgoing.id);
        Some(outgoing)
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Open { conn, window } => {
                self.windows.insert(conn, window);
            }
            Command::Taken { id, conn } => match self.in_flight.get_mut(&id) {
                Some(flight) => {
                    let previous = flight.conn.replace(conn);
                    flight.taken = Instant::now();
                    self.release(previous);
                }
                // Acknowledged before this copy was written: the slot is free again.
                None => self.release(Some(conn)),
            },
            Command::Ack(id) => self.ack(id),
            Command::Closed(conn) => {
                self.windows.remove(&conn);
                let orphaned: Vec<u64> = self
                    .in_flight
                    .iter()
                    .filter(|(_, flight)| flight.conn == Some(conn))
                    .map(|(&id, _)| id)
                    .collect();
                for id in orphaned {
                    if let Some(flight) = self.in_flight.get_mut(&id) {
                        flight.conn = None;
                    }
                    self.resend.insert(id);
                }
            }
        }
    }

    fn ack(&mut self, id: u64) {
        if self.in_flight.contains_key(&id) || self.resend.contains(&id) {
            self.resend.remove(&id);
            self.complete(id);
        } else if self.scheduler.holds(id) {
            // Loaded but not yet released: the consumer has it from before a restart.
            self.acked_early.insert(id);
        } else if id > self.loaded_to && id <= self.store.last_event_id() {
            // Not loaded yet: the consumer has it from before a restart.
            self.to_delete.push(id);
        }
    }

    /// Forgets an acknowledged event and queues its deletion.
    fn complete(&mut self, id: u64) {
        if let Some(flight) = self.in_flight.remove(&id) {
            self.release(flight.conn);
        }
        self.frames.remove(&id);
        if self.scheduler.complete(id) {
            self.to_delete.push(id);
            self.stats.acked.fetch_add(1, Ordering::Relaxed);
        }
        self.stats
            .in_flight
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
        self.stats
            .loaded
            .store(self.scheduler.len() as u64, Ordering::Relaxed);
    }

    /// Queues for re-sending what a consumer took and has not acknowledged in time.
    fn expire(&mut self) {
        let now = Instant::now();
        let timeout = self.config.retry_timeout;
        let mut released = Vec::new();
        for (&id, flight) in &mut self.in_flight {
            if flight.conn.is_some() && now.duration_since(flight.taken) >= timeout {
                released.push(flight.conn.take());
                self.resend.insert(id);
            }
        }
        for conn in released {
            self.release(conn);
        }
    }

    /// Gives back a slot of `conn`'s window: it no longer holds one of its events.
    fn release(&self, conn: Option<u64>) {
        if let Some(window) = conn.and_then(|conn| self.windows.get(&conn)) {
            window.add_permits(1);
        }
    }

    async fn flush_deletes(&mut self) -> Result<(), DeliveryError> {
        self.flushed = Instant::now();
        if self.to_delete.is_empty() {
            return Ok(());
        }
        let ids = std::mem::take(&mut self.to_delete);
        let store = self.store.clone();
        blocking(move || store.delete_events(&ids)).await
    }
}
