//! Which sockets' rows changed, for a view that mirrors the table (`netwatch top`): kept
//! only while one is asked for, since it costs a set insertion per event.
use rustc_hash::FxHashSet;

use super::{Row, Table};
use crate::kernel::events::{Event, SockKey};

impl Table {
    /// Starts or stops noting which sockets change ([`Table::take_changed`]).
    pub fn track_changes(&mut self, on: bool) {
        match (on, &self.changed) {
            (true, None) => self.changed = Some(FxHashSet::default()),
            (false, Some(_)) => self.changed = None,
            _ => {}
        }
    }

    /// The cookies of the sockets changed since the last call (when tracking).
    pub fn take_changed(&mut self) -> Vec<u64> {
        self.changed.as_mut().map(|set| set.drain().collect()).unwrap_or_default()
    }

    pub fn has_changes(&self) -> bool {
        self.changed.as_ref().is_some_and(|set| !set.is_empty())
    }

    /// Notes that `cookie`'s row may have changed (a transition the table made).
    pub fn mark_changed(&mut self, cookie: u64) {
        if let Some(set) = &mut self.changed {
            set.insert(cookie);
        }
    }

    /// Notes the sockets `event` may change, before it is applied: the socket it names, or
    /// for a fork, exec or exit, every socket the process holds.
    pub(super) fn note_changes(&mut self, event: &Event) {
        let Some(set) = &mut self.changed else { return };
        let cookie = match event {
            Event::Created(life) | Event::Released(life) => Some(life.cookie),
            Event::Accepted(fd)
            | Event::FdOpened(fd)
            | Event::FdClosed(fd)
            | Event::Addresses(fd) => Some(fd.cookie),
            Event::Reset { cookie, .. } => Some(*cookie),
            Event::State(change) => change.cookie,
            Event::Forked { parent: task, .. } | Event::Exec(task) | Event::Exit(task) => {
                let held = self.by_pid.get(&task.pid).into_iter().flatten();
                set.extend(held.filter_map(|key| match key {
                    SockKey::Cookie(cookie) => Some(*cookie),
                    SockKey::Addr { .. } => None,
                }));
                None
            }
            Event::Retransmit(_) | Event::ChildOf { .. } => None,
        };
        set.extend(cookie);
    }

    /// The row [`Table::rows_where`] would give for `cookie`, if it lists that socket.
    pub fn row(&self, cookie: u64, now_ns: u64) -> Option<Row> {
        let key = SockKey::Cookie(cookie);
        self.row_of(&key, self.sockets.get(&key)?, now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{change, created, fd_event, released, task};
    use super::*;
    use crate::{host::snapshot::Protocol, kernel::events::TcpState::*};

    fn changed(table: &mut Table) -> Vec<u64> {
        let mut cookies = table.take_changed();
        cookies.sort_unstable();
        cookies
    }

    #[test]
    fn sockets_an_event_touches_are_noted_only_while_tracked() {
        let mut table = Table::new();
        table.apply(created(1, 0, task(10, "app")));
        table.track_changes(true);
        assert!(!table.has_changes(), "nothing before tracking");
        table.apply(change(1, 10, Close, SynSent, task(10, "app")));
        table.apply(Event::FdOpened(fd_event(2, 4, task(10, "app"), Protocol::Udp)));
        assert!(table.has_changes());
        assert_eq!(changed(&mut table), [1, 2]);
        assert!(changed(&mut table).is_empty(), "taken once");
        // A fork, exec or exit changes the holders of every socket the process holds.
        table.apply(Event::FdOpened(fd_event(1, 3, task(10, "app"), Protocol::Tcp)));
        table.take_changed();
        table.apply(Event::Forked { ts_ns: 20, parent: task(10, "app"), child_tgid: 11 });
        assert_eq!(changed(&mut table), [1, 2]);
        table.apply(Event::Exit(task(11, "app")));
        assert_eq!(changed(&mut table), [1, 2]);
        // A row that is gone is noted too: the view asks, and finds it no longer listed.
        table.apply(released(2, 30));
        assert_eq!(changed(&mut table), [2]);
        assert!(table.row(2, 40).is_none() && table.row(1, 40).is_some());
        table.track_changes(false);
        table.apply(change(1, 50, SynSent, Established, task(0, "swapper/0")));
        assert!(!table.has_changes() && table.take_changed().is_empty());
    }
}
