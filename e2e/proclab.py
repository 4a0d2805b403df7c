"""The process lab: a real kube-apiserver and etcd, nodes and pods in network
namespaces, and weir-agent on every node as a plain process. The benchmarks
use it where a figure needs process agents (B4's fake Nodes, B5's private
namespaces; see BENCHMARKS.md), and `lablib` (real nodes: kubelet,
containerd, weir from its manifests) builds on its primitives.

Everything lives in namespaces named weir-*; the host namespace is never changed.
Underlay 198.18.0.0/24: the API server is .2, node i is .(10+i).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

E2E = Path(__file__).resolve().parent
ROOT = E2E.parent
CACHE = E2E / ".cache"
BIN = CACHE / "bin"
STATE = Path(os.environ.get("WEIR_LAB_STATE", E2E / ".state"))
UNDERLAY_NS = "weir-underlay"
CP_NS = "weir-cp"
CP_IP = "198.18.0.2"
API = f"https://{CP_IP}:6443"
CLUSTER_CIDR = os.environ.get("WEIR_LAB_CLUSTER_CIDR", "10.244.0.0/16")
# The IPv6 range of a dual-stack lab (`lab up --dual-stack`): a /64 per node.
CLUSTER_CIDR6 = "fd00:10:244::/56"
NODE_MASK = int(os.environ.get("WEIR_LAB_NODE_MASK", "24"))
DEBIAN_PACKAGES = {
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "/usr/bin/ping": "iputils-ping",
    "/usr/bin/openssl": "openssl",
    "/usr/sbin/nft": "nftables",
    "/usr/sbin/iptables": "iptables",
    "/usr/bin/jq": "jq",
    "/usr/bin/containerd": "containerd",
    "/usr/sbin/runc": "runc",
    "/bin/busybox": "busybox-static",
    "/usr/bin/gcc": "gcc",
    "/usr/include/stdio.h": "libc6-dev",
    "/usr/bin/curl": "curl",
    "/bin/nc.openbsd": "netcat-openbsd",
    "/usr/bin/tcpdump": "tcpdump",
    "/usr/bin/iperf3": "iperf3",  # B6 and F5
}
CNI_BIN = "/usr/lib/cni"
NS = "weir-system"


def log(msg):
    print(f"[lab] {msg}", file=sys.stderr, flush=True)


def sh(cmd, check=True, capture=True, ns=None, env=None, input=None, timeout=None):
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
    r = subprocess.run(cmd, text=True, capture_output=capture, env=env, input=input, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr}")
    return r.stdout if capture else ""


def netns_list():
    out = sh(["ip", "-j", "netns", "list"], check=False) or "[]"
    return [n["name"] for n in json.loads(out or "[]")]


def node_ns(i):
    return f"weir-node-{i}"


def lab_shape():
    """How many underlay subnets the lab has, and whether it is dual-stack
    (`lab up --subnets N --dual-stack`, kept in settings.json)."""
    s = settings()
    return s.get("subnets", 1), s.get("dual_stack", False)


def node_ip(i):
    """Node i's underlay address: 198.18.0.(10+i), or with two subnets,
    odd-numbered nodes on 198.18.0.0/24 and even-numbered on 198.18.1.0/24."""
    subnets, _ = lab_shape()
    return f"198.18.{0 if subnets == 1 or i % 2 else 1}.{10 + i}"


def pod_ns(i, j):
    return f"weir-pod-{i}-{j}"


# ---------------------------------------------------------------- set-up


def ensure_packages():
    missing = sorted({pkg for path, pkg in DEBIAN_PACKAGES.items() if not os.path.exists(path)})
    if not missing:
        return
    log(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh(["apt-get", "update", "-qq"], env=env)
    sh(["apt-get", "install", "-y", "-qq", *missing], env=env)


KUBE_VERSION = "v1.34.4"
KUBE_COMMANDS = ["kube-apiserver", "kubectl", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"]


def version_ldflags():
    """Without these, nodes and `kubectl version` report v0.0.0-master."""
    major, minor = KUBE_VERSION[1:].split(".")[:2]
    ldflags = "-s -w"
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        ldflags += (f" -X {pkg}.gitVersion={KUBE_VERSION} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor}"
                    f" -X {pkg}.gitTreeState=clean")
    return ldflags


def ensure_control_plane_binaries():
    wanted = [BIN / c for c in KUBE_COMMANDS] + [BIN / "etcd"]
    if all(p.exists() for p in wanted):
        return
    BIN.mkdir(parents=True, exist_ok=True)
    log("building the control plane, kubelet, kube-proxy and etcd from the Go module proxy "
        "(first time: ~10 min on 2 cores)")
    cmd = ["go", "build", "-v", "-trimpath", "-ldflags", version_ldflags(), "-o", str(BIN) + "/",
           *[f"k8s.io/kubernetes/cmd/{c}" for c in KUBE_COMMANDS], "./cmd/etcd"]
    proc = subprocess.Popen(cmd, cwd=E2E / "controlplane", stderr=subprocess.PIPE, text=True)
    count = 0
    for _ in proc.stderr:
        count += 1
        if count % 200 == 0:
            log(f"  ... {count} packages compiled")
    if proc.wait() != 0:
        raise RuntimeError("control plane build failed; rerun with `cd e2e/controlplane && go build ./...` to see why")
    log(f"control plane built ({count} packages)")


# Benchmarks run the release build; everything else the debug build that
# `cargo test` has already compiled.
PROFILE = os.environ.get("WEIR_LAB_PROFILE", "debug")


def agent_binary():
    return ROOT / "target" / PROFILE / "weir-agent"


def controller_binary():
    return ROOT / "target" / PROFILE / "weir-controller"


def ensure_weir_built():
    log("building weir (cargo build)")
    release = ["--release"] if PROFILE == "release" else []
    sh(["cargo", "build", "--quiet", *release, "-p", "weir-agent", "-p", "weir-controller"], capture=False, check=True)


# ---------------------------------------------------------------- certificates


def openssl(*args):
    sh(["openssl", *args])


def ensure_pki():
    pki = STATE / "pki"
    if (pki / "admin.crt").exists():
        return pki
    pki.mkdir(parents=True, exist_ok=True)
    log("creating CA, serving certificate, admin client certificate and service-account key")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=weir-lab-ca",
            "-keyout", f"{pki}/ca.key", "-out", f"{pki}/ca.crt")
    ext = pki / "server.ext"
    ext.write_text(f"subjectAltName=IP:{CP_IP},IP:127.0.0.1,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default\n"
                   "extendedKeyUsage=serverAuth\n")
    for name, subj, extfile in [("server", "/CN=kube-apiserver", ext),
                                ("admin", "/O=system:masters/CN=weir-lab-admin", None)]:
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subj, "-keyout", f"{pki}/{name}.key", "-out", f"{pki}/{name}.csr")
        args = ["x509", "-req", "-in", f"{pki}/{name}.csr", "-CA", f"{pki}/ca.crt", "-CAkey", f"{pki}/ca.key",
                "-CAcreateserial", "-days", "30", "-out", f"{pki}/{name}.crt"]
        if extfile:
            args += ["-extfile", str(extfile)]
        openssl(*args)
    openssl("genrsa", "-out", f"{pki}/sa.key", "2048")
    openssl("rsa", "-in", f"{pki}/sa.key", "-pubout", "-out", f"{pki}/sa.pub")
    kubeconfig(STATE / "admin.kubeconfig", client_cert=(pki / "admin.crt", pki / "admin.key"))
    return pki


def kubeconfig(path, client_cert=None, token=None):
    pki = STATE / "pki"
    user = {"token": token} if token else {"client-certificate": str(client_cert[0]), "client-key": str(client_cert[1])}
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": API, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "u"}}],
    }
    path.write_text(json.dumps(cfg, indent=1))


# ---------------------------------------------------------------- network


ROUTER_NS = "weir-router"
V6_UNDERLAY = "fd00:198:18"


def attach(ns, ifname, ip):
    """Connects namespace `ns` to the underlay bridge of `ip`'s subnet with
    `ip`/24 (198.18.S.x goes on brS). Dual-stack labs add fd00:198:18:S::x/64;
    two-subnet labs route the other subnet through the router namespace."""
    # The underlay side's name: unique per namespace, and per leg for the router.
    peer = f"p-{ns[-9:]}" if ifname == "eth0" else f"p-{ns[-6:]}-{ifname}"
    if ns not in netns_list():
        sh(["ip", "netns", "add", ns])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
    if sh(["ip", "-n", ns, "link", "show", ifname], check=False):
        return
    subnet, host = int(ip.split(".")[2]), int(ip.split(".")[3])
    sh(["ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", peer, "netns", UNDERLAY_NS])
    sh(["ip", "-n", UNDERLAY_NS, "link", "set", peer, "master", f"br{subnet}", "up"])
    sh(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname])
    subnets, dual = lab_shape()
    if dual:
        sh(["ip", "-n", ns, "addr", "add", f"{V6_UNDERLAY}:{subnet}::{host}/64", "dev", ifname, "nodad"])
    sh(["ip", "-n", ns, "link", "set", ifname, "up"])
    if subnets > 1 and ns != ROUTER_NS:
        sh(["ip", "-n", ns, "route", "add", "198.18.0.0/15", "via", f"198.18.{subnet}.1"])
        if dual:
            sh(["ip", "-n", ns, "route", "add", f"{V6_UNDERLAY}::/48", "via", f"{V6_UNDERLAY}:{subnet}::1"])


def ensure_underlay():
    if UNDERLAY_NS not in netns_list():
        sh(["ip", "netns", "add", UNDERLAY_NS])
    subnets, _ = lab_shape()
    for s in range(subnets):
        if not sh(["ip", "-n", UNDERLAY_NS, "link", "show", f"br{s}"], check=False):
            sh(["ip", "-n", UNDERLAY_NS, "link", "add", f"br{s}", "type", "bridge"])
            sh(["ip", "-n", UNDERLAY_NS, "link", "set", f"br{s}", "up"])
    if subnets > 1 and ROUTER_NS not in netns_list():
        # The router's legs are its own: r0 on br0, r1 on br1, each .1.
        for s in range(subnets):
            attach(ROUTER_NS, f"r{s}", f"198.18.{s}.1")
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            sh(["sysctl", "-qw", key], ns=ROUTER_NS)
    attach(CP_NS, "eth0", CP_IP)


# ---------------------------------------------------------------- processes


def pidfile(name):
    return STATE / "pids" / f"{name}.pid"


def running(name):
    p = pidfile(name)
    if not p.exists():
        return None
    pid = int(p.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    # A recycled pid would not be ours.
    try:
        if "WEIR_LAB=1" not in Path(f"/proc/{pid}/environ").read_text(errors="replace"):
            return None
    except OSError:
        return None
    return pid


def wait_for(cond, timeout, what, step=0.5):
    """Polls cond until true; `what` names it in the error, or is a function
    that does (called at the timeout, to say what was seen)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(step)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")


