"""The audit flow's reporting end to end: flag, validate, report, Prefect artifacts, MLflow child run.

One real training run (digits, MLP, 2 epochs -> 2 checkpoints, 1,797 rows) in a sqlite store,
audited in shards of 900 rows (2 x 2 cells). The audits share one results folder, so only the
first one (``default_audit``, which the others depend on) computes cells; the others reuse them
and differ in what they report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("prefect")
pytest.importorskip("great_expectations")
mlflow = pytest.importorskip("mlflow")

from tracin_tasks.exceptions import ConfigurationError  # noqa: E402
from tracin_tasks.exceptions import ValidationFailedError  # noqa: E402

from _harness import one_torch_thread  # noqa: E402

SHARD = 900
ROWS = 1797
MUST_FAIL = [{"type": "expect_column_max_to_be_between", "kwargs": {"column": "self_influence", "max_value": 1e-12}}]


@pytest.fixture(scope="module")
def cells_uri(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cells"))


def audit(run, output_dir: Path, results_uri: str | None, **kwargs):
    """Run the flow in this process; return its final state (``state.result()`` raises what failed it)."""
    from tracin_tasks.orchestration import audit_training_run

    kwargs.setdefault("shard_size", SHARD)
    kwargs.setdefault("batch_size", 300)
    with one_torch_thread():
        return audit_training_run(run_id=run.run_id, tracking_uri=run.uri, output_dir=str(output_dir),
                                  results_uri=results_uri, return_state=True, **kwargs)


def artifacts_of(flow_run_id, keys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=list(keys)), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


@pytest.fixture(scope="module")
def default_audit(prefect_api, sqlite_run, cells_uri, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit-default") / "out"
    state = audit(sqlite_run, out, cells_uri, log_to_mlflow=False)
    return state.result(), state.state_details.flow_run_id, out


def test_audit_writes_report_issues_and_data_docs(default_audit):
    result, _, out = default_audit
    expected_flagged = math.ceil(0.1 * ROWS)  # the default policy: top 10%
    assert expected_flagged == 180
    assert result["flagged"] == expected_flagged
    assert result["rows"] == ROWS
    assert result["computed"] == 4 and result["cells"] == 4
    assert result["mlflow_run"] is None  # log_to_mlflow=False
    files = {k: Path(v) for k, v in result["files"].items()}
    assert files["report.html"] == out / "report.html" and files["report.html"].is_file()
    assert files["issues.parquet"] == out / "issues.parquet"
    issues = pd.read_parquet(files["issues.parquet"])
    assert len(issues) == ROWS and int(issues["flagged"].sum()) == expected_flagged
    assert issues["rank"].tolist() == list(range(1, ROWS + 1))
    assert issues["row_id"].is_unique
    assert result["validation"]["success"] is True
    assert result["validation"]["statistics"]["failed"] == 0
    docs = Path(result["data_docs"])
    assert docs.is_file() and docs.name == "index.html" and out in docs.parents
    assert list((out / "gx").rglob("index.html"))
    html = files["report.html"].read_text()
    assert "<h1>Label audit of training run" in html and "All expectations met." in html
    assert "rows flagged<b>180</b>" in html
    assert html.count("class='thumb'") == 50  # digits are 8x8 images: the first 50 flagged rows get thumbnails


def test_audit_creates_prefect_artifacts(default_audit):
    result, flow_run_id, out = default_audit
    keys = ("tracin-audit-summary", "tracin-flagged-rows", "tracin-report")
    arts = artifacts_of(flow_run_id, keys)
    assert set(arts) == set(keys)
    summary = arts["tracin-audit-summary"]
    assert summary.type == "markdown"
    assert "# Label audit of run" in summary.data
    assert "rows audited: **1797**" in summary.data and "rows flagged: **180**" in summary.data
    assert "data validation (Great Expectations): passed" in summary.data
    table = arts["tracin-flagged-rows"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert len(rows) == 20
    assert [r["rank"] for r in rows] == list(range(1, 21))
    issues = pd.read_parquet(out / "issues.parquet")
    assert [r["row_id"] for r in rows] == [str(x) for x in issues["row_id"].head(20)]
    link = arts["tracin-report"]  # Prefect stores a link artifact as markdown: [text](url)
    assert link.type == "markdown"
    assert link.data == f"[Audit report (local file)](file://{out / 'report.html'})"


def _latest_audit_run(run):
    client = mlflow.MlflowClient(tracking_uri=run.uri)
    child_id = client.get_run(run.run_id).data.tags["tracin.latest_audit_run"]
    return client.get_run(child_id)


def test_failed_validation_fails_the_flow_after_writing_everything(default_audit, sqlite_run, cells_uri, tmp_path):
    out = tmp_path / "out"
    state = audit(sqlite_run, out, cells_uri, extra_expectations=MUST_FAIL, on_validation_failure="fail",
                  log_to_mlflow=True)
    assert state.is_failed()
    with pytest.raises(ValidationFailedError, match="expect_column_max_to_be_between"):
        state.result()
    html = (out / "report.html").read_text()
    assert "FAILED" in html and "Some expectations failed." in html
    assert "expect_column_max_to_be_between" in html
    assert (out / "issues.parquet").is_file()
    assert list((out / "gx").rglob("index.html"))
    child = _latest_audit_run(sqlite_run)  # the only audit of this run logged to MLflow
    assert child.data.tags["mlflow.parentRunId"] == sqlite_run.run_id
    assert child.data.tags["tracin.audit_of"] == sqlite_run.run_id
    assert child.data.metrics["gx_success"] == 0.0
    assert child.data.metrics["flagged"] == 180.0
    assert child.info.status == "FINISHED"
    arts = artifacts_of(state.state_details.flow_run_id, ["tracin-audit-summary"])
    assert "**FAILED**" in arts["tracin-audit-summary"].data
    assert "Failed expectations: expect\\_column\\_max\\_to\\_be\\_between\\(self\\_influence\\)" in \
        arts["tracin-audit-summary"].data


def test_failed_validation_only_warns_when_asked(default_audit, sqlite_run, cells_uri, tmp_path):
    out = tmp_path / "out"
    state = audit(sqlite_run, out, cells_uri, extra_expectations=MUST_FAIL, on_validation_failure="warn",
                  log_to_mlflow=False)
    assert state.is_completed()
    result = state.result()
    assert result["validation"]["success"] is False
    failed = [r for r in result["validation"]["results"] if not r["success"]]
    assert [(r["expectation"], r["column"]) for r in failed] == [("expect_column_max_to_be_between", "self_influence")]
    assert result["computed"] == 0 and result["skipped"] == 4  # cells reused from the first audit
    assert "Some expectations failed." in (out / "report.html").read_text()


@pytest.mark.parametrize("flag", [{"budget": 0}, {"top_fraction": 1.5}, {"top_fraction": 0.1, "topk": 5}],
                         ids=["budget-0", "top-fraction-1.5", "unknown-key"])
def test_unsatisfiable_policy_fails_before_any_cell(prefect_api, sqlite_run, tmp_path, flag):
    out = tmp_path / "out"
    state = audit(sqlite_run, out, None, flag=flag)
    assert state.is_failed()
    with pytest.raises(ConfigurationError):
        state.result()
    assert not (out / "cells").exists()
    assert not out.exists()


def test_bad_on_validation_failure_is_rejected(prefect_api, sqlite_run, tmp_path):
    state = audit(sqlite_run, tmp_path / "out", None, on_validation_failure="ignore")
    with pytest.raises(ConfigurationError, match="on_validation_failure"):
        state.result()
    assert not (tmp_path / "out").exists()
