//! Streaming verification of a whole repository CAR under a memory budget.
//!
//! A CAR's blocks may come in any order, so records cannot be yielded until the tree is known.
//! [`load_car`] (or [`load_car_async`]) reads every block, checks its hash and keeps it in a
//! [`BlockStore`]: in memory up to [`VerifyOptions::memory_budget`], past it in an unnamed
//! temporary file. [`LoadedCar::verify`] then checks the commit (DID, signature) and
//! [`VerifiedRepo::records`] walks the MST in key order, checking its shape, yielding each
//! record with its bytes. A repository is fully verified once that walk ends without error.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;

use tokio::io::AsyncRead;

use crate::car::{AsyncCarReader, Block, CarLimits, CarReader};
use crate::cbor;
use crate::cid::Cid;
use crate::commit::Commit;
use crate::crypto::PublicKey;
use crate::error::{Error, Result};
use crate::mst::{BlockSource, MstWalker, WalkOptions, WalkStats};
use crate::syntax::Did;

/// How to read and check a repository CAR.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Bytes of blocks (plus index overhead) kept in memory before spilling to disk.
    pub memory_budget: usize,
    /// Where the spill file goes (the system temporary directory if `None`).
    pub spill_dir: Option<PathBuf>,
    /// CAR size limits.
    pub limits: CarLimits,
    /// Also require every record block to be well-formed DRISL within the data-model limits.
    pub check_record_encoding: bool,
}

impl Default for VerifyOptions {
    fn default() -> VerifyOptions {
        VerifyOptions {
            memory_budget: 64 << 20,
            spill_dir: None,
            limits: CarLimits::default(),
            check_record_encoding: true,
        }
    }
}

/// Memory one index entry costs: a 32-byte digest, an 8-byte location, a control byte, and
/// the slack of a hash table between resizes.
const INDEX_ENTRY_COST: usize = 48;
/// In-memory blocks live in chunks of this size, so the arena never doubles and copies.
const CHUNK_SIZE: usize = 1 << 20;
/// Largest block the packed location can describe.
const MAX_STORED_BLOCK: usize = (1 << 23) - 1;

/// Where a block's bytes are, packed into 64 bits to keep the index small: bit 63 says on
/// disk; bits 40..63 hold the length; bits 0..40 hold the spill offset, or for memory the
/// chunk index (high 20 bits) and the offset inside the chunk (low 20 bits).
#[derive(Debug, Clone, Copy)]
struct Location(u64);

impl Location {
    fn memory(chunk: usize, offset: usize, len: usize) -> Location {
        Location(((len as u64) << 40) | ((chunk as u64) << 20) | offset as u64)
    }

    fn disk(offset: u64, len: usize) -> Location {
        Location(1 << 63 | ((len as u64) << 40) | offset)
    }

    fn on_disk(self) -> bool {
        self.0 >> 63 == 1
    }

    fn len(self) -> usize {
        ((self.0 >> 40) & MAX_STORED_BLOCK as u64) as usize
    }

    fn offset(self) -> u64 {
        self.0 & ((1 << 40) - 1)
    }
}

/// A map keyed by a sha2-256 digest, hashed by passing its first bytes through.
type DigestMap<V> =
    std::collections::HashMap<[u8; 32], V, std::hash::BuildHasherDefault<DigestHasher>>;

#[derive(Default)]
struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Keys are digests: eight of their bytes are already uniformly distributed.
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }
}

/// Verified blocks by digest, in memory up to a budget and in a temporary file beyond it.
///
/// Blocks are keyed by digest alone: two CIDs with one digest name the same bytes.
/// Memory is the budget plus the index (about 48 bytes per distinct block), which cannot
/// spill: a 500 MB repository of 1.8 M blocks needs about 90 MB of index.
pub struct BlockStore {
    index: DigestMap<Location>,
    chunks: Vec<Vec<u8>>,
    in_memory: usize,
    spill: Option<Spill>,
    budget: usize,
    spill_dir: Option<PathBuf>,
}

struct Spill {
    writer: Option<BufWriter<File>>,
    file: File,
    len: u64,
}

