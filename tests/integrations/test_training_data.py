"""Training rows from a file (``--training-data``) and from MLflow's own dataset inputs.

Small frames and no training: a parquet file, Hugging Face ``datasets`` folders (``Dataset`` and
``DatasetDict``), local paths and fsspec URLs; the column rules (label / labels, row ids by position,
strings left out, token sequences kept); and runs that logged their rows MLflow's way
(``mlflow.log_input(mlflow.data.from_pandas(df, source=..., targets=...))``): targets, a dataset record
MLflow reused from another run (on the session's real ``mlflow server``), a source outside the run.
"""

from __future__ import annotations

import json
import logging
import uuid

import numpy as np
import pandas as pd
import pytest
import torch

mlflow = pytest.importorskip("mlflow")

from _harness import mlflow_target  # noqa: E402

import tracin_tasks.mlflow as tm  # noqa: E402
from tracin_tasks.core.table import TrainingTable  # noqa: E402
from tracin_tasks.exceptions import TrainingDataError  # noqa: E402
from tracin_tasks.integrations.training_data import read_table, training_data_info  # noqa: E402

from ._support import Store  # noqa: E402

LOGGER = "tracin_tasks.integrations"
VOCAB = {w: i for i, w in enumerate(["[PAD]", "[CLS]", "good", "bad", "film", "plot", "great", "awful", "the", "a",
                                     "was", "is", "very", "not", "fine", "dull"])}
LENGTH = 8


def numeric_frame(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 3)).astype(np.float32), columns=["f0", "f1", "f2"])
    frame.insert(0, "label", rng.integers(0, 3, n).astype(np.int64))
    frame.insert(0, "row_id", rng.permutation(10_000)[:n].astype(np.int64) + 5)  # unique, scrambled
    frame["text"] = [f"row {i}" for i in range(n)]
    return frame


def token_rows(n: int = 24, seed: int = 0) -> dict[str, list]:
    """Short sentences made into ids with the tiny vocabulary above: no tokenizer, nothing downloaded."""
    rng = np.random.default_rng(seed)
    words = [w for w in VOCAB if not w.startswith("[")]
    rows: dict[str, list] = {"text": [], "input_ids": [], "token_type_ids": [], "attention_mask": [], "label": [],
                             "idx": []}
    for i in range(n):
        sentence = list(rng.choice(words, size=int(rng.integers(3, LENGTH))))
        ids = [VOCAB["[CLS]"], *(VOCAB[w] for w in sentence)][:LENGTH]
        pad = LENGTH - len(ids)
        rows["text"].append(" ".join(sentence))
        rows["input_ids"].append(ids + [VOCAB["[PAD]"]] * pad)
        rows["token_type_ids"].append([0] * LENGTH)
        rows["attention_mask"].append([1] * len(ids) + [0] * pad)
        rows["label"].append(int("good" in sentence or "great" in sentence))
        rows["idx"].append(1000 + i)
    return rows


def hf_dataset(rows: dict[str, list]):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "text": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "token_type_ids": datasets.Sequence(datasets.Value("int8")),
        "attention_mask": datasets.Sequence(datasets.Value("int8")),
        "label": datasets.ClassLabel(names=["neg", "pos"]),
        "idx": datasets.Value("int64"),
    })
    return datasets.Dataset.from_dict(rows, features=features)


def left_out_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if "left out columns" in r.getMessage()]
    assert len(lines) == 1, lines
    return lines[0]


# -- from outside the run ------------------------------------------------------------------------
def test_parquet_file_local_and_by_url(tmp_path, caplog):
    frame = numeric_frame()
    path = tmp_path / "train.parquet"
    frame.to_parquet(path, index=False)
    expected = TrainingTable.from_frame(frame.drop(columns=["text"]), "label", "row_id")

    with caplog.at_level(logging.INFO, logger=LOGGER):
        table = read_table(path)
    assert table.feature_columns == ("f0", "f1", "f2")
    assert "text" not in table.frame.columns
    assert "text (a string)" in left_out_line(caplog)
    assert table.row_ids.tolist() == frame["row_id"].tolist() and table.labels.tolist() == frame["label"].tolist()
    assert table.fingerprint() == expected.fingerprint()
    assert table.ids_are_positions is False
    info = training_data_info(table)
    assert (info.form, info.label_column, info.row_id_column, info.left_out) == (
        "parquet file", "label", "row_id", (("text", "a string"),))

    # fsspec URLs: a file: URL, and fsspec's in-memory filesystem
    assert read_table(path.as_uri()).fingerprint() == expected.fingerprint()
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://tracin-{uuid.uuid4().hex}/train.parquet"
    with fsspec.open(url, "wb") as fh:
        frame.to_parquet(fh, index=False)
    assert read_table(url).fingerprint() == expected.fingerprint()


