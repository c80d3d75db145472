//! Differences between two trees, skipping the subtrees they share.

use std::collections::{BTreeMap, HashSet};

use super::BlockSource;
use super::node::decode_node;
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

/// Compares the tree at `old` (or an empty tree) with the tree at `new`.
///
/// Subtrees with the same CID are not read, so the work is proportional to what changed plus
/// one pass over the old tree's nodes.
pub fn diff<S: BlockSource>(source: &S, old: Option<Cid>, new: Cid) -> Result<TreeDiff> {
    let mut old_nodes = HashSet::new();
    if let Some(old) = old {
        walk(
            source,
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

/// Visits nodes depth-first; `enter` says whether to read a node, `entry` receives its keys.
fn walk<S: BlockSource>(
    source: &S,
    root: Cid,
    enter: &mut dyn FnMut(Cid) -> bool,
    entry: &mut dyn FnMut(Vec<u8>, Cid),
) -> Result<()> {
    let mut stack = vec![root];
    // A malformed tree can link one node from many places; visiting it once keeps the walk
    // linear instead of exponential in the depth.
    let mut visited = HashSet::new();
    while let Some(cid) = stack.pop() {
        if !visited.insert(cid) || !enter(cid) {
            continue;
        }
        let bytes = source.get_block(&cid)?.ok_or_else(|| Error::MissingBlock {
            cid,
            context: "MST node".to_owned(),
        })?;
        let node = decode_node(&bytes).map_err(|source| Error::Block { cid, source })?;
        stack.extend(node.left);
        let mut key: Vec<u8> = Vec::new();
        for item in &node.entries {
            if item.prefix_len > key.len() {
                return Err(Error::MstStructure {
                    node: cid,
                    reason: "prefix length is longer than the previous key".to_owned(),
                });
            }
            key.truncate(item.prefix_len);
            key.extend_from_slice(item.suffix);
            entry(key.clone(), item.value);
            stack.extend(item.right);
        }
    }
    Ok(())
}
