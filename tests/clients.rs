//! Clients against a server that does not answer or that stops: no client waits forever, and no client keeps a
//! stopping server alive.

#![cfg(unix)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{DEADLINE, Home, wait_until};
use tokio_stream::StreamExt;

/// What a client may take to give up on a server that does not answer: its 30 s deadline, with room for a slow
/// CI machine.
const GIVE_UP: Duration = Duration::from_secs(45);

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

#[test]
fn status_enqueue_and_health_give_up_on_a_stopped_server() {
    let mut home = Home::with_server(0);
    let pid = home.server().id();
    common::signal(pid, "STOP");
    let commands: [&[&str]; 3] = [
        &["status"],
        &["enqueue", r#"{"command":"true"}"#],
        &["health"],
    ];
    // Side by side, so that the test waits one deadline, not three.
    std::thread::scope(|scope| {
        let home = &home;
        let runs: Vec<_> = commands
            .iter()
            .map(|args| {
                scope.spawn(move || {
                    let what = format!("queuectl {args:?}");
                    (what.clone(), run_within(home.command(args), &what, GIVE_UP))
                })
            })
            .collect();
        for run in runs {
            let (what, (code, took)) = run.join().unwrap();
            assert!(
                code.is_some_and(|code| code != 0),
                "{what} against a stopped server exited {code:?}"
            );
            eprintln!("{what} gave up after {took:?}");
        }
    });
    common::signal(pid, "CONT");
    // Resumed, it answers again; the enqueue that timed out may or may not have been stored, as its message says.
    home.ok(&["status"]);
}

#[test]
fn health_gives_up_within_its_one_second_probe_limit() {
    let mut home = Home::with_server(0);
    let pid = home.server().id();
    common::signal(pid, "STOP");
    let (code, took) = run_within(home.command(&["health"]), "queuectl health", GIVE_UP);
    common::signal(pid, "CONT");
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
    let runtime = common::runtime();
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
    common::signal(home.server().id(), "TERM");
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
    let runtime = common::runtime();
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
    common::signal(home.server().id(), "TERM");
    let status = home.wait_server_exit();
    let took = start.elapsed();
    assert!(status.success(), "the server exited with {status}");
    assert!(
        took < Duration::from_secs(2) + GIVE_UP,
        "the server took {took:?} to exit after SIGTERM with a grace of 2 s"
    );
    eprintln!("the server exited {took:?} after SIGTERM");
}

/// The server's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|value| value.trim().parse().ok())
        .expect("a VmRSS line");
    kib * 1024
}

