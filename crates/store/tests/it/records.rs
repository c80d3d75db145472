//! Record range scans: by DID, by DID and collection, after a cursor, backwards, limited.
//!
//! Keys are chosen so that a prefix bug shows: `did:plc:a` is a prefix of `did:plc:ab`,
//! `a.b.c` of `a.b.cd`, `a.b.c.d` and `a.b.c-d.e` (the last two sort before
//! `a.b.c/` in the MST, because `.` and `-` sort before `/`).

use atpdb_repo::syntax::Did;
use atpdb_store::Store;

use crate::common::{TestResult, did, record};

const KEYS: &[(&str, &str, &str)] = &[
    ("did:plc:a", "a.b.c", "1"),
    ("did:plc:a", "a.b.c", "2"),
    ("did:plc:a", "a.b.c", "3"),
    ("did:plc:a", "a.b.cd", "1"),
    ("did:plc:a", "a.b.c.d", "1"),
    ("did:plc:a", "a.b.c-d.e", "9"),
    ("did:plc:ab", "a.b.c", "1"),
    ("did:plc:ab", "a.b.c", "4"),
];

fn filled() -> TestResult<(tempfile::TempDir, Store)> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let mut batch = store.batch();
    for (did_text, collection, rkey) in KEYS {
        batch.put_record(&record(&did(did_text)?, collection, rkey, rkey)?);
    }
    batch.commit()?;
    Ok((dir, store))
}

/// `collection/rkey` of each record returned.
fn paths(
    store: &Store,
    did: &Did,
    collection: Option<&str>,
    after: Option<&str>,
    limit: usize,
    reverse: bool,
) -> TestResult<Vec<String>> {
    Ok(store
        .records(did, collection, after, limit, reverse)?
        .iter()
        .map(|record| record.path())
        .collect())
}

#[test]
fn scans_select_one_did_and_one_collection() -> TestResult {
    let (_dir, store) = filled()?;
    let a = did("did:plc:a")?;
    let ab = did("did:plc:ab")?;
    // One DID: MST order, `.` and `-` sort before `/`.
    assert_eq!(
        paths(&store, &a, None, None, 100, false)?,
        [
            "a.b.c-d.e/9",
            "a.b.c.d/1",
            "a.b.c/1",
            "a.b.c/2",
            "a.b.c/3",
            "a.b.cd/1"
        ]
    );
    assert_eq!(
        paths(&store, &ab, None, None, 100, false)?,
        ["a.b.c/1", "a.b.c/4"]
    );
    assert_eq!(
        paths(&store, &did("did:plc:b")?, None, None, 100, false)?,
        Vec::<String>::new()
    );
    // One collection.
    assert_eq!(
        paths(&store, &a, Some("a.b.c"), None, 100, false)?,
        ["a.b.c/1", "a.b.c/2", "a.b.c/3"]
    );
    assert_eq!(
        paths(&store, &a, Some("a.b.cd"), None, 100, false)?,
        ["a.b.cd/1"]
    );
    assert_eq!(
        paths(&store, &a, Some("a.b"), None, 100, false)?,
        Vec::<String>::new()
    );
    // After a cursor, limited, reversed.
    assert_eq!(
        paths(&store, &a, Some("a.b.c"), Some("1"), 100, false)?,
        ["a.b.c/2", "a.b.c/3"]
    );
    assert_eq!(
        paths(&store, &a, Some("a.b.c"), Some("3"), 100, false)?,
        Vec::<String>::new()
    );
    assert_eq!(
        paths(&store, &a, Some("a.b.c"), None, 2, false)?,
        ["a.b.c/1", "a.b.c/2"]
    );
    assert_eq!(
        paths(&store, &a, Some("a.b.c"), None, 2, true)?,
        ["a.b.c/3", "a.b.c/2"]
    );
    assert_eq!(
        paths(&store, &a, Some("a.b.c"), Some("2"), 100, true)?,
        ["a.b.c/1"]
    );
    assert_eq!(
        paths(&store, &a, Some("a.b.c"), Some("1"), 100, true)?,
        Vec::<String>::new()
    );
    // Without a collection the cursor is a path.
    assert_eq!(
        paths(&store, &a, None, Some("a.b.c/3"), 100, false)?,
        ["a.b.cd/1"]
    );
    assert_eq!(
        paths(&store, &a, None, Some("a.b.c/1"), 2, true)?,
        ["a.b.c.d/1", "a.b.c-d.e/9"]
    );
    assert_eq!(paths(&store, &ab, None, None, 1, true)?, ["a.b.c/4"]);
    assert_eq!(
        paths(&store, &a, None, None, 0, false)?,
        Vec::<String>::new()
    );
    Ok(())
}

