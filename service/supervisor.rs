//! The worker supervisor: a set of worker slots, a scheduler that claims exactly as many jobs as there are idle
//! slots whenever something changes (an enqueue, a finished job, a retry coming due), and one task per running job.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, watch};
use tokio::time::{Instant, sleep_until};

use crate::clock;
use crate::config::Settings;
use crate::job::{self, Job, JobState, Micros, Outcome};
use crate::runner::{self, RunSpec};
use crate::store::{GuardedUpdate, RunEnded, RunStarted, Store, StoreError};
use crate::writer::Writer;

/// How long the scheduler waits before it tries the database again after an error.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// A result that could not be written is tried again after this, doubling up to [`FINISH_RETRY_MAX`].
const FINISH_RETRY_FIRST: Duration = Duration::from_millis(100);
const FINISH_RETRY_MAX: Duration = Duration::from_secs(5);

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
    JobOutput {
        worker: u32,
        job_id: Arc<str>,
        data: Vec<u8>,
    },
    JobFinished {
        worker: u32,
        job_id: Arc<str>,
        state: JobState,
        error: Option<String>,
    },
}

impl Event {
    /// The job the event is about, if any.
    pub fn job_id(&self) -> Option<&str> {
        match self {
            Event::JobPicked { job_id, .. }
            | Event::JobOutput { job_id, .. }
            | Event::JobFinished { job_id, .. } => Some(job_id),
            Event::WorkerStarted { .. }
            | Event::WorkerStopping { .. }
            | Event::WorkerExited { .. } => None,
        }
    }
}

/// What a busy worker runs.
#[derive(Clone, Debug)]
pub struct Running {
    pub job_id: Arc<str>,
    pub command: Arc<str>,
    pub started_at: Micros,
}

/// A worker slot as `status` shows it.
#[derive(Clone, Debug)]
pub struct WorkerView {
    pub index: u32,
    pub running: Option<Running>,
    pub stopping: bool,
}

#[derive(Default)]
struct Slot {
    running: Option<Running>,
    stopping: bool,
}

#[derive(Default)]
struct Slots {
    target: u32,
    slots: BTreeMap<u32, Slot>,
}

struct Shared {
    store: Arc<dyn Store>,
    writer: Writer,
    settings: Arc<RwLock<Settings>>,
    events: broadcast::Sender<Event>,
    slots: Mutex<Slots>,
    /// Wakes the scheduler: something may be claimable.
    wake: Arc<Notify>,
    /// `true` ends every running job now, as interrupted.
    abort: watch::Sender<bool>,
    /// How many jobs run right now.
    running: watch::Sender<usize>,
    /// Set once the server drains: nothing new starts.
    draining: AtomicBool,
}

#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

impl Supervisor {
    pub fn new(
        store: Arc<dyn Store>,
        writer: Writer,
        settings: Arc<RwLock<Settings>>,
        wake: Arc<Notify>,
    ) -> Supervisor {
        let (events, _) = broadcast::channel(4096);
        Supervisor {
            shared: Arc::new(Shared {
                store,
                writer,
                settings,
                events,
                slots: Mutex::default(),
                wake,
                abort: watch::Sender::new(false),
                running: watch::Sender::new(0),
                draining: AtomicBool::new(false),
            }),
        }
    }

