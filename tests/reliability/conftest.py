"""Fixtures of the reliability tests (bad input, faults, security, trust, outputs), on top of the
shared harness (tests/_harness: the environment, Prefect's test server as ``prefect_api``, the
digits run, ``MlflowStore``).

What is here:

* ``api``: the session's Prefect test server, for in-process flows and for subprocesses
  (``PREFECT_API_URL``), so no subprocess pays for a temporary server of its own;
* ``mlflow_store`` (session): an MLflow sqlite store under the state folder, whose
  :meth:`~_harness.iris.MlflowStore.log_run` logs a small iris run with any defect;
* ``server_run``: the digits run logged through the harness's ``crashable_server``, a real
  ``mlflow server`` the fault tests crash and start again (it starts while Prefect's does);
* ``instant_task_retries``: the audit flow's tasks keep their retries but do not wait between them;
* helpers: :func:`audit` (the flow in this process), :func:`cli` (``tracin_tasks.cli.main``),
  :func:`assert_scores_match` (the audit's scores against the core's on the same run).
"""

from __future__ import annotations

import contextlib
import io
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from _harness import STATE, core_scores, restored_environ
from _harness.files import leftovers  # noqa: F401 - for the test modules
from _harness.iris import ARCH, DATA_PATH, FACTORY, LoggedRun, MlflowStore, iris_frame  # noqa: F401
from _harness.runs import mlflow_target as tracking_uri_set  # noqa: F401 - the name test_bad_input uses

from . import _faults_support as support


@pytest.fixture(scope="session")
def api(prefect_api) -> str:
    return prefect_api


@pytest.fixture
def instant_task_retries(monkeypatch):
    """The audit's plan and cell tasks keep their retries, without the 2-4-8 s waits between them.

    The flow looks its tasks up at call time, so this is the real flow with the real retry policy.
    """
    from tracin_tasks.orchestration import flows, tasks

    monkeypatch.setattr(flows, "plan_audit_task", tasks.plan_audit_task.with_options(retry_delay_seconds=0))
    monkeypatch.setattr(tasks, "score_cell_task", tasks.score_cell_task.with_options(retry_delay_seconds=0))


@pytest.fixture(scope="session")
def mlflow_store() -> MlflowStore:
    return MlflowStore(STATE / f"reliability-mlflow-{uuid.uuid4().hex[:6]}")


# -- the crashable server (the harness's ``crashable_server``) ------------------------------------
@pytest.fixture
def server_run(crashable_server) -> support.ServerRun:
    """The digits run logged through the crashable server (once per session); the server up."""
    return support.server_run(crashable_server)


# -- running an audit -----------------------------------------------------------------------------
AUDIT_DEFAULTS = {"shard_size": 4096, "batch_size": 64, "report": False, "log_to_mlflow": False}


def audit(run: LoggedRun, output_dir: Path, **kwargs) -> dict[str, Any]:
    """The audit flow in this process (Prefect's test server); raises what failed the flow."""
    from tracin_tasks.orchestration import audit_training_run

    params = {**AUDIT_DEFAULTS, **kwargs}
    params.setdefault("run_id", run.run_id)
    params.setdefault("tracking_uri", run.tracking_uri)
    return audit_training_run(output_dir=str(output_dir), **params)


def cli(*args: str) -> tuple[int, str, str]:
    """``tracin-tasks ARGS`` in this process: (exit code, stdout, stderr)."""
    from tracin_tasks.cli import main

    out, err = io.StringIO(), io.StringIO()
    with restored_environ(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def cli_audit_args(run: LoggedRun, output_dir: Path, *extra: str) -> list[str]:
    return ["audit", "--run-id", run.run_id, "--tracking-uri", run.tracking_uri, "--output", str(output_dir),
            "--batch-size", "64", "--no-validate", "--no-mlflow-report", *extra]


def assert_scores_match(result: dict[str, Any], run: LoggedRun, **source_kwargs: Any) -> None:
    """The audit's scores.parquet equals the core's self-influence, row by row."""
    got = pd.read_parquet(result["scores"]).set_index("row_id")["self_influence"]
    scores, table = core_scores(run.run_id, run.tracking_uri, 64,
                                cache_dir=STATE / f"oracle-cache-{uuid.uuid4().hex[:6]}", **source_kwargs)
    want = pd.Series(scores, index=table.row_ids, name="self_influence")
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-5, atol=0)