#[test]
fn point_reads_do_not_match_prefixes() -> TestResult {
    let (_dir, store) = filled()?;
    let a = did("did:plc:a")?;
    let stored = store.record(&a, "a.b.c", "1")?;
    assert_eq!(stored, Some(record(&a, "a.b.c", "1", "1")?));
    assert_eq!(store.record(&a, "a.b.c", "4")?, None);
    assert_eq!(store.record(&a, "a.b", "c/1")?, None);
    assert_eq!(store.record(&did("did:plc:ab")?, "a.b.c", "2")?, None);
    Ok(())
}

#[test]
fn record_keys_stream_in_mst_order() -> TestResult {
    let (_dir, store) = filled()?;
    let a = did("did:plc:a")?;
    let streamed: Vec<(String, String, atpdb_repo::Cid)> =
        store.record_keys(&a).collect::<Result<_, _>>()?;
    let mut expected: Vec<(String, String, atpdb_repo::Cid)> = KEYS
        .iter()
        .filter(|(did_text, _, _)| *did_text == "did:plc:a")
        .map(|(_, collection, rkey)| {
            let record = record(&a, collection, rkey, rkey)?;
            Ok((collection.to_string(), rkey.to_string(), record.cid()))
        })
        .collect::<TestResult<_>>()?;
    expected.sort_by(|x, y| format!("{}/{}", x.0, x.1).cmp(&format!("{}/{}", y.0, y.1)));
    assert_eq!(streamed, expected);
    Ok(())
}

#[test]
fn record_keys_survive_writes_behind_the_reader() -> TestResult {
    // What a backfill's merge does: while streaming, it rewrites or deletes keys it has
    // already read. Every key must still come out once, in order, across pages.
    let (_dir, store) = filled()?;
    let z = did("did:plc:zzz")?;
    let mut batch = store.batch();
    let count = 10_000;
    for index in 0..count {
        batch.put_record(&record(&z, "a.b.c", &format!("k{index:05}"), "v")?);
    }
    batch.commit()?;
    let mut seen = Vec::new();
    for item in store.record_keys(&z) {
        let (collection, rkey, _) = item?;
        let mut batch = store.batch();
        if seen.len() % 2 == 0 {
            batch.delete_record(&z, &collection, &rkey);
        } else {
            batch.put_record(&record(&z, &collection, &rkey, "rewritten")?);
        }
        batch.commit()?;
        seen.push(rkey);
    }
    let expected: Vec<String> = (0..count).map(|index| format!("k{index:05}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(store.record_count_of(&z)?, count as u64 / 2);
    Ok(())
}

#[test]
fn collections_are_listed_once_each_in_key_order_by_seeking() -> TestResult {
    let (_dir, store) = filled()?;
    // `a.b.c-d.e` and `a.b.c.d` sort before `a.b.c`, and `a.b.cd` after it: a seek past
    // `a.b.c/` must land on `a.b.cd`, not skip it.
    assert_eq!(
        store.collections(&did("did:plc:a")?, 10)?,
        ["a.b.c-d.e", "a.b.c.d", "a.b.c", "a.b.cd"]
    );
    assert_eq!(
        store.collections(&did("did:plc:a")?, 2)?,
        ["a.b.c-d.e", "a.b.c.d"]
    );
    assert_eq!(store.collections(&did("did:plc:ab")?, 10)?, ["a.b.c"]);
    assert!(store.collections(&did("did:plc:none")?, 10)?.is_empty());
    Ok(())
}
