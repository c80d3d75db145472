//! Keys and values on disk: how each keyspace lays out its bytes.
//!
//! Every value starts with a format byte so a later version can change a layout and still
//! read the old one. Keys carry no format byte: their order is the contract.
//!
//! | keyspace  | key                                   | value                                   |
//! |-----------|---------------------------------------|-----------------------------------------|
//! | `records` | did ‖ 0x00 ‖ collection ‖ `/` ‖ rkey  | 1 ‖ CID bytes ‖ record DRISL bytes      |
//! | `repos`   | did                                   | 1 ‖ state code ‖ DRISL array            |
//! | `states`  | state code ‖ did                      | empty                                   |
//! | `counts`  | did                                   | u64 BE: records of the DID              |
//! | `outbox`  | id u64 BE                             | 1 ‖ DRISL array (see `event.rs`)        |
//! | `buffer`  | did ‖ 0x00 ‖ seq u64 BE               | 1 ‖ opaque bytes                        |
//! | `runs`    | id u64 BE                             | 1 ‖ DRISL array                         |
//! | `cursors` | name                                  | 1 ‖ UTF-8 text                          |
//! | `config`  | key                                   | 1 ‖ JSON                                |
//! | `meta`    | counter name                          | u64 BE                                  |
//!
//! The record key puts `/` between collection and rkey, not a second 0x00: then one DID's
//! keys sort exactly like its MST keys (`collection/rkey` bytewise), which a merge-join
//! against a backfill needs. With 0x00 they would not: `a.b.c.d/x` sorts before `a.b.c/x`
//! in the MST (`.` < `/`) but after it with 0x00. Neither DIDs nor NSIDs contain 0x00 or `/`,
//! so the prefixes `did ‖ 0x00` and `did ‖ 0x00 ‖ collection ‖ /` select exactly one DID and
//! one collection.

use atpdb_repo::Cid;
use atpdb_repo::cbor::{Decoder, Encoder};
use atpdb_repo::syntax::Did;

use crate::error::StoreError;
use crate::event::{read_nullable_text, text};
use crate::types::{AccountStatus, BackfillRun, RepoEntry, RepoState};

/// The format byte of every value this build writes.
pub(crate) const FORMAT: u8 = 1;

/// The longest key fjall accepts.
pub(crate) const MAX_KEY_LEN: usize = 65_535;

/// `did ‖ 0x00`: the prefix of one DID's records and buffered frames.
pub(crate) fn did_prefix(did: &Did) -> Vec<u8> {
    let mut key = Vec::with_capacity(did.as_str().len() + 1);
    key.extend_from_slice(did.as_str().as_bytes());
    key.push(0);
    key
}

