//! Parsing RTM_GETNEIGH miss notifications. Pure.
//!
//! Only the header fields and the one attribute a miss needs are read, with
//! netlink-packet-route's zero-copy buffers: this runs while the first packet
//! to a peer waits in the kernel, and whole-message deserialization (every
//! attribute into a Vec) cost ~20 µs per miss on a cold cache.

use std::net::IpAddr;

use netlink_packet_core::{NetlinkBuffer, NlasIterator};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::NeighbourHeader;

use crate::model::Mac;

use libc::{NDA_DST, NDA_LLADDR, RTM_GETNEIGH};

const NEIGHBOUR_HEADER_LEN: usize = 12;

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

/// Splits a datagram into messages and classifies each, without allocating.
/// Misses on devices other than `ifindex` are ignored.
pub fn parse_datagram(mut buf: &[u8], ifindex: u32) -> impl Iterator<Item = Parsed> + '_ {
    std::iter::from_fn(move || {
        if buf.len() < 16 {
            return None;
        }
        let msg = match NetlinkBuffer::new_checked(buf) {
            Ok(m) => m,
            Err(e) => {
                buf = &[];
                return Some(Parsed::Malformed(format!("netlink header: {e}")));
            }
        };
        let parsed =
            if msg.message_type() == RTM_GETNEIGH { classify(msg.payload(), ifindex) } else { Parsed::Ignored };
        // Messages are 4-byte aligned within a datagram.
        let step = (msg.length() as usize + 3) & !3;
        buf = &buf[step.min(buf.len())..];
        Some(parsed)
    })
}

fn classify(payload: &[u8], ifindex: u32) -> Parsed {
    let header = match NeighbourHeader::parse(payload) {
        Ok(h) => h,
        Err(e) => return Parsed::Malformed(format!("neighbour header: {e}")),
    };
    if header.ifindex != ifindex {
        return Parsed::Ignored;
    }
    let bridge = header.family == AddressFamily::Bridge;
    let wanted = if bridge { NDA_LLADDR } else { NDA_DST };
    // The value is decoded here rather than through NeighbourAttribute: its
    // parser covers every attribute kind, a large cold function to page in
    // while the first packet waits, for the two shapes a miss can have.
    let nla =
        NlasIterator::new(&payload[NEIGHBOUR_HEADER_LEN..]).filter_map(Result::ok).find(|nla| nla.kind() == wanted);
    let value = nla.as_ref().map_or(&[][..], |nla| nla.value());
    let miss = match header.family {
        AddressFamily::Bridge => value.try_into().ok().map(|mac| Miss::L2 { mac: Mac(mac) }),
        AddressFamily::Inet => <[u8; 4]>::try_from(value).ok().map(|ip| Miss::L3 { ip: ip.into() }),
        AddressFamily::Inet6 => <[u8; 16]>::try_from(value).ok().map(|ip| Miss::L3 { ip: ip.into() }),
        _ => None,
    };
    match miss {
        Some(miss) => Parsed::Miss(miss),
        None if bridge => Parsed::Malformed("L2 miss without a MAC".into()),
        None => Parsed::Malformed("L3 miss without an address".into()),
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};

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
        let parsed: Vec<_> = parse_datagram(&dgram, 7).collect();
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
        let parsed: Vec<_> = parse_datagram(&d, 7).collect();
        assert_eq!(parsed, vec![Parsed::Miss(Miss::L3 { ip: "fd00::1".parse().unwrap() })]);
        assert!(matches!(parse_datagram(&[0xff; 20], 7).next(), Some(Parsed::Malformed(_))));
        assert_eq!(parse_datagram(&[], 7).count(), 0);
    }

    #[test]
    fn wrong_length_values_are_malformed() {
        let short_mac =
            getneigh(AddressFamily::Bridge, 7, NeighbourAttribute::LinkLayerAddress(vec![0x0e, 0, 0, 0, 2]));
        assert!(matches!(parse_datagram(&short_mac, 7).next(), Some(Parsed::Malformed(_))));
        // An IPv6-sized address in an AF_INET miss.
        let mixed = getneigh(
            AddressFamily::Inet,
            7,
            NeighbourAttribute::Destination(NeighbourAddress::Inet6("fd00::1".parse().unwrap())),
        );
        assert!(matches!(parse_datagram(&mixed, 7).next(), Some(Parsed::Malformed(_))));
    }
}