impl BlockStore {
    /// An empty store that spills past `budget` bytes into `spill_dir`.
    pub fn new(budget: usize, spill_dir: Option<PathBuf>) -> BlockStore {
        BlockStore {
            index: DigestMap::default(),
            chunks: Vec::new(),
            in_memory: 0,
            spill: None,
            budget,
            spill_dir,
        }
    }

    /// Number of distinct blocks.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the store has no blocks.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes written to the spill file.
    pub fn spilled_bytes(&self) -> u64 {
        self.spill.as_ref().map_or(0, |spill| spill.len)
    }

    /// Whether `cid` is stored.
    pub fn contains(&self, cid: &Cid) -> bool {
        self.index.contains_key(cid.digest())
    }

    /// Adds a block whose bytes were already checked against `cid`. Duplicates are ignored.
    pub fn insert(&mut self, cid: Cid, data: &[u8]) -> Result<()> {
        if self.index.contains_key(cid.digest()) {
            return Ok(());
        }
        if data.len() > MAX_STORED_BLOCK {
            return Err(Error::LimitExceeded {
                what: "block size",
                limit: MAX_STORED_BLOCK as u64,
                found: data.len() as u64,
            });
        }
        let in_memory = self.in_memory + data.len() + (self.index.len() + 1) * INDEX_ENTRY_COST;
        let location = if in_memory <= self.budget {
            let fits = self.chunks.last().is_some_and(|chunk| {
                chunk.len() + data.len() <= chunk.capacity()
                    && chunk.len() + data.len() <= CHUNK_SIZE.max(data.len())
            });
            if !fits {
                // The first chunk is small so that tiny repositories stay cheap.
                let size = if self.chunks.is_empty() {
                    64 << 10
                } else {
                    CHUNK_SIZE
                };
                self.chunks.push(Vec::with_capacity(size.max(data.len())));
            }
            let chunk_index = self.chunks.len() - 1;
            let chunk = &mut self.chunks[chunk_index];
            let offset = chunk.len();
            chunk.extend_from_slice(data);
            self.in_memory += data.len();
            Location::memory(chunk_index, offset, data.len())
        } else {
            let spill = match &mut self.spill {
                Some(spill) => spill,
                None => self.spill.insert(Spill::create(self.spill_dir.as_deref())?),
            };
            let offset = spill.len;
            spill.write(data)?;
            Location::disk(offset, data.len())
        };
        self.index.insert(*cid.digest(), location);
        Ok(())
    }

    /// Ends writing: flushes the spill file so reads see every block.
    fn seal(&mut self) -> Result<()> {
        if let Some(spill) = &mut self.spill
            && let Some(mut writer) = spill.writer.take()
        {
            writer.flush()?;
        }
        Ok(())
    }
}

impl Spill {
    fn create(dir: Option<&std::path::Path>) -> Result<Spill> {
        let file = match dir {
            Some(dir) => tempfile::tempfile_in(dir)?,
            None => tempfile::tempfile()?,
        };
        let writer = BufWriter::with_capacity(1 << 20, file.try_clone()?);
        Ok(Spill {
            writer: Some(writer),
            file,
            len: 0,
        })
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        match &mut self.writer {
            Some(writer) => writer.write_all(data)?,
            None => return Err(std::io::Error::other("spill file is sealed").into()),
        }
        self.len += data.len() as u64;
        Ok(())
    }

    #[cfg(unix)]
    fn read(&self, location: Location) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; location.len()];
        self.file.read_exact_at(&mut buf, location.offset())?;
        Ok(buf)
    }
}

impl BlockSource for BlockStore {
    fn get_block(&self, cid: &Cid) -> Result<Option<Cow<'_, [u8]>>> {
        let Some(&location) = self.index.get(cid.digest()) else {
            return Ok(None);
        };
        if !location.on_disk() {
            let offset = location.offset();
            let (chunk, start) = ((offset >> 20) as usize, (offset & ((1 << 20) - 1)) as usize);
            return Ok(self
                .chunks
                .get(chunk)
                .and_then(|chunk| chunk.get(start..start + location.len()))
                .map(Cow::Borrowed));
        }
        match &self.spill {
            Some(spill) => spill.read(location).map(|bytes| Some(Cow::Owned(bytes))),
            None => Ok(None),
        }
    }
}

