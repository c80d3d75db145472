//! Delivery of the outbox to consumers: Tap's `/channel` semantics (acks, re-sends, per-repo
//! order) and webhooks, over the store's durable event log.
//!
//! # Brief overview
//!
//! One dispatcher task ([`Delivery::start`]) loads outbox events in id order, up to
//! [`DeliveryConfig::capacity`] at a time, and releases them under per-repo ordering rules
//! into one shared queue. Consumers ([`Consumer`], one per WebSocket) and webhook workers take
//! from that queue, so several sockets share the load as Tap's do. An event stays *in flight*
//! until it is acknowledged (an ack on any socket, a successful write in fire-and-forget mode,
//! a 2xx from the webhook); acknowledged events are deleted from the outbox in batches.
//!
//! # Better than Tap
//!
//! - An event whose socket drops is re-sent at once, not after the retry timeout; a failed
//!   write in fire-and-forget mode is re-sent rather than stuck in memory.
//! - Event ids are the store's: durable, never reused, even after the outbox was emptied.
//! - Events are made durable (fsync) before they leave the process, so an id a consumer has
//!   seen never names a different event after a power loss.
//! - Per-repo order holds for identity events and across snapshots too (see `schedule`).
//!
//! # Invariants
//!
//! - An event leaves the outbox only when acknowledged (or, for repo-state events when
//!   consumers did not ask for them, when loaded).
//! - No event is released while an earlier event of its repo that it may not overlap is in
//!   flight.

mod dispatch;
mod schedule;
mod tail;
mod webhook;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use atpdb_store::{Store, StoreError};
use bytes::Bytes;
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

pub use tail::{Retention, Tail, retain};
pub use webhook::{SIGNATURE_HEADER, WebhookConfig, sign};

/// What stops delivery (a consumer's failures never do).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A blocking store call could not run.
    #[error("delivery task: {0}")]
    Task(String),
    /// The webhook client could not be built.
    #[error("webhook client: {0}")]
    Webhook(String),
}

/// How events are acknowledged.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Tap's default (websocket-ack): an event is in flight until the client sends
    /// `{"type":"ack","id":N}` on any socket.
    Ack,
    /// Tap's `TAP_DISABLE_ACKS`: a successful write acknowledges.
    FireAndForget,
    /// Tap's `TAP_WEBHOOK_URL`: each event (or batch) is POSTed; any 2xx acknowledges.
    Webhook(WebhookConfig),
}

impl Mode {
    /// Tap's name of the mode.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Ack => "websocket-ack",
            Mode::FireAndForget => "fire-and-forget",
            Mode::Webhook(_) => "webhook",
        }
    }
}

/// How delivery runs.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// How events are acknowledged.
    pub mode: Mode,
    /// An event sent and not acknowledged this long is sent again (Tap's `retry-timeout`).
    pub retry_timeout: Duration,
    /// Outbox events held in memory at once (loaded, in flight or waiting); the rest wait on
    /// disk. Tap's `outbox-capacity`.
    pub capacity: usize,
    /// Deliver atpdb's repo-state events (`"type":"repo"`). Off by default: Tap's clients
    /// refuse unknown event types and would never acknowledge them.
    pub repo_events: bool,
    /// How long acknowledged ids wait to be deleted together.
    pub ack_flush: Duration,
    /// Events one socket may hold unacknowledged; 0: no limit (Tap's behaviour).
    ///
    /// `@atproto/tap` 0.3.x waits forever when its socket drops while it still holds events
    /// it has not acknowledged (the ack is buffered for a reconnect that its own blocked loop
    /// never makes; fixed upstream after 0.3.12). With a window of 1 it holds at most the
    /// event in its handler, so it survives a server crash; throughput is then one event a
    /// round trip.
    pub window: usize,
    /// At shutdown, how long to keep taking acks for events consumers hold (nothing new is
    /// sent meanwhile).
    pub drain: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            mode: Mode::Ack,
            retry_timeout: Duration::from_secs(60),
            capacity: 20_000,
            repo_events: false,
            ack_flush: Duration::from_millis(20),
            window: 0,
            drain: Duration::from_secs(3),
        }
    }
}

/// An event ready to go out: its id and Tap's JSON text.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The event id (what the consumer acknowledges).
    pub id: u64,
    /// The frame, Tap's JSON (UTF-8).
    pub frame: Bytes,
}

/// Messages to the dispatcher.
#[derive(Debug)]
enum Command {
    /// `conn` limits what it holds to the permits of `window`.
    Open { conn: u64, window: Arc<Semaphore> },
    /// `conn` took `id` from the queue and is about to write it.
    Taken { id: u64, conn: u64 },
    /// The consumer acknowledged `id`.
    Ack(u64),
    /// `conn` is gone; what it held goes out again.
    Closed(u64),
}

/// Counters for the API and metrics.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Events handed to a consumer or webhook (re-sends included).
    pub sent: AtomicU64,
    /// Events re-sent (socket dropped, timeout, failed webhook call).
    pub resent: AtomicU64,
    /// Events acknowledged.
    pub acked: AtomicU64,
    /// Events in memory (loaded and not acknowledged).
    pub loaded: AtomicU64,
    /// Events in flight (handed out, not acknowledged).
    pub in_flight: AtomicU64,
    /// Consumers connected now.
    pub consumers: AtomicU64,
    /// Webhook calls that failed (transport error or non-2xx).
    pub webhook_failures: AtomicU64,
}

struct Shared {
    mode: Mode,
    window: usize,
    commands: mpsc::UnboundedSender<Command>,
    queue: Arc<Mutex<mpsc::Receiver<Outgoing>>>,
    next_conn: AtomicU64,
    stats: Arc<DeliveryStats>,
}

