//! The peers' underlay IPs, followed one peer set at a time. A Node event
//! changes one peer; finding the address it brought or took away is a walk
//! over the peers, not a new set of 5,000 addresses to compare with the last.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{PeerSet, changes_since};

#[derive(Debug, Default)]
pub struct Underlays {
    by_name: BTreeMap<String, IpAddr>,
    /// How many peers use each address. The peer rules give each its own,
    /// but the firewall does not rely on them for that.
    users: BTreeMap<IpAddr, usize>,
    /// The version of the peer set last followed.
    seen: Option<u64>,
}

/// The addresses a change brought in and those it took away.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub added: BTreeSet<IpAddr>,
    pub removed: BTreeSet<IpAddr>,
}

impl Underlays {
    /// Follows `next` (a complete set).
    pub fn follow(&mut self, next: &PeerSet) -> Moved {
        let changed: Vec<(String, Option<IpAddr>, Option<IpAddr>)> =
            changes_since(&self.by_name, next, self.seen, |ip, peer| *ip == peer.underlay_ip)
                .into_iter()
                .map(|(name, old, new)| (name.clone(), old.copied(), new.map(|p| p.underlay_ip)))
                .collect();
        self.seen = Some(next.edits.version());
        let touched: BTreeSet<IpAddr> =
            changed.iter().flat_map(|(_, old, new)| old.iter().chain(new)).copied().collect();
        let used_before: Vec<bool> = touched.iter().map(|ip| self.users.contains_key(ip)).collect();
        for (name, old, new) in changed {
            if let Some(ip) = old {
                self.release(ip);
            }
            match new {
                Some(ip) => {
                    *self.users.entry(ip).or_default() += 1;
                    self.by_name.insert(name, ip);
                }
                None => {
                    self.by_name.remove(&name);
                }
            }
        }
        let mut moved = Moved::default();
        for (ip, before) in touched.into_iter().zip(used_before) {
            match (before, self.users.contains_key(&ip)) {
                (false, true) => moved.added.insert(ip),
                (true, false) => moved.removed.insert(ip),
                _ => false,
            };
        }
        moved
    }

    pub fn addresses(&self) -> BTreeSet<IpAddr> {
        self.users.keys().copied().collect()
    }

    fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.users.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.users.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Peer;
    use crate::model::fixtures::peer;

    fn set(peers: impl IntoIterator<Item = Peer>) -> PeerSet {
        PeerSet::complete(peers)
    }

    fn ips(v: &[&str]) -> BTreeSet<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn a_join_a_move_and_a_leave_each_move_only_their_addresses() {
        let mut u = Underlays::default();
        let first = u.follow(&set([peer(2), peer(3)]));
        assert_eq!(first, Moved { added: ips(&["198.18.0.12", "198.18.0.13"]), removed: BTreeSet::new() });
        assert_eq!(u.follow(&set([peer(2), peer(3), peer(4)])).added, ips(&["198.18.0.14"]));
        let moved = Peer { underlay_ip: "198.18.0.99".parse().unwrap(), ..peer(3) };
        assert_eq!(
            u.follow(&set([peer(2), moved.clone(), peer(4)])),
            Moved { added: ips(&["198.18.0.99"]), removed: ips(&["198.18.0.13"]) }
        );
        assert_eq!(u.follow(&set([moved.clone(), peer(4)])).removed, ips(&["198.18.0.12"]));
        assert_eq!(u.follow(&set([moved, peer(4)])), Moved::default());
        assert_eq!(u.addresses(), ips(&["198.18.0.14", "198.18.0.99"]));
    }

    #[test]
    fn an_address_two_peers_share_stays_until_the_last_leaves() {
        let mut u = Underlays::default();
        let twin = Peer { name: "node-9".into(), ..peer(2) };
        u.follow(&set([peer(2), twin.clone()]));
        assert_eq!(u.follow(&set([twin])), Moved::default());
        assert_eq!(u.follow(&set([])).removed, ips(&["198.18.0.12"]));
        assert!(u.addresses().is_empty());
    }

    #[test]
    fn an_address_handed_from_one_peer_to_another_moves_nothing() {
        let mut u = Underlays::default();
        u.follow(&set([peer(2)]));
        let heir = Peer { name: "node-9".into(), ..peer(2) };
        assert_eq!(u.follow(&set([heir])), Moved::default());
        assert_eq!(u.addresses(), ips(&["198.18.0.12"]));
    }
}
