"""The audit on real processes: a Prefect server, a Dask scheduler and two GPU-annotated workers.

Everything listens on 127.0.0.1 on free ports and keeps its state under tmp. While the CLI's
audit runs, a worker in the middle of a cell (its result not stored yet) is killed with SIGKILL
(no nanny, so nothing restarts it): the cell must be rescheduled on the other worker and the
audit must still finish with the scores the core computes directly. ``--gpu`` only makes every
cell ask for one unit of the workers' ``GPU`` resource; on a CPU machine cells compute on the CPU.

A cell of this small run computes in a few milliseconds, far too fast to be caught half-way. The
audit therefore builds the model with ``--model-factory`` pointing at a factory that waits half a
second before building the run's own MLP (a module on the workers' PYTHONPATH, as a user's own
model module would be): every cell spends that time between starting and storing its result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _harness import cli_output as output

SHARD = 300
BATCH = 60  # divides SHARD, so cells batch rows exactly as the direct computation does
SLOW_FACTORY = "slow_digits_factory:build_mlp_slowly"
SLOW_FACTORY_SOURCE = """
import os
import time

from tracin_tasks.examples.digits import build_mlp


def build_mlp_slowly(**kwargs):
    time.sleep(0.5)
    # while this file exists, builds wait: a cell stays running until the test has killed its worker
    hold = os.environ.get("DISTRIBUTED_FACTORY_HOLD")
    while hold and os.path.exists(hold):
        time.sleep(0.05)
    return build_mlp(**kwargs)
