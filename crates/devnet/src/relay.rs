//! The relay: subscribes to every PDS host, verifies what they publish, and re-sequences the
//! accepted events into one firehose of its own, as a Sync 1.1 relay does.
//!
//! # What it checks
//!
//! Each DID's document comes from the PLC directory over HTTP, through atpdb's own
//! [`atpdb_identity::Resolver`], so PLC faults reach the relay too. Its `#atproto` key and
//! `#atproto_pds` endpoint are cached until an `#identity` event refreshes them. Then, per
//! event:
//!
//! - `#commit`, `#sync` and `#account` from a host that is not the DID's current PDS are
//!   ignored, so that after a migration the old host is no longer heard;
//! - every `#commit` is verified (signature, then inversion of its operations against
//!   `prevData`) and dropped if invalid; a signature failure first re-resolves the DID once, in
//!   case the key rotated. Commits without `prevData` cannot be proven and pass as "unproven";
//! - a `#commit` or `#sync` whose rev is not newer than the relay's is a replay and is dropped;
//!   a commit that does not chain on (`since` is not the stored rev) passes and moves the
//!   relay's state on, as the real relay does: it never resyncs itself;
//! - commits of accounts the upstream reported inactive are dropped.
//!
//! Accepted events get the relay's own seq. `#identity` goes out without `handle` and
//! `#account` carries the upstream status, both as the real relay sends them.
//!
//! # Faults
//!
//! The relay's own [`Faults`] break its hop only: the firehose flags (duplicated, reordered or
//! cut frames) act on its subscribers, the `#commit` flags (bad signature, corrupt blocks,
//! missing `prevData` or proof nodes) on the commits it forwards, after it verified them; the
//! admin API (`/admin/faults`, `/admin/sequencer/{jump,trim}`, `/admin/stats`) switches them
//! while it runs.
//!
//! # Not modelled
//!
//! Takedowns and throttling at the relay, rate limits per host, and `requestCrawl`: the hosts
//! are fixed when the relay starts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use atpdb_identity::{Identity, IdentityConfig, IdentityError, Resolver};
use atpdb_net::{Firehose, FirehoseConfig, FirehoseEvent};
use atpdb_repo::Cid;
use atpdb_repo::car::{CarLimits, CarReader};
use atpdb_repo::firehose::{
    self, AccountEvent, Chain, CommitEvent, CommitProof, IdentityEvent, Message, RepoHead,
    SyncEvent,
};
use atpdb_repo::repo::CommitData;
use atpdb_repo::syntax::{Did, Nsid, Tid};
use axum::Json;
use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};
use tokio_util::sync::CancellationToken;

use crate::faults::{EventFaults, FaultSet, Faults};
use crate::sequencer::Sequencer;
use crate::subscribe::SubscribeOptions;
use crate::xrpc::{Params, XrpcError, XrpcResult, limit, parse};

/// How the relay behaves.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Events kept for cursor replay.
    pub replay_window: usize,
    /// A live subscriber this many events behind the head gets `ConsumerTooSlow`.
    pub max_lag: u64,
    /// A subscriber whose socket takes nothing for this long is dropped.
    pub send_timeout: Duration,
    /// The relay's faults at start; they can be switched later through `/admin/faults`.
    pub faults: FaultSet,
    /// The seq of the relay's first event. Real relays' seqs are unrelated to any PDS's, and
    /// a large value here catches consumers that mix the two up.
    pub first_seq: u64,
    /// Password for the admin API (user `admin`, HTTP Basic).
    pub admin_password: String,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            replay_window: 1_000_000,
            max_lag: 100_000,
            send_timeout: Duration::from_secs(30),
            faults: FaultSet::default(),
            first_seq: 1,
            admin_password: "admin".to_owned(),
        }
    }
}

/// Counters of what the relay took in and what it did with it, for tests that check a fault
/// was noticed rather than only that nothing came out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Frames received from all hosts, valid or not.
    pub frames: u64,
    /// Frames that did not decode, and were dropped.
    pub invalid_frames: u64,
    /// Events dropped because their upstream seq had already been taken in.
    pub duplicate_seqs: u64,
    /// `#commit`s dropped because the signature or the inversion failed.
    pub invalid_commits: u64,
    /// `#sync`s dropped because their commit did not verify.
    pub invalid_syncs: u64,
    /// `#commit`s passed on without `prevData`, so without an inversion proof.
    pub unproven_commits: u64,
    /// `#commit`s passed on whose `since` was not the rev the relay had.
    pub discontinuous_commits: u64,
    /// `#commit`s and `#sync`s dropped because their rev was not newer than the relay's.
    pub stale_revs: u64,
    /// Events dropped because they came from a host that is not the DID's current PDS.
    pub foreign_host: u64,
    /// `#commit`s and `#sync`s dropped because the upstream reported the account inactive.
    pub inactive: u64,
    /// Events dropped because the DID has no usable identity (unknown, tombstoned, no key).
    pub no_identity: u64,
    /// Events dropped because the PLC directory could not be reached.
    pub unresolved: u64,
    /// Events the relay sequenced and serves.
    pub forwarded: u64,
}

