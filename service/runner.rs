//! Runs one shell command: in its own process group, in its job's directory and environment, its output passed on
//! as it is read, killed as a group on timeout or when stopped, always reaped.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use crate::job::{Failure, JobContext, Outcome};
use crate::output::Stream;

/// Variables a job must not inherit from the server: its secrets and its service manager's handles.
const SCRUBBED_ENV: [&str; 8] = [
    "QUEUECTL_TOKEN",
    "QUEUECTL_DATABASE_URL",
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// How long a job's processes get between SIGTERM and SIGKILL.
#[cfg(unix)]
const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long output is still read once the command ended, for bytes in flight.
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// Benchmark only: with `QUEUECTL_BENCH_EXECUTOR=noop` in the server's environment every command succeeds at once
/// without a process, so that `queuectl-bench` can measure what the store and the scheduler alone can do.
pub const BENCH_EXECUTOR_ENV: &str = "QUEUECTL_BENCH_EXECUTOR";

fn noop_executor() -> bool {
    static NOOP: OnceLock<bool> = OnceLock::new();
    *NOOP.get_or_init(|| std::env::var(BENCH_EXECUTOR_ENV).is_ok_and(|value| value == "noop"))
}

/// Every process of a run carries `QUEUECTL_JOB=<id>#<run>` in its environment: the job can tell which run it is,
/// and a restarted server kills a recorded process group only if its processes carry the tag of that run (after a
/// reboot, the same group id may belong to anything).
pub const TAG_VARIABLE: &str = "QUEUECTL_JOB";

pub fn run_tag(job_id: &str, run: u32) -> String {
    format!("{job_id}#{run}")
}

pub struct RunSpec<'a> {
    pub command: &'a str,
    /// [`run_tag`] of this run.
    pub tag: &'a str,
    pub timeout: Option<Duration>,
    pub context: &'a JobContext,
}

/// What a command printed: which pipe, and the bytes read from it at once.
pub type Piece = (Stream, Vec<u8>);

/// How long pipe reads are, at most.
const READ_SIZE: usize = 8192;

/// Holds the command until its process group is on record, then runs it as `/bin/sh -c` would: `$0` is `/bin/sh`,
/// there are no positional parameters (`shift` drops the command itself). Without the hold, a server killed right
/// after the spawn would leave processes behind that its successor cannot find. `eval` in the same shell, rather
/// than `exec /bin/sh -c`, spares every job the start of a second shell (about 1 ms here); the one visible
/// difference is that the shell's own error messages say `eval:` (`/bin/sh: 1: eval: foo: not found`).
#[cfg(unix)]
const GATE: &str = r#"read -r _ && eval "shift; $1""#;

fn shell(command: &str, tag: &str, context: &JobContext) -> Command {
    #[cfg(unix)]
    let mut shell = {
        let mut shell = Command::new("/bin/sh");
        shell.arg("-c").arg(GATE).arg("/bin/sh").arg(command);
        // Its own process group, so that a timeout or a stop reaches everything the command started.
        shell.process_group(0);
        shell.stdin(Stdio::piped());
        shell
    };
    #[cfg(windows)]
    let mut shell = {
        let mut shell = Command::new("cmd");
        shell.arg("/C").arg(command);
        shell.stdin(Stdio::null());
        shell
    };
    for name in SCRUBBED_ENV {
        shell.env_remove(name);
    }
    shell.envs(&context.env);
    shell.env(TAG_VARIABLE, tag);
    shell.current_dir(working_directory(context));
    shell
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    shell
}

