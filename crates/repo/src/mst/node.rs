//! The MST node codec: a strict decoder that accepts only the canonical encoding, and the
//! canonical encoder.
//!
//! A node has exactly one byte encoding: both fields of the node (`e`, `l`) and all four of each
//! entry (`k`, `p`, `t`, `v`) must be present, in DRISL key order, with no other field. A
//! lenient decoder that read a missing `l` or `t` as null would let one tree travel under two
//! root CIDs. Maximal prefix compression, the other half of canonical form, depends on the keys
//! and is checked with the rest of the shape rules in [`super::check`].

use crate::cbor::{DecodeError, Decoder, Encoder};
use crate::cid::Cid;

/// One entry of a decoded node, borrowing its key suffix from the node's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeEntry<'a> {
    /// Bytes shared with the previous entry's key in this node.
    pub prefix_len: usize,
    /// The rest of the key.
    pub suffix: &'a [u8],
    /// The record CID.
    pub value: Cid,
    /// The subtree right of this entry.
    pub right: Option<Cid>,
}

/// A decoded node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView<'a> {
    /// The subtree left of the first entry.
    pub left: Option<Cid>,
    /// Entries in key order.
    pub entries: Vec<NodeEntry<'a>>,
}

/// Decodes a node, rejecting any field, missing field or encoding the schema does not allow.
///
/// This checks the node's encoding only; the shape rules that relate keys, layers and
/// subtrees are applied wherever a tree is read (walk, lazy tree, diff).
pub fn decode_node(bytes: &[u8]) -> Result<NodeView<'_>, DecodeError> {
    // No reserve from the entry count: a count read from input never sizes an allocation.
    let mut entries = Vec::new();
    let left = decode_node_with(bytes, |entry| {
        entries.push(entry);
        Ok(())
    })?;
    Ok(NodeView { left, entries })
}

/// Decodes a node strictly, handing each entry to `on_entry` in order; returns the left link.
///
/// Streaming the entries lets the shape checks run without an intermediate vector per node.
pub(crate) fn decode_node_with<'a, E: From<DecodeError>>(
    bytes: &'a [u8],
    mut on_entry: impl FnMut(NodeEntry<'a>) -> Result<(), E>,
) -> Result<Option<Cid>, E> {
    let mut decoder = Decoder::new(bytes);
    let start = decoder.position();
    let fields = decoder.map_len()?;
    let mut previous: Option<&str> = None;
    let mut left = None;
    let mut seen_entries = false;
    for _ in 0..fields {
        let key_offset = decoder.position();
        let key = decoder.ordered_key(previous)?;
        previous = Some(key);
        match key {
            "e" => {
                seen_entries = true;
                let count = decoder.array_len()?;
                for _ in 0..count {
                    on_entry(decode_entry(&mut decoder)?)?;
                }
            }
            "l" => left = Some(decoder.nullable_link()?),
            other => {
                return Err(DecodeError::UnknownField {
                    field: other.to_owned(),
                    offset: key_offset,
                }
                .into());
            }
        }
    }
    let missing = |field| DecodeError::MissingField {
        field,
        offset: start,
    };
    // Key order forces `e` before `l`; both must be there (canonical form writes both).
    if !seen_entries {
        return Err(missing("e").into());
    }
    let Some(left) = left else {
        return Err(missing("l").into());
    };
    decoder.finish()?;
    Ok(left)
}

/// An entry in its one canonical layout, read by matching the fixed key bytes: the fast path.
/// `None` sends the caller to the general decoder, which names what is wrong.
fn canonical_entry<'a>(decoder: &mut Decoder<'a>) -> Option<NodeEntry<'a>> {
    // {k: bytes, p: uint, t: link|null, v: link}: a 4-entry map with 1-byte text keys.
    if !decoder.eat(&[0xa4, 0x61, b'k']) {
        return None;
    }
    let suffix = decoder.bytes().ok()?;
    if !decoder.eat(&[0x61, b'p']) {
        return None;
    }
    let prefix_len = usize::try_from(decoder.u64().ok()?).ok()?;
    if !decoder.eat(&[0x61, b't']) {
        return None;
    }
    let right = decoder.nullable_link().ok()?;
    if !decoder.eat(&[0x61, b'v']) {
        return None;
    }
    let value = decoder.link().ok()?;
    Some(NodeEntry {
        prefix_len,
        suffix,
        value,
        right,
    })
}

