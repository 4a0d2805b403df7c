//! The `--peers-file` source, end to end without an API server: two agents in
//! two namespaces, a ping between them, and a live edit of the file.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const PEERS: &str = "\
- name: node-a
  publicIP: 198.18.0.1
  vtepMAC: 0e:00:00:00:0a:0a
  podCIDRs: [10.244.1.0/24]
- name: node-b
  publicIP: 198.18.0.2
  vtepMAC: 0e:00:00:00:0b:0b
  podCIDRs: [10.244.2.0/24]
";

/// The same two nodes on an IPv6-only underlay, each with an IPv4 and an
/// IPv6 pod CIDR.
const PEERS_V6: &str = "\
- name: node-a
  publicIP: fd00:198:18::1
  vtepMAC: 0e:00:00:00:0a:0a
  podCIDRs: [10.244.1.0/24, fd00:10:244:1::/64]
- name: node-b
  publicIP: fd00:198:18::2
  vtepMAC: 0e:00:00:00:0b:0b
  podCIDRs: [10.244.2.0/24, fd00:10:244:2::/64]
";

fn spawn_agent(ns: &str, node: &str, iface: &str, dir: &std::path::Path) -> Agent {
    spawn_agent_with(ns, node, iface, dir, &[], &[])
}

/// A node accepts a peer's tunnel packets once its nftables set lists the
/// peer; before that, packets the peer already sends are dropped.
fn firewall_admits(ns: &str, ip: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "set", "inet", "weir", "peers4"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(ip))
}

#[test]
fn two_agents_from_a_peers_file_ping_and_follow_edits() {
    let Some(p) = pair("two_agents_from_a_peers_file_ping_and_follow_edits", "weir-pf", Some(PEERS)) else { return };
    // `p` holds the namespaces and the scratch directory until the test ends.
    let (a, b, dir) = (p.a.clone(), p.b.clone(), p.dir.to_path_buf());

    let _agent_a = spawn_agent(&a, "node-a", "ua", &dir);
    let _agent_b = spawn_agent(&b, "node-b", "ub", &dir);
    wait_until(Duration::from_secs(20), "both agents programmed", || {
        sh(&format!("ip -n {a} route show proto 87")).contains("10.244.2.0/24")
            && sh(&format!("ip -n {b} route show proto 87")).contains("10.244.1.0/24")
            && firewall_admits(&a, "198.18.0.2")
            && firewall_admits(&b, "198.18.0.1")
    });
    let out = sh(&format!("ip netns exec {a} ping -c 3 -i 0.2 -W 1 -I 10.244.1.1 10.244.2.1"));
    assert!(out.contains("3 received"), "{out}");
    assert!(dir.join("node-a/cni/10-weir.conflist").exists(), "CNI config written without an API server");

    // Drop node-b from the file: node-a sweeps it.
    std::fs::write(dir.join("peers.yaml"), PEERS.split("- name: node-b").next().unwrap()).unwrap();
    wait_until(Duration::from_secs(10), "node-b swept from node-a", || {
        !sh(&format!("ip -n {a} route show proto 87")).contains("10.244.2.0/24")
    });
}

