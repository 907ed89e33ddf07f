//! Decoding ring-buffer records: every kind, and malformed input as errors, never panics.
use super::*;
use netwatch_common::tcp_state;

fn raw_state(kind: u8) -> SockEvent {
    let mut raw = SockEvent::zeroed();
    raw.kind = kind;
    raw.ts_ns = 42;
    raw.cookie = 7;
    raw.skaddr = 0xffff_0000_1234;
    raw.netns = 4026531840;
    raw.pid_tgid = (1000u64 << 32) | 1001;
    raw.family = AF_INET;
    raw.protocol = 6;
    raw.oldstate = tcp_state::SYN_SENT;
    raw.newstate = tcp_state::ESTABLISHED;
    raw.sport = 40000;
    raw.dport = 80;
    raw.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    raw.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
    raw.comm[..4].copy_from_slice(b"curl");
    raw
}

fn bytes(raw: &SockEvent) -> Vec<u8> {
    // SAFETY: SockEvent is plain old data without implicit padding.
    unsafe { std::slice::from_raw_parts((raw as *const SockEvent).cast(), SockEvent::SIZE) }
        .to_vec()
}

#[test]
fn decodes_a_btf_transition() {
    let Ok(Event::State(change)) = decode(&bytes(&raw_state(kind::STATE_BTF))) else {
        panic!("not a state change")
    };
    assert_eq!(change.key, SockKey::Cookie(7));
    assert_eq!(change.local, ("127.0.0.1".parse().unwrap(), 40000));
    assert_eq!(change.remote, ("127.0.0.2".parse().unwrap(), 80));
    assert_eq!((change.old, change.new), (TcpState::SynSent, TcpState::Established));
    assert_eq!(change.task, Task { pid: 1000, tid: 1001, comm: "curl".into(), cgroup: 0 });
    assert!(!change.deferred_connect);
}

#[test]
fn classic_transitions_are_keyed_by_address() {
    let Ok(Event::State(change)) = decode(&bytes(&raw_state(kind::STATE_CLASSIC))) else {
        panic!("not a state change")
    };
    assert_eq!(change.key, SockKey::Addr { netns: 4026531840, skaddr: 0xffff_0000_1234 });
    assert_eq!(change.cookie, None);
}

#[test]
fn decodes_ipv6_addresses() {
    let mut raw = raw_state(kind::STATE_BTF);
    raw.family = AF_INET6;
    raw.saddr = Ipv6Addr::LOCALHOST.octets();
    raw.daddr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
    let Ok(Event::State(change)) = decode(&bytes(&raw)) else { panic!("not a state change") };
    assert_eq!(change.local.0, IpAddr::V6(Ipv6Addr::LOCALHOST));
    assert_eq!(change.remote.0, "fd00::2".parse::<IpAddr>().unwrap());
}

#[test]
fn decodes_lifecycle_events() {
    let mut raw = raw_state(kind::SOCK_CREATE);
    assert!(matches!(decode(&bytes(&raw)), Ok(Event::Created(SockLife { cookie: 7, .. }))));
    raw.kind = kind::SOCK_RELEASE;
    assert!(matches!(decode(&bytes(&raw)), Ok(Event::Released(SockLife { ts_ns: 42, .. }))));
}

#[test]
fn rejects_short_and_malformed_records() {
    let good = bytes(&raw_state(kind::STATE_BTF));
    assert_eq!(decode(&[]), Err(DecodeError::Short(0)));
    assert_eq!(decode(&good[..143]), Err(DecodeError::Short(143)));
    let mut raw = raw_state(99);
    assert_eq!(decode(&bytes(&raw)), Err(DecodeError::UnknownKind(99)));
    raw = raw_state(kind::STATE_BTF);
    raw.family = 1;
    assert_eq!(decode(&bytes(&raw)), Err(DecodeError::UnknownFamily(1)));
    raw = raw_state(kind::STATE_BTF);
    raw.newstate = 0;
    assert_eq!(decode(&bytes(&raw)), Err(DecodeError::UnknownState(0)));
    raw.newstate = 13;
    assert_eq!(decode(&bytes(&raw)), Err(DecodeError::UnknownState(13)));
}

#[test]
fn longer_records_decode_their_prefix() {
    let mut long = bytes(&raw_state(kind::STATE_BTF));
    long.extend_from_slice(&[0xff; 8]);
    assert!(decode(&long).is_ok());
}

#[test]
fn state_names_round_trip() {
    for state in TcpState::ALL {
        assert_eq!(state.name().parse::<TcpState>(), Ok(state));
        assert_eq!(TcpState::from_kernel(state as u8), Some(state));
    }
    assert_eq!("syn-sent".parse::<TcpState>(), Ok(TcpState::SynSent));
    let err = "SYN_SEND".parse::<TcpState>().unwrap_err();
    assert!(err.contains("'SYN_SEND'") && err.contains("SYN_SENT, SYN_RECV"), "{err}");
}

proptest::proptest! {
    /// Random bytes of any length, and well-sized records with random codes, decode to an
    /// event or an error, never a panic.
    #[test]
    fn malformed_records_are_errors_not_panics(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        codes in proptest::prelude::any::<[u8; 8]>(),
    ) {
        let _ = decode(&bytes);
        let mut raw = raw_state(codes[0] % 16);
        (raw.family, raw.protocol, raw.oldstate, raw.newstate) =
            (codes[1], codes[2], codes[3], codes[4]);
        raw.flags = codes[5];
        // SAFETY: SockEvent is plain old data; viewing it as bytes is always valid.
        let record = unsafe {
            std::slice::from_raw_parts((&raw const raw).cast::<u8>(), SockEvent::SIZE)
        };
        let _ = decode(record);
        proptest::prop_assert!(decode(&record[..SockEvent::SIZE - 1]).is_err());
    }
}

#[test]
fn a_close_into_timewait_carries_its_substate() {
    let mut raw = raw_state(kind::STATE_BTF);
    (raw.oldstate, raw.newstate) = (tcp_state::FIN_WAIT2, tcp_state::CLOSE);
    let substate = |raw: &SockEvent| match decode(&bytes(raw)) {
        Ok(Event::State(change)) => change.timewait,
        other => panic!("not a state change: {other:?}"),
    };
    assert_eq!(substate(&raw), None, "no flag: no timewait socket was made");
    raw.flags = netwatch_common::flags::TIMEWAIT;
    assert_eq!(substate(&raw), Some(TcpState::FinWait2), "the peer's FIN has not come");
    raw.fin_received = 1;
    assert_eq!(substate(&raw), Some(TcpState::TimeWait));
}

#[test]
fn a_graft_is_an_accept_without_its_fd() {
    let mut raw = raw_state(kind::GRAFT);
    raw.arg = -1;
    raw.inode = 555;
    let Ok(Event::Accepted(accept)) = decode(&bytes(&raw)) else { panic!("not an accept") };
    assert_eq!((accept.fd, accept.cookie, accept.inode), (-1, 7, 555));
    assert_eq!(accept.task.pid, 1000);
}
