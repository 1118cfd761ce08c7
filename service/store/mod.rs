//! The storage seam: everything the queue asks of a database, and nothing about which database it is.
//!
//! Every state change is a guarded write: it names the state and run it expects, and a store applies it only if
//! the row still matches. A report about a run that is no longer current (the job was recovered and claimed
//! again meanwhile) is therefore rejected instead of applied.

mod batch;
pub mod postgres;
mod row;
mod sql;
pub mod sqlite;

pub use batch::wakes_workers;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::job::{Job, JobState, Micros, NewJob, Policy, Settled};
use crate::output::{Chunk, OutputWrite};

/// What a database failure means to a client: come back later, make room, or a fault on our side.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("the database is out of space: {0}")]
    Full(String),
    #[error("database error: {0}")]
    Internal(String),
    /// The database cannot be used until someone acts: the sentence says what happened and what to do.
    #[error("{0}")]
    Broken(String),
}

/// Why one enqueue of a batch was refused; the other enqueues of the batch are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueRejected {
    #[error("a job with id '{0}' already exists")]
    DuplicateId(String),
    /// A job names a job it cannot run after; the text says which and why.
    #[error("{0}")]
    Dependency(String),
}

/// A worker started run `run` of a job in process group `pgid`, so a restart can kill what it left behind.
#[derive(Debug, Clone)]
pub struct RunStarted {
    pub job_id: String,
    /// [`Job::seq`] of the job.
    pub seq: i64,
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
    /// The output not yet written, stored with the end.
    pub output: Option<OutputWrite>,
    /// Whether some of its output was dropped.
    pub truncated: bool,
}

/// Moves a job to `settled`, only if it is still the same job (`seq`), in `expect_state` at run `expect_runs`.
#[derive(Debug, Clone)]
pub struct GuardedUpdate {
    pub job_id: String,
    /// [`Job::seq`] of the job: a report about an earlier job with the same id matches nothing.
    pub seq: i64,
    pub expect_state: JobState,
    pub expect_runs: u32,
    pub settled: Settled,
    /// Set when the update ends run `expect_runs`.
    pub ended: Option<RunEnded>,
}

impl GuardedUpdate {
    /// Moves `job` to `settled` if it is still as it was read (the same row, state and run), ending no run: a
    /// change a person asks for, such as a retry or a cancel of a waiting job.
    pub fn unless_changed(job: &Job, settled: Settled) -> GuardedUpdate {
        GuardedUpdate {
            job_id: job.id.clone(),
            seq: job.seq,
            expect_state: job.state,
            expect_runs: job.runs,
            settled,
            ended: None,
        }
    }
}

/// Writes applied together in one transaction (group commit).
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// Each entry is one request: its jobs are stored all together or, on a duplicate id, not at all.
    pub enqueues: Vec<Vec<NewJob>>,
    pub starts: Vec<RunStarted>,
    pub updates: Vec<GuardedUpdate>,
    /// Output of running attempts, for runs already on record.
    pub outputs: Vec<OutputWrite>,
    /// Claims for `owner`'s idle workers. Claims come after the rest of the batch, so a worker's finish and its
    /// next claim share one commit, and a job enqueued in the batch can be claimed in it.
    pub claims: Vec<Claim>,
    /// The server writing: the owner of the jobs it claims.
    pub owner: String,
    /// The commit must reach the disk before anyone is told (fsync). Losing a claim or a finish to a power cut
    /// only reruns a job; losing an acknowledged enqueue would lose it.
    pub durable: bool,
}

/// A claim of ready jobs for workers of the server writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// How many jobs, at most.
    pub limit: u32,
    /// For a claim of one job by a worker whose shell already waits for it: the job's start, recorded with the
    /// claim, so that the job needs no commit of its own before it runs.
    pub start: Option<ClaimStart>,
}

impl Claim {
    /// A claim of up to `limit` jobs, whose starts are recorded once their shells exist.
    pub fn up_to(limit: u32) -> Claim {
        Claim { limit, start: None }
    }
}

/// The worker and the process group of a shell waiting for the job a claim takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimStart {
    pub worker: u32,
    pub pgid: Option<i64>,
}

