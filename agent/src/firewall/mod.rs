//! weir's nftables table `inet weir`: pod masquerade, forward accept for the
//! cluster, and tunnel ingress only from known nodes.
//!
//! The table is written through the `nft` binary: one `nft -f -` run is one
//! atomic transaction that replaces it whole, and `nft -s list table inet
//! weir` shows drift (`listing`). A peer change between two replacements only
//! adds or deletes set elements, over nfnetlink (`elements`).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::{Metrics, labels};
use crate::model::{Backend, PeerSet};

mod elements;
mod listing;
mod underlays;
pub use elements::{NftSocket, SetChange, element_delta, encode_batch, next_generation};
use listing::Listing;
use underlays::Underlays;

pub const TABLE: &str = "inet weir";
/// The table's name within its family (inet), as nfnetlink names it.
const TABLE_NAME: &str = "weir";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallSpec {
    pub backend: Backend,
    pub vxlan_port: u16,
    pub pod_cidrs: Vec<IpNet>,
    pub cluster_cidrs: Vec<IpNet>,
    pub masquerade: bool,
    pub peers: BTreeSet<IpAddr>,
}

fn elements<'a>(ips: impl Iterator<Item = &'a IpAddr>) -> String {
    let list: Vec<String> = ips.map(|i| i.to_string()).collect();
    if list.is_empty() { String::new() } else { format!(" elements = {{ {} }};", list.join(", ")) }
}

fn nets(v: &[&IpNet]) -> String {
    v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
}

/// The whole nft script: create-then-delete makes the replacement work
/// whether or not the table exists, inside one transaction.
pub fn render(spec: &FirewallSpec) -> String {
    let mut s = String::new();
    let v4: Vec<&IpAddr> = spec.peers.iter().filter(|i| i.is_ipv4()).collect();
    let v6: Vec<&IpAddr> = spec.peers.iter().filter(|i| i.is_ipv6()).collect();
    // Only weir's own port (or IP protocol 4) to a local address is filtered:
    // other VXLAN users on the host keep working.
    let tunnel = match spec.backend {
        Backend::Vxlan => format!("udp dport {}", spec.vxlan_port),
        Backend::Ipip => "meta l4proto ipip".to_string(),
    };
    writeln!(s, "table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{").unwrap();
    writeln!(s, "\tcomment \"managed by weir-agent; changes are reverted\"").unwrap();
    writeln!(s, "\tset peers4 {{ type ipv4_addr;{} }}", elements(v4.into_iter())).unwrap();
    writeln!(s, "\tset peers6 {{ type ipv6_addr;{} }}", elements(v6.into_iter())).unwrap();
    writeln!(s, "\tcounter tunnel_dropped {{ }}").unwrap();
    writeln!(s, "\tchain input {{\n\t\ttype filter hook input priority filter - 10; policy accept;").unwrap();
    writeln!(s, "\t\t{tunnel} fib daddr type local ip saddr @peers4 accept").unwrap();
    writeln!(s, "\t\t{tunnel} fib daddr type local ip6 saddr @peers6 accept").unwrap();
    writeln!(s, "\t\t{tunnel} fib daddr type local counter name \"tunnel_dropped\" drop\n\t}}").unwrap();
    writeln!(s, "\tchain forward {{\n\t\ttype filter hook forward priority filter - 10; policy accept;").unwrap();
    for (fam, cidrs) in by_family(&spec.pod_cidrs) {
        // A pod has no business sending tunnel packets: they could be forged.
        writeln!(s, "\t\t{fam} saddr {{ {} }} {tunnel} counter name \"tunnel_dropped\" drop", nets(&cidrs)).unwrap();
    }
    for (fam, cidrs) in by_family(&spec.cluster_cidrs) {
        writeln!(s, "\t\t{fam} saddr {{ {} }} accept", nets(&cidrs)).unwrap();
        writeln!(s, "\t\t{fam} daddr {{ {} }} accept", nets(&cidrs)).unwrap();
    }
    writeln!(s, "\t}}").unwrap();
    if spec.masquerade && !spec.cluster_cidrs.is_empty() {
        writeln!(s, "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;").unwrap();
        let cluster = by_family(&spec.cluster_cidrs);
        for (fam, pods) in by_family(&spec.pod_cidrs) {
            if let Some((_, c)) = cluster.iter().find(|(f, _)| *f == fam) {
                writeln!(
                    s,
                    "\t\t{fam} saddr {{ {} }} {fam} daddr != {{ {} }} masquerade fully-random",
                    nets(&pods),
                    nets(c)
                )
                .unwrap();
            }
        }
        writeln!(s, "\t}}").unwrap();
    }
    writeln!(s, "}}").unwrap();
    s
}

fn by_family(v: &[IpNet]) -> Vec<(&'static str, Vec<&IpNet>)> {
    let v4: Vec<&IpNet> = v.iter().filter(|n| n.addr().is_ipv4()).collect();
    let v6: Vec<&IpNet> = v.iter().filter(|n| n.addr().is_ipv6()).collect();
    [("ip", v4), ("ip6", v6)].into_iter().filter(|(_, v)| !v.is_empty()).collect()
}

