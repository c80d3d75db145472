//! `GET /stream?cursor=N`: every outbox event after id `N` (Tap's JSON, the same frames as
//! `/channel`), then each new one, to every client that asks. No acks and no deletes: the
//! ids are the store's, durable and only growing, so a client resumes from the last id it
//! processed. Unlike `/channel`, each socket gets every event (broadcast, not shared).
//!
//! The stream reads what the outbox holds: in Tap's ack modes an acknowledged event is
//! deleted, so a cursor older than the oldest event left starts with an `OutdatedCursor`
//! info frame and continues from there. A slow client is sent to at its own pace (pages are
//! read as it takes them), costing no memory.

use atpdb_deliver::Tail;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;

use crate::{ApiError, App};

#[derive(Deserialize)]
pub(crate) struct StreamParams {
    cursor: Option<String>,
    repo_events: Option<String>,
}

pub(crate) async fn stream(
    State(app): State<App>,
    Query(params): Query<StreamParams>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let cursor = params
        .cursor
        .as_deref()
        .map(|text| {
            text.parse::<u64>().map_err(|_| {
                ApiError::bad_request("cursor must be an event id (a non-negative integer)")
            })
        })
        .transpose()?;
    let repo_events = match params.repo_events.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::bad_request("repo_events must be true or false")),
    };
    let store = app.engine.store().clone();
    let tail = match cursor {
        Some(cursor) => Tail::new(store, cursor),
        None => Tail::live(store),
    };
    Ok(upgrade
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| serve(socket, tail, cursor, repo_events))
        .into_response())
}

async fn serve(socket: WebSocket, mut tail: Tail, cursor: Option<u64>, repo_events: bool) {
    let (mut sink, mut stream) = socket.split();
    if let Some(cursor) = cursor.filter(|cursor| *cursor > 0)
        && let Ok(Some(oldest)) = tail.oldest().await
        && oldest > cursor + 1
    {
        let info = serde_json::json!({
            "type": "info",
            "name": "OutdatedCursor",
            "message": format!(
                "events {} to {} are no longer in the outbox; continuing from {oldest}",
                cursor + 1,
                oldest - 1
            ),
        });
        if sink
            .send(Message::Text(Utf8Bytes::from(info.to_string())))
            .await
            .is_err()
        {
            return;
        }
    }
    loop {
        tokio::select! {
            page = tail.next() => {
                let Ok(page) = page else { return };
                for (id, event) in page {
                    if !repo_events && matches!(event, atpdb_store::Event::RepoState(_)) {
                        continue;
                    }
                    let frame = Message::Text(Utf8Bytes::from(event.to_tap_string(id)));
                    if sink.feed(frame).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            message = stream.next() => match message {
                Some(Ok(Message::Ping(_))) => {
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
