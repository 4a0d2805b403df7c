//! Kernel tests for the VXLAN dataplane. Each runs in a private network
//! namespace and checks the kernel with `ip -j` / `bridge -j`.

mod common;

use std::time::Duration;

use common::*;
use weir_agent::dataplane::{DeviceAction, DeviceFix, Kernel};
use weir_agent::model::PeerSet;

#[test]
fn device_is_created_adopted_and_recreated() {
    in_fresh_netns("device_is_created_adopted_and_recreated", || {
        runtime().block_on(async {
            let u = underlay();
            let (mut e, _, _) = engine(vxlan_spec(u, "198.18.0.1", "10.244.1.0/24"));
            let spec = vxlan_spec(u, "198.18.0.1", "10.244.1.0/24");
            let k = e.kernel_mut();
            let first = k.ensure_device(&spec).await.unwrap();
            assert_eq!(first.action, DeviceAction::Created);
            let link = &json("ip -j -d link show weir.1")[0];
            let vx = &link["linkinfo"]["info_data"];
            assert_eq!(vx["id"], 1);
            assert_eq!(vx["port"], 8472);
            assert_eq!(vx["learning"], false);
            assert_eq!(vx["local"], "198.18.0.1");
            assert_eq!(link["mtu"], 1450);
            assert!(link["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
            assert!(sh("ip -4 addr show dev weir.1").contains("10.244.1.0/32"));
            assert_eq!(sh("cat /proc/sys/net/ipv6/conf/weir.1/accept_ra").trim(), "0");

            // Adopting keeps the device (same ifindex), fixing only what drifted.
            sh("ip link set weir.1 mtu 1300");
            let adopted = k.ensure_device(&spec).await.unwrap();
            assert_eq!(adopted.ifindex, first.ifindex);
            assert!(
                matches!(&adopted.action, DeviceAction::Adopted { fixed } if fixed.iter().any(|f| matches!(f, DeviceFix::Mtu { was: Some(1300), now: 1450 })))
            );
            assert_eq!(json("ip -j link show weir.1")[0]["mtu"], 1450);
            let again = k.ensure_device(&spec).await.unwrap();
            assert_eq!(again.action, DeviceAction::Adopted { fixed: vec![] });

            // A different UDP port cannot be changed in place: recreate, keeping the MAC handed in.
            let mut other = spec.clone();
            other.kind = weir_agent::dataplane::DeviceKind::Vxlan { vni: 1, port: 4789, on_demand: false };
            other.mac = first.mac;
            let recreated = k.ensure_device(&other).await.unwrap();
            assert!(matches!(&recreated.action, DeviceAction::Recreated { reason } if reason.contains("port")));
            assert_eq!(recreated.mac, first.mac);
            assert_eq!(json("ip -j -d link show weir.1")[0]["linkinfo"]["info_data"]["port"], 4789);
        })
    });
}

#[test]
fn programs_peers_and_second_pass_writes_nothing() {
    in_fresh_netns("programs_peers_and_second_pass_writes_nothing", || {
        runtime().block_on(async {
            let u = underlay();
            let (mut e, status, metrics) = engine(vxlan_spec(u, "198.18.0.1", "10.244.1.0/24"));
            e.set_peers(&PeerSet::complete((0..200).map(fake_peer)));
            let first = e.reconcile().await.unwrap();
            // This kernel has nexthop objects (>= 5.3): one per gateway, and each route names one.
            let nexthops = count("ip -j nexthop show proto 87");
            assert_eq!(nexthops, 200);
            assert_eq!(first.writes, 600 + nexthops);
            assert_eq!(first.failures, 0);
            assert_eq!(count("bridge -j fdb show dev weir.1 | jq '[.[] | select(.dst)]'"), 200);
            assert_eq!(count("ip -j neigh show dev weir.1 nud permanent"), 200);
            assert_eq!(count("ip -j route show proto 87"), 200);
            let r = &json("ip -j -d route show 10.100.5.0/24")[0];
            assert_eq!(r["gateway"], "10.100.5.0");
            assert_eq!(r["dev"], "weir.1");
            assert!(r["nhid"].as_u64().is_some(), "route goes through a nexthop object: {r}");
            assert!(r["flags"].as_array().unwrap().iter().any(|f| f == "onlink"));
            let n = &json("ip -j neigh show 10.100.5.0 dev weir.1")[0];
            assert_eq!(n["lladdr"], "0e:00:00:00:00:05");
            let f = sh("bridge fdb show dev weir.1 | grep 0e:00:00:00:00:05");
            assert!(f.contains("dst 198.19.0.5") && f.contains("self permanent"), "{f}");

            let second = e.reconcile().await.unwrap();
            assert_eq!(second.writes, 0, "a no-change pass must not write");
            assert!(status.borrow().synced);
            assert_eq!(metrics.routes.get(), 200);
            assert_eq!(metrics.fdb_entries.get(), 200);
        })
    });
}

#[test]
fn startup_sweeps_stale_entries_only_once_the_set_is_complete() {
    in_fresh_netns("startup_sweeps_stale_entries_only_once_the_set_is_complete", || {
        runtime().block_on(async {
            let u = underlay();
            let (mut e, _, _) = engine(vxlan_spec(u, "198.18.0.1", "10.244.1.0/24"));
            // A previous run programmed peers 0..3; peer 2 was deleted while the agent was down.
            e.set_peers(&PeerSet::complete((0..3).map(fake_peer)));
            e.reconcile().await.unwrap();
            // Someone else's route through our device and a route of theirs elsewhere.
            sh("ip route add 10.200.0.0/24 via 10.244.9.0 dev weir.1 onlink proto static");

            let (mut e, _, _) = engine(vxlan_spec(u, "198.18.0.1", "10.244.1.0/24"));
            let mut partial = PeerSet::complete((0..2).map(fake_peer));
            partial.complete = false;
            e.set_peers(&partial);
            let r = e.reconcile().await.unwrap();
            assert_eq!(r.writes, 0, "adopts what is there and deletes nothing before the full list");
            assert_eq!(count("ip -j route show proto 87"), 3);

            e.set_peers(&PeerSet::complete((0..2).map(fake_peer)));
            let r = e.reconcile().await.unwrap();
            assert_eq!(r.writes, 4, "route, nexthop, neighbour and fdb entry of the deleted peer");
            assert_eq!(count("ip -j route show proto 87"), 2);
            assert_eq!(count("ip -j nexthop show proto 87"), 2);
            assert_eq!(count("ip -j neigh show dev weir.1 nud permanent"), 2);
            assert!(!sh("bridge fdb show dev weir.1").contains("0e:00:00:00:00:02"));
            assert!(sh("ip route show 10.200.0.0/24").contains("proto static"), "foreign route kept");
        })
    });
}

#[test]
fn hand_deleted_entries_and_device_are_repaired_within_a_second() {
    in_fresh_netns("hand_deleted_entries_and_device_are_repaired_within_a_second", || {
        runtime().block_on(async {
            let u = underlay();
            let (e, status, metrics) = engine(vxlan_spec(u, "198.18.0.1", "10.244.1.0/24"));
            let (peers_tx, peers_rx) = tokio::sync::watch::channel(PeerSet::complete((0..50).map(fake_peer)));
            let (ev_tx, ev_rx) = tokio::sync::mpsc::channel(1024);
            weir_agent::dataplane::events::subscribe(ev_tx, &[]).unwrap();
            let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(e.run(peers_rx, ev_rx, || None, stop_rx));
            wait_for(Duration::from_secs(5), || status.borrow().synced).await.expect("initial sync");
            let mac = status.borrow().vtep_mac.unwrap();

            sh("ip route del 10.100.7.0/24");
            sh("ip neigh del 10.100.8.0 dev weir.1");
            sh("bridge fdb del 0e:00:00:00:00:09 dev weir.1 self");
            let took = wait_for(Duration::from_secs(1), || {
                sh("ip route show 10.100.7.0/24").contains("weir.1")
                    && sh("ip neigh show 10.100.8.0 dev weir.1").contains("PERMANENT")
                    && sh("bridge fdb show dev weir.1").contains("0e:00:00:00:00:09")
            })
            .await
            .expect("entries repaired within 1 s");
            eprintln!("entries repaired in {took:?}");
            // The engine counts a repair after its write batch returns, so the
            // entry can be seen in the kernel a moment before the counter moves.
            let route_drift = || metrics.drift_repaired.with_label_values(&["route"]).get();
            wait_for(Duration::from_secs(1), || route_drift() >= 1).await.expect("route repair counted as drift");

            sh("ip link del weir.1");
            let took = wait_for(Duration::from_secs(1), || {
                count("ip -j route show proto 87") == 50 && count("ip -j neigh show dev weir.1 nud permanent") == 50
            })
            .await
            .expect("device and entries replayed within 1 s");
            eprintln!("device recreated and replayed in {took:?}");
            assert_eq!(json("ip -j link show weir.1")[0]["address"], mac.to_string(), "same MAC after recreation");

            sh("ip link set weir.1 down");
            wait_for(Duration::from_secs(1), || sh("ip -j link show weir.1").contains("\"UP\""))
                .await
                .expect("device set up again within 1 s");

            peers_tx.send(PeerSet::complete((0..49).map(fake_peer))).unwrap();
            wait_for(Duration::from_secs(1), || count("ip -j route show proto 87") == 49)
                .await
                .expect("removed peer swept");
        })
    });
}

#[test]
fn two_nodes_ping_through_the_entries_weir_wrote() {
    let Some(p) = pair("two_nodes_ping_through_the_entries_weir_wrote", "weir-kt", None) else { return };
    // `p` holds the namespaces and the scratch directory until the test ends.
    let (a, b) = (p.a.clone(), p.b.clone());

    let node =
        |ns: String, local: &'static str, cidr: &'static str, peer: weir_agent::model::Peer, mac: &'static str| {
            std::thread::spawn(move || {
                enter_netns(&ns);
                runtime().block_on(async {
                    let u = ifindex(if local.ends_with(".1") { "ua" } else { "ub" });
                    let mut spec = vxlan_spec(u, local, cidr);
                    spec.mac = Some(mac.parse().unwrap());
                    let (mut e, _, _) = engine(spec);
                    e.set_peers(&PeerSet::complete([peer]));
                    assert_eq!(e.reconcile().await.unwrap().failures, 0);
                })
            })
        };
    let peer = |name: &str, ip: &str, mac: &str, cidr: &str| weir_agent::model::Peer {
        name: name.into(),
        underlay_ip: ip.parse().unwrap(),
        vtep_mac: mac.parse().unwrap(),
        pod_cidrs: vec![cidr.parse().unwrap()],
    };
    let ta = node(
        a.clone(),
        "198.18.0.1",
        "10.244.1.0/24",
        peer("b", "198.18.0.2", "0e:00:00:00:0b:0b", "10.244.2.0/24"),
        "0e:00:00:00:0a:0a",
    );
    let tb = node(
        b.clone(),
        "198.18.0.2",
        "10.244.2.0/24",
        peer("a", "198.18.0.1", "0e:00:00:00:0a:0a", "10.244.1.0/24"),
        "0e:00:00:00:0b:0b",
    );
    ta.join().unwrap();
    tb.join().unwrap();
    let out = sh(&format!("ip netns exec {a} ping -c 3 -i 0.2 -W 1 -I 10.244.1.1 10.244.2.1"));
    assert!(out.contains("3 received"), "{out}");
    // The very first packet went through: no ARP was needed on the overlay.
    assert!(!sh(&format!("ip -n {a} neigh show dev weir.1")).contains("FAILED"));
}
