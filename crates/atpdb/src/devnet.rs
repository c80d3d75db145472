//! `atpdb devnet`: the loopback network as a long-running process.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use atpdb_devnet::faults::FaultSet;
use atpdb_devnet::{Devnet, DevnetConfig};
use clap::Args;

/// Options of `atpdb devnet`.
#[derive(Debug, Args)]
pub(crate) struct DevnetArgs {
    /// PDS hosts to run, one port each.
    #[arg(long, default_value_t = 2)]
    pds: usize,
    /// Accounts to seed across the hosts.
    #[arg(long, default_value_t = 10)]
    accounts: usize,
    /// Generated records per account (plus a profile).
    #[arg(long, default_value_t = 20)]
    records: usize,
    /// Commits per second to keep writing once seeded (0: none).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seed for the generated traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Events each host keeps for cursor replay.
    #[arg(long, default_value_t = 1_000_000)]
    replay_window: usize,
    /// Password of the admin API (user `admin`).
    #[arg(long, env = "ATPDB_DEVNET_ADMIN_PASSWORD", default_value = "admin")]
    admin_password: String,
    /// Faults every PDS starts with, as JSON (the body `POST /admin/faults` takes).
    #[arg(long)]
    pds_faults: Option<String>,
    /// Faults the relay starts with, as JSON.
    #[arg(long)]
    relay_faults: Option<String>,
    /// Run without a relay.
    #[arg(long)]
    no_relay: bool,
    /// Also run a labeler host (signed labels on subscribeLabels and queryLabels; its DID
    /// and URL are in the ready line).
    #[arg(long)]
    labeler: bool,
    /// Measure instead of serving: seed, then write as fast as the hosts accept for this
    /// many seconds, print the figures as JSON and exit.
    #[arg(long)]
    bench_seconds: Option<u64>,
}

fn faults(json: Option<&str>, what: &str) -> anyhow::Result<FaultSet> {
    json.map_or(Ok(FaultSet::default()), |json| {
        serde_json::from_str(json).with_context(|| format!("--{what} is not a valid fault set"))
    })
}

pub(crate) fn run(args: DevnetArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: DevnetArgs) -> anyhow::Result<ExitCode> {
    let pds_faults = faults(args.pds_faults.as_deref(), "pds-faults")?;
    let mut config = DevnetConfig {
        pds_hosts: args.pds.max(1),
        accounts: args.accounts,
        records: args.records,
        rate: if args.bench_seconds.is_some() {
            0.0
        } else {
            args.rate
        },
        seed: args.seed,
        pds_faults: vec![pds_faults; args.pds.max(1)],
        with_relay: !args.no_relay,
        with_labeler: args.labeler,
        ..DevnetConfig::default()
    };
    config.pds.replay_window = args.replay_window;
    config.pds.admin_password = args.admin_password.clone();
    config.relay.replay_window = args.replay_window;
    config.relay.admin_password = args.admin_password;
    config.relay.faults = faults(args.relay_faults.as_deref(), "relay-faults")?;
    let started = Instant::now();
    let devnet = Devnet::start(config).await.context("starting the devnet")?;
    let ready_ms = started.elapsed().as_millis() as u64;
    let mut ready = devnet.ready_info();
    ready["ready_ms"] = ready_ms.into();
    if let Some(seconds) = args.bench_seconds {
        return bench(devnet, ready, seconds).await;
    }
    // Listening before the ready line: a Ctrl-C right after it must reach this handler, not
    // the default one that kills the process without shutting the servers down.
    let mut interrupt = Interrupt::listen()?;
    println!("{ready}");
    let mut last = (Instant::now(), 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tokio::select! {
            signal = interrupt.recv() => {
                signal.context("waiting for Ctrl-C")?;
                break;
            }
            _ = tick.tick(), if args.rate > 0.0 => {
                let commits = devnet.traffic_stats().commits.load(std::sync::atomic::Ordering::Relaxed);
                let rate = (commits - last.1) as f64 / last.0.elapsed().as_secs_f64();
                eprintln!("traffic: {rate:.0} commits/s ({commits} in all)");
                last = (Instant::now(), commits);
            }
        }
    }
    devnet.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Writes as fast as the hosts accept with the relay following, and reports commits/s.
async fn bench(
    mut devnet: Devnet,
    mut ready: serde_json::Value,
    seconds: u64,
) -> anyhow::Result<ExitCode> {
    let relay_before = devnet.relay().map_or(0, |relay| relay.head_seq());
    let started = Instant::now();
    devnet.start_traffic(f64::INFINITY);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    devnet.stop_traffic();
    let elapsed = started.elapsed().as_secs_f64();
    let stats = devnet.traffic_stats();
    let commits = stats.commits.load(std::sync::atomic::Ordering::Relaxed);
    let errors = stats.errors.load(std::sync::atomic::Ordering::Relaxed);
    let caught_up = devnet.wait_for_relay(Duration::from_secs(60)).await;
    let relay_total = started.elapsed().as_secs_f64();
    let relayed = devnet.relay().map_or(0, |relay| relay.head_seq()) - relay_before;
    ready["bench"] = serde_json::json!({
        "seconds": elapsed,
        "commits": commits,
        "errors": errors,
        "commits_per_second": commits as f64 / elapsed,
        "relay_caught_up": caught_up,
        "relay_events": relayed,
        "relay_events_per_second": relayed as f64 / relay_total,
    });
    println!("{ready}");
    devnet.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C, registered when made (tokio's `ctrl_c()` registers only when first polled).
struct Interrupt {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Interrupt {
    fn listen() -> anyhow::Result<Interrupt> {
        Ok(Interrupt {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .context("listening for Ctrl-C")?,
        })
    }

    async fn recv(&mut self) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            self.signal.recv().await;
            Ok(())
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c().await
        }
    }
}
