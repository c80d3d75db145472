//! An account's repository held in memory: apply writes, sign commits, export CARs and the
//! Sync 1.1 commit slices a firehose carries. This is the writer side (a PDS, the devnet,
//! sample generation); verification never trusts it.

use std::io::Write as IoWrite;

use crate::blocks::VerifiedBlocks;
use crate::car::{CarWriter, write_car};
use crate::cid::{Cid, CidMap};
use crate::commit::{Commit, UnsignedCommit};
use crate::crypto::Keypair;
use crate::error::{Error, Result};
use crate::mst::{BlockSource, Tree, decode_node};
use crate::syntax::{Did, Tid};

/// One write in a commit, as a client asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Add a record at a path that must be free.
    Create {
        /// `collection/rkey`.
        path: String,
        /// The record's DRISL bytes.
        record: Vec<u8>,
    },
    /// Replace the record at a path that must exist.
    Update {
        /// `collection/rkey`.
        path: String,
        /// The record's DRISL bytes.
        record: Vec<u8>,
    },
    /// Remove the record at a path that must exist.
    Delete {
        /// `collection/rkey`.
        path: String,
    },
}

impl Write {
    /// The record path.
    pub fn path(&self) -> &str {
        match self {
            Write::Create { path, .. } | Write::Update { path, .. } | Write::Delete { path } => {
                path
            }
        }
    }
}

/// What an operation did, as a firehose `#commit` op reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// A new record.
    Create,
    /// A changed record.
    Update,
    /// A removed record.
    Delete,
}

impl Action {
    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }
}

/// A firehose operation: `{action, path, cid, prev}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoOp {
    /// What happened.
    pub action: Action,
    /// `collection/rkey`.
    pub path: String,
    /// The new record CID (`None` for deletes).
    pub cid: Option<Cid>,
    /// The previous record CID (`None` for creates).
    pub prev: Option<Cid>,
}

/// A signed commit and everything a firehose `#commit` needs to carry it.
#[derive(Debug, Clone)]
pub struct CommitData {
    /// The signed commit.
    pub commit: Commit,
    /// Its CID.
    pub cid: Cid,
    /// The previous commit's rev (`None` for the first commit).
    pub since: Option<Tid>,
    /// The previous MST root (`None` for the first commit).
    pub prev_data: Option<Cid>,
    /// Operations in path order.
    pub ops: Vec<RepoOp>,
    /// The commit block, every new MST node, the nodes inversion reads, and new records.
    pub blocks: Vec<(Cid, Vec<u8>)>,
}

impl CommitData {
    /// The blocks as a CAR slice rooted at the commit (`#commit.blocks`).
    pub fn car_slice(&self) -> Vec<u8> {
        write_car(
            &[self.cid],
            self.blocks
                .iter()
                .map(|(cid, bytes)| (cid, bytes.as_slice())),
        )
    }
}

/// Garbage-collect unreachable blocks after this many commits.
const GC_INTERVAL: u32 = 256;

/// A repository in memory.
#[derive(Debug, Clone)]
pub struct MemoryRepo {
    /// Every block here was produced and hashed by this repo's own encoder.
    blocks: VerifiedBlocks,
    commit: Commit,
    cid: Cid,
    commits_since_gc: u32,
}

impl MemoryRepo {
    /// A new repository with its first commit (which may be empty).
    pub fn create(
        did: Did,
        key: &Keypair,
        rev: Tid,
        writes: &[Write],
    ) -> Result<(MemoryRepo, CommitData)> {
        let mut tree = Tree::empty(crate::mst::NoBlocks);
        let mut blocks = VerifiedBlocks::new();
        // Take the root from `changed_blocks`: asking for `root_cid` first would mark the
        // node clean, and the empty node would never be stored.
        let (empty_root, nodes) = tree.changed_blocks();
        for (cid, bytes) in nodes {
            blocks.insert_hashed(cid, bytes);
        }
        // A placeholder commit for the empty tree at the lowest rev; the first real commit
        // below replaces it and is reported without `since`/`prevData`.
        let commit = UnsignedCommit {
            did,
            data: empty_root,
            rev: Tid::from_parts(0, 0),
            prev: None,
        }
        .sign(key);
        let mut repo = MemoryRepo {
            cid: commit.cid(),
            blocks,
            commit,
            commits_since_gc: 0,
        };
        let mut first = repo.apply(key, rev, writes)?;
        first.since = None;
        first.prev_data = None;
        Ok((repo, first))
    }

