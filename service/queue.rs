//! The queue's operations, one method per request, independent of the transport that carries them.

use std::sync::{Arc, RwLock};

use tokio::sync::{Mutex, Notify, mpsc, watch};

use crate::config::{self, PAUSED_KEY, Settings};
use crate::error::{QueueError, Reason, Refusal};
use crate::event::Events;
use crate::job::{self, Job, JobContext, JobState, Micros, NewJob};
use crate::metrics::Metrics;
use crate::output::Chunk;
use crate::store::{
    CancelRequest, EnqueueRejected, GuardedUpdate, JobEvents, ListFilter, Page, RunRecord,
    ServerRecord, Signal, StateCounts, Store, StoreError,
};
use crate::supervisor::Supervisor;
use crate::writer::Writer;

/// A valid enqueue request; `max_retries` falls back to the setting in force when the job is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    pub id: Option<String>,
    pub command: String,
    pub priority: u8,
    pub max_retries: Option<u32>,
    pub timeout_secs: Option<u64>,
    pub start: Start,
    /// Jobs that must complete before it runs.
    pub after: Vec<String>,
    pub context: JobContext,
}

/// A page of a job's output.
#[derive(Debug)]
pub struct LogsPage {
    pub runs: Vec<RunLog>,
    /// Where the next page starts: this run, from this byte of its output.
    pub next_run: u32,
    pub next_offset: u64,
    /// More output is stored past the page.
    pub has_more: bool,
}

/// One run and the part of its output that a page holds.
#[derive(Debug)]
pub struct RunLog {
    pub run: RunRecord,
    /// Where that part starts in the run's output.
    pub offset: u64,
    pub chunks: Vec<Chunk>,
}

/// When a new job may run first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Now,
    /// At this time (a time past means at once).
    At(Micros),
    /// This long after it is stored.
    After(Micros),
}

impl JobSpec {
    /// The job to store at `now` under `settings`.
    pub fn resolve(self, settings: &Settings, now: Micros) -> NewJob {
        let delay = match self.start {
            Start::Now => 0,
            Start::At(at) => at.saturating_sub(now).max(0),
            Start::After(delay) => delay,
        };
        NewJob {
            id: self.id,
            command: self.command,
            priority: self.priority,
            max_retries: self
                .max_retries
                .unwrap_or_else(|| settings.default_max_retries()),
            timeout_secs: self.timeout_secs,
            delay,
            after: self.after,
            context: self.context,
        }
    }
}

pub struct Queue {
    store: Arc<dyn Store>,
    writer: Writer,
    settings: Arc<RwLock<Settings>>,
    /// Serialises setting changes, so that the stored value and the one in force cannot disagree.
    config_change: Mutex<()>,
    supervisor: Supervisor,
    metrics: Arc<Metrics>,
    shutdown: Arc<Notify>,
    /// Turns `true` when the server stops; long-lived streams end then.
    closing: watch::Sender<bool>,
    /// Wakes the background purge when a retention setting changed.
    retention_changed: Arc<Notify>,
}

