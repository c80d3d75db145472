//! A mutable MST whose nodes load lazily: build, update, and invert operations.

use super::check::{CheckedNode, MstRules, NodeChecker, Position};
use super::node::encode_node;
use super::{BlockSource, layer_for_key};
use crate::cid::Cid;
use crate::error::{Error, Result};

/// A subtree: either not loaded yet (only its CID is known) or in memory.
#[derive(Debug, Clone)]
enum Link {
    Stub(Cid),
    Node(Box<Node>),
}

#[derive(Debug, Clone)]
struct Node {
    layer: u32,
    left: Option<Link>,
    entries: Vec<Entry>,
    /// The node's CID while it is unchanged since it was loaded or last encoded.
    cid: Option<Cid>,
}

#[derive(Debug, Clone)]
struct Entry {
    key: Vec<u8>,
    value: Cid,
    right: Option<Link>,
}

impl Node {
    fn empty(layer: u32) -> Node {
        Node {
            layer,
            left: None,
            entries: Vec::new(),
            cid: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.left.is_none()
    }

    /// The child slot left of entry `index` (the node's `left` for index 0).
    fn slot(&mut self, index: usize) -> &mut Option<Link> {
        match index.checked_sub(1) {
            None => &mut self.left,
            Some(previous) => &mut self.entries[previous].right,
        }
    }

    /// The child slot left of entry `index`, with the keys its subtree lies between: the
    /// neighbouring entries, or this node's own bounds at either end.
    fn bounded_slot<'a>(
        &'a mut self,
        index: usize,
        after: Option<&'a [u8]>,
        before: Option<&'a [u8]>,
    ) -> (&'a mut Option<Link>, Option<&'a [u8]>, Option<&'a [u8]>) {
        let split = index.min(self.entries.len());
        let (head, tail) = self.entries.split_at_mut(split);
        let before = tail.first().map(|e| e.key.as_slice()).or(before);
        match head.last_mut() {
            None => (&mut self.left, after, before),
            Some(Entry { key, right, .. }) => (right, Some(key.as_slice()), before),
        }
    }

    fn search(&self, key: &[u8]) -> std::result::Result<usize, usize> {
        self.entries
            .binary_search_by(|entry| entry.key.as_slice().cmp(key))
    }
}

/// A mutable Merkle Search Tree over a [`BlockSource`].
///
/// Nodes are read from the source only when an operation reaches them, and every node read is
/// remembered ([`Tree::loaded`]): that list is the proof a consumer needs to repeat the same
/// operations, which is how a PDS decides which nodes a firehose commit must carry. Every node
/// read passes the same shape rules as a full walk ([`MstWalker`](super::MstWalker)), including
/// key order against the keys above it, so a partial tree from a firehose commit is held to
/// the rules a `getRepo` walk would apply.
#[derive(Debug, Clone)]
pub struct Tree<S> {
    source: S,
    root: Link,
    loaded: Vec<Cid>,
    checker: NodeChecker,
}

/// What loading a node needs: where blocks come from, the rules, and the proof list.
struct Loader<'t, S> {
    source: &'t S,
    loaded: &'t mut Vec<Cid>,
    checker: &'t mut NodeChecker,
    scratch: CheckedNode,
}

impl<S: BlockSource> Tree<S> {
    /// An empty tree.
    pub fn empty(source: S) -> Tree<S> {
        Tree {
            source,
            root: Link::Node(Box::new(Node::empty(0))),
            loaded: Vec::new(),
            checker: NodeChecker::new(MstRules::default()),
        }
    }

    /// The repository tree rooted at `root`, loaded lazily from `source`; keys must be repo
    /// paths.
    pub fn load(source: S, root: Cid) -> Tree<S> {
        Tree::load_with(source, root, MstRules::default())
    }

    /// The tree rooted at `root` under `rules` (the conformance fixtures' keys are not paths).
    pub fn load_with(source: S, root: Cid, rules: MstRules) -> Tree<S> {
        Tree {
            source,
            root: Link::Stub(root),
            loaded: Vec::new(),
            checker: NodeChecker::new(rules),
        }
    }

