"""`e2e/lab bench --only F1 F2 ...`: weir-agent beside flannel v0.28.10, the
agent operators would otherwise run, in one run of one lab
(e2e/sidebyside.py: both as processes, on one API server and the same fake
Nodes). Each figure prints one line:
`F1: weir … flannel … ratio …x (goal …) met|missed`.
"""

import datetime
import json
import re
import statistics
import subprocess
import time

import bench
import proclab as lab
from bench import cpu_rss, create_fakes, delete_fakes, load, pct, report
from sidebyside import flannel_routes, start_flannel, start_kind, up, wait_count, weir_routes

WEIR_NODE, FLANNEL_NODE = 1, 2


def line(key, what, weir, flannel, goal_ratio, unit="", smaller_is_better=True):
    ratio = weir / flannel if flannel else float("inf")
    met = ratio <= goal_ratio if smaller_is_better else ratio >= goal_ratio
    report(key, f"{what}: weir {weir:.3g}{unit} flannel {flannel:.3g}{unit} ratio {ratio:.2f}x "
                f"(goal {'<=' if smaller_is_better else '>='} {goal_ratio}x) {'met' if met else 'missed'}")


def agent_names(kind, agents):
    first, prefix = (1, "node") if kind == "weir" else (2, "flannel")
    return {i: f"{prefix}-{i}" for i in range(first, agents + 1, 2)}


def wait_quiet(agents, kinds=("weir", "flannel"), timeout=600):
    """Until every running agent of `kinds` is idle: less than 5 % of a
    core, summed over all of them, for 2 s. A mass creation leaves a tail of
    events (each fake's status write) that weir works through longer than
    flannel, which ignores addresses; per-event figures are for a cluster at
    rest. The agents' own CPU only: their periodic rule checks (weir's `nft`
    listing every 10 s, flannel's `iptables` runs every few seconds) go on
    at rest, and summed over 20 agents they alone cross the threshold."""
    names = [n for kind in kinds for n in agent_names(kind, agents).values()]
    total = lambda: sum(lab.process_cpu(lab.running(n), children=False) for n in names)  # noqa: E731
    t0, prev = time.time(), total()
    while time.time() - t0 < timeout:
        time.sleep(2)
        now = total()
        if now - prev < 0.1:
            return time.time() - t0
        prev = now
    raise RuntimeError(f"agents still busy after {timeout} s")


# ------------------------------------------------------------ F1, F2, F6

def f1_memory(levels=(0, 1000, 5000)):
    base_w, base_f = weir_routes(WEIR_NODE), flannel_routes(FLANNEL_NODE)
    created, rows = 0, []
    for level in levels:
        if level > created:
            create_fakes(range(created, level))
            created = level
        wait_count(lambda: weir_routes(WEIR_NODE), base_w + level, "weir")
        wait_count(lambda: flannel_routes(FLANNEL_NODE), base_f + level, "flannel")
        time.sleep(3)
        rows.append((level, cpu_rss(f"node-{WEIR_NODE}")[1], cpu_rss(f"flannel-{FLANNEL_NODE}")[1]))
    bench.raw["F1"] = rows
    report("F1-rows", "; ".join(f"{n} Nodes: weir {w:.1f} MB, flannel {f:.1f} MB" for n, w, f in rows))
    line("F1", "RSS at 5,000 Nodes", rows[-1][1], rows[-1][2], 0.5, " MB")
    return created


def restart_cold(name, ns, device, start, count, n):
    """Stops an agent, deletes its device (and with it every entry), starts
    it again: (seconds until `n` routes, CPU seconds by then)."""
    lab.stop(name)
    lab.sh(["ip", "-n", ns, "link", "del", device], check=False)
    t0 = time.time()
    start()
    while not lab.running(name):
        time.sleep(0.01)
    wait_count(count, n, name)
    return time.time() - t0, cpu_rss(name)[0]


