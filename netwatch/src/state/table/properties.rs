//! Property: the table does not depend on where the snapshot fell. Sockets live through
//! random (truncated, interleaved) lifecycles; a snapshot is taken after event k, and the
//! queue the agent applies after it starts at any earlier event j (events during the
//! snapshot are both in it and queued). The rows must equal those of a table that saw every
//! event from the start.
use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;

use super::*;
use crate::kernel::events::{Family, SockLife, StateSource};
use crate::kernel::events::{StateChange, Task};

fn task(pid: u32) -> Task {
    Task { pid, tid: pid, comm: compact_str::format_compact!("p{pid}"), cgroup: 0 }
}

fn on_cpu() -> Task {
    Task { pid: 0, tid: 0, comm: "swapper/0".into(), cgroup: 0 }
}

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn state(cookie: u64, old: TcpState, new: TcpState, lport: u16, by: Task) -> Event {
    Event::State(StateChange {
        ts_ns: 0,
        source: StateSource::TpBtf,
        key: SockKey::Cookie(cookie),
        cookie: Some(cookie),
        skaddr: 0,
        inode: 1000 + cookie,
        netns: 1,
        family: Family::Ipv4,
        local: (LO, lport),
        remote: (
            if new == TcpState::Listen { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { LO },
            if new == TcpState::Listen { 0 } else { 80 },
        ),
        old,
        new,
        task: by,
        deferred_connect: false,
        timewait: None,
        listener: None,
        totals: None,
    })
}

fn fd(
    kind: fn(FdSocket) -> Event,
    cookie: u64,
    fd: i32,
    protocol: Protocol,
    local: u16,
    remote: u16,
    by: Task,
) -> Event {
    kind(FdSocket {
        ts_ns: 0,
        cookie,
        fd,
        inode: 1000 + cookie,
        task: by,
        protocol,
        family: Family::Ipv4,
        netns: 1,
        state: Some(if remote != 0 { TcpState::Established } else { TcpState::Close }),
        local: (LO, local),
        remote: (if remote != 0 { LO } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) }, remote),
    })
}

fn life(kind: fn(SockLife) -> Event, cookie: u64, by: Task) -> Event {
    kind(SockLife { ts_ns: 0, cookie, task: by })
}

/// The full lifecycle of socket `cookie` of one of four kinds, owned by pid 100 + cookie.
fn lifecycle(shape: u8, cookie: u64) -> Vec<Event> {
    use TcpState::*;
    let me = || task(100 + cookie as u32);
    let port = 40_000 + cookie as u16;
    match shape % 4 {
        0 => vec![
            life(Event::Created, cookie, me()),
            fd(Event::FdOpened, cookie, 3, Protocol::Tcp, 0, 0, me()),
            state(cookie, Close, SynSent, port, me()),
            state(cookie, SynSent, Established, port, on_cpu()),
            life(Event::Released, cookie, me()),
            state(cookie, Established, FinWait1, port, me()),
            state(cookie, FinWait1, FinWait2, port, on_cpu()),
            state(cookie, FinWait2, Close, port, on_cpu()),
        ],
        1 => vec![
            life(Event::Created, cookie, me()),
            fd(Event::FdOpened, cookie, 4, Protocol::Tcp, 0, 0, me()),
            state(cookie, Close, Listen, port, me()),
            fd(Event::FdOpened, cookie, 9, Protocol::Tcp, port, 0, me()),
            fd(Event::FdClosed, cookie, 9, Protocol::Tcp, port, 0, me()),
            life(Event::Released, cookie, me()),
            state(cookie, Listen, Close, port, me()),
        ],
        2 => vec![
            life(Event::Created, cookie, me()),
            fd(Event::FdOpened, cookie, 5, Protocol::Tcp, 0, 0, me()),
            state(cookie, Close, SynSent, port, me()),
            state(cookie, SynSent, Close, port, on_cpu()),
            fd(Event::FdClosed, cookie, 5, Protocol::Tcp, port, 80, me()),
            life(Event::Released, cookie, me()),
        ],
        _ => vec![
            life(Event::Created, cookie, me()),
            fd(Event::FdOpened, cookie, 6, Protocol::Udp, 0, 0, me()),
            fd(Event::Addresses, cookie, 6, Protocol::Udp, port, 0, me()),
            fd(Event::FdOpened, cookie, 7, Protocol::Udp, port, 0, me()),
            fd(Event::Addresses, cookie, 6, Protocol::Udp, port, 53, me()),
            fd(Event::FdClosed, cookie, 7, Protocol::Udp, port, 53, me()),
            life(Event::Released, cookie, me()),
        ],
    }
}

