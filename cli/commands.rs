//! One function per subcommand: build the request, make the call, print the answer.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};

use anyhow::{Context, bail};
use queuectl::pb;
use serde_json::Value;
use tokio_stream::StreamExt;

use crate::args::{Format, StateArg};
use crate::client::{self, Client};
use crate::output;

const JOB_KEYS: &str = "command, id, priority, max_retries (or max-retries), timeout";

/// Reads an integer field of the job JSON.
fn integer<T: TryFrom<i64>>(key: &str, value: &Value, range: &str) -> anyhow::Result<T> {
    let Some(number) = value.as_i64() else {
        if value.is_number() {
            bail!("{key} must be {range}, got {value}");
        }
        bail!("{key} must be an integer, got {value}");
    };
    T::try_from(number).map_err(|_| anyhow::anyhow!("{key} must be {range}, got {number}"))
}

/// A timeout: whole seconds, or a duration a person writes (`90s`, `5m`, `1h 30m`).
fn seconds(value: &Value) -> anyhow::Result<i64> {
    let Value::String(text) = value else {
        return integer("timeout", value, "0-604800 seconds");
    };
    let duration = humantime::parse_duration(text).map_err(|error| {
        anyhow::anyhow!(
            "timeout {text:?} is not a duration ({error}); use e.g. 300, \"90s\" or \"5m\""
        )
    })?;
    if duration.subsec_nanos() != 0 {
        bail!("timeout must be whole seconds, got {text:?}");
    }
    i64::try_from(duration.as_secs())
        .map_err(|_| anyhow::anyhow!("timeout must be 0-604800 seconds, got {text:?}"))
}

/// Parses the job JSON of `queuectl enqueue` into a request; the server checks the values' ranges.
pub fn parse_job(json: &str) -> anyhow::Result<pb::EnqueueRequest> {
    let value: Value = serde_json::from_str(json)
        .map_err(|error| anyhow::anyhow!("the job is not valid JSON: {error}"))?;
    let Value::Object(fields) = value else {
        bail!("the job must be a JSON object such as {{\"command\":\"echo hi\"}}, got {value}");
    };
    let mut request = pb::EnqueueRequest::default();
    let mut command = None;
    for (key, value) in &fields {
        match key.as_str() {
            "command" => match value {
                Value::String(text) => command = Some(text.clone()),
                other => bail!("command must be a string, got {other}"),
            },
            "id" => match value {
                Value::String(text) => request.id = Some(text.clone()),
                other => bail!("id must be a string, got {other}"),
            },
            "priority" => request.priority = Some(integer(key, value, "1-10")?),
            "max_retries" | "max-retries" => {
                if request.max_retries.is_some() {
                    bail!("give max_retries or max-retries, not both");
                }
                request.max_retries = Some(integer(key, value, "0-1000")?);
            }
            "timeout" => request.timeout = Some(seconds(value)?),
            unknown => bail!("unknown key {unknown:?} in the job: expected {JOB_KEYS}"),
        }
    }
    request.command =
        command.context("the job needs a \"command\", e.g. {\"command\":\"echo hi\"}")?;
    Ok(request)
}

pub async fn enqueue(client: &mut Client, json: &str) -> anyhow::Result<()> {
    let request = parse_job(json)?;
    let job = client
        .enqueue(request)
        .await?
        .into_inner()
        .job
        .context("the server sent no job")?;
    println!("Enqueued job {}", job.id);
    Ok(())
}

pub async fn status(client: &mut Client, format: Format) -> anyhow::Result<()> {
    let status = client.status(pb::StatusRequest {}).await?.into_inner();
    match format {
        Format::Table => print!("{}", output::status_text(&status)),
        Format::Json => println!("{}", output::status_json(&status)),
    }
    Ok(())
}

fn state_filter(state: Option<StateArg>) -> pb::JobState {
    match state {
        None => pb::JobState::Unspecified,
        Some(StateArg::Pending) => pb::JobState::Pending,
        Some(StateArg::Processing) => pb::JobState::Processing,
        Some(StateArg::Failed) => pb::JobState::Failed,
        Some(StateArg::Completed) => pb::JobState::Completed,
        Some(StateArg::Dead) => pb::JobState::Dead,
    }
}

