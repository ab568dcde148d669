//! Actors of branchpoint: device, cloud worker, calibration, planner, fleet.
//!
//! Empty until the issue that builds the live system: the foundation only
//! provides the model (`branchpoint-models`) and the binary. Nothing here
//! pretends to work yet.
