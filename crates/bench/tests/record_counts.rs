//! atpdb and repo-stream agree on every record of the same CAR: count, keys, CIDs, order.

use atpdb_bench::{
    Car, Error, SAMPLE_CARS, atpdb_entries, drive_repo_stream, read_sample, repo_stream_entries,
    single_thread_runtime, verify_atpdb,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Asserts both implementations list the same `(key, cid)` sequence and tally.
fn assert_agree(name: &str, car: &Car) -> Result<u64, Error> {
    let runtime = single_thread_runtime()?;
    let atpdb = atpdb_entries(car)?;
    let repo_stream = repo_stream_entries(&runtime, &car.bytes)?;
    assert_eq!(
        atpdb.len(),
        repo_stream.len(),
        "{name}: atpdb found {} records, repo-stream {}",
        atpdb.len(),
        repo_stream.len()
    );
    for (i, (ours, theirs)) in atpdb.iter().zip(&repo_stream).enumerate() {
        assert_eq!(ours, theirs, "{name}: record {i} differs");
    }
    let tally = verify_atpdb(car, true)?;
    assert_eq!(
        tally,
        drive_repo_stream(&runtime, &car.bytes)?,
        "{name}: record byte totals differ"
    );
    assert_eq!(
        tally.records,
        atpdb.len() as u64,
        "{name}: tally and list differ"
    );
    Ok(tally.records)
}

#[test]
fn sample_cars_agree() -> TestResult {
    for name in SAMPLE_CARS {
        let Some(car) = read_sample("sample_cars_agree", name)? else {
            continue;
        };
        let records = assert_agree(name, &car)?;
        if *name != "empty.car" {
            assert!(records > 0, "{name}: no records");
        }
    }
    Ok(())
}

#[test]
fn generated_2000_records_agree() -> TestResult {
    let car = Car::generated(2000, 1999)?;
    // 1,999 generated records plus the profile.
    assert_eq!(assert_agree("generated seed 2000", &car)?, 2000);
    Ok(())
}
