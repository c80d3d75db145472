//! Real `#commit` events for the `firehose_commit` target and its seeds.
//!
//! Each [`Base`] is a commit a `MemoryRepo` made, with the key that signed it and, for commits
//! that follow another, the whole repository before the commit (so a target can check that a
//! proven commit's ops really turn the previous tree into the new one).

use std::sync::OnceLock;

use atpdb_repo::Cid;
use atpdb_repo::blocks::VerifiedBlocks;
use atpdb_repo::car::CarLimits;
use atpdb_repo::crypto::{Curve, Keypair};
use atpdb_repo::firehose::{CommitEvent, Message, SyncEvent, encode_message};
use atpdb_repo::repo::{CommitData, MemoryRepo, Write};
use atpdb_repo::sample::{SampleRng, sample_did, sample_keypair, sample_record};
use atpdb_repo::syntax::{Datetime, Tid};

/// 2026-01-01T00:00:00Z in microseconds: revs and record keys count up from here.
pub const START_MICROS: u64 = 1_767_225_600_000_000;

/// The rev of commit `n`.
pub fn rev(n: u64) -> Tid {
    Tid::from_parts(START_MICROS + n * 1000, 7)
}

/// The events' time.
pub fn time() -> Datetime {
    Datetime::from_unix_micros(START_MICROS)
}

/// A real commit and what a checker of it may know.
pub struct Base {
    /// The event as a host emits it.
    pub event: CommitEvent,
    /// The key that signed it.
    pub key: Keypair,
    /// The repository before this commit (every block) and its MST root, when there was one.
    pub previous: Option<(VerifiedBlocks, Cid, Tid)>,
    /// A `#sync` of the repository after the commit.
    pub sync: SyncEvent,
}

struct Account {
    repo: MemoryRepo,
    key: Keypair,
    rng: SampleRng,
    seed: u64,
    paths: Vec<String>,
    n_records: u64,
    n_commits: u64,
}

impl Account {
    fn record(&mut self) -> (String, Vec<u8>) {
        self.n_records += 1;
        let micros = START_MICROS + self.n_records * 1_000;
        let record = sample_record(self.rng.next_u64(), self.n_records, micros, &[]);
        (
            record.path(),
            record.to_cbor().expect("sample record encodes"),
        )
    }

    fn new(seed: u64, curve: Curve, initial: usize) -> (Account, CommitData) {
        let key = sample_keypair(seed, curve);
        let (repo, _) =
            MemoryRepo::create(sample_did(seed), &key, rev(1), &[]).expect("empty repository");
        let mut account = Account {
            repo,
            key,
            rng: SampleRng::new(seed),
            seed,
            paths: Vec::new(),
            n_records: 0,
            n_commits: 1,
        };
        let writes = account.creates(initial);
        let (repo, data) = MemoryRepo::create(sample_did(seed), &account.key, rev(1), &writes)
            .expect("first commit");
        account.repo = repo;
        (account, data)
    }

    fn creates(&mut self, n: usize) -> Vec<Write> {
        (0..n)
            .map(|_| {
                let (path, record) = self.record();
                self.paths.push(path.clone());
                Write::Create { path, record }
            })
            .collect()
    }

    /// A commit of new, changed and removed records; returns it and the repository before it.
    fn commit(
        &mut self,
        creates: usize,
        updates: usize,
        deletes: usize,
    ) -> (CommitData, VerifiedBlocks, Cid, Tid) {
        let (_, before) =
            VerifiedBlocks::from_car(&self.repo.to_car().expect("CAR"), CarLimits::default())
                .expect("own CAR reads back");
        let before_root = self.repo.commit().data;
        let before_rev = self.repo.rev().clone();
        let mut writes = Vec::new();
        for i in 0..(updates + deletes).min(self.paths.len()) {
            let index = self.rng.below(self.paths.len() as u64) as usize;
            let path = self.paths.swap_remove(index);
            if i < updates {
                let (_, record) = self.record();
                writes.push(Write::Update {
                    path: path.clone(),
                    record,
                });
                self.paths.push(path);
            } else {
                writes.push(Write::Delete { path });
            }
        }
        writes.extend(self.creates(creates));
        self.n_commits += 1;
        let data = self
            .repo
            .apply(&self.key, rev(self.n_commits), &writes)
            .expect("commit");
        (data, before, before_root, before_rev)
    }

    fn base(&self, data: &CommitData, previous: Option<(VerifiedBlocks, Cid, Tid)>) -> Base {
        Base {
            event: CommitEvent::from_commit_data(self.seed, data, time(), Vec::new()),
            key: self.key.clone(),
            previous,
            sync: SyncEvent::from_commit(self.seed, self.repo.commit(), time()),
        }
    }
}

/// The commits the target starts from: a first commit (no `prevData`), mixed commits on a
/// small and a larger repository (k256 and p256 keys), and a commit of deletes only.
pub fn bases() -> &'static [Base] {
    static BASES: OnceLock<Vec<Base>> = OnceLock::new();
    BASES.get_or_init(|| {
        let mut bases = Vec::new();
        let (mut small, first) = Account::new(1, Curve::K256, 12);
        bases.push(small.base(&first, None));
        let (data, before, root, rev) = small.commit(3, 2, 2);
        bases.push(small.base(&data, Some((before, root, rev))));
        let (data, before, root, rev) = small.commit(0, 0, 4);
        bases.push(small.base(&data, Some((before, root, rev))));
        let (mut large, _) = Account::new(2, Curve::P256, 60);
        let (data, before, root, rev) = large.commit(2, 1, 1);
        bases.push(large.base(&data, Some((before, root, rev))));
        bases
    })
}

/// Seeds: each base as an encoded `#commit` frame, its `#sync` frame, and each base in the
/// target's structured form (see `fuzz_targets/firehose_commit.rs`).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for (i, base) in bases().iter().enumerate() {
        seeds.push((
            format!("frame-commit-{i}"),
            encode_message(&Message::Commit(base.event.clone())),
        ));
        seeds.push((
            format!("frame-sync-{i}"),
            encode_message(&Message::Sync(base.sync.clone())),
        ));
        let mut structured = vec![i as u8, 0, 0];
        structured.extend_from_slice(&base.event.blocks);
        seeds.push((format!("structured-{i}"), structured));
        // One op edit (drop an op's prev) so the edit path has a seed too.
        let mut edited = vec![i as u8, 0, 1, 0, 2, 0];
        edited.extend_from_slice(&base.event.blocks);
        seeds.push((format!("structured-edit-{i}"), edited));
    }
    seeds
}
