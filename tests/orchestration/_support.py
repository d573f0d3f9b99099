"""Shared by tests/orchestration and tests/flows (loaded by path from both conftests).

Everything stays in one temporary state folder per pytest process: Prefect's home, the
tracin-tasks download cache, Dask's scratch space, the MLflow sqlite store and its artifacts.
The environment is set when this module is first loaded, i.e. when a conftest of these two
folders is imported, before any test module imports Prefect.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _state_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="tracin-orch-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


STATE = _state_dir()


def quiet_env(home: Path) -> dict[str, str]:
    """The variables every process of these tests gets (state under ``home``, nothing phones home)."""
    return {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "GX_ANALYTICS_ENABLED": "False",
        "TRACIN_TASKS_CACHE_DIR": str(home / "cache"),
        "DASK_TEMPORARY_DIRECTORY": str(home / "dask"),
        "MPLCONFIGDIR": str(home / "matplotlib"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }


def _setup_env() -> None:
    for key, value in quiet_env(STATE).items():
        os.environ[key] = value
    # Prefect's temporary server silently waits out its start-up timeout when PREFECT_HOME is missing
    for key in ("PREFECT_HOME", "TRACIN_TASKS_CACHE_DIR", "DASK_TEMPORARY_DIRECTORY", "MPLCONFIGDIR"):
        os.makedirs(os.environ[key], exist_ok=True)


_setup_env()


def subprocess_env(home: Path, **extra: str) -> dict[str, str]:
    """os.environ without any Prefect API or MLflow target, plus :func:`quiet_env` under ``home``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_API_KEY", "MLFLOW_TRACKING_URI", "PYTEST_CURRENT_TEST")}
    env.update(quiet_env(home))
    # the models are tiny and CI has 2 shared cores: one torch thread per process is fastest
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


# -- the MLflow training run every test of these folders audits -------------------------------
@dataclass(frozen=True)
class DigitsRun:
    run_id: str
    tracking_uri: str
    epochs: int
    n_rows: int


_RUN: DigitsRun | None = None
_RUN_LOCK = threading.Lock()


def digits_run() -> DigitsRun:
    """``train_digits_run`` (MLP, 3 epochs, seed 0) on a sqlite store under the state folder; once per session."""
    with _RUN_LOCK:
        return _train_once()


def _train_once() -> DigitsRun:
    global _RUN
    if _RUN is None:
        import mlflow
        import mlflow.tracking.fluent as fluent
        import torch
        from mlflow.tracking._tracking_service import utils as tracking_utils

        from tracin_tasks.examples.train_digits import train_digits_run

        root = STATE / "mlflow"
        root.mkdir(exist_ok=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        experiment = f"orchestration-{uuid.uuid4().hex[:8]}"
        # training sets MLflow's process-wide tracking URI and experiment: put them back afterwards
        saved_uri, saved_exp = tracking_utils._tracking_uri, fluent._active_experiment_id
        saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny MLP on 2 shared cores: one thread is several times faster
        try:
            mlflow.MlflowClient(tracking_uri=uri).create_experiment(
                experiment, artifact_location=(root / "artifacts" / experiment).as_uri()
            )
            run_id = train_digits_run(tracking_uri=uri, experiment=experiment, epochs=3, model="mlp", seed=0)
        finally:
            torch.set_num_threads(threads)
            while mlflow.active_run() is not None:
                mlflow.end_run()
            tracking_utils._tracking_uri, fluent._active_experiment_id = saved_uri, saved_exp
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        _RUN = DigitsRun(run_id, uri, epochs=3, n_rows=1797)
    return _RUN


@contextlib.contextmanager
def restored_environ():
    """Put os.environ back afterwards (the CLI's main sets defaults in it when called in-process)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models on 2 shared cores: one intra-op thread is several times faster than two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_in_background() -> threading.Thread:
    """Start training on a thread (e.g. while a server starts); :func:`digits_run` waits for it."""

    def target():
        try:
            digits_run()
        except Exception:  # noqa: BLE001 - the fixture's own call raises it again, in the test
            pass

    thread = threading.Thread(target=target, name="train-digits", daemon=True)
    thread.start()
    return thread


_DIRECT: dict[int, object] = {}


def direct_scores(run: DigitsRun, batch_size: int = 256):
    """Self-influence computed by the core directly, on the same run (memoised per batch size)."""
    if batch_size not in _DIRECT:
        from tracin_tasks.core.tracin import TracIn
        from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

        source = MlflowCheckpointSource(run.run_id, run.tracking_uri)
        table = source.training_table()
        scores = TracIn(source.build_model(), source.checkpoints()).self_influence(table.dataset(), batch_size)
        _DIRECT[batch_size] = (scores, table)
    return _DIRECT[batch_size]


# -- processes --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds (by PID, only processes these tests started)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=30)


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f}s:\n{tail(log)}")
        time.sleep(0.5)


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"
