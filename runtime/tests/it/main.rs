//! The runtime crate's integration tests, in one binary (as raft-rs
//! organises its tests): one link of libtorch and the whole runtime instead
//! of one per file. Each module is one area users meet; `common` starts real
//! nats-servers and `branchpoint` child processes.
mod common;

mod cli;
mod compose;
mod imported;
mod nats_auth;
mod nats_fleet;
mod scenario;
mod shutdown;
mod stack;
