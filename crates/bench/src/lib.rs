//! Side-by-side measurement of atpdb-repo's repository verification and repo-stream's.
//!
//! # Overview
//!
//! A [`Car`] is one whole-repository CAR held in memory, with the account's DID and key when
//! they are known (generated samples) and without them when not (the shared sample CARs).
//! [`verify_atpdb`] runs atpdb's full check on its bytes: every block hashed, the commit's DID
//! and signature checked when the key is known, the MST walked with every structural rule, and
//! each record's DRISL validated. [`drive_repo_stream`] feeds the same bytes to repo-stream,
//! which hashes every block and walks the MST but checks no signature. Both return a
//! [`Tally`], so a benchmark or a test can see that they agree; [`atpdb_entries`] and
//! [`repo_stream_entries`] list the `(key, cid)` pairs for a closer comparison.
//!
//! Both run on the calling thread: repo-stream's `load_car` is async, so it is driven by a
//! current-thread tokio [`Runtime`] built with [`single_thread_runtime`].
//!
//! # Invariants
//!
//! - Neither implementation spills to disk: atpdb gets a memory budget of [`MEMORY_LIMIT_MB`]
//!   and is checked not to have spilled, repo-stream gets the same limit and hitting it is an
//!   error.
//! - repo-stream's block processor is the identity (`repo_stream::noop`), so both hand the
//!   caller every record's full bytes, as atpdb's sync engine needs them.
//!
//! # Example
//!
//! ```
//! use atpdb_bench::{Car, drive_repo_stream, single_thread_runtime, verify_atpdb};
//!
//! let car = Car::generated(1, 50)?;
//! let runtime = single_thread_runtime()?;
//! let atpdb = verify_atpdb(&car, true)?;
//! assert_eq!(atpdb, drive_repo_stream(&runtime, &car.bytes)?);
//! assert_eq!(atpdb.records, 51); // the profile and 50 records
//! # Ok::<(), atpdb_bench::Error>(())
//! ```

use atpdb_repo::crypto::{Curve, PublicKey};
use atpdb_repo::sample::write_sample_car;
use atpdb_repo::syntax::Did;
use atpdb_repo::verify::{Expected, RecordWalker, VerifyOptions, load_car};
use tokio::runtime::Runtime;

/// Memory either implementation may use for one repository's blocks: far above any corpus,
/// so neither ever spills.
pub const MEMORY_LIMIT_MB: usize = 4096;

/// Errors from either implementation or from the harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// atpdb rejected the repository or failed to generate it.
    #[error("atpdb")]
    Atpdb(#[from] atpdb_repo::Error),
    /// repo-stream rejected the repository.
    #[error("repo-stream: {0}")]
    RepoStream(String),
    /// atpdb spilled blocks to disk, which would measure the disk, not the code.
    #[error("atpdb spilled {bytes} bytes to disk despite a {MEMORY_LIMIT_MB} MiB budget")]
    Spilled {
        /// Bytes written to the spill file.
        bytes: u64,
    },
    /// The tokio runtime could not be built.
    #[error("building the tokio runtime")]
    Runtime(#[source] std::io::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// One whole-repository CAR in memory.
#[derive(Debug, Clone)]
pub struct Car {
    /// The CAR bytes.
    pub bytes: Vec<u8>,
    /// The account, when known.
    pub did: Option<Did>,
    /// The account's signing key, when known; atpdb checks the signature only with it.
    pub key: Option<PublicKey>,
}

impl Car {
    /// A CAR whose account and key are unknown: the signature goes unchecked.
    pub fn unsigned(bytes: Vec<u8>) -> Car {
        Car {
            bytes,
            did: None,
            key: None,
        }
    }

    /// A generated, signed (k256) repository of `n_records` records plus a profile.
    pub fn generated(seed: u64, n_records: u64) -> Result<Car> {
        let (bytes, summary) = write_sample_car(seed, n_records, Curve::K256, Vec::new())?;
        Ok(Car {
            bytes,
            did: Some(summary.did),
            key: Some(summary.key.public()),
        })
    }

    /// Whether atpdb can check this CAR's commit signature.
    pub fn is_signed(&self) -> bool {
        self.key.is_some()
    }
}

/// What one full pass over a CAR found: equal tallies mean the two agree on the records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Records yielded.
    pub records: u64,
    /// Sum of the records' byte lengths.
    pub record_bytes: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, other: Tally) {
        self.records += other.records;
        self.record_bytes += other.record_bytes;
    }
}

/// atpdb's options for the benchmark: everything in memory, record DRISL checked or not.
pub fn atpdb_options(check_record_encoding: bool) -> VerifyOptions {
    VerifyOptions {
        memory_budget: MEMORY_LIMIT_MB << 20,
        check_record_encoding,
        ..VerifyOptions::default()
    }
}

/// Fully verifies `car` with atpdb and tallies its records.
///
/// Checks every block's hash, the commit's DID and signature (when the key is known), the
/// whole MST, and, with `check_record_encoding`, every record's DRISL.
pub fn verify_atpdb(car: &Car, check_record_encoding: bool) -> Result<Tally> {
    let loaded = load_car(car.bytes.as_slice(), &atpdb_options(check_record_encoding))?;
    let spilled = loaded.store().spilled_bytes();
    if spilled > 0 {
        return Err(Error::Spilled { bytes: spilled });
    }
    let mut tally = Tally::default();
    let mut count = |records: &mut RecordWalker<'_>| -> Result<()> {
        while let Some(record) = records.next_record()? {
            tally.records += 1;
            tally.record_bytes += record.bytes.len() as u64;
        }
        Ok(())
    };
    match &car.key {
        Some(key) => {
            let repo = loaded.verify(Expected {
                did: car.did.as_ref(),
                key,
            })?;
            count(&mut repo.records())?;
        }
        None => count(&mut loaded.walk_unsigned()?.1)?,
    }
    Ok(tally)
}

