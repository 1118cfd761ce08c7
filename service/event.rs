//! What the workers do, as a stream: `queuectl worker start`, `logs -f`, `wait` and the metrics follow it.

use std::sync::Arc;

use crate::job::{JobState, Outcome};
use crate::output::Stream;

/// Worker activity, as `queuectl worker start` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
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
