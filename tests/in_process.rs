//! The server served inside the test's own process, on an ephemeral TCP port, and stopped by a future the test
//! controls: the way an embedding program or a test harness runs it.

mod common;

use common::{Home, runtime};
use queuectl::pb;
use queuectl::pb::queue_service_client::QueueServiceClient;
use queuectl::server::{self, Listen, Options};

#[test]
fn a_server_serves_in_process_on_an_ephemeral_port_until_its_shutdown_future_resolves() {
    let home = Home::new();
    let options = Options {
        home: home.path().to_owned(),
        workers: 1,
        listen: Listen::Tcp(([127, 0, 0, 1], 0).into()),
        database_url: None,
        lease: std::time::Duration::from_secs(30),
        metrics: None,
        metrics_allow_remote: false,
        tls: None,
        insecure_allow_remote: false,
    };
    runtime().block_on(async {
        let bound = server::bind(options)
            .await
            .expect("binding an ephemeral port");
        let address = bound.address();
        assert!(
            address.starts_with("http://127.0.0.1:") && !address.ends_with(":0"),
            "{address}"
        );
        let token = std::fs::read_to_string(home.file("token")).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(bound.serve(async move {
            let _ = stopped.await;
        }));

        let channel = tonic::transport::Endpoint::from_shared(address)
            .unwrap()
            .connect()
            .await
            .expect("connecting to the in-process server");
        let bearer: tonic::metadata::MetadataValue<_> =
            format!("Bearer {}", token.trim()).parse().unwrap();
        let mut client =
            QueueServiceClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
                request
                    .metadata_mut()
                    .insert("authorization", bearer.clone());
                Ok(request)
            });
        let enqueued = client
            .enqueue(pb::EnqueueRequest {
                command: "true".into(),
                ..Default::default()
            })
            .await
            .expect("enqueue")
            .into_inner();
        let id = enqueued.job.expect("the stored job").id;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let job = client
                .get_job(pb::GetJobRequest { id: id.clone() })
                .await
                .expect("get")
                .into_inner()
                .job
                .expect("the job");
            if job.state == pb::JobState::Completed as i32 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{job:?}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }

        stop.send(()).unwrap();
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), serving)
            .await
            .expect("the server stops once its shutdown future resolves")
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
        assert!(
            !home.file("server.addr").exists(),
            "a stopped server takes its address back"
        );
    });
}
