//! The PostgreSQL store, for several servers sharing one queue.
//!
//! Servers agree on time by asking the database (`queuectl_now()`): a caller's `now` is only used to turn its
//! absolute times into delays. Claims take rows with `FOR UPDATE SKIP LOCKED` and hold them by a lease the owner
//! renews; enqueues and setting changes are announced with NOTIFY, so idle servers wake at once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection;
use sqlx::postgres::{
    PgConnectOptions, PgConnection, PgDatabaseError, PgListener, PgPool, PgPoolOptions, PgSeverity,
};
use tokio::sync::mpsc;

use super::batch::{self, Dependents, Found, Insert, Settle, StartAt, Statements};
use super::row::{self, JobRow, RunRow, job_columns};
use super::sql::{self, offset};
use super::{
    CancelRequest, Cluster, InFlight, JobEvents, ListFilter, OutputPage, Page, RunRecord,
    RunStarted, ServerRecord, Signal, StateCounts, Store, StoreError, WriteBatch, WriteOutcome,
};
use crate::job::{self, Job, JobState, Micros, Policy};
use crate::output::{Chunk, OutputWrite};

const JOBS_CHANNEL: &str = "queuectl_jobs";
const CONFIG_CHANNEL: &str = "queuectl_config";
const WORKERS_CHANNEL: &str = "queuectl_workers";
const RESET_CHANNEL: &str = "queuectl_reset";
const CANCEL_CHANNEL: &str = "queuectl_cancel";
const EVENTS_CHANNEL: &str = "queuectl_events";
/// The longest NOTIFY payload PostgreSQL takes is just under 8000 bytes.
const MAX_NOTIFY_PAYLOAD: usize = 7900;

/// How long connecting to the database, or waiting for a free connection, may take before it is an error.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// How long a request's statements may go unanswered before it fails as unavailable: a database that does not
/// answer (a partition, a stopped host) must not hold every request until TCP gives up. Bulk work (a reset, the
/// re-keying of every waiting job) gets longer.
const ANSWER_LIMIT: Duration = Duration::from_secs(5);
const BULK_LIMIT: Duration = Duration::from_secs(120);

macro_rules! key_plans {
    () => {
        "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off;
         SET LOCAL jit = off; SET LOCAL plan_cache_mode = force_generic_plan"
    };
}

/// How a transaction begins: its settings go with the `BEGIN`, in one round trip.
mod begin {
    pub const DURABLE: &str = "BEGIN";
    /// Losing such a commit to a crash of the database host only reruns a job (or a step of a purge): it does not
    /// wait for the flush of the write-ahead log.
    pub const NOT_DURABLE: &str = "BEGIN; SET LOCAL synchronous_commit = off";
    /// A write batch, planned by key (see [`super::KEY_PLANS`]).
    pub const BATCH: &str = concat!("BEGIN; ", key_plans!());
    pub const BATCH_NOT_DURABLE: &str = concat!(
        "BEGIN; ",
        key_plans!(),
        "; SET LOCAL synchronous_commit = off"
    );
}

/// The planner settings of a write batch. Its statements read rows by key, and the claim reads the head of
/// `jobs_ready` in queue order; but PostgreSQL's statistics of a queue table are wrong as soon as a burst arrives
/// (the share of pending jobs changes by the second), and with them it chose to read every due job and sort them
/// on each claim. Without scans of whole tables, bitmaps or sorts to choose (a sort the query itself needs, of
/// the rows it returns, still runs), the plans left read by key (tests/store.rs checks them on a table PostgreSQL
/// has never analysed, and once analysed). A disabled step the plan cannot do without (that sort) counts as a huge
/// cost, which would have PostgreSQL compile the statement (JIT, 0.3 s): a batch's statements are never worth it.
/// And each statement keeps the plan it was prepared with: the generic plan, checked by the same test, which
/// PostgreSQL would otherwise drop for one made at every execution (0.08 ms of binding) wherever the length of an
/// array it must guess makes the generic plan look dearer.
pub const KEY_PLANS: &str = key_plans!();

async fn within<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(format!(
            "the database did not answer within {}s",
            limit.as_secs()
        )))
    })
}

pub struct PgStore {
    pool: PgPool,
    /// Write batches, which the writer sends one after the other.
    batches: Reserved,
    /// Job events for the other servers, which one task sends one batch after the other.
    events: Reserved,
    lease: Duration,
    signals: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Signal>>>,
}

impl PgStore {
    /// Connects, brings the schema up to date and starts listening for other servers' announcements.
    pub async fn open(url: &str, lease: Duration) -> Result<Self, StoreError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::Unavailable(
                "the database URL must start with postgres:// or postgresql://".into(),
            ));
        }
        let options: PgConnectOptions = url
            .parse()
            .map_err(|error| StoreError::Unavailable(format!("bad database URL: {error}")))?;
        // One connection first, so that a refused port, a wrong password or a TLS failure is reported at once as
        // what it is, instead of as a pool that timed out after retrying it.
        let first = tokio::time::timeout(CONNECT_LIMIT, PgConnection::connect_with(&options))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "the database did not answer within {}s",
                    CONNECT_LIMIT.as_secs()
                ))
            })?
            .map_err(classify)?;
        first.close().await.map_err(classify)?;
        // Six, the listener's among them, and the two reserved connections beside them: eight per server in all, as
        // when the pool held every one.
        let pool = PgPoolOptions::new()
            .max_connections(6)
            .acquire_timeout(CONNECT_LIMIT)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await
            .map_err(classify)?;
        refuse_foreign_tables(&pool).await?;
        sqlx::migrate!("service/store/migrations/postgres")
            .run(&pool)
            .await
            .map_err(|error| {
                let cause = match error {
                    sqlx::migrate::MigrateError::Execute(error) => classify(error).to_string(),
                    other => other.to_string(),
                };
                StoreError::Internal(format!("migrating the database: {cause}"))
            })?;
        let mut listener = PgListener::connect_with(&pool).await.map_err(classify)?;
        listener
            .listen_all([
                JOBS_CHANNEL,
                CONFIG_CHANNEL,
                WORKERS_CHANNEL,
                RESET_CHANNEL,
                CANCEL_CHANNEL,
                EVENTS_CHANNEL,
            ])
            .await
            .map_err(classify)?;
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(forward_notifications(listener, sender));
        Ok(PgStore {
            pool,
            batches: Reserved::new("write batches", &options),
            events: Reserved::new("job events", &options),
            lease,
            signals: std::sync::Mutex::new(Some(receiver)),
        })
    }

    /// Runs `work` in a transaction begun with `begin` on a connection of the pool (see [`retried`]).
    async fn transaction<T>(
        &self,
        begin: &'static str,
        limit: Duration,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error> + Clone,
    ) -> Result<T, StoreError> {
        within(limit, async {
            let mut conn = self.pool.acquire().await.map_err(classify)?;
            retried(&mut conn, begin, work)
                .await
                .map_err(|failure| classify(failure.into_error()))
        })
        .await
    }

    fn lease_micros(&self) -> i64 {
        i64::try_from(self.lease.as_micros()).unwrap_or(i64::MAX)
    }
}

