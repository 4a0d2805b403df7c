"""What the tests leave on the host: run `snapshot` before them and
`check` after. `check` exits 1, naming each leftover, if they left a
weir-* network namespace, a weir-node-* cgroup, a node mount point that was
not there before, a mount of a lab path, a lab process, or a scratch
directory in the temp dir (the tests' weir-*, the upstream suite's
test-kuberc*)."""

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nodes as rt  # noqa: E402
import proclab  # noqa: E402


def state():
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"WEIR_LAB=1" in Path(f"/proc/{pid}/environ").read_bytes() and int(pid) != os.getpid():
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                procs.append(f"{pid} {argv[:80]}")
        except OSError:
            pass
    mounts = [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()
              if str(proclab.E2E) in ln or any(ln.split()[4] == p for p in rt.NODE_PATHS)]
    return {"netns": sorted(n for n in proclab.netns_list() if n.startswith("weir-")),
            "cgroups": sorted(str(d) for h in rt.v1_hierarchies() for d in h.glob("weir-node-*")),
            "paths": sorted(p for p in rt.NODE_PATHS if os.path.exists(p)),
            "mounts": mounts, "processes": procs,
            "scratch": sorted(str(d) for d in Path(tempfile.gettempdir()).iterdir()
                              if d.is_dir() and d.name.startswith(("weir-", "test-kuberc")))}


if __name__ == "__main__":
    cmd, path = sys.argv[1], Path(sys.argv[2])
    if cmd == "snapshot":
        path.write_text(json.dumps(state()))
        sys.exit(0)
    before, after = json.loads(path.read_text()), state()
    left = {k: sorted(set(after[k]) - set(before[k])) for k in after}
    left = {k: v for k, v in left.items() if v}
    print(f"leftovers on the host: {json.dumps(left) if left else 'none'}")
    sys.exit(1 if left else 0)
