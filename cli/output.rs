//! Rendering replies for people and scripts. Pure: strings in, strings out.

use std::io;
use std::time::{Duration, UNIX_EPOCH};

use prost_types::Timestamp;
use queuectl::pb;
use serde::Serialize;
use serde_json::ser::Formatter;

pub fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Pending) => "pending",
        Ok(pb::JobState::Processing) => "processing",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Completed) => "completed",
        Ok(pb::JobState::Dead) => "dead",
        Ok(pb::JobState::Cancelled) => "cancelled",
        Ok(pb::JobState::Unspecified) | Err(_) => "unknown",
    }
}

/// `2025-11-08T12:35:50.089525+00:00`, as Python's `datetime.isoformat()` wrote it.
pub fn iso_time(timestamp: Option<&Timestamp>) -> String {
    let Some(timestamp) = timestamp else {
        return String::new();
    };
    let since_epoch = Duration::new(
        u64::try_from(timestamp.seconds).unwrap_or_default(),
        u32::try_from(timestamp.nanos).unwrap_or_default(),
    );
    let rfc3339 = humantime::format_rfc3339_micros(UNIX_EPOCH + since_epoch).to_string();
    format!("{}+00:00", rfc3339.trim_end_matches('Z'))
}

/// A job in the key order and shape of the Python queuectl's JSON lines.
#[derive(Serialize)]
struct JobLine<'a> {
    id: &'a str,
    command: &'a str,
    state: &'a str,
    attempts: u32,
    max_retries: u32,
    priority: u32,
    created_at: String,
    updated_at: String,
    /// `null` while the job waits for the jobs in `after`.
    run_after: Option<i64>,
    last_error: Option<&'a str>,
    timeout: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    after: &'a [String],
    #[serde(skip_serializing_if = "str::is_empty")]
    cwd: &'a str,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    env: std::collections::BTreeMap<&'a str, &'a str>,
    /// Only where aging has moved the job up: the Python queuectl's lines stay as they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    effective_priority: Option<u32>,
}

/// `", "` before every item but the first, as Python's `json.dumps` separates items.
fn separate<W: ?Sized + io::Write>(writer: &mut W, first: bool) -> io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

/// Writes JSON as Python's `json.dumps` does: `", "` and `": "` separators, non-ASCII escaped.
struct PythonStyle;

