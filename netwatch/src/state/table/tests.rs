//! Unit tests of the table: ownership, holders, listeners, failures, timewait.
use std::net::{IpAddr, Ipv4Addr};

use super::{close::CLOSED_KEPT, *};
use crate::kernel::events::{Family, SockLife, StateSource};
use crate::kernel::events::{Retransmit, StateChange, Task, Totals};
use TcpState::*;
use std::collections::HashMap;

pub(super) fn task(pid: u32, comm: &str) -> Task {
    Task { pid, tid: pid, comm: comm.into(), cgroup: 0 }
}

pub(super) fn change(cookie: u64, ts_ns: u64, old: TcpState, new: TcpState, on_cpu: Task) -> Event {
    Event::State(StateChange {
        ts_ns,
        source: StateSource::TpBtf,
        key: SockKey::Cookie(cookie),
        cookie: Some(cookie),
        skaddr: 0,
        inode: 0,
        netns: 1,
        family: Family::Ipv4,
        local: (IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
        remote: (IpAddr::V4(Ipv4Addr::LOCALHOST), 40000),
        old,
        new,
        task: on_cpu,
        deferred_connect: false,
        timewait: None,
        listener: None,
        totals: None,
    })
}

pub(super) fn created(cookie: u64, ts_ns: u64, by: Task) -> Event {
    Event::Created(SockLife { ts_ns, cookie, task: by })
}

pub(super) fn released(cookie: u64, ts_ns: u64) -> Event {
    Event::Released(SockLife { ts_ns, cookie, task: task(1, "x") })
}

#[test]
fn first_transition_counts_from_creation() {
    let mut table = Table::new();
    assert_eq!(table.apply(created(1, 1_000, task(10, "curl"))), None);
    let t = table.apply(change(1, 4_000, Close, SynSent, task(10, "curl"))).unwrap();
    assert_eq!(t.in_old_state_ns, Some(3_000));
    let t = table.apply(change(1, 9_000, SynSent, Established, task(0, "swapper/1"))).unwrap();
    assert_eq!(t.in_old_state_ns, Some(5_000));
    assert_eq!(t.owner, Some(Owner { pid: 10, comm: "curl".into(), cgroup_id: 0 }));
}

#[test]
fn softirq_task_never_becomes_owner() {
    let mut table = Table::new();
    // Seen mid-life: no owner known, and the on-CPU task must not be taken as one.
    let t = table.apply(change(2, 10, Established, CloseWait, task(99, "peer"))).unwrap();
    assert_eq!(t.owner, None);
    assert_eq!(t.in_old_state_ns, None, "did not see ESTABLISHED begin");
    // close() by the owner names it.
    let t = table.apply(change(2, 20, CloseWait, LastAck, task(7, "server"))).unwrap();
    assert_eq!(t.owner, Some(Owner { pid: 7, comm: "server".into(), cgroup_id: 0 }));
    assert_eq!(t.in_old_state_ns, Some(10));
    let t = table.apply(change(2, 30, LastAck, Close, task(0, "swapper/0"))).unwrap();
    assert_eq!(t.owner, Some(Owner { pid: 7, comm: "server".into(), cgroup_id: 0 }));
}

#[test]
fn passive_socket_inherits_the_listener_owner() {
    let mut table = Table::new();
    table.apply(created(5, 0, task(7, "server")));
    let t = table.apply(change(5, 100, Close, Listen, task(7, "server"))).unwrap();
    assert_eq!(t.in_old_state_ns, Some(100));
    // The child is cloned in softirq while the client is on the CPU.
    let t = table.apply(change(6, 200, Listen, SynRecv, task(8, "client"))).unwrap();
    assert_eq!(t.owner, Some(Owner { pid: 7, comm: "server".into(), cgroup_id: 0 }));
    assert_eq!(t.in_old_state_ns, None, "the child never was in LISTEN itself");
    let t = table.apply(change(6, 250, SynRecv, Established, task(8, "client"))).unwrap();
    assert_eq!(t.owner, Some(Owner { pid: 7, comm: "server".into(), cgroup_id: 0 }));
    assert_eq!(t.in_old_state_ns, Some(50));
}

#[test]
fn the_accepting_process_takes_over_from_the_listener() {
    let mut table = Table::new();
    table.apply(change(5, 100, Close, Listen, task(7, "master")));
    table.apply(change(6, 200, Listen, SynRecv, task(8, "client")));
    table.apply(change(6, 250, SynRecv, Established, task(8, "client")));
    assert_eq!(
        table.apply(Event::Accepted(fd_event(6, 9, task(70, "worker"), Protocol::Tcp))),
        None
    );
    let t = table.apply(change(6, 400, Established, CloseWait, task(8, "client"))).unwrap();
    assert_eq!(t.owner, Some(Owner { pid: 70, comm: "worker".into(), cgroup_id: 0 }));
}

/// An accept seen at its graft (no fd yet) makes the acceptor the owner at once but lists no
/// holder; the fd, when it comes, does, and the accept queue counts the accept once.
#[test]
fn a_graft_takes_the_owner_and_the_fd_comes_after() {
    let mut table = Table::new();
    table.apply(change(5, 100, Close, Listen, task(7, "master")));
    table.apply(change(6, 200, Listen, SynRecv, task(8, "client")));
    table.apply(change(6, 250, SynRecv, Established, task(8, "client")));
    table.apply(Event::Accepted(fd_event(6, -1, task(70, "worker"), Protocol::Tcp)));
    assert!(!table.holds(6, 70), "no fd yet");
    let t = table.apply(change(6, 300, Established, CloseWait, task(8, "client"))).unwrap();
    assert_eq!(t.owner, Some(Owner { pid: 70, comm: "worker".into(), cgroup_id: 0 }));
    table.apply(Event::Accepted(fd_event(6, 9, task(70, "worker"), Protocol::Tcp)));
    assert_eq!(holders(&table, 6), [(70, 9, "worker".to_string())]);
    let queue = table.listeners().into_iter().find(|l| l.cookie == 5).unwrap();
    assert_eq!(queue.queue.accepted, 1, "{:?}", queue.queue);
}

pub(super) fn fd_event(cookie: u64, fd: i32, by: Task, protocol: Protocol) -> FdSocket {
    FdSocket {
        ts_ns: 1,
        cookie,
        fd,
        inode: 1000 + cookie,
        task: by,
        protocol,
        family: Family::Ipv4,
        netns: 1,
        state: Some(if protocol == Protocol::Udp { Close } else { Established }),
        local: (IpAddr::V4(Ipv4Addr::LOCALHOST), 5353),
        remote: (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
    }
}

fn holders(table: &Table, cookie: u64) -> Vec<(u32, i32, String)> {
    let rows = table.rows(0);
    let row = rows.iter().find(|r| r.row.cookie == cookie).expect("listed");
    row.owners.iter().map(|o| (o.pid, o.fd, o.comm.to_string())).collect()
}

#[test]
fn holders_follow_fds_across_dup_fork_exec_close_and_exit() {
    let mut table = Table::new();
    let udp = |fd, by| fd_event(1, fd, by, Protocol::Udp);
    table.apply(Event::FdOpened(udp(3, task(10, "app"))));
    table.apply(Event::FdOpened(udp(4, task(10, "app")))); // dup
    table.apply(Event::Forked { ts_ns: 2, parent: task(10, "app"), child_tgid: 11 });
    let expected = |list: &[(u32, i32, &str)]| {
        list.iter().map(|(p, f, c)| (*p, *f, c.to_string())).collect::<Vec<_>>()
    };
    assert_eq!(
        holders(&table, 1),
        expected(&[(10, 3, "app"), (10, 4, "app"), (11, 3, "app"), (11, 4, "app")])
    );
    table.apply(Event::Exec(task(11, "helper")));
    table.apply(Event::FdClosed(udp(4, task(10, "app"))));
    assert_eq!(
        holders(&table, 1),
        expected(&[(10, 3, "app"), (11, 3, "helper"), (11, 4, "helper")])
    );
    // The exec closed fd 4 (close-on-exec); fd 3 is still the same socket.
    table.keep_open_fds(11, &HashMap::from([(3, 1001), (4, 7777)]));
    assert_eq!(holders(&table, 1), expected(&[(10, 3, "app"), (11, 3, "helper")]));
    table.apply(Event::Exit(task(11, "helper")));
    assert_eq!(holders(&table, 1), expected(&[(10, 3, "app")]));
    // A fork after the exit does not bring the dead child's fds back.
    table.apply(Event::Forked { ts_ns: 3, parent: task(10, "app"), child_tgid: 12 });
    assert_eq!(holders(&table, 1), expected(&[(10, 3, "app"), (12, 3, "app")]));
    table.apply(released(1, 9));
    assert!(table.is_empty() && table.by_pid.is_empty(), "released UDP sockets leave no trace");
}

#[test]
fn udp_rows_appear_once_bound_and_follow_connect() {
    let mut table = Table::new();
    let mut unbound = fd_event(2, 5, task(20, "dig"), Protocol::Udp);
    unbound.local.1 = 0;
    table.apply(Event::FdOpened(unbound.clone()));
    assert!(table.rows(0).is_empty(), "ss lists no unbound UDP socket");
    let mut connected = unbound;
    connected.local.1 = 40000;
    connected.remote = (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)), 53);
    connected.state = Some(Established);
    table.apply(Event::Addresses(connected.clone()));
    let rows = table.rows(0);
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].row.state, rows[0].row.local.1, rows[0].row.remote.1),
        (Established, 40000, 53)
    );
    assert_eq!(rows[0].owners[0].pid, 20);
    // Connecting to a new peer restarts the time in state; the same peer again does not.
    let first = connected.ts_ns;
    let mut again = connected;
    again.ts_ns = first + 1_000;
    table.apply(Event::Addresses(again.clone()));
    assert_eq!(table.rows(5_000)[0].in_state_ns, Some(5_000 - first));
    again.remote.1 = 5353;
    again.ts_ns = 4_000;
    table.apply(Event::Addresses(again));
    assert_eq!(table.rows(5_000)[0].in_state_ns, Some(1_000));
}