    /// CIDs of nodes read from the source so far, in the order they were read.
    pub fn loaded(&self) -> &[Cid] {
        &self.loaded
    }

    /// Splits the tree into its root link and a loader for the nodes below it.
    fn parts(&mut self) -> (&mut Link, Loader<'_, S>) {
        (
            &mut self.root,
            Loader {
                source: &self.source,
                loaded: &mut self.loaded,
                checker: &mut self.checker,
                scratch: CheckedNode::default(),
            },
        )
    }

    /// The value stored under `key`.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Cid>> {
        let key_layer = layer_for_key(key);
        let (root, mut loader) = self.parts();
        let mut node = loader.load(root, Position::ROOT)?;
        // The bounds of the current node, owned: each step down narrows them.
        let mut after: Option<Vec<u8>> = None;
        let mut before: Option<Vec<u8>> = None;
        loop {
            if key_layer > node.layer {
                return Ok(None);
            }
            match node.search(key) {
                Ok(index) => return Ok(Some(node.entries[index].value)),
                Err(_) if key_layer == node.layer => return Ok(None),
                Err(index) => {
                    let child_layer = child_layer(node)?;
                    let low = match index.checked_sub(1) {
                        Some(previous) => Some(node.entries[previous].key.clone()),
                        None => after.take(),
                    };
                    let high = match node.entries.get(index) {
                        Some(entry) => Some(entry.key.clone()),
                        None => before.take(),
                    };
                    let Some(child) = node.slot(index) else {
                        return Ok(None);
                    };
                    after = low;
                    before = high;
                    let position =
                        Position::child(child_layer, after.as_deref(), before.as_deref());
                    node = loader.load(child, position)?;
                }
            }
        }
    }

    /// Sets `key` to `value`, returning the value it replaced.
    pub fn insert(&mut self, key: &[u8], value: Cid) -> Result<Option<Cid>> {
        if key.is_empty() {
            return Err(Error::Operation {
                path: String::new(),
                reason: "empty MST key".to_owned(),
            });
        }
        let key_layer = layer_for_key(key);
        let (root_link, mut loader) = self.parts();
        let root = loader.load(root_link, Position::ROOT)?;
        if root.is_empty() {
            *root = Node::empty(key_layer);
            root.entries.push(Entry {
                key: key.to_vec(),
                value,
                right: None,
            });
            return Ok(None);
        }
        if key_layer > root.layer {
            let root_layer = root.layer;
            // After an error the tree is unusable anyway (a block was missing or malformed).
            let old = std::mem::replace(root_link, Link::Node(Box::new(Node::empty(0))));
            let (low, high) = split(old, key, root_layer, Bounds::NONE, &mut loader)?;
            let mut node = Node::empty(key_layer);
            node.left = wrap(low, root_layer, key_layer - 1);
            node.entries.push(Entry {
                key: key.to_vec(),
                value,
                right: wrap(high, root_layer, key_layer - 1),
            });
            *root_link = Link::Node(Box::new(node));
            return Ok(None);
        }
        insert_into(root, key, key_layer, value, Bounds::NONE, &mut loader)
    }

    /// Removes `key`, returning its value if it was present.
    pub fn remove(&mut self, key: &[u8]) -> Result<Option<Cid>> {
        let key_layer = layer_for_key(key);
        let (root_link, mut loader) = self.parts();
        let root = loader.load(root_link, Position::ROOT)?;
        let removed = remove_from(root, key, key_layer, Bounds::NONE, &mut loader)?;
        // The root may not be an empty node that only points down: trim such layers away.
        loop {
            let root = loader.load(root_link, Position::ROOT)?;
            if !root.entries.is_empty() {
                break;
            }
            let child_layer = root.layer.saturating_sub(1);
            match root.left.take() {
                Some(child) => {
                    *root_link = child;
                    loader.load(root_link, Position::child(child_layer, None, None))?;
                }
                None => {
                    root.layer = 0;
                    root.cid = None;
                    break;
                }
            }
        }
        Ok(removed)
    }

    /// The root CID, encoding every changed node; each newly encoded node is passed to `emit`.
    pub fn root_cid_with(&mut self, emit: &mut dyn FnMut(Cid, Vec<u8>)) -> Cid {
        link_cid(&mut self.root, emit)
    }

    /// The root CID.
    pub fn root_cid(&mut self) -> Cid {
        self.root_cid_with(&mut |_, _| {})
    }

    /// The root CID and every node changed since load (the blocks a commit must add).
    pub fn changed_blocks(&mut self) -> (Cid, Vec<(Cid, Vec<u8>)>) {
        let mut blocks = Vec::new();
        let root = self.root_cid_with(&mut |cid, bytes| blocks.push((cid, bytes)));
        (root, blocks)
    }

    /// Every entry in key order, loading the whole tree.
    pub fn entries(&mut self) -> Result<Vec<(Vec<u8>, Cid)>> {
        let mut out = Vec::new();
        let (root, mut loader) = self.parts();
        collect(root, None, Bounds::NONE, &mut loader, &mut out)?;
        Ok(out)
    }
}

