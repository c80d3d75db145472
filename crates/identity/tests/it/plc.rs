//! did:plc against a stand-in directory that counts requests: caching, expiry, the bound,
//! shared lookups, and how statuses map to errors.

use std::sync::Arc;
use std::time::Duration;

use atpdb_identity::{IdentityConfig, IdentityError};

use crate::support::{
    Reply, Stand, TestResult, config, document, expect_err, key, plc_did, resolver,
};

const PDS: &str = "https://pds.example.com";

#[tokio::test]
async fn resolves_and_caches_a_hit() -> TestResult {
    let (plc, addr) = Stand::start().await?;
    let did = plc_did(1)?;
    let path = format!("/{did}");
    plc.set(
        &path,
        Reply::Json(document(
            did.as_str(),
            &key(1),
            "https://pds.example.com/",
            Some("alice.test"),
        )),
    );
    let resolver = resolver(config(addr))?;
    let identity = resolver.resolve(&did).await?;
    assert_eq!(identity.did, did);
    assert_eq!(identity.key, key(1));
    assert_eq!(identity.pds, PDS, "trailing slash trimmed");
    assert_eq!(
        identity.handle.as_ref().map(|h| h.as_str()),
        Some("alice.test")
    );
    assert_eq!(identity.document["id"], did.as_str());
    let again = resolver.resolve(&did).await?;
    assert!(
        Arc::ptr_eq(&identity, &again),
        "the cached identity is shared"
    );
    assert_eq!(plc.hits(&path), 1);
    Ok(())
}

#[tokio::test]
async fn unknown_did_is_not_found_and_the_miss_is_cached() -> TestResult {
    let (plc, addr) = Stand::start().await?;
    let did = plc_did(2)?;
    let path = format!("/{did}");
    let resolver = resolver(config(addr))?;
    for _ in 0..3 {
        let err = expect_err(resolver.resolve(&did).await, "NotFound", |err| {
            matches!(err, IdentityError::NotFound { .. })
        })?;
        assert!(!err.is_transient());
    }
    assert_eq!(plc.hits(&path), 1, "the miss was cached");
    // 410 (a tombstone in some directories) is not found too.
    let gone = plc_did(3)?;
    plc.set(
        &format!("/{gone}"),
        Reply::Raw(410, "tombstoned".to_owned()),
    );
    expect_err(resolver.resolve(&gone).await, "NotFound", |err| {
        matches!(err, IdentityError::NotFound { .. })
    })?;
    Ok(())
}