/// A connection kept for one kind of work that is done one at a time, instead of one from the pool, which pings
/// each connection before it hands it out and again when it comes back: two round trips to the database each time,
/// beside the work's own.
struct Reserved {
    /// `None` after a failure closed the connection, until the next work opens another.
    slot: tokio::sync::Mutex<Option<PgConnection>>,
    options: PgConnectOptions,
    /// What the connection is for, for the log.
    purpose: &'static str,
}

impl Reserved {
    fn new(purpose: &'static str, options: &PgConnectOptions) -> Reserved {
        Reserved {
            slot: tokio::sync::Mutex::new(None),
            options: options.clone(),
            purpose,
        }
    }

    /// Runs `work` on the connection, within [`ANSWER_LIMIT`].
    async fn run<T>(
        &self,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, Failure> + Clone,
    ) -> Result<T, StoreError> {
        within(ANSWER_LIMIT, async {
            let mut slot = self.slot.lock().await;
            // Out of its slot while it works, and back only if the work succeeded: after a failure (a lost
            // connection, work dropped halfway by the time limit, a BEGIN that failed halfway and left a transaction
            // open that sqlx does not know of) the next work connects afresh.
            let (mut conn, mut waited) = match slot.take() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            let result = loop {
                match work.clone()(&mut conn).await {
                    // The database may have closed a connection that waited (a restart, an idle limit); nothing of
                    // the work took effect, so it goes on a fresh one.
                    Err(Failure::NothingDone(error)) if waited && !survives(&error) => {
                        tracing::debug!(%error, purpose = self.purpose, "a reserved connection was lost; connecting again");
                        conn = self.connect().await?;
                        waited = false;
                    }
                    result => break result.map_err(Failure::into_error),
                }
            };
            if result.is_ok() {
                *slot = Some(conn);
            }
            result.map_err(classify)
        })
        .await
    }

    async fn connect(&self) -> Result<PgConnection, StoreError> {
        PgConnection::connect_with(&self.options)
            .await
            .map_err(classify)
    }
}

/// How work on a connection failed.
enum Failure {
    /// Before any of it took effect (a transaction's BEGIN), or where doing it again does no harm.
    NothingDone(sqlx::Error),
    /// Later: a transaction may have been committed for all the caller knows.
    MaybeDone(sqlx::Error),
}

impl Failure {
    fn into_error(self) -> sqlx::Error {
        match self {
            Failure::NothingDone(error) | Failure::MaybeDone(error) => error,
        }
    }
}

/// Runs `work` in a transaction begun with `begin` on `conn`, and again, whole, in a new one, when PostgreSQL
/// aborted it to break a deadlock or a conflict with a concurrent transaction (their other party goes on meanwhile),
/// up to [`ATTEMPTS`] times in all.
async fn retried<T>(
    conn: &mut PgConnection,
    begin: &'static str,
    work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error> + Clone,
) -> Result<T, Failure> {
    let mut attempt = 1;
    loop {
        let mut tx = conn.begin_with(begin).await.map_err(Failure::NothingDone)?;
        let result = async {
            let value = work.clone()(&mut tx).await?;
            tx.commit().await?;
            Ok(value)
        }
        .await;
        match result {
            Err(error) if attempt < ATTEMPTS && aborted_for_another(&error) => {
                tracing::debug!(%error, attempt, "a transaction was aborted for another; again");
                attempt += 1;
            }
            result => return result.map_err(Failure::MaybeDone),
        }
    }
}

/// Whether a connection may still be open after `error`: a statement's error ends its transaction only, but a fatal
/// one (the backend was terminated, say) ends the connection, and so does any error that is not the database's (a
/// broken socket, a protocol fault).
fn survives(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|error| error.try_downcast_ref::<PgDatabaseError>())
        .is_some_and(|error| !matches!(error.severity(), PgSeverity::Fatal | PgSeverity::Panic))
}

