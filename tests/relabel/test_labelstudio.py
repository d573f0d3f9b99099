"""The Label Studio sink against a real Label Studio server on 127.0.0.1 (tests/relabel/_labelstudio.py).

The server tests skip when the server's own venv is missing (``make label-studio`` creates it); the
URI, image and configuration checks run everywhere. Reviewers are played through the SDK exactly as
the UI does it: an annotation choosing a class, or a cancelled (skipped) annotation.
"""

from __future__ import annotations

import base64
import io
import traceback
import uuid

import numpy as np
import pandas as pd
import pytest

from tracin_tasks.exceptions import ConfigurationError, SinkUnavailableError
from tracin_tasks.integrations.relabel import FlaggedBatch, RelabelSink, open_sink
from tracin_tasks.integrations.relabel.labelstudio import LabelStudioSink
from tracin_tasks.integrations.relabel.labelstudio_format import image_data_uri, label_config

from ._labelstudio import LabelStudioServer, ensure_template, find_venv

pytestmark = pytest.mark.labelstudio

FP = "c" * 64
WRONG_KEY = "wrong-key-0123456789-do-not-print-me"


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    venv, reason = find_venv()
    if venv is None:
        pytest.skip(reason)
    pytest.importorskip("label_studio_sdk", reason="label-studio-sdk is not installed (tracin-tasks[labelstudio])")
    server = LabelStudioServer(venv, ensure_template(venv), tmp_path_factory.mktemp("label-studio"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def project():
    return f"tracin-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sink(label_studio, project):
    s = LabelStudioSink(label_studio.url, project, api_key=label_studio.token)
    yield s
    s.close()


def digits_batch(flagged: int = 6, audit_key: str = "audit-one-0001", fingerprint: str = FP) -> FlaggedBatch:
    """Flagged rows of real 8x8 digits, with a suggested label that differs from the given one."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = 30
    issues = pd.DataFrame({
        "row_id": [f"d{i}" for i in range(n)],
        "label": digits.target[:n],
        "flagged": np.arange(n) < flagged,
        "rank": np.arange(1, n + 1),
        "score": np.linspace(2.0, 0.1, n),
        "self_influence": np.linspace(4.0, 0.2, n),
        "suggested_label": (digits.target[:n] + 3) % 10,
        "reason": "top 20%",
    })
    return FlaggedBatch.from_issues(issues, run_id="run-1", fingerprint=fingerprint, audit_key=audit_key,
                                    audit_run_id="audit-run-1", features=digits.data[:n], input_shape=(1, 8, 8),
                                    classes=range(10))


def project_tasks(server: LabelStudioServer, title: str) -> dict[str, object]:
    client = server.client()
    [proj] = [p for p in client.projects.list(title=title) if p.title == title]
    return {t.data["row_id"]: t for t in client.tasks.list(project=proj.id, fields="all")}


def choose(server: LabelStudioServer, task, label: int | None, note: str | None = None) -> None:
    """A reviewer submits a class (``label``) or skips the task (``None``)."""
    client = server.client()
    if label is None:
        client.annotations.create(id=task.id, result=[], was_cancelled=True)
        return
    result = [{"from_name": "label", "to_name": "summary", "type": "choices", "value": {"choices": [str(label)]}}]
    if note:
        result.append({"from_name": "note", "to_name": "summary", "type": "textarea", "value": {"text": [note]}})
    client.annotations.create(id=task.id, result=result)


# -- against the real server ---------------------------------------------------------------------


def test_deliver_imports_tasks_with_predictions_once(label_studio, sink, project):
    from PIL import Image

    assert isinstance(sink, RelabelSink)
    batch = digits_batch()
    assert sink.deliver(batch).to_dict() == {"sink": sink.name, "delivered": 6, "updated": 0, "unchanged": 0}
    tasks = project_tasks(label_studio, project)
    assert sorted(tasks) == sorted(r.row_id for r in batch.rows)
    for row in batch.rows:
        task = tasks[row.row_id]
        assert task.data["fingerprint"] == FP and task.data["audit_key"] == batch.audit_key
        assert (task.data["given_label"], task.data["rank"]) == (row.given_label, row.rank)
        assert task.data["score"] == pytest.approx(row.score)
        [prediction] = task.predictions
        assert prediction.model_version == "tracin-audit-on"
        assert prediction.score == pytest.approx(row.score)
        assert prediction.result[0]["value"]["choices"] == [str(row.suggested_label)]
        # the image is the row's digit, stretched to 0..255 and scaled up 12x
        png = base64.b64decode(task.data["image"].split(",", 1)[1])
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        assert pixels.shape == (96, 96)
        feats = np.asarray(row.features).reshape(8, 8)
        expected = np.round((feats - feats.min()) / (feats.max() - feats.min()) * 255)
        assert np.array_equal(pixels[::12, ::12], expected.astype(np.uint8))

    again = sink.deliver(batch)  # a retried task, a replayed outbox entry
    assert (again.delivered, again.updated, again.unchanged) == (0, 0, 6)
    assert len(project_tasks(label_studio, project)) == 6

    # a fresh sink (another process) finds the project by title and still adds nothing
    other = LabelStudioSink(label_studio.url, project, api_key=label_studio.token)
    assert other.deliver(batch).delivered == 0
    other.close()
    assert len(project_tasks(label_studio, project)) == 6


def test_a_later_audit_adds_rows_and_refreshes_open_ones(label_studio, sink, project):
    sink.deliver(digits_batch())
    tasks = project_tasks(label_studio, project)
    choose(label_studio, tasks["d0"], 5)
    later = digits_batch(flagged=8, audit_key="audit-two-0002")
    got = sink.deliver(later)
    assert (got.delivered, got.updated, got.unchanged) == (2, 5, 1)  # d0 was decided: left as it is
    tasks = project_tasks(label_studio, project)
    assert len(tasks) == 8
    assert tasks["d0"].data["audit_key"] == "audit-one-0001"
    assert tasks["d1"].data["audit_key"] == "audit-two-0002"
    assert {p.model_version for p in tasks["d1"].predictions} == {"tracin-audit-on", "tracin-audit-tw"}


def test_decisions_come_from_annotations(label_studio, sink, project):
    batch = digits_batch()
    sink.deliver(batch)
    assert sink.decisions(FP) == []  # nobody has looked yet
    given = {r.row_id: r.given_label for r in batch.rows}
    tasks = project_tasks(label_studio, project)
    relabel_to = (given["d0"] + 1) % 10
    choose(label_studio, tasks["d0"], relabel_to, note="clearly a different digit")
    choose(label_studio, tasks["d1"], given["d1"])  # confirmed
    choose(label_studio, tasks["d2"], None)  # skipped
    choose(label_studio, tasks["d3"], None)  # skipped first, then decided: the submission counts
    choose(label_studio, tasks["d3"], (given["d3"] + 2) % 10)

    got = {d.row_id: d for d in sink.decisions(FP)}
    assert set(got) == {"d0", "d1", "d2", "d3"}
    assert (got["d0"].status, got["d0"].label, got["d0"].given_label) == ("relabeled", relabel_to, given["d0"])
    assert got["d0"].note == "clearly a different digit"
    assert (got["d1"].status, got["d1"].label) == ("confirmed", given["d1"])
    assert (got["d2"].status, got["d2"].label) == ("skipped", given["d2"])
    assert (got["d3"].status, got["d3"].label) == ("relabeled", (given["d3"] + 2) % 10)
    assert {d.decided_by for d in got.values()} == {label_studio.admin_email}
    assert all(d.decided_at and d.audit_run_id == "audit-run-1" for d in got.values())
    assert [d.row_id for d in sink.decisions(FP)] == ["d0", "d1", "d2", "d3"]  # most suspicious first

    # a re-run audit leaves every decided task alone, and the decisions stand
    rerun = sink.deliver(digits_batch(audit_key="audit-rerun-003"))
    assert (rerun.delivered, rerun.updated, rerun.unchanged) == (0, 2, 4)
    assert {d.row_id: d.status for d in sink.decisions(FP)} == {
        "d0": "relabeled", "d1": "confirmed", "d2": "skipped", "d3": "relabeled"}
    assert sink.decisions("d" * 64) == []  # another data version has none
    assert LabelStudioSink(label_studio.url, "no-such-project", api_key=label_studio.token).decisions(FP) == []


def test_hostile_row_ids_and_tabular_rows(label_studio, sink, project):
    issues = pd.DataFrame({
        "row_id": ["x'); DROP TABLE task; --", "<script>alert(1)</script>", 'ünï"cøde'],
        "label": [0, 1, 2], "flagged": True, "rank": [1, 2, 3], "score": [0.9, 0.8, 0.7],
        "reason": "'; DELETE FROM x; --",
    })
    batch = FlaggedBatch.from_issues(issues, run_id="r", fingerprint=FP, audit_key="k",
                                     features=np.arange(12.0).reshape(3, 4), input_shape=(4,))
    assert sink.deliver(batch).delivered == 3
    assert sink.deliver(batch).delivered == 0
    tasks = project_tasks(label_studio, project)
    assert sorted(tasks) == sorted(issues["row_id"])
    assert tasks['ünï"cøde'].data["features"] == {"x0": 8.0, "x1": 9.0, "x2": 10.0, "x3": 11.0}
    assert not tasks['ünï"cøde'].predictions  # no suggested label, no prediction
    # a later batch with a class the project lacks adds it as a choice
    issues2 = issues.assign(label=[0, 1, 7], suggested_label=[4, 4, 4])
    sink.deliver(FlaggedBatch.from_issues(issues2, run_id="r", fingerprint="e" * 64, audit_key="k2",
                                          features=np.zeros((3, 4)), input_shape=(4,)))
    client = label_studio.client()
    [proj] = [p for p in client.projects.list(title=project) if p.title == project]
    config = client.projects.get(id=proj.id).label_config
    assert '<Choice value="7"/>' in config and '<Choice value="4"/>' in config


def test_a_foreign_project_with_the_same_title_is_refused(label_studio, project):
    label_studio.client().projects.create(
        title=project, label_config='<View><Text name="t" value="$text"/>'
                                     '<Choices name="c" toName="t"><Choice value="a"/></Choices></View>')
    sink = LabelStudioSink(label_studio.url, project, api_key=label_studio.token)
    with pytest.raises(ConfigurationError, match="not set up by tracin-tasks"):
        sink.deliver(digits_batch())


def test_key_from_an_environment_variable(label_studio, project, monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.setenv("TRACIN_TEST_LS_KEY", label_studio.token)
    uri = f"labelstudio://127.0.0.1:{label_studio.port}?project={project}&api_key_env=TRACIN_TEST_LS_KEY"
    sink = open_sink(uri)
    assert isinstance(sink, LabelStudioSink) and sink.url == label_studio.url
    assert label_studio.token not in sink.name and label_studio.token not in repr(sink)
    assert sink.deliver(digits_batch()).delivered == 6
    # the default variable
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    assert open_sink(f"labelstudio://127.0.0.1:{label_studio.port}?project={project}").deliver(
        digits_batch()).delivered == 0


def test_a_refused_key_is_a_configuration_error_without_the_key(label_studio, project, monkeypatch):
    monkeypatch.setenv("TRACIN_TEST_LS_KEY", WRONG_KEY)
    for sink, source in (
        (LabelStudioSink(label_studio.url, project, api_key=WRONG_KEY), "api_key argument"),
        (open_sink(f"labelstudio://127.0.0.1:{label_studio.port}?project={project}&api_key_env=TRACIN_TEST_LS_KEY"),
         "TRACIN_TEST_LS_KEY"),
    ):
        for call in (lambda: sink.deliver(digits_batch()), lambda: sink.decisions(FP)):
            with pytest.raises(ConfigurationError, match="refused the API key") as info:
                call()
            shown = "".join(traceback.format_exception(info.value))
            assert WRONG_KEY not in shown and source in str(info.value)


def test_no_key_names_where_it_was_looked_for(monkeypatch):
    pytest.importorskip("label_studio_sdk")
    monkeypatch.delenv("TRACIN_TEST_NO_KEY", raising=False)
    sink = open_sink("labelstudio://127.0.0.1:9?project=p&api_key_env=TRACIN_TEST_NO_KEY")
    with pytest.raises(ConfigurationError, match="TRACIN_TEST_NO_KEY"):
        sink.deliver(digits_batch())


def test_a_stopped_server_is_unavailable_and_nothing_is_lost(label_studio, sink, project):
    """Runs last among the server tests: it stops the session's server and starts it again."""
    sink.deliver(digits_batch())
    label_studio.stop()
    try:
        with pytest.raises(SinkUnavailableError, match=f"127.0.0.1:{label_studio.port}") as info:
            sink.deliver(digits_batch(flagged=8))
        assert label_studio.token not in "".join(traceback.format_exception(info.value))
        with pytest.raises(SinkUnavailableError):
            sink.decisions(FP)
        with pytest.raises(SinkUnavailableError):  # a sink opened while the server is down
            LabelStudioSink(label_studio.url, project, api_key=label_studio.token).deliver(digits_batch())
    finally:
        label_studio.start()
    got = sink.deliver(digits_batch(flagged=8))  # the retry after the outage
    assert got.delivered == 2
    assert len(project_tasks(label_studio, project)) == 8


# -- without a server ----------------------------------------------------------------------------


def test_uri_forms():
    sink = LabelStudioSink.from_uri("labelstudio://labels.example.com:8443/ls/?project=Digits%20audit"
                                    "&secret_block=ls-key&timeout=5")
    assert sink.url == "https://labels.example.com:8443/ls"  # https unless loopback or scheme=http
    assert (sink.project, sink.secret_block, sink.timeout) == ("Digits audit", "ls-key", 5.0)
    assert sink.name == "https://labels.example.com:8443/ls#project=Digits audit"
    local = LabelStudioSink.from_uri("labelstudio://localhost:8080")
    assert local.url == "http://localhost:8080" and local.api_key_env == "LABEL_STUDIO_API_KEY"
    assert LabelStudioSink.from_uri("labelstudio://h:1?scheme=http", project="P").url == "http://h:1"


@pytest.mark.parametrize("uri", [
    f"labelstudio://127.0.0.1:8080?project=p&api_key={WRONG_KEY}",
    f"labelstudio://127.0.0.1:8080?token={WRONG_KEY}",
    f"labelstudio://user:{WRONG_KEY}@127.0.0.1:8080?project=p",
])
def test_a_key_in_the_uri_is_refused_without_echoing_it(uri):
    with pytest.raises(ConfigurationError, match="secret_block") as info:
        open_sink(uri)
    assert WRONG_KEY not in str(info.value)


@pytest.mark.parametrize("uri, match", [
    ("labelstudio://127.0.0.1:8080?projet=typo", "Unknown options"),
    ("labelstudio://127.0.0.1:8080?scheme=ftp", "http or https"),
    ("labelstudio://127.0.0.1:8080?timeout=soon", "not a number"),
    ("labelstudio:///no-host", "no host"),
])
def test_bad_uris(uri, match):
    with pytest.raises(ConfigurationError, match=match):
        open_sink(uri)


def test_image_data_uri_shapes():
    from PIL import Image

    def decode(uri):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))

    rgb = decode(image_data_uri(list(np.linspace(0, 1, 3 * 4 * 5)), (3, 4, 5)))
    assert rgb.shape == (80, 100, 3)  # 20x (the long side reaches 96), channels last
    assert rgb[0, 0].tolist() == [0, 86, 173] and rgb[-1, -1].tolist() == [82, 169, 255]
    assert decode(image_data_uri([1.0] * 16, (4, 4))).shape == (96, 96)  # constant image: no division by zero
    assert decode(image_data_uri(None, (1, 8, 8))).shape == (96, 96)  # placeholder
    assert decode(image_data_uri(list(range(28 * 28)), (28, 28, 1))).shape == (112, 112)


def test_label_config_lists_every_class():
    config = label_config([0, 1, 9], "image")
    assert config.count("<Choice ") == 3 and '$image' in config and 'toName="summary"' in config
    assert "$features" in label_config([0], "table") and "$image" not in label_config([0], "none")