def spawn(name, ns, argv, env=None, cgroup=None):
    """Starts a lab process in namespace `ns`; inside the cgroup directory
    `cgroup` if given, joined before the exec so all the process ever
    allocates is charged there."""
    if running(name):
        return
    (STATE / "pids").mkdir(parents=True, exist_ok=True)
    (STATE / "logs").mkdir(parents=True, exist_ok=True)
    out = open(STATE / "logs" / f"{name}.log", "ab")
    full_env = dict(os.environ, WEIR_LAB="1", **(env or {}))
    prefix = ["ip", "netns", "exec", ns] if ns else []
    if cgroup:
        # `ip netns exec` hides /sys/fs/cgroup, so the cgroup is joined first.
        prefix = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *prefix]
    proc = subprocess.Popen([*prefix, *argv], stdout=out, stderr=subprocess.STDOUT,
                            env=full_env, start_new_session=True)
    pidfile(name).write_text(str(proc.pid))


def stop(name, sig=signal.SIGTERM, wait=10):
    """Signals a lab process and waits until it is gone, escalating to SIGKILL."""
    pid = running(name)
    if not pid:
        return

    def gone(limit):
        deadline = time.time() + limit
        while time.time() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        return False

    try:
        os.kill(pid, sig)
        if not gone(wait):
            log(f"{name} did not exit within {wait}s of signal {int(sig)}; killing it")
            os.kill(pid, signal.SIGKILL)
            gone(10)
    except ProcessLookupError:
        pass
    pidfile(name).unlink(missing_ok=True)


