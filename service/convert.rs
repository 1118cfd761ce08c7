//! Conversions between the wire types of the contract and the domain, with the validation of every request field.

use prost_types::Timestamp;

use crate::error::QueueError;
use crate::event::{Event, Stamped};
use crate::job::{
    self, Job, JobContext, JobState, MICROS_PER_SEC, Micros, Outcome, PRIORITY_RANGE,
};
use crate::output::{self, Part, Stream};
use crate::pb;
use crate::queue::{JobSpec, LogsPage, Start};
use crate::store::{Cursor, Page, ServerRecord, WorkerRecord};

pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
pub const MAX_ID_BYTES: usize = 128;
pub const MAX_RETRIES: i32 = 1000;
/// A week: a longer limit is almost certainly a unit mistake.
pub const MAX_TIMEOUT_SECS: i64 = 604_800;
pub const MAX_BATCH_JOBS: usize = 10_000;
/// How far ahead a job may be scheduled: further is almost certainly a unit mistake (milliseconds for seconds).
pub const MAX_SCHEDULE_AHEAD_SECS: i64 = 366 * 86_400;
/// The most jobs one job may run after.
pub const MAX_AFTER: usize = 100;
/// The longest `reason` a cancel may give.
pub const MAX_CANCEL_REASON_BYTES: usize = 200;
/// The longest working directory a job may name.
pub const MAX_CWD_BYTES: usize = 4096;
/// The most a job's variables may hold, names and values together.
pub const MAX_ENV_BYTES: usize = 64 * 1024;
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

fn invalid(field: &str, message: impl Into<String>) -> QueueError {
    QueueError::field(field, message)
}

/// A job id given in `field`.
pub fn validate_id(field: &str, id: &str) -> Result<(), QueueError> {
    if id.is_empty() {
        return Err(invalid(field, "id must not be empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(invalid(
            field,
            format!("id must be at most {MAX_ID_BYTES} bytes, got {}", id.len()),
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(invalid(
            field,
            format!(
                "id may hold only letters, digits, '-', '_', '.' and ':', got {bad:?} in {id:?}"
            ),
        ));
    }
    Ok(())
}

impl TryFrom<pb::EnqueueRequest> for JobSpec {
    type Error = QueueError;

    fn try_from(request: pb::EnqueueRequest) -> Result<Self, QueueError> {
        let command = request.command;
        if command.trim().is_empty() {
            return Err(invalid(
                "command",
                "command is required and must not be empty",
            ));
        }
        if command.len() > MAX_COMMAND_BYTES {
            return Err(invalid(
                "command",
                format!(
                    "command must be at most {MAX_COMMAND_BYTES} bytes, got {}",
                    command.len()
                ),
            ));
        }
        if command.contains('\0') {
            return Err(invalid("command", "command must not contain NUL bytes"));
        }
        if let Some(id) = &request.id {
            validate_id("id", id)?;
        }
        let priority = match request.priority {
            None => job::DEFAULT_PRIORITY,
            Some(priority) => u8::try_from(priority)
                .ok()
                .filter(|priority| PRIORITY_RANGE.contains(priority))
                .ok_or_else(|| {
                    invalid("priority", format!("priority must be 1-10, got {priority}"))
                })?,
        };
        let max_retries = request
            .max_retries
            .map(|retries| {
                u32::try_from(retries)
                    .ok()
                    .filter(|_| retries <= MAX_RETRIES)
                    .ok_or_else(|| {
                        invalid(
                            "max_retries",
                            format!("max_retries must be 0-{MAX_RETRIES}, got {retries}"),
                        )
                    })
            })
            .transpose()?;
        let timeout_secs = request
            .timeout
            .map(|secs| {
                u64::try_from(secs)
                    .ok()
                    .filter(|_| secs <= MAX_TIMEOUT_SECS)
                    .ok_or_else(|| {
                        invalid("timeout", format!(
                            "timeout must be 0-{MAX_TIMEOUT_SECS} seconds (0: no limit), got {secs}"
                        ))
                    })
            })
            .transpose()?;
        let start = match (request.run_at, request.delay) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "run_at",
                    "give run_at or delay, not both: run_at is a time, delay a wait from now",
                ));
            }
            (Some(at), None) => Start::At(run_at(&at)?),
            (None, Some(wait)) => Start::After(delay(&wait)?),
            (None, None) => Start::Now,
        };
        let after = dependencies(request.after)?;
        if !after.is_empty() && start != Start::Now {
            return Err(invalid(
                "after",
                "after cannot be combined with run_at or delay: the job runs as soon as the jobs it runs after \
                 complete",
            ));
        }
        Ok(JobSpec {
            id: request.id,
            command,
            priority,
            max_retries,
            timeout_secs,
            start,
            after,
            context: JobContext {
                cwd: request.cwd.map(working_directory).transpose()?,
                env: environment(request.env)?,
            },
        })
    }
}

