"""tracin-tasks: find likely mislabeled training rows with TracIn self-influence.

The public names live here; nothing optional (Prefect, MLflow, Great Expectations, Dask) is
imported by this module.
"""

from tracin_tasks import exceptions
from tracin_tasks.core import Checkpoint, CheckpointPass, TopInfluence, TracIn
from tracin_tasks.core.flagging import FlagPolicy, find_label_issues
from tracin_tasks.core.data import TensorDictDataset
from tracin_tasks.core.table import TrainingTable
from tracin_tasks.exceptions import TracInError

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointPass",
    "FlagPolicy",
    "TopInfluence",
    "TensorDictDataset",
    "TracIn",
    "TracInError",
    "TrainingTable",
    "exceptions",
    "find_label_issues",
    "__version__",
]
