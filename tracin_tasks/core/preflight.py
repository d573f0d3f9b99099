"""Checks an audit makes before it computes anything: checkpoints that diverged, labels the model
does not have. (Whether a checkpoint fits the model at all is
:func:`tracin_tasks.core.engine.check_state_dict_fits`.)"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tracin_tasks.exceptions import CheckpointError, DataError, LabelOutOfRangeError


def check_finite_weights(state_dict: Mapping[str, Any], step: Any, run_id: str) -> None:
    """A checkpoint of a diverged run (NaN/inf weights) would fail every row: say so instead."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"The checkpoint at step {step} of run {run_id} holds NaN or infinite weights "
            f"({bad[:10]}): training had diverged there. Leave it out of the audit with steps=[...] "
            "(or max_checkpoints=), or audit a run that trained without diverging."
        )


def check_labels_fit(model: torch.nn.Module, first_row: np.ndarray, labels: np.ndarray, row_ids: Sequence[Any],
                     loss: str, run_id: str) -> None:
    """Fail when the rows do not fit the model: one forward pass of the first row gives the number
    of classes, against which every label is checked (a classifier's audit).

    Every negative label is refused, -100 (``cross_entropy``'s ``ignore_index``) included: training
    left such rows out of its loss, and an audit scores every row it is given.
    """
    x = torch.from_numpy(first_row)
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(next(model.parameters()).dtype))
    except Exception as exc:  # shape errors surface as RuntimeError/ValueError from torch
        raise DataError(
            f"The model of run {run_id} cannot take the training data's rows: a row of shape "
            f"{tuple(x.shape[1:])} failed in the forward pass ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). Check input_shape and feature_columns "
            "given to log_training_data, and the model factory's arguments."
        ) from exc
    if loss != "cross_entropy" or not isinstance(out, torch.Tensor) or out.dim() < 2:
        return
    n_classes = int(out.shape[1])
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        ids = np.asarray(row_ids)[bad]
        values = sorted(set(labels[bad].tolist()))
        ignored = (" Rows labelled -100 (PyTorch's ignore_index) were left out of training's loss: drop them "
                   "from the logged training data." if -100 in values else "")
        raise LabelOutOfRangeError(
            f"{int(bad.sum())} row(s) of run {run_id} have labels {values[:10]} outside the model's "
            f"{n_classes} classes (0..{n_classes - 1}): row ids {ids[:20].tolist()}"
            f"{' ...' if len(ids) > 20 else ''}. Fix those labels and log the data again, or build the model "
            f"with as many outputs as there are classes.{ignored}"
        )
