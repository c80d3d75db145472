//! A PDS host: accounts with real keys, repos as real MSTs with signed commits, a sequencer
//! that gives every commit, sync, identity and account event a seq, and the XRPC surface a
//! sync engine or an app's client talks to.

mod events;
mod routes;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use atpdb_repo::cid::CidMap;
use atpdb_repo::crypto::{Curve, Keypair};
use atpdb_repo::repo::{CommitData, MemoryRepo, Write};
use atpdb_repo::syntax::{Did, Handle, Tid};
use atpdb_repo::value::Value;
use atpdb_repo::{Cid, Error as RepoError};
use tokio_util::sync::CancellationToken;

use crate::auth::TokenKey;
use crate::faults::Faults;
use crate::plc::{Plc, PlcError};
use crate::sequencer::Sequencer;
use crate::subscribe::SubscribeOptions;

pub(crate) use events::mangle;
pub use routes::router;

/// How a PDS host behaves.
#[derive(Debug, Clone)]
pub struct PdsConfig {
    /// Events kept for cursor replay.
    pub replay_window: usize,
    /// A live subscriber this many events behind the head gets `ConsumerTooSlow`.
    pub max_lag: u64,
    /// A subscriber whose socket takes nothing for this long is dropped.
    pub send_timeout: Duration,
    /// Largest blob `uploadBlob` accepts, in bytes.
    pub max_blob_size: usize,
    /// Password for the admin API (user `admin`, HTTP Basic).
    pub admin_password: String,
    /// TID clock id for revs, so that hosts' revs differ in their low bits.
    pub clock_id: u16,
}

impl Default for PdsConfig {
    fn default() -> Self {
        PdsConfig {
            replay_window: 1_000_000,
            max_lag: 100_000,
            send_timeout: Duration::from_secs(30),
            max_blob_size: 5 * 1024 * 1024,
            admin_password: "admin".to_owned(),
            clock_id: 0,
        }
    }
}

/// Why an operation on a PDS failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PdsError {
    /// No such account on this host.
    #[error("repo not found: {0}")]
    RepoNotFound(String),
    /// The account exists but may not write or be read now.
    #[error("repo {did} is {status}")]
    Inactive {
        /// The account.
        did: String,
        /// Its hosting status.
        status: &'static str,
    },
    /// The handle is taken or not served here.
    #[error("handle not available: {0}")]
    HandleNotAvailable(String),
    /// A `swapCommit`/`swapRecord` precondition failed.
    #[error("invalid swap: {0}")]
    InvalidSwap(String),
    /// The writes do not apply (record exists, path invalid, bad DRISL...).
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The PLC directory refused an operation.
    #[error(transparent)]
    Plc(#[from] PlcError),
    /// Bad input that is not one of the above.
    #[error("{0}")]
    Invalid(String),
}

/// An account's hosting status, as `#account` and `getRepoStatus` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Serving and writable.
    Active,
    /// Paused by its owner.
    Deactivated,
    /// Taken down by the host.
    Takendown,
    /// Suspended by the host.
    Suspended,
}

impl Status {
    /// The wire name (`None` for active).
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            Status::Active => None,
            Status::Deactivated => Some("deactivated"),
            Status::Takendown => Some("takendown"),
            Status::Suspended => Some("suspended"),
        }
    }
}

/// An uploaded blob.
#[derive(Debug, Clone)]
pub(crate) struct Blob {
    pub(crate) mime: String,
    pub(crate) bytes: bytes::Bytes,
}

/// One hosted account.
#[derive(Debug)]
pub(crate) struct Account {
    pub(crate) did: Did,
    pub(crate) handle: Handle,
    pub(crate) email: String,
    pub(crate) password: String,
    pub(crate) signing: Keypair,
    pub(crate) rotation: Keypair,
    pub(crate) repo: MemoryRepo,
    pub(crate) status: Status,
    /// The rev that first wrote each block, for `getRepo?since=`.
    pub(crate) block_revs: CidMap<Tid>,
    /// Blobs by CID string, in CID order for `listBlobs` paging.
    pub(crate) blobs: BTreeMap<String, Blob>,
    /// The session ids whose refresh tokens are still good.
    pub(crate) sessions: Vec<String>,
    /// The last whole-repo CAR served and the commit it was made at. A real PDS serves
    /// `getRepo` from another machine; the devnet shares the cores of whatever it tests, and
    /// rebuilding the CAR for every request took a tenth of the CPU of a benchmarked
    /// backfill (`sync-bench backfill`). Only CARs up to [`WHOLE_CAR_CACHE_MAX`] are kept.
    whole_car: Option<(Cid, bytes::Bytes)>,
}

