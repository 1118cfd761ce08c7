//! The fallback without a delegated cgroup: the server is a child subreaper (PR_SET_CHILD_SUBREAPER), so a job's
//! orphans (`setsid`, double forks) come back to it rather than to init. The end of an attempt kills every process
//! that carries the run's `QUEUECTL_JOB` tag; orphans without it (`env -i`) cannot be told apart from another
//! run's and are only reaped once they exit.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

/// Job shells tokio waits for: never reaped here, or tokio would lose their exit status.
static SHELLS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn shells<T>(with: impl FnOnce(&mut BTreeSet<u32>) -> T) -> T {
    with(&mut SHELLS.lock().expect("shells lock"))
}

/// Makes the server a child subreaper and starts reaping the orphans that come back to it. Returns the error of
/// prctl(2) if the kernel refused.
pub fn start() -> std::io::Result<()> {
    // SAFETY: prctl(2) with PR_SET_CHILD_SUBREAPER only sets a flag of this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    tokio::spawn(async {
        let mut children =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
        loop {
            match children.as_mut() {
                Some(children) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), children.recv()).await;
                }
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            }
            reap();
        }
    });
    Ok(())
}

/// Notes `pid` as a job shell tokio waits for.
pub fn enter(pid: u32) {
    shells(|shells| shells.insert(pid));
}

/// Ends an attempt: forgets its shell (tokio reaped it), kills every process that carries `tag` and reaps them.
pub fn end(pid: u32, tag: &str) {
    shells(|shells| shells.remove(&pid));
    kill_tagged(tag);
    reap();
}

/// Sends SIGKILL to every process with `QUEUECTL_JOB=<tag>` in its environment, wherever it went. Returns how
/// many.
pub fn kill_tagged(tag: &str) -> usize {
    let wanted = format!("{}={tag}", crate::runner::TAG_VARIABLE);
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for process in processes.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let tagged = std::fs::read(process.path().join("environ")).is_ok_and(|environ| {
            environ
                .split(|byte| *byte == 0)
                .any(|entry| entry == wanted.as_bytes())
        });
        if tagged {
            // SAFETY: kill(2) only sends a signal.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
}

/// Reaps the zombie children of the server that are not job shells: orphans that came back to it and exited.
fn reap() {
    let me = std::process::id();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return;
    };
    for process in processes.flatten() {
        let Ok(stat) = std::fs::read_to_string(process.path().join("stat")) else {
            continue;
        };
        let Some((pid, rest)) = stat.split_once(' ') else {
            continue;
        };
        // After the command name in parentheses: state, parent pid.
        let mut fields = rest
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace();
        let (Some(state), Some(parent)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if state != "Z" || parent.parse() != Ok(me) || shells(|shells| shells.contains(&pid)) {
            continue;
        }
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            continue;
        };
        // SAFETY: waitpid(2) on one zombie child that no one else waits for; WNOHANG never blocks.
        unsafe {
            libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
        }
    }
}
