//! One function per subcommand: build the request, make the call, print the answer.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};

use anyhow::{Context, bail};
use queuectl::convert::MAX_BATCH_JOBS;
use queuectl::pb;
use serde_json::Value;
use tokio_stream::StreamExt;

use crate::args::{FinalStateArg, Format, StateArg};
use crate::client::{self, Client};
use crate::output;

const JOB_KEYS: &str = "command, id, priority, max_retries (or max-retries), timeout, run_at (or run-at), delay, after, \
                        cwd, env";

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

/// A `run_at`: an RFC 3339 time (`2026-12-01T02:00:00Z`) or Unix seconds.
fn run_at(value: &Value) -> anyhow::Result<prost_types::Timestamp> {
    let (seconds, nanos) = match value {
        Value::String(text) => {
            let time = humantime::parse_rfc3339_weak(text).map_err(|error| {
                anyhow::anyhow!(
                    "run_at {text:?} is not a time ({error}); use e.g. \"2026-12-01T02:00:00Z\" or Unix seconds"
                )
            })?;
            let since = time
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| anyhow::anyhow!("run_at must be after 1970, got {text:?}"))?;
            (
                i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
                i32::try_from(since.subsec_nanos()).unwrap_or_default(),
            )
        }
        Value::Number(number) => {
            let seconds = number
                .as_f64()
                .filter(|seconds| seconds.is_finite() && *seconds >= 0.0);
            let Some(seconds) = seconds else {
                bail!("run_at must be a time after 1970, got {number}");
            };
            let whole = seconds.trunc();
            // Whole-number floats up to 2^63 convert exactly enough; the server refuses absurd ones.
            (whole as i64, ((seconds - whole) * 1e9) as i32)
        }
        other => bail!("run_at must be an RFC 3339 time or Unix seconds, got {other}"),
    };
    Ok(prost_types::Timestamp { seconds, nanos })
}

/// A `delay`: whole seconds, or a duration a person writes (`90s`, `10m`, `1h 30m`).
fn delay(value: &Value) -> anyhow::Result<prost_types::Duration> {
    let seconds: i64 = match value {
        Value::String(text) => {
            let duration = humantime::parse_duration(text).map_err(|error| {
                anyhow::anyhow!(
                    "delay {text:?} is not a duration ({error}); use e.g. 300, \"90s\" or \"1h 30m\""
                )
            })?;
            if duration.subsec_nanos() != 0 {
                bail!("delay must be whole seconds, got {text:?}");
            }
            i64::try_from(duration.as_secs())
                .map_err(|_| anyhow::anyhow!("delay is too long, got {text:?}"))?
        }
        other => integer("delay", other, "0 or more seconds")?,
    };
    if seconds < 0 {
        bail!("delay must be 0 or more seconds, got {seconds}");
    }
    Ok(prost_types::Duration { seconds, nanos: 0 })
}

/// An `after`: a list of job ids (a single id is a list of one).
fn job_ids(value: &Value) -> anyhow::Result<Vec<String>> {
    let ids = match value {
        Value::String(id) => return Ok(vec![id.clone()]),
        Value::Array(ids) => ids,
        other => bail!("after must be a list of job ids such as [\"job1\", \"job2\"], got {other}"),
    };
    ids.iter()
        .map(|id| match id {
            Value::String(id) => Ok(id.clone()),
            other => bail!("after must hold job ids (strings), got {other}"),
        })
        .collect()
}

/// An `env`: an object of names to string values.
fn variables(value: &Value) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let Value::Object(fields) = value else {
        bail!(
            "env must be an object of names to values such as {{\"STAGE\": \"prod\"}}, got {value}"
        );
    };
    fields
        .iter()
        .map(|(name, value)| match value {
            Value::String(text) => Ok((name.clone(), text.clone())),
            other => bail!("env: the value of {name} must be a string, got {other}"),
        })
        .collect()
}

