//! The store conformance suite: what every `Store` backend must do. Each check is written once against
//! `&dyn Store` and runs as two tests, `<check>::sqlite` and `<check>::postgres`, each on a new, empty store of its
//! own: a SQLite file in a temporary directory, or a PostgreSQL database created for the test from
//! QUEUECTL_TEST_DATABASE_URL (`.ci/run` sets it). Without that variable the PostgreSQL tests say they skip, and
//! fail under CI=true. The `Cluster` capability has checks of its own, on PostgreSQL only.
//!
//! PostgreSQL takes time from the database's clock, so the shared checks use the real clock and, where time must
//! pass, wait for it by polling with a deadline; the checks that move time by hours run on SQLite, which takes the
//! time it is given.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use queuectl::clock;
use queuectl::job::{self, JobState, MICROS_PER_SEC, Micros, NewJob, Outcome, Policy, Settled};
use queuectl::output::{Chunk, OutputWrite, Span, Stream};
use queuectl::store::postgres::PgStore;
use queuectl::store::sqlite::SqliteStore;
use queuectl::store::{
    CancelRequest, Claim, ClaimStart, EnqueueRejected, GuardedUpdate, ListFilter, RunEnded,
    RunStarted, ServerRecord, Signal, Store, WorkerRecord, WriteBatch, WriteOutcome,
};
use sqlx::{Connection, Row};

const OWNER: &str = "test-server";

const POLICY: Policy = Policy {
    backoff_base: 2,
    aging_interval_secs: 60,
    max_interruptions: 3,
};

/// Generous: a deadline only matters when something is broken.
const DEADLINE: Duration = Duration::from_secs(30);

/// Which database a check runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A check's store, on a database that lives only for that check.
struct Ctx {
    store: Arc<dyn Store>,
    backend: Backend,
    /// Where the database is; dropped after `store` (fields drop in order), which deletes it.
    place: Place,
}

enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(TestDatabase),
}

impl Ctx {
    async fn sqlite() -> Ctx {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("jobs.db"))
            .await
            .unwrap();
        Ctx {
            store: Arc::new(store),
            backend: Backend::Sqlite,
            place: Place::Sqlite(dir),
        }
    }

    /// A store on a new PostgreSQL database, or `None` (said on stderr) when QUEUECTL_TEST_DATABASE_URL is not
    /// set; under CI that fails the test instead.
    async fn postgres(test: &str) -> Option<Ctx> {
        let database = TestDatabase::create(test)?;
        let store = PgStore::open(&database.url, Duration::from_secs(30))
            .await
            .unwrap();
        Some(Ctx {
            store: Arc::new(store),
            backend: Backend::Postgres,
            place: Place::Postgres(database),
        })
    }

    /// The SQLite database file.
    fn sqlite_path(&self) -> PathBuf {
        match &self.place {
            Place::Sqlite(dir) => dir.path().join("jobs.db"),
            Place::Postgres(_) => panic!("not a SQLite store"),
        }
    }

    /// Another PostgreSQL store on the same database, as another server would open it, with its own lease.
    async fn postgres_store(&self, lease: Duration) -> PgStore {
        match &self.place {
            Place::Postgres(database) => PgStore::open(&database.url, lease).await.unwrap(),
            Place::Sqlite(_) => panic!("not a PostgreSQL store"),
        }
    }

    /// Another store on the same database, as a restarted server would open it.
    async fn reopen(&self) -> Arc<dyn Store> {
        match self.backend {
            Backend::Sqlite => Arc::new(SqliteStore::open(&self.sqlite_path()).await.unwrap()),
            Backend::Postgres => Arc::new(self.postgres_store(Duration::from_secs(30)).await),
        }
    }
}

/// A PostgreSQL database of its own for one test, dropped at the end (also when the test fails).
struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    fn create(test: &str) -> Option<TestDatabase> {
        let Ok(admin_url) = std::env::var("QUEUECTL_TEST_DATABASE_URL") else {
            common::skip(&format!(
                "{test}: set QUEUECTL_TEST_DATABASE_URL to run the PostgreSQL tests"
            ));
            return None;
        };
        let name = format!(
            "queuectl_store_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                % 1_000_000_000_000
        );
        admin(&admin_url, format!("CREATE DATABASE {name}")).unwrap();
        let (base, _) = admin_url
            .rsplit_once('/')
            .expect("a URL ending in /database");
        let url = format!("{base}/{name}");
        Some(TestDatabase {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = admin(
            &self.admin_url,
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Runs `statement` on the admin database, on a thread and runtime of its own (so that it also works from a
/// `Drop` inside a test's runtime).
fn admin(url: &str, statement: String) -> Result<(), String> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut conn = sqlx::PgConnection::connect(&url)
                .await
                .map_err(|error| error.to_string())?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(&mut conn)
                .await
                .map_err(|error| error.to_string())?;
            Ok(())
        })
    })
    .join()
    .unwrap()
}

/// One test per backend for each check: `<check>::sqlite` and `<check>::postgres`.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            #[tokio::test]
            async fn sqlite() {
                super::$check(super::Ctx::sqlite().await).await;
            }

            #[tokio::test]
            async fn postgres() {
                let test = concat!(stringify!($check), "::postgres");
                if let Some(ctx) = super::Ctx::postgres(test).await {
                    super::$check(ctx).await;
                }
            }
        }
    )*};
}

/// Checks of the `Cluster` capability, which only PostgreSQL has: `<check>::postgres`.
macro_rules! cluster_conformance {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            #[tokio::test]
            async fn postgres() {
                let test = concat!(stringify!($check), "::postgres");
                if let Some(ctx) = super::Ctx::postgres(test).await {
                    super::$check(ctx).await;
                }
            }
        }
    )*};
}

/// Polls `probe` until it yields a value, failing the test with `what` after [`DEADLINE`]. Time only ever passes
/// here: what the test then asserts is decided by the values, never by how long it slept.
async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn new_job(id: &str, priority: u8) -> NewJob {
    NewJob {
        id: Some(id.to_owned()),
        command: format!("echo {id}"),
        priority,
        max_retries: 3,
        timeout_secs: None,
        delay: 0,
        after: Vec::new(),
        context: Default::default(),
    }
}

/// Enqueues each request of `requests` in one batch at `now`.
async fn enqueue_at(store: &dyn Store, requests: Vec<Vec<NewJob>>, now: Micros) -> WriteOutcome {
    let batch = WriteBatch {
        enqueues: requests,
        durable: true,
        ..WriteBatch::default()
    };
    store.write(Arc::new(batch), now, POLICY).await.unwrap()
}

/// Output written at once, all stdout, as one chunk; `None` when there is none.
fn written(job: &job::Job, bytes: &[u8]) -> Option<OutputWrite> {
    (!bytes.is_empty()).then(|| OutputWrite {
        seq: job.seq,
        run: job.runs,
        chunks: vec![chunk(0, &[(Stream::Stdout, bytes)])],
        forget: None,
    })
}

/// A chunk from `start` of these pieces, in order.
fn chunk(start: u64, pieces: &[(Stream, &[u8])]) -> Chunk {
    let mut chunk = Chunk {
        start,
        ..Chunk::default()
    };
    for (stream, bytes) in pieces {
        chunk.data.extend_from_slice(bytes);
        chunk.spans.push(Span(*stream, bytes.len() as u32));
    }
    chunk
}

/// Everything stored of run `run` of job `id`, read page by page, as `(start, bytes)` of each chunk.
async fn stored_chunks(store: &dyn Store, id: &str, run: u32, budget: usize) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    loop {
        let from = chunks.last().map_or(0, Chunk::end);
        let page = store.output(id, run, from, budget).await.unwrap();
        chunks.extend(page.chunks);
        if !page.more {
            return chunks;
        }
    }
}

/// The bytes stored of run `run` of job `id`, in order.
async fn output_of(store: &dyn Store, id: &str, run: u32) -> Vec<u8> {
    stored_chunks(store, id, run, 1 << 20)
        .await
        .into_iter()
        .flat_map(|chunk| chunk.data)
        .collect()
}

fn finish(job: &job::Job, outcome: Outcome, now: Micros) -> GuardedUpdate {
    GuardedUpdate {
        job_id: job.id.clone(),
        seq: job.seq,
        expect_state: JobState::Processing,
        expect_runs: job.runs,
        settled: job::settle(job, &outcome, POLICY, now),
        ended: Some(RunEnded {
            worker: 0,
            outcome: outcome.to_string(),
            output: written(job, b"out"),
            truncated: false,
        }),
    }
}

/// The start of `job`'s current run, now, on worker 0, in a shell whose process group is unknown.
fn started(job: &job::Job) -> RunStarted {
    RunStarted {
        job_id: job.id.clone(),
        seq: job.seq,
        run: job.runs,
        worker: 0,
        pgid: None,
        started_at: clock::now(),
    }
}

/// Claims up to `limit` ready jobs at `now` for `owner`, in a batch of its own.
async fn claim(
    store: &dyn Store,
    limit: u32,
    now: Micros,
    owner: &str,
) -> Result<Vec<job::Job>, queuectl::store::StoreError> {
    let batch = WriteBatch {
        claims: vec![Claim::up_to(limit)],
        owner: owner.to_owned(),
        ..WriteBatch::default()
    };
    let mut outcome = store.write(Arc::new(batch), now, POLICY).await?;
    Ok(outcome.claimed.pop().unwrap_or_default())
}

/// The jobs `OWNER` has processing, by id, with the process groups on record.
async fn process_groups(store: &dyn Store) -> Vec<(String, Option<i64>)> {
    let mut found: Vec<(String, Option<i64>)> = store
        .in_flight(OWNER)
        .await
        .unwrap()
        .into_iter()
        .map(|running| (running.job.id, running.pgid))
        .collect();
    found.sort();
    found
}

async fn update(store: &dyn Store, update: GuardedUpdate, now: Micros) -> bool {
    let batch = WriteBatch {
        updates: vec![update],
        ..WriteBatch::default()
    };
    let outcome = store.write(Arc::new(batch), now, POLICY).await.unwrap();
    assert_eq!(outcome.applied.len(), 1);
    outcome.applied[0]
}

/// A run that was recovered and claimed again cannot settle the job: its report is rejected and changes nothing.
async fn a_stale_report_is_rejected(t: Ctx) {
    let store = t.store.as_ref();
    enqueue_at(store, vec![vec![new_job("a", 5)]], clock::now()).await;
    let first = claim(store, 1, clock::now(), OWNER)
        .await
        .unwrap()
        .pop()
        .expect("claimed");
    assert_eq!((first.state, first.runs), (JobState::Processing, 1));

    // The server died during run 1; recovery returned the job to the queue and run 2 started.
    let recovered = GuardedUpdate {
        ended: None,
        ..finish(&first, Outcome::Interrupted, clock::now())
    };
    assert!(update(store, recovered, clock::now()).await);
    let second = claim(store, 1, clock::now(), OWNER)
        .await
        .unwrap()
        .pop()
        .expect("claimed again");
    assert_eq!(second.runs, 2);
    let before = store.get("a").await.unwrap().unwrap();

    // Run 1's worker now reports success: stale, since the job is on run 2.
    let now = clock::now();
    assert!(!update(store, finish(&first, Outcome::Succeeded, now), now).await);
    assert_eq!(store.get("a").await.unwrap().unwrap(), before);
    assert!(
        store.runs("a").await.unwrap().is_empty(),
        "the stale run's record is not written either"
    );

    // A report about a state the job is not in is rejected too.
    let wrong_state = GuardedUpdate {
        expect_state: JobState::Failed,
        ..finish(&second, Outcome::Succeeded, now)
    };
    assert!(!update(store, wrong_state, now).await);
    assert_eq!(store.get("a").await.unwrap().unwrap(), before);

    // The current run's report applies.
    assert!(update(store, finish(&second, Outcome::Succeeded, now), now).await);
    let done = store.get("a").await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Completed);
    let runs = store.runs("a").await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].run, runs[0].outcome.as_deref()), (2, Some("ok")));
}

