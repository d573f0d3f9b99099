"""Runs written by the Hugging Face ``Trainer`` (``report_to=["mlflow"]``, ``HF_MLFLOW_LOG_ARTIFACTS=1``),
with no tracin-tasks call in the training code.

End to end: docs/runs.md's training script, run as written against the session's ``mlflow server``,
then ``tracin-tasks audit`` in a fresh process; its scores against the core's TracIn over the
safetensors files and learning rates the Trainer wrote (read here with the ``safetensors`` package
and ``trainer_state.json``, not through the audit's readers). Around it: the safetensors reader on
crafted headers, the config builder on configs asking for code, and the learning-rate rule on
schedules whose every rate is known.
"""

from __future__ import annotations

import json
import time
import math
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from _harness import one_torch_thread

import tracin_tasks.integrations.mlflow.hf_layout  # noqa: F401  (registers the layout in this process)
from tracin_tasks.core.safetensors_file import MAX_HEADER_BYTES, read_safetensors_file, tied_names
from tracin_tasks.exceptions import (
    CheckpointError,
    ModelFactoryError,
    ModelTooLargeError,
    StateDictMismatchError,
    UntrustedModelFactoryError,
)
from tracin_tasks.integrations.mlflow.hf_layout import HuggingFaceCheckpoints

transformers = pytest.importorskip("transformers")

PICKLE_SUFFIXES = (".pkl", ".pt", ".pth", ".bin")
SLOW_PATH_WARNINGS = ("generic torch.func path", "per-row loop")


def tiny_bert_config(**extra):
    return transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, max_position_embeddings=16, **extra)


def meta_state(model_class, config):
    with torch.device("meta"):
        return model_class(config).state_dict()


