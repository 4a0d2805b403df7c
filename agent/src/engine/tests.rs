//! The reconciler on the recording fake kernel: no root, no namespace.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::*;
use crate::dataplane::fake::{Call, FakeKernel};
use crate::model::fixtures::{device, peer};
use crate::model::{Backend, Mac, Peer, PeerSet, gateway_of};
use crate::ondemand::{ActiveSet, MissTable};
use crate::plan::Op;

fn config(on_demand: Option<OnDemand>) -> EngineConfig {
    EngineConfig {
        backend: Backend::Vxlan,
        device: device(),
        direct: None,
        resync_interval: Duration::from_secs(3600),
        on_demand,
    }
}

fn engine_with(kernel: &FakeKernel, on_demand: Option<OnDemand>) -> (Engine<FakeKernel>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    (Engine::new(kernel.clone(), config(on_demand), metrics.clone()).0, metrics)
}

fn engine(kernel: &FakeKernel) -> (Engine<FakeKernel>, Arc<Metrics>) {
    engine_with(kernel, None)
}

/// What the fake kernel holds for a peer: (fdb, neighbour, route).
fn holds(k: &FakeKernel, p: &Peer) -> (bool, bool, bool) {
    let s = k.state();
    let cidr = p.pod_cidrs[0];
    (
        s.entries.fdb.contains(&(p.vtep_mac, p.underlay_ip)),
        s.entries.neigh.get(&gateway_of(&cidr)) == Some(&p.vtep_mac),
        s.entries.routes.contains_key(&cidr),
    )
}

#[tokio::test]
async fn first_pass_programs_every_peer_and_the_next_writes_nothing() {
    let k = FakeKernel::default();
    let (mut e, _) = engine(&k);
    e.set_peers(&PeerSet::complete([peer(2), peer(3)]));
    let first = e.reconcile().await.unwrap();
    assert_eq!(first.writes, 6, "fdb, neighbour and route per peer");
    assert_eq!(holds(&k, &peer(2)), (true, true, true));
    assert_eq!(holds(&k, &peer(3)), (true, true, true));
    let second = e.reconcile().await.unwrap();
    assert_eq!(second.writes, 0);
    assert_eq!(k.count(|c| matches!(c, Call::Apply(_))), 1, "a pass with nothing to do applies nothing");
}

#[tokio::test]
async fn an_entry_deleted_behind_the_engine_is_put_back_and_counted_as_drift() {
    let k = FakeKernel::default();
    let (mut e, metrics) = engine(&k);
    e.set_peers(&PeerSet::complete([peer(2)]));
    e.reconcile().await.unwrap();
    k.state().entries.routes.clear();
    let r = e.reconcile().await.unwrap();
    assert_eq!(r.drift_repaired, 1);
    assert_eq!(holds(&k, &peer(2)), (true, true, true));
    assert_eq!(metrics.drift_repaired.with_label_values(&["route"]).get(), 1);
    // A new peer is not drift.
    e.set_peers(&PeerSet::complete([peer(2), peer(3)]));
    assert_eq!(e.reconcile().await.unwrap().drift_repaired, 0);
}

#[tokio::test]
async fn nothing_is_swept_until_the_peer_set_is_complete() {
    let k = FakeKernel::default();
    let (mut e, _) = engine(&k);
    e.set_peers(&PeerSet::complete([peer(2), peer(3)]));
    e.reconcile().await.unwrap();
    // A restarted agent: its first, partial listing lacks node-3.
    let (mut restarted, _) = engine(&k);
    restarted.set_peers(&PeerSet { complete: false, ..PeerSet::complete([peer(2)]) });
    restarted.reconcile().await.unwrap();
    assert_eq!(holds(&k, &peer(3)), (true, true, true), "swept before the listing was complete");
    restarted.set_peers(&PeerSet::complete([peer(2)]));
    restarted.reconcile().await.unwrap();
    assert_eq!(holds(&k, &peer(3)), (false, false, false), "not swept once the listing was complete");
    assert_eq!(holds(&k, &peer(2)), (true, true, true));
}

