//! The atproto data model: values decoded from DRISL, canonical encoding, JSON form.
//!
//! [`Value`] is the generic tree every record decodes to. There are three ways in and two
//! ways out, each with its own rules:
//!
//! - [`Value::from_cbor`] is strict DRISL, built on [`cbor::Decoder`]: exactly one item, no
//!   floats, only tag 42, canonical key order without repeats, and the limits of
//!   [`cbor::MAX_DEPTH`], [`cbor::MAX_CONTAINER_LEN`] and [`cbor::MAX_KEY_LEN`].
//! - [`Value::from_json`] reads the JSON form: `{"$link": cid}` becomes [`Value::Link`],
//!   `{"$bytes": base64}` becomes [`Value::Bytes`], and numbers must be integers.
//! - [`Value::validate_record`] (and [`validate_record_json`]) add the shape rules of the data
//!   model that hold for any record: the top level is an object, `$type` is a non-empty string
//!   wherever it appears, and blob objects have exactly the fields a blob has.
//!
//! Out: [`Value::to_cbor`] (canonical, so [`Value::cid`] is the record's CID) and
//! [`Value::to_json`]. [`cbor_to_json`] goes from DRISL bytes to JSON without building a
//! [`Value`], for the sync engine's hot path.
//!
//! Decoding does not apply the shape rules: the sync engine must store and hash a record
//! exactly as the repository holds it, whatever its shape. Callers that want the stricter
//! reading of the reference's `atdata.UnmarshalCBOR` (which Tap uses before emitting a record)
//! call [`Value::validate_record`] on the decoded value.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::cbor::{self, DecodeError, Decoder, Encoder};
use crate::cid::{Cid, CidError};

/// A map of the data model: text keys to values.
///
/// A `BTreeMap` iterates in bytewise key order, which is not DRISL's length-first order;
/// [`Value::encode`] reorders keys as it writes, so any `Map` encodes canonically. Bytewise
/// order is also the order Go's `encoding/json` writes, so [`Value::to_json`] matches the
/// reference implementation's output.
pub type Map = BTreeMap<String, Value>;

/// One value of the atproto data model.
///
/// There are no floats: the data model has only integers, and DRISL forbids floats.
/// Blobs are not a variant: a blob is a [`Value::Map`] with `$type: "blob"`, exactly as it is
/// stored, so that re-encoding never changes a record's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A signed integer. atproto recommends staying within ±2^53; the whole `i64` range is
    /// accepted because DRISL can carry it.
    Integer(i64),
    /// UTF-8 text.
    String(String),
    /// Raw bytes: a CBOR byte string, `{"$bytes": base64}` in JSON.
    Bytes(Vec<u8>),
    /// A CID link: CBOR tag 42, `{"$link": cid}` in JSON.
    Link(Cid),
    /// An ordered list.
    Array(Vec<Value>),
    /// An object with text keys.
    Map(Map),
}