    /// Returns to the queue every job a previous server left processing, after killing what is left of its
    /// processes. Call before [`Supervisor::start`].
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let in_flight = self.shared.store.in_flight().await?;
        let policy = self.policy();
        for stale in &in_flight {
            if let Some(pgid) = stale.pgid.and_then(|pgid| u32::try_from(pgid).ok()) {
                runner::kill_group(pgid);
            }
            let job = &stale.job;
            let update = GuardedUpdate {
                job_id: job.id.clone(),
                expect_state: JobState::Processing,
                expect_runs: job.runs,
                settled: job::settle(job, &Outcome::Interrupted, policy, clock::now()),
                ended: None,
            };
            self.shared.writer.update(update, true).await?;
            tracing::warn!(job_id = %job.id, run = job.runs, "recovered a job interrupted by a server stop");
        }
        Ok(in_flight.len())
    }

    /// Starts the scheduler.
    pub fn start(&self) {
        tokio::spawn(schedule(self.shared.clone()));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    fn policy(&self) -> job::Policy {
        self.shared.settings.read().expect("settings lock").policy()
    }

    /// Sets how many jobs run at once. Extra workers finish their current job, then exit.
    pub fn set_workers(&self, target: u32) {
        let shared = &self.shared;
        let mut slots = shared.slots.lock().expect("slots lock");
        slots.target = target;
        for index in 0..target {
            let slot = slots.slots.entry(index).or_insert_with(|| {
                shared.emit(Event::WorkerStarted { worker: index });
                Slot::default()
            });
            slot.stopping = false;
        }
        let surplus: Vec<u32> = slots
            .slots
            .range(target..)
            .map(|(index, _)| *index)
            .collect();
        for index in surplus {
            let slot = slots.slots.get_mut(&index).expect("listed above");
            if !slot.stopping {
                slot.stopping = true;
                shared.emit(Event::WorkerStopping { worker: index });
            }
            if slot.running.is_none() {
                slots.slots.remove(&index);
                shared.emit(Event::WorkerExited { worker: index });
            }
        }
        drop(slots);
        shared.wake.notify_one();
    }

    /// The configured worker count and every slot that exists.
    pub fn workers(&self) -> (u32, Vec<WorkerView>) {
        let slots = self.shared.slots.lock().expect("slots lock");
        let views = slots
            .slots
            .iter()
            .map(|(index, slot)| WorkerView {
                index: *index,
                running: slot.running.clone(),
                stopping: slot.stopping,
            })
            .collect();
        (slots.target, views)
    }

    pub fn running(&self) -> usize {
        *self.shared.running.borrow()
    }

    /// Waits until no job runs.
    pub async fn idle(&self) {
        let mut running = self.shared.running.subscribe();
        let _ = running.wait_for(|count| *count == 0).await;
    }

    /// Stops every worker and ends running jobs now, returning them to the queue.
    pub async fn abort_all(&self) {
        self.set_workers(0);
        self.shared.abort.send_replace(true);
        self.idle().await;
        self.shared.abort.send_replace(false);
    }

    /// Stops starting jobs; gives running jobs `grace` to finish, then ends them and returns them to the queue.
    pub async fn drain(&self, grace: Duration) {
        self.shared.draining.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        if tokio::time::timeout(grace, self.idle()).await.is_err() {
            tracing::warn!(
                running = self.running(),
                "grace period over, interrupting running jobs"
            );
            self.shared.abort.send_replace(true);
            self.idle().await;
        }
    }
}

impl Shared {
    fn emit(&self, event: Event) {
        // No subscriber is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    fn idle_slots(&self) -> Vec<u32> {
        let slots = self.slots.lock().expect("slots lock");
        slots
            .slots
            .iter()
            .filter(|(_, slot)| slot.running.is_none() && !slot.stopping)
            .map(|(index, _)| *index)
            .collect()
    }

    /// Marks `worker` busy with `job`; false if the slot went away since it was found idle.
    fn occupy(&self, worker: u32, job: &Job) -> bool {
        let mut slots = self.slots.lock().expect("slots lock");
        let Some(slot) = slots
            .slots
            .get_mut(&worker)
            .filter(|slot| slot.running.is_none() && !slot.stopping)
        else {
            return false;
        };
        slot.running = Some(Running {
            job_id: job.id.as_str().into(),
            command: job.command.as_str().into(),
            started_at: clock::now(),
        });
        self.running.send_modify(|count| *count += 1);
        true
    }

    fn release(&self, worker: u32) {
        let mut slots = self.slots.lock().expect("slots lock");
        let target = slots.target;
        if let Some(slot) = slots.slots.get_mut(&worker) {
            slot.running = None;
            if slot.stopping || worker >= target {
                slots.slots.remove(&worker);
                self.emit(Event::WorkerExited { worker });
            }
        }
        drop(slots);
        self.running.send_modify(|count| *count -= 1);
        self.wake.notify_one();
    }
}

/// Claims work for idle slots whenever woken, and sleeps until the next retry is due otherwise.
async fn schedule(shared: Arc<Shared>) {
    loop {
        if shared.draining.load(Ordering::SeqCst) {
            return;
        }
        let mut wake_at = None;
        let idle = shared.idle_slots();
        if !idle.is_empty() {
            wake_at = match claim(&shared, idle).await {
                Ok(wake_at) => wake_at,
                Err(error) => {
                    tracing::error!(%error, "claiming jobs failed");
                    Some(Instant::now() + RETRY_AFTER_ERROR)
                }
            };
        }
        match wake_at {
            Some(at) => tokio::select! {
                () = shared.wake.notified() => {}
                () = sleep_until(at) => {}
            },
            None => shared.wake.notified().await,
        }
    }
}

