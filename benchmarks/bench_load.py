"""Load: peak memory and wall time of a whole audit at 50k, 100k and 200k rows.

    .venv/bin/python benchmarks/bench_load.py [--rows 50000 100000 200000] [--mode flow|cells]
        [--shard-size 25000] [--checkpoints 3] [--features 32] [--json load.json] [--workdir DIR]

For every size, an MLflow sqlite store gets one training run (synthetic rows: ``--features``
float32 columns around 10 class centres, 10% of labels flipped; an MLP F→64→32→10 trained a
little between checkpoints, one checkpoint per "epoch"), logged with ``tracin_tasks.mlflow``.
Then a **fresh child process** audits it and reports its own peak RSS (``ru_maxrss``), so one
size's memory never hides another's:

* ``--mode flow`` (default): ``audit_training_run`` under Prefect's temporary server (a separate
  process, not counted), thread pool, cells of ``--shard-size`` rows, then flagging, Great
  Expectations validation, report.html and the MLflow child run: the whole audit;
* ``--mode cells``: the plain functions behind the flow's tasks (``plan_audit``, ``compute_cell``
  per cell, ``write_scores``, ``report_audit``), no Prefect.

"baseline" is the child's RSS after its imports and before the audit (torch, MLflow, Prefect and
GX loaded); "peak" is its high-water mark at the end; "audit growth" is peak − baseline. Memory
per cell is bounded by the shard size, not the number of rows: what grows with the rows is the
training table itself (read once per process), the per-row result arrays and the result tables.
Prints a table and one JSON document (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FACTORY = "tracin_tasks.examples.digits:build_mlp"


def _quiet_env(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.update({
        "PREFECT_HOME": str(state / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300", "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "GX_ANALYTICS_ENABLED": "False",
        "TRACIN_TASKS_CACHE_DIR": str(state / "cache"), "MPLCONFIGDIR": str(state / "matplotlib"),
        "PREFECT_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    })
    for sub in ("prefect", "cache", "matplotlib"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    return env


def make_run(root: Path, rows: int, features: int, checkpoints: int) -> tuple[str, str]:
    """Log one synthetic training run with ``rows`` rows; return (tracking URI, run id)."""
    import mlflow
    import numpy as np
    import pandas as pd
    import torch

    import tracin_tasks.mlflow as tm
    from tracin_tasks.examples.digits import build_mlp

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(f"bench-load-{rows}", artifact_location=(root / "artifacts").as_uri())
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, features))
    labels = rng.integers(0, 10, rows)
    x = (centres[labels] + rng.normal(scale=1.5, size=(rows, features))).astype(np.float32)
    flip = rng.random(rows) < 0.1
    given = np.where(flip, (labels + rng.integers(1, 10, rows)) % 10, labels)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(features)])
    frame.insert(0, "label", given.astype(np.int64))
    frame.insert(0, "row_id", [f"row-{i:07d}" for i in range(rows)])
    torch.manual_seed(0)
    kwargs = {"in_features": features, "n_classes": 10, "hidden": 64}
    model = build_mlp(**kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sub = torch.from_numpy(x[:8192]), torch.from_numpy(given[:8192].astype(np.int64))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=exp) as run:
        tm.log_training_data(frame, name="synthetic")
        tm.log_model_factory(FACTORY, **kwargs)
        for step in range(1, checkpoints + 1):
            for i in range(0, len(sub[0]), 256):  # one pass over a subset: checkpoints differ, set-up stays quick
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(sub[0][i:i + 256]), sub[1][i:i + 256]).backward()
                opt.step()
            tm.log_checkpoint(model, step=step, learning_rate=0.05)
    return uri, run.info.run_id


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> int:
    """Audit one run in this process; print one JSON line with the figures."""
    import pandas as pd  # noqa: F401 - imported before the baseline, like everything the audit needs

    import great_expectations  # noqa: F401
    import mlflow  # noqa: F401
    import prefect  # noqa: F401
    import torch

    from tracin_tasks.orchestration import audit_training_run
    from tracin_tasks.orchestration.aggregate import write_scores
    from tracin_tasks.orchestration.compute import compute_cell
    from tracin_tasks.orchestration.planning import plan_audit
    from tracin_tasks.orchestration.reporting import report_audit
    from tracin_tasks.orchestration.plan import AuditSettings
    from tracin_tasks.orchestration.store import ResultsStore

    torch.set_num_threads(args.threads)
    baseline = _rss_mib()
    baseline_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.mode == "flow":
        result = audit_training_run(run_id=args.run_id, tracking_uri=args.tracking_uri, output_dir=str(out),
                                    shard_size=args.shard_size, batch_size=args.batch_size, report=True,
                                    validate_results=True, log_to_mlflow=True,
                                    trusted_modules=["tracin_tasks.examples"])  # the factory the run logged
        cells, flagged, rows = result["cells"], result["flagged"], result["rows"]
    else:
        settings = AuditSettings(run_id=args.run_id, tracking_uri=args.tracking_uri, shard_size=args.shard_size,
                                 batch_size=args.batch_size, trusted_modules=("tracin_tasks.examples",))
        store = ResultsStore(str(out / "cells"))
        plan = plan_audit(settings, store)
        for cell in plan.cells:
            compute_cell(plan, cell, store)
        write_scores(plan, store, str(out))
        reported = report_audit(plan, str(out), flag=None, validate=True, extra_expectations=None, log_to_mlflow=True)
        cells, flagged, rows = len(plan.cells), reported.summary["flagged"], plan.n_rows
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows, "cells": cells, "flagged": flagged, "seconds": round(seconds, 1),
                      "baseline_rss_mib": round(baseline, 1), "peak_rss_mib": round(peak, 1),
                      "peak_before_audit_mib": round(baseline_peak, 1),
                      "audit_growth_mib": round(peak - baseline, 1)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=25_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the audit (default 1)")
    parser.add_argument("--mode", choices=["flow", "cells"], default="flow")
    parser.add_argument("--json", default=None)
    parser.add_argument("--workdir", default=None, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    parser.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-load-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:
        root = workdir / f"rows-{rows}"
        root.mkdir(exist_ok=True)
        env = _quiet_env(root / "state")
        t0 = time.perf_counter()
        setup = subprocess.run([sys.executable, "-c", (
            "import json, sys; from pathlib import Path; sys.path.insert(0, %r); import bench_load as b; "
            "print(json.dumps(b.make_run(Path(%r), %d, %d, %d)))" % (str(Path(__file__).parent), str(root), rows,
                                                                     args.features, args.checkpoints))],
            env=env, capture_output=True, text=True)
        if setup.returncode:
            sys.stderr.write(setup.stderr[-4000:])
            return 1
        uri, run_id = json.loads(setup.stdout.strip().splitlines()[-1])
        logging_seconds = time.perf_counter() - t0
        cmd = [sys.executable, __file__, "--child", "--rows", str(rows), "--run-id", run_id, "--tracking-uri", uri,
               "--out", str(root / "audit"), "--mode", args.mode, "--shard-size", str(args.shard_size),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr[-6000:])
            return 1
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        figures.update(data_mib=round(rows * args.features * 4 / 2**20, 1), setup_seconds=round(logging_seconds, 1))
        results.append(figures)
        print(f"{rows:>8,} rows: {figures['seconds']:.1f}s, peak RSS {figures['peak_rss_mib']:.0f} MiB", flush=True)

    print()
    print(f"mode={args.mode} shard_size={args.shard_size} checkpoints={args.checkpoints} features={args.features} "
          f"batch_size={args.batch_size} torch threads={args.threads}")
    print("| rows | cells | audit s | baseline RSS MiB | peak RSS MiB | audit growth MiB | feature data MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['cells']} | {r['seconds']:.1f} | {r['baseline_rss_mib']:.0f} | "
              f"{r['peak_rss_mib']:.0f} | {r['audit_growth_mib']:.0f} | {r['data_mib']:.1f} |")
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"\nrows x{b['rows'] / a['rows']:.0f}: peak RSS x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}, "
              f"audit growth x{b['audit_growth_mib'] / max(a['audit_growth_mib'], 1e-9):.2f}")
    doc = {"mode": args.mode, "shard_size": args.shard_size, "checkpoints": args.checkpoints,
           "features": args.features, "batch_size": args.batch_size, "threads": args.threads, "results": results}
    print(json.dumps(doc, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
