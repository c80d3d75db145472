//! `GET /metrics`: Prometheus text exposition of the engine's, the store's and delivery's
//! counters.
//!
//! Written by hand: every figure already lives in an atomic or a store counter, so a
//! metrics registry would only copy them; the text format is a few lines of `writeln!`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use atpdb_store::RepoState;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::App;

/// How one per-host figure is read from the host's counters.
type HostValue = fn(&atpdb_net::HostStats) -> String;

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// One metric with its help and type lines.
fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Escapes a label value (backslash, quote, newline), as the text format requires.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(crate) async fn metrics(State(app): State<App>) -> Response {
    let mut out = String::with_capacity(4096);
    let counters = app.engine.counters();
    let engine_counters: [(&str, &str, &AtomicU64); 12] = [
        (
            "atpdb_firehose_events_received_total",
            "Firehose events received.",
            &counters.events_in,
        ),
        (
            "atpdb_commits_applied_total",
            "Firehose commits verified and applied.",
            &counters.commits_applied,
        ),
        (
            "atpdb_commits_unproven_total",
            "Commits applied without prevData (the host omits it).",
            &counters.commits_unproven,
        ),
        (
            "atpdb_commits_stale_total",
            "Commits dropped as stale or duplicate revs.",
            &counters.commits_stale,
        ),
        (
            "atpdb_commits_invalid_total",
            "Commits that failed verification.",
            &counters.commits_invalid,
        ),
        (
            "atpdb_frames_invalid_total",
            "Firehose frames that did not decode.",
            &counters.frames_invalid,
        ),
        (
            "atpdb_desyncs_total",
            "Repos that became desynchronized.",
            &counters.desyncs,
        ),
        (
            "atpdb_resyncs_completed_total",
            "Resyncs (backfills) finished.",
            &counters.resyncs_done,
        ),
        (
            "atpdb_resyncs_failed_total",
            "Resyncs (backfills) failed.",
            &counters.resyncs_failed,
        ),
        (
            "atpdb_backfill_records_total",
            "Records written by resyncs.",
            &counters.backfill_records,
        ),
        (
            "atpdb_resyncs_since_total",
            "Catch-ups applied from getRepo?since= (only the changed blocks fetched).",
            &counters.resyncs_since,
        ),
        (
            "atpdb_resyncs_since_fallback_total",
            "getRepo?since= catch-ups that could not be proven and fetched the whole repo.",
            &counters.resyncs_since_fallback,
        ),
    ];
    for (name, help, counter) in engine_counters {
        metric(&mut out, name, "counter", help, load(counter));
    }
    metric(
        &mut out,
        "atpdb_intake_paused",
        "gauge",
        "Intake tasks paused because the outbox holds --outbox-limit undelivered events.",
        load(&counters.intake_paused),
    );
    let _ = writeln!(
        out,
        "# HELP atpdb_intake_paused_seconds_total Time intake spent paused for a full outbox.\n# TYPE atpdb_intake_paused_seconds_total counter\natpdb_intake_paused_seconds_total {:.3}",
        load(&counters.intake_paused_us) as f64 / 1e6
    );
    metric(
        &mut out,
        "atpdb_firehose_cursor",
        "gauge",
        "The firehose low-water mark a restart resumes from.",
        load(&counters.firehose_cursor),
    );

    let store = app.engine.store();
    let _ = writeln!(
        out,
        "# HELP atpdb_repos Tracked repos by state.\n# TYPE atpdb_repos gauge"
    );
    for state in RepoState::ALL {
        let count = store.count_in_state(state).unwrap_or(0);
        let _ = writeln!(out, "atpdb_repos{{state=\"{}\"}} {count}", state.as_str());
    }
    metric(
        &mut out,
        "atpdb_records",
        "gauge",
        "Records stored.",
        store.record_count(),
    );
    metric(
        &mut out,
        "atpdb_outbox_events",
        "gauge",
        "Events in the outbox not yet acknowledged (the delivery backlog).",
        store.outbox_len(),
    );
    metric(
        &mut out,
        "atpdb_last_event_id",
        "counter",
        "The highest event id assigned.",
        store.last_event_id(),
    );
    metric(
        &mut out,
        "atpdb_resync_buffer",
        "gauge",
        "Live commits buffered while their repos backfill.",
        store.buffer_len(),
    );

    let stats = app.delivery.stats();
    let delivery: [(&str, &str, &str, &AtomicU64); 7] = [
        (
            "atpdb_events_sent_total",
            "counter",
            "Events handed to consumers (re-sends included).",
            &stats.sent,
        ),
        (
            "atpdb_events_resent_total",
            "counter",
            "Events sent again (socket dropped, ack timeout, webhook retry).",
            &stats.resent,
        ),
        (
            "atpdb_events_acked_total",
            "counter",
            "Events acknowledged.",
            &stats.acked,
        ),
        (
            "atpdb_delivery_in_flight",
            "gauge",
            "Events sent and not acknowledged.",
            &stats.in_flight,
        ),
        (
            "atpdb_delivery_loaded",
            "gauge",
            "Outbox events held in memory for delivery.",
            &stats.loaded,
        ),
        (
            "atpdb_consumers",
            "gauge",
            "Connected consumers (sockets, webhook workers).",
            &stats.consumers,
        ),
        (
            "atpdb_webhook_failures_total",
            "counter",
            "Webhook calls that failed.",
            &stats.webhook_failures,
        ),
    ];
    for (name, kind, help, counter) in delivery {
        metric(&mut out, name, kind, help, load(counter));
    }

    let hosts = app.engine.xrpc().stats();
    let per_host: [(&str, &str, HostValue); 5] = [
        (
            "atpdb_host_requests_total",
            "HTTP requests per host.",
            |s| s.requests.to_string(),
        ),
        (
            "atpdb_host_errors_total",
            "Failed requests per host.",
            |s| s.errors.to_string(),
        ),
        (
            "atpdb_host_rate_limited_total",
            "429 answers per host.",
            |s| s.rate_limited.to_string(),
        ),
        (
            "atpdb_host_rate_limit_waits_total",
            "Requests that waited for a host's rate-limit pause.",
            |s| s.rate_limit_waits.to_string(),
        ),
        (
            "atpdb_host_rate_limit_wait_seconds_total",
            "Time spent waiting for a host's rate-limit pause.",
            |s| format!("{:.3}", s.rate_limit_wait.as_secs_f64()),
        ),
    ];
    for (name, help, value) in per_host {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (host, stats) in &hosts {
            let _ = writeln!(out, "{name}{{host=\"{}\"}} {}", label(host), value(stats));
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