/// Why an `nft` run failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft {args}: {stderr}")]
    Failed { args: String, stderr: String },
}

async fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    let mut cmd = tokio::process::Command::new("nft");
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().map_err(NftError::Spawn)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await.map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().await.map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NftError::Failed { args: args.join(" "), stderr: String::from_utf8_lossy(&out.stderr).trim().into() })
    }
}

/// Removes weir's table; absent is fine. (nft reports a missing table only
/// as text, so the tables are listed first rather than the error parsed.)
pub async fn delete_table() -> Result<(), NftError> {
    let tables = nft(&["list", "tables"], None).await?;
    if !tables.lines().any(|l| l.trim() == format!("table {TABLE}")) {
        return Ok(());
    }
    nft(&["delete", "table", "inet", "weir"], None).await.map(|_| ())
}

/// What weir last wrote: the peers in the table, the shape of its listing
/// when it is known, and the ruleset's generation when the table was last
/// known to be as weir left it.
struct Applied {
    peers: BTreeSet<IpAddr>,
    shape: Option<String>,
    generation: Option<u32>,
}

/// Keeps the table equal to the spec for the current peers. A peer change
/// writes only the set elements that changed: with thousands of peers,
/// listing and replacing the whole table on every Node event cost each agent
/// a large share of a core (BENCHMARKS.md, F3). Each check (every
/// `check_every`) first reads the ruleset's generation: when nothing was
/// committed since weir last knew the table, there is nothing to list.
/// Otherwise it lists the table and repairs drift: a shape other than the
/// one weir wrote, or elements other than the peers.
pub async fn run(
    base: FirewallSpec,
    mut peers: watch::Receiver<PeerSet>,
    metrics: Arc<Metrics>,
    check_every: Duration,
) {
    let mut applied: Option<Applied> = None;
    let mut socket: Option<NftSocket> = None;
    let mut dropped_before = 0u64; // counts carried over table replacements
    // The first check runs at once below; an interval's first tick, due at
    // once too, would run a second one straight after it.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + check_every, check_every);
    // Until the whole peer set is known, the table a previous run left keeps
    // admitting the peers it knew; replacing it with a partial set would drop
    // their tunnel packets across an agent restart.
    if peers.wait_for(|p| p.complete).await.is_err() {
        return;
    }
    let mut underlays = Underlays::default();
    let mut checking = true;
    loop {
        let moved = underlays.follow(&peers.borrow());
        match applied.as_mut() {
            Some(a) if !checking => {
                // Against what the table holds: a delta assumes nothing more.
                let added: BTreeSet<IpAddr> = moved.added.into_iter().filter(|ip| !a.peers.contains(ip)).collect();
                let removed: BTreeSet<IpAddr> = moved.removed.into_iter().filter(|ip| a.peers.contains(ip)).collect();
                let delta = element_delta(&removed, &added);
                if !delta.is_empty() {
                    match write_elements(&mut socket, &delta, a.generation) {
                        Ok(generation) => {
                            for ip in &removed {
                                a.peers.remove(ip);
                            }
                            a.peers.extend(added);
                            info!(peers = a.peers.len(), "nftables set of peers updated");
                            metrics.firewall_sync.with_label_values(&[labels::SUCCESS]).inc();
                            a.generation = generation;
                        }
                        Err(e) => {
                            // The set is not what we left (drift): the whole table, now.
                            warn!(error = %e, "updating the sets of peers in nftables table inet weir failed; replacing the table");
                            applied = None;
                            checking = true;
                            continue;
                        }
                    }
                }
            }
            _ => check(&base, underlays.addresses(), &mut applied, &mut socket, &mut dropped_before, &metrics).await,
        }
        checking = tokio::select! {
            _ = tick.tick() => true,
            r = peers.changed() => {
                if r.is_err() {
                    tick.tick().await;
                }
                r.is_err()
            }
        };
    }
}

/// Runs `f` on the socket, opening it on first use; a socket that failed is
/// dropped, so the next use starts on a fresh one.
fn with_socket<T>(socket: &mut Option<NftSocket>, f: impl FnOnce(&mut NftSocket) -> io::Result<T>) -> io::Result<T> {
    let mut s = match socket.take() {
        Some(s) => s,
        None => NftSocket::new()?,
    };
    let out = f(&mut s)?;
    *socket = Some(s);
    Ok(out)
}

/// Writes the set changes. Returns the generation after the write when it
/// proves the table is as weir left it: `known` before, and this write the
/// only commit since.
fn write_elements(socket: &mut Option<NftSocket>, delta: &[SetChange], known: Option<u32>) -> io::Result<Option<u32>> {
    with_socket(socket, |s| {
        let before = s.generation().ok();
        s.apply(TABLE_NAME, delta)?;
        Ok(match (known, before, s.generation().ok()) {
            (Some(k), Some(b), Some(after)) if k == b && after == next_generation(b) => Some(after),
            _ => None,
        })
    })
}

