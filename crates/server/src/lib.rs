//! The HTTP API of `atpdb serve`: Tap-compatible routes and XRPC reads from the mirror.
//!
//! Routes, errors and status codes follow Tap's where Tap has the route (so its clients work
//! unchanged): `{"message": ...}` errors, `POST /repos/add|remove` with `{"dids": [...]}`,
//! `GET /info/:did`, `GET /stats/*`, HTTP Basic `admin:<password>` on every route when a
//! password is set. Unlike Tap, DIDs are validated, an empty list is fine, and bad input is
//! always a 4xx that says what is wrong, never a 500.
//!
//! `com.atproto.repo.listRecords` and `getRecord` answer from the store, so any atproto
//! client can read exactly what was mirrored.

use std::sync::Arc;

use atpdb_repo::Record;
use atpdb_repo::syntax::{Did, Nsid};

use atpdb_deliver::Delivery;
use atpdb_sync::Engine;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

mod admin;
mod channel;
mod metrics;
mod status;
mod stream;
mod subscribe;

/// Settings of the HTTP API.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// When set, every route requires HTTP Basic `admin:<password>` (as Tap does).
    pub admin_password: Option<String>,
}

#[derive(Clone)]
struct App {
    engine: Engine,
    delivery: Delivery,
    config: Arc<ServerConfig>,
    /// `(time µs, last event id)` once a second, for the status page's chart.
    history: status::History,
}

/// The router over a running engine and its delivery.
pub fn router(engine: Engine, delivery: Delivery, config: ServerConfig) -> Router {
    let history = status::History::default();
    status::sample(&engine, &history);
    let app = App {
        engine,
        delivery,
        config: Arc::new(config),
        history,
    };
    Router::new()
        .route("/health", get(health))
        .route("/channel", get(channel::channel))
        .route("/stream", get(stream::stream))
        .route("/subscribe", get(subscribe::subscribe))
        .route("/resolve/{did}", get(resolve))
        .route("/repos/add", post(repos_add))
        .route("/repos/remove", post(repos_remove))
        .route("/repos", get(admin::list))
        .route("/repos/errors", get(admin::errors))
        .route("/repos/resync", post(admin::resync))
        .route("/repos/{did}", get(admin::show))
        .route("/runs", get(admin::runs))
        .route("/config", get(admin::config).put(admin::set_config))
        .route("/query", get(admin::query))
        .route("/metrics", get(metrics::metrics))
        .route("/", get(status::page))
        .route("/status.json", get(status::figures))
        .route("/xrpc/com.atproto.repo.describeRepo", get(describe_repo))
        .route("/info/{did}", get(info))
        .route("/stats/repo-count", get(repo_count))
        .route("/stats/record-count", get(record_count))
        .route("/stats/outbox-buffer", get(outbox_buffer))
        .route("/stats/resync-buffer", get(resync_buffer))
        .route("/stats/cursors", get(cursors))
        .route("/xrpc/com.atproto.repo.listRecords", get(list_records))
        .route("/xrpc/com.atproto.repo.getRecord", get(get_record))
        .layer(middleware::from_fn_with_state(app.clone(), admin_auth))
        .with_state(app)
}

/// A client's mistake or a server failure, as Tap's `{"message": ...}` body.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn internal(err: impl std::fmt::Display) -> ApiError {
        tracing::error!(%err, "api.internal_error");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: err.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "message": self.message }))).into_response()
    }
}

/// An XRPC error: `{"error": Name, "message": ...}`, as atproto clients expect.
#[derive(Debug)]
struct XrpcError {
    status: StatusCode,
    error: &'static str,
    message: String,
}

impl XrpcError {
    fn invalid(message: impl Into<String>) -> XrpcError {
        XrpcError {
            status: StatusCode::BAD_REQUEST,
            error: "InvalidRequest",
            message: message.into(),
        }
    }
}

