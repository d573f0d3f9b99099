"""A tiny LightningModule for tests/frameworks/test_lightning_runs.py.

``build`` is the model factory an audit imports (``frameworks.lightning_models:build``: tests/ is
on ``sys.path`` in the test process; a child process gets it on ``PYTHONPATH``). ``schedule``
picks one of the learning-rate schedules the Lightning layout's rule knows (or one it does not),
and the module records the rate each optimizer update used, so a test knows the rate in force at
every checkpoint without asking the layout.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

#: schedule name → (scheduler from the optimizer, Lightning's scheduler settings)
SCHEDULES = {
    "none": None,
    "step_per_epoch": (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), {}),
    "step_per_update": (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5), {"interval": "step"}),
    "multistep": (lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[1, 2], gamma=0.3), {}),
    "exponential": (lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7), {}),
    "cosine_per_update": (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7, eta_min=0.01),
                          {"interval": "step"}),
    "linear": (lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, end_factor=1.0, total_iters=2), {}),
    "constant": (lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2), {}),
    "polynomial": (lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=5, power=2.0), {}),
    "plateau": (lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="max", factor=0.5, patience=0),
                {"monitor": "train_loss"}),
    "lambda": (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 0.6 ** epoch), {}),
}


class TinyClassifier(pl.LightningModule):
    """An MLP over ``in_features`` numbers, SGD with one of :data:`SCHEDULES`."""

    def __init__(self, in_features: int = 8, hidden: int = 16, n_classes: int = 3, lr: float = 0.2,
                 schedule: str = "none", extra: Any = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
        self.rates_used: list[float] = []  # the rate of each optimizer update, in order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.rates_used.append(optimizer.param_groups[0]["lr"])

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        if SCHEDULES[self.hparams.schedule] is None:
            return optimizer
        make, settings = SCHEDULES[self.hparams.schedule]
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": make(optimizer), **settings}}


def build(**kwargs: Any) -> TinyClassifier:
    """The audit's model factory: ``TinyClassifier(**kwargs)``."""
    return TinyClassifier(**kwargs)
