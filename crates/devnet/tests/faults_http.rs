//! What a client observes from each HTTP and connection fault of `atpdb_devnet::faults`.
//!
//! Each test serves a tiny app through `FaultyListener` and the fault middleware on
//! 127.0.0.1, port 0, switches faults at runtime and checks the client's view with reqwest.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use atpdb_devnet::faults::{self, FaultSet, Faults, FaultyListener, RateLimit, SlowDrip};
use axum::Router;
use axum::body::Body;
use axum::http::header;
use axum::routing::get;
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const REPO_LEN: usize = 64 * 1024;
const LATEST: &str = "/xrpc/com.atproto.sync.getLatestCommit";
const REPO: &str = "/xrpc/com.atproto.sync.getRepo";
const STREAM: &str = "/xrpc/com.atproto.sync.listBlobs";

/// One faulty host and a pooling client, as a sync engine would hold.
struct Host {
    addr: SocketAddr,
    faults: Faults,
    client: reqwest::Client,
}

impl Host {
    async fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let faults = Faults::default();
        let app = Router::new()
            .route(
                LATEST,
                get(|| async { axum::Json(json!({"cid": "bafyreib", "rev": "3l3qo2vuowo2b"})) }),
            )
            .route(
                REPO,
                get(|| async {
                    (
                        [(header::CONTENT_TYPE, "application/vnd.ipld.car")],
                        repo_body(),
                    )
                }),
            )
            .route(
                STREAM,
                get(|| async {
                    // Length unknown up front, like a CAR streamed out of the store.
                    let chunks = repo_body()
                        .chunks(4096)
                        .map(|chunk| Ok::<_, std::io::Error>(chunk.to_vec()))
                        .collect::<Vec<_>>();
                    Body::from_stream(futures_util::stream::iter(chunks))
                }),
            )
            .merge(faults::admin_router(faults.clone()))
            .layer(axum::middleware::from_fn_with_state(
                faults.clone(),
                faults::middleware,
            ));
        let (listener, addr) = FaultyListener::bind_loopback(faults.clone()).await?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()?;
        Ok(Self {
            addr,
            faults,
            client,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.client.get(self.url(path)).send().await
    }
}

fn repo_body() -> Vec<u8> {
    (0..REPO_LEN).map(|i| (i % 251) as u8).collect()
}

fn header<'r>(response: &'r reqwest::Response, name: &str) -> Option<&'r str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

fn rate_limited(rate_limit: RateLimit) -> FaultSet {
    FaultSet {
        rate_limit: Some(rate_limit),
        ..FaultSet::default()
    }
}

fn status(status: u16) -> FaultSet {
    FaultSet {
        status: Some(status),
        ..FaultSet::default()
    }
}

const RATELIMIT_HEADERS: [&str; 4] = [
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "ratelimit-policy",
];

#[tokio::test]
async fn healthy_host_serves_both_routes() -> TestResult {
    let host = Host::start().await?;
    let latest: Value = host.get(LATEST).await?.error_for_status()?.json().await?;
    assert_eq!(latest["rev"], "3l3qo2vuowo2b");
    let repo = host.get(REPO).await?.error_for_status()?.bytes().await?;
    assert_eq!(repo.as_ref(), repo_body().as_slice());
    Ok(())
}

#[tokio::test]
async fn rate_limit_with_retry_after() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(rate_limited(RateLimit {
        retry_after: Some(7),
        ..RateLimit::default()
    }));
    let response = host.get(LATEST).await?;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "retry-after"), Some("7"));
    for name in RATELIMIT_HEADERS {
        assert_eq!(header(&response, name), None, "unexpected {name}");
    }
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    let body: Value = response.json().await?;
    assert_eq!(body["error"], "RateLimitExceeded");
    assert!(body["message"].is_string(), "{body}");
    Ok(())
}

#[tokio::test]
async fn rate_limit_with_ratelimit_headers() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(rate_limited(RateLimit {
        ratelimit_headers: true,
        ..RateLimit::default()
    }));
    let before = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let response = host.get(REPO).await?;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "ratelimit-limit"), Some("3000"));
    assert_eq!(header(&response, "ratelimit-remaining"), Some("0"));
    assert_eq!(header(&response, "ratelimit-policy"), Some("3000;w=300"));
    assert_eq!(header(&response, "retry-after"), None);
    let reset: u64 = header(&response, "ratelimit-reset")
        .ok_or("no ratelimit-reset")?
        .parse()?;
    let after = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    assert!(
        (before + 300..=after + 300).contains(&reset),
        "ratelimit-reset {reset} is not the end of a 300 s window from {before}..={after}"
    );
    let body: Value = response.json().await?;
    assert_eq!(body["error"], "RateLimitExceeded");
    Ok(())
}

#[tokio::test]
async fn rate_limit_as_proxy_html() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(rate_limited(RateLimit {
        html: true,
        ..RateLimit::default()
    }));
    let response = host.get(REPO).await?;
    assert_eq!(response.status(), 429);
    let content_type = header(&response, "content-type").unwrap_or_default();
    assert!(content_type.starts_with("text/html"), "{content_type:?}");
    for name in RATELIMIT_HEADERS {
        assert_eq!(header(&response, name), None, "unexpected {name}");
    }
    let body = response.text().await?;
    assert!(body.contains("<html>") && body.contains("429"), "{body:?}");
    assert!(
        serde_json::from_str::<Value>(&body).is_err(),
        "HTML body parsed as JSON"
    );
    Ok(())
}

