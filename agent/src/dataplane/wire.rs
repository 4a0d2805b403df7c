//! netlink's wire format, in one place: walking the messages of a datagram,
//! reading the few fields weir compares, and writing the requests it sends.
//!
//! Messages and attributes are walked by hand, here: the miss responder
//! walks them while the first packet to a peer waits, after it has slept,
//! and netlink-packet-core's `NetlinkBuffer` and `NlasIterator` were cold
//! code in another crate that cost it microseconds (BENCHMARKS.md, B5).
//! Fixed headers are read with netlink-packet-route's types where the path
//! is not the first packet's, by libc's constant names.
//! The kernel constants neither names are defined below with the header they
//! come from. Requests on the first packet's path (neighbour and fdb entries)
//! are written by hand into a reused buffer, as the miss responder needs
//! them without allocating; routes go through netlink-packet-route.

use std::net::IpAddr;

use ipnet::IpNet;
use libc::{NDA_CACHEINFO, NDA_DST, NDA_LLADDR, NLM_F_DUMP, RTA_DST, RTA_GATEWAY, RTA_OIF, RTA_TABLE, RTM_NEWNEIGH};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::neighbour::NeighbourHeader;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::{AF_BRIDGE, AF_INET, AF_INET6};
use crate::model::Mac;
use crate::plan::{Dev, Op, ROUTE_PROTOCOL, RouteTo};

pub const NLMSG_NOOP: u16 = libc::NLMSG_NOOP as u16;
pub const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
pub const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
pub const RT_TABLE_MAIN: u8 = libc::RT_TABLE_MAIN;
// include/uapi/linux/rtnetlink.h and nexthop.h; libc names none of them.
pub const RTM_NEWNEXTHOP: u16 = 104;
pub const RTM_DELNEXTHOP: u16 = 105;
pub const RTM_GETNEXTHOP: u16 = 106;
const RTA_NH_ID: u16 = 30;
const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const RTNH_F_ONLINK: u32 = 4;
const RTM_F_FIB_MATCH: u32 = 0x2000;

const HEADER_LEN: usize = 16;
const NEIGHBOUR_HEADER_LEN: usize = 12;
const ROUTE_HEADER_LEN: usize = 12;
const NEXTHOP_HEADER_LEN: usize = 8;
const NLA_HEADER_LEN: usize = 4;
const NLA_TYPE_MASK: u16 = !((libc::NLA_F_NESTED | libc::NLA_F_NET_BYTEORDER) as u16);

/// The one-byte address family of an IP address.
pub fn family(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { AF_INET } else { AF_INET6 }
}

/// One message of a datagram.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

impl Message<'_> {
    /// For NLMSG_ERROR: the errno (positive), 0 for an ack.
    pub fn error(&self) -> Option<i32> {
        (self.kind == NLMSG_ERROR && self.payload.len() >= 4).then(|| -(u32_at(self.payload, 0) as i32))
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Messages and attributes start on 4-byte boundaries.
fn aligned(len: usize) -> usize {
    (len + 3) & !3
}

/// The messages of a datagram, each checked against its length; a
/// malformed header ends the walk with an error.
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = Result<Message<'_>, String>> {
    std::iter::from_fn(move || {
        if buf.len() < HEADER_LEN {
            return None;
        }
        // struct nlmsghdr { len: u32, type: u16, flags: u16, seq: u32, pid: u32 }
        let len = u32_at(buf, 0) as usize;
        if len < HEADER_LEN || len > buf.len() {
            let available = buf.len();
            buf = &[];
            return Some(Err(format!("netlink header: message length {len} in {available} bytes")));
        }
        let item = Message { kind: u16_at(buf, 4), seq: u32_at(buf, 8), payload: &buf[HEADER_LEN..len] };
        buf = &buf[aligned(len).min(buf.len())..];
        Some(Ok(item))
    })
}

/// The attributes after a fixed-size header, as (kind, value), each value
/// borrowed from the datagram. An attribute whose length does not fit ends
/// the walk.
pub fn attributes(payload: &[u8], header_len: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = payload.get(header_len..).unwrap_or_default();
    std::iter::from_fn(move || {
        if rest.len() < NLA_HEADER_LEN {
            return None;
        }
        // struct nlattr { len: u16, type: u16 }; the type's top bits are flags.
        let len = usize::from(u16_at(rest, 0));
        if len < NLA_HEADER_LEN || len > rest.len() {
            rest = &[];
            return None;
        }
        let item = (u16_at(rest, 2) & NLA_TYPE_MASK, &rest[NLA_HEADER_LEN..len]);
        rest = &rest[aligned(len).min(rest.len())..];
        Some(item)
    })
}

