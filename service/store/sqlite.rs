//! The embedded SQLite store: one writer connection (SQLite takes one writer at a time, and waiting on our own
//! pool is cheaper than its busy loop) and a small pool of readers beside it, in WAL mode.

use std::collections::HashMap;
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
use crate::job::{self, Job, JobState, Micros, NewJob, Policy};

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

// sqlx hands every statement to its SQLite thread, and every row a statement returns back one message at a time;
// each hand-off costs more than the SQL itself. So each kind of write in a batch is one statement over a JSON array
// of rows (`json_each`), whatever the number of jobs, and what a write must report back comes as one row (a JSON
// aggregate) or not at all.

fn to_json(rows: &(impl serde::Serialize + ?Sized)) -> Result<String, sqlx::Error> {
    serde_json::to_string(rows).map_err(|error| sqlx::Error::Encode(Box::new(error)))
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(text).map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

/// A job to insert, as the enqueue statement reads it.
#[derive(serde::Serialize)]
struct NewRow<'a> {
    id: String,
    command: &'a str,
    priority: u8,
    max_retries: u32,
    timeout_secs: Option<i64>,
    queue_key: i64,
}

impl<'a> NewRow<'a> {
    fn of(id: String, job: &'a NewJob, now: Micros, policy: Policy) -> Self {
        NewRow {
            id,
            command: &job.command,
            priority: job.priority,
            max_retries: job.max_retries,
            timeout_secs: job.timeout_secs.map(saturating_i64),
            queue_key: job::queue_key(now, job.priority, policy.aging_interval_secs),
        }
    }

    /// The job as the insert stored it.
    fn stored(self, job: &NewJob, now: Micros) -> Job {
        Job {
            id: self.id,
            command: job.command.clone(),
            state: JobState::Pending,
            attempts: 0,
            max_retries: job.max_retries,
            priority: job.priority,
            timeout_secs: job.timeout_secs,
            runs: 0,
            created_at: now,
            updated_at: now,
            run_after: now,
            last_error: None,
        }
    }
}

/// Inserts `rows`, skipping those whose id is taken; returns how many it inserted.
async fn insert_jobs(
    conn: &mut SqliteConnection,
    rows: &[NewRow<'_>],
    now: Micros,
) -> Result<u64, sqlx::Error> {
    // `WHERE true` tells SQLite's parser that ON CONFLICT belongs to the INSERT, not to a join.
    let inserted = sqlx::query(
        "INSERT INTO jobs (id, command, state, priority, max_retries, timeout_secs, queue_key, created_at,
                           updated_at, run_after)
         SELECT r.value ->> 'id', r.value ->> 'command', 'pending', r.value ->> 'priority',
                r.value ->> 'max_retries', r.value ->> 'timeout_secs', r.value ->> 'queue_key', ?2, ?2, ?2
         FROM json_each(?1) AS r WHERE true
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(to_json(rows)?)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected())
}

/// Stores every request of a batch with one statement. `None` (and nothing stored) if some id was taken: then
/// each request must be stored on its own, to reject just the requests that hold a taken id.
async fn enqueue_together(
    conn: &mut SqliteConnection,
    requests: &[Vec<NewJob>],
    now: Micros,
    policy: Policy,
) -> Result<Option<Vec<Vec<Job>>>, sqlx::Error> {
    let mut savepoint = conn.begin().await?;
    let generated = requests
        .iter()
        .flatten()
        .filter(|job| job.id.is_none())
        .count();
    let mut number = match generated {
        0 => 0,
        count => next_job_numbers(&mut savepoint, i64::try_from(count).unwrap_or(i64::MAX)).await?,
    };
    let rows: Vec<NewRow> = requests
        .iter()
        .flatten()
        .map(|job| {
            let id = job.id.clone().unwrap_or_else(|| {
                number += 1;
                format!("job{}", number - 1)
            });
            NewRow::of(id, job, now, policy)
        })
        .collect();
    if insert_jobs(&mut savepoint, &rows, now).await? != rows.len() as u64 {
        savepoint.rollback().await?;
        return Ok(None);
    }
    savepoint.commit().await?;
    let mut rows = rows.into_iter();
    Ok(Some(
        requests
            .iter()
            .map(|request| {
                request
                    .iter()
                    .zip(rows.by_ref())
                    .map(|(job, row)| row.stored(job, now))
                    .collect()
            })
            .collect(),
    ))
}

