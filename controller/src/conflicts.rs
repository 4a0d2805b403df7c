//! Conflicts between Nodes that would break the overlay: overlapping pod
//! CIDRs, or one VTEP MAC or public IP on two nodes. Pure.

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub cidrs: Vec<IpNet>,
    pub vtep_mac: Option<String>,
    pub public_ip: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    PodCidrOverlap,
    VtepMac,
    PublicIp,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::PodCidrOverlap => "pod-cidr-overlap",
            Kind::VtepMac => "vtep-mac",
            Kind::PublicIp => "public-ip",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Conflict {
    pub kind: Kind,
    pub nodes: (String, String),
    pub value: String,
}

pub fn detect(nodes: &[NodeView]) -> Vec<Conflict> {
    let mut out = Vec::new();
    for (i, a) in nodes.iter().enumerate() {
        for b in &nodes[i + 1..] {
            let pair = || {
                let (x, y) = if a.name <= b.name { (a, b) } else { (b, a) };
                (x.name.clone(), y.name.clone())
            };
            for ca in &a.cidrs {
                if let Some(cb) = b.cidrs.iter().find(|cb| ca.contains(&cb.network()) || cb.contains(&ca.network())) {
                    out.push(Conflict { kind: Kind::PodCidrOverlap, nodes: pair(), value: format!("{ca} / {cb}") });
                }
            }
            if a.vtep_mac.is_some() && a.vtep_mac == b.vtep_mac {
                out.push(Conflict {
                    kind: Kind::VtepMac,
                    nodes: pair(),
                    value: a.vtep_mac.clone().unwrap_or_default(),
                });
            }
            if a.public_ip.is_some() && a.public_ip == b.public_ip {
                out.push(Conflict {
                    kind: Kind::PublicIp,
                    nodes: pair(),
                    value: a.public_ip.clone().unwrap_or_default(),
                });
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(name: &str, cidr: &str, mac: &str, ip: &str) -> NodeView {
        NodeView {
            name: name.into(),
            cidrs: vec![cidr.parse().unwrap()],
            vtep_mac: Some(mac.into()),
            public_ip: Some(ip.into()),
        }
    }

    #[test]
    fn finds_each_kind_once() {
        let nodes = [
            n("a", "10.244.0.0/24", "0e:00:00:00:00:01", "198.18.0.1"),
            n("b", "10.244.0.128/25", "0e:00:00:00:00:01", "198.18.0.2"),
            n("c", "10.244.9.0/24", "0e:00:00:00:00:03", "198.18.0.2"),
        ];
        let kinds: Vec<_> = detect(&nodes).into_iter().map(|c| (c.kind, c.nodes)).collect();
        assert_eq!(
            kinds,
            vec![
                (Kind::PodCidrOverlap, ("a".into(), "b".into())),
                (Kind::VtepMac, ("a".into(), "b".into())),
                (Kind::PublicIp, ("b".into(), "c".into())),
            ]
        );
    }

    #[test]
    fn clean_cluster_has_none() {
        let nodes = [
            n("a", "10.244.0.0/24", "0e:00:00:00:00:01", "198.18.0.1"),
            n("b", "10.244.1.0/24", "0e:00:00:00:00:02", "198.18.0.2"),
        ];
        assert!(detect(&nodes).is_empty());
    }
}
