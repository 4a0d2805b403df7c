"""`e2e/lab bench`: weir's figures B1-B4, B6 and B7, each printed next to its
baseline measured in the same run (B5 is bench_ondemand.py, the controller
bench_controller.py, F1-F7 bench_flannel.py). Fake Node objects stand in for the
thousands: no namespace behind them, underlay IPs from 198.19.0.0/16, and no
traffic is ever sent to them."""

import contextlib
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import time

import proclab as lab  # noqa: E402  (the bench keeps process agents; see BENCHMARKS.md)
from bench_load import fake_node

BIG_CLUSTER_CIDR = "10.0.0.0/8"
results = {}
# Distributions behind the figures, for e2e/plot_bench.py.
raw = {}


def report(key, text):
    results[key] = text
    print(f"{key}: {text}", flush=True)


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


# ------------------------------------------------------------ fake nodes

def create_fakes(ks, with_cidr=True, chunk=500, addresses=True):
    ks = list(ks)
    for i in range(0, len(ks), chunk):
        items = [fake_node(k, with_cidr) for k in ks[i:i + chunk]]
        lab.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        if not addresses:
            continue
        # status (addresses) is a subresource; the API ignores it on create
        load("addresses", *[it["metadata"]["name"] for it in items])


def load(*args):
    """Runs e2e/bench_load.py inside the control-plane namespace; returns its output."""
    return lab.sh(["python3", str(lab.E2E / "bench_load.py"), *map(str, args)], ns=lab.CP_NS)


def delete_fakes():
    """deletecollection rather than `kubectl delete -l`, which sends a DELETE
    per Node (over 8 minutes for 5,000). The server ends one such request at
    its 60 s timeout, partway through 5,000, so it is repeated until none is
    left."""
    for _ in range(20):
        lab.kubectl("delete", "--raw", "/api/v1/nodes?labelSelector=weir-bench%3Dfake", check=False)
        if not lab.kubectl("get", "nodes", "-l", "weir-bench=fake", "-o", "name", check=False).strip():
            return
    raise RuntimeError("fake Nodes still there after 20 deletecollection requests")


def cpu_rss(name):
    """CPU seconds and RSS (MB) of the lab process `name`."""
    pid = lab.running(name)
    return lab.process_cpu(pid), lab.process_rss_mb(pid)


def count_lines(cmd):
    return len([ln for ln in lab.sh(cmd, check=False).splitlines() if ln.strip()])


def routes(i):
    """weir's routes on node i (its protocol, 87)."""
    return count_lines(["ip", "-n", lab.node_ns(i), "route", "show", "proto", "87"])


def wait_count(count, n, what, timeout=600):
    """Until count() >= n; the error says how many there were."""
    lab.wait_for(lambda: count() >= n, timeout, lambda: f"{what}: {count()} routes, wanted {n}", step=0.05)


def wait_routes(i, n, timeout=300):
    wait_count(lambda: routes(i), n, f"node-{i}", timeout)


# ------------------------------------------------------------ B1/B2

def bench_dataplane():
    out = subprocess.run(["cargo", "bench", "-q", "-p", "weir-agent", "--bench", "dataplane", "--", "5000", "5"],
                         cwd=lab.ROOT, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith(("B1", "B2", "peers=")):
            print(line, flush=True)
    results["B1/B2"] = out.strip()


# ------------------------------------------------------------ B3

def bench_join(joins=50, n_nodes=10):
    monitors = []
    for i in range(1, n_nodes + 1):
        p = subprocess.Popen(["ip", "-n", lab.node_ns(i), "-ts", "monitor", "route"], stdout=subprocess.PIPE, text=True)
        monitors.append(p)
    time.sleep(0.5)
    out = load("join", joins)
    t0 = {int(a): float(b) for a, b in (ln.split() for ln in out.splitlines())}
    time.sleep(2)
    seen = {}  # (node, cidr) -> time
    for i, p in enumerate(monitors, 1):
        p.terminate()
        text = p.communicate()[0]
        for line in text.splitlines():
            m = re.match(r"\[(\S+)\] (10\.25\d\.\d+\.0/24) .*proto 87", line)
            if m and not line.startswith("Deleted"):
                ts = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc).timestamp()
                seen.setdefault((i, m.group(2)), ts)
    lat = []
    for k, start in t0.items():
        cidr = f"10.{250 + (k - 60000) // 256}.{(k - 60000) % 256}.0/24"
        times = [seen.get((i, cidr)) for i in range(1, n_nodes + 1)]
        if None in times:
            raise RuntimeError(f"join-{k} not programmed on every node")
        lat.append((max(times) - start) * 1000)
    report("B3", f"node-join convergence, {n_nodes}-node lab, {joins} joins: p50 {pct(lat, 50):.1f} ms, "
                 f"p99 {pct(lat, 99):.1f} ms, max {max(lat):.1f} ms (target p99 <= 500 ms)")


