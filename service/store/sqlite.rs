//! The embedded SQLite store: one writer connection (SQLite takes one writer at a time, and waiting on our own
//! lock is cheaper than its busy loop) and a small pool of readers beside it, in WAL mode.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::row::{self, JobRow, RunRow, job_columns};
use super::sql::{self, offset};

use super::batch::{self, Dependents, Found, Insert, Settle, StartAt, Statements};
use super::{
    InFlight, ListFilter, OutputPage, Page, RunRecord, RunStarted, StateCounts, Store, StoreError,
    WriteBatch, WriteOutcome,
};
use crate::job::{self, Job, JobState, Micros, Policy};
use crate::output::OutputWrite;

pub struct SqliteStore {
    /// The one writer connection; `None` after a failure closed it, until the next write opens another. Not a pool
    /// of one: a pool tests each connection given back with a round trip to sqlx's SQLite thread, one more per batch.
    writer: tokio::sync::Mutex<Option<Writer>>,
    writer_options: SqliteConnectOptions,
    reader: SqlitePool,
    files: DatabaseFiles,
    /// Whether any job was ever stored with dependencies. One server writes a SQLite database, so until one is, a
    /// finished job has no dependents to settle and its commit skips that statement.
    dependencies: AtomicBool,
}

/// How long a write waits for the writer connection before it fails as unavailable (a statement stuck on a stalled
/// disk must not hold every request forever).
const WRITER_WAIT: Duration = Duration::from_secs(30);

struct Writer {
    conn: SqliteConnection,
    /// The `synchronous` mode the connection is in: `true` for FULL, as it is opened.
    durable: bool,
}

impl Writer {
    async fn open(options: &SqliteConnectOptions) -> Result<Writer, StoreError> {
        let conn = SqliteConnection::connect_with(options)
            .await
            .map_err(classify)?;
        Ok(Writer {
            conn,
            durable: true,
        })
    }
}

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

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            // Keep the log small: checkpoint every 1 MiB (256 pages of 4 KiB), and truncate it back to 4 MiB at
            // most after a checkpoint, so that it cannot fill a small disk.
            .pragma("wal_autocheckpoint", "256")
            .pragma("journal_size_limit", "4194304");
        // On a pool of its own, closed before the writer opens: sqlx's migrator takes a pool or a connection by
        // `Acquire`, which rustc cannot prove `Send` for a connection borrowed for every lifetime (rust-lang/rust#96865).
        let migrating = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(classify)?;
        sqlx::migrate!("service/store/migrations/sqlite")
            .run(&migrating)
            .await
            .map_err(|error| StoreError::Internal(format!("migrating the database: {error}")))?;
        migrating.close().await;
        let mut writer = Writer::open(&options).await?;
        // No idle timeout or lifetime: a pool reaper waking up would make an idle server use CPU.
        // No test before each acquire either: for a local file it is one more round trip per transaction, and a
        // broken connection shows in the transaction's own first statement.
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone().read_only(true))
            .await
            .map_err(classify)?;
        let dependencies: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM job_dependencies)")
                .fetch_one(&mut writer.conn)
                .await
                .map_err(classify)?;
        Ok(SqliteStore {
            writer: tokio::sync::Mutex::new(Some(writer)),
            writer_options: options,
            reader,
            files: DatabaseFiles::new(path),
            dependencies: AtomicBool::new(dependencies),
        })
    }

    /// Runs `work` in an immediate transaction on the writer, committing with or without fsync.
    async fn transaction<T>(
        &self,
        durable: bool,
        work: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, StoreError> {
        self.on_writer(Some(durable), async |conn| {
            let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
            let value = work(&mut *tx).await?;
            tx.commit().await?;
            Ok(value)
        })
        .await
    }

    /// Runs `work`, which opens and commits a transaction of its own, on the writer, with or without fsync (`None`:
    /// in the mode the connection is in, for work that commits nothing).
    async fn on_writer<T>(
        &self,
        durable: Option<bool>,
        work: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, StoreError> {
        // Before the connection: once the files were replaced, no write may open one, which would create or convert
        // whatever now lies at the path.
        self.files.check()?;
        let mut slot = tokio::time::timeout(WRITER_WAIT, self.writer.lock())
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "the database's writer has been busy for {}s",
                    WRITER_WAIT.as_secs()
                ))
            })?;
        // Out of its slot while it works, and back only if all went well. A failed statement or a commit the disk
        // refused leaves the connection inside its transaction, where every later begin would fail, and so does a
        // write dropped halfway: closing the connection rolls back what it did, and the next write opens a fresh
        // one, which starts in FULL mode.
        let mut writer = match slot.take() {
            Some(writer) => writer,
            None => Writer::open(&self.writer_options).await?,
        };
        // Each statement is a round trip to sqlx's SQLite thread: set the mode only when it changes.
        if let Some(durable) = durable.filter(|durable| *durable != writer.durable) {
            let sync = if durable {
                "PRAGMA synchronous = FULL"
            } else {
                "PRAGMA synchronous = NORMAL"
            };
            sqlx::query(sync)
                .execute(&mut writer.conn)
                .await
                .map_err(classify)?;
            writer.durable = durable;
        }
        let result = work(&mut writer.conn).await.map_err(classify);
        if result.is_ok() {
            *slot = Some(writer);
        }
        // A commit into files that were replaced meanwhile is not acknowledged.
        self.files.check()?;
        result
    }

    /// Runs one statement that commits nothing (a checkpoint) on the writer, for its effect.
    async fn on_writer_alone(&self, statement: &'static str) -> Result<(), StoreError> {
        self.on_writer(None, async |conn| {
            sqlx::query(statement).execute(conn).await.map(drop)
        })
        .await
    }
}

