"""Corrections back: reviewers' decisions become a new version of the training data in MLflow.

:func:`apply_corrections` reads the audited run's training data, applies every ``relabeled``
decision, and writes

* ``<output_dir>/training_data.parquet``: the corrected table (same columns and row order);
* ``<output_dir>/changes.csv``: one line per decided row (row id, old and new label, decision,
  who, when, which audit flagged it);

then logs both to MLflow as a **child run of the audited run** (``tracin.relabel_of`` tag; the
training run gets ``tracin.latest_relabel_run``). The corrected table is that run's training
dataset, logged with :func:`tracin_tasks.mlflow.log_training_data`, so the next training run loads
it with :func:`load_corrected_training_data` and the next audit sees the new fingerprint.

Every decision is checked before anything is written: unknown row ids are rejected with the
list of them, and a corrected label must be one of the classes of the training data.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pandas as pd

from tracin_tasks._io import atomic_write
from tracin_tasks._text import write_csv
from tracin_tasks.exceptions import DataError, LabelOutOfRangeError, UnknownRowIdsError
from tracin_tasks.integrations.relabel.base import RELABELED, Decision

RELABEL_OF_TAG = "tracin.relabel_of"
LATEST_RELABEL_TAG = "tracin.latest_relabel_run"


@contextlib.contextmanager
def _tracking(uri: str | None) -> Iterator[None]:
    import mlflow

    before = mlflow.get_tracking_uri()
    if uri:
        mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def corrected_frame(
    frame: pd.DataFrame, label_column: str, row_id_column: str, decisions: Sequence[Decision]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The corrected table and its change log; raises before changing anything on a bad decision."""
    ids = frame[row_id_column].astype(str)
    position = pd.Index(ids)
    seen: dict[str, Decision] = {}
    for d in decisions:
        if d.row_id in seen and seen[d.row_id] != d:
            raise DataError(f"Row {d.row_id!r} has two different decisions; keep one.")
        seen[d.row_id] = d
    unknown = sorted(set(seen) - set(ids))
    if unknown:
        raise UnknownRowIdsError(
            f"{len(unknown)} decisions name row ids the training data does not have: {unknown[:20]}"
            f"{' …' if len(unknown) > 20 else ''}. Nothing was written; check that the decisions belong to "
            "this run's data.", unknown,
        )
    classes = sorted(set(frame[label_column].astype(int).tolist()))
    bad = sorted((d.row_id, d.label) for d in seen.values() if d.status == RELABELED and d.label not in classes)
    if bad:
        raise LabelOutOfRangeError(
            f"Corrected labels outside the training data's classes {classes}: {bad[:20]}. Nothing was written."
        )
    out = frame.copy()
    rows = []
    labels = out[label_column].to_numpy().copy()
    for d in seen.values():
        pos = position.get_loc(d.row_id)
        old = int(labels[pos])
        new = int(d.label) if d.status == RELABELED else old
        labels[pos] = new
        rows.append({"row_id": d.row_id, "old_label": old, "new_label": new, "decision": d.status,
                     "changed": new != old, "decided_by": d.decided_by, "decided_at": d.decided_at,
                     "audit_run_id": d.audit_run_id, "note": d.note})
    out[label_column] = pd.Series(labels, index=out.index).astype(frame[label_column].dtype)
    changes = pd.DataFrame(rows, columns=["row_id", "old_label", "new_label", "decision", "changed", "decided_by",
                                          "decided_at", "audit_run_id", "note"])
    return out, changes.sort_values("row_id", kind="stable").reset_index(drop=True)


