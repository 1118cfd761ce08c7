//! Keeps the processes of a run from outliving it, even those that leave its process group (`setsid`) or drop its
//! `QUEUECTL_JOB` tag (`env -i`). The mode is chosen once, at start, and logged:
//!
//! - `cgroup` (Linux, a writable cgroup v2 sub-tree, e.g. systemd `Delegate=yes`): each attempt gets its own cgroup;
//!   the end of the attempt and recovery after a crash kill everything in it, whatever the job did.
//! - `subreaper` (Linux otherwise, or with `QUEUECTL_CGROUPS=off`): the server is a child subreaper; the end of an
//!   attempt and recovery kill every process that carries the run's tag, wherever it went (`setsid`); orphans
//!   without the tag (`env -i`) cannot be attributed to a run: they are reaped when they exit, not killed.
//! - `process-group` (elsewhere): the run's process group only, as the runner does by itself.

use std::sync::OnceLock;

#[cfg(target_os = "linux")]
use crate::{cgroup, reaper};

/// `off` in the server's environment disables the cgroup mode even where it is available.
pub const CGROUPS_ENV: &str = "QUEUECTL_CGROUPS";

enum Mode {
    #[cfg(target_os = "linux")]
    Cgroup(cgroup::Tree),
    #[cfg(target_os = "linux")]
    Subreaper,
    ProcessGroup,
}

static MODE: OnceLock<Mode> = OnceLock::new();

fn mode() -> &'static Mode {
    MODE.get_or_init(|| Mode::ProcessGroup)
}

/// Chooses the mode for server `server_id`, logs it and, in the cgroup mode, kills what attempts of a previous
/// run of this server left behind. Call once, before recovery and before any job starts.
pub async fn init(server_id: &str) {
    let mode = choose(server_id);
    match &mode {
        #[cfg(target_os = "linux")]
        Mode::Cgroup(tree) => {
            tracing::info!(mode = "cgroup", cgroup = %tree.root().display(),
                "each attempt runs in its own cgroup: its end kills everything it started");
            let left = tree.sweep().await;
            if left > 0 {
                tracing::warn!(
                    cgroups = left,
                    "killed the processes of attempts a previous server left"
                );
            }
        }
        #[cfg(target_os = "linux")]
        Mode::Subreaper => {
            tracing::info!(
                mode = "subreaper",
                "the end of an attempt kills its processes that carry its tag; untagged orphans are only reaped"
            );
        }
        Mode::ProcessGroup => {
            tracing::info!(
                mode = "process-group",
                "the end of an attempt kills its process group; processes that leave it survive"
            );
        }
    }
    let _ = MODE.set(mode);
}

fn choose(server_id: &str) -> Mode {
    #[cfg(target_os = "linux")]
    {
        if std::env::var(CGROUPS_ENV).is_ok_and(|value| value == "off") {
            tracing::info!("cgroups disabled by {CGROUPS_ENV}=off");
        } else {
            match cgroup::Tree::detect(server_id) {
                Ok(tree) => return Mode::Cgroup(tree),
                Err(reason) => tracing::info!(%reason, "no delegated cgroup v2 sub-tree"),
            }
        }
        match reaper::start() {
            Ok(()) => return Mode::Subreaper,
            Err(error) => tracing::warn!(%error, "cannot become a child subreaper"),
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = server_id;
    Mode::ProcessGroup
}

/// Kills what run `tag`, interrupted by a previous server's death, left outside its process group, where the mode
/// can find it.
pub fn recover_run(tag: &str) {
    #[cfg(target_os = "linux")]
    if matches!(mode(), Mode::Subreaper) && reaper::kill_tagged(tag) > 0 {
        tracing::warn!(
            run = tag,
            "killed the escaped processes of an interrupted run"
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = tag;
}

/// What holds the processes of one attempt.
pub struct Attempt {
    #[cfg(target_os = "linux")]
    cgroup: Option<std::path::PathBuf>,
    /// The shell and tag of the run, in the subreaper mode.
    #[cfg(target_os = "linux")]
    tagged: Option<(u32, String)>,
}

/// Notes job shell `pid`, started ahead of its job: tokio waits for it, so nothing else may reap it.
pub fn hold(pid: u32) {
    #[cfg(target_os = "linux")]
    if matches!(mode(), Mode::Subreaper) {
        reaper::enter(pid);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = pid;
}

/// Forgets job shell `pid`, which ends without a job: once it exited, it is reaped like any orphan.
pub fn release(pid: u32) {
    #[cfg(target_os = "linux")]
    if matches!(mode(), Mode::Subreaper) {
        reaper::forget(pid);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = pid;
}

/// Takes in the attempt of run `tag` whose shell is `pid`, while the shell is still held at its gate.
pub fn enter(tag: &str, pid: Option<u32>) -> Attempt {
    match (mode(), pid) {
        #[cfg(target_os = "linux")]
        (Mode::Cgroup(tree), Some(pid)) => match tree.enter(tag, pid) {
            Ok(path) => Attempt {
                cgroup: Some(path),
                tagged: None,
            },
            Err(error) => {
                tracing::warn!(run = tag, %error,
                    "cannot put the attempt in its own cgroup; only its process group ends with it");
                Attempt {
                    cgroup: None,
                    tagged: None,
                }
            }
        },
        #[cfg(target_os = "linux")]
        (Mode::Subreaper, Some(pid)) => {
            reaper::enter(pid);
            Attempt {
                cgroup: None,
                tagged: Some((pid, tag.to_owned())),
            }
        }
        _ => {
            let _ = tag;
            Attempt {
                #[cfg(target_os = "linux")]
                cgroup: None,
                #[cfg(target_os = "linux")]
                tagged: None,
            }
        }
    }
}

impl Attempt {
    /// Kills whatever is left of the attempt. Call once its shell was reaped.
    pub async fn end(self) {
        #[cfg(target_os = "linux")]
        if let Some(path) = self.cgroup {
            cgroup::end(&path).await;
        }
        #[cfg(target_os = "linux")]
        if let Some((pid, tag)) = self.tagged {
            reaper::end(pid, &tag);
        }
    }
}
