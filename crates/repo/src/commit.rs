//! Signed repository commits (v3, and v2 where it carries a rev): decode, sign, verify.

use crate::cbor::{DecodeError, Decoder, Encoder};
use crate::cid::Cid;
use crate::crypto::{Keypair, PublicKey};
use crate::error::{Error, Result};
use crate::syntax::{Did, Tid};

/// The current repository format version.
pub const REPO_VERSION: u64 = 3;

/// A decoded, syntax-checked commit object.
///
/// The signature is not checked by decoding; call [`Commit::verify_signature`] with the key from
/// the account's DID document. Field names follow the spec (`data` is the MST root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The account.
    pub did: Did,
    /// 3, or 2 for old repositories.
    pub version: u64,
    /// Root of the MST.
    pub data: Cid,
    /// Logical clock of the repository.
    pub rev: Tid,
    /// Always present in the encoding; virtually always null.
    pub prev: Option<Cid>,
    /// Compact 64-byte signature over the unsigned commit.
    pub sig: Vec<u8>,
}

/// The fields that get signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsignedCommit {
    /// The account.
    pub did: Did,
    /// Root of the MST.
    pub data: Cid,
    /// The new rev; must be greater than the previous commit's.
    pub rev: Tid,
    /// Normally `None`.
    pub prev: Option<Cid>,
}

impl UnsignedCommit {
    /// The DRISL bytes that are signed: every field but `sig`, `prev` included even when null.
    pub fn to_cbor(&self) -> Vec<u8> {
        encode(
            &self.did,
            REPO_VERSION,
            &self.data,
            &self.rev,
            self.prev.as_ref(),
            None,
        )
    }

    /// Signs with `key`, producing the commit.
    pub fn sign(self, key: &Keypair) -> Commit {
        let sig = key.sign(&self.to_cbor()).to_vec();
        Commit {
            did: self.did,
            version: REPO_VERSION,
            data: self.data,
            rev: self.rev,
            prev: self.prev,
            sig,
        }
    }
}

impl Commit {
    /// Decodes a commit block, checking the schema, the version and the DID and rev syntax.
    pub fn from_cbor(cid: Cid, bytes: &[u8]) -> Result<Commit> {
        let block_error = |source| Error::Block { cid, source };
        let commit_error = |reason: String| Error::Commit { cid, reason };
        let mut decoder = Decoder::new(bytes);
        let fields = decoder.map_len().map_err(block_error)?;
        let mut did = None;
        let mut version = None;
        let mut data = None;
        let mut rev = None;
        let mut prev = None;
        let mut sig = None;
        let mut previous_key: Option<&str> = None;
        for _ in 0..fields {
            let key_offset = decoder.position();
            let key = decoder.ordered_key(previous_key).map_err(block_error)?;
            previous_key = Some(key);
            match key {
                "did" => did = Some(decoder.text().map_err(block_error)?),
                "rev" => rev = Some(decoder.text().map_err(block_error)?),
                "sig" => sig = Some(decoder.bytes().map_err(block_error)?),
                "data" => data = Some(decoder.link().map_err(block_error)?),
                "prev" => prev = Some(decoder.nullable_link().map_err(block_error)?),
                "version" => version = Some(decoder.u64().map_err(block_error)?),
                other => {
                    return Err(block_error(DecodeError::UnknownField {
                        field: other.to_owned(),
                        offset: key_offset,
                    }));
                }
            }
        }
        decoder.finish().map_err(block_error)?;
        let missing = |field: &str| commit_error(format!("missing field {field:?}"));
        let version = version.ok_or_else(|| missing("version"))?;
        if version != REPO_VERSION && version != 2 {
            return Err(commit_error(format!("unsupported repo version {version}")));
        }
        let did = did.ok_or_else(|| missing("did"))?;
        let did: Did = did
            .parse()
            .map_err(|err| commit_error(format!("invalid did {did:?}: {err}")))?;
        // v2 commits from before revs existed cannot be ordered, so they are not accepted.
        let rev = rev.ok_or_else(|| missing("rev"))?;
        let rev: Tid = rev
            .parse()
            .map_err(|err| commit_error(format!("invalid rev {rev:?}: {err}")))?;
        let data = data.ok_or_else(|| missing("data"))?;
        if data.codec() != crate::cid::DAG_CBOR {
            return Err(commit_error(format!("MST root {data} is not dag-cbor")));
        }
        Ok(Commit {
            did,
            version,
            data,
            rev,
            prev: prev.ok_or_else(|| missing("prev"))?,
            sig: sig.ok_or_else(|| missing("sig"))?.to_vec(),
        })
    }

    /// The signed block's bytes.
    pub fn to_cbor(&self) -> Vec<u8> {
        encode(
            &self.did,
            self.version,
            &self.data,
            &self.rev,
            self.prev.as_ref(),
            Some(&self.sig),
        )
    }

    /// The bytes the signature covers.
    pub fn unsigned_bytes(&self) -> Vec<u8> {
        encode(
            &self.did,
            self.version,
            &self.data,
            &self.rev,
            self.prev.as_ref(),
            None,
        )
    }

    /// The commit's CID.
    pub fn cid(&self) -> Cid {
        Cid::dag_cbor(&self.to_cbor())
    }

    /// Checks the signature against `key` (from the DID document's `#atproto` method).
    pub fn verify_signature(&self, key: &PublicKey) -> Result<()> {
        key.verify(&self.unsigned_bytes(), &self.sig)
            .map_err(|source| Error::BadSignature {
                did: self.did.to_string(),
                rev: self.rev.to_string(),
                source,
            })
    }

    /// Fails unless the commit is for `did`.
    pub fn verify_did(&self, did: &Did) -> Result<()> {
        if &self.did == did {
            Ok(())
        } else {
            Err(Error::DidMismatch {
                expected: did.to_string(),
                found: self.did.to_string(),
            })
        }
    }
}

fn encode(
    did: &Did,
    version: u64,
    data: &Cid,
    rev: &Tid,
    prev: Option<&Cid>,
    sig: Option<&[u8]>,
) -> Vec<u8> {
    let mut encoder = Encoder::with_capacity(200);
    // Canonical order: did, rev, sig (3 bytes), data, prev (4), version (7).
    encoder.map(if sig.is_some() { 6 } else { 5 });
    encoder.text("did");
    encoder.text(did.as_str());
    encoder.text("rev");
    encoder.text(rev.as_str());
    if let Some(sig) = sig {
        encoder.text("sig");
        encoder.bytes(sig);
    }
    encoder.text("data");
    encoder.link(data);
    encoder.text("prev");
    encoder.nullable_link(prev);
    encoder.text("version");
    encoder.u64(version);
    encoder.into_bytes()
}
