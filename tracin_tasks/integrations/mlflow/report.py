"""Log an audit's outputs to MLflow, next to the audited training run.

Each audit becomes a **child run** of the training run (tag ``mlflow.parentRunId``): the MLflow
UI nests it under the training run, its metrics (``rows``, ``flagged``...) never mix with the
training run's own, and every audit keeps its own report. Tags link both ways:
``tracin.audit_of`` on the audit run, ``tracin.latest_audit_run`` on the training run.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from tracin_tasks.exceptions import TrackingServerUnavailableError, require_extra
from tracin_tasks.integrations.mlflow.logging import create_child_run

mlflow = require_extra("mlflow", "mlflow")


def ui_url(tracking_uri: str | None, experiment_id: str, run_id: str, artifact: str | None = None) -> str | None:
    """The MLflow UI page of a run (or of one of its artifacts), when the tracking URI is a server."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    parts = urlsplit(tracking_uri)
    if "@" in parts.netloc:  # a link is shown, logged and stored: never with the tracking credentials
        tracking_uri = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    url = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{url}/artifacts/{artifact}" if artifact else url


def log_audit(*, training_run_id: str, tracking_uri: str | None, **kwargs: Any) -> dict[str, Any]:
    """Create the audit's child run and log report, tables, plots, validation and metrics.

    Keyword arguments are those of :func:`_log_audit`. A tracking server that stops answering
    while this runs is a :class:`TrackingServerUnavailableError` (the audit is then not published).

    Returns:
        ``{"run_id", "experiment_id", "ui_url", "report_url"}`` of the audit run.
    """
    from mlflow.exceptions import MlflowException

    from tracin_tasks._uris import redact
    from tracin_tasks.integrations.mlflow.client import is_connection_problem

    try:
        return _log_audit(training_run_id=training_run_id, tracking_uri=tracking_uri, **kwargs)
    except (MlflowException, OSError) as exc:
        if not (isinstance(exc, OSError) or is_connection_problem(exc)):
            raise
        raise TrackingServerUnavailableError(
            f"The MLflow tracking server at {redact(tracking_uri)} did not answer while the audit of run "
            f"{training_run_id} was logged to it ({type(exc).__name__}). The audit was not published. Re-run it "
            "once the server answers: its cells are stored, so it only aggregates and reports again."
        ) from None


def _log_audit(
    *,
    training_run_id: str,
    tracking_uri: str | None,
    output_dir: str,
    files: dict[str, str],
    issues: pd.DataFrame,
    summary: dict[str, Any],
    info: dict[str, Any],
    validation: dict[str, Any] | None,
    data_docs_dir: str | None,
) -> dict[str, Any]:
    if tracking_uri and "@" in urlsplit(tracking_uri).netloc:
        # MLflow prints "View run … at: <tracking URI>/#/…" to stdout when a run ends, password
        # included; the audit reports its own link (ui_url, without credentials) instead
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    client, parent, run = create_child_run(
        tracking_uri, training_run_id, f"tracin-audit-{training_run_id[:8]}",
        f"TracIn label audit of run {training_run_id}: {summary['flagged']} of {summary['rows']} rows "
        f"flagged ({summary['policy']}). Open report.html under Artifacts.",
        {"tracin.audit_of": training_run_id, "tracin.audit_key": str(info.get("audit_key", ""))},
    )
    run_id = run.info.run_id
    status = "FAILED"
    try:
        client.log_artifact(run_id, files["report.html"])
        client.log_artifact(run_id, files["scores.parquet"])
        client.log_artifact(run_id, files["issues.parquet"])
        for name in ("self_influence_histogram.png", "flagged_share_per_class.png"):
            if name in files:
                client.log_artifact(run_id, files[name], "plots")
        with tempfile.TemporaryDirectory() as tmp:
            for name, payload in (("summary.json", summary), ("info.json", info), ("validation.json", validation)):
                path = os.path.join(tmp, name)
                with open(path, "w") as fh:
                    json.dump(payload, fh, indent=1, default=str)
                client.log_artifact(run_id, path, "audit")
        if data_docs_dir and os.path.isdir(data_docs_dir):
            client.log_artifacts(run_id, data_docs_dir, "data_docs")
        flagged = issues[issues["flagged"]].copy()
        flagged["row_id"] = flagged["row_id"].astype(str)  # ids stay exact and searchable as text
        client.log_table(run_id, data=flagged, artifact_file="flagged_rows.json")
        q = summary["self_influence_quantiles"]
        metrics = {
            "rows": summary["rows"],
            "flagged": summary["flagged"],
            "flagged_share": summary["flagged_share"],
            "gx_success": float(bool(validation and validation["success"])) if validation else float("nan"),
            "checkpoints": len(info.get("checkpoints", [])),
            **{f"self_influence_{k}": v for k, v in q.items()},
        }
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value))
        params = {"policy": summary["policy"], "layers": str(info.get("layers")), "loss": info.get("loss"),
                  "settings_hash": info.get("settings_hash"), "fingerprint": info.get("fingerprint")}
        for key, value in params.items():
            client.log_param(run_id, key, str(value)[:500])
        client.set_tag(training_run_id, "tracin.latest_audit_run", run_id)
        client.set_tag(training_run_id, "tracin.flagged", str(summary["flagged"]))
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    experiment_id = parent.info.experiment_id
    return {
        "run_id": run_id,
        "experiment_id": experiment_id,
        "ui_url": ui_url(tracking_uri, experiment_id, run_id),
        "report_url": ui_url(tracking_uri, experiment_id, run_id, "report.html"),
    }
