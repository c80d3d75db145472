//! The reconnecting firehose against a devnet PDS and relay.

use std::time::Duration;

use atpdb_devnet::faults::FaultSet;
use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_net::{Firehose, FirehoseConfig, FirehoseEvent};
use atpdb_repo::firehose::Message;

use crate::common::{Error, PATIENCE, TestResult, devnet, loopback_http, write_one};

/// Settings that keep tests fast.
fn config(url: &str, cursor: Option<u64>) -> FirehoseConfig {
    FirehoseConfig {
        cursor,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..FirehoseConfig::new(url)
    }
}

/// The next event, failing the test after [`PATIENCE`].
async fn next(firehose: &mut Firehose) -> Result<FirehoseEvent, Error> {
    Ok(tokio::time::timeout(PATIENCE, firehose.next())
        .await
        .map_err(|_| "no firehose event in time")?)
}

/// The next message's seq, skipping nothing else: any other event fails the test.
async fn next_seq(firehose: &mut Firehose) -> Result<u64, Error> {
    match next(firehose).await? {
        FirehoseEvent::Message(message) => Ok(message.seq().ok_or("message without seq")?),
        other => Err(format!("expected a message, got {other:?}").into()),
    }
}

async fn expect_connected(firehose: &mut Firehose, cursor: Option<u64>) -> Result<(), Error> {
    match next(firehose).await? {
        FirehoseEvent::Connected { cursor: sent } if sent == cursor => Ok(()),
        other => Err(format!("expected Connected {{ cursor: {cursor:?} }}, got {other:?}").into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_commits_from_a_pds_and_the_relay() -> TestResult {
    let devnet = devnet(2, true).await?;
    let pds = devnet.hosts()[0].clone();
    let relay = devnet.relay().ok_or("no relay")?;
    let did = devnet.accounts()[0].did.clone();
    let http = loopback_http()?;
    // Cursors at the heads rather than live, so a write that lands before the subscription
    // is registered is replayed instead of lost.
    let mut from_pds = Firehose::connect(&http, config(pds.url(), Some(pds.head_seq())));
    let mut from_relay = Firehose::connect(&http, config(relay.url(), Some(relay.head_seq())));
    expect_connected(&mut from_pds, Some(pds.head_seq())).await?;
    expect_connected(&mut from_relay, Some(relay.head_seq())).await?;

    write_one(&pds, &did, 1)?;
    let info = pds.account_info(&did)?;
    for firehose in [&mut from_pds, &mut from_relay] {
        match next(firehose).await? {
            FirehoseEvent::Message(Message::Commit(commit)) => {
                assert_eq!(commit.repo, did);
                assert_eq!(commit.rev, info.rev);
                assert_eq!(firehose.cursor(), Some(commit.seq));
            }
            other => return Err(format!("expected a #commit, got {other:?}").into()),
        }
    }
    assert_eq!(from_pds.cursor(), Some(pds.head_seq()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_without_gap_or_duplicate() -> TestResult {
    let devnet = devnet(2, false).await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();
    let http = loopback_http()?;
    let mut firehose = Firehose::connect(&http, config(pds.url(), Some(0)));
    expect_connected(&mut firehose, Some(0)).await?;
    let head = pds.head_seq();
    let mut seqs = Vec::new();
    while seqs.last() != Some(&head) {
        seqs.push(next_seq(&mut firehose).await?);
    }

    // The next frame is cut in half and the connection dropped.
    pds.faults().set(FaultSet {
        disconnect_mid_frame: true,
        ..FaultSet::default()
    });
    write_one(&pds, &did, 1)?;
    match next(&mut firehose).await? {
        FirehoseEvent::Invalid { len, .. } => assert!(len > 0),
        other => return Err(format!("expected half a frame, got {other:?}").into()),
    }
    match next(&mut firehose).await? {
        FirehoseEvent::Disconnected { retry_in, .. } => {
            assert!(retry_in <= Duration::from_millis(200), "{retry_in:?}");
        }
        other => return Err(format!("expected Disconnected, got {other:?}").into()),
    }
    assert_eq!(
        firehose.cursor(),
        Some(head),
        "half a frame does not move the cursor"
    );
    pds.faults().set(FaultSet::default());
    expect_connected(&mut firehose, Some(head)).await?;
    write_one(&pds, &did, 2)?;
    let target = pds.head_seq();
    while seqs.last() != Some(&target) {
        seqs.push(next_seq(&mut firehose).await?);
    }
    assert_eq!(
        seqs,
        (1..=target).collect::<Vec<_>>(),
        "every seq once, in order"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_cursor_is_reported_and_the_client_goes_live() -> TestResult {
    let devnet = devnet(1, false).await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();
    let http = loopback_http()?;
    let ahead = pds.head_seq() + 1000;
    let mut firehose = Firehose::connect(&http, config(pds.url(), Some(ahead)));
    expect_connected(&mut firehose, Some(ahead)).await?;
    assert!(
        matches!(
            next(&mut firehose).await?,
            FirehoseEvent::FutureCursor { .. }
        ),
        "FutureCursor reported"
    );
    assert_eq!(firehose.cursor(), None);
    assert!(matches!(
        next(&mut firehose).await?,
        FirehoseEvent::Disconnected { .. }
    ));
    expect_connected(&mut firehose, None).await?;
    // Live now: the next write is the next event.
    write_one(&pds, &did, 1)?;
    assert_eq!(next_seq(&mut firehose).await?, pds.head_seq());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_the_window_is_outdated() -> TestResult {
    let mut devnet_config = DevnetConfig {
        pds_hosts: 1,
        accounts: 2,
        records: 10,
        with_relay: false,
        ..DevnetConfig::default()
    };
    devnet_config.pds.replay_window = 5;
    let devnet = Devnet::start(devnet_config).await?;
    let pds = devnet.hosts()[0].clone();
    let head = pds.head_seq();
    assert!(head > 6, "enough events to overflow the window ({head})");
    let http = loopback_http()?;
    let mut firehose = Firehose::connect(&http, config(pds.url(), Some(1)));
    expect_connected(&mut firehose, Some(1)).await?;
    assert!(
        matches!(
            next(&mut firehose).await?,
            FirehoseEvent::OutdatedCursor { .. }
        ),
        "OutdatedCursor reported"
    );
    let mut seqs = Vec::new();
    while seqs.last() != Some(&head) {
        seqs.push(next_seq(&mut firehose).await?);
    }
    assert_eq!(
        seqs,
        (head - 4..=head).collect::<Vec<_>>(),
        "the whole window"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused() -> TestResult {
    let devnet = devnet(1, false).await?;
    let pds = devnet.hosts()[0].clone();
    let http = loopback_http()?;
    let mut firehose = Firehose::connect(
        &http,
        FirehoseConfig {
            max_frame_bytes: 64,
            ..config(pds.url(), Some(0))
        },
    );
    expect_connected(&mut firehose, Some(0)).await?;
    match next(&mut firehose).await? {
        FirehoseEvent::Disconnected { reason, .. } => {
            assert!(reason.contains("max_frame_bytes"), "{reason}");
        }
        other => return Err(format!("expected Disconnected, got {other:?}").into()),
    }
    assert_eq!(firehose.cursor(), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_replaced() -> TestResult {
    let devnet = devnet(1, false).await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();
    let http = loopback_http()?;
    let head = pds.head_seq();
    let mut firehose = Firehose::connect(
        &http,
        FirehoseConfig {
            idle_timeout: Duration::from_millis(300),
            ..config(pds.url(), Some(head))
        },
    );
    expect_connected(&mut firehose, Some(head)).await?;
    match next(&mut firehose).await? {
        FirehoseEvent::Disconnected { reason, .. } => {
            assert!(reason.contains("no frame"), "{reason}")
        }
        other => return Err(format!("expected Disconnected, got {other:?}").into()),
    }
    expect_connected(&mut firehose, Some(head)).await?;
    write_one(&pds, &did, 1)?;
    assert_eq!(next_seq(&mut firehose).await?, head + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_is_cancel_safe() -> TestResult {
    let devnet = devnet(2, false).await?;
    let pds = devnet.hosts()[0].clone();
    let head = pds.head_seq();
    let http = loopback_http()?;
    let mut firehose = Firehose::connect(&http, config(pds.url(), Some(0)));
    let mut seqs = Vec::new();
    // Race every call against a timer that often wins: no event may be lost or repeated.
    while seqs.last() != Some(&head) {
        tokio::select! {
            event = firehose.next() => match event {
                FirehoseEvent::Message(message) => seqs.extend(message.seq()),
                FirehoseEvent::Connected { .. } => {}
                other => return Err(format!("unexpected {other:?}").into()),
            },
            () = tokio::time::sleep(Duration::from_micros(50)) => {}
        }
    }
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>());
    Ok(())
}