/// Turns notifications into signals. A lost connection is re-established by the listener; meanwhile the
/// scheduler's slow poll covers what was missed.
async fn forward_notifications(mut listener: PgListener, signals: mpsc::UnboundedSender<Signal>) {
    loop {
        let notification = match listener.recv().await {
            Ok(notification) => notification,
            Err(error) => {
                tracing::warn!(%error, "lost the database notification channel; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let signal = match notification.channel() {
            JOBS_CHANNEL => Signal::Jobs,
            CONFIG_CHANNEL => Signal::Config,
            RESET_CHANNEL => Signal::Reset,
            WORKERS_CHANNEL => match notification.payload().parse() {
                Ok(count) => Signal::Workers(count),
                Err(_) => continue,
            },
            CANCEL_CHANNEL => match serde_json::from_str(notification.payload()) {
                Ok(cancel) => Signal::Cancel(cancel),
                Err(_) => continue,
            },
            EVENTS_CHANNEL => match serde_json::from_str(notification.payload()) {
                Ok(events) => Signal::Events(events),
                Err(error) => {
                    tracing::warn!(%error, "ignoring job events another server sent in a form this one cannot read");
                    continue;
                }
            },
            _ => continue,
        };
        if signals.send(signal).is_err() {
            return;
        }
    }
}

/// Refuses a database that holds tables queuectl did not make: migrating it would fail halfway (a table of the
/// same name) or mix queuectl's tables into someone else's schema.
async fn refuse_foreign_tables(pool: &PgPool) -> Result<(), StoreError> {
    let (ours, tables): (bool, Option<String>) = sqlx::query_as(
        "SELECT to_regclass('_sqlx_migrations') IS NOT NULL,
                (SELECT string_agg(tablename, ', ' ORDER BY tablename) FROM pg_tables
                 WHERE schemaname = current_schema())",
    )
    .fetch_one(pool)
    .await
    .map_err(classify)?;
    match tables {
        Some(tables) if !ours => Err(StoreError::Broken(format!(
            "the database already holds tables queuectl did not create ({tables}); give queuectl a database of \
             its own (createdb queuectl) and point --database-url at it"
        ))),
        _ => Ok(()),
    }
}

/// How many times a transaction that PostgreSQL aborted for another one is tried, in all.
const ATTEMPTS: u32 = 3;

/// Whether PostgreSQL aborted the transaction so that another could go on: a deadlock between them (40P01), or a
/// conflict a serializable transaction reports (40001). Tried again, it usually goes through.
fn aborted_for_another(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    matches!(db.code().as_deref(), Some("40P01" | "40001"))
}

/// Maps a driver error to what it means for a client, by SQLSTATE class. Only the database's message is kept: the
/// rest of the driver's text (the line of PostgreSQL's source that raised it) means nothing to a user.
fn classify(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.as_ref() {
                "53100" => StoreError::Full(db.message().to_owned()),
                "3D000" => StoreError::Unavailable(format!(
                    "{}: create it (createdb) or fix the database URL",
                    db.message()
                )),
                // connection exceptions, insufficient resources, operator intervention, read-only transactions
                c if c.starts_with("08")
                    || c.starts_with("53")
                    || c.starts_with("57")
                    || c == "25006" =>
                {
                    StoreError::Unavailable(db.message().to_owned())
                }
                _ => StoreError::Internal(format!("{} (SQLSTATE {code})", db.message())),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => StoreError::Unavailable(error.to_string()),
        _ => StoreError::Internal(error.to_string()),
    }
}

/// Wakes every server listening on `channel` once the transaction commits.
async fn announce(conn: &mut PgConnection, channel: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(channel)
        .execute(conn)
        .await?;
    Ok(())
}

/// The statements of a batch on one connection. PostgreSQL's clock is the database's (`queuectl_now()`), which
/// every server sharing it agrees on.
struct PgStatements<'c> {
    conn: &'c mut PgConnection,
    /// The server writing: the owner of the jobs it claims, for `lease` microseconds.
    owner: &'c str,
    lease: i64,
}

#[async_trait]
impl Statements for PgStatements<'_> {
    type Error = sqlx::Error;

    async fn reserve_numbers(&mut self, count: usize) -> Result<Vec<i64>, sqlx::Error> {
        if count == 0 {
            return Ok(Vec::new());
        }
        sqlx::query_scalar("SELECT nextval('job_number') FROM generate_series(1, $1)")
            .bind(i64::try_from(count).unwrap_or(i64::MAX))
            .fetch_all(&mut *self.conn)
            .await
    }

    async fn insert_jobs(&mut self, jobs: &[Insert<'_>]) -> Result<Vec<Job>, sqlx::Error> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        const SQL: &str = concat!(
            "INSERT INTO jobs (id, command, state, priority, max_retries, timeout_secs, queue_key, created_at,
                               updated_at, run_after, after_ids, cwd, env)
             SELECT r.id, r.command, 'pending', r.priority, r.max_retries, r.timeout_secs, t.now + r.queue_offset,
                    t.now, t.now, t.now + r.ready_in, r.after_ids, r.cwd, r.env
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
                         $7::bigint[], $8::text[], $9::text[], $10::text[])
                      AS r (id, command, priority, max_retries, timeout_secs, queue_offset, ready_in, after_ids,
                            cwd, env),
                  (SELECT queuectl_now() AS now) AS t
             ON CONFLICT (id) DO NOTHING
             RETURNING ",
            job_columns!()
        );
        let rows: Vec<JobRow> = sqlx::query_as(SQL)
            .bind(jobs.iter().map(|job| job.id.as_str()).collect::<Vec<_>>())
            .bind(jobs.iter().map(|job| job.command).collect::<Vec<_>>())
            .bind(
                jobs.iter()
                    .map(|job| i64::from(job.priority))
                    .collect::<Vec<_>>(),
            )
            .bind(
                jobs.iter()
                    .map(|job| i64::from(job.max_retries))
                    .collect::<Vec<_>>(),
            )
            .bind(jobs.iter().map(|job| job.timeout_secs).collect::<Vec<_>>())
            .bind(jobs.iter().map(|job| job.queue_offset).collect::<Vec<_>>())
            .bind(jobs.iter().map(|job| job.ready_in).collect::<Vec<_>>())
            .bind(
                jobs.iter()
                    .map(|job| job.after_ids.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(jobs.iter().map(|job| job.cwd).collect::<Vec<_>>())
            .bind(
                jobs.iter()
                    .map(|job| job.env.as_deref())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *self.conn)
            .await?;
        row::jobs(rows).map_err(|error| sqlx::Error::Decode(Box::new(error)))
    }

    async fn delete_jobs(&mut self, ids: &[&str]) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM jobs WHERE id = ANY($1)")
            .bind(ids)
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    async fn find_jobs(&mut self, ids: &[&str]) -> Result<Vec<Found>, sqlx::Error> {
        // FOR SHARE: a dependency that completes meanwhile on another server waits for this commit (and then
        // releases the new job), or this lookup waits for its commit and sees it completed. In the order of their
        // keys, as the batch's other locks of jobs (see CANCEL_DEPENDENTS).
        let rows: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT id, seq, state FROM jobs WHERE id = ANY($1) ORDER BY seq FOR SHARE",
        )
        .bind(ids)
        .fetch_all(&mut *self.conn)
        .await?;
        rows.into_iter().map(row::found).collect()
    }

    async fn add_dependencies(
        &mut self,
        edges: &[(i64, i64)],
        held: &[i64],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO job_dependencies (job_seq, after_seq)
             SELECT * FROM UNNEST($1::bigint[], $2::bigint[])
             ON CONFLICT DO NOTHING",
        )
        .bind(edges.iter().map(|(job, _)| *job).collect::<Vec<_>>())
        .bind(edges.iter().map(|(_, after)| *after).collect::<Vec<_>>())
        .execute(&mut *self.conn)
        .await?;
        sqlx::query("UPDATE jobs SET run_after = $2, queue_key = $2 WHERE seq = ANY($1)")
            .bind(held)
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
        if !completed.is_empty() {
            let held: Vec<i64> = sqlx::query_scalar(LOCK_DEPENDENTS)
                .bind(completed)
                .bind(job::HELD)
                .fetch_all(&mut *self.conn)
                .await?;
            if !held.is_empty() {
                dependents.released = sqlx::query(RELEASE_DEPENDENTS)
                    .bind(&held)
                    .bind(aging_micros)
                    .bind(job::HELD)
                    .execute(&mut *self.conn)
                    .await?
                    .rows_affected();
            }
        }
        if !failed.is_empty() {
            dependents.cancelled = sqlx::query_as(CANCEL_DEPENDENTS)
                .bind(failed)
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
        if !starts.is_empty() {
            record_starts(self.conn, starts).await?;
        }
        let applied = if updates.is_empty() {
            Vec::new()
        } else {
            apply_updates(self.conn, updates).await?
        };
        let claimed = if claim == 0 {
            Vec::new()
        } else {
            let claim = Claiming {
                limit: claim,
                owner: self.owner,
                lease: self.lease,
                last_ready,
                starts: claimed_starts,
            };
            claim_jobs(self.conn, &claim).await?
        };
        Ok((applied, claimed))
    }

    async fn write_output(&mut self, writes: &[&OutputWrite]) -> Result<(), sqlx::Error> {
        let chunks: Vec<(i64, i64, &Chunk)> = writes
            .iter()
            .flat_map(|write| {
                write
                    .chunks
                    .iter()
                    .map(|chunk| (write.seq, i64::from(write.run), chunk))
            })
            .collect();
        if !chunks.is_empty() {
            sqlx::query(
                "INSERT INTO job_output (job_seq, run, start, data, streams)
                 SELECT c.seq, c.run, c.start, c.data, c.streams
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[], $5::text[])
                          AS c (seq, run, start, data, streams)
                 JOIN job_runs r ON r.job_seq = c.seq AND r.run = c.run
                 ON CONFLICT DO NOTHING",
            )
            .bind(chunks.iter().map(|(seq, _, _)| *seq).collect::<Vec<_>>())
            .bind(chunks.iter().map(|(_, run, _)| *run).collect::<Vec<_>>())
            .bind(
                chunks
                    .iter()
                    .map(|(_, _, chunk)| offset(chunk.start))
                    .collect::<Vec<_>>(),
            )
            .bind(
                chunks
                    .iter()
                    .map(|(_, _, chunk)| chunk.data.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(
                chunks
                    .iter()
                    .map(|(_, _, chunk)| chunk.layout())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *self.conn)
            .await?;
        }
        for write in writes {
            if let Some(forget) = &write.forget {
                sqlx::query(sql::FORGET_OUTPUT)
                    .bind(write.seq)
                    .bind(i64::from(write.run))
                    .bind(offset(forget.start))
                    .bind(offset(forget.end))
                    .execute(&mut *self.conn)
                    .await?;
            }
        }
        Ok(())
    }

    async fn announce_jobs(&mut self) -> Result<(), sqlx::Error> {
        announce(self.conn, JOBS_CHANNEL).await
    }
}

