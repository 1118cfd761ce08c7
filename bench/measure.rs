//! The measurements, in the order the table shows them, and the table.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use queuectl::pb::{self, watch_events_response::Event};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use crate::Args;
use crate::harness::{
    Bins, Client, Database, Executor, Home, Server, cpu_time, job, percentile, resident_bytes,
    thread_cpu_times,
};

/// The second drain's worker count: more workers than cores, as a busy server runs.
const WIDE_WORKERS: u32 = 8;

/// How many of everything one run measures.
struct Counts {
    workers: u32,
    noop_workers: u32,
    drain_jobs: u64,
    latency_jobs: usize,
    single_rpcs: u64,
    batches: u64,
    cli_runs: usize,
    idle: Duration,
    stored_jobs: u64,
    reads: usize,
    /// Bytes the job of figure 11 prints.
    flood_bytes: u64,
}

impl Counts {
    fn of(args: &Args) -> Counts {
        let cpus = std::thread::available_parallelism().map_or(1, |cpus| cpus.get());
        let workers = args
            .workers
            .unwrap_or(u32::try_from(cpus).unwrap_or(u32::MAX));
        if args.quick {
            return Counts {
                workers,
                noop_workers: args.noop_workers,
                drain_jobs: 300,
                latency_jobs: 20,
                single_rpcs: 320,
                batches: 3,
                cli_runs: 5,
                idle: Duration::from_secs(2),
                stored_jobs: args.stored_jobs.unwrap_or(10_000),
                reads: 5,
                flood_bytes: 100_000_000,
            };
        }
        Counts {
            workers,
            noop_workers: args.noop_workers,
            drain_jobs: 10_000,
            latency_jobs: 300,
            single_rpcs: 6_400,
            batches: 30,
            cli_runs: 50,
            idle: Duration::from_secs(30),
            stored_jobs: args.stored_jobs.unwrap_or(1_000_000),
            reads: 50,
            flood_bytes: 2_000_000_000,
        }
    }
}

/// One line of the table: what was measured, the figure, and what it stands against.
struct Line {
    what: String,
    figure: String,
    against: String,
}

struct Table(Vec<Line>);

impl Table {
    fn add(&mut self, what: impl Into<String>, figure: String, against: String) {
        let line = Line {
            what: what.into(),
            figure,
            against,
        };
        eprintln!("  {}: {}  ({})", line.what, line.figure, line.against);
        self.0.push(line);
    }

    /// Prints the lines in figure order; `add` numbers each line's text by its figure.
    fn print(&mut self) {
        self.0
            .sort_by_key(|line| line.what.split('.').next().map(str::to_owned));
        let what = self.0.iter().map(|line| line.what.len()).max().unwrap_or(0);
        let figure = self
            .0
            .iter()
            .map(|line| line.figure.len())
            .max()
            .unwrap_or(0);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "| {:what$} | {:>figure$} | against |",
            "figure", "value"
        );
        let _ = writeln!(
            out,
            "|{}|{}|---|",
            "-".repeat(what + 2),
            "-".repeat(figure + 2)
        );
        for line in &self.0 {
            let _ = writeln!(
                out,
                "| {:what$} | {:>figure$} | {} |",
                line.what, line.figure, line.against
            );
        }
    }
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