/// A running relay; clones share it.
///
/// The subscriber tasks hold clones too, so they run until the shutdown token is cancelled.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("url", &self.inner.url)
            .field("hosts", &self.inner.hosts.len())
            .finish_non_exhaustive()
    }
}

/// Reconnection backoff bounds: quick enough for a test, gentle on a host that is down.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A host that does not complete the WebSocket handshake in this long is retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstream seqs remembered per host to drop duplicates while still taking reordered events.
const SEEN_WINDOW: u64 = 4096;
/// Longest pause between lookups while the directory cannot be reached.
const RESOLVE_RETRY_MAX: Duration = Duration::from_secs(2);
/// How long one PLC lookup may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

struct Inner {
    url: String,
    hosts: Vec<Host>,
    sequencer: Arc<Sequencer>,
    subscribe: SubscribeOptions,
    faults: Faults,
    shutdown: CancellationToken,
    admin_password: String,
    /// The one guarded HTTP client (loopback allowed) for upstream firehoses and the PLC, or
    /// why it could not be built.
    http: Result<atpdb_net::Http, String>,
    /// The identity resolver, or why it could not be built (then every lookup fails).
    identities: Result<Resolver, String>,
    state: Mutex<Accounts>,
    counters: Counters,
}

/// One upstream PDS.
struct Host {
    url: String,
    /// `host:port`, as `listHosts` names it.
    hostname: String,
    /// The newest upstream seq processed.
    cursor: AtomicU64,
}

#[derive(Default)]
struct Counters {
    frames: AtomicU64,
    invalid_frames: AtomicU64,
    duplicate_seqs: AtomicU64,
    invalid_commits: AtomicU64,
    invalid_syncs: AtomicU64,
    unproven_commits: AtomicU64,
    discontinuous_commits: AtomicU64,
    stale_revs: AtomicU64,
    foreign_host: AtomicU64,
    inactive: AtomicU64,
    no_identity: AtomicU64,
    unresolved: AtomicU64,
    forwarded: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What the relay knows of one account.
#[derive(Debug, Clone)]
struct Repo {
    /// The relay's number for it (see `Accounts::by_uid`).
    uid: u64,
    /// Index of the host the relay last accepted an event for it from.
    host: usize,
    rev: Option<Tid>,
    head: Option<Cid>,
    data: Option<Cid>,
    active: bool,
    status: Option<String>,
}

impl Repo {
    fn new(host: usize) -> Repo {
        Repo {
            uid: 0,
            host,
            rev: None,
            head: None,
            data: None,
            active: true,
            status: None,
        }
    }

