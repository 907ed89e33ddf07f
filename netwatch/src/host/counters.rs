//! The kernel's protocol counters of one network namespace: `/proc/net/snmp`,
//! `/proc/net/netstat` and `/proc/net/snmp6`, as `netstat -s` and `nstat` read them, and what
//! changed between two readings.
//!
//! Parsed by hand: procfs 0.17 reads `/proc/net/snmp` into a struct of the fields it knows and
//! has no `/proc/net/netstat`, while netwatch shows every counter the running kernel has,
//! under the kernel's own name, newer ones included.
use std::{collections::BTreeMap, io, path::Path};

use serde::{Deserialize, Serialize};

/// One counter: its group as netstat -s heads it (`Tcp`, `TcpExt`, `Ip6`, ...) and name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub group: String,
    pub name: String,
    /// Signed: `Tcp MaxConn` is -1.
    pub value: i64,
}

impl Counter {
    /// The name nstat prints (`TcpExtListenOverflows`): group and name joined.
    pub fn key(&self) -> String {
        format!("{}{}", self.group, self.name)
    }

    /// A value that is a setting or a level, not a count of events: its change is not a rate.
    pub fn is_gauge(&self) -> bool {
        matches!(
            (self.group.as_str(), self.name.as_str()),
            ("Ip", "Forwarding" | "DefaultTTL")
                | ("Tcp", "RtoAlgorithm" | "RtoMin" | "RtoMax" | "MaxConn" | "CurrEstab")
        )
    }
}

/// Every counter of a namespace, in the kernel's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub Vec<Counter>);

/// The files read, in the order netstat -s shows them.
const FILES: [&str; 3] = ["snmp", "netstat", "snmp6"];

impl Counters {
    /// The counters of the calling thread's network namespace.
    pub fn read_here() -> io::Result<Counters> {
        let mut counters = Vec::new();
        for file in FILES {
            // thread-self: a thread that joined another namespace reads that one's.
            let path = format!("/proc/thread-self/net/{file}");
            match std::fs::read_to_string(&path) {
                Ok(text) if file == "snmp6" => counters.extend(parse_snmp6(&text)),
                Ok(text) => counters.extend(parse_table(&text).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}"))
                })?),
                // A kernel without IPv6 has no snmp6.
                Err(error) if file == "snmp6" && error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(io::Error::new(error.kind(), format!("{path}: {error}"))),
            }
        }
        Ok(Counters(counters))
    }

    /// The counters of the namespace at `path` (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn read_in(path: &Path) -> io::Result<Counters> {
        super::snapshot::in_namespace(path, Counters::read_here)
    }

    /// Values by nstat's name, as kept between two calls.
    pub fn by_key(&self) -> BTreeMap<String, i64> {
        self.0.iter().map(|c| (c.key(), c.value)).collect()
    }

    /// The value of `group` `name`, if this kernel has it.
    pub fn get(&self, group: &str, name: &str) -> Option<i64> {
        self.0.iter().find(|c| c.group == group && c.name == name).map(|c| c.value)
    }

    /// Each counter with its increase since `earlier` (values by nstat's name); a counter
    /// `earlier` lacks (new, or first reading) counts from zero. A gauge has no increase.
    pub fn since(&self, earlier: &BTreeMap<String, i64>) -> Vec<Change> {
        self.0
            .iter()
            .map(|counter| {
                let delta = (!counter.is_gauge()).then(|| {
                    let before = earlier.get(&counter.key()).copied().unwrap_or(0);
                    // A counter below its earlier value was reset (the namespace is a new one
                    // with the same inode): it counted from zero since.
                    if counter.value >= before { counter.value - before } else { counter.value }
                });
                Change { counter: counter.clone(), delta }
            })
            .collect()
    }
}

/// A counter and how much it grew over an interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub counter: Counter,
    /// None for a gauge.
    pub delta: Option<i64>,
}

