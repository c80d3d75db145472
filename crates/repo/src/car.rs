//! CAR v1: a streaming reader that hashes every block against its CID, and a writer.
//!
//! The reader is split in two: [`CarParser`] is sans-I/O (it looks at a buffer and says
//! "here is a block" or "I need more bytes"), and [`CarReader`] / [`AsyncCarReader`] feed it
//! from a [`Read`] or an [`AsyncRead`]. Blocks are borrowed from the reader's buffer, so a
//! block costs no allocation. The buffer grows only as bytes arrive (a declared block length
//! is never allocated ahead of its bytes), so it stays below the largest block actually
//! received plus one read chunk, and never above [`CarLimits::max_block_size`] plus 256 KiB.

use std::io::{Read, Write};

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::cbor::{Decoder, Encoder};
use crate::cid::{Cid, MAX_CID_BYTES, sha256, sha256_pair};
use crate::error::{Error, Result};
use crate::multiformats::{read_uvarint, write_uvarint};

/// Limits applied while reading a CAR; every one has a finite default.
#[derive(Debug, Clone, Copy)]
pub struct CarLimits {
    /// Largest block (CID and data) accepted. atproto records are at most ~1 MiB.
    pub max_block_size: usize,
    /// Largest header accepted.
    pub max_header_size: usize,
    /// Largest whole CAR accepted (default 4 GiB, several times the largest repositories).
    pub max_car_size: u64,
    /// Most blocks accepted (default 8 M, a repository of about 6 M records). This bounds
    /// the memory of a whole-repository load's block index (22 bytes a block).
    pub max_blocks: u64,
}

impl CarLimits {
    /// Default [`CarLimits::max_car_size`].
    pub const DEFAULT_MAX_CAR_SIZE: u64 = 4 << 30;
    /// Default [`CarLimits::max_blocks`].
    pub const DEFAULT_MAX_BLOCKS: u64 = 8_000_000;
}

impl Default for CarLimits {
    fn default() -> CarLimits {
        CarLimits {
            max_block_size: 4 << 20,
            max_header_size: 64 << 10,
            max_car_size: CarLimits::DEFAULT_MAX_CAR_SIZE,
            max_blocks: CarLimits::DEFAULT_MAX_BLOCKS,
        }
    }
}

/// The CAR header: the roots (for atproto, `roots[0]` is the commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarHeader {
    /// Root CIDs in order.
    pub roots: Vec<Cid>,
}

/// One verified block, borrowed from the reader.
#[derive(Debug, Clone, Copy)]
pub struct Block<'a> {
    /// The block's CID; the data is known to hash to it.
    pub cid: Cid,
    /// The block's bytes.
    pub data: &'a [u8],
}

const READ_CHUNK: usize = 256 << 10;
const MIN_READ_CHUNK: usize = 8 << 10;

/// What the parser found in its buffer.
enum Parsed {
    /// More bytes are needed; at least this many more in total from the current position.
    Need(usize),
    /// A block occupies `start..end` of the buffer; the CID is checked.
    Block {
        cid: Cid,
        data_start: usize,
        end: usize,
    },
}

/// The sans-I/O core: holds the buffer (a growing `Vec` for a stream, a borrowed slice for a
/// CAR already in memory) and the stream position.
struct CarParser<B = Vec<u8>> {
    buf: B,
    /// Start of unconsumed bytes in `buf`.
    pos: usize,
    /// End of filled bytes in `buf`.
    filled: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    limits: CarLimits,
    eof: bool,
    /// Blocks handed out so far.
    blocks: u64,
    /// The digest of the block at this stream offset (compacting the buffer moves bytes,
    /// not offsets), hashed beside the block before it (see [`sha256_pair`]).
    ahead: Option<(u64, [u8; 32])>,
}

impl CarParser {
    /// A parser reading into `buf` (emptied; its capacity is reused).
    fn new(limits: CarLimits, mut buf: Vec<u8>) -> CarParser {
        buf.clear();
        CarParser {
            buf,
            pos: 0,
            filled: 0,
            base: 0,
            limits,
            eof: false,
            blocks: 0,
            ahead: None,
        }
    }

