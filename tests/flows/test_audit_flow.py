"""The audit flow end to end on a real MLflow run, under Prefect's test server, and the CLI.

One trained run (digits, MLP, 3 checkpoints, 1,797 rows) is audited in shards of 600 rows:
3 checkpoints x 3 shards = 9 cells.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _harness import cli_output

SHARD = 600
N_CELLS = 9  # 3 checkpoints x ceil(1797 / 600)
CELL_TASK_NAMES = {f"step {s} rows {a}-{b}" for s in (1, 2, 3) for a, b in ((0, 600), (600, 1200), (1200, 1797))}


def audit(digits_run, output_dir, results_uri=None, **kwargs):
    """Run the flow in this process (Prefect test server); return (summary, flow run id)."""
    from tracin_tasks.orchestration import audit_training_run

    kwargs.setdefault("shard_size", SHARD)
    kwargs.setdefault("report", False)  # flagging, GX and the MLflow report are tested elsewhere
    state = audit_training_run(run_id=digits_run.run_id, tracking_uri=digits_run.tracking_uri,
                               output_dir=str(output_dir), results_uri=results_uri, return_state=True, **kwargs)
    return state.result(), state.state_details.flow_run_id  # result() raises what failed the flow


def cells_folder(summary) -> Path:
    return Path(summary["results_uri"]) / summary["audit_key"] / "cells"


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """name -> (mtime_ns, sha256) of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli_audit(digits_run, support, tmp_path_factory):
    """Test 7's CLI audit, started first so that it runs while the in-process flows do.

    Prefect's temporary server, in a PREFECT_HOME that does not exist yet, from an empty cwd.
    """
    root = tmp_path_factory.mktemp("cli")
    env = support.subprocess_env(root / "state")
    (root / "cwd").mkdir()
    out = root / "audit-out"
    proc = support.start_cli(["audit", "--run-id", digits_run.run_id, "--tracking-uri", digits_run.tracking_uri,
                              "--output", str(out), "--shard-size", "900", "--batch-size", "300", "--no-validate",
                              "--no-mlflow-report"], env, root, cwd=root / "cwd")
    run = {"proc": proc, "logs": root, "out": out, "prefect_home": Path(env["PREFECT_HOME"]), "cwd": root / "cwd"}
    yield run
    if run["proc"].poll() is None:
        support.stop_process(run["proc"], group=True)  # the CLI and the temporary Prefect server it started


@pytest.fixture(scope="module")
def first(prefect_api, digits_run, cli_audit, tmp_path_factory):
    """The audit on the default thread pool: (summary, flow run id)."""
    root = tmp_path_factory.mktemp("audit")
    return audit(digits_run, root / "out", str(root / "cells"))


def subflow_runs(client, flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
    )


def progress_artifacts(client, flow_run_id):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    return client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=["tracin-cells"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


# 1 ---------------------------------------------------------------------------------------------
def test_threads_audit_equals_tracin_on_the_same_run(first, digits_run, support):
    summary, _ = first
    assert (summary["cells"], summary["computed"], summary["skipped"]) == (N_CELLS, N_CELLS, 0)
    assert summary["run_id"] == digits_run.run_id and summary["rows"] == digits_run.n_rows
    assert summary["scores"] == os.path.join(summary["output_dir"], "scores.parquet")
    assert len(list(cells_folder(summary).glob("*.npz"))) == N_CELLS
    frame = pd.read_parquet(summary["scores"])
    scores, table = support.direct_scores(digits_run)
    np.testing.assert_allclose(frame["self_influence"].to_numpy(), scores, rtol=1e-6)
    np.testing.assert_array_equal(frame["row_id"].to_numpy(), table.row_ids)
    np.testing.assert_array_equal(frame["label"].to_numpy(), table.labels)
    assert frame["predicted_label"].between(0, 9).all() and frame["predicted_confidence"].between(0, 1).all()
    top = frame.sort_values("self_influence", ascending=False, kind="stable").head(5)
    assert [r["row_id"] for r in summary["top_rows"]] == top["row_id"].tolist()


# 2 ---------------------------------------------------------------------------------------------
def test_dask_local_cluster_gives_the_same_scores(prefect_api, first, digits_run, support, tmp_path):
    summary, _ = audit(digits_run, tmp_path / "out", task_runner="dask", max_workers=2)
    assert summary["audit_key"] == first[0]["audit_key"]
    assert (summary["computed"], summary["skipped"]) == (N_CELLS, 0)
    assert summary["results_uri"] == str(tmp_path / "out" / "cells")
    frame = pd.read_parquet(summary["scores"])
    np.testing.assert_allclose(frame["self_influence"].to_numpy(), support.direct_scores(digits_run)[0], rtol=1e-6)
    pd.testing.assert_frame_equal(frame, pd.read_parquet(first[0]["scores"]), check_exact=False, rtol=1e-6)


# 3 ---------------------------------------------------------------------------------------------
def test_rerunning_the_audit_computes_no_cell(prefect_api, first, digits_run, tmp_path):
    summary, flow_run_id = audit(digits_run, tmp_path / "again", first[0]["results_uri"])
    assert summary["audit_key"] == first[0]["audit_key"]
    assert (summary["cells"], summary["computed"], summary["skipped"]) == (N_CELLS, 0, N_CELLS)
    pd.testing.assert_frame_equal(pd.read_parquet(summary["scores"]), pd.read_parquet(first[0]["scores"]),
                                  check_exact=True)

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        (sub,) = subflow_runs(client, flow_run_id)
        assert [a.data for a in progress_artifacts(client, sub.id)] == [100.0]
        cell_runs = [t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sub.id])))]
        assert cell_runs == [], "no cell task is even submitted"