/// The keys a subtree's keys must lie strictly between.
#[derive(Debug, Clone, Copy)]
struct Bounds<'b> {
    after: Option<&'b [u8]>,
    before: Option<&'b [u8]>,
}

impl Bounds<'_> {
    const NONE: Bounds<'static> = Bounds {
        after: None,
        before: None,
    };
}

impl<S: BlockSource> Loader<'_, S> {
    /// Makes `link` a loaded node and returns it; a stub is fetched, decoded and checked.
    fn load<'l>(&mut self, link: &'l mut Link, position: Position<'_>) -> Result<&'l mut Node> {
        if let Link::Stub(cid) = *link {
            let node = self.fetch(cid, position)?;
            self.loaded.push(cid);
            *link = Link::Node(Box::new(node));
        }
        match link {
            Link::Node(node) => Ok(node),
            Link::Stub(cid) => Err(Error::MissingBlock {
                cid: *cid,
                context: "MST node".to_owned(),
            }),
        }
    }

    fn fetch(&mut self, cid: Cid, position: Position<'_>) -> Result<Node> {
        let bytes = crate::blocks::require_block(self.source, &cid, "MST node")?;
        self.checker
            .check(cid, &bytes, position, &mut self.scratch)?;
        let checked = &self.scratch;
        Ok(Node {
            layer: checked.layer(),
            left: checked.left().map(Link::Stub),
            entries: checked
                .entries()
                .map(|(key, value, right)| Entry {
                    key: key.to_vec(),
                    value,
                    right: right.map(Link::Stub),
                })
                .collect(),
            cid: Some(cid),
        })
    }
}

fn child_layer(node: &Node) -> Result<u32> {
    node.layer
        .checked_sub(1)
        .ok_or_else(|| Error::MstStructure {
            node: node.cid.unwrap_or_else(|| Cid::dag_cbor(&[])),
            reason: "layer 0 node has a subtree".to_owned(),
        })
}

fn insert_into<S: BlockSource>(
    node: &mut Node,
    key: &[u8],
    key_layer: u32,
    value: Cid,
    bounds: Bounds<'_>,
    loader: &mut Loader<'_, S>,
) -> Result<Option<Cid>> {
    node.cid = None;
    match node.search(key) {
        Ok(index) => Ok(Some(std::mem::replace(
            &mut node.entries[index].value,
            value,
        ))),
        Err(index) if key_layer == node.layer => {
            let layer = node.layer;
            let (slot, after, before) = node.bounded_slot(index, bounds.after, bounds.before);
            let (low, high) = match slot.take() {
                None => (None, None),
                Some(child) => {
                    let layer = layer.checked_sub(1).ok_or_else(layer_zero_subtree)?;
                    split(child, key, layer, Bounds { after, before }, loader)?
                }
            };
            *node.slot(index) = low;
            node.entries.insert(
                index,
                Entry {
                    key: key.to_vec(),
                    value,
                    right: high,
                },
            );
            Ok(None)
        }
        Err(index) => {
            let layer = child_layer(node)?;
            let (slot, after, before) = node.bounded_slot(index, bounds.after, bounds.before);
            match slot {
                None => {
                    *slot = Some(chain(key, key_layer, value, layer));
                    Ok(None)
                }
                Some(child) => {
                    let child = loader.load(child, Position::child(layer, after, before))?;
                    insert_into(
                        child,
                        key,
                        key_layer,
                        value,
                        Bounds { after, before },
                        loader,
                    )
                }
            }
        }
    }
}