/// `did ‖ 0x00 ‖ collection ‖ /`: the prefix of one collection's records.
pub(crate) fn collection_prefix(did: &Did, collection: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(did.as_str().len() + collection.len() + 2);
    key.extend_from_slice(did.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(collection.as_bytes());
    key.push(b'/');
    key
}

/// The key of one record.
pub(crate) fn record_key(did: &Did, collection: &str, rkey: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(did.as_str().len() + collection.len() + rkey.len() + 2);
    write_record_key(&mut key, did, collection, rkey);
    key
}

/// [`record_key`] appended to `out`.
pub(crate) fn write_record_key(out: &mut Vec<u8>, did: &Did, collection: &str, rkey: &str) {
    out.extend_from_slice(did.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(collection.as_bytes());
    out.push(b'/');
    out.extend_from_slice(rkey.as_bytes());
}

/// The DID bytes of a record or buffer key (everything before the first 0x00).
pub(crate) fn key_did(key: &[u8]) -> &[u8] {
    let end = key.iter().position(|&b| b == 0).unwrap_or(key.len());
    key.get(..end).unwrap_or(key)
}

/// Splits a record key's part after `did ‖ 0x00` into collection and rkey.
pub(crate) fn split_path(key: &[u8], prefix_len: usize) -> Result<(&str, &str), StoreError> {
    let path = key
        .get(prefix_len..)
        .ok_or_else(|| StoreError::corrupt("record", key, "key shorter than its prefix"))?;
    let path = std::str::from_utf8(path)
        .map_err(|_| StoreError::corrupt("record", key, "key is not UTF-8"))?;
    path.split_once('/').ok_or_else(|| {
        StoreError::corrupt("record", key, "key has no '/' between collection and rkey")
    })
}

/// A record's stored value.
#[cfg(test)]
pub(crate) fn record_value(cid: &Cid, bytes: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(1 + cid.encoded_len() + bytes.len());
    write_record_value(&mut value, cid, bytes);
    value
}

/// [`record_value`] appended to `out`.
pub(crate) fn write_record_value(out: &mut Vec<u8>, cid: &Cid, bytes: &[u8]) {
    out.push(FORMAT);
    cid.write_bytes(out);
    out.extend_from_slice(bytes);
}

/// Splits a record's stored value into CID and record bytes.
pub(crate) fn split_record_value<'a>(
    key: &[u8],
    value: &'a [u8],
) -> Result<(Cid, &'a [u8]), StoreError> {
    let body = format_body("record", key, value)?;
    let (cid, used) =
        Cid::read_prefix(body).map_err(|error| StoreError::corrupt("record", key, error))?;
    Ok((cid, body.get(used..).unwrap_or_default()))
}

/// The value after its format byte, which must be [`FORMAT`].
pub(crate) fn format_body<'a>(
    what: &'static str,
    key: &[u8],
    value: &'a [u8],
) -> Result<&'a [u8], StoreError> {
    match value.split_first() {
        Some((&FORMAT, body)) => Ok(body),
        Some((format, _)) => Err(StoreError::corrupt(
            what,
            key,
            format!("unknown value format {format}"),
        )),
        None => Err(StoreError::corrupt(what, key, "empty value")),
    }
}

/// `state code ‖ did`: a key of the state index.
pub(crate) fn state_key(state: RepoState, did: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(did.len() + 1);
    key.push(state.code());
    key.extend_from_slice(did);
    key
}

/// A repo entry's stored value. The state sits in a fixed byte so a commit can update the
/// state index from the old value without decoding the rest.
pub(crate) fn repo_value(repo: &RepoEntry) -> Vec<u8> {
    let mut encoder = Encoder::with_capacity(128);
    encoder.raw(&[FORMAT, repo.state.code()]);
    encoder.array(10);
    encoder.text(repo.status.as_str());
    crate::event::nullable_text(&mut encoder, repo.handle.as_deref());
    crate::event::nullable_text(&mut encoder, repo.rev.as_deref());
    encoder.nullable_link(repo.data.as_ref());
    crate::event::nullable_text(&mut encoder, repo.pds.as_deref());
    crate::event::nullable_text(&mut encoder, repo.error.as_deref());
    encoder.u64(u64::from(repo.retries));
    encoder.u64(repo.retry_after_us);
    encoder.u64(repo.last_sync_us);
    encoder.u64(repo.added_us);
    encoder.into_bytes()
}

/// The state byte of a stored repo value.
pub(crate) fn repo_state(key: &[u8], value: &[u8]) -> Result<RepoState, StoreError> {
    let body = format_body("repo", key, value)?;
    body.first()
        .and_then(|&code| RepoState::from_code(code))
        .ok_or_else(|| StoreError::corrupt("repo", key, "missing or unknown state code"))
}