/// A CAR whose blocks have all been read and hashed; the structure is not checked yet.
pub struct LoadedCar {
    root: Cid,
    store: BlockStore,
    bytes: u64,
    blocks: u64,
    check_record_encoding: bool,
}

fn loaded(
    roots: &[Cid],
    store: BlockStore,
    bytes: u64,
    blocks: u64,
    options: &VerifyOptions,
) -> Result<LoadedCar> {
    let root = *roots.first().ok_or(Error::Car {
        offset: 0,
        reason: "header has no roots".to_owned(),
    })?;
    // Otherwise one signed commit could travel under a second CID.
    if root.codec() != crate::cid::DAG_CBOR {
        return Err(Error::Commit {
            cid: root,
            reason: format!(
                "commit CID has codec {:#x}, expected dag-cbor (0x71)",
                root.codec()
            ),
        });
    }
    Ok(LoadedCar {
        root,
        store,
        bytes,
        blocks,
        check_record_encoding: options.check_record_encoding,
    })
}

fn store_block(store: &mut BlockStore, block: Block<'_>, blocks: &mut u64) -> Result<()> {
    *blocks += 1;
    store.insert(block.cid, block.data)
}

/// Reads every block of a CAR from a blocking reader, checking each block's hash.
pub fn load_car<R: Read>(reader: R, options: &VerifyOptions) -> Result<LoadedCar> {
    let mut car = CarReader::new(reader, options.limits)?;
    let mut store = BlockStore::new(options.memory_budget, options.spill_dir.clone());
    let mut blocks = 0;
    while let Some(block) = car.next_block()? {
        store_block(&mut store, block, &mut blocks)?;
    }
    store.seal()?;
    let roots = car.header().roots.clone();
    loaded(&roots, store, car.offset(), blocks, options)
}

/// Reads every block of a CAR from an async reader (an HTTP body), checking each block's hash.
pub async fn load_car_async<R: AsyncRead + Unpin>(
    reader: R,
    options: &VerifyOptions,
) -> Result<LoadedCar> {
    let mut car = AsyncCarReader::new(reader, options.limits).await?;
    let mut store = BlockStore::new(options.memory_budget, options.spill_dir.clone());
    let mut blocks = 0;
    while let Some(block) = car.next_block().await? {
        store_block(&mut store, block, &mut blocks)?;
    }
    store.seal()?;
    let roots = car.header().roots.clone();
    loaded(&roots, store, car.offset(), blocks, options)
}

/// What the caller knows about the repository in advance.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expected<'a> {
    /// The account the repository must belong to.
    pub did: Option<&'a Did>,
    /// The account's `#atproto` signing key; without it the signature is not checked.
    pub key: Option<&'a PublicKey>,
}

/// Whether the commit signature was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureCheck {
    /// Verified against the given key.
    Valid,
    /// No key was given.
    Unchecked,
}

impl LoadedCar {
    /// The CID in `roots[0]`: the commit.
    pub fn root(&self) -> Cid {
        self.root
    }

    /// Bytes read.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Blocks read, duplicates included.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The block store.
    pub fn store(&self) -> &BlockStore {
        &self.store
    }

    /// Decodes the commit block.
    pub fn commit(&self) -> Result<Commit> {
        let bytes = self
            .store
            .get_block(&self.root)?
            .ok_or_else(|| Error::MissingBlock {
                cid: self.root,
                context: "commit".to_owned(),
            })?;
        Commit::from_cbor(self.root, &bytes)
    }

    /// Checks the commit against what the caller expects; the tree is checked while walking.
    pub fn verify(self, expected: Expected<'_>) -> Result<VerifiedRepo> {
        let commit = self.commit()?;
        if let Some(did) = expected.did {
            commit.verify_did(did)?;
        }
        let signature = match expected.key {
            Some(key) => {
                commit.verify_signature(key)?;
                SignatureCheck::Valid
            }
            None => SignatureCheck::Unchecked,
        };
        Ok(VerifiedRepo {
            car: self,
            commit,
            signature,
        })
    }
}

