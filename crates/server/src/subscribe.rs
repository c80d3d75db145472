//! `GET /subscribe`: Jetstream's JSON stream (v1 wire), so existing Jetstream clients can
//! point at atpdb and get verified data.
//!
//! Query: `wantedCollections` (≤ 100; NSIDs or prefixes ending in a whole segment,
//! `app.bsky.graph.*`), `wantedDids` (≤ 10,000), `cursor` (µs since the Unix epoch; absent or
//! in the future: live only), `maxMessageSizeBytes`, `requireHello` (send nothing until the
//! first `options_update`). The client may send
//! `{"type":"options_update","payload":{"wantedCollections","wantedDids","maxMessageSizeBytes"}}`.
//! Events: `commit` (`rev`, `operation`, `collection`, `rkey`, `record`, `cid`; no record or
//! cid on deletes), and for each identity change an `identity` and an `account` event (those
//! pass collection filters, as Jetstream's do). `seq` is atpdb's event id.
//!
//! `compress=true` (or the header `Socket-Encoding: zstd`) sends each event as a binary
//! message holding one independent zstd frame, as Jetstream does. Jetstream's frames use a
//! dictionary of its own that its clients embed; ours use none (the frame header's
//! dictionary id is 0), which every zstd decoder reads, with or without a dictionary loaded,
//! so those clients decode them unchanged. Small events compress less well without it.
//!
//! Events come from the retained log (or the outbox without retention; see
//! `atpdb_deliver::Tail`), so a cursor reaches as far back as the retention window.

use atpdb_deliver::Tail;
use atpdb_repo::syntax::Did;
use atpdb_store::Event;
use atpdb_sync::Pattern;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};

use crate::{ApiError, App};

const MAX_COLLECTIONS: usize = 100;
const MAX_DIDS: usize = 10_000;

/// What a client wants.
#[derive(Debug, Default, Clone)]
struct Wanted {
    collections: Vec<Pattern>,
    dids: std::collections::HashSet<Did>,
    max_message_bytes: usize,
}

impl Wanted {
    fn from_lists(
        collections: &[String],
        dids: &[String],
        max_message_bytes: Option<usize>,
    ) -> Result<Wanted, String> {
        if collections.len() > MAX_COLLECTIONS {
            return Err(format!(
                "at most {MAX_COLLECTIONS} wantedCollections, got {}",
                collections.len()
            ));
        }
        if dids.len() > MAX_DIDS {
            return Err(format!("at most {MAX_DIDS} wantedDids, got {}", dids.len()));
        }
        Ok(Wanted {
            collections: collections
                .iter()
                .map(|text| {
                    text.parse::<Pattern>()
                        .map_err(|err| format!("wantedCollections: {err}"))
                })
                .collect::<Result<_, _>>()?,
            dids: dids
                .iter()
                .map(|text| {
                    text.parse::<Did>()
                        .map_err(|err| format!("wantedDids: {text:?}: {err}"))
                })
                .collect::<Result<_, _>>()?,
            max_message_bytes: max_message_bytes.unwrap_or(0),
        })
    }

    fn wants_did(&self, did: &Did) -> bool {
        self.dids.is_empty() || self.dids.contains(did)
    }

    fn wants_collection(&self, collection: &str) -> bool {
        self.collections.is_empty()
            || self
                .collections
                .iter()
                .any(|pattern| pattern.matches(collection))
    }
}

/// The parsed query.
struct Params {
    wanted: Wanted,
    cursor: Option<u64>,
    require_hello: bool,
    compress: bool,
}

/// zstd's default level: Jetstream measured playback speed, not ratio, as the cost that
/// matters.
const ZSTD_LEVEL: i32 = 3;

