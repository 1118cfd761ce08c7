//! With a database several servers share: renews this server's claims, returns to the queue the jobs whose claims
//! ran out, and stops this server's own jobs when it cannot renew in time.
//!
//! A claim holds for a lease after its last renewal; then any server may rescue its job. So a server that has not
//! renewed for two thirds of a lease stops its jobs (kills their process groups) and takes no new ones until a
//! renewal works again: by the time another server can take a job, it no longer runs here. That holds while this
//! server runs, and as long as the servers' clocks run at the same rate within a third of a lease. A server that
//! is itself stopped (SIGSTOP, starved) cannot stop anything, while its jobs' processes go on: then a job can run
//! twice from the end of the lease until this server runs again, when it stops its copy at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Shared;
use crate::job::Outcome;

pub(super) async fn beat(shared: Arc<Shared>, every: Duration) {
    let Some(cluster) = shared.store.cluster() else {
        return;
    };
    let hold = cluster.lease() * 2 / 3;
    let mut renewed_at = Instant::now();
    let mut held = true;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if shared.draining() {
            return;
        }
        let started = Instant::now();
        // While the claims hold, a renewal may take until they must be given up; after that, a tick.
        let limit = if held {
            (renewed_at + hold).saturating_duration_since(started)
        } else {
            every
        };
        let renewal = tokio::time::timeout(limit, cluster.heartbeat(&shared.record())).await;
        let expired = match renewal {
            Ok(Ok(expired)) => {
                // The database renewed the leases after `started`: counting from then is on the safe side.
                renewed_at = started;
                if !held {
                    held = true;
                    tracing::warn!("renewed this server's claims again: taking jobs again");
                    shared.regain_lease();
                }
                expired
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "heartbeat failed; this server's claims may expire");
                Vec::new()
            }
            Err(_) => {
                tracing::error!(limit = ?limit, "heartbeat got no answer in time; this server's claims may expire");
                Vec::new()
            }
        };
        if held && Instant::now() >= renewed_at + hold {
            held = false;
            let why = format!(
                "cannot renew its claims on the shared database (none renewed for {}s of a {}s lease)",
                hold.as_secs(),
                cluster.lease().as_secs()
            );
            tracing::error!(reason = %why, "stopping this server's jobs before another server may take them");
            shared.lose_lease(why);
        }
        for stale in &expired {
            tracing::warn!(job_id = %stale.job.id, "rescuing a job whose claim ran out: its server stopped renewing it, or no worker runs it");
            if let Err(error) = shared.requeue(stale, Outcome::Abandoned).await {
                tracing::error!(job_id = %stale.job.id, %error, "rescuing a job failed");
            }
        }
    }
}