/// Largest whole-repo CAR an account keeps for the next `getRepo`: a test network's repos
/// are mostly small, and a huge one should not double the devnet's memory.
const WHOLE_CAR_CACHE_MAX: usize = 8 << 20;

impl Account {
    /// The repo as a CAR at its current commit, rebuilt only when the repo changed.
    pub(crate) fn whole_car(&mut self) -> Result<bytes::Bytes, RepoError> {
        let commit = self.repo.commit_cid();
        if let Some((cid, bytes)) = &self.whole_car
            && *cid == commit
        {
            return Ok(bytes.clone());
        }
        let bytes = bytes::Bytes::from(self.repo.to_car()?);
        self.whole_car = (bytes.len() <= WHOLE_CAR_CACHE_MAX).then(|| (commit, bytes.clone()));
        Ok(bytes)
    }
}

/// What a new account starts with.
#[derive(Debug, Clone)]
pub struct NewAccount {
    /// The handle (must end in a domain this host serves, `.test`).
    pub handle: Handle,
    /// Login email.
    pub email: String,
    /// Login password.
    pub password: String,
    /// Repo signing key.
    pub signing: Keypair,
    /// PLC rotation key.
    pub rotation: Keypair,
    /// Records of the first commit (at most 200).
    pub records: Vec<Write>,
}

#[derive(Debug, Default)]
struct Accounts {
    by_did: HashMap<Did, Arc<Mutex<Account>>>,
    by_handle: HashMap<String, Did>,
    /// Creation order, which `listRepos` pages through.
    order: Vec<Did>,
}

pub(crate) struct Inner {
    pub(crate) url: String,
    pub(crate) service_did: String,
    pub(crate) plc: Plc,
    pub(crate) faults: Faults,
    pub(crate) sequencer: Arc<Sequencer>,
    pub(crate) subscribe: SubscribeOptions,
    accounts: RwLock<Accounts>,
    clock: Mutex<u64>,
    clock_id: u16,
    pub(crate) tokens: TokenKey,
    pub(crate) admin_password: String,
    pub(crate) max_blob_size: usize,
    pub(crate) shutdown: CancellationToken,
    /// Other hosts of the same devnet, for account migration.
    pub(crate) peers: RwLock<Vec<Pds>>,
}

/// A handle to one PDS host; clones share it.
#[derive(Clone)]
pub struct Pds {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Pds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pds")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as u64)
}

