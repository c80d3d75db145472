//! Verification refuses every kind of tampering, naming the check that failed.

use atpdb_repo::blocks::VerifiedBlocks;
use atpdb_repo::car::{CarLimits, CarReader, write_car};
use atpdb_repo::commit::Commit;
use atpdb_repo::crypto::{Curve, KeyError, PublicKey};
use atpdb_repo::mst::{Tree, decode_node};
use atpdb_repo::sample::{sample_did, write_sample_car};
use atpdb_repo::syntax::Did;
use atpdb_repo::verify::{Expected, VerifyOptions, load_car};
use atpdb_repo::{Cid, Error};

type TestResult = Result<(), Box<dyn std::error::Error>>;

struct Sample {
    car: Vec<u8>,
    did: Did,
    key: PublicKey,
    /// `(cid, data offset in the CAR, data length)` per block, in file order.
    blocks: Vec<(Cid, usize, usize)>,
    root: Cid,
}

fn sample(curve: Curve) -> Result<Sample, Error> {
    let (car, summary) = write_sample_car(42, 300, curve, Vec::new())?;
    let mut reader = CarReader::new(car.as_slice(), CarLimits::default())?;
    let root = reader.header().roots[0];
    let mut blocks = Vec::new();
    while let Some(block) = reader.next_block()? {
        let (cid, len) = (block.cid, block.data.len());
        blocks.push((cid, reader.offset() as usize - len, len));
    }
    Ok(Sample {
        car,
        did: summary.did,
        key: summary.key.public(),
        blocks,
        root,
    })
}

/// Loads, checks the commit and its signature, and walks every record.
fn verify(car: &[u8], did: Option<&Did>, key: &PublicKey) -> Result<usize, Error> {
    let repo = load_car(car, &VerifyOptions::default())?.verify(Expected { did, key })?;
    let mut records = repo.records();
    let mut count = 0;
    while records.next_record()?.is_some() {
        count += 1;
    }
    Ok(count)
}

/// Loads and walks every record without a key: the tree's checks, not the signature's.
fn walk_unsigned(car: &[u8]) -> Result<usize, Error> {
    let loaded = load_car(car, &VerifyOptions::default())?;
    let (_, mut records) = loaded.walk_unsigned()?;
    let mut count = 0;
    while records.next_record()?.is_some() {
        count += 1;
    }
    Ok(count)
}

#[test]
fn untouched_sample_verifies_on_both_curves() -> TestResult {
    for curve in [Curve::K256, Curve::P256] {
        let sample = sample(curve)?;
        assert_eq!(verify(&sample.car, Some(&sample.did), &sample.key)?, 301);
        assert_eq!(walk_unsigned(&sample.car)?, 301);
    }
    Ok(())
}

#[test]
fn one_changed_byte_in_any_block_is_a_hash_mismatch() -> TestResult {
    let sample = sample(Curve::K256)?;
    let node_count = sample
        .blocks
        .iter()
        .filter(|(cid, offset, len)| {
            *cid != sample.root && decode_node(&sample.car[*offset..offset + len]).is_ok()
        })
        .count();
    assert!(node_count > 10, "the sample should have MST nodes");
    // Every block: records, MST nodes and the commit; at the first, middle and last byte.
    for &(cid, offset, len) in &sample.blocks {
        for position in [offset, offset + len / 2, offset + len - 1] {
            let mut car = sample.car.clone();
            car[position] ^= 0x01;
            match verify(&car, None, &sample.key) {
                Err(Error::HashMismatch { cid: claimed, .. }) => assert_eq!(claimed, cid),
                other => panic!(
                    "byte {position} of block {cid}: expected a hash mismatch, got {other:?}"
                ),
            }
        }
    }
    Ok(())
}

