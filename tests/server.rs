//! The server's promises, through the real binaries: nothing lost across restarts and kills, bad input refused
//! without side effects, timeouts that reach the whole process group, owner-only access.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use common::{DEADLINE, Home, wait_until};

#[test]
fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    let home = Home::with_server(0);
    home.enqueue(r#"{"id":"keep","command":"echo kept","priority":2}"#);
    home.ok(&["config", "set", "backoff_base", "3"]);
    let before = home.ok(&["list"]);

    let long_command = format!(r#"{{"command":"{}"}}"#, "x".repeat(70 * 1024));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["enqueue", "{"], "not valid JSON"),
        (vec!["enqueue", "[]"], "must be a JSON object"),
        (vec!["enqueue", "{}"], "needs a \"command\""),
        (vec!["enqueue", r#"{"command":""}"#], "command is required"),
        (
            vec!["enqueue", r#"{"command":"   "}"#],
            "command is required",
        ),
        (
            vec!["enqueue", r#"{"command":42}"#],
            "command must be a string",
        ),
        (vec!["enqueue", r#"{"command":"a\u0000b"}"#], "NUL"),
        (vec!["enqueue", &long_command], "at most 65536 bytes"),
        (
            vec!["enqueue", r#"{"command":"x","priority":0}"#],
            "priority must be 1-10, got 0",
        ),
        (
            vec!["enqueue", r#"{"command":"x","priority":11}"#],
            "priority must be 1-10, got 11",
        ),
        (
            vec!["enqueue", r#"{"command":"x","priority":-1}"#],
            "priority must be 1-10, got -1",
        ),
        (
            vec!["enqueue", r#"{"command":"x","priority":"1"}"#],
            "priority must be an integer",
        ),
        (
            vec!["enqueue", r#"{"command":"x","priority":1.5}"#],
            "priority must be 1-10",
        ),
        (
            vec!["enqueue", r#"{"command":"x","max_retries":-1}"#],
            "max_retries must be 0-1000",
        ),
        (
            vec!["enqueue", r#"{"command":"x","max-retries":100000}"#],
            "max_retries must be 0-1000",
        ),
        (
            vec!["enqueue", r#"{"command":"x","timeout":-3}"#],
            "timeout must be",
        ),
        (
            vec!["enqueue", r#"{"command":"x","timeout":99999999}"#],
            "timeout must be",
        ),
        (
            vec!["enqueue", r#"{"command":"x","colour":"red"}"#],
            "unknown key \"colour\"",
        ),
        (
            vec!["enqueue", r#"{"command":"x","id":"keep"}"#],
            "already exists",
        ),
        (
            vec!["enqueue", r#"{"command":"x","id":""}"#],
            "id must not be empty",
        ),
        (
            vec!["enqueue", r#"{"command":"x","id":"a b"}"#],
            "id may hold only",
        ),
        (
            vec!["enqueue", r#"{"command":"x","id":7}"#],
            "id must be a string",
        ),
        (
            vec!["config", "set", "backoff_base", "0"],
            "backoff_base must be an integer in 1-1000",
        ),
        (
            vec!["config", "set", "backoff_base", "99999999999999999999"],
            "backoff_base must be",
        ),
        (
            vec!["config", "set", "nope", "1"],
            "unknown config key 'nope'",
        ),
        (vec!["config", "get", "nope"], "unknown config key 'nope'"),
        (vec!["dlq", "retry", "ghost"], "no job with id 'ghost'"),
        (
            vec!["dlq", "retry", "keep"],
            "is pending; only dead or cancelled jobs can be retried",
        ),
        (vec!["cancel", "ghost"], "no job with id 'ghost'"),
        (
            vec!["remove", "keep"],
            "is pending; only completed, dead and cancelled jobs can be deleted",
        ),
        (
            vec!["enqueue", r#"{"command":"x","delay":"soon"}"#],
            "delay \"soon\" is not a duration",
        ),
        (
            vec!["enqueue", r#"{"command":"x","run_at":"2026-13-45"}"#],
            "run_at \"2026-13-45\" is not a time",
        ),
        (vec!["logs", "ghost"], "no job with id 'ghost'"),
        (vec!["get", "ghost"], "no job with id 'ghost'"),
        (
            vec!["worker", "start", "--count", "0", "--daemon"],
            "count must be 1-1024",
        ),
    ];
    assert!(cases.len() >= 30);
    for (args, expected) in &cases {
        let stderr = home.fails(args);
        assert!(
            stderr.contains(expected),
            "queuectl {args:?}: expected {expected:?} in {stderr:?}"
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one line for {args:?}: {stderr:?}"
        );
    }
    assert_eq!(home.ok(&["list"]), before, "nothing stored changed");
    assert_eq!(home.ok(&["config", "get", "backoff_base"]), "3\n");
}

/// 8 processes enqueue 500 jobs each while 4 workers drain: every id unique, every job run exactly once.
#[test]
fn concurrent_enqueues_from_many_processes_get_unique_ids_and_all_run_once() {
    const PROCESSES: usize = 8;
    const EACH: usize = 500;
    let home = Home::with_server(4);
    let runs = home.file("runs");
    let processes: Vec<_> = (0..PROCESSES)
        .map(|p| {
            let script = format!(
                r#"for i in $(seq {EACH}); do {} enqueue "{{\"id\":\"p{p}-$i\",\"command\":\"echo p{p}-$i >> {}\"}}" || exit 1; done"#,
                common::QUEUECTL,
                runs.display()
            );
            let mut command = std::process::Command::new("sh");
            command
                .arg("-c")
                .arg(script)
                .env("QUEUECTL_HOME", home.path())
                .env("QUEUECTL_NO_AUTOSTART", "1")
                .stdout(Stdio::piped());
            command.spawn().unwrap()
        })
        .collect();
    let mut ids = BTreeSet::new();
    for process in processes {
        let output = process.wait_with_output().unwrap();
        assert!(output.status.success());
        for line in String::from_utf8(output.stdout).unwrap().lines() {
            assert!(
                ids.insert(line.strip_prefix("Enqueued job ").unwrap().to_owned()),
                "{line} twice"
            );
        }
    }
    let total = PROCESSES * EACH;
    assert_eq!(ids.len(), total);
    wait_until("every job to complete", Duration::from_secs(300), || {
        home.count("completed") == total as u64
    });
    let ran: Vec<String> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ran.len(), total, "no job ran twice");
    assert_eq!(ran.into_iter().collect::<BTreeSet<_>>(), ids);
}

#[test]
fn jobs_and_settings_survive_a_restart() {
    let mut home = Home::with_server(0);
    home.enqueue(r#"{"command":"echo one"}"#);
    home.enqueue(r#"{"id":"custom","command":"echo two","priority":3}"#);
    home.ok(&["config", "set", "default_max_retries", "7"]);
    let before = home.ok(&["list"]);
    assert!(home.stop_server().success(), "a graceful stop exits 0");
    assert!(
        !home.file("queuectl.sock").exists(),
        "the socket is removed"
    );

    home.start_server(0);
    assert_eq!(home.ok(&["list"]).lines().count(), 2);
    assert_eq!(home.ok(&["list"]), before);
    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    assert_eq!(home.ok(&["config", "get", "default_max_retries"]), "7\n");
    home.wait_for_state("job1", "completed");
    home.wait_for_state("custom", "completed");
    assert_eq!(home.enqueue(r#"{"command":"true"}"#), "job2");
}

#[cfg(unix)]
#[test]
fn a_job_interrupted_by_kill_9_of_the_server_runs_again_after_restart() {
    let mut home = Home::with_server(1);
    let started = home.file("started");
    let pid_file = home.file("pid");
    let job = format!(
        r#"{{"command":"echo run >> {}; sleep 300 & echo $! > {}; wait"}}"#,
        started.display(),
        pid_file.display()
    );
    home.enqueue(&job);
    let orphan = common::pid_written_to(&pid_file);
    home.kill_server();
    assert!(
        common::alive(orphan),
        "kill -9 of the server leaves the job's processes running"
    );

    std::fs::remove_file(&pid_file).unwrap();
    home.start_server(1);
    assert!(
        !common::alive(orphan),
        "recovery killed the old run's processes before anything else"
    );
    wait_until("the job to run again", DEADLINE, || {
        std::fs::read_to_string(&started).is_ok_and(|runs| runs.lines().count() == 2)
    });
    let job = home.job("job1");
    assert_eq!(job["state"], "processing");
    assert_eq!(
        job["attempts"], 0,
        "an interrupted run is not the job's failure"
    );
    // Let it finish quickly: kill its sleep, and the job completes.
    let rerun = common::pid_written_to(&pid_file);
    kill_pid(rerun);
    home.wait_for_state("job1", "completed");
}

#[cfg(unix)]
fn kill_pid(pid: u32) {
    std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
}

#[cfg(unix)]
#[test]
fn a_timeout_kills_the_whole_process_group() {
    let home = Home::with_server(1);
    let pid_file = home.file("pid");
    let job = format!(
        r#"{{"command":"sleep 300 & echo $! > {}; wait","timeout":1,"max_retries":0}}"#,
        pid_file.display()
    );
    home.enqueue(&job);
    home.wait_for_state("job1", "dead");
    let job = home.job("job1");
    assert_eq!(job["last_error"], "timeout");
    let background: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until("the background sleep to be gone", DEADLINE, || {
        !common::alive(background)
    });
}

#[test]
fn output_is_captured_per_attempt_and_capped() {
    let home = Home::with_server(1);
    home.ok(&["config", "set", "max_output_bytes", "1000"]);
    home.enqueue(r#"{"command":"echo out; echo err >&2"}"#);
    home.enqueue(r#"{"command":"head -c 5000 /dev/zero | tr '\\0' x"}"#);
    home.wait_for_state("job1", "completed");
    let logs = home.ok(&["logs", "job1"]);
    assert!(logs.starts_with("=== job1 attempt 1 on worker 0"), "{logs}");
    assert!(logs.contains("out\n") && logs.contains("err\n"), "{logs}");

    home.wait_for_state("job2", "completed");
    let logs = home.ok(&["logs", "job2"]);
    assert!(
        logs.contains("[queuectl: output truncated, 4000 bytes dropped]"),
        "{logs}"
    );
    assert!(
        logs.len() < 1200,
        "capped at 1000 bytes, got {}",
        logs.len()
    );
}

#[test]
fn worker_start_ctrl_c_lets_the_running_job_finish() {
    let home = Home::with_server(0);
    let gate = home.file("gate");
    home.enqueue(&format!(
        r#"{{"command":"while [ ! -e {} ]; do sleep 0.05; done; echo finished"}}"#,
        gate.display()
    ));
    let mut workers = home
        .command(&["worker", "start", "--count", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    home.wait_for_state("job1", "processing");
    #[cfg(unix)]
    std::process::Command::new("kill")
        .args(["-INT", &workers.id().to_string()])
        .status()
        .unwrap();
    wait_until("the worker to be told to stop", DEADLINE, || {
        home.ok(&["status"]).contains("(stopping)")
    });
    assert_eq!(
        home.state("job1"),
        "processing",
        "the running job is not interrupted"
    );
    std::fs::write(&gate, "").unwrap();
    assert!(common::wait_for_exit(&mut workers, DEADLINE).success());
    assert_eq!(home.state("job1"), "completed");
    let mut printed = String::new();
    std::io::Read::read_to_string(workers.stdout.as_mut().unwrap(), &mut printed).unwrap();
    assert!(
        printed.contains("[worker 0] received stop signal, will exit after current job"),
        "{printed}"
    );
    assert!(
        printed.contains("finished\n[worker 0] job job1 completed\n[worker 0] exiting"),
        "{printed}"
    );
}

#[test]
fn server_stop_drains_and_exits_zero() {
    let mut home = Home::with_server(1);
    home.enqueue(r#"{"command":"sleep 0.5"}"#);
    home.wait_for_state("job1", "processing");
    assert!(home.stop_server().success());
    home.start_server(0);
    assert_eq!(
        home.state("job1"),
        "completed",
        "the running job finished within the grace period"
    );
}

#[test]
fn a_missing_server_is_one_line_that_says_how_to_start_one() {
    let home = Home::new();
    let output = home.try_queuectl(&["status"]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("start one with `queuectld`"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);
    let explicit = home
        .command(&["--server", "http://127.0.0.1:1", "status"])
        .env_remove("QUEUECTL_NO_AUTOSTART")
        .output()
        .unwrap();
    assert_eq!(
        explicit.status.code(),
        Some(3),
        "no server is started for an explicit address"
    );
}

#[cfg(unix)]
#[test]
fn a_missing_queuectld_is_an_unreachable_server() {
    let home = Home::new();
    let alone = home.file("bin");
    std::fs::create_dir(&alone).unwrap();
    let queuectl = alone.join("queuectl");
    std::fs::copy(common::QUEUECTL, &queuectl).unwrap();
    let mut status = std::process::Command::new(&queuectl);
    status
        .arg("status")
        .env("QUEUECTL_HOME", home.file("home"))
        .env_remove("QUEUECTL_NO_AUTOSTART")
        .env_remove("QUEUECTL_SERVER");
    // A child another test is starting in this process holds the copy open for writing until it runs its own
    // program, and Linux refuses to run a file open for writing (ETXTBSY): try again while that lasts.
    let deadline = std::time::Instant::now() + DEADLINE;
    let output = loop {
        match status.output() {
            Err(error)
                if error.raw_os_error() == Some(libc::ETXTBSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => break result.unwrap(),
        }
    };
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("cannot be started"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn stop_commands_never_start_a_server() {
    let home = Home::new();
    for args in [
        &["server", "stop"][..],
        &["worker", "stop"],
        &["worker", "stop", "--all"],
    ] {
        let output = home
            .command(args)
            .env_remove("QUEUECTL_NO_AUTOSTART")
            .output()
            .unwrap();
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(
            stderr.contains("no queuectl server is running"),
            "{args:?}: {stderr}"
        );
        assert!(
            !home.file("queuectl.sock").exists(),
            "{args:?} started a server"
        );
    }
}

#[cfg(unix)]
#[test]
fn only_the_owner_can_reach_the_server() {
    use std::os::unix::fs::PermissionsExt;
    let home = Home::with_server(0);
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&home.file("queuectl.sock")), 0o600);
    assert_eq!(mode(home.path()), 0o700);

    let shared = Home::new();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let output = shared
        .server_command(0)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("writable by other users"), "{stderr}");
}

#[test]
fn a_second_server_on_the_same_home_is_refused() {
    let home = Home::with_server(0);
    let output = home
        .server_command(0)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("already serves")
    );
    assert!(
        home.ok(&["status"]).starts_with("Job states:"),
        "the first one still serves"
    );
}

/// A job runs as `/bin/sh -c <command>` would run it: no positional parameters, `$0` is `/bin/sh`, its exit status
/// is the command's, and QUEUECTL_JOB names its run.
#[cfg(unix)]
#[test]
fn a_job_runs_as_sh_dash_c_would_run_it() {
    let home = Home::with_server(1);
    home.enqueue(
        r#"{"id":"shell","command":"echo \"args=$# zero=$0 run=$QUEUECTL_JOB\"\nexit 3","max_retries":0}"#,
    );
    home.wait_for_state("shell", "dead");
    let printed = home.ok(&["logs", "shell"]);
    assert!(
        printed.contains("args=0 zero=/bin/sh run=shell#1"),
        "{printed}"
    );
    let job = home.ok(&["get", "shell"]);
    assert!(
        job.contains("exit:3"),
        "the exit status is the command's: {job}"
    );
}
