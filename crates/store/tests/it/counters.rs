//! Counters stay exact under every kind of write, inside one batch and across reopen.

use atpdb_store::{RepoEntry, RepoState, Store};

use crate::common::{TestResult, check_counters, did, record};

#[test]
fn record_counts_follow_the_final_state_of_each_key() -> TestResult {
    let dir = tempfile::tempdir()?;
    let alice = did("did:plc:alice")?;
    let bob = did("did:plc:bob")?;
    let dids = [alice.clone(), bob.clone()];
    let store = Store::open(dir.path())?;

    let mut batch = store.batch();
    for rkey in ["a", "b", "c"] {
        batch.put_record(&record(&alice, "app.bsky.feed.post", rkey, "v1")?);
    }
    batch.put_record(&record(&bob, "app.bsky.feed.post", "a", "v1")?);
    batch.commit()?;
    assert_eq!(
        (store.record_count(), store.record_count_of(&alice)?),
        (4, 3)
    );

    // Updates and deletes of absent keys change nothing; a put of an existing key is no +1.
    let mut batch = store.batch();
    batch.put_record(&record(&alice, "app.bsky.feed.post", "a", "v2")?);
    batch.put_record(&record(&alice, "app.bsky.feed.post", "a", "v3")?);
    batch.delete_record(&alice, "app.bsky.feed.post", "zzz");
    batch.commit()?;
    assert_eq!(
        (store.record_count(), store.record_count_of(&alice)?),
        (4, 3)
    );
    let stored = store.record(&alice, "app.bsky.feed.post", "a")?;
    assert_eq!(
        stored,
        Some(record(&alice, "app.bsky.feed.post", "a", "v3")?)
    );

    // Put then delete of a new key: nothing. Delete then put of a stored key: still there.
    let mut batch = store.batch();
    batch.put_record(&record(&alice, "app.bsky.feed.post", "new", "v1")?);
    batch.delete_record(&alice, "app.bsky.feed.post", "new");
    batch.delete_record(&alice, "app.bsky.feed.post", "b");
    batch.put_record(&record(&alice, "app.bsky.feed.post", "b", "v2")?);
    batch.delete_record(&alice, "app.bsky.feed.post", "c");
    batch.commit()?;
    assert_eq!(store.record(&alice, "app.bsky.feed.post", "new")?, None);
    assert_eq!(store.record(&alice, "app.bsky.feed.post", "c")?, None);
    assert_eq!(
        (store.record_count(), store.record_count_of(&alice)?),
        (3, 2)
    );
    check_counters(&store, &dids)?;

    // delete_records_of removes the stored records and those put before it in the batch,
    // not those put after it, and leaves other DIDs alone.
    let mut batch = store.batch();
    batch.put_record(&record(&alice, "app.bsky.feed.like", "x", "v1")?);
    batch.delete_records_of(&alice);
    batch.put_record(&record(&alice, "app.bsky.feed.post", "a", "v4")?);
    batch.put_record(&record(&alice, "app.bsky.feed.post", "d", "v1")?);
    batch.commit()?;
    let paths: Vec<String> = store
        .records(&alice, None, None, 100, false)?
        .iter()
        .map(|record| record.path())
        .collect();
    assert_eq!(paths, ["app.bsky.feed.post/a", "app.bsky.feed.post/d"]);
    assert_eq!(
        (store.record_count(), store.record_count_of(&alice)?),
        (3, 2)
    );
    assert_eq!(store.record_count_of(&bob)?, 1);
    check_counters(&store, &dids)?;

    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(
        (store.record_count(), store.record_count_of(&alice)?),
        (3, 2)
    );
    check_counters(&store, &dids)?;
    Ok(())
}

