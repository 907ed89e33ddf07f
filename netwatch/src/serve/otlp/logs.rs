//! Stream records as OTLP log records: one `ResourceLogs` per workload (the node's resource
//! plus the container and pod the semantic conventions name), each record's socket and
//! process as attributes, and the record's own JSON as the body.
use std::{collections::HashMap, sync::Arc};

use opentelemetry_proto::tonic::{
    collector::logs::v1::ExportLogsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    resource::v1::Resource,
};

use crate::{host::workload::Workload, record::StreamRecord};

pub(super) fn string(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

pub(super) fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(Value::IntValue(value)) }),
        ..Default::default()
    }
}

fn double(key: &str, value: f64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(Value::DoubleValue(value)) }),
        ..Default::default()
    }
}

pub(super) fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "netwatch".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

/// The semantic conventions' resource attributes of a workload, after the node's.
fn workload_attributes(workload: &Workload) -> Vec<KeyValue> {
    let mut attributes = vec![string("netwatch.cgroup", workload.cgroup.clone())];
    let optional = [
        ("container.id", &workload.container_id),
        ("container.name", &workload.container_name),
        ("k8s.container.name", &workload.container_name),
        ("k8s.pod.uid", &workload.pod_uid),
        ("k8s.pod.name", &workload.pod_name),
        ("k8s.namespace.name", &workload.pod_namespace),
        ("systemd.unit", &workload.unit),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            attributes.push(string(key, value.clone()));
        }
    }
    if let Some(runtime) = workload.runtime.filter(|_| workload.container_id.is_some()) {
        attributes.push(string("container.runtime.name", runtime.name()));
    }
    if let (Some(kind), Some(name)) = (&workload.pod_controller_kind, &workload.pod_controller_name)
    {
        attributes.push(string(&format!("k8s.{}.name", kind.to_lowercase()), name.clone()));
    }
    if let Some(app) = &workload.pod_app {
        attributes.push(string("k8s.pod.label.app", app.clone()));
    }
    if let Some(qos) = workload.pod_qos {
        let qos = serde_json::to_value(qos).ok().and_then(|v| v.as_str().map(String::from));
        attributes.extend(qos.map(|q| string("k8s.pod.qos_class", q)));
    }
    attributes
}

fn nanos(time: chrono::DateTime<chrono::Utc>) -> u64 {
    time.timestamp_nanos_opt().map_or(0, |ns| ns.max(0) as u64)
}

/// One line a log view shows: what happened and to which connection. The attributes carry
/// every field; a JSON body of them all cost twice the CPU (`cargo xtask bench --only otlp`).
fn summary(record: &StreamRecord) -> String {
    let ends = |l: (std::net::IpAddr, u16), r: (std::net::IpAddr, u16)| {
        format!("{} -> {}", std::net::SocketAddr::from(l), std::net::SocketAddr::from(r))
    };
    match record {
        StreamRecord::Transition(t) => {
            let why = t.failure.map(|f| format!(" ({})", f.name())).unwrap_or_default();
            format!("{} -> {} {}{why}", t.old, t.new, ends((t.laddr, t.lport), (t.raddr, t.rport)))
        }
        StreamRecord::Retransmit(r) => {
            format!("{} resent {}", r.resent.name(), ends((r.laddr, r.lport), (r.raddr, r.rport)))
        }
        StreamRecord::Lost(l) => format!("{} events lost ({})", l.count, l.reason.name()),
        StreamRecord::LogFailed(f) => format!("event log stopped: {}", f.error),
        StreamRecord::ExportDropped(d) => {
            format!("{} records dropped by {}", d.count, d.destination)
        }
    }
}

