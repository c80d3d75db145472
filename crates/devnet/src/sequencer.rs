//! The event log behind a `subscribeRepos` endpoint: one monotonic seq space, frames encoded
//! once and shared by every subscriber, a bounded replay window.
//!
//! Replay and live delivery read the same log by position, so a subscriber that catches up
//! cannot skip or repeat an event at the cutover: there is no second channel to hand over to.

use std::collections::VecDeque;
use std::sync::Mutex;

use atpdb_repo::syntax::Did;
use bytes::Bytes;
use tokio::sync::watch;

/// One sequenced event, already encoded as a frame.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    did: Option<Did>,
    frame: Bytes,
    /// Events of a deleted account are kept (their seqs stay taken) but never replayed.
    invalidated: bool,
}

#[derive(Debug)]
struct State {
    events: VecDeque<Entry>,
    /// The seq the next event gets.
    next_seq: u64,
    /// The highest seq that fell out of the window (0 when nothing has).
    evicted_through: u64,
    window: usize,
}

/// What a subscriber gets from one read of the log.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// `(seq, frame)` in seq order, invalidated events left out.
    pub(crate) frames: Vec<(u64, Bytes)>,
    /// Events after the requested position had already fallen out of the window.
    pub(crate) evicted: bool,
    /// How many events the log holds from the requested position on (seqs may have gaps,
    /// so this, not a seq difference, is how far behind a subscriber is).
    pub(crate) behind: usize,
}

/// A monotonic sequencer with a replay window.
#[derive(Debug)]
pub(crate) struct Sequencer {
    state: Mutex<State>,
    head: watch::Sender<u64>,
}

impl Sequencer {
    /// A sequencer whose first event gets `first_seq`, keeping the newest `window` events.
    pub(crate) fn new(first_seq: u64, window: usize) -> Sequencer {
        let first_seq = first_seq.max(1);
        Sequencer {
            state: Mutex::new(State {
                events: VecDeque::new(),
                next_seq: first_seq,
                evicted_through: 0,
                window: window.max(1),
            }),
            head: watch::Sender::new(first_seq - 1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the log half-written (every mutation
        // is a single push or flag), so a poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Assigns the next seq and stores the frame `encode` builds for it. Encoding happens
    /// under the lock so that seq order and log order cannot differ.
    pub(crate) fn append(&self, did: Option<&Did>, encode: impl FnOnce(u64) -> Vec<u8>) -> u64 {
        let seq = {
            let mut state = self.lock();
            let seq = state.next_seq;
            let frame = Bytes::from(encode(seq));
            state.next_seq += 1;
            state.events.push_back(Entry {
                seq,
                did: did.cloned(),
                frame,
                invalidated: false,
            });
            while state.events.len() > state.window {
                if let Some(old) = state.events.pop_front() {
                    state.evicted_through = old.seq;
                }
            }
            seq
        };
        self.head.send_replace(seq);
        seq
    }

    /// Up to `max` events with seq ≥ `from`.
    pub(crate) fn read_from(&self, from: u64, max: usize) -> Batch {
        let state = self.lock();
        let evicted = from <= state.evicted_through;
        let start = state.events.partition_point(|entry| entry.seq < from);
        let frames = state
            .events
            .range(start..)
            .filter(|entry| !entry.invalidated)
            .take(max)
            .map(|entry| (entry.seq, entry.frame.clone()))
            .collect();
        Batch {
            frames,
            evicted,
            behind: state.events.len() - start,
        }
    }

    /// The newest seq handed out (`first_seq - 1` before any).
    pub(crate) fn head(&self) -> u64 {
        self.lock().next_seq - 1
    }

    /// The oldest seq still in the window.
    pub(crate) fn oldest(&self) -> Option<u64> {
        self.lock().events.front().map(|entry| entry.seq)
    }

    /// Wakes when a new event is appended.
    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Stops replaying an account's events (after its deletion); live subscribers already
    /// past them are unaffected, as with the reference PDS.
    pub(crate) fn invalidate(&self, did: &Did) {
        let mut state = self.lock();
        for entry in state.events.iter_mut() {
            if entry.did.as_ref() == Some(did) {
                entry.invalidated = true;
            }
        }
    }

    /// Skips `by` seqs, as a consumer sees when its upstream is swapped for another relay.
    pub(crate) fn jump(&self, by: u64) {
        self.lock().next_seq += by;
    }

    /// Drops all but the newest `keep` events, so a cursor from before them is outdated.
    pub(crate) fn trim(&self, keep: usize) {
        let mut state = self.lock();
        while state.events.len() > keep {
            if let Some(old) = state.events.pop_front() {
                state.evicted_through = old.seq;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append_n(seq: &Sequencer, n: usize) {
        for _ in 0..n {
            seq.append(None, |s| s.to_be_bytes().to_vec());
        }
    }

    #[test]
    fn reads_by_position_and_evicts() {
        let seq = Sequencer::new(1, 5);
        append_n(&seq, 8);
        assert_eq!(seq.head(), 8);
        assert_eq!(seq.oldest(), Some(4));
        let batch = seq.read_from(1, 100);
        assert!(batch.evicted);
        assert_eq!(
            batch.frames.iter().map(|f| f.0).collect::<Vec<_>>(),
            [4, 5, 6, 7, 8]
        );
        let batch = seq.read_from(6, 2);
        assert!(!batch.evicted);
        assert_eq!(batch.frames.iter().map(|f| f.0).collect::<Vec<_>>(), [6, 7]);
        assert!(seq.read_from(9, 10).frames.is_empty());
    }

    #[test]
    fn jump_and_trim() {
        let seq = Sequencer::new(1, 100);
        append_n(&seq, 3);
        seq.jump(1000);
        append_n(&seq, 1);
        assert_eq!(seq.head(), 1004);
        seq.trim(1);
        let batch = seq.read_from(2, 10);
        assert!(batch.evicted);
        assert_eq!(batch.frames.len(), 1);
    }
}
