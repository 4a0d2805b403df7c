"""weir-controller against the real API server: allocation, reuse, takeover, exhaustion, dual-stack."""

import ipaddress
import json
import time

import pytest

import lablib as lab


def make_nodes(names, pod_cidr=None):
    items = []
    for n in names:
        obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": n, "labels": {"weir-test": "fake"}}}
        if pod_cidr:
            obj["spec"] = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]}
        items.append(obj)
    lab.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def all_nodes():
    return {n["metadata"]["name"]: n.get("spec", {}).get("podCIDRs", [])
            for n in json.loads(lab.kubectl("get", "nodes", "-o", "json"))["items"]}


def assert_no_double_allocation():
    seen = []
    for name, cidrs in all_nodes().items():
        for c in cidrs:
            net = ipaddress.ip_network(c)
            clash = [o for o, on in seen if on.overlaps(net)]
            assert not clash, f"{name} {c} overlaps {clash}"
            seen.append((name, net))


def wait_allocated(names, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        nodes = all_nodes()
        if all(nodes.get(n) for n in names):
            return {n: nodes[n] for n in names}
        time.sleep(0.2)
    missing = [n for n in names if not all_nodes().get(n)]
    raise AssertionError(f"not allocated after {timeout}s: {missing[:10]}")


def controller_metric(name):
    """The sum of a series over every controller pod (hostNetwork, so at its node's address)."""
    out = ""
    for p in lab.pods_in(lab.NS, lab.CONTROLLER_SELECTOR):
        if p["status"].get("hostIP") and p["status"].get("phase") == "Running":
            out += lab.ns_get(lab.CP_NS, f"http://{p['status']['hostIP']}:9479/metrics")[1]
    total = 0.0
    for line in out.splitlines():
        if line.startswith(name):
            total += float(line.split()[-1])
    return total


@pytest.fixture
def fakes(cluster):
    yield
    lab.kubectl("delete", "nodes", "-l", "weir-test=fake", "--wait=false")
    deadline = time.time() + 30
    while time.time() < deadline and any(n.startswith("fake-") for n in all_nodes()):
        time.sleep(0.2)


def test_fifty_nodes_at_once_get_distinct_cidrs(fakes):
    names = [f"fake-{k:03d}" for k in range(50)]
    make_nodes(names)
    got = wait_allocated(names)
    assert len({c[0] for c in got.values()}) == 50
    assert_no_double_allocation()


def test_deleted_node_space_is_reused(fakes):
    make_nodes(["fake-a", "fake-b", "fake-c"])
    got = wait_allocated(["fake-a", "fake-b", "fake-c"])
    freed = got["fake-b"][0]
    lab.kubectl("delete", "node", "fake-b")
    time.sleep(1)
    make_nodes(["fake-d"])
    assert wait_allocated(["fake-d"])["fake-d"][0] == freed, "lowest free CIDR is the one just released"


def leader():
    return lab.kubectl("get", "lease", "-n", lab.NS, "weir-controller", "-o", "jsonpath={.spec.holderIdentity}").strip()


def wait_controllers():
    lab.kubectl("rollout", "status", "-n", lab.NS, "deploy/weir-controller", "--timeout=120s")


def test_leader_killed_mid_burst_never_allocates_twice(fakes):
    old = leader()
    names = [f"fake-burst-{k:03d}" for k in range(60)]
    make_nodes(names[:30])
    time.sleep(0.3)
    # The leader dies at once (SIGKILL to its container) and its pod is gone
    # for good, as when its node fails: the Deployment replaces it.
    cid, node = lab.container_id(old, lab.NS)
    lab.kill_container(int(node.split("-")[-1]), cid)
    lab.kubectl("delete", "pod", "-n", lab.NS, old, "--force", "--grace-period=0", check=False)
    make_nodes(names[30:])
    try:
        # Whoever leads now: usually the other replica. In one CI run the
        # killed pod's name still held the Lease once all 60 were allocated:
        # the kubelet can restart the container before the forced deletion
        # reaches it, and the restarted process resumes its unexpired Lease.
        wait_allocated(names, timeout=60)
        assert_no_double_allocation()
    finally:
        wait_controllers()


def test_preset_pod_cidrs_are_respected(fakes):
    make_nodes(["fake-preset"], pod_cidr="10.244.200.0/24")
    names = [f"fake-p-{k}" for k in range(5)]
    make_nodes(names)
    wait_allocated(names)
    assert all_nodes()["fake-preset"] == ["10.244.200.0/24"]
    assert_no_double_allocation()


def test_pool_exhaustion_is_reported_and_recovers(fakes):
    used = sum(len(c) for c in all_nodes().values())
    fill = [f"fake-fill-{k:03d}" for k in range(256 - used)]
    make_nodes(fill)
    wait_allocated(fill, timeout=120)
    before = controller_metric("weir_controller_pool_exhausted_total")
    make_nodes(["fake-starved"])
    deadline = time.time() + 20
    while time.time() < deadline:
        events = lab.kubectl("get", "events", "-A", "--field-selector", "involvedObject.name=fake-starved", "-o", "json")
        if "PodCIDRPoolExhausted" in events:
            break
        time.sleep(0.3)
    else:
        raise AssertionError("no PodCIDRPoolExhausted event")
    after = controller_metric("weir_controller_pool_exhausted_total")
    assert after > before
    assert not all_nodes()["fake-starved"]
    lab.kubectl("delete", "node", fill[0])
    wait_allocated(["fake-starved"], timeout=30)
    assert_no_double_allocation()


def test_dual_stack_allocation(fakes):
    # A dual-stack weir-controller, as a process beside the cluster, while
    # the Deployment's replicas are scaled away.
    lab.kubectl("scale", "-n", lab.NS, "deploy/weir-controller", "--replicas=0")
    lab.wait_for(lambda: not lab.pods_in(lab.NS, lab.CONTROLLER_SELECTOR), 60, "controller pods gone")
    kc = lab.STATE / "controller.kubeconfig"
    token = lab.kubectl("create", "token", "weir-controller", "-n", lab.NS, "--duration", "1h").strip()
    lab.kubeconfig(kc, token=token)
    lab.spawn("controller-ds", lab.CP_NS, [str(lab.ROOT / "target" / "release" / "weir-controller")], env={
        "WEIR_CLUSTER_CIDR": f"{lab.CLUSTER_CIDR},fd00:10:244::/56", "KUBECONFIG": str(kc), "POD_NAME": "weir-controller-ds",
        "WEIR_LEASE_NAMESPACE": lab.NS, "WEIR_LEASE_NAME": "weir-controller-ds", "WEIR_METRICS_ADDR": "127.0.0.1:9489"})
    try:
        make_nodes(["fake-ds"])
        cidrs = wait_allocated(["fake-ds"])["fake-ds"]
        fams = sorted(ipaddress.ip_network(c).version for c in cidrs)
        assert fams == [4, 6], cidrs
        assert ipaddress.ip_network(cidrs[1]).prefixlen == 64
        assert_no_double_allocation()
    finally:
        lab.stop("controller-ds")
        lab.kubectl("scale", "-n", lab.NS, "deploy/weir-controller", "--replicas=2")
        wait_controllers()


def test_a_shared_vtep_mac_raises_an_event_on_the_younger_node_while_the_leader_holds(fakes):
    """Conflicts are found as they appear, not only when a leader (re)lists,
    and `kubectl describe node` shows why the Node is ignored."""
    # Fresh names: an Event outlives its Node, and an earlier run's would match.
    run = int(time.time()) % 100000
    old, young = f"fake-mac-old-{run}", f"fake-mac-young-{run}"
    before = controller_metric('weir_controller_conflicts{kind="vtep-mac"}')
    for name in (old, young):
        make_nodes([name])
        lab.kubectl("annotate", "node", name, "--overwrite", "weir.dev/backend=vxlan",
                    "weir.dev/vtep-mac=0e:00:00:00:77:77", f"weir.dev/public-ip=198.18.0.{77 if name == old else 78}")
        time.sleep(1.1)  # creation times are in seconds; the older Node must be older

    def events(name):
        return lab.kubectl("describe", "node", name).split("Events:")[-1]
    deadline = time.time() + 15
    while time.time() < deadline and not ("WeirPeerRejected" in events(young) and
                                          controller_metric('weir_controller_conflicts{kind="vtep-mac"}') > before):
        time.sleep(0.5)
    shown = events(young)
    assert "WeirPeerRejected" in shown and "weir.dev/vtep-mac" in shown and old in shown, shown
    assert controller_metric('weir_controller_conflicts{kind="vtep-mac"}') >= before + 1
    assert "WeirPeerRejected" not in events(old), "the older Node keeps its MAC and gets no Event"


def lease_json():
    return json.loads(lab.kubectl("get", "lease", "-n", lab.NS, "weir-controller", "-o", "json"))


def test_reservations_of_a_leader_that_died_mid_batch_hold_for_the_next(fakes):
    """A leader writes the CIDRs it is about to hand out on the Lease first.
    One that dies with a patch in flight leaves them there, and its
    successor keeps them off the market."""
    make_nodes(["fake-probe"])
    reserved = wait_allocated(["fake-probe"])["fake-probe"][0]
    lab.kubectl("delete", "node", "fake-probe")
    time.sleep(1)  # now `reserved` is the lowest free CIDR: the next one handed out
    pending = [{"node": "fake-ghost", "cidrs": [reserved], "until": int(time.time()) + 120}]
    lab.kubectl("annotate", "lease", "-n", lab.NS, "weir-controller", "--overwrite",
                f"weir.dev/pending-allocations={json.dumps(pending)}")
    old = leader()
    cid, node = lab.container_id(old, lab.NS)
    lab.kill_container(int(node.split("-")[-1]), cid)
    lab.kubectl("delete", "pod", "-n", lab.NS, old, "--force", "--grace-period=0", check=False)
    try:
        lab.wait_for(lambda: leader() not in ("", old), 60, "another replica holding the Lease")
        make_nodes(["fake-next"])
        got = wait_allocated(["fake-next"], timeout=60)["fake-next"][0]
        assert got != reserved, f"{reserved} was reserved by the previous leader and handed out again"
    finally:
        wait_controllers()


def test_after_an_outage_longer_than_the_lease_a_burst_is_allocated_once(fakes):
    """Both replicas alive through an API server outage: the leader cut off
    stops allocating at its renew deadline, before the Lease can pass."""
    lab.stop("apiserver")
    try:
        time.sleep(25)  # past the Lease's 15 s
    finally:
        lab.start_apiserver()
        lab.wait_api()
    names = [f"fake-outage-{k:02d}" for k in range(30)]
    make_nodes(names)
    wait_allocated(names, timeout=120)
    assert_no_double_allocation()
    lab.wait_for(lambda: not [p for p in reservations() if p["node"] in names], 30,
                 "this burst's reservations cleared once every patch's outcome was known")


def test_a_node_refused_for_a_stale_lease_is_allocated_once_the_lease_is_renewed(fakes):
    """The leader checks the Lease itself before each batch, and refuses to
    allocate when it was renewed longer ago than the renew deadline (10 s of
    15 s). The Node it refused is tried again every second, not at the next
    unrelated Node event: after an API server outage, 30 Nodes waited more
    than 120 s that way (e2e/bench_controller.py). Rewriting renewTime by
    hand sometimes makes the holder's Lease manager stop renewing until the
    Lease expires, so the Node may also be allocated by the other replica
    taking over; either way it must be, once, within the Lease's lifetime."""
    stale = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(time.time() - 11))
    lab.kubectl("patch", "lease", "-n", lab.NS, "weir-controller", "--type=merge",
                "-p", json.dumps({"spec": {"renewTime": stale}}))
    make_nodes(["fake-stale-lease"])
    wait_allocated(["fake-stale-lease"], timeout=30)
    assert_no_double_allocation()
    wait_controllers()


def reservations():
    """What the Lease reserves now (an earlier test's may still be live)."""
    text = lease_json()["metadata"].get("annotations", {}).get("weir.dev/pending-allocations")
    return json.loads(text) if text else []
