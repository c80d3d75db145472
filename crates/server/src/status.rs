//! The status page at `/` and the figures it polls (`/status.json`).
//!
//! One self-contained HTML file (inline CSS and JS, no CDN, no fonts) so it works on a
//! machine with no internet; it polls `status.json` every second and draws events per
//! second from successive `last_event_id`s.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use atpdb_store::RepoState;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde_json::{Value, json};

use crate::{ApiError, App};

/// Errored repos shown at once.
const ERRORS_SHOWN: usize = 20;
/// Samples the chart keeps: two minutes at one a second.
const HISTORY: usize = 120;

/// Recent `(time µs, last event id)` samples, so the chart has a past the moment the page
/// opens.
pub(crate) type History = Arc<Mutex<VecDeque<(u64, u64)>>>;

/// Samples the event counter once a second until the engine shuts down (when there is a
/// runtime to do it on; without one the chart starts empty).
pub(crate) fn sample(engine: &atpdb_sync::Engine, history: &History) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (engine, history) = (engine.clone(), history.clone());
    runtime.spawn(async move {
        let stop = engine.shutdown_token();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let sample = (atpdb_sync::now_us(), engine.store().last_event_id());
            let mut samples = history.lock().unwrap_or_else(PoisonError::into_inner);
            samples.push_back(sample);
            while samples.len() > HISTORY {
                samples.pop_front();
            }
        }
    });
}

pub(crate) async fn page() -> Response {
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Html(include_str!("status.html")),
    )
        .into_response()
}

pub(crate) async fn figures(State(app): State<App>) -> Result<axum::Json<Value>, ApiError> {
    let store = app.engine.store().clone();
    let (repos, errors, runs, cursors) = crate::blocking(move || {
        let mut repos = serde_json::Map::new();
        for state in RepoState::ALL {
            repos.insert(
                state.as_str().to_owned(),
                store.count_in_state(state)?.into(),
            );
        }
        let errors = store.repos_in_state(RepoState::Error, ERRORS_SHOWN)?;
        let runs = store.runs()?;
        let cursors = store.cursors()?;
        Ok((repos, errors, runs, cursors))
    })
    .await?;
    let store = app.engine.store();
    let counters = app.engine.counters();
    let delivery = app.delivery.stats();
    let mut runs = runs;
    runs.sort_by_key(|run| std::cmp::Reverse(run.id));
    runs.truncate(10);
    let history: Vec<(u64, u64)> = app
        .history
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .copied()
        .collect();
    Ok(axum::Json(json!({
        "time_us": atpdb_sync::now_us(),
        "history": history,
        "repos": repos,
        "records": store.record_count(),
        "last_event_id": store.last_event_id(),
        "outbox": store.outbox_len(),
        "resync_buffer": store.buffer_len(),
        "firehose": {
            "cursor": counters.firehose_cursor.load(Ordering::Relaxed),
            "events_in": counters.events_in.load(Ordering::Relaxed),
            "commits_applied": counters.commits_applied.load(Ordering::Relaxed),
            "commits_invalid": counters.commits_invalid.load(Ordering::Relaxed),
            "desyncs": counters.desyncs.load(Ordering::Relaxed),
        },
        "delivery": {
            "mode": app.delivery.mode().name(),
            "sent": delivery.sent.load(Ordering::Relaxed),
            "acked": delivery.acked.load(Ordering::Relaxed),
            "in_flight": delivery.in_flight.load(Ordering::Relaxed),
            "consumers": delivery.consumers.load(Ordering::Relaxed),
        },
        "errors": errors.iter().map(|entry| json!({
            "did": entry.did.as_str(),
            "error": entry.error.clone().unwrap_or_default(),
            "retries": entry.retries,
        })).collect::<Vec<_>>(),
        "runs": runs.iter().map(|run| json!({
            "id": run.id,
            "kind": run.kind,
            "finished_us": run.finished_us,
            "done": run.done,
            "total": run.total,
            "records": run.records,
            "errors": run.errors,
        })).collect::<Vec<_>>(),
        "cursors": cursors.iter().map(|(name, value)| json!({"name": name, "value": value})).collect::<Vec<_>>(),
    })))
}