fn per_second(value: f64) -> String {
    format!("{value:.0} jobs/s")
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn goal(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let counts = Counts::of(&args);
    let bins = Bins::beside_self()?;
    let mut table = Table(Vec::new());
    let workers = counts.workers;

    eprintln!("measuring the machine's limits");
    let ceiling = spawn_ceiling(workers, counts.drain_jobs).await?;
    table.add(
        format!("1. spawn ceiling: `sh -c true`, {workers} at once"),
        per_second(ceiling),
        "the limit for figure 2".into(),
    );
    let fsync = fsync_time(&Home::new("fsync")?, counts.cli_runs.max(20))?;

    eprintln!("small database");
    let home = Home::new("small")?;
    let mut server = Server::start(&bins, &home, Executor::Shell, None).await?;
    let small = Figures::measure(&mut server, &counts).await?;
    small.report(&mut table, "", ceiling, fsync, None);
    let wide = WIDE_WORKERS.max(workers);
    let wide_ceiling = spawn_ceiling(wide, counts.drain_jobs).await?;
    let wide_drain = drain(&mut server, counts.drain_jobs, wide).await?.rate;
    table.add(
        format!("1. spawn ceiling: `sh -c true`, {wide} at once"),
        per_second(wide_ceiling),
        format!("the limit for figure 2 at {wide} workers"),
    );
    table.add(
        format!(
            "2. drain: {} `true` jobs, {wide} workers",
            counts.drain_jobs
        ),
        per_second(wide_drain),
        format!(
            "{:.2} of the spawn ceiling at {wide}, goal >= 0.9: {}",
            wide_drain / wide_ceiling,
            goal(wide_drain / wide_ceiling >= 0.9)
        ),
    );

    let idle = idle_cost(&mut server, workers, counts.idle).await?;
    let cpu_per_minute = idle.cpu.as_secs_f64() * 60.0 / counts.idle.as_secs_f64();
    table.add(
        format!(
            "7. idle server, {workers} idle workers, {}s: CPU",
            counts.idle.as_secs()
        ),
        format!("{:.3} s/min", cpu_per_minute),
        format!("goal < 0.1 s/min: {}", goal(cpu_per_minute < 0.1)),
    );
    let rss_mb = idle.rss as f64 / 1_048_576.0;
    table.add(
        "7. idle server: RSS",
        format!("{rss_mb:.1} MB"),
        format!("goal < 30 MB: {}", goal(rss_mb < 30.0)),
    );

    let flood = output_flood(&mut server, counts.flood_bytes).await?;
    table.add(
        format!(
            "11. one job printing {} MB at max_output_bytes 64 MiB: server RSS",
            counts.flood_bytes / 1_000_000
        ),
        format!("{:.1} MB", flood.peak as f64 / 1_048_576.0),
        format!(
            "peak; {:.1} MB before; {:.0} MB/s stored; goal < 100 MB: {}",
            flood.before as f64 / 1_048_576.0,
            counts.flood_bytes as f64 / 1_000_000.0 / flood.elapsed.as_secs_f64(),
            goal((flood.peak as f64) < 100.0 * 1_048_576.0)
        ),
    );

    let cli = cli_wall(&bins, &home, counts.cli_runs).await?;
    table.add(
        format!(
            "6. `queuectl enqueue` wall time, median of {}",
            counts.cli_runs
        ),
        format!("{:.2} ms", millis(cli)),
        format!(
            "fsync {:.2} ms; goal < 10 ms: {}",
            millis(fsync),
            goal(millis(cli) < 10.0)
        ),
    );
    server.stop().await?;
    drop(home);

    eprintln!("queue core: no-op executor");
    let home = Home::new("noop")?;
    let mut server = Server::start(&bins, &home, Executor::Noop, None).await?;
    let core = drain(&mut server, counts.drain_jobs, counts.noop_workers)
        .await?
        .rate;
    // The same at the drain's parallelism: what the queue alone costs each job of figure 2.
    let narrow = drain(&mut server, counts.drain_jobs, workers).await?;
    server.stop().await?;
    drop(home);
    table.add(
        format!(
            "3. queue core: {} no-op jobs, {} workers",
            counts.drain_jobs, counts.noop_workers
        ),
        per_second(core),
        format!(
            "{:.1}x figure 2; goal >= 50000 jobs/s: {}",
            core / small.drain,
            goal(core >= 50_000.0)
        ),
    );
    let per_job = |rate: f64| f64::from(workers) * 1000.0 / rate;
    table.add(
        format!(
            "3. queue core: {} no-op jobs, {workers} workers",
            counts.drain_jobs
        ),
        per_second(narrow.rate),
        format!(
            "{:.2} ms of queue per job and worker, of {:.2} ms in figure 2 (spawn alone: {:.2} ms)",
            per_job(narrow.rate),
            per_job(small.drain),
            per_job(ceiling)
        ),
    );
    let (total, split) = cpu_split(&narrow.cpu_per_job);
    table.add(
        "3. server CPU per job with no process to spawn, by thread",
        format!("{total:.0} µs"),
        format!("{split}; goal < 100 µs: {}", goal(total < 100.0)),
    );

    eprintln!("large database: {} jobs stored", counts.stored_jobs);
    let home = Home::new("large")?;
    Server::start(&bins, &home, Executor::Shell, None)
        .await?
        .stop()
        .await?;
    let filled = Instant::now();
    fill(&home, counts.stored_jobs).await?;
    eprintln!("  filled in {:.1}s", filled.elapsed().as_secs_f64());
    let mut server = Server::start(&bins, &home, Executor::Shell, None).await?;
    let large = Figures::measure(&mut server, &counts).await?;
    large.report(
        &mut table,
        &format!(" [{} stored]", counts.stored_jobs),
        ceiling,
        fsync,
        Some(&small),
    );
    let not_due = counts.stored_jobs - counts.stored_jobs / 10 * 9;
    run_backlog(&mut server, counts.workers, not_due).await?;
    purge_while_picking_up(&mut server, &counts, &large.pickup, &mut table).await?;
    server.stop().await?;
    drop(home);

    if let Some(url) = &args.database_url {
        postgres(&bins, &counts, url, &mut table, small.drain, core).await?;
    }

    println!();
    table.print();
    Ok(())
}

/// Figure 9: drain, queue core and pickup latency on PostgreSQL, beside the same figures on SQLite; and pickup
/// across two servers of one database, one enqueueing and the other running the jobs.
async fn postgres(
    bins: &Bins,
    counts: &Counts,
    url: &str,
    table: &mut Table,
    sqlite_drain: f64,
    sqlite_core: f64,
) -> anyhow::Result<()> {
    eprintln!("PostgreSQL");
    let database = Database::create(url, "shell").await?;
    let home = Home::new("pg-shell")?;
    let mut server = Server::start(bins, &home, Executor::Shell, Some(&database)).await?;
    let drained = drain(&mut server, counts.drain_jobs, counts.workers)
        .await?
        .rate;
    let enqueuer = server.connect().await?;
    let mut same = pickup_latency(&mut server, enqueuer, counts.workers, counts.latency_jobs)
        .await?
        .pickup;
    let other_home = Home::new("pg-other")?;
    let other = Server::start(bins, &other_home, Executor::Shell, Some(&database)).await?;
    let enqueuer = other.connect().await?;
    let mut across = pickup_latency(&mut server, enqueuer, counts.workers, counts.latency_jobs)
        .await?
        .pickup;
    other.stop().await?;
    server.stop().await?;
    database.drop().await?;

    let database = Database::create(url, "noop").await?;
    let home = Home::new("pg-noop")?;
    let mut server = Server::start(bins, &home, Executor::Noop, Some(&database)).await?;
    let core = drain(&mut server, counts.drain_jobs, counts.noop_workers)
        .await?
        .rate;
    server.stop().await?;
    database.drop().await?;

    table.add(
        format!(
            "9. PostgreSQL drain: {} `true` jobs, {} workers",
            counts.drain_jobs, counts.workers
        ),
        per_second(drained),
        format!(
            "{:.2}x figure 2 (SQLite), goal >= 0.9: {}",
            drained / sqlite_drain,
            goal(drained / sqlite_drain >= 0.9)
        ),
    );
    table.add(
        format!(
            "9. PostgreSQL queue core: {} no-op jobs, {} workers",
            counts.drain_jobs, counts.noop_workers
        ),
        per_second(core),
        format!(
            "{:.2}x figure 3 (SQLite); goal >= 15000 jobs/s: {}",
            core / sqlite_core,
            goal(core >= 15_000.0)
        ),
    );
    let (p50, p99) = (percentile(&mut same, 0.5), percentile(&mut same, 0.99));
    table.add(
        format!(
            "9. PostgreSQL pickup latency p50 / p99, one server, {} jobs",
            counts.latency_jobs
        ),
        format!("{p50:.2} / {p99:.2} ms"),
        "figure 4 on PostgreSQL".into(),
    );
    let (p50, p99) = (percentile(&mut across, 0.5), percentile(&mut across, 0.99));
    table.add(
        format!(
            "9. PostgreSQL pickup latency p50 / p99, enqueued on A, run on B, {} jobs",
            counts.latency_jobs
        ),
        format!("{p50:.2} / {p99:.2} ms"),
        format!("goal p50 < 5 ms: {}", goal(p50 < 5.0)),
    );
    Ok(())
}

/// The figures measured on both the small and the large database.
struct Figures {
    drain: f64,
    drain_cpu: BTreeMap<String, Duration>,
    pickup: Latencies,
    single: f64,
    concurrent: f64,
    batch: f64,
    status: Duration,
    list: Duration,
    jobs: u64,
    workers: u32,
    latency_jobs: usize,
}

impl Figures {
    async fn measure(server: &mut Server, counts: &Counts) -> anyhow::Result<Figures> {
        let drained = drain(server, counts.drain_jobs, counts.workers).await?;
        let enqueuer = server.connect().await?;
        let pickup = pickup_latency(server, enqueuer, counts.workers, counts.latency_jobs).await?;
        let single = enqueue_singles(server, 1, counts.single_rpcs / 4).await?;
        let concurrent = enqueue_singles(server, 32, counts.single_rpcs).await?;
        let batch = enqueue_batches(server, counts.batches).await?;
        let status = read_time(counts.reads, async || {
            server.status().await?;
            Ok(())
        })
        .await?;
        let list = read_time(counts.reads, async || {
            server
                .client
                .list(pb::ListRequest {
                    page_size: 1000,
                    ..pb::ListRequest::default()
                })
                .await?;
            Ok(())
        })
        .await?;
        Ok(Figures {
            drain: drained.rate,
            drain_cpu: drained.cpu_per_job,
            pickup,
            single,
            concurrent,
            batch,
            status,
            list,
            jobs: counts.drain_jobs,
            workers: counts.workers,
            latency_jobs: counts.latency_jobs,
        })
    }

    fn report(
        &self,
        table: &mut Table,
        suffix: &str,
        ceiling: f64,
        fsync: Duration,
        small: Option<&Figures>,
    ) {
        // On the large database each figure also stands against the same figure on the small one.
        let versus = |large: f64, small: Option<f64>, higher_is_better: bool| match small {
            Some(small) => {
                let slower = if higher_is_better {
                    small / large
                } else {
                    large / small
                };
                format!(
                    "; {slower:.2}x slower than small db, goal <= 1.5x: {}",
                    goal(slower <= 1.5)
                )
            }
            None => String::new(),
        };
        let ratio = self.drain / ceiling;
        table.add(
            format!(
                "2. drain: {} `true` jobs, {} workers{suffix}",
                self.jobs, self.workers
            ),
            per_second(self.drain),
            format!(
                "{ratio:.2} of figure 1, goal >= 0.9: {}{}",
                goal(ratio >= 0.9),
                versus(self.drain, small.map(|small| small.drain), true)
            ),
        );
        let (total, split) = cpu_split(&self.drain_cpu);
        table.add(
            format!("2. server CPU per job in that drain, by thread{suffix}"),
            format!("{total:.0} µs"),
            format!("{split}; spawning each job's shell included"),
        );
        let mut pickup = self.pickup.pickup.clone();
        let (p50, p99) = (percentile(&mut pickup, 0.5), percentile(&mut pickup, 0.99));
        let small_p50 = small.map(|small| percentile(&mut small.pickup.pickup.clone(), 0.5));
        table.add(
            format!(
                "4. pickup latency p50 / p99, {} jobs{suffix}",
                self.latency_jobs
            ),
            format!("{p50:.2} / {p99:.2} ms"),
            format!(
                "goal < 2 / < 10 ms: {}{}",
                goal(p50 < 2.0 && p99 < 10.0),
                versus(p50, small_p50, false)
            ),
        );
        table.add(
            format!("5. enqueue, 1 client, single RPCs{suffix}"),
            per_second(self.single),
            format!(
                "one fsync per commit: {:.0} commits/s{}",
                1.0 / fsync.as_secs_f64(),
                versus(self.single, small.map(|small| small.single), true)
            ),
        );
        table.add(
            format!("5. enqueue, 32 clients, single RPCs{suffix}"),
            per_second(self.concurrent),
            format!(
                "goal >= 5000 jobs/s: {}{}",
                goal(self.concurrent >= 5000.0),
                versus(self.concurrent, small.map(|small| small.concurrent), true)
            ),
        );
        table.add(
            format!("5. enqueue, batch RPCs of 1000{suffix}"),
            per_second(self.batch),
            format!(
                "goal >= 50000 jobs/s: {}{}",
                goal(self.batch >= 50_000.0),
                versus(self.batch, small.map(|small| small.batch), true)
            ),
        );
        table.add(
            format!("8. `status` RPC, median{suffix}"),
            format!("{:.2} ms", millis(self.status)),
            format!("goal < 50 ms: {}", goal(millis(self.status) < 50.0)),
        );
        table.add(
            format!("8. first page (1000 jobs) of `list` RPC, median{suffix}"),
            format!("{:.2} ms", millis(self.list)),
            format!("goal < 50 ms: {}", goal(millis(self.list) < 50.0)),
        );
    }
}

/// Spawns `sh -c true` `total` times, `parallelism` at a time, set up as the runner sets up a job.
async fn spawn_ceiling(parallelism: u32, total: u64) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let loops: Vec<_> = (0..parallelism)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let mut shell = std::process::Command::new("/bin/sh");
                    shell.arg("-c").arg("true").process_group(0);
                    tokio::process::Command::from(shell)
                        .stdin(Stdio::null())
                        .kill_on_drop(true)
                        .output()
                        .await?;
                }
                Ok::<_, std::io::Error>(())
            })
        })
        .collect();
    for spawner in loops {
        spawner.await??;
    }
    Ok(rate(total, start.elapsed()))
}

