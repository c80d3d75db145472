//! What the store keeps about an account and a backfill run.

use std::fmt;
use std::str::FromStr;

use atpdb_repo::Cid;
use atpdb_repo::syntax::Did;

/// Where a repo is in the sync state machine.
///
/// The text forms are Tap's words (`pending`, `resyncing`, `active`, `error`,
/// `desynchronized`), so the HTTP API and Tap clients agree on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RepoState {
    /// Tracked, waiting for its first backfill.
    Pending,
    /// A backfill is running; live commits are buffered meanwhile.
    Syncing,
    /// Backfilled and following the firehose.
    Synced,
    /// The last backfill failed; retried after `retry_after_us`.
    Error,
    /// A live commit did not follow from the stored rev: needs a resync.
    Desynchronized,
}

impl RepoState {
    /// Every state, in [`RepoState::code`] order.
    pub const ALL: [RepoState; 5] = [
        RepoState::Pending,
        RepoState::Syncing,
        RepoState::Synced,
        RepoState::Error,
        RepoState::Desynchronized,
    ];

    /// Tap's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            RepoState::Pending => "pending",
            RepoState::Syncing => "resyncing",
            RepoState::Synced => "active",
            RepoState::Error => "error",
            RepoState::Desynchronized => "desynchronized",
        }
    }

    /// The byte that stands for the state on disk (state index keys, repo values, events).
    pub(crate) fn code(self) -> u8 {
        match self {
            RepoState::Pending => 0,
            RepoState::Syncing => 1,
            RepoState::Synced => 2,
            RepoState::Error => 3,
            RepoState::Desynchronized => 4,
        }
    }

    /// The state a [`RepoState::code`] byte stands for.
    pub(crate) fn from_code(code: u8) -> Option<RepoState> {
        RepoState::ALL.get(usize::from(code)).copied()
    }
}

impl fmt::Display for RepoState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`RepoState`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown repo state {0:?} (expected pending, resyncing, active, error or desynchronized)")]
pub struct UnknownRepoState(pub String);

impl FromStr for RepoState {
    type Err = UnknownRepoState;

    fn from_str(input: &str) -> Result<RepoState, UnknownRepoState> {
        RepoState::ALL
            .into_iter()
            .find(|state| state.as_str() == input)
            .ok_or_else(|| UnknownRepoState(input.to_owned()))
    }
}

/// The account's status as its PDS or relay reports it (`#account` events, `getRepoStatus`).
///
/// Statuses the protocol may add later are kept verbatim in `Other`, so they survive a round
/// trip through the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AccountStatus {
    /// The account is active.
    Active,
    /// The owner deactivated it.
    Deactivated,
    /// The host took it down.
    Takendown,
    /// The host suspended it for a while.
    Suspended,
    /// The account was deleted.
    Deleted,
    /// Any other status string.
    Other(String),
}

impl AccountStatus {
    /// The status as the protocol spells it.
    pub fn as_str(&self) -> &str {
        match self {
            AccountStatus::Active => "active",
            AccountStatus::Deactivated => "deactivated",
            AccountStatus::Takendown => "takendown",
            AccountStatus::Suspended => "suspended",
            AccountStatus::Deleted => "deleted",
            AccountStatus::Other(other) => other,
        }
    }

    /// Whether the account's records may be served (only an active account's are).
    pub fn is_active(&self) -> bool {
        *self == AccountStatus::Active
    }

    /// The status named by `input`; unknown names become [`AccountStatus::Other`].
    pub fn from_name(input: &str) -> AccountStatus {
        match input {
            "active" => AccountStatus::Active,
            "deactivated" => AccountStatus::Deactivated,
            "takendown" => AccountStatus::Takendown,
            "suspended" => AccountStatus::Suspended,
            "deleted" => AccountStatus::Deleted,
            other => AccountStatus::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for AccountStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AccountStatus {
    type Err = std::convert::Infallible;

    fn from_str(input: &str) -> Result<AccountStatus, Self::Err> {
        Ok(AccountStatus::from_name(input))
    }
}

/// One tracked account: its sync state and the commit its stored records match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoEntry {
    /// The account.
    pub did: Did,
    /// Where it is in the sync state machine (indexed: see [`crate::Store::repos_in_state`]).
    pub state: RepoState,
    /// The account status its host reports.
    pub status: AccountStatus,
    /// The last verified handle, if any.
    pub handle: Option<String>,
    /// The rev of the commit the stored records are from.
    pub rev: Option<String>,
    /// The MST root of that commit: the next live commit's `prevData` must equal it.
    pub data: Option<Cid>,
    /// The PDS endpoint the DID document names.
    pub pds: Option<String>,
    /// Why the last sync failed.
    pub error: Option<String>,
    /// Failed attempts since the last success.
    pub retries: u32,
    /// Do not retry before this time (µs since the Unix epoch).
    pub retry_after_us: u64,
    /// When the repo last finished a sync (µs since the Unix epoch), 0 if never.
    pub last_sync_us: u64,
    /// When the repo was added (µs since the Unix epoch).
    pub added_us: u64,
}

impl RepoEntry {
    /// A newly tracked account: pending, active, nothing synced yet.
    pub fn new(did: Did, now_us: u64) -> RepoEntry {
        RepoEntry {
            did,
            state: RepoState::Pending,
            status: AccountStatus::Active,
            handle: None,
            rev: None,
            data: None,
            pds: None,
            error: None,
            retries: 0,
            retry_after_us: 0,
            last_sync_us: 0,
            added_us: now_us,
        }
    }
}

/// Progress of one backfill run (a crawl of many repos), kept so a restart can resume it and
/// the operator can see how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackfillRun {
    /// The run's id; 0 in [`crate::Batch::put_run`] asks the store to assign the next one.
    pub id: u64,
    /// What the run covers: `full`, `catch-up`, `scope`...
    pub kind: String,
    /// When it started (µs since the Unix epoch).
    pub started_us: u64,
    /// When it finished, if it did.
    pub finished_us: Option<u64>,
    /// Repos finished.
    pub done: u64,
    /// Repos to do, as far as known.
    pub total: u64,
    /// Records written.
    pub records: u64,
    /// Repos that failed.
    pub errors: u64,
    /// Where to resume (for example a `listRepos` cursor).
    pub checkpoint: Option<String>,
}
