//! XRPC calls to PDS hosts and relays: per-host concurrency, rate and pause, retries with
//! backoff, and bodies bounded in size and time.
//!
//! # Design
//!
//! - **Everything is per host.** A backfill talks to thousands of hosts at once, each with its
//!   own limits, so each host (keyed by its origin, `https://pds.example`) gets a concurrency
//!   semaphore, a token bucket and a pause. A 429 pauses the host for every caller, not only
//!   the request that got it: the next request would only earn another 429.
//! - **Retries happen before a body is handed over.** JSON calls retry transient failures
//!   (5xx, 429, timeouts, dropped connections) up to [`XrpcConfig::max_retries`] times with
//!   exponential backoff and full jitter. `getRepo` retries only until the response headers
//!   arrive; once the CAR streams, an error surfaces from the read, because the caller has
//!   consumed bytes it cannot take back.
//! - **Bounded memory and time.** JSON bodies are read up to [`XrpcConfig::max_json_bytes`],
//!   error bodies up to 8 KiB, and only a short description of an error body is kept. A
//!   `getRepo` body has a size limit (checked against `Content-Length` before reading, and
//!   while reading), a whole-body deadline and an idle timeout, so a slow drip cannot stall a
//!   worker forever.
//! - **Lenient lists.** An entry of `listRepos` with an invalid DID is skipped and counted,
//!   not fatal: one bad account on a host must not stop the crawl of the others.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atpdb_repo::Cid;
use atpdb_repo::syntax::{Did, Nsid, Tid};
use bytes::Bytes;
use futures_util::Stream;
use reqwest::header::{self, HeaderMap};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::guard::{Http, NetError};

/// `com.atproto.sync.getRepo`.
pub const GET_REPO: &str = "com.atproto.sync.getRepo";
/// `com.atproto.sync.listRepos`.
pub const LIST_REPOS: &str = "com.atproto.sync.listRepos";
/// `com.atproto.sync.listReposByCollection`.
pub const LIST_REPOS_BY_COLLECTION: &str = "com.atproto.sync.listReposByCollection";
/// `com.atproto.sync.getLatestCommit`.
pub const GET_LATEST_COMMIT: &str = "com.atproto.sync.getLatestCommit";
/// `com.atproto.sync.getRepoStatus`.
pub const GET_REPO_STATUS: &str = "com.atproto.sync.getRepoStatus";

/// Largest `limit` `listRepos` accepts (lexicon).
pub const LIST_REPOS_MAX_LIMIT: u32 = 1000;
/// Largest `limit` `listReposByCollection` accepts (lexicon).
pub const LIST_REPOS_BY_COLLECTION_MAX_LIMIT: u32 = 2000;

/// Bytes of an error body read to find the XRPC error; the rest is not read.
const ERROR_BODY_BYTES: usize = 8 * 1024;
/// Bytes of a non-XRPC error body kept in [`NetError::Http`].
const ERROR_EXCERPT_BYTES: usize = 200;
/// Characters of an XRPC error message kept.
const ERROR_MESSAGE_CHARS: usize = 500;
/// Hosts remembered; above this, idle hosts are forgotten (with their counters).
const MAX_HOSTS: usize = 100_000;

/// Limits and timeouts of an [`Xrpc`] client. Every limit is per host.
#[derive(Debug, Clone)]
pub struct XrpcConfig {
    /// Requests in flight to one host (a streaming `getRepo` body counts until dropped).
    pub max_concurrency_per_host: usize,
    /// Requests per second started to one host (token bucket); 0 or less means no limit.
    pub requests_per_second: f64,
    /// Requests that may start at once after the host was idle (the bucket's size).
    pub burst: u32,
    /// A JSON call (headers and body), or `getRepo` until its headers arrive, must finish
    /// within this.
    pub request_timeout: Duration,
    /// A `getRepo` body must be read whole within this, counted from its headers.
    pub repo_timeout: Duration,
    /// A `getRepo` body that sends nothing for this long fails.
    pub repo_idle_timeout: Duration,
    /// Retries of a transient failure (so at most `max_retries + 1` attempts).
    pub max_retries: u32,
    /// The first backoff before a retry; it doubles with each retry, with full jitter.
    pub backoff_base: Duration,
    /// The largest backoff.
    pub backoff_max: Duration,
    /// The longest a rate-limited host is paused at once, whatever it asks for.
    pub max_rate_limit_wait: Duration,
    /// The largest `getRepo` body; a larger `Content-Length` is refused before reading.
    pub max_repo_bytes: u64,
    /// The largest JSON body.
    pub max_json_bytes: usize,
}

impl Default for XrpcConfig {
    fn default() -> Self {
        XrpcConfig {
            max_concurrency_per_host: 8,
            requests_per_second: 20.0,
            burst: 20,
            request_timeout: Duration::from_secs(30),
            repo_timeout: Duration::from_secs(300),
            repo_idle_timeout: Duration::from_secs(30),
            max_retries: 4,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_rate_limit_wait: Duration::from_secs(60),
            max_repo_bytes: 4 << 30,
            max_json_bytes: 8 << 20,
        }
    }
}

