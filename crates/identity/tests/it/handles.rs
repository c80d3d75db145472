//! Handles: DNS TXT from a loopback responder, `/.well-known/atproto-did` from a loopback
//! host (dialled by address, the handle sent as `Host`), and the bidirectional check.

use std::net::SocketAddr;

use atpdb_identity::{IdentityConfig, IdentityError, Resolver};

use crate::support::{
    Dns, Reply, Stand, TestResult, config, document, expect_err, key, plc_did, resolver,
};

const WELL_KNOWN: &str = "/.well-known/atproto-did";

/// A stand-in serving both the PLC directory and every handle's well-known path, a DNS
/// responder, and a resolver using both.
async fn setup() -> Result<(Stand, Dns, Resolver), Box<dyn std::error::Error>> {
    let (host, addr): (Stand, SocketAddr) = Stand::start().await?;
    let (dns, dns_addr) = Dns::start().await?;
    let resolver = resolver(IdentityConfig {
        dns_nameserver: Some(dns_addr),
        handle_well_known_addr: Some(addr),
        ..config(addr)
    })?;
    Ok((host, dns, resolver))
}

fn is_absent(err: &IdentityError) -> bool {
    matches!(err, IdentityError::Handle { .. }) && !err.is_transient()
}

#[tokio::test]
async fn dns_txt_record() -> TestResult {
    let (host, dns, resolver) = setup().await?;
    let did = plc_did(1)?;
    dns.set_txt(
        "alice.test",
        &["v=spf1 -all", "did=not a did", &format!("did={did}")],
    );
    let handle = "Alice.Test".parse()?;
    assert_eq!(resolver.resolve_handle(&handle).await?, did);
    let queries = dns.queries();
    assert!(queries >= 1);
    assert_eq!(resolver.resolve_handle(&handle).await?, did);
    assert_eq!(dns.queries(), queries, "cached");
    assert_eq!(host.hits(WELL_KNOWN), 0, "HTTPS not asked when DNS answers");
    Ok(())
}

#[tokio::test]
async fn dns_is_preferred_over_https() -> TestResult {
    let (host, dns, resolver) = setup().await?;
    dns.set_txt("both.test", &[&format!("did={}", plc_did(1)?)]);
    host.set_for_host(
        "both.test",
        WELL_KNOWN,
        Reply::Raw(200, plc_did(2)?.to_string()),
    );
    assert_eq!(
        resolver.resolve_handle(&"both.test".parse()?).await?,
        plc_did(1)?
    );
    Ok(())
}

#[tokio::test]
async fn https_well_known() -> TestResult {
    let (host, dns, resolver) = setup().await?;
    let did = plc_did(3)?;
    host.set_for_host(
        "web.test",
        WELL_KNOWN,
        Reply::Raw(200, format!("  {did}\n")),
    );
    host.set_for_host(
        "other.test",
        WELL_KNOWN,
        Reply::Raw(200, plc_did(4)?.to_string()),
    );
    assert_eq!(resolver.resolve_handle(&"web.test".parse()?).await?, did);
    assert_eq!(
        resolver.resolve_handle(&"other.test".parse()?).await?,
        plc_did(4)?
    );
    assert!(dns.queries() >= 2, "DNS was asked first");
    assert_eq!(host.hits(WELL_KNOWN), 2);
    Ok(())
}

