"""Fixtures of the data-quality reporting tests (flagging, GX, report, flow, MLflow UI).

The environment (Prefect home, caches, telemetry off, all under one tmp folder) is set by
``_support`` when this file is imported, before any test module imports Prefect or MLflow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ._support import BIN, STATE, MlflowServer, TrainedRun, _Background, train_run


# -- session state --------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _session_cwd():
    """The working directory is a tmp folder while these tests run (MLflow may create ./mlflow.db)."""
    cwd = STATE / "cwd"
    cwd.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        yield cwd


@pytest.fixture(scope="session")
def mlflow_server_process():
    """The server process, started but not yet waited for (so it can boot while other work runs)."""
    if not (BIN / "mlflow").exists():
        pytest.skip(f"no mlflow executable next to {BIN / 'python'} (mlflow-skinny has no server)")
    server = MlflowServer(STATE / "mlflow-server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_process) -> MlflowServer:
    mlflow_server_process.wait_healthy()
    return mlflow_server_process


def _wants(session, filename: str) -> bool:
    return any(Path(str(item.path)).name == filename for item in session.items)


# -- Prefect and the sqlite training run (test_flow_report.py, test_mlflow_ui.py) ----------------
@pytest.fixture(scope="session")
def prefect_api(request):
    """Prefect's test harness (a temporary server on a free port) for the session.

    While it starts, the sqlite training run trains on a thread and, when the MLflow UI tests
    are selected, the ``mlflow server`` boots.
    """
    if _wants(request.session, "test_mlflow_ui.py") and (BIN / "mlflow").exists():
        request.getfixturevalue("mlflow_server_process")
    if _wants(request.session, "test_flow_report.py"):
        _sqlite_training()
    return request.getfixturevalue("prefect_harness")  # the session's one server (tests/conftest.py)


_SQLITE_RUN: _Background | None = None


def _sqlite_training() -> _Background:
    global _SQLITE_RUN
    if _SQLITE_RUN is None:
        root = STATE / "mlflow-sqlite"
        root.mkdir(exist_ok=True)
        _SQLITE_RUN = _Background(train_run, f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", "reports")
    return _SQLITE_RUN


@pytest.fixture(scope="session")
def sqlite_run() -> TrainedRun:
    """One real MLflow training run (digits, MLP, 2 epochs = 2 checkpoints) in a sqlite store under tmp."""
    return _sqlite_training().get()


