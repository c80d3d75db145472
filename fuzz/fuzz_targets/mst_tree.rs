//! Insert/remove sequences on `Tree::empty(NoBlocks)`, checked against a `BTreeMap`.
//!
//! Each operation is a tag byte and a key selector: `tag & 3` is insert (0, 1), remove (2) or
//! get (3); `(tag >> 2) & 3` picks the key kind: one of 256 short keys, one of 256 keys of
//! layer 2 or more (so the tree grows tall and splits above the root), 1–16 raw input bytes,
//! or a repo-path-like key sharing a long prefix. Values are CIDs of a counter.
//!
//! Checks after every operation: the returned old value matches the model. At the end:
//! `entries()` equals the model; the root equals that of a tree built from the model in key
//! order and of one built in reverse order; the emitted blocks walk (`MstWalker`) to the same
//! entries; a `Tree` loaded lazily from those blocks, after removing every other key, has the
//! same root as a fresh tree built from what is left.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use atpdb_repo::Cid;
use atpdb_repo::blocks::VerifiedBlocks;
use atpdb_repo::mst::{MstRules, MstWalker, NoBlocks, Tree, layer_for_key};
use libfuzzer_sys::fuzz_target;

/// 256 keys of layer 2 or more (a quarter of them 3 or more, ...), found once.
fn tall_keys() -> &'static [Vec<u8>] {
    static KEYS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut keys = Vec::new();
        let mut n = 0u32;
        while keys.len() < 256 {
            let key = format!("t{n}").into_bytes();
            if layer_for_key(&key) >= 2 {
                keys.push(key);
            }
            n += 1;
        }
        keys
    })
}

fn root_of(entries: impl Iterator<Item = (Vec<u8>, Cid)>) -> Cid {
    let mut tree = Tree::empty(NoBlocks);
    for (key, value) in entries {
        tree.insert(&key, value).expect("insert");
    }
    tree.root_cid()
}

fuzz_target!(|data: &[u8]| {
    let mut tree = Tree::empty(NoBlocks);
    let mut model: BTreeMap<Vec<u8>, Cid> = BTreeMap::new();
    let mut input = data;
    let mut counter = 0u32;
    let mut ops = 0;
    while let [tag, selector, rest @ ..] = input {
        input = rest;
        ops += 1;
        if ops > 2000 {
            break;
        }
        let key: Vec<u8> = match (tag >> 2) & 3 {
            0 => format!("k{selector}").into_bytes(),
            1 => tall_keys()[usize::from(*selector)].clone(),
            2 => {
                let len = (usize::from(*selector) % 16 + 1).min(input.len());
                let (key, rest) = input.split_at(len);
                input = rest;
                key.to_vec()
            }
            _ => format!("app.bsky.feed.post/3k{:02x}{}", selector, tag >> 4).into_bytes(),
        };
        match tag & 3 {
            0 | 1 => {
                counter += 1;
                let value = Cid::dag_cbor(&counter.to_be_bytes());
                let result = tree.insert(&key, value);
                if key.is_empty() {
                    assert!(result.is_err(), "empty key inserted");
                    continue;
                }
                let old = result.expect("insert into an in-memory tree");
                assert_eq!(
                    old,
                    model.insert(key, value),
                    "insert returned another old value"
                );
            }
            2 => {
                let old = tree.remove(&key).expect("remove from an in-memory tree");
                assert_eq!(old, model.remove(&key), "remove returned another old value");
            }
            _ => {
                let found = tree.get(&key).expect("get from an in-memory tree");
                assert_eq!(
                    found,
                    model.get(&key).copied(),
                    "get disagrees with the model"
                );
            }
        }
        if tag & 0xf0 == 0xf0 {
            // Encode mid-way sometimes, so later operations start from encoded nodes.
            let _ = tree.root_cid();
        }
    }

    let expected: Vec<(Vec<u8>, Cid)> = model.iter().map(|(k, v)| (k.clone(), *v)).collect();
    assert!(
        tree.entries().expect("entries") == expected,
        "entries differ from the model"
    );
    let (root, blocks) = tree.changed_blocks();
    assert_eq!(
        root,
        root_of(expected.iter().cloned()),
        "root differs from a sorted build"
    );
    assert_eq!(
        root,
        root_of(expected.iter().rev().cloned()),
        "root differs from a reverse build"
    );

    // Every node, not only those changed since the last encoding: re-derive them from a
    // fresh build, which emits all of its nodes.
    let mut fresh = Tree::empty(NoBlocks);
    for (key, value) in &expected {
        fresh.insert(key, *value).expect("insert");
    }
    let (fresh_root, fresh_blocks) = fresh.changed_blocks();
    assert_eq!(fresh_root, root);
    let _ = blocks;
    let mut store = VerifiedBlocks::new();
    for (cid, bytes) in fresh_blocks {
        store
            .insert(cid, bytes)
            .expect("an emitted block hashes to its CID");
    }
    // The keys are not repo paths.
    let rules = MstRules { check_paths: false };
    let mut walker = MstWalker::new(&store, root, rules);
    let mut walked = Vec::new();
    while let Some((key, value)) = walker.next_entry().expect("walk of an encoded tree") {
        walked.push((key.to_vec(), value));
    }
    assert!(walked == expected, "walked entries differ from the model");

    let mut loaded = Tree::load_with(&store, root, rules);
    let mut left = model.clone();
    for (i, (key, value)) in expected.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(
                loaded.remove(key).expect("remove from a loaded tree"),
                Some(*value)
            );
            left.remove(key);
        }
    }
    assert_eq!(
        loaded.root_cid(),
        root_of(left.into_iter()),
        "removing from a lazily loaded tree gives another root"
    );
});
