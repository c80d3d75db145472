//! The one set of MST shape rules, applied to every node that any reader loads.
//!
//! [`MstWalker`](super::MstWalker), [`Tree`](super::Tree) and [`diff`](super::diff) all read
//! nodes through [`NodeChecker::check`], so a tree one of them accepts, the others accept too,
//! and a tree one refuses, the others refuse with the same [`Error`] variant. A node is checked
//! against everything its bytes and its place in the tree determine:
//!
//! - the encoding is canonical (see [`super::node`]): every field present, DRISL order;
//! - prefix compression starts at zero and is maximal;
//! - keys are non-empty, strictly increasing, and inside the bounds the parent implies;
//! - every key's layer is the node's layer, which is the parent's minus one (the root takes
//!   its first key's);
//! - subtree links are dag-cbor CIDs, and layer-0 nodes have none;
//! - no empty node except the root of an empty tree, and the root is never an empty node
//!   that only points down;
//! - optionally, keys are repo paths `collection/rkey` with an NSID collection.

use super::node::decode_node_with;
use super::{MAX_LAYER, layer_for_key};
use crate::cid::{Cid, DAG_CBOR};
use crate::error::{Error, Result};
use crate::syntax::{Nsid, is_valid_repo_path};

/// Rules a tree's keys must follow beyond the shape, set per reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MstRules {
    /// Require every key to be a repo path `collection/rkey` (true for repositories; the
    /// conformance fixtures use synthetic keys).
    pub check_paths: bool,
}

impl Default for MstRules {
    fn default() -> MstRules {
        MstRules { check_paths: true }
    }
}

/// Where a node sits, as far as the reader that followed the link to it knows.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Position<'b> {
    /// The layer the parent implies; `None` for the root.
    pub(crate) layer: Option<u32>,
    /// Every key must sort after this one (the parent's key left of the link).
    pub(crate) after: Option<&'b [u8]>,
    /// Every key must sort before this one (the parent's key right of the link).
    pub(crate) before: Option<&'b [u8]>,
}

impl<'b> Position<'b> {
    /// The root of a tree.
    pub(crate) const ROOT: Position<'static> = Position {
        layer: None,
        after: None,
        before: None,
    };

    /// A subtree at `layer` between two keys.
    pub(crate) fn child(
        layer: u32,
        after: Option<&'b [u8]>,
        before: Option<&'b [u8]>,
    ) -> Position<'b> {
        Position {
            layer: Some(layer),
            after,
            before,
        }
    }
}

/// A node that passed every rule, with its keys rebuilt from prefix compression.
///
/// Reused between nodes so a walk allocates only while its nodes grow.
#[derive(Debug, Default, Clone)]
pub(crate) struct CheckedNode {
    cid: Option<Cid>,
    layer: u32,
    left: Option<Cid>,
    /// Full keys, concatenated.
    keys: Vec<u8>,
    /// Per entry: end of its key in `keys`, value, right subtree.
    entries: Vec<(usize, Cid, Option<Cid>)>,
}

impl CheckedNode {
    pub(crate) fn cid(&self) -> Option<Cid> {
        self.cid
    }

    pub(crate) fn layer(&self) -> u32 {
        self.layer
    }

