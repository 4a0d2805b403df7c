//! Pod CIDR allocation: pure, so the never-twice rule is unit-tested.
//!
//! A pool is the cluster CIDR cut into equal subnets, numbered from 0; the
//! lowest free number is handed out. Anything a Node already holds is marked
//! used, whoever set it.

use std::collections::BTreeMap;

use ipnet::IpNet;

#[derive(Debug, Clone)]
pub struct Pool {
    pub cidr: IpNet,
    pub mask: u8,
    /// Subnet index → how many nodes hold part of it. Counting, not a set:
    /// when two nodes overlap, deleting one must not free the other's space.
    used: BTreeMap<u128, u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("node mask /{mask} must be longer than the cluster CIDR's /{cluster}")]
    MaskTooShort { mask: u8, cluster: u8 },
    #[error("node mask /{mask} is longer than the address family allows")]
    MaskTooLong { mask: u8 },
}

impl Pool {
    pub fn new(cidr: IpNet, mask: u8) -> Result<Pool, PoolError> {
        if mask <= cidr.prefix_len() {
            return Err(PoolError::MaskTooShort { mask, cluster: cidr.prefix_len() });
        }
        if mask > cidr.max_prefix_len() {
            return Err(PoolError::MaskTooLong { mask });
        }
        Ok(Pool { cidr: cidr.trunc(), mask, used: BTreeMap::new() })
    }

    pub fn is_v4(&self) -> bool {
        self.cidr.addr().is_ipv4()
    }

    /// Number of node subnets in the pool (saturating for huge IPv6 pools).
    pub fn size(&self) -> u128 {
        let bits = u32::from(self.mask - self.cidr.prefix_len());
        if bits >= 127 { u128::MAX } else { 1u128 << bits }
    }

    pub fn used(&self) -> usize {
        self.used.len()
    }

    fn base(&self) -> u128 {
        addr_bits(&self.cidr)
    }

    fn step_bits(&self) -> u32 {
        u32::from(self.cidr.max_prefix_len() - self.mask)
    }

    fn subnet(&self, index: u128) -> IpNet {
        let bits = self.base() + (index << self.step_bits());
        let addr = match self.cidr {
            IpNet::V4(_) => std::net::IpAddr::from(std::net::Ipv4Addr::from(bits as u32)),
            IpNet::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::from(bits)),
        };
        IpNet::new(addr, self.mask).expect("mask checked in new")
    }

    /// The subnet indices `cidr` covers, or None when it lies outside the pool
    /// (then it is not weir's to track).
    fn indices(&self, cidr: &IpNet) -> Option<std::ops::Range<u128>> {
        if cidr.addr().is_ipv4() != self.is_v4() {
            return None;
        }
        let cidr = cidr.trunc();
        if !self.cidr.contains(&cidr.network()) {
            return None;
        }
        let offset = (addr_bits(&cidr) - self.base()) >> self.step_bits();
        let count = if cidr.prefix_len() >= self.mask {
            1
        } else {
            1u128 << u32::from(self.mask - cidr.prefix_len().max(self.cidr.prefix_len()))
        };
        Some(offset..offset + count)
    }

    /// Marks a CIDR held by a node. Returns false if any part was already used:
    /// two nodes hold overlapping CIDRs.
    pub fn mark(&mut self, cidr: &IpNet) -> bool {
        let Some(range) = self.indices(cidr) else {
            return true;
        };
        let mut fresh = true;
        for i in range {
            let holders = self.used.entry(i).or_insert(0);
            fresh &= *holders == 0;
            *holders += 1;
        }
        fresh
    }

    pub fn release(&mut self, cidr: &IpNet) {
        if let Some(range) = self.indices(cidr) {
            for i in range {
                if let Some(holders) = self.used.get_mut(&i) {
                    *holders -= 1;
                    if *holders == 0 {
                        self.used.remove(&i);
                    }
                }
            }
        }
    }

    /// The lowest free subnet, marked used; None when the pool is full.
    pub fn allocate(&mut self) -> Option<IpNet> {
        let mut candidate = 0u128;
        for &u in self.used.keys() {
            if u != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate >= self.size() {
            return None;
        }
        self.used.insert(candidate, 1);
        Some(self.subnet(candidate))
    }
}

fn addr_bits(n: &IpNet) -> u128 {
    match n.network() {
        std::net::IpAddr::V4(a) => u128::from(u32::from(a)),
        std::net::IpAddr::V6(a) => u128::from(a),
    }
}

