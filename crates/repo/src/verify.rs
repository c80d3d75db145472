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
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};

use tokio::io::AsyncRead;

use crate::car::{AsyncCarReader, Block, CarLimits, CarReader};
use crate::cbor;
use crate::cid::{Cid, CidMap, DAG_CBOR};
use crate::commit::Commit;
use crate::crypto::PublicKey;
use crate::error::{Error, Result};
use crate::mst::{BlockSource, MstRules, MstWalker, WalkItem, WalkStats};
use crate::record::Record;
use crate::syntax::{Did, Nsid, RecordKey, SyntaxError};

/// How to read and check a repository CAR.
///
/// Memory while loading stays below `memory_budget` + 22 bytes per block for the index
/// (at most [`CarLimits::max_blocks`] blocks) + the reader's buffer (at most
/// [`CarLimits::max_block_size`] + 256 KiB); disk below `max_spill_bytes`.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Bytes of blocks (plus index overhead) kept in memory before spilling to disk.
    pub memory_budget: usize,
    /// Where the spill file goes (the system temporary directory if `None`).
    pub spill_dir: Option<PathBuf>,
    /// Largest spill file (default 4 GiB, the default largest CAR).
    pub max_spill_bytes: u64,
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
            max_spill_bytes: CarLimits::DEFAULT_MAX_CAR_SIZE,
            limits: CarLimits::default(),
            check_record_encoding: true,
        }
    }
}

/// Memory one index entry costs: the digest's first 8 bytes and an 8-byte location, and a
/// 4-byte table slot at a load factor of 3/4. The rest of the digest is not kept here: it
/// lies beside the block (in the memory chunk, the spill file or the CAR itself), where a
/// lookup compares it in full.
pub const INDEX_BYTES_PER_BLOCK: usize = 16 + 6;
/// Bytes of a digest, stored in front of each dag-cbor block's bytes.
const DIGEST: usize = 32;
/// In-memory blocks live in chunks of this size, so the arena never doubles and copies.
const CHUNK_SIZE: usize = 1 << 20;
/// Largest block the packed location can describe.
const MAX_STORED_BLOCK: usize = (1 << 23) - 1;
/// Index entries per chunk (160 KiB): the list grows by chunks, so it never doubles and copies,
/// and a small repository does not touch megabytes of fresh memory for its index.
const ENTRY_CHUNK: usize = 1 << 12;

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

