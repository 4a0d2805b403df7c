"""flannel's known holes (../shared/notes/anchors.md), each replayed against
weir and flannel in the same lab. weir must close every one; flannel's
outcome is recorded beside it."""

import json
import os
import re
import subprocess
import threading
import time

import pytest

import bench
import proclab as lab
from bench_load import fake_ip, flannel_annotations
from sidebyside import FLANNEL, FLANNEL_HEALTHZ_PORT, WEIR

AGENTS = (WEIR, FLANNEL)
FAKES = 50
# Long enough for any periodic repair flannel might run (its route check is
# 10 s where it has one); weir repairs within a second.
PATIENCE = 20
STRANGER, STRANGER_IP = "weir-stranger", "198.18.0.200"


def fake_cidr(k):
    return f"10.{128 + k // 256}.{k % 256}.0/24"


def fake_mac(k):
    return f"0e:fa:00:00:{k // 256:02x}:{k % 256:02x}"


def pod_ip(i):
    return lab.node_cidr(i).replace(".0/24", ".2")


def expected_routes():
    """A peer of its own kind and every fake Node still there."""
    return 1 + len(json.loads(lab.kubectl("get", "nodes", "-l", "weir-bench=fake", "-o", "json"))["items"])


def healthy(agent, n=None):
    """Running, with a route to every peer and the fdb entry of the first fake."""
    return agent.running() and agent.routes() >= (n or expected_routes()) and agent.has_fdb(fake_mac(1))


@pytest.fixture(scope="module", autouse=True)
def side_by_side(pair):
    bench.create_fakes(range(FAKES), addresses=False)
    for i in (1, 2, 3, 4):
        # A stand-in for a pod: one address of the node's pod CIDR.
        lab.sh(["ip", "-n", lab.node_ns(i), "addr", "add", f"{pod_ip(i)}/32", "dev", "lo"])
    n = expected_routes()
    for a in AGENTS:
        lab.wait_for(lambda: healthy(a, n), 120, f"{a.kind} programming the lab", step=0.1)


@pytest.fixture(autouse=True)
def whole_again():
    """flannel leaves some holes open: it is restarted after a test that left
    it broken, so the next hole starts from a complete dataplane. weir is
    never restarted for it: a test that breaks it fails here."""
    yield
    n = expected_routes()
    if not healthy(FLANNEL, n):
        FLANNEL.stop()
        FLANNEL.start()
    lab.wait_for(lambda: healthy(FLANNEL, n), 60, "flannel back to a complete dataplane", step=0.1)
    lab.wait_for(lambda: healthy(WEIR, n), 5, "weir's dataplane complete after the test", step=0.1)


def race(pred, timeout=PATIENCE):
    """Polls pred(agent) for both agents at once: {kind: seconds until true, or None}."""
    t0, done = time.time(), {}
    while len(done) < len(AGENTS) and time.time() - t0 < timeout:
        for a in AGENTS:
            if a.kind not in done and pred(a):
                done[a.kind] = time.time() - t0
        time.sleep(0.02)
    return {a.kind: done.get(a.kind) for a in AGENTS}


def outcome(seconds, yes="yes", no="no"):
    return f"{yes} ({seconds:.2f} s)" if seconds is not None else f"{no} (not within {PATIENCE} s)"


def test_a_node_deleted_while_the_agent_was_stopped_is_swept(row):
    k = 7
    for a in AGENTS:
        a.stop()
    lab.kubectl("delete", "node", f"fake-{k:05d}")
    n = expected_routes()
    for a in AGENTS:
        a.start()
    took = race(lambda a: a.running() and a.routes() >= n and not a.has_route(fake_cidr(k)))
    row("Node deleted while the agent was stopped: swept after restart (flannel#2554)",
        outcome(took["weir"]), outcome(took["flannel"]))
    assert took["weir"] is not None, f"weir kept the route to deleted fake-{k:05d}"


def delete_route(a, k):
    # Without `dev`: weir's routes point at nexthop objects, and the kernel
    # matches a delete that names a device only against plain routes.
    lab.sh(["ip", "-n", a.ns, "route", "del", fake_cidr(k)])


def delete_fdb(a, k):
    lab.sh(["bridge", "-n", a.ns, "fdb", "del", fake_mac(k), "dev", a.device, "self"])


def delete_neigh(a, k):
    lab.sh(["ip", "-n", a.ns, "neigh", "del", fake_cidr(k).split("/")[0], "dev", a.device])


def route_back(a, k):
    return a.has_route(fake_cidr(k))


