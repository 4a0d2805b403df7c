"""The lab's pods and Service, reachability, and the healthy state every test starts from."""

import json
import subprocess
import time

from images import build as images
import proclab
from proclab import BIN, CP_NS, STATE, kubectl
from lab_base import POD_LABEL, nodes, wait_for
from lab_nodes import node_ready
from lab_weir import agent_ready, container_pid, pod_ready, pods_in



def sh(cmd, check=True, capture=True, ns=None, env=None, input=None, timeout=None):
    """proclab.sh, where `ns` may also name a lab pod."""
    if ns and ns.startswith("pod-"):
        cmd, ns = [*netns_target(ns), *cmd], None
    return proclab.sh(cmd, check=check, capture=capture, ns=ns, env=env, input=input, timeout=timeout)


def pod_manifest(i, j):
    # busybox httpd answers with the pod's name, for the Service test.
    script = "hostname > /www/index.html && exec httpd -f -p 8080 -h /www"
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"pod-{i}-{j}", "namespace": "default", "labels": {"weir-lab": "pod"}},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": f"node-{i}"}, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "web", "image": images.WORKLOAD, "imagePullPolicy": "Never",
                                     "command": ["sh", "-c", script], "ports": [{"containerPort": 8080}]}]}}


SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
           "spec": {"selector": {"weir-lab": "pod"}, "ports": [{"port": 80, "targetPort": 8080}]}}


def add_pods(pairs, timeout=180):
    if not pairs:
        return
    items = [pod_manifest(i, j) for i, j in pairs]
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    names = [f"pod-{i}-{j}" for i, j in pairs]
    wait_for(lambda: all(n in pods() for n in names), timeout, f"pods {names} running with an IP")


def add_pod(i, j):
    add_pods([(i, j)])


def del_pod(i, j):
    kubectl("delete", "pod", f"pod-{i}-{j}", "--ignore-not-found", "--grace-period=1")


def pods():
    """Running lab pods: name -> pod IP."""
    out = {}
    for p in pods_in("default", POD_LABEL):
        if p["status"].get("phase") == "Running" and p["status"].get("podIP"):
            out[p["metadata"]["name"]] = p["status"]["podIP"]
    return dict(sorted(out.items()))


def pods6():
    """Running lab pods' IPv6 addresses (dual-stack labs): name -> address."""
    out = {}
    for p in pods_in("default", POD_LABEL):
        v6 = [a["ip"] for a in p["status"].get("podIPs") or [] if ":" in a["ip"]]
        if p["status"].get("phase") == "Running" and v6:
            out[p["metadata"]["name"]] = v6[0]
    return dict(sorted(out.items()))


def netns_target(name):
    """The argv prefix that runs a host command in a namespace: a named
    network namespace, or a lab pod's (through its container's process)."""
    if name.startswith("pod-"):
        return ["nsenter", f"--net=/proc/{container_pid(name)}/ns/net", "--"]
    return ["ip", "netns", "exec", name]


def ping(src, ip, count=1, interval=0.2, wait=1):
    """A ping from a lab pod's (or a namespace's) network namespace with the
    host's ping; the matrix below goes through `kubectl exec` instead."""
    r = subprocess.run([*netns_target(src), "ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait),
                        ip], capture_output=True, text=True)
    return proclab.parse_ping(r.stdout)


def exec_ping(src, ip, count=1):
    r = subprocess.run(["ip", "netns", "exec", CP_NS, str(BIN / "kubectl"), "--kubeconfig",
                        str(STATE / "admin.kubeconfig"), "exec", src, "--", "ping", "-q", "-c", str(count),
                        "-i", "0.2", "-W", "1", ip], capture_output=True, text=True, timeout=60)
    return proclab.parse_ping(r.stdout)


def ping_matrix(count=3):
    return proclab.ping_matrix(count, pods_=pods(), ping_=exec_ping)


def unhealthy():
    """What keeps the lab from the state every test starts from, or [].

    After the API server has been away for longer than the node monitor's
    grace period, kube-controller-manager marks Nodes Unknown and their pods
    NotReady, and the EndpointSlice controller drops those pods from every
    Service until each kubelet reports again. A test that starts then sees a
    Service with the endpoints of only the node that reported first."""
    issues = [f"node-{i} not Ready" for i in nodes() if not node_ready(i)]
    issues += [f"node-{i}'s agent not Ready" for i in nodes() if not agent_ready(i)]
    lab_pods = {p["metadata"]["name"]: p for p in pods_in("default", POD_LABEL)}
    issues += [f"{name} not Ready" for name, p in lab_pods.items() if not pod_ready(p)]
    slices = json.loads(kubectl("get", "endpointslices", "-n", "default", "-l", "kubernetes.io/service-name=web",
                                "-o", "json"))["items"]
    serving = {e.get("targetRef", {}).get("name") for s in slices for e in s.get("endpoints") or []
               if e.get("conditions", {}).get("ready")}
    issues += [f"{name} not an endpoint of Service web" for name, p in lab_pods.items()
               if pod_ready(p) and name not in serving]
    return issues


def wait_healthy(timeout=180):
    deadline = time.time() + timeout
    while issues := unhealthy():
        if time.time() > deadline:
            raise RuntimeError(f"the lab is not healthy after {timeout}s: {issues}")
        time.sleep(1)


def wait_all_pairs(timeout=180):
    deadline = time.time() + timeout
    while True:
        rows = ping_matrix(count=1)
        bad = [r for r in rows if r[4] == 0]
        if not bad:
            return rows
        if time.time() > deadline:
            raise RuntimeError(f"pods cannot reach each other after {timeout}s: {[(r[0], r[1]) for r in bad][:10]}")
        time.sleep(1)
