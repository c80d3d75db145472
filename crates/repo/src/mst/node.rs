//! The MST node codec: a hand-written strict decoder (the hot path) and the canonical encoder.

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

/// Decodes a node, rejecting any field or encoding the schema does not allow.
///
/// `l` and `t` may be absent (read as null) for leniency towards other encoders; the reference
/// encoders always write them, and [`encode_node`] does too.
pub fn decode_node(bytes: &[u8]) -> Result<NodeView<'_>, DecodeError> {
    let mut node = NodeView::default();
    decode_node_into(bytes, &mut node)?;
    Ok(node)
}

/// Decodes into `node`, reusing its entry vector.
pub(crate) fn decode_node_into<'a>(
    bytes: &'a [u8],
    node: &mut NodeView<'a>,
) -> Result<(), DecodeError> {
    node.left = None;
    node.entries.clear();
    let mut decoder = Decoder::new(bytes);
    let start = decoder.position();
    let fields = decoder.map_len()?;
    let mut seen_entries = false;
    let mut previous: Option<&str> = None;
    for _ in 0..fields {
        let key_offset = decoder.position();
        let key = decoder.ordered_key(previous)?;
        previous = Some(key);
        match key {
            "e" => {
                seen_entries = true;
                let count = decoder.array_len()?;
                node.entries.reserve(count);
                for _ in 0..count {
                    node.entries.push(decode_entry(&mut decoder)?);
                }
            }
            "l" => node.left = decoder.nullable_link()?,
            other => {
                return Err(DecodeError::UnknownField {
                    field: other.to_owned(),
                    offset: key_offset,
                });
            }
        }
    }
    if !seen_entries {
        return Err(DecodeError::MissingField {
            field: "e",
            offset: start,
        });
    }
    decoder.finish()
}

fn decode_entry<'a>(decoder: &mut Decoder<'a>) -> Result<NodeEntry<'a>, DecodeError> {
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
            "t" => right = decoder.nullable_link()?,
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
        right,
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
}
