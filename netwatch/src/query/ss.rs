//! The `netwatch table` filter language, in the spirit of `ss`'s:
//!
//! ```text
//! [state NAME]... [EXPR]
//! EXPR := TERM (or TERM)*            TERM := FACTOR ([and] FACTOR)*
//! FACTOR := not FACTOR | ( EXPR ) | sport OP PORT | dport OP PORT | src ADDR[/LEN] | dst ADDR[/LEN]
//! OP := = | == | != | < | > | <= | >= | eq | neq | lt | gt | le | ge      PORT := [:]NUMBER | [:]SERVICE
//! ```
//!
//! State names are ss's (`established`, `syn-sent`, `time-wait`, `listening`, `closed`...),
//! the kernel's (`SYN_SENT`), or the groups `all`, `connected`, `synchronized`. Parsing is
//! separate from matching so a bad expression fails before anything is read, with the token
//! it stopped at.
use std::net::IpAddr;

pub use crate::record::Endpoints;
use crate::{host::services::Services, kernel::events::TcpState};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad filter at token {position} '{token}': {expected}")]
pub struct QueryError {
    /// 1-based index of the offending token among the filter arguments.
    pub position: usize,
    pub token: String,
    pub expected: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

impl Cmp {
    fn holds(self, left: u16, right: u16) -> bool {
        match self {
            Cmp::Eq => left == right,
            Cmp::Ne => left != right,
            Cmp::Lt => left < right,
            Cmp::Gt => left > right,
            Cmp::Le => left <= right,
            Cmp::Ge => left >= right,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Sport(Cmp, u16),
    Dport(Cmp, u16),
    Src(IpAddr, u8),
    Dst(IpAddr, u8),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn matches(&self, row: &Endpoints) -> bool {
        match self {
            Expr::Sport(cmp, port) => cmp.holds(row.local.1, *port),
            Expr::Dport(cmp, port) => cmp.holds(row.remote.1, *port),
            Expr::Src(net, len) => in_prefix(row.local.0, *net, *len),
            Expr::Dst(net, len) => in_prefix(row.remote.0, *net, *len),
            Expr::Not(inner) => !inner.matches(row),
            Expr::And(a, b) => a.matches(row) && b.matches(row),
            Expr::Or(a, b) => a.matches(row) || b.matches(row),
        }
    }
}

/// Whether `addr` lies in `net/len`; an IPv4-mapped IPv6 address counts as IPv4.
fn in_prefix(addr: IpAddr, net: IpAddr, len: u8) -> bool {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// A set of TCP states (bit n = kernel state n).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateSet(u16);

impl StateSet {
    pub const ALL: StateSet = StateSet(0x1ffe);

    pub fn of(states: &[TcpState]) -> StateSet {
        StateSet(states.iter().fold(0, |bits, s| bits | 1 << (*s as u16)))
    }

    pub fn contains(self, state: TcpState) -> bool {
        self.0 & (1 << (state as u16)) != 0
    }

    pub fn union(self, other: StateSet) -> StateSet {
        StateSet(self.0 | other.0)
    }

    /// ss's default: connections, without listeners, closed sockets, TIME_WAIT and SYN_RECV.
    pub fn connected_default() -> StateSet {
        use TcpState::*;
        StateSet::of(&[Established, SynSent, FinWait1, FinWait2, CloseWait, LastAck, Closing])
    }

    /// Parses one state name or group, as ss and the kernel spell them.
    pub fn parse(name: &str) -> Option<StateSet> {
        use TcpState::*;
        let lower = name.to_ascii_lowercase().replace('_', "-");
        let set = match lower.as_str() {
            "all" => StateSet::ALL,
            "connected" => StateSet::of(&[
                Established,
                SynSent,
                SynRecv,
                FinWait1,
                FinWait2,
                TimeWait,
                CloseWait,
                LastAck,
                Closing,
            ]),
            // ss: the connected states but SYN_SENT.
            "synchronized" => {
                StateSet(StateSet::parse("connected")?.0 & !StateSet::of(&[SynSent]).0)
            }
            "established" | "estab" => StateSet::of(&[Established]),
            "syn-sent" => StateSet::of(&[SynSent]),
            "syn-recv" => StateSet::of(&[SynRecv]),
            "fin-wait-1" | "fin-wait1" => StateSet::of(&[FinWait1]),
            "fin-wait-2" | "fin-wait2" => StateSet::of(&[FinWait2]),
            "time-wait" => StateSet::of(&[TimeWait]),
            "closed" | "close" | "unconn" => StateSet::of(&[Close]),
            "close-wait" => StateSet::of(&[CloseWait]),
            "last-ack" => StateSet::of(&[LastAck]),
            "listening" | "listen" => StateSet::of(&[Listen]),
            "closing" => StateSet::of(&[Closing]),
            _ => return None,
        };
        Some(set)
    }
}

/// A parsed filter: the states asked for (None: the caller's default) and the expression.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub states: Option<StateSet>,
    pub expr: Option<Expr>,
}

const STATE_NAMES: &str = "established, syn-sent, syn-recv, fin-wait-1, fin-wait-2, time-wait, \
                           closed, close-wait, last-ack, listening, closing, all, connected, \
                           synchronized";

/// Deepest nesting of `(` and `not` accepted: bounds the parser's recursion.
const MAX_DEPTH: usize = 64;

struct Parser<'a> {
    tokens: Vec<&'a str>,
    at: usize,
    depth: usize,
    services: &'a Services,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&'a str> {
        self.tokens.get(self.at).copied()
    }

    fn next(&mut self) -> Option<&'a str> {
        let token = self.peek();
        self.at += 1;
        token
    }

