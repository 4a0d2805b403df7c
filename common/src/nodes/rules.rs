//! The peer rules. Pure, so every rule is unit-tested and fuzzed without an
//! API server.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::types::overlap;
use super::{ANN_PUBLIC_IP, ANN_VTEP_MAC, Backend, CidrSet, FIELD_POD_CIDRS, Mac, MacError, NodeInfo};

/// A Node that is not a valid peer, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub node: String,
    /// The annotation or spec field at fault.
    pub field: &'static str,
    /// The value, clipped for logs and Events.
    pub value: String,
    pub reason: &'static str,
    /// The older node (or this node, for an agent) that holds the value
    /// first: set when the rejection is a conflict rather than a bad value.
    pub held_by: Option<String>,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {}: {}={:?}: {}", self.node, self.field, self.value, self.reason)?;
        match &self.held_by {
            Some(other) => write!(f, " ({other})"),
            None => Ok(()),
        }
    }
}

impl Rejection {
    /// The metric label of the field at fault.
    pub fn reason_label(&self) -> &'static str {
        match self.field {
            ANN_PUBLIC_IP => "public-ip",
            ANN_VTEP_MAC => "vtep-mac",
            _ => "pod-cidr",
        }
    }
}

/// Why a node is not a peer without being wrong: not joined yet, or another backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    Pending,
    OtherBackend(String),
}

/// A node that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub name: String,
    pub underlay_ip: IpAddr,
    /// None for IPIP nodes, which have no VTEP.
    pub vtep_mac: Option<Mac>,
    pub pod_cidrs: Vec<IpNet>,
}

/// The node applying the rules, for an agent: it is not its own peer, and
/// its pod CIDRs are held before any other node's.
#[derive(Debug, Clone)]
pub struct Local {
    pub name: String,
    pub pod_cidrs: Vec<IpNet>,
}

pub struct Rules {
    /// Only nodes of this backend are peers (others are skipped); None (the
    /// controller) judges each node by the backend it announces.
    pub backend: Option<Backend>,
    /// The agent's underlay family; a peer of the other family is rejected.
    pub underlay_is_v4: Option<bool>,
    pub cluster_cidrs: Vec<IpNet>,
    pub local: Option<Local>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub accepted: Vec<Accepted>,
    pub rejected: Vec<Rejection>,
    pub skipped: BTreeMap<String, Skip>,
}

const MAX_VALUE: usize = 256;

/// A value as it may appear in a log line or an Event: at most 64 bytes.
pub fn clip(v: &str) -> String {
    if v.len() > 64 { format!("{}…({} bytes)", &v[..v.floor_char_boundary(64)], v.len()) } else { v.to_string() }
}

/// IPv6 addresses a peer may not use as its underlay address or pod gateway:
/// link-local ones mean nothing off their own link, and v4-mapped ones are
/// IPv4 in disguise (they would slip past the family checks).
fn unroutable_v6(ip: &IpAddr) -> Option<&'static str> {
    let IpAddr::V6(v6) = ip else { return None };
    if v6.segments()[0] & 0xffc0 == 0xfe80 {
        Some("IPv6 link-local")
    } else if v6.to_ipv4_mapped().is_some() {
        Some("IPv4-mapped IPv6 address")
    } else {
        None
    }
}

/// The rules' verdict on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted(Accepted),
    Rejected(Rejection),
    Skipped(Skip),
}

/// What the nodes taken so far hold; a later node may not hold it again.
#[derive(Default)]
pub(super) struct Held {
    macs: BTreeMap<Mac, String>,
    ips: BTreeMap<IpAddr, String>,
    cidrs: CidrSet,
}

impl Held {
    fn take(&mut self, a: &Accepted) {
        if let Some(mac) = a.vtep_mac {
            self.macs.insert(mac, a.name.clone());
        }
        self.ips.insert(a.underlay_ip, a.name.clone());
        for c in &a.pod_cidrs {
            self.cidrs.insert(*c, &a.name);
        }
    }

    /// Gives up what `a` holds, so a node judged after it may take it.
    pub(super) fn release(&mut self, a: &Accepted) {
        let owned = |owner: Option<&String>| owner == Some(&a.name);
        if let Some(mac) = a.vtep_mac
            && owned(self.macs.get(&mac))
        {
            self.macs.remove(&mac);
        }
        if owned(self.ips.get(&a.underlay_ip)) {
            self.ips.remove(&a.underlay_ip);
        }
        for c in &a.pod_cidrs {
            self.cidrs.remove(c, &a.name);
        }
    }
}

/// The order conflicts are settled in: older first, then the smaller name.
pub(super) fn age_key(n: &NodeInfo) -> (i64, &str) {
    (n.created, n.name.as_str())
}