/// Reads [`repo_value`]'s form.
pub(crate) fn decode_repo(key: &[u8], value: &[u8]) -> Result<RepoEntry, StoreError> {
    let state = repo_state(key, value)?;
    let corrupt = |reason: String| StoreError::corrupt("repo", key, reason);
    let did = parse_did("repo", key, key)?;
    let body = value.get(2..).unwrap_or_default();
    let mut decoder = Decoder::new(body);
    let entry = (|| -> Result<RepoEntry, String> {
        let len = decoder.array_len().map_err(|e| e.to_string())?;
        if len != 10 {
            return Err(format!("repo entry has {len} fields, expected 10"));
        }
        let status = AccountStatus::from_name(decoder.text().map_err(|e| e.to_string())?);
        let handle = read_nullable_text(&mut decoder)?;
        let rev = read_nullable_text(&mut decoder)?;
        let data = decoder.nullable_link().map_err(|e| e.to_string())?;
        let pds = read_nullable_text(&mut decoder)?;
        let error = read_nullable_text(&mut decoder)?;
        let retries = decoder.u64().map_err(|e| e.to_string())?;
        let retries =
            u32::try_from(retries).map_err(|_| format!("retries {retries} exceeds u32"))?;
        let retry_after_us = decoder.u64().map_err(|e| e.to_string())?;
        let last_sync_us = decoder.u64().map_err(|e| e.to_string())?;
        let added_us = decoder.u64().map_err(|e| e.to_string())?;
        decoder.finish().map_err(|e| e.to_string())?;
        Ok(RepoEntry {
            did,
            state,
            status,
            handle,
            rev,
            data,
            pds,
            error,
            retries,
            retry_after_us,
            last_sync_us,
            added_us,
        })
    })()
    .map_err(corrupt)?;
    Ok(entry)
}

/// A backfill run's stored value (the id is the key).
pub(crate) fn run_value(run: &BackfillRun) -> Vec<u8> {
    let mut encoder = Encoder::with_capacity(64);
    encoder.raw(&[FORMAT]);
    encoder.array(8);
    encoder.text(&run.kind);
    encoder.u64(run.started_us);
    match run.finished_us {
        Some(finished) => encoder.u64(finished),
        None => encoder.null(),
    }
    encoder.u64(run.done);
    encoder.u64(run.total);
    encoder.u64(run.records);
    encoder.u64(run.errors);
    crate::event::nullable_text(&mut encoder, run.checkpoint.as_deref());
    encoder.into_bytes()
}

/// Reads [`run_value`]'s form.
pub(crate) fn decode_run(key: &[u8], value: &[u8]) -> Result<BackfillRun, StoreError> {
    let id = decode_u64("run", key, key)?;
    let body = format_body("run", key, value)?;
    let mut decoder = Decoder::new(body);
    (|| -> Result<BackfillRun, String> {
        let len = decoder.array_len().map_err(|e| e.to_string())?;
        if len != 8 {
            return Err(format!("run has {len} fields, expected 8"));
        }
        let kind = text(&mut decoder)?;
        let started_us = decoder.u64().map_err(|e| e.to_string())?;
        let finished_us = if decoder.null().map_err(|e| e.to_string())? {
            None
        } else {
            Some(decoder.u64().map_err(|e| e.to_string())?)
        };
        let run = BackfillRun {
            id,
            kind,
            started_us,
            finished_us,
            done: decoder.u64().map_err(|e| e.to_string())?,
            total: decoder.u64().map_err(|e| e.to_string())?,
            records: decoder.u64().map_err(|e| e.to_string())?,
            errors: decoder.u64().map_err(|e| e.to_string())?,
            checkpoint: read_nullable_text(&mut decoder)?,
        };
        decoder.finish().map_err(|e| e.to_string())?;
        Ok(run)
    })()
    .map_err(|reason| StoreError::corrupt("run", key, reason))
}

/// A value with a format byte in front.
pub(crate) fn with_format(bytes: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(bytes.len() + 1);
    value.push(FORMAT);
    value.extend_from_slice(bytes);
    value
}

/// Reads eight big-endian bytes (a counter value, an id key).
pub(crate) fn decode_u64(what: &'static str, key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| {
        StoreError::corrupt(
            what,
            key,
            format!("{} bytes where 8 were expected", bytes.len()),
        )
    })?;
    Ok(u64::from_be_bytes(array))
}

