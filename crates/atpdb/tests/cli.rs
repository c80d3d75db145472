//! The `atpdb car` and `atpdb demo` commands, run as a user runs them.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value as Json, json};

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
    make_sample_with(dir, records, &[])
}

/// `atpdb car sample` with `extra` arguments; the CAR and the summary line.
fn make_sample_with(
    dir: &Path,
    records: &str,
    extra: &[&str],
) -> Result<(String, Json), Box<dyn std::error::Error>> {
    // The seed follows the size, so two samples of different sizes are two accounts.
    let car = dir
        .join(format!("sample-{records}.car"))
        .display()
        .to_string();
    let mut args = vec![
        "car",
        "sample",
        "--records",
        records,
        "--seed",
        records,
        "--out",
        &car,
    ];
    args.extend_from_slice(extra);
    let output = atpdb(&args)?;
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

    // Verifying needs a key: without one the command refuses to run at all.
    let output = atpdb(&["car", "verify", &car])?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--key") && stderr.contains("--keys"),
        "{stderr}"
    );

    // --keys: each CAR against its own DID's key; a DID without a key fails alone.
    let (other_car, other) = make_sample(dir.path(), "20")?;
    let keys = dir.path().join("keys.jsonl");
    let key_line = json!({"did": did, "key": summary["key"]});
    std::fs::write(&keys, format!("{key_line}\n"))?;
    let keys = keys.display().to_string();
    let output = atpdb(&["car", "verify", "--keys", &keys, &car, &other_car])?;
    assert_eq!(output.status.code(), Some(1));
    let lines = json_lines(&output);
    assert_eq!(lines[0]["ok"], true, "{}", lines[0]);
    assert_eq!(lines[0]["signature"], "valid");
    assert_eq!(lines[1]["ok"], false);
    assert!(
        lines[1]["error"].as_str().is_some_and(
            |e| e.contains("no key for") && e.contains(other["did"].as_str().unwrap_or("?"))
        ),
        "{}",
        lines[1]
    );
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
    let key = summary["key"].as_str().ok_or("key")?;
    let output = atpdb(&["car", "verify", "--key", key, &bad, &car, &cut, &missing])?;
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
        "--key",
        key,
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
    let key = "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme";
    let output = atpdb(&["car", "verify", "--did", "not-a-did", "--key", key, "x.car"])?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--did"));
    Ok(())
}

/// `atpdb devnet` prints one ready line naming every server, serves on it, and exits
/// cleanly on Ctrl-C (SIGINT).
#[test]
fn devnet_prints_ready_line_serves_and_stops_on_sigint() -> TestResult {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = Command::new(env!("CARGO_BIN_EXE_atpdb"))
        .args(["devnet", "--pds", "1", "--accounts", "3", "--records", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let ready: Json = serde_json::from_str(&line)?;
    let pds = ready["pds"][0].as_str().ok_or("no pds url")?;
    assert!(
        ready["plc"]
            .as_str()
            .is_some_and(|url| url.starts_with("http://127.0.0.1:"))
    );
    assert!(
        ready["relay"]
            .as_str()
            .is_some_and(|url| url.starts_with("http://127.0.0.1:"))
    );
    assert_eq!(ready["accounts"], 3);

    let mut stream = std::net::TcpStream::connect(pds.trim_start_matches("http://"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        stream,
        "GET /xrpc/com.atproto.sync.listRepos HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(
        response.matches("\"did\":\"did:plc:").count(),
        3,
        "{response}"
    );

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()?
            .success()
    );
    let status = child.wait()?;
    assert!(status.success(), "exit after SIGINT: {status}");
    Ok(())
}

#[test]
fn devnet_bench_reports_commit_rate() -> TestResult {
    let output = atpdb(&[
        "devnet",
        "--pds",
        "1",
        "--accounts",
        "4",
        "--records",
        "3",
        "--bench-seconds",
        "1",
    ])?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = json_lines(&output).pop().ok_or("no report")?;
    assert!(
        report["bench"]["commits"].as_u64().is_some_and(|n| n > 0),
        "{report}"
    );
    assert_eq!(report["bench"]["errors"], 0);
    assert_eq!(report["bench"]["relay_caught_up"], true);
    Ok(())
}

/// Issue 11: verifying a CAR of many tiny blocks stays within the documented bound: the
/// memory budget, about 62 bytes of index a block, and the read buffer. Measured as the
/// growth of peak memory over verifying a small CAR in the same way.
#[test]
fn issue_11_many_tiny_blocks_stay_within_the_bound() -> TestResult {
    let dir = tempfile::tempdir()?;
    let peak = |car: &str, key: &str| -> Result<u64, Box<dyn std::error::Error>> {
        let output = atpdb(&[
            "car",
            "verify",
            "-j1",
            "--stats",
            "--memory-budget-mb",
            "1",
            "--key",
            key,
            car,
        ])?;
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );
        let stats: Json = serde_json::from_str(
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .ok_or("no stats")?,
        )?;
        Ok(stats["peak_rss_bytes"]
            .as_u64()
            .ok_or("no peak_rss_bytes")?)
    };
    let (small, small_summary) = make_sample_with(dir.path(), "100", &["--tiny"])?;
    let (big, big_summary) = make_sample_with(dir.path(), "200000", &["--tiny"])?;
    let big_bytes = std::fs::metadata(&big)?.len();
    let baseline = peak(&small, small_summary["key"].as_str().ok_or("key")?)?;
    let measured = peak(&big, big_summary["key"].as_str().ok_or("key")?)?;
    // About 1.27 blocks a record; the buffer grows to 256 KiB; 8 MiB of allocator slack.
    let blocks = 200_001 * 13 / 10;
    let bound = (1 << 20) + 22 * blocks + (256 << 10) + (8 << 20);
    let growth = measured.saturating_sub(baseline);
    assert!(
        growth <= bound,
        "peak grew by {growth} bytes verifying a {big_bytes}-byte CAR; the bound is {bound}"
    );
    // Without the spill file the blocks alone would exceed it.
    assert!(
        big_bytes > bound,
        "the CAR ({big_bytes} bytes) should not fit the bound"
    );
    Ok(())
}

/// README's run command: `atpdb demo` starts a network, syncs every repo and serves the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_syncs_its_network_and_serves_the_api() -> TestResult {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_atpdb"))
        .args(["demo", "--accounts", "8", "--records", "5", "--pds", "2"])
        .args(["--rate", "5", "--bind", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let ready: Json = serde_json::from_str(line.trim())?;
    let url = ready["url"].as_str().ok_or("no url")?.to_owned();
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let announced = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left.min(std::time::Duration::from_millis(100))) {
            Ok(line) if line.contains("repos verified and synced") => break line,
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                if std::time::Instant::now() < deadline => {}
            _ => {
                let _ = child.kill();
                return Err("the demo never reported every repo synced".into());
            }
        }
    };
    assert!(announced.contains("all 8 repos"), "{announced}");
    // The API it serves answers: every seeded repo is there and active.
    let repos: Json = reqwest::get(format!("{url}/repos?state=active"))
        .await?
        .json()
        .await?;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(repos["repos"].as_array().map(Vec::len), Some(8), "{repos}");
    Ok(())
}
