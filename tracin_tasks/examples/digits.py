"""scikit-learn's bundled digits (1,797 8×8 images, 10 classes) with labels flipped on purpose.

The flips are recorded, so how many of them an audit finds can be scored. Used by the demo,
the benchmarks and the tests; needs the ``examples`` extra (scikit-learn).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from tracin_tasks.core.checkpoint import Checkpoint
from tracin_tasks.exceptions import ConfigurationError


@dataclass(frozen=True)
class NoisyDigits:
    """Digits images with some labels flipped.

    Attributes:
        images: ``(n, 1, 8, 8)`` float32 pixel intensities scaled to [0, 1].
        labels: the labels as given to training (some flipped).
        true_labels: the labels scikit-learn ships.
        flipped: boolean mask of the rows whose label was flipped.
        row_id: a stable id per row (its index in ``load_digits``).
    """

    images: np.ndarray
    labels: np.ndarray
    true_labels: np.ndarray
    flipped: np.ndarray
    row_id: np.ndarray

    def frame(self) -> pd.DataFrame:
        """The training table: ``row_id``, ``label`` (as given) and 64 pixel columns ``px_0..px_63``."""
        pixels = self.images.reshape(len(self.images), -1)
        df = pd.DataFrame(pixels, columns=[f"px_{i}" for i in range(pixels.shape[1])])
        df.insert(0, "label", self.labels)
        df.insert(0, "row_id", self.row_id)
        return df

    def dataset(self) -> torch.utils.data.TensorDataset:
        """The rows as a TensorDataset of (image, given label)."""
        return torch.utils.data.TensorDataset(torch.from_numpy(self.images), torch.from_numpy(self.labels))


def load_noisy_digits(noise: float = 0.1, seed: int = 0) -> NoisyDigits:
    """Load digits and flip ``noise`` of the labels, uniformly to one of the other classes.

    Example:
        >>> d = load_noisy_digits(noise=0.1, seed=0)
        >>> int(d.flipped.sum())
        180
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The digits example needs scikit-learn: pip install 'tracin-tasks[examples]'."
        ) from None
    if not 0.0 <= noise < 1.0:
        raise ConfigurationError(f"noise must be a fraction in [0, 1), got {noise!r}.")
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    true = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    n = len(true)
    flip_rows = rng.choice(n, size=int(round(noise * n)), replace=False)
    labels = true.copy()
    # a flipped label is a different class, chosen uniformly among the other nine
    labels[flip_rows] = (true[flip_rows] + rng.integers(1, 10, size=len(flip_rows))) % 10
    flipped = np.zeros(n, dtype=bool)
    flipped[flip_rows] = True
    return NoisyDigits(images, labels, true, flipped, np.arange(n, dtype=np.int64))


def build_cnn(n_classes: int = 10, channels: int = 16) -> nn.Module:
    """A small CNN for 1×8×8 images."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 16, 64),
        nn.ReLU(),
        nn.Linear(64, n_classes),
    )


def build_mlp(in_features: int = 64, n_classes: int = 10, hidden: int = 128) -> nn.Module:
    """A two-hidden-layer MLP; flattens image inputs."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden // 2),
        nn.ReLU(),
        nn.Linear(hidden // 2, n_classes),
    )


def train_with_checkpoints(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    epochs: int = 20,
    learning_rate: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    on_checkpoint: Callable[[nn.Module, int, float], None] | None = None,
) -> list[Checkpoint]:
    """Train with SGD (momentum 0.9, cosine learning-rate decay), keeping a checkpoint per epoch.

    Each checkpoint carries the learning rate in force during the epoch that ended there, as
    TracIn needs. ``on_checkpoint(model, epoch, learning_rate)`` is called after every epoch
    (e.g. to log the checkpoint to MLflow).
    """
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    checkpoints = []
    for epoch in range(1, epochs + 1):
        model.train()
        lr = sched.get_last_lr()[0]
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        sched.step()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        checkpoints.append(Checkpoint(state_dict=state, learning_rate=lr, step=epoch))
        if on_checkpoint is not None:
            on_checkpoint(model, epoch, lr)
    model.eval()
    return checkpoints


def recall_at(scores: np.ndarray, flipped: np.ndarray, share: float) -> float:
    """Share of flipped rows among the top ``share`` of rows by score."""
    k = int(round(share * len(scores)))
    top = np.argsort(-scores, kind="stable")[:k]
    return float(flipped[top].sum() / max(1, flipped.sum()))
