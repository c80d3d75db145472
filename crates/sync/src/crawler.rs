//! Enumerating repos: `listRepos` (full network) or `listReposByCollection` (signal mode)
//! from the relay, paging with a cursor saved per relay and collection in the same batch as
//! the repos the page added, so a restart resumes where it stopped.
//!
//! A relay that fails at one cursor five times running would stall the crawl forever (rsky's
//! enumerator looped on a 500 at one cursor); the crawler then ends the pass, says so, and
//! tries again after its interval.

use std::sync::Arc;
use std::time::Duration;

use atpdb_repo::syntax::Did;
use atpdb_store::{RepoEntry, StoreError};

use crate::scope::Mode;
use crate::{Inner, SyncError, now_us};

/// Repos per listing page (the lexicon's maximum).
const PAGE: u32 = 1000;
/// Failures in a row at one cursor before the pass gives up on it.
const MAX_FAILURES: u32 = 5;

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

/// The cursor just past `cursor` when cursors are positions (a relay's numeric `listRepos`
/// cursor): skipping exactly the entry the host cannot serve. `None` for any other cursor.
fn skip_past(cursor: Option<&str>) -> Option<String> {
    let position: u64 = cursor?.parse().ok()?;
    Some(position.checked_add(1)?.to_string())
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
    let mut cursor = inner
        .store
        .cursor(&name)?
        .filter(|cursor| !cursor.is_empty());
    let mut added = 0;
    let mut failures = 0;
    // Shrinks when a host keeps failing at one cursor (it may choke on one entry of the
    // page), and grows back after each success.
    let mut limit = PAGE;
    loop {
        if inner.shutdown.is_cancelled() {
            return Err(Stop::Shutdown);
        }
        let page = match collection {
            None => inner
                .xrpc
                .list_repos(relay, cursor.as_deref(), limit)
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
                .list_repos_by_collection(relay, collection, cursor.as_deref(), limit)
                .await
                .map(|page| (page.dids, page.cursor)),
        };
        let (dids, next) = match page {
            Ok(page) => {
                failures = 0;
                limit = (limit * 2).min(PAGE);
                page
            }
            Err(err) => {
                failures += 1;
                if !err.is_transient() {
                    return Err(Stop::Failed(format!(
                        "listing {name} at cursor {cursor:?}: {err}"
                    )));
                }
                if failures >= MAX_FAILURES {
                    // Five in a row at one cursor: skip ahead rather than stall the crawl.
                    if limit > 1 {
                        limit = (limit / 8).max(1);
                        tracing::warn!(listing = %name, ?cursor, limit, %err, "crawler.smaller_pages");
                    } else if let Some(next) = skip_past(cursor.as_deref()) {
                        tracing::warn!(
                            listing = %name,
                            ?cursor,
                            %next,
                            %err,
                            "crawler.skipped: the host keeps failing on the entry after this cursor"
                        );
                        cursor = Some(next);
                    } else {
                        return Err(Stop::Failed(format!(
                            "listing {name} at cursor {cursor:?} failed {failures} times, even \
                             one entry at a time, and an opaque cursor cannot be skipped: {err}"
                        )));
                    }
                    failures = 0;
                    continue;
                }
                let delay = crate::backfill::backoff(
                    inner.config.backoff_min.min(Duration::from_millis(500)),
                    Duration::from_secs(30),
                    failures,
                );
                tokio::select! {
                    () = inner.shutdown.cancelled() => return Err(Stop::Shutdown),
                    () = tokio::time::sleep(delay) => {}
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
        let done = next.is_none() || next == cursor;
        if let Some(next) = &next {
            batch.set_cursor(&name, next);
        }
        batch.commit()?;
        inner.work.notify_waiters();
        if done {
            return Ok(added);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_numeric_cursors_are_skipped_past() {
        assert_eq!(skip_past(Some("41")).as_deref(), Some("42"));
        assert_eq!(skip_past(Some("did:plc:abc")), None);
        assert_eq!(skip_past(None), None);
        assert_eq!(skip_past(Some(&u64::MAX.to_string())), None);
    }
}
