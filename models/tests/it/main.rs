//! The models crate's integration tests, in one binary: datasets as the
//! loaders meet them, partitioning a network, the shipped weights, a
//! train/save/load round trip, and a user's model from python/export.py.
mod datasets;
mod imported;
mod partition;
mod shipped_weights;
mod train_roundtrip;
