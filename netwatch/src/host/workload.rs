//! What runs in a cgroup: the container runtime and container id, the Kubernetes pod and
//! its QoS class, or the systemd unit, read from the cgroup's path the way each runtime
//! names it; pod and container names from the kubelet's log directories, without an API
//! call. [`Workloads`] caches it per cgroup id for the records and rows of the agent.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::cgroup::Hierarchy;

/// The process's cgroup and what it says about who runs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Workload {
    /// The cgroup's path under the cgroup2 root.
    pub cgroup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    /// The container id, as the runtime prints it (64 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The container's name in its pod, where the kubelet's logs tell it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// The systemd unit (service or scope) the cgroup belongs to, when not a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_qos: Option<Qos>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// With `--kube`: the pod's `app.kubernetes.io/name` (or `app`) label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_app: Option<String>,
    /// With `--kube`: the controller that owns the pod (`ReplicaSet`, `DaemonSet`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_controller_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_controller_name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Podman,
    /// A systemd unit that is not a container.
    Systemd,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
            Runtime::Systemd => "systemd",
        }
    }
}

/// A pod's Kubernetes QoS class, which the kubelet's cgroup layout encodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// Runtime prefixes of a container's cgroup (systemd driver: `PREFIX-ID.scope`; podman's
/// and CRI-O's cgroupfs layouts keep the prefix). Their `-conmon-` siblings hold the
/// runtime's monitor, not the container.
const CONTAINER_PREFIXES: [(&str, Runtime); 5] = [
    ("cri-containerd-", Runtime::Containerd),
    ("crio-", Runtime::CriO),
    ("docker-", Runtime::Docker),
    ("libpod-", Runtime::Podman),
    ("nerdctl-", Runtime::Containerd),
];

impl Workload {
    /// What a cgroup path says, without looking anything up.
    pub fn from_path(path: &str) -> Workload {
        let mut workload = Workload { cgroup: path.to_string(), ..Workload::default() };
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let mut in_kubepods = false;
        for (at, part) in parts.iter().enumerate() {
            let name = part.strip_suffix(".scope").unwrap_or(part);
            // `kubepods`, or under a kubelet's --cgroup-root (kind: `kubelet-kubepods.slice`).
            if *part == "kubepods" || part.ends_with("kubepods.slice") {
                in_kubepods = true;
                workload.pod_qos = Some(Qos::Guaranteed);
            } else if in_kubepods && let Some(qos) = qos_of(part) {
                workload.pod_qos = Some(qos);
            }
            if in_kubepods && let Some(uid) = pod_uid_of(part) {
                workload.pod_uid = Some(uid);
            }
            if let Some((runtime, id)) = container_of(name) {
                workload.runtime = Some(runtime);
                workload.container_id = Some(id.to_string());
            } else if is_container_id(part) && at > 0 {
                // The cgroupfs drivers: kubepods/QOS/podUID/ID, docker/ID.
                let parent = parts[at - 1];
                workload.container_id = Some(part.to_string());
                workload.runtime = (parent == "docker").then_some(Runtime::Docker);
            }
        }
        if !in_kubepods {
            workload.pod_qos = None;
        }
        if workload.container_id.is_none() {
            workload.unit = parts
                .iter()
                .rev()
                .find(|p| p.ends_with(".service") || p.ends_with(".scope"))
                .map(|p| p.to_string());
            if workload.unit.is_some() && workload.pod_uid.is_none() {
                workload.runtime = Some(Runtime::Systemd);
            }
        }
        workload
    }

    /// Whether it is a container or a pod (not only a systemd unit or a plain cgroup).
    pub fn is_container(&self) -> bool {
        self.container_id.is_some() || self.pod_uid.is_some()
    }

    /// A pod whose names the kubelet's directories did not give yet (the kubelet links a
    /// container's log only once it started, after its first sockets perhaps).
    fn lacks_names(&self) -> bool {
        self.pod_uid.is_some()
            && (self.pod_name.is_none()
                || (self.container_id.is_some() && self.container_name.is_none()))
    }

