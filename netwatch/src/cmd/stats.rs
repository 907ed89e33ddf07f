//! `netwatch stats`: the agent's handshake latency and failure statistics, as text tables or
//! JSON. Only an agent sees connections for long enough to keep them.
use anyhow::{Context as _, bail};

use crate::{
    cli::StatsArgs,
    output::stats,
    serve::api::{self, Command},
    state::stats::Report,
};

pub async fn run(args: &StatsArgs) -> anyhow::Result<()> {
    let Some(line) = api::ask(&args.socket, Command::Stats).await.context("asking the agent")?
    else {
        bail!(
            "no agent is running at {}: start `netwatch agent` (statistics are kept by the agent)",
            args.socket.display()
        );
    };
    let report: Report = serde_json::from_str(&line).with_context(|| {
        format!("the agent at {} answered: {}", args.socket.display(), line.trim())
    })?;
    if args.json {
        super::emit(&serde_json::to_string(&report)?)
    } else {
        super::emit(&stats::text(&report))
    }
}
