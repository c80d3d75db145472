//! `atpdb fleet enumerate` and `atpdb fleet backfill` as a user runs them: separate
//! processes on the machine's Redis, against a devnet.
//!
//! Needs Redis on 127.0.0.1:6379 (or `ATPDB_TEST_REDIS_URL`); without it the test says it
//! did not run and passes, unless `ATPDB_REQUIRE_REDIS=1` (CI).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_fleet::redis;
use atpdb_fleet::{RepoJob, StreamEvent};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_commands_enumerate_backfill_index_and_report() -> TestResult {
    let url = std::env::var("ATPDB_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let mut redis = match tokio::time::timeout(Duration::from_secs(5), atpdb_fleet::connect(&url))
        .await
    {
        Ok(Ok(redis)) => redis,
        failed => {
            let message = format!("the fleet CLI test did not run: no Redis at {url} ({failed:?})");
            assert!(
                std::env::var("ATPDB_REQUIRE_REDIS").as_deref() != Ok("1"),
                "{message} (ATPDB_REQUIRE_REDIS=1 requires it)"
            );
            println!("{message}");
            return Ok(());
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let prefix = format!("atpdb-test:cli:{}:{nanos}:", std::process::id());
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 2,
        accounts: 25,
        records: 12,
        ..DevnetConfig::default()
    })
    .await?;
    let relay = devnet.relay().ok_or("no relay")?.url().to_owned();
    let stream_in = format!("{prefix}repo_backfill");
    let stream_out = format!("{prefix}firehose_backfill");
    let common = |command: &mut Command| {
        command
            .env("REDIS_URL", &url)
            .env("ATPDB_PLC_URL", devnet.plc_url())
            .env("ATPDB_ALLOW_PRIVATE_NETWORK", "true")
            .env("RUST_LOG", "warn");
    };

    let mut enumerate = Command::new(env!("CARGO_BIN_EXE_atpdb"));
    enumerate.args([
        "fleet",
        "enumerate",
        "--recheck-secs",
        "0",
        "--stream",
        &stream_in,
    ]);
    enumerate.env("INGESTER_RELAY_HOSTS", &relay);
    common(&mut enumerate);
    let status = tokio::task::spawn_blocking(move || enumerate.status()).await??;
    assert!(status.success(), "enumerate exited with {status}");
    let queued: Vec<(String, BTreeMap<String, String>)> = redis::cmd("XRANGE")
        .arg(&stream_in)
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await?;
    let listed: BTreeSet<String> = queued
        .iter()
        .map(|(_, fields)| serde_json::from_str::<RepoJob>(&fields["repo"]).map(|job| job.did))
        .collect::<Result<_, _>>()?;
    let truth: BTreeSet<String> = devnet
        .accounts()
        .iter()
        .map(|a| a.did.to_string())
        .collect();
    assert_eq!(listed, truth);

    let mut workers = Vec::new();
    for name in ["cli-1", "cli-2"] {
        let mut worker = Command::new(env!("CARGO_BIN_EXE_atpdb"));
        worker.args(["fleet", "backfill", "--exit-when-idle-secs", "2"]);
        worker
            .env("BACKFILLER_CONSUMER", name)
            .env("BACKFILLER_BACKFILL_STREAM", &stream_in)
            .env("BACKFILLER_FIREHOSE_STREAM", &stream_out)
            .env("BACKFILLER_ERRORS_STREAM", format!("{prefix}errors"))
            .env("BACKFILLER_GROUP", format!("{prefix}group"));
        common(&mut worker);
        workers.push(tokio::task::spawn_blocking(move || worker.output()));
    }
    for worker in workers {
        let output = worker.await??;
        assert!(
            output.status.success(),
            "a worker failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let written: Vec<(String, BTreeMap<String, String>)> = redis::cmd("XRANGE")
        .arg(&stream_out)
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await?;
    let mut records: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (_, fields) in &written {
        if let StreamEvent::Create {
            did,
            collection,
            rkey,
            cid,
            ..
        } = serde_json::from_str(&fields["event"])?
        {
            records
                .entry(did)
                .or_default()
                .insert(format!("{collection}/{rkey}"), cid);
        }
    }
    for account in devnet.accounts() {
        let expected: BTreeMap<String, String> = devnet.hosts()[account.pds]
            .account_records(&account.did)?
            .into_iter()
            .map(|(path, cid)| (path, cid.to_string()))
            .collect();
        assert_eq!(records.get(account.did.as_str()), Some(&expected));
    }
    let length: u64 = redis::cmd("XLEN")
        .arg(&stream_in)
        .query_async(&mut redis)
        .await?;
    assert_eq!(length, 0, "every entry acknowledged and deleted");

    // The indexer, into a database of its own, when PostgreSQL is here.
    let base = std::env::var("ATPDB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432".to_owned());
    match atpdb_fleet::index::connect(&format!("{base}/postgres")).await {
        Err(err) => {
            let message = format!("the fleet index CLI step did not run: {err}");
            assert!(
                std::env::var("ATPDB_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "{message} (ATPDB_REQUIRE_POSTGRES=1 requires it)"
            );
            println!("{message}");
        }
        Ok(admin) => {
            let database = format!("atpdb_test_cli_{}_{nanos}", std::process::id());
            admin
                .batch_execute(&format!("CREATE DATABASE {database}"))
                .await?;
            let mut index = Command::new(env!("CARGO_BIN_EXE_atpdb"));
            index
                .args(["fleet", "index", "--exit-when-idle-secs", "1"])
                .env("DATABASE_URL", format!("{base}/{database}"))
                .env("INDEXER_STREAMS", &stream_out)
                .env("INDEXER_GROUP", format!("{prefix}index"))
                .env("INDEXER_CONCURRENCY", "2");
            common(&mut index);
            let output = tokio::task::spawn_blocking(move || index.output()).await??;
            assert!(
                output.status.success(),
                "the indexer failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let postgres = atpdb_fleet::index::connect(&format!("{base}/{database}")).await?;
            let rows: i64 = postgres
                .query_one("SELECT count(*) FROM record WHERE NOT deleted", &[])
                .await?
                .get(0);
            let expected: usize = records.values().map(BTreeMap::len).sum();
            assert_eq!(rows, expected as i64);
            drop(postgres);

            // `fleet status`: the figures an operator reads, as JSON and on /metrics.
            let streams = format!("{stream_in},{stream_out}");
            let status_args = |command: &mut Command| {
                command
                    .args(["fleet", "status", "--streams", &streams])
                    .args(["--error-streams", &format!("{prefix}repo_backfill_errors")])
                    .env("DATABASE_URL", format!("{base}/{database}"));
                common(command);
            };
            let mut status = Command::new(env!("CARGO_BIN_EXE_atpdb"));
            status_args(&mut status);
            status.arg("--json");
            let output = tokio::task::spawn_blocking(move || status.output()).await??;
            assert!(
                output.status.success(),
                "status failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let found: serde_json::Value = serde_json::from_slice(&output.stdout)?;
            let out = found["streams"]
                .as_array()
                .and_then(|streams| streams.iter().find(|s| s["stream"] == stream_out.as_str()))
                .ok_or("no output stream in the status")?;
            let events = out["length"].as_u64().ok_or("no length")?;
            assert_eq!(events, 0, "indexed entries are deleted: {out}");
            let group = &out["groups"][0];
            assert_eq!(group["group"], format!("{prefix}index"));
            assert_eq!(
                (group["pending"].as_u64(), group["lag"].as_u64()),
                (Some(0), Some(0))
            );
            // Two indexers in the one process, each a consumer of the group.
            let mut consumers: Vec<&str> = group["consumers"]
                .as_array()
                .ok_or("no consumers")?
                .iter()
                .filter_map(|consumer| consumer["consumer"].as_str())
                .collect();
            consumers.sort_unstable();
            assert_eq!(consumers, ["indexer_1", "indexer_1.2"]);
            let record = found["tables"]
                .as_array()
                .and_then(|tables| tables.iter().find(|t| t["table"] == "record"))
                .ok_or("no record table in the status")?;
            assert_eq!(record["rows"].as_u64(), Some(expected as u64));

            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let mut serving = Command::new(env!("CARGO_BIN_EXE_atpdb"));
            status_args(&mut serving);
            serving.args(["--listen", &format!("127.0.0.1:{port}")]);
            let mut serving = serving.spawn()?;
            let client = reqwest::Client::new();
            let mut metrics = None;
            for _ in 0..100 {
                if let Ok(response) = client
                    .get(format!("http://127.0.0.1:{port}/metrics"))
                    .send()
                    .await
                {
                    metrics = Some(response.text().await?);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            serving.kill()?;
            serving.wait()?;
            let metrics = metrics.ok_or("/metrics never answered")?;
            assert!(
                metrics.contains(&format!(
                    "atpdb_fleet_rows{{table=\"record\",state=\"live\"}} {expected}"
                )),
                "{metrics}"
            );
            assert!(
                metrics.contains(&format!(
                    "atpdb_fleet_stream_length{{stream=\"{stream_out}\"}} {events}"
                )),
                "{metrics}"
            );
            admin
                .batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)"))
                .await?;
        }
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut redis)
        .await?;
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await?;
    Ok(())
}