/// Maps a driver error to what it means for a client.
fn classify(error: sqlx::Error) -> StoreError {
    const SQLITE_FULL: i64 = 13;
    const DAMAGED: [i64; 2] = [
        11, // SQLITE_CORRUPT
        26, // SQLITE_NOTADB
    ];
    const UNAVAILABLE: [i64; 6] = [
        5,  // SQLITE_BUSY
        6,  // SQLITE_LOCKED
        8,  // SQLITE_READONLY
        10, // SQLITE_IOERR
        14, // SQLITE_CANTOPEN
        23, // SQLITE_AUTH
    ];
    match &error {
        sqlx::Error::Database(db) => {
            let primary = db
                .code()
                .and_then(|code| code.parse::<i64>().ok())
                .map(|code| code & 0xff);
            match primary {
                Some(SQLITE_FULL) => StoreError::Full(db.message().to_owned()),
                Some(code) if DAMAGED.contains(&code) => StoreError::Broken(format!(
                    "the database file is damaged ({}); stop the server and restore it from a backup",
                    db.message()
                )),
                Some(code) if UNAVAILABLE.contains(&code) => {
                    StoreError::Unavailable(db.message().to_owned())
                }
                _ => StoreError::Internal(error.to_string()),
            }
        }
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            StoreError::Unavailable(error.to_string())
        }
        _ => StoreError::Internal(error.to_string()),
    }
}

// sqlx hands every statement to its SQLite thread and waits for the answer, and each hand-off costs more than a
// small statement itself. So a batch is few round trips whatever its size: each kind of write is one statement
// over a JSON array of rows (`jsonb_each`: each row comes out in SQLite's binary form, which `->>` reads as it
// is, where `json_each` turned it back into text for every `->>` to parse again), the statements of a round
// travel together as one script, and what the round must report back comes as one row of JSON aggregates.

fn to_json(rows: &(impl serde::Serialize + ?Sized)) -> Result<String, sqlx::Error> {
    serde_json::to_string(rows).map_err(|error| sqlx::Error::Encode(Box::new(error)))
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(text).map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

/// The statements of a batch on the writer connection. SQLite's clock is the server's: `now`, the batch's time.
struct SqliteStatements<'c> {
    conn: &'c mut SqliteConnection,
    now: Micros,
    /// See [`SqliteStore::dependencies`].
    dependencies: &'c AtomicBool,
    /// Whether the batch's transaction is open: its first statement opens it (see [`SqliteStore::write`]).
    begun: bool,
    /// Whether the worker script may commit the batch: it stores no jobs, and nothing but
    /// [`Statements::settle_dependents`] follows the script ([`batch::ends_with_one_round`]), which writes only where
    /// jobs were stored with dependencies.
    commit_with_round: bool,
    /// Whether the batch is committed.
    committed: bool,
}

impl SqliteStatements<'_> {
    /// Opens the batch's transaction, unless a statement did already.
    async fn begin(&mut self) -> Result<(), sqlx::Error> {
        if self.committed {
            return Err(after_commit());
        }
        if !self.begun {
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut *self.conn)
                .await?;
            self.begun = true;
        }
        Ok(())
    }
}

/// What a statement that came after its batch's commit gets instead of running outside the transaction.
fn after_commit() -> sqlx::Error {
    sqlx::Error::Protocol("a statement came after its batch's commit".to_owned())
}

