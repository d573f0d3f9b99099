"""Where an audit's inputs come from: the MLflow source its settings describe, the credentials to
reach it, and the training data, read once per process."""

from __future__ import annotations

import functools
import os

from tracin_tasks.core.table import TrainingTable
from tracin_tasks.exceptions import ConfigurationError, DataError
from tracin_tasks.orchestration.plan import AuditSettings


def make_source(settings: AuditSettings, authority: AuditSettings | None = None):
    """The MLflow checkpoint source for these settings (no network until used).

    ``authority``: the settings the flow itself holds, when they may differ from a plan read back
    from the results store; trust, the ceiling and credentials then come from them.
    """
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    trusted = authority or settings
    apply_mlflow_credentials(trusted.mlflow_secret_block)
    steps = list(settings.steps) if isinstance(settings.steps, tuple) else settings.steps
    return MlflowCheckpointSource(
        settings.run_id,
        settings.tracking_uri,
        steps=steps,
        max_checkpoints=settings.max_checkpoints,
        model_factory=settings.model_factory,
        model_kwargs=settings.model_kwargs,
        allow_pickle=trusted.allow_pickle,
        default_learning_rate=settings.default_learning_rate,
        trusted_modules=trusted.trusted_modules,
        max_parameters=trusted.max_parameters,
        lr_metric=settings.lr_metric,
        artifact_path=settings.artifact_path,
        training_data=settings.training_data,
        label_column=settings.label_column,
        row_id_column=settings.row_id_column,
    )


def apply_mlflow_credentials(block: str | None) -> None:
    """Put the tracking server's credentials from a Prefect Secret block into this process's
    environment (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, which MLflow reads).

    The block holds the password, or ``{"username": ..., "password": ...}``; without a username
    there, ``MLFLOW_TRACKING_USERNAME`` must already be set. Read once per process.
    """
    if block:
        _load_mlflow_credentials(block)


def prefect_secret(block: str):
    """The value of a Prefect Secret block (a string, or a JSON object); never logged or quoted.

    The integrations do not import Prefect: this is what the orchestration layer and the CLI pass
    them to read a secret by name.
    """
    from prefect.blocks.system import Secret

    try:
        return Secret.load(block).get()
    except ValueError:
        raise ConfigurationError(
            f"The Prefect Secret block {block!r} does not exist; create it with `prefect block create secret` or "
            f"prefect.blocks.system.Secret(value=...).save({block!r})."
        ) from None


@functools.lru_cache(maxsize=8)
def _load_mlflow_credentials(block: str) -> None:
    value = prefect_secret(block)
    username = value.get("username") if isinstance(value, dict) else None
    password = value.get("password") if isinstance(value, dict) else value
    if not isinstance(password, str) or not password:
        raise ConfigurationError(f"The Prefect Secret block {block!r} holds no password (a string, or "
                                 "{'username': ..., 'password': ...}).")
    if username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = str(username)
    elif not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        raise ConfigurationError(f"The Prefect Secret block {block!r} holds a password but no username; store "
                                 "{'username': ..., 'password': ...} or set MLFLOW_TRACKING_USERNAME.")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password


def training_table(settings: AuditSettings, fingerprint: str) -> TrainingTable:
    """The training data of an audit, read once per worker process (its cells share it), refused when
    it changed since the audit was planned."""
    return _training_table(settings.run_id, settings.tracking_uri, settings.training_data, settings.label_column,
                           settings.row_id_column, fingerprint)


@functools.lru_cache(maxsize=4)
def _training_table(run_id: str, tracking_uri: str | None, training_data: str | None, label_column: str | None,
                    row_id_column: str | None, fingerprint: str) -> TrainingTable:
    where = (AuditSettings(run_id=run_id, tracking_uri=tracking_uri, training_data=training_data,
                           label_column=label_column, row_id_column=row_id_column))
    table = make_source(where).training_table()
    if table.fingerprint() != fingerprint:
        origin = training_data or f"run {run_id}"
        raise DataError(
            f"The training data of {origin} changed since the audit was planned (fingerprint "
            f"{table.fingerprint()} vs {fingerprint}); re-run the audit to plan it again."
        )
    return table
