"""The security pass (docs/security.md), each check through the real audit where there is one.

* nothing from a run, the results store or a queue is unpickled without ``allow_pickle``: crafted
  pickles whose ``__reduce__`` would create a marker file are refused, and the marker never appears
  (the same payload *does* create it once the user opts in: the payload is live);
* data-derived strings in report.html and the Prefect markdown artifacts are escaped;
* SQL goes through bound parameters, table and schema names are validated;
* planted secrets (a password in the tracking URI, ``MLFLOW_TRACKING_PASSWORD``) appear in no
  output file, MLflow artifact or database, cache, log line, Prefect log or artifact, or error;
* paths from user input or run artifacts (``..``) cannot leave the cache or output folders.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import pickle
import sqlite3
import os
import traceback
import urllib.error
import urllib.request
import uuid
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from . import _faults_support as support

pytest.importorskip("prefect")
pytest.importorskip("mlflow")

from tracin_tasks.exceptions import (  # noqa: E402
    CheckpointError,
    ConfigurationError,
    TrainingDataError,
    UnsafeCheckpointError,
)

from .conftest import audit, cli, cli_audit_args, iris_frame, leftovers  # noqa: E402

PACKAGE = support.REPO_ROOT / "tracin_tasks"
URI_SECRET = "PLANTED_SECRET_123"
ENV_SECRET = "PLANTED_ENV_SECRET_456"


class MarkerPayload:
    """Unpickling this creates ``path`` (``open(path, "w")``): proof that something was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _run_with_checkpoint_bytes(mlflow_store, payload: bytes, tmp_path: Path):
    """An iris run whose only checkpoint (step 1) is ``payload``; data and factory are normal."""
    run = mlflow_store.log_run(checkpoints=0, name="crafted-checkpoint")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "state_dict.pt").write_bytes(payload)
    (folder / "meta.json").write_text(json.dumps({"step": 1, "learning_rate": 0.1}))
    mlflow_store.client.log_artifacts(run.run_id, str(folder), "checkpoints/step_1")
    mlflow_store.client.log_metric(run.run_id, "lr", 0.1, step=1)
    return run


def _torch_pickle(marker: Path) -> bytes:
    import torch

    from tracin_tasks.examples.digits import build_mlp

    buf = io.BytesIO()
    torch.save({**build_mlp(in_features=4, n_classes=3, hidden=8).state_dict(), "extra": MarkerPayload(marker)}, buf)
    return buf.getvalue()


# -- nothing is unpickled without an opt-in ---------------------------------------------------------
@pytest.mark.parametrize("form", ["torch.save", "plain pickle"])
def test_crafted_pickle_checkpoint_is_refused_by_the_audit(api, mlflow_store, form, tmp_path):
    marker = tmp_path / "pwned"
    payload = _torch_pickle(marker) if form == "torch.save" else pickle.dumps(MarkerPayload(marker))
    run = _run_with_checkpoint_bytes(mlflow_store, payload, tmp_path)
    out = tmp_path / "out"
    code, stdout, stderr = cli(*cli_audit_args(run, out))
    assert code == 2, stderr[-3000:]
    assert "error: Checkpoint" in stderr and "allow_pickle=True" in stderr and "pickled Python objects" in stderr
    assert not marker.exists(), "the audit unpickled the checkpoint"
    assert leftovers(out) == []

    # the payload is live: a user who opts in does run it (which is why the default refuses)
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    trusting = MlflowCheckpointSource(run.run_id, run.tracking_uri, cache_dir=tmp_path / "c", allow_pickle=True)
    with contextlib.suppress(Exception):  # whatever the opened file object then does to the state_dict
        trusting.checkpoints()
    assert marker.exists()