/// Why a value does not fit the data model.
///
/// `path` fields are JSON Pointers (RFC 6901) into the value, empty for the top level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// The bytes are not exactly one well-formed DRISL item within the limits.
    #[error("value is not valid DRISL")]
    Decode(#[from] DecodeError),
    /// A JSON number with a fractional part (the data model has no floats).
    #[error("{}: float {found} is not allowed (the data model has only integers)", At(.path))]
    Float {
        /// Where the number is.
        path: String,
        /// The number as written.
        found: String,
    },
    /// A JSON number that is an integer but does not fit in an `i64`.
    #[error("{}: integer {found} does not fit in a signed 64-bit integer", At(.path))]
    IntegerRange {
        /// Where the number is.
        path: String,
        /// The number as written.
        found: String,
    },
    /// A JSON `{"$link": ...}` object of the wrong shape.
    #[error("{}: $link object {problem}", At(.path))]
    LinkShape {
        /// Where the object is.
        path: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A JSON `$link` string that is not a CID atpdb accepts.
    #[error("{}: $link {found:?} is not a valid CID", At(.path))]
    LinkCid {
        /// Where the object is.
        path: String,
        /// The string found.
        found: String,
        /// Why it does not parse.
        #[source]
        source: CidError,
    },
    /// A JSON `{"$bytes": ...}` object of the wrong shape.
    #[error("{}: $bytes object {problem}", At(.path))]
    BytesShape {
        /// Where the object is.
        path: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A JSON `$bytes` string that is not standard base64.
    #[error("{}: $bytes is not standard base64", At(.path))]
    BytesBase64 {
        /// Where the object is.
        path: String,
        /// Why it does not decode.
        #[source]
        source: base64::DecodeError,
    },
    /// Nesting depth, container length or key length beyond the data model's limits.
    #[error("{}: {what} {found} exceeds the limit of {limit}", At(.path))]
    Limit {
        /// Where the limit was exceeded.
        path: String,
        /// Which limit: `nesting depth`, `container length` or `map key length`.
        what: &'static str,
        /// The limit.
        limit: u64,
        /// The value found.
        found: u64,
    },
    /// A record (or any data-model top-level value) must be an object.
    #[error("top-level value is {found}, not an object")]
    NotObject {
        /// The kind of value found.
        found: &'static str,
    },
    /// `$type` must be a non-empty string wherever it appears.
    #[error("{}: $type must be a non-empty string, found {found}", At(.path))]
    TypeField {
        /// Where the object holding `$type` is.
        path: String,
        /// What `$type` held.
        found: &'static str,
    },
    /// An object with `$type: "blob"` (or a legacy `{cid, mimeType}` blob) of the wrong shape.
    #[error("{}: blob field {field:?} {problem}", At(.path))]
    Blob {
        /// Where the blob object is.
        path: String,
        /// The field at fault.
        field: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A decoded map with a `$link` or `$bytes` key, which its JSON form would misread as a
    /// link or bytes.
    #[error("{}: map key {key} is reserved for the JSON form of links and bytes", At(.path))]
    ReservedKey {
        /// Where the map is.
        path: String,
        /// The reserved key found.
        key: &'static str,
    },
}

/// Renders a JSON Pointer as the subject of an error message.
struct At<'a>(&'a String);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("at the top level")
        } else {
            write!(f, "at {}", self.0)
        }
    }
}

/// Reads `$bytes`: standard alphabet, padding optional. Non-zero trailing bits are accepted,
/// as Go's `base64.RawStdEncoding` (the reference's decoder) accepts them.
const BYTES_INPUT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// The JSON key of a link object.
const LINK_KEY: &str = "$link";
/// The JSON key of a bytes object.
const BYTES_KEY: &str = "$bytes";
/// The key naming an object's type.
const TYPE_KEY: &str = "$type";

/// Most elements reserved up front for one container while decoding.
///
/// A declared count is already bounded by the bytes left, but nested containers can each
/// declare nearly the whole input; reserving only this many keeps the memory used
/// proportional to the input actually read, and `Vec` grows past it as elements arrive.
const MAX_PREALLOCATED: usize = 1024;

impl Value {
    /// Decodes exactly one strict DRISL item.
    ///
    /// Rejects trailing bytes, floats, tags other than 42, non-canonical or repeated map keys,
    /// and anything beyond the nesting, container and key limits; never allocates from a
    /// declared length before the bytes behind it exist.
    pub fn from_cbor(bytes: &[u8]) -> Result<Value, ValueError> {
        let mut decoder = Decoder::new(bytes);
        let value = decode_item::<Value>(&mut decoder, 0)?;
        decoder.finish()?;
        Ok(value)
    }