/// Counters of one host, as [`Xrpc::stats`] reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostStats {
    /// HTTP requests sent (each retry counts).
    pub requests: u64,
    /// Requests that failed, including failed `getRepo` body reads.
    pub errors: u64,
    /// Retries after a transient failure.
    pub retries: u64,
    /// 429 answers received.
    pub rate_limited: u64,
    /// Times a request waited for the host's rate-limit pause.
    pub rate_limit_waits: u64,
    /// Total time requests spent waiting for the pause.
    pub rate_limit_wait: Duration,
}

/// One page of `listRepos`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListReposPage {
    /// The valid entries, in the host's order.
    pub repos: Vec<ListedRepo>,
    /// Where the next page starts; `None` on the last page.
    pub cursor: Option<String>,
    /// Entries skipped because their DID (or the entry itself) was invalid.
    pub skipped: usize,
}

/// One repository in a `listRepos` page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRepo {
    /// The account.
    pub did: Did,
    /// The current commit's CID, if given and valid.
    pub head: Option<Cid>,
    /// The current rev, if given and a valid TID.
    pub rev: Option<Tid>,
    /// Whether the host serves the account (`true` when absent, as the lexicon defaults).
    pub active: bool,
    /// Why not, when inactive (`takendown`, `deactivated`...).
    pub status: Option<String>,
}

/// One page of `listReposByCollection`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DidPage {
    /// The valid DIDs, in the host's order.
    pub dids: Vec<Did>,
    /// Where the next page starts; `None` on the last page.
    pub cursor: Option<String>,
    /// Entries skipped because their DID was invalid.
    pub skipped: usize,
}

/// `getLatestCommit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestCommit {
    /// The commit's CID.
    pub cid: Cid,
    /// The commit's rev.
    pub rev: Tid,
}

/// `getRepoStatus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoStatus {
    /// Whether the host serves the account.
    pub active: bool,
    /// Why not, when inactive.
    pub status: Option<String>,
    /// The current rev, when the host says.
    pub rev: Option<Tid>,
}

/// The XRPC client: cheap to clone; clones share the per-host limits and counters.
#[derive(Debug, Clone)]
pub struct Xrpc {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: Http,
    config: XrpcConfig,
    hosts: Mutex<HashMap<String, Arc<HostState>>>,
}

/// The shared state of one host.
#[derive(Debug)]
struct HostState {
    permits: Arc<Semaphore>,
    limiter: Mutex<Limiter>,
    counters: Counters,
}

#[derive(Debug)]
struct Limiter {
    tokens: f64,
    refilled: Instant,
    paused_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
    rate_limited: AtomicU64,
    rate_limit_waits: AtomicU64,
    rate_limit_wait_micros: AtomicU64,
}

/// One call's view of its host.
struct Call {
    state: Arc<HostState>,
    /// The origin, used as the host's name in errors and stats.
    host: String,
    /// The full method URL.
    url: String,
    method: &'static str,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Xrpc {
    /// A client making every request through `http` (so the SSRF guard applies).
    pub fn new(http: Http, config: XrpcConfig) -> Xrpc {
        Xrpc {
            inner: Arc::new(Inner {
                http,
                config,
                hosts: Mutex::default(),
            }),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &XrpcConfig {
        &self.inner.config
    }

    /// Counters per host, keyed by origin (`http://127.0.0.1:2583`).
    pub fn stats(&self) -> BTreeMap<String, HostStats> {
        lock(&self.inner.hosts)
            .iter()
            .map(|(host, state)| (host.clone(), state.counters.snapshot()))
            .collect()
    }

    /// Counters of one host (given as a base URL), if it was ever called.
    pub fn host_stats(&self, host: &str) -> Option<HostStats> {
        let origin = origin_of(host).ok()?;
        lock(&self.inner.hosts)
            .get(&origin)
            .map(|state| state.counters.snapshot())
    }

    /// Streams a repository's CAR (`getRepo`), or only the blocks newer than `since`.
    ///
    /// Transient failures are retried until the response headers arrive; after that, read
    /// errors (timeout, too large, connection reset) come from [`RepoBody`]'s reads.
    /// Redirects (a relay sends `getRepo` on to the PDS) are followed, each checked by the
    /// guard; the limits and counters are those of `host`.
    ///
    /// # Errors
    ///
    /// [`NetError`]: the guard refused the host, the host answered an error (see
    /// [`NetError::repo_unavailable`] for accounts it will not serve), retries ran out, or
    /// `Content-Length` exceeds [`XrpcConfig::max_repo_bytes`].
    pub async fn get_repo(
        &self,
        host: &str,
        did: &Did,
        since: Option<&Tid>,
    ) -> Result<RepoBody, NetError> {
        let call = self.call(host, GET_REPO)?;
        let mut query = vec![("did", did.as_str())];
        if let Some(since) = since {
            query.push(("since", since.as_str()));
        }
        let config = &self.inner.config;
        let mut attempt = 0;
        loop {
            let permit = self.wait_turn(&call).await?;
            let sent = self.send(&call, &query, attempt).await;
            let response = match sent {
                Ok(response) => response,
                Err(err) => {
                    drop(permit);
                    self.settle(&call, err, &mut attempt).await?;
                    continue;
                }
            };
            if let Some(length) = response.content_length()
                && length > config.max_repo_bytes
            {
                bump(&call.state.counters.errors);
                return Err(NetError::TooLarge {
                    host: call.host,
                    limit: config.max_repo_bytes,
                });
            }
            return Ok(RepoBody::new(response, call, permit, config));
        }
    }

    /// One page of the host's repositories (`listRepos`); `limit` is clamped to 1..=1000.
    ///
    /// # Errors
    ///
    /// [`NetError`] when the call fails after retries or the page does not parse. Invalid
    /// entries are not errors: they are counted in [`ListReposPage::skipped`].
    pub async fn list_repos(
        &self,
        host: &str,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<ListReposPage, NetError> {
        let limit = limit.clamp(1, LIST_REPOS_MAX_LIMIT).to_string();
        let mut query = vec![("limit", limit.as_str())];
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor));
        }
        let page: RawPage = self.json(host, LIST_REPOS, &query).await?;
        let next = page.next_cursor(host, LIST_REPOS, cursor)?;
        let mut out = ListReposPage {
            repos: Vec::with_capacity(page.repos.len()),
            cursor: next,
            skipped: 0,
        };
        for entry in page.repos {
            match listed_repo(&entry) {
                Some(repo) => out.repos.push(repo),
                None => out.skipped += 1,
            }
        }
        Ok(out)
    }