def write_safetensors(path: Path, header: dict, data: bytes = b"", header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


# -- the safetensors reader -------------------------------------------------------------------------
def test_reader_gives_what_safetensors_gives_and_fills_the_weights_the_model_ties(tmp_path):
    from safetensors.torch import load_file

    config = tiny_bert_config()
    model = transformers.BertForMaskedLM(config)  # decoder weight tied to the word embeddings
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    stored = load_file(path)
    expected = meta_state(transformers.BertForMaskedLM, config)
    assert "cls.predictions.decoder.weight" in expected and "cls.predictions.decoder.weight" not in stored

    state = read_safetensors_file(path, expected=expected)
    assert set(state) == set(expected)
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor) and state[name].dtype == tensor.dtype
    assert state["cls.predictions.decoder.weight"] is state["bert.embeddings.word_embeddings.weight"]
    rebuilt = transformers.BertForMaskedLM(config)
    rebuilt.load_state_dict(state, strict=True)
    for (name, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_weight_missing_from_the_file_is_filled_only_where_the_model_ties_it(tmp_path):
    from safetensors.torch import save_file

    config = tiny_bert_config(num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    expected = meta_state(transformers.BertForSequenceClassification, config)
    assert tied_names(expected) == {}
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "classifier.weight"}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(StateDictMismatchError, match=r"missing keys \['classifier.weight'\]"):
        read_safetensors_file(tmp_path / "model.safetensors", expected=expected, step=30)


def test_a_shape_other_than_the_models_is_refused_before_reading(tmp_path):
    config = tiny_bert_config(num_labels=3)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    other = meta_state(transformers.BertForSequenceClassification, tiny_bert_config(num_labels=4))
    with pytest.raises(StateDictMismatchError, match=r"classifier.weight: checkpoint \(3, 8\) vs model \(4, 8\)"):
        read_safetensors_file(tmp_path / "model.safetensors", expected=other, step=7, model_name="the model")


def test_a_header_declaring_more_than_the_file_holds_is_refused_unallocated(tmp_path):
    huge = {"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40_000_000_000]}}
    with pytest.raises(ModelTooLargeError, match="claims more data than it holds"):
        read_safetensors_file(write_safetensors(tmp_path / "a.safetensors", huge, b"\0" * 4))
    # offsets inside the file, but a shape far bigger than the 4 bytes they span
    short = {"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 4]}}
    with pytest.raises(ModelTooLargeError, match="claims more data than it holds"):
        read_safetensors_file(write_safetensors(tmp_path / "b.safetensors", short, b"\0" * 4))
    # bytes to spare: damaged, not a memory trick
    loose = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}
    with pytest.raises(CheckpointError, match="must agree exactly"):
        read_safetensors_file(write_safetensors(tmp_path / "c.safetensors", loose, b"\0" * 8))
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(CheckpointError, match="overlapping"):
        read_safetensors_file(write_safetensors(tmp_path / "d.safetensors", overlap, b"\0" * 12))
    odd = {"w": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(CheckpointError, match="dtype 'PICKLE'"):
        read_safetensors_file(write_safetensors(tmp_path / "e.safetensors", odd, b"\0" * 4))


def test_an_over_long_header_is_not_read(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(ModelTooLargeError, match="header of 1,099,511,627,776 bytes"):
        read_safetensors_file(write_safetensors(tmp_path / "a.safetensors", header, b"\0" * 4, header_len=2**40))
    # under the cap but past the end of the file: truncated
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_file(write_safetensors(tmp_path / "b.safetensors", header, b"\0" * 4,
                                                header_len=MAX_HEADER_BYTES - 1))
    (tmp_path / "c.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(CheckpointError, match="too short"):
        read_safetensors_file(tmp_path / "c.safetensors")


def test_the_element_ceiling_applies_before_anything_is_read(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
    path = write_safetensors(tmp_path / "a.safetensors", header, b"\0" * 64)
    with pytest.raises(ModelTooLargeError, match="above this audit's ceiling of 10"):
        read_safetensors_file(path, max_parameters=10)
    assert read_safetensors_file(path, max_parameters=16)["w"].shape == (4, 4)


# -- the model from config.json ---------------------------------------------------------------------
def classifier_config(tmp_path: Path) -> dict:
    transformers.BertForSequenceClassification(tiny_bert_config(num_labels=3)).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_model_from_config_rebuilds_the_architecture_in_float32_on_meta(tmp_path):
    from tracin_tasks.integrations.huggingface import model_from_config

    config = {**classifier_config(tmp_path), "dtype": "bfloat16", "attn_implementation": "flash_attention_2"}
    with torch.device("meta"):
        model = model_from_config(**config)
    assert type(model) is transformers.BertForSequenceClassification
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.num_labels == 3 and model.config._attn_implementation == "eager"
    real = model_from_config(**config)
    real.load_state_dict(read_safetensors_file(tmp_path / "model.safetensors", expected=model.state_dict()))


@pytest.mark.parametrize("change, error, message", [
    ({"auto_map": {"AutoModel": "evil.EvilModel"}}, UntrustedModelFactoryError, r"custom model code \(auto_map\)"),
    ({"text_config": {"auto_map": {"AutoModel": "x.Y"}}}, UntrustedModelFactoryError, r"text_config\.auto_map"),
    ({"architectures": ["os.system"]}, UntrustedModelFactoryError, "not a class name of the transformers package"),
    ({"architectures": ["Popen"]}, UntrustedModelFactoryError, "not a model class of the installed transformers"),
    ({"architectures": ["BertPreTrainedModel"]}, UntrustedModelFactoryError, "not a model class"),
    ({"architectures": ["GPT2LMHeadModel"]}, ModelFactoryError, "inconsistent"),
    ({"model_type": "evil-model"}, ModelFactoryError, "model_type 'evil-model'"),
    ({"architectures": []}, ModelFactoryError, "names no architecture"),
    ({"num_hidden_layers": 10**9}, ModelFactoryError, "num_hidden_layers=1,000,000,000"),
])
def test_model_from_config_refuses_code_it_was_not_built_with(tmp_path, change, error, message):
    from tracin_tasks.integrations.huggingface import model_from_config

    with pytest.raises(error, match=message) as info:
        model_from_config(**{**classifier_config(tmp_path), **change})
    assert "--model-factory" in str(info.value)


def test_a_run_cannot_pass_another_factory_off_as_the_builtin_one():
    from tracin_tasks.integrations.model_factory import ModelSpec

    with pytest.raises(UntrustedModelFactoryError, match="not one of tracin-tasks' own model builders"):
        ModelSpec("os:system", {"command": "true"}, "builtin")


# -- learning rates, on schedules whose every rate is known -------------------------------------------
def rates_used(total: int, warmup: int, base: float) -> dict[int, float]:
    """The rate each update k (1-based) used under the Trainer's default linear schedule with warmup."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
    used = {}
    for k in range(1, total + 1):
        used[k] = sched.get_last_lr()[0]  # what optimizer.step() of update k runs with
        opt.step()
        sched.step()
    return used


class TrainerRun:
    """The parts of a Trainer run this layout reads (see layouts.RunFiles), nothing downloadable."""

    run_id, artifact_path, allow_pickle, lr_metric = "0123456789abcdef", None, False, "lr"

    def __init__(self, saves, logged, *, version="5.25.0", params=None, metric=None, states=True, configs=None,
                 global_steps=None):
        self.saves, self.logged, self.version = saves, logged, version
        self.params, self.metric, self.states = params or {}, metric or {}, states
        self.configs, self.global_steps = configs or {}, global_steps or {}

    def run(self):
        outputs = SimpleNamespace(model_outputs=[SimpleNamespace(model_id=f"m-{s}", step=0) for s in self.saves])
        return SimpleNamespace(outputs=outputs, data=SimpleNamespace(params=self.params))

    def logged_model(self, model_id):
        return SimpleNamespace(model_id=model_id, name=f"checkpoint-{model_id[2:]}", creation_timestamp=0)

    def list_logged_model(self, model_id, path="data"):
        names = ["config.json", "model.safetensors", "optimizer.pt", "scheduler.pt"]
        names += ["trainer_state.json"] if self.states else []
        return [SimpleNamespace(path=f"{path}/{n}", is_dir=False, file_size=100) for n in names]

    def read_json(self, path, model_id=None, max_bytes=0):
        step = int(model_id[2:])
        if path.endswith("config.json"):
            return {"model_type": "bert", "transformers_version": self.version, **self.configs.get(step, {})}
        if not self.states:
            raise CheckpointError(f"{path} does not exist.")
        history = [{"step": s, "learning_rate": lr, "loss": 1.0} for s, lr in self.logged.items() if s <= step]
        return {"global_step": self.global_steps.get(step, step), "max_steps": 200, "log_history": history}

    def metric_history(self, name):
        return dict(self.metric) if name == "learning_rate" else {}

    def lr_history(self):
        return self.metric_history(self.lr_metric)

    def download(self, *args, **kwargs):
        raise AssertionError("finding checkpoints downloads no weights")


LINEAR = {"lr_scheduler_type": "linear", "learning_rate": "0.003", "warmup_steps": "20"}


def test_each_checkpoint_gets_the_rate_of_the_update_that_made_it():
    used = rates_used(200, 20, 3e-3)
    # logged every 8 updates as transformers >= 4.51 logs: the rate update s used, at step s
    logged = {s: used[s] for s in range(8, 201, 8)}
    saves = [16, 23, 50, 130, 200]  # 23: between 16 and 24, across the warmup's peak at update 21
    refs = {r.step: r for r in HuggingFaceCheckpoints().find(TrainerRun(saves, logged, params=LINEAR))}
    assert sorted(refs) == saves
    for step in saves:
        assert math.isclose(refs[step].learning_rate, used[step], rel_tol=1e-9), (step, refs[step], used[step])
    assert {s: refs[s].lr_source for s in saves} == {16: "trainer_state", 23: "interpolated", 50: "interpolated",
                                                    130: "interpolated", 200: "trainer_state"}
    assert {r.kind for r in refs.values()} == {"hf_checkpoint"} and refs[50].location == "m-50"

    # without the params the peak is unknown: interpolating across it is all that is left (and is off)
    plain = {r.step: r for r in HuggingFaceCheckpoints().find(TrainerRun(saves, logged))}
    assert not math.isclose(plain[23].learning_rate, used[23], rel_tol=1e-3)
    assert math.isclose(plain[130].learning_rate, used[130], rel_tol=1e-9)


def test_runs_of_transformers_before_4_51_logged_the_next_rate_and_are_shifted_back():
    used = rates_used(200, 20, 3e-3)
    logged = {s: used[s + 1] for s in range(10, 200, 10)}  # read after the scheduler stepped
    saves = [50, 100, 150]
    refs = HuggingFaceCheckpoints().find(TrainerRun(saves, logged, version="4.48.1", params=LINEAR))
    for ref in refs:
        assert math.isclose(ref.learning_rate, used[ref.step], rel_tol=1e-9), ref
        assert not math.isclose(ref.learning_rate, logged[ref.step], rel_tol=1e-6)


def test_the_metric_stands_in_for_trainer_state_and_nothing_is_extrapolated():
    used = rates_used(200, 20, 3e-3)
    metric = {s: used[s] for s in range(10, 191, 10)}  # the last at 190
    refs = {r.step: r for r in HuggingFaceCheckpoints().find(TrainerRun([100, 185, 200], {}, metric=metric,
                                                                       states=False))}
    assert refs[100].lr_source == "learning_rate metric" and refs[100].learning_rate == used[100]
    assert refs[185].lr_source == "interpolated" and math.isclose(refs[185].learning_rate, used[185], rel_tol=1e-9)
    assert refs[200].lr_source == "missing" and math.isnan(refs[200].learning_rate)


def test_a_checkpoint_whose_trainer_state_names_another_step_is_refused():
    layout = HuggingFaceCheckpoints()
    with pytest.raises(CheckpointError, match="named checkpoint-60 but its trainer_state.json says global_step 70"):
        layout.find(TrainerRun([50, 60], {50: 1e-3, 60: 1e-3}, global_steps={60: 70}))
    # an earlier checkpoint's trainer_state.json is read when that checkpoint is, before its weights
    run = TrainerRun([50, 60], {50: 1e-3, 60: 1e-3}, global_steps={50: 55})
    first = layout.find(run)[0]
    with pytest.raises(CheckpointError, match="named checkpoint-50 but its trainer_state.json says global_step 55"):
        layout.read(run, first, {})


def test_the_model_is_the_last_config_and_every_checkpoint_must_share_it():
    layout = HuggingFaceCheckpoints()
    same = TrainerRun([10, 20], {10: 1e-3, 20: 1e-3}, configs={10: {"hidden_size": 32}, 20: {"hidden_size": 32}})
    spec = layout.model_spec(same, layout.find(same))
    assert (spec.factory, spec.origin) == ("tracin_tasks.integrations.huggingface:model_from_config", "builtin")
    assert spec.kwargs == {"model_type": "bert", "transformers_version": "5.25.0", "hidden_size": 32}
    other = TrainerRun([10, 20], {10: 1e-3, 20: 1e-3}, configs={10: {"hidden_size": 32}, 20: {"hidden_size": 64}})
    with pytest.raises(CheckpointError, match=r"differ in \['hidden_size'\].*--steps"):
        layout.model_spec(other, layout.find(other))


def test_other_logged_models_are_left_to_the_other_layouts():
    run = TrainerRun([10], {10: 1e-3})
    run.logged_model = lambda model_id: SimpleNamespace(model_id=model_id, name="model", creation_timestamp=0)
    assert HuggingFaceCheckpoints().find(run) == []
    # named like a Trainer save, but without its folder (mlflow.pytorch.log_model(name="checkpoint-10", step=10))
    run = TrainerRun([10], {10: 1e-3})
    run.list_logged_model = lambda model_id, path="data": []
    assert HuggingFaceCheckpoints().find(run) == []


def test_trainer_saves_without_safetensors_are_refused_with_what_to_do():
    run = TrainerRun([10], {10: 1e-3})
    run.list_logged_model = lambda model_id, path="data": [
        SimpleNamespace(path=f"{path}/{n}", is_dir=False, file_size=1) for n in ("config.json", "pytorch_model.bin")]
    with pytest.raises(CheckpointError, match=r"none holds model.safetensors.*save_safetensors=True"):
        HuggingFaceCheckpoints().find(run)


# -- end to end: the Trainer, MLflow, the CLI --------------------------------------------------------
@pytest.fixture(scope="module")
def trainer_run(request, support, tmp_path_factory):
    """docs/runs.md's Hugging Face training script, run as written in a fresh process."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (tracin-tasks[frameworks])")
    mlflow_server = request.getfixturevalue("mlflow_server")  # not started when the Trainer cannot run
    from _harness.snippets import snippet
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("hf")
    work = root / "work"
    work.mkdir()
    (root / "train.py").write_text(snippet("runs.md", "Hugging Face"))
    experiment = f"hf-trainer-{uuid.uuid4().hex[:8]}"
    # MLFLOW_REQUIREMENTS_INFERENCE_TIMEOUT: each save is a pyfunc LoggedModel whose pip requirements
    # MLflow infers in a child Python (~6 s a save here); cut short, it logs a default list instead
    env = support.subprocess_env(root / "state", make_dirs=True, MLFLOW_TRACKING_URI=mlflow_server.uri,
                                 MLFLOW_EXPERIMENT_NAME=experiment, MLFLOW_REQUIREMENTS_INFERENCE_TIMEOUT="1",
                                 HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(root / "train.log", "wb") as log:
        done = subprocess.run([sys.executable, str(root / "train.py")], cwd=work, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, support.tail(root / "train.log")
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return SimpleNamespace(run_id=run.info.run_id, uri=mlflow_server.uri, work=work, root=root, client=client)


@pytest.fixture(scope="module")
def cli_audit(trainer_run, support, prefect_api):
    """``tracin-tasks audit`` of the run in a fresh process, its own download cache (on the session's
    Prefect server: tests/flows covers the CLI's own temporary server)."""
    root = trainer_run.root / "audit"
    env = support.subprocess_env(root / "state", make_dirs=True, PREFECT_API_URL=prefect_api)
    out = root / "out"
    proc = support.start_cli(["audit", "--run-id", trainer_run.run_id, "--tracking-uri", trainer_run.uri,
                              "--training-data", str(trainer_run.work / "training-data"), "--label-column", "label",
                              "--row-id-column", "row_id", "--output", str(out), "--no-validate",
                              "--no-mlflow-report"], env, root)
    started = time.monotonic()
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            support.stop_process(proc, group=True)
    print(f"\nHugging Face run: CLI audit took {time.monotonic() - started:.1f} s")  # for the record, not asserted
    stdout, stderr = support.cli_output(root)
    return SimpleNamespace(code=proc.returncode, stdout=stdout, stderr=stderr, out=out,
                           cache=Path(env["TRACIN_TASKS_CACHE_DIR"]))


def oracle(work: Path):
    """TracIn by the core over the files the Trainer wrote, read without the audit's readers (one torch
    thread, as in the CLI's process: float32 sums come out the same)."""
    import datasets
    from safetensors.torch import load_file

    from tracin_tasks import Checkpoint, TracIn
    from tracin_tasks.core.data import TensorDictDataset

    folders = sorted((work / "hf-out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    checkpoints = []
    for folder in folders:
        step = int(folder.name.split("-")[1])
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        (lr,) = [e["learning_rate"] for e in history if e.get("step") == step and "learning_rate" in e]
        checkpoints.append(Checkpoint(state_dict=load_file(folder / "model.safetensors"), learning_rate=lr, step=step))
    # eager attention, as the audit builds it (sdpa sums in another order: scores 2e-6 apart)
    config = json.loads((folders[-1] / "config.json").read_text())
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**config, attn_implementation="eager"))
    rows = datasets.load_from_disk(str(work / "training-data"))
    inputs = {k: torch.tensor(rows[k]) for k in ("input_ids", "attention_mask")}
    labels = torch.tensor(rows["label"])
    with one_torch_thread():
        scores = TracIn(model, checkpoints).self_influence(TensorDictDataset(inputs, labels))
    model.load_state_dict(checkpoints[-1].state_dict)
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    final_loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()
    accuracy = float((logits.argmax(1) == labels).float().mean())
    return np.asarray(scores), final_loss, accuracy, list(rows["row_id"]), checkpoints


def test_the_trainer_run_holds_checkpoint_logged_models_and_no_artifacts(trainer_run):
    client, run_id = trainer_run.client, trainer_run.run_id
    run = client.get_run(run_id)
    assert client.list_artifacts(run_id) == []
    models = [client.get_logged_model(o.model_id) for o in run.outputs.model_outputs]
    assert sorted(m.name for m in models) == sorted(f"checkpoint-{s}" for s in (100, 200, 300, 400))
    assert {o.step for o in run.outputs.model_outputs} == {0}
    files = {f.path.rsplit("/", 1)[-1] for f in client.list_logged_model_artifacts(models[0].model_id,
                                                                                   f"artifacts/{models[0].name}")}
    assert {"config.json", "model.safetensors", "trainer_state.json", "optimizer.pt"} <= files
    assert {"learning_rate", "loss", "epoch"} <= set(run.data.metrics)


def test_cli_audit_of_a_trainer_run_equals_tracin_on_its_files(trainer_run, cli_audit):
    assert cli_audit.code == 0, f"stdout:\n{cli_audit.stdout[-3000:]}\nstderr:\n{cli_audit.stderr[-5000:]}"
    scores, final_loss, accuracy, row_ids, checkpoints = oracle(trainer_run.work)
    frame = pd.read_parquet(cli_audit.out / "scores.parquet")
    assert len(frame) == len(row_ids) == 150 and frame["row_id"].tolist() == row_ids
    np.testing.assert_allclose(frame["self_influence"].to_numpy(), scores, rtol=1e-6)

    # the rates the audit found are the Trainer's own, checkpoint by checkpoint
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    source = MlflowCheckpointSource(trainer_run.run_id, trainer_run.uri, cache_dir=trainer_run.root / "oracle-cache")
    assert [(r.step, r.learning_rate, r.lr_source) for r in source.checkpoint_refs()] == [
        (c.step, c.learning_rate, "trainer_state") for c in checkpoints]

    # only safetensors and JSON came down: every pickle of the run stayed on the server
    cached = [p for p in cli_audit.cache.rglob("*") if p.is_file()]
    assert sorted(p.name for p in cached if p.suffix == ".safetensors") == ["model.safetensors"] * 4
    assert [p for p in cached if p.suffix in PICKLE_SUFFIXES] == []
    output = cli_audit.stdout + cli_audit.stderr
    assert not [w for w in SLOW_PATH_WARNINGS if w in output], output[-3000:]

    # on a run that memorised its labels, the flips stand out in TracIn and not in the final loss
    flipped = set(json.loads((trainer_run.work / "flipped.json").read_text()))
    k = len(flipped)
    assert k == 15 and accuracy >= 0.95, f"the run did not memorise its labels (accuracy {accuracy:.2f})"
    top = set(frame.sort_values("self_influence", ascending=False, kind="stable")["row_id"].head(k))
    by_loss = {row_ids[i] for i in np.argsort(-final_loss, kind="stable")[:k]}
    recall, baseline = len(top & flipped) / k, len(by_loss & flipped) / k
    print(f"\nHugging Face run: recall of the {k} flips in the top {k}: TracIn {recall:.2f}, final loss {baseline:.2f}")
    assert recall >= 0.5 and recall > baseline, (recall, baseline)
