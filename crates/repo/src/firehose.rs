//! The `com.atproto.sync.subscribeRepos` wire format, and the stateless Sync 1.1 checks of one event.
//!
//! # Overview
//!
//! A firehose frame is two DRISL items back to back: a header `{op, t}` and a body.
//! [`decode_frame`] turns one WebSocket binary frame into a [`Frame`]; [`encode_message`] and
//! [`encode_error`] write frames. Nothing here touches a socket: the devnet's PDS and relay,
//! the tests and the sync engine all bring their own bytes.
//!
//! A decoded [`CommitEvent`] is only a claim. [`verify_commit`] checks everything one event
//! can prove on its own (checklist steps 1, 2, 4, 6 and 7 of the Sync 1.1 spec): the `blocks`
//! CAR and every block hash, the commit object against the event, the signature, the shape of
//! the ops, that each op matches the new tree, and that undoing the ops gives `prevData`. What
//! needs per-repo state (account status, rev ordering, the `since`/`prevData` chain) and
//! re-resolving a key after a failed signature belong to the sync engine. [`CommitProof`]
//! splits the signature from the rest, so a caller can retry with a fresh key without
//! redoing the tree work.
//!
//! # Example
//!
//! A host commits, encodes the event; a consumer decodes and verifies it.
//!
//! ```
//! use atpdb_repo::crypto::Curve;
//! use atpdb_repo::firehose::{self, CommitEvent, Frame, Message};
//! use atpdb_repo::repo::{MemoryRepo, Write};
//! use atpdb_repo::sample::{sample_did, sample_keypair, sample_record};
//! use atpdb_repo::syntax::{Datetime, Tid};
//!
//! let key = sample_keypair(1, Curve::K256);
//! let (mut repo, _) = MemoryRepo::create(sample_did(1), &key, Tid::from_parts(1, 0), &[])?;
//! let record = sample_record(1, 1, 1_700_000_000_000_000, &[]);
//! let write = Write::Create { path: record.path(), record: record.to_cbor()? };
//! let data = repo.apply(&key, Tid::from_parts(2, 0), &[write])?;
//! let event = CommitEvent::from_commit_data(1, &data, Datetime::now(), Vec::new());
//! let bytes = firehose::encode_message(&Message::Commit(event));
//!
//! let Frame::Message(Message::Commit(event)) = firehose::decode_frame(&bytes)? else {
//!     return Err("not a #commit".into());
//! };
//! let verified = firehose::verify_commit(&event, &key.public())?;
//! assert!(verified.is_proven());
//! assert_eq!(verified.proof().records()?[0].path(), record.path());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Decisions
//!
//! - Frames must be strict DRISL, map keys in canonical order included. Both reference
//!   producers (TypeScript `lex-cbor`, Go `cbor-gen`) write canonical order, and the order
//!   check is also what rejects repeated keys in linear time.
//! - Unknown `t` values decode to [`Message::Unknown`], keeping the body so a relay can pass
//!   it on; unknown `op` values decode to [`Frame::Unknown`]. The spec says to ignore both.
//!   The body must still be valid DRISL: bad framing means a broken stream.
//! - Unknown fields are ignored on decode and therefore dropped on re-encode.
//! - An optional field holding `null` reads as absent, as Go's decoders treat it.
//! - Every field is type-checked as it is decoded: `repo`/`did` are [`Did`]s, `rev`/`since`
//!   [`Tid`]s, `time` a [`Datetime`], op paths repo paths. The reference consumer
//!   (`@atproto/sync`) validates frames against the lexicon and drops those that fail too.
//! - Limits ([`MAX_FRAME_BYTES`], [`MAX_COMMIT_BLOCKS_BYTES`], [`MAX_SYNC_BLOCKS_BYTES`],
//!   [`MAX_COMMIT_OPS`]) are checked before the work they bound.
//! - Verified records are owned bytes ([`Record`], the same type a `getRepo` walk gives): the
//!   sync engine hands them on after the event's buffer is gone.

use crate::blocks::VerifiedBlocks;
use crate::car::{CarHeader, CarLimits, write_car};
use crate::cbor::{self, DecodeError, Decoder, Encoder};
use crate::cid::Cid;
use crate::commit::{Commit, REPO_VERSION};
use crate::crypto::PublicKey;
use crate::error::{Error, Result};
use crate::mst::{MstRules, Tree};
use crate::record::Record;
use crate::repo::{Action, CommitData, RepoOp, invert_ops};
use crate::syntax::{Datetime, Did, Handle, Tid, is_valid_repo_path};

/// Largest frame accepted: the spec's 5 MB per WebSocket frame, read generously as MiB.
pub const MAX_FRAME_BYTES: usize = 5 << 20;
/// Largest `#commit.blocks` CAR (lexicon `maxLength`).
pub const MAX_COMMIT_BLOCKS_BYTES: usize = 2_000_000;
/// Largest `#sync.blocks` CAR (lexicon `maxLength`).
pub const MAX_SYNC_BLOCKS_BYTES: usize = 10_000;
/// Most ops in one `#commit` (lexicon `maxLength`).
pub const MAX_COMMIT_OPS: usize = 200;

/// The lexicon whose message types the short `#name` form refers to.
const LEXICON: &str = "com.atproto.sync.subscribeRepos";

/// One frame of the stream.
// Nearly every frame is a message, so boxing it would only add an allocation per frame.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `op = 1`: an event.
    Message(Message),
    /// `op = -1`: the server reports an error and closes the stream.
    Error {
        /// The error name, e.g. `FutureCursor` or `ConsumerTooSlow`.
        error: String,
        /// A human-readable explanation.
        message: Option<String>,
    },
    /// Any other `op`: to be ignored, as the spec asks.
    Unknown {
        /// The header's `op`.
        op: i64,
    },
}

/// One `op = 1` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `#commit`: a signed change to a repository.
    Commit(CommitEvent),
    /// `#sync`: the repository's current commit, possibly discontinuous with earlier ones.
    Sync(SyncEvent),
    /// `#identity`: the account's identity may have changed.
    Identity(IdentityEvent),
    /// `#account`: the account's hosting status at the emitting service.
    Account(AccountEvent),
    /// `#info`: a notice about the stream itself.
    Info(InfoEvent),
    /// A type this code does not know (including the removed `#handle`, `#tombstone` and
    /// `#migrate`), kept whole so that it can be passed on unchanged.
    Unknown {
        /// The header's `t`.
        t: String,
        /// The body, exactly as received (one valid DRISL item).
        body: Vec<u8>,
    },
}

