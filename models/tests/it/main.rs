//! The models crate's integration tests, in one binary: datasets as the
//! loaders meet them, partitioning a network, the shipped weights, and a
//! train/save/load round trip.
mod datasets;
mod partition;
mod shipped_weights;
mod train_roundtrip;