impl Formatter for PythonStyle {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separate(writer, first)
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separate(writer, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() {
                writer.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

pub fn job_json(job: &pb::Job) -> String {
    let line = JobLine {
        id: &job.id,
        command: &job.command,
        state: state_name(job.state),
        attempts: job.attempts,
        max_retries: job.max_retries,
        priority: job.priority,
        created_at: iso_time(job.created_at.as_ref()),
        updated_at: iso_time(job.updated_at.as_ref()),
        run_after: job.run_after.as_ref().map(|at| at.seconds),
        last_error: Some(job.last_error.as_str()).filter(|error| !error.is_empty()),
        timeout: job.timeout,
        after: &job.after,
        cwd: &job.cwd,
        env: job
            .env
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect(),
        effective_priority: aged(job),
    };
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonStyle);
    line.serialize(&mut serializer)
        .expect("serialising to memory cannot fail");
    String::from_utf8(out).expect("the formatter writes ASCII")
}

fn worker_json(worker: &pb::Worker) -> serde_json::Value {
    serde_json::json!({
        "index": worker.index,
        "job_id": Some(&worker.job_id).filter(|id| !id.is_empty()),
        "command": Some(&worker.command).filter(|command| !command.is_empty()),
        "started_at": worker.started_at.as_ref().map(|at| iso_time(Some(at))),
        "stopping": worker.stopping,
    })
}

/// `status --output json`: one object with the counts, this server's workers and every server.
pub fn status_json(status: &pb::StatusResponse) -> String {
    let servers: Vec<_> = status
        .servers
        .iter()
        .map(|server| {
            serde_json::json!({
                "id": server.id,
                "host": server.host,
                "pid": server.pid,
                "worker_count": server.worker_count,
                "workers": server.workers.iter().map(worker_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "pending": status.pending,
        "processing": status.processing,
        "failed": status.failed,
        "completed": status.completed,
        "dead": status.dead,
        "cancelled": status.cancelled,
        "paused": status.paused,
        "worker_count": status.worker_count,
        "workers": status.workers.iter().map(worker_json).collect::<Vec<_>>(),
        "server_pid": status.server_pid,
        "server_version": status.server_version,
        "servers": servers,
    })
    .to_string()
}

/// `config get --output json`: the settings as an object of numbers.
pub fn config_json(entries: &[pb::ConfigEntry]) -> String {
    let settings: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|entry| {
            let value = entry
                .value
                .parse::<u64>()
                .map_or_else(|_| entry.value.clone().into(), Into::into);
            (entry.key.clone(), value)
        })
        .collect();
    serde_json::Value::Object(settings).to_string()
}

fn stream_name(stream: i32) -> &'static str {
    match pb::OutputStream::try_from(stream) {
        Ok(pb::OutputStream::Stdout) => "stdout",
        Ok(pb::OutputStream::Stderr) => "stderr",
        Ok(pb::OutputStream::Note) => "note",
        _ => "unknown",
    }
}

/// `logs --output json`: one attempt per line, its output (of the chunks, those of `only` and the notes) merged
/// as text and as chunks tagged with their stream.
pub fn run_json(run: &pb::JobRun, only: Option<pb::OutputStream>) -> String {
    let chunks: Vec<&pb::OutputChunk> = run
        .chunks
        .iter()
        .filter(|chunk| {
            only.is_none_or(|only| {
                chunk.stream == only as i32 || chunk.stream == pb::OutputStream::Note as i32
            })
        })
        .collect();
    let output: Vec<u8> = chunks
        .iter()
        .flat_map(|chunk| chunk.data.iter().copied())
        .collect();
    serde_json::json!({
        "run": run.run,
        "worker": run.worker,
        "started_at": iso_time(run.started_at.as_ref()),
        "finished_at": run.finished_at.as_ref().map(|at| iso_time(Some(at))),
        "outcome": Some(&run.outcome).filter(|outcome| !outcome.is_empty()),
        "truncated": run.truncated,
        "output": String::from_utf8_lossy(&output),
        "chunks": chunks.iter().map(|chunk| serde_json::json!({
            "stream": stream_name(chunk.stream),
            "offset": chunk.offset,
            "text": String::from_utf8_lossy(&chunk.data),
        })).collect::<Vec<_>>(),
    })
    .to_string()
}

/// The priority aging has given `job`, where it differs from its own (a server that does not age sends 0).
fn aged(job: &pb::Job) -> Option<u32> {
    (job.effective_priority != 0 && job.effective_priority != job.priority)
        .then_some(job.effective_priority)
}

pub fn table_header() -> String {
    format!(
        "{:<16} {:<10} {:>6} {:>8} {:<20} {}",
        "ID", "STATE", "PRI", "ATTEMPTS", "UPDATED", "COMMAND"
    )
}

/// The priority column: the aged priority the job competes with, and its own in parentheses when they differ.
fn priority_cell(job: &pb::Job) -> String {
    match aged(job) {
        Some(effective) => format!("{effective} ({})", job.priority),
        None => job.priority.to_string(),
    }
}

pub fn job_row(job: &pb::Job) -> String {
    let updated = iso_time(job.updated_at.as_ref());
    let command = job.command.replace('\n', " ");
    format!(
        "{:<16} {:<10} {:>6} {:>8} {:<20} {}",
        job.id,
        state_name(job.state),
        priority_cell(job),
        format!("{}/{}", job.attempts, job.max_retries),
        updated.get(..19).unwrap_or(&updated),
        command
    )
}

pub fn status_text(status: &pb::StatusResponse) -> String {
    let mut text = format!(
        "Job states:\n  pending: {}\n  processing: {}\n  failed: {}\n  completed: {}\n  dead: {}\n  \
         cancelled: {}\n",
        status.pending,
        status.processing,
        status.failed,
        status.completed,
        status.dead,
        status.cancelled
    );
    if status.paused {
        text.push_str("Queue: paused (no job starts until `queuectl resume`)\n");
    }
    let busy = status
        .workers
        .iter()
        .filter(|worker| !worker.job_id.is_empty())
        .count();
    text.push_str(&format!(
        "Workers: {} ({busy} busy), server pid {}\n",
        status.worker_count, status.server_pid
    ));
    push_workers(&mut text, &status.workers);
    // Other servers sharing a PostgreSQL database (the first entry is the one that answered).
    for server in status.servers.iter().skip(1) {
        let busy = server
            .workers
            .iter()
            .filter(|worker| !worker.job_id.is_empty())
            .count();
        text.push_str(&format!(
            "Server {} on {}: {} workers ({busy} busy), pid {}\n",
            server.id, server.host, server.worker_count, server.pid
        ));
        push_workers(&mut text, &server.workers);
    }
    text
}

fn push_workers(text: &mut String, workers: &[pb::Worker]) {
    for worker in workers {
        let stopping = if worker.stopping { " (stopping)" } else { "" };
        if worker.job_id.is_empty() {
            text.push_str(&format!("  [worker {}] idle{stopping}\n", worker.index));
        } else {
            text.push_str(&format!(
                "  [worker {}] {}: {}{stopping}\n",
                worker.index, worker.job_id, worker.command
            ));
        }
    }
}

/// A worker event as the Python queuectl's workers printed it; job output is passed through by the caller.
pub fn event_line(event: &pb::watch_events_response::Event) -> Option<String> {
    use pb::watch_events_response::Event;
    let line = match event {
        Event::WorkerStarted(started) => format!("[worker {}] started", started.worker),
        Event::WorkerStopping(stopping) => format!(
            "[worker {}] received stop signal, will exit after current job",
            stopping.worker
        ),
        Event::WorkerExited(exited) => format!("[worker {}] exiting", exited.worker),
        Event::JobPicked(picked) => format!(
            "[worker {}] picked job {}: {}",
            picked.worker, picked.job_id, picked.command
        ),
        Event::JobFinished(finished) if finished.error.is_empty() => format!(
            "[worker {}] job {} completed",
            finished.worker, finished.job_id
        ),
        Event::JobFinished(finished) => format!(
            "[worker {}] job {} failed -> {} ({})",
            finished.worker,
            finished.job_id,
            state_name(finished.state),
            finished.error
        ),
        Event::JobCancelled(cancelled) => {
            format!("job {} {}", cancelled.job_id, cancelled.error)
        }
        Event::JobOutput(_) => return None,
    };
    Some(line)
}

pub fn run_header(job_id: &str, run: &pb::JobRun) -> String {
    let outcome = if run.outcome.is_empty() {
        "running"
    } else {
        &run.outcome
    };
    format!(
        "=== {job_id} attempt {} on worker {}, started {}: {outcome} ===",
        run.run,
        run.worker,
        iso_time(run.started_at.as_ref())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_print_as_the_python_queuectl_printed_them() {
        let job = pb::Job {
            id: "job5".into(),
            command: "invalidcommand".into(),
            state: pb::JobState::Dead.into(),
            attempts: 3,
            max_retries: 2,
            priority: 5,
            created_at: Some(Timestamp {
                seconds: 1_762_605_471,
                nanos: 770_491_000,
            }),
            updated_at: Some(Timestamp {
                seconds: 1_762_605_478,
                nanos: 624_076_000,
            }),
            run_after: Some(Timestamp {
                seconds: 1_762_605_478,
                nanos: 0,
            }),
            last_error: "exit:127".into(),
            timeout: None,
            after: Vec::new(),
            cwd: String::new(),
            env: Default::default(),
            effective_priority: 5,
        };
        assert_eq!(
            job_json(&job),
            r#"{"id": "job5", "command": "invalidcommand", "state": "dead", "attempts": 3, "max_retries": 2, "priority": 5, "created_at": "2025-11-08T12:37:51.770491+00:00", "updated_at": "2025-11-08T12:37:58.624076+00:00", "run_after": 1762605478, "last_error": "exit:127", "timeout": null}"#
        );
    }

    #[test]
    fn non_ascii_is_escaped_like_python() {
        let job = pb::Job {
            command: "echo é😀".into(),
            ..Default::default()
        };
        assert!(job_json(&job).contains(r#""command": "echo \u00e9\ud83d\ude00""#));
    }
}
