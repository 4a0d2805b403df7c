//! On-demand mode: answer the kernel's L2MISS/L3MISS notifications as they come,
//! so a node carries fdb and neighbour entries only for peers it talks to.
//!
//! Answers are permanent entries (non-permanent ones count against the
//! machine-wide gc_thresh3 and fail with ENOBUFS past ~1024). weir owns their
//! lifetime: the engine keeps them while the peer exists, sweeps them when it
//! goes, and an optional idle timeout removes the unused ones.

pub mod answer;
pub mod miss;
pub mod responder;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::{Mac, Peer};

/// The peers whose fdb and neighbour entries are installed, with the time of
/// their last miss. The responder marks a peer here *before* writing to the
/// kernel, and the engine reads it *after* dumping the kernel, so every entry
/// the engine sees has its peer marked and is never swept as stale.
#[derive(Default)]
pub struct ActiveSet {
    inner: Mutex<HashMap<String, Instant>>,
}

impl ActiveSet {
    pub fn mark(&self, peer: &str) {
        let mut active = self.inner.lock().expect("active set lock");
        match active.get_mut(peer) {
            Some(seen) => *seen = Instant::now(),
            None => {
                active.insert(peer.to_string(), Instant::now());
            }
        }
    }

    pub fn contains(&self, peer: &str) -> bool {
        self.inner.lock().expect("active set lock").contains_key(peer)
    }

    pub fn remove(&self, peer: &str) {
        self.inner.lock().expect("active set lock").remove(peer);
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("active set lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets peers that are gone from the peer set.
    pub fn retain_known(&self, known: impl Fn(&str) -> bool) {
        self.inner.lock().expect("active set lock").retain(|p, _| known(p));
    }

    pub fn last_miss(&self, peer: &str) -> Option<Duration> {
        self.inner.lock().expect("active set lock").get(peer).map(|t| t.elapsed())
    }
}

/// What a miss resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub peer: String,
    pub mac: Mac,
    pub underlay: IpAddr,
}

/// Lookup tables from the current peer set, rebuilt when it changes and
/// swapped in whole, so the responder's hot path takes no lock beyond one read.
#[derive(Debug, Default, Clone)]
pub struct MissTable {
    by_gateway: HashMap<IpAddr, Answer>,
    by_mac: HashMap<Mac, Answer>,
}

impl MissTable {
    pub fn new<'a>(peers: impl IntoIterator<Item = &'a Peer>) -> Self {
        let mut t = MissTable::default();
        for p in peers {
            let answer = Answer { peer: p.name.clone(), mac: p.vtep_mac, underlay: p.underlay_ip };
            for cidr in &p.pod_cidrs {
                t.by_gateway.insert(crate::model::gateway_of(cidr), answer.clone());
            }
            t.by_mac.insert(p.vtep_mac, answer);
        }
        t
    }

    pub fn gateway(&self, ip: &IpAddr) -> Option<&Answer> {
        self.by_gateway.get(ip)
    }

    pub fn mac(&self, mac: &Mac) -> Option<&Answer> {
        self.by_mac.get(mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_answers_gateways_and_macs() {
        let p = Peer {
            name: "node-2".into(),
            underlay_ip: "198.18.0.12".parse().unwrap(),
            vtep_mac: "0e:00:00:00:00:02".parse().unwrap(),
            pod_cidrs: vec!["10.244.2.0/24".parse().unwrap(), "fd00:10:244:2::/64".parse().unwrap()],
        };
        let t = MissTable::new([&p]);
        assert_eq!(t.gateway(&"10.244.2.0".parse().unwrap()).unwrap().peer, "node-2");
        assert_eq!(t.gateway(&"fd00:10:244:2::".parse().unwrap()).unwrap().underlay, p.underlay_ip);
        assert!(t.gateway(&"10.244.2.1".parse().unwrap()).is_none());
        assert_eq!(t.mac(&p.vtep_mac).unwrap().peer, "node-2");
    }
}
