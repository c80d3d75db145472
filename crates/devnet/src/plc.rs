//! The PLC directory: `did:plc` identities, their signed operation logs, and the HTTP API
//! that resolves them, as `plc.directory` serves it.
//!
//! # Overview
//!
//! [`Plc`] is a cheap-to-clone handle on one in-memory directory. The devnet's PDS hosts call
//! it in-process ([`Plc::register`], [`Plc::set_handle`], [`Plc::set_signing_key`],
//! [`Plc::set_pds`], [`Plc::tombstone`]) and atpdb resolves identities through
//! [`Plc::router`] over HTTP, exactly as it would against the real directory. Both paths end
//! in the same validation as `POST /{did}` ([`Plc::submit`]), so an operation built here is
//! one the real directory would accept, and a forged one is refused the same way.
//!
//! # Rules enforced
//!
//! These are the did:plc specification's (v0.2.1), checked on every operation:
//!
//! - shape: `plc_operation`, `plc_tombstone`, or the legacy `create` (genesis only), with
//!   exactly the fields of its type; unknown fields are refused, because the reference
//!   implementations disagree on whether they are signed;
//! - size: at most [`MAX_OPERATION_BYTES`] of DAG-CBOR;
//! - keys: 1 to [`MAX_ROTATION_KEYS`] distinct k256 or p256 rotation keys, at most
//!   [`MAX_VERIFICATION_METHODS`] syntactically valid `did:key` verification methods;
//! - signature: unpadded base64url of a compact low-S signature over the DAG-CBOR of the
//!   operation without `sig`, by a rotation key in force (the genesis operation's own keys,
//!   afterwards those of `prev`);
//! - chain: a genesis operation must hash to the DID it is posted to; later operations name
//!   a `prev` in the DID's log;
//! - recovery: a `prev` other than the latest operation nullifies the operations after it,
//!   if the new operation is signed by a higher-priority rotation key than the first of them
//!   and within [`RECOVERY_WINDOW`] of it.
//!
//! # Not modelled
//!
//! The legacy `/export` pagination by `createdAt` (only `after=<seq>` is understood), the
//! `/export/stream` websocket, and per-DID rate limits.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atpdb_repo::Cid;
use atpdb_repo::crypto::{Curve, KeyError, Keypair, PublicKey};
use atpdb_repo::syntax::{Datetime, Did, Handle};
use atpdb_repo::value::{Map, Value};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Largest operation accepted, in bytes of DAG-CBOR (the specification's anti-abuse limit).
pub const MAX_OPERATION_BYTES: usize = 7500;

/// Most rotation keys an operation may list.
pub const MAX_ROTATION_KEYS: usize = 5;

/// Most verification methods an operation may list.
pub const MAX_VERIFICATION_METHODS: usize = 10;

/// How long after an operation a higher-priority rotation key may still nullify it.
pub const RECOVERY_WINDOW: Duration = Duration::from_secs(72 * 3600);

/// Most lines one `/export` page returns.
pub const MAX_EXPORT_COUNT: usize = 1000;

/// Lines an `/export` page returns when the request does not say.
const DEFAULT_EXPORT_COUNT: usize = 10;

/// The service id and type atproto looks for.
const ATPROTO_PDS: &str = "atproto_pds";
const PDS_SERVICE_TYPE: &str = "AtprotoPersonalDataServer";

/// The verification method id of the atproto signing key.
const ATPROTO_KEY: &str = "atproto";

/// Why the directory refuses a request or an operation.
///
/// The two 404 messages are the reference server's wording, because clients match on them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlcError {
    /// The text is not a `did:plc` DID (`did:plc:` and 24 base32 characters).
    #[error("invalid DID {input:?}: {reason}")]
    InvalidDid {
        /// The text as given.
        input: String,
        /// The rule it breaks.
        reason: String,
    },
    /// No operation was ever accepted for this DID.
    #[error("DID not registered: {did}")]
    NotRegistered {
        /// The DID asked for.
        did: Did,
    },
    /// The DID has been tombstoned: it has a log but no document.
    #[error("DID not available: {did}")]
    NotAvailable {
        /// The DID asked for.
        did: Did,
    },
    /// A genesis operation for a DID that already exists (the same inputs, signed by the same
    /// key, always derive the same DID, because signing is deterministic).
    #[error("DID already registered: {did}")]
    AlreadyRegistered {
        /// The DID of the genesis operation.
        did: Did,
    },
    /// The operation does not have the shape, keys or encoding the specification requires.
    #[error("invalid operation: {reason}")]
    InvalidOperation {
        /// What is wrong with it.
        reason: String,
    },
    /// The operation's DAG-CBOR is over [`MAX_OPERATION_BYTES`].
    #[error("operation is {size} bytes of DAG-CBOR, over the limit of {MAX_OPERATION_BYTES}")]
    OperationTooLarge {
        /// Its encoded size.
        size: usize,
    },
    /// A genesis operation posted to a DID it does not hash to.
    #[error("genesis operation derives {derived}, not {did}")]
    GenesisMismatch {
        /// The DID it was posted to.
        did: Did,
        /// The DID its bytes derive.
        derived: Did,
    },
    /// The operation does not follow the log: unknown, nullified or tombstoned `prev`, a
    /// missing `prev` for an existing DID, or a concurrent change.
    #[error("operation for {did}: {reason}")]
    Misordered {
        /// The DID the operation is for.
        did: Did,
        /// How it fails to follow the log.
        reason: String,
    },
    /// The signature is malformed or not made by a rotation key in force.
    #[error("operation for {did}: {reason}")]
    BadSignature {
        /// The DID the operation is for.
        did: Did,
        /// Why it does not verify.
        reason: String,
    },
    /// A recovery operation that would nullify an operation older than [`RECOVERY_WINDOW`].
    #[error(
        "operation for {did} would nullify {cid}, created {age_hours} hours earlier, past the 72-hour recovery window"
    )]
    LateRecovery {
        /// The DID the operation is for.
        did: Did,
        /// The first operation it would nullify.
        cid: Cid,
        /// How long before the new operation that one was created, in whole hours.
        age_hours: u64,
    },
    /// An `/export` query parameter that is not a number in range.
    #[error("invalid {parameter} parameter {value:?}: {expected}")]
    InvalidQuery {
        /// `after` or `count`.
        parameter: &'static str,
        /// The value as given.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
}

