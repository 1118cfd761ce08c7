//! Processes that leave a job's process group (`setsid`) or drop its tag (`env -i`) still end with their run: the
//! attempt's cgroup takes them where the server has a delegated cgroup v2 sub-tree, the subreaper fallback
//! (`QUEUECTL_CGROUPS=off`) takes those that keep the tag.

#![cfg(target_os = "linux")]

mod common;

use std::process::Command;

use common::{DEADLINE, Home, alive, wait_until};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Cgroup,
    Subreaper,
}

/// Whether this machine gives the tests a writable cgroup v2 tree; outside CI a test without it says it skips (CI
/// runs as root in a container where it has one, so there it fails instead).
fn cgroups_or_skip(test: &str) -> bool {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|mounts| mounts.lines().any(|line| line.contains(" - cgroup2 ")));
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if mounted && root {
        return true;
    }
    common::skip(&format!("{test}: it needs a writable cgroup v2 tree"));
    false
}

fn server_command(home: &Home, mode: Mode, workers: u32) -> Command {
    let mut command = home.server_command(workers);
    match mode {
        Mode::Cgroup => command.env_remove("QUEUECTL_CGROUPS"),
        Mode::Subreaper => command.env("QUEUECTL_CGROUPS", "off"),
    };
    command
}

/// A home whose server runs in `mode`, checked in its log.
fn home_in(mode: Mode) -> Home {
    let mut home = Home::new();
    home.start_server_with(server_command(&home, mode, 1));
    let wanted = match mode {
        Mode::Cgroup => "mode=\"cgroup\"",
        Mode::Subreaper => "mode=\"subreaper\"",
    };
    let log = std::fs::read_to_string(home.file("test-server.log")).unwrap();
    assert!(
        log.contains(wanted),
        "the server says it is in {wanted}: {log}"
    );
    home
}

/// Restarts the server without workers, so that the interrupted job waits instead of running again.
fn restart(home: &mut Home, mode: Mode) {
    home.start_server_with(server_command(home, mode, 0));
}

fn gone(what: &str, pid: u32) {
    wait_until(what, DEADLINE, || !alive(pid));
}

/// A job that starts a `setsid sleep` (out of its process group), records its pid once it left the group, then
/// runs `then`.
fn enqueue_escapee(home: &Home, id: &str, then: &str, extra: &str) -> u32 {
    let pid_file = home.file(&format!("{id}.pid"));
    home.enqueue(&format!(
        r#"{{"id":"{id}","command":"setsid sh -c 'echo $$ > {pid}; exec sleep 3000' & while [ ! -s {pid} ]; do sleep 0.01; done; {then}"{extra}}}"#,
        pid = pid_file.display()
    ));
    common::pid_written_to(&pid_file)
}

/// A job that starts a `sleep` out of its process group and without the run's tag, then sleeps itself.
fn enqueue_untagged(home: &Home, id: &str) -> u32 {
    let pid_file = home.file(&format!("{id}.pid"));
    home.enqueue(&format!(
        r#"{{"id":"{id}","command":"env -i setsid sh -c 'echo $$ > {pid}; exec sleep 3000' & exec sleep 3000"}}"#,
        pid = pid_file.display()
    ));
    let pid = common::pid_written_to(&pid_file);
    wait_until("the sleep to run without the tag", DEADLINE, || {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| cmdline.starts_with(b"sleep"))
    });
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains("QUEUECTL_JOB"));
    pid
}

fn setsid_goes_when_the_job_ends(mode: Mode) {
    let home = home_in(mode);
    let sleeper = enqueue_escapee(&home, "ends", "true", "");
    home.wait_for_state("ends", "completed");
    gone("the escaped sleep to end with its job", sleeper);
}

fn setsid_goes_on_timeout(mode: Mode) {
    let home = home_in(mode);
    let sleeper = enqueue_escapee(
        &home,
        "slow",
        "sleep 3000",
        r#","timeout":1,"max_retries":0"#,
    );
    home.wait_for_state("slow", "dead");
    gone("the escaped sleep to end with the timeout", sleeper);
}

