//! Event ids only grow: across batches, across reopen, and after the outbox was emptied.

use atpdb_store::{Event, RepoState, RepoStateEvent, Store};

use crate::common::{TestResult, did};

fn state_event(n: u64) -> TestResult<Event> {
    Ok(Event::RepoState(RepoStateEvent {
        did: did("did:plc:events")?,
        state: RepoState::Synced,
        reason: Some(n.to_string()),
        time_us: n,
    }))
}

fn push(store: &Store, count: u64) -> TestResult<Vec<u64>> {
    let mut batch = store.batch();
    for n in 0..count {
        batch.push(state_event(n)?);
    }
    Ok(batch.commit()?)
}

#[test]
fn ids_never_repeat() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let store = Store::open(dir.path())?;
        assert_eq!(store.last_event_id(), 0);
        assert_eq!(push(&store, 3)?, [1, 2, 3]);
        assert_eq!(push(&store, 1)?, [4]);
        // A batch without events assigns none.
        let mut batch = store.batch();
        batch.set_cursor("c", "x");
        assert_eq!(batch.commit()?, Vec::<u64>::new());
        assert_eq!(store.last_event_id(), 4);
    }
    {
        let store = Store::open(dir.path())?;
        assert_eq!(store.last_event_id(), 4);
        assert_eq!(push(&store, 2)?, [5, 6]);
        assert_eq!(store.outbox_len(), 6);
        // Empty the outbox completely.
        store.delete_events(&[1, 2, 3, 4, 5, 6, 6, 99])?;
        assert_eq!(store.outbox_len(), 0);
        assert_eq!(store.events_after(0, 100)?.len(), 0);
        assert_eq!(store.last_event_id(), 6);
    }
    let store = Store::open(dir.path())?;
    assert_eq!(store.last_event_id(), 6);
    assert_eq!(store.outbox_len(), 0);
    assert_eq!(push(&store, 1)?, [7]);
    Ok(())
}

/// Most batches are planned before the commit lock with their event ids counted from 1
/// and moved past the last id under it; batches that take buffer ids or delete by prefix
/// are planned under the lock. Either way ids follow commit order, and each id holds the
/// event pushed with it.
#[test]
fn ids_follow_commit_order_whichever_way_a_batch_is_planned() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let planned_under_lock = |first: u64, count: u64| -> TestResult<Vec<u64>> {
        let mut batch = store.batch();
        for n in first..first + count {
            batch.push(state_event(n)?);
        }
        batch.buffer_push(&did("did:plc:events")?, vec![1, 2, 3]);
        batch.delete_records_of(&did("did:plc:events")?);
        Ok(batch.commit()?)
    };
    let planned_before = |first: u64, count: u64| -> TestResult<Vec<u64>> {
        let mut batch = store.batch();
        for n in first..first + count {
            batch.push(state_event(n)?);
        }
        batch.set_cursor("c", &first.to_string());
        Ok(batch.commit()?)
    };
    assert_eq!(planned_before(1, 2)?, [1, 2]);
    assert_eq!(planned_under_lock(3, 2)?, [3, 4]);
    assert_eq!(planned_before(5, 1)?, [5]);
    assert_eq!(planned_under_lock(6, 1)?, [6]);
    assert_eq!(planned_before(7, 3)?, [7, 8, 9]);
    assert_eq!(store.last_event_id(), 9);
    let events = store.events_after(0, 100)?;
    assert_eq!(events.len(), 9);
    for (id, event) in events {
        assert_eq!(event, state_event(id)?, "event {id}");
    }
    Ok(())
}

/// Submitted batches commit in the order they were submitted, whether or not anyone waits
/// for them, and a batch committed afterwards lands after them.
#[test]
fn submitted_batches_commit_in_order_even_unawaited() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let submit = |first: u64, count: u64| -> TestResult<atpdb_store::PendingCommit> {
        let mut batch = store.batch();
        for n in first..first + count {
            batch.push(state_event(n)?);
        }
        Ok(batch.submit()?)
    };
    let first = submit(1, 2)?;
    // Never waited for: it commits all the same, before the ones submitted after it.
    drop(submit(3, 3)?);
    let third = submit(6, 1)?;
    assert_eq!(push_after(&store, 7)?, [7]);
    assert_eq!(third.wait()?.events, [6]);
    assert_eq!(first.wait()?.events, [1, 2]);
    assert_eq!(store.batch().submit()?.wait()?.events, Vec::<u64>::new());
    let events = store.events_after(0, 100)?;
    assert_eq!(events.len(), 7);
    for (id, event) in events {
        assert_eq!(event, state_event(id)?, "event {id}");
    }
    Ok(())
}