    fn error(&self, index: usize, expected: impl Into<String>) -> QueryError {
        QueryError {
            position: index + 1,
            token: self.tokens.get(index).map_or("<end>".to_string(), |t| t.to_string()),
            expected: expected.into(),
        }
    }

    fn expr(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.term()?;
        while matches!(self.peek(), Some("or" | "||")) {
            self.next();
            left = Expr::Or(Box::new(left), Box::new(self.term()?));
        }
        Ok(left)
    }

    fn term(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.factor()?;
        loop {
            match self.peek() {
                Some("and" | "&&") => {
                    self.next();
                }
                Some("or" | "||" | ")") | None => return Ok(left),
                Some(_) => {}
            }
            left = Expr::And(Box::new(left), Box::new(self.factor()?));
        }
    }

    fn factor(&mut self) -> Result<Expr, QueryError> {
        let index = self.at;
        match self.next() {
            Some("not" | "!" | "(") if self.depth == MAX_DEPTH => {
                Err(self.error(index, format!("at most {MAX_DEPTH} nested '(' and 'not'")))
            }
            Some("not" | "!") => {
                self.depth += 1;
                let inner = self.factor()?;
                self.depth -= 1;
                Ok(Expr::Not(Box::new(inner)))
            }
            Some("(") => {
                self.depth += 1;
                let inner = self.expr()?;
                self.depth -= 1;
                match self.next() {
                    Some(")") => Ok(inner),
                    _ => Err(self.error(self.at - 1, "')' to close the '('")),
                }
            }
            Some(word @ ("sport" | "dport")) => {
                let cmp = self.cmp()?;
                let port = self.port()?;
                Ok(if word == "sport" { Expr::Sport(cmp, port) } else { Expr::Dport(cmp, port) })
            }
            Some(word @ ("src" | "dst")) => {
                let (net, len) = self.prefix()?;
                Ok(if word == "src" { Expr::Src(net, len) } else { Expr::Dst(net, len) })
            }
            Some("state") => Err(self.error(index, "'state NAME' goes before the expression")),
            _ => Err(self.error(index, "sport, dport, src, dst, not or '('")),
        }
    }

