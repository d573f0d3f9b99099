"""TrainingTable with integer features: token-sequence columns and one-id-per-column tables.

What a table hands the model (dtype, shape, dict or tensor), what it refuses (with the row ids and
what to do), and that its fingerprint follows the sequences' contents.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from tracin_tasks.core.data import TensorDictDataset
from tracin_tasks.core.table import TrainingTable
from tracin_tasks.exceptions import TrainingDataError


def _frame(n: int = 4, length: int = 5) -> pd.DataFrame:
    ids = (np.arange(n * length).reshape(n, length) % 17) + 1
    return pd.DataFrame({
        "row_id": [f"r{i}" for i in range(n)],
        "label": np.arange(n, dtype=np.int64) % 3,
        "input_ids": [list(map(int, r)) for r in ids],
        "attention_mask": [np.ones(length, dtype=np.int32) for _ in range(n)],
    })


# --------------------------------------------------------------------------------------------
# what the model gets
# --------------------------------------------------------------------------------------------
def test_sequence_columns_become_a_dict_of_int64():
    table = TrainingTable.from_frame(_frame())
    assert table.sequence_columns == ("input_ids", "attention_mask")
    first = table.inputs(slice(0, 1))
    assert set(first) == {"input_ids", "attention_mask"}
    assert all(v.dtype == np.int64 and v.shape == (1, 5) for v in first.values())
    np.testing.assert_array_equal(first["input_ids"][0], [1, 2, 3, 4, 5])
    ds = table.dataset()
    assert isinstance(ds, TensorDictDataset) and len(ds) == 4
    x, y = ds[2]
    assert x["input_ids"].dtype == torch.int64 and x["input_ids"].shape == (5,) and int(y) == 2
    batch, ys = table.dataset(slice(1, 3))[[0, 1]]
    np.testing.assert_array_equal(batch["input_ids"].numpy(), table.inputs(slice(1, 3))["input_ids"])
    assert ys.tolist() == [1, 2]
    assert set(table.features(slice(0, 2))) == {"input_ids", "attention_mask"}


def test_integer_columns_are_int64_and_float_columns_stay_float32():
    ints = pd.DataFrame({"row_id": ["a", "b"], "label": [0, 1], "t0": [3, 4], "t1": np.array([5, 6], dtype=np.int32)})
    table = TrainingTable.from_frame(ints)
    assert table.integer_features and table.inputs().dtype == np.int64
    assert table.dataset().tensors[0].dtype == torch.int64
    assert table.features().dtype == np.float32  # the display/export path is unchanged
    mixed = ints.assign(t1=[0.5, 1.5])
    table = TrainingTable.from_frame(mixed)
    assert not table.integer_features and table.inputs().dtype == np.float32
    ds = table.dataset()
    assert isinstance(ds, TensorDataset) and ds.tensors[0].dtype == torch.float32
    shaped = TrainingTable.from_frame(ints, input_shape=(1, 2))
    assert shaped.inputs().shape == (2, 1, 2) and shaped.inputs().dtype == np.int64


# --------------------------------------------------------------------------------------------
# what it refuses
# --------------------------------------------------------------------------------------------
def _refused(frame: pd.DataFrame, *needles: str, **kw) -> str:
    with pytest.raises(TrainingDataError) as info:
        TrainingTable.from_frame(frame, **kw)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


def test_unequal_lengths_are_refused_with_row_ids():
    frame = _frame()
    frame.at[2, "input_ids"] = [1, 2, 3]
    _refused(frame, "'input_ids'", "unequal length", "most rows hold 5", "['r2']", "[3]", "padding='max_length'")


def test_non_integer_values_are_refused():
    frame = _frame()
    frame.at[1, "input_ids"] = [1.5, 2.0, 3.0, 4.0, 5.0]
    _refused(frame, "'input_ids'", "not integers", "['r1']", "float64", "store them as integers")
    frame = _frame()
    frame.at[3, "attention_mask"] = ["a", "b", "c", "d", "e"]
    _refused(frame, "'attention_mask'", "not integers", "['r3']")


def test_negative_ids_are_refused():
    frame = _frame()
    frame.at[0, "input_ids"] = [5, 6, -100, -100, -100]
    _refused(frame, "'input_ids'", "negative ids", "-100", "['r0']", "pad id")


def test_missing_and_nested_cells_are_refused():
    frame = _frame()
    frame.at[1, "input_ids"] = None
    _refused(frame, "'input_ids'", "not lists of ids", "['r1']")
    frame = _frame()
    frame.at[2, "input_ids"] = [[1, 2], [3, 4]]
    _refused(frame, "'input_ids'", "not flat lists", "['r2']")


def test_sequences_and_scalars_do_not_mix():
    frame = _frame().assign(length=5)
    _refused(frame, "['input_ids', 'attention_mask']", "['length']", "not both", "feature_columns=")
    table = TrainingTable.from_frame(frame, feature_columns=["input_ids", "attention_mask"])
    assert set(table.inputs()) == {"input_ids", "attention_mask"}


def test_input_shape_is_refused_for_sequences():
    _refused(_frame(), "input_shape (1, 5)", "leave input_shape out", input_shape=(1, 5))


def test_text_columns_are_still_refused():
    frame = _frame().assign(text=["a", "b", "c", "d"])
    _refused(frame, "['text']", "not numeric", feature_columns=["text"])


# --------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------
def test_fingerprint_follows_sequence_contents(tmp_path):
    frame = _frame()
    base = TrainingTable.from_frame(frame).fingerprint()
    assert base == TrainingTable.from_frame(frame.copy()).fingerprint()
    # lists, arrays of another integer dtype, and parquet's read-back arrays hash alike
    as_arrays = frame.assign(input_ids=[np.asarray(v, dtype=np.int16) for v in frame["input_ids"]],
                             attention_mask=[list(map(int, v)) for v in frame["attention_mask"]])
    assert TrainingTable.from_frame(as_arrays).fingerprint() == base
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    assert TrainingTable.from_frame(pd.read_parquet(tmp_path / "t.parquet")).fingerprint() == base

    one_token = frame.copy()
    one_token.at[3, "input_ids"] = [1, 2, 3, 4, 6]
    mask = frame.copy()
    mask.at[0, "attention_mask"] = np.array([1, 1, 1, 1, 0])
    label = frame.assign(label=[0, 1, 2, 1])
    swapped = frame.copy()
    swapped["input_ids"] = list(frame["input_ids"].iloc[[1, 0, 2, 3]])
    changed = {
        "token": TrainingTable.from_frame(one_token).fingerprint(),
        "mask": TrainingTable.from_frame(mask).fingerprint(),
        "label": TrainingTable.from_frame(label).fingerprint(),
        "rows swapped": TrainingTable.from_frame(swapped).fingerprint(),
        "columns": TrainingTable.from_frame(frame, feature_columns=["input_ids"]).fingerprint(),
    }
    assert base not in changed.values(), changed
    assert len(set(changed.values())) == len(changed), changed


def test_fingerprint_of_scalar_tables_ignores_the_new_rules():
    """A numeric table hashes as it always did (no sequence part), so stored fingerprints hold."""
    import hashlib

    frame = pd.DataFrame({"row_id": ["a", "b"], "label": [0, 1], "f0": [0.5, 1.5], "f1": [2, 3]})
    cols = ["row_id", "label", "f0", "f1"]
    h = hashlib.sha256(pd.util.hash_pandas_object(frame[cols], index=False).to_numpy().tobytes())
    h.update(repr((cols, None)).encode())
    assert TrainingTable.from_frame(frame).fingerprint() == h.hexdigest()[:16]
