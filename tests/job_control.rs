//! Steering jobs after they were enqueued, through the real binaries: cancel, retry, remove, clean, delayed
//! jobs, pause and resume. The commands are POSIX shell.

#![cfg(unix)]

mod common;

use std::time::Duration;

use common::{DEADLINE, Home, alive, wait_until};
use serde_json::Value;

fn runs_of(home: &Home, id: &str) -> Vec<Value> {
    home.ok(&["logs", id, "--output", "json"])
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON run"))
        .collect()
}

/// Microseconds since the epoch of an RFC 3339 time as the CLI prints it (`...+00:00`).
fn micros_of(time: &str) -> i64 {
    let utc = time.replace("+00:00", "Z");
    let at = humantime::parse_rfc3339(&utc).unwrap_or_else(|_| panic!("a time: {time}"));
    i64::try_from(
        at.duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

#[test]
fn a_waiting_job_is_cancelled_for_good_and_can_be_retried() {
    let home = Home::with_server(0);
    let id = home.enqueue(r#"{"command":"true"}"#);
    let out = home.ok(&["cancel", &id]);
    assert_eq!(out.trim(), format!("Cancelled job {id}"));
    let job = home.job(&id);
    assert_eq!(job["state"], "cancelled");
    let error = job["last_error"].as_str().unwrap();
    assert!(
        error.starts_with("cancelled by ") && error.ends_with("(queuectl cancel)"),
        "last_error says who cancelled it: {error}"
    );
    assert_eq!(home.count("cancelled"), 1);
    assert_eq!(home.jobs(&["--state", "cancelled"]).len(), 1);

    let refused = home.fails(&["cancel", &id]);
    assert!(
        refused.contains(&format!("job '{id}' is cancelled already")),
        "{refused}"
    );
    assert!(
        home.fails(&["cancel", "ghost"])
            .contains("no job with id 'ghost'")
    );

    // A cancelled job never runs, even with workers ready.
    let other = home.enqueue(r#"{"command":"true"}"#);
    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    home.ok(&["wait", &other]);
    assert_eq!(home.state(&id), "cancelled");
    assert!(runs_of(&home, &id).is_empty());

    // `wait` counts a cancelled job as not completed.
    let stderr = home.fails(&["wait", &id]);
    assert!(
        stderr.contains(&format!("1 of 1 job did not complete: {id} (cancelled)")),
        "{stderr}"
    );

    home.ok(&["retry", &id]);
    home.ok(&["wait", &id]);
    assert_eq!(home.state(&id), "completed");
}

#[test]
fn a_failed_job_waiting_for_its_retry_can_be_cancelled() {
    let home = Home::with_server(1);
    home.ok(&["config", "set", "backoff_base", "100"]);
    let id = home.enqueue(r#"{"command":"exit 3","max_retries":2}"#);
    home.wait_for_state(&id, "failed");
    home.ok(&["cancel", &id]);
    let job = home.job(&id);
    assert_eq!(
        (job["state"].as_str(), job["attempts"].as_u64()),
        (Some("cancelled"), Some(1))
    );
}

#[test]
fn cancelling_a_running_job_kills_every_process_it_started_and_never_reruns_it() {
    let home = Home::with_server(1);
    let pid_file = home.file("child.pid");
    let command = format!(
        "sleep 300 & echo $! > {}; echo started; wait",
        pid_file.display()
    );
    let id = home.enqueue(&serde_json::json!({ "command": command }).to_string());
    let child = common::pid_written_to(&pid_file);
    assert_eq!(home.state(&id), "processing");

    home.ok(&["cancel", &id]);
    let job = home.job(&id);
    assert_eq!(job["state"], "cancelled");
    wait_until("the job's child to be gone", Duration::from_secs(5), || {
        !alive(child)
    });
    let runs = runs_of(&home, &id);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let outcome = runs[0]["outcome"].as_str().unwrap();
    assert!(outcome.starts_with("cancelled by "), "{outcome}");
    assert!(runs[0]["output"].as_str().unwrap().contains("started"));

    // The worker is free again, and the cancelled job does not come back.
    let next = home.enqueue(r#"{"command":"true"}"#);
    home.ok(&["wait", &next]);
    assert_eq!(home.state(&id), "cancelled");
    assert_eq!(runs_of(&home, &id).len(), 1);
}

/// A job that ignores SIGTERM is killed (SIGKILL, 2 s after the SIGTERM): a cancel always ends the run.
#[test]
fn a_cancelled_job_that_ignores_sigterm_is_killed_after_the_grace() {
    let home = Home::with_server(1);
    let pid_file = home.file("stubborn.pid");
    // Ignored signals stay ignored in the children too.
    let command = format!(
        "trap '' TERM; sleep 300 & echo $! > {}; wait; wait",
        pid_file.display()
    );
    let id = home.enqueue(&serde_json::json!({ "command": command }).to_string());
    let child = common::pid_written_to(&pid_file);

    let cancel = common::output_within(&mut home.command(&["cancel", &id]), DEADLINE);
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    assert_eq!(home.state(&id), "cancelled");
    wait_until("the job's child to be gone", Duration::from_secs(5), || {
        !alive(child)
    });
}

#[test]
fn a_cancel_that_races_a_completion_ends_in_exactly_one_final_state() {
    let home = Home::with_server(2);
    let (mut cancelled, mut completed) = (0, 0);
    for round in 0..30 {
        // Jobs short enough that many complete while the cancel is on its way.
        let sleep = ["0", "0.01", "0.03", "0.05"][round % 4];
        let id = home.enqueue(&format!(r#"{{"command":"sleep {sleep}"}}"#));
        if round % 3 == 0 {
            wait_until("the job to start", DEADLINE, || {
                home.state(&id) != "pending"
            });
        }
        let answer = home.try_queuectl(&["cancel", &id]);
        let stderr = String::from_utf8_lossy(&answer.stderr);
        wait_until("the job to be final", DEADLINE, || {
            matches!(home.state(&id).as_str(), "completed" | "cancelled")
        });
        let state = home.state(&id);
        if answer.status.success() {
            assert_eq!(state, "cancelled", "round {round}: the cancel won");
            cancelled += 1;
        } else {
            assert_eq!(state, "completed", "round {round}: {stderr}");
            assert!(
                stderr.contains("completed before the cancel reached it")
                    || stderr.contains("is completed already"),
                "round {round}: the loser is told why: {stderr}"
            );
            completed += 1;
        }
        let runs = runs_of(&home, &id);
        assert!(runs.len() <= 1, "round {round}: never rerun: {runs:?}");
    }
    eprintln!("{cancelled} cancels won, {completed} completions won");
}

#[test]
fn remove_and_clean_delete_only_final_jobs() {
    let home = Home::with_server(1);
    let done = home.enqueue(r#"{"command":"echo done"}"#);
    let dead = home.enqueue(r#"{"command":"exit 1","max_retries":0}"#);
    home.ok(&["wait", &done]);
    home.wait_for_state(&dead, "dead");
    home.ok(&["worker", "stop"]);
    let waiting = home.enqueue(r#"{"command":"true"}"#);

    let refused = home.fails(&["remove", &waiting]);
    assert!(
        refused.contains(&format!(
            "job '{waiting}' is pending; only completed, dead and cancelled jobs"
        )),
        "{refused}"
    );
    assert_eq!(
        home.state(&waiting),
        "pending",
        "a refused removal changes nothing"
    );

    let out = home.ok(&["remove", &done]);
    assert_eq!(out.trim(), format!("Removed job {done}"));
    assert!(home.fails(&["get", &done]).contains("no job with id"));
    assert!(home.fails(&["logs", &done]).contains("no job with id"));

    // Several ids: each is tried, and the command fails if one failed.
    let stderr = home.fails(&["remove", "ghost", &dead]);
    assert!(stderr.contains("no job with id 'ghost'"), "{stderr}");
    assert!(stderr.contains("1 of 2 jobs failed"), "{stderr}");
    assert!(home.fails(&["get", &dead]).contains("no job with id"));

    for _ in 0..3 {
        home.enqueue(r#"{"command":"true"}"#);
    }
    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    home.ok(&["wait"]);
    home.ok(&[
        "cancel",
        &home.enqueue(r#"{"command":"true","delay":"1h"}"#),
    ]);
    assert_eq!(home.count("completed"), 4);
    assert_eq!(
        home.ok(&["clean", "--older-than", "1h"]).trim(),
        "Removed 0 jobs"
    );
    assert_eq!(home.ok(&["clean"]).trim(), "Removed 4 jobs");
    assert_eq!(home.count("completed"), 0);
    assert_eq!(
        home.count("cancelled"),
        1,
        "clean takes completed jobs unless told"
    );
    assert_eq!(
        home.ok(&["clean", "--state", "cancelled"]).trim(),
        "Removed 1 job"
    );
    let refused = home.fails(&["clean", "--state", "pending"]);
    assert!(refused.contains("invalid value 'pending'"), "{refused}");
}

#[test]
fn completed_jobs_past_their_retention_are_deleted_by_the_server() {
    let home = Home::with_server(1);
    home.ok(&["config", "set", "completed_retention", "2s"]);
    let done = home.enqueue(r#"{"command":"true"}"#);
    let dead = home.enqueue(r#"{"command":"false","max_retries":0}"#);
    home.ok(&["wait", &done]);
    home.wait_for_state(&dead, "dead");
    wait_until("the completed job to be purged", DEADLINE, || {
        home.try_queuectl(&["get", &done])
            .stderr
            .starts_with(b"error: no job with id")
    });
    assert_eq!(home.state(&dead), "dead", "dead jobs are kept by default");
}

#[test]
fn dead_and_cancelled_jobs_past_their_retention_are_deleted_by_the_server() {
    let home = Home::with_server(1);
    home.ok(&["config", "set", "dead_retention", "2s"]);
    let done = home.enqueue(r#"{"command":"true"}"#);
    let dead = home.enqueue(r#"{"command":"false","max_retries":0}"#);
    let cancelled = home.enqueue(r#"{"command":"true","delay":"1h"}"#);
    home.ok(&["cancel", &cancelled]);
    home.ok(&["wait", &done]);
    home.wait_for_state(&dead, "dead");
    for gone in [&dead, &cancelled] {
        wait_until("the final job to be purged", DEADLINE, || {
            home.try_queuectl(&["get", gone])
                .stderr
                .starts_with(b"error: no job with id")
        });
    }
    assert_eq!(
        home.state(&done),
        "completed",
        "completed jobs keep their own retention"
    );
}

#[test]
fn a_delayed_job_waits_pending_and_runs_on_time() {
    let home = Home::with_server(1);
    let now = std::time::SystemTime::now();
    let at = now + Duration::from_millis(1500);
    let run_at = humantime::format_rfc3339_micros(at).to_string();
    let id = home.enqueue(&format!(r#"{{"command":"true","run_at":"{run_at}"}}"#));
    let job = home.job(&id);
    assert_eq!(job["state"], "pending");
    let run_after = job["run_after"].as_i64().unwrap();
    let expected =
        i64::try_from(at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap();
    assert_eq!(run_after, expected, "get shows when it runs");
    assert_eq!(
        home.jobs(&[])[0]["run_after"],
        run_after,
        "and so does list"
    );

    home.ok(&["wait", &id]);
    let runs = runs_of(&home, &id);
    let started = micros_of(runs[0]["started_at"].as_str().unwrap());
    let due = micros_of(&run_at.replace('Z', "+00:00"));
    let late = started - due;
    eprintln!("the delayed job started {late} µs after its time");
    assert!(late >= 0, "it never starts early: {late} µs");
    assert!(
        late < 50_000,
        "it starts within 50 ms of its time: {late} µs"
    );
}

#[test]
fn a_delay_survives_a_kill_9_and_bad_times_are_refused() {
    let mut home = Home::with_server(1);
    let id = home.enqueue(r#"{"command":"true","delay":"2s"}"#);
    let run_after = home.job(&id)["run_after"].as_i64().unwrap();
    home.kill_server();
    home.start_server(1);
    let job = home.job(&id);
    assert_eq!(job["run_after"].as_i64(), Some(run_after));
    home.ok(&["wait", &id]);
    let started = micros_of(runs_of(&home, &id)[0]["started_at"].as_str().unwrap());
    assert!(started >= run_after * 1_000_000, "it waited out its delay");

    for (job, error) in [
        (
            r#"{"command":"true","delay":"5m","run_at":1}"#,
            "give run_at or delay, not both",
        ),
        (
            r#"{"command":"true","delay":-5}"#,
            "delay must be 0 or more seconds",
        ),
        (
            r#"{"command":"true","delay":"soon"}"#,
            "delay \"soon\" is not a duration",
        ),
        (
            r#"{"command":"true","run_at":"tomorrow"}"#,
            "run_at \"tomorrow\" is not a time",
        ),
        (
            r#"{"command":"true","run_at":1900000000000}"#,
            "run_at must be at most a year ahead",
        ),
        (
            r#"{"command":"true","delay":"400 days"}"#,
            "delay must be 0 to",
        ),
    ] {
        let stderr = home.fails(&["enqueue", job]);
        assert!(stderr.contains(error), "{job}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
    assert_eq!(home.jobs(&[]).len(), 1, "nothing bad was stored");
}

#[test]
fn a_pause_holds_across_a_restart_until_resume() {
    let mut home = Home::with_server(1);
    let out = home.ok(&["pause"]);
    assert!(out.starts_with("Queue paused"), "{out}");
    assert!(home.ok(&["status"]).contains("Queue: paused"));
    let status: Value = serde_json::from_str(&home.ok(&["status", "--output", "json"])).unwrap();
    assert_eq!(status["paused"], true);
    let id = home.enqueue(r#"{"command":"true"}"#);
    let stderr = home.fails(&["wait", &id, "--timeout", "1s"]);
    assert!(stderr.contains("still not final"), "{stderr}");
    assert_eq!(home.state(&id), "pending");

    home.stop_server();
    home.start_server(1);
    assert!(
        home.ok(&["status"]).contains("Queue: paused"),
        "the pause was stored"
    );
    let stderr = home.fails(&["wait", &id, "--timeout", "1s"]);
    assert!(stderr.contains("still not final"), "{stderr}");

    assert_eq!(home.ok(&["resume"]).trim(), "Queue resumed");
    home.ok(&["wait", &id]);
    assert!(!home.ok(&["status"]).contains("paused"));
}

#[test]
fn a_pause_lets_the_running_job_finish() {
    let home = Home::with_server(1);
    let flag = home.file("go");
    let command = format!("while [ ! -e {} ]; do sleep 0.02; done", flag.display());
    let running = home.enqueue(&serde_json::json!({ "command": command }).to_string());
    home.wait_for_state(&running, "processing");
    home.ok(&["pause"]);
    let next = home.enqueue(r#"{"command":"true"}"#);
    std::fs::write(&flag, "").unwrap();
    home.ok(&["wait", &running]);
    assert_eq!(home.state(&running), "completed");
    assert_eq!(home.state(&next), "pending");
}

#[test]
fn wait_and_logs_follow_see_a_waiting_job_cancelled() {
    let home = Home::with_server(0);
    let id = home.enqueue(r#"{"command":"true"}"#);
    let mut waiting = home
        .command(&["wait", &id])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut following = home
        .command(&["logs", &id, "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Each watcher subscribes before it reads the job, so whether the cancel lands before or after it connects,
    // it sees the job end: by the event, or in the job it reads.
    home.ok(&["cancel", &id]);
    let waited = common::wait_for_exit(&mut waiting, DEADLINE);
    assert!(!waited.success(), "wait fails for a cancelled job");
    let followed = common::wait_for_exit(&mut following, DEADLINE);
    assert!(
        !followed.success(),
        "logs --follow exits 1 for a job that did not complete"
    );
    let mut out = String::new();
    std::io::Read::read_to_string(&mut following.stdout.take().unwrap(), &mut out).unwrap();
    assert!(
        out.contains(&format!("job {id} ")) && out.contains("cancelled by "),
        "{out}"
    );
}

#[test]
fn a_chain_runs_in_order_and_a_dead_link_cancels_the_rest() {
    let home = Home::with_server(0);
    let log = home.file("order");
    let step = |name: &str| format!("echo {name} >> {}", log.display());
    home.ok(&[
        "enqueue",
        &serde_json::json!({ "id": "a", "command": format!("sleep 0.2; {}", step("a")) })
            .to_string(),
    ]);
    home.ok(&[
        "enqueue",
        &serde_json::json!({ "id": "b", "command": step("b"), "after": ["a"] }).to_string(),
    ]);
    home.ok(&[
        "enqueue",
        &serde_json::json!({ "id": "c", "command": step("c"), "after": "b", "priority": 1 })
            .to_string(),
    ]);
    let c = home.job("c");
    assert_eq!(
        c["after"],
        serde_json::json!(["b"]),
        "get shows what it waits for"
    );
    assert_eq!(c["run_after"], Value::Null, "and no time while it waits");
    let listed = home.jobs(&["--state", "pending"]);
    let c_listed = listed.iter().find(|job| job["id"] == "c").unwrap();
    assert_eq!(c_listed["after"], c["after"], "list shows it too");
    home.ok(&["worker", "start", "--count", "3", "--daemon"]);
    home.ok(&["wait", "a", "b", "c"]);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a\nb\nc\n");

    home.ok(&["worker", "stop"]);
    home.ok(&[
        "enqueue",
        r#"{"id":"doomed","command":"exit 1","max_retries":0}"#,
    ]);
    home.ok(&[
        "enqueue",
        r#"{"id":"next","command":"true","after":["doomed"]}"#,
    ]);
    home.ok(&[
        "enqueue",
        r#"{"id":"last","command":"true","after":["next","a"]}"#,
    ]);
    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    let stderr = home.fails(&["wait", "next", "last"]);
    assert!(stderr.contains("2 of 2 jobs did not complete"), "{stderr}");
    let next = home.job("next");
    assert_eq!(next["state"], "cancelled");
    assert_eq!(
        next["last_error"],
        "cancelled: it runs after doomed, which ended dead"
    );
    assert_eq!(
        home.job("last")["last_error"],
        "cancelled: it runs after next, which was cancelled"
    );

    for (job, error) in [
        (
            r#"{"command":"true","after":["ghost"]}"#,
            "after: no job with id 'ghost'",
        ),
        (
            r#"{"command":"true","after":["doomed"]}"#,
            "after: job 'doomed' is dead, so a job after it would never run",
        ),
        (
            r#"{"id":"me","command":"true","after":["me"]}"#,
            "after: job 'me' cannot run after 'me', which is not enqueued before it",
        ),
        (
            r#"{"command":"true","after":["a"],"delay":"1m"}"#,
            "after cannot be combined with run_at or delay",
        ),
        (
            r#"{"command":"true","after":[7]}"#,
            "after must hold job ids",
        ),
        (
            &serde_json::json!({ "command": "true", "after": vec!["a"; 101] }).to_string(),
            "after may name at most 100 jobs, got 101",
        ),
    ] {
        let stderr = home.fails(&["enqueue", job]);
        assert!(stderr.contains(error), "{job}: {stderr}");
    }
    assert_eq!(home.jobs(&[]).len(), 6, "nothing refused was stored");
}

#[test]
fn a_job_waiting_for_another_keeps_waiting_across_a_kill_9() {
    let mut home = Home::with_server(1);
    let flag = home.file("go");
    let command = format!("while [ ! -e {} ]; do sleep 0.02; done", flag.display());
    home.ok(&[
        "enqueue",
        &serde_json::json!({ "id": "first", "command": command }).to_string(),
    ]);
    home.ok(&[
        "enqueue",
        r#"{"id":"then","command":"true","after":["first"]}"#,
    ]);
    home.wait_for_state("first", "processing");
    home.kill_server();
    home.start_server(1);
    assert_eq!(home.job("then")["run_after"], Value::Null, "still waiting");
    std::fs::write(&flag, "").unwrap();
    home.ok(&["wait", "first", "then"]);
}
