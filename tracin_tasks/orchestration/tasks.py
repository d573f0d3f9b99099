"""The Prefect tasks of an audit, each a thin wrapper over a plain function of one stage.

Parameters are JSON (paths, keys, settings dicts), so work fans out to any worker; cells pass
paths, never tensors. ``score_cells`` is a subflow, so the calling flow chooses its task runner.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.tasks import exponential_backoff

from tracin_tasks.orchestration.aggregate import write_scores
from tracin_tasks.orchestration.compute import compute_cell
from tracin_tasks.orchestration.plan import AuditPlan, AuditSettings, Cell
from tracin_tasks.orchestration.planning import plan_audit
from tracin_tasks.orchestration.reporting import ReportResult, report_audit
from tracin_tasks.orchestration.retries import retry_unless_bad_input
from tracin_tasks.orchestration.runners import parse_task_runner, placement
from tracin_tasks.orchestration.store import ResultsStore


def _load_plan(results_uri: str, audit_key: str) -> AuditPlan:
    # read every time, never cached: a later audit with the same key (other shard or batch size)
    # rewrites plan.json, and long-lived workers must not use the old one
    store = ResultsStore(results_uri)
    with store.fs.open(store._path(audit_key, "plan.json"), "rb") as fh:
        return AuditPlan.from_dict(json.loads(fh.read()))


@task(name="plan-audit", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input, task_run_name="plan audit of run {settings[run_id]}")
def plan_audit_task(settings: dict[str, Any], results_uri: str) -> dict[str, Any]:
    plan = plan_audit(AuditSettings.from_dict(settings), ResultsStore(results_uri))
    get_run_logger().info(
        "audit %s: %d rows, %d checkpoints, %d cells", plan.audit_key, plan.n_rows, len(plan.checkpoints), len(plan.cells)
    )
    return {"audit_key": plan.audit_key, "cells": [c.to_dict() for c in plan.cells], "warnings": list(plan.warnings)}


@task(name="score-cell", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_bad_input, task_run_name="step {cell[step]} rows {cell[row_start]}-{cell[row_stop]}")
def score_cell_task(results_uri: str, audit_key: str, cell: dict[str, Any], torch_threads: int | None = None,
                    settings: dict[str, Any] | None = None) -> dict[str, Any]:
    plan = _load_plan(results_uri, audit_key)
    authority = AuditSettings.from_dict(settings) if settings is not None else None
    outcome = compute_cell(plan, Cell.from_dict(cell), ResultsStore(results_uri), torch_threads, authority)
    if not outcome["skipped"]:
        get_run_logger().info("%s: %.2fs on %s", Cell.from_dict(cell).label, outcome["seconds"], outcome["device"])
    return outcome


@flow(name="tracin-score-cells")
def score_cells(results_uri: str, audit_key: str, cells: list[dict[str, Any]], task_runner: str = "threads",
                max_workers: int | None = None, gpu: bool = False,
                settings: dict[str, Any] | None = None) -> dict[str, int]:
    """Score every cell not already stored; the task runner is chosen by the calling flow.

    ``settings``: the calling audit's settings; each cell builds the model under their trust policy,
    whatever the plan in the results store says.
    """
    log = get_run_logger()
    choice = parse_task_runner(task_runner, max_workers, gpu)
    store = ResultsStore(results_uri)
    todo = [c for c in cells if not store.has(audit_key, Cell.from_dict(c))]
    skipped = len(cells) - len(todo)
    if skipped:
        log.info("%d of %d cells already stored for audit %s; skipping them", skipped, len(cells), audit_key)
    progress = create_progress_artifact(
        100.0 * skipped / max(1, len(cells)), key="tracin-cells",
        description=f"Cells of audit {audit_key} finished ({len(cells)} in all)",
    )
    with placement(choice):
        futures = [score_cell_task.submit(results_uri, audit_key, c, choice.torch_threads, settings) for c in todo]
    done = skipped
    for future in as_completed(futures):
        future.result()  # a cell that failed after its retries fails the flow; finished cells stay stored
        done += 1
        update_progress_artifact(progress, 100.0 * done / max(1, len(cells)))
    return {"cells": len(cells), "computed": len(todo), "skipped": skipped}


@task(name="aggregate-scores", cache_policy=NO_CACHE, task_run_name="aggregate audit {audit_key}")
def aggregate_task(results_uri: str, audit_key: str, output_dir: str) -> str:
    plan = _load_plan(results_uri, audit_key)
    return write_scores(plan, ResultsStore(results_uri), output_dir)


def _md(value: Any) -> str:
    """Escape a data-derived value for a Prefect markdown artifact (HTML and markdown syntax)."""
    import html

    text = str(value)
    for ch in "\\`*_{}[]()#+!|~":
        text = text.replace(ch, "\\" + ch)
    text = html.escape(text, quote=True)
    return text


@task(name="report-audit", cache_policy=NO_CACHE, task_run_name="flag, validate and report audit {audit_key}")
def report_task(results_uri: str, audit_key: str, output_dir: str, flag: dict[str, Any] | None, validate_results: bool,
                extra_expectations: list[dict[str, Any]] | None, log_to_mlflow: bool,
                published_dir: str | None = None) -> ReportResult:
    """Flag, validate and report into ``output_dir`` (the audit's own folder, not yet shown);
    ``published_dir`` is where readers will find it once it is switched in."""
    published_dir = published_dir or output_dir
    plan = _load_plan(results_uri, audit_key)
    result = report_audit(plan, output_dir, flag, validate_results, extra_expectations, log_to_mlflow)
    summary, validation, run = result.summary, result.validation, result.mlflow_run
    gx_line = "not run" if validation is None else ("passed" if validation.success else "**FAILED**")
    lines = [
        f"# Label audit of run {_md(plan.settings.run_id)}",
        "",
        f"* rows audited: **{summary['rows']}**",
        f"* rows flagged: **{summary['flagged']}** ({summary['flagged_share']:.1%}) — {_md(summary['policy'])}",
        f"* checkpoints: {len(plan.checkpoints)}",
        f"* data validation (Great Expectations): {gx_line}",
        f"* report: {_md(os.path.join(published_dir, 'report.html'))}",
    ]
    if run:
        lines.append(f"* MLflow audit run: {_md(run['run_id'])}")
    if validation is not None and not validation.success:
        lines += ["", "Failed expectations: " + ", ".join(_md(name) for name in validation.failed_names())]
    create_markdown_artifact("\n".join(lines), key="tracin-audit-summary", description="TracIn label audit")
    create_table_artifact(
        [{"rank": int(r["rank"]), "row_id": str(r["row_id"]), "given_label": str(r["label"]),
          "suggested_label": str(r["suggested_label"]), "self_influence": float(r["self_influence"]),
          "reason": str(r["reason"])} for r in result.top_flagged],
        key="tracin-flagged-rows", description="Top flagged rows (rank 1 = most suspicious)",
    )
    if run and run.get("report_url"):
        create_link_artifact(run["report_url"], link_text="Audit report in MLflow", key="tracin-report")
    else:
        create_link_artifact(Path(published_dir, "report.html").as_uri(), link_text="Audit report (local file)",
                             key="tracin-report")
    return result


@task(name="relabel-flagged", cache_policy=NO_CACHE, task_run_name="send flagged rows of audit {audit_key}")
def relabel_task(results_uri: str, audit_key: str, output_dir: str, sinks: list[str], outbox_dir: str,
                 audit_run_id: str | None, rows: int) -> list[dict[str, Any]]:
    """Deliver the flagged rows to every sink (outbox when one is down) and emit ``tracin.audit.flagged``."""
    from tracin_tasks.orchestration.relabel import batch_for_audit, emit_audit_flagged, push_flagged

    log = get_run_logger()
    plan = _load_plan(results_uri, audit_key)
    batch = batch_for_audit(plan, output_dir, audit_run_id, with_features=bool(sinks))  # checks the manifest
    outcomes = push_flagged(batch, sinks, outbox_dir) if sinks else []
    for o in outcomes:
        if o["status"] == "delivered":
            d = o["delivery"]
            log.info("%s: %d new, %d refreshed, %d kept as reviewers left them; %d waiting batches replayed",
                     o["sink"], d["delivered"], d["updated"], d["unchanged"], len(o["replayed"]))
        else:
            log.warning("%s is unavailable (%s); %d flagged rows wait in the outbox %s and go out on the next run",
                        o["sink"], o["error"], len(batch.rows), o["outbox_path"])
    emit_audit_flagged(batch, rows=rows, output_dir=output_dir, results_uri=results_uri,
                       tracking_uri=plan.settings.tracking_uri, outcomes=outcomes)
    return outcomes
