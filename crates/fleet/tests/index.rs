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
use atpdb_fleet::ingest::{self, IngestConfig};
use atpdb_fleet::{ConnectionManager, StreamEvent, redis};
use atpdb_identity::Network;
use atpdb_repo::repo::Write;
use atpdb_repo::sample::sample_record;
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

fn event(did: &str, path: &str, rev: &str, record: serde_json::Value) -> StreamEvent {
    let (collection, rkey) = path.split_once('/').unwrap_or((path, ""));
    StreamEvent::Create {
        seq: -1,
        time: "2026-01-01T00:00:00.000Z".to_owned(),
        did: did.to_owned(),
        commit: "bafycommit".to_owned(),
        rev: rev.to_owned(),
        collection: collection.to_owned(),
        rkey: rkey.to_owned(),
        cid: format!("cid-{path}-{rev}"),
        record,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typed_tables_hold_each_records_fields_under_the_same_guard() -> TestResult {
    let Some(mut services) = services("typed").await else {
        return Ok(());
    };
    let stream = format!("{}firehose_backfill", services.prefix);
    let did = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb";
    let other = "did:plc:cccccccccccccccccccccccc";
    let (old, new) = ("3kaaaaaaaaa22", "3kbbbbbbbbb22");
    let post_uri = format!("at://{other}/app.bsky.feed.post/p1");
    let subject = serde_json::json!({"uri": post_uri, "cid": "bafysubject"});
    let events = [
        event(
            did,
            "app.bsky.feed.post/1",
            old,
            serde_json::json!({
                "$type": "app.bsky.feed.post", "text": "a reply", "createdAt": "2026-01-01T00:00:00Z",
                "langs": ["en", 7, "fr"],
                "reply": {"root": subject, "parent": {"uri": "at://x/app.bsky.feed.post/parent", "cid": "c"}},
                "embed": {"$type": "app.bsky.embed.recordWithMedia", "record": {"record": {"uri": "at://q/app.bsky.feed.post/q", "cid": "c"}}},
            }),
        ),
        // The data model allows U+0000; PostgreSQL does not; a malformed createdAt is NULL.
        event(
            did,
            "app.bsky.feed.post/2",
            old,
            serde_json::json!({
                "$type": "app.bsky.feed.post", "text": "nul\u{0}here", "createdAt": {"not": "a string"},
            }),
        ),
        event(
            did,
            "app.bsky.feed.like/1",
            old,
            serde_json::json!({"$type": "app.bsky.feed.like", "subject": subject, "createdAt": "2026"}),
        ),
        event(
            did,
            "app.bsky.feed.repost/1",
            old,
            serde_json::json!({"$type": "app.bsky.feed.repost", "subject": subject, "createdAt": "2026"}),
        ),
        event(
            did,
            "app.bsky.graph.follow/1",
            old,
            serde_json::json!({"$type": "app.bsky.graph.follow", "subject": other, "createdAt": "2026"}),
        ),
        event(
            did,
            "app.bsky.actor.profile/self",
            old,
            serde_json::json!({
                "$type": "app.bsky.actor.profile", "displayName": "Bee", "description": "hi",
                "avatar": {"$type": "blob", "ref": {"$link": "bafyavatar"}, "mimeType": "image/png", "size": 1},
            }),
        ),
        // Only `self` is the profile.
        event(
            did,
            "app.bsky.actor.profile/other",
            new,
            serde_json::json!({"$type": "app.bsky.actor.profile", "displayName": "Not me"}),
        ),
        event(
            did,
            "app.bsky.feed.generator/hot",
            old,
            serde_json::json!({
                "$type": "app.bsky.feed.generator", "did": "did:web:feeds.example", "displayName": "Hot", "createdAt": "2026",
            }),
        ),
        // The like is deleted at the newer rev; a late backfill of the older rev (after it in
        // the stream) must not bring it back.
        StreamEvent::Delete {
            seq: 9,
            time: "2026-01-01T00:00:01.000Z".to_owned(),
            did: did.to_owned(),
            commit: "bafynew".to_owned(),
            rev: new.to_owned(),
            collection: "app.bsky.feed.like".to_owned(),
            rkey: "1".to_owned(),
        },
        event(
            did,
            "app.bsky.feed.like/1",
            old,
            serde_json::json!({"$type": "app.bsky.feed.like", "subject": subject, "createdAt": "2026"}),
        ),
        // The follow is updated at the newer rev in one batch with its older create.
        event(
            did,
            "app.bsky.graph.follow/1",
            new,
            serde_json::json!({"$type": "app.bsky.graph.follow", "subject": "did:plc:dddddddddddddddddddddddd"}),
        ),
    ];
    for event in &events {
        add(&mut services.redis, &stream, event).await?;
    }
    let mut postgres = pg_connect(&services.url).await?;
    let config = IndexConfig {
        streams: vec![stream],
        group: format!("{}group", services.prefix),
        exit_when_idle: Some(Duration::from_millis(300)),
        ..IndexConfig::default()
    };
    let done = index::run(
        services.redis.clone(),
        &mut postgres,
        &config,
        &CancellationToken::new(),
    )
    .await?;
    assert_eq!((done.entries, done.unreadable), (11, 0));

    let post = postgres
        .query(
            "SELECT rkey, text, created_at, reply_root_uri, reply_parent_uri, quote_uri, langs FROM post ORDER BY rkey",
            &[],
        )
        .await?;
    let post: Vec<_> = post
        .iter()
        .map(|row| {
            (
                row.get::<_, String>(0),
                row.get::<_, Option<String>>(1),
                row.get::<_, Option<String>>(2),
                row.get::<_, Option<String>>(3),
                row.get::<_, Option<String>>(4),
                row.get::<_, Option<String>>(5),
                row.get::<_, Option<Vec<String>>>(6),
            )
        })
        .collect();
    assert_eq!(
        post,
        [
            (
                "1".to_owned(),
                Some("a reply".to_owned()),
                Some("2026-01-01T00:00:00Z".to_owned()),
                Some(post_uri.clone()),
                Some("at://x/app.bsky.feed.post/parent".to_owned()),
                Some("at://q/app.bsky.feed.post/q".to_owned()),
                Some(vec!["en".to_owned(), "fr".to_owned()]),
            ),
            (
                "2".to_owned(),
                Some("nul\u{fffd}here".to_owned()),
                None,
                None,
                None,
                None,
                None
            ),
        ]
    );
    let like = postgres
        .query_one("SELECT subject_uri, deleted, rev FROM \"like\"", &[])
        .await?;
    assert_eq!(
        (like.get::<_, Option<String>>(0), like.get(1), like.get(2)),
        (None, true, new.to_owned()),
        "the late backfill brought the deleted like back"
    );
    let repost = postgres
        .query_one("SELECT subject_uri, subject_cid FROM repost", &[])
        .await?;
    assert_eq!(
        (repost.get::<_, String>(0), repost.get::<_, String>(1)),
        (post_uri.clone(), "bafysubject".to_owned())
    );
    let follow = postgres
        .query_one("SELECT subject_did, rev FROM follow", &[])
        .await?;
    assert_eq!(
        (follow.get::<_, String>(0), follow.get::<_, String>(1)),
        (
            "did:plc:dddddddddddddddddddddddd".to_owned(),
            new.to_owned()
        )
    );
    let actor = postgres
        .query(
            "SELECT did, display_name, description, avatar_cid FROM actor",
            &[],
        )
        .await?;
    let actor: Vec<(String, String, String, String)> = actor
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    assert_eq!(
        actor,
        [(
            did.to_owned(),
            "Bee".to_owned(),
            "hi".to_owned(),
            "bafyavatar".to_owned()
        )]
    );
    let generator = postgres
        .query_one(
            "SELECT uri, service_did, display_name FROM feed_generator",
            &[],
        )
        .await?;
    assert_eq!(
        (
            generator.get::<_, String>(0),
            generator.get::<_, String>(1),
            generator.get::<_, String>(2)
        ),
        (
            format!("at://{did}/app.bsky.feed.generator/hot"),
            "did:web:feeds.example".to_owned(),
            "Hot".to_owned()
        )
    );
    // Every typed row has its generic row.
    let orphans: i64 = postgres
        .query_one(
            "SELECT count(*) FROM (SELECT uri FROM post UNION ALL SELECT uri FROM \"like\" \
             UNION ALL SELECT uri FROM repost UNION ALL SELECT uri FROM follow \
             UNION ALL SELECT uri FROM feed_generator) typed \
             WHERE NOT EXISTS (SELECT 1 FROM record WHERE record.uri = typed.uri)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(orphans, 0);

    // A complete snapshot at a newer rev holds only post 1: every other record was deleted in
    // commits the pipeline missed, in `record` and in every typed table. Then the account is
    // deleted: nothing of it stays.
    let newest = "3kccccccccc22";
    let snapshot = [
        event(
            did,
            "app.bsky.feed.post/1",
            newest,
            serde_json::json!({"$type": "app.bsky.feed.post", "text": "kept", "createdAt": "2026"}),
        ),
        StreamEvent::Repo {
            seq: -1,
            time: "2026-01-01T00:00:02.000Z".to_owned(),
            did: did.to_owned(),
            commit: "bafynewest".to_owned(),
            rev: newest.to_owned(),
            complete: true,
        },
    ];
    for event in &snapshot {
        add(&mut services.redis, &config.streams[0], event).await?;
    }
    index::run(
        services.redis.clone(),
        &mut postgres,
        &config,
        &CancellationToken::new(),
    )
    .await?;
    let live = "SELECT 'record', uri FROM record WHERE NOT deleted
                UNION ALL SELECT 'post', uri FROM post WHERE NOT deleted
                UNION ALL SELECT 'like', uri FROM \"like\" WHERE NOT deleted
                UNION ALL SELECT 'repost', uri FROM repost WHERE NOT deleted
                UNION ALL SELECT 'follow', uri FROM follow WHERE NOT deleted
                UNION ALL SELECT 'actor', did FROM actor WHERE NOT deleted
                UNION ALL SELECT 'feed_generator', uri FROM feed_generator WHERE NOT deleted
                ORDER BY 1";
    let kept = format!("at://{did}/app.bsky.feed.post/1");
    let rows: Vec<(String, String)> = postgres
        .query(live, &[])
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        rows,
        [
            ("post".to_owned(), kept.clone()),
            ("record".to_owned(), kept.clone())
        ],
        "the snapshot's sweep left rows it does not hold"
    );
    add(
        &mut services.redis,
        &config.streams[0],
        &StreamEvent::Account {
            seq: 10,
            time: "2026-01-01T00:00:03.000Z".to_owned(),
            did: did.to_owned(),
            active: false,
            status: Some("deleted".to_owned()),
        },
    )
    .await?;
    index::run(
        services.redis.clone(),
        &mut postgres,
        &config,
        &CancellationToken::new(),
    )
    .await?;
    let rows = postgres.query(live, &[]).await?.len();
    assert_eq!(rows, 0, "a deleted account's rows stayed live");
    drop(postgres);
    services.clean().await
}

/// Waits until the ingester's cursor reaches the relay's head.
async fn caught_up(
    redis: &mut ConnectionManager,
    cursor_key: &str,
    relay: &atpdb_devnet::relay::Relay,
) -> TestResult {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let cursor: Option<u64> = redis::cmd("GET").arg(cursor_key).query_async(redis).await?;
        if cursor.unwrap_or(0) >= relay.head_seq() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the ingester's cursor stayed at {cursor:?}, the relay is at {}",
                relay.head_seq()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_verifies_the_firehose_and_the_index_ends_equal_to_every_pds() -> TestResult {
    let Some(mut services) = services("ingest").await else {
        return Ok(());
    };
    let mut devnet = Devnet::start(DevnetConfig {
        pds_hosts: 2,
        accounts: 8,
        records: 5,
        ..DevnetConfig::default()
    })
    .await?;
    let (xrpc, identity) = common::clients(&devnet)?;
    let relay = devnet.relay().ok_or("no relay")?.clone();
    let prefix = services.prefix.clone();
    let config = IngestConfig {
        relay: relay.url().to_owned(),
        stream: format!("{prefix}firehose_live"),
        resync_stream: format!("{prefix}repo_backfill"),
        parallelism: 8,
        ..IngestConfig::default()
    };
    // Cursor 0: the relay replays its whole window, so the firehose alone holds every repo.
    let _: () = redis::cmd("SET")
        .arg(config.cursor_key())
        .arg(0)
        .query_async(&mut services.redis)
        .await?;
    let shutdown = CancellationToken::new();
    let ingester = {
        let (http, redis, config, shutdown) = (
            Network::new(devnet.network_config())?.http,
            services.redis.clone(),
            config.clone(),
            shutdown.clone(),
        );
        let identity = identity.clone();
        tokio::spawn(async move {
            ingest::run(&http, identity, redis, &config, &shutdown)
                .await
                .map_err(|err| err.to_string())
        })
    };
    // Live traffic, then commits with a bad signature (dropped: the next commit of each such
    // repo no longer chains, so it is queued for a snapshot), then replayed duplicates.
    devnet.start_traffic(40.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.faults().update(|faults| faults.bad_signature = true);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    relay.faults().clear();
    relay.faults().update(|faults| faults.duplicate_seqs = true);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    relay.faults().clear();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    devnet.stop_traffic();
    let accounts = devnet.accounts().to_vec();
    // A delete the ingester never sees (its commit fails verification): only the snapshot
    // taken when the next commit breaks the chain can remove the record.
    let victim = &accounts[2];
    let host = &devnet.hosts()[victim.pds];
    let gone = host
        .account_paths(&victim.did)?
        .into_iter()
        .find(|path| !path.starts_with("app.bsky.actor.profile"))
        .ok_or("no record to delete")?;
    caught_up(&mut services.redis, &config.cursor_key(), &relay).await?;
    relay.faults().update(|faults| faults.bad_signature = true);
    host.write(&victim.did, &[Write::Delete { path: gone.clone() }], None)?;
    caught_up(&mut services.redis, &config.cursor_key(), &relay).await?;
    relay.faults().clear();
    let micros = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros(),
    )?;
    let next = sample_record(7, 1, micros, &[accounts[3].did.clone()]);
    host.write(
        &victim.did,
        &[Write::Create {
            path: next.path(),
            record: next.to_cbor()?,
        }],
        None,
    )?;
    let renamed = &accounts[0];
    devnet.hosts()[renamed.pds].set_handle(&renamed.did, "renamed.test".parse()?)?;
    let paused = &accounts[1];
    devnet.hosts()[paused.pds].set_status(&paused.did, atpdb_devnet::pds::Status::Deactivated)?;
    caught_up(&mut services.redis, &config.cursor_key(), &relay).await?;
    shutdown.cancel();
    let ingested = ingester.await??;
    assert!(ingested.invalid > 0, "{ingested:?}");
    assert!(ingested.stale > 0, "{ingested:?}");
    assert!(ingested.resyncs > 0, "{ingested:?}");

    // The repos whose chain broke are backfilled; both streams are indexed.
    let backfill_stream = format!("{prefix}firehose_backfill");
    backfill::run(
        xrpc,
        identity,
        services.redis.clone(),
        BackfillConfig {
            stream_in: config.resync_stream.clone(),
            stream_out: backfill_stream.clone(),
            errors_stream: format!("{prefix}errors"),
            group: format!("{prefix}backfill"),
            exit_when_idle: Some(Duration::from_millis(500)),
            ..BackfillConfig::default()
        },
        CancellationToken::new(),
    )
    .await?;
    let mut postgres = pg_connect(&services.url).await?;
    index::run(
        services.redis.clone(),
        &mut postgres,
        &IndexConfig {
            streams: vec![config.stream.clone(), backfill_stream],
            group: format!("{prefix}index"),
            exit_when_idle: Some(Duration::from_millis(500)),
            ..IndexConfig::default()
        },
        &CancellationToken::new(),
    )
    .await?;
    // The deactivated account's host no longer serves its repo, so a snapshot it needed
    // cannot be taken; every other account must match exactly.
    for account in accounts.iter().filter(|account| account.did != paused.did) {
        let host = &devnet.hosts()[account.pds];
        let truth: BTreeMap<String, String> = host
            .account_records(&account.did)?
            .into_iter()
            .map(|(path, cid)| (path, cid.to_string()))
            .collect();
        let stored: BTreeMap<String, String> = postgres
            .query(
                "SELECT collection || '/' || rkey, cid FROM record WHERE did = $1 AND NOT deleted",
                &[&account.did.as_str()],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(stored, truth, "{}", account.did);
    }
    let deleted: bool = postgres
        .query_one(
            "SELECT deleted FROM record WHERE uri = $1",
            &[&format!("at://{}/{gone}", victim.did)],
        )
        .await?
        .get(0);
    assert!(
        deleted,
        "the record deleted in a missed commit is still there"
    );
    let repo = |did: &str| {
        let postgres = &postgres;
        let did = did.to_owned();
        async move {
            postgres
                .query_one(
                    "SELECT handle, active, status FROM repo WHERE did = $1",
                    &[&did],
                )
                .await
        }
    };
    let row = repo(renamed.did.as_str()).await?;
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("renamed.test")
    );
    let row = repo(paused.did.as_str()).await?;
    assert_eq!(
        (
            row.get::<_, Option<bool>>(1),
            row.get::<_, Option<String>>(2)
        ),
        (Some(false), Some("deactivated".to_owned()))
    );
    drop(postgres);
    devnet.shutdown().await;
    services.clean().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_are_verified_and_the_index_holds_exactly_the_labels_that_apply() -> TestResult {
    use atpdb_devnet::labeler::LabelSpec;
    use atpdb_fleet::labels::{self, LabelsConfig};
    use atpdb_repo::syntax::Datetime;

    let Some(mut services) = services("labels").await else {
        return Ok(());
    };
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 3,
        records: 2,
        with_relay: false,
        with_labeler: true,
        ..DevnetConfig::default()
    })
    .await?;
    let labeler = devnet.labeler().ok_or("no labeler")?.clone();
    let (_, identity) = common::clients(&devnet)?;
    let dids: Vec<String> = devnet
        .accounts()
        .iter()
        .map(|account| account.did.to_string())
        .collect();
    let post = format!("at://{}/app.bsky.feed.post/3kpost", dids[0]);
    let spec = |uri: &str, val: &str| LabelSpec {
        uri: uri.to_owned(),
        val: val.to_owned(),
        ..LabelSpec::default()
    };
    let now_us = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros(),
    )?;
    // History the ingester replays from the start: a label, one withdrawn, one expired, and
    // one signed by a key that is not the labeler's.
    labeler.emit(spec(&post, "spam"));
    let (_, nsfw) = labeler.emit(spec(&dids[1], "nsfw"));
    labeler.emit(LabelSpec {
        neg: true,
        ..spec(&post, "spam")
    });
    labeler.emit(LabelSpec {
        exp: Some(Datetime::from_unix_micros(now_us - 3_600_000_000)),
        ..spec(&dids[2], "expired")
    });
    labeler.forge(spec(&dids[2], "takedown"));

    let prefix = services.prefix.clone();
    let config = LabelsConfig {
        labelers: vec![labeler.did().clone()],
        stream: format!("{prefix}label_live"),
        exit_when_idle: Some(Duration::from_secs(2)),
        ..LabelsConfig::default()
    };
    let ingester_redis = services.redis.clone();
    let ingester_http = Network::new(devnet.network_config())?.http;
    let run_ingester = |shutdown: CancellationToken| {
        let (http, redis, config, identity) = (
            ingester_http.clone(),
            ingester_redis.clone(),
            config.clone(),
            identity.clone(),
        );
        tokio::spawn(async move {
            labels::run(&http, identity, redis, &config, &shutdown)
                .await
                .map_err(|err| err.to_string())
        })
    };
    let ingester = run_ingester(CancellationToken::new());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Live: the label again (it applies again), a withdrawal, a pinned label that expires
    // later.
    labeler.emit(spec(&post, "spam"));
    labeler.emit(LabelSpec {
        neg: true,
        ..spec(&dids[1], "nsfw")
    });
    labeler.emit(LabelSpec {
        cid: Some("bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm".to_owned()),
        exp: Some(Datetime::from_unix_micros(now_us + 3_600_000_000)),
        ..spec(&dids[0], "impersonation")
    });
    let ingested = ingester.await??;
    assert_eq!(ingested.invalid, 1, "the forgery is dropped: {ingested:?}");
    assert_eq!(ingested.labels, 7, "{ingested:?}");
    let cursor: Option<u64> = redis::cmd("GET")
        .arg(config.cursor_key(labeler.did()))
        .query_async(&mut services.redis)
        .await?;
    assert_eq!(cursor, Some(labeler.head()));

    // A restart resumes after the cursor: nothing is written twice.
    let again = run_ingester(CancellationToken::new()).await??;
    assert_eq!((again.labels, again.invalid), (0, 0), "{again:?}");
    let length: u64 = redis::cmd("XLEN")
        .arg(&config.stream)
        .query_async(&mut services.redis)
        .await?;
    assert_eq!(length, 7);

    // A late copy of the withdrawn label (older cts) must not bring it back.
    add(
        &mut services.redis,
        &config.stream,
        &StreamEvent::Label {
            seq: 2,
            src: labeler.did().to_string(),
            uri: nsfw.uri.clone(),
            cid: None,
            val: nsfw.val.clone(),
            neg: false,
            cts: nsfw.cts.to_string(),
            exp: None,
        },
    )
    .await?;
    let mut postgres = index::connect(&services.url).await?;
    let index_config = IndexConfig {
        streams: vec![config.stream.clone()],
        group: format!("{prefix}group"),
        consumer: "indexer_1".to_owned(),
        exit_when_idle: Some(Duration::from_secs(1)),
        ..IndexConfig::default()
    };
    let indexed = index::run(
        services.redis.clone(),
        &mut postgres,
        &index_config,
        &CancellationToken::new(),
    )
    .await?;
    assert_eq!(indexed.entries, 8);

    let applying: Vec<(String, String, String)> = postgres
        .query(
            "SELECT src, uri, val FROM label
             WHERE NOT neg AND (exp IS NULL OR exp::timestamptz > now()) ORDER BY uri, val",
            &[],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let mut truth: Vec<(String, String, String)> = labeler
        .current()
        .into_iter()
        .map(|label| (label.src.to_string(), label.uri, label.val))
        .collect();
    truth.sort_by(|a, b| (&a.1, &a.2).cmp(&(&b.1, &b.2)));
    assert_eq!(applying, truth);
    assert_eq!(
        truth.iter().map(|t| t.2.as_str()).collect::<Vec<_>>(),
        ["spam", "impersonation"]
    );
    let withdrawn: bool = postgres
        .query_one(
            "SELECT neg FROM label WHERE uri = $1 AND val = 'nsfw'",
            &[&dids[1]],
        )
        .await?
        .get(0);
    assert!(
        withdrawn,
        "the late copy did not resurrect the withdrawn label"
    );
    let forged: i64 = postgres
        .query_one("SELECT count(*) FROM label WHERE val = 'takedown'", &[])
        .await?
        .get(0);
    assert_eq!(forged, 0);
    let pinned: Option<String> = postgres
        .query_one("SELECT cid FROM label WHERE val = 'impersonation'", &[])
        .await?
        .get(0);
    assert!(pinned.is_some());
    drop(postgres);
    services.clean().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indexer_starting_beside_running_ones_waits_on_none_of_their_batches() -> TestResult {
    let Some(services) = services("migrate").await else {
        return Ok(());
    };
    let mut running = pg_connect(&services.url).await?;
    index::migrate(&mut running).await?;
    // A running indexer's batch holds what a batch holds on every table it writes.
    let batch = running.transaction().await?;
    batch
        .batch_execute(
            "LOCK TABLE record, repo, post, \"like\", repost, follow, actor, feed_generator, \
             label IN ROW EXCLUSIVE MODE",
        )
        .await?;
    let mut starting = pg_connect(&services.url).await?;
    // Not a speed check: without the schema count this waits until the batch ends, and
    // with a batch that reads `repo` after it, PostgreSQL declared a deadlock.
    let migrated =
        tokio::time::timeout(Duration::from_secs(20), index::migrate(&mut starting)).await;
    batch.rollback().await?;
    assert!(
        migrated.is_ok(),
        "the starting indexer's migrations waited on a running batch"
    );
    migrated??;
    // A database a newer binary set up is refused, not altered.
    starting
        .batch_execute("UPDATE fleet_schema SET applied = applied + 1")
        .await?;
    let err = index::migrate(&mut starting)
        .await
        .err()
        .ok_or("a newer schema was accepted")?;
    assert!(err.to_string().contains("run a newer atpdb"), "{err}");
    drop((running, starting));
    services.clean().await
}