/// Refuses a block longer than a [`Location`] can describe.
fn check_stored_len(len: usize) -> Result<()> {
    if len > MAX_STORED_BLOCK {
        return Err(Error::LimitExceeded {
            what: "block size",
            limit: MAX_STORED_BLOCK as u64,
            found: len as u64,
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    /// The digest's first 8 bytes: most lookups that reach a wrong entry stop here.
    prefix: u64,
    location: Location,
}

/// The block index: dag-cbor blocks (all of a repository's) by digest in a compact table,
/// blocks of any other codec by full CID in a map, so every lookup is by full CID.
///
/// A dag-cbor entry holds 8 bytes of the digest; the whole digest is stored in front of the
/// block's bytes, and a lookup confirms it there (see [`BlockStore::find`]). The index of a
/// repository of millions of blocks, which cannot spill, is then 22 bytes a block rather
/// than 62.
///
/// Entries are appended while the CAR streams in (no lookups happen then) and the table is
/// built once at the end with its final size, so memory is exact: no hash-table doubling, no
/// copy of the entries. Slots are placed by the digest mixed with a per-index random key, so
/// a CAR ground to cluster its digests cannot make probing quadratic.
struct Index {
    chunks: Vec<Vec<IndexEntry>>,
    len: usize,
    /// Open addressing with linear probing; a slot is the entry number + 1, 0 empty.
    /// Duplicate blocks each get a slot: the first in the probe order is the first stored.
    table: Vec<u32>,
    others: CidMap<Location>,
    key: u64,
}

fn digest_prefix(digest: &[u8; 32]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(word)
}

impl Index {
    /// The first slot to probe for a digest prefix: the prefix keyed and mixed, then mapped
    /// onto the table's length by multiplication (which need not be a power of two).
    fn home(&self, prefix: u64) -> usize {
        let mixed = (prefix ^ self.key).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        ((u128::from(mixed) * self.table.len() as u128) >> 64) as usize
    }
}

impl Index {
    /// An empty index that reuses `scratch`'s table.
    fn reusing(scratch: &mut Scratch) -> Index {
        use std::hash::BuildHasher;
        Index {
            chunks: Vec::new(),
            len: 0,
            table: std::mem::take(&mut scratch.table),
            others: CidMap::default(),
            key: std::collections::hash_map::RandomState::new().hash_one(0x0061_7470_6462_u64),
        }
    }

    fn push(&mut self, cid: &Cid, location: Location, spare: &mut Vec<Vec<IndexEntry>>) {
        if cid.codec() != DAG_CBOR {
            self.others.entry(*cid).or_insert(location);
            return;
        }
        if self
            .chunks
            .last()
            .is_none_or(|chunk| chunk.len() == ENTRY_CHUNK)
        {
            let chunk = spare
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(ENTRY_CHUNK));
            self.chunks.push(chunk);
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(IndexEntry {
                prefix: digest_prefix(cid.digest()),
                location,
            });
            self.len += 1;
        }
    }

    fn entry(&self, number: usize) -> Option<&IndexEntry> {
        self.chunks
            .get(number / ENTRY_CHUNK)
            .and_then(|chunk| chunk.get(number % ENTRY_CHUNK))
    }

    /// Builds the table at a load factor of 3/4. Entries are placed in the order they were
    /// stored, so of duplicate blocks a lookup meets the first one first.
    fn seal(&mut self) -> Result<()> {
        if self.len >= u32::MAX as usize {
            return Err(Error::LimitExceeded {
                what: "CAR block count",
                limit: u64::from(u32::MAX) - 1,
                found: self.len as u64,
            });
        }
        let capacity = (self.len * 4 / 3 + 1).max(16);
        self.table.clear();
        self.table.resize(capacity, 0);
        for number in 0..self.len {
            let Some(entry) = self.entry(number) else {
                break;
            };
            let mut slot = self.home(entry.prefix);
            while self.table[slot] != 0 {
                slot = if slot + 1 == capacity { 0 } else { slot + 1 };
            }
            self.table[slot] = number as u32 + 1;
        }
        Ok(())
    }

    /// The locations whose entries match `cid`'s digest prefix, in probe order; the caller
    /// confirms the whole digest beside each block.
    fn candidates(&self, cid: &Cid) -> impl Iterator<Item = (u32, Location)> + '_ {
        let prefix = digest_prefix(cid.digest());
        let capacity = self.table.len();
        let mut slot = if capacity == 0 { 0 } else { self.home(prefix) };
        let mut probes = 0;
        std::iter::from_fn(move || {
            while probes < capacity {
                probes += 1;
                let number = self.table[slot];
                slot = if slot + 1 == capacity { 0 } else { slot + 1 };
                if number == 0 {
                    probes = capacity;
                    return None;
                }
                if let Some(entry) = self.entry(number as usize - 1)
                    && entry.prefix == prefix
                {
                    return Some((number - 1, entry.location));
                }
            }
            None
        })
    }

    fn blocks(&self) -> usize {
        self.len + self.others.len()
    }
}

/// Verified blocks of one CAR, in memory up to a budget and in a temporary file beyond it.
///
/// Only the CAR loader ([`load_car`], [`load_car_async`]) fills one, with blocks the reader
/// hashed; it is then read-only. Nothing outside the crate can add a block (issue 11):
///
/// ```compile_fail
/// # fn add(store: &mut atpdb_repo::verify::BlockStore, block: atpdb_repo::car::Block<'_>) {
/// store.insert(block);
/// # }
/// ``` Memory is the budget plus the index
/// ([`INDEX_BYTES_PER_BLOCK`] a block), which cannot spill: a 1 GB repository of 3.4 M
/// blocks needs about 75 MB of index.
pub struct BlockStore {
    index: Index,
    chunks: Vec<Vec<u8>>,
    /// Chunks from an earlier load, smallest last, handed out before allocating.
    spare_chunks: Vec<Vec<u8>>,
    spare_entries: Vec<Vec<IndexEntry>>,
    in_memory: usize,
    spill: Option<Spill>,
    budget: usize,
    spill_dir: Option<PathBuf>,
    max_spill: u64,
    /// The CAR reader's buffer, kept for [`Scratch`].
    read_buffer: Vec<u8>,
    /// A CAR held whole ([`load_car_whole`], [`load_car_in_memory`]): every location is a
    /// range of it.
    whole: Option<WholeCar>,
    /// Where the next lookups probably land: see [`Cursors`].
    cursors: Cursors,
}

/// How many runs of blocks in CAR order a lookup tries before the table.
const CURSORS: usize = 16;

/// Guesses for the next lookup: the entry after each of the last few found.
///
/// The walk asks for blocks in key order, and writers lay blocks out in runs of that order:
/// `@atproto/repo` writes the tree's nodes layer by layer and then the records node by node,
/// so the records of each layer and the nodes of each layer are each a run the walk follows.
/// Following the runs, 99.4% of lookups on the 200-repository reference corpus hit the entry
/// a cursor points to, which is in cache, instead of a random table slot and a random entry
/// (two cache misses): lookups fell from 8.5% to 4% of `car verify`'s profile and the corpus
/// verified 5% faster. A CAR in no useful order (a PDS that writes blocks by CID) would pay up
/// to 16 random entry reads per lookup instead, so the cursors are only tried while they pay:
/// while at least a quarter of lookups would have hit one (counted on the table path too, so
/// a CAR whose order turns useful is noticed). The same corpus with its blocks shuffled
/// verifies as fast as without cursors.
///
/// Of duplicate blocks a cursor may find a later copy than the table would: the same bytes,
/// since every block was hashed against its CID.
///
/// Atomics only so that a loaded CAR stays `Sync`: one thread walks it, so plain loads and
/// stores (no read-modify-write) suffice, and a lost update would cost a guess, not a result.
struct Cursors {
    next: [AtomicU32; CURSORS],
    /// The cursor a table hit replaces, round-robin.
    victim: AtomicUsize,
    lookups: AtomicU32,
    hits: AtomicU32,
}

impl Cursors {
    fn new() -> Cursors {
        Cursors {
            next: [const { AtomicU32::new(u32::MAX) }; CURSORS],
            victim: AtomicUsize::new(0),
            lookups: AtomicU32::new(0),
            hits: AtomicU32::new(0),
        }
    }

    /// Whether the cursors have been paying: always during the first lookups.
    fn worth_trying(&self) -> bool {
        let lookups = self.lookups.load(Relaxed);
        lookups < 64 || self.hits.load(Relaxed) >= lookups / 4
    }

    /// Counts a lookup; `hit` is whether a cursor pointed at the entry found.
    fn count(&self, hit: bool) {
        self.lookups
            .store(self.lookups.load(Relaxed).saturating_add(1), Relaxed);
        if hit {
            self.hits.store(self.hits.load(Relaxed) + 1, Relaxed);
        }
    }

    /// Moves the cursor that pointed at entry `number` past it, or starts a new run there.
    fn found(&self, number: u32) {
        let next = number.saturating_add(1);
        if let Some(cursor) = self
            .next
            .iter()
            .find(|cursor| cursor.load(Relaxed) == number)
        {
            cursor.store(next, Relaxed);
            self.count(true);
            return;
        }
        let victim = self.victim.load(Relaxed);
        self.victim.store(victim.wrapping_add(1), Relaxed);
        self.next[victim % CURSORS].store(next, Relaxed);
        self.count(false);
    }
}

/// The bytes of a CAR held whole: read into the scratch's buffer, or handed over by the caller
/// (a mapped file), in which case the scratch's buffer waits for the next load.
enum WholeCar {
    Read(Vec<u8>),
    Given(Box<dyn AsRef<[u8]> + Send + Sync>),
}

impl WholeCar {
    fn bytes(&self) -> &[u8] {
        match self {
            WholeCar::Read(bytes) => bytes,
            WholeCar::Given(bytes) => (**bytes).as_ref(),
        }
    }
}

struct Spill {
    writer: Option<BufWriter<File>>,
    file: File,
    len: u64,
}

impl BlockStore {
    fn new(options: &VerifyOptions, mut scratch: Scratch) -> BlockStore {
        let mut spare_chunks = std::mem::take(&mut scratch.chunks);
        for chunk in &mut spare_chunks {
            chunk.clear();
        }
        spare_chunks.reverse();
        let mut spare_entries = std::mem::take(&mut scratch.entries);
        for chunk in &mut spare_entries {
            chunk.clear();
        }
        BlockStore {
            index: Index::reusing(&mut scratch),
            chunks: Vec::new(),
            spare_chunks,
            spare_entries,
            in_memory: 0,
            spill: None,
            budget: options.memory_budget,
            spill_dir: options.spill_dir.clone(),
            max_spill: options.max_spill_bytes,
            read_buffer: Vec::new(),
            whole: None,
            cursors: Cursors::new(),
        }
    }

    /// Number of blocks stored (duplicates included).
    pub fn len(&self) -> usize {
        self.index.blocks()
    }

    /// Whether the store has no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes written to the spill file.
    pub fn spilled_bytes(&self) -> u64 {
        self.spill.as_ref().map_or(0, |spill| spill.len)
    }

    /// Whether `cid` is stored.
    ///
    /// # Errors
    ///
    /// Reading the spill file failed.
    pub fn contains(&self, cid: &Cid) -> Result<bool> {
        Ok(self.get_block(cid)?.is_some())
    }

    /// Where `cid`'s block is, its whole digest confirmed beside the block (a dag-cbor block
    /// stored in memory or in the CAR), or for a spilled block, its bytes read and confirmed.
    fn find(&self, cid: &Cid) -> Result<Option<Cow<'_, [u8]>>> {
        if cid.codec() != DAG_CBOR {
            return match self.index.others.get(cid) {
                Some(location) => self.read(*location, None),
                None => Ok(None),
            };
        }
        let digest = cid.digest();
        if self.cursors.worth_trying() {
            let prefix = digest_prefix(digest);
            for cursor in &self.cursors.next {
                let number = cursor.load(Relaxed);
                if let Some(entry) = self.index.entry(number as usize)
                    && entry.prefix == prefix
                    && let Some(bytes) = self.read(entry.location, Some(digest))?
                {
                    cursor.store(number.saturating_add(1), Relaxed);
                    self.cursors.count(true);
                    return Ok(Some(bytes));
                }
            }
        }
        for (number, location) in self.index.candidates(cid) {
            if let Some(bytes) = self.read(location, Some(digest))? {
                self.cursors.found(number);
                return Ok(Some(bytes));
            }
        }
        Ok(None)
    }

    /// The bytes at `location`, if the digest in front of them is `digest` (when given).
    fn read(&self, location: Location, digest: Option<&[u8; 32]>) -> Result<Option<Cow<'_, [u8]>>> {
        let start = location.offset() as usize;
        let in_memory = if let Some(whole) = &self.whole {
            // A CAR block is `varint | CID | data`: a sha2-256 CID ends with its digest.
            Some(whole.bytes())
        } else if !location.on_disk() {
            let (chunk, offset) = (start >> 20, start & ((1 << 20) - 1));
            let Some(chunk) = self.chunks.get(chunk) else {
                return Ok(None);
            };
            return Ok(confirm(chunk, offset, location.len(), digest).map(Cow::Borrowed));
        } else {
            None
        };
        if let Some(bytes) = in_memory {
            return Ok(confirm(bytes, start, location.len(), digest).map(Cow::Borrowed));
        }
        let Some(spill) = &self.spill else {
            return Ok(None);
        };
        let with_digest = digest.is_some();
        let mut bytes = spill.read(location, with_digest)?;
        if let Some(digest) = digest {
            if bytes.get(..DIGEST) != Some(digest.as_slice()) {
                return Ok(None);
            }
            bytes.drain(..DIGEST);
        }
        Ok(Some(Cow::Owned(bytes)))
    }

    /// Adds a block the CAR reader has just hashed against `cid`.
    fn insert(&mut self, block: Block<'_>) -> Result<()> {
        let data = block.data;
        check_stored_len(data.len())?;
        // A dag-cbor block is stored behind its digest, which the index does not hold.
        let digest = (block.cid.codec() == DAG_CBOR).then(|| block.cid.digest());
        let stored = data.len() + digest.map_or(0, |_| DIGEST);
        let in_memory = self.in_memory + stored + (self.index.blocks() + 1) * INDEX_BYTES_PER_BLOCK;
        let location = if in_memory <= self.budget {
            let fits = self.chunks.last().is_some_and(|chunk| {
                chunk.len() + stored <= chunk.capacity()
                    && chunk.len() + stored <= CHUNK_SIZE.max(stored)
            });
            if !fits {
                // Chunks start small and double: a small repository then never touches a
                // fresh megabyte (a huge-page fault and 2 MiB of kernel zeroing per CAR).
                let size = (64 << 10 << self.chunks.len().min(4))
                    .min(CHUNK_SIZE)
                    .max(stored);
                let chunk = match self.spare_chunks.pop() {
                    Some(chunk) if chunk.capacity() >= size => chunk,
                    _ => Vec::with_capacity(size),
                };
                self.chunks.push(chunk);
            }
            let chunk_index = self.chunks.len() - 1;
            let chunk = &mut self.chunks[chunk_index];
            if let Some(digest) = digest {
                chunk.extend_from_slice(digest);
            }
            let offset = chunk.len();
            chunk.extend_from_slice(data);
            self.in_memory += stored;
            Location::memory(chunk_index, offset, data.len())
        } else {
            let spill = match &mut self.spill {
                Some(spill) => spill,
                None => self.spill.insert(Spill::create(self.spill_dir.as_deref())?),
            };
            let found = spill.len + stored as u64;
            if found > self.max_spill {
                return Err(Error::LimitExceeded {
                    what: "spill file size",
                    limit: self.max_spill,
                    found,
                });
            }
            if let Some(digest) = digest {
                spill.write(digest)?;
            }
            let offset = spill.len;
            spill.write(data)?;
            Location::disk(offset, data.len())
        };
        self.index
            .push(&block.cid, location, &mut self.spare_entries);
        Ok(())
    }

    /// Ends writing: builds the index table and flushes the spill file so reads see every
    /// block.
    fn seal(&mut self) -> Result<()> {
        self.index.seal()?;
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

    /// The block at `location`, with the digest stored in front of it when `with_digest`.
    #[cfg(unix)]
    fn read(&self, location: Location, with_digest: bool) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let before = if with_digest { DIGEST } else { 0 };
        let start = location
            .offset()
            .checked_sub(before as u64)
            .ok_or_else(|| std::io::Error::other("spill location before the start of the file"))?;
        let mut buf = vec![0; before + location.len()];
        self.file.read_exact_at(&mut buf, start)?;
        Ok(buf)
    }
}

