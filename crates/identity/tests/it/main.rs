//! Integration tests of the resolver against servers on 127.0.0.1: a real devnet, and small
//! stand-ins (a PLC directory or did:web host that counts requests, a DNS responder) for what
//! the devnet cannot do.
//!
//! - `devnet`: did:plc against the devnet's directory: rotation, handle change, deletion.
//! - `plc`: the cache and error mapping against a counting PLC stand-in.
//! - `web`: did:web.
//! - `handles`: DNS TXT, `/.well-known/atproto-did`, the bidirectional check.
//! - `guard`: the SSRF guard refuses loopback before anything is dialled.
//! - `malformed`: documents and answers that must be `Invalid`, not a panic.

#![allow(unreachable_pub)] // helpers are `pub` in private modules of one test binary

mod devnet;
mod guard;
mod handles;
mod malformed;
mod plc;
mod support;
mod web;
