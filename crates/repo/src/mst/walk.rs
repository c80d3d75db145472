//! An in-order MST walk that checks every structural rule as it goes.

use super::node::{NodeView, decode_node_into};
use super::{BlockSource, MAX_LAYER, layer_for_key};
use crate::cid::Cid;
use crate::error::{Error, Result};
use crate::syntax::{Nsid, is_valid_repo_path};

/// What the walker checks beyond the tree shape.
#[derive(Debug, Clone, Copy)]
pub struct WalkOptions {
    /// Require every key to be a repo path `collection/rkey` (true for repositories; the
    /// conformance fixtures use synthetic keys).
    pub check_paths: bool,
}

impl Default for WalkOptions {
    fn default() -> WalkOptions {
        WalkOptions { check_paths: true }
    }
}

/// Counters gathered by a walk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Nodes decoded.
    pub nodes: u64,
    /// Entries (keys) yielded.
    pub entries: u64,
    /// Deepest stack of nodes seen: the tree's height.
    pub depth: u32,
    /// The root's layer.
    pub root_layer: u32,
}

/// One node on the walk stack, with its full keys rebuilt from prefix compression.
#[derive(Debug, Default)]
struct Frame {
    cid: Option<Cid>,
    layer: u32,
    /// Full keys, concatenated.
    keys: Vec<u8>,
    /// Per entry: end of its key in `keys`, value, right subtree.
    entries: Vec<(usize, Cid, Option<Cid>)>,
    next: usize,
}

/// Streams `(key, value)` pairs of an MST in key order, verifying the tree on the way.
///
/// Checks: every node is present and decodes strictly; keys strictly increase across the whole
/// walk; each key's layer equals its node's; subtrees sit exactly one layer down; prefix
/// compression is maximal and starts at zero in each node; no empty node except the empty
/// root; the root is not an empty node pointing down; optionally, keys are repo paths.
pub struct MstWalker<S> {
    source: S,
    options: WalkOptions,
    /// Frames `0..depth` are live; those past it are kept for their allocations.
    frames: Vec<Frame>,
    depth: usize,
    key: Vec<u8>,
    previous: Vec<u8>,
    started: bool,
    stats: WalkStats,
    pending_root: Option<Cid>,
    /// The collection of the last key whose NSID was checked.
    collection: Vec<u8>,
}

impl<S: BlockSource> MstWalker<S> {
    /// A walker over the tree rooted at `root`; nothing is read until the first call to
    /// [`MstWalker::next_entry`].
    pub fn new(source: S, root: Cid, options: WalkOptions) -> MstWalker<S> {
        MstWalker {
            source,
            options,
            frames: Vec::new(),
            depth: 0,
            key: Vec::new(),
            previous: Vec::new(),
            started: false,
            stats: WalkStats::default(),
            pending_root: Some(root),
            collection: Vec::new(),
        }
    }

    /// Counters so far (complete once the walk has ended).
    pub fn stats(&self) -> WalkStats {
        self.stats
    }

    /// The block source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The next key and its value, or `None` at the end of the tree.
    pub fn next_entry(&mut self) -> Result<Option<(&[u8], Cid)>> {
        if let Some(root) = self.pending_root.take() {
            self.descend(root, None)?;
        }
        loop {
            let Some(frame) = self
                .depth
                .checked_sub(1)
                .and_then(|top| self.frames.get_mut(top))
            else {
                return Ok(None);
            };
            let Some(&(end, value, right)) = frame.entries.get(frame.next) else {
                self.depth -= 1;
                continue;
            };
            let start = match frame.next {
                0 => 0,
                i => frame.entries[i - 1].0,
            };
            frame.next += 1;
            let layer = frame.layer;
            let node = frame.cid;
            std::mem::swap(&mut self.key, &mut self.previous);
            self.key.clear();
            self.key.extend_from_slice(&frame.keys[start..end]);
            if self.started && self.key <= self.previous {
                return Err(Error::MstOrder {
                    node: node.unwrap_or_else(|| Cid::dag_cbor(&[])),
                    key: String::from_utf8_lossy(&self.key).into_owned(),
                    previous: String::from_utf8_lossy(&self.previous).into_owned(),
                });
            }
            self.started = true;
            self.stats.entries += 1;
            if let Some(right) = right {
                self.descend(right, Some(layer - 1))?;
            }
            return Ok(Some((&self.key, value)));
        }
    }

    /// Pushes the node `cid` and then the chain of left subtrees below it.
    fn descend(&mut self, mut cid: Cid, mut layer: Option<u32>) -> Result<()> {
        loop {
            let left = self.push_node(cid, layer)?;
            match left {
                Some((left, node_layer)) => {
                    cid = left;
                    layer = Some(node_layer - 1);
                }
                None => return Ok(()),
            }
        }
    }

