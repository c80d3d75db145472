//! One record, owned: the form a backfill and the firehose both hand out, the engine stores
//! and the fleet sends.

use crate::cbor::{Decoder, Encoder};
use crate::cid::Cid;
use crate::error::{Error, Result};
use crate::syntax::{Did, Nsid, RecordKey};
use crate::value::cbor_to_json;

/// A record of an account, with the CID its bytes hash to.
///
/// Fields are private: every `Record` either came out of a verified repository or commit, or
/// was built by [`Record::new`] / [`Record::from_cbor`], which check the bytes against the CID.
/// So holding one means its bytes are the DRISL the CID names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    did: Did,
    collection: Nsid,
    rkey: RecordKey,
    cid: Cid,
    bytes: Vec<u8>,
}

impl Record {
    /// A record from its parts, checking that `bytes` are valid DRISL and hash to `cid`.
    ///
    /// # Errors
    ///
    /// [`Error::HashMismatch`], or [`Error::Block`] when the bytes are not valid DRISL.
    pub fn new(
        did: Did,
        collection: Nsid,
        rkey: RecordKey,
        cid: Cid,
        bytes: Vec<u8>,
    ) -> Result<Record> {
        let actual = Cid::compute(cid.codec(), &bytes);
        if actual != cid {
            return Err(Error::HashMismatch { cid, actual });
        }
        crate::cbor::validate(&bytes).map_err(|source| Error::Block { cid, source })?;
        Ok(Record {
            did,
            collection,
            rkey,
            cid,
            bytes,
        })
    }

    /// A record whose bytes this crate has already matched to `cid` and validated.
    pub(crate) fn from_verified(
        did: Did,
        collection: Nsid,
        rkey: RecordKey,
        cid: Cid,
        bytes: Vec<u8>,
    ) -> Record {
        Record {
            did,
            collection,
            rkey,
            cid,
            bytes,
        }
    }

    /// The account.
    pub fn did(&self) -> &Did {
        &self.did
    }

    /// The collection NSID.
    pub fn collection(&self) -> &Nsid {
        &self.collection
    }

    /// The record key.
    pub fn rkey(&self) -> &RecordKey {
        &self.rkey
    }

    /// The record's CID.
    pub fn cid(&self) -> Cid {
        self.cid
    }

    /// The record's DRISL bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The DRISL bytes, taken.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// `collection/rkey`, the record's MST key.
    pub fn path(&self) -> String {
        format!("{}/{}", self.collection, self.rkey)
    }

    /// `at://did/collection/rkey`.
    pub fn uri(&self) -> String {
        format!("at://{}/{}/{}", self.did, self.collection, self.rkey)
    }