fn push_after(store: &Store, n: u64) -> TestResult<Vec<u64>> {
    let mut batch = store.batch();
    batch.push(state_event(n)?);
    Ok(batch.commit()?)
}

#[test]
fn reading_deleting_and_trimming() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    push(&store, 10)?;
    let page: Vec<u64> = store
        .events_after(3, 4)?
        .iter()
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(page, [4, 5, 6, 7]);
    assert_eq!(store.events_after(10, 4)?.len(), 0);
    assert_eq!(store.events_after(u64::MAX, 4)?.len(), 0);
    assert_eq!(store.event(5)?, Some(state_event(4)?));
    assert_eq!(store.event(11)?, None);

    store.delete_events(&[2, 5])?;
    assert_eq!(store.outbox_len(), 8);
    let ids: Vec<u64> = store
        .events_after(0, 100)?
        .iter()
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(ids, [1, 3, 4, 6, 7, 8, 9, 10]);

    assert_eq!(store.trim_events_before(7)?, 4);
    assert_eq!(store.trim_events_before(7)?, 0);
    assert_eq!(store.outbox_len(), 4);
    let ids: Vec<u64> = store
        .events_after(0, 100)?
        .iter()
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(ids, [7, 8, 9, 10]);
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(store.outbox_len(), 4);
    assert_eq!(push(&store, 1)?, [11]);
    Ok(())
}

#[test]
fn the_log_keeps_events_after_delivery_and_trims_to_its_window() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    push(&store, 2)?;
    assert!(store.log_after(0, 10)?.is_empty(), "off by default");
    store.retain_events(true);
    // time_us of these is 0..10.
    let ids = push(&store, 10)?;
    // Undelivered events are written once, to the outbox; a replay sees them there.
    assert!(store.log_after(0, 100)?.is_empty());
    let replay: Vec<u64> = store
        .retained_after(0, 100)?
        .iter()
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(replay.len(), 12);
    // Half delivered: the replay is one sequence across outbox and log.
    store.delete_events(&ids[..5])?;
    let replay: Vec<u64> = store
        .retained_after(0, 100)?
        .iter()
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(replay.len(), 12);
    assert!(
        replay.windows(2).all(|pair| pair[0] < pair[1]),
        "{replay:?}"
    );
    let page: Vec<u64> = store
        .retained_after(ids[3], 3)?
        .iter()
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(page, ids[4..7]);
    store.delete_events(&ids)?;
    assert_eq!(store.outbox_len(), 2, "delivery emptied the outbox of them");
    let logged: Vec<u64> = store.log_after(0, 100)?.iter().map(|(id, _)| *id).collect();
    assert_eq!(logged, ids, "the log still has them, in order");
    assert_eq!(store.log_after(ids[4], 2)?.len(), 2);
    // By age: time_us below 3 goes.
    assert_eq!(store.trim_log(3, u64::MAX, 100)?, 3);
    // By count: the newest 4 stay; with a budget of 2 a call removes at most 2.
    assert_eq!(store.trim_log(0, 4, 2)?, 2);
    assert_eq!(store.trim_log(0, 4, 100)?, 1);
    let logged: Vec<u64> = store.log_after(0, 100)?.iter().map(|(id, _)| *id).collect();
    assert_eq!(logged, ids[6..]);
    assert_eq!(store.trim_log(0, 4, 100)?, 0);
    Ok(())
}

#[test]
fn a_trim_by_count_removes_only_what_the_log_holds() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    // Delivered while retention was off: never logged.
    let unlogged = push(&store, 5)?;
    store.delete_events(&unlogged)?;
    store.retain_events(true);
    let logged = push(&store, 5)?;
    store.delete_events(&logged)?;
    drop(store);
    // A new process starts its trim with no floor.
    let store = Store::open(dir.path())?;
    store.retain_events(true);
    assert_eq!(
        store.trim_log(0, 2, 100)?,
        3,
        "the three logged below the window"
    );
    let kept: Vec<u64> = store.log_after(0, 100)?.iter().map(|(id, _)| *id).collect();
    assert_eq!(kept, logged[3..]);
    assert_eq!(store.trim_log(0, 2, 100)?, 0);
    Ok(())
}
