//! `sync-bench channel`: how fast atpdb hands events to acking consumers over the real
//! `/channel` WebSocket, beside how fast the engine writes them.
//!
//! Every pass starts from the same devnet. The engine backfills every repo into a fresh
//! store (each record is one outbox event; that rate is the ingest figure). Then, with the
//! engine stopped, `atpdb_deliver` and the axum router serve the outbox on 127.0.0.1 to N
//! clients that parse each event's JSON and ack its id, as Tap's clients do; timed until
//! the outbox is empty (every event acknowledged and deleted). A last pass runs both at
//! once: one client connected while the engine backfills, timed until the last event is
//! acknowledged, so delivery that cannot keep up with ingest shows as a longer pass and an
//! outbox left over when the backfill ends.
//!
//! Tap (Go) is the named peer; it cannot be built here (no Go module proxy), so its
//! reported ~6k events/s stands as the reference figure.

use std::net::SocketAddr;

use atpdb_deliver::{Delivery, DeliveryConfig};
use futures_util::SinkExt;
use tokio_util::sync::CancellationToken;

use super::*;

pub(super) async fn run(args: ChannelArgs) -> anyhow::Result<ExitCode> {
    let common = &args.common;
    let workers = common.workers.unwrap_or(2 * cores()).max(1);
    let work = WorkDir::new(common.data_dir.as_deref())?;
    let (mut harness, seed_seconds) =
        Harness::start(common, args.accounts, args.records, &work).await?;
    progress("ingest: the engine backfills every repo into the outbox");
    let ingest_seconds = harness.backfill_all().await?;
    let events = harness.engine.store().outbox_len();
    let records_checked = harness.check_mirror()?;
    stop(&harness.engine, &mut harness.tasks).await?;
    ensure!(events > 0, "the backfill wrote no events");

    let mut passes = Vec::new();
    for (index, &clients) in args.clients.iter().enumerate() {
        let clients = clients.max(1);
        // The first pass delivers the harness's own outbox; later ones backfill afresh.
        let engine = if index == 0 {
            harness.engine.clone()
        } else {
            let engine = engine_on(
                &harness.devnet,
                workers,
                &work.path.join(format!("store-{index}")),
            )?;
            let mut tasks = engine.start()?;
            progress(&format!(
                "pass {index}: backfilling again for the next pass"
            ));
            backfill_into(&engine, &mut tasks, &harness.dids).await?;
            stop(&engine, &mut tasks).await?;
            engine
        };
        let expected = engine.store().outbox_len();
        progress(&format!(
            "delivering {expected} events to {clients} acking client(s)"
        ));
        let server = Server::start(&engine).await?;
        let started = Instant::now();
        let received = Arc::new(AtomicU64::new(0));
        let mut readers = Vec::new();
        for _ in 0..clients {
            readers.push(tokio::spawn(client(
                server.address,
                received.clone(),
                server.cancel.clone(),
            )));
        }
        wait_empty(&engine, Duration::from_secs(600)).await?;
        let seconds = started.elapsed().as_secs_f64();
        let resent = server.delivery.stats().resent.load(Ordering::Relaxed);
        server.stop(readers).await?;
        passes.push((
            clients,
            expected,
            seconds,
            received.load(Ordering::Relaxed),
            resent,
        ));
    }

    progress("both at once: one acking client connected while the engine backfills");
    let engine = engine_on(&harness.devnet, workers, &work.path.join("store-both"))?;
    let server = Server::start(&engine).await?;
    let received = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn(client(
        server.address,
        received.clone(),
        server.cancel.clone(),
    ));
    let mut tasks = engine.start()?;
    let started = Instant::now();
    let both_ingest = backfill_into(&engine, &mut tasks, &harness.dids).await?;
    let left_at_ingest_end = engine.store().outbox_len();
    wait_empty(&engine, Duration::from_secs(600)).await?;
    let both_seconds = started.elapsed().as_secs_f64();
    let both_events = engine.store().last_event_id();
    stop(&engine, &mut tasks).await?;
    server.stop(vec![reader]).await?;

    let ingest_rate = events as f64 / ingest_seconds;
    let report = json!({
        "mode": "channel",
        "accounts": args.accounts,
        "records": args.records,
        "workers": workers,
        "cores": cores(),
        "seed_seconds": seed_seconds,
        "events": events,
        "ingest_seconds": ingest_seconds,
        "ingest_events_per_second": ingest_rate,
        "passes": passes.iter().map(|(clients, expected, seconds, received, resent)| json!({
            "clients": clients,
            "events": expected,
            "seconds": seconds,
            "events_per_second": *expected as f64 / seconds,
            "received": received,
            "resent": resent,
            "ratio_to_ingest": (*expected as f64 / seconds) / ingest_rate,
            "ratio_to_tap_reported": (*expected as f64 / seconds) / TAP_REPORTED,
        })).collect::<Vec<_>>(),
        "both": {
            "ingest_seconds": both_ingest,
            "seconds": both_seconds,
            "events": both_events,
            "events_per_second": both_events as f64 / both_seconds,
            "outbox_left_when_ingest_ended": left_at_ingest_end,
        },
        "tap_reported_events_per_second": TAP_REPORTED,
    });
    if !common.json {
        let mut table = Table::new(&format!(
            "/channel delivery: {events} events ({} repos × {} records) on {} cores",
            harness.dids.len(),
            args.records,
            cores()
        ))
        .unit("events/s");
        table.row(
            "ingest: engine backfill → outbox (no consumer)",
            ingest_seconds,
            ingest_rate,
        );
        for (clients, expected, seconds, _, _) in &passes {
            table.row(
                &format!("deliver to {clients} acking client(s) (engine idle)"),
                *seconds,
                *expected as f64 / seconds,
            );
        }
        table.row(
            "ingest with 1 client consuming: backfill",
            both_ingest,
            both_events as f64 / both_ingest,
        );
        table.row(
            "ingest with 1 client consuming: last ack",
            both_seconds,
            both_events as f64 / both_seconds,
        );
        for (clients, expected, seconds, received, resent) in &passes {
            table.note(&format!(
                "{clients} client(s): {:.1}× ingest, {:.1}× Tap's reported ~6k/s; {received} \
                 frames received, {resent} re-sent",
                (*expected as f64 / seconds) / ingest_rate,
                (*expected as f64 / seconds) / TAP_REPORTED,
            ));
        }
        table.note(&format!(
            "consuming while ingesting: {left_at_ingest_end} events were still unacked when \
             the backfill ended"
        ));
        table.note(&format!(
            "every repo's rev and {records_checked} records equal its PDS's; Tap is not built \
             here (no Go module proxy): its figure is the reported one"
        ));
        table.note(&format!("setup: seeding {seed_seconds:.1} s"));
        table.print();
    }
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// Tap's WebSocket delivery as reported (reference/tap.md): events/s to one client.
const TAP_REPORTED: f64 = 6_000.0;

async fn stop(engine: &Engine, tasks: &mut EngineTasks) -> anyhow::Result<()> {
    engine.shutdown();
    while let Some(ended) = tasks.join_next().await {
        let (task, result) = ended.context("an engine task panicked")?;
        result.with_context(|| format!("the engine's {task} task failed"))?;
    }
    Ok(())
}

async fn wait_empty(engine: &Engine, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while engine.store().outbox_len() > 0 {
        ensure!(
            Instant::now() < deadline,
            "{} events still unacknowledged after {timeout:?}",
            engine.store().outbox_len()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// The delivery and the HTTP API over an engine's store, as `atpdb serve` runs them.
struct Server {
    address: SocketAddr,
    delivery: Delivery,
    cancel: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    async fn start(engine: &Engine) -> anyhow::Result<Server> {
        let cancel = CancellationToken::new();
        let (delivery, dispatcher) = Delivery::start(
            engine.store().clone(),
            DeliveryConfig::default(),
            cancel.clone(),
        )?;
        let router = atpdb_server::router(
            engine.clone(),
            delivery.clone(),
            atpdb_server::ServerConfig::default(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding 127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let shutdown = cancel.clone();
        let http = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
                .context("the HTTP server")
        });
        let dispatcher = tokio::spawn(async move {
            dispatcher
                .await
                .context("delivery panicked")?
                .context("delivery")
        });
        Ok(Server {
            address,
            delivery,
            cancel,
            handles: vec![http, dispatcher],
        })
    }

    async fn stop(
        self,
        readers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    ) -> anyhow::Result<()> {
        self.cancel.cancel();
        for handle in readers.into_iter().chain(self.handles) {
            handle.await.context("a task panicked")??;
        }
        Ok(())
    }
}

/// A consumer as Tap's clients are: parse each event, ack its id. Acks are written as
/// they come and flushed when no more are waiting.
async fn client(
    address: SocketAddr,
    received: Arc<AtomicU64>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{address}/channel"))
        .await
        .context("connecting to /channel")?;
    let (mut sink, mut stream) = socket.split();
    let (acks, mut pending) = mpsc::unbounded_channel::<u64>();
    let writer = tokio::spawn(async move {
        while let Some(id) = pending.recv().await {
            sink.feed(ack(id)).await?;
            while let Ok(id) = pending.try_recv() {
                sink.feed(ack(id)).await?;
            }
            sink.flush().await?;
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    });
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            message = stream.next() => message,
        };
        match message {
            Some(Ok(WsMessage::Text(text))) => {
                let event: Json = serde_json::from_str(&text).context("an event is not JSON")?;
                let id = event
                    .get("id")
                    .and_then(Json::as_u64)
                    .context("an event without an id")?;
                received.fetch_add(1, Ordering::Relaxed);
                if acks.send(id).is_err() {
                    break;
                }
            }
            Some(Ok(_)) => {}
            // The server going away at the end of a pass.
            Some(Err(_)) | None => break,
        }
    }
    drop(acks);
    // A socket closed under the writer is the end of the pass, not a failure.
    let _ = writer.await;
    Ok(())
}

fn ack(id: u64) -> WsMessage {
    WsMessage::text(format!(r#"{{"type":"ack","id":{id}}}"#))
}
