//! From validated nodes to the engine's peer set, logging and counting every
//! rejection once, and reporting the peers to `weir-agent status` on request.
//! A Node event costs in proportion to what it changed: the rules judge the
//! changed nodes (`IncrementalRules`), and the peer set is edited in place.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};
use weir_common::nodes::{IncrementalRules, Verdict};

use super::validate::{NodeInfo, Skip, Validator, peer};
use crate::metrics::{Metrics, labels};
use crate::model::{Backend, Peer, PeerSet};
use crate::plan::Direct;

/// Where the record is also written, in the run dir, for `weir-agent status`
/// when the agent does not answer.
pub const PEERS_FILE: &str = "peers.json";

/// What `weir-agent status` compares the kernel with: served at `/peers`.
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

/// Builds the peers record when asked. With thousands of Nodes it is
/// hundreds of kilobytes and milliseconds of CPU: written 2 s after Node
/// events, it was 41 % of an agent's CPU in a run of joins, spent by every
/// agent at once, beside the events it delayed (BENCHMARKS.md, F3).
#[derive(Clone)]
pub struct PeersReport {
    verdicts: Arc<Mutex<IncrementalRules>>,
    backend: Backend,
    direct: Option<Direct>,
    /// Sent when a verdict moved: the record changed.
    moved: Arc<watch::Sender<()>>,
}

/// The file is rewritten once verdicts have stood still this long, so a
/// burst of Node events costs one write, after it...
const RECORD_QUIET: Duration = Duration::from_secs(1);
/// ...but no later than this after the first change it lacks, however busy
/// the cluster.
const RECORD_STALE_AT_MOST: Duration = Duration::from_secs(30);

impl PeersReport {
    pub fn new(validator: Validator, direct: Option<Direct>) -> Self {
        let backend = validator.backend;
        let verdicts = Arc::new(Mutex::new(validator.into_incremental()));
        PeersReport { verdicts, backend, direct, moved: Arc::new(watch::channel(()).0) }
    }

    /// Keeps `path` holding the record, for `weir-agent status` when the
    /// agent is alive but does not answer (a deadlock, a stopped process).
    /// Not synced to disk: nothing reads it back on start.
    pub fn write_when_quiet(&self, path: PathBuf) {
        let (report, mut moved) = (self.clone(), self.moved.subscribe());
        tokio::spawn(async move {
            while moved.changed().await.is_ok() {
                let limit = Instant::now() + RECORD_STALE_AT_MOST;
                loop {
                    let until = limit.min(Instant::now() + RECORD_QUIET);
                    match tokio::time::timeout_at(until, moved.changed()).await {
                        Ok(Ok(())) if Instant::now() < limit => continue,
                        Ok(Err(_)) => return,
                        _ => break,
                    }
                }
                moved.borrow_and_update();
                let json = serde_json::to_string(&report.record()).expect("peers serialise");
                if let Err(e) = crate::cni::replace_file(&path, &json, false) {
                    warn!(path = %path.display(), error = %e, "cannot record peers for `weir-agent status`");
                }
            }
        });
    }

    pub fn record(&self) -> PeersRecord {
        let mut record =
            PeersRecord { backend: self.backend, direct: self.direct, peers: Vec::new(), rejected: Vec::new() };
        // Cloned under the lock, serialised after it: the next Node event
        // waits for the lock.
        let verdicts = self.verdicts.lock().expect("verdicts lock");
        for verdict in verdicts.by_name() {
            match verdict {
                Verdict::Accepted(a) => record.peers.push(peer(a.clone())),
                Verdict::Rejected(r) => record.rejected.push(r.to_string()),
                Verdict::Skipped(_) => {}
            }
        }
        record
    }
}

/// Returns `publish(nodes, complete, changed)`: `changed` names the nodes
/// added, changed or deleted since the last call, None when any may have
/// (a re-list, a reread file). `report` then shows what it judged.
pub fn publisher(
    report: &PeersReport,
    tx: watch::Sender<PeerSet>,
    metrics: Arc<Metrics>,
) -> impl FnMut(&BTreeMap<String, NodeInfo>, bool, Option<&BTreeSet<String>>) + use<> {
    let (backend, verdicts, record_moved) = (report.backend, report.verdicts.clone(), report.moved.clone());
    move |nodes, complete, changed| {
        let mut verdicts = verdicts.lock().expect("verdicts lock");
        let moved = verdicts.update(nodes, changed);
        for name in &moved {
            match verdicts.verdict(name) {
                Some(Verdict::Rejected(r)) => {
                    warn!(node = %r.node, field = r.field, value = %r.value, reason = r.reason, "node rejected as a peer");
                    metrics.peer_rejected.with_label_values(&[r.reason_label()]).inc();
                }
                Some(Verdict::Skipped(Skip::Pending)) => {
                    info!(node = %name, "node has not published its VTEP yet; not a peer")
                }
                Some(Verdict::Skipped(Skip::OtherBackend(b))) => {
                    info!(node = %name, backend = %b, ours = backend.as_str(), "node uses another backend; not programmed")
                }
                Some(Verdict::Accepted(_)) | None => {}
            }
        }
        metrics.peers.with_label_values(&[labels::REJECTED]).set(verdicts.rejected_count() as i64);
        metrics.peers.with_label_values(&[labels::PENDING]).set(verdicts.skipped_count() as i64);
        // A change that alters no peer (a label, a rejected node's new
        // value) wakes nobody: the engine and the firewall would each redo
        // work.
        tx.send_if_modified(|current| edit_peer_set(current, &verdicts, complete, changed.is_some().then_some(&moved)));
        if !moved.is_empty() {
            record_moved.send_replace(());
        }
    }
}

