"""The audit logged to a real ``mlflow server``: child run, tags, metrics, artifacts, and the UI.

A tiny training run is logged to the server, the audit flow runs against it over HTTP
(``log_to_mlflow=True``), and the audit's report is then opened in the MLflow UI in headless
Chromium, where it is previewed in a sandboxed iframe.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("prefect")
pytest.importorskip("great_expectations")
mlflow = pytest.importorskip("mlflow")

from _harness import one_torch_thread, train_digits  # noqa: E402

from ._browser import chromium  # noqa: E402

KEEP_SCREENSHOT = os.environ.get("TRACIN_REPORTS_SCREENSHOT")  # also copy the UI screenshot to this path


@pytest.fixture(scope="module")
def server_audit(prefect_api, mlflow_server, tmp_path_factory):
    """(trained run, flow result, output folder, Prefect flow run id) of an audit logged to the server."""
    from tracin_tasks.orchestration import audit_training_run

    run = train_digits(mlflow_server.uri, "ui", epochs=2)
    out = tmp_path_factory.mktemp("server-audit") / "out"
    with one_torch_thread():
        state = audit_training_run(run_id=run.run_id, tracking_uri=mlflow_server.uri, output_dir=str(out),
                                   shard_size=900, batch_size=300, log_to_mlflow=True, return_state=True)
    return run, state.result(), out, state.state_details.flow_run_id


@pytest.fixture(scope="module")
def client(mlflow_server):
    return mlflow.MlflowClient(tracking_uri=mlflow_server.uri)


def test_audit_is_a_child_run_linked_both_ways(server_audit, client):
    run, result, _, _ = server_audit
    child_id = result["mlflow_run"]["run_id"]
    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == run.run_id
    assert child.data.tags["tracin.audit_of"] == run.run_id
    assert child.info.experiment_id == run.experiment_id
    assert child.info.status == "FINISHED"
    assert child.info.run_name == f"tracin-audit-{run.run_id[:8]}"
    parent = client.get_run(run.run_id)
    assert parent.data.tags["tracin.latest_audit_run"] == child_id
    assert parent.data.tags["tracin.flagged"] == "180"
    children = client.search_runs([run.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.run_id}'")
    assert [r.info.run_id for r in children] == [child_id]


def test_audit_metrics_and_params(server_audit, client):
    _, result, _, _ = server_audit
    child = client.get_run(result["mlflow_run"]["run_id"])
    m = child.data.metrics
    assert m["rows"] == 1797.0
    assert m["flagged"] == 180.0
    assert m["flagged_share"] == pytest.approx(180 / 1797)
    assert m["gx_success"] == 1.0
    assert m["checkpoints"] == 2.0
    assert 0 < m["self_influence_min"] <= m["self_influence_median"] <= m["self_influence_max"]
    assert "policy" in child.data.params and "top 10.0%" in child.data.params["policy"]


def test_audit_artifacts_are_listed_and_report_downloads(server_audit, client, tmp_path):
    _, result, _, _ = server_audit
    child_id = result["mlflow_run"]["run_id"]
    root = {a.path for a in client.list_artifacts(child_id)}
    assert {"report.html", "scores.parquet", "issues.parquet", "flagged_rows.json", "plots", "audit",
            "data_docs"} <= root
    plots = {a.path for a in client.list_artifacts(child_id, "plots")}
    assert plots == {"plots/self_influence_histogram.png", "plots/flagged_share_per_class.png"}
    audit = {a.path for a in client.list_artifacts(child_id, "audit")}
    assert audit == {"audit/summary.json", "audit/info.json", "audit/validation.json"}
    docs = {a.path for a in client.list_artifacts(child_id, "data_docs")}
    assert "data_docs/index.html" in docs
    local = mlflow.artifacts.download_artifacts(run_id=child_id, artifact_path="report.html", dst_path=str(tmp_path),
                                                tracking_uri=client.tracking_uri)
    html = Path(local).read_text()
    assert "<h1>Label audit of training run" in html
    assert html == (Path(result["files"]["report.html"])).read_text()
    local = mlflow.artifacts.download_artifacts(run_id=child_id, artifact_path="flagged_rows.json",
                                                dst_path=str(tmp_path), tracking_uri=client.tracking_uri)
    table = json.loads(Path(local).read_text())  # log_table: pandas "split" JSON
    assert len(table["data"]) == 180
    assert "row_id" in table["columns"] and "reason" in table["columns"]


def test_prefect_link_points_at_the_mlflow_report(server_audit, mlflow_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    run, result, _, flow_run_id = server_audit
    child_id = result["mlflow_run"]["run_id"]
    url = f"{mlflow_server.uri}/#/experiments/{run.experiment_id}/runs/{child_id}/artifacts/report.html"
    assert result["mlflow_run"]["report_url"] == url
    with get_client(sync_client=True) as pc:
        (link,) = pc.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["tracin-report"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert link.data == f"[Audit report in MLflow]({url})"


def test_mlflow_ui_previews_the_report(server_audit, mlflow_server, tmp_path):
    run, result, _, _ = server_audit
    child_id = result["mlflow_run"]["run_id"]
    url = f"{mlflow_server.uri}/#/experiments/{run.experiment_id}/runs/{child_id}/artifacts/report.html"
    shot = tmp_path / "mlflow-ui-report.png"  # kept in pytest's basetemp after the run
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(90_000)
        page.goto(url, wait_until="domcontentloaded")
        iframe = page.locator("iframe.mlflow-html-iframe")
        try:
            iframe.wait_for(state="attached", timeout=60_000)
        except Exception:  # noqa: BLE001 - the direct artifact URL did not preview: click it in the tree
            page.goto(f"{mlflow_server.uri}/#/experiments/{run.experiment_id}/runs/{child_id}/artifacts",
                      wait_until="domcontentloaded")
            page.get_by_text("report.html", exact=True).first.click()
            iframe.wait_for(state="attached", timeout=60_000)
        heading = page.frame_locator("iframe.mlflow-html-iframe").locator("h1")
        heading.wait_for(state="attached")
        text = heading.inner_text()
        assert "Label audit" in text and run.run_id in text
        page.screenshot(path=str(shot), full_page=False)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    if KEEP_SCREENSHOT:
        shutil.copy(shot, KEEP_SCREENSHOT)
    print(f"MLflow UI screenshot: {shot}")
