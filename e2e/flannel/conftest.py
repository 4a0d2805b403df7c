"""flannel's known holes, replayed against weir and flannel side by side.

The lab is the bench's (e2e/proclab.py): both agents run as processes, as
their DaemonSets run them, each in its own node namespaces, on one API
server. weir on node-1 and node-3, flannel v0.28.10 on node-2 and node-4,
and fake Nodes carrying both agents' annotations, so both program the same
peers. Each node has one address in its pod CIDR, on lo, to stand in for a
pod. e2e/test-all runs this after the main suites.

Only weir's side is asserted. flannel's outcome is printed beside it, in the
table at the end of the run (and in e2e/.cache/flannel-holes.txt).
"""

import os
import sys

import pytest

E2E = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, E2E)
import proclab  # noqa: E402
import sidebyside  # noqa: E402

ROWS = []


@pytest.fixture(scope="session")
def pair():
    if os.geteuid() != 0:
        pytest.skip("the side-by-side lab needs root to create network namespaces")
    try:
        sidebyside.up(n_each=2)
        yield
    finally:
        proclab.down()


@pytest.fixture
def row():
    """Records one hole's outcome for both agents."""
    def record(hole, weir, flannel):
        ROWS.append((hole, weir, flannel))
        print(f"\n{hole}: weir {weir}; flannel {flannel}")
    return record


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    rows = [("hole", "weir", "flannel"), *ROWS]
    hw, ww = (max(len(r[c]) for r in rows) for c in (0, 1))
    lines = [f"{h:<{hw}}  {w:<{ww}}  {f}" for h, w, f in rows]
    terminalreporter.section("flannel's holes, replayed against both agents")
    for ln in lines:
        terminalreporter.write_line(ln)
    out = os.path.join(E2E, ".cache", "flannel-holes.txt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