# 4 ---------------------------------------------------------------------------------------------
def test_other_layers_are_another_audit_and_leave_the_old_cells_alone(prefect_api, first, digits_run, tmp_path):
    results = Path(first[0]["results_uri"])
    old = snapshot(results / first[0]["audit_key"])
    summary, _ = audit(digits_run, tmp_path / "last", str(results), layers="last")
    assert summary["audit_key"] != first[0]["audit_key"]
    assert (summary["computed"], summary["skipped"]) == (N_CELLS, 0)
    assert snapshot(results / first[0]["audit_key"]) == old
    new_names = {p.name for p in cells_folder(summary).glob("*.npz")}
    assert len(new_names) == N_CELLS and new_names.isdisjoint(n.split("/")[-1] for n in old)

    from tracin_tasks.core.tracin import TracIn
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    source = MlflowCheckpointSource(digits_run.run_id, digits_run.tracking_uri)
    expected = TracIn(source.build_model(), source.checkpoints(), layers="last").self_influence(
        source.training_table().dataset())
    got = pd.read_parquet(summary["scores"])["self_influence"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert not np.allclose(got, pd.read_parquet(first[0]["scores"])["self_influence"].to_numpy())


# 5 ---------------------------------------------------------------------------------------------
def test_a_missing_cell_blocks_aggregation_until_the_audit_is_rerun(prefect_api, first, digits_run, tmp_path):
    from tracin_tasks.orchestration.aggregate import write_scores
    from tracin_tasks.orchestration.plan import AuditPlan
    from tracin_tasks.exceptions import CellsMissingError
    from tracin_tasks.orchestration.store import ResultsStore

    results = tmp_path / "cells"
    shutil.copytree(first[0]["results_uri"], results)
    key = first[0]["audit_key"]
    plan = AuditPlan.from_dict(json.loads((results / key / "plan.json").read_text()))
    gone = plan.cells[4]
    store = ResultsStore(str(results))
    Path(store.cell_path(key, gone)).unlink()
    before = snapshot(results / key / "cells")

    with pytest.raises(CellsMissingError) as info:
        write_scores(plan, store, str(tmp_path / "blocked"))
    assert gone.label in str(info.value) and f"1 of {N_CELLS} cells" in str(info.value)
    assert not (tmp_path / "blocked" / "scores.parquet").exists()

    summary, _ = audit(digits_run, tmp_path / "out", str(results))
    assert (summary["computed"], summary["skipped"]) == (1, N_CELLS - 1)
    after = snapshot(results / key / "cells")
    assert {k: v for k, v in after.items() if k in before} == before, "the other cells were not rewritten"
    assert set(after) - set(before) == {f"{gone.name}.npz"}
    np.testing.assert_allclose(pd.read_parquet(summary["scores"])["self_influence"].to_numpy(),
                               pd.read_parquet(first[0]["scores"])["self_influence"].to_numpy(), rtol=1e-9)


# 6 ---------------------------------------------------------------------------------------------
def test_progress_artifact_and_cell_task_names(first):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, flow_run_id = first
    with get_client(sync_client=True) as client:
        (sub,) = subflow_runs(client, flow_run_id)
        assert client.read_flow(sub.flow_id).name == "tracin-score-cells (threads)"
        artifacts = progress_artifacts(client, sub.id)
        assert len(artifacts) == 1
        assert artifacts[0].type == "progress" and artifacts[0].data == 100.0
        assert str(N_CELLS) in (artifacts[0].description or "")
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sub.id])))
        assert {t.name for t in runs} == CELL_TASK_NAMES
        assert all(t.state.is_completed() for t in runs)
        parent_tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        names = {t.name for t in parent_tasks}
        assert any(n.startswith("plan audit of run ") for n in names), names
        assert any(n.startswith("aggregate audit ") for n in names), names