    /// One page of the DIDs with records in `collection` (`listReposByCollection`, served by
    /// relays' collection directories); `limit` is clamped to 1..=2000.
    ///
    /// # Errors
    ///
    /// As [`Xrpc::list_repos`].
    pub async fn list_repos_by_collection(
        &self,
        host: &str,
        collection: &Nsid,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<DidPage, NetError> {
        let limit = limit
            .clamp(1, LIST_REPOS_BY_COLLECTION_MAX_LIMIT)
            .to_string();
        let mut query = vec![
            ("collection", collection.as_str()),
            ("limit", limit.as_str()),
        ];
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor));
        }
        let page: RawPage = self.json(host, LIST_REPOS_BY_COLLECTION, &query).await?;
        let next = page.next_cursor(host, LIST_REPOS_BY_COLLECTION, cursor)?;
        let mut out = DidPage {
            dids: Vec::with_capacity(page.repos.len()),
            cursor: next,
            skipped: 0,
        };
        for entry in page.repos {
            match entry_did(&entry) {
                Some(did) => out.dids.push(did),
                None => out.skipped += 1,
            }
        }
        Ok(out)
    }

    /// The repository's current commit (`getLatestCommit`).
    ///
    /// # Errors
    ///
    /// [`NetError`] when the call fails after retries, or the CID or rev is invalid.
    pub async fn get_latest_commit(&self, host: &str, did: &Did) -> Result<LatestCommit, NetError> {
        #[derive(serde::Deserialize)]
        struct Raw {
            cid: String,
            rev: String,
        }
        let raw: Raw = self
            .json(host, GET_LATEST_COMMIT, &[("did", did.as_str())])
            .await?;
        let bad = |reason: String| NetError::BadResponse {
            host: host.to_owned(),
            method: GET_LATEST_COMMIT.to_owned(),
            reason,
        };
        let cid = raw
            .cid
            .parse::<Cid>()
            .map_err(|err| bad(format!("cid {:?}: {err}", excerpt(&raw.cid))))?;
        let rev = raw
            .rev
            .parse::<Tid>()
            .map_err(|err| bad(format!("rev: {err}")))?;
        Ok(LatestCommit { cid, rev })
    }

    /// The account's hosting status on the host (`getRepoStatus`).
    ///
    /// # Errors
    ///
    /// [`NetError`] when the call fails after retries or the answer does not parse. An
    /// invalid `rev` reads as absent.
    pub async fn get_repo_status(&self, host: &str, did: &Did) -> Result<RepoStatus, NetError> {
        #[derive(serde::Deserialize)]
        struct Raw {
            active: bool,
            status: Option<String>,
            rev: Option<String>,
        }
        let raw: Raw = self
            .json(host, GET_REPO_STATUS, &[("did", did.as_str())])
            .await?;
        Ok(RepoStatus {
            active: raw.active,
            status: raw.status,
            rev: raw.rev.and_then(|rev| rev.parse().ok()),
        })
    }

    /// A JSON call with retries.
    async fn json<T: DeserializeOwned>(
        &self,
        host: &str,
        method: &'static str,
        query: &[(&str, &str)],
    ) -> Result<T, NetError> {
        let call = self.call(host, method)?;
        let timeout = self.inner.config.request_timeout;
        let mut attempt = 0;
        loop {
            let permit = self.wait_turn(&call).await?;
            let once = async {
                let response = self.send(&call, query, attempt).await?;
                self.read_json(&call, response).await
            };
            let result = tokio::time::timeout(timeout, once)
                .await
                .unwrap_or_else(|_| {
                    Err(NetError::Timeout {
                        host: call.host.clone(),
                        what: format!("waiting {timeout:?} for the {method} response"),
                    })
                });
            drop(permit);
            match result {
                Ok(value) => return Ok(value),
                Err(err) => self.settle(&call, err, &mut attempt).await?,
            }
        }
    }

    /// The host's state and the method URL, refused by the guard before anything is sent.
    fn call(&self, host: &str, method: &'static str) -> Result<Call, NetError> {
        let base = host.trim_end_matches('/');
        let url = format!("{base}/xrpc/{method}");
        let parsed = self.inner.http.check(&url)?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(NetError::BadUrl {
                url: host.to_owned(),
                reason: "an XRPC host must be http(s)".to_owned(),
            });
        }
        let origin = parsed.origin().ascii_serialization();
        let state = {
            let mut hosts = lock(&self.inner.hosts);
            if hosts.len() >= MAX_HOSTS && !hosts.contains_key(&origin) {
                // Forget hosts nobody is calling and that are not paused.
                let now = Instant::now();
                hosts.retain(|_, state| Arc::strong_count(state) > 1 || state.paused_at(now));
            }
            hosts
                .entry(origin.clone())
                .or_insert_with(|| Arc::new(HostState::new(&self.inner.config)))
                .clone()
        };
        Ok(Call {
            state,
            host: origin,
            url,
            method,
        })
    }

    /// Waits for the host's pause, a concurrency slot and a token, in that order.
    async fn wait_turn(&self, call: &Call) -> Result<OwnedSemaphorePermit, NetError> {
        let config = &self.inner.config;
        loop {
            let paused_until = lock(&call.state.limiter).paused_until;
            if let Some(until) = paused_until {
                let now = Instant::now();
                if until > now {
                    let counters = &call.state.counters;
                    bump(&counters.rate_limit_waits);
                    let micros = u64::try_from((until - now).as_micros()).unwrap_or(u64::MAX);
                    counters
                        .rate_limit_wait_micros
                        .fetch_add(micros, Ordering::Relaxed);
                    tracing::debug!(host = %call.host, wait = ?(until - now), "xrpc: host paused");
                    tokio::time::sleep_until(until).await;
                    continue;
                }
            }
            let permit = call
                .state
                .permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| NetError::Client("the host's request slots were closed".into()))?;
            while let Some(wait) = call.state.take_token(config) {
                tokio::time::sleep(wait).await;
            }
            if call.state.paused_at(Instant::now()) {
                // A 429 arrived while this request waited: wait for the pause too.
                continue;
            }
            return Ok(permit);
        }
    }

    /// Decides after a failed attempt: `Ok` to retry (after the backoff), or the error.
    async fn settle(&self, call: &Call, err: NetError, attempt: &mut u32) -> Result<(), NetError> {
        bump(&call.state.counters.errors);
        let config = &self.inner.config;
        if !err.is_transient() || *attempt >= config.max_retries {
            return Err(err);
        }
        tracing::debug!(host = %call.host, method = call.method, attempt = *attempt, %err,
            "xrpc: retrying");
        if !matches!(err, NetError::RateLimited { .. }) {
            // A 429 paused the host already; `wait_turn` waits for it.
            tokio::time::sleep(full_jitter(config, *attempt)).await;
        }
        bump(&call.state.counters.retries);
        *attempt += 1;
        Ok(())
    }

    /// One request; a non-success status becomes the error it stands for.
    async fn send(
        &self,
        call: &Call,
        query: &[(&str, &str)],
        attempt: u32,
    ) -> Result<reqwest::Response, NetError> {
        let config = &self.inner.config;
        let request = self.inner.http.get(&call.url)?.query(query);
        bump(&call.state.counters.requests);
        let response = match tokio::time::timeout(config.request_timeout, request.send()).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => return Err(from_reqwest(&call.host, "sending the request", &err)),
            Err(_) => {
                return Err(NetError::Timeout {
                    host: call.host.clone(),
                    what: format!(
                        "waiting {:?} for the {} response",
                        config.request_timeout, call.method
                    ),
                });
            }
        };
        let status = response.status();
        if status.is_success() {
            if let Some(wait) = exhausted_until(response.headers()) {
                // The host says its budget is spent: stop before it has to answer 429.
                call.state
                    .pause(wait.min(config.max_rate_limit_wait).max(MIN_PAUSE));
            }
            return Ok(response);
        }
        if status.as_u16() == 429 {
            bump(&call.state.counters.rate_limited);
            let wait = rate_limit_hint(response.headers())
                .unwrap_or_else(|| backoff_cap(config, attempt))
                .max(MIN_PAUSE)
                .min(config.max_rate_limit_wait);
            call.state.pause(wait);
            tracing::debug!(host = %call.host, ?wait, "xrpc: rate limited; pausing the host");
            return Err(NetError::RateLimited {
                host: call.host.clone(),
                retry_after: wait,
            });
        }
        Err(error_response(call, response).await)
    }

    /// Reads a JSON body within the size limit.
    async fn read_json<T: DeserializeOwned>(
        &self,
        call: &Call,
        response: reqwest::Response,
    ) -> Result<T, NetError> {
        let limit = self.inner.config.max_json_bytes;
        let too_large = || NetError::TooLarge {
            host: call.host.clone(),
            limit: limit as u64,
        };
        if response
            .content_length()
            .is_some_and(|length| length > limit as u64)
        {
            return Err(too_large());
        }
        let (body, complete) = read_capped(response, limit, &call.host).await?;
        if !complete {
            return Err(too_large());
        }
        serde_json::from_slice(&body).map_err(|err| {
            let looks_html = body.trim_ascii_start().starts_with(b"<");
            NetError::BadResponse {
                host: call.host.clone(),
                method: call.method.to_owned(),
                reason: if looks_html {
                    format!("{}, not JSON", describe_html(&body))
                } else {
                    format!("invalid JSON: {err}")
                },
            }
        })
    }
}