def apply_corrections(
    run_id: str,
    decisions: Sequence[Decision],
    *,
    tracking_uri: str | None = None,
    output_dir: str | None = None,
    log_to_mlflow: bool = True,
    table: Any = None,
) -> dict[str, Any]:
    """Write the corrected training data of ``run_id`` and log it to MLflow (see the module docstring).

    ``table``: the run's training data when the caller has already read it.

    Returns:
        ``{"changed", "confirmed", "skipped", "files", "relabel_run_id", "fingerprint"}``.
    """
    if table is None:
        from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

        table = MlflowCheckpointSource(run_id, tracking_uri=tracking_uri).training_table()
    corrected, changes = corrected_frame(table.frame, table.label_column, table.row_id_column, decisions)
    output_dir = os.path.abspath(output_dir or os.path.join("tracin-relabel", run_id))
    os.makedirs(output_dir, exist_ok=True)
    files = {
        "training_data.parquet": os.path.join(output_dir, "training_data.parquet"),
        "changes.csv": os.path.join(output_dir, "changes.csv"),
    }
    atomic_write(files["training_data.parquet"], corrected)
    atomic_write(files["changes.csv"], lambda tmp: write_csv(changes, tmp))
    from tracin_tasks.core.table import TrainingTable

    new_table = TrainingTable.from_frame(corrected, table.label_column, table.row_id_column, table.feature_columns,
                                         table.input_shape)
    result = {
        "run_id": run_id,
        "changed": int(changes["changed"].sum()),
        "confirmed": int((changes["decision"] == "confirmed").sum()),
        "skipped": int((changes["decision"] == "skipped").sum()),
        "decisions": len(changes),
        "files": files,
        "fingerprint": new_table.fingerprint(),
        "previous_fingerprint": table.fingerprint(),
        "relabel_run_id": None,
    }
    if log_to_mlflow and len(changes):
        result["relabel_run_id"] = _log_relabel_run(run_id, tracking_uri, table, corrected, files, result)
    return result


def _log_relabel_run(run_id: str, tracking_uri: str | None, table: Any, corrected: pd.DataFrame,
                     files: dict[str, str], result: dict[str, Any]) -> str:
    from tracin_tasks.integrations.mlflow.logging import create_child_run, log_training_data

    client, parent, run = create_child_run(
        tracking_uri, run_id, f"tracin-relabel-{run_id[:8]}",
        f"Corrected training data of run {run_id}: {result['changed']} labels changed, "
        f"{result['confirmed']} confirmed, {result['skipped']} skipped. Train on it with "
        f"tracin_tasks.mlflow.load_corrected_training_data('{run_id}').",
        {RELABEL_OF_TAG: run_id},
    )
    status = "FAILED"
    try:
        with _tracking(tracking_uri):
            log_training_data(corrected, label_column=table.label_column, row_id_column=table.row_id_column,
                              feature_columns=table.feature_columns, input_shape=table.input_shape,
                              name="training_data", run_id=run.info.run_id)
        client.log_artifact(run.info.run_id, files["changes.csv"], "relabel")
        for key in ("changed", "confirmed", "skipped", "decisions"):
            client.log_metric(run.info.run_id, key, float(result[key]))
        client.log_param(run.info.run_id, "fingerprint", result["fingerprint"])
        client.log_param(run.info.run_id, "previous_fingerprint", result["previous_fingerprint"])
        client.set_tag(run_id, LATEST_RELABEL_TAG, run.info.run_id)
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def load_corrected_training_data(run_id: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """The latest corrected training data of a run (or the run's own data when none was corrected yet)."""
    import mlflow

    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    latest = client.get_run(run_id).data.tags.get(LATEST_RELABEL_TAG)
    return MlflowCheckpointSource(latest or run_id, tracking_uri=tracking_uri).training_table().frame


def apply_from_sink(run_id: str, sink_uri: str, *, secrets: Callable[[str], str] | None = None,
                    **kwargs: Any) -> dict[str, Any]:
    """:func:`apply_corrections` with the finished decisions a sink holds for the run's data
    (``secrets`` reads a Secret block the sink's URI names)."""
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource
    from tracin_tasks.integrations.relabel.registry import open_sink

    table = MlflowCheckpointSource(run_id, tracking_uri=kwargs.get("tracking_uri")).training_table()
    sink = open_sink(sink_uri, secrets=secrets)
    try:
        decisions = sink.decisions(table.fingerprint())
    finally:
        sink.close()
    result = apply_corrections(run_id, decisions, table=table, **kwargs)
    result["sink"] = sink.name
    return result
