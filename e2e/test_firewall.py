"""nftables in the lab: tunnel ingress only from known nodes, masquerade only leaving the cluster, drift repair."""

import json
import subprocess
import time

import pytest

import lablib as lab
from test_lab import wait
from test_operability import metrics

STRANGER = "weir-stranger"
STRANGER_IP = "198.18.0.200"
OUTSIDE = "weir-outside"
OUTSIDE_IP = "198.18.0.250"

ECHO = ("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',9999))\n"
        "while True:\n d,a=s.recvfrom(100)\n s.sendto(a[0].encode(),a)\n")


def udp_ask(ns, ip):
    """Sends one datagram to ip:9999 from namespace ns; returns the source address the server saw."""
    script = ("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\n"
              f"s.sendto(b'hi',('{ip}',9999))\nprint(s.recvfrom(100)[0].decode())\n")
    return lab.sh(["python3", "-c", script], ns=ns).strip()


def received_from(ns, src):
    """Packets from `src` that reached namespace `ns`, counted by an nft rule in the pod."""
    if subprocess.run([*lab.netns_target(ns), "nft", "list", "table", "ip", "probe"], capture_output=True).returncode:
        lab.sh(["nft", "-f", "-"], ns=ns, input="table ip probe {\n chain in { type filter hook prerouting priority 0; }\n}\n")
    rules = lab.sh(["nft", "list", "chain", "ip", "probe", "in"], ns=ns)
    if src not in rules:
        lab.sh(["nft", "add", "rule", "ip", "probe", "in", "ip", "saddr", src, "counter"], ns=ns)
        rules = lab.sh(["nft", "list", "chain", "ip", "probe", "in"], ns=ns)
    line = next(ln for ln in rules.splitlines() if src in ln)
    return int(line.split("packets")[1].split()[0])


def nft_dropped(i):
    out = json.loads(lab.sh(["nft", "-j", "list", "counter", "inet", "weir", "tunnel_dropped"], ns=lab.node_ns(i)))
    return next(o["counter"]["packets"] for o in out["nftables"] if "counter" in o)


def node1():
    n = json.loads(lab.kubectl("get", "node", "node-1", "-o", "json"))
    return n["spec"]["podCIDRs"][0], n["metadata"]["annotations"]["weir.dev/vtep-mac"]


@pytest.fixture(scope="module")
def stranger(cluster):
    """A host on the underlay that speaks VXLAN on weir's VNI and port but is not a node."""
    lab.attach(STRANGER, "eth0", STRANGER_IP)
    lab.sh(["ip", "-n", STRANGER, "link", "add", "vx0", "type", "vxlan", "id", "1", "dstport", "8472",
            "local", STRANGER_IP, "dev", "eth0", "nolearning"])
    lab.sh(["ip", "-n", STRANGER, "link", "set", "vx0", "up"])
    cidr, mac = node1()
    gw = cidr.split("/")[0]
    lab.sh(["bridge", "-n", STRANGER, "fdb", "append", mac, "dev", "vx0", "dst", lab.node_ip(1), "self", "permanent"])
    lab.sh(["ip", "-n", STRANGER, "neigh", "replace", gw, "dev", "vx0", "lladdr", mac, "nud", "permanent"])
    lab.sh(["ip", "-n", STRANGER, "route", "add", cidr, "via", gw, "dev", "vx0", "onlink"])
    lab.sh(["ip", "-n", STRANGER, "addr", "add", "10.244.250.1/32", "dev", "vx0"])
    yield
    lab.kubectl("delete", "node", "node-stranger", "--ignore-not-found")
    lab.sh(["ip", "netns", "del", STRANGER], check=False)


def inject(count=10, src="10.244.250.1"):
    dst = lab.pods()["pod-1-1"]
    r = subprocess.run(["ip", "netns", "exec", STRANGER, "ping", "-c", str(count), "-i", "0.1", "-W", "1", "-I", src, dst],
                       capture_output=True, text=True)
    return r.stdout


def test_injection_from_a_stranger_is_dropped_and_counted(stranger):
    before_rx, before_drop = received_from("pod-1-1", "10.244.250.1"), nft_dropped(1)
    inject(20)
    assert nft_dropped(1) >= before_drop + 20
    assert received_from("pod-1-1", "10.244.250.1") == before_rx, "the pod received the stranger's packets"
    wait(lambda: metrics(1).get("weir_tunnel_dropped_packets", 0) >= 20, 20, "drop counter exported")


