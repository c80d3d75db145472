//! `#commit` events: stateless verification (`CommitProof::check`, `verify_commit`).
//!
//! Every input is read two ways.
//!
//! - As a frame: `decode_frame`; a decoded message re-encodes and decodes to itself; a `#commit`
//!   is verified with the key of the sample account whose DID it names (as is, and once more
//!   after the repair below); a `#sync` goes through `verify_sync`.
//! - Structured, against one of the real commits in `atpdb_fuzz::firehose::bases()`:
//!   `[base, flags, n, n × (op index, edit, argument), CAR bytes]`. The CAR bytes (the base's
//!   own when empty) replace the event's `blocks` after `atpdb_fuzz::fixup` has recomputed
//!   every CID and rewritten the links; the event's `commit`, ops and `prevData` follow the
//!   blocks they named to their new CIDs; the commit block is re-signed with the account's key
//!   (a malicious host can sign whatever it likes), then the op edits and flags apply.
//!
//! Checks beyond "no panic": `verify_commit` succeeds exactly when `check` does and the key
//! signed the commit; another key never verifies; `check` under `check_paths: false` accepts
//! whatever `check` accepts. For a verified commit: the proof names the event's commit, DID and
//! rev; its ops are the event's, sorted; every op's path looked up in a `Tree` over
//! `proof.blocks()` gives the op's cid; when `Proven`, `invert_ops` on that tree gives
//! `prevData`, and, if `prevData` is the base's real previous tree, applying the ops to the
//! whole previous repository gives the commit's `data`; `records()` are the ops' records, with
//! bytes that hash to their CIDs and a DRISL form that reads back.
#![no_main]

use std::collections::HashMap;

use atpdb_fuzz::firehose::{Base, bases, rev};
use atpdb_fuzz::{fixup_with_map, resolve, rewrite_links, split_car, write_raw_car};
use atpdb_repo::commit::{Commit, UnsignedCommit};
use atpdb_repo::crypto::{Curve, Keypair, PublicKey};
use atpdb_repo::firehose::{
    CommitEvent, CommitProof, Frame, Message, RepoHead, VerifiedCommit, decode_frame,
    encode_message, verify_commit, verify_sync,
};
use atpdb_repo::mst::{MstRules, Tree};
use atpdb_repo::record::Record;
use atpdb_repo::repo::{Action, invert_ops};
use atpdb_repo::sample::sample_keypair;
use atpdb_repo::{Cid, Error};
use libfuzzer_sys::fuzz_target;

/// A key that signed none of the bases.
fn stranger() -> &'static Keypair {
    static KEY: std::sync::OnceLock<Keypair> = std::sync::OnceLock::new();
    KEY.get_or_init(|| sample_keypair(99, Curve::K256))
}

/// `FIREHOSE_DEBUG=1` prints each check's outcome (for looking at seeds, not for fuzzing).
fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("FIREHOSE_DEBUG").is_some())
}

fn check_event(event: &CommitEvent, base: &Base) {
    let key: PublicKey = base.key.public();
    let checked = CommitProof::check(event);
    if debug() {
        eprintln!(
            "check: {:?}; verify: {:?}",
            checked.as_ref().map(|p| p.ops().len()),
            verify_commit(event, &key).map(|v| v.is_proven())
        );
    }
    let lax = CommitProof::check_with(event, MstRules { check_paths: false });
    if let Err(err) = &lax {
        assert!(
            checked.is_err(),
            "check accepts what check_paths: false rejects: {err}"
        );
    }
    let verified = verify_commit(event, &key);
    let proof = match (checked, &verified) {
        (Err(a), Err(b)) => {
            assert_eq!(
                a.to_string(),
                b.to_string(),
                "verify_commit fails differently"
            );
            return;
        }
        (Err(a), Ok(_)) => panic!("verify_commit accepts what check rejects: {a}"),
        (Ok(proof), Err(err)) => {
            assert!(
                matches!(err, Error::BadSignature { .. }),
                "check passed but verify_commit failed with {err}"
            );
            proof
        }
        (Ok(proof), Ok(_)) => proof,
    };
    assert!(
        proof.clone().verify(&stranger().public()).is_err(),
        "a commit verified with a key that never signed it"
    );
    let Ok(verified) = verified else { return };
    let proof_ref = verified.proof();
    assert_eq!(proof_ref.cid(), proof.cid());
    check_verified(event, base, &verified);
}

