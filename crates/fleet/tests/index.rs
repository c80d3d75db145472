//! `fleet index` on the machine's real PostgreSQL and Redis: the stream events become rows
//! in which no older rev overwrites a newer one and no delete comes back.
//!
//! Needs PostgreSQL on 127.0.0.1:5432 (`ATPDB_TEST_POSTGRES_URL`, trust auth) and Redis
//! (`ATPDB_TEST_REDIS_URL`). Without them the tests say they did not run and pass, unless
//! `ATPDB_REQUIRE_POSTGRES=1` / `ATPDB_REQUIRE_REDIS=1` (CI). Each test uses its own
//! database and key prefix and removes them.

use std::collections::BTreeMap;
use std::time::Duration;

use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_fleet::backfill::{self, BackfillConfig};
use atpdb_fleet::enumerate::{self, EnumerateConfig};
use atpdb_fleet::index::{self, IndexConfig};
use atpdb_fleet::{ConnectionManager, StreamEvent, redis};
use tokio_util::sync::CancellationToken;

mod common;
use common::TestResult;

fn required(name: &str, message: &str) {
    assert!(
        std::env::var(name).as_deref() != Ok("1"),
        "{message} ({name}=1 requires it)"
    );
    println!("{message}");
}

/// A fresh database and Redis prefix; `None` (said) when either service is missing.
struct Services {
    redis: ConnectionManager,
    prefix: String,
    admin: tokio_postgres::Client,
    database: String,
    url: String,
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn services(test: &str) -> Option<Services> {
    let base = std::env::var("ATPDB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432".to_owned());
    let (redis, prefix) = common::redis(test).await?;
    let admin = match pg_connect(&format!("{base}/postgres")).await {
        Ok(admin) => admin,
        Err(err) => {
            required(
                "ATPDB_REQUIRE_POSTGRES",
                &format!("{test} did not run: no PostgreSQL at {base} ({err})"),
            );
            return None;
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let database = format!("atpdb_test_{test}_{}_{nanos}", std::process::id());
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await
        .ok()?;
    Some(Services {
        redis,
        prefix,
        url: format!("{base}/{database}"),
        admin,
        database,
    })
}

impl Services {
    async fn clean(mut self) -> TestResult {
        common::clean(&mut self.redis, &self.prefix).await?;
        self.admin
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.database))
            .await?;
        Ok(())
    }
}

async fn add(redis: &mut ConnectionManager, stream: &str, event: &StreamEvent) -> TestResult {
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("event")
        .arg(serde_json::to_string(event)?)
        .query_async(redis)
        .await?;
    Ok(())
}

fn create(did: &str, rkey: &str, rev: &str, text: &str) -> StreamEvent {
    StreamEvent::Create {
        seq: -1,
        time: "2026-01-01T00:00:00.000Z".to_owned(),
        did: did.to_owned(),
        commit: "bafycommit".to_owned(),
        rev: rev.to_owned(),
        collection: "app.bsky.feed.post".to_owned(),
        rkey: rkey.to_owned(),
        cid: format!("cid-{rev}"),
        record: serde_json::json!({"$type": "app.bsky.feed.post", "text": text}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_rev_never_overwrites_a_newer_one_and_deletes_stay_deleted() -> TestResult {
    let Some(mut services) = services("revs").await else {
        return Ok(());
    };
    let live = format!("{}firehose_live", services.prefix);
    let backfill = format!("{}firehose_backfill", services.prefix);
    let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
    let (old, new) = ("3kaaaaaaaaa22", "3kbbbbbbbbb22");
    let redis = &mut services.redis;
    // Live: A updated and B deleted at the newer rev.
    add(
        redis,
        &live,
        &StreamEvent::Update {
            seq: 7,
            time: "2026-01-01T00:00:01.000Z".to_owned(),
            did: did.to_owned(),
            commit: "bafynew".to_owned(),
            rev: new.to_owned(),
            collection: "app.bsky.feed.post".to_owned(),
            rkey: "a".to_owned(),
            cid: format!("cid-{new}"),
            record: serde_json::json!({"$type": "app.bsky.feed.post", "text": "edited"}),
        },
    )
    .await?;
    add(
        redis,
        &live,
        &StreamEvent::Delete {
            seq: 8,
            time: "2026-01-01T00:00:01.000Z".to_owned(),
            did: did.to_owned(),
            commit: "bafynew".to_owned(),
            rev: new.to_owned(),
            collection: "app.bsky.feed.post".to_owned(),
            rkey: "b".to_owned(),
        },
    )
    .await?;
    // A late backfill from the older snapshot: A and B at the older rev, C (new to the
    // index), and C twice in one batch at two revs.
    add(redis, &backfill, &create(did, "a", old, "original")).await?;
    add(redis, &backfill, &create(did, "b", old, "deleted later")).await?;
    add(redis, &backfill, &create(did, "c", old, "c old")).await?;
    add(redis, &backfill, &create(did, "c", new, "c new")).await?;
    let _: String = redis::cmd("XADD")
        .arg(&backfill)
        .arg("*")
        .arg("event")
        .arg("{not an event")
        .query_async(redis)
        .await?;

    let mut postgres = pg_connect(&services.url).await?;
    let config = IndexConfig {
        streams: vec![live.clone(), backfill.clone()],
        group: format!("{}group", services.prefix),
        exit_when_idle: Some(Duration::from_millis(300)),
        ..IndexConfig::default()
    };
    let shutdown = CancellationToken::new();
    let done = index::run(services.redis.clone(), &mut postgres, &config, &shutdown).await?;
    assert_eq!((done.entries, done.unreadable), (7, 1));

    let rows = |postgres: tokio_postgres::Client| async move {
        let rows = postgres
            .query(
                "SELECT rkey, rev, deleted, json->>'text', indexed_at::text FROM record ORDER BY rkey",
                &[],
            )
            .await?;
        Ok::<_, tokio_postgres::Error>((
            postgres,
            rows.iter()
                .map(|row| {
                    (
                        row.get::<_, String>(0),
                        row.get::<_, String>(1),
                        row.get::<_, bool>(2),
                        row.get::<_, Option<String>>(3),
                        row.get::<_, String>(4),
                    )
                })
                .collect::<Vec<_>>(),
        ))
    };
    let (postgres, first) = rows(postgres).await?;
    let summary: Vec<_> = first
        .iter()
        .map(|(rkey, rev, deleted, text, _)| {
            (rkey.as_str(), rev.as_str(), *deleted, text.as_deref())
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("a", new, false, Some("edited")),
            ("b", new, true, None),
            ("c", new, false, Some("c new")),
        ]
    );

    // Redelivery of everything changes nothing.
    for stream in [&live, &backfill] {
        let _: () = redis::cmd("XGROUP")
            .arg("SETID")
            .arg(stream)
            .arg(&config.group)
            .arg("0")
            .query_async(&mut services.redis)
            .await?;
    }
    let mut postgres = postgres;
    index::run(services.redis.clone(), &mut postgres, &config, &shutdown).await?;
    let (_postgres, second) = rows(postgres).await?;
    assert_eq!(first, second, "a redelivered batch rewrote rows");
    services.clean().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enumerate_backfill_and_index_put_every_record_into_postgres() -> TestResult {
    let Some(mut services) = services("pipeline").await else {
        return Ok(());
    };
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 3,
        accounts: 30,
        records: 20,
        ..DevnetConfig::default()
    })
    .await?;
    let (xrpc, identity) = common::clients(&devnet)?;
    let relay = devnet.relay().ok_or("no relay")?.url().to_owned();
    let shutdown = CancellationToken::new();
    let stream_in = format!("{}repo_backfill", services.prefix);
    let stream_out = format!("{}firehose_backfill", services.prefix);
    enumerate::run(
        &xrpc,
        &mut services.redis,
        &EnumerateConfig {
            relays: vec![relay],
            stream: stream_in.clone(),
            recheck: None,
            ..EnumerateConfig::default()
        },
        &shutdown,
    )
    .await?;
    backfill::run(
        xrpc,
        identity,
        services.redis.clone(),
        BackfillConfig {
            stream_in,
            stream_out: stream_out.clone(),
            errors_stream: format!("{}errors", services.prefix),
            group: format!("{}backfill", services.prefix),
            exit_when_idle: Some(Duration::from_millis(500)),
            ..BackfillConfig::default()
        },
        shutdown.clone(),
    )
    .await?;
    // Two indexers share the stream.
    let config = IndexConfig {
        streams: vec![stream_out],
        group: format!("{}index", services.prefix),
        batch_size: 100,
        exit_when_idle: Some(Duration::from_millis(500)),
        ..IndexConfig::default()
    };
    let mut indexers = tokio::task::JoinSet::new();
    for name in ["indexer-1", "indexer-2"] {
        let (redis, url, shutdown) = (
            services.redis.clone(),
            services.url.clone(),
            shutdown.clone(),
        );
        let config = IndexConfig {
            consumer: name.to_owned(),
            ..config.clone()
        };
        indexers.spawn(async move {
            let mut postgres = pg_connect(&url).await.map_err(|err| err.to_string())?;
            index::run(redis, &mut postgres, &config, &shutdown)
                .await
                .map_err(|err| err.to_string())
        });
    }
    while let Some(done) = indexers.join_next().await {
        done??;
    }
    let postgres = pg_connect(&services.url).await?;
    let mut stored: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for row in postgres
        .query(
            "SELECT did, collection, rkey, cid FROM record WHERE NOT deleted",
            &[],
        )
        .await?
    {
        stored.entry(row.get(0)).or_default().insert(
            format!("{}/{}", row.get::<_, String>(1), row.get::<_, String>(2)),
            row.get(3),
        );
    }
    assert_eq!(stored.len(), 30);
    for account in devnet.accounts() {
        let host = &devnet.hosts()[account.pds];
        let truth: BTreeMap<String, String> = host
            .account_records(&account.did)?
            .into_iter()
            .map(|(path, cid)| (path, cid.to_string()))
            .collect();
        assert_eq!(
            stored.get(account.did.as_str()),
            Some(&truth),
            "{}",
            account.did
        );
        let rev: String = postgres
            .query_one(
                "SELECT rev FROM repo WHERE did = $1",
                &[&account.did.as_str()],
            )
            .await?
            .get(0);
        assert_eq!(rev, host.account_info(&account.did)?.rev.to_string());
    }
    drop(postgres);
    services.clean().await
}
