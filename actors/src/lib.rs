//! Actors of branchpoint: device, cloud worker, collector, fleet driver, and
//! the compute pools they share.
//!
//! Tensor work happens only on threads that own a copy of the network: the
//! device threads (`fleet::DeviceThreads`) and the `compute::TensorPool`s of
//! workers and the calibrator; everything else runs on the actix event loop. Wire types from
//! `branchpoint-messages` are used only at the NATS edges (`transport`,
//! `control`, and each actor's `nats` module); inside a process actors
//! exchange their own messages.
pub mod calibration;
pub mod clock;
pub mod collector;
pub mod compute;
pub mod control;
pub mod device;
pub mod emulation;
pub mod error;
pub mod fleet;
pub mod offload;
pub mod planner;
pub mod plans;
pub mod transport;
pub mod worker;

pub use error::ActorError;
