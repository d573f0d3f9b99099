"""Helpers of the data-quality reporting tests; importing this module sets the environment.

All state lives in one temporary folder per pytest process (``STATE``): Prefect's home, the
matplotlib config, the tracin-tasks cache, the MLflow sqlite store and the ``mlflow server``
databases and artifacts. ``conftest.py`` imports this module first, so the environment is set
before any test module imports Prefect, MLflow or Great Expectations.
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

import pytest


def _state_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="tracin-reports-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


STATE = _state_dir()
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

_ENV = {
    "PREFECT_HOME": str(STATE / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GX_ANALYTICS_ENABLED": "False",
    "MPLCONFIGDIR": str(STATE / "mpl"),
    "TRACIN_TASKS_CACHE_DIR": str(STATE / "cache"),
}


def _setup_env() -> None:
    for key, value in _ENV.items():
        # when another test folder of the same pytest run already imported Prefect with its own
        # (temporary) home, keep it: Prefect settings must not change under a running process
        if key.startswith("PREFECT_") and "prefect" in sys.modules and os.environ.get(key):
            continue
        os.environ[key] = value
    for key in ("PREFECT_HOME", "MPLCONFIGDIR", "TRACIN_TASKS_CACHE_DIR"):
        os.makedirs(os.environ[key], exist_ok=True)  # a missing PREFECT_HOME hangs Prefect's server
    os.environ.pop("MLFLOW_TRACKING_URI", None)


_setup_env()


# -- helpers --------------------------------------------------------------------------------
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


@contextlib.contextmanager
def mlflow_globals_restored():
    """Training sets MLflow's process-wide tracking URI and experiment: put them back afterwards."""
    import mlflow
    import mlflow.tracking.fluent as fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_uri, saved_exp = tracking_utils._tracking_uri, fluent._active_experiment_id
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    saved_env = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        tracking_utils._tracking_uri, fluent._active_experiment_id = saved_uri, saved_exp
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class TrainedRun:
    run_id: str
    uri: str
    experiment_id: str
    n_rows: int = 1797


def train_run(uri: str, artifact_root: Path | None, prefix: str) -> TrainedRun:
    """``train_digits_run`` (MLP, 2 epochs) into a fresh experiment of ``uri``."""
    import mlflow

    from tracin_tasks.examples.train_digits import train_digits_run

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    location = (artifact_root / name).as_uri() if artifact_root is not None else None
    experiment_id = mlflow.MlflowClient(tracking_uri=uri).create_experiment(name, artifact_location=location)
    with mlflow_globals_restored(), one_torch_thread():
        run_id = train_digits_run(tracking_uri=uri, experiment=name, epochs=2, model="mlp", seed=0)
    return TrainedRun(run_id, uri, experiment_id)


class _Background:
    """A result computed on a thread (e.g. training while a server starts)."""

    def __init__(self, fn, *args):
        self._result = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), name="reports-bg", daemon=True)
        self._thread.start()

    def _run(self, fn, *args):
        try:
            self._result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - raised again in get()
            self._error = exc

    def get(self, timeout: float = 600):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("background work did not finish in time")
        if self._error is not None:
            raise self._error
        return self._result


# -- the MLflow server (test_mlflow_ui.py) ------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:<free port>, sqlite backend, artifacts under tmp; stopped by PID."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PYTEST_CURRENT_TEST")}
        env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'srv.db'}",
               "--artifacts-destination", str(self.root / "art"), "--workers", "1"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=3) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)  # SIGTERM on the server ends its workers too
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "<no log>"


# -- the browser --------------------------------------------------------------------------------
@contextlib.contextmanager
def chromium():
    """Headless Debian Chromium driven by Playwright (skips when either is missing)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); browser checks skipped")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
