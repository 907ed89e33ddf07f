//! New connections that older kernels report before naming them.
//!
//! On older kernels (6.1 among them) `inet_csk_clone_lock()` sets a new child's state to
//! SYN_RECV while the child is still a copy of its listener: the LISTEN -> SYN_RECV
//! transition carries the listener's cookie, addresses and ports, and only the child's next
//! transition (to ESTABLISHED, or CLOSE) shows what it is. Newer kernels name the child first.
//! Such a transition (a remote port of 0, which no connection has) is held back by the
//! child's kernel address until that next transition, and then given the child's identity.
use std::collections::{HashMap, VecDeque};

use crate::kernel::events::{Event, StateChange, TcpState};

/// Children held at once before the oldest is dropped: a child leaves SYN_RECV within a
/// packet or two (with TCP Fast Open, within a handshake timeout), so this bound is only
/// reached by a flood of Fast Open connections that never complete.
const MAX_HELD: usize = 4096;

#[derive(Default)]
pub struct Clones {
    held: HashMap<u64, StateChange>,
    order: VecDeque<u64>,
}

impl Clones {
    /// Appends to `out` the events to apply for `event`, in order: none while it is held,
    /// the held transition (renamed) before the child's next one.
    pub fn sort(&mut self, event: Event, out: &mut Vec<Event>) {
        let Event::State(change) = event else {
            out.push(event);
            return;
        };
        if change.old == TcpState::Listen && change.new == TcpState::SynRecv && change.remote.1 == 0
        {
            if self.held.len() >= MAX_HELD
                && let Some(oldest) = self.order.pop_front()
            {
                self.held.remove(&oldest);
            }
            self.order.push_back(change.skaddr);
            self.held.insert(change.skaddr, change);
            return;
        }
        if change.old == TcpState::SynRecv
            && let Some(mut first) = self.held.remove(&change.skaddr)
        {
            self.order.retain(|skaddr| *skaddr != change.skaddr);
            first.key = change.key;
            first.cookie = change.cookie;
            first.netns = change.netns;
            first.family = change.family;
            first.local = change.local;
            first.remote = change.remote;
            out.push(Event::State(first));
        }
        out.push(Event::State(change));
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
            task: Task { pid: 1, tid: 1, comm: "python3".into() },
            deferred_connect: false,
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
        let mut clones = Clones::default();
        let mut out = Vec::new();
        // 6.1: the child still has its listener's cookie (1) and no remote port.
        clones.sort(Event::State(change(Listen, SynRecv, 1, 0)), &mut out);
        assert!(out.is_empty(), "held");
        clones.sort(Event::State(change(SynRecv, Established, 3, 43308)), &mut out);
        assert_eq!(states(&out), [(Listen, SynRecv, 3, 43308), (SynRecv, Established, 3, 43308)]);
        // Newer kernels name the child first: nothing is held.
        out.clear();
        clones.sort(Event::State(change(Listen, SynRecv, 4, 5000)), &mut out);
        assert_eq!(states(&out), [(Listen, SynRecv, 4, 5000)]);
        assert!(clones.held.is_empty() && clones.order.is_empty());
    }
}