impl Queue {
    /// Loads the settings, recovers what a previous server left running and starts `workers` workers.
    pub async fn start(
        store: Arc<dyn Store>,
        server_id: String,
        workers: u32,
    ) -> Result<Queue, QueueError> {
        let stored = store.load_config().await?;
        let settings = Arc::new(RwLock::new(Settings::from_stored(
            stored
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str())),
        )));
        if let Some(newest) = store.newest_time().await? {
            let behind = crate::clock::seed(newest);
            if behind >= crate::job::MICROS_PER_SEC {
                tracing::warn!(
                    behind_secs = behind / crate::job::MICROS_PER_SEC,
                    "the wall clock is behind the newest stored time; server time runs on from that time instead"
                );
            }
        }
        let paused = settings.read().expect("settings lock").paused();
        let wake = Arc::new(Notify::new());
        let events = Events::new(EVENT_BUFFER);
        if store.cluster().is_some() {
            tokio::spawn(share_job_events(
                store.clone(),
                server_id.clone(),
                events.subscribe(),
            ));
        }
        let writer = Writer::spawn(
            store.clone(),
            settings.clone(),
            wake.clone(),
            events.clone(),
            server_id.clone(),
        );
        let supervisor = Supervisor::new(
            store.clone(),
            server_id,
            writer.clone(),
            settings.clone(),
            wake.clone(),
            events.clone(),
        );
        supervisor.pause(paused);
        // A server that cannot write yet (a full disk) still starts and serves reads; it keeps trying, and its
        // workers start claiming once the jobs a previous server left are back in the queue.
        {
            let supervisor = supervisor.clone();
            tokio::spawn(async move {
                recover_until_done(&supervisor).await;
                supervisor.start();
            });
        }
        let retention_changed = Arc::new(Notify::new());
        tokio::spawn(purge_expired(
            store.clone(),
            settings.clone(),
            retention_changed.clone(),
        ));
        let metrics = Arc::new(Metrics::default());
        tokio::spawn(metrics.clone().follow(supervisor.subscribe()));
        supervisor.set_workers(workers);
        if let Some(signals) = store.cluster().and_then(|cluster| cluster.signals()) {
            tokio::spawn(follow_signals(
                signals,
                store.clone(),
                settings.clone(),
                supervisor.clone(),
                wake,
                events,
            ));
        }
        Ok(Queue {
            store,
            writer,
            settings,
            config_change: Mutex::new(()),
            supervisor,
            metrics,
            shutdown: Arc::new(Notify::new()),
            closing: watch::Sender::new(false),
            retention_changed,
        })
    }

    fn settings(&self) -> Settings {
        self.settings.read().expect("settings lock").clone()
    }

    /// Stores the jobs of one request together: all of them, or none if one id is taken.
    pub async fn enqueue(&self, specs: Vec<JobSpec>) -> Result<Vec<Job>, QueueError> {
        if let Some(failing) = self.writer.faults().borrow().claims.clone() {
            // Acknowledging a job that no worker can claim would only bury it.
            return Err(failing.into());
        }
        let settings = self.settings();
        let now = crate::clock::now();
        let jobs = specs
            .into_iter()
            .map(|spec| spec.resolve(&settings, now))
            .collect();
        match self.writer.enqueue(jobs).await? {
            Ok(jobs) => {
                self.metrics.enqueued(jobs.len());
                Ok(jobs)
            }
            Err(EnqueueRejected::DuplicateId(id)) => Err(QueueError::Refused(
                Refusal::new(
                    Reason::DuplicateId,
                    format!(
                        "a job with id '{id}' already exists; choose another id or leave it out to get one"
                    ),
                )
                .at("id")
                .about(&id),
            )),
            Err(EnqueueRejected::Dependency(problem)) => Err(QueueError::Refused(
                Refusal::new(Reason::DependencyNotFound, problem).at("after"),
            )),
        }
    }

    pub async fn get(&self, id: &str) -> Result<Job, QueueError> {
        self.store.get(id).await?.ok_or_else(|| not_found(id))
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Page, QueueError> {
        Ok(self.store.list(filter).await?)
    }

    pub async fn counts(&self) -> Result<StateCounts, QueueError> {
        Ok(self.store.counts().await?)
    }

    /// The priority `job` competes with now, by the current aging interval.
    pub fn effective_priority(&self, job: &Job) -> u8 {
        let aging = self.settings().policy().aging_interval_secs;
        job::effective_priority(job, crate::clock::now(), aging)
    }

    /// The counters the transport adds to.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The metrics as Prometheus reads them, with the job counts and worker gauges read now.
    pub async fn metrics_text(&self) -> Result<String, QueueError> {
        let oldest = self.store.oldest_pending().await?;
        let waited = oldest.map_or(0, |since| crate::clock::now().saturating_sub(since).max(0));
        let this = self.supervisor.record();
        let busy = this
            .workers
            .iter()
            .filter(|worker| worker.job_id.is_some())
            .count();
        let gauges = crate::metrics::Gauges {
            counts: self.store.counts().await?,
            oldest_pending_age: std::time::Duration::from_micros(waited.unsigned_abs()),
            workers: this.worker_count,
            workers_busy: u32::try_from(busy).unwrap_or(u32::MAX),
        };
        self.metrics
            .render(&gauges)
            .map_err(|error| StoreError::Internal(format!("rendering metrics: {error}")).into())
    }

    /// Every live server sharing the database, this one first and as it is right now.
    pub async fn servers(&self) -> Result<Vec<ServerRecord>, QueueError> {
        let this = self.supervisor.record();
        let others = match self.store.cluster() {
            Some(cluster) => cluster.servers().await?,
            None => Vec::new(),
        };
        let mut servers = vec![this];
        for other in others {
            if other.id != servers[0].id {
                servers.push(other);
            }
        }
        Ok(servers)
    }

    /// Sets the worker count of this server or, with `all`, of every server sharing the database.
    pub async fn set_workers(&self, count: u32, all: bool) -> Result<(), QueueError> {
        self.supervisor.set_workers(count);
        if all && let Some(cluster) = self.store.cluster() {
            cluster.broadcast_workers(count).await?;
        }
        Ok(())
    }

    /// Sends a dead or cancelled job back to the queue with its attempts reset.
    pub async fn dlq_retry(&self, id: &str) -> Result<Job, QueueError> {
        let job = self.get(id).await?;
        let policy = self.settings().policy();
        let settled = job::revive(&job, policy, crate::clock::now()).map_err(|illegal| {
            QueueError::job(
                Reason::JobNotRetryable,
                id,
                format!(
                    "job '{id}' is {}; only dead or cancelled jobs can be retried",
                    illegal.from
                ),
            )
        })?;
        let update = GuardedUpdate::unless_changed(&job, settled.clone());
        if !self.writer.update(update, true).await? {
            return Err(QueueError::job(
                Reason::JobChanged,
                id,
                format!(
                    "job '{id}' changed while it was being retried; look at it again and retry"
                ),
            ));
        }
        // The job as this retry wrote it: read back, a worker may have claimed it already.
        Ok(Job {
            state: settled.state,
            attempts: settled.attempts,
            interruptions: settled.interruptions,
            run_after: settled.run_after,
            last_error: settled.last_error,
            updated_at: crate::clock::now(),
            ..job
        })
    }

    /// Cancels job `id`, `by` saying who for its `last_error`. A waiting job is cancelled at once; a running one
    /// is ended by the server that runs it, and the answer comes once its run ended. A job that completed or died
    /// first keeps that state, and the answer says so.
    pub async fn cancel(&self, id: &str, by: &str) -> Result<Job, QueueError> {
        let deadline = tokio::time::Instant::now() + self.cancel_patience();
        loop {
            let job = self.get(id).await?;
            match job.state {
                JobState::Pending | JobState::Failed => {
                    let settled = job::cancel(&job, by, crate::clock::now())
                        .expect("a waiting job can be cancelled");
                    let update = GuardedUpdate::unless_changed(&job, settled);
                    let error = update.settled.last_error.clone().unwrap_or_default();
                    if self.writer.update(update, true).await? {
                        self.supervisor.announce(crate::event::Event::JobCancelled {
                            job_id: job.id.as_str().into(),
                            error,
                        });
                        return self.get(id).await;
                    }
                    // A worker claimed it meanwhile: cancel the run instead.
                }
                JobState::Processing => {
                    let ended = self.end_run(&job, by, deadline).await?;
                    match ended.state {
                        JobState::Cancelled => return Ok(ended),
                        JobState::Completed => {
                            return Err(QueueError::job(
                                Reason::JobAlreadyFinal,
                                id,
                                format!("job '{id}' completed before the cancel reached it"),
                            ));
                        }
                        JobState::Dead => {
                            return Err(QueueError::job(
                                Reason::JobAlreadyFinal,
                                id,
                                format!("job '{id}' went dead before the cancel reached it"),
                            ));
                        }
                        // Its run ended some other way and it waits again, or runs again: cancel that.
                        JobState::Pending | JobState::Failed | JobState::Processing => {}
                    }
                }
                state => {
                    return Err(QueueError::job(
                        Reason::JobAlreadyFinal,
                        id,
                        format!(
                            "job '{id}' is {state} already; only pending, failed and processing jobs can be \
                             cancelled"
                        ),
                    ));
                }
            }
        }
    }

    /// Asks whichever server runs `job`'s current run to end it as cancelled, again and again until the run ended
    /// (the request can come just before the run is registered, or while another server's notice is in flight).
    /// Returns the job as it is once that run is over.
    async fn end_run(
        &self,
        job: &Job,
        by: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Job, QueueError> {
        let request = CancelRequest {
            job_id: job.id.clone(),
            run: job.runs,
            by: by.to_owned(),
        };
        let mut next_request = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            if now >= next_request {
                let here = self.supervisor.cancel(&job.id, job.runs, by);
                if !here && let Some(cluster) = self.store.cluster() {
                    cluster.broadcast_cancel(&request).await?;
                }
                next_request = now + CANCEL_REPEAT;
            }
            tokio::time::sleep(CANCEL_POLL).await;
            let current = self.get(&job.id).await?;
            if current.seq != job.seq
                || current.runs != job.runs
                || current.state != JobState::Processing
            {
                return Ok(current);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QueueError::job(
                    Reason::JobStillRunning,
                    &job.id,
                    format!(
                        "job '{}' still runs: no server ended it in time (its server may have died, and the job \
                         is rescued once its lease runs out); try the cancel again",
                        job.id
                    ),
                ));
            }
        }
    }

    /// How long a cancel waits for a running job to end: its processes get a grace to exit, and on a shared
    /// database a server that died holds its claims for a lease before they are rescued.
    fn cancel_patience(&self) -> std::time::Duration {
        let rescue = self
            .store
            .cluster()
            .map_or(std::time::Duration::ZERO, |cluster| cluster.lease() * 2);
        rescue + CANCEL_GRACE
    }

    /// Deletes a final job and its logs.
    pub async fn delete(&self, id: &str) -> Result<(), QueueError> {
        let job = self.get(id).await?;
        if !job.state.is_final() {
            return Err(QueueError::job(
                Reason::JobNotFinal,
                id,
                format!(
                    "job '{id}' is {}; only completed, dead and cancelled jobs can be deleted (cancel it first)",
                    job.state
                ),
            ));
        }
        if self.store.delete_final(&[id]).await?.is_empty() {
            return Err(QueueError::job(
                Reason::JobChanged,
                id,
                format!("job '{id}' changed while it was being deleted; look at it again"),
            ));
        }
        Ok(())
    }

    /// Deletes the jobs in `states` that reached them at least `older_than` microseconds ago, a few dozen per
    /// transaction so that enqueues and claims go on in between (see [`purge_all`]). The store deletes only final
    /// jobs, whatever `states` says. Returns how many it deleted.
    pub async fn purge(&self, states: &[JobState], older_than: Micros) -> Result<u64, QueueError> {
        let mut deleted = 0;
        for state in states {
            deleted += purge_all(self.store.as_ref(), *state, older_than).await?;
        }
        Ok(deleted)
    }

    /// Stops or lets every server of the queue start jobs. The pause is stored, so it holds across restarts.
    pub async fn pause(&self, paused: bool) -> Result<(), QueueError> {
        let _change = self.config_change.lock().await;
        let value = if paused { "1" } else { "0" };
        self.store.save_config(PAUSED_KEY, value, None).await?;
        self.settings
            .write()
            .expect("settings lock")
            .set_paused(paused);
        self.supervisor.pause(paused);
        Ok(())
    }

    pub fn paused(&self) -> bool {
        self.settings().paused()
    }

    /// One setting, or all of them when `key` is empty.
    pub fn config(&self, key: &str) -> Result<Vec<(&'static str, u64)>, QueueError> {
        let settings = self.settings();
        if key.is_empty() {
            return Ok(settings.entries().collect());
        }
        let key = config::find_key(key)?;
        Ok(vec![(key.name, settings.get(key.name)?)])
    }

    pub async fn set_config(
        &self,
        key: &str,
        value: &str,
    ) -> Result<(&'static str, u64), QueueError> {
        let _change = self.config_change.lock().await;
        let mut changed = self.settings();
        let parsed = changed.set(key, value)?;
        let key = config::find_key(key)?.name;
        // Aging orders the waiting jobs: when it changes, they are re-keyed.
        let rekey = (key == "aging_interval").then(|| changed.policy());
        self.store
            .save_config(key, &parsed.to_string(), rekey)
            .await?;
        *self.settings.write().expect("settings lock") = changed;
        self.retention_changed.notify_one();
        Ok((key, parsed))
    }

    /// A page of a job's output: its runs from `from_run` on, the first from byte `from_offset`, with about
    /// `budget` bytes of output at most.
    pub async fn logs(
        &self,
        id: &str,
        from_run: u32,
        from_offset: u64,
        budget: usize,
    ) -> Result<LogsPage, QueueError> {
        let runs = self.store.runs(id).await?;
        if runs.is_empty() {
            // Tell "no such job" from "not run yet".
            self.get(id).await?;
        }
        let mut page = LogsPage {
            runs: Vec::new(),
            next_run: from_run.max(1),
            next_offset: from_offset,
            has_more: false,
        };
        let mut left = budget;
        for run in runs.into_iter().filter(|run| run.run >= from_run) {
            let from = if run.run == from_run { from_offset } else { 0 };
            if left == 0 {
                (page.has_more, page.next_run, page.next_offset) = (true, run.run, from);
                break;
            }
            let stored = self.store.output(id, run.run, from, left).await?;
            let chunks: Vec<Chunk> = stored
                .chunks
                .into_iter()
                .map(|chunk| chunk.starting_at(from))
                .collect();
            let size: usize = chunks.iter().map(|chunk| chunk.data.len()).sum();
            left = left.saturating_sub(size);
            page.next_run = run.run;
            page.next_offset = chunks.last().map_or(from, Chunk::end);
            page.has_more = stored.more;
            page.runs.push(RunLog {
                run,
                offset: from,
                chunks,
            });
            if page.has_more {
                break;
            }
        }
        Ok(page)
    }

    /// Stops the workers, ends running jobs, deletes every job and restores the default settings. On a shared
    /// database that means every server's: each is told to stop, and the tables are cleared only once no job runs
    /// anywhere, so that no late report can land on a new job.
    pub async fn reset(&self) -> Result<u64, QueueError> {
        let _change = self.config_change.lock().await;
        if let Some(cluster) = self.store.cluster() {
            cluster.broadcast_reset().await?;
        }
        self.supervisor.abort_all().await;
        if let Some(cluster) = self.store.cluster() {
            self.wait_until_nothing_runs(cluster.lease()).await?;
        }
        let deleted = self.store.reset().await?;
        *self.settings.write().expect("settings lock") = Settings::default();
        self.supervisor.pause(false);
        Ok(deleted)
    }

    /// How many jobs run on this server right now.
    pub fn running(&self) -> usize {
        self.supervisor.running()
    }

    /// Waits until no job runs on this server.
    pub async fn idle(&self) {
        self.supervisor.idle().await;
    }

    /// What the workers do from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::event::Stamped> {
        self.supervisor.subscribe()
    }

    /// Stops starting jobs and gives running ones the shutdown grace to finish, then interrupts them.
    pub async fn drain(&self) {
        self.supervisor.drain(self.shutdown_grace()).await;
    }

    /// Waits until no job of the shared database is processing: the other servers ended theirs, and the jobs of
    /// servers that died were rescued once their lease ran out.
    async fn wait_until_nothing_runs(&self, lease: std::time::Duration) -> Result<(), QueueError> {
        // A dead server's claims run out after a lease; rescuing them takes up to a third more.
        let deadline = tokio::time::Instant::now() + lease * 2 + RESET_GRACE;
        loop {
            let running = self.store.counts().await?[JobState::Processing as usize];
            if running == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QueueError::new(
                    Reason::JobStillRunning,
                    format!(
                        "{running} jobs still run on other servers; their workers were stopped, so try the reset again \
                     in a moment (nothing was deleted)"
                    ),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub fn request_shutdown(&self) {
        self.shutdown.notify_one();
    }

    /// Resolves when someone asked the server to stop.
    pub async fn shutdown_requested(&self) {
        self.shutdown.notified().await;
    }

    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Why the store cannot serve right now, whenever that changes: for the health service.
    pub fn store_faults(&self) -> tokio::sync::watch::Receiver<crate::writer::Faults> {
        self.writer.faults()
    }

    /// Why this server may not run jobs now (it lost its lease on a shared database), whenever that changes.
    pub fn lease_lost(&self) -> watch::Receiver<Option<String>> {
        self.supervisor.lease_lost()
    }

    /// Writes a consistent copy of the database to `path`, a new file made owner-only. Returns its size.
    pub async fn backup(&self, path: &std::path::Path) -> Result<u64, QueueError> {
        if !path.is_absolute() {
            return Err(QueueError::field(
                "path",
                format!(
                    "path must be absolute (the server writes it), got {}",
                    crate::error::quoted(&path.to_string_lossy())
                ),
            ));
        }
        if !self.store.can_backup() {
            return Err(QueueError::new(
                Reason::BackupUnsupported,
                "this server keeps its jobs in PostgreSQL: back it up with pg_dump",
            ));
        }
        crate::home::create_new_private(path).map_err(|error| {
            QueueError::new(
                Reason::BackupFailed,
                format!("cannot create {}: {error}", path.display()),
            )
        })?;
        let written = self.store.backup(path).await;
        if written.is_err() {
            let _ = std::fs::remove_file(path);
        }
        Ok(written?)
    }

    /// Leaves the store complete at a clean stop, once nothing runs any more.
    pub async fn close(&self) -> Result<(), QueueError> {
        Ok(self.store.close().await?)
    }

    fn shutdown_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.settings().shutdown_grace_secs())
    }
}

