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

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use netlink_packet_route::neighbour::{NeighbourFlags, NeighbourState};
use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket, protocols::NETLINK_ROUTE};
use rtnetlink::Handle;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::miss::{Miss, Parsed, parse_datagram};
use super::{ActiveSet, Answer, MissTable};
use crate::dataplane::events::KernelEvent;
use crate::engine::EngineStatus;
use crate::metrics::Metrics;

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

type Pending =
    std::pin::Pin<Box<dyn std::future::Future<Output = (&'static str, Instant, Result<(), rtnetlink::Error>)> + Send>>;

impl Responder {
    pub async fn run(self, handle: Handle) {
        let mut unknown_log = RateLimited { last: None, suppressed: 0 };
        loop {
            let sock = match open_socket(self.rcvbuf) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot open the miss socket; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            info!(rcvbuf = self.rcvbuf, "listening for L2/L3 misses");
            let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
            let mut inflight: FuturesUnordered<Pending> = FuturesUnordered::new();
            loop {
                tokio::select! {
                    r = async { buf.clear(); sock.recv(&mut buf).await } => match r {
                        Ok(()) => {
                            let received = Instant::now();
                            let ifindex = self.status.borrow().ifindex;
                            for parsed in parse_datagram(&buf, ifindex) {
                                self.answer(parsed, received, &handle, &mut inflight, &mut unknown_log, ifindex);
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
                    Some((kind, started, result)) = inflight.next(), if !inflight.is_empty() => {
                        let counter = if kind == "l3" { &self.metrics.l3miss } else { &self.metrics.l2miss };
                        match result {
                            Ok(()) => {
                                self.metrics.miss_resolve_seconds.observe(started.elapsed().as_secs_f64());
                                counter.with_label_values(&["resolved"]).inc();
                            }
                            Err(e) => {
                                let errno = crate::dataplane::netlink::errno(&e);
                                let hint = if errno == ENOBUFS { " (neighbour table full: gc_thresh3)" } else { "" };
                                warn!(error = %e, errno, "answering a miss failed{hint}");
                                counter.with_label_values(&["error"]).inc();
                            }
                        }
                    }
                }
            }
        }
    }

    fn answer(
        &self,
        parsed: Parsed,
        received: Instant,
        handle: &Handle,
        inflight: &mut FuturesUnordered<Pending>,
        log: &mut RateLimited,
        ifindex: u32,
    ) {
        let table = self.table.borrow().clone();
        match parsed {
            Parsed::Ignored => {}
            Parsed::Malformed(e) => warn!(error = %e, "malformed neighbour notification"),
            Parsed::Miss(Miss::L3 { ip }) => match table.gateway(&ip) {
                Some(ans) => {
                    self.active.mark(&ans.peer);
                    inflight.push(Box::pin(l3_answer(handle.clone(), ifindex, ip, ans.clone(), received)));
                }
                None => self.unknown("l3", &ip.to_string(), log),
            },
            Parsed::Miss(Miss::L2 { mac }) => match table.mac(&mac) {
                Some(ans) => {
                    self.active.mark(&ans.peer);
                    inflight.push(Box::pin(l2_answer(handle.clone(), ifindex, ans.clone(), received)));
                }
                None => self.unknown("l2", &mac.to_string(), log),
            },
        }
    }

    fn unknown(&self, kind: &str, what: &str, log: &mut RateLimited) {
        let counter = if kind == "l3" { &self.metrics.l3miss } else { &self.metrics.l2miss };
        counter.with_label_values(&["unknown"]).inc();
        if let Some(suppressed) = log.hit(Duration::from_secs(10)) {
            info!(kind, address = %what, suppressed, "miss for an address no peer owns; ignored");
        }
    }
}

fn fdb_put(
    handle: &Handle,
    ifindex: u32,
    ans: &Answer,
) -> impl std::future::Future<Output = Result<(), rtnetlink::Error>> + use<> {
    handle
        .neighbours()
        .add_bridge(ifindex, &ans.mac.0)
        .destination(ans.underlay)
        .flags(NeighbourFlags::Own)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
}

async fn l3_answer(
    handle: Handle,
    ifindex: u32,
    ip: std::net::IpAddr,
    ans: Answer,
    received: Instant,
) -> (&'static str, Instant, Result<(), rtnetlink::Error>) {
    let fdb = fdb_put(&handle, ifindex, &ans);
    let neigh = handle
        .neighbours()
        .add(ifindex, ip)
        .link_layer_address(&ans.mac.0)
        .state(NeighbourState::Permanent)
        .replace()
        .execute();
    // join! polls fdb first, so its request is queued on the socket first.
    let (a, b) = futures::join!(fdb, neigh);
    ("l3", received, a.and(b))
}

async fn l2_answer(
    handle: Handle,
    ifindex: u32,
    ans: Answer,
    received: Instant,
) -> (&'static str, Instant, Result<(), rtnetlink::Error>) {
    ("l2", received, fdb_put(&handle, ifindex, &ans).await)
}