/// The state of an identity, as `GET /{did}/data` returns it.
///
/// [`Plc::update`] hands one to its closure to edit; `did` is informative there and changes
/// to it are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlcData {
    /// The DID this state belongs to.
    pub did: String,
    /// `did:key`s in descending authority: the keys that may sign the next operation.
    pub rotation_keys: Vec<String>,
    /// Named `did:key`s; `atproto` is the repository signing key.
    pub verification_methods: BTreeMap<String, String>,
    /// URIs naming the identity; the first `at://` one is the handle.
    pub also_known_as: Vec<String>,
    /// Named services; `atproto_pds` is the account's PDS.
    pub services: BTreeMap<String, PlcService>,
}

/// One service of a [`PlcData`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlcService {
    /// The service type, `AtprotoPersonalDataServer` for a PDS.
    pub r#type: String,
    /// Its URL, scheme and host (and port).
    pub endpoint: String,
}

impl PlcData {
    /// The handle: the first `at://` entry of `alsoKnownAs`, without the scheme.
    pub fn handle(&self) -> Option<&str> {
        self.also_known_as
            .iter()
            .find_map(|uri| uri.strip_prefix("at://"))
    }

    /// The `did:key` of the atproto signing key.
    pub fn signing_key(&self) -> Option<&str> {
        self.verification_methods
            .get(ATPROTO_KEY)
            .map(String::as_str)
    }

    /// The endpoint of the `atproto_pds` service, if it has the PDS type.
    pub fn pds_endpoint(&self) -> Option<&str> {
        self.services
            .get(ATPROTO_PDS)
            .filter(|service| service.r#type == PDS_SERVICE_TYPE)
            .map(|service| service.endpoint.as_str())
    }
}

/// A handle on one PLC directory; clones share it.
///
/// All state sits behind one mutex, held only for the few microseconds an operation takes to
/// check and append, never across an `.await`.
#[derive(Debug, Clone, Default)]
pub struct Plc {
    directory: Arc<Mutex<Directory>>,
}

impl Plc {
    /// An empty directory.
    pub fn new() -> Plc {
        Plc::default()
    }

    /// Creates an identity: a genesis operation listing `rotation_key` as the only rotation
    /// key, `signing_key` as the `atproto` verification method, `at://{handle}` and the PDS
    /// at `pds_endpoint`, signed by `rotation_key`. Returns the DID it derives.
    ///
    /// Signing is deterministic, so the same four inputs give the same DID, and registering
    /// them twice fails with [`PlcError::AlreadyRegistered`].
    pub fn register(
        &self,
        rotation_key: &Keypair,
        signing_key: &PublicKey,
        handle: &Handle,
        pds_endpoint: &str,
    ) -> Result<Did, PlcError> {
        let data = PlcData {
            did: String::new(),
            rotation_keys: vec![rotation_key.public().to_did_key()],
            verification_methods: BTreeMap::from([(
                ATPROTO_KEY.to_owned(),
                signing_key.to_did_key(),
            )]),
            also_known_as: vec![format!("at://{handle}")],
            services: BTreeMap::from([(
                ATPROTO_PDS.to_owned(),
                PlcService {
                    r#type: PDS_SERVICE_TYPE.to_owned(),
                    endpoint: pds_endpoint.to_owned(),
                },
            )]),
        };
        let op = parse_operation(&signed_operation(&data, None, rotation_key))?;
        let did = did_from_signed_cbor(&op.signed_cbor)?;
        self.lock().apply(&did, op, None)?;
        Ok(did)
    }

    /// Appends a `plc_operation` that changes the current state as `change` says, signed by
    /// `rotation_key` with `prev` the latest operation: handle changes, key rotation and PDS
    /// migration all go through here.
    ///
    /// `change` runs without the directory locked, so it may read the directory; if another
    /// operation lands for the DID meanwhile, this one fails rather than nullify it.
    pub fn update(
        &self,
        did: &Did,
        rotation_key: &Keypair,
        change: impl FnOnce(&mut PlcData),
    ) -> Result<(), PlcError> {
        let (mut data, head) = {
            let directory = self.lock();
            let head = directory.head(did)?;
            let state = head
                .state
                .as_ref()
                .ok_or_else(|| PlcError::NotAvailable { did: did.clone() })?;
            (state.to_data(did), head.cid)
        };
        change(&mut data);
        let op = parse_operation(&signed_operation(&data, Some(&head), rotation_key))?;
        self.lock().apply(did, op, Some(&head))
    }

    /// Points the handle (the first `at://` entry of `alsoKnownAs`, added in front if there
    /// is none) at `handle`.
    pub fn set_handle(
        &self,
        did: &Did,
        rotation_key: &Keypair,
        handle: &Handle,
    ) -> Result<(), PlcError> {
        let uri = format!("at://{handle}");
        self.update(did, rotation_key, |data| {
            match data
                .also_known_as
                .iter_mut()
                .find(|entry| entry.starts_with("at://"))
            {
                Some(entry) => *entry = uri,
                None => data.also_known_as.insert(0, uri),
            }
        })
    }

