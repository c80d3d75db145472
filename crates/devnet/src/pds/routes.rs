//! The PDS's HTTP surface: sync endpoints, the standard write path, blobs, sessions and the
//! admin API.

use std::collections::BTreeSet;

use atpdb_repo::Cid;
use atpdb_repo::crypto::Curve;
use atpdb_repo::repo::{CommitData, Write};
use atpdb_repo::syntax::{Did, Handle, Nsid, RecordKey, Tid};
use atpdb_repo::value::{Value, cbor_to_json};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State, WebSocketUpgrade};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value as Json_, json};

use super::{Account, NewAccount, Pds, PdsError, Status, lock};
use crate::auth::{ACCESS_SCOPE, REFRESH_SCOPE, bearer};
use crate::xrpc::{Body, Params, XrpcError, XrpcResult, limit, parse};

impl From<PdsError> for XrpcError {
    fn from(err: PdsError) -> Self {
        match err {
            PdsError::RepoNotFound(did) => XrpcError::bad(
                "RepoNotFound",
                format!("Could not find repo for DID: {did}"),
            ),
            PdsError::Inactive { did, status } => XrpcError::bad(
                match status {
                    "takendown" => "RepoTakendown",
                    "suspended" => "RepoSuspended",
                    _ => "RepoDeactivated",
                },
                format!("Repo has been {status}: {did}"),
            ),
            PdsError::HandleNotAvailable(message) => XrpcError::bad("HandleNotAvailable", message),
            PdsError::InvalidSwap(message) => XrpcError::bad("InvalidSwap", message),
            PdsError::Repo(err) => XrpcError::invalid(err.to_string()),
            PdsError::Plc(err) => XrpcError::internal(err.to_string()),
            PdsError::Invalid(message) => XrpcError::invalid(message),
        }
    }
}

