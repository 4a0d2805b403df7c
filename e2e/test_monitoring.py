"""weir's monitoring checked by the real tools: Prometheus scraping the lab
the way manifests/monitoring/prometheus-scrape.yaml says, promtool on the
metrics and the alert rules, every dashboard query after a scripted
scenario, and an alert that really fires."""

import json
import re
import subprocess

import pytest

import lablib as lab
from test_lab import agent_get, wait

MONITORING = lab.ROOT / "manifests" / "monitoring"


def scrape(ip, port):
    status, text = lab.ns_get(lab.CP_NS, f"http://{ip}:{port}/metrics")
    assert status == 200, f"{ip}:{port}/metrics: {status} {text[:200]}"
    return text


def readme_series():
    """The agent's series, as the README lists them (see agent/src/metrics.rs)."""
    section = (lab.ROOT / "README.md").read_text().split("### Endpoints and metrics")[1].split("\n##")[0]
    return sorted({m.split("{")[0] for m in re.findall(r"`(weir_[a-z_]+(?:\{[^}]*\})?)`", section)})


def assert_fresh_agent_exports_every_readme_series(i):
    """Restarts node i's agent and reads its /metrics as soon as it answers."""
    lab.kill_agent(i)
    wait(lambda: agent_get(i, "/healthz") == "200", 60, f"node-{i}'s agent live again")
    text = scrape(lab.node_ip(i), 9478)
    missing = [s for s in readme_series() if not re.search(rf"^{s}(_bucket|_sum|_count)?(\{{| )", text, re.M)]
    assert not missing, f"a fresh agent on node-{i} lacks {missing}"


