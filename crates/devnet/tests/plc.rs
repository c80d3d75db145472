//! The PLC directory over HTTP: derivation, documents, updates, recovery, refusals, export.
//!
//! Every test serves the real router on 127.0.0.1, port 0, and reads it back with reqwest,
//! the way atpdb resolves identities. Real-network operation logs pin the derivation of DIDs
//! and CIDs, signature checks and nullification against what plc.directory accepted.

use std::str::FromStr;
use std::time::Duration;

use atpdb_devnet::plc::{
    Plc, PlcData, PlcService, genesis_did, operation_cid, signed_operation, signed_tombstone,
};
use atpdb_repo::Cid;
use atpdb_repo::crypto::{Curve, Keypair, PublicKey};
use atpdb_repo::sample::sample_keypair;
use atpdb_repo::syntax::{Did, Handle};
use atpdb_repo::value::Value;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A served directory and a client for it.
struct Server {
    plc: Plc,
    base: String,
    client: reqwest::Client,
}

impl Server {
    async fn start() -> Result<Server, Box<dyn std::error::Error>> {
        let plc = Plc::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let router = plc.router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Ok(Server {
            plc,
            base,
            client: reqwest::Client::new(),
        })
    }

    /// GET a path; the status and the body as JSON (`null` when it is not JSON).
    async fn get(&self, path: &str) -> Result<(StatusCode, Json), Box<dyn std::error::Error>> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Json::Null)))
    }

    /// POST an operation to `/{did}`; the status and the error message, if any.
    async fn post(
        &self,
        did: &str,
        op: &Json,
    ) -> Result<(StatusCode, String), Box<dyn std::error::Error>> {
        self.post_raw(did, op.to_string()).await
    }

    async fn post_raw(
        &self,
        did: &str,
        body: String,
    ) -> Result<(StatusCode, String), Box<dyn std::error::Error>> {
        let response = self
            .client
            .post(format!("{}/{did}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let body: Json = serde_json::from_str(&response.text().await?).unwrap_or(Json::Null);
        let message = body["message"].as_str().unwrap_or_default().to_owned();
        Ok((status, message))
    }

    async fn export(&self, query: &str) -> Result<Vec<Json>, Box<dyn std::error::Error>> {
        let response = self
            .client
            .get(format!("{}/export{query}", self.base))
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::OK, "export{query}");
        assert_eq!(
            response.headers()["content-type"],
            "application/jsonlines",
            "export{query}"
        );
        let text = response.text().await?;
        Ok(text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?)
    }
}

fn key(seed: u64) -> Keypair {
    sample_keypair(seed, Curve::K256)
}

fn handle(text: &str) -> Result<Handle, Box<dyn std::error::Error>> {
    Ok(Handle::from_str(text)?)
}

/// `did:plc:` and 24 characters of lowercase RFC 4648 base32 of the SHA-256 of the DAG-CBOR
/// of the signed genesis operation, computed here independently of the directory.
fn derive_did(genesis: &Json) -> Result<String, Box<dyn std::error::Error>> {
    let cbor = Value::from_json(genesis)?.to_cbor();
    let digest = Sha256::digest(&cbor);
    let mut bits = String::new();
    for byte in digest {
        bits.push_str(&format!("{byte:08b}"));
    }
    let alphabet = b"abcdefghijklmnopqrstuvwxyz234567";
    let identifier: String = bits
        .as_bytes()
        .chunks(5)
        .take(24)
        .map(|chunk| {
            let index = chunk
                .iter()
                .fold(0usize, |acc, bit| acc * 2 + usize::from(*bit == b'1'));
            char::from(alphabet[index])
        })
        .collect();
    Ok(format!("did:plc:{identifier}"))
}