/// Every route of a PDS host, with its faults applied in front.
pub fn router(pds: Pds) -> Router {
    let admin = Router::new()
        .route("/admin/accounts", get(admin_accounts))
        .route("/admin/accounts/{did}/{action}", post(admin_account_action))
        .with_state(pds.clone())
        .merge(crate::faults::admin_router(pds.inner.faults.clone()))
        .merge(crate::subscribe::admin_router(pds.inner.sequencer.clone()))
        .layer(middleware::from_fn_with_state(
            std::sync::Arc::<str>::from(pds.inner.admin_password.as_str()),
            crate::auth::require_admin,
        ));
    let xrpc = Router::new()
        .route(
            "/xrpc/_health",
            get(|| async { Json(json!({"version": "atpdb-devnet"})) }),
        )
        .route(
            "/xrpc/com.atproto.server.describeServer",
            get(describe_server),
        )
        .route(
            "/xrpc/com.atproto.server.createAccount",
            post(create_account),
        )
        .route(
            "/xrpc/com.atproto.server.createSession",
            post(create_session),
        )
        .route(
            "/xrpc/com.atproto.server.refreshSession",
            post(refresh_session),
        )
        .route("/xrpc/com.atproto.server.getSession", get(get_session))
        .route(
            "/xrpc/com.atproto.server.deleteSession",
            post(delete_session),
        )
        .route(
            "/xrpc/com.atproto.identity.resolveHandle",
            get(resolve_handle),
        )
        .route("/.well-known/atproto-did", get(well_known_did))
        .route("/xrpc/com.atproto.repo.describeRepo", get(describe_repo))
        .route("/xrpc/com.atproto.repo.getRecord", get(repo_get_record))
        .route("/xrpc/com.atproto.repo.listRecords", get(list_records))
        .route("/xrpc/com.atproto.repo.createRecord", post(create_record))
        .route("/xrpc/com.atproto.repo.putRecord", post(put_record))
        .route("/xrpc/com.atproto.repo.deleteRecord", post(delete_record))
        .route("/xrpc/com.atproto.repo.applyWrites", post(apply_writes))
        .route("/xrpc/com.atproto.repo.uploadBlob", post(upload_blob))
        .route("/xrpc/com.atproto.sync.getRepo", get(get_repo))
        .route(
            "/xrpc/com.atproto.sync.getLatestCommit",
            get(get_latest_commit),
        )
        .route("/xrpc/com.atproto.sync.getRepoStatus", get(get_repo_status))
        .route("/xrpc/com.atproto.sync.listRepos", get(list_repos))
        .route("/xrpc/com.atproto.sync.getRecord", get(sync_get_record))
        .route("/xrpc/com.atproto.sync.getBlob", get(get_blob))
        .route("/xrpc/com.atproto.sync.listBlobs", get(list_blobs))
        .route(
            "/xrpc/com.atproto.sync.subscribeRepos",
            get(subscribe_repos),
        )
        .with_state(pds.clone());
    xrpc.merge(admin)
        .fallback(|| async {
            XrpcError::new(
                StatusCode::NOT_FOUND,
                "MethodNotImplemented",
                "Method Not Implemented",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(
            pds.inner.max_blob_size.max(2 * 1024 * 1024) + 1024,
        ))
        .layer(middleware::from_fn_with_state(
            pds.inner.faults.clone(),
            crate::faults::middleware,
        ))
}

/// The account a bearer access token belongs to.
struct Session {
    did: Did,
}

impl FromRequestParts<Pds> for Session {
    type Rejection = XrpcError;

    async fn from_request_parts(parts: &mut Parts, pds: &Pds) -> Result<Self, Self::Rejection> {
        let token =
            bearer(&parts.headers).ok_or_else(|| XrpcError::auth("Authentication Required"))?;
        let claims = pds.inner.tokens.verify(token, ACCESS_SCOPE)?;
        let did = pds
            .lookup(&claims.sub)
            .ok_or_else(|| XrpcError::auth("account no longer hosted here"))?;
        Ok(Session { did })
    }
}

impl Session {
    /// Writes may only name the session's own repo, by DID or handle.
    fn check_repo(&self, pds: &Pds, repo: &str) -> XrpcResult<()> {
        match pds.lookup(repo) {
            Some(did) if did == self.did => Ok(()),
            _ => Err(XrpcError::new(
                StatusCode::FORBIDDEN,
                "InvalidRequest",
                "repo does not match the session",
            )),
        }
    }
}

fn did_doc(pds: &Pds, did: &Did) -> Option<Json_> {
    pds.inner.plc.document(did).ok()
}

fn session_json(pds: &Pds, account: &Account, tokens: Option<(String, String)>) -> Json_ {
    let mut out = json!({
        "handle": account.handle.as_str(),
        "did": account.did.as_str(),
        "email": account.email,
        "emailConfirmed": true,
        "active": account.status == Status::Active,
    });
    if let Some(status) = account.status.as_str() {
        out["status"] = json!(status);
    }
    if let Some(doc) = did_doc(pds, &account.did) {
        out["didDoc"] = doc;
    }
    if let Some((access, refresh)) = tokens {
        out["accessJwt"] = json!(access);
        out["refreshJwt"] = json!(refresh);
    }
    out
}

fn new_session(pds: &Pds, account: &mut Account) -> (String, String) {
    let id = crate::auth::hex(&crate::auth::random_bytes::<16>());
    account.sessions.push(id.clone());
    // Bound the live sessions per account; the oldest stop refreshing.
    if account.sessions.len() > 32 {
        account.sessions.remove(0);
    }
    pds.inner.tokens.issue(account.did.as_str(), &id)
}

async fn describe_server(State(pds): State<Pds>) -> Json<Json_> {
    Json(json!({
        "did": pds.inner.service_did,
        "availableUserDomains": [".test"],
        "inviteCodeRequired": false,
        "phoneVerificationRequired": false,
        "links": {},
        "contact": {},
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateAccountInput {
    handle: String,
    email: Option<String>,
    password: Option<String>,
}

async fn create_account(
    State(pds): State<Pds>,
    Body(input): Body<CreateAccountInput>,
) -> XrpcResult<Json<Json_>> {
    let handle: Handle = input
        .handle
        .parse()
        .map_err(|err| XrpcError::bad("InvalidHandle", format!("{err}")))?;
    let password = input
        .password
        .filter(|password| !password.is_empty())
        .ok_or_else(|| XrpcError::invalid("password is required"))?;
    let seed = u64::from_le_bytes(crate::auth::random_bytes());
    let new = NewAccount {
        handle,
        email: input.email.unwrap_or_default(),
        password,
        signing: crate::traffic::keypair(seed, Curve::K256),
        rotation: crate::traffic::keypair(seed ^ 0x5eed, Curve::K256),
        records: Vec::new(),
    };
    let pds2 = pds.clone();
    let did = tokio::task::spawn_blocking(move || pds2.create_account(new))
        .await
        .map_err(|err| XrpcError::internal(err.to_string()))??;
    let account = pds.account(&did)?;
    let mut account = lock(&account);
    let tokens = new_session(&pds, &mut account);
    Ok(Json(session_json(&pds, &account, Some(tokens))))
}

#[derive(Deserialize)]
struct CreateSessionInput {
    identifier: String,
    password: String,
}

async fn create_session(
    State(pds): State<Pds>,
    Body(input): Body<CreateSessionInput>,
) -> XrpcResult<Json<Json_>> {
    let invalid = || XrpcError::auth("Invalid identifier or password");
    let did = pds.lookup(&input.identifier).ok_or_else(invalid)?;
    let account = pds.account(&did)?;
    let mut account = lock(&account);
    if account.password != input.password {
        return Err(invalid());
    }
    if account.status == Status::Takendown {
        return Err(XrpcError::auth("Account has been taken down").with_error("AccountTakedown"));
    }
    let tokens = new_session(&pds, &mut account);
    Ok(Json(session_json(&pds, &account, Some(tokens))))
}

impl XrpcError {
    fn with_error(mut self, error: &'static str) -> Self {
        self.error = error;
        self
    }
}

async fn refresh_session(State(pds): State<Pds>, headers: HeaderMap) -> XrpcResult<Json<Json_>> {
    let token = bearer(&headers).ok_or_else(|| XrpcError::auth("Authentication Required"))?;
    let claims = pds.inner.tokens.verify(token, REFRESH_SCOPE)?;
    let did = pds
        .lookup(&claims.sub)
        .ok_or_else(|| XrpcError::auth("account no longer hosted here"))?;
    let account = pds.account(&did)?;
    let mut account = lock(&account);
    let id = claims.jti.unwrap_or_default();
    let Some(at) = account.sessions.iter().position(|session| *session == id) else {
        return Err(XrpcError::bad("ExpiredToken", "Token has been revoked"));
    };
    account.sessions.remove(at);
    let tokens = new_session(&pds, &mut account);
    Ok(Json(session_json(&pds, &account, Some(tokens))))
}

async fn get_session(State(pds): State<Pds>, session: Session) -> XrpcResult<Json<Json_>> {
    let account = pds.account(&session.did)?;
    let account = lock(&account);
    Ok(Json(session_json(&pds, &account, None)))
}

async fn delete_session(State(pds): State<Pds>, headers: HeaderMap) -> XrpcResult<Json<Json_>> {
    let token = bearer(&headers).ok_or_else(|| XrpcError::auth("Authentication Required"))?;
    let claims = pds.inner.tokens.verify(token, REFRESH_SCOPE)?;
    if let Some(did) = pds.lookup(&claims.sub) {
        let account = pds.account(&did)?;
        let mut account = lock(&account);
        let id = claims.jti.unwrap_or_default();
        account.sessions.retain(|session| *session != id);
    }
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct HandleParams {
    handle: String,
}

async fn resolve_handle(
    State(pds): State<Pds>,
    Params(params): Params<HandleParams>,
) -> XrpcResult<Json<Json_>> {
    let handle: Handle = parse("handle", &params.handle)?;
    let did = pds
        .lookup(handle.as_str())
        .ok_or_else(|| XrpcError::bad("HandleNotFound", "Unable to resolve handle"))?;
    Ok(Json(json!({"did": did.as_str()})))
}

/// `GET /.well-known/atproto-did`: the DID of the account whose handle is the request's
/// host (without port), as plain text; 404 when no account here holds it. The HTTPS method of
/// handle resolution, for clients that dial this host and send the handle as `Host`.
async fn well_known_did(State(pds): State<Pds>, headers: HeaderMap, uri: Uri) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .or_else(|| uri.host())
        .unwrap_or_default();
    let name = host.split(':').next().unwrap_or_default();
    let did = name
        .parse::<Handle>()
        .ok()
        .and_then(|handle| pds.did_for_handle(&handle));
    match did {
        Some(did) => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            did.to_string(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("no account here has the handle {name:?}"),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct RepoParams {
    repo: String,
}

fn find_repo(pds: &Pds, repo: &str) -> XrpcResult<Did> {
    pds.lookup(repo)
        .ok_or_else(|| XrpcError::bad("RepoNotFound", format!("Could not find repo: {repo}")))
}

async fn describe_repo(
    State(pds): State<Pds>,
    Params(params): Params<RepoParams>,
) -> XrpcResult<Json<Json_>> {
    let did = find_repo(&pds, &params.repo)?;
    let account = pds.account(&did)?;
    let account = lock(&account);
    let collections: BTreeSet<String> = account
        .repo
        .list()
        .map_err(PdsError::from)?
        .into_iter()
        .filter_map(|(path, _)| path.split_once('/').map(|(c, _)| c.to_owned()))
        .collect();
    Ok(Json(json!({
        "handle": account.handle.as_str(),
        "did": did.as_str(),
        "didDoc": did_doc(&pds, &did).unwrap_or(json!({})),
        "collections": collections,
        "handleIsCorrect": true,
    })))
}

#[derive(Deserialize)]
struct RecordParams {
    repo: String,
    collection: String,
    rkey: String,
    cid: Option<String>,
}

fn record_path(collection: &str, rkey: &str) -> XrpcResult<String> {
    let collection: Nsid = parse("collection", collection)?;
    let rkey: RecordKey = parse("rkey", rkey)?;
    Ok(format!("{collection}/{rkey}"))
}

async fn repo_get_record(
    State(pds): State<Pds>,
    Params(params): Params<RecordParams>,
) -> XrpcResult<Json<Json_>> {
    let did = find_repo(&pds, &params.repo)?;
    let path = record_path(&params.collection, &params.rkey)?;
    let account = pds.account(&did)?;
    let account = lock(&account);
    let not_found = || XrpcError::bad("RecordNotFound", format!("Could not locate record: {path}"));
    let (cid, bytes) = account
        .repo
        .get_record(&path)
        .map_err(PdsError::from)?
        .ok_or_else(not_found)?;
    if let Some(wanted) = &params.cid
        && *wanted != cid.to_string()
    {
        return Err(not_found());
    }
    let value = cbor_to_json(bytes).map_err(|err| XrpcError::internal(err.to_string()))?;
    Ok(Json(json!({
        "uri": format!("at://{did}/{path}"),
        "cid": cid.to_string(),
        "value": value,
    })))
}

#[derive(Deserialize)]
struct ListRecordsParams {
    repo: String,
    collection: String,
    limit: Option<i64>,
    cursor: Option<String>,
    reverse: Option<bool>,
}

async fn list_records(
    State(pds): State<Pds>,
    Params(params): Params<ListRecordsParams>,
) -> XrpcResult<Json<Json_>> {
    let did = find_repo(&pds, &params.repo)?;
    let collection: Nsid = parse("collection", &params.collection)?;
    let limit = limit(params.limit, 50, 100)?;
    let account = pds.account(&did)?;
    let account = lock(&account);
    let prefix = format!("{collection}/");
    let mut entries: Vec<(String, Cid)> = account
        .repo
        .list()
        .map_err(PdsError::from)?
        .into_iter()
        .filter(|(path, _)| path.starts_with(&prefix))
        .collect();
    // Newest first by default, as the reference PDS lists (rkeys are usually TIDs).
    let reverse = params.reverse.unwrap_or(false);
    if !reverse {
        entries.reverse();
    }
    let rkey_of = |path: &str| path[prefix.len()..].to_owned();
    let start = match &params.cursor {
        Some(cursor) => entries
            .iter()
            .position(|(path, _)| {
                let rkey = rkey_of(path);
                if reverse {
                    rkey.as_str() > cursor.as_str()
                } else {
                    rkey.as_str() < cursor.as_str()
                }
            })
            .unwrap_or(entries.len()),
        None => 0,
    };
    let page = &entries[start..entries.len().min(start + limit)];
    let mut records = Vec::with_capacity(page.len());
    for (path, cid) in page {
        let Some((_, bytes)) = account.repo.get_record(path).map_err(PdsError::from)? else {
            continue;
        };
        records.push(json!({
            "uri": format!("at://{did}/{path}"),
            "cid": cid.to_string(),
            "value": cbor_to_json(bytes).map_err(|err| XrpcError::internal(err.to_string()))?,
        }));
    }
    let mut out = json!({"records": records});
    if start + limit < entries.len()
        && let Some((path, _)) = page.last()
    {
        out["cursor"] = json!(rkey_of(path));
    }
    Ok(Json(out))
}

/// A record from a client, as DRISL bytes, with `$type` checked against its collection.
fn record_bytes(collection: &Nsid, record: &Json_) -> XrpcResult<Vec<u8>> {
    let mut value =
        Value::from_json(record).map_err(|err| XrpcError::bad("InvalidRecord", err.to_string()))?;
    let Value::Map(map) = &mut value else {
        return Err(XrpcError::bad("InvalidRecord", "record must be an object"));
    };
    match map.get("$type").and_then(Value::as_str) {
        Some(kind) if kind == collection.as_str() => {}
        Some(kind) => {
            return Err(XrpcError::bad(
                "InvalidRecord",
                format!("Invalid $type: expected {collection}, got {kind}"),
            ));
        }
        None => {
            map.insert("$type".to_owned(), Value::String(collection.to_string()));
        }
    }
    value
        .validate_record()
        .map_err(|err| XrpcError::bad("InvalidRecord", err.to_string()))?;
    Ok(value.to_cbor())
}

fn commit_meta(data: &CommitData) -> Json_ {
    json!({"cid": data.cid.to_string(), "rev": data.commit.rev.to_string()})
}

fn parse_cid(name: &str, value: &str) -> XrpcResult<Cid> {
    value
        .parse()
        .map_err(|err| XrpcError::invalid(format!("{name}: {err}")))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateRecordInput {
    repo: String,
    collection: String,
    rkey: Option<String>,
    record: Json_,
    swap_commit: Option<String>,
}

async fn create_record(
    State(pds): State<Pds>,
    session: Session,
    Body(input): Body<CreateRecordInput>,
) -> XrpcResult<Json<Json_>> {
    session.check_repo(&pds, &input.repo)?;
    let collection: Nsid = parse("collection", &input.collection)?;
    let rkey = match &input.rkey {
        Some(rkey) => parse::<RecordKey>("rkey", rkey)?.to_string(),
        None => pds.next_rev().to_string(),
    };
    let path = format!("{collection}/{rkey}");
    let record = record_bytes(&collection, &input.record)?;
    let swap = input
        .swap_commit
        .as_deref()
        .map(|c| parse_cid("swapCommit", c))
        .transpose()?;
    let cid = Cid::dag_cbor(&record);
    let data = pds.write(
        &session.did,
        &[Write::Create {
            path: path.clone(),
            record,
        }],
        swap,
    )?;
    Ok(Json(json!({
        "uri": format!("at://{}/{path}", session.did),
        "cid": cid.to_string(),
        "commit": commit_meta(&data),
        "validationStatus": "unknown",
    })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PutRecordInput {
    repo: String,
    collection: String,
    rkey: String,
    record: Json_,
    swap_record: Option<String>,
    swap_commit: Option<String>,
}

fn check_swap_record(account: &Account, path: &str, swap: Option<&str>) -> XrpcResult<Option<Cid>> {
    let current = account
        .repo
        .get_record(path)
        .map_err(PdsError::from)?
        .map(|(cid, _)| cid);
    if let Some(swap) = swap {
        let expected = parse_cid("swapRecord", swap)?;
        if current != Some(expected) {
            return Err(XrpcError::bad(
                "InvalidSwap",
                format!(
                    "Record was at {}",
                    current.map_or("null".to_owned(), |cid| cid.to_string())
                ),
            ));
        }
    }
    Ok(current)
}

async fn put_record(
    State(pds): State<Pds>,
    session: Session,
    Body(input): Body<PutRecordInput>,
) -> XrpcResult<Json<Json_>> {
    session.check_repo(&pds, &input.repo)?;
    let collection: Nsid = parse("collection", &input.collection)?;
    let path = record_path(&input.collection, &input.rkey)?;
    let record = record_bytes(&collection, &input.record)?;
    let swap = input
        .swap_commit
        .as_deref()
        .map(|c| parse_cid("swapCommit", c))
        .transpose()?;
    let cid = Cid::dag_cbor(&record);
    let account = pds.account(&session.did)?;
    let mut account = lock(&account);
    let current = check_swap_record(&account, &path, input.swap_record.as_deref())?;
    let write = if current.is_some() {
        Write::Update {
            path: path.clone(),
            record,
        }
    } else {
        Write::Create {
            path: path.clone(),
            record,
        }
    };
    let data = pds.write_locked(&mut account, &[write], swap)?;
    Ok(Json(json!({
        "uri": format!("at://{}/{path}", session.did),
        "cid": cid.to_string(),
        "commit": commit_meta(&data),
        "validationStatus": "unknown",
    })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteRecordInput {
    repo: String,
    collection: String,
    rkey: String,
    swap_record: Option<String>,
    swap_commit: Option<String>,
}

async fn delete_record(
    State(pds): State<Pds>,
    session: Session,
    Body(input): Body<DeleteRecordInput>,
) -> XrpcResult<Json<Json_>> {
    session.check_repo(&pds, &input.repo)?;
    let path = record_path(&input.collection, &input.rkey)?;
    let swap = input
        .swap_commit
        .as_deref()
        .map(|c| parse_cid("swapCommit", c))
        .transpose()?;
    let account = pds.account(&session.did)?;
    let mut account = lock(&account);
    let current = check_swap_record(&account, &path, input.swap_record.as_deref())?;
    if current.is_none() {
        // Deleting what is not there is a no-op, as on the reference PDS.
        return Ok(Json(json!({})));
    }
    let data = pds.write_locked(&mut account, &[Write::Delete { path }], swap)?;
    Ok(Json(json!({"commit": commit_meta(&data)})))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApplyWritesInput {
    repo: String,
    writes: Vec<Json_>,
    swap_commit: Option<String>,
}

async fn apply_writes(
    State(pds): State<Pds>,
    session: Session,
    Body(input): Body<ApplyWritesInput>,
) -> XrpcResult<Json<Json_>> {
    session.check_repo(&pds, &input.repo)?;
    if input.writes.len() > 200 {
        return Err(XrpcError::invalid("Too many writes. Max: 200"));
    }
    let swap = input
        .swap_commit
        .as_deref()
        .map(|c| parse_cid("swapCommit", c))
        .transpose()?;
    let mut writes = Vec::with_capacity(input.writes.len());
    let mut results = Vec::with_capacity(input.writes.len());
    for write in &input.writes {
        let kind = write
            .get("$type")
            .and_then(Json_::as_str)
            .unwrap_or_default();
        let field = |name: &str| {
            write
                .get(name)
                .and_then(Json_::as_str)
                .ok_or_else(|| XrpcError::invalid(format!("write is missing {name}")))
        };
        let collection: Nsid = parse("collection", field("collection")?)?;
        match kind {
            "com.atproto.repo.applyWrites#create" | "com.atproto.repo.applyWrites#update" => {
                let rkey = match write.get("rkey").and_then(Json_::as_str) {
                    Some(rkey) => parse::<RecordKey>("rkey", rkey)?.to_string(),
                    None if kind.ends_with("#create") => pds.next_rev().to_string(),
                    None => return Err(XrpcError::invalid("update is missing rkey")),
                };
                let value = write
                    .get("value")
                    .ok_or_else(|| XrpcError::invalid("write is missing value"))?;
                let record = record_bytes(&collection, value)?;
                let path = format!("{collection}/{rkey}");
                let cid = Cid::dag_cbor(&record);
                let create = kind.ends_with("#create");
                results.push(json!({
                    "$type": if create { "com.atproto.repo.applyWrites#createResult" } else { "com.atproto.repo.applyWrites#updateResult" },
                    "uri": format!("at://{}/{path}", session.did),
                    "cid": cid.to_string(),
                    "validationStatus": "unknown",
                }));
                writes.push(if create {
                    Write::Create { path, record }
                } else {
                    Write::Update { path, record }
                });
            }
            "com.atproto.repo.applyWrites#delete" => {
                let rkey: RecordKey = parse("rkey", field("rkey")?)?;
                results.push(json!({"$type": "com.atproto.repo.applyWrites#deleteResult"}));
                writes.push(Write::Delete {
                    path: format!("{collection}/{rkey}"),
                });
            }
            other => return Err(XrpcError::invalid(format!("unknown write type {other:?}"))),
        }
    }
    let data = pds.write(&session.did, &writes, swap)?;
    Ok(Json(
        json!({"commit": commit_meta(&data), "results": results}),
    ))
}

async fn upload_blob(
    State(pds): State<Pds>,
    session: Session,
    headers: HeaderMap,
    body: Bytes,
) -> XrpcResult<Json<Json_>> {
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if mime.is_empty() || !mime.contains('/') || mime.contains(char::is_whitespace) {
        return Err(XrpcError::bad(
            "InvalidMimeType",
            "blob needs a Content-Type like image/png",
        ));
    }
    if body.len() > pds.inner.max_blob_size {
        return Err(XrpcError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "BlobTooLarge",
            format!(
                "blob is {} bytes, the limit is {}",
                body.len(),
                pds.inner.max_blob_size
            ),
        ));
    }
    let size = body.len();
    let cid = pds.put_blob(&session.did, mime.clone(), body)?;
    Ok(Json(json!({
        "blob": {"$type": "blob", "ref": {"$link": cid.to_string()}, "mimeType": mime, "size": size}
    })))
}

#[derive(Deserialize)]
struct DidParams {
    did: String,
}

#[derive(Deserialize)]
struct GetRepoParams {
    did: String,
    since: Option<String>,
}

/// The account behind a sync endpoint's `did`, refused as the reference PDS refuses inactive
/// repos.
fn readable(pds: &Pds, did: &str) -> XrpcResult<std::sync::Arc<std::sync::Mutex<Account>>> {
    let did: Did = parse("did", did)?;
    let account = pds.account(&did)?;
    let status = lock(&account).status;
    if let Some(status) = status.as_str() {
        return Err(PdsError::Inactive {
            did: did.to_string(),
            status,
        }
        .into());
    }
    Ok(account)
}

fn car_response(bytes: impl Into<bytes::Bytes>) -> Response {
    let bytes: bytes::Bytes = bytes.into();
    ([(header::CONTENT_TYPE, "application/vnd.ipld.car")], bytes).into_response()
}

async fn get_repo(
    State(pds): State<Pds>,
    Params(params): Params<GetRepoParams>,
) -> XrpcResult<Response> {
    let since = params
        .since
        .as_deref()
        .map(|s| parse::<Tid>("since", s))
        .transpose()?;
    let account = readable(&pds, &params.did)?;
    let bytes = tokio::task::spawn_blocking(move || {
        let mut account = lock(&account);
        match &since {
            Some(since) => account
                .repo
                .write_car_filtered(Vec::new(), |cid| {
                    account.block_revs.get(cid).is_some_and(|rev| rev > since)
                })
                .map(bytes::Bytes::from),
            None => account.whole_car(),
        }
    })
    .await
    .map_err(|err| XrpcError::internal(err.to_string()))?
    .map_err(PdsError::from)?;
    Ok(car_response(bytes))
}

async fn get_latest_commit(
    State(pds): State<Pds>,
    Params(params): Params<DidParams>,
) -> XrpcResult<Json<Json_>> {
    let account = readable(&pds, &params.did)?;
    let account = lock(&account);
    Ok(Json(json!({
        "cid": account.repo.commit_cid().to_string(),
        "rev": account.repo.rev().to_string(),
    })))
}

fn repo_status(account: &Account) -> Json_ {
    let mut out = json!({
        "did": account.did.as_str(),
        "active": account.status == Status::Active,
        "rev": account.repo.rev().to_string(),
    });
    if let Some(status) = account.status.as_str() {
        out["status"] = json!(status);
    }
    out
}

async fn get_repo_status(
    State(pds): State<Pds>,
    Params(params): Params<DidParams>,
) -> XrpcResult<Json<Json_>> {
    let did: Did = parse("did", &params.did)?;
    let account = pds.account(&did)?;
    let account = lock(&account);
    Ok(Json(repo_status(&account)))
}

#[derive(Deserialize)]
struct PageParams {
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_repos(
    State(pds): State<Pds>,
    Params(params): Params<PageParams>,
) -> XrpcResult<Json<Json_>> {
    let limit = limit(params.limit, 500, 1000)?;
    let page = pds.page(params.cursor.as_deref(), limit + 1);
    let more = page.len() > limit;
    let mut repos = Vec::with_capacity(limit);
    for account in page.iter().take(limit) {
        let account = lock(account);
        let mut repo = repo_status(&account);
        repo["head"] = json!(account.repo.commit_cid().to_string());
        repos.push(repo);
    }
    let mut out = json!({"repos": repos});
    if more && let Some(last) = repos.last() {
        out["cursor"] = last["did"].clone();
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
struct SyncRecordParams {
    did: String,
    collection: String,
    rkey: String,
}

async fn sync_get_record(
    State(pds): State<Pds>,
    Params(params): Params<SyncRecordParams>,
) -> XrpcResult<Response> {
    let path = record_path(&params.collection, &params.rkey)?;
    let account = readable(&pds, &params.did)?;
    let account = lock(&account);
    let proof = account.repo.record_proof(&path).map_err(PdsError::from)?;
    Ok(car_response(proof))
}

#[derive(Deserialize)]
struct BlobParams {
    did: String,
    cid: String,
}

async fn get_blob(
    State(pds): State<Pds>,
    Params(params): Params<BlobParams>,
) -> XrpcResult<Response> {
    let cid = parse_cid("cid", &params.cid)?;
    let account = readable(&pds, &params.did)?;
    let account = lock(&account);
    let blob = account
        .blobs
        .get(&cid.to_string())
        .ok_or_else(|| XrpcError::bad("BlobNotFound", "Blob not found"))?;
    Ok((
        [
            (header::CONTENT_TYPE, blob.mime.clone()),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; sandbox".to_owned(),
            ),
        ],
        blob.bytes.clone(),
    )
        .into_response())
}

#[derive(Deserialize)]
struct ListBlobsParams {
    did: String,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_blobs(
    State(pds): State<Pds>,
    Params(params): Params<ListBlobsParams>,
) -> XrpcResult<Json<Json_>> {
    let limit = limit(params.limit, 500, 1000)?;
    let account = readable(&pds, &params.did)?;
    let account = lock(&account);
    let after = params.cursor.unwrap_or_default();
    let cids: Vec<&String> = account
        .blobs
        .keys()
        .filter(|cid| cid.as_str() > after.as_str())
        .take(limit + 1)
        .collect();
    let mut out = json!({"cids": cids.iter().take(limit).collect::<Vec<_>>()});
    if cids.len() > limit {
        out["cursor"] = json!(cids[limit - 1]);
    }
    Ok(Json(out))
}

async fn subscribe_repos(
    State(pds): State<Pds>,
    Params(params): Params<crate::subscribe::CursorParams>,
    upgrade: WebSocketUpgrade,
) -> XrpcResult<Response> {
    let cursor = params.cursor()?;
    let inner = pds.inner.clone();
    Ok(upgrade.max_message_size(1 << 20).on_upgrade(move |socket| {
        crate::subscribe::serve(
            socket,
            inner.sequencer.clone(),
            cursor,
            inner.subscribe,
            inner.faults.clone(),
            inner.shutdown.clone(),
        )
    }))
}

async fn admin_accounts(State(pds): State<Pds>) -> XrpcResult<Json<Json_>> {
    let mut accounts = Vec::new();
    for did in pds.dids() {
        let info = pds.account_info(&did)?;
        accounts.push(json!({
            "did": info.did.as_str(),
            "handle": info.handle.as_str(),
            "password": info.password,
            "signingKey": info.signing_key,
            "rev": info.rev.to_string(),
            "active": info.status == Status::Active,
            "status": info.status.as_str(),
            "records": info.records,
        }));
    }
    Ok(Json(json!({"accounts": accounts})))
}

async fn admin_account_action(
    State(pds): State<Pds>,
    Path((did, action)): Path<(String, String)>,
    body: Bytes,
) -> XrpcResult<Json<Json_>> {
    let did: Did = parse("did", &did)?;
    let input: Json_ = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|err| XrpcError::invalid(err.to_string()))?
    };
    let pds2 = pds.clone();
    let did2 = did.clone();
    let run = move || -> XrpcResult<()> {
        let pds = pds2;
        let did = did2;
        let text = |name: &str| {
            input
                .get(name)
                .and_then(Json_::as_str)
                .map(str::to_owned)
                .ok_or_else(|| XrpcError::invalid(format!("body needs {name}")))
        };
        match action.as_str() {
            "handle" => pds.set_handle(&did, parse("handle", &text("handle")?)?)?,
            "rotate-key" => {
                let curve = match input.get("curve").and_then(Json_::as_str) {
                    Some("p256") => Curve::P256,
                    _ => Curve::K256,
                };
                pds.rotate_key(&did, curve)?;
            }
            "deactivate" => pds.set_status(&did, Status::Deactivated)?,
            "activate" => pds.set_status(&did, Status::Active)?,
            "takedown" => pds.set_status(&did, Status::Takendown)?,
            "suspend" => pds.set_status(&did, Status::Suspended)?,
            "delete" => pds.delete_account(&did)?,
            "migrate" => {
                let to = text("to")?;
                let target = pds
                    .inner
                    .peers
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .find(|peer| peer.url() == to.trim_end_matches('/'))
                    .cloned()
                    .ok_or_else(|| XrpcError::invalid(format!("no devnet PDS at {to}")))?;
                pds.migrate(&did, &target)?;
            }
            other => {
                return Err(XrpcError::new(
                    StatusCode::NOT_FOUND,
                    "InvalidRequest",
                    format!("unknown admin action {other:?}"),
                ));
            }
        }
        Ok(())
    };
    tokio::task::spawn_blocking(run)
        .await
        .map_err(|err| XrpcError::internal(err.to_string()))??;
    Ok(Json(json!({"did": did.as_str(), "ok": true})))
}
