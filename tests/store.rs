//! The store conformance suite: what every `Store` backend must do, written against `&dyn Store` so that each
//! backend runs the same checks. `for_each_backend` opens a fresh store per backend (SQLite today).

use std::future::Future;
use std::sync::Arc;

use queuectl::job::{self, JobState, MICROS_PER_SEC, Micros, NewJob, Outcome, Policy};
use queuectl::store::sqlite::SqliteStore;
use queuectl::store::{
    EnqueueRejected, GuardedUpdate, ListFilter, RunEnded, Store, WriteBatch, WriteOutcome,
};

const POLICY: Policy = Policy {
    backoff_base: 2,
    aging_interval_secs: 60,
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
    enqueue_at(store, vec![vec![new_job("a", 5)]], 1).await;
    let first = store.claim(1, 2).await.unwrap().pop().expect("claimed");
    assert_eq!((first.state, first.runs), (JobState::Processing, 1));

    // The server died during run 1; recovery returned the job to the queue and run 2 started.
    let recovered = GuardedUpdate {
        ended: None,
        ..finish(&first, Outcome::Interrupted, 3)
    };
    assert!(update(store, recovered, 3).await);
    let second = store
        .claim(1, 4)
        .await
        .unwrap()
        .pop()
        .expect("claimed again");
    assert_eq!(second.runs, 2);
    let before = store.get("a").await.unwrap().unwrap();

    // Run 1's worker now reports success: stale, since the job is on run 2.
    assert!(!update(store, finish(&first, Outcome::Succeeded, 5), 5).await);
    assert_eq!(store.get("a").await.unwrap().unwrap(), before);
    assert!(
        store.runs("a").await.unwrap().is_empty(),
        "the stale run's record is not written either"
    );

    // A report about a state the job is not in is rejected too.
    let wrong_state = GuardedUpdate {
        expect_state: JobState::Failed,
        ..finish(&second, Outcome::Succeeded, 6)
    };
    assert!(!update(store, wrong_state, 6).await);
    assert_eq!(store.get("a").await.unwrap().unwrap(), before);

    // The current run's report applies.
    assert!(update(store, finish(&second, Outcome::Succeeded, 7), 7).await);
    let done = store.get("a").await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Completed);
    let runs = store.runs("a").await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].run, runs[0].outcome.as_deref()), (2, Some("ok")));
}

/// A duplicate id refuses its own request whole and leaves the other requests of the batch stored.
async fn a_duplicate_id_rolls_back_only_its_request(store: Arc<dyn Store>) {
    let store = store.as_ref();
    enqueue_at(store, vec![vec![new_job("taken", 5)]], 1).await;
    let outcome = enqueue_at(
        store,
        vec![
            vec![new_job("first", 5)],
            vec![new_job("half", 5), new_job("taken", 5)],
            vec![new_job("twice", 5), new_job("twice", 5)],
            vec![new_job("last", 5)],
        ],
        2,
    )
    .await;
    assert_eq!(outcome.enqueued.len(), 4);
    assert!(outcome.enqueued[0].is_ok());
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
    assert_eq!(
        (taken.created_at, taken.command.as_str()),
        (1, "echo taken")
    );
    let mut counts = store.counts().await.unwrap();
    counts[JobState::Pending as usize] -= 3;
    assert_eq!(counts, [0; 5], "exactly taken, first and last are stored");
}

/// Claims take the lowest queue key first: priority, then FIFO, with aging letting old jobs overtake.
async fn claims_follow_priority_fifo_and_aging(store: Arc<dyn Store>) {
    let store = store.as_ref();
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
    while let Some(job) = store.claim(1, now).await.unwrap().pop() {
        order.push(job.id);
    }
    assert_eq!(order, ["high", "mid-a", "mid-b", "old-low", "late-high"]);
    assert!(store.claim(5, now).await.unwrap().is_empty());

    // Not before its time: a failed job waits for its run_after.
    enqueue_at(store, vec![vec![new_job("retry", 5)]], now).await;
    let claimed = store.claim(1, now).await.unwrap().pop().unwrap();
    let failed = finish(&claimed, Outcome::Failed(job::Failure::Exit(1)), now);
    let run_after = failed.settled.run_after;
    assert!(update(store, failed, now).await);
    assert_eq!(store.next_run_after().await.unwrap(), Some(run_after));
    assert!(store.claim(1, run_after - 1).await.unwrap().is_empty());
    assert_eq!(store.claim(1, run_after).await.unwrap()[0].id, "retry");
}

/// Listing pages by priority then insertion order, without gaps or repeats, with and without a state filter.
async fn listing_pages_through_every_job_once(store: Arc<dyn Store>) {
    let store = store.as_ref();
    let jobs: Vec<NewJob> = (0..25)
        .map(|n| new_job(&format!("j{n:02}"), 1 + (n % 3) as u8))
        .collect();
    enqueue_at(store, vec![jobs], 1).await;
    store.claim(4, 2).await.unwrap();

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
async fn claim_order_follows_priority_fifo_and_aging() {
    for_each_backend(claims_follow_priority_fifo_and_aging).await;
}

#[tokio::test]
async fn listing_pages() {
    for_each_backend(listing_pages_through_every_job_once).await;
}
