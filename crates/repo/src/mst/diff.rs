//! Differences between two trees, skipping the subtrees they share.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::BlockSource;
use super::check::{CheckedNode, MstRules, NodeChecker, Position};
use crate::cid::Cid;
use crate::error::{Error, Result};

/// A key whose value differs between the trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffEntry {
    /// The key.
    pub key: Vec<u8>,
    /// Its value in the old tree (`None`: created).
    pub old: Option<Cid>,
    /// Its value in the new tree (`None`: deleted).
    pub new: Option<Cid>,
}

/// What changed from one tree to another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeDiff {
    /// Changed keys in key order.
    pub entries: Vec<DiffEntry>,
    /// Nodes of the new tree that the old tree lacks.
    pub new_nodes: Vec<Cid>,
    /// Nodes of the old tree that the new tree lacks.
    pub removed_nodes: Vec<Cid>,
}

/// Compares the repository tree at `old` (or an empty tree) with the one at `new`.
///
/// Subtrees with the same CID are not read, so the work is proportional to what changed plus
/// one pass over the old tree's nodes. Every node read passes the same shape rules as a full
/// walk.
pub fn diff<S: BlockSource>(source: &S, old: Option<Cid>, new: Cid) -> Result<TreeDiff> {
    diff_with(source, old, new, MstRules::default())
}

/// [`diff`] under `rules` (the conformance fixtures' keys are not repo paths).
pub fn diff_with<S: BlockSource>(
    source: &S,
    old: Option<Cid>,
    new: Cid,
    rules: MstRules,
) -> Result<TreeDiff> {
    let mut checker = NodeChecker::new(rules);
    let mut old_nodes: HashMap<Cid, NodeInfo> = HashMap::new();
    if let Some(old) = old {
        walk(
            source,
            &mut checker,
            old,
            &mut |_, _| Ok(true),
            &mut |cid, node| {
                old_nodes.insert(cid, NodeInfo::of(node));
            },
            &mut |_, _| {},
        )?;
    }
    let mut ranges = HashMap::new();
    let mut new_only = Vec::new();
    let mut new_entries = BTreeMap::new();
    let mut new_reached = HashSet::new();
    walk(
        source,
        &mut checker,
        new,
        &mut |cid, position| {
            new_reached.insert(cid);
            if !old_nodes.contains_key(&cid) {
                new_only.push(cid);
                return Ok(true);
            }
            // A subtree shared with the old tree is not read again, but it must still fit
            // where the new tree links it: its layer, and its keys between the new bounds.
            check_shared(cid, position, &old_nodes, &mut ranges)?;
            Ok(false)
        },
        &mut |_, _| {},
        &mut |key, value| {
            new_entries.insert(key, value);
        },
    )?;
    let mut removed = Vec::new();
    let mut old_entries = BTreeMap::new();
    if let Some(old) = old {
        walk(
            source,
            &mut checker,
            old,
            &mut |cid, _| {
                if new_reached.contains(&cid) {
                    Ok(false)
                } else {
                    removed.push(cid);
                    Ok(true)
                }
            },
            &mut |_, _| {},
            &mut |key, value| {
                old_entries.insert(key, value);
            },
        )?;
    }
    let mut entries = Vec::new();
    for (key, &new_value) in &new_entries {
        match old_entries.get(key) {
            Some(&old_value) if old_value == new_value => {}
            old_value => entries.push(DiffEntry {
                key: key.clone(),
                old: old_value.copied(),
                new: Some(new_value),
            }),
        }
    }
    for (key, &old_value) in &old_entries {
        if !new_entries.contains_key(key) {
            entries.push(DiffEntry {
                key: key.clone(),
                old: Some(old_value),
                new: None,
            });
        }
    }
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(TreeDiff {
        entries,
        new_nodes: new_only,
        removed_nodes: removed,
    })
}

/// What the old walk learned of a node, to place it again in the new tree unread.
struct NodeInfo {
    layer: u32,
    first: Option<Vec<u8>>,
    last: Option<Vec<u8>>,
    left: Option<Cid>,
    last_right: Option<Cid>,
}

impl NodeInfo {
    fn of(node: &CheckedNode) -> NodeInfo {
        let last = node
            .len()
            .checked_sub(1)
            .and_then(|index| node.entry(index));
        NodeInfo {
            layer: node.layer(),
            first: node.entry(0).map(|(key, _, _)| key.to_vec()),
            last: last.map(|(key, _, _)| key.to_vec()),
            left: node.left(),
            last_right: last.and_then(|(_, _, right)| right),
        }
    }
}

/// The smallest and largest key under each subtree computed so far (`None`: no keys).
type Ranges = HashMap<Cid, Option<(Vec<u8>, Vec<u8>)>>;

