//! `sync-bench firehose --tracked N,...`: the store pass again, each time over a store that
//! also tracks N repos that the traffic never touches, to show how the firehose rate holds
//! as the repo and record keyspaces grow (Tap stalls near 15 M repos).
//!
//! Every pass starts from the same state: a fresh store gets the filler repos (synced, each
//! with records copied from the seeded ones under its own DID), then the seeded accounts'
//! rows and records exactly as the first backfill left them, so the recorded frames apply
//! to it as they did to the first store.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use atpdb_devnet::Devnet;
use atpdb_repo::Record;
use atpdb_repo::syntax::{Did, RecordKey};
use atpdb_store::{RepoEntry, RepoState, Store};
use serde_json::{Value as Json, json};

use super::{
    Pass, PassResult, PerfControl, check_mirror, engine_on, progress, replay, warm_identities,
};

/// Records written per store batch while filling.
const FILL_BATCH: usize = 20_000;

/// The seeded accounts as the backfill stored them.
pub(crate) struct Snapshot {
    repos: Vec<RepoEntry>,
    records: Vec<Record>,
}

impl Snapshot {
    /// Reads the rows and records of `dids` from `store`.
    pub(crate) fn take(store: &Store, dids: &[Did]) -> anyhow::Result<Snapshot> {
        let mut repos = Vec::with_capacity(dids.len());
        let mut records = Vec::new();
        for did in dids {
            repos.push(
                store
                    .repo(did)?
                    .with_context(|| format!("{did} is not in the store"))?,
            );
            records.extend(store.records(did, None, None, usize::MAX, false)?);
        }
        ensure!(
            !records.is_empty(),
            "the seeded accounts hold no records to copy"
        );
        Ok(Snapshot { repos, records })
    }
}

/// One store pass over a store tracking `repos` in all.
pub(crate) struct Scaled {
    repos: u64,
    records: u64,
    fill_seconds: f64,
    pass: PassResult,
}

impl Scaled {
    pub(crate) fn rate(&self, commits: u64) -> f64 {
        commits as f64 / self.pass.seconds
    }

    pub(crate) fn label(&self) -> String {
        format!(
            "… with {} repos, {} records stored",
            super::thousands(self.repos as f64),
            super::thousands(self.records as f64)
        )
    }

    pub(crate) fn seconds(&self) -> f64 {
        self.pass.seconds
    }

    pub(crate) fn json(&self, commits: u64) -> Json {
        json!({
            "repos": self.repos,
            "records": self.records,
            "fill_seconds": self.fill_seconds,
            "store_seconds": self.pass.seconds,
            "commits_per_second": self.rate(commits),
        })
    }
}

/// How large a store [`pass`] fills.
pub(crate) struct Sizes {
    /// Repos tracked in all.
    pub(crate) repos: u64,
    /// Records of each filler repo.
    pub(crate) records_each: usize,
}

/// Fills a fresh store in `dir` to `sizes`, replays `frames` through an engine over it
/// (profiled through `perf_ctl` when given) and checks the mirror as the first pass does.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn pass(
    devnet: &Devnet,
    snapshot: &Snapshot,
    dir: &Path,
    sizes: Sizes,
    workers: usize,
    frames: &[Vec<u8>],
    commits: u64,
    perf_ctl: Option<&Path>,
) -> anyhow::Result<Scaled> {
    let (tracked, records_each) = (sizes.repos, sizes.records_each);
    let filler = tracked.saturating_sub(snapshot.repos.len() as u64);
    progress(&format!(
        "filling a store with {filler} more repos × {records_each} records"
    ));
    let engine = engine_on(devnet, workers, dir)?;
    let started = Instant::now();
    fill(engine.store(), snapshot, filler, records_each)?;
    let mut batch = engine.store().batch();
    for repo in &snapshot.repos {
        batch.put_repo(repo);
    }
    for record in &snapshot.records {
        batch.put_record_known(record, false);
    }
    batch.commit()?;
    engine.store().persist()?;
    let fill_seconds = started.elapsed().as_secs_f64();
    // A store that has tracked this many repos for a while has its tables compacted: the
    // pass measures that, not the flushes and compactions the bulk load left behind.
    let store = engine.store().clone();
    let idle = tokio::task::spawn_blocking(move || {
        store.wait_idle(Duration::from_secs(2), Duration::from_secs(900))
    })
    .await?;
    ensure!(
        idle,
        "the store did not settle within 15 minutes of the fill"
    );
    let repos = engine.store().repo_count()?;
    let records = engine.store().record_count();

    let tasks = engine.start()?;
    let dids: Vec<Did> = snapshot.repos.iter().map(|repo| repo.did.clone()).collect();
    warm_identities(&engine, &dids).await?;
    progress(&format!(
        "store pass over {repos} repos and {records} records"
    ));
    let mut perf = PerfControl::start(perf_ctl)?;
    let pass = replay(frames, workers, Pass::Store(engine.clone())).await?;
    PerfControl::stop(perf.as_mut())?;
    let counters = engine.counters();
    let applied = counters.commits_applied.load(Ordering::Relaxed);
    ensure!(
        applied == commits && pass.invalid == 0,
        "with {repos} repos the engine applied {applied} of {commits} commits ({} invalid)",
        pass.invalid
    );
    check_mirror(devnet, engine.store())?;
    ensure!(
        engine.store().count_in_state(RepoState::Synced)? == repos,
        "with {repos} repos, some filler repo left the synced state"
    );
    engine.shutdown();
    drop(tasks);
    drop(engine);
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(Scaled {
        repos,
        records,
        fill_seconds,
        pass,
    })
}

/// Writes `count` synced repos, each with `records_each` of the snapshot's records under
/// its own DID. DIDs are spread over the keyspace as real PLC DIDs are.
fn fill(store: &Store, snapshot: &Snapshot, count: u64, records_each: usize) -> anyhow::Result<()> {
    let template = snapshot
        .repos
        .first()
        .context("the snapshot holds no repos")?;
    let mut batch = store.batch();
    let mut next = 0usize;
    for index in 0..count {
        let did = filler_did(index)?;
        let mut repo = template.clone();
        repo.did = did.clone();
        repo.state = RepoState::Synced;
        repo.handle = None;
        batch.put_repo(&repo);
        for n in 0..records_each {
            let source = &snapshot.records[next % snapshot.records.len()];
            next += 1;
            // The rkey is made unique per repo; the collection and bytes are the source's.
            let rkey: RecordKey = format!("{}{n}", source.rkey().as_str())
                .parse()
                .or_else(|_| format!("r{index}x{n}").parse())
                .context("making a filler record key")?;
            let record = Record::new(
                did.clone(),
                source.collection().clone(),
                rkey,
                source.cid(),
                source.bytes().to_vec(),
            )?;
            batch.put_record_known(&record, false);
        }
        if batch.len() >= FILL_BATCH {
            std::mem::replace(&mut batch, store.batch()).commit()?;
        }
    }
    batch.commit()?;
    Ok(())
}

/// A `did:plc` whose 24 base32 characters are `index` mixed (splitmix64), so filler repos
/// land all over the repo keyspace rather than in one corner of it.
fn filler_did(index: u64) -> anyhow::Result<Did> {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (high, low) = (mix(index), mix(index ^ 0x5555_5555_5555_5555));
    let bits = (u128::from(high) << 64) | u128::from(low);
    let suffix: String = (0..24)
        .map(|i| char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]))
        .collect();
    format!("did:plc:{suffix}")
        .parse()
        .context("making a filler DID")
}
