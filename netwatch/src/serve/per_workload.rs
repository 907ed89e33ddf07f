//! Opt-in metrics per workload (`--metrics-workloads N`): connects, failed connects and
//! retransmits by Kubernetes namespace, pod and container (or container runtime and id, or
//! systemd unit), the fleet-shaped series of Coroot's `container_net_*`, for the first N
//! workloads seen; the rest are counted as `other`, so the series count stays bounded.
use std::{collections::HashSet, sync::Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::{
    host::workload::Workload,
    kernel::events::TcpState,
    record::{Resent, StreamRecord},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadLabels {
    namespace: String,
    pod: String,
    /// The container's name in its pod, `runtime:ID` outside Kubernetes, or the systemd unit.
    container: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadReasonLabels {
    namespace: String,
    pod: String,
    container: String,
    reason: &'static str,
}

pub struct PerWorkload {
    cap: usize,
    labelled: Mutex<HashSet<WorkloadLabels>>,
    connects: Family<WorkloadLabels, Counter>,
    failures: Family<WorkloadReasonLabels, Counter>,
    retransmits: Family<WorkloadLabels, Counter>,
}

impl WorkloadLabels {
    /// A workload's labels; all empty for a process in no container, pod or unit.
    fn of(workload: Option<&Workload>) -> WorkloadLabels {
        let Some(w) = workload else {
            return WorkloadLabels {
                namespace: String::new(),
                pod: String::new(),
                container: String::new(),
            };
        };
        let short = |id: &str| id.chars().take(12).collect::<String>();
        let container = match (&w.container_name, &w.container_id, w.runtime, &w.unit) {
            (Some(name), ..) => name.clone(),
            (None, Some(id), Some(runtime), _) => format!("{}:{}", runtime.name(), short(id)),
            (None, Some(id), None, _) => short(id),
            (None, None, _, Some(unit)) => unit.clone(),
            _ => String::new(),
        };
        WorkloadLabels {
            namespace: w.pod_namespace.clone().unwrap_or_default(),
            pod: w.pod_name.clone().or_else(|| w.pod_uid.clone()).unwrap_or_default(),
            container,
        }
    }

    fn other() -> WorkloadLabels {
        WorkloadLabels { namespace: "other".into(), pod: "other".into(), container: "other".into() }
    }
}

impl PerWorkload {
    pub fn new(cap: usize, registry: &mut Registry) -> PerWorkload {
        let per = PerWorkload {
            cap,
            labelled: Mutex::new(HashSet::new()),
            connects: Family::default(),
            failures: Family::default(),
            retransmits: Family::default(),
        };
        registry.register(
            "workload_connects",
            "Completed outbound handshakes by the owner's namespace, pod and container \
             (--metrics-workloads)",
            per.connects.clone(),
        );
        registry.register(
            "workload_connect_failures",
            "Failed connections by the owner's namespace, pod, container and reason \
             (--metrics-workloads)",
            per.failures.clone(),
        );
        registry.register(
            "workload_retransmits",
            "Retransmitted segments by the owner's namespace, pod and container \
             (--metrics-workloads)",
            per.retransmits.clone(),
        );
        per
    }

    /// The workload's labels if it is among the first `cap` seen, `other` after that.
    fn labels(&self, workload: Option<&Workload>) -> WorkloadLabels {
        let labels = WorkloadLabels::of(workload);
        let mut labelled = self.labelled.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if labelled.contains(&labels) {
            labels
        } else if labelled.len() < self.cap {
            labelled.insert(labels.clone());
            labels
        } else {
            WorkloadLabels::other()
        }
    }

    pub fn observe(&self, record: &StreamRecord) {
        match record {
            StreamRecord::Transition(t) => {
                if t.old == TcpState::SynSent && t.new == TcpState::Established {
                    self.connects.get_or_create(&self.labels(t.workload.as_deref())).inc();
                }
                if let Some(failure) = t.failure {
                    let WorkloadLabels { namespace, pod, container } =
                        self.labels(t.workload.as_deref());
                    let labels =
                        WorkloadReasonLabels { namespace, pod, container, reason: failure.name() };
                    self.failures.get_or_create(&labels).inc();
                }
            }
            StreamRecord::Retransmit(r) if r.resent == Resent::Segment => {
                self.retransmits.get_or_create(&self.labels(r.workload.as_deref())).inc();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn workloads_past_the_cap_are_other() {
        let mut registry = Registry::default();
        let per = PerWorkload::new(2, &mut registry);
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for path in [
            format!("/system.slice/docker-{id}.scope"),
            "/system.slice/nginx.service".to_string(),
            "/system.slice/sshd.service".to_string(),
        ] {
            let mut t = crate::query::stream::tests::transition(
                40000,
                443,
                TcpState::SynSent,
                TcpState::Established,
            );
            t.workload = Some(Arc::new(Workload::from_path(&path)));
            per.observe(&StreamRecord::Transition(Box::new(t)));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"workload_connects_total{namespace="",pod="",container="docker:0123456789ab"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"container="nginx.service"} 1"#), "{text}");
        assert!(
            text.contains(
                r#"workload_connects_total{namespace="other",pod="other",container="other"} 1"#
            ),
            "{text}"
        );
        assert!(!text.contains("sshd"), "{text}");
    }
}
