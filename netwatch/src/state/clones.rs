//! New connections, held back until the kernel has said what they are.
//!
//! - **Which listener.** Listeners that share an address (SO_REUSEPORT) cannot be told apart
//!   by a child's addresses; `fexit/inet_csk_clone_lock` says which one the kernel chose
//!   (`Event::ChildOf`), just after the child's LISTEN -> SYN_RECV.
//! - **Named late.** On older kernels (6.1 among them) `inet_csk_clone_lock()` sets the
//!   child's state to SYN_RECV while the child is still a copy of its listener: that
//!   transition carries the listener's cookie, addresses and ports (a remote port of 0, which
//!   no connection has), and only the child's next transition shows what it is.
//!
//! So a LISTEN -> SYN_RECV is held by the child's kernel address until its listener is known
//! and it is named (the child's next transition names it, and releases it in any case).
use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::kernel::events::{Event, StateChange, TcpState};

/// Children held at once before the oldest is dropped: a child leaves SYN_RECV within a
/// packet or two (with TCP Fast Open, within a handshake timeout), so this bound is only
/// reached by a flood of Fast Open connections that never complete.
const MAX_HELD: usize = 4096;

#[derive(Default)]
pub struct Clones {
    held: FxHashMap<u64, StateChange>,
    /// Held children's addresses, oldest first; released ones are skipped when evicting.
    order: VecDeque<u64>,
    /// Whether `fexit/inet_csk_clone_lock` is attached: only then is a named child held
    /// for its listener.
    listener_told: bool,
}

fn named(change: &StateChange) -> bool {
    change.remote.1 != 0
}

impl Clones {
    pub fn new(listener_told: bool) -> Self {
        Clones { listener_told, ..Default::default() }
    }

    /// Appends to `out` the events to apply for `event`, in order: none while a child's first
    /// transition is held, then that transition (with its listener, renamed if need be)
    /// before anything else of the child's.
    pub fn sort(&mut self, event: Event, out: &mut Vec<Event>) {
        match event {
            Event::ChildOf { skaddr, listener } => {
                let ready = self.held.get_mut(&skaddr).is_some_and(|held| {
                    held.listener = Some(listener);
                    named(held)
                });
                if ready && let Some(held) = self.release(skaddr) {
                    out.push(Event::State(held));
                }
            }
            Event::State(change)
                if change.old == TcpState::Listen
                    && change.new == TcpState::SynRecv
                    && (self.listener_told || !named(&change)) =>
            {
                while self.held.len() >= MAX_HELD {
                    let Some(oldest) = self.order.pop_front() else { break };
                    self.held.remove(&oldest);
                }
                self.order.push_back(change.skaddr);
                self.held.insert(change.skaddr, change);
            }
            Event::State(change) => {
                if let Some(mut first) = self.release(change.skaddr) {
                    if !named(&first) {
                        first.key = change.key;
                        first.cookie = change.cookie;
                        first.netns = change.netns;
                        first.family = change.family;
                        first.local = change.local;
                        first.remote = change.remote;
                    }
                    out.push(Event::State(first));
                }
                out.push(Event::State(change));
            }
            other => out.push(other),
        }
    }

    fn release(&mut self, skaddr: u64) -> Option<StateChange> {
        let held = self.held.remove(&skaddr)?;
        if self.held.is_empty() {
            self.order.clear();
        }
        Some(held)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::kernel::events::{Family, SockKey, StateSource, Task};

    fn change(old: TcpState, new: TcpState, cookie: u64, remote_port: u16) -> StateChange {
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        StateChange {
            ts_ns: 1,
            source: StateSource::TpBtf,
            key: SockKey::Cookie(cookie),
            cookie: Some(cookie),
            skaddr: 0xc800,
            netns: 1,
            inode: 0,
            family: Family::Ipv4,
            local: (localhost, 7777),
            remote: (
                if remote_port == 0 { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { localhost },
                remote_port,
            ),
            old,
            new,
            task: Task { pid: 1, tid: 1, comm: "python3".into(), cgroup: 0 },
            deferred_connect: false,
            timewait: None,
            listener: None,
            totals: None,
        }
    }

    fn states(events: &[Event]) -> Vec<(TcpState, TcpState, u64, u16)> {
        events
            .iter()
            .map(|e| match e {
                Event::State(c) => (c.old, c.new, c.cookie.unwrap_or(0), c.remote.1),
                _ => panic!("not a state change"),
            })
            .collect()
    }

    #[test]
    fn a_child_named_late_is_held_until_its_next_transition() {
        use TcpState::*;
        let mut clones = Clones::new(true);
        let mut out = Vec::new();
        // 6.1: the child still has its listener's cookie (1) and no remote port.
        clones.sort(Event::State(change(Listen, SynRecv, 1, 0)), &mut out);
        clones.sort(Event::ChildOf { skaddr: 0xc800, listener: 1 }, &mut out);
        assert!(out.is_empty(), "held until named");
        clones.sort(Event::State(change(SynRecv, Established, 3, 43308)), &mut out);
        assert_eq!(states(&out), [(Listen, SynRecv, 3, 43308), (SynRecv, Established, 3, 43308)]);
        let Event::State(first) = &out[0] else { panic!() };
        assert_eq!(first.listener, Some(1));
        assert!(clones.held.is_empty() && clones.order.is_empty());
    }

    #[test]
    fn a_named_child_waits_only_for_its_listener() {
        use TcpState::*;
        let mut clones = Clones::new(true);
        let mut out = Vec::new();
        clones.sort(Event::State(change(Listen, SynRecv, 4, 5000)), &mut out);
        assert!(out.is_empty());
        clones.sort(Event::ChildOf { skaddr: 0xc800, listener: 9 }, &mut out);
        assert_eq!(states(&out), [(Listen, SynRecv, 4, 5000)]);
        let Event::State(first) = &out[0] else { panic!() };
        assert_eq!(first.listener, Some(9));
        // A listener's word that does not come: the next transition releases it.
        out.clear();
        clones.sort(Event::State(change(Listen, SynRecv, 5, 5001)), &mut out);
        clones.sort(Event::State(change(SynRecv, Established, 5, 5001)), &mut out);
        assert_eq!(states(&out), [(Listen, SynRecv, 5, 5001), (SynRecv, Established, 5, 5001)]);
        // Without the program that tells, a named child is not held at all.
        out.clear();
        let mut untold = Clones::new(false);
        untold.sort(Event::State(change(Listen, SynRecv, 6, 5002)), &mut out);
        assert_eq!(states(&out), [(Listen, SynRecv, 6, 5002)]);
    }
}
