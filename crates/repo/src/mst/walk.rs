//! An in-order MST walk that checks every structural rule as it goes.

use super::BlockSource;
use super::check::{CheckedNode, MstRules, NodeChecker, Position};
use crate::cid::Cid;
use crate::error::{Error, Result};

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

/// One node on the walk stack and the index of its next entry.
#[derive(Debug, Default)]
struct Frame {
    node: CheckedNode,
    next: usize,
}

/// One step of a walk over a tree whose CAR may leave subtrees out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkItem<'a> {
    /// The next key and its value.
    Entry(&'a [u8], Cid),
    /// A subtree whose root block is not in the source: it covers every key between the
    /// entry before it and the entry after it, and its root is at `layer`.
    Gap {
        /// The missing subtree's root.
        cid: Cid,
        /// Its root node's layer (one below the node that links to it).
        layer: u32,
    },
}

/// Streams `(key, value)` pairs of an MST in key order, verifying the tree on the way.
///
/// Every node passes the shape rules of [`MstRules`] and the module's checker (the same one
/// [`Tree`](super::Tree) and [`diff`](super::diff) use), and keys strictly increase across
/// the whole walk.
pub struct MstWalker<S> {
    source: S,
    checker: NodeChecker,
    /// Frames `0..depth` are live; those past it are kept for their allocations.
    frames: Vec<Frame>,
    depth: usize,
    key: Vec<u8>,
    previous: Vec<u8>,
    started: bool,
    stats: WalkStats,
    pending_root: Option<Cid>,
    /// Report missing subtrees instead of failing (see [`MstWalker::with_gaps`]).
    gaps: bool,
    pending_gap: Option<(Cid, u32)>,
}

impl<S: BlockSource> MstWalker<S> {
    /// A walker over the tree rooted at `root`; nothing is read until the first call to
    /// [`MstWalker::next_entry`].
    pub fn new(source: S, root: Cid, rules: MstRules) -> MstWalker<S> {
        MstWalker {
            source,
            checker: NodeChecker::new(rules),
            frames: Vec::new(),
            depth: 0,
            key: Vec::new(),
            previous: Vec::new(),
            started: false,
            stats: WalkStats::default(),
            pending_root: Some(root),
            gaps: false,
            pending_gap: None,
        }
    }

    /// A walk that reports a subtree whose root block is missing as a [`WalkItem::Gap`]
    /// instead of failing, for a CAR that holds only what changed since an earlier commit.
    /// The root node must still be present. Nothing in a gap is verified here: the caller
    /// must prove it (see [`SubtreeBuilder`](super::SubtreeBuilder)).
    pub fn with_gaps(mut self) -> MstWalker<S> {
        self.gaps = true;
        self
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
    ///
    /// # Errors
    ///
    /// [`Error::MissingBlock`] for a missing node, also on a walk [`MstWalker::with_gaps`]:
    /// use [`MstWalker::next_item`] there.
    pub fn next_entry(&mut self) -> Result<Option<(&[u8], Cid)>> {
        match self.next_item()? {
            None => Ok(None),
            Some(WalkItem::Entry(_, value)) => Ok(Some((&self.key, value))),
            Some(WalkItem::Gap { cid, .. }) => Err(Error::MissingBlock {
                cid,
                context: "MST node".to_owned(),
            }),
        }
    }

    /// The next entry or missing subtree, in key order; `None` at the end of the tree.
    pub fn next_item(&mut self) -> Result<Option<WalkItem<'_>>> {
        if let Some(root) = self.pending_root.take() {
            self.descend(root, None)?;
        }
        if let Some((cid, layer)) = self.pending_gap.take() {
            return Ok(Some(WalkItem::Gap { cid, layer }));
        }
        loop {
            let Some(frame) = self
                .depth
                .checked_sub(1)
                .and_then(|top| self.frames.get_mut(top))
            else {
                return Ok(None);
            };
            let Some((key, value, right)) = frame.node.entry(frame.next) else {
                self.depth -= 1;
                continue;
            };
            std::mem::swap(&mut self.key, &mut self.previous);
            self.key.clear();
            self.key.extend_from_slice(key);
            frame.next += 1;
            let layer = frame.node.layer();
            let node = frame.node.cid();
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
            return Ok(Some(WalkItem::Entry(&self.key, value)));
        }
    }

    /// Pushes the node `cid` and then the chain of left subtrees below it.
    fn descend(&mut self, mut cid: Cid, mut layer: Option<u32>) -> Result<()> {
        loop {
            match self.push_node(cid, layer)? {
                Some((left, node_layer)) => {
                    cid = left;
                    layer = Some(node_layer - 1);
                }
                None => return Ok(()),
            }
        }
    }

    /// Loads and checks one node; returns its left subtree and layer if it has one.
    fn push_node(&mut self, cid: Cid, layer: Option<u32>) -> Result<Option<(Cid, u32)>> {
        let bytes = match layer {
            Some(layer) if self.gaps => match self.source.get_block(&cid)? {
                Some(bytes) => bytes,
                None => {
                    self.pending_gap = Some((cid, layer));
                    return Ok(None);
                }
            },
            _ => crate::blocks::require_block(&self.source, &cid, "MST node")?,
        };
        if self.depth == self.frames.len() {
            self.frames.push(Frame::default());
        }
        let frame = &mut self.frames[self.depth];
        frame.next = 0;
        // Order across nodes is the walk's own running check, so no bounds are passed.
        let position = match layer {
            None => Position::ROOT,
            Some(layer) => Position::child(layer, None, None),
        };
        self.checker.check(cid, &bytes, position, &mut frame.node)?;
        self.stats.nodes += 1;
        let node_layer = frame.node.layer();
        let left = frame.node.left();
        self.depth += 1;
        if layer.is_none() {
            self.stats.root_layer = node_layer;
        }
        self.stats.depth = self.stats.depth.max(self.depth as u32);
        Ok(left.map(|left| (left, node_layer)))
    }
}
