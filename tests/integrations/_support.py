"""Plain helpers shared by the MLflow integration tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# MLflow reads this once, when it is imported (mlflow/__init__ starts its telemetry client).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import mlflow.tracking.fluent as _fluent  # noqa: E402
from mlflow.tracking._tracking_service import utils as _tracking_utils  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
MLP_FACTORY = "tracin_tasks.examples.digits:build_mlp"
MLFLOW_BIN = Path(sys.executable).parent / "mlflow"


def guard_mlflow_globals(mp: pytest.MonkeyPatch) -> None:
    """Make ``mp``'s undo restore MLflow's global tracking URI and active experiment."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        mp.setenv(name, "placeholder")  # records the original value (or its absence) ...
        mp.delenv(name)  # ... and then removes it for the duration
    mp.setattr(_tracking_utils, "_tracking_uri", None)
    mp.setattr(_fluent, "_active_experiment_id", None)


@contextlib.contextmanager
def mlflow_target(uri: str):
    """Point MLflow's fluent API at ``uri`` for a block; everything global is put back after."""
    with pytest.MonkeyPatch.context() as mp:
        guard_mlflow_globals(mp)
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evolve(model: torch.nn.Module, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Nudge the weights (a stand-in for an epoch of training); return a copy of the state_dict."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Store:
    """A tracking backend: its URI and, for sqlite, where experiment artifacts go."""

    kind: str
    uri: str
    artifact_root: Path | None

    def new_experiment(self, prefix: str = "exp") -> str:
        """A fresh experiment (artifacts in tmp for sqlite, proxied by the server otherwise)."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        location = (self.artifact_root / name).as_uri() if self.artifact_root is not None else None
        return mlflow.MlflowClient(tracking_uri=self.uri).create_experiment(name, artifact_location=location)


@dataclass(frozen=True)
class SmallDigits:
    """A few hundred digits rows with scrambled row ids, as a frame and as arrays."""

    frame: pd.DataFrame
    images: np.ndarray  # (n, 1, 8, 8) float32
    labels: np.ndarray  # int64
    row_ids: np.ndarray

    def dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(torch.from_numpy(self.images.copy()), torch.from_numpy(self.labels.copy()))


@dataclass(frozen=True)
class DigitsRun:
    run_id: str
    uri: str
    epochs: int
    learning_rate: float
