"""The ``tracin-tasks`` command line.

    tracin-tasks audit --run-id RUN_ID [--tracking-uri URI] [--output DIR] [--task-runner threads|dask|tcp://…]
    tracin-tasks demo [--workdir DIR]

Every tool keeps its state where the user says and stays offline: unless already set,
``PREFECT_SERVER_ANALYTICS_ENABLED=false``, ``DO_NOT_TRACK=1``, ``MLFLOW_DISABLE_TELEMETRY=true``
and ``GX_ANALYTICS_ENABLED=False`` are set before Prefect or MLflow is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

_QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "False",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tracin_tasks",
    # a fresh ephemeral server migrates its database first; on a busy 2-core machine that is slow
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def _quiet_env(state_dir: str | None = None) -> None:
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if state_dir:
        os.environ.setdefault("PREFECT_HOME", os.path.join(state_dir, "prefect"))
        os.environ.setdefault("TRACIN_TASKS_CACHE_DIR", os.path.join(state_dir, "cache"))
        os.environ.setdefault("MPLCONFIGDIR", os.path.join(state_dir, "matplotlib"))
        os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", os.path.join(state_dir, "dask"))
    # Prefect's temporary server waits out its whole start-up timeout, silently, when the
    # parent folder of its PREFECT_HOME is missing: create it first.
    if os.environ.get("PREFECT_HOME"):
        os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)


def _add_audit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI of the run (default: $MLFLOW_TRACKING_URI or MLflow's default)")
    p.add_argument("--output", default=None, help="folder for scores.parquet (default: tracin-audit/RUN_ID)")
    p.add_argument("--results-uri", default=None,
                   help="where finished cells are stored, a folder or fsspec URL all workers reach "
                        "(default: OUTPUT/cells); re-running skips finished cells")
    p.add_argument("--task-runner", default="threads",
                   help="threads (default) | dask (a local cluster) | dask://HOST:PORT or tcp://HOST:PORT "
                        "(an existing Dask cluster) | ray | ray://HOST:PORT. Anything but threads needs a "
                        "Prefect server: prefect server start, then set PREFECT_API_URL")
    p.add_argument("--max-workers", type=int, default=None,
                   help="threads, or local Dask worker processes (default: 1 thread; one Dask worker per core)")
    p.add_argument("--gpu", action="store_true",
                   help="ask Dask/Ray for one GPU per cell (workers started with --resources GPU=1)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: CUDA where a worker has it)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="'last', or module names (default: every trainable layer)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per forward/backward pass (default 256)")
    p.add_argument("--shard-size", type=int, default=4096, help="rows per cell (default 4096)")
    p.add_argument("--steps", default=None,
                   help="checkpoints to use: comma-separated steps (3,6,9) or every:K (default: all)")
    p.add_argument("--max-checkpoints", type=int, default=None,
                   help="use at most this many checkpoints, evenly spaced, the last always kept")
    p.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "mse"])
    p.add_argument("--model-factory", default=None,
                   help="module:function that builds the model, if the run did not record one")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow checkpoint files that need unpickling (only for runs you trust)")
    g = p.add_argument_group("flagging and reporting")
    g.add_argument("--score", choices=["self_influence", "self_influence_aum"], default=None,
                   help="what rows are ranked by (default: the policy's default, see docs/concepts.md)")
    g.add_argument("--top-fraction", type=float, default=None, help="flag this share of rows (default 0.1)")
    g.add_argument("--top-k", type=int, default=None, help="flag at most this many rows (per class with --per-class)")
    g.add_argument("--robust-z", type=float, default=None, help="flag rows with robust z-score at least this")
    g.add_argument("--per-class", action="store_true", help="rank and select within each class")
    g.add_argument("--budget", type=int, default=None, help="never flag more rows than this (relabel capacity)")
    g.add_argument("--no-validate", action="store_true", help="skip the Great Expectations validation")
    g.add_argument("--on-validation-failure", choices=["fail", "warn"], default="fail",
                   help="a failed validation fails the run (default) or only warns")
    g.add_argument("--no-mlflow-report", action="store_true",
                   help="do not log the report and tables to MLflow (they are still written to --output)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracin-tasks",
        description="Find likely mislabeled training rows of an MLflow training run with TracIn self-influence.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    audit = sub.add_parser("audit", help="audit one MLflow training run with the Prefect flow",
                           description="Run the audit flow on one MLflow run and write scores.parquet.")
    audit.add_argument("--run-id", required=True, help="the MLflow run to audit")
    _add_audit_options(audit)
    demo = sub.add_parser("demo", help="train on digits with flipped labels, log to MLflow, audit it",
                          description="End-to-end demo on embedded defaults: an MLflow sqlite store and "
                                      "Prefect's temporary server, all under --workdir.")
    demo.add_argument("--workdir", default=".demo", help="folder for every file the demo writes (default .demo)")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs, one checkpoint each (default 20)")
    demo.add_argument("--noise", type=float, default=0.1, help="share of labels flipped (default 0.1)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _parse_steps(text: str | None) -> list[int] | str | None:
    if text is None or text.startswith("every:"):
        return text
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--steps {text!r}: expected comma-separated integers or every:K") from None


def _layers_arg(layers: list[str] | None) -> list[str] | str | None:
    if layers == ["last"]:
        return "last"
    return layers


class _ProgressBar:
    """Draws finished/total cells on a terminal by watching the results store."""

    def __init__(self, results_uri: str, run_id: str):
        self.results_uri, self.run_id = results_uri, run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _ProgressBar:
        if sys.stderr.isatty():
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
            sys.stderr.write("\n")

    def _loop(self) -> None:
        import json

        from tracin_tasks.orchestration.store import ResultsStore

        store = None
        while not self._stop.wait(0.5):
            try:
                store = store or ResultsStore(self.results_uri)
                plans = sorted(store.fs.glob(store._path("*", "plan.json")), key=lambda p: store.fs.modified(p))
                for path in reversed(plans):
                    with store.fs.open(path, "rb") as fh:
                        plan = json.loads(fh.read())
                    if plan["settings"]["run_id"] != self.run_id:
                        continue
                    total = len(plan["cells"])
                    done = len(store.fs.glob(store._path(plan["audit_key"], "cells", "*.npz")))
                    width = 30
                    filled = int(width * done / max(1, total))
                    sys.stderr.write(f"\rcells [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
                    sys.stderr.flush()
                    break
            except (OSError, ValueError, KeyError):
                continue


def _flag_policy(args: argparse.Namespace) -> dict[str, Any] | None:
    """The --score/--top-*/--robust-z/--per-class/--budget options as a FlagPolicy dict."""
    policy = {k: getattr(args, k) for k in ("score", "top_fraction", "top_k", "robust_z", "budget")
              if getattr(args, k) is not None}
    if args.per_class:
        policy["per_class"] = True
    if "top_fraction" not in policy and any(k in policy for k in ("top_k", "robust_z", "budget")):
        policy["top_fraction"] = None  # the criteria given replace the default "top 10%"
    return policy or None


def run_audit(args: argparse.Namespace) -> dict[str, Any]:
    from tracin_tasks.orchestration import audit_training_run
    from tracin_tasks.orchestration.runners import check_api_for, parse_task_runner

    check_api_for(parse_task_runner(args.task_runner, args.max_workers, args.gpu))
    output = os.path.abspath(args.output or os.path.join("tracin-audit", args.run_id))
    results_uri = args.results_uri or os.path.join(output, "cells")
    with _ProgressBar(results_uri, args.run_id):
        return audit_training_run(
            run_id=args.run_id, tracking_uri=args.tracking_uri, layers=_layers_arg(args.layers),
            batch_size=args.batch_size, shard_size=args.shard_size, steps=_parse_steps(args.steps),
            max_checkpoints=args.max_checkpoints, loss=args.loss, task_runner=args.task_runner,
            max_workers=args.max_workers, gpu=args.gpu, device=args.device, output_dir=output,
            results_uri=results_uri, model_factory=args.model_factory, allow_pickle=args.allow_pickle,
            flag=_flag_policy(args), validate_results=not args.no_validate,
            on_validation_failure=args.on_validation_failure, log_to_mlflow=not args.no_mlflow_report,
        )


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"\naudited run {summary['run_id']}: {summary['rows']} rows; "
          f"{summary['computed']} cells computed, {summary['skipped']} reused")
    print(f"scores: {summary['scores']}")
    print("highest self-influence (row_id, label, score):")
    for row in summary["top_rows"]:
        print(f"  {row['row_id']}\t{row['label']}\t{row['self_influence']:.4g}")
    if summary.get("flagged") is not None:
        print(f"flagged: {summary['flagged']} rows -> {summary['files']['issues.parquet']}")
        print(f"report: {summary['files']['report.html']}")
    if summary.get("data_docs"):
        print(f"Great Expectations Data Docs: {summary['data_docs']}")
    if summary.get("validation") is not None:
        print(f"validation: {'passed' if summary['validation']['success'] else 'FAILED'}")
    run = summary.get("mlflow_run")
    if run:
        where = run["report_url"] or f"experiment {run['experiment_id']}, run {run['run_id']}, artifact report.html"
        print(f"MLflow audit run {run['run_id']} (child of the training run): {where}")
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}")


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
    audit_args = build_parser().parse_args(["audit", "--run-id", run_id, "--tracking-uri", tracking_uri,
                                            "--output", str(workdir / "audit" / run_id)])
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
    _print_summary(summary)
    top = scores.iloc[np.argsort(-scores["self_influence"].to_numpy(), kind="stable")[:5]]
    print("of these, flipped on purpose:", ", ".join(str(r) for r in top["row_id"] if r in flipped_ids) or "none")
    run = summary["mlflow_run"]
    print("\nto look at it in the MLflow UI:")
    print(f"    {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {tracking_uri} --port 5000")
    print(f"    then open http://127.0.0.1:5000/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
          "/artifacts/report.html")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        _quiet_env(str(Path(args.workdir).resolve() / "state"))
        return run_demo(args)
    _quiet_env()
    from tracin_tasks.exceptions import TracInError

    try:
        summary = run_audit(args)
    except TracInError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
