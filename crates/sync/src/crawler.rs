//! Enumerating repos: `listRepos` (full network) or `listReposByCollection` (signal mode)
//! from the relay, paging with a cursor saved per relay and collection in the same batch as
//! the repos the page added, so a restart resumes where it stopped.
//!
//! A relay that keeps failing at one cursor cannot stall the crawl: `atpdb_net::listing`
//! shrinks the page and then skips the entry, and says so; a listing it cannot go on with
//! ends the pass, which is tried again after the crawler's interval.

use std::sync::Arc;
use std::time::Duration;

use atpdb_net::listing::{Pager, Retry};
use atpdb_repo::syntax::Did;
use atpdb_store::{RepoEntry, StoreError};

use crate::scope::Mode;
use crate::{Inner, SyncError, now_us};

/// Repos per listing page (the lexicon's maximum).
const PAGE: u32 = 1000;

/// Crawls now, then again every `crawl_interval`, until shutdown.
pub(crate) async fn run(inner: Arc<Inner>) -> Result<(), SyncError> {
    loop {
        let pause = match crawl_once(&inner).await {
            Ok(added) => {
                tracing::info!(added, "crawler.pass_done");
                inner.config.crawl_interval
            }
            Err(Stop::Shutdown) => return Ok(()),
            Err(Stop::Store(err)) => return Err(err.into()),
            Err(Stop::Failed(reason)) => {
                tracing::warn!(reason = %reason, "crawler.pass_failed");
                inner.config.crawl_interval.min(Duration::from_secs(60))
            }
        };
        // A scope change (PUT /config) starts the next pass at once.
        tokio::select! {
            () = inner.shutdown.cancelled() => return Ok(()),
            () = inner.scope_changed.notified() => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
}

enum Stop {
    Shutdown,
    Store(StoreError),
    Failed(String),
}

impl From<StoreError> for Stop {
    fn from(err: StoreError) -> Stop {
        Stop::Store(err)
    }
}

/// The crawler cursor name for a relay and a listing.
pub fn crawler_cursor_name(relay_url: &str, listing: &str) -> String {
    format!("crawler:{}:{listing}", relay_url.trim_end_matches('/'))
}

async fn crawl_once(inner: &Inner) -> Result<u64, Stop> {
    let scope = inner.scope();
    match &scope.mode {
        Mode::Manual => Ok(0),
        Mode::Full => crawl_listing(inner, None).await,
        Mode::Signal(patterns) => {
            let mut added = 0;
            for pattern in patterns {
                match pattern.exact() {
                    Some(collection) => added += crawl_listing(inner, Some(collection)).await?,
                    None => tracing::warn!(
                        %pattern,
                        "crawler: a relay cannot list repos by a wildcard; \
                         repos are tracked as their commits arrive"
                    ),
                }
            }
            Ok(added)
        }
    }
}

async fn crawl_listing(
    inner: &Inner,
    collection: Option<&atpdb_repo::syntax::Nsid>,
) -> Result<u64, Stop> {
    let relay = inner.config.relay_url.as_str();
    let name = crawler_cursor_name(
        relay,
        collection.map_or("listRepos", atpdb_repo::syntax::Nsid::as_str),
    );
    let mut pager = Pager::new(inner.store.cursor(&name)?, PAGE);
    let mut added = 0;
    loop {
        if inner.shutdown.is_cancelled() {
            return Err(Stop::Shutdown);
        }
        let (cursor, limit) = (pager.cursor(), pager.limit());
        let page = match collection {
            None => inner
                .xrpc
                .list_repos(relay, cursor, limit)
                .await
                .map(|page| {
                    let dids: Vec<Did> = page
                        .repos
                        .into_iter()
                        .filter(|repo| repo.active)
                        .map(|repo| repo.did)
                        .collect();
                    (dids, page.cursor)
                }),
            Some(collection) => inner
                .xrpc
                .list_repos_by_collection(relay, collection, cursor, limit)
                .await
                .map(|page| (page.dids, page.cursor)),
        };
        let (dids, next) = match page {
            Ok(page) => page,
            Err(err) => {
                match pager.failed(&err) {
                    Retry::After(delay) => tokio::select! {
                        () = inner.shutdown.cancelled() => return Err(Stop::Shutdown),
                        () = tokio::time::sleep(delay) => {}
                    },
                    Retry::Smaller { limit } => {
                        tracing::warn!(listing = %name, limit, %err, "crawler.smaller_pages");
                    }
                    Retry::Skipped { from, to } => tracing::warn!(
                        listing = %name,
                        ?from,
                        %to,
                        %err,
                        "crawler.skipped: the host keeps failing on the entry after this cursor"
                    ),
                    Retry::GiveUp(reason) => {
                        return Err(Stop::Failed(format!("listing {name} {reason}")));
                    }
                }
                continue;
            }
        };
        let mut batch = inner.store.batch();
        for did in dids {
            if inner.store.repo(&did)?.is_none() {
                batch.put_repo(&RepoEntry::new(did, now_us()));
                added += 1;
            }
        }
        if let Some(next) = &next {
            batch.set_cursor(&name, next);
        }
        batch.commit()?;
        inner.work.notify_waiters();
        if pager.advance(next) {
            return Ok(added);
        }
    }
}