    /// Makes room for the next read and returns the spare slice. `need` (bytes wanted from
    /// `pos`) only decides whether to compact: the buffer grows by at most one read chunk
    /// past what has arrived, so a declared length never allocates ahead of its bytes.
    fn spare(&mut self, need: usize) -> &mut [u8] {
        if self.pos > 0
            && (self.pos == self.filled
                || self.buf.len() - self.pos < need.min(self.buf.len()) + READ_CHUNK / 2)
        {
            self.buf.copy_within(self.pos..self.filled, 0);
            self.base += self.pos as u64;
            self.filled -= self.pos;
            self.pos = 0;
        }
        // Start small and double up to READ_CHUNK: zeroing a large buffer would cost more
        // than reading a small CAR. Grow only when little room is left: a socket's short
        // reads would otherwise grow it by every read that leaves it not quite full.
        let chunk = self.buf.len().clamp(MIN_READ_CHUNK, READ_CHUNK);
        if self.buf.len() - self.filled < chunk / 2 {
            self.buf.resize(self.filled + chunk, 0);
        }
        &mut self.buf[self.filled..]
    }

    fn commit_read(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            self.eof = true;
        }
        self.filled += n;
        let total = self.base + self.filled as u64;
        if total > self.limits.max_car_size {
            return Err(Error::LimitExceeded {
                what: "CAR size",
                limit: self.limits.max_car_size,
                found: total,
            });
        }
        Ok(())
    }

    /// Consumes the block `parse_block` found and lends it out.
    fn accept(&mut self, cid: Cid, data_start: usize, end: usize) -> Block<'_> {
        self.pos = end;
        Block {
            cid,
            data: &self.buf[data_start..end],
        }
    }
}

impl<B: AsRef<[u8]>> CarParser<B> {
    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Reads a varint at `pos`; `Ok(None)` when more bytes are needed.
    fn varint(&self) -> Result<Option<(u64, usize)>> {
        read_uvarint(&self.buf.as_ref()[self.pos..self.filled])
            .map_err(|err| self.car_error(format!("length {err}")))
    }

    fn car_error(&self, reason: impl Into<String>) -> Error {
        Error::Car {
            offset: self.offset(),
            reason: reason.into(),
        }
    }

    /// The header, or how many bytes are needed before it can be parsed.
    fn parse_header(&mut self) -> Result<std::result::Result<CarHeader, usize>> {
        let Some((len, varint_len)) = self.varint()? else {
            return Ok(Err(10));
        };
        if len == 0 {
            return Err(self.car_error("empty header"));
        }
        if len > self.limits.max_header_size as u64 {
            return Err(Error::LimitExceeded {
                what: "CAR header size",
                limit: self.limits.max_header_size as u64,
                found: len,
            });
        }
        let total = varint_len + len as usize;
        if self.filled - self.pos < total {
            return Ok(Err(total));
        }
        let bytes = &self.buf.as_ref()[self.pos + varint_len..self.pos + total];
        let header = decode_header(bytes).map_err(|reason| self.car_error(reason))?;
        self.pos += total;
        Ok(Ok(header))
    }

    /// Tries to parse the next block at `pos`; `Ok(None)` at a clean end of input.
    fn parse_block(&mut self) -> Result<Option<Parsed>> {
        if self.pos == self.filled && self.eof {
            return Ok(None);
        }
        let Some((len, varint_len)) = self.varint()? else {
            return Ok(Some(Parsed::Need(10)));
        };
        if len == 0 {
            return Err(self.car_error("zero-length block"));
        }
        if len > self.limits.max_block_size as u64 {
            return Err(Error::LimitExceeded {
                what: "CAR block size",
                limit: self.limits.max_block_size as u64,
                found: len,
            });
        }
        let total = varint_len + len as usize;
        if self.filled - self.pos < total {
            return Ok(Some(Parsed::Need(total)));
        }
        let start = self.pos + varint_len;
        let end = self.pos + total;
        let block = &self.buf.as_ref()[start..end];
        let (cid, cid_len) = Cid::read_prefix(&block[..block.len().min(MAX_CID_BYTES)])
            .map_err(|err| self.car_error(format!("block CID: {err}")))?;
        let data = &block[cid_len..];
        let digest = match self.ahead.take() {
            Some((at, digest)) if at == self.base + self.pos as u64 => digest,
            _ => match self.next_data(end) {
                Some(next) => {
                    let (digest, next_digest) = sha256_pair(data, next);
                    self.ahead = Some((self.base + end as u64, next_digest));
                    digest
                }
                None => sha256(data),
            },
        };
        let actual = Cid::from_parts(cid.codec(), digest);
        if actual != cid {
            return Err(Error::HashMismatch { cid, actual });
        }
        if self.blocks >= self.limits.max_blocks {
            return Err(Error::LimitExceeded {
                what: "CAR block count",
                limit: self.limits.max_blocks,
                found: self.blocks + 1,
            });
        }
        self.blocks += 1;
        Ok(Some(Parsed::Block {
            cid,
            data_start: start + cid_len,
            end,
        }))
    }

