//! From validated nodes to the engine's peer set, logging and counting every
//! rejection once, and recording the accepted peers for `weir-agent status`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

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
        let record = PeersRecord { backend: validator.backend, direct, peers: out.peers, rejected: rejections };
        let json = serde_json::to_string(&record).expect("peers serialise");
        if let Err(e) = crate::cni::write_if_changed(&record_path, &json) {
            warn!(path = %record_path.display(), error = %e, "cannot record peers for `weir-agent status`");
        }
        last_skips = skips;
        last_rejections = record.rejected;
        let mut set = PeerSet::complete(record.peers);
        set.complete = complete;
        tx.send_replace(set);
    }
}
