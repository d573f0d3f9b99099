"""Reporting an audit: flag rows, validate the result with Great Expectations, write the report,
log it all to MLflow next to the audited run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from tracin_tasks._uris import redact
from tracin_tasks.core.flagging import FlagPolicy, find_label_issues
from tracin_tasks.core.table import TrainingTable
from tracin_tasks.orchestration.aggregate import write_output
from tracin_tasks.orchestration.plan import AuditPlan
from tracin_tasks.orchestration.sources import training_table


@dataclass
class ReportResult:
    """What reporting an audit produced.

    Attributes:
        files: output name → path (scores, issues, report, plots).
        summary: counts and quantiles of :func:`tracin_tasks.core.flagging.find_label_issues`.
        validation: the Great Expectations outcome (None when validation was off).
        mlflow_run: the MLflow audit run (``run_id``, ``experiment_id``, ``ui_url``, ``report_url``).
        top_flagged: the first flagged rows, most suspicious first.
    """

    files: dict[str, str]
    summary: dict[str, Any]
    validation: Any = None
    mlflow_run: dict[str, Any] | None = None
    top_flagged: list[dict[str, Any]] = field(default_factory=list)

    @property
    def data_docs(self) -> str | None:
        return self.validation.data_docs_index if self.validation is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {"files": dict(self.files), "summary": self.summary, "mlflow_run": self.mlflow_run,
                "validation": self.validation.to_dict() if self.validation is not None else None,
                "data_docs": self.data_docs}


def report_audit(
    plan: AuditPlan,
    output_dir: str,
    flag: dict[str, Any] | None = None,
    validate: bool = True,
    extra_expectations: list[dict[str, Any]] | None = None,
    log_to_mlflow: bool = True,
) -> ReportResult:
    """Flag rows, validate with Great Expectations, write the report, log it all to MLflow.

    Reads ``scores.parquet`` in ``output_dir`` and writes beside it. Raising on a failed
    validation is the caller's choice.
    """
    from tracin_tasks.integrations.report import ReportInputs, write_report

    settings = plan.settings
    policy = FlagPolicy.from_dict(flag)
    scores_path = os.path.join(output_dir, "scores.parquet")
    table = training_table(settings, plan.fingerprint)
    issues, summary, info = find_label_issues(pd.read_parquet(scores_path), policy, _audit_info(plan, table))
    files = {"scores.parquet": scores_path,
             "issues.parquet": write_output(issues, os.path.join(output_dir, "issues.parquet"))}

    validation = None
    if validate:
        from tracin_tasks.integrations.gx_validation import validate_audit

        validation = validate_audit(
            issues, expected_row_ids=table.row_ids, known_classes=sorted(set(table.labels.tolist())),
            n_checkpoints=len(plan.checkpoints), max_flagged_share=_largest_flagged_share(policy, len(issues)),
            output_dir=output_dir, extra_expectations=extra_expectations or (),
        )
    validation_dict = validation.to_dict() if validation is not None else None
    files.update(write_report(ReportInputs(issues, summary, info, validation_dict, _thumbnails(issues, table)),
                              output_dir))

    mlflow_run = None
    if log_to_mlflow:
        from tracin_tasks.integrations.mlflow.report import log_audit

        data_docs = os.path.dirname(validation.data_docs_index) if validation and validation.data_docs_index else None
        mlflow_run = log_audit(
            training_run_id=settings.run_id, tracking_uri=settings.tracking_uri, output_dir=output_dir, files=files,
            issues=issues, summary=summary, info=info, validation=validation_dict, data_docs_dir=data_docs,
        )
    return ReportResult(files, summary, validation, mlflow_run, issues[issues["flagged"]].head(20).to_dict("records"))


def _audit_info(plan: AuditPlan, table: Any = None) -> dict[str, Any]:
    """What the report and the MLflow run say about the audit itself (and its training data, when given)."""
    import tracin_tasks

    settings = plan.settings
    data = None
    if table is not None:
        data = {"source": settings.training_data or "logged with the run", "label_column": table.label_column,
                "row_id_column": table.row_id_column,
                "row_ids_are_positions": bool(getattr(table, "ids_are_positions", False))}
    return {
        "training_data": data,
        "run_id": settings.run_id,
        "tracking_uri": redact(settings.tracking_uri),
        "audit_key": plan.audit_key,
        "settings_hash": settings.config_hash(),
        "fingerprint": plan.fingerprint,
        "layers": settings.to_dict()["layers"],
        "loss": settings.loss,
        "checkpoints": list(plan.checkpoints),
        "warnings": list(plan.warnings),
        "audited_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": tracin_tasks.__version__,
    }


def _largest_flagged_share(policy: FlagPolicy, n_rows: int) -> float | None:
    """The largest share of rows the policy may flag (ties may add one row), for the validation."""
    share = None
    if policy.top_fraction is not None and not policy.per_class:
        share = policy.top_fraction + 1.0 / n_rows
    if policy.budget is not None:
        share = min(share or 1.0, policy.budget / n_rows)
    return share


def _thumbnails(issues: pd.DataFrame, table: TrainingTable) -> dict[Any, np.ndarray]:
    """The first 50 flagged rows as 2-D images, for inputs that are images."""
    shape = table.input_shape
    if shape is None or len([d for d in shape if d > 1]) != 2:
        return {}
    top = issues[issues["flagged"]].head(50)
    positions = pd.Index(table.row_ids).get_indexer(top["row_id"])
    feats = table.features()
    return {rid: feats[pos].reshape([d for d in shape if d > 1]) for rid, pos in zip(top["row_id"], positions)}
