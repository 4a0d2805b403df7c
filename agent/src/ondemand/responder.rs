//! The miss responder: one dedicated NETLINK_ROUTE socket subscribed to
//! libc::RTNLGRP_NEIGH, answering each miss with permanent entries.
//!
//! It runs on its own OS thread with blocking sockets. The first packet to a
//! peer waits in the kernel's queue for this answer, so the path from the miss
//! to the write is the benchmark: waking a parked tokio worker and handing the
//! task over cost more than the whole answer (BENCHMARKS.md, B5), a thread
//! blocked in recv() costs a context switch. rtnetlink handles a request inside sendmsg(), so the ack is already
//! queued when send() returns and is read without blocking or a second wake-up.
//!
//! For an L3 miss it writes the fdb entry, then the neighbour entry, in one
//! datagram (the kernel handles a socket's messages in order), so the neighbour
//! replaces the INCOMPLETE entry and the kernel sends the packets it queued:
//! one miss, no packet lost. The fdb entry goes first because an L2 miss drops
//! its packet instead of queuing it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::miss::{Miss, Parsed, parse_datagram};
use super::{ActiveSet, MissTable};
use crate::dataplane::events::KernelEvent;
use crate::dataplane::wire;
use crate::dataplane::{AF_BRIDGE, FilterRule};
use crate::metrics::{Metrics, labels};
use crate::model::Mac;

pub struct Responder {
    pub table: watch::Receiver<Arc<MissTable>>,
    pub active: Arc<ActiveSet>,
    pub metrics: Arc<Metrics>,
    /// Tells the engine to resync: after notifications were lost, and after
    /// each answer.
    pub resync: mpsc::Sender<KernelEvent>,
    /// SO_RCVBUF for the miss socket; large, so a burst does not overflow it.
    pub rcvbuf: usize,
}

fn open_listener(rcvbuf: usize) -> std::io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    crate::dataplane::force_rcvbuf(&sock, rcvbuf)?;
    // Only misses: every other neighbour notification on the node (pods'
    // ARP churn, our own answers) would wake this thread and fill the buffer
    // that misses need; that overflow is how flannel's responder lost them.
    crate::dataplane::filter_notifications(&sock, &[FilterRule::OnlyType(libc::RTM_GETNEIGH)])?;
    sock.bind_auto()?;
    sock.add_membership(libc::RTNLGRP_NEIGH)?;
    Ok(sock)
}

/// The socket answers are written on, and its port; acks are read right
/// after each send.
fn open_writer() -> std::io::Result<(Socket, u32)> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    let addr = sock.bind_auto()?;
    crate::dataplane::force_rcvbuf(&sock, 1 << 20)?;
    Ok((sock, addr.port_number()))
}