/// `#commit`: field names follow the lexicon, in snake case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitEvent {
    /// Stream position.
    pub seq: u64,
    /// Deprecated and unused; producers send `false`.
    pub rebase: bool,
    /// Deprecated; producers send `false` and consumers ignore it.
    pub too_big: bool,
    /// The account (every other message type calls this `did`).
    pub repo: Did,
    /// The commit block's CID, which must be `roots[0]` of `blocks`.
    pub commit: Cid,
    /// The commit's rev.
    pub rev: Tid,
    /// The rev of the previous commit, if any.
    pub since: Option<Tid>,
    /// A CAR slice: the commit block, new MST nodes and records, and the nodes inversion reads.
    pub blocks: Vec<u8>,
    /// The record operations.
    pub ops: Vec<RepoOp>,
    /// Deprecated; should be empty.
    pub blobs: Vec<Cid>,
    /// The MST root before this commit; without it the commit cannot be inverted.
    pub prev_data: Option<Cid>,
    /// When the event was first broadcast (informal, not authoritative).
    pub time: Datetime,
}

/// `#sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncEvent {
    /// Stream position.
    pub seq: u64,
    /// The account.
    pub did: Did,
    /// A CAR holding only the commit block, rooted at it.
    pub blocks: Vec<u8>,
    /// The commit's rev.
    pub rev: Tid,
    /// When the event was first broadcast.
    pub time: Datetime,
}

/// `#identity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityEvent {
    /// Stream position.
    pub seq: u64,
    /// The account.
    pub did: Did,
    /// When the event was first broadcast.
    pub time: Datetime,
    /// The handle as the emitter saw it; the new relay omits it, so nothing may depend on it.
    pub handle: Option<Handle>,
}

/// `#account`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountEvent {
    /// Stream position.
    pub seq: u64,
    /// The account.
    pub did: Did,
    /// When the event was first broadcast.
    pub time: Datetime,
    /// Whether the emitting host serves the repository.
    pub active: bool,
    /// Why not, when inactive: `takendown`, `suspended`, `deleted`, `deactivated`,
    /// `desynchronized`, `throttled`, or a value added later.
    pub status: Option<String>,
}

/// `#info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoEvent {
    /// E.g. `OutdatedCursor`.
    pub name: String,
    /// A human-readable explanation.
    pub message: Option<String>,
}

impl Message {
    /// The header `t` this message is sent with (`#commit`, ...).
    pub fn t(&self) -> &str {
        match self {
            Message::Commit(_) => "#commit",
            Message::Sync(_) => "#sync",
            Message::Identity(_) => "#identity",
            Message::Account(_) => "#account",
            Message::Info(_) => "#info",
            Message::Unknown { t, .. } => t,
        }
    }

    /// The stream position; `#info` and unknown messages have none.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Message::Commit(event) => Some(event.seq),
            Message::Sync(event) => Some(event.seq),
            Message::Identity(event) => Some(event.seq),
            Message::Account(event) => Some(event.seq),
            Message::Info(_) | Message::Unknown { .. } => None,
        }
    }

    /// Renumbers the message, as a relay does when it re-sequences an upstream event.
    /// Messages without a seq are left alone.
    pub fn set_seq(&mut self, seq: u64) {
        match self {
            Message::Commit(event) => event.seq = seq,
            Message::Sync(event) => event.seq = seq,
            Message::Identity(event) => event.seq = seq,
            Message::Account(event) => event.seq = seq,
            Message::Info(_) | Message::Unknown { .. } => {}
        }
    }

    /// The account the message is about; `#info` and unknown messages have none.
    pub fn did(&self) -> Option<&Did> {
        match self {
            Message::Commit(event) => Some(&event.repo),
            Message::Sync(event) => Some(&event.did),
            Message::Identity(event) => Some(&event.did),
            Message::Account(event) => Some(&event.did),
            Message::Info(_) | Message::Unknown { .. } => None,
        }
    }
}

impl From<CommitEvent> for Message {
    fn from(event: CommitEvent) -> Message {
        Message::Commit(event)
    }
}

impl From<SyncEvent> for Message {
    fn from(event: SyncEvent) -> Message {
        Message::Sync(event)
    }
}

impl From<IdentityEvent> for Message {
    fn from(event: IdentityEvent) -> Message {
        Message::Identity(event)
    }
}

impl From<AccountEvent> for Message {
    fn from(event: AccountEvent) -> Message {
        Message::Account(event)
    }
}

impl From<InfoEvent> for Message {
    fn from(event: InfoEvent) -> Message {
        Message::Info(event)
    }
}

impl CommitEvent {
    /// The event a host emits for a commit it just made. `blobs` is deprecated; pass an
    /// empty list unless imitating an older host.
    pub fn from_commit_data(
        seq: u64,
        data: &CommitData,
        time: Datetime,
        blobs: Vec<Cid>,
    ) -> CommitEvent {
        CommitEvent {
            seq,
            rebase: false,
            too_big: false,
            repo: data.commit.did.clone(),
            commit: data.cid,
            rev: data.commit.rev.clone(),
            since: data.since.clone(),
            blocks: data.car_slice(),
            ops: data.ops.clone(),
            blobs,
            prev_data: data.prev_data,
            time,
        }
    }
}

impl SyncEvent {
    /// The `#sync` announcing `commit` as the repository's current state.
    pub fn from_commit(seq: u64, commit: &Commit, time: Datetime) -> SyncEvent {
        let bytes = commit.to_cbor();
        let cid = Cid::dag_cbor(&bytes);
        SyncEvent {
            seq,
            did: commit.did.clone(),
            blocks: write_car(&[cid], [(&cid, bytes.as_slice())]),
            rev: commit.rev.clone(),
            time,
        }
    }
}

