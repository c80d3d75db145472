//! Outbox events: what a consumer is told, in commit order, and their Tap wire form.

use std::fmt::Write as _;

use atpdb_repo::Cid;
use atpdb_repo::cbor::Encoder;
use atpdb_repo::syntax::Did;
use atpdb_repo::value::cbor_to_json;

use crate::types::RepoState;

/// What happened to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// A new record.
    Create,
    /// A new version of an existing record.
    Update,
    /// The record is gone.
    Delete,
}

impl Action {
    /// The protocol's word: `create`, `update`, `delete`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }

    fn code(self) -> u64 {
        match self {
            Action::Create => 0,
            Action::Update => 1,
            Action::Delete => 2,
        }
    }

    fn from_code(code: u64) -> Option<Action> {
        match code {
            0 => Some(Action::Create),
            1 => Some(Action::Update),
            2 => Some(Action::Delete),
            _ => None,
        }
    }
}

/// One outbox event. Its id is not part of it: the store assigns ids at commit, in commit
/// order, and hands them out beside the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A record was created, updated or deleted.
    Record(RecordEvent),
    /// An account's handle or status changed.
    Identity(IdentityEvent),
    /// A repo changed sync state (atpdb's addition to Tap's event types).
    RepoState(RepoStateEvent),
}

/// A record change, from a backfill (`live: false`) or the firehose (`live: true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordEvent {
    /// Whether it came from the firehose rather than a backfill.
    pub live: bool,
    /// The account.
    pub did: Did,
    /// The rev of the commit that made the change.
    pub rev: String,
    /// The collection NSID.
    pub collection: String,
    /// The record key.
    pub rkey: String,
    /// What happened.
    pub action: Action,
    /// The new record's CID (`None` for deletes).
    pub cid: Option<Cid>,
    /// The new record's DRISL bytes (`None` for deletes).
    pub record: Option<Vec<u8>>,
    /// When atpdb saw the change (µs since the Unix epoch).
    pub time_us: u64,
}

impl RecordEvent {
    /// The event as borrowed parts.
    pub fn as_ref(&self) -> RecordEventRef<'_> {
        RecordEventRef {
            live: self.live,
            did: &self.did,
            rev: &self.rev,
            collection: &self.collection,
            rkey: &self.rkey,
            action: self.action,
            cid: self.cid.as_ref(),
            record: self.record.as_deref(),
            time_us: self.time_us,
        }
    }
}

/// A [`RecordEvent`] whose parts are borrowed, for [`crate::Batch::push_record_event`]: a
/// backfill holds them already (the walk lends the record), and owning them for the one
/// moment before they are encoded took four allocations and a copy of the record.
#[derive(Debug, Clone, Copy)]
pub struct RecordEventRef<'a> {
    /// As [`RecordEvent::live`].
    pub live: bool,
    /// As [`RecordEvent::did`].
    pub did: &'a Did,
    /// As [`RecordEvent::rev`].
    pub rev: &'a str,
    /// As [`RecordEvent::collection`].
    pub collection: &'a str,
    /// As [`RecordEvent::rkey`].
    pub rkey: &'a str,
    /// As [`RecordEvent::action`].
    pub action: Action,
    /// As [`RecordEvent::cid`].
    pub cid: Option<&'a Cid>,
    /// As [`RecordEvent::record`].
    pub record: Option<&'a [u8]>,
    /// As [`RecordEvent::time_us`].
    pub time_us: u64,
}

impl RecordEventRef<'_> {
    /// [`Event::encode`]'s form of the record event, appended to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(128 + self.record.map_or(0, <[u8]>::len));
        encode_stored(out, |encoder| {
            encoder.array(10);
            encoder.u64(KIND_RECORD);
            encoder.bool(self.live);
            encoder.text(self.did.as_str());
            encoder.text(self.rev);
            encoder.text(self.collection);
            encoder.text(self.rkey);
            encoder.u64(self.action.code());
            encoder.nullable_link(self.cid);
            match self.record {
                Some(bytes) => encoder.bytes(bytes),
                None => encoder.null(),
            }
            encoder.u64(self.time_us);
        });
    }
}

/// Appends to `out` the format byte and what `body` encodes: the stored form of an event.
fn encode_stored(out: &mut Vec<u8>, body: impl FnOnce(&mut Encoder)) {
    let mut encoder = Encoder::from_vec(std::mem::take(out));
    encoder.raw(&[EVENT_FORMAT]);
    body(&mut encoder);
    *out = encoder.into_bytes();
}

