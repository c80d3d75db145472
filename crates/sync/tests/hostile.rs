//! A hostile PDS (its own did:web host) against the engine: every way it lies ends as a
//! recorded error on that repo, while an honest repo beside it syncs as usual.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_identity::Network;
use atpdb_net::XrpcConfig;
use atpdb_repo::crypto::Curve;
use atpdb_repo::repo::{MemoryRepo, Write};
use atpdb_repo::sample::sample_keypair;
use atpdb_repo::syntax::{Did, Tid};
use atpdb_repo::value::Value;
use atpdb_store::{RepoState, Store};
use atpdb_sync::{Engine, EngineConfig};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// How the hostile host answers `getRepo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Lie {
    WrongDid = 0,
    BadSignature = 1,
    Garbage = 2,
    EndlessBody = 3,
    HugeContentLength = 4,
    SlowDrip = 5,
    Honest = 6,
}

const LIES: [Lie; 6] = [
    Lie::WrongDid,
    Lie::BadSignature,
    Lie::Garbage,
    Lie::EndlessBody,
    Lie::HugeContentLength,
    Lie::SlowDrip,
];

#[derive(Clone)]
struct Host {
    did: Did,
    base: String,
    lie: Arc<AtomicU8>,
    honest_car: Arc<Vec<u8>>,
    wrong_did_car: Arc<Vec<u8>>,
    wrong_key_car: Arc<Vec<u8>>,
    key_multibase: String,
    /// A raw TCP server that claims a 10 GB body (hyper will not send such a lie).
    liar_base: String,
}

fn post(text: &str) -> Result<Write, Box<dyn std::error::Error>> {
    let record = Value::from_json(&json!({
        "$type": "app.bsky.feed.post",
        "text": text,
        "createdAt": "2026-01-01T00:00:00.000Z",
    }))?;
    Ok(Write::Create {
        path: format!("app.bsky.feed.post/{}", Tid::now(9)),
        record: record.to_cbor(),
    })
}

fn car_for(
    did: &Did,
    key: &atpdb_repo::crypto::Keypair,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let writes = [post("one")?, post("two")?];
    let (repo, _) = MemoryRepo::create(did.clone(), key, Tid::now(1), &writes)?;
    Ok(repo.to_car()?)
}

async fn did_document(State(host): State<Host>) -> Response {
    axum::Json(json!({
        "id": host.did.as_str(),
        "verificationMethod": [{
            "id": format!("{}#atproto", host.did),
            "type": "Multikey",
            "controller": host.did.as_str(),
            "publicKeyMultibase": host.key_multibase,
        }],
        "service": [{
            "id": "#atproto_pds",
            "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": if host.lie.load(Ordering::SeqCst) == Lie::HugeContentLength as u8 {
                host.liar_base.clone()
            } else {
                host.base.clone()
            },
        }],
    }))
    .into_response()
}

async fn no_latest_commit() -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": "RepoNotFound", "message": "no"})),
    )
        .into_response()
}

