//! The agent's tasks, each started by `run` in this order: the engine (with
//! the miss responder in on-demand mode), the own Node's annotations, the
//! CNI config, the firewall, the peer source, NetworkUnavailable, and a
//! periodic summary line.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::context::Context;
use crate::cni;
use crate::dataplane::netlink::NetlinkKernel;
use crate::dataplane::{FilterRule, events};
use crate::engine::{Engine, EngineConfig, EngineStatus, OnDemand};
use crate::firewall::{self, FirewallSpec};
use crate::model::{Backend, Mode, PeerSet};
use crate::ondemand::responder::Responder;
use crate::ondemand::{ActiveSet, MissTable};
use crate::peers::validate::{NodeInfo, Validator};
use crate::peers::{file, kube as kube_peers, publish};

/// The running engine and the channels into and out of it.
pub struct RunningEngine {
    pub status: watch::Receiver<EngineStatus>,
    pub peers_tx: watch::Sender<PeerSet>,
    pub peers_rx: watch::Receiver<PeerSet>,
    pub shutdown: watch::Sender<bool>,
    pub task: JoinHandle<()>,
}

/// Starts the engine on the context's kernel, subscribed to kernel
/// notifications, and in on-demand mode the miss responder beside it.
pub fn start_engine(ctx: &Context, kernel: NetlinkKernel) -> anyhow::Result<RunningEngine> {
    let args = &ctx.args;
    let active = Arc::new(ActiveSet::default());
    let (table_tx, table_rx) = watch::channel(Arc::new(MissTable::default()));
    let on_demand = (args.mode == Mode::OnDemand).then(|| OnDemand {
        active: active.clone(),
        table: table_tx,
        idle_timeout: (!args.idle_timeout.is_zero()).then_some(args.idle_timeout),
    });
    let cfg = EngineConfig {
        backend: args.backend,
        device: ctx.device.clone(),
        direct: ctx.direct,
        resync_interval: args.resync_interval,
        on_demand,
    };
    let writer_port = kernel.writer_port();
    let (engine, status) = Engine::new(kernel, cfg, ctx.metrics.clone());
    let engine = engine.with_heartbeat(ctx.probes.heartbeat.clone());
    let _ = ctx.probes.engine.set(status.clone());
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    // Misses change nothing the engine tracks; in a miss storm they would
    // wake it tens of thousands of times.
    let mut event_filter = vec![FilterRule::DropType(libc::RTM_GETNEIGH)];
    // Nor are the engine's own writes: at thousands of peers, a full pass
    // for the echo of every peer change is what makes a Node event cost in
    // proportion to the cluster.
    event_filter.extend(writer_port.map(FilterRule::DropSender));
    if args.mode == Mode::OnDemand {
        let responder = Responder {
            table: table_rx,
            active,
            metrics: ctx.metrics.clone(),
            resync: ev_tx.clone(),
            rcvbuf: args.miss_rcvbuf,
        };
        let port = responder.spawn().context("start the miss responder thread")?;
        // The responder's own answers are not drift, and waking the engine
        // for them while the first packet is in flight costs part of its
        // latency (BENCHMARKS.md, B5). vxlan reports fdb writes without a
        // sender, so new fdb entries are not events at all in this mode:
        // someone else adding or replacing one on our device is repaired by
        // the periodic resync instead of at once. Deletions still arrive.
        event_filter.extend([FilterRule::DropSender(port), FilterRule::DropNewFdb]);
    }
    events::subscribe(ev_tx, &event_filter).context("subscribe to kernel notifications")?;
    let reopen = move || {
        let (tx, rx) = mpsc::channel(1024);
        events::subscribe(tx, &event_filter).ok().map(|_| rx)
    };
    let (peers_tx, peers_rx) = watch::channel(PeerSet::default());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(engine.run(peers_rx.clone(), ev_rx, reopen, shutdown_rx));
    Ok(RunningEngine { status, peers_tx, peers_rx, shutdown, task })
}

/// Publishes the VTEP once the device exists, so that peers can reach us.
pub async fn publish_own_node(ctx: &Context, engine: &RunningEngine) {
    let mut st = engine.status.clone();
    let ready = st.wait_for(|s| s.device_ready).await.map(|s| s.clone());
    let vtep_mac = ready.ok().and_then(|s| s.vtep_mac);
    let Some(api) = ctx.nodes_api.clone() else { return };
    let args = &ctx.args;
    let wanted = kube_peers::weir_annotations(
        ctx.underlay.ip,
        vtep_mac.filter(|_| args.backend == Backend::Vxlan).map(|m| m.to_string()),
        args.backend,
        args.vni,
    );
    let name = ctx.node_name.clone();
    tokio::spawn(retry("publish annotations", move || {
        let (api, name, wanted) = (api.clone(), name.clone(), wanted.clone());
        async move {
            kube_peers::publish_annotations(&api, &name, &wanted)
                .await
                .map(|n| info!(changed = n, "annotations published"))
        }
    }));
}