    /// Whether the cgroup says more than its path: a container, a pod or a unit.
    pub fn is_known(&self) -> bool {
        self.container_id.is_some() || self.pod_uid.is_some() || self.unit.is_some()
    }

    /// One short word for a table column: `NAMESPACE/POD`, a runtime and a 12-digit id, or
    /// the unit.
    pub fn label(&self) -> String {
        let short = |id: &str| id.chars().take(12).collect::<String>();
        match (&self.pod_namespace, &self.pod_name, &self.container_id, &self.unit) {
            (Some(ns), Some(pod), _, _) => match &self.container_name {
                Some(container) => format!("{ns}/{pod}/{container}"),
                None => format!("{ns}/{pod}"),
            },
            (_, _, Some(id), _) => match self.runtime {
                Some(runtime) => format!("{}:{}", runtime.name(), short(id)),
                None => short(id),
            },
            (_, _, None, Some(unit)) => unit.clone(),
            _ => match &self.pod_uid {
                Some(uid) => format!("pod:{uid}"),
                None => self.cgroup.clone(),
            },
        }
    }

    /// `--container X`: the id or a prefix of it, or the container's name.
    pub fn matches_container(&self, wanted: &str) -> bool {
        self.container_id.as_deref().is_some_and(|id| id.starts_with(wanted))
            || self.container_name.as_deref() == Some(wanted)
    }

    /// `--pod X`: the pod's name, `NAMESPACE/NAME`, or its UID.
    pub fn matches_pod(&self, wanted: &str) -> bool {
        if self.pod_uid.as_deref() == Some(wanted) {
            return true;
        }
        let (Some(ns), Some(name)) = (&self.pod_namespace, &self.pod_name) else {
            return false;
        };
        match wanted.split_once('/') {
            Some((want_ns, want_name)) => ns == want_ns && name == want_name,
            None => name == wanted,
        }
    }
}

fn container_of(name: &str) -> Option<(Runtime, &str)> {
    CONTAINER_PREFIXES.iter().find_map(|(prefix, runtime)| {
        let id = name.strip_prefix(prefix)?;
        is_container_id(id).then_some((*runtime, id))
    })
}

/// A runtime's container id: 64 hex digits (docker, containerd, CRI-O, podman).
fn is_container_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn qos_of(part: &str) -> Option<Qos> {
    let name = match part.strip_suffix(".slice") {
        Some(slice) => slice.split_once("kubepods-").map_or(slice, |(_, qos)| qos),
        None => part,
    };
    match name {
        "besteffort" => Some(Qos::BestEffort),
        "burstable" => Some(Qos::Burstable),
        _ => None,
    }
}

/// `podUID` (cgroupfs) or `kubepods[-QOS]-podUID.slice` (systemd, with `_` for `-`). A UID
/// is a UUID, or 32 hex digits for a static pod (a hash of its manifest).
fn pod_uid_of(part: &str) -> Option<String> {
    let uid = if let Some(slice) = part.strip_suffix(".slice") {
        slice.rsplit_once("-pod")?.1.replace('_', "-")
    } else {
        part.strip_prefix("pod")?.to_string()
    };
    let hex = |b: u8| b.is_ascii_hexdigit();
    let uuid = uid.len() == 36 && uid.bytes().all(|b| hex(b) || b == b'-');
    let static_pod = uid.len() == 32 && uid.bytes().all(hex);
    (uuid || static_pod).then_some(uid)
}

/// Pod and container names from the kubelet's log directories: `/var/log/pods/NS_POD_UID`
/// and the links `/var/log/containers/POD_NS_CONTAINER-ID.log`. Names with `_` cannot
/// occur (Kubernetes names are DNS labels), so the split is unambiguous.
#[derive(Debug, Default)]
struct KubeletLogs {
    pods: HashMap<String, (String, String)>,
    containers: HashMap<String, String>,
    read_at: Option<Instant>,
}

