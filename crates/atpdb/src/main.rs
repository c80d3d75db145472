//! The `atpdb` command: thin glue over the library crates.

fn main() {}
