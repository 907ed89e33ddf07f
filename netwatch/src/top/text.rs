//! How `netwatch top` writes values in its narrow columns: durations, ages, byte counts,
//! owners, state names, and text cut to a width.
use crate::{
    kernel::events::{Comm, TcpState},
    output::table::ss_state,
    record::Owner,
};

/// `comm[pid]` between `before` and `after` in `width` columns: the command name is cut
/// rather than the pid.
pub fn fit_owner(owner: &Owner, before: &str, after: &str, width: u16) -> String {
    let text = format!("{before}{owner}{after}");
    let over = text.chars().count().saturating_sub(usize::from(width));
    if over == 0 {
        return text;
    }
    let comm: String =
        owner.comm.chars().take(owner.comm.chars().count().saturating_sub(over)).collect();
    format!("{before}{comm}[{}]{after}", owner.pid)
}

/// `text` in `width` columns: its end kept (an address's port), its start cut with `…`.
pub fn keep_end(text: String, width: u16) -> String {
    let width = usize::from(width);
    let count = text.chars().count();
    if count <= width || width == 0 {
        return text;
    }
    let tail: String = text.chars().skip(count - (width - 1)).collect();
    format!("…{tail}")
}

/// `comm[pid]` of a record's or step's owner, `-` when not known.
pub fn owner_text(pid: Option<u32>, comm: Option<&Comm>) -> String {
    match (pid, comm) {
        (Some(pid), Some(comm)) => Owner { pid, comm: comm.clone(), cgroup_id: 0 }.to_string(),
        _ => "-".into(),
    }
}

/// A TCP state in `ss`'s short spelling; CLOSE as such (ss's UNCONN is for UDP).
pub fn short(state: TcpState) -> &'static str {
    if state == TcpState::Close { "CLOSE" } else { ss_state(state) }
}

/// `0.41ms`, `12.3ms`, `1.20s`.
pub fn millis(ns: u64) -> String {
    let ms = ns as f64 / 1e6;
    if ms < 10.0 {
        format!("{ms:.2}ms")
    } else if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}

/// `12s`, `5m02s`, `3h04m`, `2d03h`.
pub fn age(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Bytes per second, `812B`, `12.3K`, `4.5M`.
pub fn rate(per_s: f64) -> String {
    bytes(per_s as u64)
}

pub fn bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n}B"),
        1024..1_048_576 => format!("{:.1}K", n as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1}M", n as f64 / 1_048_576.0),
        _ => format!("{:.1}G", n as f64 / 1_073_741_824.0),
    }
}
