//! A PDS host seen from outside: its CARs verify, its firehose carries provable commits,
//! cursors replay and cut over to live without gap or duplicate, and its standard write path
//! and admin API do what a client expects.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_repo::firehose::{Frame, Message, verify_commit};
use atpdb_repo::repo::Write;
use atpdb_repo::syntax::Did;
use atpdb_repo::verify::{Expected, VerifyOptions, load_car};
use common::{Firehose, Read, TestResult, eventually, http, key_of, seq_of, xrpc_get};
use serde_json::json;

async fn small() -> Result<Devnet, Box<dyn std::error::Error>> {
    Ok(Devnet::start(DevnetConfig {
        pds_hosts: 2,
        accounts: 6,
        records: 30,
        with_relay: false,
        ..DevnetConfig::default()
    })
    .await?)
}

async fn get_car(
    base: &str,
    did: &Did,
    since: Option<&str>,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let mut query = vec![("did", did.as_str().to_owned())];
    if let Some(since) = since {
        query.push(("since", since.to_owned()));
    }
    let response = http()
        .get(format!("{base}/xrpc/com.atproto.sync.getRepo"))
        .query(&query)
        .send()
        .await?;
    assert_eq!(response.status(), 200, "getRepo of {did}");
    assert_eq!(
        response.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/vnd.ipld.car"[..])
    );
    Ok(response.bytes().await?.to_vec())
}

