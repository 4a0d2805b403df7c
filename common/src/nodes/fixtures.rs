//! What the tests of the peer rules share.

use super::{Backend, Local, NodeInfo, Rules};

pub fn node(name: &str, created: i64, ip: &str, mac: &str, cidr: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        created,
        public_ip: Some(ip.into()),
        vtep_mac: Some(mac.into()),
        backend: Some("vxlan".into()),
        pod_cidrs: vec![cidr.into()],
        addresses: vec![ip.into()],
    }
}

/// An agent's rules: it is node-0, holding 10.244.0.0/24.
pub fn agent_rules() -> Rules {
    Rules {
        backend: Some(Backend::Vxlan),
        underlay_is_v4: Some(true),
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        local: Some(Local { name: "node-0".into(), pod_cidrs: vec!["10.244.0.0/24".parse().unwrap()] }),
    }
}
