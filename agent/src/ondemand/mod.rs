//! On-demand mode: answer the kernel's L2MISS/L3MISS notifications as they come,
//! so a node carries fdb and neighbour entries only for peers it talks to.
//!
//! Answers are permanent entries (non-permanent ones count against the
//! machine-wide gc_thresh3 and fail with ENOBUFS past ~1024). weir owns their
//! lifetime: the engine keeps them while the peer exists, sweeps them when it
//! goes, and an optional idle timeout removes the unused ones.

pub mod miss;
pub mod responder;
mod shards;

use std::collections::HashMap;
use std::hash::Hasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::model::{Mac, Peer};
use shards::ShardedMap;

/// When a peer last had a miss, as nanoseconds since the ActiveSet's epoch
/// plus one; zero means its entries are not installed. One atomic store is
/// all the responder does to mark a peer, so the first packet's path takes no
/// lock and touches no map beyond the lookup it already made.
#[derive(Debug, Default)]
pub struct PeerMark(AtomicU64);

impl PeerMark {
    pub fn mark(&self, stamp: u64) {
        self.0.store(stamp, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.0.store(0, Ordering::SeqCst);
    }

    fn stamp(&self) -> Option<u64> {
        Some(self.0.load(Ordering::SeqCst)).filter(|s| *s != 0)
    }
}

/// The peers whose fdb and neighbour entries are installed, with the time of
/// their last miss. The responder marks a peer here *before* writing to the
/// kernel, and the engine reads it *after* dumping the kernel, so every entry
/// the engine sees has its peer marked and is never swept as stale.
///
/// Every known peer has a mark, shared with the MissTable entries that
/// answer for it; a peer is active while its mark is set.
pub struct ActiveSet {
    epoch: Instant,
    marks: Mutex<HashMap<String, Arc<PeerMark>>>,
}

impl Default for ActiveSet {
    fn default() -> Self {
        ActiveSet { epoch: Instant::now(), marks: Mutex::default() }
    }
}

impl ActiveSet {
    /// The value a mark made at `at` holds.
    pub fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    /// The peer's mark, created unset if the peer is new.
    fn mark_of(&self, peer: &str) -> Arc<PeerMark> {
        let mut marks = self.marks.lock().expect("active set lock");
        match marks.get(peer) {
            Some(m) => m.clone(),
            None => marks.entry(peer.to_string()).or_default().clone(),
        }
    }

    pub fn mark(&self, peer: &str) {
        self.mark_of(peer).mark(self.stamp(Instant::now()));
    }

    fn stamp_of(&self, peer: &str) -> Option<u64> {
        self.marks.lock().expect("active set lock").get(peer).and_then(|m| m.stamp())
    }

    pub fn contains(&self, peer: &str) -> bool {
        self.stamp_of(peer).is_some()
    }

    pub fn remove(&self, peer: &str) {
        if let Some(m) = self.marks.lock().expect("active set lock").get(peer) {
            m.clear();
        }
    }

    /// Forgets peers that are gone from the peer set. Named, not found by a
    /// walk over every mark: at 5,000 peers that walk was two thirds of an
    /// on-demand agent's CPU in a run of joins (BENCHMARKS.md, F3).
    pub fn forget<'a>(&self, gone: impl IntoIterator<Item = &'a str>) {
        let mut marks = self.marks.lock().expect("active set lock");
        for peer in gone {
            marks.remove(peer);
        }
    }

    pub fn last_miss(&self, peer: &str) -> Option<Duration> {
        let now = self.stamp(Instant::now());
        self.stamp_of(peer).map(|s| Duration::from_nanos(now.saturating_sub(s)))
    }
}

/// What a miss resolves to.
#[derive(Debug, Clone)]
pub struct Answer {
    pub mac: Mac,
    pub underlay: IpAddr,
    pub mark: Arc<PeerMark>,
}

