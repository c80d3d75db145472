//! Sequencing a host's events, and the event-level faults that corrupt what it publishes
//! (never what it stores: the repo stays correct, so later commits chain as they should).

use atpdb_repo::Cid;
use atpdb_repo::car::write_car;
use atpdb_repo::commit::UnsignedCommit;
use atpdb_repo::crypto::{Curve, Keypair};
use atpdb_repo::firehose::{self, AccountEvent, CommitEvent, IdentityEvent, Message, SyncEvent};
use atpdb_repo::repo::CommitData;
use atpdb_repo::syntax::{Datetime, Did};
use atpdb_repo::value::Value;

use super::{Account, Pds, PdsError, blob_refs};
use crate::faults::EventFaults;

impl Pds {
    pub(crate) fn emit_identity(&self, account: &Account) {
        let did = account.did.clone();
        let handle = account.handle.clone();
        self.inner.sequencer.append(Some(&account.did), |seq| {
            firehose::encode_message(&Message::Identity(IdentityEvent {
                seq,
                did,
                time: Datetime::now(),
                handle: Some(handle),
            }))
        });
    }

    pub(crate) fn emit_account(&self, account: &Account) {
        self.emit_raw_account(
            &account.did,
            account.status.as_str().is_none(),
            account.status.as_str(),
        );
    }

    pub(crate) fn emit_raw_account(&self, did: &Did, active: bool, status: Option<&str>) {
        let owned = did.clone();
        self.inner.sequencer.append(Some(did), |seq| {
            firehose::encode_message(&Message::Account(AccountEvent {
                seq,
                did: owned,
                time: Datetime::now(),
                active,
                status: status.map(str::to_owned),
            }))
        });
    }

    pub(crate) fn emit_sync(&self, account: &Account) {
        let did = account.did.clone();
        let cid = account.repo.commit_cid();
        let commit = account.repo.commit().clone();
        let bytes = commit.to_cbor();
        let blocks = write_car(&[cid], [(&cid, bytes.as_slice())]);
        self.inner.sequencer.append(Some(&account.did), |seq| {
            firehose::encode_message(&Message::Sync(SyncEvent {
                seq,
                did,
                rev: commit.rev.clone(),
                blocks,
                time: Datetime::now(),
            }))
        });
    }

    pub(crate) fn emit_commit(&self, account: &Account, data: &CommitData) -> Result<(), PdsError> {
        let mut blobs = Vec::new();
        for op in &data.ops {
            let Some(cid) = op.cid else { continue };
            if let Some((_, bytes)) = data.blocks.iter().find(|(block, _)| *block == cid)
                && let Ok(value) = Value::from_cbor(bytes)
            {
                blob_refs(&value, &mut blobs);
            }
        }
        blobs.sort();
        blobs.dedup();
        let flags = self.inner.faults.event_flags();
        self.inner.sequencer.append(Some(&account.did), |seq| {
            let mut event = CommitEvent::from_commit_data(seq, data, Datetime::now(), blobs);
            mangle(&mut event, data, flags);
            firehose::encode_message(&Message::Commit(event))
        });
        Ok(())
    }
}

/// Applies the event-level faults in force to one outgoing `#commit` (the relay uses it too,
/// so a fault means the same on either hop).
pub(crate) fn mangle(event: &mut CommitEvent, data: &CommitData, flags: EventFaults) {
    if flags.drop_prev_data {
        event.prev_data = None;
    }
    if !(flags.corrupt_blocks || flags.bad_signature || flags.drop_proof_nodes) {
        return;
    }
    let mut root = data.cid;
    let mut blocks: Vec<(Cid, Vec<u8>)> = data.blocks.clone();
    let records: Vec<Cid> = data.ops.iter().filter_map(|op| op.cid).collect();
    if flags.bad_signature {
        // The same commit signed by a key the DID document does not name.
        let wrong = Keypair::from_secret_bytes(Curve::K256, &[0x42; 32]);
        if let Ok(wrong) = wrong {
            let commit = UnsignedCommit {
                did: data.commit.did.clone(),
                data: data.commit.data,
                rev: data.commit.rev.clone(),
                prev: None,
            }
            .sign(&wrong);
            let bytes = commit.to_cbor();
            root = Cid::dag_cbor(&bytes);
            blocks.retain(|(cid, _)| *cid != data.cid);
            blocks.insert(0, (root, bytes));
            event.commit = root;
        }
    }
    if flags.drop_proof_nodes {
        // Drop the last MST node of the slice: a node inversion or lookup needs.
        if let Some(at) = blocks
            .iter()
            .rposition(|(cid, _)| *cid != root && !records.contains(cid))
        {
            blocks.remove(at);
        }
    }
    if flags.corrupt_blocks {
        // Flip a byte of a record (or, in a delete-only commit, of a node) under its old CID.
        let target = blocks
            .iter()
            .position(|(cid, _)| records.contains(cid))
            .or_else(|| blocks.iter().position(|(cid, _)| *cid != root));
        if let Some(at) = target
            && let Some(byte) = blocks[at].1.last_mut()
        {
            *byte ^= 0x01;
        }
    }
    event.blocks = write_car(
        &[root],
        blocks.iter().map(|(cid, bytes)| (cid, bytes.as_slice())),
    );
}
