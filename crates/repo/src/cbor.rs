//! DRISL (deterministic DAG-CBOR) primitives: a strict head-level decoder and an encoder.
//!
//! Both the generic data model ([`crate::value`]) and the hand-written hot-path decoders for
//! MST nodes and commits are built on [`Decoder`]. It rejects everything DRISL forbids at the
//! lowest level: indefinite lengths, non-minimal integer heads, floats in places they are not
//! allowed, tags other than 42, and lengths that run past the end of the input. A length read
//! from the input is never used to allocate before the bytes it promises have been seen.

use crate::cid::{Cid, CidError};

/// Maximum nesting of arrays and maps (atproto data-validation guide).
pub const MAX_DEPTH: usize = 32;
/// Maximum elements in one array or map (atproto data-validation guide).
pub const MAX_CONTAINER_LEN: u64 = 131_072;
/// Maximum length of one map key in bytes (atproto data-validation guide).
pub const MAX_KEY_LEN: u64 = 8192;

/// CBOR major types.
pub(crate) const MAJOR_UINT: u8 = 0;
pub(crate) const MAJOR_NINT: u8 = 1;
pub(crate) const MAJOR_BYTES: u8 = 2;
pub(crate) const MAJOR_TEXT: u8 = 3;
pub(crate) const MAJOR_ARRAY: u8 = 4;
pub(crate) const MAJOR_MAP: u8 = 5;
pub(crate) const MAJOR_TAG: u8 = 6;
pub(crate) const MAJOR_SIMPLE: u8 = 7;

const SIMPLE_FALSE: u64 = 20;
const SIMPLE_TRUE: u64 = 21;
const SIMPLE_NULL: u64 = 22;
const TAG_CID: u64 = 42;

/// Why bytes are not valid DRISL. Offsets are from the start of the decoded buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside an item.
    #[error("truncated at byte {offset}")]
    Truncated {
        /// Where more bytes were needed.
        offset: usize,
    },
    /// An integer or length used more bytes than needed.
    #[error("non-minimal integer encoding at byte {offset}")]
    NonMinimal {
        /// Where the head starts.
        offset: usize,
    },
    /// Indefinite-length items are not DRISL.
    #[error("indefinite-length item at byte {offset}")]
    Indefinite {
        /// Where the head starts.
        offset: usize,
    },
    /// A head with a reserved additional-information value (28–30).
    #[error("reserved additional information at byte {offset}")]
    Reserved {
        /// Where the head starts.
        offset: usize,
    },
    /// An item of one type stood where another was required.
    #[error("expected {expected} at byte {offset}, found {found}")]
    Unexpected {
        /// What the schema required.
        expected: &'static str,
        /// What the input held.
        found: &'static str,
        /// Where the item starts.
        offset: usize,
    },
    /// Floats are not part of the atproto data model.
    #[error("float at byte {offset} (floats are not allowed)")]
    Float {
        /// Where the item starts.
        offset: usize,
    },
    /// Simple values other than true, false and null.
    #[error("unsupported simple value {value} at byte {offset}")]
    Simple {
        /// The simple value.
        value: u64,
        /// Where the item starts.
        offset: usize,
    },
    /// Only tag 42 (CID link) is allowed.
    #[error("unsupported tag {tag} at byte {offset}")]
    Tag {
        /// The tag number found.
        tag: u64,
        /// Where the tag starts.
        offset: usize,
    },
    /// A tag-42 link whose bytes are not a supported CID.
    #[error("bad CID link at byte {offset}: {source}")]
    Link {
        /// Where the link's bytes start.
        offset: usize,
        /// What is wrong with the CID.
        source: CidError,
    },
    /// Text that is not UTF-8.
    #[error("invalid UTF-8 in text at byte {offset}")]
    Utf8 {
        /// Where the text starts.
        offset: usize,
    },
    /// Map keys must be text strings.
    #[error("map key at byte {offset} is not a text string")]
    KeyType {
        /// Where the key starts.
        offset: usize,
    },
    /// Map keys must be sorted length-first then bytewise, without repeats.
    #[error("map key {key:?} at byte {offset} is out of canonical order or repeated")]
    KeyOrder {
        /// The offending key.
        key: String,
        /// Where the key starts.
        offset: usize,
    },
    /// Integers must fit in i64 (atproto recommends ±2^53).
    #[error("integer out of range at byte {offset}")]
    IntRange {
        /// Where the integer starts.
        offset: usize,
    },
    /// A nesting, size or count limit.
    #[error("{what} limit {limit} exceeded at byte {offset}")]
    Limit {
        /// Which limit.
        what: &'static str,
        /// The limit's value.
        limit: u64,
        /// Where it was exceeded.
        offset: usize,
    },
    /// Bytes remained after the top-level item.
    #[error("{count} trailing bytes after the item at byte {offset}")]
    Trailing {
        /// How many bytes remained.
        count: usize,
        /// Where they start.
        offset: usize,
    },
    /// A map lacked a field the schema requires.
    #[error("missing field {field:?} in map at byte {offset}")]
    MissingField {
        /// The field's name.
        field: &'static str,
        /// Where the map starts.
        offset: usize,
    },
    /// A map had a field the schema does not allow.
    #[error("unexpected field {field:?} at byte {offset}")]
    UnknownField {
        /// The field's name.
        field: String,
        /// Where the key starts.
        offset: usize,
    },
}