    /// Replaces the `atproto` signing key.
    pub fn set_signing_key(
        &self,
        did: &Did,
        rotation_key: &Keypair,
        signing_key: &PublicKey,
    ) -> Result<(), PlcError> {
        let did_key = signing_key.to_did_key();
        self.update(did, rotation_key, |data| {
            data.verification_methods
                .insert(ATPROTO_KEY.to_owned(), did_key);
        })
    }

    /// Moves the account to the PDS at `endpoint`.
    pub fn set_pds(
        &self,
        did: &Did,
        rotation_key: &Keypair,
        endpoint: &str,
    ) -> Result<(), PlcError> {
        self.update(did, rotation_key, |data| {
            data.services.insert(
                ATPROTO_PDS.to_owned(),
                PlcService {
                    r#type: PDS_SERVICE_TYPE.to_owned(),
                    endpoint: endpoint.to_owned(),
                },
            );
        })
    }

    /// Replaces the rotation keys (highest priority first); `rotation_key` must be one of
    /// the current ones.
    pub fn set_rotation_keys(
        &self,
        did: &Did,
        rotation_key: &Keypair,
        rotation_keys: &[PublicKey],
    ) -> Result<(), PlcError> {
        let did_keys = rotation_keys.iter().map(PublicKey::to_did_key).collect();
        self.update(did, rotation_key, |data| data.rotation_keys = did_keys)
    }

    /// Deactivates the DID with a `plc_tombstone`: its document and data then answer
    /// [`PlcError::NotAvailable`], while its log stays readable.
    pub fn tombstone(&self, did: &Did, rotation_key: &Keypair) -> Result<(), PlcError> {
        let head = self.lock().head(did)?.cid;
        let op = parse_operation(&signed_tombstone(&head, rotation_key))?;
        self.lock().apply(did, op, Some(&head))
    }

    /// Validates an operation in its JSON form and appends it to the DID's log: what
    /// `POST /{did}` does.
    pub fn submit(&self, did: &Did, op_json: &serde_json::Value) -> Result<(), PlcError> {
        let op = parse_operation(op_json)?;
        self.lock().apply(did, op, None)
    }

    /// The current state, or `None` if the DID is unknown or tombstoned.
    pub fn data(&self, did: &Did) -> Option<PlcData> {
        let directory = self.lock();
        let state = directory.head(did).ok()?.state.as_ref()?;
        Some(state.to_data(did))
    }

    /// The DID document, as `GET /{did}` serves it.
    pub fn document(&self, did: &Did) -> Result<serde_json::Value, PlcError> {
        let directory = self.lock();
        let state = directory
            .head(did)?
            .state
            .as_ref()
            .ok_or_else(|| PlcError::NotAvailable { did: did.clone() })?;
        Ok(state.document(did))
    }

    /// The operations in force (nullified ones left out), oldest first, as `GET /{did}/log`
    /// serves them.
    pub fn log(&self, did: &Did) -> Result<Vec<serde_json::Value>, PlcError> {
        let directory = self.lock();
        Ok(directory
            .entries(did)?
            .iter()
            .filter(|entry| !entry.nullified)
            .map(|entry| entry.operation.clone())
            .collect())
    }

    /// Every operation ever accepted, nullified ones included, with CIDs and timestamps, as
    /// `GET /{did}/log/audit` serves them.
    pub fn audit_log(&self, did: &Did) -> Result<Vec<serde_json::Value>, PlcError> {
        let directory = self.lock();
        Ok(directory
            .entries(did)?
            .iter()
            .map(|entry| entry.audit_json(did))
            .collect())
    }

    /// The latest operation in force, as `GET /{did}/log/last` serves it.
    pub fn last_operation(&self, did: &Did) -> Result<serde_json::Value, PlcError> {
        Ok(self.lock().head(did)?.operation.clone())
    }

    /// The CID of the latest operation in force: the `prev` of the next one.
    pub fn last_cid(&self, did: &Did) -> Result<Cid, PlcError> {
        Ok(self.lock().head(did)?.cid)
    }

    /// Up to `count` (at most [`MAX_EXPORT_COUNT`]) operations of all DIDs with a sequence
    /// number above `after`, in sequence order, as the lines of `GET /export`.
    pub fn export(&self, after: u64, count: usize) -> Vec<serde_json::Value> {
        let directory = self.lock();
        let start = usize::try_from(after).unwrap_or(usize::MAX);
        directory
            .sequence
            .iter()
            .skip(start)
            .take(count.min(MAX_EXPORT_COUNT))
            .zip(start..)
            .filter_map(|((did, index), position)| {
                let entry = directory.logs.get(did)?.get(*index)?;
                let mut line = entry.audit_json(did);
                if let serde_json::Value::Object(fields) = &mut line {
                    fields.insert("type".to_owned(), json!("sequenced_op"));
                    fields.insert("seq".to_owned(), json!(position as u64 + 1));
                }
                Some(line)
            })
            .collect()
    }

    /// Moves the directory's clock forward, so that a test can step past the recovery window
    /// without waiting 72 hours. Timestamps never go backwards.
    pub fn advance_clock(&self, by: Duration) {
        let mut directory = self.lock();
        let by_ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        directory.clock_offset_ms = directory.clock_offset_ms.saturating_add(by_ms);
    }

