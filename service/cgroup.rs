//! A cgroup v2 per attempt, under the server's own cgroup when that sub-tree is delegated to it (systemd
//! `Delegate=yes`): whatever a job does (setsid, double forks, a cleared environment), its processes stay in the
//! attempt's cgroup, and `cgroup.kill` ends them all. A job's shell joins its cgroup when it starts, before it
//! knows its job, and an attempt's cgroup, once empty, serves a later shell: creating and removing a cgroup per
//! job cost the drain about a tenth of the server's CPU, and moving the shell on the way to its job delayed a
//! pickup by milliseconds now and then.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long the end of an attempt waits for its cgroup to empty after `cgroup.kill` before it gives up on it.
const EMPTY_LIMIT: Duration = Duration::from_secs(5);

/// The server's delegated cgroup v2 sub-tree, the prefix that names this server's attempt cgroups in it, and
/// those of them that are empty and free for the next shell.
#[derive(Debug)]
pub struct Tree {
    root: PathBuf,
    prefix: String,
    free: Mutex<Vec<PathBuf>>,
    /// The number in the name of the next cgroup created.
    next: AtomicU64,
}

impl Tree {
    /// The server's own cgroup, if it is on a cgroup v2 mount, supports `cgroup.kill` and lets the server create
    /// children in it (delegated); `None` otherwise, with the reason.
    pub fn detect(server_id: &str) -> Result<Tree, String> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|error| format!("cannot read /proc/self/mountinfo: {error}"))?;
        let mount = cgroup2_mount(&mounts).ok_or("no cgroup2 mount")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|error| format!("cannot read /proc/self/cgroup: {error}"))?;
        let own = unified_path(&own).ok_or("not in a cgroup v2 hierarchy")?;
        let root = mount.join(own.trim_start_matches('/'));
        let tree = Tree {
            root,
            prefix: format!("queuectl-{}-", sanitize(server_id)),
            free: Mutex::default(),
            next: AtomicU64::new(1),
        };
        let probe = tree.root.join(format!("{}probe", tree.prefix));
        std::fs::create_dir(&probe)
            .map_err(|error| format!("cannot create {}: {error}", probe.display()))?;
        let kill = probe.join("cgroup.kill").exists();
        let _ = std::fs::remove_dir(&probe);
        if !kill {
            return Err("the kernel has no cgroup.kill (Linux 5.14 or later has it)".to_owned());
        }
        Ok(tree)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Moves `pid` (a job's shell, held at its gate) into an empty cgroup of this server: a free one, or a new one.
    pub fn enter(&self, pid: u32) -> std::io::Result<PathBuf> {
        let free = self.free.lock().expect("free cgroups lock").pop();
        let path = match free {
            Some(path) => path,
            None => self.create()?,
        };
        if let Err(error) = std::fs::write(path.join("cgroup.procs"), pid.to_string()) {
            let _ = std::fs::remove_dir(&path);
            return Err(error);
        }
        Ok(path)
    }

    /// A new cgroup, named after this server and a number; a name taken already (a cgroup a previous server left
    /// that would not empty) is passed over.
    fn create(&self) -> std::io::Result<PathBuf> {
        loop {
            let number = self.next.fetch_add(1, Ordering::Relaxed);
            let path = self.root.join(format!("{}{number}", self.prefix));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(path),
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Ends the attempt in cgroup `path`: kills what is left in it and keeps it, once empty, for a later shell.
    pub async fn end(&self, path: PathBuf) {
        if emptied(&path).await {
            self.free.lock().expect("free cgroups lock").push(path);
        }
    }

    /// Kills and removes every cgroup of this server: those a killed server left behind, at start, and this
    /// server's own, when it stops. Returns how many had processes left.
    pub async fn sweep(&self) -> usize {
        self.free.lock().expect("free cgroups lock").clear();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return 0;
        };
        let mut found = 0;
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(&self.prefix))
            {
                let path = entry.path();
                if populated(&path) != Some(false) {
                    found += 1;
                }
                if emptied(&path).await
                    && let Err(error) = std::fs::remove_dir(&path)
                {
                    tracing::warn!(cgroup = %path.display(), %error, "cannot remove an attempt's cgroup");
                }
            }
        }
        found
    }
}

/// Kills every process of the cgroup at `path`, unless it is known to have none, and waits for it to empty.
/// Returns whether it is known to be empty: one that cannot be read is not reused.
async fn emptied(path: &Path) -> bool {
    if populated(path) == Some(false) {
        return true;
    }
    if let Err(error) = std::fs::write(path.join("cgroup.kill"), "1") {
        tracing::warn!(cgroup = %path.display(), %error, "cannot kill an attempt's cgroup");
        return false;
    }
    let deadline = tokio::time::Instant::now() + EMPTY_LIMIT;
    while populated(path) != Some(false) {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(cgroup = %path.display(), "an attempt's cgroup did not empty after cgroup.kill; it stays");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Whether the cgroup still has processes (`populated 1` in `cgroup.events`); `None` when that cannot be read.
fn populated(path: &Path) -> Option<bool> {
    let events = std::fs::read_to_string(path.join("cgroup.events")).ok()?;
    Some(events.lines().any(|line| line.trim() == "populated 1"))
}

/// The mount point of the cgroup2 file system in a `/proc/self/mountinfo` listing.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, filesystem) = line.split_once(" - ")?;
        if filesystem.split(' ').next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(unescape(mount.split(' ').nth(4)?)))
    })
}

/// The process's cgroup v2 path (the `0::` line of `/proc/self/cgroup`).
fn unified_path(cgroups: &str) -> Option<&str> {
    cgroups.lines().find_map(|line| line.strip_prefix("0::"))
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// A cgroup name part: letters, digits, `-` and `_` kept, anything else as `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_in_a_hybrid_layout() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("30 25 0:26 / /x rw - tmpfs tmpfs rw"), None);
        assert_eq!(
            cgroup2_mount("31 30 0:27 / /my\\040cgroups rw - cgroup2 cgroup2 rw"),
            Some(PathBuf::from("/my cgroups"))
        );
    }

    #[test]
    fn reads_the_unified_path() {
        assert_eq!(
            unified_path("12:cpu:/x\n0::/system.slice/queuectld.service\n"),
            Some("/system.slice/queuectld.service")
        );
        assert_eq!(unified_path("12:cpu:/x\n"), None);
    }

    #[tokio::test]
    async fn a_cgroup_that_cannot_be_read_is_not_taken_for_empty() {
        assert!(!emptied(Path::new("/nonexistent/queuectl-test-1")).await);
    }

    #[test]
    fn names_are_safe() {
        assert_eq!(sanitize("host-0a1b"), "host-0a1b");
        assert_eq!(sanitize("job/1#3"), "job_1_3");
    }
}
