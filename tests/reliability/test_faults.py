"""Faults during an audit, each through the real flow or CLI: the audit survives with the scores
a clean single pass gives, and nothing is lost, duplicated, or half-written and then read.

* the flow's process SIGKILLed mid-run, then re-run;
* the MLflow tracking server crashed (SIGKILL) during a checkpoint download and restarted within
  the retry window; unreachable for good mid-run (a typed error naming the URI without its
  password, no report, and a re-run once it is back reuses the stored cells);
* the disk filling up while a cell is written (ENOSPC half-way through the temporary file);
* two audits of the same run, into the same output folder and results store, at the same time.

A Dask worker killed mid-cell is tests/flows/test_distributed.py (real scheduler and workers).

Every comparison is with the core (``TracIn(...).self_influence``) on the same checkpoints.
Prefect's waits between a failed cell's retries (2, 4, 8 s) are set to 0 where a test makes a
cell fail on purpose: the retries still happen, only without the wait.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from . import _faults_support as support

pytest.importorskip("prefect")
pytest.importorskip("mlflow")

SECRET = "PLANTED_SECRET_123"


@pytest.fixture(scope="module", autouse=True)
def _fast_factory():
    """The slow model factory is only slow in the runs that must be caught half-way."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RELIABILITY_FACTORY_DELAY", "0")
        yield


@pytest.fixture(scope="module")
def digits(api, digits_run):
    """The session's sqlite digits run (MLP, 3 checkpoints, 1,797 rows)."""
    return digits_run


def audit(tracking_uri: str, run_id: str, output_dir: Path, results_uri: str | None = None, **kwargs):
    """The flow in this process; returns its final state (``state.result()`` raises what failed it)."""
    from tracin_tasks.orchestration import audit_training_run

    kwargs.setdefault("report", False)
    return audit_training_run(run_id=run_id, tracking_uri=tracking_uri, output_dir=str(output_dir),
                              results_uri=results_uri, return_state=True, **kwargs)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def source_log():
    """Messages of the MLflow checkpoint source (its retry warnings)."""
    handler = _Records()
    logger = logging.getLogger("tracin_tasks.integrations.mlflow.client")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def assert_no_outputs(out: Path) -> None:
    for name in ("scores.parquet", "issues.parquet", "report.html"):
        assert not (out / name).exists(), f"{name} written by a failed audit"


# 1 -- the flow's process killed mid-run --------------------------------------------------------
def test_flow_process_killed_mid_run_is_resumed_by_a_rerun(api, digits, tmp_path):
    """SIGKILL the CLI's whole process group after a few of its 18 cells are stored; re-run.

    Once 4 cells are stored, every later model build waits (each cell builds the model first, and
    the CLI's one thread runs cells one after another), so the kill lands with exactly 4 stored,
    however slowly the machine runs the test.
    """
    out = tmp_path / "out"
    results = out / "cells"
    env = support.child_env(tmp_path / "state", api, RELIABILITY_FACTORY_DELAY="0.05",
                            RELIABILITY_FACTORY_HOLD=f"{results}/*/cells/*.npz|4")
    args = ["audit", "--run-id", digits.run_id, "--tracking-uri", digits.tracking_uri, "--output", str(out),
            "--shard-size", "300", "--batch-size", "60", "--model-factory", support.SLOW_FACTORY,
            "--no-validate", "--no-mlflow-report"]
    proc = support.start_cli(args, env, tmp_path / "logs")
    try:
        support.wait_for(lambda: proc.poll() is not None or len(list(results.glob("*/cells/*.npz"))) >= 4,
                         timeout=300, what="4 stored cells")
    finally:
        support.kill_group(proc)
    logs = (tmp_path / "logs" / "cli.err").read_text(errors="replace")[-3000:]
    assert proc.returncode == -9, f"the CLI ended before it was killed:\n{logs}"

    at_kill = support.cell_files(results)
    assert len(at_kill) == 4, f"{len(at_kill)} cells at the kill: the hold did not stop the audit"
    assert support.assert_complete_cells(results) == len(at_kill)  # every file named like a cell is whole
    leftovers = [p for p in results.rglob("*") if p.is_file() and p.suffix not in (".npz", ".json")]
    assert all(p.name.endswith(".tmp") for p in leftovers), leftovers  # a write cut short stays a .tmp
    assert_no_outputs(out)

    state = audit(digits.tracking_uri, digits.run_id, out, str(results), shard_size=300, batch_size=60,
                  model_factory=support.SLOW_FACTORY)
    summary = state.result()
    assert (summary["cells"], summary["skipped"], summary["computed"]) == (18, len(at_kill), 18 - len(at_kill))
    after = support.cell_files(results)
    assert {k: after[k] for k in at_kill} == at_kill, "a cell finished before the kill was rewritten"
    assert len(after) == 18 and support.assert_complete_cells(results) == 18
    frame = pd.read_parquet(summary["scores"])
    scores, table = support.direct_scores(digits)
    np.testing.assert_allclose(frame["self_influence"].to_numpy(), scores, rtol=1e-6)
    np.testing.assert_array_equal(frame["row_id"].to_numpy(), table.row_ids)