    /// The canonical DRISL encoding.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut encoder = Encoder::new();
        self.encode(&mut encoder);
        encoder.into_bytes()
    }

    /// Writes the canonical DRISL encoding, map keys in [`cbor::key_less`] order.
    ///
    /// Encoding does not check limits: a value built in code deeper than
    /// [`cbor::MAX_DEPTH`] encodes, and [`Value::from_cbor`] then rejects it.
    pub fn encode(&self, encoder: &mut Encoder) {
        match self {
            Value::Null => encoder.null(),
            Value::Bool(value) => encoder.bool(*value),
            Value::Integer(value) => encoder.i64(*value),
            Value::String(value) => encoder.text(value),
            Value::Bytes(value) => encoder.bytes(value),
            Value::Link(cid) => encoder.link(cid),
            Value::Array(items) => {
                encoder.array(items.len());
                for item in items {
                    item.encode(encoder);
                }
            }
            Value::Map(map) => {
                encoder.map(map.len());
                for (key, value) in canonical_entries(map) {
                    encoder.text(key);
                    value.encode(encoder);
                }
            }
        }
    }

    /// The CID of the canonical encoding under the dag-cbor codec: a record's CID.
    pub fn cid(&self) -> Cid {
        Cid::dag_cbor(&self.to_cbor())
    }

    /// Reads the JSON form of a value.
    ///
    /// `{"$link": "b..."}` becomes a [`Value::Link`] and `{"$bytes": "..."}` a
    /// [`Value::Bytes`]; either must be the object's only field. `$bytes` is standard base64,
    /// with or without padding. Numbers must be integers that fit in an `i64`; a float with no
    /// fractional part (`123.0`) is read as that integer, because JSON does not distinguish the
    /// two and the reference implementations (Go's `atdata`, JavaScript) accept it. Blob
    /// objects stay maps. Shape rules (`$type`, blobs) are [`Value::validate_record`]'s job.
    pub fn from_json(json: &serde_json::Value) -> Result<Value, ValueError> {
        from_json_at(json, &mut Vec::new(), 0)
    }

    /// The JSON form: links as `{"$link": "b..."}`, bytes as `{"$bytes": "..."}` in standard
    /// base64 without padding, keys in bytewise order.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(value) => serde_json::Value::Bool(*value),
            Value::Integer(value) => serde_json::Value::from(*value),
            Value::String(value) => serde_json::Value::String(value.clone()),
            Value::Bytes(value) => bytes_json(value),
            Value::Link(cid) => link_json(cid),
            Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(Value::to_json).collect())
            }
            Value::Map(map) => serde_json::Value::Object(
                map.iter()
                    .map(|(key, value)| (key.clone(), value.to_json()))
                    .collect(),
            ),
        }
    }

    /// Checks the data model's rules for a record: the top level is a map, and throughout the
    /// tree `$type` is a non-empty string where present, blobs have exactly `$type`, `ref`
    /// (a link), `mimeType` (a string) and `size` (a non-negative integer), legacy blobs
    /// (`{cid, mimeType}`) hold strings, no map has a `$link` or `$bytes` key, and the
    /// nesting, container and key limits hold (they may not, for a value built in code).
    ///
    /// A `$type` on the top level is not required here: whether one must be present is a
    /// repository and lexicon rule, and the data-model fixtures accept objects without one.
    /// A legacy blob's `cid` is not parsed, because [`Cid`] accepts only the sha2-256 CIDv1
    /// atpdb can verify and nothing verifies a legacy blob reference.
    pub fn validate_record(&self) -> Result<(), ValueError> {
        match self {
            Value::Map(_) => check_shapes(self, &mut Vec::new(), 0),
            other => Err(ValueError::NotObject {
                found: other.type_name(),
            }),
        }
    }

    /// The kind of value, for messages: `null`, `boolean`, `integer`, `string`, `bytes`,
    /// `link`, `array` or `map`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Integer(_) => "integer",
            Value::String(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::Link(_) => "link",
            Value::Array(_) => "array",
            Value::Map(_) => "map",
        }
    }

    /// The field `key` of a map; `None` for a missing field or a value that is not a map.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_map().and_then(|map| map.get(key))
    }

    /// The map, if this is one.
    pub fn as_map(&self) -> Option<&Map> {
        match self {
            Value::Map(map) => Some(map),
            _ => None,
        }
    }

    /// The items, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The text, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(text) => Some(text),
            _ => None,
        }
    }

    /// The integer, if this is one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Integer(value) => Some(*value),
            _ => None,
        }
    }

    /// The bytes, if this is a byte string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// The CID, if this is a link.
    pub fn as_link(&self) -> Option<&Cid> {
        match self {
            Value::Link(cid) => Some(cid),
            _ => None,
        }
    }
}