def test_labels_column_and_row_ids_by_position(tmp_path, caplog):
    frame = numeric_frame().drop(columns=["row_id", "text"]).rename(columns={"label": "labels"})
    path = tmp_path / "hf_style.parquet"
    frame.to_parquet(path, index=False)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        table = read_table(path)
    assert (table.label_column, table.row_id_column) == ("labels", "row_id")  # Trainer's name for the label
    assert table.row_ids.tolist() == list(range(len(frame)))
    assert table.ids_are_positions is True and training_data_info(table).row_ids_are_positions is True
    assert any("numbered by position" in r.getMessage() and "--row-id-column" in r.getMessage()
               for r in caplog.records)
    assert table.fingerprint() == TrainingTable.from_frame(
        frame.assign(row_id=np.arange(len(frame))), "labels", "row_id").fingerprint()

    # a named row-id column is used as it is; when the name row_id is taken, positions go to __row__
    assert read_table(path, row_id_column="f0").ids_are_positions is False
    both = frame.assign(row_id=frame["labels"])  # a column called row_id, used as the label
    both.to_parquet(tmp_path / "taken.parquet", index=False)
    table = read_table(tmp_path / "taken.parquet", label_column="row_id")
    assert table.row_id_column == "__row__" and table.ids_are_positions is True


def test_named_columns_that_do_not_exist_are_refused(tmp_path):
    frame = numeric_frame()
    path = tmp_path / "train.parquet"
    frame.to_parquet(path, index=False)
    with pytest.raises(TrainingDataError, match="--label-column") as info:
        read_table(path, label_column="target")
    assert "'target'" in str(info.value) and "'f0'" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(TrainingDataError, match="--row-id-column") as info:
        read_table(path, row_id_column="id")
    assert "'id'" in str(info.value) and "'row_id'" in str(info.value)
    frame.rename(columns={"label": "y"}).to_parquet(tmp_path / "no_label.parquet", index=False)
    with pytest.raises(TrainingDataError, match="no label column") as info:
        read_table(tmp_path / "no_label.parquet")
    assert "--label-column" in str(info.value) and "'y'" in str(info.value)
    with pytest.raises(TrainingDataError, match="does not exist"):
        read_table(tmp_path / "missing.parquet")
    (tmp_path / "notes.txt").write_text("not parquet")
    with pytest.raises(TrainingDataError, match="not a readable parquet file"):
        read_table(tmp_path / "notes.txt")


def test_datasets_folder_keeps_token_sequences(tmp_path, caplog):
    rows = token_rows()
    hf_dataset(rows).save_to_disk(str(tmp_path / "tokenized"))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        table = read_table(tmp_path / "tokenized")
    assert table.feature_columns == ("input_ids", "token_type_ids", "attention_mask")
    line = left_out_line(caplog)
    assert "text (a string)" in line and "idx (a number beside token sequences" in line
    assert {"text", "idx"}.isdisjoint(table.frame.columns)
    assert table.label_column == "label" and table.ids_are_positions is True
    assert training_data_info(table).form == "datasets folder"

    # the rows the model gets are the ids as written, in order; the fingerprint is the core's
    inputs, labels = table.inputs(), table.labels
    for col in table.feature_columns:
        np.testing.assert_array_equal(inputs[col], np.array(rows[col], dtype=np.int64))
    assert labels.tolist() == rows["label"]
    frame = pd.DataFrame({"row_id": np.arange(len(labels)), "label": rows["label"],
                          **{c: rows[c] for c in table.feature_columns}})
    assert table.fingerprint() == TrainingTable.from_frame(frame).fingerprint()

    # end to end: TracIn over the table's rows equals TracIn over the rows built by hand
    transformers = pytest.importorskip("transformers")
    from tracin_tasks import Checkpoint, TracIn
    from tracin_tasks.core.data import TensorDictDataset

    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=LENGTH,
                                     num_labels=2)
    torch.manual_seed(0)
    checkpoints = []
    for step, lr in ((1, 0.1), (2, 0.05)):
        model = transformers.BertForSequenceClassification(config).eval()
        checkpoints.append(Checkpoint(state_dict=model.state_dict(), learning_rate=lr, step=step))
    by_hand = TensorDictDataset({c: torch.tensor(rows[c], dtype=torch.int64) for c in table.feature_columns},
                                torch.tensor(rows["label"]))
    got = TracIn(model, checkpoints).self_influence(table.dataset())
    want = TracIn(model, checkpoints).self_influence(by_hand)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert np.all(got > 0)


