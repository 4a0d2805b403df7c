"""`e2e/lab bench --only controller`: weir-controller beside
kube-controller-manager's range allocator (--allocate-node-cidrs), in one
run of one bench lab (e2e/proclab.py; both as processes in weir-cp).

Scenarios, each run against both allocators in turn:
- burst: 1,000 Nodes written by 16 parallel clients; time until all hold
  pod CIDRs, the allocator's CPU seconds and its API requests (unique audit
  IDs in the API server's audit log, by user or user agent);
- exhaustion: 6 Nodes for a pool of 4, then one allocated Node deleted:
  is the 5th served, and how fast;
- overlap: Nodes that already hold a /23, and two that hold the same /24,
  then 10 new Nodes: does any new CIDR overlap a held one;
- outage: the API server down 25 s with two replicas of each alive (weir's
  Lease is the bench lab's 6 s, kube-controller-manager's its default 15 s),
  then 30 new Nodes.
Every scenario ends by checking that no CIDR is held by two Nodes.
"""

import ipaddress
import json
import time

import bench
import proclab as lab
from bench import load, report

AUDIT_LOG = "audit.log"
WEIR_USER = "system:serviceaccount:weir-system:weir-controller"
KCM_AGENT = "kube-controller-manager/"
POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
"""


def with_audit():
    """The API server again, writing an audit log."""
    (lab.STATE / "audit-policy.yaml").write_text(POLICY)
    lab.stop("apiserver")
    lab.start_apiserver(extra_flags=[f"--audit-policy-file={lab.STATE / 'audit-policy.yaml'}",
                                     f"--audit-log-path={lab.STATE / AUDIT_LOG}", "--audit-log-maxsize=0"])
    lab.wait_api()


def audit_mark():
    path = lab.STATE / AUDIT_LOG
    return path.stat().st_size if path.exists() else 0


def requests_since(mark, kind):
    """Unique requests the allocator made since `mark`, by verb."""
    seen, verbs = set(), {}
    with open(lab.STATE / AUDIT_LOG) as f:
        f.seek(mark)
        for ln in f:
            e = json.loads(ln)
            mine = (e["user"]["username"] == WEIR_USER if kind == "weir"
                    else e.get("userAgent", "").startswith(KCM_AGENT))
            if mine and e["auditID"] not in seen:
                seen.add(e["auditID"])
                verbs[e["verb"]] = verbs.get(e["verb"], 0) + 1
    return len(seen), verbs


def cpu(names):
    total = 0.0
    for name in names:
        pid = lab.running(name)
        if pid:
            total += lab.process_cpu(pid)
    return total


# ------------------------------------------------------------ the two allocators

class Weir:
    name = "weir-controller"
    kind = "weir"
    processes = ("controller-a", "controller-b")

    def start(self, cidr):
        lab.CLUSTER_CIDR = cidr
        lab.start_controllers()

    def stop(self):
        for p in self.processes:
            lab.stop(p)
        lab.kubectl("delete", "lease", "-n", lab.NS, "weir-controller", "--ignore-not-found")


class Kcm:
    name = "kube-controller-manager"
    kind = "kcm"
    processes = ("kcm-a", "kcm-b")

    def __init__(self, qps=None):
        self.qps = qps
        if qps:
            self.name += f" (--kube-api-qps={qps})"

    def start(self, cidr):
        kc = lab.STATE / "admin.kubeconfig"
        rate = [f"--kube-api-qps={self.qps}", f"--kube-api-burst={self.qps}"] if self.qps else []
        for p in self.processes:
            lab.spawn(p, lab.CP_NS, [
                str(lab.BIN / "kube-controller-manager"), f"--kubeconfig={kc}", "--controllers=node-ipam-controller",
                "--allocate-node-cidrs=true", f"--cluster-cidr={cidr}", "--node-cidr-mask-size=24",
                "--secure-port=0", "--leader-elect=true", "--leader-elect-lease-duration=15s",
                "--leader-elect-renew-deadline=10s", "--leader-elect-retry-period=2s", *rate, "--v=1"])

    def stop(self):
        for p in self.processes:
            lab.stop(p)
        lab.kubectl("delete", "lease", "-n", "kube-system", "kube-controller-manager", "--ignore-not-found")


# ------------------------------------------------------------ helpers

def nodes():
    items = json.loads(lab.kubectl("get", "nodes", "-o", "json"))["items"]
    return {n["metadata"]["name"]: n.get("spec", {}).get("podCIDRs", []) for n in items}


def double_allocations():
    seen, clashes = [], []
    for name, cidrs in sorted(nodes().items()):
        for c in cidrs:
            net = ipaddress.ip_network(c)
            clashes += [f"{name} {c} overlaps {o} {on}" for o, on in seen if on.overlaps(net)]
            seen.append((name, net))
    return clashes


def create(names, cidrs=None):
    items = [{"apiVersion": "v1", "kind": "Node",
              "metadata": {"name": n, "labels": {"weir-bench": "fake"}},
              **({"spec": {"podCIDR": cidrs[n], "podCIDRs": [cidrs[n]]}} if cidrs and n in cidrs else {})} for n in names]
    lab.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def clear():
    bench.delete_fakes()


def wait_allocated(names, timeout):
    """Seconds until every one of names holds a CIDR, or None."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        have = nodes()
        if all(have.get(n) for n in names):
            return time.time() - t0
        time.sleep(0.1)
    return None