/// One batch can enqueue, record starts, settle runs and claim: claims come last, so they see what the batch
/// enqueued; two reports of the same run in one batch apply once; generated ids follow request order.
async fn one_batch_does_everything_in_order(t: Ctx) {
    let store = t.store.as_ref();
    let generated = |priority| NewJob {
        id: None,
        ..new_job("unused", priority)
    };
    let batch = WriteBatch {
        enqueues: vec![vec![generated(5), generated(5)], vec![generated(5)]],
        claims: vec![Claim::up_to(1)],
        owner: OWNER.to_owned(),
        durable: true,
        ..WriteBatch::default()
    };
    let outcome = store
        .write(Arc::new(batch), clock::now(), POLICY)
        .await
        .unwrap();
    let ids: Vec<Vec<String>> = outcome
        .enqueued
        .iter()
        .map(|request| {
            request
                .as_ref()
                .unwrap()
                .iter()
                .map(|job| job.id.clone())
                .collect()
        })
        .collect();
    assert_eq!(ids, [vec!["job1", "job2"], vec!["job3"]]);
    assert_eq!(outcome.claimed.len(), 1);
    let first = &outcome.claimed[0][0];
    assert_eq!((first.id.as_str(), first.runs), ("job1", 1));

    let now = clock::now();
    let mut report = finish(first, Outcome::Succeeded, now);
    report.ended.as_mut().unwrap().output = written(first, b"\xff\x00binary");
    let batch = WriteBatch {
        starts: vec![queuectl::store::RunStarted {
            job_id: first.id.clone(),
            seq: first.seq,
            run: 1,
            worker: 3,
            pgid: Some(4242),
            started_at: now,
        }],
        updates: vec![report.clone(), report],
        claims: [1, 1, 5].map(Claim::up_to).to_vec(),
        owner: OWNER.to_owned(),
        ..WriteBatch::default()
    };
    let outcome = store.write(Arc::new(batch), now, POLICY).await.unwrap();
    assert_eq!(
        outcome.applied,
        [true, false],
        "the second report of run 1 is stale"
    );
    let sizes: Vec<usize> = outcome.claimed.iter().map(Vec::len).collect();
    assert_eq!(
        sizes,
        [1, 1, 0],
        "each claim gets at most its limit, in order"
    );
    let mut claimed: Vec<&str> = outcome
        .claimed
        .iter()
        .flatten()
        .map(|job| job.id.as_str())
        .collect();
    claimed.sort_unstable();
    assert_eq!(claimed, ["job2", "job3"]);
    assert_eq!(
        store.get("job1").await.unwrap().unwrap().state,
        JobState::Completed
    );
    let runs = store.runs("job1").await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].worker, 3);
    assert_eq!(runs[0].outcome.as_deref(), Some("ok"));
    assert_eq!(output_of(store, "job1", 1).await, b"\xff\x00binary");
    let mut counts = store.counts().await.unwrap();
    assert_eq!(counts[JobState::Processing as usize], 2);
    counts[JobState::Processing as usize] = 0;
    counts[JobState::Completed as usize] -= 1;
    assert_eq!(counts, [0; 6]);
}

/// A duplicate id refuses its own request whole and leaves the other requests of the batch stored.
async fn a_duplicate_id_rolls_back_only_its_request(t: Ctx) {
    let store = t.store.as_ref();
    enqueue_at(store, vec![vec![new_job("taken", 5)]], clock::now()).await;
    let outcome = enqueue_at(
        store,
        vec![
            vec![
                new_job("first", 5),
                NewJob {
                    id: None,
                    ..new_job("unused", 5)
                },
            ],
            vec![new_job("half", 5), new_job("taken", 5)],
            vec![new_job("twice", 5), new_job("twice", 5)],
            vec![new_job("last", 5)],
        ],
        clock::now(),
    )
    .await;
    assert_eq!(outcome.enqueued.len(), 4);
    let first: Vec<&str> = outcome.enqueued[0]
        .as_ref()
        .unwrap()
        .iter()
        .map(|job| job.id.as_str())
        .collect();
    assert_eq!(first, ["first", "job1"], "no generated number is lost");
    assert_eq!(
        outcome.enqueued[1],
        Err(EnqueueRejected::DuplicateId("taken".into()))
    );
    assert_eq!(
        outcome.enqueued[2],
        Err(EnqueueRejected::DuplicateId("twice".into()))
    );
    assert!(outcome.enqueued[3].is_ok());
    for absent in ["half", "twice"] {
        assert!(store.get(absent).await.unwrap().is_none(), "{absent}");
    }
    let taken = store.get("taken").await.unwrap().unwrap();
    assert_eq!(taken.command, "echo taken");
    assert_eq!(taken.runs, 0, "the first job of that id is untouched");
    let mut counts = store.counts().await.unwrap();
    counts[JobState::Pending as usize] -= 4;
    assert_eq!(
        counts, [0; 6],
        "exactly taken, first, job1 and last are stored"
    );
}

/// Claims take the best priority first, FIFO within a priority; a failed job waits for its backoff.
async fn claims_follow_priority_and_fifo(t: Ctx) {
    let store = t.store.as_ref();
    for (id, priority) in [("low", 9), ("mid-a", 5), ("mid-b", 5), ("high", 1)] {
        enqueue_at(store, vec![vec![new_job(id, priority)]], clock::now()).await;
    }
    let mut order = Vec::new();
    while let Some(job) = claim(store, 1, clock::now(), OWNER).await.unwrap().pop() {
        order.push(job.id);
    }
    assert_eq!(order, ["high", "mid-a", "mid-b", "low"]);
    assert!(
        claim(store, 5, clock::now(), OWNER)
            .await
            .unwrap()
            .is_empty()
    );

    enqueue_at(store, vec![vec![new_job("retry", 5)]], clock::now()).await;
    let claimed = claim(store, 1, clock::now(), OWNER)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let now = clock::now();
    let failed = finish(&claimed, Outcome::Failed(job::Failure::Exit(1)), now);
    assert!(update(store, failed, now).await);
    let due = store
        .next_due(clock::now())
        .await
        .unwrap()
        .expect("a job waits");
    assert!(
        due > Duration::from_millis(1500) && due <= Duration::from_secs(2),
        "{due:?}"
    );
    assert!(
        claim(store, 1, clock::now(), OWNER)
            .await
            .unwrap()
            .is_empty(),
        "not before its backoff"
    );
}

/// Aging: a job that waited long enough overtakes newer jobs of better priority; a retry waits its turn.
#[tokio::test]
async fn aging_lets_old_jobs_overtake_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("jobs.db"))
        .await
        .unwrap();
    let store: &dyn Store = &store;
    let second = MICROS_PER_SEC;
    // At t=0: a low-priority job. At 1s and 2s: two of priority 5. At 3s: a priority-1 job.
    // At 10 minutes: a new priority-1 job, which the 9-priority job from t=0 has aged past (8 levels = 8 min).
    enqueue_at(store, vec![vec![new_job("old-low", 9)]], 0).await;
    enqueue_at(store, vec![vec![new_job("mid-a", 5)]], second).await;
    enqueue_at(store, vec![vec![new_job("mid-b", 5)]], 2 * second).await;
    enqueue_at(store, vec![vec![new_job("high", 1)]], 3 * second).await;
    enqueue_at(store, vec![vec![new_job("late-high", 1)]], 600 * second).await;

    let now = 601 * second;
    let mut order = Vec::new();
    while let Some(job) = claim(store, 1, now, OWNER).await.unwrap().pop() {
        order.push(job.id);
    }
    assert_eq!(order, ["high", "mid-a", "mid-b", "old-low", "late-high"]);

    enqueue_at(store, vec![vec![new_job("retry", 5)]], now).await;
    let claimed = claim(store, 1, now, OWNER).await.unwrap().pop().unwrap();
    let failed = finish(&claimed, Outcome::Failed(job::Failure::Exit(1)), now);
    let run_after = failed.settled.run_after;
    assert!(update(store, failed, now).await);
    assert_eq!(
        store.next_due(now).await.unwrap(),
        Some(Duration::from_micros((run_after - now) as u64))
    );
    assert!(
        claim(store, 1, run_after - 1, OWNER)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        claim(store, 1, run_after, OWNER).await.unwrap()[0].id,
        "retry"
    );
}

/// Listing pages by priority then insertion order, without gaps or repeats, with and without a state filter.
async fn listing_pages_through_every_job_once(t: Ctx) {
    let store = t.store.as_ref();
    let jobs: Vec<NewJob> = (0..25)
        .map(|n| new_job(&format!("j{n:02}"), 1 + (n % 3) as u8))
        .collect();
    enqueue_at(store, vec![jobs], clock::now()).await;
    claim(store, 4, clock::now(), OWNER).await.unwrap();

    let mut expected: Vec<(u8, String)> = (0..25)
        .map(|n| (1 + (n % 3) as u8, format!("j{n:02}")))
        .collect();
    expected.sort();
    for state in [None, Some(JobState::Pending), Some(JobState::Processing)] {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let filter = ListFilter {
                state,
                after,
                limit: 4,
            };
            let page = store.list(&filter).await.unwrap();
            assert!(page.jobs.len() <= 4);
            seen.extend(page.jobs.into_iter().map(|job| {
                assert!(state.is_none_or(|state| state == job.state));
                (job.priority, job.id)
            }));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let wanted: Vec<_> = match state {
            None => expected.clone(),
            Some(state) => {
                let mut wanted = Vec::new();
                for (priority, id) in &expected {
                    if store.get(id).await.unwrap().unwrap().state == state {
                        wanted.push((*priority, id.clone()));
                    }
                }
                wanted
            }
        };
        assert_eq!(seen, wanted, "{state:?}");
    }
}