def test_dataset_dict_folder_reads_its_train_split(tmp_path, caplog):
    datasets = pytest.importorskip("datasets")
    rows = token_rows(n=30)
    full = hf_dataset(rows)
    datasets.DatasetDict({"train": full.select(range(20)), "test": full.select(range(20, 30))}).save_to_disk(
        str(tmp_path / "dd"))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        table = read_table(tmp_path / "dd")
    assert len(table) == 20 and table.labels.tolist() == rows["label"][:20]
    assert any("'train' split" in r.getMessage() and "test" in r.getMessage() for r in caplog.records)
    info = training_data_info(table)
    assert info.form == "the 'train' split of a DatasetDict folder" and "test" in info.notes[0]
    assert read_table((tmp_path / "dd").as_uri()).fingerprint() == table.fingerprint()  # an fsspec URL

    datasets.DatasetDict({"validation": full}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(TrainingDataError, match="without a 'train' split") as err:
        read_table(tmp_path / "no_train")
    assert "validation" in str(err.value) and "--training-data" in str(err.value)
    # a split's own folder is a Dataset folder
    assert len(read_table(tmp_path / "no_train" / "validation")) == 30


def test_datasets_folder_naming_files_outside_it_is_refused(tmp_path):
    hf_dataset(token_rows()).save_to_disk(str(tmp_path / "ds"))
    state = json.loads((tmp_path / "ds" / "state.json").read_text())
    state["_data_files"] = [{"filename": "../elsewhere.arrow"}]
    (tmp_path / "ds" / "state.json").write_text(json.dumps(state))
    with pytest.raises(TrainingDataError, match="plain names"):
        read_table(tmp_path / "ds")
    (tmp_path / "plain").mkdir()
    with pytest.raises(TrainingDataError, match="not one written by Hugging Face datasets"):
        read_table(tmp_path / "plain")


# -- from the run, logged MLflow's way -----------------------------------------------------------
def _run_with_input(store, frame, *, targets="label", name="train", artifact="data/train.parquet", tmp_path,
                    experiment_id=None, source=None):
    """A run that logs ``frame`` as its parquet artifact and as a training dataset input whose source is
    that artifact (or ``source``); no tracin-tasks helper."""
    experiment_id = experiment_id or store.new_experiment("dsinput")
    with mlflow_target(store.uri), mlflow.start_run(experiment_id=experiment_id) as run:
        folder, file = artifact.rsplit("/", 1)
        local = tmp_path / uuid.uuid4().hex / file
        local.parent.mkdir()
        frame.to_parquet(local, index=False)
        mlflow.log_artifact(str(local), folder)
        if source is None:
            uri = f"{run.info.artifact_uri}/{artifact}"
            if uri.startswith("mlflow-artifacts:"):  # no dataset-source resolver: the URL the server serves it at
                from mlflow.data.http_dataset_source import HTTPDatasetSource

                path = uri.split(":/", 1)[1].lstrip("/")
                source = HTTPDatasetSource(f"{store.uri}/api/2.0/mlflow-artifacts/artifacts/{path}")
            else:
                source = uri
        mlflow.log_input(mlflow.data.from_pandas(frame, source=source, targets=targets, name=name), context="training")
    return run.info.run_id, experiment_id


def _table(store, run_id, tmp_path, **kwargs):
    return tm.MlflowCheckpointSource(run_id, store.uri, cache_dir=tmp_path / "cache", **kwargs).training_table()


def test_targets_of_a_dataset_input(sqlite_store, tmp_path):
    frame = numeric_frame().drop(columns=["text"])
    # MLflow 3.17 does not record targets= (the record keeps name, digest, source, schema, profile)
    run_id, _ = _run_with_input(sqlite_store, frame.rename(columns={"label": "y"}), targets="y", tmp_path=tmp_path)
    record = mlflow.MlflowClient(sqlite_store.uri).get_run(run_id).inputs.dataset_inputs[0].dataset
    assert "targets" not in json.loads(record.profile) and '"y"' in record.schema
    with pytest.raises(TrainingDataError, match="targets=") as err:
        _table(sqlite_store, run_id, tmp_path)
    assert "--label-column" in str(err.value)
    table = _table(sqlite_store, run_id, tmp_path, label_column="y")
    assert table.label_column == "y" and table.feature_columns == ("f0", "f1", "f2")
    assert table.labels.tolist() == frame["label"].tolist() and table.row_ids.tolist() == frame["row_id"].tolist()

    # targets="labels" (Hugging Face's name) needs no flag
    run_id, _ = _run_with_input(sqlite_store, frame.rename(columns={"label": "labels"}), targets="labels",
                                tmp_path=tmp_path)
    assert _table(sqlite_store, run_id, tmp_path).label_column == "labels"

    # a record that does carry targets in its profile (logged with its own entity) is honoured
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client = mlflow.MlflowClient(sqlite_store.uri)
    run_id, experiment_id = _run_with_input(sqlite_store, frame.rename(columns={"label": "y"}), targets="y",
                                            name="first", tmp_path=tmp_path)
    run = client.create_run(experiment_id)
    local = tmp_path / "own.parquet"
    frame.rename(columns={"label": "y"}).to_parquet(local, index=False)
    client.log_artifact(run.info.run_id, str(local), "data")
    entity = Dataset("with_targets", "0123abcd", "local",
                     json.dumps({"uri": f"{run.info.artifact_uri}/data/own.parquet"}), None,
                     json.dumps({"num_rows": len(frame), "targets": "y"}))
    client.log_inputs(run.info.run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", "training")])])
    assert _table(sqlite_store, run.info.run_id, tmp_path).label_column == "y"


def test_reused_dataset_digest_reads_this_runs_own_artifact(mlflow_server, tmp_path, caplog):
    store = Store("server", mlflow_server.uri, None)
    frame = numeric_frame(n=30).drop(columns=["text"])
    first, experiment_id = _run_with_input(store, frame, tmp_path=tmp_path)
    second, _ = _run_with_input(store, frame, tmp_path=tmp_path, experiment_id=experiment_id)
    client = mlflow.MlflowClient(store.uri)
    source = json.loads(client.get_run(second).inputs.dataset_inputs[0].dataset.source)
    assert f"/{first}/artifacts/data/train.parquet" in source["url"]  # MLflow's reuse: the first run's source

    # the first run's file is gone: the second run's audit reads its own copy
    first_file = mlflow_server.artifacts / experiment_id / first / "artifacts" / "data" / "train.parquet"
    assert first_file.is_file()
    first_file.unlink()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        table = _table(store, second, tmp_path)
    assert table.row_ids.tolist() == frame["row_id"].tolist() and table.labels.tolist() == frame["label"].tolist()
    assert table.fingerprint() == TrainingTable.from_frame(frame).fingerprint()
    note = training_data_info(table).notes[0]
    assert f"of run {first}" in note and "this run's own artifact data/train.parquet" in note
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # its content matches the digest
    with pytest.raises(TrainingDataError, match="cannot be downloaded"):
        _table(store, first, tmp_path)

    # a third run whose own copy is elsewhere: told what to do
    third, _ = _run_with_input(store, frame, tmp_path=tmp_path, experiment_id=experiment_id,
                               artifact="other/train.parquet")
    assert f"/{first}/" in client.get_run(third).inputs.dataset_inputs[0].dataset.source
    with pytest.raises(TrainingDataError, match="a record MLflow reused") as err:
        _table(store, third, tmp_path)
    message = str(err.value)
    assert first in message and f"mlflow artifacts download -r {first} -a data/train.parquet" in message
    assert "--training-data PATH" in message


def test_own_copy_unlike_the_reused_record_is_read_with_a_warning(sqlite_store, tmp_path, caplog):
    frame = numeric_frame(n=30).drop(columns=["text"])
    first, experiment_id = _run_with_input(sqlite_store, frame, tmp_path=tmp_path)
    with mlflow_target(sqlite_store.uri), mlflow.start_run(experiment_id=experiment_id) as run:
        other = frame.assign(label=(frame["label"] + 1) % 3)  # not the rows it logs as its input
        other.to_parquet(tmp_path / "train.parquet", index=False)
        mlflow.log_artifact(str(tmp_path / "train.parquet"), "data")
        mlflow.log_input(mlflow.data.from_pandas(frame, source=f"{run.info.artifact_uri}/data/train.parquet",
                                                 targets="label", name="train"), context="training")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        table = _table(sqlite_store, run.info.run_id, tmp_path)
    assert table.labels.tolist() == other["label"].tolist()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "digest" in warnings[0] and "--training-data" in warnings[0]


def test_source_outside_the_run_is_refused_and_training_data_reads_it(sqlite_store, tmp_path):
    frame = numeric_frame().drop(columns=["text"])
    outside = tmp_path / "elsewhere" / "train.parquet"
    outside.parent.mkdir()
    frame.to_parquet(outside, index=False)  # it exists: the audit still does not read what a run points at
    experiment_id = sqlite_store.new_experiment("outside")
    with mlflow_target(sqlite_store.uri), mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_input(mlflow.data.from_pandas(frame, source=str(outside), targets="label", name="local"),
                         context="training")
        mlflow.log_input(mlflow.data.from_pandas(frame.head(5), source="https://data.example.com/train.parquet",
                                                 targets="label", name="web"), context="training")
    with pytest.raises(TrainingDataError, match="outside the run") as err:
        _table(sqlite_store, run.info.run_id, tmp_path)
    message = str(err.value)
    assert str(outside) in message and "https://data.example.com/train.parquet" in message
    assert "--training-data PATH" in message and "untrusted" in message

    table = _table(sqlite_store, run.info.run_id, tmp_path, training_data=str(outside))  # the advice works
    assert table.fingerprint() == TrainingTable.from_frame(frame).fingerprint()
    assert training_data_info(table).location == str(outside)
