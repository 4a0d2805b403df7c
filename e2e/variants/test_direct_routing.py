"""Direct routing: pods on nodes that share an underlay subnet talk
unencapsulated, the others through VXLAN, and the routes are weir's like
any other (reconciled, repaired, swept)."""

import json
import subprocess
import time

import lablib as lab
from test_lab import background_ping, loss_of, wait


def routes(i, family="-4"):
    """Node i's weir routes: prefix -> (gateway, device)."""
    out = json.loads(lab.sh(["ip", "-n", lab.node_ns(i), "-j", family, "route", "show", "proto", "87"]) or "[]")
    return {r["dst"]: (r.get("gateway"), r.get("dev")) for r in out}


def pod_cidr(node, family=4):
    cidrs = json.loads(lab.kubectl("get", "node", node, "-o", "json"))["spec"]["podCIDRs"]
    return next(c for c in cidrs if (":" in c) == (family == 6))


def vtep_mac(node):
    return json.loads(lab.kubectl("get", "node", node, "-o", "json"))["metadata"]["annotations"]["weir.dev/vtep-mac"]


def fdb_macs(i):
    out = json.loads(lab.sh(["bridge", "-n", lab.node_ns(i), "-j", "fdb", "show", "dev", "weir.1"]) or "[]")
    return {e["mac"] for e in out if "dst" in e}


def neighbours(i):
    """Node i's permanent neighbours on weir.1: gateway -> MAC."""
    out = json.loads(lab.sh(["ip", "-n", lab.node_ns(i), "-j", "neigh", "show", "dev", "weir.1", "nud", "permanent"])
                     or "[]")
    return {n["dst"]: n.get("lladdr") for n in out}


def gateway(node, family=4):
    return pod_cidr(node, family).split("/")[0]


def tunnel_packets(i):
    """Packets the node's VXLAN device has sent and received."""
    link = json.loads(lab.sh(["ip", "-n", lab.node_ns(i), "-j", "-s", "link", "show", "weir.1"]))[0]
    return link["stats64"]["tx"]["packets"] + link["stats64"]["rx"]["packets"]


def capture(i, bpf, seconds):
    """tcpdump on node i's underlay interface; returns a started process."""
    return subprocess.Popen(["ip", "netns", "exec", lab.node_ns(i), "tcpdump", "-i", "eth0", "-n", "-l", "-q",
                             "-c", "50", bpf], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def captured(proc):
    try:
        out, _ = proc.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate()
    return out


def test_same_subnet_peers_get_a_direct_route_and_the_others_the_tunnel(cluster):
    r = routes(1)
    assert r[pod_cidr("node-3")] == (lab.node_ip(3), "eth0"), r
    assert r[pod_cidr("node-2")] == (pod_cidr("node-2").split("/")[0], "weir.1"), r
    assert gateway("node-3") not in neighbours(1), "a direct peer needs no neighbour entry"
    assert neighbours(1).get(gateway("node-2")) == vtep_mac("node-2")
    # node-3's IPv6 pod CIDR has no direct route (the underlay is IPv4):
    # it goes through the tunnel, and so node-3 keeps its fdb entry.
    assert routes(1, "-6")[pod_cidr("node-3", 6)] == (gateway("node-3", 6), "weir.1")
    assert vtep_mac("node-3") in fdb_macs(1)
    # node-2's view: both of the others are on another subnet.
    assert all(dev == "weir.1" for _, dev in routes(2).values()), routes(2)


def test_same_subnet_traffic_is_not_encapsulated_and_cross_subnet_traffic_is(cluster):
    pods = lab.pods()
    src, same, other = pods["pod-1-1"], pods["pod-3-1"], pods["pod-2-1"]
    before = tunnel_packets(1)
    plain = capture(3, f"icmp and src host {src}", 10)
    time.sleep(1)
    sent, recv, _ = lab.ping("pod-1-1", same, count=10, interval=0.1)
    assert recv == sent == 10
    assert tunnel_packets(1) == before, "same-subnet traffic went through weir.1"
    seen = captured(plain)
    assert f"{src} > {same}" in seen, f"no plain pod packets on node-3's underlay: {seen!r}"

    tunnelled = capture(2, "udp port 8472", 10)
    time.sleep(1)
    sent, recv, _ = lab.ping("pod-1-1", other, count=10, interval=0.1)
    assert recv == sent == 10
    assert tunnel_packets(1) >= before + 20, "cross-subnet traffic did not use weir.1"
    seen = captured(tunnelled)
    assert f"{lab.node_ip(1)}." in seen and ".8472" in seen, f"no VXLAN on node-2's underlay: {seen!r}"


def test_a_direct_route_deleted_by_hand_is_put_back(cluster):
    cidr = pod_cidr("node-3")
    lab.sh(["ip", "-n", lab.node_ns(1), "route", "del", cidr])
    wait(lambda: routes(1).get(cidr) == (lab.node_ip(3), "eth0"), 10, "node-1's direct route to node-3 back")


def test_with_direct_routing_off_every_peer_goes_through_vxlan_without_a_blip(cluster):
    dst = lab.pods()["pod-3-1"]
    proc = background_ping("pod-1-1", dst, seconds=45, interval=0.1)
    try:
        lab.set_agent_env(WEIR_DIRECT_ROUTING="false")
        wait(lambda: routes(1).get(pod_cidr("node-3"), (None, None))[1] == "weir.1", 30, "node-3 behind the tunnel")
        assert neighbours(1).get(gateway("node-3")) == vtep_mac("node-3")
        lab.set_agent_env(WEIR_DIRECT_ROUTING=None)
        wait(lambda: routes(1).get(pod_cidr("node-3")) == (lab.node_ip(3), "eth0"), 30, "node-3 direct again")
    finally:
        sent, recv = loss_of(proc)
    assert sent == recv, f"{sent - recv} of {sent} packets lost while the peer changed kind twice"
