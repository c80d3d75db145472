//! Integration tests of atpdb-net against an in-process devnet and tiny hand-written servers,
//! all on 127.0.0.1.
//!
//! - `xrpc`: the sync endpoints, retries, rate limits, bounded bodies.
//! - `firehose`: live events, reconnects, cursor errors, frame limits.
//! - `guard`: every client refuses private addresses unless allowed, before dialling.

mod common;
mod firehose;
mod guard;
mod xrpc;
