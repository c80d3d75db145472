//! A subtree's CID from its entries in key order, in one pass.
//!
//! A CAR from `getRepo?since=` leaves out every block written before `since`, so whole
//! subtrees of the new tree are absent ([`MstWalker::with_gaps`](super::MstWalker::with_gaps)
//! reports them). A mirror that holds the records of that key range proves they are still
//! what the subtree holds by rebuilding the subtree's CID from them: nothing else shows that
//! a subtree the host left out is the one the mirror has, rather than an older one that
//! came back (a record put back to an earlier value brings back that value's node).
//!
//! The builder keeps one open node per layer, so memory follows the tree's height, not
//! the number of entries: a gap can span most of a large repository.

use super::{encode_node, layer_for_key};
use crate::cid::Cid;
use crate::error::{Error, Result};

/// Builds the CID of the subtree rooted at a given layer from `(key, value)` pairs pushed
/// in strictly increasing key order.
#[derive(Debug)]
pub struct SubtreeBuilder {
    layer: u32,
    /// `open[i]` is the node of layer `i` being filled.
    open: Vec<OpenNode>,
    previous: Vec<u8>,
    entries: u64,
}

#[derive(Debug, Default)]
struct OpenNode {
    left: Option<Cid>,
    entries: Vec<(Vec<u8>, Cid, Option<Cid>)>,
    /// The closed subtree just below, not yet linked: it becomes the left link of the next
    /// entry pushed here, or the last link when this node closes.
    below: Option<Cid>,
}

impl OpenNode {
    fn link_below(&mut self) {
        let Some(below) = self.below.take() else {
            return;
        };
        match self.entries.last_mut() {
            Some((_, _, right)) => *right = Some(below),
            None => self.left = Some(below),
        }
    }
}

impl SubtreeBuilder {
    /// A builder for a subtree whose root node is at `layer` (one below its parent's).
    ///
    /// # Errors
    ///
    /// [`Error::MstStructure`] when `layer` is above [`super::MAX_LAYER`].
    pub fn new(layer: u32) -> Result<SubtreeBuilder> {
        if layer > super::MAX_LAYER {
            return Err(structure(format!(
                "layer {layer} is above the deepest possible"
            )));
        }
        let mut open = Vec::with_capacity(layer as usize + 1);
        open.resize_with(layer as usize + 1, OpenNode::default);
        Ok(SubtreeBuilder {
            layer,
            open,
            previous: Vec::new(),
            entries: 0,
        })
    }