/// A handle on running delivery. Cloning is cheap.
#[derive(Clone)]
pub struct Delivery {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("mode", &self.shared.mode.name())
            .finish_non_exhaustive()
    }
}

/// Room in the shared queue: a consumer holds at most this many events it has not begun to
/// write, so the rest stay free for other sockets and re-sends.
const QUEUE_DEPTH: usize = 256;

impl Delivery {
    /// Starts the dispatcher (and, in webhook mode, the webhook workers) on the current
    /// tokio runtime. They stop when `cancel` fires.
    ///
    /// # Errors
    ///
    /// [`DeliveryError::Webhook`] when the webhook client cannot be built.
    pub fn start(
        store: Store,
        config: DeliveryConfig,
        cancel: CancellationToken,
    ) -> Result<(Delivery, tokio::task::JoinHandle<Result<(), DeliveryError>>), DeliveryError> {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (queue_tx, queue_rx) = mpsc::channel(QUEUE_DEPTH);
        let stats = Arc::new(DeliveryStats::default());
        let shared = Arc::new(Shared {
            mode: config.mode.clone(),
            window: config.window,
            commands,
            queue: Arc::new(Mutex::new(queue_rx)),
            next_conn: AtomicU64::new(1),
            stats: stats.clone(),
        });
        let delivery = Delivery { shared };
        if let Mode::Webhook(webhook) = &config.mode {
            webhook::spawn(webhook.clone(), &delivery, cancel.clone())?;
        }
        let dispatcher = dispatch::Dispatcher::new(store, config, command_rx, queue_tx, stats);
        let task = tokio::spawn(dispatcher.run(cancel));
        Ok((delivery, task))
    }

    /// The acknowledgement mode.
    pub fn mode(&self) -> &Mode {
        &self.shared.mode
    }

    /// A consumer for one WebSocket; `None` in webhook mode (Tap refuses `/channel` then).
    pub fn consumer(&self) -> Option<Consumer> {
        let fire_and_forget = match self.shared.mode {
            Mode::Ack => false,
            Mode::FireAndForget => true,
            Mode::Webhook(_) => return None,
        };
        let mut consumer = self.worker(fire_and_forget);
        if self.shared.window > 0 {
            let window = Arc::new(Semaphore::new(self.shared.window));
            let _ = self.shared.commands.send(Command::Open {
                conn: consumer.conn,
                window: window.clone(),
            });
            consumer.window = Some(window);
        }
        Some(consumer)
    }

    fn worker(&self, fire_and_forget: bool) -> Consumer {
        self.shared.stats.consumers.fetch_add(1, Ordering::Relaxed);
        Consumer {
            conn: self.shared.next_conn.fetch_add(1, Ordering::Relaxed),
            fire_and_forget,
            window: None,
            shared: self.shared.clone(),
        }
    }

    /// Acknowledges `id`, from whichever socket the ack arrived on. Idempotent.
    pub fn ack(&self, id: u64) {
        let _ = self.shared.commands.send(Command::Ack(id));
    }

    /// Counters for the API and metrics.
    pub fn stats(&self) -> &DeliveryStats {
        &self.shared.stats
    }
}

/// One consumer's end of the shared queue (a WebSocket, or a webhook worker).
///
/// Dropping it hands every event it took and did not see acknowledged back for re-sending.
pub struct Consumer {
    conn: u64,
    fire_and_forget: bool,
    /// Slots for events held unacknowledged, when the window is limited.
    window: Option<Arc<Semaphore>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// The next event to write; `None` once delivery stopped. Cancel-safe: an event is only
    /// taken when this returns it.
    pub async fn next(&mut self) -> Option<Outgoing> {
        // A slot first: if this future is dropped before an event arrives, the guard gives
        // the slot back.
        let slot = match &self.window {
            Some(window) => Some(window.acquire().await.ok()?),
            None => None,
        };
        let outgoing = self.shared.queue.lock().await.recv().await?;
        if let Some(slot) = slot {
            // Held until the dispatcher sees the event acknowledged or handed back.
            slot.forget();
        }
        let _ = self.shared.commands.send(Command::Taken {
            id: outgoing.id,
            conn: self.conn,
        });
        Some(outgoing)
    }

    /// Takes up to `max` more events that are ready now, without waiting.
    pub fn try_next(&mut self, max: usize, into: &mut Vec<Outgoing>) {
        let Ok(mut queue) = self.shared.queue.try_lock() else {
            return;
        };
        while into.len() < max {
            let slot = match &self.window {
                Some(window) => match window.try_acquire() {
                    Ok(slot) => Some(slot),
                    Err(_) => break,
                },
                None => None,
            };
            let Ok(outgoing) = queue.try_recv() else {
                break;
            };
            if let Some(slot) = slot {
                slot.forget();
            }
            let _ = self.shared.commands.send(Command::Taken {
                id: outgoing.id,
                conn: self.conn,
            });
            into.push(outgoing);
        }
    }

    /// Reports that `id` was written to the consumer: in fire-and-forget mode that
    /// acknowledges it.
    pub fn written(&self, id: u64) {
        if self.fire_and_forget {
            let _ = self.shared.commands.send(Command::Ack(id));
        }
    }

    /// Acknowledges `id` (an ack that arrived on this consumer's socket).
    pub fn ack(&self, id: u64) {
        let _ = self.shared.commands.send(Command::Ack(id));
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.shared.stats.consumers.fetch_sub(1, Ordering::Relaxed);
        let _ = self.shared.commands.send(Command::Closed(self.conn));
    }
}

/// Runs a blocking store call off the async threads.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, DeliveryError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|err| DeliveryError::Task(err.to_string()))?
        .map_err(DeliveryError::from)
}
