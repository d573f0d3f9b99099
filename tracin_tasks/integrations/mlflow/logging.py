"""Training side: what a PyTorch training loop logs to MLflow so that an audit can run later.

Three calls inside an active MLflow run (``mlflow.start_run()``)::

    import tracin_tasks.mlflow as tm
    tm.log_training_data(df, label_column="label", row_id_column="row_id", input_shape=(1, 8, 8))
    tm.log_model_factory("my_pkg.models:build_mlp", in_features=64, n_classes=10)
    for epoch in range(epochs):
        ...
        tm.log_checkpoint(model, step=epoch, learning_rate=sched.get_last_lr()[0])

What lands in the run:

* ``training_data/<name>.parquet`` (a run artifact, reachable by every worker that reaches the
  tracking server) and an MLflow dataset input of the run whose source is that file;
* ``tracin/training_data.json``: label, row id and feature columns, input shape, fingerprint;
* ``tracin/model_factory.json``: ``module:function`` and its keyword arguments;
* ``checkpoints/step_<N>/state_dict.pt`` (``torch.save`` of the state_dict) and
  ``checkpoints/step_<N>/meta.json`` (step, learning rate), plus the metric ``lr`` at step N.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from tracin_tasks.core.table import TrainingTable
from tracin_tasks.exceptions import CheckpointError, ConfigurationError, ModelFactoryError, require_extra

mlflow = require_extra("mlflow", "mlflow")

DATA_SPEC = "tracin/training_data.json"
FACTORY_SPEC = "tracin/model_factory.json"
CHECKPOINT_ROOT = "checkpoints"
LR_METRIC = "lr"
AUDITABLE_TAG = "tracin.checkpoints"
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _active_run_id(run_id: str | None) -> str:
    if run_id:
        return run_id
    run = mlflow.active_run()
    if run is None:
        raise ConfigurationError(
            "No active MLflow run: call this inside `with mlflow.start_run():` or pass run_id=."
        )
    return run.info.run_id


def _log_json(client: Any, run_id: str, obj: Mapping[str, Any], artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(artifact_file))
        with open(path, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
        client.log_artifact(run_id, path, os.path.dirname(artifact_file) or None)


def log_training_data(
    df: pd.DataFrame,
    label_column: str = "label",
    row_id_column: str = "row_id",
    feature_columns: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    name: str = "training_data",
    run_id: str | None = None,
) -> str:
    """Save the training set as a parquet run artifact and log it as the run's dataset input.

    Args:
        df: one row per training example, with a unique row id column and an integer label.
        label_column: the label as given to training.
        row_id_column: a stable id per row (kept; flagged rows are reported by it).
        feature_columns: the numeric model-input columns, in order (default: all other columns).
        input_shape: shape of one row's model input, e.g. ``(1, 8, 8)``; default flat.
        name: dataset name shown in the MLflow UI; also the parquet file's name.
        run_id: log to this run instead of the active one.

    Returns:
        The artifact URI of the saved parquet file.

    Example:
        >>> tm.log_training_data(df, label_column="label", row_id_column="row_id", input_shape=(1, 8, 8))
    """
    if not re.fullmatch(r"[\w.-]+", name):
        raise ConfigurationError(f"Dataset name {name!r} may hold only letters, digits, '_', '-', '.'.")
    run_id = _active_run_id(run_id)
    table = TrainingTable.from_frame(df, label_column, row_id_column, feature_columns, input_shape)
    client = mlflow.MlflowClient()
    artifact_path = f"training_data/{name}.parquet"
    uri = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
    # build the dataset entry first: if MLflow cannot describe the source, nothing is logged
    dataset = mlflow.data.from_pandas(df, source=_dataset_source(uri), targets=label_column, name=name)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.parquet")
        df.to_parquet(path, index=False)
        client.log_artifact(run_id, path, "training_data")
    spec = {
        "artifact_path": artifact_path,
        "label_column": label_column,
        "row_id_column": row_id_column,
        "feature_columns": list(table.feature_columns),
        "input_shape": list(table.input_shape) if table.input_shape else None,
        "rows": len(table),
        "fingerprint": table.fingerprint(),
    }
    _log_json(client, run_id, spec, DATA_SPEC)
    if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
        mlflow.log_input(dataset, context="training")
    else:
        from mlflow.entities import DatasetInput, InputTag

        client.log_inputs(
            run_id, [DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])]
        )
    return uri


def _dataset_source(artifact_uri: str) -> Any:
    """A dataset source MLflow can record for a run artifact.

    Artifacts served by a tracking server (``mlflow-artifacts:/…``) have no dataset-source
    resolver; they are recorded as the HTTP URL the server serves them from.
    """
    if not artifact_uri.startswith("mlflow-artifacts:"):
        return artifact_uri
    from urllib.parse import urlparse

    from mlflow.data.http_dataset_source import HTTPDatasetSource

    parsed = urlparse(artifact_uri)
    base = f"http://{parsed.netloc}" if parsed.netloc else mlflow.get_tracking_uri().rstrip("/")
    return HTTPDatasetSource(url=f"{base}/api/2.0/mlflow-artifacts/artifacts/{parsed.path.lstrip('/')}")


def log_model_factory(factory: str, run_id: str | None = None, **kwargs: Any) -> None:
    """Record how to rebuild the model: an importable ``"module:function"`` and its arguments.

    The audit imports it in the worker's environment and calls ``function(**kwargs)`` to get the
    architecture, then loads each checkpoint into it, but only when the operator trusts the
    module (``TRACIN_TRUSTED_MODULES``, ``--trust-module``, the flow's ``trusted_modules``): a run
    is untrusted input. Arguments must be JSON values.

    Example:
        >>> tm.log_model_factory("my_pkg.models:build_mlp", in_features=64, n_classes=10)
    """
    if not isinstance(factory, str) or not _FACTORY_RE.match(factory):
        raise ModelFactoryError(
            f"Model factory {factory!r} is not of the form 'package.module:function'."
        )
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise ConfigurationError(f"Model factory arguments must be JSON values: {exc}.") from None
    run_id = _active_run_id(run_id)
    _log_json(mlflow.MlflowClient(), run_id, {"factory": factory, "kwargs": kwargs}, FACTORY_SPEC)


def log_checkpoint(
    model: nn.Module | Mapping[str, torch.Tensor],
    step: int,
    learning_rate: float,
    run_id: str | None = None,
    **metadata: Any,
) -> str:
    """Save a checkpoint (its state_dict) and the learning rate in force, at ``step``.

    Returns:
        The artifact path of the saved state_dict (``checkpoints/step_<N>/state_dict.pt``).

    Example:
        >>> tm.log_checkpoint(model, step=epoch, learning_rate=sched.get_last_lr()[0])
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigurationError(f"step must be a non-negative integer, got {step!r}.")
    lr = float(learning_rate)
    if not math.isfinite(lr):
        raise CheckpointError(f"learning_rate at step {step} is {lr}; TracIn needs a finite learning rate.")
    run_id = _active_run_id(run_id)
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    state = {k: v.detach().cpu() for k, v in state.items()}
    client = mlflow.MlflowClient()
    folder = f"{CHECKPOINT_ROOT}/step_{step}"
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, os.path.join(tmp, "state_dict.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump({"step": step, "learning_rate": lr, **metadata}, fh, default=str)
        client.log_artifacts(run_id, tmp, folder)
    client.log_metric(run_id, LR_METRIC, lr, step=step)
    client.set_tag(run_id, AUDITABLE_TAG, "true")  # lets a scheduled audit find the run
    return f"{folder}/state_dict.pt"


def create_child_run(tracking_uri: str | None, parent_run_id: str, run_name: str, note: str,
                     tags: dict[str, str]) -> tuple[Any, Any, Any]:
    """A run nested under ``parent_run_id`` in the MLflow UI (tag ``mlflow.parentRunId``), with a note.

    Returns:
        ``(client, parent run, new run)``.
    """
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(parent_run_id)
    run = client.create_run(parent.info.experiment_id, run_name=run_name,
                            tags={"mlflow.parentRunId": parent_run_id, **tags, "mlflow.note.content": note})
    return client, parent, run
