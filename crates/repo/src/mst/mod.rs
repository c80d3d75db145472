//! The Merkle Search Tree: the key-ordered, content-addressed index of a repository.
//!
//! # Terminology
//!
//! - A *key* is a repo path (`collection/rkey`); the tree itself treats keys as bytes, so the
//!   conformance fixtures' synthetic keys work too. Repo-path syntax is checked when the
//!   rules ask for it ([`MstRules::check_paths`], the default).
//! - A key's *layer* is the number of leading zero bits of `sha256(key)`, halved and rounded down.
//!   Every key sits in a node of its own layer; subtrees of a layer-`n` node are layer `n-1`.
//! - A *node* is `{l: left subtree, e: [{p: shared prefix, k: key suffix, v: value, t: right subtree}]}`.
//!
//! # Pieces
//!
//! Every reader loads nodes through one checker (`check.rs`): the canonical encoding and every
//! shape rule, so the walker, the lazy tree and the diff accept exactly the same trees.
//!
//! - [`MstWalker`] streams `(key, value)` in order from a [`BlockSource`], checking every shape
//!   rule on the way: the verification path for a full repository.
//! - [`Tree`] is a mutable tree whose nodes load lazily from a [`BlockSource`]. Inserting and
//!   deleting keeps the canonical shape, so root CIDs reproduce the reference byte for byte.
//!   Loading only what an operation touches is what lets a firehose commit's partial tree be
//!   inverted (Sync 1.1) without the rest of the repository.
//! - [`diff`] compares two trees, skipping shared subtrees.
//! - [`SubtreeBuilder`] rebuilds a subtree's CID from its entries in one pass: how the
//!   subtrees a `getRepo?since=` CAR leaves out ([`WalkItem::Gap`]) are proven.
//!
//! # Tricky bits
//!
//! - Inserting a key above the current root layer splits the whole tree along the key.
//! - Deleting a key merges its left and right neighbours' subtrees, recursively down the seam.
//! - Empty intermediate nodes must exist so that links never skip a layer, but an empty node
//!   without a subtree is only legal as the root of an empty tree, and the root itself is never
//!   an empty node that only points down (it is trimmed away).

mod build;
mod check;
mod diff;
mod node;
mod tree;
mod walk;

pub use crate::blocks::{BlockSource, NoBlocks};

pub use build::SubtreeBuilder;
pub use check::MstRules;
pub use diff::{DiffEntry, TreeDiff, diff, diff_with};
pub use node::{NodeEntry, NodeView, decode_node, encode_node};
pub use tree::Tree;
pub use walk::{MstWalker, WalkItem, WalkStats};

/// Deepest layer a key can have: sha256 has 256 bits, two per layer.
pub const MAX_LAYER: u32 = 128;

/// The layer of a key: leading zero bits of its sha256, in 2-bit groups (fanout 4).
pub fn layer_for_key(key: &[u8]) -> u32 {
    let mut zeros = 0;
    for word in crate::cid::sha256_words(key) {
        zeros += word.leading_zeros();
        if word != 0 {
            break;
        }
    }
    zeros / 2
}

/// The length of the common prefix of two byte strings.
pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layer agrees with one computed from a plain sha256 at many lengths.
    #[test]
    fn layer_matches_sha256() {
        fn slow(key: &[u8]) -> u32 {
            use sha2::{Digest, Sha256};
            let hash = Sha256::digest(key);
            let mut zeros = 0;
            for &byte in hash.iter() {
                zeros += byte.leading_zeros();
                if byte != 0 {
                    break;
                }
            }
            zeros / 2
        }
        for len in 0..130 {
            for seed in 0..200u32 {
                let key: Vec<u8> = (0..len).map(|i| (i as u32 * 31 + seed * 7) as u8).collect();
                assert_eq!(layer_for_key(&key), slow(&key), "length {len}, seed {seed}");
            }
        }
    }

    #[test]
    fn layers_from_spec() {
        assert_eq!(layer_for_key(b"2653ae71"), 0);
        assert_eq!(layer_for_key(b"blue"), 1);
        assert_eq!(layer_for_key(b"app.bsky.feed.post/454397e440ec"), 4);
        assert_eq!(layer_for_key(b"app.bsky.feed.post/9adeb165882c"), 8);
    }
}