pub fn ip_of(v: &[u8]) -> Option<IpAddr> {
    match v.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
        _ => None,
    }
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.try_into().ok()?))
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

pub fn parse_neigh(payload: &[u8]) -> Option<RawNeigh> {
    let h = NeighbourHeader::parse(payload).ok()?;
    let mut n = RawNeigh { ifindex: h.ifindex, state: h.state.into(), dst: None, lladdr: None, used_ticks: None };
    for (kind, v) in attributes(payload, NEIGHBOUR_HEADER_LEN) {
        match kind {
            NDA_DST => n.dst = ip_of(v),
            NDA_LLADDR => n.lladdr = <[u8; 6]>::try_from(v).ok().map(Mac),
            // struct nda_cacheinfo { confirmed, used, updated, refcnt }
            NDA_CACHEINFO if v.len() >= 8 => n.used_ticks = u32_of(&v[4..8]),
            _ => {}
        }
    }
    Some(n)
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

pub fn parse_route(payload: &[u8]) -> Option<RawRoute> {
    let h = RouteHeader::parse(payload).ok()?;
    let any = if h.address_family == AddressFamily::Inet { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u8; 16]) };
    let mut r = RawRoute {
        dst: IpNet::new(any, h.destination_prefix_length).ok()?,
        table: u32::from(h.table),
        protocol: h.protocol.into(),
        gateway: None,
        oif: None,
        nhid: None,
    };
    for (kind, v) in attributes(payload, ROUTE_HEADER_LEN) {
        match kind {
            RTA_DST => r.dst = IpNet::new(ip_of(v)?, h.destination_prefix_length).ok()?,
            RTA_OIF => r.oif = u32_of(v),
            RTA_GATEWAY => r.gateway = ip_of(v),
            RTA_TABLE => r.table = u32_of(v)?,
            RTA_NH_ID => r.nhid = u32_of(v),
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

/// struct nhmsg { family, scope, protocol, resvd, flags }, then attributes.
pub fn parse_nexthop(payload: &[u8]) -> Option<Nexthop> {
    let protocol = *payload.get(2)?;
    let (mut id, mut gateway, mut oif) = (None, None, None);
    for (kind, v) in attributes(payload, NEXTHOP_HEADER_LEN) {
        match kind {
            NHA_ID => id = u32_of(v),
            NHA_OIF => oif = u32_of(v),
            NHA_GATEWAY => gateway = ip_of(v),
            _ => {}
        }
    }
    Some(Nexthop { id: id?, gateway: gateway?, oif: oif.unwrap_or(0), protocol })
}

/// A netlink header; `len` covers the header and what follows it.
pub fn header(len: usize, kind: u16, flags: u16, seq: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    h[4..6].copy_from_slice(&kind.to_ne_bytes());
    h[6..8].copy_from_slice(&flags.to_ne_bytes());
    h[8..12].copy_from_slice(&seq.to_ne_bytes());
    h
}

/// Renumbers an encoded request.
pub fn set_seq(req: &mut [u8], seq: u32) {
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
}

fn pad(v: &mut Vec<u8>) {
    v.resize(v.len().next_multiple_of(4), 0);
}

pub fn attr(v: &mut Vec<u8>, kind: u16, value: &[u8]) {
    v.extend_from_slice(&((NLA_HEADER_LEN + value.len()) as u16).to_ne_bytes());
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend_from_slice(value);
    pad(v);
}

pub fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// A dump request: a header and the family-specific body.
pub fn dump_request(kind: u16, body: &[u8], seq: u32) -> Vec<u8> {
    let mut req = header(HEADER_LEN + body.len(), kind, NLM_F_REQUEST | NLM_F_DUMP as u16, seq).to_vec();
    req.extend_from_slice(body);
    req
}

/// `ip route get fibmatch ADDR`: which route a lookup of `addr` matches.
/// Strict checking wants the header's table, protocol, scope and type zero.
pub fn fib_match_request(addr: IpAddr, seq: u32) -> Vec<u8> {
    let full = if addr.is_ipv4() { 32 } else { 128 };
    let mut body = vec![family(&addr), full, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&RTM_F_FIB_MATCH.to_ne_bytes());
    attr(&mut body, RTA_DST, &ip_bytes(&addr));
    let mut req = header(HEADER_LEN + body.len(), libc::RTM_GETROUTE, NLM_F_REQUEST, seq).to_vec();
    req.extend_from_slice(&body);
    req
}

/// Requests that create or replace.
const PUT: u16 = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE;

/// Appends one permanent neighbour request: an fdb entry (`family`
/// AF_BRIDGE, flag NTF_SELF: VTEP MAC -> underlay IP) or a neighbour (gateway
/// -> VTEP MAC). `put` replaces, otherwise it deletes. With `ack` the kernel
/// acks it; errors come back either way.
#[allow(clippy::too_many_arguments)]
pub fn push_neighbour(
    out: &mut Vec<u8>,
    ifindex: u32,
    family: u8,
    mac: Mac,
    dst: IpAddr,
    seq: u32,
    put: bool,
    ack: bool,
) {
    let kind = if put { RTM_NEWNEIGH } else { libc::RTM_DELNEIGH };
    let flags = if put { PUT } else { NLM_F_REQUEST } | if ack { NLM_F_ACK } else { 0 };
    let ntf = if family == AF_BRIDGE { libc::NTF_SELF } else { 0 };
    let dst_len = if dst.is_ipv4() { 4 } else { 16 };
    // ndmsg, NDA_LLADDR (6 bytes, padded to 8), NDA_DST
    let len = HEADER_LEN + NEIGHBOUR_HEADER_LEN + NLA_HEADER_LEN + 8 + NLA_HEADER_LEN + dst_len;
    out.extend_from_slice(&header(len, kind, flags, seq));
    out.extend_from_slice(&[family, 0, 0, 0]);
    out.extend_from_slice(&ifindex.to_ne_bytes());
    out.extend_from_slice(&libc::NUD_PERMANENT.to_ne_bytes());
    out.extend_from_slice(&[ntf, libc::RTN_UNICAST]);
    out.extend_from_slice(&((NLA_HEADER_LEN + 6) as u16).to_ne_bytes());
    out.extend_from_slice(&NDA_LLADDR.to_ne_bytes());
    out.extend_from_slice(&mac.0);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&((NLA_HEADER_LEN + dst_len) as u16).to_ne_bytes());
    out.extend_from_slice(&NDA_DST.to_ne_bytes());
    match dst {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

/// What identifies one of weir's routes: its prefix, table and protocol.
fn route_key(dst: IpNet) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = if dst.addr().is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    m.attributes.push(RouteAttribute::Destination(RouteAddress::from(dst.network())));
    m
}

fn route(overlay: u32, dst: IpNet, to: RouteTo, nhid: Option<u32>) -> RouteMessage {
    let mut m = route_key(dst);
    match nhid {
        Some(id) => m.attributes.push(RouteAttribute::NhId(id)),
        None => {
            // The overlay's gateway (the peer's pod CIDR address) is on no
            // link's subnet; a direct route's (the peer itself) is.
            if to.dev == Dev::Overlay {
                m.header.flags = netlink_packet_route::route::RouteFlags::Onlink;
            }
            m.attributes.push(RouteAttribute::Gateway(RouteAddress::from(to.gateway)));
            m.attributes.push(RouteAttribute::Oif(to.oif(overlay)));
        }
    }
    m
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

fn nexthop(put: bool, ifindex: u32, id: u32, gateway: &IpAddr) -> Vec<u8> {
    // A delete must leave protocol, scope and flags zero or the kernel refuses it.
    let (kind, flags, protocol, nh_flags) =
        if put { (RTM_NEWNEXTHOP, PUT, ROUTE_PROTOCOL, RTNH_F_ONLINK) } else { (RTM_DELNEXTHOP, NLM_F_REQUEST, 0, 0) };
    let mut body = vec![family(gateway), 0, protocol, 0];
    body.extend_from_slice(&nh_flags.to_ne_bytes());
    attr(&mut body, NHA_ID, &id.to_ne_bytes());
    if put {
        attr(&mut body, NHA_OIF, &ifindex.to_ne_bytes());
        attr(&mut body, NHA_GATEWAY, &ip_bytes(gateway));
    }
    let mut out = header(HEADER_LEN + body.len(), kind, flags, 0).to_vec();
    out.extend_from_slice(&body);
    out
}

/// The netlink request for one op on the device `ifindex`, numbered 0
/// (the caller numbers it) and asking for no ack.
pub fn encode_op(ifindex: u32, op: &Op) -> Vec<u8> {
    use RouteNetlinkMessage as R;
    let mut out = Vec::new();
    match *op {
        Op::PutFdb { mac, dst } => push_neighbour(&mut out, ifindex, AF_BRIDGE, mac, dst, 0, true, false),
        Op::DelFdb { mac, dst } => push_neighbour(&mut out, ifindex, AF_BRIDGE, mac, dst, 0, false, false),
        Op::PutNeigh { ip, mac } => push_neighbour(&mut out, ifindex, family(&ip), mac, ip, 0, true, false),
        Op::DelNeigh { ip, mac } => push_neighbour(&mut out, ifindex, family(&ip), mac, ip, 0, false, false),
        Op::PutNexthop { id, gateway } => out = nexthop(true, ifindex, id, &gateway),
        Op::DelNexthop { id, gateway } => out = nexthop(false, ifindex, id, &gateway),
        Op::PutRoute { dst, to, nhid } => out = encode(R::NewRoute(route(ifindex, dst, to, nhid)), PUT),
        Op::DelRoute { dst, .. } => out = encode(R::DelRoute(route_key(dst)), NLM_F_REQUEST),
    }
    out
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    };

    use super::*;

    #[test]
    fn nexthop_request_layout() {
        let gw: IpAddr = "10.244.2.0".parse().unwrap();
        let b = nexthop(true, 7, 42, &gw);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize, b.len());
        assert_eq!(b[16], AF_INET);
        assert_eq!(b[18], ROUTE_PROTOCOL);
        assert_eq!(u32::from_ne_bytes(b[20..24].try_into().unwrap()), RTNH_F_ONLINK);
        let parsed = parse_nexthop(&b[16..]).unwrap();
        assert_eq!(parsed, Nexthop { id: 42, gateway: gw, oif: 7, protocol: ROUTE_PROTOCOL });
    }

    #[test]
    fn every_request_is_aligned_and_walks_as_one_message() {
        let mac: Mac = "0e:00:00:00:00:01".parse().unwrap();
        let ops = [
            Op::PutFdb { mac, dst: "198.18.0.1".parse().unwrap() },
            Op::PutNeigh { ip: "fd00::".parse().unwrap(), mac },
            Op::PutRoute {
                dst: "10.244.2.0/24".parse().unwrap(),
                to: RouteTo { gateway: "10.244.2.0".parse().unwrap(), dev: Dev::Overlay },
                nhid: None,
            },
            Op::PutRoute {
                dst: "10.244.3.0/24".parse().unwrap(),
                to: RouteTo { gateway: "198.18.0.13".parse().unwrap(), dev: Dev::Underlay(2) },
                nhid: None,
            },
            Op::DelRoute { dst: "10.244.2.0/24".parse().unwrap(), gateway: "10.244.2.0".parse().unwrap() },
            Op::DelNexthop { id: 9, gateway: "10.244.2.0".parse().unwrap() },
        ];
        let mut datagram = Vec::new();
        for op in &ops {
            let b = encode_op(3, op);
            assert_eq!(b.len() % 4, 0, "{op}");
            datagram.extend_from_slice(&b);
        }
        assert_eq!(messages(&datagram).filter(Result::is_ok).count(), ops.len());
    }

    /// The hand-written neighbour request is the message netlink-packet-route
    /// would write, byte for byte.
    #[test]
    fn neighbour_requests_match_the_library_encoding() {
        let mac: Mac = "0e:00:00:00:0b:0b".parse().unwrap();
        for (family, dst, fdb) in
            [(AF_BRIDGE, "198.18.0.2", true), (AF_INET, "10.244.2.0", false), (AF_INET6, "fd00:10:244:2::", false)]
        {
            let dst: IpAddr = dst.parse().unwrap();
            let mut m = NeighbourMessage::default();
            m.header.family = AddressFamily::from(family);
            m.header.ifindex = 9;
            m.header.state = NeighbourState::Permanent;
            if fdb {
                m.header.flags = NeighbourFlags::Own;
            }
            m.header.kind = RouteType::Unicast;
            m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
            m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::from(dst)));
            let library = encode(RouteNetlinkMessage::NewNeighbour(m), PUT);
            let mut ours = Vec::new();
            push_neighbour(&mut ours, 9, family, mac, dst, 0, true, false);
            assert_eq!(ours, library, "{dst}");
            let parsed = parse_neigh(messages(&ours).next().unwrap().unwrap().payload).unwrap();
            assert_eq!((parsed.dst, parsed.lladdr, parsed.ifindex), (Some(dst), Some(mac), 9));
        }
    }

    #[test]
    fn an_error_message_carries_its_errno() {
        let mut b = header(HEADER_LEN + 20, NLMSG_ERROR, 0, 5).to_vec();
        b.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        b.extend_from_slice(&[0u8; 16]);
        let m = messages(&b).next().unwrap().unwrap();
        assert_eq!((m.seq, m.error()), (5, Some(libc::ENOENT)));
    }
}
