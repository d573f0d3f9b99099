"""One test session's environment: a state folder, quiet services, os.environ and torch threads.

Importing this module creates the session's state folder (removed at exit) and points Prefect's
home, the tracin-tasks download cache, Dask's scratch space and matplotlib's config at it, with
every service's telemetry off. tests/conftest.py registers the plugin, which imports this module,
before pytest imports any test module, so whatever a test imports first (Prefect, MLflow, Great
Expectations) reads these settings.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS = REPO_ROOT / "tests"
BIN = Path(sys.executable).parent

STATE = Path(tempfile.mkdtemp(prefix="tracin-tests-"))
atexit.register(shutil.rmtree, STATE, ignore_errors=True)

#: seconds a Prefect temporary server may take to start: a fresh one migrates its database first,
#: which on a loaded 2-core machine is slow (generous on purpose; nothing asserts on timing)
PREFECT_STARTUP_TIMEOUT = 300

_FOLDERS = ("PREFECT_HOME", "TRACIN_TASKS_CACHE_DIR", "DASK_TEMPORARY_DIRECTORY", "MPLCONFIGDIR")
_NOT_FOR_CHILDREN = ("PREFECT_API_URL", "PREFECT_API_KEY", "MLFLOW_TRACKING_URI", "PYTEST_CURRENT_TEST")


def quiet_env(home: Path) -> dict[str, str]:
    """The variables every process of these tests gets: state under ``home``, nothing phones home."""
    return {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(PREFECT_STARTUP_TIMEOUT),
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "GX_ANALYTICS_ENABLED": "False",
        "TRACIN_TASKS_CACHE_DIR": str(home / "cache"),
        "DASK_TEMPORARY_DIRECTORY": str(home / "dask"),
        "MPLCONFIGDIR": str(home / "matplotlib"),
    }


def make_state_folders(env: dict[str, str]) -> None:
    """Create the folders ``env`` names (Prefect's temporary server silently waits out its whole
    start-up timeout when its PREFECT_HOME is missing)."""
    for key in _FOLDERS:
        os.makedirs(env[key], exist_ok=True)


def _configure() -> None:
    os.environ.update(quiet_env(STATE))
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # a developer's own server is no target for tests
    make_state_folders(os.environ)


_configure()


def reapply_quiet_env(mp: pytest.MonkeyPatch) -> None:
    """Set :func:`quiet_env` again through ``mp`` (a test may have changed it), except Prefect's
    variables once set: Prefect's settings must not change under a running process."""
    for key, value in quiet_env(STATE).items():
        if key.startswith("PREFECT_") and os.environ.get(key):
            continue
        mp.setenv(key, value)


def subprocess_env(home: Path, *, make_dirs: bool = False, **extra: str) -> dict[str, str]:
    """os.environ without any Prefect API or MLflow target, plus :func:`quiet_env` under ``home``
    (its folders created when ``make_dirs``), the repository importable, one torch thread."""
    env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_CHILDREN}
    env.update(quiet_env(home))
    # the models are tiny and CI has 2 shared cores: one torch thread per process is fastest
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    if make_dirs:
        make_state_folders(env)
    return env


def server_env(**extra: str) -> dict[str, str]:
    """os.environ for a server these tests start: no Prefect API or MLflow target, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_CHILDREN}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", **extra)
    return env


@contextlib.contextmanager
def restored_environ() -> Iterator[None]:
    """Put os.environ back afterwards (the CLI's main sets defaults in it when called in-process)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models on 2 shared cores: one intra-op thread is several times faster than two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