    /// The data of the block at `at` if it lies whole in the buffer and its length and CID
    /// parse, so it can be hashed beside the block before it; whatever is wrong with it is
    /// reported when the parser reaches it.
    fn next_data(&self, at: usize) -> Option<&[u8]> {
        let bytes = self.buf.as_ref().get(at..self.filled)?;
        let (len, varint_len) = read_uvarint(bytes).ok()??;
        if len == 0 || len > self.limits.max_block_size as u64 {
            return None;
        }
        let block = bytes.get(varint_len..varint_len + len as usize)?;
        let (_, cid_len) = Cid::read_prefix(&block[..block.len().min(MAX_CID_BYTES)]).ok()?;
        block.get(cid_len..)
    }

    fn truncated(&self, context: &'static str) -> Error {
        Error::Truncated {
            offset: self.base + self.filled as u64,
            context,
        }
    }
}

/// Reads a CAR held whole in `bytes` without copying a block: each block is hashed and handed
/// to `block` as its CID and the range of its data in `bytes`. Returns the header and the
/// number of blocks.
pub(crate) fn blocks_in_place(
    bytes: &[u8],
    limits: CarLimits,
    mut block: impl FnMut(Cid, usize, usize) -> Result<()>,
) -> Result<(CarHeader, u64)> {
    let len = bytes.len();
    if len as u64 > limits.max_car_size {
        return Err(Error::LimitExceeded {
            what: "CAR size",
            limit: limits.max_car_size,
            found: len as u64,
        });
    }
    let mut parser = CarParser {
        buf: bytes,
        pos: 0,
        filled: len,
        base: 0,
        limits,
        eof: true,
        blocks: 0,
        ahead: None,
    };
    let header = match parser.parse_header()? {
        Ok(header) => header,
        Err(_) => return Err(parser.truncated("CAR header")),
    };
    loop {
        match parser.parse_block()? {
            None => break,
            Some(Parsed::Need(_)) => return Err(parser.truncated("CAR block")),
            Some(Parsed::Block {
                cid,
                data_start,
                end,
            }) => {
                parser.pos = end;
                block(cid, data_start, end - data_start)?;
            }
        }
    }
    Ok((header, parser.blocks))
}

fn decode_header(bytes: &[u8]) -> std::result::Result<CarHeader, String> {
    let mut decoder = Decoder::new(bytes);
    let fields = decoder.map_len().map_err(|err| format!("header: {err}"))?;
    let mut roots = None;
    let mut version = None;
    for _ in 0..fields {
        // Header key order is not checked: the header is not hashed, and writers differ.
        let key = decoder.key().map_err(|err| format!("header: {err}"))?;
        match key {
            "roots" => {
                let n = decoder
                    .array_len()
                    .map_err(|err| format!("header roots: {err}"))?;
                // A count from input never sizes an allocation beyond a few entries.
                let mut list = Vec::with_capacity(n.min(4));
                for _ in 0..n {
                    list.push(
                        decoder
                            .link()
                            .map_err(|err| format!("header root: {err}"))?,
                    );
                }
                roots = Some(list);
            }
            "version" => {
                version = Some(
                    decoder
                        .u64()
                        .map_err(|err| format!("header version: {err}"))?,
                )
            }
            other => return Err(format!("header has unexpected field {other:?}")),
        }
    }
    decoder.finish().map_err(|err| format!("header: {err}"))?;
    match version {
        Some(1) => {}
        Some(other) => return Err(format!("CAR version {other} is not supported (only 1)")),
        None => return Err("header has no version".to_owned()),
    }
    let roots = roots.ok_or("header has no roots")?;
    Ok(CarHeader { roots })
}

