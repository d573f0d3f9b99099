"""Runs written by plain MLflow logging (no tracin-tasks call in the training code), audited.

docs/runs.md, "Auditing a run from plain MLflow logging", is run as written: its ``my_models.py``
and training script train on 400 digits with 10% of the labels flipped against the session's
``mlflow server``, in three ways (the script itself: ``log_state_dict`` and a ``learning_rate``
metric; its LoggedModel lines: pt2 LoggedModels and no rate; its safetensors lines), each in a
fresh process, each run in an experiment of its own. The doc's own ``tracin-tasks audit`` commands
then audit the first two from fresh processes. The oracle is the core's ``TracIn`` over weights
read independently (``torch.load`` of the downloaded state_dicts, MLflow's own loader for the pt2
LoggedModels) with the rates the script's schedule gives.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _harness.snippets import snippet

DOC, SECTION = "runs.md", "Auditing a run from plain MLflow logging"
CHECKPOINT_LINE = "        if (epoch + 1) % CHECKPOINT_EVERY == 0:"
STEPS = [9, 19, 29, 39]  # EPOCHS, CHECKPOINT_EVERY = 40, 10
N_ROWS = 400
CLI_TIMEOUT = 600


def rate_of_epoch(epoch: int) -> float:
    """The rate the script's ExponentialLR(gamma=0.95) from Adam's lr=1e-3 uses for epoch ``epoch``."""
    return 1e-3 * 0.95 ** epoch


def swap_checkpoint_lines(script: str, block: str) -> str:
    """The training script with its two ``log_state_dict`` lines replaced by ``block`` (the doc says
    "instead of the log_state_dict lines")."""
    lines = script.splitlines()
    start = lines.index(CHECKPOINT_LINE)
    assert "mlflow.pytorch.log_state_dict(" in lines[start + 1], "docs/runs.md: the checkpoint lines changed"
    assert block.splitlines()[0] == CHECKPOINT_LINE, "docs/runs.md: a replacement block starts elsewhere"
    return "\n".join([*lines[:start], *block.rstrip("\n").splitlines(), *lines[start + 2:]]) + "\n"


def variant_scripts() -> dict[str, str]:
    train = snippet(DOC, SECTION, 1)
    lr_line = '        mlflow.log_metric("learning_rate", lr, step=epoch)\n'
    assert lr_line in train, "docs/runs.md: the learning-rate line changed"
    return {
        "state_dict": train,
        # "A run that logged no learning rate (drop the log_metric line)"
        "logged_model": swap_checkpoint_lines(train, snippet(DOC, SECTION, 2)).replace(lr_line, ""),
        # "add `import safetensors.torch` to the imports"
        "safetensors": "import safetensors.torch\n" + swap_checkpoint_lines(train, snippet(DOC, SECTION, 3)),
    }


def audit_command(index: int, run_id: str, tracking_uri: str) -> tuple[list[str], dict[str, str]]:
    """The doc's ``index``-th bash block: (the audit's arguments, the variables it sets), with the run
    id and tracking URI filled in."""
    words = shlex.split(snippet(DOC, SECTION, index, language="bash").replace("\\\n", " "))
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["tracin-tasks", "audit"], words
    args = [run_id if w == "<RUN_ID>" else w for w in words[2:]]
    args[args.index("--tracking-uri") + 1] = tracking_uri
    return args, env


def load_models_module(folder: Path):
    """The doc's ``my_models.py`` under a name of its own (other tests' docs use ``my_models`` too)."""
    spec = importlib.util.spec_from_file_location(f"plain_my_models_{uuid.uuid4().hex[:8]}", folder / "my_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plain_runs(mlflow_server, support, tmp_path_factory, prefect_api):
    """The three runs trained (in parallel), then the doc's audits of the first two started (in parallel)."""
    root = tmp_path_factory.mktemp("plain-mlflow")
    models = snippet(DOC, SECTION, 0)
    runs = {}
    for variant, script in variant_scripts().items():
        folder = root / variant
        folder.mkdir()
        (folder / "my_models.py").write_text(models)
        (folder / "train.py").write_text(script)
        env = support.subprocess_env(folder / "state", make_dirs=True, MLFLOW_TRACKING_URI=mlflow_server.uri,
                                     MLFLOW_EXPERIMENT_NAME=f"plain-{variant}-{uuid.uuid4().hex[:8]}")
        proc = support.start_logged([sys.executable, "train.py"], env=env, cwd=folder, log=folder / "train.log")
        runs[variant] = {"folder": folder, "env": env, "train": proc}
    for variant, run in runs.items():
        code = run["train"].wait(timeout=CLI_TIMEOUT)
        log = (run["folder"] / "train.log").read_text(errors="replace")
        assert code == 0, f"{variant} training failed:\n{log[-5000:]}"
        (run["run_id"],) = [line.split(":", 1)[1].strip() for line in log.splitlines() if line.startswith("run id:")]
    for variant, index in (("state_dict", 0), ("logged_model", 1)):
        run = runs[variant]
        args, doc_env = audit_command(index, run["run_id"], mlflow_server.uri)
        env = dict(run["env"], PREFECT_API_URL=prefect_api)  # tests/flows covers the CLI's temporary server
        # PYTHONPATH=. first, as the doc has it (the CLI runs in the folder that holds my_models.py)
        env["PYTHONPATH"] = os.pathsep.join([doc_env.pop("PYTHONPATH"), env["PYTHONPATH"]])
        env.update(doc_env)
        run["out"] = run["folder"] / args[args.index("--output") + 1]
        run["cli"] = support.start_cli(["audit", *args, "--no-validate", "--no-mlflow-report"], env,
                                       run["folder"] / "logs", cwd=run["folder"])
    yield {"uri": mlflow_server.uri, **runs}
    for run in runs.values():
        if "cli" in run and run["cli"].poll() is None:
            support.stop_process(run["cli"], group=True)