/// One array to bind: `value` of each of `items`, in order (a statement takes a batch as a column per field).
fn array<'i, I, T>(items: &'i [I], value: impl Fn(&'i I) -> T) -> Vec<T> {
    items.iter().map(value).collect()
}

async fn record_starts(conn: &mut PgConnection, starts: &[&RunStarted]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH started AS (
             UPDATE jobs SET pgid = s.pgid
             FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[])
                  AS s (seq, run, worker, pgid, id)
             WHERE jobs.seq = s.seq AND jobs.id = s.id AND jobs.state = 'processing' AND jobs.runs = s.run
             RETURNING jobs.seq, s.run, s.worker)
         INSERT INTO job_runs (job_seq, run, worker, started_at)
         SELECT seq, run, worker, queuectl_now() FROM started
         ON CONFLICT (job_seq, run) DO NOTHING",
    )
    .bind(array(starts, |start| start.seq))
    .bind(array(starts, |start| i64::from(start.run)))
    .bind(array(starts, |start| i64::from(start.worker)))
    .bind(array(starts, |start| start.pgid))
    .bind(array(starts, |start| start.job_id.as_str()))
    .execute(conn)
    .await?;
    Ok(())
}

/// Settles jobs: applies each update whose guard matches and records the end of the runs they end, returning
/// the positions of those that applied. The updates come as arrays `$1`..`$14`, one element per update;
/// `$rows` turns them into the rows `u`.
macro_rules! settle_jobs {
    ($rows:literal) => {
        concat!(
            "WITH settled AS (
                 UPDATE jobs SET state = u.state, attempts = u.attempts, run_after = queuectl_now() + u.ready_in,
                                 queue_key = queuectl_now() + u.queue_offset, last_error = u.last_error,
                                 interruptions = u.interruptions, updated_at = queuectl_now(), pgid = NULL,
                                 owner = NULL, lease_expires_at = NULL
                 FROM ",
            $rows,
            " AS u (position, seq, expect_state, expect_runs, state, attempts, ready_in, queue_offset,
                      last_error, interruptions, worker, outcome, truncated, id)
                 WHERE jobs.seq = u.seq AND jobs.id = u.id AND jobs.state = u.expect_state
                   AND jobs.runs = u.expect_runs
                 RETURNING u.position, jobs.seq, jobs.runs, u.worker, u.outcome, u.truncated),
             ended AS (
                 INSERT INTO job_runs (job_seq, run, worker, started_at, finished_at, outcome, truncated)
                 SELECT seq, runs, worker, queuectl_now(), queuectl_now(), outcome, truncated
                 FROM settled WHERE outcome IS NOT NULL
                 ON CONFLICT (job_seq, run) DO UPDATE SET
                     finished_at = excluded.finished_at, outcome = excluded.outcome, truncated = excluded.truncated)
             SELECT position FROM settled"
        )
    };
}

/// Settles any number of jobs, a row per element of the arrays.
pub const SETTLE_JOBS: &str = settle_jobs!(
    "UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::bigint[], $7::bigint[],
            $8::bigint[], $9::text[], $10::bigint[], $11::bigint[], $12::text[], $13::boolean[], $14::text[])"
);

