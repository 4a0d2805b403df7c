//! nftables over nfnetlink from inside the agent: the peers sets' elements
//! changed, the ruleset's generation and the drop counter read.
//!
//! A Node event changes one element. Running `nft` for it cost every agent a
//! process, and its CPU, per event (BENCHMARKS.md, F6). The messages go in
//! one nfnetlink batch, which nftables applies as one transaction, as it did
//! one `nft -f` run: all of it or none. The periodic check ran two `nft`
//! listings of thousands of elements; the generation tells it when nothing
//! has been committed since, and there is nothing to list.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::dataplane::wire;

// include/uapi/linux/netfilter/nf_tables.h; libc names none of these.
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_GEN_ID: u16 = 1;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NESTED: u16 = libc::NLA_F_NESTED as u16;
const SUBSYS: u16 = libc::NFNL_SUBSYS_NFTABLES as u16;

/// Elements per message: the list of elements is one attribute, and an
/// attribute's length has 16 bits.
const PER_MESSAGE: usize = 1000;

/// One set's elements to add, or to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetChange {
    pub set: &'static str,
    pub add: bool,
    pub elements: Vec<IpAddr>,
}

/// The changes that take the peers sets (`peers4`, `peers6`) from `old` to
/// `new`; none when they are equal.
pub fn element_delta(old: &BTreeSet<IpAddr>, new: &BTreeSet<IpAddr>) -> Vec<SetChange> {
    let mut out = Vec::new();
    for (set, v4) in [("peers4", true), ("peers6", false)] {
        for (add, have, want) in [(true, old, new), (false, new, old)] {
            let elements: Vec<IpAddr> = want.difference(have).filter(|ip| ip.is_ipv4() == v4).copied().collect();
            if !elements.is_empty() {
                out.push(SetChange { set, add, elements });
            }
        }
    }
    out
}

/// struct nfgenmsg { family, version, res_id (big-endian) }.
fn nfgenmsg(family: u8, res_id: u16) -> [u8; 4] {
    let id = res_id.to_be_bytes();
    [family, libc::NFNETLINK_V0 as u8, id[0], id[1]]
}

fn message(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, body: &[u8]) {
    out.extend_from_slice(&wire::header(16 + body.len(), kind, flags, seq));
    out.extend_from_slice(body);
}

fn nul_terminated(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

/// One transaction on table `inet {table}`: the batch's begin, one message
/// per set and up to `PER_MESSAGE` elements, the batch's end. The change
/// messages ask for an ack; returns the batch and their sequence numbers.
pub fn encode_batch(table: &str, changes: &[SetChange], seq: u32) -> (Vec<u8>, Vec<u32>) {
    let mut out = Vec::new();
    message(&mut out, libc::NFNL_MSG_BATCH_BEGIN as u16, NLM_F_REQUEST, seq, &nfgenmsg(0, SUBSYS));
    let mut acked = Vec::new();
    for change in changes {
        let (kind, flags) = if change.add {
            (libc::NFT_MSG_NEWSETELEM as u16, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK)
        } else {
            (libc::NFT_MSG_DELSETELEM as u16, NLM_F_REQUEST | NLM_F_ACK)
        };
        for chunk in change.elements.chunks(PER_MESSAGE) {
            let mut list = Vec::new();
            for ip in chunk {
                let mut value = Vec::new();
                wire::attr(&mut value, NFTA_DATA_VALUE, &wire::ip_bytes(ip));
                let mut key = Vec::new();
                wire::attr(&mut key, NFTA_SET_ELEM_KEY | NESTED, &value);
                wire::attr(&mut list, NFTA_LIST_ELEM | NESTED, &key);
            }
            let mut body = nfgenmsg(libc::NFPROTO_INET as u8, 0).to_vec();
            wire::attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &nul_terminated(table));
            wire::attr(&mut body, NFTA_SET_ELEM_LIST_SET, &nul_terminated(change.set));
            wire::attr(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS | NESTED, &list);
            let this = seq.wrapping_add(acked.len() as u32 + 1);
            message(&mut out, (SUBSYS << 8) | kind, flags, this, &body);
            acked.push(this);
        }
    }
    let end = seq.wrapping_add(acked.len() as u32 + 1);
    message(&mut out, libc::NFNL_MSG_BATCH_END as u16, NLM_F_REQUEST, end, &nfgenmsg(0, SUBSYS));
    (out, acked)
}

