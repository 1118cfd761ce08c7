//! `queuectl`: the command-line client of a queuectl server.

mod args;
mod client;
mod commands;
mod complete;
mod man;
mod output;

use clap::{CommandFactory, Parser};
use queuectl::pb;

use args::{Cli, Command, ConfigCommand, DlqCommand, ServerCommand, WorkerCommand};

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Commands that need no server, and checks that should not start one.
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "queuectl",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Command::Man { dir: None } => {
            man::main_page(&mut std::io::stdout())?;
            return Ok(());
        }
        Command::Man { dir: Some(dir) } => {
            for page in man::write_pages(dir)? {
                println!("{}", page.display());
            }
            return Ok(());
        }
        Command::Health => {
            let code = commands::health(cli.server.as_deref()).await;
            std::process::exit(code);
        }
        Command::Enqueue { job, env, .. } if job != "-" => {
            commands::job_request(job, env)?;
        }
        _ => {}
    }
    // Stopping a server that is not running starts nothing: there is nothing to stop.
    let autostart = !matches!(
        cli.command,
        Command::Server(ServerCommand::Stop) | Command::Worker(WorkerCommand::Stop { .. })
    );
    let mut client = client::connect(cli.server.as_deref(), autostart).await?;
    let client = &mut client;
    match cli.command {
        Command::Completions { .. } | Command::Man { .. } | Command::Health => Ok(()),
        Command::Enqueue {
            job,
            env,
            output,
            quiet,
        } => {
            let printed = match (quiet, output) {
                (true, _) => commands::Printed::Id,
                (false, Some(format)) => commands::Printed::Job(format),
                (false, None) => commands::Printed::Sentence,
            };
            commands::enqueue(client, &job, &env, printed).await
        }
        Command::Status { output } => commands::status(client, output).await,
        Command::List {
            state,
            output,
            limit,
        } => commands::list(client, state, output, limit).await,
        Command::Get { id, output } => commands::get(client, id, output).await,
        Command::Logs {
            id,
            follow,
            stdout,
            stderr,
            output,
        } => {
            let only = match (stdout, stderr) {
                (true, _) => Some(pb::OutputStream::Stdout),
                (_, true) => Some(pb::OutputStream::Stderr),
                _ => None,
            };
            commands::logs(client, id, follow, only, output).await
        }
        Command::Wait { ids, timeout } => commands::wait(client, ids, timeout).await,
        Command::Dlq(DlqCommand::List { output }) => {
            commands::list(client, Some(args::StateArg::Dead), output, None).await
        }
        Command::Dlq(DlqCommand::Retry { id }) | Command::Retry { id } => {
            commands::dlq_retry(client, id).await
        }
        Command::Cancel { ids } => commands::cancel(client, ids).await,
        Command::Remove { ids } => commands::remove(client, ids).await,
        Command::Clean { state, older_than } => commands::clean(client, state, older_than).await,
        Command::Pause => commands::pause(client, true).await,
        Command::Resume => commands::pause(client, false).await,
        Command::Config(ConfigCommand::Get { key, output }) => {
            commands::config_get(client, key, output).await
        }
        Command::Config(ConfigCommand::Set { key, value }) => {
            commands::config_set(client, key, value).await
        }
        Command::Worker(WorkerCommand::Start { count, daemon, all }) => {
            commands::worker_start(client, count, daemon, all).await
        }
        Command::Worker(WorkerCommand::Stop { all }) => commands::worker_stop(client, all).await,
        Command::Server(ServerCommand::Stop) => commands::server_stop(client).await,
        Command::Reset { yes } => commands::reset(client, yes).await,
        Command::Backup { file } => commands::backup(client, &file).await,
    }
}

/// Whether `error` is stdout's reader having closed the pipe.
fn reader_went_away(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn main() {
    // With COMPLETE set, a shell asks for completions: answer and exit.
    clap_complete::CompleteEnv::with_factory(Cli::command).complete();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    let Err(error) = runtime.block_on(run(cli)) else {
        return;
    };
    if reader_went_away(&error) {
        // `queuectl list | head -1`: the reader has what it wanted. Quietly, with the status a shell gives a
        // command that SIGPIPE ended (SIGPIPE itself stays ignored: the server's socket must not raise it).
        std::process::exit(141);
    }
    let (message, code) = if let Some(status) = error.downcast_ref::<tonic::Status>() {
        match client::timed_out(status, client::COMMAND) {
            Some(message) => (message, 3),
            None => (client::explained(status), 1),
        }
    } else if error.is::<client::Unreachable>() {
        (error.to_string(), 3)
    } else if error.is::<commands::Usage>() {
        (error.to_string(), 2)
    } else if error.is::<commands::TimedOut>() {
        (error.to_string(), 4)
    } else {
        (format!("{error:#}"), 1)
    };
    eprintln!("error: {message}");
    std::process::exit(code);
}
