//! What the Kubernetes API says about this node's pods (`netwatch agent --kube`): their
//! names, a chosen label, the controller that owns each, and their containers' names by id.
//! A task of its own lists them every [`REFRESH`]; the event path only reads the map.
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde_json::Value;

/// How often the node's pods are listed again.
pub const REFRESH: Duration = Duration::from_secs(30);
/// Pods kept at most (a node runs 110 by default), and containers per pod.
const MAX_PODS: usize = 2048;
const MAX_CONTAINERS: usize = 64;
/// Where a pod's service account puts its credentials.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// One pod as the API describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// `app.kubernetes.io/name`, else `app`.
    pub app: Option<String>,
    /// The controller that owns it: (kind, name), e.g. ("ReplicaSet", "web-7c9d").
    pub controller: Option<(String, String)>,
    /// Container id (without the runtime's `containerd://`) -> its name.
    pub containers: HashMap<String, String>,
}

/// The node's pods by UID, as last listed.
pub type Pods = Arc<RwLock<HashMap<String, Pod>>>;

#[derive(Clone, Debug)]
pub struct Options {
    /// The API server; in a pod, `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    pub api: Option<reqwest::Url>,
    pub node: String,
    pub token_file: Option<PathBuf>,
    pub ca_certificate: Option<PathBuf>,
}

/// Reads a PodList's items into pods by UID (bounded).
fn parse(list: &Value, pods: &mut HashMap<String, Pod>) {
    let Some(items) = list["items"].as_array() else { return };
    for item in items.iter().take(MAX_PODS.saturating_sub(pods.len())) {
        let meta = &item["metadata"];
        let (Some(uid), Some(namespace), Some(name)) =
            (meta["uid"].as_str(), meta["namespace"].as_str(), meta["name"].as_str())
        else {
            continue;
        };
        let labels = &meta["labels"];
        let app = labels["app.kubernetes.io/name"].as_str().or(labels["app"].as_str());
        let controller = meta["ownerReferences"].as_array().and_then(|owners| {
            let owner = owners.iter().find(|o| o["controller"] == true)?;
            Some((owner["kind"].as_str()?.to_string(), owner["name"].as_str()?.to_string()))
        });
        let status = &item["status"];
        let containers =
            ["containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"]
                .iter()
                .filter_map(|key| status[*key].as_array())
                .flatten()
                .filter_map(|c| {
                    let id = c["containerID"].as_str()?;
                    let id = id.split_once("://").map_or(id, |(_, id)| id);
                    Some((id.to_string(), c["name"].as_str()?.to_string()))
                })
                .take(MAX_CONTAINERS)
                .collect();
        pods.insert(
            uid.to_string(),
            Pod {
                namespace: namespace.into(),
                name: name.into(),
                app: app.map(String::from),
                controller,
                containers,
            },
        );
    }
}

/// Starts listing the node's pods into the returned map; checks the options first.
pub fn start(options: &Options) -> anyhow::Result<Pods> {
    anyhow::ensure!(
        !options.node.is_empty(),
        "--kube: which node? Give --kube-node NAME, or set NODE_NAME (the DaemonSet sets it from \
         spec.nodeName)"
    );
    let api = match &options.api {
        Some(api) => api.clone(),
        None => {
            let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                anyhow::anyhow!(
                    "--kube: not in a pod (KUBERNETES_SERVICE_HOST is not set); give the API \
                     server with --kube-api"
                )
            })?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            format!("https://{host}:{port}").parse()?
        }
    };
    let token_file =
        options.token_file.clone().unwrap_or_else(|| PathBuf::from(SERVICE_ACCOUNT).join("token"));
    let ca = options.ca_certificate.clone().or_else(|| {
        let path = PathBuf::from(SERVICE_ACCOUNT).join("ca.crt");
        path.exists().then_some(path)
    });
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut client = reqwest::Client::builder().timeout(Duration::from_secs(20));
    if let Some(ca) = &ca {
        let pem =
            std::fs::read(ca).map_err(|e| anyhow::anyhow!("--kube: {}: {e}", ca.display()))?;
        let certificate = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| anyhow::anyhow!("--kube: {}: not a PEM certificate: {e}", ca.display()))?;
        client = client.add_root_certificate(certificate);
    }
    let client = client.build()?;
    let pods: Pods = Arc::default();
    let filled = pods.clone();
    let node = options.node.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH);
        let mut warned = false;
        loop {
            tick.tick().await;
            // The token is read at every listing: the kubelet rotates it.
            let token = std::fs::read_to_string(&token_file).unwrap_or_default();
            match list(&client, &api, &node, token.trim()).await {
                Ok(listed) => {
                    *filled.write().unwrap_or_else(std::sync::PoisonError::into_inner) = listed;
                    warned = false;
                }
                Err(error) if !warned => {
                    tracing::warn!("--kube: listing this node's pods failed: {error}");
                    warned = true;
                }
                Err(_) => {}
            }
        }
    });
    Ok(pods)
}

/// Every pod on `node`, page by page.
async fn list(
    client: &reqwest::Client,
    api: &reqwest::Url,
    node: &str,
    token: &str,
) -> anyhow::Result<HashMap<String, Pod>> {
    let mut pods = HashMap::new();
    let mut next: Option<String> = None;
    loop {
        let mut url = api.join("/api/v1/pods")?;
        url.query_pairs_mut()
            .append_pair("fieldSelector", &format!("spec.nodeName={node}"))
            .append_pair("limit", "500");
        if let Some(token) = &next {
            url.query_pairs_mut().append_pair("continue", token);
        }
        let response = client.get(url).bearer_auth(token).send().await?;
        let status = response.status();
        if !status.is_success() {
            anyhow::bail!("{status} from {api} (the service account needs `list` on pods)");
        }
        let page: Value = serde_json::from_slice(&response.bytes().await?)?;
        parse(&page, &mut pods);
        next = page["metadata"]["continue"].as_str().filter(|c| !c.is_empty()).map(String::from);
        if next.is_none() || pods.len() >= MAX_PODS {
            return Ok(pods);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_list_gives_names_controllers_and_containers() {
        let list = serde_json::json!({"items": [{
            "metadata": {"uid": "u1", "namespace": "shop", "name": "web-7c9d-x2",
                         "labels": {"app": "web"},
                         "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7c9d", "controller": true}]},
            "status": {"containerStatuses": [{"name": "nginx", "containerID": "containerd://abc"}],
                       "initContainerStatuses": [{"name": "init", "containerID": "cri-o://def"}]}
        }, {"metadata": {"name": "no-uid"}}]});
        let mut pods = HashMap::new();
        parse(&list, &mut pods);
        assert_eq!(pods.len(), 1);
        let pod = &pods["u1"];
        assert_eq!((pod.namespace.as_str(), pod.name.as_str()), ("shop", "web-7c9d-x2"));
        assert_eq!(pod.app.as_deref(), Some("web"));
        assert_eq!(pod.controller, Some(("ReplicaSet".into(), "web-7c9d".into())));
        assert_eq!(pod.containers["abc"], "nginx");
        assert_eq!(pod.containers["def"], "init");
    }
}