/// Stores one request's jobs, or none of them if an id is taken.
async fn enqueue_request(
    conn: &mut SqliteConnection,
    jobs: &[NewJob],
    now: Micros,
    policy: Policy,
) -> Result<Result<Vec<Job>, EnqueueRejected>, sqlx::Error> {
    let mut savepoint = conn.begin().await?;
    let mut stored = Vec::with_capacity(jobs.len());
    for new_job in jobs {
        let id = match &new_job.id {
            Some(id) => {
                let row = NewRow::of(id.clone(), new_job, now, policy);
                (insert_jobs(&mut savepoint, std::slice::from_ref(&row), now).await? == 1)
                    .then_some(row)
            }
            // A generated id can collide with one a person chose; then take the next number.
            None => loop {
                let number = next_job_numbers(&mut savepoint, 1).await?;
                let row = NewRow::of(format!("job{number}"), new_job, now, policy);
                if insert_jobs(&mut savepoint, std::slice::from_ref(&row), now).await? == 1 {
                    break Some(row);
                }
            },
        };
        match id {
            Some(row) => stored.push(row.stored(new_job, now)),
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

async fn enqueue_all(
    conn: &mut SqliteConnection,
    requests: &[Vec<NewJob>],
    now: Micros,
    policy: Policy,
) -> Result<Vec<Result<Vec<Job>, EnqueueRejected>>, sqlx::Error> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(stored) = enqueue_together(conn, requests, now, policy).await? {
        return Ok(stored.into_iter().map(Ok).collect());
    }
    let mut outcomes = Vec::with_capacity(requests.len());
    for jobs in requests {
        outcomes.push(enqueue_request(conn, jobs, now, policy).await?);
    }
    Ok(outcomes)
}

/// Splits `items` into rounds in which no job appears twice, keeping their order: each round is checked and
/// written by set-based statements, in which a job listed twice would be matched twice.
fn rounds<T>(items: &[T], job_id: impl Fn(&T) -> &str) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut round_of: HashMap<&str, usize> = HashMap::new();
    for (index, item) in items.iter().enumerate() {
        let round = round_of
            .entry(job_id(item))
            .and_modify(|round| *round += 1)
            .or_insert(0);
        if *round == rounds.len() {
            rounds.push(Vec::new());
        }
        rounds[*round].push(index);
    }
    rounds
}

/// The guard of each row of `rows` (a JSON array of `{id, state, runs}`) that matches its job: `(position in
/// rows, the job's seq)`. The writer holds the database's write lock, so the match holds until it commits.
async fn matching_guards(
    conn: &mut SqliteConnection,
    rows: String,
) -> Result<Vec<(usize, i64)>, sqlx::Error> {
    let matched: String = sqlx::query_scalar(
        "SELECT json_group_array(json_array(g.key, jobs.seq))
         FROM json_each(?1) AS g
         JOIN jobs ON jobs.id = g.value ->> 'id' AND jobs.state = g.value ->> 'state'
                  AND jobs.runs = g.value ->> 'runs'",
    )
    .bind(rows)
    .fetch_one(conn)
    .await?;
    from_json(&matched)
}

/// A guard as [`matching_guards`] reads it.
#[derive(serde::Serialize)]
struct Guard<'a> {
    id: &'a str,
    state: &'a str,
    runs: u32,
}

