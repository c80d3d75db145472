//! Each event-level fault, switched on at runtime through the admin API, as a firehose
//! consumer observes it.

mod common;

use atpdb_devnet::faults::FaultSet;
use atpdb_devnet::pds::Pds;
use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_repo::firehose::{CommitEvent, Frame, Message, verify_commit};
use atpdb_repo::repo::Write;
use atpdb_repo::syntax::Did;
use common::{Firehose, Read, TestResult, http, key_of, seq_of};
use serde_json::json;

async fn devnet() -> Result<Devnet, Box<dyn std::error::Error>> {
    Ok(Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 2,
        records: 10,
        with_relay: false,
        ..DevnetConfig::default()
    })
    .await?)
}

/// Sets a host's faults the way an operator would: `POST /admin/faults`.
async fn set_faults(pds: &Pds, faults: serde_json::Value) -> TestResult {
    let response = http()
        .post(format!("{}/admin/faults", pds.url()))
        .basic_auth("admin", Some("admin"))
        .json(&faults)
        .send()
        .await?;
    assert_eq!(response.status(), 200, "POST /admin/faults {faults}");
    Ok(())
}

fn write_one(pds: &Pds, did: &Did, n: u32) -> TestResult {
    pds.write(
        did,
        &[Write::Create {
            path: format!("com.example.forum.post/3l4z2xq7nq{n:03}"),
            record: atpdb_repo::value::Value::from_json(
                &json!({"$type": "com.example.forum.post", "n": n}),
            )?
            .to_cbor(),
        }],
        None,
    )?;
    Ok(())
}

async fn next_commit(firehose: &mut Firehose) -> Result<CommitEvent, Box<dyn std::error::Error>> {
    loop {
        if let Frame::Message(Message::Commit(commit)) = firehose.frame().await? {
            return Ok(commit);
        }
    }
}

