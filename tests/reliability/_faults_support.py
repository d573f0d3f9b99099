"""Helpers of the fault and security tests (tests/reliability/test_faults.py, test_security.py).

Importing this module sets the environment (through ``tests/orchestration/_support.py``, loaded
by path under the name the flow tests use, so one pytest process trains one digits run and keeps
one state folder): Prefect's home, caches and telemetry switches, before anything imports Prefect.

What lives here, shared by both modules within one pytest process:

* :func:`prefect_api`: the folder conftest's Prefect test server, for in-process flows and for
  subprocesses (``PREFECT_API_URL``), so no subprocess pays for a temporary server of its own;
* :class:`MlflowServer`: a real ``mlflow server`` that can be crashed (SIGKILL of its process
  group) and started again on the same port;
* :func:`server_run`: one digits run (MLP, 3 checkpoints) logged through such a server;
* a model factory that waits before building the run's MLP, so a cell is slow enough to be
  interrupted half-way (as in tests/flows/test_distributed.py).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NAME = "_tracin_orchestration_test_support"


def _load_orchestration_support():
    if _NAME not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "orchestration" / "_support.py"
        spec = importlib.util.spec_from_file_location(_NAME, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_NAME]


orch = _load_orchestration_support()  # sets PREFECT_HOME & co. (before any test module imports Prefect)
STATE: Path = orch.STATE
BIN: Path = orch.BIN
REPO_ROOT: Path = orch.REPO_ROOT
CELL_FIELDS = ("squared_norm", "loss", "margin", "predicted", "confidence")

# -- a model factory slow enough to be interrupted ------------------------------------------------
SLOW_FACTORY = "reliability_slow_factory:build_mlp_slowly"
_SLOW_FACTORY_SOURCE = """
import glob
import os
import time

from tracin_tasks.examples.digits import build_mlp


def build_mlp_slowly(**kwargs):
    time.sleep(float(os.environ.get("RELIABILITY_FACTORY_DELAY", "0.4")))
    # "PATTERN|N": once N files match PATTERN (N stored cells), every build waits for good, so a
    # test acts on an audit held still at a known point, however slowly the machine runs
    hold = os.environ.get("RELIABILITY_FACTORY_HOLD")
    if hold:
        pattern, n = hold.rsplit("|", 1)
        while len(glob.glob(pattern)) >= int(n):
            time.sleep(0.05)
    return build_mlp(**kwargs)
"""


def models_dir() -> Path:
    """A folder holding the slow factory's module, on this process's sys.path."""
    folder = STATE / "reliability-models"
    folder.mkdir(exist_ok=True)
    module = folder / "reliability_slow_factory.py"
    if not module.exists() or module.read_text() != _SLOW_FACTORY_SOURCE:
        module.write_text(_SLOW_FACTORY_SOURCE)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder


def child_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: our state folders, the slow factory importable, one torch thread."""
    env = orch.subprocess_env(home, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(models_dir()), env["PYTHONPATH"]])
    if api_url:
        env["PREFECT_API_URL"] = api_url
    for sub in ("prefect", "cache", "dask", "matplotlib"):
        (home / sub).mkdir(parents=True, exist_ok=True)  # a missing PREFECT_HOME hangs Prefect
    return env


def start_cli(args: list[str], env: dict[str, str], logs: Path, name: str = "cli") -> subprocess.Popen:
    """``python -m tracin_tasks.cli ARGS`` in its own process group, output in ``logs/name.{out,err}``."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "tracin_tasks.cli", *args], env=env, cwd=logs,
                                stdout=out, stderr=err, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this test started (the CLI and anything it spawned)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# -- Prefect --------------------------------------------------------------------------------------
def prefect_api(request) -> str:
    """The folder conftest's Prefect test server, the shared ``mlflow server`` starting meanwhile."""
    prestart_server()
    # the conftest trains on a thread while the harness imports Prefect's server: both import
    # SQLAlchemy's ORM, whose circular imports fail when two threads run them at once; import first
    import mlflow  # noqa: F401
    import prefect.testing.utilities  # noqa: F401
    import sqlalchemy.orm  # noqa: F401

    return request.getfixturevalue("prefect_api")


