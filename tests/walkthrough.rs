//! The Python queuectl README's walkthrough, steps 1-13, against the real binaries.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{DEADLINE, Home, wait_until};
use serde_json::Value;

fn started_at_secs(header: &str) -> f64 {
    // "=== job1 attempt 2 on worker 0, started 2026-01-01T00:00:02.000000+00:00: exit:127 ==="
    let stamp = header.split("started ").nth(1).unwrap();
    let stamp = &stamp[..26];
    let time = humantime::parse_rfc3339(&format!("{stamp}Z")).unwrap();
    time.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn the_old_readme_walkthrough_works_step_by_step() {
    // Autostart: the old steps run config and enqueue before any worker exists.
    let home = Home::new();
    let autostart =
        |args: &[&str]| common::succeeds(home.command(args).env_remove("QUEUECTL_NO_AUTOSTART"));

    // 1. The default configuration.
    assert_eq!(autostart(&["config", "get", "default_max_retries"]), "3\n");
    assert_eq!(home.ok(&["config", "get", "backoff_base"]), "2\n");

    // 2. Changing it.
    assert_eq!(home.ok(&["config", "set", "backoff_base", "3"]), "OK\n");
    assert_eq!(
        home.ok(&["config", "set", "default_max_retries", "4"]),
        "OK\n"
    );
    assert_eq!(home.ok(&["config", "get", "default_max_retries"]), "4\n");
    assert_eq!(home.ok(&["config", "get", "backoff_base"]), "3\n");
    home.ok(&["config", "set", "backoff_base", "2"]);
    home.ok(&["config", "set", "default_max_retries", "3"]);

    // 3. A simple job.
    assert_eq!(
        home.ok(&["enqueue", r#"{"command":"echo Hello World"}"#]),
        "Enqueued job job1\n"
    );

    // 4. Workers, attached: they print what they pick and what the job prints.
    let mut workers = home
        .command(&["worker", "start", "--count", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    // 5. The job completes.
    home.wait_for_state("job1", "completed");
    let status = home.ok(&["status"]);
    assert!(status.starts_with(
        "Job states:\n  pending: 0\n  processing: 0\n  failed: 0\n  completed: 1\n  dead: 0\n"
    ));
    assert!(status.contains("Workers: 2 "), "{status}");

    // 6. Priorities. One worker, so that jobs run one at a time in queue order.
    home.ok(&["worker", "stop"]);
    wait_until("the attached workers to exit", DEADLINE, || {
        workers.try_wait().unwrap().is_some()
    });
    let mut printed = String::new();
    std::io::Read::read_to_string(workers.stdout.as_mut().unwrap(), &mut printed).unwrap();
    for line in [
        "[worker 0] started",
        "[worker 1] started",
        "picked job job1: echo Hello World",
        "Hello World",
        "job job1 completed",
        "[worker 0] received stop signal, will exit after current job",
        "[worker 0] exiting",
        "[worker 1] exiting",
    ] {
        assert!(printed.contains(line), "{line:?} missing from:\n{printed}");
    }

    let order = home.file("order");
    for (name, priority) in [("High", 1), ("Medium", 5), ("Low", 9)] {
        let job = format!(
            r#"{{"command":"echo {name} Priority Job >> {}","priority":{priority}}}"#,
            order.display()
        );
        home.enqueue(&job);
    }
    let listed: Vec<Value> = home.jobs(&[]);
    let ids: Vec<&str> = listed
        .iter()
        .map(|job| job["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["job2", "job1", "job3", "job4"],
        "list orders by priority, then age"
    );
    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    wait_until("the priority jobs to run", DEADLINE, || {
        home.count("completed") == 4
    });
    assert_eq!(
        std::fs::read_to_string(&order).unwrap(),
        "High Priority Job\nMedium Priority Job\nLow Priority Job\n"
    );
    for job in home.jobs(&[]) {
        for key in [
            "id",
            "command",
            "state",
            "attempts",
            "max_retries",
            "priority",
            "created_at",
            "updated_at",
            "run_after",
            "last_error",
        ] {
            assert!(job.get(key).is_some(), "{key} missing from {job}");
        }
    }

    // 7. A failing job: with backoff_base 2 and max_retries 2 it waits 2 s, then 4 s, then is dead.
    assert_eq!(
        home.ok(&["enqueue", r#"{"command":"invalidcommand","max_retries":2}"#]),
        "Enqueued job job5\n"
    );
    home.wait_for_state("job5", "dead");

    // 8. It is in the dead letter queue.
    let dead = home.jobs(&["--state", "dead"]);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], "job5");
    assert_eq!(dead[0]["attempts"], 3);
    assert_eq!(dead[0]["max_retries"], 2);
    assert_eq!(dead[0]["last_error"], "exit:127");
    assert_eq!(
        home.ok(&["dlq", "list"]),
        home.ok(&["list", "--state", "dead"])
    );
    let logs = home.ok(&["logs", "job5"]);
    let starts: Vec<f64> = logs
        .lines()
        .filter(|line| line.starts_with("=== "))
        .map(started_at_secs)
        .collect();
    assert_eq!(starts.len(), 3, "{logs}");
    assert!(
        starts[1] - starts[0] >= 2.0,
        "first backoff ≥ 2 s: {starts:?}"
    );
    assert!(
        starts[2] - starts[1] >= 4.0,
        "second backoff ≥ 4 s: {starts:?}"
    );
    assert!(logs.contains("invalidcommand: not found"), "{logs}");

    // 9. Retrying it: back to pending with attempts 0, then through its retries to dead again.
    home.ok(&["worker", "stop"]);
    home.ok(&["dlq", "retry", "job5"]);
    let retried = home.job("job5");
    assert_eq!(
        (retried["state"].as_str(), retried["attempts"].as_u64()),
        (Some("pending"), Some(0))
    );
    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    home.wait_for_state("job5", "dead");
    assert_eq!(home.job("job5")["attempts"], 3);

    // 10. Every job is still listed.
    assert_eq!(home.jobs(&[]).len(), 5);

    // 11. Reset asks first (on stderr, so that stdout stays for scripts), and reads the answer from a pipe.
    let mut reset = home
        .command(&["reset"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    reset.stdin.take().unwrap().write_all(b"y\n").unwrap();
    let reset = reset.wait_with_output().unwrap();
    assert!(reset.status.success());
    assert_eq!(
        String::from_utf8(reset.stderr).unwrap(),
        "This will stop all workers and delete all jobs. Continue? (y/N): "
    );
    assert_eq!(
        String::from_utf8(reset.stdout).unwrap(),
        "Queue reset successful: all jobs and configurations cleared.\n"
    );

    // 12. A clean state: no jobs, no workers, default settings, ids from job1 again.
    let status = home.ok(&["status"]);
    assert!(status.starts_with(
        "Job states:\n  pending: 0\n  processing: 0\n  failed: 0\n  completed: 0\n  dead: 0\n"
    ));
    assert!(status.contains("Workers: 0 "), "{status}");
    assert_eq!(home.enqueue(r#"{"command":"true"}"#), "job1");

    // 13. Stopping workers from another terminal ends the attached `worker start`.
    let mut workers = home
        .command(&["worker", "start", "--count", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    home.wait_for_state("job1", "completed");
    home.ok(&["worker", "stop"]);
    let output = common::wait_for_exit(&mut workers, DEADLINE);
    assert!(output.success());
}

#[test]
fn a_declined_reset_changes_nothing() {
    let home = Home::with_server(0);
    home.enqueue(r#"{"command":"true"}"#);
    for answer in ["n\n", "", "maybe\n"] {
        let mut reset = home
            .command(&["reset"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        reset
            .stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        let output = reset.wait_with_output().unwrap();
        assert!(!output.status.success(), "answer {answer:?}");
        assert!(String::from_utf8_lossy(&output.stderr).contains("nothing was changed"));
        assert_eq!(home.jobs(&[]).len(), 1);
    }
    home.ok(&["reset", "--yes"]);
    assert!(home.jobs(&[]).is_empty());
}