/// The generation after `g`: each commit moves it on by one, skipping 0.
pub fn next_generation(g: u32) -> u32 {
    g.wrapping_add(1).max(1)
}

/// A NETLINK_NETFILTER socket: writes set elements, reads the ruleset's
/// generation and a counter.
pub struct NftSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl NftSocket {
    pub fn new() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        // Acks without a copy of the request, which can hold 1,000 elements.
        sock.set_cap_ack(true)?;
        Ok(NftSocket { sock, seq: 1, buf: vec![0; 64 * 1024] })
    }

    /// Applies the changes to table `inet {table}` as one transaction.
    /// nfnetlink handles a batch in the sender's context, so every answer is
    /// queued when the send returns: a missing one is an error, not a wait.
    pub fn apply(&mut self, table: &str, changes: &[SetChange]) -> io::Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let begin = self.seq;
        let (batch, mut waiting) = encode_batch(table, changes, begin);
        self.seq = self.seq.wrapping_add(waiting.len() as u32 + 2);
        self.sock.send_to(&batch, &SocketAddr::new(0, 0), 0)?;
        let mut failed = None;
        while !waiting.is_empty() {
            let n = self.sock.recv(&mut &mut self.buf[..], libc::MSG_DONTWAIT)?;
            for m in wire::messages(&self.buf[..n]) {
                let m = m.map_err(io::Error::other)?;
                let Some(errno) = m.error() else { continue };
                if errno != 0 {
                    failed.get_or_insert(errno);
                }
                // A batch refused as a whole is answered once, on its begin.
                if m.seq == begin {
                    waiting.clear();
                }
                waiting.retain(|s| *s != m.seq);
            }
        }
        match failed {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    /// The ruleset's generation in this network namespace: every committed
    /// transaction, weir's or anyone's, on any table, moves it on by one.
    pub fn generation(&mut self) -> io::Result<u32> {
        let reply = self.ask(libc::NFT_MSG_GETGEN as u16, &nfgenmsg(libc::AF_UNSPEC as u8, 0))?;
        let id = wire::attributes(&reply, 4).find(|(kind, _)| *kind == NFTA_GEN_ID).map(|(_, v)| v);
        id.and_then(|v| v.try_into().ok()).map(u32::from_be_bytes).ok_or_else(|| missing("NFTA_GEN_ID"))
    }

    /// The packets the counter object `name` of table `inet {table}` counted.
    pub fn counter_packets(&mut self, table: &str, name: &str) -> io::Result<u64> {
        let mut body = nfgenmsg(libc::NFPROTO_INET as u8, 0).to_vec();
        wire::attr(&mut body, NFTA_OBJ_TABLE, &nul_terminated(table));
        wire::attr(&mut body, NFTA_OBJ_NAME, &nul_terminated(name));
        wire::attr(&mut body, NFTA_OBJ_TYPE, &NFT_OBJECT_COUNTER.to_be_bytes());
        let reply = self.ask(libc::NFT_MSG_GETOBJ as u16, &body)?;
        let data = wire::attributes(&reply, 4).find(|(kind, _)| *kind == NFTA_OBJ_DATA).map(|(_, v)| v);
        let packets = data.and_then(|d| wire::attributes(d, 0).find(|(kind, _)| *kind == NFTA_COUNTER_PACKETS));
        packets
            .and_then(|(_, v)| v.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| missing("NFTA_COUNTER_PACKETS"))
    }

    /// Sends one request of the nftables subsystem and returns the payload
    /// of its answer. Answered in the sender's context like a batch, so the
    /// answer and the ack are queued when the send returns.
    fn ask(&mut self, kind: u16, body: &[u8]) -> io::Result<Vec<u8>> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut request = Vec::new();
        message(&mut request, (SUBSYS << 8) | kind, NLM_F_REQUEST | NLM_F_ACK, seq, body);
        self.sock.send_to(&request, &SocketAddr::new(0, 0), 0)?;
        let mut answer = None;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], libc::MSG_DONTWAIT)?;
            for m in wire::messages(&self.buf[..n]) {
                let m = m.map_err(io::Error::other)?;
                if m.seq != seq {
                    continue;
                }
                match m.error() {
                    Some(0) => return answer.ok_or_else(|| missing("an answer before the ack")),
                    Some(errno) => return Err(io::Error::from_raw_os_error(errno)),
                    None => answer = Some(m.payload.to_vec()),
                }
            }
        }
    }
}

