//! The whole fleet as a user runs it: separate `atpdb fleet` processes against a devnet of 3
//! PDS hosts, 1,000 accounts, a labeler and live traffic, on a Redis of the test's own (so it
//! can be restarted) and the machine's PostgreSQL. One backfill worker and one indexer are
//! SIGKILLed with entries pending and not restarted, Redis is restarted, PostgreSQL's
//! connections are killed; when traffic stops PostgreSQL must equal the devnet exactly.
//!
//! Needs `redis-server` and PostgreSQL on 127.0.0.1:5432; without them the test says it did
//! not run, unless `ATPDB_REQUIRE_REDIS=1` / `ATPDB_REQUIRE_POSTGRES=1` (CI).

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use atpdb_devnet::labeler::LabelSpec;
use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_fleet::{ConnectionManager, redis};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn skip(variable: &str, message: &str) {
    assert!(
        std::env::var(variable).as_deref() != Ok("1"),
        "{message} ({variable}=1 requires it)"
    );
    println!("{message}");
}

/// A `redis-server` of the test's own, append-only so a restart keeps what it held.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    fn start(port: u16, dir: tempfile::TempDir) -> std::io::Result<OwnRedis> {
        let mut redis = OwnRedis {
            port,
            dir,
            child: None,
        };
        redis.spawn()?;
        Ok(redis)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGTERM (Redis writes its file and exits), then the same server again.
    fn restart(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            child.wait()?;
        }
        self.spawn()?;
        Ok(())
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The fleet's processes; killed when dropped.
#[derive(Default)]
struct Fleet(BTreeMap<String, Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in self.0.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Entries `consumer` holds unacknowledged on `stream` (0 when the group does not exist).
async fn pending_of(
    redis: &mut ConnectionManager,
    stream: &str,
    group: &str,
    consumer: &str,
) -> u64 {
    let pending: redis::RedisResult<Vec<(String, String, u64, u64)>> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .arg(consumer)
        .query_async(redis)
        .await;
    pending.map_or(0, |entries| entries.len() as u64)
}

/// What an indexer holds over the three event streams.
async fn indexer_pending(redis: &mut ConnectionManager, consumer: &str) -> u64 {
    let mut total = 0;
    for stream in ["firehose_live", "firehose_backfill", "label_live"] {
        total += pending_of(redis, stream, "firehose_group", consumer).await;
    }
    total
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> TestResult
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_converges_to_the_devnet_through_kills_and_restarts() -> TestResult {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut own_redis = match OwnRedis::start(port, dir) {
        Ok(redis) => redis,
        Err(err) => {
            skip(
                "ATPDB_REQUIRE_REDIS",
                &format!("the fleet convergence test did not run: no redis-server ({err})"),
            );
            return Ok(());
        }
    };
    let mut redis = None;
    for _ in 0..50 {
        if let Ok(connected) = atpdb_fleet::connect(&own_redis.url()).await {
            redis = Some(connected);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut redis = redis.ok_or("the test's redis-server never answered")?;
    let base = std::env::var("ATPDB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432".to_owned());
    let admin = match atpdb_fleet::index::connect(&format!("{base}/postgres")).await {
        Ok(admin) => admin,
        Err(err) => {
            skip(
                "ATPDB_REQUIRE_POSTGRES",
                &format!("the fleet convergence test did not run: no PostgreSQL ({err})"),
            );
            return Ok(());
        }
    };
    let database = format!(
        "atpdb_test_converge_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await?;
    let database_url = format!("{base}/{database}");

    let mut devnet = Devnet::start(DevnetConfig {
        pds_hosts: 3,
        accounts: 1000,
        records: 3,
        with_labeler: true,
        ..DevnetConfig::default()
    })
    .await?;
    let relay = devnet.relay().ok_or("no relay")?.clone();
    let labeler = devnet.labeler().ok_or("no labeler")?.clone();
    // The ingester starts at the relay's head: nothing falls between the snapshots and the
    // live stream.
    let _: () = redis::cmd("SET")
        .arg(atpdb_fleet::enumerate::cursor_key(
            "firehose_live",
            relay.url(),
        ))
        .arg(relay.head_seq())
        .query_async(&mut redis)
        .await?;
    // Backfillers hold their repos long enough to be killed with entries pending.
    for host in devnet.hosts() {
        host.faults().update(|faults| {
            faults.latency_ms = Some(300);
            faults.paths = vec!["com.atproto.sync.getRepo".to_owned()];
        });
    }

    const BACKFILL_MARK: u64 = 2_000;
    const ENUMERATE_MARK: u64 = 300;
    let mut fleet = Fleet::default();
    let spawn = |name: &str, args: &[&str], env: &[(&str, String)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_atpdb"));
        command
            .arg("fleet")
            .args(args)
            .env("REDIS_URL", own_redis.url())
            .env("DATABASE_URL", &database_url)
            .env("ATPDB_PLC_URL", devnet.plc_url())
            .env("ATPDB_ALLOW_PRIVATE_NETWORK", "true")
            .env("ATPDB_DNS_NAMESERVER", devnet.dns_addr().to_string())
            .env("RUST_LOG", "warn")
            .env("BACKFILLER_CLAIM_IDLE_SECS", "3")
            .env("INDEXER_CLAIM_IDLE_SECS", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        command.spawn().map(|child| (name.to_owned(), child))
    };
    for (name, args, env) in [
        (
            "enumerate",
            vec!["enumerate", "--recheck-secs", "0"],
            vec![
                ("INGESTER_RELAY_HOSTS", relay.url().to_owned()),
                ("INGESTER_BATCH_SIZE", "100".to_owned()),
                ("INGESTER_HIGH_WATER_MARK", ENUMERATE_MARK.to_string()),
            ],
        ),
        (
            "ingest",
            vec!["ingest"],
            vec![("ATPDB_RELAY_URL", relay.url().to_owned())],
        ),
        (
            "labels",
            vec!["labels"],
            vec![("LABELER_DIDS", labeler.did().to_string())],
        ),
    ] {
        let (name, child) = spawn(name, &args, &env)?;
        fleet.0.insert(name, child);
    }
    for worker in ["backfill-1", "backfill-2", "backfill-3"] {
        let (name, child) = spawn(
            worker,
            &["backfill"],
            &[
                ("BACKFILLER_CONSUMER", worker.to_owned()),
                ("BACKFILLER_CONCURRENCY", "4".to_owned()),
                (
                    "BACKFILLER_FIREHOSE_STREAM_HIGH_WATER_MARK",
                    BACKFILL_MARK.to_string(),
                ),
            ],
        )?;
        fleet.0.insert(name, child);
    }
    for indexer in ["index-1", "index-2"] {
        let (name, child) = spawn(
            indexer,
            &["index", "--batch-size", "100"],
            &[("INDEXER_CONSUMER", indexer.to_owned())],
        )?;
        fleet.0.insert(name, child);
    }

    // Watch the streams' lengths for the whole run.
    let most = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let watching = {
        let (mut redis, most) = (redis.clone(), most.clone());
        tokio::spawn(async move {
            loop {
                for stream in ["repo_backfill", "firehose_backfill"] {
                    if let Ok(length) = redis::cmd("XLEN")
                        .arg(stream)
                        .query_async::<u64>(&mut redis)
                        .await
                        && let Ok(mut most) = most.lock()
                    {
                        let entry = most.entry(stream.to_owned()).or_default();
                        *entry = (*entry).max(length);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    devnet.start_traffic(20.0);
    let dids: Vec<String> = devnet
        .accounts()
        .iter()
        .map(|account| account.did.to_string())
        .collect();
    for (i, did) in dids.iter().take(20).enumerate() {
        labeler.emit(LabelSpec {
            uri: did.clone(),
            val: if i % 2 == 0 { "spam" } else { "nsfw" }.to_owned(),
            ..LabelSpec::default()
        });
    }

    // A backfill worker killed with repos in hand.
    wait_for(
        "backfill-1 to hold entries",
        Duration::from_secs(120),
        || {
            let mut redis = redis.clone();
            async move {
                pending_of(
                    &mut redis,
                    "repo_backfill",
                    "repo_backfill_group",
                    "backfill-1",
                )
                .await
                    > 0
            }
        },
    )
    .await?;
    if let Some(mut child) = fleet.0.remove("backfill-1") {
        child.kill()?;
        child.wait()?;
    }
    for host in devnet.hosts() {
        host.faults().clear();
    }
    // An indexer killed mid-batch: a lock holds both indexers inside their transactions.
    wait_for("rows in PostgreSQL", Duration::from_secs(120), || {
        let url = database_url.clone();
        async move {
            let Ok(postgres) = atpdb_fleet::index::connect(&url).await else {
                return false;
            };
            postgres
                .query_one("SELECT count(*) FROM record", &[])
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) > 0)
        }
    })
    .await?;
    let mut locker = atpdb_fleet::index::connect(&database_url).await?;
    let lock = locker.transaction().await?;
    lock.batch_execute("LOCK TABLE record IN SHARE ROW EXCLUSIVE MODE")
        .await?;
    wait_for("index-1 to hold entries", Duration::from_secs(60), || {
        let mut redis = redis.clone();
        async move { indexer_pending(&mut redis, "index-1").await > 0 }
    })
    .await?;
    if let Some(mut child) = fleet.0.remove("index-1") {
        child.kill()?;
        child.wait()?;
    }
    lock.commit().await?;
    drop(locker);

    // Redis restarts; every PostgreSQL connection of the database is killed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    own_redis.restart()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&database],
        )
        .await?;
    for (i, did) in dids.iter().take(10).enumerate() {
        labeler.emit(LabelSpec {
            uri: did.clone(),
            val: if i % 2 == 0 { "spam" } else { "nsfw" }.to_owned(),
            neg: true,
            ..LabelSpec::default()
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    devnet.stop_traffic();

    // Converge: PostgreSQL equals every PDS, and the labeler.
    let truth_labels: BTreeSet<(String, String)> = labeler
        .current()
        .into_iter()
        .map(|label| (label.uri, label.val))
        .collect();
    let mismatch = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let converged = wait_for(
        "PostgreSQL to equal the devnet",
        Duration::from_secs(240),
        || {
            let (url, devnet, truth_labels, mismatch) = (
                database_url.clone(),
                &devnet,
                &truth_labels,
                mismatch.clone(),
            );
            let say = move |text: String| {
                if let Ok(mut mismatch) = mismatch.lock() {
                    *mismatch = text;
                }
            };
            async move {
                let Ok(postgres) = atpdb_fleet::index::connect(&url).await else {
                    return false;
                };
                let Ok(rows) = postgres
                    .query(
                        "SELECT did, collection || '/' || rkey, cid FROM record WHERE NOT deleted",
                        &[],
                    )
                    .await
                else {
                    return false;
                };
                let mut stored: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
                for row in &rows {
                    stored
                        .entry(row.get(0))
                        .or_default()
                        .insert(row.get(1), row.get(2));
                }
                for account in devnet.accounts() {
                    let Ok(records) = devnet.hosts()[account.pds].account_records(&account.did)
                    else {
                        return false;
                    };
                    let truth: BTreeMap<String, String> = records
                        .into_iter()
                        .map(|(path, cid)| (path, cid.to_string()))
                        .collect();
                    if stored.remove(account.did.as_str()).unwrap_or_default() != truth {
                        say(format!("records of {}", account.did));
                        return false;
                    }
                }
                if !stored.is_empty() {
                    say(format!("rows of unknown repos: {:?}", stored.keys().next()));
                    return false;
                }
                let Ok(labels) = postgres
                    .query("SELECT uri, val FROM label WHERE NOT neg", &[])
                    .await
                else {
                    return false;
                };
                let labels: BTreeSet<(String, String)> =
                    labels.iter().map(|row| (row.get(0), row.get(1))).collect();
                if labels != *truth_labels {
                    say(format!("labels: {labels:?}"));
                    return false;
                }
                true
            }
        },
    )
    .await;
    if let Err(err) = converged {
        let mismatch = mismatch.lock().map(|text| text.clone()).unwrap_or_default();
        return Err(format!("{err}: {mismatch}").into());
    }
    assert_eq!(
        pending_of(
            &mut redis,
            "repo_backfill",
            "repo_backfill_group",
            "backfill-1"
        )
        .await,
        0,
        "backfill-1's entries were taken over"
    );
    // index-1 ran two indexers (INDEXER_CONCURRENCY's default): both died with it.
    for consumer in ["index-1", "index-1.2"] {
        assert_eq!(
            indexer_pending(&mut redis, consumer).await,
            0,
            "{consumer}'s entries were taken over"
        );
    }
    watching.abort();
    let most = most.lock().map(|most| most.clone()).unwrap_or_default();
    // A writer checks the mark before each write, so a stream can pass it by what the
    // writers had in hand: a page (enumerate, plus the ingester's resync jobs), a chunk per
    // repo in flight (3 workers × 4 repos × at most 6 events here).
    let repo_backfill = most.get("repo_backfill").copied().unwrap_or(0);
    assert!(repo_backfill <= ENUMERATE_MARK + 100 + 50, "{most:?}");
    let firehose_backfill = most.get("firehose_backfill").copied().unwrap_or(0);
    assert!(firehose_backfill <= BACKFILL_MARK + 3 * 4 * 6, "{most:?}");
    drop(fleet);
    admin
        .batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .await?;
    Ok(())
}
