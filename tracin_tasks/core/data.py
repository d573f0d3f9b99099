"""What goes into the model and what comes out: batches in row order, inputs, logits.

A row is ``(inputs, y)``. ``inputs`` is one tensor, a tuple of tensors (the model is called
``model(x1, x2, ...)``), or a dict of tensors (the model is called ``model(**inputs)``, as a
Hugging Face model is called with ``input_ids``, ``attention_mask``, ...). A model may return
its outputs as a tensor, as an object or dict holding ``logits`` (a Hugging Face
``ModelOutput``), or as a tuple whose first element is the outputs; :func:`output_logits`
takes the tensor out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from tracin_tasks.exceptions import ConfigurationError, DataError, EmptyDatasetError, UnsupportedModelError

#: What the model is called with: positional tensors, or keyword tensors.
ModelInputs = tuple[Any, ...] | dict[str, Any]


class TensorDictDataset(Dataset):
    """Rows ``({name: tensor[i]}, y[i])`` from a dict of equally long tensors and the targets.

    The dict form of :class:`torch.utils.data.TensorDataset`: the model is called with keyword
    arguments named after the keys. Indexing with a list of positions gives a whole batch at once.

    Example:
        >>> ds = TensorDictDataset({"input_ids": ids, "attention_mask": mask}, labels)
        >>> scores = TracIn(bert, ckpts).self_influence(ds)
    """

    def __init__(self, inputs: Mapping[str, torch.Tensor], targets: torch.Tensor):
        if not isinstance(inputs, Mapping) or not inputs:
            raise DataError("TensorDictDataset needs a non-empty dict of tensors (name -> (n, ...) tensor).")
        if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
            raise DataError("TensorDictDataset needs the targets as a tensor with one entry per row.")
        n = targets.shape[0]
        for key, t in inputs.items():
            if not isinstance(key, str) or not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n:
                raise DataError(
                    f"TensorDictDataset: input {key!r} must be a tensor with {n} rows (one per target), got "
                    f"{type(t).__name__}{tuple(t.shape) if isinstance(t, torch.Tensor) else ''}."
                )
        self.inputs = dict(inputs)
        self.targets = targets

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {k: t[index] for k, t in self.inputs.items()}, self.targets[index]


def make_loader(data: Any, batch_size: int, what: str = "data") -> DataLoader:
    """Return a DataLoader that yields the rows of ``data`` once, in order.

    Args:
        data: a ``torch.utils.data.Dataset`` of ``(inputs, y)`` rows, or a ``DataLoader`` over one.
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
    elif isinstance(data, (TensorDataset, TensorDictDataset)):
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
            f"{type(data).__name__}. Wrap tensors as torch.utils.data.TensorDataset(x, y) (or "
            "tracin_tasks.core.data.TensorDictDataset({name: tensor}, y) for keyword inputs)."
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


def split_batch(batch: Any, what: str = "data") -> tuple[ModelInputs, torch.Tensor]:
    """Split a collated batch into model inputs and targets.

    ``(x, y)`` gives ``((x,), y)``; ``((x1, x2), y)`` and ``(x1, x2, y)`` give ``((x1, x2), y)``;
    ``({"input_ids": ids, ...}, y)`` gives ``({"input_ids": ids, ...}, y)`` (keyword inputs).

    Example:
        >>> inputs, y = split_batch(({"input_ids": ids, "attention_mask": mask}, labels))
        >>> outputs = call_model(model, inputs)   # model(input_ids=ids, attention_mask=mask)
    """
    if isinstance(batch, Mapping):
        raise DataError(
            f"Each row of the {what} must be an (inputs, y) pair, got a dict with keys "
            f"{list(batch)[:10]}. Return (inputs, label) from the Dataset's __getitem__, e.g. "
            "({'input_ids': ..., 'attention_mask': ...}, label): the model is then called with the "
            "dict's entries as keyword arguments."
        )
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)) or len(batch) < 2:
        raise DataError(
            f"Each row of the {what} must be an (x, y) pair (inputs, then the label); got a batch "
            f"of type {type(batch).__name__}. Return (x, y) from the Dataset's __getitem__."
        )
    *parts, y = batch
    inputs: ModelInputs
    if len(parts) == 1 and isinstance(parts[0], Mapping):
        inputs = dict(parts[0])
        if not inputs:
            raise DataError(f"The {what} yielded an empty dict of inputs; the model needs at least one input.")
        odd = [k for k in inputs if not isinstance(k, str)]
        if odd:
            raise DataError(
                f"The {what} yielded a dict of inputs with keys {odd[:5]} that are not strings; its "
                "entries are passed as keyword arguments, so the keys must be argument names."
            )
    elif len(parts) == 1 and isinstance(parts[0], (tuple, list)):
        inputs = tuple(parts[0])
    else:
        inputs = tuple(parts)
    if not isinstance(y, torch.Tensor):
        raise DataError(
            f"The {what} yielded a label of type {type(y).__name__} where a tensor was expected; rows "
            "must be tensors (use TensorDataset, or return tensors from __getitem__)."
        )
    leaves, _ = pytree.tree_flatten_with_path(inputs)
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            where = f" (input {pytree.keystr(path)})" if isinstance(inputs, dict) else ""
            raise DataError(
                f"The {what} yielded a value of type {type(leaf).__name__}{where} where a tensor was expected; rows "
                "must be tensors (use TensorDataset, or return tensors from __getitem__)."
            )
    return inputs, y


def map_inputs(fn: Callable[[torch.Tensor], torch.Tensor], inputs: ModelInputs) -> ModelInputs:
    """Apply ``fn`` to every tensor of ``inputs``, keeping its structure (tuple or dict)."""
    return pytree.tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, inputs)


def index_inputs(inputs: ModelInputs, index: Any) -> ModelInputs:
    """The rows ``index`` (a slice, a boolean mask, positions) of every input tensor."""
    return map_inputs(lambda t: t[index], inputs)


def describe_inputs(inputs: Any) -> str:
    """Shapes and dtypes of inputs, for error messages: ``{'input_ids': (1, 16) int64}``."""
    def one(t: Any) -> str:
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if hasattr(t, "shape") else type(t).__name__

    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return ", ".join(one(v) for v in inputs)
    return one(inputs)


def call_model(model: Callable[..., Any], inputs: ModelInputs | torch.Tensor) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple, ``model(inputs)`` for a tensor."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_logits(out: Any) -> torch.Tensor:
    """The outputs tensor of what a model returned (what the loss is computed from).

    A tensor is returned as it is; an object or dict with ``logits`` (a Hugging Face
    ``ModelOutput``, e.g. ``SequenceClassifierOutput``) gives its ``logits``; a tuple or list gives
    its first element.

    Raises:
        UnsupportedModelError: the model returned something else.
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    keys = f" with keys {list(out)[:10]}" if isinstance(out, Mapping) else ""
    raise UnsupportedModelError(
        f"The model returned a {type(out).__name__}{keys}; TracIn needs the model's outputs (logits) as "
        "a tensor, an object or dict with a 'logits' tensor, or a tuple whose first element is that "
        "tensor. Wrap the model so that forward returns the logits."
    )


def iterate(loader: DataLoader, device: torch.device, dtype: torch.dtype, what: str) -> Iterator[
    tuple[ModelInputs, torch.Tensor]
]:
    """Yield ``(inputs, targets)`` on ``device``.

    Floating tensors are cast to the model's dtype; integer and boolean ones keep theirs (token
    ids stay int64, as embeddings need).
    """
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

    for batch in loader:
        xs, y = split_batch(batch, what)
        yield map_inputs(move, xs), move(y)