/// A record as an OTLP log record, and the workload it belongs to.
fn log_record(record: &StreamRecord, observed: u64) -> (Option<Arc<Workload>>, LogRecord) {
    let mut log = LogRecord {
        observed_time_unix_nano: observed,
        severity_number: SeverityNumber::Info as i32,
        severity_text: "INFO".into(),
        body: Some(AnyValue { value: Some(Value::StringValue(summary(record))) }),
        ..Default::default()
    };
    let warn = |log: &mut LogRecord| {
        log.severity_number = SeverityNumber::Warn as i32;
        log.severity_text = "WARN".into();
    };
    let socket = |family: crate::kernel::events::Family,
                  local: (std::net::IpAddr, u16),
                  remote: (std::net::IpAddr, u16),
                  owner: (Option<u32>, Option<&str>)| {
        let mut attributes = vec![
            string("network.transport", "tcp"),
            string(
                "network.type",
                if family == crate::kernel::events::Family::Ipv4 { "ipv4" } else { "ipv6" },
            ),
            string("network.local.address", local.0.to_string()),
            int("network.local.port", i64::from(local.1)),
            string("network.peer.address", remote.0.to_string()),
            int("network.peer.port", i64::from(remote.1)),
        ];
        attributes.extend(owner.0.map(|pid| int("process.pid", i64::from(pid))));
        attributes.extend(owner.1.map(|comm| string("process.executable.name", comm)));
        attributes
    };
    let workload = match record {
        StreamRecord::Transition(t) => {
            log.time_unix_nano = nanos(t.time);
            log.event_name = "netwatch.transition".into();
            log.attributes = socket(
                t.family,
                (t.laddr, t.lport),
                (t.raddr, t.rport),
                (t.pid, t.comm.as_deref()),
            );
            log.attributes.push(string("netwatch.old_state", t.old.to_string()));
            log.attributes.push(string("netwatch.new_state", t.new.to_string()));
            log.attributes.extend(t.duration_ms.map(|ms| double("netwatch.duration_ms", ms)));
            log.attributes.extend(t.cookie.map(|c| int("netwatch.cookie", c as i64)));
            log.attributes.push(int("netwatch.netns", i64::from(t.netns)));
            if let Some(failure) = t.failure {
                log.attributes.push(string("netwatch.failure", failure.name()));
                warn(&mut log);
            }
            t.workload.clone()
        }
        StreamRecord::Retransmit(r) => {
            log.time_unix_nano = nanos(r.time);
            log.event_name = "netwatch.retransmit".into();
            log.attributes = socket(
                r.family,
                (r.laddr, r.lport),
                (r.raddr, r.rport),
                (r.pid, r.comm.as_deref()),
            );
            log.attributes.push(string("netwatch.resent", r.resent.name()));
            log.attributes.push(int("netwatch.cookie", r.cookie as i64));
            log.attributes.push(int("netwatch.count", r.count as i64));
            r.workload.clone()
        }
        StreamRecord::Lost(l) => {
            log.time_unix_nano = nanos(l.time);
            log.event_name = "netwatch.lost".into();
            log.attributes = vec![
                string("netwatch.reason", l.reason.name()),
                int("netwatch.count", l.count as i64),
            ];
            warn(&mut log);
            None
        }
        StreamRecord::LogFailed(f) => {
            log.time_unix_nano = nanos(f.time);
            log.event_name = "netwatch.log_failed".into();
            warn(&mut log);
            None
        }
        StreamRecord::ExportDropped(d) => {
            log.time_unix_nano = nanos(d.time);
            log.event_name = "netwatch.export_dropped".into();
            warn(&mut log);
            None
        }
    };
    (workload, log)
}

/// One export request for `records`, grouped by workload under the node's `resource`.
pub fn request(
    records: &[&StreamRecord],
    resource: &[KeyValue],
    observed: u64,
) -> ExportLogsServiceRequest {
    let mut groups: HashMap<Option<Arc<Workload>>, Vec<LogRecord>> = HashMap::new();
    for record in records {
        let (workload, log) = log_record(record, observed);
        groups.entry(workload).or_default().push(log);
    }
    let resource_logs = groups
        .into_iter()
        .map(|(workload, log_records)| {
            let mut attributes = resource.to_vec();
            attributes.extend(workload.as_deref().map(workload_attributes).unwrap_or_default());
            ResourceLogs {
                resource: Some(Resource { attributes, ..Default::default() }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(scope()),
                    log_records,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }
        })
        .collect();
    ExportLogsServiceRequest { resource_logs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{LossReason, LossRecord};

    fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
        attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()
    }

    #[test]
    fn records_are_grouped_by_workload_under_the_node() {
        let pod = Arc::new(Workload::from_path(
            "/kubepods/burstable/pod11111111-2222-4333-8444-555555555555/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ));
        let lost = |n| {
            StreamRecord::Lost(LossRecord {
                time: chrono::Utc::now(),
                reason: LossReason::RingBufferFull,
                count: n,
                total: n,
            })
        };
        let mut transition = crate::query::stream::tests::transition(
            80,
            5000,
            crate::kernel::events::TcpState::SynSent,
            crate::kernel::events::TcpState::Established,
        );
        transition.workload = Some(pod.clone());
        let records = [StreamRecord::Transition(Box::new(transition)), lost(1), lost(2)];
        let records: Vec<&StreamRecord> = records.iter().collect();
        let request = request(&records, &[string("host.name", "node-1")], 7);
        assert_eq!(request.resource_logs.len(), 2);
        for resource_logs in &request.resource_logs {
            let resource = &resource_logs.resource.as_ref().unwrap().attributes;
            assert_eq!(
                attribute(resource, "host.name"),
                Some(&Value::StringValue("node-1".into()))
            );
            let logs = &resource_logs.scope_logs[0].log_records;
            if attribute(resource, "k8s.pod.uid").is_some() {
                assert_eq!(logs.len(), 1);
                assert_eq!(logs[0].event_name, "netwatch.transition");
                assert_eq!(
                    attribute(&logs[0].attributes, "process.pid"),
                    Some(&Value::IntValue(42))
                );
                assert!(attribute(resource, "container.id").is_some());
            } else {
                assert_eq!(logs.len(), 2);
                assert!(logs.iter().all(|l| l.severity_number == SeverityNumber::Warn as i32));
            }
        }
    }
}