impl crate::blocks::sealed::Sealed for BlockStore {}

impl BlockSource for BlockStore {
    fn get_block(&self, cid: &Cid) -> Result<Option<Cow<'_, [u8]>>> {
        self.find(cid)
    }
}

/// `len` bytes at `start` of `bytes`, if the 32 bytes in front of them are `digest` (when
/// given).
fn confirm<'a>(
    bytes: &'a [u8],
    start: usize,
    len: usize,
    digest: Option<&[u8; 32]>,
) -> Option<&'a [u8]> {
    if let Some(digest) = digest
        && bytes.get(start.checked_sub(DIGEST)?..start) != Some(digest.as_slice())
    {
        return None;
    }
    bytes.get(start..start.checked_add(len)?)
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
    store.insert(block)
}

/// Reads every block of a CAR from a blocking reader, checking each block's hash.
pub fn load_car<R: Read>(reader: R, options: &VerifyOptions) -> Result<LoadedCar> {
    load_car_reusing(reader, options, Scratch::default())
}

/// [`load_car`] in the memory an earlier load left behind ([`LoadedCar::into_scratch`]).
pub fn load_car_reusing<R: Read>(
    reader: R,
    options: &VerifyOptions,
    mut scratch: Scratch,
) -> Result<LoadedCar> {
    let buffer = std::mem::take(&mut scratch.read_buffer);
    let mut car = CarReader::with_buffer(reader, options.limits, buffer)?;
    let mut store = BlockStore::new(options, scratch);
    let mut blocks = 0;
    while let Some(block) = car.next_block()? {
        store_block(&mut store, block, &mut blocks)?;
    }
    store.seal()?;
    let roots = car.header().roots.clone();
    let offset = car.offset();
    store.read_buffer = car.into_buffer();
    loaded(&roots, store, offset, blocks, options)
}