#[async_trait]
impl Statements for SqliteStatements<'_> {
    async fn reserve_numbers(&mut self, count: usize) -> Result<Vec<i64>, sqlx::Error> {
        if count == 0 {
            return Ok(Vec::new());
        }
        self.begin().await?;
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        let first: i64 = sqlx::query_scalar(
            "UPDATE counters SET value = value + ?1 WHERE name = 'next_job_number' RETURNING value - ?1",
        )
        .bind(count)
        .fetch_one(&mut *self.conn)
        .await?;
        Ok((first..first + count).collect())
    }

    async fn insert_jobs(&mut self, jobs: &[Insert<'_>]) -> Result<Vec<Job>, sqlx::Error> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        self.begin().await?;
        // `WHERE true` tells SQLite's parser that ON CONFLICT belongs to the INSERT, not to a join. No RETURNING:
        // sqlx hands a statement's rows over one at a time, which would cost more than the insert itself.
        let inserted = sqlx::query(
            "INSERT INTO jobs (id, command, state, priority, max_retries, timeout_secs, queue_key, created_at,
                               updated_at, run_after, after_ids, cwd, env)
             SELECT r.value ->> 'id', r.value ->> 'command', 'pending', r.value ->> 'priority',
                    r.value ->> 'max_retries', r.value ->> 'timeout_secs', ?2 + (r.value ->> 'queue_offset'),
                    ?2, ?2, ?2 + (r.value ->> 'ready_in'), r.value ->> 'after_ids', r.value ->> 'cwd',
                    r.value ->> 'env'
             FROM jsonb_each(?1) AS r WHERE true
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(to_json(jobs)?)
        .bind(self.now)
        .execute(&mut *self.conn)
        .await?;
        // The writer holds the database's write lock, and SQLite numbers the rows one statement inserts one after
        // another, in the order it reads them: the inserted rows are the last `count` numbers.
        let count = i64::try_from(inserted.rows_affected()).unwrap_or(i64::MAX);
        let first = inserted.last_insert_rowid() - count + 1;
        if count == i64::try_from(jobs.len()).unwrap_or(i64::MAX) {
            return Ok(jobs
                .iter()
                .zip(first..)
                .map(|(insert, seq)| insert.stored(seq, self.now))
                .collect());
        }
        // Some ids were taken: which ones were stored, for the rules to undo.
        let stored: Vec<(String, i64)> =
            sqlx::query_as("SELECT id, seq FROM jobs WHERE seq BETWEEN ?1 AND ?2")
                .bind(first)
                .bind(first + count - 1)
                .fetch_all(&mut *self.conn)
                .await?;
        Ok(stored
            .into_iter()
            .filter_map(|(id, seq)| {
                let insert = jobs.iter().find(|insert| insert.id == id)?;
                Some(insert.stored(seq, self.now))
            })
            .collect())
    }

    async fn delete_jobs(&mut self, ids: &[&str]) -> Result<(), sqlx::Error> {
        self.begin().await?;
        sqlx::query("DELETE FROM jobs WHERE id IN (SELECT value FROM jsonb_each(?1))")
            .bind(to_json(ids)?)
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    async fn find_jobs(&mut self, ids: &[&str]) -> Result<Vec<Found>, sqlx::Error> {
        self.begin().await?;
        let rows: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT id, seq, state FROM jobs WHERE id IN (SELECT value FROM jsonb_each(?1))",
        )
        .bind(to_json(ids)?)
        .fetch_all(&mut *self.conn)
        .await?;
        rows.into_iter().map(row::found).collect()
    }

    async fn add_dependencies(
        &mut self,
        edges: &[(i64, i64)],
        held: &[i64],
    ) -> Result<(), sqlx::Error> {
        self.begin().await?;
        self.dependencies.store(true, Ordering::SeqCst);
        sqlx::query(
            "INSERT INTO job_dependencies (job_seq, after_seq)
             SELECT e.value ->> 0, e.value ->> 1 FROM jsonb_each(?1) AS e WHERE true
             ON CONFLICT DO NOTHING",
        )
        .bind(to_json(edges)?)
        .execute(&mut *self.conn)
        .await?;
        sqlx::query(
            "UPDATE jobs SET run_after = ?2, queue_key = ?2 WHERE seq IN (SELECT value FROM jsonb_each(?1))",
        )
        .bind(to_json(held)?)
        .bind(job::HELD)
        .execute(&mut *self.conn)
        .await?;
        Ok(())
    }

    async fn settle_dependents(
        &mut self,
        completed: &[i64],
        failed: &[i64],
        aging_micros: i64,
    ) -> Result<Dependents, sqlx::Error> {
        let mut dependents = Dependents::default();
        if !self.dependencies.load(Ordering::SeqCst) {
            return Ok(dependents);
        }
        self.begin().await?;
        if !completed.is_empty() {
            // `+state` and `+run_after`: found by row from the dependencies, never by walking every pending job.
            dependents.released = sqlx::query(
                "UPDATE jobs SET run_after = ?2, queue_key = ?2 + (priority - 1) * ?3, updated_at = ?2
                 WHERE seq IN (SELECT job_seq FROM job_dependencies
                               WHERE after_seq IN (SELECT value FROM jsonb_each(?1)))
                   AND +state = 'pending' AND +run_after = ?4
                   AND NOT EXISTS (SELECT 1 FROM job_dependencies d JOIN jobs j ON j.seq = d.after_seq
                                   WHERE d.job_seq = jobs.seq AND j.state <> 'completed')",
            )
            .bind(to_json(completed)?)
            .bind(self.now)
            .bind(aging_micros)
            .bind(job::HELD)
            .execute(&mut *self.conn)
            .await?
            .rows_affected();
        }
        if !failed.is_empty() {
            dependents.cancelled = sqlx::query_as(
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
            .bind(to_json(failed)?)
            .bind(self.now)
            .bind(job::HELD)
            .fetch_all(&mut *self.conn)
            .await?;
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
    ) -> Result<(Vec<bool>, Vec<Job>), sqlx::Error> {
        let input = WorkerInput {
            starts: &starts
                .iter()
                .map(|start| StartRow::of(start))
                .collect::<Vec<_>>(),
            updates: &updates.iter().map(UpdateRow::of).collect::<Vec<_>>(),
            now: self.now,
            limit: claim,
            last_key: self.now.saturating_add(last_ready),
            claimed_starts: &claimed_starts
                .iter()
                .map(ClaimedStartRow::of)
                .collect::<Vec<_>>(),
        };
        if self.committed {
            return Err(after_commit());
        }
        // The script opens the transaction when it is the batch's first statement, as it is on a worker's commit,
        // and commits it when nothing follows.
        let commit = self.commit_with_round && !self.dependencies.load(Ordering::SeqCst);
        let script = match (self.begun, commit) {
            (true, false) => WORKER_SCRIPT,
            (false, false) => BEGIN_AND_WORKER_SCRIPT,
            (true, true) => WORKER_SCRIPT_AND_COMMIT,
            (false, true) => BEGIN_WORKER_SCRIPT_AND_COMMIT,
        };
        self.begun = true;
        let answer = run_worker_script(self.conn, script, &input).await?;
        self.committed = commit;
        read_worker_answer(answer, &input)
    }

    async fn write_output(&mut self, writes: &[&OutputWrite]) -> Result<(), sqlx::Error> {
        self.begin().await?;
        for write in writes {
            let run = i64::from(write.run);
            for chunk in &write.chunks {
                sqlx::query(
                    "INSERT INTO job_output (job_seq, run, start, data, streams)
                     SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM job_runs WHERE job_seq = ?1 AND run = ?2)
                     ON CONFLICT DO NOTHING",
                )
                .bind(write.seq)
                .bind(run)
                .bind(offset(chunk.start))
                .bind(chunk.data.as_slice())
                .bind(chunk.layout())
                .execute(&mut *self.conn)
                .await?;
            }
            if let Some(forget) = &write.forget {
                sqlx::query(sql::FORGET_OUTPUT)
                    .bind(write.seq)
                    .bind(run)
                    .bind(offset(forget.start))
                    .bind(offset(forget.end))
                    .execute(&mut *self.conn)
                    .await?;
            }
        }
        Ok(())
    }
}

/// A recorded start, as the worker script reads it.
#[derive(serde::Serialize)]
struct StartRow<'a> {
    id: &'a str,
    seq: i64,
    run: u32,
    worker: u32,
    pgid: Option<i64>,
    started_at: Micros,
}

