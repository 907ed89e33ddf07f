//! `netwatch history`: connection histories from a running agent, filtered, one line per
//! connection (or one connection in full with `--cookie`), or JSON.
use anyhow::{Context as _, bail};

use crate::{
    cli::HistoryArgs,
    host::services::Services,
    output::address::endpoint,
    output::history::path,
    query::ss::{self as query, Endpoints},
    recorded::{rebuild, window::Window},
    serve::api::{self, Command},
    state::history::History,
};

pub async fn run(args: &HistoryArgs) -> anyhow::Result<()> {
    let query = query::parse(&args.filter, &Services::load())?;
    let all = match &args.log {
        Some(path) => from_log(path, args)?,
        None => from_agent(args).await?,
    };
    if let Some(cookie) = args.cookie
        && !all.iter().any(|h| h.cookie == cookie)
    {
        match &args.log {
            Some(path) => {
                bail!("the log {} has no connection with cookie {cookie}", path.display())
            }
            None => bail!(
                "the agent knows no connection with cookie {cookie}: closed ones are kept for \
                 --history-max-age and at most --history-keep of them (see `netwatch history`)"
            ),
        }
    }
    let (since, until) = (args.since, args.until);
    let chosen: Vec<&History> = all
        .iter()
        .filter(|h| args.cookie.is_none_or(|c| h.cookie == c))
        .filter(|h| !args.closed || h.closed)
        .filter(|h| !args.failed || h.failure.is_some())
        .filter(|h| since.is_none_or(|t| h.steps.last().is_some_and(|s| s.time >= t)))
        .filter(|h| until.is_none_or(|t| h.steps.first().is_none_or(|s| s.time <= t)))
        .filter(|h| {
            let workload = h.workload.as_deref();
            args.container
                .as_deref()
                .is_none_or(|c| workload.is_some_and(|w| w.matches_container(c)))
                && args.pod.as_deref().is_none_or(|p| workload.is_some_and(|w| w.matches_pod(p)))
        })
        .filter(|h| {
            let states = query.states;
            states.is_none_or(|set| {
                h.snapshot_state.is_some_and(|s| set.contains(s))
                    || h.steps.iter().any(|s| set.contains(s.old) || set.contains(s.new))
            })
        })
        .filter(|h| {
            let ends = Endpoints { local: (h.laddr, h.lport), remote: (h.raddr, h.rport) };
            query.expr.as_ref().is_none_or(|e| e.matches(&ends))
        })
        .collect();
    if args.json {
        return super::emit(&serde_json::to_string(&chosen)?);
    }
    let mut lines = Vec::with_capacity(chosen.len());
    for h in chosen {
        let owner = h
            .steps
            .iter()
            .rev()
            .find_map(|s| Some(format!("{}[{}]", s.comm.as_ref()?, s.pid?)))
            .or_else(|| h.snapshot_owner.as_ref().map(|o| format!("{}[{}]", o.comm, o.pid)));
        let mut line = format!(
            "{:<8} {} -> {} {} {}",
            h.cookie,
            endpoint((h.laddr, h.lport), false, None, None),
            endpoint((h.raddr, h.rport), false, None, None),
            owner.unwrap_or_else(|| "-".into()),
            path(h)
        );
        if let Some(failure) = h.failure {
            line.push_str(&format!(" [{}]", failure.name()));
        }
        if let Some(workload) = h.workload.as_deref().filter(|w| w.is_container()) {
            line.push_str(&format!(" container={}", workload.label()));
        }
        if let (Some(sent), Some(received)) = (h.bytes_sent, h.bytes_received) {
            line.push_str(&format!(" sent={sent}B received={received}B"));
        }
        let retransmits =
            h.retransmits.map_or(h.retransmits_seen, |n| u64::from(n).max(h.retransmits_seen));
        if retransmits > 0 {
            line.push_str(&format!(" retransmits={retransmits}"));
        }
        if args.cookie.is_some() {
            for step in &h.steps {
                line.push_str(&format!(
                    "\n  {} {} -> {} {} {}",
                    step.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    step.old,
                    step.new,
                    step.duration_ns.map_or("-".into(), |ns| format!("{:.3}ms", ns as f64 / 1e6)),
                    step.pid.map_or("-".into(), |p| p.to_string())
                ));
            }
        }
        lines.push(line);
    }
    if lines.is_empty() {
        return Ok(());
    }
    super::emit(&lines.join("\n"))
}

async fn from_agent(args: &HistoryArgs) -> anyhow::Result<Vec<History>> {
    let ask = |cookie| async move {
        api::ask(&args.socket, Command::History { cookie }).await.context("asking the agent")
    };
    let Some(mut line) = ask(args.cookie).await? else {
        bail!(
            "no agent is running at {}: start `netwatch agent` (histories are kept by the \
             agent), or read its event log (--log PATH)",
            args.socket.display()
        );
    };
    // An agent older than the `cookie` field refuses it: it is asked for every history,
    // which are filtered here in any case.
    if args.cookie.is_some() && !line.starts_with('[') {
        line = ask(None).await?.unwrap_or_default();
    }
    serde_json::from_str(&line).with_context(|| {
        format!("the agent at {} answered: {}", args.socket.display(), line.trim())
    })
}

/// Every history the log holds up to `--until`, rebuilt from the start of the first file
/// that reaches `--since` (which begins with the agent's table).
fn from_log(path: &std::path::Path, args: &HistoryArgs) -> anyhow::Result<Vec<History>> {
    let window = Window { since: args.since, until: args.until };
    let mut reader = super::log::open(path, window, false)?.whole_files();
    let histories = rebuild::histories(&mut reader).context("reading the log")?;
    Ok(histories.all())
}