def fdb_back(a, k):
    return a.has_fdb(fake_mac(k), fake_ip(k))


def neigh_back(a, k):
    return a.has_neigh(fake_cidr(k).split("/")[0])


@pytest.mark.parametrize("entry,delete,back", [
    ("route", delete_route, route_back), ("fdb entry", delete_fdb, fdb_back), ("neighbour", delete_neigh, neigh_back)])
def test_a_remote_nodes_entry_deleted_by_hand_is_restored(row, entry, delete, back):
    k = 10
    for a in AGENTS:
        assert back(a, k), f"{a.kind} had no {entry} for fake-{k:05d} to begin with"
        delete(a, k)
    took = race(lambda a: back(a, k))
    row(f"a remote node's {entry} deleted by hand: restored (flannel#1788)", outcome(took["weir"]),
        outcome(took["flannel"]))
    assert took["weir"] is not None, f"weir did not restore the {entry}"


def test_the_vxlan_device_deleted_by_hand_is_recreated_with_every_entry(row):
    for a in AGENTS:
        lab.sh(["ip", "-n", a.ns, "link", "del", a.device])
    n = expected_routes()
    took = race(lambda a: a.routes() >= n and all(a.has_fdb(fake_mac(k)) for k in (1, FAKES - 1)))
    row("the VXLAN device deleted by hand: recreated, every entry replayed", outcome(took["weir"]),
        outcome(took["flannel"]))
    assert took["weir"] is not None, "weir did not bring its device back with every entry"


def test_a_changed_vtep_mac_replaces_the_old_fdb_entry(row):
    k, new = 20, "0e:fc:00:00:00:14"
    patch = {"metadata": {"annotations": {"weir.dev/vtep-mac": new, **flannel_annotations(fake_ip(k), new)}}}
    lab.kubectl("patch", "node", f"fake-{k:05d}", "--type=merge", "-p", json.dumps(patch))
    new_in = race(lambda a: a.has_fdb(new, fake_ip(k)))
    old_gone = race(lambda a: not a.has_fdb(fake_mac(k)))
    row("a remote node's VTEP MAC changed: new fdb entry in / old one removed",
        f"{outcome(new_in['weir'])} / {outcome(old_gone['weir'])}",
        f"{outcome(new_in['flannel'])} / {outcome(old_gone['flannel'])}")
    assert new_in["weir"] is not None and old_gone["weir"] is not None


@pytest.fixture
def stranger():
    """A host on the underlay that speaks VXLAN on VNI 1, port 8472, but is not a node."""
    lab.attach(STRANGER, "eth0", STRANGER_IP)
    lab.sh(["ip", "-n", STRANGER, "link", "add", "vx0", "type", "vxlan", "id", "1", "dstport", "8472", "local", STRANGER_IP,
            "dev", "eth0", "nolearning"])
    lab.sh(["ip", "-n", STRANGER, "link", "set", "vx0", "up"])
    lab.sh(["ip", "-n", STRANGER, "addr", "add", "10.250.0.1/32", "dev", "vx0"])
    for a in AGENTS:
        gateway = lab.node_cidr(a.node).split("/")[0]
        mac = a.vtep_mac()
        lab.sh(["bridge", "-n", STRANGER, "fdb", "append", mac, "dev", "vx0", "dst", lab.node_ip(a.node), "self", "permanent"])
        lab.sh(["ip", "-n", STRANGER, "neigh", "replace", gateway, "dev", "vx0", "lladdr", mac, "nud", "permanent"])
        lab.sh(["ip", "-n", STRANGER, "route", "add", lab.node_cidr(a.node), "via", gateway, "dev", "vx0", "onlink"])
    yield
    lab.sh(["ip", "netns", "del", STRANGER], check=False)


def test_a_forged_vxlan_frame_from_a_host_that_is_not_a_node_is_dropped(row, stranger):
    sent = 20
    before = {a.kind: a.rx_packets() for a in AGENTS}
    for a in AGENTS:
        subprocess.run(["ip", "netns", "exec", STRANGER, "ping", "-c", str(sent), "-i", "0.05", "-W", "1", "-I", "10.250.0.1",
                        pod_ip(a.node)], capture_output=True)
    delivered = {a.kind: a.rx_packets() - before[a.kind] for a in AGENTS}
    fmt = lambda n: "delivered" if n >= sent else (f"{n}/{sent} delivered" if n else "dropped")  # noqa: E731
    row("a forged VXLAN frame from a host that is not a node (flannel#1757)", fmt(delivered["weir"]),
        fmt(delivered["flannel"]))
    assert delivered["weir"] == 0, f"weir's device decapsulated {delivered['weir']} of the stranger's frames"


