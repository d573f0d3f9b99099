"""Computing one cell: one checkpoint over one shard of rows, stored as one pass."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from tracin_tasks.core.passes import PASS_FIELDS
from tracin_tasks.core.preflight import check_finite_weights
from tracin_tasks.core.table import TrainingTable
from tracin_tasks.core.tracin import TracIn
from tracin_tasks.exceptions import NonFiniteGradientError, UntrustedModelFactoryError
from tracin_tasks.orchestration.plan import AuditPlan, AuditSettings, Cell
from tracin_tasks.orchestration.sources import make_source, training_table
from tracin_tasks.orchestration.store import ResultsStore

logger = logging.getLogger(__name__)
_torch_threads_lock = threading.Lock()


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
    table = training_table(settings, plan.fingerprint)
    from tracin_tasks.integrations.mlflow.layouts import CheckpointRef

    model = source.build_model(_planned_spec(plan, authority))
    checkpoint = source.fetch(CheckpointRef(cell.step, cell.learning_rate, "plan", cell.kind, cell.location),
                              expected=model.state_dict(), model_name=type(model).__name__)
    check_finite_weights(checkpoint.load_state_dict(), checkpoint.step, settings.run_id)
    tracin = TracIn(model, [checkpoint], settings.loss, settings.layer_selection(), device=device)
    rows = slice(cell.row_start, cell.row_stop)
    try:
        (result,) = list(tracin.checkpoint_passes(table.dataset(rows), settings.batch_size))
    except NonFiniteGradientError as exc:
        raise _name_rows(exc, table, cell, settings.run_id) from exc
    store.write_cell(plan.audit_key, cell, {k: getattr(result, k) for k in PASS_FIELDS})
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