# 2, 3 -- the tracking server down during checkpoint download ------------------------------------
def _crash_at_download(monkeypatch, run, artifact: str, restart_after: float | None) -> dict:
    """Crash the server just before ``artifact`` is first downloaded; start it again after a while."""
    from tracin_tasks.integrations.mlflow.cache import RunCache

    original = RunCache.download
    outage: dict = {}

    def restart():
        time.sleep(restart_after)
        run.server.start()
        run.server.wait_healthy()
        outage["back"] = time.monotonic()

    def download(self, artifact_path, *args, **kwargs):
        if artifact_path == artifact and "down" not in outage:
            run.server.crash()
            outage["down"] = time.monotonic()
            if restart_after is not None:
                threading.Thread(target=restart, name="mlflow-restart", daemon=True).start()
        return original(self, artifact_path, *args, **kwargs)

    monkeypatch.setattr(RunCache, "download", download)
    return outage


@pytest.fixture
def server(api, server_run, monkeypatch, tmp_path):
    """The run on the real ``mlflow server``; a fresh download cache, so checkpoints are fetched."""
    run = server_run
    support.server_direct_scores(run)  # while the server is up
    monkeypatch.setenv("TRACIN_TASKS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our retries, not MLflow's
    yield run
    run.server.ensure_up()


def test_tracking_server_down_for_a_while_during_download(server, monkeypatch, source_log, tmp_path):
    """Crashed just as step 1's checkpoint is downloaded (while planning, which fetches and checks
    every checkpoint into the cache the cells read), started again 2 s later (plus its start-up,
    which on a loaded machine can take tens of seconds): the retries span it, the audit succeeds."""
    # attempts that outlast the harness's own start-up allowance (4 s apart, about 270 s in all):
    # only the server's coming back ends them, however long a loaded machine takes to start it
    monkeypatch.setenv("TRACIN_TASKS_MLFLOW_RETRIES", "70")
    monkeypatch.setenv("TRACIN_TASKS_MLFLOW_BACKOFF", "0.5")
    monkeypatch.setenv("TRACIN_TASKS_MLFLOW_BACKOFF_MAX", "4")
    outage = _crash_at_download(monkeypatch, server, "checkpoints/step_1/state_dict.pt", restart_after=2.0)
    out = tmp_path / "out"
    summary = audit(server.server.uri, server.run_id, out, shard_size=900).result()

    assert "down" in outage and "back" in outage, outage
    retried = [m for m in source_log if "did not answer (download checkpoints/step_1/state_dict.pt)" in m]
    assert retried, source_log[-10:]
    assert (summary["cells"], summary["computed"]) == (6, 6)
    assert support.assert_complete_cells(Path(summary["results_uri"])) == 6
    np.testing.assert_allclose(pd.read_parquet(summary["scores"])["self_influence"].to_numpy(),
                               support.server_direct_scores(server), rtol=1e-6)


def _cut_at_cell(monkeypatch, gate: support.TcpGate, nth: int) -> dict:
    """Make the server unreachable for good as the ``nth`` cell starts (its model spec needs it)."""
    from tracin_tasks.orchestration import tasks

    original = tasks.compute_cell
    seen: dict = {"cells": 0}

    def compute_cell(*args, **kwargs):
        seen["cells"] += 1
        if seen["cells"] == nth:
            gate.close()
        return original(*args, **kwargs)

    monkeypatch.setattr(tasks, "compute_cell", compute_cell)  # the cell task looks it up at call time
    return seen


def test_tracking_server_down_for_good_fails_clearly_without_a_report(server, monkeypatch, instant_task_retries,
                                                                       tmp_path):
    """Unreachable from the 3rd of 6 cells on, never back. The cells need nothing more from the
    server once the audit is planned (checkpoints cached, model spec in the plan), so all 6 are
    stored; logging the report to MLflow then fails with a typed error naming the URI (never the
    password of MLFLOW_TRACKING_PASSWORD), and nothing is published. Once the server answers
    again, a re-run reuses all 6 cells and publishes.

    The audit reaches the server through a TCP gate that is closed (new connections refused, open
    ones cut: what a client sees of a server that died), so the server need not be restarted.
    """
    from tracin_tasks.exceptions import TrackingServerUnavailableError

    monkeypatch.setenv("TRACIN_TASKS_MLFLOW_RETRIES", "2")
    monkeypatch.setenv("TRACIN_TASKS_MLFLOW_BACKOFF", "0.1")
    gate = support.TcpGate(server.server.port)
    seen = _cut_at_cell(monkeypatch, gate, nth=3)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "auditor")  # the server ignores them
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    uri = gate.uri
    out = tmp_path / "out"
    results = tmp_path / "cells"
    state = audit(uri, server.run_id, out, str(results), shard_size=900, report=True, validate_results=True)
    with pytest.raises(TrackingServerUnavailableError) as info:
        state.result()
    assert seen["cells"] == 6
    message = str(info.value)
    assert f"http://127.0.0.1:{gate.port}" in message and "did not answer" in message and "not published" in message
    assert SECRET not in message
    assert info.value.__cause__ is None or SECRET not in str(info.value.__cause__)
    assert_no_outputs(out)
    stored = support.cell_files(results)
    assert len(stored) == 6 and support.assert_complete_cells(results) == 6

    gate.open()  # back; the hook cuts it only once
    try:
        summary = audit(uri, server.run_id, out, str(results), shard_size=900).result()
    finally:
        gate.close()
    assert (summary["skipped"], summary["computed"]) == (6, 0)
    assert support.cell_files(results) == stored
    np.testing.assert_allclose(pd.read_parquet(summary["scores"])["self_influence"].to_numpy(),
                               support.server_direct_scores(server), rtol=1e-6)