/// `/proc/net/snmp` and `/proc/net/netstat`: for each group, a line of names and a line of
/// values, both starting with `Group:`.
fn parse_table(text: &str) -> Result<Vec<Counter>, String> {
    let mut counters = Vec::new();
    let mut lines = text.lines();
    while let Some(names) = lines.next() {
        let Some(values) = lines.next() else {
            return Err(format!("a header line without values: {names:?}"));
        };
        let (Some((group, names)), Some((again, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            return Err(format!("no group name in {names:?}"));
        };
        if group != again {
            return Err(format!("values of {again} under the names of {group}"));
        }
        let (names, values): (Vec<&str>, Vec<&str>) =
            (names.split_whitespace().collect(), values.split_whitespace().collect());
        if names.len() != values.len() {
            return Err(format!("{group}: {} names but {} values", names.len(), values.len()));
        }
        for (name, value) in names.into_iter().zip(values) {
            let value = value.parse().map_err(|_| format!("{group} {name}: value {value:?}"))?;
            counters.push(Counter { group: group.into(), name: name.into(), value });
        }
    }
    Ok(counters)
}

/// `/proc/net/snmp6`: one `Ip6InReceives 68` per line; the group is the name up to its `6`,
/// as node_exporter splits it (`UdpLite6InDatagrams`: `UdpLite6`, `InDatagrams`). Lines that
/// are not a name and a number are skipped.
fn parse_snmp6(text: &str) -> Vec<Counter> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(char::is_whitespace)?;
            let value = value.trim().parse().ok()?;
            let split = key.find('6')? + 1;
            let (group, name) = key.split_at(split);
            (!name.is_empty()).then(|| Counter { group: group.into(), name: name.into(), value })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "Ip: Forwarding DefaultTTL InReceives\nIp: 2 64 99\n\
        Tcp: RtoAlgorithm MaxConn ActiveOpens CurrEstab\nTcp: 1 -1 5 2\n";

    #[test]
    fn tables_and_snmp6_are_read_under_the_kernels_names() {
        let mut counters = parse_table(SNMP).unwrap();
        counters.extend(parse_snmp6("Ip6InReceives                   \t68\nIcmp6InType1 3\n"));
        let counters = Counters(counters);
        assert_eq!(counters.get("Tcp", "MaxConn"), Some(-1));
        assert_eq!(counters.get("Ip6", "InReceives"), Some(68));
        assert_eq!(counters.get("Icmp6", "InType1"), Some(3));
        assert_eq!(counters.0[2].key(), "IpInReceives");
        assert_eq!(parse_snmp6("UdpLite6InDatagrams 1\n")[0].group, "UdpLite6");
    }

    #[test]
    fn changes_are_counted_from_the_earlier_reading_and_gauges_have_none() {
        let now = Counters(parse_table(SNMP).unwrap());
        let earlier =
            BTreeMap::from([("TcpActiveOpens".to_string(), 3), ("IpInReceives".into(), 120)]);
        let changes = now.since(&earlier);
        let delta = |name: &str| changes.iter().find(|c| c.counter.name == name).unwrap().delta;
        assert_eq!(delta("ActiveOpens"), Some(2));
        assert_eq!(delta("CurrEstab"), None);
        assert_eq!(delta("InReceives"), Some(99), "a counter that went back started again");
        assert_eq!(now.since(&BTreeMap::new()).len(), 7);
    }

    #[test]
    fn malformed_tables_are_errors_naming_what_is_wrong() {
        for (text, needle) in [
            ("Ip: A B\n", "without values"),
            ("Ip: A B\nIp: 1\n", "2 names but 1 values"),
            ("Ip: A\nTcp: 1\n", "values of Tcp"),
            ("Ip: A\nIp: x\n", "Ip A"),
        ] {
            let error = parse_table(text).unwrap_err();
            assert!(error.contains(needle), "{text:?}: {error}");
        }
    }

    #[test]
    fn this_namespace_has_the_counters_netstat_shows() {
        let counters = Counters::read_here().unwrap();
        for (group, name) in
            [("Tcp", "ActiveOpens"), ("TcpExt", "ListenOverflows"), ("Udp", "InErrors")]
        {
            assert!(counters.get(group, name).is_some(), "{group} {name}");
        }
    }
}