/// A `cwd`: an absolute path, as the server's system reads paths.
fn working_directory(cwd: String) -> Result<String, QueueError> {
    if cwd.len() > MAX_CWD_BYTES {
        return Err(invalid(
            "cwd",
            format!(
                "cwd must be at most {MAX_CWD_BYTES} bytes, got {}",
                cwd.len()
            ),
        ));
    }
    if cwd.contains('\0') {
        return Err(invalid("cwd", "cwd must not contain NUL bytes"));
    }
    if !std::path::Path::new(&cwd).is_absolute() {
        return Err(invalid(
            "cwd",
            format!(
                "cwd must be an absolute path, got {}",
                crate::error::quoted(&cwd)
            ),
        ));
    }
    Ok(cwd)
}

/// An `env`: names a shell can hold, values without NUL, at most [`MAX_ENV_BYTES`] in all.
fn environment(
    env: std::collections::HashMap<String, String>,
) -> Result<std::collections::BTreeMap<String, String>, QueueError> {
    let size: usize = env
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    if size > MAX_ENV_BYTES {
        return Err(invalid(
            "env",
            format!("env must hold at most {MAX_ENV_BYTES} bytes of names and values, got {size}"),
        ));
    }
    for (name, value) in &env {
        if name.is_empty() {
            return Err(invalid("env", "env: a variable name must not be empty"));
        }
        if name.contains(['=', '\0']) {
            return Err(invalid(
                "env",
                format!(
                    "env: variable name {} must not contain '=' or NUL",
                    crate::error::quoted(name)
                ),
            ));
        }
        if value.contains('\0') {
            return Err(invalid(
                "env",
                format!(
                    "env: the value of {} must not contain NUL bytes",
                    crate::error::quoted(name)
                ),
            ));
        }
        if name == crate::runner::TAG_VARIABLE {
            return Err(invalid(
                "env",
                format!("env: {name} is set by the server for each run"),
            ));
        }
    }
    Ok(env.into_iter().collect())
}

/// The ids of an `after`: valid ids, each once, at most [`MAX_AFTER`].
fn dependencies(ids: Vec<String>) -> Result<Vec<String>, QueueError> {
    if ids.len() > MAX_AFTER {
        return Err(invalid(
            "after",
            format!("after may name at most {MAX_AFTER} jobs, got {}", ids.len()),
        ));
    }
    let mut unique = Vec::with_capacity(ids.len());
    for (index, id) in ids.into_iter().enumerate() {
        validate_id(&format!("after[{index}]"), &id)
            .map_err(|error| invalid(&format!("after[{index}]"), format!("after: {error}")))?;
        if !unique.contains(&id) {
            unique.push(id);
        }
    }
    Ok(unique)
}

/// A `run_at` as microseconds since the epoch: a real time, at most [`MAX_SCHEDULE_AHEAD_SECS`] ahead.
fn run_at(at: &Timestamp) -> Result<Micros, QueueError> {
    let micros = at
        .seconds
        .checked_mul(MICROS_PER_SEC)
        .and_then(|micros| micros.checked_add(i64::from(at.nanos / 1000)))
        .filter(|_| at.seconds >= 0 && (0..1_000_000_000).contains(&at.nanos))
        .ok_or_else(|| {
            invalid(
                "run_at",
                format!(
                    "run_at must be a time after 1970, got {}s {}ns",
                    at.seconds, at.nanos
                ),
            )
        })?;
    let latest = crate::clock::now().saturating_add(MAX_SCHEDULE_AHEAD_SECS * MICROS_PER_SEC);
    if micros > latest {
        return Err(invalid(
            "run_at",
            format!(
                "run_at must be at most a year ahead, got Unix time {} (milliseconds given as seconds?)",
                at.seconds
            ),
        ));
    }
    Ok(micros)
}

