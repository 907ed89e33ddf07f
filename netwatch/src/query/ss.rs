//! The `netwatch table` filter language, ss's own:
//!
//! ```text
//! [state NAME | exclude NAME]... [LIST]
//! LIST := COND ([and | or] COND)*      (left to right: `a or b and c` is `(a or b) and c`)
//! COND := not COND | ( LIST ) | sport [OP] PORT | dport [OP] PORT | src [=] HOST | dst [=] HOST
//! OP := = | == | != | < | > | <= | >= | eq | ne | neq | lt | gt | le | ge | leq | geq
//! PORT := [:]NUMBER | [:]SERVICE | *             HOST := see [`super::host`]
//! ```
//!
//! As in ss, `and` and `or` bind equally, left to right, and a missing operator means `and`;
//! the words may come as separate arguments or in one quoted argument. State names are
//! ss's (`established`, `syn-sent`, `time-wait`, `listening`, `closed`...), the kernel's
//! (`SYN_SENT`), or the groups `all`, `connected`, `synchronized`. Parsing is separate from
//! matching so a bad expression fails before anything is read, with the token it stopped at.

use super::host;
pub use super::host::HostCond;
pub use crate::record::Endpoints;
use crate::{host::services::Services, kernel::events::TcpState};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad filter at token {position} '{token}': {expected}")]
pub struct QueryError {
    /// 1-based index of the offending token among the filter's words.
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
    /// None: any port (`sport = *`).
    Sport(Cmp, Option<u16>),
    Dport(Cmp, Option<u16>),
    Src(HostCond),
    Dst(HostCond),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn matches(&self, row: &Endpoints) -> bool {
        self.matches_scoped(row, None)
    }

