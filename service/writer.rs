//! Group commit: every write of the server goes through one task that applies whatever has queued up meanwhile
//! in a single transaction, so concurrent requests share one fsync instead of paying one each.

use std::sync::{Arc, RwLock};

use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::clock;
use crate::config::Settings;
use crate::event::{Event, Events};
use crate::job::{Job, NewJob};
use crate::output::OutputWrite;
use crate::store::{
    Claim, ClaimStart, EnqueueRejected, GuardedUpdate, RunStarted, Store, StoreError, WriteBatch,
};

/// Writes per transaction at most, so that one huge backlog cannot hold the writer for long.
const MAX_BATCH: usize = 4096;

/// Operations that may wait for the write task at most. Past that, callers wait for room (back-pressure), so that a
/// flood of requests against a slow database holds them back instead of growing memory without end.
const QUEUE_CAPACITY: usize = 4 * MAX_BATCH;

type EnqueueResult = Result<Result<Vec<Job>, EnqueueRejected>, StoreError>;

enum Op {
    Enqueue {
        jobs: Vec<NewJob>,
        reply: oneshot::Sender<EnqueueResult>,
    },
    Start {
        start: RunStarted,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Update {
        update: GuardedUpdate,
        durable: bool,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    Claim {
        claim: Claim,
        reply: oneshot::Sender<Result<Vec<Job>, StoreError>>,
    },
    Output {
        write: OutputWrite,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// The handle to the write task. Cheap to clone; the task ends when the last handle is dropped.
#[derive(Clone)]
pub struct Writer {
    ops: mpsc::Sender<Op>,
    faults: watch::Receiver<Faults>,
}

/// Whether the store takes writes and claims right now: the error of the last batch of each kind, if it failed.
/// A server whose claims fail cannot run what it would acknowledge, so it reports NOT_SERVING and refuses
/// enqueues until a claim works again.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub writes: Option<StoreError>,
    pub claims: Option<StoreError>,
}

impl Faults {
    /// Why the store cannot serve, if it cannot.
    pub fn reason(&self) -> Option<&StoreError> {
        self.claims.as_ref().or(self.writes.as_ref())
    }
}

impl Writer {
    /// Starts the write task for the server `owner`. `enqueued` is notified after each commit that stored or
    /// revived jobs; `events` hears of the jobs a commit cancelled because a job they run after did not complete.
    pub fn spawn(
        store: Arc<dyn Store>,
        settings: Arc<RwLock<Settings>>,
        enqueued: Arc<Notify>,
        events: Events,
        owner: String,
    ) -> Writer {
        Writer::spawn_with_capacity(store, settings, enqueued, events, owner, QUEUE_CAPACITY)
    }

    fn spawn_with_capacity(
        store: Arc<dyn Store>,
        settings: Arc<RwLock<Settings>>,
        enqueued: Arc<Notify>,
        events: Events,
        owner: String,
        capacity: usize,
    ) -> Writer {
        let (ops, receiver) = mpsc::channel(capacity);
        let (faults, faults_seen) = watch::channel(Faults::default());
        let told = Told { enqueued, events };
        tokio::spawn(write_loop(store, settings, told, owner, receiver, faults));
        Writer {
            ops,
            faults: faults_seen,
        }
    }

    /// The store's faults as the last batches met them; changes whenever one appears or clears.
    pub fn faults(&self) -> watch::Receiver<Faults> {
        self.faults.clone()
    }

    /// Stores one request's jobs, durably, together with whatever else is waiting to be written.
    pub async fn enqueue(&self, jobs: Vec<NewJob>) -> EnqueueResult {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Enqueue { jobs, reply }).await;
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Records that a run started and in which process group, so that a restart can kill what it left behind.
    pub async fn started(&self, start: RunStarted) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Start { start, reply }).await;
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Applies a guarded update; `Ok(false)` when the job was no longer in the expected state and run.
    pub async fn update(&self, update: GuardedUpdate, durable: bool) -> Result<bool, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Update {
            update,
            durable,
            reply,
        })
        .await;
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Stores output of a running attempt (not durably: a crash reruns the job anyway).
    pub async fn output(&self, write: OutputWrite) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Output { write, reply }).await;
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Makes several claims, each answered on its own (a claim the write task took in a later commit than another
    /// may fail alone), in order.
    pub async fn claim_each(&self, claims: Vec<Claim>) -> Vec<Result<Vec<Job>, StoreError>> {
        let mut answers = Vec::with_capacity(claims.len());
        for claim in claims {
            let (reply, answer) = oneshot::channel();
            self.send(Op::Claim { claim, reply }).await;
            answers.push(answer);
        }
        let mut claimed = Vec::with_capacity(answers.len());
        for answer in answers {
            claimed.push(answer.await.unwrap_or_else(|_| Err(closed())));
        }
        claimed
    }

    /// Applies a worker's finished run and claims its next job, in one commit when the write task is not busy
    /// (both are queued, the update first, before either answer is awaited). With `start`, the shell that waits for
    /// the next job is recorded as its start in the same commit.
    pub async fn finish_and_claim(
        &self,
        update: GuardedUpdate,
        start: Option<ClaimStart>,
    ) -> (Result<bool, StoreError>, Result<Vec<Job>, StoreError>) {
        let (update_reply, applied) = oneshot::channel();
        let (claim_reply, claimed) = oneshot::channel();
        self.send(Op::Update {
            update,
            durable: false,
            reply: update_reply,
        })
        .await;
        self.send(Op::Claim {
            claim: Claim { limit: 1, start },
            reply: claim_reply,
        })
        .await;
        (
            applied.await.unwrap_or_else(|_| Err(closed())),
            claimed.await.unwrap_or_else(|_| Err(closed())),
        )
    }

    /// Queues `op` for the write task, waiting for room while the queue is full.
    async fn send(&self, op: Op) {
        // A send fails only once the write task is gone; the dropped reply then reports it.
        let _ = self.ops.send(op).await;
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the server is shutting down".into())
}

/// Who the write task tells what its commits did, beyond the callers it answers.
struct Told {
    /// Woken when a commit may have given idle workers something to do.
    enqueued: Arc<Notify>,
    /// Hears of jobs a commit cancelled as dependents.
    events: Events,
}

async fn write_loop(
    store: Arc<dyn Store>,
    settings: Arc<RwLock<Settings>>,
    told: Told,
    owner: String,
    mut receiver: mpsc::Receiver<Op>,
    faults: watch::Sender<Faults>,
) {
    let mut ops = Vec::new();
    while receiver.recv_many(&mut ops, MAX_BATCH).await > 0 {
        let mut batch = WriteBatch {
            owner: owner.clone(),
            ..WriteBatch::default()
        };
        let mut enqueue_replies = Vec::new();
        let mut start_replies = Vec::new();
        let mut update_replies = Vec::new();
        let mut claim_replies = Vec::new();
        let mut output_replies = Vec::new();
        for op in ops.drain(..) {
            match op {
                Op::Enqueue { jobs, reply } => {
                    batch.enqueues.push(jobs);
                    enqueue_replies.push(reply);
                    batch.durable = true;
                }
                Op::Start { start, reply } => {
                    batch.starts.push(start);
                    start_replies.push(reply);
                }
                Op::Update {
                    update,
                    durable,
                    reply,
                } => {
                    batch.updates.push(update);
                    update_replies.push(reply);
                    batch.durable |= durable;
                }
                Op::Claim { claim, reply } => {
                    batch.claims.push(claim);
                    claim_replies.push(reply);
                }
                Op::Output { write, reply } => {
                    batch.outputs.push(write);
                    output_replies.push(reply);
                }
            }
        }
        let policy = settings.read().expect("settings lock").policy();
        let batch = Arc::new(batch);
        let result = store.write(Arc::clone(&batch), clock::now(), policy).await;
        let claimed = !batch.claims.is_empty();
        faults.send_if_modified(|faults| {
            let error = result.as_ref().err();
            let mut changed = faults.writes.is_some() != error.is_some();
            faults.writes = error.cloned();
            if claimed {
                changed |= faults.claims.is_some() != error.is_some();
                faults.claims = error.cloned();
            }
            changed
        });
        match result {
            Ok(outcome) => {
                let woke_jobs = crate::store::wakes_workers(&batch, &outcome);
                for (reply, result) in enqueue_replies.into_iter().zip(outcome.enqueued) {
                    let _ = reply.send(Ok(result));
                }
                for reply in start_replies.into_iter().chain(output_replies) {
                    let _ = reply.send(Ok(()));
                }
                for (reply, applied) in update_replies.into_iter().zip(outcome.applied) {
                    let _ = reply.send(Ok(applied));
                }
                for (reply, claimed) in claim_replies.into_iter().zip(outcome.claimed) {
                    let _ = reply.send(Ok(claimed));
                }
                for (job_id, error) in outcome.cancelled {
                    told.events.emit(Event::JobCancelled {
                        job_id: job_id.into(),
                        error,
                    });
                }
                if woke_jobs {
                    told.enqueued.notify_one();
                }
            }
            Err(error) => {
                tracing::error!(%error, writes = batch.updates.len() + batch.enqueues.len(), "write failed");
                for reply in enqueue_replies {
                    let _ = reply.send(Err(error.clone()));
                }
                for reply in start_replies.into_iter().chain(output_replies) {
                    let _ = reply.send(Err(error.clone()));
                }
                for reply in update_replies {
                    let _ = reply.send(Err(error.clone()));
                }
                for reply in claim_replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Mutex;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::job::{JobState, Micros, Policy, Settled};
    use crate::store::{ListFilter, OutputPage, Page, RunRecord, StateCounts, WriteOutcome};

    /// How long a test waits for something that should happen at once.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// A store that only writes: it keeps a copy of each batch, answers it the way a database would (see
    /// [`FakeStore::answer`]), fails while told to, and holds its writes while its gate is shut.
    struct FakeStore {
        batches: Mutex<Vec<WriteBatch>>,
        /// Per batch, whether it should wake the workers by [`crate::store::wakes_workers`].
        wakes: Mutex<Vec<bool>>,
        failure: Mutex<Option<StoreError>>,
        gate: watch::Sender<bool>,
        /// How many writes began, held at the gate or not.
        entered: watch::Sender<usize>,
    }

    impl FakeStore {
        fn new() -> Arc<FakeStore> {
            Arc::new(FakeStore {
                batches: Mutex::new(Vec::new()),
                wakes: Mutex::new(Vec::new()),
                failure: Mutex::new(None),
                gate: watch::channel(true).0,
                entered: watch::channel(0).0,
            })
        }

        fn batches(&self) -> std::sync::MutexGuard<'_, Vec<WriteBatch>> {
            self.batches.lock().unwrap()
        }

        fn fail_with(&self, failure: Option<StoreError>) {
            *self.failure.lock().unwrap() = failure;
        }

        fn shut(&self) {
            self.gate.send_replace(false);
        }

        fn open(&self) {
            self.gate.send_replace(true);
        }

        /// Waits until `count` writes began.
        async fn entered(&self, count: usize) {
            let mut entered = self.entered.subscribe();
            tokio::time::timeout(PATIENCE, entered.wait_for(|entered| *entered >= count))
                .await
                .expect("the write task reached the store")
                .expect("the store lives");
        }

        /// Enqueues succeed with a job per request entry (`jobN` unless the entry names its id) unless an id is
        /// `taken`; updates apply unless their job id starts with `stale`; claim `i` of limit `n` gets jobs
        /// `claim<i>.0` .. `claim<i>.<n-1>`.
        fn answer(batch: &WriteBatch) -> WriteOutcome {
            let mut next_id = 0;
            let enqueued = batch
                .enqueues
                .iter()
                .map(|jobs| {
                    if jobs.iter().any(|job| job.id.as_deref() == Some("taken")) {
                        return Err(EnqueueRejected::DuplicateId("taken".into()));
                    }
                    Ok(jobs
                        .iter()
                        .map(|new| {
                            next_id += 1;
                            let id = new.id.clone().unwrap_or(format!("job{next_id}"));
                            job(&id, &new.command, JobState::Pending)
                        })
                        .collect())
                })
                .collect();
            let applied = batch
                .updates
                .iter()
                .map(|update| !update.job_id.starts_with("stale"))
                .collect();
            let claimed = batch
                .claims
                .iter()
                .enumerate()
                .map(|(n_claim, claim)| {
                    (0..claim.limit)
                        .map(|n| job(&format!("claim{n_claim}.{n}"), "true", JobState::Processing))
                        .collect()
                })
                .collect();
            WriteOutcome {
                enqueued,
                applied,
                claimed,
                ..WriteOutcome::default()
            }
        }
    }

    #[async_trait]
    impl Store for FakeStore {
        async fn write(
            &self,
            batch: Arc<WriteBatch>,
            _now: crate::job::Micros,
            _policy: Policy,
        ) -> Result<WriteOutcome, StoreError> {
            self.entered.send_modify(|entered| *entered += 1);
            let mut gate = self.gate.subscribe();
            let _ = gate.wait_for(|open| *open).await;
            self.batches().push(WriteBatch {
                enqueues: batch.enqueues.clone(),
                starts: batch.starts.clone(),
                updates: batch.updates.clone(),
                outputs: batch.outputs.clone(),
                claims: batch.claims.clone(),
                owner: batch.owner.clone(),
                durable: batch.durable,
            });
            if let Some(failure) = self.failure.lock().unwrap().clone() {
                return Err(failure);
            }
            let outcome = FakeStore::answer(&batch);
            self.wakes
                .lock()
                .unwrap()
                .push(crate::store::wakes_workers(&batch, &outcome));
            Ok(outcome)
        }

        async fn next_due(&self, _now: crate::job::Micros) -> Result<Option<Duration>, StoreError> {
            Ok(None)
        }

        async fn in_flight(&self, _owner: &str) -> Result<Vec<crate::store::InFlight>, StoreError> {
            Ok(Vec::new())
        }

        async fn get(&self, _id: &str) -> Result<Option<Job>, StoreError> {
            Ok(None)
        }

        async fn list(&self, _filter: &ListFilter) -> Result<Page, StoreError> {
            Ok(Page {
                jobs: Vec::new(),
                positions: Vec::new(),
                next: None,
            })
        }

        async fn counts(&self) -> Result<StateCounts, StoreError> {
            Ok(StateCounts::default())
        }

        async fn newest_time(&self) -> Result<Option<crate::job::Micros>, StoreError> {
            Ok(None)
        }

        async fn oldest_pending(&self) -> Result<Option<crate::job::Micros>, StoreError> {
            Ok(None)
        }

        async fn runs(&self, _id: &str) -> Result<Vec<RunRecord>, StoreError> {
            Ok(Vec::new())
        }

        async fn output(
            &self,
            _id: &str,
            _run: u32,
            _from: u64,
            _budget: usize,
        ) -> Result<OutputPage, StoreError> {
            Ok(OutputPage::default())
        }

        async fn load_config(&self) -> Result<Vec<(String, String)>, StoreError> {
            Ok(Vec::new())
        }

        async fn save_config(
            &self,
            _key: &str,
            _value: &str,
            _rekey: Option<Policy>,
        ) -> Result<(), StoreError> {
            Ok(())
        }

        async fn delete_final(&self, _ids: &[&str]) -> Result<Vec<String>, StoreError> {
            Ok(Vec::new())
        }

        async fn purge(
            &self,
            _state: JobState,
            _older_than: Micros,
            _limit: u32,
        ) -> Result<u64, StoreError> {
            Ok(0)
        }

        async fn reset(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    fn job(id: &str, command: &str, state: JobState) -> Job {
        Job {
            id: id.into(),
            seq: 1,
            command: command.into(),
            state,
            attempts: 0,
            max_retries: 3,
            priority: 5,
            timeout_secs: None,
            runs: u32::from(state == JobState::Processing),
            interruptions: 0,
            created_at: 0,
            updated_at: 0,
            run_after: 0,
            last_error: None,
            after: Vec::new(),
            context: Default::default(),
        }
    }

    fn new_job(id: Option<&str>, command: &str) -> NewJob {
        NewJob {
            id: id.map(str::to_owned),
            command: command.into(),
            priority: 5,
            max_retries: 3,
            timeout_secs: None,
            delay: 0,
            after: Vec::new(),
            context: Default::default(),
        }
    }

    fn start(job_id: &str) -> RunStarted {
        RunStarted {
            job_id: job_id.into(),
            seq: 1,
            run: 1,
            worker: 0,
            pgid: Some(4242),
            started_at: 0,
        }
    }

    /// Moves `job_id` from processing at run 1 to `state`.
    fn update(job_id: &str, state: JobState) -> GuardedUpdate {
        GuardedUpdate {
            job_id: job_id.into(),
            seq: 1,
            expect_state: JobState::Processing,
            expect_runs: 1,
            settled: Settled {
                state,
                attempts: 0,
                interruptions: 0,
                run_after: 0,
                queue_key: 0,
                last_error: None,
            },
            ended: None,
        }
    }

    fn writer_for(store: &Arc<FakeStore>, capacity: usize) -> (Writer, Arc<Notify>) {
        let enqueued = Arc::new(Notify::new());
        let writer = Writer::spawn_with_capacity(
            store.clone(),
            Arc::new(RwLock::new(Settings::default())),
            enqueued.clone(),
            Events::new(16),
            "server-a".into(),
            capacity,
        );
        (writer, enqueued)
    }

    /// How many operations wait in the writer's queue.
    fn queued(writer: &Writer) -> usize {
        writer.ops.max_capacity() - writer.ops.capacity()
    }

    /// Waits until `count` operations wait in the writer's queue.
    async fn until_queued(writer: &Writer, count: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while queued(writer) < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{count} operations queued in time"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Polls `future` once: its output if it is ready at once.
    fn ready_now<F: Future>(future: std::pin::Pin<&mut F>) -> Option<F::Output> {
        match future.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        }
    }

    /// Holds the write task in a first batch (a start of `primer`), so that whatever is sent next queues up.
    async fn hold_write_task(
        store: &Arc<FakeStore>,
        writer: &Writer,
    ) -> tokio::task::JoinHandle<Result<(), StoreError>> {
        store.shut();
        let primer = tokio::spawn({
            let writer = writer.clone();
            async move { writer.started(start("primer")).await }
        });
        store.entered(1).await;
        primer
    }

    /// Answers of one operation of each kind, sent together.
    struct Group {
        enqueue: tokio::task::JoinHandle<EnqueueResult>,
        rejected: tokio::task::JoinHandle<EnqueueResult>,
        started: tokio::task::JoinHandle<Result<(), StoreError>>,
        applied: tokio::task::JoinHandle<Result<bool, StoreError>>,
        stale: tokio::task::JoinHandle<Result<bool, StoreError>>,
        claim_two: tokio::task::JoinHandle<Result<Vec<Job>, StoreError>>,
        claim_one: tokio::task::JoinHandle<Result<Vec<Job>, StoreError>>,
    }

    const GROUP_SIZE: usize = 7;

    /// Sends the operations of a [`Group`] concurrently, and waits until they all queued.
    async fn send_group(writer: &Writer) -> Group {
        let w = writer.clone();
        let enqueue = tokio::spawn(async move {
            w.enqueue(vec![
                new_job(None, "echo a"),
                new_job(Some("mine"), "echo b"),
            ])
            .await
        });
        let w = writer.clone();
        let rejected =
            tokio::spawn(async move { w.enqueue(vec![new_job(Some("taken"), "echo c")]).await });
        let w = writer.clone();
        let started = tokio::spawn(async move { w.started(start("s1")).await });
        let w = writer.clone();
        let applied =
            tokio::spawn(async move { w.update(update("u1", JobState::Completed), false).await });
        let w = writer.clone();
        let stale =
            tokio::spawn(
                async move { w.update(update("stale1", JobState::Completed), false).await },
            );
        let w = writer.clone();
        let claim_two = tokio::spawn(async move { w.claim(2).await });
        let w = writer.clone();
        let claim_one = tokio::spawn(async move { w.claim(1).await });
        until_queued(writer, GROUP_SIZE).await;
        Group {
            enqueue,
            rejected,
            started,
            applied,
            stale,
            claim_two,
            claim_one,
        }
    }

    fn ids(jobs: &[Job]) -> Vec<&str> {
        jobs.iter().map(|job| job.id.as_str()).collect()
    }

    #[tokio::test]
    async fn operations_sent_together_share_one_batch_and_each_caller_gets_its_own_answer() {
        let store = FakeStore::new();
        let (writer, _) = writer_for(&store, 64);
        let primer = hold_write_task(&store, &writer).await;
        let group = send_group(&writer).await;
        store.open();
        primer.await.unwrap().unwrap();

        let enqueued = group.enqueue.await.unwrap().unwrap().unwrap();
        assert_eq!(ids(&enqueued), ["job1", "mine"]);
        assert_eq!(enqueued[0].command, "echo a");
        assert_eq!(
            group.rejected.await.unwrap().unwrap(),
            Err(EnqueueRejected::DuplicateId("taken".into()))
        );
        group.started.await.unwrap().unwrap();
        assert!(group.applied.await.unwrap().unwrap());
        assert!(!group.stale.await.unwrap().unwrap());
        let two = group.claim_two.await.unwrap().unwrap();
        let one = group.claim_one.await.unwrap().unwrap();
        // The claims were queued in some order; each got as many jobs as it asked for, none shared.
        assert_eq!(two.len(), 2);
        assert_eq!(one.len(), 1);
        assert!(ids(&one).iter().all(|id| !ids(&two).contains(id)));

        let batches = store.batches();
        assert_eq!(
            batches.len(),
            2,
            "the primer's batch, then one for the group"
        );
        assert_eq!(batches[0].starts.len(), 1);
        let group = &batches[1];
        assert_eq!(group.owner, "server-a");
        assert_eq!(group.enqueues.len(), 2);
        assert_eq!(group.starts.len(), 1);
        assert_eq!(group.updates.len(), 2);
        let mut claims: Vec<u32> = group.claims.iter().map(|claim| claim.limit).collect();
        claims.sort_unstable();
        assert_eq!(claims, [1, 2]);
    }

    impl Writer {
        /// One claim of up to `limit` jobs, as the scheduler makes for idle workers without waiting shells.
        async fn claim(&self, limit: u32) -> Result<Vec<Job>, StoreError> {
            let mut answers = self.claim_each(vec![Claim::up_to(limit)]).await;
            answers.pop().expect("one answer per claim")
        }
    }

    /// A shell waiting for a worker's next job.
    const GATE: ClaimStart = ClaimStart {
        worker: 3,
        pgid: Some(4242),
    };

    #[tokio::test]
    async fn finish_and_claim_shares_one_batch_with_the_next_jobs_start() {
        let store = FakeStore::new();
        let (writer, _) = writer_for(&store, 64);
        let primer = hold_write_task(&store, &writer).await;
        let finish = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .finish_and_claim(update("u1", JobState::Completed), Some(GATE))
                    .await
            }
        });
        until_queued(&writer, 2).await;
        store.open();
        primer.await.unwrap().unwrap();
        let (applied, claimed) = finish.await.unwrap();
        assert!(applied.unwrap());
        assert_eq!(ids(&claimed.unwrap()), ["claim0.0"]);
        let batches = store.batches();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[1].updates.len(), 1);
        assert_eq!(
            batches[1].claims,
            [Claim {
                limit: 1,
                start: Some(GATE)
            }]
        );
        assert!(!batches[1].durable);
    }

    #[tokio::test]
    async fn finish_and_claim_queues_its_update_before_its_claim() {
        // A writer whose queue the test reads itself, in the write task's place.
        let (ops, mut receiver) = mpsc::channel(4);
        let writer = Writer {
            ops,
            faults: watch::channel(Faults::default()).1,
        };
        let finish = tokio::spawn(async move {
            writer
                .finish_and_claim(update("u1", JobState::Completed), None)
                .await
        });
        let first = tokio::time::timeout(PATIENCE, receiver.recv())
            .await
            .unwrap();
        let Some(Op::Update {
            update,
            durable: false,
            reply: update_reply,
        }) = first
        else {
            panic!("the update comes first, not durable");
        };
        assert_eq!(update.job_id, "u1");
        let second = tokio::time::timeout(PATIENCE, receiver.recv())
            .await
            .unwrap();
        let Some(Op::Claim {
            claim: Claim {
                limit: 1,
                start: None,
            },
            reply: claim_reply,
        }) = second
        else {
            panic!("a claim of one job comes second");
        };
        update_reply.send(Ok(true)).unwrap();
        claim_reply.send(Ok(Vec::new())).unwrap();
        let (applied, claimed) = finish.await.unwrap();
        assert!(applied.unwrap());
        assert!(claimed.unwrap().is_empty());
    }

    #[tokio::test]
    async fn only_batches_with_an_enqueue_or_a_durable_update_are_durable() {
        let store = FakeStore::new();
        let (writer, _) = writer_for(&store, 64);
        writer
            .enqueue(vec![new_job(None, "true")])
            .await
            .unwrap()
            .unwrap();
        writer
            .update(update("u1", JobState::Completed), false)
            .await
            .unwrap();
        writer
            .update(update("u2", JobState::Completed), true)
            .await
            .unwrap();
        writer.started(start("s1")).await.unwrap();
        writer.claim(1).await.unwrap();
        let durable: Vec<bool> = store.batches().iter().map(|batch| batch.durable).collect();
        assert_eq!(durable, [true, false, true, false, false]);
    }

    #[tokio::test]
    async fn a_failed_write_answers_every_caller_with_its_error_and_is_a_fault_until_a_write_works()
    {
        let store = FakeStore::new();
        let (writer, _) = writer_for(&store, 64);
        let faults = writer.faults();
        store.fail_with(Some(StoreError::Full("disk full".into())));

        let primer = hold_write_task(&store, &writer).await;
        let group = send_group(&writer).await;
        store.open();
        assert!(
            primer.await.unwrap().is_err(),
            "the primer's write failed too"
        );
        let expected = "the database is out of space: disk full";
        let error = |result: Result<(), StoreError>| result.unwrap_err().to_string();
        assert_eq!(error(group.enqueue.await.unwrap().map(drop)), expected);
        assert_eq!(error(group.rejected.await.unwrap().map(drop)), expected);
        assert_eq!(error(group.started.await.unwrap()), expected);
        assert_eq!(error(group.applied.await.unwrap().map(drop)), expected);
        assert_eq!(error(group.stale.await.unwrap().map(drop)), expected);
        assert_eq!(error(group.claim_two.await.unwrap().map(drop)), expected);
        assert_eq!(error(group.claim_one.await.unwrap().map(drop)), expected);
        {
            let faults = faults.borrow();
            assert!(matches!(faults.writes, Some(StoreError::Full(_))));
            assert!(matches!(faults.claims, Some(StoreError::Full(_))));
            assert!(matches!(faults.reason(), Some(StoreError::Full(_))));
        }

        // A good write without a claim clears the write fault; only a claim that works clears the claim fault.
        store.fail_with(None);
        writer.started(start("s2")).await.unwrap();
        assert!(faults.borrow().writes.is_none());
        assert!(faults.borrow().claims.is_some());
        writer.claim(1).await.unwrap();
        assert!(faults.borrow().writes.is_none());
        assert!(faults.borrow().claims.is_none());
        assert!(faults.borrow().reason().is_none());
    }

    #[tokio::test]
    async fn a_failed_batch_without_claims_leaves_the_claims_fault_alone() {
        let store = FakeStore::new();
        let (writer, _) = writer_for(&store, 64);
        let faults = writer.faults();
        store.fail_with(Some(StoreError::Unavailable("locked".into())));
        let failed = writer
            .update(update("u1", JobState::Completed), false)
            .await;
        assert!(matches!(failed, Err(StoreError::Unavailable(_))));
        assert!(matches!(
            faults.borrow().writes,
            Some(StoreError::Unavailable(_))
        ));
        assert!(faults.borrow().claims.is_none());
        store.fail_with(None);
        assert!(
            writer
                .update(update("u1", JobState::Completed), false)
                .await
                .unwrap()
        );
        assert!(faults.borrow().writes.is_none());
    }

    #[tokio::test]
    async fn workers_are_woken_after_a_batch_that_enqueued_and_not_after_a_start() {
        let store = FakeStore::new();
        let (writer, enqueued) = writer_for(&store, 64);

        writer.started(start("s1")).await.unwrap();
        // The write task handles one batch after the other: once the second is answered, the first is done.
        writer.started(start("s2")).await.unwrap();
        assert!(
            ready_now(pin!(enqueued.notified())).is_none(),
            "a batch of starts woke the workers"
        );

        writer
            .enqueue(vec![new_job(None, "true")])
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(PATIENCE, enqueued.notified())
            .await
            .expect("an enqueue wakes the workers");

        // A retry that goes back to waiting wakes them too; a job that completed does not.
        writer
            .update(update("u1", JobState::Completed), false)
            .await
            .unwrap();
        writer.started(start("s3")).await.unwrap();
        assert!(ready_now(pin!(enqueued.notified())).is_none());
        writer
            .update(update("u2", JobState::Failed), false)
            .await
            .unwrap();
        tokio::time::timeout(PATIENCE, enqueued.notified())
            .await
            .expect("a job back to waiting wakes the workers");

        assert_eq!(
            *store.wakes.lock().unwrap(),
            [false, false, true, false, false, true],
            "the writer woke the workers exactly when wakes_workers said so"
        );
    }

    #[tokio::test]
    async fn a_full_queue_holds_senders_back_until_the_write_task_takes_more() {
        const CAPACITY: usize = 4;
        let store = FakeStore::new();
        let (writer, _) = writer_for(&store, CAPACITY);
        let primer = hold_write_task(&store, &writer).await;

        let mut answers = Vec::new();
        let mut op = || {
            let (reply, answer) = oneshot::channel();
            answers.push(answer);
            Op::Claim {
                claim: Claim::up_to(1),
                reply,
            }
        };
        for _ in 0..CAPACITY {
            assert!(
                ready_now(pin!(writer.send(op()))).is_some(),
                "a send with room in the queue completes at once"
            );
        }
        assert_eq!(queued(&writer), CAPACITY);
        let mut extra_one = pin!(writer.send(op()));
        let mut extra_two = pin!(writer.send(op()));
        assert!(
            ready_now(extra_one.as_mut()).is_none(),
            "a send waits for room"
        );
        assert!(
            ready_now(extra_two.as_mut()).is_none(),
            "a send waits for room"
        );
        // Still held: nothing gave room meanwhile.
        assert!(ready_now(extra_one.as_mut()).is_none());

        store.open();
        tokio::time::timeout(PATIENCE, async {
            extra_one.await;
            extra_two.await;
        })
        .await
        .expect("the held sends complete once the write task takes more");
        primer.await.unwrap().unwrap();
        assert_eq!(answers.len(), CAPACITY + 2);
        for answer in answers {
            let claimed = tokio::time::timeout(PATIENCE, answer)
                .await
                .expect("every held operation is answered")
                .expect("the write task answered");
            assert_eq!(claimed.unwrap().len(), 1);
        }
        let claims: usize = store.batches().iter().map(|batch| batch.claims.len()).sum();
        assert_eq!(claims, CAPACITY + 2);
    }

    #[tokio::test]
    async fn callers_are_told_when_the_write_task_is_gone() {
        let store = FakeStore::new();
        let (writer, _) = writer_for(&store, 4);
        let (ops, receiver) = mpsc::channel(4);
        drop(receiver);
        let orphan = Writer {
            ops,
            faults: writer.faults(),
        };
        let answer = orphan.claim(1).await;
        assert!(matches!(answer, Err(StoreError::Unavailable(_))));
    }
}
