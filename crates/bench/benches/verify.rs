//! Full repository verification, atpdb-repo beside repo-stream, on the same bytes in one run.
//!
//! `cargo bench -p atpdb-bench` measures, on one thread, for each corpus:
//! - atpdb: every block hashed, commit DID and signature checked (when the key is known), the
//!   MST walked with all its rules, every record's DRISL validated;
//! - atpdb without the record DRISL check (`check_record_encoding: false`), the closest to
//!   what repo-stream does;
//! - repo-stream 0.5: every block hashed, the MST walked (key order, layers), no signature;
//!   its block processor is the identity, so it keeps each record's bytes, as atpdb does.
//!
//! Passes of the three alternate; each sample is a batch of whole-corpus passes lasting at
//! least a millisecond, and each implementation gets at least 15 samples and
//! `ATPDB_BENCH_SECONDS` (default 2) seconds. The table shows the median.
//! `ATPDB_BENCH_QUICK=1` shrinks the generated corpora and the time for a smoke run; arguments
//! after `--` keep only the corpora whose names contain one of them (`-- midsize large`).
//! `ATPDB_CORPUS=DIR` adds the corpus `crates/devnet/interop/corpus.mjs` wrote with the
//! reference TypeScript implementation (every signature checked against keys.jsonl).

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use atpdb_bench::{Car, SAMPLE_CARS, Tally, drive_repo_stream, read_sample, verify_atpdb};
use atpdb_repo::sample::SampleRng;
use tokio::runtime::Runtime;

// atpdb ships with mimalloc (crates/atpdb/src/main.rs), so both are measured with it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn std::error::Error>;

/// One set of CARs measured together.
struct Corpus {
    name: String,
    cars: Vec<Car>,
}

impl Corpus {
    fn bytes(&self) -> u64 {
        self.cars.iter().map(|car| car.bytes.len() as u64).sum()
    }

    fn signed(&self) -> &'static str {
        match (
            self.cars.iter().all(Car::is_signed),
            self.cars.iter().any(Car::is_signed),
        ) {
            (true, _) => "checked",
            (false, true) => "partly",
            (false, false) => "unchecked",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Implementation {
    Atpdb,
    AtpdbNoRecordCheck,
    RepoStream,
}

const IMPLEMENTATIONS: [Implementation; 3] = [
    Implementation::Atpdb,
    Implementation::AtpdbNoRecordCheck,
    Implementation::RepoStream,
];

impl Implementation {
    /// The name `ATPDB_BENCH_PROFILE` takes.
    fn name(self) -> &'static str {
        match self {
            Implementation::Atpdb => "atpdb",
            Implementation::AtpdbNoRecordCheck => "atpdb-nd",
            Implementation::RepoStream => "repo-stream",
        }
    }

    fn pass(self, corpus: &Corpus, runtime: &Runtime) -> Result<Tally, atpdb_bench::Error> {
        let mut tally = Tally::default();
        for car in &corpus.cars {
            tally += match self {
                Implementation::Atpdb => verify_atpdb(black_box(car), true)?,
                Implementation::AtpdbNoRecordCheck => verify_atpdb(black_box(car), false)?,
                Implementation::RepoStream => drive_repo_stream(runtime, black_box(&car.bytes))?,
            };
        }
        Ok(black_box(tally))
    }
}

struct Settings {
    quick: bool,
    min_time: Duration,
    min_samples: usize,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = std::env::var_os("ATPDB_BENCH_QUICK").is_some_and(|v| v != "0");
        let seconds = std::env::var("ATPDB_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(if quick { 0.2 } else { 2.0 });
        Settings {
            quick,
            min_time: Duration::from_secs_f64(seconds),
            min_samples: if quick { 5 } else { 15 },
        }
    }
}

/// Median seconds per whole-corpus pass, per implementation.
struct Measurement {
    tally: Tally,
    seconds: [f64; 3],
    samples: [usize; 3],
}

fn measure(
    corpus: &Corpus,
    runtime: &Runtime,
    settings: &Settings,
) -> Result<Measurement, BoxError> {
    // Warm-up, which also checks that the implementations agree.
    let mut tally = None;
    let mut estimate = [0f64; 3];
    for (i, implementation) in IMPLEMENTATIONS.into_iter().enumerate() {
        let start = Instant::now();
        let mut passes = 0u32;
        while passes < 3 || start.elapsed() < settings.min_time / 8 {
            let found = implementation.pass(corpus, runtime)?;
            if *tally.get_or_insert(found) != found {
                return Err(format!(
                    "{}: {implementation:?} found {found:?}, expected {tally:?}",
                    corpus.name
                )
                .into());
            }
            passes += 1;
        }
        estimate[i] = start.elapsed().as_secs_f64() / f64::from(passes);
    }
    // Each sample lasts at least a millisecond, so tiny CARs are not measured by the clock.
    let batch = estimate.map(|seconds| (1e-3 / seconds).ceil().max(1.0) as u32);

    let mut samples: [Vec<f64>; 3] = Default::default();
    let mut spent = [Duration::ZERO; 3];
    while samples
        .iter()
        .zip(spent)
        .any(|(taken, spent)| taken.len() < settings.min_samples || spent < settings.min_time)
    {
        for (i, implementation) in IMPLEMENTATIONS.into_iter().enumerate() {
            let start = Instant::now();
            for _ in 0..batch[i] {
                implementation.pass(corpus, runtime)?;
            }
            let elapsed = start.elapsed();
            spent[i] += elapsed;
            samples[i].push(elapsed.as_secs_f64() / f64::from(batch[i]));
        }
    }
    Ok(Measurement {
        tally: tally.unwrap_or_default(),
        samples: samples.each_ref().map(Vec::len),
        seconds: samples.map(median),
    })
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    match samples.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => samples[n / 2],
        n => (samples[n / 2 - 1] + samples[n / 2]) / 2.0,
    }
}

