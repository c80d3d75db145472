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

/// What the engine tracks and keeps, changeable while it runs ([`crate::Engine::set_scope`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Which repos are tracked.
    pub mode: Mode,
    /// Which records are kept and emitted.
    pub filters: Filters,
}

impl Scope {
    /// Whether `self` keeps records that `before` did not: then the stored repos lack them
    /// and need a fresh snapshot. A change counts as widening unless every new pattern was
    /// already there (dropping patterns only narrows).
    pub fn widens(&self, before: &Scope) -> bool {
        if before.filters.is_all() {
            return false;
        }
        self.filters.is_all()
            || self
                .filters
                .patterns()
                .iter()
                .any(|pattern| !before.filters.patterns().contains(pattern))
    }

    /// The stored form (`config` key `scope`): names and pattern texts.
    pub fn to_json(&self) -> serde_json::Value {
        let signals: Vec<String> = match &self.mode {
            Mode::Signal(patterns) => patterns.iter().map(ToString::to_string).collect(),
            _ => Vec::new(),
        };
        serde_json::json!({
            "mode": self.mode.name(),
            "signal_collections": signals,
            "collection_filters": self
                .filters
                .patterns()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        })
    }

    /// `self` with the fields `change` names replaced (`mode`, `signal_collections`,
    /// `collection_filters`); unknown fields are refused, so a typo is not silently ignored.
    ///
    /// # Errors
    ///
    /// A message naming the field that is wrong.
    pub fn updated(&self, change: &serde_json::Value) -> Result<Scope, String> {
        let object = change.as_object().ok_or("the body must be a JSON object")?;
        for key in object.keys() {
            if !matches!(
                key.as_str(),
                "mode" | "signal_collections" | "collection_filters"
            ) {
                return Err(format!(
                    "{key:?} cannot be changed at runtime (mode, signal_collections and \
                     collection_filters can)"
                ));
            }
        }
        let patterns = |key: &str| -> Result<Option<Vec<Pattern>>, String> {
            let Some(value) = object.get(key) else {
                return Ok(None);
            };
            let texts: Vec<&str> = match value {
                serde_json::Value::String(text) => text.split(',').map(str::trim).collect(),
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|item| item.as_str().ok_or(format!("{key}: expected strings")))
                    .collect::<Result<_, _>>()?,
                _ => return Err(format!("{key}: expected a list of NSID patterns")),
            };
            texts
                .into_iter()
                .filter(|text| !text.is_empty())
                .map(|text| {
                    text.parse::<Pattern>()
                        .map_err(|err| format!("{key}: {err}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        };
        let signals = patterns("signal_collections")?;
        let filters =
            patterns("collection_filters")?.map_or_else(|| self.filters.clone(), Filters::new);
        let current_signals = match &self.mode {
            Mode::Signal(patterns) => patterns.clone(),
            _ => Vec::new(),
        };
        let mode_name = match object.get("mode") {
            None => self.mode.name(),
            Some(serde_json::Value::String(name)) => name.as_str(),
            Some(_) => return Err("mode: expected \"manual\", \"signal\" or \"full\"".into()),
        };
        let mode = match mode_name {
            "manual" => Mode::Manual,
            "full" => Mode::Full,
            "signal" => {
                let signals = signals.unwrap_or(current_signals);
                if signals.is_empty() {
                    return Err("mode signal needs signal_collections".into());
                }
                Mode::Signal(signals)
            }
            other => {
                return Err(format!(
                    "mode: {other:?} is not one of \"manual\", \"signal\", \"full\""
                ));
            }
        };
        Ok(Scope { mode, filters })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_updates_validate_and_know_when_they_widen() -> Result<(), String> {
        let before = Scope {
            mode: Mode::Manual,
            filters: Filters::parse_list("app.bsky.feed.post").map_err(|e| e.to_string())?,
        };
        let after = before.updated(&serde_json::json!({
            "mode": "signal",
            "signal_collections": ["fm.teal.*"],
            "collection_filters": ["app.bsky.feed.post", "fm.teal.*"],
        }))?;
        assert_eq!(after.mode.name(), "signal");
        assert!(after.widens(&before), "a new pattern widens");
        let narrower = after.updated(&serde_json::json!({"collection_filters": "fm.teal.*"}))?;
        assert!(!narrower.widens(&after), "dropping a pattern narrows");
        let all = narrower.updated(&serde_json::json!({"collection_filters": []}))?;
        assert!(all.widens(&narrower), "no filter keeps everything");
        assert!(!narrower.widens(&all));
        for bad in [
            serde_json::json!({"mode": "everything"}),
            serde_json::json!({"mode": "signal", "signal_collections": []}),
            serde_json::json!({"collection_filters": ["app.bsky*"]}),
            serde_json::json!({"resync_parallelism": 3}),
            serde_json::json!([1]),
        ] {
            assert!(before.updated(&bad).is_err(), "{bad}");
        }
        let round = Scope {
            mode: Mode::Full,
            filters: Filters::all(),
        };
        assert_eq!(round.updated(&round.to_json())?, round);
        Ok(())
    }

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
