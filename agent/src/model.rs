//! The agent's view of the world: peers to reach and the local node. Pure data.

use std::collections::BTreeMap;
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
}

impl PeerSet {
    pub fn complete(peers: impl IntoIterator<Item = Peer>) -> Self {
        PeerSet { peers: peers.into_iter().map(|p| (p.name.clone(), p)).collect(), complete: true }
    }
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
}