    fn cmp(&mut self) -> Result<Cmp, QueryError> {
        let index = self.at;
        let cmp = match self.peek() {
            Some("=" | "==" | "eq") => Cmp::Eq,
            Some("!=" | "neq" | "ne") => Cmp::Ne,
            Some("<" | "lt") => Cmp::Lt,
            Some(">" | "gt") => Cmp::Gt,
            Some("<=" | "le") => Cmp::Le,
            Some(">=" | "ge") => Cmp::Ge,
            // `sport :80` means equality, as in ss.
            Some(t) if t.starts_with(':') => return Ok(Cmp::Eq),
            _ => return Err(self.error(index, "a comparison: = != < > <= >=")),
        };
        self.next();
        Ok(cmp)
    }

    fn port(&mut self) -> Result<u16, QueryError> {
        let index = self.at;
        let token = self.next().ok_or_else(|| self.error(index, "a port"))?;
        let text = token.strip_prefix(':').unwrap_or(token);
        if let Ok(port) = text.parse::<u16>() {
            return Ok(port);
        }
        self.services.port_of(text).ok_or_else(|| {
            self.error(index, "a port number (0-65535) or a service name from /etc/services")
        })
    }

    fn prefix(&mut self) -> Result<(IpAddr, u8), QueryError> {
        let index = self.at;
        let token = self.next().ok_or_else(|| self.error(index, "an address"))?;
        let bad = || self.error(index, "an address or prefix, e.g. 10.0.0.0/8 or ::1");
        let (addr, len) = match token.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (token, None),
        };
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(len) => len.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok((addr, len))
    }
}