/// Reads a CAR from a blocking [`Read`], verifying each block as it is returned.
pub struct CarReader<R> {
    reader: R,
    parser: CarParser,
    header: CarHeader,
}

impl<R: Read> CarReader<R> {
    /// Reads and checks the header.
    pub fn new(reader: R, limits: CarLimits) -> Result<CarReader<R>> {
        CarReader::with_buffer(reader, limits, Vec::new())
    }

    /// Like [`CarReader::new`], reading into `buffer`'s memory (from [`CarReader::into_buffer`]).
    pub fn with_buffer(reader: R, limits: CarLimits, buffer: Vec<u8>) -> Result<CarReader<R>> {
        let mut car = CarReader {
            reader,
            parser: CarParser::new(limits, buffer),
            header: CarHeader { roots: Vec::new() },
        };
        loop {
            match car.parser.parse_header()? {
                Ok(header) => {
                    car.header = header;
                    return Ok(car);
                }
                Err(need) => car.fill(need, "CAR header")?,
            }
        }
    }

    fn fill(&mut self, need: usize, context: &'static str) -> Result<()> {
        if self.parser.eof {
            return Err(self.parser.truncated(context));
        }
        let spare = self.parser.spare(need);
        let n = loop {
            match self.reader.read(spare) {
                Ok(n) => break n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err.into()),
            }
        };
        self.parser.commit_read(n)
    }

    /// The header.
    pub fn header(&self) -> &CarHeader {
        &self.header
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.parser.offset()
    }

    /// Bytes the read buffer holds: what reading costs in memory beyond the caller's blocks.
    pub fn buffer_len(&self) -> usize {
        self.parser.buf.len()
    }

    /// The read buffer, for the next reader to reuse.
    pub fn into_buffer(self) -> Vec<u8> {
        self.parser.buf
    }

    /// The next block, hashed and checked against its CID; `None` at the end.
    pub fn next_block(&mut self) -> Result<Option<Block<'_>>> {
        loop {
            match self.parser.parse_block()? {
                None => return Ok(None),
                Some(Parsed::Need(need)) => self.fill(need, "CAR block")?,
                Some(Parsed::Block {
                    cid,
                    data_start,
                    end,
                }) => return Ok(Some(self.parser.accept(cid, data_start, end))),
            }
        }
    }
}

/// Reads a CAR from an [`AsyncRead`] (an HTTP body), verifying each block.
pub struct AsyncCarReader<R> {
    reader: R,
    parser: CarParser,
    header: CarHeader,
}

impl<R: AsyncRead + Unpin> AsyncCarReader<R> {
    /// Reads and checks the header.
    pub async fn new(reader: R, limits: CarLimits) -> Result<AsyncCarReader<R>> {
        AsyncCarReader::with_buffer(reader, limits, Vec::new()).await
    }

    /// Like [`AsyncCarReader::new`], reading into `buffer`'s memory.
    pub async fn with_buffer(
        reader: R,
        limits: CarLimits,
        buffer: Vec<u8>,
    ) -> Result<AsyncCarReader<R>> {
        let mut car = AsyncCarReader {
            reader,
            parser: CarParser::new(limits, buffer),
            header: CarHeader { roots: Vec::new() },
        };
        loop {
            match car.parser.parse_header()? {
                Ok(header) => {
                    car.header = header;
                    return Ok(car);
                }
                Err(need) => car.fill(need, "CAR header").await?,
            }
        }
    }

    async fn fill(&mut self, need: usize, context: &'static str) -> Result<()> {
        if self.parser.eof {
            return Err(self.parser.truncated(context));
        }
        let spare = self.parser.spare(need);
        let n = self.reader.read(spare).await?;
        self.parser.commit_read(n)
    }

