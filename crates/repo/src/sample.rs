//! Deterministic, realistic repository content: records for samples, benchmarks and the devnet.
//!
//! Everything derives from a seed through a small counter-based generator, so the same seed
//! gives the same bytes on every machine and a record can be regenerated from its index instead
//! of being kept in memory (that is how a 500 MB sample CAR is written in bounded memory).

use std::io::Write as IoWrite;

use serde_json::{Value as Json, json};

use crate::car::CarWriter;
use crate::cid::Cid;
use crate::commit::UnsignedCommit;
use crate::crypto::{Curve, Keypair};
use crate::error::{Error, Result};
use crate::mst::{NoBlocks, Tree};
use crate::syntax::{Did, Tid};
use crate::value::Value;

/// A splitmix64 generator: tiny, fast, and the same everywhere.
#[derive(Debug, Clone)]
pub struct SampleRng(u64);

impl SampleRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> SampleRng {
        SampleRng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }

    /// 32 random bytes.
    pub fn bytes32(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        out
    }

    /// Picks one item.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A signing key derived from a seed (retrying the rare out-of-range secret).
pub fn sample_keypair(seed: u64, curve: Curve) -> Keypair {
    let mut rng = SampleRng::new(seed.wrapping_mul(31).wrapping_add(7));
    loop {
        if let Ok(key) = Keypair::from_secret_bytes(curve, &rng.bytes32()) {
            return key;
        }
    }
}

/// A syntactically valid `did:plc` derived from a seed (not registered anywhere).
pub fn sample_did(seed: u64) -> Did {
    let mut rng = SampleRng::new(seed.wrapping_add(0xd1d));
    let alphabet = b"abcdefghijklmnopqrstuvwxyz234567";
    let suffix: String = (0..24).map(|_| char::from(*rng.pick(alphabet))).collect();
    match format!("did:plc:{suffix}").parse() {
        Ok(did) => did,
        // The alphabet and length above always give a valid DID.
        Err(_) => sample_did(seed.wrapping_add(1)),
    }
}

const WORDS: &[&str] = &[
    "sync",
    "repo",
    "firehose",
    "relay",
    "record",
    "commit",
    "tree",
    "merkle",
    "signature",
    "verify",
    "atproto",
    "bluesky",
    "feed",
    "post",
    "like",
    "follow",
    "block",
    "labeler",
    "appview",
    "backfill",
    "cursor",
    "stream",
    "the",
    "a",
    "and",
    "of",
    "to",
    "in",
    "is",
    "it",
    "on",
    "with",
    "today",
    "morning",
    "coffee",
    "music",
    "scrobble",
    "forum",
    "thread",
    "reply",
    "quote",
    "photo",
    "garden",
    "rust",
    "tokio",
    "async",
    "fast",
];

/// Writes a short sentence of `n` words.
fn sentence(rng: &mut SampleRng, n: u64) -> String {
    let mut text = String::new();
    for i in 0..n {
        if i > 0 {
            text.push(' ');
        }
        let word: &&str = rng.pick(WORDS);
        text.push_str(word);
    }
    text
}

/// A datetime string for a microsecond timestamp.
fn datetime(micros: u64) -> String {
    crate::syntax::Datetime::from_unix_micros(micros).to_string()
}

/// One generated record: where it goes and its JSON form.
#[derive(Debug, Clone)]
pub struct SampleRecord {
    /// The collection NSID.
    pub collection: &'static str,
    /// The record key.
    pub rkey: String,
    /// The record as atproto JSON.
    pub json: Json,
}

impl SampleRecord {
    /// `collection/rkey`.
    pub fn path(&self) -> String {
        format!("{}/{}", self.collection, self.rkey)
    }

    /// The record's DRISL bytes.
    pub fn to_cbor(&self) -> Result<Vec<u8>> {
        Ok(Value::from_json(&self.json)?.to_cbor())
    }
}