/// Parses the filter words given after the options.
pub fn parse(words: &[String], services: &Services) -> Result<Query, QueryError> {
    let tokens: Vec<&str> = words.iter().map(String::as_str).collect();
    let mut parser = Parser { tokens, at: 0, depth: 0, services };
    let mut states: Option<StateSet> = None;
    while parser.peek() == Some("state") {
        parser.next();
        let index = parser.at;
        let name =
            parser.next().ok_or_else(|| parser.error(index, format!("a state: {STATE_NAMES}")))?;
        let set = StateSet::parse(name)
            .ok_or_else(|| parser.error(index, format!("a state: {STATE_NAMES}")))?;
        states = Some(states.map_or(set, |s| s.union(set)));
    }
    let expr = if parser.peek().is_some() { Some(parser.expr()?) } else { None };
    if parser.peek().is_some() {
        return Err(parser.error(parser.at, "the end of the filter"));
    }
    Ok(Query { states, expr })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn query(text: &str) -> Result<Query, QueryError> {
        let words: Vec<String> = text.split_whitespace().map(String::from).collect();
        parse(&words, &Services::parse("http 80/tcp www\nssh 22/tcp\n"))
    }

    fn row(local: (&str, u16), remote: (&str, u16)) -> Endpoints {
        Endpoints {
            local: (local.0.parse().unwrap(), local.1),
            remote: (remote.0.parse().unwrap(), remote.1),
        }
    }

    #[test]
    fn parses_states_and_expressions() {
        let q = query("state established state syn-sent sport = :80 or dport >= 1024").unwrap();
        let states = q.states.unwrap();
        assert!(states.contains(TcpState::Established) && states.contains(TcpState::SynSent));
        assert!(!states.contains(TcpState::Listen));
        let expr = q.expr.unwrap();
        assert!(expr.matches(&row(("10.0.0.1", 80), ("10.0.0.2", 1))));
        assert!(expr.matches(&row(("10.0.0.1", 1), ("10.0.0.2", 5000))));
        assert!(!expr.matches(&row(("10.0.0.1", 1), ("10.0.0.2", 1023))));
    }

    #[test]
    fn and_binds_tighter_than_or_and_is_implicit() {
        let expr =
            query("sport = :ssh dst 10.0.0.0/8 or not ( dport != 443 )").unwrap().expr.unwrap();
        assert!(expr.matches(&row(("1.1.1.1", 22), ("10.9.9.9", 5))));
        assert!(!expr.matches(&row(("1.1.1.1", 22), ("11.0.0.1", 5))));
        assert!(expr.matches(&row(("1.1.1.1", 1), ("11.0.0.1", 443))));
    }

    #[test]
    fn prefixes_cover_both_families() {
        assert!(in_prefix(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), "10.0.0.0".parse().unwrap(), 8));
        assert!(!in_prefix(IpAddr::V4(Ipv4Addr::new(11, 1, 2, 3)), "10.0.0.0".parse().unwrap(), 8));
        assert!(in_prefix(IpAddr::V6(Ipv6Addr::LOCALHOST), "::1".parse().unwrap(), 128));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(in_prefix(mapped, "127.0.0.0".parse().unwrap(), 8));
        assert!(in_prefix(IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)), "0.0.0.0".parse().unwrap(), 0));
        let expr = query("src [::1]").unwrap().expr.unwrap();
        assert!(expr.matches(&row(("::1", 1), ("::1", 2))));
    }

    #[test]
    fn state_groups_follow_ss() {
        let connected = StateSet::parse("connected").unwrap();
        assert!(!connected.contains(TcpState::Listen) && !connected.contains(TcpState::Close));
        assert!(connected.contains(TcpState::TimeWait));
        let synchronized = StateSet::parse("synchronized").unwrap();
        assert!(!synchronized.contains(TcpState::SynSent));
        assert_eq!(StateSet::parse("SYN_SENT"), StateSet::parse("syn-sent"));
        assert!(StateSet::parse("all").unwrap().contains(TcpState::NewSynRecv));
    }

    #[test]
    fn errors_point_at_the_bad_token() {
        let cases = [
            ("sport = :nosuchservice", 3, ":nosuchservice"),
            ("sport ~ 80", 2, "~"),
            ("dport = 70000", 3, "70000"),
            ("src 10.0.0.0/33", 2, "10.0.0.0/33"),
            ("src banana", 2, "banana"),
            ("state bogus", 2, "bogus"),
            ("state", 2, "<end>"),
            ("( sport = 1", 5, "<end>"),
            ("sport = 1 )", 4, ")"),
            ("frobnicate", 1, "frobnicate"),
            ("sport = 1 state listening", 4, "state"),
        ];
        for (text, position, token) in cases {
            let error = query(text).unwrap_err();
            assert_eq!(
                (error.position, error.token.as_str()),
                (position, token),
                "{text}: {error}"
            );
        }
        let message = query("state bogus").unwrap_err().to_string();
        assert!(message.contains("established, syn-sent"), "{message}");
    }

    #[test]
    fn absurd_input_is_an_error_not_a_panic() {
        let deep = "( ".repeat(50) + "sport = 1" + &" )".repeat(50);
        assert!(query(&deep).is_ok());
        let too_deep = "not ".repeat(10_000) + "sport = 1";
        assert_eq!(query(&too_deep).unwrap_err().position, MAX_DEPTH + 1);
        for text in ["(", ")", "not", "and", "or", "sport", "sport =", "src", "! ! !", "&& ||"] {
            assert!(query(text).is_err(), "{text}");
        }
    }

    proptest::proptest! {
        /// Any sequence of the language's words, operators and junk parses or is an error
        /// naming a token within the input; a query that parses can be evaluated.
        #[test]
        fn any_word_sequence_parses_or_fails_cleanly(
            picks in proptest::collection::vec(0usize..24, 0..40),
            junk in "[ -~]{0,12}",
        ) {
            const WORDS: [&str; 24] = [
                "sport", "dport", "src", "dst", "=", "!=", "<", ">=", "eq", "gt", ":80", ":http",
                "10.0.0.0/8", "[::1]:22", "(", ")", "and", "or", "not", "!", "&&", "||",
                "state", "established",
            ];
            let mut words: Vec<String> = picks.iter().map(|&i| WORDS[i].to_string()).collect();
            words.push(junk);
            match parse(&words, &Services::parse("http 80/tcp\n")) {
                Ok(Query { expr: Some(expr), .. }) => {
                    let _ = expr.matches(&row(("127.0.0.1", 80), ("10.1.2.3", 22)));
                }
                Ok(_) => {}
                Err(error) => proptest::prop_assert!(error.position <= words.len()),
            }
        }
    }
}
