//! `sync-bench`: the sync engine's throughput on a devnet, beside @atproto/sync and @atproto/repo.
//!
//! Three modes, each printing a human table and one JSON line of figures:
//!
//! - `sync-bench firehose`: a devnet is seeded and backfilled into a store on disk, then live
//!   traffic is written, the relay's `subscribeRepos` frames are recorded as raw bytes, and
//!   the frames are replayed through [`Engine::process`] the way the engine's firehose does
//!   it (one reader decodes and hands each event to the worker its DID hashes to). Timed:
//!   decode → Sync 1.1 verification → chain → store batch with the outbox events. Two
//!   passes before it, decoding alone and verifying without the store, show where the time
//!   goes. Afterwards every repo's stored rev and records must equal its PDS's.
//! - `sync-bench backfill`: the engine backfills every seeded repo (`getRepo` → verify →
//!   store), timed from `add_repos` until all are synced; the same CARs are then saved to
//!   files and verified from memory by atpdb, one thread and all cores.
//! - `sync-bench channel`: events/s over `/channel` to 1 and 4 acking clients beside the
//!   engine's ingest rate, and both at once (see `sync-bench/channel.rs`).
//!
//! With `--compare-ts` the same recorded frames go through `@atproto/sync`'s `Firehose`
//! (`crates/bench/interop/firehose.mjs`) and the same CAR files through `@atproto/repo`'s
//! `verifyRepoCar` (`crates/bench/interop/backfill.mjs`), and the ratios are printed.
//!
//! Identities are resolved before any timed pass: in steady state the cache is warm.

#[path = "sync-bench/channel.rs"]
mod channel;
#[path = "sync-bench/fleet.rs"]
mod fleet;
#[path = "sync-bench/tracked.rs"]
mod tracked;

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use atpdb_bench::{Car, verify_atpdb};
use atpdb_devnet::pds::Pds;
use atpdb_devnet::traffic::SeededAccount;
use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_identity::Network;
use atpdb_net::XrpcConfig;
use atpdb_repo::firehose::{CommitProof, Frame, Message, decode_frame};
use atpdb_repo::repo::Write;
use atpdb_repo::sample::{SampleRng, sample_record};
use atpdb_repo::syntax::Did;
use atpdb_repo::value::Value;
use atpdb_store::{RepoState, Store};
use atpdb_sync::{Engine, EngineConfig, EngineTasks};
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use serde_json::{Value as Json, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

// atpdb ships with mimalloc (crates/atpdb/src/main.rs), so the engine is measured with it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `atpdb serve`'s purge delay (`PURGE_DELAY_MS` in crates/atpdb/src/main.rs, which says
/// why): the engine is measured with the allocator settings it ships with. Earlier
/// versions of this bench kept mimalloc's default while serve purged at once, and serve's
/// backfill ran 15–25% slower than the figure this printed.
const SERVE_PURGE_DELAY_MS: std::ffi::c_long = 2;

#[allow(unsafe_code)]
fn allocate_as_serve_does() {
    /// `mi_option_purge_delay` in mimalloc v2's `mimalloc.h`.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: as in crates/atpdb/src/main.rs: an option's value in mimalloc's option
    // table, no pointers involved.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, SERVE_PURGE_DELAY_MS) }
}

/// Events queued per worker before the reader waits, as in the engine's firehose.
const WORKER_QUEUE: usize = 512;

/// Records' creation times of the live traffic start here (2025-06-01), 1 ms apart.
const TRAFFIC_EPOCH_MICROS: u64 = 1_748_736_000_000_000;

/// The sync engine's throughput on a devnet, beside the TypeScript reference packages.
#[derive(Debug, Parser)]
#[command(name = "sync-bench")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Backfill, record live traffic from the relay, then time replaying it through the
    /// engine (decode → verify → store → outbox).
    Firehose(FirehoseArgs),
    /// Time the engine backfilling every repo (getRepo → verify → store).
    Backfill(BackfillArgs),
    /// Events/s delivered over /channel with acks to 1 and 4 clients, beside the rate the
    /// engine writes them (and both at once).
    Channel(ChannelArgs),
    /// Records/s through the fleet's Redis Streams into PostgreSQL: backfill workers,
    /// indexers, and both at once.
    Fleet(fleet::FleetArgs),
}

#[derive(Debug, Args)]
struct Common {
    /// PDS hosts of the devnet.
    #[arg(long, default_value_t = 2)]
    pds_hosts: usize,
    /// Engine workers: firehose workers (events hashed by DID) and resync workers.
    /// Default: 2 × cores.
    #[arg(long)]
    workers: Option<usize>,
    /// Where the store, the frames and the CARs go (default: a temporary directory, removed
    /// at the end). Must not hold a store already.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print only the JSON line.
    #[arg(long)]
    json: bool,
    /// Also run the TypeScript side on the same frames or CARs and print the ratios.
    #[arg(long)]
    compare_ts: bool,
    /// The directory holding the interop `node_modules` (see crates/devnet/interop/setup.sh).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../devnet/interop"))]
    interop_dir: PathBuf,
    /// Seed of the devnet's accounts and of the traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A `perf record --control=fifo:PATH -D -1` control FIFO: profiling is enabled only for
    /// the headline pass (the store pass of `firehose`, the engine's backfill of `backfill`),
    /// not for the setup around it.
    #[arg(long, value_name = "PATH")]
    perf_ctl: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct FirehoseArgs {
    #[command(flatten)]
    common: Common,
    /// Accounts seeded.
    #[arg(long, default_value_t = 1000)]
    accounts: usize,
    /// Records per seeded account (plus a profile).
    #[arg(long, default_value_t = 10)]
    records: usize,
    /// Live commits written, recorded and replayed (one create, update or delete each).
    #[arg(long, default_value_t = 20_000)]
    commits: u64,
    /// Threads writing the live traffic.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Node processes for the TypeScript side, each given the frames of the DIDs that hash to
    /// it (one process uses one core for verification).
    #[arg(long, default_value_t = 1)]
    ts_procs: usize,
    /// Only the verification pass: no store pass and no rev check.
    #[arg(long)]
    no_store: bool,
    /// Repeat the store pass over fresh stores tracking this many repos in all (for example
    /// `10000,100000,1000000`): the seeded accounts plus filler repos the traffic never
    /// touches, to show how the rate holds as the store grows.
    #[arg(long, value_delimiter = ',', conflicts_with = "no_store")]
    tracked: Vec<u64>,
    /// Records stored for each filler repo of `--tracked`.
    #[arg(long, default_value_t = 10)]
    tracked_records: usize,
}

#[derive(Debug, Args)]
struct BackfillArgs {
    #[command(flatten)]
    common: Common,
    /// Accounts seeded and backfilled.
    #[arg(long, default_value_t = 200)]
    accounts: usize,
    /// Records per seeded account (plus a profile).
    #[arg(long, default_value_t = 500)]
    records: usize,
    /// Backfills timed, each into a fresh store from the same devnet; the figures are
    /// their median (on a shared machine one run can be a quarter off).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

#[derive(Debug, Args)]
struct ChannelArgs {
    #[command(flatten)]
    common: Common,
    /// Accounts seeded and backfilled.
    #[arg(long, default_value_t = 200)]
    accounts: usize,
    /// Records per seeded account (plus a profile): each becomes one event.
    #[arg(long, default_value_t = 1000)]
    records: usize,
    /// Acking clients of each delivery pass.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    clients: Vec<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    allocate_as_serve_does();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sync-bench: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.mode {
            Mode::Firehose(args) => firehose(args).await,
            Mode::Backfill(args) => backfill(args).await,
            Mode::Channel(args) => channel::run(args).await,
            Mode::Fleet(args) => fleet::run(args).await,
        }
    });
    // The devnet's servers and the engine's idle workers are dropped with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("sync-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn progress(message: &str) {
    eprintln!("sync-bench: {message}");
}