/// A `delay` as microseconds: 0 to [`MAX_SCHEDULE_AHEAD_SECS`].
fn delay(wait: &prost_types::Duration) -> Result<Micros, QueueError> {
    let valid = wait.seconds >= 0
        && wait.nanos >= 0
        && wait.nanos < 1_000_000_000
        && wait.seconds <= MAX_SCHEDULE_AHEAD_SECS;
    if !valid {
        return Err(invalid(
            "delay",
            format!(
                "delay must be 0 to {MAX_SCHEDULE_AHEAD_SECS} seconds (a year), got {}s {}ns",
                wait.seconds, wait.nanos
            ),
        ));
    }
    Ok(wait.seconds * MICROS_PER_SEC + i64::from(wait.nanos / 1000))
}

/// Who cancels a job, as its `last_error` names them: `by <reason>`.
pub fn cancelled_by(reason: &str) -> Result<String, QueueError> {
    if reason.is_empty() {
        return Ok("by request".into());
    }
    if reason.len() > MAX_CANCEL_REASON_BYTES {
        return Err(invalid(
            "reason",
            format!(
                "reason must be at most {MAX_CANCEL_REASON_BYTES} bytes, got {}",
                reason.len()
            ),
        ));
    }
    if reason.chars().any(char::is_control) {
        return Err(invalid(
            "reason",
            "reason must be one line of text, without control characters",
        ));
    }
    Ok(format!("by {reason}"))
}

/// The final states and the age a purge asks for: completed jobs of any age when it names none.
pub fn purge_filter(request: pb::PurgeJobsRequest) -> Result<(Vec<JobState>, Micros), QueueError> {
    let mut states = Vec::new();
    for state in request.states {
        match state_filter(state)? {
            Some(state) if state.is_final() => {
                if !states.contains(&state) {
                    states.push(state);
                }
            }
            other => {
                return Err(invalid(
                    "states",
                    format!(
                        "states may name only final states (completed, dead, cancelled), got {}",
                        other.map_or("unspecified", JobState::as_str)
                    ),
                ));
            }
        }
    }
    if states.is_empty() {
        states.push(JobState::Completed);
    }
    let older_than = match request.older_than {
        None => 0,
        Some(age) if age.seconds >= 0 && (0..1_000_000_000).contains(&age.nanos) => age
            .seconds
            .saturating_mul(MICROS_PER_SEC)
            .saturating_add(i64::from(age.nanos / 1000)),
        Some(age) => {
            return Err(invalid(
                "older_than",
                format!(
                    "older_than must not be negative, got {}s {}ns",
                    age.seconds, age.nanos
                ),
            ));
        }
    };
    Ok((states, older_than))
}

pub fn job_state(state: JobState) -> pb::JobState {
    match state {
        JobState::Pending => pb::JobState::Pending,
        JobState::Processing => pb::JobState::Processing,
        JobState::Failed => pb::JobState::Failed,
        JobState::Completed => pb::JobState::Completed,
        JobState::Dead => pb::JobState::Dead,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

/// The state a filter asks for; `None` for any.
pub fn state_filter(state: i32) -> Result<Option<JobState>, QueueError> {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Unspecified) => Ok(None),
        Ok(pb::JobState::Pending) => Ok(Some(JobState::Pending)),
        Ok(pb::JobState::Processing) => Ok(Some(JobState::Processing)),
        Ok(pb::JobState::Failed) => Ok(Some(JobState::Failed)),
        Ok(pb::JobState::Completed) => Ok(Some(JobState::Completed)),
        Ok(pb::JobState::Dead) => Ok(Some(JobState::Dead)),
        Ok(pb::JobState::Cancelled) => Ok(Some(JobState::Cancelled)),
        Err(_) => Err(invalid(
            "state",
            format!("state {state} is not a job state"),
        )),
    }
}

