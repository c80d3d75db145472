//! Fault injection (stub: being written).