/// Adds the variables of `--env` flags to `request`: `KEY=VALUE`, or `KEY` for its value in this environment.
fn add_env_flags(request: &mut pb::EnqueueRequest, flags: &[String]) -> anyhow::Result<()> {
    for flag in flags {
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name.to_owned(), value.to_owned()),
            None => {
                let value = std::env::var(flag).map_err(|_| {
                    anyhow::anyhow!("--env {flag}: {flag} is not set in this environment (or not UTF-8); give --env {flag}=VALUE")
                })?;
                (flag.clone(), value)
            }
        };
        if name.is_empty() {
            bail!("--env {flag:?}: the variable needs a name, as in --env KEY=VALUE");
        }
        request.env.insert(name, value);
    }
    Ok(())
}

/// The command line itself is wrong (a bad job JSON, a bad flag value); exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// `wait` gave up at its `--timeout` with jobs still running; exit code 4.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TimedOut(pub String);

fn usage(error: anyhow::Error) -> anyhow::Error {
    Usage(format!("{error:#}")).into()
}

/// The job `queuectl enqueue` sends: its JSON, the `--env` variables on top, and the current directory as its
/// `cwd` unless the JSON names one.
pub fn job_request(json: &str, env: &[String]) -> anyhow::Result<pb::EnqueueRequest> {
    let mut request = parse_job(json).map_err(usage)?;
    add_env_flags(&mut request, env).map_err(usage)?;
    if request.cwd.is_none() {
        let here = std::env::current_dir()
            .context("cannot tell the current directory; give the job a \"cwd\"")?;
        let here = here.to_str().with_context(|| {
            format!(
                "the current directory {} is not UTF-8; give the job a \"cwd\"",
                here.display()
            )
        })?;
        request.cwd = Some(here.to_owned());
    }
    Ok(request)
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
            "run_at" | "run-at" => {
                if request.run_at.is_some() {
                    bail!("give run_at or run-at, not both");
                }
                request.run_at = Some(run_at(value)?);
            }
            "delay" => request.delay = Some(delay(value)?),
            "after" => request.after = job_ids(value)?,
            "cwd" => match value {
                Value::String(path) => request.cwd = Some(path.clone()),
                other => bail!("cwd must be a path (a string), got {other}"),
            },
            "env" => request.env = variables(value)?,
            unknown => bail!("unknown key {unknown:?} in the job: expected {JOB_KEYS}"),
        }
    }
    request.command =
        command.context("the job needs a \"command\", e.g. {\"command\":\"echo hi\"}")?;
    if request.run_at.is_some() && request.delay.is_some() {
        bail!("give run_at or delay, not both: run_at is a time, delay a wait from now");
    }
    Ok(request)
}

/// What `queuectl enqueue` prints of each job it stored.
#[derive(Clone, Copy)]
pub enum Printed {
    /// `Enqueued job ID`, as the Python queuectl printed.
    Sentence,
    /// The id alone.
    Id,
    /// The job, as `get` or `list --output table` prints it.
    Job(Format),
}

/// The most one EnqueueBatch of `enqueue -` holds, encoded: three quarters of the server's limit on a request.
const BATCH_BYTES: usize = queuectl::server::MAX_REQUEST_BYTES / 4 * 3;

