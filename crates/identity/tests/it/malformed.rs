//! Documents and bodies that must come back `Invalid` (and never panic), served over HTTP.

use std::time::Duration;

use atpdb_identity::{IdentityConfig, IdentityError, MAX_DOCUMENT_BYTES};
use serde_json::{Value, json};

use crate::support::{
    Reply, Stand, TestResult, config, document, expect_err, key, plc_did, resolver,
};

const PDS: &str = "https://pds.example.com";

#[tokio::test]
async fn malformed_documents_are_invalid() -> TestResult {
    let (plc, addr) = Stand::start().await?;
    let resolver = resolver(IdentityConfig {
        timeout: Duration::from_secs(5),
        ..config(addr)
    })?;
    type Edit = fn(&mut Value);
    let edits: [(&str, Edit); 7] = [
        ("no #atproto", |doc| doc["verificationMethod"] = json!([])),
        ("not Multikey", |doc| {
            doc["verificationMethod"][0]["type"] = json!("Ed25519VerificationKey2020");
        }),
        ("bad multibase", |doc| {
            doc["verificationMethod"][0]["publicKeyMultibase"] = json!("z0OIl");
        }),
        ("not base58btc", |doc| {
            doc["verificationMethod"][0]["publicKeyMultibase"] = json!("uAQID");
        }),
        ("ed25519 multikey", |doc| {
            doc["verificationMethod"][0]["publicKeyMultibase"] =
                json!("z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK");
        }),
        ("service missing", |doc| doc["service"] = json!([])),
        ("wrong service type", |doc| {
            doc["service"][0]["type"] = json!("BskyFeedGenerator")
        }),
    ];
    let mut n = 0;
    for (what, edit) in edits {
        n += 1;
        let did = plc_did(n)?;
        let mut doc = document(did.as_str(), &key(1), PDS, None);
        edit(&mut doc);
        plc.set(&format!("/{did}"), Reply::Json(doc));
        let err = expect_err(resolver.resolve(&did).await, what, |err| {
            matches!(err, IdentityError::Invalid { .. }) && !err.is_transient()
        })?;
        assert!(err.to_string().contains(did.as_str()), "{what}: {err}");
    }
    let bodies = [
        ("not JSON", Reply::Raw(200, "<html>hello</html>".to_owned())),
        (
            "JSON but not an object",
            Reply::Raw(200, "[1, 2, 3]".to_owned()),
        ),
        ("empty", Reply::Raw(200, String::new())),
        (
            "truncated JSON",
            Reply::Raw(200, "{\"id\": \"did:plc:".to_owned()),
        ),
        (
            "deeply nested",
            Reply::Raw(200, format!("{}{}", "[".repeat(10_000), "]".repeat(10_000))),
        ),
        (
            "huge, with a length",
            Reply::Raw(200, " ".repeat(MAX_DOCUMENT_BYTES + 1)),
        ),
        ("huge and endless", Reply::Endless),
    ];
    for (what, reply) in bodies {
        n += 1;
        let did = plc_did(n)?;
        plc.set(&format!("/{did}"), reply);
        expect_err(resolver.resolve(&did).await, what, |err| {
            matches!(err, IdentityError::Invalid { .. })
        })?;
    }
    Ok(())
}

#[tokio::test]
async fn a_document_just_under_the_cap_is_read() -> TestResult {
    let (plc, addr) = Stand::start().await?;
    let resolver = resolver(config(addr))?;
    let did = plc_did(1)?;
    let mut doc = document(did.as_str(), &key(1), PDS, None);
    let size = doc.to_string().len();
    doc["padding"] = json!("x".repeat(MAX_DOCUMENT_BYTES - size - 20));
    assert!(doc.to_string().len() <= MAX_DOCUMENT_BYTES);
    plc.set(&format!("/{did}"), Reply::Json(doc));
    assert_eq!(resolver.resolve(&did).await?.key, key(1));
    Ok(())
}