pub fn timestamp(micros: Micros) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(MICROS_PER_SEC),
        nanos: i32::try_from(micros.rem_euclid(MICROS_PER_SEC) * 1000).unwrap_or_default(),
    }
}

impl From<Job> for pb::Job {
    fn from(job: Job) -> Self {
        let held = job.held();
        pb::Job {
            state: job_state(job.state).into(),
            id: job.id,
            command: job.command,
            attempts: job.attempts,
            max_retries: job.max_retries,
            priority: u32::from(job.priority),
            effective_priority: u32::from(job.priority),
            created_at: Some(timestamp(job.created_at)),
            updated_at: Some(timestamp(job.updated_at)),
            run_after: (!held).then(|| timestamp(job.run_after)),
            last_error: job.last_error.unwrap_or_default(),
            timeout: job.timeout_secs,
            after: job.after,
            cwd: job.context.cwd.unwrap_or_default(),
            env: job.context.env.into_iter().collect(),
        }
    }
}

/// The most output one page of logs holds: far below the 4 MiB a stock gRPC client accepts.
pub const MAX_LOGS_PAGE_BYTES: usize = 1024 * 1024;

/// The output budget of a GetJobLogs page: `max_bytes`, or the most a page holds when it is 0 or more.
pub fn logs_budget(max_bytes: u32) -> usize {
    match usize::try_from(max_bytes) {
        Ok(0) | Err(_) => MAX_LOGS_PAGE_BYTES,
        Ok(bytes) => bytes.min(MAX_LOGS_PAGE_BYTES),
    }
}

pub fn output_stream(stream: Stream) -> pb::OutputStream {
    match stream {
        Stream::Stdout => pb::OutputStream::Stdout,
        Stream::Stderr => pb::OutputStream::Stderr,
    }
}

/// A page of logs on the wire: each run's output merged, with a line where bytes were dropped, or chunk by chunk.
pub fn logs_page(page: LogsPage, by_stream: bool) -> pb::GetJobLogsResponse {
    let runs = page
        .runs
        .into_iter()
        .map(|log| {
            let parts = output::parts(log.offset, &log.chunks);
            let (mut merged, mut chunks) = (Vec::new(), Vec::new());
            for part in parts {
                match part {
                    Part::Bytes {
                        stream,
                        offset,
                        data,
                    } if by_stream => chunks.push(pb::OutputChunk {
                        stream: output_stream(stream).into(),
                        offset,
                        data: data.to_vec(),
                    }),
                    Part::Bytes { data, .. } => merged.extend_from_slice(data),
                    Part::Dropped { offset, count } if by_stream => chunks.push(pb::OutputChunk {
                        stream: pb::OutputStream::Note.into(),
                        offset,
                        data: output::dropped_marker(count).into_bytes(),
                    }),
                    Part::Dropped { count, .. } => {
                        merged.extend_from_slice(output::dropped_marker(count).as_bytes());
                    }
                }
            }
            let run = log.run;
            pb::JobRun {
                run: run.run,
                worker: run.worker,
                started_at: Some(timestamp(run.started_at)),
                finished_at: run.finished_at.map(timestamp),
                outcome: run.outcome.unwrap_or_default(),
                output: merged,
                truncated: run.truncated,
                offset: log.offset,
                chunks,
            }
        })
        .collect();
    pb::GetJobLogsResponse {
        runs,
        next_run: page.next_run,
        next_offset: page.next_offset,
        has_more: page.has_more,
    }
}

impl From<WorkerRecord> for pb::Worker {
    fn from(worker: WorkerRecord) -> Self {
        pb::Worker {
            index: worker.index,
            job_id: worker.job_id.unwrap_or_default(),
            command: worker.command.map(job::shortened).unwrap_or_default(),
            started_at: worker.started_at.map(timestamp),
            stopping: worker.stopping,
        }
    }
}

