//! Helpers shared by the tests: records, events and a recount that checks the counters.

use atpdb_repo::syntax::Did;
use atpdb_repo::{Cid, Record};
use atpdb_store::{Action, Event, RecordEvent, RepoState, Store};

/// What every test returns.
pub(crate) type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// A DID from text.
pub(crate) fn did(text: &str) -> TestResult<Did> {
    Ok(text.parse()?)
}

/// A small post record whose text is `text`.
pub(crate) fn record(did: &Did, collection: &str, rkey: &str, text: &str) -> TestResult<Record> {
    let bytes = atpdb_repo::value::Value::from_json(&serde_json::json!({
        "$type": collection,
        "text": text,
        "createdAt": "2024-01-01T00:00:00Z",
    }))?
    .to_cbor();
    Ok(Record::new(
        did.clone(),
        collection.parse()?,
        rkey.parse()?,
        Cid::dag_cbor(&bytes),
        bytes,
    )?)
}

/// A live create event for `record`.
pub(crate) fn create_event(record: &Record, rev: &str) -> Event {
    Event::Record(RecordEvent {
        live: true,
        did: record.did().clone(),
        rev: rev.to_owned(),
        collection: record.collection().as_str().to_owned(),
        rkey: record.rkey().as_str().to_owned(),
        action: Action::Create,
        cid: Some(record.cid()),
        record: Some(record.bytes().to_vec()),
        time_us: 1_700_000_000_000_000,
    })
}

/// Recounts everything the store keeps counters for, by scanning, and compares: records
/// (total and per DID), repos per state, outbox and buffer lengths.
pub(crate) fn check_counters(store: &Store, dids: &[Did]) -> TestResult {
    let mut total = 0;
    for did in dids {
        let scanned = store.records(did, None, None, usize::MAX, false)?.len() as u64;
        assert_eq!(
            store.record_count_of(did)?,
            scanned,
            "per-DID record count of {did}"
        );
        total += scanned;
    }
    assert_eq!(store.record_count(), total, "total record count");
    let repos = store.repos(None, usize::MAX)?;
    assert_eq!(store.repo_count()?, repos.len() as u64, "repo count");
    for state in RepoState::ALL {
        let in_state = repos.iter().filter(|repo| repo.state == state).count() as u64;
        assert_eq!(store.count_in_state(state)?, in_state, "count in {state}");
        let indexed = store.repos_in_state(state, usize::MAX)?;
        assert_eq!(indexed.len() as u64, in_state, "state index of {state}");
    }
    let events = store.events_after(0, usize::MAX)?;
    assert_eq!(store.outbox_len(), events.len() as u64, "outbox length");
    let buffered: usize = dids
        .iter()
        .map(|did| store.buffered(did).map(|frames| frames.len()))
        .sum::<Result<usize, _>>()?;
    assert_eq!(store.buffer_len(), buffered as u64, "buffer length");
    Ok(())
}

/// Pseudo-random numbers without a dependency: xorshift seeded from the clock.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn from_clock() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9);
        Rng(nanos | 1)
    }

    pub(crate) fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound.max(1)
    }
}

/// The environment variable that turns a test of this binary into a child process: it
/// holds the data directory the child works on.
pub(crate) const CHILD_DIR: &str = "ATPDB_STORE_TEST_CHILD_DIR";

/// This test binary, set to run only the test `name` as a child working on `dir`.
pub(crate) fn child(name: &str, dir: &std::path::Path) -> TestResult<std::process::Command> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    Ok(command)
}

/// The child's stdout, line by line, read on a thread of its own so that waiting can time
/// out and the child never blocks on a full pipe. The channel closes when the child's
/// stdout does.
pub(crate) fn lines(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    receiver
}

/// Waits until the child prints a line ending in `ready` (libtest prints its own text too,
/// and `test name ... ` before the test's first output on the same line). Fails if the child
/// ends first or takes longer than a minute; the caller then kills it.
pub(crate) fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, ready: &str) -> TestResult {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.trim_end().ends_with(ready) => return Ok(()),
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(format!("child exited before printing {ready:?}").into());
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!("child did not print {ready:?} within a minute").into());
            }
        }
    }
}