    pub(crate) fn left(&self) -> Option<Cid> {
        self.left
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entry `index`: key, value, right subtree.
    pub(crate) fn entry(&self, index: usize) -> Option<(&[u8], Cid, Option<Cid>)> {
        let &(end, value, right) = self.entries.get(index)?;
        let start = match index {
            0 => 0,
            i => self.entries[i - 1].0,
        };
        Some((&self.keys[start..end], value, right))
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = (&[u8], Cid, Option<Cid>)> {
        (0..self.entries.len()).filter_map(|index| self.entry(index))
    }
}

/// Applies the shape rules; keeps the state that lets repeated checks of a walk skip work.
#[derive(Debug, Default, Clone)]
pub(crate) struct NodeChecker {
    rules: MstRules,
    /// The collection of the last key whose NSID was parsed: keys arrive sorted, so
    /// collections come in runs and each NSID is parsed once per run.
    collection: Vec<u8>,
}

impl NodeChecker {
    pub(crate) fn new(rules: MstRules) -> NodeChecker {
        NodeChecker {
            rules,
            collection: Vec::new(),
        }
    }

    /// Decodes the node `cid` from `bytes` into `node`, checking every rule for `position`.
    pub(crate) fn check(
        &mut self,
        cid: Cid,
        bytes: &[u8],
        position: Position<'_>,
        node: &mut CheckedNode,
    ) -> Result<()> {
        let structure = |reason: &str| Error::MstStructure {
            node: cid,
            reason: reason.to_owned(),
        };
        node.cid = Some(cid);
        node.keys.clear();
        node.entries.clear();
        let mut layer = position.layer;
        let mut previous_start = 0;
        let left = decode_node_with(bytes, |entry| -> Result<(), Fault> {
            let index = node.entries.len();
            let previous_len = node.keys.len() - previous_start;
            if index == 0 && entry.prefix_len != 0 {
                return Err(Fault::Rule(structure(
                    "first entry has a non-zero prefix length",
                )));
            }
            if entry.prefix_len > previous_len {
                return Err(Fault::Rule(structure(
                    "prefix length is longer than the previous key",
                )));
            }
            // Compression must be maximal: the suffix may not repeat the next shared byte.
            if index > 0
                && entry.prefix_len < previous_len
                && entry.suffix.first() == node.keys.get(previous_start + entry.prefix_len)
            {
                return Err(Fault::Rule(structure("prefix compression is not maximal")));
            }
            if entry.right.is_some_and(|right| right.codec() != DAG_CBOR) {
                return Err(Fault::Rule(structure("subtree link is not a dag-cbor CID")));
            }
            let start = node.keys.len();
            node.keys
                .extend_from_within(previous_start..previous_start + entry.prefix_len);
            node.keys.extend_from_slice(entry.suffix);
            let key = &node.keys[start..];
            if key.is_empty() {
                return Err(Fault::Rule(structure("empty key")));
            }
            let after = match index {
                0 => position.after,
                _ => Some(&node.keys[previous_start..start]),
            };
            if let Some(after) = after
                && key <= after
            {
                return Err(Fault::Rule(Error::MstOrder {
                    node: cid,
                    key: String::from_utf8_lossy(key).into_owned(),
                    previous: String::from_utf8_lossy(after).into_owned(),
                }));
            }
            let key_layer = layer_for_key(key);
            let node_layer = *layer.get_or_insert(key_layer);
            if key_layer != node_layer {
                return Err(Fault::Rule(Error::MstLayer {
                    node: cid,
                    key: String::from_utf8_lossy(key).into_owned(),
                    key_layer,
                    node_layer,
                }));
            }
            if self.rules.check_paths {
                check_path(key, &mut self.collection, cid).map_err(Fault::Rule)?;
            }
            previous_start = start;
            node.entries
                .push((node.keys.len(), entry.value, entry.right));
            Ok(())
        })
        .map_err(|fault| match fault {
            Fault::Decode(source) => Error::Block { cid, source },
            Fault::Rule(err) => err,
        })?;
        let is_root = position.layer.is_none();
        let layer = layer.unwrap_or(0);
        if layer > MAX_LAYER {
            return Err(structure("layer is deeper than sha256 allows"));
        }
        let last = node
            .len()
            .checked_sub(1)
            .and_then(|index| node.entry(index));
        if let (Some(before), Some((last, _, _))) = (position.before, last)
            && last >= before
        {
            return Err(Error::MstOrder {
                node: cid,
                key: String::from_utf8_lossy(before).into_owned(),
                previous: String::from_utf8_lossy(last).into_owned(),
            });
        }
        if node.entries.is_empty() {
            if is_root && left.is_some() {
                return Err(structure(
                    "root is an empty node that only points to a subtree",
                ));
            }
            if !is_root && left.is_none() {
                return Err(structure("empty non-root node without a subtree"));
            }
        }
        if left.is_some_and(|left| left.codec() != DAG_CBOR) {
            return Err(structure("subtree link is not a dag-cbor CID"));
        }
        if layer == 0 && (left.is_some() || node.entries.iter().any(|e| e.2.is_some())) {
            return Err(structure("layer 0 node has a subtree"));
        }
        node.layer = layer;
        node.left = left;
        Ok(())
    }
}

/// Requires `key` to be `collection/rkey` with an NSID collection.
fn check_path(key: &[u8], collection_cache: &mut Vec<u8>, node: Cid) -> Result<()> {
    let collection = key.split(|&b| b == b'/').next().unwrap_or_default();
    let new_collection = collection != collection_cache.as_slice();
    let valid_collection = !new_collection
        || std::str::from_utf8(collection).is_ok_and(|text| text.parse::<Nsid>().is_ok());
    if !valid_collection || !is_valid_repo_path(key) {
        return Err(Error::MstStructure {
            node,
            reason: format!(
                "key {:?} is not a valid repo path",
                String::from_utf8_lossy(key)
            ),
        });
    }
    if new_collection {
        collection_cache.clear();
        collection_cache.extend_from_slice(collection);
    }
    Ok(())
}

/// Why a node failed inside the decoding loop: its encoding, or a shape rule.
enum Fault {
    Decode(crate::cbor::DecodeError),
    Rule(Error),
}

impl From<crate::cbor::DecodeError> for Fault {
    fn from(err: crate::cbor::DecodeError) -> Fault {
        Fault::Decode(err)
    }
}
