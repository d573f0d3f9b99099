"""One audit's output is one audit: a reader of an output folder sees one whole finished audit.

* a kill at every write point of an audit's finishing steps (aggregate, flag, validate, report,
  publish) into a folder that shows an earlier audit leaves that earlier audit, whole, or the new
  one, whole — never one's scores beside the other's report (tests/reliability/_publish_driver.py
  forks a child per point and SIGKILLs it just before that write);
* two audits into one folder at once, with Great Expectations validation on, take turns: every
  try ends with both succeeding and the folder showing one whole audit, never an untyped error;
* a reader asking for an audit by its key gets that audit or a typed error, never another one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from . import _faults_support as support

pytest.importorskip("prefect")
pytest.importorskip("mlflow")

from .conftest import audit  # noqa: E402

DRIVER = Path(__file__).with_name("_publish_driver.py")


def shown_audit(out: Path) -> dict:
    """The manifest of the audit ``out`` shows, after checking that every name that resolves is
    exactly that audit's, with the content its manifest records."""
    names = sorted(n for n in os.listdir(out) if n not in (".audit", "cells", "outbox"))
    shown = sorted(n for n in names if (out / n).exists())
    manifest = json.loads((out / "audit.json").read_text())
    assert shown == sorted([*manifest["files"], *manifest["folders"], "audit.json"]), (shown, manifest)
    for name, meta in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == meta["sha256"], name
    return manifest


def _driver(spec: dict, tmp: Path, name: str) -> dict:
    (tmp / f"{name}.json").write_text(json.dumps(spec))
    env = support.child_env(tmp / "driver-state", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(DRIVER), str(tmp / f"{name}.json"), str(tmp / f"{name}-out.json")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / f"{name}-out.json").read_text())


