"""weir as operators run it: a DaemonSet pod under a kubelet and containerd. Liveness, restarts,
rolling updates, and traffic from the node, from hostNetwork pods and through a Service."""

import json
import time

import lablib as lab
from test_lab import agent_get, background_ping, loss_of, restarts, wait


def http_get(src, ip, port=80):
    """One HTTP/1.0 GET from a pod with busybox nc; returns the body's last line."""
    out = lab.kubectl("exec", src, "--", "sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} {port}",
                      check=False)
    return out.strip().splitlines()[-1] if out.strip() else ""


def test_cluster_ip_service_answers_from_every_node(cluster):
    ip = lab.kubectl("get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}").strip()
    backends = {}
    for src in lab.pods():
        answers = {http_get(src, ip) for _ in range(8)}
        assert answers - {""}, f"{src} got no answer from the Service {ip}"
        backends[src] = answers
    answering = set().union(*backends.values()) - {""}
    nodes = {name.split("-")[1] for name in answering}
    assert len(nodes) >= 2, f"the Service answered only from pods on node(s) {nodes}: {backends}"


def test_node_and_host_network_pod_reach_pods_on_other_nodes(cluster):
    dst = lab.pods()["pod-2-1"]
    sent, recv, _ = lab.ping(lab.node_ns(1), dst, count=3)
    assert recv == sent == 3, f"node-1 -> pod-2-1: {recv}/{sent}"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hostnet-1", "namespace": "default"},
           "spec": {"hostNetwork": True, "nodeSelector": {"kubernetes.io/hostname": "node-1"},
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "c", "image": "localhost/weir-workload:lab", "imagePullPolicy": "Never",
                                    "command": ["sleep", "3600"]}]}}
    lab.kubectl("apply", "-f", "-", input=json.dumps(pod))
    try:
        lab.kubectl("wait", "--for=condition=Ready", "pod/hostnet-1", "--timeout=60s")
        for dst_pod in ("pod-2-1", "pod-3-1"):
            sent, recv, _ = lab.exec_ping("hostnet-1", lab.pods()[dst_pod], count=3)
            assert recv == sent == 3, f"hostNetwork pod on node-1 -> {dst_pod}: {recv}/{sent}"
        # And back: a pod answers the node, whose address the overlay does not carry.
        assert http_get("pod-3-1", lab.node_ip(1), 9478) != "", "pod-3-1 cannot reach node-1's agent endpoint"
    finally:
        lab.kubectl("delete", "pod", "hostnet-1", "--grace-period=0", "--force", check=False)


def test_agent_restarted_while_the_api_server_is_down_stays_live_and_catches_up(cluster):
    """The kubelet keeps running containers without the API server. An agent
    that starts then cannot read its Node; it must stay live (no restart
    loop from its liveness probe), keep the dataplane, and catch up."""
    dst = lab.pods()["pod-2-1"]
    cid = lab.container_id(lab.agent_pod(1), lab.NS)[0]
    proc = background_ping("pod-1-1", dst, seconds=100, interval=0.2)
    lab.stop("apiserver")
    try:
        lab.kill_container(1, cid)
        wait(lambda: lab.task_pids_on(1).get(cid) is None, 20, "the killed agent gone")
        # The kubelet restarts it as a new container; it stays up from here on.
        wait(lambda: agent_get(1, "/healthz") == "200", 60, "the restarted agent live")
        first = lab.agent_containers(1)
        assert len(first) == 1, first
        for _ in range(8):  # 80 s: longer than the probe's 6 x 10 s failure threshold
            time.sleep(10)
            assert agent_get(1, "/healthz") == "200", "the agent stopped being live while the API server is down"
            assert agent_get(1, "/readyz") != "200", "ready without having read its Node"
        assert lab.agent_containers(1) == first, "the kubelet restarted the agent while the API server was down"
    finally:
        lab.start_apiserver()
        lab.wait_api()
    wait(lambda: agent_get(1, "/readyz") == "200", 60, "the agent caught up once the API server returned")
    sent, recv = loss_of(proc)
    assert sent == recv, f"{sent - recv} of {sent} packets lost"


def test_rolling_update_under_cross_node_ping_loses_nothing(cluster):
    dst = lab.pods()["pod-3-1"]
    before = {i: lab.agent_pod(i) for i in lab.nodes()}
    proc = background_ping("pod-1-1", dst, seconds=60, interval=0.1)
    try:
        lab.set_agent_env(WEIR_LAB_ROLL=str(time.time()))
    finally:
        sent, recv = loss_of(proc)
    after = {i: lab.agent_pod(i) for i in lab.nodes()}
    assert all(before[i] != after[i] for i in before), f"not every agent pod was replaced: {before} -> {after}"
    assert sent == recv, f"{sent - recv} of {sent} packets lost during a rolling update"


def test_agent_killed_repeatedly_backs_off_and_loses_nothing(cluster):
    dst = lab.pods()["pod-1-1"]
    start = restarts(2)
    proc = background_ping("pod-3-1", dst, seconds=70, interval=0.2)
    try:
        for k in range(3):
            wait(lambda: lab.agent_containers(2), 60, "node-2's agent running")
            lab.kill_agent(2)
            wait(lambda: restarts(2) >= start + k + 1, 60, f"restart {k + 1} counted")
        out = lab.kubectl("get", "pods", "-n", lab.NS, "-o", "wide")
        assert lab.agent_pod(2) in out
        events = lab.kubectl("get", "events", "-n", lab.NS, "--field-selector",
                             f"involvedObject.name={lab.agent_pod(2)},reason=BackOff", "-o", "json")
        assert json.loads(events)["items"], "the kubelet backed off restarting the agent"
    finally:
        sent, recv = loss_of(proc)
    assert restarts(2) >= start + 3
    assert sent == recv, f"{sent - recv} of {sent} packets lost while the agent was killed three times"
    wait(lambda: lab.agent_ready(2), 120, "node-2's agent back")