impl From<ServerRecord> for pb::Server {
    fn from(server: ServerRecord) -> Self {
        pb::Server {
            id: server.id,
            host: server.host,
            pid: server.pid,
            worker_count: server.worker_count,
            workers: server.workers.into_iter().map(Into::into).collect(),
            seen_at: Some(timestamp(server.seen_at)),
        }
    }
}

impl From<Stamped> for pb::WatchEventsResponse {
    fn from(stamped: Stamped) -> Self {
        let Stamped {
            seq,
            at,
            server,
            event,
        } = stamped;
        use pb::watch_events_response::Event as Wire;
        let wire = match event {
            Event::WorkerStarted { worker } => Wire::WorkerStarted(pb::WorkerStarted { worker }),
            Event::WorkerStopping { worker } => Wire::WorkerStopping(pb::WorkerStopping { worker }),
            Event::WorkerExited { worker } => Wire::WorkerExited(pb::WorkerExited { worker }),
            Event::JobPicked {
                worker,
                job_id,
                command,
                run,
            } => Wire::JobPicked(pb::JobPicked {
                worker,
                job_id: job_id.to_string(),
                command: command.to_string(),
                run,
            }),
            Event::JobOutput {
                worker,
                job_id,
                run,
                offset,
                stream,
                data,
            } => Wire::JobOutput(pb::JobOutput {
                worker,
                job_id: job_id.to_string(),
                data,
                run,
                offset,
                stream: output_stream(stream).into(),
            }),
            Event::JobFinished {
                worker,
                job_id,
                run,
                state,
                outcome,
            } => Wire::JobFinished(pb::JobFinished {
                worker,
                run,
                job_id: job_id.to_string(),
                state: job_state(state).into(),
                error: match outcome {
                    Outcome::Succeeded => String::new(),
                    failed => failed.to_string(),
                },
            }),
            Event::JobCancelled { job_id, error } => Wire::JobCancelled(pb::JobCancelled {
                job_id: job_id.to_string(),
                error,
            }),
        };
        pb::WatchEventsResponse {
            event: Some(wire),
            seq,
            time: Some(timestamp(at)),
            server: server.map(|server| server.to_string()).unwrap_or_default(),
        }
    }
}

/// The most a page of jobs holds, encoded: jobs past it go to the next page, so that no listing exceeds what a
/// stock gRPC client accepts (4 MiB), whatever the jobs hold.
pub const MAX_LIST_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// A page of jobs of a listing filtered by `state` on the wire, cut short (with a token for the rest) where it
/// would pass [`MAX_LIST_PAGE_BYTES`]; it holds at least one job.
pub fn list_page(state: i32, page: Page, aged: impl Fn(&Job) -> u8) -> pb::ListResponse {
    use prost::Message;
    let mut jobs = Vec::with_capacity(page.jobs.len());
    let mut size = 0;
    let mut next = page.next;
    let mut last = None;
    for (job, cursor) in page.jobs.into_iter().zip(page.positions) {
        let effective = aged(&job);
        let job = pb::Job {
            effective_priority: u32::from(effective),
            ..pb::Job::from(job)
        };
        size += job.encoded_len() + 8;
        if size > MAX_LIST_PAGE_BYTES && last.is_some() {
            next = last;
            break;
        }
        jobs.push(job);
        last = Some(cursor);
    }
    pb::ListResponse {
        jobs,
        next_page_token: next
            .map(|cursor| page_token(state, cursor))
            .unwrap_or_default(),
    }
}

/// The token of the page after `cursor` in a listing filtered by `state` (the request's field, 0 for all): opaque
/// to clients, and good only for the same filter.
pub fn page_token(state: i32, cursor: Cursor) -> String {
    format!("{state}.{}.{}", cursor.key, cursor.seq)
}

/// Where a listing filtered by `state` resumes, from a token [`page_token`] gave for the same filter. The error
/// never repeats the token, which may be anything of any size.
pub fn parse_page_token(state: i32, token: &str) -> Result<Option<Cursor>, QueueError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        invalid(
            "page_token",
            "page_token is not one this server gave out; list again without it",
        )
    };
    let mut parts = token.splitn(3, '.');
    let (Some(filter), Some(key), Some(seq)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    if filter.parse::<i32>().map_err(|_| bad())? != state {
        return Err(invalid(
            "page_token",
            "page_token belongs to a listing with another state filter; list again without it",
        ));
    }
    Ok(Some(Cursor {
        key: key.parse().map_err(|_| bad())?,
        seq: seq.parse().map_err(|_| bad())?,
    }))
}

