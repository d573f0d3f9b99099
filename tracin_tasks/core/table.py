"""Training data as a table: one row per example, with a stable row id and a label column."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from tracin_tasks.exceptions import TrainingDataError


@dataclass(frozen=True)
class TrainingTable:
    """A training set stored as a DataFrame, and how to turn it into model inputs.

    Attributes:
        frame: one row per training example.
        label_column: the (integer) class label, as given to training.
        row_id_column: a unique, stable id per row; flagged rows are reported by it.
        feature_columns: numeric columns that form the model input, in order.
        input_shape: shape of one row's input (e.g. ``(1, 8, 8)``); ``None`` keeps a flat vector.
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
        non_numeric = [c for c in self.feature_columns if not pd.api.types.is_numeric_dtype(df[c].dtype)]
        if non_numeric:
            raise TrainingDataError(
                f"Feature columns {non_numeric[:10]} are not numeric; encode them as numbers, or leave them "
                "out with feature_columns=[...]."
            )
        values = df[list(self.feature_columns)].to_numpy(dtype=np.float64, na_value=np.nan)
        # features() hands the model float32: a value beyond its range would turn into inf there
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
        if self.input_shape is not None and int(np.prod(self.input_shape)) != len(self.feature_columns):
            raise TrainingDataError(
                f"input_shape {self.input_shape} holds {int(np.prod(self.input_shape))} values but there are "
                f"{len(self.feature_columns)} feature columns."
            )

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def row_ids(self) -> np.ndarray:
        return self.frame[self.row_id_column].to_numpy()

    @property
    def labels(self) -> np.ndarray:
        return self.frame[self.label_column].to_numpy(dtype=np.int64)

    def features(self, rows: slice | None = None) -> np.ndarray:
        """Feature array of the given rows, shaped ``(n, *input_shape)``, float32."""
        part = self.frame if rows is None else self.frame.iloc[rows]
        x = np.array(part[list(self.feature_columns)].to_numpy(dtype=np.float32), copy=True)
        return x.reshape((len(part), *self.input_shape)) if self.input_shape else x

    def dataset(self, rows: slice | None = None) -> TensorDataset:
        """The rows as a TensorDataset of (features, label)."""
        part = self.frame if rows is None else self.frame.iloc[rows]
        y = np.array(part[self.label_column].to_numpy(dtype=np.int64), copy=True)
        return TensorDataset(torch.from_numpy(self.features(rows)), torch.from_numpy(y))

    def fingerprint(self) -> str:
        """A content hash of row ids, labels and features (order-sensitive)."""
        cols = [self.row_id_column, self.label_column, *self.feature_columns]
        hashed = pd.util.hash_pandas_object(self.frame[cols], index=False).to_numpy()
        h = hashlib.sha256(hashed.tobytes())
        h.update(repr((cols, self.input_shape)).encode())
        return h.hexdigest()[:16]