pub async fn enqueue(
    client: &mut Client,
    job: &str,
    env: &[String],
    printed: Printed,
) -> anyhow::Result<()> {
    if let Printed::Job(Format::Table) = printed {
        println!("{}", output::table_header());
    }
    if job != "-" {
        let stored = client
            .enqueue(job_request(job, env)?)
            .await?
            .into_inner()
            .job
            .context("the server sent no job")?;
        print_enqueued(&stored, printed);
        return Ok(());
    }
    // Every line is checked before any is sent: a bad line stores nothing.
    let mut requests = Vec::new();
    for (number, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.context("cannot read the jobs from stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let request = job_request(&line, env)
            .map_err(|error| Usage(format!("line {}: {error}", number + 1)))?;
        requests.push(request);
    }
    let mut batch = Vec::new();
    let mut size = 0;
    for request in requests {
        let cost = prost::Message::encoded_len(&request) + 8;
        if batch.len() == MAX_BATCH_JOBS || !batch.is_empty() && size + cost > BATCH_BYTES {
            send_batch(client, std::mem::take(&mut batch), printed).await?;
            size = 0;
        }
        size += cost;
        batch.push(request);
    }
    if !batch.is_empty() {
        send_batch(client, batch, printed).await?;
    }
    Ok(())
}

/// Stores `jobs` in one EnqueueBatch, all or none, and prints them.
async fn send_batch(
    client: &mut Client,
    jobs: Vec<pb::EnqueueRequest>,
    printed: Printed,
) -> anyhow::Result<()> {
    let stored = client
        .enqueue_batch(pb::EnqueueBatchRequest { jobs })
        .await?
        .into_inner()
        .jobs;
    for job in &stored {
        print_enqueued(job, printed);
    }
    Ok(())
}

fn print_enqueued(job: &pb::Job, printed: Printed) {
    match printed {
        Printed::Sentence => println!("Enqueued job {}", job.id),
        Printed::Id => println!("{}", job.id),
        Printed::Job(Format::Json) => println!("{}", output::job_json(job)),
        Printed::Job(Format::Table) => println!("{}", output::job_row(job)),
    }
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
        Some(StateArg::Cancelled) => pb::JobState::Cancelled,
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
        Ok(pb::JobState::Completed | pb::JobState::Dead | pb::JobState::Cancelled)
    )
}

/// Whether a final job ended without completing.
fn ended_badly(state: i32) -> bool {
    is_final(state) && state != i32::from(pb::JobState::Completed)
}

pub async fn logs(
    client: &mut Client,
    id: String,
    follow: bool,
    only: Option<pb::OutputStream>,
    format: Option<Format>,
) -> anyhow::Result<()> {
    let mut printer = LogPrinter::new(id.clone(), only, matches!(format, Some(Format::Json)));
    if !follow {
        printer.read_stored(client).await?;
        return printer.finish();
    }
    // Subscribe before reading what is stored, so that nothing falls between the two.
    let mut events = subscribe_to(client, &id).await?;
    let mut noted = false;
    loop {
        printer.read_stored(client).await?;
        let job = client
            .get_job(pb::GetJobRequest { id: id.clone() })
            .await?
            .into_inner()
            .job
            .context("the server sent no job")?;
        if is_final(job.state) {
            // The read above may have come just before the job's last output was stored, which is stored with its
            // final state: read once more.
            printer.read_stored(client).await?;
            return printer.ended(&job);
        }
        if !noted && job.state != pb::JobState::Processing as i32 {
            noted = true;
            note_if_no_worker(client).await?;
        }
        // Until something changes: output stored right where the printing stands is printed at once; anything
        // else sends the loop back to the store, which also covers events this watcher never got.
        loop {
            use pb::watch_events_response::Event;
            let event = tokio::select! {
                event = events.next() => event,
                () = tokio::time::sleep(LOGS_RECHECK) => break,
            };
            let event = match event.transpose() {
                Ok(Some(response)) => response.event,
                Ok(None) => bail!("the server stopped while job {id} was running"),
                Err(status) if fell_behind(&status) => {
                    events = subscribe_to(client, &id).await?;
                    break;
                }
                Err(status) => return Err(status.into()),
            };
            match event {
                Some(Event::JobOutput(piece)) if printer.continues(&piece) => {
                    printer.piece(&piece)?
                }
                Some(Event::JobOutput(piece)) if printer.printed(&piece) => {}
                Some(Event::JobFinished(finished)) => {
                    printer.read_stored(client).await?;
                    if !is_final(finished.state) {
                        printer.line(&Event::JobFinished(finished))?;
                    }
                    break;
                }
                _ => break,
            }
        }
    }
}

