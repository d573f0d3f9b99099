"""Every way an MLflow-backed audit can go wrong raises the tracin-tasks error that names it."""

from __future__ import annotations

import pickle
import time

import mlflow
import pytest
import torch

import tracin_tasks.mlflow as tm
from tracin_tasks import TracIn
from tracin_tasks.exceptions import (
    CheckpointError,
    ModelFactoryError,
    NoCheckpointsError,
    RunNotFoundError,
    StateDictMismatchError,
    TracInError,
    TrackingServerUnavailableError,
    TrainingDataError,
    UnsafeCheckpointError,
)
from tracin_tasks.examples.digits import build_mlp
from tracin_tasks.integrations.mlflow.cache import safe_relpath
from tracin_tasks.integrations.mlflow.layouts import CheckpointRef

from _harness import free_port, mlflow_target

from ._support import MLP_FACTORY

MISSING_RUN = "0123456789abcdef0123456789abcdef"


class NotAWeight:
    """A custom object; pickling it into a checkpoint makes the file need unpickling."""

    def __init__(self, note: str = "hello"):
        self.note = note


def _new_run(store, prefix):
    """Start a run in a fresh experiment of ``store`` (use inside ``mlflow_target``)."""
    return mlflow.start_run(experiment_id=store.new_experiment(prefix))


# -- the run -------------------------------------------------------------------------------------
@pytest.mark.parametrize("store", ["sqlite", "server"], indirect=True)
def test_unknown_run_id(store, tmp_path):
    source = tm.MlflowCheckpointSource(MISSING_RUN, store.uri, cache_dir=tmp_path / "c", retries=2, backoff=0.1)
    with pytest.raises(RunNotFoundError) as info:
        source.checkpoint_refs()
    assert MISSING_RUN in str(info.value) and store.uri in str(info.value)
    assert isinstance(info.value, LookupError) and isinstance(info.value, TracInError)


def test_run_without_checkpoints(sqlite_store, small_digits, tmp_path):
    with mlflow_target(sqlite_store.uri), _new_run(sqlite_store, "nockpt") as run:
        tm.log_training_data(small_digits.frame, input_shape=(1, 8, 8))
        tm.log_model_factory(MLP_FACTORY)
        mlflow.log_metric("lr", 0.1, step=1)
    source = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(NoCheckpointsError, match="has no checkpoints") as info:
        source.checkpoints()
    assert run.info.run_id in str(info.value) and "log_checkpoint" in str(info.value)
    # the training data is there, and it is not mistaken for a checkpoint
    assert len(source.training_table()) == len(small_digits.labels)


def test_artifact_path_without_checkpoints(sqlite_store, tmp_path):
    with mlflow_target(sqlite_store.uri), _new_run(sqlite_store, "artpath") as run:
        tm.log_checkpoint({"w": torch.zeros(2)}, step=1, learning_rate=0.1)
    source = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, artifact_path="elsewhere",
                                       cache_dir=tmp_path / "c")
    with pytest.raises(NoCheckpointsError, match="'elsewhere'"):
        source.checkpoint_refs()


def test_ambiguous_weight_files_for_one_step(sqlite_store, tmp_path):
    with mlflow_target(sqlite_store.uri), _new_run(sqlite_store, "ambiguous") as run:
        for sub in ("ema", "raw"):
            (tmp_path / sub).mkdir()
            torch.save({"w": torch.zeros(2)}, tmp_path / sub / "epoch_1.pt")
            mlflow.log_artifact(str(tmp_path / sub / "epoch_1.pt"), f"ckpt/{sub}")
    source = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(CheckpointError, match="several weight files for step 1") as info:
        source.checkpoint_refs()
    assert "artifact_path=" in str(info.value)
    only_ema = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, artifact_path="ckpt/ema",
                                         cache_dir=tmp_path / "c", default_learning_rate=1.0)  # no lr logged
    assert [r.location for r in only_ema.checkpoint_refs()] == ["ckpt/ema/epoch_1.pt"]


