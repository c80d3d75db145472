//! A whole AT Protocol network on loopback: a PLC directory, PDS hosts and a relay that speak
//! the real protocol byte for byte, with scripted traffic and injected faults.
//!
//! Every test and benchmark of atpdb runs against it, because no machine here reaches the real
//! network and a sync engine cannot be tested by waiting for the real one to misbehave.

pub mod faults;
pub mod plc;