/// The name of a major type, for error messages.
pub(crate) fn major_name(major: u8) -> &'static str {
    match major {
        MAJOR_UINT => "unsigned integer",
        MAJOR_NINT => "negative integer",
        MAJOR_BYTES => "byte string",
        MAJOR_TEXT => "text string",
        MAJOR_ARRAY => "array",
        MAJOR_MAP => "map",
        MAJOR_TAG => "tag",
        _ => "simple value",
    }
}

/// A strict pull decoder over one buffer.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A decoded item head: the major type and its argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) major: u8,
    pub(crate) arg: u64,
    pub(crate) offset: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder positioned at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Decoder<'a> {
        Decoder { buf, pos: 0 }
    }

    /// The current byte offset.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless every byte has been consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::Trailing {
                count,
                offset: self.pos,
            }),
        }
    }

    /// The major type of the next item, without consuming it.
    pub(crate) fn peek_major(&self) -> Result<u8, DecodeError> {
        self.buf
            .get(self.pos)
            .map(|byte| byte >> 5)
            .ok_or(DecodeError::Truncated { offset: self.pos })
    }

    /// Consumes `expected` if the input continues with exactly those bytes.
    pub(crate) fn eat(&mut self, expected: &[u8]) -> bool {
        let end = self.pos + expected.len();
        if self.buf.get(self.pos..end) == Some(expected) {
            self.pos = end;
            true
        } else {
            false
        }
    }

    /// Whether the next item is `null`.
    pub(crate) fn peek_null(&self) -> bool {
        self.buf.get(self.pos) == Some(&0xf6)
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.buf.len())
            .ok_or(DecodeError::Truncated {
                offset: self.buf.len(),
            })?;
        let slice = &self.buf[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    /// Reads one head, enforcing minimal encoding and definite lengths.
    pub(crate) fn head(&mut self) -> Result<Head, DecodeError> {
        let offset = self.pos;
        let initial = *self
            .buf
            .get(self.pos)
            .ok_or(DecodeError::Truncated { offset })?;
        self.pos += 1;
        let major = initial >> 5;
        let info = initial & 0x1f;
        let arg = match info {
            0..=23 => u64::from(info),
            24 => {
                let value = u64::from(self.take(1)?[0]);
                // Simple values 24..=31 in one byte are reserved; < 24 must use the short form.
                if value < 24 {
                    return Err(DecodeError::NonMinimal { offset });
                }
                value
            }
            25 => {
                let bytes = self.take(2)?;
                let value = u64::from(u16::from_be_bytes([bytes[0], bytes[1]]));
                if major != MAJOR_SIMPLE && value <= 0xff {
                    return Err(DecodeError::NonMinimal { offset });
                }
                value
            }
            26 => {
                let bytes = self.take(4)?;
                let value = u64::from(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
                if major != MAJOR_SIMPLE && value <= 0xffff {
                    return Err(DecodeError::NonMinimal { offset });
                }
                value
            }
            27 => {
                let bytes = self.take(8)?;
                let mut word = [0u8; 8];
                word.copy_from_slice(bytes);
                let value = u64::from_be_bytes(word);
                if major != MAJOR_SIMPLE && value <= 0xffff_ffff {
                    return Err(DecodeError::NonMinimal { offset });
                }
                value
            }
            28..=30 => return Err(DecodeError::Reserved { offset }),
            _ => return Err(DecodeError::Indefinite { offset }),
        };
        if major == MAJOR_SIMPLE && info >= 25 {
            return Err(DecodeError::Float { offset });
        }
        Ok(Head { major, arg, offset })
    }

    fn expect_head(&mut self, major: u8, expected: &'static str) -> Result<Head, DecodeError> {
        let head = self.head()?;
        if head.major != major {
            return Err(DecodeError::Unexpected {
                expected,
                found: major_name(head.major),
                offset: head.offset,
            });
        }
        Ok(head)
    }

    /// A length argument as `usize`, checked against the bytes actually left.
    fn len_within_input(&self, head: Head) -> Result<usize, DecodeError> {
        usize::try_from(head.arg)
            .ok()
            .filter(|&len| len <= self.remaining())
            .ok_or(DecodeError::Truncated {
                offset: self.buf.len(),
            })
    }

    /// An unsigned integer.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(self.expect_head(MAJOR_UINT, "unsigned integer")?.arg)
    }

    /// A signed integer within i64.
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        let head = self.head()?;
        let range = DecodeError::IntRange {
            offset: head.offset,
        };
        match head.major {
            MAJOR_UINT => i64::try_from(head.arg).map_err(|_| range),
            MAJOR_NINT => i64::try_from(head.arg).map(|n| -1 - n).map_err(|_| range),
            other => Err(DecodeError::Unexpected {
                expected: "integer",
                found: major_name(other),
                offset: head.offset,
            }),
        }
    }

    /// A byte string, borrowed.
    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let head = self.expect_head(MAJOR_BYTES, "byte string")?;
        let len = self.len_within_input(head)?;
        self.take(len)
    }

    /// A text string, borrowed and checked as UTF-8.
    pub fn text(&mut self) -> Result<&'a str, DecodeError> {
        let head = self.expect_head(MAJOR_TEXT, "text string")?;
        self.text_body(head)
    }

    fn text_body(&mut self, head: Head) -> Result<&'a str, DecodeError> {
        let len = self.len_within_input(head)?;
        let bytes = self.take(len)?;
        simdutf8::basic::from_utf8(bytes).map_err(|_| DecodeError::Utf8 {
            offset: head.offset,
        })
    }

    /// A map key: a text string, at most [`MAX_KEY_LEN`] bytes.
    pub(crate) fn key(&mut self) -> Result<&'a str, DecodeError> {
        let head = self.key_head()?;
        self.text_body(head)
    }

    /// The head of a map key: text, at most [`MAX_KEY_LEN`] bytes.
    fn key_head(&mut self) -> Result<Head, DecodeError> {
        let head = self.head()?;
        if head.major != MAJOR_TEXT {
            return Err(DecodeError::KeyType {
                offset: head.offset,
            });
        }
        if head.arg > MAX_KEY_LEN {
            return Err(DecodeError::Limit {
                what: "map key length",
                limit: MAX_KEY_LEN,
                offset: head.offset,
            });
        }
        Ok(head)
    }

    /// An array header; the count is bounded by the container limit and by the input left
    /// (every element takes at least one byte).
    pub fn array_len(&mut self) -> Result<usize, DecodeError> {
        let head = self.expect_head(MAJOR_ARRAY, "array")?;
        self.container_len(head, 1)
    }

    /// A map header; bounded like [`Decoder::array_len`] (every entry takes at least two bytes).
    pub fn map_len(&mut self) -> Result<usize, DecodeError> {
        let head = self.expect_head(MAJOR_MAP, "map")?;
        self.container_len(head, 2)
    }

    pub(crate) fn container_len(&self, head: Head, min_item: u64) -> Result<usize, DecodeError> {
        if head.arg > MAX_CONTAINER_LEN {
            return Err(DecodeError::Limit {
                what: "container length",
                limit: MAX_CONTAINER_LEN,
                offset: head.offset,
            });
        }
        if head.arg.saturating_mul(min_item) > self.remaining() as u64 {
            return Err(DecodeError::Truncated {
                offset: self.buf.len(),
            });
        }
        Ok(head.arg as usize)
    }

    /// A boolean.
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        let head = self.expect_head(MAJOR_SIMPLE, "boolean")?;
        match head.arg {
            SIMPLE_FALSE => Ok(false),
            SIMPLE_TRUE => Ok(true),
            _ => Err(DecodeError::Unexpected {
                expected: "boolean",
                found: "simple value",
                offset: head.offset,
            }),
        }
    }

    /// Consumes a `null` if one is next.
    pub fn null(&mut self) -> Result<bool, DecodeError> {
        if self.peek_null() {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// A tag-42 CID link.
    pub fn link(&mut self) -> Result<Cid, DecodeError> {
        let head = self.expect_head(MAJOR_TAG, "CID link")?;
        self.link_body(head)
    }

    /// The body of a tag whose head was already read: must be tag 42 with `0x00 ‖ CID` bytes.
    pub(crate) fn link_body(&mut self, head: Head) -> Result<Cid, DecodeError> {
        if head.arg != TAG_CID {
            return Err(DecodeError::Tag {
                tag: head.arg,
                offset: head.offset,
            });
        }
        let offset = self.pos;
        let bytes = self.bytes()?;
        let link_error = |source| DecodeError::Link { offset, source };
        match bytes.split_first() {
            Some((0, cid)) => Cid::from_bytes(cid).map_err(link_error),
            _ => Err(link_error(CidError::Multibase(
                "link bytes lack the 0x00 multibase prefix".to_owned(),
            ))),
        }
    }

    /// A link or `null`.
    pub fn nullable_link(&mut self) -> Result<Option<Cid>, DecodeError> {
        if self.null()? {
            Ok(None)
        } else {
            self.link().map(Some)
        }
    }

    /// Reads a map key and checks it sorts strictly after `previous` (DRISL key order).
    pub(crate) fn ordered_key(&mut self, previous: Option<&str>) -> Result<&'a str, DecodeError> {
        let offset = self.pos;
        let key = self.key()?;
        if let Some(previous) = previous
            && !key_less(previous, key)
        {
            return Err(DecodeError::KeyOrder {
                key: key.to_owned(),
                offset,
            });
        }
        Ok(key)
    }

    /// [`Decoder::ordered_key`] for validation: the same checks, without making a `&str`.
    fn ordered_key_bytes(&mut self, previous: Option<&[u8]>) -> Result<&'a [u8], DecodeError> {
        let head = self.key_head()?;
        let len = self.len_within_input(head)?;
        let key = self.take(len)?;
        check_utf8(key, head.offset)?;
        if let Some(previous) = previous
            && !key_bytes_less(previous, key)
        {
            return Err(DecodeError::KeyOrder {
                key: String::from_utf8_lossy(key).into_owned(),
                offset: head.offset,
            });
        }
        Ok(key)
    }

    /// Skips one complete item of any type, with the same strictness as decoding it.
    pub(crate) fn skip(&mut self, depth: usize) -> Result<(), DecodeError> {
        let head = self.head()?;
        match head.major {
            MAJOR_UINT | MAJOR_NINT if head.arg > i64::MAX as u64 => Err(DecodeError::IntRange {
                offset: head.offset,
            }),
            MAJOR_UINT | MAJOR_NINT => Ok(()),
            MAJOR_BYTES => {
                let len = self.len_within_input(head)?;
                self.take(len).map(|_| ())
            }
            MAJOR_TEXT => {
                let len = self.len_within_input(head)?;
                let bytes = self.take(len)?;
                check_utf8(bytes, head.offset)
            }
            MAJOR_ARRAY | MAJOR_MAP => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::Limit {
                        what: "nesting depth",
                        limit: MAX_DEPTH as u64,
                        offset: head.offset,
                    });
                }
                if head.major == MAJOR_ARRAY {
                    for _ in 0..self.container_len(head, 1)? {
                        self.skip(depth + 1)?;
                    }
                } else {
                    let mut previous: Option<&[u8]> = None;
                    for _ in 0..self.container_len(head, 2)? {
                        previous = Some(self.ordered_key_bytes(previous)?);
                        self.skip(depth + 1)?;
                    }
                }
                Ok(())
            }
            MAJOR_TAG => self.link_body(head).map(|_| ()),
            _ => match head.arg {
                SIMPLE_FALSE | SIMPLE_TRUE | SIMPLE_NULL => Ok(()),
                value => Err(DecodeError::Simple {
                    value,
                    offset: head.offset,
                }),
            },
        }
    }
}