/// How often the kubelet's directories may be read again for a name not found.
const KUBELET_REREAD: Duration = Duration::from_secs(1);

impl KubeletLogs {
    fn read(&mut self, logs: &Path) {
        if self.read_at.is_some_and(|at| at.elapsed() < KUBELET_REREAD) {
            return;
        }
        self.read_at = Some(Instant::now());
        self.pods.clear();
        self.containers.clear();
        for name in dir_names(&logs.join("pods")) {
            let mut fields = name.splitn(3, '_');
            if let (Some(ns), Some(pod), Some(uid)) = (fields.next(), fields.next(), fields.next())
            {
                self.pods.insert(uid.to_string(), (ns.to_string(), pod.to_string()));
            }
        }
        for name in dir_names(&logs.join("containers")) {
            let Some(stem) = name.strip_suffix(".log") else { continue };
            let Some((rest, id)) = stem.rsplit_once('-') else { continue };
            let mut fields = rest.splitn(3, '_');
            if let (Some(_pod), Some(_ns), Some(container)) =
                (fields.next(), fields.next(), fields.next())
                && is_container_id(id)
            {
                self.containers.insert(id.to_string(), container.to_string());
            }
        }
    }

    fn name(&mut self, logs: &Path, workload: &mut Workload) {
        let Some(uid) = &workload.pod_uid else { return };
        let container_unknown =
            workload.container_id.as_ref().is_some_and(|id| !self.containers.contains_key(id));
        if !self.pods.contains_key(uid) || container_unknown {
            self.read(logs);
        }
        if let Some((ns, pod)) = self.pods.get(uid) {
            workload.pod_namespace = Some(ns.clone());
            workload.pod_name = Some(pod.clone());
        }
        if let Some(name) = workload.container_id.as_ref().and_then(|id| self.containers.get(id)) {
            workload.container_name = Some(name.clone());
        }
    }
}

/// What the API says of the workload's pod, if it lists it: whether it did.
fn merge_kube(pods: &super::kube::Pods, workload: &mut Workload) -> bool {
    let Some(uid) = &workload.pod_uid else { return false };
    let pods = pods.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(pod) = pods.get(uid) else { return false };
    workload.pod_namespace = Some(pod.namespace.clone());
    workload.pod_name = Some(pod.name.clone());
    workload.pod_app.clone_from(&pod.app);
    if let Some((kind, name)) = &pod.controller {
        workload.pod_controller_kind = Some(kind.clone());
        workload.pod_controller_name = Some(name.clone());
    }
    if let Some(name) = workload.container_id.as_ref().and_then(|id| pod.containers.get(id)) {
        workload.container_name = Some(name.clone());
    }
    true
}

fn dir_names(dir: &Path) -> impl Iterator<Item = String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
}

/// How many cgroups [`Workloads`] remembers before it starts again: ids are never reused,
/// but a host that runs many short jobs makes new ones without end.
const CACHE_LIMIT: usize = 16_384;

/// cgroup id -> workload, resolved once per id: three system calls for the path when an
/// id is first seen, the kubelet's directories read at most once a second for a pod not
/// known yet.
///
/// Behind a mutex so that the agent's listing (`&self`) can resolve too; only its one
/// event-loop thread takes it.
#[derive(Debug)]
pub struct Workloads(std::sync::Mutex<Resolver>);

#[derive(Debug)]
struct Resolver {
    hierarchy: Option<Hierarchy>,
    kubelet_logs: PathBuf,
    kubelet: KubeletLogs,
    cache: HashMap<u64, Option<Arc<Workload>>>,
    /// `--kube`: the node's pods as the API lists them, and the ids whose pod it has given.
    kube: Option<super::kube::Pods>,
    kube_merged: std::collections::HashSet<u64>,
}

/// Where the kubelet keeps `pods/` and `containers/`.
pub const KUBELET_LOGS: &str = "/var/log";