/// Checks the JSON form of a record: [`Value::from_json`] then [`Value::validate_record`].
///
/// This is the check the interop fixtures `data-model-valid.json` and
/// `data-model-invalid.json` describe.
pub fn validate_record_json(json: &serde_json::Value) -> Result<(), ValueError> {
    Value::from_json(json)?.validate_record()
}

/// Decodes strict DRISL bytes straight into the JSON form, without building a [`Value`].
///
/// Accepts and rejects exactly what [`Value::from_cbor`] does, and the result equals
/// `Value::from_cbor(bytes)?.to_json()`. Shape rules are not applied (see the module docs).
pub fn cbor_to_json(bytes: &[u8]) -> Result<serde_json::Value, ValueError> {
    let mut decoder = Decoder::new(bytes);
    let json = decode_item::<serde_json::Value>(&mut decoder, 0)?;
    decoder.finish()?;
    Ok(json)
}

/// A map's entries in DRISL order: shorter keys first, then bytewise.
///
/// The map iterates bytewise, and the sort is stable, so sorting by length alone gives
/// length-first, then bytewise.
fn canonical_entries(map: &Map) -> Vec<(&String, &Value)> {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_by_key(|(key, _)| key.len());
    entries
}

fn link_json(cid: &Cid) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    object.insert(
        LINK_KEY.to_owned(),
        serde_json::Value::String(cid.to_string()),
    );
    serde_json::Value::Object(object)
}

fn bytes_json(bytes: &[u8]) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    object.insert(
        BYTES_KEY.to_owned(),
        serde_json::Value::String(STANDARD_NO_PAD.encode(bytes)),
    );
    serde_json::Value::Object(object)
}

/// What decoding builds: a [`Value`] tree or its JSON form directly.
trait Build: Sized {
    /// A map under construction.
    type MapBuilder;
    fn null() -> Self;
    fn bool(value: bool) -> Self;
    fn integer(value: i64) -> Self;
    fn string(value: &str) -> Self;
    fn bytes(value: &[u8]) -> Self;
    fn link(cid: Cid) -> Self;
    fn array(items: Vec<Self>) -> Self;
    fn map_builder(capacity: usize) -> Self::MapBuilder;
    fn map_insert(builder: &mut Self::MapBuilder, key: &str, value: Self);
    fn map(builder: Self::MapBuilder) -> Self;
}

impl Build for Value {
    type MapBuilder = Map;

    fn null() -> Value {
        Value::Null
    }

    fn bool(value: bool) -> Value {
        Value::Bool(value)
    }

    fn integer(value: i64) -> Value {
        Value::Integer(value)
    }

    fn string(value: &str) -> Value {
        Value::String(value.to_owned())
    }

    fn bytes(value: &[u8]) -> Value {
        Value::Bytes(value.to_vec())
    }

    fn link(cid: Cid) -> Value {
        Value::Link(cid)
    }

    fn array(items: Vec<Value>) -> Value {
        Value::Array(items)
    }

    fn map_builder(_capacity: usize) -> Map {
        Map::new()
    }

    fn map_insert(builder: &mut Map, key: &str, value: Value) {
        builder.insert(key.to_owned(), value);
    }

    fn map(builder: Map) -> Value {
        Value::Map(builder)
    }
}

impl Build for serde_json::Value {
    /// Entries arrive in DRISL order; they are sorted bytewise before becoming an object, so
    /// the output is the same whether or not serde_json preserves insertion order.
    type MapBuilder = Vec<(String, serde_json::Value)>;

    fn null() -> serde_json::Value {
        serde_json::Value::Null
    }

    fn bool(value: bool) -> serde_json::Value {
        serde_json::Value::Bool(value)
    }

    fn integer(value: i64) -> serde_json::Value {
        serde_json::Value::from(value)
    }

    fn string(value: &str) -> serde_json::Value {
        serde_json::Value::String(value.to_owned())
    }

    fn bytes(value: &[u8]) -> serde_json::Value {
        bytes_json(value)
    }

    fn link(cid: Cid) -> serde_json::Value {
        link_json(&cid)
    }

    fn array(items: Vec<serde_json::Value>) -> serde_json::Value {
        serde_json::Value::Array(items)
    }

