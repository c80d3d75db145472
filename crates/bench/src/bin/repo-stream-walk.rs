//! The whole-process peer of `atpdb car verify`: repo-stream 0.5 walks each CAR given.
//!
//! `repo-stream-walk FILE...` reads every file, has repo-stream hash every block and walk the
//! MST (it checks no signature), and prints one line per file with its record count. It
//! exists so the two can be timed side by side as whole processes on the same files, e.g.
//! `hyperfine 'atpdb car verify --keys keys.jsonl DIR/*.car' 'repo-stream-walk DIR/*.car'`.

use std::process::ExitCode;

use atpdb_bench::{drive_repo_stream, single_thread_runtime};

// atpdb ships with mimalloc (crates/atpdb/src/main.rs), so its peer runs with it too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let runtime = match single_thread_runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("repo-stream-walk: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for path in std::env::args().skip(1) {
        let outcome = std::fs::read(&path)
            .map_err(|err| err.to_string())
            .and_then(|bytes| drive_repo_stream(&runtime, &bytes).map_err(|err| err.to_string()));
        match outcome {
            Ok(tally) => println!("{path} {} records", tally.records),
            Err(err) => {
                failed = true;
                println!("{path} error: {err}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
