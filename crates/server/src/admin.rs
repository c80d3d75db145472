//! Routes beyond Tap's: list and inspect repos, resync, backfill runs, the running
//! configuration, and at:// queries over the mirror. Tap has none of these (its users asked:
//! indigo #1252 list repos, #1261 resync).

use atpdb_repo::syntax::{Did, Nsid, RecordKey};
use atpdb_store::{BackfillRun, RepoEntry, RepoState};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ApiError, App, parse_did, record_json};

/// The largest page any list route returns.
const MAX_PAGE: usize = 1000;

fn page_limit(limit: Option<&str>, default: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(default),
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=MAX_PAGE).contains(&limit) => Ok(limit),
            _ => Err(ApiError::bad_request(format!(
                "limit must be an integer from 1 to {MAX_PAGE}"
            ))),
        },
    }
}

/// A repo as the API shows it: Tap's `/info` fields plus what Tap keeps to itself.
fn repo_json(entry: &RepoEntry, records: Option<u64>) -> Value {
    let mut value = json!({
        "did": entry.did.as_str(),
        "handle": entry.handle.clone().unwrap_or_default(),
        "state": entry.state.as_str(),
        "status": entry.status.as_str(),
        "rev": entry.rev.clone().unwrap_or_default(),
        "error": entry.error.clone().unwrap_or_default(),
        "retries": entry.retries,
        "pds": entry.pds.clone().unwrap_or_default(),
        "retry_after_us": entry.retry_after_us,
        "last_sync_us": entry.last_sync_us,
        "added_us": entry.added_us,
    });
    if let (Some(records), Some(object)) = (records, value.as_object_mut()) {
        object.insert("records".to_owned(), records.into());
    }
    value
}

