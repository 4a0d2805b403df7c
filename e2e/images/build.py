"""Container images for the lab, written from files as OCI archives: nothing
can be pulled here, and `ctr images import` takes an OCI layout tar whose
index carries the `io.containerd.image.name` annotation.

- weir: the release weir-agent and weir-controller, `nft`, and the shared
  libraries the three link against (the same commands as the Dockerfile's
  image: /weir-agent, /weir-controller, nft on PATH);
- pause: the sandbox image, a static binary built from pause.c;
- workload: static busybox (ping, nc, httpd, wget, sh), for the lab's pods.
"""

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

WEIR = "localhost/weir:lab"
PAUSE = "registry.k8s.io/pause:3.10.1"
WORKLOAD = "localhost/weir-workload:lab"
# The upstream e2e suite's images, under the exact names `e2e.test
# --list-images` gives. They are stand-ins written here, as nothing can be
# pulled: agnhost is the real binary (built from the same Kubernetes
# release) with curl and a busybox shell beside it, as upstream's has; the
# busybox images are Debian's static busybox; httpd is busybox's httpd on
# port 80 (the kubectl specs only need a web server that answers).
E2E_REGISTRY = "registry.k8s.io/e2e-test-images"
AGNHOST = f"{E2E_REGISTRY}/agnhost:2.56"
BUSYBOXES = [f"{E2E_REGISTRY}/busybox:1.37.0-1", f"{E2E_REGISTRY}/busybox:1.36.1-1"]
HTTPD = f"{E2E_REGISTRY}/httpd:2.4.38-4"
COREDNS = "localhost/coredns:lab"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def shared_libs(binary):
    """The absolute paths `ldd` resolves for a binary, the loader included."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(path)
    return libs


def layer(files, symlinks=(), dirs=()):
    """An uncompressed tar layer: files maps the path in the image to a host
    path; symlinks are (path, target) pairs. Entries are stamped with time 0,
    so the same inputs give the same digest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        seen = set()

        def add_dir(d):
            parts = Path(d).parts
            for k in range(1, len(parts) + 1):
                p = "/".join(parts[:k])
                if p and p not in seen:
                    seen.add(p)
                    info = tarfile.TarInfo(p)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(info)

        for d in dirs:
            add_dir(d.lstrip("/"))
        for dest, src in sorted(files.items()):
            dest = dest.lstrip("/")
            add_dir(os.path.dirname(dest))
            data = Path(src).read_bytes()
            info = tarfile.TarInfo(dest)
            info.size, info.mode, info.mtime = len(data), os.stat(src).st_mode & 0o777, 0
            tar.addfile(info, io.BytesIO(data))
        for dest, target in symlinks:
            dest = dest.lstrip("/")
            add_dir(os.path.dirname(dest))
            info = tarfile.TarInfo(dest)
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, 0
            tar.addfile(info)
    return buf.getvalue()


def write_archive(path, name, layers, entrypoint=None, cmd=None, env=(PATH_ENV,), user=None):
    """Writes an OCI image layout tar holding one image called `name`."""
    blobs = {}

    def blob(data, media_type):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layer_descs = [blob(data, "application/vnd.oci.image.layer.v1.tar") for data in layers]
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": list(env), **({"Entrypoint": entrypoint} if entrypoint else {}),
                         **({"Cmd": cmd} if cmd else {}), **({"User": user} if user else {})},
              "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layer_descs]}}
    config_desc = blob(json.dumps(config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": layer_descs}
    manifest_desc = blob(json.dumps(manifest, sort_keys=True).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest_desc["annotations"] = {"io.containerd.image.name": name,
                                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}
    manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}
    with tarfile.open(path, "w") as tar:
        def put(name_, data):
            info = tarfile.TarInfo(name_)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
        put("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        put("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            put(f"blobs/sha256/{digest.split(':')[1]}", data)


def weir_image(out, agent, controller, nft="/usr/sbin/nft"):
    files = {"/weir-agent": agent, "/weir-controller": controller, "/usr/sbin/nft": nft}
    for binary in (agent, controller, nft):
        for lib in shared_libs(binary):
            files[lib] = os.path.realpath(lib)
    write_archive(out, WEIR, [layer(files, dirs=("/tmp", "/run", "/etc"))], entrypoint=["/weir-agent"])


def pause_image(out, workdir):
    binary = Path(workdir) / "pause"
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(binary), str(HERE / "pause.c")], check=True)
    write_archive(out, PAUSE, [layer({"/pause": binary})], entrypoint=["/pause"], user="65535:65535")


def busybox_layer(busybox="/bin/busybox", extra=None, dirs=("/tmp", "/www", "/etc")):
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    taken = set(extra or {})
    links = [(f"/bin/{a}", "busybox") for a in applets if a != "busybox" and f"/bin/{a}" not in taken]
    return layer({"/bin/busybox": busybox, **(extra or {})}, links, dirs=dirs)


def workload_image(out):
    write_archive(out, WORKLOAD, [busybox_layer()], cmd=["sh"])


def e2e_images(out_dir, agnhost, curl="/usr/bin/curl", netcat="/bin/nc.openbsd"):
    """The upstream suite's images (see E2E_REGISTRY above). The specs call
    `nc -u` and `nc -v -t`, which busybox's nc lacks: upstream's agnhost
    carries OpenBSD netcat, and so does this one (ahead of busybox on PATH)."""
    # Debian's static busybox sh runs its own applets ahead of PATH, so it
    # would never reach that netcat: the shell is dash.
    files = {"/agnhost": agnhost, "/usr/bin/curl": curl, "/usr/bin/nc": netcat, "/bin/sh": "/bin/dash"}
    for binary in (curl, netcat, "/bin/dash"):
        for lib in shared_libs(binary):
            files[lib] = os.path.realpath(lib)
    write_archive(out_dir / "agnhost.tar", AGNHOST, [busybox_layer(extra=files)],
                  entrypoint=["/agnhost"], cmd=["pause"])
    for k, name in enumerate(BUSYBOXES):
        write_archive(out_dir / f"busybox-{k}.tar", name, [busybox_layer()], cmd=["sh"])
    write_archive(out_dir / "httpd.tar", HTTPD, [busybox_layer(dirs=("/tmp", "/htdocs", "/etc"))],
                  cmd=["sh", "-c", "echo '<html><body>It works!</body></html>' > /htdocs/index.html && "
                       "exec httpd -f -p 80 -h /htdocs"])


def coredns_image(out, coredns):
    write_archive(out, COREDNS, [layer({"/coredns": coredns}, dirs=("/etc", "/tmp"))], entrypoint=["/coredns"])