# -- the model -----------------------------------------------------------------------------------
def test_checkpoint_keys_do_not_fit_the_model(sqlite_store, tmp_path):
    with mlflow_target(sqlite_store.uri), _new_run(sqlite_store, "mismatch") as run:
        tm.log_model_factory(MLP_FACTORY, hidden=8)
        tm.log_checkpoint({"fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10)}, step=1, learning_rate=0.1)
    source = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(StateDictMismatchError) as info:
        TracIn(source.build_model(), source.checkpoints())
    message = str(info.value)
    assert "missing keys" in message and "'1.weight'" in message
    assert "unexpected keys" in message and "'fc.weight'" in message
    assert "step 1" in message
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, KeyError)


def test_checkpoint_shapes_do_not_fit_the_model(sqlite_store, tmp_path):
    with mlflow_target(sqlite_store.uri), _new_run(sqlite_store, "shapes") as run:
        tm.log_model_factory(MLP_FACTORY)  # hidden=128
        tm.log_checkpoint(build_mlp(hidden=8), step=2, learning_rate=0.1)
    source = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(StateDictMismatchError, match="shape mismatches") as info:
        TracIn(source.build_model(), source.checkpoints())
    assert "1.weight: checkpoint (8, 64) vs model (128, 64)" in str(info.value)


@pytest.mark.parametrize(
    "factory, kwargs, expected",
    [
        ("tracin_tasks.no_such_module:build", {}, "Cannot import 'tracin_tasks.no_such_module'"),
        ("tracin_tasks.examples.digits:no_such_factory", {}, "has no attribute 'no_such_factory'"),
        ("tracin_tasks.examples.digits.build_mlp", {}, "not of the form 'package.module:function'"),
        (MLP_FACTORY, {"bogus": 1}, "failed"),
        ("builtins:dict", {}, "returned a dict, not an nn.Module"),
    ],
)
def test_bad_factory_override(factory, kwargs, expected, tmp_path):
    source = tm.MlflowCheckpointSource(MISSING_RUN, "sqlite:///unused.db", model_factory=factory,
                                       model_kwargs=kwargs, cache_dir=tmp_path / "c")
    with pytest.raises(ModelFactoryError) as info:
        source.build_model()
    assert expected in str(info.value)
    assert isinstance(info.value, ImportError)


def test_logged_factory_that_does_not_import(sqlite_store, tmp_path):
    with mlflow_target(sqlite_store.uri), _new_run(sqlite_store, "badfactory") as run:
        tm.log_model_factory("no_such_pkg_xyz.models:build_net", width=3)
    source = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(ModelFactoryError, match="no_such_pkg_xyz"):
        source.build_model()


def test_run_without_factory(sqlite_store, tmp_path):
    with mlflow_target(sqlite_store.uri), _new_run(sqlite_store, "nofactory") as run:
        tm.log_checkpoint({"w": torch.zeros(2)}, step=1, learning_rate=0.1)
    source = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(ModelFactoryError, match="does not say how to build its model") as info:
        source.build_model()
    assert "model_factory=" in str(info.value)


def test_log_model_factory_rejects_malformed_path(sqlite_store):
    with mlflow_target(sqlite_store.uri), _new_run(sqlite_store, "malformed"):
        with pytest.raises(ModelFactoryError, match="not of the form"):
            tm.log_model_factory("build_mlp")


# -- training data -------------------------------------------------------------------------------
def test_missing_training_data(sqlite_store, tmp_path):
    with mlflow_target(sqlite_store.uri), _new_run(sqlite_store, "nodata") as run:
        tm.log_checkpoint({"w": torch.zeros(2)}, step=1, learning_rate=0.1)
    source = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(TrainingDataError, match="no training data") as info:
        source.training_table()
    assert run.info.run_id in str(info.value) and "log_training_data" in str(info.value)


def test_corrupt_training_parquet(sqlite_store, small_digits, tmp_path):
    with mlflow_target(sqlite_store.uri), _new_run(sqlite_store, "corrupt") as run:
        tm.log_training_data(small_digits.frame, input_shape=(1, 8, 8), name="train")
        garbage = tmp_path / "train.parquet"
        garbage.write_bytes(b"this is not parquet" * 50)
        mlflow.log_artifact(str(garbage), "training_data")  # replaces the good file at the spec's path
    source = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(TrainingDataError, match="not a readable parquet file") as info:
        source.training_table()
    assert "training_data/train.parquet" in str(info.value)


def test_spec_pointing_at_missing_parquet(sqlite_store, tmp_path):
    with mlflow_target(sqlite_store.uri), _new_run(sqlite_store, "specmissing") as run:
        mlflow.log_dict({"artifact_path": "training_data/gone.parquet", "label_column": "label",
                         "row_id_column": "row_id"}, "tracin/training_data.json")
    source = tm.MlflowCheckpointSource(run.info.run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(TrainingDataError, match="cannot be downloaded") as info:
        source.training_table()
    assert "training_data/gone.parquet" in str(info.value)


# -- the tracking server -------------------------------------------------------------------------
def test_tracking_server_that_does_not_answer(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there
    source = tm.MlflowCheckpointSource(MISSING_RUN, uri, retries=2, backoff=0.1, cache_dir=tmp_path / "c")
    start = time.monotonic()
    with pytest.raises(TrackingServerUnavailableError) as info:
        source.checkpoints()
    elapsed = time.monotonic() - start
    assert elapsed < 30
    assert uri in str(info.value) and "2 attempts" in str(info.value)
    assert isinstance(info.value, ConnectionError)


# -- unsafe and unreadable checkpoint files ------------------------------------------------------
def _plain_run(store, tmp_path, payload, name="epoch_1.pt"):
    with mlflow_target(store.uri), _new_run(store, "plainfile") as run:
        path = tmp_path / name
        if isinstance(payload, bytes):
            path.write_bytes(payload)
        else:
            torch.save(payload, path)
        mlflow.log_artifact(str(path), "ckpt")
        mlflow.log_metric("lr", 0.1, step=1)
    return run.info.run_id


def test_checkpoint_with_pickled_custom_object(sqlite_store, tmp_path):
    sd = build_mlp(hidden=8).state_dict()
    run_id = _plain_run(sqlite_store, tmp_path, {"state_dict": sd, "extra": NotAWeight()})
    source = tm.MlflowCheckpointSource(run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(UnsafeCheckpointError) as info:
        source.checkpoints()
    assert "allow_pickle=True" in str(info.value) and "epoch_1.pt" in str(info.value)

    trusting = tm.MlflowCheckpointSource(run_id, sqlite_store.uri, cache_dir=tmp_path / "c", allow_pickle=True)
    [ckpt] = trusting.checkpoints()
    assert set(ckpt.state_dict) == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(ckpt.state_dict[k], v, rtol=0, atol=0)


def test_checkpoint_holding_a_whole_module(sqlite_store, tmp_path):
    model = build_mlp(hidden=8)
    run_id = _plain_run(sqlite_store, tmp_path, model)
    source = tm.MlflowCheckpointSource(run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        source.checkpoints()
    trusting = tm.MlflowCheckpointSource(run_id, sqlite_store.uri, cache_dir=tmp_path / "c", allow_pickle=True,
                                         model_factory=MLP_FACTORY, model_kwargs={"hidden": 8})
    [ckpt] = trusting.checkpoints()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ckpt.state_dict[k], v, rtol=0, atol=0)
    TracIn(trusting.build_model(), [ckpt])  # fits the factory's model


def test_garbage_checkpoint_file_is_a_checkpoint_error(sqlite_store, tmp_path):
    run_id = _plain_run(sqlite_store, tmp_path, b"definitely not a torch file" * 20)
    source = tm.MlflowCheckpointSource(run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(CheckpointError, match="epoch_1.pt"):
        source.checkpoints()


def test_garbage_checkpoint_file_with_allow_pickle_is_a_checkpoint_error(sqlite_store, tmp_path):
    run_id = _plain_run(sqlite_store, tmp_path, b"definitely not a torch file" * 20)
    source = tm.MlflowCheckpointSource(run_id, sqlite_store.uri, cache_dir=tmp_path / "c", allow_pickle=True)
    with pytest.raises(CheckpointError, match="epoch_1.pt"):
        source.checkpoints()


def test_checkpoint_that_is_not_a_state_dict(sqlite_store, tmp_path):
    run_id = _plain_run(sqlite_store, tmp_path, [torch.zeros(2), torch.ones(2)])
    source = tm.MlflowCheckpointSource(run_id, sqlite_store.uri, cache_dir=tmp_path / "c")
    with pytest.raises(CheckpointError, match="holds a list, not a state_dict"):
        source.checkpoints()


# -- artifact paths that would leave the cache ---------------------------------------------------
@pytest.mark.parametrize("path", ["../x.pt", "ckpt/../../x.pt", "ckpt/..", "/etc/passwd", "", "..\\..\\x.pt"])
def test_safe_relpath_refuses_escapes(path):
    with pytest.raises(CheckpointError, match="Refusing artifact path"):
        safe_relpath(path)


@pytest.mark.parametrize("path, expected", [("ckpt/epoch_1.pt", "ckpt/epoch_1.pt"), ("a//b/./c.pt", "a/b/c.pt")])
def test_safe_relpath_keeps_plain_paths(path, expected):
    assert safe_relpath(path) == expected


def test_dotdot_in_artifact_path_or_checkpoint_location(tmp_path):
    with pytest.raises(CheckpointError, match=r"'\.\./ckpt'"):
        tm.MlflowCheckpointSource(MISSING_RUN, "sqlite:///unused.db", artifact_path="../ckpt")

    cache = tmp_path / "nested" / "cache"
    source = tm.MlflowCheckpointSource(MISSING_RUN, "sqlite:///unused.db", cache_dir=cache)
    ref = CheckpointRef(step=1, learning_rate=0.1, lr_source="metric", kind="artifact",
                        location="ckpt/../../../../escaped.pt")
    with pytest.raises(CheckpointError, match="without '..'"):
        source.fetch(ref)
    assert not (tmp_path / "escaped.pt").exists()
    assert not cache.exists()  # refused before anything was created or downloaded