    /// The HTTP API of `plc.directory`: `GET /{did}`, `/{did}/data`, `/{did}/log`,
    /// `/{did}/log/audit`, `/{did}/log/last`, `POST /{did}`, `GET /export` and
    /// `GET /_health`. Errors are `{"message": ...}` with 404 for an unknown or tombstoned
    /// DID and 400 for anything malformed.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/_health", get(health))
            .route("/export", get(export))
            .route("/{did}", get(get_document).post(post_operation))
            .route("/{did}/data", get(get_data))
            .route("/{did}/log", get(get_log))
            .route("/{did}/log/audit", get(get_audit_log))
            .route("/{did}/log/last", get(get_last_operation))
            .with_state(self.clone())
    }

    fn lock(&self) -> MutexGuard<'_, Directory> {
        // Nothing panics while the lock is held but a caller's bug; the state is still
        // consistent then, because every change is applied after all checks pass.
        self.directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Signs a `plc_operation` carrying `data` (its `did` is not part of an operation) after
/// `prev`, or a genesis operation when `prev` is `None`: the JSON to `POST /{did}`.
///
/// Nothing is checked: tests use this to forge operations the directory must refuse.
pub fn signed_operation(
    data: &PlcData,
    prev: Option<&Cid>,
    rotation_key: &Keypair,
) -> serde_json::Value {
    let strings =
        |items: &[String]| Value::Array(items.iter().cloned().map(Value::String).collect());
    let mut op = Map::new();
    op.insert("type".to_owned(), Value::String("plc_operation".to_owned()));
    op.insert("rotationKeys".to_owned(), strings(&data.rotation_keys));
    op.insert(
        "verificationMethods".to_owned(),
        Value::Map(
            data.verification_methods
                .iter()
                .map(|(id, key)| (id.clone(), Value::String(key.clone())))
                .collect(),
        ),
    );
    op.insert("alsoKnownAs".to_owned(), strings(&data.also_known_as));
    op.insert(
        "services".to_owned(),
        Value::Map(
            data.services
                .iter()
                .map(|(id, service)| {
                    let fields = Map::from([
                        ("type".to_owned(), Value::String(service.r#type.clone())),
                        (
                            "endpoint".to_owned(),
                            Value::String(service.endpoint.clone()),
                        ),
                    ]);
                    (id.clone(), Value::Map(fields))
                })
                .collect(),
        ),
    );
    op.insert(
        "prev".to_owned(),
        prev.map_or(Value::Null, |cid| Value::String(cid.to_string())),
    );
    sign(op, rotation_key)
}

/// Signs a `plc_tombstone` after `prev`: the JSON to `POST /{did}`.
pub fn signed_tombstone(prev: &Cid, rotation_key: &Keypair) -> serde_json::Value {
    let op = Map::from([
        ("type".to_owned(), Value::String("plc_tombstone".to_owned())),
        ("prev".to_owned(), Value::String(prev.to_string())),
    ]);
    sign(op, rotation_key)
}

/// The DID a signed genesis operation (in JSON) derives: `did:plc:` and the first 24
/// characters of the base32 SHA-256 of its DAG-CBOR. Checks the operation's shape and keys,
/// not its signature.
pub fn genesis_did(op_json: &serde_json::Value) -> Result<Did, PlcError> {
    let op = parse_operation(op_json)?;
    if op.prev.is_some() {
        return Err(invalid("not a genesis operation: prev is not null"));
    }
    did_from_signed_cbor(&op.signed_cbor)
}

/// The CID of a signed operation (in JSON): what the next operation names as `prev`.
pub fn operation_cid(op_json: &serde_json::Value) -> Result<Cid, PlcError> {
    Ok(parse_operation(op_json)?.cid)
}

/// Adds the signature over the DAG-CBOR of `op` and gives the JSON form.
fn sign(mut op: Map, rotation_key: &Keypair) -> serde_json::Value {
    let signature = rotation_key.sign(&Value::Map(op.clone()).to_cbor());
    op.insert(
        "sig".to_owned(),
        Value::String(URL_SAFE_NO_PAD.encode(signature)),
    );
    Value::Map(op).to_json()
}

/// The fields of an operation that make up a DID's state (a [`PlcData`] without `did`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct OpState {
    rotation_keys: Vec<String>,
    verification_methods: BTreeMap<String, String>,
    also_known_as: Vec<String>,
    services: BTreeMap<String, PlcService>,
}

impl OpState {
    fn to_data(&self, did: &Did) -> PlcData {
        PlcData {
            did: did.to_string(),
            rotation_keys: self.rotation_keys.clone(),
            verification_methods: self.verification_methods.clone(),
            also_known_as: self.also_known_as.clone(),
            services: self.services.clone(),
        }
    }

    /// The DID document: Multikey verification methods with full ids, services with
    /// relative ids, and a JSON-LD context per key curve, as the reference server renders it.
    fn document(&self, did: &Did) -> serde_json::Value {
        let mut context = vec![
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/multikey/v1",
        ];
        let mut methods = Vec::new();
        for (id, did_key) in &self.verification_methods {
            let curve_context = match PublicKey::from_did_key(did_key).map(|key| key.curve()) {
                Ok(Curve::K256) => Some("https://w3id.org/security/suites/secp256k1-2019/v1"),
                Ok(Curve::P256) => Some("https://w3id.org/security/suites/ecdsa-2019/v1"),
                // Other key types are allowed (spec v0.2) and get no suite context.
                Err(_) => None,
            };
            if let Some(extra) = curve_context
                && !context.contains(&extra)
            {
                context.push(extra);
            }
            methods.push(json!({
                "id": format!("{did}#{id}"),
                "type": "Multikey",
                "controller": did.as_str(),
                "publicKeyMultibase": did_key.strip_prefix("did:key:").unwrap_or(did_key),
            }));
        }
        let services: Vec<_> = self
            .services
            .iter()
            .map(|(id, service)| {
                json!({
                    "id": format!("#{id}"),
                    "type": service.r#type,
                    "serviceEndpoint": service.endpoint,
                })
            })
            .collect();
        json!({
            "@context": context,
            "id": did.as_str(),
            "alsoKnownAs": self.also_known_as,
            "verificationMethod": methods,
            "service": services,
        })
    }

    /// The specification's limits on keys.
    fn check(&self) -> Result<(), PlcError> {
        let n_keys = self.rotation_keys.len();
        if n_keys == 0 || n_keys > MAX_ROTATION_KEYS {
            return Err(invalid(format!(
                "{n_keys} rotation keys, expected 1 to {MAX_ROTATION_KEYS}"
            )));
        }
        for (index, key) in self.rotation_keys.iter().enumerate() {
            PublicKey::from_did_key(key)
                .map_err(|err| invalid(format!("rotation key {index}: {err}")))?;
            if self.rotation_keys[..index].contains(key) {
                return Err(invalid(format!("rotation key {key} is listed twice")));
            }
        }
        if self.verification_methods.len() > MAX_VERIFICATION_METHODS {
            return Err(invalid(format!(
                "{} verification methods, at most {MAX_VERIFICATION_METHODS} allowed",
                self.verification_methods.len()
            )));
        }
        for (id, key) in &self.verification_methods {
            if !is_did_key_syntax(key) {
                return Err(invalid(format!(
                    "verification method {id:?}: {key:?} is not a did:key (did:key:z and base58btc)"
                )));
            }
        }
        Ok(())
    }
}

/// `did:key:z` and base58btc: the syntax any verification method must have, whatever its
/// key type.
fn is_did_key_syntax(key: &str) -> bool {
    const BASE58: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    key.strip_prefix("did:key:z")
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|byte| BASE58.contains(&byte)))
}

