//! `atpdb car`: verify, inspect and generate repository CAR files.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use atpdb_repo::car::CarLimits;
use atpdb_repo::crypto::{Curve, PublicKey};
use atpdb_repo::sample::{SampleShape, write_sample_car_for, write_sample_car_shaped};
use atpdb_repo::syntax::Did;
use atpdb_repo::verify::{
    Expected, Scratch, VerifiedRepo, VerifyOptions, load_car_in_memory, load_car_reusing,
    load_car_whole,
};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

#[derive(Debug, Subcommand)]
pub(crate) enum CarCommand {
    /// Verify CAR files: every block hash, the MST shape, the commit DID and signature.
    ///
    /// Prints one JSON line per file; with --records also one per record. Exits 1 if any
    /// file fails. Files that fit the memory budget are mapped, not copied: they must not
    /// change while they are verified.
    Verify(VerifyArgs),
    /// Summarise a CAR file: commit, rev, DID, collections, MST depth, blocks, bytes.
    Inspect(InspectArgs),
    /// Write a deterministic, signed sample repository.
    Sample(SampleArgs),
}

#[derive(Debug, Args)]
pub(crate) struct SpillArgs {
    /// Memory for blocks before spilling to disk, in MiB.
    #[arg(long, default_value_t = 64, env = "ATPDB_MEMORY_BUDGET_MB")]
    memory_budget_mb: usize,
    /// Directory for spill files (default: the system temporary directory).
    #[arg(long, env = "ATPDB_SPILL_DIR")]
    spill_dir: Option<PathBuf>,
    /// Most blocks in one CAR; the block index costs 22 bytes a block.
    #[arg(long, default_value_t = CarLimits::DEFAULT_MAX_BLOCKS)]
    max_blocks: u64,
    /// Largest CAR, in MiB.
    #[arg(long, default_value_t = CarLimits::DEFAULT_MAX_CAR_SIZE >> 20)]
    max_car_mb: u64,
}

