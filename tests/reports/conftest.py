"""Fixtures of the data-quality reporting tests (flagging, GX, report, flow, MLflow UI), on top of
the shared harness (tests/_harness: the environment, ``prefect_api``, ``mlflow_server``)."""

from __future__ import annotations

import pytest

from _harness import DigitsRun, Once, sqlite_store, train_digits
from _harness.plugin import warm_up


@pytest.fixture(scope="session", autouse=True)
def _session_cwd(session_cwd):
    """The working directory is a tmp folder while these tests run (MLflow may create ./mlflow.db)."""
    return session_cwd


def _train_sqlite_run() -> DigitsRun:
    uri, artifacts = sqlite_store("mlflow-reports")
    return train_digits(uri, "reports", epochs=2, artifact_root=artifacts)


_SQLITE_RUN = Once(_train_sqlite_run, "train-reports-run")
warm_up("sqlite_run", lambda request: _SQLITE_RUN.start())


@pytest.fixture(scope="session")
def sqlite_run() -> DigitsRun:
    """One real MLflow training run (digits, MLP, 2 epochs = 2 checkpoints) in a sqlite store under tmp."""
    return _SQLITE_RUN.get()
