//! The status page in a real browser: headless Chromium (Debian's `chromium` package) loads
//! `/`, runs its script against a live server, and the numbers it renders must equal the
//! API's. CI installs Chromium and sets `ATPDB_REQUIRE_CHROMIUM=1`; elsewhere, without it,
//! the test says it did not run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use atpdb_devnet::{Devnet, DevnetConfig};
use serde_json::{Value as Json, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chromium() -> Option<PathBuf> {
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(candidate).exists() {
            return Some(PathBuf::from(candidate));
        }
    }
    let message = "status page test did not run: install Debian's chromium package";
    assert!(
        std::env::var("ATPDB_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
        "{message} (ATPDB_REQUIRE_CHROMIUM=1 requires it)"
    );
    println!("{message}");
    None
}

/// The text of the element with `id` in a DOM dump, as a number.
fn figure(dom: &str, id: &str) -> Option<u64> {
    let start = dom.find(&format!("id=\"{id}\">"))? + id.len() + 6;
    let text = &dom[start..start + dom[start..].find('<')?];
    text.replace(',', "").parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_the_apis_numbers() -> TestResult {
    let Some(chromium) = chromium() else {
        return Ok(());
    };
    let mut devnet = Devnet::start(DevnetConfig {
        pds_hosts: 2,
        accounts: 12,
        records: 15,
        ..DevnetConfig::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let relay = devnet.relay().ok_or("no relay")?.url().to_owned();
    let mut child = Command::new(env!("CARGO_BIN_EXE_atpdb"))
        .args(["serve", "--bind", "127.0.0.1:0", "--allow-private-network"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--relay-url", &relay, "--plc-url", devnet.plc_url()])
        .args(["--dns-nameserver", &devnet.dns_addr().to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let ready: Json = serde_json::from_str(line.trim())?;
    let url = ready["url"].as_str().ok_or("no url")?.to_owned();
    let http = reqwest::Client::new();
    let dids: Vec<String> = devnet
        .accounts()
        .iter()
        .map(|a| a.did.to_string())
        .collect();
    http.post(format!("{url}/repos/add"))
        .json(&json!({ "dids": dids }))
        .send()
        .await?
        .error_for_status()?;
    devnet.start_traffic(10.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    devnet.stop_traffic();
    devnet.wait_for_relay(Duration::from_secs(30)).await;
    // Quiet: every repo active and the figures no longer moving.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let before: Json = http
            .get(format!("{url}/status.json"))
            .send()
            .await?
            .json()
            .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after: Json = http
            .get(format!("{url}/status.json"))
            .send()
            .await?
            .json()
            .await?;
        if after["repos"]["active"] == dids.len()
            && after["last_event_id"] == before["last_event_id"]
            && after["records"] == before["records"]
        {
            break after;
        }
        assert!(Instant::now() < deadline, "did not settle: {after}");
    };

    let screenshot = std::env::var("ATPDB_STATUS_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| dir.path().join("status.png"));
    let run = |extra: &[String]| {
        Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .args(["--window-size=1280,900", "--virtual-time-budget=5000"])
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("chromium").display()
            ))
            .args(extra)
            .arg(format!("{url}/"))
            .stderr(Stdio::null())
            .output()
    };
    let output = run(&["--dump-dom".to_owned()])?;
    assert!(output.status.success(), "chromium failed");
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the script never loaded the figures: {dom}"
    );
    let records: Json = http
        .get(format!("{url}/stats/record-count"))
        .send()
        .await?
        .json()
        .await?;
    let active: Json = http
        .get(format!("{url}/repos?state=active&limit=1000"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        figure(&dom, "records"),
        records["record_count"].as_u64(),
        "records"
    );
    assert_eq!(
        figure(&dom, "repos-active"),
        active["repos"].as_array().map(|repos| repos.len() as u64),
        "active repos"
    );
    for (id, field) in [
        ("last-event-id", &status["last_event_id"]),
        ("outbox", &status["outbox"]),
        ("repos-error", &status["repos"]["error"]),
        ("repos-pending", &status["repos"]["pending"]),
        ("commits-applied", &status["firehose"]["commits_applied"]),
    ] {
        assert_eq!(figure(&dom, id), field.as_u64(), "{id}");
    }
    assert!(dom.contains("<polyline"), "the events chart is drawn");
    // A screenshot for people (the note carries one).
    let output = run(&[format!("--screenshot={}", screenshot.display())])?;
    assert!(
        output.status.success() && screenshot.exists(),
        "no screenshot"
    );
    drop(server);
    Ok(())
}