/// Marks every descriptor the server inherited, beyond stdin, stdout and stderr, close-on-exec, so that jobs get
/// none of them: whoever started the server may have left files, sockets or pipes open. Call once, at start;
/// everything the server opens itself is close-on-exec already.
#[cfg(unix)]
pub fn stop_inheriting_descriptors() {
    let listing = if cfg!(target_os = "linux") {
        "/proc/self/fd"
    } else {
        "/dev/fd"
    };
    let Ok(entries) = std::fs::read_dir(listing) else {
        tracing::warn!(
            listing,
            "cannot list open descriptors; jobs may inherit some"
        );
        return;
    };
    let inherited: Vec<libc::c_int> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in inherited {
        // SAFETY: fcntl(2) on a descriptor number only reads and sets its flags; one that is closed meanwhile (the
        // listing's own) makes it fail harmlessly.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Where a job's attempts start: its `cwd`, or the home directory of the user the server runs as (the root
/// directory when there is none).
fn working_directory(context: &JobContext) -> PathBuf {
    if let Some(cwd) = &context.cwd {
        return PathBuf::from(cwd);
    }
    let home = if cfg!(windows) { "USERPROFILE" } else { "HOME" };
    std::env::var_os(home)
        .map(PathBuf::from)
        .filter(|home| home.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Whether a failed spawn is the server's fault, not the command's: no descriptors, processes or memory left.
fn out_of_resources(error: &std::io::Error) -> bool {
    #[cfg(unix)]
    if let Some(code) = error.raw_os_error() {
        return [libc::EMFILE, libc::ENFILE, libc::EAGAIN, libc::ENOMEM].contains(&code);
    }
    error.kind() == std::io::ErrorKind::OutOfMemory
}

/// The outcome of a command that ended by itself.
pub fn outcome_of(status: ExitStatus) -> Outcome {
    if status.success() {
        return Outcome::Succeeded;
    }
    if let Some(code) = status.code() {
        return Outcome::Failed(Failure::Exit(code));
    }
    #[cfg(unix)]
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
        return Outcome::Failed(Failure::Signal(signal));
    }
    Outcome::Failed(Failure::Exit(-1))
}

/// Sends `signal` to every process of the group led by `pgid`. A group that is gone already is not an error.
#[cfg(unix)]
pub fn signal_group(pgid: u32, signal: i32) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid) {
        // SAFETY: kill(2) with a negative pid only sends a signal; it touches no memory of ours.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// Kills what is left of a run's process group, e.g. one a crashed server left behind, if the group is still that
/// run's. Returns whether it sent the signal.
pub fn kill_group(pgid: u32, tag: &str) -> bool {
    #[cfg(target_os = "linux")]
    if !group_carries_tag(pgid, tag) {
        return false;
    }
    #[cfg(unix)]
    {
        #[cfg(not(target_os = "linux"))]
        let _ = tag;
        signal_group(pgid, libc::SIGKILL);
        true
    }
    #[cfg(windows)]
    {
        let _ = (pgid, tag);
        false
    }
}

/// Whether some process of group `pgid` has `QUEUECTL_JOB=<tag>` in its environment.
#[cfg(target_os = "linux")]
fn group_carries_tag(pgid: u32, tag: &str) -> bool {
    let wanted = format!("{TAG_VARIABLE}={tag}");
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return false;
    };
    processes.flatten().any(|process| {
        let path = process.path();
        let in_group = std::fs::read_to_string(path.join("stat")).is_ok_and(|stat| {
            // After the command name in parentheses: state, parent pid, process group.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<u32>().ok())
                == Some(pgid)
        });
        in_group
            && std::fs::read(path.join("environ")).is_ok_and(|environ| {
                environ
                    .split(|byte| *byte == 0)
                    .any(|entry| entry == wanted.as_bytes())
            })
    })
}

/// Ends a command: SIGTERM to its group, SIGKILL after [`KILL_GRACE`], and reaps it.
async fn terminate(child: &mut Child) {
    #[cfg(unix)]
    if let Some(pgid) = child.id() {
        signal_group(pgid, libc::SIGTERM);
        if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_ok() {
            signal_group(pgid, libc::SIGKILL);
            return;
        }
        signal_group(pgid, libc::SIGKILL);
    }
    let _ = child.kill().await;
}

enum Ending {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
    Stopped(Outcome),
}

/// Reads what is left in a pipe, for at most `DRAIN_LIMIT`.
async fn drain(pipe: &mut (impl AsyncRead + Unpin), stream: Stream, output: &mpsc::Sender<Piece>) {
    let mut buf = [0u8; READ_SIZE];
    let deadline = Instant::now() + DRAIN_LIMIT;
    while let Ok(Ok(read)) = tokio::time::timeout_at(deadline, pipe.read(&mut buf)).await {
        if read == 0 {
            break;
        }
        let _ = output.send((stream, buf[..read].to_vec())).await;
    }
}

/// A command's shell, started and held at its gate: its process group exists, so it can be put on record before
/// anything of the command runs.
pub struct Gated {
    child: Child,
    pgid: Option<u32>,
    attempt: crate::containment::Attempt,
    timeout: Option<Duration>,
}

/// Starts the shell for `spec`, held at its gate. `Err` is the outcome of a run that ended before it began: its
/// directory is missing, the spawn failed (for want of resources, the job runs again without losing an attempt),
/// or the benchmark's no-op executor stands in for the command.
pub fn spawn(spec: RunSpec<'_>) -> Result<Gated, Outcome> {
    if noop_executor() {
        return Err(Outcome::Succeeded);
    }
    if let Some(cwd) = &spec.context.cwd
        && !Path::new(cwd).is_dir()
    {
        return Err(Outcome::Failed(Failure::NoDirectory(cwd.clone())));
    }
    match shell(spec.command, spec.tag, spec.context).spawn() {
        Ok(child) => {
            let pgid = child.id();
            Ok(Gated {
                attempt: crate::containment::enter(spec.tag, pgid),
                child,
                pgid,
                timeout: spec.timeout,
            })
        }
        Err(error) if out_of_resources(&error) => Err(Outcome::NotStarted(error.to_string())),
        Err(error) => Err(Outcome::Failed(Failure::Spawn(error.to_string()))),
    }
}

impl Gated {
    /// The process group every process of the run belongs to.
    pub fn pgid(&self) -> Option<u32> {
        self.pgid
    }

    /// Opens the gate and runs the command to its end. `output` gets what it prints, piece by piece in the order
    /// read, and holds the command back while it is full. When `stop` resolves first, the command's processes are
    /// ended and the run ends with the outcome it gave.
    pub async fn run(
        self,
        stop: impl Future<Output = Outcome>,
        output: mpsc::Sender<Piece>,
    ) -> Outcome {
        let Gated {
            mut child,
            pgid,
            attempt,
            timeout,
        } = self;
        if let Some(mut gate) = child.stdin.take() {
            // Opens the gate; the command then sees its stdin closed, as with /dev/null. A failed write means the
            // shell is gone already, which its exit status reports.
            let _ = gate.write_all(b"\n").await;
        }

        let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take())
        else {
            unreachable!("both pipes were asked for");
        };
        let deadline = timeout.map(|limit| Instant::now() + limit);
        let (mut out_buf, mut err_buf) = ([0u8; READ_SIZE], [0u8; READ_SIZE]);
        let (mut out_open, mut err_open) = (true, true);
        tokio::pin!(stop);

        let ending = loop {
            tokio::select! {
                read = stdout.read(&mut out_buf), if out_open => match read {
                    Ok(read) if read > 0 => {
                        let _ = output.send((Stream::Stdout, out_buf[..read].to_vec())).await;
                    }
                    _ => out_open = false,
                },
                read = stderr.read(&mut err_buf), if err_open => match read {
                    Ok(read) if read > 0 => {
                        let _ = output.send((Stream::Stderr, err_buf[..read].to_vec())).await;
                    }
                    _ => err_open = false,
                },
                status = child.wait() => break Ending::Exited(status),
                () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    break Ending::TimedOut;
                }
                outcome = &mut stop => break Ending::Stopped(outcome),
            }
        };

        let outcome = match ending {
            Ending::Exited(status) => {
                // The shell is done; whatever it left running in its group goes with it.
                #[cfg(unix)]
                if let Some(pgid) = pgid {
                    signal_group(pgid, libc::SIGKILL);
                }
                #[cfg(windows)]
                let _ = pgid;
                match status {
                    Ok(status) => outcome_of(status),
                    Err(error) => Outcome::Failed(Failure::Spawn(error.to_string())),
                }
            }
            Ending::TimedOut => {
                terminate(&mut child).await;
                Outcome::Failed(Failure::Timeout)
            }
            Ending::Stopped(outcome) => {
                terminate(&mut child).await;
                outcome
            }
        };
        attempt.end().await;
        if out_open {
            drain(&mut stdout, Stream::Stdout, &output).await;
        }
        if err_open {
            drain(&mut stderr, Stream::Stderr, &output).await;
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    #[cfg(unix)]
    mod unix {
        use std::path::Path;

        use super::super::*;

        /// How long a test waits for something that should happen at once.
        const PATIENCE: Duration = Duration::from_secs(10);

        fn status_of(script: &str) -> ExitStatus {
            std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(script)
                .status()
                .expect("/bin/sh runs")
        }

        #[test]
        fn exit_statuses_map_to_outcomes() {
            assert_eq!(outcome_of(status_of("exit 0")), Outcome::Succeeded);
            assert_eq!(
                outcome_of(status_of("exit 3")),
                Outcome::Failed(Failure::Exit(3))
            );
            assert_eq!(
                outcome_of(status_of("kill -9 $$")),
                Outcome::Failed(Failure::Signal(9))
            );
        }

        static NO_CONTEXT: JobContext = JobContext {
            cwd: None,
            env: std::collections::BTreeMap::new(),
        };

        fn spec<'a>(command: &'a str, tag: &'a str, timeout: Option<Duration>) -> RunSpec<'a> {
            RunSpec {
                command,
                tag,
                timeout,
                context: &NO_CONTEXT,
            }
        }

        fn gated(spec: RunSpec<'_>) -> Gated {
            match spawn(spec) {
                Ok(gated) => gated,
                Err(outcome) => panic!("the shell did not start: {outcome}"),
            }
        }

        /// Runs `spec` to its end with `stop`; the outcome and the pieces of output, in the order read.
        async fn run_with(
            spec: RunSpec<'_>,
            stop: impl Future<Output = Outcome>,
        ) -> (Outcome, Vec<Piece>) {
            let (output, mut pieces) = mpsc::channel(4);
            let collect = async move {
                let mut seen = Vec::new();
                while let Some(piece) = pieces.recv().await {
                    seen.push(piece);
                }
                seen
            };
            tokio::join!(gated(spec).run(stop, output), collect)
        }

        /// Runs `command` to its end, without timeout or stop.
        async fn run_to_end(command: &str, tag: &str) -> (Outcome, Vec<Piece>) {
            run_with(spec(command, tag, None), std::future::pending()).await
        }

        /// What the pieces hold, one stream or both.
        fn text(pieces: &[Piece], only: Option<Stream>) -> String {
            let bytes: Vec<u8> = pieces
                .iter()
                .filter(|(stream, _)| only.is_none_or(|only| only == *stream))
                .flat_map(|(_, data)| data.iter().copied())
                .collect();
            String::from_utf8(bytes).unwrap()
        }

        /// Whether process `pid` still runs (a zombie does not: it only waits to be reaped).
        fn alive(pid: i32) -> bool {
            #[cfg(target_os = "linux")]
            {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    let state = stat
                        .rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().next());
                    !matches!(state, Some("Z" | "X") | None)
                })
            }
            #[cfg(not(target_os = "linux"))]
            {
                // SAFETY: kill(2) with signal 0 only checks that the process exists.
                unsafe { libc::kill(pid, 0) == 0 }
            }
        }

        /// Waits for process `pid` to be gone; kills it if it outlives the patience, and says whether it did.
        async fn outlived(pid: i32) -> bool {
            let deadline = Instant::now() + PATIENCE;
            while alive(pid) {
                if Instant::now() >= deadline {
                    // SAFETY: kill(2) only sends a signal.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }

        /// Waits for the file at `path` to exist, and returns its contents.
        async fn appears(path: &Path) -> String {
            let deadline = Instant::now() + PATIENCE;
            loop {
                if let Ok(text) = std::fs::read_to_string(path) {
                    return text;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} did not appear in time",
                    path.display()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        /// A command that leaves `sleep 30` running in the background, writes its pid to `pid_file` (whole, by a
        /// rename), and waits for it.
        fn with_background_sleep(pid_file: &Path) -> String {
            let path = pid_file.display();
            format!("sleep 30 & echo $! > '{path}.tmp' && mv '{path}.tmp' '{path}'; wait")
        }

        fn pid_in(text: &str) -> i32 {
            text.trim().parse().expect("a pid")
        }

        #[tokio::test]
        async fn a_run_passes_on_stdout_and_stderr_tagged() {
            let (outcome, pieces) =
                run_to_end("echo to-stdout; echo to-stderr >&2; exit 3", "job1#1").await;
            assert_eq!(outcome, Outcome::Failed(Failure::Exit(3)));
            assert_eq!(text(&pieces, Some(Stream::Stdout)), "to-stdout\n");
            assert_eq!(text(&pieces, Some(Stream::Stderr)), "to-stderr\n");
        }

        #[tokio::test]
        async fn a_run_starts_in_its_directory_with_its_variables() {
            let dir = tempfile::tempdir().unwrap();
            let context = JobContext {
                cwd: Some(dir.path().display().to_string()),
                env: [("GREETING".to_owned(), "hello there".to_owned())].into(),
            };
            let spec = RunSpec {
                context: &context,
                ..spec(r#"printf '%s|%s' "$(pwd -P)" "$GREETING""#, "job1#1", None)
            };
            let (outcome, pieces) = run_with(spec, std::future::pending()).await;
            assert_eq!(outcome, Outcome::Succeeded);
            let real = dir.path().canonicalize().unwrap();
            assert_eq!(
                text(&pieces, None),
                format!("{}|hello there", real.display())
            );
        }

        #[test]
        fn a_missing_directory_fails_the_attempt_before_any_shell_starts() {
            let context = JobContext {
                cwd: Some("/no/such/place".into()),
                env: Default::default(),
            };
            let spec = RunSpec {
                context: &context,
                ..spec("true", "job1#1", None)
            };
            match spawn(spec) {
                Err(outcome) => assert_eq!(
                    outcome.to_string(),
                    "cwd: no such directory: /no/such/place"
                ),
                Ok(_) => panic!("a shell started in a missing directory"),
            }
        }

        #[tokio::test]
        async fn a_timeout_kills_the_whole_process_group() {
            let dir = tempfile::tempdir().unwrap();
            let pid_file = dir.path().join("pid");
            let command = with_background_sleep(&pid_file);
            let (outcome, _) = run_with(
                spec(&command, "job1#1", Some(Duration::from_secs(1))),
                std::future::pending(),
            )
            .await;
            assert_eq!(outcome, Outcome::Failed(Failure::Timeout));
            let text = std::fs::read_to_string(&pid_file)
                .expect("the command wrote its background pid before its timeout");
            assert!(
                !outlived(pid_in(&text)).await,
                "the background process outlived the timeout"
            );
        }

        #[tokio::test]
        async fn a_stop_ends_the_run_with_its_outcome_and_kills_its_group() {
            let dir = tempfile::tempdir().unwrap();
            let pid_file = dir.path().join("pid");
            let command = with_background_sleep(&pid_file);
            let (stop, stopped) = tokio::sync::oneshot::channel();
            let running = run_with(spec(&command, "job1#1", None), async {
                stopped.await.unwrap_or(Outcome::Interrupted)
            });
            let stopping = async {
                let pid = pid_in(&appears(&pid_file).await);
                stop.send(Outcome::Cancelled("by a test".into())).unwrap();
                pid
            };
            let ((outcome, _), pid) =
                tokio::time::timeout(PATIENCE, async { tokio::join!(running, stopping) })
                    .await
                    .expect("the stop ended the run");
            assert_eq!(outcome, Outcome::Cancelled("by a test".into()));
            assert!(
                !outlived(pid).await,
                "the background process outlived the stop"
            );
        }

        #[tokio::test]
        async fn a_job_carries_its_tag_but_not_the_servers_secrets() {
            // SAFETY: tests of this crate set no other variable, and std's own readers take its environment lock.
            unsafe {
                std::env::set_var("QUEUECTL_TOKEN", "server-secret");
            }
            assert_eq!(std::env::var("QUEUECTL_TOKEN").unwrap(), "server-secret");
            let (outcome, pieces) = run_to_end(
                r#"printf '%s|%s' "$QUEUECTL_JOB" "${QUEUECTL_TOKEN-unset}""#,
                "job7#2",
            )
            .await;
            assert_eq!(outcome, Outcome::Succeeded);
            assert_eq!(text(&pieces, None), "job7#2|unset");
        }

        #[tokio::test]
        async fn a_command_waits_at_its_gate_until_run() {
            let dir = tempfile::tempdir().unwrap();
            let marker = dir.path().join("ran");
            let command = format!("touch '{}'", marker.display());
            let gated = gated(spec(&command, "job1#1", None));
            let pgid = gated.pgid().expect("the shell has a process group");
            // Its process group is led by the shell, which is alive and held.
            assert!(alive(i32::try_from(pgid).unwrap()));
            let deadline = Instant::now() + Duration::from_millis(300);
            while Instant::now() < deadline {
                assert!(!marker.exists(), "the command ran before its gate opened");
                assert!(alive(i32::try_from(pgid).unwrap()), "the held shell ended");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let (output, _pieces) = mpsc::channel(1);
            let outcome = gated.run(std::future::pending(), output).await;
            assert_eq!(outcome, Outcome::Succeeded);
            assert!(marker.exists(), "the command ran once its gate opened");
        }
    }
}