/// The timewait socket sock_diag would find for `change`'s socket: same cookie and 4-tuple.
fn timewait_row(cookie: u64, state: TcpState, remaining_ms: u32) -> SocketRow {
    let mut tw = row(cookie, state, 8080, 0);
    tw.timer = Some(Timer { kind: TimerKind::Timewait, remaining_ms });
    tw
}

/// A connection closed actively by its owner (pid 10), its full socket gone at 50 µs with
/// `totals`, into a timewait socket in `tw_state`.
fn closed_into_timewait(table: &mut Table, tw_state: TcpState) -> Option<Transition> {
    table.apply(created(1, 1_000, task(10, "curl")));
    table.apply(change(1, 2_000, Close, SynSent, task(10, "curl")));
    table.apply(change(1, 3_000, SynSent, Established, task(0, "swapper/0")));
    table.apply(change(1, 10_000, Established, FinWait1, task(10, "curl")));
    table.apply(change(1, 20_000, FinWait1, FinWait2, task(0, "swapper/0")));
    table.apply(released(1, 21_000));
    let Event::State(mut close) = change(1, 50_000, FinWait2, Close, task(0, "swapper/0")) else {
        unreachable!()
    };
    close.totals =
        Some(Totals { bytes_sent: 100, bytes_received: 2000, retransmits: 1, unread: 0 });
    close.timewait = Some(tw_state);
    table.apply(Event::State(close))
}

