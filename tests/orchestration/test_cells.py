"""plan_audit, compute_cell and write_scores on a real MLflow run, without running a flow."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from tracin_tasks.core.tracin import TracIn
from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource
from tracin_tasks.orchestration.aggregate import write_scores
from tracin_tasks.orchestration.compute import compute_cell
from tracin_tasks.orchestration.planning import plan_audit
from tracin_tasks.orchestration.plan import AuditPlan, AuditSettings
from tracin_tasks.exceptions import CellsMissingError, ResultsStoreError
from tracin_tasks.orchestration.store import ResultsStore


@pytest.fixture(scope="module")
def planned(digits_run, tmp_path_factory):
    """The run planned in shards of 600 rows: 3 checkpoints x 3 shards."""
    store = ResultsStore(str(tmp_path_factory.mktemp("cells") / "results"))
    settings = AuditSettings(run_id=digits_run.run_id, tracking_uri=digits_run.tracking_uri, shard_size=600,
                             batch_size=128)
    return plan_audit(settings, store), store


def test_plan_audit_reads_the_run_and_saves_the_plan(planned, digits_run):
    plan, store = planned
    source = MlflowCheckpointSource(digits_run.run_id, digits_run.tracking_uri)
    refs = source.checkpoint_refs()
    assert [c["step"] for c in plan.checkpoints] == [r.step for r in refs] == [1, 2, 3]
    assert [c["learning_rate"] for c in plan.checkpoints] == [r.learning_rate for r in refs]
    assert plan.n_rows == digits_run.n_rows == len(source.training_table())
    assert plan.fingerprint == source.training_table().fingerprint()
    assert len(plan.cells) == 9 and plan.cells[-1].row_stop == digits_run.n_rows
    with open(os.path.join(store.root, plan.audit_key, "plan.json")) as fh:
        assert AuditPlan.from_dict(json.load(fh)) == plan
    assert store.missing(plan) == list(plan.cells)


def test_compute_cell_stores_the_tracin_of_its_checkpoint_and_rows(planned, digits_run):
    plan, store = planned
    cell = next(c for c in plan.cells if c.step == 2 and c.row_start == 600)
    outcome = compute_cell(plan, cell, store)
    assert outcome["skipped"] is False and outcome["cell"] == cell.name
    assert outcome["path"] == store.cell_path(plan.audit_key, cell) and store.has(plan.audit_key, cell)
    assert outcome["device"] == "cpu" and outcome["seconds"] > 0

    stored = store.read_cell(plan.audit_key, cell)
    source = MlflowCheckpointSource(digits_run.run_id, digits_run.tracking_uri)
    checkpoint = next(c for c in source.checkpoints() if c.step == 2)
    rows = source.training_table().dataset(slice(600, 1200))
    expected = TracIn(source.build_model(), [checkpoint]).self_influence(rows, batch_size=128)
    assert len(stored["squared_norm"]) == 600
    np.testing.assert_allclose(stored["squared_norm"] * cell.learning_rate, expected, rtol=1e-6)
    (passed,) = TracIn(source.build_model(), [checkpoint]).checkpoint_passes(rows, 128)
    np.testing.assert_allclose(stored["loss"], passed.loss, rtol=1e-6)
    np.testing.assert_array_equal(stored["predicted"], passed.predicted)
    assert store.missing(plan) == [c for c in plan.cells if c != cell]


def test_compute_cell_skips_a_stored_cell(planned):
    plan, store = planned
    cell = plan.cells[0]
    compute_cell(plan, cell, store)
    path = store.cell_path(plan.audit_key, cell)
    before = (os.stat(path).st_mtime_ns, open(path, "rb").read())
    outcome = compute_cell(plan, cell, store)
    assert outcome == {"cell": cell.name, "path": path, "skipped": True, "seconds": 0.0, "device": None}
    assert (os.stat(path).st_mtime_ns, open(path, "rb").read()) == before


def test_write_scores_after_every_cell_matches_the_core(planned, digits_run, support, tmp_path):
    plan, store = planned
    missing = store.missing(plan)
    assert missing, "the other tests leave cells to compute"
    with pytest.raises(CellsMissingError, match=missing[0].label):
        write_scores(plan, store, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "scores.parquet").exists()
    for cell in missing:
        compute_cell(plan, cell, store)
    path = write_scores(plan, store, str(tmp_path / "out"))
    assert path == str(tmp_path / "out" / "scores.parquet")
    assert os.listdir(tmp_path / "out") == ["scores.parquet"]
    frame = pd.read_parquet(path)
    scores, table = support.direct_scores(digits_run)
    np.testing.assert_allclose(frame["self_influence"].to_numpy(), scores, rtol=1e-6)
    np.testing.assert_array_equal(frame["row_id"].to_numpy(), table.row_ids)
    np.testing.assert_array_equal(frame["label"].to_numpy(), table.labels)
    assert list(frame.columns) == ["row_id", "label", "self_influence", "aum", "loss_final", "predicted_label",
                                   "predicted_confidence"]


def test_plan_audit_fails_early_on_an_unwritable_store(digits_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = ResultsStore(str(blocker / "results"))
    with pytest.raises(ResultsStoreError, match="not writable"):
        plan_audit(AuditSettings(run_id=digits_run.run_id, tracking_uri=digits_run.tracking_uri), store)
