//! Delivery over a real store: acks, re-sends, per-repo order, restarts, webhooks against a
//! real HTTP receiver.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atpdb_deliver::{Delivery, DeliveryConfig, Mode, Outgoing, WebhookConfig};
use atpdb_repo::syntax::Did;
use atpdb_store::{Action, Event, IdentityEvent, RecordEvent, RepoState, RepoStateEvent, Store};
use tokio_util::sync::CancellationToken;

fn did(n: usize) -> Did {
    format!("did:plc:{n:0>24}")
        .parse()
        .unwrap_or_else(|err| panic!("test DID: {err}"))
}

fn record(did: &Did, rkey: usize, rev: &str, live: bool) -> Event {
    Event::Record(RecordEvent {
        live,
        did: did.clone(),
        rev: rev.to_owned(),
        collection: "app.bsky.feed.like".to_owned(),
        rkey: format!("k{rkey}"),
        action: Action::Delete,
        cid: None,
        record: None,
        time_us: 1,
    })
}

fn push(store: &Store, events: impl IntoIterator<Item = Event>) -> Vec<u64> {
    let mut batch = store.batch();
    for event in events {
        batch.push(event);
    }
    batch.commit().unwrap_or_else(|err| panic!("commit: {err}"))
}

fn id_of(outgoing: &Outgoing) -> u64 {
    let value: serde_json::Value =
        serde_json::from_slice(&outgoing.frame).unwrap_or_else(|err| panic!("frame: {err}"));
    assert_eq!(
        value["id"].as_u64(),
        Some(outgoing.id),
        "the frame names its id"
    );
    outgoing.id
}

async fn next(consumer: &mut atpdb_deliver::Consumer) -> Outgoing {
    tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap_or_else(|_| panic!("no event within 5 s"))
        .unwrap_or_else(|| panic!("delivery stopped"))
}

async fn nothing_for(consumer: &mut atpdb_deliver::Consumer, wait: Duration) {
    if let Ok(Some(outgoing)) = tokio::time::timeout(wait, consumer.next()).await {
        panic!("unexpected event {}", outgoing.id);
    }
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn start(store: &Store, config: DeliveryConfig) -> (Delivery, CancellationToken) {
    let cancel = CancellationToken::new();
    let (delivery, _task) = Delivery::start(store.clone(), config, cancel.clone())
        .unwrap_or_else(|err| panic!("start: {err}"));
    (delivery, cancel)
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("tempdir: {err}"));
    let store = Store::open(dir.path()).unwrap_or_else(|err| panic!("open: {err}"));
    (dir, store)
}