#[test]
fn a_close_into_timewait_goes_on_in_time_wait_and_ends_with_the_summary() {
    let mut table = Table::new();
    let into = closed_into_timewait(&mut table, TimeWait).unwrap();
    assert_eq!((into.change.old, into.change.new), (FinWait2, TimeWait));
    assert_eq!(
        (into.in_old_state_ns, into.lifespan_ns, into.change.totals),
        (Some(30_000), None, None)
    );
    assert_eq!(into.owner, Some(Owner { pid: 10, comm: "curl".into(), cgroup_id: 0 }));
    let rows = table.rows(30_000_050_000);
    assert_eq!((rows[0].row.state, rows[0].row.timer.unwrap().remaining_ms), (TimeWait, 30_000));
    // Still there at the check before its expiry: nothing changes.
    assert!(
        table.reconcile_timewait(1, &[timewait_row(1, TimeWait, 1_000)], 59_000_050_000).is_empty()
    );

    let end = table.reconcile_timewait(1, &[], 60_000_100_000);
    assert_eq!(end.len(), 1);
    let end = &end[0];
    assert_eq!(
        (end.change.old, end.change.new, end.ending),
        (TimeWait, Close, Some(Ending::Expired))
    );
    assert_eq!(end.change.source, StateSource::SockDiag);
    assert_eq!(end.in_old_state_ns, Some(60_000_100_000 - 50_000));
    assert_eq!(end.lifespan_ns, Some(60_000_100_000 - 1_000), "born to the end of TIME_WAIT");
    assert_eq!(end.change.totals.map(|t| t.bytes_received), Some(2000), "the full socket's totals");
    assert_eq!(end.owner, Some(Owner { pid: 10, comm: "curl".into(), cgroup_id: 0 }));
    assert!(table.is_empty() && table.timewait_namespaces(0).is_empty());
}