# ------------------------------------------------------------ B4

def bench_memory(levels=(0, 1000, 5000)):
    base_routes = routes(1)
    created = 0
    rows = []
    for level in levels:
        cpu0, _ = cpu_rss("node-1")
        t = time.time()
        if level > created:
            create_fakes(range(created, level))
            created = level
        wait_routes(1, base_routes + level, timeout=600)
        time.sleep(2)
        cpu1, rss = cpu_rss("node-1")
        rows.append(f"{level} nodes: RSS {rss:.1f} MB, initial-sync CPU {cpu1 - cpu0:.2f} s ({time.time() - t:.1f} s wall)")
    # 100 Node updates/s for 10 s: status heartbeats, as kubelets send them.
    names = [f"fake-{k:05d}" for k in range(min(created, 1000))]
    cpu0, _ = cpu_rss("node-1")
    t = time.time()
    sent = int(load("heartbeats", *names).strip())
    cpu1, rss = cpu_rss("node-1")
    wall = time.time() - t
    rows.append(f"{sent / wall:.0f} Node updates/s for {wall:.0f} s at {created} nodes: agent CPU {100 * (cpu1 - cpu0) / wall:.1f}%, RSS {rss:.1f} MB")
    report("B4", "; ".join(rows) + " (target RSS <= 30 MB at 5,000)")


# ------------------------------------------------------------ B6

def iperf(src_ns, dst_ns, dst_ip, seconds=5):
    server = subprocess.Popen(["ip", "netns", "exec", dst_ns, "iperf3", "-s", "-1"], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    out = lab.sh(["iperf3", "-c", dst_ip, "-t", str(seconds), "-J"], ns=src_ns)
    server.wait(timeout=30)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def hand_built():
    """The same topology as two lab nodes with one pod each, built with iproute2 as in the article."""
    names = ["weir-hand-u", "weir-hand-a", "weir-hand-b", "weir-hand-pa", "weir-hand-pb"]
    for ns in names:
        lab.sh(["ip", "netns", "del", ns], check=False)
        lab.sh(["ip", "netns", "add", ns])
        lab.sh(["ip", "-n", ns, "link", "set", "lo", "up"])
    u = names[0]
    lab.sh(["ip", "-n", u, "link", "add", "br0", "type", "bridge"])
    lab.sh(["ip", "-n", u, "link", "set", "br0", "up"])
    spec = [("a", "198.18.0.11", "10.244.1", "0e:00:00:00:00:0a"), ("b", "198.18.0.12", "10.244.2", "0e:00:00:00:00:0b")]
    for n, ip, net, mac in spec:
        ns, pod = f"weir-hand-{n}", f"weir-hand-p{n}"
        run = lambda *c, ns=ns: lab.sh(["ip", "-n", ns, *c])  # noqa: E731
        lab.sh(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"h{n}", "netns", u])
        lab.sh(["ip", "-n", u, "link", "set", f"h{n}", "master", "br0", "up"])
        run("addr", "add", f"{ip}/24", "dev", "eth0")
        run("link", "set", "eth0", "up")
        run("link", "add", "vx", "type", "vxlan", "id", "1", "dstport", "8472", "local", ip, "dev", "eth0", "nolearning")
        run("link", "set", "vx", "address", mac, "mtu", "1450", "up")
        run("addr", "add", f"{net}.0/32", "dev", "vx")
        run("link", "add", "cni0", "type", "bridge")
        run("link", "set", "cni0", "mtu", "1450", "up")
        run("addr", "add", f"{net}.1/24", "dev", "cni0")
        lab.sh(["sysctl", "-qw", "net.ipv4.ip_forward=1"], ns=ns)
        lab.sh(["ip", "link", "add", "eth0", "netns", pod, "mtu", "1450", "type", "veth", "peer", "name", "vp", "netns", ns])
        run("link", "set", "vp", "master", "cni0", "mtu", "1450", "up")
        lab.sh(["ip", "-n", pod, "addr", "add", f"{net}.2/24", "dev", "eth0"])
        lab.sh(["ip", "-n", pod, "link", "set", "eth0", "up"])
        lab.sh(["ip", "-n", pod, "route", "add", "default", "via", f"{net}.1"])
    for (n, ip, net, mac), (_, pip, pnet, pmac) in ((spec[0], spec[1]), (spec[1], spec[0])):
        ns = f"weir-hand-{n}"
        lab.sh(["bridge", "-n", ns, "fdb", "append", pmac, "dev", "vx", "dst", pip, "self", "permanent"])
        lab.sh(["ip", "-n", ns, "neigh", "replace", f"{pnet}.0", "dev", "vx", "lladdr", pmac, "nud", "permanent"])
        lab.sh(["ip", "-n", ns, "route", "add", f"{pnet}.0/24", "via", f"{pnet}.0", "dev", "vx", "onlink"])
    return names