/// The CNI config for the standard plugins, and subnet.env beside it.
pub fn write_cni_config(ctx: &Context) -> anyhow::Result<()> {
    let args = &ctx.args;
    let inputs = cni::CniInputs {
        pod_cidrs: &ctx.own.pod_cidrs,
        cluster_cidrs: &args.cluster_cidr,
        mtu: ctx.mtu,
        ip_masq: args.ip_masq,
        ipam_dir: &args.run_dir.join("ipam"),
    };
    for (path, content) in [
        (args.cni_conf_dir.join(cni::CONFLIST_NAME), cni::conflist(&inputs)),
        (args.run_dir.join("subnet.env"), cni::subnet_env(&inputs)),
    ] {
        if cni::write_if_changed(&path, &content).with_context(|| format!("write {}", path.display()))? {
            ctx.metrics.cni_writes.inc();
            info!(path = %path.display(), "wrote CNI config");
        }
    }
    ctx.probes.cni_written.store(true, Ordering::Relaxed);
    Ok(())
}

pub fn start_firewall(ctx: &Context, peers: watch::Receiver<PeerSet>) {
    let args = &ctx.args;
    if !args.firewall {
        return;
    }
    if args.ip_masq && args.cluster_cidr.is_empty() {
        warn!("--ip-masq needs --cluster-cidr to tell pod traffic from outside traffic; not masquerading");
    }
    let spec = FirewallSpec {
        backend: args.backend,
        vxlan_port: args.vxlan_port,
        pod_cidrs: ctx.own.pod_cidrs.clone(),
        cluster_cidrs: args.cluster_cidr.clone(),
        masquerade: args.ip_masq,
        peers: Default::default(),
    };
    tokio::spawn(firewall::run(spec, peers, ctx.metrics.clone(), args.firewall_check_interval));
}

/// Nodes from the API server (or the peers file), validated into the
/// engine's peer set.
pub fn start_peer_source(ctx: &Context, peers: watch::Sender<PeerSet>) {
    let args = &ctx.args;
    let validator = Validator::new(
        args.backend,
        ctx.underlay.ip.is_ipv4(),
        args.cluster_cidr.clone(),
        ctx.node_name.clone(),
        ctx.own.pod_cidrs.clone(),
    );
    let report = publish::PeersReport::new(validator, ctx.direct);
    report.write_when_quiet(args.run_dir.join(publish::PEERS_FILE));
    let mut publish = publish::publisher(&report, peers, ctx.metrics.clone());
    let _ = ctx.probes.peers.set(report);
    match (&ctx.nodes_api, &args.peers_file) {
        (Some(api), _) => {
            tokio::spawn(kube_peers::watch_nodes(api.clone(), ctx.metrics.clone(), publish));
        }
        (None, Some(path)) => {
            tokio::spawn(file::watch(path.clone(), args.backend, move |nodes| {
                let map: BTreeMap<String, NodeInfo> = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
                publish(&map, true, None)
            }));
        }
        (None, None) => {}
    }
}

/// NetworkUnavailable=False once the dataplane holds the full peer set.
pub fn report_network_available(ctx: &Context, mut status: watch::Receiver<EngineStatus>) {
    let Some(api) = ctx.nodes_api.clone() else { return };
    let name = ctx.node_name.clone();
    tokio::spawn(async move {
        if status.wait_for(|s| s.synced).await.is_ok() {
            info!("dataplane synced with the full peer set; setting NetworkUnavailable=False");
            retry("set NetworkUnavailable=False", || kube_peers::set_network_available(&api, &name)).await;
        }
    });
}

pub fn spawn_summary(status: watch::Receiver<EngineStatus>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tick.tick().await;
            let s = status.borrow().clone();
            info!(peers = s.peers, fdb = s.fdb_entries, neigh = s.neigh_entries, routes = s.routes,
                  synced = s.synced, error = ?s.last_error, "summary");
        }
    });
}

/// Calls `f` until it succeeds, 0.5 s doubling to 30 s between tries.
async fn retry<F, Fut, T>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kube::Result<T>>,
{
    let mut delay = Duration::from_millis(500);
    loop {
        match f().await {
            Ok(_) => return,
            Err(e) => warn!(error = weir_common::with_causes(&e), "{what} failed; retrying in {delay:?}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
