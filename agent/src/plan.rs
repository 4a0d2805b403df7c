//! Desired kernel state and the minimal change set that reaches it. Pure: no I/O,
//! so every rule here is unit-tested without a kernel.
//!
//! Entries are keyed the way the kernel keys them (fdb by MAC, neighbours by IP,
//! routes by prefix), and compared by value. Keying the delta by anything else is
//! how Calico's tracker flapped a stale and a desired entry sharing a MAC (#9450).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::metrics::labels;
use crate::model::{Backend, Mac, Peer, gateway_of};

/// The route protocol number that marks a route as weir's (`ip route show proto 87`).
/// Sweeps only ever delete routes that carry it.
pub const ROUTE_PROTOCOL: u8 = 87;

/// What the kernel should hold for the current peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// `bridge fdb replace MAC dev weir.N dst IP self permanent`
    pub fdb: BTreeMap<Mac, IpAddr>,
    /// `ip neigh replace GW dev weir.N lladdr MAC nud permanent`
    pub neigh: BTreeMap<IpAddr, Mac>,
    /// `ip route replace CIDR via GW dev weir.N onlink proto 87`, or with
    /// direct routing `ip route replace CIDR via PEER dev UNDERLAY proto 87`
    pub routes: BTreeMap<IpNet, RouteTo>,
}

/// A route's next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteTo {
    pub gateway: IpAddr,
    pub dev: Dev,
}

/// The device a route leaves by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dev {
    /// weir's VXLAN or IPIP device (its ifindex is the engine's).
    Overlay,
    /// The underlay interface with this ifindex: direct routing.
    Underlay(u32),
}

impl RouteTo {
    /// The ifindex the route leaves by, given the overlay device's.
    pub fn oif(&self, overlay: u32) -> u32 {
        match self.dev {
            Dev::Overlay => overlay,
            Dev::Underlay(ifindex) => ifindex,
        }
    }
}

/// Direct routing (`--direct-routing`): a peer whose underlay address lies in
/// `subnet` (this node's underlay subnet) is reached through the underlay
/// interface `ifindex`, unencapsulated, for the pod CIDRs of its underlay's
/// family. Its other pod CIDRs still go through the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Direct {
    pub subnet: IpNet,
    pub ifindex: u32,
}

impl Direct {
    fn reaches(&self, peer: &Peer, cidr: &IpNet) -> bool {
        self.subnet.contains(&peer.underlay_ip) && cidr.addr().is_ipv4() == peer.underlay_ip.is_ipv4()
    }
}

/// Builds the desired state of validated peers. The peer rules
/// (`weir_common::nodes`) have already given every MAC, underlay IP and pod
/// CIDR to one node only.
pub fn desired_state<'a>(
    backend: Backend,
    direct: Option<&Direct>,
    peers: impl IntoIterator<Item = &'a Peer>,
) -> DesiredState {
    let mut desired = DesiredState::default();
    for peer in peers {
        for cidr in &peer.pod_cidrs {
            if let Some(d) = direct.filter(|d| d.reaches(peer, cidr)) {
                desired.routes.insert(*cidr, RouteTo { gateway: peer.underlay_ip, dev: Dev::Underlay(d.ifindex) });
                continue;
            }
            match backend {
                Backend::Vxlan => {
                    let gw = gateway_of(cidr);
                    desired.fdb.insert(peer.vtep_mac, peer.underlay_ip);
                    desired.neigh.insert(gw, peer.vtep_mac);
                    desired.routes.insert(*cidr, RouteTo { gateway: gw, dev: Dev::Overlay });
                }
                Backend::Ipip if cidr.addr().is_ipv4() => {
                    desired.routes.insert(*cidr, RouteTo { gateway: peer.underlay_ip, dev: Dev::Overlay });
                }
                Backend::Ipip => {}
            }
        }
    }
    desired
}

