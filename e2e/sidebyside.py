"""weir and flannel side by side in the bench lab (e2e/proclab.py), for
bench_flannel.py's figures and e2e/flannel's replay of flannel's holes.

Both agents run as processes, as their DaemonSets run them: weir's with the
DaemonSet's environment (firewall on), flannel with --kube-subnet-mgr and
--ip-masq. weir runs on the odd-numbered nodes, flannel on the even ones,
on one API server; fake Nodes carry both agents' annotations
(bench_load.fake_node), so both program the same peers.
"""

import json
import shutil
import subprocess
from dataclasses import dataclass

import proclab as lab
from bench import count_lines, wait_count
from bench import routes as weir_routes

FLANNEL_VERSION = "v0.28.10"
FLANNELD = lab.BIN / "flanneld"
CLUSTER_CIDR = "10.0.0.0/8"
FLANNEL_HEALTHZ_PORT = 9480


def ensure_flannel():
    """flanneld from its module's source on the Go module proxy. `go install`
    fails: its tencentvpc backend needs SDK versions the proxy does not
    serve, so that one backend's import is dropped from a copy of the source
    in the cache (no other change; the vxlan backend is untouched)."""
    if FLANNELD.exists():
        return
    lab.log(f"building flannel {FLANNEL_VERSION} from the Go module proxy (~1.5 min)")
    lab.CACHE.mkdir(parents=True, exist_ok=True)
    info = json.loads(subprocess.run(["go", "mod", "download", "-json", f"github.com/flannel-io/flannel@{FLANNEL_VERSION}"],
                                     capture_output=True, text=True, check=True, cwd=lab.CACHE).stdout)
    src = lab.CACHE / "flannel-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(info["Dir"], src)
    subprocess.run(["chmod", "-R", "u+w", str(src)], check=True)
    main = src / "main.go"
    main.write_text("".join(ln for ln in main.read_text().splitlines(keepends=True) if "backend/tencentvpc" not in ln))
    subprocess.run(["go", "build", "-o", str(FLANNELD), "."], cwd=src, check=True)


def flannel_argv(i):
    """flanneld on node i, as its DaemonSet runs it."""
    d = lab.node_dir(i)
    d.mkdir(parents=True, exist_ok=True)
    (d / "net-conf.json").write_text(json.dumps({"Network": CLUSTER_CIDR, "Backend": {"Type": "vxlan"}}))
    return [str(FLANNELD), "--kube-subnet-mgr", f"--kubeconfig-file={lab.STATE / 'admin.kubeconfig'}", "--iface=eth0",
            f"--net-config-path={d / 'net-conf.json'}", f"--subnet-file={d / 'subnet.env'}", "--ip-masq",
            f"--healthz-port={FLANNEL_HEALTHZ_PORT}"]


def start_flannel(i, cgroup=None):
    lab.spawn(f"flannel-{i}", lab.node_ns(i), flannel_argv(i), env={"NODE_NAME": f"node-{i}"}, cgroup=cgroup)


def start_kind(kind, i, cgroup=None):
    """Starts the agent of `kind` ("weir" or "flannel") on node i."""
    if kind == "weir":
        lab.start_agent(i, cgroup=cgroup)
    else:
        start_flannel(i, cgroup=cgroup)


def add_flannel_node(i):
    """A node namespace whose agent is flannel (no weir agent)."""
    ns = lab.node_ns(i)
    lab.attach(ns, "eth0", lab.node_ip(i))
    lab.sh(["sysctl", "-qw", "net.ipv4.ip_forward=1"], ns=ns)
    lab.create_node(i, pod_cidr=lab.node_cidr(i))
    start_flannel(i)


def flannel_routes(i):
    return count_lines(["ip", "-n", lab.node_ns(i), "route", "show", "dev", "flannel.1"])


def up(n_each=1):
    """The bench lab with n_each weir nodes (odd numbers) and n_each flannel
    nodes (even numbers). Each agent's peers of its own kind are in when
    this returns (the other kind's Nodes lack its annotations)."""
    ensure_flannel()
    lab.down()
    lab.CLUSTER_CIDR = CLUSTER_CIDR
    lab.PROFILE = "release"
    lab.ensure_weir_built()
    lab.up(n_nodes=0, pods_per_node=0, lab_podcidrs=True)
    for k in range(n_each):
        lab.add_node(2 * k + 1, lab_podcidrs=True)
        add_flannel_node(2 * k + 2)
    wait_count(lambda: weir_routes(1), n_each - 1, "weir's lab peers")
    wait_count(lambda: flannel_routes(2), n_each - 1, "flannel's lab peers")
    return 2 * n_each


@dataclass
class Agent:
    """One kind of agent as the holes replay sees it: `node` is where it is
    observed, `peer` another node of its kind."""
    kind: str
    node: int
    peer: int
    device: str
    process: str

    @property
    def ns(self):
        return lab.node_ns(self.node)

    def routes(self):
        return weir_routes(self.node) if self.kind == "weir" else flannel_routes(self.node)

    def has_route(self, cidr):
        return bool(lab.sh(["ip", "-n", self.ns, "route", "show", cidr, "dev", self.device], check=False).strip())

    def has_fdb(self, mac, dst=None):
        out = lab.sh(["bridge", "-n", self.ns, "fdb", "show", "dev", self.device], check=False)
        return any(ln.startswith(mac) and (dst is None or f"dst {dst}" in ln) for ln in out.splitlines())

    def has_neigh(self, ip):
        out = lab.sh(["ip", "-n", self.ns, "neigh", "show", ip, "dev", self.device], check=False)
        return "lladdr" in out

    def running(self):
        return bool(lab.running(self.process))

    def stop(self):
        lab.stop(self.process)

    def start(self, cgroup=None):
        """Starts the agent, inside the cgroup directory `cgroup` if given."""
        start_kind(self.kind, self.node, cgroup)

    def rx_packets(self):
        link = json.loads(lab.sh(["ip", "-n", self.ns, "-j", "-s", "link", "show", self.device]))[0]
        return link["stats64"]["rx"]["packets"]

    def vtep_mac(self):
        return json.loads(lab.sh(["ip", "-n", self.ns, "-j", "link", "show", self.device]))[0]["address"]


WEIR = Agent("weir", node=1, peer=3, device="weir.1", process="node-1")
FLANNEL = Agent("flannel", node=2, peer=4, device="flannel.1", process="flannel-2")
