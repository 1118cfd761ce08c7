//! Group commit: every write of the server goes through one task that applies whatever has queued up meanwhile
//! in a single transaction, so concurrent requests share one fsync instead of paying one each.

use std::sync::{Arc, RwLock};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::clock;
use crate::config::Settings;
use crate::job::{Job, NewJob};
use crate::store::{EnqueueRejected, GuardedUpdate, RunStarted, Store, StoreError, WriteBatch};

/// Writes per transaction at most, so that one huge backlog cannot hold the writer for long.
const MAX_BATCH: usize = 4096;

type EnqueueResult = Result<Result<Vec<Job>, EnqueueRejected>, StoreError>;

enum Op {
    Enqueue {
        jobs: Vec<NewJob>,
        reply: oneshot::Sender<EnqueueResult>,
    },
    Start(RunStarted),
    Update {
        update: GuardedUpdate,
        durable: bool,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
}

/// The handle to the write task. Cheap to clone; the task ends when the last handle is dropped.
#[derive(Clone)]
pub struct Writer {
    ops: mpsc::UnboundedSender<Op>,
}

impl Writer {
    /// Starts the write task. `enqueued` is notified after each commit that stored or revived jobs.
    pub fn spawn(
        store: Arc<dyn Store>,
        settings: Arc<RwLock<Settings>>,
        enqueued: Arc<Notify>,
    ) -> Writer {
        let (ops, receiver) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(store, settings, enqueued, receiver));
        Writer { ops }
    }

    /// Stores one request's jobs, durably, together with whatever else is waiting to be written.
    pub async fn enqueue(&self, jobs: Vec<NewJob>) -> EnqueueResult {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Enqueue { jobs, reply });
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Records that a run started; nobody waits for it, but it is written before any later update of the job.
    pub fn started(&self, start: RunStarted) {
        self.send(Op::Start(start));
    }

    /// Applies a guarded update; `Ok(false)` when the job was no longer in the expected state and run.
    pub async fn update(&self, update: GuardedUpdate, durable: bool) -> Result<bool, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Update {
            update,
            durable,
            reply,
        });
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    fn send(&self, op: Op) {
        // A send fails only once the write task is gone; the dropped reply then reports it.
        let _ = self.ops.send(op);
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the server is shutting down".into())
}

async fn write_loop(
    store: Arc<dyn Store>,
    settings: Arc<RwLock<Settings>>,
    enqueued: Arc<Notify>,
    mut receiver: mpsc::UnboundedReceiver<Op>,
) {
    let mut ops = Vec::new();
    while receiver.recv_many(&mut ops, MAX_BATCH).await > 0 {
        let mut batch = WriteBatch::default();
        let mut enqueue_replies = Vec::new();
        let mut update_replies = Vec::new();
        for op in ops.drain(..) {
            match op {
                Op::Enqueue { jobs, reply } => {
                    batch.enqueues.push(jobs);
                    enqueue_replies.push(reply);
                    batch.durable = true;
                }
                Op::Start(start) => batch.starts.push(start),
                Op::Update {
                    update,
                    durable,
                    reply,
                } => {
                    batch.updates.push(update);
                    update_replies.push(reply);
                    batch.durable |= durable;
                }
            }
        }
        let policy = settings.read().expect("settings lock").policy();
        match store.write(&batch, clock::now(), policy).await {
            Ok(outcome) => {
                let woke_jobs = outcome.enqueued.iter().any(Result::is_ok)
                    || batch
                        .updates
                        .iter()
                        .zip(&outcome.applied)
                        .any(|(update, applied)| {
                            *applied && update.settled.state == crate::job::JobState::Pending
                        });
                for (reply, result) in enqueue_replies.into_iter().zip(outcome.enqueued) {
                    let _ = reply.send(Ok(result));
                }
                for (reply, applied) in update_replies.into_iter().zip(outcome.applied) {
                    let _ = reply.send(Ok(applied));
                }
                if woke_jobs {
                    enqueued.notify_one();
                }
            }
            Err(error) => {
                tracing::error!(%error, writes = batch.updates.len() + batch.enqueues.len(), "write failed");
                for reply in enqueue_replies {
                    let _ = reply.send(Err(error.clone()));
                }
                for reply in update_replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}