/// Reads a whole CAR (of about `size_hint` bytes) into memory (the scratch's buffer) and
/// indexes its blocks where they lie, hashing each: no block is copied and no arena allocated. Memory is the CAR's size, so use
/// it when that is known to be small (the CLI: a file no larger than the memory budget);
/// otherwise [`load_car_reusing`] streams within the budget.
///
/// # Errors
///
/// As [`load_car`]; [`Error::LimitExceeded`] for a CAR over [`CarLimits::max_car_size`].
pub fn load_car_whole<R: Read>(
    reader: R,
    size_hint: u64,
    options: &VerifyOptions,
    mut scratch: Scratch,
) -> Result<LoadedCar> {
    // Sized once: growing by doubling would copy the CAR into fresh memory again and again,
    // and growing a used buffer copies its stale contents: a buffer too small is replaced.
    // The replacement's capacity is rounded up to a power of two so that the next, slightly
    // larger CAR still fits: capacity never written is never faulted in, while a second
    // buffer would be (two 24 MB CARs in a row touched 64 MB instead of 39).
    let hint = usize::try_from(size_hint.min(options.limits.max_car_size))
        .unwrap_or(0)
        .saturating_add(1);
    let mut bytes = std::mem::take(&mut scratch.read_buffer);
    bytes.clear();
    if bytes.capacity() < hint {
        bytes = Vec::with_capacity(hint.checked_next_power_of_two().unwrap_or(hint));
    }
    reader
        .take(options.limits.max_car_size.saturating_add(1))
        .read_to_end(&mut bytes)?;
    index_whole(WholeCar::Read(bytes), options, scratch)
}

