//! Every stored type reads back as written, also after reopening.

use atpdb_repo::Cid;
use atpdb_repo::verify::RecordRef;
use atpdb_store::{
    AccountStatus, Action, BackfillRun, Event, IdentityEvent, RecordEvent, RepoEntry, RepoState,
    RepoStateEvent, Store, StoreError,
};

use crate::common::{TestResult, did, record};

fn full_entry() -> TestResult<RepoEntry> {
    Ok(RepoEntry {
        did: did("did:plc:full")?,
        state: RepoState::Desynchronized,
        status: AccountStatus::Other("throttled".to_owned()),
        handle: Some("full.test".to_owned()),
        rev: Some("3kb3fge5lm32x".to_owned()),
        data: Some(Cid::dag_cbor(b"root")),
        pds: Some("https://pds.example".to_owned()),
        error: Some("boom".to_owned()),
        retries: u32::MAX,
        retry_after_us: u64::MAX,
        last_sync_us: 7,
        added_us: 1,
    })
}

fn events() -> TestResult<Vec<Event>> {
    let alice = did("did:plc:alice")?;
    let post = record(&alice, "app.bsky.feed.post", "3kb3fge5lm32x", "hello")?;
    Ok(vec![
        crate::common::create_event(&post, "3kb3fge5lm32x"),
        Event::Record(RecordEvent {
            live: false,
            did: alice.clone(),
            rev: "3kb3fge5lm32y".to_owned(),
            collection: "app.bsky.feed.like".to_owned(),
            rkey: "3kb3fge5lm32z".to_owned(),
            action: Action::Delete,
            cid: None,
            record: None,
            time_us: 0,
        }),
        Event::Record(RecordEvent {
            live: true,
            did: alice.clone(),
            rev: "r".to_owned(),
            collection: "c.d.e".to_owned(),
            rkey: "k".to_owned(),
            action: Action::Update,
            cid: Some(Cid::dag_cbor(b"x")),
            record: Some(vec![0xff, 0x00]),
            time_us: u64::MAX,
        }),
        Event::Identity(IdentityEvent {
            did: alice.clone(),
            handle: "handle.invalid".to_owned(),
            is_active: false,
            status: "takendown".to_owned(),
            time_us: 5,
        }),
        Event::RepoState(RepoStateEvent {
            did: alice.clone(),
            state: RepoState::Error,
            reason: Some("PDS returned 500".to_owned()),
            time_us: 6,
        }),
        Event::RepoState(RepoStateEvent {
            did: alice,
            state: RepoState::Synced,
            reason: None,
            time_us: 7,
        }),
    ])
}

#[test]
fn every_type_survives_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let full = full_entry()?;
    let minimal = RepoEntry::new(did("did:web:example.com")?, 42);
    let events = events()?;
    let alice = did("did:plc:alice")?;
    let post = record(&alice, "app.bsky.feed.post", "3kb3fge5lm32x", "hello")?;
    let run = BackfillRun {
        id: 0,
        kind: "full".to_owned(),
        started_us: 10,
        finished_us: None,
        done: 3,
        total: 9,
        records: 100,
        errors: 1,
        checkpoint: Some("cursor-1".to_owned()),
    };
    let config = serde_json::json!({"mode": "full", "collections": ["a.b.c"], "n": 3});
    {
        let store = Store::open(dir.path())?;
        let mut batch = store.batch();
        batch.put_repo(&full);
        batch.put_repo(&minimal);
        batch.put_record(&post);
        for event in &events {
            batch.push(event.clone());
        }
        batch.set_cursor("firehose", "12345");
        batch.set_cursor("empty", "");
        batch.set_config("scope", &config);
        batch.buffer_push(&alice, b"frame one".to_vec());
        batch.buffer_push(&alice, Vec::new());
        batch.put_run(&run);
        let ids = batch.commit_ids()?;
        assert_eq!(ids.events, [1, 2, 3, 4, 5, 6]);
        assert_eq!(ids.runs, [1]);
        assert_eq!(ids.buffered, [1, 2]);
    }
    let store = Store::open(dir.path())?;
    assert_eq!(store.repo(&full.did)?, Some(full.clone()));
    assert_eq!(store.repo(&minimal.did)?, Some(minimal.clone()));
    assert_eq!(store.repo(&did("did:plc:absent")?)?, None);
    assert_eq!(
        store.record(&alice, "app.bsky.feed.post", "3kb3fge5lm32x")?,
        Some(post)
    );
    let stored: Vec<Event> = store
        .events_after(0, 100)?
        .into_iter()
        .map(|(_, event)| event)
        .collect();
    assert_eq!(stored, events);
    for (index, event) in events.iter().enumerate() {
        assert_eq!(store.event(index as u64 + 1)?.as_ref(), Some(event));
    }
    assert_eq!(store.cursor("firehose")?.as_deref(), Some("12345"));
    assert_eq!(store.cursor("empty")?.as_deref(), Some(""));
    assert_eq!(store.cursor("absent")?, None);
    assert_eq!(
        store.cursors()?,
        [
            ("empty".to_owned(), String::new()),
            ("firehose".to_owned(), "12345".to_owned())
        ]
    );
    assert_eq!(store.config("scope")?, Some(config));
    assert_eq!(store.config("absent")?, None);
    assert_eq!(
        store.buffered(&alice)?,
        [(1, b"frame one".to_vec()), (2, Vec::new())]
    );
    assert_eq!(
        store.run(1)?,
        Some(BackfillRun {
            id: 1,
            ..run.clone()
        })
    );

    // Run ids continue after the highest stored, explicit ids are kept.
    let mut batch = store.batch();
    batch.put_run(&BackfillRun {
        id: 0,
        kind: "catch-up".to_owned(),
        finished_us: Some(99),
        checkpoint: None,
        ..BackfillRun::default()
    });
    batch.put_run(&BackfillRun {
        id: 1,
        finished_us: Some(50),
        ..run.clone()
    });
    assert_eq!(batch.commit_ids()?.runs, [2]);
    let runs = store.runs()?;
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].finished_us, Some(50));
    assert_eq!(runs[1].kind, "catch-up");
    assert_eq!(runs[1].finished_us, Some(99));
    Ok(())
}

