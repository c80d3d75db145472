//! Content identifiers: CIDv1 with a sha2-256 multihash, the only kind atproto hashes.

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::str::FromStr;

use crate::multiformats::{base32_decode, base32_encode, read_uvarint, uvarint_len, write_uvarint};

/// Multicodec code of DAG-CBOR (DRISL): records, MST nodes and commits.
pub const DAG_CBOR: u64 = 0x71;
/// Multicodec code of raw bytes: blobs.
pub const RAW: u64 = 0x55;
const SHA2_256: u8 = 0x12;
const CID_V1: u8 = 0x01;

/// Longest binary CID accepted: version, a codec varint of up to 9 bytes, hash code, length, digest.
pub const MAX_CID_BYTES: usize = 1 + 9 + 1 + 1 + 32;

/// A CIDv1 whose multihash is sha2-256.
///
/// The codec is kept as received (records may be linked with any codec); the digest is what
/// identity and hashing use. CIDv0 and other hash functions are rejected at parse time, because
/// atpdb could not check such a block's bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cid {
    codec: u64,
    digest: [u8; 32],
}

/// Why bytes or a string are not a CID atpdb accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CidError {
    /// The input ended inside the CID.
    #[error("CID is truncated")]
    Truncated,
    /// Only CIDv1 is used by atproto.
    #[error("CID version {0} is not supported (only CIDv1)")]
    Version(u64),
    /// Only sha2-256 multihashes can be checked.
    #[error("CID multihash code {code:#x} with length {len} is not sha2-256")]
    Hash {
        /// The multihash function code found.
        code: u64,
        /// The digest length found.
        len: u64,
    },
    /// A varint was longer than nine bytes or not minimal.
    #[error("CID has a malformed varint")]
    Varint,
    /// The string form must be multibase base32 lowercase (`b...`).
    #[error("CID string {0:?} is not base32 multibase (b...)")]
    Multibase(String),
    /// Bytes were left after the CID where none may be.
    #[error("CID has {0} trailing bytes")]
    Trailing(usize),
}

impl Cid {
    /// The CID of `bytes` under `codec`: sha2-256 over the bytes.
    pub fn compute(codec: u64, bytes: &[u8]) -> Cid {
        Cid {
            codec,
            digest: sha256(bytes),
        }
    }

    /// The CID of a DRISL-encoded block.
    pub fn dag_cbor(bytes: &[u8]) -> Cid {
        Cid::compute(DAG_CBOR, bytes)
    }

    /// The CID of a blob's bytes.
    pub fn raw(bytes: &[u8]) -> Cid {
        Cid::compute(RAW, bytes)
    }

    /// A CID from its parts.
    pub const fn from_parts(codec: u64, digest: [u8; 32]) -> Cid {
        Cid { codec, digest }
    }

    /// The multicodec of the linked content.
    pub fn codec(&self) -> u64 {
        self.codec
    }

    /// The sha2-256 digest.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// Whether `bytes` hash to this CID's digest.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        sha256(bytes) == self.digest
    }

    /// Parses one binary CID from the front of `bytes`, returning it and the bytes it used.
    pub fn read_prefix(bytes: &[u8]) -> Result<(Cid, usize), CidError> {
        // Nearly every CID is v1 sha2-256 with a one-byte codec: read it without the varints.
        if let [CID_V1, codec @ (0x71 | 0x55), SHA2_256, 0x20, rest @ ..] = bytes
            && let Some(digest) = rest.first_chunk::<32>()
        {
            return Ok((
                Cid {
                    codec: u64::from(*codec),
                    digest: *digest,
                },
                36,
            ));
        }
        let mut pos = 0;
        let version = read_varint(bytes, &mut pos)?;
        if version == 0x12 {
            // A CIDv0 is a bare sha2-256 multihash: it starts 0x12 0x20.
            return Err(CidError::Version(0));
        }
        if version != u64::from(CID_V1) {
            return Err(CidError::Version(version));
        }
        let codec = read_varint(bytes, &mut pos)?;
        let code = read_varint(bytes, &mut pos)?;
        let len = read_varint(bytes, &mut pos)?;
        if code != u64::from(SHA2_256) || len != 32 {
            return Err(CidError::Hash { code, len });
        }
        let digest = bytes
            .get(pos..pos + 32)
            .ok_or(CidError::Truncated)?
            .try_into()
            .map_err(|_| CidError::Truncated)?;
        Ok((Cid { codec, digest }, pos + 32))
    }

    /// Parses exactly one binary CID.
    pub fn from_bytes(bytes: &[u8]) -> Result<Cid, CidError> {
        let (cid, used) = Cid::read_prefix(bytes)?;
        match bytes.len() - used {
            0 => Ok(cid),
            extra => Err(CidError::Trailing(extra)),
        }
    }

    /// Appends the binary form (version, codec, multihash) to `out`.
    pub fn write_bytes(&self, out: &mut Vec<u8>) {
        out.push(CID_V1);
        write_uvarint(self.codec, out);
        out.push(SHA2_256);
        out.push(32);
        out.extend_from_slice(&self.digest);
    }

    /// The binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_CID_BYTES);
        self.write_bytes(&mut out);
        out
    }

    /// Length of the binary form.
    pub fn encoded_len(&self) -> usize {
        3 + uvarint_len(self.codec) + 32
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::with_capacity(MAX_CID_BYTES);
        self.write_bytes(&mut out);
        f.write_str("b")?;
        f.write_str(&base32_encode(&out))
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cid({self})")
    }
}

