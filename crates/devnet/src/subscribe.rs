//! Serving `com.atproto.sync.subscribeRepos` from a [`Sequencer`], shared by PDS and relay.

use std::sync::Arc;
use std::time::Duration;

use atpdb_repo::firehose::{self, InfoEvent, Message};
use axum::extract::ws::{Message as WsMessage, WebSocket};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::faults::Faults;
use crate::sequencer::Sequencer;

/// The `cursor` query parameter of every subscription endpoint (repos and labels).
#[derive(serde::Deserialize)]
pub(crate) struct CursorParams {
    cursor: Option<i64>,
}

impl CursorParams {
    /// The seq to resume after; a negative cursor is refused.
    pub(crate) fn cursor(&self) -> crate::xrpc::XrpcResult<Option<u64>> {
        match self.cursor {
            Some(cursor) if cursor < 0 => Err(crate::xrpc::XrpcError::invalid(
                "cursor must not be negative",
            )),
            other => Ok(other.map(i64::unsigned_abs)),
        }
    }
}

/// How a subscription treats a consumer that cannot keep up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SubscribeOptions {
    /// Once live, a consumer this many events behind the head gets `ConsumerTooSlow`.
    pub(crate) max_lag: u64,
    /// A consumer whose socket accepts nothing for this long is dropped.
    pub(crate) send_timeout: Duration,
}

/// How long a frame held back by `reorder_seqs` waits for a later one to overtake it.
const REORDER_LINGER: Duration = Duration::from_millis(250);

/// Frames read from the log per lock.
const BATCH: usize = 256;

/// Where a subscription starts, or why it cannot.
enum Start {
    /// Deliver events with seq ≥ this.
    At(u64),
    /// Same, after telling the consumer its cursor was older than the window.
    Outdated(u64),
    /// The cursor is ahead of the log.
    Future,
}

fn start_for(log: &Sequencer, cursor: Option<u64>) -> Start {
    let head = log.head();
    let Some(cursor) = cursor else {
        return Start::At(head + 1);
    };
    if cursor > head {
        return Start::Future;
    }
    // The cursor is the last seq the consumer saw: it wants everything after it.
    let from = cursor + 1;
    if log.read_from(from, 0).evicted {
        Start::Outdated(log.oldest().unwrap_or(head + 1))
    } else {
        Start::At(from)
    }
}

type Sink = futures_util::stream::SplitSink<WebSocket, WsMessage>;

/// Sends one binary frame, giving up after `timeout` (a consumer whose socket takes nothing).
async fn send(
    sink: &mut Sink,
    timeout: Duration,
    frame: Bytes,
) -> Result<Result<(), axum::Error>, tokio::time::error::Elapsed> {
    tokio::time::timeout(timeout, sink.send(WsMessage::Binary(frame))).await
}

