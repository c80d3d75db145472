//! Arbitrary bytes as a small block store, walked as MSTs.
//!
//! The input is split like a CAR (`atpdb_fuzz::split_car`), every CID recomputed and every
//! link rewritten (`atpdb_fuzz::fixup`; a link whose digest is 31 zero bytes and then `i`
//! points at block `i`). Roots: every block that decodes as an MST node (up to 8) and the
//! `data` of every block that decodes as a commit.
//!
//! Checks: `decode_node` accepts only valid DRISL; a commit re-encodes to its own bytes; the
//! walk with `check_paths` accepts a subset of what the walk without it accepts, with the same
//! entries; for a tree the walker accepts, the lazily loaded `Tree` lists the same entries,
//! keeps the same root CID, re-encodes every node to the same root (unless a node on the way
//! uses the decoder's documented leniency of leaving out `l` or `t`), a tree built from the
//! entries in order has that root too, and `diff` against nothing or against the previous
//! accepted tree matches the difference of the entry lists.
#![no_main]

use std::collections::BTreeMap;

use atpdb_fuzz::{fixup, split_car};
use atpdb_repo::Cid;
use atpdb_repo::cbor;
use atpdb_repo::cid::{CidMap, DAG_CBOR};
use atpdb_repo::commit::Commit;
use atpdb_repo::mst::{
    self, MstWalker, NoBlocks, NodeView, Tree, WalkOptions, decode_node, encode_node,
};
use atpdb_repo::value::Value;
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

fn walk(store: &CidMap<Vec<u8>>, root: Cid, check_paths: bool) -> Result<Entries, String> {
    let mut walker = MstWalker::new(store, root, WalkOptions { check_paths });
    let mut out = Vec::new();
    while let Some((key, value)) = walker.next_entry().map_err(|e| e.to_string())? {
        out.push((key.to_vec(), value));
    }
    let stats = walker.stats();
    assert_eq!(stats.entries, out.len() as u64);
    Ok(out)
}

fn check_accepted(store: &CidMap<Vec<u8>>, root: Cid, entries: &Entries) {
    let mut tree = Tree::load(store, root);
    let listed = tree
        .entries()
        .expect("Tree loads a tree the walker accepted");
    assert!(
        &listed == entries,
        "Tree lists different entries than the walker"
    );
    assert_eq!(tree.root_cid(), root, "an unchanged Tree changed its root");
    // Trees the walker accepts but that do not re-encode to the same bytes: a node without
    // `l` or `t` (documented leniency), or a subtree linked with a codec other than dag-cbor
    // (accepted; reported). The root's own codec is compared away below.
    let lenient = tree.loaded().iter().any(|cid| {
        let bytes = &store[cid];
        let links_elsewhere = decode_node(bytes).is_ok_and(|view| {
            view.left
                .iter()
                .chain(view.entries.iter().filter_map(|e| e.right.as_ref()))
                .any(|link| link.codec() != DAG_CBOR)
        });
        links_elsewhere || reencode(bytes).as_deref() != Some(bytes.as_slice())
    });

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
    if !lenient {
        assert_eq!(
            tree.root_cid().digest(),
            root.digest(),
            "re-encoding an accepted tree changed its root"
        );
        assert_eq!(
            built.root_cid().digest(),
            root.digest(),
            "the tree built from the entries has another root"
        );
    }

    let all = mst::diff(store, None, root).expect("diff of an accepted tree");
    assert_eq!(all.entries.len(), entries.len());
    for (entry, (key, value)) in all.entries.iter().zip(entries) {
        assert!(entry.key == *key && entry.new == Some(*value) && entry.old.is_none());
    }
}

fn check_diff(store: &CidMap<Vec<u8>>, old: (Cid, &Entries), new: (Cid, &Entries)) {
    let changes = mst::diff(store, Some(old.0), new.0).expect("diff of accepted trees");
    let before: BTreeMap<&[u8], Cid> = old.1.iter().map(|(k, v)| (k.as_slice(), *v)).collect();
    let after: BTreeMap<&[u8], Cid> = new.1.iter().map(|(k, v)| (k.as_slice(), *v)).collect();
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
        }
    }

    let mut car = split_car(data, 256);
    fixup(&mut car);
    let mut store: CidMap<Vec<u8>> = CidMap::default();
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
            // The codec is kept as linked (any codec is accepted), so compare digests.
            assert_eq!(commit.cid().digest(), block.cid.digest());
            roots.push(commit.data);
        }
        store.insert(block.cid, block.data.clone());
    }
    roots.dedup();

    let mut previous: Option<(Cid, Entries)> = None;
    for root in roots {
        let lax = walk(&store, root, false);
        let strict = walk(&store, root, true);
        match (&lax, &strict) {
            (Ok(a), Ok(b)) => assert!(a == b, "check_paths changed the entries"),
            (Err(_), Ok(_)) => panic!("check_paths accepted what the plain walk rejects"),
            _ => {}
        }
        let Ok(entries) = lax else { continue };
        check_accepted(&store, root, &entries);
        if let Some((old_root, old_entries)) = &previous {
            check_diff(&store, (*old_root, old_entries), (root, &entries));
            check_diff(&store, (root, &entries), (*old_root, old_entries));
        }
        previous = Some((root, entries));
    }
});
