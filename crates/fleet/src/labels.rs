//! `atpdb fleet labels` (rsky's LabelerIngester): labelers' `subscribeLabels` → `label_live`.
//!
//! Each labeler is named by its DID; its DID document says where it serves
//! (`#atproto_labeler`) and which key signs its labels (`#atproto_label`). Every label is
//! checked against that key over exactly the fields it carries; one that fails is checked
//! again after re-resolving the document once (the key may have rotated), then dropped and
//! counted. A label whose `src` is not the labeler it came from is dropped too: a labeler
//! speaks only for itself.
//!
//! One message's labels and the labeler's cursor (the message's seq) are written in one
//! MULTI, so the saved cursor is the processed low-water mark, as for the firehose. Messages
//! at or below the cursor (a replay overlapping what was written) are skipped.

use std::time::{Duration, Instant};

use atpdb_identity::Resolver;
use atpdb_net::{Firehose, FirehoseConfig, FirehoseEvent, Http, SUBSCRIBE_LABELS};
use atpdb_repo::crypto::PublicKey;
use atpdb_repo::firehose::Message;
use atpdb_repo::label::{Label, decode_labels};
use atpdb_repo::syntax::Did;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{ConnectionManager, FleetError, StreamEvent, read_seq, wait_below};

/// What [`run`] does.
#[derive(Debug, Clone)]
pub struct LabelsConfig {
    /// The labelers followed, by DID.
    pub labelers: Vec<Did>,
    /// The stream written (`label_live`).
    pub stream: String,
    /// Wait while the stream holds this many entries.
    pub high_water: u64,
    /// Stop once no label has come for this long (tests); `None`: run until shut down.
    pub exit_when_idle: Option<Duration>,
}

impl Default for LabelsConfig {
    fn default() -> LabelsConfig {
        LabelsConfig {
            labelers: Vec::new(),
            stream: "label_live".to_owned(),
            high_water: 1_000_000,
            exit_when_idle: None,
        }
    }
}

impl LabelsConfig {
    /// The key holding the cursor for one labeler (by DID: its endpoint may move).
    pub fn cursor_key(&self, labeler: &Did) -> String {
        format!("{}:cursor:{labeler}", self.stream)
    }
}

/// What the ingester did, over every labeler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LabelsIngested {
    /// Labels written (negations included).
    pub labels: u64,
    /// Labels dropped: bad signature, malformed, or another labeler's `src`.
    pub invalid: u64,
    /// Messages at or below the cursor, skipped.
    pub replayed: u64,
}

impl std::ops::AddAssign for LabelsIngested {
    fn add_assign(&mut self, other: LabelsIngested) {
        self.labels += other.labels;
        self.invalid += other.invalid;
        self.replayed += other.replayed;
    }
}

/// Follows every labeler until `shutdown` (or, with `exit_when_idle`, a quiet spell).
///
/// # Errors
///
/// The first labeler task's error ([`FleetError::Redis`], or [`FleetError::Config`] for a
/// labeler whose identity names no labeler service): the others are stopped, and what was
/// written stays written with its cursor.
pub async fn run(
    http: &Http,
    identity: Resolver,
    redis: ConnectionManager,
    config: &LabelsConfig,
    shutdown: &CancellationToken,
) -> Result<LabelsIngested, FleetError> {
    if config.labelers.is_empty() {
        return Err(FleetError::Config("no labeler DIDs given".to_owned()));
    }
    let stop = shutdown.child_token();
    let mut tasks = JoinSet::new();
    for labeler in &config.labelers {
        let (http, identity, redis, config, stop) = (
            http.clone(),
            identity.clone(),
            redis.clone(),
            config.clone(),
            stop.clone(),
        );
        let labeler = labeler.clone();
        tasks.spawn(async move { follow(&http, &identity, redis, &config, &labeler, &stop).await });
    }
    let mut total = LabelsIngested::default();
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(done)) => total += done,
            Ok(Err(err)) => {
                stop.cancel();
                failure.get_or_insert(err);
            }
            Err(err) => {
                stop.cancel();
                failure.get_or_insert(FleetError::Config(format!("a labeler task failed: {err}")));
            }
        }
    }
    match failure {
        Some(err) => Err(err),
        None => Ok(total),
    }
}

/// The labeler's endpoint and label key, from its DID document.
async fn labeler_identity(
    identity: &Resolver,
    labeler: &Did,
    refresh: bool,
) -> Result<(String, PublicKey), FleetError> {
    let found = if refresh {
        identity.refresh(labeler).await
    } else {
        identity.resolve(labeler).await
    };
    let found = found
        .map_err(|err| FleetError::Config(format!("resolving the labeler {labeler}: {err}")))?;
    let endpoint = found
        .labeler_endpoint()
        .map_err(|err| FleetError::Config(format!("the labeler {labeler}: {err}")))?;
    let key = found
        .label_key()
        .map_err(|err| FleetError::Config(format!("the labeler {labeler}: {err}")))?;
    Ok((endpoint, key))
}