#[tokio::test]
async fn acked_events_leave_the_outbox_and_unacked_ones_return_when_the_socket_drops() {
    let (_dir, store) = open();
    let a = did(1);
    let ids = push(&store, (0..3).map(|n| record(&a, n, "r1", false)));
    let (delivery, _cancel) = start(&store, DeliveryConfig::default());
    let mut first = delivery.consumer().unwrap_or_else(|| panic!("ack mode"));
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(id_of(&next(&mut first).await));
    }
    assert_eq!(
        got, ids,
        "one snapshot's records go out together, in id order"
    );
    delivery.ack(ids[0]);
    until("the acked event to be deleted", || store.outbox_len() == 2).await;
    // The socket drops: the two it held come back at once (no retry timeout wait).
    drop(first);
    let mut second = delivery.consumer().unwrap_or_else(|| panic!("ack mode"));
    let again = [
        id_of(&next(&mut second).await),
        id_of(&next(&mut second).await),
    ];
    assert_eq!(again, [ids[1], ids[2]]);
    // Acks are global and idempotent: any handle, twice.
    second.ack(ids[1]);
    delivery.ack(ids[1]);
    delivery.ack(ids[2]);
    until("the outbox to empty", || store.outbox_len() == 0).await;
    assert_eq!(
        delivery
            .stats()
            .resent
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn a_repo_waits_for_its_earlier_events_and_other_repos_do_not() {
    let (_dir, store) = open();
    let (a, b) = (did(1), did(2));
    let ids = push(
        &store,
        [
            record(&a, 1, "r1", true),
            record(&a, 2, "r2", true),
            record(&b, 1, "r1", true),
            Event::Identity(IdentityEvent {
                did: a.clone(),
                handle: "a.test".to_owned(),
                is_active: true,
                status: "active".to_owned(),
                time_us: 1,
            }),
        ],
    );
    let (delivery, _cancel) = start(&store, DeliveryConfig::default());
    let mut consumer = delivery.consumer().unwrap_or_else(|| panic!("ack mode"));
    assert_eq!(id_of(&next(&mut consumer).await), ids[0]);
    assert_eq!(
        id_of(&next(&mut consumer).await),
        ids[2],
        "b does not wait for a"
    );
    nothing_for(&mut consumer, Duration::from_millis(200)).await;
    delivery.ack(ids[0]);
    assert_eq!(id_of(&next(&mut consumer).await), ids[1]);
    nothing_for(&mut consumer, Duration::from_millis(100)).await;
    delivery.ack(ids[1]);
    assert_eq!(
        id_of(&next(&mut consumer).await),
        ids[3],
        "identity events keep their place too"
    );
}

#[tokio::test]
async fn a_socket_holds_no_more_than_its_window() {
    let (_dir, store) = open();
    let ids = push(&store, (0..5).map(|n| record(&did(n), n, "r", true)));
    let config = DeliveryConfig {
        window: 2,
        ..DeliveryConfig::default()
    };
    let (delivery, _cancel) = start(&store, config);
    let mut consumer = delivery.consumer().unwrap_or_else(|| panic!("ack mode"));
    assert_eq!(next(&mut consumer).await.id, ids[0]);
    let mut more = Vec::new();
    consumer.try_next(10, &mut more);
    assert_eq!(more.iter().map(|o| o.id).collect::<Vec<_>>(), [ids[1]]);
    nothing_for(&mut consumer, Duration::from_millis(200)).await;
    // An ack on another socket frees a slot of this one.
    let other = delivery.consumer().unwrap_or_else(|| panic!("ack mode"));
    other.ack(ids[1]);
    assert_eq!(next(&mut consumer).await.id, ids[2]);
    nothing_for(&mut consumer, Duration::from_millis(100)).await;
    delivery.ack(ids[0]);
    delivery.ack(ids[2]);
    assert_eq!(next(&mut consumer).await.id, ids[3]);
    assert_eq!(next(&mut consumer).await.id, ids[4]);
}

#[tokio::test]
async fn unacked_events_are_resent_after_the_retry_timeout() {
    let (_dir, store) = open();
    let ids = push(&store, [record(&did(1), 1, "r1", true)]);
    let config = DeliveryConfig {
        retry_timeout: Duration::from_millis(200),
        ..DeliveryConfig::default()
    };
    let (delivery, _cancel) = start(&store, config);
    let mut consumer = delivery.consumer().unwrap_or_else(|| panic!("ack mode"));
    assert_eq!(id_of(&next(&mut consumer).await), ids[0]);
    assert_eq!(id_of(&next(&mut consumer).await), ids[0], "sent again");
    delivery.ack(ids[0]);
    nothing_for(&mut consumer, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn fire_and_forget_acks_on_write_and_repo_events_are_opt_in() {
    let (_dir, store) = open();
    let a = did(1);
    let ids = push(
        &store,
        [
            Event::RepoState(RepoStateEvent {
                did: a.clone(),
                state: RepoState::Error,
                reason: Some("boom".to_owned()),
                time_us: 1,
            }),
            record(&a, 1, "r1", true),
        ],
    );
    let config = DeliveryConfig {
        mode: Mode::FireAndForget,
        ..DeliveryConfig::default()
    };
    let (delivery, cancel) = start(&store, config);
    let mut consumer = delivery.consumer().unwrap_or_else(|| panic!("ff mode"));
    let outgoing = next(&mut consumer).await;
    assert_eq!(
        outgoing.id, ids[1],
        "the repo-state event is not sent to Tap clients"
    );
    consumer.written(outgoing.id);
    until("both to leave the outbox", || store.outbox_len() == 0).await;
    cancel.cancel();

    // Opted in, the repo-state event goes out in its place.
    let more = push(
        &store,
        [Event::RepoState(RepoStateEvent {
            did: a.clone(),
            state: RepoState::Desynchronized,
            reason: None,
            time_us: 2,
        })],
    );
    let config = DeliveryConfig {
        mode: Mode::FireAndForget,
        repo_events: true,
        ..DeliveryConfig::default()
    };
    let (delivery, _cancel) = start(&store, config);
    let mut consumer = delivery.consumer().unwrap_or_else(|| panic!("ff mode"));
    let outgoing = next(&mut consumer).await;
    assert_eq!(outgoing.id, more[0]);
    let value: serde_json::Value =
        serde_json::from_slice(&outgoing.frame).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(value["type"], "repo");
    assert_eq!(value["repo"]["state"], "desynchronized");
}

#[tokio::test]
async fn a_restart_delivers_what_was_not_acked_and_early_acks_count() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("tempdir: {err}"));
    let a = did(1);
    let ids;
    {
        let store = Store::open(dir.path()).unwrap_or_else(|err| panic!("open: {err}"));
        ids = push(&store, (0..4).map(|n| record(&a, n, "r1", true)));
        let (delivery, cancel) = start(&store, DeliveryConfig::default());
        let mut consumer = delivery.consumer().unwrap_or_else(|| panic!("ack mode"));
        assert_eq!(next(&mut consumer).await.id, ids[0]);
        delivery.ack(ids[0]);
        until("the ack to land", || store.outbox_len() == 3).await;
        cancel.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = Store::open(dir.path()).unwrap_or_else(|err| panic!("reopen: {err}"));
    let (delivery, _cancel) = start(&store, DeliveryConfig::default());
    // The consumer had event 2 before the restart and acks it before it is sent again.
    delivery.ack(ids[1]);
    let mut consumer = delivery.consumer().unwrap_or_else(|| panic!("ack mode"));
    let first = next(&mut consumer).await.id;
    assert!(first == ids[1] || first == ids[2], "got {first}");
    if first == ids[1] {
        // The ack raced the send; acking again is harmless.
        delivery.ack(ids[1]);
        assert_eq!(next(&mut consumer).await.id, ids[2]);
    }
    delivery.ack(ids[2]);
    assert_eq!(next(&mut consumer).await.id, ids[3]);
    delivery.ack(ids[3]);
    until("the outbox to empty", || store.outbox_len() == 0).await;
    let later = push(&store, [record(&a, 9, "r2", true)]);
    assert!(later[0] > ids[3], "ids never repeat");
}

#[tokio::test]
async fn capacity_bounds_memory_and_everything_still_arrives() {
    let (_dir, store) = open();
    let ids = push(&store, (0..500).map(|n| record(&did(n % 7), n, "r", true)));
    let config = DeliveryConfig {
        capacity: 16,
        ..DeliveryConfig::default()
    };
    let (delivery, _cancel) = start(&store, config);
    let mut consumer = delivery.consumer().unwrap_or_else(|| panic!("ack mode"));
    let mut seen = Vec::new();
    while seen.len() < ids.len() {
        let outgoing = next(&mut consumer).await;
        assert!(
            delivery
                .stats()
                .loaded
                .load(std::sync::atomic::Ordering::Relaxed)
                <= 16,
            "no more than the capacity in memory"
        );
        seen.push(outgoing.id);
        delivery.ack(outgoing.id);
    }
    // Per repo, ids arrive in order.
    let mut last: BTreeMap<usize, u64> = BTreeMap::new();
    for id in &seen {
        let index = ids.iter().position(|x| x == id).unwrap_or(usize::MAX);
        let repo = index % 7;
        if let Some(previous) = last.insert(repo, *id) {
            assert!(previous < *id, "repo {repo}: {previous} then {id}");
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, ids);
    until("the outbox to empty", || store.outbox_len() == 0).await;
}

/// A body the receiver got, with its signature and authorization headers.
type Received = (Vec<u8>, Option<String>, Option<String>);

/// A webhook receiver that records bodies and can be told to fail.
#[derive(Clone, Default)]
struct Receiver {
    bodies: Arc<Mutex<Vec<Received>>>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

async fn serve_receiver(
    receiver: Receiver,
    listener: tokio::net::TcpListener,
) -> tokio::task::JoinHandle<()> {
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(receiver): axum::extract::State<Receiver>,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    if receiver.failing.load(std::sync::atomic::Ordering::Relaxed) {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    receiver
                        .bodies
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((
                            body.to_vec(),
                            header(atpdb_deliver::SIGNATURE_HEADER),
                            header("authorization"),
                        ));
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(receiver);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_survives_receiver_outages_and_signs_every_body() {
    let (_dir, store) = open();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|err| panic!("bind: {err}"));
    let address = listener
        .local_addr()
        .unwrap_or_else(|err| panic!("addr: {err}"));
    // The receiver is down at first: nothing listens (connection refused).
    drop(listener);
    let mut webhook = WebhookConfig::new(format!("http://{address}/hook"));
    webhook.secret = Some(b"s3cret".to_vec());
    webhook.admin_password = Some("pw".to_owned());
    webhook.batch = 4;
    webhook.parallelism = 2;
    webhook.backoff_min = Duration::from_millis(20);
    webhook.backoff_max = Duration::from_millis(100);
    let config = DeliveryConfig {
        mode: Mode::Webhook(webhook),
        ..DeliveryConfig::default()
    };
    let a = did(1);
    let mut ids = push(&store, (0..6).map(|n| record(&a, n, "r1", false)));
    let (delivery, _cancel) = start(&store, config);
    assert!(delivery.consumer().is_none(), "no /channel in webhook mode");
    until("calls to fail", || {
        delivery
            .stats()
            .webhook_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    assert_eq!(
        store.outbox_len(),
        6,
        "nothing is dropped while the receiver is down"
    );

    // Up, but answering 503.
    let receiver = Receiver::default();
    receiver
        .failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .unwrap_or_else(|err| panic!("rebind: {err}"));
    let _server = serve_receiver(receiver.clone(), listener).await;
    let failures = delivery
        .stats()
        .webhook_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    until("a 503 to count as a failure", || {
        delivery
            .stats()
            .webhook_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            > failures
    })
    .await;
    assert_eq!(store.outbox_len(), 6);

    // Healthy: everything arrives, signed, and leaves the outbox.
    receiver
        .failing
        .store(false, std::sync::atomic::Ordering::Relaxed);
    ids.extend(push(&store, [record(&a, 9, "r2", true)]));
    until("the outbox to empty", || store.outbox_len() == 0).await;
    let bodies = receiver
        .bodies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut seen = Vec::new();
    for (body, signature, authorization) in &bodies {
        assert_eq!(
            signature.as_deref(),
            Some(atpdb_deliver::sign(b"s3cret", body).as_str()),
            "every body is signed"
        );
        assert_ne!(
            signature.as_deref(),
            Some(atpdb_deliver::sign(b"wrong", body).as_str())
        );
        assert_eq!(authorization.as_deref(), Some("Basic YWRtaW46cHc="));
        let value: serde_json::Value =
            serde_json::from_slice(body).unwrap_or_else(|err| panic!("body: {err}"));
        match value {
            serde_json::Value::Array(events) => {
                seen.extend(events.iter().filter_map(|e| e["id"].as_u64()));
            }
            event => seen.extend(event["id"].as_u64()),
        }
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, ids, "every event arrived");
}

#[tokio::test]
async fn at_shutdown_acks_for_what_consumers_hold_are_still_taken() {
    let (_dir, store) = open();
    let ids = push(&store, (0..2).map(|n| record(&did(n), n, "r", true)));
    let (delivery, cancel) = start(&store, DeliveryConfig::default());
    let mut consumer = delivery.consumer().unwrap_or_else(|| panic!("ack mode"));
    assert_eq!(next(&mut consumer).await.id, ids[0]);
    assert_eq!(next(&mut consumer).await.id, ids[1]);
    cancel.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Nothing new goes out while draining; the acks that arrive are applied.
    let more = push(&store, [record(&did(9), 9, "r", true)]);
    nothing_for(&mut consumer, Duration::from_millis(100)).await;
    delivery.ack(ids[0]);
    delivery.ack(ids[1]);
    until("the drained acks to delete their events", || {
        store.outbox_len() == 1
    })
    .await;
    assert_eq!(store.events_after(0, 10).map(|e| e.len()).unwrap_or(0), 1);
    assert!(
        store.event(more[0]).ok().flatten().is_some(),
        "the unsent one stays"
    );
    // Once nothing is held, delivery ends and the consumer sees the end.
    let ended = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await;
    assert!(matches!(ended, Ok(None)), "delivery ended after the drain");
}