#[tokio::test]
async fn hits_and_misses_expire() -> TestResult {
    let (plc, addr) = Stand::start().await?;
    // The "expired" checks are certain (they sleep past the TTL); the "still live" ones
    // have over a second of slack for a loaded machine.
    let resolver = resolver(IdentityConfig {
        hit_ttl: Duration::from_millis(1500),
        miss_ttl: Duration::from_millis(100),
        ..config(addr)
    })?;
    let (found, missing) = (plc_did(1)?, plc_did(2)?);
    plc.set(
        &format!("/{found}"),
        Reply::Json(document(found.as_str(), &key(1), PDS, None)),
    );
    resolver.resolve(&found).await?;
    assert!(resolver.resolve(&missing).await.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    resolver.resolve(&found).await?;
    assert!(resolver.resolve(&missing).await.is_err());
    assert_eq!(plc.hits(&format!("/{found}")), 1, "hit still live");
    assert_eq!(plc.hits(&format!("/{missing}")), 2, "miss expired");
    tokio::time::sleep(Duration::from_millis(1400)).await;
    resolver.resolve(&found).await?;
    assert_eq!(plc.hits(&format!("/{found}")), 2, "hit expired");
    Ok(())
}

#[tokio::test]
async fn the_cache_is_bounded() -> TestResult {
    let (plc, addr) = Stand::start().await?;
    let resolver = resolver(IdentityConfig {
        capacity: 3,
        ..config(addr)
    })?;
    for n in 0..6 {
        let did = plc_did(n)?;
        plc.set(
            &format!("/{did}"),
            Reply::Json(document(did.as_str(), &key(1), PDS, None)),
        );
        resolver.resolve(&did).await?;
        assert!(
            resolver.cache_len() <= 3,
            "{} entries",
            resolver.cache_len()
        );
    }
    assert_eq!(resolver.cache_len(), 3);
    // The newest are kept, the oldest asked again.
    resolver.resolve(&plc_did(5)?).await?;
    assert_eq!(plc.hits(&format!("/{}", plc_did(5)?)), 1);
    resolver.resolve(&plc_did(0)?).await?;
    assert_eq!(plc.hits(&format!("/{}", plc_did(0)?)), 2);
    Ok(())
}

#[tokio::test]
async fn concurrent_lookups_share_one_request() -> TestResult {
    let (plc, addr) = Stand::start().await?;
    let did = plc_did(1)?;
    let path = format!("/{did}");
    plc.set(
        &path,
        Reply::Slow(
            Duration::from_millis(300),
            Box::new(Reply::Json(document(did.as_str(), &key(1), PDS, None))),
        ),
    );
    let resolver = resolver(config(addr))?;
    let lookups: Vec<_> = (0..8)
        .map(|_| {
            let (resolver, did) = (resolver.clone(), did.clone());
            tokio::spawn(async move { resolver.resolve(&did).await })
        })
        .collect();
    for lookup in lookups {
        assert_eq!(lookup.await??.key, key(1));
    }
    assert_eq!(plc.hits(&path), 1);
    Ok(())
}

#[tokio::test]
async fn refresh_asks_again_and_falls_back_when_the_directory_fails() -> TestResult {
    let (plc, addr) = Stand::start().await?;
    let did = plc_did(1)?;
    let path = format!("/{did}");
    plc.set(
        &path,
        Reply::Json(document(did.as_str(), &key(1), PDS, None)),
    );
    let resolver = resolver(config(addr))?;
    assert_eq!(resolver.resolve(&did).await?.key, key(1));

    plc.set(
        &path,
        Reply::Json(document(did.as_str(), &key(2), PDS, None)),
    );
    assert_eq!(resolver.resolve(&did).await?.key, key(1), "cached");
    assert_eq!(resolver.refresh(&did).await?.key, key(2), "refreshed");
    assert_eq!(resolver.resolve(&did).await?.key, key(2), "and cached");
    assert_eq!(plc.hits(&path), 2);

    // A directory that fails: the last good identity, not an error.
    plc.set(&path, Reply::Raw(503, "<html>down</html>".to_owned()));
    assert_eq!(resolver.refresh(&did).await?.key, key(2));
    assert_eq!(plc.hits(&path), 3, "it did ask");
    // A purge then a resolve behaves the same.
    resolver.purge(&did);
    assert_eq!(resolver.resolve(&did).await?.key, key(2));
    assert_eq!(plc.hits(&path), 4);

    // A definitive answer is not papered over.
    plc.set(&path, Reply::Raw(404, "DID not available".to_owned()));
    expect_err(resolver.refresh(&did).await, "NotFound", |err| {
        matches!(err, IdentityError::NotFound { .. })
    })?;
    plc.set(&path, Reply::Raw(500, "oops".to_owned()));
    let err = expect_err(resolver.refresh(&did).await, "Unreachable", |err| {
        matches!(err, IdentityError::Unreachable { .. })
    })?;
    assert!(err.is_transient());
    Ok(())
}

#[tokio::test]
async fn a_purge_during_a_lookup_keeps_the_stale_answer_out() -> TestResult {
    let (plc, addr) = Stand::start().await?;
    let did = plc_did(1)?;
    let path = format!("/{did}");
    plc.set(
        &path,
        Reply::Slow(
            Duration::from_millis(1000),
            Box::new(Reply::Json(document(did.as_str(), &key(1), PDS, None))),
        ),
    );
    let resolver = resolver(config(addr))?;
    let slow = {
        let (resolver, did) = (resolver.clone(), did.clone());
        tokio::spawn(async move { resolver.resolve(&did).await })
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while plc.hits(&path) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    // The key rotates while the first lookup is on the wire; an #identity event purges.
    plc.set(
        &path,
        Reply::Json(document(did.as_str(), &key(2), PDS, None)),
    );
    resolver.purge(&did);
    assert_eq!(slow.await??.key, key(1), "the caller still gets its answer");
    assert_eq!(
        resolver.resolve(&did).await?.key,
        key(2),
        "but it was not cached"
    );
    Ok(())
}

#[tokio::test]
async fn statuses_and_timeouts_map_to_errors() -> TestResult {
    let (plc, addr) = Stand::start().await?;
    let resolver = resolver(IdentityConfig {
        timeout: Duration::from_secs(1),
        ..config(addr)
    })?;
    let cases = [
        (Reply::Raw(500, "oops".to_owned()), true),
        (Reply::Raw(502, "<html>bad gateway</html>".to_owned()), true),
        (Reply::Raw(429, "slow down".to_owned()), true),
        (
            Reply::Slow(
                Duration::from_secs(5),
                Box::new(Reply::Raw(200, "{}".to_owned())),
            ),
            true,
        ),
        (Reply::Raw(400, "bad DID".to_owned()), false),
        (Reply::Raw(501, "not implemented".to_owned()), false),
    ];
    for (n, (reply, transient)) in cases.into_iter().enumerate() {
        let did = plc_did(n)?;
        plc.set(&format!("/{did}"), reply.clone());
        let answer = resolver.resolve(&did).await;
        if transient {
            expect_err(answer, "Unreachable", |err| {
                matches!(err, IdentityError::Unreachable { .. }) && err.is_transient()
            })?;
        } else {
            expect_err(answer, "Invalid", |err| {
                matches!(err, IdentityError::Invalid { .. }) && !err.is_transient()
            })?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn other_methods_are_unsupported_and_bad_plc_ids_invalid() -> TestResult {
    let (plc, addr) = Stand::start().await?;
    let resolver = resolver(config(addr))?;
    for did in [
        "did:key:zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF",
        "did:example:123",
    ] {
        expect_err(
            resolver.resolve(&did.parse()?).await,
            "Unsupported",
            |err| matches!(err, IdentityError::Unsupported { .. }),
        )?;
    }
    expect_err(
        resolver.resolve(&"did:plc:..%2F..%2Fadmin".parse()?).await,
        "Invalid",
        |err| matches!(err, IdentityError::Invalid { .. }),
    )?;
    assert_eq!(plc.total_hits(), 0, "nothing was asked");
    Ok(())
}
