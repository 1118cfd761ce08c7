//! The executor of claimed jobs: for one worker slot, it gives the job to a shell held at its gate whose process
//! group is on record, lets the command run, settles the outcome by the job's rules, and takes the slot's next job
//! in the same commit as the finish, until none is ready or the slot stops. While a job runs, the shell for the
//! next one starts, so that the claim of the next job records its start: one commit per job.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use super::Shared;
use super::scheduler::requeue_unstarted;
use super::slots::Running;
use crate::clock;
use crate::event::Event;
use crate::job::{self, Job, JobState, Outcome};
use crate::output::{OutputWrite, Recording};
use crate::runner::{self, Piece, RunSpec};
use crate::store::{ClaimStart, GuardedUpdate, RunEnded, RunStarted, StoreError};

/// A result that could not be written is tried again after this, doubling up to [`FINISH_RETRY_MAX`].
const FINISH_RETRY_FIRST: Duration = Duration::from_millis(100);
const FINISH_RETRY_MAX: Duration = Duration::from_secs(5);

/// Output waits at most this long before it is written: `logs` of a running job is this far behind at most.
const OUTPUT_FLUSH: Duration = Duration::from_millis(100);

/// Pieces of output read from a command and not yet recorded, at most; past that the command waits.
const PIECES_IN_FLIGHT: usize = 8;

/// The most output one JobOutput event carries.
const EVENT_PIECE: usize = 8 * 1024;

/// Runs `job` on `worker`, then each job the worker claims as the previous one ends, then frees the slot.
/// `gate` is the shell whose start the job's claim recorded, if it did.
pub(super) async fn work(
    shared: Arc<Shared>,
    worker: u32,
    mut job: Job,
    mut gate: Option<runner::Gate>,
) {
    let unused = loop {
        match execute(&shared, worker, job, gate.take()).await {
            (Some(next), next_gate)
                if shared
                    .slots()
                    .move_on(worker, Running::of(&next, clock::now())) =>
            {
                job = next;
                gate = next_gate;
            }
            (Some(next), _) => {
                requeue_unstarted(&shared, next).await;
                break None;
            }
            (None, unused) => break unused,
        }
    };
    let exited = shared.slots().release(worker);
    if let Some(exited) = exited {
        shared.emit(exited);
    }
    if let Some(gate) = unused {
        shared.spare(gate);
    }
    shared.running.send_modify(|count| *count -= 1);
    shared.wake.notify_one();
}

/// Runs one claimed job on `worker` and settles it; `gate` is a shell recorded as the job's start by its claim.
/// Returns the job the worker claimed next, if it did, and the shell started for it: recorded by that claim, or
/// still waiting for a job when there was none.
async fn execute(
    shared: &Arc<Shared>,
    worker: u32,
    job: Job,
    gate: Option<runner::Gate>,
) -> (Option<Job>, Option<runner::Gate>) {
    let job_id: Arc<str> = job.id.as_str().into();
    shared.emit(Event::JobPicked {
        worker,
        job_id: job_id.clone(),
        command: job.command.as_str().into(),
        run: job.runs,
    });
    // Its start is on record in the database and in the events: at `info`, the log keeps one line per run, its end.
    tracing::debug!(job_id = %job.id, run = job.runs, worker, "job started");
    let report = run(shared, worker, &job, &job_id, gate).await;
    if let Outcome::NotStarted(reason) = &report.outcome {
        tracing::warn!(job_id = %job.id, run = job.runs, %reason,
            "could not start a job; it waits and runs again, without losing an attempt");
    }
    let policy = shared.settings.read().expect("settings lock").policy();
    let settled = job::settle(&job, &report.outcome, policy, clock::now());
    let state = settled.state;
    let update = GuardedUpdate {
        job_id: job.id.clone(),
        seq: job.seq,
        expect_state: JobState::Processing,
        expect_runs: job.runs,
        settled,
        ended: Some(RunEnded {
            worker,
            outcome: report.outcome.to_string(),
            output: report.output,
            truncated: report.truncated,
        }),
    };
    let (finished, next, next_gate) = if shared.slots().keeps_working(worker) {
        let start = report.next_gate.as_ref().map(|gate| ClaimStart {
            worker,
            pgid: gate.pgid().map(i64::from),
        });
        let (finished, next) = shared.writer.finish_and_claim(update.clone(), start).await;
        let finished = match finished {
            Err(_) => record_finish(shared, &update).await,
            applied => applied,
        };
        let next = next.unwrap_or_else(|error| {
            tracing::error!(%error, "claiming the next job failed");
            Vec::new()
        });
        (finished, next.into_iter().next(), report.next_gate)
    } else {
        (record_finish(shared, &update).await, None, None)
    };
    let last_output = update
        .ended
        .as_ref()
        .and_then(|ended| ended.output.as_ref());
    if let (Some(write), Ok(_)) = (last_output, &finished) {
        announce_output(shared, worker, &job_id, write);
    }
    match finished {
        Ok(true) => {
            tracing::info!(job_id = %job.id, run = job.runs, worker, %state, outcome = %report.outcome, "job finished");
        }
        Ok(false) => {
            tracing::warn!(job_id = %job.id, run = job.runs, "stale report rejected: the job moved on without this run");
        }
        Err(error) => {
            tracing::error!(job_id = %job.id, run = job.runs, %error, "recording the result failed while draining; a restart reruns the job");
        }
    }
    shared.emit(Event::JobFinished {
        worker,
        job_id,
        run: job.runs,
        state,
        outcome: report.outcome,
    });
    (next, next_gate)
}

