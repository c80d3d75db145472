//! Test support shared by every crate's tests: where the conformance fixtures live.
//!
//! The fixtures (`atproto-interop-tests/`, `car-samples/`) are not part of the repository.
//! They are found through `ATPDB_SHARED`, or else `../shared` next to the workspace root.
//! A test that needs them and cannot find them prints that it did not run and returns;
//! with `ATPDB_REQUIRE_SHARED=1` (set by `.ci/run`) it fails instead, so CI never passes
//! on a skipped fixture test.

use std::path::PathBuf;

/// The shared fixture directory, or `None` (after saying so on stderr) when it is absent.
///
/// # Panics
///
/// When the directory is absent and `ATPDB_REQUIRE_SHARED` is set: CI must not skip.
pub fn shared_dir(test: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("ATPDB_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    };
    if dir.join("atproto-interop-tests").is_dir() {
        return Some(dir);
    }
    let message = format!(
        "{test}: did not run: shared fixtures not found at {} (set ATPDB_SHARED)",
        dir.display()
    );
    if required() {
        panic!("{message}");
    }
    eprintln!("{message}");
    None
}

/// A file under `atproto-interop-tests/`, or `None` when the fixtures are absent.
///
/// # Panics
///
/// When the file is absent and `ATPDB_REQUIRE_SHARED` is set.
pub fn interop(test: &str, relative: &str) -> Option<PathBuf> {
    shared_file(test, "atproto-interop-tests", relative)
}

/// A file under `car-samples/`, or `None` when the fixtures are absent.
///
/// # Panics
///
/// When the file is absent and `ATPDB_REQUIRE_SHARED` is set.
pub fn car_sample(test: &str, name: &str) -> Option<PathBuf> {
    shared_file(test, "car-samples", name)
}

/// Every shared folder a test uses is required, not only the one `shared_dir` looks for:
/// a test that finds `atproto-interop-tests/` but not `car-samples/` must not pass as
/// "skipped" in CI.
fn shared_file(test: &str, folder: &str, relative: &str) -> Option<PathBuf> {
    let path = shared_dir(test)?.join(folder).join(relative);
    if path.is_file() {
        return Some(path);
    }
    let message = format!("{test}: did not run: {} not found", path.display());
    if required() {
        panic!("{message}");
    }
    eprintln!("{message}");
    None
}

fn required() -> bool {
    std::env::var_os("ATPDB_REQUIRE_SHARED").is_some_and(|v| v != "0")
}

/// The non-empty, non-comment lines of a line-per-case fixture file.
///
/// # Panics
///
/// When the file cannot be read: a fixture that exists but is unreadable is a broken setup.
#[allow(clippy::expect_used)] // test support: a broken fixture setup should stop the test
pub fn fixture_lines(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("reading fixture {}: {err}", path.display()));
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect()
}
