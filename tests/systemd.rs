//! queuectld under a service manager: READY=1 once it serves, watchdog pings from the scheduler, STOPPING=1 when
//! it drains, and jobs that never see the manager's socket. The test owns the notification socket. The unit files
//! in `contrib/systemd` pass `systemd-analyze verify` and keep their hardening.

#![cfg(unix)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// The system unit and the user unit.
const UNITS: [&str; 2] = [
    "contrib/systemd/queuectld.service",
    "contrib/systemd/user/queuectld.service",
];

/// Whether `systemd-analyze` is installed; without it a test skips, except in CI, where it fails.
fn has_systemd_analyze() -> bool {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    common::skip("systemd-analyze is not installed");
    false
}

/// A copy of `unit` as `dir/queuectld.service`, its ExecStart pointed at the binary under test: verify insists
/// that it exists.
fn unit_copy(dir: &Path, unit: &str) -> PathBuf {
    let text = std::fs::read_to_string(unit).unwrap();
    let text = text.replace("/usr/local/bin/queuectld", common::QUEUECTLD);
    let copy = dir.join("queuectld.service");
    std::fs::write(&copy, text).unwrap();
    copy
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    if !has_systemd_analyze() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for unit in UNITS {
        let output = Command::new("systemd-analyze")
            .arg("verify")
            .arg(unit_copy(dir.path(), unit))
            .output()
            .unwrap();
        assert!(
            output.status.success() && output.stderr.is_empty(),
            "{unit}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// `systemd-analyze security` rates each unit no worse than its hardening reached with systemd 252, so that a
/// setting dropped by mistake fails here: removing most of them one at a time adds 0.1 or more. A newer systemd
/// may weigh the settings differently; then measure again and say so in the unit's comment.
#[test]
fn the_unit_files_keep_their_hardening() {
    if !has_systemd_analyze() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The most exposure allowed, in tenths.
    for (unit, limit) in UNITS.into_iter().zip([17, 65]) {
        let mut command = Command::new("systemd-analyze");
        command.args(["security", "--offline=yes"]);
        if unit.contains("/user/") {
            // As the user's manager runs it (its defaults differ: KeyringMode=inherit); that wants a runtime dir.
            command.arg("--user").env("XDG_RUNTIME_DIR", dir.path());
        }
        let output = command.arg(unit_copy(dir.path(), unit)).output().unwrap();
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{unit}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let exposure =
            exposure(&report).unwrap_or_else(|| panic!("{unit}: no overall exposure in\n{report}"));
        assert!(
            exposure <= limit,
            "{unit}: exposure {}.{} is over {}.{}\n{report}",
            exposure / 10,
            exposure % 10,
            limit / 10,
            limit % 10
        );
    }
}

/// The overall exposure in tenths, from the line `→ Overall exposure level for queuectld.service: 1.7 OK 🙂`.
fn exposure(report: &str) -> Option<u32> {
    let line = report
        .lines()
        .find(|line| line.contains("Overall exposure level for "))?;
    let (_, level) = line.rsplit_once(": ")?;
    let (whole, tenths) = level.split_whitespace().next()?.split_once('.')?;
    Some(whole.parse::<u32>().ok()? * 10 + tenths.parse::<u32>().ok()?)
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
