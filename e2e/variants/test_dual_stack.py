"""Dual-stack, end to end: every pod has an IPv4 and an IPv6 address, and
IPv6 crosses nodes over the IPv4 underlay's VXLAN (directly routed or not,
the IPv6 pod CIDRs go through the tunnel), is masqueraded leaving the
cluster, filtered at tunnel ingress, and answered on the first packet in
on-demand mode. The file that runs last (by name) of the variants: it
leaves the agents in on-demand mode."""

import ipaddress
import json
import subprocess

import pytest

import lablib as lab
from test_direct_routing import gateway, pod_cidr, routes
from test_lab import wait
from test_operability import metrics

STRANGER, STRANGER_IP = "weir-stranger6", "198.18.0.201"
OUTSIDE, OUTSIDE_IP = "weir-outside6", "198.18.0.251"


def v6(ip4):
    """The IPv6 underlay address beside an IPv4 one (lab: fd00:198:18:S::H)."""
    s, h = ip4.split(".")[2:]
    return str(ipaddress.ip_address(f"{lab.V6_UNDERLAY}:{s}::{h}"))


def all_pairs(addresses, count=3):
    """(src, dst, sent, received) for every ordered pair of lab pods."""
    rows = []
    for src in addresses:
        for dst, ip in addresses.items():
            if src != dst:
                sent, recv, _ = lab.ping(src, ip, count=count, interval=0.1)
                rows.append((src, dst, sent, recv))
    return rows


def test_every_pod_has_both_families_and_reaches_every_other_in_both(cluster):
    v4, v6_ = lab.pods(), lab.pods6()
    assert set(v4) == set(v6_) and len(v4) == 3, (v4, v6_)
    for family, addrs in (("IPv4", v4), ("IPv6", v6_)):
        lossy = [r for r in all_pairs(addrs) if r[3] != r[2]]
        assert not lossy, f"{family} loss: {lossy}"


def test_ipv6_pod_cidrs_ride_the_ipv4_underlay_tunnel(cluster):
    for i, other in ((1, "node-2"), (1, "node-3"), (2, "node-1")):
        assert routes(i, "-6")[pod_cidr(other, 6)] == (gateway(other, 6), "weir.1"), routes(i, "-6")
    conflist = json.loads((lab.node_dir(1) / "fs" / "etc-cni-net.d" / "10-weir.conflist").read_text())
    ranges = [r[0]["subnet"] for r in conflist["plugins"][0]["ipam"]["ranges"]]
    assert sorted(ranges) == sorted([pod_cidr("node-1"), pod_cidr("node-1", 6)]), ranges


def test_a_node_added_and_removed_is_reached_then_swept_in_both_families(cluster):
    lab.add_node(4)
    try:
        lab.add_pod(4, 1)
        v4, v6_ = lab.pods()["pod-4-1"], lab.pods6()["pod-4-1"]
        for ip in (v4, v6_):
            wait(lambda: lab.ping("pod-1-1", ip)[1] == 1, 60, f"pod-1-1 -> pod-4-1 at {ip}")
            wait(lambda: lab.ping("pod-3-1", ip)[1] == 1, 60, f"pod-3-1 -> pod-4-1 at {ip}")
        cidrs = (pod_cidr("node-4"), pod_cidr("node-4", 6))
    finally:
        lab.remove_node(4)
    wait(lambda: not any(c in routes(i) or c in routes(i, "-6") for i in (1, 2, 3) for c in cidrs), 30,
         "node-4's routes gone on every node, both families")


@pytest.fixture(scope="module")
def outside(cluster):
    lab.attach(OUTSIDE, "eth0", OUTSIDE_IP)
    echo = ("import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.bind(('::',9999))\n"
            "while True:\n d,a=s.recvfrom(100)\n s.sendto(a[0].encode(),a)\n")
    proc = subprocess.Popen(["ip", "netns", "exec", OUTSIDE, "python3", "-c", echo])
    yield v6(OUTSIDE_IP)
    proc.kill()
    lab.sh(["ip", "netns", "del", OUTSIDE], check=False)


def test_ipv6_egress_leaves_with_the_node_address(outside):
    ask = ("import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.settimeout(3)\n"
           f"s.sendto(b'hi',('{outside}',9999))\nprint(s.recvfrom(100)[0].decode())\n")
    seen = lab.sh(["python3", "-c", ask], ns="pod-1-1").strip()
    assert seen == v6(lab.node_ip(1)), f"the outside saw {seen}, not node-1's IPv6 address"


@pytest.fixture(scope="module")
def stranger(cluster):
    """A host on the underlay that speaks VXLAN over IPv6 but is not a node."""
    lab.attach(STRANGER, "eth0", STRANGER_IP)
    me, target = v6(STRANGER_IP), v6(lab.node_ip(1))
    lab.sh(["ip", "-n", STRANGER, "link", "add", "vx0", "type", "vxlan", "id", "1", "dstport", "8472", "local", me,
            "dev", "eth0", "nolearning"])
    lab.sh(["ip", "-n", STRANGER, "link", "set", "vx0", "up"])
    mac = json.loads(lab.kubectl("get", "node", "node-1", "-o", "json"))["metadata"]["annotations"]["weir.dev/vtep-mac"]
    cidr, gw = pod_cidr("node-1"), gateway("node-1")
    lab.sh(["bridge", "-n", STRANGER, "fdb", "append", mac, "dev", "vx0", "dst", target, "self", "permanent"])
    lab.sh(["ip", "-n", STRANGER, "neigh", "replace", gw, "dev", "vx0", "lladdr", mac, "nud", "permanent"])
    lab.sh(["ip", "-n", STRANGER, "route", "add", cidr, "via", gw, "dev", "vx0", "onlink"])
    lab.sh(["ip", "-n", STRANGER, "addr", "add", "10.244.251.1/32", "dev", "vx0"])
    yield
    lab.sh(["ip", "netns", "del", STRANGER], check=False)


def dropped_total(i):
    return metrics(i).get("weir_tunnel_dropped_packets", 0)


def test_ipv6_tunnel_ingress_from_a_stranger_is_dropped(stranger):
    # The metric, what an operator scrapes. The last test's node came and
    # went just before: the count must hold across what the agent's
    # firewall did about it.
    before = dropped_total(1)
    r = subprocess.run(["ip", "netns", "exec", STRANGER, "ping", "-c", "10", "-i", "0.1", "-W", "1", "-I", "10.244.251.1",
                        lab.pods()["pod-1-1"]], capture_output=True, text=True)
    assert " 100% packet loss" in r.stdout, r.stdout
    wait(lambda: dropped_total(1) >= before + 10, 25, "IPv6 tunnel packets from a stranger dropped and counted")


def test_on_demand_answers_the_first_ipv6_packet_through_an_ndp_miss(cluster):
    lab.set_mode("on-demand")
    lab.wait_healthy()
    before = metrics(1).get('weir_l3miss_total{result="resolved"}', 0)
    for dst in ("pod-2-1", "pod-3-1"):
        ip = lab.pods6()[dst]
        sent, recv, _ = lab.ping("pod-1-1", ip, count=1, wait=2)
        assert recv == sent == 1, f"the first IPv6 packet to {dst} was lost"
    wait(lambda: metrics(1).get('weir_l3miss_total{result="resolved"}', 0) >= before + 2, 10,
         "two IPv6 (NDP) misses answered on node-1")
