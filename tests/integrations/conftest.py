"""Fixtures for the MLflow integration tests: tracking stores in tmp folders, a real server, runs.

Nothing here writes outside pytest's tmp folders and nothing downloads: the sqlite store and the
server keep their databases and artifacts under tmp, the tracin-tasks cache is a tmp folder, and
the working directory is a tmp folder while these tests run (MLflow resolves some defaults, like
``./mlruns``, against it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# MLflow reads this once, when it is imported (mlflow/__init__ starts its telemetry client), so it
# has to be in the environment before any test module imports mlflow; the session fixture below
# sets it again through monkeypatch for the record.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

mlflow = pytest.importorskip("mlflow")
import mlflow.tracking.fluent as _fluent  # noqa: E402
from mlflow.tracking._tracking_service import utils as _tracking_utils  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
MLP_FACTORY = "tracin_tasks.examples.digits:build_mlp"
MLFLOW_BIN = Path(sys.executable).parent / "mlflow"


# -- environment ------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory):
    """Telemetry off, progress bars off, caches and the working directory in tmp."""
    home = tmp_path_factory.mktemp("session")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.setenv("TRACIN_TASKS_CACHE_DIR", str(home / "tracin-cache"))
        mp.chdir(home)
        yield home


@pytest.fixture(autouse=True)
def _per_test_state(tmp_path, monkeypatch):
    """A cache folder per test, and MLflow's process-wide tracking URI / experiment put back after."""
    monkeypatch.setenv("TRACIN_TASKS_CACHE_DIR", str(tmp_path / "tracin-cache"))
    _guard_mlflow_globals(monkeypatch)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _guard_mlflow_globals(mp: pytest.MonkeyPatch) -> None:
    """Make ``mp``'s undo restore MLflow's global tracking URI and active experiment."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        mp.setenv(name, "placeholder")  # records the original value (or its absence) ...
        mp.delenv(name)  # ... and then removes it for the duration
    mp.setattr(_tracking_utils, "_tracking_uri", None)
    mp.setattr(_fluent, "_active_experiment_id", None)


@contextlib.contextmanager
def mlflow_target(uri: str):
    """Point MLflow's fluent API at ``uri`` for a block; everything global is put back after."""
    with pytest.MonkeyPatch.context() as mp:
        _guard_mlflow_globals(mp)
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()


# -- tracking stores ---------------------------------------------------------------------------
@dataclass
class Store:
    """A tracking backend: its URI and, for sqlite, where experiment artifacts go."""

    kind: str
    uri: str
    artifact_root: Path | None

    def new_experiment(self, prefix: str = "exp") -> str:
        """A fresh experiment (artifacts in tmp for sqlite, proxied by the server otherwise)."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        location = (self.artifact_root / name).as_uri() if self.artifact_root is not None else None
        return mlflow.MlflowClient(tracking_uri=self.uri).create_experiment(name, artifact_location=location)


@pytest.fixture(scope="session")
def sqlite_store(tmp_path_factory) -> Store:
    """``sqlite:///<tmp>/mlflow.db``; every experiment gets an artifact_location under tmp."""
    root = tmp_path_factory.mktemp("sqlite-store")
    store = Store("sqlite", f"sqlite:///{root / 'mlflow.db'}", root / "artifacts")
    store.new_experiment("warmup")  # creates the tables once (the migrations take a few seconds)
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Store:
    """A real ``mlflow server`` on a free port, sqlite backend and artifacts under tmp."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "wb")
    cmd = [
        str(MLFLOW_BIN), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'srv.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: {(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after 60 s: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.25)
        yield Store("server", uri, None)
    finally:
        _stop(proc)
        log.close()


@pytest.fixture
def store(request) -> Store:
    """Indirect parametrisation: ``"sqlite"`` or ``"server"`` (started only when asked for)."""
    kind = getattr(request, "param", "sqlite")
    return request.getfixturevalue("mlflow_server" if kind == "server" else "sqlite_store")


# -- data and models ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SmallDigits:
    """A few hundred digits rows with scrambled row ids, as a frame and as arrays."""

    frame: pd.DataFrame
    images: np.ndarray  # (n, 1, 8, 8) float32
    labels: np.ndarray  # int64
    row_ids: np.ndarray

    def dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(torch.from_numpy(self.images.copy()), torch.from_numpy(self.labels.copy()))


@pytest.fixture(scope="session")
def small_digits() -> SmallDigits:
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


def evolve(model: torch.nn.Module, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Nudge the weights (a stand-in for an epoch of training); return a copy of the state_dict."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- a real training run -----------------------------------------------------------------------
@dataclass(frozen=True)
class DigitsRun:
    run_id: str
    uri: str
    epochs: int
    learning_rate: float


@pytest.fixture(scope="module")
def digits_run(sqlite_store) -> DigitsRun:
    """``train_digits_run`` (MLP, 3 epochs) logged to the sqlite store, artifacts in tmp."""
    from tracin_tasks.examples.train_digits import train_digits_run

    experiment = f"tracin-digits-{uuid.uuid4().hex[:8]}"
    mlflow.MlflowClient(tracking_uri=sqlite_store.uri).create_experiment(
        experiment, artifact_location=(sqlite_store.artifact_root / experiment).as_uri()
    )
    with mlflow_target(sqlite_store.uri):
        run_id = train_digits_run(sqlite_store.uri, experiment=experiment, epochs=3, model="mlp")
    return DigitsRun(run_id, sqlite_store.uri, epochs=3, learning_rate=0.05)