    fn is_newer(&self, rev: &Tid) -> bool {
        self.rev.as_ref().is_none_or(|stored| rev > stored)
    }
}

#[derive(Debug, Default)]
struct Accounts {
    /// By DID.
    repos: BTreeMap<Did, Repo>,
    /// Each repo's number, in the order the relay first saw them: `listRepos`'s order, and
    /// its cursor (the last number listed), as on Bluesky's relay, whose numeric cursors a
    /// client can skip past when the relay keeps failing at one.
    by_uid: BTreeMap<u64, Did>,
    /// Collection NSID → DIDs that ever wrote to it.
    collections: BTreeMap<String, BTreeSet<Did>>,
}

impl Accounts {
    /// The repo of `did`, first seen on host `index` if it is new (it gets the next uid).
    fn repo_mut(&mut self, did: &Did, index: usize) -> &mut Repo {
        let next_uid = self.by_uid.len() as u64 + 1;
        let by_uid = &mut self.by_uid;
        self.repos.entry(did.clone()).or_insert_with(|| {
            by_uid.insert(next_uid, did.clone());
            Repo {
                uid: next_uid,
                ..Repo::new(index)
            }
        })
    }
}

/// Upstream seqs taken in from one host.
#[derive(Debug, Default)]
struct SeenSeqs {
    max: u64,
    recent: BTreeSet<u64>,
}

impl SeenSeqs {
    /// Whether `seq` is new: duplicates are refused, reordered events are not.
    fn admit(&mut self, seq: u64) -> bool {
        if self.recent.contains(&seq) || seq.saturating_add(SEEN_WINDOW) <= self.max {
            return false;
        }
        self.recent.insert(seq);
        self.max = self.max.max(seq);
        let floor = self.max.saturating_sub(SEEN_WINDOW);
        while let Some(&oldest) = self.recent.first()
            && oldest <= floor
        {
            self.recent.remove(&oldest);
        }
        true
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn trim_url(url: &str) -> &str {
    url.trim_end_matches('/')
}

impl Relay {
    /// Starts a relay that will answer at `url` (its listener is bound by the caller) and
    /// spawns one subscriber per host; must be called inside a tokio runtime.
    pub fn start(
        url: String,
        plc_url: String,
        hosts: Vec<String>,
        config: &RelayConfig,
        faults: Faults,
        shutdown: CancellationToken,
    ) -> Relay {
        let hosts = hosts
            .into_iter()
            .map(|url| {
                let url = trim_url(&url).to_owned();
                let hostname = url
                    .split_once("://")
                    .map_or(url.as_str(), |(_, rest)| rest)
                    .to_owned();
                Host {
                    url,
                    hostname,
                    cursor: AtomicU64::new(0),
                }
            })
            .collect();
        let http = loopback_http();
        let identities = relay_resolver(&http, trim_url(&plc_url));
        if let Err(err) = &identities {
            tracing::error!(%err, "relay: no identity resolver; every event will be dropped");
        }
        let relay = Relay {
            inner: Arc::new(Inner {
                url: trim_url(&url).to_owned(),
                hosts,
                sequencer: Arc::new(Sequencer::new(config.first_seq, config.replay_window)),
                subscribe: SubscribeOptions {
                    max_lag: config.max_lag,
                    send_timeout: config.send_timeout,
                },
                faults,
                shutdown,
                admin_password: config.admin_password.clone(),
                http,
                identities,
                state: Mutex::default(),
                counters: Counters::default(),
            }),
        };
        for index in 0..relay.inner.hosts.len() {
            tokio::spawn(relay.clone().run_host(index));
        }
        relay
    }

    /// Every route of the relay, with its faults applied in front.
    pub fn router(&self) -> Router {
        let admin = Router::new()
            .route("/admin/stats", get(admin_stats))
            .with_state(self.clone())
            .merge(crate::faults::admin_router(self.inner.faults.clone()))
            .merge(crate::subscribe::admin_router(self.inner.sequencer.clone()))
            .layer(middleware::from_fn_with_state(
                Arc::<str>::from(self.inner.admin_password.as_str()),
                crate::auth::require_admin,
            ));
        let xrpc = Router::new()
            .route(
                "/xrpc/_health",
                get(|| async { Json(json!({"version": "atpdb-devnet relay"})) }),
            )
            .route(
                "/xrpc/com.atproto.sync.subscribeRepos",
                get(subscribe_repos),
            )
            .route("/xrpc/com.atproto.sync.listRepos", get(list_repos))
            .route(
                "/xrpc/com.atproto.sync.listReposByCollection",
                get(list_repos_by_collection),
            )
            .route("/xrpc/com.atproto.sync.getRepo", get(get_repo))
            .route(
                "/xrpc/com.atproto.sync.getLatestCommit",
                get(get_latest_commit),
            )
            .route("/xrpc/com.atproto.sync.getRepoStatus", get(get_repo_status))
            .route("/xrpc/com.atproto.sync.listHosts", get(list_hosts))
            .route("/xrpc/com.atproto.sync.getHostStatus", get(get_host_status))
            .with_state(self.clone());
        xrpc.merge(admin)
            .fallback(|| async {
                XrpcError::new(
                    StatusCode::NOT_FOUND,
                    "MethodNotImplemented",
                    "Method Not Implemented",
                )
            })
            .layer(middleware::from_fn_with_state(
                self.inner.faults.clone(),
                crate::faults::middleware,
            ))
    }

    /// Where the relay answers, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The newest upstream seq processed from the host at `host_url`; 0 if none or unknown.
    pub fn host_cursor(&self, host_url: &str) -> u64 {
        let host_url = trim_url(host_url);
        self.inner
            .hosts
            .iter()
            .find(|host| host.url == host_url)
            .map_or(0, |host| host.cursor.load(Ordering::Acquire))
    }

    /// The newest seq the relay has handed out.
    pub fn head_seq(&self) -> u64 {
        self.inner.sequencer.head()
    }

    /// The relay's faults, switchable at runtime.
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RelayStats {
        let c = &self.inner.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RelayStats {
            frames: load(&c.frames),
            invalid_frames: load(&c.invalid_frames),
            duplicate_seqs: load(&c.duplicate_seqs),
            invalid_commits: load(&c.invalid_commits),
            invalid_syncs: load(&c.invalid_syncs),
            unproven_commits: load(&c.unproven_commits),
            discontinuous_commits: load(&c.discontinuous_commits),
            stale_revs: load(&c.stale_revs),
            foreign_host: load(&c.foreign_host),
            inactive: load(&c.inactive),
            no_identity: load(&c.no_identity),
            unresolved: load(&c.unresolved),
            forwarded: load(&c.forwarded),
        }
    }

    fn state(&self) -> MutexGuard<'_, Accounts> {
        lock(&self.inner.state)
    }
}

// ---------------------------------------------------------------------------------------------
// Subscribing to the hosts.

impl Relay {
    /// Keeps one host's firehose connected until shutdown, through atpdb's own firehose
    /// client (reconnects with backoff from the last seq, frame limits, `FutureCursor`).
    /// Events are processed one at a time, so the host's cursor never passes an event the
    /// relay has not decided.
    async fn run_host(self, index: usize) {
        let Some(host) = self.inner.hosts.get(index) else {
            return;
        };
        let shutdown = self.inner.shutdown.clone();
        let mut seen = SeenSeqs::default();
        let http = match &self.inner.http {
            Ok(http) => http,
            Err(err) => {
                tracing::error!(host = %host.url, %err, "relay: no HTTP client; not subscribing");
                return;
            }
        };
        let mut firehose = Firehose::connect(
            http,
            FirehoseConfig {
                cursor: Some(0),
                backoff_min: BACKOFF_MIN,
                backoff_max: BACKOFF_MAX,
                connect_timeout: CONNECT_TIMEOUT,
                ..FirehoseConfig::new(host.url.clone())
            },
        );
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => break,
                event = firehose.next() => event,
            };
            match event {
                FirehoseEvent::Message(message) => {
                    bump(&self.inner.counters.frames);
                    self.take_in(index, message, &mut seen).await;
                }
                FirehoseEvent::Invalid { error, len } => {
                    // A frame that does not decode (a connection cut mid-frame, a buggy host)
                    // is dropped; the client keeps the cursor where it was.
                    bump(&self.inner.counters.frames);
                    bump(&self.inner.counters.invalid_frames);
                    tracing::warn!(host = %host.url, %error, len, "relay: dropping an invalid frame");
                }
                FirehoseEvent::FutureCursor { message } => {
                    // The host's seqs are not the ones the relay remembers (it was replaced or
                    // reset): the client starts over from its live position.
                    tracing::warn!(host = %host.url, cursor = seen.max, message = ?message,
                        "relay: upstream says the cursor is in its future; reconnecting live");
                    seen = SeenSeqs::default();
                }
                FirehoseEvent::OutdatedCursor { message } => {
                    tracing::warn!(host = %host.url, message = ?message,
                        "relay: upstream cursor outdated; events were missed");
                }
                FirehoseEvent::ErrorFrame { error, message } => {
                    tracing::warn!(host = %host.url, error, message = ?message,
                        "relay: upstream sent an error");
                }
                FirehoseEvent::Connected { cursor } => {
                    tracing::debug!(host = %host.url, ?cursor, "relay: connected");
                }
                FirehoseEvent::Disconnected { reason, retry_in } => {
                    tracing::debug!(host = %host.url, reason, ?retry_in, "relay: upstream connection ended");
                }
            }
        }
    }

