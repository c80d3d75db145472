//! The sync engine: a verified mirror of the repos in scope, kept current.
//!
//! # Brief overview
//!
//! An [`Engine`] owns the tasks that keep the store true to the network:
//!
//! - **resync workers** ([`backfill`]) claim repos that need a snapshot (pending, then
//!   desynchronized, then errored once their backoff passed), fetch `getRepo` from the
//!   account's PDS through the streaming verifier, diff it both ways against the stored records
//!   (creates, updates *and* deletes), and replay the live commits buffered meanwhile;
//! - the **firehose** ([`firehose`]) reads `subscribeRepos`, fans events out to workers by DID
//!   (one DID's events stay in order on one worker), checks every `#commit` with Sync 1.1 and
//!   chains it onto the stored rev and MST root;
//! - the **crawler** ([`crawler`]) enumerates repos in signal and full-network modes.
//!
//! # Invariants
//!
//! - Every state change is one store batch together with the events it produces.
//! - The firehose cursor saved is the processed low-water mark: never past an event whose
//!   effects are not committed.
//! - One DID is changed by one task at a time ([`locks`]).
//! - Nothing is stored that was not verified against the DID document's key.

pub mod backfill;
pub mod crawler;
pub mod firehose;
mod locks;
pub mod scope;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atpdb_identity::{Network, Resolver};
use atpdb_net::Xrpc;
use atpdb_repo::syntax::Did;
use atpdb_repo::verify::VerifyOptions;
use atpdb_store::{Event, RepoEntry, RepoState, RepoStateEvent, Store, StoreError};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use scope::{Filters, Mode, Pattern, PatternError, Scope};

/// What can stop the engine (per-repo problems are recorded on the repo, not returned).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The store failed; the engine cannot go on without it.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A task ended with a panic or was cancelled unexpectedly.
    #[error("engine task {task} ended: {reason}")]
    Task {
        /// Which task.
        task: &'static str,
        /// Why.
        reason: String,
    },
}

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The relay (or a single PDS): `subscribeRepos` and the crawler's listings.
    pub relay_url: String,
    /// Which repos are tracked.
    pub mode: Mode,
    /// Which records are kept and emitted.
    pub filters: Filters,
    /// Repos fetched at once.
    pub resync_parallelism: usize,
    /// Firehose workers (events fan out by DID).
    pub firehose_parallelism: usize,
    /// How far back the relay replays; an older cursor means catching up by resync instead.
    pub replay_window: Duration,
    /// First retry delay after a failed resync; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How a fetched repo is verified (memory budget, spill directory, limits).
    pub verify: VerifyOptions,
    /// Follow the firehose (off: only backfill, e.g. outbox-only tests).
    pub follow_firehose: bool,
    /// How long an idle resync worker waits before looking for work again.
    pub idle_poll: Duration,
    /// How often the crawler enumerates again after finishing.
    pub crawl_interval: Duration,
    /// How often the firehose cursor is saved.
    pub cursor_interval: Duration,
    /// Events the outbox may hold undelivered before intake (firehose, backfill) pauses
    /// until consumers catch up; 0: no limit. Nothing is dropped either way: this bounds the
    /// disk a consumer that stays away can cost.
    pub outbox_limit: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            relay_url: "https://relay1.us-east.bsky.network".to_owned(),
            mode: Mode::Manual,
            filters: Filters::all(),
            resync_parallelism: 5,
            firehose_parallelism: 10,
            replay_window: Duration::from_secs(72 * 3600),
            backoff_min: Duration::from_secs(60),
            backoff_max: Duration::from_secs(3600),
            verify: VerifyOptions::default(),
            follow_firehose: true,
            idle_poll: Duration::from_secs(1),
            crawl_interval: Duration::from_secs(24 * 3600),
            cursor_interval: Duration::from_secs(1),
            outbox_limit: 1_000_000,
        }
    }
}

