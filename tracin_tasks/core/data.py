"""Turning what the user passes (a Dataset or a DataLoader) into ordered batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from tracin_tasks.exceptions import ConfigurationError, DataError, EmptyDatasetError


def make_loader(data: Any, batch_size: int, what: str = "data") -> DataLoader:
    """Return a DataLoader that yields the rows of ``data`` once, in order.

    Args:
        data: a ``torch.utils.data.Dataset`` of ``(x, y)`` rows, or a ``DataLoader`` over one.
        batch_size: rows per batch when ``data`` is a Dataset.
        what: how to call the data in error messages ("training data", "test data").
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise ConfigurationError(
                f"The DataLoader for the {what} shuffles its rows; scores are returned in row "
                "order, so pass a DataLoader with shuffle=False (or the Dataset itself)."
            )
        if data.drop_last:
            raise ConfigurationError(
                f"The DataLoader for the {what} has drop_last=True and would skip rows; pass one "
                "with drop_last=False (or the Dataset itself)."
            )
        dataset = data.dataset
        loader = data
    elif isinstance(data, TensorDataset):
        # index whole batches at once instead of collating row by row
        dataset = data
        batches = BatchSampler(SequentialSampler(data), batch_size=batch_size, drop_last=False)
        loader = DataLoader(data, sampler=batches, batch_size=None)
    elif isinstance(data, Dataset):
        dataset = data
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    else:
        raise ConfigurationError(
            f"The {what} must be a torch Dataset of (x, y) rows or a DataLoader over one, got "
            f"{type(data).__name__}. Wrap tensors as torch.utils.data.TensorDataset(x, y)."
        )
    if not isinstance(dataset, IterableDataset):
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            n = None
        if n == 0:
            raise EmptyDatasetError(f"The {what} has no rows; nothing to score. Pass a non-empty dataset.")
    return loader


def dataset_length(loader: DataLoader) -> int | None:
    """Number of rows when the dataset knows it, else None."""
    if isinstance(loader.dataset, IterableDataset):
        return None
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def split_batch(batch: Any, what: str = "data") -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Split a collated batch into model inputs and targets.

    ``(x, y)`` gives ``((x,), y)``; ``((x1, x2), y)`` and ``(x1, x2, y)`` give ``((x1, x2), y)``.
    """
    if isinstance(batch, dict) or not isinstance(batch, Sequence) or len(batch) < 2:
        raise DataError(
            f"Each row of the {what} must be an (x, y) pair (inputs, then the label); got a batch "
            f"of type {type(batch).__name__}. Return (x, y) from the Dataset's __getitem__."
        )
    *inputs, y = batch
    if len(inputs) == 1 and isinstance(inputs[0], (tuple, list)):
        inputs = list(inputs[0])
    for t in (*inputs, y):
        if not isinstance(t, torch.Tensor):
            raise DataError(
                f"The {what} yielded a {type(t).__name__} where a tensor was expected; rows must "
                "be tensors (use TensorDataset, or return tensors from __getitem__)."
            )
    return tuple(inputs), y


def iterate(loader: DataLoader, device: torch.device, dtype: torch.dtype, what: str) -> Iterator[
    tuple[tuple[torch.Tensor, ...], torch.Tensor]
]:
    """Yield ``(inputs, targets)`` on ``device``; floating inputs cast to the model's dtype."""
    for batch in loader:
        xs, y = split_batch(batch, what)
        xs = tuple(x.to(device=device, dtype=dtype if x.is_floating_point() else None) for x in xs)
        y = y.to(device=device, dtype=dtype if y.is_floating_point() else None)
        yield xs, y
