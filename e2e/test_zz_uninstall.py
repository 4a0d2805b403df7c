"""Runs last: uninstalling weir leaves the dataplane up; `weir-agent cleanup` then removes it."""

import json
import subprocess

import lablib as lab
from test_lab import background_ping, loss_of, wait


def test_uninstall_leaves_the_dataplane_and_cleanup_removes_it(cluster):
    dst = lab.pods()["pod-2-1"]
    proc = background_ping("pod-1-1", dst, seconds=20, interval=0.2)
    lab.kubectl("delete", "-k", str(lab.STATE / "overlay"), "--wait=true", "--timeout=120s")
    wait(lambda: not lab.pods_in(lab.NS, lab.AGENT_SELECTOR) if lab.NS in lab.kubectl("get", "ns") else True, 120,
         "every agent pod gone")
    sent, recv = loss_of(proc)
    assert sent == recv, f"{sent - recv} of {sent} packets lost across the uninstall"
    assert lab.ping("pod-3-1", dst, count=3)[1] == 3, "pods still reach each other with weir uninstalled"
    agent = str(lab.ROOT / "target" / "release" / "weir-agent")
    for i in lab.nodes():
        out = lab.in_node(i, [agent, "cleanup"], check=False)
        links = json.loads(lab.sh(["ip", "-n", lab.node_ns(i), "-j", "link", "show"]))
        assert not [ln["ifname"] for ln in links if ln["ifname"].startswith("weir.")], out
        assert lab.sh(["ip", "-n", lab.node_ns(i), "route", "show", "proto", "87"]).strip() == ""
        nft = subprocess.run(["ip", "netns", "exec", lab.node_ns(i), "nft", "list", "table", "inet", "weir"],
                             capture_output=True)
        assert nft.returncode != 0, "nft table inet weir removed"
        assert not (lab.node_dir(i) / "fs" / "etc-cni-net.d" / "10-weir.conflist").exists(), "CNI config removed"
