//! A mutable MST whose nodes load lazily: build, update, and invert operations.

use super::node::{decode_node, encode_node};
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

    fn search(&self, key: &[u8]) -> std::result::Result<usize, usize> {
        self.entries
            .binary_search_by(|entry| entry.key.as_slice().cmp(key))
    }
}

/// A mutable Merkle Search Tree over a [`BlockSource`].
///
/// Nodes are read from the source only when an operation reaches them, and every node read is
/// remembered ([`Tree::loaded`]): that list is the proof a consumer needs to repeat the same
/// operations, which is how a PDS decides which nodes a firehose commit must carry.
#[derive(Debug, Clone)]
pub struct Tree<S> {
    source: S,
    root: Link,
    loaded: Vec<Cid>,
}

impl<S: BlockSource> Tree<S> {
    /// An empty tree.
    pub fn empty(source: S) -> Tree<S> {
        Tree {
            source,
            root: Link::Node(Box::new(Node::empty(0))),
            loaded: Vec::new(),
        }
    }

    /// The tree rooted at `root`, loaded lazily from `source`.
    pub fn load(source: S, root: Cid) -> Tree<S> {
        Tree {
            source,
            root: Link::Stub(root),
            loaded: Vec::new(),
        }
    }

    /// CIDs of nodes read from the source so far, in the order they were read.
    pub fn loaded(&self) -> &[Cid] {
        &self.loaded
    }