#[tokio::test]
async fn unresolvable_handles() -> TestResult {
    let (host, dns, resolver) = setup().await?;
    // Nowhere: not found, and cached.
    let nowhere = "nowhere.test".parse()?;
    expect_err(resolver.resolve_handle(&nowhere).await, "Handle", is_absent)?;
    let (queries, hits) = (dns.queries(), host.hits(WELL_KNOWN));
    expect_err(resolver.resolve_handle(&nowhere).await, "Handle", is_absent)?;
    assert_eq!(
        (dns.queries(), host.hits(WELL_KNOWN)),
        (queries, hits),
        "miss cached"
    );

    // Two DIDs in DNS, nothing over HTTPS.
    dns.set_txt(
        "split.test",
        &[
            &format!("did={}", plc_did(1)?),
            &format!("did={}", plc_did(2)?),
        ],
    );
    let err = expect_err(
        resolver.resolve_handle(&"split.test".parse()?).await,
        "Handle",
        is_absent,
    )?;
    assert!(err.to_string().contains("2 different DIDs"), "{err}");

    // A body that is not a DID.
    host.set_for_host(
        "junk.test",
        WELL_KNOWN,
        Reply::Raw(200, "<html>hi</html>".to_owned()),
    );
    expect_err(
        resolver.resolve_handle(&"junk.test".parse()?).await,
        "Handle",
        is_absent,
    )?;

    // A server error is "could not find out".
    host.set_for_host("down.test", WELL_KNOWN, Reply::Raw(503, "down".to_owned()));
    expect_err(
        resolver.resolve_handle(&"down.test".parse()?).await,
        "HandleUnreachable",
        |err| matches!(err, IdentityError::HandleUnreachable { .. }) && err.is_transient(),
    )?;

    // Reserved TLDs are never asked about.
    let (queries, hits) = (dns.queries(), host.hits(WELL_KNOWN));
    for reserved in ["laptop.local", "handle.invalid", "alice.onion"] {
        expect_err(
            resolver.resolve_handle(&reserved.parse()?).await,
            "Handle",
            is_absent,
        )?;
    }
    assert_eq!((dns.queries(), host.hits(WELL_KNOWN)), (queries, hits));
    Ok(())
}

#[tokio::test]
async fn verified_handle_checks_both_directions() -> TestResult {
    let (host, dns, resolver) = setup().await?;
    let pds = "https://pds.example.com";
    let claims = [
        (plc_did(1)?, Some("alice.test")),   // DNS points back: verified
        (plc_did(2)?, Some("bob.test")),     // DNS points at another DID
        (plc_did(3)?, Some("carol.test")),   // HTTPS points back: verified
        (plc_did(4)?, Some("nowhere.test")), // does not resolve
        (plc_did(5)?, None),                 // claims nothing
    ];
    for (did, handle) in &claims {
        host.set(
            &format!("/{did}"),
            Reply::Json(document(did.as_str(), &key(1), pds, *handle)),
        );
    }
    dns.set_txt("alice.test", &[&format!("did={}", plc_did(1)?)]);
    dns.set_txt("bob.test", &[&format!("did={}", plc_did(9)?)]);
    host.set_for_host(
        "carol.test",
        WELL_KNOWN,
        Reply::Raw(200, plc_did(3)?.to_string()),
    );
    let mut verified = Vec::new();
    for (did, _) in &claims {
        let identity = resolver.resolve(did).await?;
        verified.push(
            resolver
                .verified_handle(&identity)
                .await
                .map(|handle| handle.to_string()),
        );
    }
    assert_eq!(
        verified,
        [
            Some("alice.test".to_owned()),
            None,
            Some("carol.test".to_owned()),
            None,
            None
        ]
    );
    Ok(())
}

#[tokio::test]
async fn refresh_rechecks_the_handle() -> TestResult {
    let (host, dns, resolver) = setup().await?;
    let did = plc_did(1)?;
    host.set(
        &format!("/{did}"),
        Reply::Json(document(
            did.as_str(),
            &key(1),
            "https://pds.example.com",
            Some("moving.test"),
        )),
    );
    dns.set_txt("moving.test", &[&format!("did={}", plc_did(2)?)]);
    let identity = resolver.resolve(&did).await?;
    assert_eq!(resolver.verified_handle(&identity).await, None);
    // The handle's owner fixes DNS and the account announces it (#identity → refresh).
    dns.set_txt("moving.test", &[&format!("did={did}")]);
    let identity = resolver.refresh(&did).await?;
    assert_eq!(
        resolver
            .verified_handle(&identity)
            .await
            .map(|h| h.to_string()),
        Some("moving.test".to_owned())
    );
    Ok(())
}
