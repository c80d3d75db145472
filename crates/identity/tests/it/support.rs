//! Shared helpers: a canned-reply HTTP server that counts requests, a DNS TXT responder,
//! DID documents, and resolvers pointed at them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use atpdb_identity::{IdentityConfig, IdentityError, Resolver};
use atpdb_net::{Http, HttpConfig};
use atpdb_repo::crypto::{Curve, PublicKey};
use atpdb_repo::syntax::Did;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::rdata::TXT;
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use serde_json::{Value, json};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;
pub type Error = Box<dyn std::error::Error>;

/// The guarded client, with or without private networks.
pub fn http(allow_private_network: bool) -> Result<Http, Error> {
    Ok(Http::new(&HttpConfig {
        allow_private_network,
        ..HttpConfig::default()
    })?)
}

/// A config for servers on loopback: plain HTTP, short timeouts, the PLC at `plc`.
pub fn config(plc: SocketAddr) -> IdentityConfig {
    IdentityConfig {
        plc_url: format!("http://{plc}"),
        did_web_scheme: "http".to_owned(),
        timeout: Duration::from_secs(5),
        ..IdentityConfig::default()
    }
}

/// A resolver that may dial loopback.
pub fn resolver(config: IdentityConfig) -> Result<Resolver, Error> {
    Ok(Resolver::new(config, http(true)?)?)
}

/// A repeatable k256 key.
pub fn key(seed: u64) -> PublicKey {
    atpdb_repo::sample::sample_keypair(seed, Curve::K256).public()
}

/// A minimal valid DID document.
pub fn document(did: &str, key: &PublicKey, pds: &str, handle: Option<&str>) -> Value {
    json!({
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
        "id": did,
        "alsoKnownAs": handle.map(|handle| vec![format!("at://{handle}")]).unwrap_or_default(),
        "verificationMethod": [{
            "id": format!("{did}#atproto"),
            "type": "Multikey",
            "controller": did,
            "publicKeyMultibase": key.to_multikey(),
        }],
        "service": [{
            "id": "#atproto_pds",
            "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": pds,
        }],
    })
}

/// The `n`th of a series of distinct did:plc DIDs, for stand-in directories.
pub fn plc_did(n: usize) -> Result<Did, Error> {
    const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut identifier = String::from("aaaaaaaaaaaaaaaaaaaa");
    for shift in [15, 10, 5, 0] {
        identifier.push(char::from(BASE32[(n >> shift) & 31]));
    }
    Ok(format!("did:plc:{identifier}").parse()?)
}