#[test]
fn a_new_connection_on_the_four_tuple_ends_the_timewait_socket_first() {
    let mut table = Table::new();
    closed_into_timewait(&mut table, TimeWait);
    let reconnect = table.apply(change(2, 2_000_000_000, Close, SynSent, task(11, "curl")));
    assert_eq!(reconnect.map(|t| t.change.new), Some(SynSent));
    let ended = table.take_ended();
    assert_eq!(ended.len(), 1);
    assert_eq!((ended[0].change.key, ended[0].ending), (SockKey::Cookie(1), Some(Ending::Reused)));
    assert_eq!(ended[0].in_old_state_ns, Some(2_000_000_000 - 50_000));
    assert!(table.take_ended().is_empty());
}

#[test]
fn a_timewait_socket_gone_before_its_time_vanished() {
    let mut table = Table::new();
    closed_into_timewait(&mut table, TimeWait);
    let end = table.reconcile_timewait(1, &[], 5_000_000_000);
    assert_eq!(end[0].ending, Some(Ending::Vanished));
}

#[test]
fn the_fin_wait2_substate_turns_to_time_wait_when_sock_diag_says_so() {
    let mut table = Table::new();
    assert_eq!(closed_into_timewait(&mut table, FinWait2), None, "no change the user can see");
    assert_eq!(table.rows(60_000)[0].row.state, FinWait2);
    assert_eq!(table.timewait_namespaces(60_000).get(&1), Some(&true), "due: FIN_WAIT2");
    let turned = table.reconcile_timewait(1, &[timewait_row(1, TimeWait, 60_000)], 1_000_000_000);
    assert_eq!((turned[0].change.old, turned[0].change.new), (FinWait2, TimeWait));
    assert_eq!(turned[0].in_old_state_ns, Some(1_000_000_000 - 20_000), "FIN_WAIT2 since 20 µs");
    assert_eq!(table.timewait_namespaces(2_000_000_000).get(&1), Some(&false));
}