/// The packets dropped by the table's counter, None when it cannot be read.
fn dropped_packets(socket: &mut Option<NftSocket>) -> Option<u64> {
    with_socket(socket, |s| s.counter_packets(TABLE_NAME, "tunnel_dropped")).ok()
}

fn generation(socket: &mut Option<NftSocket>) -> Option<u32> {
    with_socket(socket, NftSocket::generation).ok()
}

/// Lists the table; replaces it when it drifted from what weir left, when
/// its peers changed since, or when its shape was never known. Lists nothing
/// when no transaction was committed since the table was last known.
async fn check(
    base: &FirewallSpec,
    wanted: BTreeSet<IpAddr>,
    applied: &mut Option<Applied>,
    socket: &mut Option<NftSocket>,
    dropped_before: &mut u64,
    metrics: &Metrics,
) {
    let committed = generation(socket);
    let untouched = applied.as_ref().is_some_and(|a| a.generation.is_some() && a.generation == committed);
    let listing = if untouched { None } else { nft(&["-s", "list", "table", "inet", "weir"], None).await.ok() };
    let current = dropped_packets(socket);
    // A table that weir wrote and that is gone is drift even when its shape
    // is unknown.
    let drifted = !untouched
        && match applied {
            Some(Applied { shape: Some(shape), peers, .. }) => {
                listing.as_deref().and_then(Listing::parse).is_none_or(|l| l.shape != *shape || l.elements != *peers)
            }
            Some(Applied { shape: None, .. }) => listing.is_none(),
            None => false,
        };
    let stale = applied.as_ref().is_none_or(|a| a.peers != wanted || (!untouched && a.shape.is_none()));
    if !drifted && !stale {
        if let Some(a) = applied.as_mut() {
            a.generation = committed;
        }
        if let Some(packets) = current {
            metrics.tunnel_dropped.set((*dropped_before + packets) as i64);
        }
        return;
    }
    *dropped_before += current.unwrap_or(0);
    let spec = FirewallSpec { peers: wanted, ..base.clone() };
    match nft(&["-f", "-"], Some(&render(&spec))).await {
        Ok(_) => {
            // The listing is of that generation only if nothing was
            // committed while it was taken.
            let listed_at = generation(socket);
            let shape = nft(&["-s", "list", "table", "inet", "weir"], None)
                .await
                .ok()
                .and_then(|text| Listing::parse(&text))
                .map(|l| l.shape);
            let known = listed_at.filter(|g| Some(*g) == generation(socket));
            if drifted {
                warn!("nftables table inet weir was changed or removed; restored");
                metrics.firewall_sync.with_label_values(&[labels::REPAIRED]).inc();
                metrics.drift_repaired.with_label_values(&[labels::FIREWALL]).inc();
            } else {
                info!(peers = spec.peers.len(), "nftables table inet weir applied");
                metrics.firewall_sync.with_label_values(&[labels::SUCCESS]).inc();
            }
            *applied = Some(Applied { peers: spec.peers, shape, generation: known });
        }
        Err(e) => {
            warn!(error = %e, "applying nftables table inet weir failed; will retry");
            metrics.firewall_sync.with_label_values(&[labels::ERROR]).inc();
            *applied = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FirewallSpec {
        FirewallSpec {
            backend: Backend::Vxlan,
            vxlan_port: 8472,
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            masquerade: true,
            peers: ["198.18.0.12".parse().unwrap(), "198.18.0.13".parse().unwrap()].into(),
        }
    }

    #[test]
    fn tunnel_ingress_only_from_peers_on_our_port() {
        let s = render(&spec());
        assert!(s.contains("set peers4 { type ipv4_addr; elements = { 198.18.0.12, 198.18.0.13 }; }"), "{s}");
        assert!(s.contains("udp dport 8472 fib daddr type local ip saddr @peers4 accept"));
        assert!(s.contains("udp dport 8472 fib daddr type local counter name \"tunnel_dropped\" drop"));
        assert!(!s.contains("4789"));
    }

    #[test]
    fn masquerade_only_leaving_the_cluster() {
        let s = render(&spec());
        assert!(s.contains("ip saddr { 10.244.1.0/24 } ip daddr != { 10.244.0.0/16 } masquerade fully-random"));
        let off = render(&FirewallSpec { masquerade: false, ..spec() });
        assert!(!off.contains("masquerade"));
    }

    #[test]
    fn ipip_filters_protocol_4_and_an_empty_peer_set_is_valid() {
        let s = render(&FirewallSpec { backend: Backend::Ipip, peers: BTreeSet::new(), ..spec() });
        assert!(s.contains("meta l4proto ipip fib daddr type local ip saddr @peers4 accept"));
        assert!(s.contains("set peers4 { type ipv4_addr; }"));
    }

    #[test]
    fn replacement_is_one_transaction() {
        let s = render(&spec());
        assert!(s.starts_with("table inet weir\ndelete table inet weir\ntable inet weir {"));
    }
}