fn audit_cids(audit: &Json) -> Vec<(String, bool)> {
    audit
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|entry| {
                    (
                        entry["cid"].as_str().unwrap_or_default().to_owned(),
                        entry["nullified"].as_bool().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn genesis_did_is_the_truncated_base32_sha256_of_the_signed_op() -> TestResult {
    let server = Server::start().await?;
    let rotation_key = key(1);
    let signing_key = key(2).public();
    let did = server.plc.register(
        &rotation_key,
        &signing_key,
        &handle("alice.test")?,
        "http://127.0.0.1:2583",
    )?;

    let (status, log) = server.get(&format!("/{did}/log")).await?;
    assert_eq!(status, StatusCode::OK);
    let genesis = &log[0];
    assert_eq!(derive_did(genesis)?, did.as_str());
    assert_eq!(genesis_did(genesis)?, did);

    // The signature covers the DAG-CBOR of the operation without `sig`, made by the only
    // rotation key.
    let mut unsigned = genesis.clone();
    let sig = unsigned
        .as_object_mut()
        .and_then(|fields| fields.remove("sig"))
        .ok_or("genesis op has no sig")?;
    let sig = URL_SAFE_NO_PAD.decode(sig.as_str().ok_or("sig is not a string")?)?;
    rotation_key
        .public()
        .verify(&Value::from_json(&unsigned)?.to_cbor(), &sig)?;
    assert_eq!(genesis["prev"], Json::Null);
    assert_eq!(genesis["type"], "plc_operation");
    assert_eq!(
        genesis["rotationKeys"],
        json!([rotation_key.public().to_did_key()])
    );

    // The audit log names it by the CID of its DAG-CBOR.
    let (_, audit) = server.get(&format!("/{did}/log/audit")).await?;
    let cid = Cid::dag_cbor(&Value::from_json(genesis)?.to_cbor());
    assert_eq!(audit[0]["cid"], cid.to_string());
    assert_eq!(operation_cid(genesis)?, cid);
    assert_eq!(audit[0]["did"], did.as_str());
    let created_at = audit[0]["createdAt"].as_str().unwrap_or_default();
    assert!(
        created_at.len() == 24 && created_at.ends_with('Z') && created_at.as_bytes()[19] == b'.',
        "createdAt {created_at:?} is not RFC 3339 with milliseconds"
    );
    Ok(())
}

/// Audit logs from plc.directory, as kept in did-method-plc/go-didplc `testdata/` (commit
/// e00ab887): bsky.app's identity, a legacy `create` genesis, and a nullified tombstone.
const BSKY_APP_LOG: &str = r#"[
{"did":"did:plc:z72i7hdynmk6r22z27h6tvur","operation":{"sig":"9NuYV7AqwHVTc0YuWzNV3CJafsSZWH7qCxHRUIP2xWlB-YexXC1OaYAnUayiCXLVzRQ8WBXIqF-SvZdNalwcjA","prev":null,"type":"plc_operation","services":{"atproto_pds":{"type":"AtprotoPersonalDataServer","endpoint":"https://bsky.social"}},"alsoKnownAs":["at://bluesky-team.bsky.social"],"rotationKeys":["did:key:zQ3shhCGUqDKjStzuDxPkTxN6ujddP4RkEKJJouJGRRkaLGbg","did:key:zQ3shpKnbdPx3g3CmPf5cRVTPe1HtSwVn5ish3wSnDPQCbLJK"],"verificationMethods":{"atproto":"did:key:zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"}},"cid":"bafyreigp6shzy6dlcxuowwoxz7u5nemdrkad2my5zwzpwilcnhih7bw6zm","nullified":false,"createdAt":"2023-04-12T04:53:57.057Z"},
{"did":"did:plc:z72i7hdynmk6r22z27h6tvur","operation":{"sig":"1mEWzRtFOgeRXH-YCSPTxb990JOXxa__n8Qw6BOKl7Ndm6OFFmwYKiiMqMCpAbxpnGjF5abfIsKc7u3a77Cbnw","prev":"bafyreigp6shzy6dlcxuowwoxz7u5nemdrkad2my5zwzpwilcnhih7bw6zm","type":"plc_operation","services":{"atproto_pds":{"type":"AtprotoPersonalDataServer","endpoint":"https://bsky.social"}},"alsoKnownAs":["at://bsky.app"],"rotationKeys":["did:key:zQ3shhCGUqDKjStzuDxPkTxN6ujddP4RkEKJJouJGRRkaLGbg","did:key:zQ3shpKnbdPx3g3CmPf5cRVTPe1HtSwVn5ish3wSnDPQCbLJK"],"verificationMethods":{"atproto":"did:key:zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"}},"cid":"bafyreihmuvr3frdvd6vmdhucih277prdcfcezf67lasg5oekxoimnunjoq","nullified":false,"createdAt":"2023-04-12T17:26:46.468Z"}
]"#;

const LEGACY_CREATE_LOG: &str = r#"[
{"did":"did:plc:yk4dd2qkboz2yv6tpubpc6co","operation":{"sig":"7QTzqO1BcL3eDzP4P_YBxMmv5U4brHzAItkM9w5o8gZA7ElZkrVYEwsfQCfk5EoWLk58Z1y6fyNP9x1pthJnlw","prev":null,"type":"create","handle":"dan.bsky.social","service":"https://bsky.social","signingKey":"did:key:zQ3shP5TBe1sQfSttXty15FAEHV1DZgcxRZNxvEWnPfLFwLxJ","recoveryKey":"did:key:zQ3shhCGUqDKjStzuDxPkTxN6ujddP4RkEKJJouJGRRkaLGbg"},"cid":"bafyreigcxay6ucqlwowfpu35alyxqtv3c4vsj7gmdtmnidsnqs6nblyarq","nullified":false,"createdAt":"2022-11-17T01:07:13.996Z"},
{"did":"did:plc:yk4dd2qkboz2yv6tpubpc6co","operation":{"sig":"n-VWsPZY4xkFN8wlg-kJBU_yzWTNd2oBnbjkjxXu3HdjbBLaEB7K39JHIPn_DZVALKRjts6bUicjSEecZy8eIw","prev":"bafyreigcxay6ucqlwowfpu35alyxqtv3c4vsj7gmdtmnidsnqs6nblyarq","type":"plc_operation","services":{"atproto_pds":{"type":"AtprotoPersonalDataServer","endpoint":"https://bsky.social"}},"alsoKnownAs":["at://dholms.xyz"],"rotationKeys":["did:key:zQ3shhCGUqDKjStzuDxPkTxN6ujddP4RkEKJJouJGRRkaLGbg","did:key:zQ3shP5TBe1sQfSttXty15FAEHV1DZgcxRZNxvEWnPfLFwLxJ"],"verificationMethods":{"atproto":"did:key:zQ3shP5TBe1sQfSttXty15FAEHV1DZgcxRZNxvEWnPfLFwLxJ"}},"cid":"bafyreiho5sanautvnw3det66jcwic4vkeabc35y7iou3ygwj2l3xqcxdau","nullified":false,"createdAt":"2023-03-06T18:47:09.501Z"}
]"#;

const NULLIFIED_TOMBSTONE_LOG: &str = r#"[
{"did":"did:plc:7iqnimg5hvigsckpbqrqktoh","operation":{"sig":"GI8N37O5s6xr4QgWJ0zJdBIdS8xZ-G107B8jaaM_efJmkF8MYpIG0v3XJBW8tVzFS3xkvoOj46ufvmn9Z6KKtg","prev":null,"type":"plc_operation","services":{},"alsoKnownAs":["at://op0"],"rotationKeys":["did:key:zQ3shYZd89t3Lke7N9NbDs8fcaTyAm7fAux3aVjDELLLSVmVQ","did:key:zQ3shuK7Yt3GQoh8BoyEzSNZeWdovfAkqjjKJMUKHYC1878vm"],"verificationMethods":{}},"cid":"bafyreih2edkdbxj5kbuqstymemcu3r3mxj4gtgxcmuxpmj5mtnpazdocvm","nullified":false,"createdAt":"2025-07-25T15:47:47.372Z"},
{"did":"did:plc:7iqnimg5hvigsckpbqrqktoh","operation":{"sig":"8kZqyCA19y3ORbAS88hOBzzKqe-QB8c_WtTfJTlrxxcvQRJ9KauzBVa70pIPR62m_aNc7kH50MKXjw9N0MWWmQ","prev":"bafyreih2edkdbxj5kbuqstymemcu3r3mxj4gtgxcmuxpmj5mtnpazdocvm","type":"plc_operation","services":{},"alsoKnownAs":["at://op1"],"rotationKeys":["did:key:zQ3shVec44WTCPYCMZb4Ka5ajjDKKLmfjWUxyRptht4knaMq8","did:key:zQ3shmXuxJHxmy5SsXSdg3EWLsbrD4gztdU3TDhNq5QM7HyZr"],"verificationMethods":{}},"cid":"bafyreidfdc7xu5wvkyq2dwr6fuierhb7ybcdc3dnfmzf5u22hukttm75iq","nullified":false,"createdAt":"2025-07-25T15:47:47.749Z"},
{"did":"did:plc:7iqnimg5hvigsckpbqrqktoh","operation":{"sig":"0nvoKq0K3s6mcEutE4kZG9VhG7ptabCaxI_Hf9MdbuV0h00TBrYyDwa5VZGR334P_1Mhidnq9zMVb3o_XZ-PGg","prev":"bafyreidfdc7xu5wvkyq2dwr6fuierhb7ybcdc3dnfmzf5u22hukttm75iq","type":"plc_tombstone"},"cid":"bafyreidsszc2f6szlqfw3gsud7o7prfgihwuefyl7hlihgopnex44owwdy","nullified":true,"createdAt":"2025-07-25T15:47:48.128Z"},
{"did":"did:plc:7iqnimg5hvigsckpbqrqktoh","operation":{"sig":"RG7_y1y8d1vx_z_DHrmPVBaN_SBoFx_PJMaLAzkx2J1Y7a44USpLhFelEDupo3Kn90H447eWIoQWUFM1splTiQ","prev":"bafyreidfdc7xu5wvkyq2dwr6fuierhb7ybcdc3dnfmzf5u22hukttm75iq","type":"plc_operation","services":{},"alsoKnownAs":["at://op3"],"rotationKeys":["did:key:zQ3shWWPEB81oEwNJ1mCVfvMPNFsdsat9u9FmGFteyjNAHh2A","did:key:zQ3shXhSnMgAtK7JoaLAgEYf1aWqgXwwSfVC2Nx2WRCGGp6Si"],"verificationMethods":{}},"cid":"bafyreidmokii52hymid6kt3u7npdd5opfndn7asvt2ckwoe7g5osjw5jba","nullified":false,"createdAt":"2025-07-25T15:47:48.511Z"}
]"#;