impl Workloads {
    /// Resolving in the cgroup2 hierarchy of [`super::cgroup::root`], with pod names from
    /// `kubelet_logs`.
    pub fn new(kubelet_logs: PathBuf) -> Workloads {
        let hierarchy = super::cgroup::root().and_then(|root| match Hierarchy::open(root) {
            Ok(hierarchy) => Some(hierarchy),
            Err(error) => {
                tracing::warn!("cgroups: cannot open {}: {error}", root.display());
                None
            }
        });
        Workloads(std::sync::Mutex::new(Resolver {
            hierarchy,
            kubelet_logs,
            kubelet: KubeletLogs::default(),
            cache: HashMap::new(),
            kube: None,
            kube_merged: Default::default(),
        }))
    }

    /// Also names pods from what the API lists (`--kube`).
    pub fn with_kube(self, pods: super::kube::Pods) -> Workloads {
        let mut resolver = self.0.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        resolver.kube = Some(pods);
        Workloads(std::sync::Mutex::new(resolver))
    }

    /// The workload of cgroup `id`; None for 0 (not recorded), the root, or a cgroup gone
    /// before it was first asked about.
    pub fn of(&self, id: u64) -> Option<Arc<Workload>> {
        if id == 0 {
            return None;
        }
        let mut resolver = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(known) = resolver.cache.get(&id).cloned() {
            // What the API lists is merged in once it has the pod (a map lookup: the API is
            // asked by a task of its own).
            if let (Some(kube), Some(workload)) = (&resolver.kube, known.as_deref())
                && workload.pod_uid.is_some()
                && !resolver.kube_merged.contains(&id)
            {
                let mut merged = workload.clone();
                if merge_kube(kube, &mut merged) {
                    let merged = Some(Arc::new(merged));
                    resolver.kube_merged.insert(id);
                    resolver.cache.insert(id, merged.clone());
                    return merged;
                }
            }
            // Names the kubelet gives later are looked for again (its directories are read
            // at most once a second), and kept once found.
            if let Some(workload) = known.as_deref().filter(|w| w.lacks_names()) {
                let mut named = workload.clone();
                let Resolver { kubelet, kubelet_logs, .. } = &mut *resolver;
                kubelet.name(kubelet_logs, &mut named);
                if named != *workload {
                    let named = Some(Arc::new(named));
                    resolver.cache.insert(id, named.clone());
                    return named;
                }
            }
            return known;
        }
        let resolved = resolver.resolve(id);
        if resolver.cache.len() >= CACHE_LIMIT {
            resolver.cache.clear();
            resolver.kube_merged.clear();
        }
        resolver.cache.insert(id, resolved.clone());
        resolved
    }
}