impl<'a> StartRow<'a> {
    fn of(start: &'a RunStarted) -> Self {
        StartRow {
            id: &start.job_id,
            seq: start.seq,
            run: start.run,
            worker: start.worker,
            pgid: start.pgid,
            started_at: start.started_at,
        }
    }
}

/// A guarded update, as the worker script reads it.
#[derive(serde::Serialize)]
struct UpdateRow<'a> {
    id: &'a str,
    seq: i64,
    expect_state: &'a str,
    expect_runs: u32,
    state: &'a str,
    attempts: u32,
    ready_in: i64,
    queue_offset: i64,
    last_error: Option<&'a str>,
    interruptions: u32,
    /// Set when the update ends its run.
    worker: Option<u32>,
    outcome: Option<&'a str>,
    truncated: bool,
}

impl<'a> UpdateRow<'a> {
    fn of(settle: &Settle<'a>) -> Self {
        let update = settle.update;
        let settled = &update.settled;
        let ended = update.ended.as_ref();
        UpdateRow {
            id: &update.job_id,
            seq: update.seq,
            expect_state: update.expect_state.as_str(),
            expect_runs: update.expect_runs,
            state: settled.state.as_str(),
            attempts: settled.attempts,
            ready_in: settle.ready_in,
            queue_offset: settle.queue_offset,
            last_error: settled.last_error.as_deref(),
            interruptions: settled.interruptions,
            worker: ended.map(|ended| ended.worker),
            outcome: ended.map(|ended| ended.outcome.as_str()),
            truncated: ended.is_some_and(|ended| ended.truncated),
        }
    }
}

