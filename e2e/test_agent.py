"""weir-agent on Kubernetes: hand-changed annotations, hostile annotations, re-list after compaction."""

import json
import subprocess
import time

import lablib as lab
from test_lab import node_info, programmed, wait
from test_operability import metrics


def annotate(node, **ann):
    args = [f"{k.replace('_', '/', 1).replace('__', '-')}={v}" for k, v in ann.items()]
    lab.kubectl("annotate", "--overwrite", "node", node, *args)


def test_hand_changed_mac_replaces_old_entries_everywhere(cluster):
    cidr, real_mac = node_info("node-2")
    fake_mac = "0e:00:00:00:ab:cd"
    lab.kubectl("annotate", "--overwrite", "node", "node-2", f"weir.dev/vtep-mac={fake_mac}")
    try:
        for i in (1, 3):
            wait(lambda: programmed(i, cidr, fake_mac) == (True, True, True), 10, f"node-{i} uses the new MAC")
            assert real_mac not in lab.sh(["bridge", "-n", lab.node_ns(i), "fdb", "show", "dev", "weir.1"]), "old fdb entry removed"
    finally:
        lab.kubectl("annotate", "--overwrite", "node", "node-2", f"weir.dev/vtep-mac={real_mac}")
    for i in (1, 3):
        wait(lambda: programmed(i, cidr, real_mac) == (True, True, True), 10, f"node-{i} back on the real MAC")
    ip = lab.pods()["pod-2-1"]
    wait(lambda: lab.ping("pod-1-1", ip)[1] == 1, 10, "traffic restored")


HOSTILE = {
    # name: (annotations, podCIDR, status address, rejected field)
    "evil-multicast": ({"weir.dev/vtep-mac": "01:00:5e:00:00:01", "weir.dev/public-ip": "198.18.0.91"}, "10.244.91.0/24", "198.18.0.91", "weir.dev/vtep-mac"),
    "evil-notmac": ({"weir.dev/vtep-mac": "not-a-mac", "weir.dev/public-ip": "198.18.0.92"}, "10.244.92.0/24", "198.18.0.92", "weir.dev/vtep-mac"),
    "evil-huge": ({"weir.dev/vtep-mac": "0e:00:00:00:00:93", "weir.dev/public-ip": "1" * 4096}, "10.244.93.0/24", "198.18.0.93", "weir.dev/public-ip"),
    "evil-stolen-ip": ({"weir.dev/vtep-mac": "0e:00:00:00:00:94", "weir.dev/public-ip": lab.node_ip(2)}, "10.244.94.0/24", "198.18.0.94", "weir.dev/public-ip"),
    "evil-overlap": ({"weir.dev/vtep-mac": "0e:00:00:00:00:95", "weir.dev/public-ip": "198.18.0.95"}, None, "198.18.0.95", "spec.podCIDRs"),
}


def test_hostile_annotations_are_rejected_and_nothing_else_breaks(cluster):
    before = metrics(1)
    n1_cidr = node_info("node-1")[0]
    items = []
    for name, (ann, cidr, addr, _) in HOSTILE.items():
        cidr = cidr or n1_cidr.replace(".0/24", ".128/25")
        items.append({"apiVersion": "v1", "kind": "Node",
                      "metadata": {"name": name, "labels": {"weir-test": "evil"}, "annotations": dict(ann, **{"weir.dev/backend": "vxlan"})},
                      "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})
    lab.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    for name, (_, _, addr, _) in HOSTILE.items():
        lab.kubectl("patch", "node", name, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"addresses": [{"type": "InternalIP", "address": addr}]}}))
    try:
        def all_logged():
            text = lab.agent_log(1)
            return all(name in text and "node rejected as a peer" in text for name in HOSTILE)
        wait(all_logged, 15, "a WARN line per hostile node on node-1")
        log = lab.agent_log(1)
        for name, (_, _, _, field) in HOSTILE.items():
            line = next(ln for ln in log.splitlines() if "node rejected as a peer" in ln and name in ln)
            assert field in line, line
            assert len(line) < 1000, "a 4 KiB value is clipped in the log"
        after = metrics(1)
        for reason in ("vtep-mac", "public-ip", "pod-cidr"):
            key = f'weir_peer_rejected_total{{reason="{reason}"}}'
            assert after.get(key, 0) > before.get(key, 0), reason
        routes = {r["dst"] for r in json.loads(lab.sh(["ip", "-n", lab.node_ns(1), "-j", "route", "show", "proto", "87"]))}
        assert not any(r.startswith("10.244.9") for r in routes), routes
        rows = lab.ping_matrix(count=1)
        assert all(r[4] == r[3] for r in rows), "every pod still reaches every other"
    finally:
        lab.kubectl("delete", "nodes", "-l", "weir-test=evil")


def etcd(path, body):
    status, text = lab.ns_get(lab.CP_NS, f"http://127.0.0.1:2379{path}", body=json.dumps(body))
    assert status == 200, text
    return json.loads(text)