def test_generated_monitoring_files_are_up_to_date():
    r = subprocess.run([str(MONITORING / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_alert_rules_pass_promtool_and_their_unit_tests():
    for args in (["check", "rules", "weir-rules.yaml"], ["test", "rules", "weir-rules.test.yaml"]):
        r = subprocess.run([lab.promtool(), *args], capture_output=True, text=True, cwd=MONITORING)
        assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_accepts_every_agent_and_controller_metrics_page(cluster):
    pages = {f"agent on node-{i}": scrape(lab.node_ip(i), 9478) for i in lab.nodes()}
    for p in lab.pods_in(lab.NS, lab.CONTROLLER_SELECTOR):
        pages[p["metadata"]["name"]] = scrape(p["status"]["hostIP"], 9479)
    for who, text in pages.items():
        r = subprocess.run([lab.promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), f"{who}: {r.stdout}{r.stderr}"


def test_a_freshly_started_agent_exports_every_readme_series(cluster):
    assert_fresh_agent_exports_every_readme_series(2)


def test_prometheus_discovers_every_agent_and_controller_pod(cluster):
    def targets():
        status, result = lab.prom_query('up{job=~"weir-agent|weir-controller"} == 1')
        return {(r["metric"]["job"], r["metric"]["node"]) for r in result} if status == "success" else set()
    want = {("weir-agent", f"node-{i}") for i in lab.nodes()}
    wait(lambda: want <= targets() and sum(j == "weir-controller" for j, _ in targets()) == 2, 60,
         "Prometheus scraping every agent and both controllers")


@pytest.fixture
def scenario(cluster):
    """A node joins, a route is deleted by hand, a Node carries a bad
    annotation, the firewall table is deleted, and (in on-demand mode) pods
    talk across nodes, so every panel has something to show."""
    lab.add_node(4)
    evil = {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": "evil-mac", "labels": {"weir-test": "evil"},
        "annotations": {"weir.dev/backend": "vxlan", "weir.dev/vtep-mac": "01:00:5e:00:00:01",
                        "weir.dev/public-ip": "198.18.0.99"}}, "spec": {"podCIDR": "10.244.99.0/24"}}
    try:
        lab.wait_cni_config(4)
        wait(lambda: lab.agent_ready(4), 120, "node-4's agent Ready")
        # First, as it restarts every agent (their counters start again).
        lab.set_mode("on-demand")
        lab.wait_healthy()
        node2 = json.loads(lab.kubectl("get", "node", "node-2", "-o", "json"))["spec"]["podCIDRs"][0]
        lab.sh(["ip", "-n", lab.node_ns(1), "route", "del", node2])
        lab.sh(["nft", "delete", "table", "inet", "weir"], ns=lab.node_ns(2))
        # A Node no kubelet runs: after the mode switch, whose rollout would
        # wait for an agent pod there forever.
        lab.kubectl("apply", "-f", "-", input=json.dumps(evil))
        for src, dst in (("pod-1-1", "pod-2-1"), ("pod-2-1", "pod-3-1"), ("pod-3-1", "pod-1-1")):
            assert lab.ping(src, lab.pods()[dst], count=2)[1] == 2, f"{src} -> {dst}"
        yield
    finally:
        lab.kubectl("delete", "node", "evil-mac", "--ignore-not-found")
        lab.remove_node(4)
        if lab.settings().get("mode") != "full":
            lab.set_mode("full")


def non_zero(expr):
    status, result = lab.prom_query(expr)
    return status == "success" and any(float(r["value"][1]) > 0 for r in result)


def test_every_dashboard_query_shows_the_scenario_and_an_alert_fires(scenario):
    # What the scenario did, each seen through Prometheus.
    for what, expr in [("node-4's agent scraped", 'up{job="weir-agent",node="node-4"}'),
                       ("the deleted route repaired", 'weir_drift_repaired_total{node="node-1",object="route"}'),
                       ("the deleted table restored", 'weir_drift_repaired_total{node="node-2",object="firewall"}'),
                       ("the bad annotation rejected", 'weir_peer_rejected_total{reason="vtep-mac"}'),
                       # The counter, not its rate: the pings may come before Prometheus
                       # first scrapes the restarted agents, and a counter whose first
                       # sample already holds every miss has a rate of 0.
                       ("misses answered", 'sum(weir_l3miss_total{result="resolved"})'),
                       ("the controller reporting the bad Node", 'max(weir_controller_rejected_nodes{reason="vtep-mac"})')]:
        wait(lambda: non_zero(expr), 60, f"{what}: {expr}")
    dashboard = json.loads((MONITORING / "weir-dashboard.json").read_text())
    empty = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            status, result = lab.prom_query(target["expr"])
            assert status == "success", f"panel {panel['title']!r}: {target['expr']} failed: {result}"
            if not result:
                empty.append(f"{panel['title']}: {target['expr']}")
    assert not empty, f"queries that return nothing: {empty}"

    def firing():
        alerts = lab.prom_get("/api/v1/alerts")["data"]["alerts"]
        return [a["labels"]["node"] for a in alerts if a["labels"]["alertname"] == "WeirPeersRejected"
                and a["state"] == "firing"]
    wait(lambda: firing(), 120, "WeirPeersRejected firing in Prometheus")
    shown = lab.kubectl("describe", "node", "evil-mac").split("Events:")[-1]
    assert "WeirPeerRejected" in shown and "weir.dev/vtep-mac" in shown, f"describe node evil-mac: {shown}"


def test_the_scrape_config_selects_what_the_podmonitor_selects():
    """The two shipped scrape definitions must not drift apart: the same pod
    label, port name, interval and target labels."""
    pm = (MONITORING / "podmonitor.yaml").read_text()
    sc = (MONITORING / "prometheus-scrape.yaml").read_text()
    assert "matchLabels: {app.kubernetes.io/part-of: weir}" in pm and "app_kubernetes_io_part_of], regex: weir" in sc
    assert "port: metrics" in pm and "container_port_name], regex: metrics" in sc
    assert "interval: 30s" in pm and "scrape_interval: 30s" in sc
    for label in ("job", "node"):
        assert f"targetLabel: {label}" in pm and f"target_label: {label}" in sc, label
