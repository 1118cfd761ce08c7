//! `queuectld`: the queuectl server.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use queuectl::server::{self, Listen, Options};

/// The queuectl server: stores jobs in SQLite and runs them on its workers.
///
/// Listens on a Unix socket in QUEUECTL_HOME that only its owner can reach. Logs go to stderr
/// (RUST_LOG=debug for more). SIGTERM or `queuectl server stop` drains it: running jobs get the
/// shutdown_grace setting to finish, then return to the queue.
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:\n  queuectld --workers 4\n  QUEUECTL_HOME=/srv/queue queuectld"
)]
struct Args {
    /// Jobs run at once; `queuectl worker start --count N` changes it later.
    #[arg(long, default_value_t = 0)]
    workers: u32,
    /// The folder with the database and the socket.
    #[arg(long, env = "QUEUECTL_HOME")]
    home: Option<PathBuf>,
    /// Listen on TCP at this loopback address (http://127.0.0.1:PORT) instead of the socket;
    /// clients then need the token the server writes to QUEUECTL_HOME/token.
    #[arg(long, value_name = "URL")]
    listen: Option<String>,
    /// Keep the queue in this PostgreSQL database (postgres://...), shared with other queuectld
    /// servers, instead of SQLite in QUEUECTL_HOME. The URL can hold a password: prefer the variable.
    #[arg(
        long,
        env = "QUEUECTL_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// With PostgreSQL: seconds after its last heartbeat before another server takes over a
    /// server's running jobs.
    #[arg(long, env = "QUEUECTL_LEASE_TIMEOUT", default_value_t = 30, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    lease_timeout: u64,
    /// With --listen: serve TLS with this certificate (PEM); needs --tls-key.
    #[arg(long, value_name = "PATH", requires_all = ["tls_key", "listen"])]
    tls_cert: Option<PathBuf>,
    /// With --listen: the private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With --listen: allow a non-loopback address without TLS. Anyone who can listen on that
    /// network sees the token and can then run commands as you.
    #[arg(long, requires = "listen")]
    insecure_allow_remote: bool,
    /// Serve Prometheus metrics at http://ADDRESS/metrics (e.g. 127.0.0.1:9464). Off by default; a
    /// non-loopback address needs --metrics-allow-remote.
    #[arg(long, value_name = "ADDRESS")]
    metrics_listen: Option<SocketAddr>,
    /// With --metrics-listen: allow a non-loopback address. Metrics need no token: whoever reaches
    /// the port sees job counts, durations and worker activity (no commands, ids or output).
    #[arg(long, requires = "metrics_listen")]
    metrics_allow_remote: bool,
    /// `text` for people (without timestamps when journald adds its own), `json` for log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().init(),
        // Under systemd, journald stamps each line itself and shows no colours.
        LogFormat::Text if std::env::var_os("JOURNAL_STREAM").is_some() => {
            logs.without_time().with_ansi(false).init();
        }
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn parse_listen(url: &str) -> anyhow::Result<Listen> {
    let address = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    let address: SocketAddr = address.parse().map_err(|_| {
        anyhow::anyhow!("--listen must look like http://127.0.0.1:7070, got {url:?}")
    })?;
    Ok(Listen::Tcp(address))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    let listen = match &args.listen {
        Some(url) => parse_listen(url)?,
        None => Listen::default(),
    };
    let options = Options {
        home: args.home.unwrap_or_else(queuectl::home::default_home),
        workers: args.workers,
        listen,
        database_url: args.database_url,
        lease: std::time::Duration::from_secs(args.lease_timeout),
        metrics: args.metrics_listen,
        metrics_allow_remote: args.metrics_allow_remote,
        tls: args.tls_cert.zip(args.tls_key),
        insecure_allow_remote: args.insecure_allow_remote,
    };
    if let Err(error) = server::run(options).await {
        tracing::error!(%error, "queuectld failed");
        eprintln!("queuectld: {error}");
        std::process::exit(1);
    }
    Ok(())
}
