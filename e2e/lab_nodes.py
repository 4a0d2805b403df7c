"""Real nodes: each its namespaces, cgroup root, containerd, kubelet and kube-proxy (see nodes.py)."""

import json
import os
import shutil
import signal
import subprocess
import time

import nodes as rt
from proclab import (BIN, CLUSTER_CIDR, CLUSTER_CIDR6, NS, STATE, attach, kubectl, log, netns_list, node_ip, node_ns,
                     running, sh, spawn, stop)
from lab_base import HOST_RECORD, SERVICE_CIDR, holder, node_dir, settings, wait_for
from lab_pki import node_pki
from lab_images import DNS_IP, image_dir


def in_node(i, argv, **kw):
    """Runs argv inside node i (its network, mount and UTS namespaces)."""
    return sh([*rt.enter(holder(i)), *argv], **kw)


def node_spawn(i, name, argv):
    spawn(f"node-{i}-{name}", None, [*rt.enter(holder(i)), *argv])


def containerd_not_up(i, timeout, probe_error):
    """Says why, in the error itself: CI keeps only part of a failed test's
    report, and the lab's teardown deletes the log."""
    log_path = STATE / "logs" / f"node-{i}-containerd.log"
    tail = log_path.read_text(errors="replace").splitlines()[-15:] if log_path.exists() else ["(no log)"]
    pid = running(f"node-{i}-containerd")
    return (f"node-{i}: containerd did not answer `ctr version` in {timeout} s; it is "
            f"{f'running as pid {pid}' if pid else 'not running'}; the last probe said: "
            f"{probe_error or '(nothing)'}; the last lines of {log_path}:\n" + "\n".join(tail))


def containerd_answers(i, timeout=30):
    """None once `ctr version` answers; after the timeout, why not."""
    deadline = time.time() + timeout
    while (probe := subprocess.run([*rt.enter(holder(i)), "ctr", "-a", rt.CTR_SOCK, "version"],
                                   capture_output=True, text=True)).returncode:
        if time.time() > deadline:
            return containerd_not_up(i, timeout, probe.stderr.strip())
        time.sleep(0.2)
    return None


def start_containerd(i):
    # CI once met a node-4 whose containerd did not answer in 30 s, with the
    # cause lost with the lab. It is restarted once, as a node's supervisor
    # would, after its log tail is printed, so the next time says why.
    argv = ["containerd", "--config", str(node_dir(i) / "containerd.toml")]
    node_spawn(i, "containerd", argv)
    if (why := containerd_answers(i)) is None:
        return
    log(f"{why}\n[lab] restarting node-{i}'s containerd once")
    stop(f"node-{i}-containerd")
    node_spawn(i, "containerd", argv)
    if (why := containerd_answers(i)) is not None:
        raise RuntimeError(why)


def start_node_daemons(i):
    d = node_dir(i)
    start_containerd(i)
    for tar in sorted(image_dir().glob("*.tar")):
        rt.ctr(holder(i), "images", "import", str(tar))
    node_spawn(i, "kubelet", [str(BIN / "kubelet"), f"--config={d / 'kubelet.yaml'}",
                              f"--kubeconfig={d / 'kubelet.kubeconfig'}", f"--hostname-override=node-{i}",
                              f"--node-ip={node_ip(i)}", "--v=1"])
    node_spawn(i, "proxy", [str(BIN / "kube-proxy"), f"--config={d / 'kube-proxy.yaml'}", "--v=1"])


def add_node(i):
    """A real node: its namespaces, cgroup root, containerd, kubelet and
    kube-proxy. The kubelet registers the Node; the DaemonSet then runs the
    agent there."""
    ns = node_ns(i)
    attach(ns, "eth0", node_ip(i))
    keys = ["net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1"]
    if settings().get("dual_stack"):
        keys += ["net.ipv6.conf.all.forwarding=1", "net.bridge.bridge-nf-call-ip6tables=1"]
    for key in keys:
        sh(["sysctl", "-qw", key], ns=ns)
    # hostNetwork clients of a ClusterIP (the agent's in-cluster config) need
    # a route for the first lookup; kube-proxy's DNAT then rewrites it.
    sh(["ip", "-n", ns, "route", "replace", SERVICE_CIDR, "dev", "eth0"])
    d = node_dir(i)
    d.mkdir(parents=True, exist_ok=True)
    rt.ensure_host_mountpoints(HOST_RECORD)
    rt.ensure_cgroups(i)
    pki = node_pki(i)
    rt.containerd_config(d)
    rt.kubelet_config(i, node_ip(i), d, pki, cluster_dns=DNS_IP if settings().get("dns") else None)
    cluster = CLUSTER_CIDR + (f",{CLUSTER_CIDR6}" if settings().get("dual_stack") else "")
    rt.kube_proxy_config(i, d, STATE / "kube-proxy.kubeconfig", cluster)
    (d / "holder.sh").write_text(rt.holder_script(i, d))
    spawn(f"node-{i}-holder", None, ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--uts",
                                     "--propagation", "private", "sh", str(d / "holder.sh")])
    deadline = time.time() + 10
    while sh(["readlink", f"/proc/{holder(i)}/exe"], check=False).strip() != shutil.which("sleep"):
        if time.time() > deadline:
            raise RuntimeError(f"node-{i}: mount namespace set-up failed; see {STATE}/logs/node-{i}-holder.log")
        time.sleep(0.05)
    start_node_daemons(i)


