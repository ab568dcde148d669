//! The pure core of branchpoint: every decision the system makes, on plain
//! numbers. Calibration (temperature fits, metrics), the paper's offloading
//! analysis, certified thresholds, drift monitoring, the partition planner,
//! link emulation, the autoscaling policy, compute costs, the seeded RNG and
//! the virtual-time scenario engine.
//!
//! Nothing here links libtorch, runs an actor or opens a socket (the tidy
//! test in `core/tests/tidy.rs` checks it): a model enters as its
//! recorded answers (`calibration::ExitLogits`) and its measured costs
//! (`costs::ComputeProfile`), so this crate's tests run in seconds anywhere.
pub mod autoscale;
pub mod batching;
pub mod calibration;
pub mod control;
pub mod corrupt;
pub mod costs;
pub mod error;
pub mod guarantee;
pub mod link;
pub mod monitor;
pub mod offload;
pub mod outcome;
pub mod planner;
pub mod recalibration;
pub mod risk;
pub mod rng;
pub mod scenario;

pub use error::{CoreError, Result};
