//! `queuectld`: the queuectl server.

use std::net::SocketAddr;

use clap::Parser;
use queuectl::server::{self, Listen, Options};
use queuectl::server_args::{LogFormat, ServerArgs};

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

/// Caps glibc's malloc arenas at two. By default each thread that allocates may get an arena of its own (up to
/// eight per CPU), and keeps what it freed: the threads that start job shells come and go, and their arenas
/// added about 2 MB to an idle server for nothing on two CPUs.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt(3) only sets a tunable of the allocator; called before the threads that allocate much.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let args = ServerArgs::parse();
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
