//! The embedded SQLite store: one writer connection (SQLite takes one writer at a time, and waiting on our own
//! pool is cheaper than its busy loop) and a small pool of readers beside it, in WAL mode.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::row::{self, JobRow, RunRow, job_columns};
use tokio::sync::mpsc;

use super::{
    Cursor, EnqueueRejected, GuardedUpdate, InFlight, ListFilter, Page, RunRecord, RunStarted,
    ServerRecord, Signal, StateCounts, Store, StoreError, WriteBatch, WriteOutcome,
};
use crate::job::{self, Job, Micros, NewJob, Policy};

pub struct SqliteStore {
    writer: SqlitePool,
    /// The `synchronous` mode the writer connection is in: `true` for FULL, as it is opened.
    writer_durable: AtomicBool,
    reader: SqlitePool,
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
        // No idle timeout or lifetime: a pool reaper waking up would make an idle server use CPU.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await
            .map_err(classify)?;
        sqlx::migrate!("service/store/migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|error| StoreError::Internal(format!("migrating the database: {error}")))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.read_only(true))
            .await
            .map_err(classify)?;
        Ok(SqliteStore {
            writer,
            writer_durable: AtomicBool::new(true),
            reader,
        })
    }

    /// Runs `work` in an immediate transaction on the writer, committing with or without fsync.
    async fn transaction<T>(
        &self,
        durable: bool,
        work: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, StoreError> {
        let mut conn = self.writer.acquire().await.map_err(classify)?;
        // Each statement is a round trip to sqlx's SQLite thread: set the mode only when it changes.
        if self.writer_durable.swap(durable, Ordering::SeqCst) != durable {
            let sync = if durable {
                "PRAGMA synchronous = FULL"
            } else {
                "PRAGMA synchronous = NORMAL"
            };
            if let Err(error) = sqlx::query(sync).execute(&mut *conn).await {
                // Unknown mode now: make the next transaction set it again.
                self.writer_durable.store(!durable, Ordering::SeqCst);
                return Err(classify(error));
            }
        }
        let result = async {
            let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
            let value = work(&mut *tx).await?;
            tx.commit().await?;
            Ok(value)
        }
        .await;
        if result.is_err() {
            // A commit the disk refused leaves the connection inside its transaction, and every later begin would
            // fail: a fresh connection (which opens in FULL mode) starts clean once the fault is gone.
            conn.close_on_drop();
            self.writer_durable.store(true, Ordering::SeqCst);
        }
        result.map_err(classify)
    }
}

/// Maps a driver error to what it means for a client.
fn classify(error: sqlx::Error) -> StoreError {
    const SQLITE_FULL: i64 = 13;
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

/// Reserves `count` generated job numbers in one statement and returns the first.
async fn next_job_numbers(conn: &mut SqliteConnection, count: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE counters SET value = value + ?1 WHERE name = 'next_job_number' RETURNING value - ?1",
    )
    .bind(count)
    .fetch_one(conn)
    .await
}

/// Inserts one job; `None` when its id is taken.
async fn insert_job(
    conn: &mut SqliteConnection,
    id: &str,
    job: &NewJob,
    now: Micros,
    policy: Policy,
) -> Result<Option<JobRow>, sqlx::Error> {
    const SQL: &str = concat!(
        "INSERT INTO jobs (id, command, state, priority, max_retries, timeout_secs, queue_key, created_at,
                           updated_at, run_after)
         VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, ?7, ?7, ?7)
         ON CONFLICT (id) DO NOTHING
         RETURNING ",
        job_columns!()
    );
    sqlx::query_as(SQL)
        .bind(id)
        .bind(&job.command)
        .bind(i64::from(job.priority))
        .bind(i64::from(job.max_retries))
        .bind(job.timeout_secs.map(saturating_i64))
        .bind(job::queue_key(
            now,
            job.priority,
            policy.aging_interval_secs,
        ))
        .bind(now)
        .fetch_optional(conn)
        .await
}

