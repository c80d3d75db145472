//! Several threads committing at once: ids unique and in commit order, counts exact.

use std::collections::HashMap;

use atpdb_store::{Event, Store};

use crate::common::{TestResult, check_counters, create_event, did, record};

const THREADS: usize = 4;
const COMMITS: usize = 150;

#[test]
fn concurrent_committers() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let dids: Vec<_> = (0..THREADS)
        .map(|t| did(&format!("did:plc:thread{t}")))
        .collect::<TestResult<_>>()?;
    let results: Vec<Vec<(u64, String)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = dids
            .iter()
            .map(|did| {
                let store = store.clone();
                scope.spawn(move || -> Result<Vec<(u64, String)>, String> {
                    let mut mine = Vec::new();
                    for n in 0..COMMITS {
                        let rkey = format!("{n:04}");
                        let post = record(did, "app.bsky.feed.post", &rkey, "t")
                            .map_err(|e| e.to_string())?;
                        let mut batch = store.batch();
                        batch.put_record(&post);
                        // Every third commit also rewrites an existing key: no count change.
                        if n % 3 == 2 {
                            let again = record(did, "app.bsky.feed.post", "0000", "u")
                                .map_err(|e| e.to_string())?;
                            batch.put_record(&again);
                        }
                        batch.push(create_event(&post, &rkey));
                        let ids = batch.commit().map_err(|e| e.to_string())?;
                        let [id] = ids[..] else {
                            return Err(format!("{} ids for one event", ids.len()));
                        };
                        mine.push((id, format!("{did}/{rkey}")));
                    }
                    Ok(mine)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().map_err(|_| "thread panicked".to_owned())?)
            .collect::<Result<_, String>>()
    })?;

    // Each thread saw its own ids grow; together they are 1..=N without gaps or repeats.
    let mut by_id = HashMap::new();
    for mine in &results {
        assert!(
            mine.windows(2).all(|w| w[0].0 < w[1].0),
            "ids of one thread grow"
        );
        for (id, what) in mine {
            assert!(
                by_id.insert(*id, what.clone()).is_none(),
                "id {id} given twice"
            );
        }
    }
    let total = (THREADS * COMMITS) as u64;
    assert_eq!(store.last_event_id(), total);
    // The outbox, read in id order, holds under each id what was pushed with it.
    let events = store.events_after(0, usize::MAX)?;
    assert_eq!(events.len() as u64, total);
    for (expected_id, (id, event)) in (1..).zip(&events) {
        assert_eq!(*id, expected_id);
        let Event::Record(event) = event else {
            return Err(format!("event {id} is not a record event").into());
        };
        assert_eq!(by_id[id], format!("{}/{}", event.did, event.rkey));
    }
    assert_eq!(store.record_count(), total);
    for did in &dids {
        assert_eq!(store.record_count_of(did)?, COMMITS as u64);
    }
    check_counters(&store, &dids)?;
    Ok(())
}
