//! Runs one shell command: in its own process group, in its job's directory and environment, its output passed on
//! as it is read, killed as a group on timeout or when stopped, always reaped.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

#[cfg(unix)]
use tokio::io::AsyncWriteExt;
use tokio::io::{AsyncRead, AsyncReadExt};
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

pub fn noop_executor() -> bool {
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

/// Every job shell carries `QUEUECTL_GATE=<server id>` in its own environment (its command does not see it): a
/// shell started ahead of its job has no run tag yet, and a restarted server must still know it for one of its own.
pub const GATE_VARIABLE: &str = "QUEUECTL_GATE";

/// What a job shell runs before it knows its job: the script the server writes to its stdin, read to the end.
/// Without the hold, a server killed right after the spawn would leave processes behind that its successor cannot
/// find; a server that dies before it wrote the script closes the pipe, and the shell ends having run nothing.
/// `/proc/self/fd/0` rather than `/dev/stdin`, which a minimal container may lack.
#[cfg(unix)]
const GATE: &str = if cfg!(target_os = "linux") {
    ". /proc/self/fd/0"
} else {
    ". /dev/stdin"
};

/// A shell in its own process group, started before its job is known and held until [`Gate::start`] gives it one.
/// Its process group can thus be recorded with the claim of its job, in the same commit.
pub struct Gate {
    /// `None` for the benchmark's no-op executor.
    shell: Option<Child>,
    /// What holds the shell's processes; `None` once they run their job.
    attempt: Option<crate::containment::Attempt>,
}

impl Gate {
    /// Starts a held shell for server `server_id`. `Err` is the outcome of a run that cannot begin: the spawn
    /// failed (for want of resources, the job runs again without losing an attempt).
    pub fn spawn(server_id: &str) -> Result<Gate, Outcome> {
        if noop_executor() {
            return Ok(Gate {
                shell: None,
                attempt: None,
            });
        }
        #[cfg(unix)]
        {
            let mut shell = Command::new("/bin/sh");
            shell.arg("-c").arg(GATE).arg("/bin/sh");
            // Its own process group, so that a timeout or a stop reaches everything the command started.
            shell.process_group(0);
            for name in SCRUBBED_ENV {
                shell.env_remove(name);
            }
            shell.env(GATE_VARIABLE, server_id);
            shell.current_dir(working_directory(&JobContext::default()));
            shell
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            match shell.spawn() {
                Ok(child) => Ok(Gate {
                    attempt: child.id().map(crate::containment::Attempt::hold),
                    shell: Some(child),
                }),
                Err(error) => Err(spawn_failure(error)),
            }
        }
        #[cfg(windows)]
        {
            let _ = server_id;
            Ok(Gate {
                shell: None,
                attempt: None,
            })
        }
    }

    /// The process group every process of the run will belong to.
    pub fn pgid(&self) -> Option<u32> {
        self.shell.as_ref().and_then(Child::id)
    }

    /// Gives the shell its job: its directory, its environment with the run's tag, and its command, which then runs
    /// as `/bin/sh -c` would run it (`$0` is `/bin/sh`, no positional parameters). `Err` is the outcome of a run
    /// that ended before it began: its directory is missing, or the benchmark's no-op executor stands in for it.
    pub async fn start(self, spec: RunSpec<'_>) -> Result<Gated, Outcome> {
        if let Some(cwd) = &spec.context.cwd
            && !Path::new(cwd).is_dir()
        {
            return Err(Outcome::Failed(Failure::NoDirectory(cwd.clone())));
        }
        #[cfg(unix)]
        {
            let mut gate = self;
            let Some(mut child) = gate.shell.take() else {
                return Err(Outcome::Succeeded);
            };
            // A shell that waited long may have been killed meanwhile: the job then runs again later, at no cost.
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Outcome::NotStarted(format!(
                    "the shell that waited for the job ended first ({status})"
                )));
            }
            let pgid = child.id();
            let mut attempt = gate
                .attempt
                .take()
                .unwrap_or_else(crate::containment::Attempt::none);
            attempt.tag(spec.tag);
            if let Some(mut stdin) = child.stdin.take() {
                // The command then sees its stdin at its end, as with /dev/null. A failed write means the shell is
                // gone already, which its exit status reports.
                let _ = stdin.write_all(script(&spec).as_bytes()).await;
            }
            Ok(Gated {
                child,
                pgid,
                attempt,
                timeout: spec.timeout,
            })
        }
        #[cfg(windows)]
        {
            if noop_executor() {
                return Err(Outcome::Succeeded);
            }
            let mut shell = Command::new("cmd");
            shell.arg("/C").arg(spec.command).stdin(Stdio::null());
            for name in SCRUBBED_ENV {
                shell.env_remove(name);
            }
            shell.envs(&spec.context.env).env(TAG_VARIABLE, spec.tag);
            shell.current_dir(working_directory(spec.context));
            shell
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let child = shell.spawn().map_err(spawn_failure)?;
            Ok(Gated {
                pgid: child.id(),
                attempt: crate::containment::Attempt::none(),
                child,
                timeout: spec.timeout,
            })
        }
    }
}

