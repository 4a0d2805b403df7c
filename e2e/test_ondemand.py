"""On-demand mode in the lab: misses answered with no packet lost, state only for contacted peers,
recovery from a forced ENOBUFS, restart keeps entries."""

import json
import os
import signal
import time

import pytest

import lablib as lab
from test_lab import agent_get, background_ping, loss_of, node_info, wait
from test_monitoring import assert_fresh_agent_exports_every_readme_series
from test_operability import metrics


def neighs(i):
    return {n["dst"]: n.get("lladdr") for n in json.loads(lab.sh(["ip", "-n", lab.node_ns(i), "-j", "neigh", "show", "dev", "weir.1"]) or "[]")
            if "PERMANENT" in n.get("state", [])}


def fdb_macs(i):
    return {e["mac"] for e in json.loads(lab.sh(["bridge", "-n", lab.node_ns(i), "-j", "fdb", "show", "dev", "weir.1"]) or "[]") if "dst" in e}


def gw(node):
    return node_info(node)[0].split("/")[0]


@pytest.fixture(scope="module")
def ondemand(cluster):
    lab.set_mode("on-demand")
    for i in lab.nodes():
        wait(lambda: agent_get(i, "/readyz") == "200", 30, f"node-{i} ready in on-demand mode")
    yield
    lab.set_mode("full")
    for i in lab.nodes():
        wait(lambda: agent_get(i, "/readyz") == "200", 30, f"node-{i} ready in full mode")


def test_device_has_miss_flags_and_routes_to_every_peer(ondemand):
    for i in (1, 2, 3):
        info = json.loads(lab.sh(["ip", "-n", lab.node_ns(i), "-j", "-d", "link", "show", "weir.1"]))[0]["linkinfo"]["info_data"]
        assert info["l2miss"] and info["l3miss"] and info["proxy"], info
        assert lab.sh(["cat", "/proc/sys/net/ipv4/neigh/weir.1/app_solicit"], ns=lab.node_ns(i)).strip() != "0"
        routes = json.loads(lab.sh(["ip", "-n", lab.node_ns(i), "-j", "route", "show", "proto", "87"]))
        assert len(routes) == 2


def test_state_only_for_contacted_peers(ondemand):
    assert neighs(1) == {} and fdb_macs(1) == set(), "nothing installed before traffic"
    _, recv, _ = lab.ping("pod-1-1", lab.pods()["pod-2-1"], count=1)
    assert recv == 1, "the very first packet arrives"
    assert set(neighs(1)) == {gw("node-2")}, "node-1 holds an entry for node-2 only"
    assert fdb_macs(1) == {node_info("node-2")[1]}
    m = metrics(1)
    assert m.get('weir_l3miss_total{result="resolved"}', 0) >= 1
    assert m.get("weir_miss_resolve_seconds_count", 0) >= 1
    wait(lambda: lab.agent_exec(1, "/weir-agent", "status", "--output", "json").returncode == 0, 10, "status in sync")
    out = lab.agent_exec(1, "/weir-agent", "status", "--output", "json")
    rows = {r["node"]: r for r in json.loads(out.stdout)["report"]["peers"]}
    assert rows["node-2"]["last_miss_seconds"] is not None, "status shows node-2's last miss"
    assert rows["node-3"]["last_miss_seconds"] is None and rows["node-3"]["fdb"] is True, "absent on demand is not drift"


def test_all_pairs_zero_loss_from_the_first_packet(ondemand):
    p = lab.pods()
    for src in p:
        for dst, ip in p.items():
            if src != dst:
                sent, recv, _ = lab.ping(src, ip, count=1, wait=2)
                assert recv == 1, f"first packet {src} -> {dst} lost"


def test_forced_enobufs_recovers_without_losing_entries(ondemand):
    before = metrics(1).get("weir_netlink_enobufs_total", 0)
    installed = neighs(1)
    assert installed, "earlier tests contacted peers"
    lab.set_agent_env(WEIR_MISS_RCVBUF="256")
    wait(lambda: agent_get(1, "/readyz") == "200", 30, "node-1 ready with a tiny miss buffer")
    # The miss socket hears only misses (a kernel filter drops other neighbour
    # churn), so the flood is misses: 200 unknown overlay addresses, raised
    # while the agent is frozen, so the tiny buffer overflows for certain.
    ns = lab.node_ns(1)
    lab.sh(["ip", "-n", ns, "route", "replace", "10.99.0.0/16", "dev", "weir.1"])
    flood = ("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
             "for i in range(1, 201):\n    s.sendto(b'x', ('10.99.0.%d' % i, 9))\n")
    agent = lab.agent_pid(1)
    os.kill(agent, signal.SIGSTOP)
    try:
        lab.sh(["python3", "-c", flood], ns=ns)
    finally:
        os.kill(agent, signal.SIGCONT)
    wait(lambda: metrics(1).get("weir_netlink_enobufs_total", 0) > before, 10, "ENOBUFS counted")
    lab.sh(["ip", "-n", ns, "route", "del", "10.99.0.0/16", "dev", "weir.1"])
    assert neighs(1) == installed, "no installed entry lost"
    _, recv, _ = lab.ping("pod-1-1", lab.pods()["pod-3-1"], count=1, wait=2)
    assert recv == 1
    lab.set_agent_env(WEIR_MISS_RCVBUF=None)


def test_restart_keeps_entries_and_connectivity(ondemand):
    dst = lab.pods()["pod-2-1"]
    assert lab.ping("pod-1-1", dst)[1] == 1
    installed = neighs(1)
    proc = background_ping("pod-1-1", dst, seconds=30)
    time.sleep(1)
    lab.stop_agent(1)
    assert neighs(1) == installed, "entries survive the agent's exit"
    lab.start_agent(1)
    wait(lambda: agent_get(1, "/readyz") == "200", 30, "node-1 ready again")
    sent, recv = loss_of(proc)
    assert sent == recv, f"{sent - recv} of {sent} lost across an on-demand restart"
    assert neighs(1) == installed, "entries adopted, not flushed"


def test_a_freshly_started_agent_exports_every_readme_series(ondemand):
    assert_fresh_agent_exports_every_readme_series(3)
