//! Completions that go past what the command line itself knows: the ids of the jobs the home's running server
//! holds, and the settings. Shells ask `queuectl` itself, with `COMPLETE=<shell>` set (`source <(COMPLETE=bash
//! queuectl)`); `queuectl completions SHELL` still prints a script that completes the rest without asking.

use std::ffi::OsStr;
use std::time::Duration;

use clap_complete::engine::{ArgValueCandidates, ArgValueCompleter, CompletionCandidate};
use queuectl::pb;

/// How long a completion may wait for the server: a shell waits on it.
const PATIENCE: Duration = Duration::from_secs(1);

/// The jobs the queue holds (the first page of its listing), by id; nothing when no server answers at once.
pub fn job_ids() -> ArgValueCompleter {
    ArgValueCompleter::new(|current: &OsStr| {
        let Some(prefix) = current.to_str() else {
            return Vec::new();
        };
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return Vec::new();
        };
        let server = std::env::var("QUEUECTL_SERVER").ok();
        let listed = runtime.block_on(async {
            tokio::time::timeout(PATIENCE, async {
                // Never starts a server just to complete a word.
                let mut client = crate::client::connect(server.as_deref(), false).await?;
                let page = client
                    .list(pb::ListRequest {
                        page_size: 1000,
                        ..Default::default()
                    })
                    .await?;
                anyhow::Ok(page.into_inner().jobs)
            })
            .await
        });
        let Ok(Ok(jobs)) = listed else {
            return Vec::new();
        };
        jobs.into_iter()
            .filter(|job| job.id.starts_with(prefix))
            .map(|job| {
                let about = format!(
                    "{}: {}",
                    crate::output::state_name(job.state),
                    summary(&job.command)
                );
                CompletionCandidate::new(job.id).help(Some(about.into()))
            })
            .collect()
    })
}

/// A command as one short line: a shell prints each candidate's help on one line, beside its id.
fn summary(command: &str) -> String {
    const SHOWN_CHARS: usize = 60;
    let first_line = command.lines().next().unwrap_or_default();
    let mut shown: String = first_line.chars().take(SHOWN_CHARS).collect();
    if shown.len() < command.trim_end().len() {
        shown.push('…');
    }
    shown
}

/// The settings, with what each one means.
pub fn setting_keys() -> ArgValueCandidates {
    ArgValueCandidates::new(|| {
        queuectl::config::KEYS
            .iter()
            .map(|key| CompletionCandidate::new(key.name).help(Some(key.help.into())))
            .collect::<Vec<_>>()
    })
}
