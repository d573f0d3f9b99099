"""Where :class:`MlflowCheckpointSource` used to live; it is now in
:mod:`tracin_tasks.integrations.mlflow.source` (public: :mod:`tracin_tasks.mlflow`)."""

from tracin_tasks.integrations.mlflow.layouts import CheckpointRef
from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource, build_from_factory

__all__ = ["CheckpointRef", "MlflowCheckpointSource", "build_from_factory"]
