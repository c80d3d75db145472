//! The fleet's enumerate and backfill stages on the machine's real Redis, against a devnet:
//! every listed repo ends up in `firehose_backfill`, verified, exactly as its PDS holds it.
//!
//! Needs Redis on 127.0.0.1:6379 (or `ATPDB_TEST_REDIS_URL`). Without it the tests say they
//! did not run and pass, unless `ATPDB_REQUIRE_REDIS=1` (CI) makes them fail. Each test
//! works under its own key prefix and deletes it at the end.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_fleet::backfill::{self, BackfillConfig};
use atpdb_fleet::enumerate::{self, DONE, EnumerateConfig};
use atpdb_fleet::{ConnectionManager, RepoJob, StreamEvent, redis};
use tokio_util::sync::CancellationToken;

mod common;
use common::{TestResult, clean, clients, redis};

async fn xlen(redis: &mut ConnectionManager, stream: &str) -> Result<u64, redis::RedisError> {
    redis::cmd("XLEN").arg(stream).query_async(redis).await
}

/// Every entry of a stream, as field maps.
async fn entries(
    redis: &mut ConnectionManager,
    stream: &str,
) -> Result<Vec<HashMap<String, String>>, redis::RedisError> {
    let all: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(redis)
        .await?;
    Ok(all.into_iter().map(|(_, fields)| fields).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enumerate_and_backfill_put_every_repo_verified_into_the_stream() -> TestResult {
    let Some((mut redis, prefix)) = redis("pipeline").await else {
        return Ok(());
    };
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 2,
        accounts: 40,
        records: 30,
        ..DevnetConfig::default()
    })
    .await?;
    let relay = devnet.relay().ok_or("no relay")?.url().to_owned();
    let (xrpc, identity) = clients(&devnet)?;
    let shutdown = CancellationToken::new();
    let stream_in = format!("{prefix}repo_backfill");
    let stream_out = format!("{prefix}firehose_backfill");
    let errors = format!("{prefix}repo_backfill_errors");

    // Enumerate: every account, once; the relay's cursor key says the listing ended.
    let config = EnumerateConfig {
        relays: vec![relay.clone()],
        stream: stream_in.clone(),
        recheck: None,
        ..EnumerateConfig::default()
    };
    enumerate::run(&xrpc, &mut redis, &config, &shutdown).await?;
    assert_eq!(xlen(&mut redis, &stream_in).await?, 40);
    let cursor: String = redis::cmd("GET")
        .arg(enumerate::cursor_key(&stream_in, &relay))
        .query_async(&mut redis)
        .await?;
    assert_eq!(cursor, DONE);
    let jobs: Vec<RepoJob> = entries(&mut redis, &stream_in)
        .await?
        .iter()
        .map(|fields| serde_json::from_str(&fields["repo"]))
        .collect::<Result<_, _>>()?;
    let mut listed: Vec<&str> = jobs.iter().map(|job| job.did.as_str()).collect();
    listed.sort_unstable();
    let mut truth_dids: Vec<&str> = devnet.accounts().iter().map(|a| a.did.as_str()).collect();
    truth_dids.sort_unstable();
    assert_eq!(listed, truth_dids);
    assert!(
        jobs.iter()
            .all(|job| job.active && job.host == relay && !job.rev.is_empty())
    );
    // A re-check starts where the listing ended and queues nothing already queued.
    let again = enumerate::list_relay(&xrpc, &mut redis, &config, &relay, &shutdown).await?;
    assert_eq!(again.queued, 0);
    assert_eq!(xlen(&mut redis, &stream_in).await?, 40);

    // Bad entries: one that is not a job, one whose DID resolves nowhere.
    let _: String = redis::cmd("XADD")
        .arg(&stream_in)
        .arg("*")
        .arg("repo")
        .arg("{not json")
        .query_async(&mut redis)
        .await?;
    let nowhere = RepoJob {
        did: "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".to_owned(),
        host: relay.clone(),
        rev: String::new(),
        status: None,
        active: true,
    };
    let _: String = redis::cmd("XADD")
        .arg(&stream_in)
        .arg("*")
        .arg("repo")
        .arg(serde_json::to_string(&nowhere)?)
        .query_async(&mut redis)
        .await?;

    // A worker that takes 5 entries and dies without acknowledging them.
    let config = BackfillConfig {
        stream_in: stream_in.clone(),
        stream_out: stream_out.clone(),
        errors_stream: errors.clone(),
        group: format!("{prefix}group"),
        concurrency: 3,
        max_attempts: 2,
        claim_idle: Duration::from_millis(600),
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        exit_when_idle: Some(Duration::from_secs(2)),
        ..BackfillConfig::default()
    };
    backfill::ensure_group(&mut redis, &stream_in, &config.group).await?;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&config.group)
        .arg("dead-worker")
        .arg("COUNT")
        .arg(5)
        .arg("STREAMS")
        .arg(&stream_in)
        .arg(">")
        .query_async(&mut redis)
        .await?;

    // Two live workers share the rest and take over the dead one's entries.
    let mut workers = tokio::task::JoinSet::new();
    for name in ["worker-1", "worker-2"] {
        let config = BackfillConfig {
            consumer: name.to_owned(),
            ..config.clone()
        };
        let (xrpc, identity, redis, shutdown) = (
            xrpc.clone(),
            identity.clone(),
            redis.clone(),
            shutdown.clone(),
        );
        workers.spawn(async move { backfill::run(xrpc, identity, redis, config, shutdown).await });
    }
    let mut total = backfill::Backfilled::default();
    while let Some(done) =
        tokio::time::timeout(Duration::from_secs(120), workers.join_next()).await?
    {
        let done = done??;
        total.repos += done.repos;
        total.records += done.records;
        total.parked += done.parked;
        total.claimed += done.claimed;
    }
    assert_eq!(total.repos, 40, "{total:?}");
    assert_eq!(total.parked, 2, "{total:?}");
    assert!(total.claimed >= 5, "{total:?}");

    // Nothing left to do: the input stream is empty and nothing is pending.
    assert_eq!(xlen(&mut redis, &stream_in).await?, 0);
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&stream_in)
        .arg(&config.group)
        .query_async(&mut redis)
        .await?;
    let redis::Value::Array(summary) = pending else {
        return Err(format!("XPENDING answered {pending:?}").into());
    };
    assert_eq!(
        summary.first(),
        Some(&redis::Value::Int(0)),
        "entries left pending"
    );

    let parked = entries(&mut redis, &errors).await?;
    assert_eq!(parked.len(), 2);
    assert!(
        parked
            .iter()
            .any(|fields| fields["reason"].contains("not a job"))
    );
    assert!(
        parked
            .iter()
            .any(|fields| fields["reason"].contains(&nowhere.did)
                && fields["reason"].contains("after 2 attempts"))
    );

    // The output: each repo's records exactly as its PDS holds them, each chunk followed by
    // a repo event at the repo's rev.
    let mut records: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut repo_events: BTreeMap<String, String> = BTreeMap::new();
    for fields in entries(&mut redis, &stream_out).await? {
        match serde_json::from_str::<StreamEvent>(&fields["event"])? {
            StreamEvent::Create {
                seq,
                did,
                collection,
                rkey,
                cid,
                record,
                ..
            } => {
                assert_eq!(seq, -1);
                assert!(record.get("$type").is_some());
                records
                    .entry(did)
                    .or_default()
                    .insert(format!("{collection}/{rkey}"), cid);
            }
            StreamEvent::Repo { did, rev, .. } => {
                repo_events.insert(did, rev);
            }
            other => return Err(format!("a backfill wrote a live event: {other:?}").into()),
        }
    }
    for account in devnet.accounts() {
        let host = &devnet.hosts()[account.pds];
        let truth: BTreeMap<String, String> = host
            .account_records(&account.did)?
            .into_iter()
            .map(|(path, cid)| (path, cid.to_string()))
            .collect();
        let did = account.did.to_string();
        assert_eq!(records.get(&did), Some(&truth), "records of {did}");
        assert_eq!(
            repo_events.get(&did).map(String::as_str),
            Some(host.account_info(&account.did)?.rev.as_str()),
            "repo event of {did}"
        );
    }
    clean(&mut redis, &prefix).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_worker_waits_while_the_output_stream_is_full() -> TestResult {
    let Some((mut redis, prefix)) = redis("high-water").await else {
        return Ok(());
    };
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 3,
        records: 10,
        ..DevnetConfig::default()
    })
    .await?;
    let (xrpc, identity) = clients(&devnet)?;
    let shutdown = CancellationToken::new();
    let stream_in = format!("{prefix}repo_backfill");
    let stream_out = format!("{prefix}firehose_backfill");
    for account in devnet.accounts() {
        let job = RepoJob {
            did: account.did.to_string(),
            host: "relay".to_owned(),
            rev: String::new(),
            status: None,
            active: true,
        };
        let _: String = redis::cmd("XADD")
            .arg(&stream_in)
            .arg("*")
            .arg("repo")
            .arg(serde_json::to_string(&job)?)
            .query_async(&mut redis)
            .await?;
    }
    // The mark is already reached: nothing may be written until a consumer drains it.
    for _ in 0..5 {
        let _: String = redis::cmd("XADD")
            .arg(&stream_out)
            .arg("*")
            .arg("event")
            .arg("{}")
            .query_async(&mut redis)
            .await?;
    }
    let config = BackfillConfig {
        stream_in: stream_in.clone(),
        stream_out: stream_out.clone(),
        errors_stream: format!("{prefix}errors"),
        group: format!("{prefix}group"),
        high_water: 5,
        chunk: 4,
        exit_when_idle: Some(Duration::from_secs(1)),
        ..BackfillConfig::default()
    };
    let worker = tokio::spawn(backfill::run(
        xrpc,
        identity,
        redis.clone(),
        config,
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        xlen(&mut redis, &stream_out).await?,
        5,
        "written past the mark"
    );
    // A consumer drains the stream; the worker goes on, one chunk at a time, and the
    // stream never holds more than the mark plus one chunk and its repo event.
    let mut most = 0;
    let done = loop {
        let length = xlen(&mut redis, &stream_out).await?;
        most = most.max(length);
        let _: () = redis::cmd("DEL")
            .arg(&stream_out)
            .query_async(&mut redis)
            .await?;
        if worker.is_finished() {
            break worker.await??;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(done.repos, 3);
    assert!(most <= 5 + 4 + 1, "the stream held {most} entries");
    clean(&mut redis, &prefix).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enumerate_skips_past_an_entry_the_relay_keeps_failing_on_and_says_so() -> TestResult {
    let Some((mut redis, prefix)) = redis("skip").await else {
        return Ok(());
    };
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 20,
        records: 1,
        ..DevnetConfig::default()
    })
    .await?;
    let relay = devnet.relay().ok_or("no relay")?;
    // Every page asked for at cursor 10 fails, whatever its size: the entry after it is
    // one the relay cannot serve (rsky's enumerator looped here forever).
    relay.faults().update(|faults| {
        faults.status = Some(500);
        faults.paths = vec![
            "listRepos?limit=5&cursor=10".to_owned(),
            "listRepos?limit=1&cursor=10".to_owned(),
        ];
    });
    let (xrpc, _) = clients(&devnet)?;
    let stream = format!("{prefix}repo_backfill");
    let config = EnumerateConfig {
        relays: vec![relay.url().to_owned()],
        stream: stream.clone(),
        batch_size: 5,
        recheck: None,
        ..EnumerateConfig::default()
    };
    let listed = enumerate::list_relay(
        &xrpc,
        &mut redis,
        &config,
        relay.url(),
        &CancellationToken::new(),
    )
    .await?;
    assert_eq!(listed.skipped, 1, "{listed:?}");
    assert_eq!(
        listed.queued, 19,
        "every entry but the one skipped: {listed:?}"
    );
    assert_eq!(xlen(&mut redis, &stream).await?, 19);
    let cursor: String = redis::cmd("GET")
        .arg(enumerate::cursor_key(&stream, relay.url()))
        .query_async(&mut redis)
        .await?;
    assert_eq!(cursor, DONE);
    clean(&mut redis, &prefix).await
}
