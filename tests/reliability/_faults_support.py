"""What only the fault and security tests need, on top of the shared harness (tests/_harness),
whose helpers this module also offers (``support.files_containing``, ``support.MlflowServer``...):

* a model factory that waits before building the run's MLP, so a cell is slow enough to be
  interrupted half-way (as in tests/flows/test_distributed.py), and :func:`child_env`, the
  environment of a CLI subprocess that can import it;
* :func:`server_run`: the digits run (MLP, 3 checkpoints) logged through the crashable
  ``mlflow server`` (the harness's ``crashable_server`` fixture), and :func:`server_direct_scores`.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from _harness import *  # noqa: F401,F403 - the shared helpers, as ``support.<name>``
from _harness import STATE, MlflowServer, core_scores, subprocess_env, train_digits

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
    """Environment of a CLI subprocess: our state folders (created) under ``home``, the slow
    factory importable, one torch thread, Prefect's API at ``api_url`` when given."""
    env = subprocess_env(home, make_dirs=True, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(models_dir()), env["PYTHONPATH"]])
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


# -- the digits run on the crashable server -------------------------------------------------------
@dataclass(frozen=True)
class ServerRun:
    server: MlflowServer
    run_id: str


_SERVER_RUNS: dict[str, ServerRun] = {}
_LOCK = threading.Lock()


def server_run(server: MlflowServer) -> ServerRun:
    """The digits run (MLP, 3 epochs) logged through ``server`` (once per session), the server up."""
    with _LOCK:
        if server.uri not in _SERVER_RUNS:
            server.ensure_up()
            _SERVER_RUNS[server.uri] = ServerRun(server, train_digits(server.uri, "reliability", epochs=3).run_id)
    server.ensure_up()  # a test that crashed it may have left it down
    return _SERVER_RUNS[server.uri]


_SERVER_DIRECT: dict[str, np.ndarray] = {}


def server_direct_scores(run: ServerRun) -> np.ndarray:
    """Self-influence of the server run computed by the core directly (memoised)."""
    if run.run_id not in _SERVER_DIRECT:
        _SERVER_DIRECT[run.run_id] = core_scores(run.run_id, run.server.uri, 256,
                                                 cache_dir=STATE / f"direct-{uuid.uuid4().hex[:6]}")[0]
    return _SERVER_DIRECT[run.run_id]
