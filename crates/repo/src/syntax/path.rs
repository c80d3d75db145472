//! Repo paths: the MST keys `<collection>/<record key>` under which records are stored.

use std::fmt;

use super::rkey::RKEY_BYTES;
use super::{IdentifierKind, Nsid, RecordKey, SyntaxError};

/// Longest repo path accepted, in bytes (the reference MST's key limit).
const MAX_REPO_PATH_LEN: usize = 1024;

/// Whether `key` is a well-formed MST key: exactly two non-empty segments separated by one
/// `/`, each of `A-Za-z0-9 . - _ : ~` and neither `.` nor `..`, at most 1024 bytes.
///
/// This runs for every key of every MST node, so it is one pass over the bytes with a table
/// lookup per byte, and never allocates. It is the rule [`RepoPath`] enforces.
pub fn is_valid_repo_path(key: &[u8]) -> bool {
    check_repo_path(key).is_ok()
}

/// A repo path such as `app.bsky.feed.post/3jzfcijpj2z2a`: an MST key.
///
/// The segments are checked with the MST's rule (see [`is_valid_repo_path`]), not as an NSID
/// and a record key. The tree must accept every key the reference implementations accept,
/// or atpdb would reject repositories the network considers valid; the Sync 1.1 interop
/// fixtures use keys such as `A0/374913`, whose collection is no NSID. Whether a collection
/// names a Lexicon is a record-level question. Every `NSID/record key` pair is a valid repo
/// path ([`RepoPath::from_parts`]).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoPath {
    text: String,
    /// Index of the `/` in `text`.
    slash: usize,
}

string_identifier!(RepoPath, text);

impl RepoPath {
    /// The path of a record: an NSID and a record key always make a valid repo path.
    pub fn from_parts(collection: &Nsid, rkey: &RecordKey) -> RepoPath {
        RepoPath {
            text: format!("{collection}/{rkey}"),
            slash: collection.as_str().len(),
        }
    }

    /// The collection segment, before the `/`.
    pub fn collection(&self) -> &str {
        self.text.get(..self.slash).unwrap_or_default()
    }

    /// The record key segment, after the `/`.
    pub fn rkey(&self) -> &str {
        self.text.get(self.slash + 1..).unwrap_or_default()
    }

    fn parse_str(input: &str) -> Result<Self, SyntaxError> {
        let slash = validate(input)?;
        Ok(RepoPath {
            text: input.to_owned(),
            slash,
        })
    }

    fn parse_string(input: String) -> Result<Self, SyntaxError> {
        let slash = validate(&input)?;
        Ok(RepoPath { text: input, slash })
    }
}

impl TryFrom<&[u8]> for RepoPath {
    type Error = SyntaxError;

    /// Builds a path from an MST key as stored in a node (bytes, not text).
    fn try_from(key: &[u8]) -> Result<Self, Self::Error> {
        let invalid = |rule| {
            SyntaxError::invalid(
                IdentifierKind::RepoPath,
                &String::from_utf8_lossy(key),
                rule,
            )
        };
        let slash = check_repo_path(key).map_err(invalid)?;
        // The check admits ASCII only, so this conversion cannot fail.
        let text = String::from_utf8(key.to_vec()).map_err(|_| invalid("is not UTF-8"))?;
        Ok(RepoPath { text, slash })
    }
}

impl fmt::Debug for RepoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RepoPath").field(&self.text).finish()
    }
}

fn validate(input: &str) -> Result<usize, SyntaxError> {
    check_repo_path(input.as_bytes())
        .map_err(|rule| SyntaxError::invalid(IdentifierKind::RepoPath, input, rule))
}

