//! Arbitrary bytes as a CAR: the streaming reader, then load + verify + record walk.
//!
//! Each input runs twice when it is not already consistent: as given, and after
//! `atpdb_fuzz::fixup` has recomputed every CID and rewritten every link, so that mutated
//! commits, MST nodes and records get past the hash checks into the tree checks.
//!
//! Checks beyond "no panic": reading from a slice and from a reader that hands out 1–64 bytes
//! at a time gives the same blocks and the same outcome; `load_car` fails exactly when the
//! block loop does; a small memory budget (spilling to a temporary file) yields the same
//! records, or the same error, as the default budget; every yielded block hashes to its CID.
#![no_main]

use std::io::Read;

use atpdb_fuzz::{Chunked, fixup, input_hash, split_car, write_raw_car};
use atpdb_repo::Cid;
use atpdb_repo::car::{CarLimits, CarReader};
use atpdb_repo::verify::{Expected, Record, VerifyOptions, load_car};
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

enum Outcome {
    LoadFailed(String),
    Records(Result<Vec<Record>, String>),
}

fn records(car: &[u8], options: &VerifyOptions) -> Outcome {
    let loaded = match load_car(car, options) {
        Ok(loaded) => loaded,
        Err(err) => return Outcome::LoadFailed(err.to_string()),
    };
    let _ = loaded.commit();
    let result = (|| {
        let repo = loaded
            .verify(Expected::default())
            .map_err(|e| e.to_string())?;
        let mut walker = repo.records();
        let mut out = Vec::new();
        while let Some(record) = walker.next_record().map_err(|e| e.to_string())? {
            assert!(
                record.cid.matches(record.bytes),
                "record does not hash to its CID"
            );
            out.push(record.to_owned());
        }
        let _ = walker.stats();
        Ok(out)
    })();
    Outcome::Records(result)
}

fn check(data: &[u8]) {
    let hash = input_hash(data);
    let limits = match hash % 4 {
        0 => CarLimits {
            max_block_size: 256,
            max_header_size: 128,
            max_car_size: Some(2048),
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
    let a = records(data, &plain);
    if let Outcome::LoadFailed(err) = &a {
        assert!(
            whole.is_err(),
            "load_car failed ({err}) where the block loop succeeded"
        );
    } else {
        assert!(
            whole.is_ok(),
            "load_car succeeded where the block loop failed"
        );
    }
    let b = records(data, &spilling);
    match (a, b) {
        (Outcome::LoadFailed(a), Outcome::LoadFailed(b)) => assert_eq!(a, b),
        (Outcome::Records(Ok(a)), Outcome::Records(Ok(b))) => {
            assert!(a == b, "spilled store gave different records")
        }
        (Outcome::Records(Err(a)), Outcome::Records(Err(b))) => {
            if spilling.check_record_encoding {
                assert_eq!(a, b, "spilled store failed differently")
            }
        }
        (Outcome::Records(Ok(_)), Outcome::Records(Err(b))) if !spilling.check_record_encoding => {
            panic!("skipping record checks made the walk fail: {b}")
        }
        (Outcome::Records(Err(_)), Outcome::Records(Ok(_))) if !spilling.check_record_encoding => {}
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
