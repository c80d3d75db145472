//! Integration tests of the store, one binary: each module is one behaviour.
//!
//! `crash` and `lock` re-run this binary as a child process (selected by an environment
//! variable) to get a second process that can hold the lock or be killed mid-commit.

mod atomicity;
mod common;
mod concurrency;
mod counters;
mod crash;
mod events;
mod lock;
mod records;
mod roundtrip;
