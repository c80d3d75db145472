//! One store per data directory, within a process and across processes.

use atpdb_store::{Store, StoreError};

use crate::common::{CHILD_DIR, TestResult, child, lines, wait_for_line};

#[test]
fn second_open_in_one_process_is_locked() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let second = Store::open(dir.path());
    assert!(
        matches!(&second, Err(StoreError::Locked { dir: locked }) if locked == dir.path()),
        "{second:?}"
    );
    // Clones share the lock; the last one dropped releases it.
    let clone = store.clone();
    drop(store);
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Locked { .. })
    ));
    drop(clone);
    Store::open(dir.path())?;
    Ok(())
}

#[test]
fn open_in_another_process_is_locked() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut holder = child("lock::lock_holder_child", dir.path())?.spawn()?;
    let lines = lines(holder.stdout.take().ok_or("no child stdout")?);
    let waited = wait_for_line(&lines, "opened");
    let second = Store::open(dir.path());
    // Closing stdin lets the holder exit; kill it anyway if something went wrong.
    drop(holder.stdin.take());
    if waited.is_err() || second.is_ok() {
        let _ = holder.kill();
    }
    let status = holder.wait()?;
    waited?;
    assert!(
        matches!(second, Err(StoreError::Locked { .. })),
        "{second:?}"
    );
    assert!(status.success(), "holder exited with {status}");
    // Its lock died with it.
    Store::open(dir.path())?;
    Ok(())
}

/// The child half of `open_in_another_process_is_locked`: holds the store open until its
/// stdin closes. Without the environment variable (a normal test run) it does nothing.
#[test]
fn lock_holder_child() -> TestResult {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return Ok(());
    };
    let _store = Store::open(std::path::Path::new(&dir))?;
    println!("opened");
    let mut sink = String::new();
    std::io::stdin().read_line(&mut sink)?;
    Ok(())
}