impl SpillArgs {
    fn options(&self) -> VerifyOptions {
        let max_car_size = self.max_car_mb.saturating_mul(1 << 20);
        VerifyOptions {
            memory_budget: self.memory_budget_mb << 20,
            spill_dir: self.spill_dir.clone(),
            max_spill_bytes: max_car_size,
            limits: CarLimits {
                max_blocks: self.max_blocks,
                max_car_size,
                ..CarLimits::default()
            },
            ..VerifyOptions::default()
        }
    }
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("keys_from").required(true).args(["key", "keys", "plc"])))]
pub(crate) struct VerifyArgs {
    /// The DID every commit must name.
    #[arg(long)]
    did: Option<String>,
    /// The signing key of every file: did:key:z..., or a Multikey z....
    #[arg(long)]
    key: Option<String>,
    /// A file of JSON lines {"did": "...", "key": "did:key:z..."}: each CAR is checked against
    /// the key of the DID its commit names.
    #[arg(long, value_name = "FILE")]
    keys: Option<PathBuf>,
    /// Resolve each commit's DID to its `#atproto` key: did:plc from this directory
    /// (e.g. https://plc.directory), did:web from its host.
    #[arg(long, value_name = "URL")]
    plc: Option<String>,
    /// With --plc: allow loopback and private addresses (a devnet).
    #[arg(long, requires = "plc")]
    allow_private_network: bool,
    /// With --plc: fetch did:web documents over plain http (a test network).
    #[arg(long, requires = "plc")]
    did_web_http: bool,
    /// Also print one JSON line per record.
    #[arg(long)]
    records: bool,
    /// Files verified at once (default: one per core). Output stays in file order.
    #[arg(long, short)]
    jobs: Option<usize>,
    /// At the end, print {"files","failed","seconds","peak_rss_bytes"} to stderr.
    #[arg(long)]
    stats: bool,
    #[command(flatten)]
    spill: SpillArgs,
    /// CAR files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    #[command(flatten)]
    spill: SpillArgs,
    /// The CAR file.
    file: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CurveArg {
    K256,
    P256,
}

#[derive(Debug, Args)]
pub(crate) struct SampleArgs {
    /// Records besides the profile.
    #[arg(long, default_value_t = 1000)]
    records: u64,
    /// Seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Signing key curve.
    #[arg(long, value_enum, default_value_t = CurveArg::K256)]
    curve: CurveArg,
    /// Tiny records ({"$type": "com.example.tiny", "i": n}): the most blocks per byte.
    #[arg(long)]
    tiny: bool,
    /// The repository's DID (default: one derived from the seed), e.g. a did:web whose
    /// document a test host serves.
    #[arg(long)]
    did: Option<String>,
    /// Output file.
    #[arg(long, short)]
    out: PathBuf,
}

pub(crate) fn run(command: CarCommand) -> Result<ExitCode> {
    match command {
        CarCommand::Verify(args) => verify(args),
        CarCommand::Inspect(args) => inspect(args),
        CarCommand::Sample(args) => sample(args),
    }
}

fn parse_key(text: &str) -> Result<PublicKey> {
    let key = if text.starts_with("did:key:") {
        PublicKey::from_did_key(text)
    } else {
        PublicKey::from_multikey(text)
    };
    key.with_context(|| format!("key {text:?}"))
}

/// Where each file's key comes from.
enum Keys {
    One(PublicKey),
    ByDid(HashMap<Did, PublicKey>),
    /// Looked up per DID; `block_on` may be called from every worker thread at once.
    Resolve {
        runtime: tokio::runtime::Runtime,
        resolver: atpdb_identity::Resolver,
    },
}

impl Keys {
    fn from_args(args: &VerifyArgs) -> Result<Keys> {
        if let Some(text) = &args.key {
            return Ok(Keys::One(parse_key(text).context("--key")?));
        }
        if let Some(plc_url) = &args.plc {
            let http = atpdb_net::Http::new(&atpdb_net::HttpConfig {
                allow_private_network: args.allow_private_network,
                ..atpdb_net::HttpConfig::default()
            })?;
            let resolver = atpdb_identity::Resolver::new(
                atpdb_identity::IdentityConfig {
                    plc_url: plc_url.clone(),
                    did_web_scheme: if args.did_web_http { "http" } else { "https" }.to_owned(),
                    ..atpdb_identity::IdentityConfig::default()
                },
                http,
            )
            .context("--plc")?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            return Ok(Keys::Resolve { runtime, resolver });
        }
        let Some(path) = &args.keys else {
            anyhow::bail!("give --key or --keys");
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --keys {}", path.display()))?;
        let mut keys = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let context = || format!("{} line {}", path.display(), number + 1);
            let entry: KeyLine = serde_json::from_str(line).with_context(context)?;
            let did: Did = entry.did.parse().with_context(context)?;
            keys.insert(did, parse_key(&entry.key).with_context(context)?);
        }
        Ok(Keys::ByDid(keys))
    }