/// Generates record `index` of an account: a realistic mix of posts (with facets, image embeds
/// carrying blob refs, replies), likes, follows, reposts, blocks, and custom lexicons.
///
/// `others` are DIDs to follow, like and reply to; `micros` is the record's creation time.
pub fn sample_record(seed: u64, index: u64, micros: u64, others: &[Did]) -> SampleRecord {
    let mut rng = SampleRng::new(seed ^ index.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let rkey = Tid::from_parts(micros, (seed % 1024) as u16).to_string();
    let created_at = datetime(micros);
    let other = if others.is_empty() {
        sample_did(rng.next_u64())
    } else {
        rng.pick(others).clone()
    };
    let other_post = format!(
        "at://{other}/app.bsky.feed.post/{}",
        Tid::from_parts(micros / 2, 1)
    );
    let other_cid = Cid::dag_cbor(&rng.bytes32()).to_string();
    let roll = rng.below(100);
    let (collection, json) = match roll {
        0..=29 => {
            let words = 3 + rng.below(40);
            let text = sentence(&mut rng, words);
            let mut post = json!({"$type": "app.bsky.feed.post", "text": text, "createdAt": created_at, "langs": ["en"]});
            if rng.below(4) == 0 {
                let end = text.len().min(12);
                post["facets"] = json!([{
                    "index": {"byteStart": 0, "byteEnd": end},
                    "features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://example.com/atpdb"}]
                }]);
            }
            if rng.below(5) == 0 {
                post["reply"] = json!({
                    "root": {"uri": other_post, "cid": other_cid},
                    "parent": {"uri": other_post, "cid": other_cid}
                });
            }
            if rng.below(6) == 0 {
                let blob = Cid::raw(&rng.bytes32()).to_string();
                post["embed"] = json!({
                    "$type": "app.bsky.embed.images",
                    "images": [{
                        "alt": sentence(&mut rng, 4),
                        "image": {"$type": "blob", "ref": {"$link": blob}, "mimeType": "image/jpeg", "size": 20_000 + rng.below(900_000)},
                        "aspectRatio": {"width": 1200, "height": 800}
                    }]
                });
            }
            ("app.bsky.feed.post", post)
        }
        30..=69 => (
            "app.bsky.feed.like",
            json!({"$type": "app.bsky.feed.like", "subject": {"uri": other_post, "cid": other_cid}, "createdAt": created_at}),
        ),
        70..=81 => (
            "app.bsky.graph.follow",
            json!({"$type": "app.bsky.graph.follow", "subject": other.as_str(), "createdAt": created_at}),
        ),
        82..=89 => (
            "app.bsky.feed.repost",
            json!({"$type": "app.bsky.feed.repost", "subject": {"uri": other_post, "cid": other_cid}, "createdAt": created_at}),
        ),
        90..=91 => (
            "app.bsky.graph.block",
            json!({"$type": "app.bsky.graph.block", "subject": other.as_str(), "createdAt": created_at}),
        ),
        92..=96 => (
            "fm.teal.alpha.feed.play",
            json!({
                "$type": "fm.teal.alpha.feed.play",
                "trackName": sentence(&mut rng, 3),
                "artists": [{"artistName": sentence(&mut rng, 2)}],
                "duration": 120 + rng.below(300),
                "playedTime": created_at
            }),
        ),
        _ => (
            "com.example.forum.thread",
            json!({
                "$type": "com.example.forum.thread",
                "title": sentence(&mut rng, 5),
                "body": sentence(&mut rng, 60),
                "tags": [rng.pick(WORDS).to_string(), rng.pick(WORDS).to_string()],
                "createdAt": created_at
            }),
        ),
    };
    SampleRecord {
        collection,
        rkey,
        json,
    }
}

/// The profile record (`app.bsky.actor.profile/self`).
pub fn sample_profile(seed: u64) -> SampleRecord {
    let mut rng = SampleRng::new(seed ^ 0x9f0f);
    SampleRecord {
        collection: "app.bsky.actor.profile",
        rkey: "self".to_owned(),
        json: json!({
            "$type": "app.bsky.actor.profile",
            "displayName": sentence(&mut rng, 2),
            "description": sentence(&mut rng, 12),
        }),
    }
}

/// What [`write_sample_car`] produced.
#[derive(Debug, Clone)]
pub struct SampleSummary {
    /// The account.
    pub did: Did,
    /// The commit CID.
    pub commit: Cid,
    /// The commit's rev.
    pub rev: Tid,
    /// Records written.
    pub records: u64,
    /// The signing key (its public half verifies the commit).
    pub key: Keypair,
}

/// The start of sample time: 2025-01-01T00:00:00Z.
const SAMPLE_EPOCH_MICROS: u64 = 1_735_689_600_000_000;

/// What the records of a sample repository look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SampleShape {
    /// Posts, likes, follows, reposts and the rest, as [`sample_record`] makes them.
    #[default]
    Realistic,
    /// `{"$type": "com.example.tiny", "i": n}`: the most blocks per byte, for testing what
    /// a repository of very many small blocks costs.
    Tiny,
}

/// The tiny record `index`: its path and DRISL bytes.
fn tiny_record(index: u64, micros: u64) -> Result<(String, Vec<u8>)> {
    let json = serde_json::json!({"$type": "com.example.tiny", "i": index});
    let bytes = crate::value::Value::from_json(&json)?.to_cbor();
    let rkey = Tid::from_parts(micros, 0);
    Ok((format!("com.example.tiny/{rkey}"), bytes))
}

