//! The real `Kernel`: rtnetlink for the device and dumps, and the batched
//! writer (`batch.rs`) for fdb, neighbour, nexthop and route entries.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour_table::{NeighbourTableAttribute, NeighbourTableMessage, NeighbourTableParameter};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkIpIp, LinkUnspec, LinkVxlan};
use tracing::info;

use super::batch::Batcher;
use super::device::{FoundDevice, FoundKind};
use super::wire::{RT_TABLE_MAIN, encode_op};
use super::{AF_BRIDGE, AF_INET, AF_INET6};
use super::{DeviceAction, DeviceFix, DeviceKind, DeviceSpec, DeviceStatus, Kernel, KernelError, OpResult};
use crate::model::Mac;
use crate::plan::{KernelState, Op, ROUTE_PROTOCOL};

use libc::{ENODEV, ENOENT, EOPNOTSUPP, ESRCH};

/// Up to this many entries (or lookups), a batch runs on the calling task.
const INLINE: usize = 16;

pub struct NetlinkKernel {
    handle: Handle,
    /// The batched writer; taken out while a blocking batch runs.
    batcher: Option<Batcher>,
    /// A second socket so route and neighbour dumps run in parallel.
    second: Option<Batcher>,
    /// Where `net.*` sysctls are written. Inside a container /proc/sys is
    /// read-only and runc refuses mounts inside /proc, so the DaemonSet mounts
    /// the host's /proc/sys/net elsewhere; net sysctls follow the network
    /// namespace of whoever opens the file, so that path is the node's.
    sysctl_net_dir: PathBuf,
    /// The ifindex whose settings are in force. `ensure_device` runs on every
    /// pass; the settings belong to the device, so they are written once per
    /// device (a recreated one has a new ifindex) and a no-op pass writes
    /// nothing.
    settings_applied_for: Option<u32>,
}

/// `app_solicit`: how many times the neighbour code asks userspace (an
/// RTM_GETNEIGH miss) before giving up on an address.
const APP_PROBES: u32 = 3;
const APP_PROBES_FIX: &str = "the agent needs CAP_NET_ADMIN in the node's network namespace";

