"""Every error tracin-tasks raises on purpose.

The root is :class:`TracInError`; each subclass also inherits the builtin it resembles, so
``except ValueError`` in a caller's code keeps working. Messages say what was wrong, what was
expected, and what to do about it.
"""

from __future__ import annotations


class TracInError(Exception):
    """Root of every error raised on purpose by tracin-tasks."""


class ConfigurationError(TracInError, ValueError):
    """A setting is invalid (bad value, unknown option, wrong type)."""


class CheckpointError(TracInError, ValueError):
    """A checkpoint is unusable: no checkpoints, non-finite learning rate, unreadable file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file or artifact does not exist."""


class StateDictMismatchError(CheckpointError, KeyError):
    """A state_dict does not fit the model: missing keys, unexpected keys, or shape mismatches."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class LayerNotFoundError(TracInError, KeyError):
    """A requested layer (module name) does not exist in the model or has no parameters."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(TracInError, TypeError):
    """The model cannot be audited as given (e.g. its rows interact inside a batch)."""


class DataError(TracInError, ValueError):
    """Training or test data is unusable."""


class EmptyDatasetError(DataError):
    """A dataset has no rows."""


class LabelOutOfRangeError(DataError):
    """Labels fall outside the model's classes."""


class LossError(TracInError, ValueError):
    """The loss is unknown, or a custom loss does not return one value per row."""


class NonFiniteGradientError(TracInError, ArithmeticError):
    """Some rows have non-finite (NaN or inf) loss gradients.

    Attributes:
        rows: the row indices (positions in the data) whose gradients were not finite.
    """

    def __init__(self, message: str, rows: list[int] | None = None):
        super().__init__(message)
        self.rows = list(rows or [])


__all__ = [
    "TracInError",
    "ConfigurationError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "StateDictMismatchError",
    "LayerNotFoundError",
    "UnsupportedModelError",
    "DataError",
    "EmptyDatasetError",
    "LabelOutOfRangeError",
    "LossError",
    "NonFiniteGradientError",
]
