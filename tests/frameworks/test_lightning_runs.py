"""Runs written by PyTorch Lightning (``mlflow.pytorch.autolog(checkpoint=True)``, or
``MLFlowLogger(log_model="all")``), with no tracin-tasks call in the training code.

End to end: docs/runs.md's ``my_models.py`` and ``train.py``, run as written against the session's
``mlflow server``, then the doc's ``tracin-tasks audit`` command in a fresh process; its scores
against the core's TracIn over the checkpoint files (read here with a full ``torch.load``: these
are the test's own files) and the rates the StepLR of ``my_models`` gives each epoch by definition.
Around it: the full-checkpoint reader on files whose pickle names code (none of it imported or
constructed) or claims more data than it holds; the learning-rate rule on real Lightning training
with every scheduler it knows, saved at epoch ends and mid-epoch, against the rate each update
used; an ``MLFlowLogger`` run whose rate comes from LearningRateMonitor's metric.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import shlex
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from tracin_tasks.core.weights import read_full_checkpoint  # noqa: E402
from tracin_tasks.exceptions import CheckpointError, ModelTooLargeError, StateDictMismatchError  # noqa: E402
from tracin_tasks.integrations.mlflow.lightning_layout import LightningCheckpoints, rate_in_force  # noqa: E402

from .lightning_models import TinyClassifier  # noqa: E402

FACTORY = "frameworks.lightning_models:build"
PICKLE_SUFFIXES = (".pkl", ".pt", ".pth", ".bin", ".ckpt")


def tiny_rows(n: int = 48, features: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, 3, (n,), generator=g)


def fit(model: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, folder: Path, *, epochs: int = 3,
        batch_size: int = 16, callbacks=(), logger=False, **trainer_kwargs) -> pl.Trainer:
    """``Trainer.fit`` on the rows, 3 batches an epoch, anything it writes under ``folder``."""
    pl.seed_everything(0, verbose=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks), default_root_dir=folder,
                         **trainer_kwargs)
    trainer.fit(model, loader)
    return trainer


class SaveLikeAutolog(pl.Callback):
    """Saves where autolog's callback does (``on_train_epoch_end``) and where a step-frequency
    ``ModelCheckpoint`` does (``on_train_batch_end``), here after each epoch's first batch."""

    def __init__(self, folder: Path):
        self.folder, self.paths = folder, []

    def _save(self, trainer, name: str) -> None:
        path = self.folder / f"{name}-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        self.paths.append(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self._save(trainer, "mid-epoch")

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(trainer, "epoch-end")


# -- the full-checkpoint reader ----------------------------------------------------------------------
SENTINEL_MODULE = '''
from pathlib import Path
MARKER = Path({marker!r})
with MARKER.open("a") as fh:
    fh.write("imported\\n")


class Config:
    def __new__(cls, *args, **kwargs):
        with MARKER.open("a") as fh:
            fh.write("constructed\\n")
        return super().__new__(cls)

    def __init__(self, width=3):
        self.width = width


class Mapping(dict):
    pass


class OpenOnUnpickle:
    """Unpickling this opens a file for writing (the classic payload)."""

    def __reduce__(self):
        return (open, (str(MARKER.with_suffix(".payload")), "w"))

    def __deepcopy__(self, memo):
        return self
'''


def test_a_lightning_checkpoint_is_read_without_importing_or_constructing_what_it_names(tmp_path, monkeypatch):
    name = f"lightning_sentinel_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "sentinel.log"
    (tmp_path / f"{name}.py").write_text(SENTINEL_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))  # importable throughout: a reader that imports would succeed
    sentinel = __import__(name)
    extra = {"config": sentinel.Config(width=5), "mapping": sentinel.Mapping(a=1, b=[2, 3]),
             "payload": sentinel.OpenOnUnpickle()}
    model = TinyClassifier(schedule="step_per_epoch", extra=extra)
    trainer = fit(model, *tiny_rows(), tmp_path / "fit", epochs=2)
    path = tmp_path / "saved.ckpt"
    trainer.save_checkpoint(path)
    marker.unlink()
    del sys.modules[name]

    with pytest.raises(pickle.UnpicklingError):  # the reason this reader exists
        torch.load(path, weights_only=True)
    with torch.device("meta"):
        expected = TinyClassifier().state_dict()
    state, rest = read_full_checkpoint(path, expected=expected)

    assert not marker.exists() and not marker.with_suffix(".payload").exists()
    assert name not in sys.modules
    assert set(state) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(state[key], tensor), key
    hyper = rest["hyper_parameters"]
    assert hyper["extra"] == {"config": None, "mapping": {"a": 1, "b": [2, 3]}, "payload": None}
    assert (hyper["schedule"], hyper["hidden"]) == ("step_per_epoch", 16)
    assert (rest["epoch"], rest["global_step"]) == (2, 6)  # saved after fit: two epochs done
    assert rest["optimizer_states"][0]["param_groups"][0]["lr"] == 0.05  # after the last epoch's step
    assert rest["lr_schedulers"][0]["last_epoch"] == 2 and "state_dict" not in rest
    assert read_full_checkpoint(path, tensors=False)[0] == {}

    # the control: a full unpickle imports the module, constructs the class and runs the payload
    torch.load(path, weights_only=False)
    assert marker.read_text().split() == ["imported", "constructed"] and marker.with_suffix(".payload").exists()


def saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rewrite(data: bytes, change) -> bytes:
    """The zip with each record's bytes passed through ``change(name, bytes)`` (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            new = change(info.filename, src.read(info.filename))
            if new is not None:
                dst.writestr(info.filename, new)
    return out.getvalue()


def declaring(sizes, strides, numel: int, payload: bytes) -> bytes:
    """A Lightning-shaped checkpoint whose one weight declares ``sizes``/``strides`` over a storage of
    ``numel`` float32 elements, ``payload`` stored."""
    from _harness.files import torch_save_declaring

    return torch_save_declaring(sizes, strides, numel, payload, name="net.0.weight",
                                wrap=lambda state: {"state_dict": state, "global_step": 1})


def test_declarations_are_checked_before_anything_is_allocated(tmp_path):
    model = TinyClassifier()
    good = saved_bytes({"state_dict": model.state_dict(), "hyper_parameters": {"lr": 0.2}, "global_step": 3})
    key = "archive/data/0"  # net.0.weight: 16 x 8 float32, 512 bytes
    cases = {
        "short": (rewrite(good, lambda n, b: b[:4] if n == key else b), ModelTooLargeError,
                  "declares a tensor storage of 512 bytes but stores 4 bytes"),
        "missing": (rewrite(good, lambda n, b: None if n == key else b), CheckpointError, "does not hold"),
        "huge": (declaring((100000, 100000), (100000, 1), 1, b"\0" * 4), ModelTooLargeError,
                 "claims more data than it holds"),
        "stride 0": (declaring((100000, 100000), (0, 0), 1, b"\0" * 4), ModelTooLargeError,
                     "claims more data than it holds"),
        "storage": (declaring((2, 2), (2, 1), 25_000_000_000, b"\0" * 16), ModelTooLargeError,
                    "declares a tensor storage of 100,000,000,000 bytes but stores 16"),
        "not a zip": (b"\x80\x02}q\x00.", CheckpointError, "not a readable torch.save file"),
    }
    for case, (data, error, message) in cases.items():
        path = tmp_path / f"{case}.ckpt"
        path.write_bytes(data)
        with pytest.raises(error, match=message):
            read_full_checkpoint(path, tensors=False)

    path = tmp_path / "good.ckpt"
    path.write_bytes(good)
    with pytest.raises(ModelTooLargeError, match="above this audit's ceiling of 100"):
        read_full_checkpoint(path, max_parameters=100)
    with torch.device("meta"):
        other = TinyClassifier(hidden=4).state_dict()
    with pytest.raises(StateDictMismatchError, match=r"net.0.weight: checkpoint \(16, 8\) vs model \(4, 8\)"):
        read_full_checkpoint(path, expected=other, step=3)
    state, rest = read_full_checkpoint(path)
    assert rest == {"hyper_parameters": {"lr": 0.2}, "global_step": 3}
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor)


# -- the learning-rate rule, on real training ---------------------------------------------------------
KNOWN = ["none", "step_per_epoch", "step_per_update", "multistep", "exponential", "cosine_per_update", "linear",
         "constant", "polynomial", "plateau"]


def no_metric():
    return "lr", {}


@pytest.mark.parametrize("schedule", KNOWN)
def test_each_checkpoint_gets_the_rate_of_the_last_update_before_it(schedule, tmp_path):
    model = TinyClassifier(schedule=schedule)
    saver = SaveLikeAutolog(tmp_path)
    fit(model, *tiny_rows(), tmp_path / "fit", callbacks=[saver], enable_checkpointing=False)
    used = model.rates_used  # used[s - 1]: the rate of update s
    assert len(used) == 9 and len(saver.paths) == 6 and (len(set(used)) > 1) == (schedule != "none")
    for path in saver.paths:
        info = read_full_checkpoint(path, tensors=False)[1]
        rate, source, how = rate_in_force(info, no_metric)
        expected = used[info["global_step"] - 1]
        assert math.isclose(rate, expected, rel_tol=1e-9), (path.name, rate, expected, how)
        assert source in ("optimizer state", "scheduler state"), how
    epoch_end = [p for p in saver.paths if p.name.startswith("epoch-end")]
    saved = [read_full_checkpoint(p, tensors=False)[1]["optimizer_states"][0]["param_groups"][0]["lr"]
             for p in epoch_end]
    if schedule in ("step_per_epoch", "exponential", "multistep"):  # the saved rate is the next epoch's
        assert saved == [used[3], used[6], saved[-1]] and saved[:2] != [used[2], used[5]]


def test_other_schedulers_take_the_rate_from_the_metric_where_it_took_effect(tmp_path):
    model = TinyClassifier(schedule="lambda")
    saver = SaveLikeAutolog(tmp_path)
    fit(model, *tiny_rows(), tmp_path / "fit", callbacks=[saver], enable_checkpointing=False)
    used = model.rates_used
    infos = [read_full_checkpoint(p, tensors=False)[1] for p in saver.paths]
    for path, info in zip(saver.paths, infos):
        rate, source, how = rate_in_force(info, no_metric)
        if path.name.startswith("mid-epoch"):  # no scheduler step since the epoch began: the saved rate holds
            assert source == "optimizer state" and rate == used[info["global_step"] - 1], how
        else:
            assert source == "missing" and math.isnan(rate) and "no closed form" in how, how
    # LearningRateMonitor logs a once-an-epoch rate at each epoch's first step (0, 3, 6): held between
    epoch_starts = {0: used[0], 3: used[3], 6: used[6]}
    for path, info in zip(saver.paths, infos):
        rate, source, how = rate_in_force(info, lambda: ("lr-SGD", epoch_starts))
        assert rate == used[info["global_step"] - 1], how
        assert source == ("optimizer state" if path.name.startswith("mid-epoch") else "metric"), how
    # a metric at every step is read at global_step - 1
    every = dict(enumerate(used))
    assert {rate_in_force(i, lambda: ("lr", every))[0] for i in infos} == {used[i["global_step"] - 1] for i in infos}


def test_a_rate_between_logged_points_of_a_per_update_schedule_is_interpolated():
    info = {"global_step": 6, "epoch": 1, "optimizer_states": [{"param_groups": [{"lr": 0.5}]}],
            "lr_schedulers": [{"lr_lambdas": [None], "base_lrs": [1.0], "last_epoch": 6, "_last_lr": [0.5]}]}
    rate, source, how = rate_in_force(info, lambda: ("lr", {0: 1.0, 10: 0.0}))
    assert source == "metric" and math.isclose(rate, 0.5) and "interpolated between steps 0 and 10" in how
    weights_only = {"global_step": 6, "epoch": 1}
    assert rate_in_force(weights_only, no_metric)[1] == "missing"
    assert rate_in_force(weights_only, lambda: ("lr", {0: 1.0, 10: 0.0}))[0] == 0.5
    no_rate = {**info, "optimizer_states": [{"param_groups": [{"momentum": 0.9}]}]}
    rate, source, how = rate_in_force(no_rate, no_metric)
    assert source == "missing" and math.isnan(rate) and "holds no learning rate" in how


class LocalRun:
    """The parts of a run the layout reads (layouts.RunFiles), over files in a folder."""

    run_id, artifact_path, allow_pickle, lr_metric = "0123456789abcdef", None, False, "lr"

    def __init__(self, root: Path):
        self.root, self.downloaded = root, []

    def list(self, path):
        folder = self.root / (path or "")
        return [SimpleNamespace(path=str(p.relative_to(self.root)), is_dir=p.is_dir(), file_size=None)
                for p in sorted(folder.iterdir())]

    def download(self, path, model_id=None):
        assert model_id is None, "no LoggedModel is read"
        self.downloaded.append(path)
        return str(self.root / path)

    def lr_history(self):
        return {}

    def run(self):
        return SimpleNamespace(data=SimpleNamespace(metrics={}))


def test_the_layout_finds_autolog_and_logger_files_once_per_step(tmp_path):
    def put(rel: str, step: int, data: bytes | None = None) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data or saved_bytes({"state_dict": TinyClassifier().state_dict(), "global_step": step,
                                              "epoch": 0, "optimizer_states": [{"param_groups": [{"lr": 0.1}]}]}))

    put("checkpoints/epoch_0/checkpoint.pth", 10)
    (tmp_path / "checkpoints/epoch_0/checkpoint_metrics.json").write_text("{}")
    put("checkpoints/stray/checkpoint.pth", 99, b"not read: no checkpoint_metrics.json beside it")
    put("epoch=1-step=20/epoch=1-step=20.ckpt", 20)
    put("last/last.ckpt", 20)
    put("restored_model_checkpoint/epoch=1-step=20.ckpt", 20)
    put("tracin/x.ckpt", 30, b"the tracin folder is not searched")
    run = LocalRun(tmp_path)
    refs = sorted(LightningCheckpoints().find(run), key=lambda r: r.step)
    assert [(r.step, r.location, r.learning_rate, r.lr_source, r.kind) for r in refs] == [
        (10, "checkpoints/epoch_0/checkpoint.pth", 0.1, "optimizer state", "lightning"),
        (20, "epoch=1-step=20/epoch=1-step=20.ckpt", 0.1, "optimizer state", "lightning")]
    assert not any("stray" in p or p.startswith("tracin") for p in run.downloaded)
    state = LightningCheckpoints().read(run, refs[1], {"expected": None, "max_parameters": 10_000, "step": 20,
                                                      "model_name": "m", "what": "w"})
    assert set(state) == set(TinyClassifier().state_dict())

    put("epoch=2-step=30/epoch=2-step=30.ckpt", 30, saved_bytes({"state_dict": TinyClassifier().state_dict()}))
    with pytest.raises(CheckpointError, match="has no global_step.*--artifact-path"):
        LightningCheckpoints().find(LocalRun(tmp_path))


def test_a_run_without_lightning_files_is_left_to_the_other_layouts(tmp_path):
    (tmp_path / "checkpoints" / "epoch_1").mkdir(parents=True)
    torch.save(TinyClassifier().state_dict(), tmp_path / "checkpoints" / "epoch_1" / "state_dict.pth")
    assert LightningCheckpoints().find(LocalRun(tmp_path)) == []


# -- MLFlowLogger(log_model="all"), in this process ---------------------------------------------------
def test_an_mlflow_logger_run_is_audited_with_the_rate_its_monitor_logged(mlflow_server, tmp_path, support):
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import MLFlowLogger

    from tracin_tasks import Checkpoint, TracIn
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    x, y = tiny_rows()
    rows = pd.DataFrame(x.numpy(), columns=[f"f{i}" for i in range(8)])
    rows.insert(0, "row_id", [f"r{i}" for i in range(len(rows))])
    rows["label"] = y.numpy()
    rows.to_parquet(tmp_path / "rows.parquet", index=False)
    logger = MLFlowLogger(experiment_name=f"lightning-logger-{uuid.uuid4().hex[:8]}", tracking_uri=mlflow_server.uri,
                          log_model="all")
    model = TinyClassifier(schedule="lambda")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    with support.one_torch_thread():
        fit(model, x, y, tmp_path / "fit", logger=logger, callbacks=[saver, LearningRateMonitor()])

    client = logger.experiment
    names = sorted(f.path for f in client.list_artifacts(logger.run_id))
    assert names == ["epoch=0-step=3", "epoch=1-step=6", "epoch=2-step=9"]
    assert sorted(f.path.rsplit("/", 1)[1] for f in client.list_artifacts(logger.run_id, names[0])) == [
        "aliases.txt", "epoch=0-step=3.ckpt", "metadata.yaml"]
    run = client.get_run(logger.run_id)
    assert "lr-SGD" in run.data.metrics and not run.outputs.model_outputs

    source = MlflowCheckpointSource(logger.run_id, mlflow_server.uri, model_factory=FACTORY,
                                    model_kwargs={"schedule": "lambda"}, training_data=tmp_path / "rows.parquet",
                                    cache_dir=tmp_path / "cache")
    used = model.rates_used
    refs = source.checkpoint_refs()
    assert [(r.step, r.learning_rate, r.lr_source) for r in refs] == [(s, used[s - 1], "metric") for s in (3, 6, 9)]
    assert all("'lr-SGD' metric" in r.metadata["learning_rate_from"] for r in refs)
    table = source.training_table()
    with support.one_torch_thread():
        scores = TracIn(source.build_model(), source.checkpoints()).self_influence(table.dataset())
        oracle = [Checkpoint(state_dict=torch.load(tmp_path / "ckpt" / f"epoch={e}-step={s}.ckpt",
                                                   weights_only=False)["state_dict"], learning_rate=used[s - 1], step=s)
                  for e, s in enumerate((3, 6, 9))]  # the test's own files: a full torch.load
        expected = TracIn(TinyClassifier(), oracle).self_influence(torch.utils.data.TensorDataset(x, y))
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


# -- end to end: docs/runs.md's training script, MLflow's autologging, the CLI -------------------------
@pytest.fixture(scope="module")
def autolog_run(mlflow_server, support, tmp_path_factory):
    """docs/runs.md's Lightning model and training script, run as written in a fresh process."""
    from _harness.snippets import snippet
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("lightning")
    work = root / "work"
    work.mkdir()
    (work / "my_models.py").write_text(snippet("runs.md", "Lightning", 0))
    (work / "train.py").write_text(snippet("runs.md", "Lightning", 1))
    experiment = f"lightning-autolog-{uuid.uuid4().hex[:8]}"
    # the final LoggedModel's pip requirements: MLflow infers them in a child Python unless cut short
    env = support.subprocess_env(root / "state", make_dirs=True, MLFLOW_TRACKING_URI=mlflow_server.uri,
                                 MLFLOW_EXPERIMENT_NAME=experiment, MLFLOW_REQUIREMENTS_INFERENCE_TIMEOUT="1")
    with open(root / "train.log", "wb") as log:
        done = subprocess.run([sys.executable, "train.py"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=600)
    assert done.returncode == 0, support.tail(root / "train.log")
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert f"run id: {run.info.run_id}" in (root / "train.log").read_text()
    return SimpleNamespace(run_id=run.info.run_id, uri=mlflow_server.uri, work=work, root=root, client=client)


@pytest.fixture(scope="module")
def cli_audit(autolog_run, support, prefect_api):
    """docs/runs.md's ``tracin-tasks audit`` command, in a fresh process from the training folder."""
    from _harness.snippets import snippet

    command = snippet("runs.md", "Lightning", 0, language="bash").replace("\\\n", " ")
    args = shlex.split(command.replace("<RUN_ID>", autolog_run.run_id)
                       .replace("http://mlflow.internal:5000", autolog_run.uri))
    assert args[:2] == ["PYTHONPATH=.", "tracin-tasks"], args
    out = autolog_run.root / "audit-out"
    args = [out.as_posix() if previous == "--output" else a for previous, a in zip([None, *args], args)]
    root = autolog_run.root / "audit"
    # the session's Prefect server (tests/flows covers the CLI's own temporary server)
    env = support.subprocess_env(root / "state", make_dirs=True, PREFECT_API_URL=prefect_api)
    env["PYTHONPATH"] = os.pathsep.join([str(autolog_run.work), env["PYTHONPATH"]])  # the doc's PYTHONPATH=.
    proc = support.start_cli([*args[2:], "--no-validate", "--no-mlflow-report"], env, root, cwd=autolog_run.work)
    started = time.monotonic()
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            support.stop_process(proc, group=True)
    print(f"\nLightning run: CLI audit took {time.monotonic() - started:.1f} s")  # for the record, not asserted
    stdout, stderr = support.cli_output(root)
    return SimpleNamespace(code=proc.returncode, stdout=stdout, stderr=stderr, out=out, args=args,
                           cache=Path(env["TRACIN_TASKS_CACHE_DIR"]))


def test_the_autolog_run_holds_epoch_checkpoints_and_a_pickled_final_model(autolog_run):
    client, run_id = autolog_run.client, autolog_run.run_id
    assert sorted(f.path for f in client.list_artifacts(run_id)) == ["checkpoints", "model_summary.txt"]
    folders = sorted(f.path for f in client.list_artifacts(run_id, "checkpoints"))
    assert folders == [f"checkpoints/epoch_{e}" for e in range(6)]
    assert sorted(f.path for f in client.list_artifacts(run_id, folders[0])) == [
        "checkpoints/epoch_0/checkpoint.pth", "checkpoints/epoch_0/checkpoint_metrics.json"]
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.latest_checkpoint_artifact"] == "checkpoints/epoch_5/checkpoint.pth"
    assert not [m for m in run.data.metrics if "lr" in m.lower()]  # no learning-rate metric at all
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "model" and output.step == 0
    assert "data/model.pth" in [f.path for f in client.list_logged_model_artifacts(output.model_id, "data")]


def oracle(autolog_run):
    """TracIn by the core over the run's checkpoint files, read with a full torch.load (the test's
    own files), each weighted by the rate my_models' StepLR gives its epoch by definition."""
    sys.path.insert(0, str(autolog_run.work))
    try:
        from my_models import DigitsClassifier, Schedule
    finally:
        sys.path.remove(str(autolog_run.work))
    from tracin_tasks import Checkpoint, TracIn

    folder = autolog_run.root / "oracle"
    schedule, checkpoints = Schedule(), []
    for epoch in range(6):
        path = autolog_run.client.download_artifacts(autolog_run.run_id, f"checkpoints/epoch_{epoch}/checkpoint.pth",
                                                     str(folder / str(epoch)))
        saved = torch.load(path, weights_only=False)
        assert saved["epoch"] == epoch
        lr = schedule.lr * schedule.gamma ** (epoch // schedule.step_size)  # the rate epoch `epoch` ran at
        checkpoints.append(Checkpoint(state_dict=saved["state_dict"], learning_rate=lr, step=saved["global_step"]))
    rows = pd.read_parquet(autolog_run.work / "rows.parquet")
    x = torch.tensor(rows.filter(like="px").to_numpy())
    labels = torch.tensor(rows["label"].to_numpy())
    model = DigitsClassifier(hidden=2048)
    scores = TracIn(model, checkpoints).self_influence(torch.utils.data.TensorDataset(x, labels))
    model.load_state_dict(checkpoints[-1].state_dict)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    final_loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()
    return np.asarray(scores), final_loss, list(rows["row_id"]), checkpoints


def test_cli_audit_of_an_autolog_run_equals_tracin_on_its_files(autolog_run, cli_audit, support):
    assert cli_audit.code == 0, f"stdout:\n{cli_audit.stdout[-3000:]}\nstderr:\n{cli_audit.stderr[-5000:]}"
    with support.one_torch_thread():
        scores, final_loss, row_ids, checkpoints = oracle(autolog_run)
    frame = pd.read_parquet(cli_audit.out / "scores.parquet")
    assert len(frame) == len(row_ids) == 200 and frame["row_id"].tolist() == row_ids
    np.testing.assert_allclose(frame["self_influence"].to_numpy(), scores, rtol=1e-6)

    # the rates the audit found are the ones each epoch ran at: the saved (next) rate undone
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    source = MlflowCheckpointSource(autolog_run.run_id, autolog_run.uri, cache_dir=autolog_run.root / "refs-cache")
    assert [(r.step, r.learning_rate, r.lr_source) for r in source.checkpoint_refs()] == [
        (c.step, c.learning_rate, "scheduler state") for c in checkpoints]
    assert [c.step for c in checkpoints] == [100, 200, 300, 400, 500, 600]

    # only the six checkpoint files came down; the pickled LoggedModel stayed on the server, and the
    # checkpoints' pickled Schedule is what weights_only refuses (read without constructing it)
    cached = sorted(p.relative_to(cli_audit.cache).as_posix() for p in cli_audit.cache.rglob("*") if p.is_file())
    assert [c.split(autolog_run.run_id + "/", 1)[1] for c in cached] == [
        f"checkpoints/epoch_{e}/checkpoint.pth" for e in range(6)]
    assert not [c for c in cached if "/models/" in c]
    with pytest.raises(pickle.UnpicklingError, match="my_models.Schedule"):
        torch.load(cli_audit.cache / cached[0], weights_only=True)
    assert "allow_pickle=True" not in cli_audit.stdout + cli_audit.stderr

    # the flips stand out in TracIn more than in the final loss of a run that fits most labels
    flipped = set(pd.read_csv(autolog_run.work / "flips.csv")["row_id"])
    k = len(flipped)
    top = set(frame.sort_values("self_influence", ascending=False, kind="stable")["row_id"].head(k))
    by_loss = {row_ids[i] for i in np.argsort(-final_loss, kind="stable")[:k]}
    recall, baseline = len(top & flipped) / k, len(by_loss & flipped) / k
    print(f"\nLightning run: recall of the {k} flips in the top {k}: TracIn {recall:.2f}, final loss {baseline:.2f}")
    assert k == 20 and recall >= 0.8 and recall > baseline, (recall, baseline)
