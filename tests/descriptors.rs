//! Running out of descriptors is the server's trouble, not the jobs': a job the server cannot start waits and runs
//! again without losing an attempt, and idle connections (which need no token) cannot use up what jobs need.

#![cfg(unix)]

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::{DEADLINE, Home, wait_until};

/// Makes `command` start with at most `limit` open descriptors (soft and hard).
fn with_descriptor_limit(command: &mut Command, limit: libc::rlim_t) {
    // SAFETY: setrlimit(2) is async-signal-safe and reads only the struct passed to it.
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Lets this test process open as many descriptors as it may.
fn raise_own_descriptor_limit() {
    queuectl::connections::raise_descriptor_limit();
}

fn server_log(home: &Home) -> String {
    std::fs::read_to_string(home.file("test-server.log")).unwrap()
}

/// 48 workers on 64 descriptors, with jobs that hold their worker until a gate opens: once some of them run, the
/// server has no descriptor left for the next spawn. Those jobs are not charged an attempt (they have none to
/// spare), wait a moment and run; every one completes once the gate opens.
#[test]
fn jobs_the_server_cannot_start_wait_and_run_again_without_losing_an_attempt() {
    let mut home = Home::new();
    let mut server = home.server_command(0);
    with_descriptor_limit(&mut server, 64);
    home.start_server_with(server);
    let gate = home.file("gate");
    let ids: Vec<String> = (0..96)
        .map(|n| {
            home.enqueue(&format!(
                r#"{{"id":"j{n}","command":"while [ ! -e {} ]; do sleep 0.05; done","max_retries":0}}"#,
                gate.display()
            ))
        })
        .collect();
    // All at once, and with no job running yet: a request needs a descriptor too.
    home.ok(&["worker", "start", "--count", "48", "--daemon"]);
    wait_until("a spawn to fail for want of descriptors", DEADLINE, || {
        let log = server_log(&home);
        log.contains("could not start a job") && log.contains("Too many open files")
    });
    std::fs::write(&gate, "").unwrap();
    wait_until("every job to complete", Duration::from_secs(120), || {
        home.count("completed") == ids.len() as u64
    });
    let jobs = home.jobs(&[]);
    assert_eq!(jobs.len(), ids.len());
    for job in &jobs {
        assert_eq!(job["state"], "completed", "{job}");
        assert_eq!(job["attempts"], 0, "{job}");
    }
}

/// 1,100 idle TCP connections against a server allowed 1,024 descriptors, while 20 jobs start one after another:
/// the server keeps descriptors for its jobs (it caps connections and closes silent ones), and every job completes.
#[test]
fn a_flood_of_idle_connections_does_not_starve_the_jobs() {
    raise_own_descriptor_limit();
    let home = Home::new();
    let mut command = home.server_command(1);
    command.args(["--listen", "http://127.0.0.1:0"]);
    with_descriptor_limit(&mut command, 1024);
    let mut server = command.spawn().unwrap();
    let address_file = home.file("server.addr");
    wait_until("the server to write its address", DEADLINE, || {
        std::fs::read_to_string(&address_file).is_ok_and(|url| url.starts_with("http://"))
    });
    let url = std::fs::read_to_string(&address_file).unwrap();
    let url = url.trim();
    let go = home.file("go");
    let ran = home.file("ran");
    home.ok(&[
        "--server",
        url,
        "enqueue",
        &format!(
            r#"{{"id":"blocker","priority":1,"command":"while [ ! -e {} ]; do sleep 0.05; done"}}"#,
            go.display()
        ),
    ]);
    for n in 0..20 {
        home.ok(&[
            "--server",
            url,
            "enqueue",
            &format!(
                r#"{{"id":"j{n}","command":"echo $QUEUECTL_JOB >> {}","max_retries":0}}"#,
                ran.display()
            ),
        ]);
    }

    let address = url.trim_start_matches("http://");
    let flood: Vec<std::net::TcpStream> = (0..1100)
        .filter_map(|_| std::net::TcpStream::connect(address).ok())
        .collect();
    assert!(
        flood.len() > 1000,
        "the flood opened {} connections",
        flood.len()
    );
    std::fs::write(&go, "").unwrap();
    wait_until("the 20 jobs to run during the flood", DEADLINE, || {
        std::fs::read_to_string(&ran).is_ok_and(|ran| ran.lines().count() == 20)
    });
    drop(flood);

    wait_until("the server to take requests again", DEADLINE, || {
        home.try_queuectl(&["--server", url, "status"])
            .status
            .success()
    });
    let jobs: Vec<serde_json::Value> = home
        .ok(&["--server", url, "list"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(jobs.len(), 21);
    for job in &jobs {
        assert_eq!(job["state"], "completed", "{job}");
    }
    let _ = server.kill();
    let _ = server.wait();
}