fn missing(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("nfnetlink answer without {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_change_writes_only_the_elements_that_changed() {
        let old: BTreeSet<IpAddr> = [ip("198.18.0.12"), ip("198.18.0.13"), ip("fd00::12")].into();
        let new: BTreeSet<IpAddr> = [ip("198.18.0.12"), ip("198.18.0.14"), ip("198.18.0.15")].into();
        let change = |set, add, e: &[&str]| SetChange { set, add, elements: e.iter().map(|s| ip(s)).collect() };
        assert_eq!(
            element_delta(&old, &new),
            vec![
                change("peers4", true, &["198.18.0.14", "198.18.0.15"]),
                change("peers4", false, &["198.18.0.13"]),
                change("peers6", false, &["fd00::12"]),
            ]
        );
        assert!(element_delta(&new, &new).is_empty());
    }

    #[test]
    fn a_batch_is_begin_changes_end_and_each_change_asks_for_an_ack() {
        let change = SetChange { set: "peers4", add: true, elements: vec![ip("198.18.0.14")] };
        let (batch, acked) = encode_batch("weir", &[change], 7);
        let messages: Vec<_> = wire::messages(&batch).map(Result::unwrap).collect();
        let kinds: Vec<u16> = messages.iter().map(|m| m.kind).collect();
        assert_eq!(kinds, vec![0x10, 0x0a0c, 0x11]);
        assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![7, 8, 9]);
        assert_eq!(acked, vec![8]);
        // nfgenmsg: the batch names the nftables subsystem; the change, family inet.
        assert_eq!(messages[0].payload[..4], [0, 0, 0, 10]);
        assert_eq!(messages[1].payload[..4], [1, 0, 0, 0]);
        let flags = u16::from_ne_bytes([batch[20 + 6], batch[20 + 7]]);
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK);
        // table "weir\0" (padded to 8), set "peers4\0" (padded to 8), then
        // elements > element > key > value: the address's 4 bytes.
        let body = messages[1].payload;
        assert_eq!(&body[4..8], &[9, 0, 1, 0]);
        assert_eq!(&body[8..13], b"weir\0");
        assert_eq!(&body[16..27], &[11, 0, 2, 0, b'p', b'e', b'e', b'r', b's', b'4', 0]);
        assert_eq!(&body[28..32], &[20, 0, 3, 0x80]);
        assert_eq!(&body[32..36], &[16, 0, 1, 0x80]);
        assert_eq!(&body[36..40], &[12, 0, 1, 0x80]);
        assert_eq!(&body[40..48], &[8, 0, 1, 0, 198, 18, 0, 14]);
        assert_eq!(body.len(), 48);
    }

    #[test]
    fn a_large_change_is_split_into_messages_that_fit_an_attribute() {
        let many: Vec<IpAddr> = (0..2500u32).map(|k| IpAddr::from((0xc612_0000u32 + k).to_be_bytes())).collect();
        let (batch, acked) = encode_batch("weir", &[SetChange { set: "peers4", add: false, elements: many }], 1);
        assert_eq!(acked.len(), 3);
        for m in wire::messages(&batch).map(Result::unwrap) {
            assert!(m.payload.len() < u16::MAX as usize, "{}", m.payload.len());
        }
    }
}