/// Indexes a CAR the caller already holds in memory, hashing each block where it lies: a
/// mapped file is verified without being copied, or faulting in fresh memory for it. The
/// scratch's read buffer is kept for the next load.
///
/// # Errors
///
/// As [`load_car`].
pub fn load_car_in_memory<B: AsRef<[u8]> + Send + Sync + 'static>(
    bytes: B,
    options: &VerifyOptions,
    scratch: Scratch,
) -> Result<LoadedCar> {
    index_whole(WholeCar::Given(Box::new(bytes)), options, scratch)
}

fn index_whole(whole: WholeCar, options: &VerifyOptions, scratch: Scratch) -> Result<LoadedCar> {
    let mut store = BlockStore::new(options, scratch);
    let bytes = whole.bytes();
    let (header, blocks) =
        crate::car::blocks_in_place(bytes, options.limits, |cid, start, len| {
            check_stored_len(len)?;
            // In a whole CAR, a location is a range of the CAR: the disk form holds it.
            store.index.push(
                &cid,
                Location::disk(start as u64, len),
                &mut store.spare_entries,
            );
            Ok(())
        })?;
    let len = bytes.len() as u64;
    store.whole = Some(whole);
    store.seal()?;
    loaded(&header.roots, store, len, blocks, options)
}

/// Reads every block of a CAR from an async reader (an HTTP body), checking each block's hash.
pub async fn load_car_async<R: AsyncRead + Unpin>(
    reader: R,
    options: &VerifyOptions,
) -> Result<LoadedCar> {
    load_car_async_reusing(reader, options, Scratch::default()).await
}

/// [`load_car_async`] in the memory an earlier load left behind.
pub async fn load_car_async_reusing<R: AsyncRead + Unpin>(
    reader: R,
    options: &VerifyOptions,
    mut scratch: Scratch,
) -> Result<LoadedCar> {
    let buffer = std::mem::take(&mut scratch.read_buffer);
    let mut car = AsyncCarReader::with_buffer(reader, options.limits, buffer).await?;
    let mut store = BlockStore::new(options, scratch);
    let mut blocks = 0;
    while let Some(block) = car.next_block().await? {
        store_block(&mut store, block, &mut blocks)?;
    }
    store.seal()?;
    let roots = car.header().roots.clone();
    let offset = car.offset();
    store.read_buffer = car.into_buffer();
    loaded(&roots, store, offset, blocks, options)
}

