//! B1/B2: full-state programming of N peers from an empty kernel, side by side
//! with iproute2 batch mode in the same run, and a no-op resync.
//!
//!     sudo cargo bench -p weir-agent --bench dataplane [-- PEERS ROUNDS]
//!
//! Every round uses fresh network namespaces; nothing touches the host's.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::*;
use weir_agent::model::PeerSet;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// iproute2 applying the classic entries: `bridge -batch` for fdb,
/// `ip -batch` for neighbours and `route … via <gateway> onlink`.
fn iproute2_round(peers: u32) -> Duration {
    let (mut fdb, mut neigh, mut route) = (String::new(), String::new(), String::new());
    for i in 0..peers {
        let p = fake_peer(i);
        let cidr = p.pod_cidrs[0];
        let gw = cidr.network();
        writeln!(fdb, "fdb replace {} dev weir.1 dst {} self permanent", p.vtep_mac, p.underlay_ip).unwrap();
        writeln!(neigh, "neigh replace {gw} dev weir.1 lladdr {} nud permanent", p.vtep_mac).unwrap();
        writeln!(route, "route replace {cidr} via {gw} dev weir.1 onlink").unwrap();
    }
    let dir = std::env::temp_dir().join(format!("weir-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, body) in [("fdb", &fdb), ("neigh", &neigh), ("route", &route)] {
        std::fs::write(dir.join(name), body).unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dir.clone();
    in_fresh_netns("iproute2", move || {
        underlay();
        sh(
            "ip link add weir.1 type vxlan id 1 dstport 8472 local 198.18.0.1 dev u0 nolearning && ip link set weir.1 up && ip addr add 10.244.1.0/32 dev weir.1",
        );
        let t = Instant::now();
        sh(&format!("bridge -batch {0}/fdb && ip -batch {0}/neigh && ip -batch {0}/route", d.display()));
        tx.send(t.elapsed()).unwrap();
    });
    std::fs::remove_dir_all(dir).ok();
    rx.recv().unwrap()
}

struct WeirRound {
    noop_device: Duration,
    noop_dump: Duration,
    first: Duration,
    noop: Duration,
    noop_writes: usize,
    writes: usize,
}

fn weir_round(peers: u32) -> WeirRound {
    let (tx, rx) = std::sync::mpsc::channel();
    in_fresh_netns("weir", move || {
        runtime().block_on(async {
            let u = underlay();
            let spec = vxlan_spec(u, "198.18.0.1", "10.244.1.0/24");
            let (mut e, _, metrics) = engine(spec);
            e.set_peers(&PeerSet::complete((0..peers).map(fake_peer)));
            let t = Instant::now();
            let r = e.reconcile().await.unwrap();
            let first = t.elapsed();
            assert_eq!(r.failures, 0);
            let phase = |name: &str| metrics.phase_seconds.with_label_values(&[name]).get_sample_sum();
            let (dev0, dump0) = (phase("device"), phase("dump"));
            let t = Instant::now();
            let noop = e.reconcile().await.unwrap();
            let noop_time = t.elapsed();
            tx.send(WeirRound {
                noop_device: Duration::from_secs_f64(phase("device") - dev0),
                noop_dump: Duration::from_secs_f64(phase("dump") - dump0),
                first,
                noop: noop_time,
                noop_writes: noop.writes,
                writes: r.writes,
            })
            .unwrap();
        })
    });
    rx.recv().unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let peers: u32 = args.first().and_then(|a| a.parse().ok()).unwrap_or(5000);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    if !can_create_netns() {
        println!("SKIP dataplane bench: needs root to create network namespaces");
        return;
    }
    let (mut base, mut first, mut noop) = (vec![], vec![], vec![]);
    let (mut noop_device, mut noop_dump) = (vec![], vec![]);
    let mut noop_writes = 0;
    let mut writes = 0;
    for _ in 0..rounds {
        // Interleave so drift in machine load hits both sides alike.
        base.push(iproute2_round(peers));
        let w = weir_round(peers);
        first.push(w.first);
        noop.push(w.noop);
        noop_device.push(w.noop_device);
        noop_dump.push(w.noop_dump);
        noop_writes = noop_writes.max(w.noop_writes);
        writes = w.writes;
    }
    let (b, f, n) = (median(base), median(first), median(noop));
    println!("peers={peers} rounds={rounds} (medians; fresh namespaces each round)");
    println!("B1 iproute2 batch (fdb+neigh+classic gateway routes): {:>8.1} ms", b.as_secs_f64() * 1e3);
    println!("B1 weir full sync from empty ({writes} writes, incl. device+dumps): {:>8.1} ms", f.as_secs_f64() * 1e3);
    println!("B1 ratio weir/iproute2: {:.2}x (target <= 0.35x)", f.as_secs_f64() / b.as_secs_f64());
    println!(
        "B2 breakdown: device check {:.1} ms, kernel dump {:.1} ms (rest: desired state and diff)",
        median(noop_device).as_secs_f64() * 1e3,
        median(noop_dump).as_secs_f64() * 1e3
    );
    println!(
        "B2 weir no-op resync: {:>8.1} ms, {noop_writes} writes (target <= 20 ms, 0 writes)",
        n.as_secs_f64() * 1e3
    );
}
