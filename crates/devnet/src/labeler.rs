//! A labeler host: an identity whose DID document names an `#atproto_label` key and an
//! `#atproto_labeler` service, serving `com.atproto.label.subscribeLabels` (cursor replay,
//! `FutureCursor`, live) and `com.atproto.label.queryLabels`, with every label signed.
//!
//! Labels are written through [`Labeler::emit`]; negations and expiry are ordinary fields.
//! [`Labeler::forge`] appends a label signed by another key, as a hostile or misconfigured
//! labeler would, so consumers' signature checks are tested for real. [`Labeler::current`] is
//! the truth a consumer must end up with: the newest label per (uri, val), negations and
//! expired labels removed, forgeries never applied.

use std::sync::{Arc, Mutex};

use atpdb_repo::crypto::{Curve, Keypair};
use atpdb_repo::label::{Label, LabelsMessage, encode_labels_frame};
use atpdb_repo::syntax::{Datetime, Did, Handle};
use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::faults::Faults;
use crate::plc::{Plc, PlcError, PlcService};
use crate::sequencer::Sequencer;
use crate::subscribe::SubscribeOptions;
use crate::xrpc::{Params, XrpcError, XrpcResult};

/// Labels kept for replay (a labeler's stream may replay its whole history).
const REPLAY_WINDOW: usize = 1 << 20;

/// What to label next: the subject and value, and the optional fields.
#[derive(Debug, Clone, Default)]
pub struct LabelSpec {
    /// An `at://` URI or a DID.
    pub uri: String,
    /// Pins the label to one record version.
    pub cid: Option<String>,
    /// The label value.
    pub val: String,
    /// Withdraws an earlier label with the same uri and val.
    pub neg: bool,
    /// When it stops applying.
    pub exp: Option<Datetime>,
}

struct Issued {
    seq: u64,
    label: Label,
    /// Signed by the wrong key: in the stream, never in the truth.
    forged: bool,
}

struct Inner {
    did: Did,
    url: String,
    key: Keypair,
    impostor: Keypair,
    log: Arc<Sequencer>,
    issued: Mutex<Vec<Issued>>,
    /// The last `cts` handed out, in Unix milliseconds: labels of one labeler get strictly
    /// increasing creation times, so "newest wins" is never a tie.
    clock_ms: Mutex<u64>,
    faults: Faults,
    shutdown: CancellationToken,
}

/// A running labeler; clones share it.
#[derive(Clone)]
pub struct Labeler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Labeler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Labeler")
            .field("did", &self.inner.did)
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

impl Labeler {
    /// Registers the labeler's identity in `plc` (handle `labeler.test`, its `#atproto` and
    /// `#atproto_label` keys, `#atproto_pds` at `pds_endpoint` as for any account, and the
    /// `#atproto_labeler` service at `url`). Keys derive from `seed`.
    pub(crate) fn new(
        url: String,
        plc: &Plc,
        pds_endpoint: &str,
        seed: u64,
        faults: Faults,
        shutdown: CancellationToken,
    ) -> Result<Labeler, PlcError> {
        let secret = |purpose: u8| {
            let mut bytes = [purpose; 32];
            bytes[..8].copy_from_slice(&seed.to_be_bytes());
            bytes
        };
        let key = |purpose| {
            Keypair::from_secret_bytes(Curve::K256, &secret(purpose)).map_err(|err| {
                crate::plc::PlcError::InvalidOperation {
                    reason: format!("labeler key: {err}"),
                }
            })
        };
        let (rotation, key, impostor) = (key(0xa1)?, key(0xa2)?, key(0xa3)?);
        let handle: Handle =
            "labeler.test"
                .parse()
                .map_err(|err| crate::plc::PlcError::InvalidOperation {
                    reason: format!("labeler handle: {err}"),
                })?;
        let did = plc.register(&rotation, &key.public(), &handle, pds_endpoint)?;
        plc.update(&did, &rotation, |data| {
            data.verification_methods
                .insert("atproto_label".to_owned(), key.public().to_did_key());
            data.services.insert(
                "atproto_labeler".to_owned(),
                PlcService {
                    r#type: "AtprotoLabeler".to_owned(),
                    endpoint: url.clone(),
                },
            );
        })?;
        Ok(Labeler {
            inner: Arc::new(Inner {
                did,
                url,
                key,
                impostor,
                log: Arc::new(Sequencer::new(1, REPLAY_WINDOW)),
                issued: Mutex::default(),
                clock_ms: Mutex::new(0),
                faults,
                shutdown,
            }),
        })
    }

    /// The labeler's DID (`src` of its labels).
    pub fn did(&self) -> &Did {
        &self.inner.did
    }

    /// Its base URL.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The newest seq issued (0 before any).
    pub fn head(&self) -> u64 {
        self.inner.log.head()
    }

    /// Signs and publishes a label; returns it with its seq.
    pub fn emit(&self, spec: LabelSpec) -> (u64, Label) {
        self.publish(spec, false)
    }

    /// Publishes a label signed by a key that is not the labeler's `#atproto_label` key.
    pub fn forge(&self, spec: LabelSpec) -> (u64, Label) {
        self.publish(spec, true)
    }

