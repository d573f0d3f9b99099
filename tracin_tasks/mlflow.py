"""MLflow helpers, for training runs and for audits: ``import tracin_tasks.mlflow as tm``.

Training side: :func:`log_training_data`, :func:`log_model_factory`, :func:`log_checkpoint`.
Audit side: :class:`MlflowCheckpointSource`. After review: :func:`load_corrected_training_data`
(the latest corrected version of a run's data). Needs the ``mlflow`` extra.
"""

from tracin_tasks.integrations.mlflow.logging import log_checkpoint, log_model_factory, log_training_data
from tracin_tasks.integrations.mlflow.layouts import CheckpointRef
from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource, build_from_factory
from tracin_tasks.integrations.relabel.corrections import load_corrected_training_data

__all__ = [
    "CheckpointRef",
    "MlflowCheckpointSource",
    "build_from_factory",
    "load_corrected_training_data",
    "log_checkpoint",
    "log_model_factory",
    "log_training_data",
]
