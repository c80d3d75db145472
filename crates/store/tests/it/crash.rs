//! A child process commits batches in a loop and is killed (SIGKILL) at a random moment;
//! after reopening, everything the outbox says happened is there, and nothing more.
//!
//! Batch `n` holds: `n % 5 + 1` records `n-0`, `n-1`..., one event about `n-0`, the cursor
//! set to `n`, and the repo entry with rev `n` in a state that rotates with `n`. So after a
//! crash, with `last` the last event id: ids are exactly 1..=last, the cursor is `last`, the
//! repo's rev is `last`, and the records are exactly those of batches 1..=last. The child
//! prints each id once `commit` returned; the last one printed must be at most `last`.

use std::time::Duration;

use atpdb_repo::syntax::Did;
use atpdb_store::{Event, RepoEntry, RepoState, Store};

use crate::common::{
    CHILD_DIR, Rng, TestResult, check_counters, child, create_event, did, lines, record,
    wait_for_line,
};

const DID: &str = "did:plc:crashtest";
const COLLECTION: &str = "app.bsky.feed.post";
const ROUNDS: usize = 4;

fn records_in_batch(n: u64) -> u64 {
    n % 5 + 1
}

#[test]
fn killed_writer_leaves_whole_batches() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut rng = Rng::from_clock();
    let mut previous = 0;
    for round in 0..ROUNDS {
        let mut writer = child("crash::crash_writer_child", dir.path())?.spawn()?;
        let lines = lines(writer.stdout.take().ok_or("no child stdout")?);
        let waited = wait_for_line(&lines, "writing");
        if waited.is_ok() {
            std::thread::sleep(Duration::from_millis(rng.below(400)));
        }
        writer.kill()?; // SIGKILL
        writer.wait()?;
        waited?;
        // The child prints each id after `commit` returned: every one must have survived.
        let confirmed = lines
            .iter()
            .filter_map(|line| line.strip_prefix("committed ")?.parse::<u64>().ok())
            .max()
            .unwrap_or(previous);

        let store = Store::open(dir.path())?;
        let last = verify(&store, &did(DID)?)?;
        eprintln!("round {round}: killed after event {last} (confirmed {confirmed})");
        assert!(
            last >= confirmed,
            "event {confirmed} was committed, the store ends at {last}"
        );
        assert!(
            last >= previous,
            "event {last} after {previous}: ids went back"
        );
        previous = last;
    }
    assert!(previous > 0, "the writer never committed");
    Ok(())
}

/// Checks the invariants in the module doc; returns the last event id.
fn verify(store: &Store, did: &Did) -> TestResult<u64> {
    let last = store.last_event_id();
    let events = store.events_after(0, usize::MAX)?;
    let ids: Vec<u64> = events.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=last).collect::<Vec<_>>(), "outbox ids");
    assert_eq!(store.outbox_len(), last);
    let expected_cursor = (last > 0).then(|| last.to_string());
    assert_eq!(store.cursor("crash")?, expected_cursor, "cursor");
    match store.repo(did)? {
        Some(entry) => {
            assert_eq!(entry.rev, Some(last.to_string()), "repo rev");
            assert_eq!(entry.state, RepoState::ALL[(last % 5) as usize]);
        }
        None => assert_eq!(last, 0, "no repo entry after {last} batches"),
    }
    let expected_records: u64 = (1..=last).map(records_in_batch).sum();
    assert_eq!(store.record_count(), expected_records, "record count");
    for (id, event) in &events {
        let Event::Record(event) = event else {
            return Err(format!("event {id} is not a record event").into());
        };
        assert_eq!(event.rkey, format!("{id}-0"));
        let stored = store
            .record(did, COLLECTION, &event.rkey)?
            .ok_or_else(|| format!("event {id} without its record"))?;
        assert_eq!(Some(stored.cid()), event.cid);
        for part in 0..records_in_batch(*id) {
            assert!(
                store
                    .record(did, COLLECTION, &format!("{id}-{part}"))?
                    .is_some(),
                "record {id}-{part} missing"
            );
        }
    }
    check_counters(store, std::slice::from_ref(did))?;
    Ok(last)
}

/// The child half of `killed_writer_leaves_whole_batches`: commits batches until killed,
/// continuing after what an earlier child left. Without the environment variable (a normal
/// test run) it does nothing.
#[test]
fn crash_writer_child() -> TestResult {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return Ok(());
    };
    let store = Store::open(std::path::Path::new(&dir))?;
    let did = did(DID)?;
    let mut n = store.last_event_id();
    println!("writing");
    // The parent kills this process within a second; the deadline only ends an orphan.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        n += 1;
        let mut batch = store.batch();
        let mut first = None;
        for part in 0..records_in_batch(n) {
            let post = record(&did, COLLECTION, &format!("{n}-{part}"), "crash")?;
            batch.put_record(&post);
            first.get_or_insert(post);
        }
        let first = first.ok_or("no record")?;
        batch.push(create_event(&first, &n.to_string()));
        batch.set_cursor("crash", &n.to_string());
        let mut entry = RepoEntry::new(did.clone(), 0);
        entry.rev = Some(n.to_string());
        entry.state = RepoState::ALL[(n % 5) as usize];
        batch.put_repo(&entry);
        let ids = batch.commit()?;
        assert_eq!(ids, [n]);
        println!("committed {n}");
    }
    Ok(())
}