fn decode_entry<'a>(decoder: &mut Decoder<'a>) -> Result<NodeEntry<'a>, DecodeError> {
    let mut fast = decoder.clone();
    if let Some(entry) = canonical_entry(&mut fast) {
        *decoder = fast;
        return Ok(entry);
    }
    let start = decoder.position();
    let fields = decoder.map_len()?;
    let mut prefix_len = None;
    let mut suffix = None;
    let mut value = None;
    let mut right = None;
    let mut previous: Option<&str> = None;
    for _ in 0..fields {
        let key_offset = decoder.position();
        let key = decoder.ordered_key(previous)?;
        previous = Some(key);
        match key {
            "k" => suffix = Some(decoder.bytes()?),
            "p" => {
                let offset = decoder.position();
                let p = decoder.u64()?;
                prefix_len =
                    Some(usize::try_from(p).map_err(|_| DecodeError::IntRange { offset })?);
            }
            "t" => right = Some(decoder.nullable_link()?),
            "v" => value = Some(decoder.link()?),
            other => {
                return Err(DecodeError::UnknownField {
                    field: other.to_owned(),
                    offset: key_offset,
                });
            }
        }
    }
    let missing = |field| DecodeError::MissingField {
        field,
        offset: start,
    };
    Ok(NodeEntry {
        prefix_len: prefix_len.ok_or_else(|| missing("p"))?,
        suffix: suffix.ok_or_else(|| missing("k"))?,
        value: value.ok_or_else(|| missing("v"))?,
        right: right.ok_or_else(|| missing("t"))?,
    })
}

/// Encodes a node from full keys, computing prefix compression within the node.
///
/// `entries` are `(full key, value, right subtree)` in key order.
pub fn encode_node<'k>(
    left: Option<&Cid>,
    entries: impl ExactSizeIterator<Item = (&'k [u8], &'k Cid, Option<&'k Cid>)>,
) -> Vec<u8> {
    let mut encoder = Encoder::with_capacity(16 + entries.len() * 80);
    encoder.map(2);
    encoder.text("e");
    encoder.array(entries.len());
    let mut previous: &[u8] = &[];
    for (key, value, right) in entries {
        let prefix = super::common_prefix_len(previous, key);
        encoder.map(4);
        encoder.text("k");
        encoder.bytes(&key[prefix..]);
        encoder.text("p");
        encoder.u64(prefix as u64);
        encoder.text("t");
        encoder.nullable_link(right);
        encoder.text("v");
        encoder.link(value);
        previous = key;
    }
    encoder.text("l");
    encoder.nullable_link(left);
    encoder.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() -> Result<(), DecodeError> {
        let value = Cid::dag_cbor(b"record");
        let sub = Cid::dag_cbor(b"subtree");
        let keys: [&[u8]; 2] = [b"com.example.a/aaa", b"com.example.a/aab"];
        let bytes = encode_node(Some(&sub), keys.iter().map(|key| (*key, &value, None)));
        let node = decode_node(&bytes)?;
        assert_eq!(node.left, Some(sub));
        assert_eq!(node.entries.len(), 2);
        assert_eq!(node.entries[1].prefix_len, 16);
        assert_eq!(node.entries[1].suffix, b"b");
        Ok(())
    }

    #[test]
    fn empty_node_bytes() {
        // {"e": [], "l": null}: the empty repository's root.
        assert_eq!(
            encode_node(None, std::iter::empty()),
            [0xa2, 0x61, 0x65, 0x80, 0x61, 0x6c, 0xf6]
        );
    }

    #[test]
    fn rejects_unknown_fields_and_order() {
        let mut encoder = Encoder::new();
        encoder.map(2);
        encoder.text("l");
        encoder.null();
        encoder.text("e");
        encoder.array(0);
        assert!(matches!(
            decode_node(encoder.as_bytes()),
            Err(DecodeError::KeyOrder { .. })
        ));
        let mut encoder = Encoder::new();
        encoder.map(2);
        encoder.text("e");
        encoder.array(0);
        encoder.text("x");
        encoder.null();
        assert!(matches!(
            decode_node(encoder.as_bytes()),
            Err(DecodeError::UnknownField { .. })
        ));
    }

    /// Issue 11: a node without `l`, or an entry without `t`, is a second encoding of the
    /// same node and must not decode.
    #[test]
    fn issue_11_absent_l_or_t_is_refused() {
        let mut encoder = Encoder::new();
        encoder.map(1);
        encoder.text("e");
        encoder.array(0);
        assert!(
            matches!(
                decode_node(encoder.as_bytes()),
                Err(DecodeError::MissingField { field: "l", .. })
            ),
            "{:?}",
            decode_node(encoder.as_bytes())
        );

        let value = Cid::dag_cbor(b"record");
        let mut encoder = Encoder::new();
        encoder.map(2);
        encoder.text("e");
        encoder.array(1);
        encoder.map(3);
        encoder.text("k");
        encoder.bytes(b"com.example.a/aaa");
        encoder.text("p");
        encoder.u64(0);
        encoder.text("v");
        encoder.link(&value);
        encoder.text("l");
        encoder.null();
        assert!(
            matches!(
                decode_node(encoder.as_bytes()),
                Err(DecodeError::MissingField { field: "t", .. })
            ),
            "{:?}",
            decode_node(encoder.as_bytes())
        );

        let mut encoder = Encoder::new();
        encoder.map(1);
        encoder.text("l");
        encoder.null();
        assert!(matches!(
            decode_node(encoder.as_bytes()),
            Err(DecodeError::MissingField { field: "e", .. })
        ));
    }
}