/// The shortest pause after a 429, so a `Retry-After: 0` cannot make a busy loop.
const MIN_PAUSE: Duration = Duration::from_millis(100);

impl HostState {
    fn new(config: &XrpcConfig) -> HostState {
        HostState {
            permits: Arc::new(Semaphore::new(config.max_concurrency_per_host.max(1))),
            limiter: Mutex::new(Limiter {
                tokens: f64::from(config.burst.max(1)),
                refilled: Instant::now(),
                paused_until: None,
            }),
            counters: Counters::default(),
        }
    }

    /// Takes a token, or says how long until one is available.
    fn take_token(&self, config: &XrpcConfig) -> Option<Duration> {
        let rate = config.requests_per_second;
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        let burst = f64::from(config.burst.max(1));
        let mut limiter = lock(&self.limiter);
        let now = Instant::now();
        let elapsed = now
            .saturating_duration_since(limiter.refilled)
            .as_secs_f64();
        limiter.tokens = (limiter.tokens + elapsed * rate).min(burst);
        limiter.refilled = now;
        if limiter.tokens >= 1.0 {
            limiter.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - limiter.tokens) / rate))
        }
    }

    /// Pauses the host for `wait` from now, unless it is paused longer already.
    fn pause(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut limiter = lock(&self.limiter);
        if limiter.paused_until.is_none_or(|current| current < until) {
            limiter.paused_until = Some(until);
        }
    }

    fn paused_at(&self, now: Instant) -> bool {
        lock(&self.limiter)
            .paused_until
            .is_some_and(|until| until > now)
    }
}

