"""Checkpoints of a training run: weights, the learning rate in force, and the step."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tracin_tasks.exceptions import CheckpointError, CheckpointNotFoundError


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of the training run being audited.

    Give either the weights themselves (``state_dict``) or a file they were saved to with
    ``torch.save`` (``path``); a file is read only when the checkpoint is used, with
    ``torch.load(weights_only=True)``, so nothing in it is unpickled.

    Args:
        state_dict: parameter and buffer tensors, as returned by ``model.state_dict()``.
        learning_rate: the learning rate in force when the checkpoint was taken (η_c).
        step: the training step or epoch the checkpoint belongs to; used for ordering and reports.
        path: a ``torch.save`` file holding the state_dict, instead of ``state_dict``.
        metadata: free-form facts about the checkpoint (source URI, epoch...), kept for reports.

    Example:
        >>> ckpt = Checkpoint(state_dict=model.state_dict(), learning_rate=0.1, step=3)
    """

    state_dict: Mapping[str, torch.Tensor] | None = None
    learning_rate: float = 1.0
    step: int = 0
    path: str | os.PathLike[str] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.state_dict is None) == (self.path is None):
            raise CheckpointError(
                f"Checkpoint(step={self.step!r}) needs exactly one of state_dict= or path=; "
                f"got {'both' if self.state_dict is not None else 'neither'}. Pass the "
                "model.state_dict() saved at that step, or the file it was saved to."
            )
        try:
            lr = float(self.learning_rate)
        except (TypeError, ValueError):
            raise CheckpointError(
                f"Checkpoint(step={self.step!r}) has learning_rate={self.learning_rate!r}, "
                "which is not a number. Pass the learning rate in force at that step."
            ) from None
        if not math.isfinite(lr):
            raise CheckpointError(
                f"Checkpoint(step={self.step!r}) has a non-finite learning rate ({lr}). "
                "TracIn weights each checkpoint by its learning rate, so it must be a finite "
                "number; check the learning-rate schedule or the logged 'lr' metric."
            )
        object.__setattr__(self, "learning_rate", lr)

    def load_state_dict(self, map_location: str | torch.device = "cpu") -> Mapping[str, torch.Tensor]:
        """Return the weights, reading ``path`` with ``weights_only=True`` when needed."""
        if self.state_dict is not None:
            return self.state_dict
        path = os.fspath(self.path)  # type: ignore[arg-type]
        if not os.path.exists(path):
            raise CheckpointNotFoundError(
                f"Checkpoint file {path!r} (step {self.step}) does not exist. Check the path, "
                "or that the training run saved this checkpoint."
            )
        from tracin_tasks.core.weights import read_torch_file

        # declared sizes are checked before any data is read; nothing is unpickled
        loaded = read_torch_file(
            path, step=self.step, what=f"Checkpoint {path!r} (step {self.step})",
            advice="Save checkpoints with torch.save(model.state_dict(), path); or, if you trust the file, load it "
                   "yourself (torch.load(path, weights_only=False)) and pass Checkpoint(state_dict=...).",
        )
        if torch.device(map_location).type != "cpu":
            loaded = {k: v.to(map_location) if isinstance(v, torch.Tensor) else v for k, v in loaded.items()}
        return loaded


def check_checkpoints(checkpoints: Any) -> list[Checkpoint]:
    """Validate a user-provided list of checkpoints and return it as a list."""
    if isinstance(checkpoints, Checkpoint):
        checkpoints = [checkpoints]
    try:
        ckpts = list(checkpoints)
    except TypeError:
        raise CheckpointError(
            f"checkpoints must be a list of Checkpoint objects, got {type(checkpoints).__name__}."
        ) from None
    if not ckpts:
        raise CheckpointError(
            "No checkpoints were given. TracIn sums over the checkpoints of the training run: "
            "pass at least one Checkpoint(state_dict=..., learning_rate=..., step=...)."
        )
    for i, c in enumerate(ckpts):
        if not isinstance(c, Checkpoint):
            raise CheckpointError(
                f"checkpoints[{i}] is a {type(c).__name__}, expected a tracin_tasks.Checkpoint. "
                "Wrap each state_dict as Checkpoint(state_dict=sd, learning_rate=lr, step=s)."
            )
    return ckpts
