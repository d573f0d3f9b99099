"""Fixtures for the MLflow integration tests: tracking stores in tmp folders, a real server, runs.

Nothing here writes outside pytest's tmp folders and nothing downloads: the sqlite store and the
server keep their databases and artifacts under tmp, the tracin-tasks cache is a tmp folder, and
the working directory is a tmp folder while these tests run (MLflow resolves some defaults, like
``./mlflow.db``, against it).
"""

from __future__ import annotations

import os

# MLflow reads this once, when it is imported, so it is set before anything imports mlflow; the
# session fixture below sets it again through monkeypatch.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

mlflow = pytest.importorskip("mlflow")

from ._support import MLFLOW_BIN, DigitsRun, SmallDigits, Store, free_port, guard_mlflow_globals, mlflow_target  # noqa: E402


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
    log_path = root / "server.log"
    cmd = [
        str(MLFLOW_BIN), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'srv.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]
    uri = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server not healthy after 60 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
            yield Store("server", uri, None)
        finally:
            _stop(proc)


@pytest.fixture
def store(request) -> Store:
    """Indirect parametrisation: ``"sqlite"`` or ``"server"`` (started only when asked for)."""
    kind = getattr(request, "param", "sqlite")
    return request.getfixturevalue("mlflow_server" if kind == "server" else "sqlite_store")


# -- data and runs -----------------------------------------------------------------------------
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