    /// `scope`: the interface the socket is bound to, which `src ADDR%IF` asks about.
    pub fn matches_scoped(&self, row: &Endpoints, scope: Option<&str>) -> bool {
        match self {
            Expr::Sport(cmp, port) => port.is_none_or(|port| cmp.holds(row.local.1, port)),
            Expr::Dport(cmp, port) => port.is_none_or(|port| cmp.holds(row.remote.1, port)),
            Expr::Src(cond) => cond.matches(row.local, scope),
            Expr::Dst(cond) => cond.matches(row.remote, scope),
            Expr::Not(inner) => !inner.matches_scoped(row, scope),
            Expr::And(a, b) => a.matches_scoped(row, scope) && b.matches_scoped(row, scope),
            Expr::Or(a, b) => a.matches_scoped(row, scope) || b.matches_scoped(row, scope),
        }
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

    pub fn without(self, other: StateSet) -> StateSet {
        StateSet(self.0 & !other.0)
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

    /// ss's `exprlist`: conditions joined left to right, `and` and `or` alike.
    fn list(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.cond()?;
        loop {
            let or = match self.peek() {
                Some("or" | "||" | "|") => true,
                Some("and" | "&&" | "&") => false,
                Some(")") | None => return Ok(left),
                Some(_) => {
                    left = Expr::And(Box::new(left), Box::new(self.cond()?));
                    continue;
                }
            };
            self.next();
            let right = Box::new(self.cond()?);
            left =
                if or { Expr::Or(Box::new(left), right) } else { Expr::And(Box::new(left), right) };
        }
    }

    fn cond(&mut self) -> Result<Expr, QueryError> {
        let index = self.at;
        match self.next() {
            Some("not" | "!" | "(") if self.depth == MAX_DEPTH => {
                Err(self.error(index, format!("at most {MAX_DEPTH} nested '(' and 'not'")))
            }
            Some("not" | "!") => {
                self.depth += 1;
                let inner = self.cond()?;
                self.depth -= 1;
                Ok(Expr::Not(Box::new(inner)))
            }
            Some("(") => {
                self.depth += 1;
                let inner = self.list()?;
                self.depth -= 1;
                match self.next() {
                    Some(")") => Ok(inner),
                    _ => Err(self.error(self.at - 1, "')' to close the '('")),
                }
            }
            Some(word @ ("sport" | "dport")) => {
                let cmp = self.cmp();
                let index = self.at;
                let token = self.next().ok_or_else(|| self.error(index, "a port"))?;
                let port = host::port(token, self.services).map_err(|e| self.error(index, e))?;
                Ok(if word == "sport" { Expr::Sport(cmp, port) } else { Expr::Dport(cmp, port) })
            }
            Some(word @ ("src" | "dst")) => {
                if matches!(self.peek(), Some("=" | "==" | "eq")) {
                    self.next();
                }
                let index = self.at;
                let token = self.next().ok_or_else(|| self.error(index, "an address"))?;
                let cond = host::host(token, self.services).map_err(|e| self.error(index, e))?;
                Ok(if word == "src" { Expr::Src(cond) } else { Expr::Dst(cond) })
            }
            Some("state" | "exclude" | "excl") => {
                Err(self.error(index, "'state NAME' and 'exclude NAME' go before the expression"))
            }
            _ => Err(self.error(index, "sport, dport, src, dst, not or '('")),
        }
    }

    /// The comparison after `sport`/`dport`; none means equality (`sport :80`), as in ss.
    fn cmp(&mut self) -> Cmp {
        let cmp = match self.peek() {
            Some("=" | "==" | "eq") => Cmp::Eq,
            Some("!=" | "neq" | "ne") => Cmp::Ne,
            Some("<" | "lt") => Cmp::Lt,
            Some(">" | "gt") => Cmp::Gt,
            Some("<=" | "le" | "leq") => Cmp::Le,
            Some(">=" | "ge" | "geq") => Cmp::Ge,
            _ => return Cmp::Eq,
        };
        self.next();
        cmp
    }
}

/// Parses the filter words given after the options. Each argument is split at blanks, as ss
/// splits them, so a filter may be one quoted argument.
pub fn parse(words: &[String], services: &Services) -> Result<Query, QueryError> {
    let tokens: Vec<&str> = words.iter().flat_map(|w| w.split_whitespace()).collect();
    let mut parser = Parser { tokens, at: 0, depth: 0, services };
    let mut states: Option<StateSet> = None;
    while let Some(word @ ("state" | "exclude" | "excl")) = parser.peek() {
        parser.next();
        let index = parser.at;
        let set = parser
            .next()
            .and_then(StateSet::parse)
            .ok_or_else(|| parser.error(index, format!("a state: {STATE_NAMES}")))?;
        // As in ss: `exclude` before any `state` starts from every state.
        states = Some(match (word, states) {
            ("state", None) => set,
            ("state", Some(so_far)) => so_far.union(set),
            (_, so_far) => so_far.unwrap_or(StateSet::ALL).without(set),
        });
    }
    let expr = if parser.peek().is_some() { Some(parser.list()?) } else { None };
    if parser.peek().is_some() {
        return Err(parser.error(parser.at, "the end of the filter"));
    }
    Ok(Query { states, expr })
}

#[cfg(test)]
mod tests {
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
    fn and_and_or_bind_left_to_right_as_in_ss() {
        // ss: `(sport = 7001 or dport = 7001) and src 127.0.0.1`, not `a or (b and c)`.
        let expr = query("sport = :7001 or dport = :7001 and src 127.0.0.1").unwrap().expr.unwrap();
        assert!(expr.matches(&row(("127.0.0.1", 7001), ("127.0.0.1", 5))));
        assert!(!expr.matches(&row(("127.0.0.2", 7001), ("127.0.0.1", 5))));
        assert!(!expr.matches(&row(("127.0.0.2", 5), ("127.0.0.1", 7001))));
        // A missing operator is `and`, in the same chain; `not` takes one condition.
        let expr =
            query("sport :ssh dst 10.0.0.0/8 or not ( dport != 443 )").unwrap().expr.unwrap();
        assert!(expr.matches(&row(("1.1.1.1", 22), ("10.9.9.9", 5))));
        assert!(!expr.matches(&row(("1.1.1.1", 22), ("11.0.0.1", 5))));
        assert!(expr.matches(&row(("1.1.1.1", 1), ("11.0.0.1", 443))));
        let expr = query("not sport = 1 and dport = 2").unwrap().expr.unwrap();
        assert!(expr.matches(&row(("1.1.1.1", 3), ("1.1.1.1", 2))));
    }

    #[test]
    fn one_quoted_argument_is_split_as_ss_splits_it() {
        let words: Vec<String> =
            ["state", "listening", "sport = :6201 or dport = :6201"].map(String::from).into();
        let q = parse(&words, &Services::default()).unwrap();
        assert!(q.expr.unwrap().matches(&row(("127.0.0.1", 1), ("127.0.0.1", 6201))));
        let q = query("exclude time-wait exclude listening").unwrap();
        let states = q.states.unwrap();
        assert!(states.contains(TcpState::Established) && !states.contains(TcpState::TimeWait));
        assert!(!states.contains(TcpState::Listen));
    }

    #[test]
    fn hosts_match_mapped_addresses_as_ss_does() {
        let mapped = row(("::ffff:127.0.0.1", 80), ("::ffff:127.0.0.1", 5000));
        for filter in [
            "src ::/0",
            "src [::ffff:127.0.0.1]",
            "src ::ffff:127.0.0.0/104",
            "src 127/8",
            "src 127.0.0.1:80",
            "src *:http",
            "src = 127.0.0.1",
        ] {
            assert!(query(filter).unwrap().expr.unwrap().matches(&mapped), "{filter}");
        }
        let plain = row(("127.0.0.1", 80), ("127.0.0.1", 5000));
        for filter in ["src ::/0", "src [::ffff:127.0.0.1]", "src 127.0.0.1:81"] {
            assert!(!query(filter).unwrap().expr.unwrap().matches(&plain), "{filter}");
        }
        let expr = query("dst fe80::1%lo").unwrap().expr.unwrap();
        let link = row(("fe80::1", 2222), ("fe80::1", 5000));
        assert!(expr.matches_scoped(&link, Some("lo")));
        assert!(!expr.matches_scoped(&link, None) && !expr.matches_scoped(&link, Some("eth0")));
        assert!(query("sport = *").unwrap().expr.unwrap().matches(&plain));
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
            ("src ::1%", 2, "::1%"),
            ("exclude", 2, "<end>"),
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
                Err(error) => {
                    let tokens = words.iter().flat_map(|w| w.split_whitespace()).count();
                    proptest::prop_assert!(error.position <= tokens + 1);
                }
            }
        }
    }
}
