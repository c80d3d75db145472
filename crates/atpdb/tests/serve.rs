//! `atpdb serve` as a user runs it: a child process against a devnet, its HTTP API, and
//! SIGKILL at random moments — what a consumer rebuilds from the outbox must equal the truth.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_repo::Cid;
use atpdb_repo::syntax::Did;
use atpdb_store::{Action, Event, Store};
use serde_json::{Value as Json, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A running `atpdb serve` and the URL it printed.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(
        data_dir: &Path,
        devnet: &Devnet,
        extra: &[&str],
    ) -> Result<Server, Box<dyn std::error::Error>> {
        Server::start_on(data_dir, devnet, "127.0.0.1:0", extra)
    }

    /// On a fixed address, so that clients can reconnect to a restarted server.
    fn start_on(
        data_dir: &Path,
        devnet: &Devnet,
        bind: &str,
        extra: &[&str],
    ) -> Result<Server, Box<dyn std::error::Error>> {
        let relay = devnet.relay().ok_or("no relay")?.url().to_owned();
        let dns = devnet.dns_addr().to_string();
        let mut args = vec!["--dns-nameserver", dns.as_str()];
        args.extend_from_slice(extra);
        Server::start_with(data_dir, bind, &relay, devnet.plc_url(), &args)
    }

    fn start_with(
        data_dir: &Path,
        bind: &str,
        relay: &str,
        plc: &str,
        extra: &[&str],
    ) -> Result<Server, Box<dyn std::error::Error>> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_atpdb"))
            .args([
                "serve",
                "--data-dir",
                &data_dir.display().to_string(),
                "--bind",
                bind,
                "--relay-url",
                relay,
                "--plc-url",
                plc,
                "--allow-private-network",
                "--min-backoff-secs",
                "1",
                "--max-backoff-secs",
                "2",
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let ready: Json = serde_json::from_str(line.trim())
            .map_err(|err| format!("ready line {line:?}: {err}"))?;
        let url = ready["url"]
            .as_str()
            .ok_or("no url in the ready line")?
            .to_owned();
        Ok(Server { child, url })
    }

    /// The process's peak resident memory (`VmHWM`), in bytes.
    fn peak_rss(&self) -> Result<u64, Box<dyn std::error::Error>> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status
            .lines()
            .find(|line| line.starts_with("VmHWM:"))
            .ok_or("no VmHWM")?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .ok_or("VmHWM has no value")?
            .parse()?;
        Ok(kib * 1024)
    }

    fn kill(mut self) -> std::io::Result<()> {
        // Child::kill is SIGKILL on Unix: no shutdown path runs.
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dids(devnet: &Devnet) -> Vec<String> {
    devnet
        .accounts()
        .iter()
        .map(|a| a.did.to_string())
        .collect()
}

type Truth = BTreeMap<Did, BTreeMap<String, Cid>>;

fn truth(devnet: &Devnet) -> Result<Truth, Box<dyn std::error::Error>> {
    let mut truth = Truth::new();
    for account in devnet.accounts() {
        let records = devnet.hosts()[account.pds].account_records(&account.did)?;
        truth.insert(account.did.clone(), records.into_iter().collect());
    }
    Ok(truth)
}

/// Polls `/info` until every account is active at its PDS's rev.
async fn converge(
    http: &reqwest::Client,
    server: &Server,
    devnet: &Devnet,
    timeout: Duration,
) -> TestResult {
    converge_as(http, server, devnet, None, timeout).await
}

/// [`converge`], with the admin password when the server requires one.
async fn converge_as(
    http: &reqwest::Client,
    server: &Server,
    devnet: &Devnet,
    password: Option<&str>,
    timeout: Duration,
) -> TestResult {
    let deadline = Instant::now() + timeout;
    loop {
        let mut lagging = Vec::new();
        for account in devnet.accounts() {
            let rev = devnet.hosts()[account.pds].account_info(&account.did)?.rev;
            let mut request = http.get(format!("{}/info/{}", server.url, account.did));
            if let Some(password) = password {
                request = request.basic_auth("admin", Some(password));
            }
            let info: Json = request.send().await?.json().await?;
            if info["state"] != "active" || info["rev"] != rev.as_str() {
                lagging.push(info);
            }
        }
        if lagging.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} repos did not converge: {:?}",
                lagging.len(),
                lagging.first()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a consumer that applied every outbox event in id order holds; ids must only grow.
fn rebuild_from_outbox(store: &Store) -> Result<Truth, Box<dyn std::error::Error>> {
    let mut rebuilt = Truth::new();
    let mut after = 0;
    loop {
        let events = store.events_after(after, 1000)?;
        if events.is_empty() {
            return Ok(rebuilt);
        }
        for (id, event) in events {
            assert!(
                id > after,
                "event id {id} repeats or goes back (after {after})"
            );
            after = id;
            match event {
                Event::Record(record) => {
                    let repo = rebuilt.entry(record.did.clone()).or_default();
                    let path = format!("{}/{}", record.collection, record.rkey);
                    match record.action {
                        Action::Delete => {
                            repo.remove(&path);
                        }
                        Action::Create | Action::Update => {
                            repo.insert(path, record.cid.ok_or("no cid")?);
                        }
                    }
                }
                Event::Identity(identity) if identity.status == "deleted" => {
                    rebuilt.remove(&identity.did);
                }
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_validates_input_and_answers_like_tap() -> TestResult {
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 3,
        records: 5,
        ..DevnetConfig::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path(), &devnet, &[])?;
    let http = reqwest::Client::new();
    let health: Json = http
        .get(format!("{}/health", server.url))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(health, json!({"status": "ok"}));

    // Bad input is a 400 with a message, never a 500.
    for body in ["{\"dids\": [\"not-a-did\"]}", "{\"dids\": 5}", "nonsense"] {
        let response = http
            .post(format!("{}/repos/add", server.url))
            .body(body)
            .send()
            .await?;
        assert_eq!(response.status(), 400, "{body}");
        let error: Json = response.json().await?;
        assert!(error["message"].is_string(), "{error}");
    }
    let response = http
        .post(format!("{}/repos/add", server.url))
        .json(&json!({"dids": []}))
        .send()
        .await?;
    assert_eq!(response.status(), 200, "an empty list is fine");
    let response = http
        .get(format!("{}/info/did:plc:unknownunknownunknown", server.url))
        .send()
        .await?;
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.json::<Json>().await?,
        json!({"message": "repo not found"})
    );
    let response = http.get(format!("{}/info/nope", server.url)).send().await?;
    assert_eq!(response.status(), 400);

    let all = dids(&devnet);
    let response = http
        .post(format!("{}/repos/add", server.url))
        .json(&json!({ "dids": all }))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    converge(&http, &server, &devnet, Duration::from_secs(60)).await?;
    let truth = truth(&devnet)?;
    let total: usize = truth.values().map(BTreeMap::len).sum();
    let count: Json = http
        .get(format!("{}/stats/record-count", server.url))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(count["record_count"], total);
    let count: Json = http
        .get(format!("{}/stats/repo-count", server.url))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(count["repo_count"], all.len());

    // The XRPC reads serve exactly what was stored.
    let did = &devnet.accounts()[0].did;
    let (path, cid) = truth[did].iter().next().ok_or("an empty repo")?;
    let (collection, rkey) = path.split_once('/').ok_or("a path")?;
    let record: Json = http
        .get(format!(
            "{}/xrpc/com.atproto.repo.getRecord?repo={did}&collection={collection}&rkey={rkey}",
            server.url
        ))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(record["cid"], cid.to_string());
    assert_eq!(record["uri"], format!("at://{did}/{path}"));
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!(
            "{}/xrpc/com.atproto.repo.listRecords?repo={did}&collection={collection}&limit=2",
            server.url
        );
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let page: Json = http.get(url).send().await?.json().await?;
        for record in page["records"].as_array().ok_or("records")? {
            listed.push(record["uri"].as_str().unwrap_or_default().to_owned());
        }
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    // Newest first, as a PDS lists them.
    let expected: Vec<String> = truth[did]
        .keys()
        .rev()
        .filter(|path| path.starts_with(&format!("{collection}/")))
        .map(|path| format!("at://{did}/{path}"))
        .collect();
    assert_eq!(listed, expected);
    let response = http
        .get(format!(
            "{}/xrpc/com.atproto.repo.listRecords?repo={did}&collection=bad&limit=500",
            server.url
        ))
        .send()
        .await?;
    assert_eq!(response.status(), 400);
    server.kill()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing() -> TestResult {
    let mut devnet = Devnet::start(DevnetConfig {
        pds_hosts: 3,
        accounts: 30,
        records: 20,
        ..DevnetConfig::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    let all = dids(&devnet);
    devnet.start_traffic(30.0);

    let mut state = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
            % 1_000_000_007,
    )?;
    eprintln!("crash schedule seed {state}");
    let mut next_delay = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Duration::from_millis(50 + (state >> 33) % 700)
    };
    for round in 0..20 {
        let server = Server::start(dir.path(), &devnet, &[])?;
        if round == 0 {
            let response = http
                .post(format!("{}/repos/add", server.url))
                .json(&json!({ "dids": all }))
                .send()
                .await?;
            assert_eq!(response.status(), 200);
        }
        tokio::time::sleep(next_delay()).await;
        server.kill()?;
    }
    devnet.stop_traffic();
    let server = Server::start(dir.path(), &devnet, &[])?;
    converge(&http, &server, &devnet, Duration::from_secs(90)).await?;
    server.kill()?;

    let truth = truth(&devnet)?;
    let store = Store::open(dir.path())?;
    let rebuilt = rebuild_from_outbox(&store)?;
    for (did, records) in &truth {
        let stored: BTreeMap<String, Cid> = store
            .records(did, None, None, usize::MAX, false)?
            .into_iter()
            .map(|record| (record.path(), record.cid()))
            .collect();
        assert_eq!(&stored, records, "stored records of {did}");
        let empty = BTreeMap::new();
        assert_eq!(
            rebuilt.get(did).unwrap_or(&empty),
            records,
            "outbox rebuild of {did}"
        );
    }
    Ok(())
}

/// Peak memory a backfill may use, whatever the repo's size (the issue's bound).
const BACKFILL_RSS_BOUND: u64 = 256 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_repo_backfills_in_bounded_memory() -> TestResult {
    // CI runs a modest repo; ATPDB_LARGE_REPO_RECORDS=2500000 makes the ~1 GB one.
    let records: u64 = std::env::var("ATPDB_LARGE_REPO_RECORDS")
        .ok()
        .map(|text| text.parse())
        .transpose()?
        .unwrap_or(40_000);
    let dir = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let did = format!("did:web:127.0.0.1%3A{port}");
    let car = dir.path().join("large.car");
    let output = Command::new(env!("CARGO_BIN_EXE_atpdb"))
        .args(["car", "sample", "--did", &did, "--seed", "7", "--records"])
        .arg(records.to_string())
        .arg("--out")
        .arg(&car)
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Json = serde_json::from_slice(&output.stdout)?;
    let multikey = summary["key"]
        .as_str()
        .and_then(|key| key.strip_prefix("did:key:"))
        .ok_or("no key in the summary")?
        .to_owned();
    let car_bytes = std::fs::metadata(&car)?.len();

    let document = json!({
        "id": did,
        "verificationMethod": [{
            "id": format!("{did}#atproto"),
            "type": "Multikey",
            "controller": did,
            "publicKeyMultibase": multikey,
        }],
        "service": [{
            "id": "#atproto_pds",
            "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": format!("http://127.0.0.1:{port}"),
        }],
    });
    let car_path = car.clone();
    let router = axum::Router::new()
        .route(
            "/.well-known/did.json",
            axum::routing::get(move || {
                let document = document.clone();
                async move { axum::Json(document) }
            }),
        )
        .route(
            "/xrpc/com.atproto.sync.getLatestCommit",
            axum::routing::get(|| async {
                (
                    axum::http::StatusCode::BAD_REQUEST,
                    axum::Json(json!({"error": "RepoNotFound"})),
                )
            }),
        )
        .route(
            "/xrpc/com.atproto.sync.getRepo",
            axum::routing::get(move || {
                let car_path = car_path.clone();
                async move {
                    match tokio::fs::File::open(&car_path).await {
                        Ok(file) => axum::body::Body::from_stream(
                            tokio_util::io::ReaderStream::with_capacity(file, 1 << 16),
                        ),
                        Err(_) => axum::body::Body::empty(),
                    }
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, router).await });

    let data = dir.path().join("data");
    let server = Server::start_with(
        &data,
        "127.0.0.1:0",
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        &["--no-firehose", "--did-web-http"],
    )?;
    let http = reqwest::Client::new();
    let started = Instant::now();
    let response = http
        .post(format!("{}/repos/add", server.url))
        .json(&json!({ "dids": [did] }))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    // A did:web's `%3A` must itself be escaped in a URL path.
    let did_in_path = did.replace('%', "%25");
    let info = loop {
        let info: Json = http
            .get(format!("{}/info/{did_in_path}", server.url))
            .send()
            .await?
            .json()
            .await?;
        assert!(info["message"].is_null(), "{info}");
        if info["state"] == "active" {
            break info;
        }
        assert!(info["state"] != "error", "the backfill failed: {info}");
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "no backfill: {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let elapsed = started.elapsed();
    let peak = server.peak_rss()?;
    eprintln!(
        "backfilled {} records from a {:.1} MB CAR in {:.1} s; peak RSS {:.1} MB",
        info["records"],
        car_bytes as f64 / 1e6,
        elapsed.as_secs_f64(),
        peak as f64 / 1e6
    );
    assert_eq!(info["records"], records + 1, "every record and the profile");
    assert!(
        peak < BACKFILL_RSS_BOUND,
        "peak RSS {peak} bytes is over the bound {BACKFILL_RSS_BOUND}"
    );
    server.kill()?;
    Ok(())
}

/// Serves a did:web document on a new loopback port naming `multikey`; returns the DID.
async fn did_web_host(
    multikey: impl Fn(&str) -> String,
) -> Result<String, Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let did = format!("did:web:127.0.0.1%3A{}", listener.local_addr()?.port());
    let document = json!({
        "id": did,
        "verificationMethod": [{
            "id": format!("{did}#atproto"),
            "type": "Multikey",
            "controller": did,
            "publicKeyMultibase": multikey(&did),
        }],
        "service": [{
            "id": "#atproto_pds",
            "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": "http://127.0.0.1:9",
        }],
    });
    let router = axum::Router::new().route(
        "/.well-known/did.json",
        axum::routing::get(move || {
            let document = document.clone();
            async move { axum::Json(document) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(did)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn car_verify_resolves_each_dids_key() -> TestResult {
    let dir = tempfile::tempdir()?;
    // The same seed gives the same key, so the honest host can name it before the CAR exists.
    let sample_key =
        |seed: &str, did: &str, out: &Path| -> Result<String, Box<dyn std::error::Error>> {
            let output = Command::new(env!("CARGO_BIN_EXE_atpdb"))
                .args([
                    "car",
                    "sample",
                    "--records",
                    "20",
                    "--seed",
                    seed,
                    "--did",
                    did,
                    "--out",
                ])
                .arg(out)
                .output()?;
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let summary: Json = serde_json::from_slice(&output.stdout)?;
            Ok(summary["key"]
                .as_str()
                .and_then(|key| key.strip_prefix("did:key:"))
                .ok_or("no key")?
                .to_owned())
        };
    let probe = dir.path().join("probe.car");
    let key_of_seed_5 = sample_key("5", "did:web:example.com", &probe)?;
    let key_of_seed_6 = sample_key("6", "did:web:example.com", &probe)?;
    let honest = did_web_host(|_| key_of_seed_5.clone()).await?;
    let lying = did_web_host(|_| key_of_seed_6.clone()).await?;
    let good = dir.path().join("good.car");
    let bad = dir.path().join("bad.car");
    sample_key("5", &honest, &good)?;
    sample_key("5", &lying, &bad)?;

    let verify = |file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_atpdb"))
            .args([
                "car",
                "verify",
                "--plc",
                "http://127.0.0.1:9",
                "--allow-private-network",
                "--did-web-http",
            ])
            .arg(file)
            .output()
    };
    let output = verify(&good)?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let line: Json = serde_json::from_slice(&output.stdout)?;
    assert_eq!(line["signature"], "valid");
    assert_eq!(line["did"], honest);
    let output = verify(&bad)?;
    assert!(
        !output.status.success(),
        "a key the document does not name must fail"
    );
    let line: Json = serde_json::from_slice(&output.stdout)?;
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|error| error.contains("signature")),
        "{line}"
    );
    // Without --allow-private-network the loopback host is refused.
    let output = Command::new(env!("CARGO_BIN_EXE_atpdb"))
        .args([
            "car",
            "verify",
            "--plc",
            "http://127.0.0.1:9",
            "--did-web-http",
        ])
        .arg(&good)
        .output()?;
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("private"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(())
}

/// The interop directory with Node and the npm packages, or `None` after saying why.
fn interop_dir() -> Option<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../devnet/interop");
    if dir.join("node_modules/.bin/node").exists() && dir.join("node_modules/@atproto/tap").exists()
    {
        return Some(dir);
    }
    let message = "Tap client interop did not run: run crates/devnet/interop/setup.sh";
    assert!(
        std::env::var("ATPDB_REQUIRE_INTEROP").as_deref() != Ok("1"),
        "{message} (ATPDB_REQUIRE_INTEROP=1 requires it)"
    );
    println!("{message}");
    None
}

/// `tap-consumer.mjs`: `@atproto/tap`'s `Tap` + `SimpleIndexer`, driven by JSON lines.
struct TapConsumer {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl TapConsumer {
    fn spawn(
        dir: &Path,
        url: &str,
        password: &str,
    ) -> Result<TapConsumer, Box<dyn std::error::Error>> {
        let mut child = tokio::process::Command::new(dir.join("node_modules/.bin/node"))
            .arg(dir.join("tap-consumer.mjs"))
            .arg(url)
            .env("TAP_ADMIN_PASSWORD", password)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        use tokio::io::AsyncBufReadExt;
        Ok(TapConsumer {
            child,
            stdin,
            stdout: tokio::io::BufReader::new(stdout).lines(),
        })
    }

    async fn call(&mut self, command: Json) -> Result<Json, Box<dyn std::error::Error>> {
        use tokio::io::AsyncWriteExt;
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        let line = tokio::time::timeout(Duration::from_secs(30), self.stdout.next_line())
            .await
            .map_err(|_| format!("no answer to {command}"))??
            .ok_or("the consumer exited")?;
        let answer: Json = serde_json::from_str(&line)?;
        if let Some(failed) = answer.get("failed") {
            return Err(format!("{command}: {failed}").into());
        }
        Ok(answer)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_typescript_client_rebuilds_the_devnet_across_a_sigkill() -> TestResult {
    let Some(node_dir) = interop_dir() else {
        return Ok(());
    };
    let mut devnet = Devnet::start(DevnetConfig {
        pds_hosts: 2,
        accounts: 20,
        records: 40,
        ..DevnetConfig::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let bind = format!("127.0.0.1:{port}");
    // `@atproto/tap` 0.3.12 hangs if its socket drops while it holds events it has not
    // acknowledged (fixed upstream after that release); a window of one is what such a
    // client needs to survive the server's crash.
    let extra = [
        "--admin-password",
        "hunter2",
        "--retry-timeout",
        "3s",
        "--channel-window",
        "1",
    ];
    let mut server = Server::start_on(dir.path(), &devnet, &bind, &extra)?;
    let http = reqwest::Client::new();

    let mut consumer = TapConsumer::spawn(&node_dir, &server.url, "hunter2")?;
    let all = dids(&devnet);
    let added = consumer.call(json!({"cmd": "add", "dids": all})).await?;
    assert_eq!(added["added"], all.len());
    devnet.start_traffic(20.0);

    // Kill the server once the consumer is part-way through the backfill.
    let seeded: usize = truth(&devnet)?.values().map(BTreeMap::len).sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    let before_kill = loop {
        let dump = consumer.call(json!({"cmd": "dump"})).await?;
        let records = dump["counts"]["records"].as_u64().unwrap_or(0);
        if records >= (seeded / 3) as u64 {
            break records;
        }
        assert!(Instant::now() < deadline, "no progress: {}", dump["counts"]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    server.kill()?;
    assert!(
        before_kill < seeded as u64,
        "killed mid-stream ({before_kill} of {seeded} records had arrived)"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    server = Server::start_on(dir.path(), &devnet, &bind, &extra)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    devnet.stop_traffic();
    converge_as(
        &http,
        &server,
        &devnet,
        Some("hunter2"),
        Duration::from_secs(90),
    )
    .await?;

    // The client reconnected by itself; what it rebuilt must equal every PDS's repos.
    let truth = truth(&devnet)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let dump = loop {
        let dump = consumer.call(json!({"cmd": "dump"})).await?;
        let mut differs = Vec::new();
        for account in devnet.accounts() {
            let did = account.did.to_string();
            let rebuilt: BTreeMap<String, String> =
                serde_json::from_value(dump["dump"][&did]["records"].clone()).unwrap_or_default();
            let expected: BTreeMap<String, String> = truth[&account.did]
                .iter()
                .map(|(path, cid)| (path.clone(), cid.to_string()))
                .collect();
            let handle = devnet.hosts()[account.pds]
                .account_info(&account.did)?
                .handle
                .to_string();
            if rebuilt != expected || dump["dump"][&did]["handle"] != handle.as_str() {
                differs.push(did);
            }
        }
        if differs.is_empty() {
            break dump;
        }
        assert!(
            Instant::now() < deadline,
            "{} repos differ, e.g. {}; consumer: {} {} ended={}",
            differs.len(),
            differs[0],
            dump["counts"],
            dump["errors"],
            dump["ended"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "tap consumer: {} (killed after {before_kill})",
        dump["counts"]
    );
    assert!(
        dump["ended"].is_null(),
        "the channel never ended: {}",
        dump["ended"]
    );
    assert_eq!(dump["counts"]["errors"], 0, "{}", dump["errors"]);
    assert!(
        dump["counts"]["live"].as_u64().unwrap_or(0) > 0,
        "live events arrived"
    );

    // Every event was acknowledged: the outbox drains.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let outbox: Json = http
            .get(format!("{}/stats/outbox-buffer", server.url))
            .basic_auth("admin", Some("hunter2"))
            .send()
            .await?
            .json()
            .await?;
        if outbox["outbox_buffer"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "outbox not drained: {outbox}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The client's other calls: getRepoInfo and resolveDid (null for an unknown DID).
    let did = devnet.accounts()[0].did.to_string();
    let info = consumer.call(json!({"cmd": "info", "did": did})).await?;
    assert_eq!(info["info"]["did"], did.as_str());
    assert_eq!(info["info"]["state"], "active");
    assert_eq!(
        info["info"]["records"],
        truth[&devnet.accounts()[0].did].len()
    );
    let resolved = consumer.call(json!({"cmd": "resolve", "did": did})).await?;
    assert_eq!(resolved["resolve"]["id"], did.as_str());
    let unknown = consumer
        .call(json!({"cmd": "resolve", "did": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"}))
        .await?;
    assert!(unknown["resolve"].is_null(), "{unknown}");
    let stopped = consumer.call(json!({"cmd": "stop"})).await?;
    assert_eq!(stopped["stopped"]["ended"], "clean", "{stopped}");
    let _ = consumer.child.wait().await;
    Ok(())
}

/// GET `path` with the admin password; the status and the JSON body (Null when not JSON).
async fn get_as(
    http: &reqwest::Client,
    server: &Server,
    path: &str,
) -> Result<(u16, Json), Box<dyn std::error::Error>> {
    let response = http
        .get(format!("{}{path}", server.url))
        .basic_auth("admin", Some("pw"))
        .send()
        .await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Json::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_beyond_tap_answer_and_refuse_bad_input() -> TestResult {
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 3,
        records: 12,
        ..DevnetConfig::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path(), &devnet, &["--admin-password", "pw"])?;
    let http = reqwest::Client::new();

    // Every route wants the password, with Tap's exact 401.
    for path in [
        "/health",
        "/repos",
        "/metrics",
        "/config",
        "/channel",
        "/query?uri=x",
    ] {
        let response = http.get(format!("{}{path}", server.url)).send().await?;
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Basic realm=\"admin\", charset=\"UTF-8\""
        );
        assert_eq!(
            response.json::<Json>().await?,
            json!({"error": "Unauthorized", "message": "atproto admin auth required, but missing or incorrect password"})
        );
    }
    let wrong = http
        .get(format!("{}/health", server.url))
        .basic_auth("admin", Some("nope"))
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);

    let all = dids(&devnet);
    let response = http
        .post(format!("{}/repos/add", server.url))
        .basic_auth("admin", Some("pw"))
        .json(&json!({ "dids": all }))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    converge_as(&http, &server, &devnet, Some("pw"), Duration::from_secs(60)).await?;
    let truth = truth(&devnet)?;

    // /repos pages in DID order; the cursor of a full page leads to the rest.
    let (status, first) = get_as(&http, &server, "/repos?limit=2").await?;
    assert_eq!(status, 200);
    let cursor = first["cursor"].as_str().ok_or("a full page has a cursor")?;
    let (_, rest) = get_as(&http, &server, &format!("/repos?limit=2&cursor={cursor}")).await?;
    let mut listed: Vec<String> = first["repos"]
        .as_array()
        .into_iter()
        .chain(rest["repos"].as_array())
        .flatten()
        .filter_map(|repo| repo["did"].as_str().map(str::to_owned))
        .collect();
    assert!(rest.get("cursor").is_none(), "the last page has no cursor");
    let mut expected = all.clone();
    expected.sort();
    listed.sort();
    assert_eq!(listed, expected);
    let (_, active) = get_as(&http, &server, "/repos?state=active").await?;
    assert_eq!(active["repos"].as_array().map(Vec::len), Some(3));
    let (_, errors) = get_as(&http, &server, "/repos/errors").await?;
    assert_eq!(errors["repos"], json!([]));
    for bad in [
        "/repos?state=bogus",
        "/repos?limit=0",
        "/repos?limit=many",
        "/repos?cursor=not-a-did",
        "/repos/not-a-did",
        "/query?uri=https://x",
        "/query?uri=at://did:plc:x",
        "/query?uri=at://*/app.bsky.feed.post/abc",
        "/query?uri=at://did:plc:aaaaaaaaaaaaaaaaaaaaaaaa/bad/x",
        "/query?uri=at://a/b/c/d",
        "/resolve/not-a-did",
    ] {
        let (status, body) = get_as(&http, &server, bad).await?;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["message"].is_string(), "{bad}: {body}");
    }

    // One repo in full, with its collections.
    let account = &devnet.accounts()[0];
    let did = account.did.to_string();
    let (status, repo) = get_as(&http, &server, &format!("/repos/{did}")).await?;
    assert_eq!(status, 200);
    assert_eq!(repo["state"], "active");
    assert_eq!(repo["records"], truth[&account.did].len());
    let mut collections: Vec<&str> = truth[&account.did]
        .keys()
        .filter_map(|path| path.split_once('/').map(|(c, _)| c))
        .collect();
    collections.dedup();
    assert_eq!(repo["collections"], json!(collections));
    let (status, _) = get_as(&http, &server, "/repos/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa").await?;
    assert_eq!(status, 404);
    let (_, described) = get_as(
        &http,
        &server,
        &format!("/xrpc/com.atproto.repo.describeRepo?repo={did}"),
    )
    .await?;
    assert_eq!(described["collections"], json!(collections));
    assert_eq!(described["handle"], account.handle.to_string());
    assert_eq!(described["handleIsCorrect"], true);
    assert_eq!(described["didDoc"]["id"], did.as_str());

    // at:// queries: one record, one repo's collection, a collection across repos (paged).
    let (path, cid) = truth[&account.did].iter().next().ok_or("an empty repo")?;
    let (collection, _) = path.split_once('/').ok_or("a path")?;
    let (status, record) = get_as(&http, &server, &format!("/query?uri=at://{did}/{path}")).await?;
    assert_eq!(status, 200);
    assert_eq!(record["cid"], cid.to_string());
    let (status, _) = get_as(
        &http,
        &server,
        &format!("/query?uri=at://{did}/{collection}/nope"),
    )
    .await?;
    assert_eq!(status, 404);
    let (_, listing) = get_as(
        &http,
        &server,
        &format!("/query?uri=at://{did}/{collection}/*"),
    )
    .await?;
    let uris: Vec<&str> = listing["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["uri"].as_str())
        .collect();
    let want: Vec<String> = truth[&account.did]
        .keys()
        .filter(|p| p.starts_with(&format!("{collection}/")))
        .map(|p| format!("at://{did}/{p}"))
        .collect();
    assert_eq!(uris, want);
    let mut across = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/query?uri=at://*/{collection}/*&limit=3");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let (status, page) = get_as(&http, &server, &path).await?;
        assert_eq!(status, 200, "{page}");
        across.extend(
            page["records"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["uri"].as_str().map(str::to_owned)),
        );
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut want_across: Vec<String> = truth
        .iter()
        .flat_map(|(did, records)| {
            records
                .keys()
                .filter(|p| p.starts_with(&format!("{collection}/")))
                .map(move |p| format!("at://{did}/{p}"))
        })
        .collect();
    want_across.sort();
    across.sort();
    assert_eq!(across, want_across, "every record of the collection, once");

    // Resync: named DIDs, all errored ones; bad bodies refused.
    let post = |path: &str, body: &str| {
        http.post(format!("{}{path}", server.url))
            .basic_auth("admin", Some("pw"))
            .body(body.to_owned())
            .send()
    };
    let response = post("/repos/resync", &json!({ "dids": [did] }).to_string()).await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Json>().await?, json!({"resyncing": 1}));
    let response = post("/repos/resync", r#"{"errors": true}"#).await?;
    assert_eq!(response.json::<Json>().await?, json!({"resyncing": 0}));
    for bad in [r#"{"dids": ["nope"]}"#, r#"{"dids": 5}"#, "{"] {
        let response = post("/repos/resync", bad).await?;
        assert_eq!(response.status(), 400, "{bad}");
    }
    converge_as(&http, &server, &devnet, Some("pw"), Duration::from_secs(60)).await?;

    let (_, runs) = get_as(&http, &server, "/runs").await?;
    assert!(runs["runs"].is_array(), "{runs}");
    let (_, config) = get_as(&http, &server, "/config").await?;
    assert_eq!(config["mode"], "manual");
    assert_eq!(config["delivery"], "websocket-ack");
    let put = |body: &str| {
        http.put(format!("{}/config", server.url))
            .basic_auth("admin", Some("pw"))
            .body(body.to_owned())
            .send()
    };
    for bad in [
        r#"{"mode": "everything"}"#,
        r#"{"collection_filters": ["app.bsky*"]}"#,
        r#"{"resync_parallelism": 9}"#,
        r#"{"mode": "signal"}"#,
        "nope",
    ] {
        let response = put(bad).await?;
        assert_eq!(response.status(), 400, "{bad}");
        assert!(response.json::<Json>().await?["message"].is_string());
    }
    let response = put(r#"{"collection_filters": ["app.bsky.feed.*"]}"#).await?;
    assert_eq!(response.status(), 200);
    let changed: Json = response.json().await?;
    assert_eq!(changed["collection_filters"], json!(["app.bsky.feed.*"]));
    assert_eq!(
        changed["resyncing"], 0,
        "narrowing from everything resyncs nothing"
    );
    let (_, config) = get_as(&http, &server, "/config").await?;
    assert_eq!(config["collection_filters"], json!(["app.bsky.feed.*"]));
    let unauthorized = http
        .put(format!("{}/config", server.url))
        .body("{}")
        .send()
        .await?;
    assert_eq!(unauthorized.status(), 401);
    let (status, document) = get_as(&http, &server, &format!("/resolve/{did}")).await?;
    assert_eq!(status, 200);
    assert_eq!(document["id"], did.as_str());
    let (status, _) = get_as(&http, &server, "/resolve/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa").await?;
    assert_eq!(status, 404);

    let metrics = http
        .get(format!("{}/metrics", server.url))
        .basic_auth("admin", Some("pw"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("atpdb_repos{state=\"active\"} 3"),
        "{metrics}"
    );
    let total: usize = truth.values().map(BTreeMap::len).sum();
    assert!(
        metrics.contains(&format!("\natpdb_records {total}\n")),
        "{metrics}"
    );
    assert!(
        metrics.contains("atpdb_host_requests_total{host=\"http://127.0.0.1:"),
        "{metrics}"
    );
    server.kill()?;

    // In webhook mode there is no /channel (Tap's 400).
    let server = Server::start(
        dir.path(),
        &devnet,
        &["--webhook-url", "http://127.0.0.1:9/hook"],
    )?;
    let ws_url = format!("{}/channel", server.url.replacen("http", "ws", 1));
    match tokio_tungstenite::connect_async(ws_url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400);
        }
        other => return Err(format!("expected a 400, got {:?}", other.map(|_| ())).into()),
    }
    server.kill()?;
    Ok(())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text frame as JSON.
async fn next_json(socket: &mut Socket) -> Result<Json, Box<dyn std::error::Error>> {
    next_json_within(socket, Duration::from_secs(20))
        .await?
        .ok_or_else(|| "no frame within 20 s".into())
}

/// The next text frame as JSON, or `None` when none comes within `wait`.
async fn next_json_within(
    socket: &mut Socket,
    wait: Duration,
) -> Result<Option<Json>, Box<dyn std::error::Error>> {
    use futures_util::StreamExt;
    loop {
        let Ok(message) = tokio::time::timeout(wait, socket.next()).await else {
            return Ok(None);
        };
        if let tokio_tungstenite::tungstenite::Message::Text(text) =
            message.ok_or("the stream ended")??
        {
            return Ok(Some(serde_json::from_str(text.as_str())?));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_replays_from_any_cursor_to_every_client_and_follows_live() -> TestResult {
    use futures_util::SinkExt;
    let mut devnet = Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 4,
        records: 10,
        ..DevnetConfig::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path(), &devnet, &[])?;
    let http = reqwest::Client::new();
    http.post(format!("{}/repos/add", server.url))
        .json(&json!({ "dids": dids(&devnet) }))
        .send()
        .await?;
    converge(&http, &server, &devnet, Duration::from_secs(60)).await?;
    let ws = server.url.replacen("http", "ws", 1);
    let status: Json = http
        .get(format!("{}/status.json", server.url))
        .send()
        .await?
        .json()
        .await?;
    let newest = status["last_event_id"].as_u64().ok_or("last_event_id")?;

    // Two clients from the start each get every event, in id order.
    let all_events = format!("{ws}/stream?cursor=0&repo_events=true");
    let (mut first, _) = tokio_tungstenite::connect_async(all_events.as_str()).await?;
    let (mut second, _) = tokio_tungstenite::connect_async(all_events.as_str()).await?;
    let mut rebuilt: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut previous = 0;
    let mut last_tap_event = 0;
    let mut seen = Vec::new();
    // Nothing is being written: the replay ends when the stream goes quiet.
    while let Some(event) = next_json_within(&mut first, Duration::from_secs(1)).await? {
        let again = next_json(&mut second).await?;
        assert_eq!(event, again, "both clients get the same events");
        let id = event["id"].as_u64().ok_or("id")?;
        assert!(id > previous, "ids grow: {id} after {previous}");
        previous = id;
        seen.push(id);
        if event["type"] == "record" {
            let record = &event["record"];
            let repo = rebuilt
                .entry(record["did"].as_str().unwrap_or_default().to_owned())
                .or_default();
            let path = format!(
                "{}/{}",
                record["collection"].as_str().unwrap_or_default(),
                record["rkey"].as_str().unwrap_or_default()
            );
            match record["cid"].as_str() {
                Some(cid) => repo.insert(path, cid.to_owned()),
                None => repo.remove(&path),
            };
        }
        if event["type"] != "repo" {
            last_tap_event = id;
        }
    }
    let last = previous;
    assert!(last <= newest && last > 0);
    // Without asking, a client gets Tap's event types only.
    let (mut plain, _) = tokio_tungstenite::connect_async(format!("{ws}/stream?cursor=0")).await?;
    loop {
        let event = next_json(&mut plain).await?;
        assert_ne!(event["type"], "repo", "repo-state events are opt-in");
        if event["id"].as_u64() >= Some(last_tap_event) {
            break;
        }
    }
    let truth = truth(&devnet)?;
    for (did, records) in &truth {
        let expected: BTreeMap<String, String> = records
            .iter()
            .map(|(path, cid)| (path.clone(), cid.to_string()))
            .collect();
        assert_eq!(rebuilt.get(&did.to_string()), Some(&expected), "{did}");
    }

    // A cursor resumes right after it; live events follow the replay.
    let middle = last / 2;
    let (mut resumed, _) =
        tokio_tungstenite::connect_async(format!("{ws}/stream?cursor={middle}&repo_events=true"))
            .await?;
    // `seen` holds repo-state events too, so the resumed stream asks for them as well.
    let expected = seen.iter().find(|id| **id > middle).copied();
    assert_eq!(next_json(&mut resumed).await?["id"].as_u64(), expected);
    devnet.start_traffic(10.0);
    let live = next_json(&mut first).await?;
    assert!(
        live["id"].as_u64().unwrap_or(0) > last,
        "a live event: {live}"
    );
    assert_eq!(live["record"]["live"], true);
    devnet.stop_traffic();

    // Events acknowledged on /channel leave the outbox but stay in the retained log: a
    // stream from the start still gets them.
    let outbox_of = |http: reqwest::Client, url: String| async move {
        let stats: Json = http
            .get(format!("{url}/stats/outbox-buffer"))
            .send()
            .await?
            .json()
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(stats["outbox_buffer"].as_u64().unwrap_or(0))
    };
    let before_acks = outbox_of(http.clone(), server.url.clone()).await?;
    let (mut channel, _) = tokio_tungstenite::connect_async(format!("{ws}/channel")).await?;
    let mut acked = Vec::new();
    for _ in 0..5 {
        let event = next_json(&mut channel).await?;
        acked.push(event["id"].as_u64().ok_or("id")?);
        let ack = json!({"type": "ack", "id": event["id"]}).to_string();
        channel
            .send(tokio_tungstenite::tungstenite::Message::Text(ack.into()))
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbox_of(http.clone(), server.url.clone()).await? + 5 > before_acks {
        assert!(Instant::now() < deadline, "the acks never removed events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut from_start, _) =
        tokio_tungstenite::connect_async(format!("{ws}/stream?cursor=0&repo_events=true")).await?;
    assert_eq!(
        next_json(&mut from_start).await?["id"].as_u64(),
        seen.first().copied(),
        "the log still holds acknowledged events"
    );
    drop(channel);
    server.kill()?;

    // Without retention, streams replay what the outbox holds: an older cursor is told so.
    let server = Server::start(dir.path(), &devnet, &["--retain-events", "0"])?;
    let (mut late, _) = tokio_tungstenite::connect_async(format!(
        "{ws_of}/stream?cursor=1",
        ws_of = server.url.replacen("http", "ws", 1)
    ))
    .await?;
    let first_frame = next_json(&mut late).await?;
    assert_eq!(first_frame["type"], "info", "{first_frame}");
    assert_eq!(first_frame["name"], "OutdatedCursor");
    server.kill()?;

    // A window of 5 events: once delivered, the log is trimmed to the newest 5 (what is
    // not delivered yet stays, and streams replay it too).
    let server = Server::start(dir.path(), &devnet, &["--retain-events", "5"])?;
    let ws = server.url.replacen("http", "ws", 1);
    let (mut channel, _) = tokio_tungstenite::connect_async(format!("{ws}/channel")).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while outbox_of(http.clone(), server.url.clone()).await? > 0 {
        assert!(
            Instant::now() < deadline,
            "delivery never emptied the outbox"
        );
        while let Some(event) = next_json_within(&mut channel, Duration::from_millis(100)).await? {
            let ack = json!({"type": "ack", "id": event["id"]}).to_string();
            channel
                .send(tokio_tungstenite::tungstenite::Message::Text(ack.into()))
                .await?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (mut trimmed, _) =
            tokio_tungstenite::connect_async(format!("{ws}/stream?cursor=1&repo_events=true"))
                .await?;
        let first_frame = next_json(&mut trimmed).await?;
        let mut ids = Vec::new();
        if first_frame["type"] == "info" {
            while let Some(event) =
                next_json_within(&mut trimmed, Duration::from_millis(500)).await?
            {
                ids.push(event["id"].as_u64().unwrap_or(0));
            }
            // The trimmer runs every few seconds, so events delivered after its last pass
            // are still there; once it has passed again, at most 5 of the first server's
            // events remain, followed by whatever the restart wrote.
            let from_first_server = ids.iter().filter(|id| **id <= last).count();
            if !ids.is_empty() && from_first_server <= 5 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the log was never trimmed to 5: {first_frame} {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for bad in ["cursor=-1", "cursor=x", "repo_events=maybe"] {
        let response = http
            .get(format!("{}/stream?{bad}", server.url))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await?;
        assert_eq!(response.status(), 400, "{bad}");
    }
    server.kill()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_client_from_npm_sees_exactly_the_matching_events_from_its_cursor() -> TestResult
{
    let Some(node_dir) = interop_dir() else {
        return Ok(());
    };
    let mut devnet = Devnet::start(DevnetConfig {
        pds_hosts: 2,
        accounts: 8,
        records: 20,
        ..DevnetConfig::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path(), &devnet, &[])?;
    let http = reqwest::Client::new();
    http.post(format!("{}/repos/add", server.url))
        .json(&json!({ "dids": dids(&devnet) }))
        .send()
        .await?;
    converge(&http, &server, &devnet, Duration::from_secs(60)).await?;
    // The cursor falls between the backfill and the live traffic.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cursor = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros(),
    )?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    devnet.start_traffic(20.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    devnet.stop_traffic();
    converge(&http, &server, &devnet, Duration::from_secs(60)).await?;

    let endpoint = format!("{}/subscribe", server.url.replacen("http", "ws", 1));
    let output = tokio::process::Command::new(node_dir.join("node_modules/.bin/node"))
        .arg(node_dir.join("jetstream-consumer.mjs"))
        .args([
            &endpoint,
            &cursor.to_string(),
            "app.bsky.feed.like,app.bsky.graph.*",
            "1500",
        ])
        .current_dir(&node_dir)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output).await??;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let got: Json = serde_json::from_slice(&output.stdout)?;
    assert_eq!(got["errors"], json!([]), "{got}");
    server.kill()?;

    // What the outbox says the client should have seen: commits of the wanted collections
    // from the cursor on, identity and account events whatever their collection.
    let store = Store::open(dir.path())?;
    let mut expected = Vec::new();
    for (_, event) in store.retained_after(0, usize::MAX)? {
        if event.time_us() < cursor {
            continue;
        }
        match event {
            Event::Record(record)
                if record.collection == "app.bsky.feed.like"
                    || record.collection.starts_with("app.bsky.graph.") =>
            {
                expected.push(json!({
                    "kind": "commit",
                    "did": record.did.as_str(),
                    "time_us": record.time_us,
                    "collection": record.collection,
                    "rkey": record.rkey,
                    "operation": record.action.as_str(),
                    "cid": record.cid.map(|cid| cid.to_string()),
                }));
            }
            Event::Identity(identity) => {
                for kind in ["identity", "account"] {
                    expected.push(json!({"kind": kind, "did": identity.did.as_str(), "time_us": identity.time_us}));
                }
            }
            _ => {}
        }
    }
    let seen: Vec<Json> = got["seen"]
        .as_array()
        .ok_or("seen")?
        .iter()
        .map(|event| {
            let mut event = event.clone();
            if let Some(object) = event.as_object_mut() {
                object.retain(|_, value| !value.is_null());
                if object.get("kind").and_then(Json::as_str) != Some("commit") {
                    object.retain(|key, _| matches!(key.as_str(), "kind" | "did" | "time_us"));
                }
            }
            event
        })
        .collect();
    let expected: Vec<Json> = expected
        .into_iter()
        .map(|mut event| {
            if let Some(object) = event.as_object_mut() {
                object.retain(|_, value| !value.is_null());
            }
            event
        })
        .collect();
    assert!(
        expected.iter().any(|e| e["kind"] == "commit"),
        "the traffic wrote matching records"
    );
    assert_eq!(seen, expected, "exactly the matching events, in order");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_filters_by_did_takes_option_updates_and_refuses_bad_queries() -> TestResult {
    use futures_util::SinkExt;
    let mut devnet = Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 4,
        records: 5,
        ..DevnetConfig::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path(), &devnet, &[])?;
    let http = reqwest::Client::new();
    http.post(format!("{}/repos/add", server.url))
        .json(&json!({ "dids": dids(&devnet) }))
        .send()
        .await?;
    converge(&http, &server, &devnet, Duration::from_secs(60)).await?;
    let ws = server.url.replacen("http", "ws", 1);
    let one = devnet.accounts()[0].did.to_string();

    // Live only (no cursor), one DID: only its events arrive.
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{ws}/subscribe?wantedDids={one}")).await?;
    devnet.start_traffic(30.0);
    for _ in 0..3 {
        let event = next_json(&mut socket).await?;
        assert_eq!(event["did"], one.as_str(), "{event}");
        assert!(event["time_us"].is_u64());
    }
    // requireHello: nothing until the options update, then what it asks for.
    let (mut hello, _) = tokio_tungstenite::connect_async(format!(
        "{ws}/subscribe?requireHello=true&wantedCollections=app.bsky.feed.like"
    ))
    .await?;
    assert!(
        next_json_within(&mut hello, Duration::from_millis(700))
            .await?
            .is_none(),
        "nothing before the hello"
    );
    let update =
        json!({"type": "options_update", "payload": {"wantedCollections": ["app.bsky.feed.post"]}});
    hello
        .send(tokio_tungstenite::tungstenite::Message::Text(
            update.to_string().into(),
        ))
        .await?;
    let mut commits = 0;
    while commits < 2 {
        let event = next_json(&mut hello).await?;
        if event["kind"] == "commit" {
            assert_eq!(
                event["commit"]["collection"], "app.bsky.feed.post",
                "{event}"
            );
            commits += 1;
        }
    }
    devnet.stop_traffic();
    for bad in [
        "wantedCollections=app.bsky*",
        "wantedDids=nope",
        "cursor=soon",
    ] {
        let response = http
            .get(format!("{}/subscribe?{bad}", server.url))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await?;
        assert_eq!(response.status(), 400, "{bad}");
        assert!(response.json::<Json>().await?["message"].is_string());
    }

    // compress=true, or the header Socket-Encoding: zstd: each event is one zstd frame in a
    // binary message. It decodes with no dictionary and with one loaded (Jetstream's clients
    // hold their own), to the same JSON the plain stream sends.
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let from_start = format!("{ws}/subscribe?cursor=1");
    let (mut plain, _) = tokio_tungstenite::connect_async(from_start.as_str()).await?;
    let mut expected = Vec::new();
    while let Some(event) = next_json_within(&mut plain, Duration::from_secs(1)).await? {
        expected.push(event);
    }
    assert!(expected.len() > 20, "{} events", expected.len());
    let mut request = from_start.as_str().into_client_request()?;
    request
        .headers_mut()
        .insert("socket-encoding", "zstd".parse()?);
    let (by_header, _) = tokio_tungstenite::connect_async(request).await?;
    let (by_query, _) =
        tokio_tungstenite::connect_async(format!("{from_start}&compress=true")).await?;
    // A dictionary of the very events: a decoder that wrongly used it would garble them.
    let dictionary: Vec<u8> = expected
        .iter()
        .flat_map(|event| event.to_string().into_bytes())
        .take(16 << 10)
        .collect();
    let (mut compressed, mut original) = (0, 0);
    for mut socket in [by_header, by_query] {
        for want in &expected {
            let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
                .await?
                .ok_or("the stream ended")??;
            let tokio_tungstenite::tungstenite::Message::Binary(bytes) = message else {
                return Err(format!("a compressed event comes as binary, not {message:?}").into());
            };
            let bare = zstd::bulk::decompress(&bytes, 1 << 20)?;
            let with_dictionary = zstd::bulk::Decompressor::with_dictionary(&dictionary)?
                .decompress(&bytes, 1 << 20)?;
            assert_eq!(bare, with_dictionary);
            assert_eq!(&serde_json::from_slice::<Json>(&bare)?, want);
            compressed += bytes.len();
            original += bare.len();
        }
    }
    assert!(compressed < original, "{compressed} bytes from {original}");
    server.kill()?;
    Ok(())
}

/// `atpdb repos|config|query --url`: the CLI drives a running server, with its password,
/// and says plainly what the server refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_commands_drive_a_running_server() -> TestResult {
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 3,
        records: 12,
        ..DevnetConfig::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path(), &devnet, &["--admin-password", "pw"])?;
    let cli = |args: &[&str]| -> Result<(bool, String, String), Box<dyn std::error::Error>> {
        let output = Command::new(env!("CARGO_BIN_EXE_atpdb"))
            .args(args)
            .args(["--url", &server.url, "--password", "pw"])
            .env_remove("ATPDB_ADMIN_PASSWORD")
            .env_remove("TAP_ADMIN_PASSWORD")
            .output()?;
        Ok((
            output.status.success(),
            String::from_utf8(output.stdout)?,
            String::from_utf8(output.stderr)?,
        ))
    };
    let all = dids(&devnet);
    let mut add = vec!["repos", "add"];
    add.extend(all.iter().map(String::as_str));

    tokio::task::block_in_place(|| -> TestResult {
        // Without the password: refused, with the server's reason.
        let output = Command::new(env!("CARGO_BIN_EXE_atpdb"))
            .args(&add)
            .args(["--url", &server.url])
            .env_remove("ATPDB_ADMIN_PASSWORD")
            .env_remove("TAP_ADMIN_PASSWORD")
            .output()?;
        assert!(!output.status.success());
        let stderr = String::from_utf8(output.stderr)?;
        assert!(
            stderr.contains("401") && stderr.contains("admin auth required"),
            "{stderr}"
        );
        let (ok, _, stderr) = cli(&["repos", "add", "did:plc:x", "not-a-did"])?;
        assert!(
            !ok && stderr.contains("invalid DID") && stderr.contains("not-a-did"),
            "{stderr}"
        );
        let (ok, stdout, _) = cli(&add)?;
        assert!(ok);
        assert_eq!(stdout.trim(), "added 3 repos; they backfill now");
        Ok(())
    })?;
    let http = reqwest::Client::new();
    converge_as(&http, &server, &devnet, Some("pw"), Duration::from_secs(60)).await?;
    let truth = truth(&devnet)?;
    let first: Did = all[0].parse()?;
    let records = &truth[&first];
    let (path, cid) = records.iter().next().ok_or("no records")?;
    let (collection, rkey) = path.split_once('/').ok_or("a path without /")?;

    tokio::task::block_in_place(|| -> TestResult {
        let (ok, stdout, _) = cli(&["repos", "list"])?;
        assert!(ok);
        for did in &all {
            let line = stdout
                .lines()
                .find(|line| line.starts_with(did.as_str()))
                .ok_or(format!("{did} not listed: {stdout}"))?;
            assert!(line.contains("active"), "{line}");
        }
        let (_, page, _) = cli(&["repos", "list", "--limit", "2"])?;
        let cursor = page
            .lines()
            .find_map(|line| line.strip_prefix("more: --cursor "))
            .ok_or(format!("a full page names its cursor: {page}"))?;
        let (_, rest, _) = cli(&["repos", "list", "--limit", "2", "--cursor", cursor])?;
        assert_eq!(rest.lines().count(), 1, "{rest}");
        let (_, rest, _) = cli(&["repos", "list", "--state", "error"])?;
        assert_eq!(rest.trim(), "no repos");
        let (ok, _, stderr) = cli(&["repos", "list", "--state", "happy"])?;
        assert!(!ok && stderr.contains("happy"), "{stderr}");

        let (_, status, _) = cli(&["repos", "status", &all[0]])?;
        assert!(
            status.contains(&format!("records     {}", records.len())),
            "{status}"
        );
        assert!(status.contains(collection), "{status}");
        let (ok, _, stderr) = cli(&["repos", "status", "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"])?;
        assert!(!ok && stderr.contains("repo not found"), "{stderr}");
        let (_, errors, _) = cli(&["repos", "errors"])?;
        assert_eq!(errors.trim(), "no repos in error");

        // Queries: one record as JSON, a repo's collection, and a miss.
        let (ok, stdout, _) = cli(&[
            "query",
            &format!("at://{}/{collection}/{rkey}", all[0]),
            "--json",
        ])?;
        assert!(ok);
        let record: Json = serde_json::from_str(&stdout)?;
        assert_eq!(record["cid"], cid.to_string());
        let (_, listing, _) = cli(&["query", &format!("at://{}/{collection}/*", all[0])])?;
        let expected = records
            .keys()
            .filter(|key| key.starts_with(&format!("{collection}/")))
            .count();
        assert_eq!(
            listing
                .lines()
                .filter(|line| line.starts_with("at://"))
                .count(),
            expected,
            "{listing}"
        );
        let (ok, _, stderr) = cli(&["query", &format!("at://{}/{collection}/nope", all[0])])?;
        assert!(!ok && stderr.contains("record not found"), "{stderr}");
        let (ok, _, stderr) = cli(&["query", "https://example.com"])?;
        assert!(!ok && stderr.contains("at://"), "{stderr}");

        // The scope: read, narrowed, refused when wrong, widened again (a resync).
        let (_, config, _) = cli(&["config", "get"])?;
        assert!(config.contains("mode                manual"), "{config}");
        let (ok, config, _) = cli(&["config", "set", "--collection-filters", collection])?;
        assert!(ok);
        assert!(
            config.contains(&format!("collection filters  {collection}")),
            "{config}"
        );
        let (ok, _, stderr) = cli(&["config", "set", "--mode", "sometimes"])?;
        assert!(!ok && stderr.contains("sometimes"), "{stderr}");
        let (ok, _, _) = cli(&["config", "set"])?;
        assert!(!ok, "config set without a change is a usage error");
        let (ok, config, _) = cli(&["config", "set", "--collection-filters", "*"])?;
        assert!(ok && config.contains("resyncing 3 repos"), "{config}");
        let (_, json, _) = cli(&["config", "get", "--json"])?;
        let json: Json = serde_json::from_str(&json)?;
        assert_eq!(json["collection_filters"], json!(["*"]));

        let (_, resync, _) = cli(&["repos", "resync", &all[1]])?;
        assert_eq!(resync.trim(), "resyncing 1 repo");
        let (ok, _, stderr) = cli(&["repos", "resync"])?;
        assert!(!ok && stderr.contains("--errors"), "{stderr}");
        let (_, removed, _) = cli(&["repos", "remove", &all[2]])?;
        assert_eq!(removed.trim(), "removed 1 repo");
        let (_, rest, _) = cli(&["repos", "list"])?;
        assert!(!rest.contains(all[2].as_str()), "{rest}");
        Ok(())
    })?;

    // A server that is not there: a message naming it, not a hang.
    let output = Command::new(env!("CARGO_BIN_EXE_atpdb"))
        .args(["repos", "list", "--url", "http://127.0.0.1:9"])
        .output()?;
    assert!(!output.status.success());
    assert!(String::from_utf8(output.stderr)?.contains("no answer from http://127.0.0.1:9"));
    Ok(())
}

/// A fresh database on the machine's PostgreSQL; `None` (said) when there is none.
struct TestDatabase {
    admin: atpdb_fleet::tokio_postgres::Client,
    database: String,
    url: String,
}

async fn test_database(test: &str) -> Result<Option<TestDatabase>, Box<dyn std::error::Error>> {
    let base = std::env::var("ATPDB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432".to_owned());
    let admin = match atpdb_fleet::index::connect(&format!("{base}/postgres")).await {
        Ok(admin) => admin,
        Err(err) => {
            let message = format!("the {test} test did not run: no PostgreSQL ({err})");
            assert!(
                std::env::var("ATPDB_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "{message} (ATPDB_REQUIRE_POSTGRES=1 requires it)"
            );
            println!("{message}");
            return Ok(None);
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let database = format!("atpdb_test_{test}_{}_{nanos}", std::process::id());
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await?;
    Ok(Some(TestDatabase {
        url: format!("{base}/{database}"),
        admin,
        database,
    }))
}

/// PostgreSQL's records as `did → path → cid`, the live rows only.
async fn postgres_records(
    postgres: &atpdb_fleet::tokio_postgres::Client,
) -> Result<Truth, Box<dyn std::error::Error>> {
    let mut found = Truth::new();
    for row in postgres
        .query(
            "SELECT did, collection || '/' || rkey, cid FROM record WHERE NOT deleted",
            &[],
        )
        .await?
    {
        let did: Did = row.get::<_, String>(0).parse()?;
        let cid: Cid = row.get::<_, String>(2).parse()?;
        found.entry(did).or_default().insert(row.get(1), cid);
    }
    Ok(found)
}

/// Waits until PostgreSQL's live records equal `truth` (a sink follows the outbox), then
/// asserts they do.
async fn caught_up(
    postgres: &atpdb_fleet::tokio_postgres::Client,
    truth: &Truth,
    timeout: Duration,
) -> TestResult {
    let deadline = Instant::now() + timeout;
    let mut indexed = postgres_records(postgres).await?;
    while &indexed != truth && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        indexed = postgres_records(postgres).await?;
    }
    assert_eq!(&indexed, truth, "PostgreSQL against the devnet");
    Ok(())
}

/// `serve --redis --postgres`: every event reaches the fleet's stream and the indexer's
/// tables exactly once, across SIGKILLs, and both end equal to the devnet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_carry_every_event_to_redis_and_postgres_exactly_once_across_kills() -> TestResult {
    let skip = |service: &str, require: &str, err: String| -> TestResult {
        let message = format!("the serve sinks test did not run: {service} ({err})");
        assert!(
            std::env::var(require).as_deref() != Ok("1"),
            "{message} ({require}=1 requires it)"
        );
        println!("{message}");
        Ok(())
    };
    let redis_url = std::env::var("ATPDB_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let mut redis = match tokio::time::timeout(
        Duration::from_secs(5),
        atpdb_fleet::connect(&redis_url),
    )
    .await
    {
        Ok(Ok(redis)) => redis,
        failed => return skip("no Redis", "ATPDB_REQUIRE_REDIS", format!("{failed:?}")),
    };
    let Some(TestDatabase {
        admin,
        database,
        url: database_url,
    }) = test_database("sink").await?
    else {
        return Ok(());
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let stream = format!(
        "atpdb-test:sink:{}:{nanos}:firehose_live",
        std::process::id()
    );

    let mut devnet = Devnet::start(DevnetConfig {
        pds_hosts: 2,
        accounts: 8,
        records: 15,
        ..DevnetConfig::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    let args = [
        "--redis",
        redis_url.as_str(),
        "--redis-stream",
        stream.as_str(),
        "--postgres",
        database_url.as_str(),
    ];
    devnet.start_traffic(20.0);
    for round in 0..4 {
        let server = Server::start(dir.path(), &devnet, &args)?;
        if round == 0 {
            let response = http
                .post(format!("{}/repos/add", server.url))
                .json(&json!({ "dids": dids(&devnet) }))
                .send()
                .await?;
            assert_eq!(response.status(), 200);
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.kill()?;
    }
    devnet.stop_traffic();
    let server = Server::start(dir.path(), &devnet, &args)?;
    converge(&http, &server, &devnet, Duration::from_secs(90)).await?;
    let mut truth = truth(&devnet)?;
    truth.retain(|_, records| !records.is_empty());

    // PostgreSQL follows the outbox: wait until it has caught up.
    let postgres = atpdb_fleet::index::connect(&database_url).await?;
    caught_up(&postgres, &truth, Duration::from_secs(60)).await?;
    server.kill()?;

    // The stream, replayed in order, is the devnet too; no outbox event was written twice.
    let entries: Vec<(String, Vec<(String, String)>)> = atpdb_fleet::redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await?;
    let mut replayed = Truth::new();
    let mut last_seq = 0;
    for (_, fields) in &entries {
        let text = &fields.first().ok_or("an empty entry")?.1;
        let event: atpdb_fleet::StreamEvent = serde_json::from_str(text)?;
        let (seq, did, path, cid) = match event {
            atpdb_fleet::StreamEvent::Create {
                seq,
                did,
                collection,
                rkey,
                cid,
                ..
            }
            | atpdb_fleet::StreamEvent::Update {
                seq,
                did,
                collection,
                rkey,
                cid,
                ..
            } => (seq, did, format!("{collection}/{rkey}"), Some(cid)),
            atpdb_fleet::StreamEvent::Delete {
                seq,
                did,
                collection,
                rkey,
                ..
            } => (seq, did, format!("{collection}/{rkey}"), None),
            _ => continue,
        };
        assert!(seq > last_seq, "seq {seq} after {last_seq}: written twice");
        last_seq = seq;
        let records = replayed.entry(did.parse()?).or_default();
        match cid {
            Some(cid) => records.insert(path, cid.parse()?),
            None => records.remove(&path),
        };
    }
    replayed.retain(|_, records| !records.is_empty());
    assert_eq!(replayed, truth, "the Redis stream against the devnet");
    let cursor: u64 = atpdb_fleet::redis::cmd("GET")
        .arg(atpdb_fleet::sink::cursor_key(&stream, "atpdb"))
        .query_async(&mut redis)
        .await?;
    assert!(
        cursor >= u64::try_from(last_seq)?,
        "the cursor is behind what was written"
    );

    let _: () = atpdb_fleet::redis::cmd("DEL")
        .arg(&stream)
        .arg(atpdb_fleet::sink::cursor_key(&stream, "atpdb"))
        .query_async(&mut redis)
        .await?;
    drop(postgres);
    admin
        .batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .await?;
    Ok(())
}

/// `--sink-acks`: the sinks consume the outbox. With an outbox limit far below the events a
/// backfill makes and no /channel consumer, the engine pauses for good unless the sink's
/// writes acknowledge the events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_that_acknowledge_keep_a_server_without_consumers_going() -> TestResult {
    let Some(TestDatabase {
        admin,
        database,
        url,
    }) = test_database("sink_acks").await?
    else {
        return Ok(());
    };
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 2,
        accounts: 6,
        records: 30,
        ..DevnetConfig::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    let server = Server::start(
        dir.path(),
        &devnet,
        &["--postgres", &url, "--sink-acks", "--outbox-limit", "20"],
    )?;
    let response = http
        .post(format!("{}/repos/add", server.url))
        .json(&json!({ "dids": dids(&devnet) }))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    converge(&http, &server, &devnet, Duration::from_secs(60)).await?;
    let mut truth = truth(&devnet)?;
    truth.retain(|_, records| !records.is_empty());
    let postgres = atpdb_fleet::index::connect(&url).await?;
    caught_up(&postgres, &truth, Duration::from_secs(30)).await?;
    drop((postgres, server));
    admin
        .batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .await?;
    Ok(())
}
