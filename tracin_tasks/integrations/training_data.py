"""Training rows read from a file: a parquet file, or a folder Hugging Face ``datasets`` wrote.

This is what ``--training-data PATH`` (``training_data=``) reads when the run did not log its rows,
and the column rules every reader of training data shares (:mod:`tracin_tasks.integrations.mlflow.data`
reads a run's own parquet artifact with them):

* **where**: a local path or an fsspec URL (``s3://…``, ``gs://…``, ``memory://…``) to a parquet
  file, or to a folder written by ``Dataset.save_to_disk`` (``state.json`` + ``*.arrow``), or by
  ``DatasetDict.save_to_disk`` (``dataset_dict.json``; its ``train`` split is read, and the log says
  so). A ``datasets`` folder holds JSON and Arrow files only; it is read with
  ``datasets.Dataset.load_from_disk`` (JSON and memory-mapped Arrow, nothing unpickled) after its
  JSON files were checked (small, plain file names).
* **label**: the column named (``--label-column``), else the one the run recorded, else ``label``,
  else ``labels`` (the name Hugging Face ``Trainer`` uses).
* **row id**: the column named (``--row-id-column``), else the one the run recorded, else
  ``row_id``; without one, rows are numbered by position 0..n-1 in a new column ``row_id`` (or
  ``__row__`` when that name is taken) and the table says so (``table.ids_are_positions``, and
  :func:`training_data_info`): such ids stay valid only while the file keeps its row order.
* **features**: every other column that is a number, or a token sequence (a list of integers:
  ``input_ids``, ``attention_mask``, ``token_type_ids``; kept as they are). Text, nested lists,
  images and other columns are left out and a log line names them; where token sequences are the
  input, scalar numbers beside them (``idx``) are left out too (not model inputs).

The table's fingerprint (:meth:`TrainingTable.fingerprint`) keys an audit's cells, as for data a
run logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from tracin_tasks._uris import redact
from tracin_tasks.core.table import TrainingTable
from tracin_tasks.exceptions import TrainingDataError, require_extra

logger = logging.getLogger(__name__)

#: label column names tried in order when none was named or recorded
LABEL_COLUMNS = ("label", "labels")
ROW_ID_COLUMN = "row_id"
#: the name of the position ids when ``row_id`` is taken (by the label column)
POSITION_COLUMN = "__row__"
#: where the table's frame keeps :class:`TrainingDataInfo` (``DataFrame.attrs``)
INFO_KEY = "tracin_tasks.training_data"
#: a datasets folder's JSON files are a few hundred bytes; a bigger one is not read
MAX_JSON_BYTES = 1024 * 1024

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ARROW_FILE = re.compile(r"^[\w.-]+\.arrow$")
FORMS_ADVICE = ("--training-data takes a parquet file or a folder written by Hugging Face datasets' "
                "save_to_disk (a Dataset, or a DatasetDict whose 'train' split is read), as a local path "
                "or an fsspec URL")


@dataclass(frozen=True)
class TrainingDataInfo:
    """Where a table's rows came from and what was decided while reading them (for reports and logs).

    Attributes:
        location: the file, folder or artifact read (without any password).
        form: ``"parquet file"``, ``"datasets folder"``, ``"the 'train' split of a DatasetDict folder"``,
            ``"run artifact"``, ``"run artifact, MLflow dataset input"``.
        label_column, row_id_column: the columns used.
        row_ids_are_positions: the data had no row-id column; rows are numbered by position.
        feature_columns: the model-input columns, in order.
        left_out: ``(column, why)`` for each column that is not a model input.
        notes: anything else the reader decided (a split chosen, a reused MLflow dataset record).
    """

    location: str
    form: str
    label_column: str
    row_id_column: str
    row_ids_are_positions: bool
    feature_columns: tuple[str, ...]
    left_out: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["feature_columns"] = list(self.feature_columns)
        d["left_out"] = [list(x) for x in self.left_out]
        d["notes"] = list(self.notes)
        return d


def training_data_info(table: TrainingTable) -> TrainingDataInfo | None:
    """What :func:`read_table` (or the run's reader) recorded about ``table``; ``None`` for a table
    built elsewhere."""
    d = table.frame.attrs.get(INFO_KEY)
    if not isinstance(d, dict):
        return None
    return TrainingDataInfo(
        d["location"], d["form"], d["label_column"], d["row_id_column"], bool(d["row_ids_are_positions"]),
        tuple(d["feature_columns"]), tuple(tuple(x) for x in d["left_out"]), tuple(d["notes"]),
    )


def read_table(path: str | os.PathLike[str], label_column: str | None = None,
               row_id_column: str | None = None) -> TrainingTable:
    """The training rows in a parquet file or a Hugging Face ``datasets`` folder, as a validated table.

    Args:
        path: a parquet file, a ``save_to_disk`` folder (``Dataset`` or ``DatasetDict``: its ``train``
            split), a local path or an fsspec URL.
        label_column: the class-label column (default ``label``, else ``labels``).
        row_id_column: the row-id column (default ``row_id``; without one, rows are numbered by position).

    Raises:
        TrainingDataError: nothing readable there, or a named column that does not exist (the message
            lists the columns), or rows the audit cannot use.

    Example:
        >>> table = read_table("data/train_tokenized", label_column="label")  # a save_to_disk folder
        >>> table.feature_columns
        ('input_ids', 'attention_mask')
    """
    location = os.fspath(path)
    arrow, form, notes = read_arrow(location)
    return table_from_arrow(arrow, location=redact(location) or "", form=form, label_column=label_column,
                            row_id_column=row_id_column, notes=notes)


# -- reading ------------------------------------------------------------------------------------
def read_arrow(location: str) -> tuple[Any, str, tuple[str, ...]]:
    """The rows at ``location`` as a ``pyarrow.Table``, with the form found and notes on choices made."""
    pq = require_extra("pyarrow.parquet", "mlflow")
    shown = redact(location)
    fs, root = _filesystem(location)
    try:
        is_dir, is_file = fs.isdir(root), fs.isfile(root)
    except Exception as exc:  # a remote store that cannot be reached
        raise TrainingDataError(f"The training data {shown} cannot be reached: {exc}. {FORMS_ADVICE}.") from exc
    if is_dir:
        return _read_datasets_folder(fs, root, location)
    if not is_file:
        raise TrainingDataError(f"The training data {shown} does not exist. {FORMS_ADVICE}.")
    try:
        with fs.open(root, "rb") as fh:
            return pq.read_table(fh), "parquet file", ()
    except Exception as exc:
        raise TrainingDataError(
            f"The training data {shown} is not a readable parquet file ({type(exc).__name__}: {exc}). "
            f"{FORMS_ADVICE}."
        ) from exc


def _filesystem(location: str) -> tuple[Any, str]:
    if not _URL.match(location):
        return _LocalFiles(), os.path.abspath(os.path.expanduser(location))
    fsspec = require_extra("fsspec", "prefect")
    try:
        return fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its package missing
        raise TrainingDataError(f"The training data {redact(location)} cannot be opened: {exc}. "
                                f"{FORMS_ADVICE}.") from exc


class _LocalFiles:
    """The four calls the readers make of an fsspec filesystem, for local paths (no fsspec needed)."""

    isdir = staticmethod(os.path.isdir)
    isfile = staticmethod(os.path.isfile)
    size = staticmethod(os.path.getsize)

    @staticmethod
    def open(path: str, mode: str = "rb"):
        return open(path, mode)


def _small_json(fs: Any, path: str, shown: str) -> Any:
    size = fs.size(path) or 0
    if size > MAX_JSON_BYTES:
        raise TrainingDataError(f"{shown} is {size:,} bytes; a datasets folder's JSON files are small, so it is "
                                "not read. Is this a folder written by save_to_disk?")
    with fs.open(path, "rb") as fh:
        raw = fh.read(MAX_JSON_BYTES + 1)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrainingDataError(f"{shown} is not JSON ({exc}). Write the folder again with save_to_disk.") from None


def _read_datasets_folder(fs: Any, root: str, location: str) -> tuple[Any, str, tuple[str, ...]]:
    shown = redact(location)
    join = lambda *p: "/".join([root.rstrip("/"), *p])  # noqa: E731  (fsspec paths use '/')
    notes: tuple[str, ...] = ()
    form = "datasets folder"
    if fs.isfile(join("dataset_dict.json")):
        spec = _small_json(fs, join("dataset_dict.json"), f"{shown}/dataset_dict.json")
        splits = spec.get("splits") if isinstance(spec, dict) else None
        if not isinstance(splits, list) or "train" not in splits:
            raise TrainingDataError(
                f"The training data {shown} is a DatasetDict folder without a 'train' split (splits: "
                f"{splits!r}). Name the split's folder instead: --training-data {shown}/<split>."
            )
        others = [s for s in splits if s != "train"]
        notes = (f"split 'train' of a DatasetDict (also has: {', '.join(map(str, others)) or 'nothing else'})",)
        logger.info("Training data %s is a DatasetDict: reading its 'train' split (it also has %s).",
                    shown, others or "no other split")
        root, location, shown = join("train"), location.rstrip("/") + "/train", f"{shown}/train"
        join = lambda *p: "/".join([root.rstrip("/"), *p])  # noqa: E731
        form = "the 'train' split of a DatasetDict folder"
    if not fs.isfile(join("state.json")):
        raise TrainingDataError(
            f"The training data {shown} is a folder, but not one written by Hugging Face datasets' save_to_disk "
            f"(no state.json, no dataset_dict.json). {FORMS_ADVICE}; a folder of parquet files is not read: "
            "name the file."
        )
    state = _small_json(fs, join("state.json"), f"{shown}/state.json")
    files = state.get("_data_files") if isinstance(state, dict) else None
    names = [f.get("filename") for f in files] if isinstance(files, list) and all(
        isinstance(f, dict) for f in files) else None
    # load_from_disk joins these names to the folder: only plain file names, so nothing outside it is read
    if not names or not all(isinstance(n, str) and _ARROW_FILE.match(n) for n in names):
        raise TrainingDataError(
            f"{shown}/state.json does not list the folder's Arrow files as plain names (got {str(names)[:200]}). "
            "Write the folder again with save_to_disk."
        )
    datasets = require_extra("datasets", "frameworks")
    try:
        dataset = datasets.Dataset.load_from_disk(location if _URL.match(location) else root, keep_in_memory=False)
        arrow = dataset.with_format("arrow")[:]
    except Exception as exc:
        raise TrainingDataError(f"The datasets folder {shown} cannot be read ({type(exc).__name__}: {exc}). "
                                "Write it again with save_to_disk.") from exc
    return arrow, form, notes


# -- columns ------------------------------------------------------------------------------------
def _kind(arrow_type: Any) -> str:
    """``"number"``, ``"tokens"`` (a list of integers) or why the column cannot be a model input."""
    import pyarrow as pa

    t = arrow_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return "number"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return "tokens" if pa.types.is_integer(t.value_type) else "a list that is not of integers"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "a string"
    if pa.types.is_dictionary(t):
        return "categories" if not pa.types.is_integer(t.value_type) else "number"
    return f"of type {t}"


def frame_from_arrow(arrow: Any) -> pd.DataFrame:
    """The rows as pandas: list columns stay lists (numpy arrays per row), a named index becomes a column."""
    frame = arrow.to_pandas()
    if any(name is not None for name in frame.index.names):
        frame = frame.reset_index()
    elif not isinstance(frame.index, pd.RangeIndex) or frame.index.start != 0 or frame.index.step != 1:
        frame = frame.reset_index(drop=True)
    return frame


def table_from_arrow(
    arrow: Any, *, location: str, form: str, label_column: str | None = None, row_id_column: str | None = None,
    recorded_label: str | None = None, recorded_row_id: str | None = None,
    feature_columns: list[str] | None = None, input_shape: list[int] | None = None,
    notes: tuple[str, ...] = (), label_advice: str = "",
) -> TrainingTable:
    """Pick the label, row-id and feature columns of ``arrow`` (rules in the module's docstring) and build
    the table, with :class:`TrainingDataInfo` in ``table.frame.attrs`` and ``table.ids_are_positions``.

    ``recorded_*`` are what the run recorded (used when nothing was named); ``feature_columns`` and
    ``input_shape``, when the run recorded them, are used as they are.
    """
    frame = frame_from_arrow(arrow)
    where = f"{location} ({form})" if location else form
    columns = [str(c) for c in frame.columns]
    label = _choose_label(columns, label_column, recorded_label, where, label_advice)
    row_id, positions = _choose_row_id(columns, row_id_column, recorded_row_id, label, where)
    left_out: list[tuple[str, str]] = []
    if feature_columns is None:
        kinds = {f.name: _kind(f.type) for f in arrow.schema}
        candidates = [c for c in columns if c not in (label, row_id)]
        tokens = any(kinds.get(c) == "tokens" for c in candidates)
        feature_columns = []
        for c in candidates:
            kind = kinds.get(c) or ("number" if pd.api.types.is_numeric_dtype(frame[c].dtype) else "not a number")
            if c in LABEL_COLUMNS:
                left_out.append((c, "another label column"))
            elif kind == "tokens" or (kind == "number" and not tokens):
                feature_columns.append(c)
            elif kind == "number":
                left_out.append((c, "a number beside token sequences, not a model input"))
            else:
                left_out.append((c, kind))
        if left_out and not feature_columns:
            raise TrainingDataError(
                f"The training data {where} has no column a model can take: "
                f"{', '.join(f'{c} ({why})' for c, why in left_out[:10])}. A model input is a number or a token "
                "sequence (a list of integer ids): tokenize text first (input_ids, attention_mask) and save those."
            )
        if left_out:
            frame = frame.drop(columns=[c for c, _ in left_out])
            logger.info("Training data %s: left out columns %s (a model input is a number or a token sequence, "
                        "a list of integers).", where, ", ".join(f"{c} ({why})" for c, why in left_out))
    if positions:
        frame.insert(0, row_id, np.arange(len(frame), dtype=np.int64))
        logger.info("Training data %s has no row-id column (%r): rows are numbered by position 0..%d in column "
                    "%r; such ids hold only while the data keeps its row order. Pass --row-id-column NAME to "
                    "use a column of ids.", where, row_id_column or ROW_ID_COLUMN, len(frame) - 1, row_id)
    info = TrainingDataInfo(location, form, label, row_id, positions, tuple(feature_columns), tuple(left_out),
                            tuple(notes))
    frame.attrs[INFO_KEY] = info.to_dict()  # DataFrame.copy keeps attrs, so the table's frame carries it
    table = TrainingTable.from_frame(frame, label, row_id, feature_columns, input_shape)
    table.frame.attrs[INFO_KEY] = info.to_dict()
    try:  # what the report reads (orchestration/reporting.py)
        object.__setattr__(table, "ids_are_positions", positions)
    except AttributeError:  # a table class with __slots__: the frame's attrs still say it
        pass
    return table


def _missing(columns: list[str], name: str, flag: str, where: str, what: str) -> TrainingDataError:
    return TrainingDataError(
        f"The training data {where} has no column {name!r} ({what}); its columns are {columns[:30]}"
        f"{' ...' if len(columns) > 30 else ''}. Pass {flag} with one of them."
    )


def _choose_label(columns: list[str], named: str | None, recorded: str | None, where: str, advice: str) -> str:
    if named:
        if named not in columns:
            raise _missing(columns, named, "--label-column", where, "--label-column")
        return named
    if recorded:
        if recorded not in columns:
            raise _missing(columns, recorded, "--label-column", where, "the label column the run recorded")
        return recorded
    for name in LABEL_COLUMNS:
        if name in columns:
            return name
    raise TrainingDataError(
        f"The training data {where} has no label column: none named, and no {' or '.join(map(repr, LABEL_COLUMNS))} "
        f"column{advice}; its columns are {columns[:30]}{' ...' if len(columns) > 30 else ''}. "
        "Pass --label-column NAME (label_column= in Python)."
    )


def _choose_row_id(columns: list[str], named: str | None, recorded: str | None, label: str,
                   where: str) -> tuple[str, bool]:
    if named:
        if named not in columns:
            raise _missing(columns, named, "--row-id-column", where, "--row-id-column")
        return named, False
    if recorded:
        if recorded not in columns:
            raise _missing(columns, recorded, "--row-id-column", where, "the row-id column the run recorded")
        return recorded, False
    if ROW_ID_COLUMN in columns and ROW_ID_COLUMN != label:
        return ROW_ID_COLUMN, False
    name = ROW_ID_COLUMN if ROW_ID_COLUMN not in columns else POSITION_COLUMN
    while name in columns:
        name = f"_{name}_"
    return name, True