#[derive(Deserialize)]
pub(crate) struct ReposParams {
    state: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

/// `GET /repos?state=&cursor=&limit=`: tracked repos in DID order, a page at a time (the
/// last DID of a page is the next page's cursor).
pub(crate) async fn list(
    State(app): State<App>,
    Query(params): Query<ReposParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let limit = page_limit(params.limit.as_deref(), 100)?;
    let state = params
        .state
        .as_deref()
        .map(str::parse::<RepoState>)
        .transpose()
        .map_err(|err| ApiError::bad_request(err.to_string()))?;
    let after = params.cursor.as_deref().map(parse_did).transpose()?;
    let store = app.engine.store().clone();
    let repos = crate::blocking(move || match state {
        Some(state) => store.repos_in_state_after(state, after.as_ref(), limit),
        None => store.repos(after.as_ref(), limit),
    })
    .await?;
    Ok(axum::Json(page(&repos, limit)))
}

fn page(repos: &[RepoEntry], limit: usize) -> Value {
    let mut body = json!({
        "repos": repos.iter().map(|entry| repo_json(entry, None)).collect::<Vec<_>>(),
    });
    if repos.len() == limit
        && let (Some(last), Some(object)) = (repos.last(), body.as_object_mut())
    {
        object.insert("cursor".to_owned(), last.did.as_str().into());
    }
    body
}

/// `GET /repos/errors`: repos whose last sync failed, with the reason and the next retry.
pub(crate) async fn errors(
    State(app): State<App>,
    Query(params): Query<ReposParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let limit = page_limit(params.limit.as_deref(), 100)?;
    let after = params.cursor.as_deref().map(parse_did).transpose()?;
    let store = app.engine.store().clone();
    let repos = crate::blocking(move || {
        store.repos_in_state_after(RepoState::Error, after.as_ref(), limit)
    })
    .await?;
    Ok(axum::Json(page(&repos, limit)))
}

/// `GET /repos/:did`: everything known about one repo, with its record count and
/// collections.
pub(crate) async fn show(
    State(app): State<App>,
    Path(did): Path<String>,
) -> Result<Response, ApiError> {
    let did = parse_did(&did)?;
    let store = app.engine.store().clone();
    let found = crate::blocking(move || {
        let Some(entry) = store.repo(&did)? else {
            return Ok(None);
        };
        let records = store.record_count_of(&did)?;
        let collections = store.collections(&did, MAX_PAGE)?;
        Ok(Some((entry, records, collections)))
    })
    .await?;
    let Some((entry, records, collections)) = found else {
        return Ok(crate::message(StatusCode::NOT_FOUND, "repo not found"));
    };
    let mut value = repo_json(&entry, Some(records));
    if let Some(object) = value.as_object_mut() {
        object.insert("collections".to_owned(), collections.into());
    }
    Ok(axum::Json(value).into_response())
}

#[derive(Deserialize)]
struct ResyncPayload {
    #[serde(default)]
    dids: Vec<String>,
    /// Every repo in the error state.
    #[serde(default)]
    errors: bool,
}

/// `POST /repos/resync` with `{"dids": [...]}` or `{"errors": true}`: a fresh snapshot of
/// those repos (the diff against it emits creates, updates and deletes).
pub(crate) async fn resync(
    State(app): State<App>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let payload: ResyncPayload = serde_json::from_slice(&body).map_err(|err| {
        ApiError::bad_request(format!(
            "body must be {{\"dids\": [...]}} or {{\"errors\": true}}: {err}"
        ))
    })?;
    let mut dids = payload
        .dids
        .iter()
        .map(|text| parse_did(text))
        .collect::<Result<Vec<Did>, _>>()?;
    if payload.errors {
        let store = app.engine.store().clone();
        let mut after: Option<Did> = None;
        loop {
            let cursor = after.clone();
            let page = crate::blocking({
                let store = store.clone();
                move || store.repos_in_state_after(RepoState::Error, cursor.as_ref(), MAX_PAGE)
            })
            .await?;
            let full = page.len() == MAX_PAGE;
            after = page.last().map(|entry| entry.did.clone());
            dids.extend(page.into_iter().map(|entry| entry.did));
            if !full {
                break;
            }
        }
    }
    let marked = app.engine.resync(&dids).await.map_err(ApiError::internal)?;
    Ok(axum::Json(json!({ "resyncing": marked })))
}

fn run_json(run: &BackfillRun) -> Value {
    json!({
        "id": run.id,
        "kind": run.kind,
        "started_us": run.started_us,
        "finished_us": run.finished_us,
        "done": run.done,
        "total": run.total,
        "records": run.records,
        "errors": run.errors,
        "checkpoint": run.checkpoint,
    })
}

/// `GET /runs`: backfill runs (crawls, catch-ups) with their progress, newest first.
pub(crate) async fn runs(State(app): State<App>) -> Result<axum::Json<Value>, ApiError> {
    let store = app.engine.store().clone();
    let mut runs = crate::blocking(move || store.runs()).await?;
    runs.sort_by_key(|run| std::cmp::Reverse(run.id));
    Ok(axum::Json(
        json!({ "runs": runs.iter().map(run_json).collect::<Vec<_>>() }),
    ))
}

/// `GET /config`: the scope and settings the engine runs with.
pub(crate) async fn config(State(app): State<App>) -> axum::Json<Value> {
    axum::Json(config_json(&app))
}

fn config_json(app: &App) -> Value {
    let config = app.engine.config();
    let mut value = app.engine.scope().to_json();
    if let Some(object) = value.as_object_mut() {
        object.insert("relay_url".to_owned(), config.relay_url.clone().into());
        object.insert(
            "resync_parallelism".to_owned(),
            config.resync_parallelism.into(),
        );
        object.insert(
            "firehose_parallelism".to_owned(),
            config.firehose_parallelism.into(),
        );
        object.insert("follow_firehose".to_owned(), config.follow_firehose.into());
        object.insert("delivery".to_owned(), app.delivery.mode().name().into());
    }
    value
}

/// `PUT /config` with any of `mode`, `signal_collections`, `collection_filters`: changes
/// the scope of the running engine and of later runs. A change that keeps more records
/// resyncs the synced repos (a `scope` run, see `GET /runs`); the answer says how many.
pub(crate) async fn set_config(
    State(app): State<App>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let change: Value = serde_json::from_slice(&body)
        .map_err(|err| ApiError::bad_request(format!("body must be a JSON object: {err}")))?;
    let scope = app
        .engine
        .scope()
        .updated(&change)
        .map_err(ApiError::bad_request)?;
    let resyncing = app
        .engine
        .set_scope(scope)
        .await
        .map_err(ApiError::internal)?;
    let mut value = config_json(&app);
    if let Some(object) = value.as_object_mut() {
        object.insert("resyncing".to_owned(), resyncing.into());
    }
    Ok(axum::Json(value))
}

#[derive(Deserialize)]
pub(crate) struct QueryParams {
    uri: String,
    cursor: Option<String>,
    limit: Option<String>,
}

/// `GET /query?uri=`: the seed's at:// patterns over the mirror.
///
/// - `at://did/collection/rkey`: one record (404 when absent);
/// - `at://did/collection/*` (or `at://did/collection`): that repo's records of the
///   collection, in key order, paged;
/// - `at://*/collection/*`: that collection across every tracked repo, in (DID, key) order,
///   paged by `did/rkey` cursors. There is no index by collection: each page walks repos in
///   order until it is full, so a rare collection costs a pass over the repo list.
pub(crate) async fn query(
    State(app): State<App>,
    Query(params): Query<QueryParams>,
) -> Result<Response, ApiError> {
    let limit = page_limit(params.limit.as_deref(), 100)?;
    let rest = params
        .uri
        .strip_prefix("at://")
        .ok_or_else(|| ApiError::bad_request("uri must start with at://"))?;
    let mut parts = rest.split('/');
    let (authority, collection, rkey) = (parts.next(), parts.next(), parts.next());
    if parts.next().is_some() {
        return Err(ApiError::bad_request(
            "uri has too many segments (at://did/collection/rkey)",
        ));
    }
    let collection = collection
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ApiError::bad_request("uri needs a collection: at://did/collection/*"))?;
    let collection = collection
        .parse::<Nsid>()
        .map_err(|err| ApiError::bad_request(format!("collection: {err}")))?;
    let store = app.engine.store().clone();
    match (authority.unwrap_or_default(), rkey) {
        ("*", Some("*") | None) => {
            let cursor = params.cursor.clone();
            let (records, next) = crate::blocking(move || {
                across_repos(&store, collection.as_str(), cursor.as_deref(), limit)
            })
            .await?;
            Ok(axum::Json(listing(&records, next)).into_response())
        }
        ("*", Some(_)) => Err(ApiError::bad_request(
            "at://*/collection/rkey is not a pattern: use at://*/collection/*",
        )),
        (did, Some(rkey)) if rkey != "*" => {
            let did = parse_did(did)?;
            rkey.parse::<RecordKey>()
                .map_err(|err| ApiError::bad_request(format!("rkey: {err}")))?;
            let rkey = rkey.to_owned();
            let found =
                crate::blocking(move || store.record(&did, collection.as_str(), &rkey)).await?;
            Ok(match found {
                Some(record) => axum::Json(record_json(&record)).into_response(),
                None => crate::message(StatusCode::NOT_FOUND, "record not found"),
            })
        }
        (did, _) => {
            let did = parse_did(did)?;
            let cursor = params.cursor.clone();
            let records = crate::blocking(move || {
                store.records(
                    &did,
                    Some(collection.as_str()),
                    cursor.as_deref(),
                    limit,
                    false,
                )
            })
            .await?;
            let next = (records.len() == limit)
                .then(|| records.last().map(|record| record.rkey().to_string()))
                .flatten();
            Ok(axum::Json(listing(&records, next)).into_response())
        }
    }
}

