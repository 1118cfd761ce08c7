//! With a database several servers share: renews this server's claims, and returns to the queue the jobs of
//! servers whose claims ran out.

use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use crate::job::Outcome;

pub(super) async fn beat(shared: Arc<Shared>, every: Duration) {
    let Some(cluster) = shared.store.cluster() else {
        return;
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if shared.draining() {
            return;
        }
        let expired = match cluster.heartbeat(&shared.record()).await {
            Ok(expired) => expired,
            Err(error) => {
                tracing::error!(%error, "heartbeat failed; this server's claims may expire");
                continue;
            }
        };
        for stale in &expired {
            tracing::warn!(job_id = %stale.job.id, "rescuing a job whose claim ran out: its server stopped renewing it, or no worker runs it");
            if let Err(error) = shared.requeue(stale, Outcome::Abandoned).await {
                tracing::error!(job_id = %stale.job.id, %error, "rescuing a job failed");
            }
        }
    }
}
