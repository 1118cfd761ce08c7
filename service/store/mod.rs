//! The storage seam: everything the queue asks of a database, and nothing about which database it is.
//!
//! Every state change is a guarded write: it names the state and run it expects, and a store applies it only if
//! the row still matches. A report about a run that is no longer current (the job was recovered and claimed
//! again meanwhile) is therefore rejected instead of applied.

mod row;
pub mod sqlite;

use async_trait::async_trait;

use crate::job::{Job, JobState, Micros, NewJob, Policy, Settled};

/// What a database failure means to a client: come back later, make room, or a fault on our side.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("the database is out of space: {0}")]
    Full(String),
    #[error("database error: {0}")]
    Internal(String),
}

/// Why one enqueue of a batch was refused; the other enqueues of the batch are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueRejected {
    #[error("a job with id '{0}' already exists")]
    DuplicateId(String),
}

/// A worker started run `run` of a job in process group `pgid`, so a restart can kill what it left behind.
#[derive(Debug, Clone)]
pub struct RunStarted {
    pub job_id: String,
    pub run: u32,
    pub worker: u32,
    pub pgid: Option<i64>,
    pub started_at: Micros,
}

/// The record of an attempt that ended.
#[derive(Debug, Clone)]
pub struct RunEnded {
    pub worker: u32,
    pub outcome: String,
    pub output: Vec<u8>,
    pub truncated: bool,
}

/// Moves a job to `settled`, only if it is still in `expect_state` at run `expect_runs`.
#[derive(Debug, Clone)]
pub struct GuardedUpdate {
    pub job_id: String,
    pub expect_state: JobState,
    pub expect_runs: u32,
    pub settled: Settled,
    /// Set when the update ends run `expect_runs`.
    pub ended: Option<RunEnded>,
}

/// Writes applied together in one transaction (group commit).
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// Each entry is one request: its jobs are stored all together or, on a duplicate id, not at all.
    pub enqueues: Vec<Vec<NewJob>>,
    pub starts: Vec<RunStarted>,
    pub updates: Vec<GuardedUpdate>,
    /// The commit must reach the disk before anyone is told (fsync). Losing a claim or a finish to a power cut
    /// only reruns a job; losing an acknowledged enqueue would lose it.
    pub durable: bool,
}

#[derive(Debug, Default)]
pub struct WriteOutcome {
    /// One entry per `WriteBatch::enqueues` entry, in order.
    pub enqueued: Vec<Result<Vec<Job>, EnqueueRejected>>,
    /// One entry per `WriteBatch::updates` entry: whether its guard matched.
    pub applied: Vec<bool>,
}

/// A job some worker was running, with the process group it ran in.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub job: Job,
    pub pgid: Option<i64>,
}

/// Where a listing resumes: after this (priority, insertion order) position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub priority: u8,
    pub seq: i64,
}

#[derive(Debug, Clone)]
pub struct ListFilter {
    pub state: Option<JobState>,
    pub after: Option<Cursor>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub jobs: Vec<Job>,
    /// Set when more jobs may follow.
    pub next: Option<Cursor>,
}

/// How many jobs are in each state, in [`JobState::ALL`] order.
pub type StateCounts = [u64; JobState::ALL.len()];

/// One attempt of a job as stored.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub run: u32,
    pub worker: u32,
    pub started_at: Micros,
    pub finished_at: Option<Micros>,
    pub outcome: Option<String>,
    pub output: Vec<u8>,
    pub truncated: bool,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies `batch` in one transaction. `now` stamps new jobs; `policy` orders them.
    async fn write(
        &self,
        batch: &WriteBatch,
        now: Micros,
        policy: Policy,
    ) -> Result<WriteOutcome, StoreError>;

    /// Moves up to `limit` ready jobs (pending, or failed with `run_after <= now`) to processing, best first, and
    /// starts a new run of each.
    async fn claim(&self, limit: u32, now: Micros) -> Result<Vec<Job>, StoreError>;

    /// The earliest `run_after` of any waiting job, to sleep until then.
    async fn next_run_after(&self) -> Result<Option<Micros>, StoreError>;

    /// Every job that is processing, for recovery after a restart.
    async fn in_flight(&self) -> Result<Vec<InFlight>, StoreError>;

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError>;

    /// Jobs by priority then insertion order.
    async fn list(&self, filter: &ListFilter) -> Result<Page, StoreError>;

    async fn counts(&self) -> Result<StateCounts, StoreError>;

    /// The attempts of a job, oldest first.
    async fn runs(&self, id: &str) -> Result<Vec<RunRecord>, StoreError>;

    async fn load_config(&self) -> Result<Vec<(String, String)>, StoreError>;

    /// Stores a setting and, since aging decides the order of waiting jobs, re-keys them with `policy`.
    async fn save_config(&self, key: &str, value: &str, policy: Policy) -> Result<(), StoreError>;

    /// Deletes every job and setting and restarts generated ids at job1. Returns how many jobs it deleted.
    async fn reset(&self) -> Result<u64, StoreError>;
}
