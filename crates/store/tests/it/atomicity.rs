//! A batch is all or nothing.

use atpdb_store::{Store, StoreError};

use crate::common::{TestResult, check_counters, create_event, did, record};

#[test]
fn a_failed_commit_leaves_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let alice = did("did:plc:alice")?;
    let post = record(&alice, "app.bsky.feed.post", "a", "x")?;

    // The cursor name is checked after the records and the event were collected.
    for bad_name in ["x".repeat(70_000), String::new()] {
        let mut batch = store.batch();
        batch.put_record(&post);
        batch.push(create_event(&post, "r"));
        batch.buffer_push(&alice, b"frame".to_vec());
        batch.set_cursor(&bad_name, "1");
        let result = batch.commit();
        assert!(
            matches!(result, Err(StoreError::InvalidKey { what: "cursor", .. })),
            "{result:?}"
        );
        assert_eq!(store.record(&alice, "app.bsky.feed.post", "a")?, None);
        assert_eq!(store.events_after(0, 10)?.len(), 0);
        assert_eq!(store.last_event_id(), 0);
        assert_eq!(store.buffer_len(), 0);
        check_counters(&store, std::slice::from_ref(&alice))?;
    }

    // The next commit gets the first id: the failed one used none.
    let mut batch = store.batch();
    batch.put_record(&post);
    batch.push(create_event(&post, "r"));
    assert_eq!(batch.commit()?, [1]);
    drop(store);

    let store = Store::open(dir.path())?;
    assert_eq!(store.last_event_id(), 1);
    assert_eq!(store.record_count(), 1);
    check_counters(&store, &[alice])?;
    Ok(())
}

#[test]
fn nothing_is_visible_before_commit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let alice = did("did:plc:alice")?;
    let post = record(&alice, "app.bsky.feed.post", "a", "x")?;
    let mut batch = store.batch();
    assert!(batch.is_empty());
    batch.put_record(&post);
    batch.push(create_event(&post, "r"));
    batch.set_cursor("c", "1");
    assert_eq!(batch.len(), 3);
    assert_eq!(store.record(&alice, "app.bsky.feed.post", "a")?, None);
    assert_eq!(store.cursor("c")?, None);
    drop(batch);
    assert_eq!(store.record_count(), 0);
    assert_eq!(store.last_event_id(), 0);
    Ok(())
}
