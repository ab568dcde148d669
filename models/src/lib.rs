//! Early-exit networks for branchpoint, and everything that computes on them
//! offline: datasets, training, metrics, model cards, compute profiles.
//!
//! This crate knows nothing about actors or the network: it is pure
//! computation on tensors and files, so the actors, the CLI and the tests all
//! run exactly the same model code.
pub mod autoscale;
pub mod calibration;
pub mod card;
pub mod corrupt;
pub mod data;
pub mod error;
pub mod link;
pub mod metrics;
pub mod monitor;
pub mod net;
pub mod offload;
pub mod planner;
pub mod profile;
pub mod recalibration;
pub mod risk;
pub mod rng;
pub mod subnormal;
pub mod train;

pub use card::{load_model, LoadedModel, ModelCard};
pub use data::{Dataset, DatasetKind, InputShape, Split};
pub use error::{ModelError, Result};
pub use net::{Architecture, EarlyExitNet};
