//! MST conformance: key layers, prefixes, canonical roots and Sync 1.1 commit proofs.

use std::fs;

use atpdb_repo::Cid;
use atpdb_repo::blocks::VerifiedBlocks;
use atpdb_repo::mst::{
    MstRules, MstWalker, NoBlocks, Tree, common_prefix_len, diff, diff_with, layer_for_key,
};
use serde_json::Value as Json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn read_json(relative: &str) -> Option<Json> {
    let path = atpdb_testkit::interop(relative, relative)?;
    let text = fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    Some(serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display())))
}

/// The cases of a fixture file: it must be a non-empty array, or the test would pass on zero.
fn cases<'a>(json: &'a Json, name: &str) -> &'a [Json] {
    let cases = json
        .as_array()
        .unwrap_or_else(|| panic!("{name}: fixture is not an array"));
    assert!(!cases.is_empty(), "{name}: fixture has no cases");
    cases
}

/// Blocks from `(cid, bytes)` pairs, each hash checked.
fn store(
    blocks: impl IntoIterator<Item = (Cid, Vec<u8>)>,
) -> Result<VerifiedBlocks, atpdb_repo::Error> {
    let mut store = VerifiedBlocks::new();
    for (cid, bytes) in blocks {
        store.insert(cid, bytes)?;
    }
    Ok(store)
}

/// A node of one entry, written field by field so a test can link what no encoder would.
fn one_entry_node(key: &str, left: Option<&Cid>, right: Option<&Cid>, value: &Cid) -> Vec<u8> {
    let mut e = atpdb_repo::cbor::Encoder::new();
    e.map(2);
    e.text("e");
    e.array(1);
    e.map(4);
    e.text("k");
    e.bytes(key.as_bytes());
    e.text("p");
    e.u64(0);
    e.text("t");
    e.nullable_link(right);
    e.text("v");
    e.link(value);
    e.text("l");
    e.nullable_link(left);
    e.into_bytes()
}

/// The rules for the conformance fixtures, whose keys are not repo paths.
const FIXTURE_KEYS: MstRules = MstRules { check_paths: false };

fn string<'a>(json: &'a Json, field: &str) -> &'a str {
    json[field]
        .as_str()
        .unwrap_or_else(|| panic!("fixture field {field} is not a string: {json}"))
}

fn strings<'a>(json: &'a Json, field: &str) -> Vec<&'a str> {
    json[field]
        .as_array()
        .unwrap_or_else(|| panic!("fixture field {field} is not an array: {json}"))
        .iter()
        .map(|item| {
            item.as_str()
                .unwrap_or_else(|| panic!("{field} item is not a string"))
        })
        .collect()
}

#[test]
fn key_heights() {
    let Some(cases) = read_json("mst/key_heights.json") else {
        return;
    };
    for case in self::cases(&cases, "key_heights") {
        let key = string(case, "key");
        let height = case["height"]
            .as_u64()
            .unwrap_or_else(|| panic!("bad case {case}"));
        assert_eq!(
            u64::from(layer_for_key(key.as_bytes())),
            height,
            "layer of {key:?}"
        );
    }
}

#[test]
fn common_prefixes() {
    let Some(cases) = read_json("mst/common_prefix.json") else {
        return;
    };
    for case in self::cases(&cases, "common_prefix") {
        let (left, right) = (string(case, "left"), string(case, "right"));
        let len = case["len"]
            .as_u64()
            .unwrap_or_else(|| panic!("bad case {case}"));
        assert_eq!(
            common_prefix_len(left.as_bytes(), right.as_bytes()) as u64,
            len,
            "prefix of {left:?} and {right:?}"
        );
    }
}

fn build(keys: &[&str], value: Cid) -> Result<Tree<NoBlocks>, atpdb_repo::Error> {
    let mut tree = Tree::empty(NoBlocks);
    for key in keys {
        tree.insert(key.as_bytes(), value)?;
    }
    Ok(tree)
}

#[test]
fn example_keys_any_insert_order_same_root() -> TestResult {
    let Some(path) = atpdb_testkit::interop("example_keys", "mst/example_keys.txt") else {
        return Ok(());
    };
    let keys = atpdb_testkit::fixture_lines(&path);
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let value = Cid::dag_cbor(b"leaf");
    let mut forward = build(&keys, value)?;
    let reversed: Vec<&str> = keys.iter().rev().copied().collect();
    let mut backward = build(&reversed, value)?;
    let (root, blocks) = forward.changed_blocks();
    assert_eq!(root, backward.root_cid());

    // The walker reads the tree back from its blocks in sorted order and accepts its shape.
    let store = store(blocks)?;
    let mut walker = MstWalker::new(&store, root, FIXTURE_KEYS);
    let mut walked = Vec::new();
    while let Some((key, cid)) = walker.next_entry()? {
        assert_eq!(cid, value);
        walked.push(String::from_utf8(key.to_vec())?);
    }
    let mut sorted: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    sorted.sort();
    assert_eq!(walked, sorted);

    // Removing every other key and adding it back restores the root.
    let mut lazy = Tree::load_with(&store, root, FIXTURE_KEYS);
    for key in keys.iter().step_by(2) {
        assert_eq!(lazy.remove(key.as_bytes())?, Some(value), "remove {key}");
    }
    let half_root = lazy.root_cid();
    assert_eq!(
        half_root,
        build(
            &keys.iter().skip(1).step_by(2).copied().collect::<Vec<_>>(),
            value
        )?
        .root_cid()
    );
    for key in keys.iter().step_by(2) {
        assert_eq!(lazy.insert(key.as_bytes(), value)?, None, "insert {key}");
    }
    assert_eq!(lazy.root_cid(), root);
    Ok(())
}

