//! Scripted traffic: seeded accounts with realistic repos, then a steady stream of creates,
//! updates and deletes, all derived from one seed so that a run can be repeated.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use atpdb_repo::crypto::{Curve, Keypair};
use atpdb_repo::repo::Write;
use atpdb_repo::sample::{SampleRng, sample_keypair, sample_profile, sample_record};
use atpdb_repo::syntax::{Did, Handle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::pds::{NewAccount, Pds, PdsError};

/// Writes per commit while seeding: well under the 200-op and 2 MB firehose limits.
const SEED_BATCH: usize = 100;

/// Every `P256_EVERY`th account signs with p256, the rest with k256, as on the network.
const P256_EVERY: usize = 10;

/// Records' creation times start here (2025-01-01), one second apart per record.
const EPOCH_MICROS: u64 = 1_735_689_600_000_000;

/// A keypair derived from a seed.
pub(crate) fn keypair(seed: u64, curve: Curve) -> Keypair {
    sample_keypair(seed, curve)
}

/// One seeded account.
#[derive(Debug, Clone)]
pub struct SeededAccount {
    /// Its DID.
    pub did: Did,
    /// Its handle.
    pub handle: Handle,
    /// Its login password.
    pub password: String,
    /// Which PDS hosts it.
    pub pds: usize,
}

/// Creates `accounts` accounts spread over `hosts`, each with a profile and `records`
/// generated records (posts with facets, image embeds with real blobs, replies; likes,
/// follows, reposts, blocks; `com.example.*` and `fm.teal.alpha.*` records).
pub fn seed(
    hosts: &[Pds],
    accounts: usize,
    records: usize,
    seed: u64,
) -> Result<Vec<SeededAccount>, PdsError> {
    if hosts.is_empty() {
        return Ok(Vec::new());
    }
    // Accounts first, so that records can point at each other.
    let mut seeded = Vec::with_capacity(accounts);
    for index in 0..accounts {
        let account_seed = seed.wrapping_mul(1_000_003).wrapping_add(index as u64);
        let curve = if index % P256_EVERY == P256_EVERY - 1 {
            Curve::P256
        } else {
            Curve::K256
        };
        let handle: Handle = format!("user{index}.test")
            .parse()
            .map_err(|err| PdsError::Invalid(format!("{err}")))?;
        let password = format!("password-{index}");
        let profile = sample_profile(account_seed);
        let host = index % hosts.len();
        let did = hosts[host].create_account(NewAccount {
            handle: handle.clone(),
            email: format!("user{index}@example.test"),
            password: password.clone(),
            signing: keypair(account_seed, curve),
            rotation: keypair(account_seed ^ 0x0707_0707, Curve::K256),
            records: vec![Write::Create {
                path: profile.path(),
                record: profile.to_cbor()?,
            }],
        })?;
        seeded.push(SeededAccount {
            did,
            handle,
            password,
            pds: host,
        });
    }
    let dids: Vec<Did> = seeded.iter().map(|account| account.did.clone()).collect();
    // One thread per host: hosts are independent, and each host's writes serialise anyway.
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        for (host_index, host) in hosts.iter().enumerate() {
            let mine: Vec<(usize, &SeededAccount)> = seeded
                .iter()
                .enumerate()
                .filter(|(_, account)| account.pds == host_index)
                .collect();
            let dids = &dids;
            workers.push(scope.spawn(move || -> Result<(), PdsError> {
                for (index, account) in mine {
                    let account_seed = seed.wrapping_mul(1_000_003).wrapping_add(index as u64);
                    seed_records(host, &account.did, account_seed, records, dids)?;
                }
                Ok(())
            }));
        }
        for worker in workers {
            worker
                .join()
                .map_err(|_| PdsError::Invalid("a seeding thread panicked".to_owned()))??;
        }
        Ok::<(), PdsError>(())
    })?;
    Ok(seeded)
}

