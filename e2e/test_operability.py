"""Manifests, RBAC and admission policy, metrics against the kernel, `weir-agent status`."""

import json
import os
import signal

import lablib as lab
from test_lab import agent_get, ip_json, wait

def stub_crd(plural, kind):
    """A CRD of the Prometheus Operator's group that accepts any object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                 "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
                 "versions": [{"name": "v1", "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": {"type": "object",
                                                              "x-kubernetes-preserve-unknown-fields": True}}}]},
    }


def test_api_server_accepts_every_manifest(cluster):
    out = lab.kubectl("apply", "-k", str(lab.ROOT / "manifests"), "--dry-run=server")
    for kind in ("daemonset.apps/weir-agent", "deployment.apps/weir-controller", "validatingadmissionpolicy",
                 "clusterrole.rbac.authorization.k8s.io/weir-agent", "configmap/weir-config", "service/weir-metrics"):
        assert kind in out, out
    # The monitoring overlay needs the Prometheus Operator's CRDs; stubs stand in for them.
    crds = [stub_crd("podmonitors", "PodMonitor"), stub_crd("prometheusrules", "PrometheusRule")]
    lab.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": crds}))
    wait(lambda: "prometheusrules" in lab.kubectl("api-resources", "--api-group=monitoring.coreos.com"), 30,
         "CRDs established")
    out = lab.kubectl("apply", "-k", str(lab.ROOT / "manifests" / "monitoring"))
    for kind in ("podmonitor.monitoring.coreos.com/weir", "prometheusrule.monitoring.coreos.com/weir",
                 "configmap/weir-grafana-dashboard"):
        assert kind in out, out


def test_agents_run_with_the_manifest_service_account(cluster):
    token = json.loads(lab.agent_kubeconfig(1).read_text())["users"][0]["user"]["token"]
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
    out = json.loads(lab.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review)))
    user = out["status"]["user"]
    assert user["username"] == "system:serviceaccount:weir-system:weir-agent"
    assert user["extra"]["authentication.kubernetes.io/node-name"] == ["node-1"]
    assert lab.kubectl("auth", "can-i", "patch", "nodes", "--subresource=status", "--as", user["username"], check=False).strip() == "yes"
    assert lab.kubectl("auth", "can-i", "patch", "nodes", "--as", user["username"], check=False).strip() == "no"


def test_policy_denies_another_nodes_annotations(cluster):
    kc = lab.agent_kubeconfig(1)
    status, body = lab.api_request(kc, "PATCH", "/api/v1/nodes/node-2/status",
                                   {"metadata": {"annotations": {"weir.dev/vtep-mac": "0e:00:00:00:66:66"}}})
    assert status == 403 and "weir-agent-own-node" in body, body
    status, body = lab.api_request(kc, "PATCH", "/api/v1/nodes/node-1/status", {"metadata": {"annotations": {"example.com/x": "y"}}})
    assert status == 403 and "only weir.dev" in body, body
    status, body = lab.api_request(kc, "PATCH", "/api/v1/nodes/node-1/status",
                                   {"metadata": {"annotations": {"weir.dev/probe": "ok"}}})
    assert status == 200, body
    lab.kubectl("annotate", "node", "node-1", "weir.dev/probe-")


metrics = lab.agent_metrics


def test_scraped_metrics_match_the_kernel(cluster):
    for i in (1, 2, 3):
        ns = lab.node_ns(i)
        m = metrics(i)
        fdb = [e for e in json.loads(lab.sh(["bridge", "-n", ns, "-j", "fdb", "show", "dev", "weir.1"])) if "dst" in e]
        assert m["weir_fdb_entries"] == len(fdb)
        assert m["weir_neigh_entries"] == len(ip_json(ns, "neigh", "show", "dev", "weir.1", "nud", "permanent"))
        assert m["weir_routes"] == len(ip_json(ns, "route", "show", "proto", "87"))
        assert m["weir_routes"] >= 2
        assert any(k.startswith("weir_build_info") for k in m)
        assert agent_get(i, "/readyz") == "200"


def agent_status(i, *extra):
    return lab.agent_exec(i, "/weir-agent", "status", *extra)


def test_status_shows_drift_after_an_entry_is_deleted_by_hand(cluster):
    clean = agent_status(1)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "in sync" in clean.stdout and "node-2" in clean.stdout
    n2 = json.loads(lab.kubectl("get", "node", "node-2", "-o", "json"))["spec"]["podCIDRs"][0]
    pid = lab.agent_pid(1)
    os.kill(pid, signal.SIGSTOP)  # freeze the agent so it cannot repair before we look
    try:
        lab.sh(["ip", "-n", lab.node_ns(1), "route", "del", n2])
        drift = agent_status(1, "--output", "json")
        assert drift.returncode == 1
        report = json.loads(drift.stdout)
        row = next(r for r in report["report"]["peers"] if r["node"] == "node-2")
        assert row["route"] is False and report["drift"] is True
    finally:
        os.kill(pid, signal.SIGCONT)
    wait(lambda: agent_status(1).returncode == 0, 10, "drift repaired and status clean again")