/// Settles one job, the first element of each array. A plan made without the values sees one row here, where it
/// must guess the length of an array: the plan PostgreSQL keeps (see [`KEY_PLANS`]) is the one for one row, which
/// ran in 0.14 ms in a drain's statement log where [`SETTLE_JOBS`]' took 0.18.
pub const SETTLE_ONE_JOB: &str = settle_jobs!(
    "(VALUES (($1::bigint[])[1], ($2::bigint[])[1], ($3::text[])[1], ($4::bigint[])[1], ($5::text[])[1],
             ($6::bigint[])[1], ($7::bigint[])[1], ($8::bigint[])[1], ($9::text[])[1], ($10::bigint[])[1],
             ($11::bigint[])[1], ($12::text[])[1], ($13::boolean[])[1], ($14::text[])[1]))"
);

/// Applies each update whose guard matches, and records the end of the runs they end. Returns which applied.
async fn apply_updates(
    conn: &mut PgConnection,
    updates: &[Settle<'_>],
) -> Result<Vec<bool>, sqlx::Error> {
    // One update is the common case (a worker's job): its own text, whose plan is made for one row.
    let statement = if updates.len() == 1 {
        SETTLE_ONE_JOB
    } else {
        SETTLE_JOBS
    };
    let positions: Vec<i64> = sqlx::query_scalar(statement)
        .bind((0..updates.len() as i64).collect::<Vec<_>>())
        .bind(array(updates, |u| u.update.seq))
        .bind(array(updates, |u| u.update.expect_state.as_str()))
        .bind(array(updates, |u| i64::from(u.update.expect_runs)))
        .bind(array(updates, |u| u.update.settled.state.as_str()))
        .bind(array(updates, |u| i64::from(u.update.settled.attempts)))
        .bind(array(updates, |u| u.ready_in))
        .bind(array(updates, |u| u.queue_offset))
        .bind(array(updates, |u| u.update.settled.last_error.as_deref()))
        .bind(array(updates, |u| {
            i64::from(u.update.settled.interruptions)
        }))
        .bind(array(updates, |u| {
            u.update.ended.as_ref().map(|ended| i64::from(ended.worker))
        }))
        .bind(array(updates, |u| {
            u.update.ended.as_ref().map(|ended| ended.outcome.as_str())
        }))
        .bind(array(updates, |u| {
            u.update.ended.as_ref().is_some_and(|ended| ended.truncated)
        }))
        .bind(array(updates, |u| u.update.job_id.as_str()))
        .fetch_all(conn)
        .await?;
    let mut applied = vec![false; updates.len()];
    for position in positions {
        applied[usize::try_from(position).unwrap_or_default()] = true;
    }
    Ok(applied)
}

/// Claims up to `$1` ready jobs, best first, for owner `$2` with a lease of `$3` µs; `$4` is the queue key past
/// which no job is ready, as an offset from now (see job::last_ready_key). The jobs at positions `$5` among them
/// (best first) start at once in the shells of workers `$6`, process groups `$7`, that wait for them: their runs
/// are recorded, started at the claim, in the same statement (one write of the row, not two).
///
/// Its plan is part of the contract (tests/store.rs checks it, generic and custom, on a table PostgreSQL has never
/// analysed and once analysed): a walk of `jobs_ready` in queue order that stops at the first ready jobs, then
/// each claimed row by its key. `(SELECT queuectl_now())` is read before the walk, so the bound on `queue_key`
/// ends it where no job can be ready yet (jobs due within the lowest priority's aging window are read and
/// skipped; later ones never are); `jobs_waiting` leaves out held jobs, so this cannot read it (a planner that
/// believed the table small read every waiting job through it and sorted them, on every claim); and the claimed
/// rows are an array, not a join whose size a generic plan would guess (it guessed a tenth of the table and read
/// all of it). UPDATE ... RETURNING promises no order: the claimed jobs are sorted
/// again, best first, as they are dealt.
pub const CLAIM_JOBS: &str = concat!(
    "WITH picked AS (
         SELECT seq, queue_key FROM jobs
         WHERE state IN ('pending', 'failed') AND run_after <= (SELECT queuectl_now())
           AND queue_key <= (SELECT queuectl_now()) + $4
         ORDER BY queue_key, seq LIMIT $1
         FOR UPDATE SKIP LOCKED),
     shells AS (
         SELECT ranked.seq, shell.worker, shell.pgid
         FROM (SELECT seq, row_number() OVER (ORDER BY queue_key, seq) - 1 AS position FROM picked) AS ranked
         JOIN UNNEST($5::bigint[], $6::bigint[], $7::bigint[]) AS shell (position, worker, pgid)
           ON shell.position = ranked.position),
     claimed AS (
         UPDATE jobs SET state = 'processing', runs = runs + 1, updated_at = queuectl_now(),
                         pgid = (SELECT pgid FROM shells WHERE shells.seq = jobs.seq),
                         owner = $2, lease_expires_at = queuectl_now() + $3
         WHERE jobs.seq = ANY (ARRAY (SELECT seq FROM picked))
         RETURNING jobs.*),
     started AS (
         INSERT INTO job_runs (job_seq, run, worker, started_at)
         SELECT claimed.seq, claimed.runs, shells.worker, claimed.updated_at
         FROM claimed JOIN shells ON shells.seq = claimed.seq
         ON CONFLICT (job_seq, run) DO NOTHING)
     SELECT ",
    job_columns!(),
    " FROM claimed ORDER BY queue_key, seq"
);

/// Locks the held jobs (`run_after` = `$2`, job::HELD) that run after jobs `$1`, which completed, in the order of
/// their keys, and returns their keys. Whether such a job can run is decided after, by [`RELEASE_DEPENDENTS`]: two
/// servers that complete its last two dependencies at once would each see the other's still running, in a
/// statement that began before the other committed; the second to lock the job waits for the first to commit, and
/// its next statement sees both completed. The jobs are found from the dependencies of `$1`, never among every
/// pending or held job: the guards on `state` and `run_after` are written so that no index matches them (`|| ''`,
/// `+ 0`), which leaves the planner that one way (tests/store.rs checks the plan).
pub const LOCK_DEPENDENTS: &str = "SELECT seq FROM jobs
     WHERE state || '' = 'pending' AND run_after + 0 = $2
       AND seq = ANY (ARRAY (SELECT job_seq FROM job_dependencies WHERE after_seq = ANY ($1)))
     ORDER BY seq FOR UPDATE";

