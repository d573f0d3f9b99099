"""Bad input, each row through the real audit flow (or the ``tracin-tasks audit`` CLI) on a real
MLflow sqlite store, against small runs logged with ``tracin_tasks.mlflow`` (iris, a tiny MLP,
2 checkpoints).

Every row asserts three things:

1. a typed error (``tracin_tasks.exceptions``) whose message names the problem and the fix;
2. nothing left in the output folder that is, or looks like, a result: no ``scores.parquet``,
   ``issues.parquet``, ``report.html``, and no finished cell (a plan file marks nothing finished);
3. where the defect is in the run, the re-run after fixing it (in the same output folder)
   computes every cell and gives the scores the core gives on the fixed run.

Bad input that ``tracin_tasks.mlflow.log_training_data`` refuses at logging time is tested both
ways: the helper refuses it (and logs nothing), and a run whose files were written without the
helper (``MlflowClient.log_artifact``) is refused by the audit.

The flow's tasks keep their retry policy, with ``retry_condition_fn=retry_unless_bad_input`` (bad
input is not retried: it would fail the same way) and no waits between retries.
docs/reliability.md lists every row with its outcome.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("prefect")
pytest.importorskip("mlflow")

from tracin_tasks.exceptions import (  # noqa: E402
    CheckpointError,
    ConfigurationError,
    LabelOutOfRangeError,
    LayerNotFoundError,
    LearningRateError,
    NoCheckpointsError,
    NonFiniteGradientError,
    OutputWriteError,
    RunNotFoundError,
    StateDictMismatchError,
    TracInError,
    TrainingDataError,
)

from .conftest import (  # noqa: E402
    ARCH,
    DATA_PATH,
    FACTORY,
    LoggedRun,
    assert_scores_match,
    audit,
    cli,
    cli_audit_args,
    iris_frame,
    leftovers,
    tracking_uri_set,
)

pytestmark = pytest.mark.usefixtures("prefect_api", "bad_input_not_retried")


@pytest.fixture
def bad_input_not_retried(monkeypatch):
    """The flow's plan and cell tasks with ``retry_condition_fn=retry_unless_bad_input`` and no
    wait between retries: bad input fails at the first attempt, anything else is still retried.

    (The condition is what the tasks carry; see docs/reliability.md. The flows look their tasks up
    at call time, so everything else is the real flow.)
    """
    from tracin_tasks.orchestration import flows, tasks
    from tracin_tasks.orchestration.retries import retry_unless_bad_input

    for module, name in ((flows, "plan_audit_task"), (tasks, "score_cell_task")):
        task = getattr(tasks, name)
        monkeypatch.setattr(module, name, task.with_options(retry_delay_seconds=0,
                                                            retry_condition_fn=retry_unless_bad_input))


def audit_fails(run: LoggedRun, out: Path, error: type[TracInError], **kwargs) -> str:
    """Run the audit, expect ``error``, check nothing result-like is left; return the message."""
    with pytest.raises(error) as info:
        audit(run, out, **kwargs)
    assert leftovers(out) == [], f"a failed audit left {leftovers(out)}"
    return str(info.value)


def rerun_after_fix(run: LoggedRun, out: Path, **kwargs) -> dict:
    """The audit after the fix, in the same output folder: every cell computed, the core's scores."""
    result = audit(run, out, **kwargs)
    assert result["computed"] == result["cells"] and result["skipped"] == 0
    assert_scores_match(result, run)
    return result


@pytest.fixture(scope="module")
def good_run(mlflow_store) -> LoggedRun:
    return mlflow_store.log_run(name="good")


# -- the run and its checkpoints -----------------------------------------------------------------------
def test_unknown_run_id(good_run, tmp_path):
    missing = uuid.uuid4().hex
    wrong = LoggedRun(missing, good_run.tracking_uri, None, (), ())
    message = audit_fails(wrong, tmp_path / "flow", RunNotFoundError)
    assert f"has no run {missing!r}" in message and "Check the run id" in message and "tracking-uri" in message

    code, _, err = cli(*cli_audit_args(wrong, tmp_path / "cli"))
    assert code == 2 and f"error: MLflow at {good_run.tracking_uri} has no run {missing!r}" in err, err[-2000:]
    assert leftovers(tmp_path / "cli") == []

    rerun_after_fix(good_run, tmp_path / "flow")  # the right id, the same folder