/// Posts every operation of a real audit log, then checks that the directory derived the
/// same DID, CIDs and nullifications as plc.directory did.
async fn replay(server: &Server, log: &str) -> Result<String, Box<dyn std::error::Error>> {
    let entries: Vec<Json> = serde_json::from_str(log)?;
    let did = entries[0]["did"]
        .as_str()
        .ok_or("fixture has no did")?
        .to_owned();
    assert_eq!(derive_did(&entries[0]["operation"])?, did);
    for entry in &entries {
        let (status, message) = server.post(&did, &entry["operation"]).await?;
        assert_eq!(status, StatusCode::OK, "{did} {}: {message}", entry["cid"]);
    }
    let (status, audit) = server.get(&format!("/{did}/log/audit")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        audit_cids(&audit),
        audit_cids(&Json::Array(entries.clone()))
    );
    for (ours, theirs) in audit.as_array().into_iter().flatten().zip(&entries) {
        assert_eq!(ours["operation"], theirs["operation"], "{did}");
    }
    Ok(did)
}

#[tokio::test]
async fn real_network_logs_replay_with_their_dids_and_cids() -> TestResult {
    let server = Server::start().await?;

    let did = replay(&server, BSKY_APP_LOG).await?;
    let (_, data) = server.get(&format!("/{did}/data")).await?;
    assert_eq!(data["alsoKnownAs"], json!(["at://bsky.app"]));
    let (_, document) = server.get(&format!("/{did}")).await?;
    assert_eq!(
        document["verificationMethod"][0]["publicKeyMultibase"],
        "zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"
    );

    // A legacy `create` genesis keeps its own bytes for the DID and the CID, and is read as
    // the equivalent plc_operation.
    let did = replay(&server, LEGACY_CREATE_LOG).await?;
    let (_, log) = server.get(&format!("/{did}/log")).await?;
    assert_eq!(log[0]["type"], "create");
    let (_, data) = server.get(&format!("/{did}/data")).await?;
    assert_eq!(data["alsoKnownAs"], json!(["at://dholms.xyz"]));

    // A tombstone signed by the second rotation key, nullified by the first one.
    let did = replay(&server, NULLIFIED_TOMBSTONE_LOG).await?;
    let (status, data) = server.get(&format!("/{did}/data")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(data["alsoKnownAs"], json!(["at://op3"]));
    let (_, log) = server.get(&format!("/{did}/log")).await?;
    assert_eq!(
        log.as_array().map(Vec::len),
        Some(3),
        "nullified op listed in /log"
    );
    Ok(())
}

#[tokio::test]
async fn real_network_signature_encoding_rejections() -> TestResult {
    // From go-didplc `testdata/log_invalid_sig_*`: high-S on both curves, and base64url
    // with non-zero padding bits. None may register its DID.
    let server = Server::start().await?;
    for (did, op) in [
        (
            "did:plc:t63fj6hb7mahe7qcvgbqhdnk",
            r#"{"type":"plc_operation","rotationKeys":["did:key:zQ3shTBEaSruX6DJNAH3W9Weu95PYwrdQvmrHCSW9bLLZXrnw"],"verificationMethods":{},"alsoKnownAs":["at://high_s_k256"],"services":{},"prev":null,"sig":"cDdgXcFwiJFhTzUyEhmvG4uCqy_UEqTXiWN29O3CiMXtfPnNo7Mg_BsK1iv4VBt010RwJg5mnDOK20T6m8ltDw"}"#,
        ),
        (
            "did:plc:svbmkmqgxdr4i5cnt5y5lq5h",
            r#"{"type":"plc_operation","rotationKeys":["did:key:zDnaefqvvRQsME5c7LvxdghHeARNWEFbg2PfrAYiHhKVf9rH9"],"verificationMethods":{},"alsoKnownAs":["at://high_s_p256"],"services":{},"prev":null,"sig":"v5pzK205KUu88-3lrYRoLmw_3TJL0xK3uCNUJXged7zEEjAQcndRh4rlglwVeMQa_UH-3XArH1Oh5T_3QGLzbg"}"#,
        ),
        (
            "did:plc:3hhmazwcb2hbcjn3thxamwrk",
            r#"{"type":"plc_operation","rotationKeys":["did:key:zDnaefqvvRQsME5c7LvxdghHeARNWEFbg2PfrAYiHhKVf9rH9"],"verificationMethods":{},"alsoKnownAs":["at://weird_sig_padding"],"services":{},"prev":null,"sig":"yRcZOnrdCdTMIWVbM-HX8ByF0Rk1SOkivl3A3YbmzT4saxyk_nERJSJ-CqKlNP4CmMdVL5Cvc1vSM_Fe5HBbmR"}"#,
        ),
    ] {
        let (status, message) = server.post_raw(did, op.to_owned()).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{did} accepted");
        assert!(
            message.contains("high-S") || message.contains("base64url"),
            "{did}: unclear message {message:?}"
        );
        let (status, _) = server.get(&format!("/{did}/log")).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{did} registered");
    }
    Ok(())
}

#[tokio::test]
async fn document_and_data_have_the_reference_shape() -> TestResult {
    let server = Server::start().await?;
    let rotation_key = key(10);
    let signing_key = key(11).public();
    let did = server.plc.register(
        &rotation_key,
        &signing_key,
        &handle("bob.test")?,
        "http://127.0.0.1:2583",
    )?;

    let response = server
        .client
        .get(format!("{}/{did}", server.base))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/did+ld+json"
    );
    let document: Json = response.json().await?;
    assert_eq!(
        document,
        json!({
            "@context": [
                "https://www.w3.org/ns/did/v1",
                "https://w3id.org/security/multikey/v1",
                "https://w3id.org/security/suites/secp256k1-2019/v1",
            ],
            "id": did.as_str(),
            "alsoKnownAs": ["at://bob.test"],
            "verificationMethod": [{
                "id": format!("{did}#atproto"),
                "type": "Multikey",
                "controller": did.as_str(),
                "publicKeyMultibase": signing_key.to_multikey(),
            }],
            "service": [{
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": "http://127.0.0.1:2583",
            }],
        })
    );
    assert_eq!(server.plc.document(&did)?, document);

    let (status, data) = server.get(&format!("/{did}/data")).await?;
    assert_eq!(status, StatusCode::OK);
    let data: PlcData = serde_json::from_value(data)?;
    assert_eq!(Some(&data), server.plc.data(&did).as_ref());
    assert_eq!(data.did, did.as_str());
    assert_eq!(data.rotation_keys, [rotation_key.public().to_did_key()]);
    assert_eq!(data.signing_key(), Some(signing_key.to_did_key().as_str()));
    assert_eq!(data.handle(), Some("bob.test"));
    assert_eq!(data.pds_endpoint(), Some("http://127.0.0.1:2583"));

    // A p256 signing key brings the ecdsa-2019 context instead.
    let p256_key = sample_keypair(12, Curve::P256).public();
    server.plc.set_signing_key(&did, &rotation_key, &p256_key)?;
    let (_, document) = server.get(&format!("/{did}")).await?;
    assert_eq!(
        document["@context"][2],
        "https://w3id.org/security/suites/ecdsa-2019/v1"
    );
    assert_eq!(
        document["verificationMethod"][0]["publicKeyMultibase"],
        p256_key.to_multikey()
    );

    let (status, health) = server.get("/_health").await?;
    assert_eq!(status, StatusCode::OK);
    assert!(health["version"].is_string(), "health {health}");
    Ok(())
}

