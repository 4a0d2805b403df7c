//! A hash map split into shards that copies of it share. A copy costs one
//! reference per shard, and an edit copies only the shard it touches: the
//! engine publishes a new miss table on every peer change, and rebuilding a
//! table of 5,000 peers took about 0.6 ms of CPU each time.
//!
//! (A persistent map would make an edit O(log n), but the ones on the crate
//! registry are MPL-2.0, which `deny.toml` does not admit.)

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash};
use std::sync::Arc;

use super::KeyHasher;

/// About the square root of the tables' size at 5,000 peers: an edit copies
/// one shard of ~80 entries and a table copy costs 64 references.
pub(super) const SHARDS: usize = 64;

type Shard<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

#[derive(Debug, Clone)]
pub struct ShardedMap<K, V> {
    shards: Vec<Arc<Shard<K, V>>>,
}

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        ShardedMap { shards: (0..SHARDS).map(|_| Arc::new(Shard::default())).collect() }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> ShardedMap<K, V> {
    /// Bits from the middle of the hash: hashbrown takes a bucket from the
    /// low bits and a tag from the top seven, and keys of one shard should
    /// still differ in both.
    fn shard_of(key: &K) -> usize {
        (BuildHasherDefault::<KeyHasher>::default().hash_one(key) >> 40) as usize % SHARDS
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.shards[Self::shard_of(key)].get(key)
    }

    pub fn insert(&mut self, key: K, value: V) {
        Arc::make_mut(&mut self.shards[Self::shard_of(&key)]).insert(key, value);
    }

    pub fn remove(&mut self, key: &K) {
        let shard = &mut self.shards[Self::shard_of(key)];
        if shard.contains_key(key) {
            Arc::make_mut(shard).remove(key);
        }
    }

    /// How many shards `self` and `other` hold in common (tests).
    #[cfg(test)]
    pub fn shared_with(&self, other: &Self) -> usize {
        self.shards.iter().zip(&other.shards).filter(|(a, b)| Arc::ptr_eq(a, b)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_shares_every_shard_until_an_edit_copies_the_one_it_touches() {
        let mut old: ShardedMap<u32, u32> = ShardedMap::default();
        for k in 0..5000 {
            old.insert(k, k);
        }
        let mut new = old.clone();
        assert_eq!(new.shared_with(&old), SHARDS);
        new.insert(7, 70);
        new.remove(&8);
        new.remove(&100_000); // absent: nothing copied
        assert!(
            new.shared_with(&old) >= SHARDS - 2,
            "an edit of two keys copied {} shards",
            SHARDS - new.shared_with(&old)
        );
        assert_eq!((old.get(&7), new.get(&7)), (Some(&7), Some(&70)));
        assert_eq!((old.get(&8), new.get(&8)), (Some(&8), None));
        assert_eq!(new.get(&4999), Some(&4999));
    }

    #[test]
    fn keys_spread_over_the_shards() {
        let mut m: ShardedMap<std::net::IpAddr, ()> = ShardedMap::default();
        for n in 0..=255u8 {
            m.insert(std::net::IpAddr::from([10, 244, n, 0]), ());
        }
        let used = m.shards.iter().filter(|s| !s.is_empty()).count();
        assert!(used > SHARDS / 2, "256 gateways fell in {used} of {SHARDS} shards");
    }
}