/// Logs at most one line per interval for a noisy condition, with the count.
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    fn hit(&mut self, every: Duration) -> Option<u64> {
        match self.last {
            Some(t) if t.elapsed() < every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(Instant::now());
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// The writer socket and the state tied to it, kept for the thread's life
/// (only the listener is reopened). Buffers are reused so the hot path does
/// not allocate.
struct Session {
    writer: Socket,
    table: Arc<MissTable>,
    seq: u32,
    datagram: Vec<u8>,
    ack_buf: Vec<u8>,
    /// Answers sent and not yet acked: seq of the answer's last request ->
    /// kind and when its miss arrived.
    pending: HashMap<u32, (&'static str, Instant)>,
}

/// Appends the answer to a miss: the fdb entry (VTEP MAC -> underlay) and,
/// for an L3 miss, the neighbour (gateway -> VTEP MAC), in that order, numbered
/// from `seq + 1`. Only the last asks for an ack; errors come back anyway.
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
    wire::push_neighbour(out, ifindex, AF_BRIDGE, vtep, underlay, fdb_seq, true, gateway.is_none());
    let Some(ip) = gateway else { return fdb_seq };
    wire::push_neighbour(out, ifindex, wire::family(&ip), vtep, ip, fdb_seq.wrapping_add(1), true, true);
    fdb_seq.wrapping_add(1)
}

impl Responder {
    /// Opens the answer socket and starts the responder on its own thread.
    /// Returns the answer socket's netlink port, so the engine can ignore the
    /// notifications our answers cause. The thread never returns: the
    /// process exiting ends it, and the entries it wrote stay.
    pub fn spawn(mut self) -> std::io::Result<u32> {
        let (writer, port) = open_writer()?;
        let session = Session {
            writer,
            table: self.table.borrow_and_update().clone(),
            seq: 0,
            datagram: Vec::with_capacity(256),
            ack_buf: Vec::with_capacity(16 * 1024),
            pending: HashMap::new(),
        };
        std::thread::Builder::new().name("weir-miss".into()).spawn(move || self.run(session))?;
        Ok(port)
    }

    fn run(mut self, mut session: Session) {
        let mut unknown_log = RateLimited { last: None, suppressed: 0 };
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            // Only the listener is ever reopened: the writer cannot overrun
            // (its acks are drained after every send) and its port must stay
            // the one the engine filters on.
            let listener = match open_listener(self.rcvbuf) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot open the miss socket; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            info!(rcvbuf = self.rcvbuf, "listening for L2/L3 misses");
            loop {
                buf.clear();
                if let Err(e) = listener.recv(&mut buf, 0) {
                    if e.raw_os_error() == Some(libc::ENOBUFS) {
                        warn!("miss socket overflowed (ENOBUFS): misses were lost; reopening it and resyncing");
                    } else {
                        warn!(error = %e, "miss socket failed; reopening it and resyncing");
                    }
                    let _ = self.resync.try_send(KernelEvent::Overrun);
                    break;
                }
                let received = Instant::now();
                // The engine swaps it rarely; checking the version is one
                // atomic load, taking the lock every miss is two more.
                if self.table.has_changed().unwrap_or(false) {
                    session.table = self.table.borrow_and_update().clone();
                }
                let mut answered = false;
                for parsed in parse_datagram(&buf, session.table.ifindex) {
                    answered |= self.answer(&mut session, parsed, received, &mut unknown_log);
                }
                if answered {
                    self.read_acks(&mut session);
                    // The engine ignores our writes' notifications (they would
                    // wake it while the first packet is in flight). Now that
                    // the packet is out, let it check the entries and report
                    // the miss in its status.
                    let _ = self.resync.try_send(KernelEvent::Changed { ifindex: session.table.ifindex, ours: true });
                }
            }
        }
    }

    /// Writes the answer for one miss in a single sendmsg. Returns whether
    /// one was sent.
    fn answer(&self, s: &mut Session, parsed: Parsed, received: Instant, log: &mut RateLimited) -> bool {
        let table = &s.table;
        let (kind, answer, gateway) = match parsed {
            Parsed::Ignored => return false,
            Parsed::Malformed(e) => {
                warn!(error = %e, "malformed neighbour notification");
                return false;
            }
            Parsed::Miss(Miss::L3 { ip }) => match table.gateway(&ip) {
                Some(answer) => ("l3", answer, Some(ip)),
                None => {
                    self.unknown("l3", &ip.to_string(), log);
                    return false;
                }
            },
            Parsed::Miss(Miss::L2 { mac }) => match table.mac(&mac) {
                Some(answer) => ("l2", answer, None),
                None => {
                    self.unknown("l2", &mac.to_string(), log);
                    return false;
                }
            },
        };
        answer.mark.mark(self.active.stamp(received));
        s.datagram.clear();
        s.seq = encode_answer(&mut s.datagram, s.table.ifindex, answer.mac, answer.underlay, gateway, s.seq);
        if let Err(e) = s.writer.send(&s.datagram, 0) {
            warn!(error = %e, "sending a miss answer failed");
            self.counter(kind).with_label_values(&[labels::ERROR]).inc();
            return false;
        }
        s.pending.insert(s.seq, (kind, received));
        true
    }

    /// Reads the acks of the answers just sent. rtnetlink handles a request
    /// inside sendmsg(), so they are already queued: a missing one was lost
    /// (writer overrun), not late.
    fn read_acks(&self, s: &mut Session) {
        loop {
            s.ack_buf.clear();
            if s.writer.recv(&mut s.ack_buf, libc::MSG_DONTWAIT).is_err() {
                break;
            }
            let acks = wire::messages(&s.ack_buf).filter_map(Result::ok).filter_map(|m| Some((m.seq, m.error()?)));
            for (ack_seq, errno) in acks {
                // An error on the fdb write comes with seq - 1 of its answer.
                let key = if s.pending.contains_key(&ack_seq) { ack_seq } else { ack_seq.wrapping_add(1) };
                let Some((kind, started)) = s.pending.remove(&key) else { continue };
                let counter = self.counter(kind);
                if errno == 0 {
                    self.metrics.miss_resolve_seconds.observe(started.elapsed().as_secs_f64());
                    counter.with_label_values(&[labels::RESOLVED]).inc();
                } else {
                    let hint = if errno == libc::ENOBUFS { " (neighbour table full: gc_thresh3)" } else { "" };
                    warn!(errno, error = %std::io::Error::from_raw_os_error(errno), "answering a miss failed{hint}");
                    counter.with_label_values(&[labels::ERROR]).inc();
                }
            }
        }
        for (_, (kind, _)) in s.pending.drain() {
            warn!(kind, "no ack for a miss answer; the engine's resync will check the entry");
            self.counter(kind).with_label_values(&[labels::ERROR]).inc();
        }
    }

    fn unknown(&self, kind: &str, what: &str, log: &mut RateLimited) {
        self.counter(kind).with_label_values(&[labels::UNKNOWN]).inc();
        if let Some(suppressed) = log.hit(Duration::from_secs(10)) {
            info!(kind, address = %what, suppressed, "miss for an address no peer owns; ignored");
        }
    }

    fn counter(&self, kind: &str) -> &prometheus::IntCounterVec {
        if kind == "l3" { &self.metrics.l3miss } else { &self.metrics.l2miss }
    }
}
