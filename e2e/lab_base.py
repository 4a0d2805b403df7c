"""What every part of the lab shares: its selectors and state, where a node
keeps its files, and the wait every part uses. The lab's lower layer is
proclab (processes, namespaces, certificates, the API server)."""

from proclab import STATE, netns_list, running, settings, wait_for  # noqa: F401  (settings: what `lab up` was asked for)

SERVICE_CIDR = "10.96.0.0/16"
AGENT_SELECTOR = "app.kubernetes.io/name=weir-agent"
CONTROLLER_SELECTOR = "app.kubernetes.io/name=weir-controller"
POD_LABEL = "weir-lab=pod"
HOST_RECORD = STATE / "host-mountpoints.json"


def node_dir(i):
    return STATE / "nodes" / f"node-{i}"


def holder(i):
    """The pid of the process that holds node i's mount namespace."""
    return running(f"node-{i}-holder")


def nodes():
    return sorted(int(n.split("-")[-1]) for n in netns_list() if n.startswith("weir-node-"))