/// An identity change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityEvent {
    /// The account.
    pub did: Did,
    /// The verified handle, or `handle.invalid` when it does not verify; never empty.
    pub handle: String,
    /// Whether the account is active.
    pub is_active: bool,
    /// The account status (`active`, `takendown`...).
    pub status: String,
    /// When atpdb saw the change (µs since the Unix epoch).
    pub time_us: u64,
}

/// A repo's sync-state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoStateEvent {
    /// The account.
    pub did: Did,
    /// The new state.
    pub state: RepoState,
    /// Why, when there is something to say (an error message).
    pub reason: Option<String>,
    /// When the state changed (µs since the Unix epoch).
    pub time_us: u64,
}

/// Tags of the event kinds in the stored form.
const KIND_RECORD: u64 = 0;
const KIND_IDENTITY: u64 = 1;
const KIND_REPO_STATE: u64 = 2;

/// The format byte that starts every stored event.
const EVENT_FORMAT: u8 = 1;

impl Event {
    /// The account the event is about.
    pub fn did(&self) -> &Did {
        match self {
            Event::Record(event) => &event.did,
            Event::Identity(event) => &event.did,
            Event::RepoState(event) => &event.did,
        }
    }

    /// When the event happened (µs since the Unix epoch).
    pub fn time_us(&self) -> u64 {
        match self {
            Event::Record(event) => event.time_us,
            Event::Identity(event) => event.time_us,
            Event::RepoState(event) => event.time_us,
        }
    }

    /// Tap's wire form as a JSON value.
    ///
    /// A `serde_json::Value` does not keep field order (unless serde_json's `preserve_order`
    /// feature is on somewhere in the build), so send [`Event::to_tap_string`] when bytes
    /// must match Tap's.
    pub fn to_tap_json(&self, id: u64) -> serde_json::Value {
        match self {
            Event::Record(event) => {
                let mut body = serde_json::Map::new();
                body.insert("live".into(), event.live.into());
                body.insert("did".into(), event.did.as_str().into());
                body.insert("rev".into(), event.rev.as_str().into());
                body.insert("collection".into(), event.collection.as_str().into());
                body.insert("rkey".into(), event.rkey.as_str().into());
                body.insert("action".into(), event.action.as_str().into());
                if let Some(record) = event.record_json() {
                    body.insert("record".into(), record);
                }
                if let Some(cid) = &event.cid {
                    body.insert("cid".into(), cid.to_string().into());
                }
                serde_json::json!({ "id": id, "type": "record", "record": body })
            }
            Event::Identity(event) => serde_json::json!({
                "id": id,
                "type": "identity",
                "identity": {
                    "did": event.did.as_str(),
                    "handle": event.handle,
                    "is_active": event.is_active,
                    "status": event.status,
                },
            }),
            Event::RepoState(event) => {
                let mut body = serde_json::Map::new();
                body.insert("did".into(), event.did.as_str().into());
                body.insert("state".into(), event.state.as_str().into());
                if let Some(reason) = &event.reason {
                    body.insert("reason".into(), reason.as_str().into());
                }
                serde_json::json!({ "id": id, "type": "repo", "repo": body })
            }
        }
    }

    /// Tap's wire form, byte for byte as Tap's Go encoder writes it: fields in Tap's struct
    /// order, `record`/`cid`/`reason` omitted when absent, the record's own object keys
    /// sorted (Go sorts map keys), and `<`, `>`, `&`, U+2028, U+2029 escaped as Go does.
    pub fn to_tap_string(&self, id: u64) -> String {
        let mut out = String::with_capacity(256);
        let _ = write!(out, "{{\"id\":{id},\"type\":");
        match self {
            Event::Record(event) => {
                out.push_str("\"record\",\"record\":{\"live\":");
                out.push_str(if event.live { "true" } else { "false" });
                field(&mut out, "did", event.did.as_str());
                field(&mut out, "rev", &event.rev);
                field(&mut out, "collection", &event.collection);
                field(&mut out, "rkey", &event.rkey);
                field(&mut out, "action", event.action.as_str());
                if let Some(record) = event.record_json() {
                    out.push_str(",\"record\":");
                    write_json(&mut out, &record);
                }
                if let Some(cid) = &event.cid {
                    field(&mut out, "cid", &cid.to_string());
                }
            }
            Event::Identity(event) => {
                out.push_str("\"identity\",\"identity\":{\"did\":");
                write_string(&mut out, event.did.as_str());
                field(&mut out, "handle", &event.handle);
                out.push_str(",\"is_active\":");
                out.push_str(if event.is_active { "true" } else { "false" });
                field(&mut out, "status", &event.status);
            }
            Event::RepoState(event) => {
                out.push_str("\"repo\",\"repo\":{\"did\":");
                write_string(&mut out, event.did.as_str());
                field(&mut out, "state", event.state.as_str());
                if let Some(reason) = &event.reason {
                    field(&mut out, "reason", reason);
                }
            }
        }
        out.push_str("}}");
        out
    }

