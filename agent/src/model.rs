//! The agent's view of the world: peers to reach and the local node. Pure data.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;

use ipnet::IpNet;

pub use weir_common::nodes::{Backend, CidrSet, Mac, MacError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Full,
    OnDemand,
}

/// A remote node, already validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    pub name: String,
    pub underlay_ip: IpAddr,
    pub vtep_mac: Mac,
    pub pod_cidrs: Vec<IpNet>,
}

/// The peer set handed to the engine. `complete` is false until the source has
/// delivered a full listing; until then the engine adds but never deletes, so a
/// half-read cluster cannot make it sweep live entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSet {
    pub peers: BTreeMap<String, Peer>,
    pub complete: bool,
    pub edits: Edits,
}

impl PeerSet {
    pub fn complete(peers: impl IntoIterator<Item = Peer>) -> Self {
        PeerSet { peers: peers.into_iter().map(|p| (p.name.clone(), p)).collect(), complete: true, ..Self::default() }
    }
}

/// How many edits a peer set remembers. A reader further behind compares
/// every peer, as it does for a set built whole.
const EDITS_KEPT: usize = 1024;

/// The names a peer set's edits touched, so that a reader that saw an
/// earlier version compares those, not every peer: with thousands of peers,
/// the walk over all of them was a large share of a Node event's cost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edits {
    version: u64,
    /// The log holds every edit after this version; None for a set built
    /// whole, whose log tells nothing.
    from: Option<u64>,
    log: VecDeque<(u64, String)>,
}

impl Edits {
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The peer `name` was added, changed or removed.
    pub fn touched(&mut self, name: &str) {
        self.version += 1;
        self.log.push_back((self.version, name.to_string()));
        if self.log.len() > EDITS_KEPT
            && let Some((v, _)) = self.log.pop_front()
        {
            self.from = self.from.map(|_| v);
        }
    }

    /// Any peer may have changed: readers before now compare them all.
    pub fn replaced(&mut self) {
        self.version += 1;
        self.log.clear();
        self.from = Some(self.version);
    }

    /// The names touched after version `seen`; None when the log does not
    /// reach back to it.
    pub fn since(&self, seen: u64) -> Option<BTreeSet<&String>> {
        let from = self.from?;
        (from <= seen && seen <= self.version)
            .then(|| self.log.iter().filter(|(v, _)| *v > seen).map(|(_, n)| n).collect())
    }
}

/// `differences` between a reader's map and `next`, which the reader last
/// saw at version `seen`: over the names `next`'s edits touched since then
/// when its log reaches back that far, over every peer otherwise.
pub fn changes_since<'a, A>(
    old: &'a BTreeMap<String, A>,
    next: &'a PeerSet,
    seen: Option<u64>,
    same: impl Fn(&A, &Peer) -> bool + 'a,
) -> Vec<(&'a String, Option<&'a A>, Option<&'a Peer>)> {
    let Some(names) = seen.and_then(|v| next.edits.since(v)) else {
        return differences(old, &next.peers, same).collect();
    };
    let pairs = names.into_iter().map(|name| (name, old.get(name), next.peers.get(name)));
    pairs
        .filter(|(_, a, b)| match (a, b) {
            (Some(a), Some(b)) => !same(a, b),
            (None, None) => false,
            _ => true,
        })
        .collect()
}