@contextlib.contextmanager
def hand_built_pair():
    names = hand_built()
    try:
        yield
    finally:
        for ns in names:
            lab.sh(["ip", "netns", "del", ns], check=False)


# (source pod namespace, destination pod namespace) of each side
WEIR_PODS, HAND_PODS, HAND_DST = ("weir-pod-1-1", "weir-pod-2-1"), ("weir-hand-pa", "weir-hand-pb"), "10.244.2.2"


def interleaved(rounds, dst):
    """Median Gbit/s of weir's pods and of the hand-built pair, runs alternating."""
    weir, hand = [], []
    with hand_built_pair():
        for _ in range(rounds):
            weir.append(iperf(*WEIR_PODS, dst))
            hand.append(iperf(*HAND_PODS, HAND_DST))
    return statistics.median(weir), statistics.median(hand)


def bench_throughput(rounds=3):
    dst = lab.pods()["weir-pod-2-1"]
    w, h = interleaved(rounds, dst)
    # Attribution: the same with weir's nftables table off (no masquerade, so
    # no conntrack on these nodes), interleaved with the hand-built one again.
    try:
        for i in (1, 2):
            lab.stop(f"node-{i}")
            lab.start_agent(i, extra_env={"WEIR_FIREWALL": "false"})
            lab.sh(["nft", "delete", "table", "inet", "weir"], ns=lab.node_ns(i), check=False)
            lab.sh(["sh", "-c", "conntrack -F 2>/dev/null; true"], ns=lab.node_ns(i))
        time.sleep(1)
        n, h2 = interleaved(rounds, dst)
    finally:
        for i in (1, 2):
            lab.stop(f"node-{i}")
            lab.start_agent(i)
    report("B6", f"pod-to-pod TCP over VXLAN, iperf3 5 s x {rounds} interleaved: weir {w:.2f} Gbit/s, hand-built "
                 f"{h:.2f} Gbit/s, ratio {w / h:.3f}x (target >= 0.97x); with weir's nftables table off: "
                 f"weir {n:.2f} vs hand-built {h2:.2f} Gbit/s, ratio {n / h2:.3f}x; {profile_throughput(dst)}")


def busy_seconds():
    """CPU seconds the whole machine spent outside idle and iowait: senders,
    receivers and softirq alike, as all share the same two cores."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def set_direct_routing(on, nodes=(1, 2)):
    """Restarts the agents of `nodes` with direct routing on or off; returns
    once each routes the other's pod CIDR the new way."""
    for i in nodes:
        lab.stop(f"node-{i}")
        lab.start_agent(i, extra_env={"WEIR_DIRECT_ROUTING": "true" if on else "false"})
    want = "dev eth0" if on else "dev weir.1"
    for i in nodes:
        peer = nodes[1] if i == nodes[0] else nodes[0]
        cidr = lab.kubectl("get", "node", f"node-{peer}", "-o", "jsonpath={.spec.podCIDR}").strip()
        deadline = time.time() + 30
        while want not in lab.sh(["ip", "-n", lab.node_ns(i), "route", "show", cidr], check=False):
            if time.time() > deadline:
                raise RuntimeError(f"node-{i}: route to node-{peer} not `{want}` within 30 s")
            time.sleep(0.1)


