//! `GET /channel`: Tap's event WebSocket.
//!
//! Events go out as text frames (Tap's JSON); `{"type":"ack","id":N}` acknowledges on any
//! socket. Sockets share one queue, so several clients split the load as they do with Tap.
//! When a socket ends, whatever it held and had not seen acknowledged goes out again at once.
//!
//! The server never sends a close frame: `@atproto/tap` reconnects only after an abnormal
//! close, so a restart must look like a dropped connection (reference: tap.md §3.3, §8).

use atpdb_deliver::{Consumer, Delivery, Outgoing};
use axum::extract::State;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};

use crate::App;

/// Frames written before one flush: enough to amortize the syscall, few enough that an
/// ack is read soon.
const WRITE_BATCH: usize = 64;
/// A client sends acks and pings only; anything larger is not one.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

pub(crate) async fn channel(State(app): State<App>, upgrade: WebSocketUpgrade) -> Response {
    let Some(consumer) = app.delivery.consumer() else {
        return crate::message(
            StatusCode::BAD_REQUEST,
            "websocket not available in webhook mode",
        );
    };
    let delivery = app.delivery.clone();
    upgrade
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| serve(socket, consumer, delivery))
        .into_response()
}

async fn serve(socket: WebSocket, mut consumer: Consumer, delivery: Delivery) {
    let (mut sink, mut stream) = socket.split();
    let mut batch: Vec<Outgoing> = Vec::with_capacity(WRITE_BATCH);
    loop {
        tokio::select! {
            next = consumer.next() => {
                // Delivery stopped (shutdown): drop the connection without a close frame.
                let Some(first) = next else { break };
                batch.clear();
                batch.push(first);
                consumer.try_next(WRITE_BATCH, &mut batch);
                if write(&mut sink, &batch).await.is_err() {
                    break;
                }
                for outgoing in &batch {
                    consumer.written(outgoing.id);
                }
            }
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Some(id) = parse_ack(text.as_str()) {
                        delivery.ack(id);
                    }
                }
                Some(Ok(Message::Binary(bytes))) => {
                    if let Some(id) = std::str::from_utf8(&bytes).ok().and_then(parse_ack) {
                        delivery.ack(id);
                    }
                }
                // tungstenite queued the pong; flushing sends it now rather than with the
                // next event (a quiet channel would otherwise miss the client's heartbeat).
                Some(Ok(Message::Ping(_))) => {
                    if sink.flush().await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Pong(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            },
        }
    }
    // Dropping the consumer hands back what this socket held.
}

async fn write(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    batch: &[Outgoing],
) -> Result<(), axum::Error> {
    for outgoing in batch {
        let text = Utf8Bytes::try_from(outgoing.frame.clone()).map_err(axum::Error::new)?;
        sink.feed(Message::Text(text)).await?;
    }
    sink.flush().await
}

/// `{"type":"ack","id":N}` → `N`. Anything else is ignored (Tap ignores other JSON; where
/// Tap drops the connection on a frame that is not JSON, a stray frame here costs nothing).
fn parse_ack(text: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Ack<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
        id: u64,
    }
    let ack: Ack<'_> = serde_json::from_str(text).ok()?;
    (ack.kind == "ack").then_some(ack.id)
}

#[cfg(test)]
mod tests {
    use super::parse_ack;

    #[test]
    fn acks_parse_and_everything_else_is_ignored() {
        assert_eq!(parse_ack(r#"{"type":"ack","id":42}"#), Some(42));
        assert_eq!(parse_ack(r#"{"id":7,"type":"ack","extra":true}"#), Some(7));
        assert_eq!(
            parse_ack(r#"{"ack":42}"#),
            None,
            "the shape some third-party docs give"
        );
        assert_eq!(parse_ack(r#"{"type":"nack","id":1}"#), None);
        assert_eq!(parse_ack(r#"{"type":"ack","id":-1}"#), None);
        assert_eq!(parse_ack("not json"), None);
    }
}
