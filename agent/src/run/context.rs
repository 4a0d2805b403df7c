//! What the agent needs before it can program anything: its own Node (pod
//! CIDRs, MAC, addresses), the underlay, the device it will own, and the
//! endpoints, served from the first moment.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tracing::{info, warn};

use crate::cli::RunArgs;
use crate::dataplane::netlink::NetlinkKernel;
use crate::dataplane::{DeviceKind, DeviceSpec, Kernel};
use crate::health::{self, Probes};
use crate::metrics::Metrics;
use crate::model::{Backend, Mac, Mode};
use crate::peers::validate::NodeInfo;
use crate::peers::{file, kube as kube_peers};
use crate::plan::Direct;
use crate::underlay::{self, Underlay};

/// What the agent knows about its own node before it can program anything.
pub struct Own {
    pub pod_cidrs: Vec<IpNet>,
    pub mac: Option<Mac>,
    pub node_ips: Vec<std::net::IpAddr>,
}

pub struct Context {
    pub args: RunArgs,
    pub node_name: String,
    pub metrics: Arc<Metrics>,
    pub probes: Arc<Probes>,
    /// None when peers come from `--peers-file`.
    pub nodes_api: Option<Api<Node>>,
    pub own: Own,
    pub underlay: Underlay,
    pub mtu: u32,
    pub device: DeviceSpec,
    pub direct: Option<Direct>,
}

impl Context {
    /// The context, and the kernel with the device set up once (the engine takes it).
    pub async fn build(args: RunArgs) -> anyhow::Result<(Context, NetlinkKernel)> {
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

        let nodes_api = match &args.peers_file {
            Some(_) => None,
            None => Some(Api::all(weir_common::kube_client(&args.api).await?)),
        };
        let own = match (&nodes_api, &args.peers_file) {
            (Some(api), _) => own_from_api(api, &node_name, &probes).await?,
            (None, Some(path)) => {
                own_from_file(&file::read(path, args.backend).map_err(anyhow::Error::msg)?, &node_name)?
            }
            (None, None) => unreachable!("either the API or a peers file"),
        };

        let mut kernel =
            NetlinkKernel::connect().context("open netlink socket")?.with_sysctl_net_dir(&args.sysctl_net_dir);
        let underlay = underlay::select(&kernel.handle(), args.public_ip, args.iface.as_deref(), &own.node_ips).await?;
        let mtu = args.mtu.unwrap_or(underlay.mtu - overhead(args.backend, &underlay));
        let device = device_spec(&args, &own, &underlay, mtu);
        info!(
            version = env!("CARGO_PKG_VERSION"), backend = args.backend.as_str(), mode = mode_str(args.mode),
            node = %node_name, underlay_iface = %underlay.ifname, underlay_ip = %underlay.ip, pod_cidrs = ?own.pod_cidrs,
            vni = args.vni, port = args.vxlan_port, mtu, device = %device.name, "weir-agent starting"
        );
        // A kernel without the device type, or a setting that cannot be set,
        // is not fixed by retrying: stop with the name of what is missing.
        match kernel.ensure_device(&device).await {
            Err(e) if e.is_fatal() => return Err(anyhow::anyhow!(e)),
            Err(e) => warn!(error = %e, "first device set-up failed; the engine will retry"),
            Ok(_) => {}
        }
        let direct = args.direct_routing.then_some(Direct { subnet: underlay.subnet, ifindex: underlay.ifindex });
        if let Some(d) = &direct {
            info!(subnet = %d.subnet, iface = %underlay.ifname, "direct routing to peers on the underlay subnet");
        }
        Ok((Context { args, node_name, metrics, probes, nodes_api, own, underlay, mtu, device, direct }, kernel))
    }
}

/// Bytes the encapsulation adds to every packet.
fn overhead(backend: Backend, underlay: &Underlay) -> u32 {
    match backend {
        Backend::Vxlan if underlay.ip.is_ipv4() => 50,
        Backend::Vxlan => 70,
        Backend::Ipip => 20,
    }
}

fn device_spec(args: &RunArgs, own: &Own, underlay: &Underlay, mtu: u32) -> DeviceSpec {
    let (name, kind) = match args.backend {
        Backend::Vxlan => (
            DeviceSpec::vxlan_name(args.vni),
            DeviceKind::Vxlan { vni: args.vni, port: args.vxlan_port, on_demand: args.mode == Mode::OnDemand },
        ),
        Backend::Ipip => (DeviceSpec::IPIP_NAME.to_string(), DeviceKind::Ipip),
    };
    DeviceSpec {
        name,
        kind,
        local: underlay.ip,
        underlay_ifindex: underlay.ifindex,
        mtu,
        // Only a VXLAN device has an Ethernet address to keep.
        mac: own.mac.filter(|_| args.backend == Backend::Vxlan),
        addresses: own
            .pod_cidrs
            .iter()
            .map(|c| IpNet::new(c.network(), c.max_prefix_len()).expect("host prefix"))
            .collect(),
    }
}

pub fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Full => "full",
        Mode::OnDemand => "on-demand",
    }
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
            Err(e) => warn!(node = %name, error = weir_common::with_causes(&e), "cannot read own Node; retrying"),
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