def test_relist_after_compaction_converges_without_spurious_deletes(cluster):
    import base64
    import os
    import signal
    lab.add_node(6)
    wait(lambda: node_info("node-6")[1] is not None, 90, "node-6 published")
    cidr6, mac6 = node_info("node-6")
    keep2 = node_info("node-2")
    wait(lambda: programmed(1, cidr6, mac6) == (True, True, True), 10, "node-6 programmed on node-1")
    inits_before = metrics(1).get('weir_kube_watch_events_total{type="init_done"}', 0)
    monitor = subprocess.Popen(["ip", "-n", lab.node_ns(1), "monitor", "route"], stdout=subprocess.PIPE, text=True)
    agent = lab.agent_pid(1)
    os.kill(agent, signal.SIGSTOP)
    try:
        # While node-1's agent is frozen and its watch is cut: node-6 vanishes
        # behind the API server's back (straight from etcd), history is
        # compacted, and the API server restarts. The agent's resourceVersion
        # is now too old: it must get 410 Gone, re-list, and sweep node-6.
        # node-6's kubelet would register its Node again.
        lab.stop_node_daemons(6)
        lab.stop("apiserver")
        key = base64.b64encode(b"/registry/minions/node-6").decode()
        assert etcd("/v3/kv/deleterange", {"key": key}).get("deleted") == "1"
        for k in range(5):  # move the revision well past the agent's last one
            etcd("/v3/kv/put", {"key": base64.b64encode(b"/weir-test/churn").decode(), "value": base64.b64encode(str(k).encode()).decode()})
        rev = int(etcd("/v3/kv/range", {"key": "AA=="})["header"]["revision"])
        etcd("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        lab.start_apiserver()
        lab.wait_api()
    finally:
        os.kill(agent, signal.SIGCONT)
    wait(lambda: programmed(1, cidr6, mac6) == (False, False, False), 60, "node-6 swept after the re-list")
    time.sleep(1)
    monitor.terminate()
    events = monitor.communicate()[0]
    deleted = [ln for ln in events.splitlines() if ln.startswith("Deleted")]
    assert all(keep2[0] not in ln for ln in deleted), f"a live node's route was deleted during the re-list: {deleted}"
    assert any(cidr6 in ln for ln in deleted)
    assert metrics(1).get('weir_kube_watch_events_total{type="init_done"}', 0) > inits_before, "a re-list happened"
    lab.remove_node(6)


def test_mixed_backend_node_is_logged_not_programmed(cluster):
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "ipip-node", "annotations": {"weir.dev/public-ip": "198.18.0.77", "weir.dev/backend": "ipip"}},
            "spec": {"podCIDR": "10.244.77.0/24", "podCIDRs": ["10.244.77.0/24"]}}
    lab.kubectl("apply", "-f", "-", input=json.dumps(node))
    try:
        wait(lambda: "ipip-node" in lab.agent_log(1), 15, "node-1 logs the ipip node")
        line = next(ln for ln in lab.agent_log(1).splitlines() if "ipip-node" in ln)
        assert "another backend" in line and "ipip" in line, line
        routes = lab.sh(["ip", "-n", lab.node_ns(1), "route", "show", "proto", "87"])
        assert "10.244.77.0" not in routes
    finally:
        lab.kubectl("delete", "node", "ipip-node")


CLOSE_SERVICE = """table ip e2e_no_service {{
 chain out {{ type filter hook output priority -150; ip daddr {ip} tcp dport 443 reject with tcp reset; }}
}}
"""


def test_an_agent_starts_and_sees_new_nodes_with_the_kubernetes_service_closed(cluster):
    """The lab sets WEIR_API_SERVER (weir_common::api). Here node-1 refuses the
    kubernetes Service's ClusterIP before kube-proxy's NAT, as kube-proxy's
    own rules do after an API server restart until its watch is back. A new
    agent on node-1 must still start, and see a Node added after it did."""
    service_ip = lab.kubectl("get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}").strip()
    lab.sh(["nft", "-f", "-"], ns=lab.node_ns(1), input=CLOSE_SERVICE.format(ip=service_ip))
    name, cidr, mac = "no-service-node", "10.244.96.0/24", "0e:00:00:00:00:96"
    try:
        probe = (f"import socket\ntry:\n socket.create_connection(('{service_ip}', 443), 3)\n print('open')\n"
                 "except ConnectionRefusedError:\n print('refused')\n")
        assert lab.sh(["python3", "-c", probe], ns=lab.node_ns(1)).strip() == "refused", "the Service was not closed"
        old = lab.agent_pod(1)
        lab.kubectl("delete", "pod", "-n", lab.NS, old, "--wait=false")
        wait(lambda: lab.agent_pod(1) not in (None, old) and lab.agent_ready(1), 90, "a new agent Ready on node-1")
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "annotations": {"weir.dev/vtep-mac": mac, "weir.dev/public-ip": "198.18.0.96",
                                                           "weir.dev/backend": "vxlan"}},
                "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}
        lab.kubectl("apply", "-f", "-", input=json.dumps(node))
        lab.kubectl("patch", "node", name, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.96"}]}}))
        wait(lambda: programmed(1, cidr, mac) == (True, True, True), 15, f"{name} programmed on node-1")
        line = next(ln for ln in lab.agent_log(1).splitlines() if '"API server"' in ln)
        assert lab.API in line and "--api-server" in line, line
    finally:
        lab.sh(["nft", "delete", "table", "ip", "e2e_no_service"], ns=lab.node_ns(1), check=False)
        lab.kubectl("delete", "node", name, "--ignore-not-found")
