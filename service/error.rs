//! The errors a request can end with, by what the client should do about them.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The request itself is wrong; resending it will not help.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the job is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<crate::config::ConfigError> for QueueError {
    fn from(error: crate::config::ConfigError) -> Self {
        QueueError::InvalidArgument(error.to_string())
    }
}