fn layer_zero_subtree() -> Error {
    Error::MstStructure {
        node: Cid::dag_cbor(&[]),
        reason: "layer 0 node has a subtree".to_owned(),
    }
}

/// A new subtree at `layer` holding only `key`, with empty nodes down to the key's layer.
fn chain(key: &[u8], key_layer: u32, value: Cid, layer: u32) -> Link {
    let mut node = Node::empty(key_layer);
    node.entries.push(Entry {
        key: key.to_vec(),
        value,
        right: None,
    });
    let mut link = Link::Node(Box::new(node));
    for layer in key_layer + 1..=layer {
        let mut parent = Node::empty(layer);
        parent.left = Some(link);
        link = Link::Node(Box::new(parent));
    }
    link
}

/// Wraps a subtree of layer `from` in empty nodes up to layer `to`.
fn wrap(link: Option<Link>, from: u32, to: u32) -> Option<Link> {
    let mut link = link?;
    for layer in from + 1..=to {
        let mut parent = Node::empty(layer);
        parent.left = Some(link);
        link = Link::Node(Box::new(parent));
    }
    Some(link)
}

/// Splits a subtree of layer `layer` (within `bounds`) into the keys below `key` and those
/// above it.
fn split<S: BlockSource>(
    mut link: Link,
    key: &[u8],
    layer: u32,
    bounds: Bounds<'_>,
    loader: &mut Loader<'_, S>,
) -> Result<(Option<Link>, Option<Link>)> {
    let node = loader.load(
        &mut link,
        Position::child(layer, bounds.after, bounds.before),
    )?;
    let index = match node.search(key) {
        Ok(_) => {
            return Err(Error::Operation {
                path: String::from_utf8_lossy(key).into_owned(),
                reason: "key already present below a higher layer".to_owned(),
            });
        }
        Err(index) => index,
    };
    let (slot, after, before) = node.bounded_slot(index, bounds.after, bounds.before);
    let (child_low, child_high) = match slot.take() {
        None => (None, None),
        Some(child) => {
            let child_layer = layer.checked_sub(1).ok_or_else(layer_zero_subtree)?;
            split(child, key, child_layer, Bounds { after, before }, loader)?
        }
    };
    let high_entries = node.entries.split_off(index);
    *node.slot(index) = child_low;
    node.cid = None;
    let mut high = Node::empty(layer);
    high.left = child_high;
    high.entries = high_entries;
    let low = if node.is_empty() { None } else { Some(link) };
    let high = if high.is_empty() {
        None
    } else {
        Some(Link::Node(Box::new(high)))
    };
    Ok((low, high))
}

fn remove_from<S: BlockSource>(
    node: &mut Node,
    key: &[u8],
    key_layer: u32,
    bounds: Bounds<'_>,
    loader: &mut Loader<'_, S>,
) -> Result<Option<Cid>> {
    if key_layer > node.layer {
        return Ok(None);
    }
    match node.search(key) {
        Ok(index) => {
            node.cid = None;
            let entry = node.entries.remove(index);
            let layer = node.layer;
            // After the removal, the slot left of `index` is bounded by the neighbours.
            let (slot, after, before) = node.bounded_slot(index, bounds.after, bounds.before);
            let left = slot.take();
            let merged = merge(
                left,
                entry.right,
                layer,
                Bounds { after, before },
                &entry.key,
                loader,
            )?;
            *node.slot(index) = merged;
            Ok(Some(entry.value))
        }
        Err(_) if key_layer == node.layer => Ok(None),
        Err(index) => {
            let layer = child_layer(node)?;
            let (slot, after, before) = node.bounded_slot(index, bounds.after, bounds.before);
            let Some(child) = slot else {
                return Ok(None);
            };
            let child = loader.load(child, Position::child(layer, after, before))?;
            let removed = remove_from(child, key, key_layer, Bounds { after, before }, loader)?;
            if removed.is_some() {
                let now_empty = child.is_empty();
                node.cid = None;
                if now_empty {
                    *node.slot(index) = None;
                }
            }
            Ok(removed)
        }
    }
}