/// Brings `current` up to `verdicts`: only the peers named in `moved` when
/// given, all of them otherwise. Returns whether anything changed.
fn edit_peer_set(
    current: &mut PeerSet,
    verdicts: &IncrementalRules,
    complete: bool,
    moved: Option<&BTreeSet<String>>,
) -> bool {
    let Some(moved) = moved.filter(|_| current.complete == complete) else {
        let accepted = verdicts.by_name().filter_map(|v| match v {
            Verdict::Accepted(a) => Some((a.name.clone(), peer(a.clone()))),
            _ => None,
        });
        let peers: BTreeMap<String, Peer> = accepted.collect();
        if current.complete == complete && current.peers == peers {
            return false;
        }
        (current.peers, current.complete) = (peers, complete);
        current.edits.replaced();
        return true;
    };
    let mut modified = false;
    for name in moved {
        let edited = match verdicts.verdict(name) {
            Some(Verdict::Accepted(a)) => {
                let p = peer(a.clone());
                let differs = current.peers.get(name) != Some(&p);
                if differs {
                    current.peers.insert(name.clone(), p);
                }
                differs
            }
            _ => current.peers.remove(name).is_some(),
        };
        if edited {
            current.edits.touched(name);
            modified = true;
        }
    }
    modified
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
        let (tx, mut rx) = watch::channel(PeerSet::default());
        let mut publish = publisher(&PeersReport::new(Validator::for_tests(), None), tx, Arc::new(Metrics::new()));
        let peer_changed = BTreeSet::from(["peer".to_string()]);
        let mut nodes = BTreeMap::from([("peer".to_string(), node("peer", &[]))]);
        publish(&nodes, true, None);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().peers.len(), 1);
        // A status heartbeat that adds an address the rules accept.
        nodes.insert("peer".into(), node("peer", &["198.18.0.12", "fd00::12"]));
        publish(&nodes, true, Some(&peer_changed));
        assert!(!rx.has_changed().unwrap(), "an unchanged peer set was sent again");
        // A real change still goes through, logged for the readers.
        let seen = rx.borrow().edits.version();
        nodes.insert("peer".into(), node("peer", &["198.18.0.99"]));
        publish(&nodes, true, Some(&peer_changed));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow().edits.since(seen), Some(BTreeSet::from([&"peer".to_string()])));
        assert!(rx.borrow_and_update().peers.is_empty(), "the peer's public IP is no longer its own");
        // As does its repair, and a re-list that finds what the edits made.
        nodes.insert("peer".into(), node("peer", &[]));
        publish(&nodes, true, Some(&peer_changed));
        assert_eq!(rx.borrow_and_update().peers.len(), 1);
        publish(&nodes, true, None);
        assert!(!rx.has_changed().unwrap(), "a re-list of the same nodes sent a new peer set");
    }

    #[tokio::test(start_paused = true)]
    async fn the_record_file_is_written_once_changes_stop_or_have_gone_on_for_30_s() {
        let dir = std::env::temp_dir().join(format!("weir-record-test-{}", std::process::id()));
        let path = dir.join(PEERS_FILE);
        let (tx, _rx) = watch::channel(PeerSet::default());
        let report = PeersReport::new(Validator::for_tests(), None);
        report.write_when_quiet(path.clone());
        let mut publish = publisher(&report, tx, Arc::new(Metrics::new()));
        let recorded = || std::fs::read_to_string(&path).ok().map(|t| serde_json::from_str::<PeersRecord>(&t).unwrap());
        let peer_changed = BTreeSet::from(["peer".to_string()]);
        let mut nodes = BTreeMap::from([("peer".to_string(), node("peer", &[]))]);
        publish(&nodes, true, None);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(recorded().is_none(), "written before a second of quiet");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(recorded().unwrap().peers.len(), 1);
        // A change every half second: put off, but not past 30 s.
        for k in 0..70u8 {
            let mut n = node("peer", &[]);
            n.vtep_mac = Some(format!("0e:00:00:00:01:{k:02x}"));
            nodes.insert("peer".into(), n);
            publish(&nodes, true, Some(&peer_changed));
            tokio::time::sleep(Duration::from_millis(500)).await;
            if k == 62 {
                let mac = recorded().unwrap().peers[0].vtep_mac;
                assert_ne!(mac.to_string(), "0e:00:00:00:00:02", "not written in 31 s of changes");
            }
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            recorded().unwrap().peers[0].vtep_mac.to_string(),
            "0e:00:00:00:01:45",
            "the last change not written"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_report_holds_what_the_last_publish_accepted_and_rejected() {
        let (tx, _rx) = watch::channel(PeerSet::default());
        let report = PeersReport::new(Validator::for_tests(), None);
        let mut publish = publisher(&report, tx, Arc::new(Metrics::new()));
        assert!(report.record().peers.is_empty(), "nothing published yet");
        let mut thief = node("thief", &[]);
        thief.created = 2;
        let mut nodes = BTreeMap::from([("peer".to_string(), node("peer", &[])), ("thief".to_string(), thief)]);
        publish(&nodes, true, None);
        let record = report.record();
        assert_eq!(record.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["peer"]);
        assert_eq!(record.rejected.len(), 1, "{:?}", record.rejected);
        assert!(record.rejected[0].contains("thief"), "{:?}", record.rejected);
        // Asked again after a change, it says what the change left.
        nodes.remove("peer");
        publish(&nodes, true, Some(&BTreeSet::from(["peer".to_string()])));
        let record = report.record();
        assert_eq!(record.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["thief"]);
        assert!(record.rejected.is_empty(), "{:?}", record.rejected);
    }
}