/// Why a frame could not be decoded. Each variant names the message type, and the seq when
/// the body had a readable one, so a consumer can log the event it drops and move past it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame is larger than any valid frame.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The frame's size.
        size: usize,
        /// [`MAX_FRAME_BYTES`].
        limit: usize,
    },
    /// The header is not one DRISL map.
    #[error("frame header is not valid DRISL")]
    Header(#[source] DecodeError),
    /// The header is DRISL but lacks `op`, or `t` for a message, or has them of the wrong type.
    #[error("frame header: {problem}")]
    HeaderField {
        /// What is wrong.
        problem: String,
    },
    /// The body is not one DRISL item (a map, for known types), or bytes follow it.
    #[error("{t} body is not valid DRISL")]
    Body {
        /// The message type (`error` for error frames).
        t: String,
        /// What is wrong with the bytes.
        #[source]
        source: DecodeError,
    },
    /// A body field is missing, of the wrong type, or malformed.
    #[error("{t}{}: field {field}: {problem}", seq_suffix(.seq))]
    Field {
        /// The message type.
        t: String,
        /// The body's seq, when it could be read.
        seq: Option<u64>,
        /// The field, e.g. `repo` or `ops[3].path`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A body field exceeds a protocol limit.
    #[error("{t}{}: field {field} has {found} {unit}, more than the limit of {limit}", seq_suffix(.seq))]
    Limit {
        /// The message type.
        t: String,
        /// The body's seq, when it could be read.
        seq: Option<u64>,
        /// The field: `blocks` or `ops`.
        field: &'static str,
        /// `bytes` or `entries`.
        unit: &'static str,
        /// The limit.
        limit: u64,
        /// The size found.
        found: u64,
    },
}

impl FrameError {
    /// The seq of the message that failed, when its body had a readable one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            FrameError::Field { seq, .. } | FrameError::Limit { seq, .. } => *seq,
            _ => None,
        }
    }
}

fn seq_suffix(seq: &Option<u64>) -> String {
    seq.map(|seq| format!(" (seq {seq})")).unwrap_or_default()
}

/// Decodes one WebSocket binary frame.
///
/// # Errors
///
/// A [`FrameError`] when the frame exceeds a limit, is not a header and one body of strict
/// DRISL with nothing after them, or when a field of a known message type is missing, of
/// the wrong type or malformed. Unknown `op` and `t` values are not errors.
pub fn decode_frame(bytes: &[u8]) -> std::result::Result<Frame, FrameError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            size: bytes.len(),
            limit: MAX_FRAME_BYTES,
        });
    }
    let mut decoder = Decoder::new(bytes);
    let (op, t) = decode_header(&mut decoder)?;
    let body = bytes.get(decoder.position()..).unwrap_or_default();
    match op {
        1 => {
            let t = t.ok_or_else(|| FrameError::HeaderField {
                problem: "message header (op 1) has no t".to_owned(),
            })?;
            decode_message(t, body).map(Frame::Message)
        }
        -1 => decode_error_body(body),
        op => {
            cbor::validate(body).map_err(|source| FrameError::Body {
                t: format!("op {op}"),
                source,
            })?;
            Ok(Frame::Unknown { op })
        }
    }
}

fn decode_header<'a>(
    decoder: &mut Decoder<'a>,
) -> std::result::Result<(i64, Option<&'a str>), FrameError> {
    let fields = decoder.map_len().map_err(FrameError::Header)?;
    let mut op = None;
    let mut t = None;
    let mut previous = None;
    for _ in 0..fields {
        let key = decoder.ordered_key(previous).map_err(FrameError::Header)?;
        previous = Some(key);
        let wrong = |err: DecodeError| FrameError::HeaderField {
            problem: format!("field {key}: {}", describe(&err)),
        };
        match key {
            "op" => op = Some(decoder.i64().map_err(wrong)?),
            "t" => t = Some(decoder.text().map_err(wrong)?),
            _ => decoder.skip(1).map_err(FrameError::Header)?,
        }
    }
    let op = op.ok_or_else(|| FrameError::HeaderField {
        problem: "no op".to_owned(),
    })?;
    Ok((op, t))
}

/// The message name of `t`: `#commit` and `com.atproto.sync.subscribeRepos#commit` are the
/// same message.
fn short_name(t: &str) -> &str {
    match t.strip_prefix(LEXICON) {
        Some(rest) if rest.starts_with('#') => rest,
        _ => t,
    }
}

fn decode_message(t: &str, body: &[u8]) -> std::result::Result<Message, FrameError> {
    let known = matches!(
        short_name(t),
        "#commit" | "#sync" | "#identity" | "#account" | "#info"
    );
    if !known {
        cbor::validate(body).map_err(|source| FrameError::Body {
            t: t.to_owned(),
            source,
        })?;
        return Ok(Message::Unknown {
            t: t.to_owned(),
            body: body.to_vec(),
        });
    }
    let fields = Fields::read(t, body)?;
    Ok(match short_name(t) {
        "#commit" => Message::Commit(decode_commit(&fields)?),
        "#sync" => Message::Sync(decode_sync(&fields)?),
        "#identity" => Message::Identity(IdentityEvent {
            seq: fields.seq()?,
            did: fields.parsed("did")?,
            time: fields.parsed("time")?,
            handle: fields.optional_parsed("handle")?,
        }),
        "#account" => Message::Account(AccountEvent {
            seq: fields.seq()?,
            did: fields.parsed("did")?,
            time: fields.parsed("time")?,
            active: fields.required("active", Decoder::bool)?,
            status: fields.optional_text("status")?,
        }),
        _ => Message::Info(InfoEvent {
            name: fields.required("name", Decoder::text)?.to_owned(),
            message: fields.optional_text("message")?,
        }),
    })
}

fn decode_error_body(body: &[u8]) -> std::result::Result<Frame, FrameError> {
    let fields = Fields::read("error", body)?;
    Ok(Frame::Error {
        error: fields.required("error", Decoder::text)?.to_owned(),
        message: fields.optional_text("message")?,
    })
}