    fn get(&self, did: &Did) -> Result<PublicKey> {
        match self {
            Keys::One(key) => Ok(key.clone()),
            Keys::ByDid(keys) => keys
                .get(did)
                .cloned()
                .with_context(|| format!("no key for {did} in --keys")),
            Keys::Resolve { runtime, resolver } => {
                let identity = runtime
                    .block_on(resolver.resolve(did))
                    .with_context(|| format!("resolving {did}"))?;
                Ok(identity.key.clone())
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct KeyLine {
    did: String,
    key: String,
}

fn open(
    path: &Path,
    options: &VerifyOptions,
    scratch: Scratch,
) -> Result<atpdb_repo::verify::LoadedCar, atpdb_repo::Error> {
    let file = File::open(path)?;
    // A file that fits the memory budget is held whole and its blocks indexed in place; a
    // larger one streams, spilling past the budget.
    let metadata = file.metadata()?;
    let size = metadata.len();
    if size > options.memory_budget as u64 {
        return load_car_reusing(file, options, scratch);
    }
    if metadata.is_file()
        && size > 0
        && let Some(map) = map_file(&file)
    {
        return load_car_in_memory(map, options, scratch);
    }
    load_car_whole(file, size, options, scratch)
}

/// Maps a regular file read-only, or `None` where the system will not (the caller reads it).
///
/// Reading a CAR copies it out of the page cache into memory the kernel must first zero:
/// on this project's 2-core VMs that was a fifth of `car verify`'s time over a corpus with
/// two 24 MB repositories. A mapping reads the page cache where it lies.
#[allow(unsafe_code)]
fn map_file(file: &File) -> Option<memmap2::Mmap> {
    // SAFETY: the mapping is private and read-only, and the slice it gives is only read while
    // the map lives (the loaded CAR owns it). The one hazard is another process writing or
    // truncating the file during verification: `car verify` documents that files must not
    // change while it reads them (a truncation ends the process with SIGBUS; a write makes
    // that file's verdict meaningless, as it would for any reader of a changing file).
    unsafe { memmap2::MmapOptions::new().populate().map(file) }.ok()
}

fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let did: Option<Did> = args
        .did
        .as_deref()
        .map(str::parse)
        .transpose()
        .context("--did")?;
    let keys = Keys::from_args(&args)?;
    let options = args.spill.options();
    let job = Job {
        did: did.as_ref(),
        keys: &keys,
        options: &options,
        records: args.records,
    };
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .clamp(1, args.files.len().max(1));
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut failed = false;
    if jobs == 1 {
        // Each file is verified in the memory the previous one used.
        let mut scratch = Scratch::default();
        for path in &args.files {
            let (text, ok) = job.run(path, &mut scratch);
            failed |= !ok;
            out.write_all(text.as_bytes())?;
        }
    } else {
        // Workers take files in turn; lines come out in the order the files were given.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let (sender, receiver) = std::sync::mpsc::channel::<(usize, String, bool)>();
        std::thread::scope(|scope| -> Result<()> {
            for _ in 0..jobs {
                let sender = sender.clone();
                let (next, job, files) = (&next, &job, &args.files);
                scope.spawn(move || {
                    let mut scratch = Scratch::default();
                    loop {
                        let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(path) = files.get(index) else { break };
                        let (text, ok) = job.run(path, &mut scratch);
                        if sender.send((index, text, ok)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(sender);
            let mut pending = BTreeMap::new();
            let mut printed = 0;
            for (index, text, ok) in receiver {
                failed |= !ok;
                pending.insert(index, text);
                while let Some(text) = pending.remove(&printed) {
                    out.write_all(text.as_bytes())?;
                    printed += 1;
                }
            }
            Ok(())
        })?;
    }
    out.flush()?;
    if args.stats {
        let stats = json!({
            "files": args.files.len(),
            "failed": failed,
            "seconds": started.elapsed().as_secs_f64(),
            "peak_rss_bytes": peak_rss_bytes(),
        });
        eprintln!("{stats}");
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The process's peak resident memory (`VmHWM`), where the system reports it (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What verifying one file needs, shared by every worker.
struct Job<'a> {
    did: Option<&'a Did>,
    keys: &'a Keys,
    options: &'a VerifyOptions,
    records: bool,
}

impl Job<'_> {
    /// Verifies one file; returns its output lines and whether it verified.
    fn run(&self, path: &Path, scratch: &mut Scratch) -> (String, bool) {
        let mut text = String::new();
        let mut line = json!({ "file": path.display().to_string() });
        let mut records = 0u64;
        let outcome = (|| -> Result<VerifiedRepo> {
            let car = open(path, self.options, std::mem::take(scratch))?;
            line["bytes"] = json!(car.bytes());
            let commit = car.commit()?;
            line["did"] = json!(commit.did.as_str());
            line["rev"] = json!(commit.rev.as_str());
            line["commit"] = json!(car.root().to_string());
            let key = self.keys.get(&commit.did)?;
            let repo = car.verify(Expected {
                did: self.did,
                key: &key,
            })?;
            let mut walker = repo.records();
            while let Some(record) = walker.next_record()? {
                records += 1;
                if self.records {
                    let record_line = json!({
                        "did": record.did.as_str(),
                        "collection": record.collection,
                        "rkey": record.rkey,
                        "cid": record.cid.to_string(),
                    });
                    text.push_str(&record_line.to_string());
                    text.push('\n');
                }
            }
            drop(walker);
            Ok(repo)
        })();
        line["records"] = json!(records);
        let ok = match outcome {
            Ok(repo) => {
                *scratch = repo.into_scratch();
                line["signature"] = json!("valid");
                line["ok"] = json!(true);
                true
            }
            Err(err) => {
                line["ok"] = json!(false);
                line["error"] = json!(format!("{err:#}"));
                false
            }
        };
        text.push_str(&line.to_string());
        text.push('\n');
        (text, ok)
    }
}

fn inspect(args: InspectArgs) -> Result<ExitCode> {
    let path = &args.file;
    let car = open(path, &args.spill.options(), Scratch::default())
        .with_context(|| format!("reading {}", path.display()))?;
    let (bytes, blocks, distinct, spilled) = (
        car.bytes(),
        car.blocks(),
        car.store().len(),
        car.store().spilled_bytes(),
    );
    // Inspection knows no key: the tree is checked, the signature is not (and not claimed).
    let (commit, mut walker) = car
        .walk_unsigned()
        .with_context(|| format!("reading the commit of {}", path.display()))?;
    let mut collections: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(record) = walker
        .next_record()
        .with_context(|| format!("walking {}", path.display()))?
    {
        *collections.entry(record.collection.to_owned()).or_default() += 1;
    }
    let stats = walker.stats();
    let record_bytes = walker.record_bytes();
    drop(walker);
    let mut out = std::io::stdout().lock();
    writeln!(out, "file        {}", path.display())?;
    writeln!(out, "did         {}", commit.did)?;
    writeln!(out, "commit      {}", car.root())?;
    writeln!(out, "rev         {}", commit.rev)?;
    writeln!(out, "version     {}", commit.version)?;
    writeln!(out, "mst root    {}", commit.data)?;
    writeln!(
        out,
        "mst depth   {} (root layer {}, {} nodes)",
        stats.depth, stats.root_layer, stats.nodes
    )?;
    writeln!(out, "records     {} ({record_bytes} bytes)", stats.entries)?;
    writeln!(out, "blocks      {blocks} ({distinct} distinct)")?;
    writeln!(
        out,
        "bytes       {bytes}{}",
        if spilled > 0 {
            format!(" ({spilled} spilled to disk)")
        } else {
            String::new()
        }
    )?;
    writeln!(out, "signature   unchecked (use `atpdb car verify --key`)")?;
    writeln!(out, "collections")?;
    for (collection, count) in &collections {
        writeln!(out, "  {count:>9}  {collection}")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn sample(args: SampleArgs) -> Result<ExitCode> {
    let curve = match args.curve {
        CurveArg::K256 => Curve::K256,
        CurveArg::P256 => Curve::P256,
    };
    let file =
        File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let writer = BufWriter::with_capacity(1 << 20, file);
    let shape = if args.tiny {
        SampleShape::Tiny
    } else {
        SampleShape::Realistic
    };
    let (writer, summary) = match &args.did {
        Some(did) => {
            let did: Did = did
                .parse()
                .with_context(|| format!("--did {did:?} is not a DID"))?;
            write_sample_car_for(did, args.seed, args.records, curve, shape, writer)?
        }
        None => write_sample_car_shaped(args.seed, args.records, curve, shape, writer)?,
    };
    writer
        .into_inner()
        .map_err(|err| err.into_error())?
        .sync_all()
        .with_context(|| format!("writing {}", args.out.display()))?;
    let line = json!({
        "file": args.out.display().to_string(),
        "did": summary.did.as_str(),
        "commit": summary.commit.to_string(),
        "rev": summary.rev.as_str(),
        "records": summary.records,
        "key": summary.key.public().to_did_key(),
    });
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}
