"""The weir lab on real nodes: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler in `weir-cp`; containerd, runc, kubelet and kube-proxy in
every `weir-node-<i>`; weir installed with `kubectl apply -k` of a lab overlay
of `manifests/`; workloads as Pods created through the API. Used by `e2e/lab`
and the e2e tests.

Everything lives in namespaces named weir-* and cgroups named weir-node-*;
the host namespace is never changed. Underlay 198.18.0.0/24: the API server
is .2, node i is .(10+i).
"""

import json
import os
import shutil
import signal
import subprocess
import time

import nodes as rt
import proclab
from images import build as images
from proclab import (API, BIN, CACHE, CLUSTER_CIDR, CP_IP, CP_NS, E2E, NODE_MASK, NS, ROOT, STATE,  # noqa: F401
                     UNDERLAY_NS, api_request, attach, ensure_control_plane_binaries, ensure_packages, ensure_underlay,
                     kubeconfig, kubectl, log, netns_list, node_ip, node_ns, openssl, running, spawn, start_etcd,
                     stop, wait_api)

SERVICE_CIDR = "10.96.0.0/16"


def sh(cmd, check=True, capture=True, ns=None, env=None, input=None, timeout=None):
    """proclab.sh, where `ns` may also name a lab pod."""
    if ns and ns.startswith("pod-"):
        cmd, ns = [*netns_target(ns), *cmd], None
    return proclab.sh(cmd, check=check, capture=capture, ns=ns, env=env, input=input, timeout=timeout)
AGENT_SELECTOR = "app.kubernetes.io/name=weir-agent"
CONTROLLER_SELECTOR = "app.kubernetes.io/name=weir-controller"
POD_LABEL = "weir-lab=pod"
HOST_RECORD = STATE / "host-mountpoints.json"


# ---------------------------------------------------------------- certificates


def issue(pki, name, subject, sans=None, usage="clientAuth"):
    if (pki / f"{name}.crt").exists():
        return
    ext = pki / f"{name}.ext"
    ext.write_text((f"subjectAltName={sans}\n" if sans else "") + f"extendedKeyUsage={usage}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{pki}/{name}.key",
            "-out", f"{pki}/{name}.csr")
    openssl("x509", "-req", "-in", f"{pki}/{name}.csr", "-CA", f"{pki}/ca.crt", "-CAkey", f"{pki}/ca.key",
            "-CAcreateserial", "-days", "30", "-out", f"{pki}/{name}.crt", "-extfile", str(ext))


def ensure_pki():
    pki = proclab.ensure_pki()
    for name, subject in [("kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client"),
                          ("controller-manager", "/CN=system:kube-controller-manager"),
                          ("scheduler", "/CN=system:kube-scheduler"),
                          ("kube-proxy", "/CN=system:kube-proxy")]:
        issue(pki, name, subject)
    for name in ("controller-manager", "scheduler", "kube-proxy"):
        kubeconfig(STATE / f"{name}.kubeconfig", client_cert=(pki / f"{name}.crt", pki / f"{name}.key"))
    return pki


def node_pki(i):
    pki = STATE / "pki"
    issue(pki, f"node-{i}", f"/O=system:nodes/CN=system:node:node-{i}")
    issue(pki, f"kubelet-node-{i}", f"/CN=node-{i}", sans=f"IP:{node_ip(i)},DNS:node-{i}", usage="serverAuth")
    kubeconfig(node_dir(i) / "kubelet.kubeconfig", client_cert=(pki / f"node-{i}.crt", pki / f"node-{i}.key"))
    return pki


# ---------------------------------------------------------------- control plane


def start_apiserver():
    pki = STATE / "pki"
    proclab.start_apiserver(
        authorization="Node,RBAC",
        admission="NamespaceLifecycle,ServiceAccount,NodeRestriction,ValidatingAdmissionPolicy",
        extra_flags=[f"--kubelet-client-certificate={pki}/kubelet-client.crt",
                     f"--kubelet-client-key={pki}/kubelet-client.key",
                     f"--kubelet-certificate-authority={pki}/ca.crt",
                     # Otherwise `kubectl logs` resolves the node's name through DNS.
                     "--kubelet-preferred-address-types=InternalIP,Hostname"])


def start_controller_manager():
    pki = STATE / "pki"
    kc = STATE / "controller-manager.kubeconfig"
    spawn("controller-manager", CP_NS, [
        str(BIN / "kube-controller-manager"), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1", "--leader-elect=false",
        f"--service-account-private-key-file={pki}/sa.key", f"--root-ca-file={pki}/ca.crt",
        "--use-service-account-credentials=true",
        # weir-controller, not kube-controller-manager, allocates pod CIDRs.
        "--allocate-node-cidrs=false", "--v=1"])


def start_scheduler():
    kc = STATE / "scheduler.kubeconfig"
    spawn("scheduler", CP_NS, [str(BIN / "kube-scheduler"), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                               f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1",
                               "--leader-elect=false", "--v=1"])


# ---------------------------------------------------------------- images


def image_dir():
    return STATE / "images"