def test_run_without_checkpoints(mlflow_store, good_run, tmp_path):
    run = mlflow_store.log_run(checkpoints=0, name="no-checkpoints")
    message = audit_fails(run, tmp_path / "out", NoCheckpointsError)
    assert f"Run {run.run_id} has no checkpoints" in message and "log_checkpoint(model, step=" in message

    # the fix: log the checkpoints to that run (those of a run trained the same way)
    import tracin_tasks.mlflow as tm
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    with tracking_uri_set(mlflow_store.uri):
        for ckpt in MlflowCheckpointSource(good_run.run_id, good_run.tracking_uri).checkpoints():
            tm.log_checkpoint(ckpt.state_dict, step=ckpt.step, learning_rate=ckpt.learning_rate, run_id=run.run_id)
    rerun_after_fix(run, tmp_path / "out")


def test_checkpoints_from_another_architecture(mlflow_store, tmp_path):
    run = mlflow_store.log_run(checkpoint_arch={**ARCH, "hidden": 16}, name="other-architecture")
    message = audit_fails(run, tmp_path / "out", StateDictMismatchError)
    assert "does not fit Sequential" in message and "shape mismatches" in message
    assert "checkpoint (16, 4) vs model (8, 4)" in message
    assert "Build the model with the same architecture" in message

    # the fix: record the architecture the run really trained (the spec is read afresh, not from the cache)
    import tracin_tasks.mlflow as tm

    with tracking_uri_set(mlflow_store.uri):
        tm.log_model_factory(FACTORY, run_id=run.run_id, **{**ARCH, "hidden": 16})
    rerun_after_fix(run, tmp_path / "out")


def test_checkpoint_with_non_finite_weights(mlflow_store, tmp_path):
    """A diverged run: the last checkpoint holds NaN weights."""
    from tracin_tasks.examples.digits import build_mlp

    run = mlflow_store.log_run(checkpoints=1, name="diverged")
    state = build_mlp(**ARCH).state_dict()
    state["5.weight"][0, 0] = float("nan")
    mlflow_store.write_raw_checkpoint(run.run_id, 2, state, 0.05)
    message = audit_fails(run, tmp_path / "out", CheckpointError)
    assert "step 2" in message and "NaN or infinite weights" in message and "['5.weight']" in message
    assert "steps=[...]" in message
    # the fix: leave the diverged checkpoint out
    result = audit(run, tmp_path / "out", steps=[1])
    assert result["computed"] == result["cells"] == 1


# -- learning rates ---------------------------------------------------------------------------------------
def test_learning_rate_history_missing(mlflow_store, tmp_path):
    run = mlflow_store.log_run(learning_rates=[None, None], checkpoint_writer="raw", name="no-lr")
    message = audit_fails(run, tmp_path / "out", LearningRateError)
    assert f"Run {run.run_id} has no learning rate for the checkpoints at steps [1, 2]" in message
    assert "log_metric(" in message and "default_learning_rate=1.0" in message

    # the fix: log the learning rates that were in force
    for step, lr in zip(run.steps, (0.1, 0.05)):
        mlflow_store.client.log_metric(run.run_id, "lr", lr, step=step)
    result = rerun_after_fix(run, tmp_path / "out")
    assert result["warnings"] == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_learning_rate_non_finite(mlflow_store, tmp_path, bad):
    import tracin_tasks.mlflow as tm
    from tracin_tasks.examples.digits import build_mlp

    helper_run = mlflow_store.client.create_run(mlflow_store.experiment_id).info.run_id
    with tracking_uri_set(mlflow_store.uri), pytest.raises(CheckpointError, match="finite learning rate"):
        tm.log_checkpoint(build_mlp(**ARCH), step=1, learning_rate=bad, run_id=helper_run)
    assert mlflow_store.artifacts(helper_run) == [], "the helper refused before logging anything"

    # written without the helper: meta.json and the lr metric say NaN / inf at step 2
    run = mlflow_store.log_run(learning_rates=[0.1, bad], checkpoint_writer="raw", name=f"lr-{bad}")
    message = audit_fails(run, tmp_path / "out", LearningRateError)
    assert "learning rate is not a finite number >= 0" in message and "step 2: " in message
    if math.isnan(bad):
        assert "step 2: nan (from the 'lr' metric)" in message
    else:  # MLflow stores ±inf as ±1.8e308: that is refused too, and said
        assert "which is how MLflow stores" in message
    assert "log_metric(" in message and "steps=[...]" in message

    if math.isnan(bad):  # the fix is the same for all three
        mlflow_store.client.log_metric(run.run_id, "lr", 0.05, step=2)  # the latest value at a step wins
        rerun_after_fix(run, tmp_path / "out")