/// Memory one load leaves for the next: its block chunks, index and read buffer.
///
/// Verifying repositories one after another (a resync worker, `atpdb car verify` over a
/// corpus) in fresh memory costs a page fault and the kernel's zeroing for every page, as
/// much as hashing the blocks on small repositories; reusing it costs neither. What it keeps
/// is at most what the last load used, so it stays within that load's bounds.
#[derive(Debug, Default)]
pub struct Scratch {
    chunks: Vec<Vec<u8>>,
    entries: Vec<Vec<IndexEntry>>,
    table: Vec<u32>,
    read_buffer: Vec<u8>,
}

impl BlockStore {
    fn into_scratch(self) -> Scratch {
        let mut chunks = self.chunks;
        // The unused spares are the larger ones: keep them after the used ones, in order.
        chunks.extend(self.spare_chunks.into_iter().rev());
        let mut entries = self.index.chunks;
        entries.extend(self.spare_entries);
        Scratch {
            chunks,
            entries,
            table: self.index.table,
            // A whole CAR's buffer is the larger one: the next load reads into it.
            read_buffer: match self.whole {
                Some(WholeCar::Read(bytes)) => bytes,
                Some(WholeCar::Given(_)) | None => self.read_buffer,
            },
        }
    }
}

/// What the caller knows about the repository in advance: the key is required, because a
/// repository whose signature was not checked is not verified.
///
/// ```compile_fail
/// // Issue 11: there is no way to ask for verification without a key.
/// let expected = atpdb_repo::verify::Expected { did: None, key: None };
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The account the repository must belong to, if known.
    pub did: Option<&'a Did>,
    /// The account's `#atproto` signing key.
    pub key: &'a PublicKey,
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

    /// Decodes the commit block (its signature unchecked).
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

    /// The memory this load used, for the next load ([`load_car_reusing`]).
    pub fn into_scratch(self) -> Scratch {
        self.store.into_scratch()
    }

    /// Checks the commit's DID and signature; the tree is checked while walking.
    ///
    /// # Errors
    ///
    /// [`Error::MissingBlock`] / [`Error::Commit`] for the commit block,
    /// [`Error::DidMismatch`], [`Error::BadSignature`].
    pub fn verify(self, expected: Expected<'_>) -> Result<VerifiedRepo> {
        let commit = self.commit()?;
        if let Some(did) = expected.did {
            commit.verify_did(did)?;
        }
        commit.verify_signature(expected.key)?;
        Ok(VerifiedRepo { car: self, commit })
    }

    /// Walks the tree with every shape rule, but without checking the commit's signature:
    /// for inspecting a CAR whose account key is unknown. Nothing it yields is proven to be
    /// the account's; use [`LoadedCar::verify`] for that.
    ///
    /// # Errors
    ///
    /// [`Error::MissingBlock`] / [`Error::Commit`] for the commit block.
    pub fn walk_unsigned(&self) -> Result<(Commit, RecordWalker<'_>)> {
        let commit = self.commit()?;
        let walker = RecordWalker::new(self, &commit);
        Ok((commit, walker))
    }
}

/// A repository whose commit DID and signature checked out; its records stream from
/// [`VerifiedRepo::records`], which checks the tree as it goes.
pub struct VerifiedRepo {
    car: LoadedCar,
    commit: Commit,
}

impl VerifiedRepo {
    /// The commit (its signature verified).
    pub fn commit(&self) -> &Commit {
        &self.commit
    }

    /// The commit's CID.
    pub fn commit_cid(&self) -> Cid {
        self.car.root
    }

    /// The loaded CAR.
    pub fn car(&self) -> &LoadedCar {
        &self.car
    }

    /// The memory this load used, for the next load ([`load_car_reusing`]).
    pub fn into_scratch(self) -> Scratch {
        self.car.into_scratch()
    }

    /// Walks the MST in key order, checking it and yielding each record.
    pub fn records(&self) -> RecordWalker<'_> {
        RecordWalker::new(&self.car, &self.commit)
    }

    /// Walks a CAR that holds only the blocks written since an earlier commit
    /// (`getRepo?since=`): [`RecordWalker::next_item`] reports each subtree and record block
    /// left out instead of failing. What it leaves out is unproven until the caller proves it
    /// against what it holds (see [`crate::mst::SubtreeBuilder`]).
    pub fn records_since(&self) -> RecordWalker<'_> {
        let mut walker = RecordWalker::new(&self.car, &self.commit);
        walker.walker =
            MstWalker::new(&self.car.store, self.commit.data, MstRules::default()).with_gaps();
        walker.gaps = true;
        walker
    }
}

