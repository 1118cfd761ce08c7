//! Rows as the databases hold them, and their conversion into domain types at the edge.

use crate::job::{Job, JobState};

use super::{RunRecord, StoreError};

/// The job columns every query that returns jobs selects, in [`JobRow`] order. A macro, so that `concat!` can
/// build whole statements as static strings.
macro_rules! job_columns {
    () => {
        "id, command, state, priority, attempts, max_retries, timeout_secs, runs, created_at, updated_at, \
         run_after, last_error"
    };
}
pub(crate) use job_columns;

#[derive(sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub command: String,
    pub state: String,
    pub priority: i64,
    pub attempts: i64,
    pub max_retries: i64,
    pub timeout_secs: Option<i64>,
    pub runs: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub run_after: i64,
    pub last_error: Option<String>,
}

fn column<T: TryFrom<i64>>(name: &str, value: i64) -> Result<T, StoreError> {
    T::try_from(value)
        .map_err(|_| StoreError::Internal(format!("stored {name} {value} is out of range")))
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(row: JobRow) -> Result<Self, StoreError> {
        Ok(Job {
            state: row
                .state
                .parse::<JobState>()
                .map_err(|error| StoreError::Internal(error.to_string()))?,
            priority: column("priority", row.priority)?,
            attempts: column("attempts", row.attempts)?,
            max_retries: column("max_retries", row.max_retries)?,
            timeout_secs: row
                .timeout_secs
                .map(|secs| column("timeout_secs", secs))
                .transpose()?,
            runs: column("runs", row.runs)?,
            id: row.id,
            command: row.command,
            created_at: row.created_at,
            updated_at: row.updated_at,
            run_after: row.run_after,
            last_error: row.last_error,
        })
    }
}

pub fn jobs(rows: Vec<JobRow>) -> Result<Vec<Job>, StoreError> {
    rows.into_iter().map(Job::try_from).collect()
}

#[derive(sqlx::FromRow)]
pub struct RunRow {
    pub run: i64,
    pub worker: i64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub outcome: Option<String>,
    pub output: Vec<u8>,
    pub truncated: bool,
}

impl TryFrom<RunRow> for RunRecord {
    type Error = StoreError;

    fn try_from(row: RunRow) -> Result<Self, StoreError> {
        Ok(RunRecord {
            run: column("run", row.run)?,
            worker: column("worker", row.worker)?,
            started_at: row.started_at,
            finished_at: row.finished_at,
            outcome: row.outcome,
            output: row.output,
            truncated: row.truncated,
        })
    }
}