#[test]
fn removing_everything_gives_the_empty_tree() -> TestResult {
    let value = Cid::dag_cbor(b"leaf");
    let keys: Vec<String> = (0..300)
        .map(|i| format!("com.example.record/{i:05}"))
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut tree = build(&keys, value)?;
    for key in &keys {
        assert_eq!(tree.remove(key.as_bytes())?, Some(value));
    }
    assert_eq!(tree.remove(b"com.example.record/absent")?, None);
    assert_eq!(tree.root_cid(), Tree::empty(NoBlocks).root_cid());
    Ok(())
}

#[test]
fn commit_proofs() -> TestResult {
    let Some(cases) = read_json("firehose/commit-proof-fixtures.json") else {
        return Ok(());
    };
    for case in self::cases(&cases, "commit-proof-fixtures") {
        let comment = string(case, "comment");
        let leaf: Cid = string(case, "leafValue").parse()?;
        let mut tree = build(&strings(case, "keys"), leaf)?;
        let (before, before_blocks) = tree.changed_blocks();
        assert_eq!(
            before.to_string(),
            string(case, "rootBeforeCommit"),
            "{comment}: root before"
        );

        let adds = strings(case, "adds");
        let dels = strings(case, "dels");
        for key in &adds {
            assert_eq!(
                tree.insert(key.as_bytes(), leaf)?,
                None,
                "{comment}: add {key}"
            );
        }
        for key in &dels {
            assert_eq!(
                tree.remove(key.as_bytes())?,
                Some(leaf),
                "{comment}: delete {key}"
            );
        }
        let (after, changed) = tree.changed_blocks();
        assert_eq!(
            after.to_string(),
            string(case, "rootAfterCommit"),
            "{comment}: root after"
        );

        // The slice is every new node plus the unchanged nodes that inversion reads.
        let all = store(before_blocks.into_iter().chain(changed.iter().cloned()))?;
        let mut probe = Tree::load_with(&all, after, FIXTURE_KEYS);
        for key in &adds {
            probe.remove(key.as_bytes())?;
        }
        for key in &dels {
            probe.insert(key.as_bytes(), leaf)?;
        }
        let mut slice = store(changed)?;
        for cid in probe.loaded() {
            slice.insert(*cid, all.get(cid).ok_or("loaded node missing")?.to_vec())?;
        }
        for expected in strings(case, "blocksInProof") {
            let cid: Cid = expected.parse()?;
            assert!(
                slice.contains(&cid),
                "{comment}: proof block {expected} missing from the slice"
            );
        }

        // Invert using only the diff blocks: the partial tree must lead back to the old root.
        let mut partial = Tree::load_with(&slice, after, FIXTURE_KEYS);
        for key in &adds {
            assert_eq!(
                partial.get(key.as_bytes())?,
                Some(leaf),
                "{comment}: check add {key}"
            );
            assert_eq!(
                partial.remove(key.as_bytes())?,
                Some(leaf),
                "{comment}: invert add {key}"
            );
        }
        for key in &dels {
            assert_eq!(
                partial.get(key.as_bytes())?,
                None,
                "{comment}: check delete {key}"
            );
            assert_eq!(
                partial.insert(key.as_bytes(), leaf)?,
                None,
                "{comment}: invert delete {key}"
            );
        }
        assert_eq!(partial.root_cid(), before, "{comment}: inverted root");

        // A structural diff of the two trees finds exactly the operations.
        let changes = diff_with(&all, Some(before), after, FIXTURE_KEYS)?;
        let mut expected: Vec<&str> = adds.iter().chain(&dels).copied().collect();
        expected.sort();
        let found: Vec<String> = changes
            .entries
            .iter()
            .map(|entry| String::from_utf8_lossy(&entry.key).into_owned())
            .collect();
        assert_eq!(found, expected, "{comment}: diff");
    }
    Ok(())
}

#[test]
fn repository_walks_require_nsid_collections() -> TestResult {
    let value = Cid::dag_cbor(b"leaf");
    for bad in [
        "A0/374913",
        "com.example/3kb",
        "com.example.thing/a b",
        "com.example.thing/..",
    ] {
        let mut tree = build(&["com.example.ok/3kb3fge5lm32x", bad], value)?;
        let (root, blocks) = tree.changed_blocks();
        let store = store(blocks)?;
        let mut walker = MstWalker::new(&store, root, MstRules::default());
        let result = (|| {
            while walker.next_entry()?.is_some() {}
            Ok::<_, atpdb_repo::Error>(())
        })();
        assert!(
            matches!(result, Err(atpdb_repo::Error::MstStructure { .. })),
            "{bad:?} should be refused as a repo path, got {result:?}"
        );
    }
    Ok(())
}