fn decode_commit(fields: &Fields<'_>) -> std::result::Result<CommitEvent, FrameError> {
    let blocks = fields.required("blocks", Decoder::bytes)?;
    if blocks.len() > MAX_COMMIT_BLOCKS_BYTES {
        return Err(fields.limit("blocks", "bytes", MAX_COMMIT_BLOCKS_BYTES, blocks.len()));
    }
    let ops = decode_ops(
        fields,
        fields.get("ops").ok_or_else(|| fields.missing("ops"))?,
    )?;
    let blobs = fields.required("blobs", |decoder| {
        let len = decoder.array_len()?;
        let mut blobs = Vec::with_capacity(len.min(64));
        for _ in 0..len {
            blobs.push(decoder.link()?);
        }
        Ok(blobs)
    })?;
    let since = match fields.get("since") {
        None => return Err(fields.missing("since")),
        Some(NULL) => None,
        Some(_) => Some(fields.parsed("since")?),
    };
    Ok(CommitEvent {
        seq: fields.seq()?,
        rebase: fields.required("rebase", Decoder::bool)?,
        too_big: fields.required("tooBig", Decoder::bool)?,
        repo: fields.parsed("repo")?,
        commit: fields.required("commit", Decoder::link)?,
        rev: fields.parsed("rev")?,
        since,
        blocks: blocks.to_vec(),
        ops,
        blobs,
        prev_data: fields.optional("prevData", Decoder::link)?,
        time: fields.parsed("time")?,
    })
}

fn decode_sync(fields: &Fields<'_>) -> std::result::Result<SyncEvent, FrameError> {
    let blocks = fields.required("blocks", Decoder::bytes)?;
    if blocks.len() > MAX_SYNC_BLOCKS_BYTES {
        return Err(fields.limit("blocks", "bytes", MAX_SYNC_BLOCKS_BYTES, blocks.len()));
    }
    Ok(SyncEvent {
        seq: fields.seq()?,
        did: fields.parsed("did")?,
        blocks: blocks.to_vec(),
        rev: fields.parsed("rev")?,
        time: fields.parsed("time")?,
    })
}

/// `ops`: `[{action, path, cid (null on delete), prev?}]`.
fn decode_ops(fields: &Fields<'_>, bytes: &[u8]) -> std::result::Result<Vec<RepoOp>, FrameError> {
    let mut decoder = Decoder::new(bytes);
    let len = decoder
        .array_len()
        .map_err(|err| fields.invalid("ops", &err))?;
    if len > MAX_COMMIT_OPS {
        return Err(fields.limit("ops", "entries", MAX_COMMIT_OPS, len));
    }
    let mut ops = Vec::with_capacity(len);
    for index in 0..len {
        // Field names for errors are built only when one occurs.
        let at = |field: &str| format!("ops[{index}]{field}");
        let n_fields = decoder
            .map_len()
            .map_err(|err| fields.invalid(&at(""), &err))?;
        let mut action = None;
        let mut path = None;
        let mut cid = None;
        let mut prev = None;
        let mut previous = None;
        for _ in 0..n_fields {
            let key = decoder
                .ordered_key(previous)
                .map_err(|err| fields.invalid(&at(""), &err))?;
            previous = Some(key);
            let wrong = |err: DecodeError| fields.invalid(&at(&format!(".{key}")), &err);
            match key {
                "cid" => cid = Some(decoder.nullable_link().map_err(wrong)?),
                "path" => path = Some(decoder.text().map_err(wrong)?),
                "prev" => prev = decoder.nullable_link().map_err(wrong)?,
                "action" => action = Some(decoder.text().map_err(wrong)?),
                _ => decoder.skip(3).map_err(wrong)?,
            }
        }
        let action = match action {
            Some("create") => Action::Create,
            Some("update") => Action::Update,
            Some("delete") => Action::Delete,
            Some(other) => {
                return Err(fields.error(
                    at(".action"),
                    format!("{other:?} is not create, update or delete"),
                ));
            }
            None => return Err(fields.missing(&at(".action"))),
        };
        let path = path.ok_or_else(|| fields.missing(&at(".path")))?;
        if !is_valid_repo_path(path.as_bytes()) {
            return Err(fields.error(at(".path"), format!("{path:?} is not a valid repo path")));
        }
        let cid = cid.ok_or_else(|| fields.missing(&at(".cid")))?;
        ops.push(RepoOp {
            action,
            path: path.to_owned(),
            cid,
            prev,
        });
    }
    Ok(ops)
}

/// The DRISL encoding of `null`.
const NULL: &[u8] = &[0xf6];

/// A body map's fields as encoded slices, read once so that the seq is known before any
/// field is interpreted (an error in `ops` can then still name its event).
struct Fields<'a> {
    t: &'a str,
    entries: Vec<(&'a str, &'a [u8])>,
    seq: Option<u64>,
}

