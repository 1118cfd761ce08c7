//! Job context and output, through the real binaries: a job runs in the directory and with the variables it was
//! enqueued with, its output is stored while it runs, in the order written, with head and tail kept past the
//! limit, and any amount of it reads back, as do listings of large jobs.

#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{DEADLINE, Home, python_has_grpc_tools, wait_until};
use serde_json::Value;

/// The output of `logs` without the attempt headers.
fn printed_output(logs: &str) -> String {
    logs.lines()
        .filter(|line| !line.starts_with("=== "))
        .map(|line| format!("{line}\n"))
        .collect()
}

#[test]
fn a_job_runs_where_and_with_what_it_was_enqueued() {
    let home = Home::with_server(1);
    let project = home.file("project");
    std::fs::create_dir(&project).unwrap();
    let command = r#"{"id":"here","command":"pwd -P; echo \"$FROM_CALLER|$GIVEN|$IN_JSON|${NOT_SENT-unset}\"","env":{"IN_JSON":"json"}}"#;
    common::succeeds(
        home.command(&[
            "enqueue",
            "--env",
            "FROM_CALLER",
            "--env",
            "GIVEN=a=b c",
            command,
        ])
        .current_dir(&project)
        .env("FROM_CALLER", "caller's")
        .env("NOT_SENT", "secret"),
    );
    home.wait_for_state("here", "completed");
    let real = project.canonicalize().unwrap();
    assert_eq!(
        printed_output(&home.ok(&["logs", "here"])),
        format!("{}\ncaller's|a=b c|json|unset\n", real.display())
    );
    let job = home.job("here");
    assert_eq!(job["cwd"], project.display().to_string());
    assert_eq!(job["env"]["GIVEN"], "a=b c");
    assert!(job["env"].get("NOT_SENT").is_none());

    let elsewhere = home.file("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    home.enqueue(&format!(
        r#"{{"id":"there","command":"pwd -P","cwd":"{}"}}"#,
        elsewhere.display()
    ));
    home.wait_for_state("there", "completed");
    assert_eq!(
        printed_output(&home.ok(&["logs", "there"])),
        format!("{}\n", elsewhere.canonicalize().unwrap().display()),
        "a cwd in the JSON wins over the caller's directory"
    );
}

