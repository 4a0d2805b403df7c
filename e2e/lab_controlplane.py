"""kube-apiserver, kube-controller-manager and kube-scheduler in the control-plane namespace."""

import proclab
from proclab import BIN, CP_NS, STATE, spawn


def start_apiserver():
    returning = not proclab.running("apiserver") and proclab.running("controller-manager")
    pki = STATE / "pki"
    proclab.start_apiserver(
        authorization="Node,RBAC",
        admission="NamespaceLifecycle,ServiceAccount,NodeRestriction,ValidatingAdmissionPolicy",
        extra_flags=[f"--kubelet-client-certificate={pki}/kubelet-client.crt",
                     f"--kubelet-client-key={pki}/kubelet-client.key",
                     f"--kubelet-certificate-authority={pki}/ca.crt",
                     # Otherwise `kubectl logs` resolves the node's name through DNS.
                     "--kubelet-preferred-address-types=InternalIP,Hostname"])
    if returning:
        restart_controllers_after_outage()


def restart_controllers_after_outage():
    """In a cluster, kube-controller-manager and kube-scheduler run with
    leader election: 10 s into an API server outage they lose their Lease
    and exit, and start again with informers that list afresh. Left running
    through the outage, their watches come back only when client-go's
    back-off allows, up to a minute later (24 s seen here for the pod
    watch): a DaemonSet pod made and deleted in that minute is never seen,
    and the DaemonSet controller then waits 5 min for it before it makes a
    pod for any other node. So the lab starts them again once the API
    server answers, without the lease's delays."""
    proclab.wait_api()
    for name, start in (("controller-manager", start_controller_manager), ("scheduler", start_scheduler)):
        proclab.stop(name)
        start()
    proclab.log("the API server is back: kube-controller-manager and kube-scheduler started again")


def start_controller_manager():
    pki = STATE / "pki"
    kc = STATE / "controller-manager.kubeconfig"
    spawn("controller-manager", CP_NS, [
        str(BIN / "kube-controller-manager"), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1", "--leader-elect=false",
        f"--service-account-private-key-file={pki}/sa.key", f"--root-ca-file={pki}/ca.crt",
        "--use-service-account-credentials=true",
        # weir-controller, not kube-controller-manager, allocates pod CIDRs.
        "--allocate-node-cidrs=false", "--v=1",
        # Why a re-added node got no agent pod (see why_no_cni_config): the
        # DaemonSet controller's creations, deletions and expectations.
        "--vmodule=daemon_controller=4,controller_utils=4"])


def start_scheduler():
    kc = STATE / "scheduler.kubeconfig"
    spawn("scheduler", CP_NS, [str(BIN / "kube-scheduler"), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                               f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1",
                               "--leader-elect=false", "--v=1"])