#[test]
fn state_and_status_names() -> TestResult {
    let names = ["pending", "resyncing", "active", "error", "desynchronized"];
    for (state, name) in RepoState::ALL.into_iter().zip(names) {
        assert_eq!(state.as_str(), name);
        assert_eq!(name.parse::<RepoState>()?, state);
    }
    assert!("synced".parse::<RepoState>().is_err());
    for name in [
        "active",
        "deactivated",
        "takendown",
        "suspended",
        "deleted",
        "new",
    ] {
        let status: AccountStatus = name.parse()?;
        assert_eq!(status.as_str(), name);
        assert_eq!(matches!(status, AccountStatus::Other(_)), name == "new");
    }
    Ok(())
}

#[test]
fn tap_wire_form() -> TestResult {
    let events = events()?;
    let create = events[0].to_tap_string(12345);
    let cid = Cid::dag_cbor(
        record(
            &did("did:plc:alice")?,
            "app.bsky.feed.post",
            "3kb3fge5lm32x",
            "hello",
        )?
        .bytes(),
    );
    assert_eq!(
        create,
        format!(
            r#"{{"id":12345,"type":"record","record":{{"live":true,"did":"did:plc:alice","rev":"3kb3fge5lm32x","collection":"app.bsky.feed.post","rkey":"3kb3fge5lm32x","action":"create","record":{{"$type":"app.bsky.feed.post","createdAt":"2024-01-01T00:00:00Z","text":"hello"}},"cid":"{cid}"}}}}"#
        )
    );
    assert_eq!(
        events[1].to_tap_string(2),
        r#"{"id":2,"type":"record","record":{"live":false,"did":"did:plc:alice","rev":"3kb3fge5lm32y","collection":"app.bsky.feed.like","rkey":"3kb3fge5lm32z","action":"delete"}}"#
    );
    // Bytes that are not DRISL: no `record`, but the CID stays.
    let undecodable = events[2].to_tap_string(3);
    assert!(!undecodable.contains(r#""record":{"$"#), "{undecodable}");
    assert!(
        undecodable.ends_with(&format!(
            r#""action":"update","cid":"{}"}}}}"#,
            Cid::dag_cbor(b"x")
        )),
        "{undecodable}"
    );
    assert_eq!(
        events[3].to_tap_string(4),
        r#"{"id":4,"type":"identity","identity":{"did":"did:plc:alice","handle":"handle.invalid","is_active":false,"status":"takendown"}}"#
    );
    assert_eq!(
        events[4].to_tap_string(5),
        r#"{"id":5,"type":"repo","repo":{"did":"did:plc:alice","state":"error","reason":"PDS returned 500"}}"#
    );
    assert_eq!(
        events[5].to_tap_string(6),
        r#"{"id":6,"type":"repo","repo":{"did":"did:plc:alice","state":"active"}}"#
    );
    // The JSON value says the same as the string.
    for (index, event) in events.iter().enumerate() {
        let id = index as u64 + 1;
        let parsed: serde_json::Value = serde_json::from_str(&event.to_tap_string(id))?;
        assert_eq!(parsed, event.to_tap_json(id), "event {id}");
    }
    Ok(())
}

/// A backfill stores what a CAR walk lends without owning it first: the record and its
/// event must read back exactly as the owned calls store them, and a name the record rules
/// refuse must not be stored.
#[test]
fn a_found_record_and_its_borrowed_event_store_what_the_owned_calls_store() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let alice = did("did:plc:alice")?;
    let owned = record(&alice, "app.bsky.feed.post", "3kb3fge5lm32x", "hello")?;
    let found = RecordRef {
        did: &alice,
        collection: "app.bsky.feed.post",
        rkey: "3kb3fge5lm32x",
        cid: owned.cid(),
        bytes: owned.bytes(),
    };
    let event = RecordEvent {
        live: false,
        did: alice.clone(),
        rev: "3kb3fge5lm32y".to_owned(),
        collection: "app.bsky.feed.post".to_owned(),
        rkey: "3kb3fge5lm32x".to_owned(),
        action: Action::Create,
        cid: Some(owned.cid()),
        record: Some(owned.bytes().to_vec()),
        time_us: 42,
    };
    let mut batch = store.batch();
    batch.put_found_record(&found, false)?;
    batch.push_record_event(&event.as_ref());
    let ids = batch.commit()?;
    assert_eq!(
        store
            .record(&alice, "app.bsky.feed.post", "3kb3fge5lm32x")?
            .as_ref(),
        Some(&owned)
    );
    assert_eq!(store.record_count_of(&alice)?, 1);
    assert_eq!(
        store.events_after(0, 10)?,
        vec![(ids[0], Event::Record(event))]
    );

    let mut batch = store.batch();
    for (collection, rkey) in [("A0", "374913"), ("app.bsky.feed.post", "..")] {
        let refused = batch.put_found_record(
            &RecordRef {
                collection,
                rkey,
                ..found
            },
            false,
        );
        assert!(
            matches!(refused, Err(StoreError::InvalidRecordName { .. })),
            "{collection}/{rkey}: {refused:?}"
        );
    }
    assert!(batch.is_empty(), "a refused record adds nothing");
    Ok(())
}