/// The page size a request gets: the default for 0, at most [`MAX_PAGE_SIZE`] (more is clamped, as AIP-158 says).
pub fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        _ => requested.min(MAX_PAGE_SIZE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn request(command: &str) -> pb::EnqueueRequest {
        pb::EnqueueRequest {
            command: command.into(),
            ..Default::default()
        }
    }

    fn rejection(request: pb::EnqueueRequest) -> String {
        JobSpec::try_from(request).unwrap_err().to_string()
    }

    #[test]
    fn a_bare_command_gets_the_defaults() {
        let spec = JobSpec::try_from(request("echo hi")).unwrap();
        assert_eq!(spec.priority, 5);
        assert_eq!(spec.max_retries, None);
        assert_eq!(
            spec.resolve(&Settings::default(), 0).max_retries,
            3,
            "default_max_retries applies"
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        assert!(rejection(request("  ")).starts_with("command is required"));
        assert!(rejection(request("a\0b")).contains("NUL"));
        assert!(rejection(request(&"x".repeat(MAX_COMMAND_BYTES + 1))).contains("at most 65536"));
        for priority in [0, 11, -1, i32::MAX] {
            let bad = pb::EnqueueRequest {
                priority: Some(priority),
                ..request("true")
            };
            assert_eq!(
                rejection(bad),
                format!("priority must be 1-10, got {priority}")
            );
        }
        for retries in [-1, 1001] {
            let bad = pb::EnqueueRequest {
                max_retries: Some(retries),
                ..request("true")
            };
            assert!(rejection(bad).starts_with("max_retries must be 0-1000"));
        }
        for timeout in [-5, MAX_TIMEOUT_SECS + 1] {
            let bad = pb::EnqueueRequest {
                timeout: Some(timeout),
                ..request("true")
            };
            assert!(rejection(bad).starts_with("timeout must be"));
        }
        for id in ["", "a b", "x/y", "ü"] {
            let bad = pb::EnqueueRequest {
                id: Some(id.into()),
                ..request("true")
            };
            assert!(rejection(bad).starts_with("id "), "{id:?}");
        }
    }

    #[test]
    fn page_tokens_round_trip_for_their_filter_only_and_garbage_is_rejected() {
        let cursor = Cursor { key: 3, seq: 42 };
        let dead = pb::JobState::Dead as i32;
        assert_eq!(
            parse_page_token(dead, &page_token(dead, cursor)).unwrap(),
            Some(cursor)
        );
        let other = parse_page_token(0, &page_token(dead, cursor)).unwrap_err();
        assert!(
            other.to_string().contains("another state filter"),
            "{other}"
        );
        let huge = "x".repeat(100_000);
        let garbage = parse_page_token(0, &huge).unwrap_err().to_string();
        assert!(
            garbage.len() < 100,
            "the error does not repeat the token: {garbage}"
        );
        assert!(parse_page_token(0, "1.2").is_err());
        assert_eq!(parse_page_token(0, "").unwrap(), None);
    }

    #[test]
    fn a_page_size_over_the_maximum_is_clamped() {
        assert_eq!(page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(100_000), MAX_PAGE_SIZE);
    }

    #[test]
    fn status_shows_the_first_kib_of_a_long_command() {
        assert_eq!(job::shortened("echo hi".into()), "echo hi");
        let long = format!(
            "{}é{}",
            "x".repeat(job::MAX_SHOWN_COMMAND_BYTES - 1),
            "y".repeat(100)
        );
        let cut = job::shortened(long);
        assert_eq!(
            cut,
            format!("{}…", "x".repeat(job::MAX_SHOWN_COMMAND_BYTES - 1))
        );
    }

    #[test]
    fn timestamps_split_into_seconds_and_nanos() {
        let ts = timestamp(1_500_000);
        assert_eq!((ts.seconds, ts.nanos), (1, 500_000_000));
    }
}
