//! Arbitrary bytes as a small block store, walked as MSTs.
//!
//! The input is split like a CAR (`atpdb_fuzz::split_car`), every CID recomputed and every
//! link rewritten (`atpdb_fuzz::fixup`; a link whose digest is 31 zero bytes and then `i`
//! points at block `i`), and the blocks put in a `VerifiedBlocks`. Roots: every block that
//! decodes as an MST node (up to 8) and the `data` of every block that decodes as a commit.
//!
//! Checks: `decode_node` accepts only valid DRISL, and only the canonical encoding: a node it
//! accepts whose prefix compression is maximal re-encodes (`encode_node`) to its own bytes; a
//! commit re-encodes to its own bytes. For every root, under `check_paths` false and true, the
//! walker, `Tree::load_with(..).entries()` and `diff_with(None, root)` all accept or all reject,
//! with the same entries; `check_paths` accepts a subset of what the plain rules accept. For a
//! tree they accept, the lazily loaded `Tree` keeps the root CID, re-encodes every node to the
//! same root, and a tree built from the entries has that root too. For every pair of roots,
//! `diff_with(old, new)` succeeds exactly when both trees are accepted, and then matches the
//! difference of the entry lists.
#![no_main]

use std::collections::BTreeMap;

use atpdb_fuzz::{fixup, split_car};
use atpdb_repo::blocks::VerifiedBlocks;
use atpdb_repo::cbor;
use atpdb_repo::cid::DAG_CBOR;
use atpdb_repo::commit::Commit;
use atpdb_repo::mst::{
    self, MstRules, MstWalker, NoBlocks, NodeView, Tree, common_prefix_len, decode_node,
    encode_node,
};
use atpdb_repo::value::Value;
use atpdb_repo::{Cid, Error};
use libfuzzer_sys::fuzz_target;

type Entries = Vec<(Vec<u8>, Cid)>;

/// Full keys of a node, if its prefix lengths fit.
fn full_keys(view: &NodeView<'_>) -> Option<Vec<Vec<u8>>> {
    let mut keys: Vec<Vec<u8>> = Vec::with_capacity(view.entries.len());
    for entry in &view.entries {
        let previous = keys.last().map(Vec::as_slice).unwrap_or_default();
        let mut key = previous.get(..entry.prefix_len)?.to_vec();
        key.extend_from_slice(entry.suffix);
        keys.push(key);
    }
    Some(keys)
}

/// The canonical encoding of a decoded node, if its keys can be rebuilt.
fn reencode(bytes: &[u8]) -> Option<Vec<u8>> {
    let view = decode_node(bytes).ok()?;
    let keys = full_keys(&view)?;
    Some(encode_node(
        view.left.as_ref(),
        keys.iter()
            .zip(&view.entries)
            .map(|(key, entry)| (key.as_slice(), &entry.value, entry.right.as_ref())),
    ))
}

/// Whether every entry's prefix length is the longest the previous key allows (the first 0).
fn maximal_prefixes(view: &NodeView<'_>) -> bool {
    let Some(keys) = full_keys(view) else {
        return false;
    };
    let mut previous: &[u8] = &[];
    for (key, entry) in keys.iter().zip(&view.entries) {
        if entry.prefix_len != common_prefix_len(previous, key) {
            return false;
        }
        previous = key;
    }
    true
}

fn walk(store: &VerifiedBlocks, root: Cid, rules: MstRules) -> Result<Entries, Error> {
    let mut walker = MstWalker::new(store, root, rules);
    let mut out = Vec::new();
    while let Some((key, value)) = walker.next_entry()? {
        out.push((key.to_vec(), value));
    }
    let stats = walker.stats();
    assert_eq!(stats.entries, out.len() as u64);
    Ok(out)
}

/// The walker, the lazy tree and the diff must agree on `root` under `rules`.
fn one_validator(store: &VerifiedBlocks, root: Cid, rules: MstRules) -> Result<Entries, String> {
    let walked = walk(store, root, rules);
    let listed = Tree::load_with(store, root, rules).entries();
    let diffed = mst::diff_with(store, None, root, rules);
    match (&walked, &listed, &diffed) {
        (Ok(walked), Ok(listed), Ok(diffed)) => {
            assert!(
                walked == listed,
                "Tree lists different entries than the walker"
            );
            assert_eq!(
                diffed.entries.len(),
                walked.len(),
                "diff from nothing lists other keys"
            );
            for (entry, (key, value)) in diffed.entries.iter().zip(walked) {
                assert!(
                    entry.key == *key && entry.new == Some(*value) && entry.old.is_none(),
                    "diff from nothing differs from the walk"
                );
            }
        }
        (Err(_), Err(_), Err(_)) => {}
        _ => panic!(
            "walker, Tree and diff disagree ({:?}): walk {:?}, Tree {:?}, diff {:?}",
            rules,
            walked.as_ref().err(),
            listed.as_ref().err(),
            diffed.as_ref().err()
        ),
    }
    walked.map_err(|err| err.to_string())
}

