//! On-demand mode against real kernel misses: the settings it depends on are
//! in force without a writable /proc, and both kinds of miss the kernel
//! raises are answered and counted.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use weir_agent::dataplane::netlink::NetlinkKernel;
use weir_agent::dataplane::{DeviceKind, Kernel, KernelError};

const PEERS: &str = "\
- {name: node-a, publicIP: 198.18.0.1, vtepMAC: \"0e:00:00:00:0a:0a\", podCIDRs: [10.244.1.0/24]}
- {name: node-b, publicIP: 198.18.0.2, vtepMAC: \"0e:00:00:00:0b:0b\", podCIDRs: [10.244.2.0/24]}
";

fn spawn_agent(ns: &str, node: &str, iface: &str, dir: &std::path::Path, mode: &str) -> Agent {
    spawn_agent_with(ns, node, iface, dir, &[], &[("WEIR_MODE", mode), ("WEIR_FIREWALL", "false")])
}

fn metric(ns: &str, series: &str) -> f64 {
    let script = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9478/metrics').read().decode())";
    let out = Command::new("ip").args(["netns", "exec", ns, "python3", "-c", script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// app_solicit is set over rtnetlink: it is in force even when the sysctl
/// directory the agent was given does not exist, as in a container whose
/// /proc/sys is read-only.
#[test]
fn app_solicit_is_set_over_netlink() {
    in_fresh_netns("app_solicit_is_set_over_netlink", || {
        let under = underlay();
        let mut spec = vxlan_spec(under, "198.18.0.1", "10.244.1.0/24");
        spec.kind = DeviceKind::Vxlan { vni: 1, port: 8472, on_demand: true };
        runtime().block_on(async {
            let mut k = NetlinkKernel::connect().unwrap().with_sysctl_net_dir("/nonexistent/proc/sys/net".as_ref());
            k.ensure_device(&spec).await.expect("device with on-demand settings");
        });
        let value = std::fs::read_to_string("/proc/sys/net/ipv4/neigh/weir.1/app_solicit").unwrap();
        assert_eq!(value.trim(), "3", "app_solicit on weir.1");
    });
}

/// accept_ra has no netlink setter: when it cannot be written, setting up
/// the device fails with an error that names the setting and the fix.
#[test]
fn an_unwritable_accept_ra_stops_the_agent_naming_it() {
    in_fresh_netns("an_unwritable_accept_ra_stops_the_agent_naming_it", || {
        let under = underlay();
        let spec = vxlan_spec(under, "198.18.0.1", "10.244.1.0/24");
        // A directory where the file should be: the write fails as it does
        // on a read-only /proc/sys.
        let dir = temp_dir("weir-sysctl");
        std::fs::create_dir_all(dir.join("ipv6/conf/weir.1/accept_ra")).unwrap();
        let err = runtime().block_on(async {
            let mut k = NetlinkKernel::connect().unwrap().with_sysctl_net_dir(&dir);
            k.ensure_device(&spec).await.expect_err("accept_ra cannot be written")
        });
        assert!(matches!(err, KernelError::Setting { .. }) && err.is_fatal(), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("net.ipv6.conf.weir.1.accept_ra=0") && text.contains("WEIR_SYSCTL_NET_DIR"), "{text}");

        // Through the default directory it takes effect.
        runtime().block_on(async {
            NetlinkKernel::connect().unwrap().ensure_device(&spec).await.expect("device");
        });
        let value = std::fs::read_to_string("/proc/sys/net/ipv6/conf/weir.1/accept_ra").unwrap();
        assert_eq!(value.trim(), "0");
    });
}

/// An L3 miss (traffic to a fresh peer) and an L2 miss (the neighbour is
/// known, its fdb entry is gone) each reach the responder, are answered
/// before the engine's repair could, and are counted.
#[test]
fn real_l3_and_l2_misses_are_answered_and_counted() {
    let Some(p) = pair("real_l3_and_l2_misses_are_answered_and_counted", "weir-miss", Some(PEERS)) else { return };
    // `p` holds the namespaces and the scratch directory until the test ends.
    let (a, b, dir) = (p.a.clone(), p.b.clone(), p.dir.to_path_buf());
    let _agent_a = spawn_agent(&a, "node-a", "ua", &dir, "on-demand");
    let _agent_b = spawn_agent(&b, "node-b", "ub", &dir, "full");
    wait_until(Duration::from_secs(20), "routes on both nodes", || {
        sh(&format!("ip -n {a} route show proto 87")).contains("10.244.2.0/24")
            && sh(&format!("ip -n {b} route show proto 87")).contains("10.244.1.0/24")
    });
    let ping = || sh(&format!("ip netns exec {a} ping -c 3 -i 0.2 -W 1 -I 10.244.1.1 10.244.2.1 || true"));

    let l3 = "weir_l3miss_total{result=\"resolved\"}";
    let before = metric(&a, l3);
    let out = ping();
    assert!(out.contains("3 received"), "first packets to a fresh peer: {out}");
    wait_until(Duration::from_secs(5), "the L3 miss counted", || metric(&a, l3) > before);

    // The neighbour stays; only the fdb entry goes. The next packet raises
    // an L2 miss, which the responder must answer (only it counts
    // "resolved"), not leave to the engine's repair. vxlan drops the packet
    // that raised an L2 miss instead of queueing it, so that one is lost
    // whoever answers; the rest must arrive.
    let l2 = "weir_l2miss_total{result=\"resolved\"}";
    let before = metric(&a, l2);
    sh(&format!("bridge -n {a} fdb del 0e:00:00:00:0b:0b dev weir.1 dst 198.18.0.2 self"));
    let out = ping();
    assert!(out.contains("3 received") || out.contains("2 received"), "packets after the fdb entry was deleted: {out}");
    wait_until(Duration::from_secs(5), "the L2 miss counted", || metric(&a, l2) > before);
    assert!(sh(&format!("bridge -n {a} fdb show dev weir.1")).contains("0e:00:00:00:0b:0b"), "fdb entry back");
    let log = std::fs::read_to_string(dir.join("node-a.log")).unwrap();
    assert!(!log.contains("malformed neighbour notification"), "{log}");
}
