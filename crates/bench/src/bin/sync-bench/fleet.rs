//! `sync-bench fleet`: records/s through the fleet (Redis Streams and PostgreSQL) on this
//! machine, by stage and end to end.
//!
//! A devnet is seeded once. Then, each on a fresh key prefix and database:
//! - **backfill**: `fleet enumerate` lists every repo into `repo_backfill`, and W backfill
//!   workers (in-process, each its own consumer) fetch, verify and write every record to
//!   `firehose_backfill`; timed until the workers are idle.
//! - **index**: I indexers read that stream from the start into PostgreSQL; timed until
//!   they are idle, and the `record` table must hold every record.
//! - **end to end**: W workers and I indexers at once, timed until PostgreSQL holds every
//!   record.
//!
//! The named peer, rsky-wintermute, reports 5–13k records/s with COPY; it cannot be built
//! here, so that figure and our target (50k/s) stand as the references.

use atpdb_fleet::backfill::{self as fleet_backfill, BackfillConfig};
use atpdb_fleet::enumerate::{self, EnumerateConfig};
use atpdb_fleet::index::{self, IndexConfig};
use atpdb_fleet::{ConnectionManager, redis};
use atpdb_identity::Resolver;
use atpdb_net::Xrpc;
use tokio_util::sync::CancellationToken;

use super::*;

#[derive(Debug, Args)]
pub(super) struct FleetArgs {
    #[command(flatten)]
    common: Common,
    /// Accounts seeded.
    #[arg(long, default_value_t = 100)]
    accounts: usize,
    /// Records per seeded account (plus a profile).
    #[arg(long, default_value_t = 1000)]
    records: usize,
    /// Backfill worker counts, one pass each.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    backfillers: Vec<usize>,
    /// Indexer counts, one pass each.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    indexers: Vec<usize>,
    /// Entries per indexer transaction.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Redis.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// PostgreSQL, without a database: each pass creates and drops its own.
    #[arg(long, default_value = "postgresql://postgres@127.0.0.1:5432")]
    postgres_url: String,
}

/// A workers' idle spell before they exit; subtracted from the timings.
const IDLE: Duration = Duration::from_millis(300);

struct Pass {
    stage: &'static str,
    backfillers: usize,
    indexers: usize,
    records: u64,
    seconds: f64,
}

impl Pass {
    fn rate(&self) -> f64 {
        self.records as f64 / self.seconds.max(1e-9)
    }
}

