//! The opt-in Prometheus endpoint: jobs by state, what happened to them since the server started, how long they
//! ran, how long the oldest one has waited, and how busy the workers are.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;

use crate::event::{Event, Stamped};
use crate::job::{JobState, Outcome};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabels {
    method: String,
    code: String,
}

type MethodHistograms = Family<MethodLabel, Histogram, fn() -> Histogram>;

/// Buckets from 5 ms to past the longest job timeout (a week): 0.005 s times powers of 4.
fn job_duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 4.0, 15))
}

/// Buckets from 0.1 ms to about 26 s: 0.0001 s times powers of 4.
fn request_duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
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
    requests: Family<AnswerLabels, Counter>,
    request_duration: MethodHistograms,
    events_dropped: Counter,
    watchers_cut: Counter,
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
            duration: job_duration_buckets(),
            oldest_pending: Gauge::default(),
            workers: Gauge::default(),
            workers_busy: Gauge::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(request_duration_buckets),
            events_dropped: Counter::default(),
            watchers_cut: Counter::default(),
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
        registry.register(
            "grpc_requests",
            "gRPC requests answered, by method and the status code the answer began with (a stream may still end \
             with another)",
            metrics.requests.clone(),
        );
        registry.register(
            "grpc_request_duration_seconds",
            "Time from a gRPC request's arrival to the start of its answer (for a unary call, all of it)",
            metrics.request_duration.clone(),
        );
        registry.register(
            "watch_events_dropped",
            "Events that event watchers did not get because they read too slowly",
            metrics.events_dropped.clone(),
        );
        registry.register(
            "watchers_cut",
            "Event watchers ended because they fell behind (each is told, with reason EVENTS_MISSED)",
            metrics.watchers_cut.clone(),
        );
        registry.register(
            "build",
            "The version of this server",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        metrics
    }
}

impl Metrics {
    pub fn enqueued(&self, count: usize) {
        self.enqueued.inc_by(count as u64);
    }

    /// Counts one answered gRPC request to `method` (a [`ServedMethods::label`]).
    pub fn answered(&self, method: &str, code: tonic::Code, took: std::time::Duration) {
        let method = method.to_owned();
        self.request_duration
            .get_or_create(&MethodLabel {
                method: method.clone(),
            })
            .observe(took.as_secs_f64());
        self.requests
            .get_or_create(&AnswerLabels {
                method,
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// Counts a watcher cut for falling behind, and the events it missed.
    pub fn watcher_cut(&self, events_missed: u64) {
        self.watchers_cut.inc();
        self.events_dropped.inc_by(events_missed);
    }

    /// Counts finished attempts and times them, from the supervisor's events.
    pub async fn follow(self: Arc<Self>, mut events: broadcast::Receiver<Stamped>) {
        let mut started = HashMap::new();
        loop {
            // Other servers count their own jobs.
            let event = match events.recv().await {
                Ok(stamped) if stamped.server.is_some() => continue,
                other => other.map(|stamped| stamped.event),
            };
            match event {
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

    /// The metrics in OpenMetrics' text format, with the gauges set to `now`.
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

/// OpenMetrics text as the Prometheus text format 0.0.4 has it: a counter's family takes the name of its `_total`
/// sample, an info metric becomes a gauge named like its sample, and there are no UNIT or EOF lines.
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut renamed: HashMap<&str, String> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            match declared.split_once(' ') {
                Some((name, "counter")) => renamed.insert(name, format!("{name}_total")),
                Some((name, "info")) => renamed.insert(name, format!("{name}_info")),
                _ => None,
            };
        }
    }
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        let line = if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            match rest.split_once(' ') {
                Some((name, "info")) => format!("# TYPE {} gauge", renamed[name]),
                Some((name, kind)) if renamed.contains_key(name) => {
                    format!("# TYPE {} {kind}", renamed[name])
                }
                _ => line.to_owned(),
            }
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            match rest.split_once(' ') {
                Some((name, help)) if renamed.contains_key(name) => {
                    format!("# HELP {} {help}", renamed[name])
                }
                _ => line.to_owned(),
            }
        } else {
            line.to_owned()
        };
        text.push_str(&line);
        text.push('\n');
    }
    text
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `GET /metrics` on `address` until the process ends; `scrape` renders OpenMetrics text, sent as it is to
/// a scraper that accepts OpenMetrics (as Prometheus does) and in the Prometheus text format to any other.
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
        axum::routing::get(
            async move |headers: axum::http::HeaderMap| match scrape().await {
                Ok(text) => {
                    let openmetrics = headers
                        .get_all(header::ACCEPT)
                        .iter()
                        .filter_map(|value| value.to_str().ok())
                        .any(|accept| accept.contains("application/openmetrics-text"));
                    if openmetrics {
                        (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], text)
                    } else {
                        (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                            prometheus_text(&text),
                        )
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "rendering metrics failed");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        "the database is unavailable\n".to_owned(),
                    )
                }
            },
        ),
    );
    axum::serve(listener, app).await
}

