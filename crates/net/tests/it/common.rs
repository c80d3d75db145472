//! What the tests share: clients for loopback, small devnets, keys, writes.

use std::time::Duration;

use atpdb_devnet::pds::Pds;
use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_net::{Http, HttpConfig, NetError, Xrpc, XrpcConfig};
use atpdb_repo::crypto::PublicKey;
use atpdb_repo::repo::Write;
use atpdb_repo::syntax::Did;

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;
pub(crate) type Error = Box<dyn std::error::Error>;

/// How long any single wait in a test may take before it fails.
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);

/// The guarded client with loopback allowed, as the devnet needs.
pub(crate) fn loopback_http() -> Result<Http, NetError> {
    Http::new(&HttpConfig {
        allow_private_network: true,
        ..HttpConfig::default()
    })
}

/// Settings that keep tests fast: tiny backoffs, short waits.
pub(crate) fn fast_config() -> XrpcConfig {
    XrpcConfig {
        request_timeout: Duration::from_secs(10),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
        max_rate_limit_wait: Duration::from_secs(5),
        ..XrpcConfig::default()
    }
}

pub(crate) fn xrpc(config: XrpcConfig) -> Result<Xrpc, NetError> {
    Ok(Xrpc::new(loopback_http()?, config))
}

/// One PDS, a few small accounts, optionally a relay.
pub(crate) async fn devnet(accounts: usize, with_relay: bool) -> Result<Devnet, Error> {
    Ok(Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts,
        records: 10,
        with_relay,
        ..DevnetConfig::default()
    })
    .await?)
}

/// An account's current `#atproto` key, from the devnet's PLC directory.
pub(crate) fn key_of(devnet: &Devnet, did: &Did) -> Result<PublicKey, Error> {
    let data = devnet
        .plc()
        .data(did)
        .ok_or("DID not in the PLC directory")?;
    let key = data
        .verification_methods
        .get("atproto")
        .ok_or("no atproto key")?;
    Ok(PublicKey::from_did_key(key)?)
}

/// Writes one small record.
pub(crate) fn write_one(pds: &Pds, did: &Did, n: u32) -> TestResult {
    pds.write(
        did,
        &[Write::Create {
            path: format!("com.example.forum.post/3l4z2xq7nq{n:03}"),
            record: atpdb_repo::value::Value::from_json(
                &serde_json::json!({"$type": "com.example.forum.post", "n": n}),
            )?
            .to_cbor(),
        }],
        None,
    )?;
    Ok(())
}