/// The names whose values differ between two maps, with the old and the new
/// value (None where a name is absent). Both maps are sorted by name, so one
/// walk over them side by side finds them, without a lookup per name: a Node
/// event costs the engine and the firewall a comparison per peer, not a copy.
pub fn differences<'a, A, B>(
    old: &'a BTreeMap<String, A>,
    new: &'a BTreeMap<String, B>,
    same: impl Fn(&A, &B) -> bool + 'a,
) -> impl Iterator<Item = (&'a String, Option<&'a A>, Option<&'a B>)> + 'a {
    let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
    std::iter::from_fn(move || {
        loop {
            let step = match (old.peek(), new.peek()) {
                (None, None) => return None,
                (Some((o, _)), Some((n, _))) if o == n => (old.next(), new.next()),
                (Some((o, _)), Some((n, _))) if o > n => (None, new.next()),
                (None, Some(_)) => (None, new.next()),
                _ => (old.next(), None),
            };
            match step {
                (Some((_, a)), Some((_, b))) if same(a, b) => continue,
                (Some((name, a)), b) => return Some((name, Some(a), b.map(|(_, b)| b))),
                (None, Some((name, b))) => return Some((name, None, Some(b))),
                (None, None) => unreachable!("one side advances each turn"),
            }
        }
    })
}

/// The gateway address of a pod CIDR: its network address (the flannel convention),
/// which the overlay device owns as a /32 so that it never collides with the
/// bridge's first host address.
pub fn gateway_of(cidr: &IpNet) -> IpAddr {
    cidr.network()
}

/// Fixtures the unit tests share.
#[cfg(test)]
pub mod fixtures {
    use super::Peer;

    /// Node n: underlay 198.18.0.(10+n), MAC 0e:00:00:00:00:0n, pod CIDR 10.244.n.0/24.
    pub fn peer(n: u8) -> Peer {
        Peer {
            name: format!("node-{n}"),
            underlay_ip: format!("198.18.0.{}", 10 + n).parse().unwrap(),
            vtep_mac: format!("0e:00:00:00:00:{n:02x}").parse().unwrap(),
            pod_cidrs: vec![format!("10.244.{n}.0/24").parse().unwrap()],
        }
    }

    /// The overlay device of node 1, as the tests' engine sets it up.
    pub fn device() -> crate::dataplane::DeviceSpec {
        crate::dataplane::DeviceSpec {
            name: "weir.1".into(),
            kind: crate::dataplane::DeviceKind::Vxlan { vni: 1, port: 8472, on_demand: false },
            local: "198.18.0.11".parse().unwrap(),
            underlay_ifindex: 2,
            mtu: 1450,
            mac: None,
            addresses: vec!["10.244.1.0/32".parse().unwrap()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_interleave_additions_changes_and_removals_in_name_order() {
        let old: BTreeMap<String, u8> = [("a", 1), ("c", 3), ("d", 4), ("f", 6)].map(|(k, v)| (k.into(), v)).into();
        let new: BTreeMap<String, u8> = [("b", 2), ("c", 30), ("d", 4), ("g", 7)].map(|(k, v)| (k.into(), v)).into();
        let got: Vec<(&str, Option<u8>, Option<u8>)> =
            differences(&old, &new, |a, b| a == b).map(|(n, a, b)| (n.as_str(), a.copied(), b.copied())).collect();
        assert_eq!(
            got,
            [
                ("a", Some(1), None),
                ("b", None, Some(2)),
                ("c", Some(3), Some(30)),
                ("f", Some(6), None),
                ("g", None, Some(7))
            ]
        );
        assert_eq!(differences(&new, &new, |a, b| a == b).count(), 0);
        assert_eq!(differences(&BTreeMap::<String, u8>::new(), &new, |a, b| a == b).count(), 4);
    }

    fn peer(n: u32, octet: u8) -> Peer {
        Peer {
            name: format!("node-{n}"),
            underlay_ip: IpAddr::from([198, 18, 0, octet]),
            vtep_mac: format!("0e:00:00:00:00:{octet:02x}").parse().unwrap(),
            pod_cidrs: vec![format!("10.244.{n}.0/24").parse().unwrap()],
        }
    }

    /// The publisher's edit, as `peers::publish` makes it.
    fn edit(set: &mut PeerSet, n: u32, octet: Option<u8>) {
        let name = format!("node-{n}");
        match octet {
            Some(o) => set.peers.insert(name.clone(), peer(n, o)).map(|_| ()),
            None => set.peers.remove(&name).map(|_| ()),
        };
        set.edits.touched(&name);
    }

    #[test]
    fn a_reader_compares_only_the_names_edited_since_it_looked() {
        let mut set = PeerSet::complete((0..100).map(|n| peer(n, 1)));
        assert_eq!(set.edits.since(0), None, "a set built whole tells nothing");
        set.edits.replaced();
        let (reader, seen) = (set.peers.clone(), set.edits.version());
        edit(&mut set, 5, Some(2));
        edit(&mut set, 7, None);
        edit(&mut set, 200, Some(3));
        edit(&mut set, 9, Some(1)); // touched, but equal to what the reader holds
        let touched = set.edits.since(seen).unwrap();
        assert_eq!(touched.into_iter().cloned().collect::<Vec<_>>(), ["node-200", "node-5", "node-7", "node-9"]);
        let names = |v: Vec<(&String, Option<&Peer>, Option<&Peer>)>| v.into_iter().map(|(n, ..)| n.clone()).collect();
        let walked: Vec<String> = names(differences(&reader, &set.peers, |a, b| a == b).collect());
        assert_eq!(names(changes_since(&reader, &set, Some(seen), |a, b| a == b)), walked);
        assert_eq!(walked, ["node-200", "node-5", "node-7"]);
        assert!(set.edits.since(set.edits.version()).unwrap().is_empty());
    }

    #[test]
    fn a_reader_the_log_no_longer_reaches_compares_every_peer() {
        let mut set = PeerSet::default();
        set.edits.replaced();
        let (reader, seen) = (set.peers.clone(), set.edits.version());
        for k in 0..=EDITS_KEPT as u32 {
            edit(&mut set, k % 50, Some((k % 200) as u8 + 1));
        }
        assert_eq!(set.edits.since(seen), None);
        assert!(set.edits.since(seen + 1).is_some());
        let got = changes_since(&reader, &set, Some(seen), |a, b| a == b);
        assert_eq!(got.len(), 50);
        // A reader ahead of the set (a set replaced by one built whole) too.
        assert_eq!(PeerSet::default().edits.since(3), None);
        set.edits.replaced();
        assert_eq!(set.edits.since(seen), None);
    }
}
