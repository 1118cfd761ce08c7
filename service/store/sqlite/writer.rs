//! SQLite's writer: a thread of its own that owns the one connection that writes, and runs each piece of work it
//! is handed from its first statement to its commit without a hand-off. Through sqlx every statement went to sqlx's
//! SQLite thread and every result came back as a message, a dozen hand-offs per worker commit, which cost more
//! than the statements themselves.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use super::meaning;
use crate::job::{self, Job, JobState, Micros};
use crate::output::OutputWrite;
use crate::store::batch::{Dependents, Found, Insert, Settle, StartAt, Statements};
use crate::store::row::JobRow;
use crate::store::sql::{self, offset};
use crate::store::{ClaimStart, RunStarted, StoreError};

/// How long a piece of work waits for the writer before it fails as unavailable (a statement stuck on a stalled
/// disk must not hold every request forever).
const WRITER_WAIT: Duration = Duration::from_secs(30);

/// Prepared statements the connection keeps: every statement a batch may run, with room to spare.
const STATEMENT_CACHE: usize = 64;

/// The database file and its write-ahead log as they were when the store opened them. A commit lands in the files
/// the connections hold open; if someone deletes or replaces them by name, commits go to files nobody will read
/// again (or that vanish at the next crash), so from then on nothing is acknowledged.
struct DatabaseFiles {
    paths: [PathBuf; 2],
    identities: [Option<FileIdentity>; 2],
    /// Set once the files were found changed: every later write fails with it.
    lost: std::sync::OnceLock<String>,
}

/// What tells one file from another one put in its place.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileIdentity {
    device: u64,
    inode: u64,
}

impl FileIdentity {
    fn of(path: &Path) -> Option<FileIdentity> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).ok().map(|metadata| FileIdentity {
                device: metadata.dev(),
                inode: metadata.ino(),
            })
        }
        #[cfg(windows)]
        {
            // Windows does not let a file that is open be deleted or replaced.
            let _ = path;
            None
        }
    }
}

impl DatabaseFiles {
    fn new(database: &Path) -> DatabaseFiles {
        let mut wal = database.as_os_str().to_owned();
        wal.push("-wal");
        let paths = [database.to_owned(), PathBuf::from(wal)];
        let identities = [FileIdentity::of(&paths[0]), FileIdentity::of(&paths[1])];
        DatabaseFiles {
            paths,
            identities,
            lost: std::sync::OnceLock::new(),
        }
    }

    /// Fails if a file the store opened was deleted or replaced since; the first time, says so loudly.
    fn check(&self) -> Result<(), StoreError> {
        if let Some(reason) = self.lost.get() {
            return Err(StoreError::Broken(reason.clone()));
        }
        for (path, opened) in self.paths.iter().zip(&self.identities) {
            let Some(opened) = opened else {
                continue;
            };
            let now = FileIdentity::of(path);
            if now == Some(*opened) {
                continue;
            }
            let what = if now.is_none() { "deleted" } else { "replaced" };
            let reason = format!(
                "{} was {what} while the server ran, so writes no longer reach the database; nothing is \
                 acknowledged until the server is restarted (after restoring the file from a backup if needed)",
                path.display()
            );
            tracing::error!(path = %path.display(), what, "a database file changed under the server");
            let reason = self.lost.get_or_init(|| reason).clone();
            return Err(StoreError::Broken(reason));
        }
        Ok(())
    }
}

type Work = Box<dyn FnOnce(&mut Slot) + Send>;

/// The handle to the writer thread, which ends when the handle is dropped.
pub struct WriterThread {
    work: mpsc::Sender<Work>,
    files: Arc<DatabaseFiles>,
}

/// What the writer thread holds: the connection, `None` after a failure closed it, until the next work opens
/// another.
struct Slot {
    path: PathBuf,
    files: Arc<DatabaseFiles>,
    open: Option<Open>,
}

struct Open {
    conn: Connection,
    /// The `synchronous` mode the connection is in: `true` for FULL, as it is opened.
    durable: bool,
}