/// [`is_utf8`], as the decoder's error.
fn check_utf8(bytes: &[u8], offset: usize) -> Result<(), DecodeError> {
    if is_utf8(bytes) {
        Ok(())
    } else {
        Err(DecodeError::Utf8 { offset })
    }
}

/// DRISL map key order: shorter keys first, then bytewise.
pub fn key_less(a: &str, b: &str) -> bool {
    key_bytes_less(a.as_bytes(), b.as_bytes())
}

/// [`key_less`] on bytes. Keys of different lengths (most pairs) are decided by the lengths
/// alone, without comparing bytes.
fn key_bytes_less(a: &[u8], b: &[u8]) -> bool {
    match a.len().cmp(&b.len()) {
        std::cmp::Ordering::Less => true,
        std::cmp::Ordering::Greater => false,
        std::cmp::Ordering::Equal => a < b,
    }
}

/// Checks that `bytes` is exactly one well-formed DRISL item within every limit.
pub fn validate(bytes: &[u8]) -> Result<(), DecodeError> {
    // Every record of every repository passes here, and nearly all are valid: the lean scan
    // answers for those, and the decoder, which says what is wrong and where, reads the rest.
    if is_valid(bytes) {
        return Ok(());
    }
    let mut decoder = Decoder::new(bytes);
    decoder.skip(0)?;
    decoder.finish()
}