#[tokio::test]
async fn rate_limit_bare() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(rate_limited(RateLimit::default()));
    let response = host.get(LATEST).await?;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "retry-after"), None);
    for name in RATELIMIT_HEADERS {
        assert_eq!(header(&response, name), None, "unexpected {name}");
    }
    Ok(())
}

#[tokio::test]
async fn rate_limit_wins_over_status() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(FaultSet {
        status: Some(500),
        ..rate_limited(RateLimit::default())
    });
    assert_eq!(host.get(LATEST).await?.status(), 429);
    Ok(())
}

#[tokio::test]
async fn server_errors_json_and_proxy_html() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(status(500));
    let response = host.get(LATEST).await?;
    assert_eq!(response.status(), 500);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    let body: Value = response.json().await?;
    assert_eq!(body["error"], "InternalServerError");

    for code in [502u16, 503, 504] {
        host.faults.set(status(code));
        let response = host.get(REPO).await?;
        assert_eq!(response.status(), code);
        let content_type = header(&response, "content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("text/html"),
            "{code}: {content_type:?}"
        );
        let body = response.text().await?;
        assert!(body.contains(&code.to_string()), "{code}: {body:?}");
    }
    Ok(())
}

#[tokio::test]
async fn latency_delays_the_response() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(FaultSet {
        latency_ms: Some(300),
        ..FaultSet::default()
    });
    let started = Instant::now();
    let latest: Value = host.get(LATEST).await?.error_for_status()?.json().await?;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300),
        "answered after {elapsed:?}"
    );
    assert_eq!(latest["rev"], "3l3qo2vuowo2b");
    Ok(())
}

#[tokio::test]
async fn slow_drip_trickles_the_body() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(FaultSet {
        slow_drip: Some(SlowDrip {
            chunk_bytes: 16 * 1024,
            interval_ms: 100,
        }),
        ..FaultSet::default()
    });
    let started = Instant::now();
    let mut response = host.get(REPO).await?.error_for_status()?;
    assert_eq!(response.content_length(), Some(REPO_LEN as u64));
    let mut body = Vec::new();
    let mut n_chunks = 0;
    while let Some(chunk) = response.chunk().await? {
        n_chunks += 1;
        body.extend_from_slice(&chunk);
    }
    let elapsed = started.elapsed();
    // 4 chunks of 16 KiB with 100 ms before each but the first.
    assert!(
        elapsed >= Duration::from_millis(300),
        "body done after {elapsed:?}"
    );
    assert!(n_chunks >= 4, "body arrived in {n_chunks} chunks");
    assert_eq!(body, repo_body());
    Ok(())
}

#[tokio::test]
async fn truncated_body_fails_the_read() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(FaultSet {
        truncate_after: Some(1000),
        ..FaultSet::default()
    });
    // REPO has a known length; STREAM is buffered by the fault to learn it.
    for path in [REPO, STREAM] {
        let mut response = host.get(path).await?;
        assert_eq!(response.status(), 200);
        assert_eq!(response.content_length(), Some(REPO_LEN as u64), "{path}");
        let mut n_received = 0;
        let outcome = loop {
            match response.chunk().await {
                Ok(Some(chunk)) => n_received += chunk.len(),
                Ok(None) => break Ok(()),
                Err(err) => break Err(err),
            }
        };
        let err = outcome.err().ok_or(format!("{path}: whole body read"))?;
        assert!(err.is_body() || err.is_decode(), "{path}: {err:?}");
        assert_eq!(n_received, 1000, "{path}");
    }
    Ok(())
}

#[tokio::test]
async fn truncate_after_longer_than_body_sends_it_whole() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(FaultSet {
        truncate_after: Some(REPO_LEN as u64),
        ..FaultSet::default()
    });
    let repo = host.get(REPO).await?.error_for_status()?.bytes().await?;
    assert_eq!(repo.len(), REPO_LEN);
    Ok(())
}

#[tokio::test]
async fn reset_kills_new_and_pooled_connections_until_switched_off() -> TestResult {
    let host = Host::start().await?;
    // A successful request leaves a kept-alive connection in the client's pool.
    host.get(LATEST).await?.error_for_status()?;

    host.faults.set(FaultSet {
        reset: true,
        ..FaultSet::default()
    });
    let pooled = host.get(LATEST).await;
    let err = pooled
        .err()
        .ok_or("request on a pooled connection succeeded")?;
    assert!(!err.is_timeout() && !err.is_status(), "{err:?}");

    let fresh_client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?;
    let fresh = fresh_client.get(host.url(LATEST)).send().await;
    let err = fresh.err().ok_or("request on a new connection succeeded")?;
    assert!(!err.is_timeout() && !err.is_status(), "{err:?}");

    host.faults.set(FaultSet::default());
    host.get(LATEST).await?.error_for_status()?;
    fresh_client
        .get(host.url(REPO))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

#[tokio::test]
async fn paths_scope_the_http_faults() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(FaultSet {
        status: Some(503),
        paths: vec!["com.atproto.sync.getRepo".to_owned()],
        ..FaultSet::default()
    });
    assert_eq!(host.get(REPO).await?.status(), 503);
    assert_eq!(host.get(LATEST).await?.status(), 200);
    assert_eq!(host.get(STREAM).await?.status(), 200);
    Ok(())
}

