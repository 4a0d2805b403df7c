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