    /// The current commit.
    pub fn commit(&self) -> &Commit {
        &self.commit
    }

    /// The current commit's CID.
    pub fn commit_cid(&self) -> Cid {
        self.cid
    }

    /// The account.
    pub fn did(&self) -> &Did {
        &self.commit.did
    }

    /// The current rev.
    pub fn rev(&self) -> &Tid {
        &self.commit.rev
    }

    /// A record's CID and bytes.
    pub fn get_record(&self, path: &str) -> Result<Option<(Cid, &[u8])>> {
        let mut tree = Tree::load(&self.blocks, self.commit.data);
        let Some(cid) = tree.get(path.as_bytes())? else {
            return Ok(None);
        };
        Ok(self.blocks.get(&cid).map(|bytes| (cid, bytes)))
    }

    /// Every `(path, cid)` in key order.
    pub fn list(&self) -> Result<Vec<(String, Cid)>> {
        let mut tree = Tree::load(&self.blocks, self.commit.data);
        Ok(tree
            .entries()?
            .into_iter()
            .map(|(key, cid)| (String::from_utf8_lossy(&key).into_owned(), cid))
            .collect())
    }

    /// Applies `writes` as one signed commit with `rev` (which must exceed the current rev).
    pub fn apply(&mut self, key: &Keypair, rev: Tid, writes: &[Write]) -> Result<CommitData> {
        if rev <= self.commit.rev && !(writes.is_empty() && rev == self.commit.rev) {
            return Err(Error::Operation {
                path: String::new(),
                reason: format!("rev {rev} does not follow {}", self.commit.rev),
            });
        }
        let prev_data = self.commit.data;
        let mut tree = Tree::load(&self.blocks, prev_data);
        let mut ops = Vec::with_capacity(writes.len());
        let mut new_records = Vec::new();
        for write in writes {
            let path = write.path();
            if !crate::syntax::is_valid_repo_path(path.as_bytes()) {
                return Err(Error::Operation {
                    path: path.to_owned(),
                    reason: "not a valid repo path".to_owned(),
                });
            }
            let op_error = |reason: &str| Error::Operation {
                path: path.to_owned(),
                reason: reason.to_owned(),
            };
            match write {
                Write::Create { record, .. } | Write::Update { record, .. } => {
                    crate::cbor::validate(record)
                        .map_err(|err| op_error(&format!("record is not valid DRISL: {err}")))?;
                    let cid = Cid::dag_cbor(record);
                    let prev = tree.insert(path.as_bytes(), cid)?;
                    let action = match (write, prev) {
                        (Write::Create { .. }, None) => Action::Create,
                        (Write::Update { .. }, Some(_)) => Action::Update,
                        (Write::Create { .. }, Some(_)) => {
                            return Err(op_error("create of an existing record"));
                        }
                        _ => return Err(op_error("update of a missing record")),
                    };
                    new_records.push((cid, record.clone()));
                    ops.push(RepoOp {
                        action,
                        path: path.to_owned(),
                        cid: Some(cid),
                        prev,
                    });
                }
                Write::Delete { .. } => {
                    let prev = tree
                        .remove(path.as_bytes())?
                        .ok_or_else(|| op_error("delete of a missing record"))?;
                    ops.push(RepoOp {
                        action: Action::Delete,
                        path: path.to_owned(),
                        cid: None,
                        prev: Some(prev),
                    });
                }
            }
        }
        ops.sort_by(|a, b| a.path.cmp(&b.path));
        if ops.windows(2).any(|pair| pair[0].path == pair[1].path) {
            return Err(Error::Operation {
                path: String::new(),
                reason: "two writes to one path in a commit".to_owned(),
            });
        }
        let (data, new_nodes) = tree.changed_blocks();
        drop(tree);
        let mut slice: CidMap<()> = CidMap::default();
        let mut blocks_out = Vec::new();
        for (cid, bytes) in new_nodes {
            if slice.insert(cid, ()).is_none() {
                blocks_out.push((cid, bytes.clone()));
            }
            self.blocks.insert_hashed(cid, bytes);
        }
        for (cid, bytes) in new_records {
            if slice.insert(cid, ()).is_none() {
                blocks_out.push((cid, bytes.clone()));
            }
            self.blocks.insert_hashed(cid, bytes);
        }
        // Invert against the new tree to learn which unchanged nodes a consumer must also read,
        // and to check this commit is provable before it is published.
        let mut inverse = Tree::load(&self.blocks, data);
        invert_ops(&mut inverse, &ops)?;
        let inverted = inverse.root_cid();
        if inverted != prev_data {
            return Err(Error::Operation {
                path: String::new(),
                reason: format!("inversion gave {inverted}, expected {prev_data}"),
            });
        }
        for cid in inverse.loaded() {
            if slice.insert(*cid, ()).is_none()
                && let Some(bytes) = self.blocks.get(cid)
            {
                blocks_out.push((*cid, bytes.to_vec()));
            }
        }
        let since = self.commit.rev.clone();
        let commit = UnsignedCommit {
            did: self.commit.did.clone(),
            data,
            rev,
            prev: None,
        }
        .sign(key);
        let commit_bytes = commit.to_cbor();
        let cid = Cid::dag_cbor(&commit_bytes);
        self.blocks.insert_hashed(cid, commit_bytes.clone());
        self.blocks.remove(&self.cid);
        blocks_out.insert(0, (cid, commit_bytes));
        self.commit = commit.clone();
        self.cid = cid;
        self.commits_since_gc += 1;
        if self.commits_since_gc >= GC_INTERVAL {
            self.collect_garbage()?;
        }
        Ok(CommitData {
            commit,
            cid,
            since: Some(since),
            prev_data: Some(prev_data),
            ops,
            blocks: blocks_out,
        })
    }

