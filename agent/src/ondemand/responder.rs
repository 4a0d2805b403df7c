//! The miss responder: one dedicated NETLINK_ROUTE socket subscribed to
//! RTNLGRP_NEIGH, answering each miss with permanent entries.
//!
//! For an L3 miss it writes the fdb entry, then the neighbour entry, on one
//! socket without waiting in between (the kernel handles a socket's messages in
//! order), so the neighbour replaces the INCOMPLETE entry and the kernel sends
//! the packets it queued: one miss, no packet lost. The fdb entry goes first
//! because an L2 miss drops its packet instead of queuing it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket, protocols::NETLINK_ROUTE};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::miss::{Miss, Parsed, parse_datagram};
use super::{ActiveSet, MissTable};
use crate::dataplane::batch::{acks, encode_op, stamp};
use crate::dataplane::events::KernelEvent;
use crate::engine::EngineStatus;
use crate::metrics::Metrics;
use crate::plan::Op;

const RTNLGRP_NEIGH: u32 = 3;
const ENOBUFS: i32 = 105;

pub struct Responder {
    pub table: watch::Receiver<Arc<MissTable>>,
    pub active: Arc<ActiveSet>,
    pub status: watch::Receiver<EngineStatus>,
    pub metrics: Arc<Metrics>,
    /// Tells the engine to resync after notifications were lost.
    pub resync: mpsc::Sender<KernelEvent>,
    /// SO_RCVBUF for the miss socket; large, so a burst does not overflow it.
    pub rcvbuf: usize,
}

