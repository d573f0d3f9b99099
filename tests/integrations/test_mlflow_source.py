"""MlflowCheckpointSource against real MLflow stores: helper-logged runs, plain artifact folders,
LoggedModels, checkpoint selection and the download cache."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

import tracin_tasks.mlflow as tm
from tracin_tasks import Checkpoint, TracIn
from tracin_tasks.core.table import TrainingTable
from tracin_tasks.examples.digits import build_mlp, load_noisy_digits, recall_at
from tracin_tasks.exceptions import CheckpointError, ConfigurationError, NoCheckpointsError, UnsafeCheckpointError
from tracin_tasks.core.weights import read_pt2_file as read_pt2_state_dict

from _harness import REPO_ROOT, mlflow_target

from ._support import MLP_FACTORY, evolve

# The audit a worker runs: nothing but the run id and the tracking URI.
AUDIT_SCRIPT = r"""
import json, sys
import numpy as np
from tracin_tasks import TracIn
from tracin_tasks.mlflow import MlflowCheckpointSource

run_id, uri, out = sys.argv[1:4]
source = MlflowCheckpointSource(run_id, uri)
ckpts = source.checkpoints()
table = source.training_table()
scores = TracIn(source.build_model(), ckpts).self_influence(table.dataset())
np.save(out + "/scores.npy", scores)
refs = source.checkpoint_refs()
json.dump(
    {
        "steps": [c.step for c in ckpts],
        "learning_rates": [c.learning_rate for c in ckpts],
        "lr_sources": [r.lr_source for r in refs],
        "kinds": [r.kind for r in refs],
        "locations": [r.location for r in refs],
        "sources": [c.metadata["source"] for c in ckpts],
        "fingerprint": table.fingerprint(),
        "row_ids": table.row_ids.tolist(),
        "labels": table.labels.tolist(),
        "warnings": source.warnings,
    },
    open(out + "/audit.json", "w"),
)
"""

HIDDEN = 32
LOGGED = [(1, 0.1), (4, 0.05), (9, 0.02)]  # (step, learning rate)


def _assert_same_weights(got, expected):
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def _log_training_data_by_hand(df, name):
    """What log_training_data writes, minus the dataset input: the parquet and the spec."""
    table = TrainingTable.from_frame(df, "label", "row_id", input_shape=(1, 8, 8))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.parquet")
        df.to_parquet(path, index=False)
        mlflow.log_artifact(path, "training_data")
    mlflow.log_dict(
        {"artifact_path": f"training_data/{name}.parquet", "label_column": "label", "row_id_column": "row_id",
         "feature_columns": list(table.feature_columns), "input_shape": [1, 8, 8], "rows": len(table),
         "fingerprint": table.fingerprint()},
        "tracin/training_data.json",
    )


def _log_helper_run(store, digits, data_logging="helper"):
    """A run logged the documented way; returns its id and the (step, lr, state_dict) logged."""
    experiment_id = store.new_experiment("helpers")
    torch.manual_seed(0)
    model = build_mlp(hidden=HIDDEN)
    logged = []
    with mlflow_target(store.uri), mlflow.start_run(experiment_id=experiment_id) as run:
        if data_logging == "helper":
            tm.log_training_data(digits.frame, label_column="label", row_id_column="row_id", input_shape=(1, 8, 8),
                                 name="digits_small")
        else:
            _log_training_data_by_hand(digits.frame, "digits_small")
        tm.log_model_factory(MLP_FACTORY, hidden=HIDDEN)
        for step, lr in LOGGED:
            sd = evolve(model, seed=step)
            tm.log_checkpoint(model, step=step, learning_rate=lr)
            logged.append((step, lr, sd))
    return run.info.run_id, logged


@pytest.mark.parametrize(
    "store, data_logging",
    [
        ("sqlite", "helper"),
        ("server", "helper"),
        ("server", "by-hand"),  # the same audit over HTTP, training data logged without the helper
    ],
    indirect=["store"],
)
def test_run_audited_in_a_fresh_process(store, data_logging, small_digits, tmp_path):
    run_id, logged = _log_helper_run(store, small_digits, data_logging)

    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env.update(
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        TRACIN_TASKS_CACHE_DIR=str(tmp_path / "worker-cache"),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    proc = subprocess.run(
        [sys.executable, "-c", AUDIT_SCRIPT, run_id, store.uri, str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list((tmp_path / "worker-cache").rglob("state_dict.pt"))  # the worker used its own cache
    audit = json.loads((out / "audit.json").read_text())
    worker_scores = np.load(out / "scores.npy")

    # the core, fed the very state_dicts and learning rates that were logged
    reference = TracIn(
        build_mlp(hidden=HIDDEN),
        [Checkpoint(state_dict=sd, learning_rate=lr, step=step) for step, lr, sd in logged],
    ).self_influence(small_digits.dataset())
    assert worker_scores.dtype == np.float64 and worker_scores.shape == (len(small_digits.labels),)
    np.testing.assert_allclose(worker_scores, reference, rtol=1e-10, atol=0)

    assert audit["steps"] == [s for s, _, _ in logged] == sorted(audit["steps"])
    assert audit["learning_rates"] == [lr for _, lr, _ in logged]
    assert audit["lr_sources"] == ["metric"] * len(logged)
    assert audit["kinds"] == ["artifact"] * len(logged)
    assert audit["locations"] == [f"checkpoints/step_{s}/state_dict.pt" for s, _, _ in logged]
    assert audit["sources"] == [f"runs:/{run_id}/checkpoints/step_{s}/state_dict.pt" for s, _, _ in logged]
    assert audit["warnings"] == []

    expected_table = TrainingTable.from_frame(small_digits.frame, "label", "row_id", input_shape=(1, 8, 8))
    assert audit["row_ids"] == small_digits.row_ids.tolist()
    assert audit["labels"] == small_digits.labels.tolist()
    assert audit["fingerprint"] == expected_table.fingerprint()

    client = mlflow.MlflowClient(tracking_uri=store.uri)
    spec_path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="tracin/training_data.json", dst_path=str(tmp_path / "spec"), tracking_uri=store.uri
    )
    spec = json.loads(Path(spec_path).read_text())
    assert spec["fingerprint"] == audit["fingerprint"]
    assert spec["rows"] == len(small_digits.labels) and spec["input_shape"] == [1, 8, 8]
    assert spec["artifact_path"] == "training_data/digits_small.parquet"
    lr_history = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    assert lr_history == {s: lr for s, lr, _ in logged}
    if data_logging != "helper":
        return
    run = client.get_run(run_id)
    training_inputs = [
        di for di in run.inputs.dataset_inputs
        if {t.key: t.value for t in di.tags}.get("mlflow.data.context") == "training"
    ]
    assert len(training_inputs) == 1
    dataset = training_inputs[0].dataset
    assert dataset.name == "digits_small"
    source = json.loads(dataset.source)
    if not run.info.artifact_uri.startswith("mlflow-artifacts:"):
        assert source["uri"] == run.info.artifact_uri.rstrip("/") + "/training_data/digits_small.parquet"
    else:  # served by the tracking server: recorded as the HTTP URL it serves the file from
        assert source["url"].startswith("http://127.0.0.1:")
        assert source["url"].endswith(f"/api/2.0/mlflow-artifacts/artifacts/{run.info.artifact_uri.split(':/', 1)[1].lstrip('/')}/training_data/digits_small.parquet")


def test_in_process_source_matches_logged_weights(sqlite_store, small_digits, tmp_path):
    run_id, logged = _log_helper_run(sqlite_store, small_digits)
    source = tm.MlflowCheckpointSource(run_id, sqlite_store.uri, cache_dir=tmp_path / "cache")
    ckpts = source.checkpoints()
    assert [(c.step, c.learning_rate) for c in ckpts] == [(s, lr) for s, lr, _ in logged]
    for ckpt, (_, _, sd) in zip(ckpts, logged):
        _assert_same_weights(ckpt.state_dict, sd)
        assert ckpt.metadata["lr_source"] == "metric"
    model = source.build_model()
    assert model[1].out_features == HIDDEN  # the logged kwargs reached the factory


def test_training_data_found_from_dataset_input_alone(sqlite_store, small_digits, tmp_path):
    """A run without tracin/training_data.json: its training dataset input points at the parquet."""
    experiment_id = sqlite_store.new_experiment("dsinput")
    with mlflow_target(sqlite_store.uri), mlflow.start_run(experiment_id=experiment_id) as run:
        path = tmp_path / "train.parquet"
        small_digits.frame.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), "data")
        uri = run.info.artifact_uri.rstrip("/") + "/data/train.parquet"
        mlflow.log_input(mlflow.data.from_pandas(small_digits.frame, source=uri, targets="label"), context="training")
    source = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, cache_dir=tmp_path / "cache")
    table = source.training_table()
    assert table.row_ids.tolist() == small_digits.row_ids.tolist()
    assert table.labels.tolist() == small_digits.labels.tolist()
    assert len(table.feature_columns) == 64 and table.input_shape is None


# -- plain artifact folders -------------------------------------------------------------------
def test_plain_artifact_state_dicts_discovered_in_step_order(sqlite_store, small_digits, tmp_path):
    experiment_id = sqlite_store.new_experiment("plain")
    torch.manual_seed(0)
    model = build_mlp(hidden=16)
    lrs = {2: 0.3, 10: 0.01, 5: 0.07}
    other_lrs = {2: 1e-3, 10: 3e-3, 5: 2e-3}
    saved = {}
    with mlflow_target(sqlite_store.uri), mlflow.start_run(experiment_id=experiment_id) as run:
        for e in [2, 10, 5]:  # logged out of order
            saved[e] = evolve(model, seed=e)
            path = tmp_path / f"epoch_{e}.pt"
            torch.save(model.state_dict(), path)
            mlflow.log_artifact(str(path), "ckpt")
            mlflow.log_metric("lr", lrs[e], step=e)
            mlflow.log_metric("base_lr", other_lrs[e], step=e)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.save(opt.state_dict(), tmp_path / "optimizer_epoch_2.pt")  # not a model checkpoint
        mlflow.log_artifact(str(tmp_path / "optimizer_epoch_2.pt"), "ckpt")
    run_id = run.info.run_id

    source = tm.MlflowCheckpointSource(
        run_id, sqlite_store.uri, cache_dir=tmp_path / "cache", model_factory=MLP_FACTORY, model_kwargs={"hidden": 16}
    )
    refs = source.checkpoint_refs()
    assert [r.step for r in refs] == [2, 5, 10]
    assert [r.learning_rate for r in refs] == [0.3, 0.07, 0.01]
    assert {r.lr_source for r in refs} == {"metric"} and {r.kind for r in refs} == {"artifact"}
    assert [r.location for r in refs] == ["ckpt/epoch_2.pt", "ckpt/epoch_5.pt", "ckpt/epoch_10.pt"]
    ckpts = source.checkpoints()
    for ckpt in ckpts:
        _assert_same_weights(ckpt.state_dict, saved[ckpt.step])
    assert source.warnings == []

    # the factory given to the source builds the model; the audit equals the core's
    data = torch.utils.data.Subset(small_digits.dataset(), range(64))
    got = TracIn(source.build_model(), ckpts).self_influence(data)
    want = TracIn(build_mlp(hidden=16), [Checkpoint(state_dict=saved[s], learning_rate=lrs[s], step=s) for s in (2, 5, 10)]
                  ).self_influence(data)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)

    other = tm.MlflowCheckpointSource(run_id, sqlite_store.uri, cache_dir=tmp_path / "cache", lr_metric="base_lr")
    assert [r.learning_rate for r in other.checkpoint_refs()] == [1e-3, 2e-3, 3e-3]


def test_checkpoint_without_lr_metric_is_refused_unless_a_default_is_given(sqlite_store, tmp_path):
    from tracin_tasks.exceptions import LearningRateError

    experiment_id = sqlite_store.new_experiment("nolr")
    model = build_mlp(hidden=8)
    with mlflow_target(sqlite_store.uri), mlflow.start_run(experiment_id=experiment_id) as run:
        for e in (1, 3):
            torch.save(model.state_dict(), tmp_path / f"epoch_{e}.pt")
            mlflow.log_artifact(str(tmp_path / f"epoch_{e}.pt"), "ckpt")
        mlflow.log_metric("lr", 0.25, step=1)  # nothing at step 3
    strict = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, cache_dir=tmp_path / "cache")
    with pytest.raises(LearningRateError) as info:
        strict.checkpoint_refs()
    assert "steps [3]" in str(info.value) and "default_learning_rate=1.0" in str(info.value)
    # only the selected checkpoints need a learning rate
    assert [r.step for r in tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, steps=[1],
                                                        cache_dir=tmp_path / "cache").checkpoint_refs()] == [1]
    source = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, cache_dir=tmp_path / "cache",
                                       default_learning_rate=1.0)
    refs = source.checkpoint_refs()
    assert [(r.step, r.learning_rate, r.lr_source) for r in refs] == [(1, 0.25, "metric"), (3, 1.0, "default")]
    assert len(source.warnings) == 1
    assert "steps [3]" in source.warnings[0] and "'lr'" in source.warnings[0] and "=1" in source.warnings[0]
    assert [c.learning_rate for c in source.checkpoints()] == [0.25, 1.0]


# -- LoggedModels -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def logged_model_runs(sqlite_store, small_digits):
    """One run with pt2 LoggedModels at steps 3, 1, 2 (logged in that order), one with a pickle one."""
    experiment_id = sqlite_store.new_experiment("loggedmodels")
    torch.manual_seed(0)
    model = build_mlp(hidden=16)
    example = small_digits.images[:2]
    lrs = {1: 0.2, 2: 0.1, 3: 0.05}
    weights, model_ids = {}, {}
    with mlflow_target(sqlite_store.uri):
        with mlflow.start_run(experiment_id=experiment_id) as run:
            for step in (3, 1, 2):
                weights[step] = evolve(model, seed=100 + step)
                info = mlflow.pytorch.log_model(model, name="ckpt", step=step, input_example=example,
                                                pip_requirements=["torch"])
                model_ids[step] = info.model_id
                mlflow.log_metric("lr", lrs[step], step=step)
        with mlflow.start_run(experiment_id=experiment_id) as pickled_run:
            pickled_weights = evolve(model, seed=7)
            mlflow.pytorch.log_model(model, name="ckpt", step=1, serialization_format="pickle",
                                     pip_requirements=["torch"])
            mlflow.log_metric("lr", 0.5, step=1)
    return {
        "run_id": run.info.run_id, "lrs": lrs, "weights": weights, "model_ids": model_ids,
        "pickled_run_id": pickled_run.info.run_id, "pickled_weights": pickled_weights,
    }


def test_logged_models_discovered_in_step_order(sqlite_store, logged_model_runs, tmp_path):
    r = logged_model_runs
    source = tm.MlflowCheckpointSource(r["run_id"], sqlite_store.uri, cache_dir=tmp_path / "cache")
    refs = source.checkpoint_refs()
    assert [ref.step for ref in refs] == [1, 2, 3]
    assert [ref.learning_rate for ref in refs] == [r["lrs"][s] for s in (1, 2, 3)]
    assert {ref.lr_source for ref in refs} == {"metric"} and {ref.kind for ref in refs} == {"logged_model"}
    assert [ref.location for ref in refs] == [r["model_ids"][s] for s in (1, 2, 3)]
    assert source.warnings == []


def test_pt2_reader_reads_the_logged_weights(sqlite_store, logged_model_runs, tmp_path):
    """The .pt2 archive MLflow wrote holds exactly the weights at each step (read without unpickling)."""
    r = logged_model_runs
    for step, model_id in r["model_ids"].items():
        location = mlflow.MlflowClient(tracking_uri=sqlite_store.uri).get_logged_model(model_id).artifact_location
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(tmp_path / model_id))
        archives = sorted(Path(local).rglob("*.pt2"))
        assert len(archives) == 1
        _assert_same_weights(read_pt2_state_dict(str(archives[0])), r["weights"][step])


def test_logged_model_weights_equal_state_dict_at_each_step(sqlite_store, logged_model_runs, tmp_path):
    r = logged_model_runs
    source = tm.MlflowCheckpointSource(r["run_id"], sqlite_store.uri, cache_dir=tmp_path / "cache",
                                       model_factory=MLP_FACTORY, model_kwargs={"hidden": 16})
    ckpts = source.checkpoints()
    assert [c.step for c in ckpts] == [1, 2, 3]
    for ckpt in ckpts:
        _assert_same_weights(ckpt.state_dict, r["weights"][ckpt.step])
        assert ckpt.metadata["source"] == f"models:/{r['model_ids'][ckpt.step]}"


def test_pickle_logged_model_refused_by_default(sqlite_store, logged_model_runs, tmp_path):
    r = logged_model_runs
    source = tm.MlflowCheckpointSource(r["pickled_run_id"], sqlite_store.uri, cache_dir=tmp_path / "cache")
    [ref] = source.checkpoint_refs()
    assert (ref.step, ref.learning_rate, ref.kind) == (1, 0.5, "logged_model")
    with pytest.raises(UnsafeCheckpointError, match="pickle") as info:
        source.checkpoints()
    assert "allow_pickle=True" in str(info.value) and ref.location in str(info.value)


def test_pickle_logged_model_loads_with_allow_pickle(sqlite_store, logged_model_runs, tmp_path):
    r = logged_model_runs
    source = tm.MlflowCheckpointSource(r["pickled_run_id"], sqlite_store.uri, cache_dir=tmp_path / "cache",
                                       allow_pickle=True)
    [ckpt] = source.checkpoints()
    _assert_same_weights(ckpt.state_dict, r["pickled_weights"])


# -- selecting checkpoints --------------------------------------------------------------------
@pytest.fixture(scope="module")
def six_step_run(sqlite_store):
    """Helper-logged checkpoints at steps 1..6 (tiny weights)."""
    experiment_id = sqlite_store.new_experiment("select")
    with mlflow_target(sqlite_store.uri), mlflow.start_run(experiment_id=experiment_id) as run:
        for step in range(1, 7):
            tm.log_checkpoint({"w": torch.full((3,), float(step))}, step=step, learning_rate=step / 10)
    return run.info.run_id


@pytest.mark.parametrize(
    "steps, max_checkpoints, expected",
    [
        (None, None, [1, 2, 3, 4, 5, 6]),
        ([2, 5], None, [2, 5]),
        ([5, 2], None, [2, 5]),
        ("every:1", None, [1, 2, 3, 4, 5, 6]),
        ("every:2", None, [2, 4, 6]),  # counted back from the last: the final checkpoint stays
        ("every:4", None, [2, 6]),
        ("every:10", None, [6]),
        (None, 2, [1, 6]),  # first and last
        (None, 1, [6]),
        (None, 6, [1, 2, 3, 4, 5, 6]),
        (None, 10, [1, 2, 3, 4, 5, 6]),
        ("every:2", 2, [2, 6]),
    ],
)
def test_checkpoint_selection(sqlite_store, six_step_run, tmp_path, steps, max_checkpoints, expected):
    source = tm.MlflowCheckpointSource(six_step_run, sqlite_store.uri, steps=steps, max_checkpoints=max_checkpoints,
                                       cache_dir=tmp_path / "cache")
    refs = source.checkpoint_refs()
    assert [r.step for r in refs] == expected
    assert [r.learning_rate for r in refs] == [s / 10 for s in expected]


def test_max_checkpoints_spreads_and_keeps_ends(sqlite_store, six_step_run, tmp_path):
    source = tm.MlflowCheckpointSource(six_step_run, sqlite_store.uri, max_checkpoints=3, cache_dir=tmp_path / "c")
    steps = [r.step for r in source.checkpoint_refs()]
    assert len(steps) == 3 and steps[0] == 1 and steps[-1] == 6 and steps == sorted(steps)


def test_only_selected_checkpoints_are_downloaded(sqlite_store, six_step_run, tmp_path):
    cache = tmp_path / "cache"
    source = tm.MlflowCheckpointSource(six_step_run, sqlite_store.uri, steps=[2, 5], cache_dir=cache)
    ckpts = source.checkpoints()
    assert [float(c.state_dict["w"][0]) for c in ckpts] == [2.0, 5.0]
    downloaded = sorted(p.parent.name for p in cache.rglob("state_dict.pt"))
    assert downloaded == ["step_2", "step_5"]


def test_missing_requested_step_is_named(sqlite_store, six_step_run, tmp_path):
    source = tm.MlflowCheckpointSource(six_step_run, sqlite_store.uri, steps=[2, 7], cache_dir=tmp_path / "c")
    with pytest.raises(NoCheckpointsError, match=r"\[7\]") as info:
        source.checkpoint_refs()
    assert "[1, 2, 3, 4, 5, 6]" in str(info.value)


@pytest.mark.parametrize(
    "kwargs", [{"steps": "every:0"}, {"steps": "every2"}, {"steps": []}, {"steps": ["a"]}, {"max_checkpoints": 0}]
)
def test_bad_selection_settings(kwargs):
    with pytest.raises(ConfigurationError):
        tm.MlflowCheckpointSource("0" * 32, "sqlite:///unused.db", **kwargs)


# -- the digits training run and the download cache -------------------------------------------
def test_digits_run_audit_finds_flipped_labels(digits_run, tmp_path):
    source = tm.MlflowCheckpointSource(digits_run.run_id, digits_run.uri, cache_dir=tmp_path / "cache")
    refs = source.checkpoint_refs()
    assert [r.step for r in refs] == [1, 2, 3]
    cosine = [digits_run.learning_rate * (1 + math.cos(math.pi * (e - 1) / digits_run.epochs)) / 2 for e in (1, 2, 3)]
    np.testing.assert_allclose([r.learning_rate for r in refs], cosine, rtol=1e-9)
    assert {r.lr_source for r in refs} == {"metric"}
    assert all(r.location.startswith("checkpoints/") for r in refs)  # ground_truth/ is never a checkpoint

    data = load_noisy_digits(noise=0.1, seed=0)
    table = source.training_table()
    assert table.fingerprint() == TrainingTable.from_frame(data.frame(), input_shape=(1, 8, 8)).fingerprint()
    scores = TracIn(source.build_model(), source.checkpoints()).self_influence(table.dataset())
    assert recall_at(scores, data.flipped, 0.1) >= 0.4  # ~0.76 observed; chance is 0.1


def test_downloads_happen_once(digits_run, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = tm.MlflowCheckpointSource(digits_run.run_id, digits_run.uri, cache_dir=cache)
    calls = []
    real = first.client.mlflow.download_artifacts

    def counting(run_id, path, dst_path=None):
        calls.append(path)
        return real(run_id, path, dst_path)

    monkeypatch.setattr(first.client.mlflow, "download_artifacts", counting)
    ckpts = first.checkpoints()
    table = first.training_table()
    first.build_model()
    assert sorted(p for p in calls if p.endswith("state_dict.pt")) == [
        f"checkpoints/step_{s}/state_dict.pt" for s in (1, 2, 3)
    ]
    assert "training_data/digits.parquet" in calls
    assert len(calls) == len(set(calls))  # nothing fetched twice, even within one source

    cached = sorted(cache.rglob("*"))
    weights = [p for p in cached if p.name == "state_dict.pt"]
    assert len(weights) == 3
    assert not [p for p in cached if p.name.startswith(".download-")]  # no half-finished downloads left
    mtimes = {p: p.stat().st_mtime_ns for p in cached if p.is_file()}

    second = tm.MlflowCheckpointSource(digits_run.run_id, digits_run.uri, cache_dir=cache)

    def no_network(*args, **kwargs):
        raise AssertionError(f"downloaded again: {args}")

    # only the run's two small spec files are read again (they may be re-logged to fix them)
    specs = ("tracin/training_data.json", "tracin/model_factory.json")
    second_calls = []

    def only_specs(run_id, path, dst_path=None):
        if path not in specs:
            no_network(run_id, path, dst_path)
        second_calls.append(path)
        return real(run_id, path, dst_path)

    monkeypatch.setattr(second.client.mlflow, "download_artifacts", only_specs)
    again = second.checkpoints()
    for a, b in zip(again, ckpts):
        assert a.step == b.step and a.learning_rate == b.learning_rate
        _assert_same_weights(a.state_dict, b.state_dict)
    assert second.training_table().fingerprint() == table.fingerprint()
    assert second.build_model() is not None
    assert sorted(second_calls) == sorted(specs)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # a different cache folder does download again: it is the cache that saved the work
    third = tm.MlflowCheckpointSource(digits_run.run_id, digits_run.uri, cache_dir=tmp_path / "other")
    monkeypatch.setattr(third.client.mlflow, "download_artifacts", no_network)
    with pytest.raises(Exception, match="downloaded again"):
        third.checkpoints()
