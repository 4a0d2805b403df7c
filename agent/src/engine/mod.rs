//! The reconciler: keeps the kernel equal to the desired state of the latest
//! peer set. In on-demand mode the miss responder (`ondemand`) writes its
//! answers directly, for speed; the engine hands it what to answer from and
//! checks every answer on its next pass. The dependency runs one way: the
//! engine knows `ondemand`, not the reverse.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::dataplane::events::KernelEvent;
use crate::dataplane::{DeviceAction, DeviceSpec, Kernel, KernelError};
use crate::health::Heartbeat;
use crate::metrics::{Metrics, labels};
use crate::model::{Backend, Mac, Peer, PeerSet};
use crate::ondemand::{ActiveSet, MissTable};
use crate::plan::{self, DesiredState, KernelState};

/// The engine's loop turns at least this often, with or without work, so
/// that a stuck loop shows on `/healthz` (see `health`).
pub const HEARTBEAT: Duration = Duration::from_secs(5);

pub struct EngineConfig {
    pub backend: Backend,
    pub device: DeviceSpec,
    /// Direct routing to peers on this node's underlay subnet.
    pub direct: Option<plan::Direct>,
    pub resync_interval: Duration,
    /// Set in on-demand mode: fdb and neighbour entries only for active peers.
    pub on_demand: Option<OnDemand>,
}

pub struct OnDemand {
    pub active: Arc<ActiveSet>,
    pub table: watch::Sender<Arc<MissTable>>,
    /// Remove a peer's fdb and neighbour entries after this long unused.
    pub idle_timeout: Option<Duration>,
}

/// What the engine last saw and did; read by health checks and `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStatus {
    pub device_ready: bool,
    /// A complete peer set has been applied at least once.
    pub synced: bool,
    pub ifindex: u32,
    pub vtep_mac: Option<Mac>,
    pub peers: usize,
    pub fdb_entries: usize,
    pub neigh_entries: usize,
    pub routes: usize,
    pub last_error: Option<String>,
    /// Milliseconds since the Unix epoch of the last reconcile pass.
    pub last_reconcile_unix_ms: u128,
    /// On-demand mode: seconds since each active peer's last miss.
    pub last_miss_seconds: std::collections::BTreeMap<String, u64>,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub writes: usize,
    pub failures: usize,
    pub drift_repaired: usize,
    pub device: Option<String>,
}

pub struct Engine<K> {
    kernel: K,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    peers: PeerSet,
    desired: DesiredState,
    /// The generation `desired` was built for.
    desired_generation: Option<u64>,
    /// Bumped whenever the peer set changes.
    generation: u64,
    /// What the last pass that applied without error aimed at: a generation
    /// in full mode, the desired state itself in on-demand mode (where it
    /// also moves with traffic). Work found for the same target is drift.
    applied_generation: Option<u64>,
    applied_on_demand: Option<DesiredState>,
    /// Peers changed since entries were last written (`change.rs`).
    changes: change::Changes,
    /// The version of the source's peer set last noted (`model::Edits`).
    seen_edits: Option<u64>,
    /// Whether the last dump found nexthop objects (kernels since 5.3).
    nexthops_supported: bool,
    /// Every peer's fdb entry, so that the echo of one is recognised without
    /// walking all peers: each of our own fdb writes is echoed back.
    peer_fdb: PeerFdb,
    ifindex: u32,
    consecutive_failures: u32,
    status: watch::Sender<EngineStatus>,
    heartbeat: Heartbeat,
}

impl<K: Kernel> Engine<K> {
    pub fn new(kernel: K, cfg: EngineConfig, metrics: Arc<Metrics>) -> (Self, watch::Receiver<EngineStatus>) {
        let (status, status_rx) = watch::channel(EngineStatus::default());
        let engine = Engine {
            kernel,
            cfg,
            metrics,
            peers: PeerSet::default(),
            desired: DesiredState::default(),
            desired_generation: None,
            generation: 0,
            applied_generation: None,
            applied_on_demand: None,
            changes: Default::default(),
            seen_edits: None,
            nexthops_supported: false,
            peer_fdb: PeerFdb::default(),
            ifindex: 0,
            consecutive_failures: 0,
            status,
            heartbeat: Heartbeat::default(),
        };
        (engine, status_rx)
    }