    /// The stored form: a format byte, then a DRISL array whose first item is the kind.
    #[cfg(test)]
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// [`Event::encode`]'s form appended to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Event::Record(event) => event.as_ref().encode_into(out),
            Event::Identity(event) => encode_stored(out, |encoder| {
                encoder.array(6);
                encoder.u64(KIND_IDENTITY);
                encoder.text(event.did.as_str());
                encoder.text(&event.handle);
                encoder.bool(event.is_active);
                encoder.text(&event.status);
                encoder.u64(event.time_us);
            }),
            Event::RepoState(event) => encode_stored(out, |encoder| {
                encoder.array(5);
                encoder.u64(KIND_REPO_STATE);
                encoder.text(event.did.as_str());
                encoder.u64(u64::from(event.state.code()));
                nullable_text(encoder, event.reason.as_deref());
                encoder.u64(event.time_us);
            }),
        }
    }

    /// Reads [`Event::encode`]'s form; the error says what is wrong, the caller adds the key.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Event, String> {
        let body = match bytes.split_first() {
            Some((&EVENT_FORMAT, body)) => body,
            Some((format, _)) => return Err(format!("unknown event format {format}")),
            None => return Err("empty value".to_owned()),
        };
        let mut decoder = atpdb_repo::cbor::Decoder::new(body);
        let len = decoder.array_len().map_err(|e| e.to_string())?;
        let kind = decoder.u64().map_err(|e| e.to_string())?;
        let expect_len = |expected: usize| {
            if len == expected {
                Ok(())
            } else {
                Err(format!(
                    "event of kind {kind} has {len} fields, expected {expected}"
                ))
            }
        };
        let event = match kind {
            KIND_RECORD => {
                expect_len(10)?;
                let live = decoder.bool().map_err(|e| e.to_string())?;
                let did = did(&mut decoder)?;
                let rev = text(&mut decoder)?;
                let collection = text(&mut decoder)?;
                let rkey = text(&mut decoder)?;
                let action_code = decoder.u64().map_err(|e| e.to_string())?;
                let action = Action::from_code(action_code)
                    .ok_or_else(|| format!("unknown action code {action_code}"))?;
                let cid = decoder.nullable_link().map_err(|e| e.to_string())?;
                let record = if decoder.null().map_err(|e| e.to_string())? {
                    None
                } else {
                    Some(decoder.bytes().map_err(|e| e.to_string())?.to_vec())
                };
                let time_us = decoder.u64().map_err(|e| e.to_string())?;
                Event::Record(RecordEvent {
                    live,
                    did,
                    rev,
                    collection,
                    rkey,
                    action,
                    cid,
                    record,
                    time_us,
                })
            }
            KIND_IDENTITY => {
                expect_len(6)?;
                Event::Identity(IdentityEvent {
                    did: did(&mut decoder)?,
                    handle: text(&mut decoder)?,
                    is_active: decoder.bool().map_err(|e| e.to_string())?,
                    status: text(&mut decoder)?,
                    time_us: decoder.u64().map_err(|e| e.to_string())?,
                })
            }
            KIND_REPO_STATE => {
                expect_len(5)?;
                let did = did(&mut decoder)?;
                let code = decoder.u64().map_err(|e| e.to_string())?;
                let state = u8::try_from(code)
                    .ok()
                    .and_then(RepoState::from_code)
                    .ok_or_else(|| format!("unknown repo state code {code}"))?;
                Event::RepoState(RepoStateEvent {
                    did,
                    state,
                    reason: read_nullable_text(&mut decoder)?,
                    time_us: decoder.u64().map_err(|e| e.to_string())?,
                })
            }
            other => return Err(format!("unknown event kind {other}")),
        };
        decoder.finish().map_err(|e| e.to_string())?;
        Ok(event)
    }
}