/// One step of [`VerifiedRepo::records_since`].
#[derive(Debug, Clone, Copy)]
pub enum RecordItem<'a> {
    /// A record and its bytes.
    Record(RecordRef<'a>),
    /// A record whose block the CAR left out: unchanged since the earlier commit, if the
    /// holder's CID for the path equals `cid`.
    Unfetched {
        /// The collection NSID.
        collection: &'a str,
        /// The record key.
        rkey: &'a str,
        /// The record block's CID.
        cid: Cid,
    },
    /// A subtree the CAR left out, covering every path between the items before and after
    /// it; its root node is at `layer`.
    Gap {
        /// The subtree's root.
        cid: Cid,
        /// Its root node's layer.
        layer: u32,
    },
}

/// One record, borrowed from the walk.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// The account.
    pub did: &'a Did,
    /// The collection NSID.
    pub collection: &'a str,
    /// The record key.
    pub rkey: &'a str,
    /// The record block's CID.
    pub cid: Cid,
    /// The record's DRISL bytes.
    pub bytes: &'a [u8],
}

impl RecordRef<'_> {
    /// Whether the key names a record: the collection an NSID, the record key a record key.
    /// The walk holds keys only to the MST's rule, which is wider (the interop fixtures
    /// have keys such as `A0/374913`, and record keys up to 1 KiB); a store of records
    /// needs the record rules.
    ///
    /// # Errors
    ///
    /// The [`SyntaxError`] of the part that breaks its rule.
    pub fn check_names(&self) -> std::result::Result<(), SyntaxError> {
        Nsid::check(self.collection)?;
        RecordKey::check(self.rkey)
    }

    /// The owned [`Record`].
    ///
    /// # Errors
    ///
    /// As [`RecordRef::check_names`].
    pub fn to_record(&self) -> Result<Record> {
        Ok(Record::from_verified(
            self.did.clone(),
            self.collection.parse::<Nsid>()?,
            self.rkey.parse::<RecordKey>()?,
            self.cid,
            self.bytes.to_vec(),
        ))
    }
}

/// The key-ordered record stream of a [`VerifiedRepo`].
pub struct RecordWalker<'a> {
    walker: MstWalker<&'a BlockStore>,
    store: &'a BlockStore,
    did: Did,
    key: Vec<u8>,
    current: Option<Cow<'a, [u8]>>,
    check_encoding: bool,
    record_bytes: u64,
    gaps: bool,
}

impl<'a> RecordWalker<'a> {
    fn new(car: &'a LoadedCar, commit: &Commit) -> RecordWalker<'a> {
        RecordWalker {
            walker: MstWalker::new(&car.store, commit.data, MstRules::default()),
            store: &car.store,
            did: commit.did.clone(),
            key: Vec::new(),
            current: None,
            check_encoding: car.check_record_encoding,
            record_bytes: 0,
            gaps: false,
        }
    }

    /// The next record, or `None` once the whole tree has been verified.
    pub fn next_record(&mut self) -> Result<Option<RecordRef<'_>>> {
        match self.next_item()? {
            None => Ok(None),
            Some(RecordItem::Record(record)) => Ok(Some(record)),
            Some(RecordItem::Gap { cid, .. }) => Err(Error::MissingBlock {
                cid,
                context: "MST node".to_owned(),
            }),
            Some(RecordItem::Unfetched {
                collection,
                rkey,
                cid,
            }) => Err(Error::MissingBlock {
                cid,
                context: format!("{collection}/{rkey}"),
            }),
        }
    }