def test_the_same_from_a_peer_is_delivered_and_a_removed_node_cannot_inject(stranger):
    vx = json.loads(lab.sh(["ip", "-n", STRANGER, "-j", "link", "show", "vx0"]))[0]["address"]
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-stranger", "annotations": {"weir.dev/public-ip": STRANGER_IP, "weir.dev/vtep-mac": vx,
                                                                  "weir.dev/backend": "vxlan", "weir.dev/vni": "1"}}}
    lab.kubectl("apply", "-f", "-", input=json.dumps(node))
    lab.kubectl("patch", "node", "node-stranger", "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"addresses": [{"type": "InternalIP", "address": STRANGER_IP}]}}))
    wait(lambda: json.loads(lab.kubectl("get", "node", "node-stranger", "-o", "json")).get("spec", {}).get("podCIDRs"), 30,
         "a pod CIDR for node-stranger")
    cidr = json.loads(lab.kubectl("get", "node", "node-stranger", "-o", "json"))["spec"]["podCIDRs"][0]
    src = cidr.split("/")[0]
    lab.sh(["ip", "-n", STRANGER, "addr", "add", f"{src}/32", "dev", "vx0"])
    wait(lambda: STRANGER_IP in lab.sh(["nft", "list", "set", "inet", "weir", "peers4"], ns=lab.node_ns(1)), 20,
         "node-1 accepts the new node's tunnel packets")
    out = inject(5, src)
    assert " 0% packet loss" in out, out
    lab.kubectl("delete", "node", "node-stranger")
    wait(lambda: STRANGER_IP not in lab.sh(["nft", "list", "set", "inet", "weir", "peers4"], ns=lab.node_ns(1)), 20,
         "node-1 forgets the removed node")
    before = nft_dropped(1)
    out = inject(5, src)
    assert " 100% packet loss" in out, out
    assert nft_dropped(1) >= before + 5


def test_a_spoofed_peer_address_passes_the_allow_list(stranger):
    """The allow-list checks the outer source address, which anyone on the
    underlay can forge: the README's threat model says so, and this proves
    it. Here the stranger rewrites its tunnel packets' source to node-2's
    address and impersonates a pod of node-2 inside them."""
    node2_cidr = json.loads(lab.kubectl("get", "node", "node-2", "-o", "json"))["spec"]["podCIDRs"][0]
    forged = node2_cidr.replace(".0/24", ".200")
    lab.sh(["ip", "-n", STRANGER, "addr", "add", f"{forged}/32", "dev", "vx0"])
    lab.sh(["nft", "-f", "-"], ns=STRANGER, input=(
        "table ip spoof {\n chain out { type nat hook postrouting priority 100; "
        f"udp dport 8472 snat to {lab.node_ip(2)}; }}\n}}\n"))
    try:
        before = received_from("pod-1-1", forged)
        inject(5, forged)
        assert received_from("pod-1-1", forged) >= before + 5, "forged tunnel packets were not delivered"
    finally:
        lab.sh(["nft", "delete", "table", "ip", "spoof"], ns=STRANGER)
        lab.sh(["ip", "-n", STRANGER, "addr", "del", f"{forged}/32", "dev", "vx0"])


@pytest.fixture(scope="module")
def outside(cluster):
    lab.attach(OUTSIDE, "eth0", OUTSIDE_IP)
    proc = subprocess.Popen(["ip", "netns", "exec", OUTSIDE, "python3", "-c", ECHO])
    server = subprocess.Popen([*lab.netns_target("pod-2-1"), "python3", "-c", ECHO])
    time.sleep(0.5)
    yield
    proc.kill()
    server.kill()
    lab.sh(["ip", "netns", "del", OUTSIDE], check=False)


def test_pod_egress_leaves_with_the_node_ip(outside):
    assert udp_ask("pod-1-1", OUTSIDE_IP) == lab.node_ip(1)


def test_pod_to_pod_keeps_the_pod_ip(outside):
    assert udp_ask("pod-1-1", lab.pods()["pod-2-1"]) == lab.pods()["pod-1-1"]


def test_table_deleted_by_hand_comes_back(cluster):
    lab.sh(["nft", "delete", "table", "inet", "weir"], ns=lab.node_ns(1))
    wait(lambda: subprocess.run(["ip", "netns", "exec", lab.node_ns(1), "nft", "list", "table", "inet", "weir"],
                                capture_output=True).returncode == 0, 20, "table restored within the check interval")
    assert metrics(1).get('weir_firewall_sync_total{result="repaired"}', 0) >= 1
