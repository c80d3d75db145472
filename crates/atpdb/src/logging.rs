//! Logs: `tracing` events, human-readable by default or JSON lines, on stderr so stdout
//! stays for the one machine-readable ready line. `RUST_LOG` filters (default `info`).

use anyhow::Context;
use tracing_subscriber::EnvFilter;

pub(crate) fn init(format: &str) -> anyhow::Result<()> {
    init_with(format, "info")
}

/// [`init`] with another default level (the demo's screen is its progress, not its logs).
pub(crate) fn init_with(format: &str, default: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "human" => builder.try_init(),
        "json" => builder.json().try_init(),
        other => anyhow::bail!("--log-format must be human or json, not {other:?}"),
    }
    .map_err(|err| anyhow::anyhow!("{err}"))
    .context("installing the logger")
}

/// Logs appended to a file at `info` (`RUST_LOG` filters), for a process whose terminal
/// belongs to something else (the REPL's prompt).
pub(crate) fn init_file(format: &str, path: &std::path::Path) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the log {}", path.display()))?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file));
    match format {
        "human" => builder.try_init(),
        "json" => builder.json().try_init(),
        other => anyhow::bail!("--log-format must be human or json, not {other:?}"),
    }
    .map_err(|err| anyhow::anyhow!("{err}"))
    .context("installing the logger")
}
