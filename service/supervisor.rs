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
use crate::event::Event;
use crate::job::{self, Job, JobState, Micros, Outcome};
use crate::runner::{self, RunSpec};
use crate::store::{
    GuardedUpdate, InFlight, RunEnded, RunStarted, ServerRecord, Store, StoreError, WorkerRecord,
};
use crate::writer::Writer;

/// How long the scheduler waits before it tries the database again after an error.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// With a shared database, how often the scheduler looks for work even without a notification, in case one was
/// lost while the notification channel reconnected.
const SHARED_POLL: Duration = Duration::from_secs(5);

/// A result that could not be written is tried again after this, doubling up to [`FINISH_RETRY_MAX`].
const FINISH_RETRY_FIRST: Duration = Duration::from_millis(100);
const FINISH_RETRY_MAX: Duration = Duration::from_secs(5);

/// What a busy worker runs.
#[derive(Clone, Debug)]
struct Running {
    job_id: Arc<str>,
    command: Arc<str>,
    started_at: Micros,
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
    /// This server's id: the owner of the jobs it claims.
    server_id: String,
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
        server_id: String,
        writer: Writer,
        settings: Arc<RwLock<Settings>>,
        wake: Arc<Notify>,
    ) -> Supervisor {
        let (events, _) = broadcast::channel(4096);
        Supervisor {
            shared: Arc::new(Shared {
                store,
                server_id,
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
        let in_flight = self.shared.store.in_flight(&self.shared.server_id).await?;
        for stale in &in_flight {
            // Only our own jobs ran on this machine, so only their process groups are ours to kill.
            if let Some(pgid) = stale.pgid.and_then(|pgid| u32::try_from(pgid).ok()) {
                let tag = runner::run_tag(&stale.job.id, stale.job.runs);
                if runner::kill_group(pgid, &tag) {
                    tracing::warn!(job_id = %stale.job.id, pgid, "killed the processes an interrupted run left");
                }
            }
            crate::containment::recover_run(&runner::run_tag(&stale.job.id, stale.job.runs));
            self.shared.requeue(stale, Outcome::Abandoned).await?;
        }
        Ok(in_flight.len())
    }

    /// Starts the scheduler and, with a shared database, the heartbeat that keeps this server's claims.
    pub fn start(&self) {
        tokio::spawn(schedule(self.shared.clone()));
        if let Some(cluster) = self.shared.store.cluster() {
            tokio::spawn(heartbeat(self.shared.clone(), cluster.lease() / 3));
        }
    }

    /// This server: its worker count and every slot that exists, as `status` and other servers see it.
    pub fn record(&self) -> ServerRecord {
        self.shared.record()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
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
    /// Settles a run that was cut short, unless the job moved on: `Interrupted` when its server stopped it or it
    /// never started, `Abandoned` (counted) when its server died under it.
    async fn requeue(&self, stale: &InFlight, outcome: Outcome) -> Result<(), StoreError> {
        let job = &stale.job;
        let policy = self.settings.read().expect("settings lock").policy();
        let update = GuardedUpdate {
            job_id: job.id.clone(),
            expect_state: JobState::Processing,
            expect_runs: job.runs,
            settled: job::settle(job, &outcome, policy, clock::now()),
            ended: None,
        };
        let (state, interruptions) = (update.settled.state, update.settled.interruptions);
        if self.writer.update(update, true).await? {
            if state == JobState::Dead {
                tracing::error!(job_id = %job.id, run = job.runs, interruptions,
                    "a job's server died under it too often: it is dead");
            } else {
                tracing::warn!(job_id = %job.id, run = job.runs, "returned an interrupted job to the queue");
            }
        }
        Ok(())
    }

    fn record(&self) -> ServerRecord {
        let slots = self.slots.lock().expect("slots lock");
        ServerRecord {
            id: self.server_id.clone(),
            host: crate::home::host_name(),
            pid: std::process::id(),
            worker_count: slots.target,
            workers: slots
                .slots
                .iter()
                .map(|(index, slot)| WorkerRecord {
                    index: *index,
                    job_id: slot.running.as_ref().map(|run| run.job_id.to_string()),
                    command: slot.running.as_ref().map(|run| run.command.to_string()),
                    started_at: slot.running.as_ref().map(|run| run.started_at),
                    stopping: slot.stopping,
                })
                .collect(),
            seen_at: clock::now(),
        }
    }

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

    /// Whether `worker` may take another job when its current one ends: not when it is stopping or the server
    /// drains.
    fn wants_more(&self, worker: u32) -> bool {
        let slots = self.slots.lock().expect("slots lock");
        self.keeps_working(&slots, worker)
    }

    fn keeps_working(&self, slots: &Slots, worker: u32) -> bool {
        !self.draining.load(Ordering::SeqCst)
            && worker < slots.target
            && slots.slots.get(&worker).is_some_and(|slot| !slot.stopping)
    }

    /// Moves busy `worker` on to `job`; false if it must stop instead.
    fn move_on(&self, worker: u32, job: &Job) -> bool {
        let mut slots = self.slots.lock().expect("slots lock");
        if !self.keeps_working(&slots, worker) {
            return false;
        }
        let Some(slot) = slots.slots.get_mut(&worker) else {
            return false;
        };
        slot.running = Some(Running {
            job_id: job.id.as_str().into(),
            command: job.command.as_str().into(),
            started_at: clock::now(),
        });
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

/// Claims work for idle slots whenever woken, and sleeps until the next retry is due otherwise. Under a service
/// manager's watchdog, it also pings from here, so that a stuck scheduler gets the server restarted.
async fn schedule(shared: Arc<Shared>) {
    let watchdog = crate::notify::watchdog_interval();
    let mut next_ping = Instant::now();
    loop {
        if shared.draining.load(Ordering::SeqCst) {
            return;
        }
        if let Some(interval) = watchdog
            && Instant::now() >= next_ping
        {
            crate::notify::watchdog_ping();
            next_ping = Instant::now() + interval;
        }
        let mut wake_at = watchdog.map(|_| next_ping);
        let idle = shared.idle_slots();
        if !idle.is_empty() {
            let due = match claim(&shared, idle).await {
                Ok(due) => due,
                Err(error) => {
                    tracing::error!(%error, "claiming jobs failed");
                    Some(Instant::now() + RETRY_AFTER_ERROR)
                }
            };
            wake_at = earliest(wake_at, due);
        }
        if shared.store.cluster().is_some() {
            wake_at = earliest(wake_at, Some(Instant::now() + SHARED_POLL));
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

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Starts a job on each of `idle` it can fill. Returns when to look again if some slot stayed idle.
async fn claim(shared: &Arc<Shared>, idle: Vec<u32>) -> Result<Option<Instant>, StoreError> {
    let limit = u32::try_from(idle.len()).unwrap_or(u32::MAX);
    let jobs = shared.writer.claim(limit).await?;
    let filled = jobs.len();
    let mut workers = idle.into_iter();
    for job in jobs {
        // A drain that began while the claim was in flight starts nothing new.
        if shared.draining.load(Ordering::SeqCst) {
            requeue_unstarted(shared, job).await;
            continue;
        }
        match workers.by_ref().find(|worker| shared.occupy(*worker, &job)) {
            Some(worker) => {
                tokio::spawn(work(shared.clone(), worker, job));
            }
            // Its worker was stopped meanwhile: hand the job straight back.
            None => requeue_unstarted(shared, job).await,
        }
    }
    if filled == limit as usize {
        return Ok(None);
    }
    let due = shared.store.next_due(clock::now()).await?;
    Ok(due.map(|wait| Instant::now() + wait))
}

async fn requeue_unstarted(shared: &Arc<Shared>, job: Job) {
    let id = job.id.clone();
    let unstarted = InFlight { job, pgid: None };
    if let Err(error) = shared.requeue(&unstarted, Outcome::Interrupted).await {
        tracing::error!(job_id = %id, %error, "returning an unstarted job failed; a restart recovers it");
    }
}

/// Renews this server's claims and returns to the queue the jobs of servers whose claims ran out.
async fn heartbeat(shared: Arc<Shared>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if shared.draining.load(Ordering::SeqCst) {
            return;
        }
        let Some(cluster) = shared.store.cluster() else {
            return;
        };
        let expired = match cluster.heartbeat(&shared.record()).await {
            Ok(expired) => expired,
            Err(error) => {
                tracing::error!(%error, "heartbeat failed; this server's claims may expire");
                continue;
            }
        };
        for stale in &expired {
            tracing::warn!(job_id = %stale.job.id, "rescuing a job whose server stopped renewing its claim");
            if let Err(error) = shared.requeue(stale, Outcome::Abandoned).await {
                tracing::error!(job_id = %stale.job.id, %error, "rescuing a job failed");
            }
        }
    }
}

/// Runs `job` on `worker`, then the jobs the worker claims as each one ends (the finish and the next claim share
/// a commit), until none is ready or the worker stops.
async fn work(shared: Arc<Shared>, worker: u32, mut job: Job) {
    loop {
        let next = run_job(&shared, worker, job).await;
        match next {
            Some(next) if shared.move_on(worker, &next) => job = next,
            Some(next) => {
                requeue_unstarted(&shared, next).await;
                break;
            }
            None => break,
        }
    }
    shared.release(worker);
}

/// Runs one claimed job on `worker` and settles it. Returns the job the worker claimed next, if it did.
async fn run_job(shared: &Arc<Shared>, worker: u32, job: Job) -> Option<Job> {
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
    let tag = runner::run_tag(&job.id, job.runs);
    let spec = RunSpec {
        command: &job.command,
        tag: &tag,
        timeout: (timeout_secs > 0).then(|| Duration::from_secs(timeout_secs)),
        max_output,
    };
    let report = runner::run(
        spec,
        shared.abort.subscribe(),
        async |pgid| {
            let started = shared
                .writer
                .started(RunStarted {
                    job_id: job.id.clone(),
                    run: job.runs,
                    worker,
                    pgid: pgid.map(i64::from),
                    started_at: clock::now(),
                })
                .await;
            if let Err(error) = started {
                tracing::error!(job_id = %job.id, %error, "recording the start failed; a crash now could leave its processes behind");
            }
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
    if let Outcome::NotStarted(reason) = &report.outcome {
        tracing::warn!(job_id = %job.id, run = job.runs, %reason,
            "could not start a job: the server is out of resources; the job waits and runs again");
    }
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
    let (finished, next) = if shared.wants_more(worker) {
        let (finished, next) = shared.writer.finish_and_claim(update.clone()).await;
        let finished = match finished {
            Err(_) => record_finish(shared, update).await,
            applied => applied,
        };
        let next = next.unwrap_or_else(|error| {
            tracing::error!(%error, "claiming the next job failed");
            Vec::new()
        });
        (finished, next.into_iter().next())
    } else {
        (record_finish(shared, update).await, None)
    };
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
        state,
        outcome: report.outcome,
    });
    next
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
