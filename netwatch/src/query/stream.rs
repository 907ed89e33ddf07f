//! Which stream records the user asked to see. All given conditions must hold.
use crate::{
    host::workload::Workload,
    kernel::events::{Family, TcpState},
    record::{RetransmitRecord, TransitionRecord},
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransitionFilter {
    /// Local or remote port.
    pub port: Option<u16>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// Owner's pid; a transition whose owner is unknown does not match.
    pub pid: Option<u32>,
    /// Owner's command name, exactly.
    pub comm: Option<String>,
    /// The owner's container (id, id prefix or name) and pod (name, NAMESPACE/NAME, UID).
    pub container: Option<String>,
    pub pod: Option<String>,
    pub family: Option<Family>,
    /// Either side of the transition.
    pub state: Option<TcpState>,
    /// Exactly this old -> new.
    pub transition: Option<(TcpState, TcpState)>,
}

impl TransitionFilter {
    pub fn matches(&self, t: &TransitionRecord) -> bool {
        self.socket_matches(t.lport, t.rport, t.pid, t.comm.as_deref(), t.family)
            && self.workload_matches(t.workload.as_deref())
            && self.state.is_none_or(|s| s == t.old || s == t.new)
            && self.transition.is_none_or(|(old, new)| old == t.old && new == t.new)
    }

    /// A retransmission passes the socket filters and a `--state` it is in; never a
    /// `--transition` filter.
    pub fn matches_retransmit(&self, r: &RetransmitRecord) -> bool {
        self.socket_matches(r.lport, r.rport, r.pid, r.comm.as_deref(), r.family)
            && self.workload_matches(r.workload.as_deref())
            && self.state.is_none_or(|s| r.state == Some(s))
            && self.transition.is_none()
    }

    /// A record whose owner's workload is not known matches neither filter.
    fn workload_matches(&self, workload: Option<&Workload>) -> bool {
        self.container.as_deref().is_none_or(|c| workload.is_some_and(|w| w.matches_container(c)))
            && self.pod.as_deref().is_none_or(|p| workload.is_some_and(|w| w.matches_pod(p)))
    }

    fn socket_matches(
        &self,
        lport: u16,
        rport: u16,
        pid: Option<u32>,
        comm: Option<&str>,
        family: Family,
    ) -> bool {
        self.port.is_none_or(|p| p == lport || p == rport)
            && self.sport.is_none_or(|p| p == lport)
            && self.dport.is_none_or(|p| p == rport)
            && self.pid.is_none_or(|want| pid == Some(want))
            && self.comm.as_deref().is_none_or(|want| comm == Some(want))
            && self.family.is_none_or(|f| f == family)
    }
}

/// Parses `OLD:NEW`, e.g. `SYN_SENT:ESTABLISHED`.
pub fn parse_transition(text: &str) -> Result<(TcpState, TcpState), String> {
    let (old, new) = text
        .split_once(':')
        .ok_or_else(|| format!("'{text}' is not OLD:NEW (e.g. SYN_SENT:ESTABLISHED)"))?;
    Ok((old.parse()?, new.parse()?))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::{
        kernel::events::{SockKey, StateChange, StateSource, Task},
        record::WallClock,
        state::table::{Owner, Transition},
    };

    pub(crate) fn transition(
        lport: u16,
        rport: u16,
        old: TcpState,
        new: TcpState,
    ) -> TransitionRecord {
        let transition = Transition {
            change: StateChange {
                ts_ns: 0,
                source: StateSource::TpBtf,
                key: SockKey::Cookie(1),
                cookie: Some(1),
                skaddr: 0,
                inode: 0,
                netns: 1,
                family: Family::Ipv4,
                local: (IpAddr::V4(Ipv4Addr::LOCALHOST), lport),
                remote: (IpAddr::V4(Ipv4Addr::LOCALHOST), rport),
                old,
                new,
                task: Task { pid: 0, tid: 0, comm: "swapper/0".into(), cgroup: 0 },
                deferred_connect: false,
                timewait: None,
                listener: None,
                totals: None,
            },
            owner: Some(Owner { pid: 42, comm: "curl".into(), cgroup_id: 0 }),
            in_old_state_ns: None,
            lifespan_ns: None,
            failure: None,
            ending: None,
            direction: None,
            v6only: false,
        };
        TransitionRecord::new(&transition, &WallClock::with_offset_ns(0))
    }

    #[test]
    fn conditions_combine() {
        let t = transition(40000, 80, TcpState::SynSent, TcpState::Established);
        let all = TransitionFilter::default();
        assert!(all.matches(&t));
        let f = |f: TransitionFilter| f.matches(&t);
        assert!(f(TransitionFilter { port: Some(80), ..all.clone() }));
        assert!(f(TransitionFilter { port: Some(40000), ..all.clone() }));
        assert!(!f(TransitionFilter { port: Some(81), ..all.clone() }));
        assert!(f(TransitionFilter { sport: Some(40000), dport: Some(80), ..all.clone() }));
        assert!(!f(TransitionFilter { sport: Some(80), ..all.clone() }));
        assert!(f(TransitionFilter { pid: Some(42), comm: Some("curl".into()), ..all.clone() }));
        assert!(!f(TransitionFilter { pid: Some(42), comm: Some("wget".into()), ..all.clone() }));
        assert!(!f(TransitionFilter { family: Some(Family::Ipv6), ..all.clone() }));
        assert!(f(TransitionFilter { state: Some(TcpState::SynSent), ..all.clone() }));
        assert!(f(TransitionFilter { state: Some(TcpState::Established), ..all.clone() }));
        assert!(!f(TransitionFilter { state: Some(TcpState::Listen), ..all.clone() }));
        let syn = Some((TcpState::SynSent, TcpState::Established));
        assert!(f(TransitionFilter { transition: syn, ..all.clone() }));
        let reversed = Some((TcpState::Established, TcpState::SynSent));
        assert!(!f(TransitionFilter { transition: reversed, ..all.clone() }));
    }

    #[test]
    fn unknown_owner_matches_no_pid_or_comm() {
        let mut t = transition(1, 2, TcpState::Listen, TcpState::SynRecv);
        (t.pid, t.comm) = (None, None);
        assert!(!TransitionFilter { pid: Some(0), ..Default::default() }.matches(&t));
        assert!(
            !TransitionFilter { comm: Some("swapper/0".into()), ..Default::default() }.matches(&t)
        );
    }

    #[test]
    fn parses_transitions() {
        assert_eq!(
            parse_transition("syn_sent:ESTABLISHED"),
            Ok((TcpState::SynSent, TcpState::Established))
        );
        assert!(parse_transition("SYN_SENT").unwrap_err().contains("OLD:NEW"));
        assert!(parse_transition("SYN_SENT:BOGUS").unwrap_err().contains("'BOGUS'"));
    }
}