    /// Re-signs the current tree under a new rev (after a key rotation, or for `#sync`).
    pub fn resign(&mut self, key: &Keypair, rev: Tid) -> Result<CommitData> {
        self.apply(key, rev, &[])
    }

    /// Drops blocks the current tree no longer reaches.
    fn collect_garbage(&mut self) -> Result<()> {
        let mut keep: CidMap<()> = CidMap::default();
        let mut stack = vec![self.commit.data];
        while let Some(cid) = stack.pop() {
            let bytes = self.blocks.get(&cid).ok_or_else(|| Error::MissingBlock {
                cid,
                context: "MST node".to_owned(),
            })?;
            let node = decode_node(bytes).map_err(|source| Error::Block { cid, source })?;
            stack.extend(node.left);
            for entry in &node.entries {
                stack.extend(entry.right);
                keep.insert(entry.value, ());
            }
            keep.insert(cid, ());
        }
        keep.insert(self.cid, ());
        self.blocks.retain(|cid| keep.contains_key(cid));
        self.commits_since_gc = 0;
        Ok(())
    }

    /// Writes the whole repository as a CAR: the commit, then nodes in pre-order with each
    /// node's records after it (the "streamable" order; readers must not rely on it).
    pub fn write_car<W: IoWrite>(&self, writer: W) -> Result<W> {
        self.write_car_filtered(writer, |_| true)
    }

