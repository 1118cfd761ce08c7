//! Group commit: every write of the server goes through one task that applies whatever has queued up meanwhile
//! in a single transaction, so concurrent requests share one fsync instead of paying one each.

use std::sync::{Arc, RwLock};

use tokio::sync::{Notify, mpsc, oneshot, watch};

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
        limit: u32,
        reply: oneshot::Sender<Result<Vec<Job>, StoreError>>,
    },
}

/// The handle to the write task. Cheap to clone; the task ends when the last handle is dropped.
#[derive(Clone)]
pub struct Writer {
    ops: mpsc::UnboundedSender<Op>,
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
    /// revived jobs.
    pub fn spawn(
        store: Arc<dyn Store>,
        settings: Arc<RwLock<Settings>>,
        enqueued: Arc<Notify>,
        owner: String,
    ) -> Writer {
        let (ops, receiver) = mpsc::unbounded_channel();
        let (faults, faults_seen) = watch::channel(Faults::default());
        tokio::spawn(write_loop(
            store, settings, enqueued, owner, receiver, faults,
        ));
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
        self.send(Op::Enqueue { jobs, reply });
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Records that a run started and in which process group, so that a restart can kill what it left behind.
    pub async fn started(&self, start: RunStarted) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Start { start, reply });
        answer.await.unwrap_or_else(|_| Err(closed()))
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

    /// Claims up to `limit` ready jobs for this server, in the next commit.
    pub async fn claim(&self, limit: u32) -> Result<Vec<Job>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Claim { limit, reply });
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Applies a worker's finished run and claims its next job, in one commit when the write task is not busy
    /// (both are queued before either is awaited).
    pub async fn finish_and_claim(
        &self,
        update: GuardedUpdate,
    ) -> (Result<bool, StoreError>, Result<Vec<Job>, StoreError>) {
        let (update_reply, applied) = oneshot::channel();
        let (claim_reply, claimed) = oneshot::channel();
        self.send(Op::Update {
            update,
            durable: false,
            reply: update_reply,
        });
        self.send(Op::Claim {
            limit: 1,
            reply: claim_reply,
        });
        (
            applied.await.unwrap_or_else(|_| Err(closed())),
            claimed.await.unwrap_or_else(|_| Err(closed())),
        )
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
    owner: String,
    mut receiver: mpsc::UnboundedReceiver<Op>,
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
                Op::Claim { limit, reply } => {
                    batch.claims.push(limit);
                    claim_replies.push(reply);
                }
            }
        }
        let policy = settings.read().expect("settings lock").policy();
        let result = store.write(&batch, clock::now(), policy).await;
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
                for reply in start_replies {
                    let _ = reply.send(Ok(()));
                }
                for (reply, applied) in update_replies.into_iter().zip(outcome.applied) {
                    let _ = reply.send(Ok(applied));
                }
                for (reply, claimed) in claim_replies.into_iter().zip(outcome.claimed) {
                    let _ = reply.send(Ok(claimed));
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
                for reply in start_replies {
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