def start_etcd():
    spawn("etcd", CP_NS, [str(BIN / "etcd"), "--data-dir", str(STATE / "etcd"), "--name", "lab",
                         "--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
                         "--listen-peer-urls", "http://127.0.0.1:2380", "--log-level", "warn"])


def start_apiserver(extra_flags=(), authorization="RBAC",
                    admission="NamespaceLifecycle,ServiceAccount,ValidatingAdmissionPolicy"):
    pki = STATE / "pki"
    spawn("apiserver", CP_NS, [
        str(BIN / "kube-apiserver"),
        f"--advertise-address={CP_IP}", f"--bind-address={CP_IP}", "--secure-port=6443",
        "--etcd-servers=http://127.0.0.1:2379",
        f"--tls-cert-file={pki}/server.crt", f"--tls-private-key-file={pki}/server.key",
        f"--client-ca-file={pki}/ca.crt",
        f"--service-account-key-file={pki}/sa.pub", f"--service-account-signing-key-file={pki}/sa.key",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--authorization-mode={authorization}",
        f"--enable-admission-plugins={admission}",
        "--service-cluster-ip-range=10.96.0.0/16",
        "--api-audiences=https://kubernetes.default.svc",
        "--watch-cache=true",
        *extra_flags,
        "--v=1",
    ])


