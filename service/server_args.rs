//! `queuectld`'s command line, as clap parses it. It lives in the library, not beside `main`, so that
//! `queuectl man` renders the page of `queuectld` from the same definitions as `queuectld --help`.
//!
//! A paragraph of `after_help` that starts with a heading (`Examples:`) and goes on with indented lines becomes a
//! section of the man page (EXAMPLES); keep each line within 80 columns, so that `--help` never wraps one, and an
//! example within 75 (73 after its indent), so that it fits beside the margin of the man page too.

use std::net::SocketAddr;
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Examples:
  queuectld --workers 4
  QUEUECTL_HOME=/srv/queue queuectld
  QUEUECTL_DATABASE_URL=postgres://queue@db/queue queuectld --workers 4
  queuectld --listen http://127.0.0.1:7070 --metrics-listen 127.0.0.1:9464

Environment:
  QUEUECTL_HOME           as --home (default ~/.queuectl)
  QUEUECTL_DATABASE_URL   as --database-url
  QUEUECTL_LEASE_TIMEOUT  as --lease-timeout
  QUEUECTL_CGROUPS        off: end what a run leaves by its tag, not its cgroup
  QUEUECTL_JOB            set for every job: its id and run (job7#2)
  QUEUECTL_GATE           set for a job's shell only: the server's id
  RUST_LOG                what the log shows: info (default), debug, ...
QUEUECTL_TOKEN and QUEUECTL_DATABASE_URL are removed from every job's
environment. QUEUECTL_TEST_CLOCK_OFFSET and QUEUECTL_BENCH_EXECUTOR serve
queuectl's own tests and benchmark: never set them.

Exit status:
  0  stopped cleanly: SIGTERM, Ctrl-C or queuectl server stop
  1  it could not start, or failed while it ran; its last line says why
  2  bad usage";

/// The queuectl server: stores jobs in SQLite (or PostgreSQL) and runs them on its workers.
///
/// Listens on a Unix socket in QUEUECTL_HOME that only its owner can reach. Logs go to stderr
/// (RUST_LOG=debug for more). SIGTERM or `queuectl server stop` drains it: running jobs get the
/// shutdown_grace setting to finish, then return to the queue.
#[derive(clap::Parser)]
#[command(name = "queuectld", version, after_help = AFTER_HELP)]
pub struct ServerArgs {
    /// Jobs run at once; `queuectl worker start --count N` changes it later.
    #[arg(long, default_value_t = 0)]
    pub workers: u32,
    /// The folder with the database and the socket.
    #[arg(long, env = "QUEUECTL_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Listen on TCP at this loopback address (http://127.0.0.1:PORT) instead of the socket;
    /// clients then need the token the server writes to QUEUECTL_HOME/token.
    #[arg(long, value_name = "URL")]
    pub listen: Option<String>,
    /// Keep the queue in this PostgreSQL database (postgres://...), shared with other queuectld
    /// servers, instead of SQLite in QUEUECTL_HOME. The URL can hold a password: prefer the variable.
    #[arg(
        long,
        env = "QUEUECTL_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// With PostgreSQL: seconds after its last heartbeat before another server takes over a
    /// server's running jobs.
    #[arg(long, env = "QUEUECTL_LEASE_TIMEOUT", default_value_t = 30, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub lease_timeout: u64,
    /// With --listen: serve TLS with this certificate (PEM); needs --tls-key.
    #[arg(long, value_name = "PATH", requires_all = ["tls_key", "listen"])]
    pub tls_cert: Option<PathBuf>,
    /// With --listen: the private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With --listen: allow a non-loopback address without TLS. Anyone who can listen on that
    /// network sees the token and can then run commands as you.
    #[arg(long, requires = "listen")]
    pub insecure_allow_remote: bool,
    /// Serve Prometheus metrics at http://ADDRESS/metrics (e.g. 127.0.0.1:9464). Off by default; a
    /// non-loopback address needs --metrics-allow-remote.
    #[arg(long, value_name = "ADDRESS")]
    pub metrics_listen: Option<SocketAddr>,
    /// With --metrics-listen: allow a non-loopback address. Metrics need no token: whoever reaches
    /// the port sees job counts, durations and worker activity (no commands, ids or output).
    #[arg(long, requires = "metrics_listen")]
    pub metrics_allow_remote: bool,
    /// `text` for people (without timestamps when journald adds its own), `json` for log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people.
    Text,
    /// One JSON object per line.
    Json,
}
