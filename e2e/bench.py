"""`e2e/lab bench`: weir's figures B1-B6 and the controller's, each printed next
to its baseline measured in the same run. Fake Node objects stand in for the
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
import threading
import time

import proclab as lab  # noqa: E402  (the bench keeps process agents; see BENCHMARKS.md)

BIG_CLUSTER_CIDR = "10.0.0.0/8"
results = {}


def report(key, text):
    results[key] = text
    print(f"{key}: {text}", flush=True)


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


# ------------------------------------------------------------ fake nodes

def fake_node(k, with_cidr=True):
    hi, lo = k // 256, k % 256
    ip = f"198.19.{hi}.{lo}"
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": f"fake-{k:05d}", "labels": {"weir-bench": "fake"},
                         "annotations": {"weir.dev/public-ip": ip, "weir.dev/vtep-mac": f"0e:fa:00:00:{hi:02x}:{lo:02x}",
                                         "weir.dev/backend": "vxlan", "weir.dev/vni": "1"}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
    if with_cidr:
        cidr = f"10.{128 + hi}.{lo}.0/24"
        node["spec"] = {"podCIDR": cidr, "podCIDRs": [cidr]}
    return node


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
    lab.kubectl("delete", "nodes", "-l", "weir-bench=fake", "--wait=false", check=False)


def agent_proc(i):
    pid = lab.running(f"node-{i}")
    stat = open(f"/proc/{pid}/stat").read().split(")")[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(stat[11]) + int(stat[12])) / ticks
    rss = next(int(ln.split()[1]) for ln in open(f"/proc/{pid}/status") if ln.startswith("VmRSS")) / 1024
    return cpu, rss


def routes(i):
    return int(lab.sh(["sh", "-c", f"ip -n {lab.node_ns(i)} route show proto 87 | wc -l"]).strip())


def wait_routes(i, n, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if routes(i) >= n:
            return
        time.sleep(0.2)
    raise RuntimeError(f"node-{i} has {routes(i)} routes, wanted {n}")


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
        cpu0, _ = agent_proc(1)
        t = time.time()
        if level > created:
            create_fakes(range(created, level))
            created = level
        wait_routes(1, base_routes + level, timeout=600)
        time.sleep(2)
        cpu1, rss = agent_proc(1)
        rows.append(f"{level} nodes: RSS {rss:.1f} MB, initial-sync CPU {cpu1 - cpu0:.2f} s ({time.time() - t:.1f} s wall)")
    # 100 Node updates/s for 10 s: status heartbeats, as kubelets send them.
    names = [f"fake-{k:05d}" for k in range(min(created, 1000))]
    cpu0, _ = agent_proc(1)
    t = time.time()
    sent = int(load("heartbeats", *names).strip())
    cpu1, rss = agent_proc(1)
    wall = time.time() - t
    rows.append(f"{sent / wall:.0f} Node updates/s for {wall:.0f} s at {created} nodes: agent CPU {100 * (cpu1 - cpu0) / wall:.1f}%, RSS {rss:.1f} MB")
    report("B4", "; ".join(rows) + " (target RSS <= 30 MB at 5,000)")


# ------------------------------------------------------------ B5

PAIR_A, PAIR_B = "weir-bench-a", "weir-bench-b"
PEERS = """- {name: a, publicIP: 198.18.0.1, vtepMAC: "0e:00:00:00:0a:0a", podCIDRs: [10.244.1.0/24]}
- {name: b, publicIP: 198.18.0.2, vtepMAC: "0e:00:00:00:0b:0b", podCIDRs: [10.244.2.0/24]}
"""


def pair_up():
    for ns in (PAIR_A, PAIR_B):
        lab.sh(["ip", "netns", "del", ns], check=False)
        lab.sh(["ip", "netns", "add", ns])
        lab.sh(["ip", "-n", ns, "link", "set", "lo", "up"])
    lab.sh(["ip", "link", "add", "ua", "netns", PAIR_A, "type", "veth", "peer", "name", "ub", "netns", PAIR_B])
    for ns, dev, ip, pod in ((PAIR_A, "ua", "198.18.0.1", "10.244.1.1"), (PAIR_B, "ub", "198.18.0.2", "10.244.2.1")):
        lab.sh(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
        lab.sh(["ip", "-n", ns, "link", "set", dev, "up"])
        lab.sh(["ip", "-n", ns, "addr", "add", f"{pod}/32", "dev", "lo"])
    d = lab.STATE / "bench"
    d.mkdir(parents=True, exist_ok=True)
    (d / "peers.yaml").write_text(PEERS)
    return d


def pair_agent(ns, node, mode, d, extra=None):
    env = dict(os.environ, NODE_NAME=node, WEIR_PEERS_FILE=str(d / "peers.yaml"), WEIR_MODE=mode,
               WEIR_IFACE="ua" if node == "a" else "ub", WEIR_FIREWALL="false", WEIR_CNI_CONF_DIR=str(d / node / "cni"),
               WEIR_RUN_DIR=str(d / node / "run"), WEIR_METRICS_ADDR="127.0.0.1:9478", **(extra or {}))
    log = open(d / f"agent-{node}-{mode}.log", "w")
    return subprocess.Popen(["ip", "netns", "exec", ns, str(lab.agent_binary()), "run"], env=env, stdout=log, stderr=log)


def first_packet_penalty(trials, reset):
    """ping -c 6 per trial; penalty = first RTT - median of the rest. Returns (penalties, lost firsts)."""
    pen, lost = [], 0
    for _ in range(trials):
        reset()
        out = subprocess.run(["ip", "netns", "exec", PAIR_A, "ping", "-c", "6", "-i", "0.02", "-W", "1", "-I", "10.244.1.1",
                              "10.244.2.1"], capture_output=True, text=True).stdout
        rtts = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"icmp_seq=(\d+) .*time=([\d.]+) ms", out)}
        if 1 not in rtts:
            lost += 1
            continue
        rest = [v for k, v in rtts.items() if k > 1]
        pen.append(rtts[1] - statistics.median(rest))
    return pen, lost


def vxlan_by_hand(ns):
    """Node A as the baselines need it: the miss-raising device, route and fdb entry; the neighbour is left to them."""
    # A's VTEP MAC must be the one B has in its peers file, or B's replies never arrive.
    cmds = ["link add weir.1 address 0e:00:00:00:0a:0a type vxlan id 1 dstport 8472 local 198.18.0.1 dev ua nolearning proxy l2miss l3miss",
            "link set weir.1 up", "addr add 10.244.1.0/32 dev weir.1",
            "route add 10.244.2.0/24 via 10.244.2.0 dev weir.1 onlink"]
    for c in cmds:
        lab.sh(["ip", "-n", ns, *c.split()])
    # The device name has a dot, so write the file rather than use sysctl's dotted name.
    lab.sh(["sh", "-c", "echo 3 > /proc/sys/net/ipv4/neigh/weir.1/app_solicit"], ns=ns)
    lab.sh(["bridge", "-n", ns, "fdb", "add", "0e:00:00:00:0b:0b", "dev", "weir.1", "dst", "198.18.0.2", "self", "permanent"])


def ondemand_agent(d):
    """Node A in on-demand mode, its entries removed by idle GC between trials."""
    a = pair_agent(PAIR_A, "a", "on-demand", d, {"WEIR_IDLE_TIMEOUT": "300ms", "WEIR_RESYNC_INTERVAL": "200ms"})
    time.sleep(1.5)
    return a


def wait_gc():
    """Until weir's idle GC has removed the neighbour, so the next ping starts with a miss."""
    deadline = time.time() + 5
    while time.time() < deadline and "10.244.2.0" in lab.sh(["ip", "-n", PAIR_A, "neigh", "show", "dev", "weir.1"]):
        time.sleep(0.05)


