//! Batched netlink writes: many requests per sendmsg, no per-request ack.
//!
//! Requests go out without NLM_F_ACK, so the kernel answers only failures;
//! each chunk ends with an NLMSG_NOOP that does ask for an ack, and since a
//! socket's messages are handled in order, that ack means the whole chunk is
//! done. One round trip per chunk instead of one per entry.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::model::Mac;
use crate::plan::{Op, ROUTE_PROTOCOL};

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;
const RTM_GETNEXTHOP: u16 = 106;
const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const RTNH_F_ONLINK: u32 = 4;
const RT_TABLE_MAIN: u8 = 254;
/// Bytes of requests per sendmsg; well under the default socket send buffer.
const CHUNK: usize = 48 * 1024;

pub struct Batcher {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Batcher {
    pub fn new() -> std::io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        // Replies to a dump can be large; errors for a chunk must all fit.
        sock.set_rx_buf_sz(4 << 20)?;
        sock.set_ext_ack(false)?;
        // Lets dumps be filtered in the kernel (by device, table, protocol).
        sock.set_netlink_get_strict_chk(true)?;
        Ok(Batcher { sock, seq: 1, buf: vec![0; 256 * 1024] })
    }

    /// Sends the encoded requests in order; returns each one's errno, 0 for success.
    pub fn run(&mut self, requests: &[Vec<u8>]) -> std::io::Result<Vec<i32>> {
        let mut results = vec![0; requests.len()];
        let base = self.seq;
        self.seq = self.seq.wrapping_add(requests.len() as u32 + 1);
        let mut start = 0;
        while start < requests.len() {
            let mut chunk = Vec::with_capacity(CHUNK + 64);
            let mut end = start;
            while end < requests.len() && (end == start || chunk.len() + requests[end].len() <= CHUNK) {
                let mut req = requests[end].clone();
                set_seq(&mut req, base.wrapping_add(end as u32));
                chunk.extend_from_slice(&req);
                end += 1;
            }
            let barrier = self.seq;
            self.seq = self.seq.wrapping_add(1);
            chunk.extend_from_slice(&header(16, NLMSG_NOOP, NLM_F_REQUEST | NLM_F_ACK, barrier));
            self.sock.send_to(&chunk, &SocketAddr::new(0, 0), 0)?;
            self.read_until(|msg_type, seq, payload| {
                if msg_type != NLMSG_ERROR || payload.len() < 4 {
                    return false;
                }
                if seq == barrier {
                    return true;
                }
                let errno = -i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let idx = seq.wrapping_sub(base) as usize;
                if idx < results.len() {
                    results[idx] = errno;
                }
                false
            })?;
            start = end;
        }
        Ok(results)
    }