def wait_api(timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run(["ip", "netns", "exec", CP_NS, str(BIN / "kubectl"), "--kubeconfig", str(STATE / "admin.kubeconfig"),
                            "get", "--raw", "/readyz"], capture_output=True, text=True)
        if r.returncode == 0 and "ok" in r.stdout:
            return
        time.sleep(0.5)
    raise RuntimeError(f"kube-apiserver not ready after {timeout}s; see {STATE}/logs/apiserver.log")


def kubectl(*args, input=None, check=True):
    """Runs kubectl as the lab admin, from the control-plane namespace."""
    return sh([str(BIN / "kubectl"), "--kubeconfig", str(STATE / "admin.kubeconfig"), *args],
              ns=CP_NS, input=input, check=check)


# ---------------------------------------------------------------- cluster objects

def apply_access():
    """Applies manifests/ as a user would (RBAC, policy, DaemonSet, Deployment...)."""
    kubectl("apply", "-k", str(ROOT / "manifests"))


def manifest_config():
    """The settings the manifests' ConfigMap hands every container."""
    import re
    text = (ROOT / "manifests" / "kustomization.yaml").read_text()
    return dict(re.findall(r"^\s+- (WEIR_[A-Z0-9_]+)=(\S*)$", text, re.M))


def node_cidr(i):
    """The lab's own allocation, used until weir-controller allocates."""
    import ipaddress
    net = ipaddress.ip_network(CLUSTER_CIDR)
    return str(list(net.subnets(new_prefix=NODE_MASK))[i] if NODE_MASK - net.prefixlen < 16
               else next(s for k, s in enumerate(net.subnets(new_prefix=NODE_MASK)) if k == i))


def create_node(i, ip=None, pod_cidr=None, annotations=None):
    name = f"node-{i}"
    ip = ip or node_ip(i)
    obj = {"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}, "annotations": annotations or {}},
           "spec": {}}
    if pod_cidr:
        obj["spec"] = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]}
    kubectl("apply", "-f", "-", input=json.dumps(obj))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {"status": {
        "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "lab node",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}]}}
    kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))


def agent_token(i):
    """A ServiceAccount token bound to a Pod on node-i, so it carries the node-name claim."""
    pod = f"weir-agent-node-{i}"
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": NS},
           "spec": {"nodeName": f"node-{i}", "serviceAccountName": "weir-agent", "hostNetwork": True,
                    "containers": [{"name": "agent", "image": "weir-agent:lab"}]}}
    kubectl("apply", "-f", "-", input=json.dumps(obj))
    uid = kubectl("get", "pod", "-n", NS, pod, "-o", "jsonpath={.metadata.uid}").strip()
    return kubectl("create", "token", "weir-agent", "-n", NS, "--duration", "48h",
                   "--bound-object-kind", "Pod", "--bound-object-name", pod, "--bound-object-uid", uid).strip()


