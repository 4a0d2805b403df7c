"""What weir's ServiceAccount tokens can and cannot do, through the real API
server, and the pods' security settings on the real nodes. The README's
threat model points here."""

import base64
import json
import subprocess
import time
from pathlib import Path

import pytest

import lablib as lab
from test_lab import wait

SNAPSHOTS = Path(__file__).resolve().parent / "security"
AGENT_USER = "system:serviceaccount:weir-system:weir-agent"
STRATEGIC = "application/strategic-merge-patch+json"


def node(name):
    return json.loads(lab.kubectl("get", "node", name, "-o", "json"))


def patch(kc, name, body, subresource="/status"):
    return lab.api_request(kc, "PATCH", f"/api/v1/nodes/{name}{subresource}", body, content_type=STRATEGIC)


@pytest.fixture(scope="module")
def agent_kc(cluster):
    """A token bound to node-1's agent pod: it carries the node-name claim."""
    return lab.agent_kubeconfig(1)


# What a compromised agent on node-1 would try on its own Node, and the field
# the denial must name. Each is a strategic merge patch of nodes/status.
DENIED = [
    ("a label", lambda n: {"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}}, "metadata.labels"),
    ("another annotation", lambda n: {"metadata": {"annotations": {"example.com/x": "y"}}},
     "metadata.annotations[example.com/x]"),
    ("a kubelet annotation removed",
     lambda n: {"metadata": {"annotations": {"volumes.kubernetes.io/controller-managed-attach-detach": None}}},
     "metadata.annotations[volumes.kubernetes.io/controller-managed-attach-detach]"),
    ("owner references", lambda n: {"metadata": {"ownerReferences": [
        {"apiVersion": "v1", "kind": "Node", "name": "node-2", "uid": node("node-2")["metadata"]["uid"]}]}},
     "metadata.ownerReferences"),
    ("finalizers", lambda n: {"metadata": {"finalizers": ["example.com/hold"]}}, "metadata.finalizers"),
    ("another node's address", lambda n: {"status": {"addresses": [{"type": "InternalIP", "address": lab.node_ip(2)}]}},
     "status.addresses"),
    ("capacity", lambda n: {"status": {"capacity": {"pods": "1000"}}}, "status.capacity"),
    ("allocatable", lambda n: {"status": {"allocatable": {"pods": "1000"}}}, "status.allocatable"),
    ("nodeInfo", lambda n: {"status": {"nodeInfo": {"kubeletVersion": "v9.9.9"}}}, "status.nodeInfo"),
    ("the Ready condition", lambda n: {"status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "Forged", "message": "forged"}]}}, "status.conditions[Ready]"),
    ("daemonEndpoints", lambda n: {"status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": 1}}}},
     "status.daemonEndpoints"),
]


@pytest.mark.parametrize("what,body,field", DENIED, ids=[d[0] for d in DENIED])
def test_agent_token_may_not_change_other_fields_of_its_own_node(agent_kc, what, body, field):
    before = node("node-1")
    status, answer = patch(agent_kc, "node-1", body(before))
    assert status == 403, f"{what}: {status} {answer}"
    assert "weir-agent-own-node" in answer and field in answer, answer
    after = node("node-1")
    for part in ("labels", "annotations", "ownerReferences", "finalizers"):
        assert after["metadata"].get(part) == before["metadata"].get(part), f"{what} landed in metadata.{part}"
    for part in ("addresses", "capacity", "allocatable", "nodeInfo", "daemonEndpoints"):
        assert after["status"].get(part) == before["status"].get(part), f"{what} landed in status.{part}"


def test_agent_token_may_change_weir_annotations_and_network_unavailable(agent_kc):
    status, answer = patch(agent_kc, "node-1", {"metadata": {"annotations": {"weir.dev/probe": "ok"}}})
    assert status == 200, answer
    status, answer = patch(agent_kc, "node-1", {"metadata": {"annotations": {"weir.dev/probe": None}}})
    assert status == 200, answer
    assert "weir.dev/probe" not in node("node-1")["metadata"]["annotations"]
    cond = {"type": "NetworkUnavailable", "status": "False", "reason": "WeirIsUp", "message": "probed by the test"}
    status, answer = patch(agent_kc, "node-1", {"status": {"conditions": [cond]}})
    assert status == 200, answer
    got = {c["type"]: c for c in node("node-1")["status"]["conditions"]}["NetworkUnavailable"]
    assert got["message"] == "probed by the test"


def test_agent_token_may_not_touch_another_node_or_the_node_spec(agent_kc):
    status, answer = patch(agent_kc, "node-2", {"metadata": {"annotations": {"weir.dev/vtep-mac": "0e:00:00:00:66:66"}}})
    assert status == 403 and "may not change Node node-2" in answer, answer
    taint = {"spec": {"taints": [{"key": "example.com/evil", "effect": "NoSchedule"}]}}
    status, answer = patch(agent_kc, "node-1", taint, subresource="")
    assert status == 403, f"RBAC lets the agent patch the Node itself: {answer}"
    # Through nodes/status the API server drops spec changes before admission.
    patch(agent_kc, "node-1", taint)
    assert not node("node-1")["spec"].get("taints"), "a taint landed through nodes/status"


def legacy_token():
    """An old-style Secret token for weir-agent: no node-name claim."""
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
              "metadata": {"name": "weir-agent-legacy", "namespace": lab.NS,
                           "annotations": {"kubernetes.io/service-account.name": "weir-agent"}}}
    lab.kubectl("apply", "-f", "-", input=json.dumps(secret))
    wait(lambda: lab.kubectl("get", "secret", "-n", lab.NS, "weir-agent-legacy", "-o", "jsonpath={.data.token}").strip(),
         30, "the token controller filling the legacy Secret")
    return base64.b64decode(lab.kubectl("get", "secret", "-n", lab.NS, "weir-agent-legacy", "-o",
                                        "jsonpath={.data.token}")).decode()


