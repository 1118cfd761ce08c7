//! Rows as the databases hold them, and their conversion into domain types at the edge.

use sqlx::{ColumnIndex, Decode, FromRow, Row, Type};

use crate::job::{Job, JobContext, JobState};

use super::{Cursor, InFlight, OutputPage, Page, RunRecord, StateCounts, StoreError};
use crate::output::Chunk;

/// The job columns every query that returns jobs selects, in [`JobRow`] order. A macro, so that `concat!` can
/// build whole statements as static strings.
macro_rules! job_columns {
    () => {
        "id, command, state, priority, attempts, max_retries, timeout_secs, runs, created_at, updated_at, \
         run_after, last_error, interruptions, seq, after_ids, cwd, env"
    };
}
pub(crate) use job_columns;

#[derive(sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub seq: i64,
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
    pub interruptions: i64,
    /// A JSON array of ids; `None` when there are none, and for claimed jobs, which do not need them.
    pub after_ids: Option<String>,
    pub cwd: Option<String>,
    /// A JSON object of names and values; `None` when there are none.
    pub env: Option<String>,
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
            interruptions: column("interruptions", row.interruptions)?,
            id: row.id,
            seq: row.seq,
            command: row.command,
            created_at: row.created_at,
            updated_at: row.updated_at,
            run_after: row.run_after,
            last_error: row.last_error,
            after: match row.after_ids {
                None => Vec::new(),
                Some(ids) => serde_json::from_str(&ids).map_err(|error| {
                    StoreError::Internal(format!("stored after_ids {ids:?}: {error}"))
                })?,
            },
            context: JobContext {
                cwd: row.cwd,
                env: match row.env {
                    None => Default::default(),
                    Some(env) => serde_json::from_str(&env).map_err(|error| {
                        StoreError::Internal(format!("stored env {env:?}: {error}"))
                    })?,
                },
            },
        })
    }
}

/// A job looked up as a dependency, from its `(id, seq, state)` row.
pub fn found((id, seq, state): (String, i64, String)) -> Result<super::batch::Found, sqlx::Error> {
    let state = state
        .parse()
        .map_err(|error| sqlx::Error::Decode(Box::new(error)))?;
    Ok(super::batch::Found { id, seq, state })
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
            truncated: row.truncated,
        })
    }
}

/// Stored output chunks, from `(start, data, streams)` rows.
pub fn output_page(rows: Vec<(i64, Vec<u8>, String)>, more: bool) -> OutputPage {
    let chunks = rows
        .into_iter()
        .map(|(start, data, streams)| {
            Chunk::stored(u64::try_from(start).unwrap_or_default(), data, &streams)
        })
        .collect();
    OutputPage { chunks, more }
}

/// Jobs with their process group, from rows of [`job_columns!`] plus `pgid`.
pub fn in_flight<'r, R>(
    rows: &'r [R],
    classify: fn(sqlx::Error) -> StoreError,
) -> Result<Vec<InFlight>, StoreError>
where
    R: Row,
    JobRow: FromRow<'r, R>,
    Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    &'static str: ColumnIndex<R>,
{
    rows.iter()
        .map(|row| {
            let pgid: Option<i64> = row.try_get("pgid").map_err(classify)?;
            let job = JobRow::from_row(row).map_err(classify)?;
            Ok(InFlight {
                job: job.try_into()?,
                pgid,
            })
        })
        .collect()
}

/// A page of jobs from `limit + 1` rows of [`job_columns!`]: the extra row only says more follow.
pub fn page<'r, R>(
    rows: &'r [R],
    limit: u32,
    classify: fn(sqlx::Error) -> StoreError,
) -> Result<Page, StoreError>
where
    R: Row,
    JobRow: FromRow<'r, R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    &'static str: ColumnIndex<R>,
{
    let limit = limit as usize;
    let mut jobs = Vec::with_capacity(rows.len().min(limit));
    let mut positions = Vec::with_capacity(jobs.capacity());
    for row in rows.iter().take(limit) {
        let job: Job = JobRow::from_row(row).map_err(classify)?.try_into()?;
        positions.push(Cursor {
            key: row.try_get("list_key").map_err(classify)?,
            seq: job.seq,
        });
        jobs.push(job);
    }
    Ok(Page {
        jobs,
        next: positions.last().copied().filter(|_| rows.len() > limit),
        positions,
    })
}

/// Per-state counts from `(state, count)` rows.
pub fn counts(rows: Vec<(String, i64)>) -> Result<StateCounts, StoreError> {
    let mut counts = StateCounts::default();
    for (state, count) in rows {
        let state: JobState = state
            .parse()
            .map_err(|error: crate::job::UnknownState| StoreError::Internal(error.to_string()))?;
        counts[state as usize] = u64::try_from(count).unwrap_or_default();
    }
    Ok(counts)
}