async fn get_repo(State(host): State<Host>) -> Response {
    let car = |bytes: &Arc<Vec<u8>>| {
        (
            [(header::CONTENT_TYPE, "application/vnd.ipld.car")],
            bytes.as_ref().clone(),
        )
            .into_response()
    };
    match host.lie.load(Ordering::SeqCst) {
        0 => car(&host.wrong_did_car),
        1 => car(&host.wrong_key_car),
        2 => (StatusCode::OK, vec![0xA5u8; 4096]).into_response(),
        3 => {
            // A valid CAR whose blocks repeat for ever: only a size limit stops it.
            let car = host.honest_car.as_ref();
            let header_end = match atpdb_repo::multiformats::read_uvarint(car) {
                Ok(Some((len, used))) => used + len as usize,
                _ => car.len(),
            };
            let head = car[..header_end].to_vec();
            let blocks = car[header_end..].to_vec();
            let stream = futures_util::stream::iter(
                std::iter::once(head).chain(std::iter::repeat_n(blocks, usize::MAX)),
            )
            .map(Ok::<_, std::io::Error>);
            Body::from_stream(stream).into_response()
        }
        5 => {
            let bytes = host.honest_car.as_ref().clone();
            let stream = futures_util::stream::unfold(0usize, move |at| {
                let bytes = bytes.clone();
                async move {
                    if at >= bytes.len() {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let end = (at + 8).min(bytes.len());
                    Some((Ok::<_, std::io::Error>(bytes[at..end].to_vec()), end))
                }
            });
            Body::from_stream(stream).into_response()
        }
        _ => car(&host.honest_car),
    }
}

use futures_util::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_pds_gets_recorded_errors_and_stalls_nobody() -> TestResult {
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 3,
        records: 5,
        ..DevnetConfig::default()
    })
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let did: Did = format!("did:web:127.0.0.1%3A{port}").parse()?;
    let liar = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let liar_base = format!("http://{}", liar.local_addr()?);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = liar.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10000000000\r\ncontent-type: application/vnd.ipld.car\r\n\r\n")
                    .await;
                let _ = socket.write_all(&[0u8; 1024]).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let key = sample_keypair(41, Curve::K256);
    let other_key = sample_keypair(42, Curve::K256);
    let host = Host {
        did: did.clone(),
        base: format!("http://127.0.0.1:{port}"),
        lie: Arc::new(AtomicU8::new(Lie::WrongDid as u8)),
        honest_car: Arc::new(car_for(&did, &key)?),
        wrong_did_car: Arc::new(car_for(&"did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".parse()?, &key)?),
        wrong_key_car: Arc::new(car_for(&did, &other_key)?),
        key_multibase: key.public().to_multikey(),
        liar_base,
    };
    let router = Router::new()
        .route("/.well-known/did.json", get(did_document))
        .route(
            "/xrpc/com.atproto.sync.getLatestCommit",
            get(no_latest_commit),
        )
        .route("/xrpc/com.atproto.sync.getRepo", get(get_repo))
        .with_state(host.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let mut network = devnet.network_config();
    network.xrpc = XrpcConfig {
        max_repo_bytes: 1 << 20,
        repo_idle_timeout: Duration::from_secs(1),
        repo_timeout: Duration::from_secs(10),
        max_retries: 0,
        ..XrpcConfig::default()
    };
    let engine = Engine::new(
        EngineConfig {
            relay_url: devnet.relay().ok_or("no relay")?.url().to_owned(),
            follow_firehose: false,
            resync_parallelism: 2,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(100),
            idle_poll: Duration::from_millis(20),
            ..EngineConfig::default()
        },
        store.clone(),
        Network::new(network)?,
    );
    let _tasks = engine.start()?;
    let honest: Vec<Did> = devnet.accounts().iter().map(|a| a.did.clone()).collect();
    engine.add_repos(&honest).await?;
    engine.add_repos(std::slice::from_ref(&did)).await?;

    for lie in LIES {
        host.lie.store(lie as u8, Ordering::SeqCst);
        engine.resync(std::slice::from_ref(&did)).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let entry = loop {
            let entry = store.repo(&did)?.ok_or("the hostile repo is tracked")?;
            // A resync of this lie has failed once it is in `error` with retries counted
            // after the lie was switched on.
            if entry.state == RepoState::Error && entry.error.is_some() && entry.retries > 0 {
                break entry;
            }
            assert!(
                Instant::now() < deadline,
                "{lie:?}: no recorded error: {entry:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let reason = entry.error.unwrap_or_default();
        let expected = match lie {
            Lie::WrongDid => "did",
            Lie::BadSignature => "signature",
            Lie::Garbage => "car",
            Lie::EndlessBody | Lie::HugeContentLength => "large",
            Lie::SlowDrip => "time",
            Lie::Honest => "",
        };
        assert!(
            reason.to_lowercase().contains(expected),
            "{lie:?}: the reason {reason:?} should say {expected:?}"
        );
        assert_eq!(
            store.record_count_of(&did)?,
            0,
            "{lie:?}: nothing of a lie is stored"
        );
    }
    // The honest repos synced meanwhile, and the host telling the truth is accepted at last.
    for did in &honest {
        let entry = store.repo(did)?.ok_or("tracked")?;
        assert_eq!(entry.state, RepoState::Synced, "{did}: {entry:?}");
    }
    host.lie.store(Lie::Honest as u8, Ordering::SeqCst);
    engine.resync(std::slice::from_ref(&did)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.repo(&did)?.map(|entry| entry.state) != Some(RepoState::Synced) {
        assert!(Instant::now() < deadline, "the honest answer was not taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.record_count_of(&did)?, 2);
    engine.shutdown();
    Ok(())
}
