//! Batched netlink writes: many requests per sendmsg, no per-request ack.
//!
//! Requests go out without NLM_F_ACK, so the kernel answers only failures;
//! each chunk ends with an NLMSG_NOOP that does ask for an ack, and since a
//! socket's messages are handled in order, that ack means the whole chunk is
//! done. One round trip per chunk instead of one per entry. Dumps go through
//! the same socket, filtered in the kernel. The bytes are `wire`'s.

use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::wire::{self, Message, NLMSG_DONE, NLMSG_NOOP, Nexthop, RT_TABLE_MAIN, RTM_GETNEXTHOP, RawNeigh, RawRoute};
use super::{AF_BRIDGE, AF_INET, AF_INET6};

/// Bytes of requests per sendmsg; well under the default socket send buffer.
const CHUNK: usize = 48 * 1024;

pub struct Batcher {
    sock: Socket,
    port: u32,
    seq: u32,
    buf: Vec<u8>,
}

impl Batcher {
    pub fn new() -> std::io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        let port = sock.bind_auto()?.port_number();
        // Replies to a dump can be large; errors for a chunk must all fit.
        sock.set_rx_buf_sz(4 << 20)?;
        sock.set_ext_ack(false)?;
        // Lets dumps be filtered in the kernel (by device, table, protocol).
        sock.set_netlink_get_strict_chk(true)?;
        Ok(Batcher { sock, port, seq: 1, buf: vec![0; 256 * 1024] })
    }

    /// The netlink port the kernel names as the sender of what this socket writes.
    pub fn port(&self) -> u32 {
        self.port
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
                let at = chunk.len();
                chunk.extend_from_slice(&requests[end]);
                wire::set_seq(&mut chunk[at..], base.wrapping_add(end as u32));
                end += 1;
            }
            let barrier = self.seq;
            self.seq = self.seq.wrapping_add(1);
            chunk.extend_from_slice(&wire::header(16, NLMSG_NOOP, NLM_F_REQUEST | NLM_F_ACK, barrier));
            self.sock.send_to(&chunk, &SocketAddr::new(0, 0), 0)?;
            self.read_until(|m| {
                let Some(errno) = m.error() else { return false };
                if m.seq == barrier {
                    return true;
                }
                if let Some(r) = results.get_mut(m.seq.wrapping_sub(base) as usize) {
                    *r = errno;
                }
                false
            })?;
            start = end;
        }
        Ok(results)
    }

    /// One dump request; calls `each(message)` per reply. Returns the
    /// kernel's errno for the dump, 0 when it completed.
    fn dump(&mut self, kind: u16, body: &[u8], mut each: impl FnMut(&Message)) -> std::io::Result<i32> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        self.sock.send_to(&wire::dump_request(kind, body, seq), &SocketAddr::new(0, 0), 0)?;
        let mut errno = 0;
        self.read_until(|m| {
            if m.seq != seq {
                return false;
            }
            if let Some(e) = m.error() {
                errno = e;
                return true;
            }
            if m.kind == NLMSG_DONE {
                return true;
            }
            each(m);
            false
        })?;
        Ok(errno)
    }

    /// Neighbours (or, with AF_BRIDGE, fdb entries) of one device, filtered by
    /// the kernel: only the few fields weir compares.
    pub fn dump_neighbours(&mut self, family: u8, ifindex: u32) -> std::io::Result<Vec<RawNeigh>> {
        let mut body = vec![family, 0, 0, 0];
        // The fdb dump takes the device in the header; the neighbour dump in NDA_IFINDEX.
        let header_ifindex = if family == AF_BRIDGE { ifindex } else { 0 };
        body.extend_from_slice(&header_ifindex.to_ne_bytes());
        body.extend_from_slice(&[0u8; 4]);
        if family != AF_BRIDGE {
            wire::attr(&mut body, libc::NDA_IFINDEX, &ifindex.to_ne_bytes());
        }
        let mut out = Vec::new();
        let errno = self.dump(libc::RTM_GETNEIGH, &body, |m| {
            if m.kind == libc::RTM_NEWNEIGH
                && let Some(n) = wire::parse_neigh(m.payload)
                && n.ifindex == ifindex
            {
                out.push(n);
            }
        })?;
        kernel_result(errno, out)
    }

    /// Main-table routes of one family, optionally only those of `protocol`
    /// (filtered by the kernel, which needs strict checking on).
    pub fn dump_routes(&mut self, family: u8, protocol: Option<u8>) -> std::io::Result<Vec<RawRoute>> {
        debug_assert!(family == AF_INET || family == AF_INET6);
        let mut body = vec![family, 0, 0, 0, RT_TABLE_MAIN, protocol.unwrap_or(0), 0, 0, 0, 0, 0, 0];
        wire::attr(&mut body, libc::RTA_TABLE, &u32::from(RT_TABLE_MAIN).to_ne_bytes());
        let mut out = Vec::new();
        let errno = self.dump(libc::RTM_GETROUTE, &body, |m| {
            if m.kind == libc::RTM_NEWROUTE
                && let Some(r) = wire::parse_route(m.payload)
                && r.table == u32::from(RT_TABLE_MAIN)
                && protocol.is_none_or(|proto| r.protocol == proto)
            {
                out.push(r);
            }
        })?;
        kernel_result(errno, out)
    }

    /// The route a lookup of `addr` matches, whatever its table; None where
    /// nothing routes it.
    pub fn route_for(&mut self, addr: std::net::IpAddr) -> std::io::Result<Option<RawRoute>> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        self.sock.send_to(&wire::fib_match_request(addr, seq), &SocketAddr::new(0, 0), 0)?;
        let mut found = Ok(None);
        self.read_until(|m| {
            if m.seq != seq {
                return false;
            }
            found = match m.error() {
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => Ok(None),
                Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
                None => Ok(wire::parse_route(m.payload)),
            };
            true
        })?;
        found
    }

    /// Dumps the nexthop objects: None if the kernel has no nexthop support.
    pub fn dump_nexthops(&mut self) -> std::io::Result<Option<Vec<Nexthop>>> {
        let mut out = Vec::new();
        let errno = self.dump(RTM_GETNEXTHOP, &[0u8; 8], |m| {
            if m.kind == wire::RTM_NEWNEXTHOP
                && let Some(nh) = wire::parse_nexthop(m.payload)
            {
                out.push(nh);
            }
        })?;
        Ok((errno == 0).then_some(out))
    }

    /// Reads datagrams, calling `f` per message until it returns true.
    fn read_until(&mut self, mut f: impl FnMut(&Message) -> bool) -> std::io::Result<()> {
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for m in wire::messages(&self.buf[..n]) {
                let m = m.map_err(std::io::Error::other)?;
                if f(&m) {
                    return Ok(());
                }
            }
        }
    }
}

fn kernel_result<T>(errno: i32, value: T) -> std::io::Result<T> {
    if errno == 0 { Ok(value) } else { Err(std::io::Error::from_raw_os_error(errno)) }
}
