//! Wire types of branchpoint: everything that crosses a process boundary.
//!
//! This crate knows nothing about tch, actix or NATS and does no I/O: it owns
//! the message types ([`wire`]), tensors on the wire ([`tensor`]), subject
//! names ([`subjects`]) and what can be wrong with a message ([`error`]).
//!
//! Messages are MessagePack with named fields inside an envelope that carries
//! [`WIRE_VERSION`]; [`encode`] validates before sending, [`decode`] checks the
//! version, then the body, and never panics on arbitrary bytes.

pub mod codec;
pub mod error;
pub mod subjects;
pub mod tensor;
pub mod vocab;
pub mod wire;

#[cfg(test)]
mod tests;

pub use codec::Codec;
pub use error::MessageError;
pub use tensor::{DType, Tensor, MAX_DIMS, MAX_TENSOR_BYTES};
pub use vocab::{Exit, PTar, PartitionBranch};
pub use wire::{
    decode, decode_seq, encode, encoded_len, is_valid_temperature, AppliedPlan, AuditResult, AuditTag, BranchWatch, CalibrationMethod, CalibrationRefit, CalibrationStatus,
    CalibrationUpdate, CertifiedTarget, CertifyReply, CertifyRequest, Deadline, ErrorKind, ErrorReply, FleetStatus, FleetSummary, Message, NetworkReport, OffloadAnswer,
    OffloadReply, OffloadRequest, PlanTarget, PlanUpdate, RefitSummary, ReliabilityBin, WorkerStatus, WorkerTimings, MAX_AUDIT_CLASSES, MAX_EXITS, MAX_FLEET_DEVICES,
    MAX_MESSAGE_BYTES, MAX_TEMPERATURE, MIN_TEMPERATURE,
};

/// Version of the wire format. Every message carries it, so a peer can refuse
/// a message it does not understand instead of misreading it. Adding a field
/// does not change it (see [`wire`]); any incompatible change does.
///
/// 2: tensors of dtype `u8` with `scale` and `zero_point` (the int8 codec),
/// which a version-1 peer cannot read.
pub const WIRE_VERSION: u16 = 2;