#[derive(Debug, Default)]
pub struct WriteOutcome {
    /// One entry per `WriteBatch::enqueues` entry, in order.
    pub enqueued: Vec<Result<Vec<Job>, EnqueueRejected>>,
    /// One entry per `WriteBatch::updates` entry: whether its guard matched.
    pub applied: Vec<bool>,
    /// One entry per `WriteBatch::claims` entry: the jobs it claimed, now processing.
    pub claimed: Vec<Vec<Job>>,
    /// How many jobs became ready because every job they run after completed.
    pub released: u64,
    /// The jobs cancelled because a job they run after did not complete: id and last_error.
    pub cancelled: Vec<(String, String)>,
}

impl WriteBatch {
    /// How many jobs the batch's claims ask for in all.
    pub fn claim_limit(&self) -> u32 {
        self.claims
            .iter()
            .fold(0, |sum, claim| sum.saturating_add(claim.limit))
    }
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
    /// Where the last job stands in the listing's order: its priority, or its queue key in a listing of
    /// waiting jobs (pending or failed), which runs in the order they will run.
    pub key: i64,
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
    /// Where each job stands in the listing's order, for a page cut short after it.
    pub positions: Vec<Cursor>,
    /// Set when more jobs may follow.
    pub next: Option<Cursor>,
}

/// How many jobs are in each state, in [`JobState::ALL`] order.
pub type StateCounts = [u64; JobState::ALL.len()];

/// How long from `now` until `due`; zero when it is past.
pub fn due_in(due: Micros, now: Micros) -> Duration {
    Duration::from_micros(u64::try_from(due.saturating_sub(now)).unwrap_or(0))
}

/// What one server tells the others about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerRecord {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub worker_count: u32,
    pub workers: Vec<WorkerRecord>,
    /// When the record was written, by the database's clock.
    #[serde(default)]
    pub seen_at: Micros,
}

/// One worker slot of a server, and the job it runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerRecord {
    pub index: u32,
    pub job_id: Option<String>,
    pub command: Option<String>,
    pub started_at: Option<Micros>,
    pub stopping: bool,
}

/// A change made through another server of the same database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// Jobs may have become ready.
    Jobs,
    /// A setting changed.
    Config,
    /// Every server is asked to run this many workers.
    Workers(u32),
    /// A reset is under way: every server stops its workers and ends its running jobs.
    Reset,
    /// Someone cancelled run `run` of a job: the server running it ends it.
    Cancel(CancelRequest),
    /// What the jobs of a server did, for the watchers of the others.
    Events(JobEvents),
}

/// Job events of one server, as it passes them on to the other servers of the database.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobEvents {
    /// The id of the server whose workers they were.
    pub server: String,
    pub events: Vec<crate::event::Event>,
}

/// A cancel of a running job, as servers pass it on: which run, and who cancels it (for its `last_error`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CancelRequest {
    pub job_id: String,
    pub run: u32,
    pub by: String,
}

/// One attempt of a job as stored.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub run: u32,
    pub worker: u32,
    pub started_at: Micros,
    pub finished_at: Option<Micros>,
    pub outcome: Option<String>,
    pub truncated: bool,
}

/// Stored output of one run, from some offset on.
#[derive(Debug, Default)]
pub struct OutputPage {
    pub chunks: Vec<Chunk>,
    /// More chunks are stored after these.
    pub more: bool,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies `batch` in one transaction. `now` stamps new jobs; `policy` orders them. A claim moves ready jobs
    /// (pending, or failed with `run_after <= now`) to processing, best first, and starts a new run of each.
    async fn write(
        &self,
        batch: Arc<WriteBatch>,
        now: Micros,
        policy: Policy,
    ) -> Result<WriteOutcome, StoreError>;

    /// How long until the earliest waiting job is due (zero if one is due already); `None` if none waits.
    async fn next_due(&self, now: Micros) -> Result<Option<Duration>, StoreError>;

    /// The jobs `owner` was running, for recovery when it starts again.
    async fn in_flight(&self, owner: &str) -> Result<Vec<InFlight>, StoreError>;