fn check_accepted(store: &VerifiedBlocks, root: Cid, rules: MstRules, entries: &Entries) {
    let mut tree = Tree::load_with(store, root, rules);
    let listed = tree
        .entries()
        .expect("Tree loads a tree the walker accepted");
    assert!(
        &listed == entries,
        "Tree lists different entries than the walker"
    );
    assert_eq!(tree.root_cid(), root, "an unchanged Tree changed its root");
    for cid in tree.loaded() {
        let bytes = store.get(cid).expect("a loaded node is in the store");
        assert_eq!(
            reencode(bytes).as_deref(),
            Some(bytes),
            "an accepted node is not in canonical form"
        );
        assert!(
            *cid == root || cid.codec() == DAG_CBOR,
            "an accepted tree links a subtree with codec {:#x}",
            cid.codec()
        );
    }

    // Touch every node on the way to every key: all are encoded again.
    for (key, value) in entries {
        let old = tree
            .insert(key, *value)
            .expect("re-insert into an accepted tree");
        assert_eq!(old, Some(*value));
    }
    let mut built = Tree::empty(NoBlocks);
    for (key, value) in entries {
        assert_eq!(built.insert(key, *value).expect("insert"), None);
    }
    // The root itself may be any codec the caller names (the walk takes the CID it is
    // given); its bytes must still be the canonical node.
    let canonical_root = Cid::from_parts(DAG_CBOR, *root.digest());
    assert_eq!(
        tree.root_cid(),
        canonical_root,
        "re-encoding an accepted tree changed its root"
    );
    assert_eq!(
        built.root_cid(),
        canonical_root,
        "the tree built from the entries has another root"
    );
}

fn check_diff(
    store: &VerifiedBlocks,
    rules: MstRules,
    old: (Cid, Option<&Entries>),
    new: (Cid, Option<&Entries>),
) {
    let changes = mst::diff_with(store, Some(old.0), new.0, rules);
    let (Some(old_entries), Some(new_entries)) = (old.1, new.1) else {
        if let Ok(changes) = changes {
            panic!(
                "diff accepts a tree the walker rejects (old accepted: {}, new accepted: {}): {} changes",
                old.1.is_some(),
                new.1.is_some(),
                changes.entries.len()
            );
        }
        return;
    };
    let changes = match changes {
        Ok(changes) => changes,
        Err(err) => panic!("diff of two accepted trees fails: {err}"),
    };
    let before: BTreeMap<&[u8], Cid> = old_entries
        .iter()
        .map(|(k, v)| (k.as_slice(), *v))
        .collect();
    let after: BTreeMap<&[u8], Cid> = new_entries
        .iter()
        .map(|(k, v)| (k.as_slice(), *v))
        .collect();
    let mut expected = Vec::new();
    let keys: std::collections::BTreeSet<&[u8]> =
        before.keys().chain(after.keys()).copied().collect();
    for key in keys {
        let (a, b) = (before.get(key).copied(), after.get(key).copied());
        if a != b {
            expected.push((key.to_vec(), a, b));
        }
    }
    let found: Vec<_> = changes
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.old, e.new))
        .collect();
    assert!(
        found == expected,
        "diff differs from the entry lists' difference"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(view) = decode_node(data) {
        assert!(
            cbor::validate(data).is_ok(),
            "decode_node accepts invalid DRISL"
        );
        assert!(
            Value::from_cbor(data).is_ok(),
            "decode_node accepts what from_cbor rejects"
        );
        if let Some(bytes) = reencode(data) {
            let again = decode_node(&bytes).expect("encode_node output decodes");
            assert_eq!(again.left, view.left);
            assert_eq!(full_keys(&again), full_keys(&view));
            if maximal_prefixes(&view) {
                assert!(
                    bytes == data,
                    "decode_node accepts a non-canonical encoding: {data:02x?}"
                );
            }
        }
    }

    let mut car = split_car(data, 256);
    fixup(&mut car);
    let mut store = VerifiedBlocks::new();
    let mut roots = Vec::new();
    for block in &car.blocks {
        if roots.len() < 8 && decode_node(&block.data).is_ok() {
            roots.push(block.cid);
        }
        if let Ok(commit) = Commit::from_cbor(block.cid, &block.data) {
            assert!(
                commit.to_cbor() == block.data,
                "commit does not re-encode to its bytes"
            );
            // A commit's CID is its dag-cbor CID; the block may have been linked as another.
            assert_eq!(commit.cid().digest(), block.cid.digest());
            assert_eq!(
                commit.data.codec(),
                DAG_CBOR,
                "a commit's data is not dag-cbor"
            );
            roots.push(commit.data);
        }
        store
            .insert(block.cid, block.data.clone())
            .expect("fixup left a block that does not hash to its CID");
    }
    roots.dedup();
    roots.truncate(10);

    for check_paths in [false, true] {
        let rules = MstRules { check_paths };
        let mut accepted: Vec<(Cid, Option<Entries>)> = Vec::new();
        for &root in &roots {
            let result = one_validator(&store, root, rules);
            if let Ok(entries) = &result {
                check_accepted(&store, root, rules, entries);
            }
            accepted.push((root, result.ok()));
        }
        if check_paths {
            // Whatever the repo rules accept, the plain rules accept, with the same entries.
            for (root, entries) in &accepted {
                if let Some(entries) = entries {
                    let plain = walk(&store, *root, MstRules { check_paths: false })
                        .expect("check_paths accepted what the plain walk rejects");
                    assert!(&plain == entries, "check_paths changed the entries");
                }
            }
        }
        for (i, (old, old_entries)) in accepted.iter().enumerate() {
            for (new, new_entries) in accepted.iter().skip(i + 1).take(3) {
                check_diff(
                    &store,
                    rules,
                    (*old, old_entries.as_ref()),
                    (*new, new_entries.as_ref()),
                );
                check_diff(
                    &store,
                    rules,
                    (*new, new_entries.as_ref()),
                    (*old, old_entries.as_ref()),
                );
            }
        }
    }
});