/// Releases the held jobs `$1` (locked by [`LOCK_DEPENDENTS`]) once every job they run after has completed; `$2` is
/// the aging interval in µs, `$3` job::HELD.
pub const RELEASE_DEPENDENTS: &str =
    "UPDATE jobs SET run_after = queuectl_now(), queue_key = queuectl_now() + (priority - 1) * $2,
                     updated_at = queuectl_now()
     WHERE seq = ANY ($1) AND state || '' = 'pending' AND run_after + 0 = $3
       AND NOT EXISTS (SELECT 1 FROM job_dependencies d JOIN jobs j ON j.seq = d.after_seq
                       WHERE d.job_seq = jobs.seq AND j.state <> 'completed')";

/// Cancels the held jobs that ran after jobs `$1`, which ended dead or cancelled, and those that ran after them,
/// saying why (held: `run_after` = `$2`, job::HELD); they are found as in [`LOCK_DEPENDENTS`], and locked in the
/// order of their keys first, as every statement of a batch locks jobs it does not own (`LOCK_DEPENDENTS`, the
/// dependencies an enqueue names): two servers that lock the same jobs then never wait for each other in a circle.
pub const CANCEL_DEPENDENTS: &str =
    "WITH RECURSIVE doomed (seq, cause) AS (
         SELECT d.job_seq, 'cancelled: it runs after ' || j.id ||
                CASE j.state WHEN 'dead' THEN ', which ended dead' ELSE ', which was cancelled' END
         FROM job_dependencies d JOIN jobs j ON j.seq = d.after_seq
         WHERE d.after_seq = ANY ($1)
         UNION
         SELECT d.job_seq, 'cancelled: it runs after ' || j.id || ', which was cancelled'
         FROM doomed JOIN job_dependencies d ON d.after_seq = doomed.seq
                     JOIN jobs j ON j.seq = doomed.seq),
     locked AS (
         SELECT seq FROM jobs
         WHERE seq = ANY (ARRAY (SELECT seq FROM doomed)) AND state || '' = 'pending' AND run_after + 0 = $2
         ORDER BY seq FOR UPDATE)
     UPDATE jobs SET state = 'cancelled', last_error = doomed.cause, run_after = queuectl_now(),
                     queue_key = queuectl_now(), updated_at = queuectl_now()
     FROM doomed WHERE jobs.seq = doomed.seq AND jobs.seq = ANY (ARRAY (SELECT seq FROM locked))
       AND jobs.state || '' = 'pending' AND jobs.run_after + 0 = $2
     RETURNING jobs.id, jobs.last_error";

/// How long until the first job that waits for a time is due. job::HELD is written out: PostgreSQL reads
/// `jobs_waiting` only for a query that says what its predicate says (migration 0006).
const NEXT_DUE: &str = "SELECT MIN(run_after) - queuectl_now() FROM jobs
                        WHERE state IN ('pending', 'failed') AND run_after < 4611686018427387904";

/// The arguments of [`CLAIM_JOBS`].
struct Claiming<'a> {
    limit: u32,
    owner: &'a str,
    lease: i64,
    last_ready: i64,
    starts: &'a [StartAt],
}