/// How a run ended, its output not yet written, and the shell started meanwhile for the worker's next job.
struct Report {
    outcome: Outcome,
    output: Option<OutputWrite>,
    truncated: bool,
    next_gate: Option<runner::Gate>,
}

/// Gives the job to `gate`, or else to a shell started now whose start is recorded first (so that a restart can
/// kill what a crash left), then runs the command while its output is recorded.
async fn run(
    shared: &Shared,
    worker: u32,
    job: &Job,
    job_id: &Arc<str>,
    gate: Option<runner::Gate>,
) -> Report {
    let (timeout_secs, max_output) = {
        let settings = shared.settings.read().expect("settings lock");
        (
            job.timeout_secs.unwrap_or(settings.job_timeout_secs()),
            settings.max_output_bytes(),
        )
    };
    let gate = match gate {
        Some(gate) => Ok(gate),
        None => {
            let gate = spawn_gate(shared).started().await;
            record_start(shared, worker, job, gate.as_ref().ok()).await;
            gate
        }
    };
    let tag = runner::run_tag(&job.id, job.runs);
    let spec = RunSpec {
        command: &job.command,
        tag: &tag,
        timeout: (timeout_secs > 0).then(|| Duration::from_secs(timeout_secs)),
        context: &job.context,
    };
    let gated = match gate {
        Ok(gate) => gate.start(spec).await,
        Err(outcome) => Err(outcome),
    };
    // Started while this job runs, beside it; a shell that cannot start now leaves the next job to start its own.
    let next_gate = shared
        .slots()
        .keeps_working(worker)
        .then(|| spawn_gate(shared));
    let gated = match gated {
        Ok(gated) => gated,
        Err(outcome) => {
            return Report {
                outcome,
                output: None,
                truncated: false,
                next_gate: started(next_gate).await,
            };
        }
    };
    let (cancel, cancelled) = oneshot::channel();
    shared.cancels().insert(job_id.clone(), (job.runs, cancel));
    let (output, pieces) = mpsc::channel(PIECES_IN_FLIGHT);
    let mut recording = Recording::new(job.seq, job.runs, max_output);
    let (outcome, ()) = tokio::join!(
        gated.run(stopped(shared.abort.subscribe(), cancelled), output),
        record(shared, worker, job_id, &mut recording, pieces),
    );
    {
        let mut cancels = shared.cancels();
        if cancels.get(job_id).is_some_and(|(run, _)| *run == job.runs) {
            cancels.remove(job_id);
        }
    }
    Report {
        outcome,
        truncated: recording.truncated(),
        output: recording.take(),
        next_gate: started(next_gate).await,
    }
}

/// A held shell starting for a job.
enum Spawning {
    /// On a blocking thread: a spawn waits for the new process to start `sh` (a millisecond or more), and a worker
    /// thread of the runtime blocked that long holds up the tasks queued behind it.
    Thread(JoinHandle<Result<runner::Gate, Outcome>>),
    /// The benchmark's no-op executor starts no process, so it has nothing to hand to another thread.
    Done(Box<Result<runner::Gate, Outcome>>),
}

impl Spawning {
    async fn started(self) -> Result<runner::Gate, Outcome> {
        match self {
            Spawning::Thread(spawning) => spawning
                .await
                .unwrap_or_else(|error| Err(Outcome::NotStarted(error.to_string()))),
            Spawning::Done(gate) => *gate,
        }
    }
}

