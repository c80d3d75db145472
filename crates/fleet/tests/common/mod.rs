//! What the fleet's tests share: Redis under a fresh key prefix (or "did not run"), and the
//! clients a stage needs to reach a devnet.

use std::time::Duration;

use atpdb_devnet::Devnet;
use atpdb_fleet::{ConnectionManager, redis};
use atpdb_identity::{IdentityConfig, Resolver};
use atpdb_net::{Http, HttpConfig, Xrpc, XrpcConfig};

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Redis for this test, under a fresh prefix; `None` (said) when there is none here.
pub(crate) async fn redis(test: &str) -> Option<(ConnectionManager, String)> {
    let url = std::env::var("ATPDB_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let connected = tokio::time::timeout(Duration::from_secs(5), atpdb_fleet::connect(&url)).await;
    match connected {
        Ok(Ok(redis)) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_nanos());
            Some((
                redis,
                format!("atpdb-test:{test}:{}:{nanos}:", std::process::id()),
            ))
        }
        failed => {
            let message = format!("{test} did not run: no Redis at {url} ({failed:?})");
            assert!(
                std::env::var("ATPDB_REQUIRE_REDIS").as_deref() != Ok("1"),
                "{message} (ATPDB_REQUIRE_REDIS=1 requires it)"
            );
            println!("{message}");
            None
        }
    }
}

pub(crate) async fn clean(redis: &mut ConnectionManager, prefix: &str) -> TestResult {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(redis)
        .await?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query_async(redis).await?;
    }
    Ok(())
}

/// An HTTP client that may reach the devnet on loopback.
pub(crate) fn http() -> Result<Http, Box<dyn std::error::Error>> {
    Ok(Http::new(&HttpConfig {
        allow_private_network: true,
        ..HttpConfig::default()
    })?)
}

pub(crate) fn clients(devnet: &Devnet) -> Result<(Xrpc, Resolver), Box<dyn std::error::Error>> {
    let http = http()?;
    let identity = Resolver::new(
        IdentityConfig {
            plc_url: devnet.plc_url().to_owned(),
            dns_nameserver: Some(devnet.dns_addr()),
            ..IdentityConfig::default()
        },
        http.clone(),
    )?;
    let xrpc = Xrpc::new(
        http,
        XrpcConfig {
            backoff_base: Duration::from_millis(20),
            ..XrpcConfig::default()
        },
    );
    Ok((xrpc, identity))
}