impl RecordEvent {
    /// The record in the data model's JSON, or `None` when there is none or its bytes do not
    /// decode (Tap then omits `record` and keeps `cid`).
    pub fn record_json(&self) -> Option<serde_json::Value> {
        self.record
            .as_deref()
            .and_then(|bytes| cbor_to_json(bytes).ok())
    }
}

/// Writes a text item or `null`.
pub(crate) fn nullable_text(encoder: &mut Encoder, value: Option<&str>) {
    match value {
        Some(value) => encoder.text(value),
        None => encoder.null(),
    }
}

/// Reads a text item or `null`.
pub(crate) fn read_nullable_text(
    decoder: &mut atpdb_repo::cbor::Decoder<'_>,
) -> Result<Option<String>, String> {
    if decoder.null().map_err(|e| e.to_string())? {
        Ok(None)
    } else {
        text(decoder).map(Some)
    }
}

/// Reads a text item, owned.
pub(crate) fn text(decoder: &mut atpdb_repo::cbor::Decoder<'_>) -> Result<String, String> {
    decoder.text().map(str::to_owned).map_err(|e| e.to_string())
}

/// Reads a text item that must be a DID.
pub(crate) fn did(decoder: &mut atpdb_repo::cbor::Decoder<'_>) -> Result<Did, String> {
    decoder
        .text()
        .map_err(|e| e.to_string())?
        .parse()
        .map_err(|e: atpdb_repo::syntax::SyntaxError| e.to_string())
}

/// Appends `,"name":"value"`.
fn field(out: &mut String, name: &str, value: &str) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":");
    write_string(out, value);
}

/// Appends `value` as JSON with object keys sorted bytewise, as Go's `encoding/json` writes a
/// `map[string]any`.
fn write_json(out: &mut String, value: &serde_json::Value) {
    match value {
        serde_json::Value::Null => out.push_str("null"),
        serde_json::Value::Bool(value) => out.push_str(if *value { "true" } else { "false" }),
        serde_json::Value::Number(number) => {
            let _ = write!(out, "{number}");
        }
        serde_json::Value::String(text) => write_string(out, text),
        serde_json::Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_json(out, item);
            }
            out.push(']');
        }
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_string(out, key);
                out.push(':');
                write_json(out, item);
            }
            out.push('}');
        }
    }
}

/// Appends a JSON string escaped as Go's `encoding/json` does (with HTML escaping on, its
/// default): `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, other controls and `<`, `>`, `&`,
/// U+2028, U+2029 as `\u00XX`/`\u20XX`.
fn write_string(out: &mut String, value: &str) {
    out.push('"');
    let mut start = 0;
    for (index, ch) in value.char_indices() {
        let escape: Option<&str> = match ch {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\u{8}' => Some("\\b"),
            '\u{c}' => Some("\\f"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            _ => None,
        };
        let needs_hex = matches!(
            ch,
            '\u{0}'..='\u{1f}' | '<' | '>' | '&' | '\u{2028}' | '\u{2029}'
        );
        if escape.is_none() && !needs_hex {
            continue;
        }
        out.push_str(value.get(start..index).unwrap_or_default());
        match escape {
            Some(escape) => out.push_str(escape),
            None => {
                let _ = write!(out, "\\u{:04x}", u32::from(ch));
            }
        }
        start = index + ch.len_utf8();
    }
    out.push_str(value.get(start..).unwrap_or_default());
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_escaping() {
        let mut out = String::new();
        write_string(&mut out, "a\"b\\c\n<x>&\u{1}\u{2028}é\u{8}");
        assert_eq!(out, r#""a\"b\\c\n\u003cx\u003e\u0026\u0001\u2028é\b""#);
    }

    #[test]
    fn nested_keys_are_sorted() {
        let value = serde_json::json!({"b": 1, "a": {"z": [true, null], "aa": "x"}});
        let mut out = String::new();
        write_json(&mut out, &value);
        assert_eq!(out, r#"{"a":{"aa":"x","z":[true,null]},"b":1}"#);
    }
}