/// A current-thread tokio runtime: repo-stream runs on the calling thread, as atpdb does.
pub fn single_thread_runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(Error::Runtime)
}

fn repo_stream_error(error: impl std::fmt::Display) -> Error {
    Error::RepoStream(error.to_string())
}

/// Loads `bytes` with repo-stream (identity block processor) and opens the walk.
async fn load_repo_stream(bytes: &[u8]) -> Result<repo_stream::MemCar> {
    repo_stream::DriverBuilder::new()
        .with_mem_limit_mb(MEMORY_LIMIT_MB)
        .with_block_processor(repo_stream::noop)
        .load_car(bytes)
        .await
        .map_err(repo_stream_error)
}

/// Runs repo-stream over `bytes` (blocks hashed, MST walked, no signature) and tallies it.
pub fn drive_repo_stream(runtime: &Runtime, bytes: &[u8]) -> Result<Tally> {
    runtime.block_on(async {
        let mut car = load_repo_stream(bytes).await?;
        let mut tally = Tally::default();
        while let Some(chunk) = car.next_chunk_strict(256).map_err(repo_stream_error)? {
            for output in chunk {
                tally.records += 1;
                tally.record_bytes += output.data.len() as u64;
            }
        }
        Ok(tally)
    })
}

/// atpdb's `(collection/rkey, record CID)` pairs in walk order.
pub fn atpdb_entries(car: &Car) -> Result<Vec<(String, String)>> {
    let loaded = load_car(car.bytes.as_slice(), &atpdb_options(true))?;
    let mut entries = Vec::new();
    let mut list = |records: &mut RecordWalker<'_>| -> Result<()> {
        while let Some(record) = records.next_record()? {
            entries.push((
                format!("{}/{}", record.collection, record.rkey),
                record.cid.to_string(),
            ));
        }
        Ok(())
    };
    match &car.key {
        Some(key) => list(
            &mut loaded
                .verify(Expected {
                    did: car.did.as_ref(),
                    key,
                })?
                .records(),
        )?,
        None => list(&mut loaded.walk_unsigned()?.1)?,
    }
    Ok(entries)
}

/// repo-stream's `(key, record CID)` pairs in walk order.
pub fn repo_stream_entries(runtime: &Runtime, bytes: &[u8]) -> Result<Vec<(String, String)>> {
    runtime.block_on(async {
        let mut car = load_repo_stream(bytes).await?;
        let mut entries = Vec::new();
        while let Some(chunk) = car.next_chunk_strict(256).map_err(repo_stream_error)? {
            entries.extend(
                chunk
                    .into_iter()
                    .map(|output| (output.key, output.cid.to_string())),
            );
        }
        Ok(entries)
    })
}

/// The corpus `crates/devnet/interop/corpus.mjs` writes with the reference TypeScript
/// implementation: every `manifest.json` entry's CAR, with its DID and the key `keys.jsonl`
/// gives that DID, so atpdb checks every signature.
///
/// # Errors
///
/// Reading the files, or a manifest entry or key that does not parse.
pub fn read_corpus(
    dir: &std::path::Path,
) -> std::result::Result<Vec<Car>, Box<dyn std::error::Error>> {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json"))?)?;
    let mut keys = std::collections::HashMap::new();
    for line in std::fs::read_to_string(dir.join("keys.jsonl"))?.lines() {
        let entry: serde_json::Value = serde_json::from_str(line)?;
        let (Some(did), Some(key)) = (entry["did"].as_str(), entry["key"].as_str()) else {
            return Err(format!("keys.jsonl: bad line {line}").into());
        };
        keys.insert(did.to_owned(), PublicKey::from_did_key(key)?);
    }
    let mut cars = Vec::new();
    for entry in manifest.as_array().ok_or("manifest.json is not an array")? {
        let (Some(file), Some(did)) = (entry["file"].as_str(), entry["did"].as_str()) else {
            return Err(format!("manifest.json: bad entry {entry}").into());
        };
        let key = keys.get(did).ok_or_else(|| format!("no key for {did}"))?;
        cars.push(Car {
            bytes: std::fs::read(dir.join(file))?,
            did: Some(did.parse()?),
            key: Some(key.clone()),
        });
    }
    Ok(cars)
}

/// The whole-repository CARs among the shared samples (the `slice-*` CARs are partial).
pub const SAMPLE_CARS: &[&str] = &["empty.car", "tiny.car", "little.car", "midsize.car"];

/// Reads a shared sample CAR; `Ok(None)` (after a note on stderr) when the fixtures are absent.
pub fn read_sample(test: &str, name: &str) -> std::io::Result<Option<Car>> {
    // testkit fails the test under ATPDB_REQUIRE_SHARED when the file is missing.
    let Some(path) = atpdb_testkit::car_sample(test, name) else {
        return Ok(None);
    };
    std::fs::read(&path).map(|bytes| Some(Car::unsigned(bytes)))
}
