//! queuectld under a service manager: READY=1 once it serves, watchdog pings from the scheduler, STOPPING=1 when
//! it drains, and jobs that never see the manager's socket. The test owns the notification socket.

#![cfg(unix)]

mod common;

use std::os::unix::net::UnixDatagram;

use common::{DEADLINE, Home};

fn messages(socket: &UnixDatagram, until: impl Fn(&str) -> bool) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    loop {
        let read = socket
            .recv(&mut buf)
            .expect("a notification before the deadline");
        let message = String::from_utf8_lossy(&buf[..read]).into_owned();
        let done = until(&message);
        seen.push(message);
        if done {
            return seen;
        }
    }
}

#[test]
fn queuectld_notifies_readiness_watchdog_and_stopping() {
    let mut home = Home::new();
    let path = home.file("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let mut server = home.server_command(1);
    server
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID");
    home.start_server_with(server);

    let ready = messages(&socket, |message| message.contains("READY=1"));
    assert!(
        ready.last().unwrap().contains("STATUS=serving on "),
        "{ready:?}"
    );
    // The interval is 0.1 s: pings arrive while the server idles.
    let pings = messages(&socket, |message| message.contains("WATCHDOG=1"));
    assert_eq!(pings.last().unwrap().trim(), "WATCHDOG=1");

    home.enqueue(r#"{"command":"env"}"#);
    home.wait_for_state("job1", "completed");
    let env = home.ok(&["logs", "job1"]);
    for secret in ["NOTIFY_SOCKET", "WATCHDOG_USEC"] {
        assert!(!env.contains(secret), "a job saw {secret}");
    }

    home.ok(&["server", "stop"]);
    let stopping = messages(&socket, |message| message.contains("STOPPING=1"));
    assert!(!stopping.is_empty());
    assert!(common::wait_for_exit(home.server(), DEADLINE).success());
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing; .ci/run installs systemd"
        );
        eprintln!("skipping: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for unit in [
        "contrib/systemd/queuectld.service",
        "contrib/systemd/user/queuectld.service",
    ] {
        let text = std::fs::read_to_string(unit).unwrap();
        // verify insists that ExecStart exists: point it at the binary under test.
        let text = text.replace("/usr/local/bin/queuectld", common::QUEUECTLD);
        let copy = dir.path().join("queuectld.service");
        std::fs::write(&copy, text).unwrap();
        let output = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        assert!(
            output.status.success() && output.stderr.is_empty(),
            "{unit}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// `WATCHDOG_USEC=0` is no watchdog: the server never pings, where it used to ping without pause.
#[test]
fn a_zero_watchdog_timeout_means_no_watchdog() {
    let mut home = Home::new();
    let path = home.file("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    // Read everything the server sends as it comes, so that a flood of pings cannot block it.
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let received = received.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match socket.recv(&mut buf) {
                    Ok(read) => {
                        let message = String::from_utf8_lossy(&buf[..read]).into_owned();
                        let stopping = message.contains("STOPPING=1");
                        received.lock().unwrap().push(message);
                        if stopping {
                            return;
                        }
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(error) => panic!("{error}"),
                }
            }
        })
    };
    let mut server = home.server_command(0);
    server
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "0")
        .env_remove("WATCHDOG_PID");
    home.start_server_with(server);
    home.ok(&["status"]);
    home.ok(&["server", "stop"]);
    assert!(common::wait_for_exit(home.server(), DEADLINE).success());
    reader.join().unwrap();
    let received = received.lock().unwrap();
    let pings = received
        .iter()
        .filter(|message| message.contains("WATCHDOG=1"))
        .count();
    assert_eq!(pings, 0, "{} messages", received.len());
}
