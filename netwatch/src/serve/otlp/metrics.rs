//! The agent's metrics as OTLP metrics: the same exposition `/metrics` serves, read back
//! into counters (cumulative monotonic sums), gauges and histograms.
//!
//! Written here rather than taken from a crate: prometheus-client hands out its values only
//! as text (its protobuf encoding needs protoc at build time), and prometheus-parse reads
//! the older text format, where an OpenMetrics counter's `_total` sample loses its type.
//! The input is only ever this agent's own exposition.
use std::{collections::BTreeMap, ops::Bound};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::KeyValue,
    metrics::v1::{
        AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric::Data, number_data_point,
    },
    resource::v1::Resource,
};

use super::logs::{scope, string};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A sample's labels, in order.
type Labels = Vec<(String, String)>;

/// One metric family as read from the exposition.
#[derive(Debug)]
struct Family {
    kind: Kind,
    help: String,
    /// Samples by suffix (`_total`, `_bucket`, `_sum`, `_count`, ``) and labels.
    samples: Vec<(String, Labels, f64)>,
}

/// `name{a="x",b="y"} value` -> (name, labels, value); None for anything else.
fn sample(line: &str) -> Option<(&str, Labels, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series, Vec::new(), value));
    };
    let mut labels = Vec::new();
    let mut rest = rest.strip_suffix('}')?;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (at, '"') => break at,
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim_start_matches(',').to_string(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some((name, labels, value))
}

fn families(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let Some((name, kind)) = rest.split_once(' ') else { continue };
            let kind = match kind {
                "counter" => Kind::Counter,
                // The kernel's counters come untyped (node_exporter's names, read as is).
                "gauge" | "unknown" => Kind::Gauge,
                "histogram" => Kind::Histogram,
                _ => continue,
            };
            families.insert(name.into(), Family { kind, help: String::new(), samples: Vec::new() });
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, help)) = rest.split_once(' ')
                && let Some(family) = families.get_mut(name)
            {
                family.help = help.to_string();
            }
        } else if !line.starts_with('#')
            && let Some((name, labels, value)) = sample(line)
        {
            // The family is the longest TYPE name the sample's name starts with.
            let owner = families
                .range_mut::<str, _>((Bound::Unbounded, Bound::Included(name)))
                .rev()
                .find(|(family, _)| name.starts_with(family.as_str()));
            if let Some((family_name, family)) = owner {
                let suffix = name[family_name.len()..].to_string();
                family.samples.push((suffix, labels, value));
            }
        }
    }
    families
}

fn attributes(labels: &[(String, String)]) -> Vec<KeyValue> {
    labels.iter().map(|(k, v)| string(k, v.clone())).collect()
}

fn number(labels: &[(String, String)], value: f64, (start, now): (u64, u64)) -> NumberDataPoint {
    NumberDataPoint {
        attributes: attributes(labels),
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..Default::default()
    }
}

/// Prometheus' cumulative `le` buckets as OTLP's per-bucket counts and bounds.
fn histogram_points(family: &Family, times: (u64, u64)) -> Vec<HistogramDataPoint> {
    let mut by_labels: BTreeMap<Labels, HistogramDataPoint> = BTreeMap::new();
    for (suffix, labels, value) in &family.samples {
        let (le, rest): (Vec<_>, Vec<_>) = labels.iter().cloned().partition(|(k, _)| k == "le");
        let point = by_labels.entry(rest.clone()).or_insert_with(|| HistogramDataPoint {
            attributes: attributes(&rest),
            start_time_unix_nano: times.0,
            time_unix_nano: times.1,
            ..Default::default()
        });
        match suffix.as_str() {
            "_sum" => point.sum = Some(*value),
            "_count" => point.count = *value as u64,
            "_bucket" => {
                let bound = le.first().map_or(f64::INFINITY, |(_, v)| {
                    if v == "+Inf" { f64::INFINITY } else { v.parse().unwrap_or(f64::INFINITY) }
                });
                let below: u64 = point.bucket_counts.iter().sum();
                point.bucket_counts.push((*value as u64).saturating_sub(below));
                if bound.is_finite() {
                    point.explicit_bounds.push(bound);
                }
            }
            _ => {}
        }
    }
    by_labels.into_values().collect()
}

