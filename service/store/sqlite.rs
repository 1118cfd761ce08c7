//! The embedded SQLite store: one writer connection on a thread of its own (SQLite takes one writer at a time, and
//! waiting on our own queue is cheaper than its busy loop) and a small pool of readers beside it, in WAL mode.

mod writer;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::TransactionBehavior;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::row::{self, JobRow, RunRow, job_columns};
use super::sql::{self, offset};

use super::batch;
use super::{
    InFlight, ListFilter, OutputPage, Page, RunRecord, StateCounts, Store, StoreError, WriteBatch,
    WriteOutcome,
};
use crate::job::{self, Job, JobState, Micros, Policy};
use writer::{SqliteStatements, WriterThread, run_now};

pub struct SqliteStore {
    /// The one connection that writes, on its thread.
    writer: WriterThread,
    reader: SqlitePool,
    /// Whether any job was ever stored with dependencies. One server writes a SQLite database, so until one is, a
    /// finished job has no dependents to settle and its commit skips that statement.
    dependencies: Arc<AtomicBool>,
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
            .busy_timeout(Duration::from_secs(5));
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
        let writer = WriterThread::start(path)?;
        // No idle timeout or lifetime: a pool reaper waking up would make an idle server use CPU.
        // No test before each acquire either: for a local file it is one more round trip per transaction, and a
        // broken connection shows in the transaction's own first statement.
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.read_only(true))
            .await
            .map_err(classify)?;
        let dependencies: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM job_dependencies)")
                .fetch_one(&reader)
                .await
                .map_err(classify)?;
        Ok(SqliteStore {
            writer,
            reader,
            dependencies: Arc::new(AtomicBool::new(dependencies)),
        })
    }

    /// Runs `work` in an immediate transaction on the writer, committing with or without fsync.
    async fn transaction<T: Send + 'static>(
        &self,
        durable: bool,
        work: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.writer
            .run(Some(durable), |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(writer::classify)?;
                let value = work(&tx).map_err(writer::classify)?;
                tx.commit().map_err(writer::classify)?;
                Ok(value)
            })
            .await
    }

    /// Runs one statement that commits nothing (a checkpoint) on the writer, for its effect.
    async fn on_writer_alone(&self, statement: &'static str) -> Result<(), StoreError> {
        self.writer
            .run(None, move |conn| {
                conn.execute_batch(statement).map_err(writer::classify)
            })
            .await
    }
}

/// Maps an error of a reader connection to what it means for a client.
fn classify(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i64>().ok())
            .and_then(|code| meaning(code, db.message()))
            .unwrap_or_else(|| StoreError::Internal(error.to_string())),
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            StoreError::Unavailable(error.to_string())
        }
        _ => StoreError::Internal(error.to_string()),
    }
}

/// What SQLite's result `code` with `message` means for a client, where it means more than a failed statement.
fn meaning(code: i64, message: &str) -> Option<StoreError> {
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
    // Extended codes carry the primary code in their low byte.
    match code & 0xff {
        SQLITE_FULL => Some(StoreError::Full(message.to_owned())),
        code if DAMAGED.contains(&code) => Some(StoreError::Broken(format!(
            "the database file is damaged ({message}); stop the server and restore it from a backup"
        ))),
        code if UNAVAILABLE.contains(&code) => Some(StoreError::Unavailable(message.to_owned())),
        _ => None,
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(
        &self,
        batch: Arc<WriteBatch>,
        now: Micros,
        policy: Policy,
    ) -> Result<WriteOutcome, StoreError> {
        let dependencies = Arc::clone(&self.dependencies);
        self.writer
            .run(Some(batch.durable), move |conn| {
                conn.execute_batch("BEGIN IMMEDIATE")
                    .map_err(writer::classify)?;
                let mut statements = SqliteStatements {
                    conn,
                    now,
                    dependencies: &dependencies,
                };
                let outcome = run_now(batch::apply(&mut statements, &batch, now, policy))?;
                statements
                    .conn
                    .execute_batch("COMMIT")
                    .map_err(writer::classify)?;
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
        let (key, value) = (key.to_owned(), value.to_owned());
        self.transaction(true, move |conn| {
            conn.prepare_cached(sql::SAVE_CONFIG)?
                .execute((&key, &value))?;
            if let Some(policy) = rekey {
                conn.prepare_cached(sql::REKEY_WAITING)?
                    .execute([job::secs_to_micros(policy.aging_interval_secs)])?;
            }
            Ok(())
        })
        .await
    }

    async fn delete_final(&self, ids: &[&str]) -> Result<Vec<String>, StoreError> {
        let ids = serde_json::to_string(ids)
            .map_err(|error| StoreError::Internal(format!("encoding job ids: {error}")))?;
        // `+state`: found by id, never by walking every final job.
        self.transaction(true, move |conn| {
            conn.prepare_cached(
                "DELETE FROM jobs WHERE id IN (SELECT value FROM jsonb_each(?1))
                   AND +state IN ('completed', 'dead', 'cancelled')
                 RETURNING id",
            )?
            .query_map([ids], |row| row.get(0))?
            .collect()
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
            .transaction(false, move |conn| {
                let deleted = conn.prepare_cached(sql::PURGE_FINAL)?.execute((
                    state.as_str(),
                    before,
                    i64::from(limit),
                ))?;
                Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
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
        self.transaction(true, |conn| {
            conn.execute("DELETE FROM job_runs", [])?;
            let deleted = conn.execute(sql::DELETE_ALL_JOBS, [])?;
            conn.execute(sql::DELETE_ALL_CONFIG, [])?;
            conn.execute(
                "UPDATE counters SET value = 1 WHERE name = 'next_job_number'",
                [],
            )?;
            Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
        })
        .await
    }
}
