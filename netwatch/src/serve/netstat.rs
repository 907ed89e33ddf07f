//! The kernel's protocol counters of the agent's namespace, under the names node_exporter's
//! netstat collector gives them (`node_netstat_TcpExt_ListenOverflows`), read at each
//! scrape: dashboards and alerts built on node_exporter work on netwatch's endpoint.
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, gauge::ConstGauge},
};

use crate::{host::counters::Counters, output::counters::NOTABLE};

/// Reads the counters at scrape time; registered without a prefix.
#[derive(Debug, Default)]
pub struct NetstatCollector;

/// node_exporter's default `--collector.netstat.fields`, and the counters `netwatch
/// counters` puts first.
pub fn exported(group: &str, name: &str) -> bool {
    matches!(name, "InErrors" | "InErrs")
        || (group, name) == ("Ip", "Forwarding")
        || (matches!(group, "Ip6" | "IpExt") && matches!(name, "InOctets" | "OutOctets"))
        || (matches!(group, "Icmp" | "Icmp6") && matches!(name, "InMsgs" | "OutMsgs"))
        || (group == "TcpExt"
            && (name.starts_with("Listen")
                || name.starts_with("Syncookies")
                || matches!(name, "TCPSynRetrans" | "TCPTimeouts" | "TCPOFOQueue" | "TCPRcvQDrop")))
        || (group == "Tcp"
            && matches!(
                name,
                "ActiveOpens"
                    | "InSegs"
                    | "OutSegs"
                    | "OutRsts"
                    | "PassiveOpens"
                    | "RetransSegs"
                    | "CurrEstab"
            ))
        || (matches!(group, "Udp" | "Udp6")
            && matches!(
                name,
                "InDatagrams" | "OutDatagrams" | "NoPorts" | "RcvbufErrors" | "SndbufErrors"
            ))
        || NOTABLE.iter().any(|(g, n, _)| *g == group && *n == name)
}

impl Collector for NetstatCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = match Counters::read_here() {
            Ok(counters) => counters,
            Err(error) => {
                tracing::warn!("protocol counters for the metrics: {error}");
                return Ok(());
            }
        };
        for counter in counters.0.iter().filter(|c| exported(&c.group, &c.name)) {
            let name = format!("node_netstat_{}_{}", counter.group, counter.name);
            // node_exporter's help text and type.
            let help = format!("Statistic {}{}.", counter.group, counter.name);
            let metric = encoder.encode_descriptor(&name, &help, None, MetricType::Unknown)?;
            ConstGauge::new(counter.value).encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_exporters_fields_and_the_notable_ones_are_exported() {
        for (group, name) in [
            ("Tcp", "ActiveOpens"),
            ("Tcp", "InErrs"),
            ("TcpExt", "ListenOverflows"),
            ("TcpExt", "SyncookiesSent"),
            ("Udp6", "NoPorts"),
            ("IpExt", "InOctets"),
            ("TcpExt", "TCPAbortOnTimeout"),
        ] {
            assert!(exported(group, name), "{group} {name}");
        }
        assert!(!exported("TcpExt", "DelayedACKs") && !exported("Ip", "InReceives"));
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(NetstatCollector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("# TYPE node_netstat_Tcp_ActiveOpens unknown"), "{text}");
        assert!(text.contains("\nnode_netstat_TcpExt_ListenOverflows "), "{text}");
    }
}