    /// Processes one upstream message and moves the host's cursor past it.
    async fn take_in(&self, index: usize, message: Message, seen: &mut SeenSeqs) {
        let Some(host) = self.inner.hosts.get(index) else {
            return;
        };
        if let Message::Info(info) = &message {
            if info.name == "OutdatedCursor" {
                tracing::warn!(host = %host.url, message = ?info.message,
                    "relay: upstream cursor outdated; events were missed");
            } else {
                tracing::info!(host = %host.url, name = %info.name, message = ?info.message,
                    "relay: upstream info");
            }
            return;
        }
        let Some(seq) = message.seq() else {
            // An unknown type carries its seq in a body the relay cannot renumber.
            tracing::debug!(host = %host.url, t = message.t(), "relay: ignoring an unknown message type");
            return;
        };
        if !seen.admit(seq) {
            bump(&self.inner.counters.duplicate_seqs);
            tracing::debug!(host = %host.url, seq, "relay: dropping a duplicate upstream seq");
            return;
        }
        match message {
            Message::Commit(event) => self.take_commit(index, event).await,
            Message::Sync(event) => self.take_sync(index, event).await,
            Message::Identity(event) => self.take_identity(index, event).await,
            Message::Account(event) => self.take_account(index, event).await,
            _ => {}
        }
        host.cursor.store(seen.max, Ordering::Release);
    }

    /// The DID's identity if `index` is its current PDS; counts why not otherwise.
    async fn current_identity(&self, did: &Did, index: usize) -> Option<Arc<Identity>> {
        let host_url = self.inner.hosts.get(index)?.url.as_str();
        match self.identity(did, false).await {
            Ok(identity) if identity.pds == host_url => Some(identity),
            Ok(identity) => {
                bump(&self.inner.counters.foreign_host);
                tracing::debug!(%did, host = host_url, pds = %identity.pds,
                    "relay: ignoring an event from a host that is not the DID's PDS");
                None
            }
            Err(err) if err.is_transient() => {
                bump(&self.inner.counters.unresolved);
                tracing::warn!(%did, %err, "relay: dropping an event: identity unresolved");
                None
            }
            Err(err) => {
                bump(&self.inner.counters.no_identity);
                tracing::debug!(%did, %err, "relay: ignoring an event of a DID without identity");
                None
            }
        }
    }

    /// Whether an account's event may come from `index` when the directory cannot say: only
    /// from the host the relay last heard the account from, or from any for a new account.
    fn is_stored_host(&self, did: &Did, index: usize) -> bool {
        self.state()
            .repos
            .get(did)
            .is_none_or(|repo| repo.host == index)
    }

    /// Refuses a `#commit` or `#sync` early (before verifying it) if the account is inactive
    /// or the rev is not new.
    fn check_rev(&self, did: &Did, rev: &Tid) -> bool {
        let state = self.state();
        let Some(repo) = state.repos.get(did) else {
            return true;
        };
        if !repo.active {
            bump(&self.inner.counters.inactive);
            return false;
        }
        if !repo.is_newer(rev) {
            bump(&self.inner.counters.stale_revs);
            return false;
        }
        true
    }