fn listing(records: &[atpdb_repo::Record], cursor: Option<String>) -> Value {
    let mut body = json!({ "records": records.iter().map(record_json).collect::<Vec<_>>() });
    if let (Some(cursor), Some(object)) = (cursor, body.as_object_mut()) {
        object.insert("cursor".to_owned(), cursor.into());
    }
    body
}

/// One page of `collection` across repos, from the cursor `did/rkey` (exclusive).
fn across_repos(
    store: &atpdb_store::Store,
    collection: &str,
    cursor: Option<&str>,
    limit: usize,
) -> Result<(Vec<atpdb_repo::Record>, Option<String>), atpdb_store::StoreError> {
    let start = cursor
        .and_then(|cursor| cursor.rsplit_once('/'))
        .and_then(|(did, rkey)| Some((did.parse::<Did>().ok()?, rkey.to_owned())));
    let mut records = Vec::new();
    let mut did = None;
    // The rest of the cursor's own repo first, then the repos after it.
    if let Some((current, after_rkey)) = start {
        records.extend(store.records(
            &current,
            Some(collection),
            Some(&after_rkey),
            limit,
            false,
        )?);
        did = Some(current);
    }
    while records.len() < limit {
        let repos = store.repos(did.as_ref(), 256)?;
        let Some(last) = repos.last() else {
            break;
        };
        did = Some(last.did.clone());
        for entry in &repos {
            let want = limit - records.len();
            records.extend(store.records(&entry.did, Some(collection), None, want, false)?);
            if records.len() >= limit {
                break;
            }
        }
    }
    let next = (records.len() >= limit)
        .then(|| {
            records
                .last()
                .map(|record| format!("{}/{}", record.did(), record.rkey()))
        })
        .flatten();
    records.truncate(limit);
    Ok((records, next))
}