/// Creates the thread `com.example.forum.thread/<rkey>` titled `title` in `did`'s repo.
fn write_thread(
    pds: &atpdb_devnet::pds::Pds,
    did: &Did,
    rkey: &str,
    title: &str,
) -> Result<atpdb_repo::repo::CommitData, Box<dyn std::error::Error>> {
    Ok(pds.write(
        did,
        &[Write::Create {
            path: format!("com.example.forum.thread/{rkey}"),
            record: atpdb_repo::value::Value::from_json(
                &json!({"$type": "com.example.forum.thread", "title": title}),
            )?
            .to_cbor(),
        }],
        None,
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_repo_verifies_with_its_plc_key() -> TestResult {
    let devnet = small().await?;
    for account in devnet.accounts() {
        let base = devnet.hosts()[account.pds].url();
        let car = get_car(base, &account.did, None).await?;
        let key = key_of(&devnet, &account.did)?;
        let repo = load_car(car.as_slice(), &VerifyOptions::default())?.verify(Expected {
            did: Some(&account.did),
            key: &key,
        })?;
        let mut walker = repo.records();
        let mut count = 0;
        while walker.next_record()?.is_some() {
            count += 1;
        }
        assert_eq!(count, 31, "30 records and a profile in {}", account.did);
        let (status, latest) = xrpc_get(
            base,
            "com.atproto.sync.getLatestCommit",
            &[("did", account.did.as_str())],
        )
        .await?;
        assert_eq!(status, 200);
        assert_eq!(latest["cid"], repo.commit_cid().to_string());
        assert_eq!(latest["rev"], repo.commit().rev.to_string());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_since_sends_only_newer_blocks() -> TestResult {
    let devnet = small().await?;
    let account = &devnet.accounts()[0];
    let pds = &devnet.hosts()[account.pds];
    let before = pds.account_info(&account.did)?.rev;
    let full = get_car(pds.url(), &account.did, None).await?;
    write_thread(pds, &account.did, "3l4z2xq7nqs2a", "hello")?;
    let diff = get_car(pds.url(), &account.did, Some(before.as_str())).await?;
    assert!(
        diff.len() < full.len() / 2,
        "diff {} vs full {}",
        diff.len(),
        full.len()
    );
    let mut reader = atpdb_repo::car::CarReader::new(diff.as_slice(), Default::default())?;
    let mut cids = BTreeSet::new();
    while let Some(block) = reader.next_block()? {
        cids.insert(block.cid);
    }
    let info = pds.account_info(&account.did)?;
    assert!(cids.contains(&info.commit), "the diff holds the new commit");
    let (status, error) = xrpc_get(
        pds.url(),
        "com.atproto.sync.getRepo",
        &[("did", account.did.as_str()), ("since", "nope")],
    )
    .await?;
    assert_eq!(
        (status, error["error"].as_str()),
        (400, Some("InvalidRequest"))
    );
    Ok(())
}

/// The host keeps the last whole CAR it served; a write must replace it, or a resync after
/// live traffic would fetch the repo as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_repo_fetched_again_after_a_write_holds_the_write() -> TestResult {
    let devnet = small().await?;
    let account = &devnet.accounts()[0];
    let pds = &devnet.hosts()[account.pds];
    let key = key_of(&devnet, &account.did)?;
    let first = get_car(pds.url(), &account.did, None).await?;
    assert_eq!(
        get_car(pds.url(), &account.did, None).await?,
        first,
        "unchanged repo, same CAR"
    );
    write_thread(pds, &account.did, "3l4z2xq7nqs2a", "hello")?;
    let after = get_car(pds.url(), &account.did, None).await?;
    let repo = load_car(after.as_slice(), &VerifyOptions::default())?.verify(Expected {
        did: Some(&account.did),
        key: &key,
    })?;
    assert_eq!(repo.commit_cid(), pds.account_info(&account.did)?.commit);
    let mut walker = repo.records();
    let mut paths = Vec::new();
    while let Some(record) = walker.next_record()? {
        paths.push(format!("{}/{}", record.collection, record.rkey));
    }
    assert_eq!(paths.len(), 32, "30 records, a profile and the new one");
    assert!(paths.contains(&"com.example.forum.thread/3l4z2xq7nqs2a".to_owned()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_commit_on_the_firehose_inverts_to_prev_data() -> TestResult {
    let devnet = small().await?;
    for pds in devnet.hosts() {
        let head = pds.head_seq();
        let mut firehose = Firehose::connect(pds.url(), Some(0)).await?;
        let frames = firehose.frames_until(head).await?;
        let mut seqs = Vec::new();
        let (mut proven, mut first) = (0, 0);
        for frame in &frames {
            seqs.push(seq_of(frame).ok_or("unsequenced frame")?);
            if let Frame::Message(Message::Commit(commit)) = frame {
                let key = key_of(&devnet, &commit.repo)?;
                let verified = verify_commit(commit, &key)?;
                if commit.prev_data.is_some() {
                    assert!(verified.is_proven(), "commit {} inverts", commit.rev);
                    proven += 1;
                } else {
                    first += 1;
                }
            }
        }
        assert_eq!(
            seqs,
            (1..=head).collect::<Vec<_>>(),
            "seqs 1..=head once each"
        );
        assert_eq!(first, 3, "each new repo's first commit has no prevData");
        assert!(proven >= 3, "later commits are proven");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_replay_cuts_over_to_live_without_gap_or_duplicate() -> TestResult {
    let mut devnet = small().await?;
    let pds = devnet.hosts()[0].clone();
    let start = pds.head_seq() / 2;
    devnet.start_traffic(400.0);
    // Connect mid-stream while traffic runs: the replay and the live tail meet somewhere.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut firehose = Firehose::connect(pds.url(), Some(start)).await?;
    let target = pds.head_seq() + 200;
    let frames = firehose.frames_until(target).await?;
    devnet.stop_traffic();
    let seqs: Vec<u64> = frames.iter().filter_map(seq_of).collect();
    assert_eq!(seqs, (start + 1..=target).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_and_outdated_cursors() -> TestResult {
    let devnet = small().await?;
    let pds = &devnet.hosts()[0];
    let head = pds.head_seq();
    let mut firehose = Firehose::connect(pds.url(), Some(head + 10)).await?;
    match firehose.frame().await? {
        Frame::Error { error, .. } => assert_eq!(error, "FutureCursor"),
        other => return Err(format!("expected FutureCursor, got {other:?}").into()),
    }
    assert!(matches!(firehose.next().await?, Read::Closed));

    pds.trim_window(5);
    let mut firehose = Firehose::connect(pds.url(), Some(1)).await?;
    match firehose.frame().await? {
        Frame::Message(Message::Info(info)) => assert_eq!(info.name, "OutdatedCursor"),
        other => return Err(format!("expected OutdatedCursor, got {other:?}").into()),
    }
    let frames = firehose.frames_until(head).await?;
    let seqs: Vec<u64> = frames.iter().filter_map(seq_of).collect();
    assert_eq!(
        seqs,
        (head - 4..=head).collect::<Vec<_>>(),
        "the whole remaining window"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_gets_consumer_too_slow() -> TestResult {
    let mut config = DevnetConfig {
        pds_hosts: 1,
        accounts: 2,
        records: 1,
        with_relay: false,
        ..DevnetConfig::default()
    };
    config.pds.max_lag = 50;
    let devnet = Devnet::start(config).await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();
    let mut firehose = Firehose::connect_small_buffer(pds.url()).await?;
    // Big commits fill the socket buffers quickly while the consumer reads nothing.
    let writer = tokio::task::spawn_blocking(move || -> Result<(), String> {
        for round in 0..400u32 {
            let writes: Vec<Write> = (0..50u32)
                .map(|i| Write::Create {
                    path: format!("com.example.blob.chunk/r{round}x{i}"),
                    record: atpdb_repo::value::Value::from_json(&json!({
                        "$type": "com.example.blob.chunk",
                        "text": "x".repeat(400),
                    }))
                    .map(|value| value.to_cbor())
                    .unwrap_or_default(),
                })
                .collect();
            pds.write(&did, &writes, None)
                .map_err(|err| err.to_string())?;
        }
        Ok(())
    });
    writer.await??;
    let mut seen = 0u64;
    loop {
        match firehose.next().await? {
            Read::Frame(Frame::Error { error, .. }) => {
                assert_eq!(error, "ConsumerTooSlow");
                break;
            }
            Read::Frame(_) => seen += 1,
            other => {
                return Err(
                    format!("expected ConsumerTooSlow, got {other:?} after {seen} frames").into(),
                );
            }
        }
    }
    assert!(
        seen < 400,
        "the stream was cut before the end ({seen} frames)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_repos_pages_through_every_account() -> TestResult {
    let devnet = small().await?;
    let pds = &devnet.hosts()[0];
    let mut cursor: Option<String> = None;
    let mut dids = Vec::new();
    loop {
        let mut query = vec![("limit", "2".to_owned())];
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor.clone()));
        }
        let query: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, page) = xrpc_get(pds.url(), "com.atproto.sync.listRepos", &query).await?;
        assert_eq!(status, 200);
        for repo in page["repos"].as_array().ok_or("repos")? {
            assert_eq!(repo["active"], true);
            assert!(repo["head"].is_string() && repo["rev"].is_string());
            dids.push(repo["did"].as_str().ok_or("did")?.to_owned());
        }
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = pds.dids().iter().map(|did| did.to_string()).collect();
    assert_eq!(dids, expected);
    let (status, error) = xrpc_get(
        pds.url(),
        "com.atproto.sync.listRepos",
        &[("limit", "1001")],
    )
    .await?;
    assert_eq!(
        (status, error["error"].as_str()),
        (400, Some("InvalidRequest"))
    );
    Ok(())
}

/// POSTs JSON with a bearer token.
async fn post(
    base: &str,
    nsid: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> Result<(u16, serde_json::Value), Box<dyn std::error::Error>> {
    let mut request = http().post(format!("{base}/xrpc/{nsid}")).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_write_path_works_end_to_end() -> TestResult {
    let devnet = small().await?;
    let base = devnet.hosts()[1].url().to_owned();
    let (status, describe) = xrpc_get(&base, "com.atproto.server.describeServer", &[]).await?;
    assert_eq!(status, 200);
    assert_eq!(describe["availableUserDomains"], json!([".test"]));

    let (status, created) = post(
        &base,
        "com.atproto.server.createAccount",
        None,
        json!({
            "handle": "alice.test", "email": "alice@example.test", "password": "hunter2"
        }),
    )
    .await?;
    assert_eq!(status, 200, "{created}");
    let did = created["did"].as_str().ok_or("did")?.to_owned();
    assert_eq!(created["didDoc"]["service"][0]["serviceEndpoint"], base);
    let (status, taken) = post(
        &base,
        "com.atproto.server.createAccount",
        None,
        json!({
            "handle": "alice.test", "password": "x"
        }),
    )
    .await?;
    assert_eq!(
        (status, taken["error"].as_str()),
        (400, Some("HandleNotAvailable"))
    );

    let (status, bad) = post(
        &base,
        "com.atproto.server.createSession",
        None,
        json!({"identifier": "alice.test", "password": "wrong"}),
    )
    .await?;
    assert_eq!(
        (status, bad["error"].as_str()),
        (401, Some("AuthenticationRequired"))
    );
    let (status, session) = post(
        &base,
        "com.atproto.server.createSession",
        None,
        json!({"identifier": "alice.test", "password": "hunter2"}),
    )
    .await?;
    assert_eq!(status, 200);
    let access = session["accessJwt"].as_str().ok_or("accessJwt")?.to_owned();
    let refresh = session["refreshJwt"]
        .as_str()
        .ok_or("refreshJwt")?
        .to_owned();

    let post_record = json!({"$type": "app.bsky.feed.post", "text": "hello devnet", "createdAt": "2026-11-23T10:00:00.000Z"});
    let (status, unauth) = post(
        &base,
        "com.atproto.repo.createRecord",
        None,
        json!({"repo": did, "collection": "app.bsky.feed.post", "record": post_record}),
    )
    .await?;
    assert_eq!(
        (status, unauth["error"].as_str()),
        (401, Some("AuthenticationRequired"))
    );
    let (status, made) = post(
        &base,
        "com.atproto.repo.createRecord",
        Some(&access),
        json!({"repo": did, "collection": "app.bsky.feed.post", "record": post_record}),
    )
    .await?;
    assert_eq!(status, 200, "{made}");
    let uri = made["uri"].as_str().ok_or("uri")?.to_owned();
    let rkey = uri.rsplit('/').next().ok_or("rkey")?.to_owned();
    let commit_cid = made["commit"]["cid"].as_str().ok_or("commit")?.to_owned();

    let (status, wrong_type) = post(
        &base,
        "com.atproto.repo.createRecord",
        Some(&access),
        json!({"repo": did, "collection": "app.bsky.feed.like", "record": post_record}),
    )
    .await?;
    assert_eq!(
        (status, wrong_type["error"].as_str()),
        (400, Some("InvalidRecord"))
    );

    // A stale swapRecord and a stale swapCommit are refused; the right ones pass.
    let edited = json!({"$type": "app.bsky.feed.post", "text": "edited", "createdAt": "2026-11-23T10:00:01.000Z"});
    let (status, stale) = post(&base, "com.atproto.repo.putRecord", Some(&access), json!({"repo": did, "collection": "app.bsky.feed.post", "rkey": rkey, "record": edited, "swapRecord": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"})).await?;
    assert_eq!(
        (status, stale["error"].as_str()),
        (400, Some("InvalidSwap"))
    );
    let (status, put) = post(&base, "com.atproto.repo.putRecord", Some(&access), json!({"repo": did, "collection": "app.bsky.feed.post", "rkey": rkey, "record": edited, "swapRecord": made["cid"], "swapCommit": commit_cid})).await?;
    assert_eq!(status, 200, "{put}");
    let (status, stale) = post(
        &base,
        "com.atproto.repo.applyWrites",
        Some(&access),
        json!({"repo": did, "swapCommit": commit_cid, "writes": []}),
    )
    .await?;
    assert_eq!(
        (status, stale["error"].as_str()),
        (400, Some("InvalidSwap"))
    );
    let (status, applied) = post(&base, "com.atproto.repo.applyWrites", Some(&access), json!({"repo": did, "writes": [
        {"$type": "com.atproto.repo.applyWrites#create", "collection": "fm.teal.alpha.feed.play", "rkey": "3l4z2xq7nqs2b", "value": {"trackName": "Song", "playedTime": "2026-11-23T10:00:00.000Z"}},
        {"$type": "com.atproto.repo.applyWrites#delete", "collection": "app.bsky.feed.post", "rkey": rkey},
    ]})).await?;
    assert_eq!(status, 200, "{applied}");
    assert_eq!(
        applied["results"][0]["$type"],
        "com.atproto.repo.applyWrites#createResult"
    );
    assert_eq!(
        applied["results"][1]["$type"],
        "com.atproto.repo.applyWrites#deleteResult"
    );

    let (status, record) = xrpc_get(
        &base,
        "com.atproto.repo.getRecord",
        &[
            ("repo", &did),
            ("collection", "fm.teal.alpha.feed.play"),
            ("rkey", "3l4z2xq7nqs2b"),
        ],
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(record["value"]["$type"], "fm.teal.alpha.feed.play");
    let (status, gone) = xrpc_get(
        &base,
        "com.atproto.repo.getRecord",
        &[
            ("repo", &did),
            ("collection", "app.bsky.feed.post"),
            ("rkey", &rkey),
        ],
    )
    .await?;
    assert_eq!(
        (status, gone["error"].as_str()),
        (400, Some("RecordNotFound"))
    );

    // Blobs: upload, reference, read back; size and MIME limits.
    let png = b"\x89PNG\r\n\x1a\nfake image".to_vec();
    let response = http()
        .post(format!("{base}/xrpc/com.atproto.repo.uploadBlob"))
        .bearer_auth(&access)
        .header("content-type", "image/png")
        .body(png.clone())
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let blob: serde_json::Value = response.json().await?;
    let blob_cid = blob["blob"]["ref"]["$link"]
        .as_str()
        .ok_or("blob ref")?
        .to_owned();
    assert_eq!(blob_cid, atpdb_repo::Cid::raw(&png).to_string());
    let response = http()
        .get(format!("{base}/xrpc/com.atproto.sync.getBlob"))
        .query(&[("did", &did), ("cid", &blob_cid)])
        .send()
        .await?;
    assert_eq!(
        response.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"image/png"[..])
    );
    assert_eq!(response.bytes().await?.to_vec(), png);
    let (_, blobs) = xrpc_get(&base, "com.atproto.sync.listBlobs", &[("did", &did)]).await?;
    assert_eq!(blobs["cids"], json!([blob_cid]));
    let response = http()
        .post(format!("{base}/xrpc/com.atproto.repo.uploadBlob"))
        .bearer_auth(&access)
        .body(png.clone())
        .send()
        .await?;
    assert_eq!(response.status(), 400, "no content type");
    let big = vec![0u8; 5 * 1024 * 1024 + 1];
    let response = http()
        .post(format!("{base}/xrpc/com.atproto.repo.uploadBlob"))
        .bearer_auth(&access)
        .header("content-type", "image/png")
        .body(big)
        .send()
        .await?;
    assert_eq!(response.status(), 413);

    // Refresh rotates: the new pair works, the old refresh token no longer does.
    let (status, refreshed) = post(
        &base,
        "com.atproto.server.refreshSession",
        Some(&refresh),
        json!({}),
    )
    .await?;
    assert_eq!(status, 200);
    let (status, _) = post(
        &base,
        "com.atproto.server.refreshSession",
        Some(&refresh),
        json!({}),
    )
    .await?;
    assert_eq!(status, 400);
    let response = http()
        .get(format!("{base}/xrpc/com.atproto.server.getSession"))
        .bearer_auth(refreshed["accessJwt"].as_str().ok_or("jwt")?)
        .send()
        .await?;
    let got: serde_json::Value = response.json().await?;
    assert_eq!(got["handle"], "alice.test");

    let (status, resolved) = xrpc_get(
        &base,
        "com.atproto.identity.resolveHandle",
        &[("handle", "alice.test")],
    )
    .await?;
    assert_eq!(
        (status, resolved["did"].as_str()),
        (200, Some(did.as_str()))
    );
    let (_, described) = xrpc_get(
        &base,
        "com.atproto.repo.describeRepo",
        &[("repo", "alice.test")],
    )
    .await?;
    assert_eq!(described["collections"], json!(["fm.teal.alpha.feed.play"]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_records_pages_newest_first() -> TestResult {
    let devnet = small().await?;
    let account = &devnet.accounts()[1];
    let base = devnet.hosts()[account.pds].url();
    let all: Vec<String> = devnet.hosts()[account.pds]
        .account_paths(&account.did)?
        .into_iter()
        .filter(|path| path.starts_with("app.bsky.feed.like/"))
        .collect();
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let mut query = vec![
            ("repo", account.did.as_str()),
            ("collection", "app.bsky.feed.like"),
            ("limit", "3"),
        ];
        if !cursor.is_empty() {
            query.push(("cursor", cursor.as_str()));
        }
        let (status, page) = xrpc_get(base, "com.atproto.repo.listRecords", &query).await?;
        assert_eq!(status, 200);
        for record in page["records"].as_array().ok_or("records")? {
            let uri = record["uri"].as_str().ok_or("uri")?;
            seen.push(
                uri.split_once("/app.bsky.feed.like/")
                    .map(|(_, rkey)| format!("app.bsky.feed.like/{rkey}"))
                    .ok_or("uri shape")?,
            );
        }
        match page["cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    let mut newest_first = all.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_reach_plc_firehose_and_sync_endpoints() -> TestResult {
    let devnet = small().await?;
    let pds = devnet.hosts()[0].clone();
    let base = pds.url().to_owned();
    let did = devnet.accounts()[0].did.clone();
    let admin = |action: &str| format!("{base}/admin/accounts/{did}/{action}");
    let response = http().post(admin("deactivate")).send().await?;
    assert_eq!(response.status(), 401, "admin needs credentials");
    let response = http()
        .post(admin("deactivate"))
        .basic_auth("admin", Some("wrong"))
        .send()
        .await?;
    assert_eq!(response.status(), 401);

    let mut firehose = Firehose::connect(&base, None).await?;
    let call = |action: &'static str, body: serde_json::Value| {
        let url = admin(action);
        async move {
            let response = http()
                .post(url)
                .basic_auth("admin", Some("admin"))
                .json(&body)
                .send()
                .await?;
            assert_eq!(response.status(), 200, "admin {action}");
            Ok::<_, Box<dyn std::error::Error>>(())
        }
    };
    call("handle", json!({"handle": "renamed.test"})).await?;
    match firehose.frame().await? {
        Frame::Message(Message::Identity(identity)) => {
            assert_eq!(
                identity.handle.as_ref().map(|h| h.as_str()),
                Some("renamed.test")
            );
        }
        other => return Err(format!("expected #identity, got {other:?}").into()),
    }
    assert_eq!(
        devnet.plc().data(&did).ok_or("plc")?.also_known_as,
        vec!["at://renamed.test".to_owned()]
    );

    call("deactivate", json!({})).await?;
    match firehose.frame().await? {
        Frame::Message(Message::Account(account)) => {
            assert!(!account.active);
            assert_eq!(account.status.as_deref(), Some("deactivated"));
        }
        other => return Err(format!("expected #account, got {other:?}").into()),
    }
    let (status, error) =
        xrpc_get(&base, "com.atproto.sync.getRepo", &[("did", did.as_str())]).await?;
    assert_eq!(
        (status, error["error"].as_str()),
        (400, Some("RepoDeactivated"))
    );
    let (_, repo_status) = xrpc_get(
        &base,
        "com.atproto.sync.getRepoStatus",
        &[("did", did.as_str())],
    )
    .await?;
    assert_eq!(repo_status["active"], false);
    call("activate", json!({})).await?;
    call("takedown", json!({})).await?;
    let (status, error) =
        xrpc_get(&base, "com.atproto.sync.getRepo", &[("did", did.as_str())]).await?;
    assert_eq!(
        (status, error["error"].as_str()),
        (400, Some("RepoTakendown"))
    );
    call("activate", json!({})).await?;

    // A rotated key signs the next commits, and the PLC document names it.
    let old_key = key_of(&devnet, &did)?;
    call("rotate-key", json!({"curve": "p256"})).await?;
    let new_key = key_of(&devnet, &did)?;
    assert_ne!(old_key.to_did_key(), new_key.to_did_key());
    let commit = write_thread(&pds, &did, "3l4z2xq7nqs2c", "after rotation")?;
    commit.commit.verify_signature(&new_key)?;
    assert!(commit.commit.verify_signature(&old_key).is_err());

    // Deleting: the account's old events are no longer replayed, its DID is tombstoned.
    let head = pds.head_seq();
    call("delete", json!({})).await?;
    let (status, error) = xrpc_get(
        &base,
        "com.atproto.sync.getRepoStatus",
        &[("did", did.as_str())],
    )
    .await?;
    assert_eq!(
        (status, error["error"].as_str()),
        (400, Some("RepoNotFound"))
    );
    let response = http()
        .get(format!("{}/{did}", devnet.plc_url()))
        .send()
        .await?;
    assert_eq!(response.status(), 404);
    let mut replay = Firehose::connect(&base, Some(0)).await?;
    let frames = replay.frames_until(head + 1).await?;
    for frame in &frames {
        if let Frame::Message(message) = frame
            && message.did().map(|d| d.as_str()) == Some(did.as_str())
        {
            assert!(
                matches!(message, Message::Account(account) if account.status.as_deref() == Some("deleted")),
                "only the deletion itself is replayed, got {message:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_moves_the_account_and_its_events() -> TestResult {
    let devnet = small().await?;
    let (from, to) = (devnet.hosts()[0].clone(), devnet.hosts()[1].clone());
    let did = devnet.accounts()[0].did.clone();
    let mut old_stream = Firehose::connect(from.url(), None).await?;
    let mut new_stream = Firehose::connect(to.url(), None).await?;
    let response = http()
        .post(format!("{}/admin/accounts/{did}/migrate", from.url()))
        .basic_auth("admin", Some("admin"))
        .json(&json!({"to": to.url()}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        devnet.plc().data(&did).ok_or("plc")?.services["atproto_pds"].endpoint,
        to.url()
    );
    match old_stream.frame().await? {
        Frame::Message(Message::Account(account)) => assert!(!account.active),
        other => return Err(format!("expected #account on the old host, got {other:?}").into()),
    }
    let mut kinds = Vec::new();
    for _ in 0..3 {
        if let Frame::Message(message) = new_stream.frame().await? {
            kinds.push(match message {
                Message::Identity(_) => "identity",
                Message::Account(_) => "account",
                Message::Sync(_) => "sync",
                _ => "other",
            });
        }
    }
    assert_eq!(kinds, ["identity", "account", "sync"]);
    let car = get_car(to.url(), &did, None).await?;
    let key = key_of(&devnet, &did)?;
    load_car(car.as_slice(), &VerifyOptions::default())?.verify(Expected {
        did: Some(&did),
        key: &key,
    })?;
    let (status, _) = xrpc_get(
        from.url(),
        "com.atproto.sync.getRepo",
        &[("did", did.as_str())],
    )
    .await?;
    assert_eq!(status, 400, "the old host no longer serves it");
    eventually(
        || to.dids().contains(&did),
        "the new host lists the account",
    )
    .await?;
    Ok(())
}