/// The jobs a claim takes: ready at `now`, best first, at most `limit`. Without the index named, SQLite may pick
/// jobs_by_state and sort every waiting job on each claim; the bound `last_key` on queue_key ends the scan before
/// the jobs that are not due yet, which sort after every ready one (see `job::last_ready_key`).
macro_rules! claim_candidates {
    () => {
        "SELECT * FROM jobs INDEXED BY jobs_ready
         WHERE state IN ('pending', 'failed') AND run_after <= (?1 ->> 'now')
           AND queue_key <= (?1 ->> 'last_key')
         ORDER BY queue_key, seq LIMIT (?1 ->> 'limit')"
    };
}

/// A start recorded with the claim, as the worker script reads it.
#[derive(serde::Serialize)]
struct ClaimedStartRow {
    position: usize,
    worker: u32,
    pgid: Option<i64>,
}

impl ClaimedStartRow {
    fn of(at: &StartAt) -> Self {
        ClaimedStartRow {
            position: at.position,
            worker: at.start.worker,
            pgid: at.start.pgid,
        }
    }
}

/// What the worker script reads: its one parameter, so that every statement of the script names the same one
/// (sqlx binds the parameters of a script's statements by position, and a statement that skips a number shifts
/// the rest).
#[derive(serde::Serialize)]
struct WorkerInput<'a> {
    starts: &'a [StartRow<'a>],
    updates: &'a [UpdateRow<'a>],
    now: Micros,
    limit: u32,
    last_key: i64,
    claimed_starts: &'a [ClaimedStartRow],
}

