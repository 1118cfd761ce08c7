//! The gRPC transport: each handler converts its request, makes one call on the queue and encodes the answer.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::convert;
use crate::error::QueueError;
use crate::pb::{self, queue_service_server::QueueService};
use crate::queue::{JobSpec, Queue};
use crate::store::ListFilter;

pub struct Grpc {
    queue: Arc<Queue>,
}

impl Grpc {
    pub fn new(queue: Arc<Queue>) -> Self {
        Grpc { queue }
    }
}

#[tonic::async_trait]
impl QueueService for Grpc {
    async fn enqueue(
        &self,
        request: Request<pb::EnqueueRequest>,
    ) -> Result<Response<pb::EnqueueResponse>, Status> {
        let spec = JobSpec::try_from(request.into_inner())?;
        let job = self.queue.enqueue(vec![spec]).await?.pop();
        Ok(Response::new(pb::EnqueueResponse {
            job: job.map(Into::into),
        }))
    }

    async fn enqueue_batch(
        &self,
        request: Request<pb::EnqueueBatchRequest>,
    ) -> Result<Response<pb::EnqueueBatchResponse>, Status> {
        let jobs = request.into_inner().jobs;
        if jobs.len() > convert::MAX_BATCH_JOBS {
            return Err(QueueError::field(
                "jobs",
                format!(
                    "a batch holds at most {} jobs, got {}",
                    convert::MAX_BATCH_JOBS,
                    jobs.len()
                ),
            )
            .into());
        }
        let specs = jobs
            .into_iter()
            .enumerate()
            .map(|(index, job)| {
                JobSpec::try_from(job).map_err(|error| match error {
                    QueueError::Refused(refusal) => Status::from(refusal.in_batch(index)),
                    other => Status::from(other),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let jobs = self.queue.enqueue(specs).await?;
        Ok(Response::new(pb::EnqueueBatchResponse {
            jobs: jobs.into_iter().map(Into::into).collect(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let id = request.into_inner().id;
        convert::validate_id("id", &id)?;
        let job = self.queue.get(&id).await?;
        let effective = self.queue.effective_priority(&job);
        Ok(Response::new(pb::GetJobResponse {
            job: Some(pb::Job {
                effective_priority: u32::from(effective),
                ..job.into()
            }),
        }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let request = request.into_inner();
        let filter = ListFilter {
            state: convert::state_filter(request.state)?,
            after: convert::parse_page_token(request.state, &request.page_token)?,
            limit: convert::page_size(request.page_size),
        };
        let page = self.queue.list(&filter).await?;
        Ok(Response::new(convert::list_page(
            request.state,
            page,
            |job| self.queue.effective_priority(job),
        )))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let [pending, processing, failed, completed, dead, cancelled] = self.queue.counts().await?;
        let servers = self.queue.servers().await?;
        let this = &servers[0];
        let (worker_count, workers) = (this.worker_count, this.workers.clone());
        Ok(Response::new(pb::StatusResponse {
            pending,
            processing,
            failed,
            completed,
            dead,
            worker_count,
            workers: workers.into_iter().map(Into::into).collect(),
            server_pid: std::process::id(),
            server_version: env!("CARGO_PKG_VERSION").into(),
            servers: servers.into_iter().map(Into::into).collect(),
            cancelled,
            paused: self.queue.paused(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let request = request.into_inner();
        convert::validate_id("id", &request.id)?;
        let by = convert::cancelled_by(&request.reason)?;
        let job = self.queue.cancel(&request.id, &by).await?;
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(job.into()),
        }))
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let id = request.into_inner().id;
        convert::validate_id("id", &id)?;
        self.queue.delete(&id).await?;
        Ok(Response::new(pb::DeleteJobResponse {}))
    }

    async fn purge_jobs(
        &self,
        request: Request<pb::PurgeJobsRequest>,
    ) -> Result<Response<pb::PurgeJobsResponse>, Status> {
        let (states, older_than) = convert::purge_filter(request.into_inner())?;
        let jobs_deleted = self.queue.purge(&states, older_than).await?;
        Ok(Response::new(pb::PurgeJobsResponse { jobs_deleted }))
    }

    async fn pause_queue(
        &self,
        _request: Request<pb::PauseQueueRequest>,
    ) -> Result<Response<pb::PauseQueueResponse>, Status> {
        self.queue.pause(true).await?;
        Ok(Response::new(pb::PauseQueueResponse {}))
    }

    async fn resume_queue(
        &self,
        _request: Request<pb::ResumeQueueRequest>,
    ) -> Result<Response<pb::ResumeQueueResponse>, Status> {
        self.queue.pause(false).await?;
        Ok(Response::new(pb::ResumeQueueResponse {}))
    }

    async fn dlq_retry(
        &self,
        request: Request<pb::DlqRetryRequest>,
    ) -> Result<Response<pb::DlqRetryResponse>, Status> {
        let id = request.into_inner().id;
        convert::validate_id("id", &id)?;
        let job = self.queue.dlq_retry(&id).await?;
        Ok(Response::new(pb::DlqRetryResponse {
            job: Some(job.into()),
        }))
    }

    async fn get_config(
        &self,
        request: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::GetConfigResponse>, Status> {
        let entries = self.queue.config(&request.into_inner().key)?;
        Ok(Response::new(pb::GetConfigResponse {
            entries: entries
                .into_iter()
                .map(|(key, value)| pb::ConfigEntry {
                    key: key.into(),
                    value: value.to_string(),
                })
                .collect(),
        }))
    }

    async fn set_config(
        &self,
        request: Request<pb::SetConfigRequest>,
    ) -> Result<Response<pb::SetConfigResponse>, Status> {
        let request = request.into_inner();
        let (key, value) = self.queue.set_config(&request.key, &request.value).await?;
        Ok(Response::new(pb::SetConfigResponse {
            entry: Some(pb::ConfigEntry {
                key: key.into(),
                value: value.to_string(),
            }),
        }))
    }

    async fn get_job_logs(
        &self,
        request: Request<pb::GetJobLogsRequest>,
    ) -> Result<Response<pb::GetJobLogsResponse>, Status> {
        let request = request.into_inner();
        convert::validate_id("id", &request.id)?;
        let budget = convert::logs_budget(request.max_bytes);
        let page = self
            .queue
            .logs(&request.id, request.run, request.offset, budget)
            .await?;
        Ok(Response::new(convert::logs_page(page, request.by_stream)))
    }

    async fn start_workers(
        &self,
        request: Request<pb::StartWorkersRequest>,
    ) -> Result<Response<pb::StartWorkersResponse>, Status> {
        let request = request.into_inner();
        let count = request.count;
        if !(1..=1024).contains(&count) {
            return Err(
                QueueError::field("count", format!("count must be 1-1024, got {count}")).into(),
            );
        }
        self.queue.set_workers(count, request.all).await?;
        Ok(Response::new(pb::StartWorkersResponse { count }))
    }

    async fn stop_workers(
        &self,
        request: Request<pb::StopWorkersRequest>,
    ) -> Result<Response<pb::StopWorkersResponse>, Status> {
        let request = request.into_inner();
        let running = u32::try_from(self.queue.running()).unwrap_or(u32::MAX);
        self.queue.set_workers(0, request.all).await?;
        if request.wait {
            self.queue.idle().await;
        }
        Ok(Response::new(pb::StopWorkersResponse { running }))
    }

    async fn reset(
        &self,
        _request: Request<pb::ResetRequest>,
    ) -> Result<Response<pb::ResetResponse>, Status> {
        let jobs_deleted = self.queue.reset().await?;
        Ok(Response::new(pb::ResetResponse { jobs_deleted }))
    }

    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> Result<Response<pb::BackupResponse>, Status> {
        let path = request.into_inner().path;
        let bytes = self.queue.backup(std::path::Path::new(&path)).await?;
        Ok(Response::new(pb::BackupResponse { path, bytes }))
    }

    async fn shutdown(
        &self,
        _request: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        self.queue.request_shutdown();
        Ok(Response::new(pb::ShutdownResponse {}))
    }

    type WatchEventsStream = crate::watch::EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<crate::watch::EventStream>, Status> {
        let job_id = request.into_inner().job_id;
        if !job_id.is_empty() {
            convert::validate_id("job_id", &job_id)?;
        }
        let events = self.queue.subscribe();
        Ok(Response::new(crate::watch::stream(
            events,
            self.queue.closing(),
            job_id,
            self.queue.metrics(),
        )))
    }
}