impl<'a> Fields<'a> {
    fn read(t: &'a str, body: &'a [u8]) -> std::result::Result<Fields<'a>, FrameError> {
        let body_error = |source| FrameError::Body {
            t: t.to_owned(),
            source,
        };
        let mut decoder = Decoder::new(body);
        let len = decoder.map_len().map_err(body_error)?;
        let mut entries = Vec::with_capacity(len.min(16));
        let mut previous = None;
        for _ in 0..len {
            let key = decoder.ordered_key(previous).map_err(body_error)?;
            previous = Some(key);
            let start = decoder.position();
            decoder.skip(1).map_err(body_error)?;
            let value = body.get(start..decoder.position()).unwrap_or_default();
            entries.push((key, value));
        }
        decoder.finish().map_err(body_error)?;
        let mut fields = Fields {
            t,
            entries,
            seq: None,
        };
        fields.seq = fields.seq().ok();
        Ok(fields)
    }

    fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.entries
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| *value)
    }

    fn error(&self, field: String, problem: String) -> FrameError {
        FrameError::Field {
            t: self.t.to_owned(),
            seq: self.seq,
            field,
            problem,
        }
    }

    fn missing(&self, field: &str) -> FrameError {
        self.error(field.to_owned(), "missing".to_owned())
    }

    fn invalid(&self, field: &str, err: &DecodeError) -> FrameError {
        self.error(field.to_owned(), describe(err))
    }

    fn limit(
        &self,
        field: &'static str,
        unit: &'static str,
        limit: usize,
        found: usize,
    ) -> FrameError {
        FrameError::Limit {
            t: self.t.to_owned(),
            seq: self.seq,
            field,
            unit,
            limit: limit as u64,
            found: found as u64,
        }
    }

    /// Decodes a present field with `read`, which must consume exactly its value.
    fn decode<T>(
        &self,
        name: &str,
        bytes: &'a [u8],
        read: impl FnOnce(&mut Decoder<'a>) -> std::result::Result<T, DecodeError>,
    ) -> std::result::Result<T, FrameError> {
        let mut decoder = Decoder::new(bytes);
        let value = read(&mut decoder).map_err(|err| self.invalid(name, &err))?;
        decoder.finish().map_err(|err| self.invalid(name, &err))?;
        Ok(value)
    }

    fn required<T>(
        &self,
        name: &str,
        read: impl FnOnce(&mut Decoder<'a>) -> std::result::Result<T, DecodeError>,
    ) -> std::result::Result<T, FrameError> {
        let bytes = self.get(name).ok_or_else(|| self.missing(name))?;
        self.decode(name, bytes, read)
    }

    /// An optional field; `null` counts as absent.
    fn optional<T>(
        &self,
        name: &str,
        read: impl FnOnce(&mut Decoder<'a>) -> std::result::Result<T, DecodeError>,
    ) -> std::result::Result<Option<T>, FrameError> {
        match self.get(name) {
            None | Some(NULL) => Ok(None),
            Some(bytes) => self.decode(name, bytes, read).map(Some),
        }
    }

    fn optional_text(&self, name: &str) -> std::result::Result<Option<String>, FrameError> {
        Ok(self.optional(name, Decoder::text)?.map(str::to_owned))
    }

    /// A required text field parsed into an identifier type.
    fn parsed<T>(&self, name: &str) -> std::result::Result<T, FrameError>
    where
        T: for<'s> TryFrom<&'s str, Error = crate::syntax::SyntaxError>,
    {
        let text = self.required(name, Decoder::text)?;
        T::try_from(text).map_err(|err| self.error(name.to_owned(), err.to_string()))
    }

    fn optional_parsed<T>(&self, name: &str) -> std::result::Result<Option<T>, FrameError>
    where
        T: for<'s> TryFrom<&'s str, Error = crate::syntax::SyntaxError>,
    {
        match self.optional(name, Decoder::text)? {
            None => Ok(None),
            Some(text) => T::try_from(text)
                .map(Some)
                .map_err(|err| self.error(name.to_owned(), err.to_string())),
        }
    }

    /// `seq`: a non-negative integer.
    fn seq(&self) -> std::result::Result<u64, FrameError> {
        let seq = self.required("seq", Decoder::i64)?;
        u64::try_from(seq).map_err(|_| self.error("seq".to_owned(), format!("{seq} is negative")))
    }
}

/// A decode error as the problem of a named field.
fn describe(err: &DecodeError) -> String {
    match err {
        DecodeError::Unexpected {
            expected, found, ..
        } => format!("expected {expected}, found {found}"),
        other => other.to_string(),
    }
}

/// Encodes a message frame (`op = 1`) in canonical DRISL.
pub fn encode_message(message: &Message) -> Vec<u8> {
    let capacity = match message {
        Message::Commit(event) => event.blocks.len() + 160 * event.ops.len() + 512,
        Message::Sync(event) => event.blocks.len() + 256,
        Message::Unknown { t, body } => t.len() + body.len() + 16,
        _ => 256,
    };
    let mut encoder = Encoder::with_capacity(capacity);
    // Header keys in canonical order: `t` (1 byte) before `op` (2).
    encoder.map(2);
    encoder.text("t");
    encoder.text(message.t());
    encoder.text("op");
    encoder.i64(1);
    match message {
        Message::Commit(event) => encode_commit(&mut encoder, event),
        Message::Sync(event) => {
            encoder.map(5);
            encoder.text("did");
            encoder.text(event.did.as_str());
            encoder.text("rev");
            encoder.text(event.rev.as_str());
            encoder.text("seq");
            encoder.u64(event.seq);
            encoder.text("time");
            encoder.text(event.time.as_str());
            encoder.text("blocks");
            encoder.bytes(&event.blocks);
        }
        Message::Identity(event) => {
            encoder.map(3 + usize::from(event.handle.is_some()));
            encoder.text("did");
            encoder.text(event.did.as_str());
            encoder.text("seq");
            encoder.u64(event.seq);
            encoder.text("time");
            encoder.text(event.time.as_str());
            if let Some(handle) = &event.handle {
                encoder.text("handle");
                encoder.text(handle.as_str());
            }
        }
        Message::Account(event) => {
            encoder.map(4 + usize::from(event.status.is_some()));
            encoder.text("did");
            encoder.text(event.did.as_str());
            encoder.text("seq");
            encoder.u64(event.seq);
            encoder.text("time");
            encoder.text(event.time.as_str());
            encoder.text("active");
            encoder.bool(event.active);
            if let Some(status) = &event.status {
                encoder.text("status");
                encoder.text(status);
            }
        }
        Message::Info(event) => {
            encoder.map(1 + usize::from(event.message.is_some()));
            encoder.text("name");
            encoder.text(&event.name);
            if let Some(message) = &event.message {
                encoder.text("message");
                encoder.text(message);
            }
        }
        Message::Unknown { body, .. } => encoder.raw(body),
    }
    encoder.into_bytes()
}

/// Keys in canonical order: `ops rev seq`, `repo time`, `blobs since`,
/// `blocks commit rebase tooBig`, `prevData`. `since` is required and written as null when
/// absent; `prevData` is optional and left out when absent (the lexicon does not allow null).
fn encode_commit(encoder: &mut Encoder, event: &CommitEvent) {
    encoder.map(11 + usize::from(event.prev_data.is_some()));
    encoder.text("ops");
    encoder.array(event.ops.len());
    for op in &event.ops {
        // `cid`, `path`, `prev`, `action`; `cid` is null for deletes, `prev` absent for creates.
        encoder.map(3 + usize::from(op.prev.is_some()));
        encoder.text("cid");
        encoder.nullable_link(op.cid.as_ref());
        encoder.text("path");
        encoder.text(&op.path);
        if let Some(prev) = &op.prev {
            encoder.text("prev");
            encoder.link(prev);
        }
        encoder.text("action");
        encoder.text(op.action.as_str());
    }
    encoder.text("rev");
    encoder.text(event.rev.as_str());
    encoder.text("seq");
    encoder.u64(event.seq);
    encoder.text("repo");
    encoder.text(event.repo.as_str());
    encoder.text("time");
    encoder.text(event.time.as_str());
    encoder.text("blobs");
    encoder.array(event.blobs.len());
    for blob in &event.blobs {
        encoder.link(blob);
    }
    encoder.text("since");
    match &event.since {
        Some(since) => encoder.text(since.as_str()),
        None => encoder.null(),
    }
    encoder.text("blocks");
    encoder.bytes(&event.blocks);
    encoder.text("commit");
    encoder.link(&event.commit);
    encoder.text("rebase");
    encoder.bool(event.rebase);
    encoder.text("tooBig");
    encoder.bool(event.too_big);
    if let Some(prev_data) = &event.prev_data {
        encoder.text("prevData");
        encoder.link(prev_data);
    }
}

/// Encodes an error frame (`op = -1`): the last frame a server sends before closing.
pub fn encode_error(error: &str, message: Option<&str>) -> Vec<u8> {
    let mut encoder = Encoder::with_capacity(32 + error.len() + message.map_or(0, str::len));
    encoder.map(1);
    encoder.text("op");
    encoder.i64(-1);
    encoder.map(1 + usize::from(message.is_some()));
    encoder.text("error");
    encoder.text(error);
    if let Some(message) = message {
        encoder.text("message");
        encoder.text(message);
    }
    encoder.into_bytes()
}

/// A `#commit` whose blocks, commit object, ops and MST proof have been checked, but whose
/// signature has not.
///
/// Built by [`CommitProof::check`]; [`CommitProof::verify`] adds the signature. The split
/// lets a caller whose cached key fails re-resolve the identity and try again without
/// repeating the tree work (checklist step 4).
#[derive(Debug, Clone)]
pub struct CommitProof {
    commit: Commit,
    cid: Cid,
    ops: Vec<RepoOp>,
    blocks: VerifiedBlocks,
    since: Option<Tid>,
    prev_data: Option<Cid>,
}

/// A `#commit` that passed every stateless check, signature included, and what it proves.
#[derive(Debug, Clone)]
pub enum VerifiedCommit {
    /// The event has `prevData` and undoing the ops on the new tree gives it: the ops are
    /// exactly the change from the tree at `prevData`.
    Proven(CommitProof),
    /// The event has no `prevData` (an older host), so inversion was skipped: the ops match
    /// the new tree, but whether they are the whole change is unproven. Counted, accepted.
    Unproven(CommitProof),
}

/// What a caller last applied for a repository: the rev and MST root of that commit.
#[derive(Debug, Clone, Copy)]
pub struct RepoHead<'a> {
    /// The stored rev.
    pub rev: &'a Tid,
    /// The stored MST root (`data`).
    pub data: &'a Cid,
}

/// Whether a verified commit follows the stored state (Sync 1.1 checklist steps 5 and 8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chain {
    /// It follows: apply the ops, then store its rev and `data`.
    Next,
    /// Its rev is not newer than the stored one: a duplicate or a replay; ignore it.
    Stale,
    /// Its rev lies further in the future than [`MAX_CLOCK_DRIFT_MICROS`]; reject it.
    Future,
    /// It does not follow the stored state (`since` or `prevData` differ): the repository
    /// is desynchronized and needs a resync. The text says which field and both values.
    Broken(String),
}