# -- training data ------------------------------------------------------------------------------------------
def test_training_data_missing(mlflow_store, tmp_path):
    run = mlflow_store.log_run(data="none", name="no-data")
    message = audit_fails(run, tmp_path / "out", TrainingDataError)
    assert f"Run {run.run_id} has no training data" in message and "log_training_data(df" in message

    # the spec is there but the file it names is not
    mlflow_store.write_json(run.run_id, "tracin/training_data.json",
                            {"artifact_path": DATA_PATH, "label_column": "label", "row_id_column": "row_id"})
    message = audit_fails(run, tmp_path / "out", TrainingDataError)
    assert f"({DATA_PATH}) cannot be downloaded" in message and "log_training_data(df" in message

    import tracin_tasks.mlflow as tm

    with tracking_uri_set(mlflow_store.uri):  # the fix: log it
        tm.log_training_data(iris_frame(), run_id=run.run_id, name="training_data")
    rerun_after_fix(run, tmp_path / "out")


def _empty(f):
    return f.iloc[:0]


def _duplicate_ids(f):
    f = f.copy()
    f.loc[5, "row_id"] = f.loc[4, "row_id"]
    f.loc[9, "row_id"] = f.loc[8, "row_id"]
    return f


def _nan_features(f):
    f = f.copy()
    f.loc[3, "f1"] = np.nan
    return f


def _inf_features(f):
    f = f.copy()
    f.loc[7, "f2"] = np.inf
    f.loc[11, "f0"] = -np.inf
    return f


def _beyond_float32(f):
    f = f.copy()
    f.loc[2, "f3"] = 1e39  # finite in float64, inf once the model's float32 sees it
    return f


def _string_labels(f):
    f = f.copy()
    f["label"] = f["label"].map({0: "setosa", 1: "versicolor", 2: "virginica"})
    return f


def _float_labels(f):
    f = f.copy()
    f["label"] = f["label"].astype(np.float64) + 0.5
    return f


def _missing_labels(f):
    f = f.copy()
    f["label"] = f["label"].astype("Int64")
    f.loc[6, "label"] = pd.NA
    return f


# defect -> (break the data, what the message must say (the problem; the row ids where there are some))
REFUSED_AT_LOGGING = {
    "empty": (_empty, ["The training data has no rows"]),
    "duplicate_row_ids": (_duplicate_ids, ["Row ids must be unique; 2 id(s) repeat", "Give every row a distinct id"]),
    "nan_features": (_nan_features, ["1 row(s) have NaN or infinite features", "'f1'", "Fix or drop those rows"]),
    "inf_features": (_inf_features, ["2 row(s) have NaN or infinite features", "Fix or drop those rows"]),
    "beyond_float32": (_beyond_float32, ["beyond float32's range", "'f3'", "Fix or drop those rows"]),
    "string_labels": (_string_labels, ["Label column 'label' has dtype", "'setosa'", "must be integers",
                                       "pd.factorize"]),
    "float_labels": (_float_labels, ["Label column 'label' has dtype float64", "must be integers"]),
    "missing_labels": (_missing_labels, ["Label column 'label' has missing values", "every row needs a class label"]),
}


# the same fix (re-log clean data) for every defect: two of them are enough to show it
RERUN_AFTER_FIX = {"duplicate_row_ids", "string_labels"}


def _row_ids_named(defect: str, frame: pd.DataFrame) -> list[str]:
    rows = {"duplicate_row_ids": [4, 8], "nan_features": [3], "inf_features": [7, 11], "beyond_float32": [2],
            "missing_labels": [6]}.get(defect, [])
    return [frame.loc[i, "row_id"] for i in rows]