/// The engine's running tasks; each ends with its name and how it ended.
pub type EngineTasks = JoinSet<(&'static str, Result<(), SyncError>)>;

/// Counters the API and metrics read.
#[derive(Debug, Default)]
pub struct Counters {
    /// Firehose events received.
    pub events_in: AtomicU64,
    /// `#commit`s applied.
    pub commits_applied: AtomicU64,
    /// `#commit`s applied without `prevData` (unproven).
    pub commits_unproven: AtomicU64,
    /// Events dropped as stale or duplicate revs.
    pub commits_stale: AtomicU64,
    /// Events that failed verification (bad blocks, ops, signature).
    pub commits_invalid: AtomicU64,
    /// Frames that did not decode.
    pub frames_invalid: AtomicU64,
    /// Repos that became desynchronized.
    pub desyncs: AtomicU64,
    /// Resyncs finished.
    pub resyncs_done: AtomicU64,
    /// Resyncs failed.
    pub resyncs_failed: AtomicU64,
    /// Records written by resyncs.
    pub backfill_records: AtomicU64,
    /// Catch-ups applied from `getRepo?since=` (only what changed was fetched).
    pub resyncs_since: AtomicU64,
    /// `getRepo?since=` catch-ups that could not be proven and fell back to a whole snapshot.
    pub resyncs_since_fallback: AtomicU64,
    /// The firehose low-water mark (the cursor a restart resumes from).
    pub firehose_cursor: AtomicU64,
    /// Tasks paused now because the outbox is full (`EngineConfig::outbox_limit`).
    pub intake_paused: AtomicU64,
    /// Time intake spent paused for a full outbox, in microseconds.
    pub intake_paused_us: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Unix time in microseconds.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
        })
}

