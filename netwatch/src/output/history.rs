//! A connection's history as text: its path through the state machine, each state with the
//! time spent in it.
use crate::state::history::{FirstSeen, History};

/// `SYN_SENT 0.41ms -> ESTABLISHED 12.3s -> CLOSE`: each state with the time spent in it.
pub fn path(history: &History) -> String {
    let mut parts = Vec::new();
    if let Some(state) = history.snapshot_state.filter(|_| history.steps.is_empty()) {
        parts.push(format!("{state} (since before netwatch)"));
    }

    for (i, step) in history.steps.iter().enumerate() {
        if i == 0 {
            parts.push(match step.duration_ns {
                Some(ns) => format!("{} {}", step.old, human(ns)),
                None => step.old.to_string(),
            });
        }
        let spent = history.steps.get(i + 1).and_then(|next| next.duration_ns);
        parts.push(match spent {
            Some(ns) => format!("{} {}", step.new, human(ns)),
            None => step.new.to_string(),
        });
    }
    let path = parts.join(" -> ");
    if history.first_seen == FirstSeen::Midway { format!("(began unseen) {path}") } else { path }
}

fn human(ns: u64) -> String {
    let ms = ns as f64 / 1e6;
    if ms < 1000.0 { format!("{ms:.2}ms") } else { format!("{:.1}s", ms / 1000.0) }
}