/// Where the run writes: the given directory, or a temporary one removed at the end.
struct WorkDir {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl WorkDir {
    fn new(given: Option<&Path>) -> anyhow::Result<WorkDir> {
        match given {
            Some(path) => {
                std::fs::create_dir_all(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                Ok(WorkDir {
                    path: path.to_owned(),
                    _temp: None,
                })
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("sync-bench-")
                    .tempdir()
                    .context("creating a temporary directory")?;
                Ok(WorkDir {
                    path: temp.path().to_owned(),
                    _temp: Some(temp),
                })
            }
        }
    }
}

/// The devnet with an engine over a fresh store, wired as `atpdb serve` wires them.
struct Harness {
    devnet: Devnet,
    engine: Engine,
    tasks: EngineTasks,
    dids: Vec<Did>,
}

/// An engine over a fresh store in `store_dir`, wired to the devnet as `atpdb serve` wires
/// it, with its firehose off (the passes drive it).
fn engine_on(devnet: &Devnet, workers: usize, store_dir: &Path) -> anyhow::Result<Engine> {
    std::fs::create_dir_all(store_dir)
        .with_context(|| format!("creating {}", store_dir.display()))?;
    let store = Store::open(store_dir)
        .with_context(|| format!("opening the store in {}", store_dir.display()))?;
    ensure!(
        store.repo_count()? == 0,
        "{} already holds a store; give an empty --data-dir",
        store_dir.display()
    );
    // The per-host limits protect real PDSes; two loopback hosts would only measure them.
    let mut network = devnet.network_config();
    network.xrpc = XrpcConfig {
        max_concurrency_per_host: workers.max(8),
        requests_per_second: 0.0,
        ..XrpcConfig::default()
    };
    let network = Network::new(network)?;
    let relay_url = devnet
        .relay()
        .context("the devnet has no relay")?
        .url()
        .to_owned();
    let engine = Engine::new(
        EngineConfig {
            relay_url,
            resync_parallelism: workers,
            firehose_parallelism: workers,
            follow_firehose: false,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            // The default idle poll: a shorter one has idle resync workers rescan the
            // state index (tombstones included) often enough to show in the profile.
            ..EngineConfig::default()
        },
        store,
        network,
    );
    Ok(engine)
}

/// Adds `dids` to the engine and waits until all are synced; returns the seconds it took.
async fn backfill_into(
    engine: &Engine,
    tasks: &mut EngineTasks,
    dids: &[Did],
) -> anyhow::Result<f64> {
    let started = Instant::now();
    engine.add_repos(dids).await?;
    let total = dids.len() as u64;
    let deadline = started + Duration::from_secs(1800);
    loop {
        if let Some(ended) = tasks.try_join_next() {
            bail!("an engine task ended during the backfill: {ended:?}");
        }
        let store = engine.store();
        if store.count_in_state(RepoState::Synced)? == total {
            return Ok(started.elapsed().as_secs_f64());
        }
        let failed = store.count_in_state(RepoState::Error)?;
        if failed > 0 {
            let example = store.repos_in_state(RepoState::Error, 3)?;
            bail!(
                "{failed} repos failed to backfill, e.g. {:?}",
                example
                    .iter()
                    .map(|e| (e.did.to_string(), e.error.clone()))
                    .collect::<Vec<_>>()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "the backfill did not finish in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Harness {
    async fn start(
        common: &Common,
        accounts: usize,
        records: usize,
        work: &WorkDir,
    ) -> anyhow::Result<(Harness, f64)> {
        let workers = common.workers.unwrap_or(2 * cores()).max(1);
        progress(&format!(
            "seeding a devnet: {accounts} accounts × {records} records on {} PDS hosts",
            common.pds_hosts
        ));
        let started = Instant::now();
        let devnet = Devnet::start(DevnetConfig {
            pds_hosts: common.pds_hosts.max(1),
            accounts,
            records,
            seed: common.seed,
            ready_timeout: Duration::from_secs(600),
            ..DevnetConfig::default()
        })
        .await
        .context("starting the devnet")?;
        let seed_seconds = started.elapsed().as_secs_f64();
        let engine = engine_on(&devnet, workers, &work.path.join("store"))?;
        let tasks = engine.start()?;
        let dids = devnet.accounts().iter().map(|a| a.did.clone()).collect();
        Ok((
            Harness {
                devnet,
                engine,
                tasks,
                dids,
            },
            seed_seconds,
        ))
    }

    fn host_of(&self, account: &SeededAccount) -> anyhow::Result<&Pds> {
        self.devnet
            .hosts()
            .get(account.pds)
            .with_context(|| format!("{}: no PDS host {}", account.did, account.pds))
    }

    /// Adds every account and waits until all are synced; returns the seconds it took.
    async fn backfill_all(&mut self) -> anyhow::Result<f64> {
        backfill_into(&self.engine, &mut self.tasks, &self.dids).await
    }

    /// Resolves every account's identity, so timed passes find the cache warm.
    async fn warm_identities(&self) -> anyhow::Result<()> {
        warm_identities(&self.engine, &self.dids).await
    }

    /// Fails loudly unless every repo is synced at its PDS's rev with its PDS's records.
    fn check_mirror(&self) -> anyhow::Result<u64> {
        check_mirror(&self.devnet, self.engine.store())
    }
}

/// Resolves every DID's identity through `engine`, so timed passes find the cache warm.
async fn warm_identities(engine: &Engine, dids: &[Did]) -> anyhow::Result<()> {
    for did in dids {
        engine
            .identity()
            .resolve(did)
            .await
            .with_context(|| format!("resolving {did}"))?;
    }
    Ok(())
}

/// Fails loudly unless every devnet account is synced in `store` at its PDS's rev with its
/// PDS's records; returns how many records that is.
fn check_mirror(devnet: &Devnet, store: &Store) -> anyhow::Result<u64> {
    let mut records = 0;
    for account in devnet.accounts() {
        let host = devnet
            .hosts()
            .get(account.pds)
            .with_context(|| format!("{}: no PDS host {}", account.did, account.pds))?;
        let info = host.account_info(&account.did)?;
        let entry = store
            .repo(&account.did)?
            .with_context(|| format!("{} is not in the store", account.did))?;
        ensure!(
            entry.state == RepoState::Synced,
            "{} is {:?} ({:?}), not synced",
            account.did,
            entry.state,
            entry.error
        );
        ensure!(
            entry.rev.as_deref() == Some(info.rev.as_str()),
            "{}: stored rev {:?}, PDS rev {}",
            account.did,
            entry.rev,
            info.rev
        );
        let truth: BTreeMap<String, atpdb_repo::Cid> =
            host.account_records(&account.did)?.into_iter().collect();
        let stored: BTreeMap<String, atpdb_repo::Cid> = store
            .records(&account.did, None, None, usize::MAX, false)?
            .into_iter()
            .map(|record| (record.path(), record.cid()))
            .collect();
        if stored != truth {
            let missing = truth.keys().filter(|k| !stored.contains_key(*k)).count();
            let extra = stored.keys().filter(|k| !truth.contains_key(*k)).count();
            bail!(
                "{}: stored records differ from the PDS's ({} stored, {} at the PDS, \
                     {missing} missing, {extra} extra)",
                account.did,
                stored.len(),
                truth.len()
            );
        }
        records += truth.len() as u64;
    }
    Ok(records)
}

// ---------------------------------------------------------------------------------------
// firehose

async fn firehose(args: FirehoseArgs) -> anyhow::Result<ExitCode> {
    let common = &args.common;
    let workers = common.workers.unwrap_or(2 * cores()).max(1);
    let work = WorkDir::new(common.data_dir.as_deref())?;
    let (mut harness, seed_seconds) =
        Harness::start(common, args.accounts, args.records, &work).await?;
    progress("backfilling every repo before the live traffic");
    let backfill_seconds = harness.backfill_all().await?;
    harness.warm_identities().await?;

    let relay = harness
        .devnet
        .relay()
        .context("the devnet has no relay")?
        .clone();
    let cursor = relay.head_seq();
    progress(&format!(
        "writing {} live commits from {} threads",
        args.commits, args.writers
    ));
    let started = Instant::now();
    let hosts = harness.devnet.hosts().to_vec();
    let accounts = harness.devnet.accounts().to_vec();
    let (commits, writers, seed) = (args.commits, args.writers.max(1), common.seed);
    tokio::task::spawn_blocking(move || write_traffic(&hosts, &accounts, commits, writers, seed))
        .await
        .context("the traffic writer panicked")??;
    let write_seconds = started.elapsed().as_secs_f64();
    ensure!(
        harness
            .devnet
            .wait_for_relay(Duration::from_secs(600))
            .await,
        "the relay did not take in the traffic within 10 minutes"
    );
    let relay_seconds = started.elapsed().as_secs_f64();
    let head = relay.head_seq();
    progress(&format!(
        "wrote {} commits in {write_seconds:.1} s; the relay had them after {relay_seconds:.1} s; \
         recording frames {}..={head}",
        args.commits,
        cursor + 1
    ));
    let frames = record_frames(relay.url(), cursor, head).await?;
    let frame_bytes: usize = frames.iter().map(Vec::len).sum();
    let frames_file = work.path.join("frames.bin");
    save_frames(&frames_file, &frames)?;

    // Decoding alone, on one thread: the reader's share, which does not parallelise.
    let started = Instant::now();
    let mut n_commits = 0u64;
    for frame in &frames {
        if let Frame::Message(Message::Commit(_)) =
            decode_frame(frame).context("a recorded frame does not decode")?
        {
            n_commits += 1;
        }
    }
    let decode_seconds = started.elapsed().as_secs_f64();
    ensure!(
        n_commits == args.commits,
        "the relay served {n_commits} #commit frames for {} commits written",
        args.commits
    );

    progress("pass 1: decode → verify (no store)");
    let verify = replay(&frames, workers, Pass::Verify(harness.engine.clone())).await?;
    ensure!(
        verify.invalid == 0,
        "{} commits failed verification alone; first: {}",
        verify.invalid,
        verify.first_error.as_deref().unwrap_or("?")
    );

    let mut store_pass = None;
    let snapshot = if args.tracked.is_empty() {
        None
    } else {
        Some(tracked::Snapshot::take(
            harness.engine.store(),
            &harness.dids,
        )?)
    };
    if !args.no_store {
        progress("pass 2: decode → verify → store → outbox (Engine::process)");
        let events_before = harness.engine.store().last_event_id();
        // With --tracked, the last of those passes is the one profiled.
        let perf_ctl = common
            .perf_ctl
            .as_deref()
            .filter(|_| args.tracked.is_empty());
        let mut perf = PerfControl::start(perf_ctl)?;
        let pass = replay(&frames, workers, Pass::Store(harness.engine.clone())).await?;
        PerfControl::stop(perf.as_mut())?;
        let events_written = harness.engine.store().last_event_id() - events_before;
        let counters = harness.engine.counters();
        let applied = counters.commits_applied.load(Ordering::Relaxed);
        let invalid = counters.commits_invalid.load(Ordering::Relaxed);
        let stale = counters.commits_stale.load(Ordering::Relaxed);
        let desyncs = counters.desyncs.load(Ordering::Relaxed);
        ensure!(
            applied == n_commits && invalid == 0 && stale == 0 && desyncs == 0,
            "the engine applied {applied} of {n_commits} commits ({invalid} invalid, \
             {stale} stale, {desyncs} desynchronized repos)"
        );
        progress("checking every repo's rev and records against its PDS");
        let records = harness.check_mirror()?;
        store_pass = Some((pass, events_written, records));
    }
    harness.engine.shutdown();
    let mut scaled = Vec::new();
    if let Some(snapshot) = &snapshot {
        for (index, &repos) in args.tracked.iter().enumerate() {
            let profiled = index + 1 == args.tracked.len();
            scaled.push(
                tracked::pass(
                    &harness.devnet,
                    snapshot,
                    &work.path.join(format!("tracked-{index}")),
                    tracked::Sizes {
                        repos,
                        records_each: args.tracked_records,
                    },
                    workers,
                    &frames,
                    n_commits,
                    common.perf_ctl.as_deref().filter(|_| profiled),
                )
                .await?,
            );
        }
    }

    let ts = if common.compare_ts {
        let dids_file = work.path.join("dids.json");
        std::fs::write(
            &dids_file,
            serde_json::to_vec(&harness.dids.iter().map(Did::as_str).collect::<Vec<_>>())?,
        )
        .with_context(|| format!("writing {}", dids_file.display()))?;
        progress(&format!(
            "running @atproto/sync's Firehose over the same frames in {} node process(es)",
            args.ts_procs.max(1)
        ));
        let shards = if args.ts_procs > 1 {
            shard_frames(&frames, args.ts_procs, &work.path)?
        } else {
            vec![(frames_file.clone(), n_commits)]
        };
        let mut runs = tokio::task::JoinSet::new();
        for (file, commits) in shards {
            let interop_dir = common.interop_dir.clone();
            let args: Vec<std::ffi::OsString> = vec![
                "--frames".into(),
                file.into(),
                "--dids".into(),
                dids_file.clone().into(),
                "--plc".into(),
                harness.devnet.plc_url().into(),
                "--commits".into(),
                commits.to_string().into(),
            ];
            runs.spawn(async move { run_node(&interop_dir, "firehose.mjs", &args).await });
        }
        let mut outcomes = Vec::new();
        while let Some(outcome) = runs.join_next().await {
            outcomes.push(outcome.unwrap_or_else(|err| {
                TsOutcome::Failed(format!("waiting for a node process: {err}"))
            }));
        }
        TsOutcome::combine(outcomes)
    } else {
        TsOutcome::NotRun("--compare-ts was not given".to_owned())
    };

    let rate = |seconds: f64| n_commits as f64 / seconds;
    let ts_rate = ts.figure("commits_per_second");
    let full_rate = store_pass.as_ref().map(|(pass, _, _)| rate(pass.seconds));
    let report = json!({
        "mode": "firehose",
        "accounts": args.accounts,
        "records": args.records,
        "pds_hosts": common.pds_hosts,
        "commits": n_commits,
        "frames": frames.len(),
        "frame_bytes": frame_bytes,
        "workers": workers,
        "cores": cores(),
        "seed_seconds": seed_seconds,
        "backfill_seconds": backfill_seconds,
        "traffic_write_seconds": write_seconds,
        "decode_seconds": decode_seconds,
        "decode_commits_per_second": rate(decode_seconds),
        "verify_seconds": verify.seconds,
        "verify_commits_per_second": rate(verify.seconds),
        "store_seconds": store_pass.as_ref().map(|(pass, _, _)| pass.seconds),
        "commits_per_second": full_rate,
        "events_written": store_pass.as_ref().map(|(_, events, _)| events),
        "records_checked": store_pass.as_ref().map(|(_, _, records)| records),
        "ts": ts.json(),
        "ratio": full_rate.zip(ts_rate).map(|(ours, theirs)| ours / theirs),
        "ratio_verify_only": ts_rate.map(|theirs| rate(verify.seconds) / theirs),
        "tracked": scaled.iter().map(|pass| pass.json(n_commits)).collect::<Vec<_>>(),
    });
    if !common.json {
        let mut table = Table::new(&format!(
            "firehose: {n_commits} live commits ({} frames, {:.1} MB) over {} accounts × {} records, \
             {} PDS hosts; {workers} workers on {} cores",
            frames.len(),
            frame_bytes as f64 / 1e6,
            args.accounts,
            args.records,
            common.pds_hosts,
            cores()
        ));
        table.row(
            "decode only (1 thread)",
            decode_seconds,
            rate(decode_seconds),
        );
        table.row(
            "decode → verify (no store)",
            verify.seconds,
            rate(verify.seconds),
        );
        if let Some((pass, events, records)) = &store_pass {
            table.row(
                "decode → verify → store → outbox",
                pass.seconds,
                rate(pass.seconds),
            );
            table.note(&format!(
                "{events} outbox events written; every repo's rev and {records} records equal its PDS's"
            ));
            for pass_at in &scaled {
                table.row(&pass_at.label(), pass_at.seconds(), pass_at.rate(n_commits));
                table.note(&format!(
                    "{:.2}× the rate over the seeded accounts alone; every seeded repo checked again",
                    pass_at.rate(n_commits) / rate(pass.seconds)
                ));
            }
        }
        table.ts(
            &ts,
            &format!(
                "@atproto/sync Firehose ({} node process(es))",
                args.ts_procs.max(1)
            ),
            "commits_per_second",
        );
        if let Some(theirs) = ts_rate {
            if let Some(ours) = full_rate {
                table.note(&format!(
                    "ratio atpdb / @atproto/sync, full path: {:.1}×",
                    ours / theirs
                ));
            }
            table.note(&format!(
                "ratio atpdb / @atproto/sync, verification only: {:.1}×",
                rate(verify.seconds) / theirs
            ));
        }
        table.note(&format!(
            "setup: seeding {seed_seconds:.1} s, backfill {backfill_seconds:.1} s, \
             writing the traffic {write_seconds:.1} s"
        ));
        table.print();
    }
    println!("{report}");
    Ok(ts.exit_code())
}

/// Writes `commits` single-op commits (60 % creates, 25 % updates, 15 % deletes) straight
/// into the PDS hosts from `threads` threads, each owning a share of the accounts.
fn write_traffic(
    hosts: &[Pds],
    accounts: &[SeededAccount],
    commits: u64,
    threads: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let claimed = AtomicU64::new(0);
    let others: Vec<Did> = accounts.iter().take(64).map(|a| a.did.clone()).collect();
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..threads.min(accounts.len().max(1)))
            .map(|thread| {
                let (claimed, others) = (&claimed, &others);
                scope.spawn(move || -> anyhow::Result<()> {
                    let mine: Vec<(usize, &SeededAccount)> = accounts
                        .iter()
                        .enumerate()
                        .filter(|(index, _)| index % threads == thread)
                        .collect();
                    let mut paths = Vec::with_capacity(mine.len());
                    for (_, account) in &mine {
                        let host = hosts.get(account.pds).context("no such PDS host")?;
                        paths.push(host.account_paths(&account.did)?);
                    }
                    let mut rng = SampleRng::new(seed ^ 0x5eed_0000 ^ thread as u64);
                    loop {
                        let claim = claimed.fetch_add(1, Ordering::Relaxed);
                        if claim >= commits || mine.is_empty() {
                            return Ok(());
                        }
                        let at = rng.below(mine.len() as u64) as usize;
                        let ((index, account), paths) = (&mine[at], &mut paths[at]);
                        let host = hosts.get(account.pds).context("no such PDS host")?;
                        let account_seed = seed.wrapping_mul(1_000_003).wrapping_add(*index as u64);
                        let micros = TRAFFIC_EPOCH_MICROS + claim * 1000;
                        let roll = rng.below(100);
                        let write = if roll < 60 || paths.is_empty() {
                            let record = sample_record(account_seed, claim, micros, others);
                            let path = record.path();
                            let write = Write::Create {
                                path: path.clone(),
                                record: record.to_cbor()?,
                            };
                            paths.push(path);
                            write
                        } else if roll < 85 {
                            let path = paths[rng.below(paths.len() as u64) as usize].clone();
                            updated(account_seed, claim, micros, path)?
                        } else {
                            let victim = rng.below(paths.len() as u64) as usize;
                            Write::Delete {
                                path: paths.swap_remove(victim),
                            }
                        };
                        host.write(&account.did, std::slice::from_ref(&write), None)
                            .with_context(|| {
                                format!("writing {} to {}", write.path(), account.did)
                            })?;
                    }
                })
            })
            .collect();
        for writer in writers {
            writer
                .join()
                .map_err(|_| anyhow::anyhow!("a traffic thread panicked"))??;
        }
        Ok(())
    })
}

/// A new version of the record at `path`: same collection, fresh content.
fn updated(account_seed: u64, index: u64, micros: u64, path: String) -> anyhow::Result<Write> {
    let (collection, _) = path
        .split_once('/')
        .with_context(|| format!("bad record path {path}"))?;
    let mut record = sample_record(account_seed, index, micros, &[]).json;
    record["$type"] = json!(collection);
    if record.get("text").is_none() {
        record["text"] = json!(format!("edited {index}"));
    }
    let record = Value::from_json(&record)?.to_cbor();
    Ok(Write::Update { path, record })
}

/// Reads the relay's `subscribeRepos` from after `cursor` through `head`, frames as sent.
async fn record_frames(relay_url: &str, cursor: u64, head: u64) -> anyhow::Result<Vec<Vec<u8>>> {
    let ws_url = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos?cursor={cursor}",
        relay_url
            .trim_end_matches('/')
            .replacen("http://", "ws://", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(ws_url.as_str())
        .await
        .with_context(|| format!("connecting to {ws_url}"))?;
    let mut frames = Vec::with_capacity((head - cursor) as usize);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while frames.len() < (head - cursor) as usize {
        let next = tokio::time::timeout_at(deadline, socket.next())
            .await
            .context("the relay did not replay the traffic within 10 minutes")?;
        let bytes = match next {
            Some(Ok(WsMessage::Binary(bytes))) => bytes.to_vec(),
            Some(Ok(WsMessage::Close(close))) => bail!("the relay closed the stream: {close:?}"),
            Some(Ok(_)) => continue,
            Some(Err(err)) => bail!("reading {ws_url}: {err}"),
            None => bail!("the relay ended the stream after {} frames", frames.len()),
        };
        match decode_frame(&bytes).context("the relay sent a frame that does not decode")? {
            Frame::Message(message) => {
                let seq = message.seq().unwrap_or(0);
                frames.push(bytes);
                if seq >= head {
                    break;
                }
            }
            Frame::Error { error, message } => {
                bail!("the relay sent an error frame: {error} {message:?}")
            }
            Frame::Unknown { .. } => {}
        }
    }
    let _ = socket.close(None).await;
    Ok(frames)
}

/// Splits `frames` by DID over `shards` files in `dir` (all of one DID's frames in one file,
/// in order); returns each file with its `#commit` count.
fn shard_frames(
    frames: &[Vec<u8>],
    shards: usize,
    dir: &Path,
) -> anyhow::Result<Vec<(PathBuf, u64)>> {
    let hasher = std::collections::hash_map::RandomState::new();
    let mut split: Vec<(Vec<Vec<u8>>, u64)> = (0..shards).map(|_| (Vec::new(), 0)).collect();
    for frame in frames {
        let Frame::Message(message) = decode_frame(frame)? else {
            continue;
        };
        let Some(did) = message.did() else { continue };
        let index = (hasher.hash_one(did.as_str()) % shards as u64) as usize;
        let Some((shard, commits)) = split.get_mut(index) else {
            continue;
        };
        shard.push(frame.clone());
        *commits += u64::from(matches!(message, Message::Commit(_)));
    }
    let mut files = Vec::with_capacity(shards);
    for (index, (shard, commits)) in split.into_iter().enumerate() {
        let file = dir.join(format!("frames-{index}-of-{shards}.bin"));
        save_frames(&file, &shard)?;
        files.push((file, commits));
    }
    Ok(files)
}

/// The control FIFO of `perf record --control=fifo:PATH`.
struct PerfControl {
    fifo: std::fs::File,
    path: PathBuf,
}

impl PerfControl {
    /// Opens the FIFO at `path`, if given, and enables profiling.
    fn start(path: Option<&Path>) -> anyhow::Result<Option<PerfControl>> {
        let Some(path) = path else { return Ok(None) };
        let fifo = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening the perf control FIFO {}", path.display()))?;
        let mut control = PerfControl {
            fifo,
            path: path.to_owned(),
        };
        control.send("enable")?;
        Ok(Some(control))
    }

    /// Disables profiling again.
    fn stop(control: Option<&mut PerfControl>) -> anyhow::Result<()> {
        control.map_or(Ok(()), |control| control.send("disable"))
    }

    fn send(&mut self, command: &str) -> anyhow::Result<()> {
        writeln!(self.fifo, "{command}")
            .with_context(|| format!("writing {command} to {}", self.path.display()))
    }
}

/// Writes frames as `u32` little-endian length, then the bytes: what firehose.mjs replays.
fn save_frames(path: &Path, frames: &[Vec<u8>]) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    for frame in frames {
        out.write_all(&u32::try_from(frame.len())?.to_le_bytes())?;
        out.write_all(frame)?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// What each worker does with a message.
#[derive(Clone)]
enum Pass {
    /// Sync 1.1 checks and the signature with the resolved key; nothing stored.
    Verify(Engine),
    /// [`Engine::process`]: verify, chain, one store batch with the outbox events.
    Store(Engine),
}

#[derive(Debug, Default)]
struct PassResult {
    seconds: f64,
    invalid: u64,
    first_error: Option<String>,
}

/// Decodes `frames` in order on one task and hands each message to the worker its DID
/// hashes to, as the engine's firehose reader does; returns when every worker is done.
async fn replay(frames: &[Vec<u8>], workers: usize, pass: Pass) -> anyhow::Result<PassResult> {
    let invalid = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let started = Instant::now();
    let mut senders = Vec::with_capacity(workers);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (sender, mut receiver) = mpsc::channel::<Message>(WORKER_QUEUE);
        senders.push(sender);
        let (pass, invalid, first_error) = (pass.clone(), invalid.clone(), first_error.clone());
        tasks.spawn(async move {
            while let Some(message) = receiver.recv().await {
                let outcome = match &pass {
                    Pass::Store(engine) => {
                        engine.process(message).await?;
                        Ok(())
                    }
                    Pass::Verify(engine) => verify_only(engine, message).await,
                };
                if let Err(err) = outcome {
                    invalid.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut first) = first_error.lock() {
                        first.get_or_insert(err);
                    }
                }
            }
            Ok::<(), atpdb_sync::SyncError>(())
        });
    }
    let hasher = std::collections::hash_map::RandomState::new();
    for frame in frames {
        let Frame::Message(message) = decode_frame(frame)? else {
            continue;
        };
        let Some(did) = message.did() else { continue };
        let index = (hasher.hash_one(did.as_str()) % workers as u64) as usize;
        let Some(sender) = senders.get(index) else {
            continue;
        };
        sender
            .send(message)
            .await
            .map_err(|_| anyhow::anyhow!("a worker stopped taking events"))?;
    }
    drop(senders);
    while let Some(ended) = tasks.join_next().await {
        ended.context("a worker panicked")??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let first_error = first_error.lock().ok().and_then(|mut first| first.take());
    Ok(PassResult {
        seconds,
        invalid: invalid.load(Ordering::Relaxed),
        first_error,
    })
}

/// The engine's verification of a `#commit` without the store: Sync 1.1 (blocks, ops, MST
/// inversion) and the signature with the cached key.
async fn verify_only(engine: &Engine, message: Message) -> Result<(), String> {
    let Message::Commit(event) = message else {
        return Ok(());
    };
    let identity = engine
        .identity()
        .resolve(&event.repo)
        .await
        .map_err(|err| format!("{}: {err}", event.repo))?;
    let proof = CommitProof::check(&event).map_err(|err| format!("{}: {err}", event.repo))?;
    let verified = proof
        .verify(&identity.key)
        .map_err(|err| format!("{}: {err}", event.repo))?;
    // The records a store pass would write, so the two passes differ by the store alone.
    verified
        .proof()
        .records()
        .map_err(|err| format!("{}: {err}", event.repo))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// backfill

async fn backfill(args: BackfillArgs) -> anyhow::Result<ExitCode> {
    let common = &args.common;
    let workers = common.workers.unwrap_or(2 * cores()).max(1);
    let work = WorkDir::new(common.data_dir.as_deref())?;
    let (mut harness, seed_seconds) =
        Harness::start(common, args.accounts, args.records, &work).await?;
    // The engine resolves every identity (and verifies every handle) as part of a backfill:
    // that stays inside the timed part, as it would on the network.
    progress(&format!(
        "backfilling {} repos with {workers} resync workers",
        harness.dids.len()
    ));
    let mut perf = PerfControl::start(common.perf_ctl.as_deref())?;
    let cpu_before = process_cpu_seconds()?;
    let first_seconds = harness.backfill_all().await?;
    let mut rounds = vec![(first_seconds, process_cpu_seconds()? - cpu_before)];
    PerfControl::stop(perf.as_mut())?;
    let records_stored = harness.engine.store().record_count();
    progress("checking every repo's rev and records against its PDS");
    let records_checked = harness.check_mirror()?;
    ensure!(
        records_stored == records_checked,
        "the store counts {records_stored} records, the PDSes hold {records_checked}"
    );
    harness.engine.shutdown();
    for round in 2..=args.rounds {
        progress(&format!(
            "round {round}: backfilling again into a fresh store"
        ));
        rounds.push(
            backfill_round(&harness, workers, &work.path.join(format!("store-{round}"))).await?,
        );
    }
    let median = |pick: fn(&(f64, f64)) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        let mid = values.len() / 2;
        if values.len() % 2 == 1 {
            values[mid]
        } else {
            (values[mid - 1] + values[mid]) / 2.0
        }
    };
    let backfill_seconds = median(|round| round.0);
    let backfill_cpu_seconds = median(|round| round.1);

    progress("saving every repo's CAR for the verification passes");
    let (cars, manifest_file) = save_cars(&harness, &work.path).await?;
    let car_bytes: usize = cars.iter().map(|(car, _)| car.bytes.len()).sum();
    let one_thread = verify_cars(&cars, 1)?;
    let all_cores = verify_cars(&cars, cores())?;

    let ts = if common.compare_ts {
        progress("running @atproto/repo's verifyRepoCar over the same CARs");
        run_node(
            &common.interop_dir,
            "backfill.mjs",
            &["--manifest".into(), manifest_file.clone().into()],
        )
        .await
    } else {
        TsOutcome::NotRun("--compare-ts was not given".to_owned())
    };

    let rate = |seconds: f64| records_stored as f64 / seconds;
    let ts_rate = ts.figure("records_per_second");
    let report = json!({
        "mode": "backfill",
        "accounts": args.accounts,
        "records": args.records,
        "pds_hosts": common.pds_hosts,
        "workers": workers,
        "cores": cores(),
        "seed_seconds": seed_seconds,
        "repos": harness.dids.len(),
        "records_stored": records_stored,
        "car_bytes": car_bytes,
        "backfill_seconds": backfill_seconds,
        "records_per_second": rate(backfill_seconds),
        "rounds": rounds
            .iter()
            .map(|(seconds, cpu)| json!({"seconds": seconds, "cpu_seconds": cpu}))
            .collect::<Vec<_>>(),
        "backfill_cpu_seconds": backfill_cpu_seconds,
        "records_per_cpu_second": rate(backfill_cpu_seconds),
        "verify_1_thread_seconds": one_thread,
        "verify_1_thread_records_per_second": rate(one_thread),
        "verify_all_cores_seconds": all_cores,
        "verify_all_cores_records_per_second": rate(all_cores),
        "ts": ts.json(),
        "ratio": ts_rate.map(|theirs| rate(backfill_seconds) / theirs),
        "ratio_verify_1_thread": ts_rate.map(|theirs| rate(one_thread) / theirs),
    });
    if !common.json {
        let mut table = Table::new(&format!(
            "backfill: {} repos, {records_stored} records ({:.1} MB of CAR) on {} PDS hosts; \
             {workers} resync workers on {} cores",
            harness.dids.len(),
            car_bytes as f64 / 1e6,
            common.pds_hosts,
            cores()
        ))
        .unit("records/s");
        table.row(
            "engine: getRepo → verify → store → outbox",
            backfill_seconds,
            rate(backfill_seconds),
        );
        table.row(
            "atpdb verify from memory, 1 thread",
            one_thread,
            rate(one_thread),
        );
        table.row(
            &format!("atpdb verify from memory, {} threads", cores()),
            all_cores,
            rate(all_cores),
        );
        if rounds.len() > 1 {
            table.note(&format!(
                "engine figure: median of {} backfills, each into a fresh store ({})",
                rounds.len(),
                rounds
                    .iter()
                    .map(|(seconds, _)| format!("{:.0}", rate(*seconds)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        table.note(&format!(
            "backfill used {backfill_cpu_seconds:.2} CPU-seconds in this process (engine and \
             devnet): {:.0} records per CPU-second",
            rate(backfill_cpu_seconds)
        ));
        table.note(&format!(
            "every repo's rev and {records_checked} records equal its PDS's"
        ));
        table.ts(
            &ts,
            "@atproto/repo verifyRepoCar (1 process)",
            "records_per_second",
        );
        if let Some(theirs) = ts_rate {
            table.note(&format!(
                "ratio atpdb engine / verifyRepoCar: {:.1}×; atpdb verify 1 thread / verifyRepoCar: {:.1}×",
                rate(backfill_seconds) / theirs,
                rate(one_thread) / theirs
            ));
        }
        table.note(&format!("setup: seeding {seed_seconds:.1} s"));
        table.print();
    }
    println!("{report}");
    Ok(ts.exit_code())
}

/// One more timed backfill of every account, into a fresh store in `dir` (removed after):
/// `(seconds, CPU-seconds)`.
async fn backfill_round(
    harness: &Harness,
    workers: usize,
    dir: &Path,
) -> anyhow::Result<(f64, f64)> {
    let engine = engine_on(&harness.devnet, workers, dir)?;
    let mut tasks = engine.start()?;
    let cpu_before = process_cpu_seconds()?;
    let seconds = backfill_into(&engine, &mut tasks, &harness.dids).await?;
    let cpu = process_cpu_seconds()? - cpu_before;
    check_mirror(&harness.devnet, engine.store())?;
    engine.shutdown();
    drop(tasks);
    drop(engine);
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok((seconds, cpu))
}

/// CPU time this process has used, user and system, from `/proc/self/stat`: what a pass
/// cost beside how long it took, which tells work removed from work that only moved off
/// the critical path (both swing with the host's load on a shared machine).
fn process_cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // Fields after the command name (which may hold spaces) start at the state, field 3;
    // utime and stime are fields 14 and 15, in clock ticks of 1/100 s on Linux.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("/proc/self/stat has no command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<f64> {
        let field = fields
            .get(index)
            .with_context(|| format!("/proc/self/stat has no field {}", index + 3))?;
        Ok(field.parse::<u64>()? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// Fetches every repo once with `getRepo` into `dir/cars`, and writes the manifest
/// backfill.mjs reads: file, DID, signing key and record count of each.
async fn save_cars(harness: &Harness, dir: &Path) -> anyhow::Result<(Vec<(Car, u64)>, PathBuf)> {
    let cars_dir = dir.join("cars");
    std::fs::create_dir_all(&cars_dir)
        .with_context(|| format!("creating {}", cars_dir.display()))?;
    let client = reqwest::Client::new();
    let mut cars = Vec::new();
    let mut manifest = Vec::new();
    for (index, account) in harness.devnet.accounts().iter().enumerate() {
        let host = harness.host_of(account)?;
        let url = format!(
            "{}/xrpc/com.atproto.sync.getRepo?did={}",
            host.url(),
            account.did
        );
        let response = client
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("GET {url}"))?;
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("reading {url}"))?;
        let file = cars_dir.join(format!("{index:06}.car"));
        std::fs::write(&file, &bytes).with_context(|| format!("writing {}", file.display()))?;
        let identity = harness.engine.identity().resolve(&account.did).await?;
        let records = host.account_info(&account.did)?.records as u64;
        manifest.push(json!({
            "file": file,
            "did": account.did.as_str(),
            "key": identity.key.to_did_key(),
            "records": records,
        }));
        cars.push((
            Car {
                bytes: bytes.to_vec(),
                did: Some(account.did.clone()),
                key: Some(identity.key.clone()),
            },
            records,
        ));
    }
    let manifest_file = dir.join("cars.json");
    std::fs::write(&manifest_file, serde_json::to_vec(&manifest)?)
        .with_context(|| format!("writing {}", manifest_file.display()))?;
    Ok((cars, manifest_file))
}

/// Verifies every CAR fully (blocks, signature, MST, record DRISL) on `threads` threads;
/// returns the seconds it took. Each CAR must yield the records its PDS holds.
fn verify_cars(cars: &[(Car, u64)], threads: usize) -> anyhow::Result<f64> {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some((car, records)) = cars.get(index) else {
                            return Ok(());
                        };
                        let tally = verify_atpdb(car, true)
                            .with_context(|| format!("verifying CAR {index}"))?;
                        ensure!(
                            tally.records == *records,
                            "CAR {index}: {} records, the PDS holds {records}",
                            tally.records
                        );
                    }
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a verification thread panicked"))??;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------
// the TypeScript side

/// How the TypeScript side went.
enum TsOutcome {
    /// Its JSON figures.
    Ran(Json),
    /// It did not run, and why.
    NotRun(String),
    /// It ran and failed or disagreed.
    Failed(String),
}

impl TsOutcome {
    /// Parallel runs of firehose.mjs as one: commits summed over the slowest run's seconds.
    fn combine(outcomes: Vec<TsOutcome>) -> TsOutcome {
        if outcomes.len() == 1 {
            return outcomes
                .into_iter()
                .next()
                .unwrap_or(TsOutcome::NotRun(String::new()));
        }
        let (mut commits, mut ops, mut seconds) = (0u64, 0u64, 0.0f64);
        let processes = outcomes.len();
        for outcome in outcomes {
            match outcome {
                TsOutcome::Ran(json) => {
                    let count = |name: &str| json.get(name).and_then(Json::as_u64).unwrap_or(0);
                    commits += count("commits");
                    ops += count("ops");
                    seconds =
                        seconds.max(json.get("seconds").and_then(Json::as_f64).unwrap_or(0.0));
                }
                other => return other,
            }
        }
        TsOutcome::Ran(json!({
            "processes": processes,
            "commits": commits,
            "ops": ops,
            "errors": 0,
            "seconds": seconds,
            "commits_per_second": commits as f64 / seconds,
        }))
    }

    fn figure(&self, name: &str) -> Option<f64> {
        match self {
            TsOutcome::Ran(json) => json.get(name).and_then(Json::as_f64),
            _ => None,
        }
    }

    fn json(&self) -> Json {
        match self {
            TsOutcome::Ran(json) => json.clone(),
            TsOutcome::NotRun(why) => json!({"not_run": why}),
            TsOutcome::Failed(why) => json!({"failed": why}),
        }
    }

    fn exit_code(&self) -> ExitCode {
        match self {
            TsOutcome::Failed(_) => ExitCode::FAILURE,
            _ => ExitCode::SUCCESS,
        }
    }
}

/// Runs `crates/bench/interop/<script>` with the interop packages and reads its JSON line.
async fn run_node(interop_dir: &Path, script: &str, args: &[std::ffi::OsString]) -> TsOutcome {
    let node = interop_dir.join("node_modules/.bin/node");
    let packages = interop_dir.join("node_modules/@atproto/sync");
    if !node.exists() || !packages.exists() {
        let why = format!(
            "TypeScript comparison did not run: {} has no node_modules with node and \
             @atproto/sync (run crates/devnet/interop/setup.sh)",
            interop_dir.display()
        );
        progress(&why);
        return TsOutcome::NotRun(why);
    }
    let script_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("interop")
        .join(script);
    let mut command = std::process::Command::new(&node);
    command
        .arg(&script_path)
        .arg("--interop")
        .arg(interop_dir)
        .args(args)
        .stderr(std::process::Stdio::inherit());
    let output = match tokio::task::spawn_blocking(move || command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => {
            let why = format!(
                "TypeScript comparison did not run: starting {}: {err}",
                node.display()
            );
            progress(&why);
            return TsOutcome::NotRun(why);
        }
        Err(err) => return TsOutcome::Failed(format!("waiting for node: {err}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().rev().find(|line| !line.trim().is_empty());
    let parsed = last.and_then(|line| serde_json::from_str::<Json>(line).ok());
    match parsed {
        Some(json) if output.status.success() => TsOutcome::Ran(json),
        Some(json) => {
            let why = format!("{script} failed ({}): {json}", output.status);
            progress(&why);
            TsOutcome::Failed(why)
        }
        None => {
            let why = format!(
                "{script} failed ({}) without a JSON line: {}",
                output.status,
                stdout.trim()
            );
            progress(&why);
            TsOutcome::Failed(why)
        }
    }
}

// ---------------------------------------------------------------------------------------
// output

/// The human table: one row per pass, with seconds and a rate.
struct Table {
    title: String,
    unit: &'static str,
    rows: Vec<(String, String, String)>,
    notes: Vec<String>,
}

impl Table {
    fn new(title: &str) -> Table {
        Table {
            title: title.to_owned(),
            unit: "commits/s",
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn unit(mut self, unit: &'static str) -> Table {
        self.unit = unit;
        self
    }

    fn row(&mut self, what: &str, seconds: f64, rate: f64) {
        self.rows
            .push((what.to_owned(), format!("{seconds:.3}"), thousands(rate)));
    }

    fn note(&mut self, note: &str) {
        self.notes.push(note.to_owned());
    }

    fn ts(&mut self, outcome: &TsOutcome, label: &str, figure: &str) {
        match outcome {
            TsOutcome::Ran(json) => {
                let seconds = json.get("seconds").and_then(Json::as_f64).unwrap_or(0.0);
                let rate = json.get(figure).and_then(Json::as_f64).unwrap_or(0.0);
                self.row(label, seconds, rate);
            }
            TsOutcome::NotRun(why) => self.note(why),
            TsOutcome::Failed(why) => self.note(&format!("TypeScript comparison FAILED: {why}")),
        }
    }

    fn print(&self) {
        let width = self
            .rows
            .iter()
            .map(|r| r.0.len())
            .max()
            .unwrap_or(0)
            .max(5);
        println!("{}", self.title);
        println!("  {:width$}  {:>10}  {:>12}", "pass", "seconds", self.unit);
        for (what, seconds, rate) in &self.rows {
            println!("  {what:width$}  {seconds:>10}  {rate:>12}");
        }
        for note in &self.notes {
            println!("  {note}");
        }
    }
}

/// `1234567.8` as `1,234,568`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}