/// A repository whose commit checked out; its records stream from [`VerifiedRepo::records`].
pub struct VerifiedRepo {
    car: LoadedCar,
    commit: Commit,
    signature: SignatureCheck,
}

impl VerifiedRepo {
    /// The commit.
    pub fn commit(&self) -> &Commit {
        &self.commit
    }

    /// The commit's CID.
    pub fn commit_cid(&self) -> Cid {
        self.car.root
    }

    /// Whether the signature was checked.
    pub fn signature(&self) -> SignatureCheck {
        self.signature
    }

    /// The loaded CAR.
    pub fn car(&self) -> &LoadedCar {
        &self.car
    }

    /// Walks the MST in key order, checking it and yielding each record.
    pub fn records(&self) -> RecordWalker<'_> {
        RecordWalker {
            walker: MstWalker::new(&self.car.store, self.commit.data, WalkOptions::default()),
            store: &self.car.store,
            key: Vec::new(),
            current: None,
            check_encoding: self.car.check_record_encoding,
            record_bytes: 0,
        }
    }
}

/// One record, borrowed from the walk.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// The collection NSID.
    pub collection: &'a str,
    /// The record key.
    pub rkey: &'a str,
    /// The record block's CID.
    pub cid: Cid,
    /// The record's DRISL bytes.
    pub bytes: &'a [u8],
}

/// One record, owned: the plain form that outlives the CAR (queues, channels, other threads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The collection NSID.
    pub collection: String,
    /// The record key.
    pub rkey: String,
    /// The record block's CID.
    pub cid: Cid,
    /// The record's DRISL bytes.
    pub bytes: Vec<u8>,
}

impl RecordRef<'_> {
    /// An owned copy.
    pub fn to_owned(&self) -> Record {
        Record {
            collection: self.collection.to_owned(),
            rkey: self.rkey.to_owned(),
            cid: self.cid,
            bytes: self.bytes.to_vec(),
        }
    }
}

/// The key-ordered record stream of a [`VerifiedRepo`].
pub struct RecordWalker<'a> {
    walker: MstWalker<&'a BlockStore>,
    store: &'a BlockStore,
    key: Vec<u8>,
    current: Option<Cow<'a, [u8]>>,
    check_encoding: bool,
    record_bytes: u64,
}

impl<'a> RecordWalker<'a> {
    /// The next record, or `None` once the whole tree has been verified.
    pub fn next_record(&mut self) -> Result<Option<RecordRef<'_>>> {
        let Some((key, cid)) = self.walker.next_entry()? else {
            return Ok(None);
        };
        self.key.clear();
        self.key.extend_from_slice(key);
        let path = std::str::from_utf8(&self.key).map_err(|_| Error::MstStructure {
            node: cid,
            reason: "key is not UTF-8".to_owned(),
        })?;
        let bytes = self
            .store
            .get_block(&cid)?
            .ok_or_else(|| Error::MissingBlock {
                cid,
                context: path.to_owned(),
            })?;
        if self.check_encoding {
            cbor::validate(&bytes).map_err(|source| Error::Block { cid, source })?;
        }
        self.record_bytes += bytes.len() as u64;
        let bytes: &[u8] = self.current.insert(bytes);
        // The walker checked the path syntax, so it has exactly one slash.
        let (collection, rkey) = path.split_once('/').unwrap_or((path, ""));
        Ok(Some(RecordRef {
            collection,
            rkey,
            cid,
            bytes,
        }))
    }

    /// Walk counters so far.
    pub fn stats(&self) -> WalkStats {
        self.walker.stats()
    }

    /// Record bytes yielded so far.
    pub fn record_bytes(&self) -> u64 {
        self.record_bytes
    }
}

impl Iterator for RecordWalker<'_> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        self.next_record()
            .map(|record| record.map(|r| r.to_owned()))
            .transpose()
    }
}
