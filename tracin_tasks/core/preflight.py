"""Checks an audit makes before it computes anything: checkpoints that diverged, labels the model
does not have. (Whether a checkpoint fits the model at all is
:func:`tracin_tasks.core.engine.check_state_dict_fits`.)"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tracin_tasks.core.data import call_model, describe_inputs, output_logits
from tracin_tasks.exceptions import CheckpointError, DataError, LabelOutOfRangeError, UnsupportedModelError


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


def check_labels_fit(model: torch.nn.Module, first_row: Any, labels: np.ndarray, row_ids: Sequence[Any],
                     loss: str, run_id: str) -> None:
    """Fail when the rows do not fit the model: one forward pass of the first row gives the number
    of classes, against which every label is checked (a classifier's audit).

    ``first_row`` is what :meth:`TrainingTable.inputs` gives for ``slice(0, 1)``: an array (or
    tensor) shaped ``(1, ...)``, passed as ``model(x)``; or a dict of such arrays, passed as
    ``model(**inputs)`` (sequence columns such as ``input_ids``). Floating values are cast to the
    model's dtype; integer ones (token ids) are kept as they are. The model may return its
    outputs as a tensor, an object or dict with ``logits``, or a tuple led by them.

    Every negative label is refused, -100 (``cross_entropy``'s ``ignore_index``) included: training
    left such rows out of its loss, and an audit scores every row it is given.
    """
    dtype = next(model.parameters()).dtype

    def as_tensor(value: Any) -> torch.Tensor:
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        return t.to(dtype) if t.is_floating_point() else t

    if isinstance(first_row, Mapping):
        inputs: Any = {str(k): as_tensor(v) for k, v in first_row.items()}
    elif isinstance(first_row, tuple):
        inputs = tuple(as_tensor(v) for v in first_row)
    else:
        inputs = as_tensor(first_row)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            returned = call_model(model, inputs)
    except Exception as exc:  # shape errors surface as RuntimeError/ValueError from torch
        leaves = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, tuple) else (inputs,)
        ints = ("; integer feature columns reach the model as int64 (token ids): if they are measurements, "
                "store them as floats" if any(not t.is_floating_point() for t in leaves) else "")
        raise DataError(
            f"The model of run {run_id} cannot take the training data's rows: the first row, "
            f"{describe_inputs(inputs)}, failed in the forward pass ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). Check input_shape and feature_columns "
            f"given to log_training_data, and the model factory's arguments{ints}."
        ) from exc
    finally:
        model.train(was_training)
    try:
        out = output_logits(returned)
    except UnsupportedModelError:
        return  # not a classifier's logits: nothing to check the labels against
    if loss != "cross_entropy" or out.dim() < 2:
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
