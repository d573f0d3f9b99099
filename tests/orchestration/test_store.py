"""ResultsStore: atomic cell files, missing(), write probes; aggregate_cells."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tracin_tasks.exceptions import ConfigurationError, TracInError
from tracin_tasks.orchestration.plan import AuditPlan, AuditSettings, plan_cells
from tracin_tasks.exceptions import CellsMissingError, ResultsStoreError
from tracin_tasks.orchestration.store import CELL_FIELDS, ResultsStore, aggregate_cells

CHECKPOINTS = [
    {"step": 1, "learning_rate": 0.5, "kind": "artifact", "location": "ckpt/step_1.pt"},
    {"step": 4, "learning_rate": 0.25, "kind": "artifact", "location": "ckpt/step_4.pt"},
]


@pytest.fixture
def plan() -> AuditPlan:
    """2 checkpoints x rows 0-4, 4-8, 8-10."""
    return plan_cells(AuditSettings(run_id="run-1", shard_size=4), CHECKPOINTS, 10, "fp")


@pytest.fixture
def store(tmp_path) -> ResultsStore:
    return ResultsStore(str(tmp_path / "results"))


def arrays_for(cell, seed: int = 0) -> dict[str, np.ndarray]:
    n = cell.row_stop - cell.row_start
    rng = np.random.default_rng(seed + 1000 * cell.step + cell.row_start)
    return {
        "squared_norm": rng.random(n) * 10,
        "loss": rng.random(n),
        "margin": rng.normal(size=n),
        "predicted": rng.integers(0, 10, n),
        "confidence": rng.random(n),
    }


def cell_files(store: ResultsStore, plan: AuditPlan) -> list[str]:
    folder = os.path.join(store.root, plan.audit_key, "cells")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_write_read_round_trip_and_layout(store, plan):
    cell = plan.cells[1]
    values = arrays_for(cell)
    path = store.write_cell(plan.audit_key, cell, values)
    assert path == store.cell_path(plan.audit_key, cell)
    assert path == os.path.join(store.root, plan.audit_key, "cells", f"{cell.name}.npz")
    assert store.has(plan.audit_key, cell) and not store.has(plan.audit_key, plan.cells[0])
    back = store.read_cell(plan.audit_key, cell)
    assert set(back) == set(CELL_FIELDS)
    for k in CELL_FIELDS:
        np.testing.assert_array_equal(back[k], values[k])
    assert cell_files(store, plan) == [f"{cell.name}.npz"], "no temporary file is left behind"


def test_missing_lists_cells_without_a_stored_result(store, plan):
    assert store.missing(plan) == list(plan.cells), "nothing stored yet (the folder does not exist)"
    for cell in plan.cells[::2]:
        store.write_cell(plan.audit_key, cell, arrays_for(cell))
    assert store.missing(plan) == list(plan.cells[1::2])
    # a leftover temporary file of a crashed write, or a stranger's file, is not a finished cell
    folder = os.path.join(store.root, plan.audit_key, "cells")
    open(os.path.join(folder, f".{plan.cells[1].name}.npz.0123.tmp"), "wb").close()
    open(os.path.join(folder, f"{plan.cells[3].name}.npz.part"), "wb").close()
    assert store.missing(plan) == list(plan.cells[1::2])
    assert not store.has(plan.audit_key, plan.cells[1])


def test_write_cell_checks_every_field_and_length(store, plan):
    cell = plan.cells[0]
    short = dict(arrays_for(cell), loss=np.zeros(1))
    with pytest.raises(ValueError, match="loss"):
        store.write_cell(plan.audit_key, cell, short)
    partial = {k: v for k, v in arrays_for(cell).items() if k != "confidence"}
    with pytest.raises(ValueError, match="confidence"):
        store.write_cell(plan.audit_key, cell, partial)
    assert cell_files(store, plan) == []


def test_a_failed_rename_leaves_no_cell_file(store, plan, monkeypatch):
    cell = plan.cells[2]

    def broken_mv(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store.fs, "mv", broken_mv)
    with pytest.raises(ResultsStoreError, match=cell.name) as info:
        store.write_cell(plan.audit_key, cell, arrays_for(cell))
    assert isinstance(info.value, OSError) and isinstance(info.value, TracInError)
    assert store.uri in str(info.value)
    assert cell_files(store, plan) == [], "neither the cell nor its temporary file remains"
    assert not store.has(plan.audit_key, cell)
    assert store.missing(plan) == list(plan.cells)


def test_a_write_that_fails_half_way_leaves_no_cell_file(store, plan, monkeypatch):
    """The disk fills up after half the bytes: no file that looks finished."""
    cell = plan.cells[0]
    real_open = store.fs.open

    def open_that_fills_up(path, mode="rb", **kwargs):
        fh = real_open(path, mode, **kwargs)
        if "w" in mode:
            write = fh.write

            def half_then_fail(data):
                write(data[: len(data) // 2])
                raise OSError(28, "No space left on device")

            fh.write = half_then_fail
        return fh

    monkeypatch.setattr(store.fs, "open", open_that_fills_up)
    with pytest.raises(ResultsStoreError, match="No space left"):
        store.write_cell(plan.audit_key, cell, arrays_for(cell))
    monkeypatch.undo()
    assert cell_files(store, plan) == []
    assert not store.has(plan.audit_key, cell)
    # the next attempt writes it completely
    store.write_cell(plan.audit_key, cell, arrays_for(cell))
    np.testing.assert_array_equal(store.read_cell(plan.audit_key, cell)["loss"], arrays_for(cell)["loss"])


def test_a_crash_outside_oserror_still_leaves_no_finished_cell(store, plan, monkeypatch):
    """Killed between write and rename (simulated): only a temporary name can be left."""
    cell = plan.cells[3]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.fs, "mv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.write_cell(plan.audit_key, cell, arrays_for(cell))
    monkeypatch.undo()
    assert f"{cell.name}.npz" not in cell_files(store, plan)
    assert all(name.startswith(".") and name.endswith(".tmp") for name in cell_files(store, plan))
    assert not store.has(plan.audit_key, cell) and cell in store.missing(plan)


def test_a_store_under_a_regular_file_is_not_writable(tmp_path, plan):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    store = ResultsStore(str(blocker / "results"))
    with pytest.raises(ResultsStoreError, match="not writable") as info:
        store.check_writable()
    assert str(blocker / "results") in str(info.value)
    assert "results_uri" in str(info.value)
    with pytest.raises(ResultsStoreError):
        store.write_cell(plan.audit_key, plan.cells[0], arrays_for(plan.cells[0]))
    with pytest.raises(ResultsStoreError):
        store.save_plan(plan)
    assert blocker.read_text().startswith("a file")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores file permissions, so a read-only folder is still writable")
def test_a_read_only_folder_is_not_writable(tmp_path, plan):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        store = ResultsStore(str(root))
        with pytest.raises(ResultsStoreError, match="not writable"):
            store.check_writable()
        with pytest.raises(ResultsStoreError):
            store.write_cell(plan.audit_key, plan.cells[0], arrays_for(plan.cells[0]))
        assert os.listdir(root) == []
    finally:
        root.chmod(0o700)


def test_check_writable_leaves_nothing_behind(store):
    store.check_writable()
    assert os.listdir(store.root) == []


def test_store_uri_is_validated(tmp_path):
    with pytest.raises(ConfigurationError):
        ResultsStore("")
    with pytest.raises(ConfigurationError, match="nosuchproto"):
        ResultsStore("nosuchproto://bucket/prefix")
    assert ResultsStore((tmp_path / "x").as_uri()).root.endswith("/x")


def test_save_plan_writes_the_plan_as_json(store, plan):
    store.save_plan(plan)
    with open(os.path.join(store.root, plan.audit_key, "plan.json")) as fh:
        assert AuditPlan.from_dict(json.load(fh)) == plan


# -- aggregate_cells ---------------------------------------------------------------------------
def test_aggregate_sums_learning_rate_weighted_norms(store, plan):
    for cell in plan.cells:
        store.write_cell(plan.audit_key, cell, arrays_for(cell))
    agg = aggregate_cells(store, plan)
    full = {s: {k: np.concatenate([arrays_for(c)[k] for c in plan.cells if c.step == s]) for k in CELL_FIELDS}
            for s in (1, 4)}
    np.testing.assert_allclose(agg["self_influence"], 0.5 * full[1]["squared_norm"] + 0.25 * full[4]["squared_norm"],
                               rtol=1e-15)
    np.testing.assert_allclose(agg["aum"], (full[1]["margin"] + full[4]["margin"]) / 2, rtol=1e-12)
    np.testing.assert_array_equal(agg["loss_final"], full[4]["loss"])
    np.testing.assert_array_equal(agg["predicted"], full[4]["predicted"])
    np.testing.assert_array_equal(agg["confidence"], full[4]["confidence"])
    assert set(agg) == {"self_influence", "aum", "loss_final", "predicted", "confidence"}


def test_aggregate_refuses_while_a_cell_is_missing(store, plan):
    for cell in plan.cells:
        store.write_cell(plan.audit_key, cell, arrays_for(cell))
    gone = plan.cells[4]
    os.remove(store.cell_path(plan.audit_key, gone))
    with pytest.raises(CellsMissingError) as info:
        aggregate_cells(store, plan)
    message = str(info.value)
    assert isinstance(info.value, LookupError) and isinstance(info.value, TracInError)
    assert gone.label in message, message  # "checkpoint step 4, rows 4-7"
    assert f"1 of {len(plan.cells)} cells" in message
    assert plan.audit_key in message
    assert all(c.label not in message for c in plan.cells if c != gone)
    assert "again" in message
