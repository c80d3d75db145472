//! The one error type of the crate: each variant names what failed and on which key.

use std::path::PathBuf;

/// Shorthand for results of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a store operation failed.
///
/// `Corrupt` means bytes on disk did not decode: the store refuses to guess, and the caller
/// should stop rather than serve or overwrite data it cannot read. `Fjall` and `Io` are
/// failures of the machine below (disk, permissions); after a failed write fjall refuses
/// further writes (it is poisoned), and the process should exit and reopen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another store (in this process or another) holds the directory's lock file.
    #[error("data directory {} is locked by another atpdb store", dir.display())]
    Locked {
        /// The data directory.
        dir: PathBuf,
    },
    /// A file-system operation on the data directory failed.
    #[error("{}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The storage engine failed (I/O below it, or it is poisoned after an earlier failure).
    #[error("storage engine failed")]
    Fjall(#[from] fjall::Error),
    /// Bytes on disk do not decode as what their keyspace holds.
    #[error("corrupt {what} at key {key}: {reason}")]
    Corrupt {
        /// The kind of value: `record`, `repo`, `event`, `counter`...
        what: &'static str,
        /// The key, printable (non-UTF-8 bytes escaped).
        key: String,
        /// What is wrong with the bytes.
        reason: String,
    },
    /// The data directory was written by a newer (or unknown) version of the store.
    #[error("data directory {} has store format {found}, this build reads format {expected}", dir.display())]
    UnsupportedFormat {
        /// The data directory.
        dir: PathBuf,
        /// The format found on disk.
        found: u64,
        /// The format this build writes.
        expected: u64,
    },
    /// A cursor name or config key is empty or longer than the storage engine accepts.
    #[error("{what} key of {len} bytes: keys must be 1 to {limit} bytes long")]
    InvalidKey {
        /// The kind of key: `cursor`, `config`.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The longest key accepted.
        limit: usize,
    },
    /// A record handed to the store whose collection is not an NSID or whose key is not a
    /// record key (a CAR walk holds keys only to the MST's wider rule).
    #[error("record {path} cannot be stored")]
    InvalidRecordName {
        /// `collection/rkey` as given.
        path: String,
        /// Which rule it breaks.
        #[source]
        source: atpdb_repo::syntax::SyntaxError,
    },
    /// A thread panicked while committing; counters may not match the disk any more.
    #[error("a commit panicked; reopen the store")]
    Poisoned,
}

impl StoreError {
    /// A [`StoreError::Corrupt`] for `key` (bytes, shown escaped).
    pub(crate) fn corrupt(what: &'static str, key: &[u8], reason: impl ToString) -> StoreError {
        StoreError::Corrupt {
            what,
            key: printable(key),
            reason: reason.to_string(),
        }
    }
}

/// Key bytes as text: UTF-8 runs as is, other bytes (the 0x00 separators, big-endian ids)
/// escaped, so an error message shows which key was bad.
pub(crate) fn printable(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}
