//! Keeps the processes of a run from outliving it, even those that leave its process group (`setsid`) or drop its
//! `QUEUECTL_JOB` tag (`env -i`). The mode is chosen once, at start, and logged:
//!
//! - `cgroup` (Linux, a writable cgroup v2 sub-tree, e.g. systemd `Delegate=yes`): each attempt gets a cgroup of its
//!   own, which its shell joins when it starts; the end of the attempt and recovery after a crash kill everything
//!   in it, whatever the job did.
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

/// What holds the processes of one attempt, from the start of its shell.
pub struct Attempt {
    /// The attempt's cgroup, in the cgroup mode.
    #[cfg(target_os = "linux")]
    cgroup: Option<std::path::PathBuf>,
    /// The shell, and the tag of its run once it has one, in the subreaper mode.
    #[cfg(target_os = "linux")]
    shell: Option<(u32, Option<String>)>,
}

impl Attempt {
    /// Takes in job shell `pid`, started ahead of its job and held at its gate: in the cgroup mode it moves into a
    /// cgroup of its own; in the subreaper mode it is noted, since tokio waits for it and nothing else may reap it.
    pub fn hold(pid: u32) -> Attempt {
        match mode() {
            #[cfg(target_os = "linux")]
            Mode::Cgroup(tree) => Attempt {
                cgroup: tree
                    .enter(pid)
                    .inspect_err(|error| {
                        tracing::warn!(%error,
                            "cannot put a job's shell in a cgroup of its own; only its process group ends with its run");
                    })
                    .ok(),
                shell: None,
            },
            #[cfg(target_os = "linux")]
            Mode::Subreaper => {
                reaper::enter(pid);
                Attempt {
                    cgroup: None,
                    shell: Some((pid, None)),
                }
            }
            _ => {
                let _ = pid;
                Attempt::none()
            }
        }
    }

    /// An attempt held by its process group alone.
    pub fn none() -> Attempt {
        Attempt {
            #[cfg(target_os = "linux")]
            cgroup: None,
            #[cfg(target_os = "linux")]
            shell: None,
        }
    }

    /// Gives the attempt its run, `tag`, as its shell gets its job.
    pub fn tag(&mut self, tag: &str) {
        #[cfg(target_os = "linux")]
        if let Some((_, run)) = &mut self.shell {
            *run = Some(tag.to_owned());
        }
        #[cfg(not(target_os = "linux"))]
        let _ = tag;
    }

    /// Kills whatever is left of the attempt. Call once its shell was reaped.
    pub async fn end(self) {
        #[cfg(target_os = "linux")]
        {
            if let (Some(path), Mode::Cgroup(tree)) = (self.cgroup, mode()) {
                tree.end(path).await;
            }
            match self.shell {
                Some((pid, Some(tag))) => reaper::end(pid, &tag),
                Some((pid, None)) => reaper::forget(pid),
                None => {}
            }
        }
    }

    /// Lets go of an attempt whose shell ends without a job (`kill_on_drop`): once it exited, it is reaped like any
    /// orphan, and its cgroup is emptied and freed in the background.
    pub fn abandon(self) {
        #[cfg(target_os = "linux")]
        {
            if let Some((pid, _)) = self.shell {
                reaper::forget(pid);
            }
            if self.cgroup.is_some()
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                runtime.spawn(
                    Attempt {
                        shell: None,
                        ..self
                    }
                    .end(),
                );
            }
        }
    }
}

/// Kills and removes what this server's attempts hold, once it stopped starting them.
pub async fn close() {
    #[cfg(target_os = "linux")]
    if let Mode::Cgroup(tree) = mode() {
        tree.sweep().await;
    }
}