impl WriterThread {
    /// Opens the writer connection to the database at `path`, which exists, and starts its thread.
    pub fn start(path: &Path) -> Result<WriterThread, StoreError> {
        let open = open(path)?;
        // After the connection opened, which made the write-ahead log if there was none.
        let files = Arc::new(DatabaseFiles::new(path));
        let mut slot = Slot {
            path: path.to_owned(),
            files: Arc::clone(&files),
            open: Some(open),
        };
        let (work, inbox) = mpsc::channel::<Work>();
        std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || {
                for work in inbox {
                    work(&mut slot);
                }
            })
            .map_err(|error| {
                StoreError::Internal(format!("starting the database's writer thread: {error}"))
            })?;
        Ok(WriterThread { work, files })
    }

    /// Runs `work` on the writer connection, with commits fsynced or not (`durable`; `None`: in the mode the
    /// connection is in, for work that commits nothing). `work` opens and commits its own transaction.
    pub async fn run<T: Send + 'static>(
        &self,
        durable: Option<bool>,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, mut answer) = oneshot::channel();
        // Set by whichever comes first: the thread starting the work, or the caller giving up on it. Work that
        // started is waited for to the end, so that no commit is reported as failed.
        let taken = Arc::new(AtomicBool::new(false));
        let started = Arc::clone(&taken);
        let work: Work = Box::new(move |slot| {
            // A caller that went away (a request cancelled while it waited) no longer wants its work done.
            if reply.is_closed() || started.swap(true, Ordering::SeqCst) {
                return;
            }
            // A panic in the work must not end the thread, and with it every later write: its connection, taken
            // out of the slot, is dropped on the way out, which rolls back what it did.
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| slot.run(durable, work)))
                .unwrap_or_else(|_| {
                    Err(StoreError::Internal(
                        "a write failed unexpectedly and was rolled back (see the server's log)"
                            .to_owned(),
                    ))
                });
            let _ = reply.send(result);
        });
        self.work.send(work).map_err(|_| stopped())?;
        let result = match tokio::time::timeout(WRITER_WAIT, &mut answer).await {
            Ok(result) => result.unwrap_or_else(|_| Err(stopped())),
            Err(_) if !taken.swap(true, Ordering::SeqCst) => {
                return Err(StoreError::Unavailable(format!(
                    "the database's writer has been busy for {}s",
                    WRITER_WAIT.as_secs()
                )));
            }
            Err(_) => answer.await.unwrap_or_else(|_| Err(stopped())),
        };
        // A commit into files that were replaced meanwhile is not acknowledged.
        self.files.check()?;
        result
    }
}

fn stopped() -> StoreError {
    StoreError::Internal("the database's writer thread stopped".to_owned())
}

impl Slot {
    fn run<T>(
        &mut self,
        durable: Option<bool>,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // Once the files were found replaced, nothing more is written: not even into the files the connection holds,
        // where readers would still see it.
        if let Some(reason) = self.files.lost.get() {
            return Err(StoreError::Broken(reason.clone()));
        }
        let mut open = match self.open.take() {
            Some(open) => open,
            None => {
                // Once the files were replaced, no write may open a connection, which would convert whatever now
                // lies at the path. (Writes on a connection that is open land in the files it holds, and are not
                // acknowledged: see `WriterThread::run`.)
                self.files.check()?;
                open(&self.path)?
            }
        };
        if let Some(durable) = durable.filter(|durable| *durable != open.durable) {
            let mode = if durable { "FULL" } else { "NORMAL" };
            open.conn
                .pragma_update(None, "synchronous", mode)
                .map_err(classify)?;
            open.durable = durable;
        }
        // Back in its slot only if all went well. A failed statement or a commit the disk refused leaves the
        // connection inside its transaction, where every later begin would fail: closing it rolls back what it
        // did, and the next work opens a fresh one, which starts in FULL mode.
        let result = work(&mut open.conn);
        if result.is_ok() {
            self.open = Some(open);
        }
        result
    }
}

/// Opens a writer connection. Never creates the database: a write must not make one where it was deleted.
fn open(path: &Path) -> Result<Open, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(classify)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(classify)?;
    // Keep the log small: checkpoint every 1 MiB (256 pages of 4 KiB), and truncate it back to 4 MiB at most
    // after a checkpoint, so that it cannot fill a small disk.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA wal_autocheckpoint = 256;
         PRAGMA journal_size_limit = 4194304;",
    )
    .map_err(classify)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(Open {
        conn,
        durable: true,
    })
}