/// Fails with the error when it is not the expected variant.
pub fn expect_err<T: std::fmt::Debug>(
    answer: Result<T, IdentityError>,
    expected: &str,
    is_expected: impl FnOnce(&IdentityError) -> bool,
) -> Result<IdentityError, Error> {
    match answer {
        Err(err) if is_expected(&err) => Ok(err),
        other => Err(format!("expected {expected}, got {other:?}").into()),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP stand-in.

/// A canned answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with this JSON.
    Json(Value),
    /// This status and body.
    Raw(u16, String),
    /// Wait, then answer.
    Slow(Duration, Box<Reply>),
    /// 200 with a chunked body that never ends.
    Endless,
}

#[derive(Debug, Default)]
struct Routes {
    /// By `host path` (`Host` header without port) first, then by `path`.
    replies: HashMap<String, Reply>,
    hits: HashMap<String, usize>,
}

/// An HTTP server on 127.0.0.1 answering canned replies by path (and `Host`), counting
/// requests per path; unknown paths get 404.
#[derive(Debug, Clone, Default)]
pub struct Stand {
    routes: Arc<Mutex<Routes>>,
}

impl Stand {
    /// Binds 127.0.0.1:0 and serves until the test's runtime ends.
    pub async fn start() -> Result<(Stand, SocketAddr), Error> {
        let stand = Stand::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(stand.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((stand, addr))
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers `path` with `reply`.
    pub fn set(&self, path: &str, reply: Reply) {
        self.routes().replies.insert(path.to_owned(), reply);
    }

    /// Answers `path` with `reply` when the `Host` is `host`.
    pub fn set_for_host(&self, host: &str, path: &str, reply: Reply) {
        self.routes()
            .replies
            .insert(format!("{host} {path}"), reply);
    }

    /// Requests of `path` so far.
    pub fn hits(&self, path: &str) -> usize {
        self.routes().hits.get(path).copied().unwrap_or(0)
    }

    /// Requests of any path so far.
    pub fn total_hits(&self) -> usize {
        self.routes().hits.values().sum()
    }
}

async fn answer(State(stand): State<Stand>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .map(|host| host.split(':').next().unwrap_or(host).to_owned())
        .unwrap_or_default();
    let reply = {
        let mut routes = stand.routes();
        *routes.hits.entry(path.clone()).or_default() += 1;
        routes
            .replies
            .get(&format!("{host} {path}"))
            .or_else(|| routes.replies.get(&path))
            .cloned()
    };
    let mut reply = match reply {
        Some(reply) => reply,
        None => return (StatusCode::NOT_FOUND, "not here").into_response(),
    };
    loop {
        match reply {
            Reply::Slow(delay, then) => {
                tokio::time::sleep(delay).await;
                reply = *then;
            }
            Reply::Json(value) => {
                return (
                    [(header::CONTENT_TYPE, "application/did+ld+json")],
                    value.to_string(),
                )
                    .into_response();
            }
            Reply::Raw(status, body) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
                return (status, body).into_response();
            }
            Reply::Endless => {
                let chunk = Bytes::from(vec![b' '; 16 * 1024]);
                let stream = futures_util::stream::repeat_with(move || {
                    Ok::<_, std::convert::Infallible>(chunk.clone())
                });
                return Body::from_stream(stream).into_response();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DNS stand-in.

/// A UDP DNS server on 127.0.0.1 answering TXT queries from a table; every other name is
/// NXDOMAIN.
#[derive(Debug, Clone, Default)]
pub struct Dns {
    /// Lowercase FQDN (with the trailing dot) → TXT strings, one record each.
    records: Arc<Mutex<HashMap<String, Vec<String>>>>,
    queries: Arc<AtomicUsize>,
}

impl Dns {
    /// Binds 127.0.0.1:0 (UDP) and answers until the test's runtime ends.
    pub async fn start() -> Result<(Dns, SocketAddr), Error> {
        let dns = Dns::default();
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let addr = socket.local_addr()?;
        let server = dns.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 4096];
            loop {
                let Ok((len, peer)) = socket.recv_from(&mut buffer).await else {
                    return;
                };
                let Some(query) = buffer
                    .get(..len)
                    .and_then(|bytes| Message::from_vec(bytes).ok())
                else {
                    continue;
                };
                server.queries.fetch_add(1, Ordering::Relaxed);
                if let Ok(bytes) = server.respond(&query).to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        Ok((dns, addr))
    }

    /// Serves `values` as the TXT records of `_atproto.<handle>`.
    pub fn set_txt(&self, handle: &str, values: &[&str]) {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                format!("_atproto.{handle}."),
                values.iter().map(|value| (*value).to_owned()).collect(),
            );
    }

    /// Queries answered so far.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }

    fn respond(&self, query: &Message) -> Message {
        let mut response = Message::response(query.metadata.id, query.metadata.op_code);
        response.metadata.recursion_desired = query.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.metadata.authoritative = true;
        response.queries = query.queries.clone();
        response.edns = query.edns.clone();
        let records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        for question in &query.queries {
            let name = question.name().to_ascii().to_ascii_lowercase();
            match records.get(&name) {
                Some(values) if question.query_type() == RecordType::TXT => {
                    for value in values {
                        response.answers.push(Record::from_rdata(
                            question.name().clone(),
                            60,
                            RData::TXT(TXT::new(vec![value.clone()])),
                        ));
                    }
                }
                _ => response.metadata.response_code = ResponseCode::NXDomain,
            }
        }
        response
    }
}