/// weir's entries as found in the kernel. Only entries weir owns are listed:
/// permanent fdb and neighbour entries on weir's device, and routes carrying
/// weir's protocol. Anything else is invisible to the diff, so it is never deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    pub fdb: BTreeSet<(Mac, IpAddr)>,
    pub neigh: BTreeMap<IpAddr, Mac>,
    /// prefix → (gateway, output ifindex)
    pub routes: BTreeMap<IpNet, (IpAddr, u32)>,
    /// prefix → nexthop object id, for weir's routes that use one.
    pub route_nhid: BTreeMap<IpNet, u32>,
    /// weir's nexthop objects (id → gateway, ifindex); None when the kernel
    /// has no nexthop objects (before 5.3), and routes name their gateway.
    pub nexthops: Option<BTreeMap<u32, (IpAddr, u32)>>,
    /// Prefixes routed in the main table by somebody else. weir will not
    /// overwrite them.
    pub foreign_routes: BTreeSet<IpNet>,
    /// How long each fdb entry has gone without carrying a packet (the vxlan
    /// driver stamps an entry on every transmit); used by on-demand idle GC.
    pub fdb_idle: BTreeMap<Mac, std::time::Duration>,
}

impl KernelState {
    /// The kernel as it stands once `desired` has been applied on the device
    /// `ifindex` (with nexthop objects where the kernel has them).
    pub fn as_applied(desired: &DesiredState, ifindex: u32, nexthops: bool) -> KernelState {
        let nexthop_of = |to: &RouteTo| nexthop_id(to).filter(|_| nexthops);
        KernelState {
            fdb: desired.fdb.iter().map(|(m, ip)| (*m, *ip)).collect(),
            neigh: desired.neigh.clone(),
            routes: desired.routes.iter().map(|(c, to)| (*c, (to.gateway, to.oif(ifindex)))).collect(),
            route_nhid: desired.routes.iter().filter_map(|(c, to)| nexthop_of(to).map(|id| (*c, id))).collect(),
            nexthops: nexthops.then(|| {
                desired.routes.values().filter_map(|to| nexthop_of(to).map(|id| (id, (to.gateway, ifindex)))).collect()
            }),
            foreign_routes: Default::default(),
            fdb_idle: Default::default(),
        }
    }
}

/// One netlink write. Variants are declared in the order they must be applied:
/// for a new peer the fdb entry exists before the neighbour that points at its
/// MAC, and the neighbour before the route that uses it, so the kernel never has
/// to ask; deletions go the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    PutFdb { mac: Mac, dst: IpAddr },
    PutNeigh { ip: IpAddr, mac: Mac },
    PutNexthop { id: u32, gateway: IpAddr },
    PutRoute { dst: IpNet, to: RouteTo, nhid: Option<u32> },
    DelRoute { dst: IpNet, gateway: IpAddr },
    DelNexthop { id: u32, gateway: IpAddr },
    DelNeigh { ip: IpAddr, mac: Mac },
    DelFdb { mac: Mac, dst: IpAddr },
}

/// The nexthop object id weir uses for an IPv4 gateway on the overlay: the
/// address itself, so ids are stable across restarts and need no
/// bookkeeping. IPv6 routes keep a plain gateway (the per-gateway cost that
/// nexthops avoid is IPv4's fib_info), and so do direct routes.
pub fn nexthop_id(to: &RouteTo) -> Option<u32> {
    match (to.gateway, to.dev) {
        (IpAddr::V4(v4), Dev::Overlay) => Some(u32::from(v4)).filter(|id| *id != 0),
        _ => None,
    }
}

impl Op {
    /// The kind of kernel object, as used in metric labels.
    pub fn object(&self) -> &'static str {
        match self {
            Op::PutFdb { .. } | Op::DelFdb { .. } => labels::FDB,
            Op::PutNeigh { .. } | Op::DelNeigh { .. } => labels::NEIGH,
            Op::PutNexthop { .. } | Op::DelNexthop { .. } => labels::NEXTHOP,
            Op::PutRoute { .. } | Op::DelRoute { .. } => labels::ROUTE,
        }
    }

    pub fn is_delete(&self) -> bool {
        matches!(self, Op::DelRoute { .. } | Op::DelNexthop { .. } | Op::DelNeigh { .. } | Op::DelFdb { .. })
    }

    /// The verb, as used in metric labels.
    pub fn verb(&self) -> &'static str {
        if self.is_delete() { labels::DELETE } else { labels::REPLACE }
    }

    /// Ops of one phase do not depend on each other and may be pipelined.
    pub fn phase(&self) -> u8 {
        match self {
            Op::PutFdb { .. } => 0,
            Op::PutNeigh { .. } => 1,
            Op::PutNexthop { .. } => 2,
            Op::PutRoute { .. } => 3,
            Op::DelRoute { .. } => 4,
            Op::DelNexthop { .. } => 5,
            Op::DelNeigh { .. } => 6,
            Op::DelFdb { .. } => 7,
        }
    }
}