impl Counters {
    fn snapshot(&self) -> HostStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        HostStats {
            requests: load(&self.requests),
            errors: load(&self.errors),
            retries: load(&self.retries),
            rate_limited: load(&self.rate_limited),
            rate_limit_waits: load(&self.rate_limit_waits),
            rate_limit_wait: Duration::from_micros(load(&self.rate_limit_wait_micros)),
        }
    }
}

/// The origin of a base URL, the key of its host state.
fn origin_of(host: &str) -> Result<String, NetError> {
    let parsed =
        reqwest::Url::parse(host.trim_end_matches('/')).map_err(|err| NetError::BadUrl {
            url: host.to_owned(),
            reason: err.to_string(),
        })?;
    Ok(parsed.origin().ascii_serialization())
}

/// The exponential backoff ceiling of an attempt: `base * 2^attempt`, at most `backoff_max`.
fn backoff_cap(config: &XrpcConfig, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    config
        .backoff_base
        .saturating_mul(factor)
        .min(config.backoff_max)
}

/// A uniformly random delay up to the backoff ceiling ("full jitter"), so that callers that
/// failed together do not retry together.
fn full_jitter(config: &XrpcConfig, attempt: u32) -> Duration {
    backoff_cap(config, attempt).mul_f64(crate::random_fraction())
}

/// How long a 429 asks us to wait: `Retry-After` (seconds or an HTTP date), else
/// `ratelimit-reset`.
fn rate_limit_hint(headers: &HeaderMap) -> Option<Duration> {
    if let Some(value) = header_str(headers, header::RETRY_AFTER.as_str()) {
        if let Ok(seconds) = value.trim().parse::<u64>() {
            return Some(Duration::from_secs(seconds));
        }
        if let Some(at) = parse_http_date(value) {
            return Some(Duration::from_secs(at.saturating_sub(unix_now())));
        }
    }
    ratelimit_reset(headers)
}

/// On a success: how long until the host's budget refills, if `ratelimit-remaining` is 0.
fn exhausted_until(headers: &HeaderMap) -> Option<Duration> {
    let remaining = header_str(headers, "ratelimit-remaining")?.trim();
    if remaining.parse::<u64>().ok()? != 0 {
        return None;
    }
    ratelimit_reset(headers)
}