    /// Beats on every turn of `run`'s loop.
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// Brings the peer set up to `next`, logging per peer what changed. Only
    /// the peers that differ are copied: a Node event costs a walk over the
    /// set, not a copy of it.
    pub fn set_peers(&mut self, next: &PeerSet) {
        // Until the set is complete, what is known is kept and added to (no
        // removals are noted), so a partial listing never shrinks the
        // desired state.
        let (mut gone, mut came) = (Vec::new(), Vec::new());
        for (name, peer) in self.note_changes(next) {
            let old = match peer {
                Some(peer) => {
                    self.peer_fdb.add(&peer);
                    came.push(name.clone());
                    self.peers.peers.insert(name, peer)
                }
                None => self.peers.peers.remove(&name),
            };
            if let Some(old) = old {
                self.peer_fdb.remove(&old);
                gone.push(old);
            }
        }
        self.peers.complete |= next.complete;
        // The desired state of every peer is rebuilt by the next full pass,
        // not here: a Node event writes only what it changed (`change.rs`).
        self.generation += 1;
        if let Some(od) = &self.cfg.on_demand
            && !(gone.is_empty() && came.is_empty())
        {
            let mut table = MissTable::clone(&od.table.borrow());
            table.edit(&gone, came.iter().filter_map(|n| self.peers.peers.get(n)), &od.active);
            od.table.send_replace(Arc::new(table));
            od.active.forget(gone.iter().map(|p| p.name.as_str()).filter(|n| !self.peers.peers.contains_key(*n)));
        }
        self.metrics.peers.with_label_values(&[labels::ACCEPTED]).set(self.peers.peers.len() as i64);
    }

    /// In on-demand mode, the desired state holds routes for every peer but
    /// fdb and neighbour entries only for active ones. Entries already in the
    /// kernel for a known peer make it active (so a restart keeps them); idle
    /// ones past the timeout make it inactive (so they are removed).
    fn on_demand_desired(&self, kernel: &KernelState) -> Option<DesiredState> {
        let od = self.cfg.on_demand.as_ref()?;
        for peer in self.peers.peers.values() {
            let installed = kernel.fdb.contains(&(peer.vtep_mac, peer.underlay_ip));
            if installed && !od.active.contains(&peer.name) {
                od.active.mark(&peer.name);
            }
            if let (Some(limit), Some(idle)) = (od.idle_timeout, kernel.fdb_idle.get(&peer.vtep_mac)) {
                let last_miss = od.active.last_miss(&peer.name).unwrap_or(Duration::MAX);
                if installed && *idle > limit && last_miss > limit {
                    info!(node = %peer.name, idle = ?idle, "peer idle; removing its on-demand entries");
                    od.active.remove(&peer.name);
                }
            }
        }
        let active = self.peers.peers.values().filter(|p| od.active.contains(&p.name));
        let subset = plan::desired_state(self.cfg.backend, self.cfg.direct.as_ref(), active);
        Some(DesiredState { fdb: subset.fdb, neigh: subset.neigh, routes: self.desired.routes.clone() })
    }