# ---------------------------------------------------------------- nodes and agents


def node_dir(i):
    return STATE / "nodes" / f"node-{i}"


def agent_env(i, backend="vxlan", mode="full"):
    d = node_dir(i)
    return {
        **manifest_config(),
        "NODE_NAME": f"node-{i}",
        "KUBECONFIG": str(d / "kubeconfig"),
        "WEIR_BACKEND": backend,
        "WEIR_MODE": mode,
        "WEIR_CLUSTER_CIDR": CLUSTER_CIDR,
        "WEIR_CNI_CONF_DIR": str(d / "cni"),
        "WEIR_RUN_DIR": str(d / "run"),
        "WEIR_METRICS_ADDR": "0.0.0.0:9478",
        "WEIR_LOG_FORMAT": "text",
        "RUST_LOG": os.environ.get("RUST_LOG", "info"),
    }


def controller_token():
    return kubectl("create", "token", "weir-controller", "-n", NS, "--duration", "48h").strip()


def start_controllers(replicas=("a", "b")):
    kc = STATE / "controller.kubeconfig"
    if not kc.exists():
        kubeconfig(kc, token=controller_token())
    for k, name in enumerate(replicas):
        spawn(f"controller-{name}", CP_NS, [str(controller_binary())], env={
            **manifest_config(), "WEIR_CLUSTER_CIDR": CLUSTER_CIDR, "WEIR_NODE_CIDR_MASK_SIZE_IPV4": str(NODE_MASK),
            "POD_NAME": f"weir-controller-{name}", "WEIR_LEASE_NAMESPACE": NS, "KUBECONFIG": str(kc),
            "WEIR_METRICS_ADDR": f"127.0.0.1:{9479 + k}", "WEIR_LOG_FORMAT": "text", "WEIR_LEASE_DURATION": "6",
            "RUST_LOG": os.environ.get("RUST_LOG", "info")})


def settings():
    p = STATE / "settings.json"
    return json.loads(p.read_text()) if p.exists() else {"backend": "vxlan", "mode": "full"}


def start_agent(i, extra_env=None, cgroup=None):
    s = settings()
    env = dict(agent_env(i, s["backend"], s["mode"]), **s.get("extra_env", {}), **(extra_env or {}))
    spawn(f"node-{i}", node_ns(i), [str(agent_binary()), "run"], env=env, cgroup=cgroup)


def stat_fields(path):
    """The fields of a /proc/.../stat file from the state on (field 3 is
    index 0): counted after the command name, which may hold spaces and ")"."""
    return open(path).read().rsplit(")", 1)[1].split()


def process_cpu(pid, children=True):
    """User plus system CPU seconds of a process and, unless told not to, of
    the children it has waited for: work an agent hands to a program it runs
    (weir's `nft`, flannel's `iptables`) is the agent's work too."""
    stat = stat_fields(f"/proc/{pid}/stat")
    return sum(int(v) for v in stat[11:15 if children else 13]) / os.sysconf("SC_CLK_TCK")


def process_rss_mb(pid):
    return next(int(ln.split()[1]) for ln in open(f"/proc/{pid}/status") if ln.startswith("VmRSS")) / 1024