/// Says once, on stderr, that jobs cannot progress when no server of the queue runs a worker.
async fn note_if_no_worker(client: &mut Client) -> anyhow::Result<()> {
    let status = client.status(pb::StatusRequest {}).await?.into_inner();
    // `servers` holds every server of the queue, this one first.
    if status.servers.iter().all(|server| server.worker_count == 0) {
        eprintln!(
            "note: no worker is running, so nothing runs until one starts (`queuectl worker start`)"
        );
    }
    Ok(())
}

/// How long `logs --follow` waits for an event before it reads the store again anyway.
const LOGS_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

async fn subscribe_to(
    client: &mut Client,
    id: &str,
) -> anyhow::Result<tonic::Streaming<pb::WatchEventsResponse>> {
    let request = pb::WatchEventsRequest {
        job_id: id.to_owned(),
    };
    Ok(client.watch_events(request).await?.into_inner())
}

/// Prints a job's output page by page as `logs` shows it, and remembers how far it got.
struct LogPrinter {
    id: String,
    only: Option<pb::OutputStream>,
    /// `--output json`: attempts are gathered, and printed whole at the end.
    json: Option<Vec<pb::JobRun>>,
    /// The run and the offset in its output up to which everything is printed.
    run: u32,
    offset: u64,
    /// The last run whose header is printed.
    headed: u32,
    stdout: std::io::Stdout,
}

impl LogPrinter {
    fn new(id: String, only: Option<pb::OutputStream>, json: bool) -> Self {
        LogPrinter {
            id,
            only,
            json: json.then(Vec::new),
            run: 0,
            offset: 0,
            headed: 0,
            stdout: std::io::stdout(),
        }
    }

    /// Prints what is stored past the point printed, page by page.
    async fn read_stored(&mut self, client: &mut Client) -> anyhow::Result<()> {
        loop {
            let page = client
                .get_job_logs(pb::GetJobLogsRequest {
                    id: self.id.clone(),
                    run: self.run,
                    offset: self.offset,
                    by_stream: true,
                    max_bytes: 0,
                })
                .await?
                .into_inner();
            for run in page.runs {
                self.run_part(run)?;
            }
            if page.next_run >= self.run {
                (self.run, self.offset) = (page.next_run, page.next_offset);
            }
            if !page.has_more {
                return Ok(());
            }
        }
    }

    fn run_part(&mut self, run: pb::JobRun) -> anyhow::Result<()> {
        if let Some(runs) = &mut self.json {
            match runs.last_mut() {
                Some(last) if last.run == run.run => {
                    last.chunks.extend(run.chunks);
                    last.outcome = run.outcome;
                    last.finished_at = run.finished_at;
                    last.truncated = run.truncated;
                }
                _ => runs.push(run),
            }
            return Ok(());
        }
        if run.run > self.headed {
            self.headed = run.run;
            writeln!(self.stdout, "{}", output::run_header(&self.id, &run))?;
        }
        for chunk in &run.chunks {
            if self.shows(chunk.stream) {
                self.stdout.write_all(&chunk.data)?;
            }
        }
        self.stdout.flush()?;
        Ok(())
    }

    fn shows(&self, stream: i32) -> bool {
        self.only
            .is_none_or(|only| stream == only as i32 || stream == pb::OutputStream::Note as i32)
    }

    /// Whether `piece` starts right where the printing stands.
    fn continues(&self, piece: &pb::JobOutput) -> bool {
        piece.run == self.run && piece.offset == self.offset && self.headed == self.run
    }

    /// Whether `piece` is printed already.
    fn printed(&self, piece: &pb::JobOutput) -> bool {
        piece.run < self.run
            || piece.run == self.run && piece.offset + piece.data.len() as u64 <= self.offset
    }

    fn piece(&mut self, piece: &pb::JobOutput) -> anyhow::Result<()> {
        if self.shows(piece.stream) {
            self.stdout.write_all(&piece.data)?;
            self.stdout.flush()?;
        }
        self.offset += piece.data.len() as u64;
        Ok(())
    }

    fn line(&mut self, event: &pb::watch_events_response::Event) -> anyhow::Result<()> {
        if let Some(line) = output::event_line(event) {
            writeln!(self.stdout, "{line}")?;
        }
        Ok(())
    }