def test_a_kill_at_every_write_point_leaves_one_whole_audit(api, mlflow_store, tmp_path):
    """The folder shows audit A, validated (its Data Docs under ``gx``); audit B is finished into
    it without validation, so B also drops a name A had. Every write point of B's finishing steps.
    (GX's own ~150 writes land in the new audit's folder, which nothing links to before the switch;
    two audits with GX at once are the next test.)"""
    validate = False
    run = mlflow_store.log_run(name="kill-points")
    results = tmp_path / "cells"
    pristine = tmp_path / "pristine"
    # the folder shows audit A (last layer only), and keeps the audit before it; audit B (every
    # layer, other scores) is planned, its cells stored: only its finishing steps are left
    audit(run, pristine, results_uri=str(results), layers="last", report=True, validate_results=True,
          flag={"top_fraction": 0.2})
    a = audit(run, pristine, results_uri=str(results), layers="last", report=True, validate_results=True)
    b = audit(run, tmp_path / "b", results_uri=str(results), report=False)
    assert a["audit_key"] != b["audit_key"]
    a_manifest = shown_audit(pristine)

    spec = {"results_uri": str(results), "audit_key": b["audit_key"], "pristine": str(pristine),
            "work": str(tmp_path / "work"), "validate": validate}
    (tmp_path / "work").mkdir()
    result = _driver({**spec, "kill_at": "every"}, tmp_path, "kill")
    assert result["exit"] == 0 and result["audit_key"] == b["audit_key"]  # unkilled, B is published
    events, points = result["events"], result["points"]
    assert len(events) >= 15, f"only {len(events)} write points: the hook does not see the writes"
    assert any(e["staged"] for e in events) and any(not e["staged"] for e in events)
    assert any(e["event"] == "os.rename" and e["path"].startswith(os.path.join(".audit", ".current.")) for e in events)
    chosen = list(range(1, len(events) + 1))
    assert [p["k"] for p in points] == chosen
    seen = {"old": [], "new": []}
    for point in points:
        assert point["exit"] == -9, point  # killed just before that write
        assert "error" not in point, point  # a reader finds a finished audit
        manifest = shown_audit(Path(point["out"]))
        assert manifest["audit_key"] == point["audit_key"]
        if manifest["audit_key"] == a["audit_key"]:
            assert manifest == a_manifest, point["k"]  # the old audit, untouched
            seen["old"].append(point["k"])
        else:
            assert manifest["audit_key"] == b["audit_key"], point
            seen["new"].append(point["k"])
    # killed before the switch: the old audit; after it (removing what it replaced): the new one
    assert seen["old"] and seen["new"] and max(seen["old"]) < min(seen["new"]), seen

    # the next audit into a killed folder removes what the killed one left unfinished, and publishes
    out = Path(points[chosen.index(max(seen["old"]))]["out"])
    again = audit(run, out, results_uri=str(results), report=True, validate_results=validate)
    assert again["audit_key"] == b["audit_key"] and again["computed"] == 0
    assert shown_audit(out)["audit_key"] == b["audit_key"]
    versions = [p for p in (out / ".audit").iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(versions) == 2, versions  # the audit shown and the one before it; nothing unfinished


_PAIR_WORKER = """
import json, os, sys, time
from tracin_tasks.cli import main

folder, side, tries, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])


def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.002)


for i in range(tries):
    open(os.path.join(folder, f"ready-{i}-{side}"), "w").close()
    wait_for(os.path.join(folder, f"go-{i}"))  # both sides are here: they start together
    try:
        code = main(args)
    except BaseException as exc:  # an untyped crash: the test reports it
        code = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(folder, f"done-{i}-{side}"), "w") as fh:
        json.dump(code, fh)
    wait_for(os.path.join(folder, f"checked-{i}"))
"""


def test_two_audits_into_one_folder_with_validation_take_turns(api, mlflow_store, tmp_path):
    """Two CLI processes, five times started together (a file barrier), audit one run into one
    output folder with Great Expectations validation on: both succeed every time, and after each
    try the folder shows one whole audit. (Without the folder's lock, GX's stores race: one audit
    exited with GX's untyped error in 2 of 4 tries, so five tries miss it about once in 30.)"""
    tries = 5
    run = mlflow_store.log_run(name="two-at-once")
    out = tmp_path / "out"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = support.child_env(tmp_path / "state", api)
    args = ["audit", "--run-id", run.run_id, "--tracking-uri", run.tracking_uri, "--output", str(out),
            "--batch-size", "64", "--no-mlflow-report"]
    (tmp_path / "worker.py").write_text(_PAIR_WORKER)
    procs = {}
    for side in ("a", "b"):
        with open(tmp_path / f"{side}.log", "wb") as log:
            procs[side] = subprocess.Popen(
                [sys.executable, str(tmp_path / "worker.py"), str(barrier), side, str(tries), json.dumps(args)],
                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        for i in range(tries):
            for side in procs:
                support.wait_for(lambda s=side: (barrier / f"ready-{i}-{s}").exists() or procs[s].poll() is not None,
                                 300, what=f"worker {side} ready for try {i}")
                assert procs[side].poll() is None, (tmp_path / f"{side}.log").read_text()[-3000:]
            (barrier / f"go-{i}").touch()
            for side in procs:
                support.wait_for(lambda s=side: (barrier / f"done-{i}-{s}").exists() or procs[s].poll() is not None,
                                 300, what=f"worker {side} done with try {i}")
                code = json.loads((barrier / f"done-{i}-{side}").read_text())
                assert code == 0, f"try {i}, worker {side}: {code}\n" + (tmp_path / f"{side}.log").read_text()[-3000:]
            manifest = shown_audit(out)
            assert manifest["folders"] == ["gx"] and (out / "gx").is_dir()
            (barrier / f"checked-{i}").touch()
        for side, proc in procs.items():
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    log = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert log.count("validation: passed") == 2 * tries
    assert "waiting for it to finish" in log  # the second of each pair waited for the first
    versions = [p for p in (out / ".audit").iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(versions) == 2


def test_a_reader_asking_for_an_audit_gets_that_audit_or_a_typed_error(api, mlflow_store, tmp_path):
    from tracin_tasks.exceptions import UnfinishedAuditError
    from tracin_tasks.orchestration.outputs import find_finished_audit

    run = mlflow_store.log_run(name="reader")
    out = tmp_path / "out"
    results = str(tmp_path / "cells")
    first = audit(run, out, results_uri=results, layers="last", report=True, validate_results=False)
    second = audit(run, out, results_uri=results, report=True, validate_results=False)
    assert find_finished_audit(str(out))[1]["audit_key"] == second["audit_key"]
    folder, manifest = find_finished_audit(str(out), first["audit_key"])  # the one before is kept
    assert manifest["audit_key"] == first["audit_key"] and folder != os.path.realpath(out / ".audit" / "current")
    with pytest.raises(UnfinishedAuditError, match="no finished audit 0000"):
        find_finished_audit(str(out), "0000000000000000")
    (Path(folder) / "issues.parquet").write_bytes(b"changed")  # someone edits an audit's file
    with pytest.raises(UnfinishedAuditError, match="not the file audit"):
        find_finished_audit(str(out), first["audit_key"])
    with pytest.raises(UnfinishedAuditError, match="holds no finished audit"):
        find_finished_audit(str(tmp_path / "empty"))