/// Runs a job's server died under are counted and stored; the last one allowed buries the job, and a claim after
/// an abandoned run hands out the stored count.
async fn abandoned_runs_are_counted_until_the_job_is_dead(t: Ctx) {
    let store = t.store.as_ref();
    enqueue_at(store, vec![vec![new_job("pill", 1)]], clock::now()).await;
    for expected in 1..=POLICY.max_interruptions {
        let running = claim(store, 1, clock::now(), OWNER)
            .await
            .unwrap()
            .pop()
            .expect("claimed");
        assert_eq!(running.interruptions, expected - 1);
        let abandoned = GuardedUpdate {
            ended: None,
            ..finish(&running, Outcome::Abandoned, clock::now())
        };
        assert!(update(store, abandoned, clock::now()).await);
        let stored = store.get("pill").await.unwrap().unwrap();
        assert_eq!((stored.interruptions, stored.attempts), (expected, 0));
    }
    let dead = store.get("pill").await.unwrap().unwrap();
    assert_eq!(dead.state, JobState::Dead);
    assert!(
        dead.last_error.unwrap().starts_with("interrupted"),
        "last_error says why"
    );
    assert!(
        claim(store, 1, clock::now(), OWNER)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A restarted server seeds its clock with the newest stamp in the store: the last change of any job.
async fn the_newest_time_is_the_last_change_of_any_job(t: Ctx) {
    let store = t.store.clone();
    assert_eq!(store.newest_time().await.unwrap(), None, "an empty store");
    let now = clock::now();
    enqueue_at(&*store, vec![vec![new_job("a", 5), new_job("b", 5)]], now).await;
    let claimed = claim(&*store, 1, now + 1, OWNER).await.unwrap();
    assert!(
        update(
            &*store,
            finish(&claimed[0], Outcome::Succeeded, now + 2),
            now + 2
        )
        .await
    );
    let mut newest = Micros::MIN;
    for id in ["a", "b"] {
        newest = newest.max(store.get(id).await.unwrap().unwrap().updated_at);
    }
    assert_eq!(store.newest_time().await.unwrap(), Some(newest));
}

// ---- Helpers of the checks below.

/// A job the store names (`jobN`).
fn generated(priority: u8) -> NewJob {
    NewJob {
        id: None,
        ..new_job("unused", priority)
    }
}

fn ids(jobs: &[job::Job]) -> Vec<&str> {
    jobs.iter().map(|job| job.id.as_str()).collect()
}

/// The ids each request of `outcome` stored, or its refusal.
fn enqueued_ids(outcome: &WriteOutcome) -> Vec<Result<Vec<String>, EnqueueRejected>> {
    outcome
        .enqueued
        .iter()
        .map(|request| {
            request
                .as_ref()
                .map(|jobs| jobs.iter().map(|job| job.id.clone()).collect())
                .map_err(Clone::clone)
        })
        .collect()
}

/// Enqueues one job on its own under `policy` and returns it as stored.
async fn enqueue_one(store: &dyn Store, job: NewJob, policy: Policy) -> job::Job {
    let batch = WriteBatch {
        enqueues: vec![vec![job]],
        durable: true,
        ..WriteBatch::default()
    };
    let mut outcome = store
        .write(Arc::new(batch), clock::now(), policy)
        .await
        .unwrap();
    outcome.enqueued.pop().unwrap().unwrap().pop().unwrap()
}

/// Claims up to `limit` jobs now for [`OWNER`] under `policy`.
async fn claim_under(store: &dyn Store, limit: u32, policy: Policy) -> Vec<job::Job> {
    let batch = WriteBatch {
        claims: vec![Claim::up_to(limit)],
        owner: OWNER.to_owned(),
        ..WriteBatch::default()
    };
    let mut outcome = store
        .write(Arc::new(batch), clock::now(), policy)
        .await
        .unwrap();
    outcome.claimed.pop().unwrap()
}

/// Claims the one job `id` (the only ready one) now and returns it.
async fn claim_one(store: &dyn Store, id: &str) -> job::Job {
    let claimed = claim(store, 1, clock::now(), OWNER).await.unwrap();
    assert_eq!(ids(&claimed), [id]);
    claimed.into_iter().next().unwrap()
}

/// Ends `job`'s current run with `outcome` under `policy`, reporting `output`.
fn end_run(
    job: &job::Job,
    outcome: Outcome,
    policy: Policy,
    worker: u32,
    output: &[u8],
    truncated: bool,
) -> GuardedUpdate {
    let now = clock::now();
    GuardedUpdate {
        job_id: job.id.clone(),
        seq: job.seq,
        expect_state: JobState::Processing,
        expect_runs: job.runs,
        settled: job::settle(job, &outcome, policy, now),
        ended: Some(RunEnded {
            worker,
            outcome: outcome.to_string(),
            output: written(job, output),
            truncated,
        }),
    }
}

fn counts_of(pairs: &[(JobState, u64)]) -> queuectl::store::StateCounts {
    let mut counts = [0; JobState::ALL.len()];
    for (state, count) in pairs {
        counts[*state as usize] = *count;
    }
    counts
}

/// No backoff: a failed job is ready again at once.
const NO_BACKOFF: Policy = Policy {
    backoff_base: 0,
    ..POLICY
};

/// Waits for `wanted` on `signals`, passing over the other signals that arrive meanwhile.
async fn wait_for_signal(
    signals: &mut tokio::sync::mpsc::UnboundedReceiver<Signal>,
    wanted: Signal,
) {
    let start = Instant::now();
    loop {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, signals.recv()).await {
            Ok(Some(signal)) if signal == wanted => return,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the signal stream ended before {wanted:?}"),
            Err(_) => panic!("no {wanted:?} within {DEADLINE:?}"),
        }
    }
}

// ---- write: enqueues.

/// Generated ids never take an id that is already there: a chosen "job1" in the same batch as a generated id is
/// the duplicate (the generated one is stored first), and a generated id steps past a chosen "job2".
async fn generated_ids_never_collide_with_chosen_ones(t: Ctx) {
    let store = t.store.as_ref();
    let outcome = enqueue_at(
        store,
        vec![vec![generated(5)], vec![new_job("job1", 5)]],
        clock::now(),
    )
    .await;
    assert_eq!(
        enqueued_ids(&outcome),
        [
            Ok(vec!["job1".to_owned()]),
            Err(EnqueueRejected::DuplicateId("job1".into()))
        ]
    );
    assert_eq!(
        store.get("job1").await.unwrap().unwrap().command,
        "echo unused",
        "job1 is the generated job"
    );

    // A person takes job2, the next generated id: the generator steps past it.
    enqueue_at(store, vec![vec![new_job("job2", 5)]], clock::now()).await;
    let outcome = enqueue_at(store, vec![vec![generated(5), generated(5)]], clock::now()).await;
    let stored = outcome.enqueued[0].as_ref().expect("stored");
    let stored_ids = ids(stored);
    assert_eq!(stored_ids.len(), 2);
    assert_ne!(stored_ids[0], stored_ids[1]);
    for id in &stored_ids {
        assert!(
            id.starts_with("job") && !["job1", "job2"].contains(id),
            "{id}"
        );
        assert_eq!(store.get(id).await.unwrap().unwrap().command, "echo unused");
    }
    assert_eq!(
        store.get("job2").await.unwrap().unwrap().command,
        "echo job2",
        "the chosen job2 is untouched"
    );
    assert_eq!(
        store.counts().await.unwrap(),
        counts_of(&[(JobState::Pending, 4)])
    );

    // A chosen id repeated inside one request refuses that request alone, even when it matches a generated one.
    let outcome = enqueue_at(
        store,
        vec![
            vec![new_job("x", 5), new_job("job1", 5)],
            vec![new_job("y", 5)],
        ],
        clock::now(),
    )
    .await;
    assert_eq!(
        enqueued_ids(&outcome),
        [
            Err(EnqueueRejected::DuplicateId("job1".into())),
            Ok(vec!["y".to_owned()])
        ]
    );
    assert!(store.get("x").await.unwrap().is_none());
}

// ---- write: starts and guarded updates.

/// A start records the run (worker, no end yet) and the job's process group; a start for a run the job is not on,
/// or for a job that does not exist, is ignored.
async fn output_is_stored_in_chunks_read_in_pages_and_its_middle_forgotten(t: Ctx) {
    let store = t.store.as_ref();
    enqueue_at(store, vec![vec![new_job("a", 1)]], clock::now()).await;
    let job = claim(store, 1, clock::now(), OWNER)
        .await
        .unwrap()
        .remove(0);
    let started = started(&job);
    let output = |chunks: Vec<Chunk>, forget: Option<std::ops::Range<u64>>, run: u32| OutputWrite {
        seq: job.seq,
        run,
        chunks,
        forget,
    };
    let first = output(
        vec![
            chunk(
                0,
                &[(Stream::Stdout, b"out1\n"), (Stream::Stderr, b"err1\n")],
            ),
            chunk(10, &[(Stream::Stdout, b"out2\n")]),
        ],
        None,
        1,
    );
    let batch = WriteBatch {
        starts: vec![started],
        outputs: vec![
            first,
            output(vec![chunk(0, &[(Stream::Stdout, b"ghost")])], None, 7),
        ],
        owner: OWNER.to_owned(),
        ..WriteBatch::default()
    };
    store
        .write(Arc::new(batch), clock::now(), POLICY)
        .await
        .unwrap();
    let pieces: Vec<(Stream, u64, Vec<u8>)> = stored_chunks(store, "a", 1, 1 << 20)
        .await
        .iter()
        .flat_map(|chunk| {
            chunk
                .pieces()
                .map(|(stream, offset, data)| (stream, offset, data.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        pieces,
        [
            (Stream::Stdout, 0, b"out1\n".to_vec()),
            (Stream::Stderr, 5, b"err1\n".to_vec()),
            (Stream::Stdout, 10, b"out2\n".to_vec()),
        ],
        "the streams stay apart, in the order written"
    );
    assert!(
        stored_chunks(store, "a", 7, 1 << 20).await.is_empty(),
        "output of a run not on record is not stored"
    );

    let tail = output(
        vec![
            chunk(15, &[(Stream::Stdout, b"out3\n")]),
            chunk(20, &[(Stream::Stderr, b"last\n")]),
        ],
        Some(10..20),
        1,
    );
    let batch = WriteBatch {
        outputs: vec![tail],
        owner: OWNER.to_owned(),
        ..WriteBatch::default()
    };
    store
        .write(Arc::new(batch), clock::now(), POLICY)
        .await
        .unwrap();
    let starts: Vec<u64> = stored_chunks(store, "a", 1, 1 << 20)
        .await
        .iter()
        .map(|chunk| chunk.start)
        .collect();
    assert_eq!(
        starts,
        [0, 20],
        "the chunks wholly inside 10..20 are forgotten"
    );

    let first_page = store.output("a", 1, 0, 4).await.unwrap();
    assert_eq!(
        first_page.chunks.len(),
        1,
        "a page holds at least one chunk"
    );
    assert!(first_page.more);
    let middle = store.output("a", 1, 7, 4).await.unwrap();
    assert_eq!(
        (middle.chunks.len(), middle.chunks[0].start, middle.more),
        (1, 0, true),
        "a page starts with the chunk that holds its offset"
    );
    let last = store.output("a", 1, 10, 4).await.unwrap();
    assert_eq!(
        (last.chunks.len(), last.chunks[0].start, last.more),
        (1, 20, false)
    );
    assert!(store.output("a", 1, 25, 4).await.unwrap().chunks.is_empty());
}

async fn starts_record_the_run_and_its_process_group(t: Ctx) {
    let store = t.store.as_ref();
    enqueue_at(
        store,
        vec![vec![new_job("a", 1), new_job("b", 2)]],
        clock::now(),
    )
    .await;
    let claimed = claim(store, 2, clock::now(), OWNER).await.unwrap();
    assert_eq!(ids(&claimed), ["a", "b"]);
    let seq_of = |id: &str| {
        claimed
            .iter()
            .find(|job| job.id == id)
            .map_or(-1, |job| job.seq)
    };
    let start = |id: &str, run, pgid| RunStarted {
        job_id: id.to_owned(),
        seq: seq_of(id),
        run,
        worker: 2,
        pgid: Some(pgid),
        started_at: clock::now(),
    };
    let batch = WriteBatch {
        starts: vec![
            start("a", 1, 777),
            start("b", 2, 888),
            start("missing", 1, 999),
        ],
        owner: OWNER.to_owned(),
        ..WriteBatch::default()
    };
    let outcome = store
        .write(Arc::new(batch), clock::now(), POLICY)
        .await
        .unwrap();
    assert!(outcome.applied.is_empty() && outcome.claimed.is_empty());

    assert_eq!(
        process_groups(store).await,
        [("a".to_owned(), Some(777)), ("b".to_owned(), None)]
    );
    let runs = store.runs("a").await.unwrap();
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!((run.run, run.worker), (1, 2));
    assert_eq!(
        (run.finished_at, run.outcome.as_deref(), run.truncated),
        (None, None, false)
    );
    assert!(output_of(store, "a", 1).await.is_empty());
    assert!(
        store.runs("b").await.unwrap().is_empty(),
        "b is on run 1, not 2"
    );
    assert!(store.get("missing").await.unwrap().is_none());
}

/// Updates of one batch apply in order: a job updated twice is checked the second time against what the first
/// update made of it, and an update whose guard no longer matches, or for a job that does not exist, is refused.
async fn guarded_updates_apply_in_order(t: Ctx) {
    let store = t.store.as_ref();
    enqueue_at(store, vec![vec![new_job("a", 5)]], clock::now()).await;
    let running = claim_one(store, "a").await;
    let now = clock::now();
    let interrupted = GuardedUpdate {
        ended: None,
        ..finish(&running, Outcome::Interrupted, now)
    };
    // A second update of the same job in the same batch, guarded on the state the first one leaves.
    let cancel = GuardedUpdate {
        job_id: "a".into(),
        seq: running.seq,
        expect_state: JobState::Pending,
        expect_runs: 1,
        settled: Settled {
            state: JobState::Dead,
            attempts: 0,
            interruptions: 0,
            run_after: now,
            queue_key: now,
            last_error: Some("cancelled".into()),
        },
        ended: None,
    };
    // Guarded on the state the job was in before the batch: stale after the first update.
    let stale = finish(&running, Outcome::Succeeded, now);
    let missing = GuardedUpdate {
        job_id: "missing".into(),
        ..finish(&running, Outcome::Succeeded, now)
    };
    let batch = WriteBatch {
        updates: vec![interrupted, cancel, stale, missing],
        ..WriteBatch::default()
    };
    let outcome = store.write(Arc::new(batch), now, POLICY).await.unwrap();
    assert_eq!(outcome.applied, [true, true, false, false]);
    let job = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.runs, job.last_error.as_deref()),
        (JobState::Dead, 1, Some("cancelled"))
    );
    assert!(
        store.runs("a").await.unwrap().is_empty(),
        "no applied update ended a run"
    );
    assert!(store.get("missing").await.unwrap().is_none());
}

// ---- write: claims.

/// Claims come after everything else in the batch (they take a job the batch enqueued or returned to the queue),
/// and the jobs claimed are dealt best first to the batch's claims, in order, each up to its limit.
async fn claims_come_last_and_are_dealt_in_order(t: Ctx) {
    let store = t.store.as_ref();
    enqueue_at(store, vec![vec![new_job("x", 5)]], clock::now()).await;
    let x = claim_one(store, "x").await;
    for (id, priority) in [("p1", 1), ("p2", 2), ("p3", 3), ("p4", 4)] {
        enqueue_at(store, vec![vec![new_job(id, priority)]], clock::now()).await;
    }
    let now = clock::now();
    let batch = WriteBatch {
        enqueues: vec![vec![new_job("first", 1)]],
        updates: vec![GuardedUpdate {
            ended: None,
            ..finish(&x, Outcome::Interrupted, now)
        }],
        claims: [2, 0, 4].map(Claim::up_to).to_vec(),
        owner: OWNER.to_owned(),
        ..WriteBatch::default()
    };
    let outcome = store.write(Arc::new(batch), now, POLICY).await.unwrap();
    assert_eq!(outcome.applied, [true]);
    let dealt: Vec<Vec<&str>> = outcome.claimed.iter().map(|jobs| ids(jobs)).collect();
    assert_eq!(
        dealt,
        [vec!["p1", "first"], vec![], vec!["p2", "p3", "p4", "x"]],
        "best first: priority 1 by age, then 2, 3, 4, then x (priority 5)"
    );
    for job in outcome.claimed.iter().flatten() {
        assert_eq!(job.state, JobState::Processing, "{}", job.id);
    }
    let x = store.get("x").await.unwrap().unwrap();
    assert_eq!((x.state, x.runs), (JobState::Processing, 2));
    assert_eq!(
        store.counts().await.unwrap(),
        counts_of(&[(JobState::Processing, 6)])
    );
}

/// A claim of limit 0 takes nothing, alone or beside other claims.
async fn a_claim_of_zero_takes_nothing(t: Ctx) {
    let store = t.store.as_ref();
    enqueue_at(
        store,
        vec![vec![new_job("a", 5), new_job("b", 5)]],
        clock::now(),
    )
    .await;
    let batch = WriteBatch {
        claims: vec![Claim::up_to(0)],
        owner: OWNER.to_owned(),
        ..WriteBatch::default()
    };
    let outcome = store
        .write(Arc::new(batch), clock::now(), POLICY)
        .await
        .unwrap();
    assert_eq!(outcome.claimed.len(), 1);
    assert!(outcome.claimed[0].is_empty());
    assert_eq!(
        store.counts().await.unwrap(),
        counts_of(&[(JobState::Pending, 2)])
    );

    let batch = WriteBatch {
        claims: [0, 1, 0].map(Claim::up_to).to_vec(),
        owner: OWNER.to_owned(),
        ..WriteBatch::default()
    };
    let outcome = store
        .write(Arc::new(batch), clock::now(), POLICY)
        .await
        .unwrap();
    let dealt: Vec<Vec<&str>> = outcome.claimed.iter().map(|jobs| ids(jobs)).collect();
    assert_eq!(dealt, [vec![], vec!["a"], vec![]]);
    assert_eq!(
        store.counts().await.unwrap(),
        counts_of(&[(JobState::Pending, 1), (JobState::Processing, 1)])
    );
}

// ---- Reads.

/// next_due: nothing when no job waits (none at all, or only running and finished ones), zero when a job is
/// ready, and the time left when the earliest waiting job is a failed one waiting for its backoff.
async fn next_due_is_the_earliest_waiting_job(t: Ctx) {
    let store = t.store.as_ref();
    assert_eq!(store.next_due(clock::now()).await.unwrap(), None);
    enqueue_at(
        store,
        vec![vec![new_job("done", 5), new_job("running", 5)]],
        clock::now(),
    )
    .await;
    let done = claim_one(store, "done").await;
    assert!(
        update(
            store,
            finish(&done, Outcome::Succeeded, clock::now()),
            clock::now()
        )
        .await
    );
    claim_one(store, "running").await;
    assert_eq!(
        store.next_due(clock::now()).await.unwrap(),
        None,
        "none waits"
    );

    enqueue_at(store, vec![vec![new_job("retry", 5)]], clock::now()).await;
    assert_eq!(
        store.next_due(clock::now()).await.unwrap(),
        Some(Duration::ZERO),
        "one is due now"
    );
    let retry = claim_one(store, "retry").await;
    let failed = finish(&retry, Outcome::Failed(job::Failure::Exit(1)), clock::now());
    assert!(update(store, failed, clock::now()).await);
    let due = store
        .next_due(clock::now())
        .await
        .unwrap()
        .expect("a job waits");
    assert!(
        due > Duration::from_millis(1000) && due <= Duration::from_secs(2),
        "a failed job is due after its 2 s backoff: {due:?}"
    );

    enqueue_at(store, vec![vec![new_job("fresh", 5)]], clock::now()).await;
    assert_eq!(
        store.next_due(clock::now()).await.unwrap(),
        Some(Duration::ZERO),
        "the earliest waiting job counts"
    );
}

/// in_flight lists the processing jobs with their process groups, for recovery. A SQLite database has one server,
/// so every processing job is its own; on PostgreSQL only the jobs `owner` claimed are.
async fn in_flight_lists_the_running_jobs(t: Ctx) {
    let store = t.store.as_ref();
    assert!(store.in_flight(OWNER).await.unwrap().is_empty());
    enqueue_at(
        store,
        vec![vec![
            new_job("mine", 1),
            new_job("other", 2),
            new_job("done", 3),
            new_job("waiting", 4),
        ]],
        clock::now(),
    )
    .await;
    let mine = claim_one(store, "mine").await;
    let other = claim(store, 1, clock::now(), "another-server")
        .await
        .unwrap();
    assert_eq!(ids(&other), ["other"]);
    let done = claim_one(store, "done").await;
    assert!(
        update(
            store,
            finish(&done, Outcome::Succeeded, clock::now()),
            clock::now()
        )
        .await
    );
    let batch = WriteBatch {
        starts: vec![RunStarted {
            job_id: "mine".into(),
            seq: mine.seq,
            run: mine.runs,
            worker: 0,
            pgid: Some(4242),
            started_at: clock::now(),
        }],
        ..WriteBatch::default()
    };
    store
        .write(Arc::new(batch), clock::now(), POLICY)
        .await
        .unwrap();

    let mut found: Vec<(String, JobState, u32, Option<i64>)> = store
        .in_flight(OWNER)
        .await
        .unwrap()
        .into_iter()
        .map(|running| {
            (
                running.job.id,
                running.job.state,
                running.job.runs,
                running.pgid,
            )
        })
        .collect();
    found.sort();
    let mut expected = vec![("mine".to_owned(), JobState::Processing, 1, Some(4242))];
    if t.backend == Backend::Sqlite {
        expected.push(("other".to_owned(), JobState::Processing, 1, None));
    }
    assert_eq!(found, expected);
}

/// A claim for a worker whose shell already waits records the claimed job's start with that shell's process group,
/// in the same commit; the other claims of the batch record none.
async fn a_claim_with_a_waiting_shell_records_the_start(t: Ctx) {
    let store = t.store.as_ref();
    enqueue_at(
        store,
        vec![vec![
            new_job("gated", 1),
            new_job("plain", 2),
            new_job("gated_too", 3),
        ]],
        clock::now(),
    )
    .await;
    let now = clock::now();
    let shell = |worker, pgid| Claim {
        limit: 1,
        start: Some(ClaimStart {
            worker,
            pgid: Some(pgid),
        }),
    };
    let batch = WriteBatch {
        claims: vec![shell(7, 4343), Claim::up_to(1), shell(9, 4545)],
        owner: OWNER.to_owned(),
        ..WriteBatch::default()
    };
    let outcome = store.write(Arc::new(batch), now, POLICY).await.unwrap();
    let claimed: Vec<Vec<&str>> = outcome
        .claimed
        .iter()
        .map(|jobs| jobs.iter().map(|job| job.id.as_str()).collect())
        .collect();
    assert_eq!(claimed, [["gated"], ["plain"], ["gated_too"]]);

    assert_eq!(
        process_groups(store).await,
        [
            ("gated".to_owned(), Some(4343)),
            ("gated_too".to_owned(), Some(4545)),
            ("plain".to_owned(), None)
        ]
    );
    for (id, worker) in [("gated", 7), ("gated_too", 9)] {
        let runs = store.runs(id).await.unwrap();
        assert_eq!(runs.len(), 1, "{id}");
        assert_eq!((runs[0].run, runs[0].worker), (1, worker), "{id}");
        assert_eq!(runs[0].finished_at, None, "{id}");
    }
    assert!(store.runs("plain").await.unwrap().is_empty());
}

/// get returns a job with every field as stored, and nothing for an unknown id.
async fn get_returns_the_job_as_stored(t: Ctx) {
    let store = t.store.as_ref();
    assert_eq!(store.get("a").await.unwrap(), None);
    let before = clock::now();
    enqueue_at(
        store,
        vec![vec![NewJob {
            id: Some("a".into()),
            command: "echo 'a b' && exit 3".into(),
            priority: 7,
            max_retries: 4,
            timeout_secs: Some(30),
            delay: 0,
            after: Vec::new(),
            context: Default::default(),
        }]],
        before,
    )
    .await;
    let job = store.get("a").await.unwrap().expect("stored");
    assert_eq!(job.id, "a");
    assert_eq!(job.command, "echo 'a b' && exit 3");
    assert_eq!(
        (job.state, job.priority, job.max_retries, job.timeout_secs),
        (JobState::Pending, 7, 4, Some(30))
    );
    assert_eq!((job.attempts, job.runs, job.interruptions), (0, 0, 0));
    assert_eq!(job.last_error, None);
    assert_eq!(job.created_at, job.updated_at);
    assert_eq!(job.created_at, job.run_after);
    // PostgreSQL stamps the database's clock, which is this machine's.
    assert!(
        (job.created_at - before).abs() < 5 * MICROS_PER_SEC,
        "created at {}, enqueued at {before}",
        job.created_at
    );
    assert_eq!(store.get("A").await.unwrap(), None, "ids are exact");
}

/// Listing's edges: an empty store, a page that ends exactly at the last job, and a state no job is in.
async fn listing_ends_where_the_jobs_end(t: Ctx) {
    let store = t.store.as_ref();
    let all = |limit| ListFilter {
        state: None,
        after: None,
        limit,
    };
    let page = store.list(&all(10)).await.unwrap();
    assert!(page.jobs.is_empty() && page.next.is_none());

    let jobs: Vec<NewJob> = ["d", "c", "b", "a"]
        .iter()
        .map(|id| new_job(id, 5))
        .collect();
    enqueue_at(store, vec![jobs], clock::now()).await;
    let page = store.list(&all(4)).await.unwrap();
    assert_eq!(ids(&page.jobs), ["d", "c", "b", "a"], "insertion order");
    assert_eq!(page.next, None, "nothing follows the last job");

    let page = store.list(&all(3)).await.unwrap();
    assert_eq!(ids(&page.jobs), ["d", "c", "b"]);
    let rest = store
        .list(&ListFilter {
            after: Some(page.next.expect("a job follows")),
            ..all(3)
        })
        .await
        .unwrap();
    assert_eq!(ids(&rest.jobs), ["a"]);
    assert_eq!(rest.next, None);

    let completed = store
        .list(&ListFilter {
            state: Some(JobState::Completed),
            ..all(10)
        })
        .await
        .unwrap();
    assert!(completed.jobs.is_empty() && completed.next.is_none());
}

/// A listing of pending jobs comes in the order claims take them (aged priority, then age), page by page.
async fn a_pending_listing_is_in_the_order_jobs_will_run(t: Ctx) {
    let store = t.store.as_ref();
    // An old low-priority job has aged past the new ones where the store takes the caller's clock (SQLite); a
    // shared database takes its own, and then it is simply the last.
    let old = clock::now() - 600 * MICROS_PER_SEC;
    enqueue_at(store, vec![vec![new_job("old", 9)]], old).await;
    let jobs: Vec<NewJob> = [("a", 5), ("b", 1), ("d", 1), ("e", 5)]
        .iter()
        .map(|(id, priority)| new_job(id, *priority))
        .collect();
    enqueue_at(store, vec![jobs], clock::now()).await;
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(&ListFilter {
                state: Some(JobState::Pending),
                after,
                limit: 2,
            })
            .await
            .unwrap();
        listed.extend(page.jobs.into_iter().map(|job| job.id));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let expected: &[&str] = match t.backend {
        Backend::Sqlite => &["old", "b", "d", "a", "e"],
        Backend::Postgres => &["b", "d", "a", "e", "old"],
    };
    assert_eq!(listed, expected);
    let claimed = claim(store, 5, clock::now(), OWNER).await.unwrap();
    assert_eq!(
        ids(&claimed),
        listed,
        "claims take them in the listed order"
    );
}

/// counts tallies the jobs in every state.
async fn counts_tally_every_state(t: Ctx) {
    let store = t.store.as_ref();
    assert_eq!(store.counts().await.unwrap(), [0; JobState::ALL.len()]);
    let no_retries = NewJob {
        max_retries: 0,
        ..new_job("dead", 1)
    };
    enqueue_at(
        store,
        vec![vec![
            no_retries,
            new_job("failed", 2),
            new_job("completed", 3),
            new_job("processing", 4),
            new_job("pending", 5),
            new_job("pending-too", 5),
        ]],
        clock::now(),
    )
    .await;
    let dead = claim_one(store, "dead").await;
    let failed = claim_one(store, "failed").await;
    let completed = claim_one(store, "completed").await;
    claim_one(store, "processing").await;
    let now = clock::now();
    let batch = WriteBatch {
        updates: vec![
            finish(&dead, Outcome::Failed(job::Failure::Exit(1)), now),
            finish(&failed, Outcome::Failed(job::Failure::Exit(1)), now),
            finish(&completed, Outcome::Succeeded, now),
        ],
        ..WriteBatch::default()
    };
    let outcome = store.write(Arc::new(batch), now, POLICY).await.unwrap();
    assert_eq!(outcome.applied, [true, true, true]);
    assert_eq!(
        store.get("dead").await.unwrap().unwrap().state,
        JobState::Dead
    );
    assert_eq!(
        store.counts().await.unwrap(),
        counts_of(&[
            (JobState::Pending, 2),
            (JobState::Processing, 1),
            (JobState::Failed, 1),
            (JobState::Completed, 1),
            (JobState::Dead, 1),
        ])
    );
}

/// oldest_pending is when the longest-waiting pending job was enqueued; jobs in other states do not count.
async fn oldest_pending_is_the_longest_waiting_job(t: Ctx) {
    let store = t.store.as_ref();
    assert_eq!(store.oldest_pending().await.unwrap(), None);
    let first = enqueue_one(store, new_job("first", 5), POLICY).await;
    let second = enqueue_one(store, new_job("second", 5), POLICY).await;
    assert!(second.created_at >= first.created_at);
    assert_eq!(
        store.oldest_pending().await.unwrap(),
        Some(first.created_at)
    );
    claim_one(store, "first").await;
    assert_eq!(
        store.oldest_pending().await.unwrap(),
        Some(second.created_at),
        "a running job does not wait"
    );
    let second = claim_one(store, "second").await;
    let failed = finish(
        &second,
        Outcome::Failed(job::Failure::Exit(1)),
        clock::now(),
    );
    assert!(update(store, failed, clock::now()).await);
    assert_eq!(
        store.oldest_pending().await.unwrap(),
        None,
        "a failed job is not pending"
    );
}

/// runs lists every attempt of a job, oldest first, with its worker, outcome, output and truncation.
async fn runs_record_every_attempt_oldest_first(t: Ctx) {
    let store = t.store.as_ref();
    assert!(store.runs("a").await.unwrap().is_empty(), "no such job");
    enqueue_one(store, new_job("a", 5), NO_BACKOFF).await;
    assert!(store.runs("a").await.unwrap().is_empty(), "not run yet");
    let run1 = claim_one(store, "a").await;
    let ended = end_run(
        &run1,
        Outcome::Failed(job::Failure::Exit(1)),
        NO_BACKOFF,
        1,
        b"first",
        false,
    );
    assert!(update(store, ended, clock::now()).await);
    let run2 = claim_one(store, "a").await;
    let ended = end_run(
        &run2,
        Outcome::Failed(job::Failure::Timeout),
        NO_BACKOFF,
        2,
        b"\x00second\xff",
        true,
    );
    assert!(update(store, ended, clock::now()).await);
    let run3 = claim_one(store, "a").await;
    let batch = WriteBatch {
        starts: vec![RunStarted {
            job_id: "a".into(),
            seq: run3.seq,
            run: 3,
            worker: 3,
            pgid: None,
            started_at: clock::now(),
        }],
        ..WriteBatch::default()
    };
    store
        .write(Arc::new(batch), clock::now(), NO_BACKOFF)
        .await
        .unwrap();
    let open = store.runs("a").await.unwrap();
    assert_eq!(open.len(), 3);
    assert_eq!((open[2].run, open[2].outcome.as_deref()), (3, None));
    assert_eq!(open[2].finished_at, None, "run 3 is still going");

    let ended = end_run(&run3, Outcome::Succeeded, NO_BACKOFF, 3, b"", false);
    assert!(update(store, ended, clock::now()).await);
    let runs = store.runs("a").await.unwrap();
    let mut outputs = Vec::new();
    for run in &runs {
        outputs.push(output_of(store, "a", run.run).await);
    }
    let summary: Vec<_> = runs
        .iter()
        .zip(&outputs)
        .map(|(run, output)| {
            (
                run.run,
                run.worker,
                run.outcome.as_deref(),
                output.as_slice(),
                run.truncated,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, 1, Some("exit:1"), &b"first"[..], false),
            (2, 2, Some("timeout"), &b"\x00second\xff"[..], true),
            (3, 3, Some("ok"), &b""[..], false),
        ]
    );
    for run in &runs {
        let finished = run.finished_at.expect("every run ended");
        assert!(finished >= run.started_at, "run {}", run.run);
    }
    assert!(runs[0].started_at <= runs[1].started_at && runs[1].started_at <= runs[2].started_at);
    let job = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.runs, job.attempts),
        (JobState::Completed, 3, 2)
    );
}

