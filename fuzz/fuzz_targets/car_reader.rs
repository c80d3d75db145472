//! Arbitrary bytes as a CAR: the streaming reader, then load + verify + record walk.
//!
//! Each input runs twice when it is not already consistent: as given, and after
//! `atpdb_fuzz::fixup` has recomputed every CID and rewritten every link, so that mutated
//! commits, MST nodes and records get past the hash checks into the tree checks.
//!
//! Checks beyond "no panic": reading from a slice and from a reader that hands out 1–64 bytes
//! at a time gives the same blocks and the same outcome; `load_car` fails exactly when the
//! block loop does or the first root is missing or not dag-cbor; the record walk (`walk_unsigned`, as the key of a fuzzed commit is
//! unknowable) with a small memory budget (spilling to a temporary file) and the iterator
//! yields the same records, or the same error, as the default budget with `next_record`;
//! every yielded block and record hashes to its CID; `verify` with a key that signed nothing
//! always fails, with `BadSignature` when the commit decodes.
#![no_main]

use std::io::Read;

use atpdb_fuzz::{Chunked, fixup, input_hash, split_car, write_raw_car};
use std::sync::OnceLock;

use atpdb_repo::car::{CarLimits, CarReader};
use atpdb_repo::cid::DAG_CBOR;
use atpdb_repo::crypto::{Curve, PublicKey};
use atpdb_repo::sample::sample_keypair;
use atpdb_repo::verify::{Expected, VerifyOptions, load_car};
use atpdb_repo::{Cid, Error, Record};
use libfuzzer_sys::fuzz_target;

