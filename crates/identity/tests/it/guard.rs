//! The SSRF guard: without `allow_private_network`, nothing on loopback is dialled, whoever
//! names it (a did:web, the PLC URL, a handle's host).

use atpdb_identity::{IdentityConfig, IdentityError, Resolver};
use atpdb_net::NetError;

use crate::support::{
    Dns, Reply, Stand, TestResult, config, document, expect_err, http, key, plc_did,
};

fn refused(err: &IdentityError) -> bool {
    matches!(err, IdentityError::Net(NetError::PrivateAddress { .. })) && !err.is_transient()
}

#[tokio::test]
async fn loopback_did_web_hosts_are_refused_before_dialling() -> TestResult {
    let (host, addr) = Stand::start().await?;
    for name in ["127.0.0.1", "localhost"] {
        let did = format!("did:web:{name}%3A{}", addr.port());
        host.set(
            "/.well-known/did.json",
            Reply::Json(document(&did, &key(1), "https://pds.example.com", None)),
        );
        let resolver = Resolver::new(config(addr), http(false)?)?;
        expect_err(
            resolver.resolve(&did.parse()?).await,
            "PrivateAddress",
            refused,
        )?;
        // The same resolver with private networks allowed does reach it: the test can fail.
        let open = Resolver::new(config(addr), http(true)?)?;
        if name == "127.0.0.1" {
            open.resolve(&did.parse()?).await?;
        }
    }
    assert_eq!(host.total_hits(), 1, "only the allowed resolver dialled");
    Ok(())
}

#[tokio::test]
async fn a_loopback_plc_directory_is_refused() -> TestResult {
    let (plc, addr) = Stand::start().await?;
    let did = plc_did(1)?;
    plc.set(
        &format!("/{did}"),
        Reply::Json(document(
            did.as_str(),
            &key(1),
            "https://pds.example.com",
            None,
        )),
    );
    let resolver = Resolver::new(config(addr), http(false)?)?;
    expect_err(resolver.resolve(&did).await, "PrivateAddress", refused)?;
    expect_err(resolver.refresh(&did).await, "PrivateAddress", refused)?;
    assert_eq!(plc.total_hits(), 0);
    Ok(())
}

#[tokio::test]
async fn a_handle_served_from_loopback_is_refused() -> TestResult {
    let (host, addr) = Stand::start().await?;
    let (_dns, dns_addr) = Dns::start().await?;
    host.set(
        "/.well-known/atproto-did",
        Reply::Raw(200, plc_did(1)?.to_string()),
    );
    let resolver = Resolver::new(
        IdentityConfig {
            dns_nameserver: Some(dns_addr),
            handle_well_known_addr: Some(addr),
            ..config(addr)
        },
        http(false)?,
    )?;
    expect_err(
        resolver.resolve_handle(&"alice.test".parse()?).await,
        "PrivateAddress",
        refused,
    )?;
    assert_eq!(host.total_hits(), 0);
    Ok(())
}