/// The gRPC methods a server has, as `package.Service/Method`: the only request paths counted under their own
/// label. Anyone who reaches the port can send any path, with or without a token, so every other path shares the
/// label `unknown` and cannot grow the metrics without bound.
#[derive(Debug)]
pub struct ServedMethods(HashSet<String>);

impl ServedMethods {
    /// The methods of every service described in these encoded `FileDescriptorSet`s.
    pub fn described_in(sets: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        use prost::Message;
        let mut methods = HashSet::new();
        for set in sets {
            for file in prost_types::FileDescriptorSet::decode(*set)?.file {
                for service in &file.service {
                    for method in &service.method {
                        methods.insert(format!(
                            "{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        Ok(Self(methods))
    }

    /// The label of a request path.
    pub fn label<'a>(&'a self, path: &'a str) -> &'a str {
        match path.strip_prefix('/') {
            Some(method) if self.0.contains(method) => method,
            _ => "unknown",
        }
    }
}

/// Counts each gRPC request in [`Metrics`] by method and answer, and times it.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
    methods: Arc<ServedMethods>,
}

impl<S> Observe<S> {
    pub fn layer(
        metrics: Arc<Metrics>,
        methods: ServedMethods,
    ) -> impl tower::Layer<S, Service = Observe<S>> + Clone {
        let methods = Arc::new(methods);
        tower::layer::layer_fn(move |inner| Observe {
            inner,
            metrics: metrics.clone(),
            methods: methods.clone(),
        })
    }
}

impl<S, B, R> tower::Service<axum::http::Request<B>> for Observe<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let method = self.methods.label(request.uri().path()).to_owned();
        let arrived = std::time::Instant::now();
        let metrics = self.metrics.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            // A refusal comes as headers only, with its status; an answer that begins well has none yet.
            let code = tonic::Status::from_header_map(response.headers())
                .map_or(tonic::Code::Ok, |status| status.code());
            metrics.answered(&method, code, arrived.elapsed());
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_text_names_counter_and_info_families_by_their_samples() {
        let metrics = Metrics::default();
        metrics.enqueued(3);
        metrics.answered(
            "queuectl.v1.QueueService/Enqueue",
            tonic::Code::Ok,
            std::time::Duration::from_millis(2),
        );
        let openmetrics = metrics.render(&Gauges::default()).unwrap();
        assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
        let text = prometheus_text(&openmetrics);
        for expected in [
            "# HELP queuectl_jobs_enqueued_total Jobs enqueued through this server.\n",
            "# TYPE queuectl_jobs_enqueued_total counter\nqueuectl_jobs_enqueued_total 3\n",
            "# TYPE queuectl_build_info gauge\n",
            "queuectl_grpc_requests_total{method=\"queuectl.v1.QueueService/Enqueue\",code=\"Ok\"} 1\n",
            "# TYPE queuectl_grpc_request_duration_seconds histogram\n",
        ] {
            assert!(text.contains(expected), "{expected:?} in {text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }

    #[test]
    fn only_the_methods_served_have_their_own_label() {
        let methods = ServedMethods::described_in(&[
            crate::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ])
        .unwrap();
        for served in [
            "/queuectl.v1.QueueService/Enqueue",
            "/queuectl.v1.QueueService/WatchEvents",
            "/grpc.health.v1.Health/Check",
        ] {
            assert_eq!(methods.label(served), &served[1..]);
        }
        for made_up in [
            "/queuectl.v1.QueueService/MadeUp",
            "/queuectl.v1.QueueService/Enqueue/x",
            "queuectl.v1.QueueService/Enqueue",
            "/x",
            "",
        ] {
            assert_eq!(methods.label(made_up), "unknown", "{made_up:?}");
        }
    }
}
