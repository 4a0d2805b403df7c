use super::*;
use crate::model::Backend::{Ipip, Vxlan};

const IF: u32 = 7;

fn peer(name: &str, ip: &str, mac: &str, cidr: &str) -> Peer {
    Peer {
        name: name.into(),
        underlay_ip: ip.parse().unwrap(),
        vtep_mac: mac.parse().unwrap(),
        pod_cidrs: vec![cidr.parse().unwrap()],
    }
}

fn overlay(gateway: &str) -> RouteTo {
    RouteTo { gateway: gateway.parse().unwrap(), dev: Dev::Overlay }
}

fn desired(peers: &[Peer]) -> DesiredState {
    desired_state(Vxlan, None, peers)
}

/// The kernel state after a plan was applied exactly.
fn applied(d: &DesiredState) -> KernelState {
    KernelState {
        fdb: d.fdb.iter().map(|(m, ip)| (*m, *ip)).collect(),
        neigh: d.neigh.clone(),
        routes: d.routes.iter().map(|(c, to)| (*c, (to.gateway, to.oif(IF)))).collect(),
        foreign_routes: Default::default(),
        fdb_idle: Default::default(),
        route_nhid: Default::default(),
        nexthops: None,
    }
}

fn a() -> Peer {
    peer("node-1", "198.18.0.11", "0e:00:00:00:00:01", "10.244.1.0/24")
}
fn b() -> Peer {
    peer("node-2", "198.18.0.12", "0e:00:00:00:00:02", "10.244.2.0/24")
}

#[test]
fn new_peer_gets_fdb_then_neigh_then_route() {
    let ops = diff(&desired(&[a()]), &KernelState::default(), IF, true);
    let mac = "0e:00:00:00:00:01".parse().unwrap();
    assert_eq!(
        ops,
        vec![
            Op::PutFdb { mac, dst: "198.18.0.11".parse().unwrap() },
            Op::PutNeigh { ip: "10.244.1.0".parse().unwrap(), mac },
            Op::PutRoute { dst: "10.244.1.0/24".parse().unwrap(), to: overlay("10.244.1.0"), nhid: None },
        ]
    );
}

#[test]
fn second_pass_is_empty() {
    let d = desired(&[a(), b()]);
    assert!(diff(&d, &applied(&d), IF, true).is_empty());
}

#[test]
fn removed_peer_is_deleted_route_first() {
    let before = applied(&desired(&[a(), b()]));
    let ops = diff(&desired(&[a()]), &before, IF, true);
    let kinds: Vec<_> = ops.iter().map(|o| (o.verb(), o.object())).collect();
    assert_eq!(kinds, vec![("delete", "route"), ("delete", "neigh"), ("delete", "fdb")]);
    assert!(ops.iter().all(|o| o.to_string().contains("10.244.2.0") || o.to_string().contains("0e:00:00:00:00:02")));
}

#[test]
fn nothing_is_deleted_before_the_peer_set_is_complete() {
    let before = applied(&desired(&[a(), b()]));
    assert!(diff(&desired(&[a()]), &before, IF, false).is_empty());
}

#[test]
fn mac_change_replaces_neigh_and_removes_old_fdb() {
    let before = applied(&desired(&[a()]));
    let mut moved = a();
    moved.vtep_mac = "0e:00:00:00:00:99".parse().unwrap();
    let ops = diff(&desired(&[moved]), &before, IF, true);
    let new: Mac = "0e:00:00:00:00:99".parse().unwrap();
    let old: Mac = "0e:00:00:00:00:01".parse().unwrap();
    let ip: IpAddr = "198.18.0.11".parse().unwrap();
    assert_eq!(
        ops,
        vec![
            Op::PutFdb { mac: new, dst: ip },
            Op::PutNeigh { ip: "10.244.1.0".parse().unwrap(), mac: new },
            Op::DelFdb { mac: old, dst: ip },
        ]
    );
}

#[test]
fn ip_change_replaces_fdb_only() {
    let before = applied(&desired(&[a()]));
    let mut moved = a();
    moved.underlay_ip = "198.18.0.99".parse().unwrap();
    let ops = diff(&desired(&[moved]), &before, IF, true);
    let mac: Mac = "0e:00:00:00:00:01".parse().unwrap();
    assert_eq!(
        ops,
        vec![
            Op::PutFdb { mac, dst: "198.18.0.99".parse().unwrap() },
            Op::DelFdb { mac, dst: "198.18.0.11".parse().unwrap() },
        ]
    );
}

