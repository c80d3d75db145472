//! The `atpdb` command: thin glue over the library crates.

mod car;
mod demo;
mod devnet;
mod fleet;
mod logging;
mod remote;
mod repl;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v2's `mimalloc.h` (the bindings predate its name).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc keeps freed pages before it returns them to the system, in ms, for a
/// process that must stay within a memory bound (`atpdb serve`). Its default (10 ms) keeps
/// them long enough that what it holds grows with the rate of allocation rather than with
/// what is live: a 1 GB backfill's peak once reached 262 MB (bound 256). At 0, every page
/// freed is returned and faulted in again, zeroed, moments later: a backfill's memtables
/// are allocated by the workers and freed by the flush thread, so that is most of them,
/// and backfill ran 15–25% slower (`sync-bench backfill --accounts 400 --records 1000
/// --rounds 3`, 0 slowest in 6 of 6 alternating sets). 2 ms ran as fast as the default
/// (median 160k vs 148k records/s, 0 at 128k); the 1 GB backfill's peak RSS was 233 MB
/// (0: 229 MB, default: 236 MB). `sync-bench` sets the same, so it measures what ships.
/// `car verify`, short-lived and measured for speed, keeps the default.
pub(crate) const PURGE_DELAY_MS: std::ffi::c_long = 2;

/// Applies [`PURGE_DELAY_MS`].
#[allow(unsafe_code)]
pub(crate) fn bound_freed_memory() {
    // SAFETY: `mi_option_set` stores an option's value in mimalloc's option table, with no
    // pointers involved; `purge_delay` is read at each purge decision, so setting it while
    // the process runs is what mimalloc's API is for.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
}

/// A verified, always-current copy of the AT Protocol network.
#[derive(Debug, Parser)]
#[command(name = "atpdb", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Repository CAR files: verify, inspect, generate samples.
    #[command(subcommand)]
    Car(car::CarCommand),
    /// A network on 127.0.0.1 with live traffic, synced end to end before your eyes.
    Demo(demo::DemoArgs),
    /// Run a PLC directory, PDS hosts and a relay on 127.0.0.1, with traffic and faults.
    Devnet(devnet::DevnetArgs),
    /// The scale-out pipeline on Redis Streams: enumerate repos, backfill them verified.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// Keep a verified mirror of the repos in scope and serve it over HTTP.
    Serve(Box<serve::ServeArgs>),
    /// An interactive shell: `.connect` syncs here, or `--url` attaches to a server.
    Repl(Box<repl::ReplArgs>),
    /// The tracked repos of a running server (`--url`).
    Repos {
        #[command(flatten)]
        connection: remote::Connection,
        #[command(subcommand)]
        command: remote::ReposCommand,
    },
    /// The scope of a running server (`--url`).
    Config {
        #[command(flatten)]
        connection: remote::Connection,
        #[command(subcommand)]
        command: remote::ConfigCommand,
    },
    /// Records of a running server (`--url`) by at:// URI or pattern.
    Query {
        #[command(flatten)]
        connection: remote::Connection,
        #[command(flatten)]
        args: remote::QueryArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Car(command) => car::run(command),
        Command::Demo(args) => demo::run(args),
        Command::Devnet(args) => devnet::run(args),
        Command::Fleet(command) => fleet::run(command),
        Command::Serve(args) => serve::run(*args),
        Command::Repl(args) => repl::run(*args),
        Command::Repos {
            connection,
            command,
        } => remote::run_repos(&connection, command).map(|()| ExitCode::SUCCESS),
        Command::Config {
            connection,
            command,
        } => remote::run_config(&connection, command).map(|()| ExitCode::SUCCESS),
        Command::Query { connection, args } => {
            remote::run_query(&connection, args).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (`atpdb car verify --records ... | head`) is not a failure.
            if err
                .chain()
                .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("atpdb: {err:#}");
            ExitCode::FAILURE
        }
    }
}
