"""Training data as a table: one row per example, with a stable row id and a label column.

How feature columns become model inputs (see :class:`TrainingTable`):

* **scalar columns** (one number per cell): the row's input is one tensor, flat or shaped
  ``input_shape``; float32, or int64 when *every* feature column has an integer dtype (one token
  id per column, for a model that starts with ``nn.Embedding``).
* **sequence columns** (each cell a list or array of integer ids of one fixed length, as a
  Hugging Face tokenizer writes ``input_ids``, ``attention_mask``, ``token_type_ids``): the
  row's input is a dict ``{column: int64 tensor (L,)}`` and the model is called with keyword
  arguments named after the columns, ``model(input_ids=..., attention_mask=...)``.

A table is one or the other: sequence columns and scalar columns do not mix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, TensorDataset

from tracin_tasks.core.data import TensorDictDataset
from tracin_tasks.exceptions import TrainingDataError

_SEQUENCE_CELLS = (list, tuple, np.ndarray)
_INT64_MAX = np.iinfo(np.int64).max


def _is_sequence_column(series: pd.Series) -> bool:
    """A column whose cells hold lists/arrays (object dtype, or pandas' Arrow list dtype): told by
    its first cell that is not missing (validation then checks every cell)."""
    if pd.api.types.is_numeric_dtype(series.dtype):
        return False
    for cell in series.to_numpy(dtype=object):
        if cell is None or (isinstance(cell, float) and np.isnan(cell)):
            continue
        return isinstance(cell, _SEQUENCE_CELLS)
    return False


def _listed(ids: Any, limit: int = 10) -> str:
    """``[a, b, ...]`` of plain Python values (numpy scalars would print as ``np.int64(3)``)."""
    ids = [v.item() if isinstance(v, np.generic) else v for v in ids]
    return f"{ids[:limit]}{' ...' if len(ids) > limit else ''}"


@dataclass(frozen=True)
class TrainingTable:
    """A training set stored as a DataFrame, and how to turn it into model inputs.

    The rule (checked by :meth:`validate`): when any feature column is a *sequence column* —
    every cell a list or array of non-negative integer ids, all cells of the column of one
    length ``L`` (token ids, attention masks, as a tokenizer with ``padding="max_length"``
    writes them; parquet gives them back as numpy arrays) — every feature column must be one,
    :meth:`dataset` yields ``({column: int64 tensor (L,)}, label)`` rows and the model is
    called with keyword arguments named after the columns. Otherwise every feature column holds
    one number per cell and a row's input is one tensor, flat or shaped ``input_shape``:
    float32, or int64 when every feature column has an integer dtype (one token id per column).

    Attributes:
        frame: one row per training example.
        label_column: the (integer) class label, as given to training.
        row_id_column: a unique, stable id per row; flagged rows are reported by it.
        feature_columns: the columns that form the model input, in order.
        input_shape: shape of one row's input (e.g. ``(1, 8, 8)``) for scalar columns; ``None``
            keeps a flat vector. Sequence columns take none.

    Example:
        >>> enc = tokenizer(texts, padding="max_length", max_length=64)
        >>> df = pd.DataFrame({"row_id": ids, "label": labels, **{k: list(v) for k, v in enc.items()}})
        >>> table = TrainingTable.from_frame(df)           # input_ids, token_type_ids, attention_mask
        >>> inputs, y = table.dataset()[0]                 # ({"input_ids": tensor([...]), ...}, tensor(2))
    """

    frame: pd.DataFrame
    label_column: str
    row_id_column: str
    feature_columns: tuple[str, ...]
    input_shape: tuple[int, ...] | None = None

    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        label_column: str = "label",
        row_id_column: str = "row_id",
        feature_columns: Sequence[str] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> TrainingTable:
        """Build and validate a table; feature columns default to every other column."""
        if not isinstance(frame, pd.DataFrame):
            raise TrainingDataError(f"Training data must be a pandas DataFrame, got {type(frame).__name__}.")
        for col, what in ((label_column, "label_column"), (row_id_column, "row_id_column")):
            if col not in frame.columns:
                raise TrainingDataError(
                    f"The training data has no column {col!r} ({what}); its columns are "
                    f"{list(frame.columns)[:20]}. Pass the right {what}=."
                )
        if feature_columns is None:
            feature_columns = [c for c in frame.columns if c not in (label_column, row_id_column)]
        missing = [c for c in feature_columns if c not in frame.columns]
        if missing:
            raise TrainingDataError(f"Feature columns {missing[:10]} are not in the training data.")
        table = cls(
            frame,
            label_column,
            row_id_column,
            tuple(str(c) for c in feature_columns),
            tuple(int(d) for d in input_shape) if input_shape is not None else None,
        )
        table.validate()
        return table

    # -- what kind of table ------------------------------------------------------------
    @property
    def sequence_columns(self) -> tuple[str, ...]:
        """The feature columns whose cells are sequences of ids (all of them, or none)."""
        return tuple(c for c in self.feature_columns if _is_sequence_column(self.frame[c]))

    @property
    def integer_features(self) -> bool:
        """Whether a row's input is int64: sequence columns, or every scalar column an integer dtype."""
        df = self.frame
        if self.sequence_columns:
            return True
        return all(pd.api.types.is_integer_dtype(df[c].dtype) for c in self.feature_columns)

    # -- checks ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`TrainingDataError` saying what is wrong with the table, if anything."""
        df = self.frame
        if len(df) == 0:
            raise TrainingDataError(
                "The training data has no rows; there is nothing to audit. Log the rows the model was "
                "trained on (tracin_tasks.mlflow.log_training_data(df, ...))."
            )
        if not self.feature_columns:
            raise TrainingDataError("The training data has no feature columns besides the label and row id.")
        ids = df[self.row_id_column]
        if ids.isna().any():
            raise TrainingDataError(f"Row id column {self.row_id_column!r} has missing values; every row needs an id.")
        dup = ids[ids.duplicated(keep=False)]
        if len(dup):
            raise TrainingDataError(
                f"Row ids must be unique; {dup.nunique()} id(s) repeat, e.g. {dup.unique()[:10].tolist()}. "
                "Give every row a distinct id before logging the data."
            )
        labels = df[self.label_column]
        if labels.isna().any():
            raise TrainingDataError(
                f"Label column {self.label_column!r} has missing values, row ids "
                f"{ids[labels.isna()].iloc[:10].tolist()}; every row needs a class label. Label or drop "
                "those rows before logging the data."
            )
        if not pd.api.types.is_integer_dtype(labels.dtype):
            raise TrainingDataError(
                f"Label column {self.label_column!r} has dtype {labels.dtype} (values like "
                f"{labels.drop_duplicates().iloc[:5].tolist()}); class labels must be integers "
                "0..n_classes-1. Encode them (e.g. pd.factorize) before logging."
            )
        sequences = self.sequence_columns
        if sequences:
            self._validate_sequences(sequences)
        else:
            self._validate_scalars()

    def _validate_sequences(self, sequences: tuple[str, ...]) -> None:
        df = self.frame
        ids = df[self.row_id_column].to_numpy()
        scalars = [c for c in self.feature_columns if c not in sequences]
        if scalars:
            raise TrainingDataError(
                f"Feature columns {list(sequences)[:10]} hold sequences (lists of ids) but {scalars[:10]} hold "
                "one value per row; a table's rows are either dicts of sequences (the model called with "
                "keyword arguments) or one tensor of scalars, not both. Leave the scalar columns out with "
                "feature_columns=[...], or store them as sequences too."
            )
        if self.input_shape is not None:
            raise TrainingDataError(
                f"input_shape {self.input_shape} was given, but the feature columns hold sequences, which "
                "become (rows, length) tensors of their own; leave input_shape out."
            )
        for col in sequences:
            cells = df[col].to_numpy(dtype=object)
            not_seq = [i for i, c in enumerate(cells) if not isinstance(c, _SEQUENCE_CELLS)]
            if not_seq:
                raise TrainingDataError(
                    f"Sequence column {col!r} has {len(not_seq)} cell(s) that are not lists of ids (missing "
                    f"or single values), row ids {_listed(ids[not_seq])}. Every cell must be a list of "
                    "integer ids of the same length; fix or drop those rows."
                )
            arrays = [np.asarray(c) for c in cells]
            nested = [i for i, a in enumerate(arrays) if a.ndim != 1]
            if nested:
                raise TrainingDataError(
                    f"Sequence column {col!r} has cells that are not flat lists (nested lists or arrays of "
                    f"shape {arrays[nested[0]].shape}), row ids {_listed(ids[nested])}. Every cell must be "
                    "one flat list of integer ids."
                )
            lengths = np.array([a.shape[0] for a in arrays])
            values, counts = np.unique(lengths, return_counts=True)
            common = int(values[np.argmax(counts)])
            if len(values) > 1:
                odd = np.flatnonzero(lengths != common)
                raise TrainingDataError(
                    f"Sequence column {col!r} has cells of unequal length: most rows hold {common} ids, but "
                    f"row ids {_listed(ids[odd])} hold {_listed(lengths[odd])}. Pad or truncate every "
                    f"sequence to one length (e.g. tokenizer(..., padding='max_length', truncation=True, "
                    f"max_length={common})) before logging the data."
                )
            if common == 0:
                raise TrainingDataError(f"Sequence column {col!r} holds empty sequences; every row needs ids.")
            non_int = [i for i, a in enumerate(arrays) if a.dtype.kind not in "iu"]
            if non_int:
                example = arrays[non_int[0]][:5].tolist()
                raise TrainingDataError(
                    f"Sequence column {col!r} holds values that are not integers (e.g. {example} of dtype "
                    f"{arrays[non_int[0]].dtype}), row ids {_listed(ids[non_int])}. Sequence cells must be "
                    "integer ids (token ids, masks of 0/1); store them as integers."
                )
            stacked = np.stack(arrays)
            if stacked.dtype == np.uint64:
                too_big = np.flatnonzero((stacked > _INT64_MAX).any(1))
                if len(too_big):
                    raise TrainingDataError(
                        f"Sequence column {col!r} holds ids beyond int64's range, row ids {_listed(ids[too_big])}."
                    )
            negative = np.flatnonzero((stacked < 0).any(1)) if stacked.dtype.kind == "i" else np.empty(0, int)
            if len(negative):
                raise TrainingDataError(
                    f"Sequence column {col!r} holds negative ids (e.g. {int(stacked[negative[0]].min())}), row "
                    f"ids {_listed(ids[negative])}. Ids index embedding tables and must be >= 0; replace padding "
                    "markers such as -100 (a label convention) by the tokenizer's pad id."
                )

    def _validate_scalars(self) -> None:
        df = self.frame
        ids = df[self.row_id_column]
        non_numeric = [c for c in self.feature_columns if not pd.api.types.is_numeric_dtype(df[c].dtype)]
        if non_numeric:
            raise TrainingDataError(
                f"Feature columns {non_numeric[:10]} are not numeric; encode them as numbers (or as lists of "
                "integer ids, for token sequences), or leave them out with feature_columns=[...]."
            )
        values = df[list(self.feature_columns)].to_numpy(dtype=np.float64, na_value=np.nan)
        # floating features reach the model as float32: a value beyond its range would turn into inf there
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(values) & (np.abs(values) <= np.finfo(np.float32).max)
        bad_rows = np.flatnonzero(~ok.all(1))
        if len(bad_rows):
            bad_cols = [c for c, good in zip(self.feature_columns, ok.all(0)) if not good]
            raise TrainingDataError(
                f"{len(bad_rows)} row(s) have NaN or infinite features (or values beyond float32's range), "
                f"row ids {ids.iloc[bad_rows[:10]].tolist()}{' ...' if len(bad_rows) > 10 else ''}, in columns "
                f"{bad_cols[:10]}. Fix or drop those rows before logging the data."
            )
        if self.integer_features:
            too_big = [c for c in self.feature_columns
                       if df[c].dtype == np.uint64 and bool((df[c].to_numpy() > _INT64_MAX).any())]
            if too_big:
                raise TrainingDataError(f"Integer feature columns {too_big[:10]} hold values beyond int64's range.")
        if self.input_shape is not None and int(np.prod(self.input_shape)) != len(self.feature_columns):
            raise TrainingDataError(
                f"input_shape {self.input_shape} holds {int(np.prod(self.input_shape))} values but there are "
                f"{len(self.feature_columns)} feature columns."
            )

    # -- rows ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.frame)

    @property
    def row_ids(self) -> np.ndarray:
        return self.frame[self.row_id_column].to_numpy()

    @property
    def labels(self) -> np.ndarray:
        return self.frame[self.label_column].to_numpy(dtype=np.int64)

    def _part(self, rows: slice | None) -> pd.DataFrame:
        return self.frame if rows is None else self.frame.iloc[rows]

    def _sequences(self, part: pd.DataFrame) -> dict[str, np.ndarray]:
        """Each sequence column of ``part`` as an int64 ``(n, L)`` array (the table is validated)."""
        out = {}
        for col in self.feature_columns:
            cells = part[col].to_numpy(dtype=object)
            stacked = np.stack([np.asarray(c) for c in cells]) if len(cells) else np.empty((0, 0))
            out[col] = np.ascontiguousarray(stacked, dtype=np.int64)
        return out

    def inputs(self, rows: slice | None = None) -> np.ndarray | dict[str, np.ndarray]:
        """What the model takes for the given rows (a batch, first dim = rows).

        Sequence columns: a dict ``{column: int64 array (n, L)}``, for ``model(**inputs)``.
        Scalar columns: one array shaped ``(n, *input_shape)`` (or ``(n, columns)``), int64 when
        every feature column has an integer dtype, else float32, for ``model(x)``.

        Example:
            >>> first = table.inputs(slice(0, 1))   # {"input_ids": array([[101, 7592, ...]]), ...}
        """
        part = self._part(rows)
        if self.sequence_columns:
            return self._sequences(part)
        dtype = np.int64 if self.integer_features else np.float32
        x = np.array(part[list(self.feature_columns)].to_numpy(dtype=dtype), copy=True)
        return x.reshape((len(part), *self.input_shape)) if self.input_shape else x

    def features(self, rows: slice | None = None) -> np.ndarray | dict[str, np.ndarray]:
        """Feature values of the given rows for display and export: float32 shaped
        ``(n, *input_shape)`` for scalar columns (integer ones too); for sequence columns the same
        dict of int64 ``(n, L)`` arrays as :meth:`inputs`. Feed models with :meth:`inputs`."""
        part = self._part(rows)
        if self.sequence_columns:
            return self._sequences(part)
        x = np.array(part[list(self.feature_columns)].to_numpy(dtype=np.float32), copy=True)
        return x.reshape((len(part), *self.input_shape)) if self.input_shape else x

    def dataset(self, rows: slice | None = None) -> Dataset:
        """The rows as a Dataset of ``(inputs, label)``.

        A ``TensorDataset`` of ``(x, label)`` for scalar columns (``x`` float32, or int64 when every
        feature column is an integer dtype); a
        :class:`~tracin_tasks.core.data.TensorDictDataset` of ``({column: int64 (L,)}, label)``
        for sequence columns.
        """
        part = self._part(rows)
        y = torch.from_numpy(np.array(part[self.label_column].to_numpy(dtype=np.int64), copy=True))
        x = self.inputs(rows)
        if isinstance(x, dict):
            return TensorDictDataset({k: torch.from_numpy(v) for k, v in x.items()}, y)
        return TensorDataset(torch.from_numpy(x), y)

    def fingerprint(self) -> str:
        """A content hash of row ids, labels and features (order-sensitive).

        Sequence columns are hashed by their int64 contents, so a list column and the numpy arrays
        parquet reads back for it give the same fingerprint.
        """
        cols = [self.row_id_column, self.label_column, *self.feature_columns]
        sequences = self.sequence_columns
        scalar_cols = [c for c in cols if c not in sequences]
        hashed = pd.util.hash_pandas_object(self.frame[scalar_cols], index=False).to_numpy()
        h = hashlib.sha256(hashed.tobytes())
        if sequences:
            for col, arr in self._sequences(self.frame).items():
                h.update(repr((col, arr.shape)).encode())
                h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
        h.update(repr((cols, self.input_shape)).encode())
        return h.hexdigest()[:16]
