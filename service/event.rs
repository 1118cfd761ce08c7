//! What the workers do, as a stream: `queuectl worker start`, `logs -f`, `wait` and the metrics follow it.

use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::job::{JobState, Micros, Outcome};
use crate::output::Stream;

/// An event as watchers get it: numbered in the order the server sent its events, and when.
#[derive(Clone, Debug)]
pub struct Stamped {
    /// From 1 at the server's start, one more for each event it sends.
    pub seq: u64,
    pub at: Micros,
    /// The server whose worker it was, when another server of a shared database; `None` for this one.
    pub server: Option<Arc<str>>,
    pub event: Event,
}

/// The server's stream of events. Cheap to clone; every clone numbers from the same counter.
#[derive(Clone)]
pub struct Events {
    sender: broadcast::Sender<Stamped>,
    /// The last number given; held while sending, so that events go out in the order of their numbers.
    last: Arc<Mutex<u64>>,
}

impl Events {
    /// A stream that keeps up to `capacity` events for its slowest watcher.
    pub fn new(capacity: usize) -> Events {
        Events {
            sender: broadcast::channel(capacity).0,
            last: Arc::default(),
        }
    }

    pub fn emit(&self, event: Event) {
        self.send(None, event);
    }

    /// Passes on an event of another server of a shared database, numbered among this server's own.
    pub fn relay(&self, server: Arc<str>, event: Event) {
        self.send(Some(server), event);
    }

    fn send(&self, server: Option<Arc<str>>, event: Event) {
        let mut last = self.last.lock().expect("event counter lock");
        *last += 1;
        let stamped = Stamped {
            seq: *last,
            at: crate::clock::now(),
            server,
            event,
        };
        // No subscriber is fine: nobody is watching.
        let _ = self.sender.send(stamped);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Stamped> {
        self.sender.subscribe()
    }
}

/// Worker activity, as `queuectl worker start` prints it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Event {
    WorkerStarted {
        worker: u32,
    },
    WorkerStopping {
        worker: u32,
    },
    WorkerExited {
        worker: u32,
    },
    JobPicked {
        worker: u32,
        job_id: Arc<str>,
        command: Arc<str>,
        run: u32,
    },
    /// Output of run `run`, stored now, from byte `offset` of the run's output.
    JobOutput {
        worker: u32,
        job_id: Arc<str>,
        run: u32,
        offset: u64,
        stream: Stream,
        data: Vec<u8>,
    },
    JobFinished {
        worker: u32,
        job_id: Arc<str>,
        run: u32,
        state: JobState,
        outcome: Outcome,
    },
    /// A job that was not running was cancelled; `error` is its `last_error`.
    JobCancelled {
        job_id: Arc<str>,
        error: String,
    },
}

impl Event {
    /// Whether the servers of a shared database pass the event on to each other: what a job did (its start, its
    /// end, its cancel), so that a watcher of any server sees it. Not output, which is read from the store, nor
    /// worker slots, which are each server's own.
    pub fn is_shared(&self) -> bool {
        matches!(
            self,
            Event::JobPicked { .. } | Event::JobFinished { .. } | Event::JobCancelled { .. }
        )
    }

    /// The job the event is about, if any.
    pub fn job_id(&self) -> Option<&str> {
        match self {
            Event::JobPicked { job_id, .. }
            | Event::JobOutput { job_id, .. }
            | Event::JobFinished { job_id, .. }
            | Event::JobCancelled { job_id, .. } => Some(job_id),
            Event::WorkerStarted { .. }
            | Event::WorkerStopping { .. }
            | Event::WorkerExited { .. } => None,
        }
    }
}