/// One pool per family (dual-stack gets one CIDR of each).
#[derive(Debug, Clone)]
pub struct Allocator {
    pub pools: Vec<Pool>,
}

impl Allocator {
    /// Allocates one CIDR per pool, all or nothing. None: some pool is exhausted.
    pub fn allocate(&mut self) -> Option<Vec<IpNet>> {
        let mut got = Vec::new();
        for i in 0..self.pools.len() {
            match self.pools[i].allocate() {
                Some(c) => got.push(c),
                None => {
                    for (pool, c) in self.pools.iter_mut().zip(&got) {
                        pool.release(c);
                    }
                    return None;
                }
            }
        }
        Some(got)
    }

    /// Marks a node's CIDRs; false if they overlap something already marked.
    pub fn mark(&mut self, cidrs: &[IpNet]) -> bool {
        let mut fresh = true;
        for c in cidrs {
            for p in &mut self.pools {
                fresh &= p.mark(c);
            }
        }
        fresh
    }

    pub fn release(&mut self, cidrs: &[IpNet]) {
        for c in cidrs {
            for p in &mut self.pools {
                p.release(c);
            }
        }
    }

    pub fn clear(&mut self) {
        for p in &mut self.pools {
            p.used.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(c: &str, m: u8) -> Pool {
        Pool::new(c.parse().unwrap(), m).unwrap()
    }

    #[test]
    fn hands_out_lowest_free_and_reuses_released() {
        let mut p = pool("10.244.0.0/16", 24);
        assert_eq!(p.allocate().unwrap().to_string(), "10.244.0.0/24");
        assert_eq!(p.allocate().unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(p.allocate().unwrap().to_string(), "10.244.2.0/24");
        p.release(&"10.244.1.0/24".parse().unwrap());
        assert_eq!(p.allocate().unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(p.allocate().unwrap().to_string(), "10.244.3.0/24");
    }

    #[test]
    fn never_twice_and_exhaustion() {
        let mut p = pool("10.244.0.0/22", 24);
        let all: std::collections::BTreeSet<_> = (0..4).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(all.len(), 4);
        assert_eq!(p.allocate(), None);
    }

    #[test]
    fn held_cidrs_are_honoured_even_with_another_mask() {
        let mut p = pool("10.244.0.0/16", 24);
        assert!(p.mark(&"10.244.0.0/23".parse().unwrap()));
        assert_eq!(p.allocate().unwrap().to_string(), "10.244.2.0/24");
        assert!(!p.mark(&"10.244.1.0/24".parse().unwrap()), "overlap detected");
        assert!(p.mark(&"192.168.0.0/24".parse().unwrap()), "outside the pool: not ours");
        assert_eq!(p.used(), 3);
    }

    #[test]
    fn deleting_an_overlapping_node_does_not_free_the_other_nodes_space() {
        let mut p = pool("10.244.0.0/16", 24);
        assert!(p.mark(&"10.244.0.0/24".parse().unwrap()));
        assert!(!p.mark(&"10.244.0.128/25".parse().unwrap()));
        p.release(&"10.244.0.128/25".parse().unwrap());
        assert_eq!(p.allocate().unwrap().to_string(), "10.244.1.0/24", "10.244.0.0/24 is still held");
    }

    #[test]
    fn ipv6_pool() {
        let mut p = pool("fd00:10:244::/48", 64);
        assert_eq!(p.size(), 65536);
        assert_eq!(p.allocate().unwrap().to_string(), "fd00:10:244::/64");
        assert_eq!(p.allocate().unwrap().to_string(), "fd00:10:244:1::/64");
    }

    #[test]
    fn dual_stack_is_all_or_nothing() {
        let mut a = Allocator { pools: vec![pool("10.244.0.0/23", 24), pool("fd00::/63", 64)] };
        a.pools[1].mark(&"fd00::/64".parse().unwrap());
        let got = a.allocate().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].to_string(), "fd00:0:0:1::/64");
        assert_eq!(a.allocate(), None, "v6 exhausted");
        assert_eq!(a.pools[0].used(), 1, "the v4 half was given back");
    }

    #[test]
    fn bad_masks() {
        assert!(Pool::new("10.0.0.0/16".parse().unwrap(), 16).is_err());
        assert!(Pool::new("10.0.0.0/16".parse().unwrap(), 33).is_err());
    }
}