#[test]
fn a_deleted_namespace_ends_its_timewait_sockets_only() {
    let mut table = Table::new();
    closed_into_timewait(&mut table, TimeWait);
    // An orphan still closing holds a reference to its namespace: it ends with an event.
    table.apply(change(5, 60_000, Established, FinWait1, task(20, "sshd")));
    table.apply(released(5, 61_000));
    let ended = table.forget_namespace(1, 9_000_000_000);
    assert_eq!(ended.len(), 1);
    assert_eq!((ended[0].change.old, ended[0].ending), (TimeWait, Some(Ending::NetnsDeleted)));
    assert_eq!(table.len(), 1, "the orphan is still there");
    assert!(table.timewait_namespaces(0).is_empty());
}

#[test]
fn a_timewait_socket_replaced_on_its_four_tuple_ended_reused() {
    let mut table = Table::new();
    closed_into_timewait(&mut table, TimeWait);
    // A new connection on the same 4-tuple whose SYN_SENT came without its port (no
    // sock_ops), closed into TIME_WAIT in turn.
    let mut no_port = change(2, 2_000_000_000, Close, SynSent, task(11, "curl"));
    if let Event::State(c) = &mut no_port {
        c.local.1 = 0;
    }
    table.apply(no_port);
    assert!(table.take_ended().is_empty(), "not known to be the same 4-tuple yet");
    let Event::State(mut close) = change(2, 3_000_000_000, FinWait2, Close, task(0, "swapper/0"))
    else {
        unreachable!()
    };
    close.timewait = Some(TimeWait);
    table.apply(Event::State(close));
    let ended = table.take_ended();
    assert_eq!(ended.len(), 1);
    assert_eq!((ended[0].change.key, ended[0].ending), (SockKey::Cookie(1), Some(Ending::Reused)));
    assert_eq!(table.rows(3_000_000_000).len(), 1, "one TIME-WAIT row, as ss shows");
}

#[test]
fn an_unaccepted_connection_whose_listener_closed_failed_by_it() {
    let mut table = Table::new();
    table.apply(change(7, 1_000, Close, Listen, task(40, "server")));
    table.apply(change(8, 2_000, Listen, SynRecv, task(0, "swapper/0")));
    table.apply(change(8, 3_000, SynRecv, Established, task(0, "swapper/0")));
    table.apply(change(7, 4_000, Listen, Close, task(40, "server")));
    let t = table.apply(change(8, 4_100, Established, Close, task(40, "server"))).unwrap();
    assert_eq!(t.failure, Some(Failure::ListenerClosed));
}

#[test]
fn closed_tcp_sockets_are_not_listed_but_keep_their_holders() {
    let mut table = Table::new();
    table.apply(Event::FdOpened(fd_event(3, 7, task(30, "curl"), Protocol::Tcp)));
    table.apply(change(3, 10, Close, SynSent, task(30, "curl")));
    assert_eq!(table.rows(20)[0].in_state_ns, Some(10));
    table.apply(change(3, 30, SynSent, Close, task(0, "swapper/0")));
    assert!(table.rows(40).is_empty(), "a refused socket is not hashed: ss does not list it");
    table.apply(change(3, 50, Close, SynSent, task(30, "curl")));
    assert_eq!(holders(&table, 3), [(30, 7, "curl".to_string())]);
}

fn row(cookie: u64, state: TcpState, local_port: u16, inode: u64) -> SocketRow {
    SocketRow {
        netns: 1,
        protocol: Protocol::Tcp,
        family: Family::Ipv4,
        state,
        local: (IpAddr::V4(Ipv4Addr::LOCALHOST), local_port),
        remote: (IpAddr::V4(Ipv4Addr::LOCALHOST), 40000),
        cookie,
        inode,
        uid: 0,
        recv_q: 0,
        send_q: 0,
        timer: None,
        v6only: false,
        scope: None,
    }
}

