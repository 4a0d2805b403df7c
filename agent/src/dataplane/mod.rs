//! The kernel side of the agent, behind one narrow intent-level trait so the
//! engine can be driven by a fake in unit tests and by netlink for real.

pub mod batch;
pub mod device;
pub mod events;
pub mod fake;
pub mod filter;
pub mod netlink;
pub mod wire;

use std::fmt;

use crate::model::Mac;
use crate::plan::{KernelState, Op};

pub use device::{DeviceKind, DeviceSpec};
pub use filter::{FilterRule, filter_notifications};

/// Address families as the one-byte field of netlink headers (libc has them
/// as c_int).
pub const AF_INET: u8 = libc::AF_INET as u8;
pub const AF_INET6: u8 = libc::AF_INET6 as u8;
pub const AF_BRIDGE: u8 = libc::AF_BRIDGE as u8;

/// A netlink failure, kept as the errno so callers can tell "gone already"
/// from "kernel out of neighbour slots" from "unsupported".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("{what}: {}", std::io::Error::from_raw_os_error(*errno))]
    Errno { what: String, errno: i32 },
    #[error("{0}")]
    Other(String),
    #[error(
        "kernel has no {kind} device support (netlink says 'unknown device type'); \
         load the module with `modprobe {module}` or use a kernel built with it"
    )]
    MissingDeviceType { kind: &'static str, module: &'static str },
    /// A setting weir depends on did not take effect. Retrying cannot help.
    #[error("cannot set {setting}: {error}; {fix}")]
    Setting { setting: String, error: String, fix: &'static str },
}

impl KernelError {
    /// Errors that no retry can fix: the agent stops and says what to change.
    pub fn is_fatal(&self) -> bool {
        matches!(self, KernelError::MissingDeviceType { .. } | KernelError::Setting { .. })
    }

    pub fn errno(&self) -> Option<i32> {
        match self {
            KernelError::Errno { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// What `ensure_device` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub ifindex: u32,
    pub mac: Option<Mac>,
    pub action: DeviceAction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAction {
    /// The device matched; nothing or only what `DeviceFix` lists was fixed.
    Adopted {
        fixed: Vec<DeviceFix>,
    },
    Created,
    Recreated {
        reason: String,
    },
}

/// A setting of an adopted device that was put right in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceFix {
    Mtu { was: Option<u32>, now: u32 },
    Mac { was: Option<Mac>, now: Mac },
    Up,
    AddressAdded(ipnet::IpNet),
    AddressRemoved(ipnet::IpNet),
}

impl fmt::Display for DeviceFix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_none = |v: Option<String>| v.unwrap_or_else(|| "none".into());
        match self {
            DeviceFix::Mtu { was, now } => write!(f, "mtu {}->{now}", or_none(was.map(|m| m.to_string()))),
            DeviceFix::Mac { was, now } => write!(f, "address {}->{now}", or_none(was.map(|m| m.to_string()))),
            DeviceFix::Up => write!(f, "up"),
            DeviceFix::AddressAdded(net) => write!(f, "address +{net}"),
            DeviceFix::AddressRemoved(net) => write!(f, "address -{net}"),
        }
    }
}

impl fmt::Display for DeviceAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceAction::Adopted { fixed } if fixed.is_empty() => write!(f, "adopted unchanged"),
            DeviceAction::Adopted { fixed } => {
                let fixed: Vec<String> = fixed.iter().map(|x| x.to_string()).collect();
                write!(f, "adopted, fixed {}", fixed.join(", "))
            }
            DeviceAction::Created => write!(f, "created"),
            DeviceAction::Recreated { reason } => write!(f, "recreated: {reason}"),
        }
    }
}

/// The result of one op, in the order the ops were given.
pub type OpResult = Result<(), KernelError>;

/// Everything the engine needs from the kernel, stated as intents.
#[allow(async_fn_in_trait)]
pub trait Kernel {
    /// Create, adopt or recreate the overlay device so it matches `spec`.
    async fn ensure_device(&mut self, spec: &DeviceSpec) -> Result<DeviceStatus, KernelError>;
    /// weir's own entries on the device with index `ifindex`.
    async fn dump(&mut self, ifindex: u32) -> Result<KernelState, KernelError>;
    /// Prefixes somebody else routes in the main table; only asked for when
    /// weir is about to add routes, since it costs a full route dump.
    async fn foreign_routes(&mut self) -> Result<std::collections::BTreeSet<ipnet::IpNet>, KernelError>;
    /// Of `prefixes`, those somebody else routes in the main table: one
    /// lookup each, for the few prefixes a Node event adds.
    async fn foreign_among(
        &mut self,
        prefixes: &[ipnet::IpNet],
    ) -> Result<std::collections::BTreeSet<ipnet::IpNet>, KernelError>;
    /// Apply ops in phase order; ops within one phase are pipelined. A
    /// delete of an entry that is already gone succeeds: the goal is reached.
    async fn apply(&mut self, ifindex: u32, ops: &[Op]) -> Vec<OpResult>;
}

/// SO_RCVBUFFORCE (needs CAP_NET_ADMIN): SO_RCVBUF is capped by
/// net.core.rmem_max, 208 KiB by default, which one large sync's own
/// notifications overflow. Falls back to SO_RCVBUF when not permitted.
pub fn force_rcvbuf(socket: &netlink_sys::Socket, bytes: usize) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    set_socket_option(socket, libc::SO_RCVBUFFORCE, &value).or_else(|_| socket.set_rx_buf_sz(bytes))
}

/// setsockopt(2) at SOL_SOCKET level with a plain value.
#[allow(unsafe_code)]
fn set_socket_option<T>(socket: &netlink_sys::Socket, name: libc::c_int, value: &T) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a socket we own; `value` is a live T for the whole call, passed
    // with its size, and the kernel copies what it needs before returning.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}
