//! The CLI in its ecosystem: health probes, completions, man pages and help, `wait`, JSON on every read command.

mod common;

use std::process::Stdio;

use common::{DEADLINE, Home, wait_until};
use serde_json::Value;

#[test]
fn health_exits_as_grpc_health_probe_does() {
    let mut home = Home::new();
    let code = |home: &Home| home.try_queuectl(&["health"]).status.code();
    assert_eq!(code(&home), Some(2), "no server: cannot connect");
    assert!(
        !home.file("queuectl.sock").exists(),
        "health never starts a server"
    );
    home.start_server(0);
    assert_eq!(code(&home), Some(0));
    assert_eq!(home.ok(&["health"]), "status: SERVING\n");

    // While the server drains a running job, it reports NOT_SERVING.
    let gate = home.file("gate");
    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    home.enqueue(&format!(
        r#"{{"command":"while [ ! -e {} ]; do sleep 0.05; done"}}"#,
        gate.display()
    ));
    home.wait_for_state("job1", "processing");
    home.ok(&["server", "stop"]);
    common::wait_until("health to turn NOT_SERVING", DEADLINE, || {
        code(&home) == Some(4)
    });
    std::fs::write(&gate, "").unwrap();
    assert!(common::wait_for_exit(home.server(), DEADLINE).success());
}

#[test]
fn completions_and_man_page_come_from_the_same_definitions() {
    let home = Home::new();
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let script = home.ok(&["completions", shell]);
        assert!(
            script.contains("enqueue") && script.contains("dlq"),
            "{shell}"
        );
    }
    let man = home.ok(&["man"]);
    assert!(
        man.starts_with(".ie") || man.contains(".TH queuectl"),
        "{}",
        &man[..80]
    );
    assert!(man.contains("enqueue"));
    assert!(
        home.fails(&["completions", "tcsh"])
            .contains("invalid value")
    );
}

/// Every command of `queuectl`, as the words that name it (`["dlq", "retry"]`), read from `--help` as a user
/// would find them; the `help` command is left out.
fn commands(home: &Home) -> Vec<Vec<String>> {
    fn below(home: &Home, path: Vec<String>, found: &mut Vec<Vec<String>>) {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = home.ok(&args);
        let listed = help
            .lines()
            .skip_while(|line| *line != "Commands:")
            .skip(1)
            .take_while(|line| !line.is_empty())
            .filter(|line| line.starts_with("  ") && !line.starts_with("   "));
        for line in listed {
            let name = line.split_whitespace().next().unwrap();
            if name != "help" {
                let mut sub = path.clone();
                sub.push(name.to_owned());
                found.push(sub.clone());
                below(home, sub, found);
            }
        }
    }
    let mut found = Vec::new();
    below(home, Vec::new(), &mut found);
    found
}

/// The roff of a man page's section `name`, up to the next section.
fn man_section(page: &str, name: &str) -> Option<String> {
    let mut lines = page.lines().skip_while(|line| {
        line.strip_prefix(".SH ")
            .is_none_or(|heading| heading.trim_matches('"') != name)
    });
    lines.next()?;
    let body: Vec<&str> = lines.take_while(|line| !line.starts_with(".SH ")).collect();
    Some(body.join("\n"))
}

/// Every `QUEUECTL_*` variable named in the sources of the CLI and the server.
fn variables_in_the_sources() -> std::collections::BTreeSet<String> {
    fn visit(dir: &std::path::Path, found: &mut std::collections::BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                visit(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (at, _) in text.match_indices("QUEUECTL_") {
                    let name: String = text[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                        .collect();
                    if name.len() > "QUEUECTL_".len() {
                        found.insert(name);
                    }
                }
            }
        }
    }
    let mut found = std::collections::BTreeSet::new();
    visit(std::path::Path::new("cli"), &mut found);
    visit(std::path::Path::new("service"), &mut found);
    found
}

