//! From validated nodes to the engine's peer set, logging and counting every
//! rejection once, and recording the accepted peers for `weir-agent status`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::validate::{NodeInfo, Skip, Validator};
use crate::metrics::{Metrics, labels};
use crate::model::{Backend, Peer, PeerSet};
use crate::plan::Direct;

/// Written to the run dir whenever the accepted peers change.
pub const PEERS_FILE: &str = "peers.json";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PeersRecord {
    pub backend: Backend,
    /// Direct routing, as the agent runs it (`weir-agent status` expects
    /// what it expects).
    #[serde(default)]
    pub direct: Option<Direct>,
    pub peers: Vec<Peer>,
    pub rejected: Vec<String>,
}

pub fn publisher(
    validator: Validator,
    direct: Option<Direct>,
    tx: watch::Sender<PeerSet>,
    metrics: Arc<Metrics>,
    record_path: PathBuf,
) -> impl FnMut(&BTreeMap<String, NodeInfo>, bool) {
    let (record_tx, record_rx) = watch::channel(None);
    tokio::spawn(write_records(record_rx, record_path));
    let mut last_rejections: Vec<String> = Vec::new();
    let mut last_skips: BTreeMap<String, String> = BTreeMap::new();
    move |nodes, complete| {
        let out = validator.validate(nodes.values());
        let rejections: Vec<String> = out.rejected.iter().map(|r| r.to_string()).collect();
        for (r, text) in out.rejected.iter().zip(&rejections) {
            if !last_rejections.contains(text) {
                warn!(node = %r.node, field = r.field, value = %r.value, reason = r.reason, "node rejected as a peer");
                metrics.peer_rejected.with_label_values(&[r.reason_label()]).inc();
            }
        }
        let skips: BTreeMap<String, String> = out.skipped.iter().map(|(n, s)| (n.clone(), format!("{s:?}"))).collect();
        for (name, skip) in &out.skipped {
            if last_skips.get(name) != skips.get(name) {
                match skip {
                    Skip::Pending => info!(node = %name, "node has not published its VTEP yet; not a peer"),
                    Skip::OtherBackend(b) => {
                        info!(node = %name, backend = %b, ours = validator.backend.as_str(), "node uses another backend; not programmed")
                    }
                }
            }
        }
        metrics.peers.with_label_values(&[labels::REJECTED]).set(out.rejected.len() as i64);
        metrics.peers.with_label_values(&[labels::PENDING]).set(out.skipped.len() as i64);
        // The engine first: the record is for people, and waits. A change
        // that alters no peer (a status heartbeat, a label) wakes nobody: the
        // engine and the firewall would each redo work over every peer.
        // Compared in place, so the common case (nothing changed) copies nothing.
        tx.send_if_modified(|current| {
            let unchanged = current.complete == complete
                && current.peers.len() == out.peers.len()
                && out.peers.iter().all(|p| current.peers.get(&p.name) == Some(p));
            if !unchanged {
                *current = PeerSet { complete, ..PeerSet::complete(out.peers.iter().cloned()) };
            }
            !unchanged
        });
        let record = PeersRecord { backend: validator.backend, direct, peers: out.peers, rejected: rejections };
        last_skips = skips;
        last_rejections = record.rejected.clone();
        record_tx.send_replace(Some(Arc::new(record)));
    }
}

/// How often, at most, the record is rewritten. With thousands of Nodes it
/// is hundreds of kilobytes; a burst of Node events costs one write.
const RECORD_GAP: Duration = Duration::from_millis(500);

/// Writes the latest record, off the path from a Node event to the kernel.
/// Not synced to disk: it is a status report for `weir-agent status`, which
/// nothing reads back on start (the run dir is a tmpfs on a real node).
async fn write_records(mut records: watch::Receiver<Option<Arc<PeersRecord>>>, path: PathBuf) {
    let mut last = String::new();
    while records.changed().await.is_ok() {
        let Some(record) = records.borrow_and_update().clone() else { continue };
        let json = serde_json::to_string(&*record).expect("peers serialise");
        if json != last {
            if let Err(e) = crate::cni::replace_file(&path, &json, false) {
                warn!(path = %path.display(), error = %e, "cannot record peers for `weir-agent status`");
            }
            last = json;
        }
        tokio::time::sleep(RECORD_GAP).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, addresses: &[&str]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            created: 1,
            public_ip: Some("198.18.0.12".into()),
            vtep_mac: Some("0e:00:00:00:00:02".into()),
            backend: Some("vxlan".into()),
            pod_cidrs: vec!["10.244.2.0/24".into()],
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn a_node_change_that_alters_no_peer_wakes_neither_engine_nor_firewall() {
        let validator = Validator::new(
            Backend::Vxlan,
            true,
            vec!["10.244.0.0/16".parse().unwrap()],
            "self".into(),
            vec!["10.244.1.0/24".parse().unwrap()],
        );
        let (tx, mut rx) = watch::channel(PeerSet::default());
        let record = std::env::temp_dir().join(format!("weir-publish-test-{}", std::process::id())).join(PEERS_FILE);
        let mut publish = publisher(validator, None, tx, Arc::new(Metrics::new()), record.clone());
        let mut nodes = BTreeMap::from([("peer".to_string(), node("peer", &[]))]);
        publish(&nodes, true);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().peers.len(), 1);
        // A status heartbeat that adds an address the rules accept.
        nodes.insert("peer".into(), node("peer", &["198.18.0.12", "fd00::12"]));
        publish(&nodes, true);
        assert!(!rx.has_changed().unwrap(), "an unchanged peer set was sent again");
        // A real change still goes through.
        nodes.insert("peer".into(), node("peer", &["198.18.0.99"]));
        publish(&nodes, true);
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().peers.is_empty(), "the peer's public IP is no longer its own");
        let _ = std::fs::remove_dir_all(record.parent().unwrap());
    }
}
