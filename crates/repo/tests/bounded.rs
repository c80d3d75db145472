//! Issue 11: bounded by default. Every limit is finite out of the box, names itself when
//! exceeded, and a declared length never allocates ahead of its bytes.

use atpdb_repo::Error;
use atpdb_repo::car::{CarLimits, CarReader, write_car};
use atpdb_repo::cid::Cid;
use atpdb_repo::crypto::Curve;
use atpdb_repo::sample::write_sample_car;
use atpdb_repo::verify::{Expected, VerifyOptions, load_car};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn issue_11_defaults_are_finite() {
    let limits = CarLimits::default();
    assert_eq!(limits.max_car_size, 4 << 30);
    assert_eq!(limits.max_blocks, 8_000_000);
    assert!(limits.max_block_size <= 4 << 20);
    let options = VerifyOptions::default();
    assert_eq!(options.max_spill_bytes, 4 << 30);
    assert_eq!(options.memory_budget, 64 << 20);
}

/// A block that declares 4 MiB but sends 100 bytes: the reader's buffer follows the bytes.
#[test]
fn issue_11_declared_length_does_not_allocate() -> TestResult {
    let mut car = write_car(&[Cid::dag_cbor(b"x")], std::iter::empty());
    let declared: u64 = (4 << 20) - 1;
    let mut value = declared;
    while value >= 0x80 {
        car.push((value as u8) | 0x80);
        value >>= 7;
    }
    car.push(value as u8);
    car.extend_from_slice(&[0x01; 100]);
    let mut reader = CarReader::new(car.as_slice(), CarLimits::default())?;
    let result = reader.next_block().map(|block| block.is_some());
    assert!(matches!(result, Err(Error::Truncated { .. })), "{result:?}");
    assert!(
        reader.buffer_len() <= 64 << 10,
        "buffer grew to {} bytes for 100 bytes of input",
        reader.buffer_len()
    );
    Ok(())
}

fn sample_car(records: u64) -> Result<(Vec<u8>, atpdb_repo::crypto::PublicKey), Error> {
    let (car, summary) = write_sample_car(11, records, Curve::K256, Vec::new())?;
    Ok((car, summary.key.public()))
}

#[test]
fn issue_11_limits_name_what_was_exceeded() -> TestResult {
    let (car, key) = sample_car(400)?;
    let expect_limit = |options: VerifyOptions, what: &str| {
        let result = load_car(car.as_slice(), &options);
        match result {
            Err(Error::LimitExceeded { what: found, .. }) => assert_eq!(found, what),
            other => panic!(
                "expected {what} to be exceeded, got {:?}",
                other.map(|_| ())
            ),
        }
    };
    expect_limit(
        VerifyOptions {
            limits: CarLimits {
                max_blocks: 10,
                ..CarLimits::default()
            },
            ..VerifyOptions::default()
        },
        "CAR block count",
    );
    expect_limit(
        VerifyOptions {
            limits: CarLimits {
                max_car_size: 1000,
                ..CarLimits::default()
            },
            ..VerifyOptions::default()
        },
        "CAR size",
    );
    expect_limit(
        VerifyOptions {
            memory_budget: 0,
            max_spill_bytes: 1000,
            ..VerifyOptions::default()
        },
        "spill file size",
    );
    // Within every limit, the same CAR verifies, spilling everything past a tiny budget.
    let loaded = load_car(
        car.as_slice(),
        &VerifyOptions {
            memory_budget: 0,
            ..VerifyOptions::default()
        },
    )?;
    assert!(loaded.store().spilled_bytes() > 0);
    let repo = loaded.verify(Expected {
        did: None,
        key: &key,
    })?;
    assert_eq!(repo.records().count(), 401);
    Ok(())
}

/// Issue 11: the CAR loader's store finds blocks by full CID, as every other source does.
#[test]
fn issue_11_store_lookup_is_by_full_cid() -> TestResult {
    let (car, _) = sample_car(5)?;
    let loaded = load_car(car.as_slice(), &VerifyOptions::default())?;
    let root = loaded.root();
    assert!(loaded.store().contains(&root)?);
    let raw = Cid::from_parts(atpdb_repo::cid::RAW, *root.digest());
    assert!(!loaded.store().contains(&raw)?);
    Ok(())
}
