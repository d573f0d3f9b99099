"""Small MLflow training runs on iris (a tiny MLP, a few checkpoints), with a knob for each defect.

:class:`MlflowStore` logs a run through the ``tracin_tasks.mlflow`` helpers, or with any part
written by hand (bypassing the helpers' checks), missing, or wrong: what the reliability tests
audit. It works on a sqlite store or, given its URI, on a tracking server.
"""

from __future__ import annotations

import json
import math
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .runs import mlflow_target

#: the model every small run records: ``build_mlp(in_features=4, n_classes=3, hidden=8)``
FACTORY = "tracin_tasks.examples.digits:build_mlp"
ARCH = {"in_features": 4, "n_classes": 3, "hidden": 8}
FEATURES = ("f0", "f1", "f2", "f3")
DATA_NAME = "training_data"
DATA_PATH = f"training_data/{DATA_NAME}.parquet"


def iris_frame(rows: int = 60, seed: int = 0) -> pd.DataFrame:
    """``rows`` rows of scikit-learn's iris (shuffled, seeded): row_id ``iris-NNN``, f0..f3, label 0..2."""
    from sklearn.datasets import load_iris

    data = load_iris()
    order = np.random.default_rng(seed).permutation(len(data.target))[:rows]
    frame = pd.DataFrame(data.data[order].astype(np.float64), columns=list(FEATURES))
    frame.insert(0, "row_id", [f"iris-{i:03d}" for i in order])
    frame["label"] = data.target[order].astype(np.int64)
    return frame


@dataclass(frozen=True)
class LoggedRun:
    """A training run in the store.

    Attributes:
        run_id / tracking_uri: where it is.
        frame: the training data as logged (with its defects), or None when none was logged.
        steps: the checkpoint steps logged.
        learning_rates: the learning rate logged for each step (None: none logged).
    """

    run_id: str
    tracking_uri: str
    frame: pd.DataFrame | None
    steps: tuple[int, ...]
    learning_rates: tuple[float | None, ...]