/// `ratelimit-reset`: unix seconds (the reference PDS), or seconds from now (the IETF
/// draft) when the number is too small to be a date.
fn ratelimit_reset(headers: &HeaderMap) -> Option<Duration> {
    let value: u64 = header_str(headers, "ratelimit-reset")?
        .trim()
        .parse()
        .ok()?;
    const YEAR_2001: u64 = 1_000_000_000;
    if value >= YEAR_2001 {
        Some(Duration::from_secs(value.saturating_sub(unix_now())))
    } else {
        Some(Duration::from_secs(value))
    }
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name)?.to_str().ok()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) into unix seconds.
fn parse_http_date(value: &str) -> Option<u64> {
    let mut parts = value.split_ascii_whitespace();
    let _weekday = parts.next()?;
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: u64 = parts.next()?.parse().ok()?;
    let mut clock = parts.next()?.split(':');
    let hour: u64 = clock.next()?.parse().ok()?;
    let minute: u64 = clock.next()?.parse().ok()?;
    let second: u64 = clock.next()?.parse().ok()?;
    if parts.next()? != "GMT" || !(1970..=9999).contains(&year) || !(1..=31).contains(&day) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), for years from 1970.
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Reads a body up to `limit` bytes; `false` when more followed (the rest is not read).
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
    host: &str,
) -> Result<(Vec<u8>, bool), NetError> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - body.len();
                if chunk.len() > room {
                    body.extend_from_slice(chunk.get(..room).unwrap_or_default());
                    return Ok((body, false));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok((body, true)),
            Err(err) => return Err(from_reqwest(host, "reading the body", &err)),
        }
    }
}

/// The error an unsuccessful response stands for: an XRPC error when the body is one, else
/// a short description of the body.
async fn error_response(call: &Call, response: reqwest::Response) -> NetError {
    let status = response.status().as_u16();
    let is_json = header_str(response.headers(), header::CONTENT_TYPE.as_str())
        .is_some_and(|value| value.contains("json"));
    let is_html = header_str(response.headers(), header::CONTENT_TYPE.as_str())
        .is_some_and(|value| value.contains("html"));
    let body = match read_capped(response, ERROR_BODY_BYTES, &call.host).await {
        Ok((body, _)) => body,
        // The status says enough; a body that fails to arrive adds nothing.
        Err(_) => Vec::new(),
    };
    #[derive(serde::Deserialize)]
    struct XrpcBody {
        error: Option<String>,
        message: Option<String>,
    }
    if !is_html
        && let Ok(parsed) = serde_json::from_slice::<XrpcBody>(&body)
        && (is_json || parsed.error.is_some())
    {
        return NetError::Xrpc {
            host: call.host.clone(),
            method: call.method.to_owned(),
            status,
            error: parsed.error.map(|error| truncate_chars(&error, 100)),
            message: parsed
                .message
                .map(|message| truncate_chars(&message, ERROR_MESSAGE_CHARS)),
        };
    }
    let looks_html = is_html || body.trim_ascii_start().starts_with(b"<");
    NetError::Http {
        host: call.host.clone(),
        method: call.method.to_owned(),
        status,
        body: if looks_html {
            describe_html(&body)
        } else if body.is_empty() {
            "empty body".to_owned()
        } else {
            excerpt_bytes(&body)
        },
    }
}

/// `HTML error page "502 Bad Gateway"`: the page's title, never the page.
fn describe_html(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let lower = text.to_ascii_lowercase();
    let title = lower.find("<title>").and_then(|start| {
        let start = start + "<title>".len();
        let end = start + lower.get(start..)?.find("</title>")?;
        let title = text.get(start..end)?.trim();
        (!title.is_empty()).then(|| truncate_chars(title, 100))
    });
    match title {
        Some(title) => format!("HTML error page {title:?}"),
        None => "HTML error page".to_owned(),
    }
}

/// At most [`ERROR_EXCERPT_BYTES`] of a body, as text with control characters escaped.
fn excerpt_bytes(body: &[u8]) -> String {
    let cut = body.get(..ERROR_EXCERPT_BYTES).unwrap_or(body);
    let text = String::from_utf8_lossy(cut);
    let mut out: String = text.chars().flat_map(char::escape_default).collect();
    if body.len() > ERROR_EXCERPT_BYTES {
        out.push('…');
    }
    out
}

fn excerpt(text: &str) -> String {
    truncate_chars(text, 64)
}

fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", text.get(..at).unwrap_or_default()),
        None => text.to_owned(),
    }
}

/// Turns a reqwest error into ours, keeping a guard refusal as itself.
pub(crate) fn from_reqwest(host: &str, doing: &str, err: &reqwest::Error) -> NetError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if let Some(net) = current.downcast_ref::<NetError>() {
            return net.clone();
        }
        source = current.source();
    }
    if err.is_timeout() {
        return NetError::Timeout {
            host: host.to_owned(),
            what: doing.to_owned(),
        };
    }
    NetError::Transport {
        host: host.to_owned(),
        reason: format!("{doing}: {}", error_chain(err)),
    }
}