/// Starts a job on each of `idle` it can fill. Returns when to look again if some slot stayed idle.
async fn claim(shared: &Arc<Shared>, idle: Vec<u32>) -> Result<Option<Instant>, StoreError> {
    let limit = u32::try_from(idle.len()).unwrap_or(u32::MAX);
    let jobs = shared.store.claim(limit, clock::now()).await?;
    let filled = jobs.len();
    let mut workers = idle.into_iter();
    for job in jobs {
        match workers.by_ref().find(|worker| shared.occupy(*worker, &job)) {
            Some(worker) => {
                tokio::spawn(run_job(shared.clone(), worker, job));
            }
            // Its worker was stopped meanwhile: hand the job straight back.
            None => requeue_unstarted(shared, job).await,
        }
    }
    if filled == limit as usize {
        return Ok(None);
    }
    let Some(next) = shared.store.next_run_after().await? else {
        return Ok(None);
    };
    let wait = u64::try_from(next.saturating_sub(clock::now())).unwrap_or(0);
    Ok(Some(Instant::now() + Duration::from_micros(wait)))
}

async fn requeue_unstarted(shared: &Arc<Shared>, job: Job) {
    let policy = shared.settings.read().expect("settings lock").policy();
    let update = GuardedUpdate {
        job_id: job.id.clone(),
        expect_state: JobState::Processing,
        expect_runs: job.runs,
        settled: job::settle(&job, &Outcome::Interrupted, policy, clock::now()),
        ended: None,
    };
    if let Err(error) = shared.writer.update(update, false).await {
        tracing::error!(job_id = %job.id, %error, "returning an unstarted job failed; a restart recovers it");
    }
}

/// Runs one claimed job on `worker` and settles it.
async fn run_job(shared: Arc<Shared>, worker: u32, job: Job) {
    let job_id: Arc<str> = job.id.as_str().into();
    shared.emit(Event::JobPicked {
        worker,
        job_id: job_id.clone(),
        command: job.command.as_str().into(),
        run: job.runs,
    });
    tracing::info!(job_id = %job.id, run = job.runs, worker, "job started");
    let (timeout_secs, max_output) = {
        let settings = shared.settings.read().expect("settings lock");
        (
            job.timeout_secs.unwrap_or(settings.job_timeout_secs()),
            settings.max_output_bytes(),
        )
    };
    let spec = RunSpec {
        command: &job.command,
        timeout: (timeout_secs > 0).then(|| Duration::from_secs(timeout_secs)),
        max_output,
    };
    let report = runner::run(
        spec,
        shared.abort.subscribe(),
        |pgid| {
            shared.writer.started(RunStarted {
                job_id: job.id.clone(),
                run: job.runs,
                worker,
                pgid: pgid.map(i64::from),
                started_at: clock::now(),
            });
        },
        |chunk| {
            if !chunk.is_empty() {
                shared.emit(Event::JobOutput {
                    worker,
                    job_id: job_id.clone(),
                    data: chunk.to_vec(),
                });
            }
        },
    )
    .await;

    let policy = shared.settings.read().expect("settings lock").policy();
    let settled = job::settle(&job, &report.outcome, policy, clock::now());
    let state = settled.state;
    let error = match &report.outcome {
        Outcome::Succeeded => None,
        failed => Some(failed.to_string()),
    };
    let update = GuardedUpdate {
        job_id: job.id.clone(),
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
    match record_finish(&shared, update).await {
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
        state,
        error,
    });
    shared.release(worker);
}

/// Writes a finished run's update, retrying with a capped backoff while the database fails (locked, read-only),
/// so the job does not stay `processing` until a restart. Gives up only once the server drains.
async fn record_finish(shared: &Shared, update: GuardedUpdate) -> Result<bool, StoreError> {
    let mut wait = FINISH_RETRY_FIRST;
    loop {
        match shared.writer.update(update.clone(), false).await {
            Err(error) if !shared.draining.load(Ordering::SeqCst) => {
                tracing::warn!(job_id = %update.job_id, run = update.expect_runs, %error, retry_in = ?wait, "recording the result failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(FINISH_RETRY_MAX);
            }
            result => return result,
        }
    }
}