"""
N_CELLS = 18  # 3 checkpoints x ceil(1797 / 300)
START_TIMEOUT = 240  # generous: nothing here asserts on timing


@pytest.fixture(scope="module")
def cluster(prefect_api, support, digits_run, tmp_path_factory):
    """Start the server, scheduler and workers at once; stop each by PID afterwards.

    The session's Prefect test server (``prefect_api``) starts first even though the audit here
    talks to its own server: Prefect's events worker is process-wide and binds to the first server
    this process talks to, and one bound to this module's server (gone after the module) would hang
    the session's teardown when this module runs before any other Prefect test in its process."""
    root = tmp_path_factory.mktemp("distributed")
    home = root / "state"
    api_port, scheduler_port = support.free_port(), support.free_port()
    while scheduler_port == api_port:
        scheduler_port = support.free_port()
    api = f"http://127.0.0.1:{api_port}/api"
    scheduler = f"tcp://127.0.0.1:{scheduler_port}"
    models = root / "models"
    models.mkdir()
    (models / "slow_digits_factory.py").write_text(SLOW_FACTORY_SOURCE)
    env = support.subprocess_env(home, make_dirs=True, PREFECT_API_URL=api, DISTRIBUTED_FACTORY_HOLD=str(root / "hold"))
    env["PYTHONPATH"] = os.pathsep.join([str(models), env["PYTHONPATH"]])

    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}

    def start(name, cmd, env_):
        logs[name] = root / f"{name}.log"
        procs[name] = support.start_logged(cmd, env=env_, cwd=root, log=logs[name])

    def workers_connected(client) -> bool:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{support.tail(logs[name])}")
        return len(client.scheduler_info()["workers"]) >= 2

    bin_ = support.BIN
    try:
        start("prefect-server", [str(bin_ / "prefect"), "server", "start", "--host", "127.0.0.1",
                                 "--port", str(api_port), "--analytics-off"], support.subprocess_env(home))
        start("scheduler", [str(bin_ / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(scheduler_port),
                            "--no-dashboard"], env)
        for i in range(2):
            start(f"worker{i}", [str(bin_ / "dask"), "worker", scheduler, "--name", f"worker{i}", "--nthreads", "1",
                                 "--nworkers", "1", "--no-nanny", "--resources", "GPU=1", "--death-timeout", "120",
                                 "--local-directory", str(home / "dask" / f"worker{i}")], env)
        support.direct_scores(digits_run, batch_size=BATCH)  # the reference, while the processes start
        support.wait_for_http(f"{api}/health", procs["prefect-server"], logs["prefect-server"], START_TIMEOUT)

        from distributed import Client

        with Client(scheduler, timeout=START_TIMEOUT) as client:
            support.wait_for(lambda: workers_connected(client), START_TIMEOUT, interval=0.5,
                             what="both Dask workers connected")
            workers = client.scheduler_info()["workers"]
            assert sorted(w["resources"].get("GPU") for w in workers.values()) == [1, 1]
        yield {"root": root, "env": env, "api": api, "scheduler": scheduler, "procs": procs, "logs": logs}
    finally:
        for name in sorted(procs, key=lambda n: n == "prefect-server"):  # workers first, the server last
            support.stop_process(procs[name])


def _executing_cells(dask_worker):
    """Runs inside a worker: the cells it is computing now, with their Prefect task run ids."""
    found = []
    for ts in list(dask_worker.state.executing):
        kwargs = getattr(ts.run_spec, "kwargs", None) or {}
        cell = (kwargs.get("parameters") or {}).get("cell")
        if isinstance(cell, dict):
            found.append({"cell": dict(cell), "task_run_id": str(kwargs.get("task_run_id"))})
    return found


def cell_file(out: Path, cell: dict) -> list[Path]:
    return list(out.glob(f"cells/*/cells/step{cell['step']:06d}_rows{cell['row_start']:09d}-{cell['row_stop']:09d}_*.npz"))


class VictimFinder:
    """Finds a worker in the middle of a cell: its Prefect task run is RUNNING, its result not stored."""

    def __init__(self, scheduler: str, api: str, out: Path):
        import cloudpickle
        from distributed import Client
        from prefect.client.orchestration import SyncPrefectClient

        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
        self.out = out
        self.dask = Client(scheduler, timeout=30)
        self.prefect = SyncPrefectClient(api)
        self.prefect.__enter__()

    def close(self):
        self.dask.close()
        self.prefect.__exit__(None, None, None)

    def find(self):
        """(worker name, cell, task run id), or None."""
        from prefect.exceptions import ObjectNotFound

        names = {addr: w["name"] for addr, w in self.dask.scheduler_info()["workers"].items()}
        for addr, cells in self.dask.run(_executing_cells).items():
            for item in cells:
                if cell_file(self.out, item["cell"]):
                    continue
                try:
                    state = self.prefect.read_task_run(item["task_run_id"]).state
                except ObjectNotFound:  # the worker has not created the task run yet
                    continue
                if state is not None and state.is_running() and not cell_file(self.out, item["cell"]):
                    return names[addr], item["cell"], item["task_run_id"]
        return None


def test_audit_survives_a_killed_worker(cluster, digits_run, support, capsys, monkeypatch):
    out = cluster["root"] / "audit"
    args = ["audit", "--run-id", digits_run.run_id, "--tracking-uri", digits_run.tracking_uri, "--output", str(out),
            "--task-runner", cluster["scheduler"], "--gpu", "--shard-size", str(SHARD), "--batch-size", str(BATCH),
            "--model-factory", SLOW_FACTORY, "--no-validate", "--no-mlflow-report"]
    procs = cluster["procs"]
    audit = support.start_cli(args, cluster["env"], cluster["root"])
    try:
        # once a cell is stored, kill a worker in the middle of another one
        deadline = time.monotonic() + 300
        while not list(out.glob("cells/*/cells/*.npz")):
            assert audit.poll() is None, f"the audit ended before any cell was stored:\n{output(cluster['root'])}"
            assert time.monotonic() < deadline, "no cell stored within 300 s"
            time.sleep(0.1)
        # from now on every model build waits: the next cells stay running, so one is surely caught
        hold = cluster["root"] / "hold"
        hold.touch()
        finder = VictimFinder(cluster["scheduler"], cluster["api"], out)
        try:
            victim = None
            while victim is None and audit.poll() is None and time.monotonic() < deadline:
                victim = finder.find()
            assert victim is not None, "no worker was ever caught in the middle of a cell"
            name, cell, task_run_id = victim
            os.kill(procs[name].pid, signal.SIGKILL)
        finally:
            finder.close()
            hold.unlink(missing_ok=True)
        procs[name].wait(timeout=30)
        assert not cell_file(out, cell), "the worker was killed before its cell was stored"
        audit.wait(timeout=420)
    finally:
        if audit.poll() is None:
            support.stop_process(audit)
    stdout, stderr = output(cluster["root"])
    assert audit.returncode == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-6000:]}"
    assert f"{N_CELLS} cells computed, 0 reused" in stdout, stdout
    assert len(cell_file(out, cell)) == 1, "the killed cell was computed again elsewhere"
    survivor = next(n for n in ("worker0", "worker1") if n != name)
    assert procs[survivor].poll() is None

    frame = pd.read_parquet(out / "scores.parquet")
    scores, table = support.direct_scores(digits_run, batch_size=BATCH)
    np.testing.assert_allclose(frame["self_influence"].to_numpy(), scores, rtol=1e-9)
    np.testing.assert_array_equal(frame["row_id"].to_numpy(), table.row_ids)
    np.testing.assert_array_equal(frame["label"].to_numpy(), table.labels)
    assert len(list(out.glob("cells/*/cells/step*.npz"))) == N_CELLS

    # Prefect saw the killed cell's task run start twice and complete
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(cluster["api"]) as client:
        run = client.read_task_run(task_run_id)
        history = [s.type.value for s in client.read_task_run_states(task_run_id)]
    assert run.name == f"step {cell['step']} rows {cell['row_start']}-{cell['row_stop']}"
    assert run.state.is_completed(), history
    assert history.count("RUNNING") >= 2, history

    # the same audit again (the CLI's main in this process, to spare starting one more): every cell is reused
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tracin_tasks.cli import main

    monkeypatch.syspath_prepend(str(cluster["root"] / "models"))  # the slow model factory
    with support.restored_environ(), temporary_settings(updates={PREFECT_API_URL: cluster["api"]}):
        assert main(args) == 0
    stdout = capsys.readouterr().out
    assert f"0 cells computed, {N_CELLS} reused" in stdout, stdout
    np.testing.assert_array_equal(pd.read_parquet(out / "scores.parquet")["self_influence"].to_numpy(),
                                  frame["self_influence"].to_numpy())