    /// Dumps weir's nexthop objects: None if the kernel has no nexthop support.
    pub fn dump_nexthops(&mut self) -> std::io::Result<Option<Vec<Nexthop>>> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut req = header(24, RTM_GETNEXTHOP, NLM_F_REQUEST | NLM_F_DUMP, seq).to_vec();
        req.extend_from_slice(&[0u8; 8]);
        self.sock.send_to(&req, &SocketAddr::new(0, 0), 0)?;
        let mut out = Vec::new();
        let mut unsupported = false;
        self.read_until(|msg_type, msg_seq, payload| {
            if msg_seq != seq {
                return false;
            }
            match msg_type {
                NLMSG_DONE => true,
                NLMSG_ERROR => {
                    unsupported =
                        payload.len() >= 4 && i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]) != 0;
                    true
                }
                RTM_NEWNEXTHOP => {
                    if let Some(nh) = parse_nexthop(payload) {
                        out.push(nh);
                    }
                    false
                }
                _ => false,
            }
        })?;
        Ok((!unsupported).then_some(out))
    }

    /// One dump request; calls `each(type, payload)` per reply message.
    fn dump(&mut self, msg_type: u16, body: &[u8], mut each: impl FnMut(u16, &[u8])) -> std::io::Result<()> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut req = header((16 + body.len()) as u32, msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq).to_vec();
        req.extend_from_slice(body);
        self.sock.send_to(&req, &SocketAddr::new(0, 0), 0)?;
        let mut error = 0;
        self.read_until(|t, s, payload| {
            if s != seq {
                return false;
            }
            match t {
                NLMSG_DONE => true,
                NLMSG_ERROR => {
                    error = if payload.len() >= 4 { -i32::from_ne_bytes(payload[0..4].try_into().unwrap()) } else { 0 };
                    true
                }
                t => {
                    each(t, payload);
                    false
                }
            }
        })?;
        if error != 0 { Err(std::io::Error::from_raw_os_error(error)) } else { Ok(()) }
    }

    /// Neighbours (or, with AF_BRIDGE, fdb entries) of one device, filtered by
    /// the kernel, parsed by hand: only the few fields weir compares.
    pub fn dump_neighbours(&mut self, family: u8, ifindex: u32) -> std::io::Result<Vec<RawNeigh>> {
        let mut body = vec![family, 0, 0, 0];
        // The fdb dump takes the device in the header; the neighbour dump in NDA_IFINDEX.
        let header_ifindex = if family == super::AF_BRIDGE { ifindex } else { 0 };
        body.extend_from_slice(&header_ifindex.to_ne_bytes());
        body.extend_from_slice(&[0u8; 4]);
        if family != super::AF_BRIDGE {
            attr(&mut body, libc::NDA_IFINDEX, &ifindex.to_ne_bytes());
        }
        let mut out = Vec::new();
        self.dump(libc::RTM_GETNEIGH, &body, |t, p| {
            if t == libc::RTM_NEWNEIGH
                && let Some(n) = parse_neigh(p)
                && n.ifindex == ifindex
            {
                out.push(n);
            }
        })?;
        Ok(out)
    }

    /// Main-table routes of one family, optionally only those of `protocol`
    /// (filtered by the kernel, which needs strict checking on).
    pub fn dump_routes(&mut self, family: u8, protocol: Option<u8>) -> std::io::Result<Vec<RawRoute>> {
        let mut body = vec![family, 0, 0, 0, RT_TABLE_MAIN, protocol.unwrap_or(0), 0, 0, 0, 0, 0, 0];
        attr(&mut body, libc::RTA_TABLE, &u32::from(RT_TABLE_MAIN).to_ne_bytes());
        let mut out = Vec::new();
        self.dump(libc::RTM_GETROUTE, &body, |t, p| {
            if t == libc::RTM_NEWROUTE
                && let Some(r) = parse_route(p)
                && r.table == u32::from(RT_TABLE_MAIN)
                && protocol.is_none_or(|proto| r.protocol == proto)
            {
                out.push(r);
            }
        })?;
        Ok(out)
    }

    /// Reads datagrams, calling `f(type, seq, payload)` per message until it returns true.
    fn read_until(&mut self, mut f: impl FnMut(u16, u32, &[u8]) -> bool) -> std::io::Result<()> {
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let mut off = 0;
            while off + 16 <= n {
                let b = &self.buf[off..n];
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                if len < 16 || len > b.len() {
                    break;
                }
                let msg_type = u16::from_ne_bytes([b[4], b[5]]);
                let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
                if f(msg_type, seq, &b[16..len]) {
                    return Ok(());
                }
                off += (len + 3) & !3;
            }
        }
    }
}

fn header(len: u32, msg_type: u16, flags: u16, seq: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&len.to_ne_bytes());
    h[4..6].copy_from_slice(&msg_type.to_ne_bytes());
    h[6..8].copy_from_slice(&flags.to_ne_bytes());
    h[8..12].copy_from_slice(&seq.to_ne_bytes());
    h
}

fn set_seq(req: &mut [u8], seq: u32) {
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
}

/// Sets a request's sequence number, and asks for an ack when `ack`.
pub fn stamp(req: &mut [u8], seq: u32, ack: bool) {
    set_seq(req, seq);
    if ack {
        let flags = u16::from_ne_bytes([req[6], req[7]]) | NLM_F_ACK;
        req[6..8].copy_from_slice(&flags.to_ne_bytes());
    }
}

/// (seq, errno) of each NLMSG_ERROR in a datagram; errno 0 is an ack.
pub fn acks(mut buf: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    while buf.len() >= 20 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        if u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR && len >= 20 {
            let errno = -i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            out.push((u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]), errno));
        }
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

fn pad(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
}

fn attr(v: &mut Vec<u8>, kind: u16, value: &[u8]) {
    v.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend_from_slice(value);
    pad(v);
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn family(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 2 } else { 10 }
}