/// Cookie, state, endpoints and (pid, fd, comm) holders of a row.
type Comparable = (u64, TcpState, (IpAddr, u16), (IpAddr, u16), Vec<(u32, i32, String)>);

/// What must not depend on the snapshot's timing.
fn comparable(table: &Table) -> Vec<Comparable> {
    let mut rows: Vec<_> = table
        .rows(1_000_000)
        .into_iter()
        .map(|r| {
            let owners = r.owners.iter().map(|o| (o.pid, o.fd, o.comm.to_string())).collect();
            (r.row.cookie, r.row.state, r.row.local, r.row.remote, owners)
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    rows
}

fn apply_all(table: &mut Table, events: &[Event]) {
    for (i, event) in events.iter().enumerate() {
        let mut event = event.clone();
        let ts = 10 * (i as u64 + 1);
        match &mut event {
            Event::State(c) => c.ts_ns = ts,
            Event::Created(l) | Event::Released(l) => l.ts_ns = ts,
            Event::Accepted(f) | Event::FdOpened(f) | Event::FdClosed(f) | Event::Addresses(f) => {
                f.ts_ns = ts
            }
            _ => {}
        }
        table.apply(event);
    }
}

prop_compose! {
    /// Up to four sockets, each cut short at a random point, interleaved at random.
    fn scenario()(shapes in prop::collection::vec((any::<u8>(), 0usize..9), 1..5), order in prop::collection::vec(any::<u8>(), 0..64))
        -> Vec<Event>
    {
        let mut queues: Vec<std::collections::VecDeque<Event>> = shapes
            .iter()
            .enumerate()
            .map(|(i, (shape, cut))| {
                let events = lifecycle(*shape, i as u64 + 1);
                let keep = (*cut).min(events.len());
                events.into_iter().take(keep).collect()
            })
            .collect();
        let mut merged = Vec::new();
        let mut picks = order.into_iter().cycle();
        while queues.iter().any(|q| !q.is_empty()) {
            let live: Vec<usize> = (0..queues.len()).filter(|i| !queues[*i].is_empty()).collect();
            let pick = live[usize::from(picks.next().unwrap_or(0)) % live.len()];
            merged.extend(queues[pick].pop_front());
        }
        merged
    }
}

proptest! {
    #[test]
    fn snapshot_timing_does_not_change_the_table(events in scenario(), k_frac in 0.0f64..=1.0, j_frac in 0.0f64..=1.0) {
        let n = events.len();
        let k = ((n as f64) * k_frac) as usize;
        let j = ((k as f64) * j_frac) as usize;

        let mut reference = Table::new();
        apply_all(&mut reference, &events);

        // What a snapshot taken after event k shows: rows and their holders.
        let mut before = Table::new();
        apply_all(&mut before, &events[..k]);
        let rows = before.rows(1_000);
        let snapshot_rows: Vec<SocketRow> = rows.iter().map(|r| r.row.clone()).collect();
        let owners = before.holders_by_inode();

        let mut seeded = Table::new();
        seeded.seed(&snapshot_rows, &owners, 1_000);
        apply_all(&mut seeded, &events[j..]);

        prop_assert_eq!(comparable(&seeded), comparable(&reference));
    }
}
