"""The images every node imports (no registry is reachable), and the binaries they are built from."""

import os
import subprocess

from images import build as images
from proclab import BIN, E2E, ROOT, STATE, log
from lab_base import settings
from proclab import sh


def image_dir():
    return STATE / "images"


def ensure_images():
    """The weir image from the release binaries, the pause image and the
    workload image, as OCI archives every node imports."""
    d = image_dir()
    d.mkdir(parents=True, exist_ok=True)
    release = ROOT / "target" / "release"
    images.weir_image(d / "weir.tar", release / "weir-agent", release / "weir-controller")
    images.pause_image(d / "pause.tar", d)
    images.workload_image(d / "workload.tar")
    # The upstream suite's images, once `e2e/conformance` has built agnhost.
    if (BIN / "agnhost").exists():
        images.e2e_images(d, BIN / "agnhost")
    if settings().get("dns"):
        images.coredns_image(d / "coredns.tar", BIN / "coredns")


DNS_IP = "10.96.0.10"


def ensure_coredns():
    if (BIN / "coredns").exists():
        return
    log("building CoreDNS from the Go module proxy (~2 min)")
    subprocess.run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(BIN / "coredns"),
                    "github.com/coredns/coredns"], env=dict(os.environ, CGO_ENABLED="0"), cwd=E2E / "dns", check=True)


def ensure_weir_release():
    log("building weir (cargo build --release) for the image")
    sh(["cargo", "build", "--quiet", "--release", "-p", "weir-agent", "-p", "weir-controller"], capture=False)
