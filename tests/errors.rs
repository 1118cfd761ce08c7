//! Errors a program can act on: every refusal carries `google.rpc.ErrorInfo` with a stable reason, a bad field is
//! named in `google.rpc.BadRequest`, the codes are the ones the gRPC conventions give, and no error repeats a huge
//! input. Read here by the generated Rust client and by a stock Python client (grpcio-status).

#![cfg(unix)]

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::Home;
use queuectl::pb::{self, queue_service_client::QueueServiceClient};
use tonic::Code;
use tonic_types::StatusExt;

/// What a refusal tells a program: its code, ErrorInfo reason and metadata, and the fields BadRequest names.
#[derive(Debug)]
struct Refusal {
    code: Code,
    reason: String,
    metadata: HashMap<String, String>,
    fields: Vec<String>,
    message: String,
}

fn refusal<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Refusal {
    let status = result.expect_err("the request is refused");
    let details = status.get_error_details();
    let info = details
        .error_info()
        .expect("every refusal has an ErrorInfo");
    assert_eq!(info.domain, "queuectl");
    Refusal {
        code: status.code(),
        reason: info.reason.clone(),
        metadata: info.metadata.clone(),
        fields: details
            .bad_request()
            .map(|bad| {
                bad.field_violations
                    .iter()
                    .map(|violation| violation.field.clone())
                    .collect()
            })
            .unwrap_or_default(),
        message: status.message().to_owned(),
    }
}

fn client(
    home: &Home,
) -> (
    tokio::runtime::Runtime,
    QueueServiceClient<tonic::transport::Channel>,
) {
    let runtime = common::runtime();
    let channel = runtime
        .block_on(queuectl::channel::unix(home.file("queuectl.sock")))
        .unwrap();
    (runtime, QueueServiceClient::new(channel))
}

fn enqueue(command: &str) -> pb::EnqueueRequest {
    pb::EnqueueRequest {
        command: command.into(),
        ..Default::default()
    }
}

#[test]
fn each_refusal_has_a_stable_reason_and_names_the_field_at_fault() {
    let home = Home::with_server(0);
    let (runtime, mut queue) = client(&home);

    let bad_priority = refusal(runtime.block_on(queue.enqueue(pb::EnqueueRequest {
        priority: Some(11),
        ..enqueue("true")
    })));
    assert_eq!(bad_priority.code, Code::InvalidArgument);
    assert_eq!(bad_priority.reason, "INVALID_FIELD");
    assert_eq!(bad_priority.fields, ["priority"]);

    let in_batch = refusal(
        runtime.block_on(queue.enqueue_batch(pb::EnqueueBatchRequest {
            jobs: vec![
                enqueue("true"),
                pb::EnqueueRequest {
                    env: HashMap::from([("A=B".to_owned(), "1".to_owned())]),
                    ..enqueue("true")
                },
            ],
        })),
    );
    assert_eq!(
        (in_batch.code, in_batch.reason.as_str()),
        (Code::InvalidArgument, "INVALID_FIELD")
    );
    assert_eq!(in_batch.fields, ["jobs[1].env"]);
    assert!(
        in_batch.message.starts_with("jobs[1]: env:"),
        "{in_batch:?}"
    );

    let missing =
        refusal(runtime.block_on(queue.get_job(pb::GetJobRequest { id: "ghost".into() })));
    assert_eq!(
        (missing.code, missing.reason.as_str()),
        (Code::NotFound, "JOB_NOT_FOUND")
    );
    assert_eq!(
        missing.metadata.get("job_id").map(String::as_str),
        Some("ghost")
    );
    // The message is for any client, not only for users of the CLI.
    assert_eq!(missing.message, "no job with id 'ghost'");

    let empty_id =
        refusal(runtime.block_on(queue.get_job(pb::GetJobRequest { id: String::new() })));
    assert_eq!(
        (empty_id.code, empty_id.reason.as_str()),
        (Code::InvalidArgument, "INVALID_FIELD")
    );
    assert_eq!(empty_id.fields, ["id"]);

    runtime
        .block_on(queue.enqueue(pb::EnqueueRequest {
            id: Some("once".into()),
            ..enqueue("true")
        }))
        .unwrap();
    let duplicate = refusal(runtime.block_on(queue.enqueue(pb::EnqueueRequest {
        id: Some("once".into()),
        ..enqueue("true")
    })));
    assert_eq!(
        (duplicate.code, duplicate.reason.as_str()),
        (Code::AlreadyExists, "DUPLICATE_ID")
    );
    assert_eq!(duplicate.fields, ["id"]);

    let not_dead =
        refusal(runtime.block_on(queue.dlq_retry(pb::DlqRetryRequest { id: "once".into() })));
    assert_eq!(
        (not_dead.code, not_dead.reason.as_str()),
        (Code::FailedPrecondition, "JOB_NOT_RETRYABLE")
    );
    assert_eq!(
        not_dead.metadata.get("job_id").map(String::as_str),
        Some("once")
    );

    let not_final =
        refusal(runtime.block_on(queue.delete_job(pb::DeleteJobRequest { id: "once".into() })));
    assert_eq!(
        (not_final.code, not_final.reason.as_str()),
        (Code::FailedPrecondition, "JOB_NOT_FINAL")
    );

    let unknown_dependency = refusal(runtime.block_on(queue.enqueue(pb::EnqueueRequest {
        after: vec!["ghost".into()],
        ..enqueue("true")
    })));
    assert_eq!(
        (unknown_dependency.code, unknown_dependency.reason.as_str()),
        (Code::InvalidArgument, "DEPENDENCY_NOT_FOUND")
    );
    assert_eq!(unknown_dependency.fields, ["after"]);

    let unknown_key =
        refusal(runtime.block_on(queue.get_config(pb::GetConfigRequest { key: "nope".into() })));
    assert_eq!(unknown_key.fields, ["key"]);
}

