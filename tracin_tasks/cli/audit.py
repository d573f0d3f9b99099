"""``tracin-tasks audit``: its options come from the audit's settings; it runs the audit flow."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from tracin_tasks._options import add_options, values_from
from tracin_tasks._text import for_terminal


def add_audit_command(sub: Any) -> argparse.ArgumentParser:
    from tracin_tasks.core.flagging import FlagPolicy
    from tracin_tasks.orchestration.settings import AuditSettings, RelabelOptions, ReportOptions, RunOptions

    audit = sub.add_parser("audit", help="audit one MLflow training run with the Prefect flow",
                           description="Run the audit flow on one MLflow run and write scores.parquet.")
    add_options(audit, AuditSettings)
    add_options(audit, RunOptions)
    flagging = audit.add_argument_group("flagging and reporting")
    add_options(flagging, FlagPolicy)
    add_options(flagging, ReportOptions)
    add_options(audit.add_argument_group("relabel queues"), RelabelOptions)
    return audit


def audit_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The flow's parameters from the command line, each checked by its settings class, before
    Prefect starts or stores anything (a password in a URI is refused here, for instance)."""
    from tracin_tasks.core.flagging import FlagPolicy
    from tracin_tasks.orchestration.settings import AuditSettings, RelabelOptions, ReportOptions, RunOptions

    flag = values_from(args, FlagPolicy, given_only=True) or None
    audit, run, report, relabel = (values_from(args, cls) for cls in
                                   (AuditSettings, RunOptions, ReportOptions, RelabelOptions))
    settings = AuditSettings(**audit)
    resolved = RunOptions(**run).resolved(settings.run_id)
    ReportOptions(**report, flag=flag)
    RelabelOptions(**relabel)
    # --model-kwargs arrives as JSON text; the flow takes the object the settings parsed from it
    return {**audit, **run, **report, **relabel, "flag": flag, "model_kwargs": settings.model_kwargs,
            "output_dir": resolved.output_dir, "results_uri": resolved.results_uri}


def run_audit(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = audit_arguments(args)
    from tracin_tasks.orchestration import audit_training_run
    from tracin_tasks.orchestration.runners import check_api_for, parse_task_runner

    check_api_for(parse_task_runner(kwargs["task_runner"], kwargs["max_workers"], kwargs["gpu"]))
    with _ProgressBar(kwargs["results_uri"], kwargs["run_id"]):
        return audit_training_run(**kwargs)


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


def print_summary(summary: dict[str, Any]) -> None:
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
            print(f"relabel queue {outcome['sink']} is unavailable: {for_terminal(outcome['error'])}\n"
                  f"    the rows wait in {outcome['outbox_path']} and are delivered on the next run")
    for warning in summary.get("warnings", []):
        print(f"warning: {for_terminal(warning, None)}")