/// The blob CIDs a record references (`{$type: "blob", ref: {$link}}` anywhere in it).
pub(crate) fn blob_refs(value: &Value, out: &mut Vec<Cid>) {
    match value {
        Value::Map(map) => {
            if map.get("$type").and_then(Value::as_str) == Some("blob")
                && let Some(link) = map.get("ref").and_then(Value::as_link)
            {
                out.push(*link);
            }
            for child in map.values() {
                blob_refs(child, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| blob_refs(item, out)),
        _ => {}
    }
}

impl Pds {
    /// A host that will answer at `url` (its listener is bound by the caller).
    pub fn new(
        url: String,
        plc: Plc,
        config: &PdsConfig,
        faults: Faults,
        shutdown: CancellationToken,
    ) -> Pds {
        let service_did = format!(
            "did:web:{}",
            url.trim_start_matches("http://").replace(':', "%3A")
        );
        Pds {
            inner: Arc::new(Inner {
                tokens: TokenKey::new(crate::auth::random_bytes(), service_did.clone()),
                url,
                service_did,
                plc,
                faults,
                sequencer: Arc::new(Sequencer::new(1, config.replay_window)),
                subscribe: SubscribeOptions {
                    max_lag: config.max_lag,
                    send_timeout: config.send_timeout,
                },
                accounts: RwLock::default(),
                clock: Mutex::new(0),
                clock_id: config.clock_id,
                admin_password: config.admin_password.clone(),
                max_blob_size: config.max_blob_size,
                shutdown,
                peers: RwLock::default(),
            }),
        }
    }

    /// Where the host answers, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The host's faults, switchable at runtime.
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// The newest seq the host has handed out.
    pub fn head_seq(&self) -> u64 {
        self.inner.sequencer.head()
    }

    /// Skips `by` seqs, as after a host or relay swap.
    pub fn jump_seq(&self, by: u64) {
        self.inner.sequencer.jump(by);
    }

    /// Forgets all but the newest `keep` events, so older cursors become outdated.
    pub fn trim_window(&self, keep: usize) {
        self.inner.sequencer.trim(keep);
    }

    pub(crate) fn set_peers(&self, peers: Vec<Pds>) {
        *self
            .inner
            .peers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = peers;
    }

    /// The next rev: the current time in microseconds, strictly increasing per host.
    pub(crate) fn next_rev(&self) -> Tid {
        let mut last = lock(&self.inner.clock);
        let micros = unix_micros().max(*last + 1);
        *last = micros;
        Tid::from_parts(micros, self.inner.clock_id)
    }

    pub(crate) fn account(&self, did: &Did) -> Result<Arc<Mutex<Account>>, PdsError> {
        self.inner
            .accounts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_did
            .get(did)
            .cloned()
            .ok_or_else(|| PdsError::RepoNotFound(did.to_string()))
    }

    /// The DID for a handle or DID string hosted here.
    pub(crate) fn lookup(&self, identifier: &str) -> Option<Did> {
        let accounts = self
            .inner
            .accounts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if identifier.starts_with("did:") {
            return accounts
                .by_did
                .keys()
                .find(|did| did.as_str() == identifier)
                .cloned();
        }
        accounts
            .by_handle
            .get(&identifier.to_ascii_lowercase())
            .cloned()
    }

    /// The DID of the account holding `handle` on this host, looked up live: what the
    /// devnet's DNS server and `/.well-known/atproto-did` answer.
    ///
    /// `None` for a copy a migration left behind (the PLC directory names another host of
    /// this devnet as the account's PDS), so that a handle changed on the new host stops
    /// resolving through the old one.
    pub fn did_for_handle(&self, handle: &Handle) -> Option<Did> {
        let did = self
            .inner
            .accounts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_handle
            .get(handle.as_str())
            .cloned()?;
        let moved_to_peer = self.inner.plc.data(&did).is_some_and(|data| {
            data.pds_endpoint().is_some_and(|endpoint| {
                endpoint != self.inner.url
                    && self
                        .inner
                        .peers
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .iter()
                        .any(|peer| peer.url() == endpoint)
            })
        });
        (!moved_to_peer).then_some(did)
    }

    /// Every hosted DID in creation order, starting after `after` (a `listRepos` cursor).
    pub(crate) fn page(&self, after: Option<&str>, limit: usize) -> Vec<Arc<Mutex<Account>>> {
        let accounts = self
            .inner
            .accounts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = match after {
            Some(cursor) => accounts
                .order
                .iter()
                .position(|did| did.as_str() == cursor)
                .map_or(accounts.order.len(), |at| at + 1),
            None => 0,
        };
        accounts.order[start.min(accounts.order.len())..]
            .iter()
            .filter_map(|did| accounts.by_did.get(did).cloned())
            .take(limit)
            .collect()
    }

    /// All hosted DIDs in creation order.
    pub fn dids(&self) -> Vec<Did> {
        self.inner
            .accounts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .order
            .clone()
    }

    /// Creates an account: registers its DID with the PLC directory, makes the first commit
    /// and sequences `#identity`, `#account` and `#commit`, as the reference PDS does.
    pub fn create_account(&self, new: NewAccount) -> Result<Did, PdsError> {
        let handle_key = new.handle.as_str().to_ascii_lowercase();
        if !handle_key.ends_with(".test") {
            return Err(PdsError::HandleNotAvailable(format!(
                "{handle_key}: this host serves .test handles"
            )));
        }
        if self.handle_taken(&handle_key) {
            return Err(PdsError::HandleNotAvailable(handle_key));
        }
        let did = self.inner.plc.register(
            &new.rotation,
            &new.signing.public(),
            &new.handle,
            &self.inner.url,
        )?;
        let rev = self.next_rev();
        let (repo, first) = MemoryRepo::create(did.clone(), &new.signing, rev, &new.records)?;
        let mut account = Account {
            did: did.clone(),
            handle: new.handle.clone(),
            email: new.email,
            password: new.password,
            signing: new.signing,
            rotation: new.rotation,
            repo,
            status: Status::Active,
            block_revs: CidMap::default(),
            blobs: BTreeMap::new(),
            sessions: Vec::new(),
            whole_car: None,
        };
        record_block_revs(&mut account, &first);
        let account = Arc::new(Mutex::new(account));
        {
            let mut accounts = self
                .inner
                .accounts
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if accounts.by_handle.contains_key(&handle_key) {
                return Err(PdsError::HandleNotAvailable(handle_key));
            }
            accounts.by_handle.insert(handle_key, did.clone());
            accounts.by_did.insert(did.clone(), account.clone());
            accounts.order.push(did.clone());
        }
        let guard = lock(&account);
        self.emit_identity(&guard);
        self.emit_account(&guard);
        self.emit_commit(&guard, &first)?;
        Ok(did)
    }

    fn handle_taken(&self, handle: &str) -> bool {
        self.inner
            .accounts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_handle
            .contains_key(handle)
    }

    /// Applies writes as one signed commit and sequences its `#commit`. `swap_commit`, when
    /// given, must be the current commit CID.
    pub fn write(
        &self,
        did: &Did,
        writes: &[Write],
        swap_commit: Option<Cid>,
    ) -> Result<CommitData, PdsError> {
        let account = self.account(did)?;
        let mut account = lock(&account);
        self.write_locked(&mut account, writes, swap_commit)
    }

    pub(crate) fn write_locked(
        &self,
        account: &mut Account,
        writes: &[Write],
        swap_commit: Option<Cid>,
    ) -> Result<CommitData, PdsError> {
        if let Some(status) = account.status.as_str() {
            return Err(PdsError::Inactive {
                did: account.did.to_string(),
                status,
            });
        }
        if let Some(expected) = swap_commit
            && expected != account.repo.commit_cid()
        {
            return Err(PdsError::InvalidSwap(format!(
                "commit was at {}",
                account.repo.commit_cid()
            )));
        }
        if writes.len() > 200 {
            return Err(PdsError::Invalid(
                "at most 200 writes per commit".to_owned(),
            ));
        }
        let rev = self.next_rev();
        let signing = account.signing.clone();
        let data = account.repo.apply(&signing, rev, writes)?;
        record_block_revs(account, &data);
        self.emit_commit(account, &data)?;
        Ok(data)
    }

    /// Changes an account's handle: PLC update, then `#identity`.
    pub fn set_handle(&self, did: &Did, handle: Handle) -> Result<(), PdsError> {
        let account = self.account(did)?;
        let mut account = lock(&account);
        let key = handle.as_str().to_ascii_lowercase();
        if self.handle_taken(&key) {
            return Err(PdsError::HandleNotAvailable(key));
        }
        let aka = format!("at://{handle}");
        self.inner.plc.update(did, &account.rotation, |data| {
            data.also_known_as = vec![aka]
        })?;
        {
            let mut accounts = self
                .inner
                .accounts
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            accounts
                .by_handle
                .remove(&account.handle.as_str().to_ascii_lowercase());
            accounts.by_handle.insert(key, did.clone());
        }
        account.handle = handle;
        self.emit_identity(&account);
        Ok(())
    }

    /// Replaces the signing key (k256 or p256): PLC update, `#identity`, then a `#sync` of the
    /// repo re-signed with the new key so that consumers can check the new key at once.
    pub fn rotate_key(&self, did: &Did, curve: Curve) -> Result<(), PdsError> {
        let account = self.account(did)?;
        let mut account = lock(&account);
        let secret = crate::auth::random_bytes::<32>();
        let key = Keypair::from_secret_bytes(curve, &secret)
            .map_err(|err| PdsError::Invalid(format!("new key: {err}")))?;
        let multikey = key.public().to_did_key();
        self.inner.plc.update(did, &account.rotation, |data| {
            data.verification_methods
                .insert("atproto".to_owned(), multikey);
        })?;
        account.signing = key;
        self.emit_identity(&account);
        let rev = self.next_rev();
        let signing = account.signing.clone();
        let data = account.repo.resign(&signing, rev)?;
        record_block_revs(&mut account, &data);
        self.emit_sync(&account);
        Ok(())
    }

    /// Sets an account's hosting status and sequences `#account` (and, on reactivation, a
    /// `#sync` so that consumers can check they are current).
    pub fn set_status(&self, did: &Did, status: Status) -> Result<(), PdsError> {
        let account = self.account(did)?;
        let mut account = lock(&account);
        let was = account.status;
        account.status = status;
        self.emit_account(&account);
        if status == Status::Active && was != Status::Active {
            self.emit_sync(&account);
        }
        Ok(())
    }

    /// Deletes an account: its events stop being replayed, `#account` says `deleted`, and the
    /// DID is tombstoned in the PLC directory.
    pub fn delete_account(&self, did: &Did) -> Result<(), PdsError> {
        let account = self.account(did)?;
        let account = lock(&account);
        self.inner.sequencer.invalidate(did);
        {
            let mut accounts = self
                .inner
                .accounts
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            accounts.by_did.remove(did);
            accounts
                .by_handle
                .remove(&account.handle.as_str().to_ascii_lowercase());
            accounts.order.retain(|other| other != did);
        }
        self.emit_raw_account(did, false, Some("deleted"));
        self.inner.plc.tombstone(did, &account.rotation)?;
        Ok(())
    }

    /// Moves an account to `to`: the new host takes the repo, keys and blobs and re-signs
    /// under a new rev (`#identity`, `#account`, `#sync` there), the PLC directory points at
    /// it, and this host deactivates its copy (`#account` deactivated).
    pub fn migrate(&self, did: &Did, to: &Pds) -> Result<(), PdsError> {
        if Arc::ptr_eq(&self.inner, &to.inner) {
            return Err(PdsError::Invalid(
                "account is already on that host".to_owned(),
            ));
        }
        let account = self.account(did)?;
        let mut old = lock(&account);
        let mut moved = Account {
            did: old.did.clone(),
            handle: old.handle.clone(),
            email: old.email.clone(),
            password: old.password.clone(),
            signing: old.signing.clone(),
            rotation: old.rotation.clone(),
            repo: old.repo.clone(),
            status: Status::Active,
            block_revs: old.block_revs.clone(),
            blobs: old.blobs.clone(),
            sessions: Vec::new(),
            whole_car: None,
        };
        let endpoint = to.inner.url.clone();
        self.inner.plc.update(did, &old.rotation, |data| {
            if let Some(service) = data.services.get_mut("atproto_pds") {
                service.endpoint = endpoint;
            }
        })?;
        let rev = to.next_rev();
        let signing = moved.signing.clone();
        let data = moved.repo.resign(&signing, rev)?;
        record_block_revs(&mut moved, &data);
        let handle_key = moved.handle.as_str().to_ascii_lowercase();
        let moved = Arc::new(Mutex::new(moved));
        {
            let mut accounts = to
                .inner
                .accounts
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            accounts.by_handle.insert(handle_key, did.clone());
            accounts.by_did.insert(did.clone(), moved.clone());
            accounts.order.push(did.clone());
        }
        {
            let moved = lock(&moved);
            to.emit_identity(&moved);
            to.emit_account(&moved);
            to.emit_sync(&moved);
        }
        old.status = Status::Deactivated;
        self.emit_account(&old);
        Ok(())
    }

    /// Stores a blob for an account and returns its raw CID.
    pub(crate) fn put_blob(
        &self,
        did: &Did,
        mime: String,
        bytes: bytes::Bytes,
    ) -> Result<Cid, PdsError> {
        let account = self.account(did)?;
        let mut account = lock(&account);
        let cid = Cid::raw(&bytes);
        account.blobs.insert(cid.to_string(), Blob { mime, bytes });
        Ok(cid)
    }

    /// Every record path of an account, in key order.
    pub fn account_paths(&self, did: &Did) -> Result<Vec<String>, PdsError> {
        let account = self.account(did)?;
        let account = lock(&account);
        Ok(account
            .repo
            .list()?
            .into_iter()
            .map(|(path, _)| path)
            .collect())
    }

    /// Every record of an account as `(path, CID)`, in key order: the truth a mirror is
    /// compared with.
    pub fn account_records(&self, did: &Did) -> Result<Vec<(String, Cid)>, PdsError> {
        let account = self.account(did)?;
        let account = lock(&account);
        Ok(account.repo.list()?)
    }

    /// A snapshot of what the relay and tests need to know about an account.
    pub fn account_info(&self, did: &Did) -> Result<AccountInfo, PdsError> {
        let account = self.account(did)?;
        let account = lock(&account);
        Ok(AccountInfo {
            did: account.did.clone(),
            handle: account.handle.clone(),
            password: account.password.clone(),
            signing_key: account.signing.public().to_did_key(),
            rev: account.repo.rev().clone(),
            commit: account.repo.commit_cid(),
            status: account.status,
            records: account.repo.list()?.len(),
        })
    }
}

/// What [`Pds::account_info`] reports.
#[derive(Debug, Clone)]
pub struct AccountInfo {
    /// The DID.
    pub did: Did,
    /// The current handle.
    pub handle: Handle,
    /// The login password.
    pub password: String,
    /// The current signing key as `did:key`.
    pub signing_key: String,
    /// The repo's rev.
    pub rev: Tid,
    /// The repo's commit CID.
    pub commit: Cid,
    /// Hosting status.
    pub status: Status,
    /// How many records the repo holds.
    pub records: usize,
}

fn record_block_revs(account: &mut Account, data: &CommitData) {
    for (cid, _) in &data.blocks {
        account
            .block_revs
            .entry(*cid)
            .or_insert_with(|| data.commit.rev.clone());
    }
}