    async fn take_commit(&self, index: usize, mut event: CommitEvent) {
        let did = event.repo.clone();
        let Some(mut identity) = self.current_identity(&did, index).await else {
            return;
        };
        if !self.check_rev(&did, &event.rev) {
            return;
        }
        // The tree work is done once; only the signature is retried with a fresh key.
        let proof = match CommitProof::check(&event) {
            Ok(proof) => proof,
            Err(err) => {
                bump(&self.inner.counters.invalid_commits);
                tracing::warn!(%did, rev = %event.rev, %err, "relay: dropping an invalid commit");
                return;
            }
        };
        let verified = match proof.try_verify(&identity.key) {
            Ok(verified) => verified,
            Err((proof, first)) => {
                // The key may have rotated since it was cached: look again, once.
                let retried = match self.identity(&did, true).await {
                    Ok(fresh) if fresh.key != identity.key => {
                        identity = fresh;
                        proof.try_verify(&identity.key).map_err(|(_, err)| err)
                    }
                    _ => Err(first),
                };
                match retried {
                    Ok(verified) => verified,
                    Err(err) => {
                        bump(&self.inner.counters.invalid_commits);
                        tracing::warn!(%did, rev = %event.rev, %err, "relay: dropping a commit with a bad signature");
                        return;
                    }
                }
            }
        };
        let proof = verified.proof();
        let data = proof.commit().data;
        let proven = verified.is_proven();
        let collections: BTreeSet<String> = event
            .ops
            .iter()
            .filter_map(|op| {
                op.path
                    .split_once('/')
                    .map(|(collection, _)| collection.to_owned())
            })
            .collect();
        let flags = self.inner.faults.event_flags();
        if flags.drop_prev_data
            || flags.corrupt_blocks
            || flags.bad_signature
            || flags.drop_proof_nodes
        {
            // Done before taking the lock: re-signing and rewriting the CAR is work.
            break_event(&mut event, proof, flags);
        }
        let mut state = self.state();
        let repo = state.repo_mut(&did, index);
        // Checked again: another host's task may have moved the account on meanwhile.
        if !repo.active {
            bump(&self.inner.counters.inactive);
            return;
        }
        if !repo.is_newer(&event.rev) {
            bump(&self.inner.counters.stale_revs);
            return;
        }
        // Sync 1.1: the commit must chain onto what the relay last passed, by `since` and, when
        // proven, by `prevData`. A relay never resyncs itself: a break is passed on (its
        // subscribers resync) and counted.
        if let (Some(rev), Some(stored_data)) = (&repo.rev, &repo.data) {
            let head = RepoHead {
                rev,
                data: stored_data,
            };
            match verified.chain(head, crate::pds::unix_micros()) {
                Chain::Next => {}
                Chain::Stale => {
                    bump(&self.inner.counters.stale_revs);
                    return;
                }
                Chain::Future => {
                    bump(&self.inner.counters.invalid_commits);
                    tracing::warn!(%did, rev = %event.rev, "relay: dropping a commit from the future");
                    return;
                }
                Chain::Broken(reason) => {
                    bump(&self.inner.counters.discontinuous_commits);
                    tracing::debug!(%did, rev = %event.rev, reason,
                        "relay: passing a discontinuous commit");
                }
            }
        }
        if !proven {
            bump(&self.inner.counters.unproven_commits);
        }
        repo.host = index;
        repo.rev = Some(event.rev.clone());
        repo.head = Some(event.commit);
        repo.data = Some(data);
        for collection in collections {
            state
                .collections
                .entry(collection)
                .or_default()
                .insert(did.clone());
        }
        self.inner.sequencer.append(Some(&did), |seq| {
            event.seq = seq;
            firehose::encode_message(&Message::Commit(event))
        });
        bump(&self.inner.counters.forwarded);
    }

    async fn take_sync(&self, index: usize, mut event: SyncEvent) {
        let did = event.did.clone();
        let Some(identity) = self.current_identity(&did, index).await else {
            return;
        };
        if !self.check_rev(&did, &event.rev) {
            return;
        }
        let verified = match firehose::verify_sync(&event, &identity.key) {
            Ok(verified) => Ok(verified),
            Err(first) => match self.identity(&did, true).await {
                Ok(fresh) if fresh.key != identity.key => firehose::verify_sync(&event, &fresh.key),
                _ => Err(first),
            },
        };
        let commit = match verified {
            Ok(commit) => commit,
            Err(err) => {
                bump(&self.inner.counters.invalid_syncs);
                tracing::warn!(%did, rev = %event.rev, %err, "relay: dropping an invalid #sync");
                return;
            }
        };
        let mut state = self.state();
        let repo = state.repo_mut(&did, index);
        if !repo.is_newer(&event.rev) {
            bump(&self.inner.counters.stale_revs);
            return;
        }
        repo.host = index;
        repo.rev = Some(event.rev.clone());
        repo.head = Some(Cid::dag_cbor(&commit.to_cbor()));
        repo.data = Some(commit.data);
        self.inner.sequencer.append(Some(&did), |seq| {
            event.seq = seq;
            firehose::encode_message(&Message::Sync(event))
        });
        bump(&self.inner.counters.forwarded);
    }