/// Events held for watchers that read slower than the workers write; one that falls further behind is told so.
const EVENT_BUFFER: usize = 4096;

/// How often a cancel of a running job asks again for it to be ended, and looks whether it was.
const CANCEL_REPEAT: std::time::Duration = std::time::Duration::from_millis(250);
const CANCEL_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// How long a cancel waits for a run to end, beyond the rescue of a dead server's claims: the processes' grace
/// to exit on SIGTERM, and the time to write the result.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Final jobs deleted per transaction: small enough (a millisecond or two on SQLite, runs and all) that enqueues and
/// claims never wait long behind a purge.
const PURGE_BATCH: u32 = 25;
/// How many times the length of one of its transactions a purge rests before the next.
const PURGE_REST: u32 = 3;

/// How often the server deletes final jobs past their retention, at most and at least.
const RETENTION_PERIOD: std::time::Duration = std::time::Duration::from_secs(60);
const RETENTION_PERIOD_MIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Deletes every job in `state` older than `older_than`, one small transaction at a time, and after each rests
/// three times as long as it took: the purge holds the database a quarter of the time at most, so enqueues, claims
/// and finishes seldom meet one of its transactions, and wait for one at most.
async fn purge_all(
    store: &dyn Store,
    state: JobState,
    older_than: Micros,
) -> Result<u64, StoreError> {
    let mut deleted = 0;
    loop {
        let started = tokio::time::Instant::now();
        let batch = store.purge(state, older_than, PURGE_BATCH).await?;
        deleted += batch;
        if batch < u64::from(PURGE_BATCH) {
            return Ok(deleted);
        }
        tokio::time::sleep(started.elapsed() * PURGE_REST).await;
    }
}

