//! The store conformance suite: what every `Store` backend must do, written against `&dyn Store` so that each
//! backend runs the same checks. `for_each_backend` opens a fresh SQLite store and, when
//! QUEUECTL_TEST_DATABASE_URL is set (`.ci/run` sets it), a fresh PostgreSQL database.
//!
//! PostgreSQL takes time from the database's clock, so the shared checks use the real clock; the checks that
//! need to move time by hours run on SQLite, which takes the time it is given.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use queuectl::clock;
use queuectl::job::{self, JobState, MICROS_PER_SEC, Micros, NewJob, Outcome, Policy};
use queuectl::store::postgres::PgStore;
use queuectl::store::sqlite::SqliteStore;
use queuectl::store::{
    EnqueueRejected, GuardedUpdate, ListFilter, RunEnded, Store, WriteBatch, WriteOutcome,
};
use sqlx::Connection;

const OWNER: &str = "test-server";

const POLICY: Policy = Policy {
    backoff_base: 2,
    aging_interval_secs: 60,
    max_interruptions: 3,
};

/// Runs `check` once per backend, each time on a new, empty store that lives only for that check.
async fn for_each_backend<F, Fut>(check: F)
where
    F: Fn(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("jobs.db"))
        .await
        .unwrap();
    check(Arc::new(sqlite)).await;

    let Ok(admin_url) = std::env::var("QUEUECTL_TEST_DATABASE_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "QUEUECTL_TEST_DATABASE_URL is not set; .ci/run sets it"
        );
        return;
    };
    let name = format!(
        "queuectl_store_{}_{}",
        std::process::id(),
        clock::now().rem_euclid(1_000_000_000)
    );
    let admin = async |statement: String| {
        let mut conn = sqlx::PgConnection::connect(&admin_url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut conn)
            .await
            .unwrap();
    };
    admin(format!("CREATE DATABASE {name}")).await;
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    let postgres = PgStore::open(&format!("{base}/{name}"), Duration::from_secs(30))
        .await
        .unwrap();
    check(Arc::new(postgres)).await;
    admin(format!("DROP DATABASE {name} WITH (FORCE)")).await;
}

fn new_job(id: &str, priority: u8) -> NewJob {
    NewJob {
        id: Some(id.to_owned()),
        command: format!("echo {id}"),
        priority,
        max_retries: 3,
        timeout_secs: None,
    }
}

/// Enqueues each request of `requests` in one batch at `now`.
async fn enqueue_at(store: &dyn Store, requests: Vec<Vec<NewJob>>, now: Micros) -> WriteOutcome {
    let batch = WriteBatch {
        enqueues: requests,
        durable: true,
        ..WriteBatch::default()
    };
    store.write(&batch, now, POLICY).await.unwrap()
}

fn finish(job: &job::Job, outcome: Outcome, now: Micros) -> GuardedUpdate {
    GuardedUpdate {
        job_id: job.id.clone(),
        expect_state: JobState::Processing,
        expect_runs: job.runs,
        settled: job::settle(job, &outcome, POLICY, now),
        ended: Some(RunEnded {
            worker: 0,
            outcome: outcome.to_string(),
            output: b"out".to_vec(),
            truncated: false,
        }),
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
        claims: vec![limit],
        owner: owner.to_owned(),
        ..WriteBatch::default()
    };
    let mut outcome = store.write(&batch, now, POLICY).await?;
    Ok(outcome.claimed.pop().unwrap_or_default())
}

async fn update(store: &dyn Store, update: GuardedUpdate, now: Micros) -> bool {
    let batch = WriteBatch {
        updates: vec![update],
        ..WriteBatch::default()
    };
    let outcome = store.write(&batch, now, POLICY).await.unwrap();
    assert_eq!(outcome.applied.len(), 1);
    outcome.applied[0]
}

/// A run that was recovered and claimed again cannot settle the job: its report is rejected and changes nothing.
async fn a_stale_report_is_rejected(store: Arc<dyn Store>) {
    let store = store.as_ref();
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
async fn one_batch_does_everything_in_order(store: Arc<dyn Store>) {
    let store = store.as_ref();
    let generated = |priority| NewJob {
        id: None,
        ..new_job("unused", priority)
    };
    let batch = WriteBatch {
        enqueues: vec![vec![generated(5), generated(5)], vec![generated(5)]],
        claims: vec![1],
        owner: OWNER.to_owned(),
        durable: true,
        ..WriteBatch::default()
    };
    let outcome = store.write(&batch, clock::now(), POLICY).await.unwrap();
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
    report.ended.as_mut().unwrap().output = b"\xff\x00binary".to_vec();
    let batch = WriteBatch {
        starts: vec![queuectl::store::RunStarted {
            job_id: first.id.clone(),
            run: 1,
            worker: 3,
            pgid: Some(4242),
            started_at: now,
        }],
        updates: vec![report.clone(), report],
        claims: vec![1, 1, 5],
        owner: OWNER.to_owned(),
        ..WriteBatch::default()
    };
    let outcome = store.write(&batch, now, POLICY).await.unwrap();
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
    assert_eq!(runs[0].output, b"\xff\x00binary");
    let mut counts = store.counts().await.unwrap();
    assert_eq!(counts[JobState::Processing as usize], 2);
    counts[JobState::Processing as usize] = 0;
    counts[JobState::Completed as usize] -= 1;
    assert_eq!(counts, [0; 5]);
}

/// A duplicate id refuses its own request whole and leaves the other requests of the batch stored.
async fn a_duplicate_id_rolls_back_only_its_request(store: Arc<dyn Store>) {
    let store = store.as_ref();
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
        counts, [0; 5],
        "exactly taken, first, job1 and last are stored"
    );
}

/// Claims take the best priority first, FIFO within a priority; a failed job waits for its backoff.
async fn claims_follow_priority_and_fifo(store: Arc<dyn Store>) {
    let store = store.as_ref();
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
async fn listing_pages_through_every_job_once(store: Arc<dyn Store>) {
    let store = store.as_ref();
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

#[tokio::test]
async fn stale_reports_are_rejected() {
    for_each_backend(a_stale_report_is_rejected).await;
}

#[tokio::test]
async fn duplicate_ids_roll_back_only_their_request() {
    for_each_backend(a_duplicate_id_rolls_back_only_its_request).await;
}

#[tokio::test]
async fn one_batch_enqueues_starts_settles_and_claims() {
    for_each_backend(one_batch_does_everything_in_order).await;
}

#[tokio::test]
async fn claim_order_follows_priority_and_fifo() {
    for_each_backend(claims_follow_priority_and_fifo).await;
}

#[tokio::test]
async fn listing_pages() {
    for_each_backend(listing_pages_through_every_job_once).await;
}

/// Runs a job's server died under are counted and stored; the last one allowed buries the job, and a claim after
/// an abandoned run hands out the stored count.
async fn abandoned_runs_are_counted_until_the_job_is_dead(store: Arc<dyn Store>) {
    let store = store.as_ref();
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

#[tokio::test]
async fn abandoned_runs_are_counted() {
    for_each_backend(abandoned_runs_are_counted_until_the_job_is_dead).await;
}

/// A restarted server seeds its clock with the newest stamp in the store: the last change of any job.
async fn the_newest_time_is_the_last_change_of_any_job(store: Arc<dyn Store>) {
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

#[tokio::test]
async fn newest_time() {
    for_each_backend(the_newest_time_is_the_last_change_of_any_job).await;
}