fn parse(query: Option<&str>) -> Result<Params, String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or_default())
        .map_err(|err| format!("malformed query: {err}"))?;
    let mut collections = Vec::new();
    let mut dids = Vec::new();
    let mut max_message_bytes = None;
    let mut cursor = None;
    let mut require_hello = false;
    let mut compress = false;
    for (key, value) in pairs {
        match key.as_str() {
            "wantedCollections" => collections.push(value),
            "wantedDids" => dids.push(value),
            "maxMessageSizeBytes" => {
                max_message_bytes = Some(value.parse::<usize>().map_err(|_| {
                    "maxMessageSizeBytes must be a non-negative integer".to_owned()
                })?);
            }
            "cursor" => {
                cursor = Some(value.parse::<u64>().map_err(|_| {
                    "cursor must be a time in microseconds since the Unix epoch".to_owned()
                })?);
            }
            "compress" => compress = value == "true",
            "requireHello" => require_hello = value == "true",
            _ => {}
        }
    }
    Ok(Params {
        wanted: Wanted::from_lists(&collections, &dids, max_message_bytes)?,
        cursor,
        require_hello,
        compress,
    })
}

pub(crate) async fn subscribe(
    State(app): State<App>,
    RawQuery(query): RawQuery,
    headers: axum::http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let mut params = parse(query.as_deref()).map_err(ApiError::bad_request)?;
    if headers
        .get("socket-encoding")
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"zstd"))
    {
        params.compress = true;
    }
    let store = app.engine.store().clone();
    let now = atpdb_sync::now_us();
    let tail = match params.cursor {
        Some(cursor) if cursor < now => Tail::from_time(store, cursor)
            .await
            .map_err(ApiError::internal)?,
        _ => Tail::live(store),
    };
    Ok(upgrade
        .max_message_size(10 << 20)
        .on_upgrade(move |socket| serve(socket, tail, params))
        .into_response())
}