# 7 ---------------------------------------------------------------------------------------------
AUDIT_OPTIONS = ["--run-id", "--tracking-uri", "--output", "--results-uri", "--task-runner", "--max-workers", "--gpu",
                 "--device", "--layers", "--batch-size", "--shard-size", "--steps", "--max-checkpoints", "--loss",
                 "--model-factory", "--allow-pickle"]


def finish_cli(run, timeout) -> tuple[int, str, str]:
    run["proc"].wait(timeout=timeout)
    return (run["proc"].returncode, *cli_output(run["logs"]))


def test_cli_audit_in_a_fresh_prefect_home(cli_audit, digits_run, support):
    """Prefect's temporary server in a PREFECT_HOME that does not exist yet; nothing lands in the cwd."""
    run = cli_audit
    code, stdout, stderr = finish_cli(run, timeout=420)
    assert code == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}"
    out = run["out"]
    assert f"audited run {digits_run.run_id}: {digits_run.n_rows} rows; 6 cells computed, 0 reused" in stdout
    assert f"scores: {out / 'scores.parquet'}" in stdout
    assert "highest self-influence" in stdout
    frame = pd.read_parquet(out / "scores.parquet")
    np.testing.assert_allclose(frame["self_influence"].to_numpy(), support.direct_scores(digits_run)[0], rtol=1e-6)
    assert len(list((out / "cells").rglob("step*.npz"))) == 6
    assert run["prefect_home"].is_dir()
    assert os.listdir(run["cwd"]) == [], "the CLI wrote into its working directory"


def test_cli_help_names_every_option(capsys):
    from tracin_tasks.cli import build_parser, main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    top = capsys.readouterr().out
    assert "audit" in top and "demo" in top

    with pytest.raises(SystemExit) as info:
        main(["audit", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    subparsers = next(a for a in build_parser()._actions if a.choices and "audit" in a.choices)
    defined = {o for a in subparsers.choices["audit"]._actions for o in a.option_strings if o.startswith("--")}
    assert set(AUDIT_OPTIONS) <= defined
    for option in sorted(defined):
        assert option in text, option
    assert "prefect server start" in text and "PREFECT_API_URL" in text


def test_cli_refuses_dask_without_a_prefect_server(digits_run, support, capsys, monkeypatch, tmp_path):
    """In this process (its Prefect settings cleared): the check runs before anything else does."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tracin_tasks.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for runner in ("dask", "tcp://127.0.0.1:1"):
        with support.restored_environ(), temporary_settings(updates={PREFECT_API_URL: None}):
            code = main(["audit", "--run-id", digits_run.run_id, "--tracking-uri", digits_run.tracking_uri,
                         "--output", str(tmp_path / "out"), "--task-runner", runner])
        assert code != 0
        err = capsys.readouterr().err
        assert "prefect server start" in err and "PREFECT_API_URL" in err, err[-3000:]
    assert not (tmp_path / "out").exists(), "refused before doing anything"


def test_cli_unknown_run_exits_2_naming_the_run(prefect_api, digits_run, support, capsys, tmp_path):
    from tracin_tasks.cli import main

    missing = "0123456789abcdef0123456789abcdef"
    with support.restored_environ():
        code = main(["audit", "--run-id", missing, "--tracking-uri", digits_run.tracking_uri,
                     "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"error: MLflow at {digits_run.tracking_uri} has no run {missing!r}" in err, err[-3000:]
    assert not (tmp_path / "out" / "scores.parquet").exists()


# -- a later audit with other shards in the same process uses its own plan ------------------------
def test_a_new_shard_size_in_the_same_process_is_aggregated_with_its_own_plan(prefect_api, digits_run, tmp_path):
    results = tmp_path / "cells"
    first_summary, _ = audit(digits_run, tmp_path / "a", str(results), shard_size=600)
    shutil.rmtree(results)  # e.g. the store was cleaned up between two audits of a long-lived process
    summary, _ = audit(digits_run, tmp_path / "b", str(results), shard_size=900)
    assert summary["audit_key"] == first_summary["audit_key"]
    assert (summary["cells"], summary["computed"]) == (6, 6)