    /// Like [`MemoryRepo::write_car`], with only the nodes and records `keep` accepts (the
    /// commit is always written): `getRepo?since=` sends the blocks written after a rev.
    pub fn write_car_filtered<W: IoWrite>(
        &self,
        writer: W,
        keep: impl Fn(&Cid) -> bool,
    ) -> Result<W> {
        let mut car = CarWriter::new(writer, &[self.cid])?;
        if let Some(commit) = self.blocks.get(&self.cid) {
            car.write_block(&self.cid, commit)?;
        }
        let mut stack = vec![self.commit.data];
        while let Some(cid) = stack.pop() {
            let bytes = self.blocks.get(&cid).ok_or_else(|| Error::MissingBlock {
                cid,
                context: "MST node".to_owned(),
            })?;
            if keep(&cid) {
                car.write_block(&cid, bytes)?;
            }
            let node = decode_node(bytes).map_err(|source| Error::Block { cid, source })?;
            for entry in &node.entries {
                if let Some(record) = self.blocks.get(&entry.value)
                    && keep(&entry.value)
                {
                    car.write_block(&entry.value, record)?;
                }
            }
            // Pre-order, left to right: push right subtrees last-first.
            for entry in node.entries.iter().rev() {
                stack.extend(entry.right);
            }
            stack.extend(node.left);
        }
        Ok(car.finish()?)
    }

    /// The whole repository as CAR bytes.
    pub fn to_car(&self) -> Result<Vec<u8>> {
        // Sized once from every block held (a bound: garbage not yet collected is counted):
        // growing by doubling copied each CAR about twice and faulted in fresh pages each
        // time, a fifth of the devnet's CPU when a backfill fetches many repos at once.
        let capacity = self
            .blocks
            .iter()
            .map(|(cid, bytes)| bytes.len() + cid.encoded_len() + 10)
            .sum::<usize>()
            + 64;
        self.write_car(Vec::with_capacity(capacity))
    }

    /// The proof for one path (`sync.getRecord`): the commit, the nodes on the path, and the
    /// record if present (its absence is proven by the same nodes).
    pub fn record_proof(&self, path: &str) -> Result<Vec<u8>> {
        let mut tree = Tree::load(&self.blocks, self.commit.data);
        let value = tree.get(path.as_bytes())?;
        let mut blocks: Vec<(&Cid, &[u8])> = Vec::new();
        if let Some(commit) = self.blocks.get(&self.cid) {
            blocks.push((&self.cid, commit));
        }
        for cid in tree.loaded() {
            if let Some(bytes) = self.blocks.get(cid) {
                blocks.push((cid, bytes));
            }
        }
        if let Some(value) = &value
            && let Some(bytes) = self.blocks.get(value)
        {
            blocks.push((value, bytes));
        }
        Ok(write_car(&[self.cid], blocks))
    }
}

/// Undoes `ops` on `tree` (Sync 1.1): a create is removed, an update set back to `prev`, a
/// delete restored. Each op is first checked against the tree it claims to have produced.
pub fn invert_ops<S: BlockSource>(tree: &mut Tree<S>, ops: &[RepoOp]) -> Result<()> {
    for op in ops {
        let key = op.path.as_bytes();
        let mismatch = |reason: String| Error::Operation {
            path: op.path.clone(),
            reason,
        };
        let current = tree.get(key)?;
        if current != op.cid {
            return Err(mismatch(format!(
                "{} op says the record is {}, the tree has {}",
                op.action.as_str(),
                op.cid.map_or("absent".to_owned(), |cid| cid.to_string()),
                current.map_or("absent".to_owned(), |cid| cid.to_string()),
            )));
        }
        match (op.action, op.cid, op.prev) {
            (Action::Create, Some(_), None) => {
                tree.remove(key)?;
            }
            (Action::Update, Some(_), Some(prev)) | (Action::Delete, None, Some(prev)) => {
                tree.insert(key, prev)?;
            }
            (action, cid, prev) => {
                return Err(mismatch(format!(
                    "{} op has cid {} and prev {}",
                    action.as_str(),
                    if cid.is_some() { "set" } else { "null" },
                    if prev.is_some() { "set" } else { "null" },
                )));
            }
        }
    }
    Ok(())
}