/// The exposition `text`, counted since `start` (ns since the epoch), as one request.
pub fn request(
    text: &str,
    resource: &[KeyValue],
    start: u64,
    now: u64,
) -> ExportMetricsServiceRequest {
    let cumulative = AggregationTemporality::Cumulative as i32;
    let metrics = families(text)
        .into_iter()
        .filter(|(_, family)| !family.samples.is_empty())
        .map(|(name, family)| {
            let points = || {
                family.samples.iter().map(|(_, labels, value)| number(labels, *value, (start, now)))
            };
            let data = match family.kind {
                Kind::Counter => Data::Sum(Sum {
                    data_points: points().collect(),
                    aggregation_temporality: cumulative,
                    is_monotonic: true,
                }),
                Kind::Gauge => Data::Gauge(Gauge { data_points: points().collect() }),
                Kind::Histogram => Data::Histogram(Histogram {
                    data_points: histogram_points(&family, (start, now)),
                    aggregation_temporality: cumulative,
                }),
            };
            Metric { name, description: family.help, data: Some(data), ..Default::default() }
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource { attributes: resource.to_vec(), ..Default::default() }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP netwatch_transitions TCP state transitions.
# TYPE netwatch_transitions counter
netwatch_transitions_total{old="SYN_SENT",new="ESTABLISHED"} 3
netwatch_transitions_total{old="CLOSE",new="SYN_SENT"} 4
# HELP netwatch_sockets Sockets.
# TYPE netwatch_sockets gauge
netwatch_sockets{protocol="tcp",state="LISTEN"} 2
# HELP netwatch_connect_latency_seconds Connect latency.
# TYPE netwatch_connect_latency_seconds histogram
netwatch_connect_latency_seconds_sum 0.5
netwatch_connect_latency_seconds_count 3
netwatch_connect_latency_seconds_bucket{le="0.1"} 1
netwatch_connect_latency_seconds_bucket{le="1.0"} 3
netwatch_connect_latency_seconds_bucket{le="+Inf"} 3
# TYPE netwatch_odd counter
netwatch_odd_total{comm="a \"q\" b",endpoint="x,y"} 1
# EOF
"#;

    #[test]
    fn counters_gauges_and_histograms_keep_their_kind() {
        let request = request(TEXT, &[], 1, 2);
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let by_name = |name: &str| metrics.iter().find(|m| m.name == name).unwrap();
        let Some(Data::Sum(sum)) = &by_name("netwatch_transitions").data else { panic!() };
        assert!(sum.is_monotonic);
        assert_eq!(sum.data_points.len(), 2);
        assert_eq!(sum.data_points[0].value, Some(number_data_point::Value::AsDouble(3.0)));
        assert_eq!(sum.data_points[0].start_time_unix_nano, 1);
        let Some(Data::Gauge(gauge)) = &by_name("netwatch_sockets").data else { panic!() };
        assert_eq!(gauge.data_points[0].attributes.len(), 2);
        let Some(Data::Histogram(h)) = &by_name("netwatch_connect_latency_seconds").data else {
            panic!()
        };
        let point = &h.data_points[0];
        assert_eq!((point.count, point.sum), (3, Some(0.5)));
        assert_eq!(point.bucket_counts, [1, 2, 0]);
        assert_eq!(point.explicit_bounds, [0.1, 1.0]);
        let Some(Data::Sum(odd)) = &by_name("netwatch_odd").data else { panic!() };
        let labels = attributes(&sample(r#"x{comm="a \"q\" b",endpoint="x,y"} 1"#).unwrap().1);
        assert_eq!(odd.data_points[0].attributes, labels);
        assert_eq!(labels[1], string("endpoint", "x,y"));
    }

    /// The agent's real exposition converts without losing a family.
    #[test]
    fn the_agents_own_metrics_convert() {
        let metrics = crate::serve::metrics::Metrics::new(0, 0);
        let text = metrics.render(&Default::default(), Default::default());
        let with_samples = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
            .filter(|name| text.lines().any(|l| !l.starts_with('#') && l.starts_with(name)))
            .count();
        let request = request(&text, &[], 1, 2);
        let converted = request.resource_metrics[0].scope_metrics[0].metrics.len();
        assert!(converted > 10, "{converted}");
        assert_eq!(converted, with_samples, "{text}");
        assert!(
            request.resource_metrics[0].scope_metrics[0]
                .metrics
                .iter()
                .any(|m| m.name.starts_with("node_netstat_"))
        );
    }
}