impl Resolver {
    fn resolve(&mut self, id: u64) -> Option<Arc<Workload>> {
        let path = self.hierarchy.as_mut()?.path_of(id)?;
        if path == "/" {
            return None;
        }
        let mut workload = Workload::from_path(&path);
        self.kubelet.name(&self.kubelet_logs, &mut workload);
        if let Some(kube) = &self.kube
            && merge_kube(kube, &mut workload)
        {
            self.kube_merged.insert(id);
        }
        Some(Arc::new(workload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "8f1c4b3a-1d2e-4f5a-9b8c-7d6e5f4a3b2c";

    fn parse(path: &str) -> Workload {
        Workload::from_path(&path.replace("ID", ID))
    }

    #[test]
    fn kubernetes_systemd_driver() {
        let uid = UID.replace('-', "_");
        let w = parse(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-ID.scope"
        ));
        assert_eq!(w.runtime, Some(Runtime::Containerd));
        assert_eq!(w.container_id.as_deref(), Some(ID));
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.pod_qos, Some(Qos::Burstable));
        assert_eq!(w.unit, None);

        let w = parse(&format!("/kubepods.slice/kubepods-pod{uid}.slice/crio-ID.scope"));
        assert_eq!((w.runtime, w.pod_qos), (Some(Runtime::CriO), Some(Qos::Guaranteed)));
        let w = parse(&format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/crio-conmon-ID.scope"
        ));
        assert_eq!((w.container_id, w.pod_qos), (None, Some(Qos::BestEffort)));
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.runtime, None, "a pod's conmon is not a systemd service");
    }

    #[test]
    fn static_pods_and_a_kubelet_cgroup_root() {
        let uid = "6a1f0d3c9b8e7f6a5b4c3d2e1f0a9b8c";
        let w = parse(&format!("/kubepods/burstable/pod{uid}/ID"));
        assert_eq!(w.pod_uid.as_deref(), Some(uid));
        // kind: the kubelet's --cgroup-root=/kubelet with the systemd driver.
        let w = parse(&format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice/cri-containerd-ID.scope",
            UID.replace('-', "_")
        ));
        assert_eq!((w.pod_uid.as_deref(), w.pod_qos), (Some(UID), Some(Qos::BestEffort)));
        assert_eq!(w.runtime, Some(Runtime::Containerd));
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        let w = parse(&format!("/kubepods/besteffort/pod{UID}/ID"));
        assert_eq!((w.runtime, w.container_id.as_deref()), (None, Some(ID)));
        assert_eq!((w.pod_uid.as_deref(), w.pod_qos), (Some(UID), Some(Qos::BestEffort)));
        let w = parse(&format!("/kubepods/pod{UID}/ID"));
        assert_eq!(w.pod_qos, Some(Qos::Guaranteed));
    }

    #[test]
    fn docker_podman_and_services() {
        let w = parse("/system.slice/docker-ID.scope");
        assert_eq!((w.runtime, w.container_id.as_deref()), (Some(Runtime::Docker), Some(ID)));
        assert_eq!((w.pod_uid, w.pod_qos), (None, None));
        let w = parse("/docker/ID");
        assert_eq!(w.runtime, Some(Runtime::Docker));
        let w = parse(
            "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-ID.scope/container",
        );
        assert_eq!((w.runtime, w.container_id.as_deref()), (Some(Runtime::Podman), Some(ID)));
        let w = parse("/machine.slice/libpod-conmon-ID.scope");
        assert_eq!(w.container_id, None);
        let w = parse("/system.slice/nginx.service");
        assert_eq!((w.runtime, w.unit.as_deref()), (Some(Runtime::Systemd), Some("nginx.service")));
        assert_eq!(w.label(), "nginx.service");
        let w = parse("/netwatch-test/plain");
        assert!(!w.is_known());
        assert_eq!(w.label(), "/netwatch-test/plain");
    }

    #[test]
    fn labels_and_filters() {
        let mut w = parse(&format!("/kubepods/burstable/pod{UID}/ID"));
        assert_eq!(w.label(), "0123456789ab");
        assert!(w.matches_container("0123"));
        assert!(!w.matches_pod("web-0"));
        assert!(w.matches_pod(UID));
        w.pod_namespace = Some("shop".into());
        w.pod_name = Some("web-0".into());
        w.container_name = Some("nginx".into());
        assert_eq!(w.label(), "shop/web-0/nginx");
        assert!(w.matches_pod("web-0") && w.matches_pod("shop/web-0"));
        assert!(!w.matches_pod("other/web-0"));
        assert!(w.matches_container("nginx"));
    }

    #[test]
    fn kubelet_log_directories_name_pods_and_containers() {
        let dir = std::env::temp_dir().join(format!("netwatch-kubelet-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(format!("pods/shop_web-0_{UID}/nginx"))).unwrap();
        std::fs::create_dir_all(dir.join("containers")).unwrap();
        std::fs::write(dir.join(format!("containers/web-0_shop_nginx-{ID}.log")), "").unwrap();
        let mut w = parse(&format!("/kubepods/burstable/pod{UID}/ID"));
        KubeletLogs::default().name(&dir, &mut w);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(w.pod_namespace.as_deref(), Some("shop"));
        assert_eq!(w.pod_name.as_deref(), Some("web-0"));
        assert_eq!(w.container_name.as_deref(), Some("nginx"));
    }
}