def finished_cli(run, support) -> tuple[str, str]:
    try:
        code = run["cli"].wait(timeout=CLI_TIMEOUT)
    except Exception:
        support.stop_process(run["cli"], group=True)
        raise
    stdout, stderr = support.cli_output(run["folder"] / "logs")
    assert code == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-6000:]}"
    return stdout, stderr


def download(uri: str, run_id: str, path: str, dst: Path) -> Path:
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.MlflowClient(tracking_uri=uri).download_artifacts(run_id, path, str(dst)))


def rows_of(folder: Path) -> tuple[pd.DataFrame, torch.utils.data.TensorDataset]:
    """The rows the script trained on (its own train.parquet), as the model saw them."""
    frame = pd.read_parquet(folder / "train.parquet")
    features = torch.tensor(frame.filter(like="pixel_").to_numpy())
    return frame, torch.utils.data.TensorDataset(features, torch.tensor(frame["label"].to_numpy()))


def oracle(folder: Path, states: list[dict], rates: list[float], support) -> tuple[np.ndarray, np.ndarray]:
    """(TracIn self-influence, per-row loss of the last checkpoint), in the rows' order."""
    from tracin_tasks import Checkpoint, TracIn

    model = load_models_module(folder).build(hidden=512)
    checkpoints = [Checkpoint(state_dict=sd, learning_rate=lr, step=s) for sd, lr, s in zip(states, rates, STEPS)]
    _, dataset = rows_of(folder)
    with support.one_torch_thread():
        scores = np.asarray(TracIn(model, checkpoints).self_influence(dataset, batch_size=256))
        model.load_state_dict(states[-1])
        with torch.no_grad():
            x, y = dataset.tensors
            loss = torch.nn.functional.cross_entropy(model(x), y, reduction="none").numpy()
    return scores, loss


def recall(scores: np.ndarray, row_ids: np.ndarray, flipped: set[str]) -> float:
    top = row_ids[np.argsort(-scores, kind="stable")[:len(flipped)]]
    return float(np.mean([r in flipped for r in top]))


