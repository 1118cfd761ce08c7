//! The worker supervisor: a set of worker slots ([`slots`]), a scheduler that claims exactly as many jobs as
//! there are idle slots whenever something changes ([`scheduler`]), the executor of each claimed job
//! ([`executor`]), and with a shared database the heartbeat that keeps this server's claims ([`heartbeat`]).

mod executor;
mod heartbeat;
mod scheduler;
mod slots;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, oneshot, watch};

use crate::clock;
use crate::config::Settings;
use crate::event::{Event, Events, Stamped};
use crate::job::{self, JobState, Outcome};
use crate::runner;
use crate::store::{GuardedUpdate, InFlight, ServerRecord, Store, StoreError};
use crate::writer::Writer;
use slots::Slots;

struct Shared {
    store: Arc<dyn Store>,
    /// This server's id: the owner of the jobs it claims.
    server_id: String,
    writer: Writer,
    settings: Arc<RwLock<Settings>>,
    events: Events,
    slots: Mutex<Slots>,
    /// Wakes the scheduler: something may be claimable.
    wake: Arc<Notify>,
    /// `true` ends every running job now, as interrupted.
    abort: watch::Sender<bool>,
    /// How many jobs run right now.
    running: watch::Sender<usize>,
    /// Why this server may not hold claims now (it lost its lease on a shared database); `None` while it may.
    lease_lost: watch::Sender<Option<String>>,
    /// The runs on this server that a cancel can end.
    cancels: Mutex<Cancels>,
    /// Shells started for jobs that workers did not get, waiting for the next claims of idle workers, so that those
    /// claims record their jobs' starts too.
    spare_gates: Mutex<Vec<runner::Gate>>,
}

/// Each running job's current run, and the sender that cancels it with who cancelled it.
type Cancels = HashMap<Arc<str>, (u32, oneshot::Sender<String>)>;

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
        events: Events,
    ) -> Supervisor {
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
                lease_lost: watch::Sender::new(None),
                cancels: Mutex::default(),
                spare_gates: Mutex::default(),
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
                if runner::kill_group(pgid, &tag, &self.shared.server_id) {
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
        tokio::spawn(scheduler::schedule(self.shared.clone()));
        if let Some(cluster) = self.shared.store.cluster() {
            tokio::spawn(heartbeat::beat(self.shared.clone(), cluster.lease() / 3));
        }
    }

    /// This server: its worker count and every slot that exists, as `status` and other servers see it.
    pub fn record(&self) -> ServerRecord {
        self.shared.record()
    }

    /// Tells the watchers about something that happened to a job outside the workers (a cancel while it waited).
    pub fn announce(&self, event: Event) {
        self.shared.emit(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Stamped> {
        self.shared.events.subscribe()
    }

    /// Sets how many jobs run at once. Extra workers finish their current job, then exit.
    pub fn set_workers(&self, target: u32) {
        let events = self.shared.slots().set_target(target);
        for event in events {
            self.shared.emit(event);
        }
        self.shared.wake.notify_one();
    }

    /// Pauses or resumes starting jobs on this server; running jobs go on either way.
    pub fn pause(&self, paused: bool) {
        self.shared.slots().pause(paused);
        self.shared.wake.notify_one();
    }

    /// Ends run `run` of job `job_id` as cancelled `by` someone, if it runs here. Returns whether it did.
    pub fn cancel(&self, job_id: &str, run: u32, by: &str) -> bool {
        let mut cancels = self.shared.cancels();
        match cancels.get(job_id) {
            Some((running, _)) if *running == run => {
                let (_, cancel) = cancels.remove(job_id).expect("found above");
                // The run may have just ended: then the cancel comes too late, which its caller finds out.
                let _ = cancel.send(by.to_owned());
                true
            }
            _ => false,
        }
    }

    /// Why this server may not run jobs now, whenever that changes: it lost its lease on a shared database.
    pub fn lease_lost(&self) -> watch::Receiver<Option<String>> {
        self.shared.lease_lost.subscribe()
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
        self.shared.slots().drain();
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
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().expect("slots lock")
    }

    fn cancels(&self) -> std::sync::MutexGuard<'_, Cancels> {
        self.cancels.lock().expect("cancels lock")
    }

    fn spare_gates(&self) -> std::sync::MutexGuard<'_, Vec<runner::Gate>> {
        self.spare_gates.lock().expect("spare gates lock")
    }

    /// Keeps `gate` for the next claim of an idle worker, unless the server is draining.
    fn spare(&self, gate: runner::Gate) {
        if !self.draining() {
            self.spare_gates().push(gate);
        }
    }

    fn draining(&self) -> bool {
        self.slots().draining()
    }

    /// Stops taking jobs and ends the running ones (they return to the queue), until [`Shared::regain_lease`].
    fn lose_lease(&self, why: String) {
        self.slots().suspend(true);
        self.abort.send_replace(true);
        self.lease_lost.send_replace(Some(why));
    }

    fn regain_lease(&self) {
        let draining = {
            let mut slots = self.slots();
            slots.suspend(false);
            slots.draining()
        };
        // A drain ends running jobs itself once its grace is over.
        if !draining {
            self.abort.send_replace(false);
        }
        self.lease_lost.send_replace(None);
        self.wake.notify_one();
    }

    /// Settles a run that was cut short, unless the job moved on: `Interrupted` when its server stopped it or it
    /// never started, `Abandoned` (counted) when its server died under it.
    async fn requeue(&self, stale: &InFlight, outcome: Outcome) -> Result<(), StoreError> {
        let job = &stale.job;
        let policy = self.settings.read().expect("settings lock").policy();
        let update = GuardedUpdate {
            job_id: job.id.clone(),
            seq: job.seq,
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
        let slots = self.slots();
        ServerRecord {
            id: self.server_id.clone(),
            host: crate::home::host_name(),
            pid: std::process::id(),
            worker_count: slots.target(),
            workers: slots.records(),
            seen_at: clock::now(),
        }
    }

    fn emit(&self, event: Event) {
        self.events.emit(event);
    }
}