/// Joins two adjacent subtrees of the node at `parent_layer`: all of `left` sorts before
/// `mid` (the removed key between them) and all of `right` after it, within `bounds`.
fn merge<S: BlockSource>(
    left: Option<Link>,
    right: Option<Link>,
    parent_layer: u32,
    bounds: Bounds<'_>,
    mid: &[u8],
    loader: &mut Loader<'_, S>,
) -> Result<Option<Link>> {
    let (mut left, mut right) = match (left, right) {
        (None, other) | (other, None) => return Ok(other),
        (Some(left), Some(right)) => (left, right),
    };
    let layer = parent_layer.checked_sub(1).ok_or_else(layer_zero_subtree)?;
    let right_node = loader.load(&mut right, Position::child(layer, Some(mid), bounds.before))?;
    let right_left = right_node.left.take();
    let right_entries = std::mem::take(&mut right_node.entries);
    let left_node = loader.load(&mut left, Position::child(layer, bounds.after, Some(mid)))?;
    left_node.cid = None;
    let seam_index = left_node.entries.len();
    let seam = left_node.slot(seam_index).take();
    // The seam's two halves lie between the last key on the left and the first on the right.
    let seam_after = left_node.entries.last().map(|e| e.key.clone());
    let seam_bounds = Bounds {
        after: seam_after.as_deref().or(bounds.after),
        before: right_entries
            .first()
            .map(|e| e.key.as_slice())
            .or(bounds.before),
    };
    *left_node.slot(seam_index) = merge(seam, right_left, layer, seam_bounds, mid, loader)?;
    left_node.entries.extend(right_entries);
    Ok(Some(left))
}

fn link_cid(link: &mut Link, emit: &mut dyn FnMut(Cid, Vec<u8>)) -> Cid {
    let node = match link {
        Link::Stub(cid) => return *cid,
        Link::Node(node) => node,
    };
    if let Some(cid) = node.cid {
        return cid;
    }
    let left = node.left.as_mut().map(|left| link_cid(left, emit));
    let rights: Vec<Option<Cid>> = node
        .entries
        .iter_mut()
        .map(|entry| entry.right.as_mut().map(|right| link_cid(right, emit)))
        .collect();
    let bytes = encode_node(
        left.as_ref(),
        node.entries
            .iter()
            .zip(&rights)
            .map(|(entry, right)| (entry.key.as_slice(), &entry.value, right.as_ref())),
    );
    let cid = Cid::dag_cbor(&bytes);
    node.cid = Some(cid);
    emit(cid, bytes);
    cid
}

fn collect<S: BlockSource>(
    link: &mut Link,
    layer: Option<u32>,
    bounds: Bounds<'_>,
    loader: &mut Loader<'_, S>,
    out: &mut Vec<(Vec<u8>, Cid)>,
) -> Result<()> {
    let position = match layer {
        None => Position::ROOT,
        Some(layer) => Position::child(layer, bounds.after, bounds.before),
    };
    let node = loader.load(link, position)?;
    let child = node.layer.checked_sub(1);
    for index in 0..=node.entries.len() {
        let (slot, after, before) = node.bounded_slot(index, bounds.after, bounds.before);
        if let Some(slot) = slot {
            collect(slot, child, Bounds { after, before }, loader, out)?;
        }
        if let Some(entry) = node.entries.get(index) {
            out.push((entry.key.clone(), entry.value));
        }
    }
    Ok(())
}
