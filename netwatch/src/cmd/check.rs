//! `netwatch check`: what works on this kernel. It loads and attaches every program as the
//! agent would, prints each hook, whether it is attached, the verifier's instruction count,
//! and, for one that is not, why and what is lost; then detaches. Exit 0 when every hook
//! netwatch needs is attached (the full path), 1 when it runs degraded.
use anyhow::bail;
use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;

use crate::{
    cli::CheckArgs,
    kernel::hooks::{HookState, HookStatus},
    kernel::loader::{self, LoadOptions},
};

#[derive(Serialize)]
struct Report<'a> {
    kernel: String,
    source: String,
    full_path: bool,
    hooks: &'a [HookStatus],
}

pub async fn run(args: &CheckArgs) -> anyhow::Result<()> {
    let probes = loader::load(&LoadOptions::default())?;
    let hooks = &probes.hooks;
    // The classic fallback is not needed on the full path.
    let full_path = hooks.iter().all(|h| {
        matches!(h.state, HookState::Attached | HookState::Replaced)
            || h.program == netwatch_common::program::STATE_CLASSIC
    });
    let report =
        Report { kernel: procfs_release(), source: probes.source.to_string(), full_path, hooks };
    if args.json {
        super::emit(&serde_json::to_string(&report)?)?;
    } else {
        super::emit(&text(&report))?;
    }
    if !full_path {
        let missing = hooks.iter().filter(|h| h.costs()).count();
        bail!("degraded: {missing} hooks are not attached on this kernel (see above)");
    }
    Ok(())
}

fn procfs_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |r| r.trim().to_string())
}

fn text(report: &Report<'_>) -> String {
    let mut table = Table::new();
    table
        .load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(["PROGRAM", "HOOK", "STATE", "VERIFIED_INSNS", "WHY NOT / WHAT IS LOST"]);
    for hook in report.hooks {
        let state = match hook.state {
            HookState::Attached => "attached",
            HookState::Failed => "FAILED",
            HookState::NotUsed => "not used",
            HookState::Replaced => "replaced",
        };
        let why = match (&hook.reason, hook.loses) {
            (Some(reason), Some(loses)) if hook.costs() => format!("{reason}: {loses}"),
            (Some(reason), _) => reason.clone(),
            _ => String::new(),
        };
        let insns = hook.verified_insns.map_or("-".into(), |n| n.to_string());
        table.add_row([hook.program, hook.attach, state, &insns, &why]);
    }
    let verdict = if report.full_path { "full path" } else { "DEGRADED" };
    format!("kernel {}: {verdict}, TCP states via {}\n{table}", report.kernel, report.source)
}
