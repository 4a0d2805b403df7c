//! The kernel-side notification filters: the miss socket hears only misses,
//! and the engine hears neither misses nor the responder's own answers, while
//! everything else still reaches it (in on-demand mode, bar new fdb entries).

mod common;

use std::time::Duration;

use common::*;
use libc::{RTM_DELNEIGH, RTM_GETNEIGH, RTM_NEWNEIGH};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use weir_agent::dataplane::{AF_BRIDGE, FilterRule, filter_notifications};
use weir_agent::ondemand::responder::encode_answer;

fn subscriber(rules: &[FilterRule]) -> Socket {
    let mut sock = Socket::new(NETLINK_ROUTE).unwrap();
    filter_notifications(&sock, rules).unwrap();
    sock.bind_auto().unwrap();
    sock.add_membership(libc::RTNLGRP_NEIGH).unwrap();
    sock
}

/// (type, family, nlmsg_pid) of every notification queued on `sock`.
fn drain(sock: &Socket) -> Vec<(u16, u8, u32)> {
    let mut seen = Vec::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        if sock.recv(&mut buf, libc::MSG_DONTWAIT).is_err() {
            return seen;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let pid = u32::from_ne_bytes([buf[12], buf[13], buf[14], buf[15]]);
        seen.push((kind, buf[16], pid));
    }
}

#[test]
fn misses_reach_only_the_responder_and_its_answers_skip_the_engine() {
    in_fresh_netns("misses_reach_only_the_responder_and_its_answers_skip_the_engine", || {
        sh("ip link add weir.1 type vxlan id 1 dstport 8472 local 198.18.0.1 nolearning proxy l2miss l3miss \
            && ip link set weir.1 up && ip addr add 10.244.1.0/32 dev weir.1 \
            && ip route add 10.244.9.0/24 via 10.244.9.0 dev weir.1 onlink \
            && echo 3 > /proc/sys/net/ipv4/neigh/weir.1/app_solicit");
        let ifindex = ifindex("weir.1");
        let mut writer = Socket::new(NETLINK_ROUTE).unwrap();
        let port = writer.bind_auto().unwrap().port_number();
        let misses = subscriber(&[FilterRule::OnlyType(RTM_GETNEIGH)]);
        let engine = subscriber(&[FilterRule::DropType(RTM_GETNEIGH), FilterRule::DropSender(port)]);
        let on_demand_engine =
            subscriber(&[FilterRule::DropType(RTM_GETNEIGH), FilterRule::DropSender(port), FilterRule::DropNewFdb]);
        let everything = subscriber(&[]);

        // An answer from the "responder" (fdb + neighbour), a neighbour from
        // someone else, and a miss.
        let mut answer = Vec::new();
        let mac = "0e:00:00:00:08:08".parse().unwrap();
        encode_answer(&mut answer, ifindex, mac, "198.18.0.8".parse().unwrap(), Some("10.244.8.0".parse().unwrap()), 0);
        writer.send(&answer, 0).unwrap();
        sh("ip neigh replace 10.244.7.0 dev weir.1 lladdr 0e:00:00:00:07:07 nud permanent");
        let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let _ = udp.send_to(b"x", "10.244.9.0:9");
        sh("bridge fdb del 0e:00:00:00:08:08 dev weir.1 dst 198.18.0.8 self");
        std::thread::sleep(Duration::from_millis(200));

        let all = drain(&everything);
        let miss = |m: &(u16, u8, u32)| m.0 == RTM_GETNEIGH;
        let from_writer = |m: &(u16, u8, u32)| m.2 == port;
        assert!(all.iter().any(miss), "the unfiltered socket saw the miss: {all:?}");
        assert!(all.iter().any(from_writer), "the unfiltered socket saw the answer: {all:?}");

        let heard = drain(&misses);
        assert!(!heard.is_empty() && heard.iter().all(miss), "miss socket heard only misses: {heard:?}");

        let heard = drain(&engine);
        assert!(!heard.iter().any(miss), "engine heard no miss: {heard:?}");
        assert!(!heard.iter().any(from_writer), "engine heard none of the responder's neighbour writes: {heard:?}");
        assert!(heard.iter().any(|m| m.2 != 0 && m.2 != port), "engine still hears other writers: {heard:?}");
        // vxlan reports fdb writes without a sender, so those still arrive.
        assert!(
            heard.iter().any(|m| m.0 == RTM_NEWNEIGH && m.1 == AF_BRIDGE),
            "engine hears new fdb entries: {heard:?}"
        );

        // On-demand: no new fdb entries either, but deletions still arrive.
        let heard = drain(&on_demand_engine);
        assert!(!heard.iter().any(miss) && !heard.iter().any(from_writer), "{heard:?}");
        assert!(!heard.iter().any(|m| m.0 == RTM_NEWNEIGH && m.1 == AF_BRIDGE), "no new fdb entries: {heard:?}");
        assert!(heard.iter().any(|m| m.0 == RTM_DELNEIGH && m.1 == AF_BRIDGE), "fdb deletions arrive: {heard:?}");
        assert!(heard.iter().any(|m| m.2 != 0 && m.2 != port), "other writers' neighbours arrive: {heard:?}");
    });
}