/// Prints jobs page by page, so that a long list starts at once and never sits whole in memory.
pub async fn list(
    client: &mut Client,
    state: Option<StateArg>,
    format: Format,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if let Format::Table = format {
        writeln!(stdout, "{}", output::table_header())?;
    }
    let mut remaining = limit.unwrap_or(u64::MAX);
    let mut page_token = String::new();
    while remaining > 0 {
        let page = client
            .list(pb::ListRequest {
                state: state_filter(state).into(),
                page_size: u32::try_from(remaining.min(1000)).unwrap_or(1000),
                page_token,
            })
            .await?
            .into_inner();
        for job in &page.jobs {
            let line = match format {
                Format::Json => output::job_json(job),
                Format::Table => output::job_row(job),
            };
            writeln!(stdout, "{line}")?;
        }
        remaining = remaining.saturating_sub(page.jobs.len() as u64);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(())
}

pub async fn get(client: &mut Client, id: String, format: Format) -> anyhow::Result<()> {
    let job = client
        .get_job(pb::GetJobRequest { id })
        .await?
        .into_inner()
        .job
        .context("the server sent no job")?;
    match format {
        Format::Json => println!("{}", output::job_json(&job)),
        Format::Table => println!("{}\n{}", output::table_header(), output::job_row(&job)),
    }
    Ok(())
}

/// Whether the server cut an event stream because this client read it too slowly (it says so with
/// RESOURCE_EXHAUSTED, and the message says what to do).
fn fell_behind(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::ResourceExhausted
}

fn is_final(state: i32) -> bool {
    matches!(
        pb::JobState::try_from(state),
        Ok(pb::JobState::Completed | pb::JobState::Dead)
    )
}

pub async fn logs(
    client: &mut Client,
    id: String,
    follow: bool,
    format: Option<Format>,
) -> anyhow::Result<()> {
    // Subscribe before reading the stored runs, so that nothing falls between the two.
    let mut events = if follow {
        let request = pb::WatchEventsRequest { job_id: id.clone() };
        Some(client.watch_events(request).await?.into_inner())
    } else {
        None
    };
    let runs = client
        .get_job_logs(pb::GetJobLogsRequest { id: id.clone() })
        .await?
        .into_inner()
        .runs;
    let mut stdout = std::io::stdout();
    for run in &runs {
        if let Some(Format::Json) = format {
            writeln!(stdout, "{}", output::run_json(run))?;
            continue;
        }
        writeln!(stdout, "{}", output::run_header(&id, run))?;
        stdout.write_all(&run.output)?;
    }
    let Some(events) = events.as_mut() else {
        return Ok(());
    };
    let job = client
        .get_job(pb::GetJobRequest { id: id.clone() })
        .await?
        .into_inner()
        .job;
    if let Some(job) = job.filter(|job| is_final(job.state)) {
        // It ended before the stream could tell: the same last line the stream would have printed.
        let finished = pb::JobFinished {
            worker: runs.last().map_or(0, |run| run.worker),
            job_id: id,
            state: job.state,
            error: if job.state == pb::JobState::Completed as i32 {
                String::new()
            } else {
                job.last_error
            },
        };
        let line = output::event_line(&pb::watch_events_response::Event::JobFinished(finished));
        println!("{}", line.unwrap_or_default());
        return Ok(());
    }
    while let Some(event) = events.next().await {
        use pb::watch_events_response::Event;
        let event = match event {
            Ok(event) => event,
            Err(status) if fell_behind(&status) => bail!(
                "this terminal read the output slower than the job wrote it, so the server stopped sending it; \
                 `queuectl logs {id}` shows what was stored"
            ),
            Err(status) => return Err(status.into()),
        };
        match event.event {
            Some(Event::JobOutput(chunk)) => stdout.write_all(&chunk.data)?,
            Some(Event::JobFinished(finished)) => {
                println!(
                    "{}",
                    output::event_line(&Event::JobFinished(finished.clone())).unwrap_or_default()
                );
                if is_final(finished.state) {
                    break;
                }
            }
            Some(other) => {
                if let Some(line) = output::event_line(&other) {
                    println!("{line}");
                }
            }
            None => {}
        }
        stdout.flush()?;
    }
    Ok(())
}

/// Exit code of `queuectl health`, as grpc_health_probe has it.
pub async fn health(server: Option<&str>) -> i32 {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let channel = match client::channel(server, false, client::PROBE).await {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("error: {error}");
            return 2;
        }
    };
    match HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
    {
        Ok(response) if response.get_ref().status() == ServingStatus::Serving => {
            println!("status: SERVING");
            0
        }
        Ok(response) => {
            println!("status: {}", response.get_ref().status().as_str_name());
            4
        }
        Err(status) => {
            let reason = client::timed_out(&status, client::PROBE)
                .unwrap_or_else(|| status.message().to_owned());
            eprintln!("error: health check failed: {reason}");
            3
        }
    }
}