#[tokio::test]
async fn updates_show_in_document_log_audit_and_export() -> TestResult {
    let server = Server::start().await?;
    let rotation_key = key(20);
    let did = server.plc.register(
        &rotation_key,
        &key(21).public(),
        &handle("carol.test")?,
        "http://127.0.0.1:1000",
    )?;

    server
        .plc
        .set_handle(&did, &rotation_key, &handle("carol2.test")?)?;
    let new_signing_key = key(22).public();
    server
        .plc
        .set_signing_key(&did, &rotation_key, &new_signing_key)?;
    server
        .plc
        .set_pds(&did, &rotation_key, "http://127.0.0.1:2000")?;
    let new_rotation_key = key(23);
    server
        .plc
        .set_rotation_keys(&did, &rotation_key, &[new_rotation_key.public()])?;

    let (_, document) = server.get(&format!("/{did}")).await?;
    assert_eq!(document["alsoKnownAs"], json!(["at://carol2.test"]));
    assert_eq!(
        document["verificationMethod"][0]["publicKeyMultibase"],
        new_signing_key.to_multikey()
    );
    assert_eq!(
        document["service"][0]["serviceEndpoint"],
        "http://127.0.0.1:2000"
    );

    // The old rotation key has lost control; the new one has it.
    let refused = server
        .plc
        .set_handle(&did, &rotation_key, &handle("mallory.test")?);
    assert!(
        matches!(
            refused,
            Err(atpdb_devnet::plc::PlcError::BadSignature { .. })
        ),
        "old rotation key still signs: {refused:?}"
    );
    server
        .plc
        .set_handle(&did, &new_rotation_key, &handle("carol3.test")?)?;

    // Six operations, each naming the one before by CID.
    let (_, log) = server.get(&format!("/{did}/log")).await?;
    let (_, audit) = server.get(&format!("/{did}/log/audit")).await?;
    let log = log.as_array().ok_or("log is not an array")?;
    let audit = audit.as_array().ok_or("audit log is not an array")?;
    assert_eq!(log.len(), 6);
    assert_eq!(audit.len(), 6);
    for (index, entry) in audit.iter().enumerate() {
        assert_eq!(entry["operation"], log[index]);
        assert_eq!(entry["nullified"], false);
        if index > 0 {
            assert_eq!(entry["operation"]["prev"], audit[index - 1]["cid"]);
            assert!(
                entry["createdAt"].as_str() > audit[index - 1]["createdAt"].as_str(),
                "createdAt not increasing at {index}"
            );
        }
    }
    assert_eq!(log[1]["alsoKnownAs"], json!(["at://carol2.test"]));
    assert_eq!(log[5]["alsoKnownAs"], json!(["at://carol3.test"]));
    let (_, last) = server.get(&format!("/{did}/log/last")).await?;
    assert_eq!(&last, &log[5]);
    assert_eq!(server.plc.last_cid(&did)?.to_string(), audit[5]["cid"]);

    let export = server.export("?after=0&count=100").await?;
    assert_eq!(export.len(), 6);
    for (index, line) in export.iter().enumerate() {
        assert_eq!(line["type"], "sequenced_op");
        assert_eq!(line["seq"], index + 1);
        assert_eq!(line["did"], did.as_str());
        assert_eq!(line["cid"], audit[index]["cid"]);
        assert_eq!(line["operation"], audit[index]["operation"]);
        assert_eq!(line["createdAt"], audit[index]["createdAt"]);
        assert_eq!(line["nullified"], false);
    }
    Ok(())
}

