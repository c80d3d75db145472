//! Differences between two trees, skipping the subtrees they share.

use std::collections::{BTreeMap, HashSet};

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
    let mut old_nodes = HashSet::new();
    if let Some(old) = old {
        walk(
            source,
            &mut checker,
            old,
            &mut |cid| old_nodes.insert(cid),
            &mut |_, _| {},
        )?;
    }
    let mut new_only = Vec::new();
    let mut new_entries = BTreeMap::new();
    let mut new_reached = HashSet::new();
    walk(
        source,
        &mut checker,
        new,
        &mut |cid| {
            new_reached.insert(cid);
            if old_nodes.contains(&cid) {
                false
            } else {
                new_only.push(cid);
                true
            }
        },
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
            &mut |cid| {
                if new_reached.contains(&cid) {
                    false
                } else {
                    removed.push(cid);
                    true
                }
            },
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

/// A node to visit: its CID, the layer its parent implies, and the keys it lies between.
type Pending = (Cid, Option<u32>, Option<Vec<u8>>, Option<Vec<u8>>);

/// Visits nodes depth-first; `enter` says whether to read a node, `entry` receives its keys.
fn walk<S: BlockSource>(
    source: &S,
    checker: &mut NodeChecker,
    root: Cid,
    enter: &mut dyn FnMut(Cid) -> bool,
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
        if !enter(cid) {
            continue;
        }
        let bytes = source.get_block(&cid)?.ok_or_else(|| Error::MissingBlock {
            cid,
            context: "MST node".to_owned(),
        })?;
        let position = match layer {
            None => Position::ROOT,
            Some(layer) => Position::child(layer, after.as_deref(), before.as_deref()),
        };
        checker.check(cid, &bytes, position, &mut node)?;
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
