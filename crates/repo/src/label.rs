//! Labels (`com.atproto.label.defs#label`): the signed statements a labeler publishes about an
//! account or a record, and the `#labels` frames of `com.atproto.label.subscribeLabels`.
//!
//! # Design
//!
//! - A label is signed over the DRISL encoding of exactly the fields it carries, minus `sig`.
//!   A missing field and a field set to its default encode differently (`neg: false` is not
//!   an absent `neg`, an absent `ver` is not `ver: 1`), and labelers disagree on which to
//!   send, so [`Label`] keeps each optional field as received (`Option`) and
//!   [`Label::verify`] re-encodes exactly those: never a normalised form.
//! - Fields outside the schema are dropped, as the specification says to sign "the schema
//!   fields only"; a labeler that signed extra fields is refused by every implementation.
//! - The labeler's key is the `#atproto_label` verification method of its DID document;
//!   finding it is the caller's job (identity), checking the bytes is this module's.

use crate::cbor::Encoder;
use crate::crypto::{KeyError, Keypair, PublicKey};
use crate::syntax::{Datetime, Did};
use crate::value::{Map, Value, ValueError};

/// The longest `val`, in bytes (the lexicon's `maxLength`).
pub const MAX_VAL_BYTES: usize = 128;

/// The only label schema version there is.
pub const LABEL_VERSION: i64 = 1;

/// One label, fields as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// Schema version: 1 when present.
    pub ver: Option<i64>,
    /// The labeler's DID.
    pub src: Did,
    /// The subject: an `at://` URI for a record, a bare `did:` for an account.
    pub uri: String,
    /// Pins the label to one version of the record (a CID string, not a link).
    pub cid: Option<String>,
    /// The label value, at most [`MAX_VAL_BYTES`].
    pub val: String,
    /// `Some(true)`: this withdraws an earlier label with the same src, uri and val.
    pub neg: Option<bool>,
    /// When the labeler created it (not trustworthy across services).
    pub cts: Datetime,
    /// After this the label no longer applies.
    pub exp: Option<Datetime>,
    /// The signature over the other fields; absent on unsigned labels.
    pub sig: Option<Vec<u8>>,
}

