"""Plain helpers shared by the MLflow integration tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

MLP_FACTORY = "tracin_tasks.examples.digits:build_mlp"


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