/// The DaemonSet grants only CAP_NET_ADMIN: prove the agent needs nothing else,
/// NET_RAW included, in full and on-demand mode and with its firewall.
#[test]
fn net_admin_is_the_only_capability_needed() {
    if !can_create_netns() || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP net_admin_is_the_only_capability_needed: needs root and setpriv");
        return;
    }
    let (na, nb) = node_pair("weir-cap");
    let (a, b) = (na.0.clone(), nb.0.clone());
    let dir = temp_dir("weir-cap");
    std::fs::write(dir.join("peers.yaml"), PEERS).unwrap();
    // As root, the bounding set caps what the exec'd agent may hold.
    let only_net_admin = ["setpriv", "--bounding-set=-all,+net_admin", "--inh-caps=-all"];
    let _agent_a = spawn_agent_with(&a, "node-a", "ua", &dir, &only_net_admin, &[("WEIR_MODE", "on-demand")]);
    let _agent_b = spawn_agent_with(&b, "node-b", "ub", &dir, &only_net_admin, &[]);
    wait_until(Duration::from_secs(20), "both agents programmed", || {
        sh(&format!("ip -n {a} route show proto 87")).contains("10.244.2.0/24")
            && sh(&format!("ip -n {b} route show proto 87")).contains("10.244.1.0/24")
            && firewall_admits(&a, "198.18.0.2")
            && firewall_admits(&b, "198.18.0.1")
    });
    let caps = sh(&format!("grep CapEff /proc/{}/status", _agent_a.0.id()));
    assert!(caps.contains("0000000000001000"), "agent runs with CAP_NET_ADMIN only: {caps}");
    // On-demand on node-a: the first packet triggers a miss answered without NET_RAW.
    let out = sh(&format!("ip netns exec {a} ping -c 3 -i 0.2 -W 1 -I 10.244.1.1 10.244.2.1"));
    assert!(out.contains("3 received"), "{out}");
}

/// On-demand with more active peers than gc_thresh3 (1024 non-permanent
/// neighbours machine-wide): answers are permanent, so all 1,100 go in, no
/// write fails with ENOBUFS, and every peer answers the first packet sent to
/// it.
///
/// The 1,100 peers are one namespace B standing in for all of them: it owns
/// every peer's underlay and pod address (local routes over 198.19.0.0/16 and
/// 10.96.0.0/11), and one VXLAN device decapsulates for every peer's VTEP MAC
/// (an nftables ingress rule marks frames to any MAC as for this host, which
/// the IP layer otherwise drops as addressed to another).
#[test]
fn on_demand_reaches_more_peers_than_gc_thresh3() {
    if !can_create_netns() {
        eprintln!("SKIP on_demand_reaches_more_peers_than_gc_thresh3: needs root");
        return;
    }
    const PEERS_N: u32 = 1100;
    let (na, nb) = node_pair("weir-od");
    let (a, b) = (&na.0, &nb.0);
    sh(&format!("ip -n {a} route add 198.19.0.0/16 via 198.18.0.2 dev ua"));
    sh(&format!(
        "ip -n {b} route add local 198.19.0.0/16 dev lo && ip -n {b} route add local 10.96.0.0/11 dev lo && \
         ip -n {b} link add vx type vxlan id 1 dstport 8472 dev ub nolearning && ip -n {b} link set vx up && \
         bridge -n {b} fdb add 0e:00:00:00:0a:0a dev vx dst 198.18.0.1 self permanent && \
         ip -n {b} neigh add 10.244.1.0 lladdr 0e:00:00:00:0a:0a dev vx nud permanent && \
         ip -n {b} route add 10.244.1.0/24 via 10.244.1.0 dev vx onlink"
    ));
    let rule = "add table netdev peers; add chain netdev peers in { type filter hook ingress device vx priority 0; }; \
                add rule netdev peers in meta pkttype set host";
    sh(&format!("ip netns exec {b} nft '{rule}'"));
    let dir = temp_dir("weir-od");
    let mut peers = String::from(
        "- {name: node-a, publicIP: 198.18.0.1, vtepMAC: \"0e:00:00:00:0a:0a\", podCIDRs: [10.244.1.0/24]}\n",
    );
    let mut pod_ips = String::new();
    for i in 0..PEERS_N {
        let (hi, lo) = (i >> 8, i & 0xff);
        peers += &format!(
            "- {{name: fake-{i}, publicIP: 198.19.{hi}.{lo}, vtepMAC: \"0e:00:00:00:{hi:02x}:{lo:02x}\", podCIDRs: [10.{}.{lo}.0/24]}}\n",
            100 + hi
        );
        pod_ips += &format!("10.{}.{lo}.1\n", 100 + hi);
    }
    std::fs::write(dir.join("peers.yaml"), peers).unwrap();
    std::fs::write(dir.join("pod-ips"), pod_ips).unwrap();
    let _agent =
        spawn_agent_with(a, "node-a", "ua", &dir, &[], &[("WEIR_MODE", "on-demand"), ("WEIR_FIREWALL", "false")]);
    wait_until(Duration::from_secs(30), "routes to every peer", || {
        sh(&format!("ip -n {a} route show proto 87 | wc -l")).trim() == PEERS_N.to_string()
    });
    // One echo to each peer's pod address, 100 at a time, so the INCOMPLETE
    // entries the misses start from never pass the kernel's limit at once.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/echo_each.py");
    let pods = dir.join("pod-ips");
    let report = sh(&format!("ip netns exec {a} python3 {script} 10.244.1.1 100 < {}", pods.display()));
    eprintln!("on-demand, {PEERS_N} peers: {}", report.trim());
    assert!(report.starts_with(&format!("{PEERS_N} of {PEERS_N} answered")), "{report}");
    let permanent = sh(&format!("ip -n {a} neigh show dev weir.1 nud permanent | wc -l"));
    assert_eq!(permanent.trim(), PEERS_N.to_string(), "a permanent neighbour per active peer");
    let log = std::fs::read_to_string(dir.join("node-a.log")).unwrap();
    // The ENOBUFS that matters here is a neighbour write refused by gc_thresh3.
    assert!(!log.contains("answering a miss failed"), "a miss answer failed:\n{log}");
    assert!(!log.contains("neighbour table full"), "{log}");
}