/// How far past the local clock a rev may lie (the spec's "a few minutes").
pub const MAX_CLOCK_DRIFT_MICROS: u64 = 5 * 60 * 1_000_000;

impl CommitProof {
    /// Every check [`verify_commit`] makes except the signature; keys must be repo paths
    /// with NSID collections, as in a `getRepo` walk.
    ///
    /// # Errors
    ///
    /// - [`Error::LimitExceeded`]: more than [`MAX_COMMIT_BLOCKS_BYTES`] of blocks or
    ///   [`MAX_COMMIT_OPS`] ops.
    /// - [`Error::Car`], [`Error::Truncated`], [`Error::HashMismatch`]: the CAR is malformed
    ///   or a block does not hash to its CID.
    /// - [`Error::EventMismatch`]: `roots[0]` is not the event's `commit`, or the commit's rev
    ///   is not the event's; [`Error::DidMismatch`]: the commit is for another account;
    ///   [`Error::Commit`], [`Error::Block`]: the commit object is invalid or not version 3.
    /// - [`Error::Operation`]: two ops on one path, an op whose `cid`/`prev` do not fit its
    ///   action, or whose `cid` is not what the new tree holds at its path.
    /// - [`Error::MissingBlock`]: the commit, a created or updated record, or an MST node that
    ///   a lookup or the inversion needs is not in the CAR.
    /// - [`Error::MstOrder`], [`Error::MstLayer`], [`Error::MstStructure`], [`Error::Block`]:
    ///   a node the check reads breaks a shape rule, exactly as a full walk would report it.
    /// - [`Error::InversionMismatch`]: undoing the ops does not give `prevData`.
    pub fn check(event: &CommitEvent) -> Result<CommitProof> {
        CommitProof::check_with(event, MstRules::default())
    }

    /// [`CommitProof::check`] under other key rules (the conformance fixtures' keys are not
    /// repo paths with NSIDs).
    ///
    /// # Errors
    ///
    /// As [`CommitProof::check`].
    pub fn check_with(event: &CommitEvent, rules: MstRules) -> Result<CommitProof> {
        check_size(
            "#commit blocks",
            event.blocks.len(),
            MAX_COMMIT_BLOCKS_BYTES,
        )?;
        check_size("#commit ops", event.ops.len(), MAX_COMMIT_OPS)?;
        let (header, blocks) = VerifiedBlocks::from_car(&event.blocks, CarLimits::default())?;
        let (cid, commit) = root_commit(
            &header,
            &blocks,
            Some(&event.commit),
            &event.repo,
            &event.rev,
        )?;
        let ops = normalize_ops(&event.ops, event.prev_data.is_some())?;
        for op in &ops {
            if let Some(cid) = op.cid {
                let bytes = blocks.get(&cid).ok_or_else(|| Error::MissingBlock {
                    cid,
                    context: format!("record {}", op.path),
                })?;
                cbor::validate(bytes).map_err(|source| Error::Block { cid, source })?;
            }
        }
        let mut tree = Tree::load_with(&blocks, commit.data, rules);
        match event.prev_data {
            Some(prev_data) => {
                // invert_ops looks each path up in the new tree before undoing it.
                invert_ops(&mut tree, &ops)?;
                let computed = tree.root_cid();
                if computed != prev_data {
                    return Err(Error::InversionMismatch {
                        computed,
                        prev_data,
                    });
                }
            }
            None => {
                for op in &ops {
                    let found = tree.get(op.path.as_bytes())?;
                    if found != op.cid {
                        return Err(Error::Operation {
                            path: op.path.clone(),
                            reason: format!(
                                "{} op says the record is {}, the tree has {}",
                                op.action.as_str(),
                                describe_cid(op.cid),
                                describe_cid(found),
                            ),
                        });
                    }
                }
            }
        }
        drop(tree);
        Ok(CommitProof {
            commit,
            cid,
            ops,
            blocks,
            since: event.since.clone(),
            prev_data: event.prev_data,
        })
    }