/// Deletes final jobs past the retention settings, now and then, for as long as the server runs: every minute, or
/// more often when a retention is short, so that jobs never outstay it by much.
async fn purge_expired(
    store: Arc<dyn Store>,
    settings: Arc<RwLock<Settings>>,
    changed: Arc<Notify>,
) {
    loop {
        let retention = settings.read().expect("settings lock").retention();
        let shortest = retention.iter().filter_map(|(_, keep)| *keep).min();
        let period = shortest.map_or(RETENTION_PERIOD, |secs| {
            (std::time::Duration::from_secs(secs) / 4).clamp(RETENTION_PERIOD_MIN, RETENTION_PERIOD)
        });
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            // Look again with the new setting: a shorter retention purges sooner.
            () = changed.notified() => continue,
        }
        for (state, keep_secs) in retention {
            let Some(keep_secs) = keep_secs else {
                continue;
            };
            match purge_all(store.as_ref(), state, job::secs_to_micros(keep_secs)).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(%state, deleted, "deleted jobs past their retention"),
                Err(error) => {
                    tracing::warn!(%state, %error, "deleting jobs past their retention failed")
                }
            }
        }
    }
}

/// How long a reset waits, beyond the lease, for other servers to end their jobs (their kill grace included).
const RESET_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long between attempts to return a previous server's interrupted jobs, while the database refuses writes.
const RECOVERY_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Returns the jobs a previous server left processing to the queue, retrying until the database takes the writes.
async fn recover_until_done(supervisor: &Supervisor) {
    loop {
        match supervisor.recover().await {
            Ok(recovered) => {
                if recovered > 0 {
                    tracing::warn!(recovered, "returned interrupted jobs to the queue");
                }
                return;
            }
            Err(error) => {
                tracing::error!(%error, retry_in = ?RECOVERY_RETRY,
                    "cannot return interrupted jobs to the queue yet");
                tokio::time::sleep(RECOVERY_RETRY).await;
            }
        }
    }
}