/// An operation that has the right shape, size and keys; not yet checked against a log.
#[derive(Debug)]
struct ParsedOp {
    /// `None` for a tombstone.
    state: Option<OpState>,
    prev: Option<Cid>,
    sig: Vec<u8>,
    unsigned_cbor: Vec<u8>,
    signed_cbor: Vec<u8>,
    cid: Cid,
    /// The JSON form, rebuilt from the checked fields.
    json: serde_json::Value,
}

fn invalid(reason: impl Into<String>) -> PlcError {
    PlcError::InvalidOperation {
        reason: reason.into(),
    }
}

/// Checks an operation's shape, size and keys, and encodes it.
fn parse_operation(json: &serde_json::Value) -> Result<ParsedOp, PlcError> {
    let object = json
        .as_object()
        .ok_or_else(|| invalid("an operation is a JSON object"))?;
    let kind = object
        .get("type")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| invalid("missing string field \"type\""))?;
    let fields: &[&str] = match kind {
        "plc_operation" => &[
            "type",
            "rotationKeys",
            "verificationMethods",
            "alsoKnownAs",
            "services",
            "prev",
            "sig",
        ],
        "plc_tombstone" => &["type", "prev", "sig"],
        "create" => &[
            "type",
            "signingKey",
            "recoveryKey",
            "handle",
            "service",
            "prev",
            "sig",
        ],
        other => {
            return Err(invalid(format!(
                "type {other:?} is not plc_operation, plc_tombstone or create"
            )));
        }
    };
    if let Some(extra) = object.keys().find(|key| !fields.contains(&key.as_str())) {
        return Err(invalid(format!("{kind} has no field {extra:?}")));
    }
    let field = |name: &str| {
        object
            .get(name)
            .ok_or_else(|| invalid(format!("{kind} is missing field {name:?}")))
    };
    let string = |name: &str| {
        field(name)?
            .as_str()
            .ok_or_else(|| invalid(format!("{kind} field {name:?} is not a string")))
    };

    let prev = match field("prev")? {
        serde_json::Value::Null if kind != "plc_tombstone" => None,
        serde_json::Value::String(text) if kind != "create" => {
            Some(Cid::from_str(text).map_err(|err| invalid(format!("prev {text:?}: {err}")))?)
        }
        _ if kind == "plc_operation" => return Err(invalid("prev is neither null nor a string")),
        _ if kind == "create" => return Err(invalid("a legacy create operation has prev null")),
        _ => return Err(invalid("a tombstone's prev is a CID string")),
    };
    let state = match kind {
        "plc_operation" => Some(OpState {
            rotation_keys: string_array(field("rotationKeys")?, "rotationKeys")?,
            verification_methods: string_map(field("verificationMethods")?, "verificationMethods")?,
            also_known_as: string_array(field("alsoKnownAs")?, "alsoKnownAs")?,
            services: services(field("services")?)?,
        }),
        // The legacy format, normalized as the reference implementation does.
        "create" => {
            let signing_key = string("signingKey")?;
            let handle = string("handle")?;
            let handle = handle
                .strip_prefix("at://")
                .or_else(|| handle.strip_prefix("https://"))
                .or_else(|| handle.strip_prefix("http://"))
                .unwrap_or(handle);
            let service = string("service")?;
            let endpoint = if service.starts_with("http://") || service.starts_with("https://") {
                service.to_owned()
            } else {
                format!("https://{service}")
            };
            Some(OpState {
                rotation_keys: vec![string("recoveryKey")?.to_owned(), signing_key.to_owned()],
                verification_methods: BTreeMap::from([(
                    ATPROTO_KEY.to_owned(),
                    signing_key.to_owned(),
                )]),
                also_known_as: vec![format!("at://{handle}")],
                services: BTreeMap::from([(
                    ATPROTO_PDS.to_owned(),
                    PlcService {
                        r#type: PDS_SERVICE_TYPE.to_owned(),
                        endpoint,
                    },
                )]),
            })
        }
        _ => None,
    };

    let sig_text = string("sig")?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig_text)
        .map_err(|err| invalid(format!("sig {sig_text:?} is not unpadded base64url: {err}")))?;

    // Every field has been checked to hold only strings, arrays and maps of them, or null.
    let mut unsigned = Map::new();
    for (name, value) in object {
        if name != "sig" {
            unsigned.insert(name.clone(), plain_value(value)?);
        }
    }
    let unsigned_cbor = Value::Map(unsigned.clone()).to_cbor();
    unsigned.insert("sig".to_owned(), Value::String(sig_text.to_owned()));
    let signed = Value::Map(unsigned);
    let signed_cbor = signed.to_cbor();
    if signed_cbor.len() > MAX_OPERATION_BYTES {
        return Err(PlcError::OperationTooLarge {
            size: signed_cbor.len(),
        });
    }
    if let Some(state) = &state {
        state.check()?;
    }
    Ok(ParsedOp {
        state,
        prev,
        sig,
        cid: Cid::dag_cbor(&signed_cbor),
        json: signed.to_json(),
        unsigned_cbor,
        signed_cbor,
    })
}

