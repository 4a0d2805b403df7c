//! Arbitrary Node JSON, annotation values and peers files must never panic
//! the agent, and whatever validation accepts must be internally consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_agent::model::{Backend, Mac};
use weir_agent::peers::validate::{NodeInfo, Validator};
use weir_agent::peers::{file, kube};

fuzz_target!(|data: &[u8]| {
    let local_cidrs: Vec<ipnet::IpNet> = vec!["10.244.0.0/24".parse().unwrap()];
    let validator =
        Validator::new(Backend::Vxlan, true, vec!["10.0.0.0/8".parse().unwrap()], "self".into(), local_cidrs.clone());
    let mut nodes: Vec<NodeInfo> = Vec::new();
    if let Ok(list) = serde_json::from_slice::<Vec<k8s_openapi::api::core::v1::Node>>(data) {
        nodes.extend(list.iter().map(kube::trim));
    }
    if let Ok(list) = serde_json::from_slice::<Vec<NodeInfo>>(data) {
        nodes.extend(list);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<Mac>();
        if let Ok(list) = file::parse(text, Backend::Vxlan) {
            nodes.extend(list);
        }
    }
    let out = validator.validate(&nodes);
    let mut macs = std::collections::BTreeSet::new();
    let mut cidrs: Vec<ipnet::IpNet> = local_cidrs;
    for p in &out.peers {
        assert!(p.vtep_mac.is_unicast());
        assert!(macs.insert(p.vtep_mac), "two accepted peers share a MAC");
        for c in &p.pod_cidrs {
            assert!(!cidrs.iter().any(|o| o.contains(&c.network()) || c.contains(&o.network())), "accepted overlap");
            cidrs.push(*c);
        }
    }
});