#[test]
fn a_huge_input_is_never_repeated_in_the_error() {
    let home = Home::with_server(0);
    let (runtime, mut queue) = client(&home);
    let huge = "x".repeat(100_000);
    for result in [
        runtime
            .block_on(queue.list(pb::ListRequest {
                page_token: huge.clone(),
                ..Default::default()
            }))
            .map(|_| ()),
        runtime
            .block_on(queue.get_config(pb::GetConfigRequest { key: huge.clone() }))
            .map(|_| ()),
        runtime
            .block_on(queue.get_job(pb::GetJobRequest { id: huge.clone() }))
            .map(|_| ()),
        runtime
            .block_on(queue.enqueue(pb::EnqueueRequest {
                env: HashMap::from([(format!("{huge}="), String::new())]),
                ..enqueue("true")
            }))
            .map(|_| ()),
    ] {
        let status = result.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(status.message().len() < 300, "{}", status.message());
    }
}

/// What a stock Python client (grpcio, grpcio-status) makes of requests no generated client would send.
fn python_refusal(home: &Home, request_bytes: &str) -> String {
    let script = r#"
import sys, grpc
from grpc_status import rpc_status
from google.rpc import error_details_pb2
with grpc.insecure_channel("unix:" + sys.argv[1]) as channel:
    call = channel.unary_unary("/queuectl.v1.QueueService/Enqueue")
    try:
        call(eval(sys.argv[2]))
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                print(error.code().name, info.reason, info.domain)
"#;
    common::succeeds(
        Command::new("python3")
            .args(["-c", script])
            .arg(home.file("queuectl.sock"))
            .arg(request_bytes),
    )
}

#[test]
fn requests_that_do_not_decode_or_are_too_large_get_the_conventional_codes() {
    if !common::python_has("grpc, grpc_status", "grpcio grpcio-status") {
        return;
    }
    let home = Home::with_server(0);
    // Field 1 (command) as a string of 0xff bytes: not UTF-8, so not an EnqueueRequest.
    assert_eq!(
        python_refusal(&home, r#"b"\x0a\x02\xff\xff""#),
        "INVALID_ARGUMENT MALFORMED_REQUEST queuectl\n"
    );
    assert_eq!(
        python_refusal(&home, r#"b"\x0a\x03" + b"x" * 3 + b"\x12" * (2 << 20)"#),
        "RESOURCE_EXHAUSTED REQUEST_TOO_LARGE queuectl\n"
    );
    // Nothing was stored by either.
    assert_eq!(home.count("pending"), 0);
}