/// Checks the MST key rule and returns the index of the `/`.
fn check_repo_path(key: &[u8]) -> Result<usize, &'static str> {
    const TWO_SEGMENTS: &str = "must be two segments, <collection>/<record key>";
    if key.len() > MAX_REPO_PATH_LEN {
        return Err("longer than 1024 bytes");
    }
    let mut slash = None;
    for (index, &b) in key.iter().enumerate() {
        if b == b'/' {
            if slash.is_some() {
                return Err(TWO_SEGMENTS);
            }
            slash = Some(index);
        } else if !RKEY_BYTES[usize::from(b)] {
            return Err("allows only ASCII letters, digits and . - _ : ~ besides the '/'");
        }
    }
    let Some(slash) = slash else {
        return Err(TWO_SEGMENTS);
    };
    let (collection, rkey) = key.split_at(slash);
    let rkey = rkey.get(1..).unwrap_or_default();
    if collection.is_empty() || rkey.is_empty() {
        return Err("has an empty segment");
    }
    let is_dots = |segment: &[u8]| segment == b"." || segment == b"..";
    if is_dots(collection) || is_dots(rkey) {
        return Err("segments must not be '.' or '..'");
    }
    Ok(slash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments() -> Result<(), SyntaxError> {
        let path: RepoPath = "app.bsky.feed.post/3jzfcijpj2z2a".parse()?;
        assert_eq!(path.collection(), "app.bsky.feed.post");
        assert_eq!(path.rkey(), "3jzfcijpj2z2a");
        assert_eq!(
            format!("{path:?}"),
            r#"RepoPath("app.bsky.feed.post/3jzfcijpj2z2a")"#
        );
        Ok(())
    }

    #[test]
    fn from_parts_matches_parse() -> Result<(), SyntaxError> {
        let collection: Nsid = "app.bsky.actor.profile".parse()?;
        let rkey: RecordKey = "self".parse()?;
        let path = RepoPath::from_parts(&collection, &rkey);
        assert_eq!(path, "app.bsky.actor.profile/self".parse::<RepoPath>()?);
        assert_eq!(path.collection(), collection.as_str());
        assert_eq!(path.rkey(), rkey.as_str());
        Ok(())
    }

    #[test]
    fn from_bytes() -> Result<(), SyntaxError> {
        let path = RepoPath::try_from(&b"A0/374913"[..])?;
        assert_eq!(path.collection(), "A0");
        assert_eq!(path.rkey(), "374913");
        let err = RepoPath::try_from(&b"a/\xff"[..]).map_err(|err| err.kind());
        assert_eq!(err, Err(IdentifierKind::RepoPath));
        Ok(())
    }

    #[test]
    fn valid_keys() {
        let longest = format!("{}/{}", "c".repeat(511), "r".repeat(512));
        for key in [
            "app.bsky.feed.post/3jzfcijpj2z2a",
            "A0/374913",
            "com.example.record/self",
            "a/b",
            "a/...",
            "com.example.record/literal:self~1_2-3",
            longest.as_str(),
        ] {
            assert!(is_valid_repo_path(key.as_bytes()), "rejected {key:?}");
            assert!(key.parse::<RepoPath>().is_ok(), "rejected {key:?}");
        }
    }

    #[test]
    fn invalid_keys() {
        let too_long = format!("{}/{}", "c".repeat(512), "r".repeat(512));
        for key in [
            "",
            "/",
            "app.bsky.feed.post",
            "app.bsky.feed.post/",
            "/3jzfcijpj2z2a",
            "/app.bsky.feed.post/3jzfcijpj2z2a",
            "app.bsky.feed.post/3jzfcijpj2z2a/",
            "a/b/c",
            "app.bsky.feed.post/.",
            "app.bsky.feed.post/..",
            "../self",
            "app.bsky.feed.post/with space",
            "app.bsky.feed.post/per%cent",
            "app.bsky.feed.post/caf\u{e9}",
            too_long.as_str(),
        ] {
            assert!(!is_valid_repo_path(key.as_bytes()), "accepted {key:?}");
            assert!(key.parse::<RepoPath>().is_err(), "accepted {key:?}");
        }
        assert!(!is_valid_repo_path(b"a/\x00"));
        assert!(!is_valid_repo_path(b"a/\xff"));
    }
}