    /// The stable binary form: a DRISL map `{cid, did, rkey, record, collection}` whose
    /// `record` is the record's own DRISL, embedded as is.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut encoder = Encoder::with_capacity(self.bytes.len() + 160);
        encoder.map(5);
        encoder.text("cid");
        encoder.link(&self.cid);
        encoder.text("did");
        encoder.text(self.did.as_str());
        encoder.text("rkey");
        encoder.text(self.rkey.as_str());
        encoder.text("record");
        encoder.raw(&self.bytes);
        encoder.text("collection");
        encoder.text(self.collection.as_str());
        encoder.into_bytes()
    }

    /// Reads [`Record::to_cbor`]'s form, checking the syntax of every field and the record's
    /// bytes against its CID.
    ///
    /// # Errors
    ///
    /// [`Error::Block`] for malformed DRISL or a missing field (named),
    /// [`Error::Syntax`] for a bad identifier, [`Error::HashMismatch`] for bytes that do not
    /// hash to the CID.
    pub fn from_cbor(bytes: &[u8]) -> Result<Record> {
        let at = Cid::dag_cbor(bytes);
        let decode = |source| Error::Block { cid: at, source };
        let mut decoder = Decoder::new(bytes);
        let start = decoder.position();
        let fields = decoder.map_len().map_err(decode)?;
        let (mut cid, mut did, mut rkey, mut record, mut collection) =
            (None, None, None, None, None);
        let mut previous = None;
        for _ in 0..fields {
            let key_offset = decoder.position();
            let key = decoder.ordered_key(previous).map_err(decode)?;
            previous = Some(key);
            match key {
                "cid" => cid = Some(decoder.link().map_err(decode)?),
                "did" => did = Some(decoder.text().map_err(decode)?),
                "rkey" => rkey = Some(decoder.text().map_err(decode)?),
                "record" => {
                    let from = decoder.position();
                    decoder.skip(0).map_err(decode)?;
                    record = bytes.get(from..decoder.position());
                }
                "collection" => collection = Some(decoder.text().map_err(decode)?),
                other => {
                    return Err(decode(crate::cbor::DecodeError::UnknownField {
                        field: other.to_owned(),
                        offset: key_offset,
                    }));
                }
            }
        }
        decoder.finish().map_err(decode)?;
        let missing = |field| {
            decode(crate::cbor::DecodeError::MissingField {
                field,
                offset: start,
            })
        };
        let cid = cid.ok_or_else(|| missing("cid"))?;
        let record = record.ok_or_else(|| missing("record"))?;
        Record::new(
            did.ok_or_else(|| missing("did"))?.parse()?,
            collection.ok_or_else(|| missing("collection"))?.parse()?,
            rkey.ok_or_else(|| missing("rkey"))?.parse()?,
            cid,
            record.to_vec(),
        )
    }

    /// The JSON form: `{did, collection, rkey, cid, record}` with the record in the data
    /// model's JSON (`$link`, `$bytes`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "did": self.did.as_str(),
            "collection": self.collection.as_str(),
            "rkey": self.rkey.as_str(),
            "cid": self.cid.to_string(),
            // The bytes were validated when the record was made, so this cannot fail; a
            // failure would still show as null rather than a panic.
            "record": cbor_to_json(&self.bytes).unwrap_or(serde_json::Value::Null),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Result<Record> {
        let bytes = crate::value::Value::from_json(&serde_json::json!({
            "$type": "app.bsky.feed.post", "text": "hi", "createdAt": "2024-01-01T00:00:00Z"
        }))?
        .to_cbor();
        Record::new(
            "did:plc:abc".parse()?,
            "app.bsky.feed.post".parse()?,
            "3jzfcijpj2z2a".parse()?,
            Cid::dag_cbor(&bytes),
            bytes,
        )
    }

    #[test]
    fn cbor_round_trip() -> Result<()> {
        let record = record()?;
        let bytes = record.to_cbor();
        crate::cbor::validate(&bytes).map_err(|source| Error::Block {
            cid: Cid::dag_cbor(&bytes),
            source,
        })?;
        assert_eq!(Record::from_cbor(&bytes)?, record);
        assert_eq!(
            record.uri(),
            "at://did:plc:abc/app.bsky.feed.post/3jzfcijpj2z2a"
        );
        assert_eq!(record.to_json()["record"]["text"], "hi");
        Ok(())
    }

    #[test]
    fn new_checks_the_hash() -> Result<()> {
        let record = record()?;
        let result = Record::new(
            record.did().clone(),
            record.collection().clone(),
            record.rkey().clone(),
            Cid::dag_cbor(b"other"),
            record.bytes().to_vec(),
        );
        assert!(
            matches!(result, Err(Error::HashMismatch { .. })),
            "{result:?}"
        );
        Ok(())
    }

    #[test]
    fn from_cbor_refuses_a_swapped_record() -> Result<()> {
        let record = record()?;
        let mut bytes = record.to_cbor();
        let text = bytes
            .windows(2)
            .position(|w| w == b"hi")
            .ok_or(Error::Io(std::io::Error::other("no text")))?;
        bytes[text] = b'H';
        assert!(matches!(
            Record::from_cbor(&bytes),
            Err(Error::HashMismatch { .. })
        ));
        Ok(())
    }
}