    fn publish(&self, spec: LabelSpec, forged: bool) -> (u64, Label) {
        let inner = &self.inner;
        let mut issued = lock(&inner.issued);
        let mut label = Label::new(inner.did.clone(), spec.uri, spec.val, self.next_cts());
        label.cid = spec.cid;
        // Ozone's form: neg only when true.
        label.neg = spec.neg.then_some(true);
        label.exp = spec.exp;
        label.sign(if forged { &inner.impostor } else { &inner.key });
        let message = |seq| LabelsMessage {
            seq,
            labels: vec![label.clone()],
        };
        // Appended under the `issued` lock so the log and the list agree on order.
        let seq = inner
            .log
            .append(None, |seq| encode_labels_frame(&message(seq)));
        issued.push(Issued {
            seq,
            label: label.clone(),
            forged,
        });
        (seq, label)
    }

    fn next_cts(&self) -> Datetime {
        let mut clock = lock(&self.inner.clock_ms);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as u64);
        *clock = now_ms.max(*clock + 1);
        Datetime::from_unix_micros(*clock * 1000)
    }

    /// Every label published, forgeries included, in seq order.
    pub fn published(&self) -> Vec<(u64, Label)> {
        lock(&self.inner.issued)
            .iter()
            .map(|issued| (issued.seq, issued.label.clone()))
            .collect()
    }

    /// What applies now: per (uri, val) the newest genuine label, unless it is a negation or
    /// has expired.
    pub fn current(&self) -> Vec<Label> {
        let now = Datetime::now();
        let mut newest = std::collections::BTreeMap::new();
        for issued in lock(&self.inner.issued).iter().filter(|i| !i.forged) {
            newest.insert(
                (issued.label.uri.clone(), issued.label.val.clone()),
                issued.label.clone(),
            );
        }
        newest
            .into_values()
            .filter(|label| !label.is_negation())
            .filter(|label| label.exp.as_ref().is_none_or(|exp| *exp > now))
            .collect()
    }

    /// `subscribeLabels`, `queryLabels` and a health check.
    pub(crate) fn router(&self) -> Router {
        Router::new()
            .route(
                "/xrpc/com.atproto.label.subscribeLabels",
                get(subscribe_labels),
            )
            .route("/xrpc/com.atproto.label.queryLabels", get(query_labels))
            .route(
                "/xrpc/_health",
                get(|| async { axum::Json(json!({"version": "atpdb-devnet"})) }),
            )
            .with_state(self.clone())
            .layer(axum::middleware::from_fn_with_state(
                self.inner.faults.clone(),
                crate::faults::middleware,
            ))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every mutation is one push or one assignment: a poisoned lock is still consistent.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn subscribe_labels(
    State(labeler): State<Labeler>,
    Params(params): Params<crate::subscribe::CursorParams>,
    upgrade: WebSocketUpgrade,
) -> XrpcResult<Response> {
    let cursor = params.cursor()?;
    let inner = labeler.inner.clone();
    Ok(upgrade.max_message_size(1 << 16).on_upgrade(move |socket| {
        crate::subscribe::serve(
            socket,
            inner.log.clone(),
            cursor,
            SubscribeOptions {
                max_lag: u64::MAX,
                send_timeout: std::time::Duration::from_secs(10),
            },
            inner.faults.clone(),
            inner.shutdown.clone(),
        )
    }))
}

/// `queryLabels`: `uriPatterns` (required, repeated; a trailing `*` is a prefix, `*` alone
/// matches all), `sources`, `limit` 1–250 (50), `cursor` (the last seq returned). Negations
/// are returned, expiry is not filtered: Ozone's behaviour.
async fn query_labels(
    State(labeler): State<Labeler>,
    Params(pairs): Params<Vec<(String, String)>>,
) -> XrpcResult<axum::Json<serde_json::Value>> {
    let mut patterns = Vec::new();
    let mut sources = Vec::new();
    let (mut limit, mut cursor) = (None, 0u64);
    for (name, value) in pairs {
        match name.as_str() {
            "uriPatterns" => {
                if value.find('*').is_some_and(|at| at + 1 != value.len()) {
                    return Err(XrpcError::invalid(format!(
                        "uriPatterns {value:?}: '*' may only end a pattern"
                    )));
                }
                patterns.push(value);
            }
            "sources" => sources.push(crate::xrpc::parse::<Did>("sources", &value)?),
            "limit" => limit = Some(crate::xrpc::parse::<i64>("limit", &value)?),
            "cursor" => cursor = crate::xrpc::parse("cursor", &value)?,
            _ => {}
        }
    }
    if patterns.is_empty() {
        return Err(XrpcError::invalid("uriPatterns is required"));
    }
    let limit = crate::xrpc::limit(limit, 50, 250)?;
    let matches = |uri: &str| {
        patterns
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => uri.starts_with(prefix),
                None => uri == pattern,
            })
    };
    let inner = &labeler.inner;
    if !sources.is_empty() && !sources.contains(&inner.did) {
        return Ok(axum::Json(json!({"labels": []})));
    }
    let issued = lock(&inner.issued);
    let page: Vec<&Issued> = issued
        .iter()
        .filter(|issued| issued.seq > cursor && matches(&issued.label.uri))
        .take(limit)
        .collect();
    let next = (page.len() == limit).then(|| page.last().map(|issued| issued.seq.to_string()));
    let labels: Vec<_> = page.iter().map(|issued| issued.label.to_json()).collect();
    Ok(axum::Json(match next.flatten() {
        Some(cursor) => json!({"cursor": cursor, "labels": labels}),
        None => json!({"labels": labels}),
    }))
}