/// Why a label or a `#labels` message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    /// Not DRISL, or not the data model.
    #[error("not a data-model value: {0}")]
    Value(#[from] ValueError),
    /// A field is missing, of the wrong type, or out of its limits.
    #[error("{0}")]
    Shape(String),
    /// The label carries no `sig`.
    #[error("the label is not signed")]
    Unsigned,
    /// `sig` does not verify against the key.
    #[error("the label's signature does not verify: {0}")]
    Signature(#[from] KeyError),
}

fn shape(problem: impl Into<String>) -> LabelError {
    LabelError::Shape(problem.into())
}

impl Label {
    /// A label of `src` about `uri` created at `cts`: `ver: 1`, no cid, neg or exp, unsigned.
    pub fn new(src: Did, uri: impl Into<String>, val: impl Into<String>, cts: Datetime) -> Label {
        Label {
            ver: Some(LABEL_VERSION),
            src,
            uri: uri.into(),
            cid: None,
            val: val.into(),
            neg: None,
            cts,
            exp: None,
            sig: None,
        }
    }

    /// Whether this withdraws an earlier label.
    pub fn is_negation(&self) -> bool {
        self.neg == Some(true)
    }

    /// Reads a label from its data-model map, checking each field's type and limits.
    ///
    /// # Errors
    ///
    /// [`LabelError::Shape`] naming the field.
    pub fn from_value(value: &Value) -> Result<Label, LabelError> {
        let Value::Map(map) = value else {
            return Err(shape("a label is not a map"));
        };
        let text = |name: &str| match map.get(name) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.clone())),
            Some(_) => Err(shape(format!("label field {name} is not a string"))),
        };
        let required =
            |name: &str| text(name)?.ok_or_else(|| shape(format!("label has no {name}")));
        let ver = match map.get("ver") {
            None => None,
            Some(Value::Integer(LABEL_VERSION)) => Some(LABEL_VERSION),
            Some(other) => return Err(shape(format!("label ver is {other:?}, expected 1"))),
        };
        let src = required("src")?;
        let src = src
            .parse::<Did>()
            .map_err(|err| shape(format!("label src {src:?}: {err}")))?;
        let uri = required("uri")?;
        if !(uri.starts_with("at://") || uri.starts_with("did:")) {
            return Err(shape(format!(
                "label uri {uri:?} is neither an at:// URI nor a DID"
            )));
        }
        let val = required("val")?;
        if val.is_empty() || val.len() > MAX_VAL_BYTES {
            return Err(shape(format!(
                "label val is {} bytes, expected 1 to {MAX_VAL_BYTES}",
                val.len()
            )));
        }
        let datetime = |name: &str, text: String| {
            text.parse::<Datetime>()
                .map_err(|err| shape(format!("label {name} {text:?}: {err}")))
        };
        let cts = datetime("cts", required("cts")?)?;
        let exp = text("exp")?.map(|exp| datetime("exp", exp)).transpose()?;
        let neg = match map.get("neg") {
            None => None,
            Some(Value::Bool(neg)) => Some(*neg),
            Some(_) => return Err(shape("label field neg is not a boolean")),
        };
        let sig = match map.get("sig") {
            None => None,
            Some(Value::Bytes(sig)) => Some(sig.clone()),
            Some(_) => return Err(shape("label field sig is not bytes")),
        };
        Ok(Label {
            ver,
            src,
            uri,
            cid: text("cid")?,
            val,
            neg,
            cts,
            exp,
            sig,
        })
    }

    /// The label as a data-model map, `sig` included when `signed`.
    fn to_map(&self, signed: bool) -> Map {
        let mut map = Map::new();
        let mut put = |name: &str, value: Value| {
            map.insert(name.to_owned(), value);
        };
        if let Some(ver) = self.ver {
            put("ver", Value::Integer(ver));
        }
        put("src", Value::String(self.src.as_str().to_owned()));
        put("uri", Value::String(self.uri.clone()));
        if let Some(cid) = &self.cid {
            put("cid", Value::String(cid.clone()));
        }
        put("val", Value::String(self.val.clone()));
        if let Some(neg) = self.neg {
            put("neg", Value::Bool(neg));
        }
        put("cts", Value::String(self.cts.as_str().to_owned()));
        if let Some(exp) = &self.exp {
            put("exp", Value::String(exp.as_str().to_owned()));
        }
        if signed && let Some(sig) = &self.sig {
            put("sig", Value::Bytes(sig.clone()));
        }
        map
    }

    /// The label as a data-model value, with its signature.
    pub fn to_value(&self) -> Value {
        Value::Map(self.to_map(true))
    }

    /// The bytes the signature covers: every field present except `sig`, in DRISL.
    pub fn signing_bytes(&self) -> Vec<u8> {
        Value::Map(self.to_map(false)).to_cbor()
    }

    /// Signs the label with `key` (the labeler's `#atproto_label` key).
    pub fn sign(&mut self, key: &Keypair) {
        self.sig = Some(key.sign(&self.signing_bytes()).to_vec());
    }

    /// Checks `sig` against `key`, over exactly the fields received.
    ///
    /// # Errors
    ///
    /// [`LabelError::Unsigned`] without a `sig`; [`LabelError::Signature`] when it does not
    /// verify (wrong key, changed field, high-S or DER form).
    pub fn verify(&self, key: &PublicKey) -> Result<(), LabelError> {
        let sig = self.sig.as_deref().ok_or(LabelError::Unsigned)?;
        key.verify(&self.signing_bytes(), sig)?;
        Ok(())
    }

    /// The label as JSON (`sig` as `{"$bytes"}`), as queryLabels returns it.
    pub fn to_json(&self) -> serde_json::Value {
        self.to_value().to_json()
    }
}

/// A `#labels` message: one seq, one or more labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelsMessage {
    /// The position in the labeler's stream (the cursor to resume after).
    pub seq: u64,
    /// The labels, in the order sent.
    pub labels: Vec<Label>,
}

/// The most labels one `#labels` message may carry before it is refused (the lexicon sets
/// no limit; labelers send one per message, and this bounds the work one frame can cause).
pub const MAX_LABELS_PER_MESSAGE: usize = 10_000;

/// Decodes the body of a `#labels` frame (the part after the header).
///
/// # Errors
///
/// [`LabelError`] when the body is not DRISL, `seq` or `labels` is missing or malformed, or
/// any label is.
pub fn decode_labels(body: &[u8]) -> Result<LabelsMessage, LabelError> {
    let Value::Map(map) = Value::from_cbor(body)? else {
        return Err(shape("a #labels body is not a map"));
    };
    let seq = match map.get("seq") {
        Some(Value::Integer(seq)) if *seq >= 0 => *seq as u64,
        Some(_) => return Err(shape("#labels seq is not a non-negative integer")),
        None => return Err(shape("#labels has no seq")),
    };
    let Some(Value::Array(items)) = map.get("labels") else {
        return Err(shape("#labels has no labels array"));
    };
    if items.len() > MAX_LABELS_PER_MESSAGE {
        return Err(shape(format!(
            "#labels carries {} labels, more than {MAX_LABELS_PER_MESSAGE}",
            items.len()
        )));
    }
    let labels = items
        .iter()
        .map(Label::from_value)
        .collect::<Result<_, _>>()?;
    Ok(LabelsMessage { seq, labels })
}