# -- the MLflow server ----------------------------------------------------------------------------
class MlflowServer:
    """``mlflow server`` on 127.0.0.1, sqlite backend, artifacts under ``root``; crashable, restartable."""

    def __init__(self, root: Path, app_name: str | None = None, env: dict[str, str] | None = None):
        self.root = root
        self.app_name = app_name  # "basic-auth": MLflow's own authentication
        self.extra_env = dict(env or {})
        self.port = orch.free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = root / "srv.db"
        self.artifacts = root / "artifacts"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PYTEST_CURRENT_TEST")}
        env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", **self.extra_env)
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination", str(self.artifacts),
               "--workers", "1", *(["--app-name", self.app_name] if self.app_name else [])]
        self.starts += 1
        with open(self.root / f"server-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

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
            time.sleep(0.25)

    def crash(self) -> None:
        """SIGKILL the server and its workers at once (its process group), like a machine going away."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the port is free again only once the workers are gone
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    pass
            except OSError:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)

    def ensure_up(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.wait_healthy()

    def tail(self, n: int = 4000) -> str:
        logs = sorted(self.root.glob("server-*.log"))
        return logs[-1].read_text(errors="replace")[-n:] if logs else "<no log>"


class TcpGate:
    """A TCP forwarder on 127.0.0.1 in front of a server: ``close()`` refuses new connections and
    cuts open ones (to a client, the server is gone), ``open()`` listens on the same port again.

    Used where a test needs the tracking server unreachable without paying for its restart.
    """

    def __init__(self, upstream_port: int):
        import socket

        self.upstream = ("127.0.0.1", upstream_port)
        self.port = orch.free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._socket = socket
        self._listener = None
        self._conns: list = []
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        sock = self._socket
        listener = sock.socket(sock.AF_INET, sock.SOCK_STREAM)
        listener.setsockopt(sock.SOL_SOCKET, sock.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="tcp-gate", daemon=True).start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(self._socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(self._socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = self._socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(2)


@dataclass(frozen=True)
class ServerRun:
    server: MlflowServer
    run_id: str
    experiment: str
    epochs: int = 3
    n_rows: int = 1797


_SERVER_RUN: ServerRun | None = None
_SERVER: MlflowServer | None = None
_SERVER_LOCK = threading.Lock()


def prestart_server() -> MlflowServer:
    """Start the shared ``mlflow server`` process now (it takes a while), without waiting for it."""
    global _SERVER
    if _SERVER is None:
        _SERVER = MlflowServer(STATE / f"mlflow-server-{uuid.uuid4().hex[:6]}")
        _SERVER.start()
        atexit.register(_SERVER.stop)
    return _SERVER


def server_run() -> ServerRun:
    """One digits run (MLP, 3 epochs) logged through a real ``mlflow server`` (once per process)."""
    global _SERVER_RUN
    with _SERVER_LOCK:
        if _SERVER_RUN is None:
            import mlflow
            import torch

            from tracin_tasks.examples.train_digits import train_digits_run

            server = prestart_server()
            server.wait_healthy()
            experiment = f"reliability-{uuid.uuid4().hex[:8]}"
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with mlflow_globals_restored():
                    run_id = train_digits_run(tracking_uri=server.uri, experiment=experiment, epochs=3, model="mlp",
                                              seed=0)
            finally:
                torch.set_num_threads(threads)
            while mlflow.active_run() is not None:
                mlflow.end_run()
            _SERVER_RUN = ServerRun(server, run_id, experiment)
        _SERVER_RUN.server.ensure_up()  # a test that crashed it may have left it down
        return _SERVER_RUN


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


_SERVER_DIRECT: dict[str, np.ndarray] = {}


def server_direct_scores(run: ServerRun) -> np.ndarray:
    """Self-influence of the server run computed by the core directly (memoised)."""
    if run.run_id not in _SERVER_DIRECT:
        from tracin_tasks.core.tracin import TracIn
        from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

        source = MlflowCheckpointSource(run.run_id, run.server.uri, cache_dir=STATE / f"direct-{uuid.uuid4().hex[:6]}")
        table = source.training_table()
        with orch.one_torch_thread():
            _SERVER_DIRECT[run.run_id] = TracIn(source.build_model(), source.checkpoints()).self_influence(
                table.dataset(), 256)
    return _SERVER_DIRECT[run.run_id]


# -- the results store on disk ---------------------------------------------------------------------
def cell_files(results: Path) -> dict[str, tuple[int, str]]:
    """name → (mtime_ns, sha256) of every finished cell file under a results folder."""
    return {str(p.relative_to(results)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(results.rglob("*.npz"))}


def assert_complete_cells(results: Path) -> int:
    """Every ``*.npz`` under ``results`` is a whole cell (all fields, one length); returns how many."""
    import json

    from tracin_tasks.orchestration.plan import Cell

    n = 0
    for plan_path in results.glob("*/plan.json"):
        plan = json.loads(plan_path.read_text())
        cells = [Cell.from_dict(c) for c in plan["cells"]]
        sizes = {f"{c.name}.npz": c.row_stop - c.row_start for c in cells}
        for path in (plan_path.parent / "cells").glob("*.npz"):
            assert path.name in sizes, f"{path.name} is not a cell of the plan"
            with np.load(path, allow_pickle=False) as data:
                assert sorted(data.files) == sorted(CELL_FIELDS), path
                for key in CELL_FIELDS:
                    assert len(data[key]) == sizes[path.name], (path, key)
            n += 1
    return n


def files_containing(root: Path, needle: bytes, user: str = "auditor") -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle``, URL-quoted, base64, or as the
    base64 of a Basic ``Authorization`` header for ``user``."""
    import base64
    from urllib.parse import quote

    forms = {needle, quote(needle.decode()).encode(), base64.b64encode(needle),
             base64.b64encode(user.encode() + b":" + needle)}
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(f in data for f in forms):
                hits.append(str(path))
    return hits


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