/// The engine: cheap to clone; every clone drives the same tasks.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: EngineConfig,
    pub(crate) store: Store,
    pub(crate) identity: Resolver,
    pub(crate) xrpc: Xrpc,
    pub(crate) http: atpdb_net::Http,
    pub(crate) locks: locks::DidLocks,
    pub(crate) shutdown: CancellationToken,
    /// The scope now: the configuration's, or the last `set_scope` (stored, so it outlives a
    /// restart).
    scope: std::sync::RwLock<Arc<Scope>>,
    /// Wakes the crawler when the scope changed.
    pub(crate) scope_changed: Notify,
    /// When the filters last widened (µs): a repo last synced before then lacks records
    /// they now keep, so its resync fetches the snapshot even if its rev did not move.
    /// Derived from the stored `scope` runs, so it survives a restart.
    pub(crate) widened_us: AtomicU64,
    /// Wakes idle resync workers when repos become claimable.
    pub(crate) work: Notify,
    pub(crate) claims: backfill::Claims,
    pub(crate) counters: Counters,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("relay_url", &self.inner.config.relay_url)
            .field("mode", &self.inner.scope().mode)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine over `store`, reaching hosts through `network`'s clients (which it shares
    /// with its caller: the server resolves handles and DIDs with the same cache); nothing
    /// runs until [`Engine::start`].
    pub fn new(config: EngineConfig, store: Store, network: Network) -> Engine {
        let Network {
            http,
            resolver: identity,
            xrpc,
        } = network;
        let mut scope = Scope {
            mode: config.mode.clone(),
            filters: config.filters.clone(),
        };
        match store.config(SCOPE_KEY) {
            Ok(Some(stored)) => match scope.updated(&stored) {
                Ok(stored) => {
                    tracing::warn!(
                        scope = %stored.to_json(),
                        "config.scope_from_store: a runtime change (PUT /config) overrides the flags"
                    );
                    scope = stored;
                }
                Err(reason) => tracing::warn!(%reason, "config.stored_scope_ignored"),
            },
            Ok(None) => {}
            Err(err) => tracing::warn!(%err, "config.stored_scope_unreadable"),
        }
        let widened_us = store
            .runs()
            .map(|runs| {
                runs.iter()
                    .filter(|run| run.kind == SCOPE_RUN)
                    .map(|run| run.started_us)
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        Engine {
            inner: Arc::new(Inner {
                config,
                scope: std::sync::RwLock::new(Arc::new(scope)),
                scope_changed: Notify::new(),
                widened_us: AtomicU64::new(widened_us),
                store,
                identity,
                xrpc,
                http,
                locks: locks::DidLocks::new(),
                shutdown: CancellationToken::new(),
                work: Notify::new(),
                claims: backfill::Claims::default(),
                counters: Counters::default(),
            }),
        }
    }

    /// Starts every task; they run until [`Engine::shutdown`]. The returned set ends when
    /// they all have; a task that ends early is an error the caller should report.
    ///
    /// # Errors
    ///
    /// A store failure while recovering from a previous run.
    pub fn start(&self) -> Result<EngineTasks, SyncError> {
        backfill::recover(&self.inner)?;
        let mut tasks = JoinSet::new();
        for _ in 0..self.inner.config.resync_parallelism.max(1) {
            let inner = self.inner.clone();
            tasks.spawn(async move { ("resync worker", backfill::run_worker(inner).await) });
        }
        if self.inner.config.follow_firehose {
            let inner = self.inner.clone();
            tasks.spawn(async move { ("firehose", firehose::run(inner).await) });
        }
        {
            let inner = self.inner.clone();
            tasks.spawn(async move { ("backfill runs", backfill::track_runs(inner).await) });
        }
        {
            // Always running: a runtime scope change can turn a manual engine into one that
            // crawls; in manual mode it waits for such a change.
            let inner = self.inner.clone();
            tasks.spawn(async move { ("crawler", crawler::run(inner).await) });
        }
        Ok(tasks)
    }

    /// Asks every task to stop; they finish the event in hand first.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Fires when shutdown is asked for: tasks beside the engine (delivery) stop with it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Whether shutdown was asked for.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// The store the engine writes.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The identity resolver the engine uses.
    pub fn identity(&self) -> &Resolver {
        &self.inner.identity
    }

    /// What the engine tracks and keeps now.
    pub fn scope(&self) -> Arc<Scope> {
        self.inner.scope()
    }

    /// Changes what the engine tracks and keeps, at once and for later runs (stored in the
    /// store's config). A change that keeps records the old filters did not resyncs every
    /// synced repo, recorded as a `scope` backfill run; returns how many repos that marked.
    /// A narrower filter stops storing and emitting what it excludes from the next event on;
    /// records already stored are left as they are.
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn set_scope(&self, scope: Scope) -> Result<u64, SyncError> {
        let before = self.inner.scope();
        let mut batch = self.inner.store.batch();
        batch.set_config(SCOPE_KEY, &scope.to_json());
        batch.commit()?;
        let widens = scope.widens(&before);
        tracing::info!(scope = %scope.to_json(), widens, "config.scope_changed");
        *self
            .inner
            .scope
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(scope);
        if !widens {
            self.inner.scope_changed.notify_waiters();
            return Ok(0);
        }
        let started_us = now_us();
        self.inner.widened_us.store(started_us, Ordering::Relaxed);
        // Synced repos, and those mid-snapshot (fetched under the old filters: marking them
        // makes their snapshot end without being taken, and a new one start).
        let mut marked = 0;
        for state in [RepoState::Synced, RepoState::Syncing] {
            let mut after: Option<Did> = None;
            loop {
                let page = self
                    .inner
                    .store
                    .repos_in_state_after(state, after.as_ref(), 1000)?;
                let Some(last) = page.last() else { break };
                after = Some(last.did.clone());
                for listed in page {
                    let _guard = self.inner.locks.lock(&listed.did).await;
                    let Some(mut entry) = self.inner.store.repo(&listed.did)? else {
                        continue;
                    };
                    if !matches!(entry.state, RepoState::Synced | RepoState::Syncing) {
                        continue;
                    }
                    entry.state = RepoState::Desynchronized;
                    entry.retry_after_us = 0;
                    let mut batch = self.inner.store.batch();
                    batch.put_repo(&entry);
                    batch.commit()?;
                    marked += 1;
                }
            }
        }
        let mut batch = self.inner.store.batch();
        batch.put_run(&atpdb_store::BackfillRun {
            id: 0,
            kind: SCOPE_RUN.to_owned(),
            started_us,
            total: marked,
            ..atpdb_store::BackfillRun::default()
        });
        batch.commit()?;
        tracing::warn!(
            repos = marked,
            "backfill.decision: the collection filters keep more; resyncing every synced repo"
        );
        // Only now the crawler: repos it finds under the new scope are fetched with it, and
        // are not among those marked (or counted) for a second snapshot.
        self.inner.scope_changed.notify_waiters();
        self.inner.work.notify_waiters();
        Ok(marked)
    }

    /// The XRPC client (its per-host counters feed `/metrics`).
    pub fn xrpc(&self) -> &Xrpc {
        &self.inner.xrpc
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Live counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Applies one firehose message exactly as a firehose worker does (verification, chain,
    /// store, outbox), without the reader or the cursor: for replaying recorded frames in
    /// benchmarks and tests. Calls for one DID must not run concurrently out of order.
    ///
    /// # Errors
    ///
    /// The store's; per-repo problems are recorded on the repo.
    pub async fn process(&self, message: atpdb_repo::firehose::Message) -> Result<(), SyncError> {
        firehose::process(&self.inner, message).await?;
        Ok(())
    }

    /// Tracks `dids` (an already tracked repo is left as it is); returns how many were new.
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn add_repos(&self, dids: &[Did]) -> Result<usize, SyncError> {
        let mut added = 0;
        for did in dids {
            let _guard = self.inner.locks.lock(did).await;
            if self.inner.store.repo(did)?.is_some() {
                continue;
            }
            let mut batch = self.inner.store.batch();
            batch.put_repo(&RepoEntry::new(did.clone(), now_us()));
            batch.commit()?;
            added += 1;
        }
        if added > 0 {
            self.inner.work.notify_waiters();
        }
        Ok(added)
    }

    /// Stops tracking `dids` and forgets their records (events already in the outbox stay).
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn remove_repos(&self, dids: &[Did]) -> Result<usize, SyncError> {
        let mut removed = 0;
        for did in dids {
            let _guard = self.inner.locks.lock(did).await;
            if self.inner.store.repo(did)?.is_none() {
                continue;
            }
            let mut batch = self.inner.store.batch();
            batch.delete_repo(did);
            batch.commit()?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Marks repos for a fresh snapshot (e.g. `POST /repos/resync`); returns how many.
    ///
    /// # Errors
    ///
    /// The store's.
    pub async fn resync(&self, dids: &[Did]) -> Result<usize, SyncError> {
        let mut marked = 0;
        for did in dids {
            let _guard = self.inner.locks.lock(did).await;
            let Some(mut entry) = self.inner.store.repo(did)? else {
                continue;
            };
            if entry.state == RepoState::Syncing {
                continue;
            }
            entry.state = RepoState::Desynchronized;
            entry.retry_after_us = 0;
            let mut batch = self.inner.store.batch();
            batch.put_repo(&entry);
            batch.commit()?;
            marked += 1;
        }
        if marked > 0 {
            self.inner.work.notify_waiters();
        }
        Ok(marked)
    }
}

/// The store's config key for a scope set at runtime.
const SCOPE_KEY: &str = "scope";

/// The kind of backfill run a widening scope change records.
const SCOPE_RUN: &str = "scope";

impl Inner {
    /// Waits while the outbox holds `outbox_limit` events or more: intake slows to what
    /// consumers take instead of dropping anything. Returns at once when there is room.
    pub(crate) async fn outbox_room(&self) {
        let limit = self.config.outbox_limit;
        if limit == 0 || self.store.outbox_len() < limit {
            return;
        }
        let started = std::time::Instant::now();
        if self.counters.intake_paused.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                outbox = self.store.outbox_len(),
                limit,
                "intake.paused: the outbox is full; waiting for consumers to acknowledge"
            );
        }
        while self.store.outbox_len() >= limit && !self.shutdown.is_cancelled() {
            tokio::select! {
                () = self.shutdown.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        self.counters.intake_paused.fetch_sub(1, Ordering::Relaxed);
        self.counters.intake_paused_us.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The scope now (cheap: an `Arc` clone under a read lock).
    pub(crate) fn scope(&self) -> Arc<Scope> {
        self.scope
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Moves a repo to `state` with `reason`, recording it and emitting a repo-state event in
    /// the same batch. Callers hold the DID's lock.
    pub(crate) fn set_state(
        &self,
        mut entry: RepoEntry,
        state: RepoState,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        entry.state = state;
        entry.error = reason.clone();
        let mut batch = self.store.batch();
        batch.put_repo(&entry);
        batch.push(Event::RepoState(RepoStateEvent {
            did: entry.did.clone(),
            state,
            reason,
            time_us: now_us(),
        }));
        batch.commit()?;
        Ok(())
    }
}
