//! The opt-in Prometheus endpoint: jobs by state, what happened to them since the server started, how long they
//! ran, how long the oldest one has waited, and how busy the workers are.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;

use crate::event::{Event, Stamped};
use crate::job::{JobState, Outcome};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

pub struct Metrics {
    registry: Registry,
    jobs: Family<StateLabel, Gauge>,
    enqueued: Counter,
    completed: Counter,
    failed_attempts: Counter,
    dead: Counter,
    not_started: Counter,
    duration: Histogram,
    oldest_pending: Gauge<f64, AtomicU64>,
    workers: Gauge,
    workers_busy: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("queuectl"),
            jobs: Family::default(),
            enqueued: Counter::default(),
            completed: Counter::default(),
            failed_attempts: Counter::default(),
            dead: Counter::default(),
            not_started: Counter::default(),
            duration: Histogram::new(exponential_buckets(0.005, 4.0, 10)),
            oldest_pending: Gauge::default(),
            workers: Gauge::default(),
            workers_busy: Gauge::default(),
        };
        let registry = &mut metrics.registry;
        registry.register("jobs", "Jobs in each state", metrics.jobs.clone());
        registry.register(
            "jobs_enqueued",
            "Jobs enqueued through this server",
            metrics.enqueued.clone(),
        );
        registry.register(
            "jobs_completed",
            "Jobs this server completed",
            metrics.completed.clone(),
        );
        registry.register(
            "attempts_failed",
            "Attempts on this server that failed and will be retried",
            metrics.failed_attempts.clone(),
        );
        registry.register(
            "jobs_dead",
            "Jobs this server moved to the dead letter queue",
            metrics.dead.clone(),
        );
        registry.register(
            "job_starts_failed",
            "Attempts this server could not start for want of descriptors, processes or memory (not counted \
             against the job, which runs again)",
            metrics.not_started.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "How long attempts on this server ran",
            metrics.duration.clone(),
        );
        registry.register(
            "oldest_pending_age_seconds",
            "How long the oldest pending job has waited",
            metrics.oldest_pending.clone(),
        );
        registry.register(
            "workers",
            "Worker slots this server is set to run",
            metrics.workers.clone(),
        );
        registry.register(
            "workers_busy",
            "Worker slots running a job now",
            metrics.workers_busy.clone(),
        );
        metrics
    }
}

impl Metrics {
    pub fn enqueued(&self, count: usize) {
        self.enqueued.inc_by(count as u64);
    }

    /// Counts finished attempts and times them, from the supervisor's events.
    pub async fn follow(self: Arc<Self>, mut events: broadcast::Receiver<Stamped>) {
        let mut started = HashMap::new();
        loop {
            match events.recv().await.map(|stamped| stamped.event) {
                Ok(Event::JobPicked { worker, .. }) => {
                    started.insert(worker, std::time::Instant::now());
                }
                Ok(Event::JobFinished {
                    worker,
                    state,
                    outcome,
                    ..
                }) => {
                    if let Outcome::NotStarted(_) = outcome {
                        self.not_started.inc();
                    }
                    if let Some(at) = started.remove(&worker) {
                        self.duration.observe(at.elapsed().as_secs_f64());
                    }
                    match state {
                        JobState::Completed => self.completed.inc(),
                        JobState::Failed => self.failed_attempts.inc(),
                        JobState::Dead => {
                            self.failed_attempts.inc();
                            self.dead.inc()
                        }
                        // Cancels show in the jobs gauge; most of them never ran.
                        JobState::Pending | JobState::Processing | JobState::Cancelled => 0,
                    };
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// The metrics in Prometheus' text format, with the gauges set to `now`.
    pub fn render(&self, now: &Gauges) -> Result<String, std::fmt::Error> {
        for (state, count) in JobState::ALL.into_iter().zip(now.counts) {
            let label = StateLabel {
                state: state.as_str(),
            };
            self.jobs
                .get_or_create(&label)
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        self.oldest_pending
            .set(now.oldest_pending_age.as_secs_f64());
        self.workers.set(i64::from(now.workers));
        self.workers_busy.set(i64::from(now.workers_busy));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// What the metrics read from the queue at each scrape.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Jobs in each state, in [`JobState::ALL`] order.
    pub counts: [u64; JobState::ALL.len()],
    pub oldest_pending_age: std::time::Duration,
    pub workers: u32,
    pub workers_busy: u32,
}

/// Serves `GET /metrics` on `address` until the process ends; `scrape` renders the text.
pub async fn serve<F, S>(address: SocketAddr, scrape: F) -> std::io::Result<()>
where
    F: Fn() -> S + Clone + Send + Sync + 'static,
    S: Future<Output = Result<String, String>> + Send,
{
    use axum::http::{StatusCode, header};
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(address = %listener.local_addr()?, "serving metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(async move || match scrape().await {
            Ok(text) => (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                text,
            ),
            Err(error) => {
                tracing::error!(%error, "rendering metrics failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    "the database is unavailable\n".to_owned(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