/// Replaces one record and rehashes every block up to a new commit, keeping the old signature.
#[test]
fn consistent_rewrite_without_the_key_fails_the_signature() -> TestResult {
    let sample = sample(Curve::K256)?;
    let mut blocks = VerifiedBlocks::new();
    for &(cid, offset, len) in &sample.blocks {
        blocks.insert(cid, sample.car[offset..offset + len].to_vec())?;
    }
    let commit = Commit::from_cbor(sample.root, blocks.get(&sample.root).ok_or("no commit")?)?;
    let (data, nodes) = {
        let mut tree = Tree::load(&blocks, commit.data);
        let (path, _) = tree.entries()?.into_iter().nth(7).ok_or("no records")?;
        let forged = atpdb_repo::value::Value::from_json(&serde_json::json!({"$type": "app.bsky.feed.post", "text": "forged", "createdAt": "2025-01-01T00:00:00Z"}))?.to_cbor();
        let forged_cid = Cid::dag_cbor(&forged);
        tree.insert(&path, forged_cid)?;
        let (data, mut nodes) = tree.changed_blocks();
        nodes.push((forged_cid, forged));
        (data, nodes)
    };
    for (cid, bytes) in nodes {
        blocks.insert(cid, bytes)?;
    }
    let forged_commit = Commit { data, ..commit };
    let forged_bytes = forged_commit.to_cbor();
    let forged_root = Cid::dag_cbor(&forged_bytes);
    blocks.insert(forged_root, forged_bytes)?;
    let car = write_car(&[forged_root], blocks.iter());
    // Without a key it is a well-formed repository; with the key it is refused.
    assert_eq!(walk_unsigned(&car)?, 301);
    let result = verify(&car, Some(&sample.did), &sample.key);
    assert!(
        matches!(
            result,
            Err(Error::BadSignature {
                source: KeyError::BadSignature { .. },
                ..
            })
        ),
        "{result:?}"
    );
    Ok(())
}

#[test]
fn wrong_key_fails() -> TestResult {
    let sample = sample(Curve::K256)?;
    let other = atpdb_repo::sample::sample_keypair(7, Curve::K256).public();
    let result = verify(&sample.car, None, &other);
    assert!(
        matches!(result, Err(Error::BadSignature { .. })),
        "{result:?}"
    );
    let p256 = atpdb_repo::sample::sample_keypair(7, Curve::P256).public();
    let result = verify(&sample.car, None, &p256);
    assert!(
        matches!(result, Err(Error::BadSignature { .. })),
        "{result:?}"
    );
    Ok(())
}

/// n − s for secp256k1: the high-S twin of a valid signature.
fn high_s(sig: &[u8]) -> Vec<u8> {
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xfe, 0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36,
        0x41, 0x41,
    ];
    let mut out = sig.to_vec();
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let difference = i16::from(N[i]) - i16::from(sig[32 + i]) - borrow;
        borrow = i16::from(difference < 0);
        out[32 + i] = difference.rem_euclid(256) as u8;
    }
    out
}

fn with_signature(sample: &Sample, sig: Vec<u8>) -> Result<Vec<u8>, Error> {
    let mut blocks: Vec<(Cid, Vec<u8>)> = sample
        .blocks
        .iter()
        .map(|&(cid, offset, len)| (cid, sample.car[offset..offset + len].to_vec()))
        .collect();
    let (_, commit_bytes) =
        blocks
            .iter()
            .find(|(cid, _)| *cid == sample.root)
            .ok_or(Error::Car {
                offset: 0,
                reason: "no commit".to_owned(),
            })?;
    let commit = Commit::from_cbor(sample.root, commit_bytes)?;
    let bytes = Commit { sig, ..commit }.to_cbor();
    let root = Cid::dag_cbor(&bytes);
    blocks.retain(|(cid, _)| *cid != sample.root);
    blocks.push((root, bytes));
    Ok(write_car(
        &[root],
        blocks.iter().map(|(cid, bytes)| (cid, bytes.as_slice())),
    ))
}

#[test]
fn high_s_and_der_signatures_fail() -> TestResult {
    let sample = sample(Curve::K256)?;
    let commit_bytes = &sample
        .blocks
        .iter()
        .find(|b| b.0 == sample.root)
        .map(|&(_, o, l)| sample.car[o..o + l].to_vec())
        .ok_or("no commit")?;
    let commit = Commit::from_cbor(sample.root, commit_bytes)?;
    let car = with_signature(&sample, high_s(&commit.sig))?;
    let result = verify(&car, None, &sample.key);
    assert!(
        matches!(
            result,
            Err(Error::BadSignature {
                source: KeyError::HighS { .. },
                ..
            })
        ),
        "{result:?}"
    );

    // The same r and s wrapped in ASN.1 DER.
    let mut der = vec![0x30, 0x44, 0x02, 0x20];
    der.extend_from_slice(&commit.sig[..32]);
    der.extend_from_slice(&[0x02, 0x20]);
    der.extend_from_slice(&commit.sig[32..]);
    let car = with_signature(&sample, der)?;
    let result = verify(&car, None, &sample.key);
    // Refused as DER, by its form, not merely as some bad signature (issue 11).
    assert!(
        matches!(
            result,
            Err(Error::BadSignature {
                source: KeyError::DerSignature { len: 70 },
                ..
            })
        ),
        "{result:?}"
    );
    Ok(())
}