fn setsid_goes_on_a_drain(mode: Mode) {
    let mut home = home_in(mode);
    home.ok(&["config", "set", "shutdown_grace", "1"]);
    let sleeper = enqueue_escapee(&home, "drained", "sleep 3000", "");
    let server = home.server().id();
    assert!(
        Command::new("kill")
            .args(["-TERM", &server.to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(home.wait_server_exit().success());
    gone("the escaped sleep to end with the drain", sleeper);
}

fn setsid_goes_on_a_kill_9_and_restart(mode: Mode) {
    let mut home = home_in(mode);
    let sleeper = enqueue_escapee(&home, "crashed", "sleep 3000", "");
    home.kill_server();
    assert!(alive(sleeper), "nothing kills it before the restart");
    restart(&mut home, mode);
    gone("recovery to end the escaped sleep", sleeper);
}

/// A job's shell starts before it knows its job (a worker's next job runs in a shell started while its previous
/// job ran, recorded by the claim itself). A command the shell runs alone (a builtin loop: no process carries the
/// run's tag) is still known to the next server, by the server's tag in that shell's environment.
fn a_shell_alone_goes_on_a_kill_9_and_restart(mode: Mode) {
    let mut home = Home::new();
    home.start_server_with(server_command(&home, mode, 0));
    let pid_file = home.file("spinner.pid");
    home.enqueue(r#"{"id":"first","command":"true"}"#);
    home.enqueue(&format!(
        r#"{{"id":"spinner","command":"echo $$ >> {}; while :; do :; done"}}"#,
        pid_file.display()
    ));
    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    let spinner = common::pid_written_to(&pid_file);
    let environ = std::fs::read(format!("/proc/{spinner}/environ")).unwrap();
    let variables: Vec<&[u8]> = environ.split(|byte| *byte == 0).collect();
    assert!(
        variables
            .iter()
            .any(|variable| variable.starts_with(b"QUEUECTL_GATE=")),
        "the second job ran in a shell started ahead of it"
    );
    assert!(
        !variables
            .iter()
            .any(|variable| variable.starts_with(b"QUEUECTL_JOB=")),
        "that shell started before it knew its run"
    );
    home.kill_server();
    assert!(alive(spinner), "nothing kills it before the restart");
    restart(&mut home, mode);
    gone("recovery to end the shell of the interrupted run", spinner);
    // Recovery returns the job to the queue just after it killed the shell.
    home.wait_for_state("spinner", "pending");
}

#[test]
fn cgroup_a_shell_alone_goes_on_a_kill_9_and_restart() {
    if cgroups_or_skip("cgroup_a_shell_alone_goes_on_a_kill_9_and_restart") {
        a_shell_alone_goes_on_a_kill_9_and_restart(Mode::Cgroup);
    }
}

#[test]
fn subreaper_a_shell_alone_goes_on_a_kill_9_and_restart() {
    a_shell_alone_goes_on_a_kill_9_and_restart(Mode::Subreaper);
}

#[test]
fn cgroup_setsid_goes_when_the_job_ends() {
    if cgroups_or_skip("cgroup_setsid_goes_when_the_job_ends") {
        setsid_goes_when_the_job_ends(Mode::Cgroup);
    }
}

#[test]
fn cgroup_setsid_goes_on_timeout() {
    if cgroups_or_skip("cgroup_setsid_goes_on_timeout") {
        setsid_goes_on_timeout(Mode::Cgroup);
    }
}

#[test]
fn cgroup_setsid_goes_on_a_drain() {
    if cgroups_or_skip("cgroup_setsid_goes_on_a_drain") {
        setsid_goes_on_a_drain(Mode::Cgroup);
    }
}

#[test]
fn cgroup_setsid_goes_on_a_kill_9_and_restart() {
    if cgroups_or_skip("cgroup_setsid_goes_on_a_kill_9_and_restart") {
        setsid_goes_on_a_kill_9_and_restart(Mode::Cgroup);
    }
}

#[test]
fn cgroup_untagged_goes_on_a_kill_9_and_restart() {
    if !cgroups_or_skip("cgroup_untagged_goes_on_a_kill_9_and_restart") {
        return;
    }
    let mut home = home_in(Mode::Cgroup);
    let sleeper = enqueue_untagged(&home, "untagged");
    home.kill_server();
    restart(&mut home, Mode::Cgroup);
    gone("recovery to end the untagged sleep", sleeper);
}

#[test]
fn cgroup_untagged_goes_on_a_graceful_stop() {
    if !cgroups_or_skip("cgroup_untagged_goes_on_a_graceful_stop") {
        return;
    }
    let mut home = home_in(Mode::Cgroup);
    home.ok(&["config", "set", "shutdown_grace", "1"]);
    let sleeper = enqueue_untagged(&home, "untagged");
    assert!(home.stop_server().success());
    gone("the stop to end the untagged sleep", sleeper);
}

/// A job's shell joins a cgroup when it starts, and an ended attempt's cgroup, emptied, serves a later shell: a
/// server keeps about two per worker whatever it runs, and none once it stopped or a successor recovered.
#[test]
fn cgroup_attempt_cgroups_are_reused_and_removed() {
    if !cgroups_or_skip("cgroup_attempt_cgroups_are_reused_and_removed") {
        return;
    }
    let mut home = home_in(Mode::Cgroup);
    home.ok(&["config", "set", "shutdown_grace", "1"]);
    let server_id = std::fs::read_to_string(home.file("server.id")).unwrap();
    let prefix = format!("queuectl-{}-", server_id.trim());
    let attempt_cgroups = || {
        let mut names: Vec<String> = cgroup_names()
            .into_iter()
            .filter(|name| name.starts_with(&prefix))
            .collect();
        names.sort();
        names
    };
    let escapee = enqueue_escapee(&home, "first", "true", "");
    home.wait_for_state("first", "completed");
    gone("the escaped sleep to end with its job", escapee);
    // The emptied cgroup of the first attempt, and that of the shell started meanwhile for the next job.
    let kept = attempt_cgroups();
    assert_eq!(kept.len(), 2, "one worker keeps two cgroups: {kept:?}");
    for n in 0..5 {
        home.enqueue(&format!(r#"{{"id":"then{n}","command":"true"}}"#));
        home.wait_for_state(&format!("then{n}"), "completed");
    }
    assert_eq!(attempt_cgroups(), kept, "later attempts reuse them");
    enqueue_escapee(&home, "second", "sleep 3000", "");
    assert_eq!(attempt_cgroups(), kept, "so does a running one");

    home.kill_server();
    restart(&mut home, Mode::Cgroup);
    wait_until(
        "recovery to remove the dead server's cgroups",
        DEADLINE,
        || attempt_cgroups().is_empty(),
    );
    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    home.wait_for_state("second", "processing");
    assert!(!attempt_cgroups().is_empty());
    assert!(home.stop_server().success());
    assert_eq!(
        attempt_cgroups(),
        Vec::<String>::new(),
        "a stopped server leaves no cgroup"
    );
}

/// Every cgroup name on the machine's cgroup v2 tree.
fn cgroup_names() -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mounts
        .lines()
        .find(|line| line.contains(" - cgroup2 "))
        .and_then(|line| line.split(' ').nth(4))
        .expect("a cgroup2 mount")
        .to_owned();
    let mut names = Vec::new();
    let mut dirs = vec![std::path::PathBuf::from(root)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                names.push(entry.file_name().to_string_lossy().into_owned());
                dirs.push(entry.path());
            }
        }
    }
    names
}

#[test]
fn subreaper_setsid_goes_when_the_job_ends() {
    setsid_goes_when_the_job_ends(Mode::Subreaper);
}

#[test]
fn subreaper_setsid_goes_on_timeout() {
    setsid_goes_on_timeout(Mode::Subreaper);
}

#[test]
fn subreaper_setsid_goes_on_a_drain() {
    setsid_goes_on_a_drain(Mode::Subreaper);
}

#[test]
fn subreaper_setsid_goes_on_a_kill_9_and_restart() {
    setsid_goes_on_a_kill_9_and_restart(Mode::Subreaper);
}

/// Orphans that end by themselves come back to the subreaper, which must reap them.
#[test]
fn subreaper_leaves_no_zombies() {
    let mut home = home_in(Mode::Subreaper);
    for index in 0..20 {
        home.enqueue(&format!(
            r#"{{"id":"z{index}","command":"setsid sh -c 'sleep 0.2' & (sleep 0.1 &) ; true"}}"#
        ));
    }
    wait_until("every job to complete", DEADLINE, || {
        home.count("completed") == 20
    });
    let server = home.server().id();
    wait_until("no zombie child of the server", DEADLINE, || {
        zombies_of(server) == 0
    });
}

/// How many zombies have `parent` as their parent.
fn zombies_of(parent: u32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
        .filter(|stat| {
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().take(2).collect())
                .unwrap_or_default();
            fields.len() == 2 && fields[0] == "Z" && fields[1] == parent.to_string()
        })
        .count()
}