    fn map_builder(capacity: usize) -> Self::MapBuilder {
        Vec::with_capacity(capacity)
    }

    fn map_insert(builder: &mut Self::MapBuilder, key: &str, value: serde_json::Value) {
        builder.push((key.to_owned(), value));
    }

    fn map(mut builder: Self::MapBuilder) -> serde_json::Value {
        // Keys are unique (the decoder rejects repeats), so an unstable sort is exact.
        builder.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
        serde_json::Value::Object(builder.into_iter().collect())
    }
}

/// CBOR simple values the data model allows.
const SIMPLE_FALSE: u64 = 20;
const SIMPLE_TRUE: u64 = 21;
const SIMPLE_NULL: u64 = 22;

/// Decodes one item at nesting `depth` (0 for the top level).
fn decode_item<B: Build>(decoder: &mut Decoder<'_>, depth: usize) -> Result<B, DecodeError> {
    match decoder.peek_major()? {
        cbor::MAJOR_UINT | cbor::MAJOR_NINT => decoder.i64().map(B::integer),
        cbor::MAJOR_BYTES => decoder.bytes().map(B::bytes),
        cbor::MAJOR_TEXT => decoder.text().map(B::string),
        cbor::MAJOR_ARRAY => {
            check_decode_depth(decoder, depth)?;
            let len = decoder.array_len()?;
            let mut items = Vec::with_capacity(len.min(MAX_PREALLOCATED));
            for _ in 0..len {
                items.push(decode_item(decoder, depth + 1)?);
            }
            Ok(B::array(items))
        }
        cbor::MAJOR_MAP => {
            check_decode_depth(decoder, depth)?;
            let len = decoder.map_len()?;
            let mut builder = B::map_builder(len.min(MAX_PREALLOCATED));
            let mut previous = None;
            for _ in 0..len {
                let key = decoder.ordered_key(previous)?;
                let value = decode_item(decoder, depth + 1)?;
                B::map_insert(&mut builder, key, value);
                previous = Some(key);
            }
            Ok(B::map(builder))
        }
        cbor::MAJOR_TAG => {
            let head = decoder.head()?;
            decoder.link_body(head).map(B::link)
        }
        _ => {
            // `head` rejects floats (additional information 25–27) itself.
            let head = decoder.head()?;
            match head.arg {
                SIMPLE_FALSE => Ok(B::bool(false)),
                SIMPLE_TRUE => Ok(B::bool(true)),
                SIMPLE_NULL => Ok(B::null()),
                value => Err(DecodeError::Simple {
                    value,
                    offset: head.offset,
                }),
            }
        }
    }
}

/// A container at `depth` would be one level too deep; same rule as [`cbor::validate`].
fn check_decode_depth(decoder: &Decoder<'_>, depth: usize) -> Result<(), DecodeError> {
    if depth >= cbor::MAX_DEPTH {
        return Err(DecodeError::Limit {
            what: "nesting depth",
            limit: cbor::MAX_DEPTH as u64,
            offset: decoder.position(),
        });
    }
    Ok(())
}

