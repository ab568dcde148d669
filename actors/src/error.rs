//! The one error type of the actors crate.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error(transparent)]
    Model(#[from] branchpoint_models::ModelError),

    #[error(transparent)]
    Core(#[from] branchpoint_core::CoreError),

    #[error(transparent)]
    Message(#[from] branchpoint_messages::MessageError),

    #[error("could not load model {path}: {reason}")]
    Load { path: PathBuf, reason: String },

    #[error("actor mailbox closed: {0}")]
    Mailbox(#[from] actix::MailboxError),

    #[error("NATS: {0}")]
    Nats(String),

    #[error("compute pool: {0}")]
    Compute(String),

    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
}
