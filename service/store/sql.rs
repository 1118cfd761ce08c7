//! Statement text both backends run as it is: `$N` parameters, which SQLite and PostgreSQL both read. SQLite
//! numbers them in the order they first appear, not by their digits, so each statement names `$1` first, then
//! `$2`, and so on.

use super::row::job_columns;
use super::{Cursor, ListFilter};
use crate::job::JobState;

pub const GET_JOB: &str = concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = $1");

/// A page of jobs in listing order (priority, then age), after the cursor `($1, $2)`, at most `$3` rows.
pub const LIST_JOBS: &str = concat!(
    "SELECT ",
    job_columns!(),
    ", CAST(priority AS BIGINT) AS list_key FROM jobs WHERE (priority, seq) > ($1, $2) ORDER BY priority, seq LIMIT $3"
);

/// As [`LIST_JOBS`], of the jobs in state `$4`.
pub const LIST_JOBS_IN_STATE: &str = concat!(
    "SELECT ",
    job_columns!(),
    ", CAST(priority AS BIGINT) AS list_key FROM jobs WHERE (priority, seq) > ($1, $2) AND state = $4 ORDER BY priority, seq \
     LIMIT $3"
);

/// A listing of the waiting jobs of one state, in the order they will run: by their aged priority,
/// which their queue key orders, as claims take them.
macro_rules! list_waiting {
    ($state:literal, $index_hint:literal) => {
        concat!(
            "SELECT ",
            job_columns!(),
            ", queue_key AS list_key FROM jobs ",
            $index_hint,
            " WHERE state IN ('pending', 'failed') AND state = '",
            $state,
            "' AND (queue_key, seq) > ($1, $2) ORDER BY queue_key, seq LIMIT $3"
        )
    };
}

/// The statements that list the pending and the failed jobs in run order, from the index claims use
/// (`jobs_ready`): PostgreSQL's planner finds it; SQLite's must be told, or it sorts every waiting job.
pub struct WaitingListings {
    pub pending: &'static str,
    pub failed: &'static str,
}

pub const WAITING: WaitingListings = WaitingListings {
    pending: list_waiting!("pending", ""),
    failed: list_waiting!("failed", ""),
};

pub const WAITING_SQLITE: WaitingListings = WaitingListings {
    pending: list_waiting!("pending", "INDEXED BY jobs_ready"),
    failed: list_waiting!("failed", "INDEXED BY jobs_ready"),
};

/// How to list what a filter asks for: the statement, the position it resumes after (`$1`, `$2`), and the state
/// to bind as `$4`, if the statement takes one.
pub struct Listing {
    pub statement: &'static str,
    pub after: Cursor,
    pub state: Option<&'static str>,
}

pub fn listing(filter: &ListFilter, waiting: &WaitingListings) -> Listing {
    let after = filter.after.unwrap_or(Cursor { key: 0, seq: 0 });
    let (statement, state) = match filter.state {
        None => (LIST_JOBS, None),
        Some(JobState::Pending) => (waiting.pending, None),
        Some(JobState::Failed) => (waiting.failed, None),
        Some(state) => (LIST_JOBS_IN_STATE, Some(state.as_str())),
    };
    Listing {
        statement,
        after,
        state,
    }
}

pub const RUNS_OF_JOB: &str =
    "SELECT r.run, r.worker, r.started_at, r.finished_at, r.outcome, r.truncated
     FROM job_runs r JOIN jobs j ON j.seq = r.job_seq
     WHERE j.id = $1 ORDER BY r.run";

/// How long each stored chunk of run `$2` of job `$1` is that holds bytes past offset `$3`, in order: a reader
/// measures a page before it reads one.
pub const OUTPUT_SIZES: &str =
    "SELECT o.start, CAST(length(o.data) AS BIGINT) FROM job_output o JOIN jobs j ON j.seq = o.job_seq
     WHERE j.id = $1 AND o.run = $2 AND o.start + length(o.data) > $3 ORDER BY o.start LIMIT 4096";

/// The `LIMIT` of [`OUTPUT_SIZES`]: the most chunks one page holds.
const MEASURED_CHUNKS: usize = 4096;

/// The stored chunks of run `$2` of job `$1` that hold bytes past offset `$3` and start at `$4` at the latest.
pub const OUTPUT_CHUNKS: &str = "SELECT o.start, o.data, o.streams FROM job_output o JOIN jobs j ON j.seq = o.job_seq
     WHERE j.id = $1 AND o.run = $2 AND o.start + length(o.data) > $3 AND o.start <= $4 ORDER BY o.start";

/// Forgets the chunks of run `$2` of the job in row `$1` that lie wholly between offsets `$3` and `$4`.
pub const FORGET_OUTPUT: &str = "DELETE FROM job_output
     WHERE job_seq = $1 AND run = $2 AND start >= $3 AND start + length(data) <= $4";

/// An output offset as the databases hold it.
pub fn offset(at: u64) -> i64 {
    i64::try_from(at).unwrap_or(i64::MAX)
}

/// Of chunks `(start, length)` as [`OUTPUT_SIZES`] measured them, the last start a page of `budget` bytes reads
/// up to (at least the first chunk), and whether more chunks follow it.
pub fn page_end(sizes: &[(i64, i64)], budget: usize) -> Option<(i64, bool)> {
    let mut total = 0usize;
    for (taken, (start, length)) in sizes.iter().enumerate() {
        total = total.saturating_add(usize::try_from(*length).unwrap_or(usize::MAX));
        if taken > 0 && total > budget {
            return Some((sizes[taken - 1].0, true));
        }
        if taken + 1 == sizes.len() {
            return Some((*start, sizes.len() == MEASURED_CHUNKS));
        }
    }
    None
}

/// Every write stamps updated_at, and nothing stamps it earlier than created_at.
pub const NEWEST_TIME: &str = "SELECT MAX(updated_at) FROM jobs";

/// The creation time of the oldest pending job, from the partial index `jobs_pending_age`, which SQLite must be
/// told to use (its planner prefers `jobs_by_state` and reads every pending row: 40 ms at 300,000).
pub const OLDEST_PENDING: &str = "SELECT MIN(created_at) FROM jobs WHERE state = 'pending'";
pub const OLDEST_PENDING_SQLITE: &str =
    "SELECT MIN(created_at) FROM jobs INDEXED BY jobs_pending_age WHERE state = 'pending'";

pub const LOAD_CONFIG: &str = "SELECT key, value FROM config";

/// The jobs a purge deletes: up to `$3` in state `$1`, if it is final, that reached it at or before `$2`, oldest
/// first.
pub const PURGE_FINAL: &str = "DELETE FROM jobs WHERE seq IN (
         SELECT seq FROM jobs WHERE state = $1 AND state IN ('completed', 'dead', 'cancelled') AND updated_at <= $2
         ORDER BY updated_at LIMIT $3)";

pub const SAVE_CONFIG: &str = "INSERT INTO config (key, value) VALUES ($1, $2)
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// Re-keys every waiting job after the aging interval changed to `$1` microseconds per priority level: the SQL
/// form of `job::queue_key`.
pub const REKEY_WAITING: &str = "UPDATE jobs SET queue_key = run_after + (priority - 1) * $1
     WHERE state IN ('pending', 'failed')";

pub const DELETE_ALL_JOBS: &str = "DELETE FROM jobs";

pub const DELETE_ALL_CONFIG: &str = "DELETE FROM config";