impl FromStr for Cid {
    type Err = CidError;

    fn from_str(s: &str) -> Result<Cid, CidError> {
        let body = s
            .strip_prefix('b')
            .ok_or_else(|| CidError::Multibase(s.to_owned()))?;
        let bytes = base32_decode(body).ok_or_else(|| CidError::Multibase(s.to_owned()))?;
        Cid::from_bytes(&bytes)
    }
}

impl std::hash::Hash for Cid {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The digest is already uniformly distributed; eight of its bytes are plenty.
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.digest[..8]);
        state.write_u64(u64::from_le_bytes(word) ^ self.codec);
    }
}

/// A hasher for maps keyed by [`Cid`]: passes the digest bits through instead of rehashing.
#[derive(Default, Clone, Copy)]
pub struct CidHasher(u64);

impl Hasher for CidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if a non-Cid key is used; fold the bytes in so it still works.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// A `HashMap` keyed by [`Cid`] with the pass-through hasher.
pub type CidMap<V> = std::collections::HashMap<Cid, V, BuildHasherDefault<CidHasher>>;

/// The sha256 state words after hashing `bytes` (the digest, big-endian word by word).
///
/// The compression function is called on the input in place and on one or two padded tail
/// blocks: every block, record and MST key is hashed, and `Digest`'s buffering costs as
/// much as the compression on the small inputs that dominate a repository.
pub(crate) fn sha256_words(bytes: &[u8]) -> [u32; 8] {
    let mut state = SHA256_IV;
    let (blocks, rest) = bytes.as_chunks::<64>();
    if !blocks.is_empty() {
        sha2::block_api::compress256(&mut state, blocks);
    }
    let mut tail = [0u8; 128];
    sha2::block_api::compress256(&mut state, padded_tail(&mut tail, rest, bytes.len()));
    state
}

/// The sha256 digests of two inputs, computed side by side.
///
/// Each compression of one input waits on the one before it, so a core hashing one input
/// spends most of its time waiting on the SHA unit's latency. Taking turns between two
/// independent inputs keeps two compressions in flight: 2.5 GB/s against 1.6–1.8 for one
/// input at a time here (Zen 4, SHA-NI). Interleaving the two at the instruction level
/// ourselves ran slower than letting the core overlap the two calls; three or four inputs
/// ran no faster than two.
pub(crate) fn sha256_pair(a: &[u8], b: &[u8]) -> ([u8; 32], [u8; 32]) {
    let (mut state_a, mut state_b) = (SHA256_IV, SHA256_IV);
    let (mut tail_a, mut tail_b) = ([0u8; 128], [0u8; 128]);
    let (body_a, rest_a) = a.as_chunks::<64>();
    let (body_b, rest_b) = b.as_chunks::<64>();
    let input_a = (body_a, padded_tail(&mut tail_a, rest_a, a.len()));
    let input_b = (body_b, padded_tail(&mut tail_b, rest_b, b.len()));
    let together = (body_a.len() + input_a.1.len()).min(body_b.len() + input_b.1.len());
    for index in 0..together {
        sha2::block_api::compress256(&mut state_a, nth_block(input_a, index));
        sha2::block_api::compress256(&mut state_b, nth_block(input_b, index));
    }
    for (state, (body, tail)) in [(&mut state_a, input_a), (&mut state_b, input_b)] {
        match body.get(together..) {
            Some(body) => {
                sha2::block_api::compress256(state, body);
                sha2::block_api::compress256(state, tail);
            }
            None => sha2::block_api::compress256(
                state,
                tail.get(together - body.len()..).unwrap_or_default(),
            ),
        }
    }
    (digest_bytes(state_a), digest_bytes(state_b))
}