/// Passes this server's job events on to the other servers of a shared database, so that their watchers (`wait`,
/// `logs -f`, any WatchEvents client) see jobs that run here. What arrived while one batch was sent goes in the
/// next, in one round trip: the relay never holds up a job.
async fn share_job_events(
    store: Arc<dyn Store>,
    server_id: String,
    mut events: tokio::sync::broadcast::Receiver<crate::event::Stamped>,
) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let Some(cluster) = store.cluster() else {
        return;
    };
    loop {
        let mut batch = Vec::new();
        let mut next = match events.recv().await {
            Ok(stamped) => Ok(stamped),
            Err(RecvError::Lagged(missed)) => Err(missed),
            Err(RecvError::Closed) => return,
        };
        loop {
            match next {
                Ok(stamped) if stamped.server.is_none() && stamped.event.is_shared() => {
                    batch.push(shareable(stamped.event));
                }
                Ok(_) => {}
                Err(missed) => {
                    tracing::warn!(
                        missed,
                        "job events were not passed on to the other servers: too many at once"
                    );
                }
            }
            next = match events.try_recv() {
                Ok(stamped) => Ok(stamped),
                Err(TryRecvError::Lagged(missed)) => Err(missed),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => return,
            };
        }
        if batch.is_empty() {
            continue;
        }
        let shared = JobEvents {
            server: server_id.clone(),
            events: batch,
        };
        if let Err(error) = cluster.broadcast_events(&shared).await {
            tracing::warn!(%error, events = shared.events.len(), "could not pass job events on to the other servers");
        }
    }
}

