//! Kernel change notifications that may mean drift on weir's device.

use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use std::net::IpAddr;

use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::AsyncSocket;
use rtnetlink::MulticastGroup;
use tokio::sync::mpsc;

use crate::model::Mac;
use crate::plan::ROUTE_PROTOCOL;

/// What the engine needs to know about a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEvent {
    /// A link, neighbour or route changed; `ifindex` is the link it concerns.
    Changed { ifindex: u32, ours: bool },
    /// An fdb entry was added or replaced. vxlan names no sender for fdb
    /// writes, so weir's own are told apart by their content: an entry that
    /// is already what weir wants is no drift, whoever wrote it.
    FdbAdded { ifindex: u32, mac: Option<Mac>, dst: Option<IpAddr> },
    /// The socket overflowed: notifications were lost, so only a full
    /// resync can tell what changed.
    Overrun,
    /// The socket is gone; the caller should reopen it.
    Closed,
}

/// Subscribes to link, neighbour and route notifications in the calling
/// thread's namespace, minus what `filter` drops in the kernel. Events are
/// reduced to `KernelEvent` and sent on a bounded channel; when it is full
/// the reader keeps only the fact that something changed, so memory never
/// grows and nothing is silently lost.
pub fn subscribe(tx: mpsc::Sender<KernelEvent>, filter: &[super::FilterRule]) -> std::io::Result<()> {
    let (mut conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])?;
    // A full sync of thousands of peers notifies about each of its own writes.
    super::force_rcvbuf(conn.socket_mut().socket_ref(), 16 << 20)?;
    super::filter::filter_notifications(conn.socket_mut().socket_ref(), filter)?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        let mut pending_overrun = false;
        while let Some((msg, _)) = messages.next().await {
            let event = match msg.payload {
                NetlinkPayload::Overrun(_) => KernelEvent::Overrun,
                NetlinkPayload::InnerMessage(m) => match classify(&m) {
                    Some(e) => e,
                    None => continue,
                },
                _ => continue,
            };
            let event = if pending_overrun { KernelEvent::Overrun } else { event };
            pending_overrun = match tx.try_send(event) {
                Ok(()) => false,
                Err(mpsc::error::TrySendError::Full(_)) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            };
        }
        let _ = tx.send(KernelEvent::Closed).await;
    });
    Ok(())
}

fn fdb_added(n: &NeighbourMessage) -> KernelEvent {
    let (mut mac, mut dst) = (None, None);
    for attr in &n.attributes {
        match attr {
            NeighbourAttribute::LinkLayerAddress(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok().map(Mac),
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
            // How the parser hands over an AF_BRIDGE entry's destination.
            NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
                dst = match bytes.len() {
                    4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    KernelEvent::FdbAdded { ifindex: n.header.ifindex, mac, dst }
}

fn classify(m: &RouteNetlinkMessage) -> Option<KernelEvent> {
    use RouteNetlinkMessage::*;
    match m {
        NewLink(l) | DelLink(l) => Some(KernelEvent::Changed { ifindex: l.header.index, ours: false }),
        NewNeighbour(n) if n.header.family == AddressFamily::Bridge => Some(fdb_added(n)),
        NewNeighbour(n) | DelNeighbour(n) => Some(KernelEvent::Changed { ifindex: n.header.ifindex, ours: false }),
        NewRoute(r) | DelRoute(r) => {
            let ours = r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL);
            let ifindex = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    netlink_packet_route::route::RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
                .unwrap_or(0);
            Some(KernelEvent::Changed { ifindex, ours })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_fdb_entry_is_reported_with_its_mac_and_destination() {
        let mut n = NeighbourMessage::default();
        n.header.family = AddressFamily::Bridge;
        n.header.ifindex = 7;
        n.attributes = vec![
            NeighbourAttribute::LinkLayerAddress(vec![0x0e, 0, 0, 0, 0, 2]),
            NeighbourAttribute::Destination(NeighbourAddress::Other(vec![198, 18, 0, 12])),
        ];
        let mac = Some(Mac([0x0e, 0, 0, 0, 0, 2]));
        let dst = Some("198.18.0.12".parse().unwrap());
        assert_eq!(
            classify(&RouteNetlinkMessage::NewNeighbour(n.clone())),
            Some(KernelEvent::FdbAdded { ifindex: 7, mac, dst })
        );
        // A deletion is drift whatever it held.
        assert_eq!(
            classify(&RouteNetlinkMessage::DelNeighbour(n)),
            Some(KernelEvent::Changed { ifindex: 7, ours: false })
        );
    }
}