# ------------------------------------------------------------ scenarios

def burst(alloc, n=1000):
    mark, cpu0 = audit_mark(), cpu(alloc.processes)
    written, total = (float(x) for x in load("burst", n).split())
    spent = cpu(alloc.processes) - cpu0
    time.sleep(2)  # let the audit log catch up
    count, verbs = requests_since(mark, alloc.kind)
    clashes = double_allocations()
    clear()
    return {"written": written, "total": total, "cpu": spent, "requests": count, "verbs": verbs, "clashes": clashes}


def exhaustion(alloc):
    """A pool of 4 /24s and 6 Nodes; then one allocated Node deleted."""
    names = [f"exh-{k}" for k in range(6)]
    create(names)
    time.sleep(10)
    have = nodes()
    served = [n for n in names if have.get(n)]
    waiting = [n for n in names if not have.get(n)]
    clashes = double_allocations()
    if served:
        lab.kubectl("delete", "node", served[0])
    t = None
    t0 = time.time()
    while waiting and time.time() - t0 < 60:
        if any(nodes().get(n) for n in waiting):
            t = time.time() - t0
            break
        time.sleep(0.1)
    clashes += double_allocations()
    clear()
    return {"served": len(served), "freed_served_in": t, "clashes": clashes}


def overlap(alloc):
    """Nodes that already hold CIDRs (a /23, and one /24 on two Nodes), then 10 new ones."""
    held = {"held-wide": "10.98.0.0/23", "held-twin-a": "10.98.2.0/24", "held-twin-b": "10.98.2.0/24"}
    create(list(held), held)
    alloc.start("10.98.0.0/20")
    names = [f"new-{k}" for k in range(10)]
    create(names)
    took = wait_allocated(names, 60)
    have = nodes()
    bad = [f"{n} {c}" for n in names for c in have.get(n, [])
           if any(ipaddress.ip_network(c).overlaps(ipaddress.ip_network(h)) for h in held.values())]
    alloc.stop()
    clear()
    return {"took": took, "overlapping": bad}


def outage(alloc, n=30):
    lab.stop("apiserver")
    time.sleep(25)
    with_audit()
    names = [f"out-{k:02d}" for k in range(n)]
    create(names)
    took = wait_allocated(names, 120)
    clashes = double_allocations()
    clear()
    return {"took": took, "clashes": clashes}


def run_all(alloc):
    r = {}
    alloc.start("10.0.0.0/8")
    time.sleep(8)  # a leader elected
    r["burst"] = burst(alloc)
    r["outage"] = outage(alloc)
    alloc.stop()
    alloc.start("10.99.0.0/22")
    time.sleep(8)
    r["exhaustion"] = exhaustion(alloc)
    alloc.stop()
    r["overlap"] = overlap(alloc)
    return r


def main():
    lab.down()
    lab.CLUSTER_CIDR = "10.0.0.0/8"
    lab.PROFILE = "release"
    lab.ensure_weir_built()
    lab.up(n_nodes=0, pods_per_node=0)
    try:
        with_audit()
        Weir().stop()  # lab.up started it
        results = {}
        for alloc in (Weir(), Kcm(), Kcm(qps=1000)):
            lab.log(f"controller bench: {alloc.name}")
            results[alloc.name] = run_all(alloc)
        summarise(results)
    finally:
        lab.down()


def summarise(results):
    weir = results["weir-controller"]
    for name, r in results.items():
        b = r["burst"]
        report(f"controller-{name}", (
            f"1,000-Node burst: all allocated {b['total']:.2f} s after the first write ({b['total'] - b['written']:.2f} s "
            f"after the last), {b['cpu']:.2f} CPU-s, {b['requests']} API requests {b['verbs']}; pool of 4 for 6 Nodes: "
            f"{r['exhaustion']['served']} served, the 5th served "
            f"{'%.2f s' % r['exhaustion']['freed_served_in'] if r['exhaustion']['freed_served_in'] is not None else 'never (60 s)'}"
            f" after a Node was freed; pre-held overlapping CIDRs: {len(r['overlap']['overlapping'])} new CIDRs overlap "
            f"them {r['overlap']['overlapping']}; 25 s outage then 30 Nodes: allocated in "
            f"{'%.2f s' % r['outage']['took'] if r['outage']['took'] is not None else 'never (120 s)'}; double allocations: "
            f"{b['clashes'] + r['exhaustion']['clashes'] + r['outage']['clashes'] or 'none'}"))
    kcm = results["kube-controller-manager"]
    ratio = weir["burst"]["total"] / kcm["burst"]["total"]
    # Correct: nothing given twice, and every Node that could be served was
    # (after the outage; the 5th of the exhausted pool once a Node is freed).
    correct = not (weir["burst"]["clashes"] or weir["exhaustion"]["clashes"] or weir["outage"]["clashes"]
                   or weir["overlap"]["overlapping"]) and weir["outage"]["took"] is not None \
        and weir["exhaustion"]["freed_served_in"] is not None
    report("controller", f"burst of 1,000: weir {weir['burst']['total']:.2f} s, kube-controller-manager "
                         f"{kcm['burst']['total']:.2f} s, ratio {ratio:.2f}x (goal <= 1x, and correct in every case) "
                         f"{'met' if ratio <= 1 and correct else 'missed'}")
