"""The plain functions behind the audit flow's tasks (unit-tested without Prefect).

``plan_audit`` reads the run once and splits the work; ``compute_cell`` loads one checkpoint,
streams one shard of rows and stores its partial scores; ``write_scores`` aggregates and writes
the per-row result. Data moves between them as paths and small JSON dicts, never as tensors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import uuid
from typing import Any

import numpy as np
import pandas as pd
import torch

from tracin_tasks.core.table import TrainingTable
from tracin_tasks.core.tracin import TracIn
from tracin_tasks.exceptions import (
    CheckpointError,
    ConfigurationError,
    DataError,
    LabelOutOfRangeError,
    NonFiniteGradientError,
    OutputWriteError,
    TracInError,
    UntrustedModelFactoryError,
)
from tracin_tasks.orchestration.plan import AuditPlan, AuditSettings, Cell, plan_cells
from tracin_tasks.orchestration.store import ResultsStore, aggregate_cells

logger = logging.getLogger(__name__)
_torch_threads_lock = threading.Lock()


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
    )


def apply_mlflow_credentials(block: str | None) -> None:
    """Put the tracking server's credentials from a Prefect Secret block into this process's
    environment (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, which MLflow reads).

    The block holds the password, or ``{"username": ..., "password": ...}``; without a username
    there, ``MLFLOW_TRACKING_USERNAME`` must already be set. Read once per process.
    """
    if block:
        _load_mlflow_credentials(block)


@functools.lru_cache(maxsize=8)
def _load_mlflow_credentials(block: str) -> None:
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block).get()
    except ValueError as exc:
        raise ConfigurationError(
            f"There is no Prefect Secret block named {block!r} (mlflow_secret_block): {exc}. Create it with "
            "prefect.blocks.system.Secret(value=PASSWORD).save(NAME), or pass the credentials in "
            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD."
        ) from None
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


@functools.lru_cache(maxsize=4)
def _cached_table(run_id: str, tracking_uri: str | None, fingerprint: str) -> TrainingTable:
    """Training data per worker process, read once per audit (cells of a worker share it)."""
    table = make_source(AuditSettings(run_id=run_id, tracking_uri=tracking_uri)).training_table()
    if table.fingerprint() != fingerprint:
        raise DataError(
            f"The training data of run {run_id} changed since the audit was planned (fingerprint "
            f"{table.fingerprint()} vs {fingerprint}); re-plan the audit."
        )
    return table


def plan_audit(settings: AuditSettings, store: ResultsStore) -> AuditPlan:
    """Discover checkpoints and data, check the store is writable, and plan the cells.

    Nothing from the run is trusted before it is checked: the model factory must be trusted
    (:mod:`tracin_tasks.integrations.model_factory`) and is first built on PyTorch's meta device
    (its size against the ceiling, nothing allocated); each checkpoint's declared tensors are then
    compared with that model before their data is read. A broken factory, a checkpoint of another
    architecture or a diverged run, a missing layer or labels the model does not have fail the plan,
    before any cell is stored.
    """
    source = make_source(settings)
    refs = source.checkpoint_refs()
    table = source.training_table()
    spec = source.model_spec()
    meta_model = source.build_meta_model(spec)
    expected, name = meta_model.state_dict(), type(meta_model).__name__
    last = None
    for ref in refs:  # one at a time: each is downloaded into the cache the cells then read
        last = source.fetch(ref, expected=expected, model_name=name)
        _check_finite_weights(last, settings.run_id)
    model = source.build_model(spec)
    TracIn(model, [last], settings.loss, _layers(settings))
    check_labels_fit(model, table, settings)
    store.check_writable()
    checkpoints = [
        {"step": r.step, "learning_rate": r.learning_rate, "lr_source": r.lr_source, "kind": r.kind,
         "location": r.location}
        for r in refs
    ]
    plan = plan_cells(settings, checkpoints, len(table), table.fingerprint(), source.warnings, spec.to_dict())
    store.save_plan(plan)
    return plan


def check_labels_fit(model: torch.nn.Module, table: TrainingTable, settings: AuditSettings) -> None:
    """Fail the plan when the rows do not fit the model: one forward pass of the first row gives
    the number of classes, against which every label is checked (a classifier's audit)."""
    x = torch.from_numpy(table.features(slice(0, 1)))
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(next(model.parameters()).dtype))
    except Exception as exc:  # shape errors surface as RuntimeError/ValueError from torch
        raise DataError(
            f"The model of run {settings.run_id} cannot take the training data's rows: a row of shape "
            f"{tuple(x.shape[1:])} failed in the forward pass ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). Check input_shape and feature_columns "
            "given to log_training_data, and the model factory's arguments."
        ) from exc
    if settings.loss != "cross_entropy" or not isinstance(out, torch.Tensor) or out.dim() < 2:
        return
    n_classes = int(out.shape[1])
    labels = table.labels
    # every negative label, -100 (cross_entropy's ignore_index) included: training ignored such rows,
    # and an audit scores every row it is given, so they have no self-influence to measure
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        ids = table.row_ids[bad]
        values = sorted(set(labels[bad].tolist()))
        ignored = (" Rows labelled -100 (PyTorch's ignore_index) were left out of training's loss: drop them "
                   "from the logged training data." if -100 in values else "")
        raise LabelOutOfRangeError(
            f"{int(bad.sum())} row(s) of run {settings.run_id} have labels {values[:10]} outside the model's "
            f"{n_classes} classes (0..{n_classes - 1}): row ids {ids[:20].tolist()}"
            f"{' ...' if len(ids) > 20 else ''}. Fix those labels and log the data again, or build the model "
            f"with as many outputs as there are classes.{ignored}"
        )


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: retry a failed task unless it failed on bad input.

    A :class:`TracInError` that is not also an ``OSError``/``ConnectionError`` (bad data,
    settings, checkpoints, labels, non-finite gradients) fails the same way every time, so
    retrying only delays the error. Anything else (a lost worker, the tracking server or the
    results store not answering) goes on to the task's retry policy.
    """
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            state.result()
        except BaseException as raised:  # noqa: BLE001 - what the task raised, whatever it is
            exc = raised
    if isinstance(exc, TracInError) and not isinstance(exc, (OSError, ConnectionError)):
        return False
    return True


def _layers(settings: AuditSettings):
    return list(settings.layers) if isinstance(settings.layers, tuple) else settings.layers


def compute_cell(plan: AuditPlan, cell: Cell, store: ResultsStore, torch_threads: int | None = None,
                 authority: AuditSettings | None = None) -> dict[str, Any]:
    """Compute one cell unless its result is already stored; return what happened.

    Args:
        plan: the audit's plan, as read back from the results store.
        cell: the cell.
        store: the results store.
        torch_threads: torch's intra-op threads for this cell.
        authority: the flow's own settings. A plan is a file in the results store; with these,
            the model the plan names is built only if the flow itself would build it (its caller's
            factory, or a run's factory its trusted modules allow).

    Returns:
        ``{"cell": name, "path": stored file, "skipped": bool, "seconds": float, "device": str}``.
    """
    path = store.cell_path(plan.audit_key, cell)
    if store.has(plan.audit_key, cell):
        return {"cell": cell.name, "path": path, "skipped": True, "seconds": 0.0, "device": None}
    t0 = time.perf_counter()
    settings = plan.settings
    if torch_threads:
        with _torch_threads_lock:
            torch.set_num_threads(torch_threads)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = make_source(settings, authority)
    table = _cached_table(settings.run_id, settings.tracking_uri, plan.fingerprint)
    from tracin_tasks.integrations.mlflow.layouts import CheckpointRef

    model = source.build_model(_planned_spec(plan, authority))
    checkpoint = source.fetch(CheckpointRef(cell.step, cell.learning_rate, "plan", cell.kind, cell.location),
                              expected=model.state_dict(), model_name=type(model).__name__)
    _check_finite_weights(checkpoint, settings.run_id)
    tracin = TracIn(model, [checkpoint], settings.loss, _layers(settings), device=device)
    rows = slice(cell.row_start, cell.row_stop)
    try:
        (result,) = list(tracin.checkpoint_passes(table.dataset(rows), settings.batch_size))
    except NonFiniteGradientError as exc:
        raise _name_rows(exc, table, cell, settings.run_id) from exc
    arrays = {k: getattr(result, k) for k in ("squared_norm", "loss", "margin", "predicted", "confidence")}
    store.write_cell(plan.audit_key, cell, arrays)
    seconds = time.perf_counter() - t0
    logger.info("cell %s done on %s in %.2fs", cell.label, device, seconds)
    return {"cell": cell.name, "path": path, "skipped": False, "seconds": seconds, "device": device}


def _planned_spec(plan: AuditPlan, authority: AuditSettings | None):
    """The model spec the plan was checked with (None for a plan that predates recording it)."""
    from tracin_tasks.integrations.model_factory import ModelSpec

    if plan.model is None:
        return None
    spec = ModelSpec.from_dict(plan.model)
    if authority is not None and spec.origin == "caller" and (
            spec.factory != authority.model_factory or spec.kwargs != (authority.model_kwargs or {})):
        raise UntrustedModelFactoryError(
            f"The plan of audit {plan.audit_key} in the results store names the model factory {spec.factory!r} as "
            "the caller's, but this audit was not given it; the plan was changed by someone else. Nothing was "
            "imported. Restrict write access to the results store, then re-run the audit."
        )
    return spec


def _check_finite_weights(checkpoint: Any, run_id: str) -> None:
    """A checkpoint of a diverged run (NaN/inf weights) would fail every row: say so instead."""
    bad = [k for k, v in checkpoint.load_state_dict().items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"The checkpoint at step {checkpoint.step} of run {run_id} holds NaN or infinite weights "
            f"({bad[:10]}): training had diverged there. Leave it out of the audit with steps=[...] "
            "(or max_checkpoints=), or audit a run that trained without diverging."
        )


def _name_rows(exc: NonFiniteGradientError, table: TrainingTable, cell: Cell, run_id: str) -> NonFiniteGradientError:
    """The core names rows by position in the cell's shard; say which rows they are (row ids)."""
    positions = [cell.row_start + int(p) for p in exc.rows]
    ids = table.row_ids[positions].tolist() if positions else []
    error = NonFiniteGradientError(
        f"{len(ids)} row(s) of run {run_id} have non-finite (NaN or inf) loss gradients at the checkpoint "
        f"of step {cell.step}: row ids {ids[:20]}{' ...' if len(ids) > 20 else ''}. Their features or "
        "labels push the model out of floating-point range (look for extreme feature values); fix or drop "
        "those rows and log the data again.",
        positions,
    )
    error.row_ids = ids
    return error


def write_scores(plan: AuditPlan, store: ResultsStore, output_dir: str) -> str:
    """Aggregate every cell and write ``scores.parquet`` (row_id, label, self_influence, ...)."""
    agg = aggregate_cells(store, plan)
    table = _cached_table(plan.settings.run_id, plan.settings.tracking_uri, plan.fingerprint)
    frame = pd.DataFrame(
        {
            "row_id": table.row_ids,
            "label": table.labels,
            "self_influence": agg["self_influence"],
            "aum": agg["aum"],
            "loss_final": agg["loss_final"],
            "predicted_label": agg["predicted"],
            "predicted_confidence": agg["confidence"],
        }
    )
    return _atomic_parquet(frame, os.path.join(output_dir, "scores.parquet"))


def scores_summary(path: str, top: int = 5) -> dict[str, Any]:
    """A short description of a scores file (for logs and the CLI)."""
    frame = pd.read_parquet(path)
    s = frame["self_influence"].to_numpy()
    order = np.argsort(-s, kind="stable")[:top]
    return {
        "rows": int(len(frame)),
        "self_influence_median": float(np.nanmedian(s)),
        "self_influence_p99": float(np.nanquantile(s, 0.99)),
        "top_rows": frame.iloc[order][["row_id", "label", "self_influence"]].to_dict("records"),
    }


def report_audit(
    plan: AuditPlan,
    output_dir: str,
    flag: dict[str, Any] | None = None,
    validate: bool = True,
    extra_expectations: list[dict[str, Any]] | None = None,
    log_to_mlflow: bool = True,
) -> dict[str, Any]:
    """Flag rows, validate with Great Expectations, write the report, log it all to MLflow.

    Returns a JSON-able dict: paths of the outputs, the summary, the validation outcome and the
    MLflow audit run. Raising on a failed validation is the caller's choice.
    """
    from datetime import datetime, timezone

    import tracin_tasks
    from tracin_tasks.core.flagging import FlagPolicy, find_label_issues
    from tracin_tasks.integrations.report import ReportInputs, write_report

    settings = plan.settings
    policy = FlagPolicy.from_dict(flag)
    scores_path = os.path.join(output_dir, "scores.parquet")
    scores = pd.read_parquet(scores_path)
    table = _cached_table(settings.run_id, settings.tracking_uri, plan.fingerprint)
    info = {
        "run_id": settings.run_id,
        "tracking_uri": redact_uri(settings.tracking_uri),
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
    issues, summary, info = find_label_issues(scores, policy, info)
    files = {"scores.parquet": scores_path}
    files["issues.parquet"] = _atomic_parquet(issues, os.path.join(output_dir, "issues.parquet"))

    validation = None
    data_docs = None
    if validate:
        from tracin_tasks.integrations.gx_validation import validate_audit

        max_share = None
        if policy.top_fraction is not None and not policy.per_class:
            max_share = policy.top_fraction + 1.0 / len(issues)
        if policy.budget is not None:
            max_share = min(max_share or 1.0, policy.budget / len(issues))
        outcome = validate_audit(
            issues, expected_row_ids=table.row_ids, known_classes=sorted(set(table.labels.tolist())),
            n_checkpoints=len(plan.checkpoints), max_flagged_share=max_share, output_dir=output_dir,
            extra_expectations=extra_expectations or (),
        )
        validation = {"success": outcome.success, "results": outcome.results, "statistics": outcome.statistics,
                      "data_docs": outcome.data_docs_index}
        data_docs = os.path.dirname(outcome.data_docs_index) if outcome.data_docs_index else None

    images = {}
    shape = table.input_shape
    if shape is not None and len([d for d in shape if d > 1]) == 2:
        top = issues[issues["flagged"]].head(50)
        positions = pd.Index(table.row_ids).get_indexer(top["row_id"])
        feats = table.features()
        images = {rid: feats[pos].reshape([d for d in shape if d > 1]) for rid, pos in zip(top["row_id"], positions)}
    report = ReportInputs(issues, summary, info, validation, images)
    files.update(write_report(report, output_dir))

    mlflow_run = None
    if log_to_mlflow:
        from tracin_tasks.integrations.mlflow.report import log_audit

        mlflow_run = log_audit(
            training_run_id=settings.run_id, tracking_uri=settings.tracking_uri, output_dir=output_dir, files=files,
            issues=issues, summary=summary, info=info, validation=validation, data_docs_dir=data_docs,
        )
    return {"files": files, "summary": summary, "validation": validation, "mlflow_run": mlflow_run,
            "data_docs": validation["data_docs"] if validation else None,
            "top_flagged": issues[issues["flagged"]].head(20).to_dict("records")}


def redact_uri(uri: str | None) -> str | None:
    """A URI without its password (``https://user:secret@host`` → ``https://user:***@host``)."""
    if not uri:
        return uri
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _atomic_parquet(frame: pd.DataFrame, path: str) -> str:
    """Write under a temporary name (ending in .tmp: nothing reads it as a result), then rename."""
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OutputWriteError(
            f"Could not write {path!r}: {exc.strerror or exc}. Choose an output folder this process can "
            "write (output_dir= / --output); finished cells stay in the results store, so the re-run "
            "only aggregates."
        ) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path
