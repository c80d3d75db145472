//! Per-repo ordering: which loaded events may be in flight together.
//!
//! Tap lets a repo's historical events (backfill records, identity events) be in flight
//! together and makes each live event a barrier. That reorders two identity events of one
//! account, or a record's create from one snapshot and its delete from the next, whenever a
//! consumer processes in parallel or an event is re-sent. Here the only events in flight
//! together are the records of one backfill snapshot (same repo, same rev, not live): a
//! snapshot names each record once, so their relative order carries no meaning. Everything
//! else waits for what came before it in the same repo. Different repos never wait for
//! each other.

use std::collections::{HashMap, VecDeque};

use atpdb_repo::syntax::Did;

/// How an event may overlap others of its repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Overlap {
    /// Goes out alone, after everything before it in its repo completed.
    Alone,
    /// May be in flight with the repo's other events of the same snapshot (their rev).
    Snapshot(String),
}

#[derive(Debug, Default)]
struct RepoQueue {
    /// Loaded events not yet released, in id order.
    waiting: VecDeque<(u64, Overlap)>,
    /// Released and not yet completed.
    in_flight: usize,
    /// What the in-flight events share (`None` when nothing is in flight).
    current: Option<Overlap>,
}

/// Events of every repo, released in an order that keeps each repo's events in sequence.
#[derive(Debug, Default)]
pub(crate) struct Scheduler {
    repos: HashMap<Did, RepoQueue>,
    /// Which repo a loaded event belongs to.
    owner: HashMap<u64, Did>,
    /// Released events, oldest first, not yet handed out.
    ready: VecDeque<u64>,
}

impl Scheduler {
    /// Adds a loaded event; ids must grow within a repo.
    pub(crate) fn push(&mut self, id: u64, did: &Did, overlap: Overlap) {
        self.owner.insert(id, did.clone());
        let queue = self.repos.entry(did.clone()).or_default();
        queue.waiting.push_back((id, overlap));
        release(queue, &mut self.ready);
    }

    /// The next released event to hand out.
    pub(crate) fn pop_ready(&mut self) -> Option<u64> {
        self.ready.pop_front()
    }

    /// Whether an event is released and waiting to be handed out.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Marks a released event done, releasing what waited on it. Returns false for an id
    /// this scheduler does not hold (already completed, or never loaded).
    pub(crate) fn complete(&mut self, id: u64) -> bool {
        let Some(did) = self.owner.remove(&id) else {
            return false;
        };
        let Some(queue) = self.repos.get_mut(&did) else {
            return false;
        };
        queue.in_flight = queue.in_flight.saturating_sub(1);
        if queue.in_flight == 0 {
            queue.current = None;
        }
        release(queue, &mut self.ready);
        if queue.in_flight == 0 && queue.waiting.is_empty() {
            self.repos.remove(&did);
        }
        true
    }

    /// Events loaded and not completed (waiting, ready or in flight).
    pub(crate) fn len(&self) -> usize {
        self.owner.len()
    }

    /// Whether `id` is loaded and not yet completed.
    pub(crate) fn holds(&self, id: u64) -> bool {
        self.owner.contains_key(&id)
    }
}

/// Moves the events that may go now from `waiting` to `ready`.
fn release(queue: &mut RepoQueue, ready: &mut VecDeque<u64>) {
    while let Some((_, overlap)) = queue.waiting.front() {
        let fits = match (&queue.current, overlap) {
            (None, _) => true,
            (Some(Overlap::Snapshot(current)), Overlap::Snapshot(rev)) => current == rev,
            _ => false,
        };
        if !fits {
            return;
        }
        let Some((id, overlap)) = queue.waiting.pop_front() else {
            return;
        };
        queue.in_flight += 1;
        ready.push_back(id);
        let alone = overlap == Overlap::Alone;
        queue.current = Some(overlap);
        if alone {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn did(n: u8) -> Did {
        let letter = char::from(b'a' + n);
        format!("did:plc:{}", letter.to_string().repeat(24))
            .parse()
            .unwrap_or_else(|_| unreachable!("a valid DID"))
    }

    fn drain(scheduler: &mut Scheduler) -> Vec<u64> {
        std::iter::from_fn(|| scheduler.pop_ready()).collect()
    }

    fn snap(rev: &str) -> Overlap {
        Overlap::Snapshot(rev.to_owned())
    }

    #[test]
    fn snapshot_records_overlap_and_everything_else_waits() {
        // Tap's README example H1,H2,L1,H3,H4,L2,H5, with H3/H4 from a second snapshot.
        let mut s = Scheduler::default();
        let a = did(0);
        s.push(1, &a, snap("r1"));
        s.push(2, &a, snap("r1"));
        s.push(3, &a, Overlap::Alone);
        s.push(4, &a, snap("r2"));
        s.push(5, &a, snap("r2"));
        s.push(6, &a, Overlap::Alone);
        s.push(7, &a, snap("r3"));
        assert_eq!(drain(&mut s), [1, 2]);
        assert!(s.complete(2));
        assert_eq!(drain(&mut s), Vec::<u64>::new(), "L1 waits for H1");
        assert!(s.complete(1));
        assert_eq!(drain(&mut s), [3]);
        assert!(s.complete(3));
        assert_eq!(drain(&mut s), [4, 5]);
        assert!(s.complete(4));
        assert!(s.complete(5));
        assert_eq!(drain(&mut s), [6]);
        assert!(s.complete(6));
        assert_eq!(drain(&mut s), [7]);
        assert!(s.complete(7));
        assert_eq!(s.len(), 0);
        assert!(s.repos.is_empty(), "finished repos are forgotten");
    }

    #[test]
    fn snapshots_of_different_revs_do_not_overlap() {
        let mut s = Scheduler::default();
        let a = did(0);
        s.push(1, &a, snap("r1"));
        s.push(2, &a, snap("r2"));
        assert_eq!(drain(&mut s), [1]);
        s.complete(1);
        assert_eq!(drain(&mut s), [2]);
    }

    #[test]
    fn repos_do_not_wait_for_each_other() {
        let mut s = Scheduler::default();
        s.push(1, &did(0), Overlap::Alone);
        s.push(2, &did(0), Overlap::Alone);
        s.push(3, &did(1), Overlap::Alone);
        assert_eq!(drain(&mut s), [1, 3]);
        assert!(s.holds(2));
        assert!(!s.complete(99), "unknown ids are refused");
        s.complete(1);
        assert_eq!(drain(&mut s), [2]);
    }
}
