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




class MissingExtraError(TracInError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class RunNotFoundError(TracInError, LookupError):
    """The tracking server has no run with this id."""


class NoCheckpointsError(CheckpointError):
    """A training run has no checkpoints that an audit can use."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need unpickling arbitrary objects, and the user did not opt in."""


class ModelFactoryError(TracInError, ImportError):
    """The model factory recorded for a run (``module:function``) cannot be imported or called."""


class UntrustedModelFactoryError(ModelFactoryError):
    """A run names a model factory whose module the operator has not trusted; nothing was imported.

    Trust a module with ``TRACIN_TRUSTED_MODULES`` (comma-separated prefixes), ``--trust-module``
    or the flow parameter ``trusted_modules``; or pass the factory yourself (``model_factory=``).
    """


class ModelTooLargeError(TracInError, ValueError):
    """A model or checkpoint declares more parameters than the audit's ceiling (``max_parameters``),
    or a weight declares more data than its file holds; refused before any real allocation."""


class TrainingDataError(DataError):
    """A run's training data is missing, unreadable or malformed."""


class TrackingServerUnavailableError(TracInError, ConnectionError):
    """The tracking server did not answer after bounded retries."""


class RelabelError(TracInError):
    """Root of the relabel-queue errors."""


class SinkUnavailableError(RelabelError, ConnectionError):
    """A relabel sink (database, Label Studio, folder) cannot be reached or written right now."""


class QueueSchemaError(RelabelError, RuntimeError):
    """A queue table exists with a schema version or layout this version cannot use safely."""


class UnknownRowIdsError(DataError):
    """Corrections name row ids that the training data does not have."""

    def __init__(self, message: str, row_ids: list[str] | None = None):
        super().__init__(message)
        self.row_ids = list(row_ids or [])


class InvalidTransitionError(RelabelError, ValueError):
    """A queue row cannot move to the requested status (e.g. deciding a row nobody claimed)."""


class LearningRateError(CheckpointError):
    """A checkpoint's learning rate is missing, not finite, or negative, so it cannot weight the checkpoint."""


class OutputWriteError(TracInError, OSError):
    """An audit's output (scores, issues, report) cannot be written where it was asked to go."""


class CellsMissingError(TracInError, LookupError):
    """The aggregate was asked for while some cells have no stored result."""


class ResultsStoreError(TracInError, OSError):
    """The results store cannot be read or written, or holds a file that is not a cell result."""


class ValidationFailedError(TracInError, AssertionError):
    """The audit's result failed its Great Expectations suite (see the report and Data Docs)."""


class OutputFolderBusyError(TracInError, BlockingIOError):
    """Another audit held the output folder for longer than this one was willing to wait."""


class UnfinishedAuditError(TracInError, LookupError):
    """An output folder holds no finished audit, or not the audit a reader asked for."""


class CredentialsInUriError(ConfigurationError):
    """A URI carries a password; settings are stored (plans, Prefect parameters), so they must not."""


def require_extra(module: str, extra: str):
    """Import an optional dependency, or raise :class:`MissingExtraError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"This feature needs the optional dependency {module!r}, which is not installed: "
            f"pip install 'tracin-tasks[{extra}]'."
        ) from exc


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
    "MissingExtraError",
    "RunNotFoundError",
    "NoCheckpointsError",
    "UnsafeCheckpointError",
    "ModelFactoryError",
    "UntrustedModelFactoryError",
    "ModelTooLargeError",
    "TrainingDataError",
    "TrackingServerUnavailableError",
    "RelabelError",
    "SinkUnavailableError",
    "QueueSchemaError",
    "UnknownRowIdsError",
    "InvalidTransitionError",
    "LearningRateError",
    "OutputWriteError",
    "CellsMissingError",
    "ResultsStoreError",
    "ValidationFailedError",
    "OutputFolderBusyError",
    "UnfinishedAuditError",
    "CredentialsInUriError",
    "require_extra",
]
