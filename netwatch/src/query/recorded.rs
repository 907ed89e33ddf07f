//! Which records of the event log `netwatch log` and the replays show: `watch`'s filters, an
//! ss expression, failures only. Besides the test on a parsed record, a test on a line's
//! bytes rules out, unparsed, most lines that cannot match: parsing is what reading a large
//! log costs.
use memchr::memmem::Finder;

use super::{
    ss::{self, Endpoints},
    stream::TransitionFilter,
};
use crate::{record::StreamRecord, recorded::reader::LineTest};

#[derive(Clone, Debug, Default)]
pub struct RecordSelection {
    pub filter: TransitionFilter,
    pub query: ss::Query,
    /// Only CLOSE transitions that ended a failed connection (and the log's own reports).
    pub failed: bool,
}

impl RecordSelection {
    /// Whether `record` is shown. Losses and the log's and exporters' reports always are:
    /// they say what the log may lack.
    pub fn matches(&self, record: &StreamRecord) -> bool {
        let states = self.query.states;
        let expr = |ends: Endpoints| self.query.expr.as_ref().is_none_or(|e| e.matches(&ends));
        match record {
            StreamRecord::Transition(t) => {
                self.filter.matches(t)
                    && (!self.failed || t.failure.is_some())
                    && states.is_none_or(|set| set.contains(t.old) || set.contains(t.new))
                    && expr(t.endpoints())
            }
            StreamRecord::Retransmit(r) => {
                !self.failed
                    && self.filter.matches_retransmit(r)
                    && states.is_none_or(|set| r.state.is_some_and(|s| set.contains(s)))
                    && expr(r.endpoints())
            }
            StreamRecord::Lost(_) | StreamRecord::LogFailed(_) | StreamRecord::ExportDropped(_) => {
                true
            }
        }
    }

    /// A test on a line's bytes: false only for a transition or retransmit line, written
    /// in the writer's form, that lacks a text every record it could match has.
    pub fn prefilter(&self) -> LineTest {
        let needles = self.needles();
        if needles.is_empty() {
            return Box::new(|_| true);
        }
        Box::new(move |line: &[u8]| {
            let socket_record =
                matches!(crate::recorded::sniff(line), Some((_, b"transition" | b"retransmit")));
            !socket_record || needles.iter().all(|any| any.iter().any(|n| n.find(line).is_some()))
        })
    }

    /// Texts a matching line must have: each inner list, one of its texts.
    fn needles(&self) -> Vec<Vec<Finder<'static>>> {
        let f = &self.filter;
        let mut all: Vec<Vec<String>> = Vec::new();
        if let Some(pid) = f.pid {
            all.push(vec![format!("\"pid\":{pid},")]);
        }
        if let Some(comm) = f.comm.as_deref().filter(|c| is_plain(c)) {
            all.push(vec![format!("\"comm\":\"{comm}\"")]);
        }
        if let Some(port) = f.port {
            all.push(vec![format!("\"lport\":{port},"), format!("\"rport\":{port},")]);
        }
        if let Some(port) = f.sport {
            all.push(vec![format!("\"lport\":{port},")]);
        }
        if let Some(port) = f.dport {
            all.push(vec![format!("\"rport\":{port},")]);
        }
        if let Some(family) = f.family {
            all.push(vec![format!("\"family\":{}", json(&family))]);
        }
        if let Some(state) = f.state {
            let state = json(&state);
            all.push(vec![
                format!("\"old\":{state}"),
                format!("\"new\":{state}"),
                format!("\"state\":{state}"),
            ]);
        }
        if let Some((old, new)) = f.transition {
            all.push(vec![format!("\"old\":{},\"new\":{}", json(&old), json(&new))]);
        }
        if self.failed {
            all.push(vec!["\"failure\":\"".to_string()]);
        }
        all.into_iter()
            .map(|any| any.into_iter().map(|n| Finder::new(n.as_bytes()).into_owned()).collect())
            .collect()
    }
}

/// A value as JSON, as the writer writes it.
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// A name JSON writes as it is (no escapes), so that its text can be looked for.
fn is_plain(text: &str) -> bool {
    text.chars().all(|c| c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        kernel::events::TcpState, query::stream::tests::transition, serve::eventlog::line,
    };

    fn selection(filter: TransitionFilter, failed: bool) -> RecordSelection {
        RecordSelection { filter, failed, query: ss::Query::default() }
    }

    #[test]
    fn the_byte_test_never_rules_out_a_match() {
        let mut t = transition(40000, 5432, TcpState::SynSent, TcpState::Close);
        t.failure = Some(crate::state::table::Failure::Refused);
        let record = StreamRecord::Transition(Box::new(t));
        let text = line(&record);
        let filters = [
            TransitionFilter { port: Some(5432), ..Default::default() },
            TransitionFilter { sport: Some(40000), dport: Some(5432), ..Default::default() },
            TransitionFilter { pid: Some(42), comm: Some("curl".into()), ..Default::default() },
            TransitionFilter { state: Some(TcpState::SynSent), ..Default::default() },
            TransitionFilter {
                transition: Some((TcpState::SynSent, TcpState::Close)),
                family: Some(crate::kernel::events::Family::Ipv4),
                ..Default::default()
            },
        ];
        for filter in filters {
            let s = selection(filter.clone(), true);
            assert!(s.matches(&record), "{filter:?}");
            assert!(s.prefilter()(text.as_bytes()), "{filter:?}: {text}");
        }
        let misses = [
            TransitionFilter { port: Some(543), ..Default::default() },
            TransitionFilter { pid: Some(4), ..Default::default() },
            TransitionFilter { comm: Some("cur".into()), ..Default::default() },
            TransitionFilter { state: Some(TcpState::Listen), ..Default::default() },
        ];
        for filter in misses {
            let s = selection(filter.clone(), false);
            assert!(!s.matches(&record) && !s.prefilter()(text.as_bytes()), "{filter:?}");
        }
        // Not a failure: ruled out by --failed before parsing.
        let ok = line(&StreamRecord::Transition(Box::new(transition(
            1,
            2,
            TcpState::SynSent,
            TcpState::Established,
        ))));
        assert!(!selection(TransitionFilter::default(), true).prefilter()(ok.as_bytes()));
        // A loss report passes every filter, bytes and all.
        let loss = r#"{"v":1,"type":"lost","time":"2026-11-29T03:00:00.000000000Z","reason":"skipped","count":1,"total":1}"#;
        let s = selection(TransitionFilter { port: Some(1), ..Default::default() }, true);
        assert!(s.prefilter()(loss.as_bytes()));
        // A line not in the writer's order is parsed, never ruled out by its bytes.
        assert!(s.prefilter()(br#"{"type":"transition","v":1}"#));
    }
}
