//! Turns trimmed Node records into validated peers. Pure, so every rule is
//! unit-tested and fuzzed without an API server.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Backend, CidrSet, Mac, Peer};

pub const ANN_PUBLIC_IP: &str = "weir.dev/public-ip";
pub const ANN_VTEP_MAC: &str = "weir.dev/vtep-mac";
pub const ANN_BACKEND: &str = "weir.dev/backend";
pub const ANN_VNI: &str = "weir.dev/vni";

/// The few fields of a Node weir needs. Everything else is dropped on
/// arrival so memory does not grow with managedFields, images or status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct NodeInfo {
    pub name: String,
    /// Seconds since the epoch; older nodes win CIDR conflicts.
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub public_ip: Option<String>,
    #[serde(default)]
    pub vtep_mac: Option<String>,
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub pod_cidrs: Vec<String>,
    /// status.addresses; empty means "not listed", which skips that check.
    #[serde(default)]
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub node: String,
    pub field: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {}: {}={:?}: {}", self.node, self.field, self.value, self.reason)
    }
}

/// Why a node is not a peer without being wrong: not joined yet, or another backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    Pending,
    OtherBackend(String),
}

pub struct Validator {
    pub backend: Backend,
    pub underlay_is_v4: bool,
    pub cluster_cidrs: Vec<IpNet>,
    pub local_cidrs: Vec<IpNet>,
    pub local_name: String,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub peers: Vec<Peer>,
    pub rejected: Vec<Rejection>,
    pub skipped: BTreeMap<String, Skip>,
}

const MAX_VALUE: usize = 256;

fn clip(v: &str) -> String {
    if v.len() > 64 { format!("{}…({} bytes)", &v[..v.floor_char_boundary(64)], v.len()) } else { v.to_string() }
}

impl Validator {
    /// Validates every node; conflicts between nodes go to the older node, then
    /// the smaller name, so every agent reaches the same verdict.
    pub fn validate<'a>(&self, nodes: impl IntoIterator<Item = &'a NodeInfo>) -> Outcome {
        let mut ordered: Vec<&NodeInfo> = nodes.into_iter().filter(|n| n.name != self.local_name).collect();
        ordered.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        let mut out = Outcome::default();
        let mut macs: BTreeSet<Mac> = BTreeSet::new();
        let mut ips: BTreeSet<IpAddr> = BTreeSet::new();
        let mut claimed = CidrSet::default();
        for c in &self.local_cidrs {
            claimed.insert(*c, "this node");
        }
        for node in ordered {
            match self.check(node, &macs, &ips, &claimed) {
                Ok(Some(peer)) => {
                    macs.insert(peer.vtep_mac);
                    ips.insert(peer.underlay_ip);
                    for c in &peer.pod_cidrs {
                        claimed.insert(*c, &peer.name);
                    }
                    out.peers.push(peer);
                }
                Ok(None) => {}
                Err(r) => out.rejected.push(r),
            }
            if let Some(skip) = self.skip_reason(node) {
                out.skipped.insert(node.name.clone(), skip);
            }
        }
        out
    }

    fn skip_reason(&self, n: &NodeInfo) -> Option<Skip> {
        match n.backend.as_deref() {
            Some(b) if b != self.backend.as_str() => Some(Skip::OtherBackend(clip(b))),
            _ if n.public_ip.is_none()
                || n.vtep_mac.is_none() && self.backend == Backend::Vxlan
                || n.pod_cidrs.is_empty() =>
            {
                Some(Skip::Pending)
            }
            _ => None,
        }
    }

    fn check(
        &self,
        n: &NodeInfo,
        macs: &BTreeSet<Mac>,
        ips: &BTreeSet<IpAddr>,
        claimed: &CidrSet,
    ) -> Result<Option<Peer>, Rejection> {
        if self.skip_reason(n).is_some() {
            return Ok(None);
        }
        let reject = |field, value: &str, reason| Rejection { node: n.name.clone(), field, value: clip(value), reason };
        let ip_text = n.public_ip.as_deref().unwrap_or_default();
        if ip_text.len() > MAX_VALUE {
            return Err(reject(ANN_PUBLIC_IP, ip_text, "value too long"));
        }
        let ip: IpAddr = ip_text.parse().map_err(|_| reject(ANN_PUBLIC_IP, ip_text, "not an IP address"))?;
        if ip.is_ipv4() != self.underlay_is_v4 {
            return Err(reject(ANN_PUBLIC_IP, ip_text, "address family differs from this node's underlay"));
        }
        if ip.is_loopback() || ip.is_multicast() || ip.is_unspecified() || ip == IpAddr::from([255, 255, 255, 255]) {
            return Err(reject(ANN_PUBLIC_IP, ip_text, "loopback, multicast, broadcast or unspecified"));
        }
        if !n.addresses.is_empty() && !n.addresses.iter().any(|a| a.parse::<IpAddr>().ok() == Some(ip)) {
            return Err(reject(ANN_PUBLIC_IP, ip_text, "not one of the Node's status.addresses"));
        }
        if ips.contains(&ip) {
            return Err(reject(ANN_PUBLIC_IP, ip_text, "already used by an older node"));
        }
        let mac = match self.backend {
            Backend::Vxlan => {
                let text = n.vtep_mac.as_deref().unwrap_or_default();
                let mac: Mac = text.parse().map_err(|e: crate::model::MacError| {
                    reject(
                        ANN_VTEP_MAC,
                        text,
                        match e {
                            crate::model::MacError::Malformed => "not a MAC address",
                            crate::model::MacError::Multicast => "multicast or broadcast MAC",
                            crate::model::MacError::Zero => "all-zero MAC",
                        },
                    )
                })?;
                if macs.contains(&mac) {
                    return Err(reject(ANN_VTEP_MAC, text, "already used by an older node"));
                }
                mac
            }
            // IPIP has no VTEP MAC; keep a placeholder derived from the IP so the type stays uniform.
            Backend::Ipip => Mac::random_local(u64::from(match ip {
                IpAddr::V4(v4) => u32::from(v4),
                IpAddr::V6(_) => 0,
            })),
        };
        let mut cidrs = Vec::new();
        for text in &n.pod_cidrs {
            let cidr: IpNet = text.parse().map_err(|_| reject("spec.podCIDRs", text, "not a CIDR"))?;
            if cidr != cidr.trunc() {
                return Err(reject("spec.podCIDRs", text, "host bits set"));
            }
            if !self.cluster_cidrs.is_empty()
                && !self.cluster_cidrs.iter().any(|c| c.contains(&cidr))
                && self.cluster_cidrs.iter().any(|c| c.addr().is_ipv4() == cidr.addr().is_ipv4())
            {
                return Err(reject("spec.podCIDRs", text, "outside --cluster-cidr"));
            }
            if claimed.overlap(&cidr).is_some()
                || cidrs.iter().any(|c: &IpNet| c.contains(&cidr.network()) || cidr.contains(&c.network()))
            {
                return Err(reject("spec.podCIDRs", text, "overlaps this node's or an older node's pod CIDR"));
            }
            cidrs.push(cidr);
        }
        Ok(Some(Peer { name: n.name.clone(), underlay_ip: ip, vtep_mac: mac, pod_cidrs: cidrs }))
    }
}

/// The metric label for a rejection reason.
pub fn reason_label(r: &Rejection) -> &'static str {
    match r.field {
        ANN_PUBLIC_IP => "public-ip",
        ANN_VTEP_MAC => "vtep-mac",
        _ => "pod-cidr",
    }
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