/// The median time of one fsync of a small write, in `home`'s file system.
fn fsync_time(home: &Home, samples: usize) -> anyhow::Result<Duration> {
    let mut file = std::fs::File::create(home.path.join("probe"))?;
    let mut times: Vec<f64> = (0..samples)
        .map(|_| {
            let start = Instant::now();
            file.write_all(&[0u8; 512])?;
            file.sync_data()?;
            Ok(start.elapsed().as_secs_f64())
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Duration::from_secs_f64(percentile(&mut times, 0.5)))
}

/// What a drain measured: its rate, and the server's CPU time per job by thread name.
struct Drained {
    rate: f64,
    cpu_per_job: BTreeMap<String, Duration>,
}

/// Enqueues `jobs` jobs with no worker running, then starts `workers` and times until all of them completed.
async fn drain(server: &mut Server, jobs: u64, workers: u32) -> anyhow::Result<Drained> {
    server.set_workers(0).await?;
    let mut left = jobs;
    while left > 0 {
        let size = left.min(1000);
        server
            .client
            .enqueue_batch(pb::EnqueueBatchRequest {
                jobs: (0..size).map(|_| job("true")).collect(),
            })
            .await?;
        left -= size;
    }
    let before = server.status().await?.completed;
    let cpu_before = thread_cpu_times(server.pid)?;
    let start = Instant::now();
    server.set_workers(workers).await?;
    loop {
        if server.status().await?.completed - before >= jobs {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed();
    let mut cpu_per_job = thread_cpu_times(server.pid)?;
    for (thread, used) in &mut cpu_per_job {
        let earlier = cpu_before.get(thread).copied().unwrap_or_default();
        *used = used.saturating_sub(earlier) / u32::try_from(jobs).unwrap_or(u32::MAX);
    }
    cpu_per_job.retain(|_, used| !used.is_zero());
    server.set_workers(0).await?;
    Ok(Drained {
        rate: rate(jobs, elapsed),
        cpu_per_job,
    })
}

/// `cpu` per job as "total µs (thread a µs, thread b µs, ...)", the largest first.
fn cpu_split(cpu: &BTreeMap<String, Duration>) -> (f64, String) {
    let mut threads: Vec<(&String, &Duration)> = cpu.iter().collect();
    threads.sort_by(|a, b| b.1.cmp(a.1));
    let total: f64 = threads
        .iter()
        .map(|(_, used)| used.as_secs_f64() * 1e6)
        .sum();
    let split = threads
        .iter()
        .map(|(thread, used)| format!("{thread} {:.0} µs", used.as_secs_f64() * 1e6))
        .collect::<Vec<_>>()
        .join(", ");
    (total, split)
}

fn unix_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as i128)
}

/// Milliseconds per job of a pickup-latency run.
struct Latencies {
    /// From the Enqueue reply to the start of the job.
    pickup: Vec<f64>,
    /// From the Enqueue request to its reply: the durable acknowledgement.
    acknowledged: Vec<f64>,
    /// From the Enqueue request to the event that the job finished: the whole round, four commits.
    round: Vec<f64>,
}

/// With `workers` idle on `server`, enqueues through `enqueuer` (a client of `server`, or of another server of the
/// same database) one job at a time that prints the time it started, and returns the times from each Enqueue
/// reply to that start, and from each request to its reply.
async fn pickup_latency(
    server: &mut Server,
    mut enqueuer: Client,
    workers: u32,
    jobs: usize,
) -> anyhow::Result<Latencies> {
    server.set_workers(workers).await?;
    let mut events = server
        .client
        .watch_events(pb::WatchEventsRequest::default())
        .await?
        .into_inner();
    let mut latencies = Latencies {
        pickup: Vec::with_capacity(jobs),
        acknowledged: Vec::with_capacity(jobs),
        round: Vec::with_capacity(jobs),
    };
    for _ in 0..jobs {
        // Workers are idle between jobs, as a queue that waits for work is.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let asked = unix_nanos();
        let reply = enqueuer
            .enqueue(job("date +%s%N"))
            .await?
            .into_inner()
            .job
            .context("the enqueued job")?;
        let replied = unix_nanos();
        let mut started = None;
        loop {
            let message = events.message().await?.context("the event stream ended")?;
            match message.event {
                Some(Event::JobOutput(output)) if output.job_id == reply.id => {
                    started = Some(
                        String::from_utf8_lossy(&output.data)
                            .trim()
                            .parse::<i128>()?,
                    );
                }
                Some(Event::JobFinished(finished)) if finished.job_id == reply.id => break,
                _ => {}
            }
        }
        let started = started.context("the job printed no time")?;
        latencies.pickup.push((started - replied) as f64 / 1e6);
        latencies.acknowledged.push((replied - asked) as f64 / 1e6);
        latencies.round.push((unix_nanos() - asked) as f64 / 1e6);
    }
    server.set_workers(0).await?;
    Ok(latencies)
}

/// Runs the jobs that the enqueue figures left pending, so that later samples do not queue behind them: until only
/// the `not_due` jobs of the fill wait and none runs.
async fn run_backlog(server: &mut Server, workers: u32, not_due: u64) -> anyhow::Result<()> {
    server.set_workers(workers).await?;
    loop {
        let status = server.status().await?;
        if status.processing == 0 && status.pending <= not_due {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.set_workers(0).await?;
    Ok(())
}

/// Figure 10: pickup latency and the enqueue's acknowledgement while `queuectl clean` deletes every completed job
/// of the large database, against the same figures measured just before on the same database: a purge must not
/// hold up enqueues or claims.
async fn purge_while_picking_up(
    server: &mut Server,
    counts: &Counts,
    before: &Latencies,
    table: &mut Table,
) -> anyhow::Result<()> {
    let mut purger = server.connect().await?;
    let purge = tokio::spawn(async move {
        let started = Instant::now();
        let purged = purger.purge_jobs(pb::PurgeJobsRequest::default()).await;
        (purged, started.elapsed())
    });
    let enqueuer = server.connect().await?;
    let sampling = Instant::now();
    let during = pickup_latency(server, enqueuer, counts.workers, counts.latency_jobs).await?;
    let sampled = sampling.elapsed();
    let overlapped = !purge.is_finished();
    let (purged, took) = purge.await?;
    let deleted = purged?.into_inner().jobs_deleted;
    let ended = format!(
        "; the samples took {:.1} s{}",
        sampled.as_secs_f64(),
        if overlapped {
            ""
        } else {
            ", the purge ended before the last"
        }
    );
    for (what, during, before) in [
        ("pickup latency", &during.pickup, &before.pickup),
        (
            "enqueue acknowledgement",
            &during.acknowledged,
            &before.acknowledged,
        ),
        (
            "job round, enqueue to finish event,",
            &during.round,
            &before.round,
        ),
    ] {
        let (mut during, mut before) = (during.clone(), before.clone());
        let (p50, p99) = (percentile(&mut during, 0.5), percentile(&mut during, 0.99));
        let (then_p50, then_p99) = (percentile(&mut before, 0.5), percentile(&mut before, 0.99));
        let (slower_p50, slower_p99) = (p50 / then_p50, p99 / then_p99);
        table.add(
            format!("10. {what} p50 / p99 while `clean` deletes {deleted} completed jobs"),
            format!("{p50:.2} / {p99:.2} ms"),
            format!(
                "{then_p50:.2} / {then_p99:.2} ms before on the same database: {slower_p50:.2}x / {slower_p99:.2}x, \
                 goal <= 1.5x: {}; the purge took {:.1} s ({}){ended}",
                goal(slower_p50 <= 1.5 && slower_p99 <= 1.5),
                took.as_secs_f64(),
                per_second(rate(deleted, took)),
            ),
        );
    }
    Ok(())
}

/// `total` Enqueue RPCs from `clients` clients at once, each on its own connection; jobs/s.
async fn enqueue_singles(server: &mut Server, clients: u64, total: u64) -> anyhow::Result<f64> {
    let mut connected: Vec<Client> = Vec::new();
    for _ in 0..clients {
        connected.push(server.connect().await?);
    }
    let each = total / clients;
    let start = Instant::now();
    let tasks: Vec<_> = connected
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                for _ in 0..each {
                    client.enqueue(job("true")).await?;
                }
                Ok::<_, tonic::Status>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(rate(each * clients, start.elapsed()))
}

/// `batches` EnqueueBatch RPCs of 1000 jobs, one after the other; jobs/s.
async fn enqueue_batches(server: &mut Server, batches: u64) -> anyhow::Result<f64> {
    let requests: Vec<_> = (0..batches)
        .map(|_| pb::EnqueueBatchRequest {
            jobs: (0..1000).map(|_| job("true")).collect(),
        })
        .collect();
    let start = Instant::now();
    for request in requests {
        server.client.enqueue_batch(request).await?;
    }
    Ok(rate(batches * 1000, start.elapsed()))
}

/// The median time of `read`.
async fn read_time(
    samples: usize,
    mut read: impl AsyncFnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        read().await?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(Duration::from_secs_f64(percentile(&mut times, 0.5)))
}

struct Idle {
    cpu: Duration,
    rss: u64,
}

/// The CPU time and memory of the server while `workers` workers wait for `span`.
async fn idle_cost(server: &mut Server, workers: u32, span: Duration) -> anyhow::Result<Idle> {
    // The enqueue figures left jobs waiting; idle workers have none to run.
    server.client.reset(pb::ResetRequest {}).await?;
    server.set_workers(workers).await?;
    // Let whatever the last request started settle first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = cpu_time(server.pid)?;
    tokio::time::sleep(span).await;
    let cpu = cpu_time(server.pid)? - before;
    let rss = resident_bytes(server.pid)?;
    server.set_workers(0).await?;
    Ok(Idle { cpu, rss })
}

/// What figure 11 measured: the server's memory before and at its peak while one job printed, and how long it
/// took to store.
struct Flood {
    before: u64,
    peak: u64,
    elapsed: Duration,
}

/// Figure 11: one job prints `bytes` at the largest max_output_bytes while the server's resident memory is
/// sampled every 10 ms; then the setting goes back.
async fn output_flood(server: &mut Server, bytes: u64) -> anyhow::Result<Flood> {
    server.client.reset(pb::ResetRequest {}).await?;
    let set = |value: &str| pb::SetConfigRequest {
        key: "max_output_bytes".into(),
        value: value.into(),
    };
    server.client.set_config(set("67108864")).await?;
    server.set_workers(1).await?;
    let before = resident_bytes(server.pid)?;
    let started = Instant::now();
    let id = server
        .client
        .enqueue(job(&format!("head -c {bytes} /dev/zero")))
        .await?
        .into_inner()
        .job
        .context("the enqueued job")?
        .id;
    let mut peak = before;
    loop {
        peak = peak.max(resident_bytes(server.pid)?);
        let state = server
            .client
            .get_job(pb::GetJobRequest { id: id.clone() })
            .await?
            .into_inner()
            .job
            .context("the flooding job")?
            .state;
        if state == pb::JobState::Completed as i32 {
            break;
        }
        anyhow::ensure!(
            state != pb::JobState::Dead as i32 && state != pb::JobState::Failed as i32,
            "the flooding job failed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    server.set_workers(0).await?;
    server.client.set_config(set("1048576")).await?;
    Ok(Flood {
        before,
        peak,
        elapsed,
    })
}

/// The median wall time of one `queuectl enqueue` process.
async fn cli_wall(bins: &Bins, home: &Home, runs: usize) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let status = tokio::process::Command::new(&bins.cli)
            .arg("enqueue")
            .arg(r#"{"command":"true"}"#)
            .env("QUEUECTL_HOME", &home.path)
            .env("QUEUECTL_NO_AUTOSTART", "1")
            .env_remove("QUEUECTL_SERVER")
            .stdout(Stdio::null())
            .status()
            .await?;
        times.push(start.elapsed().as_secs_f64());
        anyhow::ensure!(status.success(), "queuectl enqueue failed: {status}");
    }
    Ok(Duration::from_secs_f64(percentile(&mut times, 0.5)))
}

/// Writes `jobs` jobs straight into the database of a stopped server: nine in ten completed with one run each,
/// the rest pending but not due for a year, so that they are stored and indexed yet do not run.
async fn fill(home: &Home, jobs: u64) -> anyhow::Result<()> {
    let options = SqliteConnectOptions::new().filename(home.database());
    let mut conn = SqliteConnection::connect_with(&options).await?;
    let jobs = i64::try_from(jobs)?;
    let completed = jobs / 10 * 9;
    let now = i64::try_from(unix_nanos() / 1000)?;
    let day = 86_400_000_000_i64;
    let mut tx = conn.begin().await?;
    sqlx::query(
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < ?1)
         INSERT INTO jobs (id, command, state, priority, attempts, max_retries, runs, queue_key, created_at,
                           updated_at, run_after)
         SELECT 'stored' || x, 'true', 'completed', 5, 1, 3, 1, ?2, ?2, ?2, ?2 FROM n WHERE x <= ?3
         UNION ALL
         SELECT 'stored' || x, 'true', 'pending', 5, 0, 3, 0, ?4 + 4 * 60000000, ?2, ?2, ?4 FROM n WHERE x > ?3",
    )
    .bind(jobs)
    .bind(now - day)
    .bind(completed)
    .bind(now + 365 * day)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO job_runs (job_seq, run, worker, started_at, finished_at, outcome)
         SELECT seq, 1, 0, created_at, created_at, 'ok' FROM jobs WHERE state = 'completed'",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    conn.close().await?;
    Ok(())
}