/// Settings are stored and replaced by key; saving one re-keys the waiting jobs with the policy it brings, so the
/// aging order changes at once.
async fn settings_are_stored_and_re_key_waiting_jobs(t: Ctx) {
    let store = t.store.as_ref();
    assert!(store.load_config().await.unwrap().is_empty());
    let no_aging = Policy {
        aging_interval_secs: 0,
        ..POLICY
    };

    // With 60 s aging, a priority-1 job enqueued after a priority-3 one runs first...
    enqueue_one(store, new_job("old-low", 3), POLICY).await;
    enqueue_one(store, new_job("new-high", 1), POLICY).await;
    // ...until aging is set to 0: then only age counts.
    store
        .save_config("aging_interval", "0", Some(no_aging))
        .await
        .unwrap();
    assert_eq!(
        ids(&claim_under(store, 2, no_aging).await),
        ["old-low", "new-high"]
    );

    // And back: saving 60 s makes priority count again for the jobs that wait.
    enqueue_one(store, new_job("old-low-2", 3), no_aging).await;
    enqueue_one(store, new_job("new-high-2", 1), no_aging).await;
    store
        .save_config("aging_interval", "60", Some(POLICY))
        .await
        .unwrap();
    assert_eq!(
        ids(&claim_under(store, 2, POLICY).await),
        ["new-high-2", "old-low-2"]
    );

    store.save_config("backoff_base", "3", None).await.unwrap();
    let mut config = store.load_config().await.unwrap();
    config.sort();
    assert_eq!(
        config,
        [
            ("aging_interval".to_owned(), "60".to_owned()),
            ("backoff_base".to_owned(), "3".to_owned()),
        ]
    );
}

