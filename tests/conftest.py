"""Shared fixtures: seeded torch, and checkpoints of a (fake) training run."""

from __future__ import annotations

import os
import sys

import pytest
import torch

#: The model factories these tests' training runs name. An audit imports a factory a run names only
#: from modules the operator trusts; this test session is the operator, and trusts these (every
#: process it starts inherits the grant). tests/reliability/test_trust.py checks what is refused.
TRUSTED_TEST_MODULES = "tracin_tasks.examples,reliability_slow_factory,slow_digits_factory,bench_flow"
os.environ["TRACIN_TRUSTED_MODULES"] = TRUSTED_TEST_MODULES

# tests/core/oracle.py is imported as ``oracle`` whatever pytest's rootdir/package layout is
_CORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core")
if _CORE not in sys.path:
    sys.path.insert(0, _CORE)


@pytest.fixture(autouse=True)
def _seeded(request):
    """Seed torch; tests/core models are tiny, where one intra-op thread is many times faster
    than a contended pool (restored afterwards, so other suites keep their setting)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    tiny = _CORE in str(request.node.path)
    if tiny:
        torch.set_num_threads(1)
    yield
    if tiny:
        torch.set_num_threads(threads)


@pytest.fixture
def make_checkpoints():
    """``make_checkpoints(model, lrs=..., seed=..., scale=...) -> list[Checkpoint]``."""
    from oracle import build_checkpoints

    return build_checkpoints


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server (a temporary server on a free port) for the whole session.

    Every folder's ``prefect_api`` fixture uses this one: Prefect's events worker is a
    process-wide singleton bound to the first server it talks to, so a second harness would
    receive the flow runs but not the events; and each start costs tens of seconds here.
    The state folders (PREFECT_HOME first) must exist: the folder fixtures create them.
    """
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield prefect.settings.PREFECT_API_URL.value()