    /// The value stored under `key`.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Cid>> {
        let key_layer = layer_for_key(key);
        let mut link = &mut self.root;
        let mut layer = None;
        loop {
            let node = load(link, layer, &self.source, &mut self.loaded)?;
            if key_layer > node.layer {
                return Ok(None);
            }
            match node.search(key) {
                Ok(index) => return Ok(Some(node.entries[index].value)),
                Err(_) if key_layer == node.layer => return Ok(None),
                Err(index) => {
                    let child_layer = node.layer - 1;
                    match node.slot(index) {
                        None => return Ok(None),
                        Some(child) => {
                            link = child;
                            layer = Some(child_layer);
                        }
                    }
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
        let root = load(&mut self.root, None, &self.source, &mut self.loaded)?;
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
            let old = std::mem::replace(&mut self.root, Link::Node(Box::new(Node::empty(0))));
            let (low, high) = split(old, key, root_layer, &self.source, &mut self.loaded)?;
            let mut node = Node::empty(key_layer);
            node.left = wrap(low, root_layer, key_layer - 1);
            node.entries.push(Entry {
                key: key.to_vec(),
                value,
                right: wrap(high, root_layer, key_layer - 1),
            });
            self.root = Link::Node(Box::new(node));
            return Ok(None);
        }
        insert_into(root, key, key_layer, value, &self.source, &mut self.loaded)
    }

    /// Removes `key`, returning its value if it was present.
    pub fn remove(&mut self, key: &[u8]) -> Result<Option<Cid>> {
        let key_layer = layer_for_key(key);
        let root = load(&mut self.root, None, &self.source, &mut self.loaded)?;
        let removed = remove_from(root, key, key_layer, &self.source, &mut self.loaded)?;
        // The root may not be an empty node that only points down: trim such layers away.
        loop {
            let root = load(&mut self.root, None, &self.source, &mut self.loaded)?;
            if !root.entries.is_empty() {
                break;
            }
            let child_layer = root.layer.saturating_sub(1);
            match root.left.take() {
                Some(child) => {
                    self.root = child;
                    load(
                        &mut self.root,
                        Some(child_layer),
                        &self.source,
                        &mut self.loaded,
                    )?;
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
        collect(
            &mut self.root,
            None,
            &self.source,
            &mut self.loaded,
            &mut out,
        )?;
        Ok(out)
    }
}

/// Makes `link` a loaded node and returns it; a stub is fetched, decoded and checked.
fn load<'t, S: BlockSource>(
    link: &'t mut Link,
    layer: Option<u32>,
    source: &S,
    loaded: &mut Vec<Cid>,
) -> Result<&'t mut Node> {
    if let Link::Stub(cid) = *link {
        let node = fetch(cid, layer, source)?;
        loaded.push(cid);
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

fn fetch<S: BlockSource>(cid: Cid, layer: Option<u32>, source: &S) -> Result<Node> {
    let bytes = source.get_block(&cid)?.ok_or_else(|| Error::MissingBlock {
        cid,
        context: "MST node".to_owned(),
    })?;
    let view = decode_node(&bytes).map_err(|source| Error::Block { cid, source })?;
    let structure = |reason: &str| Error::MstStructure {
        node: cid,
        reason: reason.to_owned(),
    };
    let mut entries: Vec<Entry> = Vec::with_capacity(view.entries.len());
    for entry in &view.entries {
        let previous = entries.last().map(|e| e.key.as_slice()).unwrap_or_default();
        let prefix = previous
            .get(..entry.prefix_len)
            .ok_or_else(|| structure("prefix length is longer than the previous key"))?;
        let mut key = Vec::with_capacity(entry.prefix_len + entry.suffix.len());
        key.extend_from_slice(prefix);
        key.extend_from_slice(entry.suffix);
        if !entries.is_empty() && key.as_slice() <= previous {
            return Err(Error::MstOrder {
                node: cid,
                key: String::from_utf8_lossy(&key).into_owned(),
                previous: String::from_utf8_lossy(previous).into_owned(),
            });
        }
        entries.push(Entry {
            key,
            value: entry.value,
            right: entry.right.map(Link::Stub),
        });
    }
    let layer = match (layer, entries.first()) {
        (Some(layer), _) => layer,
        (None, Some(first)) => layer_for_key(&first.key),
        (None, None) => 0,
    };
    for entry in &entries {
        let key_layer = layer_for_key(&entry.key);
        if key_layer != layer {
            return Err(Error::MstLayer {
                node: cid,
                key: String::from_utf8_lossy(&entry.key).into_owned(),
                key_layer,
                node_layer: layer,
            });
        }
    }
    if layer == 0 && (view.left.is_some() || entries.iter().any(|e| e.right.is_some())) {
        return Err(structure("layer 0 node has a subtree"));
    }
    Ok(Node {
        layer,
        left: view.left.map(Link::Stub),
        entries,
        cid: Some(cid),
    })
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
    source: &S,
    loaded: &mut Vec<Cid>,
) -> Result<Option<Cid>> {
    node.cid = None;
    match node.search(key) {
        Ok(index) => Ok(Some(std::mem::replace(
            &mut node.entries[index].value,
            value,
        ))),
        Err(index) if key_layer == node.layer => {
            let (low, high) = match node.slot(index).take() {
                None => (None, None),
                Some(child) => split(child, key, child_layer(node)?, source, loaded)?,
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
            match node.slot(index) {
                None => {
                    *node.slot(index) = Some(chain(key, key_layer, value, layer));
                    Ok(None)
                }
                Some(child) => {
                    let child = load(child, Some(layer), source, loaded)?;
                    insert_into(child, key, key_layer, value, source, loaded)
                }
            }
        }
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

/// Splits a subtree of layer `layer` into the keys below `key` and those above it.
fn split<S: BlockSource>(
    mut link: Link,
    key: &[u8],
    layer: u32,
    source: &S,
    loaded: &mut Vec<Cid>,
) -> Result<(Option<Link>, Option<Link>)> {
    let node = load(&mut link, Some(layer), source, loaded)?;
    let index = match node.search(key) {
        Ok(_) => {
            return Err(Error::Operation {
                path: String::from_utf8_lossy(key).into_owned(),
                reason: "key already present below a higher layer".to_owned(),
            });
        }
        Err(index) => index,
    };
    let high_entries = node.entries.split_off(index);
    let (child_low, child_high) = match node.slot(index).take() {
        None => (None, None),
        Some(child) => split(child, key, child_layer(node)?, source, loaded)?,
    };
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
    source: &S,
    loaded: &mut Vec<Cid>,
) -> Result<Option<Cid>> {
    if key_layer > node.layer {
        return Ok(None);
    }
    match node.search(key) {
        Ok(index) => {
            node.cid = None;
            let entry = node.entries.remove(index);
            let layer = node.layer;
            let left = node.slot(index).take();
            *node.slot(index) = merge(left, entry.right, layer, source, loaded)?;
            Ok(Some(entry.value))
        }
        Err(_) if key_layer == node.layer => Ok(None),
        Err(index) => {
            let layer = child_layer(node)?;
            let Some(child) = node.slot(index) else {
                return Ok(None);
            };
            let child = load(child, Some(layer), source, loaded)?;
            let removed = remove_from(child, key, key_layer, source, loaded)?;
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

/// Joins two adjacent subtrees of the node at `parent_layer` (all of `left` sorts before `right`).
fn merge<S: BlockSource>(
    left: Option<Link>,
    right: Option<Link>,
    parent_layer: u32,
    source: &S,
    loaded: &mut Vec<Cid>,
) -> Result<Option<Link>> {
    let (mut left, mut right) = match (left, right) {
        (None, other) | (other, None) => return Ok(other),
        (Some(left), Some(right)) => (left, right),
    };
    let layer = parent_layer
        .checked_sub(1)
        .ok_or_else(|| Error::MstStructure {
            node: Cid::dag_cbor(&[]),
            reason: "layer 0 node has a subtree".to_owned(),
        })?;
    let right_node = load(&mut right, Some(layer), source, loaded)?;
    let right_left = right_node.left.take();
    let right_entries = std::mem::take(&mut right_node.entries);
    let left_node = load(&mut left, Some(layer), source, loaded)?;
    left_node.cid = None;
    let seam_index = left_node.entries.len();
    let seam = left_node.slot(seam_index).take();
    *left_node.slot(seam_index) = merge(seam, right_left, layer, source, loaded)?;
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
    source: &S,
    loaded: &mut Vec<Cid>,
    out: &mut Vec<(Vec<u8>, Cid)>,
) -> Result<()> {
    let node = load(link, layer, source, loaded)?;
    let child = node.layer.checked_sub(1);
    if let Some(left) = node.left.as_mut() {
        collect(left, child, source, loaded, out)?;
    }
    for entry in &mut node.entries {
        out.push((entry.key.clone(), entry.value));
        if let Some(right) = entry.right.as_mut() {
            collect(right, child, source, loaded, out)?;
        }
    }
    Ok(())
}