/// Whether [`validate`] accepts `bytes`, by exactly [`Decoder::skip`]'s rules, without
/// building an error: no recursion, no `Result` to carry, one pass with a stack of the
/// containers open (at most [`MAX_DEPTH`]). A differential test holds the two to the same
/// verdict on every input it generates.
fn is_valid(bytes: &[u8]) -> bool {
    // Items left in each open container (a map counts keys and values), the top level first.
    let mut left = [0u32; MAX_DEPTH + 1];
    let mut is_map = [false; MAX_DEPTH + 1];
    // Each open map's last key, to check the next sorts after it.
    let mut last_key: [Option<&[u8]>; MAX_DEPTH + 1] = [None; MAX_DEPTH + 1];
    let mut level = 0;
    left[0] = 1;
    let mut pos = 0;
    loop {
        while left[level] == 0 {
            if level == 0 {
                return pos == bytes.len();
            }
            level -= 1;
        }
        left[level] -= 1;
        let Some((major, arg)) = scan_head(bytes, &mut pos) else {
            return false;
        };
        let remaining = (bytes.len() - pos) as u64;
        if is_map[level] && left[level] % 2 == 1 {
            // A key: text within the key limit, UTF-8, after the map's last key.
            if major != MAJOR_TEXT || arg > MAX_KEY_LEN || arg > remaining {
                return false;
            }
            let key = &bytes[pos..pos + arg as usize];
            pos += arg as usize;
            if !is_utf8(key) || last_key[level].is_some_and(|last| !key_bytes_less(last, key)) {
                return false;
            }
            last_key[level] = Some(key);
            continue;
        }
        match major {
            MAJOR_UINT | MAJOR_NINT => {
                if arg > i64::MAX as u64 {
                    return false;
                }
            }
            MAJOR_BYTES | MAJOR_TEXT => {
                if arg > remaining {
                    return false;
                }
                let end = pos + arg as usize;
                if major == MAJOR_TEXT && !is_utf8(&bytes[pos..end]) {
                    return false;
                }
                pos = end;
            }
            MAJOR_ARRAY | MAJOR_MAP => {
                let per_item = if major == MAJOR_MAP { 2 } else { 1 };
                if level >= MAX_DEPTH || arg > MAX_CONTAINER_LEN || arg * per_item > remaining {
                    return false;
                }
                level += 1;
                left[level] = (arg * per_item) as u32;
                is_map[level] = major == MAJOR_MAP;
                last_key[level] = None;
            }
            MAJOR_TAG => {
                // A link: tag 42 on a byte string of 0x00 and a supported CID.
                if arg != TAG_CID {
                    return false;
                }
                let Some((MAJOR_BYTES, len)) = scan_head(bytes, &mut pos) else {
                    return false;
                };
                if len > (bytes.len() - pos) as u64 {
                    return false;
                }
                let link = &bytes[pos..pos + len as usize];
                pos += len as usize;
                match link.split_first() {
                    Some((0, cid)) if Cid::from_bytes(cid).is_ok() => {}
                    _ => return false,
                }
            }
            _ => {
                if !matches!(arg, SIMPLE_FALSE | SIMPLE_TRUE | SIMPLE_NULL) {
                    return false;
                }
            }
        }
    }
}

