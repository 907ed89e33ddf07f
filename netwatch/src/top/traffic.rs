//! Live bytes and rates for the connections on screen: one sock_diag `tcp_info` lookup per
//! visible TCP connection per refresh (about one a second), in the connection's own
//! namespace. No event carries byte counts while a connection is open, so they are asked of
//! the kernel, and only for the rows that are shown.
use std::{collections::HashMap, path::PathBuf, time::Duration};

use super::model::Model;
use crate::{
    host::{
        snapshot::{Protocol, network_namespaces},
        sock_diag::DiagSocket,
    },
    kernel::events::TcpState,
};

/// How long sock_diag sockets are kept open: each pins its namespace, so a deleted one is
/// let go of within this.
const REOPEN: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Traffic {
    paths: HashMap<u32, PathBuf>,
    sockets: HashMap<u32, DiagSocket>,
    opened: Option<std::time::Instant>,
}

impl Traffic {
    /// Looks up the byte counts of the connections `cookies` (those on screen).
    pub fn refresh(&mut self, model: &mut Model, cookies: &[u64], now_ns: u64) {
        if self.opened.is_none_or(|at| at.elapsed() > REOPEN) {
            self.sockets.clear();
            self.paths = network_namespaces().into_iter().map(|ns| (ns.inode, ns.path)).collect();
            self.opened = Some(std::time::Instant::now());
        }
        for cookie in cookies {
            let Some(conn) = model.conns.get(cookie) else { continue };
            let row = conn.row();
            let carries_data = !matches!(
                row.state,
                TcpState::Listen | TcpState::SynSent | TcpState::SynRecv | TcpState::TimeWait
            );
            if row.protocol != Protocol::Tcp || !carries_data {
                continue;
            }
            let (netns, family, local, remote) = (row.netns, row.family, row.local, row.remote);
            let Some(socket) = self.socket(netns) else { continue };
            match socket.tcp_info(family, local, remote, *cookie) {
                Ok(Some(info)) => {
                    model.set_traffic(*cookie, info.bytes_acked, info.bytes_received, now_ns)
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!("tcp_info in netns {netns}: {error}");
                    self.sockets.remove(&netns);
                }
            }
        }
    }

    fn socket(&mut self, netns: u32) -> Option<&mut DiagSocket> {
        use std::collections::hash_map::Entry;
        match self.sockets.entry(netns) {
            Entry::Occupied(open) => Some(open.into_mut()),
            Entry::Vacant(slot) => {
                let path = self.paths.get(&netns)?;
                match DiagSocket::open(path, netns) {
                    Ok(socket) => Some(slot.insert(socket)),
                    Err(error) => {
                        tracing::debug!("sock_diag in netns {netns}: {error}");
                        None
                    }
                }
            }
        }
    }
}
