//! The model without a terminal: transitions, row changes, pause, rates and byte counts.
use super::*;
use crate::record::{LossReason, LossRecord};

/// One recorded transition, changed where a test needs it.
fn transition(cookie: u64, old: TcpState, new: TcpState, mono_ns: u64) -> StreamRecord {
    let line = r#"{"type":"transition","time":"2026-11-29T18:42:33.992318959Z","mono_ns":0,
        "old":"SYN_SENT","new":"ESTABLISHED","duration_ns":55382,"duration_ms":0.055382,
        "pid":10151,"comm":"python3","family":"ipv4","laddr":"127.0.0.1","lport":47770,
        "raddr":"127.0.0.1","rport":18080,"cookie":1,"netns":4026531833,
        "skaddr":"0xffff88816c57ae40","task_pid":10151,"task_tid":10151,
        "task_comm":"python3","source":"tp_btf","direction":"outbound"}"#;
    let StreamRecord::Transition(mut t) = serde_json::from_str(line).unwrap() else {
        unreachable!()
    };
    (t.cookie, t.old, t.new, t.mono_ns) = (Some(cookie), old, new, mono_ns);
    StreamRecord::Transition(t)
}

#[test]
fn a_connection_appears_with_its_handshake_and_goes_at_close() {
    let mut model = Model::new(Vec::new(), 0);
    model.apply(transition(7, TcpState::Close, TcpState::SynSent, 1_000));
    model.apply(transition(7, TcpState::SynSent, TcpState::Established, 2_000));
    let conn = &model.conns[&7];
    assert_eq!(conn.row().state, TcpState::Established);
    assert_eq!((conn.since_ns, conn.connect_ns), (Some(2_000), Some(55_382)));
    assert_eq!(conn.last_owner.as_ref().map(|o| o.pid), Some(10151));
    assert_eq!(conn.in_state_ns(5_000), Some(3_000));
    model.apply(transition(7, TcpState::Established, TcpState::Close, 9_000));
    assert!(model.conns.is_empty());
    assert_eq!(model.stream.len(), 3, "every record is a line of the pane");
}

#[test]
fn a_row_change_keeps_the_state_start_the_stream_gave() {
    let mut model = Model::new(Vec::new(), 0);
    model.apply(transition(7, TcpState::SynSent, TcpState::Established, 2_000));
    let mut listed = Conn::from_transition(match &model.stream[0] {
        StreamRecord::Transition(t) => t,
        _ => unreachable!(),
    })
    .listed;
    listed.in_state = Some(std::time::Duration::from_nanos(500));
    listed.owners.push(crate::host::snapshot::Holder {
        pid: 10151,
        comm: "python3".into(),
        fd: 3,
        start_time: None,
        cgroup_id: 0,
    });
    model.apply_rows(RowsChange { upsert: vec![listed.clone()], ..RowsChange::default() }, 10_000);
    let conn = &model.conns[&7];
    assert_eq!(conn.since_ns, Some(2_000), "the same state: the exact start stays");
    assert_eq!(conn.owner(), (Some(Owner { pid: 10151, comm: "python3".into(), cgroup_id: 0 }), 1));
    // A full table (after a resync) replaces every row, and what only the view knew stays.
    listed.row.cookie = 8;
    model.apply_rows(RowsChange { full: true, upsert: vec![listed], gone: Vec::new() }, 10_000);
    assert_eq!(model.conns.keys().copied().collect::<Vec<_>>(), [8]);
    model.apply_rows(RowsChange { gone: vec![8], ..RowsChange::default() }, 10_000);
    assert!(model.conns.is_empty());
}

#[test]
fn a_paused_pane_keeps_what_arrives_and_counts_it() {
    let mut model = Model::new(Vec::new(), 0);
    model.set_paused(true);
    for i in 0..(STREAM_KEEP as u64 + 10) {
        model.apply(transition(i, TcpState::SynSent, TcpState::Close, i));
    }
    assert_eq!(
        (model.stream.len(), model.unseen, model.dropped),
        (STREAM_KEEP + 10, STREAM_KEEP + 10, 0)
    );
    model.set_paused(false);
    assert_eq!((model.stream.len(), model.unseen), (STREAM_KEEP, 0));
}

#[test]
fn rates_count_the_last_seconds_and_losses_add_up() {
    let mut model = Model::new(Vec::new(), 0);
    let second = 1_000_000_000;
    for i in 0..10 {
        model.apply(transition(i, TcpState::SynSent, TcpState::Established, 10 * second + i));
    }
    let (handshakes, failures) = model.rates(11 * second);
    assert_eq!((handshakes, failures), (2.0, 0.0), "10 in a 5 s window");
    assert_eq!(model.rates(16 * second).0, 0.0, "and none once they are older");
    let loss = |count| {
        StreamRecord::Lost(LossRecord {
            time: chrono::DateTime::from_timestamp_nanos(0),
            reason: LossReason::RingBufferFull,
            count,
            total: count,
        })
    };
    model.apply(loss(3));
    model.apply(loss(4));
    assert_eq!(model.lost, 7);
}

#[test]
fn traffic_rates_come_from_two_looks() {
    let mut model = Model::new(Vec::new(), 0);
    model.apply(transition(7, TcpState::SynSent, TcpState::Established, 0));
    model.set_traffic(7, 1000, 50, 1_000_000_000);
    assert_eq!(model.conns[&7].traffic.as_ref().and_then(|t| t.sent_per_s), None);
    model.set_traffic(7, 3000, 50, 3_000_000_000);
    let traffic = model.conns[&7].traffic.as_deref().copied().unwrap();
    assert_eq!((traffic.sent_per_s, traffic.received_per_s), (Some(1000.0), Some(0.0)));
}