/// One head at `pos` by [`Decoder::head`]'s rules (minimal, definite, no floats), which
/// `pos` moves past; `None` where `head` would fail.
#[inline(always)]
fn scan_head(bytes: &[u8], pos: &mut usize) -> Option<(u8, u64)> {
    let initial = *bytes.get(*pos)?;
    let (major, info) = (initial >> 5, initial & 0x1f);
    let start = *pos + 1;
    let (arg, len) = match info {
        0..=23 => (u64::from(info), 0),
        24 => {
            let value = u64::from(*bytes.get(start)?);
            if value < 24 {
                return None;
            }
            (value, 1)
        }
        25..=27 => {
            let len = 1 << (info - 24);
            let field = bytes.get(start..start + len)?;
            let mut word = [0u8; 8];
            word[8 - len..].copy_from_slice(field);
            let value = u64::from_be_bytes(word);
            // The smallest value that needs this width; a simple value with one is a float.
            if major == MAJOR_SIMPLE || value >> (4 * len) == 0 {
                return None;
            }
            (value, len)
        }
        _ => return None,
    };
    *pos = start + len;
    Some((major, arg))
}

/// UTF-8 validity: ASCII checked a word at a time, the rest with SIMD (post text in every
/// script is most of a repository's bytes).
fn is_utf8(bytes: &[u8]) -> bool {
    bytes.is_ascii() || simdutf8::basic::from_utf8(bytes).is_ok()
}