    /// Entries pushed so far.
    pub fn len(&self) -> u64 {
        self.entries
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Adds the next entry.
    ///
    /// # Errors
    ///
    /// [`Error::MstStructure`] when the key does not follow the previous one, or its layer
    /// is above the subtree's: such a key cannot be in the subtree.
    pub fn push(&mut self, key: &[u8], value: Cid) -> Result<()> {
        if self.entries > 0 && key <= self.previous.as_slice() {
            return Err(structure(format!(
                "key {} does not follow {}",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(&self.previous)
            )));
        }
        let layer = layer_for_key(key);
        if layer > self.layer {
            return Err(structure(format!(
                "key {} is at layer {layer}, above the subtree's {}",
                String::from_utf8_lossy(key),
                self.layer
            )));
        }
        for below in 0..layer {
            self.close(below);
        }
        let node = &mut self.open[layer as usize];
        node.link_below();
        node.entries.push((key.to_vec(), value, None));
        self.previous.clear();
        self.previous.extend_from_slice(key);
        self.entries += 1;
        Ok(())
    }

    /// The subtree's CID: its root node at the builder's layer, with empty nodes that only
    /// link down wherever a layer between has no key, as the canonical tree has them.
    pub fn finish(mut self) -> Cid {
        for below in 0..self.layer {
            self.close(below);
        }
        let top = &mut self.open[self.layer as usize];
        top.link_below();
        Cid::dag_cbor(&encode(top))
    }

    /// Closes the node of `layer`; a node with anything in it becomes the pending link of
    /// the node above.
    fn close(&mut self, layer: u32) {
        let node = &mut self.open[layer as usize];
        node.link_below();
        if node.left.is_none() && node.entries.is_empty() {
            return;
        }
        let cid = Cid::dag_cbor(&encode(node));
        node.left = None;
        node.entries.clear();
        self.open[layer as usize + 1].below = Some(cid);
    }
}

fn encode(node: &OpenNode) -> Vec<u8> {
    encode_node(
        node.left.as_ref(),
        node.entries
            .iter()
            .map(|(key, value, right)| (key.as_slice(), value, right.as_ref())),
    )
}

fn structure(reason: String) -> Error {
    Error::MstStructure {
        node: Cid::dag_cbor(&[]),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mst::{NoBlocks, Tree};

    fn keys(count: usize, seed: u64) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = (0..count as u64)
            .map(|i| {
                format!(
                    "com.example.record/{:016x}",
                    (i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                )
                .into_bytes()
            })
            .collect();
        keys.sort();
        keys
    }

    fn value(key: &[u8]) -> Cid {
        Cid::dag_cbor(key)
    }

    /// The whole tree built in one pass equals the reference-compatible tree's root, and the
    /// same entries under a higher layer gain only links down.
    #[test]
    fn matches_the_tree_at_every_size() -> Result<()> {
        for (count, seed) in [(1, 1), (2, 2), (5, 3), (40, 4), (1000, 5), (5000, 6)] {
            let keys = keys(count, seed);
            let mut tree = Tree::empty(NoBlocks);
            for key in &keys {
                tree.insert(key, value(key))?;
            }
            let root = tree.root_cid();
            let top = keys.iter().map(|key| layer_for_key(key)).max().unwrap_or(0);
            let mut builder = SubtreeBuilder::new(top)?;
            for key in &keys {
                builder.push(key, value(key))?;
            }
            assert_eq!(builder.len(), count as u64);
            assert_eq!(builder.finish(), root, "{count} keys");

            let mut higher = SubtreeBuilder::new(top + 2)?;
            for key in &keys {
                higher.push(key, value(key))?;
            }
            let once = Cid::dag_cbor(&encode_node(Some(&root), std::iter::empty()));
            let twice = Cid::dag_cbor(&encode_node(Some(&once), std::iter::empty()));
            assert_eq!(higher.finish(), twice, "{count} keys, two layers up");
        }
        Ok(())
    }

    /// A changed value, a missing key or an extra key each change the CID.
    #[test]
    fn any_difference_changes_the_cid() -> Result<()> {
        let keys = keys(300, 9);
        let top = keys.iter().map(|key| layer_for_key(key)).max().unwrap_or(0);
        let build = |skip: Option<usize>, change: Option<usize>| -> Result<Cid> {
            let mut builder = SubtreeBuilder::new(top)?;
            for (index, key) in keys.iter().enumerate() {
                if Some(index) == skip {
                    continue;
                }
                let value = if Some(index) == change {
                    Cid::dag_cbor(b"other")
                } else {
                    value(key)
                };
                builder.push(key, value)?;
            }
            Ok(builder.finish())
        };
        let whole = build(None, None)?;
        assert_ne!(build(Some(150), None)?, whole);
        assert_ne!(build(None, Some(7))?, whole);
        Ok(())
    }

    #[test]
    fn refuses_disorder_and_keys_above_the_layer() -> Result<()> {
        let mut builder = SubtreeBuilder::new(8)?;
        builder.push(b"com.example.record/b", value(b"b"))?;
        assert!(builder.push(b"com.example.record/a", value(b"a")).is_err());
        assert!(builder.push(b"com.example.record/b", value(b"b")).is_err());
        // From the spec's examples: this key is at layer 8, so a layer-3 subtree cannot hold it.
        let mut low = SubtreeBuilder::new(3)?;
        assert!(
            low.push(b"app.bsky.feed.post/9adeb165882c", value(b"x"))
                .is_err()
        );
        assert!(SubtreeBuilder::new(crate::mst::MAX_LAYER + 1).is_err());
        Ok(())
    }
}