#[tokio::test(start_paused = true)]
async fn a_restarted_engine_sweeps_and_reports_synced_when_the_first_complete_set_arrives() {
    let k = FakeKernel::default();
    let (mut e, _) = engine(&k);
    e.set_peers(&PeerSet::complete([peer(2), peer(3)]));
    e.reconcile().await.unwrap();
    // Restarted while the API server is away: nothing to go on at first.
    let (restarted, mut status) = Engine::new(k.clone(), config(None), Arc::new(Metrics::new()));
    let (peers_tx, peers) = watch::channel(PeerSet::default());
    let (_events_tx, events) = mpsc::channel(8);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let task = tokio::spawn(restarted.run(peers, events, || None, shutdown));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!status.borrow_and_update().synced);
    // The API server is back: node-3 was deleted meanwhile. Nothing in the
    // kernel will echo this change, so the engine must not wait for a
    // notification (or the hourly resync) to sweep it.
    peers_tx.send(PeerSet::complete([peer(2)])).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(holds(&k, &peer(3)), (false, false, false), "node-3 not swept");
    assert!(status.borrow_and_update().synced, "not synced with the complete set");
    shutdown_tx.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn a_deleted_device_comes_back_with_its_mac_and_every_entry() {
    let k = FakeKernel::default();
    let (mut e, metrics) = engine(&k);
    e.set_peers(&PeerSet::complete([peer(2), peer(3)]));
    e.reconcile().await.unwrap();
    let (old_ifindex, mac) = k.state().device.unwrap();
    k.delete_device();
    let r = e.reconcile().await.unwrap();
    let (ifindex, new_mac) = k.state().device.unwrap();
    assert_ne!(ifindex, old_ifindex, "a new device");
    assert_eq!(new_mac, mac, "peers' fdb entries point at the MAC, so it must not change");
    assert_eq!(r.writes, 6);
    assert_eq!(holds(&k, &peer(2)), (true, true, true));
    assert_eq!(metrics.device_recreated.get(), 1);
    assert_eq!(metrics.drift_repaired.with_label_values(&["device"]).get(), 1);
}

#[tokio::test]
async fn a_foreign_route_for_a_pod_cidr_is_left_alone() {
    let k = FakeKernel::default();
    k.state().foreign.insert(peer(2).pod_cidrs[0]);
    let (mut e, _) = engine(&k);
    e.set_peers(&PeerSet::complete([peer(2)]));
    e.reconcile().await.unwrap();
    assert_eq!(holds(&k, &peer(2)), (true, true, false));
    assert!(!k.applied().iter().any(|op| matches!(op, Op::PutRoute { .. })));
}

#[tokio::test(start_paused = true)]
async fn failed_writes_are_retried_after_0_5_1_and_2_seconds() {
    let k = FakeKernel::default();
    for _ in 0..3 {
        k.state().apply_errors.push_back((|op| matches!(op, Op::PutRoute { .. }), libc::ENOBUFS));
    }
    let (e, metrics) = engine(&k);
    let (_peers_tx, peers) = watch::channel(PeerSet::complete([peer(2)]));
    let (_events_tx, events) = mpsc::channel(8);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let start = tokio::time::Instant::now();
    let task = tokio::spawn(e.run(peers, events, || None, shutdown));
    let applies = || k.count(|c| matches!(c, Call::Apply(_)));
    // Just before and just after each retry is due.
    for (at_ms, expected) in [(400, 1), (600, 2), (1400, 2), (1600, 3), (3400, 3), (3600, 4), (60_000, 4)] {
        tokio::time::sleep_until(start + Duration::from_millis(at_ms)).await;
        assert_eq!(applies(), expected, "apply calls at {at_ms} ms");
    }
    assert_eq!(holds(&k, &peer(2)), (true, true, true));
    assert_eq!(metrics.reconcile_total.with_label_values(&["partial"]).get(), 3);
    shutdown_tx.send(true).unwrap();
    task.await.unwrap();
}

