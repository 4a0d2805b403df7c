//! The agent's side of the peer rules (`weir_common::nodes`): its own node,
//! backend and underlay family, and the peers the engine is given.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Backend, Mac, Peer};
pub use weir_common::nodes::{ANN_BACKEND, ANN_PUBLIC_IP, ANN_VNI, ANN_VTEP_MAC, NodeInfo, Rejection, Skip};
use weir_common::nodes::{Accepted, IncrementalRules, Local, Rules};

pub struct Validator {
    pub backend: Backend,
    rules: Rules,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub peers: Vec<Peer>,
    pub rejected: Vec<Rejection>,
    pub skipped: std::collections::BTreeMap<String, Skip>,
}

impl Validator {
    /// Node "self", VXLAN, 10.244.1.0/24 in 10.244.0.0/16 (tests).
    #[cfg(test)]
    pub fn for_tests() -> Self {
        Validator::new(
            Backend::Vxlan,
            true,
            vec!["10.244.0.0/16".parse().unwrap()],
            "self".into(),
            vec!["10.244.1.0/24".parse().unwrap()],
        )
    }

    pub fn new(
        backend: Backend,
        underlay_is_v4: bool,
        cluster_cidrs: Vec<IpNet>,
        local_name: String,
        local_cidrs: Vec<IpNet>,
    ) -> Self {
        let rules = Rules {
            backend: Some(backend),
            underlay_is_v4: Some(underlay_is_v4),
            cluster_cidrs,
            local: Some(Local { name: local_name, pod_cidrs: local_cidrs }),
        };
        Validator { backend, rules }
    }

    pub fn validate<'a>(&self, nodes: impl IntoIterator<Item = &'a NodeInfo>) -> Outcome {
        let out = self.rules.validate(nodes);
        Outcome { peers: out.accepted.into_iter().map(peer).collect(), rejected: out.rejected, skipped: out.skipped }
    }

    /// The same rules, keeping their verdicts from one Node event to the next.
    pub fn into_incremental(self) -> IncrementalRules {
        IncrementalRules::new(self.rules)
    }
}

/// IPIP peers have no VTEP MAC; a placeholder derived from the underlay IP
/// keeps the peer type uniform (and unique, as the IPs are).
pub fn peer(a: Accepted) -> Peer {
    let vtep_mac = a.vtep_mac.unwrap_or_else(|| {
        Mac::random_local(u64::from(match a.underlay_ip {
            IpAddr::V4(v4) => u32::from(v4),
            IpAddr::V6(_) => 0,
        }))
    });
    Peer { name: a.name, underlay_ip: a.underlay_ip, vtep_mac, pod_cidrs: a.pod_cidrs }
}