/// Checks that `did` parses; used where a DID comes back out of a key.
pub(crate) fn parse_did(what: &'static str, key: &[u8], bytes: &[u8]) -> Result<Did, StoreError> {
    std::str::from_utf8(bytes)
        .map_err(|_| StoreError::corrupt(what, key, "DID is not UTF-8"))?
        .parse()
        .map_err(|e: atpdb_repo::syntax::SyntaxError| StoreError::corrupt(what, key, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::event::{Action, Event, RecordEvent};

    fn repo() -> RepoEntry {
        let mut repo = RepoEntry::new("did:plc:abc".parse().unwrap(), 5);
        repo.handle = Some("abc.test".to_owned());
        repo.data = Some(Cid::dag_cbor(b"root"));
        repo
    }

    fn event() -> Event {
        Event::Record(RecordEvent {
            live: true,
            did: "did:plc:abc".parse().unwrap(),
            rev: "rev".to_owned(),
            collection: "a.b.c".to_owned(),
            rkey: "k".to_owned(),
            action: Action::Create,
            cid: Some(Cid::dag_cbor(b"x")),
            record: Some(b"x".to_vec()),
            time_us: 1,
        })
    }

    /// Every truncation and a wrong format byte decode to an error, never a panic.
    #[test]
    fn damaged_values_are_errors() {
        let key = b"did:plc:abc";
        let repo_bytes = repo_value(&repo());
        assert_eq!(decode_repo(key, &repo_bytes).unwrap(), repo());
        let run = BackfillRun {
            id: 3,
            kind: "full".to_owned(),
            checkpoint: Some("c".to_owned()),
            ..BackfillRun::default()
        };
        let run_key = 3u64.to_be_bytes();
        let run_bytes = run_value(&run);
        assert_eq!(decode_run(&run_key, &run_bytes).unwrap(), run);
        let event_bytes = event().encode();
        assert_eq!(Event::decode(&event_bytes).unwrap(), event());
        let record_bytes = record_value(&Cid::dag_cbor(b"x"), b"x");

        for len in 0..repo_bytes.len() {
            assert!(
                decode_repo(key, &repo_bytes[..len]).is_err(),
                "repo cut at {len}"
            );
        }
        for len in 0..run_bytes.len() {
            assert!(
                decode_run(&run_key, &run_bytes[..len]).is_err(),
                "run cut at {len}"
            );
        }
        for len in 0..event_bytes.len() {
            assert!(
                Event::decode(&event_bytes[..len]).is_err(),
                "event cut at {len}"
            );
        }
        for len in 0..record_bytes.len() - 1 {
            assert!(
                split_record_value(key, &record_bytes[..len]).is_err(),
                "record cut at {len}"
            );
        }
        for bytes in [&repo_bytes, &run_bytes, &event_bytes, &record_bytes] {
            let mut wrong = bytes.clone();
            wrong[0] = 9;
            assert!(decode_repo(key, &wrong).is_err());
            assert!(decode_run(&run_key, &wrong).is_err());
            assert!(Event::decode(&wrong).is_err());
            assert!(split_record_value(key, &wrong).is_err());
        }
        // An unknown state code and a bad DID key.
        let mut wrong_state = repo_bytes.clone();
        wrong_state[1] = 200;
        assert!(decode_repo(key, &wrong_state).is_err());
        assert!(decode_repo(b"not a did", &repo_bytes).is_err());
        assert!(decode_u64("counter", b"k", &[1, 2, 3]).is_err());
    }

    #[test]
    fn record_keys_split_and_sort_like_mst_keys() {
        let did: Did = "did:plc:abc".parse().unwrap();
        let key = record_key(&did, "a.b.c", "3k");
        assert_eq!(key_did(&key), b"did:plc:abc");
        assert_eq!(
            split_path(&key, did_prefix(&did).len()).unwrap(),
            ("a.b.c", "3k")
        );
        let mut keys = [
            record_key(&did, "a.b.c", "x"),
            record_key(&did, "a.b.c.d", "x"),
            record_key(&did, "a.b.c-d.e", "x"),
            record_key(&did, "a.b.cd", "x"),
        ];
        keys.sort();
        let mut paths = ["a.b.c/x", "a.b.c.d/x", "a.b.c-d.e/x", "a.b.cd/x"];
        paths.sort();
        let from_keys: Vec<String> = keys
            .iter()
            .map(|key| {
                let (collection, rkey) = split_path(key, did_prefix(&did).len()).unwrap();
                format!("{collection}/{rkey}")
            })
            .collect();
        assert_eq!(from_keys, paths);
    }
}
