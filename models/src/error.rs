//! The one error type of this crate. Errors a user can cause say what was
//! wrong and what to do about it.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("dataset directory {dir} does not exist; {hint}")]
    MissingDataDir { dir: PathBuf, hint: String },

    #[error("dataset file {path} is missing (looked for it plain and gzipped); {hint}")]
    MissingDataFile { path: PathBuf, hint: String },

    #[error("{path} is not a valid {what}: {reason}; {hint}")]
    CorruptDataFile { path: PathBuf, what: String, reason: String, hint: String },

    #[error("could not read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("model weights {path} not found; {hint}")]
    MissingWeights { path: PathBuf, hint: String },

    #[error("model card {path} is missing or unreadable: {reason}; a model is a weights file NAME.safetensors with its card NAME.json beside it (written by `branchpoint train`), or the card of an imported model (written by python/export.py)")]
    BadModelCard { path: PathBuf, reason: String },

    #[error("weights {path} do not fit the architecture in the model card: {reason}")]
    WeightsMismatch { path: PathBuf, reason: String },

    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: String, reason: String },

    #[error(transparent)]
    Core(#[from] branchpoint_core::CoreError),

    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