async fn claim_jobs(
    conn: &mut PgConnection,
    claim: &Claiming<'_>,
) -> Result<Vec<Job>, sqlx::Error> {
    let starts = claim.starts;
    let rows: Vec<JobRow> = sqlx::query_as(CLAIM_JOBS)
        .bind(i64::from(claim.limit))
        .bind(claim.owner)
        .bind(claim.lease)
        .bind(claim.last_ready)
        .bind(array(starts, |at| at.position as i64))
        .bind(array(starts, |at| i64::from(at.start.worker)))
        .bind(array(starts, |at| at.start.pgid))
        .fetch_all(conn)
        .await?;
    row::jobs(rows).map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

#[async_trait]
impl Store for PgStore {
    async fn write(
        &self,
        batch: Arc<WriteBatch>,
        now: Micros,
        policy: Policy,
    ) -> Result<WriteOutcome, StoreError> {
        let lease = self.lease_micros();
        let begin = if batch.durable {
            begin::BATCH
        } else {
            begin::BATCH_NOT_DURABLE
        };
        self.batches
            .run(async |conn| {
                retried(conn, begin, async |conn| {
                    let mut statements = PgStatements {
                        conn,
                        owner: &batch.owner,
                        lease,
                    };
                    batch::apply(&mut statements, &batch, now, policy).await
                })
                .await
            })
            .await
    }

    async fn next_due(&self, _now: Micros) -> Result<Option<Duration>, StoreError> {
        within(ANSWER_LIMIT, async {
            let wait: Option<i64> = sqlx::query_scalar(NEXT_DUE)
                .fetch_one(&self.pool)
                .await
                .map_err(classify)?;
            Ok(wait.map(|wait| super::due_in(wait, 0)))
        })
        .await
    }

    async fn in_flight(&self, owner: &str) -> Result<Vec<InFlight>, StoreError> {
        within(ANSWER_LIMIT, async {
            const SQL: &str = concat!(
                "SELECT ",
                job_columns!(),
                ", pgid FROM jobs WHERE state = 'processing' AND owner = $1"
            );
            let rows = sqlx::query(SQL)
                .bind(owner)
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
            row::in_flight(&rows, classify)
        })
        .await
    }

    fn cluster(&self) -> Option<&dyn Cluster> {
        Some(self)
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        within(ANSWER_LIMIT, async {
            let row: Option<JobRow> = sqlx::query_as(sql::GET_JOB)
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?;
            row.map(Job::try_from).transpose()
        })
        .await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Page, StoreError> {
        within(ANSWER_LIMIT, async {
            let listing = sql::listing(filter, &sql::WAITING);
            let mut query = sqlx::query(listing.statement)
                .bind(listing.after.key)
                .bind(listing.after.seq)
                .bind(i64::from(filter.limit) + 1);
            if let Some(state) = listing.state {
                query = query.bind(state);
            }
            let rows = query.fetch_all(&self.pool).await.map_err(classify)?;
            row::page(&rows, filter.limit, classify)
        })
        .await
    }

    async fn counts(&self) -> Result<StateCounts, StoreError> {
        within(ANSWER_LIMIT, async {
            let rows: Vec<(String, i64)> =
                sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(classify)?;
            row::counts(rows)
        })
        .await
    }

    async fn newest_time(&self) -> Result<Option<Micros>, StoreError> {
        within(ANSWER_LIMIT, async {
            sqlx::query_scalar(sql::NEWEST_TIME)
                .fetch_one(&self.pool)
                .await
                .map_err(classify)
        })
        .await
    }

    async fn oldest_pending(&self) -> Result<Option<Micros>, StoreError> {
        within(ANSWER_LIMIT, async {
            sqlx::query_scalar(sql::OLDEST_PENDING)
                .fetch_one(&self.pool)
                .await
                .map_err(classify)
        })
        .await
    }

    async fn output(
        &self,
        id: &str,
        run: u32,
        from: u64,
        budget: usize,
    ) -> Result<OutputPage, StoreError> {
        within(ANSWER_LIMIT, async {
            // A chunk forgotten between the two reads is missing from the page: a gap, as it is from then on.
            let sizes: Vec<(i64, i64)> = sqlx::query_as(sql::OUTPUT_SIZES)
                .bind(id)
                .bind(i64::from(run))
                .bind(offset(from))
                .fetch_all(&self.pool)
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
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
            Ok(row::output_page(rows, more))
        })
        .await
    }

    async fn runs(&self, id: &str) -> Result<Vec<RunRecord>, StoreError> {
        within(ANSWER_LIMIT, async {
            let rows: Vec<RunRow> = sqlx::query_as(sql::RUNS_OF_JOB)
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
            rows.into_iter().map(RunRecord::try_from).collect()
        })
        .await
    }

    async fn load_config(&self) -> Result<Vec<(String, String)>, StoreError> {
        within(ANSWER_LIMIT, async {
            sqlx::query_as(sql::LOAD_CONFIG)
                .fetch_all(&self.pool)
                .await
                .map_err(classify)
        })
        .await
    }

    async fn save_config(
        &self,
        key: &str,
        value: &str,
        rekey: Option<Policy>,
    ) -> Result<(), StoreError> {
        self.transaction(begin::DURABLE, BULK_LIMIT, async |conn| {
            sqlx::query(sql::SAVE_CONFIG)
                .bind(key)
                .bind(value)
                .execute(&mut *conn)
                .await?;
            if let Some(policy) = rekey {
                sqlx::query(sql::REKEY_WAITING)
                    .bind(job::secs_to_micros(policy.aging_interval_secs))
                    .execute(&mut *conn)
                    .await?;
            }
            announce(conn, CONFIG_CHANNEL).await?;
            Ok(())
        })
        .await
    }

    async fn delete_final(&self, ids: &[&str]) -> Result<Vec<String>, StoreError> {
        self.transaction(begin::DURABLE, ANSWER_LIMIT, async |conn| {
            sqlx::query_scalar(
                "DELETE FROM jobs WHERE id = ANY($1) AND state IN ('completed', 'dead', 'cancelled')
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
        self.transaction(begin::NOT_DURABLE, ANSWER_LIMIT, async |conn| {
            let before: i64 = sqlx::query_scalar("SELECT queuectl_now() - $1")
                .bind(older_than)
                .fetch_one(&mut *conn)
                .await?;
            Ok(sqlx::query(sql::PURGE_FINAL)
                .bind(state.as_str())
                .bind(before)
                .bind(i64::from(limit))
                .execute(conn)
                .await?
                .rows_affected())
        })
        .await
    }

    async fn reset(&self) -> Result<u64, StoreError> {
        self.transaction(begin::DURABLE, BULK_LIMIT, async |conn| {
            let deleted = sqlx::query(sql::DELETE_ALL_JOBS)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            sqlx::query(sql::DELETE_ALL_CONFIG)
                .execute(&mut *conn)
                .await?;
            sqlx::query("ALTER SEQUENCE job_number RESTART WITH 1")
                .execute(&mut *conn)
                .await?;
            announce(conn, CONFIG_CHANNEL).await?;
            Ok(deleted)
        })
        .await
    }
}

#[async_trait]
impl Cluster for PgStore {
    fn lease(&self) -> Duration {
        self.lease
    }

    async fn heartbeat(&self, server: &ServerRecord) -> Result<Vec<InFlight>, StoreError> {
        within(ANSWER_LIMIT, async {
            const EXPIRED: &str = concat!(
                "SELECT ",
                job_columns!(),
                ", pgid FROM jobs
                 WHERE state = 'processing' AND lease_expires_at < queuectl_now()"
            );
            let workers = serde_json::to_string(&server.workers)
                .map_err(|error| StoreError::Internal(error.to_string()))?;
            let lease = self.lease_micros();
            let running: Vec<&str> = server
                .workers
                .iter()
                .filter_map(|worker| worker.job_id.as_deref())
                .collect();
            self.transaction(begin::NOT_DURABLE, ANSWER_LIMIT, async |conn| {
                sqlx::query(
                    "INSERT INTO servers (id, host, pid, worker_count, workers, seen_at)
                     VALUES ($1, $2, $3, $4, $5, queuectl_now())
                     ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid,
                         worker_count = excluded.worker_count, workers = excluded.workers, seen_at = excluded.seen_at",
                )
                .bind(&server.id)
                .bind(&server.host)
                .bind(i64::from(server.pid))
                .bind(i64::from(server.worker_count))
                .bind(&workers)
                .execute(&mut *conn)
                .await?;
                // Only the jobs its workers run: a claim whose reply never arrived runs nowhere, and must expire.
                sqlx::query(
                    "UPDATE jobs SET lease_expires_at = queuectl_now() + $2
                     WHERE state = 'processing' AND owner = $1 AND id = ANY($3)",
                )
                .bind(&server.id)
                .bind(lease)
                .bind(running)
                .execute(conn)
                .await?;
                Ok(())
            })
            .await?;
            let rows = sqlx::query(EXPIRED)
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
            row::in_flight(&rows, classify)
        })
        .await
    }

    async fn servers(&self) -> Result<Vec<ServerRecord>, StoreError> {
        within(ANSWER_LIMIT, async {
            let rows: Vec<(String, String, i64, i64, String, i64)> = sqlx::query_as(
                "SELECT id, host, pid, worker_count, workers, seen_at FROM servers
                 WHERE seen_at > queuectl_now() - $1 ORDER BY host, id",
            )
            .bind(self.lease_micros())
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
            rows.into_iter()
                .map(|(id, host, pid, worker_count, workers, seen_at)| {
                    Ok(ServerRecord {
                        id,
                        host,
                        pid: u32::try_from(pid).unwrap_or_default(),
                        worker_count: u32::try_from(worker_count).unwrap_or_default(),
                        workers: serde_json::from_str(&workers)
                            .map_err(|error| StoreError::Internal(error.to_string()))?,
                        seen_at,
                    })
                })
                .collect()
        })
        .await
    }

    async fn broadcast_workers(&self, count: u32) -> Result<(), StoreError> {
        within(ANSWER_LIMIT, async {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(WORKERS_CHANNEL)
                .bind(count.to_string())
                .execute(&self.pool)
                .await
                .map_err(classify)?;
            Ok(())
        })
        .await
    }

    async fn broadcast_reset(&self) -> Result<(), StoreError> {
        within(ANSWER_LIMIT, async {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(RESET_CHANNEL)
                .execute(&self.pool)
                .await
                .map_err(classify)?;
            Ok(())
        })
        .await
    }

    async fn broadcast_cancel(&self, cancel: &CancelRequest) -> Result<(), StoreError> {
        let payload = serde_json::to_string(cancel)
            .map_err(|error| StoreError::Internal(format!("encoding a cancel: {error}")))?;
        within(ANSWER_LIMIT, async {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CANCEL_CHANNEL)
                .bind(payload)
                .execute(&self.pool)
                .await
                .map_err(classify)?;
            Ok(())
        })
        .await
    }

    async fn broadcast_events(&self, events: &JobEvents) -> Result<(), StoreError> {
        let payloads = notify_payloads(events)?;
        self.events
            .run(async |conn| {
                sqlx::query("SELECT pg_notify($1, payload) FROM UNNEST($2::text[]) AS payload")
                    .bind(EVENTS_CHANNEL)
                    .bind(&payloads)
                    .execute(conn)
                    .await
                    .map(drop)
                    // Notified twice at worst, where the connection broke after the database read the statement.
                    .map_err(Failure::NothingDone)
            })
            .await
    }

    fn signals(&self) -> Option<mpsc::UnboundedReceiver<Signal>> {
        self.signals.lock().expect("signals lock").take()
    }
}

/// `events` as JSON payloads that each fit a NOTIFY. An event too large for one on its own is left out.
fn notify_payloads(events: &JobEvents) -> Result<Vec<String>, StoreError> {
    let encoding =
        |error: serde_json::Error| StoreError::Internal(format!("encoding events: {error}"));
    let head = format!(
        r#"{{"server":{},"events":["#,
        serde_json::to_string(&events.server).map_err(encoding)?
    );
    let mut payloads = Vec::new();
    let mut payload = head.clone();
    for event in &events.events {
        let encoded = serde_json::to_string(event).map_err(encoding)?;
        if head.len() + encoded.len() + 2 > MAX_NOTIFY_PAYLOAD {
            tracing::warn!(
                bytes = encoded.len(),
                "a job event is too large to pass on to the other servers"
            );
            continue;
        }
        if payload.len() > head.len() && payload.len() + 1 + encoded.len() + 2 > MAX_NOTIFY_PAYLOAD
        {
            payload.push_str("]}");
            payloads.push(std::mem::replace(&mut payload, head.clone()));
        }
        if payload.len() > head.len() {
            payload.push(',');
        }
        payload.push_str(&encoded);
    }
    if payload.len() > head.len() {
        payload.push_str("]}");
        payloads.push(payload);
    }
    Ok(payloads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    #[test]
    fn the_held_time_written_out_in_sql_is_job_held() {
        let held = job::HELD.to_string();
        let migration = include_str!("migrations/postgres/0006_waiting_not_held.sql");
        let predicate = format!("AND run_after < {held};");
        assert!(migration.contains(&predicate), "{predicate}: {migration}");
        assert!(
            NEXT_DUE.contains(&format!("run_after < {held}")),
            "{NEXT_DUE}"
        );
    }

    #[test]
    fn job_events_are_split_into_payloads_that_fit_a_notify_and_read_back_whole() {
        let events = JobEvents {
            server: "host:1".into(),
            events: (0..500)
                .map(|n| Event::JobCancelled {
                    job_id: format!("job{n}").into(),
                    error: "cancelled by someone".into(),
                })
                .collect(),
        };
        let payloads = notify_payloads(&events).unwrap();
        assert!(payloads.len() > 1);
        let mut read = Vec::new();
        for payload in payloads {
            assert!(payload.len() <= MAX_NOTIFY_PAYLOAD, "{}", payload.len());
            let part: JobEvents = serde_json::from_str(&payload).unwrap();
            assert_eq!(part.server, "host:1");
            read.extend(part.events);
        }
        assert_eq!(read, events.events);
    }

    #[test]
    fn an_event_that_just_fits_goes_alone_and_no_payload_is_empty() {
        let event = |error_bytes: usize| Event::JobCancelled {
            job_id: "job1".into(),
            error: "x".repeat(error_bytes),
        };
        let overhead =
            serde_json::to_string(&event(0)).unwrap().len() + r#"{"server":"h","events":[]}"#.len();
        for error_bytes in MAX_NOTIFY_PAYLOAD - overhead - 3..=MAX_NOTIFY_PAYLOAD - overhead + 1 {
            let fits = usize::from(error_bytes <= MAX_NOTIFY_PAYLOAD - overhead);
            for (before, expected) in [(vec![], fits), (vec![event(1)], 1 + fits)] {
                let mut events = JobEvents {
                    server: "h".into(),
                    events: before,
                };
                events.events.push(event(error_bytes));
                let payloads = notify_payloads(&events).unwrap();
                assert_eq!(payloads.len(), expected, "{error_bytes}");
                for payload in &payloads {
                    assert!(payload.len() <= MAX_NOTIFY_PAYLOAD, "{}", payload.len());
                    let part: JobEvents = serde_json::from_str(payload).unwrap();
                    assert!(!part.events.is_empty(), "{error_bytes}: {payload:.80}");
                }
            }
        }
    }
}