#[test]
fn snapshot_seeds_owners_and_listeners_but_not_state_times() {
    let mut table = Table::new();
    let holder = |pid, comm: &str| Holder {
        pid,
        comm: comm.into(),
        fd: 3,
        start_time: Some(1),
        cgroup_id: 0,
    };
    let owners = HashMap::from([
        (10, vec![holder(7, "nginx"), holder(8, "nginx")]),
        (11, vec![holder(9, "app")]),
    ]);
    table.seed(&[row(1, Established, 5000, 11), row(2, Listen, 8080, 10)], &owners, 0);
    // A transition out of a snapshot state: owner known, time in state not.
    let t = table.apply(change(1, 50, Established, FinWait1, task(9, "app"))).unwrap();
    assert_eq!((t.owner.unwrap().pid, t.in_old_state_ns), (9, None));
    let t = table.apply(change(1, 70, FinWait1, FinWait2, task(0, "swapper/0"))).unwrap();
    assert_eq!(t.in_old_state_ns, Some(20));
    // A new connection to the seeded listener belongs to its first holder.
    let t = table.apply(change(3, 100, Listen, SynRecv, task(55, "client"))).unwrap();
    assert_eq!(t.owner, Some(Owner { pid: 7, comm: "nginx".into(), cgroup_id: 0 }));
}

#[test]
fn queued_events_win_over_the_snapshot() {
    let mut table = Table::new();
    // The snapshot saw the socket ESTABLISHED; the queue holds its earlier transitions
    // and the close that happened while the snapshot was being taken.
    table.seed(&[row(1, Established, 5000, 0)], &HashMap::new(), 0);
    table.apply(change(1, 10, Close, SynSent, task(4, "curl")));
    table.apply(change(1, 20, SynSent, Established, task(0, "swapper/0")));
    table.apply(change(1, 30, Established, Close, task(4, "curl")));
    table.apply(released(1, 40));
    assert!(table.is_empty(), "a socket closed during the snapshot is not resurrected");
}

#[test]
fn owner_history_keeps_each_takeover() {
    let mut table = Table::new();
    table.apply(change(5, 100, Close, Listen, task(7, "master")));
    table.apply(change(6, 200, Listen, SynRecv, task(8, "client")));
    table.apply(Event::Accepted(fd_event(6, 9, task(70, "worker"), Protocol::Tcp)));
    let rows = table.rows(1_000);
    let child = rows.iter().find(|r| r.row.cookie == 6).unwrap();
    let history: Vec<(Option<u64>, u32)> =
        child.owner_history.iter().map(|(ago, o)| (*ago, o.pid)).collect();
    assert_eq!(history, [(Some(800), 7), (Some(999), 70)]);
}