#[test]
fn delete_repo_takes_records_counts_buffer_and_index() -> TestResult {
    let dir = tempfile::tempdir()?;
    let alice = did("did:plc:alice")?;
    let alicia = did("did:plc:alicia")?;
    let dids = [alice.clone(), alicia.clone()];
    let store = Store::open(dir.path())?;

    let mut batch = store.batch();
    for did in &dids {
        let mut entry = RepoEntry::new(did.clone(), 1);
        entry.state = RepoState::Syncing;
        batch.put_repo(&entry);
        batch.put_record(&record(did, "app.bsky.feed.post", "a", "v1")?);
        batch.put_record(&record(did, "app.bsky.feed.post", "b", "v1")?);
        batch.buffer_push(did, b"frame".to_vec());
    }
    batch.commit()?;
    assert_eq!(store.count_in_state(RepoState::Syncing)?, 2);
    assert_eq!(store.buffer_len(), 2);
    check_counters(&store, &dids)?;

    let mut batch = store.batch();
    batch.delete_repo(&alice);
    batch.commit()?;
    assert_eq!(store.repo(&alice)?, None);
    assert_eq!(store.record_count_of(&alice)?, 0);
    assert_eq!(store.records(&alice, None, None, 100, false)?.len(), 0);
    assert_eq!(store.buffered(&alice)?.len(), 0);
    assert_eq!(store.record_count(), 2);
    assert_eq!(store.repo_count()?, 1);
    assert_eq!(store.count_in_state(RepoState::Syncing)?, 1);
    let syncing = store.repos_in_state(RepoState::Syncing, 10)?;
    assert_eq!(syncing.len(), 1);
    assert_eq!(syncing[0].did, alicia);
    check_counters(&store, &dids)?;

    // Deleting an absent repo changes nothing; re-adding counts once.
    let mut batch = store.batch();
    batch.delete_repo(&alice);
    batch.commit()?;
    let mut batch = store.batch();
    batch.put_repo(&RepoEntry::new(alice.clone(), 2));
    batch.put_repo(&RepoEntry::new(alice.clone(), 3));
    batch.commit()?;
    assert_eq!(store.repo_count()?, 2);
    assert_eq!(store.count_in_state(RepoState::Pending)?, 1);
    check_counters(&store, &dids)?;
    Ok(())
}

#[test]
fn state_index_moves_with_the_entry() -> TestResult {
    let dir = tempfile::tempdir()?;
    let dids: Vec<_> = (0..10)
        .map(|n| did(&format!("did:plc:repo{n}")))
        .collect::<TestResult<_>>()?;
    {
        let store = Store::open(dir.path())?;
        let mut batch = store.batch();
        for did in &dids {
            batch.put_repo(&RepoEntry::new(did.clone(), 0));
        }
        batch.commit()?;
        for (n, did) in dids.iter().enumerate() {
            let mut batch = store.batch();
            let mut entry = RepoEntry::new(did.clone(), 0);
            entry.state = RepoState::ALL[n % 5];
            entry.rev = Some(format!("rev{n}"));
            batch.put_repo(&entry);
            batch.commit()?;
        }
        check_counters(&store, &dids)?;
    }
    let store = Store::open(dir.path())?;
    for (n, state) in RepoState::ALL.into_iter().enumerate() {
        assert_eq!(store.count_in_state(state)?, 2, "{state}");
        let entries = store.repos_in_state(state, 10)?;
        let names: Vec<&str> = entries.iter().map(|entry| entry.did.as_str()).collect();
        let first = format!("did:plc:repo{n}");
        let second = format!("did:plc:repo{}", n + 5);
        assert_eq!(names, [first.as_str(), second.as_str()]);
        let page = store.repos_in_state_after(state, Some(&entries[0].did), 10)?;
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].did, entries[1].did);
        assert_eq!(store.repos_in_state(state, 1)?.len(), 1);
    }
    // Paging the repo list.
    let first = store.repos(None, 4)?;
    let rest = store.repos(Some(&first[3].did), 100)?;
    assert_eq!(first.len() + rest.len(), 10);
    assert_eq!(rest[0].did.as_str(), "did:plc:repo4");
    check_counters(&store, &dids)?;
    Ok(())
}

#[test]
fn buffer_keys_count_and_order() -> TestResult {
    let dir = tempfile::tempdir()?;
    let alice = did("did:plc:alice")?;
    let al = did("did:plc:al")?;
    let store = Store::open(dir.path())?;
    let mut batch = store.batch();
    batch.buffer_push(&alice, b"1".to_vec());
    batch.buffer_push(&al, b"x".to_vec());
    batch.buffer_push(&alice, b"2".to_vec());
    batch.buffer_push(&alice, b"3".to_vec());
    let keys = batch.commit_ids()?.buffered;
    assert_eq!(keys, [1, 2, 3, 4]);
    assert_eq!(
        store.buffered(&alice)?,
        [(1, b"1".to_vec()), (3, b"2".to_vec()), (4, b"3".to_vec())]
    );
    assert_eq!(store.buffered(&al)?, [(2, b"x".to_vec())]);

    let mut batch = store.batch();
    batch.buffer_remove(&alice, 3);
    batch.buffer_remove(&alice, 3);
    batch.buffer_remove(&alice, 2); // al's key, not alice's: nothing
    batch.commit()?;
    assert_eq!(store.buffer_len(), 3);
    assert_eq!(store.buffered(&al)?.len(), 1);

    let mut batch = store.batch();
    batch.buffer_clear(&alice);
    batch.buffer_push(&alice, b"after".to_vec());
    batch.commit()?;
    assert_eq!(store.buffered(&alice)?, [(5, b"after".to_vec())]);
    assert_eq!(store.buffer_len(), 2);
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(store.buffer_len(), 2);
    let mut batch = store.batch();
    batch.buffer_push(&al, b"y".to_vec());
    assert_eq!(batch.commit_ids()?.buffered, [6]);
    check_counters(&store, &[alice, al])?;
    Ok(())
}