/// An event as other servers get it: a picked job's command cut to what `Status` shows, to fit a notification.
fn shareable(event: crate::event::Event) -> crate::event::Event {
    use crate::event::Event;
    match event {
        Event::JobPicked {
            worker,
            job_id,
            command,
            run,
        } => Event::JobPicked {
            worker,
            job_id,
            command: job::shortened(command.to_string()).into(),
            run,
        },
        other => other,
    }
}

/// Applies what other servers of a shared database announce: new jobs, changed settings, worker counts, and what
/// their jobs did, for this server's watchers.
async fn follow_signals(
    mut signals: mpsc::UnboundedReceiver<Signal>,
    store: Arc<dyn Store>,
    settings: Arc<RwLock<Settings>>,
    supervisor: Supervisor,
    wake: Arc<Notify>,
    events: Events,
) {
    let this_server = supervisor.record().id;
    while let Some(signal) = signals.recv().await {
        match signal {
            Signal::Events(shared) if shared.server != this_server => {
                let server: Arc<str> = shared.server.into();
                for event in shared.events {
                    events.relay(server.clone(), event);
                }
            }
            Signal::Events(_) => {}
            Signal::Jobs => wake.notify_one(),
            Signal::Workers(count) => supervisor.set_workers(count),
            Signal::Reset => {
                tracing::warn!(
                    "a reset through another server: stopping the workers and ending running jobs"
                );
                supervisor.abort_all().await;
            }
            Signal::Cancel(cancel) => {
                supervisor.cancel(&cancel.job_id, cancel.run, &cancel.by);
            }
            Signal::Config => match store.load_config().await {
                Ok(stored) => {
                    let loaded = Settings::from_stored(
                        stored
                            .iter()
                            .map(|(key, value)| (key.as_str(), value.as_str())),
                    );
                    supervisor.pause(loaded.paused());
                    *settings.write().expect("settings lock") = loaded;
                }
                Err(error) => tracing::error!(%error, "reloading settings failed"),
            },
        }
    }
}

fn not_found(id: &str) -> QueueError {
    QueueError::job(Reason::JobNotFound, id, format!("no job with id '{id}'"))
}
