"""API load for `e2e/lab bench`, run inside the control-plane namespace
(`ip netns exec weir-cp python3 e2e/bench_load.py ...`), where the API
server is reachable. Each command prints what bench.py measures.

    bench_load.py addresses NAME...   # set each fake Node's InternalIP (status)
    bench_load.py join COUNT          # create Nodes 0.3 s apart: "k t0" per Node
    bench_load.py one-by-one COUNT    # fake Nodes 0..COUNT, one request each
    bench_load.py heartbeats NAME...  # 100 status updates/s for 10 s: the count
    bench_load.py vtep-mac NAME MAC   # set a Node's VTEP MAC (both agents'): t0
    bench_load.py burst COUNT         # COUNT Nodes from 16 clients, then wait for
                                      # their pod CIDRs: "written all" seconds
"""

import json
import sys
import threading
import time

from nsclient import ApiClient

MERGE = "application/merge-patch+json"


def fake_ip(k):
    return f"198.19.{k // 256 % 256}.{k % 256}"


def flannel_annotations(ip, mac):
    """What flannel's kube subnet manager publishes on a Node (v0.28)."""
    return {"flannel.alpha.coreos.com/backend-type": "vxlan",
            "flannel.alpha.coreos.com/backend-data": json.dumps({"VNI": 1, "VtepMAC": mac}),
            "flannel.alpha.coreos.com/public-ip": ip,
            "flannel.alpha.coreos.com/kube-subnet-manager": "true"}


def fake_node(k, with_cidr=True):
    """Fake Node k, carrying both weir's and flannel's annotations, so that
    both agents program the same set (its status address is set apart)."""
    hi, lo = k // 256, k % 256
    ip, mac = fake_ip(k), f"0e:fa:00:00:{hi:02x}:{lo:02x}"
    annotations = {"weir.dev/public-ip": ip, "weir.dev/vtep-mac": mac, "weir.dev/backend": "vxlan", "weir.dev/vni": "1",
                   **flannel_annotations(ip, mac)}
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": f"fake-{k:05d}", "labels": {"weir-bench": "fake"}, "annotations": annotations},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
    if with_cidr:
        cidr = f"10.{128 + hi}.{lo}.0/24"
        node["spec"] = {"podCIDR": cidr, "podCIDRs": [cidr]}
    return node


def one_by_one(count):
    c = ApiClient()
    for k in range(count):
        node = fake_node(k)
        c.must("POST", "/api/v1/nodes", node)
        c.must("PATCH", f"/api/v1/nodes/{node['metadata']['name']}/status", {"status": node["status"]}, MERGE)


def addresses(names):
    c = ApiClient()
    for name in names:
        ip = fake_ip(int(name.split("-")[1]))
        c.must("PATCH", f"/api/v1/nodes/{name}/status",
               {"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}, MERGE)


def join(count):
    c = ApiClient()
    for k in range(60000, 60000 + count):
        hi, lo, n = k // 256 % 256, k % 256, k - 60000
        cidr = f"10.{250 + n // 256}.{n % 256}.0/24"
        mac = f"0e:fb:00:00:{hi:02x}:{lo:02x}"
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": f"join-{k}", "labels": {"weir-bench": "fake"},
                             "annotations": {"weir.dev/public-ip": fake_ip(k), "weir.dev/vtep-mac": mac,
                                             "weir.dev/backend": "vxlan", **flannel_annotations(fake_ip(k), mac)}},
                "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}
        t0 = time.time()
        c.must("POST", "/api/v1/nodes", node)
        print(f"{k} {t0:.6f}", flush=True)
        time.sleep(0.3)


def vtep_mac(name, mac):
    c = ApiClient()
    node = json.loads(c.must("GET", f"/api/v1/nodes/{name}"))
    ip = node["metadata"]["annotations"]["weir.dev/public-ip"]
    patch = {"metadata": {"annotations": {"weir.dev/vtep-mac": mac, **flannel_annotations(ip, mac)}}}
    t0 = time.time()
    c.must("PATCH", f"/api/v1/nodes/{name}", patch, MERGE)
    print(f"{t0:.6f}")


def heartbeats(names, rate=100, seconds=10):
    c = ApiClient()
    start, n = time.time(), 0
    while time.time() - start < seconds:
        name = names[n % len(names)]
        n += 1
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        cond = {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": now,
                "lastTransitionTime": now}
        c.must("PATCH", f"/api/v1/nodes/{name}/status", {"status": {"conditions": [cond]}}, MERGE)
        time.sleep(max(0, start + n / rate - time.time()))
    print(n)


def burst(count, clients=16):
    names = [f"ctl-{k:05d}" for k in range(count)]

    def worker(chunk):
        c = ApiClient()
        for name in chunk:
            c.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                 "metadata": {"name": name, "labels": {"weir-bench": "fake"}}})
    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(names[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t1 = time.time()
    c = ApiClient()
    while True:
        items = json.loads(c.must("GET", "/api/v1/nodes?labelSelector=weir-bench%3Dfake"))["items"]
        done = sum(1 for it in items if it["metadata"]["name"].startswith("ctl-") and it.get("spec", {}).get("podCIDRs"))
        if done >= count:
            break
        time.sleep(0.1)
    print(f"{t1 - t0:.2f} {time.time() - t0:.2f}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"addresses": lambda: addresses(args), "join": lambda: join(int(args[0])),
     "one-by-one": lambda: one_by_one(int(args[0])),
     "heartbeats": lambda: heartbeats(args),
     "vtep-mac": lambda: vtep_mac(*args), "burst": lambda: burst(int(args[0]))}[cmd]()
