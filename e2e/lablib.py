"""The weir lab on real nodes: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and Prometheus in `weir-cp`; containerd, runc, kubelet and
kube-proxy in every `weir-node-<i>`; weir installed with `kubectl apply -k`
of a lab overlay of `manifests/`; workloads as Pods created through the API.
Used by `e2e/lab` and the e2e tests, which reach every part through this
module (`import lablib as lab`).

The parts, each a module: lab_base (shared state), lab_pki, lab_controlplane,
lab_images, lab_monitoring, lab_weir, lab_nodes, lab_workloads; proclab below
them all. Everything lives in namespaces named weir-* and cgroups named
weir-node-*; the host namespace is never changed. Underlay 198.18.0.0/24: the
API server is .2, node i is .(10+i).
"""

import json
import os
import signal
import time

import nodes as rt
import proclab
from proclab import (API, BIN, CACHE, CLUSTER_CIDR, CP_IP, CP_NS, E2E, NODE_MASK, NS, ROOT, STATE,  # noqa: F401
                     ROUTER_NS, UNDERLAY_NS, V6_UNDERLAY, api_request, attach, ns_get, ensure_control_plane_binaries, ensure_packages, ensure_underlay,
                     kubeconfig, kubectl, log, netns_list, node_ip, node_ns, openssl, running, spawn, start_etcd,
                     stop, wait_api)
from lab_base import (  # noqa: F401
    SERVICE_CIDR, AGENT_SELECTOR, CONTROLLER_SELECTOR, POD_LABEL, HOST_RECORD, settings, wait_for, node_dir, holder, nodes)
from lab_pki import (  # noqa: F401
    issue, ensure_pki, node_pki)
from lab_controlplane import (  # noqa: F401
    start_apiserver, start_controller_manager, start_scheduler)
from lab_images import (  # noqa: F401
    image_dir, ensure_images, DNS_IP, ensure_coredns, ensure_weir_release)
from lab_monitoring import (  # noqa: F401
    PROMETHEUS_VERSION, PROMETHEUS_ADDR, ensure_prometheus, promtool, prometheus_config, start_prometheus, prom_query, prom_get)
from lab_weir import (  # noqa: F401
    write_overlay, apply_weir, pods_in, live_agent, agent_pod, pod_ready, agent_ready, wait_agents, agent_metrics, watch_events, wait_watches_resumed, container_id, container_pid, task_pid, agent_pid, task_pids_on, agent_containers, kill_container, kill_agent, stop_agent, start_agent, pods_on, agent_log, agent_exec, agent_kubeconfig, set_agent_env, set_mode)
from lab_nodes import (  # noqa: F401
    in_node, node_spawn, start_node_daemons, add_node, stop_node_daemons, remove_node, node_ready, wait_cni_config,
    why_no_cni_config)
from lab_workloads import (  # noqa: F401
    pods6, sh, pod_manifest, SERVICE, add_pods, add_pod, del_pod, pods, netns_target, ping, exec_ping, ping_matrix, unhealthy, wait_healthy, wait_all_pairs)

# ---------------------------------------------------------------- whole lab


def up(n_nodes=3, pods_per_node=2, backend="vxlan", mode="full", dns=False, subnets=1, direct_routing=False,
       dual_stack=False):
    """Everything, until every pod pings every other. `subnets=2` puts
    odd-numbered nodes on 198.18.0.0/24 and even-numbered ones on
    198.18.1.0/24, joined by the `weir-router` namespace; `dual_stack` gives
    pods an IPv6 address too (fd00:10:244::/56) and the underlay IPv6
    addresses beside its IPv4 ones."""
    if os.geteuid() != 0:
        raise SystemExit("the lab needs root (it creates network namespaces)")
    if subnets not in (1, 2):
        raise SystemExit(f"--subnets {subnets}: the lab builds 1 or 2 underlay subnets")
    started = time.time()
    ensure_packages()
    ensure_control_plane_binaries()
    ensure_weir_release()
    STATE.mkdir(parents=True, exist_ok=True)
    s = {"backend": backend, "mode": mode, "dns": dns, "subnets": subnets, "direct_routing": direct_routing,
         "dual_stack": dual_stack}
    (STATE / "settings.json").write_text(json.dumps(s))
    if dns:
        ensure_coredns()
    ensure_images()
    ensure_pki()
    ensure_underlay()
    start_etcd()
    start_apiserver()
    wait_api()
    start_controller_manager()
    start_scheduler()
    start_prometheus()
    apply_weir(s)
    for i in range(1, n_nodes + 1):
        if not holder(i):
            log(f"starting node-{i} (containerd, kubelet, kube-proxy)")
            add_node(i)
    wait_for(lambda: all(node_ready(i) for i in range(1, n_nodes + 1)), 240, lambda: (
        "every node Ready (the agent writes the CNI config once weir-controller gave the node a pod CIDR); "
        + "; ".join(f"node-{i} is not: {why_no_cni_config(i)}" for i in range(1, n_nodes + 1) if not node_ready(i))))
    wait_agents()
    if dns:
        kubectl("apply", "-f", str(E2E / "addons" / "coredns.yaml"))
        kubectl("rollout", "status", "-n", "kube-system", "deploy/coredns", "--timeout=180s")
    kubectl("apply", "-f", "-", input=json.dumps(SERVICE))
    add_pods([(i, j) for i in range(1, n_nodes + 1) for j in range(1, pods_per_node + 1)])
    rows = wait_all_pairs()
    log(f"lab up in {time.time() - started:.0f} s")
    return rows


def down():
    for i in nodes():
        stop_node_daemons(i)
        stop(f"node-{i}-holder", sig=signal.SIGKILL)
        rt.remove_cgroups(i)
    for i in rt.cgroup_nodes():  # nodes whose namespace is already gone
        rt.remove_cgroups(i)
    # Before proclab.down, which deletes the state directory holding the record.
    rt.teardown_host(HOST_RECORD)
    proclab.down()


def summary():
    lines = []
    info = json.loads(kubectl("get", "nodes", "-o", "json"))
    lines.append(f"{'NODE':<10} {'READY':<6} {'UNDERLAY':<14} {'PODCIDR':<16} {'VTEP MAC':<18} AGENT")
    for n in info["items"]:
        name = n["metadata"]["name"]
        ann = n["metadata"].get("annotations", {})
        ready = next((c["status"] for c in n["status"].get("conditions", []) if c["type"] == "Ready"), "-")
        lines.append(f"{name:<10} {ready:<6} {ann.get('weir.dev/public-ip', '-'):<14} "
                     f"{','.join(n['spec'].get('podCIDRs', ['-'])):<16} {ann.get('weir.dev/vtep-mac', '-'):<18} "
                     f"{agent_pod(int(name.split('-')[-1])) if name.startswith('node-') else '-'}")
    lines.append("")
    lines.append(f"{'POD':<16} IP")
    for name, ip in pods().items():
        lines.append(f"{name:<16} {ip}")
    lines.append("")
    lines.append(f"metrics: Prometheus at http://{PROMETHEUS_ADDR} (in namespace {CP_NS}; scrapes every agent and "
                 "controller pod, with weir's alert rules)")
    lines.append(f"logs:    e2e/lab kubectl logs -n {NS} ds/weir-agent")
    lines.append(f"status:  e2e/lab kubectl exec -n {NS} <agent pod> -- /weir-agent status")
    return "\n".join(lines)