fn string_array(value: &serde_json::Value, name: &str) -> Result<Vec<String>, PlcError> {
    let items = value
        .as_array()
        .ok_or_else(|| invalid(format!("{name} is not an array")))?;
    items
        .iter()
        .map(|item| {
            item.as_str()
                .map(str::to_owned)
                .ok_or_else(|| invalid(format!("{name} has an entry that is not a string")))
        })
        .collect()
}

fn string_map(value: &serde_json::Value, name: &str) -> Result<BTreeMap<String, String>, PlcError> {
    let object = value
        .as_object()
        .ok_or_else(|| invalid(format!("{name} is not an object")))?;
    object
        .iter()
        .map(|(key, item)| {
            let text = item
                .as_str()
                .ok_or_else(|| invalid(format!("{name}.{key} is not a string")))?;
            Ok((key.clone(), text.to_owned()))
        })
        .collect()
}

fn services(value: &serde_json::Value) -> Result<BTreeMap<String, PlcService>, PlcError> {
    let object = value
        .as_object()
        .ok_or_else(|| invalid("services is not an object"))?;
    object
        .iter()
        .map(|(id, service)| {
            let fields = string_map(service, &format!("services.{id}"))?;
            if fields.len() != 2 {
                return Err(invalid(format!(
                    "services.{id} must have exactly the fields type and endpoint"
                )));
            }
            match (fields.get("type"), fields.get("endpoint")) {
                (Some(r#type), Some(endpoint)) => Ok((
                    id.clone(),
                    PlcService {
                        r#type: r#type.clone(),
                        endpoint: endpoint.clone(),
                    },
                )),
                _ => Err(invalid(format!(
                    "services.{id} must have exactly the fields type and endpoint"
                ))),
            }
        })
        .collect()
}

/// The data-model value of JSON made of null, strings, arrays and objects, the only types an
/// operation holds.
fn plain_value(json: &serde_json::Value) -> Result<Value, PlcError> {
    Ok(match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::String(text) => Value::String(text.clone()),
        serde_json::Value::Array(items) => {
            Value::Array(items.iter().map(plain_value).collect::<Result<_, _>>()?)
        }
        serde_json::Value::Object(fields) => Value::Map(
            fields
                .iter()
                .map(|(key, value)| Ok((key.clone(), plain_value(value)?)))
                .collect::<Result<_, PlcError>>()?,
        ),
        serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {
            return Err(invalid("operations hold no booleans or numbers"));
        }
    })
}

/// `did:plc:` and the first 24 characters of the lowercase base32 SHA-256 of the signed
/// genesis operation.
fn did_from_signed_cbor(signed_cbor: &[u8]) -> Result<Did, PlcError> {
    let digest = Sha256::digest(signed_cbor);
    let mut identifier = atpdb_repo::multiformats::base32_encode(&digest);
    identifier.truncate(24);
    Did::try_from(format!("did:plc:{identifier}")).map_err(|err| PlcError::InvalidDid {
        input: identifier,
        reason: err.to_string(),
    })
}

/// Parses the `did:plc` DID of a request path.
fn parse_plc_did(input: &str) -> Result<Did, PlcError> {
    let bad = |reason: &str| PlcError::InvalidDid {
        input: input.chars().take(100).collect(),
        reason: reason.to_owned(),
    };
    let did = Did::from_str(input).map_err(|err| bad(&err.to_string()))?;
    if did.method() != "plc" {
        return Err(bad("not a did:plc DID"));
    }
    let identifier = did.identifier();
    if identifier.len() != 24
        || !identifier
            .bytes()
            .all(|byte| matches!(byte, b'a'..=b'z' | b'2'..=b'7'))
    {
        return Err(bad(
            "a did:plc identifier is 24 characters of lowercase base32 (a-z, 2-7)",
        ));
    }
    Ok(did)
}