/// Writes a whole signed repository of `records` records (plus a profile) as a CAR.
///
/// Memory holds the MST (paths and CIDs), not the records: they are regenerated while writing.
/// Blocks are written records-first, then nodes, then the commit last — the opposite of the
/// "streamable" order, so readers are exercised on the order they must not assume.
pub fn write_sample_car<W: IoWrite>(
    seed: u64,
    records: u64,
    curve: Curve,
    writer: W,
) -> Result<(W, SampleSummary)> {
    write_sample_car_shaped(seed, records, curve, SampleShape::Realistic, writer)
}

/// [`write_sample_car`] with records of the given shape.
pub fn write_sample_car_shaped<W: IoWrite>(
    seed: u64,
    records: u64,
    curve: Curve,
    shape: SampleShape,
    writer: W,
) -> Result<(W, SampleSummary)> {
    write_sample_car_for(sample_did(seed), seed, records, curve, shape, writer)
}

/// [`write_sample_car_shaped`] for a DID of the caller's choosing (a did:web a test serves
/// the document of, for instance); the records still follow `seed`.
pub fn write_sample_car_for<W: IoWrite>(
    did: Did,
    seed: u64,
    records: u64,
    curve: Curve,
    shape: SampleShape,
    writer: W,
) -> Result<(W, SampleSummary)> {
    let key = sample_keypair(seed, curve);
    let others: Vec<Did> = (1..=16).map(|i| sample_did(seed.wrapping_add(i))).collect();
    let micros = |i: u64| SAMPLE_EPOCH_MICROS + i * 1_000_003;
    let mut tree = Tree::empty(NoBlocks);
    let profile = sample_profile(seed);
    let profile_bytes = profile.to_cbor()?;
    tree.insert(profile.path().as_bytes(), Cid::dag_cbor(&profile_bytes))?;
    let record = |i: u64| -> Result<(String, Vec<u8>)> {
        match shape {
            SampleShape::Realistic => {
                let record = sample_record(seed, i, micros(i), &others);
                Ok((record.path(), record.to_cbor()?))
            }
            SampleShape::Tiny => tiny_record(i, micros(i)),
        }
    };
    for i in 0..records {
        let (path, bytes) = record(i)?;
        tree.insert(path.as_bytes(), Cid::dag_cbor(&bytes))?;
    }
    let (data, nodes) = tree.changed_blocks();
    drop(tree);
    let rev = Tid::from_parts(micros(records) + 1, (seed % 1024) as u16);
    let commit = UnsignedCommit {
        did: did.clone(),
        data,
        rev: rev.clone(),
        prev: None,
    }
    .sign(&key);
    let commit_bytes = commit.to_cbor();
    let commit_cid = Cid::dag_cbor(&commit_bytes);

    let mut car = CarWriter::new(writer, &[commit_cid])?;
    car.write_block(&Cid::dag_cbor(&profile_bytes), &profile_bytes)?;
    for i in 0..records {
        let (_, bytes) = record(i)?;
        car.write_block(&Cid::dag_cbor(&bytes), &bytes)?;
    }
    for (cid, bytes) in &nodes {
        car.write_block(cid, bytes)?;
    }
    car.write_block(&commit_cid, &commit_bytes)?;
    let writer = car.finish().map_err(Error::Io)?;
    Ok((
        writer,
        SampleSummary {
            did,
            commit: commit_cid,
            rev,
            records: records + 1,
            key,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes() {
        assert_eq!(datetime(SAMPLE_EPOCH_MICROS), "2025-01-01T00:00:00.000Z");
        assert_eq!(
            datetime(951_782_400_000_000 + 1_500),
            "2000-02-29T00:00:00.001Z"
        );
        for micros in [0, SAMPLE_EPOCH_MICROS, SAMPLE_EPOCH_MICROS * 2] {
            assert!(
                datetime(micros).parse::<crate::syntax::Datetime>().is_ok(),
                "{}",
                datetime(micros)
            );
        }
    }

    #[test]
    fn records_are_valid_and_deterministic() -> Result<()> {
        for i in 0..500 {
            let a = sample_record(7, i, SAMPLE_EPOCH_MICROS + i, &[]);
            let b = sample_record(7, i, SAMPLE_EPOCH_MICROS + i, &[]);
            assert_eq!(a.to_cbor()?, b.to_cbor()?);
            crate::value::validate_record_json(&a.json)?;
            assert!(
                crate::syntax::is_valid_repo_path(a.path().as_bytes()),
                "{}",
                a.path()
            );
        }
        Ok(())
    }
}