def ping_log(src, dst, seconds):
    p = subprocess.Popen(["ip", "netns", "exec", lab.node_ns(src), "ping", "-q", "-i", "0.1", "-w", str(seconds), "-I",
                          pod_ip(src), pod_ip(dst)], stdout=subprocess.PIPE, text=True)
    return p


def loss(p):
    """(sent, lost) of a finished ping."""
    m = re.search(r"(\d+) packets transmitted, (\d+) received", p.communicate()[0])
    return int(m.group(1)), int(m.group(1)) - int(m.group(2))


def test_api_server_down_for_60_s_loses_no_packet_and_keeps_liveness(row):
    probes = {a.kind: [] for a in AGENTS}
    urls = {"weir": "http://127.0.0.1:9478/healthz", "flannel": f"http://127.0.0.1:{FLANNEL_HEALTHZ_PORT}/healthz"}
    stop = threading.Event()

    def probe():
        while not stop.is_set():
            for a in AGENTS:
                try:
                    probes[a.kind].append(lab.ns_get(a.ns, urls[a.kind])[0] == 200)
                except Exception:
                    probes[a.kind].append(False)
            time.sleep(1)

    pings = {a.kind: ping_log(a.node, a.peer, 75) for a in AGENTS}
    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(5)
    lab.stop("apiserver")
    try:
        time.sleep(60)
    finally:
        lab.start_apiserver()
        lab.wait_api()
        stop.set()
        prober.join()
    lost = {k: loss(p) for k, p in pings.items()}
    fmt = lambda k: (f"{lost[k][1]}/{lost[k][0]} packets lost, liveness "  # noqa: E731
                     f"{'kept' if all(probes[k]) else f'failed {probes[k].count(False)}/{len(probes[k])} probes'}")
    row("the API server down for 60 s: pod-to-pod packets lost, liveness", fmt("weir"), fmt("flannel"))
    assert lost["weir"][1] == 0 and all(probes["weir"]), fmt("weir")


MEMORY_CGROUP = "/sys/fs/cgroup/memory/weir-holes"
LIMIT = 50 * 1024 * 1024


def cgroup_value(kind, name):
    return open(f"{MEMORY_CGROUP}/{kind}/{name}").read()


def test_5000_nodes_under_a_50_mi_memory_limit(row):
    """Each agent restarted in a memory cgroup limited to 50 Mi, then the
    cluster grown to 5,000 Nodes (flannel#963, #1415)."""
    try:
        for a in AGENTS:
            path = f"{MEMORY_CGROUP}/{a.kind}"
            os.makedirs(path, exist_ok=True)
            open(f"{path}/memory.limit_in_bytes", "w").write(str(LIMIT))
            a.stop()
            a.start(cgroup=path)
        bench.create_fakes(range(FAKES, 5000), addresses=False)
        want = expected_routes()
        deadline = time.time() + 300
        while time.time() < deadline and not all(not a.running() or a.routes() >= want for a in AGENTS):
            time.sleep(0.5)
        time.sleep(3)
        result = {}
        for a in AGENTS:
            kills = next((int(ln.split()[1]) for ln in cgroup_value(a.kind, "memory.oom_control").splitlines()
                          if ln.startswith("oom_kill ")), 0)
            peak = int(cgroup_value(a.kind, "memory.max_usage_in_bytes")) / 2**20
            alive = a.running() and a.routes() >= want
            result[a.kind] = (alive, f"{'survived' if alive else 'did not survive'}: {a.routes()}/{want} routes, "
                                     f"peak {peak:.0f} MiB, {kills} OOM kills")
        row("5,000 Nodes under a 50 Mi memory limit (flannel#963, #1415)", result["weir"][1], result["flannel"][1])
        assert result["weir"][0], result["weir"][1]
    finally:
        for a in AGENTS:
            a.stop()
            if os.path.isdir(f"{MEMORY_CGROUP}/{a.kind}"):
                os.rmdir(f"{MEMORY_CGROUP}/{a.kind}")
        if os.path.isdir(MEMORY_CGROUP):
            os.rmdir(MEMORY_CGROUP)
        # Back to the first FAKES fakes, for any test run after this one.
        bench.delete_fakes()
        bench.create_fakes(range(FAKES), addresses=False)
        for a in AGENTS:
            a.start()