@pytest.mark.parametrize("defect", list(REFUSED_AT_LOGGING))
def test_training_data_refused_at_logging_and_at_audit(mlflow_store, tmp_path, defect):
    import tracin_tasks.mlflow as tm

    clean = iris_frame()
    breaker, phrases = REFUSED_AT_LOGGING[defect]
    bad = breaker(clean)
    ids = _row_ids_named(defect, clean)

    helper_run = mlflow_store.client.create_run(mlflow_store.experiment_id).info.run_id
    with tracking_uri_set(mlflow_store.uri), pytest.raises(TrainingDataError) as logged:
        tm.log_training_data(bad, run_id=helper_run)
    assert mlflow_store.artifacts(helper_run) == [], "the helper refused before logging anything"

    run = mlflow_store.log_run(bad, data="raw", name=f"data-{defect}")  # bypassing the helper
    message = audit_fails(run, tmp_path / "out", TrainingDataError)
    for text in (str(logged.value), message):
        for phrase in phrases:
            assert phrase in text, (phrase, text)
        for row_id in ids:
            assert repr(row_id) in text, (row_id, text)

    if defect in RERUN_AFTER_FIX:
        # the fix: log the corrected data to the same run (its new fingerprint is fetched, not a cached copy)
        with tracking_uri_set(mlflow_store.uri):
            tm.log_training_data(clean, run_id=run.run_id, name="training_data")
        rerun_after_fix(run, tmp_path / "out")


def test_labels_outside_the_classes(mlflow_store, tmp_path):
    """The helper cannot know the model's classes; the audit checks the labels against its outputs."""
    clean = iris_frame()
    bad = clean.copy()
    bad.loc[[3, 10], "label"] = [3, 7]
    bad.loc[20, "label"] = -1
    run = mlflow_store.log_run(bad, name="labels-outside")  # accepted by log_training_data
    message = audit_fails(run, tmp_path / "out", LabelOutOfRangeError)
    assert "3 row(s)" in message and "labels [-1, 3, 7] outside the model's 3 classes (0..2)" in message
    for i in (3, 10, 20):
        assert repr(clean.loc[i, "row_id"]) in message
    assert "Fix those labels and log the data again" in message

    code, _, err = cli(*cli_audit_args(run, tmp_path / "cli"))
    assert code == 2 and "outside the model's 3 classes" in err
    assert leftovers(tmp_path / "cli") == []

    import tracin_tasks.mlflow as tm

    with tracking_uri_set(mlflow_store.uri):
        tm.log_training_data(clean, run_id=run.run_id, name="training_data")
    rerun_after_fix(run, tmp_path / "out")


def test_label_minus_100_is_refused_while_planning(mlflow_store, tmp_path):
    """-100 is cross_entropy's ignore_index: training skipped such rows, and the cells would crash on
    them untyped. Refused while planning with a typed error that says so; the CLI exits 2."""
    clean = iris_frame()
    bad = clean.copy()
    bad.loc[[4, 9], "label"] = -100
    run = mlflow_store.log_run(bad, name="ignore-index")
    message = audit_fails(run, tmp_path / "out", LabelOutOfRangeError)
    assert "labels [-100] outside the model's 3 classes" in message and "ignore_index" in message
    assert repr(clean.loc[4, "row_id"]) in message and repr(clean.loc[9, "row_id"]) in message
    code, out, err = cli(*cli_audit_args(run, tmp_path / "cli"))
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "ignore_index" in errors[0], err[-2000:]
    assert "Traceback" not in err.split("error: ")[-1]
    assert leftovers(tmp_path / "cli") == []