#[tokio::test]
async fn tombstone_hides_document_and_data_but_not_the_log() -> TestResult {
    let server = Server::start().await?;
    let rotation_key = key(30);
    let did = server.plc.register(
        &rotation_key,
        &key(31).public(),
        &handle("dave.test")?,
        "http://127.0.0.1:1000",
    )?;
    server.plc.tombstone(&did, &rotation_key)?;

    for path in [format!("/{did}"), format!("/{did}/data")] {
        let (status, body) = server.get(&path).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            body,
            json!({ "message": format!("DID not available: {did}") })
        );
    }
    assert_eq!(server.plc.data(&did), None);

    let (status, log) = server.get(&format!("/{did}/log")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(log.as_array().map(Vec::len), Some(2));
    let (status, audit) = server.get(&format!("/{did}/log/audit")).await?;
    assert_eq!(status, StatusCode::OK);
    let (_, last) = server.get(&format!("/{did}/log/last")).await?;
    assert_eq!(last["type"], "plc_tombstone");
    assert_eq!(last["prev"], audit[0]["cid"]);
    assert_eq!(
        last.as_object().map(|fields| fields.len()),
        Some(3),
        "a tombstone has only type, prev and sig: {last}"
    );

    // Nothing follows a tombstone.
    let after_tombstone = signed_operation(
        &PlcData {
            did: did.to_string(),
            rotation_keys: vec![rotation_key.public().to_did_key()],
            verification_methods: Default::default(),
            also_known_as: vec!["at://dave.test".to_owned()],
            services: Default::default(),
        },
        Some(&server.plc.last_cid(&did)?),
        &rotation_key,
    );
    let (status, message) = server.post(did.as_str(), &after_tombstone).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("tombstone"), "message {message:?}");
    assert!(
        server
            .plc
            .set_handle(&did, &rotation_key, &handle("x.test")?)
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn unknown_dids_are_404_and_malformed_dids_400() -> TestResult {
    let server = Server::start().await?;
    let unknown = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
    for suffix in ["", "/data", "/log", "/log/audit", "/log/last"] {
        let (status, body) = server.get(&format!("/{unknown}{suffix}")).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{suffix}");
        assert_eq!(
            body,
            json!({ "message": format!("DID not registered: {unknown}") })
        );
    }
    for bad in [
        "did:plc:short",
        "did:plc:AAAAAAAAAAAAAAAAAAAAAAAA",
        "did:plc:aaaaaaaaaaaaaaaaaaaaaaa1",
        "did:web:example.com",
        "not-a-did",
        "did:plc:%FF%FE",
    ] {
        for suffix in ["", "/data", "/log", "/log/audit", "/log/last"] {
            let (status, body) = server.get(&format!("/{bad}{suffix}")).await?;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}{suffix}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("invalid DID"),
                "{bad}{suffix}: {message:?}"
            );
        }
        let (status, _) = server.post(bad, &json!({})).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "POST {bad}");
    }
    Ok(())
}

