//! The scheduler: claims work for idle slots whenever woken (an enqueue, a finished job, a changed worker count),
//! and otherwise sleeps until the next retry is due. Under a service manager's watchdog it also pings from here,
//! so that a stuck scheduler gets the server restarted.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use super::Shared;
use super::executor;
use super::slots::Running;
use crate::clock;
use crate::job::{Job, Outcome};
use crate::runner;
use crate::store::{Claim, ClaimStart, InFlight, StoreError};

/// How long the scheduler waits before it tries the database again after an error.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// With a shared database, how often the scheduler looks for work even without a notification, in case one was
/// lost while the notification channel reconnected.
const SHARED_POLL: Duration = Duration::from_secs(5);

pub(super) async fn schedule(shared: Arc<Shared>) {
    let watchdog = crate::notify::watchdog_interval();
    let mut next_ping = Instant::now();
    loop {
        if shared.draining() {
            shared.spare_gates().clear();
            return;
        }
        if let Some(interval) = watchdog
            && Instant::now() >= next_ping
        {
            crate::notify::watchdog_ping();
            next_ping = Instant::now() + interval;
        }
        let mut wake_at = watchdog.map(|_| next_ping);
        let idle = shared.slots().idle();
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
///
/// The first idle workers get the spare shells, one each, and their claims record their jobs' starts; the rest
/// share one claim, and their jobs start their own shells.
async fn claim(shared: &Arc<Shared>, idle: Vec<u32>) -> Result<Option<Instant>, StoreError> {
    let gates: Vec<runner::Gate> = {
        let mut spare = shared.spare_gates();
        // More spare shells than idle workers: the worker count went down.
        spare.truncate(idle.len());
        std::mem::take(&mut *spare)
    };
    let (gated, others) = idle.split_at(gates.len());
    let mut claims: Vec<Claim> = gated
        .iter()
        .zip(&gates)
        .map(|(worker, gate)| Claim {
            limit: 1,
            start: Some(ClaimStart {
                worker: *worker,
                pgid: gate.pgid().map(i64::from),
            }),
        })
        .collect();
    if !others.is_empty() {
        claims.push(Claim::up_to(
            u32::try_from(others.len()).unwrap_or(u32::MAX),
        ));
    }
    let mut answers = shared.writer.claim_each(claims).await.into_iter();
    let mut filled = 0;
    let mut failure = None;
    for (worker, gate) in gated.iter().zip(gates) {
        match answers
            .next()
            .map(|answer| answer.map(|jobs| jobs.into_iter().next()))
        {
            Some(Ok(Some(job))) => {
                filled += 1;
                launch(shared, &mut std::iter::once(*worker), job, Some(gate)).await;
            }
            Some(Ok(None)) => shared.spare(gate),
            Some(Err(error)) => {
                shared.spare(gate);
                failure = Some(error);
            }
            None => shared.spare(gate),
        }
    }
    let mut others = others.iter().copied();
    match answers.next() {
        Some(Ok(jobs)) => {
            for job in jobs {
                filled += 1;
                launch(shared, &mut others, job, None).await;
            }
        }
        Some(Err(error)) => failure = Some(error),
        None => {}
    }
    if let Some(error) = failure {
        return Err(error);
    }
    if filled == idle.len() {
        return Ok(None);
    }
    let due = shared.store.next_due(clock::now()).await?;
    Ok(due.map(|wait| Instant::now() + wait))
}

/// Starts claimed `job` on the first of `workers` whose slot takes it, with `gate` if its claim recorded one.
async fn launch(
    shared: &Arc<Shared>,
    workers: &mut impl Iterator<Item = u32>,
    job: Job,
    gate: Option<runner::Gate>,
) {
    let running = Running::of(&job, clock::now());
    // A slot stopped, or the server began to drain, while the claim was in flight: hand the job back.
    match workers.find(|worker| shared.slots().occupy(*worker, running.clone())) {
        Some(worker) => {
            shared.running.send_modify(|count| *count += 1);
            tokio::spawn(executor::work(shared.clone(), worker, job, gate));
        }
        None => requeue_unstarted(shared, job).await,
    }
}

/// Returns a job that was claimed but never started to the queue, costing it nothing.
pub(super) async fn requeue_unstarted(shared: &Shared, job: Job) {
    let id = job.id.clone();
    let unstarted = InFlight { job, pgid: None };
    if let Err(error) = shared.requeue(&unstarted, Outcome::Interrupted).await {
        tracing::error!(job_id = %id, %error, "returning an unstarted job failed; a restart recovers it");
    }
}