def test_non_finite_gradients_on_some_rows_named_by_row_id(mlflow_store, tmp_path):
    """Finite but extreme features (1e30) overflow the model: the audit names those rows by id."""
    clean = iris_frame()
    bad = clean.copy()
    bad.loc[[5, 17], "f0"] = 1e30
    run = mlflow_store.log_run(bad, name="non-finite-gradients")  # finite: accepted at logging
    with pytest.raises(NonFiniteGradientError) as info:
        audit(run, tmp_path / "out")
    message = str(info.value)
    ids = [clean.loc[5, "row_id"], clean.loc[17, "row_id"]]
    assert f"2 row(s) of run {run.run_id} have non-finite (NaN or inf) loss gradients" in message
    assert f"row ids {ids}" in message and "fix or drop those rows" in message
    assert info.value.row_ids == ids and info.value.rows == [5, 17]
    assert leftovers(tmp_path / "out") == []

    code, _, err = cli(*cli_audit_args(run, tmp_path / "cli"))
    assert code == 2 and f"row ids {ids}" in err
    assert leftovers(tmp_path / "cli") == []

    import tracin_tasks.mlflow as tm

    with tracking_uri_set(mlflow_store.uri):
        tm.log_training_data(clean, run_id=run.run_id, name="training_data")
    rerun_after_fix(run, tmp_path / "out")


# -- settings -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, cli_args, phrase", [
    ({"budget": 0, "top_fraction": None}, ["--budget", "0"], "budget must be a positive integer"),
    ({"top_fraction": 1.5}, ["--top-fraction", "1.5"], "top_fraction must be in (0, 1], got 1.5"),
], ids=["budget-0", "fraction-above-1"])
def test_flag_policy_that_cannot_be_satisfied(good_run, tmp_path, policy, cli_args, phrase):
    message = audit_fails(good_run, tmp_path / "flow", ConfigurationError, flag=policy, report=True)
    assert phrase in message
    assert not (tmp_path / "flow").exists(), "refused before any work"
    code, _, err = cli(*cli_audit_args(good_run, tmp_path / "cli", *cli_args))
    assert code == 2 and phrase in err, err[-2000:]
    assert not (tmp_path / "cli").exists()


def test_layer_that_does_not_exist(good_run, tmp_path):
    message = audit_fails(good_run, tmp_path / "out", LayerNotFoundError, layers=["fc2"])
    assert "Layer 'fc2' does not exist in Sequential" in message and "Layers with parameters: ['1', '3', '5']" in message
    assert "pass some of them as layers=[...], 'last'" in message
    code, _, err = cli(*cli_audit_args(good_run, tmp_path / "cli", "--layers", "fc2"))
    assert code == 2 and "Layer 'fc2' does not exist" in err
    assert leftovers(tmp_path / "cli") == []
    result = audit(good_run, tmp_path / "out", layers=["5"])  # the fix: a layer the model has
    assert result["computed"] == result["cells"] == 2


def test_results_store_not_writable(good_run, tmp_path):
    from tracin_tasks.exceptions import ResultsStoreError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    message = audit_fails(good_run, tmp_path / "out", ResultsStoreError, results_uri=str(blocker / "cells"))
    assert "is not writable" in message and "results_uri= / --results-uri" in message
    rerun_after_fix(good_run, tmp_path / "out")  # the fix: a store it can write (here the default, out/cells)


def test_output_folder_not_writable(good_run, tmp_path):
    """The output folder is taken (its lock) before any work: a typed error before a cell is
    computed, nothing written anywhere; the re-run into a writable folder computes every cell."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cells = tmp_path / "cells"
    with pytest.raises(OutputWriteError) as info:
        audit(good_run, blocker / "out", results_uri=str(cells))
    assert "Cannot use the output folder" in str(info.value) and "Choose an output folder" in str(info.value)
    assert blocker.read_text() == "not a folder"
    assert not cells.exists()
    result = audit(good_run, tmp_path / "out", results_uri=str(cells))
    assert result["computed"] == result["cells"] and result["skipped"] == 0
    assert_scores_match(result, good_run)


def test_retries_stop_on_bad_input():
    """``retry_condition_fn`` for the flow's tasks: bad input fails at once, faults are retried."""
    from prefect.states import Failed

    from tracin_tasks.exceptions import TrackingServerUnavailableError
    from tracin_tasks.orchestration.retries import retry_unless_bad_input
    from tracin_tasks.exceptions import ResultsStoreError

    for exc, retry in ((TrainingDataError("x"), False), (LearningRateError("x"), False),
                       (NonFiniteGradientError("x", [1]), False), (TrackingServerUnavailableError("x"), True),
                       (ResultsStoreError("x"), True), (RuntimeError("worker lost"), True)):
        assert retry_unless_bad_input(None, None, Failed(data=exc)) is retry, exc