    /// Checks the commit signature with `key` (the DID document's `#atproto` key).
    ///
    /// # Errors
    ///
    /// [`Error::BadSignature`].
    pub fn verify_signature(&self, key: &PublicKey) -> Result<()> {
        self.commit.verify_signature(key)
    }

    /// Checks the signature and, if it holds, vouches for the whole event.
    ///
    /// # Errors
    ///
    /// [`Error::BadSignature`].
    pub fn verify(self, key: &PublicKey) -> Result<VerifiedCommit> {
        self.try_verify(key).map_err(|(_, err)| err)
    }

    /// [`CommitProof::verify`] that hands the proof back when the signature fails, so a
    /// caller can re-resolve the key (it may have rotated) and try again without checking the
    /// blocks and ops a second time.
    ///
    /// # Errors
    ///
    /// The proof and [`Error::BadSignature`].
    // The proof is large, but this is the cold path, and boxing it would cost every caller.
    #[allow(clippy::result_large_err)]
    pub fn try_verify(
        self,
        key: &PublicKey,
    ) -> std::result::Result<VerifiedCommit, (CommitProof, Error)> {
        if let Err(err) = self.verify_signature(key) {
            return Err((self, err));
        }
        Ok(match self.prev_data {
            Some(_) => VerifiedCommit::Proven(self),
            None => VerifiedCommit::Unproven(self),
        })
    }

    /// The commit object.
    pub fn commit(&self) -> &Commit {
        &self.commit
    }

    /// The commit's CID.
    pub fn cid(&self) -> Cid {
        self.cid
    }

    /// The ops, sorted by path.
    pub fn ops(&self) -> &[RepoOp] {
        &self.ops
    }

    /// The event's blocks, every one hashed against its CID: the commit, the records and the
    /// MST nodes, for callers that need more than the records (no second parse).
    pub fn blocks(&self) -> &VerifiedBlocks {
        &self.blocks
    }

    /// The event's `since`.
    pub fn since(&self) -> Option<&Tid> {
        self.since.as_ref()
    }

    /// The event's `prevData`, which the ops were proven to invert to when present.
    pub fn prev_data(&self) -> Option<Cid> {
        self.prev_data
    }

    /// The created and updated records, in path order.
    ///
    /// # Errors
    ///
    /// [`Error::Syntax`] when an op's collection is not an NSID or its record key is too long
    /// (paths were checked as MST keys, which allow more).
    pub fn records(&self) -> Result<Vec<Record>> {
        let mut records = Vec::new();
        for op in &self.ops {
            let Some(cid) = op.cid else { continue };
            let Some(bytes) = self.blocks.get(&cid) else {
                continue;
            };
            let (collection, rkey) = op.path.split_once('/').unwrap_or((&op.path, ""));
            records.push(Record::from_verified(
                self.commit.did.clone(),
                collection.parse()?,
                rkey.parse()?,
                cid,
                bytes.to_vec(),
            ));
        }
        Ok(records)
    }
}

impl VerifiedCommit {
    /// The checked event, whichever its proof.
    pub fn proof(&self) -> &CommitProof {
        match self {
            VerifiedCommit::Proven(proof) | VerifiedCommit::Unproven(proof) => proof,
        }
    }

    /// The checked event, taken.
    pub fn into_proof(self) -> CommitProof {
        match self {
            VerifiedCommit::Proven(proof) | VerifiedCommit::Unproven(proof) => proof,
        }
    }

    /// Whether the ops were proven against `prevData`.
    pub fn is_proven(&self) -> bool {
        matches!(self, VerifiedCommit::Proven(_))
    }

    /// Whether this commit follows `head`, at local time `now_micros` (unix microseconds):
    /// its rev must be newer and not in the future, its `since` must be the stored rev and,
    /// when proven, its `prevData` the stored root. An unproven commit is chained by `since`
    /// alone.
    pub fn chain(&self, head: RepoHead<'_>, now_micros: u64) -> Chain {
        let proof = self.proof();
        let rev = &proof.commit.rev;
        if rev.timestamp_micros() > now_micros.saturating_add(MAX_CLOCK_DRIFT_MICROS) {
            return Chain::Future;
        }
        if rev <= head.rev {
            return Chain::Stale;
        }
        if proof.since.as_ref() != Some(head.rev) {
            return Chain::Broken(format!(
                "since is {}, the stored rev is {}",
                proof
                    .since
                    .as_ref()
                    .map_or_else(|| "absent".to_owned(), Tid::to_string),
                head.rev
            ));
        }
        if let VerifiedCommit::Proven(proof) = self
            && proof.prev_data.as_ref() != Some(head.data)
        {
            return Chain::Broken(format!(
                "prevData is {}, the stored data is {}",
                describe_cid(proof.prev_data),
                head.data
            ));
        }
        Chain::Next
    }
}

/// What a verified `#sync` asks of a caller holding `head` (Sync 1.1 "When to resync").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncAction {
    /// Its rev is not newer than the stored one: ignore it.
    Ignore,
    /// Newer, but the tree is the one already stored: store the rev, fetch nothing.
    AdvanceRev,
    /// Newer and another tree: fetch the repository again.
    Resync,
    /// Its rev lies further in the future than [`MAX_CLOCK_DRIFT_MICROS`]; reject it.
    Future,
}

