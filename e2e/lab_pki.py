"""The lab's certificates: the API server's, the control plane components', every node's kubelet."""

import proclab
from proclab import STATE, kubeconfig, node_ip, openssl
from lab_base import node_dir


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
