//! Parsing RTM_GETNEIGH miss notifications. Pure.
//!
//! This runs while the first packet to a peer waits in the kernel, after the
//! responder has slept, and every cold page of code it touches costs that
//! packet. So the neighbour header's two fields are read here by hand, and
//! messages and attributes are walked by `wire`'s own functions: through
//! netlink-packet-core's buffers, netlink-packet-route's `NeighbourHeader`
//! and `NlasIterator`, code in three crates, the parse took about 5 us of a
//! miss on the Intel machine, and about 1.2 us without (BENCHMARKS.md, B5).

use std::net::IpAddr;

use crate::dataplane::wire;
use crate::dataplane::{AF_INET, AF_INET6};
use crate::model::Mac;

use libc::{NDA_DST, NDA_LLADDR, RTM_GETNEIGH};

/// struct ndmsg { family: u8, pad: [u8; 3], ifindex: i32, state: u16, flags: u8, type: u8 }
const NEIGHBOUR_HEADER_LEN: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// "Who has this IP?": the message carries NDA_DST.
    L3 { ip: IpAddr },
    /// "Where is this MAC?": NDA_LLADDR and no NDA_DST. vxlan sends it with
    /// family AF_INET (not AF_BRIDGE), so the family cannot tell the two apart.
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
pub fn parse_datagram(buf: &[u8], ifindex: u32) -> impl Iterator<Item = Parsed> + '_ {
    wire::messages(buf).map(move |m| match m {
        Ok(m) if m.kind == RTM_GETNEIGH => classify(m.payload, ifindex),
        Ok(_) => Parsed::Ignored,
        Err(e) => Parsed::Malformed(e),
    })
}

fn classify(payload: &[u8], ifindex: u32) -> Parsed {
    if payload.len() < NEIGHBOUR_HEADER_LEN {
        return Parsed::Malformed(format!("neighbour header of {} bytes", payload.len()));
    }
    if wire::u32_at(payload, 4) != ifindex {
        return Parsed::Ignored;
    }
    let (mut dst, mut lladdr) = (None, None);
    for (kind, value) in wire::attributes(payload, NEIGHBOUR_HEADER_LEN) {
        match kind {
            NDA_DST => dst = Some(value),
            NDA_LLADDR => lladdr = Some(value),
            _ => {}
        }
    }
    match (dst, lladdr) {
        (Some(value), _) => {
            let ip = match payload[0] {
                AF_INET => <[u8; 4]>::try_from(value).ok().map(IpAddr::from),
                AF_INET6 => <[u8; 16]>::try_from(value).ok().map(IpAddr::from),
                _ => None,
            };
            ip.map_or_else(
                || Parsed::Malformed("L3 miss without a valid address".into()),
                |ip| Parsed::Miss(Miss::L3 { ip }),
            )
        }
        (None, Some(value)) => <[u8; 6]>::try_from(value).map_or_else(
            |_| Parsed::Malformed("L2 miss with a MAC that is not 6 bytes".into()),
            |mac| Parsed::Miss(Miss::L2 { mac: Mac(mac) }),
        ),
        (None, None) => Parsed::Malformed("miss with neither an address nor a MAC".into()),
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
    use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

    use super::*;

    fn getneigh(family: AddressFamily, ifindex: u32, attr: NeighbourAttribute) -> Vec<u8> {
        getneigh_with(family, ifindex, vec![attr])
    }

    fn getneigh_with(family: AddressFamily, ifindex: u32, attributes: Vec<NeighbourAttribute>) -> Vec<u8> {
        let mut n = NeighbourMessage::default();
        n.header.family = family;
        n.header.ifindex = ifindex;
        n.header.state = NeighbourState::Incomplete;
        n.attributes = attributes;
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
        // The shape vxlan really sends for an L2 miss (captured on 6.18).
        dgram.extend(getneigh(AddressFamily::Inet, 7, NeighbourAttribute::LinkLayerAddress(vec![0x0e, 0, 0, 0, 0, 2])));
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
        let short_mac = getneigh(AddressFamily::Inet, 7, NeighbourAttribute::LinkLayerAddress(vec![0x0e, 0, 0, 0, 2]));
        assert!(matches!(parse_datagram(&short_mac, 7).next(), Some(Parsed::Malformed(_))));
        // An IPv6-sized address in an AF_INET miss.
        let mixed = getneigh(
            AddressFamily::Inet,
            7,
            NeighbourAttribute::Destination(NeighbourAddress::Inet6("fd00::1".parse().unwrap())),
        );
        assert!(matches!(parse_datagram(&mixed, 7).next(), Some(Parsed::Malformed(_))));
    }

    #[test]
    fn attribute_flags_are_masked_and_a_truncated_attribute_ends_the_walk() {
        let mut d = getneigh(
            AddressFamily::Inet,
            7,
            NeighbourAttribute::Destination(NeighbourAddress::Inet("10.244.2.0".parse().unwrap())),
        );
        // NDA_DST's type, after the 16-byte netlink and 12-byte neighbour headers.
        let kind = u16::from_ne_bytes([d[30], d[31]]) | libc::NLA_F_NET_BYTEORDER as u16;
        d[30..32].copy_from_slice(&kind.to_ne_bytes());
        assert_eq!(
            parse_datagram(&d, 7).collect::<Vec<_>>(),
            vec![Parsed::Miss(Miss::L3 { ip: "10.244.2.0".parse().unwrap() })]
        );
        // The attribute claims more bytes than its message holds.
        d[28..30].copy_from_slice(&64u16.to_ne_bytes());
        assert!(matches!(parse_datagram(&d, 7).next(), Some(Parsed::Malformed(_))));
    }

    #[test]
    fn an_l2_miss_is_told_by_its_attributes_not_its_family() {
        let mac = vec![0x0e, 0, 0, 0, 0, 9];
        for family in [AddressFamily::Inet, AddressFamily::Inet6, AddressFamily::Bridge] {
            let d = getneigh(family, 7, NeighbourAttribute::LinkLayerAddress(mac.clone()));
            assert_eq!(
                parse_datagram(&d, 7).collect::<Vec<_>>(),
                vec![Parsed::Miss(Miss::L2 { mac: "0e:00:00:00:00:09".parse().unwrap() })],
                "{family:?}"
            );
        }
        let buf = getneigh_with(
            AddressFamily::Inet,
            7,
            vec![
                NeighbourAttribute::Destination(NeighbourAddress::Inet("10.244.2.0".parse().unwrap())),
                NeighbourAttribute::LinkLayerAddress(mac),
            ],
        );
        assert_eq!(
            parse_datagram(&buf, 7).collect::<Vec<_>>(),
            vec![Parsed::Miss(Miss::L3 { ip: "10.244.2.0".parse().unwrap() })],
            "an address makes it an L3 miss, whatever else it carries"
        );
    }
}