def check_audit(run, uri, states, rates, support, tmp_path) -> pd.DataFrame:
    """The CLI's scores: one per row, equal to the oracle, and better at finding the flips than the final loss."""
    frame = pd.read_parquet(run["out"] / "scores.parquet")
    rows, _ = rows_of(run["folder"])
    assert len(frame) == N_ROWS and frame["row_id"].is_unique
    assert sorted(frame["row_id"]) == sorted(rows["row_id"])
    frame = frame.set_index("row_id").loc[rows["row_id"]]
    np.testing.assert_array_equal(frame["label"].to_numpy(), rows["label"].to_numpy())
    expected, final_loss = oracle(run["folder"], states, rates, support)
    np.testing.assert_allclose(frame["self_influence"].to_numpy(), expected, rtol=1e-6)
    flips = json.loads(download(uri, run["run_id"], "ground_truth/flipped.json", tmp_path).read_text())
    flipped = set(flips["flipped_row_ids"])
    assert len(flipped) == N_ROWS // 10
    ids = rows["row_id"].to_numpy()
    found, baseline = recall(expected, ids, flipped), recall(final_loss, ids, flipped)
    print(f"\nplain MLflow run: recall of the {len(flipped)} flips in the top {len(flipped)}: TracIn {found:.2f}, "
          f"final loss {baseline:.2f}")  # for the record
    assert found > baseline, (f"recall of the flips in the top {len(flipped)}: TracIn {found:.3f}, "
                              f"final loss {baseline:.3f}")
    return frame


