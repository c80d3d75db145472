//! Helpers shared by the fuzz targets.
//!
//! The interesting code in `atpdb-repo` sits behind sha2-256 checks a fuzzer can never pass
//! by mutation alone: a block whose bytes changed no longer matches its CID, and neither do
//! the links to it. [`fixup`] repairs that after the fact: it recomputes every block's CID
//! and rewrites every link to it (in other blocks and in the CAR header), repeating until
//! the links settle, so a mutated record or MST node still reaches the tree checks.

use std::collections::HashMap;
use std::io::Read;

use atpdb_repo::Cid;

pub mod firehose;

/// dag-cbor and raw, the codecs whose links [`fixup`] rewrites.
const LINK_CODECS: [u8; 2] = [0x71, 0x55];

/// One block as found in the input, before or after [`fixup`].
#[derive(Debug, Clone)]
pub struct RawBlock {
    /// The CID the input declared (after [`fixup`]: the CID of `data`).
    pub cid: Cid,
    /// The block's bytes.
    pub data: Vec<u8>,
}

/// A CAR split leniently: the header's bytes (not parsed) and each block.
#[derive(Debug, Clone, Default)]
pub struct RawCar {
    /// The header's DRISL bytes, empty if the input had none.
    pub header: Vec<u8>,
    /// The blocks in input order.
    pub blocks: Vec<RawBlock>,
}

fn read_varint(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let byte = *bytes.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Appends an unsigned LEB128 varint.
pub fn write_varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Splits `input` like a CAR, never failing: a varint-length header, then varint-length
/// sections of `CID ‖ data`. A section whose CID does not parse becomes a dag-cbor block of
/// the whole section; a section cut short keeps what is there. At most `max_blocks` blocks.
pub fn split_car(input: &[u8], max_blocks: usize) -> RawCar {
    let mut car = RawCar::default();
    let mut pos = 0;
    let Some(len) = read_varint(input, &mut pos) else {
        return car;
    };
    let end = pos.saturating_add(len as usize).min(input.len());
    car.header = input[pos..end].to_vec();
    pos = end;
    while pos < input.len() && car.blocks.len() < max_blocks {
        let Some(len) = read_varint(input, &mut pos) else {
            break;
        };
        let end = pos.saturating_add(len as usize).min(input.len());
        let section = &input[pos..end];
        pos = end;
        let block = match Cid::read_prefix(section) {
            Ok((cid, used)) => RawBlock {
                cid,
                data: section[used..].to_vec(),
            },
            Err(_) => RawBlock {
                cid: Cid::dag_cbor(section),
                data: section.to_vec(),
            },
        };
        car.blocks.push(block);
    }
    car
}

/// The digest of a placeholder link: all zeros but the last byte, which names block `index`.
pub fn placeholder(index: u8) -> [u8; 32] {
    let mut digest = [0u8; 32];
    digest[31] = index;
    digest
}

/// Rewrites every binary CID (`01 <codec> 12 20 <digest>`) in `data` whose digest `map` knows.
pub fn rewrite_links(data: &mut [u8], map: &HashMap<[u8; 32], [u8; 32]>) -> bool {
    let mut changed = false;
    let mut pos = 0;
    while pos + 36 <= data.len() {
        if data[pos] == 0x01
            && LINK_CODECS.contains(&data[pos + 1])
            && data[pos + 2] == 0x12
            && data[pos + 3] == 0x20
        {
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&data[pos + 4..pos + 36]);
            if let Some(new) = map.get(&digest)
                && *new != digest
            {
                data[pos + 4..pos + 36].copy_from_slice(new);
                changed = true;
            }
            pos += 36;
        } else {
            pos += 1;
        }
    }
    changed
}

/// Recomputes every block's CID from its bytes and rewrites the links to it, in the blocks and
/// in the header, until nothing changes (a bounded number of passes). Links to a
/// [`placeholder`] digest are pointed at that block. Returns whether anything changed.
pub fn fixup(car: &mut RawCar) -> bool {
    fixup_with_map(car).0
}

/// [`fixup`], also returning every digest it replaced and what it replaced it with (follow a
/// digest through it with [`resolve`]).
pub fn fixup_with_map(car: &mut RawCar) -> (bool, HashMap<[u8; 32], [u8; 32]>) {
    let mut map: HashMap<[u8; 32], [u8; 32]> = HashMap::new();
    let mut any = false;
    // Pass 0 hashes every block; later passes rehash only blocks whose links were rewritten.
    let mut dirty = vec![true; car.blocks.len()];
    for _pass in 0..16 {
        let mut changed = false;
        for (index, block) in car.blocks.iter_mut().enumerate() {
            if rewrite_links(&mut block.data, &map) {
                dirty[index] = true;
                any = true;
            }
            if !std::mem::replace(&mut dirty[index], false) {
                continue;
            }
            let actual = Cid::compute(block.cid.codec(), &block.data);
            if actual != block.cid {
                map.insert(*block.cid.digest(), *actual.digest());
                block.cid = actual;
                changed = true;
                any = true;
            }
            if let Ok(index) = u8::try_from(index) {
                let key = placeholder(index);
                if map.get(&key) != Some(actual.digest()) {
                    map.insert(key, *actual.digest());
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    any |= rewrite_links(&mut car.header, &map);
    (any, map)
}

/// Where `cid` ended up after [`fixup_with_map`]: its digest followed through `map` (a block
/// can be rehashed more than once), its codec kept.
pub fn resolve(map: &HashMap<[u8; 32], [u8; 32]>, cid: Cid) -> Cid {
    let mut digest = *cid.digest();
    for _ in 0..32 {
        match map.get(&digest) {
            Some(next) if *next != digest => digest = *next,
            _ => break,
        }
    }
    Cid::from_parts(cid.codec(), digest)
}

/// Serialises `car` as CAR bytes (the header as it is, each block as `CID ‖ data`). An empty
/// header becomes `{roots: [first block], version: 1}`.
pub fn write_raw_car(car: &RawCar) -> Vec<u8> {
    let mut out = Vec::new();
    if car.header.is_empty() {
        let roots: Vec<Cid> = car.blocks.first().map(|b| b.cid).into_iter().collect();
        out = atpdb_repo::car::write_car(&roots, std::iter::empty());
    } else {
        write_varint(car.header.len() as u64, &mut out);
        out.extend_from_slice(&car.header);
    }
    for block in &car.blocks {
        let cid = block.cid.to_bytes();
        write_varint((cid.len() + block.data.len()) as u64, &mut out);
        out.extend_from_slice(&cid);
        out.extend_from_slice(&block.data);
    }
    out
}

/// A cheap hash of the input, for choosing options without spending input bytes on them.
pub fn input_hash(data: &[u8]) -> u64 {
    // FNV-1a.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in data {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A reader that hands out its bytes in small chunks of varying size, to move every buffer
/// boundary of the CAR reader.
pub struct Chunked<'a> {
    data: &'a [u8],
    seed: u64,
}

impl<'a> Chunked<'a> {
    /// Chunks of 1 to 64 bytes chosen by `seed`.
    pub fn new(data: &'a [u8], seed: u64) -> Chunked<'a> {
        Chunked {
            data,
            seed: seed | 1,
        }
    }
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // xorshift64
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let want = 1 + (self.seed % 64) as usize;
        let n = want.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}