    /// The next record, or on a walk of [`VerifiedRepo::records_since`] also a left-out
    /// subtree or record block; `None` once the whole tree has been walked.
    pub fn next_item(&mut self) -> Result<Option<RecordItem<'_>>> {
        let (key, cid) = match self.walker.next_item()? {
            None => return Ok(None),
            Some(WalkItem::Gap { cid, layer }) => return Ok(Some(RecordItem::Gap { cid, layer })),
            Some(WalkItem::Entry(key, cid)) => (key, cid),
        };
        self.key.clear();
        self.key.extend_from_slice(key);
        let path = simdutf8::basic::from_utf8(&self.key).map_err(|_| Error::MstStructure {
            node: cid,
            reason: "key is not UTF-8".to_owned(),
        })?;
        // The walker checked the path syntax, so it has exactly one slash.
        let slash = path.bytes().position(|b| b == b'/').unwrap_or(path.len());
        let (collection, rkey) = (&path[..slash], path.get(slash + 1..).unwrap_or(""));
        let Some(bytes) = self.store.get_block(&cid)? else {
            if self.gaps {
                return Ok(Some(RecordItem::Unfetched {
                    collection,
                    rkey,
                    cid,
                }));
            }
            return Err(Error::MissingBlock {
                cid,
                context: path.to_owned(),
            });
        };
        if self.check_encoding {
            cbor::validate(&bytes).map_err(|source| Error::Block { cid, source })?;
        }
        self.record_bytes += bytes.len() as u64;
        let bytes: &[u8] = self.current.insert(bytes);
        Ok(Some(RecordItem::Record(RecordRef {
            did: &self.did,
            collection,
            rkey,
            cid,
            bytes,
        })))
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
        match self.next_record() {
            Ok(Some(record)) => Some(record.to_record()),
            Ok(None) => None,
            Err(err) => Some(Err(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The MST allows keys no record may have (`A0/374913` is in the interop fixtures);
    /// turning one into a record is refused with the rule it breaks. (An earlier version
    /// took the collection as an NSID unchecked: a panic in a debug build, an invalid
    /// `Nsid` in a release one.)
    #[test]
    fn a_walked_key_becomes_a_record_only_under_the_record_rules() -> Result<()> {
        let did: Did = "did:plc:abc".parse()?;
        let bytes = [0xa0];
        let found = |collection, rkey| RecordRef {
            did: &did,
            collection,
            rkey,
            cid: Cid::dag_cbor(&bytes),
            bytes: &bytes,
        };
        let long_rkey = "k".repeat(513);
        for (collection, rkey) in [("A0", "374913"), ("app.bsky.feed.post", long_rkey.as_str())] {
            let record = found(collection, rkey);
            assert!(record.check_names().is_err(), "{collection}/{rkey}");
            assert!(matches!(record.to_record(), Err(Error::Syntax(_))));
        }
        let good = found("app.bsky.feed.post", "3k");
        good.check_names()?;
        assert_eq!(good.to_record()?.path(), "app.bsky.feed.post/3k");
        Ok(())
    }

    /// Digests that share the 8 bytes the index keeps: only the digest stored beside each
    /// block tells them apart, in memory and in the spill file alike.
    #[test]
    fn lookups_confirm_the_whole_digest_beside_the_block() -> Result<()> {
        let digest = |last: u8| {
            let mut digest = [7u8; 32];
            digest[31] = last;
            Cid::from_parts(DAG_CBOR, digest)
        };
        let (first, second, absent) = (digest(1), digest(2), digest(3));
        for budget in [1 << 20, 0] {
            let options = VerifyOptions {
                memory_budget: budget,
                ..VerifyOptions::default()
            };
            let mut store = BlockStore::new(&options, Scratch::default());
            store.insert(Block {
                cid: first,
                data: b"first",
            })?;
            store.insert(Block {
                cid: second,
                data: b"second",
            })?;
            // A duplicate of the first: the first stored is the one found.
            store.insert(Block {
                cid: first,
                data: b"again",
            })?;
            store.seal()?;
            assert_eq!(store.spilled_bytes() > 0, budget == 0);
            assert_eq!(store.get_block(&first)?.as_deref(), Some(&b"first"[..]));
            assert_eq!(store.get_block(&second)?.as_deref(), Some(&b"second"[..]));
            assert_eq!(store.get_block(&absent)?, None);
            assert!(!store.contains(&Cid::from_parts(crate::cid::RAW, *first.digest()))?);
        }
        Ok(())
    }

    /// Cursors follow a run of lookups in stored order, a cursor whose entry shares only the
    /// digest prefix finds nothing wrong, and out-of-order lookups stop the guessing.
    #[test]
    fn cursors_follow_stored_order_and_stand_aside_when_they_miss() -> Result<()> {
        // Every digest shares its first 8 bytes, so every entry matches every prefix and only
        // the whole digest beside the block tells them apart.
        let cid = |n: u32| {
            let mut digest = [9u8; 32];
            digest[28..].copy_from_slice(&n.to_be_bytes());
            Cid::from_parts(DAG_CBOR, digest)
        };
        let count = 400u32;
        let data: Vec<Vec<u8>> = (0..count).map(|n| n.to_be_bytes().to_vec()).collect();
        let filled = || -> Result<BlockStore> {
            let mut store = BlockStore::new(&VerifyOptions::default(), Scratch::default());
            for n in 0..count {
                store.insert(Block {
                    cid: cid(n),
                    data: &data[n as usize],
                })?;
            }
            store.seal()?;
            Ok(store)
        };
        let store = filled()?;
        for n in 0..count {
            assert_eq!(
                store.get_block(&cid(n))?.as_deref(),
                Some(&data[n as usize][..])
            );
        }
        let (lookups, hits) = (
            store.cursors.lookups.load(Relaxed),
            store.cursors.hits.load(Relaxed),
        );
        assert_eq!(
            (lookups, hits),
            (count, count - 1),
            "all but the first lookup follow a cursor"
        );
        assert!(store.cursors.worth_trying());
        // A stride no cursor follows: the cursors miss, and soon are no longer tried.
        let scattered = filled()?;
        for n in (0..count).map(|n| (n * 37) % count) {
            assert_eq!(
                scattered.get_block(&cid(n))?.as_deref(),
                Some(&data[n as usize][..])
            );
        }
        assert!(scattered.cursors.hits.load(Relaxed) < count / 8);
        assert!(!scattered.cursors.worth_trying());
        assert_eq!(scattered.get_block(&cid(count))?, None);
        Ok(())
    }
}
