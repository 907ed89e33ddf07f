//! The `netwatch` binary: parse arguments, set up logging, dispatch, map errors to exit codes.
use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use netwatch::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse_from(netwatch::cli::habits::rewrite(std::env::args_os().collect()));
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(netwatch::output::diagnostics::stderr)
        .with_target(false)
        .without_time()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .init();

    // One thread runs everything but the serializing of large API answers (the agent's
    // `spawn_blocking`), which a few more share.
    let runtime =
        tokio::runtime::Builder::new_current_thread().max_blocking_threads(4).enable_all().build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("netwatch: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Some(Command::Top(args)) => netwatch::top::run(args).await,
            Some(Command::Watch(args)) => netwatch::cmd::watch::run(args).await,
            Some(Command::Log(args)) => netwatch::cmd::log::run(args).await,
            Some(Command::Table(args)) => netwatch::cmd::table::run(args).await,
            Some(Command::Counters(args)) => netwatch::cmd::counters::run(args).await,
            Some(Command::Agent(args)) => netwatch::cmd::agent::run(args).await,
            Some(Command::Stats(args)) => netwatch::cmd::stats::run(args).await,
            Some(Command::History(args)) => netwatch::cmd::history::run(args).await,
            Some(Command::Check(args)) => netwatch::cmd::check::run(args).await,
            Some(Command::GenerateDocs { dir }) => netwatch::cmd::docs::run(dir),
            None if cli.default_is_top(std::io::stdout().is_terminal()) => {
                netwatch::top::run(&cli.default_top()).await
            }
            None => netwatch::cmd::watch::run(&cli.watch).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("netwatch: {error:#}");
            // A bad filter or namespace is a usage error, like clap's: exit 2.
            let usage = error.downcast_ref::<netwatch::query::ss::QueryError>().is_some()
                || error.downcast_ref::<netwatch::Error>().is_some_and(netwatch::Error::is_usage);
            if usage { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}
