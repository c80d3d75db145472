//! `atpdb demo`: a newcomer's first minute. A devnet with live traffic on loopback, `atpdb
//! serve` syncing all of it (full-network mode, found through the relay's `listRepos`), with
//! progress on screen, then the API, until Ctrl-C. Nothing leaves the
//! machine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_store::RepoState;
use atpdb_sync::Engine;
use clap::{Args, Parser};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::serve::ServeArgs;

/// Options of `atpdb demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// PDS hosts in the demo network.
    #[arg(long, default_value_t = 3)]
    pds: usize,
    /// Accounts to seed.
    #[arg(long, default_value_t = 60)]
    accounts: usize,
    /// Records per account.
    #[arg(long, default_value_t = 40)]
    records: usize,
    /// Commits per second of live traffic once seeded.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Address of the API and status page.
    #[arg(long, default_value = "127.0.0.1:2480")]
    bind: String,
    /// Keep the mirror here (default: a temporary directory removed at exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Parses serve's options from arguments, so the demo runs exactly what `atpdb serve` runs.
#[derive(Debug, Parser)]
struct ServeCli {
    #[command(flatten)]
    serve: ServeArgs,
}

pub(crate) fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    crate::logging::init_with("human", "warn")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    eprintln!(
        "demo: starting a network on 127.0.0.1: {} PDS hosts, {} accounts × {} records, a relay, a PLC directory",
        args.pds, args.accounts, args.records
    );
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: args.pds.max(1),
        accounts: args.accounts,
        records: args.records,
        rate: args.rate,
        ..DevnetConfig::default()
    })
    .await
    .context("starting the devnet")?;
    let temporary = match &args.data_dir {
        Some(_) => None,
        None => Some(tempfile::tempdir().context("creating a temporary data directory")?),
    };
    let data_dir = match (&args.data_dir, &temporary) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => dir.path().to_path_buf(),
        (None, None) => anyhow::bail!("no data directory"),
    };
    let relay = devnet.relay().context("the devnet has no relay")?.url();
    let dns = devnet.dns_addr().to_string();
    let data = data_dir.display().to_string();
    let cli = ServeCli::try_parse_from([
        "atpdb-demo",
        "--data-dir",
        &data,
        "--bind",
        &args.bind,
        "--relay-url",
        relay,
        "--plc-url",
        devnet.plc_url(),
        "--full-network",
        "true",
        "--allow-private-network",
        "--dns-nameserver",
        &dns,
        "--did-web-http",
        "--min-backoff-secs",
        "1",
        "--max-backoff-secs",
        "5",
    ])
    .context("the demo's serve options")?;
    let accounts = args.accounts as u64;
    let data_dir = cli.serve.data_dir().to_owned();
    let code = crate::serve::serve_with(cli.serve, move |engine, url| {
        crate::serve::announce(url, &data_dir);
        tokio::spawn(progress(engine.clone(), url.to_owned(), accounts));
    })
    .await;
    devnet.shutdown().await;
    drop(temporary);
    code
}

/// Shows the sync converging: a bar on a terminal, a line every few seconds otherwise.
async fn progress(engine: Engine, url: String, accounts: u64) {
    let store = engine.store().clone();
    let bar = ProgressBar::with_draw_target(Some(accounts), ProgressDrawTarget::stderr());
    let terminal = !bar.is_hidden();
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} syncing [{bar:30}] {pos}/{len} repos · {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    let started = Instant::now();
    let mut last_line = Instant::now();
    let mut announced = false;
    loop {
        let synced = store.count_in_state(RepoState::Synced).unwrap_or(0);
        let records = store.record_count();
        let events = store.last_event_id();
        let commits = engine.counters().commits_applied.load(Ordering::Relaxed);
        let message = format!("{records} records · {events} events · {commits} live commits");
        if terminal {
            bar.set_position(synced);
            bar.set_message(message.clone());
            bar.tick();
        } else if last_line.elapsed() >= Duration::from_secs(3) {
            eprintln!("demo: {synced}/{accounts} repos synced · {message}");
            last_line = Instant::now();
        }
        if synced >= accounts && !announced {
            announced = true;
            bar.finish_and_clear();
            eprintln!(
                "demo: all {accounts} repos verified and synced in {:.1}s; following the firehose.\n\
                 \n  repos         {url}/repos\n  events        {url}/channel (Tap's WebSocket)\n  metrics       {url}/metrics\n  a record      {url}/query?uri=at://*/app.bsky.feed.post/*&limit=1\n\nCtrl-C stops.",
                started.elapsed().as_secs_f64()
            );
        }
        if engine.is_shutting_down() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