/// One commit with `faults` on, then one with them off.
async fn faulty_then_clean(
    faults: serde_json::Value,
) -> Result<(Devnet, CommitEvent, CommitEvent), Box<dyn std::error::Error>> {
    let devnet = devnet().await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();
    let mut firehose = Firehose::connect(pds.url(), None).await?;
    set_faults(&pds, faults).await?;
    write_one(&pds, &did, 1)?;
    set_faults(&pds, json!({})).await?;
    write_one(&pds, &did, 2)?;
    let bad = next_commit(&mut firehose).await?;
    let good = next_commit(&mut firehose).await?;
    Ok((devnet, bad, good))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blocks_fail_the_hash_check() -> TestResult {
    let (devnet, bad, good) = faulty_then_clean(json!({"corrupt_blocks": true})).await?;
    let key = key_of(&devnet, &bad.repo)?;
    let err = verify_commit(&bad, &key)
        .err()
        .ok_or("corrupt commit verified")?;
    assert!(
        matches!(err, atpdb_repo::Error::HashMismatch { .. }),
        "{err}"
    );
    verify_commit(&good, &key)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signatures_are_detected() -> TestResult {
    let (devnet, bad, good) = faulty_then_clean(json!({"bad_signature": true})).await?;
    let key = key_of(&devnet, &bad.repo)?;
    let err = verify_commit(&bad, &key)
        .err()
        .ok_or("forged commit verified")?;
    assert!(
        matches!(err, atpdb_repo::Error::BadSignature { .. }),
        "{err}"
    );
    verify_commit(&good, &key)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_without_prev_data_cannot_be_proven() -> TestResult {
    let (devnet, bad, good) = faulty_then_clean(json!({"drop_prev_data": true})).await?;
    assert!(bad.prev_data.is_none());
    let key = key_of(&devnet, &bad.repo)?;
    assert!(!verify_commit(&bad, &key)?.is_proven());
    assert!(verify_commit(&good, &key)?.is_proven());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_missing_mst_nodes_fail_inversion() -> TestResult {
    let (devnet, bad, good) = faulty_then_clean(json!({"drop_proof_nodes": true})).await?;
    let key = key_of(&devnet, &bad.repo)?;
    let err = verify_commit(&bad, &key)
        .err()
        .ok_or("commit without its nodes verified")?;
    assert!(
        matches!(err, atpdb_repo::Error::MissingBlock { .. }),
        "{err}"
    );
    verify_commit(&good, &key)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_frame() -> TestResult {
    let devnet = devnet().await?;
    let pds = devnet.hosts()[0].clone();
    set_faults(&pds, json!({"disconnect_mid_frame": true})).await?;
    let mut firehose = Firehose::connect(pds.url(), Some(0)).await?;
    assert!(
        matches!(firehose.next().await?, Read::Undecodable(_)),
        "half a frame"
    );
    assert!(
        matches!(firehose.next().await?, Read::Closed),
        "then the connection drops"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_reordered_and_jumping_seqs() -> TestResult {
    let devnet = devnet().await?;
    let pds = devnet.hosts()[0].clone();

    set_faults(&pds, json!({"duplicate_seqs": true})).await?;
    let mut firehose = Firehose::connect(pds.url(), Some(0)).await?;
    let a = seq_of(&firehose.frame().await?);
    let b = seq_of(&firehose.frame().await?);
    assert_eq!((a, b), (Some(1), Some(1)), "each frame is sent twice");

    set_faults(&pds, json!({"reorder_seqs": true})).await?;
    let mut firehose = Firehose::connect(pds.url(), Some(0)).await?;
    let a = seq_of(&firehose.frame().await?);
    let b = seq_of(&firehose.frame().await?);
    assert_eq!((a, b), (Some(2), Some(1)), "pairs arrive swapped");
    // Live, one commit at a time: the first waits for the second to overtake it. The cursor
    // is the head, not "live only", so a write that lands before the subscription is
    // registered (a slow machine) is replayed instead of lost.
    let mut live = Firehose::connect(pds.url(), Some(pds.head_seq())).await?;
    let did = devnet.accounts()[0].did.clone();
    write_one(&pds, &did, 3)?;
    write_one(&pds, &did, 4)?;
    let a = seq_of(&live.frame().await?).ok_or("seq")?;
    let b = seq_of(&live.frame().await?).ok_or("seq")?;
    assert_eq!(b + 1, a, "live frames arrive swapped too");
    write_one(&pds, &did, 5)?;
    assert_eq!(
        seq_of(&live.frame().await?),
        Some(a + 1),
        "an idle stream still gets the held frame"
    );
    let head = pds.head_seq();

    set_faults(&pds, json!({})).await?;
    let mut firehose = Firehose::connect(pds.url(), Some(head)).await?;
    let response = http()
        .post(format!("{}/admin/sequencer/jump", pds.url()))
        .basic_auth("admin", Some("admin"))
        .json(&json!({"by": 1_000_000}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    write_one(&pds, &devnet.accounts()[0].did, 7)?;
    let seq = seq_of(&firehose.frame().await?).ok_or("seq")?;
    assert_eq!(seq, head + 1_000_001, "the next event lands after the jump");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_faults_round_trip_and_refuse_nonsense() -> TestResult {
    let devnet = devnet().await?;
    let pds = devnet.hosts()[0].clone();
    set_faults(
        &pds,
        json!({"status": 503, "paths": ["com.atproto.sync.getRepo"]}),
    )
    .await?;
    assert_eq!(pds.faults().get().status, Some(503));
    let did = devnet.accounts()[0].did.to_string();
    let response = http()
        .get(format!("{}/xrpc/com.atproto.sync.getRepo", pds.url()))
        .query(&[("did", &did)])
        .send()
        .await?;
    assert_eq!(response.status(), 503);
    let response = http()
        .get(format!(
            "{}/xrpc/com.atproto.sync.getLatestCommit",
            pds.url()
        ))
        .query(&[("did", &did)])
        .send()
        .await?;
    assert_eq!(response.status(), 200, "other paths are unaffected");
    let response = http()
        .post(format!("{}/admin/faults", pds.url()))
        .basic_auth("admin", Some("admin"))
        .json(&json!({"no_such_fault": true}))
        .send()
        .await?;
    assert_eq!(response.status(), 400);
    pds.faults().set(FaultSet::default());
    Ok(())
}