/// Blocks, or the error's message.
fn read_blocks(
    reader: impl Read,
    limits: CarLimits,
) -> Result<(Vec<Cid>, Vec<(Cid, Vec<u8>)>), String> {
    let mut car = CarReader::new(reader, limits).map_err(|e| e.to_string())?;
    let roots = car.header().roots.clone();
    let mut blocks = Vec::new();
    loop {
        match car.next_block() {
            Ok(Some(block)) => {
                assert!(
                    block.cid.matches(block.data),
                    "block does not hash to its CID"
                );
                blocks.push((block.cid, block.data.to_vec()));
            }
            Ok(None) => return Ok((roots, blocks)),
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// The records a walk yielded before it stopped, and the error it stopped with.
type Walk = (Vec<Record>, Option<String>);

enum Outcome {
    LoadFailed(String),
    Records(Result<Walk, String>),
}

/// A key that signed nothing here: verification with it must always fail.
fn stranger() -> &'static PublicKey {
    static KEY: OnceLock<PublicKey> = OnceLock::new();
    KEY.get_or_init(|| sample_keypair(99, Curve::K256).public())
}

/// Loads the CAR and walks its records without a key (`walk_unsigned`: the key of a fuzzed
/// commit is unknowable). `borrowed` walks with `next_record`, otherwise with the iterator.
fn records(car: &[u8], options: &VerifyOptions, borrowed: bool) -> Outcome {
    let loaded = match load_car(car, options) {
        Ok(loaded) => loaded,
        Err(err) => return Outcome::LoadFailed(err.to_string()),
    };
    let commit = loaded.commit();
    let walked = match loaded.walk_unsigned() {
        Ok((walk_commit, mut walker)) => {
            let commit = commit
                .as_ref()
                .expect("walk_unsigned decoded a commit commit() refused");
            assert!(
                walk_commit == *commit,
                "walk_unsigned decoded another commit"
            );
            let mut out = Vec::new();
            let mut error = None;
            if borrowed {
                loop {
                    match walker.next_record() {
                        Ok(Some(record)) => {
                            assert!(
                                record.cid.matches(record.bytes),
                                "record does not hash to its CID"
                            );
                            assert!(record.did == &commit.did, "record of another account");
                            match record.to_record() {
                                Ok(owned) => {
                                    assert_eq!(owned.collection().as_str(), record.collection);
                                    assert_eq!(owned.rkey().as_str(), record.rkey);
                                    assert_eq!(owned.cid(), record.cid);
                                    assert!(owned.bytes() == record.bytes);
                                    out.push(owned);
                                }
                                Err(err) => {
                                    error = Some(err.to_string());
                                    break;
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(err) => {
                            error = Some(err.to_string());
                            break;
                        }
                    }
                }
            } else {
                for item in walker.by_ref() {
                    match item {
                        Ok(record) => {
                            assert!(record.cid().matches(record.bytes()));
                            out.push(record);
                        }
                        Err(err) => {
                            error = Some(err.to_string());
                            break;
                        }
                    }
                }
            }
            let stats = walker.stats();
            if error.is_none() {
                assert_eq!(stats.entries, out.len() as u64);
                let bytes: u64 = out.iter().map(|r| r.bytes().len() as u64).sum();
                assert_eq!(walker.record_bytes(), bytes);
            }
            Ok((out, error))
        }
        Err(err) => {
            let expected = commit.expect_err("commit() decoded what walk_unsigned refused");
            assert_eq!(err.to_string(), expected.to_string());
            Err(err.to_string())
        }
    };
    // No key verifies a commit it did not sign.
    let did = loaded.commit().ok().map(|commit| commit.did);
    match loaded.verify(Expected {
        did: did.as_ref(),
        key: stranger(),
    }) {
        Ok(_) => panic!("a commit verified with a key that never signed it"),
        Err(err) => {
            if walked.is_ok() {
                assert!(
                    matches!(err, Error::BadSignature { .. }),
                    "verify failed with {err} on a commit that decodes"
                );
            }
        }
    }
    Outcome::Records(walked)
}

fn check(data: &[u8]) {
    let hash = input_hash(data);
    let limits = match hash % 4 {
        0 => CarLimits {
            max_block_size: 256,
            max_header_size: 128,
            max_car_size: 2048,
            max_blocks: 16,
        },
        _ => CarLimits::default(),
    };
    let whole = read_blocks(data, limits);
    let chunked = read_blocks(Chunked::new(data, hash), limits);
    match (&whole, &chunked) {
        (Ok(a), Ok(b)) => assert!(a == b, "chunked read gave different blocks"),
        // The CAR size limit is checked as bytes arrive, so which error comes first depends
        // on the chunking; any other error must be the same.
        (Err(a), Err(b)) if a.starts_with("CAR size") || b.starts_with("CAR size") => {}
        (Err(a), Err(b)) => assert_eq!(a, b, "chunked read failed differently"),
        _ => panic!(
            "chunked read disagrees: whole {:?} chunked {:?}",
            whole.is_ok(),
            chunked.is_ok()
        ),
    }

    let plain = VerifyOptions {
        limits,
        ..VerifyOptions::default()
    };
    let spilling = VerifyOptions {
        memory_budget: [0, 64, 1024, 8192][(hash >> 8) as usize % 4],
        check_record_encoding: hash & 0x10000 == 0,
        ..plain.clone()
    };
    let a = records(data, &plain, true);
    // Beyond the block loop, `load_car` requires a root, and a dag-cbor one (a commit travels
    // under one CID only).
    let loadable = match &whole {
        Ok((roots, _)) => roots.first().is_some_and(|root| root.codec() == DAG_CBOR),
        Err(_) => false,
    };
    if let Outcome::LoadFailed(err) = &a {
        assert!(
            !loadable,
            "load_car failed ({err}) where the block loop succeeded with a dag-cbor root"
        );
    } else {
        assert!(
            loadable,
            "load_car succeeded where the block loop failed or the root is not dag-cbor"
        );
    }
    let b = records(data, &spilling, false);
    match (a, b) {
        (Outcome::LoadFailed(a), Outcome::LoadFailed(b)) => assert_eq!(a, b),
        (Outcome::Records(Err(a)), Outcome::Records(Err(b))) => {
            assert_eq!(a, b, "spilled store failed differently")
        }
        (Outcome::Records(Ok(a)), Outcome::Records(Ok(b))) => {
            if spilling.check_record_encoding || a.1.is_none() {
                assert!(a == b, "spilled store gave different records");
            } else {
                // Without the record-encoding check the walk may go further, never less far.
                assert!(
                    b.0.starts_with(&a.0),
                    "skipping record checks changed the records before the error"
                );
            }
        }
        _ => panic!("spilled store disagrees with the in-memory store"),
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut car = split_car(data, 4096);
    if fixup(&mut car) {
        check(&write_raw_car(&car));
    }
});
