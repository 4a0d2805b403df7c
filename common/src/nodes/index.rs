//! The Node watch both binaries run, as one state machine: every Node trimmed
//! to `NodeInfo` on arrival, and each re-list (first list, or after a 410)
//! replacing the whole map, so Nodes deleted while the watch was away vanish.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::Event;

use super::{NodeInfo, trim};

/// What one watch event changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A full list replaced the map.
    Relisted,
    /// A Node was added or its weir fields changed; `old` is what it was.
    Changed {
        name: String,
        old: Option<NodeInfo>,
    },
    Deleted(NodeInfo),
}

#[derive(Debug, Default)]
pub struct NodeIndex {
    nodes: BTreeMap<String, NodeInfo>,
    relist: Option<BTreeMap<String, NodeInfo>>,
    complete: bool,
}

impl NodeIndex {
    /// Applies one event; None when nothing weir reads changed (a kubelet
    /// heartbeat, a Node of the list still arriving).
    pub fn apply(&mut self, event: Event<Node>) -> Option<Change> {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                None
            }
            Event::InitApply(n) => {
                let info = trim(&n);
                self.relist.get_or_insert_with(BTreeMap::new).insert(info.name.clone(), info);
                None
            }
            Event::InitDone => {
                self.nodes = self.relist.take().unwrap_or_default();
                self.complete = true;
                Some(Change::Relisted)
            }
            Event::Apply(n) => {
                let info = trim(&n);
                if self.nodes.get(&info.name) == Some(&info) {
                    return None;
                }
                let name = info.name.clone();
                let old = self.nodes.insert(name.clone(), info);
                Some(Change::Changed { name, old })
            }
            Event::Delete(n) => self.nodes.remove(n.metadata.name.as_deref().unwrap_or_default()).map(Change::Deleted),
        }
    }

    pub fn nodes(&self) -> &BTreeMap<String, NodeInfo> {
        &self.nodes
    }

    /// A full list has been seen: absence from the map now means deleted.
    pub fn is_complete(&self) -> bool {
        self.complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.annotations = Some([(super::super::ANN_PUBLIC_IP.to_string(), ip.to_string())].into());
        n
    }

    #[test]
    fn a_relist_replaces_the_map_and_heartbeats_change_nothing() {
        let mut idx = NodeIndex::default();
        for ev in [Event::Init, Event::InitApply(node("a", "198.18.0.1")), Event::InitApply(node("b", "198.18.0.2"))] {
            assert_eq!(idx.apply(ev), None);
        }
        assert!(!idx.is_complete() && idx.nodes().is_empty(), "a partial list is not the map");
        assert_eq!(idx.apply(Event::InitDone), Some(Change::Relisted));
        assert_eq!(idx.nodes().len(), 2);
        let mut beat = node("a", "198.18.0.1");
        beat.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
        assert_eq!(idx.apply(Event::Apply(beat)), None, "nothing weir reads changed");
        match idx.apply(Event::Apply(node("a", "198.18.0.9"))) {
            Some(Change::Changed { name, old: Some(old) }) => {
                assert_eq!((name.as_str(), old.public_ip.as_deref()), ("a", Some("198.18.0.1")))
            }
            other => panic!("{other:?}"),
        }
        // b was deleted while the watch was away: the re-list drops it.
        for ev in [Event::Init, Event::InitApply(node("a", "198.18.0.9"))] {
            idx.apply(ev);
        }
        assert_eq!(idx.apply(Event::InitDone), Some(Change::Relisted));
        assert_eq!(idx.nodes().keys().collect::<Vec<_>>(), ["a"]);
        assert!(matches!(idx.apply(Event::Delete(node("a", ""))), Some(Change::Deleted(n)) if n.name == "a"));
        assert_eq!(idx.apply(Event::Delete(node("a", ""))), None);
    }
}