def f2_cold_start(n, rounds=3):
    w, f = [], []
    for _ in range(rounds):  # interleaved, one agent at a time
        w.append(restart_cold(f"node-{WEIR_NODE}", lab.node_ns(WEIR_NODE), "weir.1",
                              lambda: lab.start_agent(WEIR_NODE), lambda: weir_routes(WEIR_NODE), n))
        f.append(restart_cold(f"flannel-{FLANNEL_NODE}", lab.node_ns(FLANNEL_NODE), "flannel.1",
                              lambda: start_flannel(FLANNEL_NODE), lambda: flannel_routes(FLANNEL_NODE), n))
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    report("F2-rows", f"to {n} routes from an empty kernel, {rounds} interleaved rounds: weir "
                      f"{[round(r[0], 2) for r in w]} s, {[round(r[1], 2) for r in w]} CPU-s; flannel "
                      f"{[round(r[0], 2) for r in f]} s, {[round(r[1], 2) for r in f]} CPU-s")
    line("F2", "cold start, wall (median)", med(w, 0), med(f, 0), 0.25, " s")
    line("F2-cpu", "cold start, CPU (median)", med(w, 1), med(f, 1), 0.25, " CPU-s")


def f6_ingest(lab_peers, n=5000):
    """CPU to take in n Nodes arriving one by one, then in lists of 500."""
    rows = {}
    for how, chunk in (("one by one", 1), ("lists of 500", 500)):
        delete_fakes()
        wait_count(lambda: -weir_routes(WEIR_NODE), -lab_peers, "fakes gone", timeout=600)
        time.sleep(3)
        w0, f0 = cpu_rss(f"node-{WEIR_NODE}")[0], cpu_rss(f"flannel-{FLANNEL_NODE}")[0]
        if chunk == 1:
            load("one-by-one", n)
        else:
            create_fakes(range(n), chunk=chunk)
        wait_count(lambda: weir_routes(WEIR_NODE), lab_peers + n, "weir ingest")
        wait_count(lambda: flannel_routes(FLANNEL_NODE), lab_peers + n, "flannel ingest")
        time.sleep(2)
        rows[how] = (cpu_rss(f"node-{WEIR_NODE}")[0] - w0, cpu_rss(f"flannel-{FLANNEL_NODE}")[0] - f0)
    report("F6-rows", "; ".join(f"{k}: weir {w:.2f} CPU-s, flannel {f:.2f} CPU-s" for k, (w, f) in rows.items()))
    w1, f1 = rows["one by one"]
    line("F6", "ingest one by one, CPU", w1, f1, 0.8, " CPU-s")
    report("F6-self", f"weir one by one {w1:.2f} CPU-s vs one list {rows['lists of 500'][0]:.2f} CPU-s: "
                      f"{w1 / max(rows['lists of 500'][0], 0.01):.2f}x (goal <= 2x) "
                      f"{'met' if w1 <= 2 * rows['lists of 500'][0] else 'missed'}")


# ------------------------------------------------------------ F5

def f5_pod(i):
    """A pod on node i built the same way under either agent: a veth on a
    bridge holding .1 of the node's pod CIDR, MTU 1450 as both agents set."""
    ns, pod, net = lab.node_ns(i), f"weir-f5-pod-{i}", lab.node_cidr(i).rsplit(".", 1)[0]
    lab.sh(["ip", "netns", "add", pod])
    lab.sh(["ip", "-n", ns, "link", "add", "f5br", "mtu", "1450", "type", "bridge"])
    lab.sh(["ip", "-n", ns, "addr", "add", f"{net}.1/24", "dev", "f5br"])
    lab.sh(["ip", "-n", ns, "link", "set", "f5br", "up"])
    lab.sh(["ip", "-n", ns, "link", "add", "f5v", "mtu", "1450", "master", "f5br", "type", "veth", "peer", "name", "eth0",
            "netns", pod])
    lab.sh(["ip", "-n", ns, "link", "set", "f5v", "up"])
    for cmd in (["addr", "add", f"{net}.2/24", "dev", "eth0"], ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"],
                ["route", "add", "default", "via", f"{net}.1"]):
        lab.sh(["ip", "-n", pod, *cmd])
    return pod, f"{net}.2"


