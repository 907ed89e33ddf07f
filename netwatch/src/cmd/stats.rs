//! `netwatch stats`: the agent's handshake latency and failure statistics, as text tables or
//! JSON. Only an agent sees connections for long enough to keep them.
use anyhow::{Context as _, bail};

use crate::{
    cli::StatsArgs,
    output::stats,
    recorded::rebuild,
    serve::api::{self, Command},
    state::stats::Report,
};

pub async fn run(args: &StatsArgs) -> anyhow::Result<()> {
    let report = match &args.log {
        Some(path) => {
            let mut reader = super::log::open(path, args.window.window(), false)?;
            rebuild::stats(&mut reader).context("reading the log")?.report()
        }
        None => {
            anyhow::ensure!(
                args.window.since.is_none() && args.window.until.is_none(),
                "--since and --until choose a stretch of an event log: give it with --log PATH"
            );
            from_agent(args).await?
        }
    };
    if args.json {
        super::emit(&serde_json::to_string(&report)?)
    } else {
        super::emit(&stats::text(&report))
    }
}

async fn from_agent(args: &StatsArgs) -> anyhow::Result<Report> {
    let Some(line) = api::ask(&args.socket, Command::Stats).await.context("asking the agent")?
    else {
        bail!(
            "no agent is running at {}: start `netwatch agent` (statistics are kept by the \
             agent), or read its event log (--log PATH)",
            args.socket.display()
        );
    };
    serde_json::from_str(&line).with_context(|| {
        format!("the agent at {} answered: {}", args.socket.display(), line.trim())
    })
}
