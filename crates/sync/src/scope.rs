//! What the engine tracks and what it keeps: the mode (which repos) and the collection
//! filters (which records).
//!
//! Patterns are NSIDs, or NSID prefixes ending in a whole `*` segment (`fm.teal.*`), or `*`
//! alone. Tap accepts `app.bsky*` and then matches `app.bskyfoo.x`; a pattern names a
//! namespace, so a wildcard inside a segment is refused with an error that says so.

use std::fmt;
use std::str::FromStr;

use atpdb_repo::syntax::Nsid;

/// A refused pattern, with the text and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("collection pattern {pattern:?}: {reason}")]
pub struct PatternError {
    /// The pattern as given.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// One collection pattern: an exact NSID or a namespace prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Exactly this collection.
    Exact(Nsid),
    /// Every collection under this prefix (stored with its trailing dot, `fm.teal.`); the
    /// empty prefix is `*`, everything.
    Prefix(String),
}

impl Pattern {
    /// Whether `collection` is matched.
    pub fn matches(&self, collection: &str) -> bool {
        match self {
            Pattern::Exact(nsid) => nsid.as_str() == collection,
            Pattern::Prefix(prefix) => collection.starts_with(prefix.as_str()),
        }
    }

    /// The exact NSID, for a relay's `listReposByCollection` (which takes no wildcard).
    pub fn exact(&self) -> Option<&Nsid> {
        match self {
            Pattern::Exact(nsid) => Some(nsid),
            Pattern::Prefix(_) => None,
        }
    }
}

impl FromStr for Pattern {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<Pattern, PatternError> {
        let error = |reason| PatternError {
            pattern: text.to_owned(),
            reason,
        };
        let text = text.trim();
        if text == "*" {
            return Ok(Pattern::Prefix(String::new()));
        }
        if let Some(prefix) = text.strip_suffix(".*") {
            if prefix.contains('*') {
                return Err(error("only the last segment may be *"));
            }
            if prefix.is_empty() || prefix.split('.').any(|segment| !is_segment(segment)) {
                return Err(error(
                    "the part before .* must be dot-separated NSID segments",
                ));
            }
            return Ok(Pattern::Prefix(format!("{prefix}.")));
        }
        if text.contains('*') {
            return Err(error(
                "a wildcard must be a whole segment at the end (fm.teal.* is allowed, app.bsky* is not)",
            ));
        }
        text.parse::<Nsid>()
            .map(Pattern::Exact)
            .map_err(|_| error("not a valid NSID"))
    }
}

/// A segment of an NSID's domain part: letters, digits and hyphens, not at either end.
fn is_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= 63
        && segment
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
        && !segment.starts_with('-')
        && !segment.ends_with('-')
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(nsid) => f.write_str(nsid.as_str()),
            Pattern::Prefix(prefix) if prefix.is_empty() => f.write_str("*"),
            Pattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// A set of patterns; the empty set means every collection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    patterns: Vec<Pattern>,
}

impl Filters {
    /// Every collection.
    pub fn all() -> Filters {
        Filters::default()
    }

    /// From patterns already parsed.
    pub fn new(patterns: Vec<Pattern>) -> Filters {
        Filters { patterns }
    }

    /// Parses a comma-separated list (`TAP_COLLECTION_FILTERS`'s form); blanks are skipped.
    ///
    /// # Errors
    ///
    /// The first pattern that does not parse.
    pub fn parse_list(text: &str) -> Result<Filters, PatternError> {
        let patterns = text
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Pattern>, _>>()?;
        Ok(Filters { patterns })
    }

    /// Whether `collection` passes.
    pub fn matches(&self, collection: &str) -> bool {
        self.patterns.is_empty()
            || self
                .patterns
                .iter()
                .any(|pattern| pattern.matches(collection))
    }

    /// The patterns.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// Whether every collection passes.
    pub fn is_all(&self) -> bool {
        self.patterns.is_empty()
    }
}

impl fmt::Display for Filters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, pattern) in self.patterns.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{pattern}")?;
        }
        Ok(())
    }
}

/// Which repos the engine tracks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Only repos added through the API.
    Manual,
    /// Repos that write any of these collections: enumerated with
    /// `listReposByCollection` (for exact NSIDs), and any repo whose commit touches one.
    Signal(Vec<Pattern>),
    /// Every active repo: enumerated with `listRepos`, and any repo seen on the firehose.
    Full,
}

impl Mode {
    /// Whether a firehose `#commit` whose ops touch `collections` makes an untracked repo
    /// tracked.
    pub fn tracks_commit<'a>(&self, mut collections: impl Iterator<Item = &'a str>) -> bool {
        match self {
            Mode::Manual => false,
            Mode::Full => true,
            Mode::Signal(patterns) => {
                collections.any(|collection| patterns.iter().any(|p| p.matches(collection)))
            }
        }
    }

    /// Whether any other event (`#sync`, `#identity`, an active `#account`) from an untracked
    /// repo makes it tracked.
    pub fn tracks_any_event(&self) -> bool {
        matches!(self, Mode::Full)
    }

    /// The mode's name, as `GET /config` shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Manual => "manual",
            Mode::Signal(_) => "signal",
            Mode::Full => "full",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_only_at_segment_boundaries() {
        for good in ["*", "fm.teal.*", "app.bsky.feed.post", "com.ex-ample.*"] {
            assert!(good.parse::<Pattern>().is_ok(), "{good}");
        }
        for bad in [
            "app.bsky*",
            "app.*.post",
            "*.post",
            "app.bsky.**",
            ".*",
            "app..*",
            "not an nsid",
            "app.-x.*",
        ] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn prefix_matches_whole_segments_only() -> Result<(), PatternError> {
        let filters = Filters::parse_list("fm.teal.*, app.bsky.feed.post")?;
        assert!(filters.matches("fm.teal.alpha.play"));
        assert!(filters.matches("app.bsky.feed.post"));
        assert!(!filters.matches("fm.tealx.play"));
        assert!(!filters.matches("app.bsky.feed.postgres"));
        assert!(!filters.matches("app.bsky.feed.like"));
        assert!(Filters::parse_list("")?.matches("anything.at.all"));
        assert!(Filters::parse_list("*")?.matches("anything.at.all"));
        assert_eq!(filters.to_string(), "fm.teal.*,app.bsky.feed.post");
        Ok(())
    }

    #[test]
    fn signal_mode_tracks_commits_touching_a_signal() -> Result<(), PatternError> {
        let mode = Mode::Signal(vec!["fm.teal.*".parse()?]);
        assert!(mode.tracks_commit(["app.bsky.feed.like", "fm.teal.alpha.play"].into_iter()));
        assert!(!mode.tracks_commit(["app.bsky.feed.like"].into_iter()));
        assert!(!Mode::Manual.tracks_commit(["fm.teal.alpha.play"].into_iter()));
        assert!(Mode::Full.tracks_commit(std::iter::empty()));
        Ok(())
    }
}
