use super::*;
use crate::nodes::{ANN_PUBLIC_IP, ANN_VTEP_MAC, FIELD_POD_CIDRS};

use crate::nodes::fixtures::{agent_rules as validator, node};

/// The controller's view: no local node, no backend or family of its own.
fn cluster_rules() -> Rules {
    Rules { backend: None, underlay_is_v4: None, cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], local: None }
}

fn good(i: u8) -> NodeInfo {
    node(
        &format!("node-{i}"),
        i64::from(i),
        &format!("198.18.0.{}", 10 + i),
        &format!("0e:00:00:00:00:{i:02x}"),
        &format!("10.244.{i}.0/24"),
    )
}

fn rejected(n: NodeInfo) -> Rejection {
    let out = validator().validate(&[good(1), n]);
    assert_eq!(out.accepted.len(), 1, "the good node stays: {:?}", out.rejected);
    assert_eq!(out.rejected.len(), 1);
    out.rejected[0].clone()
}

#[test]
fn good_nodes_become_peers_and_self_is_skipped() {
    let mut me = good(3);
    me.name = "node-0".into();
    let out = validator().validate(&[good(1), good(2), me]);
    assert_eq!(out.accepted.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), vec!["node-1", "node-2"]);
    assert!(out.rejected.is_empty());
}

#[test]
fn bad_macs_are_rejected_with_their_field() {
    for (mac, reason) in
        [("01:00:5e:00:00:01", "multicast"), ("not-a-mac", "not a MAC"), ("00:00:00:00:00:00", "all-zero")]
    {
        let mut n = good(2);
        n.vtep_mac = Some(mac.into());
        let r = rejected(n);
        assert_eq!(r.field, ANN_VTEP_MAC);
        assert!(r.reason.contains(reason), "{r}");
    }
}

#[test]
fn a_4k_value_is_rejected_and_clipped_in_the_message() {
    let mut n = good(2);
    n.public_ip = Some("9".repeat(4096));
    let r = rejected(n);
    assert_eq!(r.field, ANN_PUBLIC_IP);
    assert!(r.value.len() < 100, "logged value is clipped");
    let mut n = good(2);
    n.vtep_mac = Some("a".repeat(4096));
    assert_eq!(rejected(n).field, ANN_VTEP_MAC);
}

