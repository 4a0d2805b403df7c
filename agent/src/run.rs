//! `weir-agent run`: wires the peer source, the engine, the CNI config and
//! the HTTP endpoints together. The dataplane is never torn down here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::cli::RunArgs;
use crate::cni;
use crate::dataplane::netlink::NetlinkKernel;
use crate::dataplane::{DeviceKind, DeviceSpec, FilterRule, Kernel, events};
use crate::engine::OnDemand;
use crate::engine::{Engine, EngineConfig, EngineStatus};
use crate::firewall::{self, FirewallSpec};
use crate::health::{self, Probes};
use crate::metrics::Metrics;
use crate::model::{Backend, Mac, Mode, PeerSet};
use crate::ondemand::responder::Responder;
use crate::ondemand::{ActiveSet, MissTable};
use crate::peers::validate::{NodeInfo, Validator};
use crate::peers::{file, kube as kube_peers};
use crate::underlay;

/// What the agent knows about its own node before it can program anything.
struct Own {
    pod_cidrs: Vec<IpNet>,
    mac: Option<Mac>,
    node_ips: Vec<std::net::IpAddr>,
}

async fn own_from_api(api: &Api<Node>, name: &str, probes: &Probes) -> anyhow::Result<Own> {
    let mut logged = false;
    probes.waiting("reading the own Node from the API server");
    loop {
        probes.heartbeat.beat();
        // Bounded, so that this loop keeps beating while the API server is away.
        let got = tokio::time::timeout(Duration::from_secs(5), api.get(name)).await;
        match got.unwrap_or_else(|_| Err(kube::Error::Service("no answer within 5 s".into()))) {
            Ok(node) => {
                let info = kube_peers::trim(&node);
                if !info.pod_cidrs.is_empty() {
                    let pod_cidrs = info
                        .pod_cidrs
                        .iter()
                        .map(|c| c.parse().with_context(|| format!("node {name}: spec.podCIDRs has {c:?}, not a CIDR")))
                        .collect::<anyhow::Result<_>>()?;
                    let mac = info.vtep_mac.as_deref().and_then(|m| m.parse().ok());
                    return Ok(Own { pod_cidrs, mac, node_ips: kube_peers::internal_ips(&node) });
                }
                probes.waiting("the own Node's spec.podCIDRs (set by weir-controller or kube-controller-manager)");
                if !logged {
                    info!(node = %name, "waiting for spec.podCIDRs to be set (by weir-controller or kube-controller-manager); not ready");
                    logged = true;
                }
            }
            Err(e) => warn!(node = %name, error = %e, "cannot read own Node; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn own_from_file(nodes: &[NodeInfo], name: &str) -> anyhow::Result<Own> {
    let me = nodes
        .iter()
        .find(|n| n.name == name)
        .with_context(|| format!("peers file has no entry named {name} (--node-name)"))?;
    let pod_cidrs = me
        .pod_cidrs
        .iter()
        .map(|c| c.parse().with_context(|| format!("peers file: node {name} podCIDRs {c:?}")))
        .collect::<anyhow::Result<_>>()?;
    Ok(Own { pod_cidrs, mac: me.vtep_mac.as_deref().and_then(|m| m.parse().ok()), node_ips: vec![] })
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let node_name = args.node_name.clone().context("--node-name (NODE_NAME) is required")?;
    let metrics = Arc::new(Metrics::new());
    metrics
        .build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), args.backend.as_str(), mode_str(args.mode)])
        .set(1);

    // Served from here on, so that probes never meet a refused connection.
    let probes = Arc::new(Probes::default());
    probes.heartbeat.beat();
    health::serve(args.metrics_addr, metrics.clone(), probes.clone())
        .await
        .with_context(|| format!("bind {} (--metrics-addr)", args.metrics_addr))?;

    let client = match &args.peers_file {
        Some(_) => None,
        None => Some(weir_common::kube_client(args.kubeconfig.as_deref()).await?),
    };
    let nodes_api: Option<Api<Node>> = client.clone().map(Api::all);
    let own = match (&nodes_api, &args.peers_file) {
        (Some(api), _) => own_from_api(api, &node_name, &probes).await?,
        (None, Some(path)) => own_from_file(&file::read(path, args.backend).map_err(anyhow::Error::msg)?, &node_name)?,
        (None, None) => unreachable!("either the API or a peers file"),
    };

    let probe = NetlinkKernel::connect().context("open netlink socket")?.with_sysctl_net_dir(&args.sysctl_net_dir);
    let under = underlay::select(&probe.handle(), args.public_ip, args.iface.as_deref(), &own.node_ips).await?;
    let overhead = if args.backend == Backend::Vxlan { if under.ip.is_ipv4() { 50 } else { 70 } } else { 20 };
    let mtu = args.mtu.unwrap_or(under.mtu - overhead);
    let device = DeviceSpec {
        name: match args.backend {
            Backend::Vxlan => DeviceSpec::vxlan_name(args.vni),
            Backend::Ipip => DeviceSpec::IPIP_NAME.to_string(),
        },
        kind: match args.backend {
            Backend::Vxlan => {
                DeviceKind::Vxlan { vni: args.vni, port: args.vxlan_port, on_demand: args.mode == Mode::OnDemand }
            }
            Backend::Ipip => DeviceKind::Ipip,
        },
        local: under.ip,
        underlay_ifindex: under.ifindex,
        mtu,
        // Only a VXLAN device has an Ethernet address to keep.
        mac: own.mac.filter(|_| args.backend == Backend::Vxlan),
        addresses: own
            .pod_cidrs
            .iter()
            .map(|c| IpNet::new(c.network(), c.max_prefix_len()).expect("host prefix"))
            .collect(),
    };
    info!(
        version = env!("CARGO_PKG_VERSION"), backend = args.backend.as_str(), mode = mode_str(args.mode),
        node = %node_name, underlay_iface = %under.ifname, underlay_ip = %under.ip, pod_cidrs = ?own.pod_cidrs,
        vni = args.vni, port = args.vxlan_port, mtu, device = %device.name, "weir-agent starting"
    );

    // A kernel without the device type cannot be fixed by retrying: stop with
    // the name of what is missing instead of looping on a raw errno.
    let mut probe = probe;
    match probe.ensure_device(&device).await {
        Err(e) if e.is_fatal() => return Err(anyhow::anyhow!(e)),
        Err(e) => warn!(error = %e, "first device set-up failed; the engine will retry"),
        Ok(_) => {}
    }
    let active = Arc::new(ActiveSet::default());
    let (table_tx, table_rx) = watch::channel(Arc::new(MissTable::default()));
    let on_demand = (args.mode == Mode::OnDemand).then(|| OnDemand {
        active: active.clone(),
        table: table_tx,
        idle_timeout: (!args.idle_timeout.is_zero()).then_some(args.idle_timeout),
    });
    let cfg = EngineConfig { backend: args.backend, device, resync_interval: args.resync_interval, on_demand };
    let (engine, status) = Engine::new(probe, cfg, metrics.clone());
    let engine = engine.with_heartbeat(probes.heartbeat.clone());
    let _ = probes.engine.set(status.clone());
    let (peers_tx, peers_rx) = watch::channel(PeerSet::default());
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    // Misses change nothing the engine tracks; in a miss storm they would
    // wake it tens of thousands of times.
    let mut event_filter = vec![FilterRule::DropType(libc::RTM_GETNEIGH)];
    if args.mode == Mode::OnDemand {
        let responder = Responder {
            table: table_rx,
            active,
            metrics: metrics.clone(),
            resync: ev_tx.clone(),
            rcvbuf: args.miss_rcvbuf,
        };
        let port = responder.spawn().context("start the miss responder thread")?;
        // The responder's own answers are not drift, and waking the engine
        // for them while the first packet is in flight costs part of its
        // latency (BENCHMARKS.md, B5). vxlan
        // reports fdb writes without a sender, so new fdb entries are not
        // events at all in this mode: someone else adding or replacing one
        // on our device is repaired by the periodic resync instead of at
        // once. Deletions still arrive.
        event_filter.extend([FilterRule::DropSender(port), FilterRule::DropNewFdb]);
    }
    events::subscribe(ev_tx, &event_filter).context("subscribe to kernel notifications")?;
    let reopen = move || {
        let (tx, rx) = mpsc::channel(1024);
        events::subscribe(tx, &event_filter).ok().map(|_| rx)
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let firewall_peers = peers_rx.clone();
    let engine_task = tokio::spawn(engine.run(peers_rx, ev_rx, reopen, shutdown_rx));

    // Publish our VTEP once the device exists, so peers can reach us.
    let mut st = status.clone();
    let ready = st.wait_for(|s| s.device_ready).await.map(|s| s.clone());
    let vtep_mac = ready.ok().and_then(|s| s.vtep_mac);
    if let Some(api) = &nodes_api {
        let wanted = kube_peers::weir_annotations(
            under.ip,
            vtep_mac.filter(|_| args.backend == Backend::Vxlan).map(|m| m.to_string()),
            args.backend,
            args.vni,
        );
        spawn_retrying("publish annotations", {
            let (api, name) = (api.clone(), node_name.clone());
            move || {
                let (api, name, wanted) = (api.clone(), name.clone(), wanted.clone());
                async move {
                    kube_peers::publish_annotations(&api, &name, &wanted)
                        .await
                        .map(|n| info!(changed = n, "annotations published"))
                }
            }
        });
    }

    let inputs = cni::CniInputs {
        pod_cidrs: &own.pod_cidrs,
        cluster_cidrs: &args.cluster_cidr,
        mtu,
        ip_masq: args.ip_masq,
        ipam_dir: &args.run_dir.join("ipam"),
    };
    for (path, content) in [
        (args.cni_conf_dir.join(cni::CONFLIST_NAME), cni::conflist(&inputs)),
        (args.run_dir.join("subnet.env"), cni::subnet_env(&inputs)),
    ] {
        if cni::write_if_changed(&path, &content).with_context(|| format!("write {}", path.display()))? {
            metrics.cni_writes.inc();
            info!(path = %path.display(), "wrote CNI config");
        }
    }
    probes.cni_written.store(true, Ordering::Relaxed);

    if args.firewall {
        let spec = FirewallSpec {
            backend: args.backend,
            vxlan_port: args.vxlan_port,
            pod_cidrs: own.pod_cidrs.clone(),
            cluster_cidrs: args.cluster_cidr.clone(),
            masquerade: args.ip_masq,
            peers: Default::default(),
        };
        if args.ip_masq && args.cluster_cidr.is_empty() {
            warn!("--ip-masq needs --cluster-cidr to tell pod traffic from outside traffic; not masquerading");
        }
        tokio::spawn(firewall::run(spec, firewall_peers, metrics.clone(), args.firewall_check_interval));
    }

    let validator = Validator::new(
        args.backend,
        under.ip.is_ipv4(),
        args.cluster_cidr.clone(),
        node_name.clone(),
        own.pod_cidrs.clone(),
    );
    let publish = crate::peers::publish::publisher(
        validator,
        peers_tx,
        metrics.clone(),
        args.run_dir.join(crate::peers::publish::PEERS_FILE),
    );
    match (&nodes_api, &args.peers_file) {
        (Some(api), _) => {
            tokio::spawn(kube_peers::watch_nodes(api.clone(), metrics.clone(), publish));
        }
        (None, Some(path)) => {
            let mut publish = publish;
            tokio::spawn(file::watch(path.clone(), args.backend, move |nodes| {
                let map: BTreeMap<String, NodeInfo> = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
                publish(&map, true)
            }));
        }
        _ => {}
    }

    if let Some(api) = &nodes_api {
        let (api, name, mut st) = (api.clone(), node_name.clone(), status.clone());
        tokio::spawn(async move {
            if st.wait_for(|s| s.synced).await.is_ok() {
                info!("dataplane synced with the full peer set; setting NetworkUnavailable=False");
                retry(|| kube_peers::set_network_available(&api, &name), "set NetworkUnavailable=False").await;
            }
        });
    }
    spawn_summary(status.clone());

    wait_for_signal().await;
    info!("signal received; leaving the dataplane exactly as it is");
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), engine_task).await;
    Ok(())
}

fn spawn_summary(status: watch::Receiver<EngineStatus>) {
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

async fn retry<F, Fut, T>(mut f: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kube::Result<T>>,
{
    let mut delay = Duration::from_millis(500);
    loop {
        match f().await {
            Ok(_) => return,
            Err(e) => warn!(error = %e, "{what} failed; retrying in {delay:?}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

fn spawn_retrying<F, Fut>(what: &'static str, f: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = kube::Result<()>> + Send,
{
    tokio::spawn(async move { retry(f, what).await });
}

fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Full => "full",
        Mode::OnDemand => "on-demand",
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
