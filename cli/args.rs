//! The command line, as clap parses it.

use clap::{Parser, Subcommand, ValueEnum};

/// A duration on the command line: whole seconds (`300`), as job JSON takes them, or with units (`5m`, `1h 30m`).
fn duration(text: &str) -> Result<std::time::Duration, String> {
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|error| {
        format!("{error}; give seconds (300) or a duration such as 90s, 5m or 1h 30m")
    })
}

/// A paragraph of an `after_help` that starts with a heading (`Examples:`) and goes on with indented lines becomes a
/// section of the man page (EXAMPLES); the main page's Environment is every page's. Keep each line within 80
/// columns, so that `--help` never wraps one (an example must stay one line to be pasted), and an example within
/// 75 (73 after its indent), so that it fits beside the margin of the man page too.
const AFTER_HELP: &str = "\
Examples:
  queuectl enqueue '{\"command\":\"echo hello\"}'
  queuectl enqueue '{\"id\":\"nightly\",\"command\":\"./backup.sh\",\"timeout\":600}'
  queuectl worker start --count 3
  queuectl status
  queuectl list --state dead --output table
  queuectl dlq retry job7
  queuectl cancel job9
  queuectl config set backoff_base 3

The server (queuectld) is started in the background on first use, with no
workers, and listens on a socket in QUEUECTL_HOME (default ~/.queuectl) that
only you can reach.

Environment:
  QUEUECTL_HOME          the folder of the server's socket, token and database
                         (default ~/.queuectl)
  QUEUECTL_SERVER        the server to talk to, as --server
  QUEUECTL_NO_AUTOSTART  1: never start a server on demand
  QUEUECTL_TOKEN         the token for a server other than the home's own
  QUEUECTL_CA_CERT       the certificate authority (PEM) of an https:// server
A server started on demand inherits the environment: queuectld(8) and
queuectld --help list what it reads, such as QUEUECTL_DATABASE_URL.

Exit status:
  0  done
  1  the request failed (the message says why); for wait and logs --follow,
     a job did not complete
  2  bad usage: a bad argument, job JSON or --server address
  3  no server could be reached
  4  wait ran out of its --timeout
health exits as grpc_health_probe does: 0 serving, 2 cannot connect, 3 the
check failed, 4 not serving.";

/// A durable background job queue for shell commands.
#[derive(Parser)]
#[command(name = "queuectl", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// The server to talk to: unix:/path/to/socket or http://127.0.0.1:PORT. Default: the socket in
    /// QUEUECTL_HOME, with a server started there if none runs (unless QUEUECTL_NO_AUTOSTART=1).
    #[arg(long, env = "QUEUECTL_SERVER", global = true, value_name = "ADDRESS")]
    pub server: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum Format {
    /// One JSON object per line, as the Python queuectl printed.
    #[default]
    Json,
    /// Aligned columns for people.
    Table,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StateArg {
    Pending,
    Processing,
    Failed,
    Completed,
    Dead,
    Cancelled,
}

/// The states `clean` may delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FinalStateArg {
    Completed,
    Dead,
    Cancelled,
}

