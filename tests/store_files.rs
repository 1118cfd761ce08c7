//! The database's files under a running server: a clean stop leaves everything in `jobs.db`; files deleted,
//! replaced or damaged under the server stop it from acknowledging, and health says so.

#![cfg(unix)]

mod common;

use std::path::Path;

use common::{DEADLINE, Home, wait_until};
use sqlx::{Connection, SqliteConnection};

/// How many jobs a database file holds, read by a connection of the test's own.
fn stored_jobs(db: &Path) -> i64 {
    common::runtime().block_on(async {
        let mut conn = SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    })
}

fn health_code(home: &Home) -> Option<i32> {
    home.try_queuectl(&["health"]).status.code()
}

#[test]
fn a_clean_stop_leaves_the_whole_database_in_jobs_db() {
    let mut home = Home::with_server(0);
    for _ in 0..50 {
        home.enqueue(r#"{"command":"true"}"#);
    }
    assert!(home.stop_server().success());
    let wal = home.file("jobs.db-wal");
    assert!(
        std::fs::metadata(&wal).map_or(0, |metadata| metadata.len()) == 0,
        "the log was checkpointed into jobs.db"
    );
    // A copy of jobs.db alone, as someone backing it up would take it.
    let copy = tempfile::tempdir().unwrap();
    let copied = copy.path().join("jobs.db");
    std::fs::copy(home.file("jobs.db"), &copied).unwrap();
    assert_eq!(stored_jobs(&copied), 50);
}

fn assert_enqueue_refused(home: &Home, expected: &str) {
    let output = home.try_queuectl(&["enqueue", r#"{"command":"true"}"#]);
    assert!(!output.status.success(), "an enqueue was acknowledged");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(expected), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn a_database_deleted_under_the_server_is_not_written_to_and_health_says_so() {
    let home = Home::with_server(0);
    home.enqueue(r#"{"command":"true"}"#);
    for name in ["jobs.db", "jobs.db-wal", "jobs.db-shm"] {
        std::fs::remove_file(home.file(name)).unwrap();
    }
    assert_enqueue_refused(&home, "was deleted while the server ran");
    assert_enqueue_refused(&home, "was deleted while the server ran");
    wait_until("health to say NOT_SERVING", DEADLINE, || {
        health_code(&home) == Some(4)
    });
    // Nor made again: a new, empty database there would be what the next start serves.
    assert!(!home.file("jobs.db").exists());
}

#[test]
fn a_database_replaced_under_the_server_is_not_written_to() {
    let home = Home::with_server(0);
    home.enqueue(r#"{"command":"true"}"#);
    let elsewhere = home.path().join("replacement.db");
    std::fs::copy(home.file("jobs.db"), &elsewhere).unwrap();
    std::fs::rename(&elsewhere, home.file("jobs.db")).unwrap();
    assert_enqueue_refused(&home, "was replaced while the server ran");
    wait_until("health to say NOT_SERVING", DEADLINE, || {
        health_code(&home) == Some(4)
    });
}

/// The issue's third case: `-wal` deleted under the server, where the latest commits live until a checkpoint.
#[test]
fn a_wal_deleted_under_the_server_is_not_written_to() {
    let home = Home::with_server(0);
    home.enqueue(r#"{"command":"true"}"#);
    std::fs::remove_file(home.file("jobs.db-wal")).unwrap();
    assert_enqueue_refused(&home, "jobs.db-wal");
    assert_enqueue_refused(&home, "restart");
    wait_until("health to say NOT_SERVING", DEADLINE, || {
        health_code(&home) == Some(4)
    });
}

/// The log stays near its checkpoint size under a stream of large writes, instead of growing to SQLite's default
/// 4 MiB (which it did before) and staying there.
#[test]
fn the_wal_stays_bounded_under_a_stream_of_writes() {
    let home = Home::with_server(0);
    let padding = "x".repeat(16 * 1024);
    let mut largest = 0;
    // About 8 MiB written in all.
    for n in 0..500 {
        home.enqueue(&format!(r#"{{"id":"big{n}","command":": {padding}"}}"#));
        let wal = std::fs::metadata(home.file("jobs.db-wal")).map_or(0, |meta| meta.len());
        largest = largest.max(wal);
    }
    assert!(
        largest <= 2 * 1024 * 1024,
        "the log reached {largest} bytes"
    );
    assert_eq!(home.count("pending"), 500);
}

/// Pages of `jobs.db` overwritten under a running server (the issue's reproduction): its claims fail, so it says
/// NOT_SERVING and acknowledges no enqueue, instead of taking jobs it cannot run. (A server started on a damaged
/// file refuses to start, saying so.)
#[test]
fn a_damaged_database_is_not_serving_and_acknowledges_nothing() {
    let mut home = Home::with_server(0);
    let padding = "x".repeat(2000);
    for n in 0..300 {
        home.enqueue(&format!(r#"{{"id":"j{n}","command":"true # {padding}"}}"#));
    }
    // A clean stop puts every page in jobs.db, where the damage will be.
    assert!(home.stop_server().success());
    home.start_server(0);
    let db = home.file("jobs.db");
    let mut bytes = std::fs::read(&db).unwrap();
    let page = 4096;
    for byte in &mut bytes[16 * page..] {
        *byte = 0x5a;
    }
    std::fs::write(&db, bytes).unwrap();

    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    wait_until("health to say NOT_SERVING", DEADLINE, || {
        health_code(&home) == Some(4)
    });
    assert_enqueue_refused(&home, "damaged");
}

/// `queuectl backup FILE` while jobs are being written: a consistent, owner-only copy that SQLite reads whole; an
/// existing file is refused and left as it was.
#[test]
fn backup_writes_a_consistent_private_copy_while_the_server_runs() {
    use std::os::unix::fs::PermissionsExt;
    let home = Home::with_server(1);
    for n in 0..20 {
        home.enqueue(&format!(r#"{{"id":"b{n}","command":"true"}}"#));
    }
    let dir = tempfile::tempdir().unwrap();
    let printed = home
        .command(&["backup", "copy.db"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let copy = dir.path().join("copy.db");
    assert!(
        String::from_utf8_lossy(&printed.stdout).contains(&copy.display().to_string()),
        "a relative path is the caller's"
    );
    assert_eq!(
        std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(stored_jobs(&copy), 20);

    std::fs::write(dir.path().join("taken.db"), "mine").unwrap();
    let refused = home
        .command(&["backup", "taken.db"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("File exists"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("taken.db")).unwrap(),
        "mine"
    );
}

/// A small filesystem of the test's own, unmounted when the test ends.
struct SmallDisk {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (and the test skips, saying so) where this test run cannot mount; CI runs as root, where it can.
    fn mount(megabytes: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={megabytes}m,mode=0700"))
            .arg("tmpfs")
            .arg(&path)
            .status()
            .is_ok_and(|status| status.success());
        if !mounted {
            common::skip("cannot mount a small filesystem (needs root)");
            return None;
        }
        Some(SmallDisk { path, _dir: dir })
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        while file.write_all(&block[..512]).is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// A full disk: a server killed with a job running restarts on it and serves reads (it used to refuse to start),
/// refuses writes saying the disk is full, and once space is freed returns the job to the queue and runs it.
#[test]
fn a_server_starts_and_serves_reads_on_a_full_disk() {
    let Some(disk) = SmallDisk::mount(4) else {
        return;
    };
    let outside = tempfile::tempdir().unwrap();
    let marker = outside.path().join("first-run");
    let mut home = Home::new_in(&disk.path);
    home.start_server(1);
    home.enqueue(&format!(
        r#"{{"id":"long","command":"[ -e {m} ] || {{ touch {m}; sleep 60; }}"}}"#,
        m = marker.display()
    ));
    // Its first run must have begun (the marker), or the rerun after the restart would be the one that sleeps.
    wait_until("the first run to begin", DEADLINE, || marker.exists());
    home.kill_server();
    let filler = disk.fill();

    home.start_server(1);
    assert_eq!(home.state("long"), "processing", "reads are served");
    let refused = home.try_queuectl(&["enqueue", r#"{"command":"true"}"#]);
    assert!(
        !refused.status.success(),
        "nothing is acknowledged on a full disk"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("disk is full") || stderr.contains("unavailable"),
        "{stderr}"
    );

    std::fs::remove_file(filler).unwrap();
    home.wait_for_state("long", "completed");
    assert!(home.enqueue(r#"{"command":"true"}"#).starts_with("job"));
}
