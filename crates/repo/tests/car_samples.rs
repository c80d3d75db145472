//! Real repository CARs verify, their MST roots reproduce, and partial slices are refused.

use std::fs::File;
use std::io::BufReader;

use atpdb_repo::cid::CidMap;
use atpdb_repo::mst::{NoBlocks, Tree};
use atpdb_repo::verify::{LoadedCar, VerifyOptions, load_car, load_car_async};
use atpdb_repo::{Cid, Error, Record};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Whole-repository samples (record counts are compared with repo-stream in crates/bench).
const FULL_SAMPLES: [&str; 4] = ["empty.car", "tiny.car", "little.car", "midsize.car"];

/// Every record of a loaded CAR, walked without a key (the samples' keys are unknown offline).
fn records(car: &LoadedCar) -> Result<Vec<Record>, Error> {
    car.walk_unsigned()?.1.collect()
}

#[test]
fn samples_verify_and_roots_reproduce() -> TestResult {
    for name in FULL_SAMPLES {
        let Some(path) = atpdb_testkit::car_sample("samples_verify", name) else {
            return Ok(());
        };
        let car = load_car(
            BufReader::new(File::open(&path)?),
            &VerifyOptions::default(),
        )?;
        // The samples' account keys are unknown offline: the tree is checked, not the signature.
        let (commit, mut records) = car.walk_unsigned()?;
        let mut rebuilt = Tree::empty(NoBlocks);
        let mut count = 0;
        while let Some(record) = records.next_record()? {
            assert_eq!(
                Cid::dag_cbor(record.bytes),
                record.cid,
                "{name}: record {}",
                record.rkey
            );
            rebuilt.insert(
                format!("{}/{}", record.collection, record.rkey).as_bytes(),
                record.cid,
            )?;
            count += 1;
        }
        assert!(count > 0 || name == "empty.car", "{name}: no records");
        assert_eq!(rebuilt.root_cid(), commit.data, "{name}: rebuilt MST root");
    }
    Ok(())
}

#[test]
fn memory_budget_spills_and_gives_the_same_records() -> TestResult {
    let Some(path) = atpdb_testkit::car_sample("spill", "midsize.car") else {
        return Ok(());
    };
    let bytes = std::fs::read(&path)?;
    let in_memory = load_car(bytes.as_slice(), &VerifyOptions::default())?;
    let spilling_options = VerifyOptions {
        memory_budget: 256 << 10,
        ..VerifyOptions::default()
    };
    let spilled = load_car(bytes.as_slice(), &spilling_options)?;
    assert!(
        spilled.store().spilled_bytes() > 4 << 20,
        "expected most blocks on disk"
    );
    let a = records(&in_memory)?;
    let b = records(&spilled)?;
    assert_eq!(a, b);
    Ok(())
}

#[tokio::test]
async fn async_loading_matches() -> TestResult {
    let Some(path) = atpdb_testkit::car_sample("async_loading", "little.car") else {
        return Ok(());
    };
    let file = tokio::fs::File::open(&path).await?;
    let loaded = load_car_async(file, &VerifyOptions::default()).await?;
    let count = records(&loaded)?.len();
    let sync_count = records(&load_car(File::open(&path)?, &VerifyOptions::default())?)?.len();
    assert_eq!(count, sync_count);
    Ok(())
}

#[test]
fn record_proof_slices_are_not_whole_repositories() -> TestResult {
    for name in [
        "slice-one.car",
        "slice-node-after.car",
        "slice-node-first-key.car",
        "slice-proving-absence.car",
    ] {
        let Some(path) = atpdb_testkit::car_sample("slices", name) else {
            return Ok(());
        };
        let loaded = load_car(File::open(&path)?, &VerifyOptions::default())?;
        let result = records(&loaded);
        assert!(
            matches!(result, Err(Error::MissingBlock { .. })),
            "{name}: a partial tree must fail with a missing block, got {result:?}"
        );
    }
    Ok(())
}

#[test]
fn reordered_and_duplicated_blocks_pass() -> TestResult {
    let Some(path) = atpdb_testkit::car_sample("reorder", "little.car") else {
        return Ok(());
    };
    let bytes = std::fs::read(&path)?;
    let mut reader = atpdb_repo::car::CarReader::new(bytes.as_slice(), Default::default())?;
    let root = reader.header().roots[0];
    let mut blocks: Vec<(Cid, Vec<u8>)> = Vec::new();
    while let Some(block) = reader.next_block()? {
        blocks.push((block.cid, block.data.to_vec()));
    }
    blocks.reverse();
    let duplicates: Vec<(Cid, Vec<u8>)> = blocks.iter().step_by(3).cloned().collect();
    blocks.extend(duplicates);
    let car = atpdb_repo::car::write_car(&[root], blocks.iter().map(|(c, d)| (c, d.as_slice())));
    let original = records(&load_car(bytes.as_slice(), &VerifyOptions::default())?)?;
    let shuffled = records(&load_car(car.as_slice(), &VerifyOptions::default())?)?;
    assert_eq!(original, shuffled);
    let unique: CidMap<()> = blocks.iter().map(|(c, _)| (*c, ())).collect();
    assert!(unique.len() < blocks.len());
    Ok(())
}