/// An error and its sources as one line, repeated messages left out.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        let text = current.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        source = current.source();
    }
    parts.join(": ")
}

/// A `listRepos`/`listReposByCollection` page, entries kept raw so one bad entry does not
/// fail the page.
#[derive(serde::Deserialize)]
struct RawPage {
    #[serde(default)]
    repos: Vec<serde_json::Value>,
    cursor: Option<String>,
}

impl RawPage {
    /// The next cursor; a host that answers the cursor it was given would page forever.
    fn next_cursor(
        &self,
        host: &str,
        method: &str,
        asked: Option<&str>,
    ) -> Result<Option<String>, NetError> {
        match (&self.cursor, asked) {
            (Some(next), Some(asked)) if next == asked && !self.repos.is_empty() => {
                Err(NetError::BadResponse {
                    host: host.to_owned(),
                    method: method.to_owned(),
                    reason: format!("the cursor did not advance from {:?}", excerpt(asked)),
                })
            }
            (Some(next), Some(asked)) if next == asked => Ok(None),
            (Some(next), _) if next.is_empty() => Ok(None),
            (next, _) => Ok(next.clone()),
        }
    }
}

fn entry_did(entry: &serde_json::Value) -> Option<Did> {
    entry.get("did")?.as_str()?.parse().ok()
}

fn listed_repo(entry: &serde_json::Value) -> Option<ListedRepo> {
    let did = entry_did(entry)?;
    let text = |name: &str| entry.get(name).and_then(serde_json::Value::as_str);
    Some(ListedRepo {
        did,
        head: text("head").and_then(|head| head.parse().ok()),
        rev: text("rev").and_then(|rev| rev.parse().ok()),
        active: entry
            .get("active")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(true),
        status: text("status").map(|status| truncate_chars(status, 64)),
    })
}

/// A `getRepo` body being streamed: an [`AsyncRead`] of the CAR.
///
/// Reads fail with an [`io::Error`] whose inner error is a [`NetError`] (get it with
/// [`NetError::from_io`]): [`NetError::Timeout`] when the whole body took longer than
/// [`XrpcConfig::repo_timeout`] or nothing came for [`XrpcConfig::repo_idle_timeout`],
/// [`NetError::TooLarge`] past [`XrpcConfig::max_repo_bytes`], [`NetError::Transport`]
/// when the connection fails or ends early. It holds one of the host's concurrency slots
/// until dropped.
pub struct RepoBody {
    host: String,
    content_length: Option<u64>,
    stream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    chunk: Bytes,
    read: u64,
    limit: u64,
    deadline: Pin<Box<Sleep>>,
    repo_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    failed: Option<NetError>,
    done: bool,
    state: Arc<HostState>,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for RepoBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoBody")
            .field("host", &self.host)
            .field("content_length", &self.content_length)
            .field("read", &self.read)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl RepoBody {
    fn new(
        response: reqwest::Response,
        call: Call,
        permit: OwnedSemaphorePermit,
        config: &XrpcConfig,
    ) -> RepoBody {
        let now = Instant::now();
        RepoBody {
            content_length: response.content_length(),
            stream: Box::pin(response.bytes_stream()),
            host: call.host,
            chunk: Bytes::new(),
            read: 0,
            limit: config.max_repo_bytes,
            deadline: Box::pin(tokio::time::sleep_until(now + config.repo_timeout)),
            repo_timeout: config.repo_timeout,
            idle: Box::pin(tokio::time::sleep_until(now + config.repo_idle_timeout)),
            idle_timeout: config.repo_idle_timeout,
            failed: None,
            done: false,
            state: call.state,
            _permit: permit,
        }
    }

    /// The body's announced length, if the host sent one.
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// Bytes received so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// The host's origin.
    pub fn host(&self) -> &str {
        &self.host
    }

    fn fail(&mut self, err: NetError) {
        tracing::debug!(host = %self.host, %err, read = self.read, "xrpc: getRepo body failed");
        bump(&self.state.counters.errors);
        self.failed = Some(err);
    }
}

fn io_error(err: &NetError) -> io::Error {
    let kind = match err {
        NetError::Timeout { .. } => io::ErrorKind::TimedOut,
        NetError::TooLarge { .. } => io::ErrorKind::InvalidData,
        _ => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, err.clone())
}

impl AsyncRead for RepoBody {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(err) = &this.failed {
                return Poll::Ready(Err(io_error(err)));
            }
            if !this.chunk.is_empty() {
                let n = this.chunk.len().min(buf.remaining());
                buf.put_slice(&this.chunk.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.deadline.as_mut().poll(cx).is_ready() {
                let what = format!(
                    "reading the getRepo body (not whole after {:?}, {} bytes in)",
                    this.repo_timeout, this.read
                );
                this.fail(NetError::Timeout {
                    host: this.host.clone(),
                    what,
                });
                continue;
            }
            match this.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.read = this.read.saturating_add(chunk.len() as u64);
                    if this.read > this.limit {
                        this.fail(NetError::TooLarge {
                            host: this.host.clone(),
                            limit: this.limit,
                        });
                        continue;
                    }
                    let next_idle = Instant::now() + this.idle_timeout;
                    this.idle.as_mut().reset(next_idle);
                    this.chunk = chunk;
                }
                Poll::Ready(Some(Err(err))) => {
                    let doing = format!("reading the getRepo body ({} bytes in)", this.read);
                    let err = from_reqwest(&this.host, &doing, &err);
                    this.fail(err);
                }
                Poll::Ready(None) => match this.content_length {
                    Some(length) if this.read < length => {
                        let reason = format!(
                            "the getRepo body ended after {} of {length} bytes",
                            this.read
                        );
                        this.fail(NetError::Transport {
                            host: this.host.clone(),
                            reason,
                        });
                    }
                    _ => this.done = true,
                },
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        let what = format!(
                            "reading the getRepo body (no data for {:?}, {} bytes in)",
                            this.idle_timeout, this.read
                        );
                        this.fail(NetError::Timeout {
                            host: this.host.clone(),
                            what,
                        });
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2028 12:00:00 GMT"),
            Some(1_835_438_400)
        );
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 PST"), None);
        assert_eq!(parse_http_date("yesterday"), None);
        assert_eq!(parse_http_date("Sun, 06 Foo 1994 08:49:37 GMT"), None);
    }

