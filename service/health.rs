//! The gRPC health service, whose Watch streams end when the server drains: an open watcher must not hold a
//! stopping server open until systemd kills it.

use std::pin::Pin;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// Serves the statuses `reporter` sets, and ends every Watch stream once `closing` turns true.
pub fn service(
    reporter: HealthReporter,
    closing: watch::Receiver<bool>,
) -> HealthServer<DrainingHealth> {
    HealthServer::new(DrainingHealth {
        inner: HealthService::from_health_reporter(reporter),
        closing,
    })
}

pub struct DrainingHealth {
    inner: HealthService,
    closing: watch::Receiver<bool>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let mut statuses = self.inner.watch(request).await?.into_inner();
        let mut closing = self.closing.clone();
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(async move {
            let forward = async {
                while let Some(status) = statuses.next().await {
                    if sender.send(status).await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                () = forward => {}
                _ = closing.wait_for(|closing| *closing) => {}
                () = sender.closed() => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