fn check_verified(event: &CommitEvent, base: &Base, verified: &VerifiedCommit) {
    let proof = verified.proof();
    let commit = proof.commit();
    assert_eq!(proof.cid(), event.commit, "proof names another commit");
    assert_eq!(commit.did, event.repo, "proof is for another account");
    assert_eq!(commit.rev, event.rev, "proof has another rev");
    assert_eq!(
        commit.cid(),
        proof.cid(),
        "commit CID is not its bytes' CID"
    );
    assert!(proof.blocks().get(&proof.cid()).is_some());
    assert_eq!(verified.is_proven(), event.prev_data.is_some());
    assert_eq!(proof.prev_data(), event.prev_data);
    assert_eq!(proof.since(), event.since.as_ref());

    // The ops are the event's, sorted by path, each path once.
    let mut expected = event.ops.clone();
    expected.sort_by(|a, b| a.path.cmp(&b.path));
    assert!(
        proof.ops() == expected.as_slice(),
        "proof ops are not the event's, sorted"
    );
    assert!(
        proof.ops().windows(2).all(|w| w[0].path < w[1].path),
        "two ops on one path"
    );

    // (a) Every op's path holds the op's cid in the new tree.
    let mut tree = Tree::load(proof.blocks(), commit.data);
    for op in proof.ops() {
        let found = tree
            .get(op.path.as_bytes())
            .expect("lookup of a verified op's path");
        assert_eq!(
            found, op.cid,
            "tree disagrees with a verified op at {}",
            op.path
        );
        match op.action {
            Action::Create => assert!(op.cid.is_some()),
            Action::Update => assert!(op.cid.is_some()),
            Action::Delete => assert!(op.cid.is_none()),
        }
    }

    // (b) Proven: undoing the ops gives prevData.
    if let VerifiedCommit::Proven(proof) = verified {
        let prev_data = proof.prev_data().expect("proven without prevData");
        let mut tree = Tree::load(proof.blocks(), commit.data);
        invert_ops(&mut tree, proof.ops()).expect("inverting the ops of a proven commit");
        assert_eq!(
            tree.root_cid(),
            prev_data,
            "inversion does not give prevData"
        );
        for op in proof.ops() {
            assert!(op.action == Action::Create || op.prev.is_some());
        }
        // The real previous repository, with the ops applied, is the new tree.
        if let Some((blocks, root, _)) = &base.previous
            && *root == prev_data
        {
            let mut tree = Tree::load(blocks, *root);
            for op in proof.ops() {
                let old = match op.cid {
                    Some(cid) => tree.insert(op.path.as_bytes(), cid),
                    None => tree.remove(op.path.as_bytes()),
                }
                .expect("applying a proven op to the previous repository");
                assert_eq!(
                    old, op.prev,
                    "a proven op's prev is not the previous record"
                );
            }
            assert_eq!(
                tree.root_cid(),
                commit.data,
                "the previous repository plus the proven ops is not the new tree"
            );
        }
    }

    // (c) Records: one per op with a cid, bytes hashing to it, a DRISL form that reads back.
    match proof.records() {
        Ok(records) => {
            let with_cid: Vec<_> = proof.ops().iter().filter(|op| op.cid.is_some()).collect();
            assert_eq!(records.len(), with_cid.len(), "a record is missing");
            for (record, op) in records.iter().zip(with_cid) {
                assert!(
                    record.cid().matches(record.bytes()),
                    "record bytes do not hash to its CID"
                );
                assert_eq!(Some(record.cid()), op.cid);
                assert_eq!(record.path(), op.path);
                assert_eq!(record.did(), &commit.did);
                let back =
                    Record::from_cbor(&record.to_cbor()).expect("a record's DRISL form reads back");
                assert!(
                    back == *record,
                    "a record's DRISL form reads back as another record"
                );
                assert!(
                    Record::new(
                        record.did().clone(),
                        record.collection().clone(),
                        record.rkey().clone(),
                        record.cid(),
                        record.bytes().to_vec()
                    )
                    .is_ok(),
                    "Record::new refuses a verified record"
                );
            }
        }
        Err(err) => assert!(
            matches!(err, Error::Syntax { .. }),
            "records() failed with {err}"
        ),
    }

    if let Some((_, root, rev)) = &base.previous {
        let _ = verified.chain(RepoHead { rev, data: root }, commit.rev.timestamp_micros());
    }
}

