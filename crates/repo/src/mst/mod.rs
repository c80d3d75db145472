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
//!
//! # Tricky bits
//!
//! - Inserting a key above the current root layer splits the whole tree along the key.
//! - Deleting a key merges its left and right neighbours' subtrees, recursively down the seam.
//! - Empty intermediate nodes must exist so that links never skip a layer, but an empty node
//!   without a subtree is only legal as the root of an empty tree, and the root itself is never
//!   an empty node that only points down (it is trimmed away).

mod check;
mod diff;
mod node;
mod tree;
mod walk;

use sha2::{Digest, Sha256};

pub use crate::blocks::{BlockSource, NoBlocks};

pub use check::MstRules;
pub use diff::{DiffEntry, TreeDiff, diff, diff_with};
pub use node::{NodeEntry, NodeView, decode_node, encode_node};
pub use tree::Tree;
pub use walk::{MstWalker, WalkStats};

/// Deepest layer a key can have: sha256 has 256 bits, two per layer.
pub const MAX_LAYER: u32 = 128;

/// The layer of a key: leading zero bits of its sha256, in 2-bit groups (fanout 4).
///
/// Every key of every node is hashed on the verification path, and repo paths fit one
/// sha256 block (up to 55 bytes), so those go straight to the compression function and only
/// the state words needed are read.
pub fn layer_for_key(key: &[u8]) -> u32 {
    let state = if key.len() <= 55 {
        let mut block = [0u8; 64];
        block[..key.len()].copy_from_slice(key);
        block[key.len()] = 0x80;
        block[56..].copy_from_slice(&((key.len() as u64) * 8).to_be_bytes());
        let mut state = SHA256_IV;
        sha2::block_api::compress256(&mut state, &[block]);
        state
    } else {
        let digest = Sha256::digest(key);
        let mut state = [0u32; 8];
        for (word, bytes) in state.iter_mut().zip(digest.chunks_exact(4)) {
            *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        state
    };
    let mut zeros = 0;
    for word in state {
        zeros += word.leading_zeros();
        if word != 0 {
            break;
        }
    }
    zeros / 2
}

/// The sha256 initial hash value (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// The length of the common prefix of two byte strings.
pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-block path agrees with a plain sha256 at every length around the boundary.
    #[test]
    fn layer_fast_path_matches_sha256() {
        fn slow(key: &[u8]) -> u32 {
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