impl NetlinkKernel {
    /// Opens a socket in the calling thread's network namespace.
    pub fn connect() -> std::io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(NetlinkKernel {
            handle,
            batcher: Some(Batcher::new()?),
            second: Some(Batcher::new()?),
            sysctl_net_dir: PathBuf::from("/proc/sys/net"),
            settings_applied_for: None,
        })
    }

    pub fn with_sysctl_net_dir(mut self, dir: &Path) -> Self {
        self.sysctl_net_dir = dir.to_path_buf();
        self
    }

    /// Per-device settings weir depends on. Each takes effect or the call
    /// fails naming it: without app_solicit on-demand mode never hears a
    /// routed miss, and a warning would leave it quietly broken.
    async fn apply_device_settings(&self, spec: &DeviceSpec, ifindex: u32) -> Result<(), KernelError> {
        if matches!(spec.kind, DeviceKind::Vxlan { on_demand: true, .. }) {
            self.set_app_probes("arp_cache", AddressFamily::Inet, ifindex).await?;
            if spec.addresses.iter().any(|a| a.addr().is_ipv6()) {
                self.set_app_probes("ndisc_cache", AddressFamily::Inet6, ifindex).await?;
            }
        }
        // accept_ra has no netlink setter. Router advertisements arriving
        // over the overlay must not add routes or addresses to weir's device.
        let path = self.sysctl_net_dir.join(format!("ipv6/conf/{}/accept_ra", spec.name));
        match std::fs::write(&path, "0") {
            Ok(()) => Ok(()),
            // No IPv6 on this node: there is nothing to accept RAs on.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(KernelError::Setting {
                setting: format!("net.ipv6.conf.{}.accept_ra=0", spec.name),
                error: format!("{}: {e}", path.display()),
                fix: "mount the host's /proc/sys/net outside /proc (the DaemonSet uses /host/proc/sys/net) and \
                      point --sysctl-net-dir (WEIR_SYSCTL_NET_DIR) at it",
            }),
        }
    }

    /// `ip ntable change name <table> dev <ifindex> app_probes 3`: the
    /// per-device `app_solicit` sysctl, set over rtnetlink so that it needs
    /// no writable /proc.
    async fn set_app_probes(&self, table: &str, family: AddressFamily, ifindex: u32) -> Result<(), KernelError> {
        let mut msg = NeighbourTableMessage::default();
        msg.header.family = family;
        msg.attributes.push(NeighbourTableAttribute::Name(table.to_string()));
        msg.attributes.push(NeighbourTableAttribute::Parms(vec![
            NeighbourTableParameter::Ifindex(ifindex),
            NeighbourTableParameter::AppProbes(APP_PROBES),
        ]));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::SetNeighbourTable(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let setting = || {
            format!(
                "{} app_solicit={APP_PROBES} (ip ntable change name {table} dev {ifindex} app_probes {APP_PROBES})",
                if family == AddressFamily::Inet { "net.ipv4.neigh.<dev>" } else { "net.ipv6.neigh.<dev>" }
            )
        };
        let mut replies = self.handle.clone().request(req).map_err(|e| KernelError::Setting {
            setting: setting(),
            error: e.to_string(),
            fix: APP_PROBES_FIX,
        })?;
        while let Some(reply) = replies.next().await {
            if let NetlinkPayload::Error(e) = reply.payload
                && let Some(code) = e.code
            {
                return Err(KernelError::Setting {
                    setting: setting(),
                    error: std::io::Error::from_raw_os_error(-code.get()).to_string(),
                    fix: APP_PROBES_FIX,
                });
            }
        }
        Ok(())
    }

    /// Runs `f` on the batcher off the async threads: a batch of thousands of
    /// entries keeps the kernel busy for tens of milliseconds. A small one
    /// (`inline`: a Node event's few entries) runs on the calling task: the
    /// kernel takes microseconds, less than waking another thread and
    /// waiting to be woken in turn, which on a busy node is what a Node
    /// event waited for.
    async fn with_batcher<T: Send + 'static>(
        &mut self,
        inline: bool,
        f: impl FnOnce(&mut Batcher) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, KernelError> {
        let mut batcher = match self.batcher.take() {
            Some(b) => b,
            None => Batcher::new().map_err(|e| KernelError::Other(format!("open netlink socket: {e}")))?,
        };
        let (batcher, result) = if inline {
            let r = f(&mut batcher);
            (batcher, r)
        } else {
            tokio::task::spawn_blocking(move || {
                let r = f(&mut batcher);
                (batcher, r)
            })
            .await
            .map_err(|e| KernelError::Other(format!("netlink batch task: {e}")))?
        };
        self.batcher = Some(batcher);
        result.map_err(|e| KernelError::Other(format!("netlink batch: {e}")))
    }

    /// The port of the socket every entry is written through, so that the
    /// notifications of weir's own writes can be dropped in the kernel.
    pub fn writer_port(&self) -> Option<u32> {
        self.batcher.as_ref().map(Batcher::port)
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, KernelError> {
        Ok(self.find_link(name).await?.map(|d| d.ifindex))
    }

    async fn find_link(&self, name: &str) -> Result<Option<FoundDevice>, KernelError> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(parse_link(&msg))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == ENODEV => Ok(None),
            Err(e) => Err(to_kernel_error(format!("ip link show {name}"), e)),
        }
    }

    async fn create(&self, spec: &DeviceSpec) -> Result<(), KernelError> {
        let msg = match spec.kind {
            DeviceKind::Vxlan { vni, port, on_demand } => {
                let mut b = LinkVxlan::new(&spec.name, vni)
                    .port(port)
                    .dev(spec.underlay_ifindex)
                    .learning(false)
                    .proxy(on_demand)
                    .l2miss(on_demand)
                    .l3miss(on_demand);
                b = match spec.local {
                    IpAddr::V4(ip) => b.local(ip),
                    IpAddr::V6(ip) => b.local6(ip),
                };
                let mut b = b.mtu(spec.mtu).up();
                if let Some(mac) = spec.mac {
                    b = b.address(mac.0.to_vec());
                }
                b.build()
            }
            DeviceKind::Ipip => {
                let IpAddr::V4(local) = spec.local else {
                    return Err(KernelError::Other("ipip needs an IPv4 underlay".into()));
                };
                LinkIpIp::new(&spec.name).local(local).mtu(spec.mtu).up().build()
            }
        };
        self.handle.link().add(msg).execute().await.map_err(|e| {
            if errno(&e) == EOPNOTSUPP {
                match spec.kind {
                    DeviceKind::Vxlan { .. } => KernelError::MissingDeviceType { kind: "vxlan", module: "vxlan" },
                    DeviceKind::Ipip => KernelError::MissingDeviceType { kind: "ipip", module: "ipip" },
                }
            } else {
                to_kernel_error(format!("ip link add {}", spec.name), e)
            }
        })
    }

    async fn fix_link(&self, spec: &DeviceSpec, found: &FoundDevice) -> Result<Vec<DeviceFix>, KernelError> {
        let mut fixed = Vec::new();
        let mut b = LinkUnspec::new_with_index(found.ifindex);
        if found.mtu != Some(spec.mtu) {
            fixed.push(DeviceFix::Mtu { was: found.mtu, now: spec.mtu });
            b = b.mtu(spec.mtu);
        }
        let ethernet = matches!(spec.kind, DeviceKind::Vxlan { .. });
        if let Some(mac) = spec.mac.filter(|m| ethernet && found.mac != Some(*m)) {
            fixed.push(DeviceFix::Mac { was: found.mac, now: mac });
            b = b.address(mac.0.to_vec());
        }
        if !found.up {
            fixed.push(DeviceFix::Up);
        }
        if !fixed.is_empty() {
            let msg = b.up().build();
            request(format!("ip link set {}", spec.name), self.handle.link().set(msg).execute()).await?;
        }
        Ok(fixed)
    }

    async fn sync_addresses(&self, spec: &DeviceSpec, ifindex: u32) -> Result<Vec<DeviceFix>, KernelError> {
        let mut present = Vec::new();
        let mut stale = Vec::new();
        let mut addrs = self.handle.address().get().set_link_index_filter(ifindex).execute();
        while let Some(msg) =
            addrs.try_next().await.map_err(|e| to_kernel_error(format!("ip addr show dev {}", spec.name), e))?
        {
            let Some(ip) = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            }) else {
                continue;
            };
            let net = IpNet::new(ip, msg.header.prefix_len).map_err(|e| KernelError::Other(e.to_string()))?;
            if spec.addresses.contains(&net) {
                present.push(net);
            } else if !is_link_local(&ip) {
                stale.push((net, msg));
            }
        }
        let mut fixed = Vec::new();
        for net in spec.addresses.iter().filter(|n| !present.contains(n)) {
            let add = self.handle.address().add(ifindex, net.addr(), net.prefix_len()).replace().execute();
            request(format!("ip addr replace {net} dev {}", spec.name), add).await?;
            fixed.push(DeviceFix::AddressAdded(*net));
        }
        for (net, msg) in stale {
            fixed.push(DeviceFix::AddressRemoved(net));
            request(format!("ip addr del {net} dev {}", spec.name), self.handle.address().del(msg).execute()).await?;
        }
        Ok(fixed)
    }
}

