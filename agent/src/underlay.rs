//! Choosing the underlay: explicit IP, then interface name/regex, then the
//! default route's interface, then the Node's InternalIP.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::RouteAttribute;
use rtnetlink::{Handle, RouteMessageBuilder};

#[derive(Debug, Clone)]
pub struct Underlay {
    pub ifname: String,
    pub ifindex: u32,
    pub ip: IpAddr,
    /// The subnet `ip` is on (its address's prefix on the interface).
    pub subnet: IpNet,
    pub mtu: u32,
}

struct Iface {
    name: String,
    index: u32,
    mtu: u32,
    addrs: Vec<IpNet>,
}

impl Iface {
    fn has(&self, ip: IpAddr) -> bool {
        self.addrs.iter().any(|a| a.addr() == ip)
    }
}

async fn interfaces(h: &Handle) -> anyhow::Result<Vec<Iface>> {
    let mut out = Vec::new();
    let mut links = h.link().get().execute();
    while let Some(l) = links.try_next().await? {
        let mut i = Iface { name: String::new(), index: l.header.index, mtu: 1500, addrs: vec![] };
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => i.name = n.clone(),
                LinkAttribute::Mtu(m) => i.mtu = *m,
                _ => {}
            }
        }
        out.push(i);
    }
    let mut addrs = h.address().get().execute();
    while let Some(a) = addrs.try_next().await? {
        let ip = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let (Some(ip), Some(i)) = (ip, out.iter_mut().find(|i| i.index == a.header.index))
            && !ip.is_loopback()
            && !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
            && !i.has(ip)
            && let Ok(net) = IpNet::new(ip, a.header.prefix_len)
        {
            i.addrs.push(net);
        }
    }
    Ok(out)
}

async fn default_route_ifindex(h: &Handle) -> anyhow::Result<Option<u32>> {
    let mut routes = h.route().get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()).execute();
    while let Some(r) = routes.try_next().await? {
        if r.header.destination_prefix_length == 0
            && r.header.table == crate::dataplane::wire::RT_TABLE_MAIN
            && let Some(oif) = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        {
            return Ok(Some(oif));
        }
    }
    Ok(None)
}

fn pick(i: &Iface, ip: IpAddr) -> Underlay {
    let subnet = i.addrs.iter().find(|a| a.addr() == ip).map_or_else(|| IpNet::from(ip), IpNet::trunc);
    Underlay { ifname: i.name.clone(), ifindex: i.index, ip, subnet, mtu: i.mtu }
}

/// `node_ips` are the Node's InternalIPs, the last resort.
pub async fn select(
    h: &Handle,
    public_ip: Option<IpAddr>,
    iface: Option<&str>,
    node_ips: &[IpAddr],
) -> anyhow::Result<Underlay> {
    let ifaces = interfaces(h).await?;
    let owner = |ip: IpAddr| ifaces.iter().find(|i| i.has(ip));
    if let Some(ip) = public_ip {
        let i = owner(ip).ok_or_else(|| anyhow::anyhow!("--public-ip {ip} is not an address of any interface"))?;
        return Ok(pick(i, ip));
    }
    if let Some(pattern) = iface {
        let exact = ifaces.iter().find(|i| i.name == pattern);
        let found = match exact {
            Some(i) => Some(i),
            None => {
                let re = regex_lite::Regex::new(&format!("^(?:{pattern})$"))
                    .map_err(|e| anyhow::anyhow!("--iface {pattern:?} is not a name or regex: {e}"))?;
                ifaces.iter().find(|i| re.is_match(&i.name) && !i.addrs.is_empty())
            }
        };
        let i = found.ok_or_else(|| anyhow::anyhow!("--iface {pattern:?} matches no interface with an address"))?;
        let ip = i.addrs.first().ok_or_else(|| anyhow::anyhow!("interface {} has no address", i.name))?.addr();
        return Ok(pick(i, ip));
    }
    if let Some(idx) = default_route_ifindex(h).await?
        && let Some(i) = ifaces.iter().find(|i| i.index == idx)
        && let Some(ip) = i.addrs.iter().find(|a| a.addr().is_ipv4()).or(i.addrs.first())
    {
        return Ok(pick(i, ip.addr()));
    }
    for ip in node_ips {
        if let Some(i) = owner(*ip) {
            return Ok(pick(i, *ip));
        }
    }
    anyhow::bail!(
        "no underlay: set --public-ip or --iface (no default route, and no interface holds the Node's InternalIP)"
    )
}