    async fn take_identity(&self, index: usize, mut event: IdentityEvent) {
        let did = event.did.clone();
        let host_url = self
            .inner
            .hosts
            .get(index)
            .map_or("", |host| host.url.as_str());
        let accepted = match self.identity(&did, true).await {
            Ok(identity) => identity.pds == host_url,
            // A tombstoned or unreachable identity still gets its event through from the
            // host the account lives on, so consumers refresh their caches.
            Err(_) => self.is_stored_host(&did, index),
        };
        if !accepted {
            bump(&self.inner.counters.foreign_host);
            return;
        }
        event.handle = None;
        let mut state = self.state();
        state.repo_mut(&did, index).host = index;
        self.inner.sequencer.append(Some(&did), |seq| {
            event.seq = seq;
            firehose::encode_message(&Message::Identity(event))
        });
        bump(&self.inner.counters.forwarded);
    }

    async fn take_account(&self, index: usize, mut event: AccountEvent) {
        let did = event.did.clone();
        let host_url = self
            .inner
            .hosts
            .get(index)
            .map_or("", |host| host.url.as_str());
        let accepted = match self.identity(&did, false).await {
            Ok(identity) => identity.pds == host_url,
            // A deleted account's DID is tombstoned right after its `#account`.
            Err(_) => self.is_stored_host(&did, index),
        };
        if !accepted {
            bump(&self.inner.counters.foreign_host);
            tracing::debug!(%did, host = host_url, "relay: ignoring #account from a host that is not the DID's PDS");
            return;
        }
        let mut state = self.state();
        let repo = state.repo_mut(&did, index);
        repo.host = index;
        repo.active = event.active;
        repo.status = if event.active {
            None
        } else {
            event.status.clone()
        };
        self.inner.sequencer.append(Some(&did), |seq| {
            event.seq = seq;
            firehose::encode_message(&Message::Account(event))
        });
        bump(&self.inner.counters.forwarded);
    }
}

/// Applies the relay's own event faults to an outgoing `#commit`, the same way a PDS applies
/// them, so that a test can break the relay's hop without breaking any host.
fn break_event(event: &mut CommitEvent, proof: &CommitProof, flags: EventFaults) {
    let mut blocks = Vec::new();
    // The CAR was read once already by the proof, so this cannot fail; if it did, the event
    // would go out unbroken, which a test notices.
    if let Ok(mut car) = CarReader::new(event.blocks.as_slice(), CarLimits::default()) {
        while let Ok(Some(block)) = car.next_block() {
            blocks.push((block.cid, block.data.to_vec()));
        }
    }
    let data = CommitData {
        commit: proof.commit().clone(),
        cid: event.commit,
        since: event.since.clone(),
        prev_data: event.prev_data,
        ops: event.ops.clone(),
        blocks,
    };
    crate::pds::mangle(event, &data, flags);
}

// ---------------------------------------------------------------------------------------------
// Identity.

/// The devnet's hosts are all on loopback, so the relay's client allows private addresses.
fn loopback_http() -> Result<atpdb_net::Http, String> {
    atpdb_net::Http::new(&atpdb_net::HttpConfig {
        allow_private_network: true,
        ..atpdb_net::HttpConfig::default()
    })
    .map_err(|err| err.to_string())
}

/// The relay's resolver: the devnet's directory is on loopback, so private networks are
/// allowed. Misses are not cached (each event asks again, so an identity that appears or
/// recovers is seen at once); identities are, until refreshed.
fn relay_resolver(
    http: &Result<atpdb_net::Http, String>,
    plc_url: &str,
) -> Result<Resolver, String> {
    let http = http.clone()?;
    let config = IdentityConfig {
        plc_url: plc_url.to_owned(),
        miss_ttl: Duration::ZERO,
        timeout: RESOLVE_TIMEOUT,
        ..IdentityConfig::default()
    };
    Resolver::new(config, http).map_err(|err| err.to_string())
}