/// Stores one request's jobs, or none of them if an id is taken.
async fn enqueue_request(
    conn: &mut SqliteConnection,
    jobs: &[NewJob],
    now: Micros,
    policy: Policy,
) -> Result<Result<Vec<JobRow>, EnqueueRejected>, sqlx::Error> {
    let mut savepoint = conn.begin().await?;
    let mut stored = Vec::with_capacity(jobs.len());
    // One statement reserves a number for every job without an id, instead of one statement per job.
    let generated =
        i64::try_from(jobs.iter().filter(|job| job.id.is_none()).count()).unwrap_or(i64::MAX);
    let mut reserved = match generated {
        0 => 0..0,
        count => {
            let first = next_job_numbers(&mut savepoint, count).await?;
            first..first + count
        }
    };
    for new_job in jobs {
        let inserted = match &new_job.id {
            Some(id) => insert_job(&mut savepoint, id, new_job, now, policy).await?,
            // A generated id can collide with one a person chose; then take the next number.
            None => loop {
                let number = match reserved.next() {
                    Some(number) => number,
                    None => next_job_numbers(&mut savepoint, 1).await?,
                };
                let id = format!("job{number}");
                if let Some(job) = insert_job(&mut savepoint, &id, new_job, now, policy).await? {
                    break Some(job);
                }
            },
        };
        match inserted {
            Some(job) => stored.push(job),
            None => {
                savepoint.rollback().await?;
                let id = new_job.id.clone().unwrap_or_default();
                return Ok(Err(EnqueueRejected::DuplicateId(id)));
            }
        }
    }
    savepoint.commit().await?;
    Ok(Ok(stored))
}

async fn record_start(conn: &mut SqliteConnection, start: &RunStarted) -> Result<(), sqlx::Error> {
    let seq: Option<i64> = sqlx::query_scalar(
        "UPDATE jobs SET pgid = ?1 WHERE id = ?2 AND state = 'processing' AND runs = ?3 RETURNING seq",
    )
    .bind(start.pgid)
    .bind(&start.job_id)
    .bind(i64::from(start.run))
    .fetch_optional(&mut *conn)
    .await?;
    let Some(seq) = seq else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO job_runs (job_seq, run, worker, started_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (job_seq, run) DO NOTHING",
    )
    .bind(seq)
    .bind(i64::from(start.run))
    .bind(i64::from(start.worker))
    .bind(start.started_at)
    .execute(conn)
    .await?;
    Ok(())
}

