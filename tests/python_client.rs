//! A client generated from the proto in another language: `clients/python` is generated afresh with
//! grpcio-tools, as the package `queuectl_grpc`, and its example runs against a real server.

#![cfg(unix)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Home, python_has_grpc_tools};

/// What a Python client prints for `script`, run with the client generated into `home`'s `generated`.
fn run_python(home: &Home, script: &str) -> String {
    run_python_after(home, &[], script)
}

/// [`run_python`] with `first` ahead of the generated client on PYTHONPATH.
fn run_python_after(home: &Home, first: &[PathBuf], script: &str) -> String {
    let generated = common::generate_python_client(home);
    let path = std::env::join_paths(first.iter().chain([&generated])).unwrap();
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(home.file("queuectl.sock"))
        .env("PYTHONPATH", path)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    printed
}

#[test]
fn a_default_python_channel_on_the_socket_just_works() {
    if !python_has_grpc_tools() {
        return;
    }
    let home = Home::with_server(0);
    // grpc C-core sends the socket's path as the HTTP/2 :authority (see vendor/README.md); no option is set here.
    let printed = run_python(
        &home,
        r#"
import sys, grpc
from queuectl_grpc.v1 import queue_pb2, queue_pb2_grpc
with grpc.insecure_channel("unix:" + sys.argv[1]) as channel:
    queue = queue_pb2_grpc.QueueServiceStub(channel)
    job = queue.Enqueue(queue_pb2.EnqueueRequest(command="true")).job
    status = queue.Status(queue_pb2.StatusRequest())
    print(f"enqueued {job.id}, {status.pending} pending")
"#,
    );
    assert_eq!(
        printed,
        "enqueued job1, 1 pending
"
    );
}

/// PyPI has an unrelated package called `queuectl`: installed, or first on the path as here, it must not hide the
/// generated client, which is therefore the package `queuectl_grpc`.
#[test]
fn an_unrelated_queuectl_package_ahead_on_the_path_does_not_hide_the_client() {
    if !python_has_grpc_tools() {
        return;
    }
    let home = Home::with_server(0);
    let unrelated = home.file("unrelated");
    std::fs::create_dir_all(unrelated.join("queuectl")).unwrap();
    std::fs::write(
        unrelated.join("queuectl/__init__.py"),
        "NAME = 'unrelated'\n",
    )
    .unwrap();
    let printed = run_python_after(
        &home,
        &[unrelated],
        r#"
import sys, grpc, queuectl
from queuectl_grpc.v1 import queue_pb2, queue_pb2_grpc
with grpc.insecure_channel("unix:" + sys.argv[1]) as channel:
    status = queue_pb2_grpc.QueueServiceStub(channel).Status(queue_pb2.StatusRequest())
    print(f"queuectl is {queuectl.NAME}; {status.pending} pending")
"#,
    );
    assert_eq!(printed, "queuectl is unrelated; 0 pending\n");
}

#[test]
fn the_generated_python_client_drives_a_real_server() {
    if !python_has_grpc_tools() {
        return;
    }
    let home = Home::with_server(1);
    let generated = common::generate_python_client(&home);
    let output = Command::new("python3")
        .arg("clients/python/example.py")
        .arg(format!("unix://{}", home.file("queuectl.sock").display()))
        .env("PYTHONPATH", &generated)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in [
        "enqueued job1 (JOB_STATE_PENDING)",
        "worker 0 picked job1",
        "job1 finished: JOB_STATE_COMPLETED",
        "attempt 1 (ok): hello from python",
        "refused: INVALID_ARGUMENT: priority must be 1-10, got 11",
    ] {
        assert!(printed.contains(line), "{line:?} missing from:\n{printed}");
    }
    assert_eq!(home.state("job1"), "completed");
}
