"""The fixtures every test folder shares; tests/conftest.py registers this plugin once.

Importing it sets the session's environment (:mod:`_harness.env`) before pytest imports any test
module. Slow set-up is session-scoped: one Prefect test server, one digits run, one ``mlflow
server``. While Prefect's server starts (tens of seconds), the other slow set-up the selected
tests need runs alongside it (:func:`warm_up`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from . import env, runs
from .env import STATE, TESTS, one_torch_thread
from .mlflow_server import MlflowServer

#: folders of tiny models, where one torch intra-op thread is many times faster than a contended pool
ONE_THREAD_FOLDERS = frozenset({"core", "orchestration", "flows", "reliability"})

_WARM_UPS: dict[str, Callable[[pytest.FixtureRequest], Any]] = {}


def warm_up(fixture: str, start: Callable[[pytest.FixtureRequest], Any]) -> None:
    """When a selected test uses ``fixture``, call ``start(request)`` while Prefect's test server
    starts; ``prefect_api`` waits for what it returns (``.join()``) before the tests go on."""
    _WARM_UPS[fixture] = start


def _folder(path: Any) -> str:
    try:
        return Path(str(path)).resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return ""


# -- every test ---------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _seeded(request):
    """Seed torch; one intra-op thread in :data:`ONE_THREAD_FOLDERS`, and everywhere when the
    suite runs in several processes (pytest-xdist) that share the cores (put back afterwards)."""
    import torch

    torch.manual_seed(0)
    tiny = _folder(request.node.path) in ONE_THREAD_FOLDERS or "PYTEST_XDIST_WORKER" in os.environ
    with one_torch_thread() if tiny else contextlib.nullcontext():
        yield


@pytest.fixture(scope="module", autouse=True)
def _quiet_environment():
    """The session's quiet environment in os.environ while a module runs (a test may have changed
    it); Prefect's variables stay as they are once set."""
    with pytest.MonkeyPatch.context() as mp:
        env.reapply_quiet_env(mp)
        yield


@pytest.fixture(scope="session")
def support():
    """The harness package (:mod:`_harness`): its helpers, for tests that take them as a fixture."""
    import _harness

    return _harness


@pytest.fixture(scope="session")
def session_cwd() -> Path:
    """The working directory is a folder of the state folder from first use to the end of the
    session (MLflow resolves defaults, like ``./mlflow.db``, against it)."""
    cwd = STATE / "cwd"
    cwd.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        yield cwd


# -- Prefect --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prefect_api(request) -> str:
    """One Prefect test server (a temporary server on a free port) for the whole session; its API URL.

    Every folder uses this one: Prefect's events worker is a process-wide singleton bound to the
    first server it talks to, so a second server would receive the flow runs but not the events;
    and each start costs tens of seconds here. The slow set-up of the selected tests starts
    meanwhile (:func:`warm_up`).
    """
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    # a warm-up may train on a thread while the harness imports Prefect's server: both import
    # SQLAlchemy's ORM, whose circular imports fail when two threads run them at once; import first
    import mlflow  # noqa: F401
    import sqlalchemy.orm  # noqa: F401

    wanted = set().union(*(item.fixturenames for item in request.session.items))
    started = [start(request) for name, start in _WARM_UPS.items() if name in wanted]
    with prefect_test_harness(server_startup_timeout=env.PREFECT_STARTUP_TIMEOUT):
        for work in started:
            if hasattr(work, "join"):
                work.join()
        yield prefect.settings.PREFECT_API_URL.value()


# -- MLflow ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def digits_run() -> runs.DigitsRun:
    """The session's digits run: MLP, 3 epochs (3 checkpoints), 1,797 rows, sqlite store under tmp."""
    return runs.digits_run()


@pytest.fixture(scope="session")
def mlflow_server_process():
    """The session's ``mlflow server``, started but not yet waited for (it boots meanwhile)."""
    if not MlflowServer.available():
        pytest.skip("no mlflow executable next to this Python (mlflow-skinny has no server)")
    with MlflowServer(STATE / "mlflow-server") as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_process) -> MlflowServer:
    """The session's ``mlflow server``, healthy (sqlite backend, artifacts under tmp)."""
    mlflow_server_process.wait_healthy()
    return mlflow_server_process


@pytest.fixture(scope="session")
def crashable_server():
    """An ``mlflow server`` the fault tests crash and start again (not the shared one), started,
    not waited for. Defined here, not in tests/reliability, so that the warm-up can start it
    whichever folder's test starts Prefect's server first."""
    if not MlflowServer.available():
        pytest.skip("no mlflow executable next to this Python (mlflow-skinny has no server)")
    with MlflowServer(STATE / "crashable-mlflow-server") as server:
        yield server


warm_up("digits_run", lambda request: runs.DIGITS.start())
warm_up("mlflow_server",
        lambda request: request.getfixturevalue("mlflow_server_process") if MlflowServer.available() else None)
warm_up("server_run", lambda request: request.getfixturevalue("crashable_server") if MlflowServer.available() else None)
