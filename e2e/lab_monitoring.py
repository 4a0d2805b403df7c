"""Prometheus in the control-plane namespace, scraping as manifests/monitoring says."""

import json
import subprocess
import urllib.parse

from proclab import BIN, CP_IP, CP_NS, E2E, ROOT, STATE, log, ns_get, spawn


PROMETHEUS_VERSION = "2.54.1"
PROMETHEUS_ADDR = f"{CP_IP}:9090"


def ensure_prometheus():
    """Prometheus and promtool, built from the Go module proxy (e2e/prometheus
    says why not Debian's package)."""
    if (BIN / "prometheus").exists() and (BIN / "promtool").exists():
        return
    log(f"building Prometheus {PROMETHEUS_VERSION} and promtool from the Go module proxy (~2 min the first time)")
    ldflags = f"-s -w -X github.com/prometheus/common/version.Version={PROMETHEUS_VERSION}"
    subprocess.run(["go", "build", "-trimpath", "-ldflags", ldflags, "-o", f"{BIN}/",
                    "github.com/prometheus/prometheus/cmd/prometheus", "github.com/prometheus/prometheus/cmd/promtool"],
                   cwd=E2E / "prometheus", check=True)


def promtool():
    ensure_prometheus()
    return str(BIN / "promtool")


def prometheus_config():
    """The shipped scrape job (manifests/monitoring/prometheus-scrape.yaml)
    as a plain Prometheus in the control plane runs it: service discovery
    through the lab's kubeconfig instead of in-cluster credentials, and a 5 s
    interval instead of 30 s so that tests need not wait. The shipped alert
    rules are loaded as they are."""
    job = (ROOT / "manifests" / "monitoring" / "prometheus-scrape.yaml").read_text()
    assert "    - role: pod\n" in job and "  scrape_interval: 30s\n" in job, "prometheus-scrape.yaml changed shape"
    job = job.replace("    - role: pod\n", f"    - role: pod\n      kubeconfig_file: {STATE / 'admin.kubeconfig'}\n")
    job = job.replace("  scrape_interval: 30s\n", "  scrape_interval: 5s\n")
    job = "\n".join("  " + ln if ln else ln for ln in job.splitlines())
    rules = ROOT / "manifests" / "monitoring" / "weir-rules.yaml"
    return (f"global: {{scrape_interval: 5s, evaluation_interval: 5s}}\nrule_files: [{rules}]\n"
            f"scrape_configs:\n{job}\n")


def start_prometheus():
    ensure_prometheus()
    cfg = STATE / "prometheus.yml"
    cfg.write_text(prometheus_config())
    spawn("prometheus", CP_NS, [str(BIN / "prometheus"), f"--config.file={cfg}",
                                f"--storage.tsdb.path={STATE / 'prometheus'}", f"--web.listen-address={PROMETHEUS_ADDR}"])


def prom_query(expr):
    """An instant query against the lab's Prometheus: (status, result list or error)."""
    url = f"http://{PROMETHEUS_ADDR}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    out = json.loads(ns_get(CP_NS, url)[1])
    return out["status"], out.get("data", {}).get("result", out.get("error"))


def prom_get(path):
    return json.loads(ns_get(CP_NS, f"http://{PROMETHEUS_ADDR}{path}")[1])
