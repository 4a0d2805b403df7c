"""weir as the lab installs and drives it: the overlay of manifests/, the agent and controller pods."""

import json
import os
import subprocess
import time

import nodes as rt
from proclab import (API, BIN, CLUSTER_CIDR, CLUSTER_CIDR6, CP_NS, NODE_MASK, NS, ROOT, STATE, kubeconfig, kubectl,
                     node_ns, ns_get)
from lab_base import AGENT_SELECTOR, holder, node_dir, nodes, settings, wait_for


def write_overlay(settings):
    """The lab's overlay of manifests/: what a user's would change."""
    d = STATE / "overlay"
    d.mkdir(parents=True, exist_ok=True)
    cluster = CLUSTER_CIDR + (f",{CLUSTER_CIDR6}" if settings.get("dual_stack") else "")
    # The API server itself, not the kubernetes Service: see weir_common::api.
    literals = [f"WEIR_CLUSTER_CIDR={cluster}", f"WEIR_NODE_CIDR_MASK_SIZE_IPV4={NODE_MASK}", f"WEIR_API_SERVER={API}"]
    literals += [f"WEIR_{k.upper()}={v}" for k, v in settings.items() if k in ("backend", "mode")]
    if settings.get("direct_routing"):
        literals.append("WEIR_DIRECT_ROUTING=true")
    (d / "kustomization.yaml").write_text("\n".join([
        "apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization",
        f"resources: [{os.path.relpath(ROOT / 'manifests', d)}]",
        "images:", "  - name: ghcr.io/weir-dev/weir", "    newName: localhost/weir", "    newTag: lab",
        "configMapGenerator:", "  - name: weir-config", "    namespace: weir-system", "    behavior: merge",
        "    options: {disableNameSuffixHash: true}", "    literals:",
        *[f"      - {lit}" for lit in literals], ""]))
    return d


def apply_weir(settings):
    kubectl("apply", "-k", str(write_overlay(settings)))


def pods_in(namespace, selector):
    return json.loads(kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json"))["items"]


def live_agent(i):
    """Node i's agent Pod object, unless it is being deleted."""
    return next((p for p in pods_on(i, NS, AGENT_SELECTOR) if not p["metadata"].get("deletionTimestamp")), None)


def agent_pod(i):
    p = live_agent(i)
    return p["metadata"]["name"] if p else None


def pod_ready(p):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))


def agent_ready(i):
    p = live_agent(i)
    return bool(p) and pod_ready(p)


def wait_agents(timeout=180):
    wait_for(lambda: all(agent_ready(i) for i in nodes()), timeout, "an agent pod Ready on every node")


