//! The `--peers-file` source, end to end without an API server: two agents in
//! two namespaces, a ping between them, and a live edit of the file.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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

fn spawn_agent(ns: &str, node: &str, iface: &str, dir: &std::path::Path) -> Agent {
    let log = std::fs::File::create(dir.join(format!("{node}.log"))).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_weir-agent"), "run"])
        .env("NODE_NAME", node)
        .env("WEIR_PEERS_FILE", dir.join("peers.yaml"))
        .env("WEIR_IFACE", iface)
        .env("WEIR_CNI_CONF_DIR", dir.join(node).join("cni"))
        .env("WEIR_RUN_DIR", dir.join(node).join("run"))
        .env("WEIR_METRICS_ADDR", "127.0.0.1:9478")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Agent(child)
}

fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn two_agents_from_a_peers_file_ping_and_follow_edits() {
    if !can_create_netns() {
        eprintln!("SKIP two_agents_from_a_peers_file_ping_and_follow_edits: needs root");
        return;
    }
    let pid = std::process::id();
    let (a, b) = (format!("weir-pf-{pid}-a"), format!("weir-pf-{pid}-b"));
    let (_na, _nb) = (NamedNetns::new(&a), NamedNetns::new(&b));
    sh(&format!("ip link add ua netns {a} type veth peer name ub netns {b}"));
    sh(&format!("ip -n {a} addr add 198.18.0.1/24 dev ua && ip -n {a} link set ua up"));
    sh(&format!("ip -n {b} addr add 198.18.0.2/24 dev ub && ip -n {b} link set ub up"));
    sh(&format!("ip -n {a} addr add 10.244.1.1/32 dev lo && ip -n {b} addr add 10.244.2.1/32 dev lo"));
    let dir = std::env::temp_dir().join(format!("weir-pf-{pid}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("peers.yaml"), PEERS).unwrap();

    let _agent_a = spawn_agent(&a, "node-a", "ua", &dir);
    let _agent_b = spawn_agent(&b, "node-b", "ub", &dir);
    wait_until(Duration::from_secs(20), "both agents programmed", || {
        sh(&format!("ip -n {a} route show proto 87")).contains("10.244.2.0/24")
            && sh(&format!("ip -n {b} route show proto 87")).contains("10.244.1.0/24")
    });
    let out = sh(&format!("ip netns exec {a} ping -c 3 -i 0.2 -W 1 -I 10.244.1.1 10.244.2.1"));
    assert!(out.contains("3 received"), "{out}");
    assert!(dir.join("node-a/cni/10-weir.conflist").exists(), "CNI config written without an API server");

    // Drop node-b from the file: node-a sweeps it.
    std::fs::write(dir.join("peers.yaml"), PEERS.split("- name: node-b").next().unwrap()).unwrap();
    wait_until(Duration::from_secs(10), "node-b swept from node-a", || {
        !sh(&format!("ip -n {a} route show proto 87")).contains("10.244.2.0/24")
    });
    std::fs::remove_dir_all(&dir).ok();
}
