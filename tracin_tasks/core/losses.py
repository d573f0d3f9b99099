"""Per-row losses: "cross_entropy", "mse", or the user's own function.

A loss gets the model's outputs as a tensor. What a model returned as an object or dict with
``logits`` (a Hugging Face ``ModelOutput``) or as a tuple is reduced to that tensor first
(:func:`tracin_tasks.core.data.output_logits`), so a custom loss always sees the logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tracin_tasks.core.data import output_logits
from tracin_tasks.exceptions import ConfigurationError, DataError, LabelOutOfRangeError, LossError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    outputs = output_logits(outputs)
    if outputs.dim() < 2:
        raise LossError(
            f"loss='cross_entropy' needs model outputs of shape (batch, classes, ...), got "
            f"{tuple(outputs.shape)}. Use loss='mse' for a regression model."
        )
    n_classes = outputs.shape[1]
    if targets.is_floating_point():
        if targets.shape != outputs.shape:
            raise DataError(
                f"loss='cross_entropy' got floating-point labels of shape {tuple(targets.shape)}; "
                "class labels must be integers (convert with y.long()), or class probabilities "
                f"shaped like the outputs {tuple(outputs.shape)}."
            )
    losses = F.cross_entropy(outputs, targets, reduction="none")
    return losses.reshape(losses.shape[0], -1).sum(1) if losses.dim() > 1 else losses


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    outputs = output_logits(outputs)
    if targets.shape != outputs.shape:
        if targets.numel() == outputs.numel():
            targets = targets.reshape(outputs.shape)
        else:
            raise DataError(
                f"loss='mse' needs targets shaped like the outputs {tuple(outputs.shape)}, got "
                f"{tuple(targets.shape)}."
            )
    losses = F.mse_loss(outputs, targets.to(outputs.dtype), reduction="none")
    return losses.reshape(losses.shape[0], -1).sum(1)


def check_class_labels(outputs: torch.Tensor, targets: torch.Tensor, first_row: int) -> None:
    """Raise :class:`LabelOutOfRangeError` naming the rows whose class label does not exist."""
    outputs = output_logits(outputs)
    if targets.is_floating_point() or outputs.dim() < 2:
        return
    n_classes = outputs.shape[1]
    # -100 is cross_entropy's ignore_index: such positions add nothing to the loss
    bad = ((targets < 0) & (targets != -100)) | (targets >= n_classes)
    if bad.any():
        rows = (torch.nonzero(bad.reshape(bad.shape[0], -1).any(1)).flatten() + first_row).tolist()
        values = sorted(set(targets[bad].tolist()))
        raise LabelOutOfRangeError(
            f"Labels {values[:10]} are outside the model's {n_classes} classes "
            f"(0..{n_classes - 1}) in rows {rows[:20]}{' and more' if len(rows) > 20 else ''}. "
            "Fix those labels, or build the model with as many outputs as there are classes."
        )


_BUILTIN: dict[str, LossFn] = {"cross_entropy": _cross_entropy, "mse": _mse}


def resolve_loss(loss: str | LossFn) -> LossFn:
    """Return a function ``(outputs, targets) -> (batch,)`` losses, checking what comes back."""
    if isinstance(loss, str):
        try:
            return _BUILTIN[loss]
        except KeyError:
            raise ConfigurationError(
                f"Unknown loss {loss!r}; expected one of {sorted(_BUILTIN)} or a callable "
                "(outputs, targets) -> one loss per row."
            ) from None
    if not callable(loss):
        raise ConfigurationError(f"loss must be a name or a callable, got {type(loss).__name__}.")

    def checked(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs = output_logits(outputs)
        value = loss(outputs, targets)
        batch = outputs.shape[0]
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise LossError(
                f"The loss function {getattr(loss, '__name__', loss)!r} returned a single value for "
                f"a batch of {batch} rows; TracIn needs one loss per row. Use reduction='none' "
                "(e.g. torch.nn.CrossEntropyLoss(reduction='none'))."
            )
        if value.shape != (batch,):
            raise LossError(
                f"The loss function returned shape {tuple(value.shape)} for a batch of {batch} "
                f"rows; expected ({batch},), one loss per row."
            )
        return value

    return checked
