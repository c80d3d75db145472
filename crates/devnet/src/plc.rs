//! The PLC directory (stub: being written).
