"""Shared fixtures: seeded torch, and checkpoints of a (fake) training run."""

from __future__ import annotations

import os
import sys

import pytest
import torch

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