def add_node(i, lab_podcidrs=None):
    if lab_podcidrs is None:
        lab_podcidrs = settings().get("lab_podcidrs", False)
    ns = node_ns(i)
    attach(ns, "eth0", node_ip(i))
    sh(["sysctl", "-qw", "net.ipv4.ip_forward=1"], ns=ns)
    create_node(i, pod_cidr=node_cidr(i) if lab_podcidrs else None)
    d = node_dir(i)
    for sub in ("cni", "run"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    kubeconfig(d / "kubeconfig", token=agent_token(i))
    start_agent(i)


def remove_node(i):
    for j in pods_of(i):
        del_pod(i, j)
    stop(f"node-{i}")
    kubectl("delete", "node", f"node-{i}", "--ignore-not-found", "--wait=false")
    kubectl("delete", "pod", "-n", NS, f"weir-agent-node-{i}", "--ignore-not-found", "--wait=false")
    if node_ns(i) in netns_list():
        sh(["ip", "netns", "del", node_ns(i)])
    shutil.rmtree(node_dir(i), ignore_errors=True)


def nodes():
    return sorted(int(n.split("-")[-1]) for n in netns_list() if n.startswith("weir-node-"))


def wait_cni_config(i, timeout=60):
    path = node_dir(i) / "cni" / "10-weir.conflist"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.2)
    raise RuntimeError(f"node-{i}: agent wrote no CNI config in {timeout}s; see {STATE}/logs/node-{i}.log")


# ---------------------------------------------------------------- pods (real CNI plugins)


def cni_call(i, j, command, conflist):
    ns = pod_ns(i, j)
    prev = None
    plugins = conflist["plugins"] if command == "ADD" else list(reversed(conflist["plugins"]))
    for plugin in plugins:
        conf = dict(plugin, cniVersion=conflist["cniVersion"], name=conflist["name"])
        if prev is not None:
            conf["prevResult"] = prev
        env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=f"lab-{i}-{j}", CNI_NETNS=f"/var/run/netns/{ns}",
                   CNI_IFNAME="eth0", CNI_PATH=CNI_BIN)
        r = subprocess.run(["ip", "netns", "exec", node_ns(i), f"{CNI_BIN}/{plugin['type']}"], input=json.dumps(conf),
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"CNI {command} {plugin['type']} for {ns}: {r.stdout}{r.stderr}")
        if command == "ADD" and r.stdout.strip():
            prev = json.loads(r.stdout)
    return prev


def loopback(i, j, command):
    """The pod's lo, brought up by the loopback plugin as a runtime would."""
    conf = json.dumps({"cniVersion": "1.0.0", "name": "lo", "type": "loopback"})
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=f"lab-{i}-{j}", CNI_NETNS=f"/var/run/netns/{pod_ns(i, j)}",
               CNI_IFNAME="lo", CNI_PATH=CNI_BIN)
    r = subprocess.run([f"{CNI_BIN}/loopback"], input=conf, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"CNI {command} loopback for {pod_ns(i, j)}: {r.stdout}{r.stderr}")


def add_pod(i, j):
    ns = pod_ns(i, j)
    if ns in netns_list():
        return
    sh(["ip", "netns", "add", ns])
    loopback(i, j, "ADD")
    result = cni_call(i, j, "ADD", wait_cni_config(i))
    ip = result["ips"][0]["address"].split("/")[0]
    (STATE / "pods").mkdir(parents=True, exist_ok=True)
    (STATE / "pods" / f"{ns}.json").write_text(json.dumps({"ip": ip, "node": i}))


def del_pod(i, j):
    ns = pod_ns(i, j)
    conf = node_dir(i) / "cni" / "10-weir.conflist"
    if conf.exists() and node_ns(i) in netns_list():
        try:
            cni_call(i, j, "DEL", json.loads(conf.read_text()))
            loopback(i, j, "DEL")
        except RuntimeError as e:
            log(f"CNI DEL {ns}: {e}")
    if ns in netns_list():
        sh(["ip", "netns", "del", ns])
    (STATE / "pods" / f"{ns}.json").unlink(missing_ok=True)


def pods_of(i):
    return sorted(int(n.split("-")[-1]) for n in netns_list() if n.startswith(f"weir-pod-{i}-"))


def pods():
    out = {}
    for f in sorted((STATE / "pods").glob("*.json")) if (STATE / "pods").exists() else []:
        out[f.stem] = json.loads(f.read_text())["ip"]
    return out