/// Decides what a verified `#sync` commit means against `head`, at local time `now_micros`.
pub fn sync_action(commit: &Commit, head: RepoHead<'_>, now_micros: u64) -> SyncAction {
    if commit.rev.timestamp_micros() > now_micros.saturating_add(MAX_CLOCK_DRIFT_MICROS) {
        SyncAction::Future
    } else if commit.rev <= *head.rev {
        SyncAction::Ignore
    } else if commit.data == *head.data {
        SyncAction::AdvanceRev
    } else {
        SyncAction::Resync
    }
}

/// Checks one `#commit` as far as it can be checked without per-repo state: steps 1, 2, 4,
/// 6 and 7 of the Sync 1.1 validation checklist, with `key` as the only key tried.
///
/// Ops are checked with their paths sorted, so producers may list them in any order. When the
/// event has no `prevData`, inversion is skipped ([`VerifiedCommit::Unproven`]) and `update`
/// and `delete` ops may lack `prev`, as older hosts send them; every other shape rule still
/// holds. The chain against stored state is [`VerifiedCommit::chain`].
///
/// # Errors
///
/// Those of [`CommitProof::check`], and [`Error::BadSignature`].
pub fn verify_commit(event: &CommitEvent, key: &PublicKey) -> Result<VerifiedCommit> {
    CommitProof::check(event)?.verify(key)
}

/// Checks a `#sync`: the CAR (at most [`MAX_SYNC_BLOCKS_BYTES`]), its root commit block, the
/// commit's DID and rev against the event, version 3, and the signature. Whether the commit
/// is news is the sync engine's question.
///
/// # Errors
///
/// [`Error::LimitExceeded`], the CAR errors, [`Error::MissingBlock`], [`Error::Commit`],
/// [`Error::DidMismatch`], [`Error::EventMismatch`] and [`Error::BadSignature`].
pub fn verify_sync(event: &SyncEvent, key: &PublicKey) -> Result<Commit> {
    check_size("#sync blocks", event.blocks.len(), MAX_SYNC_BLOCKS_BYTES)?;
    let (header, blocks) = VerifiedBlocks::from_car(&event.blocks, CarLimits::default())?;
    let (_, commit) = root_commit(&header, &blocks, None, &event.did, &event.rev)?;
    commit.verify_signature(key)?;
    Ok(commit)
}

fn check_size(what: &'static str, found: usize, limit: usize) -> Result<()> {
    if found > limit {
        return Err(Error::LimitExceeded {
            what,
            limit: limit as u64,
            found: found as u64,
        });
    }
    Ok(())
}

fn describe_cid(cid: Option<Cid>) -> String {
    cid.map_or_else(|| "absent".to_owned(), |cid| cid.to_string())
}

/// Sorts the ops by path and checks each one's shape; `strict` (the event has `prevData`)
/// also requires the `prev` that inversion needs.
fn normalize_ops(ops: &[RepoOp], strict: bool) -> Result<Vec<RepoOp>> {
    let mut sorted = ops.to_vec();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for pair in sorted.windows(2) {
        if let [first, second] = pair
            && first.path == second.path
        {
            return Err(Error::Operation {
                path: first.path.clone(),
                reason: "more than one op on this path".to_owned(),
            });
        }
    }
    for op in &sorted {
        let problem = if !is_valid_repo_path(op.path.as_bytes()) {
            Some("not a valid repo path")
        } else {
            match (op.action, op.cid.is_some(), op.prev.is_some()) {
                (Action::Create, true, false)
                | (Action::Update, true, true)
                | (Action::Delete, false, true) => None,
                (Action::Update, true, false) | (Action::Delete, false, false) if !strict => None,
                (Action::Create, _, true) => Some("create op has a prev"),
                (Action::Create | Action::Update, false, _) => Some("op has no cid"),
                (Action::Update, true, false) => Some("update op has no prev to invert to"),
                (Action::Delete, true, _) => Some("delete op has a cid"),
                (Action::Delete, false, false) => Some("delete op has no prev to invert to"),
            }
        };
        if let Some(problem) = problem {
            return Err(Error::Operation {
                path: op.path.clone(),
                reason: problem.to_owned(),
            });
        }
    }
    Ok(sorted)
}

/// The root commit of an event's CAR, checked against what the event says about it.
fn root_commit(
    header: &CarHeader,
    blocks: &VerifiedBlocks,
    expected: Option<&Cid>,
    did: &Did,
    rev: &Tid,
) -> Result<(Cid, Commit)> {
    let root = *header.roots.first().ok_or_else(|| Error::Car {
        offset: 0,
        reason: "header has no roots".to_owned(),
    })?;
    if let Some(expected) = expected
        && *expected != root
    {
        return Err(Error::EventMismatch {
            field: "commit",
            event: expected.to_string(),
            found: format!("CAR root {root}"),
        });
    }
    let bytes = blocks.get(&root).ok_or_else(|| Error::MissingBlock {
        cid: root,
        context: "commit".to_owned(),
    })?;
    let commit = Commit::from_cbor(root, bytes)?;
    if commit.version != REPO_VERSION {
        return Err(Error::Commit {
            cid: root,
            reason: format!(
                "version {} on the firehose, which carries only version {REPO_VERSION}",
                commit.version
            ),
        });
    }
    commit.verify_did(did)?;
    if commit.rev != *rev {
        return Err(Error::EventMismatch {
            field: "rev",
            event: rev.to_string(),
            found: format!("commit rev {}", commit.rev),
        });
    }
    Ok((root, commit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_form_type_names_are_the_short_ones() {
        assert_eq!(
            short_name("com.atproto.sync.subscribeRepos#commit"),
            "#commit"
        );
        assert_eq!(short_name("#commit"), "#commit");
        assert_eq!(
            short_name("com.atproto.sync.subscribeReposX#commit"),
            "com.atproto.sync.subscribeReposX#commit"
        );
    }

    #[test]
    fn header_keys_must_be_canonical() {
        let mut encoder = Encoder::new();
        encoder.map(2);
        encoder.text("op");
        encoder.i64(1);
        encoder.text("t");
        encoder.text("#info");
        encoder.map(1);
        encoder.text("name");
        encoder.text("x");
        let result = decode_frame(encoder.as_bytes());
        assert!(
            matches!(
                result,
                Err(FrameError::Header(DecodeError::KeyOrder { .. }))
            ),
            "{result:?}"
        );
    }
}