    /// The end of `logs --follow`: the job's final line, and a failure if it did not complete.
    fn ended(&mut self, job: &pb::Job) -> anyhow::Result<()> {
        let completed = job.state == pb::JobState::Completed as i32;
        let line = if completed {
            format!("job {} completed", self.id)
        } else {
            format!(
                "job {} ended {} ({})",
                self.id,
                output::state_name(job.state),
                job.last_error
            )
        };
        writeln!(self.stdout, "{line}")?;
        self.stdout.flush()?;
        if !completed {
            bail!("job {} did not complete", self.id);
        }
        Ok(())
    }

    /// The end of `logs`: in JSON, the attempts gathered.
    fn finish(self) -> anyhow::Result<()> {
        let mut stdout = self.stdout;
        for run in self.json.iter().flatten() {
            writeln!(stdout, "{}", output::run_json(run, self.only))?;
        }
        Ok(())
    }
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

/// Moves the jobs of `waiting` that are final now out of it, and those that did not complete into `dead`.
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
            Some(state) if ended_badly(state) => {
                waiting.remove(&id);
                dead.push(format!("{id} ({})", output::state_name(state)));
            }
            Some(state) if is_final(state) => {
                waiting.remove(&id);
            }
            _ => {}
        }
    }
    Ok(())
}