def ping(src_ns, ip, count=1, interval=0.2, wait=1):
    r = subprocess.run(["ip", "netns", "exec", src_ns, "ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait), ip],
                       capture_output=True, text=True)
    return parse_ping(r.stdout)


def parse_ping(stdout):
    """(sent, received, average RTT in ms or None) from iputils' or busybox's summary."""
    sent = recv = 0
    rtt = None
    for line in stdout.splitlines():
        if "packets transmitted" in line:
            parts = line.split(",")
            sent = int(parts[0].split()[0])
            recv = int(parts[1].split()[0])
        if line.startswith("rtt") or line.startswith("round-trip"):
            rtt = float(line.split("=")[1].split("/")[1])
    return sent, recv, rtt


def ping_matrix(count=3, pods_=None, ping_=None):
    """(src, dst, ip, sent, received, rtt) for every ordered pair of pods."""
    p = pods_ if pods_ is not None else pods()
    rows = []
    for src in p:
        for dst, ip in p.items():
            if src != dst:
                sent, recv, rtt = (ping_ or ping)(src, ip, count=count)
                rows.append((src, dst, ip, sent, recv, rtt))
    return rows


def wait_all_pairs(timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = ping_matrix(count=1)
        bad = [r for r in rows if r[4] == 0]
        if not bad:
            return rows
        time.sleep(1)
    raise RuntimeError(f"pods cannot reach each other after {timeout}s: {[(r[0], r[1]) for r in bad][:10]}")


# ---------------------------------------------------------------- whole lab


def up(n_nodes=3, pods_per_node=2, backend="vxlan", mode="full", lab_podcidrs=False):
    if os.geteuid() != 0:
        raise SystemExit("the lab needs root (it creates network namespaces)")
    ensure_packages()
    ensure_control_plane_binaries()
    ensure_weir_built()
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / "settings.json").write_text(json.dumps({"backend": backend, "mode": mode, "lab_podcidrs": lab_podcidrs}))
    ensure_pki()
    ensure_underlay()
    start_etcd()
    start_apiserver()
    wait_api()
    apply_access()
    start_controllers()
    for i in range(1, n_nodes + 1):
        if not running(f"node-{i}"):
            add_node(i, lab_podcidrs)
    for i in range(1, n_nodes + 1):
        for j in range(1, pods_per_node + 1):
            add_pod(i, j)
    rows = wait_all_pairs()
    return rows


def down():
    for i in nodes():
        for j in pods_of(i):
            del_pod(i, j)
        stop(f"node-{i}")
    # Every other process a lab started, whichever lab: etcd last.
    pids = sorted(p.stem for p in (STATE / "pids").glob("*.pid")) if (STATE / "pids").exists() else []
    for name in [n for n in pids if n != "etcd"] + ["etcd"]:
        stop(name)
    for ns in netns_list():
        if ns.startswith("weir-"):
            sh(["ip", "netns", "del", ns], check=False)
    if STATE.exists():
        shutil.rmtree(STATE, ignore_errors=True)


NSCLIENT = E2E / "nsclient.py"


def ns_get(ns, url, body=None):
    """(status, body) of a GET (a POST with `body`) from inside namespace ns."""
    argv = ["python3", str(NSCLIENT), "post" if body is not None else "get", url]
    out = json.loads(sh(argv, ns=ns, input=body if body is not None else ""))
    return out["status"], out["body"]


def api_request(kubeconfig_path, method, path, body=None, content_type="application/merge-patch+json"):
    """A raw API request with a kubeconfig's token, from the control-plane namespace
    (kubectl patch first GETs the object, which the agent's RBAC does not allow)."""
    token = json.loads(Path(kubeconfig_path).read_text())["users"][0]["user"]["token"]
    argv = ["python3", str(NSCLIENT), "api", method, path, "--token", token, "--ctype", content_type]
    out = json.loads(sh(argv, ns=CP_NS, input=json.dumps(body) if body is not None else ""))
    return out["status"], out["body"]


def set_mode(mode, extra_env=None, nodes_=None):
    """Restarts the agents in another mode (the device is recreated: l2miss/l3miss differ)."""
    s = settings()
    s["mode"] = mode
    s["extra_env"] = extra_env or {}
    (STATE / "settings.json").write_text(json.dumps(s))
    for i in nodes_ or nodes():
        stop(f"node-{i}")
        start_agent(i)