/// VXLAN over an IPv6 underlay carries both pod families, and the tunnel
/// filter admits the peers by their IPv6 address.
#[test]
fn an_ipv6_underlay_carries_ipv4_and_ipv6_pods() {
    let Some(p) = pair("an_ipv6_underlay_carries_ipv4_and_ipv6_pods", "weir-u6", Some(PEERS_V6)) else { return };
    // `p` holds the namespaces and the scratch directory until the test ends.
    let (a, b, dir) = (p.a.clone(), p.b.clone(), p.dir.to_path_buf());
    for (ns, dev, n) in [(&a, "ua", 1), (&b, "ub", 2)] {
        sh(&format!("ip -n {ns} -4 addr flush dev {dev} && ip -n {ns} addr add fd00:198:18::{n}/64 dev {dev} nodad"));
        sh(&format!("ip -n {ns} addr add fd00:10:244:{n}::1/128 dev lo"));
    }
    let env = [("WEIR_CLUSTER_CIDR", "10.244.0.0/16,fd00:10:244::/56")];
    let _agent_a = spawn_agent_with(&a, "node-a", "ua", &dir, &[], &env);
    let _agent_b = spawn_agent_with(&b, "node-b", "ub", &dir, &[], &env);
    wait_until(Duration::from_secs(20), "both families programmed, peers admitted", || {
        sh(&format!("ip -n {a} route show proto 87")).contains("10.244.2.0/24")
            && sh(&format!("ip -n {a} -6 route show proto 87")).contains("fd00:10:244:2::/64")
            && sh(&format!("ip -n {b} -6 route show proto 87")).contains("fd00:10:244:1::/64")
            && sh(&format!("ip netns exec {a} nft list set inet weir peers6")).contains("fd00:198:18::2")
            && sh(&format!("ip netns exec {b} nft list set inet weir peers6")).contains("fd00:198:18::1")
    });
    let fdb = sh(&format!("bridge -n {a} fdb show dev weir.1"));
    assert!(fdb.contains("dst fd00:198:18::2"), "the fdb entry points at the IPv6 underlay: {fdb}");
    for (src, dst) in [("10.244.1.1", "10.244.2.1"), ("fd00:10:244:1::1", "fd00:10:244:2::1")] {
        let out = sh(&format!("ip netns exec {a} ping -c 3 -i 0.2 -W 1 -I {src} {dst}"));
        assert!(out.contains("3 received"), "{src} -> {dst}: {out}");
    }
}