#[tokio::test]
async fn forged_operations_are_refused_and_change_nothing() -> TestResult {
    let server = Server::start().await?;
    let rotation_key = key(40);
    let did = server.plc.register(
        &rotation_key,
        &key(41).public(),
        &handle("erin.test")?,
        "http://127.0.0.1:1000",
    )?;
    let data = server.plc.data(&did).ok_or("no data after register")?;
    let head = server.plc.last_cid(&did)?;
    let mut hijack = data.clone();
    hijack.also_known_as = vec!["at://mallory.test".to_owned()];

    let attacker = key(42);
    let oversized = PlcData {
        also_known_as: (0..100)
            .map(|index| format!("at://{index}.{}", "x".repeat(80)))
            .collect(),
        ..data.clone()
    };
    let mut extra_field = signed_operation(&hijack, Some(&head), &rotation_key);
    extra_field["extra"] = json!("unsigned");
    let mut tampered = signed_operation(&data, Some(&head), &rotation_key);
    tampered["alsoKnownAs"] = json!(["at://mallory.test"]);
    let mut number = signed_operation(&data, Some(&head), &rotation_key);
    number["alsoKnownAs"] = json!([1]);
    let mut padded_sig = signed_operation(&hijack, Some(&head), &rotation_key);
    padded_sig["sig"] = json!(format!(
        "{}==",
        padded_sig["sig"].as_str().unwrap_or_default()
    ));
    let mut no_keys = data.clone();
    no_keys.rotation_keys.clear();
    let mut duplicate_keys = data.clone();
    duplicate_keys
        .rotation_keys
        .push(rotation_key.public().to_did_key());
    let unknown_prev = Cid::dag_cbor(b"not an operation");

    let cases: Vec<(&str, Json, &str)> = vec![
        (
            "signed by a key that is not a rotation key",
            signed_operation(&hijack, Some(&head), &attacker),
            "rotation keys in force",
        ),
        (
            "prev is not in the log",
            signed_operation(&hijack, Some(&unknown_prev), &rotation_key),
            "not in its log",
        ),
        (
            "genesis for an existing DID",
            signed_operation(&hijack, None, &rotation_key),
            "DID already registered",
        ),
        (
            "over 7500 bytes",
            signed_operation(&oversized, Some(&head), &rotation_key),
            "over the limit of 7500",
        ),
        ("unknown field", extra_field, "no field \"extra\""),
        ("changed after signing", tampered, "rotation keys in force"),
        ("number where a string goes", number, "not a string"),
        ("padded sig", padded_sig, "base64url"),
        (
            "no rotation keys",
            signed_operation(&no_keys, Some(&head), &rotation_key),
            "0 rotation keys",
        ),
        (
            "duplicate rotation keys",
            signed_operation(&duplicate_keys, Some(&head), &rotation_key),
            "listed twice",
        ),
        (
            "tombstone by a stranger",
            signed_tombstone(&head, &attacker),
            "rotation keys in force",
        ),
        ("not an object", json!(["plc_operation"]), "JSON object"),
        ("unknown type", json!({"type": "plc_rename"}), "plc_rename"),
    ];

    let (_, audit_before) = server.get(&format!("/{did}/log/audit")).await?;
    let export_before = server.export("?after=0&count=1000").await?;
    for (what, op, expected) in &cases {
        let (status, message) = server.post(did.as_str(), op).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: accepted");
        assert!(
            message.contains(expected),
            "{what}: message {message:?} does not mention {expected:?}"
        );
    }
    let (status, message) = server
        .post_raw(did.as_str(), "{\"type\": ".to_owned())
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("not JSON"), "message {message:?}");

    // A valid genesis posted to a DID it does not derive.
    let other = signed_operation(&data, None, &key(43));
    let (status, message) = server.post(did.as_str(), &other).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("already registered"), "{message:?}");
    let stranger = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb";
    let (status, message) = server.post(stranger, &other).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("genesis operation derives"), "{message:?}");
    let (status, _) = server.get(&format!("/{stranger}")).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, audit_after) = server.get(&format!("/{did}/log/audit")).await?;
    assert_eq!(
        audit_after, audit_before,
        "a refused operation changed the log"
    );
    assert_eq!(server.export("?after=0&count=1000").await?, export_before);
    assert_eq!(server.plc.data(&did), Some(data));
    Ok(())
}