pub(super) async fn run(args: FleetArgs) -> anyhow::Result<ExitCode> {
    let common = &args.common;
    progress(&format!(
        "seeding a devnet: {} accounts × {} records on {} PDS hosts",
        args.accounts, args.records, common.pds_hosts
    ));
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: common.pds_hosts.max(1),
        accounts: args.accounts,
        records: args.records,
        seed: common.seed,
        ready_timeout: Duration::from_secs(600),
        ..DevnetConfig::default()
    })
    .await
    .context("starting the devnet")?;
    let relay = devnet.relay().context("no relay")?.url().to_owned();
    let Network {
        resolver: identity,
        xrpc,
        ..
    } = Network::new(devnet.network_config())?;
    // Identities resolved before any timed pass: in steady state the cache is warm.
    for account in devnet.accounts() {
        identity.resolve(&account.did).await?;
    }
    let expected: u64 = devnet
        .accounts()
        .iter()
        .map(|account| {
            devnet.hosts()[account.pds]
                .account_records(&account.did)
                .map(|records| records.len() as u64)
        })
        .sum::<Result<u64, _>>()?;
    let mut redis = atpdb_fleet::connect(&args.redis_url).await?;
    let run_id = format!(
        "sync-bench:{}:{}:",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let mut passes = Vec::new();
    let mut filled: Option<String> = None;
    for &workers in &args.backfillers {
        let prefix = format!("{run_id}b{workers}:");
        let (seconds, records) =
            backfill_pass(&xrpc, &identity, &mut redis, &relay, &prefix, workers).await?;
        ensure!(
            records == expected,
            "the backfill wrote {records} records, the PDSes hold {expected}"
        );
        passes.push(Pass {
            stage: "backfill",
            backfillers: workers,
            indexers: 0,
            records,
            seconds,
        });
        if let Some(old) = filled.replace(prefix) {
            clean(&mut redis, &old).await?;
        }
    }
    let filled = filled.context("no backfill pass (--backfillers)")?;
    for &indexers in &args.indexers {
        let database = Database::create(&args.postgres_url, &format!("i{indexers}")).await?;
        let config = IndexConfig {
            streams: vec![format!("{filled}firehose_backfill")],
            group: format!("{filled}index{indexers}"),
            batch_size: args.batch_size.max(1),
            exit_when_idle: Some(IDLE),
            // Each pass reads the same filled stream with a group of its own.
            delete_acked: false,
            ..IndexConfig::default()
        };
        progress(&format!("index: {indexers} indexer(s) into PostgreSQL"));
        let started = Instant::now();
        run_indexers(
            &redis,
            &database.url,
            &config,
            indexers,
            &CancellationToken::new(),
        )
        .await?;
        let seconds = (started.elapsed().saturating_sub(IDLE)).as_secs_f64();
        let rows = database.records().await?;
        ensure!(
            rows == expected,
            "PostgreSQL holds {rows} records, the PDSes {expected}"
        );
        passes.push(Pass {
            stage: "index",
            backfillers: 0,
            indexers,
            records: rows,
            seconds,
        });
        database.drop().await?;
    }
    clean(&mut redis, &filled).await?;
    // End to end: the largest counts of each, at once.
    let workers = args.backfillers.iter().copied().max().unwrap_or(1);
    let indexers = args.indexers.iter().copied().max().unwrap_or(1);
    let prefix = format!("{run_id}e:");
    let database = Database::create(&args.postgres_url, "e2e").await?;
    progress(&format!(
        "end to end: {workers} backfill worker(s) and {indexers} indexer(s) at once"
    ));
    let shutdown = CancellationToken::new();
    let index_config = IndexConfig {
        streams: vec![format!("{prefix}firehose_backfill")],
        group: format!("{prefix}index"),
        batch_size: args.batch_size.max(1),
        ..IndexConfig::default()
    };
    let started = Instant::now();
    let indexing = {
        let (redis, url, config, shutdown) = (
            redis.clone(),
            database.url.clone(),
            index_config.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move { run_indexers(&redis, &url, &config, indexers, &shutdown).await })
    };
    let (_, records) =
        backfill_pass(&xrpc, &identity, &mut redis, &relay, &prefix, workers).await?;
    ensure!(records == expected, "the backfill wrote {records} records");
    let deadline = Instant::now() + Duration::from_secs(1800);
    while database.records().await? < expected {
        ensure!(
            Instant::now() < deadline,
            "the indexers did not finish in 30 minutes"
        );
        if indexing.is_finished() {
            indexing.await??;
            anyhow::bail!("the indexers stopped before PostgreSQL held every record");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    shutdown.cancel();
    indexing.await??;
    passes.push(Pass {
        stage: "end to end",
        backfillers: workers,
        indexers,
        records: expected,
        seconds,
    });
    database.drop().await?;
    clean(&mut redis, &prefix).await?;

    if !common.json {
        println!(
            "fleet: {} accounts, {expected} records, {} PDS hosts, {} cores",
            args.accounts,
            common.pds_hosts,
            cores()
        );
        println!(
            "{:<12} {:>11} {:>9} {:>10} {:>9} {:>12} {:>14}",
            "stage", "backfillers", "indexers", "records", "seconds", "records/s", "÷ 50k target"
        );
        for pass in &passes {
            println!(
                "{:<12} {:>11} {:>9} {:>10} {:>9.2} {:>12.0} {:>13.2}×",
                pass.stage,
                pass.backfillers,
                pass.indexers,
                pass.records,
                pass.seconds,
                pass.rate(),
                pass.rate() / 50_000.0
            );
        }
        println!("rsky-wintermute reports 5,000–13,000 records/s into PostgreSQL with COPY");
    }
    let figures: Vec<Json> = passes
        .iter()
        .map(|pass| {
            json!({
                "stage": pass.stage,
                "backfillers": pass.backfillers,
                "indexers": pass.indexers,
                "records": pass.records,
                "seconds": pass.seconds,
                "records_per_second": pass.rate(),
            })
        })
        .collect();
    println!(
        "{}",
        json!({"mode": "fleet", "accounts": args.accounts, "records": expected, "passes": figures})
    );
    devnet.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Enumerates into `{prefix}repo_backfill` and runs `workers` backfill workers until idle;
/// returns the seconds the workers took (their idle exit excluded) and the records written.
async fn backfill_pass(
    xrpc: &Xrpc,
    identity: &Resolver,
    redis: &mut ConnectionManager,
    relay: &str,
    prefix: &str,
    workers: usize,
) -> anyhow::Result<(f64, u64)> {
    let stream_in = format!("{prefix}repo_backfill");
    let shutdown = CancellationToken::new();
    enumerate::run(
        xrpc,
        redis,
        &EnumerateConfig {
            relays: vec![relay.to_owned()],
            stream: stream_in.clone(),
            recheck: None,
            ..EnumerateConfig::default()
        },
        &shutdown,
    )
    .await?;
    progress(&format!("backfill: {workers} worker(s)"));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers.max(1) {
        tasks.spawn(fleet_backfill::run(
            xrpc.clone(),
            identity.clone(),
            redis.clone(),
            BackfillConfig {
                stream_in: stream_in.clone(),
                stream_out: format!("{prefix}firehose_backfill"),
                errors_stream: format!("{prefix}errors"),
                group: format!("{prefix}backfill"),
                consumer: format!("bench-{worker}"),
                // Far above the run's size: the stream is the product here, not a queue.
                high_water: u64::MAX,
                exit_when_idle: Some(IDLE),
                ..BackfillConfig::default()
            },
            shutdown.clone(),
        ));
    }
    let mut records = 0;
    while let Some(done) = tasks.join_next().await {
        let done = done??;
        ensure!(done.parked == 0, "{} repos were parked", done.parked);
        records += done.records;
    }
    Ok((
        started.elapsed().saturating_sub(IDLE).as_secs_f64(),
        records,
    ))
}

async fn run_indexers(
    redis: &ConnectionManager,
    url: &str,
    config: &IndexConfig,
    indexers: usize,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for indexer in 0..indexers.max(1) {
        let (redis, url, shutdown) = (redis.clone(), url.to_owned(), shutdown.clone());
        let config = IndexConfig {
            consumer: format!("bench-{indexer}"),
            ..config.clone()
        };
        tasks.spawn(async move {
            let mut postgres = index::connect(&url).await?;
            index::run(redis, &mut postgres, &config, &shutdown).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

async fn clean(redis: &mut ConnectionManager, prefix: &str) -> anyhow::Result<()> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(redis)
        .await?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query_async(redis).await?;
    }
    Ok(())
}

/// A database for one pass, dropped after it.
struct Database {
    admin: atpdb_fleet::tokio_postgres::Client,
    /// A connection to the pass's database, for counting.
    counter: atpdb_fleet::tokio_postgres::Client,
    name: String,
    url: String,
}

impl Database {
    async fn create(base: &str, pass: &str) -> anyhow::Result<Database> {
        let admin = index::connect(&format!("{base}/postgres")).await?;
        let name = format!("sync_bench_{}_{pass}", std::process::id());
        // Two statements: a multi-statement string runs as one transaction, which
        // DROP/CREATE DATABASE refuse.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let url = format!("{base}/{name}");
        Ok(Database {
            admin,
            counter: index::connect(&url).await?,
            url,
            name,
        })
    }

    async fn records(&self) -> anyhow::Result<u64> {
        let postgres = &self.counter;
        let rows = postgres
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE tablename = 'record'",
                &[],
            )
            .await?;
        if rows.get::<_, i64>(0) == 0 {
            return Ok(0);
        }
        let count: i64 = postgres
            .query_one("SELECT count(*) FROM record WHERE NOT deleted", &[])
            .await?
            .get(0);
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn drop(self) -> anyhow::Result<()> {
        drop(self.counter);
        self.admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await?;
        Ok(())
    }
}