/// A neighbour or fdb entry as dumped by the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawNeigh {
    pub ifindex: u32,
    pub state: u16,
    pub dst: Option<IpAddr>,
    pub lladdr: Option<Mac>,
    /// Clock ticks (USER_HZ) since the entry last carried a packet.
    pub used_ticks: Option<u32>,
}

/// A route as dumped by the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRoute {
    pub dst: IpNet,
    pub table: u32,
    pub protocol: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub nhid: Option<u32>,
}

/// Iterates (type, value) over the attributes in `p`.
fn attrs(p: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 4 > p.len() {
            return None;
        }
        let len = u16::from_ne_bytes([p[off], p[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([p[off + 2], p[off + 3]]) & 0x3fff;
        if len < 4 || off + len > p.len() {
            return None;
        }
        let v = &p[off + 4..off + len];
        off += (len + 3) & !3;
        Some((kind, v))
    })
}

fn ip_of(v: &[u8]) -> Option<IpAddr> {
    match v.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
        _ => None,
    }
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.try_into().ok()?))
}

fn parse_neigh(p: &[u8]) -> Option<RawNeigh> {
    if p.len() < 12 {
        return None;
    }
    let mut n = RawNeigh {
        ifindex: u32::from_ne_bytes(p[4..8].try_into().ok()?),
        state: u16::from_ne_bytes([p[8], p[9]]),
        dst: None,
        lladdr: None,
        used_ticks: None,
    };
    for (kind, v) in attrs(&p[12..]) {
        match kind {
            1 => n.dst = ip_of(v),
            2 if v.len() == 6 => n.lladdr = Some(Mac([v[0], v[1], v[2], v[3], v[4], v[5]])),
            3 if v.len() >= 8 => n.used_ticks = u32_of(&v[4..8]),
            _ => {}
        }
    }
    Some(n)
}

fn parse_route(p: &[u8]) -> Option<RawRoute> {
    if p.len() < 12 {
        return None;
    }
    let (family, dst_len) = (p[0], p[1]);
    let mut r = RawRoute {
        dst: IpNet::new(if family == 2 { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u8; 16]) }, dst_len).ok()?,
        table: u32::from(p[4]),
        protocol: p[5],
        gateway: None,
        oif: None,
        nhid: None,
    };
    for (kind, v) in attrs(&p[12..]) {
        match kind {
            1 => r.dst = IpNet::new(ip_of(v)?, dst_len).ok()?,
            4 => r.oif = u32_of(v),
            5 => r.gateway = ip_of(v),
            15 => r.table = u32_of(v)?,
            30 => r.nhid = u32_of(v),
            _ => {}
        }
    }
    Some(r)
}

/// A nexthop object as dumped by the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nexthop {
    pub id: u32,
    pub gateway: IpAddr,
    pub oif: u32,
    pub protocol: u8,
}

fn parse_nexthop(p: &[u8]) -> Option<Nexthop> {
    if p.len() < 8 {
        return None;
    }
    let protocol = p[2];
    let (mut id, mut gw, mut oif) = (None, None, None);
    let mut off = 8;
    while off + 4 <= p.len() {
        let len = u16::from_ne_bytes([p[off], p[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([p[off + 2], p[off + 3]]);
        if len < 4 || off + len > p.len() {
            break;
        }
        let v = &p[off + 4..off + len];
        match (kind, v.len()) {
            (NHA_ID, 4) => id = Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]])),
            (NHA_OIF, 4) => oif = Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]])),
            (NHA_GATEWAY, 4) => gw = Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
            (NHA_GATEWAY, 16) => gw = Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Some(Nexthop { id: id?, gateway: gw?, oif: oif.unwrap_or(0), protocol })
}

fn encode(msg: RouteNetlinkMessage, flags: u16) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    nl.finalize();
    let mut out = vec![0; nl.buffer_len()];
    nl.serialize(&mut out);
    pad(&mut out);
    out
}

const PUT: u16 = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE;

fn neigh(ifindex: u32, family: AddressFamily, dst: IpAddr, mac: Mac, fdb: bool) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Permanent;
    if fdb {
        m.header.flags = NeighbourFlags::Own;
    }
    m.header.kind = RouteType::Unicast;
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    m.attributes.push(NeighbourAttribute::Destination(dst.into()));
    m
}

