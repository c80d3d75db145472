//! The `atpdb car` commands, run as a user runs them.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value as Json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn atpdb(args: &[&str]) -> std::io::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_atpdb"))
        .args(args)
        .output()
}

fn json_lines(output: &Output) -> Vec<Json> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON: {line:?}: {err}"))
        })
        .collect()
}

fn make_sample(dir: &Path, records: &str) -> Result<(String, Json), Box<dyn std::error::Error>> {
    let car = dir.join("sample.car").display().to_string();
    let output = atpdb(&[
        "car",
        "sample",
        "--records",
        records,
        "--seed",
        "3",
        "--out",
        &car,
    ])?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = json_lines(&output).pop().ok_or("no summary line")?;
    Ok((car, summary))
}

#[test]
fn sample_then_verify_with_key_and_records() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (car, summary) = make_sample(dir.path(), "500")?;
    let key = summary["key"].as_str().ok_or("no key")?;
    let did = summary["did"].as_str().ok_or("no did")?;
    let output = atpdb(&[
        "car",
        "verify",
        "--did",
        did,
        "--key",
        key,
        "--records",
        &car,
    ])?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = json_lines(&output);
    assert_eq!(
        lines.len(),
        501 + 1,
        "one line per record and one for the file"
    );
    let file = &lines[501];
    assert_eq!(file["ok"], true);
    assert_eq!(file["signature"], "valid");
    assert_eq!(file["records"], 501);
    assert_eq!(file["did"], did);
    assert_eq!(file["commit"], summary["commit"]);
    assert_eq!(file["rev"], summary["rev"]);
    assert!(file["bytes"].as_u64().is_some_and(|bytes| bytes > 10_000));
    let record = &lines[0];
    assert_eq!(record["did"], did);
    assert!(
        record["collection"].is_string() && record["rkey"].is_string() && record["cid"].is_string()
    );
    // Records come in key order.
    let keys: Vec<String> = lines[..501]
        .iter()
        .map(|r| format!("{}/{}", r["collection"], r["rkey"]))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);

    let unchecked = json_lines(&atpdb(&["car", "verify", &car])?);
    assert_eq!(unchecked[0]["signature"], "unchecked");
    Ok(())
}

#[test]
fn a_bad_file_fails_alone_and_sets_the_exit_status() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (car, summary) = make_sample(dir.path(), "200")?;
    let mut bytes = std::fs::read(&car)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    let bad = dir.path().join("bad.car").display().to_string();
    std::fs::write(&bad, &bytes)?;
    let cut = dir.path().join("cut.car").display().to_string();
    std::fs::write(&cut, &bytes[..middle])?;
    let missing = dir.path().join("missing.car").display().to_string();
    let output = atpdb(&["car", "verify", &bad, &car, &cut, &missing])?;
    assert_eq!(output.status.code(), Some(1));
    let lines = json_lines(&output);
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["ok"], false);
    assert!(
        lines[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("bytes hash to")),
        "{}",
        lines[0]
    );
    assert_eq!(
        lines[1]["ok"], true,
        "a good file after a bad one still verifies"
    );
    assert!(
        lines[2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("truncated")),
        "{}",
        lines[2]
    );
    assert_eq!(lines[3]["ok"], false);

    // The wrong key and the wrong DID are refused.
    let other_key = "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme";
    let output = atpdb(&["car", "verify", "--key", other_key, &car])?;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        json_lines(&output)[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("bad signature"))
    );
    let output = atpdb(&[
        "car",
        "verify",
        "--did",
        "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa",
        &car,
    ])?;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        json_lines(&output)[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("differs from the expected"))
    );
    assert_eq!(summary["records"], 201);
    Ok(())
}

#[test]
fn inspect_summarises() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (car, summary) = make_sample(dir.path(), "300")?;
    let output = atpdb(&["car", "inspect", &car])?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout)?;
    for expected in [
        summary["did"].as_str().ok_or("did")?,
        summary["commit"].as_str().ok_or("commit")?,
        "records     301",
        "app.bsky.actor.profile",
        "mst depth",
    ] {
        assert!(
            text.contains(expected),
            "inspect output lacks {expected:?}:\n{text}"
        );
    }
    Ok(())
}

#[test]
fn bad_arguments_are_clear() -> TestResult {
    let output = atpdb(&["car", "verify", "--key", "zNotAKey", "x.car"])?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--key"));
    let output = atpdb(&["car", "verify", "--did", "not-a-did", "x.car"])?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--did"));
    Ok(())
}
