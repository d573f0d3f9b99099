"""The learning rate in force at each checkpoint: from a metric, a checkpoint's metadata, or a default.

TracIn weights each checkpoint by the learning rate in force there, so a rate that is missing,
not finite or negative is an error (:class:`LearningRateError`) unless the operator opts in to
``default_learning_rate`` (e.g. 1.0: every checkpoint weighted equally), which is then said in a
warning that travels with the audit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from collections.abc import Mapping
from typing import Any

from tracin_tasks._checks import usable_lr
from tracin_tasks.exceptions import LearningRateError

logger = logging.getLogger(__name__)


def _lr_text(lr: float) -> str:
    if math.isfinite(lr) and abs(lr) >= sys.float_info.max:
        return f"{lr:g}, which is how MLflow stores {'-' if lr < 0 else ''}inf"
    return f"{lr:g}"


def learning_rate_at(step: int, history: Mapping[int, float], meta: Mapping[str, Any]) -> tuple[float, str]:
    """The learning rate recorded for ``step``: from the metric, else the checkpoint's metadata; NaN with
    source ``"missing"`` when there is none (checked, with every other, by :func:`checked_learning_rates`)."""
    if step in history:
        return history[step], "metric"
    if "learning_rate" in meta:
        try:
            return float(meta["learning_rate"]), "metadata"
        except (TypeError, ValueError):
            return math.nan, "metadata"
    return math.nan, "missing"


def checked_learning_rates(refs: list, *, run_id: str, lr_metric: str, default: float | None) -> tuple[list, list[str]]:
    """Refuse checkpoints whose learning rate is not usable; apply ``default`` to those without one.

    Returns:
        The references (with defaults applied) and the warnings to show with the audit.
    """
    bad = [r for r in refs if r.lr_source != "missing" and not usable_lr(r.learning_rate)]
    if bad:
        origin = {"metric": f"the {lr_metric!r} metric", "metadata": "its meta.json"}
        listed = ", ".join(
            f"step {r.step}: {_lr_text(r.learning_rate)} (from {origin.get(r.lr_source, r.lr_source.replace('_', ' '))})"
            for r in bad[:10]
        )
        raise LearningRateError(
            f"Run {run_id} has checkpoints whose learning rate is not a finite number >= 0 "
            f"({listed}{' ...' if len(bad) > 10 else ''}). TracIn weights each checkpoint by the learning "
            "rate in force at its step, so the audit cannot use them. Log the right value at each of those "
            f"steps: MlflowClient().log_metric({run_id!r}, {lr_metric!r}, <lr>, step=<step>) "
            "(the latest value logged at a step wins), or leave those steps out with steps=[...] (--steps)."
        )
    missing = [r for r in refs if r.lr_source == "missing"]
    if not missing:
        return refs, []
    steps = [r.step for r in missing]
    shown = f"{steps[:20]}{' ...' if len(steps) > 20 else ''}"
    if default is None:
        raise LearningRateError(
            f"Run {run_id} has no learning rate for the checkpoints at steps {shown} (no "
            f"{lr_metric!r} metric at those steps and none in their metadata), and TracIn weights "
            "each checkpoint by the learning rate in force there. Log it at each step: "
            f"MlflowClient().log_metric({run_id!r}, {lr_metric!r}, <lr>, step=<step>) "
            "(tracin_tasks.mlflow.log_checkpoint(model, step=..., learning_rate=...) does this while "
            "training); or pass lr_metric= (--lr-metric NAME) if the run logged it under another name; "
            "or pass default_learning_rate=1.0 (--default-learning-rate 1.0) to weight every checkpoint "
            "equally."
        )
    message = (
        f"No learning rate for the checkpoints at steps {shown} (no '{lr_metric}' metric at those "
        f"steps and none in their metadata); using default_learning_rate={default:g}"
        + (", so checkpoints are weighted equally." if len(missing) == len(refs) else
           " for them, beside the logged rates of the other checkpoints.")
    )
    logger.warning(message)
    return [dataclasses.replace(r, learning_rate=default, lr_source="default") if r.lr_source == "missing" else r
            for r in refs], [message]