# -- the runs as MLflow keeps them ---------------------------------------------------------------
def test_each_variant_leaves_the_layout_the_doc_describes(plain_runs):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=plain_runs["uri"])

    def files(run_id, path=None):
        out = []
        for f in client.list_artifacts(run_id, path):
            out.extend(files(run_id, f.path) if f.is_dir else [f.path])
        return sorted(out)

    data = ["ground_truth/flipped.json", "training_data/train.parquet"]
    state_dict = plain_runs["state_dict"]["run_id"]
    assert files(state_dict) == sorted([*data, *(f"checkpoints/epoch_{s}/state_dict.pth" for s in STEPS)])
    history = client.get_metric_history(state_dict, "learning_rate")
    assert sorted(m.step for m in history) == list(range(40))
    run = client.get_run(state_dict)
    (dataset_input,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    source = json.loads(dataset_input.dataset.source)["url"]
    assert source.endswith(f"/{state_dict}/artifacts/training_data/train.parquet")

    logged = plain_runs["logged_model"]["run_id"]
    assert files(logged) == data, "LoggedModels are not run artifacts"
    assert client.get_metric_history(logged, "learning_rate") == []
    outputs = sorted(client.get_run(logged).outputs.model_outputs, key=lambda o: o.step)
    assert [o.step for o in outputs] == STEPS
    for out in outputs:
        model = client.get_logged_model(out.model_id)
        assert (model.name, str(model.status)) == (f"epoch_{out.step}", "READY")
        assert "data/model.pt2" in [f.path for f in client.list_logged_model_artifacts(out.model_id, "data")]

    safetensors = plain_runs["safetensors"]["run_id"]
    assert files(safetensors) == sorted([*data, *(f"checkpoints/epoch_{s}/model.safetensors" for s in STEPS)])


def test_learning_rates_are_the_rates_each_checkpoints_epoch_trained_with(plain_runs, tmp_path):
    """The script logs the rate before scheduler.step(): step N holds the rate epoch N's updates used."""
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    for variant in ("state_dict", "safetensors"):
        source = MlflowCheckpointSource(plain_runs[variant]["run_id"], plain_runs["uri"], lr_metric="learning_rate",
                                        cache_dir=tmp_path / variant)
        refs = source.checkpoint_refs()
        assert [r.step for r in refs] == STEPS
        assert [r.lr_source for r in refs] == ["metric"] * 4
        np.testing.assert_allclose([r.learning_rate for r in refs], [rate_of_epoch(s) for s in STEPS], rtol=1e-12)
        assert source.warnings == []


# -- the audits ------------------------------------------------------------------------------------
def test_state_dict_run_audited_by_the_doc_command_equals_tracin(plain_runs, support, tmp_path):
    run = plain_runs["state_dict"]
    stdout, stderr = finished_cli(run, support)
    assert f"audited run {run['run_id']}: {N_ROWS} rows; 4 cells computed, 0 reused" in stdout
    assert "default_learning_rate" not in stdout + stderr
    states = [torch.load(download(plain_runs["uri"], run["run_id"], f"checkpoints/epoch_{s}/state_dict.pth",
                                  tmp_path / str(s)), weights_only=True) for s in STEPS]
    check_audit(run, plain_runs["uri"], states, [rate_of_epoch(s) for s in STEPS], support, tmp_path)


def test_logged_model_run_without_rates_audited_with_equal_weights(plain_runs, support, tmp_path):
    import mlflow

    run = plain_runs["logged_model"]
    stdout, stderr = finished_cli(run, support)
    assert f"audited run {run['run_id']}: {N_ROWS} rows; 4 cells computed, 0 reused" in stdout
    warning = (f"warning: No learning rate for the checkpoints at steps {STEPS} (no 'lr' metric at those steps and "
               "none in their metadata); using default_learning_rate=1, so checkpoints are weighted equally.")
    assert warning in stdout + stderr
    client = mlflow.MlflowClient(tracking_uri=plain_runs["uri"])
    outputs = sorted(client.get_run(run["run_id"]).outputs.model_outputs, key=lambda o: o.step)
    states = []
    with support.mlflow_target(plain_runs["uri"]):  # MLflow's own pt2 loader: torch.export.load (a trusted test)
        for out in outputs:
            (tmp_path / out.model_id).mkdir()
            states.append(mlflow.pytorch.load_model(f"models:/{out.model_id}", dst_path=str(tmp_path / out.model_id))
                          .state_dict())
    check_audit(run, plain_runs["uri"], states, [1.0] * len(STEPS), support, tmp_path)


def test_safetensors_checkpoints_are_read_as_logged(plain_runs, tmp_path):
    import safetensors.torch

    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    run = plain_runs["safetensors"]
    source = MlflowCheckpointSource(run["run_id"], plain_runs["uri"], lr_metric="learning_rate",
                                    cache_dir=tmp_path / "cache")
    with torch.device("meta"):
        expected = load_models_module(run["folder"]).build(hidden=512).state_dict()
    for ref in source.checkpoint_refs():
        assert ref.location == f"checkpoints/epoch_{ref.step}/model.safetensors"
        checkpoint = source.fetch(ref, expected=expected)
        logged = safetensors.torch.load_file(
            download(plain_runs["uri"], run["run_id"], ref.location, tmp_path / str(ref.step)))
        assert checkpoint.state_dict.keys() == logged.keys()
        for name, tensor in logged.items():
            assert torch.equal(checkpoint.state_dict[name], tensor), name
        assert checkpoint.metadata["source"] == f"runs:/{run['run_id']}/{ref.location}"


# -- LoggedModels: safetensors, failed calls, steps shared with a final model -----------------------
def test_logged_models_safetensors_failed_and_a_final_model_at_a_shared_step(mlflow_server, tmp_path):
    """epoch_0 (step 0) and epoch_2 (step 2) hold model.safetensors among a pyfunc-like model's files; a
    FAILED epoch_1 is linked at step 1; a final ``model`` without step= sits at step 0 beside epoch_0."""
    import mlflow
    import safetensors.torch
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.create_experiment(f"plain-logged-safetensors-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment)
    run_id = run.info.run_id
    torch.manual_seed(0)
    weights = {}
    outputs = []
    for name, step, status in (("epoch_0", 0, "READY"), ("epoch_1", 1, "FAILED"), ("epoch_2", 2, "READY"),
                               ("model", 0, "READY")):
        model = client.create_logged_model(experiment, name=name, source_run_id=run_id)
        folder = tmp_path / name / "artifacts"
        folder.mkdir(parents=True)
        state = torch.nn.Linear(3, 2).state_dict()
        safetensors.torch.save_file(state, folder / "model.safetensors")
        (folder.parent / "python_model.pkl").write_bytes(b"not read")
        if status == "READY":
            client.log_model_artifacts(model.model_id, str(folder.parent))
        client.finalize_logged_model(model.model_id, getattr(LoggedModelStatus, status))
        outputs.append(LoggedModelOutput(model.model_id, step))
        weights[name] = (model.model_id, state)
    client.log_outputs(run_id, outputs)
    client.set_terminated(run_id)

    source = MlflowCheckpointSource(run_id, mlflow_server.uri, default_learning_rate=1.0, cache_dir=tmp_path / "cache")
    refs = source.checkpoint_refs()
    assert [(r.step, r.location) for r in refs] == [(0, weights["epoch_0"][0]), (2, weights["epoch_2"][0])]
    with torch.device("meta"):
        expected = torch.nn.Linear(3, 2).state_dict()
    for ref, name in zip(refs, ("epoch_0", "epoch_2")):
        state = source.fetch(ref, expected=expected).state_dict
        for key, tensor in weights[name][1].items():
            assert torch.equal(state[key], tensor), (name, key)
    cached = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert "python_model.pkl" not in cached
