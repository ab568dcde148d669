//! Scenarios on plain numbers: `file` reads and validates scenario files;
//! `sim` is the virtual-time engine that replays one under a policy from a
//! model's recorded answers. Preparing a model and writing reports live in
//! the runtime crate, which has the model and the plotting.
pub mod file;
pub mod sim;
