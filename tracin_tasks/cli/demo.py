"""``tracin-tasks demo``: train on digits with flipped labels, log to MLflow, audit it, show the result."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from tracin_tasks._text import for_terminal


def add_demo_command(sub: Any) -> None:
    demo = sub.add_parser("demo", help="train on digits with flipped labels, log to MLflow, audit it",
                          description="End-to-end demo on embedded defaults: an MLflow sqlite store and "
                                      "Prefect's temporary server, all under --workdir.")
    demo.add_argument("--workdir", default=".demo", help="folder for every file the demo writes (default .demo)")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs, one checkpoint each (default 20)")
    demo.add_argument("--noise", type=float, default=0.1, help="share of labels flipped (default 0.1)")
    demo.add_argument("--seed", type=int, default=0)


def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    import mlflow
    import numpy as np
    import pandas as pd

    from tracin_tasks.examples.digits import recall_at
    from tracin_tasks.examples.train_digits import train_digits_run

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment = "tracin-digits-demo"
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=(workdir / "mlartifacts").as_uri())
    print(f"1/3 training a CNN on digits with {args.noise:.0%} of labels flipped, logging to MLflow ({tracking_uri})")
    t0 = time.perf_counter()
    run_id = train_digits_run(tracking_uri, experiment, noise=args.noise, epochs=args.epochs, seed=args.seed)
    print(f"    run {run_id}: {args.epochs} checkpoints in {time.perf_counter() - t0:.0f}s")

    print("2/3 auditing it with the Prefect flow (Prefect's temporary server, thread pool)")
    queue = f"sqlite:///{workdir / 'relabel.db'}"
    # the demo's run names its model factory in tracin_tasks.examples: the demo trusts that module, as an
    # operator trusts the package that defines their models
    from tracin_tasks.cli import build_parser
    from tracin_tasks.cli.audit import print_summary, run_audit

    audit_args = build_parser().parse_args(["audit", "--run-id", run_id, "--tracking-uri", tracking_uri,
                                            "--output", str(workdir / "audit" / run_id), "--relabel", queue,
                                            "--trust-module", "tracin_tasks.examples"])
    t0 = time.perf_counter()
    summary = run_audit(audit_args)
    print(f"    {summary['rows']} rows, {summary['cells']} cells in {time.perf_counter() - t0:.0f}s")

    print("3/3 scoring the audit against the recorded flips")
    flips_path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="ground_truth/flipped_rows.parquet",
                                                     dst_path=str(workdir / "ground_truth" / run_id))
    flipped_ids = set(pd.read_parquet(flips_path)["row_id"])
    scores = pd.read_parquet(summary["scores"])
    flipped = scores["row_id"].isin(flipped_ids).to_numpy()
    for share in (0.10, 0.20):
        print(f"    flipped rows found in the top {share:.0%} by self-influence: "
              f"{recall_at(scores['self_influence'].to_numpy(), flipped, share):.1%}")
    issues = pd.read_parquet(summary["files"]["issues.parquet"])
    flagged_ids = set(issues.loc[issues["flagged"], "row_id"])
    caught = len(flagged_ids & flipped_ids)
    print(f"    flagged by the default policy ({len(flagged_ids)} rows): {caught} of the {len(flipped_ids)} "
          f"flipped rows ({caught / max(1, len(flipped_ids)):.1%})")
    print_summary(summary)
    top = scores.iloc[np.argsort(-scores["self_influence"].to_numpy(), kind="stable")[:5]]
    print("of these, flipped on purpose:", ", ".join(for_terminal(r) for r in top["row_id"] if r in flipped_ids) or "none")
    run = summary["mlflow_run"]
    print("\nto look at it in the MLflow UI:")
    print(f"    {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {tracking_uri} --port 5000")
    print(f"    then open http://127.0.0.1:5000/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
          "/artifacts/report.html")
    cli = Path(sys.executable).parent / "tracin-tasks"
    print(f"\nthe flagged rows are in the relabel queue {queue}; to work it:")
    print(f"    {cli} relabel list --queue {queue} --run-id {run_id}")
    print(f"    {cli} relabel claim --queue {queue} --worker you -n 5")
    print(f"    {cli} relabel decide --queue {queue} --run-id {run_id} --row-id ROW --label N   (or --confirm / --skip)")
    print(f"    {cli} relabel apply --queue {queue} --run-id {run_id} --tracking-uri {tracking_uri}")
    return 0