#[test]
fn every_command_has_a_man_page_with_exit_status_and_environment() {
    let home = Home::new();
    let dir = home.file("man");
    let listed = home.ok(&["man", "--dir", dir.to_str().unwrap()]);
    let mut expected: Vec<std::path::PathBuf> = vec![dir.join("man1/queuectl.1")];
    for command in commands(&home) {
        expected.push(dir.join(format!("man1/queuectl-{}.1", command.join("-"))));
    }
    assert!(expected.len() > 20, "{expected:?}");
    expected.push(dir.join("man8/queuectld.8"));
    let written: Vec<std::path::PathBuf> = listed.lines().map(Into::into).collect();
    assert_eq!(written, expected, "one page per command, and queuectld's");

    for path in &written {
        let page = std::fs::read_to_string(path).unwrap().replace("\\-", "-");
        for section in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "EXIT STATUS",
            "ENVIRONMENT",
        ] {
            assert!(
                man_section(&page, section).is_some(),
                "{} has no {section}",
                path.display()
            );
        }
        // Each page it refers to exists: `queuectl-dlq(1)`, `queuectld(8)`.
        for (at, _) in page.match_indices("queuectl") {
            let reference: String = page[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '(' || *c == ')')
                .collect();
            if let Some((name, section)) = reference
                .strip_suffix(')')
                .and_then(|reference| reference.split_once('('))
            {
                let target = dir.join(format!("man{section}/{name}.{section}"));
                assert!(target.exists(), "{} refers to {reference}", path.display());
            }
        }
        // An example is one line, pasted as it is printed, within an 80-column man page.
        let examples = man_section(&page, "EXAMPLES").unwrap_or_default();
        for example in examples.lines().filter(|line| !line.starts_with('.')) {
            let example = example.replace("\\*(Aq", "'").replace("\\e", "\\");
            assert!(
                example.chars().count() <= 73,
                "{}: {example}",
                path.display()
            );
        }
    }

    let client = std::fs::read_to_string(dir.join("man1/queuectl.1")).unwrap();
    let server = std::fs::read_to_string(dir.join("man8/queuectld.8")).unwrap();
    for variable in variables_in_the_sources() {
        assert!(
            [&client, &server]
                .iter()
                .any(|page| man_section(page, "ENVIRONMENT")
                    .unwrap()
                    .contains(&variable)),
            "{variable} is read but neither queuectl(1) nor queuectld(8) describes it"
        );
    }
}

#[test]
fn help_fits_in_80_columns() {
    let home = Home::new();
    let mut helps = Vec::new();
    for command in std::iter::once(Vec::new()).chain(commands(&home)) {
        for flag in ["--help", "-h"] {
            let mut args: Vec<&str> = command.iter().map(String::as_str).collect();
            args.push(flag);
            let output = home.command(&args).env("COLUMNS", "80").output().unwrap();
            assert!(output.status.success(), "{args:?}");
            helps.push((format!("queuectl {}", args.join(" ")), output.stdout));
        }
    }
    for flag in ["--help", "-h"] {
        let output = std::process::Command::new(common::QUEUECTLD)
            .arg(flag)
            .env("COLUMNS", "80")
            .output()
            .unwrap();
        assert!(output.status.success());
        helps.push((format!("queuectld {flag}"), output.stdout));
    }
    for (command, help) in helps {
        for line in String::from_utf8(help).unwrap().lines() {
            assert!(
                line.chars().count() <= 80,
                "{command}: a line of {} columns: {line}",
                line.chars().count()
            );
        }
    }
}