fn corpora(settings: &Settings, wanted: impl Fn(&str) -> bool) -> Result<Vec<Corpus>, BoxError> {
    let mut corpora = Vec::new();
    for file in SAMPLE_CARS {
        let name = file.trim_end_matches(".car");
        if !wanted(name) {
            continue;
        }
        match read_sample("bench", file)? {
            Some(car) => corpora.push(Corpus {
                name: name.to_owned(),
                cars: vec![car],
            }),
            None => println!("note: {file} skipped (shared car-samples not found)"),
        }
    }

    // The reference corpus (crates/devnet/interop/corpus.mjs), when ATPDB_CORPUS names it.
    if let Some(dir) = std::env::var_os("ATPDB_CORPUS") {
        let dir = std::path::PathBuf::from(dir);
        let cars = atpdb_bench::read_corpus(&dir)?;
        let name = format!("reference TS ({} repos)", cars.len());
        if wanted(&name) {
            corpora.push(Corpus { name, cars });
        }
    } else {
        println!("note: ATPDB_CORPUS not set: the reference TypeScript corpus is not measured");
    }

    let (n_small, n_large, large_records) = if settings.quick {
        (100, 1, 10_000)
    } else {
        (2000, 3, 100_000)
    };
    let start = Instant::now();
    let name = format!("many small ({n_small}×20–200)");
    if wanted(&name) {
        let mut rng = SampleRng::new(0xbe7c);
        let cars = (0..n_small)
            .map(|i| Car::generated(10_000 + i, 20 + rng.below(181)))
            .collect::<Result<Vec<_>, _>>()?;
        corpora.push(Corpus { name, cars });
    }
    let name = format!("few large ({n_large}×{}k)", large_records / 1000);
    if wanted(&name) {
        let cars = (0..n_large)
            .map(|i| Car::generated(20_000 + i, large_records))
            .collect::<Result<Vec<_>, _>>()?;
        corpora.push(Corpus { name, cars });
    }
    println!(
        "generated corpora in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(corpora)
}

fn rates(bytes: u64, records: u64, seconds: f64) -> String {
    format!(
        "{:>9.1} {:>11.0}",
        bytes as f64 / seconds / 1e6,
        records as f64 / seconds
    )
}

fn run() -> Result<(), BoxError> {
    let settings = Settings::from_env();
    let runtime = atpdb_bench::single_thread_runtime()?;
    // `cargo bench -p atpdb-bench -- midsize` measures only corpora whose name has "midsize";
    // cargo's own flags (`--bench`) are ignored.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let corpora = corpora(&settings, |name| {
        filters.is_empty() || filters.iter().any(|filter| name.contains(filter.as_str()))
    })?;

    // `ATPDB_BENCH_PROFILE=atpdb` (or `atpdb-nd`, `repo-stream`) runs only that implementation
    // for the measuring time, with no table: a clean target for `perf record`.
    if let Ok(name) = std::env::var("ATPDB_BENCH_PROFILE") {
        let implementation = IMPLEMENTATIONS
            .into_iter()
            .find(|implementation| implementation.name() == name)
            .ok_or_else(|| {
                format!("ATPDB_BENCH_PROFILE={name}: not atpdb, atpdb-nd or repo-stream")
            })?;
        for corpus in &corpora {
            let start = Instant::now();
            let mut passes = 0u64;
            while start.elapsed() < settings.min_time {
                implementation.pass(corpus, &runtime)?;
                passes += 1;
            }
            println!(
                "{name} {}: {passes} passes, {:.3} ms per pass",
                corpus.name,
                start.elapsed().as_secs_f64() * 1e3 / passes as f64
            );
        }
        return Ok(());
    }

    println!(
        "\nmedian of ≥{} samples and ≥{:.1} s per implementation; one thread; MB = 10^6 bytes",
        settings.min_samples,
        settings.min_time.as_secs_f64()
    );
    println!(
        "atpdb: hashes, commit DID + signature (when known), MST rules, record DRISL; \
         atpdb-nd: the same without record DRISL"
    );
    println!(
        "repo-stream 0.5.0-alpha.10: hashes, MST walk, no signature; \
         identity block processor (keeps record bytes)\n"
    );
    let header = format!(
        "{:<24} {:>11} {:>8} {:>9} | {:>9} {:>11} | {:>9} {:>11} | {:>9} {:>11} | {:>6} {:>8}",
        "corpus",
        "bytes",
        "records",
        "signature",
        "atpdb MB/s",
        "rec/s",
        "rs MB/s",
        "rec/s",
        "nd MB/s",
        "rec/s",
        "ratio",
        "ratio-nd",
    );
    println!("{header}");
    println!("{}", "-".repeat(header.chars().count()));

    let (mut total_bytes, mut total_records, mut total_seconds) = (0u64, 0u64, [0f64; 3]);
    let mut log_ratio = [0f64; 2];
    for corpus in &corpora {
        let measurement = measure(corpus, &runtime, &settings)?;
        let bytes = corpus.bytes();
        let records = measurement.tally.records;
        let [atpdb, no_check, repo_stream] = measurement.seconds;
        println!(
            "{:<24} {:>11} {:>8} {:>9} | {} | {} | {} | {:>6.2} {:>8.2}",
            corpus.name,
            bytes,
            records,
            corpus.signed(),
            rates(bytes, records, atpdb),
            rates(bytes, records, repo_stream),
            rates(bytes, records, no_check),
            repo_stream / atpdb,
            repo_stream / no_check,
        );
        if std::env::var_os("ATPDB_BENCH_VERBOSE").is_some() {
            println!(
                "    samples {:?}; seconds per pass {:?}",
                measurement.samples, measurement.seconds
            );
        }
        total_bytes += bytes;
        total_records += records;
        for (total, seconds) in total_seconds.iter_mut().zip(measurement.seconds) {
            *total += seconds;
        }
        log_ratio[0] += (repo_stream / atpdb).ln();
        log_ratio[1] += (repo_stream / no_check).ln();
    }
    let [atpdb, no_check, repo_stream] = total_seconds;
    println!("{}", "-".repeat(header.chars().count()));
    println!(
        "{:<24} {:>11} {:>8} {:>9} | {} | {} | {} | {:>6.2} {:>8.2}",
        "overall (one pass each)",
        total_bytes,
        total_records,
        "",
        rates(total_bytes, total_records, atpdb),
        rates(total_bytes, total_records, repo_stream),
        rates(total_bytes, total_records, no_check),
        repo_stream / atpdb,
        repo_stream / no_check,
    );
    let n = corpora.len() as f64;
    println!(
        "{:<24} {:>66} {:>6.2} {:>8.2}",
        "geometric mean of ratios",
        "",
        (log_ratio[0] / n).exp(),
        (log_ratio[1] / n).exp(),
    );
    println!("\nratio = atpdb throughput / repo-stream throughput (> 1: atpdb is faster)");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let mut message = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
