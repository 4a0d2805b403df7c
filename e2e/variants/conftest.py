"""The lab these tests need: two underlay subnets joined by a router
(node-1 and node-3 on 198.18.0.0/24, node-2 on 198.18.1.0/24), direct
routing on, and dual-stack pods. e2e/test-all runs them after the main
suite, on their own lab."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lablib as lab  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("e2e needs root to create network namespaces")
    reuse = os.environ.get("WEIR_E2E_REUSE_LAB") == "1" and lab.holder(1)
    if not reuse:
        lab.down()
        lab.up(n_nodes=3, pods_per_node=1, subnets=2, direct_routing=True, dual_stack=True)
    yield lab
    if not reuse:
        lab.down()