#[test]
fn public_ip_rules() {
    for (ip, reason) in [
        ("nope", "not an IP"),
        ("127.0.0.1", "loopback"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("fd00::1", "family"),
    ] {
        let mut n = good(2);
        n.public_ip = Some(ip.into());
        n.addresses = vec![];
        let r = rejected(n);
        assert!(r.reason.contains(reason), "{ip}: {r}");
    }
    // Another node's IP: not one of this node's own addresses.
    let mut n = good(2);
    n.public_ip = Some("198.18.0.11".into());
    assert!(rejected(n).reason.contains("status.addresses"));
}

#[test]
fn duplicate_mac_or_ip_goes_to_the_older_node() {
    let mut young = good(2);
    young.vtep_mac = good(1).vtep_mac;
    young.created = 100;
    let out = validator().validate(&[young.clone(), good(1)]);
    assert_eq!(out.accepted[0].name, "node-1");
    assert_eq!(out.rejected[0].node, "node-2");
    assert_eq!(out.rejected[0].held_by.as_deref(), Some("node-1"), "a conflict names the holder");
}

#[test]
fn a_node_may_not_overlap_itself_and_the_local_node_holds_its_cidrs_first() {
    let mut n = good(2);
    n.pod_cidrs = vec!["10.244.2.0/24".into(), "10.244.2.128/25".into()];
    assert!(rejected(n).reason.contains("own pod CIDRs"));
    let mut shadow = good(2);
    shadow.pod_cidrs = vec!["10.244.0.0/25".into()];
    shadow.created = -1;
    assert_eq!(rejected(shadow).held_by.as_deref(), Some("this node"), "the local node wins, however young");
}

#[test]
fn the_controller_judges_every_node_by_its_own_backend() {
    let mut ipip = good(3);
    ipip.backend = Some("ipip".into());
    ipip.vtep_mac = None;
    let mut unknown = good(4);
    unknown.backend = Some("wireguard".into());
    let mut clash = good(5);
    clash.vtep_mac = good(1).vtep_mac;
    let out = cluster_rules().validate(&[good(1), ipip, unknown, clash]);
    assert_eq!(out.accepted.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["node-1", "node-3"]);
    assert_eq!(out.accepted[1].vtep_mac, None);
    assert_eq!(out.skipped.get("node-4"), Some(&Skip::OtherBackend("wireguard".into())));
    assert_eq!(out.rejected.len(), 1);
    assert_eq!((out.rejected[0].node.as_str(), out.rejected[0].reason_label()), ("node-5", "vtep-mac"));
}

#[test]
fn cidr_rules() {
    for (cidr, reason) in [
        ("10.244.1.0/25", "overlaps"),
        ("10.244.0.0/24", "overlaps"),
        ("10.99.0.0/24", "outside"),
        ("10.244.2.1/24", "host bits"),
        ("x", "not a CIDR"),
    ] {
        let mut n = good(2);
        n.pod_cidrs = vec![cidr.into()];
        let r = rejected(n);
        assert_eq!(r.field, FIELD_POD_CIDRS);
        assert!(r.reason.contains(reason), "{cidr}: {r}");
    }
}

#[test]
fn overlap_winner_is_the_older_node_whatever_the_order() {
    let mut old = good(5);
    old.pod_cidrs = vec!["10.244.1.0/24".into()];
    old.created = 0;
    let mut young = good(1);
    young.created = 10;
    for nodes in [[old.clone(), young.clone()], [young.clone(), old.clone()]] {
        let out = validator().validate(&nodes);
        assert_eq!(out.accepted.len(), 1);
        assert_eq!(out.accepted[0].name, "node-5");
    }
}

#[test]
fn pending_and_other_backend_nodes_are_skipped_not_rejected() {
    let mut pending = good(2);
    pending.vtep_mac = None;
    let mut ipip = good(3);
    ipip.backend = Some("ipip".into());
    let out = validator().validate(&[good(1), pending, ipip]);
    assert_eq!(out.accepted.len(), 1);
    assert!(out.rejected.is_empty());
    assert_eq!(out.skipped.get("node-2"), Some(&Skip::Pending));
    assert_eq!(out.skipped.get("node-3"), Some(&Skip::OtherBackend("ipip".into())));
}

#[test]
fn hostile_ipv6_values_are_rejected_naming_the_field() {
    let dual = Rules {
        backend: Some(Backend::Vxlan),
        underlay_is_v4: Some(false),
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap(), "fd00:10:244::/56".parse().unwrap()],
        local: None,
    };
    let v6 = |ip: &str, cidr: &str| NodeInfo {
        name: "node-6".into(),
        public_ip: Some(ip.into()),
        vtep_mac: Some("0e:00:00:00:00:06".into()),
        backend: Some("vxlan".into()),
        pod_cidrs: vec![cidr.into()],
        ..Default::default()
    };
    for (node, field, reason) in [
        (v6("fe80::6", "fd00:10:244:6::/64"), ANN_PUBLIC_IP, "link-local"),
        (v6("::ffff:198.18.0.6", "fd00:10:244:6::/64"), ANN_PUBLIC_IP, "IPv4-mapped"),
        (v6("fd00:198:18::6", "fd00:99::/64"), FIELD_POD_CIDRS, "outside --cluster-cidr"),
        (v6("fd00:198:18::6", "::ffff:10.244.6.0/120"), FIELD_POD_CIDRS, "outside --cluster-cidr"),
    ] {
        let out = dual.validate([&node]);
        assert_eq!(out.rejected.len(), 1, "{node:?}");
        let r = &out.rejected[0];
        assert_eq!(r.field, field, "{r}");
        assert!(r.reason.contains(reason), "{r}");
    }
    // A link-local pod CIDR inside a (careless) cluster range is still refused.
    let careless = Rules { cluster_cidrs: vec!["fe80::/10".parse().unwrap()], ..dual };
    let out = careless.validate([&v6("fd00:198:18::6", "fe80::/64")]);
    assert!(out.rejected[0].reason.contains("link-local"), "{}", out.rejected[0]);
    // An IPv6 pod CIDR in a cluster that lists only IPv4 is outside it.
    let v4_only = Rules { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], ..careless };
    let out = v4_only.validate([&v6("fd00:198:18::6", "fd00:10:244:6::/64")]);
    assert!(out.rejected[0].reason.contains("outside"), "{}", out.rejected[0]);
}