/// How often `wait` reads its jobs again at least, whatever the events say.
const WAIT_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Blocks until every job in `ids` (or every unfinished job) is final; fails if one did not complete.
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
    if !waiting.is_empty() {
        note_if_no_worker(client).await?;
    }
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
    // Events come from the server this command talks to; a job that another server of a shared database runs
    // ends without one. So the jobs are read again now and then, less often the more there are.
    let pause = WAIT_RECHECK.max(std::time::Duration::from_millis(2 * waiting.len() as u64));
    let mut rechecks = tokio::time::interval_at(tokio::time::Instant::now() + pause, pause);
    rechecks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !waiting.is_empty() {
        let event = tokio::select! {
            event = events.next() => event,
            _ = rechecks.tick() => {
                recheck(client, &mut waiting, &mut dead).await?;
                progress.set_position((ids.len() - waiting.len()) as u64);
                continue;
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                progress.abandon();
                return Err(TimedOut(format!(
                    "{} still not final when the timeout ran out",
                    counted(waiting.len(), "job was", "jobs were")
                ))
                .into());
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
        let finished = match event {
            pb::watch_events_response::Event::JobFinished(finished) => finished,
            pb::watch_events_response::Event::JobCancelled(cancelled) => pb::JobFinished {
                job_id: cancelled.job_id,
                state: pb::JobState::Cancelled.into(),
                error: cancelled.error,
                worker: 0,
                run: 0,
            },
            _ => continue,
        };
        if is_final(finished.state) && waiting.remove(&finished.job_id) {
            if ended_badly(finished.state) {
                dead.push(format!(
                    "{} ({})",
                    finished.job_id,
                    output::state_name(finished.state)
                ));
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    if !dead.is_empty() {
        bail!(
            "{} of {} did not complete: {}",
            dead.len(),
            counted(ids.len(), "job", "jobs"),
            dead.join(", ")
        );
    }
    Ok(())
}

/// Who cancels, for the job's `last_error`: the user of this command on this machine.
fn canceller() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "a user".into());
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    format!("{user}@{host} (queuectl cancel)")
}

/// Runs `each` on every id, printing each outcome; fails at the end if any failed, after trying them all.
async fn for_each_id<F>(client: &mut Client, ids: Vec<String>, mut each: F) -> anyhow::Result<()>
where
    F: AsyncFnMut(&mut Client, String) -> Result<String, tonic::Status>,
{
    let total = ids.len();
    let mut failed = 0;
    for id in ids {
        match each(client, id).await {
            Ok(line) => println!("{line}"),
            Err(status) if total == 1 => return Err(status.into()),
            Err(status) => {
                failed += 1;
                eprintln!("error: {}", status.message());
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} failed", counted(total, "job", "jobs"));
    }
    Ok(())
}

pub async fn cancel(client: &mut Client, ids: Vec<String>) -> anyhow::Result<()> {
    let reason = canceller();
    for_each_id(client, ids, async |client, id| {
        let request = pb::CancelJobRequest {
            id: id.clone(),
            reason: reason.clone(),
        };
        client.cancel_job(request).await?;
        Ok(format!("Cancelled job {id}"))
    })
    .await
}

pub async fn remove(client: &mut Client, ids: Vec<String>) -> anyhow::Result<()> {
    for_each_id(client, ids, async |client, id| {
        client
            .delete_job(pb::DeleteJobRequest { id: id.clone() })
            .await?;
        Ok(format!("Removed job {id}"))
    })
    .await
}

pub async fn clean(
    client: &mut Client,
    states: Vec<FinalStateArg>,
    older_than: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let states = states
        .into_iter()
        .map(|state| {
            i32::from(match state {
                FinalStateArg::Completed => pb::JobState::Completed,
                FinalStateArg::Dead => pb::JobState::Dead,
                FinalStateArg::Cancelled => pb::JobState::Cancelled,
            })
        })
        .collect();
    let older_than = older_than.map(|age| prost_types::Duration {
        seconds: i64::try_from(age.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(age.subsec_nanos()).unwrap_or_default(),
    });
    let deleted = client
        .purge_jobs(pb::PurgeJobsRequest { states, older_than })
        .await?
        .into_inner()
        .jobs_deleted;
    println!("Removed {}", counted(deleted, "job", "jobs"));
    Ok(())
}

pub async fn pause(client: &mut Client, paused: bool) -> anyhow::Result<()> {
    if paused {
        client.pause_queue(pb::PauseQueueRequest {}).await?;
        println!("Queue paused: no job starts until `queuectl resume`; running jobs finish");
    } else {
        client.resume_queue(pb::ResumeQueueRequest {}).await?;
        println!("Queue resumed");
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
    // Subscribe first, so that the workers' first events are seen, and listen for Ctrl-C before any
    // worker starts: a signal that comes while an event is printed waits in the stream, not lost.
    let mut events = subscribe(client).await?;
    let mut interrupts = Interrupts::listen()?;
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
                let Some(response) = event else {
                    println!("the server stopped");
                    return Ok(());
                };
                // The workers of other servers of a shared database are theirs to print.
                let Some(event) = response.event.filter(|_| response.server.is_empty()) else {
                    continue;
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
            _ = interrupts.recv(), if !stopping => {
                stopping = true;
                client.stop_workers(pb::StopWorkersRequest { wait: false, all }).await?;
            }
        }
    }
}

/// Ctrl-C presses, counted from when [`Interrupts::listen`] was called.
struct Interrupts {
    #[cfg(unix)]
    signals: tokio::signal::unix::Signal,
    #[cfg(windows)]
    signals: tokio::signal::windows::CtrlC,
}

impl Interrupts {
    fn listen() -> anyhow::Result<Self> {
        #[cfg(unix)]
        let signals = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
        #[cfg(windows)]
        let signals = tokio::signal::windows::ctrl_c();
        Ok(Self {
            signals: signals.context("cannot listen for Ctrl-C")?,
        })
    }

    async fn recv(&mut self) {
        self.signals.recv().await;
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

/// Asks on stderr (stdout stays for what a script reads), reads the answer from stdin (a terminal or a pipe);
/// anything but y/yes is a no.
fn confirmed(question: &str) -> anyhow::Result<bool> {
    eprint!("{question} (y/N): ");
    std::io::stderr().flush()?;
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

/// `count` and the noun that agrees with it: `1 job`, `2 jobs`.
fn counted(count: impl TryInto<u64>, one: &str, many: &str) -> String {
    let count = count.try_into().unwrap_or(u64::MAX);
    format!("{count} {}", if count == 1 { one } else { many })
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
