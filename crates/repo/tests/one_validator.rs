//! Issue 11: one MST validator on every path. A malformed tree is refused by the full walk,
//! the lazy tree (the path a firehose commit takes), the diff and `CommitProof::check`, each
//! with the same error variant.

use std::mem::discriminant;

use atpdb_repo::Error;
use atpdb_repo::blocks::VerifiedBlocks;
use atpdb_repo::car::write_car;
use atpdb_repo::cbor::Encoder;
use atpdb_repo::cid::{Cid, DAG_CBOR, RAW};
use atpdb_repo::commit::UnsignedCommit;
use atpdb_repo::crypto::Curve;
use atpdb_repo::firehose::{CommitEvent, CommitProof};
use atpdb_repo::mst::{MstRules, MstWalker, Tree, diff, layer_for_key};
use atpdb_repo::repo::{Action, RepoOp};
use atpdb_repo::sample::{sample_did, sample_keypair};
use atpdb_repo::syntax::{Datetime, Tid};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// One node entry as written: prefix length, key suffix, right subtree.
struct Raw<'a> {
    p: usize,
    k: &'a [u8],
    t: Option<Cid>,
}

/// Encodes a node field by field, so a test can write what no correct encoder would.
fn node(left: Option<Cid>, entries: &[Raw<'_>], value: Cid, with_l: bool) -> Vec<u8> {
    let mut e = Encoder::new();
    e.map(if with_l { 2 } else { 1 });
    e.text("e");
    e.array(entries.len());
    for entry in entries {
        e.map(4);
        e.text("k");
        e.bytes(entry.k);
        e.text("p");
        e.u64(entry.p as u64);
        e.text("t");
        e.nullable_link(entry.t.as_ref());
        e.text("v");
        e.link(&value);
    }
    if with_l {
        e.text("l");
        e.nullable_link(left.as_ref());
    }
    e.into_bytes()
}

/// Sorted repo-path keys of `layer`.
fn keys_of_layer(layer: u32, n: usize) -> Vec<String> {
    let mut keys: Vec<String> = (0..)
        .map(|i| format!("com.example.thing/k{i:06}"))
        .filter(|key| layer_for_key(key.as_bytes()) == layer)
        .take(n)
        .collect();
    keys.sort();
    keys
}

struct Case {
    name: &'static str,
    root: Cid,
    blocks: VerifiedBlocks,
    /// A key whose lookup reaches the malformed node.
    probe: String,
}

fn cases() -> Result<Vec<Case>, Error> {
    let value = Cid::dag_cbor(b"\xa0");
    let low = keys_of_layer(0, 4);
    let high = keys_of_layer(1, 1).remove(0);
    let below_high: Vec<&String> = low.iter().filter(|key| **key < high).collect();
    let above_high: Vec<&String> = low.iter().filter(|key| **key > high).collect();
    let mut cases = Vec::new();

    // Prefix compression that is not maximal: the second key repeats the shared prefix.
    let mut blocks = VerifiedBlocks::new();
    let root = blocks.insert_new(
        DAG_CBOR,
        node(
            None,
            &[
                Raw {
                    p: 0,
                    k: low[0].as_bytes(),
                    t: None,
                },
                Raw {
                    p: 0,
                    k: low[1].as_bytes(),
                    t: None,
                },
            ],
            value,
            true,
        ),
    );
    cases.push(Case {
        name: "non-maximal prefix",
        root,
        blocks,
        probe: low[1].clone(),
    });

    // An empty node below the root with no subtree.
    let mut blocks = VerifiedBlocks::new();
    let empty = blocks.insert_new(DAG_CBOR, node(None, &[], value, true));
    let root = blocks.insert_new(
        DAG_CBOR,
        node(
            Some(empty),
            &[Raw {
                p: 0,
                k: high.as_bytes(),
                t: None,
            }],
            value,
            true,
        ),
    );
    let probe = below_high.first().map(|k| (*k).clone()).unwrap_or_default();
    cases.push(Case {
        name: "empty non-root node",
        root,
        blocks,
        probe,
    });

    // A subtree linked with the raw codec.
    if let Some(child_key) = below_high.first() {
        let mut blocks = VerifiedBlocks::new();
        let child = node(
            None,
            &[Raw {
                p: 0,
                k: child_key.as_bytes(),
                t: None,
            }],
            value,
            true,
        );
        let child_raw = blocks.insert_new(RAW, child);
        let root = blocks.insert_new(
            DAG_CBOR,
            node(
                Some(child_raw),
                &[Raw {
                    p: 0,
                    k: high.as_bytes(),
                    t: None,
                }],
                value,
                true,
            ),
        );
        cases.push(Case {
            name: "raw subtree link",
            root,
            blocks,
            probe: (*child_key).clone(),
        });
    }

    // A left subtree holding a key that sorts after its parent's key.
    if let (Some(small), Some(big)) = (below_high.first(), above_high.first()) {
        let mut blocks = VerifiedBlocks::new();
        let child = blocks.insert_new(
            DAG_CBOR,
            node(
                None,
                &[
                    Raw {
                        p: 0,
                        k: small.as_bytes(),
                        t: None,
                    },
                    Raw {
                        p: 0,
                        k: big.as_bytes(),
                        t: None,
                    },
                ],
                value,
                true,
            ),
        );
        let root = blocks.insert_new(
            DAG_CBOR,
            node(
                Some(child),
                &[Raw {
                    p: 0,
                    k: high.as_bytes(),
                    t: None,
                }],
                value,
                true,
            ),
        );
        cases.push(Case {
            name: "key order across nodes",
            root,
            blocks,
            probe: (*small).clone(),
        });
    }

    // A node without `l`: a second encoding of a valid node.
    let mut blocks = VerifiedBlocks::new();
    let root = blocks.insert_new(
        DAG_CBOR,
        node(
            None,
            &[Raw {
                p: 0,
                k: low[0].as_bytes(),
                t: None,
            }],
            value,
            false,
        ),
    );
    cases.push(Case {
        name: "node without l",
        root,
        blocks,
        probe: low[0].clone(),
    });
    Ok(cases)
}

fn walk(blocks: &VerifiedBlocks, root: Cid) -> Result<(), Error> {
    let mut walker = MstWalker::new(blocks, root, MstRules::default());
    while walker.next_entry()?.is_some() {}
    Ok(())
}

/// A signed `#commit` whose tree is the case's, creating the probe key (no `prevData`, so
/// the check is the lookup of each op in the new tree).
fn commit_event(case: &Case) -> Result<CommitEvent, Box<dyn std::error::Error>> {
    let key = sample_keypair(7, Curve::K256);
    let did = sample_did(7);
    let rev = Tid::from_parts(1_767_225_600_000_000, 0);
    let commit = UnsignedCommit {
        did: did.clone(),
        data: case.root,
        rev: rev.clone(),
        prev: None,
    }
    .sign(&key);
    let commit_bytes = commit.to_cbor();
    let commit_cid = Cid::dag_cbor(&commit_bytes);
    let record = b"\xa0".to_vec();
    let record_cid = Cid::dag_cbor(&record);
    let mut blocks: Vec<(Cid, Vec<u8>)> = vec![(commit_cid, commit_bytes), (record_cid, record)];
    blocks.extend(
        case.blocks
            .iter()
            .map(|(cid, bytes)| (*cid, bytes.to_vec())),
    );
    Ok(CommitEvent {
        seq: 1,
        rebase: false,
        too_big: false,
        repo: did,
        commit: commit_cid,
        rev,
        since: None,
        blocks: write_car(&[commit_cid], blocks.iter().map(|(c, b)| (c, b.as_slice()))),
        ops: vec![RepoOp {
            action: Action::Create,
            path: case.probe.clone(),
            cid: Some(record_cid),
            prev: None,
        }],
        blobs: Vec::new(),
        prev_data: None,
        time: Datetime::from_unix_micros(1_767_225_600_000_000),
    })
}

/// The error a reader gave, or a test failure naming the case it accepted.
fn refused<T: std::fmt::Debug>(result: Result<T, Error>, name: &str) -> Result<Error, String> {
    match result {
        Err(err) => Ok(err),
        Ok(value) => Err(format!("{name}: accepted, giving {value:?}")),
    }
}

#[test]
fn issue_11_every_reader_refuses_the_same_trees_the_same_way() -> TestResult {
    let cases = cases()?;
    assert_eq!(cases.len(), 5, "every case could be built");
    for case in &cases {
        let name = case.name;
        let walked = refused(walk(&case.blocks, case.root), name)?;
        let looked_up = refused(
            Tree::load(&case.blocks, case.root).get(case.probe.as_bytes()),
            name,
        )?;
        let diffed = refused(diff(&case.blocks, None, case.root), name)?;
        let event = commit_event(case)?;
        let checked = refused(CommitProof::check(&event), name)?;
        for (reader, error) in [
            ("tree", &looked_up),
            ("diff", &diffed),
            ("firehose", &checked),
        ] {
            assert_eq!(
                discriminant(error),
                discriminant(&walked),
                "{name}: the walk says {walked}, the {reader} says {error}"
            );
        }
    }
    Ok(())
}
