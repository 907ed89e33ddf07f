//! Timewait sockets.
use std::{collections::HashSet, net::IpAddr};

use crate::kernel::events::{Family, SockKey, TcpState};

use super::Table;

/// A timewait socket to look up again: its cookie and where to find it.
#[derive(Clone, Debug, PartialEq)]
pub struct TimewaitSocket {
    pub cookie: u64,
    pub netns: u32,
    pub family: Family,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
}

impl Table {
    /// Timewait sockets whose substate is FIN_WAIT2 (orphans whose peer has not closed yet).
    pub fn timewait_in_fin_wait2(&self) -> Vec<TimewaitSocket> {
        self.sockets
            .iter()
            .filter_map(|(key, socket)| {
                let (SockKey::Cookie(cookie), Some(facts)) = (key, &socket.facts) else {
                    return None;
                };
                (socket.state == Some(TcpState::FinWait2) && facts.expires_ns.is_some()).then_some(
                    TimewaitSocket {
                        cookie: *cookie,
                        netns: facts.netns,
                        family: facts.family,
                        local: facts.local,
                        remote: facts.remote,
                    },
                )
            })
            .collect()
    }

    /// Drops a socket that is known to be gone.
    pub fn forget(&mut self, cookie: u64) {
        self.sockets.remove(&SockKey::Cookie(cookie));
    }

    /// Network namespaces the table has sockets in.
    pub fn namespaces(&self) -> HashSet<u32> {
        self.sockets.values().filter_map(|s| s.facts.as_ref().map(|f| f.netns)).collect()
    }

    /// Forgets the sockets of a network namespace that is gone. The kernel destroys its
    /// timewait, orphaned and not yet accepted sockets with it and reports none of them;
    /// sockets some process holds keep a namespace alive, so they stay.
    pub fn forget_namespace(&mut self, netns: u32) {
        self.sockets.retain(|_, socket| {
            !socket.holders.is_empty() || socket.facts.as_ref().is_none_or(|f| f.netns != netns)
        });
    }

    /// Forgets timewait sockets whose time is up.
    pub fn expire(&mut self, now_ns: u64) {
        self.sockets.retain(|_, socket| {
            socket.facts.as_ref().and_then(|f| f.expires_ns).is_none_or(|end| end > now_ns)
        });
    }
}
