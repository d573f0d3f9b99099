"""Fixtures for the MLflow integration tests: tracking stores in tmp folders, a real server, data.

Nothing here writes outside the session's tmp folders and nothing downloads: the sqlite store and
the server (the session's, tests/_harness) keep their databases and artifacts under tmp, each
test gets its own tracin-tasks cache, and the working directory is a tmp folder (MLflow resolves
some defaults, like ``./mlflow.db``, against it). The digits run is the session's (tests/_harness).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")

from _harness import guard_mlflow_globals  # noqa: E402

from ._support import SmallDigits, Store  # noqa: E402


# -- environment ------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _session_cwd(session_cwd):
    return session_cwd


@pytest.fixture(autouse=True)
def _per_test_state(tmp_path, monkeypatch):
    """A cache folder per test, and MLflow's process-wide tracking URI / experiment put back after."""
    monkeypatch.setenv("TRACIN_TASKS_CACHE_DIR", str(tmp_path / "tracin-cache"))
    guard_mlflow_globals(monkeypatch)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


# -- tracking stores ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sqlite_store(tmp_path_factory) -> Store:
    """``sqlite:///<tmp>/mlflow.db``; every experiment gets an artifact_location under tmp."""
    root = tmp_path_factory.mktemp("sqlite-store")
    store = Store("sqlite", f"sqlite:///{root / 'mlflow.db'}", root / "artifacts")
    store.new_experiment("warmup")  # creates the tables once (the migrations take a few seconds)
    return store


@pytest.fixture
def store(request) -> Store:
    """Indirect parametrisation: ``"sqlite"`` or ``"server"`` (the session's ``mlflow server``,
    started only when asked for)."""
    if getattr(request, "param", "sqlite") == "server":
        return Store("server", request.getfixturevalue("mlflow_server").uri, None)
    return request.getfixturevalue("sqlite_store")


# -- data --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def small_digits() -> SmallDigits:
    """300 digits rows (10% of labels flipped) with unique, scrambled row ids."""
    from tracin_tasks.examples.digits import load_noisy_digits

    d = load_noisy_digits(noise=0.1, seed=0)
    n = 300
    rng = np.random.default_rng(1)
    row_ids = rng.permutation(100_000)[:n].astype(np.int64) + 7  # unique, not 0..n-1, not sorted
    images = np.ascontiguousarray(d.images[:n])
    labels = d.labels[:n].copy()
    frame = pd.DataFrame(images.reshape(n, -1), columns=[f"px_{i}" for i in range(64)])
    frame.insert(0, "label", labels)
    frame.insert(0, "row_id", row_ids)
    return SmallDigits(frame, images, labels, row_ids)