/// reset deletes every job, run and setting, says how many jobs it deleted, and generated ids start at job1 again.
async fn reset_deletes_everything(t: Ctx) {
    let store = t.store.as_ref();
    assert_eq!(store.reset().await.unwrap(), 0, "an empty store");
    enqueue_at(
        store,
        vec![vec![generated(5), generated(5), new_job("chosen", 5)]],
        clock::now(),
    )
    .await;
    let job1 = claim_one(store, "job1").await;
    let ended = end_run(&job1, Outcome::Succeeded, POLICY, 0, b"old run", false);
    assert!(update(store, ended, clock::now()).await);
    assert_eq!(store.runs("job1").await.unwrap().len(), 1);
    store.save_config("backoff_base", "3", None).await.unwrap();

    assert_eq!(store.reset().await.unwrap(), 3);
    for id in ["job1", "job2", "chosen"] {
        assert_eq!(store.get(id).await.unwrap(), None, "{id}");
    }
    assert_eq!(store.counts().await.unwrap(), [0; JobState::ALL.len()]);
    assert!(store.load_config().await.unwrap().is_empty());
    assert_eq!(store.newest_time().await.unwrap(), None);
    assert_eq!(store.oldest_pending().await.unwrap(), None);
    assert_eq!(store.next_due(clock::now()).await.unwrap(), None);
    let page = store
        .list(&ListFilter {
            state: None,
            after: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert!(page.jobs.is_empty());

    let outcome = enqueue_at(store, vec![vec![generated(5)]], clock::now()).await;
    assert_eq!(enqueued_ids(&outcome), [Ok(vec!["job1".to_owned()])]);
    assert!(
        store.runs("job1").await.unwrap().is_empty(),
        "the old job1's runs are gone"
    );
}

/// Aging by the store's own clock: an old low-priority job overtakes a new high-priority one once it waited one
/// aging interval per level. PostgreSQL stamps the database's clock, so the test waits for a second to pass on
/// it (seen in the stamps of jobs it enqueues meanwhile) with a 1 s aging interval set through save_config.
async fn aging_lets_an_old_job_overtake_a_new_better_one(t: Ctx) {
    let store = t.store.as_ref();
    let fast = Policy {
        aging_interval_secs: 1,
        ..POLICY
    };
    store
        .save_config("aging_interval", "1", Some(fast))
        .await
        .unwrap();
    // Priority 2: one level to age, 1 s.
    let old = enqueue_one(store, new_job("old-low", 2), fast).await;
    let early = enqueue_one(store, new_job("early-high", 1), fast).await;
    let old_key = old.created_at + MICROS_PER_SEC;
    // Ticks of the lowest priority (9 s behind) show the store's clock without getting in the way.
    let mut ticks = 0;
    eventually("a second to pass on the store's clock", async || {
        ticks += 1;
        let tick = enqueue_one(store, new_job(&format!("tick{ticks}"), 10), fast).await;
        (tick.created_at > old_key).then_some(())
    })
    .await;
    let late = enqueue_one(store, new_job("late-high", 1), fast).await;
    assert!(late.created_at > old_key);

    let claimed = claim_under(store, 3, fast).await;
    // The early job came within the second (unless the machine stalled): it had not been overtaken yet.
    let expected = if early.created_at < old_key {
        ["early-high", "old-low", "late-high"]
    } else {
        ["old-low", "early-high", "late-high"]
    };
    assert_eq!(ids(&claimed), expected);
}

/// SQLite copies itself into a file that opens as a store holding the jobs; PostgreSQL has its own tools, so it
/// says it cannot and refuses.
async fn backup_copies_the_database_where_it_can(t: Ctx) {
    let store = t.store.as_ref();
    enqueue_at(
        store,
        vec![vec![new_job("a", 5), new_job("b", 3)]],
        clock::now(),
    )
    .await;
    claim_one(store, "b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backup.db");
    std::fs::File::create(&path).unwrap();
    match t.backend {
        Backend::Sqlite => {
            assert!(store.can_backup());
            let size = store.backup(&path).await.unwrap();
            assert!(size > 0);
            assert_eq!(size, std::fs::metadata(&path).unwrap().len());
            let copy = SqliteStore::open(&path).await.unwrap();
            for id in ["a", "b"] {
                assert_eq!(
                    copy.get(id).await.unwrap(),
                    store.get(id).await.unwrap(),
                    "{id}"
                );
            }
            assert_eq!(
                copy.counts().await.unwrap(),
                counts_of(&[(JobState::Pending, 1), (JobState::Processing, 1)])
            );
        }
        Backend::Postgres => {
            assert!(!store.can_backup());
            assert!(store.backup(&path).await.is_err());
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                0,
                "nothing written"
            );
        }
    }
}

/// close leaves the database whole: a store opened on it afterwards finds every job. For SQLite the log is
/// checkpointed into the database file, so that file alone, copied elsewhere, holds them.
async fn close_leaves_the_database_whole(t: Ctx) {
    let store = t.store.as_ref();
    let jobs: Vec<NewJob> = (0..50).map(|n| new_job(&format!("j{n}"), 5)).collect();
    enqueue_at(store, vec![jobs], clock::now()).await;
    store.close().await.unwrap();
    let reopened = t.reopen().await;
    assert_eq!(
        reopened.counts().await.unwrap(),
        counts_of(&[(JobState::Pending, 50)])
    );
    if t.backend == Backend::Sqlite {
        let database = t.sqlite_path();
        let wal = PathBuf::from(format!("{}-wal", database.display()));
        assert_eq!(
            std::fs::metadata(&wal).map_or(0, |metadata| metadata.len()),
            0,
            "the log is checkpointed and truncated"
        );
        let elsewhere = tempfile::tempdir().unwrap();
        let copy = elsewhere.path().join("copy.db");
        std::fs::copy(&database, &copy).unwrap();
        let copy = SqliteStore::open(&copy).await.unwrap();
        assert_eq!(
            copy.counts().await.unwrap(),
            counts_of(&[(JobState::Pending, 50)])
        );
        assert_eq!(copy.get("j49").await.unwrap().unwrap().command, "echo j49");
    }
}

/// Only PostgreSQL, which several servers share, has the cluster capability.
async fn only_a_shared_database_has_the_cluster_capability(t: Ctx) {
    match t.backend {
        Backend::Sqlite => assert!(t.store.cluster().is_none()),
        Backend::Postgres => {
            let cluster = t.store.cluster().expect("PostgreSQL is shared");
            assert_eq!(cluster.lease(), Duration::from_secs(30), "as opened");
        }
    }
}

/// Only final jobs are deleted, with their runs; the others are left as they are.
async fn delete_final_takes_only_final_jobs(t: Ctx) {
    let store = t.store.as_ref();
    enqueue_at(
        store,
        vec![vec![new_job("done", 5), new_job("waiting", 5)]],
        clock::now(),
    )
    .await;
    let done = claim_one(store, "done").await;
    assert!(
        update(
            store,
            finish(&done, Outcome::Succeeded, clock::now()),
            clock::now()
        )
        .await
    );
    let deleted = store
        .delete_final(&["done", "waiting", "ghost"])
        .await
        .unwrap();
    assert_eq!(deleted, ["done"]);
    assert!(store.get("done").await.unwrap().is_none());
    assert!(
        store.runs("done").await.unwrap().is_empty(),
        "its runs went with it"
    );
    assert_eq!(
        store.get("waiting").await.unwrap().unwrap().state,
        JobState::Pending
    );
    assert_eq!(
        store.counts().await.unwrap(),
        counts_of(&[(JobState::Pending, 1)])
    );
}

/// A purge deletes the oldest jobs of one final state, at most its limit, only those old enough, never others.
async fn purges_take_old_final_jobs_in_batches(t: Ctx) {
    let store = t.store.as_ref();
    let jobs: Vec<NewJob> = (0..5).map(|n| new_job(&format!("job{n}"), 5)).collect();
    enqueue_at(store, vec![jobs, vec![new_job("waiting", 5)]], clock::now()).await;
    let claimed = claim(store, 5, clock::now(), OWNER).await.unwrap();
    for (n, job) in claimed.iter().enumerate() {
        let outcome = if n < 3 {
            Outcome::Succeeded
        } else {
            Outcome::Cancelled("by a test".into())
        };
        assert!(update(store, finish(job, outcome, clock::now()), clock::now()).await);
    }
    let hour = 3600 * MICROS_PER_SEC;
    assert_eq!(
        store.purge(JobState::Completed, hour, 10).await.unwrap(),
        0,
        "none is an hour old"
    );
    assert_eq!(
        store.purge(JobState::Pending, 0, 10).await.unwrap(),
        0,
        "never a waiting job"
    );
    assert_eq!(store.purge(JobState::Completed, 0, 2).await.unwrap(), 2);
    assert_eq!(store.purge(JobState::Completed, 0, 2).await.unwrap(), 1);
    assert_eq!(store.purge(JobState::Completed, 0, 2).await.unwrap(), 0);
    assert_eq!(
        store.counts().await.unwrap(),
        counts_of(&[(JobState::Pending, 1), (JobState::Cancelled, 2)])
    );
    assert_eq!(store.purge(JobState::Cancelled, 0, 10).await.unwrap(), 2);
    assert_eq!(
        store.get("waiting").await.unwrap().unwrap().state,
        JobState::Pending
    );
}

/// A delayed job is stored pending, waits until its time (the scheduler's next due), and only then is claimed.
async fn a_delayed_job_is_claimed_only_when_due(t: Ctx) {
    let store = t.store.as_ref();
    let delayed = NewJob {
        delay: 700_000,
        ..new_job("later", 1)
    };
    let stored = enqueue_one(store, delayed, POLICY).await;
    assert_eq!(stored.state, JobState::Pending);
    assert_eq!(stored.run_after - stored.created_at, 700_000);
    assert_eq!(store.get("later").await.unwrap().unwrap(), stored);
    enqueue_at(store, vec![vec![new_job("now", 9)]], clock::now()).await;
    assert_eq!(
        ids(&claim(store, 2, clock::now(), OWNER).await.unwrap()),
        ["now"]
    );
    let due = store
        .next_due(clock::now())
        .await
        .unwrap()
        .expect("it waits");
    assert!(
        due > Duration::ZERO && due <= Duration::from_millis(700),
        "{due:?}"
    );
    let claimed = eventually("the delayed job to come due", async || {
        let claimed = claim(store, 1, clock::now(), OWNER).await.unwrap();
        (!claimed.is_empty()).then_some(claimed)
    })
    .await;
    assert_eq!(ids(&claimed), ["later"]);
}

/// A cancelled job is final: never claimed, counted apart, and a retry sends it back to the queue.
async fn a_cancelled_job_is_never_claimed_until_retried(t: Ctx) {
    let store = t.store.as_ref();
    let job = enqueue_one(store, new_job("doomed", 5), POLICY).await;
    let cancel =
        GuardedUpdate::unless_changed(&job, job::cancel(&job, "by a test", clock::now()).unwrap());
    assert!(update(store, cancel.clone(), clock::now()).await);
    assert!(
        !update(store, cancel, clock::now()).await,
        "a second cancel matches nothing"
    );
    assert!(
        claim(store, 1, clock::now(), OWNER)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.next_due(clock::now()).await.unwrap(), None);
    let cancelled = store.get("doomed").await.unwrap().unwrap();
    assert_eq!(cancelled.last_error.as_deref(), Some("cancelled by a test"));
    assert_eq!(
        store.counts().await.unwrap(),
        counts_of(&[(JobState::Cancelled, 1)])
    );
    let retry = GuardedUpdate::unless_changed(
        &cancelled,
        job::revive(&cancelled, POLICY, clock::now()).unwrap(),
    );
    assert!(update(store, retry, clock::now()).await);
    claim_one(store, "doomed").await;
}

fn after(id: &str, after: &[&str]) -> NewJob {
    NewJob {
        after: after.iter().map(|id| (*id).to_owned()).collect(),
        context: Default::default(),
        ..new_job(id, 5)
    }
}

/// Writes `update` alone and returns the whole outcome.
async fn settle_one(store: &dyn Store, update: GuardedUpdate) -> WriteOutcome {
    let batch = WriteBatch {
        updates: vec![update],
        ..WriteBatch::default()
    };
    let outcome = store
        .write(Arc::new(batch), clock::now(), POLICY)
        .await
        .unwrap();
    assert_eq!(outcome.applied, [true]);
    outcome
}

/// The jobs a batch cancelled as dependents, with why, sorted by id.
fn cancellations(outcome: &WriteOutcome) -> Vec<(&str, &str)> {
    let mut cancelled: Vec<(&str, &str)> = outcome
        .cancelled
        .iter()
        .map(|(id, why)| (id.as_str(), why.as_str()))
        .collect();
    cancelled.sort();
    cancelled
}

/// How many sessions of `conn`'s database wait for a lock.
async fn lock_waiters(conn: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

/// A job that runs after others waits, held, until every one of them completed, and is then released.
async fn a_job_runs_once_the_jobs_it_names_completed(t: Ctx) {
    let store = t.store.as_ref();
    let outcome = enqueue_at(
        store,
        vec![
            vec![new_job("a", 9)],
            vec![after("b", &["a"]), after("c", &["a", "b"])],
        ],
        clock::now(),
    )
    .await;
    let b = &outcome.enqueued[1].as_ref().unwrap()[0];
    assert!(b.held(), "the stored job says it waits: {b:?}");
    let stored = store.get("c").await.unwrap().unwrap();
    assert!(stored.held());
    assert_eq!(stored.after, ["a", "b"]);
    assert_eq!(
        store.next_due(clock::now()).await.unwrap(),
        Some(Duration::ZERO)
    );
    let a = claim_one(store, "a").await;
    assert_eq!(
        store.next_due(clock::now()).await.unwrap(),
        None,
        "held jobs are not due"
    );
    let done = settle_one(store, finish(&a, Outcome::Succeeded, clock::now())).await;
    assert_eq!(done.released, 1, "b is released; c still waits for b");
    let b = claim_one(store, "b").await;
    assert!(
        store.get("c").await.unwrap().unwrap().held(),
        "c waits for b"
    );
    let done = settle_one(store, finish(&b, Outcome::Succeeded, clock::now())).await;
    assert_eq!(done.released, 1);
    claim_one(store, "c").await;
}

/// A job whose dependency ends dead or cancelled is cancelled, and so are the jobs that run after it in turn.
async fn a_dependency_that_fails_cancels_its_dependents_in_turn(t: Ctx) {
    let store = t.store.as_ref();
    let doomed = NewJob {
        max_retries: 0,
        ..new_job("a", 5)
    };
    enqueue_at(
        store,
        vec![vec![
            doomed,
            after("b", &["a"]),
            after("c", &["b"]),
            new_job("free", 5),
        ]],
        clock::now(),
    )
    .await;
    let a = claim_one(store, "a").await;
    let failed = settle_one(
        store,
        finish(&a, Outcome::Failed(job::Failure::Exit(1)), clock::now()),
    )
    .await;
    assert_eq!(
        cancellations(&failed),
        [
            ("b", "cancelled: it runs after a, which ended dead"),
            ("c", "cancelled: it runs after b, which was cancelled"),
        ]
    );
    for id in ["b", "c"] {
        let job = store.get(id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Cancelled, "{id}");
        assert!(!job.held());
    }
    assert_eq!(
        store.get("free").await.unwrap().unwrap().state,
        JobState::Pending
    );

    // A cancel of a waiting job reaches its dependents the same way.
    enqueue_at(
        store,
        vec![vec![new_job("x", 5), after("y", &["x"])]],
        clock::now(),
    )
    .await;
    let x = store.get("x").await.unwrap().unwrap();
    let cancel =
        GuardedUpdate::unless_changed(&x, job::cancel(&x, "by a test", clock::now()).unwrap());
    let outcome = settle_one(store, cancel).await;
    assert_eq!(
        outcome.cancelled,
        [(
            "y".to_owned(),
            "cancelled: it runs after x, which was cancelled".to_owned()
        )]
    );
}

/// A dependency must name a job that exists, was enqueued before (earlier in the same batch counts) and can still
/// complete; a request that breaks that is stored not at all, and the other requests of the batch are.
async fn bad_dependencies_refuse_only_their_request(t: Ctx) {
    let store = t.store.as_ref();
    let dead = NewJob {
        max_retries: 0,
        ..new_job("dead", 5)
    };
    enqueue_at(store, vec![vec![dead]], clock::now()).await;
    let job = claim_one(store, "dead").await;
    settle_one(
        store,
        finish(&job, Outcome::Failed(job::Failure::Exit(1)), clock::now()),
    )
    .await;

    let outcome = enqueue_at(
        store,
        vec![
            vec![new_job("ok1", 5), after("ghostly", &["ghost"])],
            vec![after("early", &["late"]), new_job("late", 5)],
            vec![after("selfish", &["selfish"])],
            vec![after("hopeless", &["dead"])],
            vec![new_job("first", 5), after("second", &["first"])],
        ],
        clock::now(),
    )
    .await;
    let refusal = |index: usize| match &outcome.enqueued[index] {
        Err(EnqueueRejected::Dependency(problem)) => problem.clone(),
        other => panic!("request {index} was not refused for its dependency: {other:?}"),
    };
    assert_eq!(refusal(0), "after: no job with id 'ghost'");
    assert_eq!(
        refusal(1),
        "after: job 'early' cannot run after 'late', which is not enqueued before it"
    );
    assert_eq!(
        refusal(2),
        "after: job 'selfish' cannot run after 'selfish', which is not enqueued before it"
    );
    assert_eq!(
        refusal(3),
        "after: job 'dead' is dead, so a job after it would never run"
    );
    assert!(outcome.enqueued[4].is_ok());
    for id in ["ok1", "ghostly", "early", "late", "selfish", "hopeless"] {
        assert!(store.get(id).await.unwrap().is_none(), "{id} was stored");
    }
    assert!(store.get("second").await.unwrap().unwrap().held());
}

/// A SQLite database made before job control keeps every job and run through the migration that adds the
/// cancelled state (it rebuilds the jobs table).
#[tokio::test]
async fn an_older_sqlite_database_keeps_its_jobs_through_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.db");
    {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .foreign_keys(true);
        let mut conn = sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap();
        let mut before = sqlx::migrate!("service/store/migrations/sqlite");
        let first_three = before.migrations[..3].to_vec();
        before.migrations = std::borrow::Cow::Owned(first_three);
        before.run(&mut conn).await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO jobs (id, command, state, priority, max_retries, queue_key, created_at, updated_at,
                               run_after, runs)
             VALUES ('old1', 'echo old', 'completed', 5, 3, 1, 1, 2, 1, 1),
                    ('old2', 'echo wait', 'pending', 3, 3, 1, 1, 1, 1, 0);
             INSERT INTO job_runs (job_seq, run, worker, started_at, finished_at, outcome, output)
             VALUES (1, 1, 0, 1, 2, 'ok', x'6f6c64');
             UPDATE counters SET value = 3 WHERE name = 'next_job_number';",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let store = SqliteStore::open(&path).await.unwrap();
    let old = store.get("old1").await.unwrap().unwrap();
    assert_eq!((old.state, old.runs), (JobState::Completed, 1));
    let runs = store.runs("old1").await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(output_of(&store, "old1", 1).await, b"old");
    assert_eq!(
        store.counts().await.unwrap(),
        counts_of(&[(JobState::Completed, 1), (JobState::Pending, 1)])
    );
    let next = enqueue_one(&store, generated(5), POLICY).await;
    assert_eq!(next.id, "job3");
    assert_eq!(
        ids(&claim(&store, 2, clock::now(), OWNER).await.unwrap()),
        ["old2", "job3"]
    );
}

/// The statements of a worker's commit on PostgreSQL read the rows they change, not the table, whatever
/// PostgreSQL believes of it: on a table it has never analysed (a new queue whose first burst arrives), with 2,000
/// jobs not due for a year and then 2,000 due, and again once analysed; in the generic plan a connection may keep
/// and in a plan made for the values. The claim reads the head of the queue: plans that read every waiting job and
/// sorted them (chosen for a table believed small), or read the whole table to find the claimed rows (a generic
/// plan's guess), read thousands; so did the release (or the cancelling) of the jobs held for a job that ended,
/// which has none, when it looked for held jobs among every pending one.
#[tokio::test]
async fn a_postgres_worker_commit_reads_only_the_rows_it_changes() {
    const TEST: &str = "a_postgres_worker_commit_reads_only_the_rows_it_changes";
    let year = 365 * 86_400 * MICROS_PER_SEC;
    let burst = |delay| {
        (0..2_000)
            .map(|_| NewJob {
                delay,
                ..generated(5)
            })
            .collect::<Vec<_>>()
    };
    // A new queue whose first burst is due; and one whose first burst is not, then a second that is.
    for not_due_first in [false, true] {
        let Some(t) = Ctx::postgres(TEST).await else {
            return;
        };
        let Place::Postgres(database) = &t.place else {
            unreachable!()
        };
        let mut conn = sqlx::PgConnection::connect(&database.url).await.unwrap();
        if not_due_first {
            enqueue_at(t.store.as_ref(), vec![burst(year)], clock::now()).await;
            for mode in PLAN_MODES {
                let claim = rows_under_explain(&mut conn, mode, &claim_with_shell()).await;
                assert_eq!(claim, 0, "nothing is due");
            }
        }
        enqueue_at(t.store.as_ref(), vec![burst(0)], clock::now()).await;
        // Held jobs, which the release and the cancelling of job1's dependents (it has none) must not read.
        let held = (0..1_000)
            .map(|_| NewJob {
                after: vec!["job2".to_owned()],
                ..generated(5)
            })
            .collect();
        enqueue_at(t.store.as_ref(), vec![held], clock::now()).await;
        worker_statements_read_only_their_rows(&mut conn).await;
        sqlx::query("ANALYZE jobs")
            .execute(&mut conn)
            .await
            .unwrap();
        worker_statements_read_only_their_rows(&mut conn).await;
    }
}

/// Both ways a connection may plan a prepared statement.
const PLAN_MODES: [&str; 2] = ["force_generic_plan", "force_custom_plan"];

/// The claim of one job by a worker whose shell waits, as the store sends it.
fn claim_with_shell() -> (&'static str, &'static str, String) {
    let last_ready = job::last_ready_key(0, POLICY.aging_interval_secs);
    (
        queuectl::store::postgres::CLAIM_JOBS,
        "bigint, text, bigint, bigint, bigint[], bigint[], bigint[]",
        format!("1, 'plan-check', 30000000, {last_ready}, '{{0}}', '{{1}}', '{{4242}}'"),
    )
}

/// Checks each statement of a worker's commit, in both plan modes, on a queue of pending jobs whose first is
/// `job1` and some are due, and jobs held for `job2`. The release and the cancelling change nothing here (no job
/// runs after `job1`): what is checked of them is what they read.
async fn worker_statements_read_only_their_rows(conn: &mut sqlx::PgConnection) {
    use queuectl::store::postgres::{
        CANCEL_DEPENDENTS, LOCK_DEPENDENTS, RELEASE_DEPENDENTS, SETTLE_JOBS, SETTLE_ONE_JOB,
    };
    let held = job::HELD;
    let lock = (
        LOCK_DEPENDENTS,
        "bigint[], bigint",
        format!("'{{1}}', {held}"),
    );
    let release = (
        RELEASE_DEPENDENTS,
        "bigint[], bigint, bigint",
        format!("'{{1}}', 60000000, {held}"),
    );
    let cancel = (
        CANCEL_DEPENDENTS,
        "bigint[], bigint",
        format!("'{{1}}', {held}"),
    );
    let settle_types = "bigint[], bigint[], text[], bigint[], text[], bigint[], bigint[], bigint[], text[], \
                        bigint[], bigint[], text[], boolean[], text[]";
    let settle_first = "'{0}', '{1}', '{pending}', '{0}', '{pending}', '{0}', '{0}', '{0}', '{NULL}', '{0}', \
                        '{NULL}', '{NULL}', '{f}', '{job1}'";
    let settle_one = (SETTLE_ONE_JOB, settle_types, settle_first.to_owned());
    let settle = (SETTLE_JOBS, settle_types, settle_first.to_owned());
    for mode in PLAN_MODES {
        assert_eq!(rows_under_explain(conn, mode, &claim_with_shell()).await, 1);
        rows_under_explain(conn, mode, &lock).await;
        rows_under_explain(conn, mode, &release).await;
        rows_under_explain(conn, mode, &cancel).await;
        assert_eq!(rows_under_explain(conn, mode, &settle_one).await, 1);
        assert_eq!(rows_under_explain(conn, mode, &settle).await, 1);
    }
}

/// Runs `statement` (its text, its parameters' types, its arguments) under EXPLAIN ANALYZE with
/// `plan_cache_mode` set to `mode` and a write batch's planner settings, in a transaction it rolls back; asserts
/// that no scan read more than two rows of a table and that nothing was compiled, and returns how many rows the
/// statement returned.
async fn rows_under_explain(
    conn: &mut sqlx::PgConnection,
    mode: &str,
    (sql, types, arguments): &(&str, &str, String),
) -> u64 {
    fn most_rows_a_scan_read(node: &serde_json::Value) -> u64 {
        let count = |key: &str| {
            node.get(key)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        let own = if node.get("Relation Name").is_some() || node.get("Index Name").is_some() {
            count("Actual Rows") + count("Rows Removed by Filter")
        } else {
            0
        };
        let plans = node.get("Plans").and_then(|plans| plans.as_array());
        plans
            .into_iter()
            .flatten()
            .map(most_rows_a_scan_read)
            .fold(own, u64::max)
    }
    let mut tx = conn.begin().await.unwrap();
    let prepare = format!(
        "{}; SET LOCAL plan_cache_mode = {mode}; PREPARE checked ({types}) AS {sql}",
        queuectl::store::postgres::KEY_PLANS
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(prepare))
        .execute(&mut *tx)
        .await
        .unwrap();
    let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE checked ({arguments})");
    let row = sqlx::raw_sql(sqlx::AssertSqlSafe(explain))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    // A `json` value is sent as its text; sqlx decodes it only with its `json` feature, which nothing else needs.
    let plan: serde_json::Value =
        serde_json::from_str(&row.try_get_unchecked::<String, _>(0).unwrap()).unwrap();
    sqlx::raw_sql("DEALLOCATE checked")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let root = &plan[0]["Plan"];
    let most = most_rows_a_scan_read(root);
    assert!(most <= 2, "{mode}: a scan read {most} rows: {plan:#}");
    assert!(
        plan[0].get("JIT").is_none(),
        "{mode}: compiled (JIT): {plan:#}"
    );
    root["Actual Rows"].as_u64().expect("a row count")
}

conformance!(
    delete_final_takes_only_final_jobs,
    purges_take_old_final_jobs_in_batches,
    a_delayed_job_is_claimed_only_when_due,
    a_cancelled_job_is_never_claimed_until_retried,
    a_job_runs_once_the_jobs_it_names_completed,
    a_dependency_that_fails_cancels_its_dependents_in_turn,
    bad_dependencies_refuse_only_their_request,
    a_stale_report_is_rejected,
    one_batch_does_everything_in_order,
    a_duplicate_id_rolls_back_only_its_request,
    generated_ids_never_collide_with_chosen_ones,
    starts_record_the_run_and_its_process_group,
    output_is_stored_in_chunks_read_in_pages_and_its_middle_forgotten,
    guarded_updates_apply_in_order,
    claims_come_last_and_are_dealt_in_order,
    a_claim_of_zero_takes_nothing,
    claims_follow_priority_and_fifo,
    abandoned_runs_are_counted_until_the_job_is_dead,
    next_due_is_the_earliest_waiting_job,
    in_flight_lists_the_running_jobs,
    a_claim_with_a_waiting_shell_records_the_start,
    get_returns_the_job_as_stored,
    listing_pages_through_every_job_once,
    listing_ends_where_the_jobs_end,
    a_pending_listing_is_in_the_order_jobs_will_run,
    counts_tally_every_state,
    the_newest_time_is_the_last_change_of_any_job,
    oldest_pending_is_the_longest_waiting_job,
    runs_record_every_attempt_oldest_first,
    settings_are_stored_and_re_key_waiting_jobs,
    reset_deletes_everything,
    aging_lets_an_old_job_overtake_a_new_better_one,
    backup_copies_the_database_where_it_can,
    close_leaves_the_database_whole,
    only_a_shared_database_has_the_cluster_capability,
);

// ---- The Cluster capability (PostgreSQL).

/// A short lease, so that the checks see one run out.
const LEASE: Duration = Duration::from_secs(2);

fn server_record(id: &str, job: Option<&str>) -> ServerRecord {
    ServerRecord {
        id: id.to_owned(),
        host: "test-host".to_owned(),
        pid: 4000,
        worker_count: 1,
        workers: vec![WorkerRecord {
            index: 0,
            job_id: job.map(str::to_owned),
            command: job.map(|id| format!("echo {id}")),
            started_at: Some(12),
            stopping: false,
        }],
        seen_at: 0,
    }
}

/// A store reports the lease it was opened with.
async fn the_lease_is_the_one_opened_with(t: Ctx) {
    let store = t.postgres_store(LEASE).await;
    assert_eq!(store.cluster().unwrap().lease(), LEASE);
}

/// A heartbeat renews the leases of the jobs its own server runs only, and returns the jobs whose lease ran out
/// (with their process groups), for the caller to rescue.
async fn heartbeats_renew_their_own_leases_and_find_expired_ones(t: Ctx) {
    let a = t.postgres_store(LEASE).await;
    let b = t.postgres_store(LEASE).await;
    let (server_a, server_b) = (
        server_record("server-a", Some("mine")),
        server_record("server-b", Some("theirs")),
    );
    enqueue_at(
        &a,
        vec![vec![new_job("mine", 1), new_job("theirs", 2)]],
        clock::now(),
    )
    .await;
    let mine = claim(&a, 1, clock::now(), "server-a").await.unwrap();
    assert_eq!(ids(&mine), ["mine"]);
    let theirs = claim(&b, 1, clock::now(), "server-b").await.unwrap();
    assert_eq!(ids(&theirs), ["theirs"]);
    let batch = WriteBatch {
        starts: vec![RunStarted {
            job_id: "theirs".into(),
            seq: theirs[0].seq,
            run: 1,
            worker: 0,
            pgid: Some(5150),
            started_at: clock::now(),
        }],
        owner: "server-b".into(),
        ..WriteBatch::default()
    };
    b.write(Arc::new(batch), clock::now(), POLICY)
        .await
        .unwrap();

    let cluster_a = a.cluster().unwrap();
    let cluster_b = b.cluster().unwrap();
    assert!(
        cluster_a.heartbeat(&server_a).await.unwrap().is_empty(),
        "no lease ran out yet"
    );
    // Server B falls silent; A beats on until B's lease runs out.
    let rescued = eventually("server-b's lease to run out", async || {
        let expired = cluster_a.heartbeat(&server_a).await.unwrap();
        (!expired.is_empty()).then_some(expired)
    })
    .await;
    let rescued: Vec<(&str, JobState, Option<i64>)> = rescued
        .iter()
        .map(|running| (running.job.id.as_str(), running.job.state, running.pgid))
        .collect();
    assert_eq!(rescued, [("theirs", JobState::Processing, Some(5150))]);
    // "mine" was claimed before "theirs", so without renewal its lease would have run out first.
    assert!(
        cluster_b.heartbeat(&server_b).await.unwrap().is_empty(),
        "server-a renewed its own lease"
    );

    // Now A falls silent and B beats: B's heartbeat renewed "theirs", and finds "mine" once A's lease runs out.
    let rescued = eventually("server-a's lease to run out", async || {
        let expired = cluster_b.heartbeat(&server_b).await.unwrap();
        (!expired.is_empty()).then_some(expired)
    })
    .await;
    assert_eq!(
        rescued
            .iter()
            .map(|running| running.job.id.as_str())
            .collect::<Vec<_>>(),
        ["mine"]
    );
    assert!(
        cluster_a.heartbeat(&server_a).await.unwrap().is_empty(),
        "server-b's heartbeat renewed its lease on theirs"
    );
}

/// servers lists what each server published in its last heartbeat, for as long as that is within a lease.
async fn servers_are_those_seen_within_a_lease(t: Ctx) {
    let a = t.postgres_store(LEASE).await;
    let b = t.postgres_store(LEASE).await;
    let cluster_a = a.cluster().unwrap();
    assert!(cluster_a.servers().await.unwrap().is_empty());
    let server_a = server_record("server-a", Some("mine"));
    let server_b = server_record("server-b", None);
    let before = clock::now();
    cluster_a.heartbeat(&server_a).await.unwrap();
    b.cluster().unwrap().heartbeat(&server_b).await.unwrap();

    let seen = cluster_a.servers().await.unwrap();
    for record in &seen {
        assert!(
            (record.seen_at - before).abs() < 5 * MICROS_PER_SEC,
            "seen at {}, beat at {before}",
            record.seen_at
        );
    }
    let published: Vec<ServerRecord> = seen
        .into_iter()
        .map(|record| ServerRecord {
            seen_at: 0,
            ..record
        })
        .collect();
    assert_eq!(published, [server_a.clone(), server_b.clone()]);

    // B falls silent; A beats on and, a lease later, is the only one listed.
    let alone = eventually("server-b to drop out of the list", async || {
        cluster_a.heartbeat(&server_a).await.unwrap();
        let ids: Vec<String> = cluster_a
            .servers()
            .await
            .unwrap()
            .into_iter()
            .map(|record| record.id)
            .collect();
        (ids.len() < 2).then_some(ids)
    })
    .await;
    assert_eq!(alone, ["server-a"]);
}

/// What one server announces arrives on another's signal stream: a worker count, new jobs, a changed setting.
async fn announcements_reach_the_other_servers(t: Ctx) {
    let a = t.postgres_store(LEASE).await;
    let b = t.postgres_store(LEASE).await;
    let mut signals = b
        .cluster()
        .unwrap()
        .signals()
        .expect("the first caller takes the stream");
    assert!(
        b.cluster().unwrap().signals().is_none(),
        "there is one stream"
    );

    a.cluster().unwrap().broadcast_workers(7).await.unwrap();
    wait_for_signal(&mut signals, Signal::Workers(7)).await;

    enqueue_at(&a, vec![vec![new_job("a", 5)]], clock::now()).await;
    wait_for_signal(&mut signals, Signal::Jobs).await;

    a.save_config("backoff_base", "3", None).await.unwrap();
    wait_for_signal(&mut signals, Signal::Config).await;

    let cancel = CancelRequest {
        job_id: "a".into(),
        run: 1,
        by: "by a test".into(),
    };
    a.cluster()
        .unwrap()
        .broadcast_cancel(&cancel)
        .await
        .unwrap();
    wait_for_signal(&mut signals, Signal::Cancel(cancel)).await;
}

/// After a reset lets an id come back, a late report about the run of the job that had that id before matches
/// nothing, even with the same run number: reports are fenced on the job's row, which PostgreSQL never reuses.
/// (SQLite reuses rows after a reset, and resets only once every run of its one server has ended.)
async fn a_report_from_before_a_reset_matches_nothing(t: Ctx) {
    let store = t.postgres_store(LEASE).await;
    enqueue_at(&store, vec![vec![new_job("job1", 5)]], clock::now()).await;
    let old = claim_one(&store, "job1").await;
    store.reset().await.unwrap();
    enqueue_at(&store, vec![vec![new_job("job1", 5)]], clock::now()).await;
    let new = claim_one(&store, "job1").await;
    assert_eq!((old.runs, new.runs), (1, 1));
    assert_ne!(old.seq, new.seq);
    assert!(
        !update(
            &store,
            finish(&old, Outcome::Succeeded, clock::now()),
            clock::now()
        )
        .await,
        "the old run's report was applied to the new job"
    );
    assert_eq!(
        store.get("job1").await.unwrap().unwrap().state,
        JobState::Processing
    );
    assert!(
        update(
            &store,
            finish(&new, Outcome::Succeeded, clock::now()),
            clock::now()
        )
        .await
    );
    assert_eq!(
        store.get("job1").await.unwrap().unwrap().state,
        JobState::Completed
    );
}

/// Two servers complete the last two jobs a held job runs after, at the same time: the job is released. Each
/// server's release saw the other's job still running when it looked, unless the second to look waited for the
/// first to commit. The first server's commit is held back by a row of output another transaction is writing (its
/// insert waits for that one to end), until the second server's release has run or is seen waiting.
async fn a_job_whose_last_two_dependencies_complete_at_once_is_released(t: Ctx) {
    let Place::Postgres(database) = &t.place else {
        unreachable!()
    };
    let store = t.store.clone();
    let other = Arc::new(t.postgres_store(Duration::from_secs(30)).await);
    enqueue_at(
        store.as_ref(),
        vec![
            vec![new_job("a", 5), new_job("b", 5)],
            vec![after("c", &["a", "b"])],
        ],
        clock::now(),
    )
    .await;
    let a = claim_one(store.as_ref(), "a").await;
    let b = claim_one(other.as_ref(), "b").await;
    let starts = WriteBatch {
        starts: vec![started(&a), started(&b)],
        ..WriteBatch::default()
    };
    store
        .write(Arc::new(starts), clock::now(), POLICY)
        .await
        .unwrap();

    let mut blocker = sqlx::PgConnection::connect(&database.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query(
        "INSERT INTO job_output (job_seq, run, start, data, streams) VALUES ($1, $2, 0, '', '[]')",
    )
    .bind(a.seq)
    .bind(i64::from(a.runs))
    .execute(&mut blocker)
    .await
    .unwrap();
    let finished_a = tokio::spawn({
        let (store, update) = (store.clone(), finish(&a, Outcome::Succeeded, clock::now()));
        async move { settle_one(store.as_ref(), update).await }
    });
    let mut watcher = sqlx::PgConnection::connect(&database.url).await.unwrap();
    eventually("a's commit to wait for the row of output", async || {
        (lock_waiters(&mut watcher).await == 1).then_some(())
    })
    .await;
    let finished_b = tokio::spawn({
        let (other, update) = (other.clone(), finish(&b, Outcome::Succeeded, clock::now()));
        async move { settle_one(other.as_ref(), update).await }
    });
    eventually("b's commit to end or to wait", async || {
        (finished_b.is_finished() || lock_waiters(&mut watcher).await == 2).then_some(())
    })
    .await;
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let released = finished_a.await.unwrap().released + finished_b.await.unwrap().released;
    assert_eq!(released, 1, "c is released once");
    assert!(!store.get("c").await.unwrap().unwrap().held());
    claim_one(store.as_ref(), "c").await;
}

/// A batch that PostgreSQL aborts to break a deadlock is written again, whole, once the way is clear. Here another
/// transaction holds the second of the two jobs that the end of their dependency cancels, and then asks for the
/// first, which the batch locked (in the order of their keys) before it began to wait: PostgreSQL aborts the
/// batch, which waited first.
async fn a_batch_aborted_by_a_deadlock_is_written_again(t: Ctx) {
    let Place::Postgres(database) = &t.place else {
        unreachable!()
    };
    let store = t.store.clone();
    let doomed = NewJob {
        max_retries: 0,
        ..new_job("a", 5)
    };
    enqueue_at(
        store.as_ref(),
        vec![vec![doomed, after("b", &["a"]), after("c", &["a"])]],
        clock::now(),
    )
    .await;
    let a = claim_one(store.as_ref(), "a").await;
    let mut other = sqlx::PgConnection::connect(&database.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    let lock =
        |id: &'static str| sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE").bind(id);
    lock("c").execute(&mut other).await.unwrap();
    let failed = tokio::spawn({
        let update = finish(&a, Outcome::Failed(job::Failure::Exit(1)), clock::now());
        async move { settle_one(store.as_ref(), update).await }
    });
    let mut watcher = sqlx::PgConnection::connect(&database.url).await.unwrap();
    eventually("the batch to wait for c", async || {
        (lock_waiters(&mut watcher).await == 1).then_some(())
    })
    .await;
    let b_taken = sqlx::query("SELECT 1 FROM jobs WHERE id = 'b' FOR UPDATE NOWAIT")
        .execute(&mut watcher)
        .await;
    assert!(
        matches!(&b_taken, Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("55P03")),
        "the batch holds b while it waits for c: {b_taken:?}"
    );
    // Waits until PostgreSQL aborts the batch, which holds b.
    lock("b").execute(&mut other).await.unwrap();
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    assert_eq!(
        cancellations(&failed.await.unwrap()),
        [
            ("b", "cancelled: it runs after a, which ended dead"),
            ("c", "cancelled: it runs after a, which ended dead"),
        ]
    );
    assert_eq!(
        t.store.get("a").await.unwrap().unwrap().state,
        JobState::Dead
    );
}

cluster_conformance!(
    a_report_from_before_a_reset_matches_nothing,
    the_lease_is_the_one_opened_with,
    heartbeats_renew_their_own_leases_and_find_expired_ones,
    servers_are_those_seen_within_a_lease,
    announcements_reach_the_other_servers,
    a_job_whose_last_two_dependencies_complete_at_once_is_released,
    a_batch_aborted_by_a_deadlock_is_written_again,
);
