//! Parsing RTM_GETNEIGH miss notifications. Pure.

use std::net::IpAddr;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::model::Mac;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// "Who has this IP?" (AF_INET/AF_INET6 with NDA_DST)
    L3 { ip: IpAddr },
    /// "Where is this MAC?" (AF_BRIDGE with NDA_LLADDR)
    L2 { mac: Mac },
}

/// Outcome for one netlink message in a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Miss(Miss),
    /// A miss on another device, or a neighbour message that is not a miss.
    Ignored,
    Malformed(String),
}

/// Splits a datagram into messages and classifies each. Misses on devices
/// other than `ifindex` are ignored.
pub fn parse_datagram(mut buf: &[u8], ifindex: u32) -> Vec<Parsed> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            out.push(Parsed::Malformed(format!("netlink length {len} with {} bytes left", buf.len())));
            break;
        }
        out.push(match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]) {
            Ok(msg) => classify(msg, ifindex),
            Err(e) => Parsed::Malformed(e.to_string()),
        });
        // Messages are 4-byte aligned within a datagram.
        let step = (len + 3) & !3;
        buf = &buf[step.min(buf.len())..];
    }
    out
}

fn classify(msg: NetlinkMessage<RouteNetlinkMessage>, ifindex: u32) -> Parsed {
    match msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetNeighbour(n)) if n.header.ifindex == ifindex => {
            miss_of(&n)
        }
        _ => Parsed::Ignored,
    }
}

fn miss_of(n: &NeighbourMessage) -> Parsed {
    if n.header.family == AddressFamily::Bridge {
        let mac = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => Some(Mac([b[0], b[1], b[2], b[3], b[4], b[5]])),
            _ => None,
        });
        return mac.map_or(Parsed::Malformed("L2 miss without a MAC".into()), |mac| Parsed::Miss(Miss::L2 { mac }));
    }
    let ip = n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        _ => None,
    });
    ip.map_or(Parsed::Malformed("L3 miss without an address".into()), |ip| Parsed::Miss(Miss::L3 { ip }))
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage};
    use netlink_packet_route::neighbour::{NeighbourMessage, NeighbourState};

    use super::*;

    fn getneigh(family: AddressFamily, ifindex: u32, attr: NeighbourAttribute) -> Vec<u8> {
        let mut n = NeighbourMessage::default();
        n.header.family = family;
        n.header.ifindex = ifindex;
        n.header.state = NeighbourState::Incomplete;
        n.attributes.push(attr);
        let mut msg = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetNeighbour(n)),
        );
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    #[test]
    fn l3_and_l2_misses_on_our_device_only() {
        let mut dgram = getneigh(
            AddressFamily::Inet,
            7,
            NeighbourAttribute::Destination(NeighbourAddress::Inet("10.244.2.0".parse().unwrap())),
        );
        dgram.extend(getneigh(
            AddressFamily::Bridge,
            7,
            NeighbourAttribute::LinkLayerAddress(vec![0x0e, 0, 0, 0, 0, 2]),
        ));
        dgram.extend(getneigh(
            AddressFamily::Inet,
            8,
            NeighbourAttribute::Destination(NeighbourAddress::Inet("10.244.3.0".parse().unwrap())),
        ));
        let parsed = parse_datagram(&dgram, 7);
        assert_eq!(
            parsed,
            vec![
                Parsed::Miss(Miss::L3 { ip: "10.244.2.0".parse().unwrap() }),
                Parsed::Miss(Miss::L2 { mac: "0e:00:00:00:00:02".parse().unwrap() }),
                Parsed::Ignored,
            ]
        );
    }

    #[test]
    fn ipv6_miss_and_garbage() {
        let d = getneigh(
            AddressFamily::Inet6,
            7,
            NeighbourAttribute::Destination(NeighbourAddress::Inet6("fd00::1".parse().unwrap())),
        );
        assert_eq!(parse_datagram(&d, 7), vec![Parsed::Miss(Miss::L3 { ip: "fd00::1".parse().unwrap() })]);
        assert!(matches!(parse_datagram(&[0xff; 20], 7)[0], Parsed::Malformed(_)));
        assert!(parse_datagram(&[], 7).is_empty());
    }
}