impl Kernel for NetlinkKernel {
    async fn ensure_device(&mut self, spec: &DeviceSpec) -> Result<DeviceStatus, KernelError> {
        let found = self.find_link(&spec.name).await?;
        let action = match &found {
            None => {
                self.create(spec).await?;
                DeviceAction::Created
            }
            Some(f) => match spec.incompatibility(f) {
                Some(reason) => {
                    info!(device = %spec.name, %reason, "recreating incompatible device");
                    request(format!("ip link del {}", spec.name), self.handle.link().del(f.ifindex).execute()).await?;
                    self.create(spec).await?;
                    DeviceAction::Recreated { reason }
                }
                None => DeviceAction::Adopted { fixed: self.fix_link(spec, f).await? },
            },
        };
        let now = self
            .find_link(&spec.name)
            .await?
            .ok_or_else(|| KernelError::Other(format!("{} vanished right after it was set up", spec.name)))?;
        let addr_fixes = self.sync_addresses(spec, now.ifindex).await?;
        if self.settings_applied_for != Some(now.ifindex) {
            self.apply_device_settings(spec, now.ifindex).await?;
            self.settings_applied_for = Some(now.ifindex);
        }
        let action = match action {
            DeviceAction::Adopted { mut fixed } => {
                fixed.extend(addr_fixes);
                DeviceAction::Adopted { fixed }
            }
            other => other,
        };
        Ok(DeviceStatus { ifindex: now.ifindex, mac: now.mac, action })
    }