def stop_node_daemons(i, keep_pods=False):
    """Stops kubelet, kube-proxy and containerd. With keep_pods the
    containers and their shims go on running, as across a kubelet and
    containerd restart on a real node."""
    for name in ("proxy", "kubelet", "containerd"):
        stop(f"node-{i}-{name}")
    if keep_pods:
        return
    rt.remove_cgroups(i)
    h = holder(i)
    if h:
        mnt = os.readlink(f"/proc/{h}/ns/mnt")
        for pid in [p for p in os.listdir("/proc") if p.isdigit() and int(p) != h]:
            try:
                if os.readlink(f"/proc/{pid}/ns/mnt") == mnt:
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def remove_node(i):
    # The Node goes before its pods: a DaemonSet pod deleted while its Node
    # still exists is created again at once, for a node that is going away,
    # and a node added again under the same name meets that stale pod.
    stop_node_daemons(i)
    kubectl("delete", "node", f"node-{i}", "--ignore-not-found")
    kubectl("delete", "pods", "-A", "--field-selector", f"spec.nodeName=node-{i}", "--force", "--grace-period=0",
            "--wait=false", check=False)
    stop(f"node-{i}-holder", sig=signal.SIGKILL)
    rt.remove_cgroups(i)
    if node_ns(i) in netns_list():
        sh(["ip", "netns", "del", node_ns(i)])
    shutil.rmtree(node_dir(i), ignore_errors=True)






def node_ready(i):
    out = kubectl("get", "node", f"node-{i}", "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                  check=False)
    return out.strip() == "True"


def wait_cni_config(i, timeout=120):
    """The agent's conflist, once it is in the node's /etc/cni/net.d."""
    path = node_dir(i) / "fs" / "etc-cni-net.d" / "10-weir.conflist"
    wait_for(path.exists, timeout, lambda: f"node-{i}: the agent's CNI config; {why_no_cni_config(i)}")
    return json.loads(path.read_text())


def why_no_cni_config(i):
    """What a missing CNI config has to go on, read before the test's
    clean-up removes the node: whether the Node holds a pod CIDR, its agent
    pod's phase and the end of the agent's log, and, when it has no agent
    pod, every agent pod wherever it is bound, the namespace's events, the
    DaemonSet's status and what kube-controller-manager logged about it."""
    node = f"node-{i}"
    cidrs = kubectl("get", "node", node, "-o", "jsonpath={.spec.podCIDRs}", check=False).strip() or "none"
    pods = kubectl("get", "pods", "-n", NS, "--field-selector", f"spec.nodeName={node}", "-o",
                   "jsonpath={range .items[*]}{.metadata.name} {.status.phase}{'\\n'}{end}", check=False).split()
    if pods:
        log = kubectl("logs", "-n", NS, "--tail", "15", pods[0], check=False)
        return f"pod CIDRs {cidrs}; agent pods {pods}; the agent's last log lines:\n{log}"
    every = kubectl("get", "pods", "-n", NS, "-o", "wide", check=False)
    events = kubectl("get", "events", "-n", NS, "--sort-by", ".lastTimestamp", check=False).splitlines()[-15:]
    status = kubectl("get", "daemonset", "-n", NS, "weir-agent", "-o", "jsonpath={.status}", check=False)
    kcm_log = STATE / "logs" / "controller-manager.log"
    daemons = [ln for ln in (kcm_log.read_text(errors="replace").splitlines() if kcm_log.exists() else [])
               if "daemon" in ln.lower() or "expectations" in ln.lower()][-25:]
    stuck = any("still waiting on expectations" in ln for ln in daemons[-5:])
    hint = ("\n(the DaemonSet controller is waiting for a pod creation or deletion it has not seen, and makes no "
            "pod until it does or 5 min pass)") if stuck else ""
    return (f"pod CIDRs {cidrs}; no agent pod on {node}; the pods in {NS}:\n{every}\nits last events:\n"
            + "\n".join(events) + f"\nthe DaemonSet's status: {status}\nkube-controller-manager's last lines on it:\n"
            + "\n".join(daemons) + hint)