/// Checks a signature against the rotation keys in force; gives the index of the key that
/// made it, which bounds who may later nullify the operation.
fn verify_signature(did: &Did, keys: &[String], op: &ParsedOp) -> Result<usize, PlcError> {
    let bad = |reason: String| PlcError::BadSignature {
        did: did.clone(),
        reason,
    };
    // A curve-specific failure (high-S, r or s out of range) against one key may still
    // verify against a key on the other curve, so it is only reported if no key matches.
    let mut curve_failure = None;
    for (index, key) in keys.iter().enumerate() {
        // Keys in force were checked when their operation was accepted.
        let Ok(public_key) = PublicKey::from_did_key(key) else {
            continue;
        };
        match public_key.verify(&op.unsigned_cbor, &op.sig) {
            Ok(()) => return Ok(index),
            Err(KeyError::BadSignature { .. }) => {}
            Err(err @ (KeyError::SignatureLength { .. } | KeyError::DerSignature { .. })) => {
                return Err(bad(format!("malformed sig: {err}")));
            }
            Err(err) => {
                curve_failure.get_or_insert_with(|| format!("malformed sig: {err}"));
            }
        }
    }
    Err(bad(curve_failure.unwrap_or_else(|| {
        if keys.is_empty() {
            "no rotation key may sign after prev: a higher-priority key already has".to_owned()
        } else {
            format!(
                "sig does not verify with any of the {} rotation keys in force",
                keys.len()
            )
        }
    })))
}

/// One accepted operation of a DID's log.
#[derive(Debug)]
struct Entry {
    cid: Cid,
    operation: serde_json::Value,
    /// `None` for a tombstone.
    state: Option<OpState>,
    created_ms: u64,
    created_at: Datetime,
    nullified: bool,
    /// The rotation keys that may still sign an operation after this one: all of its own at
    /// first, then only those ranked above the signer of its latest successor, so that only
    /// a higher-priority key can fork history here again.
    allowed_keys: Vec<String>,
    /// The index of the latest operation naming this one as `prev`.
    last_child: Option<usize>,
}

impl Entry {
    fn new(op: ParsedOp, created_ms: u64) -> Entry {
        Entry {
            cid: op.cid,
            operation: op.json,
            allowed_keys: op
                .state
                .as_ref()
                .map(|state| state.rotation_keys.clone())
                .unwrap_or_default(),
            state: op.state,
            created_ms,
            created_at: Datetime::from_unix_micros(created_ms.saturating_mul(1000)),
            nullified: false,
            last_child: None,
        }
    }

    fn audit_json(&self, did: &Did) -> serde_json::Value {
        json!({
            "did": did.as_str(),
            "operation": self.operation,
            "cid": self.cid.to_string(),
            "nullified": self.nullified,
            "createdAt": self.created_at.as_str(),
        })
    }
}

/// The directory's state: every DID's log in arrival order, and the global sequence.
#[derive(Debug, Default)]
struct Directory {
    logs: HashMap<Did, Vec<Entry>>,
    /// `(did, index in its log)` per sequence number, which is the position plus one.
    sequence: Vec<(Did, usize)>,
    /// The last `createdAt` handed out, in Unix milliseconds.
    last_ms: u64,
    clock_offset_ms: u64,
}

impl Directory {
    fn entries(&self, did: &Did) -> Result<&[Entry], PlcError> {
        self.logs
            .get(did)
            .map(Vec::as_slice)
            .ok_or_else(|| PlcError::NotRegistered { did: did.clone() })
    }

    /// The latest operation in force: the last one not nullified (a genesis never is).
    fn head(&self, did: &Did) -> Result<&Entry, PlcError> {
        self.entries(did)?
            .iter()
            .rev()
            .find(|entry| !entry.nullified)
            .ok_or_else(|| PlcError::NotRegistered { did: did.clone() })
    }

    /// The `createdAt` of the next operation: now, but strictly after the previous one, so
    /// that every log is ordered by time as the specification requires.
    fn next_timestamp(&self) -> u64 {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| {
                u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
            });
        now_ms
            .saturating_add(self.clock_offset_ms)
            .max(self.last_ms.saturating_add(1))
    }

    /// Checks `op` against the DID's log and appends it. With `expected_head`, `op` must
    /// follow that operation and it must still be the latest (in-process updates never
    /// nullify).
    fn apply(
        &mut self,
        did: &Did,
        op: ParsedOp,
        expected_head: Option<&Cid>,
    ) -> Result<(), PlcError> {
        let created_ms = self.next_timestamp();
        let misordered = |reason: String| PlcError::Misordered {
            did: did.clone(),
            reason,
        };
        let Some(entries) = self.logs.get_mut(did) else {
            let Some(state) = op.state.as_ref().filter(|_| op.prev.is_none()) else {
                return Err(misordered(
                    "the DID is not registered, and only a genesis operation (prev null) creates one"
                        .to_owned(),
                ));
            };
            let derived = did_from_signed_cbor(&op.signed_cbor)?;
            if &derived != did {
                return Err(PlcError::GenesisMismatch {
                    did: did.clone(),
                    derived,
                });
            }
            verify_signature(did, &state.rotation_keys, &op)?;
            self.logs
                .insert(did.clone(), vec![Entry::new(op, created_ms)]);
            self.sequence.push((did.clone(), 0));
            self.last_ms = created_ms;
            return Ok(());
        };

        let Some(prev) = op.prev else {
            return Err(PlcError::AlreadyRegistered { did: did.clone() });
        };
        let Some(prev_index) = entries.iter().position(|entry| entry.cid == prev) else {
            return Err(misordered(format!("prev {prev} is not in its log")));
        };
        let Some(prev_entry) = entries.get(prev_index) else {
            return Err(misordered(format!("prev {prev} is not in its log")));
        };
        if let Some(head) = expected_head
            && (*head != prev || prev_entry.last_child.is_some())
        {
            return Err(misordered(format!(
                "another operation landed after {head} while this one was being signed"
            )));
        }
        if prev_entry.nullified {
            return Err(misordered(format!("prev {prev} has been nullified")));
        }
        if prev_entry.state.is_none() {
            return Err(misordered(format!(
                "prev {prev} is a tombstone, and a deactivated DID takes no further operations"
            )));
        }
        let key_index = verify_signature(did, &prev_entry.allowed_keys, &op)?;

        // Operations after `prev` form one chain; this operation nullifies all of them.
        let mut nullified = Vec::new();
        let mut next = prev_entry.last_child;
        while let Some(index) = next {
            nullified.push(index);
            next = entries.get(index).and_then(|entry| entry.last_child);
        }
        if let Some(first) = nullified.first().and_then(|&index| entries.get(index)) {
            let age_ms = created_ms.saturating_sub(first.created_ms);
            if u128::from(age_ms) > RECOVERY_WINDOW.as_millis() {
                return Err(PlcError::LateRecovery {
                    did: did.clone(),
                    cid: first.cid,
                    age_hours: age_ms / 3_600_000,
                });
            }
        }

        for index in nullified {
            if let Some(entry) = entries.get_mut(index) {
                entry.nullified = true;
            }
        }
        let new_index = entries.len();
        if let Some(prev_entry) = entries.get_mut(prev_index) {
            prev_entry.allowed_keys.truncate(key_index);
            prev_entry.last_child = Some(new_index);
        }
        entries.push(Entry::new(op, created_ms));
        self.sequence.push((did.clone(), new_index));
        self.last_ms = created_ms;
        Ok(())
    }
}