#[derive(Subcommand)]
pub enum Command {
    /// Add a job, given as JSON.
    ///
    /// The job's fields: command (required), id, priority (1-10), max_retries, timeout (seconds), run_at (RFC
    /// 3339 time or Unix seconds) or delay (seconds, or e.g. "10m", "1h 30m"), after (ids of jobs that must
    /// complete first), cwd (the directory it runs in; the current directory when absent), env (an object of
    /// variables added to its environment).
    #[command(after_help = "\
Examples:
  queuectl enqueue '{\"command\":\"echo hi\"}'
  queuectl enqueue '{\"command\":\"make\",\"priority\":1,\"max_retries\":2}'
  queuectl enqueue '{\"command\":\"make\",\"run_at\":\"2026-12-01T02:00:00Z\"}'
  queuectl enqueue '{\"command\":\"./retry-later.sh\",\"delay\":\"10m\"}'
  queuectl enqueue '{\"command\":\"./deploy.sh\",\"after\":[\"build\",\"test\"]}'
  queuectl enqueue --env STAGE=prod --env PATH '{\"command\":\"./up.sh\"}'
  id=$(queuectl enqueue --quiet '{\"command\":\"make\"}')
  jq -c '.[]' jobs.json | queuectl enqueue -

The job runs in the directory queuectl enqueue was called from, unless its
JSON names a \"cwd\". Of the caller's environment only what --env names is
sent; the variables are stored with the job, in the server's database.")]
    Enqueue {
        /// The job as a JSON object, or `-` to read jobs from stdin, one JSON object per line, stored in batches
        /// (all of a batch or none of it).
        job: String,
        /// Print each stored job: `json` as `get` prints it, `table` as `list --output table`.
        #[arg(long, value_enum, conflicts_with = "quiet")]
        output: Option<Format>,
        /// Print only the id of each stored job, one per line.
        #[arg(long, short)]
        quiet: bool,
        /// Add a variable to the job's environment: KEY=VALUE, or KEY to send its value here. Repeatable; over
        /// the JSON's env.
        #[arg(long, value_name = "KEY[=VALUE]")]
        env: Vec<String>,
    },
    /// Count jobs by state and show what each worker runs.
    #[command(after_help = "Examples:\n  queuectl status\n  queuectl status --output json")]
    Status {
        /// `table` for people, `json` for scripts: one object of counts and workers.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// List jobs, best priority first, one JSON object per line.
    #[command(
        after_help = "Examples:\n  queuectl list\n  queuectl list --state pending --output table"
    )]
    List {
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<StateArg>,
        /// One JSON object per job and line, or a table.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
        /// Show at most this many jobs.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Show one job.
    #[command(after_help = "Example:\n  queuectl get job1")]
    Get {
        /// The job's id (job7, or the id its JSON gave).
        #[arg(add = crate::complete::job_ids())]
        id: String,
        /// One JSON object, or a table.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
    /// Print what a job's attempts wrote to stdout and stderr, as one stream in the order it was written.
    #[command(after_help = "\
Past max_output_bytes an attempt keeps the first and the last half of its
output; a line says how many bytes were dropped between them.

Examples:
  queuectl logs job1
  queuectl logs job1 --stderr
  queuectl logs job1 --follow

Exit status:
  0  printed; with --follow, the job completed
  1  the request failed; with --follow, the job ended dead or cancelled
  2  bad usage
  3  no server could be reached")]
    Logs {
        /// The job's id.
        #[arg(add = crate::complete::job_ids())]
        id: String,
        /// Print everything so far, then what the job prints, until it is final; exit 1 if it did not complete.
        #[arg(long, short, conflicts_with = "output")]
        follow: bool,
        /// Only what the command wrote to stdout.
        #[arg(long, conflicts_with = "stderr")]
        stdout: bool,
        /// Only what the command wrote to stderr.
        #[arg(long)]
        stderr: bool,
        /// `json` prints one object per attempt: its output as text (invalid UTF-8 replaced), and as chunks
        /// tagged with their stream.
        #[arg(long, value_enum)]
        output: Option<Format>,
    },
    /// Wait until jobs are final (completed, dead or cancelled); exit 1 if any did not complete.
    #[command(after_help = "Examples:
  queuectl wait job1 job2
  queuectl wait                       # every job that is not final yet
  queuectl wait job7 --timeout 10m
  id=$(queuectl enqueue -q '{\"command\":\"make\"}') && queuectl wait \"$id\"

Exit status:
  0  every job completed
  1  a job ended dead or cancelled (stderr names them), or the request failed
  2  bad usage
  3  no server could be reached
  4  --timeout ran out with jobs still not final")]
    Wait {
        /// The jobs; none means every job that is not final now.
        #[arg(add = crate::complete::job_ids())]
        ids: Vec<String>,
        /// Give up after this long (seconds, or e.g. 90s, 5m, 1h): exit 4.
        #[arg(long, value_parser = duration)]
        timeout: Option<std::time::Duration>,
    },
    /// Check the server's health as grpc_health_probe does (never starts a server).
    #[command(after_help = "Example:
  queuectl health && echo serving

Exit status:
  0  serving
  2  cannot connect
  3  the check failed
  4  not serving: the server drains, or its database fails")]
    Health,
    /// Print a shell completion script.
    #[command(after_help = "Examples:
  queuectl completions bash > /etc/bash_completion.d/queuectl
  queuectl completions zsh > \"${fpath[1]}/_queuectl\"
  queuectl completions fish > ~/.config/fish/completions/queuectl.fish

To also complete job ids (asked of the running server) and settings, let the
shell ask queuectl itself instead, in ~/.bashrc or ~/.zshrc:
  source <(COMPLETE=bash queuectl)
  source <(COMPLETE=zsh queuectl)
or in fish: COMPLETE=fish queuectl | source

Exit status:
  0  printed
  2  bad usage, such as a shell it does not know")]
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the man page of queuectl (roff), or write every page into a man directory.
    #[command(after_help = "\
Examples:
  queuectl man | man -l -
  sudo queuectl man --dir /usr/local/share/man && man queuectl-enqueue
  queuectl man --dir ~/.local/share/man

Exit status:
  0  printed, or written
  1  a page could not be written; the message says why
  2  bad usage")]
    Man {
        /// Write the pages into this directory, as a man directory does: man1/queuectl.1, a
        /// man1/queuectl-COMMAND.1 for each command (queuectl-dlq-retry.1 for `dlq retry`) and
        /// man8/queuectld.8.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
    /// Cancel jobs: a waiting job never runs; a running one is killed (its whole process group).
    #[command(after_help = "Examples:\n  queuectl cancel job7\n  queuectl cancel job7 job8 job9")]
    Cancel {
        /// The jobs' ids.
        #[arg(add = crate::complete::job_ids(), required = true)]
        ids: Vec<String>,
    },
    /// Send a dead or cancelled job back to the queue with its attempts reset to 0.
    #[command(after_help = "Example:\n  queuectl retry job5")]
    Retry {
        /// The job's id.
        #[arg(add = crate::complete::job_ids())]
        id: String,
    },
    /// Delete final jobs (completed, dead or cancelled) and their logs.
    #[command(after_help = "Examples:\n  queuectl remove job3\n  queuectl remove job3 job4")]
    Remove {
        /// The jobs' ids.
        #[arg(add = crate::complete::job_ids(), required = true)]
        ids: Vec<String>,
    },
    /// Delete final jobs in bulk (completed ones unless --state says otherwise) and print how many.
    #[command(after_help = "\
The settings completed_retention (default 7 days) and dead_retention (default:
keep) make the server do this by itself.

Examples:
  queuectl clean
  queuectl clean --state dead --state cancelled --older-than 7d")]
    Clean {
        /// Which final jobs; repeat for several (default: completed).
        #[arg(long, value_enum)]
        state: Vec<FinalStateArg>,
        /// Only jobs that ended at least this long ago (seconds, or e.g. 90s, 12h, 7d).
        #[arg(long, value_parser = duration)]
        older_than: Option<std::time::Duration>,
    },
    /// Stop starting jobs, on every server of the queue; running jobs finish. Holds across restarts.
    #[command(after_help = "Example:\n  queuectl pause && queuectl status")]
    Pause,
    /// Start jobs again after `queuectl pause`.
    #[command(after_help = "Example:\n  queuectl resume")]
    Resume,
    /// The dead letter queue: jobs that failed every attempt.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Read and change runtime settings.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Start or stop the server's workers.
    #[command(subcommand)]
    Worker(WorkerCommand),
    /// Control the server process.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Stop all workers and delete all jobs and settings.
    #[command(
        after_help = "Examples:\n  queuectl reset\n  queuectl reset --yes\n  echo y | queuectl reset"
    )]
    Reset {
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
    /// Write a consistent copy of the database (SQLite) to a new file while the server runs.
    #[command(after_help = "\
The server writes the file, on its machine; a relative path is taken from the
current directory. The file must not exist and is created readable by you only.
On PostgreSQL, use pg_dump.

Examples:
  queuectl backup jobs-backup.db
  queuectl backup /var/backups/queuectl-$(date +%F).db")]
    Backup {
        /// Where to write the copy.
        file: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// List dead jobs.
    #[command(after_help = "Example:\n  queuectl dlq list")]
    List {
        /// One JSON object per job and line, or a table.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
    /// Send a dead or cancelled job back to the queue with its attempts reset to 0.
    #[command(after_help = "Example:\n  queuectl dlq retry job5")]
    Retry {
        /// The job's id.
        #[arg(add = crate::complete::job_ids())]
        id: String,
    },
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print a setting's value, or every setting when no key is given.
    #[command(
        after_help = "Examples:\n  queuectl config get backoff_base\n  queuectl config get --output json"
    )]
    Get {
        /// The setting (see `config set --help`); none prints them all.
        #[arg(add = crate::complete::setting_keys())]
        key: Option<String>,
        /// `json` prints an object of settings; the default prints the value (or key = value lines).
        #[arg(long, value_enum)]
        output: Option<Format>,
    },
    /// Change a setting.
    #[command(after_help = "\
Settings:
  aging_interval       seconds a waiting job needs to gain one priority level
                       (default 60)
  backoff_base         a failed job waits backoff_base ^ attempts seconds
                       before its retry (default 2)
  completed_retention  completed jobs older than this are deleted; 0 = keep
                       (default 604800, 7 days)
  dead_retention       dead and cancelled jobs older than this are deleted;
                       0 = keep (default 0)
  default_max_retries  retries of jobs that give no max_retries (default 3)
  job_timeout          seconds an attempt may run, for jobs that give no
                       timeout; 0 = no limit (default 0)
  max_output_bytes     output kept per attempt (default 1048576)
  shutdown_grace       seconds running jobs get when the server stops
                       (default 10)

Example:
  queuectl config set backoff_base 3")]
    Set {
        /// The setting: one of those under Settings.
        #[arg(add = crate::complete::setting_keys())]
        key: String,
        /// Its new value: a whole number; the settings in seconds also take e.g. 90s, 5m, 7d.
        value: String,
    },
}

#[derive(Subcommand)]
pub enum WorkerCommand {
    /// Set the server's worker count and, unless --daemon, print their activity until Ctrl-C.
    #[command(
        after_help = "Examples:\n  queuectl worker start --count 3\n  queuectl worker start --count 3 --daemon"
    )]
    Start {
        /// How many jobs run at once.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Return at once and leave the workers running in the server.
        #[arg(long)]
        daemon: bool,
        /// Set the count on every server sharing the PostgreSQL database, not only this one.
        #[arg(long)]
        all: bool,
    },
    /// Stop the workers; each finishes its current job first.
    #[command(after_help = "Examples:\n  queuectl worker stop\n  queuectl worker stop --all")]
    Stop {
        /// Stop the workers of every server sharing the PostgreSQL database.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
pub enum ServerCommand {
    /// Stop the server gracefully: running jobs get the shutdown_grace setting to finish.
    #[command(after_help = "Example:\n  queuectl server stop")]
    Stop,
}

#[cfg(test)]
mod tests {
    use clap::{Command, CommandFactory};

    /// The arguments of `command` and of the commands below it that have no help text, by command and name.
    fn undescribed(command: &Command, found: &mut Vec<String>) {
        let name = command.get_bin_name().unwrap_or(command.get_name());
        for arg in command.get_arguments().filter(|arg| !arg.is_hide_set()) {
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                found.push(format!("{name}: {}", arg.get_id()));
            }
        }
        for sub in command.get_subcommands() {
            undescribed(sub, found);
        }
    }

    #[test]
    fn every_argument_of_both_binaries_is_described() {
        let mut found = Vec::new();
        for mut command in [
            super::Cli::command(),
            queuectl::server_args::ServerArgs::command(),
        ] {
            command.build();
            command.clone().debug_assert();
            undescribed(&command, &mut found);
        }
        assert!(found.is_empty(), "arguments without help: {found:?}");
    }
}