class MlflowStore:
    """An MLflow sqlite store and its artifact folder; logs small training runs with defects on demand."""

    def __init__(self, root: Path, tracking_uri: str | None = None):
        import mlflow

        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self.client.create_experiment(
            f"reliability-{uuid.uuid4().hex[:8]}",
            # a tracking server keeps artifacts where it was told to
            artifact_location=None if tracking_uri else (root / "artifacts").as_uri(),
        )

    # -- whole runs ---------------------------------------------------------------------------
    def log_run(
        self,
        frame: pd.DataFrame | None = None,
        *,
        data: str = "helper",
        checkpoints: int = 2,
        learning_rates: Sequence[float | None] | None = None,
        checkpoint_writer: str = "helper",
        checkpoint_arch: dict[str, Any] | None = None,
        factory_kwargs: dict[str, Any] | None = None,
        train_rows: int = 60,
        name: str = "run",
    ) -> LoggedRun:
        """Log a training run: data, model factory, and checkpoints of a tiny MLP trained on iris.

        Args:
            frame: the training data to log (default: ``iris_frame(train_rows)``). The model is
                always trained on clean iris rows; ``frame`` is only what the run records.
            data: ``"helper"`` (``log_training_data``, which validates), ``"raw"`` (the parquet and
                ``tracin/training_data.json`` written with ``log_artifact``, no checks), or
                ``"none"``.
            checkpoints: how many checkpoints (steps 1..N); 0 logs none.
            learning_rates: per checkpoint; None at a position logs no learning rate for it.
                Default 0.1, 0.05, ...
            checkpoint_writer: ``"helper"`` (``log_checkpoint``: refuses a non-finite learning
                rate) or ``"raw"`` (``state_dict.pt`` + ``meta.json`` by hand, the ``lr`` metric
                only where a rate is given, whatever its value).
            checkpoint_arch: build the checkpointed model with these ``build_mlp`` arguments
                instead of ``factory_kwargs`` (checkpoints from another architecture).
            factory_kwargs: what the run records for ``build_mlp`` (default :data:`ARCH`).
        """
        import torch

        import tracin_tasks.mlflow as tm
        from tracin_tasks.examples.digits import build_mlp

        factory_kwargs = dict(ARCH if factory_kwargs is None else factory_kwargs)
        frame = iris_frame(train_rows) if frame is None and data != "none" else frame
        if learning_rates is None:
            learning_rates = [round(0.1 / (i + 1), 6) for i in range(checkpoints)]
        if len(learning_rates) != checkpoints:
            raise ValueError("one learning rate (or None) per checkpoint")
        run_id = self.client.create_run(self.experiment_id, run_name=name).info.run_id
        with mlflow_target(self.uri):
            if data == "helper":
                tm.log_training_data(frame, label_column="label", row_id_column="row_id", name=DATA_NAME,
                                     run_id=run_id)
            elif data == "raw":
                self.write_raw_data(run_id, frame)
            tm.log_model_factory(FACTORY, run_id=run_id, **factory_kwargs)
            steps = tuple(range(1, checkpoints + 1))
            if checkpoints:
                torch.manual_seed(0)
                model = build_mlp(**(checkpoint_arch or factory_kwargs))
                clean = iris_frame(train_rows)
                x = torch.tensor(clean[list(FEATURES)].to_numpy(), dtype=torch.float32)
                y = torch.tensor(clean["label"].to_numpy())
                for step, lr in zip(steps, learning_rates):
                    opt = torch.optim.SGD(model.parameters(), lr=0.1 if lr is None or not math.isfinite(lr) else lr)
                    for _ in range(10):
                        opt.zero_grad()
                        torch.nn.functional.cross_entropy(model(x), y).backward()
                        opt.step()
                    if checkpoint_writer == "helper":
                        tm.log_checkpoint(model, step=step, learning_rate=lr, run_id=run_id)
                    else:
                        self.write_raw_checkpoint(run_id, step, model.state_dict(), lr)
        self.client.set_terminated(run_id)
        return LoggedRun(run_id, self.uri, frame if data != "none" else None, steps, tuple(learning_rates))

    # -- parts written by hand (what a training script that does not use the helpers might log) -
    def write_raw_data(self, run_id: str, frame: pd.DataFrame, spec: dict[str, Any] | None = None) -> None:
        """The parquet file and ``tracin/training_data.json``, logged without any validation."""
        spec = spec or {"artifact_path": DATA_PATH, "label_column": "label", "row_id_column": "row_id",
                        "feature_columns": list(FEATURES), "input_shape": None, "rows": len(frame)}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{DATA_NAME}.parquet"
            frame.to_parquet(path, index=False)
            self.client.log_artifact(run_id, str(path), "training_data")
        self.write_json(run_id, "tracin/training_data.json", spec)

    def write_raw_checkpoint(self, run_id: str, step: int, state_dict: dict, lr: float | None) -> None:
        """``checkpoints/step_N/{state_dict.pt,meta.json}``; the ``lr`` metric only when ``lr`` is given."""
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            torch.save({k: v.detach().clone() for k, v in state_dict.items()}, Path(tmp) / "state_dict.pt")
            meta = {"step": step} if lr is None else {"step": step, "learning_rate": lr}
            (Path(tmp) / "meta.json").write_text(json.dumps(meta))  # NaN/Infinity as Python writes them
            self.client.log_artifacts(run_id, tmp, f"checkpoints/step_{step}")
        if lr is not None:
            self.client.log_metric(run_id, "lr", lr, step=step)
        self.client.set_tag(run_id, "tracin.checkpoints", "true")

    def write_json(self, run_id: str, artifact_file: str, obj: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(json.dumps(obj))
            self.client.log_artifact(run_id, str(path), str(Path(artifact_file).parent))

    def artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Every artifact file of the run under ``path`` (recursively)."""
        found = []
        for info in self.client.list_artifacts(run_id, path):
            found.extend(self.artifacts(run_id, info.path) if info.is_dir else [info.path])
        return found