impl IntoResponse for XrpcError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({ "error": self.error, "message": self.message })),
        )
            .into_response()
    }
}

impl From<atpdb_store::StoreError> for XrpcError {
    fn from(err: atpdb_store::StoreError) -> XrpcError {
        tracing::error!(%err, "xrpc.internal_error");
        XrpcError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: "InternalServerError",
            message: err.to_string(),
        }
    }
}

async fn admin_auth(State(app): State<App>, request: Request, next: Next) -> Response {
    let Some(password) = app.config.admin_password.as_deref() else {
        return next.run(request).await;
    };
    if basic_auth_matches(request.headers(), password) {
        return next.run(request).await;
    }
    let mut response = (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({
            "error": "Unauthorized",
            "message": "atproto admin auth required, but missing or incorrect password",
        })),
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"admin\", charset=\"UTF-8\""),
    );
    response
}

fn basic_auth_matches(headers: &HeaderMap, password: &str) -> bool {
    use base64::Engine as _;
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let expected = format!("admin:{password}");
    constant_time_eq(&decoded, expected.as_bytes())
}

/// Compares without an early exit, so response time does not reveal how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health() -> axum::Json<Value> {
    axum::Json(json!({ "status": "ok" }))
}

#[derive(Deserialize)]
struct DidsPayload {
    #[serde(default)]
    dids: Vec<String>,
}

/// Parses `{"dids": [...]}`, refusing the whole request if any DID is malformed (so a typo is
/// noticed rather than half-applied). An empty body is an empty list.
fn parse_dids(body: &Bytes) -> Result<Vec<Did>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let payload: DidsPayload = serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("body must be {{\"dids\": [...]}}: {err}")))?;
    payload
        .dids
        .iter()
        .map(|text| {
            text.parse::<Did>()
                .map_err(|err| ApiError::bad_request(format!("invalid DID {text:?}: {err}")))
        })
        .collect()
}

async fn repos_add(State(app): State<App>, body: Bytes) -> Result<StatusCode, ApiError> {
    let dids = parse_dids(&body)?;
    app.engine
        .add_repos(&dids)
        .await
        .map_err(ApiError::internal)?;
    Ok(StatusCode::OK)
}

async fn repos_remove(State(app): State<App>, body: Bytes) -> Result<StatusCode, ApiError> {
    let dids = parse_dids(&body)?;
    app.engine
        .remove_repos(&dids)
        .await
        .map_err(ApiError::internal)?;
    Ok(StatusCode::OK)
}

fn parse_did(text: &str) -> Result<Did, ApiError> {
    text.parse::<Did>()
        .map_err(|err| ApiError::bad_request(format!("invalid DID {text:?}: {err}")))
}

async fn info(State(app): State<App>, Path(did): Path<String>) -> Result<Response, ApiError> {
    let did = parse_did(&did)?;
    let store = app.engine.store();
    let Some(entry) = store.repo(&did).map_err(ApiError::internal)? else {
        return Ok((
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "message": "repo not found" })),
        )
            .into_response());
    };
    let records = store.record_count_of(&did).map_err(ApiError::internal)?;
    Ok(axum::Json(json!({
        "did": entry.did.as_str(),
        "handle": entry.handle.unwrap_or_default(),
        "state": entry.state.as_str(),
        "rev": entry.rev.unwrap_or_default(),
        "records": records,
        "error": entry.error.unwrap_or_default(),
        "retries": entry.retries,
        "status": entry.status.as_str(),
    }))
    .into_response())
}

