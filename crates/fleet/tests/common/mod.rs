//! What the fleet's tests share: Redis under a fresh key prefix (or "did not run"), and the
//! clients a stage needs to reach a devnet.

use std::time::Duration;

use atpdb_devnet::Devnet;
use atpdb_fleet::{ConnectionManager, redis};
use atpdb_identity::{Network, Resolver};
use atpdb_net::{Xrpc, XrpcConfig};

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

pub(crate) fn clients(devnet: &Devnet) -> Result<(Xrpc, Resolver), Box<dyn std::error::Error>> {
    let mut config = devnet.network_config();
    config.xrpc = XrpcConfig {
        backoff_base: Duration::from_millis(20),
        ..XrpcConfig::default()
    };
    let network = Network::new(config)?;
    Ok((network.xrpc, network.resolver))
}
