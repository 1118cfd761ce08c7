//! Several `queuectld` servers sharing one PostgreSQL database behave as one queue: every job runs once, an idle
//! server picks up another's enqueue, and a killed server's jobs are rescued by the others once its lease expires.
//!
//! Runs when QUEUECTL_TEST_DATABASE_URL points at a PostgreSQL server where it may create databases (`.ci/run`
//! sets it); skipped otherwise, except in CI.

#![cfg(unix)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{DEADLINE, Home, wait_until};
use queuectl::pb::{self, queue_service_client::QueueServiceClient};
use sqlx::Connection;
use tonic::transport::Channel;

/// A database of its own for one test, dropped at the end.
struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    fn create() -> Option<TestDatabase> {
        let Ok(admin_url) = std::env::var("QUEUECTL_TEST_DATABASE_URL") else {
            common::skip("set QUEUECTL_TEST_DATABASE_URL to run the PostgreSQL tests");
            return None;
        };
        let name = format!(
            "queuectl_test_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        admin(&admin_url, &format!("CREATE DATABASE {name}"));
        let (base, _) = admin_url
            .rsplit_once('/')
            .expect("a URL ending in /database");
        let url = format!("{base}/{name}");
        Some(TestDatabase {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        admin(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn admin(url: &str, statement: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(&mut conn)
            .await
            .unwrap();
    });
}

/// Starts a server on `database` in `home` with a 2 s lease.
fn start(home: &mut Home, database: &TestDatabase, workers: u32) {
    let mut command = home.server_command(workers);
    command
        .env("QUEUECTL_DATABASE_URL", &database.url)
        .env("QUEUECTL_LEASE_TIMEOUT", "2");
    home.start_server_with(command);
}

async fn client(home: &Home) -> QueueServiceClient<Channel> {
    let channel = queuectl::channel::unix(home.file("queuectl.sock"))
        .await
        .unwrap();
    QueueServiceClient::new(channel)
}

/// Enqueues `count` jobs that append their token to `log`, spread over `homes` in batches.
fn enqueue_tokens(homes: &[&Home], count: usize, log: &std::path::Path, pause: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut clients = Vec::new();
        for home in homes {
            clients.push(client(home).await);
        }
        for (batch, start) in (0..count).step_by(100).enumerate() {
            let jobs = (start..(start + 100).min(count))
                .map(|token| pb::EnqueueRequest {
                    command: format!("{pause}echo t{token} >> {}", log.display()),
                    ..Default::default()
                })
                .collect();
            let client = &mut clients[batch % homes.len()];
            client
                .enqueue_batch(pb::EnqueueBatchRequest { jobs })
                .await
                .unwrap();
        }
    });
}

/// How many times each token was run.
fn runs(log: &std::path::Path) -> BTreeMap<String, usize> {
    let mut runs = BTreeMap::new();
    for token in std::fs::read_to_string(log).unwrap_or_default().lines() {
        *runs.entry(token.to_owned()).or_default() += 1;
    }
    runs
}

#[test]
fn three_servers_run_every_job_exactly_once() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let mut homes: Vec<Home> = (0..3).map(|_| Home::new()).collect();
    for home in &mut homes {
        start(home, &database, 2);
    }
    let log = homes[0].file("runs");
    enqueue_tokens(&homes.iter().collect::<Vec<_>>(), 3000, &log, "");
    wait_until("3,000 jobs to complete", Duration::from_secs(120), || {
        homes[1].count("completed") == 3000
    });
    let runs = runs(&log);
    assert_eq!(runs.len(), 3000, "every job ran");
    assert!(runs.values().all(|&count| count == 1), "no job ran twice");

    let status = homes[2].ok(&["status"]);
    assert_eq!(
        status.matches("Server ").count(),
        2,
        "status shows the other two servers:\n{status}"
    );
    let ids: Vec<String> = homes[0]
        .jobs(&["--limit", "5"])
        .iter()
        .map(|job| job["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        ["job1", "job2", "job3", "job4", "job5"],
        "ids are shared"
    );
}

#[test]
fn an_enqueue_on_one_server_wakes_the_idle_workers_of_another() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let (mut enqueuer, mut worker) = (Home::new(), Home::new());
    start(&mut enqueuer, &database, 0);
    start(&mut worker, &database, 1);
    enqueuer.enqueue(r#"{"command":"true"}"#);
    worker.wait_for_state("job1", "completed");
    let runs = worker.ok(&["logs", "job1"]);
    assert!(runs.contains("attempt 1"), "{runs}");
}

#[test]
fn a_killed_servers_jobs_are_rescued_by_the_others() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let (mut survivor, mut victim) = (Home::new(), Home::new());
    start(&mut victim, &database, 2);
    let log = victim.file("runs");
    enqueue_tokens(&[&victim], 200, &log, "sleep 0.02; ");
    wait_until("some jobs to complete", DEADLINE, || runs(&log).len() >= 20);
    victim.kill_server();
    start(&mut survivor, &database, 2);
    wait_until("every job to complete", Duration::from_secs(120), || {
        survivor.count("completed") == 200
    });
    assert_eq!(survivor.count("processing"), 0);
    let runs = runs(&log);
    assert_eq!(runs.len(), 200, "no job is lost");
    let twice = runs.values().filter(|&&count| count > 1).count();
    assert!(
        twice <= 2,
        "only the jobs running at the kill may run twice, got {twice}"
    );
}