    /// Loads, decodes and checks one node; returns its left subtree and layer if it has one.
    fn push_node(&mut self, cid: Cid, expected_layer: Option<u32>) -> Result<Option<(Cid, u32)>> {
        let structure = |reason: &str| Error::MstStructure {
            node: cid,
            reason: reason.to_owned(),
        };
        let bytes = self
            .source
            .get_block(&cid)?
            .ok_or_else(|| Error::MissingBlock {
                cid,
                context: "MST node".to_owned(),
            })?;
        let mut view = NodeView::default();
        decode_node_into(&bytes, &mut view).map_err(|source| Error::Block { cid, source })?;
        self.stats.nodes += 1;

        if self.depth == self.frames.len() {
            self.frames.push(Frame::default());
        }
        let frame = &mut self.frames[self.depth];
        frame.cid = Some(cid);
        frame.next = 0;
        frame.keys.clear();
        frame.entries.clear();

        let is_root = expected_layer.is_none();
        let layer = match (expected_layer, view.entries.first()) {
            (Some(layer), _) => layer,
            (None, None) => {
                if view.left.is_some() {
                    return Err(structure(
                        "root is an empty node that only points to a subtree",
                    ));
                }
                0
            }
            (None, Some(first)) => {
                if first.prefix_len != 0 {
                    return Err(structure("first entry has a non-zero prefix length"));
                }
                layer_for_key(first.suffix)
            }
        };
        if layer > MAX_LAYER {
            return Err(structure("layer is deeper than sha256 allows"));
        }
        if view.entries.is_empty() && !is_root && view.left.is_none() {
            return Err(structure("empty non-root node without a subtree"));
        }
        // Subtree links in another codec would give the same keys a second valid root.
        if view
            .left
            .iter()
            .chain(view.entries.iter().filter_map(|e| e.right.as_ref()))
            .any(|link| link.codec() != crate::cid::DAG_CBOR)
        {
            return Err(structure("subtree link is not a dag-cbor CID"));
        }
        if layer == 0 && (view.left.is_some() || view.entries.iter().any(|e| e.right.is_some())) {
            return Err(structure("layer 0 node has a subtree"));
        }

        let mut previous_start = 0;
        for (i, entry) in view.entries.iter().enumerate() {
            let previous_len = frame.keys.len() - previous_start;
            if i == 0 && entry.prefix_len != 0 {
                return Err(structure("first entry has a non-zero prefix length"));
            }
            if entry.prefix_len > previous_len {
                return Err(structure("prefix length is longer than the previous key"));
            }
            // Compression must be maximal: the suffix may not repeat the next shared byte.
            if i > 0
                && entry.prefix_len < previous_len
                && entry.suffix.first() == frame.keys.get(previous_start + entry.prefix_len)
            {
                return Err(structure("prefix compression is not maximal"));
            }
            let start = frame.keys.len();
            frame
                .keys
                .extend_from_within(previous_start..previous_start + entry.prefix_len);
            frame.keys.extend_from_slice(entry.suffix);
            previous_start = start;
            let key = &frame.keys[start..];
            if key.is_empty() {
                return Err(structure("empty key"));
            }
            let key_layer = layer_for_key(key);
            if key_layer != layer {
                return Err(Error::MstLayer {
                    node: cid,
                    key: String::from_utf8_lossy(key).into_owned(),
                    key_layer,
                    node_layer: layer,
                });
            }
            if self.options.check_paths {
                let collection = key.split(|&b| b == b'/').next().unwrap_or_default();
                // Keys arrive sorted, so collections come in runs: parse each NSID once.
                let new_collection = collection != self.collection.as_slice();
                let valid_collection = !new_collection
                    || std::str::from_utf8(collection)
                        .is_ok_and(|text| text.parse::<Nsid>().is_ok());
                if !valid_collection || !is_valid_repo_path(key) {
                    return Err(Error::MstStructure {
                        node: cid,
                        reason: format!(
                            "key {:?} is not a valid repo path",
                            String::from_utf8_lossy(key)
                        ),
                    });
                }
                if new_collection {
                    self.collection.clear();
                    self.collection.extend_from_slice(collection);
                }
            }
            frame
                .entries
                .push((frame.keys.len(), entry.value, entry.right));
        }
        frame.layer = layer;
        self.depth += 1;
        if is_root {
            self.stats.root_layer = layer;
        }
        self.stats.depth = self.stats.depth.max(self.depth as u32);
        Ok(view.left.map(|left| (left, layer)))
    }
}