    /// The header.
    pub fn header(&self) -> &CarHeader {
        &self.header
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.parser.offset()
    }

    /// Bytes the read buffer holds: what reading costs in memory beyond the caller's blocks.
    pub fn buffer_len(&self) -> usize {
        self.parser.buf.len()
    }

    /// The read buffer, for the next reader to reuse.
    pub fn into_buffer(self) -> Vec<u8> {
        self.parser.buf
    }

    /// The next block, hashed and checked against its CID; `None` at the end.
    pub async fn next_block(&mut self) -> Result<Option<Block<'_>>> {
        loop {
            match self.parser.parse_block()? {
                None => return Ok(None),
                Some(Parsed::Need(need)) => self.fill(need, "CAR block").await?,
                Some(Parsed::Block {
                    cid,
                    data_start,
                    end,
                }) => return Ok(Some(self.parser.accept(cid, data_start, end))),
            }
        }
    }
}

/// Writes a CAR v1 stream: a header with the given roots, then blocks in the order given.
pub struct CarWriter<W> {
    writer: W,
    scratch: Vec<u8>,
}

impl<W: Write> CarWriter<W> {
    /// Writes the header.
    pub fn new(mut writer: W, roots: &[Cid]) -> std::io::Result<CarWriter<W>> {
        let header = encode_header(roots);
        let mut scratch = Vec::with_capacity(16);
        write_uvarint(header.len() as u64, &mut scratch);
        writer.write_all(&scratch)?;
        writer.write_all(&header)?;
        Ok(CarWriter { writer, scratch })
    }

    /// Writes one block. The caller is trusted to pass bytes that hash to `cid`.
    pub fn write_block(&mut self, cid: &Cid, data: &[u8]) -> std::io::Result<()> {
        self.scratch.clear();
        write_uvarint((cid.encoded_len() + data.len()) as u64, &mut self.scratch);
        cid.write_bytes(&mut self.scratch);
        self.writer.write_all(&self.scratch)?;
        self.writer.write_all(data)
    }

    /// Flushes and returns the inner writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.writer.flush()?;
        Ok(self.writer)
    }
}

/// The DRISL header `{roots, version: 1}`.
fn encode_header(roots: &[Cid]) -> Vec<u8> {
    let mut encoder = Encoder::new();
    encoder.map(2);
    encoder.text("roots");
    encoder.array(roots.len());
    for root in roots {
        encoder.link(root);
    }
    encoder.text("version");
    encoder.u64(1);
    encoder.into_bytes()
}