fn open_socket(rcvbuf: usize) -> std::io::Result<TokioSocket> {
    let mut sock = TokioSocket::new(NETLINK_ROUTE)?;
    crate::dataplane::force_rcvbuf(sock.socket_ref(), rcvbuf)?;
    sock.socket_mut().bind_auto()?;
    sock.socket_mut().add_membership(RTNLGRP_NEIGH)?;
    Ok(sock)
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

impl Responder {
    pub async fn run(self) {
        let mut unknown_log = RateLimited { last: None, suppressed: 0 };
        let mut seq: u32 = 1;
        loop {
            let (sock, writer) = match (open_socket(self.rcvbuf), open_writer()) {
                (Ok(s), Ok(w)) => (s, w),
                (Err(e), _) | (_, Err(e)) => {
                    warn!(error = %e, "cannot open the miss sockets; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            info!(rcvbuf = self.rcvbuf, "listening for L2/L3 misses");
            let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
            let mut ack_buf: Vec<u8> = Vec::with_capacity(16 * 1024);
            // Answer seq (of its last request) -> kind and when its miss arrived.
            let mut pending: HashMap<u32, (&'static str, Instant)> = HashMap::new();
            loop {
                tokio::select! {
                    r = async { buf.clear(); sock.recv(&mut buf).await } => match r {
                        Ok(()) => {
                            let received = Instant::now();
                            let ifindex = self.status.borrow().ifindex;
                            for parsed in parse_datagram(&buf, ifindex) {
                                if let Some((kind, last_seq)) = self.answer(parsed, &writer, &mut seq, &mut unknown_log, ifindex) {
                                    pending.insert(last_seq, (kind, received));
                                }
                            }
                        }
                        Err(e) => {
                            if e.raw_os_error() == Some(ENOBUFS) {
                                warn!("miss socket overflowed (ENOBUFS): misses were lost; reopening it and resyncing");
                            } else {
                                warn!(error = %e, "miss socket failed; reopening it and resyncing");
                            }
                            let _ = self.resync.try_send(KernelEvent::Overrun);
                            break;
                        }
                    },
                    r = async { ack_buf.clear(); writer.recv(&mut ack_buf).await } => {
                        let Ok(()) = r else { break };
                        for (ack_seq, errno) in acks(&ack_buf) {
                            // An error on the fdb write comes with seq - 1 of its answer.
                            let key = if pending.contains_key(&ack_seq) { ack_seq } else { ack_seq.wrapping_add(1) };
                            let Some(&(kind, started)) = pending.get(&key) else { continue };
                            let counter = if kind == "l3" { &self.metrics.l3miss } else { &self.metrics.l2miss };
                            if errno == 0 {
                                pending.remove(&key);
                                self.metrics.miss_resolve_seconds.observe(started.elapsed().as_secs_f64());
                                counter.with_label_values(&["resolved"]).inc();
                            } else {
                                pending.remove(&key);
                                let hint = if errno == ENOBUFS { " (neighbour table full: gc_thresh3)" } else { "" };
                                warn!(errno, error = %std::io::Error::from_raw_os_error(errno), "answering a miss failed{hint}");
                                counter.with_label_values(&["error"]).inc();
                            }
                        }
                    }
                }
            }
        }
    }

    /// Writes the answer for one miss in a single sendmsg; returns its kind
    /// and the seq whose ack completes it.
    fn answer(
        &self,
        parsed: Parsed,
        writer: &TokioSocket,
        seq: &mut u32,
        log: &mut RateLimited,
        ifindex: u32,
    ) -> Option<(&'static str, u32)> {
        let table = self.table.borrow().clone();
        let (kind, ops) = match parsed {
            Parsed::Ignored => return None,
            Parsed::Malformed(e) => {
                warn!(error = %e, "malformed neighbour notification");
                return None;
            }
            Parsed::Miss(Miss::L3 { ip }) => match table.gateway(&ip) {
                Some(ans) => {
                    self.active.mark(&ans.peer);
                    ("l3", vec![Op::PutFdb { mac: ans.mac, dst: ans.underlay }, Op::PutNeigh { ip, mac: ans.mac }])
                }
                None => {
                    self.unknown("l3", &ip.to_string(), log);
                    return None;
                }
            },
            Parsed::Miss(Miss::L2 { mac }) => match table.mac(&mac) {
                Some(ans) => {
                    self.active.mark(&ans.peer);
                    ("l2", vec![Op::PutFdb { mac: ans.mac, dst: ans.underlay }])
                }
                None => {
                    self.unknown("l2", &mac.to_string(), log);
                    return None;
                }
            },
        };
        // fdb first, then the neighbour, in one datagram: the kernel handles
        // them in order, and the neighbour replaces the INCOMPLETE entry.
        let mut datagram = Vec::with_capacity(256);
        let n = ops.len();
        for (i, op) in ops.iter().enumerate() {
            let mut req = encode_op(ifindex, op);
            *seq = seq.wrapping_add(1);
            stamp(&mut req, *seq, i + 1 == n);
            datagram.extend_from_slice(&req);
        }
        if let Err(e) = writer.socket_ref().send(&datagram, 0) {
            warn!(error = %e, "sending a miss answer failed");
            let counter = if kind == "l3" { &self.metrics.l3miss } else { &self.metrics.l2miss };
            counter.with_label_values(&["error"]).inc();
            return None;
        }
        Some((kind, *seq))
    }

    fn unknown(&self, kind: &str, what: &str, log: &mut RateLimited) {
        let counter = if kind == "l3" { &self.metrics.l3miss } else { &self.metrics.l2miss };
        counter.with_label_values(&["unknown"]).inc();
        if let Some(suppressed) = log.hit(Duration::from_secs(10)) {
            info!(kind, address = %what, suppressed, "miss for an address no peer owns; ignored");
        }
    }
}

/// The socket answers are written on; its acks are read asynchronously.
fn open_writer() -> std::io::Result<TokioSocket> {
    let mut sock = TokioSocket::new(NETLINK_ROUTE)?;
    sock.socket_mut().bind_auto()?;
    crate::dataplane::force_rcvbuf(sock.socket_ref(), 1 << 20)?;
    Ok(sock)
}
