//! `weir-agent status`: the agent's accepted peers (from its run dir) checked
//! against a fresh kernel dump, plus the live agent's own view when it answers.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Backend, Mac, Mode, Peer};
use crate::plan::{self, Direct, KernelState};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerRow {
    pub node: String,
    pub pod_cidrs: Vec<IpNet>,
    pub underlay_ip: IpAddr,
    pub vtep_mac: Option<Mac>,
    /// None where the backend or mode does not call for the entry.
    pub fdb: Option<bool>,
    pub neigh: Option<bool>,
    pub route: bool,
    /// On-demand mode: seconds since the peer's last miss, from the agent.
    pub last_miss_seconds: Option<u64>,
}

impl PeerRow {
    /// Whether an entry that must be there is missing or wrong.
    pub fn drifted(&self) -> bool {
        !self.route || self.fdb == Some(false) || self.neigh == Some(false)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub peers: Vec<PeerRow>,
    /// weir-owned entries that no accepted peer explains.
    pub stale: Vec<String>,
}

impl Report {
    pub fn drift(&self) -> bool {
        !self.stale.is_empty() || self.peers.iter().any(PeerRow::drifted)
    }
}

/// Compares each peer's entries with the kernel. In on-demand mode fdb and
/// neighbour entries come and go with traffic, so only their correctness,
/// not their presence, is checked.
pub fn compare(
    backend: Backend,
    mode: Mode,
    direct: Option<&Direct>,
    peers: &[Peer],
    kernel: &KernelState,
    ifindex: u32,
) -> Report {
    let mut report = Report::default();
    let all = plan::desired_state(backend, direct, peers);
    for peer in peers {
        let want = plan::desired_state(backend, direct, std::slice::from_ref(peer));
        let on_demand = mode == Mode::OnDemand;
        // A peer reached directly has no fdb or neighbour entry to check.
        let fdb = (!want.fdb.is_empty()).then(|| {
            want.fdb.iter().all(|(m, ip)| {
                kernel.fdb.contains(&(*m, *ip)) || (on_demand && !kernel.fdb.iter().any(|(km, _)| km == m))
            })
        });
        let neigh = (!want.neigh.is_empty()).then(|| {
            want.neigh
                .iter()
                .all(|(ip, m)| kernel.neigh.get(ip) == Some(m) || (on_demand && !kernel.neigh.contains_key(ip)))
        });
        let route = want.routes.iter().all(|(c, to)| kernel.routes.get(c) == Some(&(to.gateway, to.oif(ifindex))));
        report.peers.push(PeerRow {
            node: peer.name.clone(),
            pod_cidrs: peer.pod_cidrs.clone(),
            underlay_ip: peer.underlay_ip,
            vtep_mac: (backend == Backend::Vxlan).then_some(peer.vtep_mac),
            fdb,
            neigh,
            route,
            last_miss_seconds: None,
        });
    }
    for (mac, ip) in &kernel.fdb {
        if all.fdb.get(mac) != Some(ip) {
            report.stale.push(format!("fdb {mac} dst {ip}"));
        }
    }
    for (ip, mac) in &kernel.neigh {
        if !all.neigh.contains_key(ip) {
            report.stale.push(format!("neigh {ip} lladdr {mac}"));
        }
    }
    for (cidr, (gw, _)) in &kernel.routes {
        if !all.routes.contains_key(cidr) {
            report.stale.push(format!("route {cidr} via {gw}"));
        }
    }
    report
}

pub fn table(report: &Report) -> String {
    let mark = |b: Option<bool>| match b {
        Some(true) => "yes",
        Some(false) => "MISSING",
        None => "-",
    };
    let mut out = format!(
        "{:<20} {:<20} {:<16} {:<18} {:<8} {:<8} {:<8} {}\n",
        "NODE", "PODCIDR", "UNDERLAY", "VTEP MAC", "FDB", "NEIGH", "ROUTE", "LAST MISS"
    );
    for r in &report.peers {
        let cidrs: Vec<String> = r.pod_cidrs.iter().map(|c| c.to_string()).collect();
        out += &format!(
            "{:<20} {:<20} {:<16} {:<18} {:<8} {:<8} {:<8} {}\n",
            r.node,
            cidrs.join(","),
            r.underlay_ip,
            r.vtep_mac.map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
            mark(r.fdb),
            mark(r.neigh),
            mark(Some(r.route)),
            r.last_miss_seconds.map(|s| format!("{s}s ago")).unwrap_or_else(|| "-".into())
        );
    }
    for s in &report.stale {
        out += &format!("stale: {s}\n");
    }
    out += if report.drift() { "DRIFT: the kernel does not match the peer set\n" } else { "in sync\n" };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Peer {
        crate::model::fixtures::peer(2)
    }

    fn synced() -> KernelState {
        let d = plan::desired_state(Backend::Vxlan, None, &[peer()]);
        KernelState {
            fdb: d.fdb.iter().map(|(m, i)| (*m, *i)).collect(),
            neigh: d.neigh.clone(),
            routes: d.routes.iter().map(|(c, to)| (*c, (to.gateway, to.oif(5)))).collect(),
            foreign_routes: Default::default(),
            fdb_idle: Default::default(),
            route_nhid: Default::default(),
            nexthops: None,
        }
    }

    #[test]
    fn in_sync_is_clean() {
        let r = compare(Backend::Vxlan, Mode::Full, None, &[peer()], &synced(), 5);
        assert!(!r.drift(), "{}", table(&r));
    }

    #[test]
    fn a_missing_route_or_stale_entry_is_drift() {
        let mut k = synced();
        k.routes.clear();
        let r = compare(Backend::Vxlan, Mode::Full, None, &[peer()], &k, 5);
        assert!(r.drift());
        assert!(table(&r).contains("MISSING"));
        let mut k = synced();
        k.neigh.insert("10.244.9.0".parse().unwrap(), "0e:00:00:00:00:09".parse().unwrap());
        assert_eq!(compare(Backend::Vxlan, Mode::Full, None, &[peer()], &k, 5).stale.len(), 1);
    }

    #[test]
    fn on_demand_absence_is_not_drift() {
        let mut k = synced();
        k.fdb.clear();
        k.neigh.clear();
        assert!(!compare(Backend::Vxlan, Mode::OnDemand, None, &[peer()], &k, 5).drift());
        assert!(compare(Backend::Vxlan, Mode::Full, None, &[peer()], &k, 5).drift());
    }
}