/// The worker side of a batch, in one round trip: record `starts`, apply the guarded `updates`, claim up to `limit`
/// ready jobs and record the starts of those that have a shell waiting (`claimed_starts`, by their position among
/// the claimed jobs, best first). Its one row holds the positions in `updates` of those whose guard matched, and
/// the claimed jobs as they were before the claim. Each job is found by its id, from the JSON rows (CROSS JOIN
/// fixes that order; `+jobs.state` keeps SQLite from walking every processing job through jobs_by_state instead).
macro_rules! worker_script {
    () => {
        concat!(
            "CREATE TEMP TABLE IF NOT EXISTS settling (
         position INTEGER PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
         run_after INTEGER NOT NULL, queue_key INTEGER NOT NULL, last_error TEXT, interruptions INTEGER NOT NULL,
         run INTEGER NOT NULL,
         worker INTEGER, outcome TEXT, truncated INTEGER NOT NULL);
     CREATE TEMP TABLE IF NOT EXISTS claiming (
         position INTEGER PRIMARY KEY, seq INTEGER NOT NULL, worker INTEGER, pgid INTEGER);
     DELETE FROM temp.settling;
     DELETE FROM temp.claiming;

     UPDATE jobs SET pgid = s.value ->> 'pgid'
     FROM jsonb_each(?1, '$.starts') AS s
     WHERE jobs.seq = s.value ->> 'seq' AND jobs.id = s.value ->> 'id' AND +jobs.state = 'processing'
       AND jobs.runs = s.value ->> 'run';
     INSERT INTO job_runs (job_seq, run, worker, started_at)
     SELECT jobs.seq, s.value ->> 'run', s.value ->> 'worker', s.value ->> 'started_at'
     FROM jsonb_each(?1, '$.starts') AS s
     CROSS JOIN jobs ON jobs.seq = s.value ->> 'seq' AND jobs.id = s.value ->> 'id'
                    AND +jobs.state = 'processing' AND jobs.runs = s.value ->> 'run'
     WHERE true
     ON CONFLICT (job_seq, run) DO NOTHING;

     INSERT INTO temp.settling
     SELECT u.key, jobs.seq, u.value ->> 'state', u.value ->> 'attempts',
            (?1 ->> 'now') + (u.value ->> 'ready_in'), (?1 ->> 'now') + (u.value ->> 'queue_offset'),
            u.value ->> 'last_error', u.value ->> 'interruptions', jobs.runs, u.value ->> 'worker',
            u.value ->> 'outcome', u.value ->> 'truncated'
     FROM jsonb_each(?1, '$.updates') AS u
     CROSS JOIN jobs ON jobs.seq = u.value ->> 'seq' AND jobs.id = u.value ->> 'id'
                    AND jobs.state = u.value ->> 'expect_state'
                    AND jobs.runs = u.value ->> 'expect_runs';
     UPDATE jobs SET state = s.state, attempts = s.attempts, run_after = s.run_after, queue_key = s.queue_key,
                     last_error = s.last_error, interruptions = s.interruptions, updated_at = (?1 ->> 'now'),
                     pgid = NULL
     FROM temp.settling AS s WHERE jobs.seq = s.seq;
     INSERT INTO job_runs (job_seq, run, worker, started_at, finished_at, outcome, truncated)
     SELECT s.seq, s.run, s.worker, ?1 ->> 'now', ?1 ->> 'now', s.outcome, s.truncated
     FROM temp.settling AS s WHERE s.outcome IS NOT NULL
     ON CONFLICT (job_seq, run) DO UPDATE SET
         finished_at = excluded.finished_at, outcome = excluded.outcome, truncated = excluded.truncated;

     INSERT INTO temp.claiming (position, seq)
     SELECT row_number() OVER (ORDER BY queue_key, seq) - 1, seq FROM (",
            claim_candidates!(),
            ");
     SELECT (SELECT json_group_array(position) FROM temp.settling),
            (SELECT json_group_array(json_object(
                        'id', id, 'command', command, 'state', state, 'priority', priority, 'attempts', attempts,
                        'max_retries', max_retries, 'timeout_secs', timeout_secs, 'runs', runs,
                        'created_at', created_at, 'updated_at', updated_at, 'run_after', run_after,
                        'last_error', last_error, 'interruptions', interruptions, 'seq', jobs.seq,
                        'cwd', cwd, 'env', env))
             FROM temp.claiming AS c CROSS JOIN jobs ON jobs.seq = c.seq);
     UPDATE temp.claiming SET worker = s.value ->> 'worker', pgid = s.value ->> 'pgid'
     FROM jsonb_each(?1, '$.claimed_starts') AS s WHERE claiming.position = s.value ->> 'position';
     UPDATE jobs SET state = 'processing', runs = runs + 1, updated_at = (?1 ->> 'now'), pgid = c.pgid
     FROM temp.claiming AS c WHERE jobs.seq = c.seq;
     INSERT INTO job_runs (job_seq, run, worker, started_at)
     SELECT jobs.seq, jobs.runs, c.worker, ?1 ->> 'now'
     FROM temp.claiming AS c CROSS JOIN jobs ON jobs.seq = c.seq
     WHERE c.worker IS NOT NULL
     ON CONFLICT (job_seq, run) DO NOTHING;"
        )
    };
}

const WORKER_SCRIPT: &str = worker_script!();

/// The worker script as the first statement of a batch: with it, the batch's transaction opens in the same round
/// trip.
const BEGIN_AND_WORKER_SCRIPT: &str = concat!("BEGIN IMMEDIATE;\n", worker_script!());

/// The worker script as the last statement of a batch, which it commits in the same round trip.
const WORKER_SCRIPT_AND_COMMIT: &str = concat!(worker_script!(), "\nCOMMIT;");

/// The worker script as the one statement of a batch.
const BEGIN_WORKER_SCRIPT_AND_COMMIT: &str =
    concat!("BEGIN IMMEDIATE;\n", worker_script!(), "\nCOMMIT;");

/// Runs a worker script with `input`. Returns its answer, for [`read_worker_answer`].
async fn run_worker_script(
    conn: &mut SqliteConnection,
    script: &'static str,
    input: &WorkerInput<'_>,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    // fetch_all, not fetch_one: fetch_one would stop the script at its first row, before the claim's UPDATE.
    sqlx::query_as(script)
        .bind(to_json(input)?)
        .fetch_all(conn)
        .await
}

