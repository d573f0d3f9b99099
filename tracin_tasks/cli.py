"""The ``tracin-tasks`` command line.

    tracin-tasks audit --run-id RUN_ID [--tracking-uri URI] [--output DIR] [--task-runner threads|dask|tcp://…]
    tracin-tasks demo [--workdir DIR]
    tracin-tasks relabel list|claim|decide|release|apply|flush --queue URI ...

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

from tracin_tasks._text import for_terminal, write_csv

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
                   help="module:function that builds the model, instead of the one the run recorded (yours: trusted)")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help="keyword arguments for the model factory, a JSON object (e.g. '{\"hidden\": 128}')")
    p.add_argument("--trust-module", action="append", default=None, metavar="PREFIX",
                   help="trust model factories the run names in this module or package (repeatable; added to "
                        "$TRACIN_TRUSTED_MODULES). A run's own factory is refused until its module is trusted")
    p.add_argument("--max-parameters", type=int, default=None, metavar="N",
                   help="refuse models and checkpoints with more elements than this, before allocating them "
                        "(default $TRACIN_MAX_PARAMETERS or 1e9)")
    p.add_argument("--mlflow-secret-block", default=None, metavar="NAME",
                   help="Prefect Secret block holding the tracking server's password (default: "
                        "$MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD); never put it in --tracking-uri")
    p.add_argument("--default-learning-rate", type=float, default=None,
                   help="learning rate for checkpoints the run logged none for (e.g. 1.0: equal weights); "
                        "default: refuse such a run")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow checkpoint files that need unpickling (only for runs you trust)")
    g = p.add_argument_group("flagging and reporting")
    g.add_argument("--score", choices=["self_influence", "self_influence_aum", "self_influence_aum_loss"], default=None,
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
    r = p.add_argument_group("relabel queues")
    r.add_argument("--relabel", action="append", default=None, metavar="URI",
                   help="send the flagged rows here (repeatable): sqlite:///queue.db, postgresql+psycopg://..., "
                        "labelstudio://HOST:PORT?project=TITLE, file:///FOLDER?format=csv")
    r.add_argument("--outbox", default=None,
                   help="where rows wait while a sink is down (default OUTPUT/outbox); the next run delivers them")


def _add_relabel_commands(sub: Any) -> None:
    relabel = sub.add_parser("relabel", help="work the relabel queue and apply corrections back to MLflow",
                             description="The reviewer's side of the relabel queue, and corrections back.")
    rsub = relabel.add_subparsers(dest="relabel_command", required=True)

    def queue_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--queue", required=required, metavar="URI",
                       help="the queue: sqlite:///queue.db or postgresql+psycopg://... (?table=NAME to pick a table)")

    ls = rsub.add_parser("list", help="show queued rows, most suspicious first")
    queue_arg(ls)
    ls.add_argument("--run-id", default=None, help="only rows flagged in audits of this training run")
    ls.add_argument("--fingerprint", default=None, help="only rows of this data version")
    ls.add_argument("--status", action="append", default=None,
                    choices=["pending", "in_review", "relabeled", "confirmed", "skipped"])
    ls.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50; 0 = all)")
    ls.add_argument("--format", choices=["table", "csv", "json"], default="table")

    claim = rsub.add_parser("claim", help="take pending rows for review (never the same row as another worker)")
    queue_arg(claim)
    claim.add_argument("--worker", required=True, help="who reviews them")
    claim.add_argument("-n", type=int, default=10, help="how many rows (default 10)")
    claim.add_argument("--run-id", default=None)
    claim.add_argument("--fingerprint", default=None)

    decide = rsub.add_parser("decide", help="record a decision about one row")
    queue_arg(decide)
    decide.add_argument("--row-id", required=True)
    decide.add_argument("--run-id", default=None, help="the training run (finds the data version)")
    decide.add_argument("--fingerprint", default=None, help="the data version, when the run has several")
    what = decide.add_mutually_exclusive_group(required=True)
    what.add_argument("--label", type=int, help="the correct label (relabeled)")
    what.add_argument("--confirm", action="store_true", help="the given label is right")
    what.add_argument("--skip", action="store_true", help="cannot tell; leave the row as it is")
    decide.add_argument("--by", default=None, help="who decided")
    decide.add_argument("--note", default=None)

    release = rsub.add_parser("release", help="put claimed rows back to pending")
    queue_arg(release)
    release.add_argument("--worker", default=None, help="only this worker's rows (default: all claimed rows)")

    apply = rsub.add_parser("apply", help="write corrected training data from the decisions and log it to MLflow")
    queue_arg(apply)
    apply.add_argument("--run-id", required=True, help="the audited training run")
    apply.add_argument("--tracking-uri", default=None)
    apply.add_argument("--output", default=None, help="folder for the corrected data (default tracin-relabel/RUN_ID)")
    apply.add_argument("--no-mlflow", action="store_true", help="only write the files")
    apply.add_argument("--mlflow-secret-block", default=None, metavar="NAME",
                       help="Prefect Secret block holding the tracking server's password")

    flush = rsub.add_parser("flush", help="deliver rows waiting in an outbox")
    flush.add_argument("--outbox", required=True)
    flush.add_argument("--sink", action="append", required=True, metavar="URI", help="the sink they wait for")


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
    _add_relabel_commands(sub)
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
    from tracin_tasks._uris import refuse_uri_credentials
    from tracin_tasks.integrations.model_factory import (
        check_max_parameters,
        check_model_kwargs,
        parse_trusted_modules,
    )

    # refused here, before Prefect starts or stores the flow's parameters
    refuse_uri_credentials(args.tracking_uri, "--tracking-uri")
    model_kwargs = check_model_kwargs(args.model_kwargs, "--model-kwargs") or None
    parse_trusted_modules(args.trust_module, "--trust-module")
    check_max_parameters(args.max_parameters)
    from tracin_tasks.orchestration import audit_training_run
    from tracin_tasks.orchestration.relabel import check_sinks
    from tracin_tasks.orchestration.runners import check_api_for, parse_task_runner

    check_sinks(args.relabel)
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
            default_learning_rate=args.default_learning_rate,
            flag=_flag_policy(args), validate_results=not args.no_validate,
            on_validation_failure=args.on_validation_failure, log_to_mlflow=not args.no_mlflow_report,
            relabel=args.relabel, outbox_dir=args.outbox, model_kwargs=model_kwargs,
            trusted_modules=args.trust_module, max_parameters=args.max_parameters,
            mlflow_secret_block=args.mlflow_secret_block,
        )


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"\naudited run {summary['run_id']}: {summary['rows']} rows; "
          f"{summary['computed']} cells computed, {summary['skipped']} reused")
    print(f"scores: {summary['scores']}")
    print("highest self-influence (row_id, label, score):")
    for row in summary["top_rows"]:
        print(f"  {for_terminal(row['row_id'])}\t{for_terminal(row['label'])}\t{row['self_influence']:.4g}")
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
    for outcome in summary.get("relabel") or []:
        if outcome["status"] == "delivered":
            d = outcome["delivery"]
            print(f"relabel queue {outcome['sink']}: {d['delivered']} new rows, {d['updated']} refreshed, "
                  f"{d['unchanged']} already handled by reviewers")
        else:
            print(f"relabel queue {outcome['sink']} is unavailable: {outcome['error']}\n"
                  f"    the rows wait in {outcome['outbox_path']} and are delivered on the next run")
    for warning in summary.get("warnings", []):
        print(f"warning: {for_terminal(warning, None)}")


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
    _print_summary(summary)
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


def _sql_queue(uri: str):
    from tracin_tasks.exceptions import ConfigurationError
    from tracin_tasks._uris import redact
    from tracin_tasks.integrations.relabel.registry import open_sink
    from tracin_tasks.integrations.relabel.sql_queue import SqlQueue

    sink = open_sink(uri, create=False) if not uri.startswith(("file:", "labelstudio:")) else None
    if not isinstance(sink, SqlQueue):
        raise ConfigurationError(
            f"{redact(uri)} is not a SQL queue; work a Label Studio project in Label Studio and a file drop with "
            "your own tools (write decisions_<fingerprint>.csv next to the flagged file)."
        )
    return sink


def _fingerprint_of(queue, run_id: str | None, fingerprint: str | None) -> str | None:
    from tracin_tasks.exceptions import ConfigurationError

    if fingerprint or not run_id:
        return fingerprint
    rows = queue.rows(run_id=run_id)
    found = sorted(set(rows["fingerprint"])) if len(rows) else []
    if not found:
        raise ConfigurationError(f"The queue has no rows of run {run_id}.")
    if len(found) > 1:
        raise ConfigurationError(f"Run {run_id} has rows of {len(found)} data versions in the queue "
                                 f"({', '.join(f[:12] for f in found)}); pass --fingerprint.")
    return found[0]


def run_relabel(args: argparse.Namespace) -> int:
    import json

    cmd = args.relabel_command
    if cmd == "apply":
        from tracin_tasks.orchestration.flows import apply_relabels

        from tracin_tasks._uris import refuse_uri_credentials
        from tracin_tasks.orchestration.relabel import check_sinks

        refuse_uri_credentials(args.tracking_uri, "--tracking-uri")  # before Prefect stores the parameters
        check_sinks(args.queue)
        result = apply_relabels(run_id=args.run_id, queue=args.queue, tracking_uri=args.tracking_uri,
                                output_dir=args.output, log_to_mlflow=not args.no_mlflow,
                                mlflow_secret_block=args.mlflow_secret_block)
        print(f"run {result['run_id']}: {result['changed']} labels corrected, {result['confirmed']} confirmed, "
              f"{result['skipped']} skipped (of {result['decisions']} decisions)")
        print(f"corrected training data: {result['files']['training_data.parquet']}")
        print(f"change log: {result['files']['changes.csv']}")
        if result["relabel_run_id"]:
            print(f"MLflow run {result['relabel_run_id']} (child of {result['run_id']}) holds the new dataset; train on "
                  f"it with tracin_tasks.mlflow.load_corrected_training_data({result['run_id']!r})")
        return 0
    if cmd == "flush":
        from tracin_tasks.integrations.relabel.outbox import Outbox
        from tracin_tasks.integrations.relabel.registry import open_sink
        from tracin_tasks.orchestration.sources import prefect_secret

        outbox = Outbox(args.outbox)
        for uri in args.sink:
            sink = open_sink(uri, secrets=prefect_secret)
            try:
                done = outbox.replay(uri, sink)
            finally:
                sink.close()
            print(f"{sink.name}: {len(done)} waiting batches delivered "
                  f"({sum(d.delivered for d in done)} new rows, {sum(d.unchanged for d in done)} already handled)")
        return 0
    queue = _sql_queue(args.queue)
    try:
        if cmd == "list":
            fp = _fingerprint_of(queue, None, args.fingerprint)
            rows = queue.rows(fingerprint=fp, status=args.status, run_id=args.run_id)
            total = len(rows)
            if args.limit:
                rows = rows.head(args.limit)
            cols = ["row_id", "rank", "score", "given_label", "suggested_label", "status", "decided_label",
                    "claimed_by", "decided_by", "run_id", "fingerprint"]
            if args.format == "csv":
                write_csv(rows, sys.stdout)  # no cell a spreadsheet would run as a formula
            elif args.format == "json":
                print(rows.to_json(orient="records", date_format="iso"))
            else:
                view = rows[cols].copy()
                view["fingerprint"] = view["fingerprint"].str[:12]
                for column in ("row_id", "claimed_by", "decided_by", "run_id"):
                    view[column] = view[column].map(lambda v: v if v is None or v != v else for_terminal(v, 40))
                print(view.to_string(index=False) if len(view) else "(no rows)")
                print(f"{len(rows)} of {total} rows; by status: {json.dumps(queue.counts(fp))}")
        elif cmd == "claim":
            fp = _fingerprint_of(queue, args.run_id, args.fingerprint)
            got = queue.claim(args.worker, args.n, fp)
            for r in got:
                print(f"{for_terminal(r['row_id'])}\tgiven {r['given_label']}\tsuggested {r['suggested_label']}\t"
                      f"rank {r['rank']}\tdata {r['fingerprint'][:12]}")
            print(f"{len(got)} rows claimed by {for_terminal(args.worker)}")
        elif cmd == "decide":
            fp = _fingerprint_of(queue, args.run_id, args.fingerprint)
            if fp is None:
                from tracin_tasks.exceptions import ConfigurationError

                raise ConfigurationError("decide needs --run-id or --fingerprint to find the row.")
            status = "confirmed" if args.confirm else "skipped" if args.skip else "relabeled"
            stored = queue.decide(args.row_id, fp, status, args.label, by=args.by, note=args.note)
            print(f"row {for_terminal(args.row_id)}: {stored}" + (f" as {args.label}" if stored == "relabeled" else ""))
        elif cmd == "release":
            print(f"{queue.release(args.worker)} rows back to pending")
    finally:
        queue.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        _quiet_env(str(Path(args.workdir).resolve() / "state"))
        return run_demo(args)
    _quiet_env()
    from tracin_tasks.exceptions import TracInError

    try:
        if args.command == "relabel":
            return run_relabel(args)
        summary = run_audit(args)
    except TracInError as exc:
        # one line: a message may quote row ids or values from the data
        print(f"error: {for_terminal(exc, 4000)}", file=sys.stderr)
        return 2
    _print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
