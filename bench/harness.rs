//! Servers on temporary homes, clients on their sockets, and what /proc says about a process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use queuectl::home::{LOG_FILE, SOCKET_FILE, open_private};
use queuectl::pb::queue_service_client::QueueServiceClient;
use queuectl::pb::{self, EnqueueRequest};
use queuectl::runner::BENCH_EXECUTOR_ENV;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

pub type Client = QueueServiceClient<Channel>;

/// How long a server gets to answer after it was started.
const STARTUP_LIMIT: Duration = Duration::from_secs(30);

/// The `queuectld` and `queuectl` binaries built beside this one.
pub struct Bins {
    pub server: PathBuf,
    pub cli: PathBuf,
}

impl Bins {
    pub fn beside_self() -> anyhow::Result<Bins> {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("the benchmark's own folder")?;
        let bins = Bins {
            server: dir.join("queuectld"),
            cli: dir.join("queuectl"),
        };
        for bin in [&bins.server, &bins.cli] {
            anyhow::ensure!(
                bin.exists(),
                "{} is missing: build all binaries first (cargo build --release --bins)",
                bin.display()
            );
        }
        Ok(bins)
    }
}

/// A temporary QUEUECTL_HOME, removed when dropped.
pub struct Home {
    pub path: PathBuf,
}

impl Home {
    pub fn new(name: &str) -> anyhow::Result<Home> {
        use std::os::unix::fs::DirBuilderExt;
        let path =
            std::env::temp_dir().join(format!("queuectl-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Home { path })
    }

    pub fn database(&self) -> PathBuf {
        self.path.join("jobs.db")
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether the server runs commands or pretends to (the benchmark-only no-op executor).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    Shell,
    Noop,
}

/// A `queuectld` this benchmark started, with no workers until asked.
pub struct Server {
    child: Child,
    pub pid: u32,
    pub client: Client,
    socket: PathBuf,
}

/// A fresh PostgreSQL database, created beside the one an admin URL names and dropped by [`Database::drop`].
pub struct Database {
    admin_url: String,
    name: String,
    pub url: String,
}

impl Database {
    pub async fn create(admin_url: &str, name: &str) -> anyhow::Result<Database> {
        let (base, _) = admin_url
            .rsplit_once('/')
            .context("a database URL ends in /<database>")?;
        let name = format!("queuectl_bench_{}_{name}", std::process::id());
        let database = Database {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        };
        database
            .admin(&format!("DROP DATABASE IF EXISTS {}", database.name))
            .await?;
        database
            .admin(&format!("CREATE DATABASE {}", database.name))
            .await?;
        Ok(database)
    }

    pub async fn drop(self) -> anyhow::Result<()> {
        self.admin(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await
    }

    async fn admin(&self, statement: &str) -> anyhow::Result<()> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .with_context(|| format!("connecting to {}", self.admin_url))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(())
    }
}

impl Server {
    /// Starts `queuectld` on `home`, with its SQLite database there or, given `database`, on PostgreSQL.
    pub async fn start(
        bins: &Bins,
        home: &Home,
        executor: Executor,
        database: Option<&Database>,
    ) -> anyhow::Result<Server> {
        let log = open_private(&home.path.join(LOG_FILE))?;
        let mut command = Command::new(&bins.server);
        command
            .arg("--workers=0")
            .env("QUEUECTL_HOME", &home.path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if executor == Executor::Noop {
            command.env(BENCH_EXECUTOR_ENV, "noop");
        }
        match database {
            Some(database) => command.env("QUEUECTL_DATABASE_URL", &database.url),
            None => command.env_remove("QUEUECTL_DATABASE_URL"),
        };
        let child = command.spawn().context("starting queuectld")?;
        let pid = child.id().context("the server's pid")?;
        let socket = home.path.join(SOCKET_FILE);
        let deadline = Instant::now() + STARTUP_LIMIT;
        let client = loop {
            match connect(&socket).await {
                Ok(client) => break client,
                Err(error) if Instant::now() >= deadline => {
                    return Err(error).context("queuectld did not answer");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        Ok(Server {
            child,
            pid,
            client,
            socket,
        })
    }

    /// A new client on its own connection.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        connect(&self.socket).await
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.client.shutdown(pb::ShutdownRequest {}).await?;
        self.child.wait().await?;
        Ok(())
    }

    pub async fn set_workers(&mut self, count: u32) -> anyhow::Result<()> {
        if count == 0 {
            self.client
                .stop_workers(pb::StopWorkersRequest {
                    wait: true,
                    all: false,
                })
                .await?;
        } else {
            self.client
                .start_workers(pb::StartWorkersRequest { count, all: false })
                .await?;
        }
        Ok(())
    }

    pub async fn status(&mut self) -> anyhow::Result<pb::StatusResponse> {
        Ok(self.client.status(pb::StatusRequest {}).await?.into_inner())
    }
}

async fn connect(socket: &Path) -> anyhow::Result<Client> {
    let channel = queuectl::channel::unix(socket.to_owned()).await?;
    Ok(QueueServiceClient::new(channel))
}

pub fn job(command: &str) -> EnqueueRequest {
    EnqueueRequest {
        command: command.to_owned(),
        ..EnqueueRequest::default()
    }
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    ticks_of(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

/// CPU time (user + system) each thread of a process has used so far, summed by thread name (tokio's workers
/// share one name; SQLite's writer has its own, sqlx's reader threads another).
pub fn thread_cpu_times(pid: u32) -> anyhow::Result<std::collections::BTreeMap<String, Duration>> {
    let mut times = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        // A thread that ended meanwhile has no stat any more; its time is lost to both readings alike.
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else {
            continue;
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map_or("?", |(name, _)| name)
            .to_owned();
        *times.entry(name).or_default() += ticks_of(&stat)?;
    }
    Ok(times)
}

fn ticks_of(stat: &str) -> anyhow::Result<Duration> {
    // The command name may hold spaces; the fields after it do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("a /proc stat line")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf only reads a system constant.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })?;
    Ok(Duration::from_micros(ticks * 1_000_000 / per_second))
}

/// Resident memory of a process, in bytes.
pub fn resident_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .context("VmRSS in /proc status")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()?;
    Ok(kib * 1024)
}

/// The value at `quantile` (0-1) of `samples`, which it sorts.
pub fn percentile(samples: &mut [f64], quantile: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    if samples.is_empty() {
        return f64::NAN;
    }
    let rank = ((samples.len() - 1) as f64 * quantile).round() as usize;
    samples[rank]
}