#[tokio::test]
async fn a_higher_rotation_key_nullifies_within_72_hours_only() -> TestResult {
    let server = Server::start().await?;
    let recovery_key = key(50);
    let rotation_key = key(51);
    let genesis_data = PlcData {
        did: String::new(),
        rotation_keys: vec![
            recovery_key.public().to_did_key(),
            rotation_key.public().to_did_key(),
        ],
        verification_methods: [("atproto".to_owned(), key(52).public().to_did_key())].into(),
        also_known_as: vec!["at://frank.test".to_owned()],
        services: [(
            "atproto_pds".to_owned(),
            PlcService {
                r#type: "AtprotoPersonalDataServer".to_owned(),
                endpoint: "http://127.0.0.1:1000".to_owned(),
            },
        )]
        .into(),
    };
    let genesis = signed_operation(&genesis_data, None, &rotation_key);
    let did = genesis_did(&genesis)?;
    let (status, message) = server.post(did.as_str(), &genesis).await?;
    assert_eq!(status, StatusCode::OK, "{message}");
    let genesis_cid = operation_cid(&genesis)?;

    // The lower-priority key hijacks the handle...
    server
        .plc
        .set_handle(&did, &rotation_key, &handle("hijacked.test")?)?;
    let hijack_cid = server.plc.last_cid(&did)?;
    // ...it cannot fork from the genesis itself...
    let mut recovered = genesis_data.clone();
    recovered.rotation_keys = vec![recovery_key.public().to_did_key()];
    let same_key_fork = signed_operation(&recovered, Some(&genesis_cid), &rotation_key);
    let (status, _) = server.post(did.as_str(), &same_key_fork).await?;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "same-priority key nullified"
    );

    // ...and the recovery key rewrites history from the genesis.
    let recovery = signed_operation(&recovered, Some(&genesis_cid), &recovery_key);
    let (status, message) = server.post(did.as_str(), &recovery).await?;
    assert_eq!(status, StatusCode::OK, "{message}");
    let (_, audit) = server.get(&format!("/{did}/log/audit")).await?;
    assert_eq!(
        audit_cids(&audit),
        [
            (genesis_cid.to_string(), false),
            (hijack_cid.to_string(), true),
            (operation_cid(&recovery)?.to_string(), false),
        ]
    );
    let (_, log) = server.get(&format!("/{did}/log")).await?;
    assert_eq!(log.as_array().map(Vec::len), Some(2));
    let (_, data) = server.get(&format!("/{did}/data")).await?;
    assert_eq!(data["alsoKnownAs"], json!(["at://frank.test"]));
    let export = server.export("?after=0").await?;
    assert_eq!(
        export[1]["nullified"], true,
        "export shows the nullification"
    );

    // A nullified operation cannot be built on.
    let on_nullified = signed_operation(&genesis_data, Some(&hijack_cid), &rotation_key);
    let (status, message) = server.post(did.as_str(), &on_nullified).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("nullified"), "{message:?}");

    // Past the window, recovery is refused.
    let second = key(53);
    let mut two_keys = recovered.clone();
    two_keys.rotation_keys.push(second.public().to_did_key());
    server.plc.update(&did, &recovery_key, |data| {
        data.rotation_keys = two_keys.rotation_keys.clone()
    })?;
    let before = server.plc.last_cid(&did)?;
    server
        .plc
        .set_handle(&did, &second, &handle("late.test")?)?;
    server.plc.advance_clock(Duration::from_secs(73 * 3600));
    let late = signed_operation(&two_keys, Some(&before), &recovery_key);
    let (status, message) = server.post(did.as_str(), &late).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("72-hour recovery window"), "{message:?}");
    assert_eq!(
        server
            .plc
            .data(&did)
            .and_then(|data| data.handle().map(str::to_owned)),
        Some("late.test".to_owned())
    );
    Ok(())
}