/// A whole CAR in memory: the header, then each `(cid, data)` block.
pub fn write_car<'a>(
    roots: &[Cid],
    blocks: impl IntoIterator<Item = (&'a Cid, &'a [u8])>,
) -> Vec<u8> {
    let mut out = Vec::new();
    let header = encode_header(roots);
    write_uvarint(header.len() as u64, &mut out);
    out.extend_from_slice(&header);
    for (cid, data) in blocks {
        write_uvarint((cid.encoded_len() + data.len()) as u64, &mut out);
        cid.write_bytes(&mut out);
        out.extend_from_slice(data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, Vec<(Cid, Vec<u8>)>) {
        let blocks: Vec<(Cid, Vec<u8>)> = (0..100u32)
            .map(|i| {
                let mut encoder = Encoder::new();
                encoder.text(&format!("block number {i} {}", "x".repeat(i as usize * 37)));
                let data = encoder.into_bytes();
                (Cid::dag_cbor(&data), data)
            })
            .collect();
        let car = write_car(
            &[blocks[0].0],
            blocks.iter().map(|(c, d)| (c, d.as_slice())),
        );
        (car, blocks)
    }

    /// Reads in one-byte steps to exercise every buffer boundary.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let Some((&first, rest)) = self.0.split_first() else {
                return Ok(0);
            };
            if buf.is_empty() {
                return Ok(0);
            }
            buf[0] = first;
            self.0 = rest;
            Ok(1)
        }
    }

    #[test]
    fn round_trip_in_any_chunking() -> Result<()> {
        let (car, blocks) = sample();
        let mut reader = CarReader::new(Trickle(&car), CarLimits::default())?;
        assert_eq!(reader.header().roots, vec![blocks[0].0]);
        let mut seen = Vec::new();
        while let Some(block) = reader.next_block()? {
            seen.push((block.cid, block.data.to_vec()));
        }
        assert_eq!(seen, blocks);
        assert_eq!(reader.offset(), car.len() as u64);
        Ok(())
    }

    #[test]
    fn detects_hash_mismatch() -> Result<()> {
        let (mut car, _) = sample();
        let last = car.len() - 1;
        car[last] ^= 1;
        let mut reader = CarReader::new(car.as_slice(), CarLimits::default())?;
        let result = loop {
            match reader.next_block() {
                Ok(Some(_)) => continue,
                other => break other.map(|_| ()),
            }
        };
        assert!(
            matches!(result, Err(Error::HashMismatch { .. })),
            "{result:?}"
        );
        Ok(())
    }

    /// Blocks are hashed two at a time; a bad block is still refused at its own turn, after
    /// every block before it was handed out, however the bytes arrive.
    #[test]
    fn a_block_hashed_ahead_is_judged_at_its_turn() -> Result<()> {
        let (car, blocks) = sample();
        for bad in [0, 1, 2, 50, 51, 98, 99] {
            let data = &blocks[bad].1;
            let at = car
                .windows(data.len())
                .position(|window| window == data.as_slice())
                .ok_or_else(|| std::io::Error::other("block not found"))?;
            let mut corrupt = car.clone();
            corrupt[at + data.len() - 1] ^= 1;
            let expect = |seen: Vec<Cid>, result: Result<()>| {
                let want: Vec<Cid> = blocks[..bad].iter().map(|(cid, _)| *cid).collect();
                assert_eq!(seen, want, "block {bad}");
                assert!(
                    matches!(result, Err(Error::HashMismatch { cid, .. }) if cid == blocks[bad].0),
                    "block {bad}: {result:?}"
                );
            };
            for trickle in [false, true] {
                let source: Box<dyn Read> = if trickle {
                    Box::new(Trickle(&corrupt))
                } else {
                    Box::new(corrupt.as_slice())
                };
                let mut reader = CarReader::new(source, CarLimits::default())?;
                let mut seen = Vec::new();
                let result = loop {
                    match reader.next_block() {
                        Ok(Some(block)) => seen.push(block.cid),
                        other => break other.map(|_| ()),
                    }
                };
                expect(seen, result);
            }
            let mut seen = Vec::new();
            let result = blocks_in_place(&corrupt, CarLimits::default(), |cid, _, _| {
                seen.push(cid);
                Ok(())
            })
            .map(|_| ());
            expect(seen, result);
        }
        Ok(())
    }

    #[test]
    fn detects_truncation() -> Result<()> {
        let (car, _) = sample();
        let cut = &car[..car.len() - 3];
        let mut reader = CarReader::new(cut, CarLimits::default())?;
        let result = loop {
            match reader.next_block() {
                Ok(Some(_)) => continue,
                other => break other.map(|_| ()),
            }
        };
        assert!(matches!(result, Err(Error::Truncated { .. })), "{result:?}");
        Ok(())
    }

    #[test]
    fn block_size_limit() {
        let (car, _) = sample();
        let limits = CarLimits {
            max_block_size: 64,
            ..CarLimits::default()
        };
        let result = CarReader::new(car.as_slice(), limits).and_then(|mut reader| {
            while reader.next_block()?.is_some() {}
            Ok(())
        });
        assert!(
            matches!(result, Err(Error::LimitExceeded { .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn async_reader_matches_sync() -> Result<()> {
        let (car, blocks) = sample();
        let mut reader = AsyncCarReader::new(car.as_slice(), CarLimits::default()).await?;
        let mut n = 0;
        while let Some(block) = reader.next_block().await? {
            assert_eq!(block.cid, blocks[n].0);
            n += 1;
        }
        assert_eq!(n, blocks.len());
        Ok(())
    }
}