/// Puts `car` into the event: the commit, ops and prevData follow their blocks' new CIDs, and
/// the commit is re-signed with `key` unless told not to.
fn install(event: &mut CommitEvent, car: &[u8], key: &Keypair, flags: u8) -> Vec<Cid> {
    let mut raw = split_car(car, 512);
    let map = if flags & 0x10 == 0 {
        fixup_with_map(&mut raw).1
    } else {
        HashMap::new()
    };
    event.commit = resolve(&map, event.commit);
    event.prev_data = event.prev_data.map(|cid| resolve(&map, cid));
    for op in &mut event.ops {
        op.cid = op.cid.map(|cid| resolve(&map, cid));
        op.prev = op.prev.map(|cid| resolve(&map, cid));
    }
    if flags & 0x01 == 0
        && let Some(block) = raw.blocks.iter_mut().find(|b| b.cid == event.commit)
        && let Ok(commit) = Commit::from_cbor(block.cid, &block.data)
    {
        if flags & 0x02 != 0 {
            event.repo = commit.did.clone();
            event.rev = commit.rev.clone();
        }
        let signed = UnsignedCommit {
            did: commit.did,
            data: commit.data,
            rev: commit.rev,
            prev: commit.prev,
        }
        .sign(key);
        let bytes = signed.to_cbor();
        let cid = Cid::dag_cbor(&bytes);
        let mut resigned = HashMap::new();
        resigned.insert(*block.cid.digest(), *cid.digest());
        block.cid = cid;
        block.data = bytes;
        rewrite_links(&mut raw.header, &resigned);
        event.commit = cid;
    }
    let cids = raw.blocks.iter().map(|b| b.cid).collect();
    event.blocks = write_raw_car(&raw);
    cids
}

/// Applies `(op index, edit, argument)` triples and the flags to the event.
fn edit(event: &mut CommitEvent, edits: &[u8], cids: &[Cid], flags: u8) {
    let cid_at = |arg: u8| cids.get(usize::from(arg) % cids.len().max(1)).copied();
    for edit in edits.chunks_exact(3) {
        let (index, kind, arg) = (usize::from(edit[0]), edit[1] % 12, edit[2]);
        if kind == 10 {
            event.prev_data = cid_at(arg);
            continue;
        }
        if kind == 11 {
            event.since = Some(rev(u64::from(arg)));
            continue;
        }
        if event.ops.is_empty() {
            continue;
        }
        let index = index % event.ops.len();
        match kind {
            0 => {
                event.ops[index].action =
                    [Action::Create, Action::Update, Action::Delete][usize::from(arg) % 3]
            }
            1 => event.ops[index].cid = None,
            2 => event.ops[index].prev = None,
            3 => event.ops[index].cid = cid_at(arg),
            4 => event.ops[index].prev = cid_at(arg),
            5 => {
                let other = usize::from(arg) % event.ops.len();
                event.ops[index].path = event.ops[other].path.clone();
            }
            6 => {
                let path = &mut event.ops[index].path;
                let mut cut = usize::from(arg) % (path.len() + 1);
                while !path.is_char_boundary(cut) {
                    cut -= 1;
                }
                path.truncate(cut);
            }
            7 => {
                event.ops.remove(index);
            }
            8 => {
                let op = event.ops[index].clone();
                event.ops.push(op);
            }
            _ => {
                let op = &mut event.ops[index];
                std::mem::swap(&mut op.cid, &mut op.prev);
            }
        }
    }
    if flags & 0x04 != 0 {
        event.prev_data = None;
    }
    if flags & 0x08 != 0 {
        event.since = None;
    }
}

fn frame(data: &[u8]) {
    let Ok(frame) = decode_frame(data) else {
        return;
    };
    let Frame::Message(message) = frame else {
        return;
    };
    let again = decode_frame(&encode_message(&message)).expect("an encoded message decodes");
    assert!(
        again == Frame::Message(message.clone()),
        "message changed in a round trip"
    );
    let bases = bases();
    let base_for = |did: &atpdb_repo::syntax::Did| {
        bases
            .iter()
            .find(|base| base.event.repo == *did)
            .unwrap_or(&bases[0])
    };
    match message {
        Message::Commit(mut event) => {
            let base = base_for(&event.repo);
            check_event(&event, base);
            let blocks = std::mem::take(&mut event.blocks);
            let flags = atpdb_fuzz::input_hash(data) as u8 & 0x03;
            install(&mut event, &blocks, &base.key, flags);
            check_event(&event, base);
        }
        Message::Sync(event) => {
            let base = base_for(&event.did);
            if let Ok(commit) = verify_sync(&event, &base.key.public()) {
                assert_eq!(commit.did, event.did);
                assert_eq!(commit.rev, event.rev);
            }
        }
        _ => {}
    }
}

fn structured(data: &[u8]) {
    let [selector, flags, n, rest @ ..] = data else {
        return;
    };
    let bases = bases();
    let base = &bases[usize::from(*selector) % bases.len()];
    let edits_len = (usize::from(*n) % 16 * 3).min(rest.len());
    let (edits, car) = rest.split_at(edits_len);
    let car = if car.is_empty() {
        &base.event.blocks[..]
    } else {
        car
    };
    let mut event = base.event.clone();
    let cids = install(&mut event, car, &base.key, *flags);
    edit(&mut event, edits, &cids, *flags);
    check_event(&event, base);
}

fuzz_target!(|data: &[u8]| {
    frame(data);
    structured(data);
});
