//! A `Kernel` that keeps weir's entries in memory, records every call, and
//! fails when a test scripts it to. Engine tests pass it in explicitly, so
//! the reconciler is exercised without root or a network namespace.
//!
//! The fake behaves like the kernel where the engine depends on it: deleting
//! the device takes every entry on it along; a replace overwrites an entry
//! with the same key; a delete of something already gone succeeds, as the
//! trait promises.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;

use super::{DeviceAction, DeviceSpec, DeviceStatus, Kernel, KernelError, OpResult};
use crate::model::Mac;
use crate::plan::{KernelState, Op};

/// One call the engine made, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    EnsureDevice,
    Dump,
    ForeignRoutes,
    ForeignAmong(Vec<IpNet>),
    Apply(Vec<Op>),
}

/// The ops an `apply` call fails (those the predicate picks) and their errno.
pub type ScriptedError = (fn(&Op) -> bool, i32);

/// What the fake kernel holds and what it has been asked.
#[derive(Debug, Default)]
pub struct FakeState {
    /// The overlay device: (ifindex, MAC); None when there is none.
    pub device: Option<(u32, Mac)>,
    /// weir's entries, as a dump would return them.
    pub entries: KernelState,
    /// Prefixes somebody else routes.
    pub foreign: BTreeSet<IpNet>,
    pub calls: Vec<Call>,
    /// Errors the next `apply` calls return, one script entry per call.
    pub apply_errors: VecDeque<ScriptedError>,
    /// Errors the next `ensure_device` calls return.
    pub device_errors: VecDeque<KernelError>,
    next_ifindex: u32,
}

/// Cheap to clone: the test keeps one handle and gives the engine another.
#[derive(Clone, Default)]
pub struct FakeKernel(Arc<Mutex<FakeState>>);

impl FakeKernel {
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.0.lock().expect("fake kernel lock")
    }

    /// `ip link del`: the device and every entry on it vanish (nexthop
    /// support, if the fake kernel has it, stays).
    pub fn delete_device(&self) {
        let mut s = self.state();
        s.device = None;
        let nexthops = s.entries.nexthops.as_ref().map(|_| Default::default());
        s.entries = KernelState { nexthops, ..Default::default() };
    }

    /// The ops of every `apply` so far, flattened.
    pub fn applied(&self) -> Vec<Op> {
        self.state()
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Apply(ops) => Some(ops.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    pub fn count(&self, call: fn(&Call) -> bool) -> usize {
        self.state().calls.iter().filter(|c| call(c)).count()
    }
}

impl FakeState {
    fn write(&mut self, ifindex: u32, op: &Op) -> OpResult {
        let e = &mut self.entries;
        match *op {
            Op::PutFdb { mac, dst } => {
                e.fdb.retain(|(m, _)| *m != mac);
                e.fdb.insert((mac, dst));
            }
            Op::DelFdb { mac, dst } => {
                e.fdb.remove(&(mac, dst));
            }
            Op::PutNeigh { ip, mac } => {
                e.neigh.insert(ip, mac);
            }
            Op::DelNeigh { ip, .. } => {
                e.neigh.remove(&ip);
            }
            Op::PutNexthop { id, gateway } => {
                e.nexthops.get_or_insert_with(Default::default).insert(id, (gateway, ifindex));
            }
            Op::DelNexthop { id, .. } => {
                e.nexthops.as_mut().map(|n| n.remove(&id));
            }
            Op::PutRoute { dst, to, nhid } => {
                e.routes.insert(dst, (to.gateway, to.oif(ifindex)));
                match nhid {
                    Some(id) => e.route_nhid.insert(dst, id),
                    None => e.route_nhid.remove(&dst),
                };
            }
            Op::DelRoute { dst, .. } => {
                e.route_nhid.remove(&dst);
                e.routes.remove(&dst);
            }
        }
        Ok(())
    }
}

impl Kernel for FakeKernel {
    async fn ensure_device(&mut self, spec: &DeviceSpec) -> Result<DeviceStatus, KernelError> {
        let mut s = self.state();
        s.calls.push(Call::EnsureDevice);
        if let Some(e) = s.device_errors.pop_front() {
            return Err(e);
        }
        if let Some((ifindex, mac)) = s.device {
            return Ok(DeviceStatus { ifindex, mac: Some(mac), action: DeviceAction::Adopted { fixed: vec![] } });
        }
        s.next_ifindex += 1;
        let ifindex = 100 + s.next_ifindex;
        let mac = spec.mac.unwrap_or_else(|| Mac::random_local(u64::from(ifindex)));
        s.device = Some((ifindex, mac));
        Ok(DeviceStatus { ifindex, mac: Some(mac), action: DeviceAction::Created })
    }

    async fn dump(&mut self, ifindex: u32) -> Result<KernelState, KernelError> {
        let mut s = self.state();
        s.calls.push(Call::Dump);
        match s.device {
            Some((i, _)) if i == ifindex => Ok(s.entries.clone()),
            _ => Err(KernelError::Errno { what: format!("dump ifindex {ifindex}"), errno: libc::ENODEV }),
        }
    }

    async fn foreign_routes(&mut self) -> Result<BTreeSet<IpNet>, KernelError> {
        let mut s = self.state();
        s.calls.push(Call::ForeignRoutes);
        Ok(s.foreign.clone())
    }

    async fn foreign_among(&mut self, prefixes: &[IpNet]) -> Result<BTreeSet<IpNet>, KernelError> {
        let mut s = self.state();
        s.calls.push(Call::ForeignAmong(prefixes.to_vec()));
        Ok(prefixes.iter().filter(|p| s.foreign.contains(p)).copied().collect())
    }

    async fn apply(&mut self, ifindex: u32, ops: &[Op]) -> Vec<OpResult> {
        let mut s = self.state();
        s.calls.push(Call::Apply(ops.to_vec()));
        let failing = s.apply_errors.pop_front();
        ops.iter()
            .map(|op| match failing {
                Some((matches, errno)) if matches(op) => Err(KernelError::Errno { what: op.to_string(), errno }),
                _ => s.write(ifindex, op),
            })
            .collect()
    }
}
