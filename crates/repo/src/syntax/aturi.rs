//! AT-URIs: links to an account, a collection or a record, parsed by hand.

use std::fmt;

use super::atidentifier::check_at_identifier;
use super::nsid::check_nsid;
use super::rkey::check_record_key;
use super::{IdentifierKind, SyntaxError};

/// Longest AT-URI accepted, in bytes (8 KiB, spec-aturi).
const MAX_ATURI_LEN: usize = 8 * 1024;
/// Length of the `at://` scheme prefix.
const SCHEME_LEN: usize = "at://".len();

/// An AT-URI in the form records and Lexicons use: `at://AUTHORITY[/COLLECTION[/RKEY]]`.
///
/// The authority is a DID or a handle, the collection an NSID and the record key a record key.
/// The spec's general syntax also allows a query and a `#` fragment; the interop fixtures
/// reject both, as they reject a trailing slash and more than three segments, so this type
/// does too. Generic URL crates mis-parse the `:`s of a DID authority, which is why this
/// parser is written by hand. The text is kept as given (a handle authority is not
/// lowercased), so the URI round-trips byte for byte.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AtUri {
    text: String,
    /// End of the authority in `text`.
    authority_end: usize,
    /// End of the collection in `text`; equals `authority_end` when there is none.
    collection_end: usize,
}

string_identifier!(AtUri, text);

impl AtUri {
    /// The DID or handle that owns the repository, as written.
    pub fn authority(&self) -> &str {
        self.text
            .get(SCHEME_LEN..self.authority_end)
            .unwrap_or_default()
    }

    /// The collection NSID, when the URI names a collection or a record.
    pub fn collection(&self) -> Option<&str> {
        if self.collection_end == self.authority_end {
            return None;
        }
        self.text.get(self.authority_end + 1..self.collection_end)
    }

    /// The record key, when the URI names a record.
    pub fn rkey(&self) -> Option<&str> {
        if self.collection_end == self.text.len() {
            return None;
        }
        self.text.get(self.collection_end + 1..)
    }

    fn parse_str(input: &str) -> Result<Self, SyntaxError> {
        let (authority_end, collection_end) = validate(input)?;
        Ok(AtUri {
            text: input.to_owned(),
            authority_end,
            collection_end,
        })
    }

    fn parse_string(input: String) -> Result<Self, SyntaxError> {
        let (authority_end, collection_end) = validate(&input)?;
        Ok(AtUri {
            text: input,
            authority_end,
            collection_end,
        })
    }
}

impl fmt::Debug for AtUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AtUri").field(&self.text).finish()
    }
}

/// Validates and returns where the authority and the collection end.
fn validate(input: &str) -> Result<(usize, usize), SyntaxError> {
    check_at_uri(input.as_bytes())
        .map_err(|rule| SyntaxError::invalid(IdentifierKind::AtUri, input, rule))
}

fn check_at_uri(bytes: &[u8]) -> Result<(usize, usize), &'static str> {
    if bytes.len() > MAX_ATURI_LEN {
        return Err("longer than 8192 bytes");
    }
    let Some(rest) = bytes.strip_prefix(b"at://") else {
        return Err("must start with \"at://\"");
    };
    let mut segments = rest.splitn(3, |&b| b == b'/');
    let authority = segments.next().unwrap_or_default();
    check_at_identifier(authority).map_err(|_| "authority is not a valid DID or handle")?;
    let authority_end = SCHEME_LEN + authority.len();

    let Some(collection) = segments.next() else {
        return Ok((authority_end, authority_end));
    };
    if collection.is_empty() {
        return Err("has an empty path segment or a trailing slash");
    }
    check_nsid(collection).map_err(|_| "collection is not a valid NSID")?;
    let collection_end = authority_end + 1 + collection.len();

    let Some(rkey) = segments.next() else {
        return Ok((authority_end, collection_end));
    };
    if rkey.is_empty() {
        return Err("has an empty path segment or a trailing slash");
    }
    if rkey.contains(&b'/') {
        return Err("has more than three segments (authority, collection, record key)");
    }
    check_record_key(rkey).map_err(|_| "record key is not a valid record key")?;
    Ok((authority_end, collection_end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components() -> Result<(), SyntaxError> {
        let uri: AtUri = "at://did:plc:asdf123/com.atproto.feed.post/record".parse()?;
        assert_eq!(uri.authority(), "did:plc:asdf123");
        assert_eq!(uri.collection(), Some("com.atproto.feed.post"));
        assert_eq!(uri.rkey(), Some("record"));

        let uri: AtUri = "at://user.bsky.social/com.atproto.feed.post".parse()?;
        assert_eq!(uri.authority(), "user.bsky.social");
        assert_eq!(uri.collection(), Some("com.atproto.feed.post"));
        assert_eq!(uri.rkey(), None);

        let uri = AtUri::try_from(String::from("at://did:abc:123"))?;
        assert_eq!(uri.authority(), "did:abc:123");
        assert_eq!(uri.collection(), None);
        assert_eq!(uri.rkey(), None);
        assert_eq!(format!("{uri:?}"), r#"AtUri("at://did:abc:123")"#);
        Ok(())
    }

    #[test]
    fn rules_name_the_part() {
        let rule = |input: &str| input.parse::<AtUri>().map_err(|err| err.rule());
        let trailing = "has an empty path segment or a trailing slash";
        assert_eq!(rule("at://did:plc:asdf123/"), Err(trailing));
        assert_eq!(
            rule("at://did:plc:asdf123/short/stuff"),
            Err("collection is not a valid NSID")
        );
        assert_eq!(
            rule("at://did:plc:asdf123/com.atproto.feed.post/a/b"),
            Err("has more than three segments (authority, collection, record key)")
        );
        assert_eq!(
            rule("at://did:plc:asdf123#frag"),
            Err("authority is not a valid DID or handle")
        );
    }
}
