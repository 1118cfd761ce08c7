//! Clients against a server that does not answer or that stops: no client waits forever, and no client keeps a
//! stopping server alive.

#![cfg(unix)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{DEADLINE, Home};
use tokio_stream::StreamExt;

/// What a client may take to give up on a server that does not answer: its connect timeout and deadline, with
/// room for a slow CI machine.
const GIVE_UP: Duration = Duration::from_secs(15);

fn signal(pid: u32, name: &str) {
    assert!(
        Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// Runs `command` and returns its exit code and how long it took; kills it and fails the test after `limit`.
fn run_within(mut command: Command, what: &str, limit: Duration) -> (Option<i32>, Duration) {
    let start = Instant::now();
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn status_enqueue_and_health_give_up_on_a_stopped_server() {
    let mut home = Home::with_server(0);
    let pid = home.server().id();
    signal(pid, "STOP");
    for args in [
        &["status"][..],
        &["enqueue", r#"{"command":"true"}"#],
        &["health"],
    ] {
        let (code, took) = run_within(home.command(args), &format!("queuectl {args:?}"), GIVE_UP);
        assert!(
            code.is_some_and(|code| code != 0),
            "queuectl {args:?} against a stopped server exited {code:?}"
        );
        eprintln!("queuectl {args:?} gave up after {took:?}");
    }
    signal(pid, "CONT");
    home.ok(&["status"]);
    assert_eq!(
        home.count("pending"),
        0,
        "a timed-out enqueue is not stored"
    );
}

#[test]
fn health_gives_up_within_its_one_second_probe_limit() {
    let mut home = Home::with_server(0);
    let pid = home.server().id();
    signal(pid, "STOP");
    let (code, took) = run_within(home.command(&["health"]), "queuectl health", GIVE_UP);
    signal(pid, "CONT");
    assert_eq!(
        code,
        Some(3),
        "health of a stopped server is a failed check"
    );
    assert!(
        took < Duration::from_secs(5),
        "health took {took:?}, past its 1 s probe limit"
    );
}

#[test]
fn a_health_watcher_does_not_keep_a_stopping_server_alive() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut home = Home::with_server(0);
    let socket = home.file("queuectl.sock");
    let runtime = runtime();
    let mut watch = runtime.block_on(async {
        let channel = queuectl::channel::unix(socket).await.unwrap();
        HealthClient::new(channel)
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner()
    });
    let first = runtime.block_on(watch.next()).unwrap().unwrap();
    assert_eq!(first.status().as_str_name(), "SERVING");
    let start = Instant::now();
    signal(home.server().id(), "TERM");
    // The watcher is told, then its stream ends, instead of holding the connection open.
    let ended = runtime.block_on(async {
        tokio::time::timeout(DEADLINE, async {
            while let Some(Ok(_)) = watch.next().await {}
        })
        .await
    });
    assert!(ended.is_ok(), "the Health.Watch stream stayed open");
    let status = home.wait_server_exit();
    assert!(status.success(), "the server exited with {status}");
    eprintln!("the server exited {:?} after SIGTERM", start.elapsed());
}

#[test]
fn an_open_health_watcher_lets_sigterm_end_the_server_within_the_grace() {
    let mut home = Home::with_server(0);
    home.ok(&["config", "set", "shutdown_grace", "2"]);
    let socket = home.file("queuectl.sock");
    let runtime = runtime();
    let _watch = runtime.block_on(async {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let channel = queuectl::channel::unix(socket).await.unwrap();
        HealthClient::new(channel)
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner()
    });
    let start = Instant::now();
    signal(home.server().id(), "TERM");
    let status = home.wait_server_exit();
    let took = start.elapsed();
    assert!(status.success(), "the server exited with {status}");
    assert!(
        took < Duration::from_secs(2) + GIVE_UP,
        "the server took {took:?} to exit after SIGTERM with a grace of 2 s"
    );
    eprintln!("the server exited {took:?} after SIGTERM");
}