#[test]
fn a_missing_directory_fails_the_attempt_with_a_clear_error() {
    let home = Home::with_server(1);
    home.enqueue(r#"{"id":"lost","command":"true","cwd":"/no/such/dir","max_retries":0}"#);
    home.wait_for_state("lost", "dead");
    assert_eq!(
        home.job("lost")["last_error"],
        "cwd: no such directory: /no/such/dir"
    );
}

#[test]
fn a_bad_context_is_refused_in_one_line_and_nothing_is_stored() {
    let home = Home::with_server(0);
    for (args, expected) in [
        (
            vec!["enqueue", r#"{"command":"true","cwd":"relative/dir"}"#],
            "cwd must be an absolute path",
        ),
        (
            vec!["enqueue", r#"{"command":"true","env":{"A=B":"x"}}"#],
            "must not contain '=' or NUL",
        ),
        (
            vec![
                "enqueue",
                r#"{"command":"true","env":{"QUEUECTL_JOB":"x"}}"#,
            ],
            "QUEUECTL_JOB is set by the server",
        ),
        (
            vec!["enqueue", r#"{"command":"true","env":{"A":1}}"#],
            "the value of A must be a string",
        ),
        (
            vec![
                "enqueue",
                "--env",
                "QUEUECTL_TEST_SURELY_UNSET",
                r#"{"command":"true"}"#,
            ],
            "QUEUECTL_TEST_SURELY_UNSET is not set in this environment",
        ),
        (
            vec!["enqueue", "--env", "=x", r#"{"command":"true"}"#],
            "needs a name",
        ),
    ] {
        let error = home.fails(&args);
        assert!(error.contains(expected), "{args:?}: {error}");
        assert_eq!(error.lines().count(), 1, "{error}");
    }
    let huge = format!(
        r#"{{"command":"true","env":{{"BIG":"{}"}}}}"#,
        "x".repeat(70 * 1024)
    );
    assert!(
        home.fails(&["enqueue", &huge])
            .contains("at most 65536 bytes")
    );
    assert!(home.jobs(&[]).is_empty(), "nothing was stored");
}

/// Waits until `logs` of `id` shows `text`; returns when the successful read began.
fn logs_show(home: &Home, id: &str, text: &str) -> Instant {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let asked = Instant::now();
        if home.ok(&["logs", id]).contains(text) {
            return asked;
        }
        assert!(
            Instant::now() < deadline,
            "logs of {id} never showed {text:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A command that prints each of `steps` (`out:TEXT` to stdout, `err:TEXT` to stderr) and then waits for the
/// file `gate<N>` in `dir` before the next one.
fn gated_steps(dir: &std::path::Path, steps: &[&str]) -> String {
    steps
        .iter()
        .enumerate()
        .map(|(n, step)| {
            let print = match step.split_once(':') {
                Some(("err", text)) => format!("echo {text} >&2"),
                Some((_, text)) => format!("echo {text}"),
                None => unreachable!("steps are stream:text"),
            };
            format!(
                "{print}; while [ ! -e {}/gate{n} ]; do sleep 0.01; done",
                dir.display()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
fn output_is_stored_while_the_job_runs_in_the_order_it_was_written() {
    let home = Home::with_server(1);
    let steps = ["out:out1", "err:err1", "out:out2", "err:err2"];
    let command = gated_steps(home.path(), &steps);
    home.enqueue(&serde_json::json!({"id": "talky", "command": command}).to_string());
    for (n, step) in steps.iter().enumerate() {
        let text = step.split_once(':').unwrap().1;
        logs_show(&home, "talky", text);
        assert_eq!(home.state("talky"), "processing", "shown while it runs");
        std::fs::write(home.file(&format!("gate{n}")), "").unwrap();
    }
    home.wait_for_state("talky", "completed");
    let logs = home.ok(&["logs", "talky"]);
    assert_eq!(printed_output(&logs), "out1\nerr1\nout2\nerr2\n", "{logs}");
    assert_eq!(
        printed_output(&home.ok(&["logs", "talky", "--stdout"])),
        "out1\nout2\n"
    );
    assert_eq!(
        printed_output(&home.ok(&["logs", "talky", "--stderr"])),
        "err1\nerr2\n"
    );
    let run: Value =
        serde_json::from_str(home.ok(&["logs", "talky", "--output", "json"]).trim()).unwrap();
    let tagged: Vec<(String, String)> = run["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|chunk| {
            (
                chunk["stream"].as_str().unwrap().to_owned(),
                chunk["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("stdout", "out1\n"),
        ("stderr", "err1\n"),
        ("stdout", "out2\n"),
        ("stderr", "err2\n"),
    ]
    .iter()
    .map(|(stream, text)| (stream.to_string(), text.to_string()))
    .collect();
    assert_eq!(tagged, expected);
    assert_eq!(run["output"], "out1\nerr1\nout2\nerr2\n");
}

#[test]
fn logs_of_a_running_job_show_its_first_lines_soon_after_they_are_printed() {
    let home = Home::with_server(1);
    let printed_at = home.file("printed-at");
    let gate = home.file("gate");
    // The job notes the time (nanoseconds since the epoch) right after it printed its line.
    home.enqueue(&format!(
        r#"{{"id":"slow","command":"echo first line; date +%s%N > {at}.tmp; mv {at}.tmp {at}; while [ ! -e {gate} ]; do sleep 0.05; done"}}"#,
        at = printed_at.display(),
        gate = gate.display()
    ));
    let shown = logs_show(&home, "slow", "first line");
    let shown_at = std::time::SystemTime::now() - shown.elapsed();
    wait_until("the job to note its printing", DEADLINE, || {
        printed_at.exists()
    });
    let nanos: u128 = std::fs::read_to_string(&printed_at)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let printed = std::time::UNIX_EPOCH + Duration::from_nanos(nanos as u64);
    let lag = shown_at.duration_since(printed).unwrap_or_default();
    eprintln!("logs showed the line {lag:?} after it was printed");
    assert!(
        lag < Duration::from_secs(1),
        "stored every 100 ms: shown {lag:?} after it was printed"
    );
    assert_eq!(home.state("slow"), "processing");
    std::fs::write(&gate, "").unwrap();
    home.wait_for_state("slow", "completed");
}

#[test]
fn logs_follow_shows_everything_from_the_first_byte_and_exits_with_the_outcome() {
    let home = Home::with_server(1);
    let steps = ["out:early", "out:late"];
    let command = format!("{}; exit 3", gated_steps(home.path(), &steps));
    home.enqueue(
        &serde_json::json!({"id": "bumpy", "command": command, "max_retries": 0}).to_string(),
    );
    logs_show(&home, "bumpy", "early");
    let mut follow = home
        .command(&["logs", "bumpy", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap());
    let mut printed = String::new();
    while !printed.contains("early\n") {
        assert!(lines.read_line(&mut printed).unwrap() > 0, "{printed}");
    }
    std::fs::write(home.file("gate0"), "").unwrap();
    while !printed.contains("late\n") {
        assert!(lines.read_line(&mut printed).unwrap() > 0, "{printed}");
    }
    std::fs::write(home.file("gate1"), "").unwrap();
    lines.read_to_string(&mut printed).unwrap();
    let status = common::wait_for_exit(&mut follow, DEADLINE);
    assert_eq!(status.code(), Some(1), "a dead job ends logs -f with 1");
    assert!(
        printed.starts_with("=== bumpy attempt 1 on worker 0"),
        "from the first byte: {printed}"
    );
    assert!(
        printed.contains("early\nlate\n") && printed.ends_with("job bumpy ended dead (exit:3)\n"),
        "{printed}"
    );
    let mut stderr = String::new();
    follow
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(stderr, "error: job bumpy did not complete\n");
}

#[test]
fn past_the_limit_the_first_and_the_last_lines_survive() {
    let home = Home::with_server(1);
    home.ok(&["config", "set", "max_output_bytes", "1000"]);
    // One stream: which of two pipes with bytes waiting the server reads first is not the order they were written.
    home.enqueue(r#"{"id":"long","command":"seq 1 2000; echo the last line"}"#);
    home.wait_for_state("long", "completed");
    let logs = printed_output(&home.ok(&["logs", "long"]));
    assert!(logs.starts_with("1\n2\n3\n"), "{logs}");
    assert!(logs.ends_with("2000\nthe last line\n"), "{logs}");
    assert!(logs.contains(" bytes dropped]"), "{logs}");
    assert!(
        logs.len() < 1000 + 600,
        "head and tail, {} bytes",
        logs.len()
    );
    assert_eq!(
        home.ok(&["logs", "long", "--output", "json"])
            .matches("\"truncated\":true")
            .count(),
        1
    );
}

/// The output of `seq 1 <count>`, as the job prints it.
fn seq(count: u32) -> Vec<u8> {
    (1..=count)
        .flat_map(|n| format!("{n}\n").into_bytes())
        .collect()
}

#[test]
fn ten_megabytes_of_logs_read_back_whole_through_the_cli_and_a_stock_python_client() {
    let home = Home::with_server(1);
    home.ok(&["config", "set", "max_output_bytes", "16777216"]);
    let lines = 1_500_000;
    home.enqueue(&format!(r#"{{"id":"big","command":"seq 1 {lines}"}}"#));
    home.wait_for_state("big", "completed");
    let expected = seq(lines);
    assert!(expected.len() > 10_000_000);
    let logs = home.try_queuectl(&["logs", "big"]);
    assert!(logs.status.success());
    let header_end = logs.stdout.iter().position(|byte| *byte == b'\n').unwrap() + 1;
    assert!(logs.stdout.starts_with(b"=== big attempt 1"));
    assert!(
        logs.stdout[header_end..] == expected[..],
        "the CLI printed {} bytes of {}",
        logs.stdout.len() - header_end,
        expected.len()
    );

    if !python_has_grpc_tools() {
        return;
    }
    let generated = common::generate_python_client(&home);
    let copy = home.file("big.out");
    let output = Command::new("python3")
        .arg("clients/python/logs.py")
        .arg(format!("unix://{}", home.file("queuectl.sock").display()))
        .arg("big")
        .env("PYTHONPATH", &generated)
        .stdout(std::fs::File::create(&copy).unwrap())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read = std::fs::read(&copy).unwrap();
    let body = &read[read.iter().position(|byte| *byte == b'\n').unwrap() + 1..];
    assert!(
        body == &expected[..],
        "Python read {} bytes of {}",
        body.len(),
        expected.len()
    );
}

#[test]
fn a_list_of_200_jobs_with_64_kib_commands_reads_through_the_cli() {
    let home = Home::with_server(0);
    let command = format!("true {}", "x".repeat(64 * 1024 - 5));
    let job = serde_json::json!({ "command": command }).to_string();
    for _ in 0..200 {
        home.enqueue(&job);
    }
    let listed = home.try_queuectl(&["list"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let lines = String::from_utf8(listed.stdout).unwrap();
    assert_eq!(lines.lines().count(), 200);
    let table = home.ok(&["list", "--output", "table"]);
    assert_eq!(table.lines().count(), 201);
    // `wait` without ids lists every job that is not final.
    let every = common::output_within(&mut home.command(&["wait", "--timeout", "1s"]), DEADLINE);
    assert!(
        String::from_utf8_lossy(&every.stderr).contains("200 jobs were still not final"),
        "{}",
        String::from_utf8_lossy(&every.stderr)
    );
}
