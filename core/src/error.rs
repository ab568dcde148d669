//! The one error type of the pure core. Errors a user can cause say what was
//! wrong and what to do about it.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{path} is not a valid {what}: {reason}; {hint}")]
    CorruptFile { path: PathBuf, what: String, reason: String, hint: String },

    /// Says its cause itself (and does not also return it as its source,
    /// which a chain of causes would print twice).
    #[error("could not {action} {path}: {error}")]
    Io { action: &'static str, path: PathBuf, error: std::io::Error },

    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: String, reason: String },
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
