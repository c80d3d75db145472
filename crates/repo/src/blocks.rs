//! Blocks whose bytes are known to hash to their CIDs: the only blocks the MST reads.
//!
//! [`BlockSource`] is sealed. A value of any type that implements it got each of its blocks
//! through a path that hashed the bytes and matched them to the CID: [`VerifiedBlocks`] (built
//! from a CAR slice, or block by block with the hash checked), the CAR loader's
//! [`BlockStore`](crate::verify::BlockStore), and [`HashChecked`], which checks every block an
//! outside store (a database, a cache) hands back. A store elsewhere in atpdb therefore cannot
//! feed unhashed bytes to a tree by accident. Every source finds blocks by the full CID, codec
//! included, so a link resolves the same way on every path.

use std::borrow::Cow;

use crate::car::{CarHeader, CarLimits, CarReader};
use crate::cid::{Cid, CidMap};
use crate::error::{Error, Result};

/// Where MST nodes and records come from: a CAR in memory, a spill file, a commit slice.
///
/// Sealed: see the module documentation for the implementations and why. A store outside
/// this crate cannot hand blocks to a tree unhashed (issue 11):
///
/// ```compile_fail
/// use std::borrow::Cow;
/// use atpdb_repo::{Cid, Result};
/// struct Unhashed;
/// impl atpdb_repo::blocks::BlockSource for Unhashed {
///     fn get_block(&self, _: &Cid) -> Result<Option<Cow<'_, [u8]>>> {
///         Ok(None)
///     }
/// }
/// ```
///
/// It wraps itself in [`HashChecked`] instead, which hashes every block it returns.
pub trait BlockSource: sealed::Sealed {
    /// The block's bytes (known to hash to `cid`), or `None` if this source does not have it.
    fn get_block(&self, cid: &Cid) -> Result<Option<Cow<'_, [u8]>>>;
}

pub(crate) mod sealed {
    /// Implemented only inside this crate, by sources that hash what they hold.
    pub trait Sealed {}
}

/// The block `cid` from `source`, or [`Error::MissingBlock`] naming what linked to it.
pub(crate) fn require_block<'s, S: BlockSource + ?Sized>(
    source: &'s S,
    cid: &Cid,
    context: &str,
) -> Result<Cow<'s, [u8]>> {
    source.get_block(cid)?.ok_or_else(|| Error::MissingBlock {
        cid: *cid,
        context: context.to_owned(),
    })
}

impl<S: BlockSource + ?Sized> sealed::Sealed for &S {}

impl<S: BlockSource + ?Sized> BlockSource for &S {
    fn get_block(&self, cid: &Cid) -> Result<Option<Cow<'_, [u8]>>> {
        (**self).get_block(cid)
    }
}

/// A block source that has nothing: for trees built entirely in memory.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoBlocks;

impl sealed::Sealed for NoBlocks {}

impl BlockSource for NoBlocks {
    fn get_block(&self, _cid: &Cid) -> Result<Option<Cow<'_, [u8]>>> {
        Ok(None)
    }
}

/// Blocks in memory, each checked against its CID when it was added.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifiedBlocks {
    blocks: CidMap<Vec<u8>>,
}

impl VerifiedBlocks {
    /// No blocks.
    pub fn new() -> VerifiedBlocks {
        VerifiedBlocks::default()
    }

    /// Reads a whole CAR held in memory (a firehose `blocks` field, a `getRecord` proof),
    /// hashing every block; returns its header and blocks.
    ///
    /// # Errors
    ///
    /// The CAR reader's: [`Error::Car`], [`Error::Truncated`], [`Error::HashMismatch`],
    /// [`Error::LimitExceeded`].
    pub fn from_car(car: &[u8], limits: CarLimits) -> Result<(CarHeader, VerifiedBlocks)> {
        let mut reader = CarReader::new(car, limits)?;
        let mut blocks = VerifiedBlocks::new();
        while let Some(block) = reader.next_block()? {
            blocks
                .blocks
                .entry(block.cid)
                .or_insert_with(|| block.data.to_vec());
        }
        Ok((reader.header().clone(), blocks))
    }

    /// Adds a block after checking that `bytes` hash to `cid`.
    ///
    /// # Errors
    ///
    /// [`Error::HashMismatch`], and nothing is added.
    pub fn insert(&mut self, cid: Cid, bytes: Vec<u8>) -> Result<()> {
        let actual = Cid::compute(cid.codec(), &bytes);
        if actual != cid {
            return Err(Error::HashMismatch { cid, actual });
        }
        self.blocks.insert(cid, bytes);
        Ok(())
    }