#[test]
fn known_existence_counts_without_reading_and_deletes_always() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let a = did("did:plc:a")?;
    // A first backfill: the caller knows nothing is stored.
    let mut batch = store.batch();
    for rkey in ["1", "2", "3"] {
        batch.put_record_known(&record(&a, "a.b.c", rkey, rkey)?, false);
    }
    batch.commit()?;
    assert_eq!(store.record_count_of(&a)?, 3);
    // An update and a delete it knows exist.
    let mut batch = store.batch();
    batch.put_record_known(&record(&a, "a.b.c", "1", "changed")?, true);
    batch.delete_record_known(&a, "a.b.c", "2");
    batch.commit()?;
    assert_eq!(store.record_count_of(&a)?, 2);
    assert_eq!(
        store.record(&a, "a.b.c", "2")?,
        None,
        "a known delete removes"
    );
    assert_eq!(
        store.record(&a, "a.b.c", "1")?,
        Some(record(&a, "a.b.c", "1", "changed")?)
    );
    // Within one batch, an earlier write knows better than a later claim.
    let mut batch = store.batch();
    batch.put_record(&record(&a, "a.b.c", "9", "9")?);
    batch.put_record_known(&record(&a, "a.b.c", "9", "again")?, true);
    batch.commit()?;
    assert_eq!(store.record_count_of(&a)?, 3);
    // Claimed and unclaimed keys in one batch: the claimed go into the write before the
    // commit lock, the others are read under it; the count is exact either way.
    let mut batch = store.batch();
    batch.put_record(&record(&a, "a.b.c", "1", "again")?);
    batch.put_record_known(&record(&a, "a.b.c", "10", "10")?, false);
    batch.delete_record(&a, "a.b.c", "3");
    batch.delete_record(&a, "a.b.c", "never");
    batch.commit()?;
    assert_eq!(store.record_count_of(&a)?, 3);
    assert_eq!(store.record(&a, "a.b.c", "3")?, None);
    check_counters(&store, &[a])?;
    Ok(())
}

/// A store written when each counter had its own `meta` key opens with those counts, and
/// its next commit carries on from them (ids keep growing, counts stay exact).
#[test]
fn counters_of_a_store_with_one_key_per_counter_are_read_back() -> TestResult {
    let dir = tempfile::tempdir()?;
    let alice = did("did:plc:alice")?;
    let store = Store::open(dir.path())?;
    let mut batch = store.batch();
    batch.put_repo(&RepoEntry::new(alice.clone(), 1));
    for rkey in ["a", "b"] {
        let record = record(&alice, "app.bsky.feed.post", rkey, "v1")?;
        batch.push(crate::common::create_event(&record, "3l"));
        batch.put_record(&record);
    }
    batch.buffer_push(&alice, b"frame".to_vec());
    batch.commit()?;
    let counts = (
        store.record_count(),
        store.repo_count()?,
        store.outbox_len(),
        store.buffer_len(),
    );
    drop(store);

    // Rewrite the counters as the earlier layout kept them.
    {
        let db = fjall::Database::builder(dir.path().join("fjall")).open()?;
        let meta = db.keyspace("meta", fjall::KeyspaceCreateOptions::default)?;
        let value = meta.get("counters")?.ok_or("no counters key")?;
        let names: [&str; 12] = [
            "records",
            "repos",
            "last_event_id",
            "outbox_len",
            "buffer_len",
            "buffer_seq",
            "last_run_id",
            "state/0",
            "state/1",
            "state/2",
            "state/3",
            "state/4",
        ];
        assert_eq!(value.len(), names.len() * 8);
        for (name, bytes) in names.iter().zip(value.chunks_exact(8)) {
            meta.insert(*name, bytes)?;
        }
        meta.remove("counters")?;
        db.persist(fjall::PersistMode::SyncAll)?;
    }

    let store = Store::open(dir.path())?;
    assert_eq!(
        (
            store.record_count(),
            store.repo_count()?,
            store.outbox_len(),
            store.buffer_len()
        ),
        counts
    );
    assert_eq!(store.count_in_state(RepoState::Pending)?, 1);
    let mut batch = store.batch();
    let third = record(&alice, "app.bsky.feed.post", "c", "v1")?;
    batch.put_record(&third);
    batch.push(crate::common::create_event(&third, "3m"));
    let ids = batch.commit_ids()?;
    assert_eq!(
        ids.events,
        vec![3],
        "ids go on from the legacy last_event_id"
    );
    check_counters(&store, &[alice])?;
    Ok(())
}
