"""Wall time of one audit: the bare core vs the Prefect flow on threads vs Dask with 1 and 2 workers.

    python benchmarks/bench_flow.py [--rows 100000] [--checkpoints 10] [--shard-size 25000] [--json out.json]

Everything runs on this machine, in one run, side by side: an MLflow sqlite store with one
training run (synthetic 64-feature rows, an MLP 64→512→256→10, one checkpoint per epoch), a real
``prefect server start`` on 127.0.0.1 (its start-up is timed and reported apart), then

* core: ``MlflowCheckpointSource`` + ``TracIn.self_influence`` in this process;
* flow/threads: ``audit_training_run`` with the default thread pool (one cell at a time);
* flow/dask-1, flow/dask-2: a Dask ``LocalCluster`` of 1 or 2 single-threaded worker processes
  (cluster start-up included).

Each flow run uses a fresh results store, so every cell is computed, and stops at
``scores.parquet`` (``report=False``): flagging, validation and the report are the same work
whatever ran the cells. Scores are checked equal.
Targets: flow/threads ≤ 1.3 × core; dask-2 ≤ 0.6 × dask-1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def make_run(workdir: Path, rows: int, checkpoints: int) -> tuple[str, str]:
    import mlflow
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    import tracin_tasks.mlflow as tm

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("bench-flow", artifact_location=(workdir / "artifacts").as_uri())
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 64))
    labels = rng.integers(0, 10, rows)
    x = (centers[labels] + rng.normal(scale=2.0, size=(rows, 64))).astype(np.float32)
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(64)])
    df.insert(0, "label", labels)
    df.insert(0, "row_id", np.arange(rows))
    torch.manual_seed(0)
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(labels))
    loader = torch.utils.data.DataLoader(data, batch_size=256, shuffle=True)
    with mlflow.start_run(experiment_id=exp) as run:
        tm.log_training_data(df, input_shape=None, name="synthetic")
        tm.log_model_factory("bench_flow:build_model")
        for epoch in range(1, checkpoints + 1):
            for xb, yb in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
            tm.log_checkpoint(model, step=epoch, learning_rate=0.05)
    return uri, run.info.run_id


def build_model():
    from torch import nn

    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=25_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    env = {
        "PREFECT_HOME": str(workdir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true", "TRACIN_TASKS_CACHE_DIR": str(workdir / "cache"),
        "DASK_TEMPORARY_DIRECTORY": str(workdir / "dask"), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    os.makedirs(env["PREFECT_HOME"], exist_ok=True)
    os.environ.update(env)
    sys.path.insert(0, str(Path(__file__).parent))
    results: dict[str, float] = {}
    server = None
    try:
        uri, run_id = make_run(workdir, args.rows, args.checkpoints)
        port = _free_port()
        t0 = time.perf_counter()
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--analytics-off"], env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_http(f"http://127.0.0.1:{port}/api/health", 180)
        results["prefect_server_start_s"] = time.perf_counter() - t0
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"

        import numpy as np
        import pandas as pd

        from tracin_tasks import TracIn
        from tracin_tasks.mlflow import MlflowCheckpointSource
        from tracin_tasks.orchestration import audit_training_run

        t0 = time.perf_counter()
        source = MlflowCheckpointSource(run_id, uri, trusted_modules=["bench_flow"])  # the model it logged
        core = TracIn(source.build_model(), source.checkpoints()).self_influence(source.training_table().dataset())
        results["core_s"] = time.perf_counter() - t0

        for name, runner, workers in (("flow_threads", "threads", None), ("flow_dask_1", "dask", 1), ("flow_dask_2", "dask", 2)):
            out = workdir / name
            t0 = time.perf_counter()
            summary = audit_training_run(run_id=run_id, tracking_uri=uri, task_runner=runner, max_workers=workers,
                                         shard_size=args.shard_size, output_dir=str(out), report=False,
                                         trusted_modules=["bench_flow"])
            results[f"{name}_s"] = time.perf_counter() - t0
            got = pd.read_parquet(summary["scores"])["self_influence"].to_numpy()
            np.testing.assert_allclose(got, core, rtol=1e-6)
        cells = summary["cells"]
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    import torch

    ratio_threads = results["flow_threads_s"] / results["core_s"]
    ratio_dask = results["flow_dask_2_s"] / results["flow_dask_1_s"]
    print(f"audit of {args.rows} rows x {args.checkpoints} checkpoints ({cells} cells of {args.shard_size} rows), "
          f"MLP 64-512-256-10, torch {torch.__version__}, {os.cpu_count()} cores")
    print(f"{'what':<34}{'wall s':>10}")
    print(f"{'prefect server start-up':<34}{results['prefect_server_start_s']:>10.1f}")
    for key, label in (("core_s", "bare core"), ("flow_threads_s", "flow, threads"),
                       ("flow_dask_1_s", "flow, Dask 1 worker"), ("flow_dask_2_s", "flow, Dask 2 workers")):
        print(f"{label:<34}{results[key]:>10.1f}")
    print(f"flow/threads vs core: {ratio_threads:.2f}x (target <= 1.3x) {'MET' if ratio_threads <= 1.3 else 'NOT MET'}")
    print(f"Dask 2 vs 1 workers:  {ratio_dask:.2f}x (target <= 0.6x) {'MET' if ratio_dask <= 0.6 else 'NOT MET'}")
    print("scores: every flow run equal to the bare core (rtol 1e-6)")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "ratio_threads": ratio_threads, "ratio_dask": ratio_dask}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