#[tokio::test]
async fn export_pages_by_sequence_number() -> TestResult {
    let server = Server::start().await?;
    let mut dids: Vec<Did> = Vec::new();
    for seed in 0..4u64 {
        let rotation_key = key(100 + seed);
        let did = server.plc.register(
            &rotation_key,
            &key(200 + seed).public(),
            &handle(&format!("user{seed}.test"))?,
            "http://127.0.0.1:1000",
        )?;
        server
            .plc
            .set_pds(&did, &rotation_key, "http://127.0.0.1:2000")?;
        dids.push(did);
    }
    let seqs = |lines: &[Json]| -> Vec<u64> {
        lines
            .iter()
            .filter_map(|line| line["seq"].as_u64())
            .collect()
    };

    let all = server.export("?after=0&count=1000").await?;
    assert_eq!(seqs(&all), (1..=8).collect::<Vec<_>>());
    assert_eq!(all[0]["did"], dids[0].as_str());
    assert_eq!(all[1]["did"], dids[0].as_str());
    assert_eq!(all[7]["did"], dids[3].as_str());
    assert_eq!(all[0]["operation"]["prev"], Json::Null);

    assert_eq!(seqs(&server.export("?after=0&count=3").await?), [1, 2, 3]);
    assert_eq!(seqs(&server.export("?after=3&count=3").await?), [4, 5, 6]);
    assert_eq!(seqs(&server.export("?after=6&count=3").await?), [7, 8]);
    assert_eq!(seqs(&server.export("?after=8").await?), Vec::<u64>::new());
    assert_eq!(seqs(&server.export("?after=4").await?), [5, 6, 7, 8]);
    assert_eq!(seqs(&server.export("").await?).len(), 8);
    assert_eq!(seqs(&server.export("?count=99999").await?).len(), 8);

    // Ten lines by default, and never more than 1000.
    for seed in 0..4u64 {
        server.plc.set_pds(
            &dids[seed as usize],
            &key(100 + seed),
            "http://127.0.0.1:3000",
        )?;
    }
    assert_eq!(
        seqs(&server.export("?after=0").await?),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(server.plc.export(0, 5000).len(), 12);

    for query in [
        "?count=0",
        "?count=-1",
        "?count=ten",
        "?after=-1",
        "?after=x",
    ] {
        let (status, body) = server.get(&format!("/export{query}")).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(body["message"].is_string(), "{query}: {body}");
    }
    Ok(())
}

#[test]
fn register_refuses_a_second_identical_genesis() -> TestResult {
    let plc = Plc::new();
    let rotation_key = key(60);
    let signing_key = PublicKey::from_did_key(&key(61).public().to_did_key())?;
    let first = plc.register(
        &rotation_key,
        &signing_key,
        &handle("gina.test")?,
        "http://h",
    )?;
    let second = plc.register(
        &rotation_key,
        &signing_key,
        &handle("gina.test")?,
        "http://h",
    );
    assert!(
        matches!(
            second,
            Err(atpdb_devnet::plc::PlcError::AlreadyRegistered { ref did }) if *did == first
        ),
        "{second:?}"
    );
    Ok(())
}