async fn apply_update(
    conn: &mut SqliteConnection,
    update: &GuardedUpdate,
    now: Micros,
) -> Result<bool, sqlx::Error> {
    let settled = &update.settled;
    let seq: Option<i64> = sqlx::query_scalar(
        "UPDATE jobs SET state = ?1, attempts = ?2, run_after = ?3, queue_key = ?4, last_error = ?5,
                         updated_at = ?6, pgid = NULL
         WHERE id = ?7 AND state = ?8 AND runs = ?9
         RETURNING seq",
    )
    .bind(settled.state.as_str())
    .bind(i64::from(settled.attempts))
    .bind(settled.run_after)
    .bind(settled.queue_key)
    .bind(&settled.last_error)
    .bind(now)
    .bind(&update.job_id)
    .bind(update.expect_state.as_str())
    .bind(i64::from(update.expect_runs))
    .fetch_optional(&mut *conn)
    .await?;
    let Some(seq) = seq else {
        return Ok(false);
    };
    if let Some(ended) = &update.ended {
        sqlx::query(
            "INSERT INTO job_runs (job_seq, run, worker, started_at, finished_at, outcome, output, truncated)
             VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6, ?7)
             ON CONFLICT (job_seq, run) DO UPDATE SET
                 finished_at = excluded.finished_at, outcome = excluded.outcome,
                 output = excluded.output, truncated = excluded.truncated",
        )
        .bind(seq)
        .bind(i64::from(update.expect_runs))
        .bind(i64::from(ended.worker))
        .bind(now)
        .bind(&ended.outcome)
        .bind(&ended.output)
        .bind(ended.truncated)
        .execute(conn)
        .await?;
    }
    Ok(true)
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(
        &self,
        batch: &WriteBatch,
        now: Micros,
        policy: Policy,
    ) -> Result<WriteOutcome, StoreError> {
        let (enqueued, applied) = self
            .transaction(batch.durable, async |conn| {
                let mut enqueued = Vec::with_capacity(batch.enqueues.len());
                for jobs in &batch.enqueues {
                    enqueued.push(enqueue_request(conn, jobs, now, policy).await?);
                }
                for start in &batch.starts {
                    record_start(conn, start).await?;
                }
                let mut applied = Vec::with_capacity(batch.updates.len());
                for update in &batch.updates {
                    applied.push(apply_update(conn, update, now).await?);
                }
                Ok((enqueued, applied))
            })
            .await?;
        let enqueued = enqueued
            .into_iter()
            .map(|request| match request {
                Ok(rows) => row::jobs(rows).map(Ok),
                Err(rejected) => Ok(Err(rejected)),
            })
            .collect::<Result<_, _>>()?;
        Ok(WriteOutcome { enqueued, applied })
    }

    fn lease(&self) -> Option<Duration> {
        None
    }

    async fn claim(&self, limit: u32, now: Micros, _owner: &str) -> Result<Vec<Job>, StoreError> {
        // Without the index named, SQLite may pick jobs_by_state and sort every waiting job on each claim: with
        // many jobs waiting (retries, jobs not due yet) that made claiming cost milliseconds.
        const SQL: &str = concat!(
            "UPDATE jobs SET state = 'processing', runs = runs + 1, updated_at = ?1, pgid = NULL
             WHERE seq IN (SELECT seq FROM jobs INDEXED BY jobs_ready
                           WHERE state IN ('pending', 'failed') AND run_after <= ?1
                           ORDER BY queue_key, seq LIMIT ?2)
             RETURNING ",
            job_columns!()
        );
        let rows: Vec<JobRow> = self
            .transaction(false, async |conn| {
                sqlx::query_as(SQL)
                    .bind(now)
                    .bind(i64::from(limit))
                    .fetch_all(conn)
                    .await
            })
            .await?;
        row::jobs(rows)
    }

    async fn next_due(&self, now: Micros) -> Result<Option<Duration>, StoreError> {
        // Named for the same reason as in `claim`: otherwise this scans every waiting job.
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(run_after) FROM jobs INDEXED BY jobs_waiting WHERE state IN ('pending', 'failed')",
        )
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
        const SQL: &str = concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = ?1");
        let row: Option<JobRow> = sqlx::query_as(SQL)
            .bind(id)
            .fetch_optional(&self.reader)
            .await
            .map_err(classify)?;
        row.map(Job::try_from).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Page, StoreError> {
        let after = filter.after.unwrap_or(Cursor {
            priority: 0,
            seq: 0,
        });
        const ALL: &str = concat!(
            "SELECT ",
            job_columns!(),
            ", seq FROM jobs WHERE (priority, seq) > (?1, ?2) ORDER BY priority, seq LIMIT ?3"
        );
        const IN_STATE: &str = concat!(
            "SELECT ",
            job_columns!(),
            ", seq FROM jobs WHERE state = ?4 AND (priority, seq) > (?1, ?2) ORDER BY priority, seq LIMIT ?3"
        );
        let sql = if filter.state.is_some() {
            IN_STATE
        } else {
            ALL
        };
        let mut query = sqlx::query(sql)
            .bind(i64::from(after.priority))
            .bind(after.seq)
            .bind(i64::from(filter.limit) + 1);
        if let Some(state) = filter.state {
            query = query.bind(state.as_str());
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

    async fn oldest_pending(&self) -> Result<Option<Micros>, StoreError> {
        sqlx::query_scalar("SELECT MIN(created_at) FROM jobs WHERE state = 'pending'")
            .fetch_one(&self.reader)
            .await
            .map_err(classify)
    }

    async fn runs(&self, id: &str) -> Result<Vec<RunRecord>, StoreError> {
        let rows: Vec<RunRow> = sqlx::query_as(
            "SELECT r.run, r.worker, r.started_at, r.finished_at, r.outcome, r.output, r.truncated
             FROM job_runs r JOIN jobs j ON j.seq = r.job_seq
             WHERE j.id = ?1 ORDER BY r.run",
        )
        .bind(id)
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        rows.into_iter().map(RunRecord::try_from).collect()
    }

    async fn load_config(&self) -> Result<Vec<(String, String)>, StoreError> {
        sqlx::query_as("SELECT key, value FROM config")
            .fetch_all(&self.reader)
            .await
            .map_err(classify)
    }

    async fn save_config(&self, key: &str, value: &str, policy: Policy) -> Result<(), StoreError> {
        self.transaction(true, async |conn| {
            sqlx::query(
                "INSERT INTO config (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "UPDATE jobs SET queue_key = run_after + (priority - 1) * ?1
                 WHERE state IN ('pending', 'failed')",
            )
            .bind(job::secs_to_micros(policy.aging_interval_secs))
            .execute(conn)
            .await?;
            Ok(())
        })
        .await
    }

    async fn heartbeat(&self, _server: &ServerRecord) -> Result<Vec<InFlight>, StoreError> {
        Ok(Vec::new())
    }

    async fn servers(&self) -> Result<Vec<ServerRecord>, StoreError> {
        Ok(Vec::new())
    }

    async fn broadcast_workers(&self, _count: u32) -> Result<(), StoreError> {
        Ok(())
    }

    fn signals(&self) -> Option<mpsc::UnboundedReceiver<Signal>> {
        None
    }

    async fn reset(&self) -> Result<u64, StoreError> {
        self.transaction(true, async |conn| {
            sqlx::query("DELETE FROM job_runs")
                .execute(&mut *conn)
                .await?;
            let deleted = sqlx::query("DELETE FROM jobs")
                .execute(&mut *conn)
                .await?
                .rows_affected();
            sqlx::query("DELETE FROM config")
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