async fn serve(socket: WebSocket, mut tail: Tail, params: Params) {
    let (mut sink, mut stream) = socket.split();
    let mut wanted = params.wanted;
    let mut waiting_for_hello = params.require_hello;
    let from_time = params.cursor.unwrap_or(0);
    // One context per socket, reused for every frame.
    let mut compressor = match params.compress {
        true => match zstd::bulk::Compressor::new(ZSTD_LEVEL) {
            Ok(compressor) => Some(compressor),
            Err(err) => {
                tracing::error!(%err, "subscribe.zstd_unavailable");
                return;
            }
        },
        false => None,
    };
    loop {
        tokio::select! {
            page = tail.next(), if !waiting_for_hello => {
                let Ok(page) = page else { return };
                for (id, event) in page {
                    if event.time_us() < from_time {
                        continue;
                    }
                    for frame in frames(id, &event, &wanted) {
                        if wanted.max_message_bytes > 0 && frame.len() > wanted.max_message_bytes {
                            continue;
                        }
                        let message = match compressor.as_mut() {
                            None => Message::Text(Utf8Bytes::from(frame)),
                            Some(compressor) => match compressor.compress(frame.as_bytes()) {
                                Ok(bytes) => Message::Binary(bytes.into()),
                                Err(err) => {
                                    tracing::error!(%err, "subscribe.compress_failed");
                                    return;
                                }
                            },
                        };
                        if sink.feed(message).await.is_err() {
                            return;
                        }
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Some(update) = options_update(text.as_str(), &wanted) {
                        wanted = update;
                        waiting_for_hello = false;
                    }
                }
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

/// An `options_update` message's new filters (fields it leaves out keep their value);
/// `None` for any other message or a malformed update.
fn options_update(text: &str, current: &Wanted) -> Option<Wanted> {
    let message: Value = serde_json::from_str(text).ok()?;
    if message["type"] != "options_update" {
        return None;
    }
    let payload = &message["payload"];
    let strings = |key: &str| -> Option<Vec<String>> {
        payload.get(key).map(|value| {
            value
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|item| item.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        })
    };
    let mut update = Wanted::from_lists(
        &strings("wantedCollections").unwrap_or_default(),
        &strings("wantedDids").unwrap_or_default(),
        payload["maxMessageSizeBytes"]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok()),
    )
    .ok()?;
    if payload.get("wantedCollections").is_none() {
        update.collections = current.collections.clone();
    }
    if payload.get("wantedDids").is_none() {
        update.dids = current.dids.clone();
    }
    if payload.get("maxMessageSizeBytes").is_none() {
        update.max_message_bytes = current.max_message_bytes;
    }
    Some(update)
}

/// Jetstream's events for one atpdb event, as the client wants them.
fn frames(id: u64, event: &Event, wanted: &Wanted) -> Vec<String> {
    match event {
        Event::Record(record) => {
            if !wanted.wants_did(&record.did) || !wanted.wants_collection(&record.collection) {
                return Vec::new();
            }
            let mut commit = serde_json::Map::new();
            commit.insert("rev".into(), record.rev.as_str().into());
            commit.insert("operation".into(), record.action.as_str().into());
            commit.insert("collection".into(), record.collection.as_str().into());
            commit.insert("rkey".into(), record.rkey.as_str().into());
            if let Some(value) = record.record_json() {
                commit.insert("record".into(), value);
            }
            if let Some(cid) = &record.cid {
                commit.insert("cid".into(), cid.to_string().into());
            }
            vec![
                json!({
                    "did": record.did.as_str(),
                    "time_us": record.time_us,
                    "kind": "commit",
                    "commit": commit,
                })
                .to_string(),
            ]
        }
        Event::Identity(identity) => {
            if !wanted.wants_did(&identity.did) {
                return Vec::new();
            }
            let time = rfc3339(identity.time_us);
            let mut account = json!({
                "active": identity.is_active,
                "did": identity.did.as_str(),
                "seq": id,
                "time": time,
            });
            if !identity.is_active
                && let Some(object) = account.as_object_mut()
            {
                object.insert("status".into(), identity.status.as_str().into());
            }
            vec![
                json!({
                    "did": identity.did.as_str(),
                    "time_us": identity.time_us,
                    "kind": "identity",
                    "identity": {
                        "did": identity.did.as_str(),
                        "handle": identity.handle,
                        "seq": id,
                        "time": time,
                    },
                })
                .to_string(),
                json!({
                    "did": identity.did.as_str(),
                    "time_us": identity.time_us,
                    "kind": "account",
                    "account": account,
                })
                .to_string(),
            ]
        }
        Event::RepoState(_) => Vec::new(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for µs since the Unix epoch (days to civil date: Howard
/// Hinnant's algorithm).
fn rfc3339(time_us: u64) -> String {
    let seconds = time_us / 1_000_000;
    let millis = (time_us / 1000) % 1000;
    let days = i64::try_from(seconds / 86_400).unwrap_or(0);
    let of_day = seconds % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        of_day / 3600,
        (of_day / 60) % 60,
        of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123_000), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_243_352_157_654), "2026-12-02T20:29:12.157Z");
    }

    #[test]
    fn queries_parse_and_bad_ones_say_why() {
        let params = parse(Some(
            "wantedCollections=app.bsky.feed.*&wantedCollections=fm.teal.alpha.play&cursor=5&maxMessageSizeBytes=100",
        ))
        .unwrap_or_else(|err| panic!("{err}"));
        assert!(params.wanted.wants_collection("app.bsky.feed.like"));
        assert!(params.wanted.wants_collection("fm.teal.alpha.play"));
        assert!(!params.wanted.wants_collection("app.bsky.graph.follow"));
        assert_eq!(params.cursor, Some(5));
        assert_eq!(params.wanted.max_message_bytes, 100);
        for bad in [
            "wantedCollections=app.bsky*",
            "wantedDids=nope",
            "cursor=-1",
            "maxMessageSizeBytes=x",
        ] {
            assert!(parse(Some(bad)).is_err(), "{bad}");
        }
        let many = (0..=MAX_COLLECTIONS)
            .map(|n| format!("wantedCollections=a.b.c{n}"))
            .collect::<Vec<_>>()
            .join("&");
        assert!(parse(Some(&many)).is_err());
    }

    #[test]
    fn options_updates_replace_only_what_they_name() {
        let current = Wanted::from_lists(&["a.b.c".to_owned()], &[], Some(10))
            .unwrap_or_else(|err| panic!("{err}"));
        let update = options_update(
            r#"{"type":"options_update","payload":{"wantedCollections":["x.y.*"]}}"#,
            &current,
        )
        .unwrap_or_else(|| panic!("an update"));
        assert!(update.wants_collection("x.y.z") && !update.wants_collection("a.b.c"));
        assert_eq!(update.max_message_bytes, 10);
        assert!(options_update(r#"{"type":"heartbeat"}"#, &current).is_none());
        assert!(
            options_update(
                r#"{"type":"options_update","payload":{"wantedDids":["bad"]}}"#,
                &current
            )
            .is_none()
        );
    }
}