#[test]
fn a_restarted_server_recovers_its_own_jobs_without_waiting_for_the_lease() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let mut home = Home::new();
    let with_long_lease = |home: &Home, workers: u32| {
        let mut command = home.server_command(workers);
        command
            .env("QUEUECTL_DATABASE_URL", &database.url)
            .env("QUEUECTL_LEASE_TIMEOUT", "3600");
        command
    };
    home.start_server_with(with_long_lease(&home, 1));
    let pids = home.file("pids");
    home.enqueue(&format!(
        r#"{{"command":"sleep 300 & echo $! >> {}; wait"}}"#,
        pids.display()
    ));
    let runs = || std::fs::read_to_string(&pids).unwrap_or_default();
    wait_until("the job to start", DEADLINE, || runs().ends_with('\n'));
    home.kill_server();
    let orphan: u32 = runs().trim().parse().unwrap();
    assert!(common::alive(orphan));
    home.start_server_with(with_long_lease(&home, 1));
    assert!(
        !common::alive(orphan),
        "the restart killed what the old run left"
    );
    wait_until("the job to run again", DEADLINE, || {
        runs().lines().count() == 2
    });
    // Stop without waiting, so that the sleeping job's processes go with the server.
    home.ok(&["config", "set", "shutdown_grace", "0"]);
    assert!(home.stop_server().success());
}

/// How many connections to `database` use TLS right now, as PostgreSQL itself reports them.
fn tls_connections(database: &TestDatabase) -> i64 {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut conn = sqlx::PgConnection::connect(&database.admin_url)
            .await
            .unwrap();
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE ssl AND datname = $1",
        )
        .bind(&database.name)
        .fetch_one(&mut conn)
        .await
        .unwrap()
    })
}

/// Has PostgreSQL close every connection to `database`, as a restart or an idle limit would, and waits until they
/// are gone.
fn close_connections(database: &TestDatabase) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut conn = sqlx::PgConnection::connect(&database.admin_url)
            .await
            .unwrap();
        let closed: Vec<i32> = sqlx::query_scalar(
            // MATERIALIZED: otherwise PostgreSQL may terminate before it filters, this connection too.
            "WITH theirs AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE datname = $1)
             SELECT pid FROM theirs WHERE pg_terminate_backend(pid)",
        )
        .bind(&database.name)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert!(!closed.is_empty(), "the server had no connection to close");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
                    .bind(&closed)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
            if left == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{left} closed connections are still there"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// Connections the database closed while the server waited (a restart of PostgreSQL, an idle limit) cost no