def ensure_images():
    """The weir image from the release binaries, the pause image and the
    workload image, as OCI archives every node imports."""
    d = image_dir()
    d.mkdir(parents=True, exist_ok=True)
    release = ROOT / "target" / "release"
    images.weir_image(d / "weir.tar", release / "weir-agent", release / "weir-controller")
    images.pause_image(d / "pause.tar", d)
    images.workload_image(d / "workload.tar")
    # The upstream suite's images, once `e2e/conformance` has built agnhost.
    if (BIN / "agnhost").exists():
        images.e2e_images(d, BIN / "agnhost")
    if settings().get("dns"):
        images.coredns_image(d / "coredns.tar", BIN / "coredns")


DNS_IP = "10.96.0.10"


def ensure_coredns():
    if (BIN / "coredns").exists():
        return
    log("building CoreDNS from the Go module proxy (~2 min)")
    subprocess.run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(BIN / "coredns"),
                    "github.com/coredns/coredns"], env=dict(os.environ, CGO_ENABLED="0"), cwd=E2E / "dns", check=True)


def ensure_weir_release():
    log("building weir (cargo build --release) for the image")
    sh(["cargo", "build", "--quiet", "--release", "-p", "weir-agent", "-p", "weir-controller"], capture=False)


# ---------------------------------------------------------------- nodes


def node_dir(i):
    return STATE / "nodes" / f"node-{i}"


def holder(i):
    return running(f"node-{i}-holder")


def in_node(i, argv, **kw):
    """Runs argv inside node i (its network, mount and UTS namespaces)."""
    return sh([*rt.enter(holder(i)), *argv], **kw)


def node_spawn(i, name, argv):
    spawn(f"node-{i}-{name}", None, [*rt.enter(holder(i)), *argv])


def start_node_daemons(i):
    d = node_dir(i)
    node_spawn(i, "containerd", ["containerd", "--config", str(d / "containerd.toml")])
    deadline = time.time() + 30
    while subprocess.run([*rt.enter(holder(i)), "ctr", "-a", rt.CTR_SOCK, "version"], capture_output=True).returncode:
        if time.time() > deadline:
            raise RuntimeError(f"node-{i}: containerd did not start; see {STATE}/logs/node-{i}-containerd.log")
        time.sleep(0.2)
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
    for key in ("net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1"):
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
    rt.kube_proxy_config(i, d, STATE / "kube-proxy.kubeconfig", CLUSTER_CIDR)
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
    kubectl("delete", "pods", "-A", "--field-selector", f"spec.nodeName=node-{i}", "--force", "--grace-period=0",
            "--wait=false", check=False)
    stop_node_daemons(i)
    stop(f"node-{i}-holder", sig=signal.SIGKILL)
    rt.remove_cgroups(i)
    kubectl("delete", "node", f"node-{i}", "--ignore-not-found", "--wait=false")
    if node_ns(i) in netns_list():
        sh(["ip", "netns", "del", node_ns(i)])
    shutil.rmtree(node_dir(i), ignore_errors=True)


def nodes():
    return sorted(int(n.split("-")[-1]) for n in netns_list() if n.startswith("weir-node-"))


def wait_for(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def node_ready(i):
    out = kubectl("get", "node", f"node-{i}", "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                  check=False)
    return out.strip() == "True"


def wait_cni_config(i, timeout=120):
    """The agent's conflist, once it is in the node's /etc/cni/net.d."""
    path = node_dir(i) / "fs" / "etc-cni-net.d" / "10-weir.conflist"
    wait_for(path.exists, timeout, f"node-{i}: the agent's CNI config (see its agent's log, `kubectl logs -n {NS}`)")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- weir


def write_overlay(settings):
    """The lab's overlay of manifests/: what a user's would change."""
    d = STATE / "overlay"
    d.mkdir(parents=True, exist_ok=True)
    literals = [f"WEIR_CLUSTER_CIDR={CLUSTER_CIDR}", f"WEIR_NODE_CIDR_MASK_SIZE_IPV4={NODE_MASK}"]
    literals += [f"WEIR_{k.upper()}={v}" for k, v in settings.items() if k in ("backend", "mode")]
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


def settings():
    p = STATE / "settings.json"
    return json.loads(p.read_text()) if p.exists() else {"backend": "vxlan", "mode": "full"}


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


# ---------------------------------------------------------------- workloads


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


# ---------------------------------------------------------------- whole lab


def up(n_nodes=3, pods_per_node=2, backend="vxlan", mode="full", dns=False):
    if os.geteuid() != 0:
        raise SystemExit("the lab needs root (it creates network namespaces)")
    started = time.time()
    ensure_packages()
    ensure_control_plane_binaries()
    ensure_weir_release()
    STATE.mkdir(parents=True, exist_ok=True)
    s = {"backend": backend, "mode": mode, "dns": dns}
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
    apply_weir(s)
    for i in range(1, n_nodes + 1):
        if not holder(i):
            log(f"starting node-{i} (containerd, kubelet, kube-proxy)")
            add_node(i)
    wait_for(lambda: all(node_ready(i) for i in range(1, n_nodes + 1)), 240,
             "every node Ready (the agent writes the CNI config once weir-controller gave the node a pod CIDR)")
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
    lines.append(f"logs:    e2e/lab kubectl logs -n {NS} ds/weir-agent")
    lines.append(f"status:  e2e/lab kubectl exec -n {NS} <agent pod> -- /weir-agent status")
    return "\n".join(lines)
