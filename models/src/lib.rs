//! Early-exit networks for branchpoint, and everything that computes on them
//! offline: datasets, training, metrics, model cards, compute profiles.
//!
//! This crate is what needs libtorch: the network, datasets, training,
//! compute profiling, model cards, and the bridge (`exits`) that turns a
//! network's answers into the plain numbers the pure core
//! (`branchpoint-core`) decides on. It knows nothing about actors or the
//! network, so the actors, the CLI and the tests all run exactly the same
//! model code.
pub mod card;
pub mod corrupt;
pub mod data;
pub mod error;
pub mod exits;
pub mod imported;
pub mod metrics;
pub mod model;
pub mod net;
pub mod profile;
pub mod subnormal;
pub mod train;

pub use card::{load_model, LoadedModel, ModelCard};
pub use data::ModelData;
pub use data::{Dataset, DatasetKind, InputShape, Split};
pub use error::{ModelError, Result};
pub use imported::{ImportedCard, ImportedNet};
pub use model::Model;
pub use net::{Architecture, EarlyExitNet};