fn spawn_gate(shared: &Shared) -> Spawning {
    let server_id = shared.server_id.clone();
    if runner::noop_executor() {
        return Spawning::Done(Box::new(runner::Gate::spawn(&server_id)));
    }
    Spawning::Thread(tokio::task::spawn_blocking(move || {
        runner::Gate::spawn(&server_id)
    }))
}

/// The shell `spawning` started, if it did.
async fn started(spawning: Option<Spawning>) -> Option<runner::Gate> {
    spawning?.started().await.ok()
}

/// Records the start of a run whose shell was started for it, before the command runs.
async fn record_start(shared: &Shared, worker: u32, job: &Job, gate: Option<&runner::Gate>) {
    let started = shared
        .writer
        .started(RunStarted {
            job_id: job.id.clone(),
            seq: job.seq,
            run: job.runs,
            worker,
            pgid: gate.and_then(runner::Gate::pgid).map(i64::from),
            started_at: clock::now(),
        })
        .await;
    if let Err(error) = started {
        tracing::error!(job_id = %job.id, %error, "recording the start failed; a crash now could leave its processes behind");
    }
}

/// Records what a run prints until its command ends: each chunk is written once it is full or has waited
/// [`OUTPUT_FLUSH`], and announced once written. What is left when the command ends is written with its end.
async fn record(
    shared: &Shared,
    worker: u32,
    job_id: &Arc<str>,
    recording: &mut Recording,
    mut pieces: mpsc::Receiver<Piece>,
) {
    let mut due: Option<Instant> = None;
    loop {
        tokio::select! {
            piece = pieces.recv() => {
                let Some((stream, data)) = piece else { return };
                recording.push(stream, &data);
                due.get_or_insert_with(|| Instant::now() + OUTPUT_FLUSH);
                if !recording.full() {
                    continue;
                }
            }
            () = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
        }
        due = None;
        let Some(write) = recording.take() else {
            continue;
        };
        // While this waits for its commit, the command's pipes fill and hold it back: output never outruns the
        // database by more than a chunk.
        match shared.writer.output(write.clone()).await {
            Ok(()) => announce_output(shared, worker, job_id, &write),
            Err(error) => {
                tracing::warn!(%job_id, %error, "storing a job's output failed; that part is missing from its logs");
            }
        }
    }
}

/// Tells watchers about output that is stored now, piece by piece with its place in the run's output. Pieces
/// are at most [`EVENT_PIECE`] long, so that what a slow watcher holds stays small whatever a chunk holds.
fn announce_output(shared: &Shared, worker: u32, job_id: &Arc<str>, write: &OutputWrite) {
    for chunk in &write.chunks {
        for (stream, offset, data) in chunk.pieces() {
            for (n, piece) in data.chunks(EVENT_PIECE).enumerate() {
                shared.emit(Event::JobOutput {
                    worker,
                    job_id: job_id.clone(),
                    run: write.run,
                    offset: offset + (n * EVENT_PIECE) as u64,
                    stream,
                    data: piece.to_vec(),
                });
            }
        }
    }
}

/// Resolves when a run must stop before its command ends: interrupted when the server ends every run (a drain, a
/// reset, a lost lease), cancelled when someone cancels this one.
async fn stopped(
    mut abort: watch::Receiver<bool>,
    cancelled: oneshot::Receiver<String>,
) -> Outcome {
    let aborted = async move { abort.wait_for(|abort| *abort).await.is_ok() };
    tokio::select! {
        Ok(by) = cancelled => Outcome::Cancelled(by),
        true = aborted => Outcome::Interrupted,
        else => std::future::pending().await,
    }
}

/// Writes a finished run's update, retrying with a capped backoff while the database fails (locked, read-only),
/// so the job does not stay `processing` until a restart. Gives up only once the server drains.
async fn record_finish(shared: &Shared, update: &GuardedUpdate) -> Result<bool, StoreError> {
    let mut wait = FINISH_RETRY_FIRST;
    loop {
        match shared.writer.update(update.clone(), false).await {
            Err(error) if !shared.draining() => {
                tracing::warn!(job_id = %update.job_id, run = update.expect_runs, %error, retry_in = ?wait, "recording the result failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(FINISH_RETRY_MAX);
            }
            result => return result,
        }
    }
}
