//! The errors a request can end with. Each refusal has a stable [`Reason`] that programs match on (it decides the
//! gRPC code and travels as `google.rpc.ErrorInfo`), a sentence for people, and, for a bad field, the field's path
//! (`google.rpc.BadRequest`).

use crate::store::StoreError;

/// The domain of every `ErrorInfo` this server sends.
pub const ERROR_DOMAIN: &str = "queuectl";

/// Why a request was refused, as programs see it. The names are part of the contract: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A request field is malformed or out of range; the field violation names it.
    InvalidField,
    /// An `after` names a job that does not exist.
    DependencyNotFound,
    /// The request is not a valid protobuf message of its type.
    MalformedRequest,
    /// The request is larger than the server accepts.
    RequestTooLarge,
    JobNotFound,
    DuplicateId,
    /// Only dead and cancelled jobs can be retried.
    JobNotRetryable,
    /// Only completed, dead and cancelled jobs can be deleted.
    JobNotFinal,
    /// The job is final (or became final first), so it cannot be cancelled.
    JobAlreadyFinal,
    /// The job changed between reading and writing it; read it again and decide again.
    JobChanged,
    /// The job (or, for a reset, jobs on other servers) still ran when the server stopped waiting.
    JobStillRunning,
    /// Backups are made by the database's own tools on PostgreSQL.
    BackupUnsupported,
    BackupFailed,
    /// A watcher read too slowly and was cut; re-read the jobs and watch again.
    EventsMissed,
    /// A TCP client sent no bearer token or a wrong one.
    TokenInvalid,
    DatabaseUnavailable,
    DiskFull,
    /// The database cannot be used until an operator acts.
    DatabaseBroken,
    Internal,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidField => "INVALID_FIELD",
            Reason::DependencyNotFound => "DEPENDENCY_NOT_FOUND",
            Reason::MalformedRequest => "MALFORMED_REQUEST",
            Reason::RequestTooLarge => "REQUEST_TOO_LARGE",
            Reason::JobNotFound => "JOB_NOT_FOUND",
            Reason::DuplicateId => "DUPLICATE_ID",
            Reason::JobNotRetryable => "JOB_NOT_RETRYABLE",
            Reason::JobNotFinal => "JOB_NOT_FINAL",
            Reason::JobAlreadyFinal => "JOB_ALREADY_FINAL",
            Reason::JobChanged => "JOB_CHANGED",
            Reason::JobStillRunning => "JOB_STILL_RUNNING",
            Reason::BackupUnsupported => "BACKUP_UNSUPPORTED",
            Reason::BackupFailed => "BACKUP_FAILED",
            Reason::EventsMissed => "EVENTS_MISSED",
            Reason::TokenInvalid => "TOKEN_INVALID",
            Reason::DatabaseUnavailable => "DATABASE_UNAVAILABLE",
            Reason::DiskFull => "DISK_FULL",
            Reason::DatabaseBroken => "DATABASE_BROKEN",
            Reason::Internal => "INTERNAL",
        }
    }

    /// The gRPC code of a refusal for this reason, as the gRPC status code guide assigns them.
    pub fn code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Reason::InvalidField | Reason::DependencyNotFound | Reason::MalformedRequest => {
                Code::InvalidArgument
            }
            Reason::RequestTooLarge | Reason::EventsMissed | Reason::DiskFull => {
                Code::ResourceExhausted
            }
            Reason::JobNotFound => Code::NotFound,
            Reason::DuplicateId => Code::AlreadyExists,
            Reason::JobNotRetryable
            | Reason::JobNotFinal
            | Reason::JobAlreadyFinal
            | Reason::JobStillRunning
            | Reason::BackupUnsupported
            | Reason::BackupFailed => Code::FailedPrecondition,
            // A read-modify-write lost a race: retry at a higher level (read again, decide again).
            Reason::JobChanged => Code::Aborted,
            Reason::TokenInvalid => Code::Unauthenticated,
            Reason::DatabaseUnavailable | Reason::DatabaseBroken => Code::Unavailable,
            Reason::Internal => Code::Internal,
        }
    }
}

/// A request the queue refused: what programs match on and what people read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
    /// The request field at fault, as a path such as `jobs[2].env`.
    pub field: Option<String>,
    /// The job the refusal is about.
    pub job_id: Option<String>,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            message: message.into(),
            field: None,
            job_id: None,
        }
    }

    /// A malformed or out-of-range `field`.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Refusal::new(Reason::InvalidField, message).at(field)
    }

    pub fn at(mut self, field: &str) -> Self {
        self.field = Some(field.to_owned());
        self
    }

    pub fn about(mut self, job_id: &str) -> Self {
        self.job_id = Some(job_id.to_owned());
        self
    }

    /// The same refusal for the job at `index` of a batch: `jobs[2].env`, `jobs[2]: ...`.
    pub fn in_batch(mut self, index: usize) -> Self {
        self.field = Some(match self.field {
            Some(field) => format!("jobs[{index}].{field}"),
            None => format!("jobs[{index}]"),
        });
        self.message = format!("jobs[{index}]: {}", self.message);
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl QueueError {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        QueueError::Refused(Refusal::new(reason, message))
    }

    /// A malformed or out-of-range `field`.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        QueueError::Refused(Refusal::field(field, message))
    }

    /// A refusal about one job.
    pub fn job(reason: Reason, job_id: &str, message: impl Into<String>) -> Self {
        QueueError::Refused(Refusal::new(reason, message).about(job_id))
    }
}

impl From<crate::config::ConfigError> for QueueError {
    fn from(error: crate::config::ConfigError) -> Self {
        let field = match error {
            crate::config::ConfigError::UnknownKey(_) => "key",
            crate::config::ConfigError::BadValue { .. } => "value",
        };
        QueueError::field(field, error.to_string())
    }
}

/// `text` as an error message may quote it: whole when short, else its start and how long it was, so that a
/// huge input never comes back in an error (where it could also exceed the limits of a status' metadata).
pub fn quoted(text: &str) -> String {
    const SHOWN_CHARS: usize = 64;
    match text.char_indices().nth(SHOWN_CHARS) {
        None => format!("'{}'", text.escape_debug()),
        Some((end, _)) => format!("'{}...' ({} bytes)", text[..end].escape_debug(), text.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_input_is_quoted_by_its_start_and_length() {
        assert_eq!(quoted("abc"), "'abc'");
        assert_eq!(quoted("a\nb"), "'a\\nb'");
        let long = "x".repeat(100_000);
        let shown = quoted(&long);
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.ends_with("...' (100000 bytes)"), "{shown}");
    }

    #[test]
    fn a_batch_refusal_names_the_job_and_its_field() {
        let refusal = Refusal::field("env", "env: bad").in_batch(2);
        assert_eq!(refusal.field.as_deref(), Some("jobs[2].env"));
        assert_eq!(refusal.message, "jobs[2]: env: bad");
    }
}