/// A canonical DRISL writer. Callers write map keys in [`key_less`] order.
#[derive(Debug, Default, Clone)]
pub struct Encoder {
    out: Vec<u8>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// An encoder with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Encoder {
        Encoder {
            out: Vec::with_capacity(capacity),
        }
    }

    /// An encoder that writes into `out`, after what it holds: lets a caller that encodes
    /// many small values reuse one buffer.
    pub fn from_vec(out: Vec<u8>) -> Encoder {
        Encoder { out }
    }

    /// The encoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.out
    }

    /// The bytes so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.out
    }

    pub(crate) fn head(&mut self, major: u8, arg: u64) {
        let major = major << 5;
        if arg < 24 {
            self.out.push(major | arg as u8);
        } else if arg <= 0xff {
            self.out.extend_from_slice(&[major | 24, arg as u8]);
        } else if arg <= 0xffff {
            self.out.push(major | 25);
            self.out.extend_from_slice(&(arg as u16).to_be_bytes());
        } else if arg <= 0xffff_ffff {
            self.out.push(major | 26);
            self.out.extend_from_slice(&(arg as u32).to_be_bytes());
        } else {
            self.out.push(major | 27);
            self.out.extend_from_slice(&arg.to_be_bytes());
        }
    }

    /// An unsigned integer.
    pub fn u64(&mut self, value: u64) {
        self.head(MAJOR_UINT, value);
    }

    /// A signed integer.
    pub fn i64(&mut self, value: i64) {
        if value >= 0 {
            self.head(MAJOR_UINT, value as u64);
        } else {
            self.head(MAJOR_NINT, (-1 - value) as u64);
        }
    }

    /// A byte string.
    pub fn bytes(&mut self, value: &[u8]) {
        self.head(MAJOR_BYTES, value.len() as u64);
        self.out.extend_from_slice(value);
    }

    /// A text string.
    pub fn text(&mut self, value: &str) {
        self.head(MAJOR_TEXT, value.len() as u64);
        self.out.extend_from_slice(value.as_bytes());
    }

    /// An array header; the caller writes `len` items next.
    pub fn array(&mut self, len: usize) {
        self.head(MAJOR_ARRAY, len as u64);
    }

    /// A map header; the caller writes `len` key/value pairs next, keys in canonical order.
    pub fn map(&mut self, len: usize) {
        self.head(MAJOR_MAP, len as u64);
    }

    /// A boolean.
    pub fn bool(&mut self, value: bool) {
        self.out.push(if value { 0xf5 } else { 0xf4 });
    }

    /// `null`.
    pub fn null(&mut self) {
        self.out.push(0xf6);
    }

    /// A tag-42 CID link.
    pub fn link(&mut self, cid: &Cid) {
        self.head(MAJOR_TAG, TAG_CID);
        self.head(MAJOR_BYTES, cid.encoded_len() as u64 + 1);
        self.out.push(0);
        cid.write_bytes(&mut self.out);
    }

    /// A link, or `null` for `None`.
    pub fn nullable_link(&mut self, cid: Option<&Cid>) {
        match cid {
            Some(cid) => self.link(cid),
            None => self.null(),
        }
    }

    /// Already-encoded DRISL bytes, copied verbatim.
    pub fn raw(&mut self, encoded: &[u8]) {
        self.out.extend_from_slice(encoded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decoder's verdict, which [`is_valid`] must match.
    fn decoder_accepts(bytes: &[u8]) -> bool {
        let mut decoder = Decoder::new(bytes);
        decoder.skip(0).is_ok() && decoder.finish().is_ok()
    }

    /// A deterministic generator (xorshift) for the differential test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A random valid item, nested up to `depth`, with every kind the data model has.
    fn random_item(rng: &mut Rng, out: &mut Encoder, depth: usize) {
        let words = [
            "",
            "a",
            "$type",
            "text",
            "createdAt",
            "é",
            "日本語",
            "\u{1f600}",
            "zz",
        ];
        match rng.below(if depth == 0 { 6 } else { 8 }) {
            0 => out.u64((rng.next() >> 1) >> rng.below(63)),
            1 => out.i64(-((rng.next() >> (1 + rng.below(63))) as i64) - 1),
            2 => out.text(words[rng.below(words.len() as u64) as usize]),
            3 => out.bytes(&rng.next().to_le_bytes()[..rng.below(9) as usize]),
            4 => out.link(&Cid::dag_cbor(&rng.next().to_le_bytes())),
            5 => match rng.below(3) {
                0 => out.bool(true),
                1 => out.bool(false),
                _ => out.null(),
            },
            6 => {
                let len = rng.below(4) as usize;
                out.array(len);
                for _ in 0..len {
                    random_item(rng, out, depth - 1);
                }
            }
            _ => {
                let mut keys: Vec<&str> = words.to_vec();
                keys.retain(|_| rng.below(2) == 0);
                keys.sort_by(|a, b| {
                    if key_less(a, b) {
                        std::cmp::Ordering::Less
                    } else {
                        std::cmp::Ordering::Greater
                    }
                });
                out.map(keys.len());
                for key in keys {
                    out.text(key);
                    random_item(rng, out, depth - 1);
                }
            }
        }
    }

    /// The lean scan and the decoder agree on every input: all one- and two-byte inputs,
    /// random valid items, and each of those with a byte changed, inserted, removed or cut.
    #[test]
    fn the_scan_and_the_decoder_agree() {
        let mut checked = 0;
        let mut agree = |bytes: &[u8]| {
            assert_eq!(
                is_valid(bytes),
                decoder_accepts(bytes),
                "verdicts differ on {bytes:02x?}"
            );
            checked += 1;
        };
        agree(&[]);
        for first in 0..=255u8 {
            agree(&[first]);
            for second in 0..=255u8 {
                agree(&[first, second]);
            }
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for _ in 0..3000 {
            let mut out = Encoder::new();
            random_item(&mut rng, &mut out, 4);
            let item = out.into_bytes();
            let mut decoder = Decoder::new(&item);
            let verdict = decoder.skip(0).and_then(|()| decoder.finish());
            assert_eq!(
                verdict,
                Ok(()),
                "the generator wrote an invalid item: {item:02x?}"
            );
            assert!(is_valid(&item), "a valid item was refused: {item:02x?}");
            accepted += 1;
            for _ in 0..8 {
                let mut changed = item.clone();
                let at = rng.below(changed.len() as u64 + 1) as usize;
                let byte = rng.next() as u8;
                match rng.below(4) {
                    0 if at < changed.len() => changed[at] = byte,
                    1 => changed.insert(at, byte),
                    2 if at < changed.len() => {
                        changed.remove(at);
                    }
                    _ => changed.truncate(at),
                }
                agree(&changed);
            }
        }
        // Nesting at and past the depth limit, and containers longer than their input.
        for depth in [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1] {
            let mut nested = vec![0x81; depth];
            nested.push(0x80);
            agree(&nested);
        }
        agree(&[0x9a, 0x00, 0x02, 0x00, 0x01, 0x00]);
        agree(&[0xba, 0x00, 0x02, 0x00, 0x01, 0x00]);
        assert!(accepted == 3000 && checked > 65_000 + 3000 * 8);
    }

    #[test]
    fn rejects_non_minimal_heads() {
        assert_eq!(
            Decoder::new(&[0x18, 0x05]).u64(),
            Err(DecodeError::NonMinimal { offset: 0 })
        );
        assert_eq!(
            Decoder::new(&[0x19, 0x00, 0xff]).u64(),
            Err(DecodeError::NonMinimal { offset: 0 })
        );
        assert_eq!(Decoder::new(&[0x18, 0x18]).u64(), Ok(24));
    }

    #[test]
    fn rejects_indefinite_and_floats() {
        assert_eq!(
            validate(&[0x9f, 0xff]),
            Err(DecodeError::Indefinite { offset: 0 })
        );
        assert_eq!(
            validate(&[0xfb, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::Float { offset: 0 })
        );
    }

    #[test]
    fn huge_lengths_do_not_allocate() {
        // A byte string claiming 2^63 bytes, and an array claiming 100k items, in 9 bytes.
        let bytes = [0x5b, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            validate(&bytes),
            Err(DecodeError::Truncated { .. })
        ));
        let array = [0x9a, 0x00, 0x01, 0x86, 0xa0];
        assert!(matches!(
            validate(&array),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn validate_agrees_with_the_data_model_on_integer_range() {
        // Fuzzing finding: 2^63 and -2^63-1 passed validate but not Value::from_cbor.
        for bytes in [
            &[0x1b, 0x80, 0, 0, 0, 0, 0, 0, 0][..],
            &[0x3b, 0x80, 0, 0, 0, 0, 0, 0, 0],
        ] {
            assert!(matches!(validate(bytes), Err(DecodeError::IntRange { .. })));
        }
        assert_eq!(
            validate(&[0x1b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Ok(())
        );
    }

    #[test]
    fn depth_limit() {
        let mut bytes = vec![0x81; 40];
        bytes.push(0x00);
        assert!(matches!(
            validate(&bytes),
            Err(DecodeError::Limit {
                what: "nesting depth",
                ..
            })
        ));
    }

    #[test]
    fn map_key_order() {
        let mut encoder = Encoder::new();
        encoder.map(2);
        encoder.text("bb");
        encoder.u64(1);
        encoder.text("a");
        encoder.u64(2);
        assert!(matches!(
            validate(encoder.as_bytes()),
            Err(DecodeError::KeyOrder { .. })
        ));
    }

    #[test]
    fn link_round_trip() -> Result<(), DecodeError> {
        let cid = Cid::dag_cbor(b"hello");
        let mut encoder = Encoder::new();
        encoder.link(&cid);
        let bytes = encoder.into_bytes();
        let mut decoder = Decoder::new(&bytes);
        assert_eq!(decoder.link()?, cid);
        decoder.finish()
    }

    #[test]
    fn integers_round_trip() -> Result<(), DecodeError> {
        for value in [
            0,
            1,
            23,
            24,
            255,
            256,
            65535,
            65536,
            -1,
            -24,
            -25,
            -256,
            -257,
            i64::MIN,
            i64::MAX,
        ] {
            let mut encoder = Encoder::new();
            encoder.i64(value);
            let bytes = encoder.into_bytes();
            let mut decoder = Decoder::new(&bytes);
            assert_eq!(decoder.i64()?, value);
            decoder.finish()?;
        }
        Ok(())
    }
}