impl Rules {
    /// Validates every node. Conflicts between nodes go to the older node,
    /// then the smaller name, so every agent and the controller reach the
    /// same verdict.
    pub fn validate<'a>(&self, nodes: impl IntoIterator<Item = &'a NodeInfo>) -> Outcome {
        let mut ordered: Vec<&NodeInfo> = nodes.into_iter().filter(|n| !self.is_local(&n.name)).collect();
        ordered.sort_by(|a, b| age_key(a).cmp(&age_key(b)));
        let mut out = Outcome::default();
        let mut held = self.held_by_local();
        for node in ordered {
            match self.judge(node, &mut held) {
                Verdict::Accepted(a) => out.accepted.push(a),
                Verdict::Rejected(r) => out.rejected.push(r),
                Verdict::Skipped(s) => {
                    out.skipped.insert(node.name.clone(), s);
                }
            }
        }
        out
    }

    /// The node applying the rules is never its own peer.
    pub(super) fn is_local(&self, name: &str) -> bool {
        self.local.as_ref().is_some_and(|l| l.name == name)
    }

    /// What is held before any other node is judged: this node's pod CIDRs.
    pub(super) fn held_by_local(&self) -> Held {
        let mut held = Held::default();
        for c in self.local.iter().flat_map(|l| &l.pod_cidrs) {
            held.cidrs.insert(*c, "this node");
        }
        held
    }

    /// Judges one node against what the nodes judged before it hold, and
    /// holds its values if it is accepted.
    pub(super) fn judge(&self, node: &NodeInfo, held: &mut Held) -> Verdict {
        if let Some(skip) = self.skip_reason(node) {
            return Verdict::Skipped(skip);
        }
        match self.check(node, held) {
            Ok(a) => {
                held.take(&a);
                Verdict::Accepted(a)
            }
            Err(r) => Verdict::Rejected(r),
        }
    }

    fn skip_reason(&self, n: &NodeInfo) -> Option<Skip> {
        let announced = n.backend.as_deref().and_then(|b| b.parse::<Backend>().ok());
        match (self.backend, n.backend.as_deref()) {
            (Some(ours), Some(b)) if b != ours.as_str() => return Some(Skip::OtherBackend(clip(b))),
            (None, Some(b)) if announced.is_none() => return Some(Skip::OtherBackend(clip(b))),
            _ => {}
        }
        let needs_mac = self.backend.or(announced) != Some(Backend::Ipip);
        (n.public_ip.is_none() || needs_mac && n.vtep_mac.is_none() || n.pod_cidrs.is_empty()).then_some(Skip::Pending)
    }

    fn check(&self, n: &NodeInfo, held: &Held) -> Result<Accepted, Rejection> {
        let reject = |field, value: &str, reason, held_by: Option<&String>| Rejection {
            node: n.name.clone(),
            field,
            value: clip(value),
            reason,
            held_by: held_by.cloned(),
        };
        let ip_text = n.public_ip.as_deref().unwrap_or_default();
        if ip_text.len() > MAX_VALUE {
            return Err(reject(ANN_PUBLIC_IP, ip_text, "value too long", None));
        }
        let ip: IpAddr = ip_text.parse().map_err(|_| reject(ANN_PUBLIC_IP, ip_text, "not an IP address", None))?;
        if self.underlay_is_v4.is_some_and(|v4| ip.is_ipv4() != v4) {
            return Err(reject(ANN_PUBLIC_IP, ip_text, "address family differs from this node's underlay", None));
        }
        if ip.is_loopback() || ip.is_multicast() || ip.is_unspecified() || ip == IpAddr::from([255, 255, 255, 255]) {
            return Err(reject(ANN_PUBLIC_IP, ip_text, "loopback, multicast, broadcast or unspecified", None));
        }
        if let Some(reason) = unroutable_v6(&ip) {
            return Err(reject(ANN_PUBLIC_IP, ip_text, reason, None));
        }
        if !n.addresses.is_empty() && !n.addresses.iter().any(|a| a.parse::<IpAddr>().ok() == Some(ip)) {
            return Err(reject(ANN_PUBLIC_IP, ip_text, "not one of the Node's status.addresses", None));
        }
        if let Some(owner) = held.ips.get(&ip) {
            return Err(reject(ANN_PUBLIC_IP, ip_text, "already used by an older node", Some(owner)));
        }
        let announced = n.backend.as_deref().and_then(|b| b.parse::<Backend>().ok());
        let vtep_mac = match self.backend.or(announced).unwrap_or(Backend::Vxlan) {
            Backend::Vxlan => {
                let text = n.vtep_mac.as_deref().unwrap_or_default();
                let mac: Mac = text.parse().map_err(|e: MacError| {
                    let reason = match e {
                        MacError::Malformed => "not a MAC address",
                        MacError::Multicast => "multicast or broadcast MAC",
                        MacError::Zero => "all-zero MAC",
                    };
                    reject(ANN_VTEP_MAC, text, reason, None)
                })?;
                if let Some(owner) = held.macs.get(&mac) {
                    return Err(reject(ANN_VTEP_MAC, text, "already used by an older node", Some(owner)));
                }
                Some(mac)
            }
            Backend::Ipip => None,
        };
        let mut cidrs: Vec<IpNet> = Vec::new();
        for text in &n.pod_cidrs {
            let cidr: IpNet = text.parse().map_err(|_| reject(FIELD_POD_CIDRS, text, "not a CIDR", None))?;
            if cidr != cidr.trunc() {
                return Err(reject(FIELD_POD_CIDRS, text, "host bits set", None));
            }
            // Another family than the cluster's ranges is outside them too: a
            // dual-stack cluster lists a range of each family.
            if !self.cluster_cidrs.is_empty() && !self.cluster_cidrs.iter().any(|c| c.contains(&cidr)) {
                return Err(reject(FIELD_POD_CIDRS, text, "outside --cluster-cidr", None));
            }
            // The CIDR's network address is the gateway peers route to.
            if let Some(reason) = unroutable_v6(&cidr.network()) {
                return Err(reject(FIELD_POD_CIDRS, text, reason, None));
            }
            if let Some((_, owner)) = held.cidrs.overlap(&cidr) {
                let owner = owner.to_string();
                return Err(reject(
                    FIELD_POD_CIDRS,
                    text,
                    "overlaps this node's or an older node's pod CIDR",
                    Some(&owner),
                ));
            }
            if cidrs.iter().any(|c| overlap(c, &cidr)) {
                return Err(reject(FIELD_POD_CIDRS, text, "overlaps another of the node's own pod CIDRs", None));
            }
            cidrs.push(cidr);
        }
        Ok(Accepted { name: n.name.clone(), underlay_ip: ip, vtep_mac, pod_cidrs: cidrs })
    }
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