def test_pt2_weights_stored_as_pickles_are_refused(tmp_path):
    """A ``.pt2`` archive (MLflow 3's default model format) whose weight is a pickle is not read."""
    from tracin_tasks.core.weights import read_pt2_file as read_pt2_state_dict

    marker = tmp_path / "pwned"
    archive = tmp_path / "model.pt2"
    config = {"config": {"0.weight": {"path_name": "weight_0", "use_pickle": True, "is_param": True,
                                      "tensor_meta": {"dtype": 7, "sizes": [2], "strides": [1],
                                                      "storage_offset": 0}}}}
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("model/data/weights/model_weights_config.json", json.dumps(config))
        zf.writestr("model/data/weights/weight_0", pickle.dumps(MarkerPayload(marker)))
    with pytest.raises(UnsafeCheckpointError, match="stored as a pickle"):
        read_pt2_state_dict(str(archive))
    assert not marker.exists()


def test_a_crafted_cell_in_the_results_store_is_refused(api, mlflow_store, tmp_path):
    """A cell file swapped for an ``.npz`` holding a pickled object array: aggregation refuses it."""
    from tracin_tasks.exceptions import ResultsStoreError

    run = mlflow_store.log_run(name="crafted-cell")
    results = tmp_path / "cells"
    first = audit(run, tmp_path / "out", results_uri=str(results))
    victim = sorted(results.rglob("*.npz"))[0]
    marker = tmp_path / "pwned"
    n = len(np.load(victim)["loss"])
    arrays = {k: np.zeros(n) for k in support.CELL_FIELDS}
    arrays["loss"] = np.array([MarkerPayload(marker)] * n, dtype=object)
    np.savez(victim, **arrays)  # object arrays are pickled inside the .npz
    (tmp_path / "out" / "scores.parquet").unlink()

    with pytest.raises(ResultsStoreError, match="not a readable cell result") as info:
        audit(run, tmp_path / "out", results_uri=str(results))
    assert victim.name in str(info.value) and "Delete it and re-run" in str(info.value)
    assert not marker.exists()
    assert not (tmp_path / "out" / "scores.parquet").exists()
    victim.unlink()  # what the message says to do
    again = audit(run, tmp_path / "out", results_uri=str(results))
    assert (again["computed"], again["skipped"]) == (1, first["cells"] - 1)
    pd.testing.assert_frame_equal(pd.read_parquet(again["scores"]), pd.read_parquet(first["scores"]))


def test_a_pickle_in_the_relabel_outbox_is_not_unpickled(tmp_path):
    from tracin_tasks.integrations.relabel.base import sink_key
    from tracin_tasks.integrations.relabel.outbox import Outbox

    uri = f"sqlite:///{tmp_path / 'queue.db'}"
    outbox = Outbox(str(tmp_path / "outbox"))
    marker = tmp_path / "pwned"
    folder = tmp_path / "outbox" / sink_key(uri)
    folder.mkdir(parents=True)
    (folder / "entry.json").write_bytes(pickle.dumps(MarkerPayload(marker)))

    class Sink:
        name = "test"

        def deliver(self, batch):  # pragma: no cover - never reached
            raise AssertionError("a crafted entry was delivered")

    with pytest.raises(ValueError):  # json refuses it; nothing else reads the outbox
        outbox.replay(uri, Sink())
    assert not marker.exists()