    async fn dump(&mut self, ifindex: u32) -> Result<KernelState, KernelError> {
        // Six dumps, filtered in the kernel (device, table, protocol 87) and
        // parsed by hand, on two sockets in parallel: neighbour and route
        // dumps do not serialize against each other in the kernel. This is
        // what keeps a no-change resync at 5,000 peers to a few milliseconds.
        let mut second = match self.second.take() {
            Some(b) => b,
            None => Batcher::new().map_err(|e| KernelError::Other(format!("open netlink socket: {e}")))?,
        };
        let routes = tokio::task::spawn_blocking(move || {
            let r = (|| {
                let mut routes = second.dump_routes(AF_INET, Some(ROUTE_PROTOCOL))?;
                routes.extend(second.dump_routes(AF_INET6, Some(ROUTE_PROTOCOL))?);
                Ok::<_, std::io::Error>((routes, second.dump_nexthops()?))
            })();
            (second, r)
        });
        let neighbours = self
            .with_batcher(false, move |b| {
                let fdb = b.dump_neighbours(AF_BRIDGE, ifindex)?;
                let mut neigh = b.dump_neighbours(AF_INET, ifindex)?;
                neigh.extend(b.dump_neighbours(AF_INET6, ifindex)?);
                Ok((fdb, neigh))
            })
            .await;
        let (second, routes) = routes.await.map_err(|e| KernelError::Other(format!("netlink dump task: {e}")))?;
        self.second = Some(second);
        let (fdb, neigh) = neighbours?;
        let (routes, nexthops) = routes.map_err(|e| KernelError::Other(format!("netlink dump: {e}")))?;

        let mut state = KernelState::default();
        for n in fdb {
            if let (true, Some(ip), Some(mac)) = (n.state & libc::NUD_PERMANENT != 0, n.dst, n.lladdr) {
                state.fdb.insert((mac, ip));
                if let Some(t) = n.used_ticks {
                    state.fdb_idle.insert(mac, std::time::Duration::from_millis(u64::from(t) * 10));
                }
            }
        }
        for n in neigh {
            if let (true, Some(ip), Some(mac)) = (n.state & libc::NUD_PERMANENT != 0, n.dst, n.lladdr) {
                state.neigh.insert(ip, mac);
            }
        }
        for r in routes {
            if let Some(id) = r.nhid {
                state.route_nhid.insert(r.dst, id);
            }
            // A route of ours without gateway or device is not one weir wrote;
            // the sentinel makes the diff replace it.
            let value = match (r.gateway, r.oif) {
                (Some(gw), Some(oif)) => (gw, oif),
                _ => (r.dst.network(), 0),
            };
            state.routes.insert(r.dst, value);
        }
        state.nexthops = nexthops.map(|nhs| {
            nhs.into_iter().filter(|nh| nh.protocol == ROUTE_PROTOCOL).map(|nh| (nh.id, (nh.gateway, nh.oif))).collect()
        });
        Ok(state)
    }

    async fn foreign_routes(&mut self) -> Result<BTreeSet<IpNet>, KernelError> {
        self.with_batcher(false, |b| {
            let mut out = BTreeSet::new();
            for family in [AF_INET, AF_INET6] {
                out.extend(
                    b.dump_routes(family, None)?.into_iter().filter(|r| r.protocol != ROUTE_PROTOCOL).map(|r| r.dst),
                );
            }
            Ok(out)
        })
        .await
    }

