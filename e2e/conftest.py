import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lablib as lab  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("e2e needs root to create network namespaces")
    lab.down()
    lab.up(n_nodes=3, pods_per_node=2)
    yield lab
    lab.down()
