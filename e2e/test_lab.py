"""End-to-end on real nodes: kubelet, containerd and kube-proxy per node, weir from its manifests,
the real kernel datapath and the real CNI plugins."""

import json
import subprocess
import time

import lablib as lab


def ip_json(ns, *args):
    out = lab.sh(["ip", "-n", ns, "-j", *args])
    return json.loads(out or "[]")


def programmed(node_i, cidr, mac):
    """Whether node-<node_i> holds the route, neighbour and fdb entry for a peer."""
    ns = lab.node_ns(node_i)
    gw = cidr.split("/")[0]
    route = any(r["dst"] == cidr for r in ip_json(ns, "route", "show", "proto", "87"))
    neigh = any(n["dst"] == gw and n.get("lladdr") == mac for n in ip_json(ns, "neigh", "show", "dev", "weir.1"))
    fdb = mac in lab.sh(["bridge", "-n", ns, "fdb", "show", "dev", "weir.1"])
    return route, neigh, fdb


def node_info(name):
    out = lab.kubectl("get", "node", name, "-o", "json", "--ignore-not-found")
    if not out.strip():  # a kubelet that has not registered its Node yet
        return None, None
    n = json.loads(out)
    return n["spec"].get("podCIDRs", [None])[0], n["metadata"].get("annotations", {}).get("weir.dev/vtep-mac")


def wait(cond, timeout, what):
    """lab.wait_for, failing the test rather than erroring it on a timeout."""
    try:
        lab.wait_for(cond, timeout, what, step=0.2)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None


def background_ping(src, ip, seconds, interval=0.1):
    count = int(seconds / interval)
    return subprocess.Popen([*lab.netns_target(src), "ping", "-n", "-q", "-i", str(interval), "-c", str(count), "-W", "1", ip],
                            stdout=subprocess.PIPE, text=True)


def loss_of(proc):
    out, _ = proc.communicate(timeout=600)
    line = next(ln for ln in out.splitlines() if "packets transmitted" in ln)
    sent, recv = int(line.split(",")[0].split()[0]), int(line.split(",")[1].split()[0])
    return sent, recv


def test_full_mode_baseline_all_pairs(cluster):
    rows = lab.ping_matrix(count=3)
    assert len(rows) == 6 * 5
    lossy = [(r[0], r[1]) for r in rows if r[4] != r[3]]
    assert not lossy, f"loss between {lossy}"


def test_annotations_published_and_peers_programmed(cluster):
    for i in (1, 2, 3):
        n = json.loads(lab.kubectl("get", "node", f"node-{i}", "-o", "json"))
        ann = n["metadata"]["annotations"]
        assert ann["weir.dev/public-ip"] == lab.node_ip(i)
        assert ann["weir.dev/backend"] == "vxlan"
        assert ann["weir.dev/vni"] == "1"
        cond = {c["type"]: c for c in n["status"]["conditions"]}
        assert cond["NetworkUnavailable"]["status"] == "False"
        assert cond["NetworkUnavailable"]["reason"] == "WeirIsUp"
    cidr, mac = node_info("node-2")
    assert programmed(1, cidr, mac) == (True, True, True)


def test_node_added_later_is_reached_by_every_pod(cluster):
    lab.add_node(4)
    lab.add_pod(4, 1)
    new_ip = lab.pods()["pod-4-1"]
    for src in [p for p in lab.pods() if p != "pod-4-1"]:
        wait(lambda: lab.ping(src, new_ip)[1] == 1, 30, f"{src} -> {new_ip}")
        _, recv, _ = lab.ping("pod-4-1", lab.pods()[src])
        assert recv == 1, f"pod-4-1 -> {src}"


def test_node_removed_vanishes_everywhere(cluster):
    if "weir-node-4" not in lab.netns_list():
        lab.add_node(4)
        lab.wait_cni_config(4)
    wait(lambda: node_info("node-4")[1] is not None, 90, "node-4 annotations")
    cidr, mac = node_info("node-4")
    wait(lambda: all(programmed(i, cidr, mac) == (True, True, True) for i in (1, 2, 3)), 30, "node-4 programmed")
    lab.remove_node(4)
    wait(lambda: all(programmed(i, cidr, mac) == (False, False, False) for i in (1, 2, 3)), 30,
         "node-4's route, neighbour and fdb entry gone on every node")


def restarts(i):
    p = json.loads(lab.kubectl("get", "pod", "-n", lab.NS, lab.agent_pod(i), "-o", "json"))
    return p["status"]["containerStatuses"][0]["restartCount"]


def test_agent_sigkill_loses_no_packet(cluster):
    dst = lab.pods()["pod-2-1"]
    before = restarts(2)
    proc = background_ping("pod-1-1", dst, seconds=8)
    time.sleep(2)
    lab.kill_agent(2)
    sent, recv = loss_of(proc)
    assert sent == recv, f"{sent - recv} of {sent} packets lost across an agent SIGKILL"
    wait(lambda: restarts(2) == before + 1 and lab.agent_ready(2), 60, "the kubelet restarted node-2's agent")


def agent_get(i, path):
    """The HTTP status of node i's agent endpoint, as text, or why there is none."""
    status, body = lab.ns_get(lab.node_ns(i), f"http://127.0.0.1:9478{path}")
    return str(status) if status else body[-200:]


def test_apiserver_down_60s_loses_nothing_and_new_node_follows(cluster):
    dst = lab.pods()["pod-3-1"]
    proc = background_ping("pod-1-1", dst, seconds=70, interval=0.2)
    # Read while the API server is up; containerd answers for them later.
    agents = {i: lab.container_id(lab.agent_pod(i), lab.NS)[0] for i in (1, 2, 3)}
    pids = {i: lab.task_pid(i, agents[i]) for i in (1, 2, 3)}
    time.sleep(2)
    lab.stop("apiserver")
    try:
        for _ in range(6):
            time.sleep(10)
            for i in (1, 2, 3):
                assert agent_get(i, "/healthz") == "200", f"node-{i} not live while the API server is down"
                assert lab.task_pid(i, agents[i]) == pids[i], f"node-{i}'s agent was restarted while the API server was down"
    finally:
        lab.start_apiserver()
        lab.wait_api()
    sent, recv = loss_of(proc)
    assert sent == recv, f"{sent - recv} of {sent} packets lost while the API server was down"
    lab.add_node(5)
    try:
        # The rest of the control plane is back too: the lab restarts
        # kube-controller-manager and kube-scheduler, as their lost Leases
        # would. Left on watches still in back-off, they made and bound this
        # pod 44-60 s late, and later nodes could wait 5 min for theirs.
        wait(lambda: lab.agent_pod(5) is not None, 20, "node-5's agent pod made and bound after the API server returned")
        lab.add_pod(5, 1)
        new_ip = lab.pods()["pod-5-1"]
        wait(lambda: lab.ping("pod-1-1", new_ip)[1] == 1, 60, "node-5 programmed after the API server returned")
    finally:
        # Later tests count the cluster's nodes.
        lab.remove_node(5)