def del_neigh():
    lab.sh(["ip", "-n", PAIR_A, "neigh", "del", "10.244.2.0", "dev", "weir.1"], check=False)


def bench_ondemand(trials=100):
    d = pair_up()
    b = pair_agent(PAIR_B, "b", "full", d)
    out = {}
    try:
        # Baseline 1: a shell loop over `ip monitor neigh` answering with `ip neigh replace`.
        vxlan_by_hand(PAIR_A)
        shell = ("stdbuf -oL ip monitor neigh | while read -r line; do case \"$line\" in *miss*10.244.2.0*|*10.244.2.0*INCOMPLETE*) "
                 "ip neigh replace 10.244.2.0 dev weir.1 lladdr 0e:00:00:00:0b:0b nud permanent;; esac; done")
        resp = subprocess.Popen(["ip", "netns", "exec", PAIR_A, "stdbuf", "-oL", "sh", "-c", shell], start_new_session=True)
        time.sleep(0.5)
        out["shell"] = first_packet_penalty(trials, del_neigh)
        os.killpg(resp.pid, 9)
        # Baseline 2: the resident raw-netlink responder in plain Python.
        tool = lab.ROOT.parent / "shared" / "tools" / "miss_responder.py"
        resp = subprocess.Popen(["ip", "netns", "exec", PAIR_A, "python3", str(tool), "weir.1", "0e:00:00:00:0b:0b", "3600"],
                                stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        out["python"] = first_packet_penalty(trials, del_neigh)
        resp.kill()
        lab.sh(["ip", "-n", PAIR_A, "link", "del", "weir.1"])
        # weir on-demand: fdb and neighbour both installed on the miss; entries removed by idle GC between trials.
        a = ondemand_agent(d)
        out["weir"] = first_packet_penalty(trials, wait_gc)
        # Miss storm: 10,000 unknown addresses on the overlay while a real peer is resolved.
        lab.sh(["ip", "-n", PAIR_A, "route", "add", "10.99.0.0/16", "dev", "weir.1"])
        cpu0 = agent_cpu(a.pid)
        t = time.time()
        storm = ("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                 "for i in range(10000):\n"
                 "    try: s.sendto(b'x', (f'10.99.{i // 256}.{i % 256}', 9))\n"
                 "    except OSError: pass\n")
        storm_thread = threading.Thread(target=lambda: lab.sh(["python3", "-c", storm], ns=PAIR_A))
        storm_thread.start()
        during = first_packet_penalty(10, wait_gc)
        storm_thread.join()
        time.sleep(3)
        wall = time.time() - t
        storm_cpu = agent_cpu(a.pid) - cpu0
        unknown = metric_from(PAIR_A, 'weir_l3miss_total{result="unknown"}')
        a.terminate()
        a.wait()
    finally:
        b.terminate()
        b.wait()
        for ns in (PAIR_A, PAIR_B):
            lab.sh(["ip", "netns", "del", ns], check=False)
    lines = []
    med = {}
    for name in ("shell", "python", "weir"):
        pen, lost = out[name]
        med[name] = statistics.median(pen) if pen else float("nan")
        p90 = pct(pen, 90) if pen else float("nan")
        lines.append(f"{name}: median penalty {med[name]:.3f} ms, p90 {p90:.3f} ms, first packets lost {lost}/{trials}")
    lines.append(f"weir/python ratio {med['weir'] / med['python']:.2f}x (target <= 0.1 ms and <= 0.5x)")
    dpen, dlost = during
    lines.append(f"miss storm (10,000 unknown IPs): {unknown:.0f} unknown misses counted, agent CPU {storm_cpu:.2f} s over "
                 f"{wall:.1f} s; real peer during the storm: median penalty {statistics.median(dpen) if dpen else float('nan'):.3f} ms, "
                 f"{dlost}/10 first packets lost")
    report("B5", "; ".join(lines))


def agent_cpu(pid):
    # The pid is `ip netns exec`, which execs the agent in place.
    stat = open(f"/proc/{pid}/stat").read().split(")")[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def metric_from(ns, key):
    text = lab.ns_get(ns, "http://127.0.0.1:9478/metrics")[1]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(key))


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


# ------------------------------------------------------------ controller

def bench_controller(n=1000):
    """1,000 Node objects written as fast as the API takes them (16 parallel
    connections), then the time until every one has pod CIDRs."""
    written, total = load("burst", n).split()
    report("controller", f"{n} Nodes written with 16 parallel clients in {written} s; all allocated {total} s after the "
                         f"first write ({float(total) - float(written):.2f} s after the last)")


def main(only=None):
    want = set(only or ["B1", "B2", "B3", "B4", "B5", "B6", "controller"])
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
        if "B3" in want:
            bench_join()
        if "B4" in want:
            bench_memory()
        if "controller" in want:
            bench_controller()
        delete_fakes()
        if "B5" in want:
            bench_ondemand()
    finally:
        out = lab.ROOT / "e2e" / ".cache" / "bench-results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        lab.down()
    print(f"\nresults written to {out}")