/// Block `index` of an input split into its whole blocks and its padded tail, as a slice of
/// one (none past the end).
fn nth_block<'a>((body, tail): (&'a [[u8; 64]], &'a [[u8; 64]]), index: usize) -> &'a [[u8; 64]] {
    match index.checked_sub(body.len()) {
        None => std::slice::from_ref(&body[index]),
        Some(index) => tail.get(index..=index).unwrap_or_default(),
    }
}

/// Writes the last partial block `rest` of a `len`-byte input and its padding into `tail`
/// and returns the one or two blocks that end the input.
fn padded_tail<'t>(tail: &'t mut [u8; 128], rest: &[u8], len: usize) -> &'t [[u8; 64]] {
    tail[..rest.len()].copy_from_slice(rest);
    tail[rest.len()] = 0x80;
    let tail_len = if rest.len() < 56 { 64 } else { 128 };
    tail[tail_len - 8..tail_len].copy_from_slice(&((len as u64) * 8).to_be_bytes());
    tail[..tail_len].as_chunks::<64>().0
}

fn digest_bytes(words: [u32; 8]) -> [u8; 32] {
    let mut digest = [0u8; 32];
    for (out, word) in digest.chunks_exact_mut(4).zip(words) {
        out.copy_from_slice(&word.to_be_bytes());
    }
    digest
}

/// The sha256 digest of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    digest_bytes(sha256_words(bytes))
}

/// The sha256 initial hash value (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// One varint of a CID at `pos`, which moves past it.
fn read_varint(bytes: &[u8], pos: &mut usize) -> Result<u64, CidError> {
    let rest = bytes.get(*pos..).unwrap_or_default();
    match read_uvarint(rest) {
        Ok(Some((value, used))) => {
            *pos += used;
            Ok(value)
        }
        Ok(None) => Err(CidError::Truncated),
        Err(_) => Err(CidError::Varint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place hashing agrees with the `sha2` crate's at every length around the block
    /// boundaries.
    #[test]
    fn sha256_matches_the_digest_api() {
        use sha2::{Digest, Sha256};
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let expected: [u8; 32] = Sha256::digest(&bytes).into();
            assert_eq!(sha256(&bytes), expected, "length {len}");
        }
    }

    /// Two inputs hashed side by side give each its own digest, whichever is longer and
    /// wherever each ends inside or at a block boundary.
    #[test]
    fn a_pair_hashes_as_two_single_inputs() {
        let input = |len: usize, seed: usize| -> Vec<u8> {
            (0..len).map(|i| (i * 31 + seed * 7 + len) as u8).collect()
        };
        let lengths = [
            0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 129, 200, 330, 1000,
        ];
        for &len_a in &lengths {
            for &len_b in &lengths {
                let (a, b) = (input(len_a, 1), input(len_b, 2));
                assert_eq!(
                    sha256_pair(&a, &b),
                    (sha256(&a), sha256(&b)),
                    "lengths {len_a} and {len_b}"
                );
            }
        }
    }

    #[test]
    fn string_round_trip() -> Result<(), CidError> {
        let text = "bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq";
        let cid: Cid = text.parse()?;
        assert_eq!(cid.codec(), DAG_CBOR);
        assert_eq!(cid.to_string(), text);
        assert_eq!(Cid::from_bytes(&cid.to_bytes())?, cid);
        assert_eq!(cid.encoded_len(), 36);
        Ok(())
    }

    #[test]
    fn raw_cid_string() -> Result<(), CidError> {
        let text = "bafkreiccldh766hwcnuxnf2wh6jgzepf2nlu2lvcllt63eww5p6chi4ity";
        let cid: Cid = text.parse()?;
        assert_eq!(cid.codec(), RAW);
        assert_eq!(cid.to_string(), text);
        Ok(())
    }

    #[test]
    fn rejects_v0_and_other_hashes() {
        assert!(matches!(
            "QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR".parse::<Cid>(),
            Err(CidError::Multibase(_))
        ));
        // CIDv1, dag-cbor, blake2b-256 (0xb220).
        let bytes = [0x01, 0x71, 0xa0, 0xe4, 0x02, 0x20];
        assert!(matches!(
            Cid::read_prefix(&bytes),
            Err(CidError::Hash { .. })
        ));
        assert_eq!(Cid::read_prefix(&[0x12, 0x20]), Err(CidError::Version(0)));
        assert_eq!(
            Cid::read_prefix(&[0x01, 0x71, 0x12]),
            Err(CidError::Truncated)
        );
    }
}