impl Drop for Gate {
    /// A shell that never got its job ends: its pipe closes, and `kill_on_drop` sees to it.
    fn drop(&mut self) {
        if let Some(attempt) = self.attempt.take() {
            attempt.abandon();
        }
    }
}

/// The script a held shell runs for `spec`, on one line: the shell reads a whole line before it runs any of it, so
/// a script cut short (a server killed while writing it) leaves a quote open and runs nothing.
#[cfg(unix)]
fn script(spec: &RunSpec<'_>) -> String {
    let mut script = format!("unset {GATE_VARIABLE}; ");
    if let Some(cwd) = &spec.context.cwd {
        script += &format!("cd -- {} || exit; ", shell_quoted(cwd));
    }
    let tag = format!("{TAG_VARIABLE}={}", spec.tag);
    let variables = std::iter::once(tag).chain(
        spec.context
            .env
            .iter()
            .map(|(name, value)| format!("{name}={value}")),
    );
    let quoted: Vec<String> = variables.map(|variable| shell_quoted(&variable)).collect();
    if spec.context.env.keys().all(|name| is_shell_name(name)) {
        // `exit` at once: otherwise the shell reads on for more script, and ends only at the end of its stdin, which
        // comes once every copy of the pipe is closed (a shell being started for another worker holds one until
        // it runs `sh`).
        script += &format!(
            "export {}; eval {}; exit\n",
            quoted.join(" "),
            shell_quoted(spec.command)
        );
    } else {
        // The shell cannot set a variable whose name is not a shell name (`a.b`); env(1) can, at the cost of a
        // second shell.
        script += &format!(
            "exec env {} /bin/sh -c {}\n",
            quoted.join(" "),
            shell_quoted(spec.command)
        );
    }
    script
}

/// `text` in single quotes, for the shell: every byte stands for itself.
#[cfg(unix)]
fn shell_quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Whether `name` can be a shell variable's name: a letter or `_`, then letters, digits and `_`.
#[cfg(unix)]
fn is_shell_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|rest| rest.is_ascii_alphanumeric() || rest == '_')
}

