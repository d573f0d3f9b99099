"""A run's training data: from the spec :mod:`tracin_tasks.mlflow` logs, or the run's dataset input.

The spec (``tracin/training_data.json``) names the parquet artifact, the label, row-id and feature
columns, the input shape and a fingerprint; without one, a training dataset input whose source is
a parquet artifact of the run is used. The data is cached under its recorded fingerprint, so data
re-logged to fix it is fetched again; without a fingerprint it is read afresh every time.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import pandas as pd

from tracin_tasks.core.table import TrainingTable
from tracin_tasks.exceptions import CheckpointError, TrainingDataError
from tracin_tasks.integrations.mlflow.cache import RunCache, read_small_json
from tracin_tasks.integrations.mlflow.logging import DATA_SPEC


def read_training_table(cache: RunCache, run: Any, label_column: str | None = None,
                        row_id_column: str | None = None) -> TrainingTable:
    """The training data of ``run`` (an MLflow ``Run``), validated; ``label_column`` and ``row_id_column``
    override what the run recorded."""
    run_id = cache.run_id
    try:
        spec = read_small_json(cache, DATA_SPEC)
    except CheckpointError:
        spec = _spec_from_dataset_input(run, run_id)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # not JSON: said below
        spec = exc
    if not isinstance(spec, dict) or not isinstance(spec.get("artifact_path"), str):
        raise TrainingDataError(
            f"{DATA_SPEC} of run {run_id} is not a JSON object naming the data file "
            "('artifact_path'). Re-log the data with tracin_tasks.mlflow.log_training_data(df, ...)."
        )
    version = spec.get("fingerprint")
    version = version if isinstance(version, str) and re.fullmatch(r"[0-9a-f]{8,64}", version) else None
    try:
        with contextlib.ExitStack() as stack:
            try:
                local = (cache.download(spec["artifact_path"], version=version) if version
                         else stack.enter_context(cache.fresh(spec["artifact_path"])))
            except CheckpointError as exc:
                raise TrainingDataError(
                    f"The training data of run {run_id} ({spec['artifact_path']}) cannot be "
                    f"downloaded: {exc}. Log it with tracin_tasks.mlflow.log_training_data(df, ...)."
                ) from exc
            frame = pd.read_parquet(local)
    except TrainingDataError:
        raise
    except Exception as exc:
        raise TrainingDataError(
            f"The training data of run {run_id} ({spec['artifact_path']}) is not a readable "
            f"parquet file: {exc}. Re-log it with tracin_tasks.mlflow.log_training_data(df, ...)."
        ) from exc
    return TrainingTable.from_frame(
        frame,
        label_column or spec.get("label_column", "label"),
        row_id_column or spec.get("row_id_column", "row_id"),
        spec.get("feature_columns"),
        spec.get("input_shape"),
    )


def _spec_from_dataset_input(run: Any, run_id: str) -> dict[str, Any]:
    marker = f"/{run_id}/artifacts/"
    for di in run.inputs.dataset_inputs if run.inputs else []:
        tags = {t.key: t.value for t in di.tags}
        if tags.get("mlflow.data.context") not in (None, "training"):
            continue
        try:
            source = json.loads(di.dataset.source)
        except (ValueError, AttributeError):
            continue
        location = source.get("uri") or source.get("url") or ""
        if marker in location and location.endswith(".parquet"):
            return {"artifact_path": location.split(marker, 1)[1]}
    raise TrainingDataError(
        f"Run {run_id} has no training data an audit can read: no {DATA_SPEC} and no training "
        "dataset input whose source is a parquet artifact of the run. Log it with "
        "tracin_tasks.mlflow.log_training_data(df, label_column=..., row_id_column=...)."
    )
