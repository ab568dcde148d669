//! The one error type of the pure core. Errors a user can cause say what was
//! wrong and what to do about it.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{path} is not a valid {what}: {reason}; {hint}")]
    CorruptFile { path: PathBuf, what: String, reason: String, hint: String },

    #[error("could not read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: String, reason: String },
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