/// The DID document, as the directory serves it (Tap's client parses it with
/// `@atproto/common`'s `didDocument`; a 404 is its `null`).
async fn resolve(State(app): State<App>, Path(did): Path<String>) -> Response {
    use atpdb_identity::IdentityError;
    let Ok(did) = did.parse::<Did>() else {
        return message(StatusCode::BAD_REQUEST, "improperly formatted DID");
    };
    match app.engine.identity().resolve(&did).await {
        Ok(identity) => axum::Json(identity.document.clone()).into_response(),
        Err(IdentityError::NotFound { .. } | IdentityError::Unsupported { .. }) => {
            message(StatusCode::NOT_FOUND, "DID not found")
        }
        Err(err @ IdentityError::Invalid { .. }) => message(
            StatusCode::BAD_GATEWAY,
            &format!("unusable DID document: {err}"),
        ),
        Err(err) => {
            tracing::warn!(%did, %err, "api.resolve_failed");
            message(
                StatusCode::BAD_GATEWAY,
                &format!("failed to resolve DID: {err}"),
            )
        }
    }
}

/// Runs a blocking store read off the async threads.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, atpdb_store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

fn message(status: StatusCode, text: &str) -> Response {
    (status, axum::Json(json!({ "message": text }))).into_response()
}

async fn repo_count(State(app): State<App>) -> Result<axum::Json<Value>, ApiError> {
    let count = app
        .engine
        .store()
        .repo_count()
        .map_err(ApiError::internal)?;
    Ok(axum::Json(json!({ "repo_count": count })))
}

async fn record_count(State(app): State<App>) -> axum::Json<Value> {
    axum::Json(json!({ "record_count": app.engine.store().record_count() }))
}

async fn outbox_buffer(State(app): State<App>) -> axum::Json<Value> {
    axum::Json(json!({ "outbox_buffer": app.engine.store().outbox_len() }))
}

async fn resync_buffer(State(app): State<App>) -> axum::Json<Value> {
    axum::Json(json!({ "resync_buffer": app.engine.store().buffer_len() }))
}

async fn cursors(State(app): State<App>) -> Result<axum::Json<Value>, ApiError> {
    let store = app.engine.store();
    let relay = &app.engine.config().relay_url;
    let firehose = app
        .engine
        .counters()
        .firehose_cursor
        .load(std::sync::atomic::Ordering::Relaxed);
    let listing = match &app.engine.scope().mode {
        atpdb_sync::Mode::Manual => None,
        atpdb_sync::Mode::Full => Some("listRepos".to_owned()),
        atpdb_sync::Mode::Signal(patterns) => patterns
            .iter()
            .find_map(|pattern| pattern.exact().map(|nsid| nsid.as_str().to_owned())),
    };
    let list_repos = match listing {
        Some(listing) => store
            .cursor(&atpdb_sync::crawler::crawler_cursor_name(relay, &listing))
            .map_err(ApiError::internal)?
            .unwrap_or_default(),
        None => String::new(),
    };
    Ok(axum::Json(
        json!({ "firehose": firehose, "list_repos": list_repos }),
    ))
}

#[derive(Deserialize)]
struct ListRecordsParams {
    repo: String,
    collection: String,
    limit: Option<String>,
    cursor: Option<String>,
    reverse: Option<String>,
}

/// The mirror answers by DID; handle lookups need the network and come with delivery.
fn parse_repo(repo: &str) -> Result<Did, XrpcError> {
    repo.parse::<Did>()
        .map_err(|err| XrpcError::invalid(format!("repo must be a DID: {err}")))
}

fn record_json(record: &Record) -> Value {
    json!({
        "uri": record.uri(),
        "cid": record.cid().to_string(),
        "value": record.to_json(),
    })
}