#[test]
fn other_did_fails() -> TestResult {
    let sample = sample(Curve::K256)?;
    let other = sample_did(99);
    let result = verify(&sample.car, Some(&other), &sample.key);
    assert!(
        matches!(result, Err(Error::DidMismatch { .. })),
        "{result:?}"
    );
    Ok(())
}

#[test]
fn truncation_anywhere_fails() -> TestResult {
    let sample = sample(Curve::K256)?;
    let len = sample.car.len();
    for cut in (1..40).map(|i| len * i / 40).chain([1, 5, len - 1]) {
        let result = verify(&sample.car[..cut], None, &sample.key);
        let inside_block = sample
            .blocks
            .iter()
            .any(|&(_, offset, l)| cut > offset.saturating_sub(40) && cut < offset + l);
        match result {
            Err(Error::Truncated { .. }) => {}
            // A cut exactly between blocks leaves a well-formed CAR that lacks blocks.
            Err(Error::MissingBlock { .. }) if !inside_block => {}
            other => panic!("cut at {cut} of {len}: expected truncation, got {other:?}"),
        }
    }
    Ok(())
}

/// Fuzzing finding: the commit's codec byte could be switched to raw in header and block CID.
#[test]
fn commit_cid_must_be_dag_cbor() -> TestResult {
    let sample = sample(Curve::K256)?;
    let blocks: Vec<(Cid, Vec<u8>)> = sample
        .blocks
        .iter()
        .map(|&(cid, offset, len)| {
            let cid = if cid == sample.root {
                Cid::from_parts(atpdb_repo::cid::RAW, *cid.digest())
            } else {
                cid
            };
            (cid, sample.car[offset..offset + len].to_vec())
        })
        .collect();
    let raw_root = Cid::from_parts(atpdb_repo::cid::RAW, *sample.root.digest());
    let car = write_car(&[raw_root], blocks.iter().map(|(c, d)| (c, d.as_slice())));
    let result = verify(&car, None, &sample.key);
    assert!(matches!(result, Err(Error::Commit { .. })), "{result:?}");
    Ok(())
}

/// A CAR read whole (`load_car_whole`) is held to exactly the checks of a streamed one: the
/// same records when intact, the same error when tampered or cut.
#[test]
fn whole_and_streamed_loads_agree() -> TestResult {
    use atpdb_repo::verify::{Scratch, load_car_whole};
    let sample = sample(Curve::K256)?;
    let records =
        |loaded: atpdb_repo::verify::LoadedCar| -> Result<Vec<atpdb_repo::Record>, Error> {
            loaded
                .verify(Expected {
                    did: Some(&sample.did),
                    key: &sample.key,
                })?
                .records()
                .collect()
        };
    let streamed = records(load_car(sample.car.as_slice(), &VerifyOptions::default())?)?;
    let whole = records(load_car_whole(
        sample.car.as_slice(),
        sample.car.len() as u64,
        &VerifyOptions::default(),
        Scratch::default(),
    )?)?;
    assert_eq!(streamed, whole);
    let len = sample.car.len();
    let mut variants = Vec::new();
    for &(_, offset, block_len) in sample.blocks.iter().step_by(7) {
        let mut flipped = sample.car.clone();
        flipped[offset + block_len / 2] ^= 0x01;
        variants.push(flipped);
    }
    for cut in [1, 5, len / 3, len / 2, len - 1] {
        variants.push(sample.car[..cut].to_vec());
    }
    for car in &variants {
        let streamed = load_car(car.as_slice(), &VerifyOptions::default()).and_then(records);
        // No size hint: the reader's length is all there is.
        let whole = load_car_whole(
            car.as_slice(),
            0,
            &VerifyOptions::default(),
            Scratch::default(),
        )
        .and_then(records);
        match (&streamed, &whole) {
            (Err(a), Err(b)) => assert_eq!(
                std::mem::discriminant(a),
                std::mem::discriminant(b),
                "streamed: {a}; whole: {b}"
            ),
            _ => panic!("expected both to fail: streamed {streamed:?}, whole {whole:?}"),
        }
    }
    Ok(())
}