#[test]
fn pod_cidr_change_moves_neigh_and_route() {
    let before = applied(&desired(&[a()]));
    let moved = peer("node-1", "198.18.0.11", "0e:00:00:00:00:01", "10.244.7.0/24");
    let ops = diff(&desired(&[moved]), &before, IF, true);
    let text: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
    assert_eq!(text.len(), 4, "{text:?}");
    assert!(text[0].starts_with("ip neigh replace 10.244.7.0"));
    assert!(text[1].starts_with("ip route replace 10.244.7.0/24 via 10.244.7.0"));
    assert!(text[2].starts_with("ip route del 10.244.1.0/24"));
    assert!(text[3].starts_with("ip neigh del 10.244.1.0"));
}

#[test]
fn route_on_another_device_is_reclaimed() {
    let d = desired(&[a()]);
    let mut k = applied(&d);
    k.routes.insert("10.244.1.0/24".parse().unwrap(), ("10.244.1.0".parse().unwrap(), IF + 1));
    assert_eq!(diff(&d, &k, IF, true).len(), 1);
}

#[test]
fn foreign_routes_are_left_untouched() {
    let d = desired(&[a()]);
    let mut k = KernelState::default();
    let foreign: IpNet = "10.244.1.0/24".parse().unwrap();
    k.foreign_routes.insert(foreign);
    let ops = diff(&d, &k, IF, true);
    assert!(ops.iter().all(|o| !matches!(o, Op::PutRoute { .. } | Op::DelRoute { .. })));
    assert_eq!(blocked_routes(&d, &k).collect::<Vec<_>>(), vec![&foreign]);
}

#[test]
fn entries_not_in_the_owned_dump_are_never_deleted() {
    // The dumper lists only weir's own entries; an empty owned state with a
    // foreign route present must produce no delete at all.
    let mut k = KernelState::default();
    k.foreign_routes.insert("192.0.2.0/24".parse().unwrap());
    assert!(diff(&DesiredState::default(), &k, IF, true).is_empty());
}

#[test]
fn ipip_needs_only_routes_via_the_peer_underlay() {
    let d = desired_state(Ipip, None, &[a()]);
    assert!(d.fdb.is_empty() && d.neigh.is_empty());
    assert_eq!(d.routes.get(&"10.244.1.0/24".parse().unwrap()), Some(&overlay("198.18.0.11")));
}

#[test]
fn dual_stack_peer_gets_one_neigh_and_route_per_family() {
    let mut p = a();
    p.pod_cidrs.push("fd00:10:244:1::/64".parse().unwrap());
    let d = desired(&[p]);
    assert_eq!(d.fdb.len(), 1);
    assert_eq!(d.neigh.len(), 2);
    assert!(d.neigh.contains_key(&"fd00:10:244:1::".parse::<IpAddr>().unwrap()));
    assert_eq!(d.routes.len(), 2);
}

/// The kernel state after applying with nexthop objects.
fn applied_nh(d: &DesiredState) -> KernelState {
    let mut k = applied(d);
    k.nexthops = Some(d.routes.values().map(|to| (nexthop_id(to).unwrap(), (to.gateway, IF))).collect());
    k.route_nhid = d.routes.iter().map(|(c, to)| (*c, nexthop_id(to).unwrap())).collect();
    k
}

#[test]
fn with_nexthop_objects_routes_name_a_nexthop_created_first() {
    let empty = KernelState { nexthops: Some(Default::default()), ..Default::default() };
    let ops = diff(&desired(&[a()]), &empty, IF, true);
    let gw: IpAddr = "10.244.1.0".parse().unwrap();
    let id = nexthop_id(&RouteTo { gateway: gw, dev: Dev::Overlay }).unwrap();
    assert_eq!(ops[2], Op::PutNexthop { id, gateway: gw });
    assert_eq!(
        ops[3],
        Op::PutRoute {
            dst: "10.244.1.0/24".parse().unwrap(),
            to: RouteTo { gateway: gw, dev: Dev::Overlay },
            nhid: Some(id)
        }
    );
    assert!(diff(&desired(&[a()]), &applied_nh(&desired(&[a()])), IF, true).is_empty());
}

