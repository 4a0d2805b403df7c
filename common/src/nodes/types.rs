//! The values weir reads from Nodes and agrees on across the cluster.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

/// A VTEP MAC address. Parsing rejects anything that is not a unicast EUI-48,
/// because a multicast fdb destination would flood every peer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("not a MAC address (want six hex pairs separated by ':')")]
    Malformed,
    #[error("multicast/broadcast MAC (low bit of the first octet set)")]
    Multicast,
    #[error("all-zero MAC")]
    Zero,
}

impl Mac {
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }

    /// A random locally administered unicast MAC, used once when a node has no
    /// published MAC yet; afterwards the annotation keeps it stable.
    pub fn random_local(seed: u64) -> Mac {
        let b = seed.to_le_bytes();
        Mac([(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

impl FromStr for Mac {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, MacError> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let p = parts.next().ok_or(MacError::Malformed)?;
            if p.len() != 2 {
                return Err(MacError::Malformed);
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| MacError::Malformed)?;
        }
        if parts.next().is_some() {
            return Err(MacError::Malformed);
        }
        let mac = Mac(out);
        if mac.0 == [0; 6] {
            Err(MacError::Zero)
        } else if mac.0[0] & 1 == 1 {
            Err(MacError::Multicast)
        } else {
            Ok(mac)
        }
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Vxlan,
    Ipip,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::Ipip => "ipip",
        }
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vxlan" => Ok(Backend::Vxlan),
            "ipip" => Ok(Backend::Ipip),
            other => Err(format!("unknown backend {other:?} (vxlan or ipip)")),
        }
    }
}

/// Whether two CIDRs share an address: prefixes either nest or are disjoint.
pub(super) fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Non-overlapping CIDRs with an owner each; finds an overlap in O(log n).
/// Prefixes either nest or are disjoint, so a new one overlaps a stored one
/// exactly when the nearest stored range at or below its start reaches into it,
/// or the nearest one above starts inside it.
#[derive(Debug, Default, Clone)]
pub struct CidrSet {
    by_start: BTreeMap<(bool, u128), (u128, IpNet, String)>,
}

fn span(c: &IpNet) -> (bool, u128, u128) {
    let (v6, start, bits) = match c.trunc() {
        IpNet::V4(n) => (false, u128::from(u32::from(n.network())), 32 - u32::from(n.prefix_len())),
        IpNet::V6(n) => (true, u128::from(n.network()), 128 - u32::from(n.prefix_len())),
    };
    let size_minus_one = if bits >= 128 { u128::MAX } else { (1u128 << bits) - 1 };
    (v6, start, start.saturating_add(size_minus_one))
}

impl CidrSet {
    /// The stored CIDR and owner `c` overlaps, if any.
    pub fn overlap(&self, c: &IpNet) -> Option<(&IpNet, &str)> {
        let (v6, start, end) = span(c);
        let below =
            self.by_start.range(..=(v6, start)).next_back().filter(|((f, _), (e, _, _))| *f == v6 && *e >= start);
        let above = self.by_start.range((v6, start)..).next().filter(|((f, s), _)| *f == v6 && *s <= end);
        below.or(above).map(|(_, (_, net, owner))| (net, owner.as_str()))
    }

    pub fn insert(&mut self, c: IpNet, owner: &str) {
        let (v6, start, end) = span(&c);
        self.by_start.insert((v6, start), (end, c, owner.to_string()));
    }

    /// Removes `c` if `owner` holds it.
    pub fn remove(&mut self, c: &IpNet, owner: &str) {
        let (v6, start, _) = span(c);
        if self.by_start.get(&(v6, start)).is_some_and(|(_, net, o)| net == c && o == owner) {
            self.by_start.remove(&(v6, start));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing_rejects_bad_input() {
        assert_eq!("0e:00:00:00:00:01".parse::<Mac>().unwrap().0[5], 1);
        assert_eq!("not-a-mac".parse::<Mac>(), Err(MacError::Malformed));
        assert_eq!("01:00:5e:00:00:01".parse::<Mac>(), Err(MacError::Multicast));
        assert_eq!("ff:ff:ff:ff:ff:ff".parse::<Mac>(), Err(MacError::Multicast));
        assert_eq!("00:00:00:00:00:00".parse::<Mac>(), Err(MacError::Zero));
        assert_eq!("0e:00:00:00:00:01:02".parse::<Mac>(), Err(MacError::Malformed));
        assert_eq!("0e:0:00:00:00:01".parse::<Mac>(), Err(MacError::Malformed));
    }

    #[test]
    fn cidr_set_finds_nesting_and_neighbours() {
        let mut set = CidrSet::default();
        set.insert("10.244.1.0/24".parse().unwrap(), "a");
        set.insert("10.244.3.0/24".parse().unwrap(), "b");
        let hit = |c: &str| set.overlap(&c.parse().unwrap()).map(|(_, o)| o.to_string());
        assert_eq!(hit("10.244.1.128/25"), Some("a".into()));
        assert_eq!(hit("10.244.0.0/16"), Some("a".into()));
        assert_eq!(hit("10.244.3.7/32"), Some("b".into()));
        assert_eq!(hit("10.244.2.0/24"), None);
        assert_eq!(hit("10.244.0.0/24"), None);
        assert_eq!(hit("fd00::/8"), None, "families never overlap");
        assert_eq!(hit("0.0.0.0/0"), Some("a".into()));
    }

    #[test]
    fn random_mac_is_local_unicast() {
        for seed in [0u64, 1, u64::MAX, 0xdead_beef] {
            let m = Mac::random_local(seed);
            assert!(m.is_unicast());
            assert_eq!(m.0[0] & 0x02, 0x02);
        }
    }
}