async fn list_records(
    State(app): State<App>,
    Query(params): Query<ListRecordsParams>,
) -> Result<axum::Json<Value>, XrpcError> {
    let store = app.engine.store();
    let did = parse_repo(&params.repo)?;
    let collection = params
        .collection
        .parse::<Nsid>()
        .map_err(|err| XrpcError::invalid(format!("collection: {err}")))?;
    let limit = match params.limit.as_deref() {
        None => 50,
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=100).contains(&limit) => limit,
            _ => return Err(XrpcError::invalid("limit must be an integer from 1 to 100")),
        },
    };
    let reverse = match params.reverse.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(XrpcError::invalid("reverse must be true or false")),
    };
    if store.repo(&did)?.is_none() {
        return Err(XrpcError {
            status: StatusCode::BAD_REQUEST,
            error: "RepoNotFound",
            message: format!("could not find repo: {did}"),
        });
    }
    // As a PDS answers: newest (highest rkey) first, oldest first with `reverse=true`.
    let records = store.records(
        &did,
        Some(collection.as_str()),
        params.cursor.as_deref(),
        limit,
        !reverse,
    )?;
    let cursor = if records.len() == limit {
        records.last().map(|record| record.rkey().to_string())
    } else {
        None
    };
    let mut body = json!({ "records": records.iter().map(record_json).collect::<Vec<_>>() });
    if let (Some(cursor), Some(object)) = (cursor, body.as_object_mut()) {
        object.insert("cursor".to_owned(), Value::String(cursor));
    }
    Ok(axum::Json(body))
}

#[derive(Deserialize)]
struct DescribeRepoParams {
    repo: String,
}

/// `com.atproto.repo.describeRepo` from the mirror: the handle atpdb verified, the DID
/// document, and the collections the stored records are in.
async fn describe_repo(
    State(app): State<App>,
    Query(params): Query<DescribeRepoParams>,
) -> Result<axum::Json<Value>, XrpcError> {
    let did = parse_repo(&params.repo)?;
    let store = app.engine.store().clone();
    let lookup = did.clone();
    let found = tokio::task::spawn_blocking(move || {
        let Some(entry) = store.repo(&lookup)? else {
            return Ok(None);
        };
        Ok::<_, atpdb_store::StoreError>(Some((entry, store.collections(&lookup, 1000)?)))
    })
    .await
    .map_err(|err| XrpcError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        error: "InternalServerError",
        message: err.to_string(),
    })??;
    let Some((entry, collections)) = found else {
        return Err(XrpcError {
            status: StatusCode::BAD_REQUEST,
            error: "RepoNotFound",
            message: format!("could not find repo: {did}"),
        });
    };
    let document = match app.engine.identity().resolve(&did).await {
        Ok(identity) => identity.document.clone(),
        Err(_) => Value::Null,
    };
    let handle = entry.handle.clone();
    Ok(axum::Json(json!({
        "handle": handle.clone().unwrap_or_else(|| "handle.invalid".to_owned()),
        "did": did.as_str(),
        "didDoc": document,
        "collections": collections,
        "handleIsCorrect": handle.is_some_and(|handle| handle != "handle.invalid"),
    })))
}

#[derive(Deserialize)]
struct GetRecordParams {
    repo: String,
    collection: String,
    rkey: String,
    cid: Option<String>,
}

async fn get_record(
    State(app): State<App>,
    Query(params): Query<GetRecordParams>,
) -> Result<axum::Json<Value>, XrpcError> {
    let store = app.engine.store();
    let did = parse_repo(&params.repo)?;
    params
        .collection
        .parse::<Nsid>()
        .map_err(|err| XrpcError::invalid(format!("collection: {err}")))?;
    params
        .rkey
        .parse::<atpdb_repo::syntax::RecordKey>()
        .map_err(|err| XrpcError::invalid(format!("rkey: {err}")))?;
    let found = store.record(&did, &params.collection, &params.rkey)?;
    let found = found.filter(|record| {
        params
            .cid
            .as_deref()
            .is_none_or(|cid| record.cid().to_string() == cid)
    });
    match found {
        Some(record) => Ok(axum::Json(record_json(&record))),
        None => Err(XrpcError {
            status: StatusCode::BAD_REQUEST,
            error: "RecordNotFound",
            message: format!(
                "could not locate record: at://{did}/{}/{}",
                params.collection, params.rkey
            ),
        }),
    }
}
