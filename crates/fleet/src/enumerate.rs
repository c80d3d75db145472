//! `atpdb fleet enumerate` (rsky's BackfillIngester): every repo the relays list, into
//! `repo_backfill`.
//!
//! Each page's entries and the relay's cursor are written in one MULTI/EXEC, so a crash
//! between pages resumes at the next page, and a page is never queued twice. A relay that
//! keeps failing at one cursor is handled by `atpdb_net::listing` (smaller pages, then one
//! entry skipped, and said so), never retried forever. When a listing ends the relay's cursor
//! key reads `!ingester-done` (the seed's marker) and the position is kept beside it, so
//! the re-check after `recheck` lists only repos created since.

use std::time::Duration;

use atpdb_net::Xrpc;
use atpdb_net::listing::{Pager, Retry};
use tokio_util::sync::CancellationToken;

use crate::{ConnectionManager, FleetError, RepoJob, hostname, wait_below};

/// The value of a relay's cursor key once its listing has ended.
pub const DONE: &str = "!ingester-done";

/// Repos per `listRepos` page (the lexicon's maximum).
const PAGE: u32 = 1000;

/// What [`run`] does.
#[derive(Debug, Clone)]
pub struct EnumerateConfig {
    /// Relay (or PDS) base URLs: `https://relay.example` or `http://127.0.0.1:PORT`.
    pub relays: Vec<String>,
    /// The stream written (`repo_backfill`).
    pub stream: String,
    /// Entries per listing page, and so per transaction (at most the lexicon's 1,000).
    pub batch_size: usize,
    /// Wait while the stream holds this many entries (the backfillers are behind).
    pub high_water: u64,
    /// List again after this long, from where the last listing ended; `None`: one pass.
    pub recheck: Option<Duration>,
}

impl Default for EnumerateConfig {
    fn default() -> EnumerateConfig {
        EnumerateConfig {
            relays: Vec::new(),
            stream: "repo_backfill".to_owned(),
            batch_size: 500,
            high_water: 1_000_000,
            recheck: Some(Duration::from_secs(300)),
        }
    }
}

/// What one pass over a relay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Listed {
    /// Entries queued.
    pub queued: u64,
    /// Pages read.
    pub pages: u64,
    /// Entries skipped after a host kept failing on them.
    pub skipped: u64,
}

/// The key holding a relay's cursor: `{stream}:cursor:{hostname}`.
pub fn cursor_key(stream: &str, relay: &str) -> String {
    format!("{stream}:cursor:{}", hostname(relay))
}

/// Lists every relay, then again after each `recheck`, until `shutdown`.
///
/// # Errors
///
/// [`FleetError`] when Redis fails or a listing cannot go on; the caller decides whether to
/// exit or start again.
pub async fn run(
    xrpc: &Xrpc,
    redis: &mut ConnectionManager,
    config: &EnumerateConfig,
    shutdown: &CancellationToken,
) -> Result<(), FleetError> {
    if config.relays.is_empty() {
        return Err(FleetError::Config("no relay to enumerate".to_owned()));
    }
    loop {
        for relay in &config.relays {
            let listed = list_relay(xrpc, redis, config, relay, shutdown).await?;
            tracing::info!(
                relay,
                queued = listed.queued,
                pages = listed.pages,
                skipped = listed.skipped,
                "enumerate.done"
            );
        }
        let Some(pause) = config.recheck else {
            return Ok(());
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// One pass over one relay, from its saved position.
///
/// # Errors
///
/// [`FleetError::Redis`], or [`FleetError::Listing`] when the relay's listing cannot go on.
pub async fn list_relay(
    xrpc: &Xrpc,
    redis: &mut ConnectionManager,
    config: &EnumerateConfig,
    relay: &str,
    shutdown: &CancellationToken,
) -> Result<Listed, FleetError> {
    let key = cursor_key(&config.stream, relay);
    let position_key = format!("{key}:position");
    let saved: Option<String> = redis::cmd("GET").arg(&key).query_async(redis).await?;
    let last_key = format!("{key}:last");
    // After a finished listing, start again at the last page read, past its last entry.
    let (start, mut skip_through) = match saved.as_deref() {
        Some(DONE) => {
            let position: Option<String> = redis::cmd("GET")
                .arg(&position_key)
                .query_async(redis)
                .await?;
            let last: Option<String> = redis::cmd("GET").arg(&last_key).query_async(redis).await?;
            (position, last)
        }
        _ => (saved, None),
    };
    let mut pager = Pager::new(
        start,
        u32::try_from(config.batch_size)
            .unwrap_or(PAGE)
            .clamp(1, PAGE),
    );
    let mut listed = Listed::default();
    loop {
        if shutdown.is_cancelled() {
            return Ok(listed);
        }
        wait_below(redis, &config.stream, config.high_water, shutdown).await?;
        let page_start = pager.cursor().map(str::to_owned);
        let page = match xrpc.list_repos(relay, pager.cursor(), pager.limit()).await {
            Ok(page) => page,
            Err(err) => {
                match pager.failed(&err) {
                    Retry::After(delay) => tokio::select! {
                        () = shutdown.cancelled() => return Ok(listed),
                        () = tokio::time::sleep(delay) => {}
                    },
                    Retry::Smaller { limit } => {
                        tracing::warn!(relay, limit, %err, "enumerate.smaller_pages");
                    }
                    Retry::Skipped { from, to } => {
                        listed.skipped += 1;
                        tracing::warn!(
                            relay,
                            ?from,
                            %to,
                            %err,
                            "enumerate.skipped: the relay keeps failing on the entry after this cursor"
                        );
                    }
                    Retry::GiveUp(reason) => {
                        return Err(FleetError::Listing {
                            relay: relay.to_owned(),
                            reason,
                        });
                    }
                }
                continue;
            }
        };
        listed.pages += 1;
        let next = page.cursor.clone();
        let mut repos = page.repos.as_slice();
        if let Some(last) = skip_through.take()
            && let Some(at) = repos.iter().position(|repo| repo.did.as_str() == last)
        {
            repos = &repos[at + 1..];
        }
        let last_did = repos.last().map(|repo| repo.did.to_string());
        let jobs: Vec<String> = repos
            .iter()
            .map(|repo| {
                serde_json::to_string(&RepoJob {
                    did: repo.did.to_string(),
                    host: relay.to_owned(),
                    rev: repo
                        .rev
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    status: repo.status.clone(),
                    active: repo.active,
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|err| FleetError::Config(format!("encoding an entry: {err}")))?;
        let done = pager.advance(next);
        // The page's entries and where the next page starts, or that the listing ended:
        // all or nothing.
        let mut pipe = redis::pipe();
        pipe.atomic();
        for job in &jobs {
            pipe.cmd("XADD")
                .arg(&config.stream)
                .arg("*")
                .arg("repo")
                .arg(job)
                .ignore();
        }
        // Where this page started, and its last entry: a re-check reads the page again
        // (the host may have appended to it) and queues only what follows that entry.
        match &page_start {
            Some(cursor) => pipe.cmd("SET").arg(&position_key).arg(cursor).ignore(),
            None => pipe.cmd("DEL").arg(&position_key).ignore(),
        };
        if let Some(did) = &last_did {
            pipe.cmd("SET").arg(&last_key).arg(did).ignore();
        }
        pipe.cmd("SET")
            .arg(&key)
            .arg(if done {
                DONE
            } else {
                pager.cursor().unwrap_or_default()
            })
            .ignore();
        pipe.query_async::<()>(redis).await?;
        listed.queued += jobs.len() as u64;
        if done {
            return Ok(listed);
        }
    }
}