def agent_metrics(i):
    """Node i's agent's /metrics, as {series with its labels: value}."""
    text = ns_get(node_ns(i), "http://127.0.0.1:9478/metrics")[1]
    samples = (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
    return {key: float(val) for key, val in samples}


def watch_events(i):
    """Node events node i's agent has had from its watch, errors not counted."""
    return sum(v for k, v in agent_metrics(i).items()
               if k.startswith("weir_kube_watch_events_total{") and 'type="error"' not in k)


def wait_watches_resumed(timeout):
    """Until every agent's Node watch delivers events again, as after an API
    server restart; the seconds it took. A probe annotation on node-1 is the
    event: the agents count it, and nothing they program reads it."""
    before = {i: watch_events(i) for i in nodes()}
    kubectl("annotate", "--overwrite", "node", "node-1", f"e2e.weir.dev/probe={time.time()}")
    start = time.time()
    behind = lambda: [f"node-{i}" for i in nodes() if watch_events(i) <= before[i]]  # noqa: E731
    wait_for(lambda: not behind(), timeout, lambda: f"the Node watch of every agent (silent: {behind()})")
    took = time.time() - start
    kubectl("annotate", "node", "node-1", "e2e.weir.dev/probe-")
    return took


def container_id(pod, namespace):
    p = json.loads(kubectl("get", "pod", "-n", namespace, pod, "-o", "json"))
    statuses = p["status"].get("containerStatuses") or []
    if not statuses or not statuses[0].get("containerID"):
        return None, p["spec"]["nodeName"]
    return statuses[0]["containerID"].split("://")[1], p["spec"]["nodeName"]


def container_pid(pod, namespace="default"):
    cid, node = container_id(pod, namespace)
    return rt.task_pids(holder(int(node.split("-")[-1]))).get(cid) if cid else None


def task_pid(i, cid):
    """The pid of a container on node i, from containerd alone."""
    return rt.task_pids(holder(i)).get(cid)


def agent_pid(i):
    return container_pid(agent_pod(i), NS)


def task_pids_on(i):
    return rt.task_pids(holder(i))


def agent_containers(i):
    """Ids of node i's running agent containers, from containerd alone (the
    API server may be away)."""
    out = rt.ctr(holder(i), "containers", "ls", "-q", 'labels."io.kubernetes.container.name"==agent', check=False)
    running_ = task_pids_on(i)
    return sorted(c for c in out.split() if c in running_)


def kill_container(i, cid):
    """SIGKILLs a container on node i; the kubelet restarts it."""
    rt.ctr(holder(i), "task", "kill", "-s", "SIGKILL", cid)


def kill_agent(i):
    kill_container(i, container_id(agent_pod(i), NS)[0])


def stop_agent(i):
    """Takes the agent off node i (the DaemonSet's node affinity excludes
    nodes labelled weir.dev/agent=paused), leaving the dataplane in place."""
    kubectl("label", "node", f"node-{i}", "--overwrite", "weir.dev/agent=paused")
    wait_for(lambda: not pods_on(i, NS, AGENT_SELECTOR), 60, f"node-{i}'s agent pod gone")


def start_agent(i):
    kubectl("label", "node", f"node-{i}", "weir.dev/agent-")
    wait_for(lambda: agent_ready(i), 120, f"node-{i}'s agent Ready")


def pods_on(i, namespace, selector):
    return [p for p in pods_in(namespace, selector) if p["spec"].get("nodeName") == f"node-{i}"]


def agent_log(i):
    return kubectl("logs", "-n", NS, agent_pod(i), check=False)


def agent_exec(i, *argv, check=False):
    return subprocess.run(["ip", "netns", "exec", CP_NS, str(BIN / "kubectl"), "--kubeconfig",
                           str(STATE / "admin.kubeconfig"), "exec", "-n", NS, agent_pod(i), "--", *argv],
                          capture_output=True, text=True, timeout=60)


def agent_kubeconfig(i):
    """A kubeconfig with a token bound to node i's agent pod, as the pod's
    own: it carries the node-name claim the admission policy checks."""
    pod = agent_pod(i)
    uid = kubectl("get", "pod", "-n", NS, pod, "-o", "jsonpath={.metadata.uid}").strip()
    token = kubectl("create", "token", "weir-agent", "-n", NS, "--duration", "1h", "--bound-object-kind", "Pod",
                    "--bound-object-name", pod, "--bound-object-uid", uid).strip()
    path = node_dir(i) / "agent.kubeconfig"
    kubeconfig(path, token=token)
    return path




def set_agent_env(**env):
    """Changes the agents' environment through the DaemonSet and waits for
    the rollout; None removes a variable."""
    args = [f"{k}={v}" if v is not None else f"{k}-" for k, v in env.items()]
    kubectl("set", "env", "-n", NS, "ds/weir-agent", *args)
    kubectl("rollout", "status", "-n", NS, "ds/weir-agent", "--timeout=300s")
    wait_agents()


def set_mode(mode):
    """Switches every agent's mode through the ConfigMap, as an operator
    would, and restarts the DaemonSet (the device is recreated)."""
    s = settings()
    s["mode"] = mode
    (STATE / "settings.json").write_text(json.dumps(s))
    apply_weir(s)
    kubectl("rollout", "restart", "-n", NS, "ds/weir-agent")
    kubectl("rollout", "status", "-n", NS, "ds/weir-agent", "--timeout=300s")
    wait_agents()
