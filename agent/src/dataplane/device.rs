//! The overlay device weir owns, described as data.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::Mac;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// `ip link add weir.N type vxlan id N dstport P local IP dev UNDERLAY nolearning
    /// [proxy l2miss l3miss]`
    Vxlan { vni: u32, port: u16, on_demand: bool },
    /// `ip link add weir.ipip type ipip local IP`
    Ipip,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: String,
    pub kind: DeviceKind,
    pub local: IpAddr,
    pub underlay_ifindex: u32,
    pub mtu: u32,
    /// The VTEP MAC to keep. None lets the kernel choose (first start).
    pub mac: Option<Mac>,
    /// The pod CIDR network addresses as host routes (`10.244.1.0/32`).
    pub addresses: Vec<IpNet>,
}

impl DeviceSpec {
    pub fn vxlan_name(vni: u32) -> String {
        format!("weir.{vni}")
    }
    pub const IPIP_NAME: &'static str = "weir.ipip";

    /// Why an existing device of the same name cannot be adopted, if it cannot.
    /// These are settings the kernel does not let us change in place.
    pub fn incompatibility(&self, found: &FoundDevice) -> Option<String> {
        match (&self.kind, &found.kind) {
            (
                DeviceKind::Vxlan { vni, port, on_demand },
                Some(FoundKind::Vxlan { vni: fv, port: fp, learning, miss }),
            ) => {
                if vni != fv {
                    Some(format!("VNI is {fv}, want {vni}"))
                } else if port != fp {
                    Some(format!("UDP port is {fp}, want {port}"))
                } else if *learning {
                    Some("learning is on, want nolearning".into())
                } else if on_demand != miss {
                    Some(format!("l2miss/l3miss is {miss}, want {on_demand}"))
                } else {
                    self.underlay_mismatch(found)
                }
            }
            (DeviceKind::Ipip, Some(FoundKind::Ipip)) => self.underlay_mismatch(found),
            (_, other) => Some(format!("device type is {other:?}, want {:?}", self.kind)),
        }
    }

    fn underlay_mismatch(&self, found: &FoundDevice) -> Option<String> {
        if found.local != Some(self.local) {
            return Some(format!("local is {:?}, want {}", found.local, self.local));
        }
        if matches!(self.kind, DeviceKind::Vxlan { .. }) && found.link != Some(self.underlay_ifindex) {
            return Some(format!("underlay ifindex is {:?}, want {}", found.link, self.underlay_ifindex));
        }
        None
    }
}

/// The parts of an existing link that decide whether it can be adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundDevice {
    pub ifindex: u32,
    pub kind: Option<FoundKind>,
    pub local: Option<IpAddr>,
    pub link: Option<u32>,
    pub mtu: Option<u32>,
    pub mac: Option<Mac>,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FoundKind {
    Vxlan { vni: u32, port: u16, learning: bool, miss: bool },
    Ipip,
    Other(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DeviceSpec {
        DeviceSpec { addresses: vec![], ..crate::model::fixtures::device() }
    }

    fn found() -> FoundDevice {
        FoundDevice {
            ifindex: 9,
            kind: Some(FoundKind::Vxlan { vni: 1, port: 8472, learning: false, miss: false }),
            local: Some("198.18.0.11".parse().unwrap()),
            link: Some(2),
            mtu: Some(1400),
            mac: None,
            up: false,
        }
    }

    #[test]
    fn mtu_and_state_do_not_force_a_recreate() {
        assert_eq!(spec().incompatibility(&found()), None);
    }

    #[test]
    fn vni_port_local_and_dev_force_a_recreate() {
        let mut f = found();
        f.kind = Some(FoundKind::Vxlan { vni: 2, port: 8472, learning: false, miss: false });
        assert!(spec().incompatibility(&f).unwrap().contains("VNI"));
        let mut f = found();
        f.kind = Some(FoundKind::Vxlan { vni: 1, port: 4789, learning: false, miss: false });
        assert!(spec().incompatibility(&f).unwrap().contains("port"));
        let mut f = found();
        f.local = Some("198.18.0.99".parse().unwrap());
        assert!(spec().incompatibility(&f).unwrap().contains("local"));
        let mut f = found();
        f.link = Some(3);
        assert!(spec().incompatibility(&f).unwrap().contains("underlay"));
        let mut f = found();
        f.kind = Some(FoundKind::Other("bridge".into()));
        assert!(spec().incompatibility(&f).unwrap().contains("type"));
    }
}