    async fn foreign_among(&mut self, prefixes: &[IpNet]) -> Result<BTreeSet<IpNet>, KernelError> {
        let inline = prefixes.len() <= INLINE;
        let prefixes = prefixes.to_vec();
        self.with_batcher(inline, move |b| {
            let mut out = BTreeSet::new();
            for p in prefixes {
                if let Some(r) = b.route_for(p.network())?
                    && r.dst == p
                    && r.table == u32::from(RT_TABLE_MAIN)
                    && r.protocol != ROUTE_PROTOCOL
                {
                    out.insert(p);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn apply(&mut self, ifindex: u32, ops: &[Op]) -> Vec<OpResult> {
        // Ops arrive sorted by phase, and one socket's requests are handled in
        // order, so a single batch keeps fdb before neighbour before route.
        let requests: Vec<Vec<u8>> = ops.iter().map(|op| encode_op(ifindex, op)).collect();
        match self.with_batcher(requests.len() <= INLINE, move |b| b.run(&requests)).await {
            Ok(errnos) => ops
                .iter()
                .zip(errnos)
                .map(|(op, errno)| match errno {
                    0 => Ok(()),
                    // Something removed it first: the goal is reached.
                    ENOENT | ESRCH if op.is_delete() => Ok(()),
                    errno => Err(KernelError::Errno { what: op.to_string(), errno }),
                })
                .collect(),
            Err(e) => ops.iter().map(|_| Err(e.clone())).collect(),
        }
    }
}

/// Removes a device by name; used by `weir-agent cleanup`. Absent is fine.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, KernelError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    let index = match links.try_next().await {
        Ok(Some(msg)) => msg.header.index,
        Ok(None) => return Ok(false),
        Err(e) if errno(&e) == ENODEV => return Ok(false),
        Err(e) => return Err(to_kernel_error(format!("ip link show {name}"), e)),
    };
    request(format!("ip link del {name}"), handle.link().del(index).execute()).await?;
    Ok(true)
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

pub(crate) fn errno(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(m) => -m.raw_code(),
        _ => 0,
    }
}

/// Awaits one rtnetlink request; a failure names it as the iproute2
/// command an operator would type.
async fn request(
    what: String,
    request: impl std::future::Future<Output = Result<(), rtnetlink::Error>>,
) -> Result<(), KernelError> {
    request.await.map_err(|e| to_kernel_error(what, e))
}

fn to_kernel_error(what: String, e: rtnetlink::Error) -> KernelError {
    match errno(&e) {
        0 => KernelError::Other(format!("{what}: {e}")),
        errno => KernelError::Errno { what, errno },
    }
}

fn parse_link(msg: &LinkMessage) -> FoundDevice {
    let mut found = FoundDevice {
        ifindex: msg.header.index,
        kind: None,
        local: None,
        link: None,
        mtu: None,
        mac: None,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::Mtu(m) => found.mtu = Some(*m),
            LinkAttribute::Address(a) if a.len() == 6 => {
                found.mac = Some(Mac([a[0], a[1], a[2], a[3], a[4], a[5]]));
            }
            LinkAttribute::LinkInfo(infos) => parse_link_info(infos, &mut found),
            _ => {}
        }
    }
    found
}

fn parse_link_info(infos: &[LinkInfo], found: &mut FoundDevice) {
    for info in infos {
        match info {
            LinkInfo::Kind(InfoKind::Vxlan) if found.kind.is_none() => {
                found.kind = Some(FoundKind::Vxlan { vni: 0, port: 0, learning: true, miss: false });
            }
            LinkInfo::Kind(InfoKind::IpIp) => found.kind = Some(FoundKind::Ipip),
            LinkInfo::Kind(other) => found.kind = Some(FoundKind::Other(format!("{other:?}"))),
            LinkInfo::Data(InfoData::Vxlan(attrs)) => {
                let (mut vni, mut port, mut learning, mut miss) = (0, 0, true, false);
                for a in attrs {
                    match a {
                        InfoVxlan::Id(v) => vni = *v,
                        InfoVxlan::Port(p) => port = *p,
                        InfoVxlan::Learning(l) => learning = *l,
                        InfoVxlan::L3Miss(m) => miss = *m,
                        InfoVxlan::Local(ip) => found.local = Some(IpAddr::V4(*ip)),
                        InfoVxlan::Local6(ip) => found.local = Some(IpAddr::V6(*ip)),
                        InfoVxlan::Link(l) => found.link = Some(*l),
                        _ => {}
                    }
                }
                found.kind = Some(FoundKind::Vxlan { vni, port, learning, miss });
            }
            LinkInfo::Data(InfoData::IpTunnel(attrs)) => {
                for a in attrs {
                    if let netlink_packet_route::link::InfoIpTunnel::Local(ip) = a {
                        found.local = Some(*ip);
                    }
                }
            }
            _ => {}
        }
    }
}