/// A run row to insert or complete, as [`upsert_runs`] reads it.
#[derive(serde::Serialize)]
struct RunRowJson<'a> {
    seq: i64,
    run: u32,
    worker: u32,
    started_at: Micros,
    finished_at: Option<Micros>,
    outcome: Option<&'a str>,
    /// Hex, since JSON has no bytes; `unhex` turns it back.
    output: String,
    truncated: bool,
}

/// Inserts run rows, or completes those that exist.
async fn upsert_runs(
    conn: &mut SqliteConnection,
    runs: &[RunRowJson<'_>],
) -> Result<(), sqlx::Error> {
    if runs.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO job_runs (job_seq, run, worker, started_at, finished_at, outcome, output, truncated)
         SELECT r.value ->> 'seq', r.value ->> 'run', r.value ->> 'worker', r.value ->> 'started_at',
                r.value ->> 'finished_at', r.value ->> 'outcome', coalesce(unhex(r.value ->> 'output'), x''),
                r.value ->> 'truncated'
         FROM json_each(?1) AS r WHERE true
         ON CONFLICT (job_seq, run) DO UPDATE SET
             finished_at = excluded.finished_at, outcome = excluded.outcome,
             output = excluded.output, truncated = excluded.truncated
         WHERE excluded.finished_at IS NOT NULL",
    )
    .bind(to_json(runs)?)
    .execute(conn)
    .await?;
    Ok(())
}

async fn record_starts(
    conn: &mut SqliteConnection,
    starts: &[RunStarted],
) -> Result<(), sqlx::Error> {
    for round in rounds(starts, |start| &start.job_id) {
        let guards: Vec<Guard> = round
            .iter()
            .map(|index| Guard {
                id: &starts[*index].job_id,
                state: JobState::Processing.as_str(),
                runs: starts[*index].run,
            })
            .collect();
        let started: Vec<(&RunStarted, i64)> = matching_guards(conn, to_json(&guards)?)
            .await?
            .into_iter()
            .map(|(position, seq)| (&starts[round[position]], seq))
            .collect();
        if started.is_empty() {
            continue;
        }
        let pgids: Vec<(i64, Option<i64>)> = started
            .iter()
            .map(|(start, seq)| (*seq, start.pgid))
            .collect();
        sqlx::query(
            "UPDATE jobs SET pgid = s.value ->> 1 FROM json_each(?1) AS s WHERE jobs.seq = s.value ->> 0",
        )
        .bind(to_json(&pgids)?)
        .execute(&mut *conn)
        .await?;
        let runs: Vec<RunRowJson> = started
            .iter()
            .map(|(start, seq)| RunRowJson {
                seq: *seq,
                run: start.run,
                worker: start.worker,
                started_at: start.started_at,
                finished_at: None,
                outcome: None,
                output: String::new(),
                truncated: false,
            })
            .collect();
        upsert_runs(conn, &runs).await?;
    }
    Ok(())
}

/// Applies guarded updates; one flag per update, whether its guard matched.
async fn apply_updates(
    conn: &mut SqliteConnection,
    updates: &[GuardedUpdate],
    now: Micros,
) -> Result<Vec<bool>, sqlx::Error> {
    #[derive(serde::Serialize)]
    struct Change<'a> {
        seq: i64,
        state: &'a str,
        attempts: u32,
        run_after: Micros,
        queue_key: i64,
        last_error: Option<&'a str>,
    }
    let mut applied = vec![false; updates.len()];
    for round in rounds(updates, |update| &update.job_id) {
        let guards: Vec<Guard> = round
            .iter()
            .map(|index| Guard {
                id: &updates[*index].job_id,
                state: updates[*index].expect_state.as_str(),
                runs: updates[*index].expect_runs,
            })
            .collect();
        let matched = matching_guards(conn, to_json(&guards)?).await?;
        if matched.is_empty() {
            continue;
        }
        let mut changes = Vec::with_capacity(matched.len());
        let mut ended = Vec::new();
        for (position, seq) in matched {
            let index = round[position];
            applied[index] = true;
            let update = &updates[index];
            let settled = &update.settled;
            changes.push(Change {
                seq,
                state: settled.state.as_str(),
                attempts: settled.attempts,
                run_after: settled.run_after,
                queue_key: settled.queue_key,
                last_error: settled.last_error.as_deref(),
            });
            if let Some(end) = &update.ended {
                ended.push(RunRowJson {
                    seq,
                    run: update.expect_runs,
                    worker: end.worker,
                    started_at: now,
                    finished_at: Some(now),
                    outcome: Some(&end.outcome),
                    output: hex(&end.output),
                    truncated: end.truncated,
                });
            }
        }
        sqlx::query(
            "UPDATE jobs SET state = c.value ->> 'state', attempts = c.value ->> 'attempts',
                             run_after = c.value ->> 'run_after', queue_key = c.value ->> 'queue_key',
                             last_error = c.value ->> 'last_error', updated_at = ?2, pgid = NULL
             FROM json_each(?1) AS c
             WHERE jobs.seq = c.value ->> 'seq'",
        )
        .bind(to_json(&changes)?)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        upsert_runs(conn, &ended).await?;
    }
    Ok(applied)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