/// The ids of every job that is not final.
async fn unfinished(client: &mut Client) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for state in [
        pb::JobState::Pending,
        pb::JobState::Processing,
        pb::JobState::Failed,
    ] {
        let mut page_token = String::new();
        loop {
            let page = client
                .list(pb::ListRequest {
                    state: state.into(),
                    page_size: 1000,
                    page_token,
                })
                .await?
                .into_inner();
            ids.extend(page.jobs.into_iter().map(|job| job.id));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
    }
    Ok(ids)
}

async fn subscribe(
    client: &mut Client,
) -> anyhow::Result<tonic::Streaming<pb::WatchEventsResponse>> {
    Ok(client
        .watch_events(pb::WatchEventsRequest::default())
        .await?
        .into_inner())
}

/// Moves the jobs of `waiting` that are final now out of it, and the dead ones into `dead`.
async fn recheck(
    client: &mut Client,
    waiting: &mut BTreeSet<String>,
    dead: &mut Vec<String>,
) -> anyhow::Result<()> {
    for id in waiting.clone() {
        let job = client
            .get_job(pb::GetJobRequest { id: id.clone() })
            .await?
            .into_inner()
            .job;
        match job.map(|job| job.state) {
            Some(state) if state == i32::from(pb::JobState::Dead) => {
                waiting.remove(&id);
                dead.push(id);
            }
            Some(state) if is_final(state) => {
                waiting.remove(&id);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Blocks until every job in `ids` (or every unfinished job) is completed or dead; fails if one ended dead.
pub async fn wait(
    client: &mut Client,
    ids: Vec<String>,
    timeout: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    // Subscribe first, so that a job finishing between the two steps is not missed.
    let mut events = subscribe(client).await?;
    let ids = if ids.is_empty() {
        unfinished(client).await?
    } else {
        ids
    };
    let mut waiting: BTreeSet<String> = ids.iter().cloned().collect();
    let mut dead = Vec::new();
    recheck(client, &mut waiting, &mut dead).await?;
    let progress = if std::io::stdout().is_terminal() {
        let bar = indicatif::ProgressBar::new(ids.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} jobs final {msg}")
                .expect("a valid template"),
        );
        bar.set_position((ids.len() - waiting.len()) as u64);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let deadline = timeout.map(|limit| tokio::time::Instant::now() + limit);
    while !waiting.is_empty() {
        let event = tokio::select! {
            event = events.next() => event,
            () = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                progress.abandon();
                bail!("{} jobs were still not final when the timeout ran out", waiting.len());
            }
        };
        let event = match event.transpose() {
            Ok(event) => event,
            Err(status) if fell_behind(&status) => {
                progress.suspend(|| {
                    eprintln!(
                        "note: missed some job events ({}); checking the jobs again",
                        status.message()
                    );
                });
                events = subscribe(client).await?;
                recheck(client, &mut waiting, &mut dead).await?;
                progress.set_position((ids.len() - waiting.len()) as u64);
                continue;
            }
            Err(status) => return Err(status.into()),
        };
        let Some(event) = event.and_then(|response| response.event) else {
            bail!("the server stopped while jobs were still running");
        };
        if let pb::watch_events_response::Event::JobFinished(finished) = event
            && is_final(finished.state)
            && waiting.remove(&finished.job_id)
        {
            if finished.state == i32::from(pb::JobState::Dead) {
                dead.push(finished.job_id);
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    if !dead.is_empty() {
        bail!(
            "{} of {} jobs ended dead: {}",
            dead.len(),
            ids.len(),
            dead.join(", ")
        );
    }
    Ok(())
}

pub async fn dlq_retry(client: &mut Client, id: String) -> anyhow::Result<()> {
    client
        .dlq_retry(pb::DlqRetryRequest { id: id.clone() })
        .await?;
    println!("Job {id} moved back to pending");
    Ok(())
}

pub async fn config_get(
    client: &mut Client,
    key: Option<String>,
    format: Option<Format>,
) -> anyhow::Result<()> {
    let all = key.is_none();
    let entries = client
        .get_config(pb::GetConfigRequest {
            key: key.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .entries;
    if let Some(Format::Json) = format {
        println!("{}", output::config_json(&entries));
        return Ok(());
    }
    for entry in entries {
        if all {
            println!("{} = {}", entry.key, entry.value);
        } else {
            println!("{}", entry.value);
        }
    }
    Ok(())
}

pub async fn config_set(client: &mut Client, key: String, value: String) -> anyhow::Result<()> {
    client
        .set_config(pb::SetConfigRequest { key, value })
        .await?;
    println!("OK");
    Ok(())
}

/// Sets the worker count, then prints worker activity until the workers have exited. Ctrl-C stops them
/// gracefully: each finishes its current job.
pub async fn worker_start(
    client: &mut Client,
    count: u32,
    daemon: bool,
    all: bool,
) -> anyhow::Result<()> {
    if daemon {
        client
            .start_workers(pb::StartWorkersRequest { count, all })
            .await?;
        println!("{}", started_message(count, all));
        return Ok(());
    }
    // Subscribe first, so that the workers' first events are seen.
    let mut events = subscribe(client).await?;
    client
        .start_workers(pb::StartWorkersRequest { count, all })
        .await?;
    let mut live: BTreeSet<u32> = (0..count).collect();
    let mut stopping = false;
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            event = events.next() => {
                use pb::watch_events_response::Event;
                let event = match event.transpose() {
                    Ok(event) => event,
                    Err(status) if fell_behind(&status) => {
                        eprintln!("note: missed some worker activity ({}); watching again", status.message());
                        events = subscribe(client).await?;
                        live = running_workers(client).await?;
                        if live.is_empty() {
                            return Ok(());
                        }
                        continue;
                    }
                    Err(status) => return Err(status.into()),
                };
                let Some(event) = event.and_then(|response| response.event) else {
                    println!("the server stopped");
                    return Ok(());
                };
                match &event {
                    Event::JobOutput(chunk) => stdout.write_all(&chunk.data)?,
                    Event::WorkerStarted(started) => {
                        live.insert(started.worker);
                    }
                    Event::WorkerExited(exited) => {
                        live.remove(&exited.worker);
                    }
                    _ => {}
                }
                if let Some(line) = output::event_line(&event) {
                    writeln!(stdout, "{line}")?;
                }
                stdout.flush()?;
                if live.is_empty() {
                    return Ok(());
                }
            }
            _ = tokio::signal::ctrl_c(), if !stopping => {
                stopping = true;
                client.stop_workers(pb::StopWorkersRequest { wait: false, all }).await?;
            }
        }
    }
}

/// What `worker start --daemon` did, in words that fit the count and the scope.
fn started_message(count: u32, all: bool) -> String {
    let workers = if count == 1 { "worker" } else { "workers" };
    let (scope, stop) = if all {
        ("on every server", "`queuectl worker stop --all`")
    } else {
        ("in the server", "`queuectl worker stop`")
    };
    format!("Started {count} {workers} {scope}; {stop} stops them")
}

/// The worker slots this server runs now.
async fn running_workers(client: &mut Client) -> anyhow::Result<BTreeSet<u32>> {
    let status = client.status(pb::StatusRequest {}).await?.into_inner();
    Ok(status.workers.iter().map(|worker| worker.index).collect())
}

pub async fn worker_stop(client: &mut Client, all: bool) -> anyhow::Result<()> {
    let running = client
        .stop_workers(pb::StopWorkersRequest { wait: false, all })
        .await?
        .into_inner()
        .running;
    if running == 0 {
        println!("Workers stopped");
    } else {
        println!("Workers stopping; {running} running jobs finish first");
    }
    Ok(())
}

pub async fn server_stop(client: &mut Client) -> anyhow::Result<()> {
    client.shutdown(pb::ShutdownRequest {}).await?;
    println!("Server stopping; running jobs get the shutdown_grace setting to finish");
    Ok(())
}

/// Asks on stdout, reads the answer from stdin (a terminal or a pipe); anything but y/yes is a no.
fn confirmed(question: &str) -> anyhow::Result<bool> {
    print!("{question} (y/N): ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

pub async fn reset(client: &mut Client, yes: bool) -> anyhow::Result<()> {
    if !yes && !confirmed("This will stop all workers and delete all jobs. Continue?")? {
        bail!("reset cancelled; nothing was changed");
    }
    client.reset(pb::ResetRequest {}).await?;
    println!("Queue reset successful: all jobs and configurations cleared.");
    Ok(())
}

pub async fn backup(client: &mut Client, file: &std::path::Path) -> anyhow::Result<()> {
    // The server resolves nothing: it gets the path this shell means.
    let path = std::path::absolute(file)?;
    let written = client
        .backup(pb::BackupRequest {
            path: path.to_string_lossy().into_owned(),
        })
        .await?
        .into_inner();
    println!(
        "Backed up the database to {} ({} bytes)",
        written.path, written.bytes
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_of_max_retries_are_accepted() {
        assert_eq!(
            parse_job(r#"{"command":"x","max-retries":2}"#)
                .unwrap()
                .max_retries,
            Some(2)
        );
        assert_eq!(
            parse_job(r#"{"command":"x","max_retries":4}"#)
                .unwrap()
                .max_retries,
            Some(4)
        );
    }

    #[test]
    fn bad_json_is_named() {
        let error = |json| parse_job(json).unwrap_err().to_string();
        assert!(error("{").starts_with("the job is not valid JSON"));
        assert!(error("[1]").starts_with("the job must be a JSON object"));
        assert!(error("{}").starts_with("the job needs a \"command\""));
        assert!(error(r#"{"command":1}"#).starts_with("command must be a string"));
        assert_eq!(
            error(r#"{"command":"x","priority":"high"}"#),
            "priority must be an integer, got \"high\""
        );
        assert_eq!(
            error(r#"{"command":"x","priority":1e30}"#),
            "priority must be 1-10, got 1e+30"
        );
        assert_eq!(
            error(r#"{"command":"x","priority":99999999999}"#),
            "priority must be 1-10, got 99999999999"
        );
        assert!(error(r#"{"command":"x","retries":1}"#).starts_with("unknown key \"retries\""));
        assert!(error(r#"{"command":"x","max_retries":1,"max-retries":1}"#).contains("not both"));
        assert!(
            error(r#"{"command":"x","timeout":"soon"}"#)
                .starts_with("timeout \"soon\" is not a duration")
        );
    }

    #[test]
    fn the_started_message_fits_the_count_and_the_scope() {
        assert_eq!(
            started_message(1, false),
            "Started 1 worker in the server; `queuectl worker stop` stops them"
        );
        assert_eq!(
            started_message(3, true),
            "Started 3 workers on every server; `queuectl worker stop --all` stops them"
        );
    }

    #[test]
    fn timeouts_take_seconds_or_human_durations() {
        let timeout = |json| parse_job(json).unwrap().timeout;
        assert_eq!(timeout(r#"{"command":"x","timeout":90}"#), Some(90));
        assert_eq!(timeout(r#"{"command":"x","timeout":"5m"}"#), Some(300));
        assert_eq!(timeout(r#"{"command":"x","timeout":"1h 30m"}"#), Some(5400));
    }
}