    /// Adds a block under the CID its bytes hash to with `codec`, and returns that CID.
    pub fn insert_new(&mut self, codec: u64, bytes: Vec<u8>) -> Cid {
        let cid = Cid::compute(codec, &bytes);
        self.blocks.insert(cid, bytes);
        cid
    }

    /// Adds a block this crate has just hashed itself (an encoder's output and its CID).
    pub(crate) fn insert_hashed(&mut self, cid: Cid, bytes: Vec<u8>) {
        debug_assert!(cid.matches(&bytes), "insert_hashed with a wrong CID");
        self.blocks.insert(cid, bytes);
    }

    /// The bytes of `cid`.
    pub fn get(&self, cid: &Cid) -> Option<&[u8]> {
        self.blocks.get(cid).map(Vec::as_slice)
    }

    /// Whether `cid` is here.
    pub fn contains(&self, cid: &Cid) -> bool {
        self.blocks.contains_key(cid)
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Every block, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Cid, &[u8])> {
        self.blocks
            .iter()
            .map(|(cid, bytes)| (cid, bytes.as_slice()))
    }

    /// Removes a block.
    pub fn remove(&mut self, cid: &Cid) -> Option<Vec<u8>> {
        self.blocks.remove(cid)
    }

    /// Keeps only the blocks `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&Cid) -> bool) {
        self.blocks.retain(|cid, _| keep(cid));
    }
}

impl sealed::Sealed for VerifiedBlocks {}

impl BlockSource for VerifiedBlocks {
    fn get_block(&self, cid: &Cid) -> Result<Option<Cow<'_, [u8]>>> {
        Ok(self.get(cid).map(Cow::Borrowed))
    }
}

/// A store outside this crate whose blocks are not trusted: [`HashChecked`] hashes each one.
pub trait UncheckedBlocks {
    /// The bytes stored under `cid`, if any.
    ///
    /// # Errors
    ///
    /// Whatever reading the store can fail with, as [`Error::Io`].
    fn get_unchecked(&self, cid: &Cid) -> Result<Option<Vec<u8>>>;
}

/// Makes an outside store a [`BlockSource`] by hashing every block it returns.
#[derive(Debug, Clone)]
pub struct HashChecked<S>(pub S);

impl<S> sealed::Sealed for HashChecked<S> {}

impl<S: UncheckedBlocks> BlockSource for HashChecked<S> {
    fn get_block(&self, cid: &Cid) -> Result<Option<Cow<'_, [u8]>>> {
        let Some(bytes) = self.0.get_unchecked(cid)? else {
            return Ok(None);
        };
        let actual = Cid::compute(cid.codec(), &bytes);
        if actual != *cid {
            return Err(Error::HashMismatch { cid: *cid, actual });
        }
        Ok(Some(Cow::Owned(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tampered(CidMap<Vec<u8>>);

    impl UncheckedBlocks for Tampered {
        fn get_unchecked(&self, cid: &Cid) -> Result<Option<Vec<u8>>> {
            Ok(self.0.get(cid).cloned())
        }
    }

    #[test]
    fn insert_checks_the_hash() {
        let mut blocks = VerifiedBlocks::new();
        let cid = Cid::dag_cbor(b"\x01");
        assert!(matches!(
            blocks.insert(cid, b"\x02".to_vec()),
            Err(Error::HashMismatch { .. })
        ));
        assert!(blocks.is_empty());
        assert!(blocks.insert(cid, b"\x01".to_vec()).is_ok());
        assert_eq!(blocks.get(&cid), Some(&b"\x01"[..]));
    }

    /// Issue 11: one lookup rule, the full CID: the same digest under another codec is
    /// another block.
    #[test]
    fn issue_11_lookup_is_by_full_cid() {
        let mut blocks = VerifiedBlocks::new();
        let cid = blocks.insert_new(crate::cid::DAG_CBOR, b"\x01".to_vec());
        let raw = Cid::from_parts(crate::cid::RAW, *cid.digest());
        assert!(blocks.get(&raw).is_none());
    }

    #[test]
    fn hash_checked_refuses_tampered_blocks() {
        let cid = Cid::dag_cbor(b"\x01");
        let mut map = CidMap::default();
        map.insert(cid, b"\x02".to_vec());
        let source = HashChecked(Tampered(map));
        assert!(matches!(
            source.get_block(&cid),
            Err(Error::HashMismatch { .. })
        ));
    }
}