/// Fuzzing findings: subtree links in another codec, and nodes shared between parents.
#[test]
fn malformed_links_are_refused_and_cheap() -> TestResult {
    let record = Cid::dag_cbor(b"r");
    let node = |key: &str, child: Option<&Cid>| one_entry_node(key, child, child, &record);
    // Each node links one child as both `l` and `t`: 2^40 paths if revisited.
    let mut blocks = VerifiedBlocks::new();
    let mut child = None;
    for depth in 0..40 {
        let bytes = node(&format!("k{depth}"), child.as_ref());
        child = Some(blocks.insert_new(atpdb_repo::cid::DAG_CBOR, bytes));
    }
    let root = child.ok_or("no root")?;
    // Refused (a node has one place in a tree), and at once rather than after 2^40 visits.
    let result = diff_with(&blocks, None, root, FIXTURE_KEYS);
    assert!(result.is_err(), "{result:?}");

    // A raw-codec subtree link.
    let leaf = node("com.example.a/b", None);
    let leaf_raw = Cid::from_parts(atpdb_repo::cid::RAW, *Cid::dag_cbor(&leaf).digest());
    let parent = node("com.example.a/a", Some(&leaf_raw));
    let parent_cid = Cid::dag_cbor(&parent);
    let store = store([(parent_cid, parent), (leaf_raw, leaf)])?;
    let mut walker = MstWalker::new(&store, parent_cid, FIXTURE_KEYS);
    let result = (|| {
        while walker.next_entry()?.is_some() {}
        Ok::<_, atpdb_repo::Error>(())
    })();
    assert!(
        matches!(result, Err(atpdb_repo::Error::MstStructure { .. })),
        "{result:?}"
    );
    Ok(())
}

/// Fuzzing finding (issue 11): a diff skipped the subtrees the new tree shares with the old
/// one without checking that they fit where the new tree links them, so it accepted a new
/// tree the walk refuses.
#[test]
fn diff_checks_shared_subtrees_at_their_new_place() -> TestResult {
    assert_eq!(
        (layer_for_key(b"z0"), layer_for_key(b"a2")),
        (0, 1),
        "the keys this case needs"
    );
    let record = Cid::dag_cbor(b"r");
    let node = |key: &str, left: Option<&Cid>| one_entry_node(key, left, None, &record);
    let mut blocks = VerifiedBlocks::new();
    let old = blocks.insert_new(atpdb_repo::cid::DAG_CBOR, node("z0", None));
    // The old root becomes the left subtree of "a2", though its key sorts after "a2".
    let new = blocks.insert_new(atpdb_repo::cid::DAG_CBOR, node("a2", Some(&old)));
    let mut walker = MstWalker::new(&blocks, new, FIXTURE_KEYS);
    let walked = (|| {
        while walker.next_entry()?.is_some() {}
        Ok::<_, atpdb_repo::Error>(())
    })();
    assert!(
        matches!(walked, Err(atpdb_repo::Error::MstOrder { .. })),
        "{walked:?}"
    );
    let diffed = diff_with(&blocks, Some(old), new, FIXTURE_KEYS);
    assert!(
        matches!(diffed, Err(atpdb_repo::Error::MstOrder { .. })),
        "{diffed:?}"
    );
    Ok(())
}

/// Fuzzing finding (issue 11): a diff between a tree and itself, or to one of its own
/// subtrees, reads no shared node again and reports exactly what changed.
#[test]
fn diff_to_itself_and_to_a_subtree() -> TestResult {
    let value = Cid::dag_cbor(b"leaf");
    let keys: Vec<String> = (0..200)
        .map(|i| format!("com.example.record/{i:05}"))
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let (root, blocks) = build(&keys, value)?.changed_blocks();
    let store = store(blocks)?;
    assert!(diff(&store, Some(root), root)?.entries.is_empty());

    let root_node = atpdb_repo::mst::decode_node(store.get(&root).ok_or("no root")?)?;
    let subtree = root_node
        .left
        .or_else(|| root_node.entries.iter().find_map(|entry| entry.right))
        .ok_or("the root has no subtree")?;
    let mut walker = MstWalker::new(&store, subtree, MstRules::default());
    let mut kept = std::collections::BTreeSet::new();
    while let Some((key, _)) = walker.next_entry()? {
        kept.insert(key.to_vec());
    }
    let changes = diff(&store, Some(root), subtree)?;
    let deleted: Vec<Vec<u8>> = keys
        .iter()
        .map(|key| key.as_bytes().to_vec())
        .filter(|key| !kept.contains(key))
        .collect();
    assert!(changes.entries.iter().all(|entry| entry.new.is_none()));
    let found: Vec<Vec<u8>> = changes
        .entries
        .iter()
        .map(|entry| entry.key.clone())
        .collect();
    assert_eq!(found, deleted);
    Ok(())
}
