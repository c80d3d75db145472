//! Paging through a host's repo listing (`listRepos`, `listReposByCollection`) without ever
//! stalling on one cursor.
//!
//! rsky's enumerator looped forever on a relay that answered 500 at one cursor. The policy
//! here, shared by the engine's crawler and the fleet's enumerator: transient failures are
//! retried with backoff; after [`MAX_FAILURES`] in a row at one cursor the page shrinks (the
//! host may choke on one entry of it), down to one entry; if even that keeps failing and the
//! cursor is a position (a relay's numeric cursor), the pager skips just past that entry and
//! says so. An opaque cursor cannot be skipped: the pass fails with the reason.

use std::time::Duration;

use crate::NetError;

/// Failures in a row at one cursor before the page shrinks or the cursor is skipped.
pub const MAX_FAILURES: u32 = 5;

/// Where a listing is and how large its next page is.
#[derive(Debug, Clone)]
pub struct Pager {
    cursor: Option<String>,
    limit: u32,
    max_limit: u32,
    failures: u32,
}

/// What to do after a failed page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retry {
    /// Ask again at the same cursor after this delay.
    After(Duration),
    /// Five failures in a row: the page is now `limit` entries; ask again at once.
    Smaller {
        /// The new page size.
        limit: u32,
    },
    /// Five failures in a row at one entry: the cursor moved past it; ask again at once.
    Skipped {
        /// The cursor given up on.
        from: Option<String>,
        /// The cursor now.
        to: String,
    },
    /// The listing cannot go on: a permanent error, or an opaque cursor that keeps failing.
    GiveUp(String),
}

impl Pager {
    /// A pager starting at `cursor` (none: the beginning) with pages of `max_limit`.
    pub fn new(cursor: Option<String>, max_limit: u32) -> Pager {
        let max_limit = max_limit.max(1);
        Pager {
            cursor: cursor.filter(|cursor| !cursor.is_empty()),
            limit: max_limit,
            max_limit,
            failures: 0,
        }
    }

    /// The cursor to ask at.
    pub fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref()
    }

    /// The page size to ask for.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Records a page that arrived; returns whether the listing has ended (no next cursor,
    /// or a host that returned the cursor it was given).
    pub fn advance(&mut self, next: Option<String>) -> bool {
        self.failures = 0;
        self.limit = self.limit.saturating_mul(2).min(self.max_limit);
        let done = next.is_none() || next == self.cursor;
        if !done {
            self.cursor = next;
        }
        done
    }

    /// Records a failed page and says what to do next.
    pub fn failed(&mut self, err: &NetError) -> Retry {
        if !err.is_transient() {
            return Retry::GiveUp(format!("at cursor {:?}: {err}", self.cursor));
        }
        self.failures += 1;
        if self.failures < MAX_FAILURES {
            return Retry::After(backoff(self.failures));
        }
        self.failures = 0;
        if self.limit > 1 {
            self.limit = (self.limit / 8).max(1);
            return Retry::Smaller { limit: self.limit };
        }
        match skip_past(self.cursor.as_deref()) {
            Some(next) => {
                let from = self.cursor.replace(next.clone());
                Retry::Skipped { from, to: next }
            }
            None => Retry::GiveUp(format!(
                "at cursor {:?} the host failed {MAX_FAILURES} times in a row, even one entry \
                 at a time, and an opaque cursor cannot be skipped: {err}",
                self.cursor
            )),
        }
    }
}

/// 250 ms doubling per failure up to 30 s, with up to a tenth of jitter.
fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(250)
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(Duration::from_secs(30));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::from(elapsed.subsec_nanos()));
    let range = u64::try_from(base.as_micros() / 10).unwrap_or(0).max(1);
    base + Duration::from_micros(nanos % range)
}

/// The cursor just past `cursor` when cursors are positions (a relay's numeric `listRepos`
/// cursor): skipping exactly the entry the host cannot serve. `None` for any other cursor.
fn skip_past(cursor: Option<&str>) -> Option<String> {
    let position: u64 = cursor?.parse().ok()?;
    Some(position.checked_add(1)?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error() -> NetError {
        NetError::Http {
            host: "relay".to_owned(),
            method: "com.atproto.sync.listRepos".to_owned(),
            status: 500,
            body: "boom".to_owned(),
        }
    }

    #[test]
    fn only_numeric_cursors_are_skipped_past() {
        assert_eq!(skip_past(Some("41")).as_deref(), Some("42"));
        assert_eq!(skip_past(Some("did:plc:abc")), None);
        assert_eq!(skip_past(None), None);
        assert_eq!(skip_past(Some(&u64::MAX.to_string())), None);
    }

    #[test]
    fn repeated_failures_shrink_the_page_then_skip_one_entry() {
        let mut pager = Pager::new(Some("41".to_owned()), 1000);
        let mut smaller = Vec::new();
        let skipped = loop {
            match pager.failed(&server_error()) {
                Retry::After(delay) => assert!(delay <= Duration::from_secs(33)),
                Retry::Smaller { limit } => smaller.push(limit),
                Retry::Skipped { from, to } => break (from, to),
                Retry::GiveUp(reason) => panic!("gave up: {reason}"),
            }
        };
        assert_eq!(smaller, [125, 15, 1]);
        assert_eq!(skipped, (Some("41".to_owned()), "42".to_owned()));
        assert_eq!(pager.cursor(), Some("42"));
        // A page that arrives grows the page size back.
        assert!(!pager.advance(Some("50".to_owned())));
        assert_eq!((pager.cursor(), pager.limit()), (Some("50"), 2));
        assert!(pager.advance(None));
    }

    #[test]
    fn an_opaque_cursor_that_keeps_failing_gives_up() {
        let mut pager = Pager::new(Some("did:plc:abc".to_owned()), 1);
        let outcome = (0..MAX_FAILURES)
            .map(|_| pager.failed(&server_error()))
            .last();
        assert!(matches!(outcome, Some(Retry::GiveUp(_))));
    }
}
