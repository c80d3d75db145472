//! did:plc against a real devnet: its PLC directory and a PDS changing accounts through the
//! admin API (key rotation, handle change, deletion), and its PLC faults.

use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_identity::{IdentityError, Resolver};
use atpdb_repo::crypto::PublicKey;
use atpdb_repo::syntax::Did;
use serde_json::json;

use crate::support::{Error, TestResult, expect_err, http};

async fn devnet() -> Result<Devnet, Error> {
    Ok(Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 3,
        records: 1,
        with_relay: false,
        ..DevnetConfig::default()
    })
    .await?)
}

fn resolver(devnet: &Devnet) -> Result<Resolver, Error> {
    Ok(Resolver::new(
        atpdb_identity::IdentityConfig {
            plc_url: devnet.plc_url().to_owned(),
            ..atpdb_identity::IdentityConfig::default()
        },
        http(true)?,
    )?)
}

/// The signing key the directory holds now.
fn directory_key(devnet: &Devnet, did: &Did) -> Result<PublicKey, Error> {
    let data = devnet.plc().data(did).ok_or("no PLC data")?;
    Ok(PublicKey::from_did_key(
        data.signing_key().ok_or("no key")?,
    )?)
}

/// `POST /admin/accounts/{did}/{action}` on the account's PDS.
async fn admin(devnet: &Devnet, did: &Did, action: &str, body: serde_json::Value) -> TestResult {
    let pds = devnet.hosts().first().ok_or("no PDS")?.url();
    let response = http(true)?
        .client()
        .post(format!("{pds}/admin/accounts/{did}/{action}"))
        .basic_auth("admin", Some("admin"))
        .json(&body)
        .send()
        .await?;
    if !response.status().is_success() {
        return Err(format!("admin {action}: {}", response.status()).into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_directory_through_rotation_rename_and_deletion() -> TestResult {
    let devnet = devnet().await?;
    let resolver = resolver(&devnet)?;
    let pds = devnet.hosts().first().ok_or("no PDS")?.url().to_owned();
    for account in devnet.accounts() {
        let identity = resolver.resolve(&account.did).await?;
        assert_eq!(identity.did, account.did);
        assert_eq!(identity.key, directory_key(&devnet, &account.did)?);
        assert_eq!(identity.pds, pds.trim_end_matches('/'));
        assert_eq!(identity.handle.as_ref(), Some(&account.handle));
    }
    let did = devnet.accounts().first().ok_or("no accounts")?.did.clone();
    let old_key = directory_key(&devnet, &did)?;

    // Key rotation: the cache keeps the old key until refreshed.
    admin(&devnet, &did, "rotate-key", json!({"curve": "p256"})).await?;
    let new_key = directory_key(&devnet, &did)?;
    assert_ne!(old_key, new_key);
    assert_eq!(resolver.resolve(&did).await?.key, old_key, "cached");
    assert_eq!(resolver.refresh(&did).await?.key, new_key, "refreshed");
    assert_eq!(resolver.resolve(&did).await?.key, new_key);

    // Handle change.
    admin(&devnet, &did, "handle", json!({"handle": "renamed.test"})).await?;
    let before = resolver.resolve(&did).await?;
    assert_ne!(
        before.handle.as_ref().map(|h| h.as_str()),
        Some("renamed.test")
    );
    let after = resolver.refresh(&did).await?;
    assert_eq!(
        after.handle.as_ref().map(|h| h.as_str()),
        Some("renamed.test")
    );

    // A directory that fails: refresh keeps the identity it had.
    devnet.plc_faults().set(atpdb_devnet::faults::FaultSet {
        status: Some(503),
        ..Default::default()
    });
    assert_eq!(resolver.refresh(&did).await?.key, new_key);
    devnet.plc_faults().clear();

    // Deletion tombstones the DID: not found, and the old identity is not served.
    admin(&devnet, &did, "delete", json!({})).await?;
    assert_eq!(
        resolver.resolve(&did).await?.key,
        new_key,
        "cached until refreshed"
    );
    expect_err(resolver.refresh(&did).await, "NotFound", |err| {
        matches!(err, IdentityError::NotFound { .. })
    })?;
    expect_err(resolver.resolve(&did).await, "NotFound", |err| {
        matches!(err, IdentityError::NotFound { .. })
    })?;

    // A DID the directory never saw.
    let unknown: Did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".parse()?;
    expect_err(resolver.resolve(&unknown).await, "NotFound", |err| {
        matches!(err, IdentityError::NotFound { .. })
    })?;
    // The other accounts were not disturbed.
    let other = devnet.accounts().get(1).ok_or("no second account")?;
    assert_eq!(
        resolver.resolve(&other.did).await?.handle.as_ref(),
        Some(&other.handle)
    );
    Ok(())
}