fn route(ifindex: u32, dst: IpNet, gateway: IpAddr, nhid: Option<u32>, for_delete: bool) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = if dst.addr().is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    m.attributes.push(RouteAttribute::Destination(RouteAddress::from(dst.network())));
    if for_delete {
        return m;
    }
    match nhid {
        Some(id) => m.attributes.push(RouteAttribute::NhId(id)),
        None => {
            m.header.flags = netlink_packet_route::route::RouteFlags::Onlink;
            m.attributes.push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
            m.attributes.push(RouteAttribute::Oif(ifindex));
        }
    }
    m
}

fn nexthop(msg_type: u16, flags: u16, ifindex: u32, id: u32, gateway: &IpAddr) -> Vec<u8> {
    // A delete must leave protocol, scope and flags zero or the kernel refuses it.
    let protocol = if msg_type == RTM_NEWNEXTHOP { ROUTE_PROTOCOL } else { 0 };
    let mut body = vec![family(gateway), 0, protocol, 0];
    body.extend_from_slice(&(if msg_type == RTM_NEWNEXTHOP { RTNH_F_ONLINK } else { 0 }).to_ne_bytes());
    attr(&mut body, NHA_ID, &id.to_ne_bytes());
    if msg_type == RTM_NEWNEXTHOP {
        attr(&mut body, NHA_OIF, &ifindex.to_ne_bytes());
        attr(&mut body, NHA_GATEWAY, &ip_bytes(gateway));
    }
    let mut out = header((16 + body.len()) as u32, msg_type, flags, 0).to_vec();
    out.extend_from_slice(&body);
    out
}

/// The netlink request for one op on the device `ifindex`.
pub fn encode_op(ifindex: u32, op: &Op) -> Vec<u8> {
    use RouteNetlinkMessage as R;
    let del = NLM_F_REQUEST;
    match *op {
        Op::PutFdb { mac, dst } => encode(R::NewNeighbour(neigh(ifindex, AddressFamily::Bridge, dst, mac, true)), PUT),
        Op::DelFdb { mac, dst } => encode(R::DelNeighbour(neigh(ifindex, AddressFamily::Bridge, dst, mac, true)), del),
        Op::PutNeigh { ip, mac } => {
            let fam = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
            encode(R::NewNeighbour(neigh(ifindex, fam, ip, mac, false)), PUT)
        }
        Op::DelNeigh { ip, mac } => {
            let fam = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
            encode(R::DelNeighbour(neigh(ifindex, fam, ip, mac, false)), del)
        }
        Op::PutNexthop { id, gateway } => nexthop(RTM_NEWNEXTHOP, PUT, ifindex, id, &gateway),
        Op::DelNexthop { id, gateway } => nexthop(RTM_DELNEXTHOP, del, ifindex, id, &gateway),
        Op::PutRoute { dst, gateway, nhid } => encode(R::NewRoute(route(ifindex, dst, gateway, nhid, false)), PUT),
        Op::DelRoute { dst, gateway } => encode(R::DelRoute(route(ifindex, dst, gateway, None, true)), del),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nexthop_request_layout() {
        let gw: IpAddr = "10.244.2.0".parse().unwrap();
        let b = nexthop(RTM_NEWNEXTHOP, PUT, 7, 42, &gw);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize, b.len());
        assert_eq!(b[16], 2, "AF_INET");
        assert_eq!(b[18], ROUTE_PROTOCOL);
        assert_eq!(u32::from_ne_bytes(b[20..24].try_into().unwrap()), RTNH_F_ONLINK);
        let parsed = parse_nexthop(&b[16..]).unwrap();
        assert_eq!(parsed, Nexthop { id: 42, gateway: gw, oif: 7, protocol: ROUTE_PROTOCOL });
    }

    #[test]
    fn every_request_is_aligned() {
        let mac: Mac = "0e:00:00:00:00:01".parse().unwrap();
        let ops = [
            Op::PutFdb { mac, dst: "198.18.0.1".parse().unwrap() },
            Op::PutNeigh { ip: "fd00::".parse().unwrap(), mac },
            Op::PutRoute { dst: "10.244.2.0/24".parse().unwrap(), gateway: "10.244.2.0".parse().unwrap(), nhid: None },
            Op::DelRoute { dst: "10.244.2.0/24".parse().unwrap(), gateway: "10.244.2.0".parse().unwrap() },
        ];
        for op in ops {
            let b = encode_op(3, &op);
            assert_eq!(b.len() % 4, 0, "{op}");
            assert!(u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize <= b.len());
        }
    }
}
