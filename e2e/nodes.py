"""Real Kubernetes nodes in network namespaces: containerd, runc, kubelet and
kube-proxy per node, each node with its own mount namespace and cgroup root.

How a node is entered: a holder process (`sleep infinity`) is started with
`nsenter --net` into the node's network namespace and `unshare --mount --uts`,
and bind-mounts the node's own directories over the paths a node's daemons
use. Every daemon then joins the holder's namespaces with `nsenter -t`.
`ip netns exec` is not used: it remounts /sys, which hides /sys/fs/cgroup
from runc.

Nothing on the host changes. The host gets only empty mount points that did
not exist (removed again by `teardown_host`), cgroup directories named
weir-node-<i> (removed by `remove_cgroups`), and no sysctl: kubelet runs with
protectKernelDefaults and sees, inside its mount namespace, files holding the
values it checks for, bind-mounted over the host's.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

# Paths a node's daemons write, each bind-mounted from the node's own
# directory. A hostPath in a pod resolves to these, as on a real node.
NODE_PATHS = ["/etc/cni/net.d", "/var/lib/cni", "/var/lib/kubelet", "/var/lib/containerd", "/run/containerd",
              "/var/log/pods", "/var/log/containers", "/run/weir"]

# What kubelet's protectKernelDefaults insists on.
KERNEL_DEFAULTS = {"vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10",
                   "kernel/panic_on_oops": "1", "kernel/keys/root_maxkeys": "1000000",
                   "kernel/keys/root_maxbytes": "25000000"}

CGROUP_ROOT = Path("/sys/fs/cgroup")
CTR_SOCK = "/run/containerd/containerd.sock"


def cgroup_name(i):
    return f"weir-node-{i}"


# ---------------------------------------------------------------- host paths


def ensure_host_mountpoints(record):
    """Creates the mount points that do not exist, recording each directory
    created so that teardown removes exactly those."""
    created = json.loads(record.read_text()) if record.exists() else []
    for path in NODE_PATHS:
        missing = []
        p = Path(path)
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            created.append(str(d))
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(created))


def teardown_host(record):
    if not record.exists():
        return
    for d in reversed(json.loads(record.read_text())):
        try:
            os.rmdir(d)
        except OSError:
            pass
    record.unlink()


# ---------------------------------------------------------------- cgroups


def v1_hierarchies():
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, mountpoint = fields[sep + 1], fields[4]
        if fstype in ("cgroup", "cgroup2") and mountpoint.startswith(str(CGROUP_ROOT) + "/"):
            out.append(Path(mountpoint))
    return out


def ensure_cgroups(i):
    """kubelet's cgroupRoot must exist in every hierarchy; cpuset needs its
    cpus and mems filled in before a task can join."""
    for h in v1_hierarchies():
        d = h / cgroup_name(i)
        d.mkdir(exist_ok=True)
        if h.name == "cpuset":
            for f in ("cpuset.cpus", "cpuset.mems"):
                (d / f).write_text((h / f).read_text())


def cgroup_nodes():
    """The node numbers that still have a cgroup root."""
    return sorted({int(d.name.rsplit("-", 1)[1]) for h in v1_hierarchies() for d in h.glob("weir-node-*")})


def cgroup_pids(i):
    pids = set()
    for h in v1_hierarchies():
        root = h / cgroup_name(i)
        if root.exists():
            for procs in root.rglob("cgroup.procs"):
                try:
                    pids.update(int(p) for p in procs.read_text().split())
                except OSError:
                    pass
    return pids


def remove_cgroups(i):
    for _ in range(50):
        pids = cgroup_pids(i)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids:
            break
        time.sleep(0.1)
    for h in v1_hierarchies():
        root = h / cgroup_name(i)
        if not root.exists():
            continue
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            root.rmdir()
        except OSError:
            pass


# ---------------------------------------------------------------- the node's namespaces


def holder_script(i, node_dir):
    mounts = []
    for path in NODE_PATHS:
        src = node_dir / "fs" / path.strip("/").replace("/", "-")
        src.mkdir(parents=True, exist_ok=True)
        mounts.append(f"mount --bind {src} {path}")
    kd = node_dir / "kernel-defaults"
    kd.mkdir(parents=True, exist_ok=True)
    for key, value in KERNEL_DEFAULTS.items():
        f = kd / key.replace("/", ".")
        f.write_text(value + "\n")
        mounts.append(f"mount --bind {f} /proc/sys/{key}")
    return "set -e\nhostname node-%d\n%s\nexec sleep infinity\n" % (i, "\n".join(mounts))


def enter(holder_pid):
    """The argv prefix that runs a command inside a node."""
    return ["nsenter", "-t", str(holder_pid), "--net", "--mount", "--uts", "--"]


def ctr(holder_pid, *args, check=True):
    r = subprocess.run([*enter(holder_pid), "ctr", "-n", "k8s.io", "-a", CTR_SOCK, *args],
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)}: {r.stderr}")
    return r.stdout


def task_pids(holder_pid):
    """Container id -> pid of its init process, from containerd."""
    out = ctr(holder_pid, "task", "ls", check=False)
    pids = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            pids[parts[0]] = int(parts[1])
    return pids


# ---------------------------------------------------------------- configuration files


def containerd_config(node_dir):
    cfg = node_dir / "containerd.toml"
    cfg.write_text(f"""version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.internal.v1.tracing", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{CTR_SOCK}"
[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10.1"
  # This machine withholds the right to lower a process's OOM score; without
  # this every sandbox fails in runc with "can't get final child's PID".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
""")
    return cfg


def kubelet_config(i, ip, node_dir, pki, cluster_dns=None):
    cfg = node_dir / "kubelet.yaml"
    cfg.write_text(json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": ip, "port": 10250, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki / f"kubelet-node-{i}.crt"), "tlsPrivateKeyFile": str(pki / f"kubelet-node-{i}.key"),
        "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{cgroup_name(i)}", "failCgroupV1": False, "failSwapOn": False,
        # Never rewrite the machine's kernel settings; the node's mount
        # namespace shows kubelet the values it checks for.
        "protectKernelDefaults": True,
        "containerRuntimeEndpoint": f"unix://{CTR_SOCK}",
        "resolvConf": "", "clusterDomain": "cluster.local",
        **({"clusterDNS": [cluster_dns]} if cluster_dns else {}),
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "syncFrequency": "10s", "fileCheckFrequency": "10s",
    }, indent=1))
    return cfg


def kube_proxy_config(i, node_dir, kubeconfig, cluster_cidr):
    cfg = node_dir / "kube-proxy.yaml"
    cfg.write_text(json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": f"node-{i}", "mode": "iptables", "clusterCIDR": cluster_cidr,
        # 0 leaves the machine-wide conntrack sysctls alone.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "metricsBindAddress": "127.0.0.1:10249", "healthzBindAddress": "127.0.0.1:10256",
    }, indent=1))
    return cfg