#[test]
fn failures_are_classified_at_close() {
    let failure = |events: Vec<Event>| {
        let mut table = Table::new();
        events.into_iter().filter_map(|e| table.apply(e)).last().and_then(|t| t.failure)
    };
    let reset = |cookie| Event::Reset { ts_ns: 0, cookie };
    let syn = |c| change(c, 1, Close, SynSent, task(1, "app"));
    assert_eq!(
        failure(vec![syn(1), reset(1), change(1, 2, SynSent, Close, task(0, "swapper/0"))]),
        Some(Failure::Refused)
    );
    assert_eq!(
        failure(vec![syn(2), change(2, 2, SynSent, Close, task(0, "swapper/0"))]),
        Some(Failure::Timeout)
    );
    assert_eq!(
        failure(vec![syn(3), released(3, 2), change(3, 3, SynSent, Close, task(1, "app"))]),
        Some(Failure::Aborted)
    );
    let established = change(4, 2, SynSent, Established, task(0, "swapper/0"));
    assert_eq!(
        failure(vec![
            syn(4),
            established.clone(),
            reset(4),
            change(4, 3, Established, Close, task(0, "x"))
        ]),
        Some(Failure::Reset)
    );
    let fin = change(4, 3, Established, FinWait1, task(1, "app"));
    assert_eq!(failure(vec![syn(4), established.clone(), fin.clone()]), None, "not at CLOSE");
    let fin_close = change(4, 4, FinWait2, Close, task(0, "x"));
    assert_eq!(failure(vec![syn(4), established.clone(), fin, fin_close]), None, "orderly");
    let abort = change(4, 3, Established, Close, task(1, "app"));
    assert_eq!(
        failure(vec![syn(4), established.clone(), released(4, 3), abort.clone()]),
        Some(Failure::ResetSent),
        "close() with SO_LINGER 0 or unread data"
    );
    assert_eq!(
        failure(vec![syn(4), established.clone(), abort]),
        Some(Failure::Timeout),
        "the kernel gave up on a connection its owner still holds"
    );
    // A server that shut its side down, then closed with the client's data unread.
    let shut = change(4, 3, Established, FinWait1, task(1, "app"));
    let half = change(4, 4, FinWait1, FinWait2, task(0, "x"));
    let Event::State(mut unread_close) = change(4, 5, FinWait2, Close, task(1, "app")) else {
        unreachable!()
    };
    unread_close.totals =
        Some(Totals { bytes_sent: 555, bytes_received: 98_457, retransmits: 0, unread: 65_536 });
    let unread_close = Event::State(unread_close);
    assert_eq!(
        failure(vec![syn(4), established, shut, half, released(4, 5), unread_close]),
        Some(Failure::ResetSent),
        "closed from FIN_WAIT2 with data unread"
    );
}