def bench_direct(rounds=6, seconds=5):
    """B7: pod to pod between two nodes on one underlay subnet, direct
    routing against VXLAN, alternating (the agents restarted in between)."""
    dst = lab.pods()["weir-pod-2-1"]
    runs = {"vxlan": [], "direct": []}
    try:
        for _ in range(rounds):
            for kind in ("vxlan", "direct"):
                set_direct_routing(kind == "direct")
                time.sleep(0.5)
                b0 = busy_seconds()
                gbit = iperf(*WEIR_PODS, dst, seconds=seconds)
                runs[kind].append((gbit, (busy_seconds() - b0) / (gbit * seconds)))
    finally:
        set_direct_routing(False)
    raw["B7"] = runs
    med = {k: statistics.median(g for g, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    span = {k: f"{min(g for g, _ in v):.2f}-{max(g for g, _ in v):.2f}" for k, v in runs.items()}
    report("B7", f"same-subnet pod-to-pod TCP, iperf3 {seconds} s x {rounds} interleaved: direct routing "
                 f"{med['direct']:.2f} Gbit/s ({span['direct']}), {cpu['direct']:.3f} CPU-s per Gbit; VXLAN "
                 f"{med['vxlan']:.2f} Gbit/s ({span['vxlan']}), {cpu['vxlan']:.3f} CPU-s per Gbit; "
                 f"direct/VXLAN {med['direct'] / med['vxlan']:.2f}x throughput, "
                 f"{cpu['direct'] / cpu['vxlan']:.2f}x CPU per Gbit")


# Netfilter, conntrack, and fib lookups (which nft's `fib` expression makes; plain routing also counts).
NETFILTER = re.compile(r"^(__nf_|__nft|nft|nf_|ipv4_conntrack|hash_conntrack|fib_)")


def profile_throughput(dst):
    """CPU samples (perf record -a) during one more iperf3 each way, and the share in NETFILTER
    symbols: where the firewall's cost goes, measured rather than guessed."""
    if not shutil.which("perf"):
        return "profile SKIPPED: needs `perf` (Debian: linux-perf)"
    for i in (1, 2):  # the agents were just restarted with the firewall on
        deadline = time.time() + 30
        while time.time() < deadline and lab.sh(["nft", "list", "table", "inet", "weir"], ns=lab.node_ns(i), check=False) == "":
            time.sleep(0.5)
    shares = {}
    with hand_built_pair():
        for label, pods, ip in (("weir", WEIR_PODS, dst), ("hand-built", HAND_PODS, HAND_DST)):
            data = lab.STATE / f"b6-{label}.data"
            perf = subprocess.Popen(["perf", "record", "-q", "-a", "-F", "997", "-o", str(data)], stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            gbit = iperf(*pods, ip, seconds=3)
            perf.send_signal(2)
            perf.wait()
            text = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "sym"],
                                  capture_output=True, text=True).stdout
            nf = sum(float(m.group(1)) for m in re.finditer(r"^\s+([\d.]+)%\s+\[k\]\s+(\S+)", text, re.M)
                     if NETFILTER.match(m.group(2)))
            shares[label] = (gbit, nf)
    return "profile (perf, one more 3 s run each): " + ", ".join(
        f"{k} {g:.2f} Gbit/s with {nf:.1f} % of CPU samples in netfilter/conntrack/fib" for k, (g, nf) in shares.items())


def main(only=None):
    want = set(only or ["B1", "B2", "B3", "B4", "B6", "B7"])
    if want & {"B1", "B2"}:
        bench_dataplane()
    if not want - {"B1", "B2"}:
        return
    lab.down()
    lab.CLUSTER_CIDR = BIG_CLUSTER_CIDR
    lab.PROFILE = "release"
    lab.up(n_nodes=10, pods_per_node=1)
    try:
        if "B6" in want:
            bench_throughput()
        if "B7" in want:
            bench_direct()
        if "B3" in want:
            bench_join()
        if "B4" in want:
            bench_memory()
    finally:
        save_results()
        lab.down()


def save_results():
    """Merges this run's figures into e2e/.cache/bench-results.json."""
    out = lab.ROOT / "e2e" / ".cache" / "bench-results.json"
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged.update(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1))
    raw_out = out.with_name("bench-raw.json")
    merged_raw = json.loads(raw_out.read_text()) if raw_out.exists() else {}
    merged_raw.update(raw)
    raw_out.write_text(json.dumps(merged_raw))
    print(f"\nresults written to {out}")
