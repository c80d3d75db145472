//! The engine against a real devnet: what it stores must equal what the PDSes hold, and
//! replaying its outbox must rebuild the same thing.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_identity::Network;
use atpdb_net::XrpcConfig;
use atpdb_repo::Cid;
use atpdb_repo::repo::Write;
use atpdb_repo::syntax::{Did, Tid};
use atpdb_repo::value::Value;
use atpdb_store::{Action, Event, RepoState, Store};
use atpdb_sync::{Engine, EngineConfig, Filters, Mode};

type TestResult = Result<(), Box<dyn std::error::Error>>;
type Truth = BTreeMap<Did, BTreeMap<String, Cid>>;

struct Harness {
    devnet: Devnet,
    engine: Engine,
    _dir: tempfile::TempDir,
    tasks: atpdb_sync::EngineTasks,
}

async fn start(
    config: DevnetConfig,
    mode: Mode,
    filters: Filters,
) -> Result<Harness, Box<dyn std::error::Error>> {
    start_with(
        config,
        EngineConfig {
            mode,
            filters,
            ..EngineConfig::default()
        },
    )
    .await
}

async fn start_with(
    config: DevnetConfig,
    engine_config: EngineConfig,
) -> Result<Harness, Box<dyn std::error::Error>> {
    let devnet = Devnet::start(config).await?;
    let dir = tempfile::tempdir()?;
    let engine = engine_on(&devnet, dir.path(), engine_config)?;
    let tasks = engine.start()?;
    Ok(Harness {
        devnet,
        engine,
        _dir: dir,
        tasks,
    })
}

/// An engine over the store in `dir`, following `devnet`, with quick retries for tests.
fn engine_on(
    devnet: &Devnet,
    dir: &std::path::Path,
    engine_config: EngineConfig,
) -> Result<Engine, Box<dyn std::error::Error>> {
    engine_with(devnet, dir, engine_config, XrpcConfig::default())
}

/// [`engine_on`] with its own XRPC client settings.
fn engine_with(
    devnet: &Devnet,
    dir: &std::path::Path,
    engine_config: EngineConfig,
    xrpc_config: XrpcConfig,
) -> Result<Engine, Box<dyn std::error::Error>> {
    let store = Store::open(dir)?;
    let mut network = devnet.network_config();
    network.xrpc = xrpc_config;
    let relay = devnet
        .relay()
        .ok_or("the devnet has no relay")?
        .url()
        .to_owned();
    Ok(Engine::new(
        EngineConfig {
            relay_url: relay,
            resync_parallelism: 4,
            firehose_parallelism: 4,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            idle_poll: Duration::from_millis(50),
            cursor_interval: Duration::from_millis(100),
            ..engine_config
        },
        store,
        Network::new(network)?,
    ))
}

impl Harness {
    fn truth(&self, filters: &Filters) -> Result<Truth, Box<dyn std::error::Error>> {
        let mut truth = Truth::new();
        for account in self.devnet.accounts() {
            let host = &self.devnet.hosts()[account.pds];
            let records = host
                .account_records(&account.did)?
                .into_iter()
                .filter(|(path, _)| filters.matches(path.split_once('/').map_or("", |(c, _)| c)))
                .collect();
            truth.insert(account.did.clone(), records);
        }
        Ok(truth)
    }

    fn stored(&self, did: &Did) -> Result<BTreeMap<String, Cid>, Box<dyn std::error::Error>> {
        let records = self
            .engine
            .store()
            .records(did, None, None, usize::MAX, false)?;
        Ok(records
            .into_iter()
            .map(|record| (record.path(), record.cid()))
            .collect())
    }

    /// Waits until every account is synced at its PDS's current rev.
    async fn converge(&mut self, timeout: Duration) -> TestResult {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(Ok((task, result))) = self.tasks.try_join_next() {
                return Err(format!("engine task {task} ended: {result:?}").into());
            }
            let mut lagging = Vec::new();
            for account in self.devnet.accounts() {
                let host = &self.devnet.hosts()[account.pds];
                let info = host.account_info(&account.did)?;
                let entry = self.engine.store().repo(&account.did)?;
                let synced = entry.as_ref().is_some_and(|entry| {
                    entry.state == RepoState::Synced
                        && entry.rev.as_deref() == Some(info.rev.as_str())
                });
                if !synced {
                    lagging.push((
                        account.did.clone(),
                        entry.map(|e| (e.state, e.rev, e.error)),
                    ));
                }
            }
            if lagging.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} repos did not converge, e.g. {:?}",
                    lagging.len(),
                    &lagging[..lagging.len().min(3)]
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every account's current rev at its PDS.
    fn revs(&self) -> Result<BTreeMap<Did, Tid>, Box<dyn std::error::Error>> {
        let mut revs = BTreeMap::new();
        for account in self.devnet.accounts() {
            let host = &self.devnet.hosts()[account.pds];
            revs.insert(account.did.clone(), host.account_info(&account.did)?.rev);
        }
        Ok(revs)
    }