/// Runs one subscription until the consumer leaves, fails, or the host shuts down.
pub(crate) async fn serve(
    socket: WebSocket,
    log: Arc<Sequencer>,
    cursor: Option<u64>,
    options: SubscribeOptions,
    faults: Faults,
    shutdown: CancellationToken,
) {
    let (mut sink, mut stream) = socket.split();
    // Servers ignore what consumers send; reading still notices when they go away.
    let gone = CancellationToken::new();
    let reader_gone = gone.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, WsMessage::Close(_)) {
                break;
            }
        }
        reader_gone.cancel();
    });
    let timeout = options.send_timeout;

    let mut next = match start_for(&log, cursor) {
        Start::At(from) => from,
        Start::Outdated(from) => {
            let info = Message::Info(InfoEvent {
                name: "OutdatedCursor".to_owned(),
                message: Some("cursor is older than the replay window".to_owned()),
            });
            let frame = Bytes::from(firehose::encode_message(&info));
            if !matches!(send(&mut sink, timeout, frame).await, Ok(Ok(()))) {
                reader.abort();
                return;
            }
            from
        }
        Start::Future => {
            let frame = Bytes::from(firehose::encode_error(
                "FutureCursor",
                Some("cursor is ahead of the current sequence"),
            ));
            let _ = send(&mut sink, timeout, frame).await;
            let _ = sink.close().await;
            reader.abort();
            return;
        }
    };
    let mut head = log.watch();
    let mut caught_up = false;
    let mut held: Option<(u64, Bytes)> = None;
    'outer: loop {
        let batch = log.read_from(next, BATCH);
        if (caught_up && batch.behind as u64 > options.max_lag)
            || (batch.evicted && next > 0 && caught_up)
        {
            let frame = Bytes::from(firehose::encode_error(
                "ConsumerTooSlow",
                Some("consumer fell too far behind the stream"),
            ));
            let _ = send(&mut sink, timeout, frame).await;
            let _ = sink.close().await;
            break;
        }
        if batch.frames.is_empty() {
            caught_up = true;
            // Mark what we have seen before waiting so an append in between still wakes us.
            head.borrow_and_update();
            if log.head() >= next {
                continue;
            }
            // A frame held back for reordering waits a little for a successor to overtake
            // it; a stream that stays idle gets it anyway.
            let linger = async {
                if held.is_some() {
                    tokio::time::sleep(REORDER_LINGER).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                changed = head.changed() => if changed.is_err() { break },
                () = linger => {
                    if let Some((_, earlier)) = held.take()
                        && !matches!(send(&mut sink, timeout, earlier).await, Ok(Ok(())))
                    {
                        break;
                    }
                }
                () = gone.cancelled() => break,
                () = shutdown.cancelled() => break,
            }
            continue;
        }
        for (seq, frame) in batch.frames {
            next = seq + 1;
            let flags = faults.event_flags();
            if flags.disconnect_mid_frame {
                // Half a frame, then the connection drops without a close handshake.
                let half = frame.slice(..frame.len() / 2);
                let _ = send(&mut sink, timeout, half).await;
                break 'outer;
            }
            if flags.reorder_seqs && held.is_none() {
                held = Some((seq, frame));
                continue;
            }
            let ok = matches!(send(&mut sink, timeout, frame.clone()).await, Ok(Ok(())));
            if !ok {
                break 'outer;
            }
            if let Some((_, earlier)) = held.take()
                && !matches!(send(&mut sink, timeout, earlier).await, Ok(Ok(())))
            {
                break 'outer;
            }
            if flags.duplicate_seqs && !matches!(send(&mut sink, timeout, frame).await, Ok(Ok(())))
            {
                break 'outer;
            }
            if gone.is_cancelled() || shutdown.is_cancelled() {
                break 'outer;
            }
        }
    }
    reader.abort();
}

/// `POST /admin/sequencer/jump {"by"}` and `/admin/sequencer/trim {"keep"}`: the seq jump of
/// a relay swap and the outdated-cursor start, for any host's log.
pub(crate) fn admin_router(log: Arc<Sequencer>) -> axum::Router {
    axum::Router::new()
        .route(
            "/admin/sequencer/{action}",
            axum::routing::post(admin_sequencer),
        )
        .with_state(log)
}

async fn admin_sequencer(
    axum::extract::State(log): axum::extract::State<Arc<Sequencer>>,
    axum::extract::Path(action): axum::extract::Path<String>,
    body: Bytes,
) -> crate::xrpc::XrpcResult<axum::Json<serde_json::Value>> {
    use crate::xrpc::XrpcError;
    let input: serde_json::Value = if body.is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_slice(&body).map_err(|err| XrpcError::invalid(err.to_string()))?
    };
    let number = |name: &str| input.get(name).and_then(serde_json::Value::as_u64);
    match action.as_str() {
        "jump" => log.jump(number("by").unwrap_or(1_000_000)),
        "trim" => log.trim(usize::try_from(number("keep").unwrap_or(0)).unwrap_or(usize::MAX)),
        other => {
            return Err(XrpcError::invalid(format!(
                "unknown sequencer action {other:?} (expected jump or trim)"
            )));
        }
    }
    Ok(axum::Json(serde_json::json!({"head": log.head()})))
}
