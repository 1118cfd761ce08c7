//! `queuectl-bench`: measures a real `queuectld` against the limits of the machine it runs on, in one run.
//!
//! It starts its own servers on temporary QUEUECTL_HOMEs (the `queuectld` and `queuectl` next to its own
//! executable), talks gRPC to them over their sockets, and prints one table in which each figure stands beside
//! the limit it is measured against. See BENCHMARKS.md for what each figure means.

#[cfg(unix)]
mod harness;
#[cfg(unix)]
mod measure;

#[cfg(unix)]
use clap::Parser;

/// Benchmarks queuectld: spawn ceiling, drain, queue core, pickup latency, enqueue, CLI, idle cost and scale.
#[cfg(unix)]
#[derive(Parser, Debug)]
#[command(
    after_help = "Examples:\n  queuectl-bench\n  queuectl-bench --quick\n  queuectl-bench --database-url postgres://postgres@127.0.0.1/test"
)]
pub struct Args {
    /// Small counts and short waits, to check that the benchmark works (as CI does); the figures mean little.
    #[arg(long)]
    pub quick: bool,
    /// Workers of the server, and the parallelism of the spawn ceiling. Default: the number of CPUs.
    #[arg(long)]
    pub workers: Option<u32>,
    /// Workers of the server in the queue-core figure, where a job costs no process.
    #[arg(long, default_value_t = 64)]
    pub noop_workers: u32,
    /// Jobs already stored for the scale figures. Default: 1,000,000 (10,000 with --quick).
    #[arg(long)]
    pub stored_jobs: Option<u64>,
    /// Also measure on PostgreSQL: a database URL whose user may create databases (each server gets a fresh one,
    /// dropped afterwards), e.g. postgres://postgres@127.0.0.1/test.
    #[arg(long, env = "QUEUECTL_BENCH_DATABASE_URL")]
    pub database_url: Option<String>,
}

#[cfg(unix)]
fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(measure::run(args))
}

#[cfg(not(unix))]
fn main() {
    eprintln!(
        "queuectl-bench talks to the server's Unix socket and reads /proc: it runs on Linux only"
    );
    std::process::exit(2);
}