def f5_throughput(min_rounds=6, max_rounds=16, seconds=5):
    """Pod to pod across the overlay, weir (node 1 to 3) and flannel (node 2
    to 4) alternating, until the median's spread is under 3 %. Both masquerade
    egress (weir's nftables table, flannel's --ip-masq), so both run conntrack."""
    pods = {i: f5_pod(i) for i in (1, 2, 3, 4)}
    try:
        runs = {"weir": [], "flannel": []}
        for r in range(max_rounds):
            for kind, (src, dst) in (("weir", (1, 3)), ("flannel", (2, 4))):
                b0 = bench.busy_seconds()
                gbit = bench.iperf(pods[src][0], pods[dst][0], pods[dst][1], seconds=seconds)
                runs[kind].append((gbit, (bench.busy_seconds() - b0) / (gbit * seconds)))
            spread = {k: spread_of([g for g, _ in v]) for k, v in runs.items()}
            if r + 1 >= min_rounds and max(spread.values()) < 0.03:
                break
    finally:
        for i, (pod, _) in pods.items():
            lab.sh(["ip", "netns", "del", pod], check=False)
            lab.sh(["ip", "-n", lab.node_ns(i), "link", "del", "f5br"], check=False)
    med = {k: statistics.median(g for g, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    bench.raw["F5"] = runs
    report("F5-rows", f"iperf3 {seconds} s x {len(runs['weir'])} interleaved rounds: weir {med['weir']:.2f} Gbit/s "
                      f"(spread {100 * spread['weir']:.1f} %), {cpu['weir']:.3f} CPU-s per Gbit; flannel "
                      f"{med['flannel']:.2f} Gbit/s (spread {100 * spread['flannel']:.1f} %), "
                      f"{cpu['flannel']:.3f} CPU-s per Gbit")
    line("F5", "pod-to-pod TCP throughput (median)", med["weir"], med["flannel"], 0.97, " Gbit/s",
         smaller_is_better=False)


def spread_of(xs):
    """Half-width of a ~95 % confidence interval of the median, over the
    median (order statistics; a normal approximation of the binomial)."""
    if len(xs) < 3:
        return float("inf")
    xs, n = sorted(xs), len(xs)
    k = max(0, int(n / 2 - 0.98 * n ** 0.5))
    return (xs[n - 1 - k] - xs[k]) / 2 / statistics.median(xs)


# ------------------------------------------------------------ F3

def monitor(i):
    return subprocess.Popen(["ip", "-n", lab.node_ns(i), "-ts", "monitor", "route"], stdout=subprocess.PIPE, text=True)


def first_seen(proc, pattern):
    proc.terminate()
    seen = {}
    for ln in proc.communicate()[0].splitlines():
        m = re.match(r"\[(\S+)\] (\S+/24) ", ln)
        if m and not ln.startswith("Deleted") and re.search(pattern, ln):
            ts = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc).timestamp()
            seen.setdefault(m.group(2), ts)
    return seen


def join_round(agents, kinds, joins=20):
    """`joins` Nodes created 0.3 s apart, then deleted. For each kind: each
    join's slowest agent (from the POST to the route), every agent's time,
    and each join's quickest agent."""
    mons = {i: monitor(i) for kind in kinds for i in agent_names(kind, agents)}
    time.sleep(0.5)
    t0 = {f"10.{250 + (int(k) - 60000) // 256}.{(int(k) - 60000) % 256}.0/24": float(t)
          for k, t in (ln.split() for ln in load("join", joins).splitlines())}
    time.sleep(3)
    seen = {i: first_seen(p, "proto 87" if i % 2 else "flannel.1") for i, p in mons.items()}
    out = {}
    for kind in kinds:
        slowest, each, quickest = [], [], []
        for cidr, start in t0.items():
            times = [seen[i].get(cidr) for i in agent_names(kind, agents)]
            if None in times:
                raise RuntimeError(f"{cidr} not programmed by every {kind} agent")
            slowest.append((max(times) - start) * 1000)
            each += [(t - start) * 1000 for t in times]
            quickest.append((min(times) - start) * 1000)
        out[kind] = (slowest, each, quickest)
    lab.kubectl("delete", "node", *[f"join-{k}" for k in range(60000, 60000 + joins)])
    time.sleep(3)
    return out


def alone(agents, kind, joins):
    """One join round with the other kind's agents stopped, then started
    again and idle. The kernel keeps their entries meanwhile; the joins they
    miss are gone again before they return."""
    other = "flannel" if kind == "weir" else "weir"
    for name in agent_names(other, agents).values():
        lab.stop(name)
    wait_quiet(agents, kinds=(kind,))
    out = join_round(agents, (kind,), joins)[kind]
    for i in agent_names(other, agents):
        start_kind(other, i)
    time.sleep(3)
    wait_quiet(agents)
    return out


def f3_join(agents, rounds=2, joins=20):
    """Node-join convergence with 5,000 Nodes in: from the POST to the route
    on every agent of the kind. The figure is from rounds in which one kind's
    agents run alone, as an operator runs one of the two, interleaved weir,
    flannel, weir, flannel. With both kinds at once, each join's time is set
    by what they share (the API server's delivery to 20 watchers, 2 cores):
    the two kinds' per-join times moved together (correlation 0.84 and 0.86
    in two such rounds), and flannel's larger CPU per join slowed weir's
    agents as much as its own. That round is still run first and printed as
    F3-together, for reference."""
    together = join_round(agents, ("weir", "flannel"), joins)
    wait_quiet(agents)
    runs = {"weir": ([], [], []), "flannel": ([], [], [])}
    for _ in range(rounds):
        for kind in ("weir", "flannel"):
            for acc, got in zip(runs[kind], alone(agents, kind, joins)):
                acc += got
    lat = {kind: runs[kind][0] for kind in runs}
    bench.raw["F3"] = lat
    bench.raw["F3-together"] = {kind: together[kind][0] for kind in together}
    w, f = lat["weir"], lat["flannel"]
    tw, tf = together["weir"][0], together["flannel"][0]
    report("F3-together", f"{joins} joins, {agents // 2} agents of each at once (reference, no goal): weir p50 "
                          f"{pct(tw, 50):.1f} ms p99 {pct(tw, 99):.1f} ms; flannel p50 {pct(tf, 50):.1f} ms p99 "
                          f"{pct(tf, 99):.1f} ms; ratio {pct(tw, 99) / pct(tf, 99):.2f}x")
    report("F3-rows", f"{rounds} interleaved rounds of {joins} joins, each kind's {agents // 2} agents alone: weir "
                      f"p50 {pct(w, 50):.1f} ms p99 {pct(w, 99):.1f} ms; flannel p50 {pct(f, 50):.1f} ms p99 "
                      f"{pct(f, 99):.1f} ms")
    # Every agent's own time too, and each join's quickest agent: how much
    # of a join's time is the delivery from the API server.
    report("F3-agents", "; ".join(
        f"{kind}: every agent's join p10 {pct(runs[kind][1], 10):.1f} p50 {pct(runs[kind][1], 50):.1f} "
        f"p90 {pct(runs[kind][1], 90):.1f} ms, a join's quickest agent p50 {pct(runs[kind][2], 50):.1f} ms"
        for kind in ("weir", "flannel")))
    line("F3", "node-join convergence p99, each kind alone", pct(w, 99), pct(f, 99), 0.8, " ms")
    return lat


# ------------------------------------------------------------ F4, F7

def f4_heartbeats(n=1000):
    names = [f"fake-{k:05d}" for k in range(n)]
    w0, f0 = cpu_rss(f"node-{WEIR_NODE}")[0], cpu_rss(f"flannel-{FLANNEL_NODE}")[0]
    t = time.time()
    sent = int(load("heartbeats", *names).strip())
    wall = time.time() - t
    w, f = cpu_rss(f"node-{WEIR_NODE}")[0] - w0, cpu_rss(f"flannel-{FLANNEL_NODE}")[0] - f0
    report("F4-rows", f"{sent / wall:.0f} Node updates/s for {wall:.0f} s: weir {100 * w / wall:.1f}% CPU, "
                      f"flannel {100 * f / wall:.1f}% CPU")
    line("F4", "CPU under Node heartbeats", w, f, 1.0, " CPU-s")


def fdb_monitor(i):
    return subprocess.Popen(["bridge", "-n", lab.node_ns(i), "-timestamp", "monitor", "fdb"], stdout=subprocess.PIPE,
                            text=True)


def fdb_events(proc, new, old):
    """When the monitored node's fdb entry for `new` came ("in") and the one
    for `old` went ("gone"). bridge prints a timestamp line, in local time,
    before each event."""
    proc.terminate()
    seen, ts = {}, None
    for ln in proc.communicate()[0].splitlines():
        m = re.match(r"Timestamp: (.+) (\d+) usec$", ln)
        if m:
            ts = time.mktime(time.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")) + int(m.group(2)) / 1e6
        elif ts is not None and new in ln and not ln.startswith("Deleted"):
            seen.setdefault("in", ts)
        elif ts is not None and old in ln and ln.startswith("Deleted"):
            seen.setdefault("gone", ts)
    return seen


def f7_mac_change(k=4321, watch=10):
    """A VTEP MAC changed on one Node: from the PATCH (timed as F3 times a
    join) until the kernel reports the new fdb entry in and the old one gone."""
    name = f"fake-{k:05d}"
    node = json.loads(lab.kubectl("get", "node", name, "-o", "json"))
    old = node["metadata"]["annotations"]["weir.dev/vtep-mac"]
    new = "0e:fc:00:00:00:01"
    mons = {kind: fdb_monitor(i) for i, kind in ((WEIR_NODE, "weir"), (FLANNEL_NODE, "flannel"))}
    time.sleep(0.5)
    t0 = float(load("vtep-mac", name, new))
    time.sleep(watch)
    ms = {}
    for kind, proc in mons.items():
        for what, ts in fdb_events(proc, new, old).items():
            ms[(kind, what)] = (ts - t0) * 1000
    bench.raw["F7"] = {f"{kind} {what}": v for (kind, what), v in ms.items()}
    fmt = lambda kind, what: f"{ms[(kind, what)]:.1f} ms" if (kind, what) in ms else f"never ({watch} s)"  # noqa: E731
    met = all(ms.get(("weir", w), 1e9) <= 50 for w in ("in", "gone"))
    report("F7", f"VTEP MAC changed at 5,000 Nodes: weir new in {fmt('weir', 'in')}, old gone {fmt('weir', 'gone')}; "
                 f"flannel new in {fmt('flannel', 'in')}, old gone {fmt('flannel', 'gone')} (goal <= 50 ms for both) "
                 f"{'met' if met else 'missed'}")


def main(only):
    want = set(only)
    try:
        agents = up(n_each=10 if "F3" in want else 2 if "F5" in want else 1)
        if "F5" in want:
            # Before the fake Nodes: 5,000 routes would be the same on both sides.
            f5_throughput()
        created = 0
        if want & {"F1", "F2", "F3", "F4", "F7"}:
            created = f1_memory() if "F1" in want else (create_fakes(range(5000)) or 5000)
            wait_count(lambda: weir_routes(WEIR_NODE), agents // 2 - 1 + created, "weir")
            wait_count(lambda: flannel_routes(FLANNEL_NODE), agents // 2 - 1 + created, "flannel")
        if want & {"F3", "F4", "F7"}:
            report("F-settle", f"all {agents} agents idle {wait_quiet(agents):.0f} s after the last fake Node's "
                               "status was written")
        if "F3" in want:
            f3_join(agents)
        if "F4" in want:
            f4_heartbeats()
        if "F7" in want:
            wait_quiet(agents)
            f7_mac_change()
        if "F2" in want:
            f2_cold_start(weir_routes(WEIR_NODE))
        if "F6" in want:
            f6_ingest(lab_peers=agents // 2 - 1)
    finally:
        bench.save_results()
        lab.down()