#[test]
fn unused_nexthops_are_swept_after_their_routes() {
    let before = applied_nh(&desired(&[a(), b()]));
    let ops = diff(&desired(&[a()]), &before, IF, true);
    let kinds: Vec<_> = ops.iter().map(|o| (o.verb(), o.object())).collect();
    assert_eq!(kinds, vec![("delete", "route"), ("delete", "nexthop"), ("delete", "neigh"), ("delete", "fdb")]);
}

#[test]
fn classic_routes_are_converted_when_nexthops_appear() {
    let d = desired(&[a()]);
    let mut k = applied(&d);
    k.nexthops = Some(Default::default());
    let ops = diff(&d, &k, IF, true);
    assert!(matches!(ops[..], [Op::PutNexthop { .. }, Op::PutRoute { nhid: Some(_), .. }]), "{ops:?}");
}

const UNDERLAY: u32 = 2;

fn direct() -> Direct {
    Direct { subnet: "198.18.0.0/24".parse().unwrap(), ifindex: UNDERLAY }
}

#[test]
fn direct_routing_reaches_same_subnet_peers_unencapsulated() {
    let far = peer("node-3", "198.18.1.13", "0e:00:00:00:00:03", "10.244.3.0/24");
    let d = desired_state(Vxlan, Some(&direct()), &[a(), far]);
    assert_eq!(
        d.routes.get(&"10.244.1.0/24".parse().unwrap()),
        Some(&RouteTo { gateway: "198.18.0.11".parse().unwrap(), dev: Dev::Underlay(UNDERLAY) })
    );
    assert!(!d.fdb.contains_key(&a().vtep_mac) && !d.neigh.contains_key(&"10.244.1.0".parse().unwrap()));
    assert_eq!(d.routes.get(&"10.244.3.0/24".parse().unwrap()), Some(&overlay("10.244.3.0")), "another subnet tunnels");
    let k = applied(&d);
    assert_eq!(k.routes.get(&"10.244.1.0/24".parse().unwrap()), Some(&("198.18.0.11".parse().unwrap(), UNDERLAY)));
    assert!(diff(&d, &k, IF, true).is_empty(), "a direct route in place needs nothing");
    // Direct routes use no nexthop object, even where the kernel has them.
    let mut with_nh = applied(&d);
    with_nh.nexthops = Some(Default::default());
    let ops = diff(&d, &with_nh, IF, true);
    assert!(
        ops.iter().all(|op| !matches!(op, Op::PutRoute { to: RouteTo { dev: Dev::Underlay(_), .. }, .. })),
        "{ops:?}"
    );
}

#[test]
fn a_peer_moving_between_subnets_switches_kind_route_first() {
    let tunnelled = desired(&[a()]);
    let k = applied(&tunnelled);
    let now_direct = desired_state(Vxlan, Some(&direct()), &[a()]);
    let ops = diff(&now_direct, &k, IF, true);
    // The route is replaced in place (no moment without one), then the
    // overlay's entries go.
    assert!(matches!(ops[0], Op::PutRoute { to: RouteTo { dev: Dev::Underlay(UNDERLAY), .. }, .. }), "{ops:?}");
    assert!(matches!(ops[1..], [Op::DelNeigh { .. }, Op::DelFdb { .. }]), "{ops:?}");
    // And back: fdb and neighbour before the route that needs them.
    let back = diff(&tunnelled, &applied(&now_direct), IF, true);
    assert!(matches!(back[..], [Op::PutFdb { .. }, Op::PutNeigh { .. }, Op::PutRoute { .. }]), "{back:?}");
}

#[test]
fn direct_routing_keeps_other_family_pod_cidrs_on_the_overlay() {
    let mut dual = a();
    dual.pod_cidrs.push("fd00:10:244:1::/64".parse().unwrap());
    let d = desired_state(Vxlan, Some(&direct()), &[dual]);
    assert_eq!(d.routes.get(&"10.244.1.0/24".parse().unwrap()).unwrap().dev, Dev::Underlay(UNDERLAY));
    assert_eq!(d.routes.get(&"fd00:10:244:1::/64".parse().unwrap()), Some(&overlay("fd00:10:244:1::")));
    assert!(d.fdb.contains_key(&a().vtep_mac), "the IPv6 CIDR still needs the tunnel");
}
