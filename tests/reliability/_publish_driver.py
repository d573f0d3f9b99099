"""Kill an audit's finishing steps at each write point, in a forked child, and say what a reader sees.

Run as a script by tests/reliability/test_outputs.py (a fresh process: it imports the product
once, starts no threads, and forks one child per kill point):

    python _publish_driver.py SPEC.json RESULT.json

SPEC: ``results_uri`` and ``audit_key`` of audit B (planned, every cell stored), ``pristine``
(an output folder showing audit A), ``work`` (a scratch folder), ``validate`` (Great Expectations
on or off), and ``kill_at``: ``"count"`` to list the write points (one child, not killed),
``"every"`` to list them and then kill a child at each, or a list of points.

A child copies nothing itself: the driver copies ``pristine`` to a fresh folder, forks, and the
child finishes audit B there (aggregate, flag, validate, report, publish: the steps the flow runs
after the cells) with an audit hook that SIGKILLs it just before its k-th write under that folder.
A write is any ``open`` for writing, rename, replace, symlink, remove, mkdir or rmtree.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

_WRITE_EVENTS = {"os.rename", "os.symlink", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.link",
                 "os.truncate", "os.chmod"}


def _paths(event: str, args: tuple) -> list[str]:
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
        return [path] if writing and isinstance(path, (str, bytes, os.PathLike)) else []
    if event in _WRITE_EVENTS:
        return [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
    return []


def finish(spec: dict, out: str) -> dict:
    """The flow's steps after the cells, as plain functions, into output folder ``out``."""
    from tracin_tasks.orchestration.aggregate import write_scores
    from tracin_tasks.orchestration.reporting import report_audit
    from tracin_tasks.orchestration.flows import _load_plan
    from tracin_tasks.orchestration.outputs import OutputFolder
    from tracin_tasks.orchestration.store import ResultsStore

    plan = _load_plan(spec["results_uri"], spec["audit_key"])
    folder = OutputFolder(out)
    with folder.lock(timeout=60):
        version = folder.new_version(plan.audit_key)
        write_scores(plan, ResultsStore(spec["results_uri"]), version)
        report_audit(plan, version, None, spec["validate"], None, False)
        return folder.publish(version, {"audit_key": plan.audit_key, "run_id": plan.settings.run_id})


def child(spec: dict, out: str, kill_at: int | None, count_file: str | None) -> None:
    root = os.path.abspath(out)
    seen: list[tuple[str, str]] = []

    def hook(event: str, args: tuple) -> None:
        for p in _paths(event, args):
            path = os.path.abspath(os.fsdecode(p))  # not realpath: a link's own name is what changes
            if path == root or path.startswith(root + os.sep):
                seen.append((event, os.path.relpath(path, root)))
                if len(seen) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return

    sys.addaudithook(hook)
    manifest = finish(spec, out)
    if count_file:
        with open(count_file, "w") as fh:  # outside ``out``: not counted
            json.dump({"events": seen, "version": manifest["version"]}, fh)
    os._exit(0)


def run_child(spec: dict, out: str, kill_at: int | None, count_file: str | None = None) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            child(spec, out, kill_at, count_file)
        except BaseException as exc:  # noqa: BLE001 - reported through the exit code
            sys.stderr.write(f"child failed: {type(exc).__name__}: {exc}\n")
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main() -> None:
    # the product's modules are imported here once, before any fork
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (imported for the children)

    import tracin_tasks.integrations.report  # noqa: F401
    from tracin_tasks.orchestration.outputs import find_finished_audit

    spec = json.load(open(sys.argv[1]))
    if spec["validate"]:
        import tracin_tasks.integrations.gx_validation  # noqa: F401  (and Great Expectations, for the children)
    # the run's training data, read once here: every child inherits it (Arrow's thread pool is fork-safe)
    from tracin_tasks.orchestration.sources import training_table
    from tracin_tasks.orchestration.flows import _load_plan

    plan = _load_plan(spec["results_uri"], spec["audit_key"])
    training_table(plan.settings, plan.fingerprint)
    result: dict = {}
    if spec["kill_at"] in ("count", "every"):
        out = os.path.join(spec["work"], "count")
        shutil.copytree(spec["pristine"], out, symlinks=True)
        count_file = os.path.join(spec["work"], "count.txt")
        result["exit"] = run_child(spec, out, None, count_file)
        counted = json.load(open(count_file)) if os.path.exists(count_file) else {"events": [], "version": None}
        staged = os.path.join(".audit", str(counted["version"])) + os.sep
        # where each write lands: in the new audit's own folder (nothing links there yet), or elsewhere
        result["events"] = [{"event": e, "path": p, "staged": p.startswith(staged)} for e, p in counted["events"]]
        result["audit_key"] = find_finished_audit(out)[1]["audit_key"]
    if spec["kill_at"] != "count":
        kill_at = range(1, len(result["events"]) + 1) if spec["kill_at"] == "every" else spec["kill_at"]
        result["points"] = []
        for k in kill_at:
            out = os.path.join(spec["work"], f"kill-{k:03d}")
            shutil.copytree(spec["pristine"], out, symlinks=True)
            code = run_child(spec, out, k)
            point = {"k": k, "exit": code, "out": out}
            try:
                folder, manifest = find_finished_audit(out)
                point.update(folder=folder, audit_key=manifest["audit_key"])
            except Exception as exc:  # noqa: BLE001 - what a reader would get, recorded for the test
                point.update(error=f"{type(exc).__name__}: {exc}")
            result["points"].append(point)
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