    /// Rebuilds the mirror from the outbox alone, as a consumer would.
    fn replay_outbox(&self) -> Result<Truth, Box<dyn std::error::Error>> {
        let mut rebuilt = Truth::new();
        let mut after = 0;
        let mut last_id = 0;
        loop {
            let events = self.engine.store().events_after(after, 1000)?;
            let Some((id, _)) = events.last() else { break };
            after = *id;
            for (id, event) in events {
                assert!(
                    id > last_id,
                    "event ids must only grow: {id} after {last_id}"
                );
                last_id = id;
                match event {
                    Event::Record(record) => {
                        let repo = rebuilt.entry(record.did.clone()).or_default();
                        let path = format!("{}/{}", record.collection, record.rkey);
                        match record.action {
                            Action::Create | Action::Update => {
                                let cid = record.cid.ok_or("create/update without a cid")?;
                                repo.insert(path, cid);
                            }
                            Action::Delete => {
                                repo.remove(&path);
                            }
                        }
                    }
                    Event::Identity(identity) if identity.status == "deleted" => {
                        rebuilt.remove(&identity.did);
                    }
                    Event::Identity(_) | Event::RepoState(_) => {}
                }
            }
        }
        Ok(rebuilt)
    }
}

fn assert_mirror(harness: &Harness, truth: &Truth) -> TestResult {
    for (did, records) in truth {
        let stored = harness.stored(did)?;
        assert_eq!(
            &stored, records,
            "stored records of {did} differ from its PDS"
        );
        assert_eq!(
            harness.engine.store().record_count_of(did)?,
            records.len() as u64,
            "the record count of {did}"
        );
    }
    let rebuilt = harness.replay_outbox()?;
    for (did, records) in truth {
        let empty = BTreeMap::new();
        let replayed = rebuilt.get(did).unwrap_or(&empty);
        assert_eq!(
            replayed, records,
            "the outbox of {did} does not rebuild its records"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_mode_mirrors_live_creates_updates_and_deletes() -> TestResult {
    let mut harness = start(
        DevnetConfig {
            pds_hosts: 3,
            accounts: 500,
            records: 6,
            ..DevnetConfig::default()
        },
        Mode::Manual,
        Filters::all(),
    )
    .await?;
    let dids: Vec<Did> = harness
        .devnet
        .accounts()
        .iter()
        .map(|a| a.did.clone())
        .collect();
    // Live traffic while the backfill runs: commits land before, during and after each
    // repo's snapshot.
    harness.devnet.start_traffic(40.0);
    assert_eq!(harness.engine.add_repos(&dids).await?, dids.len());
    assert_eq!(
        harness.engine.add_repos(&dids).await?,
        0,
        "adding twice adds nothing"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    harness.devnet.stop_traffic();
    assert!(
        harness
            .devnet
            .traffic_stats()
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
            > 20,
        "the traffic wrote commits"
    );
    harness.converge(Duration::from_secs(60)).await?;
    let truth = harness.truth(&Filters::all())?;
    assert_mirror(&harness, &truth)?;
    let counters = harness.engine.counters();
    assert!(
        counters
            .commits_applied
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "live commits were applied from the firehose"
    );
    harness.engine.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_filters_keep_only_matching_records() -> TestResult {
    let filters = Filters::parse_list("app.bsky.feed.*")?;
    let mut harness = start(
        DevnetConfig {
            pds_hosts: 1,
            accounts: 6,
            records: 30,
            ..DevnetConfig::default()
        },
        Mode::Manual,
        filters.clone(),
    )
    .await?;
    let dids: Vec<Did> = harness
        .devnet
        .accounts()
        .iter()
        .map(|a| a.did.clone())
        .collect();
    harness.engine.add_repos(&dids).await?;
    harness.devnet.start_traffic(20.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    harness.devnet.stop_traffic();
    harness.converge(Duration::from_secs(60)).await?;
    let truth = harness.truth(&filters)?;
    assert!(truth.values().any(|records| !records.is_empty()));
    assert_mirror(&harness, &truth)?;
    for did in &dids {
        for path in harness.stored(did)?.keys() {
            assert!(
                path.starts_with("app.bsky.feed."),
                "{path} passed the filter"
            );
        }
    }
    harness.engine.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_network_mode_finds_every_repo_by_itself() -> TestResult {
    let mut harness = start(
        DevnetConfig {
            pds_hosts: 3,
            accounts: 500,
            records: 6,
            ..DevnetConfig::default()
        },
        Mode::Full,
        Filters::all(),
    )
    .await?;
    harness.devnet.start_traffic(20.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    harness.devnet.stop_traffic();
    harness.converge(Duration::from_secs(60)).await?;
    let truth = harness.truth(&Filters::all())?;
    assert_mirror(&harness, &truth)?;
    harness.engine.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_mode_tracks_only_repos_writing_the_signal() -> TestResult {
    let harness = start(
        DevnetConfig {
            pds_hosts: 3,
            accounts: 500,
            records: 6,
            ..DevnetConfig::default()
        },
        Mode::Signal(vec!["fm.teal.alpha.feed.play".parse()?]),
        Filters::all(),
    )
    .await?;
    let mut harness = harness;
    // Who writes the signal, according to the PDS.
    let mut signalled: Vec<Did> = Vec::new();
    for account in harness.devnet.accounts() {
        let host = &harness.devnet.hosts()[account.pds];
        if host
            .account_paths(&account.did)?
            .iter()
            .any(|path| path.starts_with("fm.teal.alpha.feed.play/"))
        {
            signalled.push(account.did.clone());
        }
    }
    assert!(
        !signalled.is_empty() && signalled.len() < harness.devnet.accounts().len(),
        "some accounts, not all, write the signal: {}",
        signalled.len()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tracked = harness.engine.store().repo_count()?;
        if tracked as usize >= signalled.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the crawler found {tracked} of {} repos",
            signalled.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for account in harness.devnet.accounts() {
        let tracked = harness.engine.store().repo(&account.did)?.is_some();
        assert_eq!(
            tracked,
            signalled.contains(&account.did),
            "{} tracked = {tracked}",
            account.did
        );
    }
    // A repo that starts writing the signal is tracked from the firehose.
    let newcomer = harness
        .devnet
        .accounts()
        .iter()
        .find(|account| !signalled.contains(&account.did))
        .ok_or("an account without the signal")?
        .clone();
    let play = atpdb_repo::value::Value::from_json(&serde_json::json!({
        "$type": "fm.teal.alpha.feed.play",
        "trackName": "a new song",
        "playedTime": "2026-01-01T00:00:00.000Z",
    }))?;
    harness.devnet.hosts()[newcomer.pds].write(
        &newcomer.did,
        &[atpdb_repo::repo::Write::Create {
            path: format!(
                "fm.teal.alpha.feed.play/{}",
                atpdb_repo::syntax::Tid::now(3)
            ),
            record: play.to_cbor(),
        }],
        None,
    )?;
    signalled.push(newcomer.did.clone());
    // Every tracked repo converges on its PDS's records.
    let deadline = Instant::now() + Duration::from_secs(60);
    for did in &signalled {
        let account = harness
            .devnet
            .accounts()
            .iter()
            .find(|account| &account.did == did)
            .ok_or("a seeded account")?;
        let truth: BTreeMap<String, Cid> = harness.devnet.hosts()[account.pds]
            .account_records(did)?
            .into_iter()
            .collect();
        while harness.stored(did)? != truth {
            assert!(Instant::now() < deadline, "{did} did not converge");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let _ = &mut harness;
    harness.engine.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_emits_the_updates_and_deletes_it_finds() -> TestResult {
    // Without the firehose, changes reach the mirror only through a resync: the snapshot
    // must be diffed both ways (Tap's resync never emits deletes).
    let mut harness = start_with(
        DevnetConfig {
            pds_hosts: 1,
            accounts: 5,
            records: 30,
            ..DevnetConfig::default()
        },
        EngineConfig {
            follow_firehose: false,
            ..EngineConfig::default()
        },
    )
    .await?;
    let dids: Vec<Did> = harness
        .devnet
        .accounts()
        .iter()
        .map(|a| a.did.clone())
        .collect();
    harness.engine.add_repos(&dids).await?;
    harness.converge(Duration::from_secs(60)).await?;
    let before = harness.truth(&Filters::all())?;
    let revs_before = harness.revs()?;
    harness.devnet.start_traffic(40.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    harness.devnet.stop_traffic();
    let after = harness.truth(&Filters::all())?;
    let deleted = before
        .iter()
        .flat_map(|(did, records)| records.keys().map(move |path| (did, path)))
        .filter(|(did, path)| !after[*did].contains_key(*path))
        .count();
    let updated = before
        .iter()
        .flat_map(|(did, records)| records.iter().map(move |(path, cid)| (did, path, cid)))
        .filter(|(did, path, cid)| after[*did].get(*path).is_some_and(|now| now != *cid))
        .count();
    assert!(
        deleted > 0 && updated > 0,
        "the traffic deleted {deleted} and updated {updated}"
    );
    assert_eq!(harness.engine.resync(&dids).await?, dids.len());
    harness.converge(Duration::from_secs(60)).await?;
    assert_mirror(&harness, &after)?;
    // Every repo that changed caught up from getRepo?since= alone.
    let changed = harness
        .revs()?
        .iter()
        .filter(|(did, rev)| revs_before.get(*did) != Some(*rev))
        .count() as u64;
    let counters = harness.engine.counters();
    assert!(changed > 0);
    assert_eq!(counters.resyncs_since.load(Ordering::Relaxed), changed);
    assert_eq!(counters.resyncs_since_fallback.load(Ordering::Relaxed), 0);
    harness.engine.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_proves_what_it_was_not_sent_or_fetches_everything() -> TestResult {
    // getRepo?since= leaves out every block written before `since`. A record put back to an
    // earlier value brings back that value's older MST node, which the CAR then leaves out
    // too: only rebuilding the left-out subtree from the stored records shows that what is
    // stored (the later value) is not what the tree holds.
    let mut harness = start_with(
        DevnetConfig {
            pds_hosts: 1,
            accounts: 2,
            records: 300,
            ..DevnetConfig::default()
        },
        EngineConfig {
            follow_firehose: false,
            ..EngineConfig::default()
        },
    )
    .await?;
    let dids: Vec<Did> = harness
        .devnet
        .accounts()
        .iter()
        .map(|a| a.did.clone())
        .collect();
    harness.engine.add_repos(&dids).await?;
    harness.converge(Duration::from_secs(60)).await?;
    let host = harness.devnet.hosts()[0].clone();
    let did = dids[0].clone();
    let profile = "app.bsky.actor.profile/self".to_owned();
    let original = harness
        .engine
        .store()
        .record(&did, "app.bsky.actor.profile", "self")?
        .ok_or("the seeded account has no profile")?;
    let changed = Value::from_json(&serde_json::json!({
        "$type": "app.bsky.actor.profile",
        "displayName": "changed for a while",
    }))?
    .to_cbor();
    let engine = harness.engine.clone();
    let counters = engine.counters();
    let since = |field: &std::sync::atomic::AtomicU64| field.load(Ordering::Relaxed);

    // One change in a 300-record repo: the CAR holds a few blocks, the rest is proven.
    host.write(
        &did,
        &[Write::Update {
            path: profile.clone(),
            record: changed,
        }],
        None,
    )?;
    harness.engine.resync(std::slice::from_ref(&did)).await?;
    harness.converge(Duration::from_secs(60)).await?;
    assert_mirror(&harness, &harness.truth(&Filters::all())?)?;
    assert_eq!(
        (
            since(&counters.resyncs_since),
            since(&counters.resyncs_since_fallback)
        ),
        (1, 0)
    );

    // Back to the original value, and a new post so that the root is new: the profile's
    // old node is left out of the CAR, and the stored records of its range do not rebuild
    // it, so the engine fetches the whole repo.
    let post = Value::from_json(&serde_json::json!({
        "$type": "app.bsky.feed.post",
        "text": "new",
        "createdAt": "2026-01-01T00:00:00.000Z",
    }))?
    .to_cbor();
    host.write(
        &did,
        &[
            Write::Update {
                path: profile.clone(),
                record: original.bytes().to_vec(),
            },
            Write::Create {
                path: format!("app.bsky.feed.post/{}", Tid::now(3)),
                record: post,
            },
        ],
        None,
    )?;
    harness.engine.resync(std::slice::from_ref(&did)).await?;
    harness.converge(Duration::from_secs(60)).await?;
    assert_eq!(
        (
            since(&counters.resyncs_since),
            since(&counters.resyncs_since_fallback)
        ),
        (1, 1)
    );
    let truth = harness.truth(&Filters::all())?;
    assert_eq!(truth[&did].get(&profile), Some(&original.cid()));
    assert_mirror(&harness, &truth)?;
    harness.engine.shutdown();
    Ok(())
}

/// Polls `check` until it holds or `timeout` passes; the error names what did not happen.
async fn eventually(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool, Box<dyn std::error::Error>>,
) -> TestResult {
    let deadline = Instant::now() + timeout;
    while !check()? {
        if Instant::now() > deadline {
            return Err(format!("timed out: {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn identity_events(
    engine: &Engine,
    did: &Did,
) -> Result<Vec<atpdb_store::IdentityEvent>, Box<dyn std::error::Error>> {
    let mut found = Vec::new();
    let mut after = 0;
    loop {
        let events = engine.store().events_after(after, 1000)?;
        let Some((last, _)) = events.last() else {
            return Ok(found);
        };
        after = *last;
        for (_, event) in events {
            if let Event::Identity(identity) = event
                && &identity.did == did
            {
                found.push(identity);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_lifecycle_ends_in_the_right_state_and_event() -> TestResult {
    use atpdb_devnet::pds::Status;
    use atpdb_repo::crypto::Curve;
    use atpdb_store::AccountStatus;

    let mut harness = start(
        DevnetConfig {
            pds_hosts: 2,
            accounts: 6,
            records: 8,
            ..DevnetConfig::default()
        },
        Mode::Manual,
        Filters::all(),
    )
    .await?;
    let accounts = harness.devnet.accounts().to_vec();
    let dids: Vec<Did> = accounts.iter().map(|a| a.did.clone()).collect();
    harness.engine.add_repos(&dids).await?;
    harness.converge(Duration::from_secs(60)).await?;
    for account in &accounts {
        let handle = harness
            .engine
            .store()
            .repo(&account.did)?
            .and_then(|e| e.handle);
        assert_eq!(
            handle.as_deref(),
            Some(account.handle.as_str()),
            "the handle verified both ways"
        );
    }
    let host = |index: usize| &harness.devnet.hosts()[index];
    let [rotated, renamed, taken, deleted, migrated, ..] = accounts.as_slice() else {
        return Err("six accounts".into());
    };
    let post = |text: &str| -> Result<atpdb_repo::repo::Write, Box<dyn std::error::Error>> {
        let record = atpdb_repo::value::Value::from_json(&serde_json::json!({
            "$type": "app.bsky.feed.post",
            "text": text,
            "createdAt": "2026-01-01T00:00:00.000Z",
        }))?;
        Ok(atpdb_repo::repo::Write::Create {
            path: format!("app.bsky.feed.post/{}", atpdb_repo::syntax::Tid::now(5)),
            record: record.to_cbor(),
        })
    };

    host(rotated.pds).rotate_key(&rotated.did, Curve::P256)?;
    host(rotated.pds).write(&rotated.did, &[post("signed with the new key")?], None)?;
    host(renamed.pds).set_handle(&renamed.did, "renamed.test".parse()?)?;
    host(taken.pds).set_status(&taken.did, Status::Takendown)?;
    host(deleted.pds).delete_account(&deleted.did)?;
    let target = 1 - migrated.pds;
    host(migrated.pds).migrate(&migrated.did, host(target))?;
    host(target).write(&migrated.did, &[post("written at the new host")?], None)?;

    let engine = harness.engine.clone();
    let store = engine.store().clone();
    let wait = Duration::from_secs(30);
    // Key rotation: the new key's commits apply.
    let truth = host(rotated.pds).account_records(&rotated.did)?;
    eventually("the rotated account's new commit applies", wait, || {
        let stored = harness_records(&store, &rotated.did)?;
        Ok(stored == truth.iter().cloned().collect::<BTreeMap<_, _>>())
    })
    .await?;
    // Handle change: stored and announced.
    eventually("the new handle is announced", wait, || {
        Ok(identity_events(&engine, &renamed.did)?
            .iter()
            .any(|event| event.handle == "renamed.test"))
    })
    .await?;
    assert_eq!(
        store.repo(&renamed.did)?.and_then(|e| e.handle).as_deref(),
        Some("renamed.test")
    );
    // Takedown: status and an inactive identity event; records stay.
    eventually("the takedown is announced", wait, || {
        Ok(identity_events(&engine, &taken.did)?
            .iter()
            .any(|event| event.status == "takendown" && !event.is_active))
    })
    .await?;
    assert_eq!(
        store.repo(&taken.did)?.map(|e| e.status),
        Some(AccountStatus::Takendown)
    );
    // Deletion: records gone, consumers told.
    eventually("the deletion is announced", wait, || {
        Ok(identity_events(&engine, &deleted.did)?
            .iter()
            .any(|event| event.status == "deleted" && !event.is_active))
    })
    .await?;
    assert_eq!(
        store.repo(&deleted.did)?.map(|e| e.status),
        Some(AccountStatus::Deleted)
    );
    assert!(
        harness_records(&store, &deleted.did)?.is_empty(),
        "a deleted account keeps no records"
    );
    // Migration: the new host is followed.
    let new_url = host(target).url().to_owned();
    let truth = host(target).account_records(&migrated.did)?;
    eventually("the migrated account follows its new host", wait, || {
        let entry = store.repo(&migrated.did)?;
        let stored = harness_records(&store, &migrated.did)?;
        Ok(
            entry.and_then(|e| e.pds).as_deref() == Some(new_url.as_str())
                && stored == truth.iter().cloned().collect::<BTreeMap<_, _>>(),
        )
    })
    .await?;
    harness.engine.shutdown();
    let _ = &mut harness;
    Ok(())
}

fn harness_records(
    store: &Store,
    did: &Did,
) -> Result<BTreeMap<String, Cid>, Box<dyn std::error::Error>> {
    Ok(store
        .records(did, None, None, usize::MAX, false)?
        .into_iter()
        .map(|record| (record.path(), record.cid()))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_kind_is_survived_and_the_mirror_converges() -> TestResult {
    use atpdb_devnet::faults::{FaultSet, RateLimit, SlowDrip};

    let mut harness = start(
        DevnetConfig {
            pds_hosts: 2,
            accounts: 8,
            records: 12,
            ..DevnetConfig::default()
        },
        Mode::Manual,
        Filters::all(),
    )
    .await?;
    let dids: Vec<Did> = harness
        .devnet
        .accounts()
        .iter()
        .map(|a| a.did.clone())
        .collect();
    harness.engine.add_repos(&dids).await?;
    harness.converge(Duration::from_secs(60)).await?;
    let fetch_paths = || {
        vec![
            "com.atproto.sync.getRepo".to_owned(),
            "com.atproto.sync.getLatestCommit".to_owned(),
        ]
    };
    // HTTP faults at the PDSes while every repo is fetched again.
    let http_faults = [
        FaultSet {
            status: Some(503),
            paths: fetch_paths(),
            times: Some(6),
            ..FaultSet::default()
        },
        FaultSet {
            status: Some(500),
            paths: fetch_paths(),
            times: Some(3),
            ..FaultSet::default()
        },
        FaultSet {
            rate_limit: Some(RateLimit {
                retry_after: Some(1),
                ratelimit_headers: true,
                html: false,
            }),
            paths: fetch_paths(),
            times: Some(4),
            ..FaultSet::default()
        },
        FaultSet {
            truncate_after: Some(300),
            paths: vec!["com.atproto.sync.getRepo".to_owned()],
            times: Some(4),
            ..FaultSet::default()
        },
        FaultSet {
            slow_drip: Some(SlowDrip {
                chunk_bytes: 2048,
                interval_ms: 5,
            }),
            latency_ms: Some(100),
            paths: vec!["com.atproto.sync.getRepo".to_owned()],
            times: Some(4),
            ..FaultSet::default()
        },
    ];
    for faults in http_faults {
        let label = format!("{faults:?}");
        for host in harness.devnet.hosts() {
            host.faults().set(faults.clone());
        }
        harness.devnet.start_traffic(20.0);
        // A rev change makes the getLatestCommit shortcut miss, so getRepo runs too.
        tokio::time::sleep(Duration::from_millis(500)).await;
        harness.devnet.stop_traffic();
        harness.engine.resync(&dids).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        for host in harness.devnet.hosts() {
            host.faults().clear();
        }
        harness
            .converge(Duration::from_secs(60))
            .await
            .map_err(|err| format!("after {label}: {err}"))?;
        assert_mirror(&harness, &harness.truth(&Filters::all())?)?;
    }
    // Connection resets at the PDSes for a while.
    for host in harness.devnet.hosts() {
        host.faults().update(|faults| faults.reset = true);
    }
    harness.engine.resync(&dids).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for host in harness.devnet.hosts() {
        host.faults().clear();
    }
    harness.converge(Duration::from_secs(60)).await?;
    // Event faults on the relay's hop, with live traffic.
    let relay = harness.devnet.relay().ok_or("no relay")?.clone();
    type Switch = fn(&mut FaultSet);
    let event_faults: [(&str, Switch); 7] = [
        ("corrupt_blocks", |f| f.corrupt_blocks = true),
        ("bad_signature", |f| f.bad_signature = true),
        ("drop_prev_data", |f| f.drop_prev_data = true),
        ("drop_proof_nodes", |f| f.drop_proof_nodes = true),
        ("disconnect_mid_frame", |f| f.disconnect_mid_frame = true),
        ("duplicate_seqs", |f| f.duplicate_seqs = true),
        ("reorder_seqs", |f| f.reorder_seqs = true),
    ];
    for (label, set) in event_faults {
        relay.faults().update(set);
        harness.devnet.start_traffic(30.0);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        harness.devnet.stop_traffic();
        relay.faults().clear();
        harness
            .converge(Duration::from_secs(60))
            .await
            .map_err(|err| format!("after {label}: {err}"))?;
        assert_mirror(&harness, &harness.truth(&Filters::all())?)?;
    }
    let counters = harness.engine.counters();
    assert!(
        counters
            .commits_invalid
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert!(
        counters
            .commits_unproven
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    harness.engine.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_the_replay_window_catches_up_in_a_recorded_run() -> TestResult {
    let mut harness = start(
        DevnetConfig {
            pds_hosts: 2,
            accounts: 10,
            records: 5,
            ..DevnetConfig::default()
        },
        Mode::Manual,
        Filters::all(),
    )
    .await?;
    let dids: Vec<Did> = harness
        .devnet
        .accounts()
        .iter()
        .map(|a| a.did.clone())
        .collect();
    harness.engine.add_repos(&dids).await?;
    harness.devnet.start_traffic(20.0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    harness.converge(Duration::from_secs(60)).await?;
    // Stop; the store keeps the cursor. Writes meanwhile are only reachable by a resync once
    // the cursor counts as too old.
    harness.engine.shutdown();
    while harness.tasks.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_millis(500)).await;
    harness.devnet.stop_traffic();
    let dir = harness._dir.path().to_owned();
    assert!(harness.engine.store().runs()?.is_empty());
    drop(harness.engine);
    let engine = engine_on(
        &harness.devnet,
        &dir,
        EngineConfig {
            replay_window: Duration::from_micros(1),
            ..EngineConfig::default()
        },
    )?;
    harness.tasks = engine.start()?;
    harness.engine = engine;
    harness.converge(Duration::from_secs(60)).await?;
    assert_mirror(&harness, &harness.truth(&Filters::all())?)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let run = loop {
        let runs = harness.engine.store().runs()?;
        let [run] = runs.as_slice() else {
            return Err(format!("expected one run, got {runs:?}").into());
        };
        if run.finished_us.is_some() {
            break run.clone();
        }
        assert!(Instant::now() < deadline, "the run did not finish: {run:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(run.kind, "catch-up");
    assert_eq!(run.total, dids.len() as u64);
    assert_eq!(run.done, dids.len() as u64);
    harness.engine.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_change_at_runtime_backfills_what_it_adds_and_stops_what_it_drops() -> TestResult {
    let posts = Filters::parse_list("app.bsky.feed.post")?;
    let mut harness = start(
        DevnetConfig {
            pds_hosts: 2,
            accounts: 6,
            records: 30,
            ..DevnetConfig::default()
        },
        Mode::Manual,
        posts.clone(),
    )
    .await?;
    let dids: Vec<Did> = harness
        .devnet
        .accounts()
        .iter()
        .map(|a| a.did.clone())
        .collect();
    harness.engine.add_repos(&dids[..4]).await?;
    let store = harness.engine.store().clone();
    eventually("four repos synced", Duration::from_secs(60), || {
        Ok(store.count_in_state(RepoState::Synced)? == 4)
    })
    .await?;
    for did in &dids[..4] {
        assert!(
            harness
                .stored(did)?
                .keys()
                .all(|p| p.starts_with("app.bsky.feed.post/")),
            "only posts before the change"
        );
    }

    // Wider filters and the full network: the synced repos are snapshotted again (a
    // recorded `scope` run) and the crawler finds the two repos nobody added.
    let wider = atpdb_sync::Scope {
        mode: Mode::Full,
        filters: Filters::parse_list("app.bsky.feed.post,app.bsky.feed.like")?,
    };
    let resyncing = harness.engine.set_scope(wider.clone()).await?;
    assert_eq!(resyncing, 4);
    assert_eq!(
        store.config("scope")?,
        Some(wider.to_json()),
        "stored for restarts"
    );
    assert!(
        store.runs()?.iter().any(|run| run.kind == "scope"),
        "the resync is a recorded run"
    );
    harness.devnet.start_traffic(20.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    harness.devnet.stop_traffic();
    harness.converge(Duration::from_secs(60)).await?;
    let truth = harness.truth(&wider.filters)?;
    assert!(
        truth
            .values()
            .flat_map(|r| r.keys())
            .any(|p| p.starts_with("app.bsky.feed.like/")),
        "the devnet has likes"
    );
    assert_mirror(&harness, &truth)?;

    // Narrower: posts are no longer stored or emitted; likes still are.
    let narrow_from = store.last_event_id();
    let likes = Filters::parse_list("app.bsky.feed.like")?;
    let resyncing = harness
        .engine
        .set_scope(atpdb_sync::Scope {
            mode: Mode::Full,
            filters: likes.clone(),
        })
        .await?;
    assert_eq!(resyncing, 0, "narrowing needs no snapshot");
    let before: BTreeMap<Did, BTreeMap<String, Cid>> = dids
        .iter()
        .map(|did| Ok((did.clone(), harness.stored(did)?)))
        .collect::<Result<_, Box<dyn std::error::Error>>>()?;
    harness.devnet.start_traffic(20.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    harness.devnet.stop_traffic();
    harness.converge(Duration::from_secs(60)).await?;
    let mut emitted = 0;
    for (_, event) in store.events_after(narrow_from, usize::MAX)? {
        if let Event::Record(record) = event {
            assert_eq!(
                record.collection, "app.bsky.feed.like",
                "only likes are emitted"
            );
            emitted += 1;
        }
    }
    assert!(emitted > 0, "likes kept flowing");
    let truth_likes = harness.truth(&likes)?;
    for did in &dids {
        let stored = harness.stored(did)?;
        let stored_likes: BTreeMap<String, Cid> = stored
            .iter()
            .filter(|(p, _)| p.starts_with("app.bsky.feed.like/"))
            .map(|(p, c)| (p.clone(), *c))
            .collect();
        assert_eq!(&stored_likes, &truth_likes[did], "likes of {did}");
        let stored_posts: Vec<&String> = stored
            .keys()
            .filter(|p| p.starts_with("app.bsky.feed.post/"))
            .collect();
        let posts_before: Vec<&String> = before[did]
            .keys()
            .filter(|p| p.starts_with("app.bsky.feed.post/"))
            .collect();
        assert_eq!(
            stored_posts, posts_before,
            "posts of {did} are left as they were"
        );
    }
    harness.engine.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_pauses_intake_and_nothing_is_dropped() -> TestResult {
    const LIMIT: u64 = 40;
    let mut harness = start_with(
        DevnetConfig {
            pds_hosts: 1,
            accounts: 8,
            records: 20,
            ..DevnetConfig::default()
        },
        EngineConfig {
            outbox_limit: LIMIT,
            ..EngineConfig::default()
        },
    )
    .await?;
    let dids: Vec<Did> = harness
        .devnet
        .accounts()
        .iter()
        .map(|a| a.did.clone())
        .collect();
    harness.engine.add_repos(&dids).await?;
    let store = harness.engine.store().clone();
    let engine = harness.engine.clone();
    let counters = engine.counters();
    eventually("intake to pause", Duration::from_secs(30), || {
        Ok(counters
            .intake_paused
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0)
    })
    .await?;
    // Paused means paused: the outbox stops growing while nobody consumes.
    let held = store.last_event_id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(store.last_event_id(), held, "no new events while paused");
    assert!(store.count_in_state(RepoState::Synced)? < dids.len() as u64);

    // A consumer acknowledges (deletes) a few events at a time; intake resumes and every
    // event it produced is seen exactly in order.
    let mut consumed: Vec<(u64, Event)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let after = consumed.last().map_or(0, |(id, _)| *id);
        let page = store.events_after(after, 10)?;
        let ids: Vec<u64> = page.iter().map(|(id, _)| *id).collect();
        consumed.extend(page);
        store.delete_events(&ids)?;
        if ids.is_empty() && store.count_in_state(RepoState::Synced)? == dids.len() as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    harness.converge(Duration::from_secs(30)).await?;
    let mut rebuilt = Truth::new();
    for (_, event) in consumed
        .iter()
        .chain(store.events_after(0, usize::MAX)?.iter())
    {
        if let Event::Record(record) = event {
            let repo = rebuilt.entry(record.did.clone()).or_default();
            let path = format!("{}/{}", record.collection, record.rkey);
            match (record.action, record.cid) {
                (Action::Delete, _) => {
                    repo.remove(&path);
                }
                (_, Some(cid)) => {
                    repo.insert(path, cid);
                }
                (_, None) => return Err("a create without a cid".into()),
            }
        }
    }
    assert_eq!(
        rebuilt,
        harness.truth(&Filters::all())?,
        "nothing was dropped"
    );
    assert!(
        counters
            .intake_paused_us
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    harness.engine.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_keeps_failing_at_one_cursor_is_retried_in_smaller_pages() -> TestResult {
    // The relay answers listRepos with 500 seven times in a row: five at the full page
    // size, then the crawler asks for smaller pages instead of giving up the pass. (The
    // client's own retries are off, so each failure reaches the crawler.)
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 12,
        records: 3,
        ..DevnetConfig::default()
    })
    .await?;
    let relay = devnet.relay().ok_or("no relay")?;
    relay.faults().set(atpdb_devnet::faults::FaultSet {
        status: Some(500),
        paths: vec!["com.atproto.sync.listRepos".to_owned()],
        times: Some(7),
        ..atpdb_devnet::faults::FaultSet::default()
    });
    let dir = tempfile::tempdir()?;
    let engine = engine_with(
        &devnet,
        dir.path(),
        EngineConfig {
            mode: Mode::Full,
            ..EngineConfig::default()
        },
        XrpcConfig {
            max_retries: 0,
            ..XrpcConfig::default()
        },
    )?;
    let tasks = engine.start()?;
    let mut harness = Harness {
        devnet,
        engine,
        _dir: dir,
        tasks,
    };
    // Well before the crawler's next pass (a minute after a failed one).
    harness.converge(Duration::from_secs(30)).await?;
    assert_eq!(
        harness.devnet.relay().map(|r| r.faults().get().times),
        Some(None)
    );
    harness.engine.shutdown();
    Ok(())
}