def test_tokens_without_the_node_claim_may_change_nothing(cluster):
    unbound = lab.kubectl("create", "token", "weir-agent", "-n", lab.NS, "--duration", "10m").strip()
    try:
        for kind, token in (("legacy Secret", legacy_token()), ("unbound TokenRequest", unbound)):
            kc = lab.STATE / "agent-unbound.kubeconfig"
            lab.kubeconfig(kc, token=token)
            status, answer = patch(kc, "node-1", {"metadata": {"annotations": {"weir.dev/probe": "ok"}}})
            assert status == 403 and "no node-name claim" in answer, f"{kind}: {status} {answer}"
    finally:
        lab.kubectl("delete", "secret", "-n", lab.NS, "weir-agent-legacy", "--ignore-not-found")


@pytest.fixture
def controller_kc(cluster):
    token = lab.kubectl("create", "token", "weir-controller", "-n", lab.NS, "--duration", "10m").strip()
    kc = lab.STATE / "controller-probe.kubeconfig"
    lab.kubeconfig(kc, token=token)
    lab.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "fake-security", "labels": {"weir-test": "fake"}},
         "spec": {"taints": [{"key": "example.com/fake", "effect": "NoSchedule"}]}}))
    yield kc
    lab.kubectl("delete", "node", "fake-security", "--ignore-not-found", "--wait=false")


def test_controller_token_may_change_only_pod_cidrs(controller_kc):
    # The allowed change: the running weir-controller's own patch passes the policy.
    wait(lambda: node("fake-security")["spec"].get("podCIDRs"), 30, "weir-controller allocating fake-security")
    for body, field in (({"metadata": {"labels": {"example.com/x": "y"}}}, "metadata.labels"),
                        ({"metadata": {"annotations": {"weir.dev/vtep-mac": "0e:00:00:00:66:66"}}},
                         "metadata.annotations"),
                        ({"spec": {"taints": []}}, "spec.taints"),
                        ({"spec": {"unschedulable": True}}, "spec.unschedulable")):
        status, answer = patch(controller_kc, "fake-security", body, subresource="")
        assert status == 403 and "weir-controller-pod-cidrs" in answer and field in answer, f"{body}: {answer}"
    status, answer = patch(controller_kc, "fake-security", {"status": {"capacity": {"pods": "1"}}})
    assert status == 403, f"the controller may write nodes/status: {answer}"
    # Once set, a pod CIDR stays: the API server's own Node validation.
    status, answer = patch(controller_kc, "fake-security", {"spec": {"podCIDR": "10.244.251.0/24",
                                                                      "podCIDRs": ["10.244.251.0/24"]}}, "")
    assert status == 422 and "podCIDR" in answer, answer


def can_i_list(kc):
    """`kubectl auth can-i --list` as the token's own identity (groups
    included, unlike --as), as a set of normalised rows."""
    out = lab.sh(["ip", "netns", "exec", lab.CP_NS, str(lab.BIN / "kubectl"), "--kubeconfig", str(kc),
                  "auth", "can-i", "--list", "-n", lab.NS])
    return {" ".join(line.split()) for line in out.splitlines()[1:] if line.strip()}


@pytest.mark.parametrize("account", ["weir-agent", "weir-controller"])
def test_service_accounts_hold_no_right_beyond_the_snapshot(cluster, account):
    if account == "weir-agent":
        kc = lab.agent_kubeconfig(1)
    else:
        kc = lab.STATE / "can-i.kubeconfig"
        lab.kubeconfig(kc, token=lab.kubectl("create", "token", account, "-n", lab.NS, "--duration", "10m").strip())
    snapshot = SNAPSHOTS / f"can-i-{account}.txt"
    expected = {ln for ln in snapshot.read_text().splitlines() if ln and not ln.startswith("#")}
    got = can_i_list(kc)
    beyond = sorted(got - expected)
    assert not beyond, f"{account} can do more than {snapshot.name} allows:\n" + "\n".join(beyond)
    assert got == expected, f"{account} lost rights the snapshot lists: {sorted(expected - got)}"