/// Moves up to `limit` ready jobs to processing, best first, and returns them as they are now.
async fn claim_jobs(
    conn: &mut SqliteConnection,
    limit: u32,
    now: Micros,
) -> Result<Vec<Job>, sqlx::Error> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    // Without the index named, SQLite may pick jobs_by_state and sort every waiting job on each claim: with
    // many jobs waiting (retries, jobs not due yet) that made claiming cost milliseconds.
    let picked: String = sqlx::query_scalar(
        "SELECT json_group_array(json_object(
                    'seq', seq, 'id', id, 'command', command, 'state', state, 'priority', priority,
                    'attempts', attempts, 'max_retries', max_retries, 'timeout_secs', timeout_secs, 'runs', runs,
                    'created_at', created_at, 'updated_at', updated_at, 'run_after', run_after,
                    'last_error', last_error))
         FROM (SELECT * FROM jobs INDEXED BY jobs_ready
               WHERE state IN ('pending', 'failed') AND run_after <= ?1
               ORDER BY queue_key, seq LIMIT ?2)",
    )
    .bind(now)
    .bind(i64::from(limit))
    .fetch_one(&mut *conn)
    .await?;
    let picked: Vec<PickedRow> = from_json(&picked)?;
    if picked.is_empty() {
        return Ok(Vec::new());
    }
    let seqs: Vec<i64> = picked.iter().map(|picked| picked.seq).collect();
    sqlx::query(
        "UPDATE jobs SET state = 'processing', runs = runs + 1, updated_at = ?1, pgid = NULL
         WHERE seq IN (SELECT value FROM json_each(?2))",
    )
    .bind(now)
    .bind(to_json(&seqs)?)
    .execute(conn)
    .await?;
    picked
        .into_iter()
        .map(|picked| {
            let mut job = Job::try_from(picked.row)?;
            job.state = JobState::Processing;
            job.runs += 1;
            job.updated_at = now;
            Ok(job)
        })
        .collect::<Result<_, StoreError>>()
        .map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

/// A job row as [`claim_jobs`] reads it, with its `seq`.
#[derive(serde::Deserialize)]
struct PickedRow {
    seq: i64,
    #[serde(flatten)]
    row: JobRow,
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
        let (enqueued, applied, claimed) = self
            .transaction(batch.durable, async |conn| {
                let enqueued = enqueue_all(conn, &batch.enqueues, now, policy).await?;
                record_starts(conn, &batch.starts).await?;
                let applied = apply_updates(conn, &batch.updates, now).await?;
                let claimed = claim_jobs(conn, batch.claim_limit(), now).await?;
                Ok((enqueued, applied, claimed))
            })
            .await?;
        Ok(WriteOutcome {
            enqueued,
            applied,
            claimed: super::deal_claims(&batch.claims, claimed),
        })
    }

    fn lease(&self) -> Option<Duration> {
        None
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