/// Encodes a whole `#labels` frame: the header `{t: "#labels", op: 1}`, then the body.
pub fn encode_labels_frame(message: &LabelsMessage) -> Vec<u8> {
    let mut encoder = Encoder::with_capacity(256 * message.labels.len() + 32);
    // Header keys in canonical order: `t` (1 byte) before `op` (2).
    encoder.map(2);
    encoder.text("t");
    encoder.text("#labels");
    encoder.text("op");
    encoder.i64(1);
    let body = Value::Map(Map::from([
        (
            "seq".to_owned(),
            Value::Integer(i64::try_from(message.seq).unwrap_or(i64::MAX)),
        ),
        (
            "labels".to_owned(),
            Value::Array(message.labels.iter().map(Label::to_value).collect()),
        ),
    ]));
    body.encode(&mut encoder);
    encoder.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Curve;
    use base64::Engine as _;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// indigo's `atproto/labeling/label_test.go` vector, signed by Ozone's code path.
    fn vector() -> Result<(Label, PublicKey), Box<dyn std::error::Error>> {
        let sig = base64::engine::general_purpose::STANDARD_NO_PAD.decode(
            "uCRNA5mTzh078T5xZtkvLEt/O+z0gsKM3aqRI/lVAB8ZtbMnznwS/JwHopZE40JhNNDj80z8gsDLAp/hWqG5Pg",
        )?;
        let mut label = Label::new(
            "did:plc:n3timvoib5nau7gvwd6cshap".parse()?,
            "did:plc:44ybard66vv44zksje25o7dz",
            "bladerunner",
            "2024-10-23T17:51:19.128Z".parse()?,
        );
        label.sig = Some(sig);
        let key = PublicKey::from_multikey("zQ3shcnfWLQN1bY4d2patsEAYFzy4xp1zdckEvHsV7S4ocTnC")?;
        Ok((label, key))
    }

    #[test]
    fn the_reference_vector_verifies_over_exactly_the_fields_sent() -> TestResult {
        let (label, key) = vector()?;
        label.verify(&key)?;
        let mut with_neg = label.clone();
        with_neg.neg = Some(false);
        assert!(matches!(
            with_neg.verify(&key),
            Err(LabelError::Signature(_))
        ));
        let mut without_ver = label.clone();
        without_ver.ver = None;
        assert!(matches!(
            without_ver.verify(&key),
            Err(LabelError::Signature(_))
        ));
        let mut unsigned = label;
        unsigned.sig = None;
        assert_eq!(unsigned.verify(&key), Err(LabelError::Unsigned));
        Ok(())
    }

    #[test]
    fn a_frame_round_trips_and_signatures_survive_it() -> TestResult {
        let key = Keypair::from_secret_bytes(Curve::K256, &[7; 32])?;
        let mut label = Label::new(
            "did:plc:n3timvoib5nau7gvwd6cshap".parse()?,
            "at://did:plc:44ybard66vv44zksje25o7dz/app.bsky.feed.post/3k",
            "spam",
            "2024-10-23T17:51:19.128Z".parse()?,
        );
        label.neg = Some(true);
        label.exp = Some("2030-01-01T00:00:00.000Z".parse()?);
        label.sign(&key);
        let message = LabelsMessage {
            seq: 42,
            labels: vec![label],
        };
        let frame = encode_labels_frame(&message);
        let crate::firehose::Frame::Message(crate::firehose::Message::Unknown { t, body }) =
            crate::firehose::decode_frame(&frame)?
        else {
            return Err("a #labels frame is an unknown subscribeRepos message".into());
        };
        assert_eq!(t, "#labels");
        let decoded = decode_labels(&body)?;
        assert_eq!(decoded, message);
        let first = decoded.labels.first().ok_or("no label")?;
        first.verify(&key.public())?;
        let other = Keypair::from_secret_bytes(Curve::K256, &[8; 32])?;
        assert!(first.verify(&other.public()).is_err());
        Ok(())
    }

    #[test]
    fn malformed_labels_are_refused_with_the_field_named() -> TestResult {
        let Value::Map(base) = vector()?.0.to_value() else {
            return Err("a label is a map".into());
        };
        let with = |name: &str, value: Value| {
            let mut map = base.clone();
            map.insert(name.to_owned(), value);
            Label::from_value(&Value::Map(map))
        };
        let without = |name: &str| {
            let mut map = base.clone();
            map.remove(name);
            Label::from_value(&Value::Map(map))
        };
        for (result, field) in [
            (with("ver", Value::Integer(2)), "ver"),
            (with("src", Value::String("alice".into())), "src"),
            (with("uri", Value::String("https://x".into())), "uri"),
            (with("val", Value::String("x".repeat(129))), "val"),
            (with("cts", Value::String("yesterday".into())), "cts"),
            (with("neg", Value::Integer(1)), "neg"),
            (with("sig", Value::String("abc".into())), "sig"),
            (without("val"), "val"),
            (without("cts"), "cts"),
        ] {
            let err = result.err().ok_or(field)?.to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        assert!(decode_labels(&Value::Map(Map::new()).to_cbor()).is_err());
        Ok(())
    }
}