fn spawn_failure(error: std::io::Error) -> Outcome {
    if out_of_resources(&error) {
        Outcome::NotStarted(error.to_string())
    } else {
        Outcome::Failed(Failure::Spawn(error.to_string()))
    }
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
/// run's: one of its processes carries the run's tag, or is a shell that server `server_id` started (which may not
/// have received its job). Returns whether it sent the signal.
pub fn kill_group(pgid: u32, tag: &str, server_id: &str) -> bool {
    #[cfg(target_os = "linux")]
    {
        let wanted = [
            format!("{TAG_VARIABLE}={tag}"),
            format!("{GATE_VARIABLE}={server_id}"),
        ];
        if !group_carries_any(pgid, &wanted) {
            return false;
        }
    }
    #[cfg(unix)]
    {
        #[cfg(not(target_os = "linux"))]
        let _ = (tag, server_id);
        signal_group(pgid, libc::SIGKILL);
        true
    }
    #[cfg(windows)]
    {
        let _ = (pgid, tag, server_id);
        false
    }
}

/// Whether some process of group `pgid` has one of the `wanted` variables in its environment.
#[cfg(target_os = "linux")]
fn group_carries_any(pgid: u32, wanted: &[String]) -> bool {
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
                    .any(|entry| wanted.iter().any(|wanted| entry == wanted.as_bytes()))
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

/// A command's shell, given its job.
pub struct Gated {
    child: Child,
    pgid: Option<u32>,
    attempt: crate::containment::Attempt,
    timeout: Option<Duration>,
}

impl Gated {
    /// Runs the command to its end. `output` gets what it prints, piece by piece in the order read, and holds the
    /// command back while it is full. When `stop` resolves first, the command's processes are ended and the run
    /// ends with the outcome it gave.
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

        /// The id of the server the tests' shells say they belong to.
        const SERVER: &str = "test-host-0123";

        async fn gated(spec: RunSpec<'_>) -> Gated {
            let gate = Gate::spawn(SERVER).expect("the shell starts");
            match gate.start(spec).await {
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
            tokio::join!(gated(spec).await.run(stop, output), collect)
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

        #[tokio::test]
        async fn a_missing_directory_fails_the_attempt_before_its_command_runs() {
            let context = JobContext {
                cwd: Some("/no/such/place".into()),
                env: Default::default(),
            };
            let spec = RunSpec {
                context: &context,
                ..spec("true", "job1#1", None)
            };
            match Gate::spawn(SERVER)
                .expect("the shell starts")
                .start(spec)
                .await
            {
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

        /// The variables in the environment process `pid` started with.
        fn environment_of(pid: u32) -> Vec<String> {
            std::fs::read(format!("/proc/{pid}/environ"))
                .unwrap_or_default()
                .split(|byte| *byte == 0)
                .map(|entry| String::from_utf8_lossy(entry).into_owned())
                .collect()
        }

        #[tokio::test]
        async fn a_held_shell_runs_nothing_until_it_gets_its_job_and_nothing_if_it_never_does() {
            let dir = tempfile::tempdir().unwrap();
            let marker = dir.path().join("ran");
            let gate = Gate::spawn(SERVER).expect("the shell starts");
            let pgid = gate.pgid().expect("the shell has a process group");
            // Its process group is led by the shell, which is alive, held, and says whose it is.
            assert!(alive(i32::try_from(pgid).unwrap()));
            if cfg!(target_os = "linux") {
                // Read until it shows: a read of /proc while the new process is still being set up can come back
                // empty (seen once in a full run).
                let gate_variable = format!("{GATE_VARIABLE}={SERVER}");
                let deadline = Instant::now() + Duration::from_secs(5);
                while !environment_of(pgid).contains(&gate_variable) {
                    assert!(
                        Instant::now() < deadline,
                        "the held shell's environment never showed {gate_variable}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            let deadline = Instant::now() + Duration::from_millis(300);
            while Instant::now() < deadline {
                assert!(alive(i32::try_from(pgid).unwrap()), "the held shell ended");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // A server that goes away closes the pipe: the shell ends without running anything.
            drop(gate);
            assert!(!outlived(i32::try_from(pgid).unwrap()).await);

            let command = format!("touch '{}'; echo \"$QUEUECTL_GATE\"", marker.display());
            let (outcome, pieces) = run_to_end(&command, "job1#1").await;
            assert_eq!(outcome, Outcome::Succeeded);
            assert!(marker.exists(), "the command ran once it was given");
            assert_eq!(
                text(&pieces, None),
                "\n",
                "the job does not see the gate's variable"
            );
        }

        #[tokio::test]
        async fn a_job_given_to_a_shell_that_was_killed_meanwhile_runs_again_later() {
            let gate = Gate::spawn(SERVER).expect("the shell starts");
            let pid = i32::try_from(gate.pgid().expect("the shell has a process group")).unwrap();
            // SAFETY: kill(2) only sends a signal.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            assert!(!outlived(pid).await, "SIGKILL ended the shell");
            match gate.start(spec("true", "job1#1", None)).await {
                Err(Outcome::NotStarted(reason)) => {
                    assert!(reason.contains("ended first"), "{reason}");
                }
                Err(outcome) => panic!("the job's run ended as {outcome}"),
                Ok(_) => panic!("the job went to a shell that was gone"),
            }
        }

        /// dash drops a variable whose name is not a shell name from what its children inherit, but the shell of
        /// the command starts with it, as it did when the server set it.
        #[cfg(target_os = "linux")]
        #[tokio::test]
        async fn a_job_gets_its_directory_and_every_variable_even_those_the_shell_cannot_name() {
            let dir = tempfile::tempdir().unwrap();
            let context = JobContext {
                cwd: Some(dir.path().display().to_string()),
                env: [
                    ("PLAIN", "it's \"quoted\" $HOME `x` \\"),
                    ("dotted.name", "value"),
                ]
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
            };
            let command = r#"printf '%s|%s|%s|%s' "$PWD" "$PLAIN" "$QUEUECTL_JOB" "$0"; tr '\0' '\n' < /proc/$$/environ | grep '^dotted.name='"#;
            let spec = RunSpec {
                context: &context,
                ..spec(command, "job9#3", None)
            };
            let (output, mut pieces) = mpsc::channel(16);
            let outcome = gated(spec).await.run(std::future::pending(), output).await;
            assert_eq!(outcome, Outcome::Succeeded);
            let mut seen = Vec::new();
            while let Ok(piece) = pieces.try_recv() {
                seen.push(piece);
            }
            let real = dir.path().canonicalize().unwrap();
            assert_eq!(
                text(&seen, None),
                format!(
                    "{}|it's \"quoted\" $HOME `x` \\|job9#3|/bin/shdotted.name=value\n",
                    real.display()
                )
            );
        }
    }
}