async fn follow(
    http: &Http,
    identity: &Resolver,
    mut redis: ConnectionManager,
    config: &LabelsConfig,
    labeler: &Did,
    shutdown: &CancellationToken,
) -> Result<LabelsIngested, FleetError> {
    let cursor_key = config.cursor_key(labeler);
    let mut cursor = read_seq(&mut redis, &cursor_key).await?;
    let (endpoint, mut key) = labeler_identity(identity, labeler, false).await?;
    tracing::info!(%labeler, %endpoint, ?cursor, "labels.start");
    // A labeler's stream is its whole history: start from the beginning, not live.
    let mut stream = Firehose::connect(
        http,
        FirehoseConfig {
            method: SUBSCRIBE_LABELS,
            cursor: Some(cursor.unwrap_or(0)),
            ..FirehoseConfig::new(endpoint)
        },
    );
    let mut done = LabelsIngested::default();
    let mut last_event = Instant::now();
    loop {
        if let Some(idle) = config.exit_when_idle
            && last_event.elapsed() >= idle
        {
            break;
        }
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            event = stream.next() => event,
            () = tokio::time::sleep(Duration::from_millis(100)), if config.exit_when_idle.is_some() => continue,
        };
        let body = match event {
            FirehoseEvent::Message(Message::Unknown { t, body })
                if t == "#labels" || t == "com.atproto.label.subscribeLabels#labels" =>
            {
                body
            }
            FirehoseEvent::Message(message) => {
                tracing::debug!(%labeler, t = message.t(), "labels.ignored message");
                continue;
            }
            FirehoseEvent::Invalid { error, len } => {
                done.invalid += 1;
                tracing::warn!(%labeler, %error, len, "labels.invalid_frame");
                continue;
            }
            FirehoseEvent::Connected { cursor } => {
                tracing::info!(%labeler, ?cursor, "labels.connected");
                continue;
            }
            FirehoseEvent::Disconnected { reason, retry_in } => {
                tracing::warn!(%labeler, %reason, retry_in_ms = retry_in.as_millis() as u64, "labels.disconnected");
                continue;
            }
            FirehoseEvent::OutdatedCursor { message } => {
                tracing::error!(%labeler, ?message, "labels.outdated_cursor: labels were missed");
                continue;
            }
            FirehoseEvent::FutureCursor { message } => {
                tracing::warn!(%labeler, ?message, "labels.future_cursor: the labeler's seqs were reset; reconnecting live");
                continue;
            }
            FirehoseEvent::ErrorFrame { error, message } => {
                tracing::warn!(%labeler, %error, ?message, "labels.error_frame");
                continue;
            }
        };
        last_event = Instant::now();
        let message = match decode_labels(&body) {
            Ok(message) => message,
            Err(err) => {
                done.invalid += 1;
                tracing::warn!(%labeler, %err, "labels.invalid message");
                continue;
            }
        };
        if cursor.is_some_and(|cursor| message.seq <= cursor) {
            done.replayed += 1;
            continue;
        }
        // The client moves its cursor for messages it knows; `#labels` it does not.
        stream.set_cursor(Some(message.seq));
        let mut events = Vec::with_capacity(message.labels.len());
        for label in message.labels {
            let mut checked = check(labeler, &key, &label);
            if checked.is_err() && label.src == *labeler {
                // The key may have rotated since it was resolved: look again, once.
                if let Ok((_, fresh)) = labeler_identity(identity, labeler, true).await {
                    key = fresh;
                    checked = check(labeler, &key, &label);
                }
            }
            match checked {
                Ok(()) => events.push(label_event(message.seq, &label)),
                Err(reason) => {
                    done.invalid += 1;
                    tracing::warn!(%labeler, uri = %label.uri, val = %label.val, %reason, "labels.invalid label dropped");
                }
            }
        }
        wait_below(&mut redis, &config.stream, config.high_water, shutdown).await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for event in &events {
            let json = serde_json::to_string(event)
                .map_err(|err| FleetError::Config(format!("encoding a label event: {err}")))?;
            pipe.cmd("XADD")
                .arg(&config.stream)
                .arg("*")
                .arg("event")
                .arg(json)
                .ignore();
        }
        pipe.cmd("SET").arg(&cursor_key).arg(message.seq).ignore();
        let () = pipe.query_async(&mut redis).await?;
        cursor = Some(message.seq);
        done.labels += events.len() as u64;
    }
    Ok(done)
}

fn check(labeler: &Did, key: &PublicKey, label: &Label) -> Result<(), String> {
    if label.src != *labeler {
        return Err(format!("src is {}, not the labeler", label.src));
    }
    label.verify(key).map_err(|err| err.to_string())
}

fn label_event(seq: u64, label: &Label) -> StreamEvent {
    StreamEvent::Label {
        seq: i64::try_from(seq).unwrap_or(i64::MAX),
        src: label.src.to_string(),
        uri: label.uri.clone(),
        cid: label.cid.clone(),
        val: label.val.clone(),
        neg: label.is_negation(),
        cts: label.cts.to_string(),
        exp: label.exp.as_ref().map(ToString::to_string),
    }
}