impl Relay {
    /// The DID's identity, from the cache unless `fresh`.
    ///
    /// `fresh` refreshes the entry (an `#identity` event, a signature failure). When the
    /// directory cannot be reached, the resolver returns the identity it had rather than
    /// nothing: a flaky directory should not make the relay drop every event. Without one,
    /// the lookup is retried briefly. A `NotFound` (unknown, tombstoned) or an unusable
    /// document is final: the DID is gone.
    async fn identity(&self, did: &Did, fresh: bool) -> Result<Arc<Identity>, IdentityError> {
        let resolver = match &self.inner.identities {
            Ok(resolver) => resolver,
            Err(reason) => {
                return Err(IdentityError::Unreachable {
                    did: did.clone(),
                    reason: reason.clone(),
                });
            }
        };
        let mut answer = if fresh {
            resolver.refresh(did).await
        } else {
            resolver.resolve(did).await
        };
        // A transient failure decides nothing: the host's stream waits here (its cursor does
        // not move past this event) until the directory answers or the relay stops.
        let mut delay = Duration::from_millis(50);
        while answer.as_ref().is_err_and(IdentityError::is_transient) {
            bump(&self.inner.counters.unresolved);
            tokio::select! {
                () = self.inner.shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RESOLVE_RETRY_MAX);
            answer = resolver.refresh(did).await;
        }
        answer
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP.

async fn subscribe_repos(
    State(relay): State<Relay>,
    Params(params): Params<crate::subscribe::CursorParams>,
    upgrade: WebSocketUpgrade,
) -> XrpcResult<Response> {
    let cursor = params.cursor()?;
    let inner = relay.inner.clone();
    Ok(upgrade.on_upgrade(move |socket| {
        crate::subscribe::serve(
            socket,
            inner.sequencer.clone(),
            cursor,
            inner.subscribe,
            inner.faults.clone(),
            inner.shutdown.clone(),
        )
    }))
}

#[derive(Deserialize)]
struct PageParams {
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_repos(
    State(relay): State<Relay>,
    Params(params): Params<PageParams>,
) -> XrpcResult<Json<JsonValue>> {
    let limit = limit(params.limit, 500, 1000)?;
    let after: u64 = match params.cursor.as_deref() {
        None | Some("") => 0,
        Some(cursor) => parse("cursor", cursor)?,
    };
    let state = relay.state();
    let mut repos = Vec::new();
    let mut more = false;
    let mut last_uid = None;
    // Accounts seen only through `#identity`/`#account` have no head to list yet.
    let listed = state
        .by_uid
        .range(after.saturating_add(1)..)
        .filter_map(|(_, did)| Some((did, state.repos.get(did)?)))
        .filter_map(|(did, repo)| Some((did, repo, repo.head?, repo.rev.as_ref()?)));
    for (did, repo, head, rev) in listed {
        if repos.len() == limit {
            more = true;
            break;
        }
        let mut out = json!({
            "did": did.as_str(),
            "head": head.to_string(),
            "rev": rev.as_str(),
            "active": repo.active,
        });
        if let Some(status) = &repo.status {
            out["status"] = json!(status);
        }
        repos.push(out);
        last_uid = Some(repo.uid);
    }
    let mut out = json!({"repos": repos});
    if more && let Some(last) = last_uid {
        out["cursor"] = json!(last.to_string());
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
struct CollectionParams {
    collection: String,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_repos_by_collection(
    State(relay): State<Relay>,
    Params(params): Params<CollectionParams>,
) -> XrpcResult<Json<JsonValue>> {
    let collection: Nsid = parse("collection", &params.collection)?;
    let limit = limit(params.limit, 500, 2000)?;
    let state = relay.state();
    let dids: Vec<&Did> = state
        .collections
        .get(collection.as_str())
        .into_iter()
        .flatten()
        .filter(|did| {
            params
                .cursor
                .as_deref()
                .is_none_or(|after| did.as_str() > after)
        })
        .take(limit + 1)
        .collect();
    let repos: Vec<JsonValue> = dids
        .iter()
        .take(limit)
        .map(|did| json!({"did": did.as_str()}))
        .collect();
    let mut out = json!({"repos": repos});
    if dids.len() > limit
        && let Some(last) = repos.last()
    {
        out["cursor"] = last["did"].clone();
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
struct DidParams {
    did: String,
}

#[derive(Deserialize)]
struct GetRepoParams {
    did: String,
    since: Option<String>,
}

fn not_found(did: &Did) -> XrpcError {
    XrpcError::bad(
        "RepoNotFound",
        format!("Could not find repo for DID: {did}"),
    )
}

/// The relay's record of an account, refusing unknown and deleted ones as a PDS would.
fn known_repo(relay: &Relay, did: &Did) -> XrpcResult<Repo> {
    let state = relay.state();
    let repo = state.repos.get(did).ok_or_else(|| not_found(did))?;
    if repo.status.as_deref() == Some("deleted") {
        return Err(not_found(did));
    }
    Ok(repo.clone())
}

/// Like the real relay, `getRepo` sends the client to the account's PDS: the relay does not
/// keep repositories.
async fn get_repo(
    State(relay): State<Relay>,
    Params(params): Params<GetRepoParams>,
) -> XrpcResult<Response> {
    let did: Did = parse("did", &params.did)?;
    let since = params
        .since
        .as_deref()
        .map(|since| parse::<Tid>("since", since))
        .transpose()?;
    let repo = known_repo(&relay, &did)?;
    let host = relay
        .inner
        .hosts
        .get(repo.host)
        .ok_or_else(|| not_found(&did))?;
    let mut location = format!("{}/xrpc/com.atproto.sync.getRepo?did={}", host.url, did);
    if let Some(since) = since {
        location.push_str("&since=");
        location.push_str(since.as_str());
    }
    Ok((StatusCode::FOUND, [(header::LOCATION, location)]).into_response())
}

fn inactive_error(did: &Did, repo: &Repo) -> Option<XrpcError> {
    if repo.active {
        return None;
    }
    let status = repo.status.as_deref().unwrap_or("deactivated");
    let error = match status {
        "takendown" => "RepoTakendown",
        "suspended" => "RepoSuspended",
        _ => "RepoDeactivated",
    };
    Some(XrpcError::bad(
        error,
        format!("Repo has been {status}: {did}"),
    ))
}

async fn get_latest_commit(
    State(relay): State<Relay>,
    Params(params): Params<DidParams>,
) -> XrpcResult<Json<JsonValue>> {
    let did: Did = parse("did", &params.did)?;
    let repo = known_repo(&relay, &did)?;
    if let Some(err) = inactive_error(&did, &repo) {
        return Err(err);
    }
    let (Some(head), Some(rev)) = (repo.head, repo.rev) else {
        return Err(not_found(&did));
    };
    Ok(Json(json!({"cid": head.to_string(), "rev": rev.as_str()})))
}

async fn get_repo_status(
    State(relay): State<Relay>,
    Params(params): Params<DidParams>,
) -> XrpcResult<Json<JsonValue>> {
    let did: Did = parse("did", &params.did)?;
    let repo = relay
        .state()
        .repos
        .get(&did)
        .cloned()
        .ok_or_else(|| not_found(&did))?;
    let mut out = json!({"did": did.as_str(), "active": repo.active});
    if let Some(status) = &repo.status {
        out["status"] = json!(status);
    }
    if let Some(rev) = &repo.rev {
        out["rev"] = json!(rev.as_str());
    }
    Ok(Json(out))
}

fn host_json(relay: &Relay, index: usize, host: &Host) -> JsonValue {
    let accounts = relay
        .state()
        .repos
        .values()
        .filter(|repo| repo.host == index)
        .count();
    json!({
        "hostname": host.hostname,
        "seq": host.cursor.load(Ordering::Acquire),
        "accountCount": accounts,
        "status": "active",
    })
}

async fn list_hosts(
    State(relay): State<Relay>,
    Params(params): Params<PageParams>,
) -> XrpcResult<Json<JsonValue>> {
    let limit = limit(params.limit, 200, 1000)?;
    let start = match params.cursor.as_deref() {
        Some(cursor) => parse::<usize>("cursor", cursor)?,
        None => 0,
    };
    let hosts: Vec<JsonValue> = relay
        .inner
        .hosts
        .iter()
        .enumerate()
        .skip(start)
        .take(limit)
        .map(|(index, host)| host_json(&relay, index, host))
        .collect();
    let mut out = json!({"hosts": hosts});
    let end = start.saturating_add(limit);
    if end < relay.inner.hosts.len() {
        out["cursor"] = json!(end.to_string());
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
struct HostnameParams {
    hostname: String,
}

async fn get_host_status(
    State(relay): State<Relay>,
    Params(params): Params<HostnameParams>,
) -> XrpcResult<Json<JsonValue>> {
    let (index, host) = relay
        .inner
        .hosts
        .iter()
        .enumerate()
        .find(|(_, host)| host.hostname == params.hostname)
        .ok_or_else(|| {
            XrpcError::bad(
                "HostNotFound",
                format!("host not known to this relay: {}", params.hostname),
            )
        })?;
    Ok(Json(host_json(&relay, index, host)))
}

async fn admin_stats(State(relay): State<Relay>) -> Json<JsonValue> {
    let stats = relay.stats();
    Json(json!({
        "head": relay.head_seq(),
        "frames": stats.frames,
        "invalidFrames": stats.invalid_frames,
        "duplicateSeqs": stats.duplicate_seqs,
        "invalidCommits": stats.invalid_commits,
        "invalidSyncs": stats.invalid_syncs,
        "unprovenCommits": stats.unproven_commits,
        "discontinuousCommits": stats.discontinuous_commits,
        "staleRevs": stats.stale_revs,
        "foreignHost": stats.foreign_host,
        "inactive": stats.inactive,
        "noIdentity": stats.no_identity,
        "unresolved": stats.unresolved,
        "forwarded": stats.forwarded,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_seqs_drop_duplicates_but_take_reordered() {
        let mut seen = SeenSeqs::default();
        assert!(seen.admit(1));
        assert!(seen.admit(3));
        assert!(!seen.admit(3), "a duplicate is refused");
        assert!(seen.admit(2), "a reordered seq is taken");
        assert!(!seen.admit(2));
        assert_eq!(seen.max, 3);
        assert!(seen.admit(3 + 2 * SEEN_WINDOW));
        assert!(!seen.admit(4), "a seq far behind the window counts as seen");
    }

    #[test]
    fn documents_need_a_multikey_and_a_pds() -> Result<(), String> {
        let did: Did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
            .parse()
            .map_err(|err| format!("{err}"))?;
        let key = atpdb_repo::sample::sample_keypair(1, atpdb_repo::crypto::Curve::K256)
            .public()
            .to_multikey();
        let document = json!({
            "id": did.as_str(),
            "verificationMethod": [{
                "id": "#atproto",
                "type": "Multikey",
                "controller": did.as_str(),
                "publicKeyMultibase": key,
            }],
            "service": [{
                "id": format!("{did}#atproto_pds"),
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": "http://127.0.0.1:9/",
            }],
        });
        let identity = Identity::from_document(&did, document.clone())?;
        assert_eq!(identity.pds, "http://127.0.0.1:9");
        let mut no_pds = document.clone();
        no_pds["service"] = json!([]);
        assert!(Identity::from_document(&did, no_pds).is_err());
        let mut other = document;
        other["id"] = json!("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa");
        assert!(Identity::from_document(&did, other).is_err());
        Ok(())
    }
}
