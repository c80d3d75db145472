//! The whole-process peer of `atpdb car verify`: repo-stream 0.5 walks each CAR given.
//!
//! `repo-stream-walk [-jN] FILE...` reads every file, has repo-stream hash every block and
//! walk the MST (it checks no signature), and prints one line per file with its record
//! count. `-jN` walks N files at once (default 1), each thread with its own runtime, as
//! `atpdb car verify -jN` does, so the two compare at equal parallelism:
//! `hyperfine 'atpdb car verify -j1 --keys keys.jsonl DIR/*.car' 'repo-stream-walk -j1 DIR/*.car'`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use atpdb_bench::{drive_repo_stream, single_thread_runtime};

// atpdb ships with mimalloc (crates/atpdb/src/main.rs), so its peer runs with it too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut jobs = 1;
    let mut files = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.strip_prefix("-j").map(str::parse::<usize>) {
            Some(Ok(n)) if n > 0 => jobs = n,
            Some(_) => {
                eprintln!("repo-stream-walk: bad {arg:?}; use -jN");
                return ExitCode::from(2);
            }
            None => files.push(arg),
        }
    }
    let next = AtomicUsize::new(0);
    let results: Vec<(usize, String, bool)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs.min(files.len().max(1)))
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    let runtime = match single_thread_runtime() {
                        Ok(runtime) => runtime,
                        Err(err) => {
                            done.push((usize::MAX, format!("runtime: {err}"), false));
                            return done;
                        }
                    };
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(path) = files.get(index) else { break };
                        let outcome =
                            std::fs::read(path)
                                .map_err(|err| err.to_string())
                                .and_then(|bytes| {
                                    drive_repo_stream(&runtime, &bytes)
                                        .map_err(|err| err.to_string())
                                });
                        done.push(match outcome {
                            Ok(tally) => (index, format!("{path} {} records", tally.records), true),
                            Err(err) => (index, format!("{path} error: {err}"), false),
                        });
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| worker.join().unwrap_or_default())
            .collect()
    });
    let mut results = results;
    results.sort_by_key(|(index, _, _)| *index);
    let mut failed = results.len() != files.len();
    for (_, line, ok) in &results {
        failed |= !ok;
        println!("{line}");
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
