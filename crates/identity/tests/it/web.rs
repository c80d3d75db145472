//! did:web against a stand-in host on 127.0.0.1, its port `%3A`-encoded in the DID.

use std::net::SocketAddr;

use atpdb_identity::IdentityError;
use atpdb_repo::syntax::Did;

use crate::support::{Reply, Stand, TestResult, config, document, expect_err, key, resolver};

const DID_JSON: &str = "/.well-known/did.json";

fn web_did(addr: SocketAddr) -> Result<Did, Box<dyn std::error::Error>> {
    Ok(format!("did:web:127.0.0.1%3A{}", addr.port()).parse()?)
}

#[tokio::test]
async fn resolves_from_the_well_known_path() -> TestResult {
    let (host, addr) = Stand::start().await?;
    let did = web_did(addr)?;
    host.set(
        DID_JSON,
        Reply::Json(document(
            did.as_str(),
            &key(7),
            "http://127.0.0.1:2583",
            Some("web.test"),
        )),
    );
    let resolver = resolver(config(addr))?;
    let identity = resolver.resolve(&did).await?;
    assert_eq!(identity.key, key(7));
    assert_eq!(identity.pds, "http://127.0.0.1:2583");
    assert_eq!(
        identity.handle.as_ref().map(|h| h.as_str()),
        Some("web.test")
    );
    resolver.resolve(&did).await?;
    assert_eq!(host.hits(DID_JSON), 1, "cached");
    Ok(())
}

#[tokio::test]
async fn a_document_for_another_did_is_invalid() -> TestResult {
    let (host, addr) = Stand::start().await?;
    let did = web_did(addr)?;
    host.set(
        DID_JSON,
        Reply::Json(document(
            "did:web:example.com",
            &key(7),
            "https://pds.example.com",
            None,
        )),
    );
    let resolver = resolver(config(addr))?;
    let err = expect_err(resolver.resolve(&did).await, "Invalid", |err| {
        matches!(err, IdentityError::Invalid { .. })
    })?;
    assert!(err.to_string().contains("did:web:example.com"), "{err}");
    Ok(())
}

#[tokio::test]
async fn missing_document_is_not_found() -> TestResult {
    let (host, addr) = Stand::start().await?;
    let resolver = resolver(config(addr))?;
    expect_err(resolver.resolve(&web_did(addr)?).await, "NotFound", |err| {
        matches!(err, IdentityError::NotFound { .. })
    })?;
    assert_eq!(host.hits(DID_JSON), 1);
    Ok(())
}

#[tokio::test]
async fn paths_and_odd_encodings_are_unsupported() -> TestResult {
    let (host, addr) = Stand::start().await?;
    let resolver = resolver(config(addr))?;
    for did in [
        format!("did:web:127.0.0.1%3A{}:user:alice", addr.port()),
        "did:web:example.com%2Fpath".to_owned(),
        "did:web:exa_mple.com".to_owned(),
    ] {
        expect_err(
            resolver.resolve(&did.parse()?).await,
            "Unsupported",
            |err| matches!(err, IdentityError::Unsupported { .. }),
        )?;
    }
    assert_eq!(host.total_hits(), 0);
    Ok(())
}