def _call_name(node: ast.Call) -> str:
    parts = []
    f = node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def test_no_unpickling_call_in_the_package_outside_the_opt_in():
    """Static guard: torch.load only with weights_only=True (except the allow_pickle branch),
    np.load only with allow_pickle=False, and no pickle/joblib/cloudpickle/torch.export loaders."""
    forbidden = {"pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
                 "pd.read_pickle", "pandas.read_pickle", "torch.export.load", "dill.load", "dill.loads",
                 "mlflow.pytorch.load_model", "mlflow.pyfunc.load_model"}
    opt_in = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        enclosing = {}
        for parent in ast.walk(tree):
            if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for child in ast.walk(parent):
                    enclosing.setdefault(id(child), parent.name) if child is not parent else None
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            where = f"{path.relative_to(support.REPO_ROOT)}:{node.lineno}"
            assert name not in forbidden, where
            kwargs = {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                value = kwargs.get("weights_only")
                assert isinstance(value, ast.Constant), where
                if value.value is not True:
                    opt_in.append((path.name, enclosing.get(id(node), "<module>")))
            if name in ("np.load", "numpy.load"):
                value = kwargs.get("allow_pickle")
                assert isinstance(value, ast.Constant) and value.value is False, where
    assert set(opt_in) == {("weights.py", "_trusted_load")}, opt_in


def test_the_only_unpickler_of_the_package_is_the_inert_one():
    """Static guard: a pickle.Unpickler subclass exists only in core/inert_pickle.py, and its
    find_class returns nothing it imported (no import, getattr or __import__ in its body)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any("Unpickler" in ast.unparse(b) for b in node.bases):
                found.append((path.name, node.name))
                methods = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
                body = ast.unparse(methods["find_class"])
                assert "import" not in body and "getattr" not in body and "super()" not in body, body
    assert found == [("inert_pickle.py", "InertUnpickler")], found


# -- escaping -------------------------------------------------------------------------------------
HOSTILE_IDS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "[click](javascript:alert(3))",
               "**bold** _it_ `code` | pipe | # head", "</td></tr></table><b>x</b>"]


def test_hostile_row_ids_and_output_folder_are_escaped_in_report_and_prefect_artifacts(api, mlflow_store, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tracin_tasks.orchestration import audit_training_run

    frame = iris_frame(60)
    frame["row_id"] = [f"{HOSTILE_IDS[i % len(HOSTILE_IDS)]}-{i}" for i in range(len(frame))]
    run = mlflow_store.log_run(frame, name="hostile-ids")
    out = tmp_path / "out-<b>x</b>-[l](javascript:alert(4))-`c`"
    with support.one_torch_thread():
        state = audit_training_run(run_id=run.run_id, tracking_uri=run.tracking_uri, output_dir=str(out),
                                   batch_size=64, report=True, validate_results=False, log_to_mlflow=False,
                                   return_state=True)
    result = state.result()
    flow_run_id = state.state_details.flow_run_id

    report = (out / "report.html").read_text()
    lower = report.lower()
    assert "<script" not in lower and "<img src=x" not in lower and "<b>x</b>" not in report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report or "&lt;b&gt;x&lt;/b&gt;" in report

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    summary = by_key["tracin-audit-summary"].data
    assert "<b>" not in summary and "<script" not in summary.lower() and "<img" not in summary.lower()
    assert "[l](javascript" not in summary and "](javascript" not in summary
    assert "&lt;b&gt;x&lt;/b&gt;" in summary  # the folder name is there, as text

    table = by_key["tracin-flagged-rows"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert rows and {r["row_id"] for r in rows} <= set(frame["row_id"])  # data kept exactly, shown as text
    assert result["flagged"] >= len(rows) > 0

    link = by_key["tracin-report"].data  # stored as markdown [text](url): the folder must not end the url
    url = link.split("](", 1)[1][:-1]
    assert not any(ch in url for ch in "()[] <>`"), link
    assert url.startswith("file:///") and url.endswith("/report.html") and "javascript" in url


TERMINAL_HOSTILE = ["\x1b[2J\x1b[31mred", "nul\x00byte", "\u202eevil", "two\nlines", "bell\x07\r",
                    "=HYPERLINK(\"http://x.invalid\",\"click\")", "+1+1", "-2+3", "@SUM(1,2)", "'quoted"]


def _clean_terminal_text(text: str, max_line: int = 400) -> list[str]:
    """What would reach a terminal unescaped: control characters, bidi overrides, over-long lines."""
    problems = [repr(ch) for ch in set(text) if (ord(ch) < 0x20 and ch not in "\n\t") or ch in "\x7f\u202e"]
    problems += [f"a line of {len(line)} characters" for line in text.splitlines() if len(line) > max_line]
    return problems


def test_hostile_row_ids_reach_terminals_escaped_and_csv_files_neutralised(api, mlflow_store, tmp_path):
    """Row ids with escape sequences, NUL, a bidi override, newlines, a 100,000-character id and
    spreadsheet formulas: the CLI's audit summary and ``relabel list``/``claim`` show them escaped
    and shortened; CSV (the file drop, ``relabel list --format csv``) never starts a cell with
    ``= + - @``, and reading the CSV back gives the exact ids; parquet and the queue keep them whole."""
    import csv

    from tracin_tasks._text import from_csv_cell

    frame = iris_frame(60)
    ids = [f"{TERMINAL_HOSTILE[i % len(TERMINAL_HOSTILE)]}-{i}" for i in range(len(frame))]
    ids[7] = "L" * 100_000
    frame["row_id"] = ids
    run = mlflow_store.log_run(frame, name="terminal-hostile")
    queue = f"sqlite:///{tmp_path / 'q.db'}"
    drop = tmp_path / "drop"
    code, out, err = cli(*cli_audit_args(run, tmp_path / "out"), "--relabel", queue, "--relabel",
                         f"file://{drop}?format=csv", "--top-fraction", "0.5")
    assert code == 0, err[-3000:]
    assert _clean_terminal_text(out) == [], out[-2000:]
    assert "\\x1b[2J" in out or "\\x00" in out or "\\u202e" in out  # shown, escaped

    code, listed, err = cli("relabel", "list", "--queue", queue, "--limit", "0")
    assert code == 0 and _clean_terminal_text(listed) == [], listed[-2000:]
    code, claimed, err = cli("relabel", "claim", "--queue", queue, "--worker", "\x1b[31mw", "-n", "40")
    assert code == 0 and _clean_terminal_text(claimed) == [], claimed[-2000:]

    flagged = set(pd.read_parquet(tmp_path / "out" / "issues.parquet").query("flagged")["row_id"])
    assert flagged and "L" * 100_000 in set(pd.read_parquet(tmp_path / "out" / "scores.parquet")["row_id"])
    code, as_csv, err = cli("relabel", "list", "--queue", queue, "--limit", "0", "--format", "csv")
    assert code == 0
    with open(next(drop.glob("flagged_*.csv")), newline="") as fh:
        dropped = fh.read()
    for text in (as_csv, dropped):
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        cells = [v for r in rows for v in r.values() if v and not _is_number(v)]
        assert not [c for c in cells if c[0] in "=+-@\t\r"], "a CSV cell a spreadsheet would run"
        assert {from_csv_cell(r["row_id"]) for r in rows} == flagged  # exact, once unquoted


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_stale_download_folders_are_removed(mlflow_store, tmp_path):
    """Temporary folders of downloads whose process died (this host) or that are older than six
    hours (any host) are removed by the next audit of the run; a live one is left alone."""
    import subprocess
    import sys
    import time

    from tracin_tasks.integrations.mlflow.cache import _HOST
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    run = mlflow_store.log_run(name="stale-downloads")
    source = MlflowCheckpointSource(run.run_id, run.tracking_uri, cache_dir=tmp_path / "cache")
    root = Path(source.cache.path("checkpoints", "step_1"))
    root.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = {f".download-{_HOST}-{dead}-a1b2", f".fresh-{_HOST}-{dead}-c3d4", ".download-other.host-1-e5f6",
             ".download-old"}
    kept = {f".download-{_HOST}-{os.getpid()}-g7h8", ".download-other.host-1-i9j0"}
    for name in stale | kept:
        (root / name).mkdir()
        (root / name / "partial").write_bytes(b"x" * 10)
    week_ago = time.time() - 7 * 24 * 3600
    for name in (".download-other.host-1-e5f6", ".download-old"):
        os.utime(root / name, (week_ago, week_ago))
    source.checkpoints()
    left = {p.name for p in root.iterdir() if p.name.startswith(".")}
    assert left == kept, left


# -- SQL ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("table, schema", [
    ("x; DROP TABLE y", None), ("queue--", None), ('q"; DELETE FROM y; --', None), ("ok", "main; DROP TABLE y"),
    ("1starts_with_digit", None), ("a" * 60, None), ("tab le", None), ("täble", None),
])
def test_hostile_table_and_schema_names_are_refused(table, schema, tmp_path):
    from tracin_tasks.integrations.relabel.sql_queue import SqlQueue

    db = tmp_path / "q.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE y (v TEXT)")
    with pytest.raises(ConfigurationError, match="plain SQL name"):
        SqlQueue(f"sqlite:///{db}", table=table, schema=schema)
    with pytest.raises(ConfigurationError, match="plain SQL name"):
        from urllib.parse import quote

        SqlQueue.from_uri(f"sqlite:///{db}?table={quote(table)}" + (f"&schema={quote(schema)}" if schema else ""))
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["y"]


def test_hostile_row_ids_and_reasons_are_stored_verbatim_with_no_sql_effect(tmp_path):
    from tracin_tasks.integrations.relabel.base import FlaggedBatch, FlaggedRow
    from tracin_tasks.integrations.relabel.sql_queue import SqlQueue

    db = tmp_path / "q.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE students (name TEXT)")
        conn.execute("INSERT INTO students VALUES ('Robert')")
    hostile = ["x'); DROP TABLE students; --", "1 OR 1=1", "'; DELETE FROM tracin_relabel_queue; --",
               'quote " and \\ backslash', "%_ wildcards _%", "\u202eright-to-left", "NULL"]
    rows = tuple(FlaggedRow(row_id=rid, rank=i + 1, score=1.0 - i / 10, given_label=0, suggested_label=1,
                            reason=f"reason {rid}") for i, rid in enumerate(hostile))
    batch = FlaggedBatch(run_id="r" * 32, fingerprint="f" * 64, audit_key="a" * 16, rows=rows)
    with SqlQueue(f"sqlite:///{db}") as queue:
        delivery = queue.deliver(batch)
        assert delivery.delivered == len(hostile)
        stored = queue.rows(fingerprint="f" * 64)
        assert stored["row_id"].tolist() == hostile
        assert stored["reason"].tolist() == [f"reason {rid}" for rid in hostile]
        assert queue.decide(hostile[0], "f" * 64, "relabeled", label=2, by="o'brien; --") == "relabeled"
        assert queue.deliver(batch).unchanged + queue.deliver(batch).updated >= len(hostile)  # idempotent
        assert len(queue.rows(fingerprint="f" * 64)) == len(hostile)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM students").fetchall() == [("Robert",)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"students", "tracin_relabel_queue", "tracin_relabel_queue_meta"} <= tables


def test_sql_is_built_with_sqlalchemy_core_and_bound_parameters():
    """Static guard on the SQL queue: no SQL text is assembled from strings (f-strings, %, +, format)."""
    source = (PACKAGE / "integrations" / "relabel" / "sql_queue.py").read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node).endswith(("text", "exec_driver_sql", "execute")):
            for arg in node.args[:1]:
                if isinstance(arg, (ast.JoinedStr, ast.BinOp)) or (
                        isinstance(arg, ast.Call) and _call_name(arg).endswith("format")):
                    raise AssertionError(f"SQL built from a string at line {node.lineno}")
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    assert arg.value.upper().startswith(("BEGIN", "PRAGMA")), (node.lineno, arg.value)


# -- secrets --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A real ``mlflow server --app-name basic-auth`` whose only user is ``auditor`` (password
    ENV_SECRET), with a small iris run logged through it with those credentials."""
    from .conftest import MlflowStore

    root = tmp_path_factory.mktemp("auth-server")
    ini = root / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{root / 'basic_auth.db'}\nadmin_username = auditor\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   # each request's PBKDF2 check costs tens of ms: cache successful checks for the test
                   "auth_cache_ttl_seconds = 300\n")
    server = support.MlflowServer(root / "server", app_name="basic-auth", env={
        "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": ENV_SECRET,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex})
    server.start()
    try:
        server.wait_healthy()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_USERNAME", "auditor")
            mp.setenv("MLFLOW_TRACKING_PASSWORD", ENV_SECRET)
            run = MlflowStore(root / "client", tracking_uri=server.uri).log_run(name="behind-auth")
        yield server, run
    finally:
        server.stop()