/// A retransmission counted against `cookie`, between the ports `change` uses.
fn retransmit(cookie: u64, synack: bool) -> Retransmit {
    Retransmit {
        ts_ns: 300,
        cookie,
        synack,
        netns: 1,
        family: Family::Ipv4,
        local: (IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
        remote: (IpAddr::V4(Ipv4Addr::LOCALHOST), 40000),
    }
}

#[test]
fn accept_queue_counts_handshakes_until_accept() {
    let mut table = Table::new();
    table.apply(change(5, 100, Close, Listen, task(7, "server")));
    for child in [6, 7, 8] {
        table.apply(change(child, 200, Listen, SynRecv, task(0, "swapper/0")));
        table.apply(change(child, 201, SynRecv, Established, task(0, "swapper/0")));
    }
    table.apply(Event::Accepted(fd_event(6, 9, task(7, "server"), Protocol::Tcp)));
    table.apply(Event::Accepted(fd_event(6, 10, task(7, "server"), Protocol::Tcp)));
    assert_eq!(table.retransmit(&retransmit(5, true)).count, 1);
    let [listener] = table.listeners().try_into().unwrap();
    assert_eq!((listener.cookie, listener.owner.map(|o| o.pid)), (5, Some(7)));
    assert_eq!(
        listener.queue,
        AcceptQueue {
            handshakes: 3,
            accepted: 1,
            queued: 2,
            peak_queued: 3,
            synack_retransmits: 1
        },
        "a second accept event for the same socket counts once"
    );
    table.apply(change(5, 400, Listen, Close, task(7, "server")));
    assert!(table.listeners().is_empty());
}

#[test]
fn snapshot_children_without_a_file_wait_in_the_accept_queue() {
    let mut table = Table::new();
    let listener = row(1, Listen, 8080, 11);
    let waiting = row(2, Established, 8080, 0);
    let accepted = row(3, Established, 8080, 13);
    table.seed(&[waiting, listener, accepted], &HashMap::new(), 0);
    assert_eq!(table.listeners()[0].queue.queued, 1);
    table.apply(Event::Accepted(fd_event(2, 9, task(7, "server"), Protocol::Tcp)));
    let queue = table.listeners()[0].queue;
    assert_eq!((queue.queued, queue.accepted, queue.peak_queued), (0, 1, 1));
}

#[test]
fn retransmits_count_per_connection() {
    let mut table = Table::new();
    table.apply(change(4, 1, Close, SynSent, task(1, "app")));
    table.apply(change(4, 2, SynSent, Established, task(0, "swapper/0")));
    table.retransmit(&retransmit(4, false));
    let seen = table.retransmit(&retransmit(4, false));
    assert_eq!(seen.count, 2);
    assert_eq!(seen.state, Some(Established));
    assert_eq!(seen.owner.map(|o| o.comm), Some("app".into()));
}

#[test]
fn closed_listener_is_no_longer_inherited() {
    let mut table = Table::new();
    table.apply(change(5, 100, Close, Listen, task(7, "server")));
    table.apply(change(5, 150, Listen, Close, task(7, "server")));
    let t = table.apply(change(6, 200, Listen, SynRecv, task(8, "client"))).unwrap();
    assert_eq!(t.owner, None);
}

#[test]
fn released_sockets_leave_the_table_at_close() {
    let mut table = Table::new();
    table.apply(created(1, 0, task(10, "curl")));
    table.apply(change(1, 1, Close, SynSent, task(10, "curl")));
    table.apply(change(1, 2, SynSent, Established, task(0, "swapper/0")));
    table.apply(released(1, 3));
    table.apply(change(1, 4, Established, FinWait1, task(10, "curl")));
    assert_eq!(table.len(), 1, "still closing");
    table.apply(change(1, 5, FinWait1, FinWait2, task(0, "swapper/0")));
    table.apply(change(1, 6, FinWait2, Close, task(0, "swapper/0")));
    assert!(table.is_empty());
    // Created and closed without ever connecting.
    table.apply(created(2, 0, task(10, "curl")));
    table.apply(released(2, 1));
    assert!(table.is_empty());
}

#[test]
fn a_socket_reconnecting_after_failure_keeps_its_history() {
    let mut table = Table::new();
    table.apply(created(1, 0, task(10, "app")));
    table.apply(change(1, 10, Close, SynSent, task(10, "app")));
    table.apply(change(1, 20, SynSent, Close, task(0, "swapper/0")));
    let t = table.apply(change(1, 50, Close, SynSent, task(10, "app"))).unwrap();
    assert_eq!(t.in_old_state_ns, Some(30));
    table.apply(change(1, 60, SynSent, Close, task(0, "swapper/0")));
    table.apply(released(1, 70));
    assert!(table.is_empty());
}

#[test]
fn unreleased_closed_sockets_are_bounded() {
    let mut table = Table::new();
    for cookie in 0..(CLOSED_KEPT as u64 + 100) {
        table.apply(change(cookie, 1, SynRecv, Close, task(0, "swapper/0")));
    }
    assert_eq!(table.len(), CLOSED_KEPT);
}

#[test]
fn a_socket_remembers_its_last_eight_owners_the_current_one_included() {
    let mut socket = super::socket::Socket::default();
    let owner = |pid| Owner { pid, comm: "p".into(), cgroup_id: 0 };
    for pid in 1..=10 {
        socket.set_owner(Some(owner(pid)), Some(u64::from(pid)));
    }
    let pids =
        |s: &super::socket::Socket| -> Vec<u32> { s.owner_history().map(|(_, o)| o.pid).collect() };
    assert_eq!(pids(&socket), (3..=10).collect::<Vec<u32>>());
    assert!(socket.previous_owners.capacity() < 16, "grown one entry at a time");
    socket.set_owner(None, Some(11));
    assert_eq!(pids(&socket), (3..=10).collect::<Vec<u32>>(), "clearing the owner keeps them");
    let times: Vec<Option<u64>> = socket.owner_history().map(|(at, _)| at).collect();
    assert_eq!(times.last(), Some(&Some(10)));
    socket.set_owner(Some(owner(3)), None);
    assert_eq!(pids(&socket), (4..=10).chain([3]).collect::<Vec<u32>>());
}