    /// One pass: device, dump, diff, apply.
    pub async fn reconcile(&mut self) -> Result<Report, KernelError> {
        let started = Instant::now();
        let result = self.reconcile_inner().await;
        self.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(r) if r.failures == 0 => labels::SUCCESS,
            Ok(_) => labels::PARTIAL,
            Err(_) => labels::ERROR,
        };
        self.metrics.reconcile_total.with_label_values(&[label]).inc();
        let failed = !matches!(&result, Ok(r) if r.failures == 0);
        self.consecutive_failures = if failed { self.consecutive_failures + 1 } else { 0 };
        let error = match &result {
            Err(e) => Some(e.to_string()),
            Ok(r) if r.failures > 0 => Some(format!("{} netlink writes failed", r.failures)),
            Ok(_) => None,
        };
        self.status.send_modify(|s| {
            s.last_error = error;
            s.last_reconcile_unix_ms =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        });
        result
    }

    async fn reconcile_inner(&mut self) -> Result<Report, KernelError> {
        let mut report = Report::default();
        let t = Instant::now();
        let device = self.kernel.ensure_device(&self.cfg.device).await;
        self.metrics.phase_seconds.with_label_values(&[labels::DEVICE]).observe(t.elapsed().as_secs_f64());
        let device = match device {
            Ok(d) => d,
            Err(e) => {
                self.status.send_modify(|s| s.device_ready = false);
                return Err(e);
            }
        };
        match &device.action {
            DeviceAction::Adopted { fixed } if fixed.is_empty() => {}
            action => {
                if self.ifindex != 0 {
                    warn!(device = %self.cfg.device.name, %action, "overlay device repaired");
                    self.metrics.drift_repaired.with_label_values(&[labels::DEVICE]).inc();
                    if !matches!(action, DeviceAction::Adopted { .. }) {
                        self.metrics.device_recreated.inc();
                    }
                } else {
                    info!(device = %self.cfg.device.name, %action, ifindex = device.ifindex, "overlay device ready");
                }
                report.device = Some(action.to_string());
            }
        }
        // Keep whatever MAC the device has from now on, so a recreated device
        // keeps every peer's fdb entries pointing at the right address.
        if self.cfg.device.mac.is_none() {
            self.cfg.device.mac = device.mac;
        }
        if self.ifindex != device.ifindex
            && let Some(od) = &self.cfg.on_demand
        {
            od.table.send_modify(|t| Arc::make_mut(t).ifindex = device.ifindex);
        }
        self.ifindex = device.ifindex;
        self.status.send_modify(|s| {
            s.device_ready = true;
            s.ifindex = device.ifindex;
            s.vtep_mac = device.mac;
        });

        // A full pass covers every change noted so far.
        self.changes.clear();
        if self.desired_generation != Some(self.generation) {
            self.desired = plan::desired_state(self.cfg.backend, self.cfg.direct.as_ref(), self.peers.peers.values());
            self.desired_generation = Some(self.generation);
        }
        let t = Instant::now();
        let mut kernel = self.kernel.dump(self.ifindex).await?;
        self.nexthops_supported = kernel.nexthops.is_some();
        self.metrics.phase_seconds.with_label_values(&["dump"]).observe(t.elapsed().as_secs_f64());
        let on_demand = self.on_demand_desired(&kernel);
        let desired = on_demand.as_ref().unwrap_or(&self.desired);
        let mut ops = plan::diff(desired, &kernel, self.ifindex, self.peers.complete);
        if ops.iter().any(|op| matches!(op, plan::Op::PutRoute { .. })) {
            // About to add routes: first make sure none would overwrite somebody else's.
            kernel.foreign_routes = self.kernel.foreign_routes().await?;
            for cidr in plan::blocked_routes(desired, &kernel) {
                warn!(%cidr, "a route for this pod CIDR exists with another protocol; leaving it alone");
            }
            ops = plan::diff(desired, &kernel, self.ifindex, self.peers.complete);
        }
        let after = if ops.is_empty() {
            kernel
        } else {
            let is_drift = match &on_demand {
                Some(d) => self.applied_on_demand.as_ref() == Some(d),
                None => self.applied_generation == Some(self.generation),
            };
            let t = Instant::now();
            let results = self.kernel.apply(self.ifindex, &ops).await;
            self.metrics.phase_seconds.with_label_values(&["apply"]).observe(t.elapsed().as_secs_f64());
            for (op, result) in ops.iter().zip(&results) {
                let outcome = if result.is_ok() { labels::SUCCESS } else { labels::ERROR };
                self.metrics.netlink_ops.with_label_values(&[op.verb(), op.object(), outcome]).inc();
                match result {
                    Ok(()) if is_drift => {
                        warn!(entry = %op, "kernel drift repaired");
                        self.metrics.drift_repaired.with_label_values(&[op.object()]).inc();
                        report.drift_repaired += 1;
                    }
                    Ok(()) => {}
                    Err(e) => {
                        warn!(entry = %op, error = %e, errno = ?e.errno(), "netlink write failed; will retry");
                        report.failures += 1;
                    }
                }
            }
            report.writes = ops.len();
            self.kernel.dump(self.ifindex).await?
        };
        let synced_now = report.failures == 0 && self.peers.complete;
        if report.failures == 0 {
            match &on_demand {
                Some(d) if self.applied_on_demand.as_ref() != Some(d) => self.applied_on_demand = Some(d.clone()),
                Some(_) => {}
                None => self.applied_generation = Some(self.generation),
            }
        }
        self.publish_counts(&after, synced_now);
        Ok(report)
    }

    fn publish_counts(&self, k: &KernelState, synced_now: bool) {
        self.metrics.fdb_entries.set(k.fdb.len() as i64);
        self.metrics.neigh_entries.set(k.neigh.len() as i64);
        self.metrics.routes.set(k.routes.len() as i64);
        self.status.send_modify(|s| {
            s.synced |= synced_now;
            s.peers = self.peers.peers.len();
            s.fdb_entries = k.fdb.len();
            s.neigh_entries = k.neigh.len();
            s.routes = k.routes.len();
            if let Some(od) = &self.cfg.on_demand {
                s.last_miss_seconds = self
                    .peers
                    .peers
                    .values()
                    .filter_map(|p| od.active.last_miss(&p.name).map(|d| (p.name.clone(), d.as_secs())))
                    .collect();
            }
        });
    }

    /// The delay before retrying after failed passes: 0.5 s doubling to 30 s.
    fn retry_delay(&self) -> Option<Duration> {
        (self.consecutive_failures > 0).then(|| {
            Duration::from_millis(500 * 2u64.pow(self.consecutive_failures.min(6) - 1)).min(Duration::from_secs(30))
        })
    }

    fn concerns_us(&self, event: &KernelEvent) -> bool {
        match event {
            KernelEvent::Changed { ifindex, ours } => *ours || (*ifindex != 0 && *ifindex == self.ifindex),
            KernelEvent::FdbAdded { ifindex, mac, dst } => {
                *ifindex == self.ifindex && !matches!((mac, dst), (Some(m), Some(d)) if self.peer_fdb.has(*m, *d))
            }
            KernelEvent::Overrun | KernelEvent::Closed => true,
        }
    }

    /// Runs until `peers` is closed and `shutdown` fires. Triggers: a new peer
    /// set, the resync timer, a kernel event on our device, a retry after
    /// failure. Events arriving during a pass are folded into the next one.
    pub async fn run(
        mut self,
        mut peers: watch::Receiver<PeerSet>,
        mut events: mpsc::Receiver<KernelEvent>,
        mut reopen_events: impl FnMut() -> Option<mpsc::Receiver<KernelEvent>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // The first pass runs right below; an interval's first tick is
        // immediate and would repeat it.
        let every = self.cfg.resync_interval;
        let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut peers_open = true;
        self.set_peers(&peers.borrow_and_update());
        loop {
            self.heartbeat.beat();
            if let Err(e) = self.reconcile().await {
                warn!(error = %e, "reconcile failed; will retry");
            }
            self.heartbeat.beat();
            let retry = self.retry_delay();
            let retry_sleep = tokio::time::sleep(retry.unwrap_or(Duration::from_secs(3600)));
            tokio::pin!(retry_sleep);
            loop {
                tokio::select! {
                    changed = peers.changed(), if peers_open => {
                        if changed.is_err() {
                            peers_open = false;
                            continue;
                        }
                        let was_complete = self.peers.complete;
                        self.set_peers(&peers.borrow_and_update());
                        // The first complete set gets a full pass: it sweeps the
                        // entries of Nodes deleted while weir was away, which no
                        // change names, and only a pass over everything makes
                        // the dataplane synced.
                        if self.peers.complete && !was_complete {
                            break;
                        }
                        // The change alone, at once; a full pass only if that failed.
                        match self.apply_changes().await {
                            Ok(r) if r.failures == 0 && self.retry_delay().is_none() => self.heartbeat.beat(),
                            Ok(_) => break,
                            Err(e) => {
                                warn!(error = %e, "applying a peer change failed; full pass");
                                break;
                            }
                        }
                    }
                    _ = resync.tick() => break,
                    _ = heartbeat.tick() => self.heartbeat.beat(),
                    _ = &mut retry_sleep, if retry.is_some() => break,
                    event = events.recv() => match event {
                        Some(e) if self.concerns_us(&e) => {
                            if matches!(e, KernelEvent::Overrun) {
                                warn!("kernel notifications were lost (ENOBUFS); full resync");
                                self.metrics.netlink_enobufs.inc();
                            }
                            if matches!(e, KernelEvent::Closed)
                                && let Some(rx) = reopen_events() { events = rx; }
                            // Let a burst settle so it costs one pass, not hundreds.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            while events.try_recv().is_ok() {}
                            break;
                        }
                        Some(_) => {}
                        None => {
                            if let Some(rx) = reopen_events() { events = rx; } else { tokio::time::sleep(Duration::from_secs(1)).await; }
                        }
                    },
                    _ = shutdown.changed() => {
                        info!("shutting down; the dataplane is left in place");
                        return;
                    }
                }
            }
        }
    }
}

/// The fdb entries (VTEP MAC, underlay) of the engine's peers, each with the
/// number of peers that want it.
#[derive(Debug, Default)]
struct PeerFdb(HashMap<(Mac, IpAddr), u32>);

impl PeerFdb {
    fn add(&mut self, p: &Peer) {
        *self.0.entry((p.vtep_mac, p.underlay_ip)).or_default() += 1;
    }

    fn remove(&mut self, p: &Peer) {
        let key = (p.vtep_mac, p.underlay_ip);
        if let Some(n) = self.0.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&key);
            }
        }
    }

    fn has(&self, mac: Mac, underlay: IpAddr) -> bool {
        self.0.contains_key(&(mac, underlay))
    }
}

mod change;

#[cfg(test)]
mod tests;