/// For each update of `input`, whether its guard matched, and the claimed jobs, from a worker script's answer.
fn read_worker_answer(
    answer: Vec<(String, String)>,
    input: &WorkerInput<'_>,
) -> Result<(Vec<bool>, Vec<Job>), sqlx::Error> {
    let Some((settled, picked)) = answer.into_iter().next() else {
        return Err(sqlx::Error::RowNotFound);
    };
    let mut applied = vec![false; input.updates.len()];
    for position in from_json::<Vec<usize>>(&settled)? {
        applied[position] = true;
    }
    let claimed = from_json::<Vec<JobRow>>(&picked)?
        .into_iter()
        .map(|row| {
            let mut job = Job::try_from(row)?;
            job.state = JobState::Processing;
            job.runs += 1;
            job.updated_at = input.now;
            Ok(job)
        })
        .collect::<Result<_, StoreError>>()
        .map_err(|error| sqlx::Error::Decode(Box::new(error)))?;
    Ok((applied, claimed))
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(
        &self,
        batch: &WriteBatch,
        now: Micros,
        policy: Policy,
    ) -> Result<WriteOutcome, StoreError> {
        // No BEGIN of its own: it would cost a round trip to sqlx's thread, and the batch's first statement carries
        // it (the worker script, on a worker's commit); the COMMIT travels with the worker script when nothing
        // follows it, as on most worker commits.
        self.on_writer(Some(batch.durable), async |conn| {
            let dependencies = &self.dependencies;
            let mut statements = SqliteStatements {
                conn,
                now,
                dependencies,
                begun: false,
                // Not with enqueues: an answer that could not be read after its commit would report jobs that
                // are stored as not stored, and a retry would store them twice.
                commit_with_round: batch.enqueues.is_empty() && batch::ends_with_one_round(batch),
                committed: false,
            };
            let outcome = batch::apply(&mut statements, batch, now, policy).await?;
            if statements.begun && !statements.committed {
                sqlx::query("COMMIT").execute(&mut *statements.conn).await?;
            }
            Ok(outcome)
        })
        .await
    }

    async fn next_due(&self, now: Micros) -> Result<Option<Duration>, StoreError> {
        // Named for the same reason as in `claim`: otherwise this scans every waiting job.
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(run_after) FROM jobs INDEXED BY jobs_waiting
             WHERE state IN ('pending', 'failed') AND run_after < ?1",
        )
        .bind(job::HELD)
        .fetch_one(&self.reader)
        .await
        .map_err(classify)?;
        Ok(next.map(|next| super::due_in(next, now)))
    }

    /// One server owns a SQLite database, so everything processing was its own.
    async fn in_flight(&self, _owner: &str) -> Result<Vec<InFlight>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            job_columns!(),
            ", pgid FROM jobs WHERE state = 'processing'"
        );
        let rows = sqlx::query(SQL)
            .fetch_all(&self.reader)
            .await
            .map_err(classify)?;
        row::in_flight(&rows, classify)
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let row: Option<JobRow> = sqlx::query_as(sql::GET_JOB)
            .bind(id)
            .fetch_optional(&self.reader)
            .await
            .map_err(classify)?;
        row.map(Job::try_from).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Page, StoreError> {
        let listing = sql::listing(filter, &sql::WAITING_SQLITE);
        let mut query = sqlx::query(listing.statement)
            .bind(listing.after.key)
            .bind(listing.after.seq)
            .bind(i64::from(filter.limit) + 1);
        if let Some(state) = listing.state {
            query = query.bind(state);
        }
        let rows = query.fetch_all(&self.reader).await.map_err(classify)?;
        row::page(&rows, filter.limit, classify)
    }

    async fn counts(&self) -> Result<StateCounts, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT state, jobs FROM job_counts")
            .fetch_all(&self.reader)
            .await
            .map_err(classify)?;
        row::counts(rows)
    }

    async fn newest_time(&self) -> Result<Option<Micros>, StoreError> {
        sqlx::query_scalar(sql::NEWEST_TIME)
            .fetch_one(&self.reader)
            .await
            .map_err(classify)
    }

    async fn oldest_pending(&self) -> Result<Option<Micros>, StoreError> {
        sqlx::query_scalar(sql::OLDEST_PENDING_SQLITE)
            .fetch_one(&self.reader)
            .await
            .map_err(classify)
    }

    async fn runs(&self, id: &str) -> Result<Vec<RunRecord>, StoreError> {
        let rows: Vec<RunRow> = sqlx::query_as(sql::RUNS_OF_JOB)
            .bind(id)
            .fetch_all(&self.reader)
            .await
            .map_err(classify)?;
        rows.into_iter().map(RunRecord::try_from).collect()
    }

    async fn output(
        &self,
        id: &str,
        run: u32,
        from: u64,
        budget: usize,
    ) -> Result<OutputPage, StoreError> {
        // A chunk forgotten between the two reads is missing from the page: a gap, as it is from then on.
        let sizes: Vec<(i64, i64)> = sqlx::query_as(sql::OUTPUT_SIZES)
            .bind(id)
            .bind(i64::from(run))
            .bind(offset(from))
            .fetch_all(&self.reader)
            .await
            .map_err(classify)?;
        let Some((last, more)) = sql::page_end(&sizes, budget) else {
            return Ok(OutputPage::default());
        };
        let rows: Vec<(i64, Vec<u8>, String)> = sqlx::query_as(sql::OUTPUT_CHUNKS)
            .bind(id)
            .bind(i64::from(run))
            .bind(offset(from))
            .bind(last)
            .fetch_all(&self.reader)
            .await
            .map_err(classify)?;
        Ok(row::output_page(rows, more))
    }

    async fn load_config(&self) -> Result<Vec<(String, String)>, StoreError> {
        sqlx::query_as(sql::LOAD_CONFIG)
            .fetch_all(&self.reader)
            .await
            .map_err(classify)
    }

    async fn save_config(
        &self,
        key: &str,
        value: &str,
        rekey: Option<Policy>,
    ) -> Result<(), StoreError> {
        self.transaction(true, async |conn| {
            sqlx::query(sql::SAVE_CONFIG)
                .bind(key)
                .bind(value)
                .execute(&mut *conn)
                .await?;
            if let Some(policy) = rekey {
                sqlx::query(sql::REKEY_WAITING)
                    .bind(job::secs_to_micros(policy.aging_interval_secs))
                    .execute(conn)
                    .await?;
            }
            Ok(())
        })
        .await
    }

    async fn delete_final(&self, ids: &[&str]) -> Result<Vec<String>, StoreError> {
        let ids = to_json(ids).map_err(classify)?;
        // `+state`: found by id, never by walking every final job.
        self.transaction(true, async |conn| {
            sqlx::query_scalar(
                "DELETE FROM jobs WHERE id IN (SELECT value FROM jsonb_each(?1))
                   AND +state IN ('completed', 'dead', 'cancelled')
                 RETURNING id",
            )
            .bind(ids)
            .fetch_all(conn)
            .await
        })
        .await
    }

    async fn purge(
        &self,
        state: JobState,
        older_than: Micros,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let before = crate::clock::now().saturating_sub(older_than);
        let deleted = self
            .transaction(false, async |conn| {
                Ok(sqlx::query(sql::PURGE_FINAL)
                    .bind(state.as_str())
                    .bind(before)
                    .bind(i64::from(limit))
                    .execute(conn)
                    .await?
                    .rows_affected())
            })
            .await?;
        // A purge writes much log: checkpoint it here, at the purge's cost, rather than in the commit of whichever
        // enqueue or claim next crosses the automatic checkpoint's threshold.
        self.on_writer_alone("PRAGMA wal_checkpoint(PASSIVE)")
            .await?;
        Ok(deleted)
    }

    fn can_backup(&self) -> bool {
        true
    }

    async fn backup(&self, path: &Path) -> Result<u64, StoreError> {
        // A reader's snapshot: writers go on meanwhile, and the copy is one consistent moment.
        let mut conn = self.reader.acquire().await.map_err(classify)?;
        sqlx::query("VACUUM INTO ?1")
            .bind(path.to_string_lossy().into_owned())
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
        std::fs::metadata(path)
            .map(|metadata| metadata.len())
            .map_err(|error| StoreError::Internal(format!("reading the backup's size: {error}")))
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.on_writer_alone("PRAGMA wal_checkpoint(TRUNCATE)")
            .await
    }

    async fn reset(&self) -> Result<u64, StoreError> {
        self.transaction(true, async |conn| {
            sqlx::query("DELETE FROM job_runs")
                .execute(&mut *conn)
                .await?;
            let deleted = sqlx::query(sql::DELETE_ALL_JOBS)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            sqlx::query(sql::DELETE_ALL_CONFIG)
                .execute(&mut *conn)
                .await?;
            sqlx::query("UPDATE counters SET value = 1 WHERE name = 'next_job_number'")
                .execute(conn)
                .await?;
            Ok(deleted)
        })
        .await
    }
}
