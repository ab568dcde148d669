//! The one error type of this crate: everything that can be wrong with a
//! message, from bytes that are not MessagePack to a `p_tar` outside (0, 1).
//!
//! Each variant says what was wrong and, where it helps, what to do, so a
//! peer can log it or send it back in an `ErrorReply` as it is.

use crate::tensor::DType;

/// Why a message could not be encoded, decoded or accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MessageError {
    /// The bytes are not a MessagePack envelope of the expected message type.
    #[error("malformed message: {0}")]
    Decode(String),
    /// Serialisation failed; with these types this means a bug, not bad input.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The peer speaks another wire version; upgrade the older side.
    #[error(
        "wire version {got} is not understood: this peer speaks version {expected}; \
         run the same branchpoint version on both sides"
    )]
    VersionMismatch { got: u16, expected: u16 },
    /// The message or tensor is larger than this crate accepts.
    #[error("{what} is too large: {size} bytes, the limit is {limit}")]
    TooLarge { what: &'static str, size: u64, limit: u64 },
    /// The shape itself is unusable (too many dimensions, a zero dimension).
    #[error("bad tensor shape {shape:?}: {reason}")]
    BadShape { shape: Vec<u32>, reason: &'static str },
    /// The byte buffer does not hold exactly shape x dtype size bytes.
    #[error("tensor of shape {shape:?} and dtype {dtype} needs {expected} bytes, got {actual}")]
    SizeMismatch { shape: Vec<u32>, dtype: DType, expected: u64, actual: u64 },
    /// An activation holds NaN or an infinity (f16 overflows end up here too).
    #[error("tensor value at flat index {index} is not finite ({value})")]
    NonFinite { index: usize, value: f32 },
    /// Branches are numbered from 1; branch 0 does not exist.
    #[error("partition branch must be >= 1 (and at most 255), got {0}")]
    PartitionBranch(usize),
    /// The model has fewer side branches.
    #[error("partition branch {branch} does not exist: this model has side branches 1 to {branches}")]
    NoSuchBranch { branch: usize, branches: usize },
    #[error("partition branch {0:?} is not a number: give a side branch, counted from 1")]
    PartitionBranchText(String),
    /// `p_tar` is a confidence threshold in [0, 1].
    #[error("p_tar must lie in [0, 1], got {0}")]
    PTar(f64),
    /// A target p_tar a person sets lies strictly between the extremes.
    #[error("p_tar {0} is outside (0, 1): a target lies strictly between 0 (everything on the device) and 1 (everything offloaded)")]
    PTarTarget(f64),
    /// Temperatures divide logits, so they must be positive and finite.
    #[error("temperature of exit {exit} must be positive and finite, got {value}")]
    Temperature { exit: usize, value: f64 },
    /// A calibration update without any temperature calibrates nothing.
    #[error("calibration update holds no temperatures; send one per exit, branch 1 first, final last")]
    NoTemperatures,
    /// The model hash must be 64 lowercase hex digits (SHA-256, as in the model card).
    #[error("model sha256 must be 64 lowercase hex digits, got {0:?}")]
    BadSha256(String),
    /// An offload request must say how long the device will wait for it.
    #[error(
        "offload request has no deadline (budget_us is 0); \
         the worker cannot tell a late request from a fresh one"
    )]
    MissingDeadline,
    /// An id that is empty, too long, or not usable as a NATS subject token.
    #[error("{what} {id:?} is not valid: use 1 to 64 characters of [A-Za-z0-9_-]")]
    BadId { what: &'static str, id: String },
    /// A quantised tensor's scales and zero points do not fit its values.
    #[error("quantised tensor: {0}")]
    BadQuantisation(String),
    /// A codec name that is not one of f32, f16, int8.
    #[error("codec {0:?} is not known: use f32, f16 or int8")]
    UnknownCodec(String),
    /// A statistic outside its range, e.g. a negative or NaN throughput.
    #[error("{field} must be {expected}, got {value}")]
    OutOfRange { field: &'static str, value: f64, expected: &'static str },
}