/// request: the next enqueue and claim are written on fresh ones, and the job events go out to the other servers.
#[test]
fn writes_after_the_database_closed_the_servers_connections_succeed() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let mut home = Home::new();
    start(&mut home, &database, 1);
    home.enqueue(r#"{"id":"before","command":"true"}"#);
    wait_until("the first job completed", DEADLINE, || {
        home.count("completed") == 1
    });
    close_connections(&database);
    home.enqueue(r#"{"id":"after","command":"true"}"#);
    wait_until("the second job completed", DEADLINE, || {
        home.count("completed") == 2
    });
    // Nothing failed on the way: a claim of the idle worker's poll that met a closed connection first would
    // have replaced it for the enqueue.
    let log = std::fs::read_to_string(home.file("test-server.log")).unwrap();
    for failure in [
        "could not pass job events on",
        "write failed",
        "claiming jobs failed",
    ] {
        assert!(!log.contains(failure), "{failure}: {log}");
    }
}

/// `sslmode=require` in the URL: the server talks to PostgreSQL over TLS (the local server's certificate is
/// self-signed, which `require` accepts without verifying it).
#[test]
fn the_database_url_can_ask_for_tls() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let mut home = Home::new();
    let mut command = home.server_command(1);
    command.env(
        "QUEUECTL_DATABASE_URL",
        format!("{}?sslmode=require", database.url),
    );
    home.start_server_with(command);
    home.enqueue(r#"{"id":"over-tls","command":"true"}"#);
    home.wait_for_state("over-tls", "completed");
    assert!(
        tls_connections(&database) > 0,
        "the server's connections use TLS"
    );
}

/// A database that cannot be reached, or a URL for another kind of database, is refused at once, saying why.
#[test]
fn a_database_that_cannot_be_reached_is_refused_at_once_saying_why() {
    let home = Home::new();
    for (url, expected) in [
        ("postgres://postgres@127.0.0.1:1/test", "Connection refused"),
        ("mysql://root@127.0.0.1/test", "must start with postgres://"),
    ] {
        let start = std::time::Instant::now();
        let mut command = home.server_command(0);
        command.env("QUEUECTL_DATABASE_URL", url);
        let output = common::output_within(&mut command, DEADLINE);
        assert!(!output.status.success(), "{url}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{url}: {stderr}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{url} took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn backup_on_postgresql_says_to_use_pg_dump_and_writes_nothing() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let mut home = Home::new();
    start(&mut home, &database, 0);
    let copy = home.file("copy.db");
    let output = home.try_queuectl(&["backup", copy.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("pg_dump"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!copy.exists());
    let code = tokio::runtime::Runtime::new().unwrap().block_on(async {
        client(&home)
            .await
            .backup(pb::BackupRequest {
                path: copy.display().to_string(),
            })
            .await
            .unwrap_err()
            .code()
    });
    assert_eq!(code, tonic::Code::FailedPrecondition);
}

/// A claim whose reply never reached its server (the connection was cut after the COMMIT) runs nowhere. Its
/// server's heartbeat renews only what its workers run, so the claim expires within a lease and is handed back,
/// whoever made it, while the job a worker does run keeps its lease.
#[test]
fn a_claim_that_no_worker_runs_expires_even_on_the_server_that_made_it() {
    use queuectl::job::{NewJob, Policy};
    use queuectl::store::{
        Claim, ServerRecord, Store, WorkerRecord, WriteBatch, postgres::PgStore,
    };
    let Some(database) = TestDatabase::create() else {
        return;
    };
    common::runtime().block_on(async {
        let store = PgStore::open(&database.url, Duration::from_secs(1))
            .await
            .unwrap();
        let new_job = |id: &str| NewJob {
            id: Some(id.into()),
            command: "true".into(),
            priority: 5,
            max_retries: 0,
            timeout_secs: None,
            delay: 0,
            after: Vec::new(),
            context: Default::default(),
        };
        let batch = WriteBatch {
            enqueues: vec![vec![new_job("running"), new_job("lost")]],
            claims: vec![Claim::up_to(2)],
            owner: "server-a".into(),
            ..WriteBatch::default()
        };
        let policy = Policy {
            backoff_base: 2,
            aging_interval_secs: 60,
            max_interruptions: 3,
        };
        let written = store.write(Arc::new(batch), 0, policy).await.unwrap();
        assert_eq!(written.claimed[0].len(), 2);
        let record = ServerRecord {
            id: "server-a".into(),
            host: "here".into(),
            pid: 1,
            worker_count: 1,
            workers: vec![WorkerRecord {
                index: 0,
                job_id: Some("running".into()),
                command: Some("true".into()),
                started_at: Some(0),
                stopping: false,
            }],
            seen_at: 0,
        };
        let cluster = store.cluster().expect("PostgreSQL is shared");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let expired = loop {
            let expired = cluster.heartbeat(&record).await.unwrap();
            let ids: Vec<&str> = expired.iter().map(|stale| stale.job.id.as_str()).collect();
            assert!(!ids.contains(&"running"), "a running job kept its lease");
            if !ids.is_empty() {
                break ids.iter().map(ToString::to_string).collect::<Vec<_>>();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the lost claim never expired"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(expired, ["lost"]);
    });
}

/// A TCP proxy in front of PostgreSQL that a test can pause: while paused it forwards nothing either way, as a
/// network partition would, and the connections stay open.
struct Proxy {
    port: u16,
    faults: std::sync::Arc<Faults>,
    _runtime: tokio::runtime::Runtime,
}

/// What the proxy does to the traffic now.
#[derive(Default)]
struct Faults {
    /// Forward nothing, either way.
    paused: std::sync::atomic::AtomicBool,
    /// Forward the next COMMIT to the database, then cut that connection before its reply comes back.
    cut_after_commit: std::sync::atomic::AtomicBool,
    /// How many connections were cut so.
    cuts: std::sync::atomic::AtomicUsize,
}

impl Proxy {
    fn to_postgres(database: &TestDatabase) -> Proxy {
        use std::sync::atomic::AtomicBool;
        let upstream = {
            let host_port = database
                .url
                .split('@')
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .expect("a URL with user@host[:port]/database");
            if host_port.contains(':') {
                host_port.to_owned()
            } else {
                format!("{host_port}:5432")
            }
        };
        // Its own threads: the proxy forwards while the test blocks.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = std::sync::Arc::new(Faults::default());
        let shared = faults.clone();
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let cut = std::sync::Arc::new(AtomicBool::new(false));
                tokio::spawn(pump(
                    client_read,
                    server_write,
                    shared.clone(),
                    cut.clone(),
                    true,
                ));
                tokio::spawn(pump(server_read, client_write, shared.clone(), cut, false));
            }
        });
        Proxy {
            port,
            faults,
            _runtime: runtime,
        }
    }

    /// `url` with the proxy's address in place of the database's, without TLS, so that the proxy can read the
    /// statements it forwards.
    fn url(&self, url: &str) -> String {
        let (scheme_user, rest) = url.split_once('@').unwrap();
        let (_, database) = rest.split_once('/').unwrap();
        format!(
            "{scheme_user}@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    fn pause(&self, paused: bool) {
        self.faults
            .paused
            .store(paused, std::sync::atomic::Ordering::SeqCst);
    }

    fn cut_after_next_commit(&self) {
        self.faults
            .cut_after_commit
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn cuts(&self) -> usize {
        self.faults.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Forwards one direction of one connection. `cut` is that connection's: once set, neither direction forwards
/// anything more, and both close.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: std::sync::Arc<Faults>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    to_database: bool,
) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16384];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        while faults.paused.load(SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if cut.load(SeqCst) {
            return;
        }
        let chunk = &buffer[..read];
        let commit = to_database
            && chunk.windows(6).any(|window| window == b"COMMIT")
            && faults.cut_after_commit.swap(false, SeqCst);
        if commit {
            cut.store(true, SeqCst);
            faults.cuts.fetch_add(1, SeqCst);
        }
        if to.write_all(chunk).await.is_err() || commit {
            return;
        }
    }
}

/// Enqueues through `through` a job whose shell starts a child that sleeps for two minutes, writes the child's
/// pid into a file of `runner`'s home and waits for it; waits until it runs. Returns the file and the child's pid:
/// the job is over only once the processes it started are gone too.
fn run_a_long_job(through: &Home, runner: &Home) -> (std::path::PathBuf, u32) {
    let pid_file = runner.file("job.pid");
    through.enqueue(&format!(
        r#"{{"command":"sleep 120 & echo $! > {}; wait"}}"#,
        pid_file.display()
    ));
    let pid = common::pid_written_to(&pid_file);
    (pid_file, pid)
}

fn health(home: &Home) -> String {
    let output = home.try_queuectl(&["health"]);
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// A server cut off from the database cannot renew its claims, and another server may take its jobs once the
/// lease runs out. So it stops them itself before then (two thirds into the lease), says NOT_SERVING meanwhile,
/// fails requests within seconds instead of hanging on the database, and serves again once the database answers.
#[test]
fn a_server_that_cannot_renew_its_lease_stops_its_jobs_before_the_lease_runs_out() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let proxy = Proxy::to_postgres(&database);
    let mut home = Home::new();
    let mut command = home.server_command(1);
    command
        .env("QUEUECTL_DATABASE_URL", proxy.url(&database.url))
        .env("QUEUECTL_LEASE_TIMEOUT", "6");
    home.start_server_with(command);
    let (pid_file, pid) = run_a_long_job(&home, &home);
    assert!(health(&home).contains("SERVING") && !health(&home).contains("NOT_SERVING"));

    let cut = std::time::Instant::now();
    proxy.pause(true);
    wait_until("the job's processes are gone", DEADLINE, || {
        !common::alive(pid)
    });
    // The lease is 6 s: stopped at 4 s, plus a tick and the kill's grace.
    assert!(
        cut.elapsed() < Duration::from_secs(6),
        "stopped {:?} after the cut, when another server could already have taken it",
        cut.elapsed()
    );
    wait_until("health says NOT_SERVING", DEADLINE, || {
        health(&home).contains("NOT_SERVING")
    });
    // Requests that need the database fail within seconds, saying why, instead of hanging on it.
    for request in [&["status"][..], &["enqueue", r#"{"command":"true"}"#]] {
        let asked = std::time::Instant::now();
        let output = home.try_queuectl(request);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{request:?}: {stderr}");
        assert!(stderr.contains("unavailable"), "{request:?}: {stderr}");
        assert!(
            asked.elapsed() < Duration::from_secs(15),
            "{request:?} took {:?}",
            asked.elapsed()
        );
    }

    proxy.pause(false);
    wait_until("health says SERVING again", DEADLINE, || {
        let health = health(&home);
        health.contains("SERVING") && !health.contains("NOT_SERVING")
    });
    wait_until("the job runs again", DEADLINE, || {
        std::fs::read_to_string(&pid_file)
            .is_ok_and(|again| again.trim().parse::<u32>().is_ok_and(|again| again != pid))
    });
}

/// A reset through one server means the whole cluster: the other servers stop their workers and end their running
/// jobs, and the tables are cleared only after that, so no run of an old job goes on beside the new jobs.
#[test]
fn a_reset_through_one_server_stops_the_jobs_of_every_server_first() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let mut a = Home::new();
    let mut b = Home::new();
    start(&mut a, &database, 0);
    start(&mut b, &database, 1);
    let (_, pid) = run_a_long_job(&a, &b);

    a.ok(&["reset", "--yes"]);
    assert!(
        !common::alive(pid),
        "the job still ran on B after the reset through A"
    );
    assert_eq!(b.count("pending") + b.count("processing"), 0);
    let status = b.ok(&["status"]);
    assert!(status.contains("Workers: 0 (0 busy)"), "{status}");
}

/// A database that holds someone else's tables is refused before anything is created in it, and a database that
/// does not exist is named as such; neither message carries the driver's noise ("at line 1454").
#[test]
fn a_foreign_or_missing_database_is_refused_with_one_clear_line_and_nothing_created() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    admin(
        &database.url,
        "CREATE TABLE jobs (id INT PRIMARY KEY, owner TEXT)",
    );
    let (base, _) = database.url.rsplit_once('/').unwrap();
    let missing = format!("{base}/queuectl_no_such_database");
    let home = Home::new();
    for (url, expected) in [
        (
            database.url.as_str(),
            "already holds tables queuectl did not create (jobs)",
        ),
        (missing.as_str(), "does not exist: create it"),
    ] {
        let mut command = home.server_command(0);
        command.env("QUEUECTL_DATABASE_URL", url);
        let output = common::output_within(&mut command, DEADLINE);
        assert!(!output.status.success(), "{url}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.contains(expected), "{url}: {stderr}");
        assert!(!stderr.contains("at line"), "{url}: {stderr}");
    }
    common::runtime().block_on(async {
        let mut conn = sqlx::PgConnection::connect(&database.url).await.unwrap();
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert_eq!(
            tables,
            ["jobs"],
            "nothing was added to the foreign database"
        );
    });
}

/// A claim whose COMMIT reached the database but whose reply did not reach the server (the connection was cut in
/// between) is a claim that no worker runs. The server's heartbeat renews only what its workers run, so that claim
/// runs out within a lease and the job runs after all, instead of staying `processing` until a restart.
#[test]
fn a_claim_whose_commit_reply_is_lost_runs_after_all() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let proxy = Proxy::to_postgres(&database);
    let mut home = Home::new();
    let mut command = home.server_command(0);
    command
        .env("QUEUECTL_DATABASE_URL", proxy.url(&database.url))
        .env("QUEUECTL_LEASE_TIMEOUT", "4");
    home.start_server_with(command);
    for index in 0..4 {
        home.enqueue(&format!(r#"{{"id":"job-{index}","command":"true"}}"#));
    }
    proxy.cut_after_next_commit();
    home.ok(&["worker", "start", "--count", "1", "--daemon"]);
    wait_until("a COMMIT was cut", DEADLINE, || proxy.cuts() == 1);
    wait_until("every job completed", DEADLINE, || {
        home.count("completed") == 4
    });
    let log = std::fs::read_to_string(home.file("test-server.log")).unwrap_or_default();
    assert!(
        log.contains("claiming jobs failed") || log.contains("claiming the next job failed"),
        "the cut hit a claim: {log}"
    );
}

/// A cancel sent to one server ends the job another server runs, within a second, kills its processes there, and
/// the job never runs again on any server. A pause through one server holds for every server.
#[test]
fn a_cancel_and_a_pause_through_one_server_reach_the_others() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let (mut front, mut runner) = (Home::new(), Home::new());
    start(&mut front, &database, 0);
    start(&mut runner, &database, 1);
    let (_, pid) = run_a_long_job(&front, &runner);
    let asked = std::time::Instant::now();
    front.ok(&["cancel", "job1"]);
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the cancel reached the other server within a second: {took:?}"
    );
    assert_eq!(front.state("job1"), "cancelled");
    wait_until(
        "the job's process to be gone",
        Duration::from_secs(5),
        || !common::alive(pid),
    );

    front.ok(&["pause"]);
    wait_until("the pause to reach the other server", DEADLINE, || {
        runner.ok(&["status"]).contains("Queue: paused")
    });
    runner.stop_server();
    start(&mut runner, &database, 1);
    assert!(
        runner.ok(&["status"]).contains("Queue: paused"),
        "the pause holds across a restart"
    );
    front.enqueue(r#"{"command":"true"}"#);
    let stderr = runner.fails(&["wait", "job2", "--timeout", "1s"]);
    assert!(stderr.contains("still not final"), "{stderr}");
    front.ok(&["resume"]);
    runner.ok(&["wait", "job2"]);
    assert_eq!(front.state("job1"), "cancelled", "never run again");

    // The job runs on the other server: wait and logs -f through this one end when it does, output and all.
    let id = front.enqueue(r#"{"command":"sleep 1; echo done"}"#);
    let waited = common::output_within(&mut front.command(&["wait", &id]), DEADLINE);
    assert!(
        waited.status.success(),
        "{}",
        String::from_utf8_lossy(&waited.stderr)
    );
    let id = front.enqueue(r#"{"command":"sleep 1; echo followed"}"#);
    let followed = common::output_within(&mut front.command(&["logs", &id, "--follow"]), DEADLINE);
    assert!(followed.status.success());
    assert!(
        String::from_utf8_lossy(&followed.stdout).contains("followed\n"),
        "{}",
        String::from_utf8_lossy(&followed.stdout)
    );
}

#[test]
fn a_watcher_of_one_server_sees_what_the_jobs_of_another_do() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let (mut watched, mut runner) = (Home::new(), Home::new());
    start(&mut watched, &database, 0);
    start(&mut runner, &database, 1);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (runner_id, seen) = runtime.block_on(async {
        let runner_id = client(&runner)
            .await
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .servers[0]
            .id
            .clone();
        let mut watcher = client(&watched).await;
        let mut events = watcher
            .watch_events(pb::WatchEventsRequest {
                job_id: "job1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        watcher
            .enqueue(pb::EnqueueRequest {
                command: "exit 3".into(),
                max_retries: Some(0),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut seen = Vec::new();
        tokio::time::timeout(DEADLINE, async {
            while let Some(response) = events.message().await.unwrap() {
                let finished = matches!(
                    response.event,
                    Some(pb::watch_events_response::Event::JobFinished(_))
                );
                seen.push(response);
                if finished {
                    break;
                }
            }
        })
        .await
        .expect("the watcher of the idle server is told the job finished");
        (runner_id, seen)
    });
    use pb::watch_events_response::Event;
    let kinds: Vec<_> = seen
        .iter()
        .map(|response| match &response.event {
            Some(Event::JobPicked(picked)) => {
                format!("picked {} run {}", picked.job_id, picked.run)
            }
            Some(Event::JobFinished(finished)) => format!(
                "finished {} {} {}",
                finished.job_id,
                output_state(finished.state),
                finished.error
            ),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["picked job1 run 1", "finished job1 dead exit:3"]);
    for response in &seen {
        assert_eq!(
            response.server, runner_id,
            "the event names the server that ran the job"
        );
        assert!(response.seq > 0 && response.time.is_some());
    }
}

fn output_state(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Dead) => "dead",
        Ok(pb::JobState::Completed) => "completed",
        _ => "other",
    }
}