/// Maps an error of the writer connection to what it means for a client.
pub fn classify(error: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(failure, message) = &error {
        let message = message.clone().unwrap_or_else(|| failure.to_string());
        if let Some(meaning) = meaning(i64::from(failure.extended_code), &message) {
            return meaning;
        }
    }
    StoreError::Internal(error.to_string())
}

/// Runs a future whose every await is ready at once, as those of [`SqliteStatements`] are: it runs statements on
/// a connection this thread owns.
pub fn run_now<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => unreachable!("statements on the writer thread never wait"),
    }
}

fn to_json(rows: &(impl serde::Serialize + ?Sized)) -> Result<String, StoreError> {
    serde_json::to_string(rows)
        .map_err(|error| StoreError::Internal(format!("encoding a statement's rows: {error}")))
}

/// The statements of a batch on the writer connection, inside the transaction the caller opened. SQLite's clock is
/// the server's: `now`, the batch's time.
pub struct SqliteStatements<'c> {
    pub conn: &'c mut Connection,
    pub now: Micros,
    /// See [`super::SqliteStore::dependencies`].
    pub dependencies: &'c AtomicBool,
}

impl SqliteStatements<'_> {
    /// Runs one statement with `input` as `?1`.
    fn execute(&self, statement: &str, input: &str) -> Result<usize, StoreError> {
        self.conn
            .prepare_cached(statement)
            .and_then(|mut statement| statement.execute([input]))
            .map_err(classify)
    }

    /// Records the start of a run whose shell started after its claim, if the job is still in that run.
    fn record_start(&self, start: &RunStarted) -> rusqlite::Result<()> {
        // `+state`: the job is found by its key, never by walking every processing job through jobs_by_state.
        let matched = self
            .conn
            .prepare_cached(
                "UPDATE jobs SET pgid = ?4 WHERE seq = ?1 AND id = ?2 AND +state = 'processing' AND runs = ?3",
            )?
            .execute((start.seq, &start.job_id, start.run, start.pgid))?;
        if matched > 0 {
            self.record_run(start.seq, start.run, start.worker, start.started_at)?;
        }
        Ok(())
    }

    /// Records that run `run` of a job started at `started_at`, unless it is on record already.
    fn record_run(
        &self,
        seq: i64,
        run: u32,
        worker: u32,
        started_at: Micros,
    ) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO job_runs (job_seq, run, worker, started_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (job_seq, run) DO NOTHING",
            )?
            .execute((seq, run, worker, started_at))?;
        Ok(())
    }

    /// Applies a guarded update if its guard matches, and ends its run if it says so. Returns whether it applied.
    fn apply_update(&self, settle: &Settle<'_>) -> rusqlite::Result<bool> {
        let update = settle.update;
        let settled = &update.settled;
        // No RETURNING: SQLite collects a statement's returned rows in a table it makes and drops each time. The
        // guard names the run, so a match ends that run.
        let matched = self
            .conn
            .prepare_cached(
                "UPDATE jobs SET state = ?5, attempts = ?6, run_after = ?7, queue_key = ?8, last_error = ?9,
                                 interruptions = ?10, updated_at = ?11, pgid = NULL
                 WHERE seq = ?1 AND id = ?2 AND state = ?3 AND runs = ?4",
            )?
            .execute((
                update.seq,
                &update.job_id,
                update.expect_state.as_str(),
                update.expect_runs,
                settled.state.as_str(),
                settled.attempts,
                self.now.saturating_add(settle.ready_in),
                self.now.saturating_add(settle.queue_offset),
                settled.last_error.as_deref(),
                settled.interruptions,
                self.now,
            ))?;
        if matched == 0 {
            return Ok(false);
        }
        if let Some(ended) = &update.ended {
            self.conn
                .prepare_cached(
                    "INSERT INTO job_runs (job_seq, run, worker, started_at, finished_at, outcome, truncated)
                     VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6)
                     ON CONFLICT (job_seq, run) DO UPDATE SET
                         finished_at = excluded.finished_at, outcome = excluded.outcome,
                         truncated = excluded.truncated",
                )?
                .execute((
                    update.seq,
                    update.expect_runs,
                    ended.worker,
                    self.now,
                    ended.outcome.as_str(),
                    ended.truncated,
                ))?;
        }
        Ok(true)
    }

    /// Claims up to `limit` ready jobs, best first, and records the start of the claimed job at each of
    /// `claimed_starts`' positions. Returns the claimed jobs as they are after the claim.
    fn claim(
        &self,
        limit: u32,
        claimed_starts: &[StartAt],
        last_ready: i64,
    ) -> Result<Vec<Job>, StoreError> {
        // Without the index named, SQLite may pick jobs_by_state and sort every waiting job on each claim; the
        // bound on queue_key ends the scan before the jobs that are not due yet, which sort after every ready one
        // (see `job::last_ready_key`). The limit is cast: SQLite plans with the value of a bare `LIMIT ?3`, and so
        // prepares the statement again each time ?3 is bound.
        let rows = self
            .conn
            .prepare_cached(
                "SELECT id, seq, command, state, priority, attempts, max_retries, timeout_secs, runs, created_at,
                        updated_at, run_after, last_error, interruptions, cwd, env
                 FROM jobs INDEXED BY jobs_ready
                 WHERE state IN ('pending', 'failed') AND run_after <= ?1 AND queue_key <= ?2
                 ORDER BY queue_key, seq LIMIT CAST(?3 AS INTEGER)",
            )
            .and_then(|mut statement| {
                statement
                    .query_map(
                        (self.now, self.now.saturating_add(last_ready), limit),
                        |row| {
                            Ok(JobRow {
                                id: row.get(0)?,
                                seq: row.get(1)?,
                                command: row.get(2)?,
                                state: row.get(3)?,
                                priority: row.get(4)?,
                                attempts: row.get(5)?,
                                max_retries: row.get(6)?,
                                timeout_secs: row.get(7)?,
                                runs: row.get(8)?,
                                created_at: row.get(9)?,
                                updated_at: row.get(10)?,
                                run_after: row.get(11)?,
                                last_error: row.get(12)?,
                                interruptions: row.get(13)?,
                                after_ids: None,
                                cwd: row.get(14)?,
                                env: row.get(15)?,
                            })
                        },
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(classify)?;
        let mut claimed = Vec::with_capacity(rows.len());
        for (position, row) in rows.into_iter().enumerate() {
            let mut job = Job::try_from(row)?;
            job.state = JobState::Processing;
            job.runs += 1;
            job.updated_at = self.now;
            let start = claimed_starts
                .iter()
                .find(|at| at.position == position)
                .map(|at| at.start);
            self.start_claimed(&job, start).map_err(classify)?;
            claimed.push(job);
        }
        Ok(claimed)
    }

    /// Moves a claimed job to processing in its new run, and records the run's start if its shell waits for it.
    fn start_claimed(&self, job: &Job, start: Option<ClaimStart>) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE jobs SET state = 'processing', runs = ?2, updated_at = ?3, pgid = ?4 WHERE seq = ?1",
            )?
            .execute((
                job.seq,
                job.runs,
                self.now,
                start.and_then(|start| start.pgid),
            ))?;
        if let Some(start) = start {
            self.record_run(job.seq, job.runs, start.worker, self.now)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Statements for SqliteStatements<'_> {
    type Error = StoreError;

    async fn reserve_numbers(&mut self, count: usize) -> Result<Vec<i64>, StoreError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        let first: i64 = self
            .conn
            .prepare_cached(
                "UPDATE counters SET value = value + ?1 WHERE name = 'next_job_number' RETURNING value - ?1",
            )
            .and_then(|mut statement| statement.query_row([count], |row| row.get(0)))
            .map_err(classify)?;
        Ok((first..first + count).collect())
    }

    async fn insert_jobs(&mut self, jobs: &[Insert<'_>]) -> Result<Vec<Job>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let rows = to_json(jobs)?;
        // `WHERE true` tells SQLite's parser that ON CONFLICT belongs to the INSERT, not to a join.
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO jobs (id, command, state, priority, max_retries, timeout_secs, queue_key, created_at,
                                   updated_at, run_after, after_ids, cwd, env)
                 SELECT r.value ->> 'id', r.value ->> 'command', 'pending', r.value ->> 'priority',
                        r.value ->> 'max_retries', r.value ->> 'timeout_secs', ?2 + (r.value ->> 'queue_offset'),
                        ?2, ?2, ?2 + (r.value ->> 'ready_in'), r.value ->> 'after_ids', r.value ->> 'cwd',
                        r.value ->> 'env'
                 FROM jsonb_each(?1) AS r WHERE true
                 ON CONFLICT (id) DO NOTHING",
            )
            .and_then(|mut statement| statement.execute((&rows, self.now)))
            .map_err(classify)?;
        // The writer holds the database's write lock, and SQLite numbers the rows one statement inserts one after
        // another, in the order it reads them: the inserted rows are the last `count` numbers.
        let count = i64::try_from(inserted).unwrap_or(i64::MAX);
        let first = self.conn.last_insert_rowid() - count + 1;
        if inserted == jobs.len() {
            return Ok(jobs
                .iter()
                .zip(first..)
                .map(|(insert, seq)| insert.stored(seq, self.now))
                .collect());
        }
        // Some ids were taken: which ones were stored, for the rules to undo.
        let mut statement = self
            .conn
            .prepare_cached("SELECT id, seq FROM jobs WHERE seq BETWEEN ?1 AND ?2")
            .map_err(classify)?;
        let stored = statement
            .query_map((first, first + count - 1), |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(classify)?;
        Ok(stored
            .into_iter()
            .filter_map(|(id, seq)| {
                let insert = jobs.iter().find(|insert| insert.id == id)?;
                Some(insert.stored(seq, self.now))
            })
            .collect())
    }

    async fn delete_jobs(&mut self, ids: &[&str]) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM jobs WHERE id IN (SELECT value FROM jsonb_each(?1))",
            &to_json(ids)?,
        )?;
        Ok(())
    }

    async fn find_jobs(&mut self, ids: &[&str]) -> Result<Vec<Found>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT id, seq, state FROM jobs WHERE id IN (SELECT value FROM jsonb_each(?1))",
            )
            .map_err(classify)?;
        let rows = statement
            .query_map([to_json(ids)?], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                ))
            })
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(classify)?;
        rows.into_iter()
            .map(|(id, seq, state)| {
                let state = state.parse::<JobState>().map_err(|error| {
                    StoreError::Internal(format!("reading job {id}'s state: {error}"))
                })?;
                Ok(Found { id, seq, state })
            })
            .collect()
    }

    async fn add_dependencies(
        &mut self,
        edges: &[(i64, i64)],
        held: &[i64],
    ) -> Result<(), StoreError> {
        self.dependencies.store(true, Ordering::SeqCst);
        self.execute(
            "INSERT INTO job_dependencies (job_seq, after_seq)
             SELECT e.value ->> 0, e.value ->> 1 FROM jsonb_each(?1) AS e WHERE true
             ON CONFLICT DO NOTHING",
            &to_json(edges)?,
        )?;
        let held = to_json(held)?;
        self.conn
            .prepare_cached(
                "UPDATE jobs SET run_after = ?2, queue_key = ?2 WHERE seq IN (SELECT value FROM jsonb_each(?1))",
            )
            .and_then(|mut statement| statement.execute((&held, job::HELD)))
            .map_err(classify)?;
        Ok(())
    }

    async fn settle_dependents(
        &mut self,
        completed: &[i64],
        failed: &[i64],
        aging_micros: i64,
    ) -> Result<Dependents, StoreError> {
        let mut dependents = Dependents::default();
        if !self.dependencies.load(Ordering::SeqCst) {
            return Ok(dependents);
        }
        if !completed.is_empty() {
            let completed = to_json(completed)?;
            // `+state` and `+run_after`: found by row from the dependencies, never by walking every pending job.
            let released = self
                .conn
                .prepare_cached(
                    "UPDATE jobs SET run_after = ?2, queue_key = ?2 + (priority - 1) * ?3, updated_at = ?2
                     WHERE seq IN (SELECT job_seq FROM job_dependencies
                                   WHERE after_seq IN (SELECT value FROM jsonb_each(?1)))
                       AND +state = 'pending' AND +run_after = ?4
                       AND NOT EXISTS (SELECT 1 FROM job_dependencies d JOIN jobs j ON j.seq = d.after_seq
                                       WHERE d.job_seq = jobs.seq AND j.state <> 'completed')",
                )
                .and_then(|mut statement| {
                    statement.execute((&completed, self.now, aging_micros, job::HELD))
                })
                .map_err(classify)?;
            dependents.released = u64::try_from(released).unwrap_or(u64::MAX);
        }
        if !failed.is_empty() {
            let failed = to_json(failed)?;
            let mut statement = self
                .conn
                .prepare_cached(
                    "WITH RECURSIVE doomed (seq, cause) AS (
                         SELECT d.job_seq, 'cancelled: it runs after ' || j.id ||
                                CASE j.state WHEN 'dead' THEN ', which ended dead' ELSE ', which was cancelled' END
                         FROM job_dependencies d JOIN jobs j ON j.seq = d.after_seq
                         WHERE d.after_seq IN (SELECT value FROM jsonb_each(?1))
                         UNION
                         SELECT d.job_seq, 'cancelled: it runs after ' || j.id || ', which was cancelled'
                         FROM doomed JOIN job_dependencies d ON d.after_seq = doomed.seq
                                     JOIN jobs j ON j.seq = doomed.seq)
                     UPDATE jobs SET state = 'cancelled', last_error = doomed.cause, run_after = ?2, queue_key = ?2,
                                     updated_at = ?2
                     FROM doomed WHERE jobs.seq = doomed.seq AND jobs.state = 'pending' AND jobs.run_after = ?3
                     RETURNING jobs.id, jobs.last_error",
                )
                .map_err(classify)?;
            dependents.cancelled = statement
                .query_map((&failed, self.now, job::HELD), |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                })
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(classify)?;
        }
        Ok(dependents)
    }

    async fn settle_and_claim(
        &mut self,
        starts: &[&RunStarted],
        updates: &[Settle<'_>],
        claim: u32,
        claimed_starts: &[StartAt],
        last_ready: i64,
    ) -> Result<(Vec<bool>, Vec<Job>), StoreError> {
        for start in starts {
            self.record_start(start).map_err(classify)?;
        }
        let applied = updates
            .iter()
            .map(|settle| self.apply_update(settle).map_err(classify))
            .collect::<Result<_, _>>()?;
        let claimed = if claim == 0 {
            Vec::new()
        } else {
            self.claim(claim, claimed_starts, last_ready)?
        };
        Ok((applied, claimed))
    }

    async fn write_output(&mut self, writes: &[&OutputWrite]) -> Result<(), StoreError> {
        for write in writes {
            let run = i64::from(write.run);
            for chunk in &write.chunks {
                self.conn
                    .prepare_cached(
                        "INSERT INTO job_output (job_seq, run, start, data, streams)
                         SELECT ?1, ?2, ?3, ?4, ?5
                         WHERE EXISTS (SELECT 1 FROM job_runs WHERE job_seq = ?1 AND run = ?2)
                         ON CONFLICT DO NOTHING",
                    )
                    .and_then(|mut statement| {
                        statement.execute((
                            write.seq,
                            run,
                            offset(chunk.start),
                            chunk.data.as_slice(),
                            chunk.layout(),
                        ))
                    })
                    .map_err(classify)?;
            }
            if let Some(forget) = &write.forget {
                self.conn
                    .prepare_cached(sql::FORGET_OUTPUT)
                    .and_then(|mut statement| {
                        statement.execute((
                            write.seq,
                            run,
                            offset(forget.start),
                            offset(forget.end),
                        ))
                    })
                    .map_err(classify)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_that_panics_is_rolled_back_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        Connection::open(&path)
            .and_then(|conn| conn.execute_batch("CREATE TABLE t (n INTEGER)"))
            .unwrap();
        let writer = WriterThread::start(&path).unwrap();
        let panicked = writer
            .run(Some(true), |conn| -> Result<(), StoreError> {
                conn.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1)")
                    .map_err(classify)?;
                panic!("a bug in a write");
            })
            .await;
        assert!(
            matches!(panicked, Err(StoreError::Internal(_))),
            "{panicked:?}"
        );
        let count = writer
            .run(Some(true), |conn| {
                conn.query_row("SELECT COUNT(*) FROM t", [], |row| row.get::<_, i64>(0))
                    .map_err(classify)
            })
            .await
            .unwrap();
        assert_eq!(count, 0, "the panicked write's insert was rolled back");
    }
}