/// The smallest and largest key under `cid`, from the old walk's node records.
fn subtree_range(
    cid: Cid,
    nodes: &HashMap<Cid, NodeInfo>,
    ranges: &mut Ranges,
) -> Option<(Vec<u8>, Vec<u8>)> {
    if let Some(range) = ranges.get(&cid) {
        return range.clone();
    }
    let info = nodes.get(&cid)?;
    let low = match info.left {
        Some(left) => subtree_range(left, nodes, ranges).map(|(low, _)| low),
        None => info.first.clone(),
    };
    let high = match (info.last_right, &info.last) {
        (Some(right), _) => subtree_range(right, nodes, ranges).map(|(_, high)| high),
        (None, Some(last)) => Some(last.clone()),
        (None, None) => info
            .left
            .and_then(|left| subtree_range(left, nodes, ranges))
            .map(|(_, high)| high),
    };
    let range = low.zip(high);
    ranges.insert(cid, range.clone());
    range
}

/// Requires a subtree of the old tree to fit the position the new tree links it at.
fn check_shared(
    cid: Cid,
    position: Position<'_>,
    nodes: &HashMap<Cid, NodeInfo>,
    ranges: &mut Ranges,
) -> Result<()> {
    let Some(info) = nodes.get(&cid) else {
        return Ok(());
    };
    // As the new root, an old intermediate node (no entries, only a subtree) is refused, as
    // the walk refuses it; its layer is its own, so there is nothing else to check.
    if position.layer.is_none() && info.first.is_none() && info.left.is_some() {
        return Err(Error::MstStructure {
            node: cid,
            reason: "root is an empty node that only points to a subtree".to_owned(),
        });
    }
    if let Some(layer) = position.layer
        && layer != info.layer
    {
        return Err(Error::MstLayer {
            node: cid,
            key: String::from_utf8_lossy(info.first.as_deref().unwrap_or_default()).into_owned(),
            key_layer: info.layer,
            node_layer: layer,
        });
    }
    let Some((low, high)) = subtree_range(cid, nodes, ranges) else {
        return Ok(());
    };
    let order = |key: &[u8], previous: &[u8]| Error::MstOrder {
        node: cid,
        key: String::from_utf8_lossy(key).into_owned(),
        previous: String::from_utf8_lossy(previous).into_owned(),
    };
    if let Some(after) = position.after
        && low.as_slice() <= after
    {
        return Err(order(&low, after));
    }
    if let Some(before) = position.before
        && high.as_slice() >= before
    {
        return Err(order(before, &high));
    }
    Ok(())
}

/// A node to visit: its CID, the layer its parent implies, and the keys it lies between.
type Pending = (Cid, Option<u32>, Option<Vec<u8>>, Option<Vec<u8>>);

/// Visits nodes depth-first; `enter` says whether to read a node, `entry` receives its keys.
fn walk<S: BlockSource>(
    source: &S,
    checker: &mut NodeChecker,
    root: Cid,
    enter: &mut dyn FnMut(Cid, Position<'_>) -> Result<bool>,
    on_node: &mut dyn FnMut(Cid, &CheckedNode),
    entry: &mut dyn FnMut(Vec<u8>, Cid),
) -> Result<()> {
    let mut stack: Vec<Pending> = vec![(root, None, None, None)];
    // In a valid tree every node has one place (its keys fix it); a node linked twice would
    // otherwise make the walk exponential in the depth.
    let mut visited = HashSet::new();
    let mut node = CheckedNode::default();
    while let Some((cid, layer, after, before)) = stack.pop() {
        if !visited.insert(cid) {
            return Err(Error::MstStructure {
                node: cid,
                reason: "node is linked from more than one place".to_owned(),
            });
        }
        let position = match layer {
            None => Position::ROOT,
            Some(layer) => Position::child(layer, after.as_deref(), before.as_deref()),
        };
        if !enter(cid, position)? {
            continue;
        }
        let bytes = crate::blocks::require_block(source, &cid, "MST node")?;
        checker.check(cid, &bytes, position, &mut node)?;
        on_node(cid, &node);
        let child_layer = node.layer().checked_sub(1);
        let mut low = after;
        if let Some(left) = node.left() {
            let high = node
                .entry(0)
                .map(|(key, _, _)| key.to_vec())
                .or(before.clone());
            stack.push((left, child_layer, low.clone(), high));
        }
        for index in 0..node.len() {
            let Some((key, value, right)) = node.entry(index) else {
                break;
            };
            entry(key.to_vec(), value);
            low = Some(key.to_vec());
            if let Some(right) = right {
                let high = node
                    .entry(index + 1)
                    .map(|(key, _, _)| key.to_vec())
                    .or(before.clone());
                stack.push((right, child_layer, low.clone(), high));
            }
        }
    }
    Ok(())
}