/// Hashes the tables' keys (gateway IPs, VTEP MACs). They come from validated
/// peers, never from the misses, so SipHash's resistance to chosen keys buys
/// nothing here; its code and state are cold cache lines on the first packet's
/// path. A multiply-rotate per word, mixed once at the end so keys that differ
/// only in their high bits (10.244.N.0) still spread over the buckets.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        // splitmix64's finaliser
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_ne_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.add(n.into());
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_u128(&mut self, n: u128) {
        self.add(n as u64);
        self.add((n >> 64) as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

/// What the responder answers from: lookup tables of the current peer set
/// and the device the misses come from. The engine publishes a new one when
/// the peers or the device change and swaps it in whole, so the responder's
/// hot path takes no lock beyond one read. A new table shares every shard
/// its edit did not touch with the last one: a peer change copies the few
/// shards its old and new keys fall in, not the table.
#[derive(Debug, Default, Clone)]
pub struct MissTable {
    /// weir's device; misses on other devices are not ours.
    pub ifindex: u32,
    by_gateway: ShardedMap<IpAddr, Answer>,
    by_mac: ShardedMap<Mac, Answer>,
}

impl MissTable {
    pub fn new<'a>(ifindex: u32, peers: impl IntoIterator<Item = &'a Peer>, active: &ActiveSet) -> Self {
        let mut t = MissTable { ifindex, ..Default::default() };
        t.edit([], peers, active);
        t
    }

    /// Drops the answers of `gone` (old values of changed or removed peers),
    /// then adds those of `new`. In that order: a peer may take a gateway or
    /// MAC that another gave up in the same change.
    pub fn edit<'a>(
        &mut self,
        gone: impl IntoIterator<Item = &'a Peer>,
        new: impl IntoIterator<Item = &'a Peer>,
        active: &ActiveSet,
    ) {
        for p in gone {
            for cidr in &p.pod_cidrs {
                self.by_gateway.remove(&crate::model::gateway_of(cidr));
            }
            self.by_mac.remove(&p.vtep_mac);
        }
        for p in new {
            let answer = Answer { mac: p.vtep_mac, underlay: p.underlay_ip, mark: active.mark_of(&p.name) };
            for cidr in &p.pod_cidrs {
                self.by_gateway.insert(crate::model::gateway_of(cidr), answer.clone());
            }
            self.by_mac.insert(p.vtep_mac, answer);
        }
    }

    pub fn gateway(&self, ip: &IpAddr) -> Option<&Answer> {
        self.by_gateway.get(ip)
    }

    pub fn mac(&self, mac: &Mac) -> Option<&Answer> {
        self.by_mac.get(mac)
    }

    /// How many of the two tables' shards are the same, of how many (tests).
    #[cfg(test)]
    pub fn shared_with(&self, other: &MissTable) -> (usize, usize) {
        (self.by_gateway.shared_with(&other.by_gateway) + self.by_mac.shared_with(&other.by_mac), 2 * shards::SHARDS)
    }
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasher, BuildHasherDefault};

    use super::*;

    fn node2() -> Peer {
        let mut p = crate::model::fixtures::peer(2);
        p.pod_cidrs.push("fd00:10:244:2::/64".parse().unwrap());
        p
    }

    #[test]
    fn table_answers_gateways_and_macs() {
        let p = node2();
        let t = MissTable::new(7, [&p], &ActiveSet::default());
        assert_eq!(t.gateway(&"10.244.2.0".parse().unwrap()).unwrap().mac, p.vtep_mac);
        assert_eq!(t.gateway(&"fd00:10:244:2::".parse().unwrap()).unwrap().underlay, p.underlay_ip);
        assert!(t.gateway(&"10.244.2.1".parse().unwrap()).is_none());
        assert_eq!(t.mac(&p.vtep_mac).unwrap().underlay, p.underlay_ip);
    }

    #[test]
    fn an_edited_table_answers_as_one_built_from_the_new_peers() {
        let active = ActiveSet::default();
        let (a, b, c) = (node2(), crate::model::fixtures::peer(3), crate::model::fixtures::peer(4));
        let mut table = MissTable::new(7, [&a, &b, &c], &active);
        // In one change: a and b swap their VTEP MACs, c goes, d comes with
        // the pod CIDR c gave up.
        let (mut a2, mut b2) = (a.clone(), b.clone());
        (a2.vtep_mac, b2.vtep_mac) = (b.vtep_mac, a.vtep_mac);
        let mut d = crate::model::fixtures::peer(5);
        d.pod_cidrs = c.pod_cidrs.clone();
        table.edit([&a, &b, &c], [&a2, &b2, &d], &active);
        let rebuilt = MissTable::new(7, [&a2, &b2, &d], &active);
        for p in [&a, &b, &c, &d] {
            for cidr in &p.pod_cidrs {
                let gw = crate::model::gateway_of(cidr);
                assert_eq!(
                    table.gateway(&gw).map(|x| (x.mac, x.underlay)),
                    rebuilt.gateway(&gw).map(|x| (x.mac, x.underlay)),
                    "{gw}"
                );
            }
            assert_eq!(table.mac(&p.vtep_mac).map(|x| x.underlay), rebuilt.mac(&p.vtep_mac).map(|x| x.underlay));
        }
        assert_eq!(table.gateway(&"10.244.4.0".parse().unwrap()).unwrap().underlay, d.underlay_ip);
        assert_eq!(table.mac(&a.vtep_mac).unwrap().underlay, b.underlay_ip);
        assert!(table.mac(&c.vtep_mac).is_none());
    }

    #[test]
    fn marking_through_the_table_activates_the_peer_across_rebuilds() {
        let active = ActiveSet::default();
        let p = node2();
        let old = MissTable::new(7, [&p], &active);
        let new = MissTable::new(7, [&p], &active);
        assert!(!active.contains("node-2"));
        // The responder may still hold the old table when it answers.
        old.gateway(&"10.244.2.0".parse().unwrap()).unwrap().mark.mark(active.stamp(Instant::now()));
        assert!(active.contains("node-2"));
        assert!(Arc::ptr_eq(&old.mac(&p.vtep_mac).unwrap().mark, &new.mac(&p.vtep_mac).unwrap().mark));
        assert!(active.last_miss("node-2").unwrap() < Duration::from_secs(5));
        active.remove("node-2");
        assert!(!active.contains("node-2") && active.last_miss("node-2").is_none());
        active.mark("node-2");
        active.forget(["node-2"]);
        assert!(!active.contains("node-2"));
    }

    #[test]
    fn gateways_that_differ_in_one_octet_spread_over_the_buckets() {
        // hashbrown picks the bucket from the low bits; without the final mix
        // these keys' hashes share them (each key's low byte is zero).
        let build = BuildHasherDefault::<KeyHasher>::default();
        let low_bytes: std::collections::BTreeSet<u64> =
            (0..=255u8).map(|n| build.hash_one(IpAddr::from([10, 244, n, 0])) & 0xff).collect();
        assert!(low_bytes.len() > 128, "only {} distinct low bytes over 256 gateways", low_bytes.len());
    }
}