# 4 -- disk full while a cell is written -----------------------------------------------------------
class _FullFile:
    """A file on a disk that fills up: the first write lands half, then ENOSPC."""

    def __init__(self, inner):
        self.inner = inner

    def write(self, data):
        self.inner.write(bytes(data[: len(data) // 2]))
        self.inner.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _disk_full_fs(full_after: int):
    """A local filesystem under ``fullfs://`` whose disk is full after ``full_after`` cell files."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    class DiskFullFileSystem(LocalFileSystem):
        protocol = ("fullfs",)
        cells_written = 0
        partial_writes = 0

        def _open(self, path, mode="rb", block_size=None, **kwargs):
            f = super()._open(path, mode, block_size, **kwargs)
            if "w" in mode and ".npz." in path and path.endswith(".tmp"):  # a cell's temporary file
                cls = type(self)
                if cls.cells_written >= full_after:
                    cls.partial_writes += 1
                    return _FullFile(f)
                cls.cells_written += 1
            return f

    fsspec.register_implementation("fullfs", DiskFullFileSystem, clobber=True)
    return DiskFullFileSystem


def test_disk_full_while_writing_a_cell(api, digits, instant_task_retries, tmp_path):
    from tracin_tasks.exceptions import ResultsStoreError

    fs = _disk_full_fs(full_after=3)
    results = tmp_path / "cells"
    out = tmp_path / "out"
    state = audit(digits.tracking_uri, digits.run_id, out, f"fullfs://{results}", shard_size=600)
    with pytest.raises(ResultsStoreError) as info:
        state.result()
    assert "No space left on device" in str(info.value) and ".npz" in str(info.value)
    assert fs.partial_writes >= 1  # half a cell did reach the disk, under its temporary name
    assert_no_outputs(out)
    stored = support.cell_files(results)
    assert len(stored) == 3 and support.assert_complete_cells(results) == 3
    assert not [p for p in results.rglob("*.tmp")], "the half-written temporary file was left behind"

    summary = audit(digits.tracking_uri, digits.run_id, out, str(results), shard_size=600).result()  # disk freed
    assert (summary["cells"], summary["skipped"], summary["computed"]) == (9, 3, 6)
    assert {k: v for k, v in support.cell_files(results).items() if k in stored} == stored
    np.testing.assert_allclose(pd.read_parquet(summary["scores"])["self_influence"].to_numpy(),
                               support.direct_scores(digits)[0], rtol=1e-6)


# 5 -- two audits of the same run at once -------------------------------------------------------
def test_two_audits_of_the_same_run_at_once(api, digits, tmp_path):
    """Two CLI processes, one output folder and results store, flagging and report.html on: they
    take turns on the folder (its lock), so both succeed, and the second reuses the first's cells.
    (With Great Expectations on as well, ten times over: tests/reliability/test_outputs.py.)"""
    out = tmp_path / "out"
    args = ["audit", "--run-id", digits.run_id, "--tracking-uri", digits.tracking_uri, "--output", str(out),
            "--shard-size", "600", "--model-factory", support.SLOW_FACTORY, "--no-mlflow-report", "--no-validate"]
    procs = []
    for name in ("a", "b"):
        env = support.child_env(tmp_path / f"state-{name}", api, RELIABILITY_FACTORY_DELAY="0.3")
        procs.append((name, support.start_cli(args, env, tmp_path / "logs", name=name)))
    outcomes = {}
    try:
        for name, proc in procs:
            proc.wait(timeout=400)
            outcomes[name] = (proc.returncode, *support.cli_output(tmp_path / "logs", name))
    except subprocess.TimeoutExpired:
        for _, proc in procs:
            support.kill_group(proc)
        raise
    codes = sorted(code for code, _, _ in outcomes.values())
    assert codes == [0, 0], {n: (c, e[-3000:]) for n, (c, _, e) in outcomes.items()}
    for code, stdout, stderr in outcomes.values():
        assert f"audited run {digits.run_id}: 1797 rows" in stdout, stdout[-2000:]
        assert f"report: {out / 'report.html'}" in stdout
    assert sorted(int(stdout.split(" cells computed")[0].rsplit(" ", 1)[-1]) for _, stdout, _ in
                  outcomes.values())[0] == 0  # the second took its turn after the first: it computed none

    results = out / "cells"
    assert support.assert_complete_cells(results) == 9  # each cell once, whole
    assert len([p for p in results.rglob("*") if p.is_file() and p.suffix == ".json"]) == 1  # one plan
    frame = pd.read_parquet(out / "scores.parquet")
    np.testing.assert_allclose(frame["self_influence"].to_numpy(), support.direct_scores(digits)[0], rtol=1e-6)
    issues = pd.read_parquet(out / "issues.parquet")
    assert len(issues) == 1797 and issues["row_id"].is_unique
    assert (out / "report.html").read_text().rstrip().endswith("</html>")
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