#[tokio::test]
async fn times_faults_the_next_n_then_heals() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(FaultSet {
        status: Some(500),
        paths: vec!["getRepo".to_owned()],
        times: Some(2),
        ..FaultSet::default()
    });
    // A request outside `paths` does not consume one.
    assert_eq!(host.get(LATEST).await?.status(), 200);
    assert_eq!(host.get(REPO).await?.status(), 500);
    assert_eq!(host.get(REPO).await?.status(), 500);
    assert_eq!(host.get(REPO).await?.status(), 200);
    let after = host.faults.get();
    assert_eq!(after.status, None);
    assert_eq!(after.times, None);
    Ok(())
}

#[tokio::test]
async fn times_is_consumed_once_per_request_under_concurrency() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(FaultSet {
        status: Some(503),
        times: Some(5),
        ..FaultSet::default()
    });
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..20 {
        requests.spawn(host.client.get(host.url(LATEST)).send());
    }
    let mut n_faulted = 0;
    while let Some(response) = requests.join_next().await {
        if response??.status() == 503 {
            n_faulted += 1;
        }
    }
    assert_eq!(n_faulted, 5);
    Ok(())
}

#[tokio::test]
async fn admin_round_trip() -> TestResult {
    let host = Host::start().await?;
    let url = host.url("/admin/faults");
    let initial: FaultSet = host
        .client
        .get(&url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(initial, FaultSet::default());

    let wanted = FaultSet {
        rate_limit: Some(RateLimit {
            retry_after: Some(10),
            ratelimit_headers: true,
            html: false,
        }),
        paths: vec!["getRepo".to_owned()],
        times: Some(3),
        corrupt_blocks: true,
        ..FaultSet::default()
    };
    let posted = host.client.post(&url).json(&wanted).send().await?;
    assert_eq!(posted.status(), 200);
    assert_eq!(posted.json::<FaultSet>().await?, wanted);
    let read_back: FaultSet = host.client.get(&url).send().await?.json().await?;
    assert_eq!(read_back, wanted);
    assert_eq!(host.faults.get(), wanted);
    assert!(host.faults.event_flags().corrupt_blocks);
    assert_eq!(
        host.get(REPO).await?.status(),
        429,
        "posted faults are live"
    );

    // Omitted fields are off, so `{}` heals the host.
    let healed = host.client.post(&url).json(&json!({})).send().await?;
    assert_eq!(healed.status(), 200);
    assert_eq!(host.faults.get(), FaultSet::default());
    assert!(!host.faults.event_flags().any());

    host.faults.set(wanted);
    let cleared = host.client.delete(&url).send().await?;
    assert_eq!(cleared.status(), 200);
    assert_eq!(host.faults.get(), FaultSet::default());
    Ok(())
}

#[tokio::test]
async fn admin_refuses_bad_fault_sets_with_400() -> TestResult {
    let host = Host::start().await?;
    let url = host.url("/admin/faults");
    let kept = FaultSet {
        latency_ms: Some(1),
        ..FaultSet::default()
    };
    host.faults.set(kept.clone());
    let cases: [(&str, &str); 6] = [
        (r#"{"rate_limt": {}}"#, "rate_limt"),
        (r#"{"rate_limit": {"retry_afterr": 1}}"#, "retry_afterr"),
        (r#"{"times": "twice"}"#, "invalid type"),
        (r#"{"status": 200}"#, "status 200"),
        (r#"{"times": 0}"#, "times is 0"),
        ("{not json", "key must be a string"),
    ];
    for (body, expected) in cases {
        let response = host
            .client
            .post(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await?;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await?;
        assert_eq!(error["error"], "InvalidFaultSet", "{body}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{body}: message {message:?}");
    }
    assert_eq!(host.faults.get(), kept, "a refused POST changed the faults");
    Ok(())
}

#[tokio::test]
async fn admin_paths_are_never_faulted() -> TestResult {
    let host = Host::start().await?;
    host.faults.set(FaultSet {
        status: Some(503),
        latency_ms: Some(5_000),
        truncate_after: Some(0),
        paths: vec!["/".to_owned(), "admin".to_owned()],
        times: Some(1),
        ..FaultSet::default()
    });
    let url = host.url("/admin/faults");
    let started = Instant::now();
    let read: FaultSet = host
        .client
        .get(&url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "admin request was delayed"
    );
    assert_eq!(read.times, Some(1), "an admin request consumed `times`");
    let healed = host.client.post(&url).json(&json!({})).send().await?;
    assert_eq!(healed.status(), 200);
    assert_eq!(host.get(LATEST).await?.status(), 200);
    Ok(())
}
