//! The fallback without a delegated cgroup: the server is a child subreaper (PR_SET_CHILD_SUBREAPER), so a job's
//! orphans (`setsid`, double forks) come back to it rather than to init. The end of an attempt kills every process
//! that carries the run's `QUEUECTL_JOB` tag; orphans without it (`env -i`) cannot be told apart from another
//! run's and are only reaped once they exit.

use std::collections::BTreeSet;
use std::path::Path;
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

/// Forgets job shell `pid`, which ended or ends without a run.
pub fn forget(pid: u32) {
    shells(|shells| shells.remove(&pid));
}

/// Ends an attempt: forgets its shell (tokio reaped it), kills every process that carries `tag` and reaps them.
/// The run's orphans came back to the server, so only what lies below it is searched, not every process of the
/// machine: reading all of /proc at each end halved the drain.
pub fn end(pid: u32, tag: &str) {
    forget(pid);
    match below_server() {
        Some(candidates) => kill_tagged_among(candidates, tag),
        None => kill_tagged(tag),
    };
    reap();
}

/// Sends SIGKILL to every process with `QUEUECTL_JOB=<tag>` in its environment, wherever it went (after a crash,
/// orphans of the previous server went to init). Returns how many.
pub fn kill_tagged(tag: &str) -> usize {
    kill_tagged_among(every_process(), tag)
}

fn kill_tagged_among(candidates: Vec<u32>, tag: &str) -> usize {
    let wanted = format!("{}={tag}", crate::runner::TAG_VARIABLE);
    let mut killed = 0;
    for pid in candidates {
        let tagged = std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
            environ
                .split(|byte| *byte == 0)
                .any(|entry| entry == wanted.as_bytes())
        });
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            continue;
        };
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

fn every_process() -> Vec<u32> {
    std::fs::read_dir("/proc").map_or_else(
        |_| Vec::new(),
        |processes| {
            processes
                .flatten()
                .filter_map(|process| process.file_name().to_str()?.parse().ok())
                .collect()
        },
    )
}

/// Whether the kernel lists each thread's children (Linux 3.5 and later, with CONFIG_PROC_CHILDREN).
fn lists_children() -> bool {
    static LISTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LISTS.get_or_init(|| Path::new("/proc/thread-self/children").exists())
}

/// The children of `pid`, as its threads' `children` lists give them.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    threads
        .flatten()
        .filter_map(|thread| read_whole(&thread.path().join("children")))
        .flat_map(|listed| {
            listed
                .split(u8::is_ascii_whitespace)
                .filter_map(|child| std::str::from_utf8(child).ok()?.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// A `children` list read in one go: each further read of it makes the kernel find its place again by counting,
/// and a child that exits in between shifts the count, so that the next one would be skipped. The buffer is each
/// thread's own, kept: the end of every run reads a list per server thread, and zeroing a fresh one each time
/// cost more than the reads.
fn read_whole(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 64 * 1024]);
    }
    let mut file = std::fs::File::open(path).ok()?;
    BUFFER.with_borrow_mut(|buffer| {
        let mut read = 0;
        loop {
            match file.read(&mut buffer[read..]).ok()? {
                0 => break,
                more => read += more,
            }
            if read == buffer.len() {
                buffer.resize(read * 2, 0);
            }
        }
        Some(buffer[..read].to_vec())
    })
}

/// Every process below the server, but for the job shells still running and what they started: that is where
/// the orphans of ended runs are. `None` where the kernel does not list children.
fn below_server() -> Option<Vec<u32>> {
    if !lists_children() {
        return None;
    }
    let running = shells(|shells| shells.clone());
    let mut found = Vec::new();
    let mut next = children_of(std::process::id());
    while let Some(pid) = next.pop() {
        if !running.contains(&pid) {
            found.push(pid);
            next.extend(children_of(pid));
        }
    }
    Some(found)
}

/// Reaps the zombie children of the server that are not job shells: orphans that came back to it and exited.
fn reap() {
    let me = std::process::id();
    let candidates = match lists_children() {
        true => children_of(me),
        false => every_process(),
    };
    for candidate in candidates {
        // Tokio reaps the job shells itself.
        if shells(|shells| shells.contains(&candidate)) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{candidate}/stat")) else {
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
        // The shells again: one may have started, and been noted, since the first look.
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

#[cfg(test)]
mod tests {
    #[test]
    fn every_child_of_a_process_is_listed() {
        let mut children: Vec<_> = (0..20)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .unwrap()
            })
            .collect();
        let listed = super::children_of(std::process::id());
        for child in &mut children {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        for child in &children {
            assert!(listed.contains(&child.id()), "{} in {listed:?}", child.id());
        }
    }
}
