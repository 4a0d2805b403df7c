//! The bytes of a miss answer, written by hand into a reused buffer.
//!
//! The answer is on the first packet's critical path; building it through
//! netlink-packet-route's message types allocates a Vec per attribute and per
//! request. The layout is the same as `dataplane::batch::encode_op` emits, and
//! a test holds the two byte-for-byte equal.

use std::net::IpAddr;

use libc::{NDA_DST, NDA_LLADDR, NTF_SELF, NUD_PERMANENT, RTM_NEWNEIGH, RTN_UNICAST};
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST};

use crate::dataplane::{AF_BRIDGE, AF_INET, AF_INET6};
use crate::model::Mac;

/// Appends the fdb entry (VTEP MAC -> underlay) and, for an L3 miss, the
/// neighbour entry (gateway -> VTEP MAC) to `out`, in that order, numbered from
/// `seq + 1`. Only the last request asks for an ack; errors come back anyway.
/// Returns the seq of the last request.
pub fn encode_answer(
    out: &mut Vec<u8>,
    ifindex: u32,
    vtep: Mac,
    underlay: IpAddr,
    gateway: Option<IpAddr>,
    seq: u32,
) -> u32 {
    let fdb_seq = seq.wrapping_add(1);
    push_neighbour(out, ifindex, AF_BRIDGE, NTF_SELF, vtep, underlay, fdb_seq, gateway.is_none());
    let Some(ip) = gateway else { return fdb_seq };
    let family = if ip.is_ipv4() { AF_INET } else { AF_INET6 };
    push_neighbour(out, ifindex, family, 0, vtep, ip, fdb_seq.wrapping_add(1), true);
    fdb_seq.wrapping_add(1)
}

#[allow(clippy::too_many_arguments)]
fn push_neighbour(out: &mut Vec<u8>, ifindex: u32, family: u8, flags: u8, mac: Mac, dst: IpAddr, seq: u32, ack: bool) {
    let dst_len = if dst.is_ipv4() { 4 } else { 16 };
    // nlmsghdr 16 + ndmsg 12 + NDA_LLADDR (4 + 6, padded to 12) + NDA_DST (4 + address)
    let len = 16 + 12 + 12 + 4 + dst_len;
    let nl_flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE | if ack { NLM_F_ACK } else { 0 };
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&RTM_NEWNEIGH.to_ne_bytes());
    out.extend_from_slice(&nl_flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[family, 0, 0, 0]);
    out.extend_from_slice(&ifindex.to_ne_bytes());
    out.extend_from_slice(&NUD_PERMANENT.to_ne_bytes());
    out.extend_from_slice(&[flags, RTN_UNICAST]);
    out.extend_from_slice(&10u16.to_ne_bytes());
    out.extend_from_slice(&NDA_LLADDR.to_ne_bytes());
    out.extend_from_slice(&mac.0);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&((4 + dst_len) as u16).to_ne_bytes());
    out.extend_from_slice(&NDA_DST.to_ne_bytes());
    match dst {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::batch::{encode_op, stamp};
    use crate::plan::Op;

    fn via_library(ifindex: u32, ops: &[Op], first_seq: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let mut req = encode_op(ifindex, op);
            stamp(&mut req, first_seq + i as u32, i + 1 == ops.len());
            out.extend_from_slice(&req);
        }
        out
    }

    #[test]
    fn same_bytes_as_the_library_encoding() {
        let mac: Mac = "0e:00:00:00:0b:0b".parse().unwrap();
        let cases: [(IpAddr, Option<IpAddr>); 4] = [
            ("198.18.0.2".parse().unwrap(), Some("10.244.2.0".parse().unwrap())),
            ("198.18.0.2".parse().unwrap(), None),
            ("fd00::2".parse().unwrap(), Some("fd00:10:244:2::".parse().unwrap())),
            ("198.18.0.2".parse().unwrap(), Some("fd00:10:244:2::".parse().unwrap())),
        ];
        for (underlay, gateway) in cases {
            let mut ops = vec![Op::PutFdb { mac, dst: underlay }];
            if let Some(ip) = gateway {
                ops.push(Op::PutNeigh { ip, mac });
            }
            let mut ours = Vec::new();
            let last = encode_answer(&mut ours, 9, mac, underlay, gateway, 41);
            assert_eq!(ours, via_library(9, &ops, 42), "underlay {underlay}, gateway {gateway:?}");
            assert_eq!(last, 41 + ops.len() as u32);
        }
    }
}