#[cfg(target_os = "linux")]
#[test]
fn watchers_that_never_read_cost_bounded_memory_and_are_told_they_fell_behind() {
    const WATCHERS: usize = 300;
    const LIMIT: u64 = 100 * 1024 * 1024;
    let mut home = Home::with_server(1);
    let pid = home.server().id();
    let socket = home.file("queuectl.sock");
    // Each watcher on its own connection, as separate clients would be. Nothing drives this runtime until the
    // job has ended, so the watchers do not even read their sockets.
    let runtime = common::runtime();
    let mut watchers = runtime.block_on(async {
        let mut watchers = Vec::new();
        for _ in 0..WATCHERS {
            let channel = queuectl::channel::unix(socket.clone()).await.unwrap();
            let mut client = queuectl::pb::queue_service_client::QueueServiceClient::new(channel);
            let stream = client
                .watch_events(queuectl::pb::WatchEventsRequest::default())
                .await
                .unwrap()
                .into_inner();
            watchers.push(stream);
        }
        watchers
    });
    let before = rss(pid);
    // 8 MiB of output in all, in jobs small enough that storing their output costs little memory itself.
    let ids: Vec<String> = (0..32)
        .map(|_| home.enqueue(r#"{"command":"head -c 262144 /dev/zero"}"#))
        .collect();
    let mut peak = before;
    wait_until("the jobs to complete", DEADLINE, || {
        peak = peak.max(rss(pid));
        home.count("completed") == ids.len() as u64
    });
    let settled = Instant::now();
    while settled.elapsed() < Duration::from_secs(1) {
        peak = peak.max(rss(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mib = |bytes: u64| bytes / (1024 * 1024);
    eprintln!(
        "{WATCHERS} watchers that never read: server RSS {} MiB before the job, peak {} MiB",
        mib(before),
        mib(peak)
    );
    assert!(
        peak < LIMIT,
        "the server's RSS peaked at {} MiB with {WATCHERS} watchers that never read",
        mib(peak)
    );
    // Each watcher reads what was kept for it, then learns that it fell behind.
    let told = runtime.block_on(async {
        let mut told = 0;
        for watcher in &mut watchers {
            let end = tokio::time::timeout(DEADLINE, async {
                loop {
                    match watcher.next().await {
                        Some(Ok(_)) => {}
                        Some(Err(status)) => return Some(status),
                        None => return None,
                    }
                }
            })
            .await
            .expect("the watcher's stream ends");
            if let Some(status) = end {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("fell behind"), "{status:?}");
                told += 1;
            }
        }
        told
    });
    assert_eq!(told, WATCHERS, "every watcher is told it fell behind");
}

fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(Result::ok)
                .filter(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn sleeping(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, after_name) = stat.rsplit_once(')')?;
            Some(after_name.trim_start().starts_with('S'))
        })
        .unwrap_or(false)
}

#[cfg(target_os = "linux")]
#[test]
fn wait_that_falls_behind_checks_its_jobs_again_and_still_finishes() {
    const JOBS: usize = 16;
    let mut home = Home::with_server(0);
    for _ in 0..JOBS {
        home.enqueue(r#"{"command":"head -c 262144 /dev/zero"}"#);
    }
    let server = home.server().id();
    let connections = sockets(server);
    let stderr = home.file("wait.err");
    let mut wait = home
        .command(&["wait"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    // Connected, and asleep at two looks in a row: waiting on its stream, not on a quick call.
    let mut quiet = 0;
    wait_until("`queuectl wait` to watch", DEADLINE, || {
        let waiting = sockets(server) > connections && sleeping(wait.id());
        quiet = if waiting { quiet + 1 } else { 0 };
        quiet >= 2
    });
    // Stopped, it reads nothing while 4 MiB of output goes by, far more than a watcher may have waiting.
    common::signal(wait.id(), "STOP");
    home.ok(&["worker", "start", "--count", "2", "--daemon"]);
    wait_until("every job to complete", DEADLINE, || {
        home.count("completed") == JOBS as u64
    });
    common::signal(wait.id(), "CONT");
    let status = common::wait_for_exit(&mut wait, DEADLINE);
    let said = std::fs::read_to_string(&stderr).unwrap();
    assert!(status.success(), "wait exited {status}: {said}");
    assert!(
        said.contains("missed some job events"),
        "wait did not fall behind, so this test checked nothing: {said:?}"
    );
}

#[test]
fn events_are_numbered_in_order_with_their_time_and_run() {
    use queuectl::pb::watch_events_response::Event;
    let home = Home::with_server(1);
    let socket = home.file("queuectl.sock");
    let runtime = common::runtime();
    let mut events = runtime.block_on(async {
        let channel = queuectl::channel::unix(socket).await.unwrap();
        let mut client = queuectl::pb::queue_service_client::QueueServiceClient::new(channel);
        client
            .watch_events(queuectl::pb::WatchEventsRequest::default())
            .await
            .unwrap()
            .into_inner()
    });
    for _ in 0..3 {
        home.enqueue(r#"{"command":"echo hi"}"#);
    }
    let mut seen = Vec::new();
    let mut finished = 0;
    while finished < 3 {
        let response = runtime
            .block_on(async { tokio::time::timeout(DEADLINE, events.next()).await })
            .expect("events within the deadline")
            .expect("the stream goes on")
            .unwrap();
        let time = response.time.expect("every event has a time");
        if let Some(Event::JobFinished(done)) = &response.event {
            assert_eq!(done.run, 1, "{done:?}");
            finished += 1;
        }
        seen.push((response.seq, (time.seconds, time.nanos)));
    }
    assert!(
        seen.len() >= 3 * 3,
        "picked, output, finished for each: {seen:?}"
    );
    for pair in seen.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "numbers without gaps: {seen:?}");
        assert!(pair[1].1 >= pair[0].1, "times in order: {seen:?}");
    }
}
