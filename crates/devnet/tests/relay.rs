//! The relay against a real devnet: what it forwards, what it drops, and what its sync
//! endpoints answer, checked over the wire the way a consumer sees them.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use atpdb_devnet::pds::{Pds, Status};
use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_repo::crypto::PublicKey;
use atpdb_repo::firehose::{self, Frame, Message};
use atpdb_repo::repo::Write;
use atpdb_repo::syntax::{Did, Tid};
use atpdb_repo::value::Value;
use atpdb_repo::verify::{Expected, VerifyOptions, load_car};
use futures_util::StreamExt;
use serde_json::{Value as Json, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TIMEOUT: Duration = Duration::from_secs(60);

async fn start() -> Result<Devnet, Box<dyn std::error::Error>> {
    Ok(Devnet::start(DevnetConfig {
        pds_hosts: 2,
        accounts: 6,
        records: 30,
        ..Default::default()
    })
    .await?)
}

fn relay_of(devnet: &Devnet) -> Result<&atpdb_devnet::relay::Relay, String> {
    devnet
        .relay()
        .ok_or_else(|| "the devnet has no relay".to_owned())
}

/// Polls `check` until it holds; fails with `what` after [`TIMEOUT`].
async fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !check() {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn caught_up(devnet: &Devnet) -> Result<(), String> {
    if devnet.wait_for_relay(TIMEOUT).await {
        Ok(())
    } else {
        Err("the relay did not catch up with the hosts".to_owned())
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(TIMEOUT, future)
        .await
        .map_err(|_| format!("timed out: {what}"))
}

/// Reads `base`'s firehose from `cursor` until an event with seq ≥ `until` arrives.
async fn read_stream(base: &str, cursor: u64, until: u64) -> Result<Vec<Frame>, String> {
    let url = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos?cursor={cursor}",
        base.replacen("http://", "ws://", 1)
    );
    let (mut socket, _) = within("connecting", tokio_tungstenite::connect_async(url.as_str()))
        .await?
        .map_err(|err| format!("connecting to {url}: {err}"))?;
    let mut frames = Vec::new();
    if until <= cursor {
        return Ok(frames);
    }
    loop {
        let next = within("reading the firehose", socket.next()).await?;
        let bytes = match next {
            Some(Ok(WsMessage::Binary(bytes))) => bytes,
            Some(Ok(WsMessage::Close(_))) | None => {
                return Err(format!("{url} closed before seq {until}"));
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(format!("{url}: {err}")),
        };
        let frame =
            firehose::decode_frame(&bytes).map_err(|err| format!("{url}: bad frame: {err}"))?;
        let done = matches!(&frame, Frame::Message(message) if message.seq().is_some_and(|seq| seq >= until));
        frames.push(frame);
        if done {
            return Ok(frames);
        }
    }
}

/// The messages of a stream, failing on error frames.
fn messages(frames: Vec<Frame>) -> Result<Vec<Message>, String> {
    frames
        .into_iter()
        .map(|frame| match frame {
            Frame::Message(message) => Ok(message),
            other => Err(format!("unexpected frame {other:?}")),
        })
        .collect()
}

/// The `#atproto` key of a DID, from the PLC directory's document.
fn key_of(devnet: &Devnet, did: &Did) -> Result<PublicKey, Box<dyn std::error::Error>> {
    let document = devnet.plc().document(did)?;
    let multikey = document["verificationMethod"]
        .as_array()
        .and_then(|methods| {
            methods.iter().find(|method| {
                method["id"]
                    .as_str()
                    .is_some_and(|id| id.ends_with("#atproto"))
            })
        })
        .and_then(|method| method["publicKeyMultibase"].as_str())
        .ok_or_else(|| format!("no #atproto key for {did}"))?;
    Ok(PublicKey::from_multikey(multikey)?)
}

fn post(text: &str) -> Result<Write, Box<dyn std::error::Error>> {
    let record = Value::from_json(&json!({
        "$type": "app.bsky.feed.post",
        "text": text,
        "createdAt": "2025-06-01T00:00:00.000Z",
    }))?;
    Ok(Write::Create {
        path: format!("app.bsky.feed.post/{}", Tid::now(7)),
        record: record.to_cbor(),
    })
}

async fn get_json(url: &str) -> Result<(u16, Json), Box<dyn std::error::Error>> {
    let response = reqwest::get(url).await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

fn commit_revs(messages: &[Message]) -> BTreeSet<(Did, Tid)> {
    messages
        .iter()
        .filter_map(|message| match message {
            Message::Commit(event) => Some((event.repo.clone(), event.rev.clone())),
            _ => None,
        })
        .collect()
}

fn hostname(pds: &Pds) -> &str {
    pds.url().trim_start_matches("http://")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_every_event_once_verified_and_resequenced() -> TestResult {
    let devnet = start().await?;
    let relay = relay_of(&devnet)?;
    let head = relay.head_seq();
    let relayed = messages(read_stream(relay.url(), 0, head).await?)?;

    let seqs: Vec<u64> = relayed.iter().filter_map(Message::seq).collect();
    assert_eq!(seqs.len(), relayed.len(), "every relayed message has a seq");
    assert!(
        seqs.windows(2).all(|pair| pair[0] < pair[1]),
        "relay seqs are not strictly increasing: {seqs:?}"
    );
    assert_eq!(seqs.last().copied(), Some(head));

    let mut upstream = Vec::new();
    for pds in devnet.hosts() {
        upstream.extend(messages(read_stream(pds.url(), 0, pds.head_seq()).await?)?);
    }
    assert_eq!(
        relayed.len(),
        upstream.len(),
        "with no faults the relay forwards every upstream event exactly once"
    );
    assert_eq!(commit_revs(&relayed), commit_revs(&upstream));

    let mut keys = BTreeMap::new();
    let mut commits = 0;
    for message in &relayed {
        match message {
            Message::Commit(event) => {
                if !keys.contains_key(&event.repo) {
                    keys.insert(event.repo.clone(), key_of(&devnet, &event.repo)?);
                }
                let key = &keys[&event.repo];
                let verified = firehose::verify_commit(event, key)
                    .map_err(|err| format!("{} rev {}: {err}", event.repo, event.rev))?;
                if event.since.is_some() {
                    assert!(
                        verified.is_proven(),
                        "{} rev {} was not proven by inversion",
                        event.repo,
                        event.rev
                    );
                }
                commits += 1;
            }
            Message::Identity(event) => {
                assert_eq!(
                    event.handle, None,
                    "the relay omits handle, as the real one does"
                );
            }
            _ => {}
        }
    }
    assert!(commits >= devnet.accounts().len(), "only {commits} commits");
    assert_eq!(relay.stats().invalid_commits, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_queries_agree_with_the_hosts() -> TestResult {
    let devnet = start().await?;
    let relay = relay_of(&devnet)?;
    let base = relay.url();

    // listRepos, paged two at a time.
    let mut listed = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/xrpc/com.atproto.sync.listRepos?limit=2");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let (status, page) = get_json(&url).await?;
        assert_eq!(status, 200, "{page}");
        for repo in page["repos"].as_array().ok_or("repos is not a list")? {
            let did = repo["did"].as_str().ok_or("repo without did")?.to_owned();
            assert!(
                listed.insert(did, repo.clone()).is_none(),
                "a DID listed twice"
            );
        }
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(listed.len(), devnet.accounts().len());
    for account in devnet.accounts() {
        let pds = &devnet.hosts()[account.pds];
        let info = pds.account_info(&account.did)?;
        let repo = &listed[account.did.as_str()];
        assert_eq!(
            repo["head"],
            json!(info.commit.to_string()),
            "{}",
            account.did
        );
        assert_eq!(repo["rev"], json!(info.rev.as_str()), "{}", account.did);
        assert_eq!(repo["active"], json!(true));

        let (status, latest) = get_json(&format!(
            "{base}/xrpc/com.atproto.sync.getLatestCommit?did={}",
            account.did
        ))
        .await?;
        assert_eq!(status, 200, "{latest}");
        assert_eq!(
            latest,
            json!({"cid": info.commit.to_string(), "rev": info.rev.as_str()})
        );

        let (status, repo_status) = get_json(&format!(
            "{base}/xrpc/com.atproto.sync.getRepoStatus?did={}",
            account.did
        ))
        .await?;
        assert_eq!(status, 200, "{repo_status}");
        assert_eq!(
            repo_status,
            json!({"did": account.did.as_str(), "active": true, "rev": info.rev.as_str()})
        );
    }

    // listReposByCollection lists exactly the accounts whose host has posts for them.
    let mut with_posts = BTreeSet::new();
    for account in devnet.accounts() {
        let pds = &devnet.hosts()[account.pds];
        let (status, records) = get_json(&format!(
            "{}/xrpc/com.atproto.repo.listRecords?repo={}&collection=app.bsky.feed.post&limit=1",
            pds.url(),
            account.did
        ))
        .await?;
        assert_eq!(status, 200, "{records}");
        if records["records"]
            .as_array()
            .is_some_and(|records| !records.is_empty())
        {
            with_posts.insert(account.did.to_string());
        }
    }
    assert!(!with_posts.is_empty(), "the seed wrote no posts");
    let mut by_collection = BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!(
            "{base}/xrpc/com.atproto.sync.listReposByCollection?collection=app.bsky.feed.post&limit=1"
        );
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let (status, page) = get_json(&url).await?;
        assert_eq!(status, 200, "{page}");
        for repo in page["repos"].as_array().ok_or("repos is not a list")? {
            by_collection.insert(repo["did"].as_str().ok_or("repo without did")?.to_owned());
        }
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(by_collection, with_posts);

    // listHosts and getHostStatus.
    let (status, hosts) = get_json(&format!("{base}/xrpc/com.atproto.sync.listHosts")).await?;
    assert_eq!(status, 200, "{hosts}");
    let hosts = hosts["hosts"].as_array().ok_or("hosts is not a list")?;
    assert_eq!(hosts.len(), devnet.hosts().len());
    for (listed, pds) in hosts.iter().zip(devnet.hosts()) {
        let expected = json!({
            "hostname": hostname(pds),
            "seq": pds.head_seq(),
            "accountCount": pds.dids().len(),
            "status": "active",
        });
        assert_eq!(listed, &expected);
        let (status, one) = get_json(&format!(
            "{base}/xrpc/com.atproto.sync.getHostStatus?hostname={}",
            hostname(pds)
        ))
        .await?;
        assert_eq!(status, 200, "{one}");
        assert_eq!(one, expected);
    }

    // Errors have the XRPC shape.
    let unknown = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
    for url in [
        format!("{base}/xrpc/com.atproto.sync.getRepoStatus?did={unknown}"),
        format!("{base}/xrpc/com.atproto.sync.getLatestCommit?did={unknown}"),
        format!("{base}/xrpc/com.atproto.sync.getRepo?did={unknown}"),
    ] {
        let (status, body) = get_json(&url).await?;
        assert_eq!(
            (status, &body["error"]),
            (400, &json!("RepoNotFound")),
            "{url}"
        );
    }
    let (status, body) = get_json(&format!(
        "{base}/xrpc/com.atproto.sync.getHostStatus?hostname=nowhere.test"
    ))
    .await?;
    assert_eq!((status, &body["error"]), (400, &json!("HostNotFound")));
    let (status, body) =
        get_json(&format!("{base}/xrpc/com.atproto.sync.listRepos?limit=0")).await?;
    assert_eq!((status, &body["error"]), (400, &json!("InvalidRequest")));
    let (status, body) = get_json(&format!(
        "{base}/xrpc/com.atproto.sync.listReposByCollection?collection=not-an-nsid"
    ))
    .await?;
    assert_eq!((status, &body["error"]), (400, &json!("InvalidRequest")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_repo_redirects_to_the_pds() -> TestResult {
    let devnet = start().await?;
    let relay = relay_of(&devnet)?;
    let account = devnet.accounts().first().ok_or("no accounts")?;
    let pds = &devnet.hosts()[account.pds];
    let info = pds.account_info(&account.did)?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;

    let response = client
        .get(format!(
            "{}/xrpc/com.atproto.sync.getRepo?did={}",
            relay.url(),
            account.did
        ))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 302);
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .ok_or("no Location")?
        .to_str()?
        .to_owned();
    assert_eq!(
        location,
        format!(
            "{}/xrpc/com.atproto.sync.getRepo?did={}",
            pds.url(),
            account.did
        )
    );

    let car = client
        .get(&location)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let key = key_of(&devnet, &account.did)?;
    let verified = load_car(&car[..], &VerifyOptions::default())?.verify(Expected {
        did: Some(&account.did),
        key: &key,
    })?;
    assert_eq!(verified.commit_cid(), info.commit);
    let mut records = 0;
    for record in verified.records() {
        record?;
        records += 1;
    }
    assert_eq!(records, info.records);

    let response = client
        .get(format!(
            "{}/xrpc/com.atproto.sync.getRepo?did={}&since={}",
            relay.url(),
            account.did,
            info.rev
        ))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 302);
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .ok_or("no Location")?
        .to_str()?;
    assert!(
        location.ends_with(&format!("&since={}", info.rev)),
        "{location}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drops_a_commit_with_a_bad_signature_but_not_the_next() -> TestResult {
    let devnet = start().await?;
    let relay = relay_of(&devnet)?;
    let account = devnet.accounts().first().ok_or("no accounts")?;
    let pds = &devnet.hosts()[account.pds];
    let mark = relay.head_seq();

    pds.faults().update(|faults| faults.bad_signature = true);
    let bad = pds.write(&account.did, &[post("forged")?], None)?;
    pds.faults().update(|faults| faults.bad_signature = false);
    let good = pds.write(&account.did, &[post("genuine")?], None)?;
    caught_up(&devnet).await?;

    let stats = relay.stats();
    assert_eq!(stats.invalid_commits, 1, "{stats:?}");
    assert_eq!(
        relay.head_seq(),
        mark + 1,
        "only the good commit is forwarded"
    );
    let relayed = messages(read_stream(relay.url(), mark, relay.head_seq()).await?)?;
    let revs = commit_revs(&relayed);
    assert!(!revs.contains(&(account.did.clone(), bad.commit.rev.clone())));
    assert!(revs.contains(&(account.did.clone(), good.commit.rev.clone())));
    let key = key_of(&devnet, &account.did)?;
    for message in &relayed {
        if let Message::Commit(event) = message {
            firehose::verify_commit(event, &key)?;
        }
    }

    let (_, latest) = get_json(&format!(
        "{}/xrpc/com.atproto.sync.getLatestCommit?did={}",
        relay.url(),
        account.did
    ))
    .await?;
    assert_eq!(latest["rev"], json!(good.commit.rev.as_str()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migrated_account_is_only_heard_from_its_new_host() -> TestResult {
    let devnet = start().await?;
    let relay = relay_of(&devnet)?;
    let [old, new] = devnet.hosts() else {
        return Err("expected two hosts".into());
    };
    let did = old
        .dids()
        .first()
        .cloned()
        .ok_or("no account on the first host")?;
    let old_accounts = old.dids().len();

    old.migrate(&did, new)?;
    caught_up(&devnet).await?;
    let (_, status) = get_json(&format!(
        "{}/xrpc/com.atproto.sync.getRepoStatus?did={did}",
        relay.url()
    ))
    .await?;
    assert_eq!(status["active"], json!(true), "{status}");
    let moved = new.account_info(&did)?;
    assert_eq!(
        status["rev"],
        json!(moved.rev.as_str()),
        "the new host's #sync moved the rev"
    );

    // The old host comes back to life for the account: none of it may reach the relay.
    let mark = relay.head_seq();
    let foreign_before = relay.stats().foreign_host;
    old.set_status(&did, Status::Active)?;
    let stray = old.write(&did, &[post("from the old host")?], None)?;
    caught_up(&devnet).await?;
    assert_eq!(
        relay.head_seq(),
        mark,
        "the old host's events were forwarded"
    );
    assert!(relay.stats().foreign_host >= foreign_before + 3);

    let fresh = new.write(&did, &[post("from the new host")?], None)?;
    caught_up(&devnet).await?;
    let relayed = messages(read_stream(relay.url(), mark, relay.head_seq()).await?)?;
    let revs = commit_revs(&relayed);
    assert_eq!(
        revs,
        BTreeSet::from([(did.clone(), fresh.commit.rev.clone())]),
        "stray commit was {}",
        stray.commit.rev
    );
    let key = key_of(&devnet, &did)?;
    for message in &relayed {
        if let Message::Commit(event) = message {
            firehose::verify_commit(event, &key)?;
        }
    }

    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let response = client
        .get(format!(
            "{}/xrpc/com.atproto.sync.getRepo?did={did}",
            relay.url()
        ))
        .send()
        .await?;
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .ok_or("no Location")?
        .to_str()?;
    assert!(location.starts_with(new.url()), "{location}");

    let (_, hosts) = get_json(&format!("{}/xrpc/com.atproto.sync.listHosts", relay.url())).await?;
    assert_eq!(hosts["hosts"][0]["accountCount"], json!(old_accounts - 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_api_switches_the_relays_own_faults() -> TestResult {
    let devnet = start().await?;
    let relay = relay_of(&devnet)?;
    let client = reqwest::Client::new();
    let admin = |path: &str| format!("{}/admin/{path}", relay.url());

    let refused = client.post(admin("sequencer/jump")).send().await?;
    assert_eq!(refused.status().as_u16(), 401);
    let wrong = client
        .post(admin("sequencer/jump"))
        .basic_auth("admin", Some("nope"))
        .send()
        .await?;
    assert_eq!(wrong.status().as_u16(), 401);

    let head = relay.head_seq();
    let jumped: Json = client
        .post(admin("sequencer/jump"))
        .basic_auth("admin", Some("admin"))
        .json(&json!({"by": 1000}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(jumped["head"], json!(head + 1000));

    // The next event lands after the gap.
    let account = devnet.accounts().first().ok_or("no accounts")?;
    let pds = &devnet.hosts()[account.pds];
    pds.write(&account.did, &[post("after the jump")?], None)?;
    wait_for("the relay to forward the commit", || {
        relay.head_seq() == head + 1001
    })
    .await?;
    let after = messages(read_stream(relay.url(), head, head + 1001).await?)?;
    assert_eq!(
        after.iter().filter_map(Message::seq).collect::<Vec<_>>(),
        [head + 1001]
    );

    // Trimming the window makes old cursors outdated.
    client
        .post(admin("sequencer/trim"))
        .basic_auth("admin", Some("admin"))
        .json(&json!({"keep": 1}))
        .send()
        .await?
        .error_for_status()?;
    let frames = read_stream(relay.url(), 1, relay.head_seq()).await?;
    assert!(
        matches!(frames.first(), Some(Frame::Message(Message::Info(info))) if info.name == "OutdatedCursor"),
        "{frames:?}"
    );
    assert_eq!(frames.len(), 2, "the info, then the one event left");

    // Event faults set over HTTP reach subscribers: every event comes twice.
    client
        .post(admin("faults"))
        .basic_auth("admin", Some("admin"))
        .json(&json!({"duplicate_seqs": true}))
        .send()
        .await?
        .error_for_status()?;
    let head = relay.head_seq();
    pds.write(&account.did, &[post("twice")?], None)?;
    wait_for("the relay to forward the commit", || {
        relay.head_seq() == head + 1
    })
    .await?;
    let mut url = relay.url().replacen("http://", "ws://", 1);
    url.push_str(&format!(
        "/xrpc/com.atproto.sync.subscribeRepos?cursor={head}"
    ));
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    let mut seqs = Vec::new();
    while seqs.len() < 2 {
        match within("reading duplicates", socket.next()).await? {
            Some(Ok(WsMessage::Binary(bytes))) => {
                if let Frame::Message(message) = firehose::decode_frame(&bytes)? {
                    seqs.extend(message.seq());
                }
            }
            Some(Ok(_)) => {}
            other => return Err(format!("stream ended: {other:?}").into()),
        }
    }
    assert_eq!(seqs, [head + 1, head + 1]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_unknown_methods() -> TestResult {
    let devnet = start().await?;
    let relay = relay_of(&devnet)?;
    let (status, _) = get_json(&format!("{}/xrpc/_health", relay.url())).await?;
    assert_eq!(status, 200);
    let (status, body) =
        get_json(&format!("{}/xrpc/com.atproto.sync.getBlob", relay.url())).await?;
    assert_eq!(
        (status, &body["error"]),
        (404, &json!("MethodNotImplemented"))
    );
    Ok(())
}

/// The commits a relay stream holds for `did` from `mark` on, after the relay caught up.
async fn relayed_since(
    devnet: &Devnet,
    mark: u64,
) -> Result<Vec<Message>, Box<dyn std::error::Error>> {
    caught_up(devnet).await?;
    let relay = relay_of(devnet)?;
    Ok(messages(
        read_stream(relay.url(), mark, relay.head_seq()).await?,
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takes_in_duplicated_reordered_and_cut_upstream_frames_once() -> TestResult {
    let devnet = start().await?;
    let relay = relay_of(&devnet)?;
    let pds = &devnet.hosts()[0];
    let dids = pds.dids();

    // Round-robin over the host's accounts, so that no two neighbouring events share a DID:
    // a reordered pair of one account's commits is a replay the relay rightly drops.
    for flag in ["duplicate_seqs", "reorder_seqs"] {
        let mark = relay.head_seq();
        pds.faults().update(|faults| match flag {
            "duplicate_seqs" => faults.duplicate_seqs = true,
            _ => faults.reorder_seqs = true,
        });
        let mut written = BTreeSet::new();
        for round in 0..2 {
            for did in &dids {
                let data = pds.write(did, &[post(&format!("{flag} {round}"))?], None)?;
                written.insert((did.clone(), data.commit.rev));
            }
        }
        // The flags are read as frames are sent: clear them only once the relay has them all.
        caught_up(&devnet).await?;
        pds.faults().clear();
        let relayed = relayed_since(&devnet, mark).await?;
        assert_eq!(
            relayed.len(),
            written.len(),
            "{flag}: each commit forwarded once"
        );
        assert_eq!(commit_revs(&relayed), written, "{flag}");
    }
    assert!(relay.stats().duplicate_seqs > 0, "{:?}", relay.stats());

    let mark = relay.head_seq();
    let before = relay.stats().invalid_frames;
    pds.faults()
        .update(|faults| faults.disconnect_mid_frame = true);
    let data = pds.write(&dids[0], &[post("cut in half")?], None)?;
    wait_for("the relay to see a cut frame", || {
        relay.stats().invalid_frames > before
    })
    .await?;
    assert_eq!(relay.head_seq(), mark, "half a frame is not an event");
    pds.faults().clear();
    let relayed = relayed_since(&devnet, mark).await?;
    assert_eq!(
        commit_revs(&relayed),
        BTreeSet::from([(dids[0].clone(), data.commit.rev)]),
        "after reconnecting the relay takes the event in whole, once"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follows_a_key_rotation() -> TestResult {
    let devnet = start().await?;
    let relay = relay_of(&devnet)?;
    let account = devnet.accounts().first().ok_or("no accounts")?;
    let pds = &devnet.hosts()[account.pds];
    let old_key = key_of(&devnet, &account.did)?;
    let mark = relay.head_seq();

    pds.rotate_key(&account.did, atpdb_repo::crypto::Curve::P256)?;
    let data = pds.write(&account.did, &[post("signed with the new key")?], None)?;
    let relayed = relayed_since(&devnet, mark).await?;
    let new_key = key_of(&devnet, &account.did)?;
    assert_ne!(old_key, new_key);
    let kinds: Vec<&str> = relayed.iter().map(Message::t).collect();
    assert_eq!(kinds, ["#identity", "#sync", "#commit"]);
    for message in &relayed {
        match message {
            Message::Sync(event) => {
                firehose::verify_sync(event, &new_key)?;
            }
            Message::Commit(event) => {
                assert_eq!(event.rev, data.commit.rev);
                firehose::verify_commit(event, &new_key)?;
            }
            _ => {}
        }
    }
    assert_eq!(relay.stats().invalid_commits, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rides_out_a_flaky_or_down_plc_directory() -> TestResult {
    let devnet = start().await?;
    let relay = relay_of(&devnet)?;
    let pds = &devnet.hosts()[0];

    // Two failures in a row: the relay's retries absorb them for a DID it has never seen.
    devnet.plc_faults().set(atpdb_devnet::faults::FaultSet {
        status: Some(503),
        times: Some(2),
        ..Default::default()
    });
    let mark = relay.head_seq();
    let did = pds.create_account(atpdb_devnet::pds::NewAccount {
        handle: "newcomer.test".parse()?,
        email: "newcomer@example.test".to_owned(),
        password: "password".to_owned(),
        signing: atpdb_repo::sample::sample_keypair(99, atpdb_repo::crypto::Curve::K256),
        rotation: atpdb_repo::sample::sample_keypair(98, atpdb_repo::crypto::Curve::K256),
        records: vec![post("hello")?],
    })?;
    let relayed = relayed_since(&devnet, mark).await?;
    let kinds: Vec<&str> = relayed.iter().map(Message::t).collect();
    assert_eq!(
        kinds,
        ["#identity", "#account", "#commit"],
        "{:?}",
        relay.stats()
    );
    assert!(relayed.iter().all(|message| message.did() == Some(&did)));
    assert_eq!(
        devnet.plc_faults().get().times,
        None,
        "both faults were used up"
    );

    // The directory goes down for good: accounts the relay knows keep flowing on the
    // identities it cached, even after an `#identity` asked it to look again.
    devnet.plc_faults().set(atpdb_devnet::faults::FaultSet {
        status: Some(500),
        ..Default::default()
    });
    let mark = relay.head_seq();
    pds.set_handle(&did, "renamed.test".parse()?)?;
    let data = pds.write(&did, &[post("still here")?], None)?;
    let relayed = relayed_since(&devnet, mark).await?;
    let kinds: Vec<&str> = relayed.iter().map(Message::t).collect();
    assert_eq!(kinds, ["#identity", "#commit"], "{:?}", relay.stats());
    assert_eq!(
        commit_revs(&relayed),
        BTreeSet::from([(did, data.commit.rev)])
    );
    devnet.plc_faults().clear();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_a_hosts_events_until_the_directory_can_decide() -> TestResult {
    // A DID the relay has never resolved, and a directory that cannot answer: dropping the
    // events would lose them for good, so the host's stream waits instead.
    let devnet = start().await?;
    let relay = relay_of(&devnet)?;
    let pds = &devnet.hosts()[0];
    caught_up(&devnet).await?;
    devnet.plc_faults().set(atpdb_devnet::faults::FaultSet {
        status: Some(503),
        ..Default::default()
    });
    let mark = relay.head_seq();
    let did = pds.create_account(atpdb_devnet::pds::NewAccount {
        handle: "patient.test".parse()?,
        email: "patient@example.test".to_owned(),
        password: "password".to_owned(),
        signing: atpdb_repo::sample::sample_keypair(97, atpdb_repo::crypto::Curve::K256),
        rotation: atpdb_repo::sample::sample_keypair(96, atpdb_repo::crypto::Curve::K256),
        records: vec![post("waiting")?],
    })?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while relay.stats().unresolved < 3 {
        assert!(std::time::Instant::now() < deadline, "{:?}", relay.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        relay.head_seq(),
        mark,
        "nothing was relayed or dropped meanwhile"
    );
    assert_eq!(relay.stats().no_identity, 0);
    devnet.plc_faults().clear();
    let relayed = relayed_since(&devnet, mark).await?;
    let kinds: Vec<&str> = relayed.iter().map(Message::t).collect();
    assert_eq!(
        kinds,
        ["#identity", "#account", "#commit"],
        "{:?}",
        relay.stats()
    );
    assert!(relayed.iter().all(|message| message.did() == Some(&did)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn its_own_commit_faults_break_only_its_hop() -> TestResult {
    let devnet = start().await?;
    let relay = relay_of(&devnet)?;
    let account = devnet.accounts().first().ok_or("no accounts")?;
    let pds = &devnet.hosts()[account.pds];
    let key = key_of(&devnet, &account.did)?;
    let relay_mark = relay.head_seq();
    let pds_mark = pds.head_seq();

    relay.faults().update(|faults| faults.bad_signature = true);
    pds.write(&account.did, &[post("forged by the relay")?], None)?;
    let relayed = relayed_since(&devnet, relay_mark).await?;
    relay.faults().clear();
    let [Message::Commit(forged)] = relayed.as_slice() else {
        return Err(format!("expected one commit, got {relayed:?}").into());
    };
    assert!(
        firehose::verify_commit(forged, &key).is_err(),
        "the relay's copy verifies"
    );
    let upstream = messages(read_stream(pds.url(), pds_mark, pds.head_seq()).await?)?;
    let [Message::Commit(genuine)] = upstream.as_slice() else {
        return Err(format!("expected one commit, got {upstream:?}").into());
    };
    firehose::verify_commit(genuine, &key)?;
    assert_eq!(genuine.rev, forged.rev);
    Ok(())
}
