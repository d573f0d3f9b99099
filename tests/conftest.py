"""Registers the shared harness (tests/_harness: environment, servers, runs, fixtures), trusts the
test model factories, and gives tests/core its checkpoints of a (fake) training run."""

from __future__ import annotations

import os
import sys

import pytest

#: The model factories these tests' training runs name. An audit imports a factory a run names only
#: from modules the operator trusts; this test session is the operator, and trusts these (every
#: process it starts inherits the grant). tests/reliability/test_trust.py checks what is refused.
TRUSTED_TEST_MODULES = "tracin_tasks.examples,reliability_slow_factory,slow_digits_factory,bench_flow"
os.environ["TRACIN_TRUSTED_MODULES"] = TRUSTED_TEST_MODULES

# the plugin sets the session's environment when it is imported: before any test module is
pytest_plugins = ["_harness.plugin"]

# tests/core/oracle.py is imported as ``oracle`` whatever pytest's rootdir/package layout is
_CORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core")
if _CORE not in sys.path:
    sys.path.insert(0, _CORE)


@pytest.fixture
def make_checkpoints():
    """``make_checkpoints(model, lrs=..., seed=..., scale=...) -> list[Checkpoint]``."""
    from oracle import build_checkpoints

    return build_checkpoints