/// One step of a path into a value.
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// Renders a path as a JSON Pointer (RFC 6901); only called when reporting an error.
fn pointer(path: &[Segment<'_>]) -> String {
    let mut out = String::new();
    for segment in path {
        out.push('/');
        match segment {
            Segment::Key(key) => {
                for c in key.chars() {
                    match c {
                        '~' => out.push_str("~0"),
                        '/' => out.push_str("~1"),
                        c => out.push(c),
                    }
                }
            }
            Segment::Index(index) => out.push_str(&index.to_string()),
        }
    }
    out
}

/// Checks the nesting and length limits for a container at `depth` holding `len` items.
fn check_container(path: &[Segment<'_>], depth: usize, len: usize) -> Result<(), ValueError> {
    if depth >= cbor::MAX_DEPTH {
        return Err(ValueError::Limit {
            path: pointer(path),
            what: "nesting depth",
            limit: cbor::MAX_DEPTH as u64,
            found: depth as u64 + 1,
        });
    }
    if len as u64 > cbor::MAX_CONTAINER_LEN {
        return Err(ValueError::Limit {
            path: pointer(path),
            what: "container length",
            limit: cbor::MAX_CONTAINER_LEN,
            found: len as u64,
        });
    }
    Ok(())
}

/// Checks the length of a key of the map at `path` (the path stops at the map, so that an
/// 8 KiB key is not repeated in the message).
fn check_key(path: &[Segment<'_>], key: &str) -> Result<(), ValueError> {
    if key.len() as u64 > cbor::MAX_KEY_LEN {
        return Err(ValueError::Limit {
            path: pointer(path),
            what: "map key length",
            limit: cbor::MAX_KEY_LEN,
            found: key.len() as u64,
        });
    }
    Ok(())
}

fn from_json_at<'a>(
    json: &'a serde_json::Value,
    path: &mut Vec<Segment<'a>>,
    depth: usize,
) -> Result<Value, ValueError> {
    match json {
        serde_json::Value::Null => Ok(Value::Null),
        serde_json::Value::Bool(value) => Ok(Value::Bool(*value)),
        serde_json::Value::Number(number) => number_from_json(number, path).map(Value::Integer),
        serde_json::Value::String(text) => Ok(Value::String(text.clone())),
        serde_json::Value::Array(items) => {
            check_container(path, depth, items.len())?;
            let mut values = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                path.push(Segment::Index(index));
                values.push(from_json_at(item, path, depth + 1)?);
                path.pop();
            }
            Ok(Value::Array(values))
        }
        serde_json::Value::Object(object) => {
            if let Some(link) = object.get(LINK_KEY) {
                return link_from_json(object, link, path).map(Value::Link);
            }
            if let Some(bytes) = object.get(BYTES_KEY) {
                return bytes_from_json(object, bytes, path).map(Value::Bytes);
            }
            check_container(path, depth, object.len())?;
            let mut map = Map::new();
            for (key, item) in object {
                check_key(path, key)?;
                path.push(Segment::Key(key));
                let value = from_json_at(item, path, depth + 1)?;
                path.pop();
                map.insert(key.clone(), value);
            }
            Ok(Value::Map(map))
        }
    }
}

fn number_from_json(number: &serde_json::Number, path: &[Segment<'_>]) -> Result<i64, ValueError> {
    if let Some(value) = number.as_i64() {
        return Ok(value);
    }
    if number.is_u64() {
        return Err(ValueError::IntegerRange {
            path: pointer(path),
            found: number.to_string(),
        });
    }
    let float = number.as_f64().unwrap_or(f64::NAN);
    if float.fract() != 0.0 || !float.is_finite() {
        return Err(ValueError::Float {
            path: pointer(path),
            found: number.to_string(),
        });
    }
    // -2^63 and 2^63 are exact in f64; every integral float in [-2^63, 2^63) is an i64.
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    if (-TWO_POW_63..TWO_POW_63).contains(&float) {
        Ok(float as i64)
    } else {
        Err(ValueError::IntegerRange {
            path: pointer(path),
            found: number.to_string(),
        })
    }
}

fn link_from_json(
    object: &serde_json::Map<String, serde_json::Value>,
    link: &serde_json::Value,
    path: &[Segment<'_>],
) -> Result<Cid, ValueError> {
    if object.len() != 1 {
        return Err(ValueError::LinkShape {
            path: pointer(path),
            problem: "must have no other fields",
        });
    }
    let text = link.as_str().ok_or_else(|| ValueError::LinkShape {
        path: pointer(path),
        problem: "must hold a string",
    })?;
    text.parse().map_err(|source| ValueError::LinkCid {
        path: pointer(path),
        found: text.to_owned(),
        source,
    })
}

fn bytes_from_json(
    object: &serde_json::Map<String, serde_json::Value>,
    bytes: &serde_json::Value,
    path: &[Segment<'_>],
) -> Result<Vec<u8>, ValueError> {
    if object.len() != 1 {
        return Err(ValueError::BytesShape {
            path: pointer(path),
            problem: "must have no other fields",
        });
    }
    let text = bytes.as_str().ok_or_else(|| ValueError::BytesShape {
        path: pointer(path),
        problem: "must hold a string",
    })?;
    BYTES_INPUT
        .decode(text)
        .map_err(|source| ValueError::BytesBase64 {
            path: pointer(path),
            source,
        })
}

/// The fields of a blob object.
const BLOB_FIELDS: [&str; 4] = [TYPE_KEY, "ref", "mimeType", "size"];

fn check_shapes<'a>(
    value: &'a Value,
    path: &mut Vec<Segment<'a>>,
    depth: usize,
) -> Result<(), ValueError> {
    match value {
        Value::Array(items) => {
            check_container(path, depth, items.len())?;
            for (index, item) in items.iter().enumerate() {
                path.push(Segment::Index(index));
                check_shapes(item, path, depth + 1)?;
                path.pop();
            }
            Ok(())
        }
        Value::Map(map) => {
            check_container(path, depth, map.len())?;
            check_map_shape(map, path)?;
            for (key, item) in map {
                check_key(path, key)?;
                path.push(Segment::Key(key));
                check_shapes(item, path, depth + 1)?;
                path.pop();
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The rules for one map: reserved keys, `$type`, blobs and legacy blobs.
fn check_map_shape(map: &Map, path: &[Segment<'_>]) -> Result<(), ValueError> {
    for key in [LINK_KEY, BYTES_KEY] {
        if map.contains_key(key) {
            return Err(ValueError::ReservedKey {
                path: pointer(path),
                key,
            });
        }
    }
    if let Some(type_value) = map.get(TYPE_KEY) {
        match type_value {
            Value::String(name) if name == "blob" => return check_blob(map, path),
            Value::String(name) if !name.is_empty() => {}
            Value::String(_) => {
                return Err(ValueError::TypeField {
                    path: pointer(path),
                    found: "an empty string",
                });
            }
            other => {
                return Err(ValueError::TypeField {
                    path: pointer(path),
                    found: other.type_name(),
                });
            }
        }
    }
    if map.len() == 2 && map.contains_key("cid") && map.contains_key("mimeType") {
        for field in ["cid", "mimeType"] {
            if !matches!(map.get(field), Some(Value::String(_))) {
                return Err(blob_error(path, field, "must be a string (legacy blob)"));
            }
        }
    }
    Ok(())
}

fn check_blob(map: &Map, path: &[Segment<'_>]) -> Result<(), ValueError> {
    if let Some(extra) = map.keys().find(|key| !BLOB_FIELDS.contains(&key.as_str())) {
        return Err(blob_error(
            path,
            extra,
            "is not allowed (a blob has only $type, ref, mimeType and size)",
        ));
    }
    match map.get("ref") {
        Some(Value::Link(_)) => {}
        Some(_) => return Err(blob_error(path, "ref", "must be a link")),
        None => return Err(blob_error(path, "ref", "is missing")),
    }
    match map.get("mimeType") {
        Some(Value::String(_)) => {}
        Some(_) => return Err(blob_error(path, "mimeType", "must be a string")),
        None => return Err(blob_error(path, "mimeType", "is missing")),
    }
    match map.get("size") {
        Some(Value::Integer(size)) if *size >= 0 => Ok(()),
        Some(_) => Err(blob_error(path, "size", "must be a non-negative integer")),
        None => Err(blob_error(path, "size", "is missing")),
    }
}

fn blob_error(path: &[Segment<'_>], field: &str, problem: &'static str) -> ValueError {
    ValueError::Blob {
        path: pointer(path),
        field: field.to_owned(),
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_entries_are_length_first() {
        let map: Map = ["bb", "a", "ab", "b", "aaa", ""]
            .into_iter()
            .map(|key| (key.to_owned(), Value::Null))
            .collect();
        let keys: Vec<&str> = canonical_entries(&map)
            .into_iter()
            .map(|(key, _)| key.as_str())
            .collect();
        assert_eq!(keys, ["", "a", "b", "ab", "bb", "aaa"]);
        assert!(keys.windows(2).all(|pair| cbor::key_less(pair[0], pair[1])));
    }

    #[test]
    fn pointer_escapes() {
        let path = [Segment::Key("a/b"), Segment::Index(3), Segment::Key("~x")];
        assert_eq!(pointer(&path), "/a~1b/3/~0x");
    }
}
