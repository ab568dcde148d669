//! Wire types of branchpoint: everything that crosses a process boundary.
//!
//! This crate knows nothing about tch, actix or NATS and does no I/O. It is
//! filled by the issue that puts devices and cloud workers on NATS; for now
//! it holds only the wire-format version that every message will carry.

/// Version of the wire format. Every message carries it, so a peer can refuse
/// a message it does not understand instead of misreading it.
pub const WIRE_VERSION: u16 = 1;