    /// What a database shared by several servers offers them; `None` when one server owns the database and
    /// recovers everything at its start.
    fn cluster(&self) -> Option<&dyn Cluster> {
        None
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError>;

    /// Jobs by priority then insertion order.
    async fn list(&self, filter: &ListFilter) -> Result<Page, StoreError>;

    async fn counts(&self) -> Result<StateCounts, StoreError>;

    /// The newest time stamped on a stored job, so that a restarted server's clock does not go back past it.
    async fn newest_time(&self) -> Result<Option<Micros>, StoreError>;

    /// When the longest-waiting pending job was enqueued.
    async fn oldest_pending(&self) -> Result<Option<Micros>, StoreError>;

    /// The attempts of a job, oldest first.
    async fn runs(&self, id: &str) -> Result<Vec<RunRecord>, StoreError>;

    /// The stored output of run `run` of job `id` from byte `from` on, in order: the chunk that holds `from` and
    /// those after it, as many as `budget` bytes hold (at least one).
    async fn output(
        &self,
        id: &str,
        run: u32,
        from: u64,
        budget: usize,
    ) -> Result<OutputPage, StoreError>;

    async fn load_config(&self) -> Result<Vec<(String, String)>, StoreError>;

    /// Stores a setting and, when it changed how jobs age, re-keys the waiting jobs with `rekey`.
    async fn save_config(
        &self,
        key: &str,
        value: &str,
        rekey: Option<Policy>,
    ) -> Result<(), StoreError>;

    /// Deletes the jobs among `ids` that are final, with their runs. Returns the ids it deleted.
    async fn delete_final(&self, ids: &[&str]) -> Result<Vec<String>, StoreError>;

    /// Deletes up to `limit` jobs in `state`, a final state, that reached it at least `older_than` microseconds
    /// ago by the database's clock, oldest first, with their runs. Returns how many it deleted.
    async fn purge(
        &self,
        state: JobState,
        older_than: Micros,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// Deletes every job and setting and restarts generated ids at job1. Returns how many jobs it deleted.
    async fn reset(&self) -> Result<u64, StoreError>;

    /// Whether [`Store::backup`] can copy this database (PostgreSQL has its own tools for that).
    fn can_backup(&self) -> bool {
        false
    }

    /// Writes a consistent copy of the database into `path`, an empty file, while writes go on. Returns its size.
    async fn backup(&self, path: &std::path::Path) -> Result<u64, StoreError> {
        let _ = path;
        Err(StoreError::Internal(
            "this database has no backup here".into(),
        ))
    }

    /// Leaves the database complete and self-contained at a clean stop (SQLite: its log checkpointed into the
    /// database file, so that a copy of that one file is whole).
    async fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The capability of a database that several servers share: leases on claims, a record of who is alive, and
/// announcements from one server to the others.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// How long a claim holds without renewal.
    fn lease(&self) -> Duration;

    /// Publishes `server`, renews the leases of the jobs its workers run (and only those), and returns the jobs
    /// whose lease ran out, for the caller to return to the queue: those of servers that stopped renewing, and
    /// claims of any server, this one included, that no worker runs (a claim whose reply was lost).
    async fn heartbeat(&self, server: &ServerRecord) -> Result<Vec<InFlight>, StoreError>;

    /// The servers that sent a heartbeat within a lease: those whose jobs are not yet up for rescue.
    async fn servers(&self) -> Result<Vec<ServerRecord>, StoreError>;

    /// Asks every server of the database to run `count` workers.
    async fn broadcast_workers(&self, count: u32) -> Result<(), StoreError>;

    /// Asks every server of the database to stop its workers and end its running jobs, before a reset.
    async fn broadcast_reset(&self) -> Result<(), StoreError>;

    /// Asks the server that runs `cancel.run` of a job to end it as cancelled.
    async fn broadcast_cancel(&self, cancel: &CancelRequest) -> Result<(), StoreError>;

    /// Passes job events on to every server of the database (this one included, which ignores its own). Events
    /// may be dropped, as a slow watcher's are: watchers re-read the jobs.
    async fn broadcast_events(&self, events: &JobEvents) -> Result<(), StoreError>;

    /// Changes made through other servers; the first caller takes the stream.
    fn signals(&self) -> Option<mpsc::UnboundedReceiver<Signal>>;
}