fn seed_records(
    host: &Pds,
    did: &Did,
    account_seed: u64,
    records: usize,
    others: &[Did],
) -> Result<(), PdsError> {
    let others: Vec<Did> = others
        .iter()
        .filter(|other| *other != did)
        .take(64)
        .cloned()
        .collect();
    let mut batch = Vec::with_capacity(SEED_BATCH);
    for index in 0..records {
        batch.push(generate(host, did, account_seed, index as u64, &others)?);
        if batch.len() == SEED_BATCH {
            host.write(did, &batch, None)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        host.write(did, &batch, None)?;
    }
    Ok(())
}

/// Record `index` of an account, with any image embed backed by a real uploaded blob.
fn generate(
    host: &Pds,
    did: &Did,
    account_seed: u64,
    index: u64,
    others: &[Did],
) -> Result<Write, PdsError> {
    let micros = EPOCH_MICROS + index * 1_000_000 + (account_seed % 1_000_000);
    let mut record = sample_record(account_seed, index, micros, others);
    if let Some(images) = record
        .json
        .pointer_mut("/embed/images")
        .and_then(|images| images.as_array_mut())
    {
        for (at, image) in images.iter_mut().enumerate() {
            let bytes = blob_bytes(account_seed ^ index.rotate_left(17) ^ at as u64);
            let size = bytes.len();
            let cid = host.put_blob(did, "image/jpeg".to_owned(), bytes.into())?;
            image["image"] = json!({
                "$type": "blob",
                "ref": {"$link": cid.to_string()},
                "mimeType": "image/jpeg",
                "size": size,
            });
        }
    }
    Ok(Write::Create {
        path: record.path(),
        record: record.to_cbor()?,
    })
}

/// A small deterministic JPEG-looking blob.
fn blob_bytes(seed: u64) -> Vec<u8> {
    let mut rng = SampleRng::new(seed);
    let len = 256 + rng.below(1792) as usize;
    let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0];
    while bytes.len() < len {
        bytes.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    bytes.truncate(len);
    bytes.extend_from_slice(&[0xFF, 0xD9]);
    bytes
}

/// Counters of the running writer.
#[derive(Debug, Default)]
pub struct TrafficStats {
    /// Commits written.
    pub commits: AtomicU64,
    /// Writes that failed (an account taken down or deleted meanwhile, for instance).
    pub errors: AtomicU64,
}

/// Keeps writing about `rate` commits per second (creates, updates and deletes of one
/// record each) to the seeded accounts until `stop`. A `rate` of `f64::INFINITY` writes as
/// fast as the hosts accept, which is how the throughput benchmark measures them.
pub fn run(
    hosts: Vec<Pds>,
    accounts: Vec<SeededAccount>,
    rate: f64,
    seed: u64,
    stop: CancellationToken,
    stats: Arc<TrafficStats>,
) {
    if accounts.is_empty() || hosts.is_empty() || rate <= 0.0 {
        return;
    }
    let mut rng = SampleRng::new(seed ^ 0x7fa1_71c0);
    // Paths each account is known to hold, so that updates and deletes name real records.
    let mut paths: Vec<Vec<String>> = accounts
        .iter()
        .map(|account| {
            hosts[account.pds]
                .account_paths(&account.did)
                .unwrap_or_default()
        })
        .collect();
    let others: Vec<Did> = accounts.iter().take(64).map(|a| a.did.clone()).collect();
    let started = Instant::now();
    let mut written: u64 = 0;
    let mut next_index: u64 = 1_000_000;
    while !stop.is_cancelled() {
        if rate.is_finite() {
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            if written >= due {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
        }
        let at = rng.below(accounts.len() as u64) as usize;
        let account = &accounts[at];
        let host = &hosts[account.pds];
        let roll = rng.below(100);
        let account_seed = seed.wrapping_mul(1_000_003).wrapping_add(at as u64);
        let write = if roll < 60 || paths[at].is_empty() {
            next_index += 1;
            generate(host, &account.did, account_seed, next_index, &others)
        } else if roll < 85 {
            let path = paths[at][rng.below(paths[at].len() as u64) as usize].clone();
            next_index += 1;
            updated(account_seed, next_index, &path)
        } else {
            let victim = rng.below(paths[at].len() as u64) as usize;
            Ok(Write::Delete {
                path: paths[at].swap_remove(victim),
            })
        };
        let result = write.and_then(|write| {
            let created = matches!(write, Write::Create { .. }).then(|| write.path().to_owned());
            host.write(&account.did, std::slice::from_ref(&write), None)?;
            Ok(created)
        });
        match result {
            Ok(Some(path)) => paths[at].push(path),
            Ok(None) => {}
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        written += 1;
        stats.commits.fetch_add(1, Ordering::Relaxed);
    }
}

/// A new version of the record at `path`: same collection, fresh content.
fn updated(account_seed: u64, index: u64, path: &str) -> Result<Write, PdsError> {
    let (collection, _) = path
        .split_once('/')
        .ok_or_else(|| PdsError::Invalid(format!("bad path {path}")))?;
    let micros = EPOCH_MICROS + index * 1_000_000;
    let mut record = sample_record(account_seed, index, micros, &[]).json;
    // Keep the collection: an update replaces a record with one of the same type.
    record["$type"] = json!(collection);
    if record.get("text").is_none() {
        record["text"] = json!(format!("edited {index}"));
    }
    let value = atpdb_repo::value::Value::from_json(&record).map_err(atpdb_repo::Error::from)?;
    Ok(Write::Update {
        path: path.to_owned(),
        record: value.to_cbor(),
    })
}