#[test]
fn queuectld_names_itself() {
    let output = std::process::Command::new(common::QUEUECTLD)
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        version,
        format!("queuectld {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn wait_blocks_until_jobs_are_final_and_fails_if_one_is_dead() {
    let home = Home::with_server(2);
    home.ok(&["config", "set", "backoff_base", "1"]);
    let ok = home.enqueue(r#"{"command":"sleep 0.3"}"#);
    let doomed = home.enqueue(r#"{"command":"exit 3","max_retries":1}"#);
    let output = home.try_queuectl(&["wait", &ok]);
    assert!(output.status.success());
    assert_eq!(home.state(&ok), "completed");
    assert!(output.stdout.is_empty(), "no progress bar when piped");

    let stderr = home.fails(&["wait", &ok, &doomed]);
    assert!(
        stderr.contains("1 of 2 jobs did not complete: job2 (dead)"),
        "{stderr}"
    );
    assert_eq!(home.state(&doomed), "dead");

    home.enqueue(r#"{"command":"sleep 30"}"#);
    let stderr = home.fails(&["wait", "--timeout", "1s"]);
    assert!(stderr.contains("still not final"), "{stderr}");
    assert!(
        home.fails(&["wait", "ghost"])
            .contains("no job with id 'ghost'")
    );
}

#[test]
fn a_timeout_can_be_written_as_a_duration() {
    let home = Home::with_server(0);
    home.enqueue(r#"{"command":"true","timeout":"5m"}"#);
    assert_eq!(home.job("job1")["timeout"], 300);
    assert!(
        home.fails(&["enqueue", r#"{"command":"true","timeout":"8d"}"#])
            .contains("timeout must be")
    );
}

#[test]
fn every_read_command_speaks_json() {
    let home = Home::with_server(1);
    home.enqueue(r#"{"command":"echo hi"}"#);
    home.wait_for_state("job1", "completed");
    let status: Value = serde_json::from_str(&home.ok(&["status", "--output", "json"])).unwrap();
    assert_eq!(status["completed"], 1);
    assert_eq!(status["worker_count"], 1);
    assert_eq!(status["servers"].as_array().unwrap().len(), 1);
    let config: Value =
        serde_json::from_str(&home.ok(&["config", "get", "--output", "json"])).unwrap();
    assert_eq!(config["backoff_base"], 2);
    let run: Value =
        serde_json::from_str(home.ok(&["logs", "job1", "--output", "json"]).trim()).unwrap();
    assert_eq!(
        (run["outcome"].as_str(), run["output"].as_str()),
        (Some("ok"), Some("hi\n"))
    );
    let job: Value = serde_json::from_str(&home.ok(&["get", "job1", "--output", "json"])).unwrap();
    assert_eq!(job["state"], "completed");
    let table = home.ok(&["list", "--output", "table"]);
    assert!(
        table.starts_with("ID ") && table.contains("job1"),
        "{table}"
    );
    assert!(!table.contains('\u{1b}'), "no colour codes when piped");
}

#[test]
fn logs_follow_streams_until_the_job_is_final() {
    use std::io::{BufRead, BufReader, Read};
    let home = Home::with_server(1);
    let gate = home.file("gate");
    // The job ticks until the gate opens, and the gate opens once `logs -f` has shown a tick: by then it follows.
    home.enqueue(&format!(
        r#"{{"command":"while [ ! -e {} ]; do echo tick; sleep 0.05; done; echo after"}}"#,
        gate.display()
    ));
    home.wait_for_state("job1", "processing");
    let mut follow = home
        .command(&["logs", "job1", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap());
    let mut printed = String::new();
    while !printed.contains("tick\n") {
        assert!(lines.read_line(&mut printed).unwrap() > 0, "{printed}");
    }
    std::fs::write(&gate, "").unwrap();
    lines.read_to_string(&mut printed).unwrap();
    assert!(follow.wait().unwrap().success());
    assert!(
        printed.contains("after\n") && printed.contains("job job1 completed"),
        "{printed}"
    );
}

/// A home whose server runs `workers` workers and serves metrics on a free port of loopback, and that port.
fn with_metrics(workers: u32) -> (Home, u16) {
    let port = common::free_port();
    let mut home = Home::new();
    let mut server = home.server_command(workers);
    server.args(["--metrics-listen", &format!("127.0.0.1:{port}")]);
    home.start_server_with(server);
    (home, port)
}

#[test]
fn prometheus_scrapes_the_opt_in_metrics_endpoint() {
    let (home, port) = with_metrics(1);
    home.enqueue(r#"{"command":"true"}"#);
    home.enqueue(r#"{"command":"exit 1","max_retries":0}"#);
    home.enqueue(r#"{"command":"true","delay":"1h"}"#);
    home.ok(&["cancel", "job3"]);
    home.wait_for_state("job2", "dead");
    home.wait_for_state("job1", "completed");
    common::wait_until("the metrics to count both jobs", DEADLINE, || {
        let metrics = common::scrape(port);
        metrics.starts_with("HTTP/1.1 200")
            && metrics.contains("queuectl_job_duration_seconds_count 2")
    });
    let metrics = common::scrape(port);
    for line in [
        "queuectl_jobs{state=\"completed\"} 1",
        "queuectl_jobs{state=\"dead\"} 1",
        "queuectl_jobs{state=\"cancelled\"} 1",
        "queuectl_jobs{state=\"pending\"} 0",
        "queuectl_jobs_enqueued_total 3",
        "queuectl_jobs_completed_total 1",
        "queuectl_jobs_dead_total 1",
        "queuectl_workers 1",
        "queuectl_workers_busy 0",
        "queuectl_oldest_pending_age_seconds 0",
    ] {
        assert!(metrics.contains(line), "{line:?} missing from:\n{metrics}");
    }
}

/// promtool, which CI must have (`.ci/run` installs Debian's prometheus package); says so when not.
fn promtool() -> Option<std::process::Command> {
    if std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_err()
    {
        common::skip("promtool is not installed (apt-get install prometheus)");
        return None;
    }
    Some(std::process::Command::new("promtool"))
}

#[test]
fn the_metrics_pass_promtool_and_speak_both_text_formats() {
    use std::io::Write;
    let Some(mut promtool) = promtool() else {
        return;
    };
    let (home, port) = with_metrics(0);
    home.enqueue(r#"{"command":"true"}"#);
    home.fails(&["get", "ghost"]);

    // Prometheus asks for OpenMetrics first, and gets it.
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                             version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let openmetrics = common::scrape_accepting(port, prometheus_accept);
    assert!(
        openmetrics.contains("content-type: application/openmetrics-text; version=1.0.0")
            && openmetrics.ends_with("# EOF\n"),
        "{openmetrics}"
    );

    // Anything else gets the Prometheus text format, which promtool lints.
    let response = common::scrape(port);
    let (head, text) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for line in [
        "queuectl_build_info{version=\"",
        "queuectl_grpc_requests_total{method=\"queuectl.v1.QueueService/Enqueue\",code=\"Ok\"} 1",
        "queuectl_grpc_requests_total{method=\"queuectl.v1.QueueService/GetJob\",code=\"NotFound\"} 1",
        "queuectl_grpc_request_duration_seconds_count{method=\"queuectl.v1.QueueService/Enqueue\"} 1",
        "queuectl_watch_events_dropped_total 0",
        "queuectl_job_duration_seconds_bucket{le=\"335544.32\"}",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    let mut check = promtool
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

#[test]
fn enqueue_prints_for_scripts_and_reads_jobs_from_stdin() {
    use std::io::Write;
    let home = Home::with_server(0);
    assert_eq!(
        home.ok(&["enqueue", "--quiet", r#"{"id":"one","command":"true"}"#]),
        "one\n"
    );
    let printed: Value = serde_json::from_str(&home.ok(&[
        "enqueue",
        "--output",
        "json",
        r#"{"id":"two","command":"true","priority":2}"#,
    ]))
    .unwrap();
    assert_eq!(
        (printed["id"].as_str(), printed["priority"].as_u64()),
        (Some("two"), Some(2))
    );

    let send = |input: &str| {
        let mut child = home
            .command(&["enqueue", "--quiet", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let bad = send("{\"command\":\"true\"}\n{\"command\":\"true\",\"priority\":\"high\"}\n");
    assert_eq!(bad.status.code(), Some(2), "bad usage");
    let stderr = String::from_utf8(bad.stderr).unwrap();
    assert!(
        stderr.starts_with("error: line 2: priority must be an integer"),
        "{stderr}"
    );
    assert_eq!(home.jobs(&[]).len(), 2, "a bad line stores nothing");

    let lines: String = (0..2500)
        .map(|n| format!("{{\"id\":\"batch{n}\",\"command\":\"echo {n}\"}}\n"))
        .collect();
    let good = send(&format!("{lines}\n"));
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let ids: Vec<String> = String::from_utf8(good.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = (0..2500).map(|n| format!("batch{n}")).collect();
    assert_eq!(ids, expected, "every job, in order, each id once");
    assert_eq!(home.jobs(&["--limit", "5000"]).len(), 2502);
}

#[cfg(unix)]
#[test]
fn a_reader_that_stops_early_ends_the_listing_quietly() {
    use std::io::{BufRead, BufReader};
    let home = Home::with_server(0);
    let lines: String = (0..3000)
        .map(|n| format!("{{\"command\":\"echo {n}\"}}\n"))
        .collect();
    let mut send = home
        .command(&["enqueue", "--quiet", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut send.stdin.take().unwrap(), lines.as_bytes()).unwrap();
    assert!(send.wait().unwrap().success());
    // As `queuectl list | head -1`: one line read, then the pipe closed with more than it holds still to come.
    let mut list = home
        .command(&["list", "--limit", "3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(list.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("{\"id\": \"job1\""), "{first}");
    let output = list.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "",
        "no error printed"
    );
    assert_eq!(
        output.status.code(),
        Some(141),
        "the status a shell gives a command that SIGPIPE ended"
    );
}

#[test]
fn bad_usage_exits_2() {
    let home = Home::with_server(0);
    for args in [
        &["enqueue", "{not json"][..],
        &["enqueue", r#"{"command":"true","priority":"high"}"#],
        &["--server", "ftp://example", "status"],
    ] {
        let output = home.try_queuectl(args);
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    assert!(home.jobs(&[]).is_empty());
}

#[test]
fn durations_on_the_command_line_take_plain_seconds() {
    let home = Home::with_server(0);
    home.enqueue(r#"{"command":"true"}"#);
    let waited = home.try_queuectl(&["wait", "--timeout", "1", "job1"]);
    let stderr = String::from_utf8(waited.stderr).unwrap();
    assert!(
        stderr.contains("still not final when the timeout ran out"),
        "{stderr}"
    );
    assert_eq!(
        waited.status.code(),
        Some(4),
        "a timeout has its own exit code"
    );
    assert!(
        stderr.starts_with("note: no worker is running"),
        "said once that nothing can progress: {stderr}"
    );
    assert_eq!(stderr.matches("no worker").count(), 1);
    assert!(
        home.fails(&["clean", "--older-than", "soon"])
            .contains("give seconds (300)")
    );
}

#[test]
fn an_autostart_that_fails_says_why_at_once() {
    let home = Home::new();
    let output = home
        .command(&["status"])
        .env_remove("QUEUECTL_NO_AUTOSTART")
        .env("QUEUECTL_DATABASE_URL", "nonsense://db")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert_eq!(
        stderr,
        "error: no queuectl server is running, and queuectld could not start: opening the database: the database \
         is unavailable: the database URL must start with postgres:// or postgresql://\n"
    );
}

/// Commands started together in a home with no server each start one; one of those servers takes the home, the
/// others step back, and every command is served by the one that took it.
#[test]
fn commands_that_autostart_together_share_one_server() {
    let home = Home::new();
    let commands: Vec<_> = (0..4)
        .map(|_| {
            home.command(&["status"])
                .env_remove("QUEUECTL_NO_AUTOSTART")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = commands
        .into_iter()
        .map(|command| command.wait_with_output().unwrap())
        .collect();
    let stopped = home.try_queuectl(&["server", "stop"]);
    for output in &outputs {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(stopped.status.success(), "{stopped:?}");
    let log = std::fs::read_to_string(home.file("server.log")).unwrap();
    assert_eq!(log.matches("queuectld ready").count(), 1, "{log}");
}

/// A command that finds the home's lock held (another command's server is starting) waits for that server to
/// answer, instead of reporting that the server it started stepped back.
#[cfg(unix)]
#[test]
fn an_autostart_waits_for_the_server_that_holds_the_home() {
    let home = Home::new();
    std::fs::create_dir_all(home.path()).unwrap();
    let lock = std::fs::File::create(home.file("server.lock")).unwrap();
    lock.try_lock().unwrap();
    let waiting = home
        .command(&["status"])
        .env_remove("QUEUECTL_NO_AUTOSTART")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The lock's holder begins to answer: a server of another home, reached through this home's socket path.
    let other = Home::with_server(0);
    std::os::unix::fs::symlink(other.file("queuectl.sock"), home.file("queuectl.sock")).unwrap();
    let output = waiting.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_cli_finds_the_tcp_address_its_homes_server_recorded() {
    let mut home = Home::new();
    let mut server = home.server_command(0);
    server.args(["--listen", "http://127.0.0.1:0"]);
    // Waits until `queuectl status`, with no --server and no autostart, reaches it.
    home.start_server_with(server);
    assert!(!home.file("queuectl.sock").exists());
    assert_eq!(home.enqueue(r#"{"command":"true"}"#), "job1");
    assert_eq!(home.state("job1"), "pending");
}

#[test]
fn list_shows_pending_jobs_by_their_aged_priority_as_they_will_run() {
    let home = Home::with_server(0);
    home.ok(&["config", "set", "aging_interval", "2"]);
    home.enqueue(r#"{"id":"old-9","command":"true","priority":9}"#);
    wait_until("the old job to gain two levels", DEADLINE, || {
        home.job("old-9")["effective_priority"] == 7
    });
    // Ready 4 s or more after the old job: it overtakes a new 8, and a new 1 stays ahead of it for 16 s.
    home.enqueue(r#"{"id":"new-8","command":"true","priority":8}"#);
    home.enqueue(r#"{"id":"new-1","command":"true","priority":1}"#);
    let listed = home.ok(&["list", "--state", "pending", "--output", "table"]);
    let ids: Vec<&str> = listed
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(ids, ["new-1", "old-9", "new-8"], "{listed}");
    let old = listed
        .lines()
        .find(|line| line.starts_with("old-9"))
        .unwrap();
    assert!(
        ["7 (9)", "6 (9)"].iter().any(|cell| old.contains(cell)),
        "the aged priority, with the stored one beside it: {old}"
    );
    let jobs = home.jobs(&["--state", "pending"]);
    assert_eq!(
        (jobs[1]["id"].as_str(), jobs[1]["priority"].as_u64()),
        (Some("old-9"), Some(9))
    );
    assert!(jobs[1]["effective_priority"].as_u64().unwrap() < 9);
    assert!(
        jobs[0].get("effective_priority").is_none(),
        "a job aging has not moved keeps the Python queuectl's keys: {}",
        jobs[0]
    );
}

/// What `shell` completing `words` (the last one being completed) gets from `queuectl`, one per line.
fn completions_in(shell: &str, home: &Home, words: &[&str]) -> String {
    common::succeeds(
        home.command(&[])
            .env("COMPLETE", shell)
            .env("_CLAP_COMPLETE_INDEX", (words.len() - 1).to_string())
            .env("_CLAP_IFS", "\n")
            .arg("--")
            .args(words),
    )
}

fn completions(home: &Home, words: &[&str]) -> String {
    completions_in("bash", home, words)
}

#[test]
fn shells_complete_job_ids_from_the_running_server_and_setting_keys() {
    let home = Home::with_server(0);
    for id in ["alpha", "alpine", "beta"] {
        home.enqueue(&format!(r#"{{"id":"{id}","command":"true"}}"#));
    }
    assert_eq!(
        completions(&home, &["queuectl", "get", "al"]),
        "alpha\nalpine"
    );
    assert_eq!(
        completions(&home, &["queuectl", "cancel", "beta", "al"]),
        "alpha\nalpine"
    );
    assert_eq!(
        completions(&home, &["queuectl", "config", "set", "aging"]),
        "aging_interval"
    );
    let bare = Home::new();
    assert_eq!(
        completions(&bare, &["queuectl", "get", "al"]),
        "",
        "no server: nothing to offer, and none is started"
    );
    assert!(!bare.file("queuectl.sock").exists());
}

/// Shells that show what a candidate is (fish, zsh) get each job's state and its command on one short line.
#[test]
fn a_jobs_completion_shows_its_command_on_one_short_line() {
    let home = Home::with_server(0);
    let long = "x".repeat(100);
    home.enqueue(r#"{"id":"j-lines","command":"echo one\necho two"}"#);
    home.enqueue(&format!(r#"{{"id":"j-long","command":"echo {long}"}}"#));
    home.enqueue(r#"{"id":"j-short","command":"true"}"#);
    let shown = completions_in("fish", &home, &["queuectl", "get", "j-"]);
    let expected = format!(
        "j-lines\tpending: echo one…\nj-long\tpending: echo {}…\nj-short\tpending: true\n",
        &long[..55]
    );
    assert_eq!(shown, expected);
}
