//! Wall-clock steps: a server whose clock went back keeps its backoffs and its aging order. The server's clock is
//! stepped with its test-only `QUEUECTL_TEST_CLOCK_OFFSET`, not the machine's.

#![cfg(unix)]

mod common;

use std::time::Duration;

use common::{Home, wait_until};

const AN_HOUR_BACK: &str = "-3600";

#[test]
fn a_backoff_does_not_stall_when_the_clock_steps_back_an_hour() {
    let mut home = Home::with_server(1);
    home.ok(&["config", "set", "backoff_base", "3"]);
    let marker = home.file("attempted");
    // Fails its first attempt only, so it waits one backoff of 3 s, then completes.
    let command = format!(
        "test -f '{0}' || {{ touch '{0}'; exit 1; }}",
        marker.display()
    );
    let job = serde_json::json!({ "command": command, "max_retries": 3 }).to_string();
    let id = home.enqueue(&job);
    home.wait_for_state(&id, "failed");
    home.kill_server();
    let mut server = home.server_command(1);
    server.env("QUEUECTL_TEST_CLOCK_OFFSET", AN_HOUR_BACK);
    home.start_server_with(server);
    // Its own 3 s and a margin; without the clamp it waits an hour.
    wait_until(
        &format!("{id} to complete"),
        Duration::from_secs(20),
        || home.state(&id) == "completed",
    );
}

#[test]
fn an_older_urgent_job_still_runs_before_a_newer_low_one_after_the_clock_steps_back() {
    let mut home = Home::with_server(0);
    home.ok(&["config", "set", "aging_interval", "60"]);
    let order = home.file("order");
    let job = |name: &str, priority: u8| {
        let command = format!("echo {name} >> '{}'", order.display());
        serde_json::json!({ "command": command, "priority": priority }).to_string()
    };
    let urgent = home.enqueue(&job("urgent", 1));
    home.stop_server();
    let mut server = home.server_command(0);
    server.env("QUEUECTL_TEST_CLOCK_OFFSET", AN_HOUR_BACK);
    home.start_server_with(server);
    // Stepped back an hour, the new job would age 60 aging intervals ahead of the urgent one.
    let low = home.enqueue(&job("low", 10));
    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    home.wait_for_state(&urgent, "completed");
    home.wait_for_state(&low, "completed");
    let ran = std::fs::read_to_string(&order).unwrap();
    assert_eq!(
        ran.lines().collect::<Vec<_>>(),
        ["urgent", "low"],
        "the order the jobs ran in"
    );
    let stamp = |id: &str| home.job(id)["created_at"].as_str().unwrap().to_owned();
    let (older, newer) = (stamp(&urgent), stamp(&low));
    assert!(
        newer >= older,
        "the newer job was stamped before the older one: {newer} < {older}"
    );
}
