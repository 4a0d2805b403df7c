import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lablib as lab  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("e2e needs root to create network namespaces")
    # WEIR_E2E_REUSE_LAB=1 (development only) runs against a lab already up.
    reuse = os.environ.get("WEIR_E2E_REUSE_LAB") == "1" and lab.holder(1)
    if not reuse:
        lab.down()
        lab.up(n_nodes=3, pods_per_node=2)
    yield lab
    if not reuse:
        lab.down()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, the tail of every lab process's log goes into the report:
    teardown deletes the lab's state directory, and with it the only record of
    why an agent or controller did not do its part."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for path in sorted((lab.STATE / "logs").glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()[-40:]
        report.sections.append((f"lab log {path.name} (last {len(lines)} lines)", "\n".join(lines)))
    try:
        for sel in (lab.AGENT_SELECTOR, lab.CONTROLLER_SELECTOR):
            for p in lab.pods_in(lab.NS, sel):
                name = p["metadata"]["name"]
                lines = lab.kubectl("logs", "-n", lab.NS, name, "--tail=40", check=False).splitlines()
                report.sections.append((f"kubectl logs {name} on {p['spec'].get('nodeName')}", "\n".join(lines)))
    except Exception as e:  # the API server may be what failed
        report.sections.append(("kubectl logs", f"unavailable: {e}"))


@pytest.fixture(autouse=True)
def healthy(request):
    """Every lab test starts from a healthy cluster, whatever the test before
    it stopped or restarted; one that cannot be made healthy fails here,
    naming what is wrong."""
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").wait_healthy()
    yield