def _prefect_database() -> Path:
    import prefect.settings

    url = str(prefect.settings.PREFECT_API_DATABASE_CONNECTION_URL.value() or "")
    if "sqlite" not in url:
        pytest.skip(f"the Prefect test server's database is not a sqlite file ({url.split(':')[0]})")
    return Path(url.split(":///", 1)[1])


@pytest.fixture(scope="module")
def secret_audit(api, auth_server, tmp_path_factory):
    """The CLI audits the run behind the authenticating server, its credentials in
    MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD: report, Great Expectations, MLflow child run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterStartTime,
        LogFilter,
        LogFilterFlowRunId,
    )

    server, run = auth_server
    root = tmp_path_factory.mktemp("secret-audit")
    home = root / "state"
    env = support.child_env(home, api, MLFLOW_TRACKING_USERNAME="auditor", MLFLOW_TRACKING_PASSWORD=ENV_SECRET)
    out = root / "out"
    started = datetime.now(timezone.utc)
    proc = support.start_cli(["audit", "--run-id", run.run_id, "--tracking-uri", server.uri, "--output", str(out)],
                             env, root / "logs")
    proc.wait(timeout=600)
    stdout = (root / "logs" / "cli.out").read_text(errors="replace")
    stderr = (root / "logs" / "cli.err").read_text(errors="replace")
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            start_time=FlowRunFilterStartTime(after_=started)))
        mine = [f for f in flow_runs if run.run_id in json.dumps(f.parameters, default=str)
                or f.parent_task_run_id is not None]
        ids = [f.id for f in mine]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids))) if ids else []
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=ids))) if ids else []
    return {"code": proc.returncode, "stdout": stdout, "stderr": stderr, "out": out, "home": home, "run": run,
            "server": server, "flow_runs": mine, "logs": [l.message for l in logs],
            "artifacts": [json.dumps(a.data, default=str) + (a.description or "") for a in artifacts]}


def _secret_hits(audit_, secret: str) -> dict[str, list[str]]:
    server = audit_["server"]
    needle = secret.encode()
    forms = (secret, base64.b64encode(f"auditor:{secret}".encode()).decode())
    hits = {
        "output folder": support.files_containing(audit_["out"], needle),
        "MLflow artifacts, database and server logs": support.files_containing(server.root, needle),
        "download cache and state": support.files_containing(audit_["home"], needle),
        "Prefect database": support.files_containing(_prefect_database().parent, needle),
        "CLI stdout/stderr": [n for n in ("stdout", "stderr") if any(f in audit_[n] for f in forms)],
        "Prefect logs": [m for m in audit_["logs"] if any(f in m for f in forms)],
        "Prefect artifacts": [a for a in audit_["artifacts"] if any(f in a for f in forms)],
        "Prefect flow-run parameters": [str(f.id) for f in audit_["flow_runs"]
                                        if secret in json.dumps(f.parameters, default=str)],
    }
    return {k: v for k, v in hits.items() if v}


def test_audit_behind_an_authenticating_server_succeeds(secret_audit):
    assert secret_audit["code"] == 0, secret_audit["stderr"][-4000:]
    assert "validation: passed" in secret_audit["stdout"]
    assert (secret_audit["out"] / "report.html").is_file()
    assert "MLflow audit run" in secret_audit["stdout"]
    assert secret_audit["logs"] and secret_audit["flow_runs"], "nothing read back from Prefect"


def test_the_server_really_refuses_requests_without_the_credentials(auth_server):
    server, run = auth_server
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/runs/get?run_id={run.run_id}", timeout=30)
    assert info.value.code == 401


def test_environment_password_appears_nowhere(secret_audit):
    """Not in any output, plan, cache, MLflow store, the Prefect database file, log, artifact,
    parameter or message."""
    assert _secret_hits(secret_audit, ENV_SECRET) == {}


def test_password_in_the_tracking_uri_is_refused_before_anything_stores_it(api, auth_server, tmp_path):
    """The CLI refuses it with one clear message (exit 2) and writes nothing; the password is then
    in no file of the output folder, the state, the MLflow server or the Prefect database."""
    server, run = auth_server
    home = tmp_path / "state"
    uri = server.uri.replace("http://", f"http://auditor:{URI_SECRET}@")
    out = tmp_path / "out"
    proc = support.start_cli(["audit", "--run-id", run.run_id, "--tracking-uri", uri, "--output", str(out)],
                             support.child_env(home, api), tmp_path / "logs")
    proc.wait(timeout=300)
    stderr = (tmp_path / "logs" / "cli.err").read_text(errors="replace")
    assert proc.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: The tracking URI 'http://auditor:***@127.0.0.1:"), errors
    assert "MLFLOW_TRACKING_PASSWORD" in errors[0] and "--mlflow-secret-block" in errors[0]
    assert not out.exists()
    needle = URI_SECRET.encode()
    assert support.files_containing(tmp_path, needle) == []
    assert support.files_containing(server.root, needle) == []
    assert support.files_containing(_prefect_database().parent, needle) == []


def test_the_flow_refuses_a_password_and_redacts_its_stored_parameter(api, auth_server, tmp_path):
    """Called as a flow (Python, a deployment), Prefect stores the parameters before the flow runs:
    the flow refuses the URI and overwrites its own stored parameter."""
    from prefect.client.orchestration import get_client

    from tracin_tasks.exceptions import CredentialsInUriError
    from tracin_tasks.orchestration import audit_training_run

    server, run = auth_server
    uri = server.uri.replace("http://", f"http://auditor:{URI_SECRET}@")
    # a sink's key percent-encoded in its query: stored as written, so redacted as written
    sink = f"labelstudio://127.0.0.1:9?project=1&api_key=k%2F{URI_SECRET}"
    state = audit_training_run(run_id=run.run_id, tracking_uri=uri, output_dir=str(tmp_path / "out"),
                               relabel=[sink], return_state=True)
    with pytest.raises(CredentialsInUriError) as info:
        state.result()
    assert URI_SECRET not in str(info.value)
    with get_client(sync_client=True) as client:
        stored = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert URI_SECRET not in json.dumps(stored) and stored["tracking_uri"].startswith("http://auditor:***@")
    assert stored["relabel"] == ["labelstudio://127.0.0.1:9?project=1&api_key=***"]
    assert not (tmp_path / "out").exists()


def test_the_password_can_come_from_a_prefect_secret_block(api, auth_server, tmp_path, monkeypatch):
    """``mlflow_secret_block``: the flow reads the password from a Prefect Secret block; nothing
    else holds it (the MLflow variables are unset here, so only the block can have supplied it)."""
    from prefect.blocks.system import Secret

    from tracin_tasks.orchestration import audit_training_run
    from tracin_tasks.orchestration.sources import _load_mlflow_credentials

    server, run = auth_server
    name = f"mlflow-auditor-{uuid.uuid4().hex[:6]}"
    Secret(value={"username": "auditor", "password": ENV_SECRET}).save(name)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    _load_mlflow_credentials.cache_clear()
    try:
        result = audit_training_run(run_id=run.run_id, tracking_uri=server.uri, output_dir=str(tmp_path / "out"),
                                    report=False, batch_size=64, mlflow_secret_block=name)
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
        _load_mlflow_credentials.cache_clear()
    assert result["rows"] == len(run.frame)
    assert support.files_containing(tmp_path, ENV_SECRET.encode()) == []


def test_tracking_errors_never_quote_the_password(tmp_path):
    from tracin_tasks.exceptions import TrackingServerUnavailableError
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    uri = f"http://auditor:{URI_SECRET}@127.0.0.1:{support.free_port()}"  # nothing listens there
    source = MlflowCheckpointSource("0" * 32, uri, cache_dir=tmp_path / "c", retries=2, backoff=0.05)
    with pytest.raises(TrackingServerUnavailableError) as info:
        source.checkpoint_refs()
    text = "".join(traceback.format_exception(info.value))
    assert URI_SECRET not in text and "auditor:***@127.0.0.1" in str(info.value)
    assert not list((tmp_path / "c").rglob("*")) or URI_SECRET not in str(list((tmp_path / "c").rglob("*")))


# -- paths ----------------------------------------------------------------------------------------
def test_run_id_with_dot_dot_is_refused_before_anything_is_written(api, mlflow_store, tmp_path, monkeypatch):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TRACIN_TASKS_CACHE_DIR", str(tmp_path / "a" / "cache"))
    code, _, stderr = cli("audit", "--run-id", "../../escaped", "--tracking-uri", mlflow_store.uri,
                          "--no-validate", "--no-mlflow-report")
    assert code == 2 and "run_id '../../escaped' is not an MLflow id" in stderr, stderr[-3000:]
    assert not (tmp_path / "escaped").exists() and not list((tmp_path / "a").rglob("*.parquet"))
    assert not (tmp_path / "a" / "cache").exists()


def test_training_data_path_with_dot_dot_in_the_run_is_refused(api, mlflow_store, tmp_path, monkeypatch):
    cache = tmp_path / "deep" / "er" / "cache"
    monkeypatch.setenv("TRACIN_TASKS_CACHE_DIR", str(cache))
    run = mlflow_store.log_run(data="none", name="dotdot-data")
    escape = "../" * 12 + f"{tmp_path.name}/escaped.parquet"
    mlflow_store.write_raw_data(run.run_id, iris_frame(60), spec={"artifact_path": escape, "label_column": "label",
                                                                  "row_id_column": "row_id"})
    with pytest.raises(TrainingDataError, match="Refusing artifact path"):
        audit(run, tmp_path / "out")
    assert not (tmp_path / "escaped.parquet").exists()
    assert all(cache in p.parents for p in cache.parent.parent.rglob("*") if p.is_file())
    assert leftovers(tmp_path / "out") == []


def test_checkpoint_path_with_dot_dot_from_the_server_is_refused(api, mlflow_store, tmp_path, monkeypatch):
    """A tracking server that lists a checkpoint at ``checkpoints/../../../escaped/epoch_1.pt``."""
    import mlflow
    from mlflow.entities import FileInfo

    cache = tmp_path / "cache"
    monkeypatch.setenv("TRACIN_TASKS_CACHE_DIR", str(cache))
    run = mlflow_store.log_run(checkpoints=1, name="dotdot-listing")
    original = mlflow.MlflowClient.list_artifacts

    def hostile_listing(self, run_id, path=None):
        found = original(self, run_id, path)
        if run_id == run.run_id and path is None:  # where a walk of every artifact starts
            found = [f for f in found if f.path != "checkpoints"] + [
                FileInfo("checkpoints/../../../../escaped/epoch_1.pt", False, 100)]
        elif run_id == run.run_id and path == "checkpoints/step_1":  # the helper layout's checkpoint folder
            found = [FileInfo("checkpoints/step_1/../../../../escaped/state_dict.pt", False, 100)]
        return found

    monkeypatch.setattr(mlflow.MlflowClient, "list_artifacts", hostile_listing)
    with pytest.raises(CheckpointError, match="Refusing artifact path"):
        audit(run, tmp_path / "out")
    assert not list(tmp_path.rglob("escaped*"))
    assert leftovers(tmp_path / "out") == []


def test_logged_model_id_with_dot_dot_is_refused(tmp_path):
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    source = MlflowCheckpointSource("0" * 32, f"sqlite:///{tmp_path / 'unused.db'}", cache_dir=tmp_path / "c")
    with pytest.raises(ConfigurationError, match="LoggedModel id"):
        source.cache.download("data/model.pt2", model_id="../../../escaped")
    assert not (tmp_path / "c").exists()