def test_weir_namespace_is_labelled_privileged_for_pod_security(cluster):
    labels = json.loads(lab.kubectl("get", "ns", lab.NS, "-o", "json"))["metadata"]["labels"]
    assert labels.get("pod-security.kubernetes.io/enforce") == "privileged", labels


def controller_pod(namespace, host_network):
    tpl = json.loads(lab.kubectl("get", "deploy", "-n", lab.NS, "weir-controller", "-o", "json"))["spec"]["template"]
    spec = tpl["spec"]
    spec["hostNetwork"] = host_network
    if not host_network:
        for c in spec["containers"]:
            c["env"] = [e for e in c["env"] if e["name"] != "WEIR_LEASE_NAMESPACE"] + [
                {"name": "WEIR_LEASE_NAMESPACE", "value": namespace}]
        spec.pop("priorityClassName", None)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "weir-controller-psa", "namespace": namespace,
                                                            "labels": tpl["metadata"]["labels"]}, "spec": spec}


@pytest.fixture
def restricted_ns(cluster):
    ns = "weir-psa-restricted"
    lab.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}}))
    yield ns
    lab.kubectl("delete", "ns", ns, "--timeout=120s")


def test_controller_pod_meets_restricted_but_for_the_host_network(restricted_ns):
    cm = json.loads(lab.kubectl("get", "cm", "-n", lab.NS, "weir-config", "-o", "json"))
    cm["metadata"] = {"name": "weir-config", "namespace": restricted_ns}
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "weir-controller", "namespace": restricted_ns}}
    # Its own Lease only: it leads nothing but itself, and lists no Node.
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "lease", "namespace": restricted_ns},
            "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                       "verbs": ["get", "list", "watch", "create", "update", "patch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "lease", "namespace": restricted_ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lease"},
               "subjects": [{"kind": "ServiceAccount", "name": "weir-controller", "namespace": restricted_ns}]}
    lab.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                       "items": [cm, sa, role, binding]}))
    # The shipped pod: host networking (weir-controller must run before any
    # node has a pod network) is the only thing `restricted` refuses.
    out = subprocess.run(["ip", "netns", "exec", lab.CP_NS, str(lab.BIN / "kubectl"), "--kubeconfig",
                          str(lab.STATE / "admin.kubeconfig"), "create", "--dry-run=server", "-f", "-"],
                         input=json.dumps(controller_pod(restricted_ns, host_network=True)), capture_output=True,
                         text=True)
    marker = 'violates PodSecurity "restricted:latest": '
    assert out.returncode != 0 and marker in out.stderr, f"not refused by Pod Security: {out.stdout}{out.stderr}"
    violations = out.stderr.split(marker)[1].strip()
    assert [v for v in violations.split("), ") if not v.startswith(("host namespaces", "hostPort"))] == [], violations
    # Without it, the same pod is admitted and runs.
    lab.kubectl("create", "-f", "-", input=json.dumps(controller_pod(restricted_ns, host_network=False)))
    lab.kubectl("wait", "-n", restricted_ns, "--for=condition=Ready", "pod/weir-controller-psa", "--timeout=90s")
    time.sleep(5)
    pod = json.loads(lab.kubectl("get", "pod", "-n", restricted_ns, "weir-controller-psa", "-o", "json"))
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    proc = process_status(pod)
    assert proc["Uid"].split()[0] == "65532" and proc["Seccomp"] == "2" and int(proc["CapEff"], 16) == 0, proc


def process_status(pod):
    """/proc/<pid>/status of a pod's first container, read on its node."""
    pid = lab.container_pid(pod["metadata"]["name"], pod["metadata"]["namespace"])
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return fields


def test_agent_runs_with_runtime_default_seccomp_read_only_root_and_net_admin_only(cluster):
    for i in lab.nodes():
        pod = lab.live_agent(i)
        proc = process_status(pod)
        assert proc["Seccomp"] == "2", f"node-{i}: the agent runs without a seccomp filter"
        assert int(proc["CapEff"], 16) == 1 << 12, f"node-{i}: capabilities {proc['CapEff']}, not NET_ADMIN alone"
        pid = lab.container_pid(pod["metadata"]["name"], lab.NS)
        root = next(ln.split() for ln in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                    if ln.split()[4] == "/")
        assert "ro" in root[5].split(","), f"node-{i}: the agent's root filesystem is writable: {root}"
