//! A Node event, applied in proportion to the change: the entries of the
//! peers that changed, old against new, written straight away. No kernel
//! dump and no diff over the whole cluster; those stay with the full pass
//! (`reconcile`), which still runs for the periodic resync, for kernel
//! events, after a failure, and before anything was applied.

use std::collections::BTreeMap;
use std::time::Instant;

use ipnet::IpNet;
use tracing::{info, warn};

use super::{Engine, Report};
use crate::dataplane::{Kernel, KernelError};
use crate::metrics::labels;
use crate::model::{Peer, PeerSet, changes_since};
use crate::plan::{self, DesiredState, KernelState};

/// Peers changed since entries were last written, each with the value the
/// kernel holds for it (None: it was no peer) and whether it was active
/// (on-demand mode: its fdb and neighbour entries were in).
pub(super) type Changes = BTreeMap<String, (Option<Peer>, bool)>;

impl<K: Kernel> Engine<K> {
    /// Notes and logs what `next` changes, and returns each peer that differs
    /// with its new value: added or changed, or None when removed, which only
    /// a complete `next` does.
    pub(super) fn note_changes(&mut self, next: &PeerSet) -> Vec<(String, Option<Peer>)> {
        let mut differ = Vec::new();
        // A partial set never removes, so the engine's peers may hold more
        // than it: only a complete one is followed by its edits.
        let seen = self.seen_edits.filter(|_| next.complete);
        for (name, old, new) in changes_since(&self.peers.peers, next, seen, |a, b| a == b) {
            match (old, new) {
                (Some(o), Some(n)) => info!(
                    node = %name, ip = %n.underlay_ip, mac = %n.vtep_mac, cidrs = ?n.pod_cidrs,
                    old_ip = %o.underlay_ip, old_mac = %o.vtep_mac, old_cidrs = ?o.pod_cidrs, "peer changed"
                ),
                (None, Some(n)) => {
                    info!(node = %name, ip = %n.underlay_ip, mac = %n.vtep_mac, cidrs = ?n.pod_cidrs, "peer added")
                }
                // A partial set never removes (`set_peers`).
                (_, None) if !next.complete => continue,
                (_, None) => info!(node = %name, "peer removed"),
            }
            differ.push((name.clone(), new.cloned()));
            if !self.changes.contains_key(name) {
                let active = old.is_some() && self.cfg.on_demand.as_ref().is_none_or(|od| od.active.contains(name));
                self.changes.insert(name.clone(), (old.cloned(), active));
            }
        }
        self.seen_edits = Some(next.edits.version());
        differ
    }

    /// The entries of `peers` weir keeps: all of them in full mode; in
    /// on-demand mode routes for all, fdb and neighbour for the active ones.
    fn entries_of<'a>(&self, peers: impl IntoIterator<Item = (&'a Peer, bool)>) -> DesiredState {
        let (all, active): (Vec<_>, Vec<_>) = peers.into_iter().map(|(p, a)| (p, a.then_some(p))).unzip();
        let direct = self.cfg.direct.as_ref();
        let mut state = plan::desired_state(self.cfg.backend, direct, all);
        if self.cfg.on_demand.is_some() {
            let tunnelled = plan::desired_state(self.cfg.backend, direct, active.into_iter().flatten());
            state.fdb = tunnelled.fdb;
            state.neigh = tunnelled.neigh;
        }
        state
    }

    /// Writes the entries of the peers that changed. A failure, or nothing
    /// applied yet to build on, hands over to a full pass.
    pub async fn apply_changes(&mut self) -> Result<Report, KernelError> {
        let changes = std::mem::take(&mut self.changes);
        if changes.is_empty() {
            return Ok(Report::default());
        }
        let applied = self.applied_generation.is_some() || self.applied_on_demand.is_some();
        if !applied || self.ifindex == 0 {
            return self.reconcile().await;
        }
        let started = Instant::now();
        let old = self.entries_of(changes.values().filter_map(|(p, active)| p.as_ref().map(|p| (p, *active))));
        let od = self.cfg.on_demand.as_ref();
        let now = changes
            .keys()
            .filter_map(|name| self.peers.peers.get(name).map(|p| (p, od.is_none_or(|od| od.active.contains(name)))));
        let new = self.entries_of(now);
        let before = KernelState::as_applied(&old, self.ifindex, self.nexthops_supported);
        let mut ops = plan::diff(&new, &before, self.ifindex, self.peers.complete);
        // A prefix routed for the first time may already be somebody else's.
        let added: Vec<IpNet> = new.routes.keys().filter(|c| !old.routes.contains_key(c)).copied().collect();
        if !added.is_empty() {
            let foreign = self.kernel.foreign_among(&added).await?;
            for cidr in &foreign {
                warn!(%cidr, "a route for this pod CIDR exists with another protocol; leaving it alone");
            }
            ops.retain(|op| !matches!(op, plan::Op::PutRoute { dst, .. } if foreign.contains(dst)));
        }
        let mut report = Report { writes: ops.len(), ..Default::default() };
        if !ops.is_empty() {
            let results = self.kernel.apply(self.ifindex, &ops).await;
            for (op, result) in ops.iter().zip(&results) {
                let outcome = if result.is_ok() { labels::SUCCESS } else { labels::ERROR };
                self.metrics.netlink_ops.with_label_values(&[op.verb(), op.object(), outcome]).inc();
                if let Err(e) = result {
                    warn!(entry = %op, error = %e, errno = ?e.errno(), "netlink write failed; a full pass follows");
                    report.failures += 1;
                }
            }
        }
        self.metrics.phase_seconds.with_label_values(&[labels::CHANGE]).observe(started.elapsed().as_secs_f64());
        if report.failures > 0 {
            return Ok(report);
        }
        if self.cfg.on_demand.is_none() {
            self.applied_generation = Some(self.generation);
        }
        // What the kernel holds moved by what was written; the next full
        // pass reads it again.
        let delta = |new: usize, old: usize| new as i64 - old as i64;
        let (fdb, neigh, routes) = (
            delta(new.fdb.len(), old.fdb.len()),
            delta(new.neigh.len(), old.neigh.len()),
            delta(new.routes.len(), old.routes.len()),
        );
        self.metrics.fdb_entries.add(fdb);
        self.metrics.neigh_entries.add(neigh);
        self.metrics.routes.add(routes);
        self.status.send_modify(|s| {
            s.peers = self.peers.peers.len();
            s.fdb_entries = s.fdb_entries.saturating_add_signed(fdb as isize);
            s.neigh_entries = s.neigh_entries.saturating_add_signed(neigh as isize);
            s.routes = s.routes.saturating_add_signed(routes as isize);
        });
        Ok(report)
    }
}