impl fmt::Display for Op {
    /// The iproute2 command an operator would type for the same change.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::PutFdb { mac, dst } => {
                write!(f, "bridge fdb replace {mac} dst {dst} self permanent")
            }
            Op::DelFdb { mac, dst } => write!(f, "bridge fdb del {mac} dst {dst} self"),
            Op::PutNeigh { ip, mac } => {
                write!(f, "ip neigh replace {ip} lladdr {mac} nud permanent")
            }
            Op::DelNeigh { ip, mac } => write!(f, "ip neigh del {ip} lladdr {mac}"),
            Op::PutNexthop { id, gateway } => {
                write!(f, "ip nexthop replace id {id} via {gateway} onlink proto {ROUTE_PROTOCOL}")
            }
            Op::DelNexthop { id, .. } => write!(f, "ip nexthop del id {id}"),
            Op::PutRoute { dst, nhid: Some(id), .. } => {
                write!(f, "ip route replace {dst} nhid {id} proto {ROUTE_PROTOCOL}")
            }
            Op::PutRoute { dst, to: RouteTo { gateway, dev: Dev::Overlay }, nhid: None } => {
                write!(f, "ip route replace {dst} via {gateway} onlink proto {ROUTE_PROTOCOL}")
            }
            Op::PutRoute { dst, to: RouteTo { gateway, dev: Dev::Underlay(i) }, nhid: None } => {
                write!(f, "ip route replace {dst} via {gateway} dev <ifindex {i}> proto {ROUTE_PROTOCOL}")
            }
            Op::DelRoute { dst, gateway } => write!(f, "ip route del {dst} via {gateway}"),
        }
    }
}

/// The minimal ops that turn `kernel` into `desired` on the device `ifindex`.
/// With `sweep` false nothing is deleted: the caller does not yet know the
/// whole peer set.
pub fn diff(desired: &DesiredState, kernel: &KernelState, ifindex: u32, sweep: bool) -> Vec<Op> {
    let mut ops = Vec::new();
    for (&mac, &dst) in &desired.fdb {
        if !kernel.fdb.contains(&(mac, dst)) {
            ops.push(Op::PutFdb { mac, dst });
        }
    }
    for (&ip, &mac) in &desired.neigh {
        if kernel.neigh.get(&ip) != Some(&mac) {
            ops.push(Op::PutNeigh { ip, mac });
        }
    }
    let mut nexthops_put = BTreeSet::new();
    for (&dst, &to) in &desired.routes {
        if kernel.foreign_routes.contains(&dst) {
            continue;
        }
        let gateway = to.gateway;
        // Direct routes are plain routes: nexthop objects are the overlay's.
        let nhid = kernel.nexthops.as_ref().and(nexthop_id(&to));
        if let (Some(id), Some(nhs)) = (nhid, &kernel.nexthops)
            && nhs.get(&id) != Some(&(gateway, ifindex))
            && nexthops_put.insert(id)
        {
            ops.push(Op::PutNexthop { id, gateway });
        }
        if kernel.routes.get(&dst) != Some(&(gateway, to.oif(ifindex))) || kernel.route_nhid.get(&dst).copied() != nhid
        {
            ops.push(Op::PutRoute { dst, to, nhid });
        }
    }
    if sweep {
        for (&dst, &(gateway, _)) in &kernel.routes {
            if !desired.routes.contains_key(&dst) {
                ops.push(Op::DelRoute { dst, gateway });
            }
        }
        let used: BTreeSet<u32> = desired.routes.values().filter_map(nexthop_id).collect();
        for (&id, &(gateway, _)) in kernel.nexthops.iter().flatten() {
            if !used.contains(&id) {
                ops.push(Op::DelNexthop { id, gateway });
            }
        }
        for (&ip, &mac) in &kernel.neigh {
            if !desired.neigh.contains_key(&ip) {
                ops.push(Op::DelNeigh { ip, mac });
            }
        }
        for &(mac, dst) in &kernel.fdb {
            if desired.fdb.get(&mac) != Some(&dst) {
                ops.push(Op::DelFdb { mac, dst });
            }
        }
    }
    ops.sort_by_key(Op::phase);
    ops
}

/// Prefixes a desired route could not be installed for, because somebody else
/// already routes them.
pub fn blocked_routes<'a>(desired: &'a DesiredState, kernel: &'a KernelState) -> impl Iterator<Item = &'a IpNet> {
    desired.routes.keys().filter(|d| kernel.foreign_routes.contains(d))
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
