//! Peers from the Kubernetes API: a Node watcher whose objects are trimmed to
//! `NodeInfo` on arrival, and the agent's writes to its own Node.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tracing::{info, warn};

use super::validate::{ANN_BACKEND, ANN_PUBLIC_IP, ANN_VNI, ANN_VTEP_MAC, NodeInfo};
use crate::metrics::{Metrics, labels};
use crate::model::Backend;
pub use weir_common::nodes::trim;
use weir_common::nodes::{Change, NodeIndex};

pub fn internal_ips(node: &Node) -> Vec<IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|a| a.iter().filter(|a| a.type_ == "InternalIP").filter_map(|a| a.address.parse().ok()).collect())
        .unwrap_or_default()
}

/// Watches all Nodes forever. `on_change(nodes, complete, changed)` is called
/// once per batch of events that changed something weir reads; `complete` is
/// true once a full list has been seen, and each re-list replaces the whole
/// map so vanished nodes disappear (`weir_common::nodes::NodeIndex`).
/// `changed` names the nodes the batch added, changed or deleted, or is None
/// when it held a re-list.
pub async fn watch_nodes(
    api: Api<Node>,
    metrics: Arc<Metrics>,
    mut on_change: impl FnMut(&BTreeMap<String, NodeInfo>, bool, Option<&BTreeSet<String>>),
) {
    let mut index = NodeIndex::default();
    let mut changed = BTreeSet::new();
    let mut relisted = false;
    let stream = weir_common::watch::with_backoff(watcher::watcher(api, watcher::Config::default())).ready_chunks(4096);
    futures::pin_mut!(stream);
    // A re-list judges every node again, milliseconds at thousands of nodes,
    // so a burst of events is folded into one publish at most every MIN_GAP.
    const MIN_GAP: Duration = Duration::from_millis(20);
    let mut pending = false;
    let mut last_publish = Instant::now() - MIN_GAP;
    loop {
        let next_allowed = tokio::time::Instant::from_std(last_publish + MIN_GAP);
        let batch = tokio::select! {
            b = stream.next() => match b {
                Some(b) => b,
                None => return,
            },
            _ = tokio::time::sleep_until(next_allowed), if pending => Vec::new(),
        };
        for ev in batch {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    warn!(error = weir_common::with_causes(&e), "node watch failed; retrying, dataplane unchanged");
                    metrics.kube_watch_events.with_label_values(&[labels::ERROR]).inc();
                    continue;
                }
            };
            let kind = match &ev {
                Event::Apply(_) => "apply",
                Event::Delete(_) => "delete",
                Event::Init => "init",
                Event::InitApply(_) => "init_apply",
                Event::InitDone => "init_done",
            };
            metrics.kube_watch_events.with_label_values(&[kind]).inc();
            let first_list = !index.is_complete();
            match index.apply(ev) {
                Some(Change::Relisted) => {
                    if first_list {
                        info!(nodes = index.nodes().len(), "initial node list complete");
                    }
                    relisted = true;
                }
                Some(Change::Changed { name, .. }) => {
                    changed.insert(name);
                }
                Some(Change::Deleted(node)) => {
                    changed.insert(node.name);
                }
                None => continue,
            }
            pending = true;
        }
        if pending && last_publish.elapsed() >= MIN_GAP {
            on_change(index.nodes(), index.is_complete(), (!relisted).then_some(&changed));
            (pending, relisted) = (false, false);
            changed.clear();
            last_publish = Instant::now();
        }
    }
}

/// Publishes weir's annotations on its own Node through nodes/status, patching
/// only the keys whose value differs.
pub async fn publish_annotations(api: &Api<Node>, node: &str, wanted: &[(&str, String)]) -> kube::Result<usize> {
    let current = api.get(node).await?;
    let have = current.metadata.annotations.unwrap_or_default();
    let diff: serde_json::Map<String, serde_json::Value> =
        wanted.iter().filter(|(k, v)| have.get(*k) != Some(v)).map(|(k, v)| (k.to_string(), json!(v))).collect();
    if diff.is_empty() {
        return Ok(0);
    }
    let n = diff.len();
    api.patch_status(node, &PatchParams::default(), &Patch::Merge(json!({ "metadata": { "annotations": diff } })))
        .await?;
    Ok(n)
}

/// Sets NetworkUnavailable=False (reason WeirIsUp), as kubelet-facing CNIs do.
pub async fn set_network_available(api: &Api<Node>, node: &str) -> kube::Result<()> {
    let now = chrono_now();
    let patch = json!({ "status": { "conditions": [{
        "type": "NetworkUnavailable", "status": "False", "reason": "WeirIsUp",
        "message": "weir-agent has programmed the overlay", "lastTransitionTime": now, "lastHeartbeatTime": now
    }]}});
    api.patch_status(node, &PatchParams::default(), &Patch::Strategic(patch)).await?;
    Ok(())
}

fn chrono_now() -> String {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now().round(k8s_openapi::jiff::Unit::Second).unwrap(),
    )
    .0
    .to_string()
}

pub fn weir_annotations(
    public_ip: IpAddr,
    mac: Option<String>,
    backend: Backend,
    vni: u32,
) -> Vec<(&'static str, String)> {
    let mut v = vec![(ANN_PUBLIC_IP, public_ip.to_string()), (ANN_BACKEND, backend.as_str().to_string())];
    if let Some(mac) = mac {
        v.push((ANN_VTEP_MAC, mac));
        v.push((ANN_VNI, vni.to_string()));
    }
    v
}