    #[test]
    fn rate_limit_hints() -> Result<(), Box<dyn std::error::Error>> {
        let mut headers = HeaderMap::new();
        assert_eq!(rate_limit_hint(&headers), None);
        headers.insert("ratelimit-reset", (unix_now() + 30).to_string().parse()?);
        let wait = rate_limit_hint(&headers).ok_or("no hint from ratelimit-reset")?;
        assert!((29..=30).contains(&wait.as_secs()), "{wait:?}");
        headers.insert("retry-after", "7".parse()?);
        assert_eq!(rate_limit_hint(&headers), Some(Duration::from_secs(7)));
        headers.insert("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT".parse()?);
        assert_eq!(rate_limit_hint(&headers), Some(Duration::ZERO));
        assert_eq!(exhausted_until(&headers), None, "no ratelimit-remaining");
        headers.insert("ratelimit-remaining", "0".parse()?);
        assert!(exhausted_until(&headers).is_some());
        headers.insert("ratelimit-remaining", "12".parse()?);
        assert_eq!(exhausted_until(&headers), None);
        Ok(())
    }

    #[test]
    fn html_pages_are_described_not_dumped() {
        let page = b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\
            <center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>";
        assert_eq!(describe_html(page), "HTML error page \"502 Bad Gateway\"");
        assert_eq!(describe_html(b"<html><body>oops"), "HTML error page");
        let long = vec![b'x'; 5000];
        let text = excerpt_bytes(&long);
        assert!(text.len() <= ERROR_EXCERPT_BYTES + 4, "{}", text.len());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = XrpcConfig::default();
        assert_eq!(backoff_cap(&config, 0), Duration::from_millis(500));
        assert_eq!(backoff_cap(&config, 3), Duration::from_secs(4));
        assert_eq!(backoff_cap(&config, 10), Duration::from_secs(30));
        assert_eq!(backoff_cap(&config, 500), Duration::from_secs(30));
        for attempt in 0..8 {
            assert!(full_jitter(&config, attempt) <= backoff_cap(&config, attempt));
        }
    }

    #[test]
    fn transient_and_permanent() {
        let xrpc = |status: u16, error: &str| NetError::Xrpc {
            host: "h".into(),
            method: "m".into(),
            status,
            error: Some(error.into()),
            message: None,
        };
        assert!(xrpc(500, "InternalServerError").is_transient());
        assert!(xrpc(503, "x").is_transient());
        assert!(!xrpc(501, "MethodNotImplemented").is_transient());
        assert!(!xrpc(400, "InvalidRequest").is_transient());
        assert_eq!(
            xrpc(400, "RepoDeactivated").repo_unavailable(),
            Some("RepoDeactivated")
        );
        assert!(xrpc(400, "RepoNotFound").is_not_found());
        assert!(!xrpc(400, "InvalidRequest").is_not_found());
    }

    #[test]
    fn cursors_that_do_not_advance_end_or_fail() {
        let page = |cursor: Option<&str>, n: usize| RawPage {
            repos: vec![serde_json::json!({"did": "did:plc:x"}); n],
            cursor: cursor.map(str::to_owned),
        };
        assert!(page(Some("a"), 1).next_cursor("h", "m", Some("a")).is_err());
        assert_eq!(
            page(Some("a"), 0).next_cursor("h", "m", Some("a")).ok(),
            Some(None)
        );
        assert_eq!(
            page(Some("b"), 1).next_cursor("h", "m", Some("a")).ok(),
            Some(Some("b".to_owned()))
        );
        assert_eq!(
            page(Some(""), 1).next_cursor("h", "m", None).ok(),
            Some(None)
        );
    }
}