/// A [`PlcError`] as the reference server's `{"message": ...}` response.
struct HttpError(PlcError);

impl From<PlcError> for HttpError {
    fn from(err: PlcError) -> HttpError {
        HttpError(err)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match self.0 {
            PlcError::NotRegistered { .. } | PlcError::NotAvailable { .. } => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        (status, Json(json!({ "message": self.0.to_string() }))).into_response()
    }
}

type HttpResult<T> = Result<T, HttpError>;

/// The DID of the request path, or a 400 naming what is wrong with it.
fn path_did(path: Result<Path<String>, PathRejection>) -> Result<Did, PlcError> {
    match path {
        Ok(Path(did)) => parse_plc_did(&did),
        Err(rejection) => Err(PlcError::InvalidDid {
            input: String::new(),
            reason: rejection.body_text(),
        }),
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

async fn get_document(
    State(plc): State<Plc>,
    path: Result<Path<String>, PathRejection>,
) -> HttpResult<Response> {
    let document = plc.document(&path_did(path)?)?;
    Ok((
        [(header::CONTENT_TYPE, "application/did+ld+json")],
        document.to_string(),
    )
        .into_response())
}

async fn get_data(
    State(plc): State<Plc>,
    path: Result<Path<String>, PathRejection>,
) -> HttpResult<Json<PlcData>> {
    let did = path_did(path)?;
    let directory = plc.lock();
    let state = directory
        .head(&did)?
        .state
        .as_ref()
        .ok_or_else(|| PlcError::NotAvailable { did: did.clone() })?;
    Ok(Json(state.to_data(&did)))
}

async fn get_log(
    State(plc): State<Plc>,
    path: Result<Path<String>, PathRejection>,
) -> HttpResult<Json<Vec<serde_json::Value>>> {
    Ok(Json(plc.log(&path_did(path)?)?))
}

async fn get_audit_log(
    State(plc): State<Plc>,
    path: Result<Path<String>, PathRejection>,
) -> HttpResult<Json<Vec<serde_json::Value>>> {
    Ok(Json(plc.audit_log(&path_did(path)?)?))
}

async fn get_last_operation(
    State(plc): State<Plc>,
    path: Result<Path<String>, PathRejection>,
) -> HttpResult<Json<serde_json::Value>> {
    Ok(Json(plc.last_operation(&path_did(path)?)?))
}

async fn post_operation(
    State(plc): State<Plc>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> HttpResult<StatusCode> {
    let did = path_did(path)?;
    let op: serde_json::Value =
        serde_json::from_slice(&body).map_err(|err| invalid(format!("body is not JSON: {err}")))?;
    plc.submit(&did, &op)?;
    Ok(StatusCode::OK)
}

/// The `/export` query, kept as text so that a bad value gets a JSON error.
#[derive(Debug, Deserialize)]
struct ExportQuery {
    after: Option<String>,
    count: Option<String>,
}

async fn export(
    State(plc): State<Plc>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> HttpResult<Response> {
    let Query(query) = query.map_err(|rejection| PlcError::InvalidQuery {
        parameter: "query",
        value: rejection.body_text(),
        expected: "after and count as integers",
    })?;
    let after = match &query.after {
        None => 0,
        Some(text) => text.parse::<u64>().map_err(|_| PlcError::InvalidQuery {
            parameter: "after",
            value: text.clone(),
            expected: "a sequence number (a non-negative integer)",
        })?,
    };
    let count = match &query.count {
        None => DEFAULT_EXPORT_COUNT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|&count| count >= 1)
            .ok_or_else(|| PlcError::InvalidQuery {
                parameter: "count",
                value: text.clone(),
                expected: "a positive integer (pages stop at 1000)",
            })?,
    };
    let lines: Vec<String> = plc
        .export(after, count)
        .iter()
        .map(serde_json::Value::to_string)
        .collect();
    Ok((
        [(header::CONTENT_TYPE, "application/jsonlines")],
        lines.join("\n"),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_dids_must_be_plc() {
        assert!(parse_plc_did("did:plc:z72i7hdynmk6r22z27h6tvur").is_ok());
        for bad in [
            "did:web:example.com",
            "did:plc:z72i7hdynmk6r22z27h6tvu",
            "did:plc:Z72i7hdynmk6r22z27h6tvur",
            "did:plc:z72i7hdynmk6r22z27h6tvu1",
            "not-a-did",
            "",
        ] {
            assert!(parse_plc_did(bad).is_err(), "accepted {bad:?}");
        }
    }
}