/// An engine on the fake kernel, running from a watched peer set, with
/// the senders a test drives it by; a second has passed when it returns.
struct Running {
    peers: watch::Sender<PeerSet>,
    events: mpsc::Sender<KernelEvent>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(e: Engine<FakeKernel>, peers: PeerSet) -> Running {
        let (peers, peers_rx) = watch::channel(peers);
        let (events, events_rx) = mpsc::channel(8);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(e.run(peers_rx, events_rx, || None, shutdown_rx));
        tokio::time::sleep(Duration::from_secs(1)).await;
        Running { peers, events, shutdown, task }
    }

    /// Sends the events, then lets a second pass.
    async fn send(&self, events: impl IntoIterator<Item = KernelEvent>) {
        for e in events {
            self.events.send(e).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    async fn stop(self) {
        self.shutdown.send(true).unwrap();
        self.task.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn lost_notifications_force_a_full_resync() {
    let k = FakeKernel::default();
    let (e, metrics) = engine(&k);
    let running = Running::start(e, PeerSet::complete([peer(2)])).await;
    let dumps = k.count(|c| matches!(c, Call::Dump));
    k.state().entries.neigh.clear();
    running.send([KernelEvent::Overrun]).await;
    assert!(k.count(|c| matches!(c, Call::Dump)) > dumps, "no dump after the overrun");
    assert_eq!(metrics.netlink_enobufs.get(), 1);
    assert_eq!(holds(&k, &peer(2)), (true, true, true), "the resync repaired what the lost notification hid");
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_echo_of_a_wanted_fdb_entry_is_no_drift_but_a_foreign_one_is() {
    let k = FakeKernel::default();
    let (e, _) = engine(&k);
    let running = Running::start(e, PeerSet::complete([peer(2)])).await;
    let ifindex = k.state().device.unwrap().0;
    let dumps = || k.count(|c| matches!(c, Call::Dump));
    let before = dumps();
    let p = peer(2);
    running.send([KernelEvent::FdbAdded { ifindex, mac: Some(p.vtep_mac), dst: Some(p.underlay_ip) }]).await;
    assert_eq!(dumps(), before, "a full pass for an entry weir wants");
    let elsewhere = Some("198.18.0.99".parse().unwrap());
    running.send([KernelEvent::FdbAdded { ifindex, mac: Some(p.vtep_mac), dst: elsewhere }]).await;
    assert!(dumps() > before, "no full pass for an entry pointing elsewhere");
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_fdb_entry_a_peer_gave_up_is_drift_and_the_one_it_took_is_not() {
    let k = FakeKernel::default();
    let (e, _) = engine(&k);
    let running = Running::start(e, PeerSet::complete([peer(2), peer(3)])).await;
    let ifindex = k.state().device.unwrap().0;
    let dumps = || k.count(|c| matches!(c, Call::Dump));
    let echo = |p: &Peer| KernelEvent::FdbAdded { ifindex, mac: Some(p.vtep_mac), dst: Some(p.underlay_ip) };
    let old = peer(2);
    let new = Peer { vtep_mac: Mac([0x0e, 0, 0, 0, 0x22, 0x22]), ..peer(2) };
    running.peers.send_replace(PeerSet::complete([new.clone(), peer(3)]));
    running.send([]).await;
    let before = dumps();
    running.send([echo(&new), echo(&peer(3))]).await;
    assert_eq!(dumps(), before, "a full pass for entries the peers want");
    running.send([echo(&old)]).await;
    assert!(dumps() > before, "no full pass for the entry of the MAC the peer gave up");
    running.peers.send_replace(PeerSet::complete([new]));
    running.send([]).await;
    let before = dumps();
    running.send([echo(&peer(3))]).await;
    assert!(dumps() > before, "no full pass for the entry of a removed peer");
    running.stop().await;
}

fn on_demand(idle: Duration) -> (OnDemand, Arc<ActiveSet>) {
    let active = Arc::new(ActiveSet::default());
    let (table, _) = watch::channel(Arc::new(MissTable::default()));
    (OnDemand { active: active.clone(), table, idle_timeout: Some(idle) }, active)
}

#[tokio::test]
async fn on_demand_routes_every_peer_but_keeps_fdb_and_neighbour_only_for_active_ones() {
    let k = FakeKernel::default();
    let (od, active) = on_demand(Duration::from_secs(3600));
    let (mut e, _) = engine_with(&k, Some(od));
    e.set_peers(&PeerSet::complete([peer(2), peer(3)]));
    e.reconcile().await.unwrap();
    assert_eq!(holds(&k, &peer(2)), (false, false, true));
    assert_eq!(holds(&k, &peer(3)), (false, false, true));
    // The responder answers a miss for node-2, with a neighbour that went
    // wrong on the way: the engine checks answers and corrects them.
    active.mark("node-2");
    let wrong: Mac = "0e:00:00:00:00:99".parse().unwrap();
    k.state().entries.fdb.insert((peer(2).vtep_mac, peer(2).underlay_ip));
    k.state().entries.neigh.insert(gateway_of(&peer(2).pod_cidrs[0]), wrong);
    e.reconcile().await.unwrap();
    assert_eq!(holds(&k, &peer(2)), (true, true, true));
    assert_eq!(holds(&k, &peer(3)), (false, false, true));
}

#[tokio::test]
async fn on_demand_a_peer_change_edits_the_miss_table_and_copies_only_what_it_touched() {
    let k = FakeKernel::default();
    let (od, active) = on_demand(Duration::from_secs(3600));
    let table = od.table.clone();
    let (mut e, _) = engine_with(&k, Some(od));
    let mut peers: Vec<Peer> = (2..=240).map(peer).collect();
    e.set_peers(&PeerSet::complete(peers.clone()));
    let before = table.borrow().clone();
    for p in [&peers[5], &peers[238]] {
        active.mark(&p.name);
    }
    let old_mac = peers[5].vtep_mac;
    peers[5].vtep_mac = "0e:00:00:00:01:07".parse().unwrap();
    let gone = peers.pop().unwrap();
    e.set_peers(&PeerSet::complete(peers.clone()));
    let after = table.borrow().clone();
    assert_eq!(after.mac(&peers[5].vtep_mac).unwrap().underlay, peers[5].underlay_ip);
    assert!(after.mac(&old_mac).is_none() && before.mac(&old_mac).is_some());
    assert!(after.gateway(&gateway_of(&gone.pod_cidrs[0])).is_none());
    assert_eq!(after.gateway(&gateway_of(&peers[0].pod_cidrs[0])).unwrap().mac, peers[0].vtep_mac);
    // Two peers changed: at most two gateway and three MAC shards copied.
    let (shared, total) = after.shared_with(&before);
    assert!(shared >= total - 5, "a change of two peers copied {} of {total} shards", total - shared);
    // The changed peer stays active; the removed one is forgotten.
    assert!(active.contains(&peers[5].name) && !active.contains(&gone.name));
}

#[tokio::test]
async fn on_demand_entries_idle_past_the_timeout_are_removed() {
    let k = FakeKernel::default();
    let (od, active) = on_demand(Duration::from_millis(1));
    let (mut e, _) = engine_with(&k, Some(od));
    e.set_peers(&PeerSet::complete([peer(2)]));
    active.mark("node-2");
    e.reconcile().await.unwrap();
    assert_eq!(holds(&k, &peer(2)), (true, true, true));
    // Neither a packet (the kernel's idle time) nor a miss for 10 ms.
    k.state().entries.fdb_idle.insert(peer(2).vtep_mac, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(10));
    e.reconcile().await.unwrap();
    assert_eq!(holds(&k, &peer(2)), (false, false, true), "idle entries kept");
    assert!(!active.contains("node-2"));
}

#[tokio::test]
async fn on_demand_answers_of_a_restarted_agent_are_kept() {
    let k = FakeKernel::default();
    let (od, active) = on_demand(Duration::from_secs(3600));
    let (mut e, _) = engine_with(&k, Some(od));
    e.set_peers(&PeerSet::complete([peer(2)]));
    e.reconcile().await.unwrap();
    // Entries a previous run wrote, with nothing marked in this one.
    k.state().entries.fdb.insert((peer(2).vtep_mac, peer(2).underlay_ip));
    k.state().entries.neigh.insert(gateway_of(&peer(2).pod_cidrs[0]), peer(2).vtep_mac);
    e.reconcile().await.unwrap();
    assert_eq!(holds(&k, &peer(2)), (true, true, true));
    assert!(active.contains("node-2"));
}

/// The calls a Node event cost, after a first full pass.
fn calls_after(k: &FakeKernel, from: usize) -> Vec<Call> {
    k.state().calls[from..].to_vec()
}

#[tokio::test]
async fn a_node_event_writes_only_its_own_entries_and_dumps_nothing() {
    let k = FakeKernel::default();
    let (mut e, metrics) = engine(&k);
    e.set_peers(&PeerSet::complete([peer(2), peer(3)]));
    e.reconcile().await.unwrap();
    let from = k.state().calls.len();
    e.set_peers(&PeerSet::complete([peer(2), peer(3), peer(4)]));
    let r = e.apply_changes().await.unwrap();
    let calls = calls_after(&k, from);
    assert_eq!(
        calls,
        vec![
            Call::ForeignAmong(peer(4).pod_cidrs.clone()),
            Call::Apply(vec![
                Op::PutFdb { mac: peer(4).vtep_mac, dst: peer(4).underlay_ip },
                Op::PutNeigh { ip: gateway_of(&peer(4).pod_cidrs[0]), mac: peer(4).vtep_mac },
                Op::PutRoute {
                    dst: peer(4).pod_cidrs[0],
                    to: crate::plan::RouteTo {
                        gateway: gateway_of(&peer(4).pod_cidrs[0]),
                        dev: crate::plan::Dev::Overlay
                    },
                    nhid: None,
                },
            ]),
        ]
    );
    assert_eq!((r.writes, r.failures), (3, 0));
    assert_eq!(holds(&k, &peer(4)), (true, true, true));
    assert_eq!(metrics.routes.get(), 3, "the route gauge follows the change without a dump");
    // Removing a peer deletes its entries alone.
    let from = k.state().calls.len();
    e.set_peers(&PeerSet::complete([peer(2), peer(4)]));
    e.apply_changes().await.unwrap();
    let writes: Vec<Op> = calls_after(&k, from)
        .into_iter()
        .flat_map(|c| match c {
            Call::Apply(ops) => ops,
            other => panic!("{other:?} for a removal"),
        })
        .collect();
    assert_eq!(writes.len(), 3, "{writes:?}");
    assert!(writes.iter().all(|op| op.is_delete()));
    assert_eq!(holds(&k, &peer(3)), (false, false, false));
    // And the next full pass has nothing to do: the kernel is as desired.
    assert_eq!(e.reconcile().await.unwrap().writes, 0);
}

#[tokio::test]
async fn changes_before_anything_was_applied_take_a_full_pass() {
    let k = FakeKernel::default();
    let (mut e, _) = engine(&k);
    e.set_peers(&PeerSet::complete([peer(2)]));
    e.apply_changes().await.unwrap();
    assert_eq!(k.count(|c| matches!(c, Call::Dump)), 2, "a full pass (dump, apply, dump)");
    assert_eq!(holds(&k, &peer(2)), (true, true, true));
}

#[tokio::test]
async fn a_node_event_leaves_a_foreign_route_alone() {
    let k = FakeKernel::default();
    let (mut e, _) = engine(&k);
    e.set_peers(&PeerSet::complete([peer(2)]));
    e.reconcile().await.unwrap();
    k.state().foreign.insert(peer(5).pod_cidrs[0]);
    e.set_peers(&PeerSet::complete([peer(2), peer(5)]));
    e.apply_changes().await.unwrap();
    assert_eq!(holds(&k, &peer(5)), (true, true, false));
}

#[tokio::test]
async fn on_demand_a_node_event_writes_the_route_of_an_inactive_peer_only() {
    let k = FakeKernel::default();
    let (od, active) = on_demand(Duration::from_secs(3600));
    let (mut e, _) = engine_with(&k, Some(od));
    e.set_peers(&PeerSet::complete([peer(2)]));
    active.mark("node-2");
    e.reconcile().await.unwrap();
    let from = k.state().calls.len();
    let mut moved = peer(2);
    moved.underlay_ip = "198.18.0.99".parse().unwrap();
    e.set_peers(&PeerSet::complete([moved.clone(), peer(3)]));
    e.apply_changes().await.unwrap();
    let writes: Vec<Op> = calls_after(&k, from)
        .into_iter()
        .filter_map(|c| match c {
            Call::Apply(ops) => Some(ops),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(writes.contains(&Op::PutFdb { mac: moved.vtep_mac, dst: moved.underlay_ip }), "{writes:?}");
    assert!(writes.iter().any(|op| matches!(op, Op::PutRoute { dst, .. } if *dst == peer(3).pod_cidrs[0])));
    assert!(!writes.iter().any(|op| matches!(op, Op::PutFdb { mac, .. } if *mac == peer(3).vtep_mac)), "{writes:?}");
    assert_eq!(holds(&k, &moved), (true, true, true));
}

#[tokio::test]
async fn a_new_set_is_walked_side_by_side_and_only_what_differs_is_noted() {
    let k = FakeKernel::default();
    let (mut e, _) = engine(&k);
    e.set_peers(&PeerSet::complete([peer(2), peer(4), peer(6)]));
    e.changes.clear();
    let moved = Peer { vtep_mac: "0e:00:00:00:00:44".parse().unwrap(), ..peer(4) };
    // Names interleave: 3 is new, 4 changed, 6 unchanged, 7 new, 2 absent.
    let partial = PeerSet { complete: false, ..PeerSet::complete([peer(3), moved.clone(), peer(6), peer(7)]) };
    e.set_peers(&partial);
    let noted: Vec<&String> = e.changes.keys().collect();
    assert_eq!(noted, [&peer(3).name, &peer(4).name, &peer(7).name], "a partial set removes nothing");
    assert_eq!(e.changes[&peer(4).name].0, Some(peer(4)), "the old value is kept for the write");
    assert_eq!(e.peers.peers.len(), 5);
    assert!(e.peers.complete, "a partial set after a complete one leaves it complete");
    e.changes.clear();
    e.set_peers(&PeerSet::complete([peer(3), moved.clone(), peer(7)]));
    let noted: Vec<&String> = e.changes.keys().collect();
    assert_eq!(noted, [&peer(2).name, &peer(6).name], "a complete set removes what it lacks");
    assert_eq!(e.peers, PeerSet::complete([peer(3), moved, peer(7)]));
}

#[tokio::test]
async fn a_source_that_logs_its_edits_is_followed_by_them() {
    let k = FakeKernel::default();
    let (mut e, _) = engine(&k);
    let mut source = PeerSet::complete([peer(2), peer(3)]);
    source.edits.replaced();
    e.set_peers(&source);
    e.reconcile().await.unwrap();
    // Added, changed and removed peers, each logged as the publisher logs
    // them: the engine finds them without a walk over every peer.
    let moved = Peer { underlay_ip: "198.18.0.99".parse().unwrap(), ..peer(3) };
    for (name, value) in [("node-4", Some(peer(4))), ("node-3", Some(moved.clone())), ("node-2", None)] {
        match value {
            Some(p) => source.peers.insert(name.into(), p),
            None => source.peers.remove(name),
        };
        source.edits.touched(name);
    }
    e.set_peers(&source);
    e.apply_changes().await.unwrap();
    assert_eq!(holds(&k, &peer(4)), (true, true, true));
    assert_eq!(holds(&k, &moved), (true, true, true));
    assert_eq!(holds(&k, &peer(2)), (false, false, false));
    assert_eq!(e.peers.peers, source.peers);
}
